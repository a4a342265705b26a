//! The tunnel's own state as metrics: its build, and whether it is ready (the same
//! answer `/healthz/ready` gives, read at scrape time).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use super::Readiness;
use crate::state::State;

/// What readiness still waits for; empty when the tunnel is ready.
pub(super) fn waiting(state: &State, readiness: &Readiness) -> Vec<String> {
    let mut waiting = Vec::new();
    if !state.is_loaded() {
        waiting.push("config".to_string());
    }
    waiting.extend(readiness.pending());
    waiting
}

struct Ready {
    state: State,
    readiness: Readiness,
}

impl std::fmt::Debug for Ready {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ready")
    }
}

impl Collector for Ready {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let ready = waiting(&self.state, &self.readiness).is_empty();
        encoder
            .encode_descriptor(
                "ztunnel_ready",
                "1 when the tunnel is ready (config loaded, workloads enrolled with certificates), else 0",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&i64::from(ready))
    }
}

/// Registers `ztunnel_build_info` and `ztunnel_ready`.
pub fn register(registry: &mut Registry, state: State, readiness: Readiness) {
    registry.register(
        "ztunnel_build",
        "The running build: version and target",
        Info::new(vec![
            ("version", env!("CARGO_PKG_VERSION")),
            ("arch", std::env::consts::ARCH),
            ("os", std::env::consts::OS),
        ]),
    );
    registry.register_collector(Box::new(Ready { state, readiness }));
}
