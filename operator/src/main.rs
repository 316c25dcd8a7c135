//! `tessera-operator`: reconciles Tessera's CRDs. `run` keeps the trust-domain
//! CA and its published bundle, and gives every pod its SPIFFE ID and numeric
//! identity; `crds` prints the CRDs; `check` verifies a cluster has them.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tessera_operator::app::{RunArgs, SpireArgs};
use tessera_operator::commands;

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
    #[cfg(feature = "bench")]
    #[command(hide = true)]
    BenchSign {
        /// Seconds to spend on each kind.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
    },
}

/// Prints `e` and fails; or succeeds when `ok`.
fn exit<E: std::fmt::Display>(context: &str, outcome: Result<bool, E>) -> ExitCode {
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("tessera-operator {context}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Prints the CRDs this build serves, as YAML.
fn print_crds() -> Result<bool, tessera_api::crd::CrdError> {
    for crd in tessera_api::crd::all() {
        print!("---\n{}", tessera_api::crd::to_yaml(&crd)?);
    }
    Ok(true)
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Crds => exit("crds", print_crds()),
        Command::Check { kubeconfig } => {
            exit("check", commands::check(kubeconfig.as_deref()).await)
        }
        Command::Run(args) => exit(
            "run",
            tessera_operator::app::run(*args).await.map(|()| true),
        ),
        #[cfg(feature = "bench")]
        Command::BenchSign { seconds } => exit(
            "bench-sign",
            tessera_operator::bench::sign(seconds).map(|json| {
                println!("{json}");
                true
            }),
        ),
        Command::SpirePlan {
            kubeconfig,
            trust_domain,
            spire,
        } => exit(
            "spire-plan",
            commands::spire_plan(kubeconfig.as_deref(), &trust_domain, &spire)
                .await
                .map(|()| true),
        ),
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
