//! A real Kubernetes API server for the tests that need one: etcd and the
//! `kube-apiserver` that `cargo xtask setup` builds (Kubernetes 1.20.2 from Debian's
//! source), with service-account signing keys, RBAC on, and a static admin token. No
//! kubelet, no controllers: the tests create every object themselves. It listens on
//! loopback, or on an address inside a network namespace the test made (so tunnels in
//! node namespaces reach it); `kubectl` runs in that namespace too. Both processes are
//! stopped when the [`ApiServer`] is dropped, also when a test fails, and are killed
//! with the test process (`setpriv --pdeathsig`).
//!
//! [`PodSandbox`] stands in for a pod's sandbox as kubelet makes it: a process in the
//! pod's network namespace, in a cgroup whose path carries the pod UID
//! (`.../kubepods/pod<uid>`), so the tunnel finds it through /proc as on a node.

use std::fs::File;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Where `cargo xtask setup` keeps the binary (`ZTUNNEL_KUBE_APISERVER` overrides it).
pub const DEFAULT_KUBE_APISERVER: &str = "/var/cache/ztunnel/kube-apiserver-1.20.2/kube-apiserver";
/// The issuer and default audience of the service-account tokens the API server signs.
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// How long etcd and the API server may take to answer after they start (a loaded
/// 2-core machine is slow).
const START_DEADLINE: Duration = Duration::from_secs(120);
/// Every `kubectl` call's bound.
const KUBECTL_TIMEOUT: &str = "--request-timeout=30s";

/// The `kube-apiserver` binary; an error that says how to build it when it is missing.
pub fn kube_apiserver_binary() -> Result<PathBuf> {
    let path = std::env::var_os("ZTUNNEL_KUBE_APISERVER")
        .map_or_else(|| PathBuf::from(DEFAULT_KUBE_APISERVER), PathBuf::from);
    if !path.is_file() {
        bail!(
            "no kube-apiserver at {}: `cargo xtask setup` builds it (once, from Debian's \
             kubernetes source package)",
            path.display()
        );
    }
    Ok(path)
}

/// etcd and kube-apiserver, running.
pub struct ApiServer {
    etcd: Child,
    apiserver: Option<Child>,
    netns: Option<PathBuf>,
    address: IpAddr,
    port: u16,
    args: Vec<String>,
    binary: PathBuf,
    kubeconfig: PathBuf,
    dir: tempfile::TempDir,
}

/// A free TCP port (on the host's loopback; the namespaces the tests make have none in
/// use, so it is free there too).
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind a loopback port")?;
    Ok(listener.local_addr()?.port())
}

fn log_file(dir: &Path, name: &str) -> Result<File> {
    let path = dir.join(name);
    File::options()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))
}

/// The last lines of a log file.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn run(cmd: &mut Command) -> Result<Output> {
    let line = format!("{cmd:?}");
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {line}"))?;
    if !out.status.success() {
        bail!(
            "{line} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// `program`, killed when this thread ends, in `netns` when given.
pub fn command_in(netns: Option<&Path>, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--pdeathsig", "KILL"]);
    if let Some(netns) = netns {
        cmd.arg("nsenter").arg(format!("--net={}", netns.display()));
    }
    cmd.arg(program);
    cmd
}

impl ApiServer {
    /// Starts etcd and the API server on free loopback ports and waits until the API
    /// server is ready.
    pub fn start() -> Result<ApiServer> {
        ApiServer::start_at(None, IpAddr::V4(Ipv4Addr::LOCALHOST))
    }

    /// Starts both inside the network namespace `netns`, listening on `address` (which
    /// must be assigned there), and waits until the API server is ready.
    pub fn start_in(netns: &Path, address: IpAddr) -> Result<ApiServer> {
        ApiServer::start_at(Some(netns.to_path_buf()), address)
    }

    fn start_at(netns: Option<PathBuf>, address: IpAddr) -> Result<ApiServer> {
        let binary = kube_apiserver_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("ztunnel-apiserver-")
            .tempdir()
            .context("cannot make a directory for etcd and the API server")?;
        let path = dir.path();
        let (client_port, peer_port, port) = (free_port()?, free_port()?, free_port()?);
        let client = format!("http://{address}:{client_port}");
        let peer = format!("http://{address}:{peer_port}");
        let etcd = command_in(netns.as_deref(), "etcd")
            .args(["--name", "default", "--data-dir"])
            .arg(path.join("etcd"))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=default={peer}"))
            .stdout(Stdio::null())
            .stderr(log_file(path, "etcd.log")?)
            .spawn()
            .context("cannot start etcd (cargo xtask setup installs etcd-server)")?;

        let key = path.join("sa.key");
        run(Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&key)
            .arg("2048")
            .stderr(Stdio::null()))?;
        let token = format!("admin-{:016x}", rand_u64());
        std::fs::write(
            path.join("tokens.csv"),
            format!("{token},admin,admin-uid,system:masters\n"),
        )?;
        let args = vec![
            format!("--etcd-servers={client}"),
            format!("--bind-address={address}"),
            format!("--advertise-address={address}"),
            format!("--secure-port={port}"),
            "--insecure-port=0".into(),
            format!("--cert-dir={}", path.join("certs").display()),
            format!("--token-auth-file={}", path.join("tokens.csv").display()),
            "--authorization-mode=Node,RBAC".into(),
            format!("--service-account-key-file={}", key.display()),
            format!("--service-account-signing-key-file={}", key.display()),
            format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"),
            format!("--api-audiences={SERVICE_ACCOUNT_ISSUER}"),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            // No controller manager makes ServiceAccount token Secrets, which this
            // admission plugin would wait for; pods name their ServiceAccount anyway.
            "--disable-admission-plugins=ServiceAccount".into(),
            // The DaemonSet is privileged, as kubeadm and kind clusters allow.
            "--allow-privileged=true".into(),
            "--profiling=false".into(),
        ];
        let kubeconfig = path.join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_text(path, address, port, &token))?;
        let mut server = ApiServer {
            etcd,
            apiserver: None,
            netns,
            address,
            port,
            args,
            binary,
            kubeconfig,
            dir,
        };
        server.start_apiserver()?;
        Ok(server)
    }

    fn start_apiserver(&mut self) -> Result<()> {
        let log = self.dir.path().join("kube-apiserver.log");
        let child = command_in(self.netns.as_deref(), &self.binary)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(log_file(self.dir.path(), "kube-apiserver.log")?)
            .spawn()
            .with_context(|| format!("cannot start {}", self.binary.display()))?;
        self.apiserver = Some(child);
        let started = Instant::now();
        loop {
            let ready = self
                .kubectl(&["get", "--raw", "/readyz"])
                .is_ok_and(|o| o.status.success());
            if ready {
                return Ok(());
            }
            if let Some(status) = self.apiserver.as_mut().and_then(|c| c.try_wait().ok()?) {
                self.apiserver = None;
                bail!(
                    "kube-apiserver exited ({status}) before it was ready:\n{}\netcd:\n{}",
                    tail(&log),
                    tail(&self.dir.path().join("etcd.log"))
                );
            }
            if started.elapsed() > START_DEADLINE {
                bail!(
                    "kube-apiserver not ready within {} s:\n{}",
                    START_DEADLINE.as_secs(),
                    tail(&log)
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Stops the API server (etcd keeps the data), waits `down`, and starts it again on
    /// the same port.
    pub fn restart(&mut self, down: Duration) -> Result<()> {
        self.stop_apiserver();
        std::thread::sleep(down);
        self.start_apiserver()
    }

    fn stop_apiserver(&mut self) {
        if let Some(mut child) = self.apiserver.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `https://<address>:<port>`.
    pub fn url(&self) -> String {
        format!("https://{}", socket(self.address, self.port))
    }

    /// The network namespace it runs in, if not the test's own.
    pub fn netns(&self) -> Option<&Path> {
        self.netns.as_deref()
    }

    /// Writes a kubeconfig for `token` into this server's directory.
    pub fn kubeconfig_for(&self, name: &str, token: &str) -> Result<PathBuf> {
        let path = self.dir.path().join(format!("kubeconfig-{name}"));
        std::fs::write(
            &path,
            kubeconfig_text(self.dir.path(), self.address, self.port, token),
        )?;
        Ok(path)
    }

    /// A directory that lives as long as the server.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The API server's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("kube-apiserver.log")).unwrap_or_default()
    }

    /// `kubectl` with the admin kubeconfig; the output whatever the exit status.
    pub fn kubectl(&self, args: &[&str]) -> Result<Output> {
        command_in(self.netns.as_deref(), "kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg(KUBECTL_TIMEOUT)
            .args(args)
            .output()
            .context("cannot run kubectl")
    }

    /// `kubectl` that must succeed; its standard output.
    pub fn kubectl_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.kubectl(args)?;
        if !out.status.success() {
            bail!(
                "kubectl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl apply -f -` of `yaml`.
    pub fn apply(&self, yaml: &str) -> Result<String> {
        let mut child = command_in(self.netns.as_deref(), "kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args([KUBECTL_TIMEOUT, "apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run kubectl")?;
        child
            .stdin
            .take()
            .context("kubectl's stdin")?
            .write_all(yaml.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "kubectl apply failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A token of `namespace/service_account` from the TokenRequest API, for
    /// `audience` (the API server's own when `None`), bound to the pod `(name, uid)`.
    pub fn token(
        &self,
        namespace: &str,
        service_account: &str,
        audience: Option<&str>,
        bound_pod: Option<(&str, &str)>,
    ) -> Result<String> {
        let mut args = vec![
            "create".to_string(),
            "token".into(),
            service_account.into(),
            "-n".into(),
            namespace.into(),
            "--duration=1h".into(),
        ];
        if let Some(audience) = audience {
            args.push(format!("--audience={audience}"));
        }
        if let Some((pod, uid)) = bound_pod {
            args.extend([
                "--bound-object-kind=Pod".into(),
                format!("--bound-object-name={pod}"),
                format!("--bound-object-uid={uid}"),
            ]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Ok(self.kubectl_ok(&args)?.trim().to_string())
    }

    /// A pod bound to `node` (never run: there is no kubelet), labelled `app:
    /// <service_account>` plus `labels`, with its status patched as kubelet would:
    /// Running, Ready, with `ips` and `host_ip`. Returns its UID.
    pub fn create_pod(&self, pod: &PodObject) -> Result<String> {
        let mut labels = format!("    app: {}\n", pod.service_account);
        for (key, value) in &pod.labels {
            labels.push_str(&format!("    {key}: \"{value}\"\n"));
        }
        self.apply(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  labels:\n{labels}\
             spec:\n  nodeName: {node}\n  serviceAccountName: {sa}\n  automountServiceAccountToken: false\n  \
             hostNetwork: {host_network}\n  containers:\n  - name: app\n    image: example/app:1\n",
            name = pod.name,
            namespace = pod.namespace,
            node = pod.node,
            sa = pod.service_account,
            host_network = pod.host_network,
        ))?;
        let ips: Vec<String> = pod
            .ips
            .iter()
            .map(|ip| format!(r#"{{"ip":"{ip}"}}"#))
            .collect();
        let status = format!(
            r#"{{"status":{{"phase":"Running","hostIP":"{host}","podIP":"{first}","podIPs":[{ips}],"conditions":[{{"type":"Ready","status":"True"}}]}}}}"#,
            host = pod.host_ip,
            first = pod.ips.first().context("a pod needs an address")?,
            ips = ips.join(","),
        );
        self.kubectl_ok(&[
            "patch",
            "pod",
            &pod.name,
            "-n",
            &pod.namespace,
            "--subresource=status",
            "--type=merge",
            "-p",
            &status,
        ])?;
        let uid = self.kubectl_ok(&[
            "get",
            "pod",
            &pod.name,
            "-n",
            &pod.namespace,
            "-o",
            "jsonpath={.metadata.uid}",
        ])?;
        Ok(uid)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop_apiserver();
        let _ = self.etcd.kill();
        let _ = self.etcd.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- kube-apiserver log ---\n{}",
                tail(&self.dir.path().join("kube-apiserver.log"))
            );
        }
    }
}

/// A Pod object as [`ApiServer::create_pod`] makes it.
#[derive(Clone, Debug)]
pub struct PodObject {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub node: String,
    pub ips: Vec<IpAddr>,
    pub host_ip: IpAddr,
    pub host_network: bool,
    /// Labels besides `app: <service_account>`.
    pub labels: Vec<(String, String)>,
}

fn socket(address: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(address, port).to_string()
}

/// A kubeconfig that trusts the API server's self-signed certificate (which it writes
/// into its `--cert-dir`).
fn kubeconfig_text(dir: &Path, address: IpAddr, port: u16, token: &str) -> String {
    let ca = dir.join("certs").join("apiserver.crt");
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: https://{server}\n    certificate-authority: {ca}\n\
         users:\n- name: user\n  user:\n    token: {token}\ncontexts:\n- name: local\n  context:\n    cluster: local\n    user: user\n\
         current-context: local\n",
        server = socket(address, port),
        ca = ca.display()
    )
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    hasher.finish()
}

/// A pod's sandbox as the tunnel finds it in /proc: a sleeping process in the pod's
/// network namespace and in the cgroup `<cgroup v2 root>/ztt<pid>-<n>-kubepods/pod<uid>`.
/// Killed and its cgroup removed on drop.
pub struct PodSandbox {
    child: Child,
    cgroup: PathBuf,
}

/// The cgroup v2 hierarchy: `/sys/fs/cgroup` (unified), or `/sys/fs/cgroup/unified`
/// (hybrid hosts).
fn cgroup2_root() -> Result<PathBuf> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join("cgroup.procs").is_file() && p.join("cgroup.controllers").is_file())
        .context("no cgroup v2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified")
}

impl PodSandbox {
    pub fn start(netns: &Path, uid: &str) -> Result<PodSandbox> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let parent = cgroup2_root()?.join(format!(
            "ztt{}-{}-kubepods",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let cgroup = parent.join(format!("pod{uid}"));
        std::fs::create_dir_all(&cgroup)
            .with_context(|| format!("cannot create the cgroup {}", cgroup.display()))?;
        let mut child = match command_in(Some(netns), "sleep")
            .arg("3600")
            .stdin(Stdio::null())
            .spawn()
        {
            Ok(child) => child,
            Err(err) => {
                let _ = std::fs::remove_dir(&cgroup);
                let _ = std::fs::remove_dir(&parent);
                return Err(err).context("cannot start the sandbox process");
            }
        };
        let procs = cgroup.join("cgroup.procs");
        if let Err(err) = std::fs::write(&procs, child.id().to_string()) {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_dir(&cgroup);
            let _ = std::fs::remove_dir(&parent);
            return Err(err).with_context(|| format!("cannot write {}", procs.display()));
        }
        Ok(PodSandbox { child, cgroup })
    }
}

impl Drop for PodSandbox {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The cgroup empties once the process is reaped; give the kernel a moment.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.cgroup).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(parent) = self.cgroup.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}
