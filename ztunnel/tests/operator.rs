//! What an operator relies on, checked against a real `ztunnel run --config` on loopback.
//!
//! The alert rules and the dashboard in deploy/monitoring/ name only metrics a running
//! tunnel exports: every metric of every expression is looked up in the scrape of a real
//! `ztunnel run --config` on loopback, after traffic that makes every labelled family
//! appear (a family without a series is not in the scrape). The Prometheus Operator's PrometheusRule carries
//! exactly the plain rule file's groups.
//!
//! Logs: plain text without colour codes when stderr is not a terminal; with
//! `logFormat: json` or `--log-format json`, one JSON object per line, access-log events
//! with Istio's field names.

mod support;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn monitoring_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/monitoring")
}

fn yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let value: serde_yaml::Value =
        serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::to_value(value).unwrap()
}

/// PromQL words that are not metric names.
const KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "inf",
    "nan",
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "group",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "limitk",
    "limit_ratio",
];

/// The metric names of a PromQL expression: identifiers outside label matchers, range
/// selectors, strings and label lists (`by (...)`, `on (...)`...), that are neither
/// functions nor keywords. Grafana's `$variables` are skipped.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    // Set after a keyword whose parenthesis holds label names.
    let mut labels_follow = false;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
                i += 1;
            }
            '{' | '[' => {
                let close = if c == '{' { '}' } else { ']' };
                while i < chars.len() && chars[i] != close {
                    i += 1;
                }
                i += 1;
            }
            '(' if labels_follow => {
                while i < chars.len() && chars[i] != ')' {
                    i += 1;
                }
                i += 1;
                labels_follow = false;
            }
            '$' => {
                i += 1;
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
            }
            c if c.is_ascii_digit() || c == '.' => {
                // Numbers, durations (5m) and exponents.
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let next = chars[i..].iter().find(|c| !c.is_whitespace());
                let lower = word.to_ascii_lowercase();
                if KEYWORDS.contains(&lower.as_str()) {
                    labels_follow = matches!(
                        lower.as_str(),
                        "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
                    );
                } else if next != Some(&'(') {
                    names.insert(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

#[test]
fn the_extractor_finds_metrics_and_skips_labels_functions_and_variables() {
    let names = metric_names(
        r#"sum by (reason, side) (rate(a_total{reason="x y", side=~"$side"}[5m] offset 1h))
           / min(d_seconds) - count without (x) (e_bucket)
           > 2 * on (instance) group_left (version) b_info or vector(0) unless c:recorded
           and 1e3 < $__rate_interval"#,
    );
    let want: BTreeSet<String> = ["a_total", "b_info", "c:recorded", "d_seconds", "e_bucket"]
        .map(String::from)
        .into();
    assert_eq!(names, want);
}

/// Every expression of the rule file, by alert name.
fn rule_expressions(rules: &Value) -> Vec<(String, String)> {
    let mut exprs = Vec::new();
    for group in rules["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            let name = rule["alert"]
                .as_str()
                .or(rule["record"].as_str())
                .expect("alert or record name")
                .to_string();
            exprs.push((name, rule["expr"].as_str().expect("expr").to_string()));
        }
    }
    exprs
}

/// Every query of the dashboard: panel targets, and the metric of each
/// `label_values(METRIC, label)` variable.
fn dashboard_expressions(dashboard: &Value) -> Vec<(String, String)> {
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            exprs.push((
                panel["title"].as_str().unwrap().to_string(),
                target["expr"].as_str().expect("expr").to_string(),
            ));
        }
    }
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(query) = variable["query"].as_str()
            && let Some(args) = query.strip_prefix("label_values(")
        {
            let metric = args.split(',').next().unwrap().trim().to_string();
            exprs.push((format!("variable {}", variable["name"]), metric));
        }
    }
    exprs
}

/// The sample names a scrape offers: every sample line's, and for each declared family
/// the names its type gives its samples (a family with no series yet still counts).
fn exported(scrape: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in scrape.lines() {
        if let Some(decl) = line.strip_prefix("# TYPE ") {
            let (name, kind) = decl.split_once(' ').expect("# TYPE NAME KIND");
            let suffixes: &[&str] = match kind {
                "counter" => &["_total", "_created"],
                "histogram" => &["_bucket", "_sum", "_count", "_created"],
                "summary" => &["", "_sum", "_count", "_created"],
                "info" => &["_info"],
                _ => &[""],
            };
            for suffix in suffixes {
                names.insert(format!("{name}{suffix}"));
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

/// A `ztunnel run` with one local workload, `orders`; killed when dropped.
struct Tunnel {
    child: Child,
    metrics: SocketAddr,
    readiness: SocketAddr,
    socks: SocketAddr,
    orders: IpAddr,
    dir: tempfile::TempDir,
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Tunnel {
    /// Its servers on 127.0.79.`host`, `orders` at 127.0.79.`orders`; `extra` is added to
    /// the config file, `args` to the command line; stderr goes to `stderr.log`.
    fn start(host: u8, orders: u8, extra: &str, args: &[&str]) -> Tunnel {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        let init = Command::new(env!("CARGO_BIN_EXE_ztunnel"))
            .args(["ca", "init", "--dir", ca.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            init.status.success(),
            "{}",
            String::from_utf8_lossy(&init.stderr)
        );
        let config = dir.path().join("node.yaml");
        std::fs::write(
            &config,
            format!(
                "node: node-a
ca:
  certFile: {ca}/root-cert.pem
  keyFile: {ca}/root-key.pem
adminAddress: 127.0.79.{host}:15000
readinessAddress: 127.0.79.{host}:15021
metricsAddress: 127.0.79.{host}:15020
socks5Address: 127.0.79.{host}:1080
{extra}workloads:
- name: orders
  namespace: prod
  serviceAccount: orders
  ips: [127.0.79.{orders}]
  node: node-a
",
                ca = ca.display()
            ),
        )
        .unwrap();
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_ztunnel"))
            .args(["run", "--config", config.to_str().unwrap()])
            .args(args)
            .env_remove("LOG_FORMAT")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let at = |port: u16| SocketAddr::new(format!("127.0.79.{host}").parse().unwrap(), port);
        Tunnel {
            child,
            metrics: at(15020),
            readiness: at(15021),
            socks: at(1080),
            orders: format!("127.0.79.{orders}").parse().unwrap(),
            dir,
        }
    }

    /// Stops the tunnel and returns what it wrote to stderr.
    fn stop(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap()
    }
}

/// A plain HTTP/1.0 GET: status and body.
fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(tcp, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    tcp.read_to_string(&mut response)?;
    let status = response
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

fn ready_scrape(tunnel: &Tunnel) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !matches!(get(tunnel.readiness, "/healthz/ready"), Ok((200, _))) {
        assert!(Instant::now() < deadline, "tunnel not ready within 20 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, body) = get(tunnel.metrics, "/metrics").unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

/// Traffic through the tunnel: a connection of `orders` to an address outside the mesh
/// (passthrough, with bytes both ways), a SOCKS5 client no workload owns (refused), and
/// a client that sends plaintext to the HBONE port (a failed handshake).
async fn traffic(tunnel: &Tunnel) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let echo = tokio::net::TcpListener::bind("127.0.79.50:0")
        .await
        .unwrap();
    let echo_addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let (socks, orders) = (tunnel.socks, tunnel.orders);
    let mut tcp = support::socks5_connect(socks, orders, echo_addr)
        .await
        .unwrap();
    tcp.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut back))
        .await
        .expect("echo within 5 s")
        .unwrap();
    assert_eq!(&back, b"ping");
    drop(tcp);

    let stranger = support::socks5_connect(socks, "127.0.79.99".parse().unwrap(), echo_addr).await;
    assert!(
        stranger.is_err(),
        "a client no workload owns was let through"
    );

    let mut plain = tokio::net::TcpStream::connect((orders, 15008))
        .await
        .unwrap();
    plain.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut rest)).await;
}

#[tokio::test]
async fn rules_and_dashboard_name_only_metrics_a_running_tunnel_exports() {
    let tunnel = Tunnel::start(10, 2, "", &[]);
    ready_scrape(&tunnel);
    traffic(&tunnel).await;
    // The connection's close and the handshake failure are counted as they end.
    let deadline = Instant::now() + Duration::from_secs(10);
    let scrape = loop {
        let scrape = ready_scrape(&tunnel);
        let has = |name: &str| scrape.lines().any(|l| l.starts_with(name));
        if has("istio_tcp_connections_closed_total{")
            && has("ztunnel_tls_handshake_failures_total{")
            && has("ztunnel_connections_refused_total{")
        {
            break scrape;
        }
        assert!(
            Instant::now() < deadline,
            "traffic not counted within 10 s:\n{scrape}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let offered = exported(&scrape);

    // The gauges the alerts rest on carry real values for the workload's identity.
    let line = |prefix: &str| {
        scrape
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in the scrape:\n{scrape}"))
            .to_string()
    };
    let value = |l: &str| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap();
    let identity = r#"{identity="spiffe://cluster.local/ns/prod/sa/orders"}"#;
    let expiry = value(&line(&format!(
        "ztunnel_certificate_expiry_seconds{identity}"
    )));
    let lifetime = value(&line(&format!(
        "ztunnel_certificate_lifetime_seconds{identity}"
    )));
    assert!(
        expiry > 0.9 * 86400.0 && expiry <= lifetime && lifetime > 86400.0,
        "expiry {expiry}, lifetime {lifetime}"
    );
    assert_eq!(value(&line("ztunnel_trust_bundle_roots ")), 1.0);
    assert!(value(&line("ztunnel_trust_bundle_expiry_seconds ")) > 86400.0 * 300.0);
    assert_eq!(value(&line("ztunnel_ready ")), 1.0);
    assert!(
        line("ztunnel_build_info{").contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))),
        "{scrape}"
    );

    let dir = monitoring_dir();
    let rules = yaml(&dir.join("ztunnel.rules.yaml"));
    let operator = yaml(&dir.join("prometheusrule.yaml"));
    assert_eq!(operator["kind"], "PrometheusRule");
    assert_eq!(operator["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(
        operator["spec"], rules,
        "prometheusrule.yaml and ztunnel.rules.yaml differ"
    );
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("dashboard.json")).unwrap())
            .unwrap();

    let mut named = BTreeSet::new();
    let mut missing = Vec::new();
    for (what, expr) in rule_expressions(&rules)
        .into_iter()
        .chain(dashboard_expressions(&dashboard))
    {
        let names = metric_names(&expr);
        assert!(!names.is_empty(), "{what}: no metric in {expr:?}");
        for name in names {
            if !offered.contains(&name) {
                missing.push(format!("{what}: {name}"));
            }
            named.insert(name);
        }
    }
    assert!(
        missing.is_empty(),
        "not exported by a running tunnel: {missing:?}\nexported: {offered:?}"
    );

    // What the alerts and the dashboard must cover.
    for name in [
        "ztunnel_certificate_expiry_seconds",
        "ztunnel_certificate_lifetime_seconds",
        "ztunnel_certificate_issue_failures_total",
        "ztunnel_tls_handshake_failures_total",
        "ztunnel_config_rejected_total",
        "ztunnel_ready",
        "istio_tcp_connections_opened_total",
        "istio_tcp_sent_bytes_total",
        "istio_tcp_received_bytes_total",
        "ztunnel_connections_refused_total",
    ] {
        assert!(named.contains(name), "{name} is in no rule or panel");
    }
    let alerts: BTreeSet<String> = rule_expressions(&rules)
        .into_iter()
        .map(|(a, _)| a)
        .collect();
    for alert in [
        "ZtunnelCertificateNotRenewed",
        "ZtunnelCertificateRenewalFailing",
        "ZtunnelHandshakeFailuresRising",
        "ZtunnelConfigRejected",
        "ZtunnelNotReady",
    ] {
        assert!(alerts.contains(alert), "no alert {alert}");
    }
}

/// Waits until the tunnel is ready, sends traffic, and returns its stderr once the
/// connection's access-log event is in it.
async fn logs_after_traffic(tunnel: Tunnel) -> String {
    ready_scrape(&tunnel);
    traffic(&tunnel).await;
    let log = tunnel.dir.path().join("stderr.log");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log)
        .unwrap()
        .contains("connection complete")
    {
        assert!(Instant::now() < deadline, "no access-log event within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tunnel.stop()
}

/// Every line is a JSON object; returns the access-log event of the connection.
fn json_access_event(log: &str) -> serde_json::Map<String, Value> {
    let mut access = None;
    for line in log.lines().filter(|l| !l.is_empty()) {
        let event: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {line:?}"));
        let event = event.as_object().expect("a JSON object").clone();
        for key in ["timestamp", "level", "target", "message"] {
            assert!(event.contains_key(key), "{key} missing: {line}");
        }
        if event["target"] == "access" {
            access = Some(event);
        }
    }
    access.unwrap_or_else(|| panic!("no access-log event in:\n{log}"))
}

fn assert_istio_access_fields(event: &serde_json::Map<String, Value>, orders: IpAddr) {
    assert_eq!(event["message"], "connection complete");
    assert_eq!(event["level"], "INFO");
    assert!(
        event["src.addr"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{orders}:")),
        "{event:?}"
    );
    assert_eq!(event["src.workload"], "orders");
    assert_eq!(event["src.namespace"], "prod");
    assert_eq!(
        event["src.identity"],
        "spiffe://cluster.local/ns/prod/sa/orders"
    );
    assert!(
        event["dst.addr"]
            .as_str()
            .unwrap()
            .starts_with("127.0.79.50:")
    );
    assert_eq!(event["direction"], "outbound");
    assert_eq!(event["bytes_sent"], 4);
    assert_eq!(event["bytes_recv"], 4);
    let duration = event["duration"].as_str().unwrap();
    assert!(
        duration
            .strip_suffix("ms")
            .is_some_and(|ms| ms.parse::<u64>().is_ok()),
        "{duration}"
    );
    assert!(!event.contains_key("error"), "{event:?}");
}

#[tokio::test]
async fn log_format_json_in_the_config_gives_one_object_per_line_with_istio_fields() {
    let tunnel = Tunnel::start(11, 3, "logFormat: json\n", &[]);
    let orders = tunnel.orders;
    let log = logs_after_traffic(tunnel).await;
    assert_istio_access_fields(&json_access_event(&log), orders);
}

#[tokio::test]
async fn log_format_flag_overrides_the_config() {
    let tunnel = Tunnel::start(12, 4, "logFormat: text\n", &["--log-format", "json"]);
    let orders = tunnel.orders;
    let log = logs_after_traffic(tunnel).await;
    assert_istio_access_fields(&json_access_event(&log), orders);
}

#[tokio::test]
async fn text_logs_carry_no_colour_codes_when_stderr_is_a_file() {
    let tunnel = Tunnel::start(13, 5, "", &[]);
    let log = logs_after_traffic(tunnel).await;
    assert!(!log.contains('\x1b'), "ANSI escape in a log file:\n{log}");
    let access = log
        .lines()
        .find(|l| l.contains("connection complete"))
        .unwrap();
    for field in [
        "src.workload=\"orders\"",
        "src.namespace=\"prod\"",
        "bytes_sent=4",
        "bytes_recv=4",
        "direction=\"outbound\"",
    ] {
        assert!(access.contains(field), "{field} missing: {access}");
    }
    assert!(
        serde_json::from_str::<Value>(access).is_err(),
        "text, not JSON: {access}"
    );
}
