//! What the tunnel knows: workloads, services and policies, as one immutable
//! [`Snapshot`] that discovery replaces atomically and the data path reads without
//! locks.
//!
//! Every discovery source (the local file, the Kubernetes API) produces a full
//! [`Resources`] and hands it to [`State::publish`]; consumers call [`State::load`] for
//! the current snapshot and [`State::subscribe`] to learn that it changed.
//!
//! Re-checking open connections after a change: for each open inbound connection the
//! proxy waits on [`State::subscribe`]; on a change it asks [`Snapshot::authorize`]
//! again with the same source address, identity and destination, and closes the
//! connection when the [`Decision`] now denies it, logging the deciding policy.
//! [`Snapshot::decide`] is the same question without logging, for tools.
//!
//! HTTP requests: a destination port whose requests are decided one by one
//! ([`Snapshot::http_enforced`]) has its connections checked only for what no request
//! can change, and each request with [`Snapshot::authorize_request`] against the
//! snapshot current when the request arrives, so a policy edit applies to the next
//! request.

mod workload;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::identity::Identity;
use crate::policy::{
    self, AuthorizationPolicy, Decision, EffectiveMode, Labels, PathNormalization,
    PeerAuthentication, Policy, Target, WorkloadMode,
};

pub use workload::{
    HTTP_PORTS_ANNOTATION, Service, ServicePort, Workload, parse_http_ports, speaks_http,
};

/// The port a meshed workload's tunnel accepts HBONE on.
pub const HBONE_PORT: u16 = 15008;

/// Everything one discovery source knows, in full.
#[derive(Clone, Debug, Default)]
pub struct Resources {
    /// The node this tunnel runs on: its workloads are the local ones.
    pub node: String,
    pub trust_domain: String,
    /// Policies here apply mesh-wide (Istio's root namespace, `istio-system` by default).
    pub root_namespace: String,
    pub workloads: Vec<Workload>,
    pub services: Vec<Service>,
    /// Oldest first: among equal PeerAuthentications the first one wins.
    pub policies: Vec<Policy>,
    pub l7: L7Settings,
}

/// Where AuthorizationPolicy rules with HTTP fields are enforced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum L7Authorization {
    /// By this tunnel, per request, on the HTTP ports of its workloads.
    #[default]
    Tunnel,
    /// By Istio waypoints: this tunnel handles HTTP fields as Istio's ztunnel does
    /// (an ALLOW rule with them never matches, other rules ignore them).
    Waypoint,
}

impl std::fmt::Display for L7Authorization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            L7Authorization::Tunnel => "tunnel",
            L7Authorization::Waypoint => "waypoint",
        })
    }
}

/// How HTTP requests are authorized.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct L7Settings {
    pub authorization: L7Authorization,
    pub path_normalization: PathNormalization,
}

/// Why a workload port speaks HTTP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "source")]
pub enum HttpPort {
    /// Listed by the workload itself (config `httpPorts` or the pod annotation).
    Declared,
    /// A port of this service (`namespace/name`, service port) targets it.
    Service { service: String, port: u16 },
}

impl std::fmt::Display for HttpPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpPort::Declared => f.write_str("declared HTTP by the workload"),
            HttpPort::Service { service, port } => {
                write!(f, "service {service} port {port} speaks HTTP")
            }
        }
    }
}

/// Why an outbound destination cannot be resolved.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("service {service} ({vip}) has no port {port}")]
    NoSuchPort {
        service: String,
        vip: IpAddr,
        port: u16,
    },
    #[error("service {service} ({vip}:{port}) has no healthy endpoint")]
    NoEndpoint {
        service: String,
        vip: IpAddr,
        port: u16,
    },
}

/// How the proxy reaches an outbound destination.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Transport {
    /// Over HBONE to `gateway` (`<endpoint ip>:15008`), requiring the server's
    /// certificate to carry one of `identities`.
    Hbone {
        gateway: SocketAddr,
        identities: Vec<Identity>,
    },
    /// Plain TCP to the destination: it is not in the mesh.
    Plaintext,
}

/// Where an outbound connection goes.
#[derive(Clone, Debug)]
pub struct Upstream {
    /// The endpoint address: a workload IP and the target port (for a service, its
    /// port translated to the endpoint's target port).
    pub address: SocketAddr,
    /// The destination workload, when the address belongs to one.
    pub workload: Option<Arc<Workload>>,
    /// `namespace/name` of the service, when the destination was a service VIP.
    pub service: Option<String>,
    pub transport: Transport,
}

/// One immutable view of workloads, services and policies, with indexes.
#[derive(Debug, Default)]
pub struct Snapshot {
    generation: u64,
    resources: Resources,
    workloads: Vec<Arc<Workload>>,
    by_ip: HashMap<IpAddr, usize>,
    by_name: HashMap<(String, String), usize>,
    by_identity: HashMap<Identity, Vec<usize>>,
    by_label: HashMap<(String, String), Vec<usize>>,
    by_vip: HashMap<IpAddr, usize>,
    /// For each service, the indexes of the workloads its selector picks.
    endpoints: Vec<Vec<usize>>,
    /// For each service, a counter that spreads connections over its endpoints.
    next_endpoint: Vec<AtomicUsize>,
    peer_authentications: Vec<PeerAuthentication>,
    authorization_policies: Vec<Arc<AuthorizationPolicy>>,
    /// For each workload: its mTLS modes, and the AuthorizationPolicies that select it
    /// (config order), computed once per snapshot so a decision only matches rules.
    modes: Vec<WorkloadMode>,
    selected: Vec<Vec<Arc<AuthorizationPolicy>>>,
    /// For each workload: its ports that speak HTTP, and whether a policy selecting it
    /// has rules with HTTP fields.
    http_ports: Vec<BTreeMap<u16, HttpPort>>,
    http_rules: Vec<bool>,
}

impl Snapshot {
    /// Builds the indexes. Later duplicates of an IP or a VIP lose to the first, with a
    /// warning (the file source rejects them before they get here).
    pub fn new(generation: u64, resources: Resources) -> Snapshot {
        let workloads: Vec<Arc<Workload>> =
            resources.workloads.iter().cloned().map(Arc::new).collect();
        let mut snap = Snapshot {
            generation,
            workloads,
            ..Snapshot::default()
        };
        for (i, w) in snap.workloads.iter().enumerate() {
            for ip in &w.ips {
                if let Some(&first) = snap.by_ip.get(ip) {
                    warn!(%ip, workload = %w.key(), kept = %snap.workloads[first].key(), "duplicate workload IP ignored");
                } else {
                    snap.by_ip.insert(*ip, i);
                }
            }
            snap.by_name
                .insert((w.namespace.clone(), w.name.clone()), i);
            snap.by_identity
                .entry(w.identity.clone())
                .or_default()
                .push(i);
            for (k, v) in &w.labels {
                snap.by_label
                    .entry((k.clone(), v.clone()))
                    .or_default()
                    .push(i);
            }
        }
        for (i, s) in resources.services.iter().enumerate() {
            for vip in &s.vips {
                if let Some(&first) = snap.by_vip.get(vip) {
                    warn!(%vip, service = %s.key(), kept = %resources.services[first].key(), "duplicate service VIP ignored");
                } else {
                    snap.by_vip.insert(*vip, i);
                }
            }
            let eps = if s.selector.is_empty() {
                Vec::new()
            } else {
                snap.select(&s.namespace, &s.selector)
            };
            snap.endpoints.push(eps);
            snap.next_endpoint.push(AtomicUsize::new(0));
        }
        for p in &resources.policies {
            match p {
                Policy::Peer(p) => snap.peer_authentications.push(p.clone()),
                Policy::Authz(p) => snap.authorization_policies.push(Arc::new(p.clone())),
            }
        }
        snap.resources = resources;
        for w in &snap.workloads {
            snap.modes.push(snap.workload_mode(w));
            let selected: Vec<Arc<AuthorizationPolicy>> = snap
                .authorization_policies
                .iter()
                .filter(|p| p.selects(&snap.resources.root_namespace, w.target()))
                .cloned()
                .collect();
            snap.http_rules
                .push(selected.iter().any(|p| p.has_http_rules()));
            snap.selected.push(selected);
        }
        snap.http_ports = snap.find_http_ports();
        snap
    }

    /// Each workload's HTTP ports: the ones it declares; without a declaration, the
    /// target ports of HTTP service ports that lead to it.
    fn find_http_ports(&self) -> Vec<BTreeMap<u16, HttpPort>> {
        let mut ports: Vec<BTreeMap<u16, HttpPort>> = self
            .workloads
            .iter()
            .map(|w| {
                w.http_ports
                    .iter()
                    .flatten()
                    .map(|p| (*p, HttpPort::Declared))
                    .collect()
            })
            .collect();
        for (s, eps) in self.resources.services.iter().zip(&self.endpoints) {
            for &i in eps {
                if self.workloads[i].http_ports.is_some() {
                    continue;
                }
                for p in s.ports.iter().filter(|p| p.http) {
                    ports[i]
                        .entry(p.target_port)
                        .or_insert_with(|| HttpPort::Service {
                            service: s.key(),
                            port: p.port,
                        });
                }
            }
        }
        ports
    }

    /// How HTTP requests are authorized in this snapshot.
    pub fn l7(&self) -> L7Settings {
        self.resources.l7
    }

    /// Why the destination port speaks HTTP, or `None` when it does not.
    pub fn http_port(&self, dst: SocketAddr) -> Option<&HttpPort> {
        let &i = self.by_ip.get(&dst.ip())?;
        self.http_ports[i].get(&dst.port())
    }

    /// Whether requests to `dst` are decided one by one: the tunnel enforces L7
    /// authorization, the port speaks HTTP, and a policy selecting the workload has
    /// rules with HTTP fields.
    pub fn http_enforced(&self, dst: SocketAddr) -> bool {
        let Some(&i) = self.by_ip.get(&dst.ip()) else {
            return false;
        };
        self.resources.l7.authorization == L7Authorization::Tunnel
            && self.http_rules[i]
            && self.http_ports[i].contains_key(&dst.port())
    }

    /// What a user should know about how the HTTP rules of the policies selecting a
    /// workload are enforced on it: with `waypoint`, not at all; on a workload without
    /// HTTP ports, as at L4.
    pub fn http_warnings(&self, w: &Workload) -> Vec<String> {
        let Some(i) = self
            .by_name
            .get(&(w.namespace.clone(), w.name.clone()))
            .copied()
        else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for p in self.selected[i].iter().filter(|p| p.has_http_rules()) {
            let handling = if p.action == policy::Action::Allow {
                "its ALLOW rules with HTTP fields never match"
            } else {
                "its rules ignore their HTTP fields"
            };
            if self.resources.l7.authorization == L7Authorization::Waypoint {
                out.push(format!(
                    "policy {} has HTTP rules but l7Authorization is waypoint: this tunnel does \
                     not check them on {} ({handling})",
                    p.reference,
                    w.key()
                ));
            } else if self.http_ports[i].is_empty() {
                out.push(format!(
                    "policy {} has HTTP rules but no port of {} speaks HTTP (declare it with \
                     httpPorts, the {HTTP_PORTS_ANNOTATION} annotation or a service port's \
                     appProtocol or name): {handling}",
                    p.reference,
                    w.key()
                ));
            }
        }
        out
    }

    /// Workloads in `namespace` whose labels include every label of `selector`.
    fn select(&self, namespace: &str, selector: &Labels) -> Vec<usize> {
        let smallest = selector
            .iter()
            .map(|(k, v)| self.by_label.get(&(k.clone(), v.clone())))
            .min_by_key(|l| l.map_or(0, Vec::len));
        let Some(Some(candidates)) = smallest else {
            return Vec::new();
        };
        candidates
            .iter()
            .copied()
            .filter(|&i| {
                let w = &self.workloads[i];
                w.namespace == namespace && policy::selector_matches(selector, &w.labels)
            })
            .collect()
    }

    /// Increases with every published change; 0 before the first.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn node(&self) -> &str {
        &self.resources.node
    }

    pub fn trust_domain(&self) -> &str {
        &self.resources.trust_domain
    }

    pub fn root_namespace(&self) -> &str {
        &self.resources.root_namespace
    }

    pub fn workloads(&self) -> &[Arc<Workload>] {
        &self.workloads
    }

    pub fn services(&self) -> &[Service] {
        &self.resources.services
    }

    pub fn policies(&self) -> &[Policy] {
        &self.resources.policies
    }

    /// The workload that owns `ip`, on any node.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip).map(|&i| &self.workloads[i])
    }

    /// The workload on this node that owns `ip`: the proxy's source or destination pod.
    pub fn local_workload(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.workload_by_ip(ip)
            .filter(|w| w.node == self.resources.node)
    }

    /// The workloads on this node.
    pub fn local_workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads
            .iter()
            .filter(|w| w.node == self.resources.node)
    }

    /// The identities of the meshed workloads on this node: the certificates this
    /// tunnel must hold.
    pub fn local_identities(&self) -> BTreeSet<&Identity> {
        self.local_workloads()
            .filter(|w| w.meshed)
            .map(|w| &w.identity)
            .collect()
    }

    pub fn workload(&self, namespace: &str, name: &str) -> Option<&Arc<Workload>> {
        self.by_name
            .get(&(namespace.to_string(), name.to_string()))
            .map(|&i| &self.workloads[i])
    }

    /// The workloads that run as `identity`.
    pub fn workloads_with_identity(&self, identity: &Identity) -> Vec<&Arc<Workload>> {
        self.by_identity
            .get(identity)
            .into_iter()
            .flatten()
            .map(|&i| &self.workloads[i])
            .collect()
    }

    /// The service that owns a VIP, and the workloads its selector picks (healthy or
    /// not).
    pub fn service_by_vip(&self, vip: IpAddr) -> Option<(&Service, Vec<&Arc<Workload>>)> {
        let &i = self.by_vip.get(&vip)?;
        let endpoints = self.endpoints[i]
            .iter()
            .map(|&w| &self.workloads[w])
            .collect();
        Some((&self.resources.services[i], endpoints))
    }

    fn upstream_to(
        &self,
        w: &Arc<Workload>,
        ip: IpAddr,
        port: u16,
        extra: &[Identity],
    ) -> Upstream {
        let address = SocketAddr::new(ip, port);
        let transport = if w.meshed {
            let mut identities = vec![w.identity.clone()];
            identities.extend(extra.iter().filter(|i| **i != w.identity).cloned());
            Transport::Hbone {
                gateway: SocketAddr::new(ip, HBONE_PORT),
                identities,
            }
        } else {
            Transport::Plaintext
        };
        Upstream {
            address,
            workload: Some(w.clone()),
            service: None,
            transport,
        }
    }

    /// Resolves an outbound original destination: a workload IP goes to that workload;
    /// a service VIP goes to one of its healthy endpoints (spread round robin) with the
    /// port translated to the target port; anything else passes through as plaintext.
    pub fn resolve(&self, dst: SocketAddr) -> Result<Upstream, Error> {
        if let Some(w) = self.workload_by_ip(dst.ip()) {
            return Ok(self.upstream_to(w, dst.ip(), dst.port(), &[]));
        }
        let Some(&si) = self.by_vip.get(&dst.ip()) else {
            return Ok(Upstream {
                address: dst,
                workload: None,
                service: None,
                transport: Transport::Plaintext,
            });
        };
        let (service, target_port, healthy) = self.service_endpoints(si, dst)?;
        let pick = self.next_endpoint[si].fetch_add(1, Ordering::Relaxed) % healthy.len();
        Ok(self.service_upstream(service, healthy[pick], dst, target_port))
    }

    /// Every upstream a service VIP can lead to (its healthy endpoints, in order), for
    /// tools that explain rather than connect; `Ok(None)` when `dst` is not a VIP.
    pub fn service_upstreams(&self, dst: SocketAddr) -> Result<Option<Vec<Upstream>>, Error> {
        let Some(&si) = self.by_vip.get(&dst.ip()) else {
            return Ok(None);
        };
        let (service, target_port, healthy) = self.service_endpoints(si, dst)?;
        Ok(Some(
            healthy
                .into_iter()
                .map(|w| self.service_upstream(service, w, dst, target_port))
                .collect(),
        ))
    }

    /// The service at index `si`, the target port for `dst`'s port, and its healthy
    /// endpoints (never empty).
    fn service_endpoints(
        &self,
        si: usize,
        dst: SocketAddr,
    ) -> Result<(&Service, u16, Vec<&Arc<Workload>>), Error> {
        let service = &self.resources.services[si];
        let port = service
            .ports
            .iter()
            .find(|p| p.port == dst.port())
            .ok_or_else(|| Error::NoSuchPort {
                service: service.key(),
                vip: dst.ip(),
                port: dst.port(),
            })?;
        let healthy: Vec<&Arc<Workload>> = self.endpoints[si]
            .iter()
            .map(|&i| &self.workloads[i])
            .filter(|w| w.healthy && !w.ips.is_empty())
            .collect();
        if healthy.is_empty() {
            return Err(Error::NoEndpoint {
                service: service.key(),
                vip: dst.ip(),
                port: dst.port(),
            });
        }
        Ok((service, port.target_port, healthy))
    }

    fn service_upstream(
        &self,
        service: &Service,
        w: &Arc<Workload>,
        dst: SocketAddr,
        target_port: u16,
    ) -> Upstream {
        let ip = w.address_like(dst.ip());
        let mut up = self.upstream_to(w, ip, target_port, &service.subject_alt_names);
        up.service = Some(service.key());
        up
    }

    /// The mTLS modes in force for a workload (of this snapshot or not).
    pub fn workload_mode(&self, w: &Workload) -> WorkloadMode {
        WorkloadMode::compose(
            &self.peer_authentications,
            &self.resources.root_namespace,
            w.target(),
        )
    }

    /// The effective mTLS mode for an inbound connection to a local workload address
    /// (`None` when no local workload owns the address).
    pub fn inbound_mode(&self, dst: SocketAddr) -> Option<&EffectiveMode> {
        let &i = self.by_ip.get(&dst.ip())?;
        (self.workloads[i].node == self.resources.node).then(|| self.modes[i].for_port(dst.port()))
    }

    /// Whether a plaintext connection to this local address is accepted (PERMISSIVE or
    /// DISABLE). Unknown addresses are refused.
    pub fn plaintext_allowed(&self, dst: SocketAddr) -> bool {
        self.inbound_mode(dst)
            .is_some_and(|m| m.accepts_plaintext())
    }

    /// The AuthorizationPolicies that select a workload, in config order.
    pub fn policies_for(&self, target: Target<'_>) -> Vec<&AuthorizationPolicy> {
        self.authorization_policies
            .iter()
            .filter(|p| p.selects(&self.resources.root_namespace, target))
            .map(|p| &**p)
            .collect()
    }

    /// Decides an inbound connection to a workload address: STRICT refuses a peer
    /// without identity, then AuthorizationPolicy. Pure: logs nothing (see
    /// [`Snapshot::authorize`]). An address no workload owns is denied.
    pub fn decide(&self, src_ip: IpAddr, identity: Option<&Identity>, dst: SocketAddr) -> Decision {
        let Some(&i) = self.by_ip.get(&dst.ip()) else {
            return Decision {
                allowed: false,
                policy: None,
                rule: None,
                reason: format!("no workload owns destination {}", dst.ip()),
                audit: Vec::new(),
                dry_run: Vec::new(),
            };
        };
        let conn = policy::Connection {
            src_ip,
            identity,
            dst,
            request: None,
        };
        let mode = self.modes[i].for_port(dst.port());
        if self.http_enforced(dst) {
            policy::evaluate_before_requests(mode, &self.selected[i], &conn)
        } else {
            policy::evaluate(mode, &self.selected[i], &conn)
        }
    }

    /// Decides one HTTP request to a workload address, with its path normalized as
    /// [`L7Settings::path_normalization`] says. A path that cannot be normalized is
    /// denied. With `l7Authorization: waypoint` this is the connection's decision.
    /// Pure, like [`Snapshot::decide`].
    pub fn decide_request(
        &self,
        src_ip: IpAddr,
        identity: Option<&Identity>,
        dst: SocketAddr,
        request: &http::request::Parts,
    ) -> Decision {
        let Some(&i) = self.by_ip.get(&dst.ip()) else {
            return self.decide(src_ip, identity, dst);
        };
        if self.resources.l7.authorization == L7Authorization::Waypoint {
            return self.decide(src_ip, identity, dst);
        }
        let (path, host) =
            match policy::path_and_host(request, self.resources.l7.path_normalization) {
                Ok(read) => read,
                Err(e) => {
                    return Decision {
                        allowed: false,
                        policy: None,
                        rule: None,
                        reason: format!("{} request: {e}", request.method),
                        audit: Vec::new(),
                        dry_run: Vec::new(),
                    };
                }
            };
        let req = policy::Request {
            method: request.method.as_str(),
            path: &path,
            host,
            headers: &request.headers,
        };
        let conn = policy::Connection {
            src_ip,
            identity,
            dst,
            request: Some(&req),
        };
        policy::evaluate(self.modes[i].for_port(dst.port()), &self.selected[i], &conn)
    }

    /// [`Snapshot::decide_request`], logging what AUDIT and dry-run policies matched.
    pub fn authorize_request(
        &self,
        src_ip: IpAddr,
        identity: Option<&Identity>,
        dst: SocketAddr,
        request: &http::request::Parts,
    ) -> Decision {
        let d = self.decide_request(src_ip, identity, dst, request);
        log_audit(&d, src_ip, identity, dst);
        d
    }

    /// [`Snapshot::decide`], logging what AUDIT and dry-run policies matched.
    pub fn authorize(
        &self,
        src_ip: IpAddr,
        identity: Option<&Identity>,
        dst: SocketAddr,
    ) -> Decision {
        let d = self.decide(src_ip, identity, dst);
        log_audit(&d, src_ip, identity, dst);
        d
    }

    /// Everything in this snapshot as JSON, for `/config_dump`: workloads, services,
    /// policies (with their L4 warnings), and the mTLS modes of each local workload.
    pub fn dump(&self) -> serde_json::Value {
        let modes: BTreeMap<String, &WorkloadMode> = self
            .workloads
            .iter()
            .zip(&self.modes)
            .filter(|(w, _)| w.node == self.resources.node)
            .map(|(w, m)| (w.key(), m))
            .collect();
        let http: BTreeMap<String, serde_json::Value> = self
            .workloads
            .iter()
            .enumerate()
            .filter(|(_, w)| w.node == self.resources.node)
            .map(|(i, w)| {
                let enforced: Vec<u16> = if self.resources.l7.authorization
                    == L7Authorization::Tunnel
                    && self.http_rules[i]
                {
                    self.http_ports[i].keys().copied().collect()
                } else {
                    Vec::new()
                };
                let value = serde_json::json!({
                    "httpPorts": self.http_ports[i],
                    "enforcedPerRequest": enforced,
                    "warnings": self.http_warnings(w),
                });
                (w.key(), value)
            })
            .collect();
        let services: Vec<serde_json::Value> = self
            .resources
            .services
            .iter()
            .zip(&self.endpoints)
            .map(|(s, eps)| {
                let endpoints: Vec<String> = eps.iter().map(|&i| self.workloads[i].key()).collect();
                serde_json::json!({ "service": s, "endpoints": endpoints })
            })
            .collect();
        serde_json::json!({
            "generation": self.generation,
            "node": self.resources.node,
            "trustDomain": self.resources.trust_domain,
            "rootNamespace": self.resources.root_namespace,
            "workloads": self.resources.workloads,
            "services": services,
            "policies": self.resources.policies,
            "mtlsModes": modes,
            "l7Authorization": self.resources.l7,
            "http": http,
        })
    }
}

/// Logs what AUDIT and dry-run policies matched in a decision.
fn log_audit(d: &Decision, src_ip: IpAddr, identity: Option<&Identity>, dst: SocketAddr) {
    let peer = identity.map(ToString::to_string).unwrap_or_default();
    for p in &d.audit {
        info!(policy = %p, src = %src_ip, identity = %peer, %dst, "AUDIT policy matched");
    }
    for dr in &d.dry_run {
        info!(
            policy = %dr.policy,
            action = %dr.action,
            rule = ?dr.rule,
            src = %src_ip,
            identity = %peer,
            %dst,
            "dry-run policy evaluated (not enforced)"
        );
    }
}

struct Shared {
    current: ArcSwap<Snapshot>,
    generation: AtomicU64,
    changed: watch::Sender<u64>,
}

/// The shared, atomically replaced snapshot. Cheap to clone.
#[derive(Clone)]
pub struct State {
    shared: Arc<Shared>,
}

impl Default for State {
    fn default() -> Self {
        State::new()
    }
}

impl State {
    /// An empty state: nothing loaded yet (generation 0).
    pub fn new() -> State {
        let (changed, _) = watch::channel(0);
        State {
            shared: Arc::new(Shared {
                current: ArcSwap::from_pointee(Snapshot::default()),
                generation: AtomicU64::new(0),
                changed,
            }),
        }
    }

    /// The current snapshot. Lock-free; hold it for the length of one decision so the
    /// decision sees one consistent view.
    pub fn load(&self) -> Arc<Snapshot> {
        self.shared.current.load_full()
    }

    /// Whether a source has published at least once.
    pub fn is_loaded(&self) -> bool {
        self.shared.current.load().generation > 0
    }

    /// A receiver that sees the generation of each newly published snapshot.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.changed.subscribe()
    }

    /// Replaces the snapshot with one built from `resources`, logs what users must
    /// know about the policies in it, and notifies subscribers.
    pub fn publish(&self, resources: Resources) -> Arc<Snapshot> {
        let generation = self.shared.generation.fetch_add(1, Ordering::Relaxed) + 1;
        for p in &resources.policies {
            for w in p.warnings() {
                warn!(policy = %p.reference(), kind = ?p.reference().kind, "{w}");
            }
        }
        let snap = Arc::new(Snapshot::new(generation, resources));
        for w in snap.local_workloads() {
            for warning in snap.http_warnings(w) {
                warn!(workload = %w.key(), "{warning}");
            }
        }
        self.shared.current.store(snap.clone());
        self.shared.changed.send_replace(generation);
        info!(
            generation,
            workloads = snap.workloads.len(),
            services = snap.resources.services.len(),
            policies = snap.resources.policies.len(),
            "state updated"
        );
        snap
    }
}
