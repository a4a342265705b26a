//! A SOCKS5 outbound listener (RFC 1928: no authentication, CONNECT, IPv4 and IPv6
//! addresses): a capture path that needs neither eBPF nor root. The client's source
//! address tells which local workload it is. Loopback only.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info};

use http::StatusCode;

use super::metrics::RefusedReason;
use super::{Error, Proxy};
use crate::hbone;

const VERSION: u8 = 5;
const NO_AUTH: u8 = 0;
const NO_ACCEPTABLE_METHOD: u8 = 0xff;
const CONNECT: u8 = 1;
const ATYP_V4: u8 = 1;
const ATYP_DOMAIN: u8 = 3;
const ATYP_V6: u8 = 4;

/// SOCKS5 reply codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reply {
    Succeeded = 0,
    /// "Connection not allowed by ruleset": refused by a policy, here or at the
    /// destination's tunnel.
    NotAllowed = 2,
    HostUnreachable = 4,
    /// "Connection refused": nothing accepted the connection at the destination.
    ConnectionRefused = 5,
    CommandNotSupported = 7,
    AddressTypeNotSupported = 8,
}

impl Proxy {
    /// Serves SOCKS5 on `listener` until the drain starts. Refuses a listener that is
    /// not on a loopback address.
    pub async fn serve_socks5(&self, listener: TcpListener) -> Result<(), Error> {
        let local = listener.local_addr()?;
        if !local.ip().is_loopback() {
            return Err(Error::Socks(format!(
                "listener {local} is not on a loopback address"
            )));
        }
        self.accept_loop(listener, |proxy, tcp, client| async move {
            proxy.socks5(tcp, client).await;
        })
        .await;
        Ok(())
    }

    async fn socks5(self, mut tcp: TcpStream, client: SocketAddr) {
        let inner = &self.inner;
        let request = tokio::time::timeout(inner.config.socks5_timeout, request(&mut tcp)).await;
        let destination = match request {
            Ok(Ok(destination)) => destination,
            Ok(Err((reply, error))) => return self.socks_refused(tcp, client, reply, error).await,
            Err(_) => {
                let error = Error::Socks(format!(
                    "no complete request within {:?}",
                    inner.config.socks5_timeout
                ));
                return self.socks_refused(tcp, client, None, error).await;
            }
        };
        let Some(source) = inner.mesh.local_workload(client.ip()) else {
            let error = Error::NoWorkload(client.ip());
            return self
                .socks_refused(tcp, client, Some(Reply::NotAllowed), error)
                .await;
        };
        let outbound = self.reach(client, &source, destination).await;
        let reply = outbound
            .reached()
            .map_or_else(reply_to, |()| Reply::Succeeded);
        if let Err(e) = send_reply(&mut tcp, reply).await {
            // The copy below fails at once and logs the connection.
            debug!(%client, error = %e, "SOCKS5 client gone before the reply");
        }
        outbound.run(&tcp).await;
    }

    async fn socks_refused(
        &self,
        mut tcp: TcpStream,
        client: SocketAddr,
        reply: Option<Reply>,
        error: Error,
    ) {
        self.inner.metrics.refused(RefusedReason::Socks);
        info!(%client, error = %error, "SOCKS5 request refused");
        if let Some(reply) = reply {
            // The client may already be gone; it is refused either way.
            let _ = send_reply(&mut tcp, reply).await;
        }
    }
}

/// Reads the greeting and the request; the error carries the reply owed to the client.
pub(crate) async fn request<S>(tcp: &mut S) -> Result<SocketAddr, (Option<Reply>, Error)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let io = |e: std::io::Error| (None, Error::Io(e));
    let mut head = [0u8; 2];
    tcp.read_exact(&mut head).await.map_err(io)?;
    if head[0] != VERSION {
        return Err((None, Error::Socks(format!("version {} is not 5", head[0]))));
    }
    let mut methods = vec![0u8; usize::from(head[1])];
    tcp.read_exact(&mut methods).await.map_err(io)?;
    if !methods.contains(&NO_AUTH) {
        tcp.write_all(&[VERSION, NO_ACCEPTABLE_METHOD])
            .await
            .map_err(io)?;
        return Err((
            None,
            Error::Socks(format!("no acceptable method in {methods:?}")),
        ));
    }
    tcp.write_all(&[VERSION, NO_AUTH]).await.map_err(io)?;
    let mut request = [0u8; 4];
    tcp.read_exact(&mut request).await.map_err(io)?;
    let [version, command, _reserved, atyp] = request;
    if version != VERSION {
        return Err((
            None,
            Error::Socks(format!("request version {version} is not 5")),
        ));
    }
    if command != CONNECT {
        let error = Error::Socks(format!("command {command} is not CONNECT"));
        return Err((Some(Reply::CommandNotSupported), error));
    }
    let ip = match atyp {
        ATYP_V4 => {
            let mut octets = [0u8; 4];
            tcp.read_exact(&mut octets).await.map_err(io)?;
            IpAddr::V4(Ipv4Addr::from(octets))
        }
        ATYP_V6 => {
            let mut octets = [0u8; 16];
            tcp.read_exact(&mut octets).await.map_err(io)?;
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        other => {
            let kind = if other == ATYP_DOMAIN {
                "domain name"
            } else {
                "unknown"
            };
            let error = Error::Socks(format!("address type {other} ({kind}) is not supported"));
            return Err((Some(Reply::AddressTypeNotSupported), error));
        }
    };
    let port = tcp.read_u16().await.map_err(io)?;
    Ok(SocketAddr::new(ip, port))
}

/// The reply owed to a client whose upstream could not be reached: a policy refusal
/// (a local route refusal, or the destination tunnel's 401/403) is "not allowed", a
/// connection nothing accepted (refused, or the destination tunnel's 503: it could not
/// connect to the application) is "connection refused", anything else "host unreachable".
fn reply_to(error: &Error) -> Reply {
    let refused = |e: &std::io::Error| e.kind() == std::io::ErrorKind::ConnectionRefused;
    match error {
        Error::Refused { .. } | Error::Denied { .. } | Error::Strict(_) => Reply::NotAllowed,
        Error::Hbone(e) => match e.cause() {
            hbone::Error::Status { status, .. } => match *status {
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Reply::NotAllowed,
                StatusCode::SERVICE_UNAVAILABLE => Reply::ConnectionRefused,
                _ => Reply::HostUnreachable,
            },
            hbone::Error::Connect { source, .. } if refused(source) => Reply::ConnectionRefused,
            _ => Reply::HostUnreachable,
        },
        Error::Upstream { source, .. } if refused(source) => Reply::ConnectionRefused,
        _ => Reply::HostUnreachable,
    }
}

async fn send_reply<S: AsyncWrite + Unpin>(tcp: &mut S, reply: Reply) -> std::io::Result<()> {
    // Bound address: unspecified, as the tunnel's upstream address is not the client's
    // business.
    tcp.write_all(&[VERSION, reply as u8, 0, ATYP_V4, 0, 0, 0, 0, 0, 0])
        .await
}
