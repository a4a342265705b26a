use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use ztunnel::admin::{LogControl, LogFormat};
use ztunnel::identity::{self, CaFiles, Identity, InProcessCa};
use ztunnel::kube::ca::{
    Authorizer, AuthorizerConfig, CaServer, CaServerConfig, DEFAULT_AUDIENCE, Metrics, RootStore,
};
use ztunnel::policy::PathNormalization;
use ztunnel::state::{L7Authorization, L7Settings};
use ztunnel::{app, check};

#[derive(Parser)]
#[command(name = "ztunnel", version, about = "Node tunnel for ambient meshes")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines on stderr: `text` (coloured only on a terminal) or `json` (one object
    /// per line). For `run --config`, overrides the file's `logFormat`.
    #[arg(long, global = true, env = "LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the tunnel: from a local config file (watched: edits apply without restart),
    /// or from the Kubernetes API as a DaemonSet.
    Run(RunArgs),
    /// Explain, without traffic, what would happen to a connection (or, with --method,
    /// --path, --host, --header, to one HTTP request on it): transport, identities,
    /// effective mTLS mode, and the policy and rule that allow or deny it.
    /// Exits 0 when allowed, 1 when refused, 2 on bad input.
    Check(check::Args),
    /// The in-process certificate authority's files.
    #[command(subcommand)]
    Ca(CaCommand),
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["config", "kube"])))]
struct RunArgs {
    /// The local config file (see deploy/examples/config.yaml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Read workloads, services and policies from the Kubernetes API; certificates come
    /// from the cluster CA (`ztunnel ca serve`).
    #[arg(long)]
    kube: bool,
    /// This node's name.
    #[arg(long, env = "NODE_NAME", requires = "kube")]
    node: Option<String>,
    #[arg(long, default_value = "cluster.local", requires = "kube")]
    trust_domain: String,
    /// Istio's root namespace: its policies without a selector apply mesh-wide.
    #[arg(long, default_value = "istio-system", requires = "kube")]
    root_namespace: String,
    /// Where the host's /proc is mounted (pods' network namespaces are found there).
    #[arg(long, default_value = "/proc", requires = "kube")]
    proc_root: PathBuf,
    /// The host's network namespace as a `/proc/<pid>/ns/net` link (pods sharing it are
    /// never enrolled), where PID 1's cannot be read; default `<proc-root>/1/ns/net`.
    #[arg(long, requires = "kube")]
    host_netns: Option<PathBuf>,
    /// The cluster CA service, HOST:PORT; HOST must be in its certificate.
    #[arg(
        long,
        default_value = "ztunnel-ca.ztunnel-system.svc:15012",
        requires = "kube"
    )]
    ca_address: String,
    /// The name the CA service's certificate must carry, when --ca-address is not that
    /// name (an IP address, or another name of the same service).
    #[arg(long, requires = "kube")]
    ca_server_name: Option<String>,
    /// The projected ServiceAccount token the CA authenticates the tunnel by.
    #[arg(
        long,
        default_value = "/var/run/secrets/ztunnel-ca/token",
        requires = "kube"
    )]
    ca_token_file: PathBuf,
    /// Peers never steered, both ways, as IP or prefix (repeatable): the node's address,
    /// so the kubelet's probes reach pods in STRICT namespaces.
    #[arg(
        long = "exclude-peer",
        env = "HOST_IP",
        value_delimiter = ',',
        requires = "kube"
    )]
    exclude_peers: Vec<String>,
    /// The roots to trust (the CA publishes them in a ConfigMap); watched.
    #[arg(
        long,
        default_value = "/var/run/secrets/ztunnel-trust/root-cert.pem",
        requires = "kube"
    )]
    trust_bundle: PathBuf,
    /// Where the eBPF programs and maps are pinned (a restarted tunnel takes them over).
    #[arg(long, default_value = ztunnel::config::DEFAULT_BPF_PIN_ROOT, requires = "kube")]
    bpf_pin_root: PathBuf,
    /// Where AuthorizationPolicy rules with HTTP fields are enforced: `tunnel` (per
    /// request, on the HTTP ports of this node's workloads) or `waypoint` (Istio's
    /// ztunnel semantics, for clusters that run Istio waypoints). The config file's
    /// `l7Authorization`. Default: tunnel.
    #[arg(
        long,
        env = "L7_AUTHORIZATION",
        value_parser = named::<L7Authorization>,
        conflicts_with = "config"
    )]
    l7_authorization: Option<L7Authorization>,
    /// How request paths are normalized before `paths` match: `NONE`, `BASE`,
    /// `MERGE_SLASHES` or `DECODE_AND_MERGE_SLASHES` (Istio's
    /// `meshConfig.pathNormalization`). The config file's `pathNormalization`.
    /// Default: DECODE_AND_MERGE_SLASHES.
    #[arg(
        long,
        env = "PATH_NORMALIZATION",
        value_parser = named::<PathNormalization>,
        conflicts_with = "config"
    )]
    path_normalization: Option<PathNormalization>,
}

/// The HTTP authorization settings of the Kubernetes mode.
fn kube_l7(args: &RunArgs) -> L7Settings {
    L7Settings {
        authorization: args.l7_authorization.unwrap_or_default(),
        path_normalization: args.path_normalization.unwrap_or_default(),
    }
}

/// A setting spelled as in the config file (its serde name), for a flag; the error
/// names the values expected.
fn named<T: serde::de::DeserializeOwned>(value: &str) -> Result<T, String> {
    serde_json::from_value(serde_json::Value::String(value.to_string())).map_err(|e| e.to_string())
}

#[derive(Subcommand)]
enum CaCommand {
    /// Write a new root certificate and key (ECDSA P-256) into DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
    },
    /// Issue a workload certificate from the root in DIR: writes cert-chain.pem, key.pem
    /// and root-cert.pem into OUT (for a peer outside this tunnel, or to inspect).
    Issue {
        #[arg(long)]
        dir: PathBuf,
        /// spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>
        #[arg(long)]
        identity: Identity,
        #[arg(long)]
        out: PathBuf,
    },
    /// Run the cluster CA service: roots in a Secret (created on first start), the trust
    /// bundle published in a ConfigMap, certificates issued to node tunnels over HTTPS.
    Serve(ServeArgs),
    /// One step of a staged root rotation, applied to the CA's Secret: `prepare` (a new
    /// root is trusted beside the old), `activate` (the new root signs), `retire` (only
    /// the new root stays trusted). Wait for the bundle to reach every node between steps.
    Rotate {
        step: RotateStep,
        #[command(flatten)]
        secret: SecretArgs,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum RotateStep {
    Prepare,
    Activate,
    Retire,
}

#[derive(clap::Args)]
struct SecretArgs {
    /// The CA's namespace.
    #[arg(long, env = "POD_NAMESPACE", default_value = "ztunnel-system")]
    namespace: String,
    /// The Secret holding the CA's roots.
    #[arg(long, default_value = "ztunnel-ca")]
    secret: String,
}

#[derive(clap::Args)]
struct ServeArgs {
    #[command(flatten)]
    secret: SecretArgs,
    /// The ConfigMap the trust bundle is published in (the tunnels mount it).
    #[arg(long, default_value = "ztunnel-trust-bundle")]
    bundle_config_map: String,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    #[arg(long, default_value = "0.0.0.0:15012")]
    listen: SocketAddr,
    /// The only ServiceAccount allowed to ask, as NAMESPACE/NAME.
    #[arg(long, default_value = "ztunnel-system/ztunnel")]
    tunnel_service_account: String,
    /// The audience of the tunnels' projected tokens.
    #[arg(long, default_value = DEFAULT_AUDIENCE)]
    audience: String,
    /// DNS names of the service's own certificate (default: the Service's names).
    #[arg(long = "dns-name")]
    dns_names: Vec<String>,
    /// Lifetime of issued certificates, in seconds.
    #[arg(long, default_value_t = identity::DEFAULT_CERT_LIFETIME.as_secs())]
    cert_lifetime_secs: u64,
    /// How often the Secret is read again (rotation steps take effect then), in seconds.
    #[arg(long, default_value_t = 30)]
    reload_secs: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Run(args) => run_tunnel(args, cli.log_format),
        Command::Check(args) => return ExitCode::from(check::run(&args)),
        Command::Ca(ca) => run_ca(ca, cli.log_format.unwrap_or_default()),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_tunnel(args: RunArgs, log_format: Option<LogFormat>) -> Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let (source, log_level, file_format) = match args.config {
        Some(path) => {
            let config = ztunnel::config::load(&path)?;
            let level = config.settings.log_level.clone();
            let format = config.settings.log_format;
            (app::Source::File(config), level, format)
        }
        None => {
            let l7 = kube_l7(&args);
            let node = args
                .node
                .context("the node's name is required: set NODE_NAME or --node")?;
            let mut settings = ztunnel::config::Settings::defaults(&node);
            settings.trust_domain = args.trust_domain;
            settings.root_namespace = args.root_namespace;
            settings.trust_bundle_file = Some(args.trust_bundle);
            settings.bpf_pin_root = args.bpf_pin_root;
            settings.l7 = l7;
            settings.excluded_peers = args
                .exclude_peers
                .iter()
                .map(|p| {
                    p.parse::<ipnet::IpNet>()
                        .or_else(|_| p.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                        .with_context(|| {
                            format!("--exclude-peer {p:?} is not an IP address or prefix")
                        })
                })
                .collect::<Result<_>>()?;
            let level = std::env::var("RUST_LOG").unwrap_or_else(|_| settings.log_level.clone());
            let host = args
                .ca_address
                .rsplit_once(':')
                .map(|(h, _)| h)
                .unwrap_or(&args.ca_address);
            let ca = ztunnel::kube::ca::CaClientConfig {
                server_name: args.ca_server_name.unwrap_or_else(|| host.to_string()),
                address: args.ca_address.clone(),
                token_file: args.ca_token_file,
                timeout: Duration::from_secs(10),
            };
            let client = runtime.block_on(kube_client())?;
            let kube = app::KubeOptions {
                client,
                settings,
                proc_root: args.proc_root,
                host_netns: args.host_netns,
                ca,
            };
            (app::Source::Kube(kube), level, LogFormat::default())
        }
    };
    let log = LogControl::init(&log_level, log_format.unwrap_or(file_format))?;
    runtime.block_on(app::run(source, log))
}

fn run_ca(command: CaCommand, log_format: LogFormat) -> Result<()> {
    match command {
        CaCommand::Init { dir, trust_domain } => {
            let files = identity::init_ca(&dir, &trust_domain)?;
            println!("wrote {} and {}", files.cert.display(), files.key.display());
            Ok(())
        }
        CaCommand::Issue { dir, identity, out } => issue(&dir, &identity, &out),
        CaCommand::Serve(args) => {
            let (runtime, _log) = runtime(log_format)?;
            runtime.block_on(ca_serve(args))
        }
        CaCommand::Rotate {
            step,
            secret,
            trust_domain,
        } => {
            let (runtime, _log) = runtime(log_format)?;
            runtime.block_on(ca_rotate(step, &secret, &trust_domain))
        }
    }
}

/// The runtime of a `ca` command and its logger, to keep until the command ends.
fn runtime(log_format: LogFormat) -> Result<(tokio::runtime::Runtime, LogControl)> {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_string());
    let log = LogControl::init(&filter, log_format)?;
    // The Kubernetes client's TLS uses the process-wide provider.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    Ok((runtime, log))
}

async fn kube_client() -> Result<kube::Client> {
    kube::Client::try_default()
        .await
        .context("cannot reach the Kubernetes API (in-cluster config or kubeconfig)")
}

async fn ca_serve(args: ServeArgs) -> Result<()> {
    let Some((sa_namespace, sa_name)) = args.tunnel_service_account.split_once('/') else {
        bail!(
            "--tunnel-service-account {:?} is not of the form NAMESPACE/NAME",
            args.tunnel_service_account
        );
    };
    let namespace = &args.secret.namespace;
    let dns_names = if args.dns_names.is_empty() {
        vec![
            format!("ztunnel-ca.{namespace}.svc"),
            format!("ztunnel-ca.{namespace}.svc.cluster.local"),
        ]
    } else {
        args.dns_names.clone()
    };
    let client = kube_client().await?;
    let store = RootStore::new(client.clone(), namespace, &args.secret.secret);
    let roots = store.load_or_create(&args.trust_domain).await?;
    store
        .publish_bundle(&args.bundle_config_map, &roots.bundle_pem())
        .await?;
    let authorizer = Authorizer::new(
        client,
        AuthorizerConfig {
            tunnel_service_account: (sa_namespace.to_string(), sa_name.to_string()),
            audience: args.audience.clone(),
            trust_domain: args.trust_domain.clone(),
        },
    );
    let config = CaServerConfig {
        secret: store.secret_name(),
        dns_names,
        cert_lifetime: Duration::from_secs(args.cert_lifetime_secs),
        client_timeout: Duration::from_secs(10),
    };
    let server = CaServer::new(
        config,
        roots,
        authorizer,
        ztunnel::tls::provider(),
        Metrics::default(),
    )?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tracing::info!(listen = %args.listen, secret = %store.secret_name(), "CA service ready");
    tokio::spawn(server.clone().serve(listener));
    let mut reload = tokio::time::interval(Duration::from_secs(args.reload_secs.max(1)));
    loop {
        reload.tick().await;
        let roots = match store.load().await {
            Ok(Some((roots, _))) => roots,
            Ok(None) => {
                tracing::error!(secret = %store.secret_name(), "CA Secret is gone; signing with the roots in memory");
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "CA roots not reloaded; the ones in force stay");
                continue;
            }
        };
        match server.update(roots) {
            Ok(true) => {
                if let Err(e) = store
                    .publish_bundle(&args.bundle_config_map, &server.bundle_pem())
                    .await
                {
                    tracing::error!(error = %e, "trust bundle not published");
                }
            }
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, "CA roots not taken; the ones in force stay"),
        }
    }
}

async fn ca_rotate(step: RotateStep, secret: &SecretArgs, trust_domain: &str) -> Result<()> {
    let store = RootStore::new(kube_client().await?, &secret.namespace, &secret.secret);
    let name = store.secret_name();
    let (mut roots, version) = store
        .load()
        .await?
        .with_context(|| format!("secret {name} does not exist; start the CA first"))?;
    match step {
        RotateStep::Prepare => roots.prepare(&name, trust_domain)?,
        RotateStep::Activate => roots.activate(&name)?,
        RotateStep::Retire => roots.retire()?,
    }
    store.replace(&roots, version).await?;
    println!(
        "secret {name}: {} trusted root(s){}",
        roots.bundle.len(),
        if roots.next.is_some() {
            ", one staged"
        } else {
            ""
        }
    );
    Ok(())
}

fn issue(dir: &Path, id: &Identity, out: &Path) -> Result<()> {
    let ca = InProcessCa::load(&CaFiles::in_dir(dir), identity::DEFAULT_CERT_LIFETIME)?;
    let key = rcgen::KeyPair::generate().context("cannot generate a key pair")?;
    let chain = ca.issue(id, &key)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let pem = |der: &[u8]| ztunnel::kube::ca::pem_lf("CERTIFICATE", der);
    let write = |name: &str, contents: String| {
        let path = out.join(name);
        std::fs::write(&path, contents).with_context(|| format!("cannot write {}", path.display()))
    };
    write("cert-chain.pem", chain.iter().map(|c| pem(c)).collect())?;
    write("key.pem", key.serialize_pem())?;
    write("root-cert.pem", pem(ca.root()))?;
    println!("issued {id} into {}", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let cli = Cli::try_parse_from(["ztunnel", "run"].iter().chain(args))?;
        match cli.command {
            Command::Run(run) => Ok(run),
            _ => unreachable!("parsed as run"),
        }
    }

    #[test]
    fn the_kubernetes_mode_takes_the_l7_settings_from_flags() {
        let defaults = kube_l7(&run_args(&["--kube", "--node", "n"]).unwrap());
        assert_eq!(defaults.authorization, L7Authorization::Tunnel);
        assert_eq!(
            defaults.path_normalization,
            PathNormalization::DecodeAndMergeSlashes
        );
        let set = run_args(&[
            "--kube",
            "--node",
            "n",
            "--l7-authorization",
            "waypoint",
            "--path-normalization",
            "MERGE_SLASHES",
        ])
        .unwrap();
        let set = kube_l7(&set);
        assert_eq!(set.authorization, L7Authorization::Waypoint);
        assert_eq!(set.path_normalization, PathNormalization::MergeSlashes);

        let bad = run_args(&["--kube", "--node", "n", "--path-normalization", "merge"])
            .err()
            .unwrap()
            .to_string();
        assert!(
            bad.contains("invalid value 'merge' for '--path-normalization"),
            "{bad}"
        );
        assert!(bad.contains("DECODE_AND_MERGE_SLASHES"), "{bad}");
        let bad = run_args(&["--kube", "--node", "n", "--l7-authorization", "envoy"])
            .err()
            .unwrap()
            .to_string();
        assert!(bad.contains("expected `tunnel` or `waypoint`"), "{bad}");
        // The config file has its own keys.
        let file = run_args(&["--config", "c.yaml", "--l7-authorization", "waypoint"])
            .err()
            .unwrap()
            .to_string();
        assert!(file.contains("--kube"), "{file}");
    }
}
