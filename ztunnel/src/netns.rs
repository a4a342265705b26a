//! Sockets inside other network namespaces.
//!
//! A socket belongs, for life, to the network namespace of the thread that created it.
//! A [`Netns`] owns one thread that has entered a namespace with `setns(2)` and creates
//! sockets there on request (listeners, set-ups); the sockets are then used from any
//! thread (tokio's included). Connections, made once per proxied connection, skip that
//! thread: the calling thread enters the namespace, makes the socket and comes back
//! (two `setns` calls, no wake-up of another thread). The tunnel uses it for the listeners it opens inside each enrolled pod and
//! for the connections it makes from a pod (source = the pod's address), each carrying
//! the tunnel's socket mark so the eBPF programs never steer them back into the tunnel.
//!
//! ```no_run
//! # async fn example() -> Result<(), ztunnel::netns::Error> {
//! use ztunnel::netns::{Netns, DEFAULT_SOCKET_MARK};
//! let pod = Netns::open("/var/run/netns/pod-a")?;
//! let listener = pod.listen("10.0.0.9:15001".parse().unwrap(), DEFAULT_SOCKET_MARK)?;
//! let upstream = pod
//!     .connect(None, "10.0.0.7:8080".parse().unwrap(), DEFAULT_SOCKET_MARK)
//!     .await?;
//! # drop((listener, upstream)); Ok(()) }
//! ```

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, mpsc};

use nix::sched::{CloneFlags, setns};
use nix::{getsockopt_impl, sockopt_impl};
use socket2::{Domain, Protocol, Socket, Type};

/// The default mark (`SO_MARK`, `socketMark` in the config) on every socket the tunnel
/// opens: the eBPF programs leave sockets with the tunnel's mark alone, so its own
/// connections are never steered.
pub use ztunnel_ebpf_common::DEFAULT_SOCKET_MARK;

/// Stack of a namespace's thread: it only runs short socket set-ups, and there is one
/// per enrolled pod.
const NETNS_THREAD_STACK: usize = 256 * 1024;

/// Backlog of the listeners made by [`Netns::listen`].
const LISTEN_BACKLOG: i32 = 1024;

/// `SO_NETNS_COOKIE` (linux/socket.h): the cookie of a socket's network namespace.
const SO_NETNS_COOKIE: i32 = 71;

sockopt_impl!(
    /// The cookie of the socket's network namespace, as `bpf_get_netns_cookie` sees it.
    NetnsCookie,
    GetOnly,
    libc::SOL_SOCKET,
    SO_NETNS_COOKIE,
    u64
);

/// Errors of namespace handles and the sockets made in them; each names the namespace.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open network namespace {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot start the thread for network namespace {path}: {source}")]
    Thread { path: PathBuf, source: io::Error },
    #[error("cannot enter network namespace {path}: {source}")]
    Enter { path: PathBuf, source: nix::Error },
    #[error("the thread of network namespace {path} has stopped")]
    Stopped { path: PathBuf },
    #[error("cannot listen on {addr} in network namespace {path}: {source}")]
    Listen {
        path: PathBuf,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("cannot connect from network namespace {path}{bound} to {dst}: {source}", bound = bound_to(.bind))]
    Connect {
        path: PathBuf,
        bind: Option<SocketAddr>,
        dst: SocketAddr,
        source: io::Error,
    },
    #[error("listeners are registered with tokio: call from inside a tokio runtime")]
    NoRuntime,
    #[error("cannot read the cookie of network namespace {path}: {source}")]
    Cookie { path: PathBuf, source: io::Error },
}

/// ` (bound to ADDR)` for a connect from a chosen source address, else nothing.
fn bound_to(bind: &Option<SocketAddr>) -> String {
    bind.map(|addr| format!(" (bound to {addr})"))
        .unwrap_or_default()
}

type Job = Box<dyn FnOnce() + Send>;

/// The tunnel's own network namespace (its main thread's), where a thread that made a
/// socket in a pod's namespace returns to.
static HOME: OnceLock<File> = OnceLock::new();
const HOME_PATH: &str = "/proc/self/ns/net";

/// While it lives, the calling thread is in another network namespace; dropping it
/// (also when unwinding) returns the thread to the tunnel's own.
struct Entered;

impl Entered {
    fn enter(netns: &Netns) -> Result<Entered, Error> {
        if HOME.get().is_none() {
            let home = File::open(HOME_PATH).map_err(|source| Error::Open {
                path: HOME_PATH.into(),
                source,
            })?;
            // Another thread may have set it first: the same namespace.
            let _ = HOME.set(home);
        }
        setns(netns.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| Error::Enter {
            path: netns.path.clone(),
            source,
        })?;
        Ok(Entered)
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        let home = HOME
            .get()
            .map(|home| setns(home.as_fd(), CloneFlags::CLONE_NEWNET));
        if !matches!(home, Some(Ok(()))) {
            // A runtime thread left in a pod's namespace would make the tunnel's later
            // sockets there: stopping is the only safe answer (it cannot happen with
            // the namespace file open and the rights that entered the pod's).
            eprintln!("cannot return to the tunnel's network namespace ({home:?}): aborting");
            std::process::abort();
        }
    }
}

/// A handle on a network namespace, with a thread inside it that makes sockets there.
/// Cheap to clone; the thread ends when the last clone is dropped. While it runs, the
/// thread keeps the namespace alive (as do the sockets made in it).
#[derive(Clone, Debug)]
pub struct Netns {
    path: PathBuf,
    /// The namespace itself, opened once: a `/proc/PID/ns/net` path lives only as long
    /// as that process, the open file as long as this handle.
    file: Arc<File>,
    jobs: mpsc::Sender<Job>,
}

impl Netns {
    /// Opens the namespace at `path` (`/var/run/netns/NAME`, `/proc/PID/ns/net`) and
    /// starts its thread. Fails if the namespace cannot be entered (not root, not a
    /// network namespace).
    pub fn open(path: impl AsRef<Path>) -> Result<Netns, Error> {
        let path = path.as_ref().to_path_buf();
        let file = Arc::new(File::open(&path).map_err(|source| Error::Open {
            path: path.clone(),
            source,
        })?);
        let thread_file = file.clone();
        let (jobs, queue) = mpsc::channel::<Job>();
        let (entered_tx, entered) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name(format!("netns {}", path.display()))
            .stack_size(NETNS_THREAD_STACK)
            .spawn(move || {
                let result = setns(thread_file.as_fd(), CloneFlags::CLONE_NEWNET);
                drop(thread_file);
                let ok = result.is_ok();
                // The opener waits for this answer; if it is gone there is no one to serve.
                if entered_tx.send(result).is_err() || !ok {
                    return;
                }
                for job in queue {
                    job();
                }
            })
            .map_err(|source| Error::Thread {
                path: path.clone(),
                source,
            })?;
        match entered.recv() {
            Ok(Ok(())) => Ok(Netns { path, file, jobs }),
            Ok(Err(source)) => Err(Error::Enter { path, source }),
            Err(mpsc::RecvError) => Err(Error::Stopped { path }),
        }
    }

    /// The path this namespace was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the namespace's thread and waits for its result. It blocks the
    /// caller for as long as `f` runs: keep `f` to a few system calls (in async code,
    /// prefer [`Netns::run_async`]).
    pub fn run<T, F>(&self, f: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(Box::new(move || {
            // The caller may have given up waiting; the result is then unwanted.
            let _ = tx.send(f());
        }))?;
        rx.recv().map_err(|_| self.stopped())
    }

    /// Like [`Netns::run`], waiting without blocking the async runtime.
    pub async fn run_async<T, F>(&self, f: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(Box::new(move || {
            // The caller may have given up waiting; the result is then unwanted.
            let _ = tx.send(f());
        }))?;
        rx.await.map_err(|_| self.stopped())
    }

    /// A non-blocking TCP listener bound to `addr` inside the namespace, with socket
    /// mark `mark` (accepted sockets inherit it). IPv6 listeners are IPv6-only. The
    /// address may still be tentative (IPv6 duplicate address detection): the socket is
    /// bound with `IP_FREEBIND`.
    /// Call it from inside a tokio runtime: the listener is registered with it.
    pub fn listen(&self, addr: SocketAddr, mark: u32) -> Result<tokio::net::TcpListener, Error> {
        tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        let listen_error = |source| Error::Listen {
            path: self.path.clone(),
            addr,
            source,
        };
        let std_listener = self
            .run(move || listening_socket(addr, mark))?
            .map_err(listen_error)?;
        tokio::net::TcpListener::from_std(std_listener).map_err(listen_error)
    }

    /// A TCP connection made from inside the namespace to `dst`, with socket mark
    /// `mark`, bound first to `bind` when given (e.g. the pod's own address as source).
    pub async fn connect(
        &self,
        bind: Option<SocketAddr>,
        dst: SocketAddr,
        mark: u32,
    ) -> Result<tokio::net::TcpStream, Error> {
        let connect_error = |source| Error::Connect {
            path: self.path.clone(),
            bind,
            dst,
            source,
        };
        let socket = self.here(|| connecting_socket(bind, dst, mark))?;
        let socket = socket.map_err(connect_error)?;
        tokio::net::TcpSocket::from_std_stream(socket)
            .connect(dst)
            .await
            .map_err(connect_error)
    }

    /// The namespace's cookie: the key the eBPF programs see from
    /// `bpf_get_netns_cookie` for sockets of this namespace.
    pub fn cookie(&self) -> Result<u64, Error> {
        let cookie_error = |source| Error::Cookie {
            path: self.path.clone(),
            source,
        };
        self.run(|| -> io::Result<u64> {
            let socket = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
            Ok(nix::sys::socket::getsockopt(&socket, NetnsCookie)?)
        })?
        .map_err(cookie_error)
    }

    /// Runs `f` on the calling thread, inside the namespace: sockets `f` makes live
    /// there. `f` must not block or yield (a few system calls).
    fn here<T>(&self, f: impl FnOnce() -> T) -> Result<T, Error> {
        let entered = Entered::enter(self)?;
        let result = f();
        drop(entered);
        Ok(result)
    }

    fn submit(&self, job: Job) -> Result<(), Error> {
        self.jobs.send(job).map_err(|_| self.stopped())
    }

    fn stopped(&self) -> Error {
        Error::Stopped {
            path: self.path.clone(),
        }
    }
}

/// The namespace's file descriptor, e.g. to attach a program to the namespace.
impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

fn tcp_socket(addr: &SocketAddr, mark: u32) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(*addr),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_mark(mark)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

fn listening_socket(addr: SocketAddr, mark: u32) -> io::Result<std::net::TcpListener> {
    let socket = tcp_socket(&addr, mark)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
        socket.set_freebind_v6(true)?;
    } else {
        socket.set_freebind_v4(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

fn connecting_socket(
    bind: Option<SocketAddr>,
    dst: SocketAddr,
    mark: u32,
) -> io::Result<std::net::TcpStream> {
    let socket = tcp_socket(&dst, mark)?;
    socket.set_tcp_nodelay(true)?;
    if let Some(bind) = bind {
        // The port is chosen at connect time, per destination: without this, bind with
        // port 0 searches the whole range on every connect once many sockets sit in
        // TIME_WAIT, and the source ports run out sooner.
        if bind.port() == 0 {
            nix::sys::socket::setsockopt(
                &socket,
                nix::sys::socket::sockopt::IpBindAddressNoPort,
                &true,
            )?;
        }
        socket.bind(&bind.into())?;
    }
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use std::process::Command;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A named network namespace with loopback up, deleted on drop.
    struct TestNamespace(String);

    impl TestNamespace {
        fn new() -> TestNamespace {
            assert!(
                nix::unistd::geteuid().is_root(),
                "this test creates network namespaces and must run as root"
            );
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let name = format!(
                "zt-netns-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            );
            ip(&["netns", "add", &name]);
            let ns = TestNamespace(name);
            ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
            ns
        }

        fn path(&self) -> PathBuf {
            Path::new("/var/run/netns").join(&self.0)
        }
    }

    impl Drop for TestNamespace {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }

    fn ip(args: &[&str]) {
        let status = Command::new("ip").args(args).status().expect("run ip");
        assert!(status.success(), "ip {args:?} failed: {status}");
    }

    #[tokio::test]
    async fn sockets_live_in_the_namespace_and_carry_the_mark() {
        let ns = TestNamespace::new();
        let netns = Netns::open(ns.path()).expect("open namespace");
        let listener = netns
            .listen("127.0.0.1:0".parse().unwrap(), DEFAULT_SOCKET_MARK)
            .expect("listen");
        let addr = listener.local_addr().unwrap();

        let listener_cookie = nix::sys::socket::getsockopt(&listener, NetnsCookie).unwrap();
        assert_eq!(listener_cookie, netns.cookie().unwrap());
        let own = Socket::new(Domain::IPV4, Type::DGRAM, None).unwrap();
        assert_ne!(
            listener_cookie,
            nix::sys::socket::getsockopt(&own, NetnsCookie).unwrap(),
            "the listener must live in the other namespace"
        );

        let (mut client, accepted) = tokio::join!(
            async {
                netns
                    .connect(None, addr, DEFAULT_SOCKET_MARK)
                    .await
                    .expect("connect")
            },
            async { listener.accept().await.expect("accept").0 }
        );
        // Made on this thread, inside the namespace; the thread is back in its own.
        let client_cookie = nix::sys::socket::getsockopt(&client, NetnsCookie).unwrap();
        assert_eq!(client_cookie, listener_cookie);
        let after = Socket::new(Domain::IPV4, Type::DGRAM, None).unwrap();
        assert_eq!(
            nix::sys::socket::getsockopt(&after, NetnsCookie).unwrap(),
            nix::sys::socket::getsockopt(&own, NetnsCookie).unwrap(),
            "the connecting thread did not return to its namespace"
        );
        client.write_all(b"ping").await.unwrap();
        let mut accepted = accepted;
        let mut buf = [0u8; 4];
        accepted.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        assert_eq!(
            socket2::SockRef::from(&client).mark().unwrap(),
            DEFAULT_SOCKET_MARK
        );
        assert_eq!(
            socket2::SockRef::from(&accepted).mark().unwrap(),
            DEFAULT_SOCKET_MARK
        );
    }

    #[test]
    fn cookies_differ_between_namespaces_and_are_stable() {
        let a = TestNamespace::new();
        let b = TestNamespace::new();
        let a1 = Netns::open(a.path()).unwrap().cookie().unwrap();
        let a2 = Netns::open(a.path()).unwrap().cookie().unwrap();
        let b1 = Netns::open(b.path()).unwrap().cookie().unwrap();
        assert_eq!(a1, a2);
        assert_ne!(a1, b1);
    }

    #[test]
    fn opening_a_missing_namespace_names_it() {
        let err = Netns::open("/var/run/netns/zt-does-not-exist").unwrap_err();
        assert!(
            err.to_string().contains("/var/run/netns/zt-does-not-exist"),
            "{err}"
        );
    }
}
