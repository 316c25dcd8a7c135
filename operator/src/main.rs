//! `tessera-operator`: reconciles Tessera's CRDs. `run` keeps the trust-domain
//! CA and its published bundle, and gives every pod its SPIFFE ID and numeric
//! identity; `crds` prints the CRDs; `check` verifies a cluster has them.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use kube::config::{KubeConfigOptions, Kubeconfig};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kube_lease_manager::LeaseManagerBuilder;
use tessera_operator::metrics::{self, Metrics};

use tessera_api::crd::installed::{self, CrdState};
use tessera_api::names;
use tessera_api::spiffe::TrustDomain;
use tessera_operator::ca::{CaConfig, TrustDomainCa};
use tessera_operator::signer::{self, SignerConfig, SignerService};
use tessera_operator::{bundle_endpoint, identity, leader_endpoints, spire_entries};
use time::OffsetDateTime;
use tokio::sync::{Notify, RwLock};
use tracing::{info, warn};

#[derive(Parser)]
#[command(name = "tessera-operator", version, about = "Tessera operator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions this build serves, as YAML.
    Crds,
    /// Connect to the cluster and check that every Tessera CRD is installed,
    /// Established and at the expected version. Exits 1 when one is not.
    Check {
        /// Kubeconfig to use; without it, $KUBECONFIG, ~/.kube/config or the
        /// in-cluster service account.
        #[arg(long, env = "KUBECONFIG")]
        kubeconfig: Option<PathBuf>,
    },
    /// Run the controllers until SIGTERM or Ctrl-C. Replicas elect a leader
    /// through a Lease; only the leader reconciles, the others stand by.
    Run(Box<RunArgs>),
    /// Print the SPIRE registration plan (entries to create, update and
    /// delete for the pods now running) without changing anything: the
    /// dry run of `run --svid-source spire`.
    SpirePlan {
        /// Kubeconfig to use (see `check`).
        #[arg(long, env = "KUBECONFIG")]
        kubeconfig: Option<PathBuf>,
        /// The trust domain (the SPIRE server's).
        #[arg(long, env = "TESSERA_TRUST_DOMAIN")]
        trust_domain: String,
        #[command(flatten)]
        spire: SpireArgs,
    },
    /// Measure signing on one thread with an in-memory root: X.509-SVIDs
    /// (CSR parsed, leaf built and signed) and JWT-SVIDs per second, as JSON.
    /// Used by `cargo xtask bench identity`.
    #[command(hide = true)]
    BenchSign {
        /// Seconds to spend on each kind.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
    },
}

/// Signs for `seconds` per kind on this thread; prints `{"x509_per_sec":..,"jwt_per_sec":..}`.
fn bench_sign(seconds: f64) -> Result<ExitCode> {
    use std::time::Instant;
    let td: TrustDomain = "bench.test".parse()?;
    let now = OffsetDateTime::now_utc();
    let root = tessera_operator::ca::new_root(&td, now, Duration::from_secs(86400))?;
    let ca = TrustDomainCa::in_memory(vec![root]);
    let id: tessera_api::spiffe::SpiffeId = "spiffe://bench.test/ns/shop/sa/web".parse()?;
    // Requests as agents send them: a CSR over a fresh key each.
    let csrs = (0..64)
        .map(|_| -> Result<Vec<u8>> {
            let key = rcgen::KeyPair::generate()?;
            Ok(rcgen::CertificateParams::default()
                .serialize_request(&key)?
                .der()
                .to_vec())
        })
        .collect::<Result<Vec<_>>>()?;
    let budget = Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let mut x509 = 0u64;
    while start.elapsed() < budget {
        let csr = &csrs[x509 as usize % csrs.len()];
        signer::sign_x509_svid(&ca, &id, csr, Duration::from_secs(3600), now)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        x509 += 1;
    }
    let x509_rate = x509 as f64 / start.elapsed().as_secs_f64();
    let (_, key) = ca.active_jwt(now)?;
    let start = Instant::now();
    let mut jwt = 0u64;
    while start.elapsed() < budget {
        key.sign(&tessera_api::jwt::Claims {
            sub: id.clone(),
            aud: vec!["db".to_owned()],
            exp: now.unix_timestamp() + 300,
            iat: now.unix_timestamp(),
        })?;
        jwt += 1;
    }
    let jwt_rate = jwt as f64 / start.elapsed().as_secs_f64();
    println!("{{\"x509_per_sec\":{x509_rate:.1},\"jwt_per_sec\":{jwt_rate:.1}}}");
    Ok(ExitCode::SUCCESS)
}

async fn client(kubeconfig: Option<PathBuf>) -> Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(&path)
                .with_context(|| format!("cannot read kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?
        }
        None => kube::Config::infer()
            .await
            .context("no kubeconfig found and not running in a cluster; pass --kubeconfig")?,
    };
    Ok(kube::Client::try_from(config)?)
}

async fn check(kubeconfig: Option<PathBuf>) -> Result<ExitCode> {
    let client = client(kubeconfig).await?;
    let version = client.apiserver_version().await.context(
        "cannot reach the API server; check the kubeconfig's server address and credentials",
    )?;
    println!("API server {}", version.git_version);
    let mut ok = true;
    for (name, state) in installed::check(&client).await? {
        ok &= state == CrdState::Ready;
        println!("{name}: {state}");
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Options of `tessera-operator run`.
#[derive(clap::Args)]
struct RunArgs {
    /// Kubeconfig to use (see `check`).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// The trust domain this cluster's identities belong to.
    #[arg(long, env = "TESSERA_TRUST_DOMAIN")]
    trust_domain: String,
    /// Namespace for the CA Secret, the trust bundle ConfigMap and the Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "tessera-system")]
    namespace: String,
    /// Where to serve /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:9090")]
    metrics_addr: SocketAddr,
    /// Leader lease duration in seconds; a standby takes over this long
    /// after a leader stops renewing (at once when it shuts down cleanly).
    #[arg(long, default_value_t = 15)]
    lease_duration: u64,
    /// Where the signing service listens (TLS; name tessera-signer.<namespace>.svc).
    #[arg(long, default_value = "0.0.0.0:8443")]
    signer_addr: SocketAddr,
    /// The node agents' service account in --namespace; only it may get SVIDs.
    #[arg(long, default_value = "tessera-agent")]
    agent_service_account: String,
    /// Lifetime of X.509-SVIDs, in seconds.
    #[arg(long, default_value_t = 3600)]
    svid_ttl_seconds: u64,
    /// Lifetime of JWT-SVIDs, in seconds (bearer tokens: keep it short).
    #[arg(long, default_value_t = 300)]
    jwt_svid_ttl_seconds: u64,
    /// How long a numeric identity no pod uses is kept before it is released
    /// (a pod of the same SPIFFE ID arriving meanwhile keeps it), in seconds.
    #[arg(long, default_value_t = 30)]
    identity_release_grace_seconds: u64,
    /// Serve the trust domain's SPIFFE bundle endpoint with the https_spiffe
    /// profile on this address (the endpoint presents an X509-SVID for
    /// spiffe://<trust domain>/tessera/bundle-endpoint). Off when unset.
    #[arg(long)]
    bundle_endpoint_addr: Option<SocketAddr>,
    /// Serve the bundle endpoint with the https_web profile on this address,
    /// presenting the certificate in --bundle-endpoint-web-cert. Off when unset.
    #[arg(long, requires_all = ["bundle_endpoint_web_cert", "bundle_endpoint_web_key"])]
    bundle_endpoint_web_addr: Option<SocketAddr>,
    /// PEM certificate chain (leaf first) for the https_web bundle endpoint;
    /// reloaded when it changes.
    #[arg(long)]
    bundle_endpoint_web_cert: Option<PathBuf>,
    /// PEM private key of --bundle-endpoint-web-cert.
    #[arg(long)]
    bundle_endpoint_web_key: Option<PathBuf>,
    /// `spiffe_refresh_hint` of the served bundle: how often federated
    /// trust domains should fetch it, in seconds.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86400))]
    bundle_refresh_hint_seconds: u64,
    /// Where workload SVIDs come from: `builtin` (this operator's CA) or
    /// `spire` (this operator registers workload identities in the SPIRE
    /// server, whose agents issue them; the trust domain must be SPIRE's).
    #[arg(long, value_enum, default_value = "builtin")]
    svid_source: SvidSource,
    /// This replica's pod (from the downward API). With --pod-ip, the
    /// leader points the signer's and bundle endpoint's Services at itself.
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    /// This replica's pod address (from the downward API).
    #[arg(long, env = "POD_IP", requires = "pod_name")]
    pod_ip: Option<std::net::IpAddr>,
    /// Run the node agents: the leader keeps the agent DaemonSet, with this
    /// image, applied in --namespace and reports on it whether Pod Security
    /// admits its pods (OLM installs, which give the image as
    /// RELATED_IMAGE_AGENT). Off when unset: `deploy/` ships the DaemonSet.
    #[arg(long, env = "RELATED_IMAGE_AGENT")]
    agent_image: Option<String>,
    /// The nodes' pod cgroup root, for the agents the operator runs (OLM
    /// installs set it through the Subscription's `config.env`).
    #[arg(
        long,
        env = "TESSERA_AGENT_CGROUP_ROOT",
        default_value = "/sys/fs/cgroup/kubepods.slice"
    )]
    agent_cgroup_root: String,
    /// How often the leader applies the agent DaemonSet again and checks
    /// its Pod Security condition, in seconds.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    agent_recheck_seconds: u64,
    #[command(flatten)]
    spire: SpireArgs,
}

/// Where workload SVIDs come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SvidSource {
    /// The operator's own CA.
    Builtin,
    /// A SPIRE server.
    Spire,
}

/// SPIRE registration settings.
#[derive(Debug, Clone, clap::Args)]
struct SpireArgs {
    /// The SPIRE server's API socket.
    #[arg(long, default_value = "/tmp/spire-server/private/api.sock")]
    spire_server_socket: PathBuf,
    /// Registration entries this operator creates get IDs starting with this;
    /// it only ever changes or deletes entries whose ID does.
    #[arg(long, default_value = "tessera-")]
    spire_entry_id_prefix: String,
    /// Parent ID of a node's entries: the SPIFFE ID of that node's SPIRE
    /// agent, or of a node alias matching only it ({trustDomain},
    /// {nodeName}). A Node annotated tessera.dev/spire-agent-id uses that.
    #[arg(long, default_value = "spiffe://{trustDomain}/tessera/node/{nodeName}")]
    spire_parent_id_template: String,
    /// Log the registration plan instead of applying it.
    #[arg(long)]
    spire_dry_run: bool,
}

impl SpireArgs {
    fn config(&self, dry_run: bool) -> spire_entries::SpireConfig {
        spire_entries::SpireConfig {
            socket: self.spire_server_socket.clone(),
            id_prefix: self.spire_entry_id_prefix.clone(),
            parent_template: self.spire_parent_id_template.clone(),
            dry_run: dry_run || self.spire_dry_run,
        }
    }
}

/// `spire-plan`: one dry-run pass, printed.
async fn spire_plan(
    kubeconfig: Option<PathBuf>,
    trust_domain: String,
    spire: SpireArgs,
) -> Result<ExitCode> {
    use k8s_openapi::api::core::v1::Node;
    use tessera_api::crd::{PodIdentity, WorkloadIdentity};
    let trust_domain: TrustDomain = trust_domain.parse().with_context(|| {
        format!("--trust-domain {trust_domain:?} is not a SPIFFE trust domain name")
    })?;
    let cfg = spire.config(true);
    cfg.validate()?;
    let client = client(kubeconfig).await?;
    async fn all<K>(client: &kube::Client) -> Result<Vec<Arc<K>>>
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
        K::DynamicType: Default,
    {
        Ok(kube::Api::<K>::all(client.clone())
            .list(&kube::api::ListParams::default())
            .await?
            .items
            .into_iter()
            .map(Arc::new)
            .collect())
    }
    let pods: Vec<Arc<PodIdentity>> = all(&client).await?;
    let wids: Vec<Arc<WorkloadIdentity>> = all(&client).await?;
    let parents = all::<Node>(&client)
        .await?
        .into_iter()
        .map(|n| Node::clone(&n))
        .filter_map(|n| {
            let parent = n
                .metadata
                .annotations?
                .remove(spire_entries::PARENT_ANNOTATION)?;
            Some((n.metadata.name?, parent))
        })
        .collect();
    let (plan, _) =
        spire_entries::sync_once(&cfg, &trust_domain, &pods, &wids, &parents, &mut None).await?;
    for line in plan.lines() {
        println!("{line}");
    }
    println!(
        "{} to create, {} to update, {} to delete; {} entries of other owners left alone",
        plan.create.len(),
        plan.update.len(),
        plan.delete.len(),
        plan.foreign
    );
    Ok(ExitCode::SUCCESS)
}

/// How long running reconciles get to finish when leadership ends.
const CONTROLLER_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Resolves on SIGTERM or Ctrl-C.
async fn terminated() {
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
}

/// What the leader needs besides the client.
struct Leading {
    trust_domain: TrustDomain,
    ca: CaConfig,
    signer: SignerConfig,
    signer_addr: SocketAddr,
    signer_dns: Vec<String>,
    release_grace: Duration,
    endpoint: EndpointArgs,
    spire: Option<spire_entries::SpireConfig>,
    /// This replica, when it runs as a pod whose Services it backs.
    replica: Option<leader_endpoints::Replica>,
    /// The node agents, when the operator runs them.
    agents: Option<tessera_operator::agent_daemonset::AgentConfig>,
}

impl Leading {
    /// The Services the leader backs: the signer's, and the bundle
    /// endpoint's when it is served.
    fn services(&self) -> Vec<leader_endpoints::LeaderService> {
        let signer = leader_endpoints::LeaderService {
            name: names::SIGNER_SERVICE,
            port: self.signer_addr.port(),
        };
        let endpoint = self
            .endpoint
            .spiffe_addr
            .map(|addr| leader_endpoints::LeaderService {
                name: names::BUNDLE_ENDPOINT_SERVICE,
                port: addr.port(),
            });
        std::iter::once(signer).chain(endpoint).collect()
    }
}

/// Points the leader's Services at this replica, retrying until it holds.
async fn publish_leader_endpoints(client: kube::Client, leading: Arc<Leading>) {
    let Some(replica) = leading.replica.clone() else {
        return;
    };
    let services = leading.services();
    loop {
        match leader_endpoints::publish(&client, &leading.ca.namespace, &services, &replica).await {
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

/// Where and how the bundle endpoint is served.
#[derive(Debug, Clone)]
struct EndpointArgs {
    spiffe_addr: Option<SocketAddr>,
    web: Option<(SocketAddr, PathBuf, PathBuf)>,
    refresh_hint: Duration,
}

/// Serves one profile of the bundle endpoint, binding again after a
/// failure, until the task is aborted.
async fn keep_serving<F, Fut>(addr: SocketAddr, profile: &str, run: F)
where
    F: Fn(tokio::net::TcpListener) -> Fut,
    Fut: std::future::Future<Output = Result<(), bundle_endpoint::EndpointError>>,
{
    loop {
        match bundle_endpoint::bind(addr).await {
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
/// every root rotation (`rotated`), until the task is aborted.
async fn run_signer(
    client: kube::Client,
    leading: Arc<Leading>,
    ca: Arc<RwLock<TrustDomainCa>>,
    rotated: Arc<Notify>,
) {
    let service = SignerService::new(client, leading.signer.clone(), ca.clone());
    loop {
        let identity = match signer::server_identity(
            &*ca.read().await,
            &leading.trust_domain,
            &leading.signer_dns,
        ) {
            Ok(identity) => identity,
            Err(e) => {
                warn!(error = %e, "cannot issue the signer's certificate; retrying in 10s");
                tokio::time::sleep(Duration::from_secs(10)).await;
                continue;
            }
        };
        let stop = {
            let rotated = rotated.clone();
            async move { rotated.notified().await }
        };
        match signer::serve(leading.signer_addr, service.clone(), identity, stop).await {
            Ok((bound, task)) => {
                info!(%bound, "signing service listening");
                match task.await {
                    Ok(Ok(())) => {
                        info!("restarting the signing service with a certificate from the new root")
                    }
                    Ok(Err(e)) => warn!(error = %e, "signing service failed; restarting"),
                    Err(e) => warn!(error = %e, "signing service panicked; restarting"),
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot start the signing service; retrying in 10s");
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        }
    }
}

/// Everything the leader runs: CA upkeep, the signing service and the
/// identity controllers, until `stop` resolves.
async fn lead(
    client: kube::Client,
    leading: Arc<Leading>,
    metrics: Arc<Metrics>,
    stop: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> Result<()> {
    let cfg = leading.ca.clone();
    let ca = TrustDomainCa::load_or_create(&client, &cfg, OffsetDateTime::now_utc()).await?;
    ca.publish_bundle(&client, &cfg, OffsetDateTime::now_utc())
        .await?;
    metrics.ca_roots.set(ca.roots().len() as i64);
    info!(trust_domain = %leading.trust_domain, roots = ca.roots().len(), "trust-domain CA ready; bundle published");
    let ca = Arc::new(RwLock::new(ca));
    let rotated = Arc::new(Notify::new());
    let rotation = {
        let (client, metrics, ca, rotated) =
            (client.clone(), metrics.clone(), ca.clone(), rotated.clone());
        tokio::spawn(async move {
            // Root lifetimes are months; checking hourly is plenty.
            let mut tick = tokio::time::interval(Duration::from_secs(3600));
            loop {
                tick.tick().await;
                let now = OffsetDateTime::now_utc();
                let mut ca = ca.write().await;
                match ca.rotate_if_due(&client, &cfg, now).await {
                    Ok(true) => {
                        info!(roots = ca.roots().len(), "CA roots rotated");
                        metrics.ca_roots.set(ca.roots().len() as i64);
                        if let Err(e) = ca.publish_bundle(&client, &cfg, now).await {
                            warn!(error = %e, "cannot publish the rotated bundle; retrying next hour");
                        }
                        rotated.notify_waiters();
                    }
                    Ok(false) => {}
                    Err(e) => warn!(error = %e, "CA rotation check failed; retrying next hour"),
                }
            }
        })
    };
    // Changes to the roots Secret made under the operator (a root removed
    // by an administrator, another replica's rotation) are picked up at once.
    let following = {
        let (metrics, rotated) = (metrics.clone(), rotated.clone());
        tokio::spawn(tessera_operator::ca::follow_secret(
            client.clone(),
            leading.ca.clone(),
            ca.clone(),
            move |ca| {
                metrics.ca_roots.set(ca.roots().len() as i64);
                rotated.notify_waiters();
            },
        ))
    };
    let source = bundle_endpoint::Source {
        ca: ca.clone(),
        refresh_hint: leading.endpoint.refresh_hint,
        metrics: metrics.clone(),
    };
    let mut endpoints = Vec::new();
    if let Some(addr) = leading.endpoint.spiffe_addr {
        let (td, source, rotated) = (
            leading.trust_domain.clone(),
            source.clone(),
            rotated.clone(),
        );
        endpoints.push(tokio::spawn(async move {
            keep_serving(addr, "https_spiffe", |listener| {
                bundle_endpoint::run_spiffe(listener, td.clone(), source.clone(), rotated.clone())
            })
            .await
        }));
    }
    if let Some((addr, cert, key)) = leading.endpoint.web.clone() {
        endpoints.push(tokio::spawn(async move {
            keep_serving(addr, "https_web", |listener| {
                bundle_endpoint::run_web(listener, cert.clone(), key.clone(), source.clone())
            })
            .await
        }));
    }
    let registering = leading.spire.clone().map(|cfg| {
        let (client, td) = (client.clone(), leading.trust_domain.clone());
        tokio::spawn(async move {
            if let Err(e) = spire_entries::run(client, cfg, td, Duration::from_secs(60)).await {
                warn!(error = %e, "SPIRE registration stopped");
            }
        })
    });
    let signing = tokio::spawn(run_signer(client.clone(), leading.clone(), ca, rotated));
    let pointing = tokio::spawn(publish_leader_endpoints(client.clone(), leading.clone()));
    let running_agents = leading
        .agents
        .clone()
        .map(|cfg| tokio::spawn(tessera_operator::agent_daemonset::run(client.clone(), cfg)));
    let (stop_policy, policy_stopped) = tokio::sync::oneshot::channel::<()>();
    let preview = Arc::new(tessera_operator::policy::Preview::default());
    let policies = tokio::spawn(tessera_operator::policy::run(
        client.clone(),
        metrics.clone(),
        preview.clone(),
        async move {
            let _ = policy_stopped.await;
        },
    ));
    let (stop_federation, federation_stopped) = tokio::sync::oneshot::channel::<()>();
    let federating = tokio::spawn(tessera_operator::federation::run(
        client.clone(),
        tessera_operator::federation::FederationConfig {
            own: leading.trust_domain.clone(),
            namespace: leading.ca.namespace.clone(),
        },
        metrics.clone(),
        async move {
            let _ = federation_stopped.await;
        },
    ));
    let result = identity::run(
        client,
        leading.trust_domain.clone(),
        metrics,
        leading.release_grace,
        Some(preview),
        stop,
    )
    .await;
    let _ = stop_policy.send(());
    let _ = stop_federation.send(());
    if let Err(e) = federating.await {
        warn!(error = %e, "the federation controller panicked");
    }
    match policies.await {
        Ok(Err(e)) => warn!(error = %e, "the policy compiler failed"),
        Err(e) => warn!(error = %e, "the policy compiler panicked"),
        Ok(Ok(())) => {}
    }
    rotation.abort();
    following.abort();
    for endpoint in endpoints {
        endpoint.abort();
    }
    if let Some(registering) = registering {
        registering.abort();
    }
    signing.abort();
    pointing.abort();
    if let Some(running_agents) = running_agents {
        running_agents.abort();
    }
    Ok(result?)
}

async fn run(args: RunArgs) -> Result<ExitCode> {
    let RunArgs {
        kubeconfig,
        trust_domain,
        namespace,
        metrics_addr,
        lease_duration,
        signer_addr,
        agent_service_account,
        svid_ttl_seconds,
        jwt_svid_ttl_seconds,
        identity_release_grace_seconds,
        bundle_endpoint_addr,
        bundle_endpoint_web_addr,
        bundle_endpoint_web_cert,
        bundle_endpoint_web_key,
        bundle_refresh_hint_seconds,
        svid_source,
        pod_name,
        pod_ip,
        agent_image,
        agent_cgroup_root,
        agent_recheck_seconds,
        spire,
    } = args;
    let spire = match svid_source {
        SvidSource::Builtin => None,
        SvidSource::Spire => {
            let cfg = spire.config(false);
            cfg.validate()?;
            Some(cfg)
        }
    };
    let namespace = namespace.as_str();
    let trust_domain: TrustDomain = trust_domain.parse().with_context(|| {
        format!("--trust-domain {trust_domain:?} is not a SPIFFE trust domain name")
    })?;
    let client = client(kubeconfig).await?;
    let leading_cfg = Arc::new(Leading {
        trust_domain: trust_domain.clone(),
        ca: CaConfig::new(trust_domain.clone(), namespace),
        signer: SignerConfig {
            trust_domain: trust_domain.clone(),
            agent_username: format!("system:serviceaccount:{namespace}:{agent_service_account}"),
            svid_ttl: Duration::from_secs(svid_ttl_seconds),
            jwt_svid_ttl: Duration::from_secs(jwt_svid_ttl_seconds),
        },
        signer_addr,
        signer_dns: vec![
            names::SIGNER_SERVICE.to_owned(),
            format!("{}.{namespace}.svc", names::SIGNER_SERVICE),
        ],
        release_grace: Duration::from_secs(identity_release_grace_seconds),
        endpoint: EndpointArgs {
            spiffe_addr: bundle_endpoint_addr,
            web: match (
                bundle_endpoint_web_addr,
                bundle_endpoint_web_cert,
                bundle_endpoint_web_key,
            ) {
                (Some(addr), Some(cert), Some(key)) => Some((addr, cert, key)),
                _ => None,
            },
            refresh_hint: Duration::from_secs(bundle_refresh_hint_seconds),
        },
        spire,
        replica: pod_name
            .zip(pod_ip)
            .map(|(pod_name, pod_ip)| leader_endpoints::Replica { pod_name, pod_ip }),
        agents: agent_image.map(|image| tessera_operator::agent_daemonset::AgentConfig {
            image,
            namespace: namespace.to_owned(),
            cgroup_root: agent_cgroup_root,
            trust_domain: trust_domain.to_string(),
            recheck: Duration::from_secs(agent_recheck_seconds),
        }),
    });
    let metrics = Arc::new(Metrics::default());
    let (bound, _server) = metrics::serve(metrics_addr, metrics.clone())
        .await
        .with_context(|| format!("cannot listen on --metrics-addr {metrics_addr}"))?;
    info!(%bound, "serving /metrics, /healthz and /readyz");

    let manager = LeaseManagerBuilder::new(client.clone(), names::OPERATOR)
        .with_namespace(namespace)
        .with_duration(lease_duration.max(2))
        .with_grace((lease_duration / 3).max(1))
        .build()
        .await
        .with_context(|| format!("cannot set up the leader Lease in namespace {namespace}; does it exist, and may the operator manage leases there?"))?;
    let (mut is_leader, lease_task) = manager.watch().await;
    metrics.set_ready();
    let terminated = terminated();
    tokio::pin!(terminated);
    loop {
        // Stand by until this replica holds the lease.
        while !*is_leader.borrow_and_update() {
            tokio::select! {
                changed = is_leader.changed() => if changed.is_err() { bail!("the leader election task stopped") },
                _ = &mut terminated => {
                    info!("shutting down");
                    return Ok(ExitCode::SUCCESS);
                }
            }
        }
        info!("elected leader");
        metrics.leader.set(1);
        let (lost_tx, lost_rx) = tokio::sync::oneshot::channel::<()>();
        let mut watch_lost = is_leader.clone();
        let lost_watcher = tokio::spawn(async move {
            while *watch_lost.borrow_and_update() {
                if watch_lost.changed().await.is_err() {
                    break;
                }
            }
            let _ = lost_tx.send(());
        });
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let leading = tokio::spawn(lead(
            client.clone(),
            leading_cfg.clone(),
            metrics.clone(),
            async move {
                let _ = stop_rx.await;
            },
        ));
        let mut shutting_down = false;
        tokio::select! {
            _ = lost_rx => warn!("lost the leader lease; standing by"),
            _ = &mut terminated => shutting_down = true,
        }
        let _ = stop_tx.send(());
        lost_watcher.abort();
        // Controllers finish their running reconciles; one that does not stop
        // in time is cut off, which is safe: every write is a compare-and-swap
        // or an idempotent patch, as for a replica that is killed.
        let mut leading = leading;
        match tokio::time::timeout(CONTROLLER_STOP_TIMEOUT, &mut leading).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => warn!(error = %e, "controllers stopped with an error"),
            Ok(Err(e)) => warn!(error = %e, "controllers panicked"),
            Err(_) => {
                warn!(timeout = ?CONTROLLER_STOP_TIMEOUT, "controllers did not stop in time; cutting them off");
                leading.abort();
            }
        }
        metrics.leader.set(0);
        if shutting_down {
            info!("shutting down");
            // Dropping the receiver makes the lease task release the lease,
            // so a standby takes over at once.
            drop(is_leader);
            let _ = tokio::time::timeout(Duration::from_secs(5), lease_task).await;
            return Ok(ExitCode::SUCCESS);
        }
    }
}

#[tokio::main]
async fn main() -> Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Crds => {
            for crd in tessera_api::crd::all() {
                print!("---\n{}", tessera_api::crd::to_yaml(&crd)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { kubeconfig } => check(kubeconfig).await,
        Command::Run(args) => run(*args).await,
        Command::BenchSign { seconds } => bench_sign(seconds),
        Command::SpirePlan {
            kubeconfig,
            trust_domain,
            spire,
        } => spire_plan(kubeconfig, trust_domain, spire).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_flag_of_run_is_in_the_configuration_reference() {
        let cli = Cli::command();
        let run = cli.find_subcommand("run").expect("a run command");
        tessera_tests::docs::check_documented(
            "configuration.md",
            &tessera_tests::docs::long_flags(run),
        )
        .unwrap();
    }
}
