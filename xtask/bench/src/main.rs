//! `tessera-bench <name>`: Tessera's benchmark families, each writing
//! `target/bench/<name>.json` and printing its figures as a table. Run it
//! through `cargo xtask bench <name>`, which first installs what the
//! benchmarks need (this crate links the eBPF programs, which need clang-16
//! to build, so it is not part of the xtask binary).
#![forbid(unsafe_code)]

mod controlplane;
mod datapath;
mod handshake;
mod identity;
mod report;
mod restart;
mod system;
mod waypoint;

use anyhow::{Result, bail};
use clap::Parser;

#[derive(Parser)]
#[command(name = "tessera-bench", about = "Tessera's benchmarks")]
struct Cli {
    /// Which benchmark: controlplane, identity, auth, auth-cluster, restart or
    /// waypoint.
    name: String,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(&cli.name))
}

/// Runs the benchmark family `name` and writes its report.
async fn run(name: &str) -> Result<()> {
    let figures = match name {
        "controlplane" => controlplane::run().await?,
        "identity" => identity::run().await?,
        "auth" => handshake::run().await?,
        // The part of `auth` that runs a cluster (first connection, policy
        // to maps, agent memory).
        "auth-cluster" => {
            let (operator, agent) = system::release_bins()?;
            datapath::run(&operator, &agent).await?
        }
        "restart" => {
            let (operator, agent) = system::release_bins()?;
            restart::run(&operator, &agent).await?
        }
        "waypoint" => {
            let (operator, agent) = system::release_bins()?;
            waypoint::run(&operator, &agent).await?
        }
        other => bail!(
            "unknown benchmark {other:?}; available: controlplane, identity, auth, auth-cluster, restart, waypoint"
        ),
    };
    report::report(name, &figures)
}
