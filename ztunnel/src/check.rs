//! `ztunnel check`: explains, without sending traffic, what the mesh would do with a
//! connection: HBONE or plaintext, the identities involved, the effective mTLS mode and
//! where it comes from, and which policy allows or denies it and why.
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
use crate::policy::{Decision, MtlsMode};
use crate::state::{Snapshot, Transport, Upstream, Workload};

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
    /// The source address, for a source that is not a workload in the config.
    #[arg(long, value_name = "IP")]
    pub from_ip: Option<IpAddr>,
    /// The original destination: a workload IP or a service VIP, and a port.
    #[arg(long, value_name = "IP:PORT")]
    pub to: SocketAddr,
    /// Print the verdict as one JSON object.
    #[arg(long)]
    pub json: bool,
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
    pub reason: String,
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

/// Answers the question against a snapshot.
pub fn explain(snapshot: &Snapshot, from: &From, to: SocketAddr) -> Result<Verdict, Error> {
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
        .map(|up| verdict(snapshot, &source, up))
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
        reason: String::new(),
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

fn verdict(snapshot: &Snapshot, source: &Source<'_>, up: &Upstream) -> Verdict {
    let mut v = base(source, up.address);
    v.service.clone_from(&up.service);
    let Some(dst) = &up.workload else {
        v.mode_source = "destination is outside the mesh: nothing enforces mTLS there".to_string();
        v.reason = "passed through as plaintext to an address outside the mesh".to_string();
        return v;
    };
    v.destination = Some(dst.key());
    v.destination_identity = Some(dst.identity.to_string());
    if !dst.meshed {
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
    let decision: Decision = snapshot.decide(source.ip, identity, up.address);
    v.allowed = decision.allowed;
    v.policy = decision.policy.as_ref().map(ToString::to_string);
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
        let _ = writeln!(
            out,
            "  policy:               {}",
            self.policy.clone().unwrap_or_else(none)
        );
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
    let v = explain(&snapshot, &from, args.to)?;
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
