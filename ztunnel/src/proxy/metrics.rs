//! Istio's TCP metrics and the per-connection access log.

use std::fmt;
use std::net::SocketAddr;
use std::time::Instant;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::copy::Meter;
use crate::identity::Identity;

/// Which side of the connection reports it (Istio's `reporter` label).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Reporter {
    Source,
    Destination,
}

/// Istio's `connection_security_policy`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum SecurityPolicy {
    MutualTls,
    None,
}

/// Istio's labels of the `istio_tcp_*` metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub reporter: Reporter,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub connection_security_policy: SecurityPolicy,
}

/// Why a connection or request was turned away (`reason` label of the refusals).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum RefusedReason {
    StrictPlaintext,
    Denied,
    BadRequest,
    IpMismatch,
    Recursive,
    UpstreamUnreachable,
    ConnectionLimit,
    Handshake,
    NoWorkload,
    Route,
    Socks,
}

/// Label values as Istio (and Prometheus convention) spell them.
macro_rules! label_values {
    ($($ty:ident { $($variant:ident => $name:literal),* $(,)? })*) => {$(
        impl EncodeLabelValue for $ty {
            fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), fmt::Error> {
                let name = match self { $($ty::$variant => $name),* };
                EncodeLabelValue::encode(&name, encoder)
            }
        }
    )*};
}

label_values! {
    Reporter { Source => "source", Destination => "destination" }
    SecurityPolicy { MutualTls => "mutual_tls", None => "none" }
    RefusedReason {
        StrictPlaintext => "strict_plaintext",
        Denied => "denied",
        BadRequest => "bad_request",
        IpMismatch => "ip_mismatch",
        Recursive => "recursive",
        UpstreamUnreachable => "upstream_unreachable",
        ConnectionLimit => "connection_limit",
        Handshake => "handshake",
        NoWorkload => "no_workload",
        Route => "route",
        Socks => "socks",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    reason: RefusedReason,
}

/// The proxy's metrics, registered once at startup.
pub struct Metrics {
    opened: Family<ConnectionLabels, Counter>,
    closed: Family<ConnectionLabels, Counter>,
    sent: Family<ConnectionLabels, Counter>,
    received: Family<ConnectionLabels, Counter>,
    refused: Family<RefusedLabels, Counter>,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Metrics {
            opened: Family::default(),
            closed: Family::default(),
            sent: Family::default(),
            received: Family::default(),
            refused: Family::default(),
        };
        let tcp = [
            (
                "istio_tcp_connections_opened",
                "TCP connections opened",
                &metrics.opened,
            ),
            (
                "istio_tcp_connections_closed",
                "TCP connections closed",
                &metrics.closed,
            ),
            (
                "istio_tcp_sent_bytes",
                "Bytes sent toward the client (from the destination)",
                &metrics.sent,
            ),
            (
                "istio_tcp_received_bytes",
                "Bytes received from the client (toward the destination)",
                &metrics.received,
            ),
        ];
        for (name, help, family) in tcp {
            registry.register(name, help, family.clone());
        }
        registry.register(
            "ztunnel_connections_refused",
            "Connections or HBONE requests refused, by reason",
            metrics.refused.clone(),
        );
        metrics
    }

    pub fn refused(&self, reason: RefusedReason) {
        self.refused.get_or_create(&RefusedLabels { reason }).inc();
    }

    /// How many refusals of `reason` were counted.
    pub fn refused_count(&self, reason: RefusedReason) -> u64 {
        self.refused
            .get(&RefusedLabels { reason })
            .map_or(0, |c| c.get())
    }
}

/// The two ends of a connection as the access log and the labels describe them.
#[derive(Clone, Debug)]
pub struct Endpoints {
    pub source: SocketAddr,
    pub source_identity: Option<Identity>,
    pub source_workload: Option<(String, String)>,
    pub destination: SocketAddr,
    pub destination_identity: Option<Identity>,
    pub destination_workload: Option<(String, String)>,
    /// The W3C `traceparent` of the HBONE stream: the same in both tunnels' logs.
    pub traceparent: Option<String>,
}

/// One proxied connection from open to close: counts it opened, meters its bytes,
/// and at close counts it closed and writes its access-log event.
pub struct ConnectionRecord<'m> {
    metrics: &'m Metrics,
    labels: ConnectionLabels,
    endpoints: Endpoints,
    start: Instant,
    /// Client to destination.
    pub received: Meter,
    /// Destination to client.
    pub sent: Meter,
}

impl<'m> ConnectionRecord<'m> {
    pub fn open(
        metrics: &'m Metrics,
        reporter: Reporter,
        security: SecurityPolicy,
        endpoints: Endpoints,
    ) -> Self {
        let principal = |id: &Option<Identity>| {
            id.as_ref()
                .map_or_else(|| "unknown".to_owned(), |i| i.to_string())
        };
        let part = |w: &Option<(String, String)>, second: bool| {
            w.as_ref().map_or_else(
                || "unknown".to_owned(),
                |(name, ns)| if second { ns.clone() } else { name.clone() },
            )
        };
        let labels = ConnectionLabels {
            reporter,
            source_workload: part(&endpoints.source_workload, false),
            source_workload_namespace: part(&endpoints.source_workload, true),
            source_principal: principal(&endpoints.source_identity),
            destination_workload: part(&endpoints.destination_workload, false),
            destination_workload_namespace: part(&endpoints.destination_workload, true),
            destination_principal: principal(&endpoints.destination_identity),
            connection_security_policy: security,
        };
        metrics.opened.get_or_create(&labels).inc();
        let received = Meter::new(metrics.received.get_or_create_owned(&labels));
        let sent = Meter::new(metrics.sent.get_or_create_owned(&labels));
        ConnectionRecord {
            metrics,
            labels,
            endpoints,
            start: Instant::now(),
            received,
            sent,
        }
    }

    /// Counts the connection closed and writes its access-log event, with the field
    /// names of Istio's ztunnel (`src.addr`, `src.workload`, ..., `bytes_sent`,
    /// `bytes_recv`, `duration`, `error`). Bytes are counted from the reporting
    /// workload's side: outbound, `bytes_sent` is what the client sent; inbound, what
    /// the destination sent.
    pub fn close(self, result: Result<(), String>) {
        self.metrics.closed.get_or_create(&self.labels).inc();
        let e = &self.endpoints;
        let id = |i: &Option<Identity>| i.as_ref().map(|i| i.to_string());
        let name = |w: &Option<(String, String)>| w.as_ref().map(|(name, _)| name.clone());
        let namespace = |w: &Option<(String, String)>| w.as_ref().map(|(_, ns)| ns.clone());
        let (direction, bytes_sent, bytes_recv) = match self.labels.reporter {
            Reporter::Source => ("outbound", self.received.get(), self.sent.get()),
            Reporter::Destination => ("inbound", self.sent.get(), self.received.get()),
        };
        let duration = format!("{}ms", self.start.elapsed().as_millis());
        let error = result.as_ref().err().map(String::as_str);
        macro_rules! access {
            ($level:ident) => {
                tracing::event!(
                    target: "access",
                    tracing::Level::$level,
                    src.addr = %e.source,
                    src.workload = name(&e.source_workload),
                    src.namespace = namespace(&e.source_workload),
                    src.identity = id(&e.source_identity),
                    dst.addr = %e.destination,
                    dst.workload = name(&e.destination_workload),
                    dst.namespace = namespace(&e.destination_workload),
                    dst.identity = id(&e.destination_identity),
                    direction,
                    traceparent = e.traceparent.as_deref(),
                    bytes_sent,
                    bytes_recv,
                    duration,
                    error,
                    "connection complete"
                )
            };
        }
        match error {
            None => access!(INFO),
            Some(_) => access!(WARN),
        }
    }
}
