//! Per-request enforcement on HTTP ports: the destination tunnel serves the client's
//! HTTP/1.1 (keep-alive, pipelining, upgrades) or HTTP/2 cleartext (gRPC included)
//! with hyper, decides each request with [`Mesh::authorize_request`] (asked again for
//! every request, so a policy edit applies to the next request of an open connection),
//! and forwards the allowed ones to the application over an upstream connection made
//! from inside the pod's namespace, in the protocol the client spoke.
//!
//! Denied: 403 `RBAC: access denied` (gRPC: 200 with `grpc-status: 7`), the connection
//! stays open. Malformed HTTP/1 (bad request line, header block over the limit or with
//! more than 100 fields, both `Content-Length` and `Transfer-Encoding`, obs-fold, bad
//! chunk sizes, a bad `Content-Length`) gets 400 from hyper (the head checked first by
//! [`framing::Framing`]) or from here, closes the connection and never reaches the
//! application; a client that does not finish its headers within `header_read_timeout`
//! is cut off. Every request is counted (`istio_requests_total`,
//! `istio_request_duration_milliseconds`) and logged.

pub mod framing;
pub mod io;
mod upstream;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::identity::Identity;
use crate::proxy::metrics::{RequestEvent, RequestMeter, RequestProtocol};
use crate::proxy::{Drain, Mesh, Metrics, RefusedReason, Verdict};

pub use upstream::Connector;
use upstream::Upstream;

/// The body of every request and response the tunnel forwards or makes.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// The answer to a denied HTTP request.
pub const DENIED_BODY: &str = "RBAC: access denied";

/// Tunables of the HTTP server; `Default` is production behaviour.
#[derive(Clone, Debug)]
pub struct Config {
    /// A client must send a request's complete header block within this time (HTTP/1).
    pub header_read_timeout: Duration,
    /// Largest request header block (HTTP/1) or header list (HTTP/2).
    pub max_header_bytes: usize,
    /// A chunked HTTP/1 request body is read whole (and its framing checked) before it
    /// is forwarded, up to this size; larger ones get 413.
    pub max_buffered_body: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 60 * 1024,
            max_buffered_body: 1024 * 1024,
        }
    }
}

/// Why an HTTP connection ended before the client closed it cleanly.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("malformed HTTP from {peer}: {reason}")]
    Malformed { peer: SocketAddr, reason: String },
    #[error("{peer} did not send its request headers within {timeout:?}")]
    HeaderTimeout { peer: SocketAddr, timeout: Duration },
    #[error("HTTP connection with {peer}: {reason}")]
    Connection { peer: SocketAddr, reason: String },
}

/// One client connection to an HTTP port: who it comes from, where it goes, and how
/// its requests are decided, forwarded, counted.
pub struct Session {
    pub mesh: Arc<dyn Mesh>,
    pub metrics: Metrics,
    pub requests: RequestMeter,
    pub config: Config,
    /// The client (for plaintext) or the HBONE peer (for HBONE) address.
    pub peer: SocketAddr,
    /// The address the policy sees as the source.
    pub source_ip: IpAddr,
    /// The identity the client proved (HBONE), `None` for plaintext.
    pub source: Option<Identity>,
    pub destination: SocketAddr,
    pub connector: Connector,
    /// Tracks what outlives the HTTP connection: upgraded connections.
    pub drain: Drain,
}

/// Serves HTTP on `io` until the client closes it, it fails, or `stop` fires (then
/// in-flight requests finish and the connection closes gracefully).
pub async fn serve<I>(io: I, session: Session, stop: CancellationToken) -> Result<(), Error>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let config = session.config.clone();
    let peer = session.peer;
    let refusal = Arc::new(OnceLock::new());
    let io = framing::Framing::new(io, config.max_header_bytes, refusal.clone());
    let metrics = session.metrics.clone();
    let upstream = Arc::new(Upstream::new(
        session.connector.clone(),
        session.drain.clone(),
    ));
    let session = Arc::new(session);
    let service = hyper::service::service_fn(move |request| {
        handle(session.clone(), upstream.clone(), request)
    });
    let server = server(&config);
    let connection = server.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = stop.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    let Err(error) = result else {
        return Ok(());
    };
    let Some(hyper_error) = error.downcast_ref::<hyper::Error>() else {
        return Err(Error::Connection {
            peer,
            reason: error.to_string(),
        });
    };
    if hyper_error.is_timeout() {
        metrics.refused(RefusedReason::HeaderTimeout);
        info!(%peer, timeout = ?config.header_read_timeout, "HTTP client too slow to send its headers");
        return Err(Error::HeaderTimeout {
            peer,
            timeout: config.header_read_timeout,
        });
    }
    if hyper_error.is_parse() || hyper_error.is_parse_too_large() {
        metrics.refused(RefusedReason::MalformedHttp);
        let reason = match refusal.get() {
            Some(refused) => refused.to_string(),
            None => hyper_error.to_string(),
        };
        info!(%peer, error = %reason, "malformed HTTP request refused");
        return Err(Error::Malformed { peer, reason });
    }
    Err(Error::Connection {
        peer,
        reason: hyper_error.to_string(),
    })
}

/// The HTTP server every client connection to an HTTP port is served with: HTTP/1.1 or
/// HTTP/2 cleartext, by what the client sends first.
pub(crate) fn server(config: &Config) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        // Above the head limit, which `Framing` enforces with a 400: hyper's own
        // answer at its buffer limit would be 431.
        .max_buf_size(config.max_header_bytes.max(8192) + 8192)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX));
    builder
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// An HTTP/1.1 request asking to switch protocols (WebSocket and others).
fn is_upgrade(version: Version, headers: &HeaderMap) -> bool {
    version == Version::HTTP_11
        && headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// Headers of one hop that a proxy does not forward (RFC 9110 7.6.1), and those named
/// by `Connection`.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<header::HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| token.trim().parse().ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
    ] {
        // gRPC needs `te: trailers` end to end.
        if name == header::TE && headers.get(&name).is_some_and(|v| v == "trailers") {
            continue;
        }
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

/// What the access log and the metrics say about one request, written when its
/// response body ends or is dropped.
struct Outcome {
    session: Arc<Session>,
    method: String,
    authority: String,
    path: String,
    protocol: RequestProtocol,
    status: u16,
    grpc_status: Option<String>,
    flags: &'static str,
    start: Instant,
    policy: Option<String>,
    denial: Option<String>,
}

impl Drop for Outcome {
    fn drop(&mut self) {
        self.session.requests.request(RequestEvent {
            method: &self.method,
            authority: &self.authority,
            path: &self.path,
            protocol: self.protocol,
            status: self.status,
            grpc_status: self.grpc_status.as_deref(),
            flags: self.flags,
            start: self.start,
            policy: self.policy.as_deref(),
            denial: self.denial.as_deref(),
        });
    }
}

/// A response body that records its request's [`Outcome`] once it ends (the gRPC
/// status taken from its trailers) or the client goes away.
struct Observed {
    inner: Body,
    outcome: Option<Outcome>,
}

impl hyper::body::Body for Observed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(trailers), Some(outcome)) = (frame.trailers_ref(), &mut self.outcome)
                    && let Some(status) = trailers.get("grpc-status").and_then(|v| v.to_str().ok())
                {
                    outcome.grpc_status = Some(status.to_owned());
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(outcome) = &mut self.outcome {
                    outcome.flags = "UC";
                }
                self.outcome.take();
            }
            Poll::Ready(None) => {
                self.outcome.take();
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// `response` to a request, recorded as `outcome`. After an HTTP/1 request that could
/// have switched protocols (`may_switch`) and did not, the connection closes: its
/// framing is no longer followed (see [`framing`]).
fn respond(outcome: Outcome, mut response: Response<Body>, may_switch: bool) -> Response<Observed> {
    let mut outcome = outcome;
    let switched = response.status() == StatusCode::SWITCHING_PROTOCOLS
        || (outcome.method == "CONNECT" && response.status().is_success());
    if may_switch && !switched {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    outcome.status = response.status().as_u16();
    if let Some(status) = response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
    {
        outcome.grpc_status = Some(status.to_owned());
    }
    response.map(|inner| Observed {
        inner,
        outcome: Some(outcome),
    })
}

/// The answer to a request the tunnel itself refuses.
fn refusal(
    grpc: bool,
    status: StatusCode,
    grpc_status: u8,
    message: &'static str,
) -> Response<Body> {
    if grpc {
        // A trailers-only gRPC response: HTTP 200, the status in the headers.
        let mut response = Response::new(full(Bytes::new()));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert("grpc-status", HeaderValue::from(u16::from(grpc_status)));
        headers.insert("grpc-message", HeaderValue::from_static(message));
        return response;
    }
    let mut response = Response::new(full(message));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    *response.status_mut() = status;
    response
}

async fn handle(
    session: Arc<Session>,
    upstream: Arc<Upstream>,
    request: Request<Incoming>,
) -> Result<Response<Observed>, Infallible> {
    let start = Instant::now();
    let grpc = is_grpc(request.headers());
    let authority = request
        .uri()
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            request
                .headers()
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let mut outcome = Outcome {
        session: session.clone(),
        method: request.method().to_string(),
        authority,
        path: request
            .uri()
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |p| p.to_string()),
        protocol: if grpc {
            RequestProtocol::Grpc
        } else {
            RequestProtocol::Http
        },
        status: 0,
        grpc_status: None,
        flags: "-",
        start,
        policy: None,
        denial: None,
    };
    let (mut parts, body) = request.into_parts();
    let may_switch = parts.version == Version::HTTP_11
        && (parts.headers.contains_key(header::UPGRADE) || parts.method == http::Method::CONNECT);
    match session.mesh.authorize_request(
        session.source_ip,
        session.source.as_ref(),
        session.destination,
        &parts,
    ) {
        Verdict::Allow { policy } => outcome.policy = policy,
        Verdict::Deny { policy, reason } => {
            session.metrics.refused(RefusedReason::RequestDenied);
            info!(
                peer = %session.peer,
                destination = %session.destination,
                method = %outcome.method,
                path = %outcome.path,
                policy = policy.as_deref().unwrap_or("default policy"),
                %reason,
                "HTTP request denied"
            );
            outcome.policy = policy;
            outcome.denial = Some(reason);
            let response = refusal(grpc, StatusCode::FORBIDDEN, 7, DENIED_BODY);
            return Ok(respond(outcome, response, may_switch));
        }
    }
    let upgrade = is_upgrade(parts.version, &parts.headers);
    let chunked =
        parts.version <= Version::HTTP_11 && parts.headers.contains_key(header::TRANSFER_ENCODING);
    let body = if chunked {
        // Read whole so that bad chunk framing is refused before anything of the
        // request reaches the application.
        match Limited::new(body, session.config.max_buffered_body)
            .collect()
            .await
        {
            Ok(collected) => full(collected.to_bytes()),
            Err(e) => {
                let too_large = e.is::<http_body_util::LengthLimitError>();
                let (status, message) = if too_large {
                    (StatusCode::PAYLOAD_TOO_LARGE, "request body too large")
                } else {
                    session.metrics.refused(RefusedReason::MalformedHttp);
                    (StatusCode::BAD_REQUEST, "malformed request body")
                };
                info!(peer = %session.peer, error = %e, %status, "HTTP request body refused");
                outcome.flags = "DPE";
                let mut response = refusal(grpc, status, 3, message);
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                return Ok(respond(outcome, response, may_switch));
            }
        }
    } else {
        body.boxed()
    };
    let on_upgrade = parts.extensions.remove::<hyper::upgrade::OnUpgrade>();
    if !upgrade {
        strip_hop_by_hop(&mut parts.headers);
    }
    let forwarded = Request::from_parts(parts, body);
    let result = match (upgrade, on_upgrade) {
        (true, Some(on_upgrade)) => upstream.upgrade(forwarded, on_upgrade).await,
        _ => upstream.send(forwarded).await,
    };
    match result {
        Ok(mut response) => {
            if response.status() != StatusCode::SWITCHING_PROTOCOLS {
                strip_hop_by_hop(response.headers_mut());
            }
            Ok(respond(outcome, response.map(BodyExt::boxed), may_switch))
        }
        Err(e) => {
            debug!(peer = %session.peer, destination = %session.destination, error = %e, "HTTP request not forwarded");
            outcome.flags = if e.is_connect() { "UF" } else { "UC" };
            let response = refusal(
                grpc,
                StatusCode::SERVICE_UNAVAILABLE,
                14,
                "upstream unavailable",
            );
            Ok(respond(outcome, response, may_switch))
        }
    }
}
