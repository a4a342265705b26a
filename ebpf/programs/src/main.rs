//! eBPF programs that steer enrolled pods' TCP into the node tunnel.
//!
//! - `steer_connect4` / `steer_connect6` (`cgroup/connect4`, `cgroup/connect6`, on the
//!   node's cgroup v2 root): a TCP connect from an enrolled pod's namespace, by a socket
//!   without the tunnel's mark (`SOCKET_MARK`, set by the loader), to a destination that is neither the pod itself, nor
//!   loopback, nor an excluded port or peer, is rewritten to the pod's outbound capture
//!   listener on the pod's own address (`<pod ipv4>:15001`, `[<pod ipv6>]:15001`), so the
//!   kernel gives the application's socket the pod's address as its source, as without
//!   the mesh (a pod without an address of that family: loopback, 127.0.0.1 or [::1]).
//!   The original destination is kept by socket cookie. A connect to an IPv4-mapped IPv6
//!   address (`::ffff:a.b.c.d`) is treated as the IPv4 connect it is on the wire: the
//!   IPv4 rules apply, it is rewritten to `::ffff:<pod ipv4>:15001` (the IPv4 capture
//!   listener) and its original destination is recorded as IPv4.
//! - `record_established` (`sock_ops`): when a steered connection is established, copies
//!   its original destination to a map keyed by (netns cookie, local port), which the
//!   tunnel reads with the accepted connection's peer port.
//! - `restore_peer4` / `restore_peer6` (`cgroup/getpeername4`, `getpeername6`): the
//!   application asking a steered socket for its peer is told the original destination,
//!   not the capture listener.
//! - `forget_released` (`cgroup/sock_release`): drops a socket's entry when it is closed;
//!   both destination maps are also LRU-bounded.
//! - `steer_inbound` (`sk_lookup`, attached to each enrolled pod's namespace): a TCP SYN
//!   to any port of an enrolled pod address but the HBONE port, not sent by the pod to
//!   itself (from any of its addresses) nor by an excluded peer, and not to loopback,
//!   goes to the tunnel's inbound listener for that address. When that listener is
//!   missing (tunnel away) the SYN is dropped (the kernel then answers as for a closed
//!   port): steering fails closed. A SYN to the outbound capture port from anyone but
//!   the pod itself is dropped: that listener serves the pod's own connects alone. The
//!   registered addresses are checked first, so a released pod is left alone at once,
//!   before the kernel detaches the program (which it does after an RCU grace period).
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, bpf_sock_addr, sk_action},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock, cgroup_sock_addr, map, sk_lookup, sock_ops},
    maps::{HashMap, LpmTrie, LruHashMap, SockHash, lpm_trie::Key},
    programs::{SkLookupContext, SockAddrContext, SockContext, SockOpsContext},
};
use aya_log_ebpf::{error, warn};
use core::ptr::{read_volatile, write_volatile};
use ztunnel_ebpf_common::{
    AF_INET, AF_INET6, Address, ConnectionKey, DEFAULT_SOCKET_MARK, EnrolledPod, HBONE_PORT,
    OUTBOUND_PORT, SockAddr,
};

/// The tunnel's socket mark, set by the loader (`EbpfLoader::override_global`) from the
/// tunnel's config before the programs are loaded; read with `read_volatile` so the
/// compiler never folds the default in.
#[unsafe(no_mangle)]
static SOCKET_MARK: u32 = DEFAULT_SOCKET_MARK;

fn tunnel_mark() -> u32 {
    // SAFETY: a plain read of a global the kernel keeps for the program's lifetime.
    unsafe { read_volatile(&raw const SOCKET_MARK) }
}

/// Verdicts of the `cgroup/connect*`, `cgroup/getpeername*` and `cgroup/sock_*` programs.
const CONNECT_ALLOW: i32 = 1;
const CONNECT_REJECT: i32 = 0;
/// `sock_ops` programs return 1 when they ran as intended.
const SOCK_OPS_OK: u32 = 1;
const IPPROTO_TCP: u32 = 6;

const MAX_PODS: u32 = 1024;
/// Steered sockets (kept until closed, for `getpeername`), and established connections
/// awaiting the tunnel's look-up; beyond that, the least recently used are evicted.
const MAX_PENDING: u32 = 65536;
const MAX_EXCLUSIONS: u32 = 1024;

#[map]
static ENROLLED: HashMap<u64, EnrolledPod> = HashMap::pinned(MAX_PODS, 0);
#[map]
static DESTINATION_BY_SOCKET: LruHashMap<u64, SockAddr> = LruHashMap::pinned(MAX_PENDING, 0);
#[map]
static DESTINATION_BY_PORT: LruHashMap<ConnectionKey, SockAddr> =
    LruHashMap::pinned(MAX_PENDING, 0);
#[map]
static EXCLUDED_PORTS: HashMap<u16, u8> = HashMap::pinned(MAX_EXCLUSIONS, 0);
#[map]
static EXCLUDED_V4: LpmTrie<[u8; 4], u8> = LpmTrie::pinned(MAX_EXCLUSIONS, 0);
#[map]
static EXCLUDED_V6: LpmTrie<[u8; 16], u8> = LpmTrie::pinned(MAX_EXCLUSIONS, 0);
#[map]
static ENROLLED_ADDRESSES: HashMap<Address, u64> = HashMap::pinned(2 * MAX_PODS, 0);
#[map]
static INBOUND_LISTENERS: SockHash<Address> = SockHash::pinned(2 * MAX_PODS, 0);

/// 127.0.0.1 and ::1 as network-order words.
const LOOPBACK_V4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
const LOOPBACK_V6: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
/// Third word of an IPv4-mapped IPv6 address (`::ffff:0:0/96`).
const V4_MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

#[cgroup_sock_addr(connect4)]
pub fn steer_connect4(ctx: SockAddrContext) -> i32 {
    match try_steer_connect4(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

#[cgroup_sock_addr(connect6)]
pub fn steer_connect6(ctx: SockAddrContext) -> i32 {
    match try_steer_connect6(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

fn try_steer_connect4(ctx: &SockAddrContext) -> Result<i32, i32> {
    // SAFETY: the kernel hands a valid `bpf_sock_addr` for the program's duration.
    let addr = unsafe { &mut *ctx.sock_addr };
    let Some(pod) = steerable_pod(ctx, addr) else {
        return Ok(CONNECT_ALLOW);
    };
    let ip = addr.user_ip4;
    let port = u16::from_be(addr.user_port as u16);
    if !steered_v4(&pod, ip, port) {
        return Ok(CONNECT_ALLOW);
    }
    record_destination(ctx, Address::v4(ip), port)?;
    addr.user_ip4 = capture_v4(&pod);
    addr.user_port = u32::from(OUTBOUND_PORT.to_be());
    Ok(CONNECT_ALLOW)
}

fn try_steer_connect6(ctx: &SockAddrContext) -> Result<i32, i32> {
    // SAFETY: the kernel hands a valid `bpf_sock_addr` for the program's duration.
    let addr = unsafe { &mut *ctx.sock_addr };
    let Some(pod) = steerable_pod(ctx, addr) else {
        return Ok(CONNECT_ALLOW);
    };
    let ip = read_ip6(&addr.user_ip6);
    let port = u16::from_be(addr.user_port as u16);
    if ip[0] == 0 && ip[1] == 0 && ip[2] == V4_MAPPED_PREFIX {
        if !steered_v4(&pod, ip[3], port) {
            return Ok(CONNECT_ALLOW);
        }
        record_destination(ctx, Address::v4(ip[3]), port)?;
        set_user_ip6(addr, [0, 0, V4_MAPPED_PREFIX, capture_v4(&pod)]);
    } else {
        let local = ip == LOOPBACK_V6 || ip == [0; 4] || ip == pod.ipv6;
        if local || excluded_port(port) || excluded_v6(ip) {
            return Ok(CONNECT_ALLOW);
        }
        record_destination(ctx, Address::v6(ip), port)?;
        set_user_ip6(addr, capture_v6(&pod));
    }
    addr.user_port = u32::from(OUTBOUND_PORT.to_be());
    Ok(CONNECT_ALLOW)
}

/// The address of the pod's IPv4 capture listener: the pod's own, so the steered socket
/// gets it as its source.
fn capture_v4(pod: &EnrolledPod) -> u32 {
    if pod.ipv4 == 0 { LOOPBACK_V4 } else { pod.ipv4 }
}

/// The address of the pod's IPv6 capture listener (see [`capture_v4`]).
fn capture_v6(pod: &EnrolledPod) -> [u32; 4] {
    if pod.ipv6 == [0; 4] {
        LOOPBACK_V6
    } else {
        pod.ipv6
    }
}

/// Reads an IPv6 address of a context one word at a time, each load straight at its
/// context offset (see [`set_user_ip6`]).
fn read_ip6(words: &[u32; 4]) -> [u32; 4] {
    // SAFETY: each pointer is to a field of the live context.
    unsafe {
        [
            read_volatile(&raw const words[0]),
            read_volatile(&raw const words[1]),
            read_volatile(&raw const words[2]),
            read_volatile(&raw const words[3]),
        ]
    }
}

/// Writes the destination of an IPv6 connect one word at a time, each store straight at
/// its context offset: the verifier refuses context stores through a derived pointer,
/// which copying the array as a whole compiles to.
fn set_user_ip6(addr: &mut bpf_sock_addr, ip: [u32; 4]) {
    let words = &mut addr.user_ip6;
    // SAFETY: each pointer is to a field of the live context.
    unsafe {
        write_volatile(&raw mut words[0], ip[0]);
        write_volatile(&raw mut words[1], ip[1]);
        write_volatile(&raw mut words[2], ip[2]);
        write_volatile(&raw mut words[3], ip[3]);
    }
}

/// The enrolled pod a TCP connect comes from, unless the tunnel itself makes it.
fn steerable_pod(ctx: &SockAddrContext, addr: &bpf_sock_addr) -> Option<EnrolledPod> {
    if addr.protocol != IPPROTO_TCP {
        return None;
    }
    // SAFETY: the helper only reads the context's socket.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once; a concurrent update could at worst give
    // a mix of two registrations of the same namespace.
    let pod = *unsafe { ENROLLED.get(netns) }?;
    // SAFETY: `sk` of a `bpf_sock_addr` always points to the connecting socket.
    let mark = unsafe { (*addr.__bindgen_anon_1.sk).mark };
    (mark != tunnel_mark()).then_some(pod)
}

/// Whether a connect to the IPv4 `ip` (network order) and `port` is steered.
fn steered_v4(pod: &EnrolledPod, ip: u32, port: u16) -> bool {
    // 127/8 is loopback; 0/8 ("this host", 0.0.0.0 connects locally) too.
    let first_octet = ip.to_ne_bytes()[0];
    let local = first_octet == 127 || first_octet == 0 || ip == pod.ipv4;
    !(local || excluded_port(port) || excluded_v4(ip))
}

fn excluded_port(port: u16) -> bool {
    // SAFETY: only presence is checked; the value is not read.
    unsafe { EXCLUDED_PORTS.get(port) }.is_some()
}

fn excluded_v4(ip: u32) -> bool {
    EXCLUDED_V4.get(Key::new(32, ip.to_ne_bytes())).is_some()
}

fn excluded_v6(ip: [u32; 4]) -> bool {
    let mut bytes = [0u8; 16];
    for (chunk, word) in bytes.chunks_exact_mut(4).zip(ip) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    EXCLUDED_V6.get(Key::new(128, bytes)).is_some()
}

/// Remembers where a steered connect was going, by socket cookie; a connect whose
/// destination cannot be recorded is rejected rather than steered blind.
fn record_destination(ctx: &SockAddrContext, address: Address, port: u16) -> Result<(), i32> {
    // SAFETY: the helper only reads the context's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let destination = SockAddr {
        address,
        port,
        _pad: 0,
    };
    DESTINATION_BY_SOCKET
        .insert(cookie, destination, 0)
        .map_err(|err| {
            error!(ctx, "cannot record the destination of socket {}: {}", cookie, err);
            CONNECT_REJECT
        })
}

trait AddressExt {
    fn v4(ip: u32) -> Address;
    fn v6(ip: [u32; 4]) -> Address;
}

impl AddressExt for Address {
    fn v4(ip: u32) -> Address {
        Address {
            words: [ip, 0, 0, 0],
            family: AF_INET,
            _pad: 0,
        }
    }

    fn v6(ip: [u32; 4]) -> Address {
        Address {
            words: ip,
            family: AF_INET6,
            _pad: 0,
        }
    }
}

#[sock_ops]
pub fn record_established(ctx: SockOpsContext) -> u32 {
    match try_record_established(&ctx) {
        Ok(()) => SOCK_OPS_OK,
        Err(err) => {
            error!(&ctx, "cannot record an established connection: {}", err);
            SOCK_OPS_OK
        }
    }
}

fn try_record_established(ctx: &SockOpsContext) -> Result<(), i64> {
    if ctx.op() != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return Ok(());
    }
    // SAFETY: the helper only reads the context's socket.
    let Some(destination) = recorded_destination(unsafe { bpf_get_socket_cookie(ctx.as_ptr()) })
    else {
        return Ok(());
    };
    let key = ConnectionKey {
        // SAFETY: the helper only reads the context's socket.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        port: ctx.local_port() as u16,
        _pad: [0; 3],
    };
    DESTINATION_BY_PORT.insert(key, destination, 0)?;
    Ok(())
}

/// The original destination kept for the socket with `cookie`, if it was steered.
fn recorded_destination(cookie: u64) -> Option<SockAddr> {
    // SAFETY: copied out at once; the entry belongs to that socket alone.
    unsafe { DESTINATION_BY_SOCKET.get(cookie) }.copied()
}

#[cgroup_sock_addr(getpeername4)]
pub fn restore_peer4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands a valid `bpf_sock_addr` for the program's duration.
    let addr = unsafe { &mut *ctx.sock_addr };
    // SAFETY: the helper only reads the context's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(original) = recorded_destination(cookie)
        && original.address.family == AF_INET
    {
        addr.user_ip4 = original.address.words[0];
        addr.user_port = u32::from(original.port.to_be());
    }
    CONNECT_ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn restore_peer6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands a valid `bpf_sock_addr` for the program's duration.
    let addr = unsafe { &mut *ctx.sock_addr };
    // SAFETY: the helper only reads the context's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(original) = recorded_destination(cookie) {
        let words = original.address.words;
        // An IPv4 destination of an IPv6 socket was an IPv4-mapped address.
        let ip = match original.address.family {
            AF_INET => [0, 0, V4_MAPPED_PREFIX, words[0]],
            _ => words,
        };
        set_user_ip6(addr, ip);
        addr.user_port = u32::from(original.port.to_be());
    }
    CONNECT_ALLOW
}

/// Drops what is kept for a socket when it is closed. Most sockets have nothing kept,
/// so a failed removal is the normal case.
#[cgroup_sock(sock_release)]
pub fn forget_released(ctx: SockContext) -> i32 {
    // SAFETY: the helper only reads the context's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _absent_is_fine = DESTINATION_BY_SOCKET.remove(cookie);
    CONNECT_ALLOW
}

#[sk_lookup]
pub fn steer_inbound(ctx: SkLookupContext) -> u32 {
    match try_steer_inbound(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

fn try_steer_inbound(ctx: &SkLookupContext) -> Result<u32, u32> {
    // SAFETY: the kernel hands a valid `bpf_sk_lookup` for the program's duration.
    let lookup = unsafe { &*ctx.lookup };
    if lookup.protocol != IPPROTO_TCP || lookup.local_port == u32::from(HBONE_PORT) {
        return Ok(sk_action::SK_PASS);
    }
    let (local, remote) = match lookup.family {
        family if family == u32::from(AF_INET) => {
            if lookup.local_ip4.to_ne_bytes()[0] == 127 {
                return Ok(sk_action::SK_PASS);
            }
            (Address::v4(lookup.local_ip4), Address::v4(lookup.remote_ip4))
        }
        family if family == u32::from(AF_INET6) => {
            let local = read_ip6(&lookup.local_ip6);
            if local == LOOPBACK_V6 {
                return Ok(sk_action::SK_PASS);
            }
            (Address::v6(local), Address::v6(read_ip6(&lookup.remote_ip6)))
        }
        _ => return Ok(sk_action::SK_PASS),
    };
    // The pod's connection to itself (a steered connect reaching its capture listener
    // included), and the tunnel delivering to the application from the pod's own
    // address: left to the regular lookup.
    if local == remote {
        return Ok(sk_action::SK_PASS);
    }
    // An address the tunnel no longer serves (the pod is being released while this
    // program is still attached): left alone.
    // SAFETY: copied out at once.
    let Some(pod) = (unsafe { ENROLLED_ADDRESSES.get(local) }).copied() else {
        return Ok(sk_action::SK_PASS);
    };
    // From another address of the same pod: the pod's traffic to itself as well.
    // SAFETY: copied out at once.
    if unsafe { ENROLLED_ADDRESSES.get(remote) }.copied() == Some(pod) {
        return Ok(sk_action::SK_PASS);
    }
    // The outbound capture listener serves the pod's own steered connects alone.
    if lookup.local_port == u32::from(OUTBOUND_PORT) {
        return Ok(sk_action::SK_DROP);
    }
    // Peers the tunnel excludes (the node itself, for its health probes) go direct.
    let excluded_peer = match remote.family {
        AF_INET => excluded_v4(remote.words[0]),
        _ => excluded_v6(remote.words),
    };
    if excluded_peer {
        return Ok(sk_action::SK_PASS);
    }
    INBOUND_LISTENERS
        .redirect_sk_lookup(ctx, local, 0)
        .map(|()| sk_action::SK_PASS)
        .map_err(|err| {
            warn!(
                ctx,
                "no tunnel listener for inbound port {} ({}): SYN dropped",
                lookup.local_port,
                err
            );
            sk_action::SK_DROP
        })
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
