//! The audit trail and the telemetry a peer may not write: every stream the server
//! tunnel accepts ends with one access-log event and one closed count however the client
//! leaves (TCP reset mid-stream, END_STREAM then close, tunnel shutdown), and the source
//! a peer claims in `baggage` or `forwarded` is checked against what the tunnel knows.
//! Real TLS, real sockets, a raw h2 client; each test uses its own 127.0.N.0/24.

mod support;

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use ztunnel::hbone::{ClientTls, Mtls, PoolKey};
use ztunnel::identity::Identity;
use ztunnel::proxy::Config;
use ztunnel::tls;

use support::{Node, Pair, TD, id};

/// The access log of every tunnel in this test binary, as text.
fn access_log() -> &'static Mutex<Vec<u8>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let log = Arc::new(Mutex::new(Vec::new()));
        let writer = log.clone();
        tracing_subscriber::fmt()
            .with_env_filter("access=info")
            .with_ansi(false)
            .with_writer(move || Appender(writer.clone()))
            .init();
        log
    })
}

struct Appender(Arc<Mutex<Vec<u8>>>);

impl Write for Appender {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Access-log lines of the destination tunnel for connections to `destination`.
fn logged(destination: SocketAddr) -> Vec<String> {
    let text = String::from_utf8_lossy(&access_log().lock().unwrap()).into_owned();
    let dst = format!("dst.addr={destination} ");
    text.lines()
        .filter(|l| l.contains("connection complete") && l.contains("direction=\"inbound\""))
        .filter(|l| l.contains(&dst))
        .map(str::to_owned)
        .collect()
}

/// Sum of the values of the series of `metric` reported by the destination.
fn destination_sum(node: &Node, metric: &str) -> u64 {
    let prefix = format!("{metric}{{reporter=\"destination\"");
    node.metrics_text()
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

fn opened(node: &Node) -> u64 {
    destination_sum(node, "istio_tcp_connections_opened_total")
}

fn closed(node: &Node) -> u64 {
    destination_sum(node, "istio_tcp_connections_closed_total")
}

/// Waits until the server has closed every connection it opened (5 s at most).
async fn settled(node: &Node) {
    for _ in 0..100 {
        if opened(node) == closed(node) && node.proxy.metrics().open_count() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An application on the server workload that reports every chunk it reads and, after
/// the client's end, keeps its side open (10 s at most) until the tunnel ends it.
async fn reporting_app(pair: &Pair) -> (SocketAddr, mpsc::UnboundedReceiver<Vec<u8>>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let addr = pair
        .app(move |mut tcp: TcpStream| {
            let tx = tx.clone();
            async move {
                let mut buf = [0u8; 1024];
                while let Ok(n @ 1..) = tcp.read(&mut buf).await {
                    let _ = tx.send(buf[..n].to_vec());
                }
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        })
        .await;
    (addr, rx)
}

/// An mTLS connection as the client workload to the server tunnel; with `reset`, its
/// TCP is reset (SO_LINGER 0) rather than closed when dropped.
async fn client_tls(pair: &Pair, reset: bool) -> ClientTls {
    let certs = pair.pki.node_certificates(&[&pair.client_identity]);
    let mtls = Mtls::new(
        certs,
        pair.pki.trust.clone(),
        TD,
        Duration::from_secs(5),
        tls::Metrics::default(),
    );
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(pair.client_ip, 0)).unwrap();
    if reset {
        // Linger 0: the close is a reset, and never blocks.
        socket2::SockRef::from(&socket)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
    }
    let tcp = socket.connect(pair.hbone).await.unwrap();
    mtls.connect(tcp, &pair.key()).await.unwrap()
}

/// Opens one CONNECT stream to `target` on a fresh HBONE connection, sends `data`
/// (ending the stream when `end`), waits until the application has it, then drops the
/// whole connection at once.
async fn stream_then_drop(
    pair: &Pair,
    target: SocketAddr,
    app: &mut mpsc::UnboundedReceiver<Vec<u8>>,
    end: bool,
) {
    let (mut send, connection) = h2::client::handshake(client_tls(pair, !end).await)
        .await
        .unwrap();
    let driver = tokio::spawn(connection);
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string())
        .body(())
        .unwrap();
    let (response, mut stream) = send.send_request(request, false).unwrap();
    assert_eq!(response.await.unwrap().status(), StatusCode::OK);
    stream.send_data(Bytes::from_static(b"data"), end).unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), app.recv())
        .await
        .expect("the application reads the data within 5 s");
    assert_eq!(got.as_deref(), Some(&b"data"[..]));
    driver.abort();
    let _ = driver.await;
}

#[tokio::test]
async fn streams_cut_by_a_tcp_reset_are_logged_and_counted_closed() {
    access_log();
    let pair = Pair::new(141, Config::default()).await;
    let (target, mut app) = reporting_app(&pair).await;
    for _ in 0..25 {
        stream_then_drop(&pair, target, &mut app, false).await;
    }
    settled(&pair.server).await;
    assert_eq!(opened(&pair.server), 25);
    assert_eq!(closed(&pair.server), 25, "{}", pair.server.metrics_text());
    assert_eq!(pair.server.proxy.metrics().open_count(), 0);
    let lines = logged(target);
    assert_eq!(lines.len(), 25, "{lines:#?}");
    assert!(lines.iter().all(|l| l.contains(" error=\"")), "{lines:#?}");
}

#[tokio::test]
async fn end_stream_then_close_is_logged_and_counted_closed() {
    access_log();
    let pair = Pair::new(142, Config::default()).await;
    let (target, mut app) = reporting_app(&pair).await;
    for _ in 0..25 {
        stream_then_drop(&pair, target, &mut app, true).await;
    }
    settled(&pair.server).await;
    assert_eq!(opened(&pair.server), 25);
    assert_eq!(closed(&pair.server), 25, "{}", pair.server.metrics_text());
    assert_eq!(pair.server.proxy.metrics().open_count(), 0);
    assert_eq!(logged(target).len(), 25);
}

#[tokio::test]
async fn open_gauge_follows_and_shutdown_logs_what_it_aborts() {
    access_log();
    let pair = Pair::new(143, Config::default()).await;
    let (target, mut app) = reporting_app(&pair).await;
    let mut held = Vec::new();
    for i in 1..=5u64 {
        let mut tcp = pair.connect(target).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut tcp, b"hi")
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), app.recv())
            .await
            .unwrap();
        held.push(tcp);
        let metrics = pair.server.proxy.metrics();
        assert_eq!(metrics.open_count(), i as i64);
        assert_eq!(opened(&pair.server) - closed(&pair.server), i);
    }
    // The server tunnel shuts down with no grace: every stream task is cut short.
    pair.server.proxy.drain_handle().drain(Duration::ZERO).await;
    assert_eq!(opened(&pair.server), 5);
    assert_eq!(closed(&pair.server), 5);
    assert_eq!(pair.server.proxy.metrics().open_count(), 0);
    let lines = logged(target);
    assert_eq!(lines.len(), 5, "{lines:#?}");
}

/// A raw HBONE client as the workload `identity` at `ip` (held by `pair`'s CA).
async fn raw_client(
    pair: &Pair,
    ip: IpAddr,
    identity: &Identity,
) -> h2::client::SendRequest<Bytes> {
    let certs = pair.pki.node_certificates(&[identity]);
    let mtls = Mtls::new(
        certs,
        pair.pki.trust.clone(),
        TD,
        Duration::from_secs(5),
        tls::Metrics::default(),
    );
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(ip, 0)).unwrap();
    let tcp = socket.connect(pair.hbone).await.unwrap();
    let key = PoolKey {
        source_identity: identity.clone(),
        source_ip: ip,
        ..pair.key()
    };
    let tls = mtls.connect(tcp, &key).await.unwrap();
    let (send, connection) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(connection);
    send
}

/// One CONNECT to `target` with `headers`, a byte echoed and the stream ended; returns
/// the 200 answer's headers.
async fn echoed(
    send: &mut h2::client::SendRequest<Bytes>,
    target: SocketAddr,
    headers: &[(&str, &str)],
) -> http::HeaderMap {
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let (response, mut stream) = send.send_request(request.body(()).unwrap(), false).unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    stream.send_data(Bytes::from_static(b"x"), true).unwrap();
    let (head, mut body) = response.into_parts();
    let mut got = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got, b"x");
    head.headers
}

/// Waits until `done` holds (5 s at most); false when it never did.
async fn eventually(done: impl Fn() -> bool) -> bool {
    for _ in 0..100 {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done()
}

/// The series of `istio_tcp_connections_opened_total` of the destination.
fn opened_series(node: &Node) -> Vec<String> {
    node.metrics_text()
        .lines()
        .filter(|l| l.starts_with("istio_tcp_connections_opened_total{reporter=\"destination\""))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn unique_baggage_does_not_grow_the_series() {
    let pair = Pair::new(144, Config::default()).await;
    let mut send = raw_client(&pair, pair.client_ip, &pair.client_identity).await;
    let answer = echoed(&mut send, pair.echo, &[]).await;
    assert_eq!(
        answer["baggage"], "k8s.namespace.name=back,k8s.deployment.name=server,service.name=server",
        "the 200 carries the destination's baggage"
    );
    let before = opened_series(&pair.server);
    assert_eq!(before.len(), 1, "{before:#?}");
    for i in 0..1000 {
        let baggage = format!("k8s.namespace.name=front,k8s.deployment.name=w{i}");
        echoed(&mut send, pair.echo, &[("baggage", &baggage)]).await;
    }
    let after = opened_series(&pair.server);
    assert_eq!(after.len(), 1, "{after:#?}");
    assert!(
        after[0].contains("source_workload=\"client\",source_workload_namespace=\"front\"")
            && after[0].ends_with(" 1001"),
        "the state's name wins: {after:#?}"
    );
    assert_eq!(pair.server.proxy.metrics().series_dropped(), 0);
}

#[tokio::test]
async fn baggage_must_agree_with_the_spiffe_namespace() {
    let pair = Pair::new(145, Config::default()).await;
    // A peer with a valid certificate that the state does not know.
    let stranger = id("other", "stranger");
    let ip: IpAddr = "127.0.145.5".parse().unwrap();
    let mut send = raw_client(&pair, ip, &stranger).await;
    let forged = "k8s.namespace.name=kube-system,k8s.deployment.name=admin";
    echoed(&mut send, pair.echo, &[("baggage", forged)]).await;
    // Istio's client sends the namespace alone.
    echoed(
        &mut send,
        pair.echo,
        &[("baggage", "k8s.namespace.name=other")],
    )
    .await;
    let series = opened_series(&pair.server);
    let principal = "source_principal=\"spiffe://cluster.local/ns/other/sa/stranger\"";
    let of = |workload: &str, namespace: &str| {
        let labels = format!(
            "source_workload=\"{workload}\",source_workload_namespace=\"{namespace}\",{principal}"
        );
        series
            .iter()
            .any(|l| l.contains(&labels) && l.ends_with(" 1"))
    };
    assert!(
        of("unknown", "unknown"),
        "forged baggage ignored: {series:#?}"
    );
    assert!(of("unknown", "other"), "namespace filled: {series:#?}");
    assert!(
        !series
            .iter()
            .any(|l| l.contains("kube-system") || l.contains("admin")),
        "{series:#?}"
    );
}

#[tokio::test]
async fn series_are_capped_and_removed_with_their_workload() {
    let config = Config {
        max_metric_series: 3,
        ..Config::default()
    };
    let pair = Pair::new(146, config).await;
    let stranger = id("other", "stranger");
    let ip: IpAddr = "127.0.146.5".parse().unwrap();
    let mut send = raw_client(&pair, ip, &stranger).await;
    for i in 0..20 {
        let baggage = format!("k8s.namespace.name=other,k8s.deployment.name=w{i}");
        echoed(&mut send, pair.echo, &[("baggage", &baggage)]).await;
    }
    let metrics = pair.server.proxy.metrics();
    assert_eq!(metrics.series_dropped(), 17);
    assert_eq!(metrics.series_count(), 4, "3 and the overflow series");
    pair.server
        .assert_metric("ztunnel_metric_series_dropped_total 17");

    // A workload the state knows, then forgets.
    let pair = Pair::new(147, Config::default()).await;
    let batch = id("jobs", "batch");
    let ip: IpAddr = "127.0.147.5".parse().unwrap();
    pair.mesh.add_workload("batch", batch.clone(), ip);
    let mut send = raw_client(&pair, ip, &batch).await;
    echoed(&mut send, pair.echo, &[]).await;
    let named = |node: &Node| {
        opened_series(node)
            .iter()
            .any(|l| l.contains("source_workload=\"batch\""))
    };
    assert!(named(&pair.server));
    pair.mesh.remove_workload(ip);
    let mut other = raw_client(&pair, pair.client_ip, &pair.client_identity).await;
    echoed(&mut other, pair.echo, &[]).await;
    assert!(
        eventually(|| !named(&pair.server)).await,
        "{}",
        pair.server.metrics_text()
    );
}

#[tokio::test]
async fn forwarded_is_trusted_only_for_the_peers_own_address() {
    access_log();
    let pair = Pair::new(148, Config::default()).await;
    let mut send = raw_client(&pair, pair.client_ip, &pair.client_identity).await;
    echoed(&mut send, pair.echo, &[("forwarded", "for=\"6.6.6.6:1\"")]).await;
    echoed(
        &mut send,
        pair.echo,
        &[("forwarded", "for=\"127.0.148.2:4242\"")],
    )
    .await;
    assert!(eventually(|| logged(pair.echo).len() == 2).await);
    let lines = logged(pair.echo);
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert!(!lines.iter().any(|l| l.contains("6.6.6.6")), "{lines:#?}");
    assert!(lines[0].contains("src.addr=127.0.148.2:"), "{lines:#?}");
    assert!(
        lines[1].contains("src.addr=127.0.148.2:4242 "),
        "{lines:#?}"
    );

    // A configured trusted proxy may name another address.
    let config = Config {
        trusted_proxies: vec![id("front", "client")],
        ..Config::default()
    };
    let pair = Pair::new(149, config).await;
    let mut send = raw_client(&pair, pair.client_ip, &pair.client_identity).await;
    echoed(&mut send, pair.echo, &[("forwarded", "for=\"10.9.8.7:1\"")]).await;
    assert!(eventually(|| logged(pair.echo).len() == 1).await);
    let lines = logged(pair.echo);
    assert!(lines[0].contains("src.addr=10.9.8.7:1 "), "{lines:#?}");
}
