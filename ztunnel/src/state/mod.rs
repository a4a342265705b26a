//! What the tunnel knows: workloads, services and policies, as one immutable
//! [`Snapshot`] that discovery replaces atomically and the data path reads without
//! locks.
//!
//! Every discovery source (the local file, the Kubernetes API) produces a full
//! [`Resources`] and hands it to [`State::publish`]; consumers call [`State::load`] for
//! the current snapshot and [`State::subscribe`] to learn that it changed.
//!
//! Re-checking open connections after a change: the proxy keeps, for each open inbound
//! connection, an [`OpenConnection`] and a way to close it. On each change of
//! [`State::subscribe`] it loads the new snapshot and calls [`Snapshot::revalidate`] with
//! its open connections; every connection returned is now denied, and the proxy closes
//! it and logs the [`Decision`] (which names the policy that closed it).

mod workload;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::identity::Identity;
use crate::policy::{
    self, AuthorizationPolicy, Decision, EffectiveMode, Labels, PeerAuthentication, Policy, Target,
    WorkloadMode,
};

pub use workload::{Service, ServicePort, Workload};

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

/// What the proxy remembers about an open inbound connection to re-check it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenConnection {
    pub src_ip: IpAddr,
    /// The peer's identity when it came over HBONE; `None` for plaintext.
    pub identity: Option<Identity>,
    /// The local workload address and target port it was delivered to.
    pub dst: SocketAddr,
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
            let selected = snap
                .authorization_policies
                .iter()
                .filter(|p| p.selects(&snap.resources.root_namespace, w.target()))
                .cloned()
                .collect();
            snap.selected.push(selected);
        }
        snap
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
                reason: format!("no workload owns destination {}", dst.ip()),
                audit: Vec::new(),
                dry_run: Vec::new(),
            };
        };
        let conn = policy::Connection {
            src_ip,
            identity,
            dst,
        };
        policy::evaluate(self.modes[i].for_port(dst.port()), &self.selected[i], &conn)
    }

    /// [`Snapshot::decide`], logging what AUDIT and dry-run policies matched.
    pub fn authorize(
        &self,
        src_ip: IpAddr,
        identity: Option<&Identity>,
        dst: SocketAddr,
    ) -> Decision {
        let d = self.decide(src_ip, identity, dst);
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
        d
    }

    /// The connections among `open` that this snapshot denies, with the decision that
    /// denies each. Pure.
    pub fn revalidate<'a, K>(
        &self,
        open: impl IntoIterator<Item = (K, &'a OpenConnection)>,
    ) -> Vec<(K, Decision)> {
        open.into_iter()
            .filter_map(|(key, c)| {
                let d = self.decide(c.src_ip, c.identity.as_ref(), c.dst);
                (!d.allowed).then_some((key, d))
            })
            .collect()
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
        })
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
