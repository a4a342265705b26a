//! A cluster made of network namespaces on this machine, for root tests.
//!
//! ```text
//!  fabric netns: bridge br0 ── veth ── node netns (eth0: 10.255.0.<n+1>/24, fd00:ff::<n+1>/64)
//!                                        └─ veth p<m> ── pod netns (eth0: 10.<n+1>.<m>.2/24,
//!                                                                   fd00:0:<n+1>:<m>::2/64)
//! ```
//! Nodes route between each other's pod ranges (10.<n+1>.0.0/16, fd00:0:<n+1>::/48) over
//! the bridge; a pod's default routes go to its node (`.1` / `::1` of its veth subnet).
//! Every address is assigned inside the namespaces, so no traffic touches the host's.
//! Names carry the process id and a counter, so tests run in parallel; everything is
//! deleted on drop, also when a test panics, and namespaces left by killed test
//! processes (and the steering they pinned for their nodes) are swept at the next build.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result, bail};
use ztunnel::netns::Netns;
use ztunnel::redirect::DEFAULT_PIN_ROOT;

use crate::capture::Capture;

/// Prefix of every namespace the harness makes.
const PREFIX: &str = "ztt";
const NETNS_DIR: &str = "/var/run/netns";

/// Panics unless the test runs as root: the harness needs namespaces, veths and eBPF.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test builds network namespaces and loads eBPF programs: it must run as root \
         (cargo xtask test runs as the invoking user; use sudo or a root shell)"
    );
}

/// How to build a [`Cluster`].
#[derive(Clone, Debug)]
pub struct ClusterBuilder {
    nodes: usize,
    pods_per_node: usize,
}

impl ClusterBuilder {
    pub fn nodes(mut self, nodes: usize) -> Self {
        self.nodes = nodes;
        self
    }

    pub fn pods_per_node(mut self, pods: usize) -> Self {
        self.pods_per_node = pods;
        self
    }

    /// Creates the namespaces, links, addresses and routes. Panics if not root.
    pub fn build(self) -> Result<Cluster> {
        require_root();
        if !(1..=200).contains(&self.nodes) || self.pods_per_node > 250 {
            bail!(
                "{} nodes of {} pods: the address plan holds 1-200 nodes of at most 250 pods",
                self.nodes,
                self.pods_per_node
            );
        }
        sweep_orphans();
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let id = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let fabric = Namespace::create(format!("{id}-fabric"))?;
        fabric.ip(&["link", "add", "br0", "type", "bridge"])?;
        fabric.ip(&["link", "set", "br0", "up"])?;
        let mut nodes = Vec::with_capacity(self.nodes);
        for n in 0..self.nodes {
            nodes.push(Node::create(
                &id,
                &fabric,
                n,
                self.nodes,
                self.pods_per_node,
            )?);
        }
        Ok(Cluster { nodes, fabric })
    }
}

/// Nodes joined by a bridge, each with its pods. Deleted on drop.
#[derive(Debug)]
pub struct Cluster {
    // Dropped in order: nodes (and their pods), then the fabric.
    nodes: Vec<Node>,
    fabric: Namespace,
}

impl Cluster {
    /// One node with one pod, unless told otherwise.
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder {
            nodes: 1,
            pods_per_node: 1,
        }
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Node `n` (from 0). Panics if there is no such node.
    pub fn node(&self, n: usize) -> &Node {
        &self.nodes[n]
    }

    /// Pod `m` (from 0) of node `n`. Panics if there is no such pod.
    pub fn pod(&self, n: usize, m: usize) -> &Pod {
        &self.nodes[n].pods[m]
    }

    /// Every pod, node by node.
    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.nodes.iter().flat_map(|node| node.pods.iter())
    }

    /// The namespace holding the bridge between the nodes (ports `n<node>`): the "wire"
    /// (see [`Cluster::capture_between_nodes`]).
    pub fn fabric_netns_path(&self) -> PathBuf {
        self.fabric.path()
    }

    /// Runs a command in the fabric namespace (see [`Pod::command`]).
    pub fn fabric_command(&self, program: &str) -> Command {
        self.fabric.command(program)
    }

    /// Captures what crosses the bridge between the nodes (on the bridge's ports: the
    /// bridge device itself only sees what is addressed to it).
    pub fn capture_between_nodes(&self) -> Result<Capture> {
        let ports = (0..self.nodes.len()).map(|n| format!("n{n}"));
        Capture::start(|| self.fabric.command("tcpdump"), ports)
    }
}

/// A node: a namespace on the bridge, router for its pods.
#[derive(Debug)]
pub struct Node {
    // Pods before the node's namespace: their veths hang off it.
    pods: Vec<Pod>,
    index: usize,
    ns: Namespace,
}

impl Node {
    fn create(
        id: &str,
        fabric: &Namespace,
        index: usize,
        nodes: usize,
        pods: usize,
    ) -> Result<Node> {
        let ns = Namespace::create(format!("{id}-n{index}"))?;
        let mut node = Node {
            pods: Vec::with_capacity(pods),
            index,
            ns,
        };
        let port = format!("n{index}");
        fabric.add_veth(&port, &node.ns)?;
        fabric.ip(&["link", "set", &port, "master", "br0", "up"])?;
        node.ns
            .sysctl(&["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])?;
        node.ns.configure_link("eth0", node.ip(), node.ipv6())?;
        for other in (0..nodes).filter(|&other| other != index) {
            node.ns.ip(&[
                "route",
                "add",
                &format!("10.{}.0.0/16", other + 1),
                "via",
                &fabric_ipv4(other).to_string(),
            ])?;
            node.ns.ip(&[
                "-6",
                "route",
                "add",
                &format!("fd00:0:{:x}::/48", other + 1),
                "via",
                &fabric_ipv6(other).to_string(),
            ])?;
        }
        for m in 0..pods {
            let pod = Pod::create(id, &node, m)?;
            node.pods.push(pod);
        }
        Ok(node)
    }

    pub fn index(&self) -> usize {
        self.index
    }

    /// The namespace's name (under /var/run/netns): unique per test, use it as the
    /// node's name.
    pub fn name(&self) -> &str {
        &self.ns.name
    }

    pub fn netns_path(&self) -> PathBuf {
        self.ns.path()
    }

    /// The node's address on the bridge.
    pub fn ip(&self) -> Ipv4Addr {
        fabric_ipv4(self.index)
    }

    pub fn ipv6(&self) -> Ipv6Addr {
        fabric_ipv6(self.index)
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// A command that runs in the node's namespace (see [`Pod::command`]).
    pub fn command(&self, program: &str) -> Command {
        self.ns.command(program)
    }

    /// Captures on every link of the node: its pods' veths (so traffic between pods of
    /// this node) and its link to the bridge.
    pub fn capture(&self) -> Result<Capture> {
        let links = std::iter::once("eth0".to_string())
            .chain((0..self.pods.len()).map(|m| format!("p{m}")));
        Capture::start(|| self.ns.command("tcpdump"), links)
    }
}

/// A pod: a namespace with a veth to its node, an IPv4 and an IPv6 address.
#[derive(Debug)]
pub struct Pod {
    node: usize,
    index: usize,
    ns: Namespace,
}

impl Pod {
    fn create(id: &str, node: &Node, index: usize) -> Result<Pod> {
        let ns = Namespace::create(format!("{id}-n{}p{index}", node.index))?;
        let pod = Pod {
            node: node.index,
            index,
            ns,
        };
        let port = format!("p{index}");
        node.ns.add_veth(&port, &pod.ns)?;
        let (gateway4, gateway6) = (pod.gateway_ipv4(), pod.gateway_ipv6());
        node.ns.configure_link(&port, gateway4, gateway6)?;
        pod.ns.configure_link("eth0", pod.ip(), pod.ipv6())?;
        pod.ns
            .ip(&["route", "add", "default", "via", &gateway4.to_string()])?;
        pod.ns.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &gateway6.to_string(),
        ])?;
        Ok(pod)
    }

    /// The namespace's name (under /var/run/netns): unique per test, use it as the
    /// pod's name or uid.
    pub fn name(&self) -> &str {
        &self.ns.name
    }

    pub fn node_index(&self) -> usize {
        self.node
    }

    pub fn index(&self) -> usize {
        self.index
    }

    /// `/var/run/netns/<name>`.
    pub fn netns_path(&self) -> PathBuf {
        self.ns.path()
    }

    /// A handle to make sockets inside the pod.
    pub fn netns(&self) -> Result<Netns> {
        Netns::open(self.ns.path()).with_context(|| format!("open pod namespace {}", self.name()))
    }

    /// The pod's IPv4 address, 10.<node+1>.<pod>.2.
    pub fn ip(&self) -> Ipv4Addr {
        self.veth_ipv4(2)
    }

    /// The pod's IPv6 address, fd00:0:<node+1>:<pod>::2.
    pub fn ipv6(&self) -> Ipv6Addr {
        self.veth_ipv6(2)
    }

    /// Both addresses, IPv4 first.
    pub fn ips(&self) -> Vec<IpAddr> {
        vec![self.ip().into(), self.ipv6().into()]
    }

    /// The pod's address of the same family as `family` (one of [`Pod::ips`] of any
    /// pod), on `port`.
    pub fn addr(&self, family: IpAddr, port: u16) -> std::net::SocketAddr {
        let ip: IpAddr = if family.is_ipv4() {
            self.ip().into()
        } else {
            self.ipv6().into()
        };
        std::net::SocketAddr::new(ip, port)
    }

    /// The node's end of the pod's veth: the pod's IPv4 gateway.
    pub fn gateway_ipv4(&self) -> Ipv4Addr {
        self.veth_ipv4(1)
    }

    pub fn gateway_ipv6(&self) -> Ipv6Addr {
        self.veth_ipv6(1)
    }

    /// Host `host` of the pod's veth subnet 10.<node+1>.<pod>.0/24.
    fn veth_ipv4(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, self.node as u8 + 1, self.index as u8, host)
    }

    /// Host `host` of the pod's veth subnet fd00:0:<node+1>:<pod>::/64.
    fn veth_ipv6(&self, host: u16) -> Ipv6Addr {
        let (node, pod) = (self.node as u16 + 1, self.index as u16);
        Ipv6Addr::new(0xfd00, 0, node, pod, 0, 0, 0, host)
    }

    /// A command that runs inside the pod (`ip netns exec`); spawn it or take its
    /// output. A spawned child is the test's to kill.
    pub fn command(&self, program: &str) -> Command {
        self.ns.command(program)
    }

    /// Runs `program args...` inside the pod to completion; its stdout, or an error
    /// with its stderr when it fails.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        run(self.command(program).args(args))
    }
}

fn fabric_ipv4(node: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 255, 0, node as u8 + 1)
}

fn fabric_ipv6(node: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0xff, 0, 0, 0, 0, 0, node as u16 + 1)
}

/// A named network namespace with loopback up, deleted on drop.
#[derive(Debug)]
struct Namespace {
    name: String,
}

impl Namespace {
    fn create(name: String) -> Result<Namespace> {
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Namespace { name };
        // No duplicate address detection: addresses, link-local ones included, are
        // usable at once, so a test's first IPv6 packet is not lost to a tentative
        // address.
        ns.sysctl(&[
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ])?;
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// A veth pair: `dev` here, `eth0` in `peer`.
    fn add_veth(&self, dev: &str, peer: &Namespace) -> Result<()> {
        let peer_args = ["peer", "name", "eth0", "netns", &peer.name];
        self.ip(&[&["link", "add", dev, "type", "veth"][..], &peer_args].concat())
    }

    /// Gives `dev` an IPv4 /24 and an IPv6 /64 address and brings it up.
    fn configure_link(&self, dev: &str, v4: Ipv4Addr, v6: Ipv6Addr) -> Result<()> {
        self.ip(&["addr", "add", &format!("{v4}/24"), "dev", dev])?;
        self.ip(&["addr", "add", &format!("{v6}/64"), "dev", dev, "nodad"])?;
        self.ip(&["link", "set", dev, "up"])
    }

    fn ip(&self, args: &[&str]) -> Result<()> {
        run(Command::new("ip").args(["-n", &self.name]).args(args)).map(drop)
    }

    /// Sets `key=value` settings inside the namespace.
    fn sysctl(&self, settings: &[&str]) -> Result<()> {
        run(self.command("sysctl").args(["-q", "-w"]).args(settings)).map(drop)
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        delete_namespace(&self.name);
    }
}

fn delete_namespace(name: &str) {
    if let Err(err) = run(Command::new("ip").args(["netns", "del", name])) {
        eprintln!("cannot delete network namespace {name}: {err:#}");
    }
}

/// Deletes what test processes that were killed before their drops ran left behind:
/// their namespaces, and the steering pinned for their nodes (named after the nodes'
/// namespaces, under the default pin root).
fn sweep_orphans() {
    for (name, _) in orphans(Path::new(NETNS_DIR)) {
        delete_namespace(&name);
    }
    for (_, path) in orphans(Path::new(DEFAULT_PIN_ROOT)) {
        if let Err(err) = std::fs::remove_dir_all(&path) {
            eprintln!("cannot remove pins {}: {err}", path.display());
        }
    }
    remove_pin_root_if_empty();
}

/// A pin directory for this process under the default pin root, named so that
/// [`Cluster::builder`]'s sweep removes it once this process is gone (a test killed
/// with SIGKILL never cleans up after itself).
pub fn pin_dir(suffix: &str) -> PathBuf {
    Path::new(DEFAULT_PIN_ROOT).join(format!("{PREFIX}{}-{suffix}", std::process::id()))
}

/// Removes the default pin root when nothing is pinned under it any more, so tests
/// leave no empty directory behind (a directory still in use is left alone).
pub fn remove_pin_root_if_empty() {
    let _ = std::fs::remove_dir(DEFAULT_PIN_ROOT);
}

/// Entries of `dir` named by the harness for a process that no longer runs.
fn orphans(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let pid = name
                .strip_prefix(PREFIX)?
                .split('-')
                .next()?
                .parse::<u32>()
                .ok()?;
            let gone = !Path::new("/proc").join(pid.to_string()).exists();
            gone.then(|| (name, entry.path()))
        })
        .collect()
}

fn run(cmd: &mut Command) -> Result<String> {
    let line = format!("{cmd:?}");
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {line}"))?;
    if !out.status.success() {
        bail!(
            "{line} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::capture::contains;

    /// Pod to pod on the same node and across nodes, IPv4 and IPv6.
    #[tokio::test]
    async fn pods_reach_each_other_across_nodes_over_both_families() {
        let cluster = Cluster::builder()
            .nodes(2)
            .pods_per_node(2)
            .build()
            .unwrap();
        let server = cluster.pod(1, 1).netns().unwrap();
        for target in [
            IpAddr::from(cluster.pod(1, 1).ip()),
            cluster.pod(1, 1).ipv6().into(),
        ] {
            let listener = server.listen(SocketAddr::new(target, 7000), 0).unwrap();
            for (n, m) in [(0, 0), (1, 0)] {
                let client = cluster.pod(n, m).netns().unwrap();
                let (connected, accepted) = tokio::join!(
                    client.connect(None, SocketAddr::new(target, 7000), 0),
                    listener.accept()
                );
                let mut connected = connected.unwrap();
                let (mut accepted, peer) = accepted.unwrap();
                let expected: IpAddr = if target.is_ipv4() {
                    cluster.pod(n, m).ip().into()
                } else {
                    cluster.pod(n, m).ipv6().into()
                };
                assert_eq!(peer.ip(), expected);
                connected.write_all(b"hello").await.unwrap();
                let mut buf = [0; 5];
                accepted.read_exact(&mut buf).await.unwrap();
                assert_eq!(&buf, b"hello");
            }
        }
    }

    #[test]
    fn everything_is_removed_on_drop_even_after_a_panic() {
        let names = std::sync::Mutex::new(Vec::new());
        let result = std::panic::catch_unwind(|| {
            let cluster = Cluster::builder()
                .nodes(2)
                .pods_per_node(1)
                .build()
                .unwrap();
            names.lock().unwrap().extend(
                [cluster.node(0).netns_path(), cluster.pod(1, 0).netns_path()]
                    .into_iter()
                    .chain([cluster.fabric_netns_path()]),
            );
            assert!(cluster.pod(1, 0).netns_path().exists());
            panic!("a failing test");
        });
        assert!(result.is_err());
        let names = names.into_inner().unwrap();
        assert_eq!(names.len(), 3);
        for path in names {
            assert!(!path.exists(), "{} left behind", path.display());
        }
    }

    #[test]
    fn exec_runs_inside_the_pod() {
        let cluster = Cluster::builder().build().unwrap();
        let pod = cluster.pod(0, 0);
        let addresses = pod
            .exec("ip", &["-o", "addr", "show", "dev", "eth0"])
            .unwrap();
        assert!(addresses.contains(&pod.ip().to_string()), "{addresses}");
        assert!(addresses.contains(&pod.ipv6().to_string()), "{addresses}");
        assert!(pod.exec("false", &[]).is_err());
    }

    #[tokio::test]
    async fn captures_see_plaintext_on_the_bridge_and_in_the_node() {
        let cluster = Cluster::builder()
            .nodes(2)
            .pods_per_node(2)
            .build()
            .unwrap();
        let between_nodes = cluster.capture_between_nodes().unwrap();
        let in_node = cluster.node(1).capture().unwrap();
        let server = cluster.pod(1, 1);
        let listener = server
            .netns()
            .unwrap()
            .listen(SocketAddr::new(server.ip().into(), 7000), 0)
            .unwrap();
        for (client, marker) in [
            (cluster.pod(0, 0), &b"marker-across-nodes"[..]),
            (cluster.pod(1, 0), &b"marker-within-node"[..]),
        ] {
            let netns = client.netns().unwrap();
            let (connected, accepted) = tokio::join!(
                netns.connect(None, SocketAddr::new(server.ip().into(), 7000), 0),
                listener.accept()
            );
            connected.unwrap().write_all(marker).await.unwrap();
            let mut buf = vec![0; marker.len()];
            accepted.unwrap().0.read_exact(&mut buf).await.unwrap();
        }
        let between_nodes = between_nodes.stop().unwrap();
        let in_node = in_node.stop().unwrap();
        assert!(contains(&between_nodes, b"marker-across-nodes"));
        assert!(!contains(&between_nodes, b"marker-within-node"));
        assert!(contains(&in_node, b"marker-within-node"));
        assert!(contains(&in_node, b"marker-across-nodes"));
    }

    /// A real capture decoded: the connection's bytes, reassembled, are what was sent.
    #[tokio::test]
    async fn a_decoded_capture_gives_each_connections_bytes_in_order() {
        let cluster = Cluster::builder()
            .nodes(2)
            .pods_per_node(1)
            .build()
            .unwrap();
        let wire = cluster.capture_between_nodes().unwrap();
        let (client, server) = (cluster.pod(0, 0), cluster.pod(1, 0));
        let to = SocketAddr::new(server.ip().into(), 7000);
        let listener = server.netns().unwrap().listen(to, 0).unwrap();
        let sent: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let netns = client.netns().unwrap();
        let (connected, accepted) = tokio::join!(netns.connect(None, to, 0), listener.accept());
        let (mut connected, mut accepted) = (connected.unwrap(), accepted.unwrap().0);
        let ((), received) = tokio::join!(
            async {
                connected.write_all(&sent).await.unwrap();
                connected.shutdown().await.unwrap();
            },
            async {
                let mut received = Vec::new();
                accepted.read_to_end(&mut received).await.unwrap();
                received
            }
        );
        assert_eq!(received, sent);
        let wire = wire.stop_decoded().unwrap();
        let streams = crate::capture::streams(&wire.segments).unwrap();
        let upload = streams
            .iter()
            .find(|s| s.to == to)
            .expect("the client's direction was captured");
        assert_eq!(upload.bytes, sent);
        assert!(crate::capture::tls_records(&upload.bytes).is_err());
    }

    #[test]
    fn an_impossible_plan_is_an_error() {
        let err = Cluster::builder().nodes(0).build().unwrap_err();
        assert!(err.to_string().contains("0 nodes"), "{err}");
    }
}
