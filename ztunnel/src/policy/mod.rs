//! Istio PeerAuthentication and AuthorizationPolicy: the resources as Istio writes them
//! (`security.istio.io/v1` and `v1beta1`), compiled into matchers, and evaluated for a
//! connection or for one HTTP request.
//!
//! Everything here is pure: data in, decision out. No I/O, no logging, no clocks; the
//! caller (`state`) selects the workload and logs what the decision carries.

mod authz;
mod http;
mod peer;
mod resource;

#[cfg(test)]
mod tests;

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::Serialize;

use crate::identity::Identity;

pub use authz::{
    Action, AuthorizationPolicy, Decision, DryRunOutcome, HeaderMatch, Match, Rule, StringMatch,
    authorize, authorize_before_requests,
};
pub use http::{PathError, PathNormalization, Request, normalize_path, path_and_host};
pub use peer::{EffectiveMode, ModeSource, MtlsMode, PeerAuthentication, WorkloadMode};
pub use resource::{Document, ResourceError};

/// Kubernetes labels, and the `matchLabels` of a selector.
pub type Labels = BTreeMap<String, String>;

/// The annotation that turns an AuthorizationPolicy into a dry run: evaluated and
/// logged, never enforced.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// Which kind of Istio resource a policy is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Kind {
    PeerAuthentication,
    AuthorizationPolicy,
}

/// Names one policy: its kind, namespace and name. Displays as `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct PolicyRef {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One compiled Istio policy.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum Policy {
    Peer(PeerAuthentication),
    Authz(AuthorizationPolicy),
}

impl Policy {
    pub fn reference(&self) -> &PolicyRef {
        match self {
            Policy::Peer(p) => &p.reference,
            Policy::Authz(p) => &p.reference,
        }
    }

    /// What a user should know about how this policy is enforced by the tunnel.
    pub fn warnings(&self) -> &[String] {
        match self {
            Policy::Peer(_) => &[],
            Policy::Authz(p) => &p.warnings,
        }
    }
}

/// The destination workload as policies see it: where it lives and its labels.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    pub namespace: &'a str,
    pub labels: &'a Labels,
}

/// One connection as authorization sees it: the peer's address and (when it came
/// over mTLS) its identity, and the destination address with the target port.
#[derive(Clone, Copy, Debug)]
pub struct Connection<'a> {
    pub src_ip: IpAddr,
    pub identity: Option<&'a Identity>,
    pub dst: SocketAddr,
    /// The HTTP request decided on this connection; `None` decides the connection
    /// itself, with Istio's ztunnel handling of HTTP fields.
    pub request: Option<&'a Request<'a>>,
}

/// True when every label of `selector` is on the workload with the same value.
pub fn selector_matches(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Decides one connection to one workload: PeerAuthentication first (STRICT refuses a
/// peer without identity, as Istio turns STRICT into "deny when no principal"), then
/// the AuthorizationPolicies that select the workload.
pub fn evaluate<P: Borrow<AuthorizationPolicy>>(
    mode: &EffectiveMode,
    policies: &[P],
    conn: &Connection<'_>,
) -> Decision {
    strict(mode, conn).unwrap_or_else(|| authorize(policies, conn))
}

/// [`evaluate`] for a connection whose requests are then decided one by one: STRICT,
/// then only what no request can change (see [`authorize_before_requests`]).
pub fn evaluate_before_requests<P: Borrow<AuthorizationPolicy>>(
    mode: &EffectiveMode,
    policies: &[P],
    conn: &Connection<'_>,
) -> Decision {
    strict(mode, conn).unwrap_or_else(|| authorize_before_requests(policies, conn))
}

/// The refusal of a peer without identity under STRICT.
fn strict(mode: &EffectiveMode, conn: &Connection<'_>) -> Option<Decision> {
    if conn.identity.is_none() && mode.mode == MtlsMode::Strict {
        return Some(Decision {
            allowed: false,
            policy: mode.source.policy().cloned(),
            rule: None,
            reason: format!(
                "plaintext refused: mTLS mode STRICT for port {} ({})",
                conn.dst.port(),
                mode.source
            ),
            audit: Vec::new(),
            dry_run: Vec::new(),
        });
    }
    None
}
