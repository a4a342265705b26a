//! The tunnel's side of the cluster CA: a [`CertificateAuthority`] that sends CSRs to the
//! CA service, authenticated by the tunnel's projected ServiceAccount token.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsConnector;

use super::{ErrorResponse, SIGN_PATH, SignRequest, SignResponse};
use crate::identity::{
    self, CertificateAuthority, CertificateInfo, Chain, Identity, SignFuture, TrustBundle,
    TrustStore, parse_pem_certificates,
};

/// The largest answer accepted from the CA.
const MAX_RESPONSE_BODY: usize = 1024 * 1024;

/// Why a signing request to the CA service failed; each names the service and cause.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot read the token {}: {source}", path.display())]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("token file {} is empty", path.display())]
    EmptyToken { path: PathBuf },
    #[error("CA {address}: no answer within {} s", after.as_secs_f64())]
    Timeout { address: String, after: Duration },
    #[error("CA {address}: cannot connect: {source}")]
    Connect {
        address: String,
        source: std::io::Error,
    },
    #[error("CA {address}: TLS: {source}")]
    Tls {
        address: String,
        source: std::io::Error,
    },
    #[error("CA {address}: server name \"{name}\": {problem}")]
    ServerName {
        address: String,
        name: String,
        problem: String,
    },
    #[error("CA {address}: HTTP: {source}")]
    Http {
        address: String,
        source: hyper::Error,
    },
    #[error("CA {address} refused ({status}): {message}")]
    Refused {
        address: String,
        status: StatusCode,
        message: String,
    },
    #[error("CA {address}: bad answer: {problem}")]
    BadAnswer { address: String, problem: String },
}

/// Where the CA service is and how the tunnel proves who it is.
#[derive(Clone, Debug)]
pub struct CaClientConfig {
    /// `host:port` to connect to (`ztunnel-ca.ztunnel-system.svc:15012`).
    pub address: String,
    /// The DNS name the service's certificate must carry.
    pub server_name: String,
    /// The projected ServiceAccount token, read again for every request (the kubelet
    /// rotates it).
    pub token_file: PathBuf,
    /// Deadline for a whole request (connect, handshake, answer).
    pub timeout: Duration,
}

/// A client of the cluster CA. The service's certificate is verified against the trust
/// store in force; every answer's bundle is published on [`CaClient::trust_bundle`].
pub struct CaClient {
    config: CaClientConfig,
    trust: Arc<TrustStore>,
    provider: Arc<CryptoProvider>,
    bundle: watch::Sender<Option<Arc<TrustBundle>>>,
}

impl CaClient {
    pub fn new(
        config: CaClientConfig,
        trust: Arc<TrustStore>,
        provider: Arc<CryptoProvider>,
    ) -> Self {
        CaClient {
            config,
            trust,
            provider,
            bundle: watch::Sender::new(None),
        }
    }

    /// The trust bundle of the CA's latest answer (`None` before the first one). It
    /// changes when the CA's roots rotate; the tunnel replaces its trust store with it.
    pub fn trust_bundle(&self) -> watch::Receiver<Option<Arc<TrustBundle>>> {
        self.bundle.subscribe()
    }

    /// Sends one signing request and checks the answer: the leaf must carry `identity`
    /// and chain up to the returned bundle.
    pub async fn request(
        &self,
        identity: &Identity,
        csr: &CertificateSigningRequestDer<'_>,
    ) -> Result<Chain, ClientError> {
        let token = read_token(&self.config.token_file)?;
        let body = serde_json::to_vec(&SignRequest {
            identity: identity.to_string(),
            csr: super::pem_lf("CERTIFICATE REQUEST", csr.as_ref()),
        })
        .map_err(|e| self.bad_answer(format!("cannot encode the request: {e}")))?;
        let deadline = self.config.timeout;
        let (status, body) = tokio::time::timeout(deadline, self.post(&token, body))
            .await
            .map_err(|_| ClientError::Timeout {
                address: self.config.address.clone(),
                after: deadline,
            })??;
        if status != StatusCode::OK {
            let message = serde_json::from_slice::<ErrorResponse>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
            return Err(ClientError::Refused {
                address: self.config.address.clone(),
                status,
                message,
            });
        }
        let answer: SignResponse = serde_json::from_slice(&body)
            .map_err(|e| self.bad_answer(format!("not a sign response: {e}")))?;
        let (chain, bundle) = check_answer(identity, &answer, &self.provider)
            .map_err(|problem| self.bad_answer(problem))?;
        self.bundle.send_if_modified(|current| {
            let changed = current.as_ref().map(|b| b.roots()) != Some(bundle.roots());
            if changed {
                *current = Some(Arc::new(bundle));
            }
            changed
        });
        Ok(chain)
    }

    async fn post(&self, token: &str, body: Vec<u8>) -> Result<(StatusCode, Bytes), ClientError> {
        let address = &self.config.address;
        let tls_error = |source| ClientError::Tls {
            address: address.clone(),
            source,
        };
        let http_error = |source| ClientError::Http {
            address: address.clone(),
            source,
        };
        let tcp = TcpStream::connect(address)
            .await
            .map_err(|source| ClientError::Connect {
                address: address.clone(),
                source,
            })?;
        let name = ServerName::try_from(self.config.server_name.clone()).map_err(|e| {
            ClientError::ServerName {
                address: address.clone(),
                name: self.config.server_name.clone(),
                problem: e.to_string(),
            }
        })?;
        let tls = TlsConnector::from(self.tls_config()?)
            .connect(name, tcp)
            .await
            .map_err(tls_error)?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(http_error)?;
        let connection = tokio::spawn(connection);
        let request = Request::post(SIGN_PATH)
            .header(header::HOST, self.config.server_name.as_str())
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| self.bad_answer(format!("cannot build the request: {e}")))?;
        let response = sender.send_request(request).await.map_err(http_error)?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_RESPONSE_BODY)
            .collect()
            .await
            .map_err(|e| self.bad_answer(format!("cannot read the answer: {e}")))?
            .to_bytes();
        connection.abort();
        Ok((status, body))
    }

    fn tls_config(&self) -> Result<Arc<ClientConfig>, ClientError> {
        let failed = |problem: String| ClientError::Tls {
            address: self.config.address.clone(),
            source: std::io::Error::other(problem),
        };
        let roots = Arc::new(self.trust.current().store().clone());
        let verifier = WebPkiServerVerifier::builder_with_provider(roots, self.provider.clone())
            .build()
            .map_err(|e| {
                failed(format!(
                    "cannot verify the service with the trust bundle: {e}"
                ))
            })?;
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| failed(e.to_string()))?
            .with_webpki_verifier(verifier)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    fn bad_answer(&self, problem: String) -> ClientError {
        ClientError::BadAnswer {
            address: self.config.address.clone(),
            problem,
        }
    }
}

impl CertificateAuthority for CaClient {
    fn sign(
        &self,
        identity: Identity,
        csr: CertificateSigningRequestDer<'static>,
    ) -> SignFuture<'_> {
        Box::pin(async move {
            self.request(&identity, &csr)
                .await
                .map_err(|e| identity::Error::Issue {
                    identity: identity.clone(),
                    problem: e.to_string(),
                })
        })
    }
}

fn read_token(path: &Path) -> Result<String, ClientError> {
    let token = std::fs::read_to_string(path).map_err(|source| ClientError::Token {
        path: path.to_path_buf(),
        source,
    })?;
    let token = token.trim();
    if token.is_empty() {
        return Err(ClientError::EmptyToken {
            path: path.to_path_buf(),
        });
    }
    Ok(token.to_string())
}

/// The chain and bundle of an answer, after checking that the leaf carries `identity`
/// and chains up to one of the bundle's roots.
pub(super) fn check_answer(
    identity: &Identity,
    answer: &SignResponse,
    provider: &CryptoProvider,
) -> Result<(Chain, TrustBundle), String> {
    let chain = parse_pem_certificates(Path::new("certChain"), &answer.cert_chain)
        .map_err(|e| e.to_string())?;
    let roots = parse_pem_certificates(Path::new("trustBundle"), &answer.trust_bundle)
        .map_err(|e| e.to_string())?;
    let bundle = TrustBundle::new(roots).map_err(|e| format!("trustBundle: {e}"))?;
    let leaf = &chain[0];
    let info = CertificateInfo::parse(leaf).map_err(|e| format!("certChain leaf: {e}"))?;
    let carried = info
        .spiffe_identity()
        .map_err(|e| format!("certChain leaf: {e}"))?;
    if &carried != identity {
        return Err(format!(
            "the leaf's URI SANs ({}) do not include {identity}",
            info.uris.join(", ")
        ));
    }
    verify_leaf(leaf, &chain[1..], &bundle, provider)
        .map_err(|e| format!("the leaf does not chain to the returned trust bundle: {e}"))?;
    Ok((chain, bundle))
}

/// Checks that `leaf` (a workload certificate) chains up to a root of `bundle` now.
pub(crate) fn verify_leaf(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    bundle: &TrustBundle,
    provider: &CryptoProvider,
) -> Result<(), webpki::Error> {
    webpki::EndEntityCert::try_from(leaf)?
        .verify_for_usage(
            provider.signature_verification_algorithms.all,
            &bundle.store().roots,
            intermediates,
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map(|_| ())
}
