//! Real TLS handshakes over loopback sockets: identities on both sides, every refusal
//! counted by reason, renewal and CA rotation without touching open connections.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, Issuer, KeyPair, SanType};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use ztunnel::identity::{
    self, CaFiles, CertManager, CertState, Identity, InProcessCa, TrustStore, WorkloadCertificate,
};
use ztunnel::tls::{self, FailureReason, Metrics, Side};

const DEADLINE: Duration = Duration::from_secs(5);
const TD: &str = "cluster.local";

fn id(ns: &str, sa: &str) -> Identity {
    Identity::new(TD, ns, sa).unwrap()
}

/// A root CA on disk, with a way to sign leaves of any shape (expired, wrong usage...).
struct Root {
    files: CaFiles,
    issuer: Issuer<'static, KeyPair>,
}

impl Root {
    fn new(dir: &Path) -> Root {
        let files = identity::init_ca(dir, TD).unwrap();
        let key = KeyPair::from_pem(&std::fs::read_to_string(&files.key).unwrap()).unwrap();
        let issuer =
            Issuer::from_ca_cert_pem(&std::fs::read_to_string(&files.cert).unwrap(), key).unwrap();
        Root { files, issuer }
    }

    /// A chain and key signed by this root, with `uris` as its URI SANs.
    fn signed(
        &self,
        uris: &[&str],
        shape: impl FnOnce(&mut CertificateParams),
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().unwrap()))
            .collect();
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::hours(1);
        shape(&mut params);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        (vec![cert.der().clone()], key)
    }

    fn leaf_with(&self, who: &Identity, shape: impl FnOnce(&mut CertificateParams)) -> Ready {
        let (chain, key) = self.signed(&[who.to_string().as_str()], shape);
        let cert = WorkloadCertificate::new(who.clone(), chain, key, &tls::provider()).unwrap();
        watch::channel(CertState::Ready(Arc::new(cert))).1
    }

    fn leaf(&self, who: &Identity) -> Ready {
        self.leaf_with(who, |_| {})
    }
}

type Ready = watch::Receiver<CertState>;

fn trust(roots: &[&Root]) -> Arc<TrustStore> {
    let pem: String = roots
        .iter()
        .map(|r| std::fs::read_to_string(&r.files.cert).unwrap())
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bundle.pem");
    std::fs::write(&path, pem).unwrap();
    TrustStore::from_file(&path).unwrap()
}

/// A TLS server on loopback: each accepted connection reports its handshake result and
/// then echoes.
struct Server {
    addr: SocketAddr,
    results: tokio::sync::mpsc::UnboundedReceiver<Result<Identity, FailureReason>>,
    metrics: Metrics,
}

async fn server(cert: Ready, trust: Arc<TrustStore>, deadline: Duration) -> Server {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = tls::server_config(cert, trust, TD, tls::provider()).unwrap();
    let metrics = Metrics::default();
    let (tx, results) = tokio::sync::mpsc::unbounded_channel();
    let m = metrics.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (config, m, tx) = (config.clone(), m.clone(), tx.clone());
            tokio::spawn(async move {
                match tls::accept(config, tcp, deadline, &m).await {
                    Ok((mut stream, peer)) => {
                        let _ = tx.send(Ok(peer));
                        let mut buf = [0u8; 1024];
                        while let Ok(n) = stream.read(&mut buf).await {
                            if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.reason));
                    }
                }
            });
        }
    });
    Server {
        addr,
        results,
        metrics,
    }
}

async fn client(
    addr: SocketAddr,
    cert: Ready,
    trust: Arc<TrustStore>,
    expected: Vec<Identity>,
    metrics: &Metrics,
) -> Result<(tokio_rustls::client::TlsStream<TcpStream>, Identity), tls::HandshakeError> {
    let config = tls::client_config(cert, trust, expected, tls::provider()).unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    tls::connect(config, addr.ip(), tcp, DEADLINE, metrics).await
}

async fn echo(stream: &mut tokio_rustls::client::TlsStream<TcpStream>, msg: &[u8]) {
    stream.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    stream.read_exact(&mut back).await.unwrap();
    assert_eq!(back, msg);
}

#[tokio::test]
async fn good_handshake_yields_both_identities() {
    let dir = tempfile::tempdir().unwrap();
    let root = Root::new(dir.path());
    let (orders, payments) = (id("prod", "orders"), id("finance", "payments"));
    let mut srv = server(root.leaf(&payments), trust(&[&root]), DEADLINE).await;
    let metrics = Metrics::default();
    let (mut stream, peer) = client(
        srv.addr,
        root.leaf(&orders),
        trust(&[&root]),
        vec![payments.clone()],
        &metrics,
    )
    .await
    .unwrap();
    assert_eq!(peer, payments);
    assert_eq!(srv.results.recv().await.unwrap(), Ok(orders));
    echo(&mut stream, b"hello").await;
    let (_, conn) = stream.get_ref();
    assert_eq!(conn.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(
        conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
}

/// Each refusal, the side that detects it, and the reason it counts.
#[tokio::test]
async fn every_refusal_is_counted_by_reason() {
    let dir = tempfile::tempdir().unwrap();
    let root = Root::new(&dir.path().join("root"));
    let stranger = Root::new(&dir.path().join("stranger"));
    let (orders, payments) = (id("prod", "orders"), id("finance", "payments"));
    let hour = time::Duration::hours(1);
    let foreign = Identity::new("other.domain", "prod", "orders").unwrap();

    struct Case {
        name: &'static str,
        client_cert: Ready,
        server_cert: Ready,
        expected: Identity,
        detected_by: Side,
        reason: FailureReason,
    }
    let cases = vec![
        Case {
            name: "client has no certificate",
            client_cert: watch::channel(CertState::Failed("none".into())).1,
            server_cert: root.leaf(&payments),
            expected: payments.clone(),
            detected_by: Side::server,
            reason: FailureReason::no_certificate,
        },
        Case {
            name: "client certificate from an unknown CA",
            client_cert: stranger.leaf(&orders),
            server_cert: root.leaf(&payments),
            expected: payments.clone(),
            detected_by: Side::server,
            reason: FailureReason::unknown_ca,
        },
        Case {
            name: "server certificate from an unknown CA",
            client_cert: root.leaf(&orders),
            server_cert: stranger.leaf(&payments),
            expected: payments.clone(),
            detected_by: Side::client,
            reason: FailureReason::unknown_ca,
        },
        Case {
            name: "client certificate expired",
            client_cert: root.leaf_with(&orders, |p| {
                p.not_before = OffsetDateTime::now_utc() - hour * 3;
                p.not_after = OffsetDateTime::now_utc() - hour;
            }),
            server_cert: root.leaf(&payments),
            expected: payments.clone(),
            detected_by: Side::server,
            reason: FailureReason::expired,
        },
        Case {
            name: "server certificate not yet valid",
            client_cert: root.leaf(&orders),
            server_cert: root.leaf_with(&payments, |p| {
                p.not_before = OffsetDateTime::now_utc() + hour;
                p.not_after = OffsetDateTime::now_utc() + hour * 3;
            }),
            expected: payments.clone(),
            detected_by: Side::client,
            reason: FailureReason::not_yet_valid,
        },
        Case {
            name: "server is not the expected identity",
            client_cert: root.leaf(&orders),
            server_cert: root.leaf(&id("finance", "inventory")),
            expected: payments.clone(),
            detected_by: Side::client,
            reason: FailureReason::identity_mismatch,
        },
        Case {
            name: "client from a foreign trust domain",
            client_cert: root.leaf(&foreign),
            server_cert: root.leaf(&payments),
            expected: payments.clone(),
            detected_by: Side::server,
            reason: FailureReason::foreign_trust_domain,
        },
        Case {
            name: "client certificate without clientAuth usage",
            client_cert: root.leaf_with(&orders, |p| {
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            }),
            server_cert: root.leaf(&payments),
            expected: payments.clone(),
            detected_by: Side::server,
            reason: FailureReason::wrong_key_usage,
        },
        Case {
            name: "server certificate without serverAuth usage",
            client_cert: root.leaf(&orders),
            server_cert: root.leaf_with(&payments, |p| {
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            }),
            expected: payments.clone(),
            detected_by: Side::client,
            reason: FailureReason::wrong_key_usage,
        },
    ];
    for case in cases {
        let mut srv = server(case.server_cert, trust(&[&root]), DEADLINE).await;
        let metrics = Metrics::default();
        let result = client(
            srv.addr,
            case.client_cert,
            trust(&[&root]),
            vec![case.expected],
            &metrics,
        )
        .await;
        let server_result = srv.results.recv().await.unwrap();
        let count = match case.detected_by {
            Side::server => {
                assert_eq!(
                    server_result,
                    Err(case.reason),
                    "{}: server result",
                    case.name
                );
                srv.metrics.failures(Side::server, case.reason)
            }
            Side::client => {
                let err = result
                    .as_ref()
                    .err()
                    .unwrap_or_else(|| panic!("{}: client connected", case.name));
                assert_eq!(err.reason, case.reason, "{}: {err}", case.name);
                metrics.failures(Side::client, case.reason)
            }
        };
        assert_eq!(count, 1, "{}: counted once", case.name);
        // The other side never ends up with a working connection either.
        if let Ok((mut stream, _)) = result {
            let mut buf = [0u8; 1];
            let read = tokio::time::timeout(DEADLINE, async {
                stream.write_all(b"x").await?;
                stream.read(&mut buf).await
            })
            .await
            .unwrap();
            assert!(
                matches!(read, Err(_) | Ok(0)),
                "{}: client got data through {read:?}",
                case.name
            );
        }
    }
}

#[tokio::test]
async fn garbage_and_silence_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let root = Root::new(dir.path());
    let mut srv = server(
        root.leaf(&id("a", "b")),
        trust(&[&root]),
        Duration::from_millis(300),
    )
    .await;

    let mut garbage = TcpStream::connect(srv.addr).await.unwrap();
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(
        srv.results.recv().await.unwrap(),
        Err(FailureReason::protocol)
    );

    let _silent = TcpStream::connect(srv.addr).await.unwrap();
    assert_eq!(
        srv.results.recv().await.unwrap(),
        Err(FailureReason::timeout)
    );
    assert_eq!(
        srv.metrics.failures(Side::server, FailureReason::protocol),
        1
    );
    assert_eq!(
        srv.metrics.failures(Side::server, FailureReason::timeout),
        1
    );
}

/// The certificate manager renews at about half-life; open connections keep the old
/// certificate and keep working, new connections carry the new one.
#[tokio::test]
async fn renewal_keeps_open_connections_and_serves_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    let root = Root::new(dir.path());
    let ca = InProcessCa::load(&root.files, Duration::from_secs(4))
        .unwrap()
        .with_backdate(Duration::ZERO);
    let manager = CertManager::new(Arc::new(ca), tls::provider(), identity::Metrics::default());
    let payments = id("finance", "payments");
    manager.hold(&payments);
    let first = manager.fetch(&payments).await.unwrap();

    let mut srv = server(
        manager.subscribe(&payments).unwrap(),
        trust(&[&root]),
        DEADLINE,
    )
    .await;
    let metrics = Metrics::default();
    let (mut old, _) = client(
        srv.addr,
        root.leaf(&id("prod", "orders")),
        trust(&[&root]),
        vec![payments.clone()],
        &metrics,
    )
    .await
    .unwrap();
    srv.results.recv().await.unwrap().unwrap();
    let served = |s: &tokio_rustls::client::TlsStream<TcpStream>| {
        let leaf = &s.get_ref().1.peer_certificates().unwrap()[0];
        identity::CertificateInfo::parse(leaf).unwrap().serial
    };
    assert_eq!(served(&old), first.info().serial);

    let mut updates = manager.subscribe(&payments).unwrap();
    let renewed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            updates.changed().await.unwrap();
            if let CertState::Ready(cert) = &*updates.borrow_and_update()
                && cert.info().serial != first.info().serial
            {
                return cert.clone();
            }
        }
    })
    .await
    .expect("renewed within 10 s");

    echo(&mut old, b"still here").await;
    let (new, _) = client(
        srv.addr,
        root.leaf(&id("prod", "orders")),
        trust(&[&root]),
        vec![payments.clone()],
        &metrics,
    )
    .await
    .unwrap();
    assert_eq!(served(&new), renewed.info().serial);
    echo(&mut old, b"and still here").await;

    manager.release(&payments);
    assert!(manager.current(&payments).is_none());
    assert!(matches!(
        manager.fetch(&payments).await,
        Err(identity::Error::NotHeld(_))
    ));
}

#[tokio::test]
async fn concurrent_fetches_share_one_issuance() {
    let dir = tempfile::tempdir().unwrap();
    let root = Root::new(dir.path());
    let ca = InProcessCa::load(&root.files, identity::DEFAULT_CERT_LIFETIME).unwrap();
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = identity::Metrics::register(&mut registry);
    let manager = CertManager::new(Arc::new(ca), tls::provider(), metrics);
    let who = id("prod", "orders");
    manager.hold(&who);
    manager.hold(&who);
    let fetches: Vec<_> = (0..20).map(|_| manager.fetch(&who)).collect();
    let certs = futures::future::try_join_all(fetches).await.unwrap();
    assert!(certs.iter().all(|c| Arc::ptr_eq(c, &certs[0])));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains("ztunnel_certificates_issued_total 1\n"),
        "{text}"
    );
    // Two holders: one release keeps it.
    manager.release(&who);
    assert!(manager.current(&who).is_some());
    manager.release(&who);
    assert!(manager.current(&who).is_none());
}

/// Staged CA rotation: a bundle of old and new roots accepts leaves of both; once the
/// old root is removed from the file, its leaves are refused, while a connection made
/// before keeps working.
#[tokio::test]
async fn bundle_rotation_in_stages() {
    let dir = tempfile::tempdir().unwrap();
    let old = Root::new(&dir.path().join("old"));
    let new = Root::new(&dir.path().join("new"));
    let bundle_path: PathBuf = dir.path().join("bundle.pem");
    let pem = |r: &Root| std::fs::read_to_string(&r.files.cert).unwrap();
    std::fs::write(&bundle_path, pem(&old) + &pem(&new)).unwrap();
    let store = TrustStore::from_file(&bundle_path).unwrap();
    assert_eq!(store.current().roots().len(), 2);
    let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = errors.clone();
    let _watcher = store
        .watch(move |e| seen.lock().unwrap().push(e.to_string()))
        .unwrap();

    let payments = id("finance", "payments");
    let mut srv = server(new.leaf(&payments), store.clone(), DEADLINE).await;
    let metrics = Metrics::default();
    let connect = |cert| {
        client(
            srv.addr,
            cert,
            trust(&[&old, &new]),
            vec![payments.clone()],
            &metrics,
        )
    };
    let (mut from_old, _) = connect(old.leaf(&id("prod", "orders"))).await.unwrap();
    srv.results.recv().await.unwrap().unwrap();
    connect(new.leaf(&id("prod", "orders"))).await.unwrap();
    srv.results.recv().await.unwrap().unwrap();

    std::fs::write(&bundle_path, pem(&new)).unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        while store.current().roots().len() != 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the watcher reloads the bundle");

    let _ = connect(old.leaf(&id("prod", "orders"))).await;
    assert_eq!(
        srv.results.recv().await.unwrap(),
        Err(FailureReason::unknown_ca)
    );
    connect(new.leaf(&id("prod", "orders"))).await.unwrap();
    srv.results.recv().await.unwrap().unwrap();
    echo(&mut from_old, b"established before the rotation").await;
    assert!(
        errors.lock().unwrap().is_empty(),
        "reload errors: {:?}",
        errors.lock().unwrap()
    );
}

#[tokio::test]
async fn a_broken_bundle_edit_keeps_the_bundle_in_force() {
    let dir = tempfile::tempdir().unwrap();
    let root = Root::new(dir.path());
    let path = dir.path().join("bundle.pem");
    std::fs::copy(&root.files.cert, &path).unwrap();
    let store = TrustStore::from_file(&path).unwrap();
    let (tx, mut errors) = tokio::sync::mpsc::unbounded_channel();
    let _watcher = store.watch(move |e| drop(tx.send(e.to_string()))).unwrap();
    std::fs::write(&path, "-----BEGIN CERTIFICATE-----\ngarbage").unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), errors.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        err.contains("bundle.pem") && err.contains("malformed"),
        "{err}"
    );
    assert_eq!(store.current().roots().len(), 1);
}

/// The certificate it holds is never handed out across identities: the chain must carry
/// the identity it is filed under.
#[test]
fn a_certificate_must_carry_its_identity() {
    let dir = tempfile::tempdir().unwrap();
    let root = Root::new(dir.path());
    let key = KeyPair::generate().unwrap();
    let ca = InProcessCa::load(&root.files, identity::DEFAULT_CERT_LIFETIME).unwrap();
    let chain: Vec<CertificateDer<'static>> = ca.issue(&id("prod", "orders"), &key).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let err = WorkloadCertificate::new(id("prod", "other"), chain, key, &tls::provider())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("spiffe://cluster.local/ns/prod/sa/other") && err.contains("do not include"),
        "{err}"
    );
}

/// SPIFFE allows exactly one URI SAN. A peer whose certificate carries two identities
/// (both of this trust domain, both valid, signed by the trusted root) is refused at the
/// handshake, whichever side presents it, and counted as `multiple_uri_sans`; before,
/// the first URI was taken as the identity.
#[tokio::test]
async fn a_certificate_with_two_uri_sans_is_refused_at_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let root = Root::new(dir.path());
    let (orders, payments) = (id("prod", "orders"), id("finance", "payments"));
    let admin = id("kube-system", "admin");
    let provider = tls::provider();

    // A client with two identities against the tunnel's server.
    let mut srv = server(root.leaf(&payments), trust(&[&root]), DEADLINE).await;
    let (chain, key) = root.signed(&[&admin.to_string(), &orders.to_string()], |_| {});
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider.clone())))
        .with_client_auth_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(srv.addr).await.unwrap();
    let connected = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls_pki_types::ServerName::IpAddress(srv.addr.ip().into()),
            tcp,
        )
        .await;
    assert_eq!(
        srv.results.recv().await.unwrap(),
        Err(FailureReason::multiple_uri_sans)
    );
    assert_eq!(
        srv.metrics
            .failures(Side::server, FailureReason::multiple_uri_sans),
        1
    );
    if let Ok(mut stream) = connected {
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(DEADLINE, async {
            stream.write_all(b"x").await?;
            stream.read(&mut buf).await
        })
        .await
        .unwrap();
        assert!(matches!(read, Err(_) | Ok(0)), "data through {read:?}");
    }

    // A server with two identities, one of them the expected one, against the tunnel's
    // client.
    let (chain, key) = root.signed(&[&payments.to_string(), &admin.to_string()], |_| {});
    let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepting = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        acceptor.accept(tcp).await.map(drop)
    });
    let metrics = Metrics::default();
    let err = client(
        addr,
        root.leaf(&orders),
        trust(&[&root]),
        vec![payments.clone()],
        &metrics,
    )
    .await
    .unwrap_err();
    assert_eq!(err.reason, FailureReason::multiple_uri_sans, "{err}");
    assert!(
        err.detail.contains("2 URI SANs") && err.detail.contains(&admin.to_string()),
        "{err}"
    );
    assert_eq!(
        metrics.failures(Side::client, FailureReason::multiple_uri_sans),
        1
    );
    assert!(
        accepting.await.unwrap().is_err(),
        "the server saw a handshake"
    );
}

/// The tunnel never holds a certificate with two URI SANs either: one issued that way is
/// refused as unusable, even when one of them is the identity it was asked for.
#[test]
fn a_held_certificate_must_carry_one_uri_san() {
    let dir = tempfile::tempdir().unwrap();
    let root = Root::new(dir.path());
    let orders = id("prod", "orders");
    let (chain, key) = root.signed(
        &[
            &orders.to_string(),
            "spiffe://cluster.local/ns/prod/sa/other",
        ],
        |_| {},
    );
    let err = WorkloadCertificate::new(orders, chain, key, &tls::provider())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("2 URI SANs") && err.contains("exactly one"),
        "{err}"
    );
}

/// A client-side test peer that accepts any server certificate, so the server's
/// verifier is what the test exercises.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
