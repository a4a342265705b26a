//! The cluster CA: a service (`ztunnel ca serve`) that keeps its roots in a Secret and
//! signs workload certificates for node tunnels, and the client the tunnels use.
//!
//! # Protocol
//! HTTPS (TLS 1.3, HTTP/1.1), the server's certificate signed by the CA's own root and
//! verified by clients against their trust bundle.
//!
//! `POST /v1/sign` with `Authorization: Bearer <the tunnel's ServiceAccount token>` and a
//! JSON body [`SignRequest`]: `{"identity": "spiffe://...", "csr": "<PEM CSR>"}`.
//! - `200`: [`SignResponse`]: `{"certChain": "<PEM, leaf first>", "trustBundle": "<PEM,
//!   every trusted root>"}`;
//! - `400` malformed request, `401` token missing or not authenticated, `403` caller not
//!   allowed this identity, `404`/`405` wrong path or method, `413` body too large,
//!   `503` the API server could not be asked, `500` signing failed. Every error body is
//!   [`ErrorResponse`]: `{"error": "<reason>"}`.
//!
//! A caller is allowed an identity when its token is the tunnels' ServiceAccount's, the
//! token is bound to a pod (so its node is known), and a pod running as that identity's
//! ServiceAccount is scheduled on that node.

mod authorize;
mod client;
mod roots;
mod server;
#[cfg(test)]
mod tests;

use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

pub use authorize::{AuthError, Authorizer, AuthorizerConfig, Caller};
pub(crate) use client::verify_leaf;
pub use client::{CaClient, CaClientConfig, ClientError};
pub use roots::{
    BUNDLE_CONFIG_MAP_KEY, Error as RootsError, NEXT_ROOT_CERT_KEY, NEXT_ROOT_KEY_KEY, RootSecret,
    RootStore, TRUST_BUNDLE_KEY,
};
pub(crate) use server::parse_sign_request;
pub use server::{CaServer, CaServerConfig, Metrics, ServerError};

/// The path of the signing endpoint.
pub const SIGN_PATH: &str = "/v1/sign";
/// The audience the tunnels' projected token is minted for, and the CA checks.
pub const DEFAULT_AUDIENCE: &str = "ztunnel-ca";
/// The CA service's port.
pub const DEFAULT_PORT: u16 = 15012;

/// The body of a signing request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SignRequest {
    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    pub identity: String,
    /// A PKCS#10 certificate request, PEM encoded.
    pub csr: String,
}

/// The body of a successful answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SignResponse {
    /// The signed chain, leaf first, PEM encoded.
    pub cert_chain: String,
    /// Every root peers must trust now (two during a rotation), PEM encoded.
    pub trust_bundle: String,
}

/// The body of every error answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorResponse {
    pub error: String,
}

/// Certificates as concatenated PEM, in order.
pub(crate) fn certificates_pem(certs: &[CertificateDer<'_>]) -> String {
    certs.iter().map(|der| pem_lf("CERTIFICATE", der)).collect()
}

/// One PEM block with `\n` line endings (the `pem` crate writes `\r\n` by default, which
/// ends up in ConfigMaps, Secrets and files).
pub fn pem_lf(tag: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(tag, der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}
