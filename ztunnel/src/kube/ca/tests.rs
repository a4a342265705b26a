//! The CA service and its client over real TLS on loopback, with the API server faked.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};

use super::authorize::tests::config as authorizer_config;
use super::client::verify_leaf;
use super::*;
use crate::identity::{CertManager, Identity, TrustBundle, TrustStore};
use crate::kube::test_api::FakeApi;

const SERVER_NAME: &str = "ztunnel-ca.ztunnel-system.svc";
const BUNDLE: &str = "ztunnel-trust-bundle";

struct Running {
    server: Arc<CaServer>,
    address: String,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
    token_file: std::path::PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start(api: &FakeApi, roots: RootSecret) -> Running {
    let config = CaServerConfig {
        secret: "ztunnel-system/ztunnel-ca".into(),
        dns_names: vec![SERVER_NAME.into(), "ztunnel-ca".into()],
        cert_lifetime: Duration::from_secs(3600),
        client_timeout: Duration::from_secs(3),
    };
    let authorizer = Authorizer::new(api.client(), authorizer_config());
    let server = CaServer::new(
        config,
        roots,
        authorizer,
        crate::tls::provider(),
        Metrics::default(),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let task = tokio::spawn(server.clone().serve(listener));
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{}\n", FakeApi::TUNNEL_TOKEN)).unwrap();
    Running {
        server,
        address,
        task,
        _dir: dir,
        token_file,
    }
}

fn client(running: &Running, trust: Arc<TrustStore>) -> CaClient {
    CaClient::new(
        CaClientConfig {
            address: running.address.clone(),
            server_name: SERVER_NAME.into(),
            token_file: running.token_file.clone(),
            timeout: Duration::from_secs(5),
        },
        trust,
        crate::tls::provider(),
    )
}

fn trust_of(roots: &RootSecret) -> Arc<TrustStore> {
    TrustStore::fixed(TrustBundle::new(roots.bundle.clone()).unwrap())
}

fn id(ns: &str, sa: &str) -> Identity {
    Identity::new("cluster.local", ns, sa).unwrap()
}

fn csr() -> (
    rcgen::KeyPair,
    rustls_pki_types::CertificateSigningRequestDer<'static>,
) {
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap();
    (key, csr.der().clone())
}

#[tokio::test]
async fn issues_over_tls_to_the_certificate_manager() {
    let api = FakeApi::cluster();
    let roots = RootSecret::generate("cluster.local").unwrap();
    let running = start(&api, roots.clone()).await;
    let ca = Arc::new(client(&running, trust_of(&roots)));
    let mut bundle = ca.trust_bundle();
    assert!(bundle.borrow().is_none());

    // The certificate manager, the tunnel's user of the issuer trait, gets a working
    // certificate through the client.
    let manager = CertManager::new(
        ca.clone(),
        crate::tls::provider(),
        crate::identity::Metrics::default(),
    );
    let payments = id("finance", "payments");
    manager.hold(&payments);
    let cert = manager.fetch(&payments).await.unwrap();
    assert_eq!(cert.identity(), &payments);
    assert_eq!(cert.info().uris, vec![payments.to_string()]);
    let chain = &cert.certified_key().cert;
    let trusted = TrustBundle::new(roots.bundle.clone()).unwrap();
    verify_leaf(&chain[0], &chain[1..], &trusted, &crate::tls::provider()).unwrap();

    // The answer's bundle is published for the tunnel's trust store.
    bundle.changed().await.unwrap();
    let published = bundle.borrow().clone().unwrap();
    assert_eq!(published.roots(), roots.bundle.as_slice());
    assert_eq!(running.server.metrics().requests("issued"), 1);

    // The TokenReview and the pod lookups happened, in that order.
    let calls = api.calls();
    assert_eq!(
        calls,
        vec![
            "POST /apis/authentication.k8s.io/v1/tokenreviews",
            "GET /api/v1/namespaces/ztunnel-system/pods/ztunnel-abcde",
            "GET /api/v1/namespaces/finance/pods",
        ]
    );
}

#[tokio::test]
async fn refusals_reach_the_client_with_status_and_reason_and_are_counted() {
    let api = FakeApi::cluster();
    let roots = RootSecret::generate("cluster.local").unwrap();
    let running = start(&api, roots.clone()).await;
    let ca = client(&running, trust_of(&roots));
    let (_key, request) = csr();

    // A pod of the identity exists, but on another node.
    let err = ca
        .request(&id("shop", "orders"), &request)
        .await
        .unwrap_err();
    match &err {
        ClientError::Refused {
            status, message, ..
        } => {
            assert_eq!(*status, StatusCode::FORBIDDEN);
            assert!(message.contains("runs on node worker-1"), "{message}");
        }
        other => panic!("expected a refusal, got {other}"),
    }
    assert_eq!(running.server.metrics().requests("no_pod_on_node"), 1);

    // An expired token.
    std::fs::write(&running.token_file, "expired-token").unwrap();
    let err = ca
        .request(&id("finance", "payments"), &request)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("401 Unauthorized") && err.contains("token not authenticated"),
        "{err}"
    );
    assert_eq!(running.server.metrics().requests("token_rejected"), 1);

    // Another ServiceAccount's token.
    std::fs::write(&running.token_file, FakeApi::APP_TOKEN).unwrap();
    let err = ca
        .request(&id("finance", "payments"), &request)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("403 Forbidden") && err.contains("not the tunnels' ServiceAccount"),
        "{err}"
    );
    assert_eq!(
        running.server.metrics().requests("wrong_service_account"),
        1
    );

    // No token at all never reaches the server.
    std::fs::write(&running.token_file, "\n").unwrap();
    let err = ca
        .request(&id("finance", "payments"), &request)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("is empty"), "{err}");
    assert_eq!(running.server.metrics().requests("issued"), 0);
}

/// An HTTP/1.1 connection over TLS to the service, trusting `roots`.
async fn http1_sender<B>(
    running: &Running,
    roots: &RootSecret,
) -> hyper::client::conn::http1::SendRequest<B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let store = Arc::new(
        TrustBundle::new(roots.bundle.clone())
            .unwrap()
            .store()
            .clone(),
    );
    let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(&running.address)
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(SERVER_NAME).unwrap(), tcp)
        .await
        .unwrap();
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

/// One raw HTTPS request to the service, trusting `roots`.
async fn raw(
    running: &Running,
    roots: &RootSecret,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Vec<u8>,
) -> (StatusCode, Value) {
    let mut sender = http1_sender(running, roots).await;
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, SERVER_NAME);
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let response = sender
        .send_request(request.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap())
}

#[tokio::test]
async fn malformed_requests_get_clear_errors() {
    let api = FakeApi::cluster();
    let roots = RootSecret::generate("cluster.local").unwrap();
    let running = start(&api, roots.clone()).await;
    let token = Some(FakeApi::TUNNEL_TOKEN);
    let (_key, request) = csr();
    let csr_pem = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", request.to_vec()));
    let sign = |identity: &str, csr: &str| {
        serde_json::to_vec(&json!({"identity": identity, "csr": csr})).unwrap()
    };
    let payments = "spiffe://cluster.local/ns/finance/sa/payments";
    // method, path, token, body, expected status, expected message
    type Case<'a> = (
        Method,
        &'a str,
        Option<&'a str>,
        Vec<u8>,
        StatusCode,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            Method::GET,
            SIGN_PATH,
            token,
            vec![],
            StatusCode::METHOD_NOT_ALLOWED,
            "method GET is not allowed",
        ),
        (
            Method::POST,
            "/v1/other",
            token,
            vec![],
            StatusCode::NOT_FOUND,
            "no such endpoint /v1/other",
        ),
        (
            Method::POST,
            SIGN_PATH,
            None,
            sign(payments, &csr_pem),
            StatusCode::UNAUTHORIZED,
            "no bearer token",
        ),
        (
            Method::POST,
            SIGN_PATH,
            token,
            b"{not json".to_vec(),
            StatusCode::BAD_REQUEST,
            "request is not a sign request",
        ),
        (
            Method::POST,
            SIGN_PATH,
            token,
            br#"{"identity":"x","csr":"y","extra":1}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "unknown field `extra`",
        ),
        (
            Method::POST,
            SIGN_PATH,
            token,
            sign("spiffe://cluster.local/ns/finance", &csr_pem),
            StatusCode::BAD_REQUEST,
            "is not of the form /ns/<namespace>/sa/<service-account>",
        ),
        (
            Method::POST,
            SIGN_PATH,
            token,
            sign(payments, "not pem"),
            StatusCode::BAD_REQUEST,
            "csr is not a PEM certificate request",
        ),
        (
            Method::POST,
            SIGN_PATH,
            token,
            sign(
                payments,
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            ),
            StatusCode::BAD_REQUEST,
            "csr is not a valid certificate request",
        ),
        (
            Method::POST,
            SIGN_PATH,
            token,
            vec![b' '; server::MAX_REQUEST_BODY + 1],
            StatusCode::PAYLOAD_TOO_LARGE,
            "exceeds 65536 bytes",
        ),
    ];
    for (method, path, token, body, want_status, want) in cases {
        let label = format!("{method} {path}");
        let (status, answer) = raw(&running, &roots, method, path, token, body).await;
        assert_eq!(status, want_status, "{label}: {answer}");
        let error = answer["error"].as_str().unwrap();
        assert!(error.contains(want), "{label}: {error:?} lacks {want:?}");
    }
    let metrics = running.server.metrics();
    assert_eq!(metrics.requests("bad_request"), 5);
    assert_eq!(metrics.requests("too_large"), 1);
    assert_eq!(metrics.requests("missing_token"), 1);
    assert_eq!(metrics.requests("issued"), 0);

    // The service still works after all of that.
    let (status, answer) = raw(
        &running,
        &roots,
        Method::POST,
        SIGN_PATH,
        token,
        sign(payments, &csr_pem),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert!(
        answer["certChain"]
            .as_str()
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );
}

#[tokio::test]
async fn a_client_that_stalls_its_body_is_answered_408() {
    let api = FakeApi::cluster();
    let roots = RootSecret::generate("cluster.local").unwrap();
    let running = start(&api, roots.clone()).await;
    let mut sender = http1_sender(&running, &roots).await;
    // Promises 100 bytes and never sends them.
    let stalled = http_body_util::StreamBody::new(futures::stream::pending::<
        Result<hyper::body::Frame<Bytes>, std::convert::Infallible>,
    >());
    let request = Request::post(SIGN_PATH)
        .header(header::HOST, SERVER_NAME)
        .header(
            header::AUTHORIZATION,
            format!("Bearer {}", FakeApi::TUNNEL_TOKEN),
        )
        .header(header::CONTENT_LENGTH, "100")
        .body(stalled)
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
        .await
        .expect("answered within the client deadline")
        .unwrap();
    assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["error"], "request body not received within 3 s");
    assert_eq!(running.server.metrics().requests("request_timeout"), 1);
    assert!(api.calls().is_empty(), "nothing reached the API server");
}

#[tokio::test]
async fn client_refuses_a_service_outside_its_trust_bundle() {
    let api = FakeApi::cluster();
    let roots = RootSecret::generate("cluster.local").unwrap();
    let running = start(&api, roots).await;
    let stranger = RootSecret::generate("cluster.local").unwrap();
    let ca = client(&running, trust_of(&stranger));
    let (_key, request) = csr();
    let err = ca
        .request(&id("finance", "payments"), &request)
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Tls { .. }), "{err}");
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    // The server sees the client's alert after the client has given up.
    let counted = async {
        while running.server.metrics().requests("tls_handshake_failed") == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), counted)
        .await
        .expect("the server counts the failed handshake");
    assert!(api.calls().is_empty(), "nothing reached the API server");
}

#[tokio::test]
async fn staged_root_rotation_reaches_clients_without_a_failed_request() {
    let api = FakeApi::cluster();
    let mut roots = RootSecret::generate("cluster.local").unwrap();
    let running = start(&api, roots.clone()).await;
    let trust = trust_of(&roots);
    let ca = client(&running, trust.clone());
    let bundle = ca.trust_bundle();
    let payments = id("finance", "payments");
    let (_key, request) = csr();
    let old_root = roots.bundle[0].clone();
    let provider = crate::tls::provider();
    let signed_by = |chain: &[CertificateDer<'static>], root: &CertificateDer<'static>| {
        let only = TrustBundle::new(vec![root.clone()]).unwrap();
        verify_leaf(&chain[0], &chain[1..], &only, &provider).is_ok()
    };

    let chain = ca.request(&payments, &request).await.unwrap();
    assert!(signed_by(&chain, &old_root));

    // 1. prepare: the new root is trusted, the old one still signs.
    roots.prepare("s", "cluster.local").unwrap();
    assert!(running.server.update(roots.clone()).unwrap());
    assert!(
        !running.server.update(roots.clone()).unwrap(),
        "no change, no rebuild"
    );
    let chain = ca.request(&payments, &request).await.unwrap();
    assert!(signed_by(&chain, &old_root));
    let published = bundle.borrow().clone().unwrap();
    assert_eq!(published.roots().len(), 2);
    // The tunnel takes the bundle into its trust store.
    trust.replace(TrustBundle::new(published.roots().to_vec()).unwrap());

    // 2. activate: the new root signs (and serves); the client trusts both.
    roots.activate("s").unwrap();
    let new_root = roots.bundle[1].clone();
    running.server.update(roots.clone()).unwrap();
    let chain = ca.request(&payments, &request).await.unwrap();
    assert!(signed_by(&chain, &new_root));
    assert!(!signed_by(&chain, &old_root));

    // 3. retire: only the new root is left in the bundle the client receives.
    roots.retire().unwrap();
    running.server.update(roots.clone()).unwrap();
    ca.request(&payments, &request).await.unwrap();
    assert_eq!(
        bundle.borrow().clone().unwrap().roots(),
        std::slice::from_ref(&new_root)
    );
    assert_eq!(running.server.metrics().requests("issued"), 4);
}

#[tokio::test]
async fn root_store_creates_once_publishes_the_bundle_and_detects_conflicts() {
    let api = FakeApi::cluster();
    let store = RootStore::new(api.client(), "ztunnel-system", "ztunnel-ca");
    assert!(store.load().await.unwrap().is_none());
    let created = store.load_or_create("cluster.local").await.unwrap();
    let again = store.load_or_create("cluster.local").await.unwrap();
    assert_eq!(created, again, "the second start reads the first's root");
    let secret = api
        .object("secrets", "ztunnel-system", "ztunnel-ca")
        .unwrap();
    assert_eq!(secret["type"], "Opaque");
    let keys: Vec<&String> = secret["data"].as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        vec!["root-cert.pem", "root-key.pem", "trust-bundle.pem"]
    );

    // Publishing writes the ConfigMap once, and again only when the bundle changes.
    store
        .publish_bundle(BUNDLE, &created.bundle_pem())
        .await
        .unwrap();
    store
        .publish_bundle(BUNDLE, &created.bundle_pem())
        .await
        .unwrap();
    let published = api
        .object("configmaps", "ztunnel-system", "ztunnel-trust-bundle")
        .unwrap();
    assert_eq!(
        published["data"][BUNDLE_CONFIG_MAP_KEY],
        json!(created.bundle_pem())
    );
    // PEM with `\n` line endings, in the ConfigMap and in every key of the Secret.
    let bundle_text = published["data"][BUNDLE_CONFIG_MAP_KEY].as_str().unwrap();
    assert!(
        bundle_text.starts_with("-----BEGIN CERTIFICATE-----\n") && !bundle_text.contains('\r'),
        "{bundle_text:?}"
    );
    for (key, value) in created.to_data() {
        assert!(!value.0.contains(&b'\r'), "{key} has \\r\\n line endings");
    }
    let writes = |api: &FakeApi| {
        api.calls()
            .iter()
            .filter(|c| c.contains("configmaps") && !c.starts_with("GET"))
            .count()
    };
    assert_eq!(writes(&api), 1);

    // A rotation step written with a stale resourceVersion is refused.
    let (mut roots, version) = store.load().await.unwrap().unwrap();
    roots.prepare("s", "cluster.local").unwrap();
    store.replace(&roots, version.clone()).await.unwrap();
    assert_eq!(store.load().await.unwrap().unwrap().0, roots);
    let err = store
        .replace(&roots, version)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cannot replace secret ztunnel-system/ztunnel-ca") && err.contains("modified"),
        "{err}"
    );
    store
        .publish_bundle(BUNDLE, &roots.bundle_pem())
        .await
        .unwrap();
    assert_eq!(writes(&api), 2);

    // Garbage in the Secret is named.
    let mut broken = api
        .object("secrets", "ztunnel-system", "ztunnel-ca")
        .unwrap();
    broken["data"]["trust-bundle.pem"] = json!("bm90IHBlbQ==");
    api.put_object("secrets", broken);
    let err = store.load().await.unwrap_err().to_string();
    assert!(
        err.contains("ztunnel-system/ztunnel-ca/trust-bundle.pem")
            && err.contains("no certificate"),
        "{err}"
    );
}

/// An answer whose leaf carries two URI SANs (the asked identity among them) is refused
/// by the client, before it reaches the certificate manager.
#[test]
fn client_refuses_a_leaf_with_two_uri_sans() {
    let root_key = rcgen::KeyPair::generate().unwrap();
    let mut root = rcgen::CertificateParams::default();
    root.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let root_pem = root.self_signed(&root_key).unwrap().pem();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&root_pem, root_key).unwrap();
    let orders = id("prod", "orders");
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::default();
    leaf.subject_alt_names = [orders.to_string(), id("kube-system", "admin").to_string()]
        .iter()
        .map(|u| rcgen::SanType::URI(u.as_str().try_into().unwrap()))
        .collect();
    leaf.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let leaf_pem = leaf.signed_by(&leaf_key, &issuer).unwrap().pem();
    let answer = SignResponse {
        cert_chain: leaf_pem,
        trust_bundle: root_pem,
    };
    let err = super::client::check_answer(&orders, &answer, &crate::tls::provider()).unwrap_err();
    assert!(
        err.contains("2 URI SANs")
            && err.contains("spiffe://cluster.local/ns/kube-system/sa/admin"),
        "{err}"
    );
}
