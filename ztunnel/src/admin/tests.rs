use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing_subscriber::layer::SubscriberExt;

use super::*;
use crate::config;

/// Sends one HTTP/1.1 request and returns the status code and the body.
async fn request(addr: SocketAddr, method: &str, target: &str) -> (u16, String) {
    request_from(None, addr, method, target).await
}

/// [`request`] from a socket bound to `source`.
async fn request_from(
    source: Option<std::net::IpAddr>,
    addr: SocketAddr,
    method: &str,
    target: &str,
) -> (u16, String) {
    let exchange = async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        if let Some(source) = source {
            socket.bind(SocketAddr::new(source, 0)).unwrap();
        }
        let mut s = socket.connect(addr).await.unwrap();
        let req =
            format!("{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).await.unwrap();
        raw
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("admin server answered in time");
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {raw:?}"));
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn loopback() -> Addresses {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    Addresses {
        admin: any,
        readiness: any,
        metrics: any,
    }
}

const CONFIG: &str = r#"
node: node-a
workloads:
- {name: payments, namespace: finance, serviceAccount: payments, ips: [10.0.1.10], labels: {app: payments}}
policies:
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: charge-http, namespace: finance}
  spec:
    selector: {matchLabels: {app: payments}}
    rules:
    - to:
      - operation: {methods: [POST]}
- apiVersion: security.istio.io/v1
  kind: PeerAuthentication
  metadata: {name: strict, namespace: finance}
  spec: {mtls: {mode: STRICT}}
"#;

#[tokio::test]
async fn endpoints_serve_dump_logging_readiness_and_metrics() {
    let (layer, log) = LogControl::layer("info").unwrap();
    let _subscriber = tracing_subscriber::registry().with(layer);
    let state = State::new();
    let readiness = Readiness::new();
    let certificates_pending = readiness.register("certificates");
    let mut registry = Registry::default();
    let counter = Counter::<u64>::default();
    registry.register("test_events", "Events seen by the test", counter.clone());
    counter.inc();
    let certificates: CertificateDump = Arc::new(
        || serde_json::json!([{"identity": "spiffe://cluster.local/ns/finance/sa/payments", "serial": "01"}]),
    );
    let servers = serve(
        loopback(),
        Admin {
            state: state.clone(),
            registry: Arc::new(registry),
            log,
            certificates,
            readiness: readiness.clone(),
        },
    )
    .await
    .unwrap();

    let (code, body) = request(servers.readiness, "GET", "/healthz/ready").await;
    assert_eq!(
        (code, body.as_str()),
        (503, "not ready: waiting for config, certificates\n")
    );
    let cfg = config::parse(std::path::Path::new("config.yaml"), CONFIG).unwrap();
    state.publish(cfg.resources);
    let (code, body) = request(servers.readiness, "GET", "/healthz/ready").await;
    assert_eq!(
        (code, body.as_str()),
        (503, "not ready: waiting for certificates\n")
    );
    certificates_pending.ready();
    assert_eq!(
        request(servers.readiness, "GET", "/healthz/ready").await,
        (200, "ready\n".to_string())
    );

    let (code, body) = request(servers.admin, "GET", "/config_dump").await;
    assert_eq!(code, 200);
    let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        dump["workloads"][0]["identity"],
        "spiffe://cluster.local/ns/finance/sa/payments"
    );
    assert_eq!(dump["mtlsModes"]["finance/payments"]["mode"], "STRICT");
    assert_eq!(
        dump["mtlsModes"]["finance/payments"]["source"]["policy"]["name"],
        "strict"
    );
    assert_eq!(dump["certificates"][0]["serial"], "01");
    let warning = dump["policies"][0]["warnings"][0].as_str().unwrap();
    assert!(warning.contains("[to[0].operation.methods]"), "{warning}");
    assert!(warning.contains("never matches"), "{warning}");

    let (code, body) = request(servers.metrics, "GET", "/metrics").await;
    assert_eq!(code, 200);
    assert!(body.contains("test_events_total 1"), "{body}");
    assert!(body.ends_with("# EOF\n"), "{body}");

    assert_eq!(
        request(servers.admin, "GET", "/logging").await,
        (200, "info\n".to_string())
    );
    let (code, body) = request(
        servers.admin,
        "POST",
        "/logging?level=info%2Cztunnel%3A%3Apolicy%3Ddebug",
    )
    .await;
    assert_eq!(
        (code, body.as_str()),
        (200, "log filter set to info,ztunnel::policy=debug\n")
    );
    let (_, body) = request(servers.admin, "GET", "/logging").await;
    assert!(body.contains("ztunnel::policy=debug"), "{body}");
    let (code, body) = request(servers.admin, "POST", "/logging?level=%3D%3D").await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("log filter \"==\" is invalid"), "{body}");
    assert_eq!(request(servers.admin, "POST", "/logging").await.0, 400);

    assert_eq!(
        request(servers.admin, "DELETE", "/config_dump").await.0,
        405
    );
    let (code, body) = request(servers.metrics, "GET", "/config_dump").await;
    assert_eq!(code, 404);
    assert!(body.contains("this server has: GET /metrics"), "{body}");
}

#[tokio::test]
async fn a_taken_address_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut addresses = loopback();
    addresses.metrics = taken.local_addr().unwrap();
    let (_layer, log) = LogControl::layer("info").unwrap();
    let err = serve(
        addresses,
        Admin {
            state: State::new(),
            registry: Arc::new(Registry::default()),
            log,
            certificates: Arc::new(|| serde_json::Value::Null),
            readiness: Readiness::new(),
        },
    )
    .await
    .err()
    .expect("bind fails");
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!(
            "cannot listen for the metrics server on {}",
            addresses.metrics
        )),
        "{msg}"
    );
}

/// `POST /logging` changes what the tunnel logs: it is refused (403) unless it comes from
/// loopback, even when the admin server listens elsewhere. Runs in a network namespace
/// of its own (root) where 10.77.0.1 is a local, non-loopback address.
#[test]
fn post_logging_is_refused_unless_from_loopback() {
    let outcome = std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("a network namespace of the test's own (the test needs root)");
        for args in [
            &["link", "set", "lo", "up"][..],
            &["addr", "add", "10.77.0.1/32", "dev", "lo"],
        ] {
            let status = std::process::Command::new("ip")
                .args(args)
                .status()
                .unwrap();
            assert!(status.success(), "ip {args:?}: {status}");
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (_layer, log) = LogControl::layer("info").unwrap();
            let any: SocketAddr = "0.0.0.0:0".parse().unwrap();
            let servers = serve(
                Addresses {
                    admin: any,
                    readiness: "127.0.0.1:0".parse().unwrap(),
                    metrics: "127.0.0.1:0".parse().unwrap(),
                },
                Admin {
                    state: State::new(),
                    registry: Arc::new(Registry::default()),
                    log: log.clone(),
                    certificates: Arc::new(|| serde_json::Value::Null),
                    readiness: Readiness::new(),
                },
            )
            .await
            .unwrap();
            let outside: std::net::IpAddr = "10.77.0.1".parse().unwrap();
            let admin = SocketAddr::new(outside, servers.admin.port());
            let (code, body) =
                request_from(Some(outside), admin, "POST", "/logging?level=trace").await;
            assert_eq!(code, 403, "{body}");
            assert!(
                body.contains("loopback only") && body.contains("10.77.0.1"),
                "{body}"
            );
            assert_eq!(log.current().unwrap(), "info");
            // Reading is allowed from anywhere the server is reachable.
            let (code, _) = request_from(Some(outside), admin, "GET", "/logging").await;
            assert_eq!(code, 200);
            let local = SocketAddr::new("127.0.0.1".parse().unwrap(), servers.admin.port());
            let (code, body) = request(local, "POST", "/logging?level=debug").await;
            assert_eq!(code, 200, "{body}");
            assert_eq!(log.current().unwrap(), "debug");
        });
    })
    .join();
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}
