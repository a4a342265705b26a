//! `ztunnel check`: explains, without sending traffic, what the mesh would do with a
//! connection: HBONE or plaintext, the identities involved, the effective mTLS mode and
//! where it comes from, and which policy allows or denies it and why. With
//! `--method`, `--path`, `--host` or `--header`, it decides one HTTP request on that
//! connection as the destination tunnel would: the policy and rule that decide it, or
//! the field of each rule that failed.
//!
//! Exit status: 0 allowed, 1 refused, 2 bad input.

use std::fmt::Write as _;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use serde::Serialize;

use crate::config;
use crate::identity::Identity;
use crate::policy::{Decision, MtlsMode, PathNormalization};
use crate::state::{
    HTTP_PORTS_ANNOTATION, L7Authorization, Snapshot, Transport, Upstream, Workload,
};

/// Exit status: the connection would be allowed.
pub const ALLOWED: u8 = 0;
/// Exit status: the connection would be refused.
pub const REFUSED: u8 = 1;
/// Exit status: the question could not be answered (bad config, unknown workload).
pub const BAD_INPUT: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::Error),
    #[error("no workload {0} in the config (expected namespace/name)")]
    UnknownWorkload(WorkloadName),
    #[error("{0:?} is not a workload name of the form namespace/name")]
    BadWorkloadName(String),
    #[error("no source: give --from NAMESPACE/NAME or --from-ip IP")]
    NoSource,
    #[error("workload {workload} has no IP address")]
    NoAddress { workload: String },
    #[error("cannot write the verdict: {0}")]
    Output(#[from] std::io::Error),
    #[error("cannot encode the verdict as JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("--header {0:?}: expected NAME=VALUE with a valid header name and value")]
    BadHeader(String),
    #[error("--method {0:?}: not an HTTP method")]
    BadMethod(String),
    #[error("--path {path:?}: not a request target: {problem}")]
    BadPath { path: String, problem: String },
    #[error("--host {0:?}: not a valid Host header value")]
    BadHost(String),
}

/// One `--header NAME=VALUE`.
#[derive(Clone, Debug)]
pub struct Header {
    pub name: http::HeaderName,
    pub value: http::HeaderValue,
}

impl FromStr for Header {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || Error::BadHeader(s.to_string());
        let (name, value) = s.split_once('=').ok_or_else(bad)?;
        Ok(Header {
            name: name.trim().parse().map_err(|_| bad())?,
            value: value.trim().parse().map_err(|_| bad())?,
        })
    }
}

/// `--method` as given (checked when the request is built, so that the error names it).
#[derive(Clone, Debug)]
pub struct MethodArg(pub http::Method);

impl FromStr for MethodArg {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        http::Method::from_bytes(s.as_bytes())
            .map(MethodArg)
            .map_err(|_| Error::BadMethod(s.to_string()))
    }
}

/// `namespace/name` of a workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadName {
    pub namespace: String,
    pub name: String,
}

impl FromStr for WorkloadName {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(WorkloadName {
                    namespace: ns.to_string(),
                    name: name.to_string(),
                })
            }
            _ => Err(Error::BadWorkloadName(s.to_string())),
        }
    }
}

impl std::fmt::Display for WorkloadName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The arguments of `ztunnel check`.
#[derive(Clone, Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["from", "from_ip"])))]
pub struct Args {
    /// The local config file describing the mesh.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// The source workload, as namespace/name.
    #[arg(long, value_name = "NAMESPACE/NAME")]
    pub from: Option<WorkloadName>,
    /// The source address: a workload's address stands for that workload; any other
    /// address is a source outside the mesh (plaintext, no identity).
    #[arg(long, value_name = "IP")]
    pub from_ip: Option<IpAddr>,
    /// The original destination: a workload IP or a service VIP, and a port.
    #[arg(long, value_name = "IP:PORT")]
    pub to: SocketAddr,
    /// Decide one HTTP request on the connection: its method (default GET when another
    /// request flag is given).
    #[arg(long, value_name = "METHOD")]
    pub method: Option<MethodArg>,
    /// The request's path, as sent (query included; normalized as the tunnel does
    /// before matching). Default `/`.
    #[arg(long, value_name = "PATH")]
    pub path: Option<String>,
    /// The request's `Host` (`:authority`), with or without a port.
    #[arg(long, value_name = "HOST")]
    pub host: Option<String>,
    /// A request header, for `when` keys `request.headers[NAME]`; repeat it for more
    /// headers (a repeated name is matched as its values joined with `,`).
    #[arg(long = "header", value_name = "NAME=VALUE")]
    pub headers: Vec<Header>,
    /// Print the verdict as one JSON object.
    #[arg(long)]
    pub json: bool,
}

impl Args {
    /// The HTTP request the flags describe, or `None` when none was given.
    pub fn request(&self) -> Result<Option<http::request::Parts>, Error> {
        if self.method.is_none()
            && self.path.is_none()
            && self.host.is_none()
            && self.headers.is_empty()
        {
            return Ok(None);
        }
        let method = self
            .method
            .as_ref()
            .map_or(http::Method::GET, |m| m.0.clone());
        let path = self.path.as_deref().unwrap_or("/");
        let bad_path = |problem: String| Error::BadPath {
            path: path.to_string(),
            problem,
        };
        let uri: http::Uri = path
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad_path(e.to_string()))?;
        if uri.scheme().is_some() || uri.authority().is_some() {
            return Err(bad_path(
                "give the path alone (origin form, starting with /); the host goes in --host"
                    .to_string(),
            ));
        }
        let mut builder = http::Request::builder().method(method).uri(uri);
        if let Some(host) = &self.host {
            let value: http::HeaderValue =
                host.parse().map_err(|_| Error::BadHost(host.clone()))?;
            builder = builder.header(http::header::HOST, value);
        }
        for h in &self.headers {
            builder = builder.header(h.name.clone(), h.value.clone());
        }
        let request = builder.body(()).map_err(|e| bad_path(e.to_string()))?;
        Ok(Some(request.into_parts().0))
    }
}

/// The HTTP request `check` decided, and how.
#[derive(Clone, Debug, Serialize)]
pub struct RequestVerdict {
    pub method: String,
    /// The path as given.
    pub path: String,
    /// The path the policies match (`None` when it cannot be normalized: denied).
    pub normalized_path: Option<String>,
    /// The normalization in force (`pathNormalization`).
    pub path_normalization: PathNormalization,
    pub host: Option<String>,
    /// The headers given, as `name: value`.
    pub headers: Vec<String>,
    /// Whether the destination tunnel decides this request on its own (an HTTP port of
    /// a workload selected by HTTP rules, `l7Authorization: tunnel`); if not, the
    /// request gets the connection's verdict, and why is in `why_not_per_request`.
    pub decided_per_request: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why_not_per_request: Option<String>,
}

/// Where the connection comes from.
#[derive(Clone, Debug)]
pub enum From {
    Workload(WorkloadName),
    Ip(IpAddr),
}

/// One endpoint of a service and its verdict.
#[derive(Clone, Debug, Serialize)]
pub struct EndpointVerdict {
    pub workload: String,
    pub address: SocketAddr,
    pub allowed: bool,
    pub policy: Option<String>,
}

/// The answer, as printed (`--json` prints it as is).
#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    pub allowed: bool,
    /// `hbone` or `plaintext`.
    pub transport: &'static str,
    /// The effective mTLS mode at the destination: STRICT, PERMISSIVE or DISABLE.
    pub mode: MtlsMode,
    /// Where the mode comes from.
    pub mode_source: String,
    /// The source workload (`namespace/name`), or `None` outside the mesh's workloads.
    pub source: Option<String>,
    pub source_ip: IpAddr,
    /// The identity the destination sees (only over HBONE).
    pub source_identity: Option<String>,
    /// The destination workload (`namespace/name`), if the address belongs to one.
    pub destination: Option<String>,
    /// The service (`namespace/name`) when the destination is a service VIP.
    pub service: Option<String>,
    /// Where the connection is delivered: the endpoint IP and target port.
    pub destination_address: SocketAddr,
    pub destination_identity: Option<String>,
    /// What the source's tunnel requires the server certificate to carry (HBONE only).
    pub expected_identities: Vec<String>,
    /// The deciding policy as `namespace/name`, or `None` when none decided.
    pub policy: Option<String>,
    /// The rule of that policy that matched (ALLOW or DENY), when one did.
    pub rule: Option<usize>,
    pub reason: String,
    /// The HTTP request decided, when one was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request: Option<RequestVerdict>,
    /// How the policies that select the destination differ at L4 from what they say.
    pub warnings: Vec<String>,
    /// AUDIT and dry-run policies that matched (logged, not enforced).
    pub notes: Vec<String>,
    /// For a service: the verdict for each healthy endpoint (the top-level verdict is
    /// the first refused endpoint's, else the first endpoint's).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<EndpointVerdict>,
}

struct Source<'a> {
    workload: Option<&'a Arc<Workload>>,
    ip: IpAddr,
}

impl Source<'_> {
    fn meshed(&self) -> bool {
        self.workload.is_some_and(|w| w.meshed)
    }

    fn identity(&self) -> Option<&Identity> {
        self.workload.filter(|w| w.meshed).map(|w| &w.identity)
    }
}

/// Answers the question against a snapshot: for the connection, or for one HTTP
/// `request` on it.
pub fn explain(
    snapshot: &Snapshot,
    from: &From,
    to: SocketAddr,
    request: Option<&http::request::Parts>,
) -> Result<Verdict, Error> {
    let source = match from {
        From::Workload(name) => {
            let w = snapshot
                .workload(&name.namespace, &name.name)
                .ok_or_else(|| Error::UnknownWorkload(name.clone()))?;
            if w.ips.is_empty() {
                return Err(Error::NoAddress { workload: w.key() });
            }
            Source {
                workload: Some(w),
                ip: w.address_like(to.ip()),
            }
        }
        From::Ip(ip) => Source {
            workload: snapshot.workload_by_ip(*ip),
            ip: *ip,
        },
    };
    let upstreams = match snapshot.service_upstreams(to) {
        Ok(Some(ups)) => ups,
        Ok(None) => match snapshot.resolve(to) {
            Ok(up) => vec![up],
            Err(e) => return Ok(unreachable_service(&source, to, e.to_string())),
        },
        Err(e) => return Ok(unreachable_service(&source, to, e.to_string())),
    };
    let verdicts: Vec<Verdict> = upstreams
        .iter()
        .map(|up| verdict(snapshot, &source, up, request))
        .collect();
    let endpoints = if upstreams.first().is_some_and(|u| u.service.is_some()) {
        verdicts
            .iter()
            .map(|v| EndpointVerdict {
                workload: v.destination.clone().unwrap_or_default(),
                address: v.destination_address,
                allowed: v.allowed,
                policy: v.policy.clone(),
            })
            .collect()
    } else {
        Vec::new()
    };
    let chosen = verdicts.iter().position(|v| !v.allowed).unwrap_or(0);
    let mut top = verdicts
        .into_iter()
        .nth(chosen)
        .unwrap_or_else(|| unreachable_service(&source, to, "no endpoint".to_string()));
    top.endpoints = endpoints;
    Ok(top)
}

fn base(source: &Source<'_>, address: SocketAddr) -> Verdict {
    Verdict {
        allowed: true,
        transport: "plaintext",
        mode: MtlsMode::Disable,
        mode_source: String::new(),
        source: source.workload.map(|w| w.key()),
        source_ip: source.ip,
        source_identity: None,
        destination: None,
        service: None,
        destination_address: address,
        destination_identity: None,
        expected_identities: Vec::new(),
        policy: None,
        rule: None,
        reason: String::new(),
        request: None,
        warnings: Vec::new(),
        notes: Vec::new(),
        endpoints: Vec::new(),
    }
}

fn unreachable_service(source: &Source<'_>, to: SocketAddr, why: String) -> Verdict {
    Verdict {
        allowed: false,
        mode_source: "no destination workload".to_string(),
        reason: format!("refused: {why}"),
        ..base(source, to)
    }
}

fn verdict(
    snapshot: &Snapshot,
    source: &Source<'_>,
    up: &Upstream,
    request: Option<&http::request::Parts>,
) -> Verdict {
    let mut v = base(source, up.address);
    v.service.clone_from(&up.service);
    let outside = "the destination is outside the mesh: nothing decides requests there";
    v.request = request.map(|r| request_verdict(snapshot, r, Some(outside)));
    let Some(dst) = &up.workload else {
        v.mode_source = "destination is outside the mesh: nothing enforces mTLS there".to_string();
        v.reason = "passed through as plaintext to an address outside the mesh".to_string();
        return v;
    };
    v.destination = Some(dst.key());
    v.destination_identity = Some(dst.identity.to_string());
    if !dst.meshed {
        let outside = "the destination is not in the mesh: nothing decides requests there";
        v.request = request.map(|r| request_verdict(snapshot, r, Some(outside)));
        v.mode_source =
            "destination is not in the mesh: nothing enforces mTLS or policy there".to_string();
        v.reason = "passed through as plaintext to a workload outside the mesh".to_string();
        return v;
    }
    let hbone = source.meshed();
    let identity = if hbone { source.identity() } else { None };
    if let (true, Transport::Hbone { identities, .. }) = (hbone, &up.transport) {
        v.transport = "hbone";
        v.expected_identities = identities.iter().map(ToString::to_string).collect();
    }
    v.source_identity = identity.map(ToString::to_string);
    let mode = snapshot.workload_mode(dst);
    let effective = mode.for_port(up.address.port());
    v.mode = effective.mode;
    v.mode_source = effective.source.to_string();
    let mut decision: Decision = snapshot.decide(source.ip, identity, up.address);
    if let Some(r) = request {
        let why_not = why_not_per_request(snapshot, dst, up.address);
        if why_not.is_none() && decision.allowed {
            decision = snapshot.decide_request(source.ip, identity, up.address, r);
        }
        v.request = Some(request_verdict(snapshot, r, why_not.as_deref()));
    }
    v.allowed = decision.allowed;
    v.policy = decision.policy.as_ref().map(ToString::to_string);
    v.rule = decision.rule;
    v.reason = decision.reason;
    if !hbone {
        v.reason = format!(
            "{} (the source is not in the mesh, so it arrives as plaintext{})",
            v.reason,
            if v.allowed { "" } else { " with no identity" }
        );
    }
    v.notes = decision
        .audit
        .iter()
        .map(|p| format!("AUDIT policy {p} matched"))
        .chain(decision.dry_run.iter().map(|d| match d.rule {
            Some(r) => format!(
                "dry-run {} policy {} would match (rule {r})",
                d.action, d.policy
            ),
            None => format!("dry-run {} policy {} would not match", d.action, d.policy),
        }))
        .collect();
    v.warnings = snapshot
        .policies_for(dst.target())
        .iter()
        .flat_map(|p| {
            p.warnings
                .iter()
                .map(move |w| format!("policy {}: {w}", p.reference))
        })
        .collect();
    v
}

/// Why requests to `dst` get the connection's verdict instead of their own, or `None`
/// when the destination tunnel decides each.
fn why_not_per_request(snapshot: &Snapshot, w: &Workload, dst: SocketAddr) -> Option<String> {
    if snapshot.http_enforced(dst) {
        return None;
    }
    Some(
        if snapshot.l7().authorization == L7Authorization::Waypoint {
            "l7Authorization is waypoint: HTTP rules are left to Istio waypoints, and the request \
         gets the connection's verdict (HTTP fields with Istio ztunnel's L4 handling)"
                .to_string()
        } else if snapshot.http_port(dst).is_none() {
            format!(
                "port {} of {} does not speak HTTP (declare it with httpPorts, the \
             {HTTP_PORTS_ANNOTATION} annotation or a service port's appProtocol or name): \
             the request gets the connection's verdict (HTTP fields with the L4 handling)",
                dst.port(),
                w.key()
            )
        } else {
            format!(
                "no policy selecting {} has HTTP rules: every request on the connection gets \
             its verdict",
                w.key()
            )
        },
    )
}

fn request_verdict(
    snapshot: &Snapshot,
    r: &http::request::Parts,
    why_not: Option<&str>,
) -> RequestVerdict {
    let path = r
        .uri
        .path_and_query()
        .map_or_else(|| r.uri.path().to_string(), ToString::to_string);
    let mode = snapshot.l7().path_normalization;
    RequestVerdict {
        method: r.method.to_string(),
        normalized_path: crate::policy::normalize_path(&path, mode).ok(),
        path,
        path_normalization: mode,
        host: r
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned),
        headers: r
            .headers
            .iter()
            .filter(|(name, _)| *name != http::header::HOST)
            .map(|(name, value)| format!("{name}: {}", String::from_utf8_lossy(value.as_bytes())))
            .collect(),
        decided_per_request: why_not.is_none(),
        why_not_per_request: why_not.map(str::to_owned),
    }
}

impl Verdict {
    /// The verdict for a human.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let from = self
            .source
            .clone()
            .unwrap_or_else(|| format!("{} (not a workload)", self.source_ip));
        let to = match (&self.destination, &self.service) {
            (Some(d), Some(s)) => format!("{d} via service {s}"),
            (Some(d), None) => d.clone(),
            (None, _) => "outside the mesh".to_string(),
        };
        let verdict = if self.allowed { "ALLOWED" } else { "REFUSED" };
        let _ = writeln!(
            out,
            "{verdict}: {from} -> {to} at {}",
            self.destination_address
        );
        let transport = if self.transport == "hbone" {
            format!("HBONE (mTLS) to {}:15008", self.destination_address.ip())
        } else {
            "plaintext".to_string()
        };
        let none = || "none".to_string();
        let _ = writeln!(out, "  transport:            {transport}");
        let _ = writeln!(
            out,
            "  source identity:      {}",
            self.source_identity.clone().unwrap_or_else(none)
        );
        let _ = writeln!(
            out,
            "  destination identity: {}",
            self.destination_identity.clone().unwrap_or_else(none)
        );
        if !self.expected_identities.is_empty() {
            let _ = writeln!(
                out,
                "  expected identities:  {}",
                self.expected_identities.join(", ")
            );
        }
        let _ = writeln!(
            out,
            "  mTLS mode:            {} ({})",
            self.mode, self.mode_source
        );
        if let Some(r) = &self.request {
            let host = r
                .host
                .as_ref()
                .map(|h| format!(" (host {h})"))
                .unwrap_or_default();
            let _ = writeln!(out, "  request:              {} {}{host}", r.method, r.path);
            for h in &r.headers {
                let _ = writeln!(out, "  header:               {h}");
            }
            let normalized = r
                .normalized_path
                .clone()
                .unwrap_or_else(|| "cannot be normalized: denied".to_string());
            let _ = writeln!(
                out,
                "  normalized path:      {normalized} ({})",
                r.path_normalization
            );
            let decided = match &r.why_not_per_request {
                None => "per request, by the destination tunnel".to_string(),
                Some(why) => format!("with the connection: {why}"),
            };
            let _ = writeln!(out, "  decided:              {decided}");
        }
        let _ = writeln!(
            out,
            "  policy:               {}",
            self.policy.clone().unwrap_or_else(none)
        );
        if let Some(rule) = self.rule {
            let _ = writeln!(out, "  rule:                 {rule}");
        }
        let _ = writeln!(out, "  reason:               {}", self.reason);
        for w in &self.warnings {
            let _ = writeln!(out, "  warning:              {w}");
        }
        for n in &self.notes {
            let _ = writeln!(out, "  note:                 {n}");
        }
        for e in &self.endpoints {
            let _ = writeln!(
                out,
                "  endpoint:             {} at {}: {}{}",
                e.workload,
                e.address,
                if e.allowed { "allowed" } else { "refused" },
                e.policy
                    .as_ref()
                    .map(|p| format!(" by {p}"))
                    .unwrap_or_default()
            );
        }
        out
    }
}

fn answer(args: &Args, out: &mut impl Write) -> Result<bool, Error> {
    let config = config::load(&args.config)?;
    let snapshot = Snapshot::new(1, config.resources);
    let from = match (&args.from, args.from_ip) {
        (Some(name), _) => From::Workload(name.clone()),
        (None, Some(ip)) => From::Ip(ip),
        (None, None) => return Err(Error::NoSource),
    };
    let request = args.request()?;
    let v = explain(&snapshot, &from, args.to, request.as_ref())?;
    if args.json {
        serde_json::to_writer(&mut *out, &v)?;
        writeln!(out)?;
    } else {
        write!(out, "{}", v.render())?;
    }
    Ok(v.allowed)
}

/// Runs `ztunnel check`, printing to stdout (errors to stderr); returns the exit status.
pub fn run(args: &Args) -> u8 {
    let mut stdout = std::io::stdout().lock();
    match answer(args, &mut stdout) {
        Ok(true) => ALLOWED,
        Ok(false) => REFUSED,
        Err(e) => {
            eprintln!("ztunnel check: {e}");
            BAD_INPUT
        }
    }
}
