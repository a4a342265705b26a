//! Load on a mesh of network namespaces, shared by `cargo xtask bench` and `cargo xtask
//! soak`: an echo server in a process of its own (so that neither end of many open
//! connections needs more descriptors than the machine allows one process), and what
//! `/proc` says about a tunnel.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::Pod;

/// The flag that makes a program that uses [`EchoProcess`] serve echo instead: call
/// [`serve_echo_if_asked`] first thing in its `main`.
const SERVE_ECHO: &str = "--serve-echo";

/// When this program was started by [`EchoProcess::start`] (`--serve-echo NETNS ADDR...`),
/// serves echo until its stdin closes and returns true.
pub fn serve_echo_if_asked() -> Result<bool> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) != Some(SERVE_ECHO) {
        return Ok(false);
    }
    let netns = args.get(2).context("--serve-echo NETNS ADDR...")?;
    let addresses = args[3..]
        .iter()
        .map(|a| a.parse().with_context(|| format!("address {a:?}")))
        .collect::<Result<Vec<SocketAddr>>>()?;
    let _echo = EchoServer::start(ztunnel::netns::Netns::open(netns)?, addresses)?;
    // Serve until the parent closes our stdin.
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    Ok(true)
}

/// Waits until a server listens on the pod's address and `port`, probing from inside
/// the pod (a pod's connection to itself is never steered).
pub fn wait_listening(pod: &Pod, port: u16) -> Result<()> {
    let netns = pod.netns()?;
    let address = SocketAddr::new(pod.ip().into(), port);
    let deadline = Instant::now() + Duration::from_secs(10);
    while netns.run(move || TcpStream::connect(address))?.is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on {address} after 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// A process's resident set in kB.
pub fn rss_kb(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid} is gone"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS for process {pid}"))
}

/// How many file descriptors a process holds open.
pub fn open_fds(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("process {pid} is gone"))?
        .count())
}

/// This program again, serving echo on every address of a pod on `port`; stopped on
/// drop.
pub struct EchoProcess(std::process::Child);

impl EchoProcess {
    pub fn start(pod: &Pod, port: u16) -> Result<EchoProcess> {
        let mut cmd = std::process::Command::new(std::env::current_exe()?);
        cmd.arg(SERVE_ECHO).arg(pod.netns_path());
        for ip in pod.ips() {
            cmd.arg(SocketAddr::new(ip, port).to_string());
        }
        let child = cmd
            .stdin(std::process::Stdio::piped())
            .spawn()
            .context("cannot start the echo server")?;
        let process = EchoProcess(child);
        wait_listening(pod, port)?;
        Ok(process)
    }
}

impl Drop for EchoProcess {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

/// An echo server, a thread per connection.
struct EchoServer {
    stop: Arc<AtomicBool>,
    addresses: Vec<SocketAddr>,
    netns: ztunnel::netns::Netns,
}

impl EchoServer {
    fn start(netns: ztunnel::netns::Netns, addresses: Vec<SocketAddr>) -> Result<EchoServer> {
        let stop = Arc::new(AtomicBool::new(false));
        for &address in &addresses {
            let listener = netns.run(move || TcpListener::bind(address))??;
            let stop = stop.clone();
            std::thread::spawn(move || {
                for tcp in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let Ok(mut tcp) = tcp else { continue };
                    let _ = tcp.set_nodelay(true);
                    std::thread::Builder::new()
                        .stack_size(64 * 1024)
                        .spawn(move || {
                            let mut buf = [0u8; 16384];
                            while let Ok(n @ 1..) = tcp.read(&mut buf) {
                                if tcp.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                        })
                        .ok();
                }
            });
        }
        Ok(EchoServer {
            stop,
            addresses,
            netns,
        })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake each accept loop so it sees the stop.
        for &address in &self.addresses {
            let _ = self.netns.run(move || TcpStream::connect(address));
        }
    }
}
