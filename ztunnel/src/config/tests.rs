use super::*;

fn parse_str(text: &str) -> Result<Config, Error> {
    parse(Path::new("/etc/ztunnel/config.yaml"), text)
}

const MINIMAL: &str = "node: node-a\n";

#[test]
fn defaults_fill_what_the_file_leaves_out() {
    let c = parse_str(MINIMAL).unwrap();
    let s = &c.settings;
    assert_eq!(s.trust_domain, "cluster.local");
    assert_eq!(s.root_namespace, "istio-system");
    assert_eq!(s.admin_address.to_string(), "127.0.0.1:15000");
    assert_eq!(s.readiness_address.to_string(), "0.0.0.0:15021");
    assert_eq!(s.metrics_address.to_string(), "0.0.0.0:15020");
    assert_eq!(s.bpf_pin_root, PathBuf::from("/sys/fs/bpf/ztunnel"));
    assert_eq!(s.socket_mark, 0x539);
    assert_eq!(s.log_level, "info");
    assert!(s.ca.is_none());
    assert!(c.resources.workloads.is_empty());
    assert_eq!(c.resources.node, "node-a");
    assert_eq!(c.resources.l7.authorization, L7Authorization::Tunnel);
    assert_eq!(
        c.resources.l7.path_normalization,
        PathNormalization::DecodeAndMergeSlashes
    );
}

#[test]
fn http_ports_and_l7_settings() {
    let c = parse_str(
        r#"
node: node-a
l7Authorization: waypoint
pathNormalization: BASE
workloads:
- {name: orders, namespace: prod, ips: [10.0.2.4], labels: {app: orders}, httpPorts: [8080, 9090]}
- {name: batch, namespace: prod, ips: [10.0.2.5], labels: {app: batch}}
services:
- name: orders
  namespace: prod
  vips: [10.96.0.20]
  ports:
  - {port: 80, targetPort: 8080, name: http-web}
  - {port: 81, targetPort: 8081, appProtocol: grpc}
  - {port: 82, targetPort: 8082, name: http, appProtocol: tcp}
  - {port: 83}
  selector: {app: orders}
"#,
    )
    .unwrap();
    assert_eq!(c.resources.l7.authorization, L7Authorization::Waypoint);
    assert_eq!(c.resources.l7.path_normalization, PathNormalization::Base);
    assert_eq!(c.settings.l7, c.resources.l7);
    assert_eq!(c.resources.workloads[0].http_ports, Some(vec![8080, 9090]));
    assert_eq!(c.resources.workloads[1].http_ports, None);
    let http: Vec<bool> = c.resources.services[0]
        .ports
        .iter()
        .map(|p| p.http)
        .collect();
    assert_eq!(http, [true, true, false, false]);
    for (text, want) in [
        (
            "node: a
l7Authorization: sidecar
",
            "unknown variant `sidecar`, expected `tunnel` or `waypoint`",
        ),
        (
            "node: a
pathNormalization: base
",
            "unknown variant `base`",
        ),
        (
            "node: a
workloads:
- {name: w, namespace: n, ips: [10.0.0.1], httpPorts: [80, 0]}
",
            "workloads[0] (n/w).httpPorts[1]: ports must be in 1..=65535",
        ),
    ] {
        let err = parse_str(text).expect_err(text).to_string();
        assert!(
            err.contains(want),
            "{text}\n=> {err:?} does not contain {want:?}"
        );
    }
}

#[test]
fn workloads_services_and_ca_paths() {
    let c = parse_str(
        r#"
node: node-a
trustDomain: example.org
ca: {certFile: ca/root.pem, keyFile: /secure/root.key, trustBundleFile: ca/bundle.pem}
workloads:
- {name: orders, namespace: prod, serviceAccount: orders, ips: [10.0.2.4], labels: {app: orders}, netns: /var/run/netns/orders}
- {name: batch, namespace: legacy, ips: ["10.0.3.1", "fd00::3:1"], node: node-b, meshed: false}
services:
- name: orders
  namespace: prod
  vips: [10.96.0.20]
  ports: [{port: 80, targetPort: 8080}, {port: 443}]
  selector: {app: orders}
"#,
    )
    .unwrap();
    assert_eq!(
        c.settings.trust_bundle_file,
        Some(PathBuf::from("/etc/ztunnel/ca/bundle.pem"))
    );
    let ca = c.settings.ca.unwrap();
    assert_eq!(ca.cert, PathBuf::from("/etc/ztunnel/ca/root.pem"));
    assert_eq!(ca.key, PathBuf::from("/secure/root.key"));
    let w = &c.resources.workloads;
    assert_eq!(
        w[0].identity.to_string(),
        "spiffe://example.org/ns/prod/sa/orders"
    );
    assert_eq!(w[0].node, "node-a", "node defaults to this node");
    assert!(w[0].meshed && w[0].healthy);
    assert_eq!(w[1].service_account, "default");
    assert!(!w[1].meshed);
    assert_eq!(w[1].ips.len(), 2);
    let s = &c.resources.services[0];
    assert_eq!(
        s.ports,
        vec![
            ServicePort {
                port: 80,
                target_port: 8080,
                http: false
            },
            ServicePort {
                port: 443,
                target_port: 443,
                http: false
            }
        ]
    );
}

#[test]
fn errors_name_the_file_the_place_and_the_problem() {
    let policy_head = "policies:\n- apiVersion: security.istio.io/v1\n  kind: AuthorizationPolicy\n  metadata: {name: p, namespace: prod}\n  spec:\n";
    let cases: Vec<(String, &str)> = vec![
        ("node: [".to_string(), "/etc/ztunnel/config.yaml:1:"),
        ("trustDomain: x\n".to_string(), "missing field `node`"),
        ("node: a\nnodes: b\n".to_string(), "/etc/ztunnel/config.yaml:2:1: unknown field `nodes`"),
        (
            "node: a\nworkloads:\n- {name: w, namespace: n, ips: [10.0.0.300]}\n".to_string(),
            "/etc/ztunnel/config.yaml:3:",
        ),
        (
            "node: a\nworkloads:\n- {name: w, namespace: n, ips: [10.0.0.1]}\n- {name: v, namespace: n, ips: [10.0.0.1]}\n".to_string(),
            "workloads[1] (n/v): IP 10.0.0.1 is already workload n/w's",
        ),
        (
            "node: a\nworkloads:\n- {name: w, namespace: N, ips: [10.0.0.1]}\n".to_string(),
            "workloads[0] (N/w): identity",
        ),
        (
            "node: a\nworkloads:\n- {name: w, namespace: n, ips: [10.0.0.1], node: b, netns: /x}\n".to_string(),
            "netns is only for workloads on this node (a), not b",
        ),
        (
            "node: a\nworkloads:\n- {name: w, namespace: n, ips: [10.0.0.1]}\nservices:\n- {name: s, namespace: n, vips: [10.0.0.1], ports: [{port: 80}]}\n".to_string(),
            "services[0] (n/s): VIP 10.0.0.1 is workload n/w's IP",
        ),
        (
            "node: a\nlogLevel: \"foo=bar=baz\"\n".to_string(),
            "logLevel:",
        ),
        (
            "node: a\nsocketMark: 0\n".to_string(),
            "socketMark: 0 is the mark of every unmarked socket",
        ),
        (
            "node: a\nsocketMark: -1\n".to_string(),
            "/etc/ztunnel/config.yaml:2:",
        ),
        (
            format!("node: a\n{policy_head}    rules: [{{when: [{{key: destination.port, values: [http]}}]}}]\n"),
            "policies[0] (AuthorizationPolicy prod/p).spec.rules[0].when[0].values[0]: \"http\" is not a port number",
        ),
        (
            format!("node: a\n{policy_head}    rules:\n    - from:\n      - source: {{principal: [x]}}\n"),
            "/etc/ztunnel/config.yaml:9:",
        ),
    ];
    for (text, want) in cases {
        let err = parse_str(&text).expect_err(&text).to_string();
        assert!(
            err.contains(want),
            "{text}\n=> {err:?} does not contain {want:?}"
        );
        assert!(err.starts_with("/etc/ztunnel/config.yaml"), "{err}");
    }
}

#[test]
fn load_reports_a_missing_file() {
    let err = load(Path::new("/nonexistent/ztunnel.yaml"))
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("cannot read config file /nonexistent/ztunnel.yaml:"),
        "{err}"
    );
}

#[test]
fn every_truncation_of_the_example_is_an_error_or_a_config_never_a_panic() {
    let path = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/examples/config.yaml"
    ));
    let text = std::fs::read_to_string(path).unwrap();
    let full = parse(path, &text).expect("the example is valid");
    assert_eq!(full.resources.workloads.len(), 9);
    assert_eq!(full.resources.policies.len(), 5);
    let mut rejected = 0;
    for end in (0..text.len())
        .step_by(7)
        .filter(|&i| text.is_char_boundary(i))
    {
        if let Err(e) = parse(path, &text[..end]) {
            assert!(
                e.to_string().starts_with(&path.display().to_string()),
                "{e}"
            );
            rejected += 1;
        }
    }
    assert!(rejected > 0);
}

#[test]
fn trusted_proxies_max_metric_series_and_socks5_users_are_read() {
    let c = parse_str(MINIMAL).unwrap();
    assert!(c.settings.trusted_proxies.is_empty());
    assert_eq!(c.settings.max_metric_series, 10_000);
    assert!(c.settings.socks5_allowed_uids.is_empty());

    let c = parse_str(
        r#"
node: node-a
trustedProxies:
- spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway
- spiffe://cluster.local/ns/prod/sa/waypoint
maxMetricSeries: 500
socks5Address: 127.0.0.1:1080
socks5AllowedUids: [1000, 1001]
"#,
    )
    .unwrap();
    let s = &c.settings;
    assert_eq!(
        s.trusted_proxies,
        vec![
            Identity::new("cluster.local", "istio-system", "istio-ingressgateway").unwrap(),
            Identity::new("cluster.local", "prod", "waypoint").unwrap(),
        ]
    );
    assert_eq!(s.max_metric_series, 500);
    assert_eq!(s.socks5_allowed_uids, vec![1000, 1001]);

    let err = |text: &str| parse_str(text).unwrap_err().to_string();
    let e = err("node: a\nmaxMetricSeries: 0\n");
    assert!(
        e.contains("maxMetricSeries") && e.contains("no series"),
        "{e}"
    );
    let e = err("node: a\ntrustedProxies: [istio-ingressgateway]\n");
    assert!(
        e.contains("trustedProxies") || e.contains("spiffe://"),
        "{e}"
    );
    let e = err("node: a\nsocks5AllowedUids: [1000]\n");
    assert!(
        e.contains("socks5AllowedUids") && e.contains("without socks5Address"),
        "{e}"
    );
}

#[test]
fn a_socks5_listener_off_loopback_is_refused() {
    for address in [
        "0.0.0.0:1080",
        "10.0.0.5:1080",
        "[::]:1080",
        "[fd00::1]:1080",
    ] {
        let text = format!("node: a\nsocks5Address: \"{address}\"\n");
        let e = parse_str(&text).expect_err(&text).to_string();
        assert!(
            e.contains("socks5Address")
                && e.contains(address)
                && e.contains("not a loopback address"),
            "{address}: {e}"
        );
    }
    for address in ["127.0.0.1:1080", "127.0.0.9:1080", "[::1]:1080"] {
        let config = parse_str(&format!("node: a\nsocks5Address: \"{address}\"\n"))
            .unwrap_or_else(|e| panic!("{address}: {e}"));
        assert_eq!(
            config.settings.socks5_address,
            Some(address.parse().unwrap())
        );
    }
}
