//! The steering programs in the kernel, with pods made of network namespaces (root).
//!
//! Each test builds its own cluster and pins under its own root, so they run in
//! parallel; a guard removes the pins even when a test fails.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing_subscriber::layer::SubscriberExt;
use ztunnel::netns::{DEFAULT_SOCKET_MARK, Netns};
use ztunnel::redirect::{Config, Metrics, Operation, PodListeners, PodNetwork, Redirect};
use ztunnel_ebpf_common::{
    ConnectionKey, INBOUND_PORT, MAP_LAYOUT_VERSION, OUTBOUND_PORT, SockAddr, maps,
};
use ztunnel_tests::{Cluster, Pod};

const APP_PORT: u16 = 8080;
/// How long a connection that must not get through is given.
const BLOCKED_WAIT: Duration = Duration::from_millis(1500);

/// Removes a node's pins (detaching every program) when dropped.
struct PinGuard(PathBuf);

impl Drop for PinGuard {
    fn drop(&mut self) {
        if self.0.exists()
            && let Err(err) = std::fs::remove_dir_all(&self.0)
        {
            eprintln!("cannot remove pins {}: {err}", self.0.display());
        }
        ztunnel_tests::remove_pin_root_if_empty();
    }
}

fn config(cluster: &Cluster) -> (Config, PinGuard) {
    let config = Config::for_node(cluster.node(0).name());
    let guard = PinGuard(config.pin_root.clone());
    (config, guard)
}

fn pod_network(pod: &Pod) -> PodNetwork {
    PodNetwork {
        uid: pod.name().to_string(),
        ips: pod.ips(),
        netns: pod.netns_path(),
    }
}

fn load(config: &Config) -> Redirect {
    load_counted(config, Metrics::default())
}

fn load_counted(config: &Config, metrics: Metrics) -> Redirect {
    Redirect::load(config, metrics)
        .unwrap_or_else(|err| panic!("cannot load the programs: {err:?}"))
}

fn enrol(redirect: &Redirect, pod: &Pod) -> PodListeners {
    redirect
        .enrol(&pod_network(pod))
        .unwrap_or_else(|err| panic!("cannot enrol {}: {err}", pod.name()))
}

/// An application listener inside a pod, on its address and `APP_PORT`.
fn app_listener(pod: &Pod, ip: IpAddr) -> TcpListener {
    pod.netns()
        .unwrap()
        .listen(SocketAddr::new(ip, APP_PORT), 0)
        .unwrap()
}

/// Connects from inside `pod` with socket mark `mark` (0: a plain application socket);
/// a connection that is neither made nor refused in `BLOCKED_WAIT` is `TimedOut`.
async fn try_connect(pod: &Pod, dst: SocketAddr, mark: u32) -> std::io::Result<TcpStream> {
    let netns: Netns = pod.netns().unwrap();
    match tokio::time::timeout(BLOCKED_WAIT, netns.connect(None, dst, mark)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(ztunnel::netns::Error::Connect { source, .. })) => Err(source),
        Ok(Err(other)) => panic!("not a connect error: {other}"),
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

async fn connect(pod: &Pod, dst: SocketAddr, mark: u32) -> TcpStream {
    try_connect(pod, dst, mark)
        .await
        .unwrap_or_else(|err| panic!("{} to {dst} (mark {mark:#x}): {err}", pod.name()))
}

/// Asserts a connect fails, and how.
async fn assert_connect_fails(pod: &Pod, dst: SocketAddr, mark: u32, how: std::io::ErrorKind) {
    match try_connect(pod, dst, mark).await {
        Ok(_) => panic!("{} to {dst} (mark {mark:#x}) connected", pod.name()),
        Err(err) => assert_eq!(
            err.kind(),
            how,
            "{} to {dst} (mark {mark:#x}): {err}",
            pod.name()
        ),
    }
}

/// Accepts one connection within a few seconds.
async fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    tokio::time::timeout(Duration::from_secs(5), listener.accept())
        .await
        .expect("no connection arrived")
        .expect("accept")
}

/// Asserts nothing is waiting on `listener`.
async fn assert_nothing_accepted(listener: &TcpListener, what: &str) {
    let result = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
    assert!(result.is_err(), "{what}: a connection arrived");
}

/// With both pods enrolled and the tunnel's listeners gone, nothing reaches the server's
/// application, which listens on `APP_PORT`.
async fn assert_fails_closed(client: &Pod, server: &Pod) {
    // The tunnel's listeners are closed, but a child that another test forked at that
    // instant may hold them until it execs: wait until they refuse connections.
    wait_until_closed(client, SocketAddr::new(client.ip().into(), OUTBOUND_PORT)).await;
    wait_until_closed(client, SocketAddr::new(server.ip().into(), INBOUND_PORT)).await;
    let app = app_listener(server, server.ip().into());
    let dst = SocketAddr::new(server.ip().into(), APP_PORT);
    // Outbound from the enrolled client: steered to a capture socket that is gone.
    assert_connect_fails(client, dst, 0, std::io::ErrorKind::ConnectionRefused).await;
    // Inbound to the enrolled server from a socket the tunnel does not steer (the
    // tunnel's mark): the SYN is dropped, never handed to the application; the kernel
    // answers it as for a closed port.
    let refused = std::io::ErrorKind::ConnectionRefused;
    assert_connect_fails(client, dst, DEFAULT_SOCKET_MARK, refused).await;
    assert_nothing_accepted(&app, "application with the tunnel away").await;
}

/// Waits (2 s at most) until connecting from `pod` to `addr` with the tunnel's mark is
/// refused.
async fn wait_until_closed(pod: &Pod, addr: SocketAddr) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while try_connect(pod, addr, DEFAULT_SOCKET_MARK).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{addr} still accepts in {}",
            pod.name()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Proves bytes flow both ways between two ends of one connection.
async fn assert_connected(client: &mut TcpStream, server: &mut TcpStream) {
    client.write_all(b"ping").await.unwrap();
    let mut buf = [0; 4];
    server.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    server.write_all(b"pong").await.unwrap();
    client.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
}

/// Every log event of the process, to check the programs' logs reach `tracing`.
fn captured_logs() -> Arc<Mutex<Vec<String>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<String>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let writer = {
            let logs = logs.clone();
            move || CaptureWriter(logs.clone())
        };
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_writer(writer)
                .with_ansi(false),
        );
        tracing::subscriber::set_global_default(subscriber).expect("one subscriber per process");
        logs
    })
    .clone()
}

struct CaptureWriter(Arc<Mutex<Vec<String>>>);

impl std::io::Write for CaptureWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap()
            .push(String::from_utf8_lossy(buf).into_owned());
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn programs_load_attach_and_uninstall() {
    let cluster = Cluster::builder().build().unwrap();
    let (config, _guard) = config(&cluster);
    // Maps of an older layout, as an older tunnel would have left them.
    let redirect = load(&config);
    let old_layout = config.pin_root.join("maps-v0");
    std::fs::create_dir(&old_layout).unwrap();
    drop(redirect);
    let redirect = load(&config);
    assert!(!old_layout.exists(), "maps of another layout left pinned");
    let cgroup_links: Vec<String> = std::fs::read_dir(config.pin_root.join("links/cgroup"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for program in [
        "steer_connect4-",
        "steer_connect6-",
        "restore_peer4-",
        "restore_peer6-",
        "record_established-",
        "forget_released-",
    ] {
        assert_eq!(
            cgroup_links
                .iter()
                .filter(|name| name.starts_with(program))
                .count(),
            1,
            "{program} in {cgroup_links:?}"
        );
    }
    assert!(maps_dir(&config).join(maps::ENROLLED).exists());
    redirect.uninstall().unwrap();
    assert!(!config.pin_root.exists());
}

#[tokio::test]
async fn outbound_connects_are_steered_and_the_original_destination_recorded() {
    let cluster = Cluster::builder().pods_per_node(2).build().unwrap();
    let (config, _guard) = config(&cluster);
    let metrics = Metrics::default();
    let redirect = load_counted(&config, metrics.clone());
    let (client, server) = (cluster.pod(0, 0), cluster.pod(0, 1));
    let listeners = enrol(&redirect, client);
    assert_eq!(listeners.outbound.len(), 2, "IPv4 and IPv6 capture");
    assert_eq!(metrics.enrolled(), 1);

    let v4_mapped = IpAddr::V6(server.ip().to_ipv6_mapped());
    let client_v4 = IpAddr::from(client.ip());
    let client_mapped = IpAddr::V6(client.ip().to_ipv6_mapped());
    let client_v6 = IpAddr::from(client.ipv6());
    for (destination, capture, expected, own, own_unmapped) in [
        (
            server.ip().into(),
            0,
            server.ip().into(),
            client_v4,
            client_v4,
        ),
        (
            server.ipv6().into(),
            1,
            server.ipv6().into(),
            client_v6,
            client_v6,
        ),
        // An IPv6 socket to an IPv4-mapped address is the IPv4 connect it is on the wire.
        (v4_mapped, 0, server.ip().into(), client_mapped, client_v4),
    ] {
        // Nothing listens at the destination: only steering can connect.
        let dst = SocketAddr::new(destination, APP_PORT);
        let mut connected = connect(client, dst, 0).await;
        let (mut accepted, peer) = accept(&listeners.outbound[capture]).await;
        assert_connected(&mut connected, &mut accepted).await;
        // The application sees the peer it asked for, and its own pod address as its
        // local address (as the capture listener sees it), not loopback.
        assert_eq!(connected.peer_addr().unwrap(), dst);
        let local = connected.local_addr().unwrap();
        assert_eq!(local.ip(), own, "{dst}: the application's local address");
        assert_eq!(peer, SocketAddr::new(own_unmapped, local.port()), "{dst}");
        let original = redirect
            .original_destination(listeners.netns_cookie, peer.port())
            .unwrap();
        assert_eq!(original, Some(SocketAddr::new(expected, APP_PORT)), "{dst}");
        // Consumed by the look-up.
        assert_eq!(
            redirect
                .original_destination(listeners.netns_cookie, peer.port())
                .unwrap(),
            None
        );
    }
    assert_eq!(metrics.missing_destinations(), 3);
    assert_eq!(metrics.failures(Operation::original_destination), 0);
    redirect.uninstall().unwrap();
}

fn maps_dir(config: &Config) -> PathBuf {
    config.pin_root.join(format!("maps-v{MAP_LAYOUT_VERSION}"))
}

/// Entries in a pinned map of the node.
fn pinned_entries<K: aya::Pod>(config: &Config, map: &str) -> usize {
    let path = maps_dir(config).join(map);
    let data = aya::maps::MapData::from_pin(&path)
        .unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    let map = aya::maps::Map::LruHashMap(data);
    let map: aya::maps::HashMap<_, K, SockAddr> = map.try_into().unwrap();
    map.keys().count()
}

#[tokio::test]
async fn what_is_kept_per_connection_goes_with_it() {
    let cluster = Cluster::builder().pods_per_node(2).build().unwrap();
    let (config, _guard) = config(&cluster);
    let redirect = load(&config);
    let (client, server) = (cluster.pod(0, 0), cluster.pod(0, 1));
    let listeners = enrol(&redirect, client);
    let dst = SocketAddr::new(server.ip().into(), APP_PORT);
    let mut connections = Vec::new();
    for _ in 0..20 {
        let connected = connect(client, dst, 0).await;
        let (accepted, peer) = accept(&listeners.outbound[0]).await;
        connections.push((connected, accepted, peer.port()));
    }
    assert_eq!(
        pinned_entries::<u64>(&config, maps::DESTINATION_BY_SOCKET),
        20
    );
    assert_eq!(
        pinned_entries::<ConnectionKey>(&config, maps::DESTINATION_BY_PORT),
        20
    );
    for (_, _, port) in &connections {
        let original = redirect
            .original_destination(listeners.netns_cookie, *port)
            .unwrap();
        assert_eq!(original, Some(dst));
    }
    assert_eq!(
        pinned_entries::<ConnectionKey>(&config, maps::DESTINATION_BY_PORT),
        0
    );
    drop(connections);
    // The kernel releases a closed socket once the last reference to it goes: a child
    // that another test forks at that instant holds one until it execs.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let left = pinned_entries::<u64>(&config, maps::DESTINATION_BY_SOCKET);
        if left == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{left} sockets still kept after close"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    redirect.uninstall().unwrap();
}

#[tokio::test]
async fn excluded_ports_and_peers_are_not_steered() {
    let cluster = Cluster::builder().pods_per_node(2).build().unwrap();
    let (mut config, _guard) = config(&cluster);
    let (client, server) = (cluster.pod(0, 0), cluster.pod(0, 1));
    const OTHER_PORT: u16 = 9090;
    config.excluded_ports = vec![APP_PORT];
    config.excluded_peers = vec![
        format!("{}/128", server.ipv6()).parse().unwrap(),
        format!("{}/32", client.ip()).parse().unwrap(),
    ];
    let redirect = load(&config);
    let client_listeners = enrol(&redirect, client);
    let server_listeners = enrol(&redirect, server);

    // Excluded port out of the client, excluded peer (the client) into the server.
    let app = app_listener(server, server.ip().into());
    let mut connected = connect(client, SocketAddr::new(server.ip().into(), APP_PORT), 0).await;
    let (mut accepted, _) = accept(&app).await;
    assert_connected(&mut connected, &mut accepted).await;

    // Excluded peer out of the client; into the server from a peer that is not
    // excluded (the client's IPv6 address): the server's tunnel listener takes it.
    let dst = SocketAddr::new(server.ipv6().into(), OTHER_PORT);
    connect(client, dst, 0).await;
    let (accepted, _) = accept(&server_listeners.inbound[1]).await;
    assert_eq!(accepted.local_addr().unwrap(), dst);

    // Neither port nor peer excluded: steered out of the client.
    let dst = SocketAddr::new(server.ip().into(), OTHER_PORT);
    connect(client, dst, 0).await;
    let (_, peer) = accept(&client_listeners.outbound[0]).await;
    let original = redirect
        .original_destination(client_listeners.netns_cookie, peer.port())
        .unwrap();
    assert_eq!(original, Some(dst));
    for capture in &client_listeners.outbound {
        assert_nothing_accepted(capture, "outbound capture").await;
    }
    redirect.uninstall().unwrap();
}

#[tokio::test]
async fn the_capture_listener_on_the_pod_address_serves_the_pod_alone() {
    let cluster = Cluster::builder().pods_per_node(2).build().unwrap();
    let (mut config, _guard) = config(&cluster);
    let (client, server) = (cluster.pod(0, 0), cluster.pod(0, 1));
    // From an excluded peer (IPv4) and from one that is not (IPv6).
    config.excluded_peers = vec![format!("{}/32", client.ip()).parse().unwrap()];
    let redirect = load(&config);
    let listeners = enrol(&redirect, server);
    for ip in [IpAddr::from(server.ip()), server.ipv6().into()] {
        let capture = SocketAddr::new(ip, OUTBOUND_PORT);
        let refused = std::io::ErrorKind::ConnectionRefused;
        assert_connect_fails(client, capture, 0, refused).await;
    }
    for listener in listeners.outbound.iter().chain(&listeners.inbound) {
        assert_nothing_accepted(listener, "tunnel listener").await;
    }
    redirect.uninstall().unwrap();
}

#[tokio::test]
async fn inbound_syns_land_on_the_tunnel_with_the_original_local_address() {
    let cluster = Cluster::builder()
        .nodes(2)
        .pods_per_node(1)
        .build()
        .unwrap();
    let (config, _guard) = config(&cluster);
    let redirect = load(&config);
    let (client, server) = (cluster.pod(1, 0), cluster.pod(0, 0));
    let listeners = enrol(&redirect, server);
    for (index, (server_ip, client_ip)) in [
        (IpAddr::from(server.ip()), IpAddr::from(client.ip())),
        (server.ipv6().into(), client.ipv6().into()),
    ]
    .into_iter()
    .enumerate()
    {
        let app = app_listener(server, server_ip);
        let mut connected = connect(client, SocketAddr::new(server_ip, APP_PORT), 0).await;
        let (mut accepted, peer) = accept(&listeners.inbound[index]).await;
        assert_eq!(
            accepted.local_addr().unwrap(),
            SocketAddr::new(server_ip, APP_PORT)
        );
        assert_eq!(peer.ip(), client_ip);
        assert_connected(&mut connected, &mut accepted).await;
        assert_nothing_accepted(&app, "application behind the tunnel").await;
    }
    // HBONE is left to the regular lookup: it reaches the tunnel's 15008 listener.
    connect(client, SocketAddr::new(server.ip().into(), 15008), 0).await;
    accept(&listeners.hbone[0]).await;
    redirect.uninstall().unwrap();
}

#[tokio::test]
async fn without_the_tunnel_listeners_connections_fail_closed() {
    let logs = captured_logs();
    let cluster = Cluster::builder().pods_per_node(2).build().unwrap();
    let (config, _guard) = config(&cluster);
    let redirect = load(&config);
    let (client, server) = (cluster.pod(0, 0), cluster.pod(0, 1));
    drop(enrol(&redirect, client));
    drop(enrol(&redirect, server));
    assert_fails_closed(client, server).await;

    // The program said why, through aya-log into tracing.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let wanted = format!("no tunnel listener for inbound port {APP_PORT}");
    while !logs
        .lock()
        .unwrap()
        .iter()
        .any(|line| line.contains(&wanted))
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no eBPF log {wanted:?} in {:?}",
            logs.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    redirect.uninstall().unwrap();
}

#[tokio::test]
async fn tunnel_marked_sockets_are_not_steered() {
    let cluster = Cluster::builder().pods_per_node(2).build().unwrap();
    let (config, _guard) = config(&cluster);
    let redirect = load(&config);
    let (client, server) = (cluster.pod(0, 0), cluster.pod(0, 1));
    let listeners = enrol(&redirect, client);
    for ip in [IpAddr::from(server.ip()), server.ipv6().into()] {
        let app = app_listener(server, ip);
        let mut connected =
            connect(client, SocketAddr::new(ip, APP_PORT), DEFAULT_SOCKET_MARK).await;
        let (mut accepted, _) = accept(&app).await;
        assert_connected(&mut connected, &mut accepted).await;
    }
    for capture in &listeners.outbound {
        assert_nothing_accepted(capture, "outbound capture").await;
    }
    redirect.uninstall().unwrap();
}

#[tokio::test]
async fn the_socket_mark_is_the_one_the_programs_were_loaded_with() {
    let cluster = Cluster::builder().pods_per_node(2).build().unwrap();
    let (mut config, _guard) = config(&cluster);
    const MARK: u32 = 0x2a;
    config.socket_mark = MARK;
    let redirect = load(&config);
    let (client, server) = (cluster.pod(0, 0), cluster.pod(0, 1));
    let listeners = enrol(&redirect, client);
    for listener in listeners.outbound.iter().chain(&listeners.inbound) {
        let mark = nix::sys::socket::getsockopt(listener, nix::sys::socket::sockopt::Mark);
        assert_eq!(mark.unwrap(), MARK);
    }
    // The configured mark goes direct.
    let app = app_listener(server, server.ip().into());
    let dst = SocketAddr::new(server.ip().into(), APP_PORT);
    let mut connected = connect(client, dst, MARK).await;
    let (mut accepted, _) = accept(&app).await;
    assert_connected(&mut connected, &mut accepted).await;
    assert_nothing_accepted(&listeners.outbound[0], "outbound capture").await;
    // The default mark is an application's like any other: steered.
    connect(client, dst, DEFAULT_SOCKET_MARK).await;
    let (_, peer) = accept(&listeners.outbound[0]).await;
    let original = redirect
        .original_destination(listeners.netns_cookie, peer.port())
        .unwrap();
    assert_eq!(original, Some(dst));
    assert_nothing_accepted(&app, "application").await;
    redirect.uninstall().unwrap();
}

#[tokio::test]
async fn a_pods_connections_to_itself_are_not_steered() {
    let cluster = Cluster::builder().build().unwrap();
    let (config, _guard) = config(&cluster);
    let redirect = load(&config);
    let pod = cluster.pod(0, 0);
    let listeners = enrol(&redirect, pod);
    for (listen, dst) in [
        (IpAddr::from(pod.ip()), IpAddr::from(pod.ip())),
        (pod.ipv6().into(), pod.ipv6().into()),
        (Ipv4Addr::LOCALHOST.into(), Ipv4Addr::LOCALHOST.into()),
        (Ipv6Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()),
        // The unspecified address connects to the host itself.
        (Ipv4Addr::LOCALHOST.into(), Ipv4Addr::UNSPECIFIED.into()),
        (Ipv6Addr::LOCALHOST.into(), Ipv6Addr::UNSPECIFIED.into()),
    ] {
        let app = app_listener(pod, listen);
        let mut connected = connect(pod, SocketAddr::new(dst, APP_PORT), 0).await;
        let (mut accepted, _) = accept(&app).await;
        assert_connected(&mut connected, &mut accepted).await;
    }
    for capture in listeners.outbound.iter().chain(&listeners.inbound) {
        assert_nothing_accepted(capture, "tunnel listener").await;
    }
    redirect.uninstall().unwrap();
}

#[tokio::test]
async fn enrolling_leaves_established_connections_alone() {
    let cluster = Cluster::builder().pods_per_node(2).build().unwrap();
    let (config, _guard) = config(&cluster);
    let redirect = load(&config);
    let (client, server) = (cluster.pod(0, 0), cluster.pod(0, 1));
    let mut established = Vec::new();
    for ip in [IpAddr::from(server.ip()), server.ipv6().into()] {
        let app = app_listener(server, ip);
        let connected = connect(client, SocketAddr::new(ip, APP_PORT), 0).await;
        let (accepted, _) = accept(&app).await;
        established.push((connected, accepted));
    }
    let listeners = [enrol(&redirect, client), enrol(&redirect, server)];
    for (connected, accepted) in &mut established {
        assert_connected(connected, accepted).await;
    }
    for listener in listeners
        .iter()
        .flat_map(|l| l.outbound.iter().chain(&l.inbound))
    {
        assert_nothing_accepted(listener, "tunnel listener").await;
    }
    redirect.uninstall().unwrap();
}

#[tokio::test]
async fn release_restores_direct_traffic() {
    let cluster = Cluster::builder().pods_per_node(2).build().unwrap();
    let (config, _guard) = config(&cluster);
    let metrics = Metrics::default();
    let redirect = load_counted(&config, metrics.clone());
    let (client, server) = (cluster.pod(0, 0), cluster.pod(0, 1));
    let client_listeners = enrol(&redirect, client);
    let server_listeners = enrol(&redirect, server);
    let err = redirect.enrol(&pod_network(client)).unwrap_err();
    assert!(err.to_string().contains("already enrolled"), "{err}");
    assert_eq!(metrics.failures(Operation::enrol), 1);
    assert_eq!(metrics.enrolled(), 2);
    redirect.release(client.name()).unwrap();
    redirect.release(server.name()).unwrap();
    drop((client_listeners, server_listeners));
    assert!(
        !config
            .pin_root
            .join("links/netns")
            .read_dir()
            .unwrap()
            .any(|_| true),
        "sk_lookup links left pinned"
    );

    let app = app_listener(server, server.ip().into());
    let mut connected = connect(client, SocketAddr::new(server.ip().into(), APP_PORT), 0).await;
    let (mut accepted, _) = accept(&app).await;
    assert_connected(&mut connected, &mut accepted).await;

    assert_eq!(metrics.enrolled(), 0);
    let err = redirect.release(client.name()).unwrap_err();
    assert!(err.to_string().contains(client.name()), "{err}");
    assert_eq!(metrics.failures(Operation::release), 1);
    redirect.uninstall().unwrap();
}

#[tokio::test]
async fn pinned_steering_outlives_the_tunnel_and_is_renewed_or_reconciled() {
    let cluster = Cluster::builder().pods_per_node(2).build().unwrap();
    let (config, _guard) = config(&cluster);
    let (client, server) = (cluster.pod(0, 0), cluster.pod(0, 1));
    let redirect = load(&config);
    drop(enrol(&redirect, client));
    drop(enrol(&redirect, server));
    // The tunnel goes away: its process state and sockets are gone, the pins stay.
    drop(redirect);
    assert_fails_closed(client, server).await;
    let dst = SocketAddr::new(server.ip().into(), APP_PORT);

    // A new tunnel renews the server's steering with its own programs and sockets.
    let redirect = load(&config);
    let listeners = enrol(&redirect, server);
    let mut connected = connect(client, dst, DEFAULT_SOCKET_MARK).await;
    let (mut accepted, _) = accept(&listeners.inbound[0]).await;
    assert_connected(&mut connected, &mut accepted).await;
    let netns_links = config
        .pin_root
        .join("links/netns")
        .join(listeners.netns_cookie.to_string());
    assert_eq!(
        netns_links.read_dir().unwrap().count(),
        1,
        "old link replaced"
    );

    // The client is not live any more: reconciling drops its pinned registration.
    let client_cookie = client.netns().unwrap().cookie().unwrap();
    let released = redirect.reconcile(&[pod_network(server)]).unwrap();
    assert_eq!(released, vec![client_cookie]);
    let mut connected = connect(client, dst, 0).await;
    let (mut accepted, _) = accept(&listeners.inbound[0]).await;
    assert_connected(&mut connected, &mut accepted).await;
    redirect.uninstall().unwrap();
}
