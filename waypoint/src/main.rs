//! `tessera-waypoint`: the L7 proxy. Today it reads AuthPolicy manifests and
//! prints the HTTP rules it would enforce, with the same types the operator
//! uses; proxying comes with the L7 work.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use serde::Deserialize;
use tessera_api::crd::AuthPolicy;

#[derive(Parser)]
#[command(
    name = "tessera-waypoint",
    version,
    about = "Tessera waypoint (L7) proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the HTTP rules of the AuthPolicy objects in a YAML file.
    Rules {
        /// A file with one or more AuthPolicy documents.
        file: PathBuf,
    },
}

fn rules(file: &PathBuf) -> Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        let policy = AuthPolicy::deserialize(doc)
            .with_context(|| format!("{} document {}: not an AuthPolicy", file.display(), i + 1))?;
        let name = policy.metadata.name.as_deref().unwrap_or("<unnamed>");
        for (r, rule) in policy.spec.rules.iter().enumerate() {
            for http in &rule.http {
                println!(
                    "{name} rule {r}: {:?} {:?} methods {:?} paths {:?} headers {:?}",
                    policy.spec.action,
                    rule.ports
                        .iter()
                        .map(|p| (p.port, p.end_port))
                        .collect::<Vec<_>>(),
                    http.methods,
                    http.paths
                        .iter()
                        .map(|p| (p.match_type, p.value.as_str()))
                        .collect::<Vec<_>>(),
                    http.headers
                        .iter()
                        .map(|h| h.name.as_str())
                        .collect::<Vec<_>>()
                );
            }
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Rules { file } => rules(&file),
    }
}
