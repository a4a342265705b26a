//! Inbound HBONE (:15008): TLS with the destination workload's certificate, HTTP/2,
//! and for each CONNECT the checks of the HBONE answer table, authorization, the
//! connect to the application, and the copy.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::StatusCode;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info};

use super::copy::{self, CopyError, close_gracefully, reset_on_close};
use super::metrics::{ConnectionRecord, Endpoints, RefusedReason, Reporter, SecurityPolicy};
use super::pacing::ResetBudget;
use super::{Error, LocalWorkload, Proxy, TUNNEL_PORTS, Verdict, telemetry};
use crate::hbone::{self, Incoming};
use crate::identity::Identity;

impl Proxy {
    /// Serves an HBONE listener (a workload's `<ip>:15008`) until the drain starts.
    pub async fn serve_inbound(&self, listener: TcpListener) {
        self.accept_loop(listener, |proxy, tcp, peer| async move {
            proxy.inbound(tcp, peer).await;
        })
        .await;
    }

    async fn inbound(self, tcp: TcpStream, peer: SocketAddr) {
        let inner = &self.inner;
        let Ok(_slot) = inner.inbound_slots.clone().try_acquire_owned() else {
            inner.metrics.refused(RefusedReason::ConnectionLimit);
            info!(%peer, limit = inner.config.max_inbound_connections, "inbound connection limit reached");
            reset_on_close(&tcp);
            return;
        };
        let local = match tcp.local_addr() {
            Ok(local) => local,
            Err(e) => return debug!(%peer, error = %e, "inbound socket gone"),
        };
        let Some(workload) = inner.mesh.local_workload(local.ip()) else {
            inner.metrics.refused(RefusedReason::NoWorkload);
            info!(%peer, error = %Error::NoWorkload(local.ip()), "HBONE connection refused");
            return;
        };
        // The handshake has its own deadline (`Mtls`), so a silent client is let go.
        let (io, peer_identity) = match inner.tls.accept(tcp, &workload.identity).await {
            Ok(accepted) => accepted,
            Err(e) => {
                inner.metrics.refused(RefusedReason::Handshake);
                return info!(%peer, error = %e, "HBONE handshake failed");
            }
        };
        let stop = inner.drain.stop.clone();
        let proxy = self.clone();
        let budget = Arc::new(ResetBudget::new(inner.config.reset_budget));
        let identity = peer_identity.clone();
        let served =
            hbone::serve_connection(io, peer, &inner.config.server, stop, move |incoming| {
                proxy.clone().inbound_stream(
                    incoming,
                    local,
                    workload.clone(),
                    peer_identity.clone(),
                    budget.clone(),
                )
            })
            .await;
        match served {
            Ok(()) => {}
            Err(hbone::Error::RequestTimeout(timeout)) => {
                inner.metrics.refused(RefusedReason::Handshake);
                debug!(%peer, ?timeout, "HBONE connection closed: no CONNECT request in time");
            }
            Err(hbone::Error::H2 { source, .. }) => match refusal(&source) {
                Some(reason) => {
                    inner.metrics.refused(reason);
                    info!(%peer, %identity, error = %source, "HBONE connection closed for what the peer sent");
                }
                None => debug!(%peer, error = %source, "HBONE connection ended"),
            },
            Err(e) => debug!(%peer, error = %e, "HBONE connection ended"),
        }
    }

    /// Answers one CONNECT: 400 for another address, 503 for the tunnel's own ports,
    /// 401 when denied, 503 when the application cannot be reached, else 200 and copy.
    async fn inbound_stream(
        self,
        incoming: Incoming,
        local: SocketAddr,
        workload: LocalWorkload,
        peer_identity: Identity,
        budget: Arc<ResetBudget>,
    ) {
        let inner = &self.inner;
        let mut incoming = incoming;
        let source_ip = incoming.peer.ip();
        let refuse = |incoming: Incoming, status, reason, error: Error| {
            inner.metrics.refused(reason);
            info!(peer = %incoming.peer, %status, error = %error, "HBONE request refused");
            incoming.reject(status);
        };
        let target = match &incoming.authority {
            Ok(target) => *target,
            Err(e) => {
                let error = Error::BadRequest(e.clone());
                return refuse(
                    incoming,
                    StatusCode::BAD_REQUEST,
                    RefusedReason::BadRequest,
                    error,
                );
            }
        };
        if target.ip() != local.ip() {
            let error = Error::IpMismatch {
                authority: target,
                local: local.ip(),
            };
            return refuse(
                incoming,
                StatusCode::BAD_REQUEST,
                RefusedReason::IpMismatch,
                error,
            );
        }
        if TUNNEL_PORTS.contains(&target.port()) {
            let error = Error::Recursive(target);
            return refuse(
                incoming,
                StatusCode::SERVICE_UNAVAILABLE,
                RefusedReason::Recursive,
                error,
            );
        }
        if let Verdict::Deny { policy, reason } =
            inner
                .mesh
                .authorize(source_ip, Some(&peer_identity), target)
        {
            let error = Error::Denied { policy, reason };
            return refuse(
                incoming,
                StatusCode::UNAUTHORIZED,
                RefusedReason::Denied,
                error,
            );
        }
        // Each request is decided on its own; only what no request can change was
        // decided above.
        if inner.mesh.http_enforced(target) {
            let endpoints = self.endpoints(&incoming, &peer_identity, target, &workload);
            return self
                .inbound_http_hbone(incoming, endpoints, workload, peer_identity)
                .await;
        }
        // A peer that has reset more streams than its budget waits for each upstream
        // connect; giving up (another reset) costs it more.
        if let Some(wait) = budget.delay() {
            inner.metrics.connect_paced();
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                reset = incoming.reset() => {
                    inner.metrics.stream_reset();
                    budget.charge();
                    return debug!(peer = %incoming.peer, ?reset, "HBONE stream reset while its connect was paced");
                }
            }
        }
        let upstream = match inner
            .sockets
            .within(workload.netns.as_ref())
            .connect(target, Some(local.ip()))
            .await
        {
            Ok(upstream) => upstream,
            Err(source) => {
                let error = Error::Upstream {
                    addr: target,
                    source,
                };
                return refuse(
                    incoming,
                    StatusCode::SERVICE_UNAVAILABLE,
                    RefusedReason::UpstreamUnreachable,
                    error,
                );
            }
        };
        let endpoints = self.endpoints(&incoming, &peer_identity, target, &workload);
        let record = ConnectionRecord::open(
            &inner.metrics,
            Reporter::Destination,
            SecurityPolicy::MutualTls,
            endpoints,
        );
        reset_on_close(&upstream);
        let result = match incoming
            .with_baggage(&workload.name, &workload.namespace)
            .accept()
        {
            Ok(stream) => {
                let copy = copy::tcp_h2(&upstream, stream, &record.sent, &record.received);
                tokio::select! {
                    result = copy => result.map_err(Error::from),
                    denied = self.revoked(source_ip, Some(&peer_identity), target) => Err(denied),
                }
            }
            Err(e) => Err(e.into()),
        };
        if result.is_ok() {
            close_gracefully(&upstream);
        }
        if result.as_ref().is_err_and(reset_by_peer) {
            inner.metrics.stream_reset();
            budget.charge();
        }
        record.close(result.map_err(|e| e.to_string()));
    }

    /// Completes when a policy change denies a connection from `source_ip` (proving
    /// `source`) to `destination`, with the denial.
    pub(super) async fn revoked(
        &self,
        source_ip: IpAddr,
        source: Option<&Identity>,
        destination: SocketAddr,
    ) -> Error {
        let mut updates = self.inner.mesh.updates();
        while updates.changed().await.is_ok() {
            if let Verdict::Deny { policy, reason } =
                self.inner.mesh.reauthorize(source_ip, source, destination)
            {
                info!(%source_ip, %destination, ?policy, %reason, "open connection closed by a policy change");
                return Error::Denied { policy, reason };
            }
        }
        std::future::pending().await
    }
}

/// Whether a copy ended because the peer reset the stream (other than NO_ERROR, which
/// ends an upload cleanly).
fn reset_by_peer(error: &Error) -> bool {
    match error {
        Error::Copy(CopyError::Reset(reason)) => *reason != h2::Reason::NO_ERROR,
        Error::Copy(CopyError::Stream(e)) => {
            e.is_reset() && e.is_remote() && e.reason() != Some(h2::Reason::NO_ERROR)
        }
        _ => false,
    }
}

/// The refusal an HTTP/2 error of an HBONE connection is, when the tunnel closed the
/// connection (GOAWAY) for what the peer sent; `None` for the peer's own GOAWAY, a
/// lost connection or a drain.
fn refusal(error: &h2::Error) -> Option<RefusedReason> {
    if !(error.is_go_away() && error.is_library()) {
        return None;
    }
    Some(match error.reason() {
        Some(h2::Reason::ENHANCE_YOUR_CALM) => RefusedReason::Http2Limit,
        _ => RefusedReason::MalformedHttp2,
    })
}

/// The endpoints of an inbound HBONE stream as metrics and logs name them: the
/// source as the tunnel knows it (`telemetry::inbound_source`), the destination
/// workload this connection arrived for.
impl Proxy {
    fn endpoints(
        &self,
        incoming: &Incoming,
        peer_identity: &Identity,
        target: SocketAddr,
        workload: &LocalWorkload,
    ) -> Endpoints {
        let inner = &self.inner;
        let source = telemetry::inbound_source(
            inner.mesh.as_ref(),
            &inner.config.trusted_proxies,
            incoming.peer,
            peer_identity,
            &incoming.headers,
        );
        Endpoints {
            source: source.addr,
            source_identity: Some(peer_identity.clone()),
            source_workload: source.workload,
            source_workload_ip: source.workload_ip,
            destination: target,
            destination_identity: Some(workload.identity.clone()),
            destination_workload: Some((workload.name.clone(), workload.namespace.clone())),
            destination_workload_ip: Some(target.ip()),
            traceparent: incoming.headers.traceparent.clone(),
        }
    }
}
