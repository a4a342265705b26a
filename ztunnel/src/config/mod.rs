//! The local config file (`ztunnel run --config FILE`): the tunnel's settings, and the
//! workloads, services and Istio policies of the mesh. `deploy/examples/config.yaml`
//! documents every key.
//!
//! [`load`] reads and checks the whole file; an error names the file, the place (line
//! and column for YAML-level errors, the field path otherwise) and the problem.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::admin::LogFormat;
use crate::identity::{CaFiles, Identity};
use crate::policy::{Document, Labels, PathNormalization, Policy};
use crate::proxy::DEFAULT_MAX_METRIC_SERIES;
use crate::state::{
    L7Authorization, L7Settings, Resources, Service, ServicePort, Workload, speaks_http,
};

/// Why a config file was rejected.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}:{column}: {message}", path.display())]
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{}: {message}", path.display())]
    SyntaxNoLocation { path: PathBuf, message: String },
    #[error("{}: {place}: {problem}", path.display())]
    Invalid {
        path: PathBuf,
        place: String,
        problem: String,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawCa {
    cert_file: PathBuf,
    key_file: PathBuf,
    trust_bundle_file: Option<PathBuf>,
}

/// How the tunnel runs; changes need a restart (a reload logs that they were ignored).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub trust_domain: String,
    /// The node this tunnel runs on.
    pub node: String,
    /// Istio's root namespace: policies here apply mesh-wide.
    pub root_namespace: String,
    /// The in-process CA's root certificate and key; `None` means the embedded default.
    pub ca: Option<CaFiles>,
    /// PEM roots to trust (watched; old and new roots during a CA rotation); `None`
    /// means the CA's own root.
    pub trust_bundle_file: Option<PathBuf>,
    /// Admin server (`/config_dump`, `/logging`).
    pub admin_address: SocketAddr,
    /// Readiness probe (`/healthz/ready`).
    pub readiness_address: SocketAddr,
    /// Prometheus metrics (`/metrics`).
    pub metrics_address: SocketAddr,
    /// `SO_MARK` on every socket the tunnel opens; the eBPF programs are loaded with it
    /// and never steer a socket that carries it (the tunnel's own connections).
    pub socket_mark: u32,
    /// Where the eBPF programs and maps are pinned.
    pub bpf_pin_root: PathBuf,
    /// Initial log filter (tracing `EnvFilter` syntax); `/logging` changes it at run time.
    pub log_level: String,
    /// How log lines are written (`text` or `json`); `--log-format` overrides it.
    pub log_format: LogFormat,
    /// A SOCKS5 capture listener on a loopback address (no eBPF needed); off by default.
    pub socks5_address: Option<SocketAddr>,
    /// Users, besides the tunnel's own, whose processes may use the SOCKS5 listener.
    pub socks5_allowed_uids: Vec<u32>,
    /// How long open connections may finish after SIGTERM before they are closed.
    pub drain_grace_period_seconds: u64,
    /// Peers whose traffic is never steered, both ways (the node's own address, so the
    /// kubelet's probes reach pods in STRICT namespaces).
    pub excluded_peers: Vec<ipnet::IpNet>,
    /// Outbound destination ports never steered.
    pub excluded_ports: Vec<u16>,
    /// Where HTTP rules are enforced and how request paths are normalized (in the
    /// file mode they apply on reload, as part of the mesh's resources).
    pub l7: L7Settings,
    /// Peer identities whose `forwarded` header is logged as the source address even
    /// when it is not the peer's own address (gateways, waypoints).
    pub trusted_proxies: Vec<Identity>,
    /// Series of each `istio_tcp_*` family at most; beyond it connections are counted
    /// in an overflow series.
    pub max_metric_series: usize,
}

/// A checked config file.
impl Settings {
    /// Every setting at its default, for node `node` (the Kubernetes mode, where no file
    /// is read).
    pub fn defaults(node: &str) -> Settings {
        Settings {
            trust_domain: DEFAULT_TRUST_DOMAIN.to_string(),
            node: node.to_string(),
            root_namespace: DEFAULT_ROOT_NAMESPACE.to_string(),
            ca: None,
            trust_bundle_file: None,
            admin_address: DEFAULT_ADMIN_ADDRESS,
            readiness_address: DEFAULT_READINESS_ADDRESS,
            metrics_address: DEFAULT_METRICS_ADDRESS,
            socket_mark: DEFAULT_SOCKET_MARK,
            bpf_pin_root: PathBuf::from(DEFAULT_BPF_PIN_ROOT),
            log_level: DEFAULT_LOG_LEVEL.to_string(),
            log_format: LogFormat::Text,
            socks5_address: None,
            socks5_allowed_uids: Vec::new(),
            drain_grace_period_seconds: DEFAULT_DRAIN_GRACE_PERIOD_SECONDS,
            excluded_peers: Vec::new(),
            excluded_ports: Vec::new(),
            l7: L7Settings::default(),
            trusted_proxies: Vec::new(),
            max_metric_series: DEFAULT_MAX_METRIC_SERIES,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    /// The file it came from (watched for changes).
    pub path: PathBuf,
    pub settings: Settings,
    /// Workloads, services and policies, ready for [`crate::state::State::publish`].
    pub resources: Resources,
}

pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";
pub const DEFAULT_ADMIN_ADDRESS: SocketAddr = v4([127, 0, 0, 1], 15000);
pub const DEFAULT_READINESS_ADDRESS: SocketAddr = v4([0, 0, 0, 0], 15021);
pub const DEFAULT_METRICS_ADDRESS: SocketAddr = v4([0, 0, 0, 0], 15020);
pub use ztunnel_ebpf_common::DEFAULT_SOCKET_MARK;
pub const DEFAULT_BPF_PIN_ROOT: &str = "/sys/fs/bpf/ztunnel";
pub const DEFAULT_LOG_LEVEL: &str = "info";
pub const DEFAULT_DRAIN_GRACE_PERIOD_SECONDS: u64 = 5;

const fn v4(ip: [u8; 4], port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]),
        port,
    ))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct File {
    #[serde(default = "default_trust_domain")]
    trust_domain: String,
    node: String,
    #[serde(default = "default_root_namespace")]
    root_namespace: String,
    ca: Option<RawCa>,
    #[serde(default = "default_admin")]
    admin_address: SocketAddr,
    #[serde(default = "default_readiness")]
    readiness_address: SocketAddr,
    #[serde(default = "default_metrics")]
    metrics_address: SocketAddr,
    #[serde(default = "default_mark")]
    socket_mark: u32,
    #[serde(default = "default_pin_root")]
    bpf_pin_root: PathBuf,
    #[serde(default = "default_log_level")]
    log_level: String,
    #[serde(default)]
    log_format: LogFormat,
    socks5_address: Option<SocketAddr>,
    #[serde(default)]
    socks5_allowed_uids: Vec<u32>,
    #[serde(default = "default_drain_grace")]
    drain_grace_period_seconds: u64,
    #[serde(default)]
    excluded_peers: Vec<ipnet::IpNet>,
    #[serde(default)]
    excluded_ports: Vec<u16>,
    #[serde(default)]
    l7_authorization: L7Authorization,
    #[serde(default)]
    path_normalization: PathNormalization,
    #[serde(default)]
    trusted_proxies: Vec<Identity>,
    #[serde(default = "default_max_metric_series")]
    max_metric_series: usize,
    #[serde(default)]
    workloads: Vec<RawWorkload>,
    #[serde(default)]
    services: Vec<RawService>,
    #[serde(default)]
    policies: Vec<Document>,
}

fn default_max_metric_series() -> usize {
    DEFAULT_MAX_METRIC_SERIES
}
fn default_trust_domain() -> String {
    DEFAULT_TRUST_DOMAIN.to_string()
}
fn default_root_namespace() -> String {
    DEFAULT_ROOT_NAMESPACE.to_string()
}
fn default_admin() -> SocketAddr {
    DEFAULT_ADMIN_ADDRESS
}
fn default_readiness() -> SocketAddr {
    DEFAULT_READINESS_ADDRESS
}
fn default_metrics() -> SocketAddr {
    DEFAULT_METRICS_ADDRESS
}
fn default_mark() -> u32 {
    DEFAULT_SOCKET_MARK
}
fn default_pin_root() -> PathBuf {
    PathBuf::from(DEFAULT_BPF_PIN_ROOT)
}
fn default_drain_grace() -> u64 {
    DEFAULT_DRAIN_GRACE_PERIOD_SECONDS
}
fn default_log_level() -> String {
    DEFAULT_LOG_LEVEL.to_string()
}
fn default_service_account() -> String {
    "default".to_string()
}
fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawWorkload {
    name: String,
    namespace: String,
    #[serde(default = "default_service_account")]
    service_account: String,
    #[serde(default)]
    labels: Labels,
    ips: Vec<IpAddr>,
    node: Option<String>,
    #[serde(default = "yes")]
    meshed: bool,
    #[serde(default = "yes")]
    healthy: bool,
    netns: Option<PathBuf>,
    http_ports: Option<Vec<u16>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawService {
    name: String,
    namespace: String,
    vips: Vec<IpAddr>,
    ports: Vec<RawPort>,
    #[serde(default)]
    selector: Labels,
    #[serde(default)]
    subject_alt_names: Vec<Identity>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawPort {
    port: u16,
    target_port: Option<u16>,
    name: Option<String>,
    app_protocol: Option<String>,
}

/// Reads and checks a config file.
pub fn load(path: &Path) -> Result<Config, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text)
}

/// Checks the text of a config file; `path` names it in errors and anchors relative
/// CA file paths.
pub fn parse(path: &Path, text: &str) -> Result<Config, Error> {
    let file: File = serde_yaml::from_str(text).map_err(|e| syntax(path, &e))?;
    Checker { path }.check(file)
}

fn syntax(path: &Path, e: &serde_yaml::Error) -> Error {
    let message = e.to_string();
    match e.location() {
        Some(loc) => {
            let suffix = format!(" at line {} column {}", loc.line(), loc.column());
            Error::Syntax {
                path: path.to_path_buf(),
                line: loc.line(),
                column: loc.column(),
                message: message
                    .strip_suffix(&suffix)
                    .unwrap_or(&message)
                    .to_string(),
            }
        }
        None => Error::SyntaxNoLocation {
            path: path.to_path_buf(),
            message,
        },
    }
}

struct Checker<'a> {
    path: &'a Path,
}

impl Checker<'_> {
    fn invalid(&self, place: impl Into<String>, problem: impl Into<String>) -> Error {
        Error::Invalid {
            path: self.path.to_path_buf(),
            place: place.into(),
            problem: problem.into(),
        }
    }

    fn relative(&self, p: PathBuf) -> PathBuf {
        match self.path.parent() {
            Some(dir) if p.is_relative() => dir.join(p),
            _ => p,
        }
    }

    fn check(&self, file: File) -> Result<Config, Error> {
        if file.node.is_empty() {
            return Err(self.invalid("node", "must name this tunnel's node"));
        }
        Identity::new(file.trust_domain.as_str(), "default", "default")
            .map_err(|e| self.invalid("trustDomain", e.to_string()))?;
        if file.root_namespace.is_empty() {
            return Err(self.invalid("rootNamespace", "must not be empty"));
        }
        tracing_subscriber::EnvFilter::try_new(&file.log_level)
            .map_err(|e| self.invalid("logLevel", format!("{:?}: {e}", file.log_level)))?;
        if let Some(address) = file.socks5_address
            && !address.ip().is_loopback()
        {
            return Err(self.invalid(
                "socks5Address",
                format!(
                    "{address} is not a loopback address: SOCKS5 capture is for this host only"
                ),
            ));
        }
        if file.socks5_address.is_none() && !file.socks5_allowed_uids.is_empty() {
            return Err(self.invalid(
                "socks5AllowedUids",
                format!(
                    "{:?} set without socks5Address: there is no SOCKS5 listener to allow them on",
                    file.socks5_allowed_uids
                ),
            ));
        }
        if file.max_metric_series == 0 {
            return Err(self.invalid(
                "maxMetricSeries",
                format!(
                    "0 would leave no series for any connection (the default is \
                     {DEFAULT_MAX_METRIC_SERIES})"
                ),
            ));
        }
        if file.socket_mark == 0 {
            return Err(self.invalid(
                "socketMark",
                "0 is the mark of every unmarked socket: the tunnel's own connections \
                 would be steered back into it; choose a non-zero mark",
            ));
        }
        let workloads = self.workloads(&file)?;
        let services = self.services(&file, &workloads)?;
        let policies = self.policies(&file.policies)?;
        let settings = Settings {
            trust_bundle_file: file
                .ca
                .as_ref()
                .and_then(|ca| ca.trust_bundle_file.clone())
                .map(|p| self.relative(p)),
            ca: file.ca.map(|ca| CaFiles {
                cert: self.relative(ca.cert_file),
                key: self.relative(ca.key_file),
            }),
            admin_address: file.admin_address,
            readiness_address: file.readiness_address,
            metrics_address: file.metrics_address,
            socket_mark: file.socket_mark,
            bpf_pin_root: file.bpf_pin_root,
            log_level: file.log_level,
            log_format: file.log_format,
            socks5_address: file.socks5_address,
            socks5_allowed_uids: file.socks5_allowed_uids,
            drain_grace_period_seconds: file.drain_grace_period_seconds,
            excluded_peers: file.excluded_peers,
            excluded_ports: file.excluded_ports,
            l7: L7Settings {
                authorization: file.l7_authorization,
                path_normalization: file.path_normalization,
            },
            trusted_proxies: file.trusted_proxies,
            max_metric_series: file.max_metric_series,
            trust_domain: file.trust_domain,
            node: file.node,
            root_namespace: file.root_namespace,
        };
        Ok(Config {
            path: self.path.to_path_buf(),
            resources: Resources {
                node: settings.node.clone(),
                trust_domain: settings.trust_domain.clone(),
                root_namespace: settings.root_namespace.clone(),
                workloads,
                services,
                policies,
                l7: settings.l7,
            },
            settings,
        })
    }

    fn workloads(&self, file: &File) -> Result<Vec<Workload>, Error> {
        let mut names = HashMap::new();
        let mut ips: HashMap<IpAddr, String> = HashMap::new();
        let mut out = Vec::with_capacity(file.workloads.len());
        for (i, w) in file.workloads.iter().enumerate() {
            let place = format!("workloads[{i}] ({}/{})", w.namespace, w.name);
            if w.name.is_empty() {
                return Err(self.invalid(place, "name must not be empty"));
            }
            let identity = Identity::new(
                file.trust_domain.as_str(),
                w.namespace.as_str(),
                w.service_account.as_str(),
            )
            .map_err(|e| self.invalid(&place, e.to_string()))?;
            if let Some(first) = names.insert((w.namespace.clone(), w.name.clone()), i) {
                return Err(
                    self.invalid(place, format!("same namespace/name as workloads[{first}]"))
                );
            }
            if w.ips.is_empty() {
                return Err(self.invalid(place, "ips must list at least one address"));
            }
            for ip in &w.ips {
                if let Some(other) = ips.insert(*ip, w.namespace.clone() + "/" + &w.name) {
                    return Err(
                        self.invalid(place, format!("IP {ip} is already workload {other}'s"))
                    );
                }
            }
            let node = w.node.clone().unwrap_or_else(|| file.node.clone());
            if w.netns.is_some() && node != file.node {
                return Err(self.invalid(
                    place,
                    format!(
                        "netns is only for workloads on this node ({}), not {node}",
                        file.node
                    ),
                ));
            }
            if let Some(j) = w.http_ports.iter().flatten().position(|p| *p == 0) {
                return Err(self.invalid(
                    format!("{place}.httpPorts[{j}]"),
                    "ports must be in 1..=65535",
                ));
            }
            out.push(Workload {
                http_ports: w.http_ports.clone(),
                name: w.name.clone(),
                namespace: w.namespace.clone(),
                service_account: w.service_account.clone(),
                identity,
                labels: w.labels.clone(),
                ips: w.ips.clone(),
                node,
                meshed: w.meshed,
                healthy: w.healthy,
                netns: w.netns.clone(),
            });
        }
        Ok(out)
    }

    fn services(&self, file: &File, workloads: &[Workload]) -> Result<Vec<Service>, Error> {
        let owners: HashMap<IpAddr, String> = workloads
            .iter()
            .flat_map(|w| w.ips.iter().map(|ip| (*ip, w.key())))
            .collect();
        let mut vips: HashMap<IpAddr, String> = HashMap::new();
        let mut out = Vec::with_capacity(file.services.len());
        for (i, s) in file.services.iter().enumerate() {
            let key = format!("{}/{}", s.namespace, s.name);
            let place = format!("services[{i}] ({key})");
            if s.name.is_empty() || s.namespace.is_empty() {
                return Err(self.invalid(place, "name and namespace must not be empty"));
            }
            if s.vips.is_empty() {
                return Err(self.invalid(place, "vips must list at least one address"));
            }
            for vip in &s.vips {
                if let Some(w) = owners.get(vip) {
                    return Err(self.invalid(place, format!("VIP {vip} is workload {w}'s IP")));
                }
                if let Some(other) = vips.insert(*vip, key.clone()) {
                    return Err(
                        self.invalid(place, format!("VIP {vip} is already service {other}'s"))
                    );
                }
            }
            let mut ports: BTreeMap<u16, (u16, bool)> = BTreeMap::new();
            for (j, p) in s.ports.iter().enumerate() {
                let target_port = p.target_port.unwrap_or(p.port);
                if p.port == 0 || target_port == 0 {
                    return Err(
                        self.invalid(format!("{place}.ports[{j}]"), "ports must be in 1..=65535")
                    );
                }
                let http = speaks_http(p.name.as_deref(), p.app_protocol.as_deref());
                if ports.insert(p.port, (target_port, http)).is_some() {
                    return Err(self.invalid(
                        format!("{place}.ports[{j}]"),
                        format!("port {} is listed twice", p.port),
                    ));
                }
            }
            out.push(Service {
                name: s.name.clone(),
                namespace: s.namespace.clone(),
                vips: s.vips.clone(),
                ports: ports
                    .into_iter()
                    .map(|(port, (target_port, http))| ServicePort {
                        port,
                        target_port,
                        http,
                    })
                    .collect(),
                selector: s.selector.clone(),
                subject_alt_names: s.subject_alt_names.clone(),
            });
        }
        Ok(out)
    }

    fn policies(&self, docs: &[Document]) -> Result<Vec<Policy>, Error> {
        let mut seen = HashMap::new();
        let mut out = Vec::with_capacity(docs.len());
        for (i, doc) in docs.iter().enumerate() {
            let place = format!("policies[{i}] ({})", doc.describe());
            let policy = doc
                .compile()
                .map_err(|e| self.invalid(format!("{place}.{}", e.field), e.problem))?;
            let r = policy.reference();
            if let Some(first) = seen.insert((r.kind, r.namespace.clone(), r.name.clone()), i) {
                return Err(self.invalid(
                    place,
                    format!("same kind, namespace and name as policies[{first}]"),
                ));
            }
            out.push(policy);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
