//! `ztunnel run --config FILE` as an operator runs it: two tunnel processes on loopback
//! (no eBPF: SOCKS5 capture), real mTLS from a CA made by `ztunnel ca init`, policies
//! from the config file, edits applied without a restart, SIGTERM drains.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const NET: &str = "127.0.78";

fn ip(last: u8) -> IpAddr {
    format!("{NET}.{last}").parse().unwrap()
}

/// A tunnel process; killed when dropped.
struct Tunnel {
    child: Child,
    admin: SocketAddr,
    readiness: SocketAddr,
    metrics: SocketAddr,
    config: PathBuf,
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Node `node` with its tunnel's servers on 127.0.78.<host>.
fn config(dir: &Path, node: &str, host: u8, socks5: bool, policies: &str) -> String {
    let socks5 = if socks5 {
        format!("socks5Address: {NET}.{host}:1080\n")
    } else {
        String::new()
    };
    format!(
        "node: {node}
ca:
  certFile: {ca}/root-cert.pem
  keyFile: {ca}/root-key.pem
adminAddress: {NET}.{host}:15000
readinessAddress: {NET}.{host}:15021
metricsAddress: {NET}.{host}:15020
drainGracePeriodSeconds: 1
{socks5}workloads:
- name: orders
  namespace: prod
  serviceAccount: orders
  ips: [{NET}.2]
  node: node-a
- name: inventory
  namespace: prod
  serviceAccount: inventory
  ips: [{NET}.4]
  node: node-a
- name: payments
  namespace: finance
  serviceAccount: payments
  labels: {{app: payments}}
  ips: [{NET}.3]
  node: node-b
policies:
{policies}",
        ca = dir.join("ca").display()
    )
}

const ONLY_ORDERS: &str = "- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: payments-callers, namespace: finance}
  spec:
    selector: {matchLabels: {app: payments}}
    action: ALLOW
    rules:
    - from:
      - source: {principals: [cluster.local/ns/prod/sa/orders]}
      to:
      - operation: {ports: [\"9090\"]}
";

const DENY_ALL: &str = "- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: lockdown, namespace: finance}
  spec:
    selector: {matchLabels: {app: payments}}
    action: DENY
    rules:
    - {}
";

fn start(dir: &Path, node: &str, host: u8, socks5: bool, policies: &str) -> Tunnel {
    let path = dir.join(format!("{node}.yaml"));
    std::fs::write(&path, config(dir, node, host, socks5, policies)).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_ztunnel"))
        .args(["run", "--config", path.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let at = |port: u16| SocketAddr::new(ip(host), port);
    Tunnel {
        child,
        admin: at(15000),
        readiness: at(15021),
        metrics: at(15020),
        config: path,
    }
}

/// A directory with a CA made by `ztunnel ca init` in `ca/`.
fn with_ca() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let ca = Command::new(env!("CARGO_BIN_EXE_ztunnel"))
        .args([
            "ca",
            "init",
            "--dir",
            dir.path().join("ca").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        ca.status.success(),
        "{}",
        String::from_utf8_lossy(&ca.stderr)
    );
    dir
}

/// A plain HTTP/1.0 GET; returns the status code and body.
async fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    tcp.read_to_string(&mut response).await?;
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

async fn wait_ready(tunnel: &Tunnel) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok((200, _)) = get(tunnel.readiness, "/healthz/ready").await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "tunnel {} not ready within 20 s",
            tunnel.config.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn echo_app(addr: SocketAddr) {
    let listener = TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
}

async fn round_trip(tcp: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    tcp.write_all(msg).await?;
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut back))
        .await
        .map_err(|_| std::io::Error::other("no echo within 5 s"))??;
    assert_eq!(back, msg);
    Ok(())
}

/// Whether `source` gets an echo from `destination` through the SOCKS5 capture (a
/// refusal may come as a SOCKS5 error or as a reset after it).
async fn reaches(socks: SocketAddr, source: IpAddr, destination: SocketAddr) -> bool {
    match support::socks5_connect(socks, source, destination).await {
        Ok(mut tcp) => round_trip(&mut tcp, b"charge 10").await.is_ok(),
        Err(_) => false,
    }
}

async fn metric(tunnel: &Tunnel, prefix: &str) -> String {
    let (_, text) = get(tunnel.metrics, "/metrics").await.unwrap();
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn two_tunnels_carry_policy_checked_mtls_and_apply_edits_live() {
    let dir = with_ca();
    let payments_app = SocketAddr::new(ip(3), 9090);
    echo_app(payments_app).await;

    let a = start(dir.path(), "node-a", 10, true, ONLY_ORDERS);
    let b = start(dir.path(), "node-b", 11, false, ONLY_ORDERS);
    wait_ready(&a).await;
    wait_ready(&b).await;
    let socks = SocketAddr::new(ip(10), 1080);

    // orders -> payments:9090 is allowed, over HBONE with both identities known.
    let mut conn = support::socks5_connect(socks, ip(2), payments_app)
        .await
        .unwrap();
    round_trip(&mut conn, b"charge 10").await.unwrap();
    let opened = metric(&b, "istio_tcp_connections_opened_total{").await;
    assert!(
        opened.contains("reporter=\"destination\"")
            && opened.contains("source_principal=\"spiffe://cluster.local/ns/prod/sa/orders\"")
            && opened.contains(
                "destination_principal=\"spiffe://cluster.local/ns/finance/sa/payments\""
            )
            && opened.contains("connection_security_policy=\"mutual_tls\""),
        "{opened}"
    );

    // inventory, with a valid certificate, is denied by the ALLOW list.
    assert!(
        !reaches(socks, ip(4), payments_app).await,
        "inventory reached payments"
    );

    // Both tunnels hold the certificates of their local identities.
    let (_, dump) = get(a.admin, "/config_dump").await.unwrap();
    assert!(
        dump.contains("spiffe://cluster.local/ns/prod/sa/orders"),
        "{dump}"
    );
    let (_, dump) = get(b.admin, "/config_dump").await.unwrap();
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let certs = dump["certificates"]
        .as_array()
        .expect("certificates in the dump");
    assert!(
        certs.iter().any(
            |c| c["identity"] == "spiffe://cluster.local/ns/finance/sa/payments"
                && c["state"] == "ready"
        ),
        "{certs:?}"
    );

    // An edit that denies everyone applies without restart and closes the open connection.
    std::fs::write(&b.config, config(dir.path(), "node-b", 11, false, DENY_ALL)).unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 16];
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the connection now denied was not closed");
    assert!(
        !reaches(socks, ip(2), payments_app).await,
        "orders reached payments after the DENY edit"
    );

    // A broken edit is refused; the last good config stays in force.
    std::fs::write(&b.config, "node: node-b\nworkloads: [oops").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !metric(&b, "ztunnel_config_rejected_total 1")
        .await
        .contains('1')
    {
        assert!(Instant::now() < deadline, "rejection not counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _) = get(b.readiness, "/healthz/ready").await.unwrap();
    assert_eq!(status, 200);
}

#[tokio::test]
async fn sigterm_drains_and_exits() {
    // node-c runs none of the workloads, so this tunnel binds no workload address the
    // other test's tunnels use.
    let dir = with_ca();
    let mut a = start(dir.path(), "node-c", 12, true, "");
    wait_ready(&a).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(a.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = a.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "no exit within 10 s of SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status}");
}

#[test]
fn a_broken_config_is_refused_with_its_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "node: n\nworkloads:\n- name: x\n  ips: [not-an-ip]\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ztunnel"))
        .args(["run", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.yaml:4:")
            && stderr.contains("workloads[0].ips[0]")
            && stderr.contains("invalid IP address"),
        "{stderr}"
    );
}

#[test]
fn run_needs_one_source_and_kube_needs_the_node() {
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_ztunnel"))
            .arg("run")
            .args(args)
            .env_remove("NODE_NAME")
            .env("KUBECONFIG", "/nonexistent")
            .output()
            .unwrap()
    };
    let neither = run(&[]);
    assert_eq!(neither.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&neither.stderr).contains("--config"));
    let both = run(&["--config", "x.yaml", "--kube"]);
    assert_eq!(both.status.code(), Some(2));
    let no_node = run(&["--kube"]);
    assert_eq!(no_node.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&no_node.stderr);
    assert!(stderr.contains("NODE_NAME"), "{stderr}");
}

/// The README's loopback example loads as written.
#[test]
fn the_loopback_example_loads() {
    for node in ["node-a", "node-b"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("../deploy/examples/loopback/{node}.yaml"));
        let config = ztunnel::config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.settings.node, node);
        assert_eq!(config.resources.workloads.len(), 3);
        assert!(config.settings.ca.is_some());
    }
}

/// The value of the series `series` (name and labels, then a space).
async fn value(tunnel: &Tunnel, series: &str) -> String {
    metric(tunnel, series)
        .await
        .trim_start_matches(series)
        .to_string()
}

/// The value of `series` once it is `want`, or what it is after 10 s.
async fn metric_becomes(tunnel: &Tunnel, series: &str, want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let value = value(tunnel, series).await;
        if value == want || Instant::now() > deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A trust bundle edit that drops the root of the certificates the tunnel holds is
/// refused (the bundle in force stays) and counted, unless the file marks it as the
/// retire step of a rotation; an unreadable bundle is counted the same way.
#[tokio::test]
async fn a_bundle_edit_that_drops_the_held_root_is_refused_unless_marked_retire() {
    let dir = with_ca();
    let new = dir.path().join("new");
    let init = Command::new(env!("CARGO_BIN_EXE_ztunnel"))
        .args(["ca", "init", "--dir", new.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(init.status.success());
    let old_pem = std::fs::read_to_string(dir.path().join("ca/root-cert.pem")).unwrap();
    let new_pem = std::fs::read_to_string(new.join("root-cert.pem")).unwrap();
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, &old_pem).unwrap();
    let key_line = format!(
        "  keyFile: {}/root-key.pem\n",
        dir.path().join("ca").display()
    );
    let text = config(dir.path(), "node-a", 13, false, "").replace(
        &key_line,
        &format!("{key_line}  trustBundleFile: {}\n", bundle.display()),
    );
    assert!(text.contains("trustBundleFile"));
    let path = dir.path().join("node-a.yaml");
    std::fs::write(&path, text).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_ztunnel"))
        .args(["run", "--config", path.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let at = |port: u16| SocketAddr::new(ip(13), port);
    let tunnel = Tunnel {
        child,
        admin: at(15000),
        readiness: at(15021),
        metrics: at(15020),
        config: path,
    };
    wait_ready(&tunnel).await;
    let roots = "ztunnel_trust_bundle_roots ";
    let failures = "ztunnel_trust_bundle_reload_failures_total ";
    assert_eq!(metric_becomes(&tunnel, roots, "1").await, "1");
    assert_eq!(metric_becomes(&tunnel, failures, "0").await, "0");

    // Prepare: both roots.
    std::fs::write(&bundle, format!("{old_pem}{new_pem}")).unwrap();
    assert_eq!(metric_becomes(&tunnel, roots, "2").await, "2");
    // Only the new root, while the certificates held come from the old one: refused.
    std::fs::write(&bundle, &new_pem).unwrap();
    assert_eq!(metric_becomes(&tunnel, failures, "1").await, "1");
    assert_eq!(value(&tunnel, roots).await, "2");
    // A broken file is counted too.
    std::fs::write(&bundle, "-----BEGIN CERTIFICATE-----\ngarbage\n").unwrap();
    assert_eq!(metric_becomes(&tunnel, failures, "2").await, "2");
    assert_eq!(value(&tunnel, roots).await, "2");
    // Marked as the retire step: applied.
    std::fs::write(
        &bundle,
        format!("{}\n{new_pem}", ztunnel::identity::ROTATION_RETIRE_MARK),
    )
    .unwrap();
    assert_eq!(metric_becomes(&tunnel, roots, "1").await, "1");
    assert_eq!(value(&tunnel, failures).await, "2");
}
