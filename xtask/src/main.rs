//! Project tasks: `cargo xtask <command>`.
//!
//! `setup` installs what a fresh machine of this image lacks; `test` runs setup when
//! needed and then every test of the workspace, privileged ones included; `demo` and
//! `bench` and `soak` run a two-node mesh of network namespaces on this machine; `fuzz` runs the
//! fuzz targets of `ztunnel/fuzz`; `build-ebpf`
//! and `lint-ebpf` build and lint the eBPF programs (ebpf/programs, a workspace of its
//! own that host builds cannot compile).

mod apiserver;
mod fuzz;
mod setup;

use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "Build, test and run the node tunnel")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what a fresh machine lacks: nightly rust-src, bpf-linker (LLVM 22), Debian
    /// tools, helm, etcd, and kube-apiserver built from Debian's source (once, cached).
    Setup,
    /// Build the eBPF object (ebpf/programs) and print its path. `cargo build` of the
    /// ztunnel crate does the same on its own and embeds the object.
    BuildEbpf,
    /// Lint the eBPF programs with clippy (warnings are errors).
    LintEbpf,
    /// Run setup when needed, lint the eBPF programs, run each fuzz target briefly, then
    /// every test of the workspace (root-only tests included).
    Test {
        /// Extra arguments passed to `cargo test` (after `--` for test filters).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run setup when needed, then certificate renewal and a staged CA rotation with
    /// 1 000 connections held open, then connection churn, bulk and idle connections and
    /// policy edits through two eBPF-steered tunnels for `--minutes`, checking memory,
    /// descriptors and connection counts; then memory per idle connection (root).
    Soak {
        /// How long the churn runs.
        #[arg(long, default_value_t = 30)]
        minutes: u64,
        /// Idle connections opened at the end to measure memory per connection.
        #[arg(long, default_value_t = 10_000)]
        idle: usize,
    },
    /// Run setup when needed, then the fuzz targets (cargo-fuzz, nightly) one after the
    /// other, each for `--seconds`, and print runs, corpus size and crashes per target.
    /// Fails on a crash.
    Fuzz {
        /// How long each target runs.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only this target (default: all).
        target: Option<String>,
    },
    /// Run setup when needed, then a two-node, four-pod mesh on this machine, told step
    /// by step, each claim checked: fails when one does not hold (root). Removes
    /// everything it made.
    Demo,
    /// Run setup when needed, then measure the tunnel (release build) against the
    /// direct path on the demo's topology and print a table (root).
    Bench {
        /// Also write the figures as JSON to this file.
        #[arg(long, value_name = "FILE")]
        json: Option<std::path::PathBuf>,
        /// Rounds over both paths.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// The sections a round measures, of `l4` and `http`.
        #[arg(long, default_value = "l4,http")]
        sections: String,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Setup => {
            setup::run()?;
            apiserver::run()
        }
        Task::BuildEbpf => {
            setup::run()?;
            let target_dir = ztunnel_ebpf_build::programs_dir().join("target");
            let object = ztunnel_ebpf_build::build(&target_dir)?;
            println!("{}", object.display());
            Ok(())
        }
        Task::LintEbpf => {
            setup::run()?;
            ztunnel_ebpf_build::clippy(&ztunnel_ebpf_build::programs_dir().join("target"))
        }
        Task::Test { args } => test(&args),
        Task::Soak { minutes, idle } => {
            setup::run()?;
            // The rotation with 1 000 connections held first (also part of `test`):
            // under a minute, where the churn takes `minutes`.
            run(Command::new(cargo())
                .current_dir(workspace_root())
                .args(["test", "--locked", "-p", "ztunnel", "--test", "rotation"])
                .args(["--", "--nocapture"]))?;
            let args = [
                "--minutes".to_string(),
                minutes.to_string(),
                "--idle".to_string(),
                idle.to_string(),
            ];
            run_in_mesh(&[], "ztunnel-soak", &args)
        }
        Task::Fuzz { seconds, target } => {
            setup::run()?;
            setup::install_cargo_fuzz()?;
            fuzz::fuzz(seconds, target.as_deref(), fuzz::Build::Release)
        }
        Task::Demo => {
            setup::run()?;
            run_in_mesh(&[], "ztunnel-demo", &[])
        }
        Task::Bench {
            json,
            rounds,
            sections,
        } => {
            setup::run()?;
            let mut args = vec![
                "--rounds".to_string(),
                rounds.to_string(),
                "--sections".to_string(),
                sections,
            ];
            if let Some(file) = json {
                // The bench runs from the workspace root: make a relative path absolute.
                let file = std::env::current_dir()?.join(file);
                args.extend(["--json".to_string(), file.display().to_string()]);
            }
            run_in_mesh(&["--release"], "ztunnel-bench", &args)
        }
    }
}

/// Builds the `ztunnel` binary and runs `program` of the test crate (which starts
/// tunnels from that binary), with the same build profile.
fn run_in_mesh(profile: &[&str], program: &str, args: &[String]) -> Result<()> {
    run(Command::new(cargo())
        .current_dir(workspace_root())
        .args(["build", "--locked", "-p", "ztunnel", "--bin", "ztunnel"])
        .args(profile))?;
    run(Command::new(cargo())
        .current_dir(workspace_root())
        .args([
            "run",
            "--locked",
            "-q",
            "-p",
            "ztunnel-tests",
            "--bin",
            program,
        ])
        .args(profile)
        .arg("--")
        .args(args))
}

/// How long `cargo xtask test` runs each fuzz target (an unoptimized build, which takes
/// half the release build's CPU time): the committed seeds replayed and a few thousand
/// new inputs tried; `cargo xtask fuzz` fuzzes for real.
const FUZZ_SECONDS_IN_TEST: u64 = 10;

/// Setup, then every fuzz target briefly, then every test. When `kube-apiserver` is not
/// built yet (a fresh machine), its build runs beside the Rust builds, and the tests
/// start once both are done.
fn test(args: &[String]) -> Result<()> {
    setup::run()?;
    let apiserver_build = if apiserver::installed() {
        None
    } else {
        Some(std::thread::spawn(apiserver::run))
    };
    // The eBPF programs are outside the host workspace: lint them here so CI does.
    let built = ztunnel_ebpf_build::clippy(&ztunnel_ebpf_build::programs_dir().join("target"))
        .and_then(|()| {
            run(Command::new(cargo())
                .current_dir(workspace_root())
                .args(["test", "--workspace", "--locked", "--no-run"])
                .args(args))
        })
        // The fuzz targets are a crate of their own: without this they would not even
        // be built. Before the tests, so that the tests' summary closes the output.
        .and_then(|()| setup::install_cargo_fuzz())
        .and_then(|()| fuzz::fuzz(FUZZ_SECONDS_IN_TEST, None, fuzz::Build::Dev));
    if let Some(build) = apiserver_build {
        build
            .join()
            .map_err(|_| anyhow::anyhow!("the kube-apiserver build panicked"))??;
    }
    built?;
    let mut cmd = Command::new(cargo());
    cmd.current_dir(workspace_root())
        .args(["test", "--workspace", "--locked"])
        .env("ZTUNNEL_KUBE_APISERVER", apiserver::binary())
        .args(args);
    run(&mut cmd)
}

/// The cargo that runs this task, so the same toolchain builds everything.
pub(crate) fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string())
}

pub(crate) fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// Runs a command to completion, failing with the command line when it does not succeed.
pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let line = format!("{cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {line}"))?;
    if !status.success() {
        bail!("{line} failed: {status}");
    }
    Ok(())
}
