//! Every manifest in deploy/ parsed into its Kubernetes type, with what the product
//! relies on checked: the DaemonSet's privileges and mounts, probes, RBAC that is exactly
//! least privilege, the CRDs, the kustomization, the kind cluster and the seed examples.
//! A field the type does not know (a typo) fails the round trip check.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Container, Namespace, PodSpec, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps,
};
use serde::de::DeserializeOwned;
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every document of a multi-document YAML file.
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            let value: serde_yaml::Value = serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            serde_json::to_value(value).unwrap()
        })
        .filter(|doc| !doc.is_null())
        .collect()
}

/// Parses into `T` and checks nothing was dropped on the way: the typed object
/// serializes back to the same JSON.
fn typed<T: DeserializeOwned + serde::Serialize>(doc: &Value, file: &Path) -> T {
    let name = format!("{} {}", file.display(), doc["metadata"]["name"]);
    let parsed: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{name}: {e}"));
    let back = serde_json::to_value(&parsed).unwrap();
    if let Some(path) = difference(doc, &back, String::new()) {
        panic!("{name}: {path} is unknown to the type (misspelled?) or changed by parsing");
    }
    parsed
}

/// The JSON path of the first place where `a` and `b` differ.
fn difference(a: &Value, b: &Value, path: String) -> Option<String> {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            keys.into_iter().find_map(|k| match (a.get(k), b.get(k)) {
                (Some(x), Some(y)) => difference(x, y, format!("{path}.{k}")),
                _ => Some(format!("{path}.{k}")),
            })
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (x, y))| difference(x, y, format!("{path}[{i}]"))),
        _ => (a != b).then_some(path),
    }
}

/// All Kubernetes objects in deploy/ (the kind config, kustomization and workflow aside).
#[derive(Default)]
struct Manifests {
    namespaces: BTreeMap<String, Namespace>,
    service_accounts: BTreeMap<(String, String), ServiceAccount>,
    cluster_roles: BTreeMap<String, ClusterRole>,
    cluster_role_bindings: BTreeMap<String, ClusterRoleBinding>,
    roles: BTreeMap<(String, String), Role>,
    role_bindings: BTreeMap<(String, String), RoleBinding>,
    daemon_sets: BTreeMap<(String, String), DaemonSet>,
    deployments: BTreeMap<(String, String), Deployment>,
    services: BTreeMap<(String, String), Service>,
    crds: BTreeMap<String, CustomResourceDefinition>,
    /// Istio custom resources (no k8s-openapi type): kept as JSON.
    istio: Vec<Value>,
}

fn key(doc: &Value) -> (String, String) {
    (
        doc["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        doc["metadata"]["name"].as_str().unwrap().to_string(),
    )
}

fn load(files: &[PathBuf]) -> Manifests {
    let mut m = Manifests::default();
    for file in files {
        for doc in documents(file) {
            let (ns, name) = key(&doc);
            let kind = doc["kind"].as_str().unwrap_or_default().to_string();
            match kind.as_str() {
                "Namespace" => drop(m.namespaces.insert(name, typed(&doc, file))),
                "ServiceAccount" => drop(m.service_accounts.insert((ns, name), typed(&doc, file))),
                "ClusterRole" => drop(m.cluster_roles.insert(name, typed(&doc, file))),
                "ClusterRoleBinding" => {
                    drop(m.cluster_role_bindings.insert(name, typed(&doc, file)))
                }
                "Role" => drop(m.roles.insert((ns, name), typed(&doc, file))),
                "RoleBinding" => drop(m.role_bindings.insert((ns, name), typed(&doc, file))),
                "DaemonSet" => drop(m.daemon_sets.insert((ns, name), typed(&doc, file))),
                "Deployment" => drop(m.deployments.insert((ns, name), typed(&doc, file))),
                "Service" => drop(m.services.insert((ns, name), typed(&doc, file))),
                "CustomResourceDefinition" => drop(m.crds.insert(name, typed(&doc, file))),
                "PeerAuthentication" | "AuthorizationPolicy" => m.istio.push(doc),
                other => panic!("{}: unexpected kind {other:?}", file.display()),
            }
        }
    }
    m
}

/// The install: what the kustomization lists.
fn install() -> Manifests {
    let dir = deploy_dir();
    let kustomization = &documents(&dir.join("kustomization.yaml"))[0];
    let files: Vec<PathBuf> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| dir.join(r.as_str().unwrap()))
        .collect();
    load(&files)
}

fn pod_spec(spec: Option<&k8s_openapi::api::core::v1::PodTemplateSpec>) -> &PodSpec {
    spec.unwrap().spec.as_ref().unwrap()
}

fn arg<'a>(container: &'a Container, flag: &str) -> Option<&'a str> {
    let prefix = format!("{flag}=");
    container
        .args
        .as_ref()?
        .iter()
        .find_map(|a| a.strip_prefix(&prefix))
}

fn daemonset() -> (Manifests, DaemonSet) {
    let m = install();
    let ds = m.daemon_sets[&("ztunnel-system".into(), "ztunnel".into())].clone();
    (m, ds)
}

#[test]
fn kustomization_lists_every_install_manifest_and_they_exist() {
    let dir = deploy_dir();
    let kustomization = &documents(&dir.join("kustomization.yaml"))[0];
    assert_eq!(kustomization["kind"], "Kustomization");
    let listed: BTreeSet<String> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    for file in &listed {
        assert!(
            dir.join(file).is_file(),
            "kustomization lists missing {file}"
        );
    }
    let mut on_disk = BTreeSet::new();
    for sub in ["", "crds"] {
        for entry in std::fs::read_dir(dir.join(sub)).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            if name.ends_with(".yaml") && name != "kustomization.yaml" {
                on_disk.insert(if sub.is_empty() {
                    name
                } else {
                    format!("{sub}/{name}")
                });
            }
        }
    }
    assert_eq!(
        listed, on_disk,
        "manifests in deploy/ and the kustomization differ"
    );
    assert_eq!(kustomization["images"][0]["name"], "ztunnel");
}

#[test]
fn daemonset_is_privileged_with_host_pid_and_the_host_mounts() {
    let (m, ds) = daemonset();
    let spec = &ds.spec;
    let pod = pod_spec(Some(&spec.template));
    assert_eq!(pod.host_pid, Some(true));
    assert_eq!(
        pod.host_network, None,
        "the tunnel lives in its own network namespace"
    );
    let account = pod.service_account_name.as_deref().unwrap();
    assert!(
        m.service_accounts
            .contains_key(&("ztunnel-system".into(), account.into()))
    );
    assert!(
        pod.tolerations
            .as_ref()
            .unwrap()
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")),
        "runs on every node, tainted ones included"
    );
    assert_eq!(pod.containers.len(), 1);
    let c = &pod.containers[0];
    assert_eq!(c.security_context.as_ref().unwrap().privileged, Some(true));
    assert_eq!(
        c.args.as_ref().unwrap()[..2],
        ["run".to_string(), "--kube".to_string()]
    );

    // Host paths, by mount point.
    let volumes: BTreeMap<&str, &k8s_openapi::api::core::v1::Volume> = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .map(|v| (v.name.as_str(), v))
        .collect();
    let mounts = c.volume_mounts.as_ref().unwrap();
    let host_path_at = |mount_path: &str| {
        let mount = mounts
            .iter()
            .find(|m| m.mount_path == mount_path)
            .unwrap_or_else(|| panic!("nothing mounted at {mount_path}"));
        let volume = volumes[mount.name.as_str()];
        (
            volume.host_path.as_ref().map(|h| h.path.clone()),
            mount.clone(),
        )
    };
    assert_eq!(
        host_path_at("/sys/fs/bpf").0.as_deref(),
        Some("/sys/fs/bpf")
    );
    let (cgroup, cgroup_mount) = host_path_at("/sys/fs/cgroup");
    assert_eq!(cgroup.as_deref(), Some("/sys/fs/cgroup"));
    assert_eq!(cgroup_mount.read_only, Some(true));
    let (proc_path, _) = host_path_at("/host/proc");
    assert_eq!(proc_path.as_deref(), Some("/proc"));
    assert_eq!(arg(c, "--proc-root"), Some("/host/proc"));

    // NODE_NAME from the downward API.
    let env = c.env.as_ref().unwrap();
    let node = env.iter().find(|e| e.name == "NODE_NAME").unwrap();
    let field = node
        .value_from
        .as_ref()
        .unwrap()
        .field_ref
        .as_ref()
        .unwrap();
    assert_eq!(field.field_path, "spec.nodeName");

    // Readiness on :15021 /healthz/ready.
    let probe = c
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(probe.path.as_deref(), Some("/healthz/ready"));
    assert_eq!(
        probe.port,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(15021)
    );

    // Resource requests for both CPU and memory.
    let requests = c.resources.as_ref().unwrap().requests.as_ref().unwrap();
    assert!(
        requests.contains_key("cpu") && requests.contains_key("memory"),
        "{requests:?}"
    );
}

#[test]
fn tunnel_token_and_bundle_match_what_the_ca_expects() {
    let (m, ds) = daemonset();
    let pod = pod_spec(Some(&ds.spec.template));
    let tunnel = &pod.containers[0];
    let ca_deploy = &m.deployments[&("ztunnel-system".into(), "ztunnel-ca".into())];
    let ca_pod = pod_spec(Some(&ca_deploy.spec.template));
    let ca = &ca_pod.containers[0];
    assert_eq!(
        ca.args.as_ref().unwrap()[..2],
        ["ca".to_string(), "serve".to_string()]
    );

    // The projected token: the CA's audience, short-lived, where the tunnel reads it.
    let token_volume = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find_map(|v| {
            let source = v.projected.as_ref()?.sources.as_ref()?.first()?;
            Some((v.name.clone(), source.service_account_token.clone()?))
        })
        .expect("a projected ServiceAccount token volume");
    let (volume, token) = token_volume;
    assert_eq!(
        Some(token.audience.as_deref().unwrap()),
        arg(ca, "--audience")
    );
    assert!(token.expiration_seconds.unwrap() <= 3600);
    let mount = tunnel
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.name == volume)
        .unwrap();
    assert_eq!(
        arg(tunnel, "--ca-token-file").unwrap(),
        format!("{}/{}", mount.mount_path, token.path)
    );

    // The CA accepts exactly the DaemonSet's ServiceAccount.
    let tunnel_sa = format!(
        "{}/{}",
        ds.metadata.namespace.as_deref().unwrap(),
        pod.service_account_name.as_deref().unwrap()
    );
    assert_eq!(
        arg(ca, "--tunnel-service-account"),
        Some(tunnel_sa.as_str())
    );

    // The bundle ConfigMap the CA publishes is the one the tunnel mounts and reads.
    let bundle_cm = arg(ca, "--bundle-config-map").unwrap();
    let bundle_volume = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.config_map.as_ref().map(|c| c.name.as_str()) == Some(bundle_cm))
        .expect("the trust bundle ConfigMap is mounted");
    let bundle_mount = tunnel
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.name == bundle_volume.name)
        .unwrap();
    assert_eq!(
        arg(tunnel, "--trust-bundle").unwrap(),
        format!(
            "{}/{}",
            bundle_mount.mount_path,
            ztunnel::kube::ca::BUNDLE_CONFIG_MAP_KEY
        )
    );

    // The CA address names its Service and port.
    let service = &m.services[&("ztunnel-system".into(), "ztunnel-ca".into())];
    let port = service.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port;
    assert_eq!(port, i32::from(ztunnel::kube::ca::DEFAULT_PORT));
    assert_eq!(
        arg(tunnel, "--ca-address"),
        Some(format!("ztunnel-ca.ztunnel-system.svc:{port}").as_str())
    );
    let selector = service.spec.as_ref().unwrap().selector.as_ref().unwrap();
    let labels = ca_deploy
        .spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .as_ref()
        .unwrap();
    assert!(selector.iter().all(|(k, v)| labels.get(k) == Some(v)));

    // The CA itself runs unprivileged.
    let security = ca_pod.security_context.as_ref().unwrap();
    assert_eq!(security.run_as_non_root, Some(true));
    let container_security = ca.security_context.as_ref().unwrap();
    assert_eq!(container_security.allow_privilege_escalation, Some(false));
    assert_eq!(container_security.read_only_root_filesystem, Some(true));
    assert!(ca.readiness_probe.is_some() && ca.resources.as_ref().unwrap().requests.is_some());
}

/// (apiGroup, resource, resourceName or "", verb), one per combination.
fn grants(rules: &[PolicyRule]) -> BTreeSet<(String, String, String, String)> {
    let mut out = BTreeSet::new();
    for rule in rules {
        let groups = rule.api_groups.clone().unwrap_or_default();
        let resources = rule.resources.clone().unwrap_or_default();
        let names = rule
            .resource_names
            .clone()
            .unwrap_or_else(|| vec![String::new()]);
        assert!(rule.non_resource_urls.is_none());
        for g in &groups {
            for r in &resources {
                for n in &names {
                    for v in &rule.verbs {
                        assert!(g != "*" && r != "*" && v != "*", "wildcard in {rule:?}");
                        out.insert((g.clone(), r.clone(), n.clone(), v.clone()));
                    }
                }
            }
        }
    }
    out
}

fn expect(list: &[(&str, &str, &str, &str)]) -> BTreeSet<(String, String, String, String)> {
    list.iter()
        .map(|(g, r, n, v)| (g.to_string(), r.to_string(), n.to_string(), v.to_string()))
        .collect()
}

#[test]
fn rbac_is_exactly_least_privilege() {
    let m = install();
    let read = ["get", "list", "watch"];
    let mut tunnel = Vec::new();
    for (group, resource) in [
        ("", "pods"),
        ("", "namespaces"),
        ("", "services"),
        ("discovery.k8s.io", "endpointslices"),
        ("security.istio.io", "peerauthentications"),
        ("security.istio.io", "authorizationpolicies"),
    ] {
        for verb in read {
            tunnel.push((group, resource, "", verb));
        }
    }
    assert_eq!(
        grants(m.cluster_roles["ztunnel"].rules.as_ref().unwrap()),
        expect(&tunnel)
    );
    assert_eq!(
        grants(m.cluster_roles["ztunnel-ca"].rules.as_ref().unwrap()),
        expect(&[
            ("authentication.k8s.io", "tokenreviews", "", "create"),
            ("", "pods", "", "get"),
            ("", "pods", "", "list"),
        ])
    );
    let ca_role = &m.roles[&("ztunnel-system".into(), "ztunnel-ca".into())];
    assert_eq!(
        grants(ca_role.rules.as_ref().unwrap()),
        expect(&[
            ("", "secrets", "", "create"),
            ("", "secrets", "ztunnel-ca", "get"),
            ("", "configmaps", "", "create"),
            ("", "configmaps", "ztunnel-trust-bundle", "get"),
            ("", "configmaps", "ztunnel-trust-bundle", "update"),
        ])
    );
    // The names in the Role are the ones the CA is told to use.
    let ca_deploy = &m.deployments[&("ztunnel-system".into(), "ztunnel-ca".into())];
    let ca = &pod_spec(Some(&ca_deploy.spec.template)).containers[0];
    assert_eq!(arg(ca, "--secret"), Some("ztunnel-ca"));
    assert_eq!(arg(ca, "--bundle-config-map"), Some("ztunnel-trust-bundle"));

    // Each role is bound to its own ServiceAccount, and to nothing else.
    let bound_account = |role: &str, subjects: &[k8s_openapi::api::rbac::v1::Subject]| {
        assert_eq!(subjects.len(), 1, "{role}");
        assert_eq!(subjects[0].kind, "ServiceAccount");
        assert_eq!(subjects[0].namespace.as_deref(), Some("ztunnel-system"));
        subjects[0].name.clone()
    };
    assert_eq!(m.cluster_role_bindings.len(), 2);
    for (name, b) in &m.cluster_role_bindings {
        assert_eq!(b.role_ref.kind, "ClusterRole");
        assert_eq!(&b.role_ref.name, name);
        assert_eq!(&bound_account(name, b.subjects.as_ref().unwrap()), name);
    }
    assert_eq!(m.role_bindings.len(), 1);
    for ((_, name), b) in &m.role_bindings {
        assert_eq!(b.role_ref.kind, "Role");
        assert_eq!(&bound_account(name, b.subjects.as_ref().unwrap()), name);
    }
    assert_eq!(
        m.service_accounts
            .keys()
            .map(|(_, n)| n.as_str())
            .collect::<Vec<_>>(),
        vec!["ztunnel", "ztunnel-ca"]
    );
    assert_eq!(
        m.namespaces["ztunnel-system"]
            .metadata
            .labels
            .as_ref()
            .unwrap()["istio.io/dataplane-mode"],
        "none",
        "the tunnel's own namespace is never meshed"
    );
}

fn crd_schema<'a>(crd: &'a CustomResourceDefinition, version: &str) -> &'a JSONSchemaProps {
    crd.spec
        .versions
        .iter()
        .find(|v| v.name == version)
        .unwrap()
        .schema
        .as_ref()
        .unwrap()
        .open_api_v3_schema
        .as_ref()
        .unwrap()
}

fn prop<'a>(schema: &'a JSONSchemaProps, path: &[&str]) -> &'a JSONSchemaProps {
    path.iter().fold(schema, |s, p| {
        s.properties
            .as_ref()
            .and_then(|props| props.get(*p))
            .unwrap_or_else(|| panic!("schema has no property {p} on the way to {path:?}"))
    })
}

#[test]
fn istio_crds_serve_v1_and_v1beta1() {
    let m = install();
    for (name, kind) in [
        (
            "peerauthentications.security.istio.io",
            "PeerAuthentication",
        ),
        (
            "authorizationpolicies.security.istio.io",
            "AuthorizationPolicy",
        ),
    ] {
        let crd = &m.crds[name];
        assert_eq!(crd.spec.group, "security.istio.io");
        assert_eq!(crd.spec.names.kind, kind);
        assert_eq!(crd.spec.scope, "Namespaced");
        let versions: Vec<(&str, bool, bool)> = crd
            .spec
            .versions
            .iter()
            .map(|v| (v.name.as_str(), v.served, v.storage))
            .collect();
        assert_eq!(versions, vec![("v1", true, true), ("v1beta1", true, false)]);
        assert_eq!(crd_schema(crd, "v1"), crd_schema(crd, "v1beta1"), "{name}");
        let schema = crd_schema(crd, "v1");
        assert_eq!(
            prop(schema, &["status"]).x_kubernetes_preserve_unknown_fields,
            Some(true)
        );
        assert!(
            prop(schema, &["spec", "selector", "matchLabels"])
                .additional_properties
                .is_some()
        );
    }
    let pa = crd_schema(&m.crds["peerauthentications.security.istio.io"], "v1");
    let modes: Vec<String> = prop(pa, &["spec", "mtls", "mode"])
        .enum_
        .as_ref()
        .unwrap()
        .iter()
        .map(|v| v.0.as_str().unwrap().to_string())
        .collect();
    assert_eq!(modes, ["UNSET", "DISABLE", "PERMISSIVE", "STRICT"]);
    let ap = crd_schema(&m.crds["authorizationpolicies.security.istio.io"], "v1");
    let rules = prop(ap, &["spec", "rules"]);
    let rule = match rules.items.as_ref().unwrap() {
        k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrArray::Schema(s) => s,
        other => panic!("rules items: {other:?}"),
    };
    for part in ["from", "to"] {
        let items = match prop(rule, &[part]).items.as_ref().unwrap() {
            k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrArray::Schema(s) => s,
            other => panic!("{part} items: {other:?}"),
        };
        assert_eq!(
            items.x_kubernetes_preserve_unknown_fields,
            Some(true),
            "{part}"
        );
    }
}

#[test]
fn seed_examples_use_the_crds_and_select_real_workloads() {
    let dir = deploy_dir().join("examples");
    let examples = load(&[dir.join("workloads.yaml"), dir.join("policies.yaml")]);
    let crds = install().crds;
    let ambient = |ns: &str| {
        examples.namespaces[ns]
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("istio.io/dataplane-mode"))
            .map(String::as_str)
    };
    for ns in ["finance", "shop", "warehouse"] {
        assert_eq!(ambient(ns), Some("ambient"), "{ns}");
    }
    assert_eq!(
        ambient("plain"),
        None,
        "the plaintext client's namespace is not meshed"
    );

    let mut seen = BTreeSet::new();
    for policy in &examples.istio {
        let kind = policy["kind"].as_str().unwrap();
        let (ns, name) = key(policy);
        assert_eq!(policy["apiVersion"], "security.istio.io/v1", "{name}");
        assert!(
            examples.namespaces.contains_key(&ns),
            "{name}: namespace {ns}"
        );
        let crd = crds.values().find(|c| c.spec.names.kind == kind).unwrap();
        let schema = prop(crd_schema(crd, "v1"), &["spec"]);
        for field in policy["spec"].as_object().unwrap().keys() {
            assert!(
                schema.properties.as_ref().unwrap().contains_key(field),
                "{name}: spec.{field} is not in the {kind} schema"
            );
        }
        if let Some(mode) = policy["spec"]["mtls"]["mode"].as_str() {
            let allowed = prop(schema, &["mtls", "mode"]).enum_.as_ref().unwrap();
            assert!(allowed.iter().any(|v| v.0 == mode), "{name}: mode {mode}");
        }
        // A selector must match a workload of its namespace.
        if let Some(labels) = policy["spec"]["selector"]["matchLabels"].as_object() {
            let matches = examples.deployments.iter().any(|((dns, _), d)| {
                let pod_labels = d
                    .spec
                    .template
                    .metadata
                    .as_ref()
                    .unwrap()
                    .labels
                    .clone()
                    .unwrap_or_default();
                *dns == ns
                    && labels
                        .iter()
                        .all(|(k, v)| pod_labels.get(k).map(String::as_str) == v.as_str())
            });
            assert!(
                matches,
                "{name}: selector {labels:?} matches no workload in {ns}"
            );
        }
        // Principals name ServiceAccounts that exist.
        for rule in policy["spec"]["rules"].as_array().into_iter().flatten() {
            for from in rule["from"].as_array().into_iter().flatten() {
                for principal in from["source"]["principals"]
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    let p = principal.as_str().unwrap();
                    let parts: Vec<&str> = p.split('/').collect();
                    assert!(
                        matches!(parts.as_slice(), ["cluster.local", "ns", _, "sa", _]),
                        "{name}: principal {p}"
                    );
                    assert!(
                        examples
                            .service_accounts
                            .contains_key(&(parts[2].into(), parts[4].into())),
                        "{name}: principal {p} has no ServiceAccount"
                    );
                }
            }
        }
        seen.insert(format!(
            "{kind} {ns}/{name} {}",
            policy["spec"]["mtls"]["mode"]
                .as_str()
                .or(policy["spec"]["action"].as_str())
                .unwrap()
        ));
    }
    assert_eq!(
        seen,
        [
            "PeerAuthentication shop/default STRICT",
            "PeerAuthentication finance/default PERMISSIVE",
            "PeerAuthentication finance/payments-strict STRICT",
            "AuthorizationPolicy finance/orders-to-payments ALLOW",
            "AuthorizationPolicy finance/deny-inventory DENY",
        ]
        .into_iter()
        .map(String::from)
        .collect()
    );
}

#[test]
fn kind_cluster_workflow_and_image_fit_together() {
    let dir = deploy_dir();
    let kind = &documents(&dir.join("kind/cluster.yaml"))[0];
    assert_eq!(kind["kind"], "Cluster");
    assert_eq!(kind["apiVersion"], "kind.x-k8s.io/v1alpha4");
    let roles: Vec<&str> = kind["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["control-plane", "worker", "worker"]);

    let workflow_path = dir.join("../.github/workflows/e2e-kind.yml");
    let workflow = &documents(&workflow_path)[0];
    let steps = workflow["jobs"]["e2e"]["steps"].as_array().unwrap();
    let text = serde_json::to_string(steps).unwrap();
    for needed in [
        "deploy/Dockerfile",
        "deploy/kind/cluster.yaml",
        "kind load docker-image ztunnel:dev",
        "kubectl apply -k deploy/",
        "deploy/examples/workloads.yaml",
        "deploy/examples/policies.yaml",
        "deploy/e2e/seed-checks.sh",
    ] {
        assert!(text.contains(needed), "the workflow does not use {needed}");
    }
    let script = dir.join("e2e/seed-checks.sh");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&script).unwrap().permissions());
    assert!(mode & 0o111 != 0, "seed-checks.sh is executable");

    // The image built by the workflow is the one the manifests run.
    let kustomization = &documents(&dir.join("kustomization.yaml"))[0];
    let image = &kustomization["images"][0];
    assert_eq!(
        format!(
            "{}:{}",
            image["newName"].as_str().unwrap(),
            image["newTag"].as_str().unwrap()
        ),
        "ztunnel:dev"
    );
    let dockerfile = std::fs::read_to_string(dir.join("Dockerfile")).unwrap();
    assert!(dockerfile.contains("cargo xtask build-ebpf"));
    assert!(dockerfile.matches("\nFROM ").count() >= 1 && dockerfile.contains(" AS runtime"));
}
