//! The HBONE server: HTTP/2 on an accepted, secured connection; every CONNECT request
//! becomes an `Incoming` that the proxy answers.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::headers::{self, ConnectHeaders};
use super::{Error, H2Stream, Result, settings};

/// Tunables of the server side.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// A client must complete the HTTP/2 handshake and send its first CONNECT request
    /// within this time after the TLS handshake, or the connection is closed.
    pub request_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// A request waiting for its answer.
pub struct Incoming {
    /// The `:authority` of the request (where the client wants to go), or why the
    /// request is not a CONNECT to an `ip:port` (to be answered 400).
    pub authority: Result<SocketAddr, RequestError>,
    pub headers: ConnectHeaders,
    /// The HBONE peer (client) address.
    pub peer: SocketAddr,
    respond: SendResponse<Bytes>,
    recv: RecvStream,
    /// The `baggage` of the 200 answer (the destination's metadata).
    baggage: Option<HeaderValue>,
}

impl Incoming {
    /// Answers with an error status and ends the stream.
    pub fn reject(mut self, status: StatusCode) {
        let mut response = Response::new(());
        *response.status_mut() = status;
        if let Err(e) = self.respond.send_response(response, true) {
            debug!(peer = %self.peer, %status, error = %e, "could not send HBONE answer");
        }
    }

    /// The 200 answer will carry `baggage` naming the destination workload, as
    /// Istio's server answers.
    pub fn with_baggage(mut self, workload: &str, namespace: &str) -> Self {
        self.baggage = HeaderValue::try_from(headers::baggage(workload, namespace)).ok();
        self
    }

    /// Completes when the peer resets the stream before it is answered, with the
    /// reason it gave.
    pub async fn reset(&mut self) -> Result<h2::Reason, h2::Error> {
        std::future::poll_fn(|cx| self.respond.poll_reset(cx)).await
    }

    /// Answers 200 and returns the stream to copy bytes over.
    pub fn accept(mut self) -> Result<H2Stream> {
        let mut response = Response::new(());
        if let Some(baggage) = self.baggage.take() {
            response.headers_mut().insert(headers::BAGGAGE, baggage);
        }
        let send = self
            .respond
            .send_response(response, false)
            .map_err(|e| Error::Stream(self.peer, e))?;
        Ok(H2Stream::new(send, self.recv, self.peer, None))
    }
}

/// Why a request is not a valid CONNECT (answered 400).
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("method {0} is not CONNECT")]
    Method(Method),
    #[error("authority {0:?} is not an ip:port")]
    Authority(String),
}

fn parse(request: &Request<RecvStream>) -> Result<SocketAddr, RequestError> {
    parse_connect(request.method(), request.uri())
}

/// The destination of a CONNECT request: the method must be CONNECT and the authority
/// an `ip:port`.
pub(crate) fn parse_connect(method: &Method, uri: &Uri) -> Result<SocketAddr, RequestError> {
    if method != Method::CONNECT {
        return Err(RequestError::Method(method.clone()));
    }
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
    authority
        .parse()
        .map_err(|_| RequestError::Authority(authority.to_owned()))
}

/// Serves HTTP/2 over `io` (already secured) from HBONE client `peer` until the client
/// goes away or, after `shutdown` fires, its open streams finish (GOAWAY is sent).
/// Each request is handed to `handler` in a task of its own; when the connection ends
/// (however the client ends it) those tasks are awaited, not aborted, so each one
/// closes what it opened.
pub async fn serve_connection<I, F, Fut>(
    io: I,
    peer: SocketAddr,
    config: &ServerConfig,
    shutdown: CancellationToken,
    handler: F,
) -> Result<()>
where
    I: AsyncRead + AsyncWrite + Unpin,
    F: Fn(Incoming) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let h2err = |source| Error::H2 { addr: peer, source };
    let timeout = config.request_timeout;
    let mut connection = tokio::time::timeout(
        timeout,
        h2::server::Builder::new()
            .initial_window_size(settings::STREAM_WINDOW)
            .initial_connection_window_size(settings::CONNECTION_WINDOW)
            .max_frame_size(settings::MAX_FRAME_SIZE)
            .max_header_list_size(settings::SERVER_MAX_HEADER_LIST)
            .max_concurrent_streams(settings::SERVER_MAX_CONCURRENT_STREAMS)
            .handshake::<_, Bytes>(io),
    )
    .await
    .map_err(|_| Error::RequestTimeout(timeout))?
    .map_err(h2err)?;
    let first = tokio::time::sleep(timeout);
    tokio::pin!(first);
    let mut got_request = false;
    let mut draining = false;
    let mut streams = JoinSet::new();
    let ended = loop {
        tokio::select! {
            next = connection.accept() => match next {
                Some(Ok((request, respond))) => {
                    got_request = true;
                    let incoming = Incoming {
                        authority: parse(&request),
                        headers: ConnectHeaders::read(request.headers()),
                        peer,
                        respond,
                        recv: request.into_body(),
                        baggage: None,
                    };
                    streams.spawn(handler(incoming));
                }
                Some(Err(e)) => break Err(h2err(e)),
                None => break Ok(()),
            },
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
            () = &mut first, if !got_request => break Err(Error::RequestTimeout(timeout)),
            () = shutdown.cancelled(), if !draining => {
                draining = true;
                connection.graceful_shutdown();
            }
        }
    };
    // The connection is gone: its streams fail at their next read or write. Each
    // handler still finishes (answers, logs, counts) rather than being aborted.
    drop(connection);
    while streams.join_next().await.is_some() {}
    ended
}
