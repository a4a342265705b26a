//! The HBONE client: a pool of HTTP/2-over-mTLS connections to peers, keyed by
//! (source identity, expected destination identities, destination address, source IP),
//! on which each application connection becomes one CONNECT stream.
//!
//! Spreading bulk flows: Istio keeps one connection per key, so every stream of a key is
//! encrypted by the one task (one core) driving that connection. We open another
//! connection for a key when every live connection of that key already carries a BULK
//! stream, up to `max_connections_per_key`. The signal is "bulk streams per connection":
//! a stream becomes bulk once it has moved `bulk_threshold` bytes. It is cheap (one
//! relaxed atomic add per buffer the copy moves, no timers), it ignores chatty streams
//! (many of them still share one connection, so the handshake cost is paid once), and it
//! is what costs CPU: a connection busy with one bulk flow saturates its core's crypto,
//! while a second bulk flow on another connection runs on the other core. New streams
//! pick the connection with the fewest bulk streams, then the fewest active streams.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use h2::client::SendRequest;
use http::{Method, Request, StatusCode, Version};
use tracing::{debug, warn};

use super::headers::ConnectHeaders;
use super::{ClientTls, Error, H2Stream, Mtls, Result, settings};
use crate::identity::Identity;
use crate::proxy::Sockets;

/// Tunables of the pool; `Default` is the HBONE.md behaviour.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Streams opened on one connection at most (then min with the peer's limit).
    pub max_streams_per_connection: usize,
    /// Connections one key may spread its bulk streams over.
    pub max_connections_per_key: usize,
    /// Bytes (either direction) after which a stream counts as bulk.
    pub bulk_threshold: u64,
    /// Deadline for TCP connect plus TLS and HTTP/2 handshakes.
    pub handshake_timeout: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// A connection without streams for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_streams_per_connection: settings::CLIENT_MAX_STREAMS,
            max_connections_per_key: std::thread::available_parallelism()
                .map_or(2, |n| n.get().max(2)),
            bulk_threshold: 1024 * 1024,
            handshake_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(300),
        }
    }
}

/// What makes two application connections share HBONE connections.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub source_identity: Identity,
    /// Identities the server may prove (any one of them), sorted.
    pub destination_identities: Vec<Identity>,
    /// The peer's HBONE address (`<pod ip>:15008`).
    pub destination: SocketAddr,
    pub source_ip: IpAddr,
}

/// A shareable pool handle.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    config: PoolConfig,
    tls: Arc<Mtls>,
    entries: Mutex<HashMap<PoolKey, Entry>>,
    next_id: AtomicU64,
}

type Pending = Shared<BoxFuture<'static, Result<Arc<Conn>, Arc<Error>>>>;

#[derive(Default)]
struct Entry {
    conns: Vec<Arc<Conn>>,
    /// A handshake under way; concurrent requests for the key wait for it.
    pending: Option<Pending>,
}

struct Conn {
    id: u64,
    sender: SendRequest<Bytes>,
    load: Arc<ConnLoad>,
}

#[derive(Default)]
struct ConnLoad {
    active: AtomicUsize,
    bulk: AtomicUsize,
    closed: AtomicBool,
    /// When the last stream ended (for the idle timeout).
    idle_since: Mutex<Option<Instant>>,
}

/// Held by a stream while it lives: counts it on its connection and reports its bytes.
pub struct StreamLoad {
    conn: Arc<ConnLoad>,
    moved: AtomicU64,
    bulk: AtomicBool,
    threshold: u64,
}

impl StreamLoad {
    /// Records `bytes` moved by the stream; marks it bulk past the threshold.
    pub fn record(&self, bytes: u64) {
        let total = self.moved.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if total >= self.threshold && !self.bulk.swap(true, Ordering::Relaxed) {
            self.conn.bulk.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for StreamLoad {
    fn drop(&mut self) {
        if self.bulk.load(Ordering::Relaxed) {
            self.conn.bulk.fetch_sub(1, Ordering::Relaxed);
        }
        if self.conn.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *lock(&self.conn.idle_since) = Some(Instant::now());
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Which connections a new stream may take.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Want {
    /// The least loaded one, unless all carry bulk streams and the key may grow.
    Spread,
    /// The least loaded one (after waiting for a handshake).
    Any,
    /// An existing one only; never start a handshake.
    Existing,
}

/// What `checkout` decided under the lock.
enum Choice {
    Use(Arc<Conn>, StreamLoad),
    Wait(Pending),
    /// `Want::Existing` and no connection has room.
    Declined,
}

impl Pool {
    pub fn new(config: PoolConfig, tls: Arc<Mtls>) -> Self {
        Pool {
            inner: Arc::new(Inner {
                config,
                tls,
                entries: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
            }),
        }
    }

    /// Opens a CONNECT stream to `authority` through a pooled connection for `key`,
    /// creating the connection (with `sockets`) if needed. Returns once the peer
    /// answered 200.
    pub async fn connect(
        &self,
        key: &PoolKey,
        sockets: &Sockets,
        authority: SocketAddr,
        headers: &ConnectHeaders,
    ) -> Result<H2Stream> {
        let mut retried = false;
        loop {
            let (conn, load) = self.checkout(key, sockets).await?;
            match self.open_stream(&conn, key, authority, headers).await {
                Ok((send, response)) => {
                    let response = response.await.map_err(|source| Error::H2 {
                        addr: key.destination,
                        source,
                    })?;
                    if response.status() != StatusCode::OK {
                        return Err(Error::Status {
                            addr: key.destination,
                            authority: authority.to_string(),
                            status: response.status(),
                        });
                    }
                    let recv = response.into_body();
                    return Ok(H2Stream::new(send, recv, key.destination, Some(load)));
                }
                // The connection broke before this stream sent anything: forget it and
                // try once more on a healthy or fresh connection.
                Err(e) if !retried => {
                    debug!(peer = %key.destination, conn = conn.id, error = %e, "HBONE connection unusable, retrying");
                    self.evict(key, conn.id);
                    retried = true;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn open_stream(
        &self,
        conn: &Conn,
        key: &PoolKey,
        authority: SocketAddr,
        headers: &ConnectHeaders,
    ) -> Result<(h2::SendStream<Bytes>, h2::client::ResponseFuture)> {
        let h2err = |source| Error::H2 {
            addr: key.destination,
            source,
        };
        let mut request = Request::builder()
            .method(Method::CONNECT)
            .version(Version::HTTP_2)
            .uri(authority.to_string())
            .body(())
            .map_err(|e| Error::Setup(key.destination, e.to_string()))?;
        headers.write(request.headers_mut());
        let mut sender = conn.sender.clone().ready().await.map_err(h2err)?;
        let (response, send) = sender.send_request(request, false).map_err(h2err)?;
        Ok((send, response))
    }

    /// The number of live connections for `key` (for tests and the admin dump).
    pub fn connections(&self, key: &PoolKey) -> usize {
        lock(&self.inner.entries)
            .get(key)
            .map_or(0, |e| e.conns.len())
    }

    /// The number of live connections over all keys.
    pub fn total_connections(&self) -> usize {
        lock(&self.inner.entries)
            .values()
            .map(|e| e.conns.len())
            .sum()
    }

    async fn checkout(&self, key: &PoolKey, sockets: &Sockets) -> Result<(Arc<Conn>, StreamLoad)> {
        let mut want = Want::Spread;
        loop {
            match self.choose(key, sockets, want) {
                Choice::Use(conn, load) => return Ok((conn, load)),
                Choice::Wait(pending) => {
                    if let Err(reason) = pending.await {
                        // An extra connection (for spreading) failed: the existing
                        // ones still serve. Without any, the failure is the answer.
                        return match self.choose(key, sockets, Want::Existing) {
                            Choice::Use(conn, load) => Ok((conn, load)),
                            Choice::Wait(_) | Choice::Declined => Err(Error::Establish(reason)),
                        };
                    }
                    want = Want::Any;
                }
                Choice::Declined => {
                    return Err(Error::Setup(key.destination, "no connection".to_owned()));
                }
            }
        }
    }

    /// Picks a connection for a new stream, or the handshake to wait for.
    fn choose(&self, key: &PoolKey, sockets: &Sockets, want: Want) -> Choice {
        let config = &self.inner.config;
        let mut entries = lock(&self.inner.entries);
        let entry = entries.entry(key.clone()).or_default();
        entry
            .conns
            .retain(|c| !c.load.closed.load(Ordering::Acquire));
        let best = entry
            .conns
            .iter()
            .filter(|c| {
                let limit = config
                    .max_streams_per_connection
                    .min(c.sender.current_max_send_streams());
                c.load.active.load(Ordering::Acquire) < limit
            })
            .min_by_key(|c| {
                (
                    c.load.bulk.load(Ordering::Relaxed),
                    c.load.active.load(Ordering::Relaxed),
                )
            });
        if let Some(conn) = best {
            let all_bulk = conn.load.bulk.load(Ordering::Relaxed) > 0;
            let may_grow = entry.conns.len() < config.max_connections_per_key;
            if want != Want::Spread || !all_bulk || !may_grow {
                conn.load.active.fetch_add(1, Ordering::AcqRel);
                *lock(&conn.load.idle_since) = None;
                let load = StreamLoad {
                    conn: conn.load.clone(),
                    moved: AtomicU64::new(0),
                    bulk: AtomicBool::new(false),
                    threshold: config.bulk_threshold,
                };
                return Choice::Use(conn.clone(), load);
            }
        }
        if want == Want::Existing {
            if entry.conns.is_empty() && entry.pending.is_none() {
                entries.remove(key);
            }
            return Choice::Declined;
        }
        if let Some(pending) = &entry.pending {
            return Choice::Wait(pending.clone());
        }
        let pending = self.spawn_connect(key.clone(), sockets.clone());
        entry.pending = Some(pending.clone());
        Choice::Wait(pending)
    }

    /// Starts a handshake in its own task (it completes even if every waiter goes away)
    /// and returns the shared outcome.
    fn spawn_connect(&self, key: PoolKey, sockets: Sockets) -> Pending {
        let pool = self.clone();
        let addr = key.destination;
        let task = tokio::spawn(async move {
            let result = pool.establish(&key, &sockets).await;
            let mut entries = lock(&pool.inner.entries);
            let entry = entries.entry(key.clone()).or_default();
            entry.pending = None;
            match result {
                Ok(conn) => {
                    entry.conns.push(conn.clone());
                    Ok(conn)
                }
                Err(e) => {
                    warn!(peer = %key.destination, error = %e, "HBONE connection failed");
                    if entry.conns.is_empty() {
                        entries.remove(&key);
                    }
                    Err(Arc::new(e))
                }
            }
        });
        async move {
            task.await
                .map_err(|e| Arc::new(Error::Setup(addr, e.to_string())))?
        }
        .boxed()
        .shared()
    }

    async fn establish(&self, key: &PoolKey, sockets: &Sockets) -> Result<Arc<Conn>> {
        let config = &self.inner.config;
        let addr = key.destination;
        let handshake = async {
            let tcp = sockets
                .connect(addr, Some(key.source_ip))
                .await
                .map_err(|source| Error::Connect { addr, source })?;
            let io = self.inner.tls.connect(tcp, key).await?;
            h2::client::Builder::new()
                .enable_push(false)
                .initial_window_size(settings::STREAM_WINDOW)
                .initial_connection_window_size(settings::CONNECTION_WINDOW)
                .max_frame_size(settings::MAX_FRAME_SIZE)
                .max_header_list_size(settings::CLIENT_MAX_HEADER_LIST)
                .handshake::<_, Bytes>(io)
                .await
                .map_err(|source| Error::H2 { addr, source })
        };
        let (sender, connection) = tokio::time::timeout(config.handshake_timeout, handshake)
            .await
            .map_err(|_| Error::HandshakeTimeout(addr, config.handshake_timeout))??;
        let conn = Arc::new(Conn {
            id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            sender,
            load: Arc::new(ConnLoad {
                idle_since: Mutex::new(Some(Instant::now())),
                ..ConnLoad::default()
            }),
        });
        debug!(peer = %addr, conn = conn.id, "HBONE connection established");
        tokio::spawn(
            self.clone()
                .drive(key.clone(), conn.id, conn.load.clone(), connection),
        );
        Ok(conn)
    }

    /// Runs one connection until it fails, stops answering PINGs, or sits idle; then
    /// removes it from the pool. Its streams fail with it; other connections go on.
    async fn drive(
        self,
        key: PoolKey,
        id: u64,
        load: Arc<ConnLoad>,
        mut connection: h2::client::Connection<ClientTls, Bytes>,
    ) {
        let config = self.inner.config.clone();
        let ping_pong = connection.ping_pong();
        let keepalive = async move {
            let Some(mut ping_pong) = ping_pong else {
                return std::future::pending().await;
            };
            loop {
                tokio::time::sleep(config.keepalive_interval).await;
                let pong = tokio::time::timeout(
                    config.keepalive_timeout,
                    ping_pong.ping(h2::Ping::opaque()),
                );
                match pong.await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return format!("keepalive failed: {e}"),
                    Err(_) => {
                        return format!("no PING answer within {:?}", config.keepalive_timeout);
                    }
                }
            }
        };
        let idle = self.idle(&key, id, &load);
        let reason = tokio::select! {
            result = &mut connection => match result {
                Ok(()) => "closed by peer".to_owned(),
                Err(e) => e.to_string(),
            },
            reason = keepalive => reason,
            reason = idle => reason,
        };
        debug!(peer = %key.destination, conn = id, %reason, "HBONE connection closed");
        self.evict(&key, id);
        load.closed.store(true, Ordering::Release);
    }

    /// Completes once the connection has been idle for the idle timeout, after taking
    /// it out of the pool (under the pool lock, so no stream can be placed on it).
    async fn idle(&self, key: &PoolKey, id: u64, load: &ConnLoad) -> String {
        let timeout = self.inner.config.idle_timeout;
        loop {
            let since = *lock(&load.idle_since);
            let wait = since.map_or(timeout, |s| timeout.saturating_sub(s.elapsed()));
            if since.is_some() && wait.is_zero() {
                let mut entries = lock(&self.inner.entries);
                if load.active.load(Ordering::Acquire) == 0 {
                    remove(&mut entries, key, id);
                    return format!("idle for {timeout:?}");
                }
            }
            tokio::time::sleep(wait.max(Duration::from_millis(100))).await;
        }
    }

    fn evict(&self, key: &PoolKey, id: u64) {
        remove(&mut lock(&self.inner.entries), key, id);
    }
}

/// Takes connection `id` of `key` out of the pool (no stream is placed on it after
/// this), and the key itself once it has nothing left.
fn remove(entries: &mut HashMap<PoolKey, Entry>, key: &PoolKey, id: u64) {
    if let Some(entry) = entries.get_mut(key) {
        for conn in entry.conns.iter().filter(|c| c.id == id) {
            conn.load.closed.store(true, Ordering::Release);
        }
        entry.conns.retain(|c| c.id != id);
        if entry.conns.is_empty() && entry.pending.is_none() {
            entries.remove(key);
        }
    }
}
