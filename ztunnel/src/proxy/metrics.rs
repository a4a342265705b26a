//! Istio's TCP and HTTP metrics, the per-connection and per-request access logs.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tracing::info;

use super::Mesh;
use super::copy::Meter;
use crate::identity::Identity;

/// The label value of what is not known.
pub const UNKNOWN: &str = "unknown";

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
    /// An HTTP request denied by policy on a port enforced per request.
    RequestDenied,
    /// Malformed HTTP (answered 400): it never reached the application.
    MalformedHttp,
    /// A client too slow to send its request headers.
    HeaderTimeout,
    /// HBONE connections closed (GOAWAY) for HTTP/2 the peer got wrong after TLS: a bad
    /// preface, frame or header block.
    MalformedHttp2,
    /// HBONE connections closed (GOAWAY ENHANCE_YOUR_CALM) for one of HTTP/2's abuse
    /// limits: a header block far over the header list limit or spread over too many
    /// CONTINUATION frames, or too many streams reset before they were accepted (h2
    /// does not tell the connection which).
    Http2Limit,
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
        RequestDenied => "request_denied",
        MalformedHttp => "malformed_http",
        HeaderTimeout => "header_timeout",
        MalformedHttp2 => "malformed_http2",
        Http2Limit => "http2_limit",
    }
}

impl ConnectionLabels {
    /// The series of connections beyond the cap: only reporter and security kept.
    fn overflow(self) -> Self {
        ConnectionLabels {
            reporter: self.reporter,
            source_workload: UNKNOWN.to_owned(),
            source_workload_namespace: UNKNOWN.to_owned(),
            source_principal: UNKNOWN.to_owned(),
            destination_workload: UNKNOWN.to_owned(),
            destination_workload_namespace: UNKNOWN.to_owned(),
            destination_principal: UNKNOWN.to_owned(),
            connection_security_policy: self.connection_security_policy,
        }
    }
}

impl SeriesTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ConnectionLabels, Series>> {
        self.series.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    reason: RefusedReason,
}

/// A series of the `istio_tcp_*` families: the connections open on it, and the
/// workloads it names with the address the state knows each by. Once none is open and
/// one of those workloads has left the state, the series is removed.
struct Series {
    open: usize,
    workloads: Vec<(IpAddr, String, String)>,
}

/// The series of the `istio_tcp_*` families, at most `max` of them, and those of
/// `istio_requests_total` and `istio_request_duration_milliseconds`, at most `max` more.
struct SeriesTable {
    series: Mutex<HashMap<ConnectionLabels, Series>>,
    requests: Mutex<HashSet<RequestLabels>>,
    max: usize,
    /// The mesh generation of the last sweep for departed workloads.
    swept: AtomicU64,
    dropped: Counter,
}

/// The proxy's metrics, registered once at startup; clones share them.
#[derive(Clone)]
pub struct Metrics {
    mesh: Arc<dyn Mesh>,
    table: Arc<SeriesTable>,
    opened: Family<ConnectionLabels, Counter>,
    closed: Family<ConnectionLabels, Counter>,
    sent: Family<ConnectionLabels, Counter>,
    received: Family<ConnectionLabels, Counter>,
    refused: Family<RefusedLabels, Counter>,
    /// Connections opened and not yet closed: the sum of opened minus closed, always.
    open: Gauge,
    requests: Family<RequestLabels, Counter>,
    request_duration: Family<RequestLabels, Histogram, fn() -> Histogram>,
    stream_resets: Counter,
    connects_paced: Counter,
}

impl Metrics {
    /// The metrics, with at most `max_series` series per `istio_tcp_*` family; `mesh`
    /// tells which workloads are still known.
    pub fn new(registry: &mut Registry, mesh: Arc<dyn Mesh>, max_series: usize) -> Self {
        let metrics = Metrics {
            mesh,
            table: Arc::new(SeriesTable {
                series: Mutex::default(),
                requests: Mutex::default(),
                max: max_series,
                swept: AtomicU64::new(0),
                dropped: Counter::default(),
            }),
            opened: Family::default(),
            closed: Family::default(),
            sent: Family::default(),
            received: Family::default(),
            refused: Family::default(),
            open: Gauge::default(),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(duration_histogram),
            stream_resets: Counter::default(),
            connects_paced: Counter::default(),
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
        registry.register(
            "ztunnel_hbone_stream_resets",
            "Inbound HBONE streams the peer reset (RST_STREAM other than NO_ERROR)",
            metrics.stream_resets.clone(),
        );
        registry.register(
            "ztunnel_hbone_upstream_connects_paced",
            "Upstream connects held back because the HBONE connection's peer had reset more streams than its budget",
            metrics.connects_paced.clone(),
        );
        registry.register(
            "ztunnel_metric_series_dropped",
            "Connections and HTTP requests counted in an overflow series (all workload labels unknown) because the series cap was reached",
            metrics.table.dropped.clone(),
        );
        registry.register(
            "ztunnel_tcp_connections_open",
            "Connections opened and not yet closed",
            metrics.open.clone(),
        );
        registry.register(
            "istio_requests",
            "HTTP requests served on ports enforced per request",
            metrics.requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Time from a request's arrival to the end of its response, in milliseconds",
            metrics.request_duration.clone(),
        );
        metrics
    }

    /// Series of each `istio_tcp_*` family now.
    pub fn series_count(&self) -> usize {
        self.table.lock().len()
    }

    /// Connections counted in the overflow series since start.
    pub fn series_dropped(&self) -> u64 {
        self.table.dropped.get()
    }

    /// Takes a series for a new connection with `labels` naming `workloads`: the
    /// overflow series when the cap is reached. Series whose workloads left the state
    /// are swept first when the state changed since the last sweep.
    fn take_series(
        &self,
        mut labels: ConnectionLabels,
        workloads: Vec<(IpAddr, String, String)>,
    ) -> ConnectionLabels {
        let generation = *self.mesh.updates().borrow();
        let mut table = self.table.lock();
        if self.table.swept.swap(generation, Ordering::Relaxed) != generation {
            let gone: Vec<ConnectionLabels> = table
                .iter()
                .filter(|(_, s)| s.open == 0 && self.departed(s))
                .map(|(l, _)| l.clone())
                .collect();
            for labels in gone {
                table.remove(&labels);
                self.remove_series(&labels);
            }
        }
        let workloads = if table.contains_key(&labels) || table.len() < self.table.max {
            workloads
        } else {
            self.table.dropped.inc();
            labels = labels.overflow();
            Vec::new()
        };
        table
            .entry(labels.clone())
            .or_insert(Series { open: 0, workloads })
            .open += 1;
        labels
    }

    /// Gives back the series of a closed connection; removes it when it was the last
    /// one open on it and one of its workloads has left the state.
    fn release_series(&self, labels: &ConnectionLabels) {
        let mut table = self.table.lock();
        let Some(series) = table.get_mut(labels) else {
            return;
        };
        series.open -= 1;
        if series.open == 0 && self.departed(series) {
            table.remove(labels);
            self.remove_series(labels);
        }
    }

    fn departed(&self, series: &Series) -> bool {
        series.workloads.iter().any(|(ip, name, namespace)| {
            self.mesh
                .workload_at(*ip)
                .is_none_or(|w| &w.name != name || &w.namespace != namespace)
        })
    }

    fn remove_series(&self, labels: &ConnectionLabels) {
        for family in [&self.opened, &self.closed, &self.sent, &self.received] {
            family.remove(labels);
        }
        let mut requests = self
            .table
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        requests.retain(|r| {
            let gone = r.connection == *labels;
            if gone {
                self.requests.remove(r);
                self.request_duration.remove(r);
            }
            !gone
        });
    }

    /// The series a request with `labels` is counted in: the overflow series of its
    /// kind (workload labels unknown) once `max` request series exist.
    fn take_request_series(&self, labels: RequestLabels) -> RequestLabels {
        let mut requests = self
            .table
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if requests.contains(&labels) {
            return labels;
        }
        let labels = if requests.len() < self.table.max {
            labels
        } else {
            self.table.dropped.inc();
            RequestLabels {
                connection: labels.connection.overflow(),
                ..labels
            }
        };
        requests.insert(labels.clone());
        labels
    }

    /// Series of `istio_requests_total` now.
    pub fn request_series_count(&self) -> usize {
        self.table
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Connections open now (opened and not yet closed).
    pub fn open_count(&self) -> i64 {
        self.open.get()
    }

    pub fn refused(&self, reason: RefusedReason) {
        self.refused.get_or_create(&RefusedLabels { reason }).inc();
    }

    pub(crate) fn stream_reset(&self) {
        self.stream_resets.inc();
    }

    pub(crate) fn connect_paced(&self) {
        self.connects_paced.inc();
    }

    /// Inbound HBONE streams the peer reset, since start.
    pub fn stream_resets(&self) -> u64 {
        self.stream_resets.get()
    }

    /// Upstream connects held back by a connection's reset budget, since start.
    pub fn connects_paced(&self) -> u64 {
        self.connects_paced.get()
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
    /// (name, namespace) of the source workload.
    pub source_workload: Option<(String, String)>,
    /// The address the state knows the source workload by (its series go when the
    /// state no longer has it there); `None` when it is not from the state.
    pub source_workload_ip: Option<IpAddr>,
    pub destination: SocketAddr,
    pub destination_identity: Option<Identity>,
    pub destination_workload: Option<(String, String)>,
    /// As `source_workload_ip`, for the destination.
    pub destination_workload_ip: Option<IpAddr>,
    /// The W3C `traceparent` of the HBONE stream: the same in both tunnels' logs.
    pub traceparent: Option<String>,
}

impl Endpoints {
    /// A plaintext connection from `client` to `destination`, a port of `workload`: no
    /// identity and no workload known for the client.
    pub fn plaintext(
        client: SocketAddr,
        destination: SocketAddr,
        workload: &super::LocalWorkload,
    ) -> Self {
        Endpoints {
            source: client,
            source_identity: None,
            source_workload: None,
            source_workload_ip: None,
            destination,
            destination_identity: Some(workload.identity.clone()),
            destination_workload: Some((workload.name.clone(), workload.namespace.clone())),
            destination_workload_ip: Some(destination.ip()),
            traceparent: None,
        }
    }
}

/// One proxied connection from open to close: counts it opened, meters its bytes,
/// and at close counts it closed and writes its access-log event. A record dropped
/// without `close` (its task aborted: the HBONE connection or the tunnel went away)
/// closes itself with the result "aborted", so every opened connection is closed and
/// logged exactly once.
pub struct ConnectionRecord<'m> {
    metrics: &'m Metrics,
    labels: ConnectionLabels,
    endpoints: Endpoints,
    start: Instant,
    /// Client to destination.
    pub received: Meter,
    /// Destination to client.
    pub sent: Meter,
    closed: bool,
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
                .map_or_else(|| UNKNOWN.to_owned(), |i| i.to_string())
        };
        let part = |w: &Option<(String, String)>, second: bool| {
            w.as_ref().map_or_else(
                || UNKNOWN.to_owned(),
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
        let named = |ip: Option<IpAddr>, w: &Option<(String, String)>| {
            ip.zip(w.clone()).map(|(ip, (name, ns))| (ip, name, ns))
        };
        let workloads = [
            named(endpoints.source_workload_ip, &endpoints.source_workload),
            named(
                endpoints.destination_workload_ip,
                &endpoints.destination_workload,
            ),
        ]
        .into_iter()
        .flatten()
        .collect();
        let labels = metrics.take_series(labels, workloads);
        metrics.opened.get_or_create(&labels).inc();
        metrics.open.inc();
        let received = Meter::new(metrics.received.get_or_create_owned(&labels));
        let sent = Meter::new(metrics.sent.get_or_create_owned(&labels));
        ConnectionRecord {
            metrics,
            labels,
            endpoints,
            start: Instant::now(),
            received,
            sent,
            closed: false,
        }
    }

    /// Counts and logs this connection's HTTP requests.
    pub fn requests(&self) -> RequestMeter {
        RequestMeter {
            metrics: self.metrics.clone(),
            labels: self.labels.clone(),
            endpoints: self.endpoints.clone(),
            series: Mutex::default(),
        }
    }

    /// Counts the connection closed and writes its access-log event, with the field
    /// names of Istio's ztunnel (`src.addr`, `src.workload`, ..., `bytes_sent`,
    /// `bytes_recv`, `duration`, `error`). Bytes are counted from the reporting
    /// workload's side: outbound, `bytes_sent` is what the client sent; inbound, what
    /// the destination sent.
    pub fn close(mut self, result: Result<(), String>) {
        self.finish(result);
    }

    fn finish(&mut self, result: Result<(), String>) {
        if std::mem::replace(&mut self.closed, true) {
            return;
        }
        self.metrics.closed.get_or_create(&self.labels).inc();
        self.metrics.open.dec();
        self.metrics.release_series(&self.labels);
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

impl Drop for ConnectionRecord<'_> {
    fn drop(&mut self) {
        self.finish(Err(ABORTED.to_owned()));
    }
}

/// The result of a connection whose task ended before it could close it.
pub const ABORTED: &str = "aborted";

/// Istio's default buckets of `istio_request_duration_milliseconds`.
const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS_MS)
}

/// Istio's `request_protocol`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum RequestProtocol {
    Http,
    Grpc,
}

label_values! {
    RequestProtocol { Http => "http", Grpc => "grpc" }
}

/// Istio's labels of `istio_requests_total` and `istio_request_duration_milliseconds`:
/// the connection's, and those of the request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    #[prometheus(flatten)]
    pub connection: ConnectionLabels,
    pub request_protocol: RequestProtocol,
    pub response_code: u16,
    /// The `grpc-status` of a gRPC response, `-` for other requests.
    pub grpc_response_status: &'static str,
    /// Envoy's response flags: `-` none, `UF` upstream connect failure, `UC` upstream
    /// connection ended, `DPE` downstream protocol error.
    pub response_flags: &'static str,
}

/// One answered HTTP request, as the metrics and the access log describe it.
#[derive(Debug)]
pub struct RequestEvent<'a> {
    pub method: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
    pub protocol: RequestProtocol,
    pub status: u16,
    pub grpc_status: Option<&'a str>,
    pub flags: &'static str,
    pub start: Instant,
    /// The policy that decided, when one did.
    pub policy: Option<&'a str>,
    /// Why it was denied, when it was.
    pub denial: Option<&'a str>,
}

/// The `grpc_response_status` label: `-` without one, the gRPC code (0 to 16) as sent,
/// `unknown` for any other value (so the application cannot make series without end).
fn grpc_label(status: Option<&str>) -> &'static str {
    const CODES: [&str; 17] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    ];
    match status.map(str::parse::<usize>) {
        None => "-",
        Some(Ok(code)) => CODES.get(code).copied().unwrap_or(UNKNOWN),
        Some(Err(_)) => UNKNOWN,
    }
}

/// The HTTP requests of one connection: counted with the connection's labels and
/// logged with its endpoints.
pub struct RequestMeter {
    metrics: Metrics,
    labels: ConnectionLabels,
    endpoints: Endpoints,
    /// The series this connection's requests were counted in, so that a request's
    /// labels are built and hashed once per connection and kind of answer, not once per
    /// request. None of them is removed meanwhile: a series goes only once no
    /// connection counted in it is open.
    series: Mutex<Vec<RequestSeries>>,
}

/// One series of a connection's requests, by the request labels that tell it apart.
struct RequestSeries {
    protocol: RequestProtocol,
    status: u16,
    grpc: &'static str,
    flags: &'static str,
    /// The overflow series: each request counted in it is counted as dropped.
    overflow: bool,
    requests: Counter,
    duration: Histogram,
}

/// How many series one connection keeps at hand; a request of a further kind takes the
/// place of the one kept longest.
const KEPT_REQUEST_SERIES: usize = 8;

impl RequestMeter {
    /// Counts one request and writes its access-log event.
    pub fn request(&self, event: RequestEvent<'_>) {
        let elapsed = event.start.elapsed();
        let grpc = grpc_label(event.grpc_status);
        let mut kept = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        let found = kept.iter().position(|s| {
            s.protocol == event.protocol
                && s.status == event.status
                && s.grpc == grpc
                && s.flags == event.flags
        });
        let series = match found {
            Some(i) => {
                let series = &kept[i];
                if series.overflow {
                    self.metrics.table.dropped.inc();
                }
                series
            }
            None => {
                let labels = self.metrics.take_request_series(RequestLabels {
                    connection: self.labels.clone(),
                    request_protocol: event.protocol,
                    response_code: event.status,
                    grpc_response_status: grpc,
                    response_flags: event.flags,
                });
                let series = RequestSeries {
                    protocol: event.protocol,
                    status: event.status,
                    grpc,
                    flags: event.flags,
                    overflow: labels.connection != self.labels,
                    requests: self.metrics.requests.get_or_create(&labels).clone(),
                    duration: self.metrics.request_duration.get_or_create(&labels).clone(),
                };
                if kept.len() == KEPT_REQUEST_SERIES {
                    kept.remove(0);
                }
                kept.push(series);
                kept.last().expect("just pushed")
            }
        };
        series.requests.inc();
        series.duration.observe(elapsed.as_secs_f64() * 1000.0);
        drop(kept);
        let e = &self.endpoints;
        let id = |i: &Option<Identity>| i.as_ref().map(|i| i.to_string());
        info!(
            target: "access",
            reporter = ?self.labels.reporter,
            src.addr = %e.source,
            src.identity = id(&e.source_identity),
            dst.addr = %e.destination,
            dst.identity = id(&e.destination_identity),
            traceparent = e.traceparent.as_deref(),
            method = event.method,
            authority = event.authority,
            path = event.path,
            protocol = ?event.protocol,
            status = event.status,
            grpc_status = event.grpc_status,
            response_flags = event.flags,
            duration_us = elapsed.as_micros() as u64,
            policy = event.policy,
            denial = event.denial,
            "request"
        );
    }
}
