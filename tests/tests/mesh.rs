//! The whole product end to end (root): two nodes of two pods made of network
//! namespaces, the real `ztunnel run` process on each node with a local config, eBPF
//! steering in the kernel, HBONE between the tunnels.
//!
//! Every test builds the same small mesh:
//! - node 0: `prod/orders` (meshed) and `finance/payments` (meshed; namespace STRICT;
//!   only orders may call it, on 9090)
//! - node 1: `default/web` (meshed, PERMISSIVE, the mesh default) and `legacy/batch`
//!   (outside the mesh)

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use ztunnel_tests::{Cluster, Mesh, Pod, PodSpec, SEED_POLICIES, contains};

const PAYMENTS_PORT: u16 = 9090;
const WEB_PORT: u16 = 8080;
/// How long any one step of an exchange may take.
const STEP: Duration = Duration::from_secs(3);

/// Dropped in field order: the tunnels stop before the namespaces go.
struct Setup {
    mesh: Mesh,
    payments: Echo,
    web: Echo,
    cluster: Cluster,
}

impl Setup {
    /// The cluster, the applications listening, and the tunnels written but not started.
    async fn new() -> Setup {
        Setup::with_settings("").await
    }

    /// The same, with `settings` added to each tunnel's config.
    async fn with_settings(settings: &str) -> Setup {
        let cluster = Cluster::builder()
            .nodes(2)
            .pods_per_node(2)
            .build()
            .expect("build the cluster");
        let specs = vec![
            PodSpec::new(cluster.pod(0, 0), "prod", "orders"),
            PodSpec::new(cluster.pod(0, 1), "finance", "payments"),
            PodSpec::new(cluster.pod(1, 0), "default", "web"),
            PodSpec::new(cluster.pod(1, 1), "legacy", "batch").unmeshed(),
        ];
        let mesh =
            Mesh::with_settings(&cluster, specs, SEED_POLICIES, settings).expect("write the mesh");
        let payments = Echo::start(cluster.pod(0, 1), PAYMENTS_PORT);
        let web = Echo::start(cluster.pod(1, 0), WEB_PORT);
        Setup {
            mesh,
            payments,
            web,
            cluster,
        }
    }

    async fn started() -> Setup {
        let mut setup = Setup::new().await;
        setup.mesh.start_all().await.expect("start the tunnels");
        setup
    }

    fn orders(&self) -> &Pod {
        self.cluster.pod(0, 0)
    }

    fn payments_pod(&self) -> &Pod {
        self.cluster.pod(0, 1)
    }

    fn web_pod(&self) -> &Pod {
        self.cluster.pod(1, 0)
    }

    fn batch(&self) -> &Pod {
        self.cluster.pod(1, 1)
    }
}

/// An echo application listening on every address of a pod; remembers what it received.
struct Echo {
    received: Arc<Mutex<Vec<u8>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Echo {
    fn start(pod: &Pod, port: u16) -> Echo {
        let netns = pod.netns().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for ip in pod.ips() {
            let listener = netns.listen(SocketAddr::new(ip, port), 0).unwrap();
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
        Echo { received, tasks }
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
    let tcp = tokio::time::timeout(STEP, netns.connect(None, to, 0))
        .await
        .with_context(|| format!("{} to {to}: no connection within {STEP:?}", from.name()))??;
    Ok(tcp)
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

/// Connects from `from` to `to`, sends `msg` and expects it echoed.
async fn exchange(from: &Pod, to: SocketAddr, msg: &[u8]) -> Result<()> {
    let mut tcp = connect(from, to).await?;
    echo_round(&mut tcp, msg)
        .await
        .with_context(|| format!("{} to {to}", from.name()))
}

async fn assert_exchange(from: &Pod, to: SocketAddr, msg: &[u8]) {
    if let Err(err) = exchange(from, to, msg).await {
        panic!("{} to {to} failed: {err:#}", from.name());
    }
}

/// Asserts the exchange fails and the application never sees the message.
async fn assert_refused(from: &Pod, to: SocketAddr, msg: &[u8], app: &Echo) {
    let result = exchange(from, to, msg).await;
    assert!(result.is_err(), "{} reached {to}", from.name());
    assert!(!app.got(msg), "{to}'s application received {msg:?}");
}

#[tokio::test]
async fn pod_traffic_is_hbone_on_the_wire_same_node_and_across_nodes_over_ipv4_and_ipv6() {
    let setup = Setup::started().await;
    let captures = [
        setup.cluster.node(0).capture().unwrap(),
        setup.cluster.node(1).capture().unwrap(),
    ];
    let mut secrets = Vec::new();
    for family in setup.orders().ips() {
        let same_node = format!("SECRET-same-node-{family}").into_bytes();
        let cross_node = format!("SECRET-cross-node-{family}").into_bytes();
        assert_exchange(
            setup.orders(),
            setup.payments_pod().addr(family, PAYMENTS_PORT),
            &same_node,
        )
        .await;
        assert_exchange(
            setup.orders(),
            setup.web_pod().addr(family, WEB_PORT),
            &cross_node,
        )
        .await;
        assert!(setup.payments.got(&same_node) && setup.web.got(&cross_node));
        secrets.extend([same_node, cross_node]);
    }
    // The control: plaintext from outside the mesh to a PERMISSIVE pod is accepted and
    // is visible on the wire, so the capture would have shown a leak.
    let control = b"PLAINTEXT-control".to_vec();
    assert_exchange(
        setup.batch(),
        SocketAddr::new(setup.web_pod().ip().into(), WEB_PORT),
        &control,
    )
    .await;
    let [node0, node1] = captures.map(|capture| capture.stop().unwrap());
    for (node, pcap) in [(0, &node0), (1, &node1)] {
        for secret in &secrets {
            assert!(
                !contains(pcap, secret),
                "node {node}: {:?} seen in plaintext on the wire",
                String::from_utf8_lossy(secret)
            );
        }
    }
    assert!(
        contains(&node1, &control),
        "the control plaintext was not captured: the capture proves nothing"
    );
    // The receiving tunnels say how the secrets arrived: mutual TLS, from orders.
    for node in [0, 1] {
        let metrics = setup.mesh.metrics(node).await.unwrap();
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("istio_tcp_connections_opened_total{")
                    && l.contains("reporter=\"destination\"")
                    && l.contains("source_principal=\"spiffe://cluster.local/ns/prod/sa/orders\"")
                    && l.contains("connection_security_policy=\"mutual_tls\"")),
            "node {node} received no mutual TLS connection from orders:\n{metrics}"
        );
    }
}

#[tokio::test]
async fn applications_see_their_own_pod_address_and_the_server_tunnel_logs_it() {
    let setup = Setup::started().await;
    let orders = setup.orders();
    for family in orders.ips() {
        for (node, to) in [
            (0, setup.payments_pod().addr(family, PAYMENTS_PORT)),
            (1, setup.web_pod().addr(family, WEB_PORT)),
        ] {
            let mut tcp = connect(orders, to).await.unwrap();
            let local = tcp.local_addr().unwrap();
            assert_eq!(
                local.ip(),
                orders.addr(family, 0).ip(),
                "to {to}: the application's local address is its pod's"
            );
            assert_eq!(tcp.peer_addr().unwrap(), to);
            echo_round(&mut tcp, format!("own-address-{to}").as_bytes())
                .await
                .unwrap();
            drop(tcp);
            // The client tunnel sent the application's address and port in `forwarded`
            // (the HBONE connection's own port differs); the server tunnel logs it.
            let wanted = format!("src.addr={local}");
            let deadline = tokio::time::Instant::now() + STEP;
            loop {
                let log = setup.mesh.log(node);
                if log
                    .lines()
                    .any(|l| l.contains("direction=\"inbound\"") && l.contains(&wanted))
                {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "node {node} logged no inbound connection with {wanted}:\n{}",
                    setup.mesh.log_tail(node)
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test]
async fn a_socket_mark_from_the_config_keeps_the_tunnels_own_connects_unsteered() {
    // Not the default (0x539): the programs must skip this mark, or every connection
    // the tunnel makes from a pod would be steered back into it.
    let mut setup = Setup::with_settings("socketMark: 0x2a\n").await;
    setup.mesh.start_all().await.expect("start the tunnels");
    for family in setup.orders().ips() {
        assert_exchange(
            setup.orders(),
            setup.payments_pod().addr(family, PAYMENTS_PORT),
            format!("mark-same-node-{family}").as_bytes(),
        )
        .await;
        assert_exchange(
            setup.orders(),
            setup.web_pod().addr(family, WEB_PORT),
            format!("mark-cross-node-{family}").as_bytes(),
        )
        .await;
    }
    // Plaintext from outside the mesh still lands on the tunnel (STRICT refuses it).
    assert_refused(
        setup.batch(),
        SocketAddr::new(setup.payments_pod().ip().into(), PAYMENTS_PORT),
        b"mark-plaintext-to-strict",
        &setup.payments,
    )
    .await;
}

#[tokio::test]
async fn plaintext_from_outside_the_mesh_is_refused_by_strict_and_accepted_by_permissive() {
    let setup = Setup::started().await;
    for family in setup.batch().ips() {
        // Cross-node to STRICT payments: the tunnel resets it before the application.
        assert_refused(
            setup.batch(),
            setup.payments_pod().addr(family, PAYMENTS_PORT),
            format!("plaintext-to-strict-{family}").as_bytes(),
            &setup.payments,
        )
        .await;
        // Same node to PERMISSIVE web: accepted.
        assert_exchange(
            setup.batch(),
            setup.web_pod().addr(family, WEB_PORT),
            format!("plaintext-to-permissive-{family}").as_bytes(),
        )
        .await;
    }
    let metrics = setup.mesh.metrics(0).await.unwrap();
    assert!(
        metrics.lines().any(|l| {
            l.starts_with("ztunnel_connections_refused_total{reason=\"strict_plaintext\"}")
                && !l.ends_with(" 0")
        }),
        "no STRICT refusal counted on node 0:\n{metrics}"
    );
}

#[tokio::test]
async fn authorization_policy_admits_only_the_allowed_identity() {
    let setup = Setup::started().await;
    for family in setup.web_pod().ips() {
        let payments = setup.payments_pod().addr(family, PAYMENTS_PORT);
        // web holds a valid mesh certificate, but only orders is allowed.
        assert_refused(
            setup.web_pod(),
            payments,
            format!("web-to-payments-{family}").as_bytes(),
            &setup.payments,
        )
        .await;
        assert_exchange(
            setup.orders(),
            payments,
            format!("orders-to-payments-{family}").as_bytes(),
        )
        .await;
    }
}

#[tokio::test]
async fn a_killed_tunnel_fails_closed_and_a_restarted_one_carries_traffic_again() {
    let mut setup = Setup::started().await;
    let web = SocketAddr::new(setup.web_pod().ip().into(), WEB_PORT);
    let payments = SocketAddr::new(setup.payments_pod().ip().into(), PAYMENTS_PORT);
    assert_exchange(setup.orders(), web, b"before-the-crash").await;

    setup.mesh.kill(0).unwrap();
    // Outbound from an enrolled pod: the connect is steered to a capture socket that
    // is gone, and refused.
    let err = connect(setup.orders(), web)
        .await
        .expect_err("orders connected with its tunnel gone");
    assert!(
        format!("{err:#}").contains("refused"),
        "not refused: {err:#}"
    );
    // Inbound to an enrolled pod: dropped, never delivered in plaintext.
    assert_refused(
        setup.batch(),
        payments,
        b"while-the-tunnel-is-away",
        &setup.payments,
    )
    .await;

    setup.mesh.start(0).await.expect("restart the tunnel");
    assert_exchange(setup.orders(), web, b"after-the-restart").await;
    assert_exchange(setup.orders(), payments, b"same-node-after-the-restart").await;
}

#[tokio::test]
async fn enrolling_a_pod_keeps_its_established_connections() {
    let mut setup = Setup::new().await;
    let web = SocketAddr::new(setup.web_pod().ip().into(), WEB_PORT);
    let mut before = connect(setup.orders(), web).await.unwrap();
    echo_round(&mut before, b"before-enrolment").await.unwrap();

    setup.mesh.start_all().await.expect("start the tunnels");
    echo_round(&mut before, b"after-enrolment")
        .await
        .expect("the connection established before enrolment broke");
    assert_exchange(setup.orders(), web, b"new-connection-after-enrolment").await;
}
