//! `cargo xtask fuzz`: the cargo-fuzz targets of `ztunnel/fuzz`, each run for a while
//! (libFuzzer, nightly, AddressSanitizer), starting from the seeds committed in
//! `ztunnel/fuzz/seeds/<target>` and a working corpus in `target/fuzz/corpus/<target>`
//! that is kept between runs. Fails when a target finds a crash (the input is in
//! `ztunnel/fuzz/artifacts/<target>/`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::{run, workspace_root};

/// Every fuzz target (`ztunnel/fuzz/fuzz_targets/<name>.rs`).
pub const TARGETS: &[&str] = &[
    "connect_request",
    "socks5_handshake",
    "config_file",
    "istio_policy",
    "certificate_identity",
    "ca_sign_request",
    "http_request",
];

/// What one target's run did.
struct Outcome {
    target: &'static str,
    seconds: f64,
    runs: u64,
    corpus: usize,
    crashes: Vec<PathBuf>,
}

fn fuzz_dir() -> PathBuf {
    workspace_root().join("ztunnel").join("fuzz")
}

fn target_dir() -> PathBuf {
    workspace_root().join("target").join("fuzz")
}

/// How the targets are built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Build {
    /// Optimized, for long runs: many more inputs per second.
    Release,
    /// Unoptimized, with overflow checks: builds in half the CPU time, for short runs.
    Dev,
}

/// `cargo +nightly fuzz <subcommand>` for the targets' crate.
fn cargo_fuzz(subcommand: &str, build: Build) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root())
        .args(["+nightly", "fuzz", subcommand]);
    if build == Build::Dev {
        cmd.arg("--dev");
    }
    cmd.arg("--fuzz-dir")
        .arg(fuzz_dir())
        .arg("--target-dir")
        .arg(target_dir());
    // The outer cargo (stable, running xtask) must not choose the nightly build's tools.
    for var in ["RUSTC", "RUSTUP_TOOLCHAIN", "CARGO", "RUSTFLAGS"] {
        cmd.env_remove(var);
    }
    cmd
}

/// Builds the targets, runs each of `targets` for `seconds`, prints a summary and fails
/// if any crashed.
pub fn fuzz(seconds: u64, target: Option<&str>, build: Build) -> Result<()> {
    let targets: Vec<&'static str> = match target {
        Some(name) => vec![
            TARGETS
                .iter()
                .copied()
                .find(|t| *t == name)
                .with_context(|| {
                    format!("no fuzz target {name:?}; targets: {}", TARGETS.join(", "))
                })?,
        ],
        None => TARGETS.to_vec(),
    };
    let started = Instant::now();
    run(&mut cargo_fuzz("build", build))?;
    eprintln!(
        "fuzz: targets built in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let mut outcomes = Vec::new();
    for target in targets {
        outcomes.push(run_target(target, seconds, build)?);
    }
    println!(
        "{:<22} {:>8} {:>12} {:>8} {:>8}",
        "target", "seconds", "runs", "corpus", "crashes"
    );
    for o in &outcomes {
        println!(
            "{:<22} {:>8.0} {:>12} {:>8} {:>8}",
            o.target,
            o.seconds,
            o.runs,
            o.corpus,
            o.crashes.len()
        );
    }
    let crashed: Vec<String> = outcomes
        .iter()
        .flat_map(|o| o.crashes.iter())
        .map(|p| p.display().to_string())
        .collect();
    if !crashed.is_empty() {
        bail!("fuzz targets crashed; inputs: {}", crashed.join(", "));
    }
    Ok(())
}

fn run_target(target: &'static str, seconds: u64, build: Build) -> Result<Outcome> {
    let corpus = target_dir().join("corpus").join(target);
    let seeds = fuzz_dir().join("seeds").join(target);
    let artifacts = fuzz_dir().join("artifacts").join(target);
    let logs = target_dir().join("logs");
    for dir in [&corpus, &artifacts, &logs] {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let before = files(&artifacts)?;
    let log_path = logs.join(format!("{target}.log"));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("cannot create {}", log_path.display()))?;
    eprintln!(
        "fuzz: {target} for {seconds} s (log: {})",
        log_path.display()
    );
    let started = Instant::now();
    // New inputs go to the first corpus directory only: the seeds stay as committed.
    let status = cargo_fuzz("run", build)
        .arg(target)
        .arg(&corpus)
        .arg(&seeds)
        .args([
            "--",
            &format!("-max_total_time={seconds}"),
            "-timeout=10",
            "-print_final_stats=1",
        ])
        .stdout(Stdio::null())
        .stderr(log.try_clone()?)
        .status()
        .with_context(|| format!("cannot run fuzz target {target}"))?;
    let seconds = started.elapsed().as_secs_f64();
    let text = std::fs::read_to_string(&log_path)?;
    let crashes: Vec<PathBuf> = files(&artifacts)?
        .into_iter()
        .filter(|f| !before.contains(f))
        .collect();
    if !status.success() && crashes.is_empty() {
        bail!(
            "fuzz target {target} failed ({status}) without a crash input; see {}",
            log_path.display()
        );
    }
    let runs = text
        .lines()
        .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    Ok(Outcome {
        target,
        seconds,
        runs,
        corpus: files(&corpus)?.len(),
        crashes,
    })
}

fn files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        out.push(entry?.path());
    }
    Ok(out)
}
