//! Builds and lints the eBPF programs in `ebpf/programs`, a cargo workspace of its own
//! that targets `bpfel-unknown-none` with nightly, `-Z build-std=core` and bpf-linker (its
//! `rust-toolchain.toml` and `.cargo/config.toml` say so). One place for the command
//! line, used by ztunnel's build script (which embeds the object) and by
//! `cargo xtask build-ebpf` / `cargo xtask lint-ebpf`.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The toolchain the programs build with (it must have `rust-src`).
pub const TOOLCHAIN: &str = "nightly";
/// The eBPF target.
pub const TARGET: &str = "bpfel-unknown-none";
/// The name of the programs' binary, and so of the object cargo writes.
pub const OBJECT_NAME: &str = "ztunnel-ebpf";

/// The eBPF programs' cargo workspace.
pub fn programs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the build crate lives in ebpf/")
        .join("programs")
}

/// Every file whose change must rebuild the object: the programs and the map types
/// they share with userspace.
pub fn sources() -> Vec<PathBuf> {
    let ebpf = programs_dir()
        .parent()
        .expect("the programs live in ebpf/")
        .to_path_buf();
    [
        "programs/src",
        "programs/Cargo.toml",
        "programs/Cargo.lock",
        "programs/.cargo/config.toml",
        "programs/rust-toolchain.toml",
        "common/src",
        "common/Cargo.toml",
    ]
    .iter()
    .map(|path| ebpf.join(path))
    .collect()
}

/// Builds the object (release) into `target_dir` and returns its path.
pub fn build(target_dir: &Path) -> Result<PathBuf> {
    run(cargo("build", target_dir).arg("--release"))?;
    Ok(target_dir.join(TARGET).join("release").join(OBJECT_NAME))
}

/// Runs clippy on the programs, warnings denied.
pub fn clippy(target_dir: &Path) -> Result<()> {
    run(cargo("clippy", target_dir).args(["--release", "--", "-D", "warnings"]))
}

/// `cargo <subcommand>` for the programs' workspace with the nightly toolchain and an
/// environment freed of what an outer cargo (a build script's parent) sets for its own
/// target: the nested build must use its own compiler, flags and target.
fn cargo(subcommand: &str, target_dir: &Path) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", TOOLCHAIN, "cargo", subcommand, "--locked"])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(programs_dir());
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "RUSTUP_TOOLCHAIN",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

fn run(cmd: &mut Command) -> Result<()> {
    let line = format!("{cmd:?}");
    let out = cmd.output().with_context(|| {
        format!(
            "cannot start {line}: rustup with a nightly toolchain is required (`cargo xtask setup`)"
        )
    })?;
    if !out.status.success() {
        bail!(
            "{line} failed ({}); `cargo xtask setup` installs nightly rust-src and bpf-linker:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
