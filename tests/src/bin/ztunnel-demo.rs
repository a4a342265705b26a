//! `cargo xtask demo`: a two-node, four-pod mesh on this machine, told step by step.
//! Every claim it makes is checked: when one does not hold, the demo says which and
//! exits with a failure. Needs root; removes everything it made when it ends, also on
//! failure.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, ExitCode};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ztunnel_tests::capture::{self, APPLICATION_DATA, HANDSHAKE};
use ztunnel_tests::{Cluster, Mesh, Pod, PodSpec, SEED_POLICIES, contains, ztunnel_binary};

/// payments' echo server (plain TCP, allowed to orders by the seed policy).
const PAYMENTS_PORT: u16 = 9090;
/// payments' HTTP server, declared HTTP (`httpPorts`): requests are decided one by one.
const CHARGE_PORT: u16 = 8080;
/// Echo servers of inventory and batch, for the controls.
const ECHO_PORT: u16 = 7070;
const HBONE_PORT: u16 = 15008;
const STEP: Duration = Duration::from_secs(3);
const ORDERS_PRINCIPAL: &str = "cluster.local/ns/prod/sa/orders";

/// The seed policy of HTTP authorization: only orders may `POST /charge` on payments.
const CHARGE_POLICY: &str = "- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: payments-charge, namespace: finance}
  spec:
    selector: {matchLabels: {app: payments}}
    action: ALLOW
    rules:
    - from: [{source: {principals: [cluster.local/ns/prod/sa/orders]}}]
      to: [{operation: {methods: [POST], paths: [/charge]}}]
";

/// What orders says to payments' echo (so also what comes back): never to be seen on
/// the wire.
const ORDER_MESSAGE: &[u8] = b"order 4711: charge 25.00 EUR to card 4000-0000-0000-0002";
/// The body of orders' HTTP request, and payments' answer to it.
const CHARGE_BODY: &str = "order=4711&amount=25.00";
const CHARGE_ANSWER: &str = "charged 25.00 EUR for order 4711";
/// Plaintext from outside the mesh, which the capture must see.
const CONTROL_MESSAGE: &[u8] = b"PLAINTEXT CONTROL from legacy/batch";

#[tokio::main]
async fn main() -> ExitCode {
    ztunnel_tests::require_root();
    match run().await {
        Ok(()) => {
            say("\nEvery claim above was checked and held.");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("\nThe demo FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The pods of the demo, as the mesh names them.
struct Pods<'c> {
    orders: (&'c Pod, PodSpec),
    inventory: (&'c Pod, PodSpec),
    payments: (&'c Pod, PodSpec),
    batch: (&'c Pod, PodSpec),
}

async fn run() -> Result<()> {
    say("Building a cluster on this machine: two nodes, two pods each, all network namespaces.");
    let cluster = Cluster::builder().nodes(2).pods_per_node(2).build()?;
    let pods = Pods {
        orders: (
            cluster.pod(0, 0),
            PodSpec::new(cluster.pod(0, 0), "prod", "orders"),
        ),
        inventory: (
            cluster.pod(0, 1),
            PodSpec::new(cluster.pod(0, 1), "prod", "inventory"),
        ),
        payments: (
            cluster.pod(1, 0),
            PodSpec::new(cluster.pod(1, 0), "finance", "payments").http_ports(&[CHARGE_PORT]),
        ),
        batch: (
            cluster.pod(1, 1),
            PodSpec::new(cluster.pod(1, 1), "legacy", "batch").unmeshed(),
        ),
    };
    let all = [&pods.orders, &pods.inventory, &pods.payments, &pods.batch];
    for (pod, spec) in all {
        say(&format!(
            "  {:<8} node {}  {:<16} {:<15} {}",
            if spec.meshed { "meshed" } else { "outside" },
            pod.node_index(),
            spec.key(),
            pod.ip(),
            pod.ipv6()
        ));
    }
    say("Policies: namespace finance is STRICT (mTLS only); only");
    say(&format!(
        "  {ORDERS_PRINCIPAL} may call payments on port {PAYMENTS_PORT} (finance/payments-allow-orders)"
    ));
    say(&format!(
        "  and POST /charge on its HTTP port {CHARGE_PORT} (finance/payments-charge)."
    ));
    let specs = all.iter().map(|(_, spec)| spec.clone()).collect();
    let policies = format!("{SEED_POLICIES}{CHARGE_POLICY}");
    let mut mesh = Mesh::new(&cluster, specs, &policies)?;
    let payments = pods.payments.0;
    let payments_echo = Echo::start(payments, PAYMENTS_PORT)?;
    let charge_app = ChargeApp::start(payments, CHARGE_PORT)?;
    let inventory_echo = Echo::start(pods.inventory.0, ECHO_PORT)?;
    let batch_echo = Echo::start(pods.batch.0, ECHO_PORT)?;
    say(&format!(
        "payments runs an echo server on {}:{PAYMENTS_PORT} and an HTTP server on :{CHARGE_PORT};",
        payments.ip()
    ));
    say(&format!(
        "inventory and batch run echo servers on :{ECHO_PORT}."
    ));

    say("\nA capture (tcpdump) starts on the link between the two nodes, before any tunnel.");
    let wire = cluster.capture_between_nodes()?;

    say("\nStarting one tunnel per node (ztunnel run, in the node's namespace).");
    say("Each loads its eBPF steering and enrols its meshed pods.");
    mesh.start_all().await?;
    say("Both tunnels are ready: local pods enrolled, certificates issued.");

    let target = SocketAddr::new(payments.ip().into(), PAYMENTS_PORT);
    let callers = [
        (&pods.orders, ORDER_MESSAGE, true),
        (&pods.inventory, &b"inventory asks for a refund"[..], false),
        (&pods.batch, &b"batch asks for the ledger"[..], false),
    ];
    for (number, ((pod, spec), message, allowed)) in callers.into_iter().enumerate() {
        say(&format!(
            "\nStep {}: {} ({}) connects to finance/payments at {target} and says {:?}.",
            number + 1,
            spec.key(),
            if spec.meshed {
                "in the mesh"
            } else {
                "outside the mesh"
            },
            String::from_utf8_lossy(message)
        ));
        let outcome = exchange(pod, target, message).await;
        match &outcome {
            Ok(()) => say("  Result: the echo came back. The connection was allowed."),
            Err(e) => say(&format!("  Result: refused: {e}.")),
        }
        let verdict = check(&mesh, spec, target)?;
        explain(&verdict);
        let predicted = verdict["allowed"].as_bool().unwrap_or(false);
        claim(
            outcome.is_ok() == allowed && predicted == allowed,
            &format!(
                "{} is {} by payments, as ztunnel check predicts",
                spec.key(),
                if allowed { "allowed" } else { "refused" }
            ),
        )?;
        if !allowed {
            claim(
                !payments_echo.got(message),
                "payments' application received none of it",
            )?;
        }
    }

    say(&format!(
        "\nStep 4: an impostor in legacy/batch presents a certificate for \
         spiffe://{ORDERS_PRINCIPAL},\n  signed by another CA, to payments' HBONE port {HBONE_PORT}."
    ));
    let handshake_failures = |metrics: &str| {
        sum(
            metrics,
            "ztunnel_tls_handshake_failures_total",
            &[("side", "server"), ("reason", "unknown_ca")],
        )
    };
    let before = handshake_failures(&mesh.metrics(1).await?);
    let forged = Forged::new()?;
    let outcome = forged
        .connect(
            pods.batch.0,
            SocketAddr::new(payments.ip().into(), HBONE_PORT),
        )
        .await;
    match &outcome {
        Ok(()) => say("  Result: the tunnel accepted the forged certificate."),
        Err(e) => say(&format!("  Result: refused in the TLS handshake: {e}.")),
    }
    let after = handshake_failures(&mesh.metrics(1).await?);
    claim(
        outcome.is_err() && after > before,
        &format!(
            "the forged certificate is refused and counted: \
             ztunnel_tls_handshake_failures_total{{side=\"server\",reason=\"unknown_ca\"}} {before} -> {after}"
        ),
    )?;

    l7_step(&mesh, &pods, &charge_app).await?;
    wire_step(wire, &pods, &inventory_echo).await?;
    fail_closed_step(&mut mesh, &pods, &inventory_echo, &batch_echo, target).await?;
    metrics_step(&mesh).await?;

    say("\nDone. Removing the tunnels, the eBPF programs and every namespace.");
    drop(mesh);
    drop(payments_echo);
    drop(charge_app);
    drop(inventory_echo);
    drop(batch_echo);
    drop(cluster);
    say("Everything is removed.");
    Ok(())
}

/// Step 5: HTTP requests decided one by one by payments' tunnel.
async fn l7_step(mesh: &Mesh, pods: &Pods<'_>, app: &ChargeApp) -> Result<()> {
    say(&format!(
        "\nStep 5: HTTP to payments' port {CHARGE_PORT}, which payments declares HTTP (httpPorts: [{CHARGE_PORT}])."
    ));
    say("  payments' tunnel decides each request against finance/payments-charge:");
    let to = SocketAddr::new(pods.payments.0.ip().into(), CHARGE_PORT);
    let requests = [
        (&pods.orders, "POST", 200),
        (&pods.orders, "GET", 403),
        (&pods.inventory, "POST", 403),
    ];
    for ((pod, spec), method, expected) in requests {
        let denials = denial_lines(mesh);
        let (status, body) = http_request(pod, to, method, "/charge").await?;
        say(&format!(
            "  {:<15} {method:<4} /charge -> {status} {:?}",
            spec.key(),
            body.trim()
        ));
        if status == 403
            && let Some(line) = mesh.log(1).lines().filter(|l| is_denial(l)).nth(denials)
        {
            say(&format!("    payments' tunnel: {}", denial_text(line)));
        }
        let wanted_body = if expected == 200 {
            CHARGE_ANSWER
        } else {
            "RBAC: access denied"
        };
        claim(
            status == expected && body.trim() == wanted_body,
            &format!(
                "{} {method} /charge gets {expected} {wanted_body:?}",
                spec.key()
            ),
        )?;
    }
    let seen = app.seen();
    claim(
        seen == ["POST /charge from orders' request"],
        &format!(
            "payments' application saw only the allowed request: {}",
            seen.join("; ")
        ),
    )
}

/// Step 6: what the capture between the nodes saw.
async fn wire_step(wire: ztunnel_tests::Capture, pods: &Pods<'_>, inventory: &Echo) -> Result<()> {
    let (batch, inventory_pod) = (pods.batch.0, pods.inventory.0);
    say("\nStep 6: what crossed the link between the two nodes.");
    say(&format!(
        "  A control first: legacy/batch sends {:?} in plaintext to prod/inventory",
        String::from_utf8_lossy(CONTROL_MESSAGE)
    ));
    say("  (namespace prod has no PeerAuthentication: PERMISSIVE, plaintext accepted).");
    let to = SocketAddr::new(inventory_pod.ip().into(), ECHO_PORT);
    exchange(batch, to, CONTROL_MESSAGE)
        .await
        .context("legacy/batch to prod/inventory (the control)")?;
    claim(
        inventory.got(CONTROL_MESSAGE),
        "the control reached prod/inventory",
    )?;
    let wire = wire.stop_decoded()?;
    claim(
        contains(&wire.bytes, CONTROL_MESSAGE),
        "the capture shows the control's text: plaintext on this link is seen",
    )?;
    for (what, text) in [
        (
            "orders' message to the echo (and the echo's answer)",
            ORDER_MESSAGE,
        ),
        ("orders' HTTP request body", CHARGE_BODY.as_bytes()),
        ("payments' HTTP answer", CHARGE_ANSWER.as_bytes()),
        ("the request line POST /charge", b"POST /charge".as_slice()),
    ] {
        claim(
            !contains(&wire.bytes, text),
            &format!("the capture has no trace of {what}"),
        )?;
    }
    let (orders, payments) = (
        IpAddr::from(pods.orders.0.ip()),
        IpAddr::from(pods.payments.0.ip()),
    );
    let between: Vec<capture::Segment> = wire
        .segments
        .iter()
        .filter(|s| {
            let ends = [s.from.ip(), s.to.ip()];
            ends.contains(&orders) && ends.contains(&payments)
        })
        .cloned()
        .collect();
    let other_ports: Vec<String> = between
        .iter()
        .filter(|s| s.from.port() != HBONE_PORT && s.to.port() != HBONE_PORT)
        .map(|s| format!("{} -> {}", s.from, s.to))
        .collect();
    claim(
        !between.is_empty() && other_ports.is_empty(),
        &format!(
            "all {} TCP segments between prod/orders ({orders}) and finance/payments ({payments}) \
             are on port {HBONE_PORT}{}",
            between.len(),
            if other_ports.is_empty() {
                String::new()
            } else {
                format!(" (not: {})", other_ports.join(", "))
            }
        ),
    )?;
    let streams = capture::streams(&between)?;
    let (mut handshake, mut data, mut bytes) = (0, 0, 0);
    for stream in &streams {
        let records = capture::tls_records(&stream.bytes)
            .with_context(|| format!("{} -> {} is not TLS", stream.from, stream.to))?;
        let hello = if stream.to.port() == HBONE_PORT { 1 } else { 2 };
        claim(
            capture::first_handshake_type(&stream.bytes) == Some(hello),
            &format!(
                "{} -> {}: starts with a TLS {}",
                stream.from,
                stream.to,
                if hello == 1 {
                    "ClientHello"
                } else {
                    "ServerHello"
                }
            ),
        )?;
        handshake += records
            .iter()
            .filter(|r| r.content_type == HANDSHAKE)
            .count();
        data += records
            .iter()
            .filter(|r| r.content_type == APPLICATION_DATA)
            .count();
        bytes += stream.bytes.len();
    }
    claim(
        data > 0,
        &format!(
            "every one of the {bytes} bytes orders and payments exchanged ({} connection{}) is in \
             a TLS record: {handshake} handshake, {data} application data",
            streams.len() / 2,
            if streams.len() == 2 { "" } else { "s" }
        ),
    )
}

/// Step 7: the steering fails closed while a tunnel is away, both ways.
async fn fail_closed_step(
    mesh: &mut Mesh,
    pods: &Pods<'_>,
    inventory: &Echo,
    batch: &Echo,
    payments: SocketAddr,
) -> Result<()> {
    let (orders, batch_pod) = (pods.orders.0, pods.batch.0);
    let to_batch = SocketAddr::new(batch_pod.ip().into(), ECHO_PORT);
    let to_inventory = SocketAddr::new(pods.inventory.0.ip().into(), ECHO_PORT);
    say("\nStep 7: fail closed. With both tunnels up, two connections the mesh accepts:");
    exchange(orders, to_batch, b"orders to batch, tunnel up")
        .await
        .context("prod/orders to legacy/batch")?;
    say("  prod/orders -> legacy/batch (outside the mesh, so passed through): echoed.");
    exchange(batch_pod, to_inventory, b"batch to inventory, tunnel up")
        .await
        .context("legacy/batch to prod/inventory")?;
    say("  legacy/batch -> prod/inventory (plaintext, PERMISSIVE): echoed.");

    say("  Now the tunnel of node 0 (orders' and inventory's node) crashes (SIGKILL).");
    mesh.kill(0)?;
    let outbound = b"orders to batch, tunnel down";
    let outcome = exchange(orders, to_batch, outbound).await;
    say(&format!(
        "  prod/orders -> legacy/batch: {}.",
        outcome_text(&outcome)
    ));
    claim(
        outcome.is_err() && !batch.got(outbound),
        "an enrolled pod's connect is refused while its tunnel is away, and nothing reaches legacy/batch",
    )?;
    let inbound = b"batch to inventory, tunnel down";
    let outcome = exchange(batch_pod, to_inventory, inbound).await;
    say(&format!(
        "  legacy/batch -> prod/inventory: {}.",
        outcome_text(&outcome)
    ));
    claim(
        outcome.is_err() && !inventory.got(inbound),
        "plaintext from outside the mesh to an enrolled pod is refused while its tunnel is away, \
         and nothing reaches prod/inventory",
    )?;

    say("  The tunnel restarts; it finds its pinned steering and enrols the pods again.");
    mesh.start(0).await?;
    for (from, to, what) in [
        (orders, to_batch, "prod/orders -> legacy/batch"),
        (batch_pod, to_inventory, "legacy/batch -> prod/inventory"),
        (orders, payments, "prod/orders -> finance/payments"),
    ] {
        let outcome = exchange(from, to, b"after the restart").await;
        claim(
            outcome.is_ok(),
            &format!("{what} works again, with no manual step"),
        )?;
    }
    Ok(())
}

/// Step 8: the metrics of payments' tunnel that the steps moved.
async fn metrics_step(mesh: &Mesh) -> Result<()> {
    let text = mesh.metrics(1).await?;
    say("\nStep 8: what payments' tunnel (node 1) counted, from its /metrics.");
    say(
        "  Connections accepted, by source principal (istio_tcp_connections_opened_total, reporter destination):",
    );
    let connections = grouped(
        &text,
        "istio_tcp_connections_opened_total",
        &[("reporter", "destination")],
        &["source_principal", "connection_security_policy"],
    );
    print_grouped(&connections);
    say("  Refusals by reason (ztunnel_connections_refused_total):");
    let refusals = grouped(&text, "ztunnel_connections_refused_total", &[], &["reason"]);
    print_grouped(&refusals);
    say("  TLS handshake failures by side and reason (ztunnel_tls_handshake_failures_total):");
    let failures = grouped(
        &text,
        "ztunnel_tls_handshake_failures_total",
        &[],
        &["side", "reason"],
    );
    print_grouped(&failures);
    say("  HTTP requests, by source principal and response code (istio_requests_total):");
    let requests = grouped(
        &text,
        "istio_requests_total",
        &[("reporter", "destination")],
        &["source_principal", "response_code"],
    );
    print_grouped(&requests);

    let orders = format!("spiffe://{ORDERS_PRINCIPAL}");
    let inventory = "spiffe://cluster.local/ns/prod/sa/inventory";
    let count = |map: &BTreeMap<Vec<String>, f64>, key: &[&str]| {
        let key: Vec<String> = key.iter().map(ToString::to_string).collect();
        map.get(&key).copied().unwrap_or(0.0)
    };
    claim(
        count(&connections, &[&orders, "mutual_tls"]) >= 1.0,
        "connections from orders arrived over mutual TLS",
    )?;
    claim(
        count(&refusals, &["denied"]) >= 1.0
            && count(&refusals, &["strict_plaintext"]) >= 1.0
            && count(&refusals, &["request_denied"]) >= 2.0,
        "refusals counted: inventory denied, batch's plaintext refused by STRICT, two HTTP requests denied",
    )?;
    claim(
        count(&failures, &["server", "unknown_ca"]) >= 1.0,
        "the impostor's handshake counted as unknown_ca",
    )?;
    claim(
        count(&requests, &[&orders, "200"]) == 1.0
            && count(&requests, &[&orders, "403"]) == 1.0
            && count(&requests, &[inventory, "403"]) == 1.0,
        "requests counted: orders 200 once and 403 once, inventory 403 once",
    )
}

fn say(line: &str) {
    println!("{line}");
}

/// Prints a checked claim, or fails the demo with it.
fn claim(holds: bool, what: &str) -> Result<()> {
    if holds {
        say(&format!("  [ok] {what}"));
        Ok(())
    } else {
        bail!("this claim does not hold: {what}")
    }
}

fn outcome_text(outcome: &Result<()>) -> String {
    match outcome {
        Ok(()) => "echoed".to_string(),
        Err(e) => format!("refused: {e}"),
    }
}

/// `ztunnel check --json`: the tunnel's own account of the decision.
fn check(mesh: &Mesh, from: &PodSpec, to: SocketAddr) -> Result<serde_json::Value> {
    let mut cmd = Command::new(ztunnel_binary()?);
    cmd.arg("check").arg("--config").arg(mesh.config(0));
    if from.meshed {
        cmd.args(["--from", &from.key()]);
    } else {
        cmd.args(["--from-ip", &from_ip(from)]);
    }
    let out = cmd
        .args(["--to", &to.to_string(), "--json"])
        .output()
        .context("cannot run ztunnel check")?;
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "ztunnel check answered no JSON: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })
}

fn from_ip(spec: &PodSpec) -> String {
    spec.ips()
        .first()
        .map(ToString::to_string)
        .unwrap_or_default()
}

fn explain(v: &serde_json::Value) {
    let text = |key: &str| v[key].as_str().unwrap_or("none").to_string();
    say(&format!(
        "  Why (ztunnel check): transport {}; source identity {}; destination identity {};",
        text("transport"),
        text("source_identity"),
        text("destination_identity"),
    ));
    say(&format!(
        "    mTLS mode at payments {} (from {}); deciding policy {}:",
        text("mode"),
        text("mode_source"),
        text("policy"),
    ));
    say(&format!("    {}", text("reason")));
}

/// Connects from `from` to `to`, sends `message` and expects it echoed. The error says
/// what happened in words (refused, reset, no answer), without the harness's names.
async fn exchange(from: &Pod, to: SocketAddr, message: &[u8]) -> Result<()> {
    let netns = from.netns()?;
    let mut tcp = match tokio::time::timeout(STEP, netns.connect(None, to, 0)).await {
        Err(_) => bail!("no answer to the connect within {STEP:?} (the SYN was dropped)"),
        Ok(Err(e)) => bail!("the connect failed: {}", io_text(&e)),
        Ok(Ok(tcp)) => tcp,
    };
    if let Err(e) = tcp.write_all(message).await {
        bail!("the write failed: {}", io_text(&e));
    }
    let mut back = vec![0u8; message.len()];
    match tokio::time::timeout(STEP, tcp.read_exact(&mut back)).await {
        Err(_) => bail!("connected, but no echo within {STEP:?}"),
        Ok(Err(e)) => bail!("connected, then {} before any echo", io_text(&e)),
        Ok(Ok(_)) if back != message => bail!("the echo differs from what was sent"),
        Ok(Ok(_)) => Ok(()),
    }
}

/// An I/O failure in words: its kind when it has a telling one, else its message.
fn io_text(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::ConnectionRefused => "the connection was refused".to_string(),
                std::io::ErrorKind::ConnectionReset => "the connection was reset".to_string(),
                std::io::ErrorKind::UnexpectedEof => "the connection was closed".to_string(),
                _ => io.to_string(),
            };
        }
        cause = e.source();
    }
    error.to_string()
}

/// An echo server inside a pod that keeps what it received.
struct Echo {
    received: Arc<Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Echo {
    fn start(pod: &Pod, port: u16) -> Result<Echo> {
        let listener = pod
            .netns()?
            .listen(SocketAddr::new(pod.ip().into(), port), 0)?;
        let received = Arc::new(Mutex::new(Vec::new()));
        let log = received.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while let Ok(n @ 1..) = tcp.read(&mut buf).await {
                        log.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .extend_from_slice(&buf[..n]);
                        if tcp.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Ok(Echo { received, task })
    }

    fn got(&self, message: &[u8]) -> bool {
        contains(
            &self.received.lock().unwrap_or_else(|p| p.into_inner()),
            message,
        )
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// payments' HTTP application: answers `POST /charge` and keeps the request lines it
/// was sent.
struct ChargeApp {
    seen: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl ChargeApp {
    fn start(pod: &Pod, port: u16) -> Result<ChargeApp> {
        let listener = pod
            .netns()?
            .listen(SocketAddr::new(pod.ip().into(), port), 0)?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let log = log.clone();
                let service = hyper::service::service_fn(move |request| {
                    let log = log.clone();
                    async move { Ok::<_, hyper::Error>(charge(request, &log).await) }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service),
                );
            }
        });
        Ok(ChargeApp { seen, task })
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for ChargeApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn charge(
    request: hyper::Request<hyper::body::Incoming>,
    log: &Mutex<Vec<String>>,
) -> hyper::Response<Full<Bytes>> {
    let line = format!("{} {}", request.method(), request.uri().path());
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let from = if body == CHARGE_BODY.as_bytes() {
        "orders' request"
    } else {
        "another request"
    };
    log.lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(format!("{line} from {from}"));
    hyper::Response::new(Full::new(Bytes::from_static(CHARGE_ANSWER.as_bytes())))
}

/// One HTTP/1.1 request from `from`: the status and the body of the answer.
async fn http_request(
    from: &Pod,
    to: SocketAddr,
    method: &str,
    path: &str,
) -> Result<(u16, String)> {
    let netns = from.netns()?;
    let tcp = match tokio::time::timeout(STEP, netns.connect(None, to, 0)).await {
        Err(_) => bail!("{method} {path} to {to}: no answer to the connect within {STEP:?}"),
        Ok(Err(e)) => bail!("{method} {path} to {to}: {}", io_text(&e)),
        Ok(Ok(tcp)) => tcp,
    };
    let (mut send, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(connection);
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(
            hyper::header::HOST,
            format!("payments.finance:{}", to.port()),
        )
        .body(Full::new(Bytes::from_static(CHARGE_BODY.as_bytes())))?;
    let response = tokio::time::timeout(STEP, send.send_request(request))
        .await
        .with_context(|| format!("{method} {path} to {to}: no answer within {STEP:?}"))?
        .with_context(|| format!("{method} {path} to {to}"))?;
    let status = response.status().as_u16();
    let body = tokio::time::timeout(STEP, response.into_body().collect())
        .await
        .with_context(|| format!("{method} {path} to {to}: no body within {STEP:?}"))??
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn is_denial(line: &str) -> bool {
    line.contains("HTTP request denied")
}

fn denial_lines(mesh: &Mesh) -> usize {
    mesh.log(1).lines().filter(|l| is_denial(l)).count()
}

/// The policy and reason of a tunnel's "HTTP request denied" log line.
fn denial_text(line: &str) -> String {
    line.find("policy=")
        .map_or(line, |at| &line[at..])
        .replace('"', "")
}

/// A client certificate for orders' identity from a CA the mesh does not trust.
struct Forged {
    dir: tempfile::TempDir,
}

impl Forged {
    fn new() -> Result<Forged> {
        let dir = tempfile::Builder::new().prefix("ztunnel-demo-").tempdir()?;
        let ztunnel = ztunnel_binary()?;
        let ca = dir.path().join("other-ca");
        run_quietly(
            Command::new(&ztunnel)
                .args(["ca", "init", "--dir"])
                .arg(&ca),
        )?;
        run_quietly(
            Command::new(&ztunnel)
                .args(["ca", "issue", "--dir"])
                .arg(&ca)
                .args(["--identity", &format!("spiffe://{ORDERS_PRINCIPAL}")])
                .arg("--out")
                .arg(dir.path().join("forged")),
        )?;
        Ok(Forged { dir })
    }

    /// A TLS 1.3 connection from `pod` to `to` presenting the forged certificate, then
    /// an HTTP/2 preface; an error when the server refuses it.
    async fn connect(&self, pod: &Pod, to: SocketAddr) -> Result<()> {
        let files = self.dir.path().join("forged");
        let chain = CertificateDer::pem_file_iter(files.join("cert-chain.pem"))
            .context("the forged certificate")?
            .collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_file(files.join("key.pem")).context("the forged key")?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
            .with_client_auth_cert(chain, key)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = match tokio::time::timeout(STEP, pod.netns()?.connect(None, to, 0)).await {
            Err(_) => bail!("no answer to the connect within {STEP:?}"),
            Ok(Err(e)) => bail!("the connect failed: {}", io_text(&e)),
            Ok(Ok(tcp)) => tcp,
        };
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let server = ServerName::IpAddress(to.ip().into());
        let mut tls = match tokio::time::timeout(STEP, connector.connect(server, tcp)).await {
            Err(_) => bail!("no TLS answer within {STEP:?}"),
            Ok(Err(e)) => bail!("{}", tls_text(&e)),
            Ok(Ok(tls)) => tls,
        };
        // In TLS 1.3 the server checks the client's certificate after the client is
        // done: its verdict comes as the first thing it sends.
        let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
        let mut first = [0u8; 9];
        match tokio::time::timeout(STEP, tls.read_exact(&mut first)).await {
            Err(_) => bail!("no answer within {STEP:?}"),
            Ok(Err(e)) => bail!("{}", tls_text(&e)),
            Ok(Ok(_)) => Ok(()),
        }
    }
}

/// A TLS failure in words: the alert the server sent, when it sent one.
fn tls_text(error: &std::io::Error) -> String {
    let alert = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>());
    match alert {
        Some(rustls::Error::AlertReceived(alert)) => {
            format!("the server sent the TLS alert {}", alert_name(*alert))
        }
        Some(other) => other.to_string(),
        None => io_text(error),
    }
}

/// An alert as RFC 8446 names it (`unknown_ca`).
fn alert_name(alert: rustls::AlertDescription) -> String {
    let mut name = String::new();
    let mut previous_lower = false;
    for c in format!("{alert:?}").chars() {
        if c.is_ascii_uppercase() && previous_lower {
            name.push('_');
        }
        previous_lower = c.is_ascii_lowercase();
        name.push(c.to_ascii_lowercase());
    }
    name
}

/// Accepts any server: the impostor does not care whom it talks to.
#[derive(Debug)]
struct AnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn run_quietly(cmd: &mut Command) -> Result<()> {
    let line: Vec<String> = cmd
        .get_args()
        .map(|arg| arg.to_string_lossy().into_owned())
        .collect();
    let out = cmd.output().context("cannot run ztunnel")?;
    if !out.status.success() {
        bail!(
            "ztunnel {} failed: {}",
            line.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// One series of a Prometheus text exposition: its labels and value.
fn series<'t>(text: &'t str, name: &str) -> Vec<(BTreeMap<&'t str, &'t str>, f64)> {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(rest) => rest.split_once("} ")?,
                None => ("", rest.strip_prefix(' ')?),
            };
            let labels = labels
                .split("\",")
                .filter_map(|pair| {
                    let (key, value) = pair.split_once("=\"")?;
                    Some((key, value.trim_end_matches('"')))
                })
                .collect();
            Some((labels, value.trim().parse().ok()?))
        })
        .collect()
}

/// The sum of `name`'s series whose labels include `wanted`.
fn sum(text: &str, name: &str, wanted: &[(&str, &str)]) -> f64 {
    series(text, name)
        .into_iter()
        .filter(|(labels, _)| wanted.iter().all(|(k, v)| labels.get(k) == Some(v)))
        .fold(0.0, |total, (_, value)| total + value)
}

/// `name`'s series that include `wanted`, summed by the values of `by`.
fn grouped(
    text: &str,
    name: &str,
    wanted: &[(&str, &str)],
    by: &[&str],
) -> BTreeMap<Vec<String>, f64> {
    let mut groups = BTreeMap::new();
    for (labels, value) in series(text, name) {
        if !wanted.iter().all(|(k, v)| labels.get(k) == Some(v)) {
            continue;
        }
        let key = by
            .iter()
            .map(|k| labels.get(k).copied().unwrap_or("-").to_string())
            .collect();
        *groups.entry(key).or_insert(0.0) += value;
    }
    groups
}

fn print_grouped(groups: &BTreeMap<Vec<String>, f64>) {
    if groups.is_empty() {
        say("    (none)");
    }
    for (key, value) in groups {
        let key = key
            .iter()
            .map(|k| if k.is_empty() { "-" } else { k.as_str() })
            .collect::<Vec<_>>()
            .join("  ");
        say(&format!("    {key:<60} {value}"));
    }
}
