//! `cargo xtask bench`: the tunnel against the direct path, on the same two-node
//! topology as the end-to-end tests (root).
//!
//! Node 0 holds the clients, node 1 the servers; one pair of pods is meshed (its
//! traffic crosses both tunnels as HBONE), the other pair is outside the mesh (the
//! direct path over the same links). Each round measures both paths, their order
//! swapped from one round to the next, so load from the rest of the machine falls on
//! both alike; medians and ranges over the rounds are printed. Per path and round:
//! iperf3 with 1 and 4 streams, sockperf ping-pong of 64 bytes (p50, p99, p99.9 of the
//! full round trip), new connections one at a time (connect, 1-byte echo, close) and
//! from several threads at once, and both tunnels' CPU seconds per GB (from /proc).
//! Tunnel memory: idle, after the bulk transfers (once they have ended and a few
//! seconds passed), with 10 000 open connections. The machine's steal time and load
//! over the run are printed with the figures.
//!
//! HTTP (the `http` section): small GET requests, HTTP/1.1 with keep-alive and HTTP/2
//! cleartext, from h2load in the client pod to a hyper server, by three ways: the `l7`
//! way (a meshed server whose port is declared HTTP and whose policy has HTTP rules, so
//! the server tunnel decides every request), the `l4` way (the same server on a port that
//! is not HTTP, where the tunnel copies bytes) and the direct path. Per way: requests per
//! second with several requests in flight, and p50/p99 latency of one request at a time.
//!
//! Sections: [`SECTIONS`] lists what a round measures; a section is a function of the
//! bench, a path and the round that records samples under its keys; `--sections` picks
//! some of them.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use ztunnel_tests::{Cluster, Mesh, Pod, PodSpec};

const ECHO_PORT: u16 = 7000;
const IPERF_PORT: u16 = 5201;
const SOCKPERF_PORT: u16 = 11111;
const IPERF_SECONDS: &str = "5";
const SOCKPERF_SECONDS: &str = "5";
const CONNECT_SECONDS: Duration = Duration::from_secs(3);
const CONNECT_THREADS: usize = 4;
const OPEN_CONNECTIONS: usize = 10_000;
/// How long after the bulk transfers the tunnels' memory is read again.
const SETTLE: Duration = Duration::from_secs(3);
/// The web server's port declared HTTP (requests decided one by one by its tunnel).
const HTTP_PORT: u16 = 8080;
/// The web server's port that is not HTTP (the tunnels copy bytes).
const PLAIN_HTTP_PORT: u16 = 8081;
const H2LOAD_SECONDS: &str = "5";
/// Requests in flight in the request-rate runs: HTTP/1.1 connections, or streams on one
/// HTTP/2 connection.
const HTTP_IN_FLIGHT: usize = 8;

/// The web server's policy: the client may `GET /bench/*` on the HTTP port (a rule with
/// HTTP fields, decided per request) and use the other port at L4.
const WEB_POLICY: &str = r#"- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata:
    name: web
    namespace: bench
  spec:
    selector:
      matchLabels:
        app: web
    action: ALLOW
    rules:
    - from:
      - source:
          principals: ["cluster.local/ns/bench/sa/client"]
      to:
      - operation:
          ports: ["8080"]
          methods: ["GET"]
          paths: ["/bench/*"]
    - from:
      - source:
          principals: ["cluster.local/ns/bench/sa/client"]
      to:
      - operation:
          ports: ["8081"]
"#;

#[derive(clap::Parser)]
#[command(about = "Benchmark the tunnel against the direct path (root)")]
struct Args {
    /// Also write the medians (and each figure's `_min` and `_max`) as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Rounds over both paths (at least 3 for a median worth the name).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The sections a round measures, of `l4` and `http`.
    #[arg(long, value_delimiter = ',', default_value = "l4,http")]
    sections: Vec<String>,
    /// Internal: serve echo in the network namespace at this path until stdin closes
    /// (the server end of the open connections lives in its own process, so neither
    /// end needs more descriptors than the machine's limit).
    #[arg(long, hide = true, value_name = "NETNS", requires = "at")]
    serve_echo: Option<PathBuf>,
    /// Internal: serve HTTP/1.1 and HTTP/2 cleartext in the network namespace at this
    /// path until stdin closes.
    #[arg(long, hide = true, value_name = "NETNS", requires = "at")]
    serve_http: Option<PathBuf>,
    /// Internal: the addresses `--serve-echo` or `--serve-http` listens on.
    #[arg(long, hide = true, value_name = "ADDR")]
    at: Vec<SocketAddr>,
}

/// One path through the topology: a client pod and a server pod; `prefix` starts its
/// figures' keys (empty for the tunnel, `direct_` for the direct path).
struct Path<'a> {
    client: &'a Pod,
    server: &'a Pod,
    prefix: &'static str,
}

impl Path<'_> {
    fn target(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.server.ip().into(), port)
    }
}

/// What the bench holds while it runs.
struct Bench<'a> {
    /// The two tunnels' process ids.
    tunnels: Vec<u32>,
    meshed: Path<'a>,
    direct: Path<'a>,
    /// The meshed HTTP server, on the same node as the meshed path's server.
    web: &'a Pod,
}

/// Samples of each figure, one per round, by key.
#[derive(Default)]
struct Samples(BTreeMap<String, Vec<f64>>);

impl Samples {
    fn add(&mut self, path: &Path, key: &str, value: f64) {
        self.0
            .entry(format!("{}{key}", path.prefix))
            .or_default()
            .push(value);
    }

    fn add_tunnel(&mut self, key: &str, value: f64) {
        self.0.entry(key.to_string()).or_default().push(value);
    }

    fn median(&self, key: &str) -> Option<f64> {
        let mut values = self.0.get(key)?.clone();
        values.sort_by(f64::total_cmp);
        let n = values.len();
        Some(if n % 2 == 1 {
            values[n / 2]
        } else {
            (values[n / 2 - 1] + values[n / 2]) / 2.0
        })
    }

    fn range(&self, key: &str) -> Option<(f64, f64)> {
        let values = self.0.get(key)?;
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Some((min, max))
    }
}

/// A part of a round: measures one path in a round and records its samples.
type Section = fn(&Bench, &Path, usize, &mut Samples) -> Result<()>;

/// What each round measures on each path, in order.
const SECTIONS: &[(&str, Section)] = &[("l4", l4_section), ("http", http_section)];

fn main() -> Result<()> {
    let args: Args = clap::Parser::parse();
    ztunnel_tests::require_root();
    if let Some(netns) = args.serve_echo {
        let _echo = EchoServer::start(ztunnel::netns::Netns::open(netns)?, args.at)?;
        // Serve until the parent closes our stdin.
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        return Ok(());
    }
    if let Some(netns) = args.serve_http {
        return serve_http(ztunnel::netns::Netns::open(netns)?, args.at);
    }
    if args.rounds == 0 {
        bail!("--rounds 0: at least one round is needed");
    }
    let sections: Vec<(&str, Section)> = args
        .sections
        .iter()
        .map(|wanted| {
            SECTIONS
                .iter()
                .find(|(name, _)| name == wanted)
                .copied()
                .with_context(|| {
                    format!("--sections {wanted}: no such section (there are l4 and http)")
                })
        })
        .collect::<Result<_>>()?;
    let runtime = tokio::runtime::Runtime::new()?;
    let cluster = Cluster::builder().nodes(2).pods_per_node(3).build()?;
    let specs = vec![
        PodSpec::new(cluster.pod(0, 0), "bench", "client"),
        PodSpec::new(cluster.pod(0, 1), "bench", "direct-client").unmeshed(),
        PodSpec::new(cluster.pod(1, 0), "bench", "server"),
        PodSpec::new(cluster.pod(1, 1), "bench", "direct-server").unmeshed(),
        PodSpec::new(cluster.pod(1, 2), "bench", "web").http_ports(&[HTTP_PORT]),
    ];
    let mut mesh = Mesh::new(&cluster, specs, WEB_POLICY)?;
    runtime.block_on(mesh.start_all())?;
    let bench = Bench {
        tunnels: (0..2)
            .map(|n| mesh.pid(n).context("tunnel not running"))
            .collect::<Result<_>>()?,
        meshed: Path {
            client: cluster.pod(0, 0),
            server: cluster.pod(1, 0),
            prefix: "",
        },
        direct: Path {
            client: cluster.pod(0, 1),
            server: cluster.pod(1, 1),
            prefix: "direct_",
        },
        web: cluster.pod(1, 2),
    };
    let _servers = [
        ServerProcess::echo(bench.meshed.server)?,
        ServerProcess::echo(bench.direct.server)?,
        ServerProcess::http(bench.web, &[HTTP_PORT, PLAIN_HTTP_PORT])?,
        ServerProcess::http(bench.direct.server, &[HTTP_PORT])?,
    ];

    let machine_before = MachineCpu::read()?;
    let load_before = load_average()?;
    let mut samples = Samples::default();
    std::thread::sleep(Duration::from_secs(1));
    samples.add_tunnel("rss_idle_mb", rss_mb(&bench.tunnels)?);
    for round in 0..args.rounds {
        // Swapped every round: neither path always runs first.
        let paths = if round % 2 == 0 {
            [&bench.meshed, &bench.direct]
        } else {
            [&bench.direct, &bench.meshed]
        };
        for path in paths {
            for (name, section) in &sections {
                let label = if path.prefix.is_empty() {
                    "tunnel"
                } else {
                    "direct"
                };
                eprintln!(
                    "bench: round {} of {}, {label} path, {name}",
                    round + 1,
                    args.rounds
                );
                section(&bench, path, round, &mut samples)?;
            }
        }
        std::thread::sleep(SETTLE);
        samples.add_tunnel("rss_after_bulk_mb", rss_mb(&bench.tunnels)?);
    }
    if args.sections.iter().any(|s| s == "l4") {
        eprintln!("bench: 10 000 open connections");
        let open = open_connections(&bench.meshed)?;
        std::thread::sleep(Duration::from_millis(500));
        samples.add_tunnel("rss_10k_mb", rss_mb(&bench.tunnels)?);
        drop(open);
    }
    let steal = MachineCpu::read()?.steal_share_since(&machine_before);
    let load_after = load_average()?;

    println!(
        "{} rounds; machine: {} CPUs, load average {load_before} at the start, {load_after} \
         at the end, steal {:.1} % of CPU time",
        args.rounds,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        steal * 100.0
    );
    print_table(&samples);
    print_http_table(&samples);
    if let Some(file) = args.json {
        let mut json = serde_json::Map::new();
        json.insert("rounds".into(), args.rounds.into());
        json.insert("steal_percent".into(), (steal * 100.0).into());
        for key in samples.0.keys() {
            if let (Some(median), Some((min, max))) = (samples.median(key), samples.range(key)) {
                json.insert(key.clone(), median.into());
                json.insert(format!("{key}_min"), min.into());
                json.insert(format!("{key}_max"), max.into());
            }
        }
        std::fs::write(&file, serde_json::to_string_pretty(&json)? + "\n")
            .with_context(|| format!("cannot write {}", file.display()))?;
        println!("figures written to {}", file.display());
    }
    drop(mesh);
    drop(cluster);
    Ok(())
}

/// The L4 figures of one path: bulk throughput (and, through the tunnels, CPU per GB
/// and the tunnels' peak memory), round trips, new connections.
fn l4_section(bench: &Bench, path: &Path, _round: usize, samples: &mut Samples) -> Result<()> {
    let cpu_before = cpu_seconds(&bench.tunnels)?;
    let (gbps_1, bytes_1) = iperf(path, 1)?;
    let (gbps_4, bytes_4) = iperf(path, 4)?;
    let cpu = cpu_seconds(&bench.tunnels)? - cpu_before;
    samples.add(path, "throughput_1_gbps", gbps_1);
    samples.add(path, "throughput_4_gbps", gbps_4);
    if path.prefix.is_empty() {
        samples.add_tunnel("cpu_s_per_gb", cpu / ((bytes_1 + bytes_4) / 1e9));
        samples.add_tunnel("rss_bulk_peak_mb", peak_rss_mb(&bench.tunnels)?);
    }
    let [p50, p99, p999] = sockperf(path)?;
    samples.add(path, "rtt_p50_us", p50);
    samples.add(path, "rtt_p99_us", p99);
    samples.add(path, "rtt_p999_us", p999);
    samples.add(path, "seq_conn_per_s", sequential_connection_rate(path)?);
    samples.add(path, "conn_per_s", connection_rate(path)?);
    Ok(())
}

/// The HTTP figures of one path. Through the tunnels, two ways to the web server (its
/// HTTP port, decided per request, and its plain port, copied as bytes), in an order
/// swapped every round; on the direct path, its server's HTTP port.
fn http_section(bench: &Bench, path: &Path, round: usize, samples: &mut Samples) -> Result<()> {
    let mut ways = if path.prefix.is_empty() {
        vec![
            ("l7_", bench.web, HTTP_PORT),
            ("l4_", bench.web, PLAIN_HTTP_PORT),
        ]
    } else {
        vec![("direct_", path.server, HTTP_PORT)]
    };
    if round % 2 == 1 {
        ways.reverse();
    }
    for (prefix, server, port) in ways {
        for protocol in [Http::One, Http::Two] {
            let url = format!(
                "http://{}/bench/item",
                SocketAddr::new(server.ip().into(), port)
            );
            let name = protocol.key();
            let busy = h2load(path.client, &url, protocol, HTTP_IN_FLIGHT)?;
            samples.add_tunnel(&format!("{prefix}{name}_rps"), busy.rate);
            let single = h2load(path.client, &url, protocol, 1)?;
            samples.add_tunnel(&format!("{prefix}{name}_p50_us"), single.p50_us);
            samples.add_tunnel(&format!("{prefix}{name}_p99_us"), single.p99_us);
        }
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum Http {
    /// HTTP/1.1, keep-alive, one request at a time per connection.
    One,
    /// HTTP/2 cleartext with prior knowledge, requests in flight as streams of one
    /// connection.
    Two,
}

impl Http {
    fn key(self) -> &'static str {
        match self {
            Http::One => "http1",
            Http::Two => "h2",
        }
    }
}

/// What one h2load run measured.
struct HttpRun {
    /// Requests answered per second.
    rate: f64,
    p50_us: f64,
    p99_us: f64,
}

/// h2load in the client pod for `H2LOAD_SECONDS`, `in_flight` requests at a time (HTTP/1.1:
/// as many connections; HTTP/2: as many streams on one connection). Every request must be
/// answered 2xx: a refused request would measure the refusal, not the path. Latencies come
/// from h2load's per-request log (microseconds from the request's start to the end of its
/// response).
fn h2load(client: &Pod, url: &str, protocol: Http, in_flight: usize) -> Result<HttpRun> {
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("requests.tsv");
    let (connections, streams) = match protocol {
        Http::One => (in_flight, 1),
        Http::Two => (1, in_flight),
    };
    // h2load can wait forever on a server that stops answering: bounded.
    let mut command = client.command("timeout");
    command.args(["60", "h2load"]);
    if let Http::One = protocol {
        command.arg("--h1");
    }
    let out = command
        .args([
            "-t",
            "1",
            "-c",
            &connections.to_string(),
            "-m",
            &streams.to_string(),
        ])
        .args(["-D", H2LOAD_SECONDS])
        .arg(format!("--log-file={}", log.display()))
        .arg(url)
        .output()
        .context("cannot start h2load (cargo xtask setup installs it)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let failed = || {
        format!(
            "h2load {url} ({}, {in_flight} in flight) failed: {}\n{text}",
            protocol.key(),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let field = |line_start: &str, before: &str| -> Option<f64> {
        let line = text.lines().find(|l| l.starts_with(line_start))?;
        let (head, _) = line.split_once(before)?;
        head.rsplit([' ', ',']).next()?.parse().ok()
    };
    let (Some(rate), Some(done), Some(ok)) = (
        field("finished in", " req/s"),
        field("requests:", " done"),
        field("status codes:", " 2xx"),
    ) else {
        bail!(failed());
    };
    if !out.status.success() || done == 0.0 || ok != done {
        bail!(failed());
    }
    let mut latencies: Vec<f64> = std::fs::read_to_string(&log)
        .with_context(|| format!("h2load wrote no log {}", log.display()))?
        .lines()
        .filter_map(|line| line.split('\t').nth(2)?.parse().ok())
        .collect();
    if latencies.is_empty() {
        bail!(
            "h2load's log {} holds no request: {}",
            log.display(),
            failed()
        );
    }
    latencies.sort_by(f64::total_cmp);
    let at = |share: f64| latencies[((latencies.len() as f64 * share).ceil() as usize).max(1) - 1];
    Ok(HttpRun {
        rate,
        p50_us: at(0.50),
        p99_us: at(0.99),
    })
}

/// iperf3 from the client pod to the server pod for `streams` parallel streams:
/// the received rate in Gbit/s and the bytes received.
fn iperf(path: &Path, streams: usize) -> Result<(f64, f64)> {
    let mut server = path
        .server
        .command("iperf3")
        .args(["-s", "-p", &IPERF_PORT.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("cannot start iperf3 (cargo xtask setup installs it)")?;
    let listening = wait_listening(path.server, IPERF_PORT);
    let out = listening.and_then(|()| {
        Ok(path
            .client
            .command("iperf3")
            .args(["-c", &path.server.ip().to_string()])
            .args(["-p", &IPERF_PORT.to_string(), "-t", IPERF_SECONDS, "-J"])
            .args(["-P", &streams.to_string()])
            .output()?)
    });
    let _ = server.kill();
    let _ = server.wait();
    let out = out?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 said: {}", String::from_utf8_lossy(&out.stderr)))?;
    let received = &report["end"]["sum_received"];
    match (
        received["bits_per_second"].as_f64(),
        received["bytes"].as_f64(),
    ) {
        (Some(bps), Some(bytes)) => Ok((bps / 1e9, bytes)),
        _ => bail!("iperf3 failed: {}", report["error"]),
    }
}

/// Waits until a server listens on the pod's address and `port`, probing from inside
/// the pod (a pod's connection to itself is never steered).
fn wait_listening(pod: &Pod, port: u16) -> Result<()> {
    let netns = pod.netns()?;
    let address = SocketAddr::new(pod.ip().into(), port);
    let deadline = Instant::now() + Duration::from_secs(10);
    while netns.run(move || TcpStream::connect(address))?.is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on {address} after 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// sockperf ping-pong, 64-byte messages over one TCP connection: p50, p99 and p99.9 of
/// the full round trip, in microseconds.
fn sockperf(path: &Path) -> Result<[f64; 3]> {
    let mut server = path
        .server
        .command("sockperf")
        .args(["server", "--tcp", "-i", &path.server.ip().to_string()])
        .args(["-p", &SOCKPERF_PORT.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("cannot start sockperf (cargo xtask setup installs it)")?;
    let listening = wait_listening(path.server, SOCKPERF_PORT);
    let out = listening.and_then(|()| {
        Ok(path
            .client
            .command("sockperf")
            .args(["ping-pong", "--tcp", "-i", &path.server.ip().to_string()])
            .args(["-p", &SOCKPERF_PORT.to_string(), "-m", "64"])
            .args(["-t", SOCKPERF_SECONDS, "--full-rtt"])
            .output()?)
    });
    let _ = server.kill();
    let _ = server.wait();
    let out = out?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let percentile = |which: &str| -> Result<f64> {
        let wanted = format!("percentile {which} =");
        text.lines()
            .find_map(|line| line.split_once(&wanted).map(|(_, v)| v.trim().parse().ok()))
            .flatten()
            .with_context(|| format!("no {wanted} in sockperf's output:\n{text}"))
    };
    Ok([
        percentile("50.000")?,
        percentile("99.000")?,
        percentile("99.900")?,
    ])
}

/// New connections per second made one at a time: connect, a one-byte echo, close,
/// then the next. The client runs on a thread inside the client pod's namespace.
fn sequential_connection_rate(path: &Path) -> Result<f64> {
    let target = path.target(ECHO_PORT);
    let netns = path.client.netns()?;
    netns.run(move || -> Result<f64> {
        let start = Instant::now();
        let mut done = 0u64;
        while start.elapsed() < CONNECT_SECONDS {
            let mut tcp = TcpStream::connect(target)?;
            tcp.set_nodelay(true)?;
            tcp.write_all(b"x")?;
            let mut b = [0u8; 1];
            tcp.read_exact(&mut b)?;
            done += 1;
        }
        Ok(done as f64 / start.elapsed().as_secs_f64())
    })?
}

/// New connections per second, each a connect, a one-byte echo and a close, from
/// `CONNECT_THREADS` threads at once, each with its own thread in the client pod's
/// namespace making its connections.
fn connection_rate(path: &Path) -> Result<f64> {
    let namespaces: Vec<_> = (0..CONNECT_THREADS)
        .map(|_| path.client.netns())
        .collect::<Result<_>>()?;
    let target = path.target(ECHO_PORT);
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let workers: Vec<_> = namespaces
        .into_iter()
        .map(|netns| {
            let (done, stop) = (done.clone(), stop.clone());
            std::thread::spawn(move || -> Result<()> {
                while !stop.load(Ordering::Relaxed) {
                    let mut tcp = netns.run(move || TcpStream::connect(target))??;
                    tcp.set_nodelay(true)?;
                    tcp.write_all(b"x")?;
                    let mut b = [0u8; 1];
                    tcp.read_exact(&mut b)?;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    std::thread::sleep(CONNECT_SECONDS);
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker
            .join()
            .map_err(|_| anyhow::anyhow!("a connecting thread panicked"))??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64())
}

/// `OPEN_CONNECTIONS` connections through the tunnels, each proven end to end by a
/// one-byte echo, held open until dropped.
fn open_connections(path: &Path) -> Result<Vec<TcpStream>> {
    let target = path.target(ECHO_PORT);
    let netns = path.client.netns()?;
    let mut open = Vec::with_capacity(OPEN_CONNECTIONS);
    for n in 0..OPEN_CONNECTIONS {
        let mut tcp = netns
            .run(move || TcpStream::connect(target))?
            .with_context(|| format!("connection {n} of {OPEN_CONNECTIONS}"))?;
        tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
        tcp.write_all(b"x")?;
        let mut b = [0u8; 1];
        tcp.read_exact(&mut b)
            .with_context(|| format!("echo on connection {n} of {OPEN_CONNECTIONS}"))?;
        open.push(tcp);
    }
    Ok(open)
}

/// User plus system CPU seconds of the processes so far.
fn cpu_seconds(pids: &[u32]) -> Result<f64> {
    let mut ticks = 0u64;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the command name (which may hold spaces): utime and stime are
        // the 14th and 15th fields of the line, the 12th and 13th after ") ".
        let rest = stat
            .rsplit_once(") ")
            .map(|(_, rest)| rest)
            .context("malformed /proc stat")?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        for field in &fields[11..13] {
            ticks += field.parse::<u64>()?;
        }
    }
    Ok(ticks as f64 / clock_ticks_per_second()? as f64)
}

fn clock_ticks_per_second() -> Result<u64> {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

/// The larger resident set of the tunnels, in MB.
fn rss_mb(pids: &[u32]) -> Result<f64> {
    largest_status_mb(pids, "VmRSS:")
}

/// The larger peak resident set of the tunnels so far, in MB.
fn peak_rss_mb(pids: &[u32]) -> Result<f64> {
    largest_status_mb(pids, "VmHWM:")
}

fn largest_status_mb(pids: &[u32], field: &str) -> Result<f64> {
    let mut largest = 0f64;
    for pid in pids {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
        largest = largest.max(kb / 1024.0);
    }
    Ok(largest)
}

/// The machine's CPU time from /proc/stat: all of it and the part stolen by the
/// hypervisor, in ticks.
struct MachineCpu {
    total: u64,
    steal: u64,
}

impl MachineCpu {
    fn read() -> Result<MachineCpu> {
        let stat = std::fs::read_to_string("/proc/stat")?;
        let line = stat
            .lines()
            .find(|l| l.starts_with("cpu "))
            .context("no cpu line in /proc/stat")?;
        let fields: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(str::parse)
            .collect::<Result<_, _>>()
            .context("malformed cpu line in /proc/stat")?;
        // user nice system idle iowait irq softirq steal (guest time is in user).
        let total = fields.iter().take(8).sum();
        let steal = fields.get(7).copied().unwrap_or(0);
        Ok(MachineCpu { total, steal })
    }

    fn steal_share_since(&self, before: &MachineCpu) -> f64 {
        let total = self.total.saturating_sub(before.total).max(1);
        self.steal.saturating_sub(before.steal) as f64 / total as f64
    }
}

/// The 1-minute load average.
fn load_average() -> Result<String> {
    let text = std::fs::read_to_string("/proc/loadavg")?;
    Ok(text.split_whitespace().next().unwrap_or("?").to_string())
}

/// This program again, serving echo or HTTP on every address of a pod; stopped on drop.
struct ServerProcess(std::process::Child);

impl ServerProcess {
    fn echo(pod: &Pod) -> Result<ServerProcess> {
        ServerProcess::start(pod, "--serve-echo", &[ECHO_PORT])
    }

    fn http(pod: &Pod, ports: &[u16]) -> Result<ServerProcess> {
        ServerProcess::start(pod, "--serve-http", ports)
    }

    fn start(pod: &Pod, serve: &str, ports: &[u16]) -> Result<ServerProcess> {
        let mut cmd = std::process::Command::new(std::env::current_exe()?);
        cmd.arg(serve).arg(pod.netns_path());
        for &port in ports {
            for ip in pod.ips() {
                cmd.arg("--at").arg(SocketAddr::new(ip, port).to_string());
            }
        }
        let child = cmd
            .stdin(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start the server ({serve})"))?;
        let process = ServerProcess(child);
        for &port in ports {
            wait_listening(pod, port)?;
        }
        Ok(process)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

/// An echo server, a thread per connection.
struct EchoServer {
    stop: Arc<AtomicBool>,
    addresses: Vec<SocketAddr>,
    netns: ztunnel::netns::Netns,
}

impl EchoServer {
    fn start(netns: ztunnel::netns::Netns, addresses: Vec<SocketAddr>) -> Result<EchoServer> {
        let stop = Arc::new(AtomicBool::new(false));
        for &address in &addresses {
            let listener = netns.run(move || TcpListener::bind(address))??;
            let stop = stop.clone();
            std::thread::spawn(move || {
                for tcp in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let Ok(mut tcp) = tcp else { continue };
                    let _ = tcp.set_nodelay(true);
                    std::thread::Builder::new()
                        .stack_size(64 * 1024)
                        .spawn(move || {
                            let mut buf = [0u8; 4096];
                            while let Ok(n @ 1..) = tcp.read(&mut buf) {
                                if tcp.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                        })
                        .ok();
                }
            });
        }
        Ok(EchoServer {
            stop,
            addresses,
            netns,
        })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake each accept loop so it sees the stop.
        for &address in &self.addresses {
            let _ = self.netns.run(move || TcpStream::connect(address));
        }
    }
}

/// A small HTTP server (hyper, HTTP/1.1 and HTTP/2 cleartext on every port) answering
/// every request `200 ok`, until the parent closes our stdin.
fn serve_http(netns: ztunnel::netns::Netns, addresses: Vec<SocketAddr>) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        for address in addresses {
            let listener = netns
                .listen(address, 0)
                .with_context(|| format!("cannot listen on {address}"))?;
            tokio::spawn(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    let _ = tcp.set_nodelay(true);
                    let service = hyper::service::service_fn(|_request| async {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from_static(b"ok\n"),
                        )))
                    });
                    tokio::spawn(
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(tcp), service)
                            .into_owned(),
                    );
                }
            });
        }
        tokio::task::spawn_blocking(|| std::io::stdin().read_to_end(&mut Vec::new())).await??;
        Ok(())
    })
}

fn print_table(samples: &Samples) {
    let rows = [
        ("throughput, 1 stream (Gbit/s)", "throughput_1_gbps"),
        ("throughput, 4 streams (Gbit/s)", "throughput_4_gbps"),
        ("RTT p50, 64 B (us)", "rtt_p50_us"),
        ("RTT p99, 64 B (us)", "rtt_p99_us"),
        ("RTT p99.9, 64 B (us)", "rtt_p999_us"),
        ("new connections/s, one at a time", "seq_conn_per_s"),
        ("new connections/s, 4 threads", "conn_per_s"),
        ("CPU s per GB, both tunnels", "cpu_s_per_gb"),
        ("tunnel RSS idle (MB)", "rss_idle_mb"),
        ("tunnel RSS peak during bulk (MB)", "rss_bulk_peak_mb"),
        ("tunnel RSS after bulk (MB)", "rss_after_bulk_mb"),
        ("tunnel RSS, 10 000 connections (MB)", "rss_10k_mb"),
    ];
    println!(
        "{:<38} {:>26} {:>26}",
        "median [min-max]", "tunnel", "direct"
    );
    for (label, key) in rows {
        let cell = |key: &str| match (samples.median(key), samples.range(key)) {
            (Some(median), Some((min, max))) => format!("{median:.2} [{min:.2}-{max:.2}]"),
            _ => "-".to_string(),
        };
        println!(
            "{label:<38} {:>26} {:>26}",
            cell(key),
            cell(&format!("direct_{key}"))
        );
    }
}

/// The HTTP figures: the tunnels deciding each request (L7), the tunnels copying bytes
/// (L4), the direct path; and the L7 way's share of the L4 way's rate and its added p99.
fn print_http_table(samples: &Samples) {
    if samples.median("l7_http1_rps").is_none() {
        return;
    }
    let rows = [
        ("HTTP/1.1 requests/s, 8 connections", "http1_rps"),
        ("HTTP/1.1 p50, 1 connection (us)", "http1_p50_us"),
        ("HTTP/1.1 p99, 1 connection (us)", "http1_p99_us"),
        ("HTTP/2 requests/s, 8 streams", "h2_rps"),
        ("HTTP/2 p50, 1 stream (us)", "h2_p50_us"),
        ("HTTP/2 p99, 1 stream (us)", "h2_p99_us"),
    ];
    println!(
        "{:<38} {:>26} {:>26} {:>26}",
        "median [min-max]", "tunnel, L7", "tunnel, L4", "direct"
    );
    let cell = |key: &str| match (samples.median(key), samples.range(key)) {
        (Some(median), Some((min, max))) => format!("{median:.0} [{min:.0}-{max:.0}]"),
        _ => "-".to_string(),
    };
    for (label, key) in rows {
        println!(
            "{label:<38} {:>26} {:>26} {:>26}",
            cell(&format!("l7_{key}")),
            cell(&format!("l4_{key}")),
            cell(&format!("direct_{key}"))
        );
    }
    for protocol in [Http::One, Http::Two] {
        let name = protocol.key();
        let median = |key: String| samples.median(&key).unwrap_or(f64::NAN);
        println!(
            "{name}: L7 keeps {:.0} % of the L4 rate (target >= 70 %), adds {:.0} us at p99 \
             (target <= 100)",
            100.0 * median(format!("l7_{name}_rps")) / median(format!("l4_{name}_rps")),
            median(format!("l7_{name}_p99_us")) - median(format!("l4_{name}_p99_us"))
        );
    }
}
