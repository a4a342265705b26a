//! The Kubernetes API as a discovery source: watches Pods, Namespaces, Services,
//! EndpointSlices and Istio's PeerAuthentication and AuthorizationPolicy (served as
//! `security.istio.io/v1`; objects written as v1beta1 are served as v1 too), and
//! publishes the same [`Resources`] the local config file yields.
//!
//! - A pod is meshed when it or its namespace carries `istio.io/dataplane-mode=ambient`
//!   and the pod does not say `none`; pods on the host's network never are.
//! - A service's named `targetPort` is resolved through its EndpointSlices.
//! - For meshed pods on this node, the network namespace comes from /proc
//!   ([`super::pod_netns`]); until it is found the pod has none and the scan is retried.
//! - Watches back off after errors and resume; a watch that lost its place lists again.
//!   Nothing is published before every resource has been listed once, so the first
//!   snapshot is complete.
//! - A policy that does not compile is left out, logged with its name and problem, and
//!   counted; the others apply.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ::kube::api::{Api, DynamicObject, GroupVersionKind};
use ::kube::core::ApiResource;
use ::kube::runtime::reflector::{self, Store};
use ::kube::runtime::{WatchStreamExt, watcher};
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service as KubeService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::pod_netns::{NetnsTracker, PodNetns, PodUid};
use crate::identity::Identity;
use crate::policy::{Document, Labels, Policy};
use crate::state::{
    HTTP_PORTS_ANNOTATION, L7Settings, Resources, Service, ServicePort, State, Workload,
    parse_http_ports, speaks_http,
};

/// The label that puts a pod or namespace in the mesh (`ambient`) or a pod out (`none`).
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// The label that ties an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Events arriving together are folded into one snapshot.
const SETTLE: Duration = Duration::from_millis(50);
/// How often /proc is scanned again while a local meshed pod's namespace is not found.
pub const NETNS_RETRY: Duration = Duration::from_millis(500);

/// What is not taken from the API server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// This node's name (`NODE_NAME`).
    pub node: String,
    pub trust_domain: String,
    pub root_namespace: String,
    pub l7: L7Settings,
}

/// The objects the watches hold, at one moment.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub pods: Vec<Arc<Pod>>,
    pub namespaces: Vec<Arc<Namespace>>,
    pub services: Vec<Arc<KubeService>>,
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    /// PeerAuthentications and AuthorizationPolicies.
    pub policies: Vec<Arc<DynamicObject>>,
}

/// The result of turning [`Objects`] into [`Resources`].
#[derive(Debug)]
pub struct Built {
    pub resources: Resources,
    /// Meshed pods scheduled on this node: their network namespaces are wanted.
    pub local_pods: BTreeSet<PodUid>,
    /// Objects left out, each with the reason (bad policies, pods without identity,
    /// ports that cannot be resolved).
    pub rejected: Vec<String>,
}

/// Builds the tunnel's view from the API objects; `netns` gives the network namespaces
/// found so far for local pods.
pub fn build(settings: &Settings, objects: &Objects, netns: &HashMap<PodUid, PodNetns>) -> Built {
    let mut rejected = Vec::new();
    let namespace_labels: HashMap<&str, &BTreeMap<String, String>> = objects
        .namespaces
        .iter()
        .filter_map(|ns| Some((ns.metadata.name.as_deref()?, ns.metadata.labels.as_ref()?)))
        .collect();
    let mut local_pods = BTreeSet::new();
    let mut workloads = Vec::new();
    for pod in &objects.pods {
        let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let Some(spec) = &pod.spec else { continue };
        let status = pod.status.as_ref();
        let phase = status.and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            continue;
        }
        let node = spec.node_name.clone().unwrap_or_default();
        let meshed = is_meshed(pod, namespace_labels.get(namespace).copied());
        let uid = pod.metadata.uid.as_deref().and_then(PodUid::parse);
        let local = meshed && !node.is_empty() && node == settings.node;
        if local && let Some(uid) = &uid {
            local_pods.insert(uid.clone());
        }
        let ips = pod_ips(pod);
        if ips.is_empty() {
            continue;
        }
        let service_account = spec
            .service_account_name
            .clone()
            .filter(|sa| !sa.is_empty())
            .unwrap_or_else(|| "default".to_string());
        let identity = match Identity::new(&settings.trust_domain, namespace, &service_account) {
            Ok(identity) => identity,
            Err(e) => {
                rejected.push(format!("pod {namespace}/{name}: {e}"));
                continue;
            }
        };
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let terminating = pod.metadata.deletion_timestamp.is_some();
        let http_ports = match pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(HTTP_PORTS_ANNOTATION))
            .map(|v| parse_http_ports(v))
        {
            None => None,
            Some(Ok(ports)) => Some(ports),
            Some(Err(e)) => {
                rejected.push(format!(
                    "pod {namespace}/{name}: annotation {HTTP_PORTS_ANNOTATION} ignored: {e}"
                ));
                None
            }
        };
        workloads.push(Workload {
            http_ports,
            name: name.to_string(),
            namespace: namespace.to_string(),
            service_account,
            identity,
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            ips,
            netns: if local {
                uid.as_ref()
                    .and_then(|u| netns.get(u))
                    .map(|n| n.path.clone())
            } else {
                None
            },
            node,
            meshed,
            healthy: ready && !terminating,
        });
    }
    workloads.sort_by_key(Workload::key);

    let mut services = Vec::new();
    for service in &objects.services {
        if let Some(service) = convert_service(service, &objects.endpoint_slices, &mut rejected) {
            services.push(service);
        }
    }
    services.sort_by_key(Service::key);

    let mut documents: Vec<&Arc<DynamicObject>> = objects.policies.iter().collect();
    documents.sort_by(|a, b| {
        let created = |o: &DynamicObject| o.metadata.creation_timestamp.clone();
        created(a)
            .cmp(&created(b))
            .then_with(|| a.metadata.namespace.cmp(&b.metadata.namespace))
            .then_with(|| a.metadata.name.cmp(&b.metadata.name))
    });
    let mut policies = Vec::new();
    for object in documents {
        match compile_policy(object) {
            Ok(policy) => policies.push(policy),
            Err(e) => rejected.push(e),
        }
    }

    Built {
        resources: Resources {
            node: settings.node.clone(),
            trust_domain: settings.trust_domain.clone(),
            root_namespace: settings.root_namespace.clone(),
            workloads,
            services,
            policies,
            l7: settings.l7,
        },
        local_pods,
        rejected,
    }
}

fn is_meshed(pod: &Pod, namespace_labels: Option<&BTreeMap<String, String>>) -> bool {
    let host_network = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    let pod_mode = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(DATAPLANE_MODE_LABEL))
        .map(String::as_str);
    let namespace_mode = namespace_labels
        .and_then(|l| l.get(DATAPLANE_MODE_LABEL))
        .map(String::as_str);
    !host_network
        && pod_mode != Some("none")
        && (pod_mode == Some("ambient") || namespace_mode == Some("ambient"))
}

fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    let mut ips: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if ips.is_empty()
        && let Some(ip) = status.pod_ip.as_deref().and_then(|ip| ip.parse().ok())
    {
        ips.push(ip);
    }
    ips
}

fn convert_service(
    service: &KubeService,
    slices: &[Arc<EndpointSlice>],
    rejected: &mut Vec<String>,
) -> Option<Service> {
    let namespace = service.metadata.namespace.clone().unwrap_or_default();
    let name = service.metadata.name.clone().unwrap_or_default();
    let spec = service.spec.as_ref()?;
    let vips: Vec<IpAddr> = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
        .filter_map(|ip| ip.parse().ok())
        .fold(Vec::new(), |mut vips, ip| {
            if !vips.contains(&ip) {
                vips.push(ip);
            }
            vips
        });
    // Headless and ExternalName services have no virtual IP to steer.
    if vips.is_empty() {
        return None;
    }
    let own_slices: Vec<&Arc<EndpointSlice>> = slices
        .iter()
        .filter(|s| {
            s.metadata.namespace.as_deref() == Some(namespace.as_str())
                && s.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(SERVICE_NAME_LABEL))
                    == Some(&name)
        })
        .collect();
    let mut ports = Vec::new();
    for port in spec.ports.iter().flatten() {
        if port.protocol.as_deref().unwrap_or("TCP") != "TCP" {
            continue;
        }
        let Ok(number) = u16::try_from(port.port) else {
            continue;
        };
        let target = match &port.target_port {
            None => Some(number),
            Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
            Some(IntOrString::String(port_name)) => own_slices
                .iter()
                .flat_map(|s| s.ports.iter().flatten())
                .find(|p| p.name.as_deref() == port.name.as_deref())
                .and_then(|p| p.port)
                .and_then(|p| u16::try_from(p).ok())
                .or_else(|| port_name.parse().ok()),
        };
        match target {
            Some(target_port) => ports.push(ServicePort {
                port: number,
                target_port,
                http: speaks_http(port.name.as_deref(), port.app_protocol.as_deref()),
            }),
            None => rejected.push(format!(
                "service {namespace}/{name} port {number}: target port {:?} is not resolved by its EndpointSlices yet",
                port.target_port
            )),
        }
    }
    Some(Service {
        name,
        namespace,
        vips,
        ports,
        selector: spec
            .selector
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect::<Labels>(),
        subject_alt_names: Vec::new(),
    })
}

fn compile_policy(object: &DynamicObject) -> Result<Policy, String> {
    let types = object.types.as_ref();
    let kind = types.map(|t| t.kind.as_str()).unwrap_or("policy");
    let name = format!(
        "{kind} {}/{}",
        object.metadata.namespace.as_deref().unwrap_or_default(),
        object.metadata.name.as_deref().unwrap_or_default()
    );
    let document = serde_json::json!({
        "apiVersion": types.map(|t| t.api_version.as_str()),
        "kind": kind,
        "metadata": {
            "name": object.metadata.name,
            "namespace": object.metadata.namespace,
            "annotations": object.metadata.annotations.clone().unwrap_or_default(),
        },
        "spec": object.data.get("spec").cloned().unwrap_or(serde_json::Value::Null),
    });
    let document: Document =
        serde_json::from_value(document).map_err(|e| format!("{name}: {e}"))?;
    document.compile().map_err(|e| format!("{name}: {e}"))
}

/// Istio's two policy kinds as watched: (plural, kind).
pub const POLICY_KINDS: [(&str, &str); 2] = [
    ("peerauthentications", "PeerAuthentication"),
    ("authorizationpolicies", "AuthorizationPolicy"),
];

fn policy_resource(plural: &str, kind: &str) -> ApiResource {
    let gvk = GroupVersionKind::gvk("security.istio.io", "v1", kind);
    ApiResource::from_gvk_with_plural(&gvk, plural)
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResourceLabel {
    resource: String,
}

/// Counters of the Kubernetes source.
#[derive(Clone, Default)]
pub struct Metrics {
    published: Counter,
    rejected: Counter,
    watch_errors: Family<ResourceLabel, Counter>,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Metrics::default();
        registry.register(
            "ztunnel_kube_snapshots_published",
            "Snapshots published from the Kubernetes API",
            metrics.published.clone(),
        );
        registry.register(
            "ztunnel_kube_objects_rejected",
            "Objects left out of a snapshot (a policy that does not compile, a pod without a valid identity...)",
            metrics.rejected.clone(),
        );
        registry.register(
            "ztunnel_kube_watch_errors",
            "Watch errors by resource (each is retried with backoff)",
            metrics.watch_errors.clone(),
        );
        metrics
    }

    pub fn published(&self) -> u64 {
        self.published.get()
    }

    pub fn rejected(&self) -> u64 {
        self.rejected.get()
    }

    pub fn watch_errors(&self, resource: &str) -> u64 {
        self.watch_errors
            .get_or_create(&ResourceLabel {
                resource: resource.to_string(),
            })
            .get()
    }
}

/// The running watches and the task that publishes; dropping it stops them all.
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

struct Stores {
    pods: Store<Pod>,
    namespaces: Store<Namespace>,
    services: Store<KubeService>,
    endpoint_slices: Store<EndpointSlice>,
    policies: Vec<Store<DynamicObject>>,
}

impl Stores {
    fn objects(&self) -> Objects {
        Objects {
            pods: self.pods.state(),
            namespaces: self.namespaces.state(),
            services: self.services.state(),
            endpoint_slices: self.endpoint_slices.state(),
            policies: self.policies.iter().flat_map(Store::state).collect(),
        }
    }

    async fn wait_until_ready(&self) -> bool {
        let ready = [
            self.pods.wait_until_ready().await,
            self.namespaces.wait_until_ready().await,
            self.services.wait_until_ready().await,
            self.endpoint_slices.wait_until_ready().await,
        ];
        let mut ok = ready.iter().all(Result::is_ok);
        for store in &self.policies {
            ok &= store.wait_until_ready().await.is_ok();
        }
        ok
    }
}

impl KubeSource {
    /// Starts the watches and publishes into `state` once all have listed, then after
    /// every change. `tracker` finds local pods' network namespaces.
    pub fn start(
        client: ::kube::Client,
        settings: Settings,
        state: State,
        tracker: NetnsTracker,
        metrics: Metrics,
    ) -> KubeSource {
        let changed = Arc::new(Notify::new());
        let mut tasks = Vec::new();
        let mut spawn_watch =
            |resource: &'static str, events: Box<dyn Stream<Item = ()> + Send + Unpin>| {
                let changed = changed.clone();
                tasks.push(tokio::spawn(async move {
                    let mut events = events;
                    while events.next().await.is_some() {
                        changed.notify_one();
                    }
                    tracing::error!(resource, "watch ended");
                }));
            };
        let pods = watch(Api::<Pod>::all(client.clone()), "pods", &metrics);
        let namespaces = watch(
            Api::<Namespace>::all(client.clone()),
            "namespaces",
            &metrics,
        );
        let services = watch(
            Api::<KubeService>::all(client.clone()),
            "services",
            &metrics,
        );
        let slices = watch(
            Api::<EndpointSlice>::all(client.clone()),
            "endpointslices",
            &metrics,
        );
        let mut policy_stores = Vec::new();
        for (plural, kind) in POLICY_KINDS {
            let resource = policy_resource(plural, kind);
            let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
            let writer = reflector::store::Writer::new(resource);
            policy_stores.push(writer.as_reader());
            spawn_watch(plural, watched(api, writer, plural, &metrics));
        }
        let stores = Stores {
            pods: pods.0,
            namespaces: namespaces.0,
            services: services.0,
            endpoint_slices: slices.0,
            policies: policy_stores,
        };
        spawn_watch("pods", pods.1);
        spawn_watch("namespaces", namespaces.1);
        spawn_watch("services", services.1);
        spawn_watch("endpointslices", slices.1);
        tasks.push(tokio::spawn(publish_loop(
            settings, stores, state, tracker, changed, metrics,
        )));
        KubeSource { tasks }
    }
}

type Watched<K> = (Store<K>, Box<dyn Stream<Item = ()> + Send + Unpin>);

/// What a watched resource must be.
trait Watchable:
    ::kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static
{
}

impl<K> Watchable for K where
    K: ::kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static
{
}

fn watch<K>(api: Api<K>, resource: &'static str, metrics: &Metrics) -> Watched<K>
where
    K: Watchable,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let writer = reflector::store::Writer::<K>::default();
    let store = writer.as_reader();
    (store, watched(api, writer, resource, metrics))
}

/// The events of one resource's watch, applied to its store; errors are logged,
/// counted and retried with backoff.
fn watched<K>(
    api: Api<K>,
    writer: reflector::store::Writer<K>,
    resource: &'static str,
    metrics: &Metrics,
) -> Box<dyn Stream<Item = ()> + Send + Unpin>
where
    K: Watchable,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    let errors = metrics
        .watch_errors
        .get_or_create(&ResourceLabel {
            resource: resource.to_string(),
        })
        .clone();
    let events = reflector::reflector(
        writer,
        watcher(api, watcher::Config::default()).default_backoff(),
    )
    .filter_map(move |event| {
        let outcome = match event {
            Ok(_) => Some(()),
            Err(e) => {
                errors.inc();
                tracing::warn!(resource, error = %e, "watch failed; retrying with backoff");
                None
            }
        };
        std::future::ready(outcome)
    });
    Box::new(Box::pin(events))
}

async fn publish_loop(
    settings: Settings,
    stores: Stores,
    state: State,
    mut tracker: NetnsTracker,
    changed: Arc<Notify>,
    metrics: Metrics,
) {
    if !stores.wait_until_ready().await {
        tracing::error!("a watch stopped before its first list; nothing is published");
        return;
    }
    tracing::info!("every resource listed; publishing");
    let mut rejected_before = BTreeSet::new();
    loop {
        let objects = stores.objects();
        let wanted = build(&settings, &objects, tracker.enrolled()).local_pods;
        let pending = match tracker.reconcile(&wanted) {
            Ok(changes) => !changes.pending.is_empty(),
            Err(e) => {
                tracing::warn!(error = %e, "local pods' network namespaces not scanned");
                true
            }
        };
        let built = build(&settings, &objects, tracker.enrolled());
        let rejected: BTreeSet<String> = built.rejected.iter().cloned().collect();
        for reason in rejected.difference(&rejected_before) {
            tracing::warn!(%reason, "object left out of the snapshot");
            metrics.rejected.inc();
        }
        rejected_before = rejected;
        state.publish(built.resources);
        metrics.published.inc();
        if pending {
            // A local pod's sandbox has not started yet: look again soon even if the
            // API says nothing new.
            let _ = tokio::time::timeout(NETNS_RETRY, changed.notified()).await;
        } else {
            changed.notified().await;
        }
        tokio::time::sleep(SETTLE).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::pod_netns::tests::FakeProc;
    use crate::kube::pod_netns::{Metrics as NetnsMetrics, ProcScanner};
    use crate::kube::test_api::FakeApi;
    use crate::policy::MtlsMode;
    use crate::state::Snapshot;
    use serde_json::{Value, json};

    const NODE: &str = "worker-1";

    fn settings() -> Settings {
        Settings {
            node: NODE.into(),
            trust_domain: "cluster.local".into(),
            root_namespace: "istio-system".into(),
            l7: L7Settings::default(),
        }
    }

    fn uid(n: u32) -> String {
        format!("6c1d0000-0000-4000-8000-{n:012}")
    }

    /// A pod as the API server returns it.
    fn pod(ns: &str, name: &str, n: u32, node: &str, ips: &[&str], extra: Value) -> Value {
        let mut pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "uid": uid(n),
                         "resourceVersion": "100", "creationTimestamp": "2026-11-23T10:00:00Z",
                         "labels": {"app": name}},
            "spec": {"serviceAccountName": name, "nodeName": node,
                     "containers": [{"name": "app", "image": "example/app:1"}]},
            "status": {"phase": "Running",
                       "conditions": [{"type": "Ready", "status": "True"},
                                      {"type": "PodScheduled", "status": "True"}],
                       "podIP": ips.first(),
                       "podIPs": ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>()}
        });
        merge(&mut pod, extra);
        pod
    }

    fn merge(into: &mut Value, from: Value) {
        match (into, from) {
            (Value::Object(into), Value::Object(from)) => {
                for (k, v) in from {
                    merge(into.entry(k).or_insert(Value::Null), v);
                }
            }
            (into, from) => *into = from,
        }
    }

    fn namespace(name: &str, mode: Option<&str>) -> Value {
        let labels = mode
            .map(|m| json!({DATAPLANE_MODE_LABEL: m}))
            .unwrap_or(json!({}));
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": name, "labels": labels}})
    }

    fn policy(
        kind: &str,
        version: &str,
        ns: &str,
        name: &str,
        created: &str,
        spec: Value,
    ) -> Value {
        json!({"apiVersion": format!("security.istio.io/{version}"), "kind": kind,
               "metadata": {"name": name, "namespace": ns, "creationTimestamp": created,
                            "resourceVersion": "7"},
               "spec": spec})
    }

    fn parsed<T: serde::de::DeserializeOwned>(value: &Value) -> Arc<T> {
        Arc::new(serde_json::from_value(value.clone()).unwrap())
    }

    fn objects(values: &[(&str, Value)]) -> Objects {
        let mut objects = Objects::default();
        for (resource, v) in values {
            match *resource {
                "pods" => objects.pods.push(parsed(v)),
                "namespaces" => objects.namespaces.push(parsed(v)),
                "services" => objects.services.push(parsed(v)),
                "endpointslices" => objects.endpoint_slices.push(parsed(v)),
                _ => objects.policies.push(parsed(v)),
            }
        }
        objects
    }

    fn payments_service() -> Value {
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "payments", "namespace": "finance"},
               "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:96::10"],
                        "selector": {"app": "payments"},
                        "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
                                  {"name": "admin", "port": 8080, "targetPort": 8081, "protocol": "TCP"},
                                  {"name": "dns", "port": 53, "targetPort": 53, "protocol": "UDP"},
                                  {"name": "grpc", "port": 9000, "targetPort": "grpc", "protocol": "TCP"}]}})
    }

    fn strict_finance() -> Value {
        policy(
            "PeerAuthentication",
            "v1",
            "finance",
            "strict",
            "2026-11-23T10:02:00Z",
            json!({"mtls": {"mode": "STRICT"}}),
        )
    }

    fn payments_slice() -> Value {
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": "payments-x7k2p", "namespace": "finance",
                            "labels": {"kubernetes.io/service-name": "payments"}},
               "addressType": "IPv4",
               "endpoints": [{"addresses": ["10.244.1.7"], "conditions": {"ready": true},
                              "nodeName": NODE}],
               "ports": [{"name": "http", "port": 9090, "protocol": "TCP"},
                         {"name": "admin", "port": 8081, "protocol": "TCP"}]})
    }

    #[test]
    fn http_ports_come_from_the_pod_annotation_and_service_ports() {
        let annotated = |n, value: &str| {
            pod(
                "finance",
                &format!("p{n}"),
                n,
                NODE,
                &[&format!("10.244.1.{n}")],
                json!({"metadata": {"annotations": {HTTP_PORTS_ANNOTATION: value}}}),
            )
        };
        let mut service = payments_service();
        service["spec"]["ports"][1]["appProtocol"] = json!("kubernetes.io/h2c");
        service["spec"]["ports"][0]["appProtocol"] = json!("tcp");
        let objects = objects(&[
            ("namespaces", namespace("finance", Some("ambient"))),
            ("pods", annotated(1, "8080, 9090")),
            ("pods", annotated(2, "http")),
            ("services", service),
            ("endpointslices", payments_slice()),
        ]);
        let built = build(&settings(), &objects, &HashMap::new());
        let r = &built.resources;
        assert_eq!(r.workloads[0].http_ports, Some(vec![8080, 9090]));
        assert_eq!(r.workloads[1].http_ports, None);
        assert!(
            built.rejected.iter().any(|e| e.contains(
                "pod finance/p2: annotation ztunnel.io/http-ports ignored: \"http\" is not a port"
            )),
            "{:?}",
            built.rejected
        );
        let http: Vec<(u16, bool)> = r.services[0]
            .ports
            .iter()
            .map(|p| (p.port, p.http))
            .collect();
        // Port 80 is named http, but its appProtocol tcp wins; 8080 is named admin,
        // but its appProtocol is h2c.
        assert_eq!(http, [(80, false), (8080, true)]);
    }

    #[test]
    fn objects_become_workloads_services_and_policies() {
        let objects = objects(&[
            ("namespaces", namespace("finance", Some("ambient"))),
            ("namespaces", namespace("plain", None)),
            (
                "pods",
                pod(
                    "finance",
                    "payments",
                    1,
                    NODE,
                    &["10.244.1.7", "fd00::7"],
                    json!({}),
                ),
            ),
            (
                "pods",
                pod(
                    "finance",
                    "opted-out",
                    2,
                    NODE,
                    &["10.244.1.8"],
                    json!({"metadata": {"labels": {DATAPLANE_MODE_LABEL: "none"}}}),
                ),
            ),
            (
                "pods",
                pod("plain", "outsider", 3, NODE, &["10.244.1.9"], json!({})),
            ),
            (
                "pods",
                pod(
                    "plain",
                    "volunteer",
                    4,
                    "worker-2",
                    &["10.244.2.4"],
                    json!({"metadata": {"labels": {DATAPLANE_MODE_LABEL: "ambient"}}}),
                ),
            ),
            (
                "pods",
                pod(
                    "finance",
                    "hostnet",
                    5,
                    NODE,
                    &["172.18.0.3"],
                    json!({"spec": {"hostNetwork": true}}),
                ),
            ),
            (
                "pods",
                pod(
                    "finance",
                    "starting",
                    6,
                    NODE,
                    &[],
                    json!({"status": {"phase": "Pending", "conditions": []}}),
                ),
            ),
            (
                "pods",
                pod(
                    "finance",
                    "done",
                    7,
                    NODE,
                    &["10.244.1.10"],
                    json!({"status": {"phase": "Succeeded"}}),
                ),
            ),
            (
                "pods",
                pod(
                    "finance",
                    "leaving",
                    8,
                    NODE,
                    &["10.244.1.11"],
                    json!({"metadata": {"deletionTimestamp": "2026-11-23T10:05:00Z"}}),
                ),
            ),
            (
                "pods",
                pod(
                    "finance",
                    "warming",
                    9,
                    NODE,
                    &["10.244.1.12"],
                    json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}}),
                ),
            ),
            (
                "pods",
                pod(
                    "finance",
                    "defaulted",
                    10,
                    "worker-2",
                    &["10.244.2.5"],
                    json!({"spec": {"serviceAccountName": null}}),
                ),
            ),
            ("services", payments_service()),
            (
                "services",
                json!({"apiVersion": "v1", "kind": "Service",
                                "metadata": {"name": "headless", "namespace": "finance"},
                                "spec": {"clusterIP": "None", "ports": [{"port": 80}]}}),
            ),
            ("endpointslices", payments_slice()),
            ("peerauthentications", strict_finance()),
            (
                "authorizationpolicies",
                policy(
                    "AuthorizationPolicy",
                    "v1beta1",
                    "finance",
                    "allow-orders",
                    "2026-11-23T10:01:00Z",
                    json!({"selector": {"matchLabels": {"app": "payments"}}, "action": "ALLOW",
                       "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/orders"]}}]}]}),
                ),
            ),
            (
                "authorizationpolicies",
                policy(
                    "AuthorizationPolicy",
                    "v1",
                    "finance",
                    "typo",
                    "2026-11-23T10:03:00Z",
                    json!({"acton": "DENY"}),
                ),
            ),
        ]);
        let netns = HashMap::from([(
            PodUid::parse(&uid(1)).unwrap(),
            PodNetns {
                pid: 42,
                path: "/proc/42/ns/net".into(),
                inode: 4026532001,
            },
        )]);
        let built = build(&settings(), &objects, &netns);
        let r = &built.resources;
        assert_eq!(
            (r.node.as_str(), r.trust_domain.as_str()),
            (NODE, "cluster.local")
        );

        let summary: Vec<(String, bool, bool, Option<String>)> = r
            .workloads
            .iter()
            .map(|w| {
                (
                    w.key(),
                    w.meshed,
                    w.healthy,
                    w.netns.as_ref().map(|p| p.display().to_string()),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                ("finance/defaulted".into(), true, true, None),
                ("finance/hostnet".into(), false, true, None),
                ("finance/leaving".into(), true, false, None),
                ("finance/opted-out".into(), false, true, None),
                (
                    "finance/payments".into(),
                    true,
                    true,
                    Some("/proc/42/ns/net".into())
                ),
                ("finance/warming".into(), true, false, None),
                ("plain/outsider".into(), false, true, None),
                ("plain/volunteer".into(), true, true, None),
            ]
        );
        let payments = &r.workloads[4];
        assert_eq!(
            payments.identity.to_string(),
            "spiffe://cluster.local/ns/finance/sa/payments"
        );
        assert_eq!(
            payments.ips,
            vec![
                "10.244.1.7".parse::<IpAddr>().unwrap(),
                "fd00::7".parse().unwrap()
            ]
        );
        assert_eq!(payments.node, NODE);
        assert_eq!(payments.labels["app"], "payments");
        assert_eq!(r.workloads[0].service_account, "default");

        // Local meshed pods, including one that has no address yet; not the opted-out,
        // host-network, finished or remote ones.
        let local: Vec<&str> = built.local_pods.iter().map(PodUid::as_str).collect();
        assert_eq!(local, vec![uid(1), uid(6), uid(8), uid(9)]);

        assert_eq!(r.services.len(), 1, "the headless service has no VIP");
        let service = &r.services[0];
        assert_eq!(service.vips.len(), 2);
        assert_eq!(service.selector["app"], "payments");
        let ports: Vec<(u16, u16)> = service
            .ports
            .iter()
            .map(|p| (p.port, p.target_port))
            .collect();
        assert_eq!(
            ports,
            vec![(80, 9090), (8080, 8081)],
            "named port resolved, UDP left out"
        );

        let policies: Vec<String> = r
            .policies
            .iter()
            .map(|p| p.reference().to_string())
            .collect();
        assert_eq!(
            policies,
            vec!["finance/allow-orders", "finance/strict"],
            "oldest first"
        );
        match &r.policies[1] {
            Policy::Peer(p) => assert_eq!(p.mode, MtlsMode::Strict),
            other => panic!("expected a PeerAuthentication, got {other:?}"),
        }

        assert_eq!(built.rejected.len(), 2, "{:?}", built.rejected);
        assert!(
            built
                .rejected
                .iter()
                .any(|r| r.starts_with("service finance/payments port 9000")),
            "{:?}",
            built.rejected
        );
        assert!(
            built
                .rejected
                .iter()
                .any(|r| r.starts_with("AuthorizationPolicy finance/typo") && r.contains("acton")),
            "{:?}",
            built.rejected
        );
    }

    async fn until(state: &State, what: &str, done: impl Fn(&Snapshot) -> bool) -> Arc<Snapshot> {
        let mut changed = state.subscribe();
        let wait = async {
            loop {
                let snapshot = state.load();
                if state.is_loaded() && done(&snapshot) {
                    return snapshot;
                }
                changed.changed().await.unwrap();
            }
        };
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .unwrap_or_else(|_| panic!("timed out waiting until {what}"))
    }

    fn netns_of(snapshot: &Snapshot, key: &str) -> Option<PathBuf> {
        snapshot
            .workloads()
            .iter()
            .find(|w| w.key() == key)
            .and_then(|w| w.netns.clone())
    }

    use std::path::PathBuf;

    fn cgroup(n: u32) -> String {
        format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-1.scope\n",
            uid(n).replace('-', "_")
        )
    }

    #[tokio::test]
    async fn watches_feed_the_state_and_find_local_namespaces() {
        let api = FakeApi::empty();
        api.put_object("namespaces", namespace("finance", Some("ambient")));
        api.put_object(
            "pods",
            pod("finance", "payments", 1, NODE, &["10.244.1.7"], json!({})),
        );
        api.put_object(
            "pods",
            pod(
                "finance",
                "ledger",
                2,
                "worker-2",
                &["10.244.2.7"],
                json!({}),
            ),
        );
        api.put_object("services", payments_service());
        api.put_object("endpointslices", payments_slice());
        api.put_object("peerauthentications", strict_finance());
        // The first list of AuthorizationPolicies fails: the watch backs off and retries.
        api.unavailable("authorizationpolicies", 1);
        let proc = FakeProc::new(4026531840);
        proc.process(100, &cgroup(1), 4026532001);

        let state = State::new();
        let metrics = Metrics::default();
        let tracker = NetnsTracker::new(ProcScanner::new(proc.root()), NetnsMetrics::default());
        let source = KubeSource::start(
            api.client(),
            settings(),
            state.clone(),
            tracker,
            metrics.clone(),
        );

        let first = until(&state, "the first snapshot", |_| true).await;
        assert_eq!(first.workloads().len(), 2);
        assert_eq!(first.policies().len(), 1);
        assert_eq!(first.services().len(), 1);
        assert_eq!(
            netns_of(&first, "finance/payments"),
            Some(proc.root().join("100/ns/net"))
        );
        assert_eq!(netns_of(&first, "finance/ledger"), None, "not on this node");
        assert!(metrics.watch_errors("authorizationpolicies") >= 1);
        // Every kind was watched after its list.
        let queries = api.queries();
        for watched in [
            "pods",
            "namespaces",
            "services",
            "endpointslices",
            "peerauthentications",
            "authorizationpolicies",
        ] {
            assert!(
                api.calls()
                    .iter()
                    .zip(&queries)
                    .any(|(call, q)| call.ends_with(&format!("/{watched}"))
                        && q.contains("watch=true")),
                "{watched} is not watched: {:?}",
                api.calls()
            );
        }

        // A pod scheduled here whose sandbox has not started: published without a
        // namespace, then with it once its process shows up in /proc.
        api.apply(
            "pods",
            pod("finance", "fresh", 3, NODE, &["10.244.1.20"], json!({})),
        );
        let snapshot = until(&state, "the new pod is published", |s| {
            s.workloads().len() == 3
        })
        .await;
        assert_eq!(netns_of(&snapshot, "finance/fresh"), None);
        proc.process(300, &cgroup(3), 4026532003);
        until(&state, "the new pod's namespace is found", |s| {
            netns_of(s, "finance/fresh") == Some(proc.root().join("300/ns/net"))
        })
        .await;

        // A policy arrives by watch; a broken one is left out and counted.
        for (name, created, spec) in [
            (
                "deny-all",
                "2026-11-23T10:04:00Z",
                json!({"action": "DENY", "rules": [{}]}),
            ),
            ("broken", "2026-11-23T10:05:00Z", json!({"action": "MAYBE"})),
        ] {
            let object = policy("AuthorizationPolicy", "v1", "finance", name, created, spec);
            api.apply("authorizationpolicies", object);
        }
        until(&state, "the policy is published", |s| {
            s.policies().len() == 2
        })
        .await;
        let counted = async {
            while metrics.rejected() == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), counted)
            .await
            .expect("the broken policy is counted");

        // The pod is deleted: gone from the state.
        api.delete("pods", "finance", "payments");
        until(&state, "the deleted pod is gone", |s| {
            s.workloads().iter().all(|w| w.name != "payments")
        })
        .await;
        drop(source);
    }
}
