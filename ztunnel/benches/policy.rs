//! The cost of the per-connection questions the data path asks the state (decide,
//! resolve) and of building a snapshot, in a mesh of 1000 workloads in 50 namespaces
//! with 251 policies.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use criterion::{Criterion, criterion_group, criterion_main};
use serde::Deserialize;
use ztunnel::identity::Identity;
use ztunnel::policy::{Document, Policy};
use ztunnel::state::{Resources, Service, ServicePort, Snapshot, Workload};

const NAMESPACES: u8 = 50;
const PER_NAMESPACE: u8 = 20;

fn ip(ns: u8, j: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, ns, j, 1))
}

fn policies() -> Vec<Policy> {
    let mut yaml = String::from(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: PERMISSIVE}}\n",
    );
    for ns in 0..NAMESPACES {
        let next = (ns + 1) % NAMESPACES;
        yaml.push_str(&format!(
            r#"---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: strict, namespace: ns{ns}}}
spec: {{selector: {{matchLabels: {{app: app0}}}}, mtls: {{mode: STRICT}}}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-outside, namespace: ns{ns}}}
spec:
  action: DENY
  rules:
  - from:
    - source: {{notIpBlocks: ["10.0.0.0/8"]}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: allow-app0, namespace: ns{ns}}}
spec:
  selector: {{matchLabels: {{app: app0}}}}
  rules:
  - from:
    - source: {{principals: ["cluster.local/ns/ns{next}/sa/sa3", "cluster.local/ns/ns{next}/sa/sa4"]}}
    to:
    - operation: {{ports: ["8080"]}}
  - from:
    - source: {{principals: ["cluster.local/ns/ns{next}/sa/sa1", "cluster.local/ns/ns{next}/sa/sa2"]}}
    to:
    - operation: {{ports: ["9090"]}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: allow-app1, namespace: ns{ns}}}
spec:
  selector: {{matchLabels: {{app: app1}}}}
  rules:
  - from:
    - source: {{namespaces: ["ns{next}"]}}
    when:
    - key: destination.port
      values: ["9090"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: audit, namespace: ns{ns}}}
spec:
  action: AUDIT
  rules:
  - to:
    - operation: {{ports: ["22"]}}
"#
        ));
    }
    serde_yaml::Deserializer::from_str(&yaml)
        .map(|d| {
            Document::deserialize(d)
                .expect("bench YAML parses")
                .compile()
                .expect("bench policy compiles")
        })
        .collect()
}

fn resources() -> Resources {
    let mut workloads = Vec::new();
    let mut services = Vec::new();
    for ns in 0..NAMESPACES {
        for j in 0..PER_NAMESPACE {
            let namespace = format!("ns{ns}");
            let sa = format!("sa{}", j % 5);
            workloads.push(Workload {
                name: format!("w{j}"),
                identity: Identity::new("cluster.local", namespace.as_str(), sa.as_str())
                    .expect("bench identity"),
                namespace,
                service_account: sa,
                labels: [("app".to_string(), format!("app{}", j % 5))].into(),
                ips: vec![ip(ns, j)],
                node: if ns == 0 { "node-a" } else { "node-b" }.to_string(),
                meshed: true,
                healthy: true,
                netns: None,
                http_ports: None,
            });
        }
        services.push(Service {
            name: "app0".to_string(),
            namespace: format!("ns{ns}"),
            vips: vec![IpAddr::V4(Ipv4Addr::new(172, 16, ns, 1))],
            ports: vec![ServicePort {
                port: 80,
                target_port: 9090,
                http: false,
            }],
            selector: [("app".to_string(), "app0".to_string())].into(),
            subject_alt_names: Vec::new(),
        });
    }
    Resources {
        node: "node-a".to_string(),
        trust_domain: "cluster.local".to_string(),
        root_namespace: "istio-system".to_string(),
        workloads,
        services,
        policies: policies(),
        l7: Default::default(),
    }
}

fn bench(c: &mut Criterion) {
    let resources = resources();
    let snapshot = Snapshot::new(1, resources.clone());
    let dst = SocketAddr::new(ip(0, 0), 9090);
    let src = ip(1, 1);
    let allowed = Identity::new("cluster.local", "ns1", "sa1").expect("bench identity");
    let denied = Identity::new("cluster.local", "ns7", "sa1").expect("bench identity");
    assert!(snapshot.decide(src, Some(&allowed), dst).allowed);
    assert!(!snapshot.decide(src, Some(&denied), dst).allowed);

    c.bench_function("decide/allow_second_rule", |b| {
        b.iter(|| snapshot.decide(black_box(src), black_box(Some(&allowed)), black_box(dst)))
    });
    c.bench_function("decide/deny_no_rule_matches", |b| {
        b.iter(|| snapshot.decide(black_box(src), black_box(Some(&denied)), black_box(dst)))
    });
    c.bench_function("decide/strict_refuses_plaintext", |b| {
        b.iter(|| snapshot.decide(black_box(src), black_box(None), black_box(dst)))
    });
    let vip = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(172, 16, 3, 1)), 80);
    c.bench_function("resolve/service_vip", |b| {
        b.iter(|| snapshot.resolve(black_box(vip)))
    });
    c.bench_function("resolve/workload_ip", |b| {
        b.iter(|| snapshot.resolve(black_box(dst)))
    });
    c.bench_function("snapshot/build_1000_workloads_251_policies", |b| {
        b.iter(|| Snapshot::new(1, black_box(resources.clone())))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
