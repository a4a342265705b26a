//! Outbound: a connection of a local workload to its original destination, carried
//! over HBONE when the destination is meshed, passed through as plain TCP when not.

use std::io;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tracing::info;

use super::copy::{self, close_gracefully, reset_on_close};
use super::metrics::{ConnectionRecord, Endpoints, RefusedReason, Reporter, SecurityPolicy};
use super::{Error, LocalWorkload, Proxy, Route};
use crate::hbone::{ConnectHeaders, H2Stream, PoolKey};

/// The far side of an outbound connection, once reached.
pub(super) enum Upstream {
    Hbone(H2Stream),
    Tcp(TcpStream),
}

/// An outbound connection whose upstream is being reached or was reached.
pub(super) struct Outbound<'p> {
    record: ConnectionRecord<'p>,
    upstream: Result<Upstream, Error>,
}

impl Proxy {
    /// Serves an outbound capture listener of `source` until the drain starts.
    /// `original_destination` recovers where each accepted connection was going
    /// (from the redirect maps).
    pub async fn serve_outbound<F>(
        &self,
        listener: TcpListener,
        source: LocalWorkload,
        original_destination: F,
    ) where
        F: Fn(&TcpStream, SocketAddr) -> io::Result<SocketAddr> + Send + Sync + 'static,
    {
        let lookup = std::sync::Arc::new(original_destination);
        self.accept_loop(listener, move |proxy, tcp, client| {
            let source = source.clone();
            let destination = lookup(&tcp, client);
            async move {
                match destination {
                    Ok(destination) => proxy.outbound(tcp, client, source, destination).await,
                    Err(e) => {
                        proxy.inner.metrics.refused(RefusedReason::Route);
                        info!(%client, error = %e, "outbound connection without original destination");
                        reset_on_close(&tcp);
                    }
                }
            }
        })
        .await;
    }

    /// Proxies one outbound connection from `client` (an application socket of
    /// `source`) to its original `destination`, then logs it.
    pub async fn outbound(
        &self,
        tcp: TcpStream,
        client: SocketAddr,
        source: LocalWorkload,
        destination: SocketAddr,
    ) {
        let outbound = self.reach(client, &source, destination).await;
        outbound.run(&tcp).await;
    }

    /// Routes and reaches the upstream of an outbound connection.
    pub(super) async fn reach(
        &self,
        client: SocketAddr,
        source: &LocalWorkload,
        destination: SocketAddr,
    ) -> Outbound<'_> {
        let inner = &self.inner;
        let mut endpoints = Endpoints {
            source: client,
            source_identity: Some(source.identity.clone()),
            source_workload: Some((source.name.clone(), source.namespace.clone())),
            source_workload_ip: Some(source.ip),
            destination,
            destination_identity: None,
            destination_workload: None,
            destination_workload_ip: None,
            traceparent: None,
        };
        let open = |security, endpoints| {
            ConnectionRecord::open(&inner.metrics, Reporter::Source, security, endpoints)
        };
        let sockets = inner.sockets.within(source.netns.as_ref());
        match inner.mesh.route(source, destination) {
            Route::Hbone {
                endpoint,
                target,
                mut identities,
                workload,
            } => {
                identities.sort();
                endpoints.destination = target;
                endpoints.destination_identity = identities.first().cloned();
                endpoints.destination_workload_ip = workload.as_ref().map(|_| target.ip());
                endpoints.destination_workload = workload;
                let headers = ConnectHeaders::outbound(client, &source.name, &source.namespace);
                endpoints.traceparent = headers.traceparent.clone();
                let record = open(SecurityPolicy::MutualTls, endpoints);
                let key = PoolKey {
                    source_identity: source.identity.clone(),
                    destination_identities: identities,
                    destination: endpoint,
                    source_ip: source.ip,
                };
                let upstream = inner
                    .pool
                    .connect(&key, &sockets, target, &headers)
                    .await
                    .map(Upstream::Hbone)
                    .map_err(Error::from);
                Outbound { record, upstream }
            }
            Route::Passthrough(addr) => {
                endpoints.destination = addr;
                let record = open(SecurityPolicy::None, endpoints);
                let upstream = sockets
                    .connect(addr, None)
                    .await
                    .map(Upstream::Tcp)
                    .map_err(|source| Error::Upstream { addr, source });
                Outbound { record, upstream }
            }
            Route::Refuse(reason) => {
                inner.metrics.refused(RefusedReason::Route);
                let record = open(SecurityPolicy::None, endpoints);
                Outbound {
                    record,
                    upstream: Err(Error::Refused {
                        destination,
                        reason,
                    }),
                }
            }
        }
    }
}

impl Outbound<'_> {
    pub(super) fn reached(&self) -> Result<(), &Error> {
        self.upstream.as_ref().map(|_| ())
    }

    /// Copies between the application and the upstream, then closes and logs. Any
    /// early end (an error, a forced drain) resets both connections.
    pub(super) async fn run(self, tcp: &TcpStream) {
        let Outbound { record, upstream } = self;
        reset_on_close(tcp);
        let result = match upstream {
            Ok(Upstream::Hbone(stream)) => {
                copy::tcp_h2(tcp, stream, &record.received, &record.sent).await
            }
            Ok(Upstream::Tcp(upstream)) => {
                reset_on_close(&upstream);
                let result = copy::tcp_tcp(tcp, &upstream, &record.received, &record.sent).await;
                if result.is_ok() {
                    close_gracefully(&upstream);
                }
                result
            }
            Err(e) => return record.close(Err(e.to_string())),
        };
        if result.is_ok() {
            close_gracefully(tcp);
        }
        record.close(result.map_err(|e| e.to_string()));
    }
}
