//! Steering of enrolled pods' TCP into the tunnel, with the eBPF programs of `ebpf/`.
//!
//! [`Redirect::load`] loads the programs once per node, attaches the connect,
//! getpeername, `sock_ops` and `sock_release` programs to the cgroup v2 root (beside
//! other programs there, a CNI's say), and pins maps and attachments under the node's pin root, so steering outlives a
//! tunnel restart and fails closed while the tunnel is away: steered connects find no
//! capture listener and are refused, inbound SYNs find no listener in the socket map and
//! are dropped. A restarted tunnel reuses the pinned maps and swaps in its own
//! attachments with no gap.
//!
//! [`Redirect::enrol`] opens the tunnel's three listeners inside a pod's namespace, hands
//! the inbound plaintext one to `sk_lookup`, registers the namespace, and attaches
//! `sk_lookup` to it; [`Redirect::release`] undoes it. [`Redirect::reconcile`] drops
//! what is pinned for namespaces that no longer hold a workload.
//! [`Redirect::original_destination`] tells where a captured outbound connection was
//! going.

mod cgroup;
mod logs;
mod metrics;
mod pin;

pub use metrics::{Metrics, Operation};

use std::collections::HashMap as StdHashMap;
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap, MapData, MapError, SockHash};
use aya::pin::PinError;
use aya::programs::links::{FdLink, LinkError};
use aya::programs::{
    CgroupAttachMode, CgroupSock, CgroupSockAddr, ProgramError, SkLookup, SockOps,
};
use aya::{Ebpf, EbpfLoader};
use ipnet::IpNet;
use tokio::net::TcpListener;
use ztunnel_ebpf_common::{
    AF_INET, AF_INET6, Address, ConnectionKey, DEFAULT_SOCKET_MARK, EnrolledPod, HBONE_PORT,
    INBOUND_PORT, OUTBOUND_PORT, SockAddr, globals, maps, programs,
};

use crate::netns::{self, Netns};
use pin::PinPaths;

/// The eBPF object, built from `ebpf/programs` by this crate's build script.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ztunnel-ebpf.o"));

/// Pin roots of nodes live below this directory by default.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/ztunnel";

/// How steering is set up on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Where maps and attachments are pinned (on a bpf filesystem); one per node, so
    /// several simulated nodes sharing one kernel never collide.
    pub pin_root: PathBuf,
    /// The cgroup v2 directory the connect programs attach to; `None` finds the v2 root
    /// from the mount table.
    pub cgroup: Option<PathBuf>,
    /// Outbound destination ports never steered.
    pub excluded_ports: Vec<u16>,
    /// Peers never steered, either way: pods' connects to them and SYNs from them go
    /// direct. The node's own addresses belong here, so kubelet probes reach pods.
    pub excluded_peers: Vec<IpNet>,
    /// The tunnel's `SO_MARK`: set into the programs at load time (sockets carrying it
    /// are never steered) and on the listeners enrolling opens.
    pub socket_mark: u32,
}

impl Config {
    /// Defaults for node `node`: pinned under `/sys/fs/bpf/ztunnel/<node>`, attached to
    /// the cgroup v2 root, nothing excluded, the default socket mark.
    pub fn for_node(node: &str) -> Config {
        Config {
            pin_root: Path::new(DEFAULT_PIN_ROOT).join(node),
            cgroup: None,
            excluded_ports: Vec::new(),
            excluded_peers: Vec::new(),
            socket_mark: DEFAULT_SOCKET_MARK,
        }
    }
}

/// A pod to enrol: its identity for logs, its addresses, and its network namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodNetwork {
    pub uid: String,
    pub ips: Vec<IpAddr>,
    /// `/var/run/netns/NAME`, `/proc/PID/ns/net`, ...
    pub netns: PathBuf,
}

/// The tunnel's sockets inside an enrolled pod, for the proxy to serve. Dropping a
/// listener stops that service; the pod then fails closed, not open.
#[derive(Debug)]
pub struct PodListeners {
    /// The pod's namespace, to make connections from it (source = the pod's address).
    pub netns: Netns,
    /// The key of the pod in [`Redirect::original_destination`].
    pub netns_cookie: u64,
    /// Outbound capture on the pod's own address, `<pod ipv4>:15001` (127.0.0.1 for a
    /// pod without IPv4), and `[<pod ipv6>]:15001` when the pod has IPv6: a steered
    /// application socket then has the pod's address as its local address.
    pub outbound: Vec<TcpListener>,
    /// Inbound plaintext capture, `<pod ip>:15006` for each pod address.
    pub inbound: Vec<TcpListener>,
    /// Inbound HBONE, `<pod ip>:15008` for each pod address.
    pub hbone: Vec<TcpListener>,
}

/// Errors of loading, enrolling and looking up; each names what it was about.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("pin root {path} is not on a bpf filesystem")]
    NotBpffs { path: PathBuf },
    #[error("cannot mount a bpf filesystem at {path}: {source}")]
    MountBpffs { path: PathBuf, source: nix::Error },
    #[error("pin directory {path}: {source}")]
    PinDir { path: PathBuf, source: io::Error },
    #[error("cannot pin at {path}: {}", chain(.source))]
    Pin { path: PathBuf, source: PinError },
    #[error("cannot unpin {path}: {source}")]
    Unpin { path: PathBuf, source: io::Error },
    #[error("cannot read the link to pin in {path}: {}", chain(.source))]
    LinkInfo { path: PathBuf, source: LinkError },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("no cgroup v2 file system in /proc/self/mountinfo")]
    NoCgroup2,
    #[error("cannot open the eBPF object: {}", chain(.0))]
    Object(#[source] aya::EbpfError),
    #[error("the eBPF object has no program {0}")]
    MissingProgram(&'static str),
    #[error("the eBPF object has no map {0}")]
    MissingMap(&'static str),
    /// The kernel refused a program; the message carries the verifier's log.
    #[error("cannot load program {name}: {}", chain(.source))]
    LoadProgram {
        name: &'static str,
        source: ProgramError,
    },
    #[error("cannot attach program {name} to {target}: {}", chain(.source))]
    Attach {
        name: &'static str,
        target: PathBuf,
        source: ProgramError,
    },
    #[error("program {name}: its link cannot be pinned: {}", chain(.source))]
    Link {
        name: &'static str,
        source: LinkError,
    },
    #[error("map {map}: {}", chain(.source))]
    Map { map: &'static str, source: MapError },
    #[error("cannot forward the eBPF programs' logs: {0}")]
    Logs(String),
    #[error("pod {uid} has no IP address")]
    NoAddress { uid: String },
    #[error("pod {uid} is already enrolled (network namespace cookie {netns_cookie})")]
    AlreadyEnrolled { uid: String, netns_cookie: u64 },
    #[error("pod {uid} is not enrolled")]
    NotEnrolled { uid: String },
    #[error(
        "network namespace cookie {0}: the kernel's original destination has an unknown family {1}"
    )]
    Family(u64, u16),
    #[error(transparent)]
    Netns(#[from] netns::Error),
}

/// An aya error with its causes: aya's messages often leave the system error (the
/// errno) to their source.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(err) = cause {
        let message = err.to_string();
        if !text.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        cause = err.source();
    }
    text
}

/// The programs loaded on this node, and the pods enrolled by this process.
pub struct Redirect {
    paths: PinPaths,
    mark: u32,
    metrics: Metrics,
    state: Mutex<State>,
    /// Apart from `state`: looked up on every accepted outbound connection.
    destinations: Mutex<HashMap<MapData, ConnectionKey, SockAddr>>,
    _logs: logs::LogForwarder,
}

struct State {
    ebpf: Ebpf,
    enrolled: HashMap<MapData, u64, EnrolledPod>,
    addresses: HashMap<MapData, Address, u64>,
    inbound: SockHash<MapData, Address>,
    /// Pod uid -> what enrolling it registered.
    pods: StdHashMap<String, Registration>,
}

struct Registration {
    netns_cookie: u64,
    ips: Vec<IpAddr>,
}

/// The programs attached to the cgroup root.
const CGROUP_PROGRAMS: [&str; 6] = [
    programs::CONNECT4,
    programs::CONNECT6,
    programs::GETPEERNAME4,
    programs::GETPEERNAME6,
    programs::SOCK_OPS,
    programs::SOCK_RELEASE,
];

impl Redirect {
    /// Loads the programs, reusing this node's pinned maps, attaches the cgroup ones
    /// (replacing a previous tunnel's attachments without a gap), applies the
    /// exclusions, and forwards the programs' logs to `tracing`.
    pub fn load(config: &Config, metrics: Metrics) -> Result<Redirect, Error> {
        let paths = PinPaths::prepare(&config.pin_root)?;
        let cgroup_dir = match &config.cgroup {
            Some(dir) => dir.clone(),
            None => cgroup::v2_root()?,
        };
        let cgroup = File::open(&cgroup_dir).map_err(|source| Error::Read {
            path: cgroup_dir.clone(),
            source,
        })?;

        let mut ebpf = EbpfLoader::new()
            .override_global(globals::SOCKET_MARK, &config.socket_mark, true)
            .default_map_pin_directory(paths.maps())
            .load(OBJECT)
            .map_err(Error::Object)?;
        let logs = logs::forward(&mut ebpf)?;

        for name in CGROUP_PROGRAMS {
            let link = attach_to_cgroup(&mut ebpf, name, &cgroup, &cgroup_dir)?;
            pin::replace_link(&paths.cgroup_links(), &format!("{name}-"), link)?;
        }
        paths.remove_other_map_layouts()?;
        sk_lookup(&mut ebpf)?
            .load()
            .map_err(|source| Error::LoadProgram {
                name: programs::SK_LOOKUP,
                source,
            })?;

        apply_exclusions(&mut ebpf, config)?;
        let enrolled = take_map(&mut ebpf, maps::ENROLLED)?;
        let addresses = take_map(&mut ebpf, maps::ENROLLED_ADDRESSES)?;
        let inbound = take_map(&mut ebpf, maps::INBOUND_LISTENERS)?;
        let destinations = take_map(&mut ebpf, maps::DESTINATION_BY_PORT)?;
        tracing::info!(
            pin_root = %config.pin_root.display(),
            cgroup = %cgroup_dir.display(),
            socket_mark = config.socket_mark,
            "steering programs loaded"
        );
        Ok(Redirect {
            paths,
            mark: config.socket_mark,
            metrics,
            state: Mutex::new(State {
                ebpf,
                enrolled,
                addresses,
                inbound,
                pods: StdHashMap::new(),
            }),
            destinations: Mutex::new(destinations),
            _logs: logs,
        })
    }

    /// Enrols a pod: opens the tunnel's listeners inside its namespace (with the
    /// tunnel's mark), hands the inbound plaintext listeners to `sk_lookup`, registers
    /// the namespace for the connect programs, and attaches `sk_lookup` to it (replacing
    /// an attachment pinned by a previous tunnel). Runs inside a tokio runtime.
    ///
    /// If the listeners cannot be opened nothing changes. If a later step fails, the
    /// pod counts as enrolled and fails closed (steered, with no listener) until
    /// [`Redirect::release`]; enrol it again after that.
    pub fn enrol(&self, pod: &PodNetwork) -> Result<PodListeners, Error> {
        let result = self.try_enrol(pod);
        self.metrics.count(Operation::enrol, &result);
        result
    }

    fn try_enrol(&self, pod: &PodNetwork) -> Result<PodListeners, Error> {
        let registered = registered_pod(pod)?;
        let netns = Netns::open(&pod.netns)?;
        let netns_cookie = netns.cookie()?;
        let mut state = self.lock();
        if let Some(existing) = state.pods.get(&pod.uid) {
            return Err(Error::AlreadyEnrolled {
                uid: pod.uid.clone(),
                netns_cookie: existing.netns_cookie,
            });
        }

        let mut outbound = Vec::with_capacity(2);
        for capture in capture_addresses(pod) {
            outbound.push(netns.listen(SocketAddr::new(capture, OUTBOUND_PORT), self.mark)?);
        }
        let mut inbound = Vec::with_capacity(pod.ips.len());
        let mut hbone = Vec::with_capacity(pod.ips.len());
        for ip in &pod.ips {
            inbound.push(netns.listen(SocketAddr::new(*ip, INBOUND_PORT), self.mark)?);
            hbone.push(netns.listen(SocketAddr::new(*ip, HBONE_PORT), self.mark)?);
        }

        // Known from here on, so that `release` undoes whatever part of the registration
        // below succeeds.
        state.pods.insert(
            pod.uid.clone(),
            Registration {
                netns_cookie,
                ips: pod.ips.clone(),
            },
        );
        self.metrics.set_enrolled(state.pods.len());
        self.register(&mut state, pod, &netns, netns_cookie, registered, &inbound)?;
        tracing::info!(uid = %pod.uid, netns = %pod.netns.display(), netns_cookie, "pod enrolled");
        Ok(PodListeners {
            netns,
            netns_cookie,
            outbound,
            inbound,
            hbone,
        })
    }

    /// Hands the inbound listeners to `sk_lookup`, registers the pod's addresses and
    /// namespace, and attaches `sk_lookup` to the namespace. Each step keeps the pod
    /// failing closed if a later one fails: steered with no listener.
    fn register(
        &self,
        state: &mut State,
        pod: &PodNetwork,
        netns: &Netns,
        netns_cookie: u64,
        registered: EnrolledPod,
        inbound: &[TcpListener],
    ) -> Result<(), Error> {
        for (ip, listener) in pod.ips.iter().zip(inbound) {
            state
                .inbound
                .insert(address(*ip), listener.as_raw_fd(), 0)
                .map_err(map_error(maps::INBOUND_LISTENERS))?;
            state
                .addresses
                .insert(address(*ip), netns_cookie, 0)
                .map_err(map_error(maps::ENROLLED_ADDRESSES))?;
        }
        state
            .enrolled
            .insert(netns_cookie, registered, 0)
            .map_err(map_error(maps::ENROLLED))?;
        let link = attach_to_netns(&mut state.ebpf, netns)?;
        pin::replace_link(&self.paths.netns_links(netns_cookie), "", link)
    }

    /// Releases a pod enrolled by this tunnel: detaches `sk_lookup` from its namespace
    /// and unregisters it, so its traffic flows directly again. The caller drops the
    /// pod's [`PodListeners`].
    pub fn release(&self, uid: &str) -> Result<(), Error> {
        let result = self.try_release(uid);
        self.metrics.count(Operation::release, &result);
        result
    }

    fn try_release(&self, uid: &str) -> Result<(), Error> {
        let mut state = self.lock();
        let registration = state.pods.remove(uid).ok_or_else(|| Error::NotEnrolled {
            uid: uid.to_string(),
        })?;
        self.metrics.set_enrolled(state.pods.len());
        self.forget(&mut state, registration.netns_cookie)?;
        for ip in registration.ips {
            ignore_missing(state.inbound.remove(&address(ip)), maps::INBOUND_LISTENERS)?;
        }
        tracing::info!(
            uid,
            netns_cookie = registration.netns_cookie,
            "pod released"
        );
        Ok(())
    }

    /// Drops what is registered or pinned for namespaces that hold none of the `live`
    /// pods (left by a previous tunnel for pods gone since). Returns their cookies.
    /// Live pods keep their pinned steering until [`Redirect::enrol`] renews it.
    pub fn reconcile(&self, live: &[PodNetwork]) -> Result<Vec<u64>, Error> {
        let result = self.try_reconcile(live);
        self.metrics.count(Operation::reconcile, &result);
        result
    }

    fn try_reconcile(&self, live: &[PodNetwork]) -> Result<Vec<u64>, Error> {
        let mut live_cookies = Vec::with_capacity(live.len());
        for pod in live {
            match Netns::open(&pod.netns).and_then(|netns| netns.cookie()) {
                Ok(cookie) => live_cookies.push(cookie),
                // Its namespace is gone: the pod is not live, whatever the list says.
                Err(err) => tracing::warn!(uid = %pod.uid, error = %err, "pod namespace not found"),
            }
        }
        let mut state = self.lock();
        let mut stale: Vec<u64> = self.paths.pinned_netns()?;
        stale.extend(state.enrolled.keys().filter_map(Result::ok));
        stale.sort_unstable();
        stale.dedup();
        stale.retain(|cookie| !live_cookies.contains(cookie));
        for cookie in &stale {
            self.forget(&mut state, *cookie)?;
        }
        state
            .pods
            .retain(|_, registration| !stale.contains(&registration.netns_cookie));
        self.metrics.set_enrolled(state.pods.len());
        if !stale.is_empty() {
            tracing::info!(released = ?stale, "stale network namespaces released");
        }
        Ok(stale)
    }

    /// Where the outbound connection accepted from `peer_port` in the namespace with
    /// cookie `netns_cookie` was going before it was steered. The entry is consumed:
    /// each connection is looked up once. `None` when nothing was recorded (the
    /// connection was not steered, or came and went before the look-up).
    pub fn original_destination(
        &self,
        netns_cookie: u64,
        peer_port: u16,
    ) -> Result<Option<SocketAddr>, Error> {
        let result = self.try_original_destination(netns_cookie, peer_port);
        self.metrics.count(Operation::original_destination, &result);
        if matches!(result, Ok(None)) {
            self.metrics.missing_destination();
        }
        result
    }

    fn try_original_destination(
        &self,
        netns_cookie: u64,
        peer_port: u16,
    ) -> Result<Option<SocketAddr>, Error> {
        let key = ConnectionKey {
            netns_cookie,
            port: peer_port,
            _pad: [0; 3],
        };
        let mut destinations = self
            .destinations
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let destination = match destinations.get(&key, 0) {
            Ok(destination) => destination,
            Err(MapError::KeyNotFound) => return Ok(None),
            Err(source) => return Err(map_error(maps::DESTINATION_BY_PORT)(source)),
        };
        ignore_missing(destinations.remove(&key), maps::DESTINATION_BY_PORT)?;
        socket_addr(&destination)
            .map(Some)
            .ok_or(Error::Family(netns_cookie, destination.address.family))
    }

    /// The pin root this node's steering lives under.
    pub fn pin_root(&self) -> &Path {
        self.paths.root()
    }

    /// Dropping a `Redirect` leaves programs and maps pinned: steering goes on, failing
    /// closed, until a tunnel loads again. This instead removes every trace of steering of this node from the kernel: detaches every
    /// program (cgroup and all namespaces, including those pinned by a previous tunnel)
    /// and deletes the pinned maps. Enrolled pods then talk directly.
    pub fn uninstall(self) -> Result<(), Error> {
        let cookies = self.paths.pinned_netns()?;
        for cookie in cookies {
            pin::remove_dir(&self.paths.netns_links(cookie))?;
        }
        let root = self.paths.root().to_path_buf();
        for dir in [
            self.paths.netns_links_root(),
            self.paths.cgroup_links(),
            root.join("links"),
            self.paths.maps(),
            root.clone(),
        ] {
            pin::remove_dir(&dir)?;
        }
        tracing::info!(pin_root = %root.display(), "steering removed");
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Unregisters a namespace and its addresses, which stops its steering at once, and
    /// unpins its `sk_lookup` attachments, which the kernel then detaches.
    fn forget(&self, state: &mut State, netns_cookie: u64) -> Result<(), Error> {
        let addresses: Vec<Address> = state
            .addresses
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, cookie)| *cookie == netns_cookie)
            .map(|(address, _)| address)
            .collect();
        for address in addresses {
            ignore_missing(state.addresses.remove(&address), maps::ENROLLED_ADDRESSES)?;
        }
        ignore_missing(state.enrolled.remove(&netns_cookie), maps::ENROLLED)?;
        pin::remove_dir(&self.paths.netns_links(netns_cookie))
    }
}

/// Where a pod's outbound capture listeners go: its first IPv4 address (loopback when
/// it has none) and its first IPv6 address, if any. The connect programs rewrite to
/// the same addresses, those [`registered_pod`] registers.
fn capture_addresses(pod: &PodNetwork) -> Vec<IpAddr> {
    let v4 = pod
        .ips
        .iter()
        .copied()
        .find(IpAddr::is_ipv4)
        .unwrap_or(Ipv4Addr::LOCALHOST.into());
    let v6 = pod.ips.iter().copied().find(IpAddr::is_ipv6);
    std::iter::once(v4).chain(v6).collect()
}

fn registered_pod(pod: &PodNetwork) -> Result<EnrolledPod, Error> {
    let mut registered = EnrolledPod::default();
    for ip in &pod.ips {
        match ip {
            IpAddr::V4(_) if registered.ipv4 == 0 => registered.ipv4 = address(*ip).words[0],
            IpAddr::V6(_) if registered.ipv6 == [0; 4] => registered.ipv6 = address(*ip).words,
            IpAddr::V4(v4) => {
                tracing::warn!(uid = %pod.uid, ip = %v4, "extra IPv4 address not used to spot traffic to itself")
            }
            IpAddr::V6(v6) => {
                tracing::warn!(uid = %pod.uid, ip = %v6, "extra IPv6 address not used to spot traffic to itself")
            }
        }
    }
    if pod.ips.is_empty() {
        return Err(Error::NoAddress {
            uid: pod.uid.clone(),
        });
    }
    Ok(registered)
}

/// An address as the programs see it (network-order words).
fn address(ip: IpAddr) -> Address {
    match ip {
        IpAddr::V4(v4) => Address {
            words: [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
            family: AF_INET,
            _pad: 0,
        },
        IpAddr::V6(v6) => {
            let octets = v6.octets();
            let mut words = [0u32; 4];
            for (word, chunk) in words.iter_mut().zip(octets.chunks_exact(4)) {
                *word = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            }
            Address {
                words,
                family: AF_INET6,
                _pad: 0,
            }
        }
    }
}

fn socket_addr(destination: &SockAddr) -> Option<SocketAddr> {
    let words = destination.address.words;
    let ip = match destination.address.family {
        AF_INET => IpAddr::V4(Ipv4Addr::from(words[0].to_ne_bytes())),
        AF_INET6 => {
            let mut octets = [0u8; 16];
            for (chunk, word) in octets.chunks_exact_mut(4).zip(words) {
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, destination.port))
}

/// A removal of what is already gone is no error.
fn ignore_missing(result: Result<(), MapError>, map: &'static str) -> Result<(), Error> {
    match result {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(source) => Err(Error::Map { map, source }),
    }
}

fn map_error(map: &'static str) -> impl Fn(MapError) -> Error {
    move |source| Error::Map { map, source }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, Error>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(Error::MissingMap(name))?;
    T::try_from(map).map_err(map_error(name))
}

fn apply_exclusions(ebpf: &mut Ebpf, config: &Config) -> Result<(), Error> {
    let mut ports: HashMap<_, u16, u8> = take_map(ebpf, maps::EXCLUDED_PORTS)?;
    let stale: Vec<u16> = ports
        .keys()
        .filter_map(Result::ok)
        .filter(|port| !config.excluded_ports.contains(port))
        .collect();
    for port in stale {
        ports
            .remove(&port)
            .map_err(map_error(maps::EXCLUDED_PORTS))?;
    }
    for port in &config.excluded_ports {
        ports
            .insert(port, 1, 0)
            .map_err(map_error(maps::EXCLUDED_PORTS))?;
    }

    let mut v4: LpmTrie<_, [u8; 4], u8> = take_map(ebpf, maps::EXCLUDED_V4)?;
    let mut v6: LpmTrie<_, [u8; 16], u8> = take_map(ebpf, maps::EXCLUDED_V6)?;
    clear_trie(&mut v4, maps::EXCLUDED_V4)?;
    clear_trie(&mut v6, maps::EXCLUDED_V6)?;
    for net in &config.excluded_peers {
        let prefix_len = u32::from(net.prefix_len());
        match net {
            IpNet::V4(net) => v4
                .insert(&Key::new(prefix_len, net.network().octets()), 1, 0)
                .map_err(map_error(maps::EXCLUDED_V4))?,
            IpNet::V6(net) => v6
                .insert(&Key::new(prefix_len, net.network().octets()), 1, 0)
                .map_err(map_error(maps::EXCLUDED_V6))?,
        }
    }
    Ok(())
}

fn clear_trie<const N: usize>(
    trie: &mut LpmTrie<MapData, [u8; N], u8>,
    name: &'static str,
) -> Result<(), Error> {
    let keys: Vec<Key<[u8; N]>> = trie.keys().filter_map(Result::ok).collect();
    for key in keys {
        trie.remove(&key).map_err(map_error(name))?;
    }
    Ok(())
}

fn attach_to_cgroup(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: &File,
    cgroup_dir: &Path,
) -> Result<FdLink, Error> {
    let program = ebpf.program_mut(name).ok_or(Error::MissingProgram(name))?;
    let load_error = |source| Error::LoadProgram { name, source };
    let attach_error = |source| Error::Attach {
        name,
        target: cgroup_dir.to_path_buf(),
        source,
    };
    let link_error = |source| Error::Link { name, source };
    // Cgroup attachments made as bpf links (what aya does on kernels >= 5.7) always run
    // beside the cgroup's other programs, as with BPF_F_ALLOW_MULTI; the kernel rejects
    // any attach flag on a link, so the link is created with none (`Single` = 0).
    let mode = CgroupAttachMode::Single;
    let wrong_type = |source: ProgramError| Error::LoadProgram { name, source };
    if let Ok(program) = <&mut CgroupSockAddr>::try_from(&mut *program) {
        program.load().map_err(load_error)?;
        let id = program.attach(cgroup, mode).map_err(attach_error)?;
        let link = program.take_link(id).map_err(attach_error)?;
        return FdLink::try_from(link).map_err(link_error);
    }
    if let Ok(program) = <&mut SockOps>::try_from(&mut *program) {
        program.load().map_err(load_error)?;
        let id = program.attach(cgroup, mode).map_err(attach_error)?;
        let link = program.take_link(id).map_err(attach_error)?;
        return FdLink::try_from(link).map_err(link_error);
    }
    let program = <&mut CgroupSock>::try_from(program).map_err(wrong_type)?;
    program.load().map_err(load_error)?;
    let id = program.attach(cgroup, mode).map_err(attach_error)?;
    let link = program.take_link(id).map_err(attach_error)?;
    FdLink::try_from(link).map_err(link_error)
}

fn sk_lookup(ebpf: &mut Ebpf) -> Result<&mut SkLookup, Error> {
    let name = programs::SK_LOOKUP;
    let program = ebpf.program_mut(name).ok_or(Error::MissingProgram(name))?;
    program
        .try_into()
        .map_err(|source| Error::LoadProgram { name, source })
}

fn attach_to_netns(ebpf: &mut Ebpf, netns: &Netns) -> Result<FdLink, Error> {
    let name = programs::SK_LOOKUP;
    let attach_error = |source| Error::Attach {
        name,
        target: netns.path().to_path_buf(),
        source,
    };
    let program = sk_lookup(ebpf)?;
    let id = program.attach(netns).map_err(attach_error)?;
    let link = program.take_link(id).map_err(attach_error)?;
    Ok(link.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_carry_the_system_error() {
        let err = Error::Attach {
            name: programs::CONNECT4,
            target: "/sys/fs/cgroup".into(),
            source: ProgramError::SyscallError(aya::sys::SyscallError {
                call: "bpf_link_create",
                io_error: io::Error::from_raw_os_error(22),
            }),
        };
        let text = err.to_string();
        assert!(text.contains("bpf_link_create"), "{text}");
        assert!(text.contains("Invalid argument"), "{text}");
    }

    #[test]
    fn a_refused_program_shows_the_verifier_log() {
        let err = Error::LoadProgram {
            name: programs::SK_LOOKUP,
            source: ProgramError::LoadError {
                io_error: io::Error::from_raw_os_error(13),
                verifier_log: aya_obj::VerifierLog::new(
                    "37: (61) r4 = *(u32 *)(r2 +0)\ndereference of modified ctx ptr".into(),
                ),
            },
        };
        let text = err.to_string();
        assert!(text.contains("steer_inbound"), "{text}");
        assert!(text.contains("dereference of modified ctx ptr"), "{text}");
    }

    #[test]
    fn redirect_is_shared_between_tasks() {
        fn shareable<T: Send + Sync>() {}
        shareable::<Redirect>();
    }

    #[test]
    fn addresses_round_trip_through_the_kernel_layout() {
        for ip in ["10.1.2.3", "fd00::1:2", "::ffff:10.0.0.1", "127.0.0.1"] {
            let ip: IpAddr = ip.parse().unwrap();
            let destination = SockAddr {
                address: address(ip),
                port: 8080,
                _pad: 0,
            };
            assert_eq!(
                socket_addr(&destination),
                Some(SocketAddr::new(ip, 8080)),
                "{ip}"
            );
        }
    }

    #[test]
    fn ipv4_words_are_in_network_order() {
        let words = address("10.0.0.1".parse().unwrap()).words;
        assert_eq!(words[0].to_ne_bytes(), [10, 0, 0, 1]);
        assert_eq!(&words[1..], &[0, 0, 0]);
    }

    #[test]
    fn unknown_family_is_not_an_address() {
        let mut destination = SockAddr::default();
        destination.address.family = 99;
        assert_eq!(socket_addr(&destination), None);
    }

    #[test]
    fn a_pod_needs_an_address() {
        let pod = PodNetwork {
            uid: "pod-1".into(),
            ips: Vec::new(),
            netns: "/var/run/netns/x".into(),
        };
        let err = registered_pod(&pod).unwrap_err();
        assert!(err.to_string().contains("pod-1"), "{err}");
    }

    #[test]
    fn capture_listeners_are_on_the_registered_addresses() {
        let pod = |ips: &[&str]| PodNetwork {
            uid: "pod-1".into(),
            ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
            netns: "/var/run/netns/x".into(),
        };
        let ips =
            |ips: &[&str]| -> Vec<IpAddr> { ips.iter().map(|ip| ip.parse().unwrap()).collect() };
        let dual = pod(&["fd00::1", "10.0.0.1", "10.0.0.2"]);
        assert_eq!(capture_addresses(&dual), ips(&["10.0.0.1", "fd00::1"]));
        let registered = registered_pod(&dual).unwrap();
        assert_eq!(
            address(capture_addresses(&dual)[0]).words[0],
            registered.ipv4
        );
        assert_eq!(address(capture_addresses(&dual)[1]).words, registered.ipv6);
        assert_eq!(capture_addresses(&pod(&["10.0.0.1"])), ips(&["10.0.0.1"]));
        // The programs rewrite an IPv4 connect of a pod without IPv4 to loopback.
        assert_eq!(
            capture_addresses(&pod(&["fd00::1"])),
            ips(&["127.0.0.1", "fd00::1"])
        );
    }

    #[test]
    fn registration_keeps_one_address_per_family() {
        let pod = PodNetwork {
            uid: "pod-1".into(),
            ips: vec![
                "10.0.0.1".parse().unwrap(),
                "fd00::1".parse().unwrap(),
                "10.0.0.2".parse().unwrap(),
            ],
            netns: "/var/run/netns/x".into(),
        };
        let registered = registered_pod(&pod).unwrap();
        assert_eq!(registered.ipv4, address(pod.ips[0]).words[0]);
        assert_eq!(registered.ipv6, address(pod.ips[1]).words);
    }
}
