//! AuthorizationPolicy: compiled matchers and the decision for one connection or one
//! HTTP request.
//!
//! Istio's rules: CUSTOM first (not supported here: a workload it selects is denied),
//! then any matching DENY denies, then with no ALLOW policy the connection is allowed,
//! otherwise some ALLOW rule must match. Rules OR; inside a rule `from`, `to` and
//! `when` AND; the entries of `from` (or `to`) OR; the fields of one entry AND; the
//! values of a field OR, and a `notX` field matches when no value does. AUDIT and
//! dry-run policies never change the decision; the decision lists what they matched.
//!
//! Three questions are answered. For a connection ([`Connection::request`] `None`):
//! Istio's ztunnel semantics, where an ALLOW rule with HTTP fields never matches and
//! any other rule ignores them. For one HTTP request (`Some`): the HTTP fields are
//! matched too; only fields the tunnel can never evaluate (request principals, JWT
//! claims, remote IP, SNI) keep the fail-safe handling. Before the requests of a
//! connection to a port whose requests are decided one by one
//! ([`authorize_before_requests`]): only what no request can change (CUSTOM, DENY rules
//! without HTTP fields).

use std::borrow::Borrow;
use std::fmt::{self, Write as _};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::http::Request;
use super::{Connection, Labels, PolicyRef, Target, selector_matches};

/// What a policy does when a rule matches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
    Audit,
    /// Delegation to an external authorizer: not supported, fails closed.
    Custom,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
            Action::Custom => "CUSTOM",
        })
    }
}

/// A compiled AuthorizationPolicy.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicy {
    #[serde(flatten)]
    pub reference: PolicyRef,
    /// `None`: every workload of the namespace (of the mesh, in the root namespace).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<Labels>,
    /// The policy attaches with `targetRef`/`targetRefs` (to a waypoint, gateway or
    /// service): it is enforced by a waypoint, never by this tunnel.
    pub target_refs: bool,
    pub action: Action,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    pub rules: Vec<Rule>,
    pub dry_run: bool,
    /// What differs from what the policy says (HTTP fields, unsupported parts).
    pub warnings: Vec<String>,
}

/// One rule: every clause must match. No clause at all matches everything.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    /// Each clause is a list of alternatives; one of them must match.
    pub clauses: Vec<Clause>,
    /// HTTP fields of this rule (`to[0].operation.methods`, `when[1].request.headers[x]`):
    /// matched per request; for a connection an ALLOW rule that has any never matches
    /// and other actions ignore them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub http_fields: Vec<String>,
    /// Fields the tunnel never evaluates (`from[0].source.requestPrincipals`,
    /// `when[0].request.auth.claims[iss]`): an ALLOW rule that has any never matches;
    /// other actions ignore them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unsupported_fields: Vec<String>,
}

/// Alternatives from one part of a rule (`from`, `to`, or one `when` condition).
#[derive(Clone, Debug, Serialize)]
pub struct Clause {
    /// `from`, `to` or `when[i]`: where the clause comes from, for explanations.
    pub origin: String,
    pub alternatives: Vec<Match>,
}

/// Conditions that must all hold; each present field matches when one of its values
/// does, each `not_` field when none of its values does. No field matches everything.
/// The HTTP fields (hosts, methods, paths, headers) are only checked for a request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Match {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<StringMatch>,
    /// `(namespace, service account)` pairs.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<(String, String)>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<(String, String)>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub source_ips: Vec<IpNet>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_source_ips: Vec<IpNet>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub destination_ips: Vec<IpNet>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ips: Vec<IpNet>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub destination_ports: Vec<u16>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ports: Vec<u16>,
    /// Lower case; a value matches the request's host with or without its port.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<StringMatch>,
    /// Matched against the normalized path, without the query.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<StringMatch>,
    /// `when` conditions on `request.headers[NAME]`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
}

/// A `when` condition on one request header: its values (joined with `,` when the
/// header repeats) must match one of `values` and none of `not_values`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HeaderMatch {
    /// Lower case.
    pub name: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<StringMatch>,
}

/// Istio's string match: `x` exact, `x*` prefix, `*x` suffix, `*` any non-empty value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence,
}

impl StringMatch {
    pub fn parse(value: &str) -> StringMatch {
        if value == "*" {
            StringMatch::Presence
        } else if let Some(suffix) = value.strip_prefix('*') {
            StringMatch::Suffix(suffix.to_string())
        } else if let Some(prefix) = value.strip_suffix('*') {
            StringMatch::Prefix(prefix.to_string())
        } else {
            StringMatch::Exact(value.to_string())
        }
    }

    /// Matches a value; an absent value (no identity) matches nothing.
    pub fn matches(&self, value: Option<&str>) -> bool {
        let Some(v) = value.filter(|v| !v.is_empty()) else {
            return false;
        };
        match self {
            StringMatch::Exact(s) => v == s,
            StringMatch::Prefix(p) => v.starts_with(p.as_str()),
            StringMatch::Suffix(s) => v.ends_with(s.as_str()),
            StringMatch::Presence => true,
        }
    }
}

impl fmt::Display for StringMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StringMatch::Exact(s) => f.write_str(s),
            StringMatch::Prefix(p) => write!(f, "{p}*"),
            StringMatch::Suffix(s) => write!(f, "*{s}"),
            StringMatch::Presence => f.write_str("*"),
        }
    }
}

/// Which question is asked (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Connection,
    BeforeRequests,
    Request,
}

/// What the connection (and request) looks like to a matcher.
struct Facts<'a> {
    principal: Option<String>,
    namespace: Option<&'a str>,
    service_account: Option<&'a str>,
    conn: &'a Connection<'a>,
    stage: Stage,
    request: Option<&'a Request<'a>>,
    /// The request's host in lower case, and without its port.
    host: Option<String>,
    host_without_port: Option<String>,
    /// Whether a mismatch is explained in words; deciding alone needs no words, so the
    /// words are only written for a denial that needs them.
    explain: bool,
}

/// `host` without a trailing `:port` (`[v6]:port` keeps the brackets).
fn strip_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((name, port))
            if !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && (!name.contains(':') || name.ends_with(']')) =>
        {
            name
        }
        _ => host,
    }
}

impl<'a> Facts<'a> {
    fn new(conn: &'a Connection<'a>, explain: bool) -> Self {
        let host = conn
            .request
            .and_then(|r| r.host)
            .map(str::to_ascii_lowercase);
        Facts {
            principal: conn.identity.map(|i| i.principal()),
            namespace: conn.identity.map(|i| i.namespace()),
            service_account: conn.identity.map(|i| i.service_account()),
            conn,
            stage: if conn.request.is_some() {
                Stage::Request
            } else {
                Stage::Connection
            },
            request: conn.request,
            host_without_port: host.as_deref().map(|h| strip_port(h).to_string()),
            host,
            explain,
        }
    }

    /// Why something did not match: written out only when explaining.
    fn why(&self, words: impl FnOnce() -> String) -> String {
        if self.explain { words() } else { String::new() }
    }
}

fn list<T: fmt::Display>(items: &[T]) -> String {
    let mut out = String::from("[");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        let _ = write!(out, "{item}");
    }
    out.push(']');
    out
}

fn show(value: Option<&str>) -> &str {
    value.unwrap_or("(none: plaintext peer)")
}

/// Checks one field: `Err` explains why it did not match.
fn field<T: fmt::Display>(
    facts: &Facts<'_>,
    name: &str,
    positive: &[T],
    negative: &[T],
    actual: &dyn fmt::Display,
    mut pred: impl FnMut(&T) -> bool,
) -> Result<(), String> {
    if !positive.is_empty() && !positive.iter().any(&mut pred) {
        return Err(facts.why(|| format!("{name} {} do not include {actual}", list(positive))));
    }
    if let Some(hit) = negative.iter().find(|v| pred(v)) {
        return Err(facts.why(|| {
            let not = format!("not{}{}", name[..1].to_uppercase(), &name[1..]);
            format!("{not} excludes {actual} (matches {hit})")
        }));
    }
    Ok(())
}

struct SaPair<'a>(&'a (String, String));

impl fmt::Display for SaPair<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.0.0, self.0.1)
    }
}

/// The peer's `namespace/service account`, shown when a serviceAccounts field fails.
struct PeerSa<'a>(Option<&'a str>, Option<&'a str>);

impl fmt::Display for PeerSa<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.0, self.1) {
            (Some(ns), Some(sa)) => write!(f, "{ns}/{sa}"),
            _ => f.write_str(show(None)),
        }
    }
}

impl Match {
    pub fn is_empty(&self) -> bool {
        *self == Match::default()
    }

    fn check(&self, facts: &Facts<'_>) -> Result<(), String> {
        let conn = facts.conn;
        let principal = facts.principal.as_deref();
        field(
            facts,
            "principals",
            &self.principals,
            &self.not_principals,
            &show(principal),
            |m| m.matches(principal),
        )?;
        field(
            facts,
            "namespaces",
            &self.namespaces,
            &self.not_namespaces,
            &show(facts.namespace),
            |m| m.matches(facts.namespace),
        )?;
        if !self.service_accounts.is_empty() || !self.not_service_accounts.is_empty() {
            let sas: Vec<SaPair<'_>> = self.service_accounts.iter().map(SaPair).collect();
            let not_sas: Vec<SaPair<'_>> = self.not_service_accounts.iter().map(SaPair).collect();
            field(
                facts,
                "serviceAccounts",
                &sas,
                &not_sas,
                &PeerSa(facts.namespace, facts.service_account),
                |p| {
                    facts.namespace == Some(p.0.0.as_str()) && facts.service_account == Some(&p.0.1)
                },
            )?;
        }
        field(
            facts,
            "ipBlocks",
            &self.source_ips,
            &self.not_source_ips,
            &conn.src_ip,
            |n| n.contains(&conn.src_ip),
        )?;
        let dst_ip = conn.dst.ip();
        field(
            facts,
            "destination ips",
            &self.destination_ips,
            &self.not_destination_ips,
            &dst_ip,
            |n| n.contains(&dst_ip),
        )?;
        field(
            facts,
            "ports",
            &self.destination_ports,
            &self.not_destination_ports,
            &conn.dst.port(),
            |p| *p == conn.dst.port(),
        )?;
        match facts.request {
            Some(request) => self.check_request(facts, request),
            None => Ok(()),
        }
    }

    /// Whether this match has a field only a request can satisfy.
    pub fn has_http_fields(&self) -> bool {
        !(self.hosts.is_empty()
            && self.not_hosts.is_empty()
            && self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty()
            && self.headers.is_empty())
    }

    fn check_request(&self, facts: &Facts<'_>, request: &Request<'_>) -> Result<(), String> {
        field(
            facts,
            "methods",
            &self.methods,
            &self.not_methods,
            &request.method,
            |m| m.matches(Some(request.method)),
        )?;
        field(
            facts,
            "paths",
            &self.paths,
            &self.not_paths,
            &request.path,
            |m| m.matches(Some(request.path)),
        )?;
        let host = facts.host.as_deref();
        let bare = facts.host_without_port.as_deref();
        field(
            facts,
            "hosts",
            &self.hosts,
            &self.not_hosts,
            &show_absent(host, "(no host)"),
            |m| m.matches(host) || m.matches(bare),
        )?;
        for h in &self.headers {
            let value = request.header(&h.name);
            let value = value.as_deref();
            let shown = show_absent(value, "(absent)");
            let name = format!("request.headers[{}] values", h.name);
            if !h.values.is_empty() && !h.values.iter().any(|m| m.matches(value)) {
                return Err(
                    facts.why(|| format!("{name} {} do not include {shown}", list(&h.values)))
                );
            }
            if let Some(hit) = h.not_values.iter().find(|m| m.matches(value)) {
                return Err(facts.why(|| {
                    format!(
                        "request.headers[{}] notValues exclude {shown} (matches {hit})",
                        h.name
                    )
                }));
            }
        }
        Ok(())
    }
}

fn show_absent<'a>(value: Option<&'a str>, absent: &'a str) -> &'a str {
    value.unwrap_or(absent)
}

impl Clause {
    fn check(&self, facts: &Facts<'_>) -> Result<(), String> {
        let mut why = Vec::new();
        for (i, alt) in self.alternatives.iter().enumerate() {
            match alt.check(facts) {
                Ok(()) => return Ok(()),
                Err(e) if self.alternatives.len() == 1 => why.push(e),
                Err(e) => why.push(facts.why(|| format!("[{i}]: {e}"))),
            }
        }
        Err(facts.why(|| format!("{}: {}", self.origin, why.join("; "))))
    }
}

impl Rule {
    fn check(&self, facts: &Facts<'_>, action: Action) -> Result<(), String> {
        if action == Action::Allow {
            if !self.unsupported_fields.is_empty() {
                return Err(facts.why(|| {
                    format!(
                        "uses fields {} that this tunnel never evaluates, so this ALLOW rule never matches",
                        list(&self.unsupported_fields)
                    )
                }));
            }
            if facts.stage == Stage::Connection && !self.http_fields.is_empty() {
                return Err(facts.why(|| {
                    format!(
                        "uses HTTP fields {} that are not checked on this port, so this ALLOW rule never matches",
                        list(&self.http_fields)
                    )
                }));
            }
        }
        if facts.stage == Stage::BeforeRequests && !self.http_fields.is_empty() {
            return Err(facts.why(|| "decided per request".to_string()));
        }
        self.clauses.iter().try_for_each(|c| c.check(facts))
    }

    /// Whether this rule has fields only a request can satisfy.
    pub fn has_http_fields(&self) -> bool {
        !self.http_fields.is_empty()
    }
}

impl AuthorizationPolicy {
    /// Whether this policy applies to the workload: a policy in the root namespace
    /// applies mesh-wide (its selector, if any, picks workloads in every namespace);
    /// elsewhere it applies to its own namespace. `targetRefs` policies are for
    /// waypoints and never apply here.
    pub fn selects(&self, root_namespace: &str, target: Target<'_>) -> bool {
        if self.target_refs {
            return false;
        }
        let ns = self.reference.namespace.as_str();
        if ns != root_namespace && ns != target.namespace {
            return false;
        }
        self.selector
            .as_ref()
            .is_none_or(|s| selector_matches(s, target.labels))
    }

    /// Whether some rule has fields only a request can satisfy.
    pub fn has_http_rules(&self) -> bool {
        self.rules.iter().any(Rule::has_http_fields)
    }

    /// The index of the first matching rule, or why none matched.
    fn first_match(&self, facts: &Facts<'_>) -> Result<usize, String> {
        if self.rules.is_empty() {
            return Err(facts.why(|| "the policy has no rules, so it matches nothing".to_string()));
        }
        let mut why = Vec::new();
        for (i, rule) in self.rules.iter().enumerate() {
            match rule.check(facts, self.action) {
                Ok(()) => return Ok(i),
                Err(e) if facts.explain => why.push(format!("rule {i}: {e}")),
                Err(_) => {}
            }
        }
        Err(why.join("; "))
    }
}

/// What a dry-run policy would have done.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DryRunOutcome {
    pub policy: PolicyRef,
    pub action: Action,
    /// The rule that matched, if one did.
    pub rule: Option<usize>,
}

/// The verdict for one connection, and what decided it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub allowed: bool,
    /// The policy that decided; `None` when no policy did (allowed by default).
    pub policy: Option<PolicyRef>,
    /// The rule of `policy` that matched, when one did (an ALLOW or DENY rule).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<usize>,
    pub reason: String,
    /// AUDIT policies that matched (logged, not enforced).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub audit: Vec<PolicyRef>,
    /// Dry-run policies, and the rule of each that matched (logged, not enforced).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dry_run: Vec<DryRunOutcome>,
}

/// Decides a connection (or, with [`Connection::request`], one request) against the
/// AuthorizationPolicies that select its destination workload (see
/// [`AuthorizationPolicy::selects`]), in config order.
pub fn authorize<P: Borrow<AuthorizationPolicy>>(
    policies: &[P],
    conn: &Connection<'_>,
) -> Decision {
    decide(policies, &Facts::new(conn, false))
}

/// Decides what does not depend on the requests of a connection whose requests are
/// then decided one by one: a CUSTOM policy, and DENY rules without HTTP fields. Every
/// request is decided again with [`authorize`]; AUDIT and dry-run policies are
/// reported there.
pub fn authorize_before_requests<P: Borrow<AuthorizationPolicy>>(
    policies: &[P],
    conn: &Connection<'_>,
) -> Decision {
    let mut facts = Facts::new(conn, false);
    facts.stage = Stage::BeforeRequests;
    facts.request = None;
    decide(policies, &facts)
}

/// `GET /path` of the request being decided, or nothing for a connection.
fn request_words(facts: &Facts<'_>) -> String {
    facts
        .request
        .map(|r| format!(" for {} {}", r.method, r.path))
        .unwrap_or_default()
}

fn decide<P: Borrow<AuthorizationPolicy>>(policies: &[P], facts: &Facts<'_>) -> Decision {
    let conn = facts.conn;
    let before_requests = facts.stage == Stage::BeforeRequests;
    let mut audit = Vec::new();
    let mut dry_run = Vec::new();
    for p in policies
        .iter()
        .map(Borrow::borrow)
        .filter(|_| !before_requests)
    {
        if p.dry_run {
            dry_run.push(DryRunOutcome {
                policy: p.reference.clone(),
                action: p.action,
                rule: p.first_match(facts).ok(),
            });
        } else if p.action == Action::Audit && p.first_match(facts).is_ok() {
            audit.push(p.reference.clone());
        }
    }
    let enforced = || {
        policies
            .iter()
            .map(Borrow::borrow)
            .filter(|p: &&AuthorizationPolicy| !p.dry_run)
    };
    let decision = |allowed, policy: Option<&PolicyRef>, rule, reason| Decision {
        allowed,
        policy: policy.cloned(),
        rule,
        reason,
        audit: audit.clone(),
        dry_run: dry_run.clone(),
    };
    if let Some(p) = enforced().find(|p| p.action == Action::Custom) {
        return decision(
            false,
            Some(&p.reference),
            None,
            format!(
                "CUSTOM policy {} (provider {}) is not supported by this tunnel; denied to fail closed",
                p.reference,
                p.provider.as_deref().unwrap_or("unnamed")
            ),
        );
    }
    for p in enforced().filter(|p| p.action == Action::Deny) {
        if let Ok(rule) = p.first_match(facts) {
            return decision(
                false,
                Some(&p.reference),
                Some(rule),
                format!(
                    "DENY policy {} rule {rule} matched{}",
                    p.reference,
                    request_words(facts)
                ),
            );
        }
    }
    if before_requests {
        return decision(
            true,
            None,
            None,
            "no DENY rule without HTTP fields matched; each request is decided on its own"
                .to_string(),
        );
    }
    let is_allow = |p: &&AuthorizationPolicy| p.action == Action::Allow;
    let Some(first_allow) = enforced().find(is_allow) else {
        return decision(
            true,
            None,
            None,
            "no ALLOW policy selects the workload and no DENY policy matched".to_string(),
        );
    };
    for p in enforced().filter(is_allow) {
        if let Ok(rule) = p.first_match(facts) {
            return decision(
                true,
                Some(&p.reference),
                Some(rule),
                format!(
                    "ALLOW policy {} rule {rule} matched{}",
                    p.reference,
                    request_words(facts)
                ),
            );
        }
    }
    // Denied: now say why each ALLOW policy did not match.
    let explain = Facts::new(conn, true);
    let why: Vec<String> = enforced()
        .filter(is_allow)
        .map(|p| {
            let e = p.first_match(&explain).err().unwrap_or_default();
            format!("{}: {e}", p.reference)
        })
        .collect();
    // Reported as deciding: the first ALLOW policy (config order).
    decision(
        false,
        Some(&first_allow.reference),
        None,
        format!(
            "ALLOW policies select the workload but none matched{} ({})",
            request_words(facts),
            why.join(" | ")
        ),
    )
}
