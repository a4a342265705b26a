//! The tunnel's connections to the application for one client connection: made from
//! inside the pod's namespace as the L4 path makes them, one HTTP/1.1 connection kept
//! alive across the client's requests (hyper serves them one after another) or one
//! HTTP/2 connection they all share, made on the first request that needs it.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use http::{Request, Response, Version};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tracing::debug;

use super::Body;
use crate::proxy::{Drain, Sockets};

/// Makes connections to the application: `target` from `local_ip`, with sockets made
/// where the application's address exists.
#[derive(Clone, Debug)]
pub struct Connector {
    pub sockets: Sockets,
    pub target: SocketAddr,
    pub local_ip: IpAddr,
}

impl Connector {
    async fn connect(&self) -> io::Result<TcpStream> {
        self.sockets.connect(self.target, Some(self.local_ip)).await
    }
}

/// Why a request could not be forwarded.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to {target}: {source}")]
    Connect {
        target: SocketAddr,
        source: io::Error,
    },
    #[error("HTTP handshake with {target}: {source}")]
    Handshake {
        target: SocketAddr,
        source: hyper::Error,
    },
    #[error("request to {target}: {source}")]
    Request {
        target: SocketAddr,
        source: hyper::Error,
    },
}

impl UpstreamError {
    /// The application could not be reached at all (Envoy's `UF`).
    pub fn is_connect(&self) -> bool {
        !matches!(self, UpstreamError::Request { .. })
    }
}

/// How long the kept HTTP/1.1 connection may take to be ready for the next request
/// before another is made.
const READY_WAIT: Duration = Duration::from_millis(100);

pub(super) struct Upstream {
    connector: Connector,
    /// Upgraded connections are its connections too.
    drain: Drain,
    http1: Mutex<Option<http1::SendRequest<Body>>>,
    http2: Mutex<Option<http2::SendRequest<Body>>>,
}

impl Upstream {
    pub(super) fn new(connector: Connector, drain: Drain) -> Self {
        Upstream {
            connector,
            drain,
            http1: Mutex::default(),
            http2: Mutex::default(),
        }
    }

    /// Forwards `request` in its own HTTP version and returns the response head.
    pub(super) async fn send(
        &self,
        request: Request<Body>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let target = self.connector.target;
        let failed = |source| UpstreamError::Request { target, source };
        if request.version() == Version::HTTP_2 {
            let mut sender = self.http2_sender().await?;
            return sender.send_request(request).await.map_err(failed);
        }
        let mut sender = self.http1_sender().await?;
        let response = sender.send_request(request);
        // Kept for the next request once this one's response body has been read.
        *self.http1.lock().unwrap_or_else(|p| p.into_inner()) = Some(sender);
        response.await.map_err(failed)
    }

    /// Forwards an upgrade request on a connection of its own; on `101` the two
    /// upgraded connections are joined byte for byte until either side closes.
    pub(super) async fn upgrade(
        &self,
        request: Request<Body>,
        client: OnUpgrade,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let target = self.connector.target;
        let tcp = self.connect().await?;
        let (mut sender, connection) = http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|source| UpstreamError::Handshake { target, source })?;
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                debug!(%target, error = %e, "upstream upgrade connection ended");
            }
        });
        let mut response = sender
            .send_request(request)
            .await
            .map_err(|source| UpstreamError::Request { target, source })?;
        if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            let server = hyper::upgrade::on(&mut response);
            self.drain.spawn(async move {
                match tokio::try_join!(client, server) {
                    Ok((client, server)) => {
                        let (mut client, mut server) = (TokioIo::new(client), TokioIo::new(server));
                        if let Err(e) =
                            tokio::io::copy_bidirectional(&mut client, &mut server).await
                        {
                            debug!(%target, error = %e, "upgraded connection ended");
                        }
                    }
                    Err(e) => debug!(%target, error = %e, "upgrade not completed"),
                }
            });
        }
        Ok(response)
    }

    async fn connect(&self) -> Result<TcpStream, UpstreamError> {
        self.connector
            .connect()
            .await
            .map_err(|source| UpstreamError::Connect {
                target: self.connector.target,
                source,
            })
    }

    /// The kept HTTP/1.1 connection once it is ready for the next request, or a new one.
    async fn http1_sender(&self) -> Result<http1::SendRequest<Body>, UpstreamError> {
        let kept = self.http1.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut sender) = kept
            && !sender.is_closed()
            // The client's previous response has been sent whole before hyper reads
            // its next request, so the connection is ready at once unless it broke.
            && matches!(
                tokio::time::timeout(READY_WAIT, sender.ready()).await,
                Ok(Ok(()))
            )
        {
            return Ok(sender);
        }
        let target = self.connector.target;
        let tcp = self.connect().await?;
        let (sender, connection) = http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|source| UpstreamError::Handshake { target, source })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(%target, error = %e, "upstream HTTP/1.1 connection ended");
            }
        });
        Ok(sender)
    }

    /// The HTTP/2 connection all of this client connection's streams share.
    async fn http2_sender(&self) -> Result<http2::SendRequest<Body>, UpstreamError> {
        if let Some(sender) = &*self.http2.lock().unwrap_or_else(|p| p.into_inner())
            && !sender.is_closed()
        {
            return Ok(sender.clone());
        }
        let target = self.connector.target;
        let tcp = self.connect().await?;
        let (sender, connection) = http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .map_err(|source| UpstreamError::Handshake { target, source })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(%target, error = %e, "upstream HTTP/2 connection ended");
            }
        });
        *self.http2.lock().unwrap_or_else(|p| p.into_inner()) = Some(sender.clone());
        Ok(sender)
    }
}
