//! Open inbound connections, re-checked whenever the state changes: a connection that
//! a new policy denies is told to close, and the log names the policy.
//!
//! The proxy tracks each inbound connection once it is authorized and selects on
//! [`Tracked::closed`] beside its byte copy; dropping the [`Tracked`] forgets the
//! connection. [`ConnectionTracker::run`] re-checks on every published snapshot.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::sync::oneshot;
use tracing::warn;

use super::{OpenConnection, Snapshot, State};
use crate::policy::Decision;

struct Entry {
    conn: OpenConnection,
    close: oneshot::Sender<Decision>,
}

#[derive(Default)]
struct Inner {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Entry>>,
    closed: Counter,
}

/// The open inbound connections. Cheap to clone.
#[derive(Clone, Default)]
pub struct ConnectionTracker {
    inner: Arc<Inner>,
}

/// One tracked connection; dropping it forgets the connection.
pub struct Tracked {
    inner: Arc<Inner>,
    id: u64,
    closed: oneshot::Receiver<Decision>,
    decided: Option<Decision>,
}

impl ConnectionTracker {
    /// Registers `connections_closed_by_policy_total`.
    pub fn new(registry: &mut Registry) -> ConnectionTracker {
        let tracker = ConnectionTracker::default();
        registry.register(
            "connections_closed_by_policy",
            "Open connections closed because a policy change denies them",
            tracker.inner.closed.clone(),
        );
        tracker
    }

    fn open(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.inner
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts tracking an authorized connection.
    pub fn track(&self, conn: OpenConnection) -> Tracked {
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let (close, closed) = oneshot::channel();
        self.open().insert(id, Entry { conn, close });
        Tracked {
            inner: self.inner.clone(),
            id,
            closed,
            decided: None,
        }
    }

    /// How many connections are tracked.
    pub fn len(&self) -> usize {
        self.open().len()
    }

    pub fn is_empty(&self) -> bool {
        self.open().is_empty()
    }

    /// Re-checks every tracked connection against `snapshot`, tells those it denies to
    /// close, and logs each with the deciding policy. Returns how many were closed.
    pub fn revalidate(&self, snapshot: &Snapshot) -> usize {
        let mut open = self.open();
        let denied = snapshot.revalidate(open.iter().map(|(id, e)| (*id, &e.conn)));
        for (id, decision) in &denied {
            let Some(entry) = open.remove(id) else {
                continue;
            };
            let policy = decision
                .policy
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default();
            let peer = entry
                .conn
                .identity
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default();
            warn!(
                %policy,
                src = %entry.conn.src_ip,
                identity = %peer,
                dst = %entry.conn.dst,
                reason = %decision.reason,
                "closing connection: the policy now denies it"
            );
            self.inner.closed.inc();
            // The connection may have ended meanwhile; then nobody listens.
            let _ = entry.close.send(decision.clone());
        }
        denied.len()
    }

    /// Re-checks the tracked connections now and each time `state` publishes a
    /// snapshot (subscribed when called, so no change after this call is missed).
    pub fn run(self, state: State) -> impl Future<Output = ()> + Send + 'static {
        let mut changes = state.subscribe();
        async move {
            loop {
                self.revalidate(&state.load());
                if changes.changed().await.is_err() {
                    break;
                }
            }
        }
    }
}

impl Tracked {
    /// Resolves when a policy change denies this connection, with the decision that
    /// denies it. Never resolves while the connection stays allowed.
    pub async fn closed(&mut self) -> Decision {
        if let Some(d) = &self.decided {
            return d.clone();
        }
        match (&mut self.closed).await {
            Ok(d) => self.decided.insert(d).clone(),
            Err(_) => std::future::pending().await,
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.inner
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}
