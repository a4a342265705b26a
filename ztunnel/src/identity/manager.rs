//! The certificate manager: one certificate per identity with a workload on this node,
//! issued when the first such workload appears, renewed at about half-life, dropped when
//! the last one leaves. Keys are generated here and never leave the node.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use rand::Rng;
use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::crypto::CryptoProvider;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;

use super::{CertificateAuthority, CertificateInfo, Error, Identity, WorkloadCertificate};

/// First retry delay after a failed issuance; doubles up to [`BACKOFF_MAX`].
pub const BACKOFF_MIN: Duration = Duration::from_millis(500);
pub const BACKOFF_MAX: Duration = Duration::from_secs(150);

/// Where an identity's certificate stands.
#[derive(Clone, Debug)]
pub enum CertState {
    /// The first issuance is under way.
    Pending,
    /// A certificate is in force (it may be renewing in the background).
    Ready(Arc<WorkloadCertificate>),
    /// No valid certificate: the last issuance failed for this reason; retries go on.
    Failed(Arc<str>),
}

/// Counters of the identity layer.
#[derive(Clone, Default)]
pub struct Metrics {
    issued: Counter,
    issue_failures: Counter,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Metrics::default();
        registry.register(
            "ztunnel_certificates_issued",
            "Workload certificates issued (first issuance and renewals)",
            metrics.issued.clone(),
        );
        registry.register(
            "ztunnel_certificate_issue_failures",
            "Failed workload certificate issuances (each is retried with backoff)",
            metrics.issue_failures.clone(),
        );
        metrics
    }
}

struct Entry {
    holders: usize,
    state: watch::Receiver<CertState>,
    task: tokio::task::AbortHandle,
}

struct Inner {
    ca: Arc<dyn CertificateAuthority>,
    provider: Arc<CryptoProvider>,
    metrics: Metrics,
    entries: Mutex<HashMap<Identity, Entry>>,
}

/// Holds the certificates of this node's identities. Cheap to clone.
#[derive(Clone)]
pub struct CertManager {
    inner: Arc<Inner>,
}

impl CertManager {
    pub fn new(
        ca: Arc<dyn CertificateAuthority>,
        provider: Arc<CryptoProvider>,
        metrics: Metrics,
    ) -> Self {
        CertManager {
            inner: Arc::new(Inner {
                ca,
                provider,
                metrics,
                entries: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// A workload of `identity` appeared on this node: issue its certificate now (if it
    /// is the first), so its first connection does not wait for one. Needs a tokio runtime.
    pub fn hold(&self, identity: &Identity) {
        let mut entries = self.entries();
        if let Some(entry) = entries.get_mut(identity) {
            entry.holders += 1;
            return;
        }
        let (tx, rx) = watch::channel(CertState::Pending);
        let task = tokio::spawn(keep_current(self.inner.clone(), identity.clone(), tx));
        entries.insert(
            identity.clone(),
            Entry {
                holders: 1,
                state: rx,
                task: task.abort_handle(),
            },
        );
    }

    /// A workload of `identity` left: when it was the last, drop the certificate.
    pub fn release(&self, identity: &Identity) {
        let mut entries = self.entries();
        if let Some(entry) = entries.get_mut(identity) {
            entry.holders -= 1;
            if entry.holders == 0 {
                entry.task.abort();
                entries.remove(identity);
            }
        }
    }

    /// The certificate of `identity`, waiting for its first issuance if it is under way.
    /// Concurrent callers share one issuance.
    pub async fn fetch(&self, identity: &Identity) -> Result<Arc<WorkloadCertificate>, Error> {
        let mut state = self.subscribe(identity)?;
        let state = state
            .wait_for(|s| !matches!(s, CertState::Pending))
            .await
            .map_err(|_| Error::NotHeld(identity.clone()))?
            .clone();
        match state {
            CertState::Ready(cert) => Ok(cert),
            CertState::Failed(problem) => Err(Error::Issue {
                identity: identity.clone(),
                problem: problem.to_string(),
            }),
            CertState::Pending => unreachable!("wait_for returned a pending state"),
        }
    }

    /// Follows the certificate of `identity` as it is issued and renewed.
    pub fn subscribe(&self, identity: &Identity) -> Result<watch::Receiver<CertState>, Error> {
        self.entries()
            .get(identity)
            .map(|e| e.state.clone())
            .ok_or_else(|| Error::NotHeld(identity.clone()))
    }

    /// The certificate in force for `identity`, if any.
    pub fn current(&self, identity: &Identity) -> Option<Arc<WorkloadCertificate>> {
        match &*self.entries().get(identity)?.state.borrow() {
            CertState::Ready(cert) => Some(cert.clone()),
            _ => None,
        }
    }

    /// The certificates in force, one per identity held.
    pub fn held(&self) -> Vec<Arc<WorkloadCertificate>> {
        self.entries()
            .values()
            .filter_map(|e| match &*e.state.borrow() {
                CertState::Ready(cert) => Some(cert.clone()),
                _ => None,
            })
            .collect()
    }

    /// Every identity held, with its certificate's details when one is in force.
    pub fn snapshot(&self) -> Vec<(Identity, Option<CertificateInfo>)> {
        let mut all: Vec<_> = self
            .entries()
            .iter()
            .map(|(id, e)| {
                let info = match &*e.state.borrow() {
                    CertState::Ready(cert) => Some(cert.info().clone()),
                    _ => None,
                };
                (id.clone(), info)
            })
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<Identity, Entry>> {
        self.inner
            .entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Issues the certificate of `identity` and keeps it current until aborted.
async fn keep_current(inner: Arc<Inner>, identity: Identity, tx: watch::Sender<CertState>) {
    let mut backoff = Backoff::default();
    loop {
        match issue(&inner, &identity).await {
            Ok(cert) => {
                inner.metrics.issued.inc();
                backoff = Backoff::default();
                let delay = renewal_delay(
                    cert.info(),
                    SystemTime::now(),
                    rand::rng().random_range(-1.0..=1.0),
                );
                tracing::info!(%identity, serial = %cert.info().serial, renew_in = ?delay, "certificate issued");
                tx.send_replace(CertState::Ready(cert));
                tokio::time::sleep(delay).await;
            }
            Err(e) => {
                inner.metrics.issue_failures.inc();
                let now = SystemTime::now();
                let mut delay = backoff.next();
                let still_valid = match &*tx.borrow() {
                    CertState::Ready(cert) if cert.is_valid_at(now) => Some(cert.info().not_after),
                    _ => None,
                };
                match still_valid {
                    Some(not_after) => {
                        // Keep the old certificate, but wake when it expires to say so.
                        delay = delay.min(not_after.duration_since(now).unwrap_or_default());
                        tracing::warn!(%identity, error = %e, retry_in = ?delay, "certificate renewal failed, the current one stays in use");
                    }
                    None => {
                        tracing::error!(%identity, error = %e, retry_in = ?delay, "certificate issuance failed");
                        tx.send_replace(CertState::Failed(e.to_string().into()));
                    }
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// A fresh key, a CSR for it, the CA's signature.
async fn issue(inner: &Inner, identity: &Identity) -> Result<Arc<WorkloadCertificate>, Error> {
    let key = KeyPair::generate().map_err(|e| Error::KeyGeneration(e.to_string()))?;
    let uri = identity.to_string();
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(uri.as_str().try_into().map_err(|e| {
        Error::Issue {
            identity: identity.clone(),
            problem: format!("URI SAN {uri}: {e}"),
        }
    })?)];
    let csr = params.serialize_request(&key).map_err(|e| Error::Issue {
        identity: identity.clone(),
        problem: format!("cannot build a CSR: {e}"),
    })?;
    let chain = inner.ca.sign(identity.clone(), csr.der().clone()).await?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    WorkloadCertificate::new(identity.clone(), chain, key, &inner.provider).map(Arc::new)
}

/// When to renew: at half of the certificate's lifetime, moved by up to a tenth of the
/// lifetime either way (`jitter` in -1..=1) so a node's certificates do not all renew
/// at once. A certificate already past that point is renewed at once.
fn renewal_delay(info: &CertificateInfo, now: SystemTime, jitter: f64) -> Duration {
    let lifetime = info
        .not_after
        .duration_since(info.not_before)
        .unwrap_or_default();
    let half = lifetime.as_secs_f64() / 2.0;
    let at = info.not_before
        + Duration::from_secs_f64(
            (half + jitter.clamp(-1.0, 1.0) * lifetime.as_secs_f64() / 10.0).max(0.0),
        );
    at.duration_since(now).unwrap_or_default()
}

/// Exponential backoff from [`BACKOFF_MIN`] to [`BACKOFF_MAX`].
struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Backoff(BACKOFF_MIN)
    }
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let delay = self.0;
        self.0 = (self.0 * 2).min(BACKOFF_MAX);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(lifetime_secs: u64) -> CertificateInfo {
        let not_before = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        CertificateInfo {
            serial: "01".into(),
            not_before,
            not_after: not_before + Duration::from_secs(lifetime_secs),
            uris: vec![],
        }
    }

    #[test]
    fn renews_at_half_life_within_a_tenth_either_way() {
        let cert = info(1000);
        let now = cert.not_before;
        assert_eq!(renewal_delay(&cert, now, 0.0), Duration::from_secs(500));
        assert_eq!(renewal_delay(&cert, now, 1.0), Duration::from_secs(600));
        assert_eq!(renewal_delay(&cert, now, -1.0), Duration::from_secs(400));
        assert_eq!(
            renewal_delay(&cert, now + Duration::from_secs(450), 0.0),
            Duration::from_secs(50)
        );
        assert_eq!(
            renewal_delay(&cert, now + Duration::from_secs(900), 0.0),
            Duration::ZERO
        );
    }

    #[test]
    fn backoff_doubles_from_half_a_second_to_150_seconds() {
        let mut b = Backoff::default();
        let delays: Vec<u64> = (0..12).map(|_| b.next().as_millis() as u64).collect();
        assert_eq!(
            delays,
            [
                500, 1000, 2000, 4000, 8000, 16000, 32000, 64000, 128000, 150000, 150000, 150000
            ]
        );
    }
}
