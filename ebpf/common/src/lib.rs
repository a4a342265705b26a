//! The contract between the eBPF programs and the node tunnel: map names, the `#[repr(C)]`
//! keys and values stored in them, and the ports and mark both sides agree on. Defined
//! once here and used by both sides, so the layouts cannot drift.
//!
//! Byte order: IP addresses are kept as the kernel hands them to the programs (network
//! order, in the `u32` words of `bpf_sock_addr`); ports are in host order.
#![no_std]

/// The default mark (`SO_MARK`) on every socket the tunnel opens (`socketMark` of the
/// config file). The programs never steer a socket that carries the tunnel's mark, so
/// the tunnel's own connections from a pod's namespace go where they are addressed; the
/// loader sets the mark in force into the programs' [`globals::SOCKET_MARK`].
pub const DEFAULT_SOCKET_MARK: u32 = 0x539;

/// Globals of the programs, set by the loader before the kernel sees them.
pub mod globals {
    /// `u32`: the tunnel's socket mark; sockets carrying it are never steered.
    pub const SOCKET_MARK: &str = "SOCKET_MARK";
}

/// The tunnel's outbound capture listener inside each enrolled pod, on the pod's own
/// IPv4 and IPv6 addresses (loopback for a family the pod lacks): connects that leave
/// the pod are rewritten to it.
pub const OUTBOUND_PORT: u16 = 15001;
/// The tunnel's inbound plaintext listener inside each enrolled pod: SYNs to any other
/// port of the pod are handed to it.
pub const INBOUND_PORT: u16 = 15006;
/// The tunnel's HBONE listener inside each enrolled pod, left to the regular lookup.
pub const HBONE_PORT: u16 = 15008;

/// Version of the map layout below; pinned maps live in a directory named after it, so
/// a tunnel with another layout never reuses incompatible pinned maps.
pub const MAP_LAYOUT_VERSION: u32 = 1;

/// `AF_INET`, as stored in [`SockAddr::family`].
pub const AF_INET: u16 = 2;
/// `AF_INET6`, as stored in [`SockAddr::family`].
pub const AF_INET6: u16 = 10;

/// Map names, as declared by the programs and looked up by the tunnel.
pub mod maps {
    /// `HashMap<u64 netns cookie, EnrolledPod>`: the namespaces whose traffic is steered.
    pub const ENROLLED: &str = "ENROLLED";
    /// `LruHashMap<u64 socket cookie, SockAddr>`: original destinations of steered
    /// connects, until the socket is closed (`getpeername` reports them).
    pub const DESTINATION_BY_SOCKET: &str = "DESTINATION_BY_SOCKET";
    /// `LruHashMap<ConnectionKey, SockAddr>`: original destinations of established
    /// steered connections, for the tunnel to look up by the accepted peer's port.
    pub const DESTINATION_BY_PORT: &str = "DESTINATION_BY_PORT";
    /// `HashMap<u16 port, u8>`: outbound destination ports never steered (value unused).
    pub const EXCLUDED_PORTS: &str = "EXCLUDED_PORTS";
    /// `LpmTrie<[u8; 4], u8>`: IPv4 peers never steered, either way: connects to them
    /// and SYNs from them go direct.
    pub const EXCLUDED_V4: &str = "EXCLUDED_V4";
    /// `LpmTrie<[u8; 16], u8>`: IPv6 peers never steered, either way.
    pub const EXCLUDED_V6: &str = "EXCLUDED_V6";
    /// `HashMap<Address, u64 netns cookie>`: the addresses of enrolled pods, whose
    /// inbound SYNs are steered (or dropped while the tunnel is away).
    pub const ENROLLED_ADDRESSES: &str = "ENROLLED_ADDRESSES";
    /// `SockHash<Address>`: each enrolled pod's inbound plaintext listener, keyed by the
    /// pod address it serves.
    pub const INBOUND_LISTENERS: &str = "INBOUND_LISTENERS";
}

/// Program names (the Rust function names in the eBPF object).
pub mod programs {
    pub const CONNECT4: &str = "steer_connect4";
    pub const CONNECT6: &str = "steer_connect6";
    pub const SOCK_OPS: &str = "record_established";
    pub const SOCK_RELEASE: &str = "forget_released";
    pub const GETPEERNAME4: &str = "restore_peer4";
    pub const GETPEERNAME6: &str = "restore_peer6";
    pub const SK_LOOKUP: &str = "steer_inbound";
}

/// Value of `ENROLLED`: what the programs need to know about an enrolled pod.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EnrolledPod {
    /// The pod's IPv4 address (network order), 0 if it has none.
    pub ipv4: u32,
    /// The pod's IPv6 address (network order words), all zero if it has none.
    pub ipv6: [u32; 4],
}

/// An IP address as the programs see it: IPv4 in `words[0]` with the rest zero, IPv6 in
/// all four words, both in network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Address {
    pub words: [u32; 4],
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u16,
    pub _pad: u16,
}

/// A socket address: the original destination of a steered connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockAddr {
    pub address: Address,
    /// Port, host order.
    pub port: u16,
    pub _pad: u16,
}

/// Key of `DESTINATION_BY_PORT`: a connection by its client's namespace and local port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnectionKey {
    pub netns_cookie: u64,
    /// The client socket's local port (host order): the peer port the tunnel sees.
    pub port: u16,
    pub _pad: [u16; 3],
}

#[cfg(feature = "user")]
mod user {
    use super::{Address, ConnectionKey, EnrolledPod, SockAddr};

    // SAFETY: plain `#[repr(C)]` structs of integers with explicit padding fields, so
    // every bit pattern is a valid value and there are no implicit padding bytes.
    unsafe impl aya::Pod for EnrolledPod {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Address {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockAddr {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ConnectionKey {}
}
