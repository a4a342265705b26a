//! Who a workload is and how it proves it: SPIFFE identities, the certificate
//! authority interface, per-identity certificates with renewal, and the trust bundle.

mod bundle;
mod ca;
mod certificate;
mod error;
pub mod gauges;
mod manager;
mod spiffe;

pub use bundle::{
    ROTATION_RETIRE_MARK, TrustBundle, TrustStore, WATCH_DEBOUNCE, parse_pem_certificates,
};
pub use ca::{
    CaFiles, CertificateAuthority, Chain, DEFAULT_CERT_LIFETIME, InProcessCa, ROOT_CERT_FILE,
    ROOT_KEY_FILE, RootPem, SignFuture, generate_root, init as init_ca,
};
pub use certificate::{CertificateInfo, UriSanError, WorkloadCertificate};
pub use error::Error;
pub use manager::{BACKOFF_MAX, BACKOFF_MIN, CertManager, CertState, Metrics};
pub use spiffe::{Identity, ParseError};
