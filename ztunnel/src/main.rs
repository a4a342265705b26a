use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ztunnel::check;

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
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Check(args) => ExitCode::from(check::run(&args)),
    }
}
