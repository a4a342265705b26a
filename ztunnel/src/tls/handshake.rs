//! TLS handshakes with a deadline, the peer's identity as their result, and every
//! failure told apart by reason and counted.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use rustls::{AlertDescription, CertificateError, ClientConfig, ServerConfig};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

use super::verify::{IdentityError, identity_of};
use crate::identity::{Identity, UriSanError};

/// Why a handshake failed, as counted in `ztunnel_tls_handshake_failures_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum FailureReason {
    /// The client presented no certificate.
    no_certificate,
    /// The chain does not end in the trust bundle.
    unknown_ca,
    expired,
    not_yet_valid,
    /// The server is not one of the identities the client expected.
    identity_mismatch,
    /// The client's identity is in another trust domain.
    foreign_trust_domain,
    /// The certificate carries more than one URI SAN (SPIFFE allows exactly one).
    multiple_uri_sans,
    /// The certificate is not allowed for this use (extended key usage).
    wrong_key_usage,
    /// The certificate could not be used for another reason (encoding, signature...).
    bad_certificate,
    /// The peer refused our certificate (it says why in its own counters).
    rejected_by_peer,
    /// The handshake did not finish before its deadline.
    timeout,
    /// Anything else: not TLS, wrong version, no common ALPN or cipher, connection lost.
    protocol,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Side {
    server,
    client,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FailureLabels {
    side: Side,
    reason: FailureReason,
}

/// Handshake counters.
#[derive(Clone, Default)]
pub struct Metrics {
    failures: Family<FailureLabels, Counter>,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Metrics::default();
        registry.register(
            "ztunnel_tls_handshake_failures",
            "TLS handshakes that failed, by side and reason",
            metrics.failures.clone(),
        );
        metrics
    }

    /// Failures counted so far for this side and reason.
    pub fn failures(&self, side: Side, reason: FailureReason) -> u64 {
        self.failures
            .get_or_create(&FailureLabels { side, reason })
            .get()
    }
}

/// A failed handshake: its reason and what was said.
#[derive(Debug, thiserror::Error)]
pub struct HandshakeError {
    pub reason: FailureReason,
    pub side: Side,
    pub detail: String,
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "TLS handshake failed as {:?} ({:?}): {}",
            self.side, self.reason, self.detail
        )
    }
}

/// Accepts a TLS connection and returns it with the client's identity.
pub async fn accept<IO>(
    config: Arc<ServerConfig>,
    io: IO,
    deadline: Duration,
    metrics: &Metrics,
) -> Result<(server::TlsStream<IO>, Identity), HandshakeError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let result = tokio::time::timeout(deadline, TlsAcceptor::from(config).accept(io)).await;
    let stream = finish(Side::server, deadline, result, metrics)?;
    let peer = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first());
    let identity = peer_identity(Side::server, peer, metrics)?;
    Ok((stream, identity))
}

/// Opens a TLS connection to `peer` (no SNI is sent) and returns it with the server's
/// identity, already checked against the identities the config expects.
pub async fn connect<IO>(
    config: Arc<ClientConfig>,
    peer: IpAddr,
    io: IO,
    deadline: Duration,
    metrics: &Metrics,
) -> Result<(client::TlsStream<IO>, Identity), HandshakeError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let result = tokio::time::timeout(
        deadline,
        TlsConnector::from(config).connect(ServerName::IpAddress(peer.into()), io),
    )
    .await;
    let stream = finish(Side::client, deadline, result, metrics)?;
    let peer = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first());
    let identity = peer_identity(Side::client, peer, metrics)?;
    Ok((stream, identity))
}

fn finish<S>(
    side: Side,
    deadline: Duration,
    result: Result<std::io::Result<S>, tokio::time::error::Elapsed>,
    metrics: &Metrics,
) -> Result<S, HandshakeError> {
    let (reason, detail) = match result {
        Ok(Ok(stream)) => return Ok(stream),
        Ok(Err(e)) => (classify(&e), describe(&e)),
        Err(_) => (
            FailureReason::timeout,
            format!("no handshake within {deadline:?}"),
        ),
    };
    Err(fail(side, reason, detail, metrics))
}

fn peer_identity(
    side: Side,
    leaf: Option<&rustls_pki_types::CertificateDer<'_>>,
    metrics: &Metrics,
) -> Result<Identity, HandshakeError> {
    let leaf = leaf.ok_or_else(|| {
        fail(
            side,
            FailureReason::no_certificate,
            "peer presented no certificate".into(),
            metrics,
        )
    })?;
    identity_of(leaf).map_err(|e| {
        let reason = match e {
            IdentityError::Uri(UriSanError::Several(_)) => FailureReason::multiple_uri_sans,
            _ => FailureReason::identity_mismatch,
        };
        fail(side, reason, e.to_string(), metrics)
    })
}

fn fail(side: Side, reason: FailureReason, detail: String, metrics: &Metrics) -> HandshakeError {
    metrics
        .failures
        .get_or_create(&FailureLabels { side, reason })
        .inc();
    tracing::debug!(?side, ?reason, %detail, "TLS handshake failed");
    HandshakeError {
        reason,
        side,
        detail,
    }
}

/// What a failed handshake's error says, with the tunnel's own refusals (identity
/// checks) in their words rather than rustls's debug form.
fn describe(error: &std::io::Error) -> String {
    let own = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .and_then(|tls| match tls {
            rustls::Error::InvalidCertificate(CertificateError::Other(other)) => {
                other.0.downcast_ref::<IdentityError>()
            }
            _ => None,
        });
    match own {
        Some(refusal) => format!("invalid peer certificate: {refusal}"),
        None => error.to_string(),
    }
}

/// Tells why a handshake failed from the error tokio-rustls returned.
pub fn classify(error: &std::io::Error) -> FailureReason {
    let Some(tls) = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return FailureReason::protocol;
    };
    use FailureReason::*;
    match tls {
        rustls::Error::NoCertificatesPresented => no_certificate,
        rustls::Error::InvalidCertificate(e) => match e {
            CertificateError::UnknownIssuer => unknown_ca,
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => expired,
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                not_yet_valid
            }
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                wrong_key_usage
            }
            CertificateError::Other(other) => match other.0.downcast_ref::<IdentityError>() {
                Some(IdentityError::ForeignTrustDomain { .. }) => foreign_trust_domain,
                Some(IdentityError::Uri(UriSanError::Several(_))) => multiple_uri_sans,
                Some(_) => identity_mismatch,
                None => bad_certificate,
            },
            _ => bad_certificate,
        },
        rustls::Error::AlertReceived(alert) => match alert {
            AlertDescription::CertificateRequired => no_certificate,
            AlertDescription::UnknownCA
            | AlertDescription::BadCertificate
            | AlertDescription::CertificateExpired
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::AccessDenied => rejected_by_peer,
            _ => protocol,
        },
        _ => protocol,
    }
}
