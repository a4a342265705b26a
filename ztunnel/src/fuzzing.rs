//! Entry points for the fuzz targets (`ztunnel/fuzz`): the parsers that peers and
//! operators feed, reachable without a socket, a cluster or a file. Not an API: it
//! follows the parsers wherever they change.

use std::net::SocketAddr;

use http::{Method, Uri};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::hbone::RequestError;
use crate::identity::{Chain, Identity, InProcessCa};

pub use crate::config::parse as parse_config;
pub use crate::hbone::ConnectHeaders;
pub use crate::identity::{CaFiles, CertificateInfo, generate_root};
pub use crate::policy::{Connection, Document, Policy, authorize};
pub use crate::tls::identity_of;

/// One Istio policy document as the config file holds it (YAML; JSON is YAML too).
pub fn parse_policy(text: &str) -> Result<Document, serde_yaml::Error> {
    serde_yaml::from_str(text)
}

/// The destination of a CONNECT request as the HBONE server reads it from the request's
/// method and `:authority`.
pub fn connect_destination(method: &Method, uri: &Uri) -> Result<SocketAddr, RequestError> {
    crate::hbone::parse_connect(method, uri)
}

/// The SOCKS5 listener's reading of a client's greeting and CONNECT request from
/// `stream` (the method choice is written back to it): the destination, or the reply
/// code owed to the client (none when the client gets no reply) and why.
pub async fn socks5_request<S>(stream: &mut S) -> Result<SocketAddr, (Option<u8>, String)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    crate::proxy::socks5::request(stream)
        .await
        .map_err(|(reply, error)| (reply.map(|r| r as u8), error.to_string()))
}

/// What the CA service does with the JSON body of an authorized `POST /v1/sign`: the
/// identity asked for and the chain `ca` signs for it, or why the body is refused (400).
pub fn sign_request(ca: &InProcessCa, body: &[u8]) -> Result<(Identity, Chain), String> {
    let (identity, csr) = crate::kube::ca::parse_sign_request(body)?;
    let chain = ca
        .issue(&identity, &csr.public_key)
        .map_err(|e| e.to_string())?;
    Ok((identity, chain))
}
