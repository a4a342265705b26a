//! Every socket the proxy opens is made here, so each one carries the tunnel's mark.

use std::io;
use std::net::{IpAddr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Makes the proxy's sockets: TCP, non-blocking, with `SO_MARK` set when configured
/// (the redirect programs leave marked sockets alone).
#[derive(Clone, Debug, Default)]
pub struct Sockets {
    mark: Option<u32>,
}

impl Sockets {
    pub fn new(mark: Option<u32>) -> Self {
        Sockets { mark }
    }

    /// Connects to `destination`, from `source` when given (port chosen by the kernel).
    pub async fn connect(
        &self,
        destination: SocketAddr,
        source: Option<IpAddr>,
    ) -> io::Result<TcpStream> {
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

    /// Listens on `address` (backlog 1024).
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
