//! Two tunnels in one process on loopback, with real mTLS from an in-process CA: a
//! client tunnel (SOCKS5 capture for workload `client` at 127.0.N.2) and a server tunnel
//! (HBONE listener for workload `server` at 127.0.N.3, in front of an echo application).
//! Shared by the integration tests and the benchmarks; each user calls a subset.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::socket::sockopt::IpBindAddressNoPort;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use ztunnel::hbone::{Mtls, PoolKey};
use ztunnel::identity::{
    self, CaFiles, CertManager, Identity, InProcessCa, TrustBundle, TrustStore,
};
use ztunnel::proxy::{Config, KnownWorkload, LocalWorkload, Mesh, Proxy, Route, Verdict};
use ztunnel::tls;

pub const TD: &str = "cluster.local";
/// TLS handshake deadline of the tunnels of a `Pair`.
pub const TLS_DEADLINE: Duration = Duration::from_secs(1);

pub fn id(namespace: &str, sa: &str) -> Identity {
    Identity::new(TD, namespace, sa).expect("valid identity")
}

/// Workloads, routes and policies, set by the test.
pub struct TestMesh {
    workloads: Mutex<HashMap<IpAddr, LocalWorkload>>,
    routes: Mutex<HashMap<SocketAddr, Route>>,
    strict: AtomicBool,
    denied: Mutex<HashSet<SocketAddr>>,
    /// Per destination: request paths starting with one of these are denied.
    denied_paths: Mutex<HashMap<SocketAddr, Vec<String>>>,
    updates: watch::Sender<u64>,
}

impl TestMesh {
    pub fn new() -> Arc<Self> {
        Arc::new(TestMesh {
            workloads: Mutex::default(),
            routes: Mutex::default(),
            strict: AtomicBool::new(false),
            denied: Mutex::default(),
            denied_paths: Mutex::default(),
            updates: watch::Sender::new(0),
        })
    }

    pub fn add_workload(&self, name: &str, identity: Identity, ip: IpAddr) {
        let workload = LocalWorkload {
            name: name.to_owned(),
            namespace: identity.namespace().to_owned(),
            identity,
            ip,
            netns: None,
        };
        self.workloads.lock().unwrap().insert(ip, workload);
    }

    /// The workload at `ip` leaves the state.
    pub fn remove_workload(&self, ip: IpAddr) {
        self.workloads.lock().unwrap().remove(&ip);
        self.updates.send_modify(|v| *v += 1);
    }

    pub fn add_route(&self, destination: SocketAddr, route: Route) {
        self.routes.lock().unwrap().insert(destination, route);
    }

    pub fn set_strict(&self, strict: bool) {
        self.strict.store(strict, Ordering::SeqCst);
    }

    /// Denies every connection to `destination` (policy `deny-test`) and tells the
    /// proxy policies changed.
    pub fn deny(&self, destination: SocketAddr) {
        self.denied.lock().unwrap().insert(destination);
        self.updates.send_modify(|v| *v += 1);
    }

    /// Decides requests to `destination` one by one from now on, denying those whose
    /// path starts with `prefix` (policy `deny-path-test`); tells the proxy policies
    /// changed.
    pub fn deny_path(&self, destination: SocketAddr, prefix: &str) {
        self.denied_paths
            .lock()
            .unwrap()
            .entry(destination)
            .or_default()
            .push(prefix.to_owned());
        self.updates.send_modify(|v| *v += 1);
    }
}

impl Mesh for TestMesh {
    fn local_workload(&self, ip: IpAddr) -> Option<LocalWorkload> {
        self.workloads.lock().unwrap().get(&ip).cloned()
    }

    fn workload_at(&self, ip: IpAddr) -> Option<KnownWorkload> {
        let workloads = self.workloads.lock().unwrap();
        let w = workloads.get(&ip)?;
        Some(KnownWorkload {
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            identity: w.identity.clone(),
        })
    }

    fn route(&self, _source: &LocalWorkload, destination: SocketAddr) -> Route {
        self.routes
            .lock()
            .unwrap()
            .get(&destination)
            .cloned()
            .unwrap_or(Route::Passthrough(destination))
    }

    fn accepts_plaintext(&self, _destination: SocketAddr) -> bool {
        !self.strict.load(Ordering::SeqCst)
    }

    fn authorize(&self, _ip: IpAddr, _source: Option<&Identity>, dst: SocketAddr) -> Verdict {
        if self.denied.lock().unwrap().contains(&dst) {
            Verdict::Deny {
                policy: Some("default/deny-test".to_owned()),
                reason: format!("{dst} is denied"),
            }
        } else {
            Verdict::Allow { policy: None }
        }
    }

    fn http_enforced(&self, destination: SocketAddr) -> bool {
        self.denied_paths.lock().unwrap().contains_key(&destination)
    }

    fn authorize_request(
        &self,
        ip: IpAddr,
        source: Option<&Identity>,
        dst: SocketAddr,
        request: &http::request::Parts,
    ) -> Verdict {
        let path = request.uri.path();
        let denied = self
            .denied_paths
            .lock()
            .unwrap()
            .get(&dst)
            .and_then(|prefixes| {
                prefixes
                    .iter()
                    .find(|p| path.starts_with(p.as_str()))
                    .cloned()
            });
        match denied {
            Some(prefix) => Verdict::Deny {
                policy: Some("default/deny-path-test".to_owned()),
                reason: format!("rule 0 of default/deny-path-test: path {path} matches {prefix}*"),
            },
            None => self.authorize(ip, source, dst),
        }
    }

    fn updates(&self) -> watch::Receiver<u64> {
        self.updates.subscribe()
    }
}

/// A CA on disk and a trust store holding its root.
pub struct Pki {
    _dir: tempfile::TempDir,
    files: CaFiles,
    pub trust: Arc<TrustStore>,
}

impl Pki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let files = identity::init_ca(dir.path(), TD).expect("CA written");
        let ca = InProcessCa::load(&files, Duration::from_secs(3600)).expect("CA loads");
        let trust = TrustStore::fixed(TrustBundle::new(vec![ca.root().clone()]).expect("bundle"));
        Pki {
            _dir: dir,
            files,
            trust,
        }
    }

    /// A certificate manager of one node, holding `identities`.
    pub fn node_certificates(&self, identities: &[&Identity]) -> CertManager {
        let ca = InProcessCa::load(&self.files, Duration::from_secs(3600)).expect("CA loads");
        let certs = CertManager::new(Arc::new(ca), tls::provider(), identity::Metrics::default());
        for identity in identities {
            certs.hold(identity);
        }
        certs
    }
}

/// One tunnel.
pub struct Node {
    pub proxy: Proxy,
    pub registry: Registry,
    pub tls_metrics: tls::Metrics,
}

impl Node {
    /// A tunnel holding certificates for `identities`; `tls_deadline` bounds each
    /// TLS handshake.
    pub fn new(
        pki: &Pki,
        mesh: Arc<TestMesh>,
        config: Config,
        identities: &[&Identity],
        tls_deadline: Duration,
    ) -> Node {
        let certs = pki.node_certificates(identities);
        let tls_metrics = tls::Metrics::default();
        let mtls = Mtls::new(
            certs,
            pki.trust.clone(),
            TD,
            tls_deadline,
            tls_metrics.clone(),
        );
        let mut registry = Registry::default();
        let proxy = Proxy::new(config, mesh, Arc::new(mtls), &mut registry);
        Node {
            proxy,
            registry,
            tls_metrics,
        }
    }

    /// The metrics in Prometheus text format.
    pub fn metrics_text(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("encodes");
        text
    }

    /// Asserts the metrics hold `line` exactly (series and value).
    pub fn assert_metric(&self, line: &str) {
        let text = self.metrics_text();
        assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
    }

    /// Serves HBONE on `addr`; returns the bound address.
    pub fn serve_inbound(&self, addr: SocketAddr) -> SocketAddr {
        let listener = self.proxy.sockets().listen(addr).expect("HBONE listener");
        let bound = listener.local_addr().expect("bound");
        let proxy = self.proxy.clone();
        tokio::spawn(async move { proxy.serve_inbound(listener).await });
        bound
    }

    /// Serves inbound plaintext on `addr`, delivering every connection to `destination`
    /// (what `sk_lookup` steering gives as the local address).
    pub fn serve_plaintext(&self, addr: SocketAddr, destination: SocketAddr) -> SocketAddr {
        let listener = self
            .proxy
            .sockets()
            .listen(addr)
            .expect("plaintext listener");
        let bound = listener.local_addr().expect("bound");
        let proxy = self.proxy.clone();
        tokio::spawn(async move {
            proxy
                .serve_inbound_plaintext(listener, move |_| Ok(destination))
                .await
        });
        bound
    }

    pub fn serve_socks5(&self, addr: SocketAddr) -> SocketAddr {
        let listener = self.proxy.sockets().listen(addr).expect("SOCKS5 listener");
        let bound = listener.local_addr().expect("bound");
        let proxy = self.proxy.clone();
        tokio::spawn(async move { proxy.serve_socks5(listener).await.expect("loopback") });
        bound
    }
}

/// Two tunnels and an echo application behind the server tunnel.
pub struct Pair {
    pub pki: Pki,
    pub mesh: Arc<TestMesh>,
    pub client: Node,
    pub server: Node,
    pub client_ip: IpAddr,
    pub server_ip: IpAddr,
    pub client_identity: Identity,
    pub server_identity: Identity,
    pub socks: SocketAddr,
    pub hbone: SocketAddr,
    /// The echo application (reached through the tunnels).
    pub echo: SocketAddr,
}

impl Pair {
    /// Tunnels on 127.0.`net`.x; `config` for both.
    pub async fn new(net: u8, config: Config) -> Pair {
        let client_ip = IpAddr::V4(Ipv4Addr::new(127, 0, net, 2));
        let server_ip = IpAddr::V4(Ipv4Addr::new(127, 0, net, 3));
        let socks_ip = IpAddr::V4(Ipv4Addr::new(127, 0, net, 1));
        let client_identity = id("front", "client");
        let server_identity = id("back", "server");
        let pki = Pki::new();
        let mesh = TestMesh::new();
        mesh.add_workload("client", client_identity.clone(), client_ip);
        mesh.add_workload("server", server_identity.clone(), server_ip);
        let client = Node::new(
            &pki,
            mesh.clone(),
            config.clone(),
            &[&client_identity],
            TLS_DEADLINE,
        );
        let server = Node::new(
            &pki,
            mesh.clone(),
            config,
            &[&server_identity],
            TLS_DEADLINE,
        );
        let hbone = server.serve_inbound(SocketAddr::new(server_ip, 0));
        let socks = client.serve_socks5(SocketAddr::new(socks_ip, 0));
        let pair = Pair {
            pki,
            mesh,
            client,
            server,
            client_ip,
            server_ip,
            client_identity,
            server_identity,
            socks,
            hbone,
            echo: SocketAddr::new(server_ip, 0),
        };
        let echo = pair.app(echo).await;
        Pair { echo, ..pair }
    }

    /// Starts an application on the server workload's address, reachable through the
    /// tunnels; `serve` runs for each accepted connection.
    pub async fn app<F, Fut>(&self, serve: F) -> SocketAddr
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind(SocketAddr::new(self.server_ip, 0))
            .await
            .expect("app listener");
        let addr = listener.local_addr().expect("bound");
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(serve(tcp));
            }
        });
        self.route(addr);
        addr
    }

    /// Routes `target` (on the server workload) over HBONE.
    pub fn route(&self, target: SocketAddr) {
        self.mesh.add_route(
            target,
            Route::Hbone {
                endpoint: self.hbone,
                target,
                identities: vec![self.server_identity.clone()],
                workload: Some(("server".to_owned(), "back".to_owned())),
            },
        );
    }

    /// The pool key of the client tunnel's connections to the server tunnel.
    pub fn key(&self) -> PoolKey {
        PoolKey {
            source_identity: self.client_identity.clone(),
            destination_identities: vec![self.server_identity.clone()],
            destination: self.hbone,
            source_ip: self.client_ip,
        }
    }

    /// An application connection of the client workload to `destination`, captured by
    /// the client tunnel through SOCKS5.
    pub async fn connect(&self, destination: SocketAddr) -> std::io::Result<TcpStream> {
        socks5_connect(self.socks, self.client_ip, destination).await
    }
}

/// Writes `message` and expects it back.
pub async fn round_trip(tcp: &mut TcpStream, message: &[u8]) {
    tcp.write_all(message).await.expect("write");
    let mut back = vec![0u8; message.len()];
    tcp.read_exact(&mut back).await.expect("read");
    assert_eq!(back, message);
}

/// Echoes until EOF, then closes its side.
pub async fn echo(mut tcp: TcpStream) {
    let (mut r, mut w) = tcp.split();
    if tokio::io::copy(&mut r, &mut w).await.is_ok() {
        let _ = w.shutdown().await;
    }
}

/// Connects from `source` to the SOCKS5 listener at `socks` and asks for `destination`.
pub async fn socks5_connect(
    socks: SocketAddr,
    source: IpAddr,
    destination: SocketAddr,
) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    // Port chosen at connect time: cheap even with many sockets in TIME_WAIT.
    nix::sys::socket::setsockopt(&socket, IpBindAddressNoPort, &true)?;
    socket.bind(SocketAddr::new(source, 0))?;
    let mut tcp = socket.connect(socks).await?;
    tcp.set_nodelay(true)?;
    tcp.write_all(&[5, 1, 0]).await?;
    let mut method = [0u8; 2];
    tcp.read_exact(&mut method).await?;
    assert_eq!(method, [5, 0], "SOCKS5 server chose no-auth");
    let mut request = vec![5, 1, 0];
    match destination {
        SocketAddr::V4(v4) => {
            request.push(1);
            request.extend_from_slice(&v4.ip().octets());
        }
        SocketAddr::V6(v6) => {
            request.push(4);
            request.extend_from_slice(&v6.ip().octets());
        }
    }
    request.extend_from_slice(&destination.port().to_be_bytes());
    tcp.write_all(&request).await?;
    let mut reply = [0u8; 10];
    tcp.read_exact(&mut reply).await?;
    if reply[1] != 0 {
        return Err(std::io::Error::other(format!(
            "SOCKS5 reply {} to CONNECT {destination}",
            reply[1]
        )));
    }
    Ok(tcp)
}
