//! `tessera-agent run`: wires the subsystems together. It reads the trust
//! bundle the operator publishes, starts the SVID followers ([`crate::svid`]),
//! serves the Workload API ([`crate::workload_api`]) and the probes, runs
//! the data path ([`crate::mesh`], with `--cgroup-root`), and stops them all
//! through one [`CancellationToken`] on SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::{info, warn};

use crate::datapath::Stats;
use crate::mesh::{EnforceError, EnforcerConfig};
use crate::svid::spire::DelegatedConfig;
use crate::svid::trust::{self, TrustError};
use crate::svid::{IdentityStore, JwtIssuer, JwtSource};
use crate::workload_api::ServeError;

/// Options of `tessera-agent run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Kubeconfig; without it, $KUBECONFIG, ~/.kube/config or in-cluster.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name (from the downward API in a DaemonSet).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// The operator's signing service.
    #[arg(long, default_value = "https://tessera-signer.tessera-system.svc:8443")]
    pub signer: String,
    /// The name the signer's certificate must carry.
    #[arg(long, default_value = "tessera-signer.tessera-system.svc")]
    pub signer_name: String,
    /// Namespace of the trust bundle ConfigMap (the operator's).
    #[arg(long, default_value = "tessera-system")]
    pub namespace: String,
    /// The agent's node-bound service-account token (audience tessera-signer).
    #[arg(long, default_value = "/var/run/secrets/tessera/token")]
    pub token_file: PathBuf,
    /// Where to serve the SPIFFE Workload API.
    #[arg(long, default_value = "/run/tessera/agent.sock")]
    pub socket: PathBuf,
    /// Enables the data path: the cgroup (v2) the eBPF programs attach to,
    /// the parent of this node's pod cgroups (found by pod UID below it).
    /// Needs root. Without it the agent serves identities only.
    #[arg(long)]
    pub cgroup_root: Option<PathBuf>,
    /// The bpffs mount point (mounted there if it is not yet).
    #[arg(long, default_value = "/sys/fs/bpf")]
    pub bpffs: PathBuf,
    /// Directory on bpffs where maps and links are pinned, one directory per
    /// ABI version below it (one per agent: simulated nodes on one host
    /// need one each).
    #[arg(long, default_value = "tessera")]
    pub pin_name: String,
    /// Where agents accept handshakes; other agents are dialled on this port
    /// at their node's address.
    #[arg(long, default_value = "0.0.0.0:4434")]
    pub handshake_addr: SocketAddr,
    /// Where to serve /metrics, /healthz and /readyz (ready once the data
    /// path is in sync, or at once without a data path).
    #[arg(long, default_value = "0.0.0.0:9091")]
    pub metrics_addr: SocketAddr,
    /// Where the auth cache is kept.
    #[arg(long, default_value = "/var/lib/tessera")]
    pub state_dir: PathBuf,
    /// Where this node's pods' SVIDs come from: `builtin` (the operator's
    /// signing service) or `spire` (the local SPIRE agent's Delegated
    /// Identity API; the operator must run with --svid-source spire too).
    #[arg(long, value_enum, default_value = "builtin")]
    pub svid_source: SvidSource,
    /// The SPIRE agent's admin socket (its `admin_socket_path`), whose
    /// authorized_delegates must include this agent's SPIFFE ID.
    #[arg(long, default_value = "/run/spire/admin/api.sock")]
    pub spire_admin_socket: PathBuf,
}

/// Where workload SVIDs come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SvidSource {
    /// The operator's signing service.
    Builtin,
    /// The local SPIRE agent.
    Spire,
}

/// Why the agent could not start, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// No Kubernetes client.
    #[error(transparent)]
    Client(#[from] tessera_api::client::ClientError),
    /// The trust bundle ConfigMap could not be read.
    #[error(
        "cannot read ConfigMap {namespace}/{name}; is the operator running, and may the agent read it? {source}",
        name = trust::BUNDLE_CONFIGMAP
    )]
    BundleUnreadable {
        /// The operator's namespace.
        namespace: String,
        /// The API error.
        source: kube::Error,
    },
    /// The trust bundle ConfigMap holds nothing usable.
    #[error("ConfigMap {namespace}/{name} is unusable: {source}", name = trust::BUNDLE_CONFIGMAP)]
    Bundle {
        /// The operator's namespace.
        namespace: String,
        /// What is wrong with it.
        source: TrustError,
    },
    /// SPIRE mode needs the trust domain the operator names.
    #[error("ConfigMap {name} names no trustDomain; is the operator up to date?", name = trust::BUNDLE_CONFIGMAP)]
    NoTrustDomain,
    /// `--signer` is not a URL.
    #[error("--signer {url:?} is not a URL: {source}")]
    SignerUrl {
        /// What was given.
        url: String,
        /// Why it does not parse.
        source: tonic::codegen::http::uri::InvalidUri,
    },
    /// The signer channel's TLS settings were refused.
    #[error("cannot set up TLS to the signer: {0}")]
    SignerTls(#[from] tonic::transport::Error),
    /// The Workload API could not be served.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// The probes and metrics could not be served.
    #[error("cannot serve metrics on {addr}: {source}; pass another --metrics-addr")]
    Metrics {
        /// The address asked for.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The state directory could not be made private.
    #[error("cannot create the state directory {dir} (mode 0700): {source}")]
    StateDir {
        /// The directory.
        dir: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// bpffs could not be mounted.
    #[error("cannot mount bpffs at {path}: {source}")]
    Bpffs {
        /// The mount point.
        path: PathBuf,
        /// What failed (boxed: it is large and rare).
        source: Box<tessera_bpf::pinning::PinningError>,
    },
    /// The signal handler could not be installed.
    #[error("cannot handle SIGTERM: {0}")]
    Signal(std::io::Error),
    /// The data path stopped by itself.
    #[error("the data path controller stopped")]
    DatapathStopped,
    /// The data path failed.
    #[error("the data path failed: {0}")]
    Datapath(#[from] EnforceError),
    /// The data path's task panicked.
    #[error("the data path controller panicked: {0}")]
    DatapathPanicked(tokio::task::JoinError),
}

/// Runs the agent until SIGTERM, Ctrl-C, or a failure of the data path.
pub async fn run(args: RunArgs) -> Result<(), AppError> {
    let client = tessera_api::client::connect(args.kubeconfig.as_deref()).await?;
    let store = IdentityStore::default();
    let stop = CancellationToken::new();
    let spire = (args.svid_source == SvidSource::Spire).then(|| DelegatedConfig {
        node_name: args.node_name.clone(),
        admin_socket: args.spire_admin_socket.clone(),
    });
    let bundle_pem = follow_trust(&client, &args.namespace, spire.as_ref(), &store).await?;
    let channel = signer_channel(&args, bundle_pem)?;
    let svid_cfg = crate::svid::signer::SvidConfig {
        node_name: args.node_name.clone(),
        token_file: args.token_file.clone(),
    };
    let jwt = match &spire {
        None => JwtSource::Signer(JwtIssuer::new(
            channel.clone(),
            svid_cfg.clone(),
            store.clone(),
        )),
        Some(cfg) => JwtSource::Spire(crate::svid::spire::SpireJwt::new(cfg.clone())),
    };
    let server = crate::workload_api::serve(
        &args.socket,
        store.clone(),
        Some(jwt),
        stop.clone().cancelled_owned(),
    )
    .await?;
    info!(socket = %args.socket.display(), node = %args.node_name, "serving the SPIFFE Workload API");
    let stats = Arc::new(Stats::default());
    let metrics = serve_probes(&args, stats.clone(), store.clone()).await?;
    private_dir(&args.state_dir)?;
    let enforcer = match &args.cgroup_root {
        Some(cgroup) => Some(start_datapath(
            &args,
            cgroup,
            client.clone(),
            &store,
            stats,
            &stop,
        )?),
        None => None,
    };
    let svids = async move {
        match spire {
            None => crate::svid::signer::run(client, channel, svid_cfg, store).await,
            Some(cfg) => crate::svid::spire::run(client, cfg, store).await,
        }
    };
    let outcome = wait(svids, enforcer, &stop).await;
    server.abort();
    metrics.abort();
    let _ = std::fs::remove_file(&args.socket);
    outcome
}

/// Reads the trust bundle the operator publishes and follows the own and
/// federated trust domains' CAs from now on (with SPIRE, the own CAs are
/// the SPIRE agent's, for the trust domain the operator names). Returns the
/// bundle's PEM, which the signer's certificate must chain to.
async fn follow_trust(
    client: &kube::Client,
    namespace: &str,
    spire: Option<&DelegatedConfig>,
    store: &IdentityStore,
) -> Result<String, AppError> {
    let published = kube::Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .get(trust::BUNDLE_CONFIGMAP)
        .await
        .map_err(|source| AppError::BundleUnreadable {
            namespace: namespace.to_owned(),
            source,
        })?;
    let unusable = |source| AppError::Bundle {
        namespace: namespace.to_owned(),
        source,
    };
    match spire {
        None => {
            trust::own_der_of(&published).map_err(unusable)?;
            trust::apply(store, &published);
            tokio::spawn(trust::follow(
                client.clone(),
                namespace.to_owned(),
                store.clone(),
            ));
        }
        Some(cfg) => {
            let td = trust::trust_domain_id_of(&published)
                .map_err(unusable)?
                .ok_or(AppError::NoTrustDomain)?;
            tokio::spawn(crate::svid::spire::follow_bundles(
                cfg.clone(),
                td.clone(),
                store.clone(),
            ));
            tokio::spawn(crate::svid::spire::follow_jwt_bundles(
                cfg.clone(),
                td,
                store.clone(),
            ));
        }
    }
    tokio::spawn(trust::follow_federated(
        client.clone(),
        namespace.to_owned(),
        store.clone(),
    ));
    Ok(published
        .data
        .and_then(|mut d| d.remove(trust::BUNDLE_KEY))
        .unwrap_or_default())
}

/// A lazily connected channel to the signing service, trusting `bundle_pem`.
fn signer_channel(args: &RunArgs, bundle_pem: String) -> Result<Channel, AppError> {
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(bundle_pem))
        .domain_name(args.signer_name.clone());
    Ok(Channel::from_shared(args.signer.clone())
        .map_err(|source| AppError::SignerUrl {
            url: args.signer.clone(),
            source,
        })?
        .tls_config(tls)?
        .connect_lazy())
}

/// Serves /metrics, /healthz and /readyz (ready once the data path is in
/// sync, or at once without one).
async fn serve_probes(
    args: &RunArgs,
    stats: Arc<Stats>,
    store: IdentityStore,
) -> Result<JoinHandle<()>, AppError> {
    let ready: tessera_api::probes::Readiness = if args.cgroup_root.is_some() {
        let stats = stats.clone();
        Arc::new(move || stats.in_sync.load(std::sync::atomic::Ordering::Relaxed))
    } else {
        Arc::new(|| true)
    };
    let registry = crate::metrics::registry(stats, store);
    let (bound, task) = tessera_api::probes::serve(args.metrics_addr, registry, ready)
        .await
        .map_err(|source| AppError::Metrics {
            addr: args.metrics_addr,
            source,
        })?;
    info!(addr = %bound, "serving /metrics, /healthz and /readyz");
    Ok(task)
}

/// Mounts bpffs if needed and starts the data path on `cgroup`.
fn start_datapath(
    args: &RunArgs,
    cgroup: &Path,
    client: kube::Client,
    store: &IdentityStore,
    stats: Arc<Stats>,
    stop: &CancellationToken,
) -> Result<JoinHandle<Result<(), EnforceError>>, AppError> {
    tessera_bpf::pinning::ensure_bpffs(&args.bpffs).map_err(|source| AppError::Bpffs {
        path: args.bpffs.clone(),
        source: Box::new(source),
    })?;
    let cfg = EnforcerConfig {
        node_name: args.node_name.clone(),
        listen: args.handshake_addr,
        peer_port: args.handshake_addr.port(),
        cache_dir: args.state_dir.join("authcache"),
        pin_dir: Some(tessera_bpf::pinning::version_dir(
            &args.bpffs.join(&args.pin_name),
        )),
        attach_cgroup: Some(cgroup.to_path_buf()),
        pod_cgroups: cgroup.to_path_buf(),
    };
    let shutdown = stop.clone().cancelled_owned();
    Ok(tokio::spawn(crate::mesh::enforcer::run(
        client,
        cfg,
        store.clone(),
        stats,
        shutdown,
    )))
}

/// Waits for a signal, the end of the SVID follower or of the data path;
/// then cancels `stop` and gives the data path 3 s to finish.
async fn wait(
    svids: impl Future<Output = ()>,
    enforcer: Option<JoinHandle<Result<(), EnforceError>>>,
    stop: &CancellationToken,
) -> Result<(), AppError> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(AppError::Signal)?;
    let has_datapath = enforcer.is_some();
    let mut enforcer_done = std::pin::pin!(async {
        match enforcer {
            Some(task) => task.await,
            None => std::future::pending().await,
        }
    });
    tokio::select! {
        _ = svids => warn!("the pod watch ended"),
        _ = term.recv() => info!("shutting down"),
        _ = tokio::signal::ctrl_c() => info!("shutting down"),
        done = &mut enforcer_done => {
            stop.cancel();
            return match done {
                Ok(Ok(())) => Err(AppError::DatapathStopped),
                Ok(Err(e)) => Err(AppError::Datapath(e)),
                Err(e) => Err(AppError::DatapathPanicked(e)),
            };
        }
    }
    stop.cancel();
    if has_datapath {
        let _ = tokio::time::timeout(Duration::from_secs(3), &mut enforcer_done).await;
    }
    Ok(())
}

/// Creates `dir` if needed and lets only the agent's user into it.
fn private_dir(dir: &Path) -> Result<(), AppError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
        .map_err(|source| AppError::StateDir {
            dir: dir.to_path_buf(),
            source,
        })
}
