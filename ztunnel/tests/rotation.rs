//! Certificate renewal and a staged CA rotation (prepare, activate, retire, as the
//! cluster CA's `RootSecret` stages them) under load: two tunnels in one process on
//! loopback with real mTLS, 150 connections held open through them and new ones
//! arriving all along, fresh TLS handshakes against the server tunnel all along, the
//! workload certificates renewed every few seconds and the trust bundle file edited at
//! each step. Nothing may be dropped and no handshake may fail.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::registry::Registry;
use rustls_pki_types::CertificateSigningRequestDer;
use tokio::net::{TcpListener, TcpStream};
use ztunnel::hbone::Mtls;
use ztunnel::identity::{
    self, CertManager, CertificateAuthority, Identity, InProcessCa, SignFuture, TrustStore,
};
use ztunnel::kube::ca::RootSecret;
use ztunnel::proxy::{Config, Proxy, Route};
use ztunnel::tls::{self, FailureReason, Side};

use support::{TD, TestMesh, echo, id, round_trip, socks5_connect};

const NET: u8 = 153;
/// Connections held open through both tunnels all along.
const OPEN: usize = 1000;
const CLIENTS: u8 = 5;
/// Workload certificates live this long (no backdating), so each renews about every
/// half of it.
const LIFETIME: Duration = Duration::from_secs(6);
const SECRET: &str = "ztunnel-system/ztunnel-ca";
const DEADLINE: Duration = Duration::from_secs(5);

/// Signs with the root the rotation's current step signs with.
struct StagedCa(Mutex<Arc<InProcessCa>>);

impl StagedCa {
    fn signing(roots: &RootSecret) -> Arc<InProcessCa> {
        Arc::new(
            roots
                .signing_ca(SECRET, LIFETIME)
                .unwrap()
                .with_backdate(Duration::ZERO),
        )
    }

    fn set(&self, roots: &RootSecret) {
        *self.0.lock().unwrap() = Self::signing(roots);
    }
}

impl CertificateAuthority for StagedCa {
    fn sign(
        &self,
        identity: Identity,
        csr: CertificateSigningRequestDer<'static>,
    ) -> SignFuture<'_> {
        let ca = self.0.lock().unwrap().clone();
        Box::pin(async move { ca.sign(identity, csr).await })
    }
}

/// One tunnel of the test.
struct Node {
    proxy: Proxy,
    certs: CertManager,
    trust: Arc<TrustStore>,
    tls: tls::Metrics,
    _watch: Option<ztunnel::file_watch::FileWatcher>,
}

fn node(ca: Arc<StagedCa>, bundle: &Path, mesh: Arc<TestMesh>, identities: &[&Identity]) -> Node {
    let certs = CertManager::new(ca, tls::provider(), identity::Metrics::default());
    for identity in identities {
        certs.hold(identity);
    }
    let trust = TrustStore::from_file(bundle).unwrap();
    let watch = trust
        .watch(|e| panic!("trust bundle reload failed: {e}"))
        .unwrap();
    let metrics = tls::Metrics::default();
    let mtls = Mtls::new(certs.clone(), trust.clone(), TD, DEADLINE, metrics.clone());
    let proxy = Proxy::new(
        Config::default(),
        mesh,
        Arc::new(mtls),
        &mut Registry::default(),
    );
    Node {
        proxy,
        certs,
        trust,
        tls: metrics,
        _watch: watch,
    }
}

const REASONS: [FailureReason; 12] = [
    FailureReason::no_certificate,
    FailureReason::unknown_ca,
    FailureReason::expired,
    FailureReason::not_yet_valid,
    FailureReason::identity_mismatch,
    FailureReason::foreign_trust_domain,
    FailureReason::multiple_uri_sans,
    FailureReason::wrong_key_usage,
    FailureReason::bad_certificate,
    FailureReason::rejected_by_peer,
    FailureReason::timeout,
    FailureReason::protocol,
];

fn handshake_failures(metrics: &tls::Metrics) -> Vec<(Side, FailureReason, u64)> {
    [Side::server, Side::client]
        .into_iter()
        .flat_map(|side| REASONS.map(|reason| (side, reason, metrics.failures(side, reason))))
        .filter(|(_, _, n)| *n > 0)
        .collect()
}

/// The serial of each certificate a node holds.
fn serials(certs: &CertManager) -> Vec<(Identity, Option<String>)> {
    certs
        .snapshot()
        .into_iter()
        .map(|(id, info)| (id, info.map(|i| i.serial)))
        .collect()
}

/// Waits until every certificate of every node was issued again since `before`.
async fn renewed(nodes: &[&Node], before: &[Vec<(Identity, Option<String>)>]) {
    tokio::time::timeout(LIFETIME * 3, async {
        loop {
            let all = nodes.iter().zip(before).all(|(node, before)| {
                serials(&node.certs)
                    .iter()
                    .zip(before)
                    .all(|((_, now), (_, then))| now.is_some() && now != then)
            });
            if all {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("every certificate renewed within three lifetimes");
}

/// Writes the bundle of `roots` and waits until both tunnels trust exactly it.
async fn publish(path: &Path, roots: &RootSecret, nodes: &[&Node]) {
    let temp = path.with_extension("new");
    std::fs::write(&temp, roots.bundle_pem()).unwrap();
    std::fs::rename(&temp, path).unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        while nodes
            .iter()
            .any(|n| n.trust.current().roots() != roots.bundle.as_slice())
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("both tunnels reload the bundle");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_and_staged_rotation_under_load_drop_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle.pem");
    let mut roots = RootSecret::generate(TD).unwrap();
    std::fs::write(&bundle, roots.bundle_pem()).unwrap();
    let ca = Arc::new(StagedCa(Mutex::new(StagedCa::signing(&roots))));

    let ip = |host: u8| IpAddr::V4(Ipv4Addr::new(127, 0, NET, host));
    let server_id = id("back", "server");
    let clients: Vec<(IpAddr, Identity)> = (0..CLIENTS)
        .map(|i| (ip(10 + i), id("front", &format!("client-{i}"))))
        .collect();
    let mesh = TestMesh::new();
    mesh.add_workload("server", server_id.clone(), ip(3));
    for (i, (addr, identity)) in clients.iter().enumerate() {
        mesh.add_workload(&format!("client-{i}"), identity.clone(), *addr);
    }
    let client_ids: Vec<&Identity> = clients.iter().map(|(_, id)| id).collect();
    let client = node(ca.clone(), &bundle, mesh.clone(), &client_ids);
    let server = node(ca.clone(), &bundle, mesh.clone(), &[&server_id]);

    let hbone_listener = server
        .proxy
        .sockets()
        .listen(SocketAddr::new(ip(3), 0))
        .unwrap();
    let hbone = hbone_listener.local_addr().unwrap();
    let p = server.proxy.clone();
    tokio::spawn(async move { p.serve_inbound(hbone_listener).await });
    let socks_listener = client
        .proxy
        .sockets()
        .listen(SocketAddr::new(ip(1), 0))
        .unwrap();
    let socks = socks_listener.local_addr().unwrap();
    let p = client.proxy.clone();
    tokio::spawn(async move { p.serve_socks5(socks_listener).await.unwrap() });
    let app_listener = TcpListener::bind(SocketAddr::new(ip(3), 0)).await.unwrap();
    let app = app_listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = app_listener.accept().await {
            tokio::spawn(echo(tcp));
        }
    });
    mesh.add_route(
        app,
        Route::Hbone {
            endpoint: hbone,
            target: app,
            identities: vec![server_id.clone()],
            workload: Some(("server".to_owned(), "back".to_owned())),
        },
    );

    let mut open: Vec<TcpStream> = Vec::with_capacity(OPEN);
    for i in 0..OPEN {
        let (source, _) = &clients[i % clients.len()];
        let mut tcp = socks5_connect(socks, *source, app).await.unwrap();
        round_trip(&mut tcp, format!("held {i}").as_bytes()).await;
        open.push(tcp);
    }

    // New application connections keep arriving, from every client workload.
    let stop = Arc::new(AtomicBool::new(false));
    let arrived = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let arrivals = {
        let (stop, arrived, errors) = (stop.clone(), arrived.clone(), errors.clone());
        let sources: Vec<IpAddr> = clients.iter().map(|(a, _)| *a).collect();
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                for source in &sources {
                    match socks5_connect(socks, *source, app).await {
                        Ok(mut tcp) => {
                            round_trip(&mut tcp, b"arriving").await;
                            arrived.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => errors.lock().unwrap().push(format!("from {source}: {e}")),
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    // Fresh TLS handshakes against the server tunnel, with the client tunnel's
    // certificate and bundle of the moment (pooled HBONE connections handshake
    // rarely).
    let handshakes = Arc::new(AtomicUsize::new(0));
    let prober = {
        let (stop, handshakes, errors) = (stop.clone(), handshakes.clone(), errors.clone());
        let config = tls::client_config(
            client.certs.subscribe(&clients[0].1).unwrap(),
            client.trust.clone(),
            vec![server_id.clone()],
            tls::provider(),
        )
        .unwrap();
        let metrics = client.tls.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let tcp = TcpStream::connect(hbone).await.unwrap();
                match tls::connect(config.clone(), hbone.ip(), tcp, DEADLINE, &metrics).await {
                    Ok(_) => drop(handshakes.fetch_add(1, Ordering::SeqCst)),
                    Err(e) => errors.lock().unwrap().push(e.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let nodes = [&client, &server];
    let serials_of = || nodes.map(|n| serials(&n.certs)).to_vec();
    // A workload certificate renewal, then the rotation's three steps.
    client.certs.fetch(&clients[0].1).await.unwrap();
    server.certs.fetch(&server_id).await.unwrap();
    renewed(&nodes, &serials_of()).await;

    roots.prepare(SECRET, TD).unwrap();
    ca.set(&roots);
    publish(&bundle, &roots, &nodes).await;
    assert_eq!(client.trust.current().roots().len(), 2);

    roots.activate(SECRET).unwrap();
    ca.set(&roots);
    let activated = serials_of();
    publish(&bundle, &roots, &nodes).await;
    // Every certificate held comes from the new root before the old one is retired.
    renewed(&nodes, &activated).await;

    roots.retire().unwrap();
    publish(&bundle, &roots, &nodes).await;
    assert_eq!(server.trust.current().roots().len(), 1);
    tokio::time::sleep(Duration::from_secs(1)).await;

    stop.store(true, Ordering::SeqCst);
    arrivals.await.unwrap();
    prober.await.unwrap();

    eprintln!(
        "held {OPEN}, arrived {}, fresh handshakes {}",
        arrived.load(Ordering::SeqCst),
        handshakes.load(Ordering::SeqCst)
    );
    for (i, tcp) in open.iter_mut().enumerate() {
        round_trip(tcp, format!("still held {i}").as_bytes()).await;
    }
    assert!(
        errors.lock().unwrap().is_empty(),
        "failures: {:?}",
        errors.lock().unwrap()
    );
    assert!(arrived.load(Ordering::SeqCst) > 0, "no connection arrived");
    assert!(handshakes.load(Ordering::SeqCst) > 0, "no handshake probed");
    for (name, node) in [("client", &client), ("server", &server)] {
        assert_eq!(
            handshake_failures(&node.tls),
            vec![],
            "{name} tunnel handshake failures"
        );
    }
    let refused = server
        .proxy
        .metrics()
        .refused_count(ztunnel::proxy::RefusedReason::Handshake);
    assert_eq!(refused, 0, "HBONE handshakes refused by the server tunnel");
    // The arrivals have closed; the client tunnel then holds exactly those left open.
    let settled = tokio::time::timeout(Duration::from_secs(10), async {
        while client.proxy.metrics().open_count() != OPEN as i64 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        settled.is_ok(),
        "{} connections open in the client tunnel, {OPEN} held",
        client.proxy.metrics().open_count()
    );
}
