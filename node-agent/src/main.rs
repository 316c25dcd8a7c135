//! `tessera-agent`: the node agent. Today it checks SPIFFE IDs with the same
//! parser the agent will use on every peer certificate; the Workload API,
//! handshakes and data path come with the identity and data-path issues.
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
    /// Check SPIFFE IDs against the SPIFFE ID specification; prints each ID's
    /// trust domain and path, or exactly what is wrong. Exits 1 if any is invalid.
    ValidateId {
        /// The IDs to check.
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::ValidateId { ids } => {
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
}
