//! The Kubernetes mode against a real API server (etcd and kube-apiserver 1.20.2, see
//! `ztunnel_tests::ApiServer`): the deploy manifests and CRD schemas; the cluster CA
//! issuing through real TokenReviews of real pod-bound tokens; and the tunnels in
//! `run --kube` on two nodes of network namespaces, with their own ServiceAccount's
//! tokens, enrolling pods found through /proc and steering their traffic with eBPF.
//! No kubelet and no controllers: pods are created bound to nodes with their status
//! patched, and their sandboxes are processes the harness starts in the pods' network
//! namespaces and cgroups. Each check prints `check: ...` as it passes.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use ztunnel_tests::{
    ApiServer, Cluster, Pod, PodObject, PodSandbox, command_in, contains, http_get, pin_dir,
    remove_pin_root_if_empty, strip_colours, ztunnel_binary,
};

/// Prints `check: ...` on the test's standard error, uncaptured, so `cargo test` shows
/// every check of this tier as it passes.
macro_rules! check {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "check: {}", format_args!($($arg)*));
    }};
}

fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
}

/// The deploy manifests (namespace, CRDs, RBAC, CA, DaemonSet) and the example workloads
/// and policies, applied as a user would.
fn apply_deploy(server: &ApiServer) -> Result<()> {
    let deploy = workspace_root().join("deploy");
    server.kubectl_ok(&["apply", "-k", &deploy.display().to_string()])?;
    server.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/peerauthentications.security.istio.io",
        "crd/authorizationpolicies.security.istio.io",
    ])?;
    for file in ["workloads.yaml", "policies.yaml"] {
        let path = deploy.join("examples").join(file);
        server.kubectl_ok(&["apply", "-f", &path.display().to_string()])?;
    }
    Ok(())
}

#[test]
fn deploy_manifests_crds_and_example_policies_are_accepted() -> Result<()> {
    let server = ApiServer::start()?;
    apply_deploy(&server)?;
    check!("kubectl apply -k deploy/ and the examples accepted");

    for crd in ["peerauthentications", "authorizationpolicies"] {
        let versions = server.kubectl_ok(&[
            "get",
            &format!("crd/{crd}.security.istio.io"),
            "-o",
            "jsonpath={range .spec.versions[*]}{.name}={.served} {end}",
        ])?;
        assert_eq!(versions.trim(), "v1=true v1beta1=true", "{crd}");
        for version in ["v1", "v1beta1"] {
            server.kubectl_ok(&[
                "get",
                "--raw",
                &format!("/apis/security.istio.io/{version}/{crd}"),
            ])?;
        }
    }
    check!("both CRDs serve v1 and v1beta1");

    // The example policies are stored as written.
    let modes = server.kubectl_ok(&[
        "get",
        "peerauthentications.security.istio.io",
        "-A",
        "-o",
        "jsonpath={range .items[*]}{.metadata.namespace}/{.metadata.name}={.spec.mtls.mode} {end}",
    ])?;
    for want in [
        "shop/default=STRICT",
        "finance/default=PERMISSIVE",
        "finance/payments-strict=STRICT",
    ] {
        assert!(modes.contains(want), "{want} not in {modes}");
    }
    // An object written as v1beta1 reads back as v1 too.
    server.apply(
        "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata:\n  name: old\n  namespace: shop\nspec:\n  mtls:\n    mode: PERMISSIVE\n",
    )?;
    let old = server.kubectl_ok(&[
        "get",
        "--raw",
        "/apis/security.istio.io/v1/namespaces/shop/peerauthentications/old",
    ])?;
    let old: Value = serde_json::from_str(&old)?;
    assert_eq!(old["spec"]["mtls"]["mode"], "PERMISSIVE");
    check!("the example policies pass the schema; v1beta1 objects read as v1");

    // The schema refuses a bad mode, naming the field.
    let err = server
        .apply(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: typo\n  namespace: shop\nspec:\n  mtls:\n    mode: STRICTLY\n",
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("spec.mtls.mode") && err.contains("STRICTLY"),
        "{err}"
    );
    check!("a bad mtls.mode is refused by the CRD schema");
    Ok(())
}

/// A pod of `namespace` with `service_account` on `node`, addresses `ips`.
fn pod_object(
    namespace: &str,
    name: &str,
    service_account: &str,
    node: &str,
    ips: Vec<IpAddr>,
    host_ip: IpAddr,
) -> PodObject {
    PodObject {
        name: name.to_string(),
        namespace: namespace.to_string(),
        service_account: service_account.to_string(),
        node: node.to_string(),
        ips,
        host_ip,
        host_network: false,
        labels: Vec::new(),
    }
}

/// A tunnel's pod of the DaemonSet on `node` (host network, the node's address).
fn tunnel_pod(node: &str, node_ip: IpAddr) -> PodObject {
    PodObject {
        host_network: true,
        ..pod_object(
            "ztunnel-system",
            &format!("ztunnel-{node}"),
            "ztunnel",
            node,
            vec![node_ip],
            node_ip,
        )
    }
}

/// `ztunnel ca serve` with its own ServiceAccount's token, in the API server's network
/// namespace; stopped on drop.
struct CaProcess {
    child: Child,
    log: PathBuf,
    address: SocketAddr,
    netns: Option<PathBuf>,
}

impl Drop for CaProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- CA log ---\n{}", self.log());
        }
    }
}

impl CaProcess {
    fn start(server: &ApiServer, address: SocketAddr) -> Result<CaProcess> {
        let ca_token = server.token("ztunnel-system", "ztunnel-ca", None, None)?;
        let kubeconfig = server.kubeconfig_for("ztunnel-ca", &ca_token)?;
        let log = server.dir().join("ca.log");
        let child = command_in(server.netns(), ztunnel_binary()?)
            .args(["ca", "serve", "--listen", &address.to_string()])
            .env("KUBECONFIG", &kubeconfig)
            .env("POD_NAMESPACE", "ztunnel-system")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("cannot start ztunnel ca serve")?;
        let mut ca = CaProcess {
            child,
            log,
            address,
            netns: server.netns().map(Path::to_path_buf),
        };
        let started = Instant::now();
        while !ca.listening() {
            if let Some(status) = ca.child.try_wait()? {
                bail!("the CA exited ({status}):\n{}", ca.log());
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!("the CA did not listen within 60 s:\n{}", ca.log());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(ca)
    }

    fn listening(&self) -> bool {
        let mut cmd = command_in(self.netns.as_deref(), "bash");
        cmd.arg("-c").arg(format!(
            "exec 3<>/dev/tcp/{}/{}",
            self.address.ip(),
            self.address.port()
        ));
        cmd.stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn log(&self) -> String {
        strip_colours(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    /// POSTs a signing request for `identity` with `token` (from the host: the CA
    /// listens on loopback); (HTTP status, body).
    fn sign(&self, server: &ApiServer, token: &str, identity: &str) -> Result<(u16, Value)> {
        let dir = server.dir();
        let key = dir.join("workload.key");
        let csr = dir.join("workload.csr");
        if !csr.exists() {
            let out = std::process::Command::new("openssl")
                .args(["req", "-new", "-newkey", "ec", "-pkeyopt"])
                .arg("ec_paramgen_curve:P-256")
                .args(["-nodes", "-subj", "/O=ztunnel-test", "-keyout"])
                .arg(&key)
                .arg("-out")
                .arg(&csr)
                .output()?;
            if !out.status.success() {
                bail!("openssl req: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        let bundle_file = dir.join("bundle.pem");
        std::fs::write(&bundle_file, trust_bundle(server)?)?;
        let body = serde_json::json!({
            "identity": identity,
            "csr": std::fs::read_to_string(&csr)?,
        });
        let name = "ztunnel-ca.ztunnel-system.svc";
        let out = std::process::Command::new("curl")
            .args(["-sS", "--max-time", "20", "--cacert"])
            .arg(&bundle_file)
            .args([
                "--resolve",
                &format!("{name}:{}:{}", self.address.port(), self.address.ip()),
            ])
            .args(["-H", &format!("Authorization: Bearer {token}")])
            .args(["-H", "Content-Type: application/json"])
            .args(["-d", &body.to_string()])
            .args(["-w", "\n%{http_code}"])
            .arg(format!("https://{name}:{}/v1/sign", self.address.port()))
            .output()
            .context("cannot run curl")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let Some((body, code)) = text.rsplit_once('\n') else {
            bail!(
                "curl answered nothing: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        Ok((code.trim().parse()?, serde_json::from_str(body)?))
    }
}

/// The trust bundle the CA published in its ConfigMap (checked for `\n` line endings).
fn trust_bundle(server: &ApiServer) -> Result<String> {
    let bundle = server.kubectl_ok(&[
        "get",
        "configmap",
        "ztunnel-trust-bundle",
        "-n",
        "ztunnel-system",
        "-o",
        "jsonpath={.data.root-cert\\.pem}",
    ])?;
    if bundle.contains('\r') || !bundle.starts_with("-----BEGIN CERTIFICATE-----\n") {
        bail!("the trust bundle is not LF-terminated PEM: {bundle:?}");
    }
    Ok(bundle)
}

fn no_forbidden(what: &str, log: &str) {
    let forbidden: Vec<&str> = log
        .lines()
        .filter(|l| l.to_lowercase().contains("forbidden"))
        .collect();
    assert!(
        forbidden.is_empty(),
        "{what}'s RBAC is not enough:\n{}",
        forbidden.join("\n")
    );
}

#[test]
fn ca_issues_for_a_pod_bound_tunnel_token_and_refuses_the_others() -> Result<()> {
    let server = ApiServer::start()?;
    apply_deploy(&server)?;
    let host = IpAddr::V4(Ipv4Addr::new(172, 18, 0, 2));
    let tunnel_a = server.create_pod(&tunnel_pod("node-a", host))?;
    let tunnel_gone = server.create_pod(&PodObject {
        name: "ztunnel-gone".into(),
        ..tunnel_pod("node-a", host)
    })?;
    let payments = server.create_pod(&pod_object(
        "finance",
        "payments-1",
        "payments",
        "node-a",
        vec!["10.244.1.7".parse()?],
        host,
    ))?;
    server.create_pod(&pod_object(
        "shop",
        "orders-1",
        "orders",
        "node-b",
        vec!["10.244.2.7".parse()?],
        "172.18.0.3".parse()?,
    ))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let ca = CaProcess::start(&server, SocketAddr::from(([127, 0, 0, 1], port)))?;
    trust_bundle(&server)?;
    check!("the CA created its root and published an LF-terminated trust bundle");
    let payments_id = "spiffe://cluster.local/ns/finance/sa/payments";

    let good = server.token(
        "ztunnel-system",
        "ztunnel",
        Some("ztunnel-ca"),
        Some(("ztunnel-node-a", &tunnel_a)),
    )?;
    let (code, answer) = ca.sign(&server, &good, payments_id)?;
    assert_eq!(code, 200, "{answer}\n{}", ca.log());
    let chain = answer["certChain"].as_str().context("certChain")?;
    assert!(
        chain.starts_with("-----BEGIN CERTIFICATE-----\n"),
        "{chain}"
    );
    check!("the CA issues for a real pod-bound tunnel token (TokenReview)");

    let refusals = [
        (
            "no pod of the identity on the token's node",
            good.clone(),
            "spiffe://cluster.local/ns/shop/sa/orders",
            403,
            "node-a",
        ),
        (
            "an unbound token",
            server.token("ztunnel-system", "ztunnel", Some("ztunnel-ca"), None)?,
            payments_id,
            403,
            "not bound to a pod",
        ),
        (
            "a wrong audience",
            server.token(
                "ztunnel-system",
                "ztunnel",
                None,
                Some(("ztunnel-node-a", &tunnel_a)),
            )?,
            payments_id,
            401,
            "not authenticated",
        ),
        (
            "a wrong ServiceAccount",
            server.token(
                "finance",
                "payments",
                Some("ztunnel-ca"),
                Some(("payments-1", &payments)),
            )?,
            payments_id,
            403,
            "ServiceAccount",
        ),
    ];
    for (what, token, identity, want_code, want) in refusals {
        let (code, answer) = ca.sign(&server, &token, identity)?;
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(
            code == want_code && error.contains(want),
            "{what}: {code} {answer}, wanted {want_code} with {want:?}"
        );
        check!("the CA refuses {what}: {code} {error}");
    }

    // A token whose pod is deleted no longer authenticates.
    let gone = server.token(
        "ztunnel-system",
        "ztunnel",
        Some("ztunnel-ca"),
        Some(("ztunnel-gone", &tunnel_gone)),
    )?;
    server.kubectl_ok(&[
        "delete",
        "pod",
        "ztunnel-gone",
        "-n",
        "ztunnel-system",
        "--grace-period=0",
        "--force",
    ])?;
    let (code, answer) = ca.sign(&server, &gone, payments_id)?;
    assert_eq!(code, 401, "{answer}");
    check!("the CA refuses a token whose pod was deleted: {code} {answer}");

    no_forbidden("the CA", &ca.log());
    check!("no forbidden errors in the CA's log");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The tunnels in Kubernetes mode on two nodes.

/// The API server's and the CA's address on the fabric's bridge (the nodes are
/// 10.255.0.<n+1>/24 on it).
const CONTROL_PLANE: Ipv4Addr = Ipv4Addr::new(10, 255, 0, 254);
const CA_PORT: u16 = 15012;
const ADMIN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15000);
const READINESS: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15021);
const METRICS: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15020);
/// How long any one step of an exchange may take.
const STEP: Duration = Duration::from_secs(5);
/// How long a tunnel may take to follow a change in the API (a loaded machine).
const FOLLOW_WITHIN: Duration = Duration::from_secs(60);

/// `ztunnel run --kube` in a node's network namespace, with tokens of the tunnels'
/// ServiceAccount bound to the node's tunnel pod; killed on drop.
struct KubeTunnel {
    node: String,
    netns: PathBuf,
    log: PathBuf,
    child: Child,
}

impl KubeTunnel {
    fn start(server: &ApiServer, node: &ztunnel_tests::Node, pins: &Path) -> Result<KubeTunnel> {
        let name = node.name();
        let uid = server.create_pod(&tunnel_pod(name, node.ip().into()))?;
        let pod = format!("ztunnel-{name}");
        // The DaemonSet's two projected tokens: the API's (audience the API server's)
        // and the CA's (audience ztunnel-ca), both bound to the tunnel's pod.
        let api_token = server.token("ztunnel-system", "ztunnel", None, Some((&pod, &uid)))?;
        let ca_token = server.token(
            "ztunnel-system",
            "ztunnel",
            Some("ztunnel-ca"),
            Some((&pod, &uid)),
        )?;
        let dir = server.dir().join(name);
        std::fs::create_dir_all(&dir)?;
        let ca_token_file = dir.join("ca-token");
        std::fs::write(&ca_token_file, ca_token)?;
        let bundle = dir.join("root-cert.pem");
        std::fs::write(&bundle, trust_bundle(server)?)?;
        let kubeconfig = server.kubeconfig_for(name, &api_token)?;
        let log = dir.join("tunnel.log");
        let child = command_in(Some(&node.netns_path()), ztunnel_binary()?)
            .args(["run", "--kube", "--node", name, "--ca-address"])
            .arg(SocketAddr::new(CONTROL_PLANE.into(), CA_PORT).to_string())
            .args(["--ca-server-name", "ztunnel-ca.ztunnel-system.svc"])
            .arg("--ca-token-file")
            .arg(&ca_token_file)
            .arg("--trust-bundle")
            .arg(&bundle)
            .arg("--bpf-pin-root")
            .arg(pins)
            // The node's namespace (the tunnel's own) stands for the host's: PID 1's
            // is not the simulated node's, and may not be readable.
            .args(["--host-netns", "/proc/self/ns/net"])
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "info")
            .env_remove("HOST_IP")
            .env_remove("NODE_NAME")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("cannot start ztunnel run --kube")?;
        Ok(KubeTunnel {
            node: name.to_string(),
            netns: node.netns_path(),
            log,
            child,
        })
    }

    fn log(&self) -> String {
        strip_colours(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    fn tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    async fn get(&self, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
        http_get(&self.netns, addr, path).await
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let started = Instant::now();
        loop {
            let answer = self.get(READINESS, "/healthz/ready").await;
            if let Ok((200, _)) = answer {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the tunnel of {} exited ({status}):\n{}",
                    self.node,
                    self.tail()
                );
            }
            if started.elapsed() > FOLLOW_WITHIN {
                bail!(
                    "the tunnel of {} is not ready within {FOLLOW_WITHIN:?} ({answer:?}):\n{}",
                    self.node,
                    self.tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn config_dump(&self) -> Result<Value> {
        let (status, body) = self.get(ADMIN, "/config_dump").await?;
        if status != 200 {
            bail!("config_dump of {}: HTTP {status}: {body}", self.node);
        }
        Ok(serde_json::from_str(&body)?)
    }

    async fn metrics(&self) -> Result<String> {
        let (status, body) = self.get(METRICS, "/metrics").await?;
        if status != 200 {
            bail!("metrics of {}: HTTP {status}", self.node);
        }
        Ok(body)
    }

    /// The value of the metric line starting with `series` (name and labels).
    async fn metric(&self, series: &str) -> Result<f64> {
        let metrics = self.metrics().await?;
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .with_context(|| format!("no {series} in the metrics of {}", self.node))
    }

    /// The identities with a ready certificate on this node.
    async fn certificates(&self) -> Result<Vec<String>> {
        let dump = self.config_dump().await?;
        Ok(dump["certificates"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["state"] == "ready")
            .filter_map(|c| c["identity"].as_str().map(str::to_string))
            .collect())
    }

    /// Waits until `check` of the config dump holds.
    async fn wait_for(&self, what: &str, check: impl Fn(&Value) -> bool) -> Result<()> {
        let started = Instant::now();
        loop {
            let dump = self.config_dump().await;
            if let Ok(dump) = &dump
                && check(dump)
            {
                return Ok(());
            }
            if started.elapsed() > FOLLOW_WITHIN {
                bail!(
                    "{}: {what} not seen within {FOLLOW_WITHIN:?}: {dump:?}\n{}",
                    self.node,
                    self.tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for KubeTunnel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- log of the tunnel of {} ---\n{}",
                self.node,
                self.tail()
            );
        }
    }
}

/// The pins of this test's tunnels; removed on drop (which detaches the programs).
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        if self.0.exists()
            && let Err(err) = std::fs::remove_dir_all(&self.0)
        {
            eprintln!("cannot remove pins {}: {err}", self.0.display());
        }
        remove_pin_root_if_empty();
    }
}

/// An echo application listening on every address of a pod; remembers what it received.
struct Echo {
    received: Arc<Mutex<Vec<u8>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Echo {
    fn start(pod: &Pod, ports: &[u16]) -> Result<Echo> {
        let netns = pod.netns()?;
        let received = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for ip in pod.ips() {
            for &port in ports {
                let listener = netns.listen(SocketAddr::new(ip, port), 0)?;
                let received = received.clone();
                tasks.push(tokio::spawn(async move {
                    while let Ok((mut tcp, _)) = listener.accept().await {
                        let received = received.clone();
                        tokio::spawn(async move {
                            let mut buf = vec![0u8; 16 * 1024];
                            while let Ok(n @ 1..) = tcp.read(&mut buf).await {
                                received.lock().unwrap().extend_from_slice(&buf[..n]);
                                if tcp.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        });
                    }
                }));
            }
        }
        Ok(Echo { received, tasks })
    }

    fn got(&self, marker: &[u8]) -> bool {
        contains(&self.received.lock().unwrap(), marker)
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn connect(from: &Pod, to: SocketAddr) -> Result<TcpStream> {
    let netns = from.netns()?;
    tokio::time::timeout(STEP, netns.connect(None, to, 0))
        .await
        .with_context(|| format!("{} to {to}: no connection within {STEP:?}", from.name()))?
        .with_context(|| format!("{} to {to}", from.name()))
}

/// Sends `msg` on `tcp` and expects it echoed.
async fn echo_round(tcp: &mut TcpStream, msg: &[u8]) -> Result<()> {
    tcp.write_all(msg).await?;
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(STEP, tcp.read_exact(&mut back))
        .await
        .context("no echo in time")??;
    if back != msg {
        bail!("echo differs: {:?}", String::from_utf8_lossy(&back));
    }
    Ok(())
}

async fn exchange(from: &Pod, to: SocketAddr, msg: &[u8]) -> Result<()> {
    let mut tcp = connect(from, to).await?;
    echo_round(&mut tcp, msg).await
}

/// The whole tier's fixture: dropped in field order (tunnels, CA and sandboxes before
/// the API server, everything before the namespaces).
struct KubeMesh {
    tunnels: Vec<KubeTunnel>,
    apps: Vec<Echo>,
    sandboxes: Vec<(String, PodSandbox)>,
    ca: CaProcess,
    server: ApiServer,
    _pins: Pins,
    cluster: Cluster,
}

/// The seed workloads: (node, pod index on the node, namespace, name and
/// ServiceAccount, meshed, ports it serves).
const WORKLOADS: [(usize, usize, &str, &str, &[u16]); 5] = [
    (0, 0, "shop", "orders", &[8080]),
    (0, 1, "warehouse", "inventory", &[]),
    (0, 2, "plain", "outsider", &[]),
    (1, 0, "finance", "payments", &[9090, 8080]),
    (1, 1, "finance", "ledger", &[8080]),
];

impl KubeMesh {
    async fn start() -> Result<KubeMesh> {
        ztunnel_tests::require_root();
        let cluster = Cluster::builder().nodes(2).pods_per_node(3).build()?;
        let fabric = cluster.fabric_netns_path();
        let out = cluster
            .fabric_command("ip")
            .args(["addr", "add", &format!("{CONTROL_PLANE}/24"), "dev", "br0"])
            .output()?;
        if !out.status.success() {
            bail!(
                "cannot address the fabric's bridge: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let server = ApiServer::start_in(&fabric, CONTROL_PLANE.into())?;
        apply_deploy(&server)?;
        for node in cluster.nodes() {
            server.apply(&format!(
                "apiVersion: v1\nkind: Node\nmetadata:\n  name: {}\n",
                node.name()
            ))?;
        }
        let mut sandboxes = Vec::new();
        let mut apps = Vec::new();
        for (n, m, namespace, name, ports) in WORKLOADS {
            let pod = cluster.pod(n, m);
            let node = cluster.node(n);
            let uid = server.create_pod(&pod_object(
                namespace,
                name,
                name,
                node.name(),
                pod.ips(),
                node.ip().into(),
            ))?;
            sandboxes.push((
                name.to_string(),
                PodSandbox::start(&pod.netns_path(), &uid)?,
            ));
            if !ports.is_empty() {
                apps.push(Echo::start(pod, ports)?);
            }
        }
        check!(
            "deploy/ and the examples applied; 2 Nodes and 5 pods bound to them, \
             their sandboxes in the pods' namespaces and kubepods cgroups"
        );
        let ca = CaProcess::start(&server, SocketAddr::new(CONTROL_PLANE.into(), CA_PORT))?;
        let pins = Pins(pin_dir("kube"));
        let mut tunnels = Vec::new();
        for node in cluster.nodes() {
            tunnels.push(KubeTunnel::start(&server, node, &pins.0)?);
        }
        Ok(KubeMesh {
            tunnels,
            apps,
            sandboxes,
            ca,
            server,
            _pins: pins,
            cluster,
        })
    }

    fn pod(&self, name: &str) -> &Pod {
        let (n, m, ..) = WORKLOADS
            .iter()
            .find(|w| w.3 == name)
            .expect("a seed workload");
        self.cluster.pod(*n, *m)
    }

    fn app(&self, name: &str) -> &Echo {
        let index = WORKLOADS
            .iter()
            .filter(|w| !w.4.is_empty())
            .position(|w| w.3 == name)
            .expect("a seed workload that serves");
        &self.apps[index]
    }

    fn at(&self, name: &str, port: u16) -> SocketAddr {
        SocketAddr::new(self.pod(name).ip().into(), port)
    }

    async fn allowed(&self, what: &str, from: &str, to: &str, port: u16) -> Result<()> {
        let msg = format!("{what}: {from} to {to}:{port}");
        exchange(self.pod(from), self.at(to, port), msg.as_bytes())
            .await
            .with_context(|| format!("{msg} should be allowed"))?;
        if !self.app(to).got(msg.as_bytes()) {
            bail!("{msg}: echoed but the application did not see it");
        }
        check!("allowed, {msg}");
        Ok(())
    }

    async fn refused(&self, what: &str, from: &str, to: &str, port: u16) -> Result<()> {
        let msg = format!("{what}: {from} to {to}:{port}");
        if exchange(self.pod(from), self.at(to, port), msg.as_bytes())
            .await
            .is_ok()
        {
            bail!("{msg} should be refused, and was echoed");
        }
        if self.app(to).got(msg.as_bytes()) {
            bail!("{msg}: refused, but the application received it");
        }
        check!("refused, {msg}");
        Ok(())
    }
}

fn has_workload(dump: &Value, namespace: &str, name: &str) -> bool {
    dump["workloads"].as_array().is_some_and(|w| {
        w.iter()
            .any(|w| w["namespace"] == namespace && w["name"] == name)
    })
}

fn has_policy(dump: &Value, name: &str) -> bool {
    dump["policies"].to_string().contains(name)
}

#[tokio::test]
async fn tunnels_in_kubernetes_mode_follow_a_real_api_server_and_enforce_the_seed_policies()
-> Result<()> {
    let mut mesh = KubeMesh::start().await?;
    for tunnel in &mut mesh.tunnels {
        tunnel.wait_ready().await?;
    }
    for tunnel in &mesh.tunnels {
        for resource in [
            "pods",
            "namespaces",
            "services",
            "endpointslices",
            "peerauthentications",
            "authorizationpolicies",
        ] {
            let series = format!("ztunnel_discovery_resource_ready{{resource=\"{resource}\"}}");
            assert_eq!(
                tunnel.metric(&series).await?,
                1.0,
                "{}: {series}",
                tunnel.node
            );
        }
    }
    check!(
        "both tunnels ready with their ServiceAccount's token: all six resources \
         listed and watched (EndpointSlices as discovery.k8s.io/v1beta1 on 1.20)"
    );

    // Enrolment: each node's meshed pods found in /proc and given certificates by the
    // CA through TokenReviews of the tunnel's pod-bound token.
    let want: [&[&str]; 2] = [
        &[
            "spiffe://cluster.local/ns/shop/sa/orders",
            "spiffe://cluster.local/ns/warehouse/sa/inventory",
        ],
        &[
            "spiffe://cluster.local/ns/finance/sa/payments",
            "spiffe://cluster.local/ns/finance/sa/ledger",
        ],
    ];
    for (tunnel, want) in mesh.tunnels.iter().zip(want) {
        let enrolled = tunnel.metric("ztunnel_pod_netns_enrolled").await?;
        assert_eq!(enrolled, 2.0, "{}: pods enrolled", tunnel.node);
        let started = Instant::now();
        loop {
            let certs = tunnel.certificates().await?;
            if want.iter().all(|id| certs.iter().any(|c| c == id)) {
                break;
            }
            assert!(
                started.elapsed() < FOLLOW_WITHIN,
                "{}: certificates {certs:?}, wanted {want:?}\n{}",
                tunnel.node,
                tunnel.tail()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    let issued = mesh.ca.log().matches("certificate issued").count();
    assert!(
        issued >= 4,
        "the CA issued {issued} certificates:\n{}",
        mesh.ca.log()
    );
    check!(
        "the meshed pods enrolled on their nodes (found in /proc by pod UID) and \
         certified by the CA through TokenReviews ({issued} certificates issued)"
    );

    // The seed scenarios, through eBPF steering and HBONE.
    mesh.allowed(
        "ALLOW orders-to-payments, HBONE across nodes",
        "orders",
        "payments",
        9090,
    )
    .await?;
    mesh.refused("allow-list, no rule for 8080", "orders", "payments", 8080)
        .await?;
    mesh.refused("DENY deny-inventory", "inventory", "payments", 9090)
        .await?;
    mesh.refused(
        "plaintext, payments STRICT by selector",
        "outsider",
        "payments",
        9090,
    )
    .await?;
    mesh.allowed("plaintext, finance PERMISSIVE", "outsider", "ledger", 8080)
        .await?;
    mesh.refused("plaintext, shop STRICT", "outsider", "orders", 8080)
        .await?;
    mesh.allowed(
        "meshed, STRICT satisfied by HBONE on one node",
        "inventory",
        "orders",
        8080,
    )
    .await?;

    // A policy applied with kubectl closes an open connection it denies.
    let mut open = connect(mesh.pod("orders"), mesh.at("payments", 9090)).await?;
    echo_round(&mut open, b"before the new policy").await?;
    mesh.server.apply(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-shop\n  namespace: finance\n\
         spec:\n  selector:\n    matchLabels:\n      app: payments\n  action: DENY\n  rules:\n  - from:\n    - source:\n        namespaces: [shop]\n",
    )?;
    let started = Instant::now();
    while echo_round(&mut open, b"while the policy arrives")
        .await
        .is_ok()
    {
        assert!(
            started.elapsed() < FOLLOW_WITHIN,
            "the open connection survived the DENY policy:\n{}",
            mesh.tunnels[1].tail()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    mesh.refused(
        "DENY deny-shop (applied with kubectl)",
        "orders",
        "payments",
        9090,
    )
    .await?;
    check!("a policy applied with kubectl apply closed the open connection it denies");
    mesh.server.kubectl_ok(&[
        "delete",
        "authorizationpolicy",
        "deny-shop",
        "-n",
        "finance",
    ])?;
    mesh.tunnels[1]
        .wait_for("deny-shop removed", |d| !has_policy(d, "deny-shop"))
        .await?;
    mesh.allowed("deny-shop deleted", "orders", "payments", 9090)
        .await?;

    // The API server restarted: the watches fail, then resume (from a resourceVersion
    // the new server may no longer know: a relist), and changes made afterwards arrive.
    let errors_before = mesh.tunnels[0]
        .metric("ztunnel_kube_watch_errors_total{resource=\"pods\"}")
        .await
        .unwrap_or(0.0);
    // A kube-apiserver that has just started answers 403 until its RBAC caches have
    // synced, so the RBAC check covers the logs up to the restart and from the moment
    // both tunnels resumed.
    for tunnel in &mesh.tunnels {
        no_forbidden(&format!("the tunnel of {}", tunnel.node), &tunnel.log());
    }
    no_forbidden("the CA", &mesh.ca.log());
    mesh.server.restart(Duration::from_secs(3))?;
    for tunnel in &mesh.tunnels {
        let started = Instant::now();
        loop {
            let errors = tunnel
                .metric("ztunnel_kube_watch_errors_total{resource=\"pods\"}")
                .await
                .unwrap_or(0.0);
            let ready = tunnel
                .metric("ztunnel_discovery_resource_ready{resource=\"pods\"}")
                .await?;
            if errors > errors_before && ready == 1.0 {
                break;
            }
            assert!(
                started.elapsed() < FOLLOW_WITHIN,
                "{}: watch errors {errors} (before {errors_before}), pods ready {ready}\n{}",
                tunnel.node,
                tunnel.tail()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    check!("the API server restarted; both tunnels counted the watch errors and resumed");
    let resumed: Vec<usize> = mesh.tunnels.iter().map(|t| t.log().len()).collect();
    let ca_resumed = mesh.ca.log().len();

    // A pod deleted after the restart: it leaves both tunnels' state and its node drops
    // its certificate.
    let ledger = "spiffe://cluster.local/ns/finance/sa/ledger";
    mesh.server.kubectl_ok(&[
        "delete",
        "pod",
        "ledger",
        "-n",
        "finance",
        "--grace-period=0",
        "--force",
    ])?;
    for tunnel in &mesh.tunnels {
        tunnel
            .wait_for("finance/ledger gone", |d| {
                !has_workload(d, "finance", "ledger")
            })
            .await?;
    }
    let started = Instant::now();
    while mesh.tunnels[1]
        .certificates()
        .await?
        .iter()
        .any(|c| c == ledger)
    {
        assert!(
            started.elapsed() < FOLLOW_WITHIN,
            "node 1 still holds {ledger}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    mesh.sandboxes.retain(|(name, _)| name != "ledger");
    assert!(
        mesh.tunnels[1]
            .certificates()
            .await?
            .iter()
            .any(|c| c.ends_with("/sa/payments")),
        "payments' certificate went with ledger's"
    );
    check!("a pod deleted after the restart left both tunnels, and its certificate was dropped");
    mesh.allowed("after the API server restart", "orders", "payments", 9090)
        .await?;

    for (tunnel, from) in mesh.tunnels.iter().zip(resumed) {
        no_forbidden(
            &format!("the tunnel of {}", tunnel.node),
            &tunnel.log()[from..],
        );
    }
    no_forbidden("the CA", &mesh.ca.log()[ca_resumed..]);
    check!(
        "no forbidden errors in the tunnels' and the CA's logs outside the API server's restart (their RBAC is enough)"
    );
    Ok(())
}
