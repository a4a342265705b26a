use anyhow::Result;
use clap::Parser;

#[derive(Parser)]
#[command(name = "ztunnel", version, about = "Node tunnel for ambient meshes")]
struct Cli {}

fn main() -> Result<()> {
    Cli::parse();
    Ok(())
}
