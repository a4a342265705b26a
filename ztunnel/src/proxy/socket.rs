//! Every socket the proxy opens is made here, so each one carries the tunnel's mark and
//! lives in the right network namespace: a workload's own (through `netns::Netns`) or,
//! for workloads without one (SOCKS5 clients on this host, tests), the tunnel's.

use std::io;
use std::net::{IpAddr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::netns::Netns;

/// Makes the proxy's sockets: TCP, non-blocking, with `SO_MARK` set when configured
/// (the redirect programs leave marked sockets alone), in `netns` when set.
#[derive(Clone, Debug, Default)]
pub struct Sockets {
    mark: Option<u32>,
    netns: Option<Netns>,
}

impl Sockets {
    pub fn new(mark: Option<u32>) -> Self {
        Sockets { mark, netns: None }
    }

    /// The same sockets, made inside `netns` (the tunnel's own namespace when `None`).
    pub fn within(&self, netns: Option<&Netns>) -> Sockets {
        Sockets {
            mark: self.mark,
            netns: netns.cloned(),
        }
    }

    /// Connects to `destination`, from `source` when given (port chosen by the kernel).
    pub async fn connect(
        &self,
        destination: SocketAddr,
        source: Option<IpAddr>,
    ) -> io::Result<TcpStream> {
        if let Some(netns) = &self.netns {
            let bind = source.map(|ip| SocketAddr::new(ip, 0));
            let mark = self.mark.unwrap_or_default();
            return netns
                .connect(bind, destination, mark)
                .await
                .map_err(|e| match e {
                    crate::netns::Error::Connect { source, .. } => source,
                    other => io::Error::other(other),
                });
        }
        let socket = self.socket(destination)?;
        let socket = TcpSocket::from_std_stream(socket.into());
        if let Some(ip) = source {
            socket.set_reuseaddr(true)?;
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        let tcp = socket.connect(destination).await?;
        tcp.set_nodelay(true)?;
        Ok(tcp)
    }

    /// Listens on `address` (backlog 1024) in the tunnel's own namespace.
    pub fn listen(&self, address: SocketAddr) -> io::Result<TcpListener> {
        let socket = self.socket(address)?;
        socket.set_reuse_address(true)?;
        socket.bind(&address.into())?;
        socket.listen(1024)?;
        TcpListener::from_std(socket.into())
    }

    fn socket(&self, address: SocketAddr) -> io::Result<Socket> {
        let socket = Socket::new(
            Domain::for_address(address),
            Type::STREAM.nonblocking(),
            Some(Protocol::TCP),
        )?;
        if let Some(mark) = self.mark {
            socket.set_mark(mark)?;
        }
        Ok(socket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs CAP_NET_ADMIN (root) to set SO_MARK.
    #[tokio::test]
    async fn sockets_carry_the_mark() {
        let sockets = Sockets::new(Some(0x539));
        let listener = sockets.listen("127.0.31.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let tcp = sockets
            .connect(addr, Some("127.0.31.2".parse().unwrap()))
            .await
            .expect("connect with SO_MARK (needs CAP_NET_ADMIN)");
        assert_eq!(socket2::SockRef::from(&tcp).mark().unwrap(), 0x539);
        assert_eq!(socket2::SockRef::from(&listener).mark().unwrap(), 0x539);
        assert_eq!(tcp.local_addr().unwrap().ip().to_string(), "127.0.31.2");
        assert!(tcp.nodelay().unwrap());
    }
}
