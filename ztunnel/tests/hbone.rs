//! Two tunnels in one process on loopback with real mTLS: application connections
//! captured by SOCKS5 on the client tunnel, carried as HBONE streams, delivered by the
//! server tunnel to applications. Each test uses its own 127.0.N.0/24.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use ztunnel::proxy::Config;

use support::{Pair, round_trip};

const BLOCK: usize = 1024 * 1024;

/// A deterministic block that differs per index, so lost, repeated or reordered blocks
/// change the checksum.
fn block(index: u64, buf: &mut [u8]) {
    let mut x = index.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in buf.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
}

#[tokio::test]
async fn many_connections_share_one_tls_connection() {
    let pair = Pair::new(11, Config::default()).await;
    // All start cold at once: they must share one handshake and one connection.
    let mut tasks = Vec::new();
    let (up_tx, mut up_rx) = tokio::sync::mpsc::channel(50);
    let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
    for i in 0..50u32 {
        let (echo, socks, client_ip) = (pair.echo, pair.socks, pair.client_ip);
        let (up, mut ready) = (up_tx.clone(), ready_rx.clone());
        tasks.push(tokio::spawn(async move {
            let mut tcp = support::socks5_connect(socks, client_ip, echo)
                .await
                .unwrap();
            round_trip(&mut tcp, format!("hello {i}").as_bytes()).await;
            up.send(()).await.unwrap();
            // Keep every connection open until all are up.
            ready.wait_for(|r| *r).await.unwrap();
            round_trip(&mut tcp, b"bye").await;
        }));
    }
    for _ in 0..50 {
        up_rx.recv().await.unwrap();
    }
    assert_eq!(pair.client.proxy.pool().connections(&pair.key()), 1);
    ready_tx.send(true).unwrap();
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(pair.client.proxy.pool().total_connections(), 1);
    pair.client.assert_metric("istio_tcp_connections_opened_total{reporter=\"source\",source_workload=\"client\",source_workload_namespace=\"front\",source_principal=\"spiffe://cluster.local/ns/front/sa/client\",destination_workload=\"server\",destination_workload_namespace=\"back\",destination_principal=\"spiffe://cluster.local/ns/back/sa/server\",connection_security_policy=\"mutual_tls\"} 50");
}

#[tokio::test]
async fn bulk_streams_spread_over_connections() {
    let pair = Pair::new(12, Config::default()).await;
    let mut first = pair.connect(pair.echo).await.unwrap();
    // Past the bulk threshold (1 MiB each way).
    let data = vec![7u8; 2 * BLOCK];
    round_trip(&mut first, &data).await;
    let mut second = pair.connect(pair.echo).await.unwrap();
    round_trip(&mut second, &data).await;
    assert_eq!(pair.client.proxy.pool().connections(&pair.key()), 2);
    // A chatty connection joins the least loaded one instead of opening a third.
    let mut third = pair.connect(pair.echo).await.unwrap();
    round_trip(&mut third, b"small").await;
    assert_eq!(pair.client.proxy.pool().connections(&pair.key()), 2);
    drop((first, second, third));
}

/// An application that reads to EOF, then answers with the byte count and CRC-32.
async fn checksum_app(mut tcp: TcpStream) {
    let mut hasher = crc32fast::Hasher::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; BLOCK];
    loop {
        let n = tcp.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    let mut answer = total.to_be_bytes().to_vec();
    answer.extend_from_slice(&hasher.finalize().to_be_bytes());
    tcp.write_all(&answer).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gibibyte_arrives_intact() {
    let pair = Pair::new(13, Config::default()).await;
    let app = pair.app(checksum_app).await;
    let mut tcp = pair.connect(app).await.unwrap();
    let blocks = 1024u64;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; BLOCK];
    let start = Instant::now();
    for i in 0..blocks {
        block(i, &mut buf);
        hasher.update(&buf);
        tcp.write_all(&buf).await.unwrap();
    }
    tcp.shutdown().await.unwrap();
    let mut answer = [0u8; 12];
    tcp.read_exact(&mut answer).await.unwrap();
    let received = u64::from_be_bytes(answer[..8].try_into().unwrap());
    let crc = u32::from_be_bytes(answer[8..].try_into().unwrap());
    assert_eq!(received, blocks * BLOCK as u64);
    assert_eq!(crc, hasher.finalize());
    eprintln!("1 GiB through two tunnels in {:?}", start.elapsed());
}

#[tokio::test]
async fn half_close_client_first() {
    let pair = Pair::new(14, Config::default()).await;
    // The application answers only after the client's FIN, on the same connection.
    let app = pair
        .app(|mut tcp: TcpStream| async move {
            let mut request = Vec::new();
            tcp.read_to_end(&mut request).await.unwrap();
            tcp.write_all(b"got: ").await.unwrap();
            tcp.write_all(&request).await.unwrap();
        })
        .await;
    let mut tcp = pair.connect(app).await.unwrap();
    tcp.write_all(b"question").await.unwrap();
    tcp.shutdown().await.unwrap();
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer).await.unwrap();
    assert_eq!(answer, b"got: question");
}

#[tokio::test]
async fn half_close_server_first() {
    let pair = Pair::new(15, Config::default()).await;
    // The application speaks first and closes its side, then still reads.
    let (tx, rx) = tokio::sync::oneshot::channel();
    let tx = std::sync::Mutex::new(Some(tx));
    let app = pair
        .app(move |mut tcp: TcpStream| {
            let tx = tx.lock().unwrap().take();
            async move {
                tcp.write_all(b"banner").await.unwrap();
                tcp.shutdown().await.unwrap();
                let mut rest = Vec::new();
                tcp.read_to_end(&mut rest).await.unwrap();
                tx.unwrap().send(rest).unwrap();
            }
        })
        .await;
    let mut tcp = pair.connect(app).await.unwrap();
    let mut banner = Vec::new();
    tcp.read_to_end(&mut banner).await.unwrap();
    assert_eq!(banner, b"banner");
    tcp.write_all(b"after your FIN").await.unwrap();
    tcp.shutdown().await.unwrap();
    assert_eq!(rx.await.unwrap(), b"after your FIN");
}

#[tokio::test]
async fn passthrough_for_unmeshed_destination() {
    let pair = Pair::new(16, Config::default()).await;
    // Not routed over HBONE: the test mesh passes it through as plain TCP.
    let plain = tokio::net::TcpListener::bind("127.0.16.9:0").await.unwrap();
    let addr: SocketAddr = plain.local_addr().unwrap();
    tokio::spawn(async move {
        let (tcp, _) = plain.accept().await.unwrap();
        support::echo(tcp).await;
    });
    let mut tcp = pair.connect(addr).await.unwrap();
    round_trip(&mut tcp, b"plain").await;
    assert_eq!(pair.client.proxy.pool().total_connections(), 0);
}

#[tokio::test]
async fn idle_connections_close() {
    let mut config = Config::default();
    config.pool.idle_timeout = Duration::from_millis(300);
    let pair = Pair::new(17, config).await;
    let mut tcp = pair.connect(pair.echo).await.unwrap();
    round_trip(&mut tcp, b"once").await;
    drop(tcp);
    assert_eq!(pair.client.proxy.pool().total_connections(), 1);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(pair.client.proxy.pool().total_connections(), 0);
    // And a new connection opens a new one.
    let mut tcp = pair.connect(pair.echo).await.unwrap();
    round_trip(&mut tcp, b"again").await;
}

/// An HBONE server that answers the first CONNECT with 200 and then never reads its
/// connection again (so it never answers a PING).
async fn unresponsive_server(pair: &Pair, addr: SocketAddr) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let bound = listener.local_addr().unwrap();
    let certs = pair.pki.node_certificates(&[&pair.server_identity]);
    let mtls = ztunnel::hbone::Mtls::new(
        certs,
        pair.pki.trust.clone(),
        support::TD,
        Duration::from_secs(5),
        ztunnel::tls::Metrics::default(),
    );
    let server_identity = pair.server_identity.clone();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let (tls, _) = mtls.accept(tcp, &server_identity).await.unwrap();
        let mut connection = h2::server::handshake(tls).await.unwrap();
        let (_request, mut respond) = connection.accept().await.unwrap().unwrap();
        let _stream = respond
            .send_response(http::Response::new(()), false)
            .unwrap();
        // Flush the answer, then stop driving the connection.
        let _ = tokio::time::timeout(Duration::from_millis(100), connection.accept()).await;
        tokio::time::sleep(Duration::from_secs(3600)).await;
        drop(connection);
    });
    bound
}

#[tokio::test]
async fn unanswered_pings_drop_the_connection() {
    let mut config = Config::default();
    config.pool.keepalive_interval = Duration::from_millis(200);
    config.pool.keepalive_timeout = Duration::from_millis(400);
    let pair = Pair::new(18, config).await;
    let endpoint = unresponsive_server(&pair, "127.0.18.5:0".parse().unwrap()).await;
    let target: SocketAddr = "127.0.18.5:9".parse().unwrap();
    pair.mesh.add_route(
        target,
        ztunnel::proxy::Route::Hbone {
            endpoint,
            target,
            identities: vec![pair.server_identity.clone()],
            workload: None,
        },
    );
    let mut tcp = pair.connect(target).await.unwrap();
    assert_eq!(pair.client.proxy.pool().total_connections(), 1);
    // The stream dies with its connection: the application sees a reset.
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await;
    assert!(matches!(read, Ok(Err(_))), "{read:?}");
    assert_eq!(pair.client.proxy.pool().total_connections(), 0);
}

/// Sends a SOCKS5 greeting and `request`; returns the reply code.
async fn socks_reply(pair: &Pair, greeting: &[u8], request: &[u8]) -> Vec<u8> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(pair.client_ip, 0)).unwrap();
    let mut tcp = socket.connect(pair.socks).await.unwrap();
    tcp.write_all(greeting).await.unwrap();
    tcp.write_all(request).await.unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut reply)).await;
    reply
}

#[tokio::test]
async fn socks5_refuses_what_it_does_not_speak() {
    let pair = Pair::new(19, Config::default()).await;
    // Only username/password offered: no acceptable method.
    assert_eq!(socks_reply(&pair, &[5, 1, 2], &[]).await, [5, 0xff]);
    // A domain name.
    let reply = socks_reply(
        &pair,
        &[5, 1, 0],
        &[5, 1, 0, 3, 4, b'h', b'o', b's', b't', 0, 80],
    )
    .await;
    assert_eq!(reply[..4], [5, 0, 5, 8]);
    // BIND instead of CONNECT.
    let reply = socks_reply(&pair, &[5, 1, 0], &[5, 2, 0, 1, 127, 0, 19, 3, 0, 80]).await;
    assert_eq!(reply[..4], [5, 0, 5, 7]);
    // A client that goes away in the middle of its greeting.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.19.99:0".parse().unwrap()).unwrap();
    let stranger = socket.connect(pair.socks).await.unwrap();
    drop(stranger);
    // A client address no local workload owns.
    let error = support::socks5_connect(pair.socks, "127.0.19.98".parse().unwrap(), pair.echo)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("SOCKS5 reply 2"), "{error}");
    assert_eq!(
        pair.client
            .proxy
            .metrics()
            .refused_count(ztunnel::proxy::RefusedReason::Socks),
        5
    );
}

/// Collects what the `fmt` subscriber writes.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// One thread: every task of both tunnels logs through the subscriber set here.
#[tokio::test(flavor = "current_thread")]
async fn one_access_log_event_per_connection_at_close() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_env_filter("access=info")
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let pair = Pair::new(20, Config::default()).await;
    let mut tcp = pair.connect(pair.echo).await.unwrap();
    let client_addr = tcp.local_addr().unwrap();
    round_trip(&mut tcp, b"0123456789").await;
    tcp.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tcp.read_to_end(&mut rest).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 2, "one per tunnel: {text}");
    for event in &events {
        let fields = &event["fields"];
        assert_eq!(fields["message"], "connection complete");
        assert_eq!(
            fields["src.identity"],
            "spiffe://cluster.local/ns/front/sa/client"
        );
        assert_eq!(fields["src.workload"], "client");
        assert_eq!(fields["src.namespace"], "front");
        assert_eq!(
            fields["dst.identity"],
            "spiffe://cluster.local/ns/back/sa/server"
        );
        assert_eq!(fields["dst.addr"], pair.echo.to_string());
        // The server tunnel learns the application's address from `forwarded`.
        assert_eq!(fields["src.addr"], client_addr.to_string());
        assert_eq!(fields["bytes_sent"], 10);
        assert_eq!(fields["bytes_recv"], 10);
        assert!(fields.get("error").is_none(), "{fields}");
        let duration = fields["duration"].as_str().unwrap();
        assert!(
            duration
                .strip_suffix("ms")
                .is_some_and(|ms| ms.parse::<u64>().is_ok()),
            "{duration}"
        );
    }
    let directions: Vec<&str> = events
        .iter()
        .map(|e| e["fields"]["direction"].as_str().unwrap())
        .collect();
    assert!(
        directions.contains(&"outbound") && directions.contains(&"inbound"),
        "{directions:?}"
    );
    assert!(events[0]["fields"]["traceparent"].is_string());
    assert_eq!(
        events[0]["fields"]["traceparent"],
        events[1]["fields"]["traceparent"]
    );
}

#[tokio::test]
async fn outbound_capture_listener_uses_the_original_destination() {
    let pair = Pair::new(10, Config::default()).await;
    let listener = tokio::net::TcpListener::bind("127.0.10.2:0").await.unwrap();
    let capture = listener.local_addr().unwrap();
    let source = ztunnel::proxy::LocalWorkload {
        name: "client".to_owned(),
        namespace: "front".to_owned(),
        identity: pair.client_identity.clone(),
        ip: pair.client_ip,
        netns: None,
    };
    let echo = pair.echo;
    let proxy = pair.client.proxy.clone();
    tokio::spawn(async move {
        proxy
            .serve_outbound(listener, source, move |_, _| Ok(echo))
            .await
    });
    let mut tcp = TcpStream::connect(capture).await.unwrap();
    round_trip(&mut tcp, b"captured").await;
    assert_eq!(pair.client.proxy.pool().connections(&pair.key()), 1);
}

#[tokio::test]
async fn wrong_server_identity_or_dead_endpoint_fail_cleanly() {
    let pair = Pair::new(9, Config::default()).await;
    // The server tunnel proves back/server; this route expects someone else.
    let impostor: SocketAddr = "127.0.9.3:7".parse().unwrap();
    pair.mesh.add_route(
        impostor,
        ztunnel::proxy::Route::Hbone {
            endpoint: pair.hbone,
            target: impostor,
            identities: vec![support::id("back", "someone-else")],
            workload: None,
        },
    );
    // Neither a policy nor a refused connect: reply 4, "host unreachable".
    let error = pair.connect(impostor).await.unwrap_err();
    assert!(error.to_string().contains("SOCKS5 reply 4"), "{error}");
    assert_eq!(
        pair.client.tls_metrics.failures(
            ztunnel::tls::Side::client,
            ztunnel::tls::FailureReason::identity_mismatch
        ),
        1
    );
    // Nothing listens on this HBONE endpoint.
    let gone = tokio::net::TcpListener::bind("127.0.9.4:0").await.unwrap();
    let endpoint = gone.local_addr().unwrap();
    drop(gone);
    let target: SocketAddr = "127.0.9.4:7".parse().unwrap();
    pair.mesh.add_route(
        target,
        ztunnel::proxy::Route::Hbone {
            endpoint,
            target,
            identities: vec![pair.server_identity.clone()],
            workload: None,
        },
    );
    // The peer's node refuses the connect: reply 5, "connection refused".
    let error = pair.connect(target).await.unwrap_err();
    assert!(error.to_string().contains("SOCKS5 reply 5"), "{error}");
    assert_eq!(pair.client.proxy.pool().total_connections(), 0);
    // The good route still works.
    let mut tcp = pair.connect(pair.echo).await.unwrap();
    round_trip(&mut tcp, b"fine").await;
}

#[tokio::test]
async fn a_full_connection_makes_room_on_another() {
    let mut config = Config::default();
    config.pool.max_streams_per_connection = 2;
    let pair = Pair::new(8, config).await;
    let mut open = Vec::new();
    for expected in [1, 1, 2, 2, 3] {
        let mut tcp = pair.connect(pair.echo).await.unwrap();
        round_trip(&mut tcp, b"x").await;
        open.push(tcp);
        assert_eq!(pair.client.proxy.pool().connections(&pair.key()), expected);
    }
}

/// Makes a SOCKS5 CONNECT to `destination` from `source`, from a socket owned by `uid`,
/// and returns the reply code; on success, one round trip through it.
fn socks5_as(
    uid: u32,
    socks: SocketAddr,
    source: std::net::IpAddr,
    destination: SocketAddr,
) -> std::thread::JoinHandle<std::io::Result<u8>> {
    use std::io::{Read, Write};
    std::thread::spawn(move || {
        // As a raw system call, setresuid changes this thread's credentials only (the
        // libc wrapper changes every thread of the process); the thread ends with it.
        // SAFETY: a system call with integer arguments, no memory handed over.
        let changed = unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) };
        assert_eq!(
            changed,
            0,
            "setresuid({uid}) (the test needs root): {}",
            std::io::Error::last_os_error()
        );
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.bind(&SocketAddr::new(source, 0).into())?;
        socket.connect_timeout(&socks.into(), Duration::from_secs(5))?;
        let mut tcp: std::net::TcpStream = socket.into();
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        tcp.write_all(&[5, 1, 0])?;
        let mut method = [0u8; 2];
        tcp.read_exact(&mut method)?;
        assert_eq!(method, [5, 0]);
        let SocketAddr::V4(v4) = destination else {
            panic!("an IPv4 destination")
        };
        let mut request = vec![5, 1, 0, 1];
        request.extend_from_slice(&v4.ip().octets());
        request.extend_from_slice(&v4.port().to_be_bytes());
        tcp.write_all(&request)?;
        let mut reply = [0u8; 10];
        tcp.read_exact(&mut reply)?;
        if reply[1] == 0 {
            tcp.write_all(b"ping")?;
            let mut back = [0u8; 4];
            tcp.read_exact(&mut back)?;
            assert_eq!(&back, b"ping");
        }
        Ok(reply[1])
    })
}

async fn joined(handle: std::thread::JoinHandle<std::io::Result<u8>>) -> u8 {
    tokio::task::spawn_blocking(move || handle.join())
        .await
        .unwrap()
        .expect("the SOCKS5 client thread")
        .expect("the SOCKS5 exchange")
}

/// Any local user can bind a workload's loopback address; only the tunnel's own user
/// and `socks5_allowed_uids` are served (reply 2, not allowed, and counted otherwise),
/// so another user does not get the workload's mTLS identity. Needs root (to make a
/// socket as another user).
#[tokio::test]
async fn socks5_serves_only_the_tunnels_user_and_allowed_uids() {
    const NOBODY: u32 = 65534;
    let pair = Pair::new(151, Config::default()).await;
    let refused = || {
        pair.client
            .proxy
            .metrics()
            .refused_count(ztunnel::proxy::RefusedReason::Socks)
    };
    assert_eq!(
        joined(socks5_as(NOBODY, pair.socks, pair.client_ip, pair.echo)).await,
        2,
        "another user is refused"
    );
    assert_eq!(refused(), 1);
    let mut tcp = pair.connect(pair.echo).await.unwrap();
    round_trip(&mut tcp, b"the tunnel's own user").await;
    assert_eq!(refused(), 1);

    let allowing = Pair::new(
        152,
        Config {
            socks5_allowed_uids: vec![NOBODY],
            ..Config::default()
        },
    )
    .await;
    assert_eq!(
        joined(socks5_as(
            NOBODY,
            allowing.socks,
            allowing.client_ip,
            allowing.echo
        ))
        .await,
        0,
        "an allowed user is served"
    );
    assert_eq!(
        allowing
            .client
            .proxy
            .metrics()
            .refused_count(ztunnel::proxy::RefusedReason::Socks),
        0
    );
}
