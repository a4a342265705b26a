//! The Kubernetes source: watches Pods, Namespaces, Services, EndpointSlices and Istio's
//! PeerAuthentication and AuthorizationPolicy, and publishes the same [`Resources`] the
//! local file does. Watch errors back off and resume; a lost watch re-lists (kube's
//! watcher does both). Local meshed pods get their network namespace from /proc.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service as KubeService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::identity::Identity;
use crate::kube::pod_netns::{NetnsTracker, PodUid};
use crate::policy::{Document, Policy};
use crate::state::{Resources, Service, ServicePort, State, Workload};

/// The label that puts a pod, or every pod of a namespace, in the mesh.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// How long the watched objects must be quiet before a new snapshot is built.
const SETTLE: Duration = Duration::from_millis(100);
/// How often /proc is scanned again while a local meshed pod's namespace is not found.
const NETNS_RETRY: Duration = Duration::from_secs(1);

/// What the source needs to know of this tunnel.
#[derive(Clone, Debug)]
pub struct Options {
    /// This node's name (`NODE_NAME`).
    pub node: String,
    pub trust_domain: String,
    pub root_namespace: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WatchLabels {
    resource: &'static str,
}

#[derive(Clone, Default)]
struct Metrics {
    watch_errors: Family<WatchLabels, Counter>,
    rejected_policies: Counter,
}

/// The running watches. Dropping it stops them.
pub struct KubeSource {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The watched objects, as the reflectors hold them.
#[derive(Clone)]
struct Stores {
    pods: Store<Pod>,
    namespaces: Store<Namespace>,
    services: Store<KubeService>,
    slices: Store<EndpointSlice>,
    peer_authentications: Store<DynamicObject>,
    authorization_policies: Store<DynamicObject>,
}

impl KubeSource {
    /// Starts the watches and publishes a snapshot whenever what they hold changes.
    /// Registers `ztunnel_kube_watch_errors_total` and `ztunnel_kube_rejected_policies_total`.
    pub fn start(
        client: kube::Client,
        options: Options,
        netns: NetnsTracker,
        state: State,
        registry: &mut Registry,
    ) -> KubeSource {
        let metrics = Metrics::default();
        registry.register(
            "ztunnel_kube_watch_errors",
            "Errors of the Kubernetes watches (each is retried with backoff)",
            metrics.watch_errors.clone(),
        );
        registry.register(
            "ztunnel_kube_rejected_policies",
            "Istio policies from the API server that could not be compiled (they are left out)",
            metrics.rejected_policies.clone(),
        );
        let changed = Arc::new(Notify::new());
        let mut tasks = Vec::new();
        let mut spawn_watch = |task| tasks.push(tokio::spawn(task));
        let stores = Stores {
            pods: watch(
                Api::all(client.clone()),
                (),
                "pods",
                &changed,
                &metrics,
                &mut spawn_watch,
            ),
            namespaces: watch(
                Api::all(client.clone()),
                (),
                "namespaces",
                &changed,
                &metrics,
                &mut spawn_watch,
            ),
            services: watch(
                Api::all(client.clone()),
                (),
                "services",
                &changed,
                &metrics,
                &mut spawn_watch,
            ),
            slices: watch(
                Api::all(client.clone()),
                (),
                "endpointslices",
                &changed,
                &metrics,
                &mut spawn_watch,
            ),
            peer_authentications: watch_istio(
                &client,
                "PeerAuthentication",
                &changed,
                &metrics,
                &mut spawn_watch,
            ),
            authorization_policies: watch_istio(
                &client,
                "AuthorizationPolicy",
                &changed,
                &metrics,
                &mut spawn_watch,
            ),
        };
        tasks.push(tokio::spawn(publish(
            stores, options, netns, state, changed, metrics,
        )));
        KubeSource { tasks }
    }
}

type Spawn<'a> = dyn FnMut(std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) + 'a;

/// Starts a reflector of `api`; its store fills as the watch goes.
fn watch<K>(
    api: Api<K>,
    dyntype: K::DynamicType,
    resource: &'static str,
    changed: &Arc<Notify>,
    metrics: &Metrics,
    spawn: &mut Spawn<'_>,
) -> Store<K>
where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Default + Send + Sync,
{
    let writer = reflector::store::Writer::new(dyntype);
    let store = writer.as_reader();
    let (changed, errors) = (
        changed.clone(),
        metrics
            .watch_errors
            .get_or_create(&WatchLabels { resource })
            .clone(),
    );
    let stream = reflector::reflector(
        writer,
        watcher(api, watcher::Config::default()).default_backoff(),
    );
    spawn(Box::pin(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => changed.notify_one(),
                Err(e) => {
                    errors.inc();
                    warn!(resource, error = %e, "watch failed; retrying with backoff");
                }
            }
        }
    }));
    store
}

fn watch_istio(
    client: &kube::Client,
    kind: &'static str,
    changed: &Arc<Notify>,
    metrics: &Metrics,
    spawn: &mut Spawn<'_>,
) -> Store<DynamicObject> {
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk("security.istio.io", "v1", kind));
    let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
    let name = if kind == "PeerAuthentication" {
        "peerauthentications"
    } else {
        "authorizationpolicies"
    };
    let writer = reflector::store::Writer::new(resource.clone());
    let store = writer.as_reader();
    let (changed, errors) = (
        changed.clone(),
        metrics
            .watch_errors
            .get_or_create(&WatchLabels { resource: name })
            .clone(),
    );
    let stream = reflector::reflector(
        writer,
        watcher(api, watcher::Config::default()).default_backoff(),
    );
    spawn(Box::pin(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => changed.notify_one(),
                Err(e) => {
                    errors.inc();
                    warn!(resource = name, error = %e, "watch failed; retrying with backoff");
                }
            }
        }
    }));
    store
}

/// Builds and publishes a snapshot after each burst of changes, and while a local
/// meshed pod's namespace is missing, looks for it again every second.
async fn publish(
    stores: Stores,
    options: Options,
    mut netns: NetnsTracker,
    state: State,
    changed: Arc<Notify>,
    metrics: Metrics,
) {
    // Nothing is published before every watch has listed once: a snapshot without the
    // policies (their watch still failing) would allow what they deny.
    let synced = futures::future::try_join_all([
        Box::pin(stores.pods.wait_until_ready())
            as std::pin::Pin<Box<dyn Future<Output = _> + Send>>,
        Box::pin(stores.namespaces.wait_until_ready()),
        Box::pin(stores.services.wait_until_ready()),
        Box::pin(stores.slices.wait_until_ready()),
        Box::pin(stores.peer_authentications.wait_until_ready()),
        Box::pin(stores.authorization_policies.wait_until_ready()),
    ]);
    if synced.await.is_err() {
        return;
    }
    info!("Kubernetes watches synced");
    let mut last_problems = BTreeSet::new();
    loop {
        let objects = Objects {
            pods: stores.pods.state(),
            namespaces: stores.namespaces.state(),
            services: stores.services.state(),
            slices: stores.slices.state(),
            policies: oldest_first(
                stores.peer_authentications.state(),
                stores.authorization_policies.state(),
            ),
        };
        let wanted = objects.local_meshed_pods(&options);
        let missing = match netns.reconcile(&wanted) {
            Ok(changes) => !changes.pending.is_empty(),
            Err(e) => {
                warn!(error = %e, "cannot scan /proc for pod network namespaces");
                true
            }
        };
        let namespaces: HashMap<String, std::path::PathBuf> = netns
            .enrolled()
            .iter()
            .map(|(uid, ns)| (uid.as_str().to_string(), ns.path.clone()))
            .collect();
        let built = objects.resources(&options, &namespaces);
        for problem in built.problems.difference(&last_problems) {
            metrics.rejected_policies.inc();
            warn!("{problem}");
        }
        last_problems = built.problems;
        if state.load().generation() == 0 || !same(&state, &built.resources) {
            state.publish(built.resources);
        }
        tokio::select! {
            () = changed.notified() => {}
            () = tokio::time::sleep(NETNS_RETRY), if missing => {}
        }
        tokio::time::sleep(SETTLE).await;
    }
}

/// Whether the state already holds these resources (a watch resync changes nothing).
fn same(state: &State, resources: &Resources) -> bool {
    let snapshot = state.load();
    snapshot
        .workloads()
        .iter()
        .map(|w| &**w)
        .eq(resources.workloads.iter())
        && snapshot.services() == resources.services.as_slice()
        && snapshot.policies().len() == resources.policies.len()
        && snapshot
            .policies()
            .iter()
            .zip(&resources.policies)
            .all(|(a, b)| a.reference() == b.reference())
        && snapshot
            .policies()
            .iter()
            .map(|p| format!("{p:?}"))
            .eq(resources.policies.iter().map(|p| format!("{p:?}")))
}

/// Istio's order among equal policies: the oldest first.
fn oldest_first(
    mut a: Vec<Arc<DynamicObject>>,
    b: Vec<Arc<DynamicObject>>,
) -> Vec<Arc<DynamicObject>> {
    a.extend(b);
    a.sort_by(|x, y| {
        let key = |o: &DynamicObject| {
            (
                o.metadata.creation_timestamp.clone().map(|t| t.0),
                o.metadata.namespace.clone(),
                o.metadata.name.clone(),
            )
        };
        key(x).cmp(&key(y))
    });
    a
}

/// One consistent read of every store.
struct Objects {
    pods: Vec<Arc<Pod>>,
    namespaces: Vec<Arc<Namespace>>,
    services: Vec<Arc<KubeService>>,
    slices: Vec<Arc<EndpointSlice>>,
    policies: Vec<Arc<DynamicObject>>,
}

struct Built {
    resources: Resources,
    /// Policies left out, with why.
    problems: BTreeSet<String>,
}

impl Objects {
    fn namespace_labels(&self) -> HashMap<&str, &BTreeMap<String, String>> {
        self.namespaces
            .iter()
            .filter_map(|n| Some((n.metadata.name.as_deref()?, n.metadata.labels.as_ref()?)))
            .collect()
    }

    /// A pod is meshed when it or its namespace says `ambient`, and it does not opt out
    /// with `none`; host-network pods never are (they share the node's namespace).
    fn meshed(
        &self,
        pod: &Pod,
        namespace_labels: &HashMap<&str, &BTreeMap<String, String>>,
    ) -> bool {
        let pod_mode = pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(DATAPLANE_MODE_LABEL))
            .map(String::as_str);
        let host_network = pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false);
        let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
        let namespace_mode = namespace_labels
            .get(namespace)
            .and_then(|l| l.get(DATAPLANE_MODE_LABEL))
            .map(String::as_str);
        !host_network
            && pod_mode != Some("none")
            && (pod_mode == Some("ambient") || namespace_mode == Some("ambient"))
    }

    fn local_meshed_pods(&self, options: &Options) -> BTreeSet<PodUid> {
        let labels = self.namespace_labels();
        self.pods
            .iter()
            .filter(|p| {
                node_of(p) == Some(options.node.as_str()) && running(p) && self.meshed(p, &labels)
            })
            .filter_map(|p| PodUid::parse(p.metadata.uid.as_deref()?))
            .collect()
    }

    fn resources(&self, options: &Options, netns: &HashMap<String, std::path::PathBuf>) -> Built {
        let labels = self.namespace_labels();
        let not_ready = self.not_ready_endpoints();
        let mut problems = BTreeSet::new();
        let workloads: Vec<Workload> = self
            .pods
            .iter()
            .filter(|p| running(p))
            .filter_map(|p| {
                let name = p.metadata.name.clone()?;
                let namespace = p.metadata.namespace.clone()?;
                let uid = p.metadata.uid.clone().unwrap_or_default();
                let spec = p.spec.as_ref()?;
                let service_account = spec
                    .service_account_name
                    .clone()
                    .unwrap_or_else(|| "default".into());
                let identity = match Identity::new(
                    options.trust_domain.as_str(),
                    namespace.as_str(),
                    service_account.as_str(),
                ) {
                    Ok(identity) => identity,
                    Err(e) => {
                        problems.insert(format!("pod {namespace}/{name} left out: {e}"));
                        return None;
                    }
                };
                let ips = pod_ips(p);
                if ips.is_empty() || spec.host_network == Some(true) {
                    return None;
                }
                let node = spec.node_name.clone().unwrap_or_default();
                let local = node == options.node;
                Some(Workload {
                    name,
                    namespace,
                    service_account,
                    identity,
                    labels: p.metadata.labels.clone().unwrap_or_default(),
                    ips,
                    meshed: self.meshed(p, &labels),
                    healthy: ready(p) && !not_ready.contains(uid.as_str()),
                    netns: if local {
                        netns.get(&uid).cloned()
                    } else {
                        None
                    },
                    node,
                })
            })
            .collect();
        let services = self
            .services
            .iter()
            .filter_map(|s| service(s, &self.pods))
            .collect();
        let policies: Vec<Policy> = self
            .policies
            .iter()
            .filter_map(|o| match policy(o) {
                Ok(p) => Some(p),
                Err(e) => {
                    problems.insert(e);
                    None
                }
            })
            .collect();
        Built {
            resources: Resources {
                node: options.node.clone(),
                trust_domain: options.trust_domain.clone(),
                root_namespace: options.root_namespace.clone(),
                workloads,
                services,
                policies,
            },
            problems,
        }
    }

    /// Pods an EndpointSlice reports not ready (a readiness probe failing, terminating).
    fn not_ready_endpoints(&self) -> BTreeSet<&str> {
        self.slices
            .iter()
            .flat_map(|s| s.endpoints.iter().flatten())
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(false))
            .filter_map(|e| e.target_ref.as_ref()?.uid.as_deref())
            .collect()
    }
}

fn node_of(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref()?.node_name.as_deref()
}

/// Scheduled and not finished: a pod that has or may get an address.
fn running(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    pod.metadata.deletion_timestamp.is_none() && !matches!(phase, Some("Succeeded" | "Failed"))
}

fn ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    let listed = status.pod_ips.iter().flatten().map(|ip| ip.ip.as_str());
    let mut ips: Vec<IpAddr> = listed
        .chain(status.pod_ip.as_deref())
        .filter_map(|s| s.parse().ok())
        .collect();
    ips.dedup();
    ips.sort();
    ips.dedup();
    ips
}

/// A Service with a selector and cluster IPs. A named target port is looked up in the
/// container ports of the first selected pod that declares it.
fn service(s: &KubeService, pods: &[Arc<Pod>]) -> Option<Service> {
    let spec = s.spec.as_ref()?;
    let selector = spec.selector.clone().filter(|sel| !sel.is_empty())?;
    let namespace = s.metadata.namespace.clone()?;
    let vips: Vec<IpAddr> = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.as_ref())
        .filter_map(|ip| ip.parse().ok())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if vips.is_empty() {
        return None;
    }
    let selected = || {
        pods.iter().filter(|p| {
            p.metadata.namespace.as_deref() == Some(namespace.as_str())
                && selector
                    .iter()
                    .all(|(k, v)| p.metadata.labels.as_ref().and_then(|l| l.get(k)) == Some(v))
        })
    };
    let ports = spec
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| {
            let port = u16::try_from(p.port).ok()?;
            let target_port = match &p.target_port {
                None => port,
                Some(IntOrString::Int(n)) => u16::try_from(*n).ok()?,
                Some(IntOrString::String(name)) => selected().find_map(|pod| {
                    pod.spec
                        .as_ref()?
                        .containers
                        .iter()
                        .flat_map(|c| c.ports.iter().flatten())
                        .find_map(|cp| {
                            (cp.name.as_deref() == Some(name.as_str()))
                                .then(|| u16::try_from(cp.container_port).ok())
                                .flatten()
                        })
                })?,
            };
            Some(ServicePort { port, target_port })
        })
        .collect();
    Some(Service {
        name: s.metadata.name.clone()?,
        namespace,
        vips,
        ports,
        selector: selector.into_iter().collect(),
        subject_alt_names: Vec::new(),
    })
}

/// An Istio object from the API server, compiled as the file source compiles it.
fn policy(object: &DynamicObject) -> Result<Policy, String> {
    let describe = || {
        format!(
            "{} {}/{}",
            object
                .types
                .as_ref()
                .map(|t| t.kind.as_str())
                .unwrap_or("policy"),
            object.metadata.namespace.as_deref().unwrap_or("?"),
            object.metadata.name.as_deref().unwrap_or("?")
        )
    };
    let value =
        serde_json::to_value(object).map_err(|e| format!("{} left out: {e}", describe()))?;
    let document: Document =
        serde_json::from_value(value).map_err(|e| format!("{} left out: {e}", describe()))?;
    document
        .compile()
        .map_err(|e| format!("{} left out: {e}", describe()))
}

#[cfg(test)]
mod tests;
