use std::path::PathBuf;

use super::Identity;

/// Errors of the identity layer; each names the file, identity or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {problem}", path.display())]
    Malformed { path: PathBuf, problem: String },
    #[error("{}: edit refused: {problem}", path.display())]
    BundleRefused { path: PathBuf, problem: String },
    #[error("cannot issue a certificate for {identity}: {problem}")]
    Issue { identity: Identity, problem: String },
    #[error("cannot issue a server certificate for {names:?}: {problem}")]
    IssueServer { names: Vec<String>, problem: String },
    #[error("certificate for {identity} is unusable: {problem}")]
    Certificate { identity: Identity, problem: String },
    #[error("no workload of {0} runs on this node, so the tunnel holds no certificate for it")]
    NotHeld(Identity),
    #[error("cannot generate a key pair: {0}")]
    KeyGeneration(String),
}
