use std::path::Path;
use std::time::Duration;

use prometheus_client::encoding::text::encode;

use super::*;

const ONE: &str = "node: node-a\nworkloads:\n- {name: orders, namespace: prod, ips: [10.0.2.4]}\n";
const TWO: &str = "node: node-a\nworkloads:\n- {name: orders, namespace: prod, ips: [10.0.2.4]}\n- {name: web, namespace: shop, ips: [10.0.4.1]}\n";
const THREE: &str = "node: node-a\nworkloads:\n- {name: web, namespace: shop, ips: [10.0.4.1]}\n";
const BROKEN: &str =
    "node: node-a\nworkloads:\n- {name: orders, namespace: prod, ips: [10.0.2.400]}\n";

/// Replaces the file the way editors and ConfigMaps do: write aside, then rename.
fn replace(path: &Path, text: &str) {
    let aside = path.with_extension("tmp");
    std::fs::write(&aside, text).unwrap();
    std::fs::rename(&aside, path).unwrap();
}

fn metric(registry: &Registry, name: &str) -> Option<u64> {
    let mut text = String::new();
    encode(&mut text, registry).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.parse().ok())
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn good_edits_apply_and_bad_edits_keep_the_last_good_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, ONE).unwrap();
    let config = config::load(&path).unwrap();
    let state = State::new();
    let mut registry = Registry::default();
    let _source = LocalSource::start(&config, state.clone(), &mut registry).unwrap();
    assert_eq!(state.load().workloads().len(), 1);
    assert_eq!(metric(&registry, "config_rejected_total"), Some(0));

    replace(&path, TWO);
    wait_for("the renamed file to apply", || {
        state.load().workloads().len() == 2
    })
    .await;
    assert_eq!(metric(&registry, "config_reloads_total"), Some(1));

    std::fs::write(&path, BROKEN).unwrap();
    wait_for("the broken edit to be rejected", || {
        metric(&registry, "config_rejected_total") == Some(1)
    })
    .await;
    let snap = state.load();
    assert_eq!(
        snap.generation(),
        2,
        "nothing published for the broken edit"
    );
    assert!(snap.workload("shop", "web").is_some());

    replace(&path, "node: node-b\n");
    wait_for("the node change to be rejected", || {
        metric(&registry, "config_rejected_total") == Some(2)
    })
    .await;
    assert_eq!(state.load().node(), "node-a");

    std::fs::write(&path, THREE).unwrap();
    wait_for("the in-place write to apply", || {
        state.load().workloads().len() == 1
    })
    .await;
    assert!(state.load().workload("prod", "orders").is_none());
    assert_eq!(metric(&registry, "config_reloads_total"), Some(2));
}
