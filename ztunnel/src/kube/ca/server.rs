//! The CA service: HTTPS, one endpoint ([`super::SIGN_PATH`]), every request
//! authenticated and authorized through the API server before anything is signed.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use rcgen::{CertificateSigningRequestParams, KeyPair};
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::authorize::{AuthError, Authorizer};
use super::roots::{Error as RootsError, RootSecret};
use super::{ErrorResponse, SIGN_PATH, SignRequest, SignResponse, certificates_pem};
use crate::identity::{Identity, InProcessCa};

/// The largest request body accepted (a CSR is well under 2 KiB).
pub const MAX_REQUEST_BODY: usize = 64 * 1024;

/// Errors that stop the CA service from (re)configuring itself.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Roots(#[from] RootsError),
    #[error("cannot make the service's own certificate for {}: {problem}", names.join(", "))]
    ServingCertificate { names: Vec<String>, problem: String },
}

/// How the service runs.
#[derive(Clone, Debug)]
pub struct CaServerConfig {
    /// `<namespace>/<name>` of the Secret the roots come from (named in errors).
    pub secret: String,
    /// DNS names the service's own certificate carries (its Service's names).
    pub dns_names: Vec<String>,
    /// Lifetime of issued workload certificates (and of the service's own).
    pub cert_lifetime: Duration,
    /// Deadline for each of a client's TLS handshake, request headers and request body:
    /// a client that stalls is answered 408 or dropped.
    pub client_timeout: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    result: String,
}

/// Counters of the CA service.
#[derive(Clone, Default)]
pub struct Metrics {
    requests: Family<RequestLabels, Counter>,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Metrics::default();
        registry.register(
            "ztunnel_ca_requests",
            "Signing requests by result: issued, or the reason of the refusal",
            metrics.requests.clone(),
        );
        metrics
    }

    /// Requests counted so far with this result.
    pub fn requests(&self, result: &str) -> u64 {
        self.requests
            .get_or_create(&RequestLabels {
                result: result.to_string(),
            })
            .get()
    }

    fn count(&self, result: &str) {
        self.requests
            .get_or_create(&RequestLabels {
                result: result.to_string(),
            })
            .inc();
    }
}

/// What the service signs with now; replaced as a whole when the roots change.
struct Signing {
    roots: RootSecret,
    ca: InProcessCa,
    bundle_pem: String,
    tls: Arc<ServerConfig>,
    renew_at: SystemTime,
}

/// The CA service.
pub struct CaServer {
    config: CaServerConfig,
    authorizer: Authorizer,
    provider: Arc<CryptoProvider>,
    signing: ArcSwap<Signing>,
    metrics: Metrics,
}

/// A refused request: its status, the counted reason and the message sent back.
struct Refusal {
    status: StatusCode,
    reason: &'static str,
    message: String,
}

impl Refusal {
    fn bad_request(message: String) -> Self {
        Refusal {
            status: StatusCode::BAD_REQUEST,
            reason: "bad_request",
            message,
        }
    }
}

impl From<AuthError> for Refusal {
    fn from(e: AuthError) -> Self {
        Refusal {
            status: e.status(),
            reason: e.reason(),
            message: e.to_string(),
        }
    }
}

impl CaServer {
    pub fn new(
        config: CaServerConfig,
        roots: RootSecret,
        authorizer: Authorizer,
        provider: Arc<CryptoProvider>,
        metrics: Metrics,
    ) -> Result<Arc<Self>, ServerError> {
        let signing = build_signing(&config, roots, &provider)?;
        Ok(Arc::new(CaServer {
            config,
            authorizer,
            provider,
            signing: ArcSwap::from_pointee(signing),
            metrics,
        }))
    }

    /// Takes `roots` read again from the Secret: when they changed (a rotation step), or
    /// the service's own certificate is past half its life, signing switches over for
    /// the next request. Returns whether anything changed. On error the roots in force
    /// stay.
    pub fn update(&self, roots: RootSecret) -> Result<bool, ServerError> {
        let current = self.signing.load();
        if current.roots == roots && SystemTime::now() < current.renew_at {
            return Ok(false);
        }
        let rotated = current.roots != roots;
        let signing = build_signing(&self.config, roots, &self.provider)?;
        if rotated {
            tracing::info!(secret = %self.config.secret, bundle_roots = signing.roots.bundle.len(), "CA roots changed");
        }
        self.signing.store(Arc::new(signing));
        Ok(true)
    }

    /// Every trusted root, PEM encoded.
    pub fn bundle_pem(&self) -> String {
        self.signing.load().bundle_pem.clone()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Serves HTTPS on `listener` until the task is dropped. Each connection gets its own
    /// task; a failed handshake or request ends only that connection.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let server = self.clone();
            tokio::spawn(async move {
                let acceptor = TlsAcceptor::from(server.signing.load().tls.clone());
                let deadline = server.config.client_timeout;
                let tls = match tokio::time::timeout(deadline, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        server.metrics.count("tls_handshake_failed");
                        tracing::debug!(%peer, error = %e, "CA client handshake failed");
                        return;
                    }
                    Err(_) => {
                        server.metrics.count("tls_handshake_failed");
                        tracing::debug!(%peer, "CA client handshake timed out");
                        return;
                    }
                };
                let service = hyper::service::service_fn(|request| {
                    let server = server.clone();
                    async move { Ok::<_, Infallible>(server.handle(request).await) }
                });
                let served = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(deadline)
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
                if let Err(e) = served {
                    tracing::debug!(%peer, error = %e, "CA connection ended with an error");
                }
            });
        }
    }

    async fn handle(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        match self.sign(request).await {
            Ok(answer) => {
                self.metrics.count("issued");
                json_response(StatusCode::OK, &answer)
            }
            Err(refusal) => {
                self.metrics.count(refusal.reason);
                tracing::warn!(status = refusal.status.as_u16(), reason = refusal.reason, message = %refusal.message, "signing request refused");
                json_response(
                    refusal.status,
                    &ErrorResponse {
                        error: refusal.message,
                    },
                )
            }
        }
    }

    async fn sign(&self, request: Request<Incoming>) -> Result<SignResponse, Refusal> {
        if request.uri().path() != SIGN_PATH {
            return Err(Refusal {
                status: StatusCode::NOT_FOUND,
                reason: "not_found",
                message: format!(
                    "no such endpoint {}; use POST {SIGN_PATH}",
                    request.uri().path()
                ),
            });
        }
        if request.method() != Method::POST {
            return Err(Refusal {
                status: StatusCode::METHOD_NOT_ALLOWED,
                reason: "method_not_allowed",
                message: format!("method {} is not allowed; use POST", request.method()),
            });
        }
        let token = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::MissingToken)?
            .to_string();
        let deadline = self.config.client_timeout;
        let body = tokio::time::timeout(
            deadline,
            Limited::new(request.into_body(), MAX_REQUEST_BODY).collect(),
        )
        .await
        .map_err(|_| Refusal {
            status: StatusCode::REQUEST_TIMEOUT,
            reason: "request_timeout",
            message: format!(
                "request body not received within {} s",
                deadline.as_secs_f64()
            ),
        })?
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                Refusal {
                    status: StatusCode::PAYLOAD_TOO_LARGE,
                    reason: "too_large",
                    message: format!("request body exceeds {MAX_REQUEST_BODY} bytes"),
                }
            } else {
                Refusal::bad_request(format!("cannot read the request body: {e}"))
            }
        })?
        .to_bytes();
        let caller = self.authorizer.authenticate(&token).await?;
        let (identity, csr) = parse_sign_request(&body).map_err(Refusal::bad_request)?;
        self.authorizer.authorize(&caller, &identity).await?;
        let signing = self.signing.load();
        let chain = signing
            .ca
            .issue(&identity, &csr.public_key)
            .map_err(|e| Refusal {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                reason: "signing_failed",
                message: e.to_string(),
            })?;
        tracing::info!(%identity, node = %caller.node, "certificate issued");
        Ok(SignResponse {
            cert_chain: certificates_pem(&chain),
            trust_bundle: signing.bundle_pem.clone(),
        })
    }
}

/// The identity and certificate request of a sign request's JSON body, or why it is
/// malformed (answered 400).
pub(crate) fn parse_sign_request(
    body: &[u8],
) -> Result<(Identity, CertificateSigningRequestParams), String> {
    let request: SignRequest =
        serde_json::from_slice(body).map_err(|e| format!("request is not a sign request: {e}"))?;
    let identity: Identity = request.identity.parse().map_err(|e| format!("{e}"))?;
    let csr = CertificateSigningRequestDer::from_pem_slice(request.csr.as_bytes())
        .map_err(|e| format!("csr is not a PEM certificate request: {e}"))?;
    let csr = CertificateSigningRequestParams::from_der(&csr)
        .map_err(|e| format!("csr is not a valid certificate request: {e}"))?;
    Ok((identity, csr))
}

fn build_signing(
    config: &CaServerConfig,
    roots: RootSecret,
    provider: &Arc<CryptoProvider>,
) -> Result<Signing, ServerError> {
    let ca = roots.signing_ca(&config.secret, config.cert_lifetime)?;
    let failed = |problem: String| ServerError::ServingCertificate {
        names: config.dns_names.clone(),
        problem,
    };
    let key = KeyPair::generate().map_err(|e| failed(e.to_string()))?;
    let chain = ca
        .issue_server(&config.dns_names, &key)
        .map_err(|e| failed(e.to_string()))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let mut tls = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| failed(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| failed(e.to_string()))?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Signing {
        bundle_pem: roots.bundle_pem(),
        roots,
        ca,
        tls: Arc::new(tls),
        renew_at: SystemTime::now() + config.cert_lifetime / 2,
    })
}

fn json_response(status: StatusCode, body: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(body).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}
