//! Installs what a fresh machine of this image lacks, and skips what is already there.
//! The facts behind each step are in shared/TOOLCHAIN.md: nightly needs `rust-src` for
//! `-Z build-std` (and clippy to lint the eBPF programs), and bpf-linker must be built
//! against LLVM 22 (nightly's LLVM major). cargo-fuzz runs the fuzz targets.

use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::run as run_command;

const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// Debian packages: LLVM for bpf-linker, and the tools the end-to-end tests and
/// benchmarks drive (iproute2 for namespaces, procps for sysctl inside them, util-linux
/// for nsenter and setpriv, tcpdump to look at the wire, iperf3).
const DEBIAN_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "iproute2",
    "procps",
    "util-linux",
    "tcpdump",
    "iperf3",
];

pub fn run() -> Result<()> {
    install_nightly_components()?;
    install_debian_packages()?;
    install_bpf_linker()?;
    install_cargo_fuzz()
}

/// cargo-fuzz, which builds and runs the fuzz targets (`cargo xtask fuzz`).
fn install_cargo_fuzz() -> Result<()> {
    let installed = Command::new(crate::cargo())
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if installed {
        return Ok(());
    }
    eprintln!("setup: installing cargo-fuzz (about 2 minutes)");
    run_command(Command::new(crate::cargo()).args(["install", "cargo-fuzz", "--locked"]))
}

/// Nightly components: `rust-src` for `-Z build-std`, clippy to lint the eBPF programs.
const NIGHTLY_COMPONENTS: &[&str] = &["rust-src", "clippy"];

fn install_nightly_components() -> Result<()> {
    let out = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .context("cannot run rustup: a Rust toolchain installed by rustup is required")?;
    if !out.status.success() {
        bail!(
            "the nightly toolchain is missing (rustup said: {})",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let installed = String::from_utf8_lossy(&out.stdout);
    for component in NIGHTLY_COMPONENTS {
        if installed.lines().any(|l| l.starts_with(component)) {
            continue;
        }
        eprintln!("setup: adding {component} to the nightly toolchain");
        run_command(Command::new("rustup").args([
            "component",
            "add",
            component,
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

fn install_debian_packages() -> Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|pkg| !debian_package_installed(pkg))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing Debian packages {}", missing.join(" "));
    run_command(Command::new("apt-get").arg("update").stdout(Stdio::null()))?;
    run_command(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null()),
    )
}

fn debian_package_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn install_bpf_linker() -> Result<()> {
    let installed = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
        })
        .unwrap_or(false);
    if installed {
        return Ok(());
    }
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about 2 minutes)");
    run_command(
        Command::new(crate::cargo())
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
            ])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", LLVM_PREFIX),
    )
}
