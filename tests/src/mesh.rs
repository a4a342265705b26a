//! The real tunnel on a [`Cluster`]: one `ztunnel run` process per node, started in the
//! node's network namespace (`nsenter --net`, not `ip netns exec`, which remounts /sys
//! and would hide bpffs and cgroupfs), each with a local config listing every pod and its
//! own eBPF pin root, so tests running in parallel never share steering. Everything is
//! killed and removed on drop.
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! use ztunnel_tests::{Cluster, Mesh, PodSpec};
//! let cluster = Cluster::builder().nodes(2).pods_per_node(2).build()?;
//! let specs = cluster.pods().map(|p| PodSpec::new(p, "prod", "orders")).collect();
//! let mut mesh = Mesh::new(&cluster, specs, "")?;
//! mesh.start_all().await?;
//! # Ok(()) }
//! ```

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ztunnel::netns::Netns;

use crate::{Cluster, Pod};

/// Where each tunnel answers readiness, inside its node's namespace.
const READINESS: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 15021);
/// Where each tunnel serves metrics, inside its node's namespace.
const METRICS: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 15020);
/// How long a tunnel may take to enrol its pods and get their certificates.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// A pod as the mesh sees it: its workload entry in the config files.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// The `app` label, for policy selectors.
    pub app: String,
    /// Outside the mesh: never enrolled, plaintext only.
    pub meshed: bool,
    /// The ports the workload declares as HTTP (config `httpPorts`), if it does.
    pub http_ports: Option<Vec<u16>>,
    node: usize,
    netns: PathBuf,
    ips: Vec<std::net::IpAddr>,
}

impl PodSpec {
    /// A meshed workload for `pod`, named and labelled after its service account.
    pub fn new(pod: &Pod, namespace: &str, service_account: &str) -> PodSpec {
        PodSpec {
            name: service_account.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
            app: service_account.to_string(),
            meshed: true,
            http_ports: None,
            node: pod.node_index(),
            netns: pod.netns_path(),
            ips: pod.ips(),
        }
    }

    /// The same pod, outside the mesh.
    pub fn unmeshed(mut self) -> PodSpec {
        self.meshed = false;
        self
    }

    /// The same pod, declaring `ports` as HTTP: requests on them are decided one by
    /// one when a policy has HTTP rules.
    pub fn http_ports(mut self, ports: &[u16]) -> PodSpec {
        self.http_ports = Some(ports.to_vec());
        self
    }

    /// The pod's addresses, IPv4 first.
    pub fn ips(&self) -> &[std::net::IpAddr] {
        &self.ips
    }

    /// `namespace/name`, as `ztunnel check --from` takes it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The seed policies of the examples: namespace `finance` is STRICT; only
/// `cluster.local/ns/prod/sa/orders` may call the `app: payments` workloads, and only
/// on 9090 (the ALLOW list denies everyone else).
pub const SEED_POLICIES: &str = "- apiVersion: security.istio.io/v1
  kind: PeerAuthentication
  metadata: {name: strict, namespace: finance}
  spec: {mtls: {mode: STRICT}}
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: payments-allow-orders, namespace: finance}
  spec:
    selector: {matchLabels: {app: payments}}
    action: ALLOW
    rules:
    - from: [{source: {principals: [cluster.local/ns/prod/sa/orders]}}]
      to: [{operation: {ports: [\"9090\"]}}]
";

/// One tunnel per node of a cluster, from one description of the mesh.
pub struct Mesh {
    _dir: tempfile::TempDir,
    nodes: Vec<NodeTunnel>,
}

struct NodeTunnel {
    /// `node N`, for messages (the namespace's name is the harness's, not the reader's).
    name: String,
    netns: PathBuf,
    config: PathBuf,
    pin_root: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Mesh {
    /// Writes a CA and one config per node; starts nothing. `policies` is a YAML list
    /// of Istio resources (indented as items of `policies:`), or empty.
    pub fn new(cluster: &Cluster, pods: Vec<PodSpec>, policies: &str) -> Result<Mesh> {
        Mesh::with_settings(cluster, pods, policies, "")
    }

    /// Like [`Mesh::new`], with `settings` (top-level YAML lines, e.g. `socketMark: 42`)
    /// added to every node's config.
    pub fn with_settings(
        cluster: &Cluster,
        pods: Vec<PodSpec>,
        policies: &str,
        settings: &str,
    ) -> Result<Mesh> {
        crate::require_root();
        let dir = tempfile::Builder::new()
            .prefix("ztt-mesh-")
            .tempdir()
            .context("cannot make a directory for the mesh")?;
        let ca = dir.path().join("ca");
        let out = Command::new(ztunnel_binary()?)
            .args(["ca", "init", "--dir"])
            .arg(&ca)
            .output()
            .context("cannot run ztunnel ca init")?;
        if !out.status.success() {
            bail!(
                "ztunnel ca init failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // Named after this process and the scratch directory: unique on this machine,
        // and swept by the next cluster built once this process is gone.
        let pin_parent = crate::cluster::pin_dir(
            &dir.path()
                .file_name()
                .context("the scratch directory has a name")?
                .to_string_lossy(),
        );
        // Not beside the config files: each tunnel watches their directory, and a log
        // written there wakes that watch at every line (per request on HTTP ports).
        let logs = dir.path().join("logs");
        std::fs::create_dir(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
        let mut nodes = Vec::new();
        for node in cluster.nodes() {
            let config = dir.path().join(format!("{}.yaml", node.name()));
            std::fs::write(
                &config,
                config_text(&ca, &pin_parent, node.index(), cluster, &pods, policies) + settings,
            )
            .with_context(|| format!("cannot write {}", config.display()))?;
            nodes.push(NodeTunnel {
                name: format!("node {}", node.index()),
                netns: node.netns_path(),
                pin_root: pin_parent.join(node.name()),
                log: logs.join(format!("{}.log", node.name())),
                config,
                child: None,
            });
        }
        Ok(Mesh { _dir: dir, nodes })
    }

    /// Starts every node's tunnel and waits until all are ready.
    pub async fn start_all(&mut self) -> Result<()> {
        for n in 0..self.nodes.len() {
            self.spawn(n)?;
        }
        for n in 0..self.nodes.len() {
            self.wait_ready(n).await?;
        }
        Ok(())
    }

    /// Starts node `n`'s tunnel (again) and waits until it is ready.
    pub async fn start(&mut self, n: usize) -> Result<()> {
        self.spawn(n)?;
        self.wait_ready(n).await
    }

    fn spawn(&mut self, n: usize) -> Result<()> {
        let binary = ztunnel_binary()?;
        let node = &mut self.nodes[n];
        if node.child.is_some() {
            bail!("the tunnel of {} is already running", node.name);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .with_context(|| format!("cannot open {}", node.log.display()))?;
        // setpriv: the tunnel is killed if this program dies before dropping the mesh.
        let child = Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "nsenter"])
            .arg(format!("--net={}", node.netns.display()))
            .arg(binary)
            .args(["run", "--config"])
            .arg(&node.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start the tunnel with nsenter")?;
        node.child = Some(child);
        Ok(())
    }

    async fn wait_ready(&mut self, n: usize) -> Result<()> {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if let Ok((200, _)) = self.get(n, READINESS, "/healthz/ready").await {
                return Ok(());
            }
            let node = &mut self.nodes[n];
            if let Some(child) = node.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                node.child = None;
                bail!(
                    "the tunnel of {} exited ({status}):\n{}",
                    node.name,
                    tail(&node.log)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the tunnel of {} is not ready within {READY_WITHIN:?}:\n{}",
                    node.name,
                    tail(&node.log)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills node `n`'s tunnel at once (SIGKILL: no drain, as a crash). Its steering
    /// stays pinned in the kernel.
    pub fn kill(&mut self, n: usize) -> Result<()> {
        if let Some(mut child) = self.nodes[n].child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// The process id of node `n`'s tunnel, if it runs. `setpriv` and `nsenter` exec
    /// the tunnel, so this is the tunnel itself.
    pub fn pid(&self, n: usize) -> Option<u32> {
        self.nodes[n].child.as_ref().map(Child::id)
    }

    /// Node `n`'s config file (for `ztunnel check --config`).
    pub fn config(&self, n: usize) -> &Path {
        &self.nodes[n].config
    }

    /// The last lines of node `n`'s tunnel log.
    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.nodes[n].log)
    }

    /// Node `n`'s whole tunnel log, without terminal colour codes.
    pub fn log(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.nodes[n].log).unwrap_or_default();
        strip_colours(&text)
    }

    /// Node `n`'s Prometheus metrics text.
    pub async fn metrics(&self, n: usize) -> Result<String> {
        let (status, body) = self.get(n, METRICS, "/metrics").await?;
        if status != 200 {
            bail!("metrics of {}: HTTP {status}", self.nodes[n].name);
        }
        Ok(body)
    }

    /// A plain HTTP/1.0 GET to a server of node `n`'s tunnel: status and body.
    async fn get(&self, n: usize, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
        http_get(&self.nodes[n].netns, addr, path).await
    }
}

/// A plain HTTP/1.0 GET to `addr` from inside the network namespace `netns` (a
/// tunnel's admin, readiness or metrics server): status and body.
pub async fn http_get(netns: &Path, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let netns = Netns::open(netns)?;
    let mut tcp = netns.connect(None, addr, 0).await?;
    tcp.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_string(&mut response))
        .await
        .context("no answer within 5 s")??;
    let status = response
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for n in 0..self.nodes.len() {
            if let Err(err) = self.kill(n) {
                eprintln!("cannot kill the tunnel of {}: {err}", self.nodes[n].name);
            }
            if std::thread::panicking() {
                eprintln!(
                    "--- log of the tunnel of {} ---\n{}",
                    self.nodes[n].name,
                    tail(&self.nodes[n].log)
                );
            }
        }
        // Removing the pins detaches the programs: nothing steers after the test.
        if let Some(parent) = self.nodes.first().and_then(|n| n.pin_root.parent())
            && parent.exists()
            && let Err(err) = std::fs::remove_dir_all(parent)
        {
            eprintln!("cannot remove pins {}: {err}", parent.display());
        }
        crate::cluster::remove_pin_root_if_empty();
    }
}

fn config_text(
    ca: &Path,
    pin_parent: &Path,
    node: usize,
    cluster: &Cluster,
    pods: &[PodSpec],
    policies: &str,
) -> String {
    let mut text = format!(
        "node: {node_name}
ca:
  certFile: {ca}/root-cert.pem
  keyFile: {ca}/root-key.pem
adminAddress: 127.0.0.1:15000
readinessAddress: {READINESS}
metricsAddress: {METRICS}
bpfPinRoot: {pins}
drainGracePeriodSeconds: 1
logLevel: info
workloads:
",
        node_name = cluster.node(node).name(),
        ca = ca.display(),
        pins = pin_parent.display(),
    );
    for pod in pods {
        let ips: Vec<String> = pod.ips.iter().map(ToString::to_string).collect();
        let _ = write!(
            text,
            "- name: {}
  namespace: {}
  serviceAccount: {}
  labels: {{app: {}}}
  ips: [{}]
  node: {}
  meshed: {}
",
            pod.name,
            pod.namespace,
            pod.service_account,
            pod.app,
            ips.join(", "),
            cluster.node(pod.node).name(),
            pod.meshed,
        );
        if let Some(ports) = &pod.http_ports {
            let ports: Vec<String> = ports.iter().map(ToString::to_string).collect();
            let _ = writeln!(text, "  httpPorts: [{}]", ports.join(", "));
        }
        if pod.node == node {
            let _ = writeln!(text, "  netns: {}", pod.netns.display());
        }
    }
    if policies.trim().is_empty() {
        text.push_str("policies: []\n");
    } else {
        text.push_str("policies:\n");
        text.push_str(policies);
    }
    text
}

/// The `ztunnel` binary: `$ZTUNNEL_BIN`, or the one cargo built next to this program
/// (`target/<profile>/ztunnel`, this program being in it or in its `deps/`).
pub fn ztunnel_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("ZTUNNEL_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("ztunnel"))
        .collect();
    candidates
        .iter()
        .find(|path| path.is_file())
        .cloned()
        .with_context(|| {
            format!(
                "no ztunnel binary at {candidates:?}: build it first (cargo build -p ztunnel, \
                 which cargo test --workspace does) or set ZTUNNEL_BIN"
            )
        })
}

/// `text` without ANSI SGR sequences (`ESC [ ... m`).
pub fn strip_colours(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
