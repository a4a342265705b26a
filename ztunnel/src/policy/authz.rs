//! L4 AuthorizationPolicy: compiled matchers and the decision for one connection.
//!
//! Istio's rules: CUSTOM first (not supported here: a workload it selects is denied),
//! then any matching DENY denies, then with no ALLOW policy the connection is allowed,
//! otherwise some ALLOW rule must match. Rules OR; inside a rule `from`, `to` and
//! `when` AND; the entries of `from` (or `to`) OR; the fields of one entry AND; the
//! values of a field OR, and a `notX` field matches when no value does. AUDIT and
//! dry-run policies never change the decision; the decision lists what they matched.

use std::borrow::Borrow;
use std::fmt::{self, Write as _};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

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
    /// What differs at L4 from what the policy says (L7 fields, unsupported parts).
    pub warnings: Vec<String>,
}

/// One rule: every clause must match. No clause at all matches everything.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    /// Each clause is a list of alternatives; one of them must match.
    pub clauses: Vec<Clause>,
    /// L7 fields of this rule (`to[0].operation.methods`, `when[1].request.headers`):
    /// an ALLOW rule that has any never matches at L4; other actions had them removed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub l7_fields: Vec<String>,
    /// Set for an ALLOW rule with L7 fields.
    pub never_matches: bool,
}

/// Alternatives from one part of a rule (`from`, `to`, or one `when` condition).
#[derive(Clone, Debug, Serialize)]
pub struct Clause {
    /// `from`, `to` or `when[i]`: where the clause comes from, for explanations.
    pub origin: String,
    pub alternatives: Vec<Match>,
}

/// L4 conditions that must all hold; each present field matches when one of its values
/// does, each `not_` field when none of its values does. No field matches everything.
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

/// What the connection looks like to a matcher.
struct Facts<'a> {
    principal: Option<String>,
    namespace: Option<&'a str>,
    service_account: Option<&'a str>,
    conn: &'a Connection<'a>,
}

impl<'a> Facts<'a> {
    fn new(conn: &'a Connection<'a>) -> Self {
        Facts {
            principal: conn.identity.map(|i| i.principal()),
            namespace: conn.identity.map(|i| i.namespace()),
            service_account: conn.identity.map(|i| i.service_account()),
            conn,
        }
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
    name: &str,
    positive: &[T],
    negative: &[T],
    actual: &str,
    mut pred: impl FnMut(&T) -> bool,
) -> Result<(), String> {
    if !positive.is_empty() && !positive.iter().any(&mut pred) {
        return Err(format!("{name} {} do not include {actual}", list(positive)));
    }
    if let Some(hit) = negative.iter().find(|v| pred(v)) {
        let not = format!("not{}{}", name[..1].to_uppercase(), &name[1..]);
        return Err(format!("{not} excludes {actual} (matches {hit})"));
    }
    Ok(())
}

struct SaPair<'a>(&'a (String, String));

impl fmt::Display for SaPair<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.0.0, self.0.1)
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
            "principals",
            &self.principals,
            &self.not_principals,
            show(principal),
            |m| m.matches(principal),
        )?;
        field(
            "namespaces",
            &self.namespaces,
            &self.not_namespaces,
            show(facts.namespace),
            |m| m.matches(facts.namespace),
        )?;
        let sa = match (facts.namespace, facts.service_account) {
            (Some(ns), Some(sa)) => Some(format!("{ns}/{sa}")),
            _ => None,
        };
        let sas: Vec<SaPair<'_>> = self.service_accounts.iter().map(SaPair).collect();
        let not_sas: Vec<SaPair<'_>> = self.not_service_accounts.iter().map(SaPair).collect();
        field(
            "serviceAccounts",
            &sas,
            &not_sas,
            show(sa.as_deref()),
            |p| facts.namespace == Some(p.0.0.as_str()) && facts.service_account == Some(&p.0.1),
        )?;
        field(
            "ipBlocks",
            &self.source_ips,
            &self.not_source_ips,
            &conn.src_ip.to_string(),
            |n| n.contains(&conn.src_ip),
        )?;
        let dst_ip = conn.dst.ip();
        field(
            "destination ips",
            &self.destination_ips,
            &self.not_destination_ips,
            &dst_ip.to_string(),
            |n| n.contains(&dst_ip),
        )?;
        field(
            "ports",
            &self.destination_ports,
            &self.not_destination_ports,
            &conn.dst.port().to_string(),
            |p| *p == conn.dst.port(),
        )
    }
}

impl Clause {
    fn check(&self, facts: &Facts<'_>) -> Result<(), String> {
        let mut why = Vec::new();
        for (i, alt) in self.alternatives.iter().enumerate() {
            match alt.check(facts) {
                Ok(()) => return Ok(()),
                Err(e) if self.alternatives.len() == 1 => why.push(e),
                Err(e) => why.push(format!("[{i}]: {e}")),
            }
        }
        Err(format!("{}: {}", self.origin, why.join("; ")))
    }
}

impl Rule {
    fn check(&self, facts: &Facts<'_>) -> Result<(), String> {
        if self.never_matches {
            return Err(format!(
                "uses L7 fields {} that cannot be checked at L4, so this ALLOW rule never matches",
                list(&self.l7_fields)
            ));
        }
        self.clauses.iter().try_for_each(|c| c.check(facts))
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

    /// The index of the first matching rule, or why none matched.
    fn first_match(&self, facts: &Facts<'_>) -> Result<usize, String> {
        if self.rules.is_empty() {
            return Err("the policy has no rules, so it matches nothing".to_string());
        }
        let mut why = Vec::new();
        for (i, rule) in self.rules.iter().enumerate() {
            match rule.check(facts) {
                Ok(()) => return Ok(i),
                Err(e) => why.push(format!("rule {i}: {e}")),
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
    pub reason: String,
    /// AUDIT policies that matched (logged, not enforced).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub audit: Vec<PolicyRef>,
    /// Dry-run policies, and the rule of each that matched (logged, not enforced).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dry_run: Vec<DryRunOutcome>,
}

/// Decides a connection against the AuthorizationPolicies that select its destination
/// workload (see [`AuthorizationPolicy::selects`]), in config order.
pub fn authorize<P: Borrow<AuthorizationPolicy>>(
    policies: &[P],
    conn: &Connection<'_>,
) -> Decision {
    let facts = Facts::new(conn);
    let mut audit = Vec::new();
    let mut dry_run = Vec::new();
    for p in policies.iter().map(Borrow::borrow) {
        if p.dry_run {
            dry_run.push(DryRunOutcome {
                policy: p.reference.clone(),
                action: p.action,
                rule: p.first_match(&facts).ok(),
            });
        } else if p.action == Action::Audit && p.first_match(&facts).is_ok() {
            audit.push(p.reference.clone());
        }
    }
    let enforced = || {
        policies
            .iter()
            .map(Borrow::borrow)
            .filter(|p: &&AuthorizationPolicy| !p.dry_run)
    };
    let decision = |allowed, policy: Option<&PolicyRef>, reason| Decision {
        allowed,
        policy: policy.cloned(),
        reason,
        audit: audit.clone(),
        dry_run: dry_run.clone(),
    };
    if let Some(p) = enforced().find(|p| p.action == Action::Custom) {
        return decision(
            false,
            Some(&p.reference),
            format!(
                "CUSTOM policy {} (provider {}) is not supported by this tunnel; denied to fail closed",
                p.reference,
                p.provider.as_deref().unwrap_or("unnamed")
            ),
        );
    }
    for p in enforced().filter(|p| p.action == Action::Deny) {
        if let Ok(rule) = p.first_match(&facts) {
            return decision(
                false,
                Some(&p.reference),
                format!("DENY policy {} rule {rule} matched", p.reference),
            );
        }
    }
    let allows: Vec<&AuthorizationPolicy> =
        enforced().filter(|p| p.action == Action::Allow).collect();
    if allows.is_empty() {
        return decision(
            true,
            None,
            "no ALLOW policy selects the workload and no DENY policy matched".to_string(),
        );
    }
    let mut why = Vec::new();
    for p in &allows {
        match p.first_match(&facts) {
            Ok(rule) => {
                return decision(
                    true,
                    Some(&p.reference),
                    format!("ALLOW policy {} rule {rule} matched", p.reference),
                );
            }
            Err(e) => why.push(format!("{}: {e}", p.reference)),
        }
    }
    // Reported as deciding: the first ALLOW policy (config order) that did not match.
    decision(
        false,
        Some(&allows[0].reference),
        format!(
            "ALLOW policies select the workload but none matched ({})",
            why.join(" | ")
        ),
    )
}
