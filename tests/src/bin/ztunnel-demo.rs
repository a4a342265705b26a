//! `cargo xtask demo`: a two-node, four-pod mesh on this machine, told step by step.
//! Needs root; removes everything it made when it ends, also on failure.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ztunnel_tests::{Cluster, Mesh, Pod, PodSpec, SEED_POLICIES, ztunnel_binary};

const PAYMENTS_PORT: u16 = 9090;
const STEP: Duration = Duration::from_secs(3);

#[tokio::main]
async fn main() -> Result<()> {
    ztunnel_tests::require_root();
    say("Building a cluster on this machine: two nodes, two pods each, all network namespaces.");
    let cluster = Cluster::builder().nodes(2).pods_per_node(2).build()?;
    let specs = vec![
        PodSpec::new(cluster.pod(0, 0), "prod", "orders"),
        PodSpec::new(cluster.pod(0, 1), "prod", "inventory"),
        PodSpec::new(cluster.pod(1, 0), "finance", "payments"),
        PodSpec::new(cluster.pod(1, 1), "legacy", "batch").unmeshed(),
    ];
    for (spec, pod) in specs.iter().zip(cluster.pods()) {
        say(&format!(
            "  {:<8} node {}  {:<16} {:<15} {}",
            if spec.meshed { "meshed" } else { "outside" },
            pod.node_index(),
            spec.key(),
            pod.ip(),
            pod.ipv6()
        ));
    }
    say("Policies: namespace finance is STRICT (mTLS only); only");
    say("  cluster.local/ns/prod/sa/orders may call payments, and only on port 9090.");
    let mut mesh = Mesh::new(&cluster, specs.clone(), SEED_POLICIES)?;
    let payments = cluster.pod(1, 0);
    let app = echo_app(payments, PAYMENTS_PORT)?;
    say(&format!(
        "payments runs an echo server on {}:{PAYMENTS_PORT}.",
        payments.ip()
    ));

    say("\nStarting one tunnel per node (ztunnel run, in the node's namespace).");
    say("Each loads its eBPF steering and enrols its meshed pods.");
    mesh.start_all().await?;
    say("Both tunnels are ready: local pods enrolled, certificates issued.");

    let target = SocketAddr::new(payments.ip().into(), PAYMENTS_PORT);
    let callers = [
        (cluster.pod(0, 0), &specs[0]),
        (cluster.pod(0, 1), &specs[1]),
        (cluster.pod(1, 1), &specs[3]),
    ];
    for (number, (pod, spec)) in callers.into_iter().enumerate() {
        say(&format!(
            "\nStep {}: {} ({}) connects to payments at {target} and says hello.",
            number + 1,
            spec.key(),
            if spec.meshed {
                "in the mesh"
            } else {
                "outside the mesh"
            }
        ));
        let outcome = exchange(pod, target).await;
        match &outcome {
            Ok(()) => say("  Result: the echo came back. The connection was allowed."),
            Err(e) => say(&format!(
                "  Result: no echo ({e:#}). The connection was refused."
            )),
        }
        let verdict = check(&mesh, spec, target)?;
        explain(&verdict);
        if outcome.is_ok() != verdict["allowed"].as_bool().unwrap_or(false) {
            bail!("what happened differs from what ztunnel check predicts");
        }
    }

    say("\nStep 4: the tunnel of node 1 (payments' node) crashes.");
    mesh.kill(1)?;
    let orders = cluster.pod(0, 0);
    match exchange(orders, target).await {
        Ok(()) => bail!("orders reached payments with payments' tunnel gone"),
        Err(e) => say(&format!(
            "  orders tries again: refused ({e:#}).\n  The steering stays in the kernel and fails \
             closed: nothing reaches payments unprotected."
        )),
    }
    say("  The tunnel restarts; it finds its pinned steering and enrols the pods again.");
    mesh.start(1).await?;
    exchange(orders, target).await?;
    say("  orders tries again: the echo came back, with no manual step.");

    app.abort();
    say("\nDone. Removing the tunnels, the eBPF programs and every namespace.");
    drop(mesh);
    drop(cluster);
    say("Everything is removed.");
    Ok(())
}

fn say(line: &str) {
    println!("{line}");
}

/// `ztunnel check --json`: the tunnel's own account of the decision.
fn check(mesh: &Mesh, from: &PodSpec, to: SocketAddr) -> Result<serde_json::Value> {
    let mut cmd = std::process::Command::new(ztunnel_binary()?);
    cmd.arg("check").arg("--config").arg(mesh.config(0));
    if from.meshed {
        cmd.args(["--from", &from.key()]);
    } else {
        cmd.args(["--from-ip", &from_ip(from)]);
    }
    let out = cmd
        .args(["--to", &to.to_string(), "--json"])
        .output()
        .context("cannot run ztunnel check")?;
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "ztunnel check answered no JSON: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn from_ip(spec: &PodSpec) -> String {
    spec.ips()
        .first()
        .map(ToString::to_string)
        .unwrap_or_default()
}

fn explain(v: &serde_json::Value) {
    let text = |key: &str| v[key].as_str().unwrap_or("none").to_string();
    say(&format!(
        "  Why (ztunnel check): transport {}; source identity {}; destination identity {};",
        text("transport"),
        text("source_identity"),
        text("destination_identity"),
    ));
    say(&format!(
        "    mTLS mode at payments {} (from {}); deciding policy {}:",
        text("mode"),
        text("mode_source"),
        text("policy"),
    ));
    say(&format!("    {}", text("reason")));
}

async fn exchange(from: &Pod, to: SocketAddr) -> Result<()> {
    let netns = from.netns()?;
    let mut tcp = tokio::time::timeout(STEP, netns.connect(None, to, 0))
        .await
        .context("no connection in time")??;
    tcp.write_all(b"hello").await?;
    let mut back = [0u8; 5];
    tokio::time::timeout(STEP, tcp.read_exact(&mut back))
        .await
        .context("no answer in time")?
        .context("connection closed")?;
    Ok(())
}

/// An echo server inside `pod`.
fn echo_app(pod: &Pod, port: u16) -> Result<tokio::task::JoinHandle<()>> {
    let listener = pod
        .netns()?
        .listen(SocketAddr::new(pod.ip().into(), port), 0)?;
    Ok(tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    }))
}
