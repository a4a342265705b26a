//! The optional CONNECT headers Istio peers exchange: `forwarded` (the original client
//! address), `baggage` (workload metadata of the source) and `traceparent`.

use std::net::SocketAddr;

use http::HeaderMap;
use http::header::{FORWARDED, HeaderName, HeaderValue};
use rand::Rng;

pub(super) const BAGGAGE: HeaderName = HeaderName::from_static("baggage");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Headers of a CONNECT request beyond method and authority.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectHeaders {
    /// `forwarded: for="<ip:port>"`: the application's own address.
    pub forwarded_for: Option<SocketAddr>,
    /// Workload name of the source, from `baggage` (`k8s.<kind>.name`).
    pub source_workload: Option<String>,
    /// Namespace of the source, from `baggage` (`k8s.namespace.name`).
    pub source_namespace: Option<String>,
    /// `traceparent`, kept verbatim when well formed.
    pub traceparent: Option<String>,
}

impl ConnectHeaders {
    /// Headers for a new outbound stream: a fresh `traceparent` is generated.
    pub fn outbound(client: SocketAddr, workload: &str, namespace: &str) -> Self {
        let mut rng = rand::rng();
        let trace: u128 = rng.random();
        let span: u64 = rng.random();
        ConnectHeaders {
            forwarded_for: Some(client),
            source_workload: Some(workload.to_owned()),
            source_namespace: Some(namespace.to_owned()),
            traceparent: Some(format!("00-{trace:032x}-{span:016x}-00")),
        }
    }

    /// Reads the headers, ignoring any that are malformed (they are informational).
    pub fn read(headers: &HeaderMap) -> Self {
        let text = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
        let forwarded_for = text(&FORWARDED).and_then(parse_forwarded);
        let (source_workload, source_namespace) =
            text(&BAGGAGE).map(parse_baggage).unwrap_or_default();
        let traceparent = text(&TRACEPARENT)
            .filter(|t| valid_traceparent(t))
            .map(str::to_owned);
        ConnectHeaders {
            forwarded_for,
            source_workload,
            source_namespace,
            traceparent,
        }
    }

    /// Writes the headers that are set into `headers`.
    pub fn write(&self, headers: &mut HeaderMap) {
        let mut put = |name: HeaderName, value: String| {
            if let Ok(value) = HeaderValue::try_from(value) {
                headers.insert(name, value);
            }
        };
        if let Some(addr) = self.forwarded_for {
            put(FORWARDED, format!("for=\"{addr}\""));
        }
        if let (Some(workload), Some(namespace)) = (&self.source_workload, &self.source_namespace) {
            put(BAGGAGE, baggage(workload, namespace));
        }
        if let Some(trace) = &self.traceparent {
            put(TRACEPARENT, trace.clone());
        }
    }
}

/// The `baggage` value describing workload `workload` in `namespace`: sent with a
/// CONNECT for its source, and with the 200 answer for its destination.
pub fn baggage(workload: &str, namespace: &str) -> String {
    format!("k8s.namespace.name={namespace},k8s.deployment.name={workload},service.name={workload}")
}

/// `for="1.2.3.4:5"` or `for="[::1]:5"` (the first `for` element wins).
fn parse_forwarded(value: &str) -> Option<SocketAddr> {
    value
        .split([';', ','])
        .filter_map(|part| part.trim().strip_prefix("for="))
        .map(|v| v.trim_matches('"'))
        .find_map(|v| v.parse().ok())
}

/// The source workload name and namespace carried in a `baggage` header.
pub fn parse_baggage(value: &str) -> (Option<String>, Option<String>) {
    let mut workload = None;
    let mut namespace = None;
    for (key, val) in value
        .split(',')
        .filter_map(|item| item.trim().split_once('='))
    {
        match key {
            "k8s.namespace.name" => namespace = Some(val.to_owned()),
            "k8s.cluster.name" => {}
            k if k.starts_with("k8s.") && k.ends_with(".name") => workload = Some(val.to_owned()),
            _ => {}
        }
    }
    (workload, namespace)
}

fn valid_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    parts.len() == 4
        && hex(parts[0], 2)
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let sent = ConnectHeaders::outbound("10.0.0.1:4242".parse().unwrap(), "orders", "prod");
        let mut map = HeaderMap::new();
        sent.write(&mut map);
        assert_eq!(map["forwarded"], "for=\"10.0.0.1:4242\"");
        assert_eq!(ConnectHeaders::read(&map), sent);
    }

    #[test]
    fn reads_istio_headers() {
        let mut map = HeaderMap::new();
        map.insert(FORWARDED, HeaderValue::from_static("for=\"[fd00::1]:80\""));
        map.insert(
            BAGGAGE,
            HeaderValue::from_static(
                "k8s.cluster.name=Kubernetes,k8s.namespace.name=shop,k8s.deployment.name=cart,service.name=cart,service.version=v1",
            ),
        );
        map.insert(TRACEPARENT, HeaderValue::from_static("not-a-trace"));
        let read = ConnectHeaders::read(&map);
        assert_eq!(read.forwarded_for, Some("[fd00::1]:80".parse().unwrap()));
        assert_eq!(read.source_workload.as_deref(), Some("cart"));
        assert_eq!(read.source_namespace.as_deref(), Some("shop"));
        assert_eq!(read.traceparent, None);
    }
}
