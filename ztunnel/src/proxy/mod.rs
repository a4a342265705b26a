//! The data plane: outbound (an enrolled pod's connection carried over HBONE or passed
//! through), inbound HBONE (:15008), inbound plaintext (:15006), the SOCKS5 capture
//! path, the byte copy, limits, drain, access log and Istio metrics.
//!
//! The proxy learns about workloads and policies only through the narrow [`Mesh`]
//! trait, and secures connections only through the `hbone` handshake seams.

pub mod copy;
mod inbound;
mod inbound_http;
mod inbound_plaintext;
pub mod metrics;
mod outbound;
mod pacing;
mod socket;
pub(crate) mod socks5;
mod telemetry;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::hbone::{self, Mtls, Pool, PoolConfig, ServerConfig};
use crate::identity::Identity;
use crate::netns::Netns;

pub use copy::CopyError;
pub use metrics::{Metrics, RefusedReason};
pub use pacing::{RESET_BURST, RESET_REFILL_PER_SECOND, ResetBudgetConfig};
pub use socket::Sockets;

/// Ports of the tunnel itself: a CONNECT to one of them would loop (answered 503).
pub const TUNNEL_PORTS: [u16; 3] = [15001, 15006, 15008];

/// A workload on this node, as the proxy needs to know it.
#[derive(Clone, Debug)]
pub struct LocalWorkload {
    pub name: String,
    pub namespace: String,
    pub identity: Identity,
    /// The address the tunnel's connections for this workload leave from.
    pub ip: IpAddr,
    /// The workload's network namespace, where the tunnel makes its sockets for it;
    /// `None`: the tunnel's own (SOCKS5 clients on this host).
    pub netns: Option<Netns>,
}

/// A workload of the mesh (on any node) as the state knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KnownWorkload {
    pub name: String,
    pub namespace: String,
    pub identity: Identity,
}

/// Where an outbound connection goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Over HBONE: a CONNECT to `target` through the peer at `endpoint` (`ip:15008`),
    /// whose certificate must carry one of `identities`.
    Hbone {
        endpoint: SocketAddr,
        target: SocketAddr,
        identities: Vec<Identity>,
        /// Destination workload (name, namespace), for metrics.
        workload: Option<(String, String)>,
    },
    /// Plain TCP to this address (the destination is not meshed).
    Passthrough(SocketAddr),
    /// No way there: the application's connection is reset.
    Refuse(String),
}

/// The authorization decision for one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow {
        policy: Option<String>,
    },
    Deny {
        policy: Option<String>,
        reason: String,
    },
}

/// What the proxy asks of the mesh state and the policy engine. Kept narrow so the
/// proxy is tested with a small in-test implementation.
pub trait Mesh: Send + Sync + 'static {
    /// This node's workload owning `ip`, if any.
    fn local_workload(&self, ip: IpAddr) -> Option<LocalWorkload>;
    /// The workload, on any node, that owns `ip`: the source an HBONE peer at `ip`
    /// is, when it proves the same identity (telemetry trusts this over `baggage`).
    fn workload_at(&self, ip: IpAddr) -> Option<KnownWorkload>;
    /// Where an outbound connection from `source` to `destination` goes.
    fn route(&self, source: &LocalWorkload, destination: SocketAddr) -> Route;
    /// Whether inbound plaintext to `destination` is accepted (PERMISSIVE/DISABLE)
    /// rather than refused (STRICT).
    fn accepts_plaintext(&self, destination: SocketAddr) -> bool;
    /// Whether a connection from `source_ip` (proving `source`, if any) may reach
    /// `destination`. Where [`Mesh::http_enforced`] holds, only what no request can
    /// change is decided here (STRICT, CUSTOM, DENY rules without HTTP fields); each
    /// request is then decided with [`Mesh::authorize_request`].
    fn authorize(
        &self,
        source_ip: IpAddr,
        source: Option<&Identity>,
        destination: SocketAddr,
    ) -> Verdict;
    /// The same decision for a connection already open, asked again after a policy
    /// change: AUDIT and dry-run matches were logged when it opened and are not again.
    fn reauthorize(
        &self,
        source_ip: IpAddr,
        source: Option<&Identity>,
        destination: SocketAddr,
    ) -> Verdict {
        self.authorize(source_ip, source, destination)
    }
    /// Whether requests to `destination` are decided one by one (the port speaks HTTP
    /// and a policy selecting the workload has HTTP fields, and the tunnel enforces L7).
    /// Asked again for every new connection: a policy change applies at once.
    fn http_enforced(&self, destination: SocketAddr) -> bool;
    /// The decision for one HTTP request from `source_ip` (proving `source`, if any) to
    /// `destination`, against the whole policy set of the current snapshot. A denial's
    /// reason names the rule and the field that failed; a path that cannot be
    /// normalized is denied with a reason naming the path.
    fn authorize_request(
        &self,
        source_ip: IpAddr,
        source: Option<&Identity>,
        destination: SocketAddr,
        request: &http::request::Parts,
    ) -> Verdict;
    /// Changes whenever policies change: open inbound connections are authorized
    /// again and those now denied are closed.
    fn updates(&self) -> tokio::sync::watch::Receiver<u64>;
}

/// Default of `Config::max_metric_series`: far above what a node's workloads and their
/// peers make, low enough that `/metrics` stays a few megabytes.
pub const DEFAULT_MAX_METRIC_SERIES: usize = 10_000;

/// Tunables of the proxy; `Default` is production behaviour.
#[derive(Clone, Debug)]
pub struct Config {
    /// `SO_MARK` of every socket the proxy opens.
    pub mark: Option<u32>,
    pub pool: PoolConfig,
    pub server: ServerConfig,
    /// Concurrent inbound connections (HBONE and plaintext together); more are closed
    /// at once and counted.
    pub max_inbound_connections: usize,
    /// Deadline of the SOCKS5 greeting and request.
    pub socks5_timeout: Duration,
    /// Users, besides the tunnel's own, whose processes may use the SOCKS5 listener.
    pub socks5_allowed_uids: Vec<u32>,
    /// Streams the peer of an inbound HBONE connection may reset before that
    /// connection's upstream connects are paced, and the pace.
    pub reset_budget: ResetBudgetConfig,
    /// Series of each `istio_tcp_*` family at most, and of `istio_requests_total` (and
    /// the duration histogram); connections and requests beyond it are counted in an
    /// overflow series and in `ztunnel_metric_series_dropped_total`.
    pub max_metric_series: usize,
    /// Peer identities whose `forwarded` header is logged as the source address even
    /// when it is not the peer's own address (gateways, waypoints).
    pub trusted_proxies: Vec<Identity>,
    /// The HTTP server of destinations enforced per request.
    pub http: crate::http::Config,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mark: None,
            pool: PoolConfig::default(),
            server: ServerConfig::default(),
            max_inbound_connections: 16 * 1024,
            socks5_timeout: Duration::from_secs(10),
            socks5_allowed_uids: Vec::new(),
            reset_budget: ResetBudgetConfig::default(),
            max_metric_series: DEFAULT_MAX_METRIC_SERIES,
            trusted_proxies: Vec::new(),
            http: crate::http::Config::default(),
        }
    }
}

/// Why a proxied connection failed; each variant names the value at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Hbone(#[from] hbone::Error),
    #[error(transparent)]
    Copy(#[from] CopyError),
    #[error("route to {destination} refused: {reason}")]
    Refused {
        destination: SocketAddr,
        reason: String,
    },
    #[error("denied by {}: {reason}", policy.as_deref().unwrap_or("default policy"))]
    Denied {
        policy: Option<String>,
        reason: String,
    },
    #[error("connecting to {addr}: {source}")]
    Upstream { addr: SocketAddr, source: io::Error },
    #[error("plaintext to {0} refused: mTLS mode is STRICT")]
    Strict(SocketAddr),
    #[error("no workload on this node owns {0}")]
    NoWorkload(IpAddr),
    #[error("bad HBONE request: {0}")]
    BadRequest(hbone::RequestError),
    #[error("authority {authority} does not match local address {local}")]
    IpMismatch {
        authority: SocketAddr,
        local: IpAddr,
    },
    #[error("target {0} is a port of the tunnel itself")]
    Recursive(SocketAddr),
    #[error("SOCKS5: {0}")]
    Socks(String),
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    #[error("closed by the drain after the grace period")]
    Drained,
}

/// Stops the proxy gracefully: no new connections, open ones get a grace period.
#[derive(Clone)]
pub struct Drain {
    /// Fired first: listeners stop accepting, HBONE servers send GOAWAY.
    stop: CancellationToken,
    /// Fired after the grace period: connections still open are closed.
    force: CancellationToken,
    tracker: TaskTracker,
}

impl Drain {
    fn new() -> Self {
        Drain {
            stop: CancellationToken::new(),
            force: CancellationToken::new(),
            tracker: TaskTracker::new(),
        }
    }

    /// Stops accepting, waits up to `grace` for open connections to finish, then
    /// closes the rest. Returns once every connection task has ended.
    pub async fn drain(&self, grace: Duration) {
        self.stop.cancel();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            self.force.cancel();
            self.tracker.wait().await;
        }
    }

    /// Runs `task` as a connection: the drain waits for it and ends it once the grace
    /// period has passed.
    pub(crate) fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let force = self.force.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                () = task => {}
                () = force.cancelled() => {}
            }
        });
    }

    /// Connection tasks open now.
    pub fn open_connections(&self) -> usize {
        self.tracker.len()
    }
}

/// The proxy: cheap to clone, shared by every listener.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    mesh: Arc<dyn Mesh>,
    pool: Pool,
    tls: Arc<Mtls>,
    sockets: Sockets,
    metrics: Metrics,
    inbound_slots: Arc<Semaphore>,
    drain: Drain,
}

impl Proxy {
    /// Builds the proxy; its metrics are registered into `registry`.
    pub fn new(
        config: Config,
        mesh: Arc<dyn Mesh>,
        tls: Arc<Mtls>,
        registry: &mut Registry,
    ) -> Self {
        Proxy {
            inner: Arc::new(Inner {
                pool: Pool::new(config.pool.clone(), tls.clone()),
                sockets: Sockets::new(config.mark),
                inbound_slots: Arc::new(Semaphore::new(config.max_inbound_connections)),
                metrics: Metrics::new(registry, mesh.clone(), config.max_metric_series),
                drain: Drain::new(),
                config,
                mesh,
                tls,
            }),
        }
    }

    /// The handle that drains every listener and connection of this proxy.
    pub fn drain_handle(&self) -> Drain {
        self.inner.drain.clone()
    }

    /// The HBONE connection pool (connection counts for tests and the admin dump).
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The socket maker (with the configured mark) for listeners of this proxy.
    pub fn sockets(&self) -> &Sockets {
        &self.inner.sockets
    }

    /// Runs `task` as a connection: tracked by the drain, closed when the grace period
    /// after a drain has passed.
    fn spawn_connection<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.inner.drain.spawn(task);
    }

    /// Accepts from `listener` until the drain starts, handing each connection to
    /// `handle` in a tracked task.
    async fn accept_loop<F, Fut>(&self, listener: tokio::net::TcpListener, handle: F)
    where
        F: Fn(Proxy, tokio::net::TcpStream, SocketAddr) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let stop = self.inner.drain.stop.clone();
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = stop.cancelled() => return,
            };
            match accepted {
                Ok((tcp, peer)) => {
                    // Fails only on a dead socket; its first read will say so.
                    let _ = tcp.set_nodelay(true);
                    self.spawn_connection(handle(self.clone(), tcp, peer));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    // Out of descriptors or similar: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}
