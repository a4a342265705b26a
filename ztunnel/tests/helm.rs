//! The Helm chart (deploy/helm/ztunnel) passes `helm lint`, and `helm template` with
//! default values renders exactly the objects of `kubectl kustomize deploy/`: the same
//! kinds and names, and in each the same images, privileges, mounts and RBAC (the whole
//! object is compared). Values change what they name. `helm` is installed by
//! `cargo xtask setup`; `kubectl` comes with the machine.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn chart() -> String {
    deploy_dir().join("helm/ztunnel").display().to_string()
}

/// Runs `program args`, failing with its stderr; returns its stdout.
fn output(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| {
        panic!("cannot run {program} ({e}): `cargo xtask setup` installs helm, kubectl comes with the machine")
    });
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The objects of a multi-document YAML stream, by (kind, namespace, name).
fn objects(yaml: &str) -> BTreeMap<(String, String, String), Value> {
    let mut objects = BTreeMap::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value: serde_yaml::Value = serde::Deserialize::deserialize(doc).unwrap();
        let value = serde_json::to_value(value).unwrap();
        if value.is_null() {
            continue;
        }
        let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
        let key = (
            text(&value["kind"]),
            text(&value["metadata"]["namespace"]),
            text(&value["metadata"]["name"]),
        );
        assert!(
            objects.insert(key.clone(), value).is_none(),
            "{key:?} twice"
        );
    }
    objects
}

fn template(set: &[&str]) -> BTreeMap<(String, String, String), Value> {
    let chart = chart();
    let mut args = vec!["template", "ztunnel", chart.as_str(), "--include-crds"];
    for s in set {
        args.extend(["--set", s]);
    }
    objects(&output("helm", &args))
}

#[test]
fn helm_lint_passes() {
    let chart = chart();
    let out = output("helm", &["lint", "--strict", &chart]);
    assert!(out.contains("0 chart(s) failed"), "{out}");
}

#[test]
fn default_values_render_what_kustomize_does() {
    let helm = template(&[]);
    let kustomize = objects(&output(
        "kubectl",
        &["kustomize", &deploy_dir().display().to_string()],
    ));
    assert_eq!(
        helm.keys().collect::<Vec<_>>(),
        kustomize.keys().collect::<Vec<_>>(),
        "kinds and names differ"
    );
    for kind in [
        "CustomResourceDefinition",
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Deployment",
        "Service",
        "DaemonSet",
    ] {
        assert!(helm.keys().any(|k| k.0 == kind), "no {kind} rendered");
    }
    for (key, object) in &helm {
        assert_eq!(
            object, &kustomize[key],
            "{key:?} differs between helm template and kubectl kustomize"
        );
    }
}

fn container<'a>(
    objects: &'a BTreeMap<(String, String, String), Value>,
    kind: &str,
    namespace: &str,
    name: &str,
) -> &'a Value {
    let key = (kind.to_string(), namespace.to_string(), name.to_string());
    &objects.get(&key).unwrap_or_else(|| panic!("no {key:?}"))["spec"]["template"]["spec"]["containers"]
        [0]
}

fn env<'a>(container: &'a Value, name: &str) -> &'a Value {
    &container["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no env {name}"))["value"]
}

fn has_arg(container: &Value, arg: &str) -> bool {
    container["args"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a == arg)
}

#[test]
fn values_change_what_they_name() {
    let objects = template(&[
        "namespace=mesh",
        "createNamespace=false",
        "image.repository=registry.example/ztunnel",
        "image.tag=1.2.3",
        "trustDomain=example.org",
        "logLevel=debug",
        "logFormat=json",
        "l7Authorization=waypoint",
        "pathNormalization=BASE",
        "excludedPeers={10.0.0.0/8,192.168.1.5}",
        "ca.certLifetimeSeconds=3600",
        "ca.port=16012",
        "resources.limits.memory=2Gi",
        "tolerations[0].key=dedicated",
        "tolerations[0].operator=Exists",
    ]);
    assert!(!objects.keys().any(|k| k.0 == "Namespace"));
    let tunnel = container(&objects, "DaemonSet", "mesh", "ztunnel");
    let ca = container(&objects, "Deployment", "mesh", "ztunnel-ca");
    for c in [tunnel, ca] {
        assert_eq!(c["image"], "registry.example/ztunnel:1.2.3");
        assert!(has_arg(c, "--trust-domain=example.org"), "{c}");
        assert_eq!(env(c, "RUST_LOG"), "debug");
        assert_eq!(env(c, "LOG_FORMAT"), "json");
    }
    assert_eq!(env(tunnel, "L7_AUTHORIZATION"), "waypoint");
    assert_eq!(env(tunnel, "PATH_NORMALIZATION"), "BASE");
    assert!(has_arg(
        tunnel,
        "--exclude-peer=$(HOST_IP),10.0.0.0/8,192.168.1.5"
    ));
    assert!(has_arg(tunnel, "--ca-address=ztunnel-ca.mesh.svc:16012"));
    assert_eq!(tunnel["resources"]["limits"]["memory"], "2Gi");
    assert!(has_arg(ca, "--cert-lifetime-secs=3600"));
    assert!(has_arg(ca, "--listen=0.0.0.0:16012"));
    assert!(has_arg(ca, "--tunnel-service-account=mesh/ztunnel"));
    let service = &objects[&("Service".into(), "mesh".into(), "ztunnel-ca".into())];
    assert_eq!(service["spec"]["ports"][0]["port"], 16012);
    let ds = &objects[&("DaemonSet".into(), "mesh".into(), "ztunnel".into())];
    assert_eq!(
        ds["spec"]["template"]["spec"]["tolerations"],
        serde_json::json!([{"key": "dedicated", "operator": "Exists"}])
    );
    let binding = &objects[&("ClusterRoleBinding".into(), String::new(), "ztunnel".into())];
    assert_eq!(binding["subjects"][0]["namespace"], "mesh");
}
