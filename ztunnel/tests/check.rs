//! `ztunnel check` run as a binary on the example config: verdicts, output and exit
//! codes for the documented cases.

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

fn example() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/examples/config.yaml"
    ))
}

fn check(config: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ztunnel"))
        .arg("check")
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("ztunnel runs")
}

/// Runs `check --json` on the example and returns the exit code and the verdict.
fn verdict(args: &[&str]) -> (i32, Value) {
    let mut all = args.to_vec();
    all.push("--json");
    let out = check(&example(), &all);
    let stdout = String::from_utf8(out.stdout).expect("utf-8 output");
    let v: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "{args:?}: not JSON ({e}): {stdout:?}, stderr {:?}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().expect("exited"), v)
}

struct Case {
    args: &'static [&'static str],
    exit: i32,
    transport: &'static str,
    mode: &'static str,
    source_identity: Option<&'static str>,
    destination_identity: Option<&'static str>,
    policy: Option<&'static str>,
    reason: &'static str,
}

#[test]
fn json_verdicts_for_the_documented_cases() {
    let cases = [
        // Only prod/orders may reach payments on 9090.
        Case {
            args: &["--from", "prod/orders", "--to", "10.0.1.10:9090"],
            exit: 0,
            transport: "hbone",
            mode: "STRICT",
            source_identity: Some("spiffe://cluster.local/ns/prod/sa/orders"),
            destination_identity: Some("spiffe://cluster.local/ns/finance/sa/payments"),
            policy: Some("finance/payments-allow-orders"),
            reason: "ALLOW policy finance/payments-allow-orders rule 0 matched",
        },
        // inventory has a valid certificate, and is still denied.
        Case {
            args: &["--from", "prod/inventory", "--to", "10.0.1.10:9090"],
            exit: 1,
            transport: "hbone",
            mode: "STRICT",
            source_identity: Some("spiffe://cluster.local/ns/prod/sa/inventory"),
            destination_identity: Some("spiffe://cluster.local/ns/finance/sa/payments"),
            policy: Some("finance/payments-allow-orders"),
            reason: "principals [cluster.local/ns/prod/sa/orders] do not include cluster.local/ns/prod/sa/inventory",
        },
        // orders on another port of payments.
        Case {
            args: &["--from", "prod/orders", "--to", "10.0.1.10:8080"],
            exit: 1,
            transport: "hbone",
            mode: "STRICT",
            source_identity: Some("spiffe://cluster.local/ns/prod/sa/orders"),
            destination_identity: Some("spiffe://cluster.local/ns/finance/sa/payments"),
            policy: Some("finance/payments-allow-orders"),
            reason: "ports [9090] do not include 8080",
        },
        // STRICT in namespace test refuses plaintext there...
        Case {
            args: &["--from", "legacy/batch", "--to", "10.0.1.30:80"],
            exit: 1,
            transport: "plaintext",
            mode: "STRICT",
            source_identity: None,
            destination_identity: Some("spiffe://cluster.local/ns/test/sa/app"),
            policy: Some("test/strict"),
            reason: "plaintext refused: mTLS mode STRICT for port 80 (namespace PeerAuthentication test/strict)",
        },
        // ...and does not affect a service in another namespace.
        Case {
            args: &["--from", "legacy/batch", "--to", "10.96.0.40:80"],
            exit: 0,
            transport: "plaintext",
            mode: "PERMISSIVE",
            source_identity: None,
            destination_identity: Some("spiffe://cluster.local/ns/default/sa/web"),
            policy: None,
            reason: "no ALLOW policy selects the workload",
        },
        // The selector-scoped STRICT for app=payments leaves ledger PERMISSIVE, which
        // accepts plaintext...
        Case {
            args: &["--from-ip", "192.0.2.7", "--to", "10.0.1.20:8080"],
            exit: 0,
            transport: "plaintext",
            mode: "PERMISSIVE",
            source_identity: None,
            destination_identity: Some("spiffe://cluster.local/ns/finance/sa/ledger"),
            policy: None,
            reason: "no ALLOW policy selects the workload",
        },
        // ...and mTLS.
        Case {
            args: &["--from", "prod/orders", "--to", "10.0.1.20:8080"],
            exit: 0,
            transport: "hbone",
            mode: "PERMISSIVE",
            source_identity: Some("spiffe://cluster.local/ns/prod/sa/orders"),
            destination_identity: Some("spiffe://cluster.local/ns/finance/sa/ledger"),
            policy: None,
            reason: "no ALLOW policy selects the workload",
        },
        // The same plaintext source is refused by payments, which is STRICT.
        Case {
            args: &["--from-ip", "192.0.2.7", "--to", "10.0.1.10:9090"],
            exit: 1,
            transport: "plaintext",
            mode: "STRICT",
            source_identity: None,
            destination_identity: Some("spiffe://cluster.local/ns/finance/sa/payments"),
            policy: Some("finance/payments-strict"),
            reason: "plaintext refused",
        },
        // On an HTTP port, an ALLOW rule with methods and paths is left to each request.
        Case {
            args: &["--from", "prod/orders", "--to", "10.0.1.50:8080"],
            exit: 0,
            transport: "hbone",
            mode: "PERMISSIVE",
            source_identity: Some("spiffe://cluster.local/ns/prod/sa/orders"),
            destination_identity: Some("spiffe://cluster.local/ns/finance/sa/billing"),
            policy: None,
            reason: "each request is decided on its own",
        },
        // Outside the mesh: passed through.
        Case {
            args: &["--from", "prod/orders", "--to", "192.0.2.10:443"],
            exit: 0,
            transport: "plaintext",
            mode: "DISABLE",
            source_identity: None,
            destination_identity: None,
            policy: None,
            reason: "passed through as plaintext to an address outside the mesh",
        },
    ];
    for case in cases {
        let (exit, v) = verdict(case.args);
        let what = format!("{:?}: {v}", case.args);
        assert_eq!(exit, case.exit, "{what}");
        assert_eq!(v["allowed"], Value::Bool(case.exit == 0), "{what}");
        assert_eq!(v["transport"], case.transport, "{what}");
        assert_eq!(v["mode"], case.mode, "{what}");
        assert_eq!(
            v["source_identity"].as_str(),
            case.source_identity,
            "{what}"
        );
        assert_eq!(
            v["destination_identity"].as_str(),
            case.destination_identity,
            "{what}"
        );
        assert_eq!(v["policy"].as_str(), case.policy, "{what}");
        let reason = v["reason"].as_str().expect("reason");
        assert!(
            reason.contains(case.reason),
            "{what}: reason lacks {:?}",
            case.reason
        );
    }
}

#[test]
fn a_service_vip_is_translated_to_its_endpoints_target_port() {
    let (exit, v) = verdict(&["--from", "prod/orders", "--to", "10.96.0.10:80"]);
    assert_eq!(exit, 0, "{v}");
    assert_eq!(v["service"], "finance/payments");
    assert_eq!(v["destination_address"], "10.0.1.10:9090");
    assert_eq!(
        v["expected_identities"][0],
        "spiffe://cluster.local/ns/finance/sa/payments"
    );
    let eps = v["endpoints"].as_array().expect("endpoints");
    assert_eq!(eps.len(), 2);
    assert_eq!(eps[1]["address"], "10.0.2.11:9090");
    let (exit, v) = verdict(&["--from", "prod/orders", "--to", "10.96.0.10:81"]);
    assert_eq!(exit, 1, "{v}");
    assert!(
        v["reason"]
            .as_str()
            .unwrap()
            .contains("service finance/payments (10.96.0.10) has no port 81")
    );
}

#[test]
fn the_text_verdict_explains_the_l7_rule() {
    let out = check(
        &example(),
        &["--from", "prod/orders", "--to", "10.0.1.50:8080"],
    );
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with("ALLOWED: prod/orders -> finance/billing at 10.0.1.50:8080\n"),
        "{text}"
    );
    assert!(
        text.contains("  transport:            HBONE (mTLS) to 10.0.1.50:15008\n"),
        "{text}"
    );
    assert!(text.contains("  mTLS mode:            PERMISSIVE (mesh-wide PeerAuthentication istio-system/default)\n"), "{text}");
    assert!(
        text.contains("  reason:               no DENY rule without HTTP fields matched; each request is decided on its own\n"),
        "{text}"
    );
    assert!(
        text.contains("  warning:              policy finance/billing-charge: rule 0 uses HTTP fields [to[0].operation.methods, to[0].operation.paths]: checked per request on the HTTP ports of the workloads it selects"),
        "{text}"
    );
}

#[test]
fn bad_input_exits_2_with_a_clear_error() {
    let unknown = check(
        &example(),
        &["--from", "prod/nobody", "--to", "10.0.1.10:9090"],
    );
    assert_eq!(unknown.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&unknown.stderr),
        "ztunnel check: no workload prod/nobody in the config (expected namespace/name)\n"
    );

    let bad_name = check(&example(), &["--from", "orders", "--to", "10.0.1.10:9090"]);
    assert_eq!(bad_name.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&bad_name.stderr).contains("\"orders\" is not a workload name")
    );

    let bad_to = check(&example(), &["--from", "prod/orders", "--to", "10.0.1.10"]);
    assert_eq!(bad_to.status.code(), Some(2));

    let no_source = check(&example(), &["--to", "10.0.1.10:9090"]);
    assert_eq!(no_source.status.code(), Some(2));

    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.yaml");
    std::fs::write(
        &broken,
        "node: a\nworkloads:\n- {name: w, namespace: n, ips: [10.0.0.300]}\n",
    )
    .unwrap();
    let out = check(&broken, &["--from", "n/w", "--to", "10.0.1.10:9090"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with(&format!("ztunnel check: {}:3:", broken.display())),
        "{err}"
    );
    assert!(err.contains("invalid IP address syntax"), "{err}");

    let missing = check(
        &dir.path().join("missing.yaml"),
        &["--from", "n/w", "--to", "10.0.1.10:9090"],
    );
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot read config file"));
}

/// `check` with request flags on billing's HTTP port 8080, where only orders may
/// `POST /charge`: the rule that decides, or the field that failed.
#[test]
fn an_http_request_is_decided_with_the_rule_or_the_field_that_failed() {
    struct Request {
        from: &'static str,
        method: &'static str,
        path: &'static str,
        exit: i32,
        rule: Value,
        normalized: Value,
        reason: &'static str,
    }
    let cases = [
        Request {
            from: "prod/orders",
            method: "POST",
            path: "/charge",
            exit: 0,
            rule: 0.into(),
            normalized: "/charge".into(),
            reason: "ALLOW policy finance/billing-charge rule 0 matched for POST /charge",
        },
        Request {
            from: "prod/orders",
            method: "GET",
            path: "/charge",
            exit: 1,
            rule: Value::Null,
            normalized: "/charge".into(),
            reason: "rule 0: to: methods [POST] do not include GET",
        },
        Request {
            from: "prod/orders",
            method: "POST",
            path: "/refund",
            exit: 1,
            rule: Value::Null,
            normalized: "/refund".into(),
            reason: "rule 0: to: paths [/charge] do not include /refund",
        },
        Request {
            from: "prod/inventory",
            method: "POST",
            path: "/charge",
            exit: 1,
            rule: Value::Null,
            normalized: "/charge".into(),
            reason: "rule 0: from: principals [cluster.local/ns/prod/sa/orders] do not include cluster.local/ns/prod/sa/inventory",
        },
        // Matched after normalization, as the tunnel matches it.
        Request {
            from: "prod/orders",
            method: "POST",
            path: "//x/../charge?amount=1",
            exit: 0,
            rule: 0.into(),
            normalized: "/charge".into(),
            reason: "rule 0 matched for POST /charge",
        },
        Request {
            from: "prod/orders",
            method: "POST",
            path: "/charge%00",
            exit: 1,
            rule: Value::Null,
            normalized: Value::Null,
            reason: "path \"/charge%00\" cannot be normalized: it contains %00",
        },
    ];
    for c in cases {
        let args = [
            "--from",
            c.from,
            "--to",
            "10.0.1.50:8080",
            "--method",
            c.method,
            "--path",
            c.path,
        ];
        let (exit, v) = verdict(&args);
        let what = format!("{} {} {}", c.from, c.method, c.path);
        assert_eq!(exit, c.exit, "{what}: {v}");
        assert_eq!(v["allowed"], c.exit == 0, "{what}");
        assert_eq!(v["rule"], c.rule, "{what}: {v}");
        let reason = v["reason"].as_str().unwrap();
        assert!(reason.contains(c.reason), "{what}: {reason}");
        if c.normalized.is_string() {
            assert_eq!(v["policy"], "finance/billing-charge", "{what}");
        }
        let request = &v["request"];
        assert_eq!(request["method"], c.method, "{what}");
        assert_eq!(request["path"], c.path, "{what}");
        assert_eq!(request["normalized_path"], c.normalized, "{what}: {v}");
        assert_eq!(request["path_normalization"], "DECODE_AND_MERGE_SLASHES");
        assert_eq!(request["decided_per_request"], true, "{what}");
    }

    // On a port that does not speak HTTP the request gets the connection's verdict.
    let (exit, v) = verdict(&[
        "--from",
        "prod/orders",
        "--to",
        "10.0.1.10:9090",
        "--method",
        "DELETE",
        "--path",
        "/anything",
    ]);
    assert_eq!(exit, 0, "{v}");
    assert_eq!(v["request"]["decided_per_request"], false);
    let why = v["request"]["why_not_per_request"].as_str().unwrap();
    assert!(
        why.starts_with("port 9090 of finance/payments-0 does not speak HTTP"),
        "{why}"
    );
}

#[test]
fn hosts_and_headers_are_matched_and_explained_in_text() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        r#"node: a
workloads:
- {name: client, namespace: front, serviceAccount: client, ips: [10.0.0.1]}
- {name: api, namespace: back, serviceAccount: api, labels: {app: api}, ips: [10.0.0.2], httpPorts: [8080]}
policies:
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: api-tenant, namespace: back}
  spec:
    selector: {matchLabels: {app: api}}
    action: ALLOW
    rules:
    - to:
      - operation: {hosts: ["api.back"], methods: ["GET"]}
      when:
      - key: request.headers[x-tenant]
        values: ["a,b"]
"#,
    )
    .unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec!["--from", "front/client", "--to", "10.0.0.2:8080"];
        args.extend_from_slice(extra);
        let out = check(&config, &args);
        (
            out.status.code().unwrap(),
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    };
    // A repeated header is matched as its values joined with `,`; the host with and
    // without its port.
    let (exit, text, _) = run(&[
        "--host",
        "api.back:8080",
        "--header",
        "x-tenant=a",
        "--header",
        "X-Tenant=b",
    ]);
    assert_eq!(exit, 0, "{text}");
    for line in [
        "ALLOWED: front/client -> back/api at 10.0.0.2:8080\n",
        "  request:              GET / (host api.back:8080)\n",
        "  header:               x-tenant: a\n",
        "  header:               x-tenant: b\n",
        "  normalized path:      / (DECODE_AND_MERGE_SLASHES)\n",
        "  decided:              per request, by the destination tunnel\n",
        "  policy:               back/api-tenant\n",
        "  rule:                 0\n",
        "  reason:               ALLOW policy back/api-tenant rule 0 matched for GET /\n",
    ] {
        assert!(text.contains(line), "{line:?} not in:\n{text}");
    }

    let (exit, text, _) = run(&["--host", "api.back", "--header", "x-tenant=c"]);
    assert_eq!(exit, 1, "{text}");
    assert!(
        text.contains("rule 0: when[0] request.headers[x-tenant]: request.headers[x-tenant] values [a,b] do not include c"),
        "{text}"
    );
    assert!(!text.contains("  rule:"), "{text}");

    let (exit, text, _) = run(&["--host", "other.back", "--header", "x-tenant=a,b"]);
    assert_eq!(exit, 1, "{text}");
    assert!(
        text.contains("to: hosts [api.back] do not include other.back"),
        "{text}"
    );

    for (flags, error) in [
        (
            &["--header", "x-tenant"][..],
            "--header \"x-tenant\": expected NAME=VALUE",
        ),
        (
            &["--method", "G ET"][..],
            "--method \"G ET\": not an HTTP method",
        ),
        (
            &["--path", "http://api.back/"][..],
            "--path \"http://api.back/\": not a request target: give the path alone",
        ),
        (
            &["--host", "a\u{7f}b"][..],
            "--host \"a\\u{7f}b\": not a valid Host header value",
        ),
    ] {
        let (exit, _, stderr) = run(flags);
        assert_eq!(exit, 2, "{flags:?}: {stderr}");
        assert!(stderr.contains(error), "{flags:?}: {stderr}");
    }
}
