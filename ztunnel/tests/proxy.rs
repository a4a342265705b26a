//! The proxy's answers and limits over real sockets and real mTLS on loopback: every
//! 400/401/503 of the HBONE table, STRICT plaintext, policy changes closing open
//! connections, deadlines, the inbound cap, drain, a dying peer, and 10 000 sequential
//! connections leaving nothing behind. Each test uses its own 127.0.N.0/24.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use ztunnel::hbone::{ClientTls, Mtls};
use ztunnel::proxy::{Config, RefusedReason};
use ztunnel::tls::{self, FailureReason, Side};

use support::{Node, Pair, TD, TLS_DEADLINE, round_trip};

/// Reads until the connection ends; true when it ended with an error (reset).
async fn ends(tcp: &mut TcpStream) -> std::io::Result<()> {
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    });
    read.await.expect("connection closed within 5 s")
}

async fn tcp_from(source: std::net::IpAddr, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    socket.connect(to).await.unwrap()
}

/// An mTLS connection as the client workload to the server tunnel, outside the pool.
async fn client_tls(pair: &Pair) -> ClientTls {
    let certs = pair.pki.node_certificates(&[&pair.client_identity]);
    let mtls = Mtls::new(
        certs,
        pair.pki.trust.clone(),
        TD,
        Duration::from_secs(5),
        tls::Metrics::default(),
    );
    let tcp = tcp_from(pair.client_ip, pair.hbone).await;
    mtls.connect(tcp, &pair.key()).await.unwrap()
}

/// Sends one request on a fresh HBONE connection and returns the answer's status.
async fn status(pair: &Pair, method: Method, uri: &str) -> StatusCode {
    let (mut send, connection) = h2::client::handshake(client_tls(pair).await).await.unwrap();
    tokio::spawn(connection);
    let request = Request::builder().method(method).uri(uri).body(()).unwrap();
    let (response, _body) = send.send_request(request, false).unwrap();
    response.await.unwrap().status()
}

#[tokio::test]
async fn every_refusal_of_the_answer_table() {
    let pair = Pair::new(21, Config::default()).await;
    let echo = pair.echo.to_string();
    let metrics = pair.server.proxy.metrics();

    assert_eq!(status(&pair, Method::CONNECT, &echo).await, StatusCode::OK);

    let get = format!("http://{echo}/");
    assert_eq!(
        status(&pair, Method::GET, &get).await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        status(&pair, Method::CONNECT, "127.0.21.3").await,
        StatusCode::BAD_REQUEST,
        "authority without a port"
    );
    assert_eq!(metrics.refused_count(RefusedReason::BadRequest), 2);

    assert_eq!(
        status(&pair, Method::CONNECT, "127.0.21.9:80").await,
        StatusCode::BAD_REQUEST,
        "authority of another address"
    );
    assert_eq!(metrics.refused_count(RefusedReason::IpMismatch), 1);

    for port in [15001, 15006, 15008] {
        let uri = format!("127.0.21.3:{port}");
        assert_eq!(
            status(&pair, Method::CONNECT, &uri).await,
            StatusCode::SERVICE_UNAVAILABLE,
            "tunnel port {port}"
        );
    }
    assert_eq!(metrics.refused_count(RefusedReason::Recursive), 3);

    // Nothing listens there.
    let closed = tokio::net::TcpListener::bind("127.0.21.3:0").await.unwrap();
    let closed_addr = closed.local_addr().unwrap();
    drop(closed);
    assert_eq!(
        status(&pair, Method::CONNECT, &closed_addr.to_string()).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(metrics.refused_count(RefusedReason::UpstreamUnreachable), 1);

    pair.mesh.deny(pair.echo);
    assert_eq!(
        status(&pair, Method::CONNECT, &echo).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(metrics.refused_count(RefusedReason::Denied), 1);
}

#[tokio::test]
async fn refusals_reach_the_application_as_resets() {
    let pair = Pair::new(22, Config::default()).await;
    pair.mesh.deny(pair.echo);
    // The HBONE 401 fails the SOCKS5 CONNECT (reply 2, "not allowed by ruleset").
    let error = pair.connect(pair.echo).await.unwrap_err();
    assert!(error.to_string().contains("SOCKS5 reply 2"), "{error}");
    pair.client.assert_metric("istio_tcp_connections_closed_total{reporter=\"source\",source_workload=\"client\",source_workload_namespace=\"front\",source_principal=\"spiffe://cluster.local/ns/front/sa/client\",destination_workload=\"server\",destination_workload_namespace=\"back\",destination_principal=\"spiffe://cluster.local/ns/back/sa/server\",connection_security_policy=\"mutual_tls\"} 1");
}

/// A SOCKS5 client is told a policy refusal (reply 2, "connection not allowed by
/// ruleset": the destination tunnel's 401, or a route refused here) from a destination
/// that refused the connection (reply 5, "connection refused": the destination tunnel's
/// 503 when nothing listens behind it, or a passed-through connect refused).
#[tokio::test]
async fn socks5_replies_tell_a_policy_refusal_from_a_refused_connection() {
    let pair = Pair::new(31, Config::default()).await;
    let reply = |error: std::io::Error| {
        let text = error.to_string();
        text.strip_prefix("SOCKS5 reply ")
            .and_then(|rest| rest.split(' ').next())
            .and_then(|code| code.parse::<u8>().ok())
            .unwrap_or_else(|| panic!("not a SOCKS5 refusal: {text}"))
    };
    let closed_port = |ip| async move {
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, 0))
            .await
            .unwrap();
        listener.local_addr().unwrap()
    };

    // Over HBONE, nothing listening behind the server tunnel: its 503.
    let closed = closed_port(pair.server_ip).await;
    pair.route(closed);
    assert_eq!(reply(pair.connect(closed).await.unwrap_err()), 5);
    // Passed through (not in the mesh), nothing listening.
    let outside = closed_port("127.0.31.9".parse().unwrap()).await;
    assert_eq!(reply(pair.connect(outside).await.unwrap_err()), 5);

    // The server tunnel's policy denies it: its 401.
    pair.mesh.deny(pair.echo);
    assert_eq!(reply(pair.connect(pair.echo).await.unwrap_err()), 2);
    // The client tunnel refuses the route itself.
    let refused: SocketAddr = "127.0.31.10:80".parse().unwrap();
    pair.mesh.add_route(
        refused,
        ztunnel::proxy::Route::Refuse("a route refused by the test".to_owned()),
    );
    assert_eq!(reply(pair.connect(refused).await.unwrap_err()), 2);

    // Still serving: a refusal ends only its own request.
    let allowed = pair.app(support::echo).await;
    let mut tcp = pair.connect(allowed).await.unwrap();
    round_trip(&mut tcp, b"after the refusals").await;
}

#[tokio::test]
async fn policy_change_closes_open_connections() {
    let pair = Pair::new(23, Config::default()).await;
    let mut tcp = pair.connect(pair.echo).await.unwrap();
    round_trip(&mut tcp, b"before").await;
    pair.mesh.deny(pair.echo);
    assert!(ends(&mut tcp).await.is_err(), "closed with a reset");
}

#[tokio::test]
async fn plaintext_strict_resets_and_counts_permissive_forwards() {
    let pair = Pair::new(24, Config::default()).await;
    let plaintext = pair
        .server
        .serve_plaintext("127.0.24.3:0".parse().unwrap(), pair.echo);
    pair.mesh.set_strict(true);
    let mut tcp = tcp_from(pair.client_ip, plaintext).await;
    // A write may or may not beat the reset; the read must see the connection die.
    let _ = tcp.write_all(b"hello").await;
    assert!(ends(&mut tcp).await.is_err(), "STRICT resets");
    let metrics = pair.server.proxy.metrics();
    assert_eq!(metrics.refused_count(RefusedReason::StrictPlaintext), 1);

    pair.mesh.set_strict(false);
    let mut tcp = tcp_from(pair.client_ip, plaintext).await;
    round_trip(&mut tcp, b"permissive").await;
    tcp.shutdown().await.unwrap();
    ends(&mut tcp).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    pair.server.assert_metric("istio_tcp_received_bytes_total{reporter=\"destination\",source_workload=\"unknown\",source_workload_namespace=\"unknown\",source_principal=\"unknown\",destination_workload=\"server\",destination_workload_namespace=\"back\",destination_principal=\"spiffe://cluster.local/ns/back/sa/server\",connection_security_policy=\"none\"} 10");
}

#[tokio::test]
async fn silent_clients_are_let_go() {
    let mut config = Config::default();
    config.server.request_timeout = Duration::from_millis(300);
    let pair = Pair::new(25, config).await;

    // TCP without a TLS handshake.
    let mut silent = tcp_from(pair.client_ip, pair.hbone).await;
    let _ = ends(&mut silent).await;
    assert_eq!(
        pair.server
            .tls_metrics
            .failures(Side::server, FailureReason::timeout),
        1,
        "deadline {TLS_DEADLINE:?}"
    );

    // TLS without any HTTP/2: the server's SETTINGS arrive, then the connection ends.
    let mut tls = client_tls(&pair).await;
    let mut received = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut received));
    let _ = read.await.expect("closed within 5 s");
    assert_eq!(
        pair.server
            .proxy
            .metrics()
            .refused_count(RefusedReason::Handshake),
        2
    );
}

#[tokio::test]
async fn inbound_connections_are_capped() {
    let config = Config {
        max_inbound_connections: 1,
        ..Config::default()
    };
    let pair = Pair::new(26, config).await;
    let mut tcp = pair.connect(pair.echo).await.unwrap();
    round_trip(&mut tcp, b"holds the only slot").await;
    let mut second = tcp_from(pair.client_ip, pair.hbone).await;
    let _ = ends(&mut second).await;
    let metrics = pair.server.proxy.metrics();
    assert_eq!(metrics.refused_count(RefusedReason::ConnectionLimit), 1);
    round_trip(&mut tcp, b"still served").await;
}

#[tokio::test]
async fn drain_stops_accepting_then_closes_after_grace() {
    let pair = Pair::new(27, Config::default()).await;
    let mut open = pair.connect(pair.echo).await.unwrap();
    round_trip(&mut open, b"before").await;
    let drain = pair.client.proxy.drain_handle();
    assert_eq!(drain.open_connections(), 1);
    let draining = tokio::spawn(async move { drain.drain(Duration::from_millis(500)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(pair.connect(pair.echo).await.is_err(), "no new connections");
    round_trip(&mut open, b"during grace").await;
    tokio::time::timeout(Duration::from_secs(5), draining)
        .await
        .expect("drain ends after the grace period")
        .unwrap();
    assert!(ends(&mut open).await.is_err(), "closed with a reset");
    assert_eq!(pair.client.proxy.drain_handle().open_connections(), 0);
}

#[tokio::test]
async fn dying_peer_fails_its_streams_and_the_pool_heals() {
    let pair = Pair::new(28, Config::default()).await;
    let mut tcp = pair.connect(pair.echo).await.unwrap();
    round_trip(&mut tcp, b"alive").await;
    // The server tunnel dies: every connection of it closes at once.
    pair.server.proxy.drain_handle().drain(Duration::ZERO).await;
    assert!(
        ends(&mut tcp).await.is_err(),
        "the application sees a reset"
    );

    // A new server tunnel on the same address: new connections go through.
    let revived = Node::new(
        &pair.pki,
        pair.mesh.clone(),
        Config::default(),
        &[&pair.server_identity],
        TLS_DEADLINE,
    );
    revived.serve_inbound(pair.hbone);
    let mut tcp = pair.connect(pair.echo).await.unwrap();
    round_trip(&mut tcp, b"healed").await;
    assert_eq!(pair.client.proxy.pool().connections(&pair.key()), 1);
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn resident_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_sequential_connections_leave_nothing_behind() {
    let pair = Arc::new(Pair::new(29, Config::default()).await);
    let run = |count: usize| {
        let pair = pair.clone();
        async move {
            for i in 0..count {
                let mut tcp = pair.connect(pair.echo).await.unwrap();
                round_trip(&mut tcp, &(i as u64).to_le_bytes()).await;
                tcp.shutdown().await.unwrap();
                ends(&mut tcp).await.unwrap();
            }
        }
    };
    // Warm up: the pooled connection, allocator arenas, tracing.
    run(500).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (fds, rss) = (open_fds(), resident_kib());
    run(10_000).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (fds_after, rss_after) = (open_fds(), resident_kib());
    assert!(fds_after <= fds, "descriptors {fds} -> {fds_after}");
    assert!(
        rss_after < rss + 16 * 1024,
        "resident memory {rss} KiB -> {rss_after} KiB"
    );
    assert_eq!(pair.client.proxy.drain_handle().open_connections(), 0);
    assert_eq!(pair.client.proxy.pool().total_connections(), 1);
    let text = pair.client.metrics_text();
    let closed = text
        .lines()
        .find(|l| l.starts_with("istio_tcp_connections_closed_total{reporter=\"source\""))
        .unwrap();
    assert!(closed.ends_with(" 10500"), "{closed}");
}

#[tokio::test]
async fn huge_headers_and_garbage_do_not_hurt_the_server() {
    let pair = Pair::new(30, Config::default()).await;
    // A CONNECT with 100 KiB of headers (the server allows 64 KiB).
    let (mut send, connection) = h2::client::handshake(client_tls(&pair).await)
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(pair.echo.to_string())
        .header("x-padding", "a".repeat(100 * 1024))
        .body(())
        .unwrap();
    let answer = match send.send_request(request, false) {
        Ok((response, _)) => response.await.map(|r| r.status()),
        Err(e) => Err(e),
    };
    assert!(!matches!(answer, Ok(StatusCode::OK)), "{answer:?}");

    // Garbage instead of a TLS ClientHello.
    let mut garbage = tcp_from(pair.client_ip, pair.hbone).await;
    garbage.write_all(&[0x42; 4096]).await.unwrap();
    let _ = ends(&mut garbage).await;
    assert_eq!(
        pair.server
            .proxy
            .metrics()
            .refused_count(RefusedReason::Handshake),
        1
    );

    // Still serving.
    let mut tcp = pair.connect(pair.echo).await.unwrap();
    round_trip(&mut tcp, b"still here").await;
}
