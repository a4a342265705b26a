//! What the telemetry of an inbound HBONE stream says about its source. The tunnel's
//! own knowledge comes first: the workload the state has at the peer's address, when it
//! carries the identity the peer proved. The peer's `baggage` only fills what the state
//! lacks, and only when its namespace is the one of the peer's SPIFFE identity; its
//! `forwarded` address only when it is the peer's own IP, or the peer is a configured
//! trusted proxy. What fails a check is ignored (logged at debug).

use std::net::{IpAddr, SocketAddr};

use tracing::debug;

use super::Mesh;
use super::metrics::UNKNOWN;
use crate::hbone::ConnectHeaders;
use crate::identity::Identity;

/// The source of an inbound stream as the access log and the metrics describe it.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Source {
    pub addr: SocketAddr,
    /// (name, namespace); the name is `unknown` when only the namespace is known.
    pub workload: Option<(String, String)>,
    /// Set when `workload` comes from the state (its series follow the state).
    pub workload_ip: Option<IpAddr>,
}

pub(super) fn inbound_source(
    mesh: &dyn Mesh,
    trusted_proxies: &[Identity],
    peer: SocketAddr,
    identity: &Identity,
    headers: &ConnectHeaders,
) -> Source {
    let addr = match headers.forwarded_for {
        Some(forwarded) if forwarded.ip() == peer.ip() || trusted_proxies.contains(identity) => {
            forwarded
        }
        Some(forwarded) => {
            debug!(%peer, %forwarded, "forwarded address ignored: not the peer's address");
            peer
        }
        None => peer,
    };
    if let Some(known) = mesh.workload_at(peer.ip())
        && &known.identity == identity
    {
        return Source {
            addr,
            workload: Some((known.name, known.namespace)),
            workload_ip: Some(peer.ip()),
        };
    }
    Source {
        addr,
        workload: from_baggage(peer, identity, headers),
        // Not from the state: only the series cap bounds these.
        workload_ip: None,
    }
}

/// The workload `baggage` names, when its namespace is the peer identity's.
fn from_baggage(
    peer: SocketAddr,
    identity: &Identity,
    headers: &ConnectHeaders,
) -> Option<(String, String)> {
    let namespace = headers.source_namespace.as_deref()?;
    if namespace != identity.namespace() {
        debug!(%peer, %identity, baggage_namespace = namespace, "baggage ignored: not the peer identity's namespace");
        return None;
    }
    let name = headers.source_workload.as_deref().unwrap_or(UNKNOWN);
    Some((name.to_owned(), namespace.to_owned()))
}
