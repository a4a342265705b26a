//! Workloads (pods) and services as the tunnel knows them.

use std::net::IpAddr;
use std::path::PathBuf;

use serde::Serialize;

use crate::identity::Identity;
use crate::policy::{Labels, Target};

/// One workload (a pod): who it is, where it runs, and whether it is in the mesh.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
    pub identity: Identity,
    pub labels: Labels,
    pub ips: Vec<IpAddr>,
    /// The node it runs on.
    pub node: String,
    /// In the mesh: reached over HBONE, its inbound traffic goes through a tunnel.
    pub meshed: bool,
    /// Ready to receive traffic: only healthy workloads are service endpoints.
    pub healthy: bool,
    /// For pods on this node: the network namespace to enrol (a path such as
    /// `/var/run/netns/<name>` or `/proc/<pid>/ns/net`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    /// The ports the workload itself declares as HTTP (config `httpPorts`, pod
    /// annotation [`HTTP_PORTS_ANNOTATION`]); when set, they replace what its services'
    /// ports say.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_ports: Option<Vec<u16>>,
}

/// The pod annotation that declares which ports of the pod speak HTTP, as a comma
/// separated list (`"8080,9090"`; `""` declares none).
pub const HTTP_PORTS_ANNOTATION: &str = "ztunnel.io/http-ports";

/// Parses a list of HTTP ports as the annotation writes it: `"8080, 9090"`.
pub fn parse_http_ports(value: &str) -> Result<Vec<u16>, String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<u16>()
                .ok()
                .filter(|n| *n != 0)
                .ok_or_else(|| format!("{p:?} is not a port number in 1..=65535"))
        })
        .collect()
}

/// Whether a service port speaks HTTP the way Istio reads it: `appProtocol` first
/// (`http`, `http2`, `h2c`, `grpc`, `grpc-web`, and `kubernetes.io/h2c`), otherwise the
/// port name (`http`, `http2`, `grpc`, `grpc-web`, alone or followed by `-suffix`).
/// Case does not matter.
pub fn speaks_http(name: Option<&str>, app_protocol: Option<&str>) -> bool {
    const PROTOCOLS: [&str; 4] = ["http", "http2", "grpc", "grpc-web"];
    if let Some(p) = app_protocol.filter(|p| !p.is_empty()) {
        let p = p.to_ascii_lowercase();
        return PROTOCOLS.contains(&p.as_str()) || p == "h2c" || p == "kubernetes.io/h2c";
    }
    let Some(name) = name else { return false };
    let name = name.to_ascii_lowercase();
    PROTOCOLS.iter().any(|p| {
        name.strip_prefix(p)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('-'))
    })
}

impl Workload {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The workload as policies see it.
    pub fn target(&self) -> Target<'_> {
        Target {
            namespace: &self.namespace,
            labels: &self.labels,
        }
    }

    /// This workload's address of the same family as `like` (its first address when it
    /// has none of that family).
    pub fn address_like(&self, like: IpAddr) -> IpAddr {
        self.ips
            .iter()
            .copied()
            .find(|ip| ip.is_ipv4() == like.is_ipv4())
            .or_else(|| self.ips.first().copied())
            .unwrap_or(like)
    }
}

/// One port of a service and the workload port it maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    pub port: u16,
    pub target_port: u16,
    /// The port speaks HTTP ([`speaks_http`] of its name and `appProtocol`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub http: bool,
}

/// A service: virtual IPs whose ports lead to the workloads its selector picks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// Picks the endpoints among the workloads of the service's namespace; empty
    /// selects none.
    pub selector: Labels,
    /// Identities a server of this service may present besides the endpoint's own.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<Identity>,
}

impl Service {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}
