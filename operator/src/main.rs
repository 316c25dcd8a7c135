//! `tessera-operator`: reconciles Tessera's CRDs. Today it prints the CRDs it
//! serves and checks that a cluster has them installed; the controllers come
//! with the identity issue.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use kube::config::{KubeConfigOptions, Kubeconfig};
use tessera_api::crd::installed::{self, CrdState};

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
    }
}
