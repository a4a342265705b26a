//! HBONE: TCP connections carried as HTTP/2 CONNECT streams over mutual TLS, as Istio
//! ambient speaks it. `client` pools connections to peers and opens streams on them;
//! `server` answers CONNECT requests. Both are built on the `h2` crate; `Mtls` secures
//! the connections with the node's workload certificates.

mod client;
mod headers;
mod mtls;
mod server;
mod stream;

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

pub use client::{Pool, PoolConfig, PoolKey};
pub use headers::{ConnectHeaders, parse_baggage};
pub use mtls::{ClientTls, Mtls, ServerTls};
pub(crate) use server::parse_connect;
pub use server::{Incoming, RequestError, ServerConfig, serve_connection};
pub use stream::H2Stream;

/// HTTP/2 SETTINGS both sides advertise (shared/HBONE.md, matching Istio's ztunnel).
pub(crate) mod settings {
    /// INITIAL_WINDOW_SIZE of every stream.
    pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
    /// The connection window, larger than the stream window so that one stalled
    /// stream cannot starve the others of connection-level credit.
    pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
    pub const MAX_FRAME_SIZE: u32 = 1024 * 1024;
    pub const CLIENT_MAX_HEADER_LIST: u32 = 16 * 1024;
    pub const SERVER_MAX_HEADER_LIST: u32 = 64 * 1024;
    pub const SERVER_MAX_CONCURRENT_STREAMS: u32 = 200;
    /// Streams a client opens on one connection at most (then min with the peer's).
    pub const CLIENT_MAX_STREAMS: usize = 100;
}

/// Why an HBONE operation failed; each variant names the peer or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connecting to {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("TLS handshake with {addr}: {reason}")]
    Tls { addr: SocketAddr, reason: String },
    #[error("TLS handshake with {0} did not finish within {1:?}")]
    HandshakeTimeout(SocketAddr, Duration),
    #[error("HTTP/2 with {addr}: {source}")]
    H2 { addr: SocketAddr, source: h2::Error },
    #[error("HTTP/2 connection to {0} failed while it was being set up: {1}")]
    Setup(SocketAddr, String),
    /// The failed set-up of a connection that this stream waited for with others.
    #[error(transparent)]
    Establish(std::sync::Arc<Error>),
    #[error("HBONE peer {addr} answered CONNECT {authority} with {status}")]
    Status {
        addr: SocketAddr,
        authority: String,
        status: http::StatusCode,
    },
    #[error("no CONNECT request within {0:?}")]
    RequestTimeout(Duration),
    #[error("stream {0}: {1}")]
    Stream(SocketAddr, h2::Error),
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl Error {
    /// The error itself, or the one a shared connection set-up failed with.
    pub fn cause(&self) -> &Error {
        match self {
            Error::Establish(inner) => inner.cause(),
            other => other,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
