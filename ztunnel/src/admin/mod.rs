//! The tunnel's HTTP endpoints for operators:
//! - admin (default 127.0.0.1:15000): `GET /config_dump`, `GET /logging`,
//!   `POST /logging?level=<filter>`;
//! - readiness (default :15021): `GET /healthz/ready`;
//! - metrics (default :15020): `GET /metrics`, the one Prometheus registry every part
//!   registered into at start.

mod logging;
mod readiness;
mod status;

#[cfg(test)]
mod tests;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info, warn};

use crate::config::Settings;
use crate::state::State;

pub use logging::{Error as LogError, LogControl, LogFormat};
pub use readiness::{Condition, Readiness};
pub use status::register as register_status;

/// Produces the `certificates` section of `/config_dump` (identity, serial, expiry of
/// each certificate held).
pub type CertificateDump = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen for the {server} server on {address}: {source}")]
    Bind {
        server: &'static str,
        address: SocketAddr,
        source: std::io::Error,
    },
}

/// Where the three servers listen.
#[derive(Clone, Copy, Debug)]
pub struct Addresses {
    pub admin: SocketAddr,
    pub readiness: SocketAddr,
    pub metrics: SocketAddr,
}

impl From<&Settings> for Addresses {
    fn from(s: &Settings) -> Self {
        Addresses {
            admin: s.admin_address,
            readiness: s.readiness_address,
            metrics: s.metrics_address,
        }
    }
}

/// What the servers show and control.
#[derive(Clone)]
pub struct Admin {
    pub state: State,
    /// Encoded by `/metrics`; every part has registered its metrics before this.
    pub registry: Arc<Registry>,
    pub log: LogControl,
    pub certificates: CertificateDump,
    pub readiness: Readiness,
}

/// The running servers and their bound addresses. Dropping it stops them.
pub struct Servers {
    pub admin: SocketAddr,
    pub readiness: SocketAddr,
    pub metrics: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Server {
    Admin,
    Readiness,
    Metrics,
}

impl Server {
    fn name(self) -> &'static str {
        match self {
            Server::Admin => "admin",
            Server::Readiness => "readiness",
            Server::Metrics => "metrics",
        }
    }
}

/// Binds the three servers and serves them in the background.
pub async fn serve(addresses: Addresses, admin: Admin) -> Result<Servers, Error> {
    let admin = Arc::new(admin);
    let mut tasks = Vec::new();
    let mut bound = Vec::new();
    for (server, address) in [
        (Server::Admin, addresses.admin),
        (Server::Readiness, addresses.readiness),
        (Server::Metrics, addresses.metrics),
    ] {
        let bind_error = |source| Error::Bind {
            server: server.name(),
            address,
            source,
        };
        let listener = TcpListener::bind(address).await.map_err(bind_error)?;
        let local = listener.local_addr().map_err(bind_error)?;
        info!(server = server.name(), address = %local, "listening");
        if server == Server::Admin && !local.ip().is_loopback() {
            warn!(
                address = %local,
                "the admin server is not on loopback: anyone who reaches {local} can read \
                 /config_dump (workloads, policies, certificates); POST /logging is still \
                 refused unless it comes from loopback"
            );
        }
        bound.push(local);
        tasks.push(tokio::spawn(accept(listener, server, admin.clone())));
    }
    Ok(Servers {
        admin: bound[0],
        readiness: bound[1],
        metrics: bound[2],
        tasks,
    })
}

async fn accept(listener: TcpListener, server: Server, admin: Arc<Admin>) {
    // Connections live in the set, so stopping the server stops them too.
    let mut connections = JoinSet::new();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(server = server.name(), error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        let admin = admin.clone();
        connections.spawn(async move {
            let service = service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(handle(&admin, server, peer, &req)) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(server = server.name(), %peer, error = %e, "connection ended with an error");
            }
        });
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    reply(status, "text/plain; charset=utf-8", body.into())
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

fn handle(
    admin: &Admin,
    server: Server,
    peer: SocketAddr,
    req: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let method = req.method();
    match (server, path) {
        (Server::Admin, "/config_dump") if method == Method::GET => config_dump(admin),
        (Server::Admin, "/logging") if method == Method::GET => match admin.log.current() {
            Ok(f) => text(StatusCode::OK, format!("{f}\n")),
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        },
        (Server::Admin, "/logging") if method == Method::POST && !from_loopback(peer) => {
            warn!(%peer, "POST /logging refused: not from loopback");
            text(
                StatusCode::FORBIDDEN,
                format!("POST /logging is accepted from loopback only, not from {peer}\n"),
            )
        }
        (Server::Admin, "/logging") if method == Method::POST => set_log_level(admin, req),
        (Server::Readiness, "/healthz/ready") if method == Method::GET => ready(admin),
        (Server::Metrics, "/metrics") if method == Method::GET => metrics(admin),
        (Server::Admin, "/config_dump" | "/logging")
        | (Server::Readiness, "/healthz/ready")
        | (Server::Metrics, "/metrics") => text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed on {path}\n"),
        ),
        _ => {
            let known = match server {
                Server::Admin => "GET /config_dump, GET /logging, POST /logging?level=<filter>",
                Server::Readiness => "GET /healthz/ready",
                Server::Metrics => "GET /metrics",
            };
            text(
                StatusCode::NOT_FOUND,
                format!("no such endpoint {path}; this server has: {known}\n"),
            )
        }
    }
}

/// Whether `peer` is on this host's loopback (an IPv4-mapped IPv6 loopback counts).
fn from_loopback(peer: SocketAddr) -> bool {
    match peer.ip() {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(v6.is_loopback(), |v4| v4.is_loopback()),
        ip => ip.is_loopback(),
    }
}

fn config_dump(admin: &Admin) -> Response<Full<Bytes>> {
    let mut dump = admin.state.load().dump();
    if let Some(obj) = dump.as_object_mut() {
        obj.insert("certificates".to_string(), (admin.certificates)());
    }
    match serde_json::to_string_pretty(&dump) {
        Ok(body) => reply(StatusCode::OK, "application/json", body + "\n"),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

fn set_log_level(admin: &Admin, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let query = req.uri().query().unwrap_or_default();
    let Some(level) = form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "level")
        .map(|(_, v)| v.into_owned())
    else {
        return text(
            StatusCode::BAD_REQUEST,
            "missing ?level=<filter>, e.g. ?level=debug or ?level=info,ztunnel::policy=debug\n",
        );
    };
    match admin.log.set(&level) {
        Ok(()) => {
            info!(filter = %level, "log filter changed");
            text(StatusCode::OK, format!("log filter set to {level}\n"))
        }
        Err(e @ LogError::BadFilter { .. }) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

fn ready(admin: &Admin) -> Response<Full<Bytes>> {
    let waiting = status::waiting(&admin.state, &admin.readiness);
    if waiting.is_empty() {
        text(StatusCode::OK, "ready\n")
    } else {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: waiting for {}\n", waiting.join(", ")),
        )
    }
}

fn metrics(admin: &Admin) -> Response<Full<Bytes>> {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &admin.registry) {
        Ok(()) => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            body,
        ),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}
