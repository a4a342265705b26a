//! The Kubernetes source against recorded API objects: the conversion alone, and the
//! watches end to end against a fake API server on loopback (no real API server can run
//! here), which lists recorded objects and then streams watch events.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::*;
use crate::kube::pod_netns::{Metrics as NetnsMetrics, ProcScanner};

const NODE: &str = "node-a";
const UID_A: &str = "11111111-1111-1111-1111-111111111111";
const UID_B: &str = "22222222-2222-2222-2222-222222222222";

fn options() -> Options {
    Options {
        node: NODE.into(),
        trust_domain: "cluster.local".into(),
        root_namespace: "istio-system".into(),
    }
}

fn pod(name: &str, ns: &str, uid: &str, node: &str, ip: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": uid, "labels": labels, "resourceVersion": "1"},
        "spec": {"nodeName": node, "serviceAccountName": name,
                 "containers": [{"name": "app", "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                   "conditions": [{"type": "Ready", "status": "True"}]}
    })
}

fn namespace(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels, "resourceVersion": "1"}})
}

fn seed() -> HashMap<&'static str, Vec<Value>> {
    let ambient = json!({"istio.io/dataplane-mode": "ambient"});
    HashMap::from([
        (
            "pods",
            vec![
                pod(
                    "payments",
                    "finance",
                    UID_A,
                    NODE,
                    "10.0.1.10",
                    json!({"app": "payments"}),
                ),
                pod(
                    "orders",
                    "prod",
                    UID_B,
                    "node-b",
                    "10.0.2.4",
                    json!({"app": "orders", "istio.io/dataplane-mode": "ambient"}),
                ),
                pod(
                    "opted-out",
                    "finance",
                    "33333333-3333-3333-3333-333333333333",
                    NODE,
                    "10.0.1.11",
                    json!({"istio.io/dataplane-mode": "none"}),
                ),
                pod(
                    "legacy",
                    "legacy",
                    "44444444-4444-4444-4444-444444444444",
                    "node-b",
                    "10.0.3.1",
                    json!({}),
                ),
            ],
        ),
        (
            "namespaces",
            vec![
                namespace("finance", ambient.clone()),
                namespace("prod", json!({})),
                namespace("legacy", json!({})),
            ],
        ),
        (
            "services",
            vec![json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "payments", "namespace": "finance", "resourceVersion": "1"},
                "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "selector": {"app": "payments"},
                         "ports": [{"port": 80, "targetPort": "http", "protocol": "TCP"}, {"port": 443, "targetPort": 9443}]}
            })],
        ),
        (
            "endpointslices",
            vec![json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
                "metadata": {"name": "legacy-x", "namespace": "legacy", "resourceVersion": "1"},
                "endpoints": [{"addresses": ["10.0.3.1"], "conditions": {"ready": false},
                               "targetRef": {"kind": "Pod", "uid": "44444444-4444-4444-4444-444444444444"}}]
            })],
        ),
        (
            "peerauthentications",
            vec![json!({
                "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
                "metadata": {"name": "strict", "namespace": "finance", "resourceVersion": "1",
                             "creationTimestamp": "2026-01-01T00:00:00Z"},
                "spec": {"mtls": {"mode": "STRICT"}}
            })],
        ),
        (
            "authorizationpolicies",
            vec![
                json!({
                    "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                    "metadata": {"name": "payments-callers", "namespace": "finance", "resourceVersion": "1",
                                 "creationTimestamp": "2026-01-02T00:00:00Z"},
                    "spec": {"selector": {"matchLabels": {"app": "payments"}}, "action": "ALLOW",
                             "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/prod/sa/orders"]}}]}]}
                }),
                json!({
                    "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                    "metadata": {"name": "misspelt", "namespace": "finance", "resourceVersion": "1"},
                    "spec": {"acton": "DENY"}
                }),
            ],
        ),
    ])
}

fn objects(seed: &HashMap<&'static str, Vec<Value>>) -> Objects {
    fn parse<K: serde::de::DeserializeOwned>(values: &[Value]) -> Vec<Arc<K>> {
        values
            .iter()
            .map(|v| Arc::new(serde_json::from_value(v.clone()).unwrap()))
            .collect()
    }
    Objects {
        pods: parse(&seed["pods"]),
        namespaces: parse(&seed["namespaces"]),
        services: parse(&seed["services"]),
        slices: parse(&seed["endpointslices"]),
        policies: oldest_first(
            parse(&seed["peerauthentications"]),
            parse(&seed["authorizationpolicies"]),
        ),
    }
}

#[test]
fn api_objects_become_the_same_resources_as_the_file() {
    let objects = objects(&seed());
    let netns = HashMap::from([(
        UID_A.to_string(),
        std::path::PathBuf::from("/proc/42/ns/net"),
    )]);
    let built = objects.resources(&options(), &netns);
    let r = &built.resources;
    let w = |name: &str| {
        r.workloads
            .iter()
            .find(|w| w.name == name)
            .unwrap_or_else(|| panic!("{name} missing"))
    };

    // Meshed by the namespace label, by the pod label; opted out; not in the mesh.
    assert!(w("payments").meshed && w("orders").meshed);
    assert!(!w("opted-out").meshed && !w("legacy").meshed);
    assert_eq!(
        w("payments").identity.to_string(),
        "spiffe://cluster.local/ns/finance/sa/payments"
    );
    assert_eq!(
        w("payments").netns.as_deref(),
        Some(std::path::Path::new("/proc/42/ns/net"))
    );
    assert_eq!(
        w("orders").netns,
        None,
        "a remote pod has no namespace here"
    );
    assert!(w("payments").healthy);
    assert!(!w("legacy").healthy, "the EndpointSlice says not ready");

    let wanted = objects.local_meshed_pods(&options());
    assert_eq!(
        wanted
            .into_iter()
            .map(|u| u.as_str().to_string())
            .collect::<Vec<_>>(),
        [UID_A]
    );

    // A named target port is found in the selected pods' container ports.
    assert_eq!(r.services.len(), 1);
    let ports: Vec<(u16, u16)> = r.services[0]
        .ports
        .iter()
        .map(|p| (p.port, p.target_port))
        .collect();
    assert_eq!(ports, [(80, 8080), (443, 9443)]);

    // Policies compile as in the file, oldest first; a misspelt one is left out and said why.
    let refs: Vec<String> = r
        .policies
        .iter()
        .map(|p| p.reference().to_string())
        .collect();
    assert_eq!(refs, ["finance/strict", "finance/payments-callers"]);
    let problems: Vec<&String> = built.problems.iter().collect();
    assert_eq!(problems.len(), 1);
    assert!(
        problems[0].contains("finance/misspelt") && problems[0].contains("acton"),
        "{problems:?}"
    );

    // And they decide as they would from the file.
    let snapshot = crate::state::Snapshot::new(1, r.clone());
    let payments: SocketAddr = "10.0.1.10:8080".parse().unwrap();
    assert!(!snapshot.plaintext_allowed(payments), "STRICT in finance");
    let orders = Identity::new("cluster.local", "prod", "orders").unwrap();
    let other = Identity::new("cluster.local", "prod", "inventory").unwrap();
    assert!(
        snapshot
            .decide("10.0.2.4".parse().unwrap(), Some(&orders), payments)
            .allowed
    );
    assert!(
        !snapshot
            .decide("10.0.2.5".parse().unwrap(), Some(&other), payments)
            .allowed
    );
}

/// A fake API server: lists the recorded objects of each resource, then keeps each
/// watch open and streams the events the test sends.
struct FakeApi {
    addr: SocketAddr,
    watches: Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Value>>>>,
}

impl FakeApi {
    /// Sends a watch event once the tunnel's watch of `resource` is open.
    async fn send(&self, resource: &str, event: Value) {
        for _ in 0..500 {
            if let Some(tx) = self.watches.lock().unwrap().get(resource) {
                tx.send(event).unwrap();
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no watch of {resource} opened within 5 s");
    }
}

fn resource_of(path: &str) -> String {
    path.rsplit('/').next().unwrap_or_default().to_string()
}

async fn fake_api(seed: HashMap<&'static str, Vec<Value>>) -> FakeApi {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let watches: Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Value>>>> = Arc::default();
    let seed = Arc::new(seed);
    let w = watches.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (seed, watches) = (seed.clone(), w.clone());
            let service = hyper::service::service_fn(
                move |req: hyper::Request<hyper::body::Incoming>| {
                    let (seed, watches) = (seed.clone(), watches.clone());
                    async move {
                        let resource = resource_of(req.uri().path());
                        let watching = req.uri().query().unwrap_or_default().contains("watch=true");
                        let body: BoxBody<Bytes, Infallible> = if watching {
                            let (tx, rx) = mpsc::unbounded_channel::<Value>();
                            watches.lock().unwrap().insert(resource, tx);
                            let events = futures::stream::unfold(rx, |mut rx| async move {
                                let event = rx.recv().await?;
                                let line = format!("{event}\n");
                                Some((Ok::<_, Infallible>(Frame::data(Bytes::from(line))), rx))
                            });
                            BodyExt::boxed(StreamBody::new(events))
                        } else {
                            let items = seed.get(resource.as_str()).cloned().unwrap_or_default();
                            let list = json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items});
                            BodyExt::boxed(http_body_util::Full::new(Bytes::from(list.to_string())))
                        };
                        Ok::<_, Infallible>(
                            hyper::Response::builder()
                                .header("content-type", "application/json")
                                .body(body)
                                .unwrap(),
                        )
                    }
                },
            );
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(tcp);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            });
        }
    });
    FakeApi { addr, watches }
}

/// A /proc with the host and one process of pod A in a namespace of its own.
fn fake_proc(dir: &std::path::Path) {
    let host = dir.join("1/ns");
    std::fs::create_dir_all(&host).unwrap();
    std::fs::write(dir.join("1/cgroup"), "0::/init.scope\n").unwrap();
    std::os::unix::fs::symlink("net:[4026531840]", host.join("net")).unwrap();
    let pod = dir.join("4242/ns");
    std::fs::create_dir_all(&pod).unwrap();
    std::fs::write(
        dir.join("4242/cgroup"),
        format!("0::/kubepods/besteffort/pod{UID_A}/abc\n"),
    )
    .unwrap();
    std::os::unix::fs::symlink("net:[4026532999]", pod.join("net")).unwrap();
}

#[tokio::test]
async fn watches_feed_the_state_and_follow_changes() {
    let api = fake_api(seed()).await;
    let proc_dir = tempfile::tempdir().unwrap();
    fake_proc(proc_dir.path());
    let config = kube::Config::new(format!("http://{}", api.addr).parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let state = State::new();
    let mut registry = Registry::default();
    let tracker = NetnsTracker::new(
        ProcScanner::new(proc_dir.path()),
        NetnsMetrics::register(&mut registry),
    );
    let _source = KubeSource::start(client, options(), tracker, state.clone(), &mut registry);

    let mut updates = state.subscribe();
    let wait = |what: &'static str, done: Box<dyn Fn(&State) -> bool + Send>| {
        let state = state.clone();
        let mut updates = updates.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(10), async {
                while !done(&state) {
                    updates.changed().await.unwrap();
                }
            })
            .await
            .unwrap_or_else(|_| panic!("state never {what}"));
        }
    };
    wait("loaded", Box::new(|s| s.is_loaded())).await;
    let snapshot = state.load();
    let payments = snapshot
        .local_workload("10.0.1.10".parse().unwrap())
        .expect("payments is local");
    assert_eq!(
        payments.netns.as_deref(),
        Some(proc_dir.path().join("4242/ns/net").as_path())
    );
    assert_eq!(snapshot.policies().len(), 2);

    // A pod added later by the watch appears, with no re-list.
    let added = pod(
        "ledger",
        "finance",
        "55555555-5555-5555-5555-555555555555",
        "node-b",
        "10.0.2.9",
        json!({}),
    );
    api.send("pods", json!({"type": "ADDED", "object": added}))
        .await;
    wait(
        "saw the added pod",
        Box::new(|s| s.load().workload("finance", "ledger").is_some()),
    )
    .await;
    assert!(
        state.load().workload("finance", "ledger").unwrap().meshed,
        "meshed by its namespace"
    );

    // A policy deleted by the watch is gone.
    let deleted = seed()["authorizationpolicies"][0].clone();
    api.send(
        "authorizationpolicies",
        json!({"type": "DELETED", "object": deleted}),
    )
    .await;
    wait(
        "dropped the deleted policy",
        Box::new(|s| s.load().policies().len() == 1),
    )
    .await;
    updates.borrow_and_update();

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains("ztunnel_kube_rejected_policies_total 1"),
        "{text}"
    );
}
