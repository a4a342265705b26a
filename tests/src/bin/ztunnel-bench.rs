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
//! Sections: [`SECTIONS`] lists what a round measures; a section is a function of the
//! bench and a path that records samples under its keys.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
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

#[derive(clap::Parser)]
#[command(about = "Benchmark the tunnel against the direct path (root)")]
struct Args {
    /// Also write the medians (and each figure's `_min` and `_max`) as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Rounds over both paths (at least 3 for a median worth the name).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Internal: serve echo in the network namespace at this path until stdin closes
    /// (the server end of the open connections lives in its own process, so neither
    /// end needs more descriptors than the machine's limit).
    #[arg(long, hide = true, value_name = "NETNS", requires = "at")]
    serve_echo: Option<PathBuf>,
    /// Internal: the addresses `--serve-echo` listens on.
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

/// A part of a round: measures one path and records its samples.
type Section = fn(&Bench, &Path, &mut Samples) -> Result<()>;

/// What each round measures on each path, in order. Another section (an L7 one, say)
/// is one more entry here.
const SECTIONS: &[(&str, Section)] = &[("l4", l4_section)];

fn main() -> Result<()> {
    let args: Args = clap::Parser::parse();
    ztunnel_tests::require_root();
    if let Some(netns) = args.serve_echo {
        let _echo = EchoServer::start(ztunnel::netns::Netns::open(netns)?, args.at)?;
        // Serve until the parent closes our stdin.
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        return Ok(());
    }
    if args.rounds == 0 {
        bail!("--rounds 0: at least one round is needed");
    }
    let runtime = tokio::runtime::Runtime::new()?;
    let cluster = Cluster::builder().nodes(2).pods_per_node(2).build()?;
    let specs = vec![
        PodSpec::new(cluster.pod(0, 0), "bench", "client"),
        PodSpec::new(cluster.pod(0, 1), "bench", "direct-client").unmeshed(),
        PodSpec::new(cluster.pod(1, 0), "bench", "server"),
        PodSpec::new(cluster.pod(1, 1), "bench", "direct-server").unmeshed(),
    ];
    let mut mesh = Mesh::new(&cluster, specs, "")?;
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
    };
    let _echo = [
        EchoProcess::start(bench.meshed.server)?,
        EchoProcess::start(bench.direct.server)?,
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
            for (name, section) in SECTIONS {
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
                section(&bench, path, &mut samples)?;
            }
        }
        std::thread::sleep(SETTLE);
        samples.add_tunnel("rss_after_bulk_mb", rss_mb(&bench.tunnels)?);
    }
    eprintln!("bench: 10 000 open connections");
    let open = open_connections(&bench.meshed)?;
    std::thread::sleep(Duration::from_millis(500));
    samples.add_tunnel("rss_10k_mb", rss_mb(&bench.tunnels)?);
    drop(open);
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
fn l4_section(bench: &Bench, path: &Path, samples: &mut Samples) -> Result<()> {
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

/// This program again, serving echo on every address of a pod; stopped on drop.
struct EchoProcess(std::process::Child);

impl EchoProcess {
    fn start(pod: &Pod) -> Result<EchoProcess> {
        let mut cmd = std::process::Command::new(std::env::current_exe()?);
        cmd.arg("--serve-echo").arg(pod.netns_path());
        for ip in pod.ips() {
            cmd.arg("--at")
                .arg(SocketAddr::new(ip, ECHO_PORT).to_string());
        }
        let child = cmd
            .stdin(std::process::Stdio::piped())
            .spawn()
            .context("cannot start the echo server")?;
        let process = EchoProcess(child);
        wait_listening(pod, ECHO_PORT)?;
        Ok(process)
    }
}

impl Drop for EchoProcess {
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
