//! The running tunnel: every part wired together. Configuration feeds the state; the
//! state decides which local workloads are enrolled (eBPF steering into sockets inside
//! their namespaces), which identities hold certificates, and what the proxy allows.

mod mesh;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use rustls::crypto::CryptoProvider;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

pub use mesh::StateMesh;

use crate::admin::{self, Admin, LogControl, Readiness};
use crate::config::{Config, Settings};
use crate::discovery::local::LocalSource;
use crate::file_watch::FileWatcher;
use crate::hbone::Mtls;
use crate::identity::{
    self, CertManager, CertificateAuthority, Identity, InProcessCa, TrustBundle, TrustStore,
};
use crate::kube::ca::{CaClient, CaClientConfig, verify_leaf};
use crate::kube::discovery::{self, KubeSource};
use crate::kube::pod_netns::{self, NetnsTracker, ProcScanner};
use crate::netns::Netns;
use crate::proxy::{self, Drain, LocalWorkload, Proxy};
use crate::redirect::{self, PodNetwork, Redirect};
use crate::state::{Snapshot, State, Workload};
use crate::tls;

/// HBONE inbound port of every enrolled pod.
const HBONE_PORT: u16 = 15008;
/// How long a TLS handshake may take.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// How soon enrolment is tried again after it failed for some pod.
const ENROL_RETRY: Duration = Duration::from_secs(2);

/// A running tunnel. Dropping it stops serving; [`Tunnel::shutdown`] drains first.
pub struct Tunnel {
    /// Where the admin, readiness and metrics servers listen.
    pub admin: admin::Servers,
    /// The SOCKS5 capture listener, when configured.
    pub socks5: Option<SocketAddr>,
    proxy: Proxy,
    state: State,
    grace: Duration,
    tasks: Vec<JoinHandle<()>>,
    _source: Running,
    _bundle_watch: Option<FileWatcher>,
}

impl Tunnel {
    /// Starts every part: discovery from `source`, certificates from its CA.
    pub async fn start(source: Source, log: LogControl) -> Result<Tunnel> {
        let settings = source.settings().clone();
        let mut registry = Registry::default();
        let readiness = Readiness::new();
        let enrolled = readiness.register("workloads enrolled with certificates");
        let state = State::new();
        let provider = tls::provider();
        let mut tasks = Vec::new();

        let bundle_file = match (&settings.trust_bundle_file, &settings.ca) {
            (Some(file), _) => file.clone(),
            (None, Some(ca)) => ca.cert.clone(),
            (None, None) => {
                anyhow::bail!("no trust bundle: name a trust bundle file or the CA files")
            }
        };
        let trust = TrustStore::from_file(&bundle_file)?;
        let bundle_failures: Counter = Counter::default();
        registry.register(
            "ztunnel_trust_bundle_reload_failures",
            "Trust bundle updates refused (file unreadable or malformed, an edit that drops the root of a held certificate, an unusable bundle from the CA); the bundle in force stays",
            bundle_failures.clone(),
        );
        let failures = bundle_failures.clone();
        // The watch logs each failure; the counter is what alerts.
        let bundle_watch = trust.watch(move |_| {
            failures.inc();
        })?;

        let (ca, running): (Arc<dyn CertificateAuthority>, Running) = match source {
            Source::File(config) => {
                let ca_files = settings.ca.clone().with_context(|| {
                    format!(
                        "{}: `ca` is required: the tunnel needs a CA to issue workload certificates",
                        config.path.display()
                    )
                })?;
                let ca = InProcessCa::load(&ca_files, identity::DEFAULT_CERT_LIFETIME)?;
                let local = LocalSource::start(&config, state.clone(), &mut registry)?;
                (Arc::new(ca), Running::File(local))
            }
            Source::Kube(kube) => {
                let client = CaClient::new(kube.ca, trust.clone(), provider.clone());
                tasks.push(tokio::spawn(follow_bundle(
                    client.trust_bundle(),
                    trust.clone(),
                    bundle_failures.clone(),
                )));
                let mut scanner = ProcScanner::new(&kube.proc_root);
                if let Some(link) = &kube.host_netns {
                    scanner = scanner.with_host_netns(link);
                }
                let tracker =
                    NetnsTracker::new(scanner, pod_netns::Metrics::register(&mut registry));
                let discovery = KubeSource::start(
                    kube.client,
                    discovery::Settings {
                        node: settings.node.clone(),
                        trust_domain: settings.trust_domain.clone(),
                        root_namespace: settings.root_namespace.clone(),
                        l7: settings.l7,
                    },
                    state.clone(),
                    tracker,
                    discovery::Metrics::register(&mut registry),
                    &readiness,
                );
                (Arc::new(client), Running::Kube(discovery))
            }
        };
        let steered_only = matches!(running, Running::Kube(_));
        let certs = CertManager::new(
            ca,
            provider.clone(),
            identity::Metrics::register(&mut registry),
        );
        trust.check_edits(keeps_held_roots(certs.clone(), provider));
        identity::gauges::register(&mut registry, certs.clone(), trust.clone());
        admin::register_status(&mut registry, state.clone(), readiness.clone());
        let tls_metrics = tls::Metrics::register(&mut registry);
        let redirect_metrics = redirect::Metrics::register(&mut registry);
        let mtls = Mtls::new(
            certs.clone(),
            trust,
            settings.trust_domain.clone(),
            HANDSHAKE_DEADLINE,
            tls_metrics,
        );

        let mesh = StateMesh::new(state.clone());
        let proxy_config = proxy::Config {
            mark: Some(settings.socket_mark),
            socks5_allowed_uids: settings.socks5_allowed_uids.clone(),
            trusted_proxies: settings.trusted_proxies.clone(),
            max_metric_series: settings.max_metric_series,
            ..proxy::Config::default()
        };
        let proxy = Proxy::new(
            proxy_config,
            Arc::new(mesh.clone()),
            Arc::new(mtls),
            &mut registry,
        );

        let socks5 = match settings.socks5_address {
            Some(address) => {
                let listener = proxy
                    .sockets()
                    .listen(address)
                    .with_context(|| format!("SOCKS5 listener on {address}"))?;
                let bound = listener.local_addr()?;
                let p = proxy.clone();
                tasks.push(tokio::spawn(async move {
                    if let Err(e) = p.serve_socks5(listener).await {
                        error!(error = %e, "SOCKS5 listener stopped");
                    }
                }));
                warn!(
                    address = %bound,
                    tunnel_uid = nix::unistd::geteuid().as_raw(),
                    socks5_allowed_uids = ?settings.socks5_allowed_uids,
                    "SOCKS5 CAPTURE IS ON: the test path for hosts without eBPF, not for \
                     production. A process of the tunnel's user or of socks5AllowedUids \
                     that connects from a workload's address is given that workload's \
                     mTLS identity"
                );
                Some(bound)
            }
            None => None,
        };

        let admin = admin::serve(
            admin::Addresses::from(&settings),
            Admin {
                state: state.clone(),
                registry: Arc::new(registry),
                log,
                certificates: certificate_dump(certs.clone()),
                readiness,
            },
        )
        .await?;

        let node = Node {
            settings: settings.clone(),
            proxy: proxy.clone(),
            mesh,
            certs,
            redirect: None,
            redirect_metrics,
            steered_only,
            pods: HashMap::new(),
        };
        tasks.push(tokio::spawn(node.run(state.clone(), enrolled)));

        Ok(Tunnel {
            admin,
            socks5,
            proxy,
            state,
            grace: Duration::from_secs(settings.drain_grace_period_seconds),
            tasks,
            _source: running,
            _bundle_watch: bundle_watch,
        })
    }

    /// The state the tunnel serves from.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// The proxy's drain handle (open connections, drain).
    pub fn drain(&self) -> Drain {
        self.proxy.drain_handle()
    }

    /// Stops accepting, gives open connections the grace period, then closes them.
    /// Steering stays pinned in the kernel, failing closed until a tunnel starts again.
    pub async fn shutdown(self) {
        info!(grace = ?self.grace, open = self.proxy.drain_handle().open_connections(), "draining");
        self.proxy.drain_handle().drain(self.grace).await;
        for task in &self.tasks {
            task.abort();
        }
        info!("stopped");
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Where workloads, services and policies come from, and who issues certificates.
pub enum Source {
    /// The local config file (watched), and the in-process CA it names.
    File(Config),
    /// The Kubernetes API, and the cluster CA service.
    Kube(KubeOptions),
}

/// Running the tunnel from the Kubernetes API.
pub struct KubeOptions {
    pub client: ::kube::Client,
    /// `node`, `trust_domain`, `root_namespace`, `trust_bundle_file` (the published roots)
    /// and the listening addresses; `ca` is unused (the cluster CA issues).
    pub settings: Settings,
    /// Where the host's /proc is mounted, to find pods' network namespaces.
    pub proc_root: PathBuf,
    /// The host's network namespace, whose pods are never enrolled (default
    /// `<proc_root>/1/ns/net`).
    pub host_netns: Option<PathBuf>,
    pub ca: CaClientConfig,
}

impl Source {
    fn settings(&self) -> &Settings {
        match self {
            Source::File(config) => &config.settings,
            Source::Kube(kube) => &kube.settings,
        }
    }
}

/// The discovery source in use, held so it runs; dropping it stops it.
enum Running {
    File(#[allow(dead_code)] LocalSource),
    Kube(#[allow(dead_code)] KubeSource),
}

/// The check of an edit of the trust bundle file: every certificate this tunnel holds
/// (and that is valid now) must still chain to a root of the new bundle, or peers that
/// take the same bundle would refuse it.
fn keeps_held_roots(
    certs: CertManager,
    provider: Arc<CryptoProvider>,
) -> impl Fn(&TrustBundle) -> Result<(), String> + Send + Sync + 'static {
    move |bundle| {
        let now = SystemTime::now();
        let orphaned: Vec<String> = certs
            .held()
            .iter()
            .filter(|cert| cert.is_valid_at(now))
            .filter(|cert| {
                let chain = &cert.certified_key().cert;
                chain
                    .first()
                    .is_some_and(|leaf| verify_leaf(leaf, &chain[1..], bundle, &provider).is_err())
            })
            .map(|cert| format!("{} (serial {})", cert.identity(), cert.info().serial))
            .collect();
        if orphaned.is_empty() {
            return Ok(());
        }
        Err(format!(
            "no root of the new bundle ({} roots) signed the certificates held for {}",
            bundle.roots().len(),
            orphaned.join(", ")
        ))
    }
}

/// Trusts what the cluster CA says is its bundle (roots rotate there first: its
/// bundles are the rotation's steps). An unusable one is counted in `failures`.
async fn follow_bundle(
    mut bundle: watch::Receiver<Option<Arc<TrustBundle>>>,
    trust: Arc<TrustStore>,
    failures: Counter,
) {
    while bundle.changed().await.is_ok() {
        let Some(current) = bundle.borrow_and_update().clone() else {
            continue;
        };
        match TrustBundle::new(current.roots().to_vec()) {
            Ok(copy) => {
                info!(roots = copy.roots().len(), "trust bundle updated by the CA");
                trust.replace(copy);
            }
            Err(e) => {
                failures.inc();
                warn!(error = %e, "the CA's trust bundle is unusable; the one in force stays")
            }
        }
    }
}

/// Runs the tunnel until SIGTERM or SIGINT, then drains.
pub async fn run(source: Source, log: LogControl) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let tunnel = Tunnel::start(source, log).await?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM"),
        r = tokio::signal::ctrl_c() => { r.context("cannot listen for SIGINT")?; info!("SIGINT") }
    }
    tunnel.shutdown().await;
    Ok(())
}

fn certificate_dump(certs: CertManager) -> admin::CertificateDump {
    Arc::new(move || {
        let rfc3339 = |t: SystemTime| {
            time::OffsetDateTime::from(t)
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default()
        };
        let entries: Vec<serde_json::Value> = certs
            .snapshot()
            .into_iter()
            .map(|(id, info)| match info {
                Some(info) => serde_json::json!({
                    "identity": id.to_string(),
                    "state": "ready",
                    "serial": info.serial,
                    "notBefore": rfc3339(info.not_before),
                    "notAfter": rfc3339(info.not_after),
                }),
                None => serde_json::json!({ "identity": id.to_string(), "state": "pending" }),
            })
            .collect();
        serde_json::Value::Array(entries)
    })
}

/// What enrolling a local workload depends on: a change of any of it re-enrols.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PodSpec {
    identity: Identity,
    ips: Vec<IpAddr>,
    netns: Option<PathBuf>,
}

impl PodSpec {
    fn of(w: &Workload) -> PodSpec {
        PodSpec {
            identity: w.identity.clone(),
            ips: w.ips.clone(),
            netns: w.netns.clone(),
        }
    }
}

/// A local workload the tunnel serves, and the tasks serving its listeners.
struct Pod {
    spec: PodSpec,
    steered: bool,
    tasks: Vec<JoinHandle<()>>,
}

/// Keeps this node's enrolled workloads in line with the state.
struct Node {
    settings: Settings,
    proxy: Proxy,
    mesh: StateMesh,
    certs: CertManager,
    redirect: Option<Arc<Redirect>>,
    redirect_metrics: redirect::Metrics,
    /// Only pods whose network namespace is known are enrolled (Kubernetes: a pod's
    /// namespace is found in /proc shortly after it starts).
    steered_only: bool,
    pods: HashMap<String, Pod>,
}

impl Node {
    async fn run(mut self, state: State, enrolled: admin::Condition) {
        let mut updates = state.subscribe();
        let mut enrolled = Some(enrolled);
        loop {
            let snapshot = state.load();
            let complete = self.reconcile(&snapshot);
            if complete
                && snapshot.generation() > 0
                && let Some(condition) = enrolled.take()
            {
                self.await_certificates().await;
                condition.ready();
                info!(pods = self.pods.len(), "local workloads enrolled");
            }
            let retry = async {
                if complete {
                    std::future::pending::<()>().await
                } else {
                    tokio::time::sleep(ENROL_RETRY).await
                }
            };
            tokio::select! {
                changed = updates.changed() => if changed.is_err() { return },
                () = retry => {}
            }
        }
    }

    /// Enrols new local meshed workloads, re-enrols changed ones, releases the gone.
    /// Returns whether every workload is enrolled.
    fn reconcile(&mut self, snapshot: &Snapshot) -> bool {
        let wanted: HashMap<String, (PodSpec, &Workload)> = snapshot
            .local_workloads()
            .filter(|w| w.meshed && !w.ips.is_empty() && (w.netns.is_some() || !self.steered_only))
            .map(|w| (w.key(), (PodSpec::of(w), &**w)))
            .collect();
        let stale: Vec<String> = self
            .pods
            .iter()
            .filter(|(key, pod)| wanted.get(*key).map(|(spec, _)| spec) != Some(&pod.spec))
            .map(|(key, _)| key.clone())
            .collect();
        for key in stale {
            self.release(&key);
        }
        let mut complete = true;
        for (key, (spec, workload)) in wanted {
            if self.pods.contains_key(&key) {
                continue;
            }
            match self.enrol(&key, &spec, workload) {
                Ok(pod) => {
                    info!(workload = %key, identity = %spec.identity, steered = pod.steered, "workload enrolled");
                    self.pods.insert(key, pod);
                }
                Err(e) => {
                    complete = false;
                    error!(workload = %key, error = format!("{e:#}"), retry_in = ?ENROL_RETRY, "cannot enrol workload");
                }
            }
        }
        complete
    }

    fn enrol(&mut self, key: &str, spec: &PodSpec, workload: &Workload) -> Result<Pod> {
        self.certs.hold(&spec.identity);
        let pod = match &spec.netns {
            Some(netns) => self.enrol_steered(key, spec, netns, workload),
            None => self.enrol_unsteered(spec),
        };
        if pod.is_err() {
            self.certs.release(&spec.identity);
        }
        pod
    }

    /// A pod with a network namespace: eBPF steers its traffic into listeners the
    /// tunnel opens inside it.
    fn enrol_steered(
        &mut self,
        key: &str,
        spec: &PodSpec,
        netns: &std::path::Path,
        workload: &Workload,
    ) -> Result<Pod> {
        let redirect = self.redirect()?;
        let listeners = redirect
            .enrol(&PodNetwork {
                uid: key.to_string(),
                ips: spec.ips.clone(),
                netns: netns.to_path_buf(),
            })
            .with_context(|| format!("enrolling {key} (network namespace {})", netns.display()))?;
        self.mesh.set_namespace(&spec.ips, &listeners.netns);
        let mut tasks = Vec::new();
        let cookie = listeners.netns_cookie;
        for listener in listeners.outbound {
            let source = local_workload(workload, &listener, Some(listeners.netns.clone()))?;
            let (proxy, redirect) = (self.proxy.clone(), redirect.clone());
            tasks.push(tokio::spawn(async move {
                proxy
                    .serve_outbound(listener, source, move |_, client| {
                        redirect
                            .original_destination(cookie, client.port())
                            .map_err(std::io::Error::other)?
                            .ok_or_else(|| {
                                std::io::Error::other(format!(
                                    "no original destination recorded for port {}",
                                    client.port()
                                ))
                            })
                    })
                    .await
            }));
        }
        for listener in listeners.inbound {
            let proxy = self.proxy.clone();
            tasks.push(tokio::spawn(async move {
                proxy
                    .serve_inbound_plaintext(listener, |tcp| tcp.local_addr())
                    .await
            }));
        }
        for listener in listeners.hbone {
            let proxy = self.proxy.clone();
            tasks.push(tokio::spawn(
                async move { proxy.serve_inbound(listener).await },
            ));
        }
        Ok(Pod {
            spec: spec.clone(),
            steered: true,
            tasks,
        })
    }

    /// A workload without a network namespace (no eBPF: its traffic reaches the tunnel
    /// through SOCKS5): only its inbound HBONE listeners, in the tunnel's namespace.
    fn enrol_unsteered(&self, spec: &PodSpec) -> Result<Pod> {
        let mut tasks = Vec::new();
        for ip in &spec.ips {
            let address = SocketAddr::new(*ip, HBONE_PORT);
            let listener = self
                .proxy
                .sockets()
                .listen(address)
                .with_context(|| format!("HBONE listener on {address}"))?;
            let proxy = self.proxy.clone();
            tasks.push(tokio::spawn(
                async move { proxy.serve_inbound(listener).await },
            ));
        }
        Ok(Pod {
            spec: spec.clone(),
            steered: false,
            tasks,
        })
    }

    fn release(&mut self, key: &str) {
        let Some(pod) = self.pods.remove(key) else {
            return;
        };
        for task in &pod.tasks {
            task.abort();
        }
        if pod.steered {
            self.mesh.clear_namespace(&pod.spec.ips);
            if let Some(redirect) = &self.redirect
                && let Err(e) = redirect.release(key)
            {
                warn!(workload = %key, error = %e, "releasing steering failed");
            }
        }
        self.certs.release(&pod.spec.identity);
        info!(workload = %key, "workload released");
    }

    /// The eBPF steering of this node, loaded on first use.
    fn redirect(&mut self) -> Result<Arc<Redirect>> {
        if let Some(redirect) = &self.redirect {
            return Ok(redirect.clone());
        }
        let mut config = redirect::Config::for_node(&self.settings.node);
        config.pin_root = self.settings.bpf_pin_root.join(&self.settings.node);
        config.excluded_peers = self.settings.excluded_peers.clone();
        config.excluded_ports = self.settings.excluded_ports.clone();
        config.socket_mark = self.settings.socket_mark;
        let redirect = Arc::new(
            Redirect::load(&config, self.redirect_metrics.clone())
                .context("loading the eBPF steering programs")?,
        );
        info!(pin_root = %config.pin_root.display(), "eBPF steering loaded");
        self.redirect = Some(redirect.clone());
        Ok(redirect)
    }

    /// Waits for the certificates of every enrolled identity (issued at enrolment).
    async fn await_certificates(&self) {
        for pod in self.pods.values() {
            if let Err(e) = self.certs.fetch(&pod.spec.identity).await {
                warn!(identity = %pod.spec.identity, error = %e, "no certificate yet; retrying in the background");
            }
        }
    }
}

/// The workload as the proxy sees it, with the address of the listener's family.
fn local_workload(
    w: &Workload,
    listener: &TcpListener,
    netns: Option<Netns>,
) -> Result<LocalWorkload> {
    let family = listener
        .local_addr()
        .context("capture listener address")?
        .ip();
    Ok(LocalWorkload {
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        identity: w.identity.clone(),
        ip: w.address_like(family),
        netns,
    })
}
