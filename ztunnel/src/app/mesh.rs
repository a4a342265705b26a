//! The proxy's view of the mesh, answered from the state snapshot.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, PoisonError, RwLock};

use tokio::sync::watch;

use crate::identity::Identity;
use crate::netns::Netns;
use crate::policy::Decision;
use crate::proxy::{LocalWorkload, Mesh, Route, Verdict};
use crate::state::{State, Transport};

/// Answers the proxy from the current snapshot; knows the network namespace of each
/// enrolled pod address so connections for a pod are made from inside it.
#[derive(Clone)]
pub struct StateMesh {
    state: State,
    namespaces: Arc<RwLock<HashMap<IpAddr, Netns>>>,
}

impl StateMesh {
    pub fn new(state: State) -> Self {
        StateMesh {
            state,
            namespaces: Arc::default(),
        }
    }

    /// Connections for `ips` are made from inside `netns` from now on.
    pub fn set_namespace(&self, ips: &[IpAddr], netns: &Netns) {
        let mut namespaces = self
            .namespaces
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        for ip in ips {
            namespaces.insert(*ip, netns.clone());
        }
    }

    pub fn clear_namespace(&self, ips: &[IpAddr]) {
        let mut namespaces = self
            .namespaces
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        for ip in ips {
            namespaces.remove(ip);
        }
    }

    fn namespace(&self, ip: IpAddr) -> Option<Netns> {
        self.namespaces
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&ip)
            .cloned()
    }
}

fn verdict(decision: Decision) -> Verdict {
    let policy = decision.policy.map(|p| p.to_string());
    if decision.allowed {
        Verdict::Allow { policy }
    } else {
        Verdict::Deny {
            policy,
            reason: decision.reason,
        }
    }
}

impl Mesh for StateMesh {
    fn local_workload(&self, ip: IpAddr) -> Option<LocalWorkload> {
        let snapshot = self.state.load();
        let w = snapshot.local_workload(ip)?;
        Some(LocalWorkload {
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            identity: w.identity.clone(),
            ip,
            netns: self.namespace(ip),
        })
    }

    fn route(&self, _source: &LocalWorkload, destination: SocketAddr) -> Route {
        match self.state.load().resolve(destination) {
            Ok(upstream) => match upstream.transport {
                Transport::Hbone {
                    gateway,
                    identities,
                } => Route::Hbone {
                    endpoint: gateway,
                    target: upstream.address,
                    identities,
                    workload: upstream
                        .workload
                        .map(|w| (w.name.clone(), w.namespace.clone())),
                },
                Transport::Plaintext => Route::Passthrough(upstream.address),
            },
            Err(e) => Route::Refuse(e.to_string()),
        }
    }

    fn accepts_plaintext(&self, destination: SocketAddr) -> bool {
        self.state.load().plaintext_allowed(destination)
    }

    fn authorize(
        &self,
        source_ip: IpAddr,
        source: Option<&Identity>,
        destination: SocketAddr,
    ) -> Verdict {
        verdict(self.state.load().authorize(source_ip, source, destination))
    }

    fn reauthorize(
        &self,
        source_ip: IpAddr,
        source: Option<&Identity>,
        destination: SocketAddr,
    ) -> Verdict {
        verdict(self.state.load().decide(source_ip, source, destination))
    }

    fn http_enforced(&self, destination: SocketAddr) -> bool {
        self.state.load().http_enforced(destination)
    }

    fn authorize_request(
        &self,
        source_ip: IpAddr,
        source: Option<&Identity>,
        destination: SocketAddr,
        request: &http::request::Parts,
    ) -> Verdict {
        verdict(
            self.state
                .load()
                .authorize_request(source_ip, source, destination, request),
        )
    }

    fn updates(&self) -> watch::Receiver<u64> {
        self.state.subscribe()
    }
}
