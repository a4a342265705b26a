//! A workload's certificate chain and private key, ready for rustls.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use super::{Error, Identity};

/// What a certificate says about itself, read from its DER.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateInfo {
    /// Serial number, lowercase hex.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// URI subject alternative names, as written.
    pub uris: Vec<String>,
}

impl CertificateInfo {
    /// Parses the fields the tunnel needs from a DER certificate.
    pub fn parse(der: &[u8]) -> Result<Self, String> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
        let validity = cert.validity();
        let to_time = |t: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
        let mut uris = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let GeneralName::URI(uri) = name {
                    uris.push((*uri).to_string());
                }
            }
        }
        Ok(CertificateInfo {
            serial: cert.raw_serial_as_string().replace(':', ""),
            not_before: to_time(validity.not_before.timestamp()),
            not_after: to_time(validity.not_after.timestamp()),
            uris,
        })
    }
}

/// Why a certificate does not name exactly one SPIFFE identity.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UriSanError {
    #[error("the certificate carries no SPIFFE identity (URI SANs: {0:?})")]
    NoIdentity(Vec<String>),
    #[error(
        "the certificate carries {} URI SANs ({}); a SPIFFE certificate carries exactly one",
        .0.len(),
        .0.join(", ")
    )]
    Several(Vec<String>),
}

impl CertificateInfo {
    /// The SPIFFE identity of the certificate: its one URI SAN. A certificate with more
    /// than one URI SAN is refused whatever they are (SPIFFE X.509-SVID: exactly one), so
    /// no reader can pick a different identity from the same certificate.
    pub fn spiffe_identity(&self) -> Result<Identity, UriSanError> {
        match self.uris.as_slice() {
            [one] => one
                .parse()
                .map_err(|_| UriSanError::NoIdentity(self.uris.clone())),
            [] => Err(UriSanError::NoIdentity(Vec::new())),
            _ => Err(UriSanError::Several(self.uris.clone())),
        }
    }
}

/// A certificate chain (leaf first) for one identity, with its private key.
pub struct WorkloadCertificate {
    identity: Identity,
    info: CertificateInfo,
    certified_key: Arc<CertifiedKey>,
}

impl WorkloadCertificate {
    /// Builds the certificate from its chain and key, checking that the leaf carries
    /// `identity` and that the key pairs with it.
    pub fn new(
        identity: Identity,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        provider: &CryptoProvider,
    ) -> Result<Self, Error> {
        let bad = |problem: String| Error::Certificate {
            identity: identity.clone(),
            problem,
        };
        let leaf = chain
            .first()
            .ok_or_else(|| bad("the chain is empty".to_string()))?;
        let info = CertificateInfo::parse(leaf).map_err(bad)?;
        let carried = info.spiffe_identity().map_err(|e| bad(e.to_string()))?;
        if carried != identity {
            return Err(bad(format!(
                "the leaf's URI SANs {:?} do not include {identity}",
                info.uris
            )));
        }
        let certified_key = CertifiedKey::from_der(chain, key, provider)
            .map_err(|e| bad(format!("key does not fit: {e}")))?;
        Ok(WorkloadCertificate {
            identity,
            info,
            certified_key: Arc::new(certified_key),
        })
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    pub fn info(&self) -> &CertificateInfo {
        &self.info
    }

    /// The chain and key as rustls presents them in a handshake.
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        self.certified_key.clone()
    }

    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.info.not_before <= now && now < self.info.not_after
    }
}

impl fmt::Debug for WorkloadCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCertificate")
            .field("identity", &self.identity.to_string())
            .field("serial", &self.info.serial)
            .field("not_after", &self.info.not_after)
            .finish_non_exhaustive()
    }
}
