//! `tessera-operator`: reconciles Tessera's CRDs. `run` keeps the trust-domain
//! CA and its published bundle, and gives every pod its SPIFFE ID and numeric
//! identity; `crds` prints the CRDs; `check` verifies a cluster has them.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use kube::config::{KubeConfigOptions, Kubeconfig};
use std::time::Duration;

use tessera_api::crd::installed::{self, CrdState};
use tessera_api::spiffe::TrustDomain;
use tessera_operator::ca::{CaConfig, TrustDomainCa};
use tessera_operator::identity;
use time::OffsetDateTime;
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
    /// Run the controllers until SIGTERM or Ctrl-C.
    Run {
        /// Kubeconfig to use (see `check`).
        #[arg(long, env = "KUBECONFIG")]
        kubeconfig: Option<PathBuf>,
        /// The trust domain this cluster's identities belong to.
        #[arg(long, env = "TESSERA_TRUST_DOMAIN")]
        trust_domain: String,
        /// Namespace for the CA Secret and the trust bundle ConfigMap.
        #[arg(long, env = "POD_NAMESPACE", default_value = "tessera-system")]
        namespace: String,
    },
}

async fn run(kubeconfig: Option<PathBuf>, trust_domain: &str, namespace: &str) -> Result<ExitCode> {
    let trust_domain: TrustDomain = trust_domain.parse().with_context(|| {
        format!("--trust-domain {trust_domain:?} is not a SPIFFE trust domain name")
    })?;
    let client = client(kubeconfig).await?;
    let cfg = CaConfig::new(trust_domain.clone(), namespace);
    let mut ca = TrustDomainCa::load_or_create(&client, &cfg, OffsetDateTime::now_utc()).await?;
    ca.publish_bundle(&client, &cfg, OffsetDateTime::now_utc())
        .await?;
    info!(%trust_domain, roots = ca.roots().len(), "trust-domain CA ready; bundle published");
    let rotation = {
        let client = client.clone();
        tokio::spawn(async move {
            // Root lifetimes are months; checking hourly is plenty.
            let mut tick = tokio::time::interval(Duration::from_secs(3600));
            loop {
                tick.tick().await;
                let now = OffsetDateTime::now_utc();
                match ca.rotate_if_due(&client, &cfg, now).await {
                    Ok(true) => {
                        info!(roots = ca.roots().len(), "CA roots rotated");
                        if let Err(e) = ca.publish_bundle(&client, &cfg, now).await {
                            warn!(error = %e, "cannot publish the rotated bundle; retrying next hour");
                        }
                    }
                    Ok(false) => {}
                    Err(e) => warn!(error = %e, "CA rotation check failed; retrying next hour"),
                }
            }
        })
    };
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        info!("shutting down");
    };
    let result = identity::run(client, trust_domain, shutdown).await;
    rotation.abort();
    result?;
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
        Command::Run {
            kubeconfig,
            trust_domain,
            namespace,
        } => run(kubeconfig, &trust_domain, &namespace).await,
    }
}
