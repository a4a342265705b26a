//! `cargo xtask bench`: the tunnel against the direct path, in one run, on the same
//! two-node topology as the end-to-end tests (root).
//!
//! Node 0 holds the clients, node 1 the servers; one pair of pods is meshed (its
//! traffic crosses both tunnels as HBONE), the other pair is outside the mesh (the
//! direct path over the same links). Figures: iperf3 throughput with 1 and 4 streams,
//! 64-byte ping-pong round trips (p50, p99), new connections per second, both tunnels'
//! CPU seconds per GB moved, and tunnel memory idle and with 10 000 open connections.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ztunnel_tests::load::{self, EchoProcess, wait_listening};
use ztunnel_tests::{Cluster, Mesh, Pod, PodSpec};

const ECHO_PORT: u16 = 7000;
const IPERF_PORT: u16 = 5201;
const IPERF_SECONDS: &str = "5";
const PING_PONGS: usize = 20_000;
const CONNECT_SECONDS: Duration = Duration::from_secs(3);
const CONNECT_THREADS: usize = 4;
const OPEN_CONNECTIONS: usize = 10_000;

#[derive(clap::Parser)]
#[command(about = "Benchmark the tunnel against the direct path (root)")]
struct Args {
    /// Also write the figures as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

/// One path through the topology: a client pod and a server pod.
struct Path<'a> {
    client: &'a Pod,
    server: &'a Pod,
}

impl Path<'_> {
    fn target(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.server.ip().into(), port)
    }
}

fn main() -> Result<()> {
    if load::serve_echo_if_asked()? {
        return Ok(());
    }
    let args: Args = clap::Parser::parse();
    ztunnel_tests::require_root();
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
    let tunnels: Vec<u32> = (0..2)
        .map(|n| mesh.pid(n).context("tunnel not running"))
        .collect::<Result<_>>()?;
    let meshed = Path {
        client: cluster.pod(0, 0),
        server: cluster.pod(1, 0),
    };
    let direct = Path {
        client: cluster.pod(0, 1),
        server: cluster.pod(1, 1),
    };
    let _echo = [
        EchoProcess::start(meshed.server, ECHO_PORT)?,
        EchoProcess::start(direct.server, ECHO_PORT)?,
    ];

    let mut figures = BTreeMap::new();
    for (prefix, path) in [("", &meshed), ("direct_", &direct)] {
        let label = if prefix.is_empty() {
            "tunnel"
        } else {
            "direct"
        };
        eprintln!("bench: {label} path");
        let cpu_before = cpu_seconds(&tunnels)?;
        let (gbps_1, bytes) = iperf(path, 1)?;
        let cpu = cpu_seconds(&tunnels)? - cpu_before;
        figures.insert(format!("{prefix}throughput_1_gbps"), gbps_1);
        if prefix.is_empty() {
            figures.insert("cpu_s_per_gb".to_string(), cpu / (bytes / 1e9));
        }
        figures.insert(format!("{prefix}throughput_4_gbps"), iperf(path, 4)?.0);
        let (p50, p99) = ping_pong(path)?;
        figures.insert(format!("{prefix}rtt_p50_us"), p50);
        figures.insert(format!("{prefix}rtt_p99_us"), p99);
        figures.insert(format!("{prefix}conn_per_s"), connection_rate(path)?);
    }
    eprintln!("bench: tunnel memory");
    figures.insert("rss_idle_mb".to_string(), rss_mb(&tunnels)?);
    let open = open_connections(&meshed)?;
    std::thread::sleep(Duration::from_millis(500));
    figures.insert("rss_10k_mb".to_string(), rss_mb(&tunnels)?);
    drop(open);

    print_table(&figures);
    if let Some(file) = args.json {
        std::fs::write(&file, serde_json::to_string_pretty(&figures)? + "\n")
            .with_context(|| format!("cannot write {}", file.display()))?;
        println!("figures written to {}", file.display());
    }
    drop(mesh);
    drop(cluster);
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

/// 64-byte request, 64-byte answer, over one connection: p50 and p99 in microseconds.
fn ping_pong(path: &Path) -> Result<(f64, f64)> {
    let mut tcp = connect(path.client, path.target(ECHO_PORT))?;
    let mut buf = [7u8; 64];
    let mut samples = Vec::with_capacity(PING_PONGS);
    for _ in 0..PING_PONGS {
        let start = Instant::now();
        tcp.write_all(&buf)?;
        tcp.read_exact(&mut buf)?;
        samples.push(start.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    Ok((at(0.50), at(0.99)))
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

/// The larger resident set of the tunnels, in MB.
fn rss_mb(pids: &[u32]) -> Result<f64> {
    let mut largest = 0u64;
    for &pid in pids {
        largest = largest.max(load::rss_kb(pid)?);
    }
    Ok(largest as f64 / 1024.0)
}

fn connect(pod: &Pod, target: SocketAddr) -> Result<TcpStream> {
    let tcp = pod.netns()?.run(move || TcpStream::connect(target))??;
    tcp.set_nodelay(true)?;
    Ok(tcp)
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

fn print_table(figures: &BTreeMap<String, f64>) {
    let rows = [
        ("throughput, 1 stream (Gbit/s)", "throughput_1_gbps"),
        ("throughput, 4 streams (Gbit/s)", "throughput_4_gbps"),
        ("RTT p50, 64 B (us)", "rtt_p50_us"),
        ("RTT p99, 64 B (us)", "rtt_p99_us"),
        ("new connections per second", "conn_per_s"),
        ("CPU s per GB, both tunnels", "cpu_s_per_gb"),
        ("tunnel RSS idle (MB)", "rss_idle_mb"),
        ("tunnel RSS, 10 000 connections (MB)", "rss_10k_mb"),
    ];
    println!("{:<38} {:>12} {:>12}", "", "tunnel", "direct");
    for (label, key) in rows {
        let cell = |key: &str| {
            figures
                .get(key)
                .map(|v| format!("{v:.2}"))
                .unwrap_or_else(|| "-".to_string())
        };
        println!(
            "{label:<38} {:>12} {:>12}",
            cell(key),
            cell(&format!("direct_{key}"))
        );
    }
}
