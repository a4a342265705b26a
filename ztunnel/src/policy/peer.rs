//! PeerAuthentication: which mTLS mode applies to a workload and port.
//!
//! Istio's rules: the mesh-wide policy (root namespace, no selector), then the
//! namespace policy (no selector), then the workload policy (selector, same namespace;
//! a selector policy in the root namespace is ignored), then its `portLevelMtls`; each
//! level that is not UNSET overrides the one before; nothing set means PERMISSIVE.
//! Among several policies at one level the oldest wins; callers list policies oldest
//! first (the order of the config file), so the first one wins.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::{Labels, PolicyRef, Target, selector_matches};

/// A PeerAuthentication mutual TLS mode, spelled as Istio spells it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Inherit from the parent level.
    #[default]
    Unset,
    /// Plaintext only (in ambient: plaintext is accepted, HBONE still works).
    Disable,
    /// Both plaintext and mTLS are accepted.
    Permissive,
    /// Only mTLS (HBONE) is accepted.
    Strict,
}

impl fmt::Display for MtlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MtlsMode::Unset => "UNSET",
            MtlsMode::Disable => "DISABLE",
            MtlsMode::Permissive => "PERMISSIVE",
            MtlsMode::Strict => "STRICT",
        })
    }
}

/// A compiled PeerAuthentication.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthentication {
    #[serde(flatten)]
    pub reference: PolicyRef,
    /// `None` for mesh-wide and namespace-wide policies (an empty `matchLabels` counts
    /// as no selector, as in Istio).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<Labels>,
    pub mode: MtlsMode,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub port_level: BTreeMap<u16, MtlsMode>,
}

/// Where an effective mode came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "level", content = "policy", rename_all = "camelCase")]
pub enum ModeSource {
    /// No policy sets a mode: Istio's default, PERMISSIVE.
    Default,
    Mesh(PolicyRef),
    Namespace(PolicyRef),
    Workload(PolicyRef),
    Port(PolicyRef),
}

impl ModeSource {
    /// The policy that set the mode, if any.
    pub fn policy(&self) -> Option<&PolicyRef> {
        match self {
            ModeSource::Default => None,
            ModeSource::Mesh(p)
            | ModeSource::Namespace(p)
            | ModeSource::Workload(p)
            | ModeSource::Port(p) => Some(p),
        }
    }
}

impl fmt::Display for ModeSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModeSource::Default => f.write_str("default: no PeerAuthentication sets a mode"),
            ModeSource::Mesh(p) => write!(f, "mesh-wide PeerAuthentication {p}"),
            ModeSource::Namespace(p) => write!(f, "namespace PeerAuthentication {p}"),
            ModeSource::Workload(p) => write!(f, "workload PeerAuthentication {p}"),
            ModeSource::Port(p) => write!(f, "portLevelMtls of PeerAuthentication {p}"),
        }
    }
}

/// The mode in force for one port of a workload, and where it came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EffectiveMode {
    pub mode: MtlsMode,
    pub source: ModeSource,
}

impl EffectiveMode {
    /// Whether a plaintext (no identity) connection is accepted.
    pub fn accepts_plaintext(&self) -> bool {
        self.mode != MtlsMode::Strict
    }
}

/// The modes in force for a whole workload: one for every port, overridden per port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WorkloadMode {
    #[serde(flatten)]
    pub default: EffectiveMode,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<u16, EffectiveMode>,
}

impl WorkloadMode {
    /// The mode for one destination (target) port.
    pub fn for_port(&self, port: u16) -> &EffectiveMode {
        self.ports.get(&port).unwrap_or(&self.default)
    }

    /// Composes the policies (oldest first) that apply to `target`.
    pub fn compose<'a>(
        policies: impl IntoIterator<Item = &'a PeerAuthentication>,
        root_namespace: &str,
        target: Target<'_>,
    ) -> WorkloadMode {
        let mut mesh = None;
        let mut namespace = None;
        let mut workload = None;
        for p in policies {
            let ns = p.reference.namespace.as_str();
            match &p.selector {
                None if ns == root_namespace => {
                    mesh.get_or_insert(p);
                }
                None if ns == target.namespace => {
                    namespace.get_or_insert(p);
                }
                Some(sel)
                    if ns != root_namespace
                        && ns == target.namespace
                        && selector_matches(sel, target.labels) =>
                {
                    workload.get_or_insert(p);
                }
                _ => {}
            }
        }
        let mut default = EffectiveMode {
            mode: MtlsMode::Permissive,
            source: ModeSource::Default,
        };
        type Level<'p> = (Option<&'p PeerAuthentication>, fn(PolicyRef) -> ModeSource);
        let levels: [Level<'_>; 3] = [
            (mesh, ModeSource::Mesh),
            (namespace, ModeSource::Namespace),
            (workload, ModeSource::Workload),
        ];
        for (policy, source) in levels {
            if let Some(p) = policy
                && p.mode != MtlsMode::Unset
            {
                default = EffectiveMode {
                    mode: p.mode,
                    source: source(p.reference.clone()),
                };
            }
        }
        let ports = workload
            .map(|p| {
                p.port_level
                    .iter()
                    .map(|(&port, &mode)| {
                        let effective = if mode == MtlsMode::Unset {
                            default.clone()
                        } else {
                            EffectiveMode {
                                mode,
                                source: ModeSource::Port(p.reference.clone()),
                            }
                        };
                        (port, effective)
                    })
                    .collect()
            })
            .unwrap_or_default();
        WorkloadMode { default, ports }
    }
}
