//! Readiness: the tunnel is ready once its first config is loaded and every
//! condition registered by another part (certificates, steering...) has been met.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

#[derive(Default)]
struct Inner {
    next: AtomicU64,
    pending: Mutex<BTreeMap<u64, String>>,
}

/// The conditions readiness waits for. Cheap to clone.
#[derive(Clone, Default)]
pub struct Readiness {
    inner: Arc<Inner>,
}

/// A registered condition; readiness waits until it is marked ready or dropped.
#[must_use = "a condition is met when this is marked ready or dropped"]
pub struct Condition {
    inner: Arc<Inner>,
    id: u64,
}

impl Readiness {
    pub fn new() -> Readiness {
        Readiness::default()
    }

    /// Adds a condition named `name` (shown while it is pending).
    pub fn register(&self, name: impl Into<String>) -> Condition {
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        self.inner
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, name.into());
        Condition {
            inner: self.inner.clone(),
            id,
        }
    }

    /// The names of the conditions not yet met.
    pub fn pending(&self) -> Vec<String> {
        self.inner
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }
}

impl Condition {
    /// Marks the condition met.
    pub fn ready(self) {}
}

impl Drop for Condition {
    fn drop(&mut self) {
        self.inner
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}
