//! Per-request HTTP enforcement in the destination tunnel, over real sockets and real
//! mTLS on loopback: the client workload's connection is captured by the client tunnel
//! (SOCKS5), carried over HBONE, and served as HTTP by the server tunnel in front of a
//! hyper application that records every request it sees. Each test uses its own
//! 127.0.N.0/24.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use ztunnel::proxy::{Config, RefusedReason};

use support::{Pair, round_trip};

/// Requests the application saw, as `METHOD path`.
type Seen = Arc<Mutex<Vec<String>>>;

/// The application: HTTP/1.1 and HTTP/2, answers `200 ok <path>` (gRPC: status 0 in
/// trailers), and switches `Upgrade: echo` requests to an echo of the raw bytes.
async fn app(pair: &Pair) -> (SocketAddr, Seen) {
    let seen = Seen::default();
    let recorded = seen.clone();
    let addr = pair
        .app(move |tcp| {
            let seen = recorded.clone();
            async move {
                let service = hyper::service::service_fn(move |request| {
                    let seen = seen.clone();
                    async move { Ok::<_, Infallible>(answer(request, &seen).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(tcp), service)
                    .await;
            }
        })
        .await;
    (addr, seen)
}

type AppBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn answer(mut request: Request<Incoming>, seen: &Seen) -> Response<AppBody> {
    seen.lock()
        .unwrap()
        .push(format!("{} {}", request.method(), request.uri().path()));
    if request.headers().contains_key(http::header::UPGRADE) {
        let upgrade = hyper::upgrade::on(&mut request);
        tokio::spawn(async move {
            let mut io = TokioIo::new(upgrade.await.expect("upgraded"));
            let mut buf = [0u8; 1024];
            while let Ok(n @ 1..) = io.read(&mut buf).await {
                if io.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
        return Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "echo")
            .body(Empty::new().boxed())
            .unwrap();
    }
    let grpc = request
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let path = request.uri().path().to_owned();
    let body = request.into_body().collect().await.expect("request body");
    assert!(body.to_bytes().len() < 1024 * 1024);
    if grpc {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let frames = futures::stream::iter([
            Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from_static(b"\0\0\0\0\0"))),
            Ok(hyper::body::Frame::trailers(trailers)),
        ]);
        return Response::builder()
            .header("content-type", "application/grpc")
            .body(http_body_util::StreamBody::new(frames).boxed())
            .unwrap();
    }
    Response::new(Full::new(Bytes::from(format!("ok {path}"))).boxed())
}

/// An HTTP/1.1 client on one connection captured by the client tunnel.
async fn http1(
    pair: &Pair,
    app: SocketAddr,
) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let tcp = pair.connect(app).await.expect("captured connection");
    let (send, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(connection);
    send
}

async fn get(
    send: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    path: &str,
) -> (StatusCode, String) {
    send.ready().await.expect("connection still usable");
    let request = Request::get(path)
        .header("host", "payments")
        .body(Full::default())
        .unwrap();
    let response = send.send_request(request).await.expect("response");
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn keep_alive_connection_allowed_denied_allowed() {
    let pair = Pair::new(60, Config::default()).await;
    let (app, seen) = app(&pair).await;
    pair.mesh.deny_path(app, "/refund");
    let mut send = http1(&pair, app).await;
    assert_eq!(
        get(&mut send, "/charge").await,
        (StatusCode::OK, "ok /charge".into())
    );
    assert_eq!(
        get(&mut send, "/refund").await,
        (StatusCode::FORBIDDEN, "RBAC: access denied".into())
    );
    assert_eq!(
        get(&mut send, "/charge/2").await,
        (StatusCode::OK, "ok /charge/2".into())
    );
    assert_eq!(*seen.lock().unwrap(), ["GET /charge", "GET /charge/2"]);
    let metrics = pair.server.proxy.metrics();
    assert_eq!(metrics.refused_count(RefusedReason::RequestDenied), 1);
    let labels = "reporter=\"destination\",source_workload=\"client\",source_workload_namespace=\"front\",source_principal=\"spiffe://cluster.local/ns/front/sa/client\",destination_workload=\"server\",destination_workload_namespace=\"back\",destination_principal=\"spiffe://cluster.local/ns/back/sa/server\",connection_security_policy=\"mutual_tls\",request_protocol=\"http\"";
    pair.server.assert_metric(&format!(
        "istio_requests_total{{{labels},response_code=\"200\",grpc_response_status=\"-\",response_flags=\"-\"}} 2"
    ));
    pair.server.assert_metric(&format!(
        "istio_requests_total{{{labels},response_code=\"403\",grpc_response_status=\"-\",response_flags=\"-\"}} 1"
    ));
    pair.server.assert_metric(&format!(
        "istio_request_duration_milliseconds_count{{{labels},response_code=\"200\",grpc_response_status=\"-\",response_flags=\"-\"}} 2"
    ));
}

#[tokio::test]
async fn policy_edit_applies_to_the_next_request_of_an_open_connection() {
    let pair = Pair::new(61, Config::default()).await;
    let (app, seen) = app(&pair).await;
    pair.mesh.deny_path(app, "/admin");
    let mut send = http1(&pair, app).await;
    assert_eq!(get(&mut send, "/charge").await.0, StatusCode::OK);
    pair.mesh.deny_path(app, "/charge");
    assert_eq!(get(&mut send, "/charge").await.0, StatusCode::FORBIDDEN);
    assert_eq!(get(&mut send, "/other").await.0, StatusCode::OK);
    assert_eq!(*seen.lock().unwrap(), ["GET /charge", "GET /other"]);
}

#[tokio::test]
async fn h2c_and_grpc() {
    let pair = Pair::new(62, Config::default()).await;
    let (app, seen) = app(&pair).await;
    pair.mesh.deny_path(app, "/pkg.Service/Denied");
    let tcp = pair.connect(app).await.expect("captured connection");
    let (mut send, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2c prior-knowledge handshake");
    tokio::spawn(connection);
    let grpc = |path: &str| {
        Request::post(format!("http://payments{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
            .unwrap()
    };

    let response = send
        .send_request(
            Request::get("http://payments/charge")
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), http::Version::HTTP_2);

    let response = send
        .send_request(grpc("/pkg.Service/Method"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap();
    assert_eq!(body.trailers().unwrap()["grpc-status"], "0");

    let response = send
        .send_request(grpc("/pkg.Service/Denied"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["grpc-status"], "7");
    assert_eq!(response.headers()["grpc-message"], "RBAC: access denied");

    assert_eq!(
        *seen.lock().unwrap(),
        ["GET /charge", "POST /pkg.Service/Method"]
    );
    let labels = "reporter=\"destination\",source_workload=\"client\",source_workload_namespace=\"front\",source_principal=\"spiffe://cluster.local/ns/front/sa/client\",destination_workload=\"server\",destination_workload_namespace=\"back\",destination_principal=\"spiffe://cluster.local/ns/back/sa/server\",connection_security_policy=\"mutual_tls\",request_protocol=\"grpc\"";
    pair.server.assert_metric(&format!(
        "istio_requests_total{{{labels},response_code=\"200\",grpc_response_status=\"0\",response_flags=\"-\"}} 1"
    ));
    pair.server.assert_metric(&format!(
        "istio_requests_total{{{labels},response_code=\"200\",grpc_response_status=\"7\",response_flags=\"-\"}} 1"
    ));
}

/// Sends `bytes` on a fresh captured connection and returns what came back until the
/// tunnel closed it.
async fn raw(pair: &Pair, app: SocketAddr, bytes: &[u8]) -> String {
    let mut tcp = pair.connect(app).await.expect("captured connection");
    tcp.write_all(bytes).await.expect("write");
    read_to_close(&mut tcp).await
}

async fn read_to_close(tcp: &mut TcpStream) -> String {
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut back))
        .await
        .expect("closed within 5 s")
        .expect("read");
    String::from_utf8_lossy(&back).into_owned()
}

#[tokio::test]
async fn malformed_http_is_refused_and_never_reaches_the_application() {
    let pair = Pair::new(63, Config::default()).await;
    let (app, seen) = app(&pair).await;
    pair.mesh.deny_path(app, "/admin");
    let big = format!(
        "GET / HTTP/1.1\r\nhost: payments\r\nx-big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let many: String = (0..=100).map(|i| format!("x-{i}: v\r\n")).collect();
    let many = format!("GET / HTTP/1.1\r\nhost: payments\r\n{many}\r\n");
    let cases: [(&str, &[u8]); 8] = [
        ("invalid request line", b"GET / HTTP/1.1 extra\r\nhost: payments\r\n\r\n"),
        ("header block over the limit", big.as_bytes()),
        ("more than 100 header fields", many.as_bytes()),
        (
            "obs-fold",
            b"GET / HTTP/1.1\r\nhost: payments\r\nx-folded: a\r\n b\r\n\r\n",
        ),
        (
            "invalid chunk size",
            b"POST / HTTP/1.1\r\nhost: payments\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
        ),
        // Both framings: refused whichever comes first, so that no reading of the
        // request other than the tunnel's can smuggle the pipelined one after it.
        (
            "Content-Length then Transfer-Encoding",
            b"POST /both HTTP/1.1\r\nhost: payments\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nhost: payments\r\n\r\n",
        ),
        (
            "Transfer-Encoding then Content-Length",
            b"POST /both HTTP/1.1\r\nhost: payments\r\nTransfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nhost: payments\r\n\r\n",
        ),
        (
            "both, after a good request on the same connection",
            b"GET /good HTTP/1.1\r\nhost: payments\r\n\r\nPOST /both HTTP/1.1\r\nhost: payments\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
    ];
    for (case, bytes) in cases {
        // Read until the tunnel closes the connection.
        let answer = raw(&pair, app, bytes).await;
        let Some(last) = answer.rfind("HTTP/1.1 ") else {
            panic!("{case}: no answer");
        };
        assert!(
            answer[last..].starts_with("HTTP/1.1 400 "),
            "{case}: {answer:?}"
        );
        assert!(!answer.contains("RBAC"), "{case}: {answer:?}");
    }
    assert_eq!(*seen.lock().unwrap(), ["GET /good"]);
    let metrics = pair.server.proxy.metrics();
    assert_eq!(metrics.refused_count(RefusedReason::MalformedHttp), 8);
}

#[tokio::test]
async fn slow_headers_are_cut_off() {
    let mut config = Config::default();
    config.http.header_read_timeout = Duration::from_millis(300);
    let pair = Pair::new(64, config).await;
    let (app, seen) = app(&pair).await;
    pair.mesh.deny_path(app, "/admin");
    let mut tcp = pair.connect(app).await.expect("captured connection");
    tcp.write_all(b"GET / HTTP/1.1\r\nhost: pay").await.unwrap();
    let started = std::time::Instant::now();
    read_to_close(&mut tcp).await;
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "closed before the deadline"
    );
    assert!(seen.lock().unwrap().is_empty());
    assert_eq!(
        pair.server
            .proxy
            .metrics()
            .refused_count(RefusedReason::HeaderTimeout),
        1
    );
}

#[tokio::test]
async fn upgrade_is_decided_then_passed_through() {
    let pair = Pair::new(65, Config::default()).await;
    let (app, seen) = app(&pair).await;
    pair.mesh.deny_path(app, "/admin");

    let denied = raw(
        &pair,
        app,
        b"GET /admin/ws HTTP/1.1\r\nhost: payments\r\nconnection: upgrade\r\nupgrade: echo\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(denied.starts_with("HTTP/1.1 403 "), "{denied:?}");

    let mut tcp = pair.connect(app).await.expect("captured connection");
    tcp.write_all(
        b"GET /ws HTTP/1.1\r\nhost: payments\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        tcp.read_exact(&mut byte).await.expect("101 head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head:?}");
    round_trip(&mut tcp, b"raw bytes after the upgrade").await;
    round_trip(&mut tcp, b"GET /admin HTTP/1.1\r\n\r\n").await;
    assert_eq!(*seen.lock().unwrap(), ["GET /ws"]);
}

#[tokio::test]
async fn permissive_plaintext_is_decided_per_request() {
    let pair = Pair::new(66, Config::default()).await;
    let (app, seen) = app(&pair).await;
    pair.mesh.deny_path(app, "/admin");
    let plaintext = pair
        .server
        .serve_plaintext("127.0.66.3:0".parse().unwrap(), app);
    let tcp = TcpStream::connect(plaintext).await.unwrap();
    let (mut send, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(connection);
    assert_eq!(get(&mut send, "/a").await.0, StatusCode::OK);
    assert_eq!(get(&mut send, "/admin").await.0, StatusCode::FORBIDDEN);
    assert_eq!(get(&mut send, "/b").await.0, StatusCode::OK);
    assert_eq!(*seen.lock().unwrap(), ["GET /a", "GET /b"]);
    pair.server.assert_metric("istio_requests_total{reporter=\"destination\",source_workload=\"unknown\",source_workload_namespace=\"unknown\",source_principal=\"unknown\",destination_workload=\"server\",destination_workload_namespace=\"back\",destination_principal=\"spiffe://cluster.local/ns/back/sa/server\",connection_security_policy=\"none\",request_protocol=\"http\",response_code=\"403\",grpc_response_status=\"-\",response_flags=\"-\"} 1");
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let pair = Pair::new(67, Config::default()).await;
    let (app, seen) = app(&pair).await;
    pair.mesh.deny_path(app, "/admin");
    let answer = raw(
        &pair,
        app,
        b"GET /one HTTP/1.1\r\nhost: payments\r\n\r\nGET /admin HTTP/1.1\r\nhost: payments\r\n\r\nGET /two HTTP/1.1\r\nhost: payments\r\nconnection: close\r\n\r\n",
    )
    .await;
    let one = answer.find("ok /one").expect("first answer");
    let denied = answer.find("RBAC: access denied").expect("second answer");
    let two = answer.find("ok /two").expect("third answer");
    assert!(one < denied && denied < two, "{answer:?}");
    assert_eq!(*seen.lock().unwrap(), ["GET /one", "GET /two"]);
}

#[tokio::test]
async fn request_series_are_capped() {
    let config = Config {
        max_metric_series: 2,
        ..Config::default()
    };
    let pair = Pair::new(68, config).await;
    let (app, _seen) = app(&pair).await;
    pair.mesh.deny_path(app, "/admin");
    let mut send = http1(&pair, app).await;
    // Two series, 200 and 403 (a second 403 is counted in the same one).
    assert_eq!(get(&mut send, "/a").await.0, StatusCode::OK);
    assert_eq!(get(&mut send, "/admin").await.0, StatusCode::FORBIDDEN);
    assert_eq!(get(&mut send, "/admin/2").await.0, StatusCode::FORBIDDEN);
    let metrics = pair.server.proxy.metrics();
    assert_eq!(metrics.request_series_count(), 2);
    assert_eq!(metrics.series_dropped(), 0);

    let tcp = pair.connect(app).await.expect("captured connection");
    let (mut h2, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2c handshake");
    tokio::spawn(connection);
    // gRPC makes a third kind: counted in the overflow series.
    for _ in 0..3 {
        let response = h2
            .send_request(
                Request::post("http://payments/pkg.Service/Method")
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
                    .unwrap(),
            )
            .await
            .unwrap();
        let body = response.into_body().collect().await.unwrap();
        assert_eq!(body.trailers().unwrap()["grpc-status"], "0");
    }
    assert_eq!(metrics.series_dropped(), 3);
    assert_eq!(
        metrics.request_series_count(),
        3,
        "2 and one overflow series"
    );
    pair.server.assert_metric("istio_requests_total{reporter=\"destination\",source_workload=\"unknown\",source_workload_namespace=\"unknown\",source_principal=\"unknown\",destination_workload=\"unknown\",destination_workload_namespace=\"unknown\",destination_principal=\"unknown\",connection_security_policy=\"mutual_tls\",request_protocol=\"grpc\",response_code=\"200\",grpc_response_status=\"0\",response_flags=\"-\"} 3");
}

#[tokio::test]
async fn an_upgraded_connection_is_drained_with_the_others() {
    let pair = Pair::new(69, Config::default()).await;
    let (app, seen) = app(&pair).await;
    pair.mesh.deny_path(app, "/admin");
    // Plaintext (PERMISSIVE): once upgraded, nothing but the upgraded connection is
    // left open on the server tunnel.
    let plaintext = pair
        .server
        .serve_plaintext("127.0.69.3:0".parse().unwrap(), app);
    let mut tcp = TcpStream::connect(plaintext).await.unwrap();
    tcp.write_all(
        b"GET /ws HTTP/1.1\r\nhost: payments\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        tcp.read_exact(&mut byte).await.expect("101 head");
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101 "), "{head:?}");
    round_trip(&mut tcp, b"upgraded").await;
    assert_eq!(*seen.lock().unwrap(), ["GET /ws"]);

    let drain = pair.server.proxy.drain_handle();
    assert_eq!(
        drain.open_connections(),
        1,
        "the upgraded connection is tracked"
    );
    let draining = tokio::spawn(async move { drain.drain(Duration::from_millis(300)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !draining.is_finished(),
        "the drain waits for the upgraded connection"
    );
    round_trip(&mut tcp, b"during the grace period").await;
    tokio::time::timeout(Duration::from_secs(5), draining)
        .await
        .expect("the drain ends after its grace period")
        .unwrap();
    assert_eq!(pair.server.proxy.drain_handle().open_connections(), 0);
    let mut buf = [0u8; 16];
    let after = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
        .await
        .expect("the upgraded connection is closed by the drain");
    assert!(matches!(after, Ok(0) | Err(_)), "{after:?}");
}
