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
//! processes are swept at the next build.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result, bail};
use ztunnel::netns::Netns;

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

    /// The namespace holding the bridge between the nodes: the "wire", where a test
    /// can capture (`tcpdump -i br0`) what travels between nodes.
    pub fn fabric_netns_path(&self) -> PathBuf {
        self.fabric.path()
    }

    /// Runs a command in the fabric namespace (see [`Pod::command`]).
    pub fn fabric_command(&self, program: &str) -> Command {
        self.fabric.command(program)
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
        fabric.ip(&[
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &node.ns.name,
        ])?;
        fabric.ip(&["link", "set", &port, "master", "br0", "up"])?;
        node.ns
            .sysctl(&["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])?;
        node.ns
            .ip(&["addr", "add", &format!("{}/24", node.ip()), "dev", "eth0"])?;
        node.ns.ip(&[
            "addr",
            "add",
            &format!("{}/64", node.ipv6()),
            "dev",
            "eth0",
            "nodad",
        ])?;
        node.ns.ip(&["link", "set", "eth0", "up"])?;
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
        node.ns.ip(&[
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &pod.ns.name,
        ])?;
        let (gateway4, gateway6) = (pod.gateway_ipv4(), pod.gateway_ipv6());
        node.ns
            .ip(&["addr", "add", &format!("{gateway4}/24"), "dev", &port])?;
        node.ns.ip(&[
            "addr",
            "add",
            &format!("{gateway6}/64"),
            "dev",
            &port,
            "nodad",
        ])?;
        node.ns.ip(&["link", "set", &port, "up"])?;
        pod.ns
            .ip(&["addr", "add", &format!("{}/24", pod.ip()), "dev", "eth0"])?;
        pod.ns.ip(&[
            "addr",
            "add",
            &format!("{}/64", pod.ipv6()),
            "dev",
            "eth0",
            "nodad",
        ])?;
        pod.ns.ip(&["link", "set", "eth0", "up"])?;
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
        Ipv4Addr::new(10, self.node as u8 + 1, self.index as u8, 2)
    }

    /// The pod's IPv6 address, fd00:0:<node+1>:<pod>::2.
    pub fn ipv6(&self) -> Ipv6Addr {
        Ipv6Addr::new(
            0xfd00,
            0,
            self.node as u16 + 1,
            self.index as u16,
            0,
            0,
            0,
            2,
        )
    }

    /// Both addresses, IPv4 first.
    pub fn ips(&self) -> Vec<IpAddr> {
        vec![self.ip().into(), self.ipv6().into()]
    }

    /// The node's end of the pod's veth: the pod's IPv4 gateway.
    pub fn gateway_ipv4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.node as u8 + 1, self.index as u8, 1)
    }

    pub fn gateway_ipv6(&self) -> Ipv6Addr {
        Ipv6Addr::new(
            0xfd00,
            0,
            self.node as u16 + 1,
            self.index as u16,
            0,
            0,
            0,
            1,
        )
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

/// Deletes namespaces left by test processes that were killed before their drops ran.
fn sweep_orphans() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let owner = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        if let Some(pid) = owner
            && !Path::new("/proc").join(pid.to_string()).exists()
        {
            delete_namespace(&name);
        }
    }
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

    #[test]
    fn an_impossible_plan_is_an_error() {
        let err = Cluster::builder().nodes(0).build().unwrap_err();
        assert!(err.to_string().contains("0 nodes"), "{err}");
    }
}
