//! `tessera-operator run`: wires the subsystems together. Every replica
//! serves its probes and takes part in the leader election; the leader runs
//! the CA ([`crate::ca`]), the signing service, the bundle endpoint and the
//! federation controller ([`crate::federation`]), the policy compiler
//! ([`crate::policy`]), the identity controller ([`crate::identity`]), SPIRE
//! registration and the agents' DaemonSet ([`crate::deploy`]). One
//! [`CancellationToken`] stops everything on SIGTERM or Ctrl-C; a child of
//! it stops what the leader runs when leadership ends.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};
use tessera_api::names;
use tessera_api::spiffe::{SpiffeIdError, TrustDomain};
use time::OffsetDateTime;
use tokio::sync::{Notify, RwLock, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::ca::signer::{self, SignerConfig, SignerService};
use crate::ca::{CaConfig, CaError, TrustDomainCa};
use crate::deploy::agents::AgentConfig;
use crate::deploy::endpoints::{self, LeaderService, Replica};
use crate::federation::endpoint;
use crate::identity::IdentityError;
use crate::metrics::{self, Metrics};
use crate::policy::Preview;
use crate::spire_entries::{self, SpireConfig, SpireError};

/// Options of `tessera-operator run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Kubeconfig to use (see `check`).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The trust domain this cluster's identities belong to.
    #[arg(long, env = "TESSERA_TRUST_DOMAIN")]
    pub trust_domain: String,
    /// Namespace for the CA Secret, the trust bundle ConfigMap and the Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "tessera-system")]
    pub namespace: String,
    /// Where to serve /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:9090")]
    pub metrics_addr: SocketAddr,
    /// Leader lease duration in seconds; a standby takes over this long
    /// after a leader stops renewing (at once when it shuts down cleanly).
    #[arg(long, default_value_t = 15)]
    pub lease_duration: u64,
    /// Where the signing service listens (TLS; name tessera-signer.<namespace>.svc).
    #[arg(long, default_value = "0.0.0.0:8443")]
    pub signer_addr: SocketAddr,
    /// The node agents' service account in --namespace; only it may get SVIDs.
    #[arg(long, default_value = "tessera-agent")]
    pub agent_service_account: String,
    /// Lifetime of X.509-SVIDs, in seconds.
    #[arg(long, default_value_t = 3600)]
    pub svid_ttl_seconds: u64,
    /// Lifetime of JWT-SVIDs, in seconds (bearer tokens: keep it short).
    #[arg(long, default_value_t = 300)]
    pub jwt_svid_ttl_seconds: u64,
    /// How long a numeric identity no pod uses is kept before it is released
    /// (a pod of the same SPIFFE ID arriving meanwhile keeps it), in seconds.
    #[arg(long, default_value_t = 30)]
    pub identity_release_grace_seconds: u64,
    /// Serve the trust domain's SPIFFE bundle endpoint with the https_spiffe
    /// profile on this address (the endpoint presents an X509-SVID for
    /// spiffe://<trust domain>/tessera/bundle-endpoint). Off when unset.
    #[arg(long)]
    pub bundle_endpoint_addr: Option<SocketAddr>,
    /// Serve the bundle endpoint with the https_web profile on this address,
    /// presenting the certificate in --bundle-endpoint-web-cert. Off when unset.
    #[arg(long, requires_all = ["bundle_endpoint_web_cert", "bundle_endpoint_web_key"])]
    pub bundle_endpoint_web_addr: Option<SocketAddr>,
    /// PEM certificate chain (leaf first) for the https_web bundle endpoint;
    /// reloaded when it changes.
    #[arg(long)]
    pub bundle_endpoint_web_cert: Option<PathBuf>,
    /// PEM private key of --bundle-endpoint-web-cert.
    #[arg(long)]
    pub bundle_endpoint_web_key: Option<PathBuf>,
    /// `spiffe_refresh_hint` of the served bundle: how often federated
    /// trust domains should fetch it, in seconds.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub bundle_refresh_hint_seconds: u64,
    /// Where workload SVIDs come from: `builtin` (this operator's CA) or
    /// `spire` (this operator registers workload identities in the SPIRE
    /// server, whose agents issue them; the trust domain must be SPIRE's).
    #[arg(long, value_enum, default_value = "builtin")]
    pub svid_source: SvidSource,
    /// This replica's pod (from the downward API). With --pod-ip, the
    /// leader points the signer's and bundle endpoint's Services at itself.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// This replica's pod address (from the downward API).
    #[arg(long, env = "POD_IP", requires = "pod_name")]
    pub pod_ip: Option<IpAddr>,
    /// Run the node agents: the leader keeps the agent DaemonSet, with this
    /// image, applied in --namespace and reports on it whether Pod Security
    /// admits its pods (OLM installs, which give the image as
    /// RELATED_IMAGE_AGENT). Off when unset: `deploy/` ships the DaemonSet.
    #[arg(long, env = "RELATED_IMAGE_AGENT")]
    pub agent_image: Option<String>,
    /// The nodes' pod cgroup root, for the agents the operator runs (OLM
    /// installs set it through the Subscription's `config.env`).
    #[arg(
        long,
        env = "TESSERA_AGENT_CGROUP_ROOT",
        default_value = "/sys/fs/cgroup/kubepods.slice"
    )]
    pub agent_cgroup_root: String,
    /// How often the leader applies the agent DaemonSet again and checks
    /// its Pod Security condition, in seconds.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub agent_recheck_seconds: u64,
    /// SPIRE registration settings.
    #[command(flatten)]
    pub spire: SpireArgs,
}

/// Where workload SVIDs come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SvidSource {
    /// The operator's own CA.
    Builtin,
    /// A SPIRE server.
    Spire,
}

/// SPIRE registration settings.
#[derive(Debug, Clone, clap::Args)]
pub struct SpireArgs {
    /// The SPIRE server's API socket.
    #[arg(long, default_value = "/tmp/spire-server/private/api.sock")]
    pub spire_server_socket: PathBuf,
    /// Registration entries this operator creates get IDs starting with this;
    /// it only ever changes or deletes entries whose ID does.
    #[arg(long, default_value = "tessera-")]
    pub spire_entry_id_prefix: String,
    /// Parent ID of a node's entries: the SPIFFE ID of that node's SPIRE
    /// agent, or of a node alias matching only it ({trustDomain},
    /// {nodeName}). A Node annotated tessera.dev/spire-agent-id uses that.
    #[arg(long, default_value = "spiffe://{trustDomain}/tessera/node/{nodeName}")]
    pub spire_parent_id_template: String,
    /// Log the registration plan instead of applying it.
    #[arg(long)]
    pub spire_dry_run: bool,
}

impl SpireArgs {
    /// The registration settings, checked; `dry_run` forces a dry run.
    pub fn config(&self, dry_run: bool) -> Result<SpireConfig, SpireError> {
        let cfg = SpireConfig {
            socket: self.spire_server_socket.clone(),
            id_prefix: self.spire_entry_id_prefix.clone(),
            parent_template: self.spire_parent_id_template.clone(),
            dry_run: dry_run || self.spire_dry_run,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Parses `--trust-domain`.
pub fn trust_domain(given: &str) -> Result<TrustDomain, AppError> {
    given.parse().map_err(|source| AppError::TrustDomain {
        given: given.to_owned(),
        source,
    })
}

/// Why the operator could not start, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// No Kubernetes client.
    #[error(transparent)]
    Client(#[from] tessera_api::client::ClientError),
    /// `--trust-domain` is not a trust domain name.
    #[error("--trust-domain {given:?} is not a SPIFFE trust domain name: {source}")]
    TrustDomain {
        /// What was given.
        given: String,
        /// Why it does not parse.
        source: SpiffeIdError,
    },
    /// The SPIRE settings are unusable.
    #[error(transparent)]
    Spire(#[from] SpireError),
    /// The probes and metrics could not be served.
    #[error("cannot listen on --metrics-addr {addr}: {source}")]
    Metrics {
        /// The address asked for.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The leader Lease could not be set up.
    #[error(
        "cannot set up the leader Lease in namespace {namespace}; does it exist, and may the operator manage leases there? {source}"
    )]
    Lease {
        /// The operator's namespace.
        namespace: String,
        /// What the lease manager said.
        source: LeaseManagerError,
    },
    /// The leader election stopped.
    #[error("the leader election task stopped")]
    ElectionStopped,
    /// The CA could not be loaded or published.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The identity controller failed.
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

/// How long running reconciles get to finish when leadership ends.
const CONTROLLER_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the leader waits before starting again what failed to start.
const LEAD_RETRY: Duration = Duration::from_secs(5);

/// What the leader needs besides the client.
#[derive(Debug)]
struct Leading {
    trust_domain: TrustDomain,
    ca: CaConfig,
    signer: SignerConfig,
    signer_addr: SocketAddr,
    signer_dns: Vec<String>,
    release_grace: Duration,
    endpoint: EndpointArgs,
    spire: Option<SpireConfig>,
    /// This replica, when it runs as a pod whose Services it backs.
    replica: Option<Replica>,
    /// The node agents, when the operator runs them.
    agents: Option<AgentConfig>,
}

/// Where and how the bundle endpoint is served.
#[derive(Debug, Clone)]
struct EndpointArgs {
    spiffe_addr: Option<SocketAddr>,
    web: Option<(SocketAddr, PathBuf, PathBuf)>,
    refresh_hint: Duration,
}

impl Leading {
    fn new(args: RunArgs, trust_domain: TrustDomain, spire: Option<SpireConfig>) -> Leading {
        let namespace = args.namespace.as_str();
        let web = match (
            args.bundle_endpoint_web_addr,
            args.bundle_endpoint_web_cert,
            args.bundle_endpoint_web_key,
        ) {
            (Some(addr), Some(cert), Some(key)) => Some((addr, cert, key)),
            _ => None,
        };
        Leading {
            ca: CaConfig::new(trust_domain.clone(), namespace),
            signer: SignerConfig {
                trust_domain: trust_domain.clone(),
                agent_username: format!(
                    "system:serviceaccount:{namespace}:{}",
                    args.agent_service_account
                ),
                svid_ttl: Duration::from_secs(args.svid_ttl_seconds),
                jwt_svid_ttl: Duration::from_secs(args.jwt_svid_ttl_seconds),
            },
            signer_addr: args.signer_addr,
            signer_dns: vec![
                names::SIGNER_SERVICE.to_owned(),
                format!("{}.{namespace}.svc", names::SIGNER_SERVICE),
            ],
            release_grace: Duration::from_secs(args.identity_release_grace_seconds),
            endpoint: EndpointArgs {
                spiffe_addr: args.bundle_endpoint_addr,
                web,
                refresh_hint: Duration::from_secs(args.bundle_refresh_hint_seconds),
            },
            spire,
            replica: args
                .pod_name
                .zip(args.pod_ip)
                .map(|(pod_name, pod_ip)| Replica { pod_name, pod_ip }),
            agents: args.agent_image.map(|image| AgentConfig {
                image,
                namespace: namespace.to_owned(),
                cgroup_root: args.agent_cgroup_root,
                trust_domain: trust_domain.to_string(),
                recheck: Duration::from_secs(args.agent_recheck_seconds),
            }),
            trust_domain,
        }
    }

    /// The Services the leader backs: the signer's, and the bundle
    /// endpoint's when it is served.
    fn services(&self) -> Vec<LeaderService> {
        let signer = LeaderService {
            name: names::SIGNER_SERVICE,
            port: self.signer_addr.port(),
        };
        let endpoint = self.endpoint.spiffe_addr.map(|addr| LeaderService {
            name: names::BUNDLE_ENDPOINT_SERVICE,
            port: addr.port(),
        });
        std::iter::once(signer).chain(endpoint).collect()
    }
}

/// Runs the operator until SIGTERM or Ctrl-C: serves the probes, and
/// whenever this replica holds the leader Lease, everything the leader runs.
pub async fn run(args: RunArgs) -> Result<(), AppError> {
    let spire = match args.svid_source {
        SvidSource::Builtin => None,
        SvidSource::Spire => Some(args.spire.config(false)?),
    };
    let trust_domain = trust_domain(&args.trust_domain)?;
    let client = tessera_api::client::connect(args.kubeconfig.as_deref()).await?;
    let (namespace, lease_duration, metrics_addr) = (
        args.namespace.clone(),
        args.lease_duration,
        args.metrics_addr,
    );
    let leading = Arc::new(Leading::new(args, trust_domain, spire));
    let metrics = Arc::new(Metrics::default());
    let (bound, _server) = metrics::serve(metrics_addr, metrics.clone())
        .await
        .map_err(|source| AppError::Metrics {
            addr: metrics_addr,
            source,
        })?;
    info!(%bound, "serving /metrics, /healthz and /readyz");
    let manager = LeaseManagerBuilder::new(client.clone(), names::OPERATOR)
        .with_namespace(&namespace)
        .with_duration(lease_duration.max(2))
        .with_grace((lease_duration / 3).max(1))
        .build()
        .await
        .map_err(|source| AppError::Lease { namespace, source })?;
    let (mut is_leader, lease_task) = manager.watch().await;
    metrics.set_ready();
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    while stand_by(&mut is_leader, &shutdown).await? {
        lead_while_elected(&client, &leading, &metrics, &is_leader, &shutdown).await;
    }
    info!("shutting down");
    // Dropping the receiver makes the lease task release the lease, so a
    // standby takes over at once.
    drop(is_leader);
    let _ = tokio::time::timeout(Duration::from_secs(5), lease_task).await;
    Ok(())
}

/// Cancels `shutdown` on SIGTERM or Ctrl-C.
async fn cancel_on_signal(shutdown: CancellationToken) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let term = async {
        match term.as_mut() {
            Some(t) => {
                t.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    shutdown.cancel();
}

/// Waits until this replica holds the lease (true) or shuts down (false).
async fn stand_by(
    is_leader: &mut watch::Receiver<bool>,
    shutdown: &CancellationToken,
) -> Result<bool, AppError> {
    while !*is_leader.borrow_and_update() {
        tokio::select! {
            changed = is_leader.changed() => changed.map_err(|_| AppError::ElectionStopped)?,
            _ = shutdown.cancelled() => return Ok(false),
        }
    }
    Ok(!shutdown.is_cancelled())
}

/// Runs what the leader runs until leadership ends or the operator shuts
/// down; what fails to start is started again after [`LEAD_RETRY`].
async fn lead_while_elected(
    client: &kube::Client,
    leading: &Arc<Leading>,
    metrics: &Arc<Metrics>,
    is_leader: &watch::Receiver<bool>,
    shutdown: &CancellationToken,
) {
    info!("elected leader");
    metrics.leader.set(1);
    let term = shutdown.child_token();
    let lost = tokio::spawn(cancel_when_lost(is_leader.clone(), term.clone()));
    while !term.is_cancelled() {
        let mut task = tokio::spawn(lead(
            client.clone(),
            leading.clone(),
            metrics.clone(),
            term.clone(),
        ));
        tokio::select! {
            _ = term.cancelled() => stop_in_time(task).await,
            done = &mut task => {
                match done {
                    Ok(Ok(())) => warn!("the controllers stopped; starting them again"),
                    Ok(Err(e)) => error!(error = %e, "the leader's controllers failed; starting them again in 5s"),
                    Err(e) => error!(error = %e, "the leader's controllers panicked; starting them again in 5s"),
                }
                tokio::select! {
                    _ = term.cancelled() => {}
                    _ = tokio::time::sleep(LEAD_RETRY) => {}
                }
            }
        }
    }
    if !shutdown.is_cancelled() {
        warn!("lost the leader lease; standing by");
    }
    lost.abort();
    metrics.leader.set(0);
}

/// Cancels `term` once this replica no longer holds the lease.
async fn cancel_when_lost(mut is_leader: watch::Receiver<bool>, term: CancellationToken) {
    while *is_leader.borrow_and_update() {
        if is_leader.changed().await.is_err() {
            break;
        }
    }
    term.cancel();
}

/// Gives the controllers [`CONTROLLER_STOP_TIMEOUT`] to finish their
/// running reconciles, then cuts them off, which is safe: every write is a
/// compare-and-swap or an idempotent patch, as for a replica that is killed.
async fn stop_in_time(mut task: JoinHandle<Result<(), AppError>>) {
    match tokio::time::timeout(CONTROLLER_STOP_TIMEOUT, &mut task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => warn!(error = %e, "controllers stopped with an error"),
        Ok(Err(e)) => warn!(error = %e, "controllers panicked"),
        Err(_) => {
            warn!(timeout = ?CONTROLLER_STOP_TIMEOUT, "controllers did not stop in time; cutting them off");
            task.abort();
        }
    }
}

/// Tasks aborted when the leader's term ends.
#[derive(Debug, Default)]
struct Background(Vec<JoinHandle<()>>);

impl Background {
    fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.0.push(tokio::spawn(task));
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.0.iter().for_each(JoinHandle::abort);
    }
}

/// The CA as the leader shares it: the roots, and a signal on every change
/// of them (rotation or reload) for what serves certificates they sign.
#[derive(Debug, Clone)]
struct SharedCa {
    ca: Arc<RwLock<TrustDomainCa>>,
    changed: Arc<Notify>,
}

/// Everything the leader runs, until `term` is cancelled or the identity
/// controller fails.
async fn lead(
    client: kube::Client,
    leading: Arc<Leading>,
    metrics: Arc<Metrics>,
    term: CancellationToken,
) -> Result<(), AppError> {
    let mut background = Background::default();
    let shared = start_ca(&client, &leading, &metrics, &mut background).await?;
    serve_bundle_endpoints(&leading, &shared, &metrics, &mut background);
    if let Some(cfg) = leading.spire.clone() {
        let (client, td) = (client.clone(), leading.trust_domain.clone());
        background.spawn(async move {
            if let Err(e) = spire_entries::run(client, cfg, td, Duration::from_secs(60)).await {
                error!(error = %e, "SPIRE registration stopped; workloads get no new SVIDs until the operator restarts");
            }
        });
    }
    background.spawn(run_signer(client.clone(), leading.clone(), shared));
    background.spawn(publish_leader_endpoints(client.clone(), leading.clone()));
    if let Some(cfg) = leading.agents.clone() {
        background.spawn(crate::deploy::agents::run(client.clone(), cfg));
    }
    run_controllers(client, &leading, metrics, term).await
}

/// The policy compiler, the federation controller and the identity
/// controller, until `term` is cancelled or the identity controller fails.
async fn run_controllers(
    client: kube::Client,
    leading: &Leading,
    metrics: Arc<Metrics>,
    term: CancellationToken,
) -> Result<(), AppError> {
    let controllers = term.child_token();
    let preview = Arc::new(Preview::default());
    let policies = tokio::spawn(crate::policy::run(
        client.clone(),
        metrics.clone(),
        preview.clone(),
        controllers.clone().cancelled_owned(),
    ));
    let federation = crate::federation::controller::FederationConfig {
        own: leading.trust_domain.clone(),
        namespace: leading.ca.namespace.clone(),
    };
    let federating = tokio::spawn(crate::federation::controller::run(
        client.clone(),
        federation,
        metrics.clone(),
        controllers.clone().cancelled_owned(),
    ));
    let result = crate::identity::run(
        client,
        leading.trust_domain.clone(),
        metrics,
        leading.release_grace,
        Some(preview),
        controllers.clone().cancelled_owned(),
    )
    .await;
    controllers.cancel();
    if let Err(e) = federating.await {
        error!(error = %e, "the federation controller panicked");
    }
    match policies.await {
        Ok(Err(e)) => error!(error = %e, "the policy compiler failed"),
        Err(e) => error!(error = %e, "the policy compiler panicked"),
        Ok(Ok(())) => {}
    }
    Ok(result?)
}

/// Loads (or creates) the CA, publishes its bundle, and keeps both current:
/// an hourly rotation check, and the roots Secret followed so changes made
/// under the operator (a root an administrator removed, another replica's
/// rotation) apply at once.
async fn start_ca(
    client: &kube::Client,
    leading: &Leading,
    metrics: &Arc<Metrics>,
    background: &mut Background,
) -> Result<SharedCa, AppError> {
    let cfg = leading.ca.clone();
    let ca = TrustDomainCa::load_or_create(client, &cfg, OffsetDateTime::now_utc()).await?;
    ca.publish_bundle(client, &cfg, OffsetDateTime::now_utc())
        .await?;
    metrics.ca_roots.set(ca.roots().len() as i64);
    info!(trust_domain = %leading.trust_domain, roots = ca.roots().len(), "trust-domain CA ready; bundle published");
    let shared = SharedCa {
        ca: Arc::new(RwLock::new(ca)),
        changed: Arc::new(Notify::new()),
    };
    background.spawn(rotate_hourly(
        client.clone(),
        cfg.clone(),
        metrics.clone(),
        shared.clone(),
    ));
    let (metrics, changed) = (metrics.clone(), shared.changed.clone());
    background.spawn(crate::ca::authority::follow_secret(
        client.clone(),
        cfg,
        shared.ca.clone(),
        move |ca| {
            metrics.ca_roots.set(ca.roots().len() as i64);
            changed.notify_waiters();
        },
    ));
    Ok(shared)
}

/// Rotates the roots when due (checked hourly: root lifetimes are months)
/// and publishes the new bundle.
async fn rotate_hourly(
    client: kube::Client,
    cfg: CaConfig,
    metrics: Arc<Metrics>,
    shared: SharedCa,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tick.tick().await;
        let now = OffsetDateTime::now_utc();
        let mut ca = shared.ca.write().await;
        match ca.rotate_if_due(&client, &cfg, now).await {
            Ok(true) => {
                info!(roots = ca.roots().len(), "CA roots rotated");
                metrics.ca_roots.set(ca.roots().len() as i64);
                if let Err(e) = ca.publish_bundle(&client, &cfg, now).await {
                    error!(error = %e, "cannot publish the rotated bundle; agents keep the old one; retrying next hour");
                }
                shared.changed.notify_waiters();
            }
            Ok(false) => {}
            Err(e) => error!(error = %e, "CA rotation check failed; retrying next hour"),
        }
    }
}

/// Serves the bundle endpoint's profiles that are configured.
fn serve_bundle_endpoints(
    leading: &Leading,
    shared: &SharedCa,
    metrics: &Arc<Metrics>,
    background: &mut Background,
) {
    let source = endpoint::Source {
        ca: shared.ca.clone(),
        refresh_hint: leading.endpoint.refresh_hint,
        metrics: metrics.clone(),
    };
    if let Some(addr) = leading.endpoint.spiffe_addr {
        let (td, source, changed) = (
            leading.trust_domain.clone(),
            source.clone(),
            shared.changed.clone(),
        );
        background.spawn(keep_serving(addr, "https_spiffe", move |listener| {
            endpoint::run_spiffe(listener, td.clone(), source.clone(), changed.clone())
        }));
    }
    if let Some((addr, cert, key)) = leading.endpoint.web.clone() {
        background.spawn(keep_serving(addr, "https_web", move |listener| {
            endpoint::run_web(listener, cert.clone(), key.clone(), source.clone())
        }));
    }
}

/// Serves one profile of the bundle endpoint, binding again after a
/// failure, until the task is aborted.
async fn keep_serving<F, Fut>(addr: SocketAddr, profile: &'static str, run: F)
where
    F: Fn(tokio::net::TcpListener) -> Fut,
    Fut: Future<Output = Result<(), endpoint::EndpointError>>,
{
    loop {
        match endpoint::bind(addr).await {
            Ok(listener) => {
                info!(%addr, profile, "bundle endpoint listening");
                if let Err(e) = run(listener).await {
                    warn!(error = %e, profile, "bundle endpoint stopped; retrying in 10s");
                }
            }
            Err(e) => warn!(error = %e, profile, "retrying in 10s"),
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}

/// Serves the signer, restarting it with a fresh serving certificate after
/// every change of the roots, until the task is aborted.
async fn run_signer(client: kube::Client, leading: Arc<Leading>, shared: SharedCa) {
    let service = SignerService::new(client, leading.signer.clone(), shared.ca.clone());
    loop {
        let issued = signer::server_identity(
            &*shared.ca.read().await,
            &leading.trust_domain,
            &leading.signer_dns,
        );
        let identity = match issued {
            Ok(identity) => identity,
            Err(e) => {
                error!(error = %e, "cannot issue the signer's certificate; agents get no SVIDs; retrying in 10s");
                tokio::time::sleep(Duration::from_secs(10)).await;
                continue;
            }
        };
        let changed = shared.changed.clone();
        let stop = async move { changed.notified().await };
        match signer::serve(leading.signer_addr, service.clone(), identity, stop).await {
            Ok((bound, task)) => {
                info!(%bound, "signing service listening");
                match task.await {
                    Ok(Ok(())) => info!(
                        "restarting the signing service with a certificate from the new roots"
                    ),
                    Ok(Err(e)) => warn!(error = %e, "signing service failed; restarting"),
                    Err(e) => warn!(error = %e, "signing service panicked; restarting"),
                }
            }
            Err(e) => {
                error!(error = %e, "cannot start the signing service; retrying in 10s");
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        }
    }
}

/// Points the leader's Services at this replica, retrying until it holds.
async fn publish_leader_endpoints(client: kube::Client, leading: Arc<Leading>) {
    let Some(replica) = leading.replica.clone() else {
        return;
    };
    let services = leading.services();
    loop {
        match endpoints::publish(&client, &leading.ca.namespace, &services, &replica).await {
            Ok(()) => {
                info!(ip = %replica.pod_ip, "the signer and bundle endpoint Services point at this replica");
                return;
            }
            Err(e) => {
                warn!(error = %e, "cannot point the Services at the leader; retrying in 5s");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
}
