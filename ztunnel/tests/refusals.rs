//! What an authenticated HBONE peer can make the server tunnel refuse, each counted:
//! HTTP/2 it gets wrong after TLS, header blocks over the limit, floods of streams reset
//! before they are accepted, and streams reset after their upstream connect (which pace
//! that connection's upstream connects instead of letting them run unbounded). Two
//! tunnels in one process on loopback with real mTLS; the peer is the `h2` crate or
//! hand-written frames over a real TLS connection.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use ztunnel::identity::CertManager;
use ztunnel::proxy::{Config, RefusedReason, ResetBudgetConfig};
use ztunnel::tls;

use support::Pair;

/// A TLS connection to the server tunnel with the client workload's certificate; the
/// manager holding it is returned too (it must outlive the connection's handshake).
async fn tls_to_server(pair: &Pair) -> (TlsStream<TcpStream>, CertManager) {
    let certs = pair.pki.node_certificates(&[&pair.client_identity]);
    certs.fetch(&pair.client_identity).await.unwrap();
    let config = tls::client_config(
        certs.subscribe(&pair.client_identity).unwrap(),
        pair.pki.trust.clone(),
        vec![pair.server_identity.clone()],
        tls::provider(),
    )
    .unwrap();
    let tcp = TcpStream::connect(pair.hbone).await.unwrap();
    let (stream, _) = tls::connect(
        config,
        pair.hbone.ip(),
        tcp,
        Duration::from_secs(5),
        &tls::Metrics::default(),
    )
    .await
    .unwrap();
    (stream, certs)
}

async fn counted(pair: &Pair, reason: RefusedReason) -> u64 {
    let metrics = pair.server.proxy.metrics();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while metrics.refused_count(reason) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    metrics.refused_count(reason)
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const CONTINUATION: u8 = 9;
const END_HEADERS: u8 = 4;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = len.to_be_bytes()[1..].to_vec();
    f.extend([kind, flags]);
    f.extend(stream.to_be_bytes());
    f.extend(payload);
    f
}

/// An HPACK integer with a 7-bit prefix (RFC 7541, 5.1).
fn hpack_int(mut value: usize, out: &mut Vec<u8>) {
    if value < 127 {
        out.push(value as u8);
        return;
    }
    out.push(127);
    value -= 127;
    while value >= 128 {
        out.push((value % 128 + 128) as u8);
        value /= 128;
    }
    out.push(value as u8);
}

/// A header field as an HPACK literal without indexing, new name.
fn literal(name: &str, value: &[u8], out: &mut Vec<u8>) {
    out.push(0);
    hpack_int(name.len(), out);
    out.extend(name.as_bytes());
    hpack_int(value.len(), out);
    out.extend(value);
}

fn connect_block(pair: &Pair) -> Vec<u8> {
    let mut block = Vec::new();
    literal(":method", b"CONNECT", &mut block);
    literal(":authority", pair.echo.to_string().as_bytes(), &mut block);
    block
}

#[tokio::test]
async fn malformed_http2_after_tls_is_counted() {
    let pair = Pair::new(154, Config::default()).await;
    let (mut tls, _certs) = tls_to_server(&pair).await;
    tls.write_all(b"GET / HTTP/1.1\r\nHost: payments\r\n\r\n")
        .await
        .unwrap();
    tls.flush().await.unwrap();
    assert_eq!(counted(&pair, RefusedReason::MalformedHttp2).await, 1);
    pair.server
        .assert_metric("ztunnel_connections_refused_total{reason=\"malformed_http2\"} 1");
}

#[tokio::test]
async fn a_header_block_far_over_the_limit_is_counted() {
    let pair = Pair::new(155, Config::default()).await;
    let (mut tls, _certs) = tls_to_server(&pair).await;
    let mut block = connect_block(&pair);
    literal("x-filler", &vec![b'a'; 300 * 1024], &mut block);
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(SETTINGS, 0, 0, &[]));
    // In frames of the default maximum size, as a peer must send before its SETTINGS
    // are acknowledged.
    let chunks: Vec<&[u8]> = block.chunks(16 * 1024).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let kind = if i == 0 { HEADERS } else { CONTINUATION };
        let flags = if i == chunks.len() - 1 {
            END_HEADERS
        } else {
            0
        };
        bytes.extend(frame(kind, flags, 1, chunk));
    }
    // The server may close before it has read everything.
    let _ = tls.write_all(&bytes).await;
    let _ = tls.flush().await;
    assert_eq!(counted(&pair, RefusedReason::Http2Limit).await, 1);
}

#[tokio::test]
async fn streams_reset_before_they_are_accepted_are_a_counted_flood() {
    let pair = Pair::new(156, Config::default()).await;
    let (mut tls, _certs) = tls_to_server(&pair).await;
    let block = connect_block(&pair);
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(SETTINGS, 0, 0, &[]));
    // h2 lets 20 such streams go; the rest of one write is a flood.
    for i in 0..40u32 {
        let stream = 2 * i + 1;
        bytes.extend(frame(HEADERS, END_HEADERS, stream, &block));
        bytes.extend(frame(RST_STREAM, 0, stream, &8u32.to_be_bytes()));
    }
    let _ = tls.write_all(&bytes).await;
    let _ = tls.flush().await;
    let n = counted(&pair, RefusedReason::Http2Limit).await;
    assert_eq!(n, 1, "{}", pair.server.metrics_text());
}

/// A peer that resets each stream once the tunnel has connected upstream for it: the
/// first `burst` go at once, then the connection's upstream connects follow the refill
/// rate, so the application sees at most burst + rate x elapsed connects, however fast
/// the peer goes. Every reset is counted.
#[tokio::test]
async fn resets_after_the_upstream_connect_pace_further_connects() {
    const BURST: f64 = 10.0;
    const PER_SECOND: f64 = 10.0;
    const STREAMS: usize = 30;
    let pair = Pair::new(
        157,
        Config {
            reset_budget: ResetBudgetConfig {
                burst: BURST,
                per_second: PER_SECOND,
            },
            ..Config::default()
        },
    )
    .await;
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let app = pair
        .app(move |tcp| {
            count.fetch_add(1, Ordering::SeqCst);
            support::echo(tcp)
        })
        .await;
    let (tls, _certs) = tls_to_server(&pair).await;
    let (client, connection) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(connection);
    let started = Instant::now();
    for i in 0..STREAMS {
        let mut client = client.clone().ready().await.unwrap();
        let request = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(app.to_string())
            .body(())
            .unwrap();
        let (response, mut send) = client.send_request(request, false).unwrap();
        let response = tokio::time::timeout(Duration::from_secs(10), response)
            .await
            .unwrap_or_else(|_| panic!("stream {i} answered within 10 s"))
            .unwrap();
        assert_eq!(response.status(), 200, "stream {i}");
        send.send_data(Bytes::from_static(b"x"), false).unwrap();
        send.send_reset(h2::Reason::CANCEL);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let metrics = pair.server.proxy.metrics();
    tokio::time::timeout(Duration::from_secs(5), async {
        while metrics.stream_resets() < STREAMS as u64 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("every reset counted");
    assert_eq!(metrics.stream_resets(), STREAMS as u64);
    let connects = accepted.load(Ordering::SeqCst);
    assert_eq!(connects, STREAMS, "each answered stream connected once");
    // Two resets at most may be in flight when a connect is decided.
    let most = BURST + PER_SECOND * elapsed + 2.0;
    assert!(
        (connects as f64) <= most,
        "{connects} upstream connects in {elapsed:.2} s, more than {most:.1}"
    );
    assert!(metrics.connects_paced() > 0, "no connect was paced");
    pair.server
        .assert_metric(&format!("ztunnel_hbone_stream_resets_total {STREAMS}"));
}
