use std::collections::BTreeSet;

use super::*;
use crate::policy::{Document, MtlsMode};

fn workload(ns: &str, name: &str, sa: &str, app: &str, ip: &str, node: &str) -> Workload {
    Workload {
        name: name.to_string(),
        namespace: ns.to_string(),
        service_account: sa.to_string(),
        identity: Identity::new("cluster.local", ns, sa).unwrap(),
        labels: [("app".to_string(), app.to_string())].into(),
        ips: vec![ip.parse().unwrap()],
        node: node.to_string(),
        meshed: true,
        healthy: true,
        netns: None,
        http_ports: None,
    }
}

fn policies(yaml: &str) -> Vec<Policy> {
    if yaml.is_empty() {
        return Vec::new();
    }
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| {
            serde::Deserialize::deserialize(d)
                .map(|doc: Document| doc.compile().unwrap())
                .unwrap()
        })
        .collect()
}

const STRICT_PAYMENTS: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: finance}
spec:
  selector: {matchLabels: {app: payments}}
  mtls: {mode: STRICT}
"#;

const ONLY_ORDERS: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-orders, namespace: finance}
spec:
  selector: {matchLabels: {app: payments}}
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/prod/sa/orders"]}
"#;

fn resources(policy_yaml: &str) -> Resources {
    let mut legacy = workload("legacy", "batch", "default", "batch", "10.0.3.1", "node-b");
    legacy.meshed = false;
    let mut sick = workload(
        "finance",
        "payments-2",
        "payments",
        "payments",
        "10.0.1.12",
        "node-b",
    );
    sick.healthy = false;
    Resources {
        node: "node-a".to_string(),
        trust_domain: "cluster.local".to_string(),
        root_namespace: "istio-system".to_string(),
        workloads: vec![
            workload(
                "finance",
                "payments-0",
                "payments",
                "payments",
                "10.0.1.10",
                "node-a",
            ),
            workload(
                "finance",
                "payments-1",
                "payments",
                "payments",
                "10.0.1.11",
                "node-b",
            ),
            sick,
            workload("prod", "orders", "orders", "orders", "10.0.2.4", "node-a"),
            legacy,
        ],
        services: vec![
            Service {
                name: "payments".to_string(),
                namespace: "finance".to_string(),
                vips: vec!["10.96.0.10".parse().unwrap()],
                ports: vec![ServicePort {
                    port: 80,
                    target_port: 9090,
                    http: false,
                }],
                selector: [("app".to_string(), "payments".to_string())].into(),
                subject_alt_names: vec![],
            },
            Service {
                name: "empty".to_string(),
                namespace: "finance".to_string(),
                vips: vec!["10.96.0.11".parse().unwrap()],
                ports: vec![ServicePort {
                    port: 80,
                    target_port: 80,
                    http: false,
                }],
                selector: [("app".to_string(), "nothing".to_string())].into(),
                subject_alt_names: vec![],
            },
        ],
        policies: policies(policy_yaml),
        l7: L7Settings::default(),
    }
}

fn snapshot() -> Snapshot {
    Snapshot::new(1, resources(&[STRICT_PAYMENTS, ONLY_ORDERS].join("---\n")))
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn indexes_find_workloads() {
    let s = snapshot();
    assert_eq!(
        s.local_workload("10.0.1.10".parse().unwrap()).unwrap().name,
        "payments-0"
    );
    assert!(s.local_workload("10.0.1.11".parse().unwrap()).is_none());
    assert_eq!(
        s.workload_by_ip("10.0.1.11".parse().unwrap()).unwrap().name,
        "payments-1"
    );
    let id = Identity::new("cluster.local", "finance", "payments").unwrap();
    let names: BTreeSet<&str> = s
        .workloads_with_identity(&id)
        .iter()
        .map(|w| w.name.as_str())
        .collect();
    assert_eq!(names, ["payments-0", "payments-1", "payments-2"].into());
    assert_eq!(
        s.workload("prod", "orders").unwrap().ips[0].to_string(),
        "10.0.2.4"
    );
    let (svc, eps) = s.service_by_vip("10.96.0.10".parse().unwrap()).unwrap();
    assert_eq!(svc.key(), "finance/payments");
    assert_eq!(eps.len(), 3);
    assert_eq!(s.local_workloads().count(), 2);
    let local: Vec<String> = s.local_identities().iter().map(|i| i.to_string()).collect();
    assert_eq!(
        local,
        [
            "spiffe://cluster.local/ns/finance/sa/payments",
            "spiffe://cluster.local/ns/prod/sa/orders"
        ]
    );
}

#[test]
fn resolves_workloads_services_and_passthrough() {
    let s = snapshot();
    let up = s.resolve(sa("10.0.1.11:9090")).unwrap();
    assert_eq!(up.address, sa("10.0.1.11:9090"));
    assert_eq!(
        up.transport,
        Transport::Hbone {
            gateway: sa("10.0.1.11:15008"),
            identities: vec![Identity::new("cluster.local", "finance", "payments").unwrap()],
        }
    );
    let legacy = s.resolve(sa("10.0.3.1:8080")).unwrap();
    assert_eq!(legacy.transport, Transport::Plaintext);
    assert_eq!(legacy.workload.unwrap().name, "batch");
    let outside = s.resolve(sa("192.0.2.1:443")).unwrap();
    assert_eq!(outside.transport, Transport::Plaintext);
    assert!(outside.workload.is_none());
    assert_eq!(outside.address, sa("192.0.2.1:443"));
}

#[test]
fn service_vip_spreads_over_healthy_endpoints_with_target_port() {
    let s = snapshot();
    let mut seen = BTreeSet::new();
    for _ in 0..4 {
        let up = s.resolve(sa("10.96.0.10:80")).unwrap();
        assert_eq!(up.address.port(), 9090);
        assert_eq!(up.service.as_deref(), Some("finance/payments"));
        seen.insert(up.address.ip().to_string());
    }
    assert_eq!(
        seen,
        ["10.0.1.10".to_string(), "10.0.1.11".to_string()].into()
    );
    assert_eq!(
        s.resolve(sa("10.96.0.10:81")).unwrap_err().to_string(),
        "service finance/payments (10.96.0.10) has no port 81"
    );
    assert_eq!(
        s.resolve(sa("10.96.0.11:80")).unwrap_err().to_string(),
        "service finance/empty (10.96.0.11:80) has no healthy endpoint"
    );
}

#[test]
fn inbound_modes_and_authorization() {
    let s = snapshot();
    let m = s.inbound_mode(sa("10.0.1.10:9090")).unwrap();
    assert_eq!(m.mode, MtlsMode::Strict);
    assert!(!s.plaintext_allowed(sa("10.0.1.10:9090")));
    assert!(s.plaintext_allowed(sa("10.0.2.4:8080")));
    assert!(!s.plaintext_allowed(sa("10.0.1.11:9090")), "not local");
    let orders = Identity::new("cluster.local", "prod", "orders").unwrap();
    let inventory = Identity::new("cluster.local", "prod", "inventory").unwrap();
    let src = "10.0.2.4".parse().unwrap();
    assert!(
        s.authorize(src, Some(&orders), sa("10.0.1.10:9090"))
            .allowed
    );
    let d = s.authorize(src, Some(&inventory), sa("10.0.1.10:9090"));
    assert!(!d.allowed);
    assert_eq!(d.policy.unwrap().to_string(), "finance/only-orders");
    let d = s.authorize(src, None, sa("10.0.1.10:9090"));
    assert_eq!(d.policy.unwrap().to_string(), "finance/strict");
    let d = s.authorize(src, Some(&orders), sa("10.9.9.9:80"));
    assert!(!d.allowed);
    assert!(d.reason.contains("no workload owns destination 10.9.9.9"));
}

#[test]
fn a_new_policy_denies_what_the_old_snapshot_allowed() {
    let before = Snapshot::new(1, resources(""));
    let after = snapshot();
    let inventory = Identity::new("cluster.local", "prod", "inventory").unwrap();
    let orders = Identity::new("cluster.local", "prod", "orders").unwrap();
    let src = "10.0.2.5".parse().unwrap();
    let dst = sa("10.0.1.10:9090");
    assert!(before.decide(src, Some(&inventory), dst).allowed);
    assert!(before.decide(src, None, dst).allowed);
    let d = after.decide(src, Some(&inventory), dst);
    assert!(!d.allowed);
    assert_eq!(d.policy.unwrap().to_string(), "finance/only-orders");
    let d = after.decide(src, None, dst);
    assert_eq!(d.policy.unwrap().to_string(), "finance/strict");
    assert!(after.decide(src, Some(&orders), dst).allowed);
}

#[tokio::test]
async fn publish_swaps_the_snapshot_and_notifies() {
    let state = State::new();
    assert!(!state.is_loaded());
    let mut rx = state.subscribe();
    let held = state.load();
    state.publish(resources(""));
    tokio::time::timeout(std::time::Duration::from_secs(5), rx.changed())
        .await
        .expect("notified in time")
        .expect("sender alive");
    assert_eq!(*rx.borrow(), 1);
    assert!(state.is_loaded());
    assert_eq!(held.generation(), 0, "a held snapshot never changes");
    assert_eq!(state.load().workloads().len(), 5);
    state.publish(resources(ONLY_ORDERS));
    assert_eq!(state.load().generation(), 2);
    assert_eq!(state.load().policies().len(), 1);
}

#[test]
fn dump_shows_modes_of_local_workloads() {
    let s = snapshot();
    let d = s.dump();
    assert_eq!(d["mtlsModes"]["finance/payments-0"]["mode"], "STRICT");
    assert_eq!(d["mtlsModes"]["prod/orders"]["mode"], "PERMISSIVE");
    assert!(d["mtlsModes"].get("finance/payments-1").is_none());
    assert_eq!(d["workloads"].as_array().unwrap().len(), 5);
    assert_eq!(d["services"][0]["endpoints"].as_array().unwrap().len(), 3);
    assert_eq!(d["policies"][1]["name"], "only-orders");
}

#[test]
fn service_upstreams_lists_every_healthy_endpoint_in_order() {
    let s = snapshot();
    let ups = s.service_upstreams(sa("10.96.0.10:80")).unwrap().unwrap();
    let addrs: Vec<String> = ups.iter().map(|u| u.address.to_string()).collect();
    assert_eq!(addrs, ["10.0.1.10:9090", "10.0.1.11:9090"]);
    assert!(s.service_upstreams(sa("10.0.1.10:9090")).unwrap().is_none());
    assert!(s.service_upstreams(sa("10.96.0.11:80")).is_err());
}

const PAYMENTS_ALLOW_CHARGE: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: payments-allow, namespace: finance}
spec:
  selector: {matchLabels: {app: payments}}
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/prod/sa/orders"]}
    to:
    - operation: {methods: ["POST"], paths: ["/charge"]}
"#;

/// The test resources with the payments service port 80 speaking HTTP (by its name).
fn http_resources(policy_yaml: &str) -> Resources {
    let mut r = resources(policy_yaml);
    r.services[0].ports[0].http = true;
    r
}

fn parts(method: &str, target: &str) -> http::request::Parts {
    http::Request::builder()
        .method(method)
        .uri(target)
        .header("host", "payments.finance:80")
        .body(())
        .unwrap()
        .into_parts()
        .0
}

#[test]
fn service_port_names_and_app_protocols_say_http_as_istio_reads_them() {
    let http = [
        (Some("http"), None),
        (Some("http-web"), None),
        (Some("HTTP2-api"), None),
        (Some("grpc"), None),
        (Some("grpc-payments"), None),
        (Some("grpc-web-ui"), None),
        (None, Some("http")),
        (None, Some("http2")),
        (None, Some("h2c")),
        (None, Some("kubernetes.io/h2c")),
        (None, Some("grpc")),
        (None, Some("grpc-web")),
        (Some("tcp"), Some("HTTP")),
    ];
    for (name, app) in http {
        assert!(speaks_http(name, app), "{name:?} {app:?}");
    }
    let not_http = [
        (None, None),
        (Some("web"), None),
        (Some("https"), None),
        (Some("httpx"), None),
        (Some("tcp-http"), None),
        (Some("grpcweb"), None),
        (Some("http"), Some("tcp")),
        (None, Some("https")),
        (None, Some("kubernetes.io/ws")),
    ];
    for (name, app) in not_http {
        assert!(!speaks_http(name, app), "{name:?} {app:?}");
    }
    assert_eq!(parse_http_ports("8080, 9090,"), Ok(vec![8080, 9090]));
    assert_eq!(parse_http_ports(""), Ok(vec![]));
    assert!(parse_http_ports("80,x").unwrap_err().contains("\"x\""));
    assert!(parse_http_ports("0").is_err());
}

#[test]
fn a_workload_declaration_overrides_its_services_ports() {
    let snap = Snapshot::new(1, http_resources(PAYMENTS_ALLOW_CHARGE));
    assert_eq!(
        snap.http_port(sa("10.0.1.10:9090")),
        Some(&HttpPort::Service {
            service: "finance/payments".to_string(),
            port: 80
        })
    );
    assert_eq!(snap.http_port(sa("10.0.1.10:8080")), None);
    assert!(snap.http_enforced(sa("10.0.1.10:9090")));
    assert!(!snap.http_enforced(sa("10.0.1.10:8080")));
    // Orders has no HTTP port and no policy with HTTP rules.
    assert!(!snap.http_enforced(sa("10.0.2.4:9090")));

    let mut r = http_resources(PAYMENTS_ALLOW_CHARGE);
    r.workloads[0].http_ports = Some(vec![8080]);
    let snap = Snapshot::new(1, r);
    assert_eq!(
        snap.http_port(sa("10.0.1.10:8080")),
        Some(&HttpPort::Declared)
    );
    assert_eq!(snap.http_port(sa("10.0.1.10:9090")), None);
    assert!(snap.http_enforced(sa("10.0.1.10:8080")));
    assert!(!snap.http_enforced(sa("10.0.1.10:9090")));
    // An empty declaration declares no HTTP port at all.
    let mut r = http_resources(PAYMENTS_ALLOW_CHARGE);
    r.workloads[0].http_ports = Some(vec![]);
    assert!(!Snapshot::new(1, r).http_enforced(sa("10.0.1.10:9090")));
}

#[test]
fn requests_are_decided_one_by_one_on_enforced_ports() {
    let snap = Snapshot::new(
        1,
        http_resources(&[STRICT_PAYMENTS, PAYMENTS_ALLOW_CHARGE].join("---\n")),
    );
    let orders = Identity::new("cluster.local", "prod", "orders").unwrap();
    let inventory = Identity::new("cluster.local", "prod", "inventory").unwrap();
    let src = "10.0.2.4".parse().unwrap();
    let dst = sa("10.0.1.10:9090");
    // The connection of inventory is not refused: each request is decided.
    assert!(snap.decide(src, Some(&inventory), dst).allowed);
    // STRICT still refuses plaintext before any request.
    assert!(!snap.decide(src, None, dst).allowed);

    let d = snap.decide_request(src, Some(&orders), dst, &parts("POST", "/charge"));
    assert!(d.allowed, "{d:?}");
    assert_eq!(d.policy.unwrap().to_string(), "finance/payments-allow");
    let d = snap.decide_request(src, Some(&orders), dst, &parts("GET", "/charge"));
    assert!(!d.allowed);
    assert!(
        d.reason
            .contains("rule 0: to: methods [POST] do not include GET"),
        "{}",
        d.reason
    );
    let d = snap.decide_request(src, Some(&orders), dst, &parts("POST", "/x/../refund"));
    assert!(d.reason.contains("paths [/charge] do not include /refund"));
    let d = snap.decide_request(src, Some(&inventory), dst, &parts("POST", "/charge"));
    assert!(!d.allowed);
    // HTTP/2 requests carry an absolute URI.
    let d = snap.decide_request(
        src,
        Some(&orders),
        dst,
        &parts("POST", "http://payments.finance/charge?x=1"),
    );
    assert!(d.allowed, "{d:?}");
    // A path that cannot be normalized is denied, naming it.
    let d = snap.decide_request(src, Some(&orders), dst, &parts("POST", "/charge%00"));
    assert!(!d.allowed);
    assert!(d.reason.contains("\"/charge%00\""), "{}", d.reason);
    assert!(d.reason.contains("%00"));
}

#[test]
fn waypoint_mode_keeps_istio_ztunnel_semantics() {
    let mut r = http_resources(PAYMENTS_ALLOW_CHARGE);
    r.l7.authorization = L7Authorization::Waypoint;
    let snap = Snapshot::new(1, r);
    let orders = Identity::new("cluster.local", "prod", "orders").unwrap();
    let src = "10.0.2.4".parse().unwrap();
    let dst = sa("10.0.1.10:9090");
    assert!(!snap.http_enforced(dst));
    // The ALLOW rule with HTTP fields never matches, for the connection and requests.
    let d = snap.decide(src, Some(&orders), dst);
    assert!(!d.allowed);
    assert!(
        d.reason.contains("not checked on this port"),
        "{}",
        d.reason
    );
    let d = snap.decide_request(src, Some(&orders), dst, &parts("POST", "/charge"));
    assert!(!d.allowed);
    let w = snap.http_warnings(&snap.workloads()[0]);
    assert!(w[0].contains("l7Authorization is waypoint"), "{w:?}");
}

#[test]
fn a_policy_edit_changes_the_next_request() {
    let state = State::new();
    state.publish(http_resources(ONLY_ORDERS));
    let orders = Identity::new("cluster.local", "prod", "orders").unwrap();
    let src = "10.0.2.4".parse().unwrap();
    let dst = sa("10.0.1.10:9090");
    let charge = parts("GET", "/charge");
    assert!(!state.load().http_enforced(dst));
    assert!(
        state
            .load()
            .authorize_request(src, Some(&orders), dst, &charge)
            .allowed
    );
    state.publish(http_resources(PAYMENTS_ALLOW_CHARGE));
    assert!(state.load().http_enforced(dst));
    assert!(
        !state
            .load()
            .authorize_request(src, Some(&orders), dst, &charge)
            .allowed
    );
    state.publish(http_resources(ONLY_ORDERS));
    assert!(!state.load().http_enforced(dst));
    assert!(
        state
            .load()
            .authorize_request(src, Some(&orders), dst, &charge)
            .allowed
    );
}

#[test]
fn dump_and_warnings_tell_where_http_rules_are_enforced() {
    let snap = Snapshot::new(1, http_resources(PAYMENTS_ALLOW_CHARGE));
    let dump = snap.dump();
    assert_eq!(dump["l7Authorization"]["authorization"], "tunnel");
    assert_eq!(
        dump["l7Authorization"]["pathNormalization"],
        "DECODE_AND_MERGE_SLASHES"
    );
    let payments = &dump["http"]["finance/payments-0"];
    assert_eq!(payments["httpPorts"]["9090"]["service"], "finance/payments");
    assert_eq!(payments["enforcedPerRequest"], serde_json::json!([9090]));
    assert!(snap.http_warnings(&snap.workloads()[0]).is_empty());
    // Without an HTTP port, the HTTP rules are handled as at L4, with a warning.
    let snap = Snapshot::new(1, resources(PAYMENTS_ALLOW_CHARGE));
    let w = snap.http_warnings(&snap.workloads()[0]);
    assert!(
        w[0].contains("no port of finance/payments-0 speaks HTTP"),
        "{w:?}"
    );
    assert!(w[0].contains("never match"));
    assert_eq!(
        snap.dump()["http"]["finance/payments-0"]["warnings"][0],
        w[0].as_str()
    );
}
