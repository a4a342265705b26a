//! Istio's `security.istio.io` resources as written in YAML, checked and compiled.
//!
//! Values that can be checked on their own (IP blocks, ports, modes, unknown fields)
//! are checked while deserializing, so the YAML parser reports the line and column;
//! the rest is checked in [`Document::compile`], which names the field.

use std::collections::BTreeMap;
use std::fmt;

use ipnet::IpNet;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

use super::authz::{Action, AuthorizationPolicy, Clause, HeaderMatch, Match, Rule, StringMatch};
use super::peer::{MtlsMode, PeerAuthentication};
use super::{DRY_RUN_ANNOTATION, Kind, Labels, Policy, PolicyRef};

const API_VERSIONS: [&str; 2] = ["security.istio.io/v1", "security.istio.io/v1beta1"];

/// A policy document that is valid YAML but not a valid policy.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {problem}")]
pub struct ResourceError {
    /// Where in the document, e.g. `spec.rules[0].when[1].values[0]`.
    pub field: String,
    pub problem: String,
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> ResourceError {
    ResourceError {
        field: field.into(),
        problem: problem.into(),
    }
}

/// One Istio resource, verbatim: `apiVersion`, `kind`, `metadata`, `spec`. Other
/// top-level keys (`status`) and unknown metadata are ignored; unknown `spec` fields
/// are errors, since a misspelt field would silently widen a policy.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Document {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    #[serde(default)]
    spec: Spec,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Metadata {
    pub name: String,
    pub namespace: Option<String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// The union of both kinds' spec fields; [`Document::compile`] rejects the fields of
/// the other kind.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Spec {
    selector: Option<Selector>,
    mtls: Option<MutualTls>,
    port_level_mtls: Option<BTreeMap<Port, MutualTls>>,
    target_ref: Option<serde_yaml::Value>,
    target_refs: Option<Vec<serde_yaml::Value>>,
    action: Option<Action>,
    provider: Option<Provider>,
    rules: Option<Vec<RawRule>>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Selector {
    #[serde(default)]
    match_labels: Labels,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MutualTls {
    #[serde(default)]
    mode: MtlsMode,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Provider {
    name: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(default)]
    from: Vec<From>,
    #[serde(default)]
    to: Vec<To>,
    #[serde(default)]
    when: Vec<Condition>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct From {
    source: Source,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct To {
    operation: Operation,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct Source {
    principals: Vec<String>,
    not_principals: Vec<String>,
    request_principals: Vec<String>,
    not_request_principals: Vec<String>,
    namespaces: Vec<String>,
    not_namespaces: Vec<String>,
    service_accounts: Vec<String>,
    not_service_accounts: Vec<String>,
    ip_blocks: Vec<IpBlock>,
    not_ip_blocks: Vec<IpBlock>,
    remote_ip_blocks: Vec<IpBlock>,
    not_remote_ip_blocks: Vec<IpBlock>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct Operation {
    hosts: Vec<String>,
    not_hosts: Vec<String>,
    ports: Vec<Port>,
    not_ports: Vec<Port>,
    methods: Vec<String>,
    not_methods: Vec<String>,
    paths: Vec<String>,
    not_paths: Vec<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Condition {
    key: String,
    #[serde(default)]
    values: Vec<String>,
    #[serde(default)]
    not_values: Vec<String>,
}

/// A port, written as Istio writes it (`"9090"`) or as a YAML number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
struct Port(u16);

fn parse_port(s: &str) -> Option<u16> {
    s.parse::<u16>().ok().filter(|p| *p != 0)
}

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Port;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number from 1 to 65535")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Port, E> {
                u16::try_from(v)
                    .ok()
                    .filter(|p| *p != 0)
                    .map(Port)
                    .ok_or_else(|| E::custom(format!("port {v} is not in 1..=65535")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Port, E> {
                Err(E::custom(format!("port {v} is not in 1..=65535")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Port, E> {
                parse_port(v)
                    .map(Port)
                    .ok_or_else(|| E::custom(format!("port {v:?} is not a number in 1..=65535")))
            }
        }
        d.deserialize_any(V)
    }
}

/// An IP block: a CIDR or a single address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct IpBlock(IpNet);

fn parse_ip_block(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<std::net::IpAddr>().ok().map(IpNet::from))
}

impl<'de> Deserialize<'de> for IpBlock {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_ip_block(&s)
            .map(IpBlock)
            .ok_or_else(|| de::Error::custom(format!("{s:?} is not an IP address or CIDR")))
    }
}

/// `when` keys that are checked at L4.
const L4_KEYS: [&str; 5] = [
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
];

/// The header name of a `request.headers[NAME]` key.
fn header_key(key: &str) -> Option<&str> {
    key.strip_prefix("request.headers[")?.strip_suffix(']')
}

/// `when` keys Istio defines that this tunnel never evaluates: JWT claims, the remote
/// address behind proxies, the TLS SNI, Envoy filter metadata.
fn is_unsupported_key(key: &str) -> bool {
    const EXACT: [&str; 6] = [
        "remote.ip",
        "request.auth.principal",
        "request.auth.audiences",
        "request.auth.presenter",
        "connection.sni",
        "source.serviceAccount",
    ];
    const PREFIXES: [&str; 2] = ["request.auth.claims[", "experimental.envoy.filters."];
    EXACT.contains(&key) || PREFIXES.iter().any(|p| key.starts_with(p))
}

fn non_empty(field: &str, values: &[String]) -> Result<(), ResourceError> {
    match values.iter().position(|v| v.is_empty()) {
        Some(i) => Err(invalid(format!("{field}[{i}]"), "empty value")),
        None => Ok(()),
    }
}

fn string_matches(field: &str, values: &[String]) -> Result<Vec<StringMatch>, ResourceError> {
    non_empty(field, values)?;
    Ok(values.iter().map(|v| StringMatch::parse(v)).collect())
}

fn service_accounts(
    field: &str,
    values: &[String],
    policy_namespace: &str,
) -> Result<Vec<(String, String)>, ResourceError> {
    non_empty(field, values)?;
    Ok(values
        .iter()
        .map(|v| match v.split_once('/') {
            Some((ns, sa)) => (ns.to_string(), sa.to_string()),
            None => (policy_namespace.to_string(), v.clone()),
        })
        .collect())
}

fn nets(blocks: &[IpBlock]) -> Vec<IpNet> {
    blocks.iter().map(|b| b.0).collect()
}

fn ports(ports: &[Port]) -> Vec<u16> {
    ports.iter().map(|p| p.0).collect()
}

/// The names of the fields in `present` (name, non-empty) that are set.
fn l7_names(prefix: &str, present: &[(&str, bool)]) -> Vec<String> {
    present
        .iter()
        .filter(|(_, set)| *set)
        .map(|(name, _)| format!("{prefix}.{name}"))
        .collect()
}

impl Source {
    fn compile(&self, at: &str, policy_namespace: &str) -> Result<Match, ResourceError> {
        let uses_sa = !self.service_accounts.is_empty() || !self.not_service_accounts.is_empty();
        let uses_id = !self.principals.is_empty()
            || !self.not_principals.is_empty()
            || !self.namespaces.is_empty()
            || !self.not_namespaces.is_empty();
        if uses_sa && uses_id {
            return Err(invalid(
                at,
                "serviceAccounts cannot be combined with principals or namespaces",
            ));
        }
        Ok(Match {
            principals: string_matches(&format!("{at}.principals"), &self.principals)?,
            not_principals: string_matches(&format!("{at}.notPrincipals"), &self.not_principals)?,
            namespaces: string_matches(&format!("{at}.namespaces"), &self.namespaces)?,
            not_namespaces: string_matches(&format!("{at}.notNamespaces"), &self.not_namespaces)?,
            service_accounts: service_accounts(
                &format!("{at}.serviceAccounts"),
                &self.service_accounts,
                policy_namespace,
            )?,
            not_service_accounts: service_accounts(
                &format!("{at}.notServiceAccounts"),
                &self.not_service_accounts,
                policy_namespace,
            )?,
            source_ips: nets(&self.ip_blocks),
            not_source_ips: nets(&self.not_ip_blocks),
            ..Match::default()
        })
    }

    /// The fields this tunnel never evaluates.
    fn unsupported_fields(&self, at: &str) -> Vec<String> {
        l7_names(
            at,
            &[
                ("requestPrincipals", !self.request_principals.is_empty()),
                (
                    "notRequestPrincipals",
                    !self.not_request_principals.is_empty(),
                ),
                ("remoteIpBlocks", !self.remote_ip_blocks.is_empty()),
                ("notRemoteIpBlocks", !self.not_remote_ip_blocks.is_empty()),
            ],
        )
    }
}

fn lower(matches: Vec<StringMatch>) -> Vec<StringMatch> {
    matches
        .into_iter()
        .map(|m| match m {
            StringMatch::Exact(s) => StringMatch::Exact(s.to_ascii_lowercase()),
            StringMatch::Prefix(s) => StringMatch::Prefix(s.to_ascii_lowercase()),
            StringMatch::Suffix(s) => StringMatch::Suffix(s.to_ascii_lowercase()),
            StringMatch::Presence => StringMatch::Presence,
        })
        .collect()
}

impl Operation {
    fn compile(&self, at: &str) -> Result<Match, ResourceError> {
        Ok(Match {
            destination_ports: ports(&self.ports),
            not_destination_ports: ports(&self.not_ports),
            hosts: lower(string_matches(&format!("{at}.hosts"), &self.hosts)?),
            not_hosts: lower(string_matches(&format!("{at}.notHosts"), &self.not_hosts)?),
            methods: string_matches(&format!("{at}.methods"), &self.methods)?,
            not_methods: string_matches(&format!("{at}.notMethods"), &self.not_methods)?,
            paths: string_matches(&format!("{at}.paths"), &self.paths)?,
            not_paths: string_matches(&format!("{at}.notPaths"), &self.not_paths)?,
            ..Match::default()
        })
    }

    /// The fields matched per request.
    fn http_fields(&self, at: &str) -> Vec<String> {
        l7_names(
            at,
            &[
                ("hosts", !self.hosts.is_empty()),
                ("notHosts", !self.not_hosts.is_empty()),
                ("methods", !self.methods.is_empty()),
                ("notMethods", !self.not_methods.is_empty()),
                ("paths", !self.paths.is_empty()),
                ("notPaths", !self.not_paths.is_empty()),
            ],
        )
    }
}

fn parse_values<T>(
    at: &str,
    values: &[String],
    what: &str,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<Vec<T>, ResourceError> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            parse(v).ok_or_else(|| invalid(format!("{at}[{i}]"), format!("{v:?} is not {what}")))
        })
        .collect()
}

impl Condition {
    /// The match of this condition, or `None` for a key this tunnel never evaluates.
    fn compile(&self, at: &str) -> Result<Option<Match>, ResourceError> {
        if self.values.is_empty() && self.not_values.is_empty() {
            return Err(invalid(at, "a condition needs values or notValues"));
        }
        let values = format!("{at}.values");
        let not_values = format!("{at}.notValues");
        let mut m = Match::default();
        match self.key.as_str() {
            "source.ip" | "destination.ip" => {
                let what = "an IP address or CIDR";
                let pos = parse_values(&values, &self.values, what, parse_ip_block)?;
                let neg = parse_values(&not_values, &self.not_values, what, parse_ip_block)?;
                if self.key == "source.ip" {
                    (m.source_ips, m.not_source_ips) = (pos, neg);
                } else {
                    (m.destination_ips, m.not_destination_ips) = (pos, neg);
                }
            }
            "destination.port" => {
                let what = "a port number from 1 to 65535";
                m.destination_ports = parse_values(&values, &self.values, what, parse_port)?;
                m.not_destination_ports =
                    parse_values(&not_values, &self.not_values, what, parse_port)?;
            }
            "source.namespace" => {
                m.namespaces = string_matches(&values, &self.values)?;
                m.not_namespaces = string_matches(&not_values, &self.not_values)?;
            }
            "source.principal" => {
                m.principals = string_matches(&values, &self.values)?;
                m.not_principals = string_matches(&not_values, &self.not_values)?;
            }
            key if header_key(key).is_some() => {
                let name = header_key(key).unwrap_or_default();
                if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                    return Err(invalid(
                        format!("{at}.key"),
                        format!("{name:?} is not a valid HTTP header name"),
                    ));
                }
                m.headers.push(HeaderMatch {
                    name: name.to_ascii_lowercase(),
                    values: string_matches(&values, &self.values)?,
                    not_values: string_matches(&not_values, &self.not_values)?,
                });
            }
            key if is_unsupported_key(key) => return Ok(None),
            key => {
                return Err(invalid(
                    format!("{at}.key"),
                    format!(
                        "unknown key {key:?}; the tunnel checks {} and request.headers[NAME]; Istio's request.auth.*, remote.ip and connection.sni keys are never evaluated",
                        L4_KEYS.join(", ")
                    ),
                ));
            }
        }
        Ok(Some(m))
    }
}

impl RawRule {
    fn compile(&self, at: &str, policy_namespace: &str) -> Result<Rule, ResourceError> {
        let mut rule = Rule::default();
        let mut from = Vec::new();
        for (i, f) in self.from.iter().enumerate() {
            let at = format!("{at}.from[{i}].source");
            let unsupported = f.source.unsupported_fields(&format!("from[{i}].source"));
            let m = f.source.compile(&at, policy_namespace)?;
            if m.is_empty() && unsupported.is_empty() {
                return Err(invalid(at, "a source needs at least one field"));
            }
            rule.unsupported_fields.extend(unsupported);
            from.push(m);
        }
        let mut to = Vec::new();
        for (i, t) in self.to.iter().enumerate() {
            let at = format!("{at}.to[{i}].operation");
            let http = t.operation.http_fields(&format!("to[{i}].operation"));
            let m = t.operation.compile(&at)?;
            if m.is_empty() {
                return Err(invalid(at, "an operation needs at least one field"));
            }
            rule.http_fields.extend(http);
            to.push(m);
        }
        if !from.is_empty() {
            rule.clauses.push(Clause {
                origin: "from".to_string(),
                alternatives: from,
            });
        }
        if !to.is_empty() {
            rule.clauses.push(Clause {
                origin: "to".to_string(),
                alternatives: to,
            });
        }
        for (i, c) in self.when.iter().enumerate() {
            match c.compile(&format!("{at}.when[{i}]"))? {
                Some(m) => {
                    if m.has_http_fields() {
                        rule.http_fields.push(format!("when[{i}].{}", c.key));
                    }
                    rule.clauses.push(Clause {
                        origin: format!("when[{i}] {}", c.key),
                        alternatives: vec![m],
                    });
                }
                None => rule.unsupported_fields.push(format!("when[{i}].{}", c.key)),
            }
        }
        Ok(rule)
    }
}

impl Document {
    /// `Kind namespace/name`, for error messages.
    pub fn describe(&self) -> String {
        format!(
            "{} {}/{}",
            self.kind,
            self.metadata.namespace.as_deref().unwrap_or("?"),
            self.metadata.name
        )
    }

    /// Checks the document and compiles it into a policy.
    pub fn compile(&self) -> Result<Policy, ResourceError> {
        if !API_VERSIONS.contains(&self.api_version.as_str()) {
            return Err(invalid(
                "apiVersion",
                format!(
                    "{:?} is not one of {}",
                    self.api_version,
                    API_VERSIONS.join(", ")
                ),
            ));
        }
        let namespace = self
            .metadata
            .namespace
            .clone()
            .filter(|ns| !ns.is_empty())
            .ok_or_else(|| invalid("metadata.namespace", "required"))?;
        if self.metadata.name.is_empty() {
            return Err(invalid("metadata.name", "required"));
        }
        match self.kind.as_str() {
            "PeerAuthentication" => self.compile_peer(namespace).map(Policy::Peer),
            "AuthorizationPolicy" => self.compile_authz(namespace).map(Policy::Authz),
            other => Err(invalid(
                "kind",
                format!("{other:?} is not PeerAuthentication or AuthorizationPolicy"),
            )),
        }
    }

    fn reject_fields(&self, fields: &[(&str, bool)]) -> Result<(), ResourceError> {
        match fields.iter().find(|(_, set)| *set) {
            Some((name, _)) => Err(invalid(
                format!("spec.{name}"),
                format!("not a field of {}", self.kind),
            )),
            None => Ok(()),
        }
    }

    fn compile_peer(&self, namespace: String) -> Result<PeerAuthentication, ResourceError> {
        let s = &self.spec;
        self.reject_fields(&[
            ("targetRef", s.target_ref.is_some()),
            ("targetRefs", s.target_refs.is_some()),
            ("action", s.action.is_some()),
            ("provider", s.provider.is_some()),
            ("rules", s.rules.is_some()),
        ])?;
        let selector = s
            .selector
            .as_ref()
            .map(|sel| sel.match_labels.clone())
            .filter(|labels| !labels.is_empty());
        let port_level: BTreeMap<u16, MtlsMode> = s
            .port_level_mtls
            .iter()
            .flatten()
            .map(|(port, mtls)| (port.0, mtls.mode))
            .collect();
        if !port_level.is_empty() && selector.is_none() {
            return Err(invalid(
                "spec.portLevelMtls",
                "portLevelMtls requires a workload selector (spec.selector.matchLabels)",
            ));
        }
        Ok(PeerAuthentication {
            reference: PolicyRef {
                kind: Kind::PeerAuthentication,
                namespace,
                name: self.metadata.name.clone(),
            },
            selector,
            mode: s.mtls.as_ref().map(|m| m.mode).unwrap_or_default(),
            port_level,
        })
    }

    fn compile_authz(&self, namespace: String) -> Result<AuthorizationPolicy, ResourceError> {
        let s = &self.spec;
        self.reject_fields(&[
            ("mtls", s.mtls.is_some()),
            ("portLevelMtls", s.port_level_mtls.is_some()),
        ])?;
        let target_refs =
            s.target_ref.is_some() || s.target_refs.as_ref().is_some_and(|t| !t.is_empty());
        if target_refs && s.selector.is_some() {
            return Err(invalid(
                "spec.selector",
                "selector and targetRef/targetRefs cannot be used together",
            ));
        }
        let action = s.action.unwrap_or_default();
        let provider = s.provider.as_ref().map(|p| p.name.clone());
        if action == Action::Custom && provider.is_none() {
            return Err(invalid("spec.provider", "a CUSTOM policy needs a provider"));
        }
        let dry_run = match self.metadata.annotations.get(DRY_RUN_ANNOTATION) {
            None => false,
            Some(v) => v.parse::<bool>().map_err(|_| {
                invalid(
                    format!("metadata.annotations[{DRY_RUN_ANNOTATION}]"),
                    format!("{v:?} is not \"true\" or \"false\""),
                )
            })?,
        };
        let rules = s
            .rules
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, r)| r.compile(&format!("spec.rules[{i}]"), &namespace))
            .collect::<Result<Vec<_>, _>>()?;
        let mut warnings = Vec::new();
        if target_refs {
            warnings.push(
                "targetRef/targetRefs attach this policy to a waypoint, gateway or service; \
                 this tunnel does not enforce it"
                    .to_string(),
            );
        }
        if action == Action::Custom {
            warnings.push(format!(
                "CUSTOM action (provider {}) is not supported; connections to the workloads it \
                 selects are denied (fail closed)",
                provider.as_deref().unwrap_or_default()
            ));
        }
        for (i, rule) in rules.iter().enumerate() {
            if !rule.unsupported_fields.is_empty() {
                let fields = rule.unsupported_fields.join(", ");
                warnings.push(match action {
                    Action::Allow => format!(
                        "rule {i} uses fields [{fields}] that this tunnel never evaluates: this \
                         ALLOW rule never matches (use a waypoint to enforce them)"
                    ),
                    _ => format!(
                        "rule {i} uses fields [{fields}] that this tunnel never evaluates: this \
                         {action} rule ignores them and matches on its other fields only, so it \
                         matches more than it would in a waypoint"
                    ),
                });
            }
            if !rule.http_fields.is_empty() {
                let fields = rule.http_fields.join(", ");
                warnings.push(match action {
                    Action::Allow => format!(
                        "rule {i} uses HTTP fields [{fields}]: checked per request on the HTTP \
                         ports of the workloads it selects; on other ports (or with \
                         l7Authorization: waypoint) this ALLOW rule never matches"
                    ),
                    _ => format!(
                        "rule {i} uses HTTP fields [{fields}]: checked per request on the HTTP \
                         ports of the workloads it selects; on other ports (or with \
                         l7Authorization: waypoint) this {action} rule ignores them and matches \
                         on its other fields only"
                    ),
                });
            }
        }
        Ok(AuthorizationPolicy {
            reference: PolicyRef {
                kind: Kind::AuthorizationPolicy,
                namespace,
                name: self.metadata.name.clone(),
            },
            selector: s.selector.as_ref().map(|sel| sel.match_labels.clone()),
            target_refs,
            action,
            provider,
            rules,
            dry_run,
            warnings,
        })
    }
}
