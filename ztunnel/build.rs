//! Builds the eBPF programs (ebpf/programs) and puts the object in OUT_DIR, where
//! `redirect` embeds it with `include_bytes_aligned!`. A plain `cargo build` therefore
//! needs nightly with rust-src and bpf-linker, which `cargo xtask setup` installs.

use std::path::PathBuf;

use anyhow::{Context, Result};

fn main() -> Result<()> {
    for source in ztunnel_ebpf_build::sources() {
        println!("cargo::rerun-if-changed={}", source.display());
    }
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR is not set")?);
    let object = ztunnel_ebpf_build::build(&out_dir.join("ebpf-target"))?;
    let embedded = out_dir.join("ztunnel-ebpf.o");
    std::fs::copy(&object, &embedded)
        .with_context(|| format!("cannot copy {} to {}", object.display(), embedded.display()))?;
    Ok(())
}
