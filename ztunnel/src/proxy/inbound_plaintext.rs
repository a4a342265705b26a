//! Inbound plaintext (:15006): connections steered to a workload without HBONE.
//! Refused (reset, counted, logged) when the workload's mTLS mode is STRICT; otherwise
//! authorized (no principal is known) and forwarded to the application.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tracing::info;

use super::copy::{self, close_gracefully, reset_on_close};
use super::metrics::{ConnectionRecord, Endpoints, RefusedReason, Reporter, SecurityPolicy};
use super::{Error, Proxy, Verdict};

impl Proxy {
    /// Serves a plaintext capture listener until the drain starts. `original_destination`
    /// gives each accepted connection's destination: its local address when steered by
    /// `sk_lookup`.
    pub async fn serve_inbound_plaintext<F>(&self, listener: TcpListener, original_destination: F)
    where
        F: Fn(&TcpStream) -> io::Result<SocketAddr> + Send + Sync + 'static,
    {
        let lookup = Arc::new(original_destination);
        self.accept_loop(listener, move |proxy, tcp, client| {
            let destination = lookup(&tcp);
            async move {
                match destination {
                    Ok(destination) => proxy.inbound_plaintext(tcp, client, destination).await,
                    Err(e) => {
                        info!(%client, error = %e, "inbound socket gone");
                    }
                }
            }
        })
        .await;
    }

    async fn inbound_plaintext(self, tcp: TcpStream, client: SocketAddr, destination: SocketAddr) {
        let inner = &self.inner;
        let refuse = |reason, error: Error| {
            inner.metrics.refused(reason);
            info!(%client, %destination, error = %error, "plaintext connection refused");
            reset_on_close(&tcp);
        };
        let Ok(_slot) = inner.inbound_slots.clone().try_acquire_owned() else {
            return refuse(
                RefusedReason::ConnectionLimit,
                Error::Refused {
                    destination,
                    reason: format!(
                        "{} inbound connections open",
                        inner.config.max_inbound_connections
                    ),
                },
            );
        };
        let Some(workload) = inner.mesh.local_workload(destination.ip()) else {
            return refuse(
                RefusedReason::NoWorkload,
                Error::NoWorkload(destination.ip()),
            );
        };
        if !inner.mesh.accepts_plaintext(destination) {
            return refuse(RefusedReason::StrictPlaintext, Error::Strict(destination));
        }
        if let Verdict::Deny { policy, reason } =
            inner.mesh.authorize(client.ip(), None, destination)
        {
            return refuse(RefusedReason::Denied, Error::Denied { policy, reason });
        }
        if inner.mesh.http_enforced(destination) {
            return self
                .inbound_http_plaintext(tcp, client, destination, workload)
                .await;
        }
        // From inside the workload's namespace, as over HBONE: the application's address
        // exists only there.
        let upstream = match inner
            .sockets
            .within(workload.netns.as_ref())
            .connect(destination, Some(destination.ip()))
            .await
        {
            Ok(upstream) => upstream,
            Err(source) => {
                return refuse(
                    RefusedReason::UpstreamUnreachable,
                    Error::Upstream {
                        addr: destination,
                        source,
                    },
                );
            }
        };
        let record = ConnectionRecord::open(
            &inner.metrics,
            Reporter::Destination,
            SecurityPolicy::None,
            Endpoints::plaintext(client, destination, &workload),
        );
        reset_on_close(&tcp);
        reset_on_close(&upstream);
        let copy = copy::tcp_tcp(&tcp, &upstream, &record.received, &record.sent);
        let result = tokio::select! {
            result = copy => result.map_err(Error::from),
            denied = self.revoked(client.ip(), None, destination) => Err(denied),
        };
        if result.is_ok() {
            close_gracefully(&tcp);
            close_gracefully(&upstream);
        }
        record.close(result.map_err(|e| e.to_string()));
    }
}
