//! `tessera-agent`: the node agent. Today it checks SPIFFE IDs with the same
//! parser the agent uses on every peer certificate, and fetches X.509-SVIDs
//! from a Workload API socket (a client for debugging, like
//! `spire-agent api fetch`). Serving the Workload API from the agent process,
//! handshakes and the data path come with the identity and data-path issues.
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
}

/// A short fingerprint of a certificate, to tell rotations apart in output.
fn fingerprint(der: &[u8]) -> String {
    let digest = der.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    });
    format!("{digest:016x}")
}

async fn watch_x509(client: &spiffe::WorkloadApiClient, updates: usize) -> Result<(), String> {
    use futures::StreamExt;
    let mut stream = client
        .stream_x509_svids()
        .await
        .map_err(|e| e.to_string())?;
    for n in 1..=updates {
        match stream.next().await {
            Some(Ok(svid)) => println!(
                "update {n}: SPIFFE ID: {} leaf {}",
                svid.spiffe_id(),
                fingerprint(svid.leaf().as_ref())
            ),
            Some(Err(e)) => return Err(e.to_string()),
            None => {
                return Err(format!(
                    "the server closed the stream after {} update(s)",
                    n - 1
                ));
            }
        }
    }
    Ok(())
}

async fn fetch_x509(socket: &str, updates: Option<usize>) -> Result<(), String> {
    let endpoint = if socket.starts_with("unix:") {
        socket.to_owned()
    } else {
        format!("unix:{socket}")
    };
    let client = spiffe::WorkloadApiClient::connect_to(&endpoint)
        .await
        .map_err(|e| format!("cannot connect to {endpoint}: {e}"))?;
    if let Some(n) = updates {
        return watch_x509(&client, n).await;
    }
    let svids = client
        .fetch_all_x509_svids()
        .await
        .map_err(|e| e.to_string())?;
    for svid in &svids {
        println!(
            "SPIFFE ID: {} (chain of {}, hint {:?})",
            svid.spiffe_id(),
            svid.cert_chain().len(),
            svid.hint().unwrap_or_default()
        );
    }
    let bundles = client
        .fetch_x509_bundles()
        .await
        .map_err(|e| e.to_string())?;
    for (td, bundle) in bundles.iter() {
        println!("bundle: {td} ({} authorities)", bundle.authorities().len());
    }
    Ok(())
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::FetchX509 { socket, updates } => {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(fetch_x509(&socket, updates)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("fetch failed: {e}");
                    ExitCode::FAILURE
                }
            }
        }
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
