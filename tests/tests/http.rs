//! HTTP authorization in the destination tunnel, end to end (root): two nodes made of
//! network namespaces, the real `ztunnel run` on each, eBPF steering, HBONE between the
//! tunnels, and real HTTP clients inside the client pods (curl for HTTP/1.1 and HTTP/2
//! cleartext, a hyper client for gRPC) talking to a hyper application that records
//! every request it sees.
//!
//! The mesh:
//! - node 0: `prod/orders` (meshed) and `finance/payments` (meshed, HTTP on 9090;
//!   namespace STRICT; only orders may `POST /charge`, and call `/pkg.Service/Method`)
//! - node 1: `prod/inventory` (meshed), `legacy/batch` (outside the mesh) and
//!   `default/web` (meshed, HTTP on 8080, PERMISSIVE; a DENY on `/admin*`)
//!
//! Both address families are exercised in every test.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use ztunnel_tests::{Cluster, Mesh, Pod, PodSpec};

const PAYMENTS_PORT: u16 = 9090;
const WEB_PORT: u16 = 8080;
/// How long any one exchange may take.
const STEP: Duration = Duration::from_secs(5);
const DENIED: &str = "RBAC: access denied";

/// The issue's example as Istio writes it: payments is STRICT, and only orders may
/// `POST /charge` (and call one gRPC method); web refuses `/admin*` to everyone.
const POLICIES: &str = r#"- apiVersion: security.istio.io/v1
  kind: PeerAuthentication
  metadata:
    name: strict
    namespace: finance
  spec:
    mtls:
      mode: STRICT
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata:
    name: payments-charge
    namespace: finance
  spec:
    selector:
      matchLabels:
        app: payments
    action: ALLOW
    rules:
    - from:
      - source:
          principals: ["cluster.local/ns/prod/sa/orders"]
      to:
      - operation:
          methods: ["POST"]
          paths: ["/charge"]
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata:
    name: payments-grpc
    namespace: finance
  spec:
    selector:
      matchLabels:
        app: payments
    action: ALLOW
    rules:
    - from:
      - source:
          principals: ["cluster.local/ns/prod/sa/orders"]
      to:
      - operation:
          paths: ["/pkg.Service/Method"]
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata:
    name: web-deny-admin
    namespace: default
  spec:
    selector:
      matchLabels:
        app: web
    action: DENY
    rules:
    - to:
      - operation:
          paths: ["/admin*"]
"#;

/// Dropped in field order: the tunnels stop before the namespaces go.
struct Setup {
    mesh: Mesh,
    payments: App,
    web: App,
    cluster: Cluster,
}

impl Setup {
    async fn started() -> Setup {
        let cluster = Cluster::builder()
            .nodes(2)
            .pods_per_node(3)
            .build()
            .expect("build the cluster");
        let specs = vec![
            PodSpec::new(cluster.pod(0, 0), "prod", "orders"),
            PodSpec::new(cluster.pod(0, 1), "finance", "payments").http_ports(&[PAYMENTS_PORT]),
            PodSpec::new(cluster.pod(1, 0), "prod", "inventory"),
            PodSpec::new(cluster.pod(1, 1), "legacy", "batch").unmeshed(),
            PodSpec::new(cluster.pod(1, 2), "default", "web").http_ports(&[WEB_PORT]),
        ];
        let mut mesh = Mesh::new(&cluster, specs, POLICIES).expect("write the mesh");
        let payments = App::start(cluster.pod(0, 1), PAYMENTS_PORT);
        let web = App::start(cluster.pod(1, 2), WEB_PORT);
        mesh.start_all().await.expect("start the tunnels");
        Setup {
            mesh,
            payments,
            web,
            cluster,
        }
    }

    fn orders(&self) -> &Pod {
        self.cluster.pod(0, 0)
    }

    fn payments_pod(&self) -> &Pod {
        self.cluster.pod(0, 1)
    }

    fn inventory(&self) -> &Pod {
        self.cluster.pod(1, 0)
    }

    fn batch(&self) -> &Pod {
        self.cluster.pod(1, 1)
    }

    fn web_pod(&self) -> &Pod {
        self.cluster.pod(1, 2)
    }
}

/// The application: HTTP/1.1 and HTTP/2 on every address of a pod, answering
/// `200 ok METHOD path` (gRPC: `grpc-status: 0` in trailers). Remembers every request
/// it saw as `METHOD path`.
struct App {
    seen: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl App {
    fn start(pod: &Pod, port: u16) -> App {
        let netns = pod.netns().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for ip in pod.ips() {
            let listener = netns.listen(SocketAddr::new(ip, port), 0).unwrap();
            let seen = seen.clone();
            tasks.push(tokio::spawn(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    let seen = seen.clone();
                    let service = hyper::service::service_fn(move |request| {
                        let seen = seen.clone();
                        async move { Ok::<_, Infallible>(answer(request, &seen).await) }
                    });
                    tokio::spawn(
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(tcp), service)
                            .into_owned(),
                    );
                }
            }));
        }
        App { seen, tasks }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for App {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

type AppBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn answer(request: Request<Incoming>, seen: &Mutex<Vec<String>>) -> Response<AppBody> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    seen.lock().unwrap().push(format!("{method} {path}"));
    let grpc = request
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    // The whole request is read before the answer.
    let _ = request.into_body().collect().await;
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
    Response::new(Full::new(Bytes::from(format!("ok {method} {path}"))).boxed())
}

/// Which HTTP curl speaks.
#[derive(Clone, Copy, Debug)]
enum Proto {
    Http1,
    /// HTTP/2 cleartext with prior knowledge (no upgrade).
    H2c,
}

/// One answer as curl saw it.
#[derive(Debug)]
struct Answer {
    status: u16,
    /// `1.1` or `2`.
    version: String,
    body: String,
}

/// `curl -X METHOD http://TO/PATH` from inside `from`, the path sent as written.
/// Fails when curl gets no HTTP answer (the connection was refused or reset).
async fn curl(
    from: &Pod,
    proto: Proto,
    method: &str,
    to: SocketAddr,
    path: &str,
) -> Result<Answer> {
    let url = format!("http://{to}{path}");
    let mut command = from.command("curl");
    command.args(["-sS", "-g", "--path-as-is", "--max-time"]);
    command.arg(STEP.as_secs().to_string());
    if let Proto::H2c = proto {
        command.arg("--http2-prior-knowledge");
    }
    command.args([
        "-X",
        method,
        "-o",
        "-",
        "-w",
        "\n%{http_code} %{http_version}",
        &url,
    ]);
    let out = tokio::process::Command::from(command)
        .kill_on_drop(true)
        .output()
        .await
        .context("cannot run curl")?;
    if !out.status.success() {
        bail!(
            "curl {method} {url} from {} ({proto:?}) failed ({}): {}",
            from.name(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, last) = text.rsplit_once('\n').context("no status line from curl")?;
    let (status, version) = last.split_once(' ').context("no version from curl")?;
    Ok(Answer {
        status: status
            .parse()
            .with_context(|| format!("status {status:?}"))?,
        version: version.to_string(),
        body: body.to_string(),
    })
}

/// The status of `METHOD path`, asserting the answer came in the protocol asked for and
/// that a 403 carries the tunnel's body.
async fn status(from: &Pod, proto: Proto, method: &str, to: SocketAddr, path: &str) -> u16 {
    let answer = curl(from, proto, method, to, path)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let version = match proto {
        Proto::Http1 => "1.1",
        Proto::H2c => "2",
    };
    assert_eq!(
        answer.version, version,
        "{method} {path} to {to}: {answer:?}"
    );
    match answer.status {
        200 => assert_eq!(answer.body, format!("ok {method} {}", path_of(path))),
        403 => assert_eq!(answer.body, DENIED, "{method} {path} to {to}"),
        _ => {}
    }
    answer.status
}

/// The path part of a request target.
fn path_of(target: &str) -> &str {
    target.split_once('?').map_or(target, |(p, _)| p)
}

/// The sum of the series of `name` whose labels include every one of `labels`, or
/// `None` when there is none.
fn series(metrics: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let values: Vec<f64> = metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

#[tokio::test]
async fn only_orders_may_post_charge_over_http1_and_h2c() {
    let setup = Setup::started().await;
    for family in setup.payments_pod().ips() {
        let payments = setup.payments_pod().addr(family, PAYMENTS_PORT);
        for proto in [Proto::Http1, Proto::H2c] {
            let orders = setup.orders();
            assert_eq!(
                status(orders, proto, "POST", payments, "/charge").await,
                200
            );
            assert_eq!(status(orders, proto, "GET", payments, "/charge").await, 403);
            assert_eq!(
                status(orders, proto, "POST", payments, "/refund").await,
                403
            );
            // inventory holds a valid mesh certificate, on the other node.
            let inventory = setup.inventory();
            assert_eq!(
                status(inventory, proto, "POST", payments, "/charge").await,
                403
            );
        }
    }
    assert_eq!(setup.payments.seen(), ["POST /charge"; 4]);

    let metrics = setup.mesh.metrics(0).await.unwrap();
    let orders = "source_principal=\"spiffe://cluster.local/ns/prod/sa/orders\"";
    let inventory = "source_principal=\"spiffe://cluster.local/ns/prod/sa/inventory\"";
    let common = [
        "reporter=\"destination\"",
        "destination_workload=\"payments\"",
        "connection_security_policy=\"mutual_tls\"",
        "request_protocol=\"http\"",
    ];
    for (source, code, count) in [
        (orders, "200", 4.0),
        (orders, "403", 8.0),
        (inventory, "403", 4.0),
    ] {
        let code = format!("response_code=\"{code}\"");
        let labels: Vec<&str> = common
            .iter()
            .copied()
            .chain([source, code.as_str()])
            .collect();
        assert_eq!(
            series(&metrics, "istio_requests_total", &labels),
            Some(count),
            "{labels:?} in:\n{metrics}"
        );
    }
    let log = setup.mesh.log(0);
    assert!(
        log.lines().any(|l| l.contains("HTTP request denied")
            && l.contains("finance/payments-charge")
            && l.contains("/refund")),
        "no denial of POST /refund logged with its policy:\n{}",
        setup.mesh.log_tail(0)
    );
}

#[tokio::test]
async fn plaintext_from_outside_the_mesh_is_refused_by_strict_on_an_http_port() {
    let setup = Setup::started().await;
    for family in setup.batch().ips() {
        let payments = setup.payments_pod().addr(family, PAYMENTS_PORT);
        for proto in [Proto::Http1, Proto::H2c] {
            let result = curl(setup.batch(), proto, "POST", payments, "/charge").await;
            assert!(result.is_err(), "batch got an HTTP answer: {result:?}");
        }
    }
    assert!(
        setup.payments.seen().is_empty(),
        "{:?}",
        setup.payments.seen()
    );
    let metrics = setup.mesh.metrics(0).await.unwrap();
    let refused = series(
        &metrics,
        "ztunnel_connections_refused_total",
        &["reason=\"strict_plaintext\""],
    );
    assert_eq!(refused, Some(4.0), "{metrics}");
}

/// A gRPC call from `from` over HTTP/2 cleartext: the `grpc-status` of the answer (from
/// its headers for a trailers-only answer, else from its trailers) and its HTTP status.
async fn grpc_call(from: &Pod, to: SocketAddr, method: &str) -> Result<(String, StatusCode)> {
    let tcp = tokio::time::timeout(STEP, from.netns()?.connect(None, to, 0))
        .await
        .context("no connection in time")??;
    let (mut send, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
    tokio::spawn(connection);
    let request = Request::post(format!("http://payments.finance{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))?;
    let exchange = async {
        let response = send.send_request(request).await?;
        let status = response.status();
        if let Some(grpc) = response.headers().get("grpc-status") {
            return Ok((grpc.to_str()?.to_string(), status));
        }
        let body = response.into_body().collect().await?;
        let trailers = body.trailers().context("no trailers")?;
        Ok((trailers["grpc-status"].to_str()?.to_string(), status))
    };
    tokio::time::timeout(STEP, exchange)
        .await
        .context("no answer in time")?
}

#[tokio::test]
async fn grpc_methods_are_decided_per_call() {
    let setup = Setup::started().await;
    for family in setup.payments_pod().ips() {
        let payments = setup.payments_pod().addr(family, PAYMENTS_PORT);
        for (from, method, want) in [
            (setup.orders(), "/pkg.Service/Method", "0"),
            (setup.orders(), "/pkg.Service/Other", "7"),
            (setup.inventory(), "/pkg.Service/Method", "7"),
        ] {
            let (grpc, status) = grpc_call(from, payments, method)
                .await
                .unwrap_or_else(|e| panic!("{} {method}: {e:#}", from.name()));
            assert_eq!((grpc.as_str(), status), (want, StatusCode::OK), "{method}");
        }
    }
    assert_eq!(setup.payments.seen(), ["POST /pkg.Service/Method"; 2]);
    let metrics = setup.mesh.metrics(0).await.unwrap();
    for (grpc, count) in [("0", 2.0), ("7", 4.0)] {
        let grpc = format!("grpc_response_status=\"{grpc}\"");
        let labels = ["request_protocol=\"grpc\"", "response_code=\"200\"", &grpc];
        assert_eq!(
            series(&metrics, "istio_requests_total", &labels),
            Some(count),
            "{labels:?} in:\n{metrics}"
        );
    }
}

#[tokio::test]
async fn a_deny_on_admin_paths_holds_against_normalization_bypasses() {
    let setup = Setup::started().await;
    let bypasses = [
        "/admin",
        "/admin/users",
        "//admin",
        "/./admin",
        "/x/../admin",
        "/%2Fadmin",
        "/%2fadmin/users",
        "/%61dmin",
        "/admin?x=1",
    ];
    for family in setup.web_pod().ips() {
        let web = setup.web_pod().addr(family, WEB_PORT);
        for proto in [Proto::Http1, Proto::H2c] {
            // Across nodes over HBONE, and plaintext from outside the mesh (PERMISSIVE).
            for from in [setup.orders(), setup.batch()] {
                assert_eq!(status(from, proto, "GET", web, "/orders").await, 200);
                assert_eq!(
                    status(from, proto, "GET", web, "/administrator-guide").await,
                    403
                );
                for path in bypasses {
                    assert_eq!(
                        status(from, proto, "GET", web, path).await,
                        403,
                        "{path} from {} over {proto:?} to {web}",
                        from.name()
                    );
                }
            }
        }
    }
    assert_eq!(setup.web.seen(), ["GET /orders"; 8]);
}

#[tokio::test]
async fn one_keep_alive_connection_carries_allowed_denied_allowed() {
    let setup = Setup::started().await;
    for family in setup.web_pod().ips() {
        let web = setup.web_pod().addr(family, WEB_PORT);
        // One curl, three URLs: curl reuses its connection, and says how many it made.
        let urls: Vec<String> = ["/first", "/admin", "/second"]
            .iter()
            .map(|p| format!("http://{web}{p}"))
            .collect();
        let mut command = setup.orders().command("curl");
        command.args(["-sS", "-g", "--max-time"]);
        command.arg(STEP.as_secs().to_string());
        command.args(["-w", "%{http_code} %{num_connects}\\n"]);
        for url in &urls {
            command.args(["-o", "/dev/null", url]);
        }
        let out = tokio::process::Command::from(command)
            .kill_on_drop(true)
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines = String::from_utf8_lossy(&out.stdout).into_owned();
        let lines: Vec<&str> = lines.lines().collect();
        assert_eq!(
            lines,
            ["200 1", "403 0", "200 0"],
            "status and new connections per request"
        );
    }
    assert_eq!(
        setup.web.seen(),
        ["GET /first", "GET /second", "GET /first", "GET /second"]
    );
}
