use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use ztunnel::check;
use ztunnel::identity::{self, CaFiles, Identity, InProcessCa};

#[derive(Parser)]
#[command(name = "ztunnel", version, about = "Node tunnel for ambient meshes")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Explain, without traffic, what would happen to a connection: transport,
    /// identities, effective mTLS mode, and the policy that allows or denies it.
    /// Exits 0 when allowed, 1 when refused, 2 on bad input.
    Check(check::Args),
    /// The in-process certificate authority's files.
    #[command(subcommand)]
    Ca(CaCommand),
}

#[derive(Subcommand)]
enum CaCommand {
    /// Write a new root certificate and key (ECDSA P-256) into DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
    },
    /// Issue a workload certificate from the root in DIR: writes cert-chain.pem, key.pem
    /// and root-cert.pem into OUT (for a peer outside this tunnel, or to inspect).
    Issue {
        #[arg(long)]
        dir: PathBuf,
        /// spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>
        #[arg(long)]
        identity: Identity,
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let outcome = match Cli::parse().command {
        Command::Check(args) => return ExitCode::from(check::run(&args)),
        Command::Ca(ca) => run_ca(ca),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_ca(command: CaCommand) -> Result<()> {
    match command {
        CaCommand::Init { dir, trust_domain } => {
            let files = identity::init_ca(&dir, &trust_domain)?;
            println!("wrote {} and {}", files.cert.display(), files.key.display());
            Ok(())
        }
        CaCommand::Issue { dir, identity, out } => issue(&dir, &identity, &out),
    }
}

fn issue(dir: &Path, id: &Identity, out: &Path) -> Result<()> {
    let ca = InProcessCa::load(&CaFiles::in_dir(dir), identity::DEFAULT_CERT_LIFETIME)?;
    let key = rcgen::KeyPair::generate().context("cannot generate a key pair")?;
    let chain = ca.issue(id, &key)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let pem = |der: &[u8]| pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()));
    let write = |name: &str, contents: String| {
        let path = out.join(name);
        std::fs::write(&path, contents).with_context(|| format!("cannot write {}", path.display()))
    };
    write("cert-chain.pem", chain.iter().map(|c| pem(c)).collect())?;
    write("key.pem", key.serialize_pem())?;
    write("root-cert.pem", pem(ca.root()))?;
    println!("issued {id} into {}", out.display());
    Ok(())
}
