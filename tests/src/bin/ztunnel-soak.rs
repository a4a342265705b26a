//! `cargo xtask soak`: connection churn through two eBPF-steered tunnels for a while,
//! then many idle connections (root).
//!
//! Node 0 holds the client pod, node 1 the server pod, both meshed: every connection
//! crosses both tunnels as HBONE. For `--minutes`: new connections (connect, echo,
//! close) and bulk streams (1 MiB echoed) without pause, idle connections held open
//! throughout, and a policy edit on both nodes every few seconds. Both tunnels' RSS and
//! open descriptors are sampled from /proc. It fails unless, after the warm-up, RSS grew
//! under 5% and descriptors stayed flat, every connection worked (the idle ones too, at
//! the end), and each tunnel counted as many connections closed as opened. Then it
//! opens `--idle` connections and reports the tunnels' memory per connection.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ztunnel_tests::load::{self, EchoProcess};
use ztunnel_tests::{Cluster, Mesh, Pod, PodSpec};

const ECHO_PORT: u16 = 7000;
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
const POLICY_EDIT_EVERY: Duration = Duration::from_secs(3);
const HELD_CONNECTIONS: usize = 200;
const BULK_BYTES: usize = 1 << 20;
/// Growth of the larger tunnel RSS allowed between the end of the warm-up and the end.
const MAX_RSS_GROWTH: f64 = 0.05;

const POLICY: &str = "
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: server-callers, namespace: soak}
  spec:
    selector: {matchLabels: {app: server}}
    action: ALLOW
    rules:
    - from: [{source: {principals: [cluster.local/ns/soak/sa/client]}}]
      to: [{operation: {ports: [\"7000\"]}}]
";

/// The policy the edits add and remove: it denies a port nothing uses, so traffic is
/// unaffected while every edit is compiled and applied.
fn edited_policy(generation: u64) -> String {
    format!(
        "
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {{name: edit-{generation}, namespace: soak}}
  spec:
    action: DENY
    rules:
    - to: [{{operation: {{ports: [\"{port}\"]}}}}]
",
        port = 7100 + generation % 100
    )
}

#[derive(clap::Parser)]
#[command(about = "Soak two tunnels with connection churn (root)")]
struct Args {
    /// How long the churn runs.
    #[arg(long, default_value_t = 30)]
    minutes: u64,
    /// Idle connections opened at the end to measure memory per connection.
    #[arg(long, default_value_t = 10_000)]
    idle: usize,
}

#[derive(Default)]
struct Counts {
    churned: AtomicU64,
    bulk: AtomicU64,
    errors: AtomicU64,
}

struct Sample {
    at: Duration,
    rss_kb: [u64; 2],
    fds: [usize; 2],
}

fn main() -> Result<()> {
    if load::serve_echo_if_asked()? {
        return Ok(());
    }
    let args: Args = clap::Parser::parse();
    ztunnel_tests::require_root();
    let duration = Duration::from_secs(args.minutes * 60);
    let warm_up = (duration / 5).max(Duration::from_secs(10));
    let runtime = tokio::runtime::Runtime::new()?;
    let cluster = Cluster::builder().nodes(2).pods_per_node(1).build()?;
    let specs = vec![
        PodSpec::new(cluster.pod(0, 0), "soak", "client"),
        PodSpec::new(cluster.pod(1, 0), "soak", "server"),
    ];
    let mut mesh = Mesh::new(&cluster, specs, POLICY)?;
    runtime.block_on(mesh.start_all())?;
    let pids = [0, 1].map(|n| mesh.pid(n).expect("started"));
    let client = cluster.pod(0, 0);
    let server = cluster.pod(1, 0);
    let _echo = EchoProcess::start(server, ECHO_PORT)?;
    let target = SocketAddr::new(server.ip().into(), ECHO_PORT);

    let mut held = Vec::with_capacity(HELD_CONNECTIONS);
    for _ in 0..HELD_CONNECTIONS {
        held.push(echo_connection(client, target)?);
    }
    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let workers = vec![
        spawn_worker(client, target, &counts, &stop, false)?,
        spawn_worker(client, target, &counts, &stop, true)?,
    ];

    let configs: Vec<(std::path::PathBuf, String)> = (0..2)
        .map(|n| {
            let path = mesh.config(n).to_path_buf();
            let text = std::fs::read_to_string(&path)?;
            Ok((path, text))
        })
        .collect::<Result<_>>()?;
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut edits = 0u64;
    let mut next_sample = Duration::ZERO;
    let mut next_edit = POLICY_EDIT_EVERY;
    while started.elapsed() < duration {
        let now = started.elapsed();
        if now >= next_sample {
            samples.push(Sample {
                at: now,
                rss_kb: [load::rss_kb(pids[0])?, load::rss_kb(pids[1])?],
                fds: [load::open_fds(pids[0])?, load::open_fds(pids[1])?],
            });
            next_sample += SAMPLE_EVERY;
        }
        if now >= next_edit {
            edits += 1;
            for (path, text) in &configs {
                // Every other edit adds a policy, the next removes it again.
                let text = if edits % 2 == 1 {
                    format!("{text}{}", edited_policy(edits))
                } else {
                    text.clone()
                };
                std::fs::write(path, text)
                    .with_context(|| format!("cannot edit {}", path.display()))?;
            }
            next_edit += POLICY_EDIT_EVERY;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker
            .join()
            .map_err(|_| anyhow::anyhow!("a load thread panicked"))?;
    }
    let mut dropped = 0;
    for tcp in &mut held {
        if echo(tcp).is_err() {
            dropped += 1;
        }
    }
    drop(held);
    std::thread::sleep(Duration::from_secs(2));
    let after = Sample {
        at: started.elapsed(),
        rss_kb: [load::rss_kb(pids[0])?, load::rss_kb(pids[1])?],
        fds: [load::open_fds(pids[0])?, load::open_fds(pids[1])?],
    };
    let mut metrics = Vec::new();
    for n in 0..2 {
        let text = runtime.block_on(mesh.metrics(n))?;
        metrics.push((
            sum(&text, "istio_tcp_connections_opened_total"),
            sum(&text, "istio_tcp_connections_closed_total"),
            sum(&text, "ztunnel_config_reloads_total"),
            sum(&text, "ztunnel_config_rejected_total"),
        ));
    }

    let rss_before = [load::rss_kb(pids[0])?, load::rss_kb(pids[1])?];
    let idle = open_idle(client, target, args.idle)?;
    std::thread::sleep(Duration::from_millis(500));
    let rss_idle = [load::rss_kb(pids[0])?, load::rss_kb(pids[1])?];
    drop(idle);

    println!(
        "soak: {} min, two tunnels (debug build), eBPF steering",
        args.minutes
    );
    println!("samples (s, RSS kB node-0/node-1, fds node-0/node-1):");
    for s in samples.iter().chain(std::iter::once(&after)) {
        println!(
            "  {:>6.0} {:>8} {:>8} {:>6} {:>6}",
            s.at.as_secs_f64(),
            s.rss_kb[0],
            s.rss_kb[1],
            s.fds[0],
            s.fds[1]
        );
    }
    let churned = counts.churned.load(Ordering::Relaxed);
    let bulk = counts.bulk.load(Ordering::Relaxed);
    let errors = counts.errors.load(Ordering::Relaxed);
    println!(
        "connections: {churned} churned, {bulk} bulk ({} MiB each way), {HELD_CONNECTIONS} held ({dropped} dropped), {errors} errors; {edits} policy edits",
        BULK_BYTES >> 20
    );
    for (n, (opened, closed, reloads, rejected)) in metrics.iter().enumerate() {
        println!(
            "node-{n}: opened {opened}, closed {closed}, config reloads {reloads}, rejected {rejected}"
        );
    }
    for n in 0..2 {
        let per = (rss_idle[n].saturating_sub(rss_before[n])) as f64 * 1024.0 / args.idle as f64;
        println!(
            "node-{n}: RSS {} kB before, {} kB with {} idle connections: {per:.0} bytes per connection",
            rss_before[n], rss_idle[n], args.idle
        );
    }

    let mut failures = Vec::new();
    let warm = samples
        .iter()
        .find(|s| s.at >= warm_up)
        .context("no sample after the warm-up: run longer")?;
    for (n, &(opened, closed, _, rejected)) in metrics.iter().enumerate() {
        let growth = after.rss_kb[n] as f64 / warm.rss_kb[n] as f64 - 1.0;
        if growth >= MAX_RSS_GROWTH {
            failures.push(format!(
                "node-{n} RSS grew {:.1}% after the warm-up ({} to {} kB)",
                growth * 100.0,
                warm.rss_kb[n],
                after.rss_kb[n]
            ));
        }
        // The held connections are closed at the end: fewer descriptors, never more.
        if after.fds[n] > warm.fds[n] {
            failures.push(format!(
                "node-{n} holds {} descriptors at the end, {} after the warm-up",
                after.fds[n], warm.fds[n]
            ));
        }
        if opened != closed {
            failures.push(format!(
                "node-{n} counted {opened} connections opened and {closed} closed"
            ));
        }
        if rejected != 0 {
            failures.push(format!("node-{n} rejected {rejected} config edits"));
        }
    }
    if errors != 0 || dropped != 0 {
        failures.push(format!(
            "{errors} connection errors, {dropped} held connections dropped"
        ));
    }
    drop(mesh);
    drop(cluster);
    if !failures.is_empty() {
        bail!("soak failed:\n  {}", failures.join("\n  "));
    }
    println!("soak passed");
    Ok(())
}

/// The sum of every series of `name` in a Prometheus text.
fn sum(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn connect(pod: &Pod, target: SocketAddr) -> Result<TcpStream> {
    let tcp = pod.netns()?.run(move || TcpStream::connect(target))??;
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(tcp)
}

fn echo(tcp: &mut TcpStream) -> Result<()> {
    tcp.write_all(b"x")?;
    let mut b = [0u8; 1];
    tcp.read_exact(&mut b)?;
    Ok(())
}

fn echo_connection(pod: &Pod, target: SocketAddr) -> Result<TcpStream> {
    let mut tcp = connect(pod, target)?;
    echo(&mut tcp)?;
    Ok(tcp)
}

/// A thread making connections until `stop`: each a one-byte echo, or (`bulk`) 1 MiB
/// sent and read back.
fn spawn_worker(
    pod: &Pod,
    target: SocketAddr,
    counts: &Arc<Counts>,
    stop: &Arc<AtomicBool>,
    bulk: bool,
) -> Result<std::thread::JoinHandle<()>> {
    let netns = pod.netns()?;
    let (counts, stop) = (counts.clone(), stop.clone());
    Ok(std::thread::spawn(move || {
        let payload = vec![0x5a_u8; BULK_BYTES];
        while !stop.load(Ordering::Relaxed) {
            let result = (|| -> Result<()> {
                let mut tcp = netns.run(move || TcpStream::connect(target))??;
                tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
                if bulk {
                    let mut reader = tcp.try_clone()?;
                    let read = std::thread::spawn(move || -> Result<()> {
                        let mut back = vec![0u8; BULK_BYTES];
                        reader.read_exact(&mut back)?;
                        Ok(())
                    });
                    tcp.write_all(&payload)?;
                    read.join()
                        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
                } else {
                    echo(&mut tcp)?;
                }
                Ok(())
            })();
            match result {
                Ok(()) if bulk => counts.bulk.fetch_add(1, Ordering::Relaxed),
                Ok(()) => counts.churned.fetch_add(1, Ordering::Relaxed),
                Err(e) => {
                    eprintln!("soak: connection failed: {e:#}");
                    counts.errors.fetch_add(1, Ordering::Relaxed)
                }
            };
        }
    }))
}

/// `count` connections through the tunnels, each proven by a one-byte echo.
fn open_idle(pod: &Pod, target: SocketAddr, count: usize) -> Result<Vec<TcpStream>> {
    let mut open = Vec::with_capacity(count);
    for n in 0..count {
        open.push(
            echo_connection(pod, target)
                .with_context(|| format!("idle connection {n} of {count}"))?,
        );
    }
    Ok(open)
}
