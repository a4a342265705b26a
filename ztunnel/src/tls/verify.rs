//! Certificate verification as HBONE requires: the chain must end in the trust bundle in
//! force; a server must present one of the identities the client expects (exact URI SAN
//! match, DNS names are not looked at); a client must belong to the server's trust domain.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};

use crate::identity::{CertificateInfo, Identity, TrustStore, UriSanError};

/// Why a chain that verified against the bundle is still refused.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum IdentityError {
    #[error("peer certificate is not an X.509 certificate: {0}")]
    Unparsable(String),
    #[error("peer {0}")]
    Uri(#[from] UriSanError),
    #[error("peer identity {presented} is none of the expected {}", join(expected))]
    Mismatch {
        presented: String,
        expected: Vec<Identity>,
    },
    #[error("peer identity {presented} is outside trust domain {trust_domain}")]
    ForeignTrustDomain {
        presented: Identity,
        trust_domain: String,
    },
}

fn join(ids: &[Identity]) -> String {
    ids.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The SPIFFE identity of a leaf certificate: its one URI SAN (a leaf with several is
/// refused).
pub fn identity_of(leaf: &CertificateDer<'_>) -> Result<Identity, IdentityError> {
    let info = CertificateInfo::parse(leaf).map_err(IdentityError::Unparsable)?;
    Ok(info.spiffe_identity()?)
}

fn verify_chain(
    trust: &TrustStore,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
    provider: &CryptoProvider,
) -> Result<(), rustls::Error> {
    let bundle = trust.current();
    let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
    cert.verify_for_usage(
        provider.signature_verification_algorithms.all,
        &bundle.store().roots,
        intermediates,
        now,
        usage,
        None,
        None,
    )
    .map(|_| ())
    .map_err(pki_error)
}

fn pki_error(error: webpki::Error) -> rustls::Error {
    use webpki::Error::*;
    let e = match error {
        BadDer | BadDerTime | TrailingData(_) => CertificateError::BadEncoding,
        CertNotValidYet { time, not_before } => {
            CertificateError::NotValidYetContext { time, not_before }
        }
        CertExpired { time, not_after } => CertificateError::ExpiredContext { time, not_after },
        InvalidCertValidity => CertificateError::Expired,
        UnknownIssuer => CertificateError::UnknownIssuer,
        #[allow(deprecated)]
        RequiredEkuNotFound | RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        // Roots are found by subject name: a chain that names a trusted root but was not
        // signed by it was signed by some other CA.
        InvalidSignatureForPublicKey => CertificateError::UnknownIssuer,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    e.into()
}

fn refuse(e: IdentityError) -> rustls::Error {
    CertificateError::Other(OtherError(Arc::new(e))).into()
}

/// The handshake signature checks both verifiers make the same way, with the provider's
/// algorithms.
macro_rules! signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls12_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

/// The client's check of the server.
pub(super) struct ServerVerifier {
    pub trust: Arc<TrustStore>,
    pub expected: Vec<Identity>,
    pub provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        verify_chain(
            &self.trust,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            &self.provider,
        )?;
        let presented = identity_of(end_entity).map_err(refuse)?;
        if !self.expected.contains(&presented) {
            return Err(refuse(IdentityError::Mismatch {
                presented: presented.to_string(),
                expected: self.expected.clone(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    signature_checks!();
}

/// The server's check of the client: certificate required, chain in the bundle, and the
/// identity in the server's trust domain.
pub(super) struct ClientVerifier {
    pub trust: Arc<TrustStore>,
    pub trust_domain: String,
    pub provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        verify_chain(
            &self.trust,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
            &self.provider,
        )?;
        let presented = identity_of(end_entity).map_err(refuse)?;
        if presented.trust_domain() != self.trust_domain {
            return Err(refuse(IdentityError::ForeignTrustDomain {
                presented,
                trust_domain: self.trust_domain.clone(),
            }));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    signature_checks!();
}

impl fmt::Debug for ServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerVerifier")
            .field("expected", &join(&self.expected))
            .finish()
    }
}

impl fmt::Debug for ClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientVerifier")
            .field("trust_domain", &self.trust_domain)
            .finish()
    }
}
