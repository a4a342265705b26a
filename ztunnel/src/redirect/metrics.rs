//! Counters of the steering layer.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// What the steering layer was asked to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Operation {
    enrol,
    release,
    reconcile,
    original_destination,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OperationLabels {
    operation: Operation,
}

/// Steering counters; cheap to clone (the clones count together).
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    failures: Family<OperationLabels, Counter>,
    enrolled: Gauge,
    missing_destinations: Counter,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Metrics::default();
        registry.register(
            "ztunnel_redirect_failures",
            "Steering operations that failed, by operation",
            metrics.failures.clone(),
        );
        registry.register(
            "ztunnel_redirect_enrolled_pods",
            "Pods whose traffic this tunnel steers",
            metrics.enrolled.clone(),
        );
        registry.register(
            "ztunnel_redirect_missing_original_destinations",
            "Captured outbound connections with no recorded original destination",
            metrics.missing_destinations.clone(),
        );
        metrics
    }

    /// Failures counted so far for `operation`.
    pub fn failures(&self, operation: Operation) -> u64 {
        self.failures
            .get_or_create(&OperationLabels { operation })
            .get()
    }

    /// Pods enrolled by this tunnel now.
    pub fn enrolled(&self) -> i64 {
        self.enrolled.get()
    }

    /// Look-ups of an original destination that found none.
    pub fn missing_destinations(&self) -> u64 {
        self.missing_destinations.get()
    }

    pub(super) fn count<T, E>(&self, operation: Operation, result: &Result<T, E>) {
        if result.is_err() {
            self.failures
                .get_or_create(&OperationLabels { operation })
                .inc();
        }
    }

    pub(super) fn set_enrolled(&self, pods: usize) {
        self.enrolled.set(i64::try_from(pods).unwrap_or(i64::MAX));
    }

    pub(super) fn missing_destination(&self) {
        self.missing_destinations.inc();
    }
}
