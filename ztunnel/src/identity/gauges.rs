//! Gauges read at scrape time from the certificates held and the trust bundle in force:
//! how long each certificate and the earliest root have left, so operators can alert
//! before anything expires. A certificate dropped (its last workload gone) leaves the
//! scrape with it.

use std::sync::Arc;
use std::time::SystemTime;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::{CertManager, CertificateInfo, TrustStore};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdentityLabels {
    identity: String,
}

/// Seconds from `now` to `t`, negative once `t` has passed.
fn seconds_until(t: SystemTime, now: SystemTime) -> f64 {
    match t.duration_since(now) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

struct Certificates {
    certs: CertManager,
    trust: Arc<TrustStore>,
}

impl std::fmt::Debug for Certificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Certificates")
    }
}

impl Collector for Certificates {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let now = SystemTime::now();
        let held: Vec<_> = self
            .certs
            .snapshot()
            .into_iter()
            .filter_map(|(id, info)| Some((id.to_string(), info?)))
            .collect();
        let per_identity = |encoder: &mut DescriptorEncoder,
                            name: &str,
                            help: &str,
                            value: &dyn Fn(&CertificateInfo) -> f64|
         -> Result<(), std::fmt::Error> {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (identity, info) in &held {
                let labels = IdentityLabels {
                    identity: identity.clone(),
                };
                metric.encode_family(&labels)?.encode_gauge(&value(info))?;
            }
            Ok(())
        };
        per_identity(
            &mut encoder,
            "ztunnel_certificate_expiry_seconds",
            "Seconds until the certificate in force for each identity held expires",
            &|info| seconds_until(info.not_after, now),
        )?;
        per_identity(
            &mut encoder,
            "ztunnel_certificate_lifetime_seconds",
            "Full validity period of the certificate in force for each identity held",
            &|info| seconds_until(info.not_after, info.not_before),
        )?;

        let bundle = self.trust.current();
        let roots = bundle.roots();
        encoder
            .encode_descriptor(
                "ztunnel_trust_bundle_roots",
                "Roots in the trust bundle in force",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&(roots.len() as i64))?;
        let earliest = roots
            .iter()
            .filter_map(|r| CertificateInfo::parse(r).ok())
            .map(|info| info.not_after)
            .min();
        let mut metric = encoder.encode_descriptor(
            "ztunnel_trust_bundle_expiry_seconds",
            "Seconds until the earliest-expiring root of the trust bundle in force expires",
            None,
            MetricType::Gauge,
        )?;
        if let Some(t) = earliest {
            metric.encode_gauge(&seconds_until(t, now))?;
        }
        Ok(())
    }
}

/// Registers the certificate and trust-bundle gauges of `certs` and `trust`.
pub fn register(registry: &mut Registry, certs: CertManager, trust: Arc<TrustStore>) {
    registry.register_collector(Box::new(Certificates { certs, trust }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn seconds_until_is_negative_once_passed() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        assert_eq!(seconds_until(t, t - Duration::from_secs(30)), 30.0);
        assert_eq!(seconds_until(t, t + Duration::from_secs(5)), -5.0);
    }
}
