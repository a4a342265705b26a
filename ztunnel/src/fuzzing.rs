//! Entry points for the fuzz targets (`ztunnel/fuzz`): the parsers that peers and
//! operators feed, reachable without a socket, a cluster or a file. Not an API: it
//! follows the parsers wherever they change.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http::{Method, Uri};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::hbone::RequestError;
use crate::identity::{Chain, Identity, InProcessCa};

pub use crate::config::parse as parse_config;
pub use crate::hbone::ConnectHeaders;
pub use crate::identity::{CaFiles, CertificateInfo, generate_root};
pub use crate::policy::{
    Connection, Document, PathNormalization, Policy, Request, authorize, path_and_host,
};
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

/// The heads of the HTTP requests in `input`, read by the tunnel's HTTP server (the one
/// HTTP ports are served with: its framing checks and limits included) from a client connection that ends
/// where the input ends. Each request's body is read, and it is answered 200.
pub async fn http_requests(input: &[u8]) -> Vec<http::request::Parts> {
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = heads.clone();
    let service =
        hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
            let seen = seen.clone();
            async move {
                let (mut parts, body) = request.into_parts();
                // The extensions hold the upgrade's receiving end: kept, it would keep
                // the connection of an upgraded request (a CONNECT answered 200) open
                // and the client waiting for its end forever.
                parts.extensions.clear();
                seen.lock().expect("not poisoned").push(parts);
                let _ = body.collect().await;
                Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<
                    bytes::Bytes,
                >::new()))
            }
        });
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let config = crate::http::Config::default();
    let server = crate::http::framing::Framing::new(
        server,
        config.max_header_bytes,
        Arc::new(std::sync::OnceLock::new()),
    );
    let http = crate::http::server(&config);
    let served = http.serve_connection_with_upgrades(TokioIo::new(server), service);
    let client = async move {
        let _ = client.write_all(input).await;
        let _ = client.shutdown().await;
        let mut answers = Vec::new();
        let _ = client.read_to_end(&mut answers).await;
    };
    let _ = tokio::join!(served, client);
    std::mem::take(&mut *heads.lock().expect("not poisoned"))
}
