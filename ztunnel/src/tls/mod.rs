//! TLS as HBONE speaks it (see shared/HBONE.md): TLS 1.3 only, AES-GCM suites, ALPN h2,
//! no SNI, no resumption, client certificates required, SPIFFE identities checked.
//! Certificates come from the certificate manager at each handshake, so a renewed
//! certificate is used by new connections while established ones keep theirs.

mod handshake;
mod verify;

use std::fmt;
use std::sync::Arc;

use rustls::client::ResolvesClientCert;
use rustls::crypto::{CryptoProvider, aws_lc_rs};
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig, SignatureScheme};
use tokio::sync::watch;

pub use handshake::{FailureReason, HandshakeError, Metrics, Side, accept, classify, connect};
pub use verify::{IdentityError, identity_of};

use crate::identity::{CertState, Identity, TrustStore};

/// The ALPN protocol of HBONE.
pub const ALPN_H2: &[u8] = b"h2";

/// The crypto provider: aws-lc-rs limited to the two suites HBONE allows. AES-128-GCM is
/// offered first: it is the cheaper of the two per byte, and both are accepted.
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = aws_lc_rs::default_provider();
    provider.cipher_suites = vec![
        aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
        aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
    ];
    Arc::new(provider)
}

/// The server side of a workload's HBONE listener: presents the workload's current
/// certificate and requires a client certificate from `trust_domain`.
pub fn server_config(
    certificate: watch::Receiver<CertState>,
    trust: Arc<TrustStore>,
    trust_domain: &str,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let verifier = verify::ClientVerifier {
        trust,
        trust_domain: trust_domain.to_string(),
        provider: provider.clone(),
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(CurrentCertificate(certificate)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The client side of a connection from a workload: presents its current certificate and
/// accepts only a server that carries one of `expected`.
pub fn client_config(
    certificate: watch::Receiver<CertState>,
    trust: Arc<TrustStore>,
    expected: Vec<Identity>,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<ClientConfig>, rustls::Error> {
    let verifier = verify::ServerVerifier {
        trust,
        expected,
        provider: provider.clone(),
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(CurrentCertificate(certificate)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// Resolves to whatever certificate the manager has in force at handshake time.
struct CurrentCertificate(watch::Receiver<CertState>);

impl CurrentCertificate {
    fn get(&self) -> Option<Arc<CertifiedKey>> {
        match &*self.0.borrow() {
            CertState::Ready(cert) => Some(cert.certified_key()),
            CertState::Pending | CertState::Failed(_) => None,
        }
    }
}

impl ResolvesServerCert for CurrentCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get()
    }
}

impl ResolvesClientCert for CurrentCertificate {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.get()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl fmt::Debug for CurrentCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("CurrentCertificate").finish()
    }
}
