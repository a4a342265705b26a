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
                }],
                selector: [("app".to_string(), "nothing".to_string())].into(),
                subject_alt_names: vec![],
            },
        ],
        policies: policies(policy_yaml),
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
fn revalidate_returns_connections_a_new_policy_denies() {
    let before = Snapshot::new(1, resources(""));
    let orders = Identity::new("cluster.local", "prod", "orders").unwrap();
    let inventory = Identity::new("cluster.local", "prod", "inventory").unwrap();
    let open = [
        OpenConnection {
            src_ip: "10.0.2.4".parse().unwrap(),
            identity: Some(orders),
            dst: sa("10.0.1.10:9090"),
        },
        OpenConnection {
            src_ip: "10.0.2.5".parse().unwrap(),
            identity: Some(inventory),
            dst: sa("10.0.1.10:9090"),
        },
        OpenConnection {
            src_ip: "10.0.3.1".parse().unwrap(),
            identity: None,
            dst: sa("10.0.1.10:9090"),
        },
    ];
    assert!(before.revalidate(open.iter().enumerate()).is_empty());
    let after = snapshot();
    let denied = after.revalidate(open.iter().enumerate());
    let keys: Vec<usize> = denied.iter().map(|(k, _)| *k).collect();
    assert_eq!(keys, [1, 2]);
    assert_eq!(
        denied[0].1.policy.as_ref().unwrap().to_string(),
        "finance/only-orders"
    );
    assert_eq!(
        denied[1].1.policy.as_ref().unwrap().to_string(),
        "finance/strict"
    );
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
