//! `tessera-agent`: the node agent. `run` gets SVIDs for this node's pods
//! from the operator's signing service and serves them on the Workload API;
//! with `--cgroup-root` it also runs the data path (eBPF programs and maps,
//! agent-to-agent handshakes, the auth cache). Smaller subcommands check
//! SPIFFE IDs and fetch SVIDs from a Workload API socket (debugging clients,
//! like `spire-agent api fetch`); hidden `bench-*` ones serve the benchmarks.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tessera_api::spiffe::SpiffeId;

#[derive(Parser)]
#[command(name = "tessera-agent", version, about = "Tessera node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure the ingress program's cost per packet with BPF_PROG_TEST_RUN
    /// and print it as JSON (for `cargo xtask bench auth`; needs root).
    #[cfg(feature = "bench")]
    #[command(hide = true)]
    BenchDatapath {
        /// Runs per scenario.
        #[arg(long, default_value_t = 1_000_000)]
        repeat: u32,
    },
    /// Measure agent handshakes (initiator and responder on one thread) for
    /// `seconds`, writing the certificates used into `dir` for the Go peer;
    /// prints JSON (for `cargo xtask bench auth`).
    #[cfg(feature = "bench")]
    #[command(hide = true)]
    BenchHandshake {
        /// Where the CA and SVIDs are written (PEM).
        #[arg(long)]
        dir: std::path::PathBuf,
        /// How long to measure.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
    },
    /// Measure an agent's restart at the handshake level: `local` x `remote`
    /// pairs authenticated from empty caches over one channel, each agent
    /// on a core of its own; prints JSON (for `cargo xtask bench auth`).
    #[cfg(feature = "bench")]
    #[command(hide = true)]
    BenchRestart {
        /// Where the auth caches are kept.
        #[arg(long)]
        dir: std::path::PathBuf,
        /// Local identities.
        #[arg(long, default_value_t = 100)]
        local: usize,
        /// Peer identities on the other agent.
        #[arg(long, default_value_t = 1000)]
        remote: usize,
    },
    /// Check SPIFFE IDs against the SPIFFE ID specification; prints each ID's
    /// trust domain and path, or exactly what is wrong. Exits 1 if any is invalid.
    ValidateId {
        /// The IDs to check.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Run the agent: get SVIDs for this node's pods from the operator's
    /// signing service and serve them on the Workload API socket.
    Run(Box<tessera_agent::app::RunArgs>),
    /// Fetch this process's X.509-SVIDs and bundles from a SPIFFE Workload API
    /// socket and print them. Exits 1 with the server's answer on failure.
    FetchX509 {
        /// The Workload API socket.
        #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET")]
        socket: String,
        /// Keep the stream open and print this many updates (rotations) first.
        #[arg(long)]
        updates: Option<usize>,
    },
    /// Fetch a JWT-SVID for the given audiences and the JWT bundles, have the
    /// agent validate the token (ValidateJWTSVID), and verify it offline too
    /// with the `spiffe` crate. Exits 1 if any step fails.
    FetchJwt {
        /// The Workload API socket.
        #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET")]
        socket: String,
        /// Audience (repeat for several); the first is validated.
        #[arg(long, required = true)]
        audience: Vec<String>,
    },
}

/// Runs `task` on a new runtime; prints its error and exits 1 on failure.
fn block_on<E: std::fmt::Display>(
    context: &str,
    task: impl std::future::Future<Output = Result<(), E>>,
) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{context}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Sets up logging for `run` (and bounds the allocator's arenas first).
fn init_agent_process() {
    // Before anything allocates much: on success this does not return.
    let unbounded = tessera_agent::arenas::limit();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Some(e) = unbounded {
        tracing::warn!(error = %e, "cannot start again with fewer allocator arenas; memory use may be higher (set GLIBC_TUNABLES=glibc.malloc.arena_max=2)");
    }
}

/// Prints each ID's trust domain and path, or what is wrong with it.
fn validate_ids(ids: &[String]) -> ExitCode {
    let mut ok = true;
    for id in ids {
        match id.parse::<SpiffeId>() {
            Ok(parsed) => println!(
                "{parsed}: valid (trust domain {}, path {:?})",
                parsed.trust_domain(),
                parsed.path()
            ),
            Err(e) => {
                ok = false;
                println!("{id}: invalid: {e}");
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Prints `figures` as JSON, or the error.
#[cfg(feature = "bench")]
fn print_json<E: std::fmt::Display>(command: &str, figures: Result<String, E>) -> ExitCode {
    match figures {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tessera-agent {command}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    use tessera_agent::workload_api::client;
    match Cli::parse().command {
        Command::Run(args) => {
            init_agent_process();
            block_on("tessera-agent", tessera_agent::app::run(*args))
        }
        Command::FetchX509 { socket, updates } => {
            block_on("fetch failed", client::fetch_x509(&socket, updates))
        }
        Command::FetchJwt { socket, audience } => {
            block_on("fetch failed", client::fetch_jwt(&socket, &audience))
        }
        #[cfg(feature = "bench")]
        Command::BenchDatapath { repeat } => print_json(
            "bench-datapath",
            tessera_bpf::cost::measure(repeat).map(|c| c.to_json()),
        ),
        #[cfg(feature = "bench")]
        Command::BenchHandshake { dir, seconds } => print_json(
            "bench-handshake",
            tessera_agent::bench::run_handshakes(&dir, seconds),
        ),
        #[cfg(feature = "bench")]
        Command::BenchRestart { dir, local, remote } => print_json(
            "bench-restart",
            tessera_agent::bench::restart::run_json(
                local,
                remote,
                tessera_agent::mesh::channel::MAX_STREAMS,
                &dir,
            ),
        ),
        Command::ValidateId { ids } => validate_ids(&ids),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

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
