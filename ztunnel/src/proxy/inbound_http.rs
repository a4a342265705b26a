//! Inbound connections to a destination enforced per request (`Mesh::http_enforced`):
//! served as HTTP by `crate::http` instead of copied, over the HBONE stream or the
//! plaintext capture.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::net::TcpStream;
use tracing::info;

use super::metrics::{ConnectionRecord, Endpoints, Reporter, SecurityPolicy};
use super::{LocalWorkload, Proxy};
use crate::hbone::Incoming;
use crate::http::io::{ByteCounts, Metered, StreamIo};
use crate::http::{self, Connector, Session};
use crate::identity::Identity;

impl Proxy {
    /// Accepts the CONNECT and serves HTTP over its stream.
    pub(super) async fn inbound_http_hbone(
        self,
        incoming: Incoming,
        endpoints: Endpoints,
        workload: LocalWorkload,
        peer_identity: Identity,
    ) {
        let inner = &self.inner;
        let peer = incoming.peer;
        let target = endpoints.destination;
        let stream = match incoming.accept() {
            Ok(stream) => stream,
            Err(e) => return info!(%peer, error = %e, "HBONE stream gone before its answer"),
        };
        let record = ConnectionRecord::open(
            &inner.metrics,
            Reporter::Destination,
            SecurityPolicy::MutualTls,
            endpoints,
        );
        let session = self.session(&record, peer, Some(peer_identity), target, &workload);
        self.serve_http(StreamIo::new(stream), session, record)
            .await;
    }

    /// Serves HTTP on a plaintext connection (PERMISSIVE) to `destination`.
    pub(super) async fn inbound_http_plaintext(
        self,
        tcp: TcpStream,
        client: SocketAddr,
        destination: SocketAddr,
        workload: LocalWorkload,
    ) {
        let inner = &self.inner;
        let record = ConnectionRecord::open(
            &inner.metrics,
            Reporter::Destination,
            SecurityPolicy::None,
            Endpoints::plaintext(client, destination, &workload),
        );
        let session = self.session(&record, client, None, destination, &workload);
        self.serve_http(tcp, session, record).await;
    }

    fn session(
        &self,
        record: &ConnectionRecord<'_>,
        peer: SocketAddr,
        source: Option<Identity>,
        destination: SocketAddr,
        workload: &LocalWorkload,
    ) -> Session {
        let inner = &self.inner;
        Session {
            mesh: inner.mesh.clone(),
            metrics: inner.metrics.clone(),
            requests: record.requests(),
            config: inner.config.http.clone(),
            peer,
            source_ip: peer.ip(),
            source,
            destination,
            // From inside the workload's namespace, as the L4 path connects.
            connector: Connector {
                sockets: inner.sockets.within(workload.netns.as_ref()),
                target: destination,
                local_ip: destination.ip(),
            },
            drain: inner.drain.clone(),
        }
    }

    async fn serve_http<I>(&self, io: I, session: Session, record: ConnectionRecord<'_>)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let counts = Arc::new(ByteCounts::default());
        let io = Metered::new(io, counts.clone());
        let (source_ip, source, destination) = (
            session.source_ip,
            session.source.clone(),
            session.destination,
        );
        let served = http::serve(io, session, self.inner.drain.stop.clone());
        // What no request can change is decided again after a policy change, as for
        // copied connections; requests are decided one by one anyway.
        let result = tokio::select! {
            result = served => result.map_err(|e| e.to_string()),
            denied = self.revoked(source_ip, source.as_ref(), destination) => Err(denied.to_string()),
        };
        record
            .received
            .add(counts.received.load(Ordering::Relaxed) as usize);
        record
            .sent
            .add(counts.sent.load(Ordering::Relaxed) as usize);
        record.close(result);
    }
}
