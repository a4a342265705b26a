//! Table-driven tests written from Istio's documented PeerAuthentication and
//! AuthorizationPolicy semantics, including the surprising cases.

use std::net::SocketAddr;

use serde::Deserialize;

use super::*;

const ROOT: &str = "istio-system";

fn compile_all(yaml: &str) -> Vec<Policy> {
    if yaml.trim().is_empty() {
        return Vec::new();
    }
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| {
            let doc = Document::deserialize(d).expect("test YAML deserializes");
            doc.compile()
                .unwrap_or_else(|e| panic!("{}: {e}", doc.describe()))
        })
        .collect()
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn mode_of(policies: &[Policy], ns: &str, labels: &Labels, port: u16) -> EffectiveMode {
    let peers = policies.iter().filter_map(|p| match p {
        Policy::Peer(p) => Some(p),
        Policy::Authz(_) => None,
    });
    let target = Target {
        namespace: ns,
        labels,
    };
    WorkloadMode::compose(peers, ROOT, target)
        .for_port(port)
        .clone()
}

fn decide(
    policies: &[Policy],
    ns: &str,
    labels: &Labels,
    from: Option<&Identity>,
    src_ip: &str,
    dst: &str,
) -> Decision {
    let dst: SocketAddr = dst.parse().expect("test address");
    let target = Target {
        namespace: ns,
        labels,
    };
    let authz: Vec<&AuthorizationPolicy> = policies
        .iter()
        .filter_map(|p| match p {
            Policy::Authz(a) if a.selects(ROOT, target) => Some(a),
            _ => None,
        })
        .collect();
    let conn = Connection {
        src_ip: src_ip.parse().expect("test address"),
        identity: from,
        dst,
        request: None,
    };
    evaluate(&mode_of(policies, ns, labels, dst.port()), &authz, &conn)
}

const MESH_STRICT: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
"#;

const MESH_PERMISSIVE: &str = r#"
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: PERMISSIVE}}
"#;

const TEST_NS_STRICT: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: test}
spec: {mtls: {mode: STRICT}}
"#;

const PAYMENTS_STRICT: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: payments-strict, namespace: finance}
spec:
  selector: {matchLabels: {app: payments}}
  mtls: {mode: STRICT}
"#;

struct ModeCase<'a> {
    name: &'static str,
    policies: &'a [&'a str],
    ns: &'static str,
    labels: &'static [(&'static str, &'static str)],
    port: u16,
    mode: MtlsMode,
    source: &'static str,
}

#[test]
fn peer_authentication_modes() {
    let ns_unset_ws_port = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: ports, namespace: finance}
spec:
  selector: {matchLabels: {app: payments}}
  portLevelMtls:
    8080: {mode: DISABLE}
    9443: {mode: UNSET}
"#;
    let ns_disable = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: off, namespace: finance}
spec: {mtls: {mode: DISABLE}}
"#;
    let ns_unset = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: unset, namespace: finance}
spec: {mtls: {mode: UNSET}}
"#;
    let root_selector_strict = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: root-selector, namespace: istio-system}
spec:
  selector: {matchLabels: {app: payments}}
  mtls: {mode: STRICT}
"#;
    let ns_first = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: first, namespace: finance}
spec: {mtls: {mode: STRICT}}
"#;
    let ns_second = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: second, namespace: finance}
spec: {mtls: {mode: PERMISSIVE}}
"#;
    let workload_permissive_port_strict = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: pay-ports, namespace: finance}
spec:
  selector: {matchLabels: {app: payments}}
  mtls: {mode: PERMISSIVE}
  portLevelMtls:
    9090: {mode: STRICT}
"#;
    let payments = &[("app", "payments")][..];
    let cases = [
        ModeCase {
            name: "no policy at all: PERMISSIVE by default",
            policies: &[],
            ns: "default",
            labels: &[],
            port: 80,
            mode: MtlsMode::Permissive,
            source: "default",
        },
        ModeCase {
            name: "mesh-wide STRICT applies in every namespace",
            policies: &[MESH_STRICT],
            ns: "shop",
            labels: &[],
            port: 80,
            mode: MtlsMode::Strict,
            source: "mesh-wide PeerAuthentication istio-system/default",
        },
        ModeCase {
            name: "STRICT in namespace test applies in test",
            policies: &[TEST_NS_STRICT],
            ns: "test",
            labels: &[],
            port: 80,
            mode: MtlsMode::Strict,
            source: "namespace PeerAuthentication test/strict",
        },
        ModeCase {
            name: "STRICT in namespace test does not affect another namespace",
            policies: &[TEST_NS_STRICT],
            ns: "default",
            labels: &[],
            port: 80,
            mode: MtlsMode::Permissive,
            source: "default",
        },
        ModeCase {
            name: "namespace overrides mesh",
            policies: &[MESH_STRICT, ns_disable],
            ns: "finance",
            labels: &[],
            port: 80,
            mode: MtlsMode::Disable,
            source: "namespace PeerAuthentication finance/off",
        },
        ModeCase {
            name: "UNSET namespace inherits the mesh mode",
            policies: &[MESH_STRICT, ns_unset],
            ns: "finance",
            labels: &[],
            port: 80,
            mode: MtlsMode::Strict,
            source: "mesh-wide",
        },
        ModeCase {
            name: "selector STRICT for app=payments applies to payments",
            policies: &[PAYMENTS_STRICT],
            ns: "finance",
            labels: payments,
            port: 9090,
            mode: MtlsMode::Strict,
            source: "workload PeerAuthentication finance/payments-strict",
        },
        ModeCase {
            name: "selector STRICT for app=payments leaves other finance workloads PERMISSIVE",
            policies: &[PAYMENTS_STRICT],
            ns: "finance",
            labels: &[("app", "ledger")],
            port: 9090,
            mode: MtlsMode::Permissive,
            source: "default",
        },
        ModeCase {
            name: "selector only selects in its own namespace",
            policies: &[PAYMENTS_STRICT],
            ns: "shop",
            labels: payments,
            port: 9090,
            mode: MtlsMode::Permissive,
            source: "default",
        },
        ModeCase {
            name: "workload overrides namespace",
            policies: &[ns_disable, PAYMENTS_STRICT],
            ns: "finance",
            labels: payments,
            port: 80,
            mode: MtlsMode::Strict,
            source: "workload",
        },
        ModeCase {
            name: "port level overrides workload and mesh",
            policies: &[MESH_STRICT, ns_unset_ws_port],
            ns: "finance",
            labels: payments,
            port: 8080,
            mode: MtlsMode::Disable,
            source: "portLevelMtls of PeerAuthentication finance/ports",
        },
        ModeCase {
            name: "other ports keep the inherited mesh mode",
            policies: &[MESH_STRICT, ns_unset_ws_port],
            ns: "finance",
            labels: payments,
            port: 8081,
            mode: MtlsMode::Strict,
            source: "mesh-wide",
        },
        ModeCase {
            name: "UNSET port inherits the workload's effective mode",
            policies: &[MESH_STRICT, ns_unset_ws_port],
            ns: "finance",
            labels: payments,
            port: 9443,
            mode: MtlsMode::Strict,
            source: "mesh-wide",
        },
        ModeCase {
            name: "STRICT port inside a PERMISSIVE workload",
            policies: &[workload_permissive_port_strict],
            ns: "finance",
            labels: payments,
            port: 9090,
            mode: MtlsMode::Strict,
            source: "portLevelMtls",
        },
        ModeCase {
            name: "the PERMISSIVE workload mode still applies to its other ports",
            policies: &[workload_permissive_port_strict],
            ns: "finance",
            labels: payments,
            port: 9091,
            mode: MtlsMode::Permissive,
            source: "workload PeerAuthentication finance/pay-ports",
        },
        ModeCase {
            name: "a selector policy in the root namespace is ignored",
            policies: &[root_selector_strict],
            ns: "istio-system",
            labels: payments,
            port: 80,
            mode: MtlsMode::Permissive,
            source: "default",
        },
        ModeCase {
            name: "two namespace policies: the first listed (oldest) wins",
            policies: &[ns_first, ns_second],
            ns: "finance",
            labels: &[],
            port: 80,
            mode: MtlsMode::Strict,
            source: "finance/first",
        },
        ModeCase {
            name: "v1beta1 mesh PERMISSIVE is accepted",
            policies: &[MESH_PERMISSIVE],
            ns: "finance",
            labels: &[],
            port: 80,
            mode: MtlsMode::Permissive,
            source: "mesh-wide",
        },
    ];
    for case in cases {
        let policies = compile_all(&case.policies.join("\n---\n"));
        let got = mode_of(&policies, case.ns, &labels(case.labels), case.port);
        assert_eq!(got.mode, case.mode, "{}: {got:?}", case.name);
        let source = got.source.to_string();
        assert!(
            source.contains(case.source),
            "{}: source {source:?} does not contain {:?}",
            case.name,
            case.source
        );
    }
}

const ONLY_ORDERS_TO_PAYMENTS: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: payments-allow-orders, namespace: finance}
spec:
  selector: {matchLabels: {app: payments}}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/prod/sa/orders"]
    to:
    - operation:
        ports: ["9090"]
"#;

const ALLOW_POST_CHARGE: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: charge-http, namespace: finance}
spec:
  selector: {matchLabels: {app: payments}}
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/prod/sa/orders"]}
    to:
    - operation:
        methods: ["POST"]
        paths: ["/charge"]
"#;

const DENY_POST: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-post, namespace: finance}
spec:
  action: DENY
  rules:
  - from:
    - source: {namespaces: ["prod"]}
    to:
    - operation: {methods: ["POST"]}
"#;

const DENY_LEGACY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-legacy, namespace: finance}
spec:
  action: DENY
  rules:
  - from:
    - source: {namespaces: ["legacy"]}
"#;

const ALLOW_NOTHING: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: finance}
spec: {}
"#;

const ALLOW_ALL: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-all, namespace: finance}
spec:
  rules:
  - {}
"#;

const DENY_ALL_MESH: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: istio-system}
spec:
  action: DENY
  rules:
  - {}
"#;

const PREFIX_SUFFIX: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: patterns, namespace: finance}
spec:
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/prod/*"]}
  - from:
    - source: {principals: ["*/sa/auditor"]}
"#;

const PRESENCE: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: any-identity, namespace: finance}
spec:
  rules:
  - from:
    - source: {principals: ["*"]}
"#;

const NOT_FORMS: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: not-forms, namespace: finance}
spec:
  rules:
  - from:
    - source:
        notNamespaces: ["dev"]
        notIpBlocks: ["10.9.0.0/16"]
    to:
    - operation: {notPorts: ["22"]}
"#;

const IP_BLOCKS: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: from-nodes, namespace: finance}
spec:
  rules:
  - from:
    - source: {ipBlocks: ["10.1.0.0/16", "192.168.7.7"]}
"#;

const WHEN_KEYS: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: when-keys, namespace: finance}
spec:
  rules:
  - when:
    - key: source.namespace
      values: ["prod"]
    - key: destination.port
      notValues: ["8443"]
    - key: destination.ip
      values: ["10.0.1.0/24"]
"#;

const WHEN_PRINCIPAL_IP: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: when-principal, namespace: finance}
spec:
  action: DENY
  rules:
  - when:
    - key: source.principal
      values: ["cluster.local/ns/prod/sa/inventory"]
    - key: source.ip
      notValues: ["10.0.2.0/24"]
"#;

const WHEN_L7_ALLOW: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: header-allow, namespace: finance}
spec:
  rules:
  - from:
    - source: {namespaces: ["prod"]}
    when:
    - key: request.headers[x-token]
      values: ["secret"]
"#;

const SERVICE_ACCOUNTS: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: by-sa, namespace: finance}
spec:
  rules:
  - from:
    - source: {serviceAccounts: ["prod/orders", "billing"]}
"#;

const MESH_ALLOW_SELECTOR: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mesh-payments, namespace: istio-system}
spec:
  selector: {matchLabels: {app: payments}}
  rules:
  - from:
    - source: {namespaces: ["prod"]}
"#;

const AUDIT_PROD: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit-prod, namespace: finance}
spec:
  action: AUDIT
  rules:
  - from:
    - source: {namespaces: ["prod"]}
"#;

const DRY_RUN_DENY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: dry-deny
  namespace: finance
  annotations: {"istio.io/dry-run": "true"}
spec:
  action: DENY
  rules:
  - from:
    - source: {namespaces: ["prod"]}
"#;

const DRY_RUN_ALLOW_NOTHING: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: dry-lockdown
  namespace: finance
  annotations: {"istio.io/dry-run": "true"}
spec: {}
"#;

const CUSTOM: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext-authz, namespace: finance}
spec:
  selector: {matchLabels: {app: payments}}
  action: CUSTOM
  provider: {name: opa}
  rules:
  - {}
"#;

const TARGET_REFS: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: waypoint-deny, namespace: finance}
spec:
  targetRefs:
  - {kind: Service, group: "", name: payments}
  action: DENY
  rules:
  - {}
"#;

const MULTI_SOURCE: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: multi-source, namespace: finance}
spec:
  rules:
  - from:
    - source: {namespaces: ["prod"], principals: ["cluster.local/ns/prod/sa/orders"]}
    - source: {ipBlocks: ["10.5.0.0/16"]}
"#;

const REQUIRE_IDENTITY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: require-mtls, namespace: finance}
spec:
  action: DENY
  rules:
  - from:
    - source: {notPrincipals: ["*"]}
"#;

const IPV6_AND_PORT_ALTERNATIVES: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: v6, namespace: finance}
spec:
  rules:
  - from:
    - source: {ipBlocks: ["fd00:10::/32"]}
    to:
    - operation: {ports: ["80"]}
    - operation: {ports: ["443"]}
"#;

const NS_DISABLE: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: off, namespace: finance}
spec: {mtls: {mode: DISABLE}}
"#;

struct AuthzCase {
    name: &'static str,
    policies: &'static [&'static str],
    ns: &'static str,
    labels: &'static [(&'static str, &'static str)],
    /// `namespace/serviceaccount` in cluster.local, or `None` for plaintext.
    from: Option<&'static str>,
    src_ip: &'static str,
    dst: &'static str,
    allowed: bool,
    policy: Option<&'static str>,
    reason: &'static str,
}

#[test]
fn authorization_decisions() {
    let pay = &[("app", "payments")][..];
    let other = &[("app", "ledger")][..];
    let cases = [
        AuthzCase {
            name: "no policy: allowed",
            policies: &[],
            ns: "finance",
            labels: pay,
            from: Some("prod/inventory"),
            src_ip: "10.0.2.5",
            dst: "10.0.1.10:9090",
            allowed: true,
            policy: None,
            reason: "no ALLOW policy",
        },
        AuthzCase {
            name: "only orders may reach payments on 9090: orders allowed",
            policies: &[ONLY_ORDERS_TO_PAYMENTS],
            ns: "finance",
            labels: pay,
            from: Some("prod/orders"),
            src_ip: "10.0.2.4",
            dst: "10.0.1.10:9090",
            allowed: true,
            policy: Some("finance/payments-allow-orders"),
            reason: "rule 0 matched",
        },
        AuthzCase {
            name: "inventory with a valid certificate is denied",
            policies: &[ONLY_ORDERS_TO_PAYMENTS],
            ns: "finance",
            labels: pay,
            from: Some("prod/inventory"),
            src_ip: "10.0.2.5",
            dst: "10.0.1.10:9090",
            allowed: false,
            policy: Some("finance/payments-allow-orders"),
            reason: "principals [cluster.local/ns/prod/sa/orders] do not include cluster.local/ns/prod/sa/inventory",
        },
        AuthzCase {
            name: "orders on another port is denied",
            policies: &[ONLY_ORDERS_TO_PAYMENTS],
            ns: "finance",
            labels: pay,
            from: Some("prod/orders"),
            src_ip: "10.0.2.4",
            dst: "10.0.1.10:9091",
            allowed: false,
            policy: Some("finance/payments-allow-orders"),
            reason: "ports [9090] do not include 9091",
        },
        AuthzCase {
            name: "plaintext peer cannot match principals",
            policies: &[ONLY_ORDERS_TO_PAYMENTS],
            ns: "finance",
            labels: pay,
            from: None,
            src_ip: "10.0.2.4",
            dst: "10.0.1.10:9090",
            allowed: false,
            policy: Some("finance/payments-allow-orders"),
            reason: "(none: plaintext peer)",
        },
        AuthzCase {
            name: "the selector policy does not apply to another workload",
            policies: &[ONLY_ORDERS_TO_PAYMENTS],
            ns: "finance",
            labels: other,
            from: Some("prod/inventory"),
            src_ip: "10.0.2.5",
            dst: "10.0.1.11:9090",
            allowed: true,
            policy: None,
            reason: "no ALLOW policy",
        },
        AuthzCase {
            name: "ALLOW with methods and paths never matches at L4",
            policies: &[ALLOW_POST_CHARGE],
            ns: "finance",
            labels: pay,
            from: Some("prod/orders"),
            src_ip: "10.0.2.4",
            dst: "10.0.1.10:9090",
            allowed: false,
            policy: Some("finance/charge-http"),
            reason: "uses HTTP fields [to[0].operation.methods, to[0].operation.paths] that are not checked on this port, so this ALLOW rule never matches",
        },
        AuthzCase {
            name: "an L4 ALLOW beside the L7 one still allows",
            policies: &[ALLOW_POST_CHARGE, ONLY_ORDERS_TO_PAYMENTS],
            ns: "finance",
            labels: pay,
            from: Some("prod/orders"),
            src_ip: "10.0.2.4",
            dst: "10.0.1.10:9090",
            allowed: true,
            policy: Some("finance/payments-allow-orders"),
            reason: "rule 0 matched",
        },
        AuthzCase {
            name: "DENY ignores L7 fields, so it denies all prod traffic",
            policies: &[DENY_POST],
            ns: "finance",
            labels: other,
            from: Some("prod/orders"),
            src_ip: "10.0.2.4",
            dst: "10.0.1.11:8080",
            allowed: false,
            policy: Some("finance/deny-post"),
            reason: "DENY policy finance/deny-post rule 0 matched",
        },
        AuthzCase {
            name: "DENY with L7 fields still needs its L4 fields to match",
            policies: &[DENY_POST],
            ns: "finance",
            labels: other,
            from: Some("shop/web"),
            src_ip: "10.0.2.6",
            dst: "10.0.1.11:8080",
            allowed: true,
            policy: None,
            reason: "no ALLOW policy",
        },
        AuthzCase {
            name: "DENY before ALLOW",
            policies: &[ALLOW_ALL, DENY_LEGACY],
            ns: "finance",
            labels: pay,
            from: Some("legacy/batch"),
            src_ip: "10.0.3.1",
            dst: "10.0.1.10:9090",
            allowed: false,
            policy: Some("finance/deny-legacy"),
            reason: "DENY policy",
        },
        AuthzCase {
            name: "allow-all rule `{}` allows plaintext too",
            policies: &[ALLOW_ALL],
            ns: "finance",
            labels: pay,
            from: None,
            src_ip: "10.0.3.1",
            dst: "10.0.1.10:9090",
            allowed: true,
            policy: Some("finance/allow-all"),
            reason: "rule 0 matched",
        },
        AuthzCase {
            name: "ALLOW with empty spec denies everything",
            policies: &[ALLOW_NOTHING],
            ns: "finance",
            labels: pay,
            from: Some("prod/orders"),
            src_ip: "10.0.2.4",
            dst: "10.0.1.10:9090",
            allowed: false,
            policy: Some("finance/allow-nothing"),
            reason: "no rules",
        },
        AuthzCase {
            name: "mesh-wide DENY in the root namespace applies everywhere",
            policies: &[DENY_ALL_MESH],
            ns: "shop",
            labels: &[],
            from: Some("prod/orders"),
            src_ip: "10.0.2.4",
            dst: "10.0.4.1:80",
            allowed: false,
            policy: Some("istio-system/deny-all"),
            reason: "DENY",
        },
        AuthzCase {
            name: "namespace policy does not apply in another namespace",
            policies: &[ALLOW_NOTHING],
            ns: "shop",
            labels: &[],
            from: Some("prod/orders"),
            src_ip: "10.0.2.4",
            dst: "10.0.4.1:80",
            allowed: true,
            policy: None,
            reason: "no ALLOW policy",
        },
        AuthzCase {
            name: "principal prefix matches",
            policies: &[PREFIX_SUFFIX],
            ns: "finance",
            labels: pay,
            from: Some("prod/anything"),
            src_ip: "10.0.2.4",
            dst: "10.0.1.10:9090",
            allowed: true,
            policy: Some("finance/patterns"),
            reason: "rule 0 matched",
        },
        AuthzCase {
            name: "principal suffix matches in another namespace",
            policies: &[PREFIX_SUFFIX],
            ns: "finance",
            labels: pay,
            from: Some("ops/auditor"),
            src_ip: "10.0.2.4",
            dst: "10.0.1.10:9090",
            allowed: true,
            policy: Some("finance/patterns"),
            reason: "rule 1 matched",
        },
        AuthzCase {
            name: "neither prefix nor suffix",
            policies: &[PREFIX_SUFFIX],
            ns: "finance",
            labels: pay,
            from: Some("ops/deployer"),
            src_ip: "10.0.2.4",
            dst: "10.0.1.10:9090",
            allowed: false,
            policy: Some("finance/patterns"),
            reason: "rule 1: from: principals [*/sa/auditor]",
        },
        AuthzCase {
            name: "presence `*` matches any identity",
            policies: &[PRESENCE],
            ns: "finance",
            labels: pay,
            from: Some("shop/web"),
            src_ip: "10.0.2.6",
            dst: "10.0.1.10:9090",
            allowed: true,
            policy: Some("finance/any-identity"),
            reason: "matched",
        },
        AuthzCase {
            name: "presence `*` does not match a plaintext peer",
            policies: &[PRESENCE],
            ns: "finance",
            labels: pay,
            from: None,
            src_ip: "10.0.2.6",
            dst: "10.0.1.10:9090",
            allowed: false,
            policy: Some("finance/any-identity"),
            reason: "principals [*] do not include (none: plaintext peer)",
        },
        AuthzCase {
            name: "not forms: all hold",
            policies: &[NOT_FORMS],
            ns: "finance",
            labels: pay,
            from: Some("prod/orders"),
            src_ip: "10.0.2.4",
            dst: "10.0.1.10:9090",
            allowed: true,
            policy: Some("finance/not-forms"),
            reason: "matched",
        },
        AuthzCase {
            name: "notNamespaces excludes dev",
            policies: &[NOT_FORMS],
            ns: "finance",
            labels: pay,
            from: Some("dev/tool"),
            src_ip: "10.0.2.4",
            dst: "10.0.1.10:9090",
            allowed: false,
            policy: Some("finance/not-forms"),
            reason: "notNamespaces excludes dev",
        },
        AuthzCase {
            name: "notIpBlocks excludes the range",
            policies: &[NOT_FORMS],
            ns: "finance",
            labels: pay,
            from: Some("prod/orders"),
            src_ip: "10.9.1.1",
            dst: "10.0.1.10:9090",
            allowed: false,
            policy: Some("finance/not-forms"),
            reason: "notIpBlocks excludes 10.9.1.1",
        },
        AuthzCase {
            name: "notPorts excludes 22",
            policies: &[NOT_FORMS],
            ns: "finance",
            labels: pay,
            from: Some("prod/orders"),
            src_ip: "10.0.2.4",
            dst: "10.0.1.10:22",
            allowed: false,
            policy: Some("finance/not-forms"),
            reason: "notPorts excludes 22",
        },
        AuthzCase {
            name: "notNamespaces matches a plaintext peer (no namespace to exclude)",
            policies: &[NOT_FORMS],
            ns: "finance",
            labels: pay,
            from: None,
            src_ip: "10.0.2.4",
            dst: "10.0.1.10:9090",
            allowed: true,
            policy: Some("finance/not-forms"),
            reason: "matched",
        },
        AuthzCase {
            name: "ipBlocks CIDR matches a plaintext source",
            policies: &[IP_BLOCKS],
            ns: "finance",
            labels: pay,
            from: None,
            src_ip: "10.1.200.3",
            dst: "10.0.1.10:9090",
            allowed: true,
            policy: Some("finance/from-nodes"),
            reason: "matched",
        },
        AuthzCase {
            name: "ipBlocks single address matches",
            policies: &[IP_BLOCKS],
            ns: "finance",
            labels: pay,
            from: None,
            src_ip: "192.168.7.7",
            dst: "10.0.1.10:9090",
            allowed: true,
            policy: Some("finance/from-nodes"),
            reason: "matched",
        },
        AuthzCase {
            name: "ipBlocks outside the ranges",
            policies: &[IP_BLOCKS],
            ns: "finance",
            labels: pay,
            from: Some("prod/orders"),
            src_ip: "192.168.7.8",
            dst: "10.0.1.10:9090",
            allowed: false,
            policy: Some("finance/from-nodes"),
            reason: "ipBlocks [10.1.0.0/16, 192.168.7.7/32] do not include 192.168.7.8",
        },
        AuthzCase {
            name: "when keys all hold",
            policies: &[WHEN_KEYS],
            ns: "finance",
            labels: pay,
            from: Some("prod/orders"),
            src_ip: "10.0.2.4",
            dst: "10.0.1.10:9090",
            allowed: true,
            policy: Some("finance/when-keys"),
            reason: "matched",
        },
        AuthzCase {
            name: "when destination.port notValues excludes 8443",
            policies: &[WHEN_KEYS],
            ns: "finance",
            labels: pay,
            from: Some("prod/orders"),
            src_ip: "10.0.2.4",
            dst: "10.0.1.10:8443",
            allowed: false,
            policy: Some("finance/when-keys"),
            reason: "when[1] destination.port: notPorts excludes 8443",
        },
        AuthzCase {
            name: "when destination.ip outside the range",
            policies: &[WHEN_KEYS],
            ns: "finance",
            labels: pay,
            from: Some("prod/orders"),
            src_ip: "10.0.2.4",
            dst: "10.0.9.10:9090",
            allowed: false,
            policy: Some("finance/when-keys"),
            reason: "when[2] destination.ip",
        },
        AuthzCase {
            name: "when source.principal and source.ip notValues: DENY matches",
            policies: &[WHEN_PRINCIPAL_IP],
            ns: "finance",
            labels: pay,
            from: Some("prod/inventory"),
            src_ip: "10.0.3.5",
            dst: "10.0.1.10:9090",
            allowed: false,
            policy: Some("finance/when-principal"),
            reason: "DENY policy finance/when-principal rule 0 matched",
        },
        AuthzCase {
            name: "when source.ip notValues spares the excluded range",
            policies: &[WHEN_PRINCIPAL_IP],
            ns: "finance",
            labels: pay,
            from: Some("prod/inventory"),
            src_ip: "10.0.2.5",
            dst: "10.0.1.10:9090",
            allowed: true,
            policy: None,
            reason: "no ALLOW policy",
        },
        AuthzCase {
            name: "ALLOW rule with an L7 when key never matches",
            policies: &[WHEN_L7_ALLOW],
            ns: "finance",
            labels: pay,
            from: Some("prod/orders"),
            src_ip: "10.0.2.4",
            dst: "10.0.1.10:9090",
            allowed: false,
            policy: Some("finance/header-allow"),
            reason: "when[0].request.headers[x-token]",
        },
        AuthzCase {
            name: "serviceAccounts with namespace",
            policies: &[SERVICE_ACCOUNTS],
            ns: "finance",
            labels: pay,
            from: Some("prod/orders"),
            src_ip: "10.0.2.4",
            dst: "10.0.1.10:9090",
            allowed: true,
            policy: Some("finance/by-sa"),
            reason: "matched",
        },
        AuthzCase {
            name: "serviceAccounts without namespace means the policy's namespace",
            policies: &[SERVICE_ACCOUNTS],
            ns: "finance",
            labels: pay,
            from: Some("finance/billing"),
            src_ip: "10.0.1.4",
            dst: "10.0.1.10:9090",
            allowed: true,
            policy: Some("finance/by-sa"),
            reason: "matched",
        },
        AuthzCase {
            name: "serviceAccounts: same name in another namespace does not match",
            policies: &[SERVICE_ACCOUNTS],
            ns: "finance",
            labels: pay,
            from: Some("prod/billing"),
            src_ip: "10.0.2.7",
            dst: "10.0.1.10:9090",
            allowed: false,
            policy: Some("finance/by-sa"),
            reason: "serviceAccounts [prod/orders, finance/billing] do not include prod/billing",
        },
        AuthzCase {
            name: "root namespace selector policy selects in every namespace",
            policies: &[MESH_ALLOW_SELECTOR],
            ns: "shop",
            labels: pay,
            from: Some("dev/tool"),
            src_ip: "10.0.2.9",
            dst: "10.0.4.2:9090",
            allowed: false,
            policy: Some("istio-system/mesh-payments"),
            reason: "namespaces [prod] do not include dev",
        },
        AuthzCase {
            name: "from entries OR: the second source matches",
            policies: &[MULTI_SOURCE],
            ns: "finance",
            labels: pay,
            from: None,
            src_ip: "10.5.1.1",
            dst: "10.0.1.10:9090",
            allowed: true,
            policy: Some("finance/multi-source"),
            reason: "matched",
        },
        AuthzCase {
            name: "fields of one source AND: namespace right, principal wrong",
            policies: &[MULTI_SOURCE],
            ns: "finance",
            labels: pay,
            from: Some("prod/inventory"),
            src_ip: "10.0.2.5",
            dst: "10.0.1.10:9090",
            allowed: false,
            policy: Some("finance/multi-source"),
            reason: "from: [0]: principals",
        },
        AuthzCase {
            name: "AUDIT does not change the decision",
            policies: &[AUDIT_PROD],
            ns: "finance",
            labels: pay,
            from: Some("prod/orders"),
            src_ip: "10.0.2.4",
            dst: "10.0.1.10:9090",
            allowed: true,
            policy: None,
            reason: "no ALLOW policy",
        },
        AuthzCase {
            name: "dry-run DENY does not deny",
            policies: &[DRY_RUN_DENY],
            ns: "finance",
            labels: pay,
            from: Some("prod/orders"),
            src_ip: "10.0.2.4",
            dst: "10.0.1.10:9090",
            allowed: true,
            policy: None,
            reason: "no ALLOW policy",
        },
        AuthzCase {
            name: "dry-run ALLOW does not turn on default deny",
            policies: &[DRY_RUN_ALLOW_NOTHING],
            ns: "finance",
            labels: pay,
            from: Some("prod/orders"),
            src_ip: "10.0.2.4",
            dst: "10.0.1.10:9090",
            allowed: true,
            policy: None,
            reason: "no ALLOW policy",
        },
        AuthzCase {
            name: "CUSTOM fails closed for the workloads it selects",
            policies: &[CUSTOM, ALLOW_ALL],
            ns: "finance",
            labels: pay,
            from: Some("prod/orders"),
            src_ip: "10.0.2.4",
            dst: "10.0.1.10:9090",
            allowed: false,
            policy: Some("finance/ext-authz"),
            reason: "CUSTOM policy finance/ext-authz (provider opa) is not supported",
        },
        AuthzCase {
            name: "CUSTOM does not touch workloads it does not select",
            policies: &[CUSTOM],
            ns: "finance",
            labels: other,
            from: Some("prod/orders"),
            src_ip: "10.0.2.4",
            dst: "10.0.1.11:9090",
            allowed: true,
            policy: None,
            reason: "no ALLOW policy",
        },
        AuthzCase {
            name: "targetRefs policies are for waypoints, not this tunnel",
            policies: &[TARGET_REFS],
            ns: "finance",
            labels: pay,
            from: Some("prod/orders"),
            src_ip: "10.0.2.4",
            dst: "10.0.1.10:9090",
            allowed: true,
            policy: None,
            reason: "no ALLOW policy",
        },
        AuthzCase {
            name: "STRICT refuses plaintext before any ALLOW",
            policies: &[PAYMENTS_STRICT, ALLOW_ALL],
            ns: "finance",
            labels: pay,
            from: None,
            src_ip: "10.0.3.1",
            dst: "10.0.1.10:9090",
            allowed: false,
            policy: Some("finance/payments-strict"),
            reason: "plaintext refused: mTLS mode STRICT for port 9090",
        },
        AuthzCase {
            name: "STRICT lets an mTLS peer through to authorization",
            policies: &[PAYMENTS_STRICT, ONLY_ORDERS_TO_PAYMENTS],
            ns: "finance",
            labels: pay,
            from: Some("prod/orders"),
            src_ip: "10.0.2.4",
            dst: "10.0.1.10:9090",
            allowed: true,
            policy: Some("finance/payments-allow-orders"),
            reason: "matched",
        },
        AuthzCase {
            name: "PERMISSIVE accepts plaintext",
            policies: &[MESH_PERMISSIVE],
            ns: "finance",
            labels: pay,
            from: None,
            src_ip: "10.0.3.1",
            dst: "10.0.1.10:9090",
            allowed: true,
            policy: None,
            reason: "no ALLOW policy",
        },
        AuthzCase {
            name: "PERMISSIVE accepts mTLS",
            policies: &[MESH_PERMISSIVE],
            ns: "finance",
            labels: pay,
            from: Some("prod/orders"),
            src_ip: "10.0.2.4",
            dst: "10.0.1.10:9090",
            allowed: true,
            policy: None,
            reason: "no ALLOW policy",
        },
        AuthzCase {
            name: "STRICT in test does not refuse plaintext in default",
            policies: &[TEST_NS_STRICT],
            ns: "default",
            labels: &[],
            from: None,
            src_ip: "10.0.3.1",
            dst: "10.0.4.5:80",
            allowed: true,
            policy: None,
            reason: "no ALLOW policy",
        },
        AuthzCase {
            name: "DENY notPrincipals [*] refuses a plaintext peer",
            policies: &[REQUIRE_IDENTITY],
            ns: "finance",
            labels: pay,
            from: None,
            src_ip: "10.0.3.1",
            dst: "10.0.1.10:9090",
            allowed: false,
            policy: Some("finance/require-mtls"),
            reason: "DENY policy finance/require-mtls rule 0 matched",
        },
        AuthzCase {
            name: "DENY notPrincipals [*] lets any identity through",
            policies: &[REQUIRE_IDENTITY],
            ns: "finance",
            labels: pay,
            from: Some("shop/web"),
            src_ip: "10.0.2.6",
            dst: "10.0.1.10:9090",
            allowed: true,
            policy: None,
            reason: "no ALLOW policy",
        },
        AuthzCase {
            name: "IPv6 ipBlocks and the second of two operations match",
            policies: &[IPV6_AND_PORT_ALTERNATIVES],
            ns: "finance",
            labels: pay,
            from: None,
            src_ip: "fd00:10::7",
            dst: "[fd00:20::10]:443",
            allowed: true,
            policy: Some("finance/v6"),
            reason: "rule 0 matched",
        },
        AuthzCase {
            name: "no operation lists the port",
            policies: &[IPV6_AND_PORT_ALTERNATIVES],
            ns: "finance",
            labels: pay,
            from: None,
            src_ip: "fd00:10::7",
            dst: "[fd00:20::10]:8443",
            allowed: false,
            policy: Some("finance/v6"),
            reason: "to: [0]: ports [80] do not include 8443; [1]: ports [443] do not include 8443",
        },
        AuthzCase {
            name: "DISABLE accepts plaintext",
            policies: &[NS_DISABLE],
            ns: "finance",
            labels: pay,
            from: None,
            src_ip: "10.0.3.1",
            dst: "10.0.1.10:9090",
            allowed: true,
            policy: None,
            reason: "no ALLOW policy",
        },
    ];
    assert!(cases.len() >= 40);
    for case in cases {
        let policies = compile_all(&case.policies.join("\n---\n"));
        let identity = case.from.map(|f| {
            let (ns, sa) = f.split_once('/').expect("ns/sa");
            Identity::new("cluster.local", ns, sa).expect("test identity")
        });
        let d = decide(
            &policies,
            case.ns,
            &labels(case.labels),
            identity.as_ref(),
            case.src_ip,
            case.dst,
        );
        assert_eq!(d.allowed, case.allowed, "{}: {d:?}", case.name);
        assert_eq!(
            d.policy.as_ref().map(ToString::to_string).as_deref(),
            case.policy,
            "{}: {d:?}",
            case.name
        );
        assert!(
            d.reason.contains(case.reason),
            "{}: reason {:?} does not contain {:?}",
            case.name,
            d.reason,
            case.reason
        );
    }
}

#[test]
fn audit_and_dry_run_are_reported() {
    let policies = compile_all(&[AUDIT_PROD, DRY_RUN_DENY, DRY_RUN_ALLOW_NOTHING].join("\n---\n"));
    let id = Identity::new("cluster.local", "prod", "orders").unwrap();
    let d = decide(
        &policies,
        "finance",
        &Labels::new(),
        Some(&id),
        "10.0.2.4",
        "10.0.1.10:9090",
    );
    assert!(d.allowed);
    assert_eq!(d.audit.len(), 1);
    assert_eq!(d.audit[0].to_string(), "finance/audit-prod");
    assert_eq!(d.dry_run.len(), 2);
    assert_eq!(d.dry_run[0].policy.to_string(), "finance/dry-deny");
    assert_eq!(d.dry_run[0].rule, Some(0));
    assert_eq!(d.dry_run[1].policy.to_string(), "finance/dry-lockdown");
    assert_eq!(d.dry_run[1].rule, None);
}

#[test]
fn warnings_name_the_l7_fields_and_unsupported_parts() {
    let policies =
        compile_all(&[ALLOW_POST_CHARGE, DENY_POST, CUSTOM, TARGET_REFS].join("\n---\n"));
    let w: Vec<String> = policies.iter().map(|p| p.warnings().join(" ")).collect();
    assert!(w[0].contains("[to[0].operation.methods, to[0].operation.paths]"));
    assert!(w[0].contains("this ALLOW rule never matches"));
    assert!(w[1].contains("this DENY rule ignores them"));
    assert!(w[2].contains("CUSTOM action (provider opa) is not supported"));
    assert!(w[3].contains("does not enforce it"));
}

#[test]
fn invalid_documents_are_rejected_with_the_field() {
    let cases = [
        (
            "apiVersion: security.istio.io/v2\nkind: PeerAuthentication\nmetadata: {name: a, namespace: b}\n",
            "apiVersion: \"security.istio.io/v2\" is not one of",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: Sidecar\nmetadata: {name: a, namespace: b}\n",
            "kind: \"Sidecar\" is not",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: a}\n",
            "metadata.namespace: required",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: a, namespace: b}\nspec: {portLevelMtls: {80: {mode: STRICT}}}\n",
            "spec.portLevelMtls: portLevelMtls requires a workload selector",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: a, namespace: b}\nspec: {action: DENY}\n",
            "spec.action: not a field of PeerAuthentication",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: b}\nspec: {rules: [{when: [{key: source.ip, values: [nope]}]}]}\n",
            "spec.rules[0].when[0].values[0]: \"nope\" is not an IP address or CIDR",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: b}\nspec: {rules: [{when: [{key: source.principals, values: [x]}]}]}\n",
            "spec.rules[0].when[0].key: unknown key \"source.principals\"",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: b}\nspec: {rules: [{from: [{source: {}}]}]}\n",
            "spec.rules[0].from[0].source: a source needs at least one field",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: b}\nspec: {action: CUSTOM}\n",
            "spec.provider: a CUSTOM policy needs a provider",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: b, annotations: {istio.io/dry-run: maybe}}\nspec: {}\n",
            "\"maybe\" is not \"true\" or \"false\"",
        ),
    ];
    for (yaml, want) in cases {
        let doc: Document = serde_yaml::from_str(yaml).expect("valid YAML");
        let err = doc.compile().expect_err(yaml).to_string();
        assert!(
            err.contains(want),
            "{yaml}: {err:?} does not contain {want:?}"
        );
    }
}

#[test]
fn yaml_level_errors_carry_the_location() {
    let cases = [
        (
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: b}\nspec:\n  rules:\n  - from:\n    - source:\n        principal: [x]\n",
            "unknown field `principal`",
            8,
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: b}\nspec:\n  rules:\n  - from:\n    - source:\n        ipBlocks: [\"10.0.0/8\"]\n",
            "\"10.0.0/8\" is not an IP address or CIDR",
            8,
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: b}\nspec:\n  rules:\n  - to:\n    - operation:\n        ports: [\"70000\"]\n",
            "port \"70000\" is not a number in 1..=65535",
            8,
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: a, namespace: b}\nspec:\n  mtls:\n    mode: strict\n",
            "unknown variant `strict`",
            6,
        ),
    ];
    for (yaml, want, line) in cases {
        let err = serde_yaml::from_str::<Document>(yaml).expect_err(yaml);
        assert!(
            err.to_string().contains(want),
            "{err} does not contain {want:?}"
        );
        assert_eq!(err.location().map(|l| l.line()), Some(line), "{err}");
    }
}

#[test]
fn the_cluster_example_policies_compile_unchanged() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/examples/policies.yaml"
    );
    let text = std::fs::read_to_string(path).unwrap();
    let policies = compile_all(&text);
    let names: Vec<String> = policies.iter().map(|p| p.reference().to_string()).collect();
    assert_eq!(
        names,
        [
            "shop/default",
            "finance/default",
            "finance/payments-strict",
            "finance/orders-to-payments",
            "finance/deny-inventory"
        ]
    );
    let pay = labels(&[("app", "payments")]);
    let orders = Identity::new("cluster.local", "shop", "orders").unwrap();
    let inventory = Identity::new("cluster.local", "warehouse", "inventory").unwrap();
    let ok = decide(
        &policies,
        "finance",
        &pay,
        Some(&orders),
        "10.0.2.4",
        "10.0.1.10:9090",
    );
    assert!(ok.allowed, "{ok:?}");
    let d = decide(
        &policies,
        "finance",
        &pay,
        Some(&inventory),
        "10.0.2.5",
        "10.0.1.10:9090",
    );
    assert_eq!(d.policy.unwrap().to_string(), "finance/deny-inventory");
    let plain = decide(
        &policies,
        "shop",
        &Labels::new(),
        None,
        "10.0.3.1",
        "10.0.2.4:8080",
    );
    assert_eq!(plain.policy.unwrap().to_string(), "shop/default");
}

/// Istio's own path normalization expectations (its integration tests of
/// `meshConfig.pathNormalization`), plus the bypass forms of a DENY on `/admin*`.
#[test]
fn path_normalization_follows_istio() {
    use PathNormalization::{Base, DecodeAndMergeSlashes as Decode, MergeSlashes as Merge, None};
    let cases: &[(PathNormalization, &str, &str)] = &[
        (None, "/app/../admin", "/app/../admin"),
        (None, "/app//", "/app//"),
        (None, "/xyz%30..//abc", "/xyz%30..//abc"),
        (None, "/a?x=/../b", "/a"),
        (Base, "/", "/"),
        (Base, "/app#foo", "/app"),
        (Base, "/app/", "/app/"),
        (Base, "/app/../admin", "/admin"),
        (Base, "/app//", "/app//"),
        (Base, "/app/%2f", "/app/%2f"),
        (Base, "/app%2f/", "/app%2f/"),
        (Base, "/xyz%30..//abc", "/xyz0..//abc"),
        (Base, "/app/%2E./admin", "/admin"),
        (Base, r"/app\admin", "/app/admin"),
        (Base, r"/app/\/\/\admin", "/app//////admin"),
        (Base, r"/%2Fapp%5cadmin%5Cabc", r"/%2Fapp%5cadmin%5Cabc"),
        (
            Base,
            r"/%5Capp%2f%5c%2F%2e%2e%2fadmin%5c\abc",
            r"/%5Capp%2f%5c%2F..%2fadmin%5c/abc",
        ),
        (Base, "/app//../admin", "/app/admin"),
        (Base, "/app//../../admin", "/admin"),
        (Base, "/a/..", "/"),
        (Base, "/a/.", "/a/"),
        (Base, "/../../x", "/x"),
        (Base, "/%61dmin", "/admin"),
        (Base, "/a%7Eb%2Dc%5F", "/a~b-c_"),
        (Base, "/caf%C3%A9", "/caf%C3%A9"),
        (Base, "/100%zz", "/100%zz"),
        (Base, "/charge?amount=1", "/charge"),
        (Merge, "/app//", "/app/"),
        (Merge, "/app/%2f", "/app/%2f"),
        (Merge, "/xyz%30..//abc", "/xyz0../abc"),
        (Merge, r"/app/\/\/\admin", "/app/admin"),
        (Merge, r"/%2Fapp%5cadmin%5Cabc", r"/%2Fapp%5cadmin%5Cabc"),
        (Merge, "/app//../../admin", "/admin"),
        (Merge, "/x//../admin", "/admin"),
        (Merge, "/x/.//", "/x/"),
        (Merge, "//", "/"),
        (Decode, "/x//../%2Fadmin?q=1", "/admin"),
        (Decode, "/x/%2F%2F..%2Fadmin", "/admin"),
        (Decode, "/app/%2f", "/app/"),
        (Decode, "/app%2f/", "/app/"),
        (Decode, r"/%2Fapp%5cadmin%5Cabc", "/app/admin/abc"),
        // Envoy gives /app/admin/abc (its `..` removes the empty segment of `//`);
        // slashes merged first, as an application reads the path, give /admin/abc.
        (
            Decode,
            r"/%5Capp%2f%5c%2F%2e%2e%2fadmin%5c\abc",
            "/admin/abc",
        ),
        (Decode, "/%c0%2e%c0%2e/admin", "/%c0.%c0./admin"),
        (Decode, "/%c0%2fadmin", "/%c0/admin"),
        (Decode, "/%252e%252e/admin", "/%252e%252e/admin"),
        (Decode, "/..;/admin", "/..;/admin"),
        (Decode, "/ADMIN", "/ADMIN"),
        (Decode, "//admin", "/admin"),
        (Decode, "/./admin", "/admin"),
        (Decode, "/x/../admin", "/admin"),
        (Decode, "/%2Fadmin", "/admin"),
        (Decode, "/%61dmin", "/admin"),
        (Decode, "/%2e%2e/admin", "/admin"),
    ];
    for (mode, input, want) in cases {
        assert_eq!(
            normalize_path(input, *mode).as_deref(),
            Ok(*want),
            "{mode} {input}"
        );
    }
    for mode in [None, Base, Merge, Decode] {
        for bad in ["/admin%00", "/a\0b", "admin", "", "*"] {
            let e = normalize_path(bad, mode).expect_err(bad);
            assert_eq!(e.path, bad, "{mode}");
            assert!(e.to_string().contains("cannot be normalized"), "{e}");
        }
    }
    // Decoding that spells a new escape: the application, decoding again, would read
    // another path than the rules saw (`/%2fadmin`, then `//admin`).
    for (mode, bad) in [
        (Base, "/%%333"),
        (Merge, "/%%333"),
        (Decode, "/%%333"),
        (Decode, "/%2%66admin"),
        (Decode, "/x/../%GET%%%%%%33333"),
    ] {
        let e = normalize_path(bad, mode).expect_err(bad);
        assert!(e.to_string().contains("another escape"), "{mode} {e}");
    }
    // Where nothing new is spelled, or the mode keeps escapes, the path passes.
    assert_eq!(normalize_path("/%%33x", Base).as_deref(), Ok("/%3x"));
    assert_eq!(
        normalize_path("/%2%66admin", Base).as_deref(),
        Ok("/%2fadmin")
    );
    assert_eq!(normalize_path("/%%333", None).as_deref(), Ok("/%%333"));
}

/// One HTTP request in a test: method, raw path, host, headers.
struct Req {
    method: &'static str,
    path: &'static str,
    host: Option<&'static str>,
    headers: &'static [(&'static str, &'static str)],
}

const fn req(method: &'static str, path: &'static str) -> Req {
    Req {
        method,
        path,
        host: Option::None,
        headers: &[],
    }
}

struct RequestCase {
    name: &'static str,
    policies: &'static [&'static str],
    from: Option<&'static str>,
    dst: &'static str,
    request: Req,
    allowed: bool,
    policy: Option<&'static str>,
    reason: &'static str,
}

fn identity_of(from: Option<&str>) -> Option<Identity> {
    from.map(|f| {
        let (ns, sa) = f.split_once('/').expect("ns/sa");
        Identity::new("cluster.local", ns, sa).expect("test identity")
    })
}

/// Decides one request to a `finance` workload labelled `app: payments`, with the path
/// normalized as the tunnel does by default.
fn decide_request(policies: &[Policy], from: Option<&Identity>, dst: &str, r: &Req) -> Decision {
    let dst: SocketAddr = dst.parse().expect("test address");
    let labels = labels(&[("app", "payments")]);
    let target = Target {
        namespace: "finance",
        labels: &labels,
    };
    let authz: Vec<&AuthorizationPolicy> = policies
        .iter()
        .filter_map(|p| match p {
            Policy::Authz(a) if a.selects(ROOT, target) => Some(a),
            _ => Option::None,
        })
        .collect();
    let mut headers = ::http::HeaderMap::new();
    for (k, v) in r.headers {
        headers.append(
            ::http::HeaderName::from_bytes(k.as_bytes()).expect("test header"),
            ::http::HeaderValue::from_str(v).expect("test header"),
        );
    }
    let path = normalize_path(r.path, PathNormalization::default()).expect("test path");
    let request = Request {
        method: r.method,
        path: &path,
        host: r.host,
        headers: &headers,
    };
    let conn = Connection {
        src_ip: "10.0.2.4".parse().expect("test address"),
        identity: from,
        dst,
        request: Some(&request),
    };
    evaluate(
        &mode_of(policies, "finance", &labels, dst.port()),
        &authz,
        &conn,
    )
}

const PAYMENTS_ALLOW_CHARGE: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: payments-allow, namespace: finance}
spec:
  selector: {matchLabels: {app: payments}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/prod/sa/orders"]}
    to:
    - operation:
        methods: ["POST"]
        paths: ["/charge"]
        ports: ["9090"]
"#;

const DENY_ADMIN: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: finance}
spec:
  action: DENY
  rules:
  - to:
    - operation: {paths: ["/admin*"]}
"#;

const MATCH_FORMS: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: forms, namespace: finance}
spec:
  rules:
  - to:
    - operation: {paths: ["/exact"]}
    - operation: {paths: ["/api/*"]}
    - operation: {paths: ["*.png"]}
    - operation: {methods: ["OPTIONS"], paths: ["*"]}
"#;

const HOSTS: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: hosts, namespace: finance}
spec:
  rules:
  - to:
    - operation:
        hosts: ["Payments.Finance.svc.cluster.local", "*.example.com"]
        notHosts: ["bad.example.com"]
"#;

const NOT_FIELDS: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: not-fields, namespace: finance}
spec:
  rules:
  - to:
    - operation:
        notMethods: ["DELETE"]
        notPaths: ["/internal*"]
"#;

const HEADERS: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: headers, namespace: finance}
spec:
  rules:
  - when:
    - key: request.headers[X-Tenant]
      values: ["acme", "beta*"]
    - key: request.headers[x-debug]
      notValues: ["*"]
"#;

const REQUEST_PRINCIPALS_ALLOW: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: jwt-allow, namespace: finance}
spec:
  rules:
  - from:
    - source: {requestPrincipals: ["issuer/subject"]}
    to:
    - operation: {methods: ["GET"]}
"#;

const JWT_DENY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: jwt-deny, namespace: finance}
spec:
  action: DENY
  rules:
  - to:
    - operation: {methods: ["DELETE"]}
    when:
    - key: request.auth.claims[group]
      values: ["guests"]
"#;

const GRPC_ALLOW: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: grpc, namespace: finance}
spec:
  rules:
  - to:
    - operation: {methods: ["POST"], paths: ["/pkg.Payments/Charge"]}
"#;

#[test]
fn request_decisions() {
    let cases = [
        RequestCase {
            name: "orders POST /charge is allowed",
            policies: &[PAYMENTS_ALLOW_CHARGE],
            from: Some("prod/orders"),
            dst: "10.0.1.10:9090",
            request: req("POST", "/charge"),
            allowed: true,
            policy: Some("finance/payments-allow"),
            reason: "ALLOW policy finance/payments-allow rule 0 matched for POST /charge",
        },
        RequestCase {
            name: "orders GET /charge: the method fails",
            policies: &[PAYMENTS_ALLOW_CHARGE],
            from: Some("prod/orders"),
            dst: "10.0.1.10:9090",
            request: req("GET", "/charge"),
            allowed: false,
            policy: Some("finance/payments-allow"),
            reason: "finance/payments-allow: rule 0: to: methods [POST] do not include GET",
        },
        RequestCase {
            name: "orders POST /refund: the path fails",
            policies: &[PAYMENTS_ALLOW_CHARGE],
            from: Some("prod/orders"),
            dst: "10.0.1.10:9090",
            request: req("POST", "/refund"),
            allowed: false,
            policy: Some("finance/payments-allow"),
            reason: "rule 0: to: paths [/charge] do not include /refund",
        },
        RequestCase {
            name: "inventory POST /charge: the principal fails",
            policies: &[PAYMENTS_ALLOW_CHARGE],
            from: Some("prod/inventory"),
            dst: "10.0.1.10:9090",
            request: req("POST", "/charge"),
            allowed: false,
            policy: Some("finance/payments-allow"),
            reason: "rule 0: from: principals [cluster.local/ns/prod/sa/orders] do not include cluster.local/ns/prod/sa/inventory",
        },
        RequestCase {
            name: "the query is not part of the path",
            policies: &[PAYMENTS_ALLOW_CHARGE],
            from: Some("prod/orders"),
            dst: "10.0.1.10:9090",
            request: req("POST", "/charge?amount=10"),
            allowed: true,
            policy: Some("finance/payments-allow"),
            reason: "rule 0 matched",
        },
        RequestCase {
            name: "ports is still checked per request",
            policies: &[PAYMENTS_ALLOW_CHARGE],
            from: Some("prod/orders"),
            dst: "10.0.1.10:8080",
            request: req("POST", "/charge"),
            allowed: false,
            policy: Some("finance/payments-allow"),
            reason: "ports [9090] do not include 8080",
        },
        RequestCase {
            name: "DENY /admin* denies /admin",
            policies: &[DENY_ADMIN, PAYMENTS_ALLOW_CHARGE],
            from: Some("prod/orders"),
            dst: "10.0.1.10:9090",
            request: req("POST", "/admin"),
            allowed: false,
            policy: Some("finance/deny-admin"),
            reason: "DENY policy finance/deny-admin rule 0 matched for POST /admin",
        },
        RequestCase {
            name: "DENY /admin* lets other paths through to the ALLOW",
            policies: &[DENY_ADMIN, PAYMENTS_ALLOW_CHARGE],
            from: Some("prod/orders"),
            dst: "10.0.1.10:9090",
            request: req("POST", "/charge"),
            allowed: true,
            policy: Some("finance/payments-allow"),
            reason: "rule 0 matched",
        },
        RequestCase {
            name: "DENY is decided before ALLOW: an allowed request on a denied path",
            policies: &[PAYMENTS_ALLOW_CHARGE, DENY_ADMIN],
            from: Some("prod/orders"),
            dst: "10.0.1.10:9090",
            request: req("POST", "/admin/charge"),
            allowed: false,
            policy: Some("finance/deny-admin"),
            reason: "DENY policy finance/deny-admin rule 0 matched",
        },
        RequestCase {
            name: "bypass //admin is denied",
            policies: &[DENY_ADMIN],
            from: Some("prod/orders"),
            dst: "10.0.1.10:9090",
            request: req("GET", "//admin"),
            allowed: false,
            policy: Some("finance/deny-admin"),
            reason: "for GET /admin",
        },
        RequestCase {
            name: "bypass /./admin is denied",
            policies: &[DENY_ADMIN],
            from: Some("prod/orders"),
            dst: "10.0.1.10:9090",
            request: req("GET", "/./admin"),
            allowed: false,
            policy: Some("finance/deny-admin"),
            reason: "for GET /admin",
        },
        RequestCase {
            name: "bypass /x/../admin is denied",
            policies: &[DENY_ADMIN],
            from: Some("prod/orders"),
            dst: "10.0.1.10:9090",
            request: req("GET", "/x/../admin"),
            allowed: false,
            policy: Some("finance/deny-admin"),
            reason: "for GET /admin",
        },
        RequestCase {
            name: "bypass /%2Fadmin is denied",
            policies: &[DENY_ADMIN],
            from: Some("prod/orders"),
            dst: "10.0.1.10:9090",
            request: req("GET", "/%2Fadmin"),
            allowed: false,
            policy: Some("finance/deny-admin"),
            reason: "for GET /admin",
        },
        RequestCase {
            name: "bypass /%61dmin is denied",
            policies: &[DENY_ADMIN],
            from: Some("prod/orders"),
            dst: "10.0.1.10:9090",
            request: req("GET", "/%61dmin"),
            allowed: false,
            policy: Some("finance/deny-admin"),
            reason: "for GET /admin",
        },
        RequestCase {
            name: "paths are case sensitive: /Admin is another path",
            policies: &[DENY_ADMIN],
            from: Some("prod/orders"),
            dst: "10.0.1.10:9090",
            request: req("GET", "/Admin"),
            allowed: true,
            policy: None,
            reason: "no ALLOW policy",
        },
        RequestCase {
            name: "exact path",
            policies: &[MATCH_FORMS],
            from: None,
            dst: "10.0.1.10:9090",
            request: req("GET", "/exact"),
            allowed: true,
            policy: Some("finance/forms"),
            reason: "rule 0 matched",
        },
        RequestCase {
            name: "exact path does not match a longer one",
            policies: &[MATCH_FORMS],
            from: None,
            dst: "10.0.1.10:9090",
            request: req("GET", "/exact/more"),
            allowed: false,
            policy: Some("finance/forms"),
            reason: "[0]: paths [/exact] do not include /exact/more",
        },
        RequestCase {
            name: "prefix path",
            policies: &[MATCH_FORMS],
            from: None,
            dst: "10.0.1.10:9090",
            request: req("GET", "/api/v1/x"),
            allowed: true,
            policy: Some("finance/forms"),
            reason: "rule 0 matched",
        },
        RequestCase {
            name: "suffix path",
            policies: &[MATCH_FORMS],
            from: None,
            dst: "10.0.1.10:9090",
            request: req("GET", "/img/logo.png"),
            allowed: true,
            policy: Some("finance/forms"),
            reason: "rule 0 matched",
        },
        RequestCase {
            name: "any path with a method",
            policies: &[MATCH_FORMS],
            from: None,
            dst: "10.0.1.10:9090",
            request: req("OPTIONS", "/whatever"),
            allowed: true,
            policy: Some("finance/forms"),
            reason: "rule 0 matched",
        },
        RequestCase {
            name: "no form matches",
            policies: &[MATCH_FORMS],
            from: None,
            dst: "10.0.1.10:9090",
            request: req("GET", "/apix"),
            allowed: false,
            policy: Some("finance/forms"),
            reason: "[3]: methods [OPTIONS] do not include GET",
        },
        RequestCase {
            name: "host exact, case-insensitive",
            policies: &[HOSTS],
            from: None,
            dst: "10.0.1.10:9090",
            request: Req {
                host: Some("payments.finance.svc.CLUSTER.local"),
                ..req("GET", "/")
            },
            allowed: true,
            policy: Some("finance/hosts"),
            reason: "rule 0 matched",
        },
        RequestCase {
            name: "host with its port",
            policies: &[HOSTS],
            from: None,
            dst: "10.0.1.10:9090",
            request: Req {
                host: Some("payments.finance.svc.cluster.local:9090"),
                ..req("GET", "/")
            },
            allowed: true,
            policy: Some("finance/hosts"),
            reason: "rule 0 matched",
        },
        RequestCase {
            name: "host suffix",
            policies: &[HOSTS],
            from: None,
            dst: "10.0.1.10:9090",
            request: Req {
                host: Some("api.example.com:443"),
                ..req("GET", "/")
            },
            allowed: true,
            policy: Some("finance/hosts"),
            reason: "rule 0 matched",
        },
        RequestCase {
            name: "notHosts excludes a host the suffix matches",
            policies: &[HOSTS],
            from: None,
            dst: "10.0.1.10:9090",
            request: Req {
                host: Some("BAD.example.com:80"),
                ..req("GET", "/")
            },
            allowed: false,
            policy: Some("finance/hosts"),
            reason: "notHosts excludes bad.example.com:80 (matches bad.example.com)",
        },
        RequestCase {
            name: "another host",
            policies: &[HOSTS],
            from: None,
            dst: "10.0.1.10:9090",
            request: Req {
                host: Some("evil.test"),
                ..req("GET", "/")
            },
            allowed: false,
            policy: Some("finance/hosts"),
            reason: "do not include evil.test",
        },
        RequestCase {
            name: "no host at all",
            policies: &[HOSTS],
            from: None,
            dst: "10.0.1.10:9090",
            request: req("GET", "/"),
            allowed: false,
            policy: Some("finance/hosts"),
            reason: "do not include (no host)",
        },
        RequestCase {
            name: "notMethods and notPaths pass other requests",
            policies: &[NOT_FIELDS],
            from: None,
            dst: "10.0.1.10:9090",
            request: req("GET", "/public"),
            allowed: true,
            policy: Some("finance/not-fields"),
            reason: "rule 0 matched",
        },
        RequestCase {
            name: "notMethods excludes DELETE",
            policies: &[NOT_FIELDS],
            from: None,
            dst: "10.0.1.10:9090",
            request: req("DELETE", "/public"),
            allowed: false,
            policy: Some("finance/not-fields"),
            reason: "notMethods excludes DELETE (matches DELETE)",
        },
        RequestCase {
            name: "notPaths excludes a normalized prefix",
            policies: &[NOT_FIELDS],
            from: None,
            dst: "10.0.1.10:9090",
            request: req("GET", "/x/..//internal/keys"),
            allowed: false,
            policy: Some("finance/not-fields"),
            reason: "notPaths excludes /internal/keys (matches /internal*)",
        },
        RequestCase {
            name: "header values match exactly or by prefix",
            policies: &[HEADERS],
            from: None,
            dst: "10.0.1.10:9090",
            request: Req {
                headers: &[("x-tenant", "beta-7")],
                ..req("GET", "/")
            },
            allowed: true,
            policy: Some("finance/headers"),
            reason: "rule 0 matched",
        },
        RequestCase {
            name: "header value that does not match",
            policies: &[HEADERS],
            from: None,
            dst: "10.0.1.10:9090",
            request: Req {
                headers: &[("x-tenant", "other")],
                ..req("GET", "/")
            },
            allowed: false,
            policy: Some("finance/headers"),
            reason: "request.headers[x-tenant] values [acme, beta*] do not include other",
        },
        RequestCase {
            name: "a repeated header is seen joined with commas",
            policies: &[HEADERS],
            from: None,
            dst: "10.0.1.10:9090",
            request: Req {
                headers: &[("x-tenant", "acme"), ("x-tenant", "evil")],
                ..req("GET", "/")
            },
            allowed: false,
            policy: Some("finance/headers"),
            reason: "do not include acme,evil",
        },
        RequestCase {
            name: "absent header matches no values",
            policies: &[HEADERS],
            from: None,
            dst: "10.0.1.10:9090",
            request: req("GET", "/"),
            allowed: false,
            policy: Some("finance/headers"),
            reason: "do not include (absent)",
        },
        RequestCase {
            name: "header notValues: present header excluded",
            policies: &[HEADERS],
            from: None,
            dst: "10.0.1.10:9090",
            request: Req {
                headers: &[("x-tenant", "acme"), ("x-debug", "1")],
                ..req("GET", "/")
            },
            allowed: false,
            policy: Some("finance/headers"),
            reason: "request.headers[x-debug] notValues exclude 1 (matches *)",
        },
        RequestCase {
            name: "requestPrincipals: the ALLOW rule never matches, even per request",
            policies: &[REQUEST_PRINCIPALS_ALLOW],
            from: Some("prod/orders"),
            dst: "10.0.1.10:9090",
            request: req("GET", "/"),
            allowed: false,
            policy: Some("finance/jwt-allow"),
            reason: "uses fields [from[0].source.requestPrincipals] that this tunnel never evaluates",
        },
        RequestCase {
            name: "JWT claim on a DENY is ignored: the HTTP fields still decide",
            policies: &[JWT_DENY],
            from: Some("prod/orders"),
            dst: "10.0.1.10:9090",
            request: req("DELETE", "/x"),
            allowed: false,
            policy: Some("finance/jwt-deny"),
            reason: "DENY policy finance/jwt-deny rule 0 matched for DELETE /x",
        },
        RequestCase {
            name: "JWT claim on a DENY is ignored: other methods pass",
            policies: &[JWT_DENY],
            from: Some("prod/orders"),
            dst: "10.0.1.10:9090",
            request: req("GET", "/x"),
            allowed: true,
            policy: None,
            reason: "no ALLOW policy",
        },
        RequestCase {
            name: "gRPC method allowed",
            policies: &[GRPC_ALLOW],
            from: Some("prod/orders"),
            dst: "10.0.1.10:9090",
            request: req("POST", "/pkg.Payments/Charge"),
            allowed: true,
            policy: Some("finance/grpc"),
            reason: "rule 0 matched",
        },
        RequestCase {
            name: "another gRPC method denied",
            policies: &[GRPC_ALLOW],
            from: Some("prod/orders"),
            dst: "10.0.1.10:9090",
            request: req("POST", "/pkg.Payments/Refund"),
            allowed: false,
            policy: Some("finance/grpc"),
            reason: "paths [/pkg.Payments/Charge] do not include /pkg.Payments/Refund",
        },
        RequestCase {
            name: "STRICT still refuses a plaintext request",
            policies: &[PAYMENTS_STRICT, DENY_ADMIN],
            from: None,
            dst: "10.0.1.10:9090",
            request: req("GET", "/public"),
            allowed: false,
            policy: Some("finance/payments-strict"),
            reason: "plaintext refused: mTLS mode STRICT",
        },
        RequestCase {
            name: "CUSTOM still fails closed per request",
            policies: &[CUSTOM],
            from: Some("prod/orders"),
            dst: "10.0.1.10:9090",
            request: req("GET", "/"),
            allowed: false,
            policy: Some("finance/ext-authz"),
            reason: "is not supported by this tunnel",
        },
    ];
    for case in cases {
        let policies = compile_all(&case.policies.join("\n---\n"));
        let identity = identity_of(case.from);
        let d = decide_request(&policies, identity.as_ref(), case.dst, &case.request);
        assert_eq!(d.allowed, case.allowed, "{}: {d:?}", case.name);
        assert_eq!(
            d.policy.as_ref().map(ToString::to_string).as_deref(),
            case.policy,
            "{}: {d:?}",
            case.name
        );
        assert!(
            d.reason.contains(case.reason),
            "{}: reason {:?} does not contain {:?}",
            case.name,
            d.reason,
            case.reason
        );
    }
}

/// The connection to a port whose requests are decided one by one: only what no
/// request can change denies it.
#[test]
fn connections_before_per_request_decisions() {
    let conn = |policies: &[&str], from: Option<&str>| {
        let policies = compile_all(&policies.join("\n---\n"));
        let identity = identity_of(from);
        let labels = labels(&[("app", "payments")]);
        let dst: SocketAddr = "10.0.1.10:9090".parse().unwrap();
        let target = Target {
            namespace: "finance",
            labels: &labels,
        };
        let authz: Vec<&AuthorizationPolicy> = policies
            .iter()
            .filter_map(|p| match p {
                Policy::Authz(a) if a.selects(ROOT, target) => Some(a),
                _ => Option::None,
            })
            .collect();
        let c = Connection {
            src_ip: "10.0.2.4".parse().unwrap(),
            identity: identity.as_ref(),
            dst,
            request: Option::None,
        };
        let before = evaluate_before_requests(
            &mode_of(&policies, "finance", &labels, dst.port()),
            &authz,
            &c,
        );
        let l4 = evaluate(
            &mode_of(&policies, "finance", &labels, dst.port()),
            &authz,
            &c,
        );
        (before, l4)
    };
    // An ALLOW with HTTP fields does not refuse the connection: its requests decide.
    let (before, l4) = conn(&[PAYMENTS_ALLOW_CHARGE], Some("prod/inventory"));
    assert!(before.allowed, "{before:?}");
    assert!(before.reason.contains("each request is decided"));
    assert!(!l4.allowed, "at L4 the ALLOW rule never matches: {l4:?}");
    // A DENY with HTTP fields does not refuse it either (at L4 it would deny all).
    let (before, l4) = conn(&[DENY_ADMIN], Some("prod/orders"));
    assert!(before.allowed, "{before:?}");
    assert!(!l4.allowed, "at L4 the DENY ignores paths: {l4:?}");
    // A DENY without HTTP fields, STRICT and CUSTOM still refuse it.
    let (before, _) = conn(&[DENY_PROD_NS], Some("prod/orders"));
    assert!(!before.allowed, "{before:?}");
    assert_eq!(before.policy.unwrap().to_string(), "finance/deny-prod");
    let (before, _) = conn(&[PAYMENTS_STRICT, DENY_ADMIN], Option::None);
    assert!(!before.allowed);
    assert!(before.reason.contains("STRICT"));
    let (before, _) = conn(&[CUSTOM], Some("prod/orders"));
    assert!(!before.allowed);
    // A DENY whose only request field is a JWT claim matches on its other fields.
    let (before, _) = conn(&[JWT_DENY_NS], Some("prod/orders"));
    assert!(!before.allowed, "{before:?}");
}

const DENY_PROD_NS: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-prod, namespace: finance}
spec:
  action: DENY
  rules:
  - from:
    - source: {namespaces: ["prod"]}
"#;

const JWT_DENY_NS: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: jwt-deny-ns, namespace: finance}
spec:
  action: DENY
  rules:
  - from:
    - source: {namespaces: ["prod"]}
    when:
    - key: request.auth.claims[group]
      values: ["guests"]
"#;

#[test]
fn http_and_unsupported_fields_are_told_apart() {
    let policies = compile_all(
        &[
            PAYMENTS_ALLOW_CHARGE,
            HEADERS,
            REQUEST_PRINCIPALS_ALLOW,
            JWT_DENY,
            DENY_PROD_NS,
        ]
        .join("\n---\n"),
    );
    let authz: Vec<&AuthorizationPolicy> = policies
        .iter()
        .filter_map(|p| match p {
            Policy::Authz(a) => Some(a),
            Policy::Peer(_) => Option::None,
        })
        .collect();
    assert_eq!(
        authz[0].rules[0].http_fields,
        ["to[0].operation.methods", "to[0].operation.paths"]
    );
    assert!(authz[0].has_http_rules());
    assert_eq!(
        authz[1].rules[0].http_fields,
        [
            "when[0].request.headers[X-Tenant]",
            "when[1].request.headers[x-debug]"
        ]
    );
    assert_eq!(
        authz[2].rules[0].unsupported_fields,
        ["from[0].source.requestPrincipals"]
    );
    assert_eq!(authz[2].rules[0].http_fields, ["to[0].operation.methods"]);
    assert_eq!(
        authz[3].rules[0].unsupported_fields,
        ["when[0].request.auth.claims[group]"]
    );
    assert!(!authz[4].has_http_rules());
    let w = |i: usize| policies[i].warnings().join(" ");
    assert!(w(0).contains("checked per request on the HTTP ports"));
    assert!(w(0).contains("this ALLOW rule never matches"));
    assert!(w(2).contains("never evaluates: this ALLOW rule never matches"));
    assert!(w(3).contains("never evaluates: this DENY rule ignores them"));
    assert!(w(4).is_empty());
    let bad = compile_all_err(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: b}\nspec:\n  rules:\n  - when:\n    - key: request.headers[bad header]\n      values: [x]\n",
    );
    assert_eq!(bad.field, "spec.rules[0].when[0].key");
    assert!(
        bad.problem
            .contains("\"bad header\" is not a valid HTTP header name")
    );
}

fn compile_all_err(yaml: &str) -> ResourceError {
    let doc = Document::deserialize(serde_yaml::Deserializer::from_str(yaml)).expect("YAML");
    doc.compile().expect_err("invalid policy")
}
