//! A SOCKS5 outbound listener (RFC 1928: no authentication, CONNECT, IPv4 and IPv6
//! addresses): the capture path for hosts without eBPF (tests, development machines),
//! needing no root. The client's source address tells which local workload it is, so
//! the listener is on loopback only, and a client is served only when the user owning
//! its socket (the uid in `/proc/net/tcp`) is the tunnel's own or one of
//! `socks5AllowedUids`: another local user who binds a workload's loopback address does
//! not get that workload's identity.

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
        if let Err(error) = caller_allowed(&tcp, client, &inner.config.socks5_allowed_uids).await {
            return self
                .socks_refused(tcp, client, Some(Reply::NotAllowed), error)
                .await;
        }
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

/// Checks that the user owning the client's socket may use the listener: the tunnel's
/// own user or one of `allowed`.
async fn caller_allowed(tcp: &TcpStream, client: SocketAddr, allowed: &[u32]) -> Result<(), Error> {
    let local = tcp.local_addr()?;
    let uid = tokio::task::spawn_blocking(move || socket_owner(client, local))
        .await
        .map_err(|e| Error::Socks(format!("looking up the owner of {client}: {e}")))??;
    let own = nix::unistd::geteuid().as_raw();
    if uid == own || allowed.contains(&uid) {
        return Ok(());
    }
    Err(Error::Socks(format!(
        "the client {client} belongs to uid {uid}, which is neither the tunnel's ({own}) \
         nor one of socks5AllowedUids {allowed:?}"
    )))
}

/// The uid owning the client's end of the loopback connection `client` -> `local`, from
/// the TCP table of this thread's network namespace (where the listener is).
fn socket_owner(client: SocketAddr, local: SocketAddr) -> Result<u32, Error> {
    let path = match client {
        SocketAddr::V4(_) => "/proc/thread-self/net/tcp",
        SocketAddr::V6(_) => "/proc/thread-self/net/tcp6",
    };
    let table = std::fs::read_to_string(path)
        .map_err(|e| Error::Socks(format!("cannot read {path} to tell the client's user: {e}")))?;
    owner_in_table(&table, client, local).ok_or_else(|| {
        Error::Socks(format!(
            "no socket {client} -> {local} in {path}: cannot tell the client's user"
        ))
    })
}

/// The `uid` column of the row of a `/proc/net/tcp{,6}` table whose local address is
/// `client` and remote address `local`.
pub(crate) fn owner_in_table(table: &str, client: SocketAddr, local: SocketAddr) -> Option<u32> {
    table.lines().skip(1).find_map(|line| {
        let mut fields = line.split_whitespace();
        let _slot = fields.next()?;
        let from = proc_address(fields.next()?)?;
        let to = proc_address(fields.next()?)?;
        if from != client || to != local {
            return None;
        }
        // st, tx_queue:rx_queue, tr:tm->when, retrnsmt, then uid.
        fields.nth(4)?.parse().ok()
    })
}

/// An address as `/proc/net/tcp` writes it: the IP as 32-bit words in hex, each in the
/// host's byte order, then `:` and the port in hex.
fn proc_address(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |hex: &str| u32::from_str_radix(hex, 16).ok().map(u32::to_ne_bytes);
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(ip)?)),
        32 => {
            let mut octets = [0u8; 16];
            for (i, chunk) in octets.chunks_mut(4).enumerate() {
                chunk.copy_from_slice(&word(ip.get(i * 8..i * 8 + 8)?)?);
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An address as the kernel writes it in `/proc/net/tcp{,6}` on this host.
    fn proc_hex(addr: SocketAddr) -> String {
        let words: Vec<u32> = match addr.ip() {
            IpAddr::V4(ip) => vec![u32::from_ne_bytes(ip.octets())],
            IpAddr::V6(ip) => ip
                .octets()
                .chunks(4)
                .map(|c| u32::from_ne_bytes(c.try_into().unwrap()))
                .collect(),
        };
        let ip: String = words.iter().map(|w| format!("{w:08X}")).collect();
        format!("{ip}:{:04X}", addr.port())
    }

    fn row(slot: usize, from: SocketAddr, to: SocketAddr, uid: u32) -> String {
        format!(
            "{slot:4}: {} {} 01 00000000:00000000 00:00000000 00000000 {uid:5}        0 {slot} 1 0 20 4 30 10 -1\n",
            proc_hex(from),
            proc_hex(to)
        )
    }

    const HEADER: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n";

    #[test]
    fn owner_is_read_from_the_clients_row() {
        let listener: SocketAddr = "127.0.0.1:1080".parse().unwrap();
        let client: SocketAddr = "127.0.0.2:41713".parse().unwrap();
        let other: SocketAddr = "127.0.0.3:41713".parse().unwrap();
        // The tunnel's accepted end (uid 0), then the client's end (uid 1000).
        let table = format!(
            "{HEADER}{}{}",
            row(0, listener, client, 0),
            row(1, client, listener, 1000)
        );
        assert_eq!(owner_in_table(&table, client, listener), Some(1000));
        assert_eq!(owner_in_table(&table, listener, client), Some(0));
        assert_eq!(owner_in_table(&table, other, listener), None);

        let listener: SocketAddr = "[::1]:1080".parse().unwrap();
        let client: SocketAddr = "[::1]:40001".parse().unwrap();
        let table = format!("{HEADER}{}", row(0, client, listener, 1001));
        assert_eq!(owner_in_table(&table, client, listener), Some(1001));

        assert_eq!(owner_in_table(HEADER, client, listener), None);
        let garbage = format!("{HEADER}   0: zz:zz 1:1 01\n   1: 0100007F:0438\n");
        assert_eq!(owner_in_table(&garbage, client, listener), None);
    }

    /// The kernel's own table holds a connection made here, under this process's uid.
    #[test]
    fn owner_of_a_real_loopback_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_accepted, _) = listener.accept().unwrap();
        let owner = socket_owner(client.local_addr().unwrap(), client.peer_addr().unwrap());
        assert_eq!(owner.unwrap(), nix::unistd::geteuid().as_raw());
    }
}
