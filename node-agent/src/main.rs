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
    #[command(hide = true)]
    BenchDatapath {
        /// Runs per scenario.
        #[arg(long, default_value_t = 1_000_000)]
        repeat: u32,
    },
    /// Measure agent handshakes (initiator and responder on one thread) for
    /// `seconds`, writing the certificates used into `dir` for the Go peer;
    /// prints JSON (for `cargo xtask bench auth`).
    #[command(hide = true)]
    BenchHandshake {
        /// Where the CA and SVIDs are written (PEM).
        #[arg(long)]
        dir: std::path::PathBuf,
        /// How long to measure.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
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
    Run(Box<RunArgs>),
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

/// Options of `tessera-agent run`.
#[derive(clap::Args)]
struct RunArgs {
    /// Kubeconfig; without it, $KUBECONFIG, ~/.kube/config or in-cluster.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<std::path::PathBuf>,
    /// This node's name (from the downward API in a DaemonSet).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// The operator's signing service.
    #[arg(long, default_value = "https://tessera-signer.tessera-system.svc:8443")]
    signer: String,
    /// The name the signer's certificate must carry.
    #[arg(long, default_value = "tessera-signer.tessera-system.svc")]
    signer_name: String,
    /// Namespace of the trust bundle ConfigMap (the operator's).
    #[arg(long, default_value = "tessera-system")]
    namespace: String,
    /// The agent's node-bound service-account token (audience tessera-signer).
    #[arg(long, default_value = "/var/run/secrets/tessera/token")]
    token_file: std::path::PathBuf,
    /// Where to serve the SPIFFE Workload API.
    #[arg(long, default_value = "/run/tessera/agent.sock")]
    socket: std::path::PathBuf,
    /// Enables the data path: the cgroup (v2) the eBPF programs attach to,
    /// the parent of this node's pod cgroups (found by pod UID below it).
    /// Needs root. Without it the agent serves identities only.
    #[arg(long)]
    cgroup_root: Option<std::path::PathBuf>,
    /// The bpffs mount point (mounted there if it is not yet).
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: std::path::PathBuf,
    /// Directory on bpffs where maps and links are pinned, one directory per
    /// ABI version below it (one per agent: simulated nodes on one host
    /// need one each).
    #[arg(long, default_value = "tessera")]
    pin_name: String,
    /// Where agents accept handshakes; other agents are dialled on this port
    /// at their node's address.
    #[arg(long, default_value = "0.0.0.0:4434")]
    handshake_addr: std::net::SocketAddr,
    /// Where to serve /metrics, /healthz and /readyz (ready once the data
    /// path is in sync, or at once without a data path).
    #[arg(long, default_value = "0.0.0.0:9091")]
    metrics_addr: std::net::SocketAddr,
    /// Where the auth cache is kept.
    #[arg(long, default_value = "/var/lib/tessera")]
    state_dir: std::path::PathBuf,
    /// Where this node's pods' SVIDs come from: `builtin` (the operator's
    /// signing service) or `spire` (the local SPIRE agent's Delegated
    /// Identity API; the operator must run with --svid-source spire too).
    #[arg(long, value_enum, default_value = "builtin")]
    svid_source: SvidSource,
    /// The SPIRE agent's admin socket (its `admin_socket_path`), whose
    /// authorized_delegates must include this agent's SPIFFE ID.
    #[arg(long, default_value = "/run/spire/admin/api.sock")]
    spire_admin_socket: std::path::PathBuf,
}

/// Where workload SVIDs come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SvidSource {
    /// The operator's signing service.
    Builtin,
    /// The local SPIRE agent.
    Spire,
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    use k8s_openapi::api::core::v1::ConfigMap;
    let config = match &args.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("cannot read kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await?
        }
        None => kube::Config::infer()
            .await
            .context("no kubeconfig and not in a cluster; pass --kubeconfig")?,
    };
    let client = kube::Client::try_from(config)?;
    // The trust bundle the operator publishes: trust for the signer, and the
    // own CAs, which follow the ConfigMap from now on.
    let published = kube::Api::<ConfigMap>::namespaced(client.clone(), &args.namespace)
        .get(tessera_agent::trust::BUNDLE_CONFIGMAP)
        .await
        .with_context(|| format!("cannot read ConfigMap {}/tessera-trust-bundle; is the operator running, and may the agent read it?", args.namespace))?;
    let store = tessera_agent::identities::IdentityStore::default();
    let spire = (args.svid_source == SvidSource::Spire).then(|| {
        tessera_agent::delegated::DelegatedConfig {
            node_name: args.node_name.clone(),
            admin_socket: args.spire_admin_socket.clone(),
        }
    });
    match &spire {
        None => {
            tessera_agent::trust::own_der_of(&published).with_context(|| {
                format!(
                    "ConfigMap {}/tessera-trust-bundle is unusable",
                    args.namespace
                )
            })?;
            tessera_agent::trust::apply(&store, &published);
            tokio::spawn(tessera_agent::trust::follow(
                client.clone(),
                args.namespace.clone(),
                store.clone(),
            ));
        }
        // With SPIRE the own CAs are SPIRE's: the SPIRE agent's bundle
        // stream, for the trust domain the operator names.
        Some(cfg) => {
            let td = tessera_agent::trust::trust_domain_id_of(&published)?.context(
                "ConfigMap tessera-trust-bundle names no trustDomain; is the operator up to date?",
            )?;
            tokio::spawn(tessera_agent::delegated::follow_bundles(
                cfg.clone(),
                td.clone(),
                store.clone(),
            ));
            tokio::spawn(tessera_agent::delegated::follow_jwt_bundles(
                cfg.clone(),
                td,
                store.clone(),
            ));
        }
    }
    // Federated trust domains' bundles, for handshakes with their workloads
    // and for the Workload API of pods that federate with them.
    tokio::spawn(tessera_agent::trust::follow_federated(
        client.clone(),
        args.namespace.clone(),
        store.clone(),
    ));
    let bundle = published
        .data
        .and_then(|mut d| d.remove(tessera_agent::trust::BUNDLE_KEY))
        .unwrap_or_default();
    let channel = tonic::transport::Channel::from_shared(args.signer.clone())
        .with_context(|| format!("--signer {:?} is not a URL", args.signer))?
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(bundle))
                .domain_name(args.signer_name.clone()),
        )?
        .connect_lazy();
    let svid_cfg = tessera_agent::svids::SvidConfig {
        node_name: args.node_name.clone(),
        token_file: args.token_file,
    };
    // JWT-SVIDs come from the signer, or with SPIRE from the SPIRE agent.
    let jwt = Some(match &spire {
        None => tessera_agent::svids::JwtSource::Signer(tessera_agent::svids::JwtIssuer::new(
            channel.clone(),
            svid_cfg.clone(),
            store.clone(),
        )),
        Some(cfg) => tessera_agent::svids::JwtSource::Spire(
            tessera_agent::delegated::SpireJwt::new(cfg.clone()),
        ),
    });
    let server = tessera_agent::workload_api::serve(&args.socket, store.clone(), jwt, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    tracing::info!(socket = %args.socket.display(), node = %args.node_name, "serving the SPIFFE Workload API");
    let stats = std::sync::Arc::new(tessera_agent::enforcer::Stats::default());
    let ready: tessera_api::probes::Readiness = if args.cgroup_root.is_some() {
        let stats = stats.clone();
        std::sync::Arc::new(move || stats.in_sync.load(std::sync::atomic::Ordering::Relaxed))
    } else {
        std::sync::Arc::new(|| true)
    };
    let registry = tessera_agent::metrics::registry(stats.clone(), store.clone());
    let (metrics_bound, metrics_server) =
        tessera_api::probes::serve(args.metrics_addr, registry, ready)
            .await
            .with_context(|| {
                format!(
                    "cannot serve metrics on {}; pass another --metrics-addr",
                    args.metrics_addr
                )
            })?;
    tracing::info!(addr = %metrics_bound, "serving /metrics, /healthz and /readyz");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    private_dir(&args.state_dir)?;
    let enforcer = match &args.cgroup_root {
        Some(cgroup) => {
            tessera_bpf::pinning::ensure_bpffs(&args.bpffs)
                .with_context(|| format!("cannot mount bpffs at {}", args.bpffs.display()))?;
            let cfg = tessera_agent::enforcer::EnforcerConfig {
                node_name: args.node_name.clone(),
                listen: args.handshake_addr,
                peer_port: args.handshake_addr.port(),
                cache_dir: args.state_dir.join("authcache"),
                pin_dir: Some(tessera_bpf::pinning::version_dir(
                    &args.bpffs.join(&args.pin_name),
                )),
                attach_cgroup: Some(cgroup.clone()),
                pod_cgroups: cgroup.clone(),
            };
            let mut stop = stop_rx.clone();
            Some(tokio::spawn(tessera_agent::enforcer::run(
                client.clone(),
                cfg,
                store.clone(),
                stats,
                async move {
                    let _ = stop.wait_for(|s| *s).await;
                },
            )))
        }
        None => None,
    };
    let svids: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> = match spire {
        None => Box::pin(tessera_agent::svids::run(client, channel, svid_cfg, store)),
        Some(cfg) => Box::pin(tessera_agent::delegated::run(client, cfg, store)),
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let enforcer_done = async {
        match enforcer {
            Some(task) => task.await,
            None => std::future::pending().await,
        }
    };
    let mut enforcer_done = std::pin::pin!(enforcer_done);
    tokio::select! {
        _ = svids => tracing::warn!("the pod watch ended"),
        _ = term.recv() => tracing::info!("shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("shutting down"),
        done = &mut enforcer_done => {
            server.abort();
            let _ = std::fs::remove_file(&args.socket);
            return match done {
                Ok(Ok(())) => Err(anyhow::anyhow!("the data path controller stopped")),
                Ok(Err(e)) => Err(anyhow::Error::new(e).context("the data path failed")),
                Err(e) => Err(anyhow::anyhow!("the data path controller panicked: {e}")),
            };
        }
    }
    let _ = stop_tx.send(true);
    if args.cgroup_root.is_some() {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(3), &mut enforcer_done).await;
    }
    server.abort();
    metrics_server.abort();
    let _ = std::fs::remove_file(&args.socket);
    Ok(())
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
            Some(Ok(svid)) => {
                // Seconds the leaf has left as it arrives: never negative when
                // the agent serves only valid SVIDs.
                let expires_in = x509_parser::parse_x509_certificate(svid.leaf().as_ref())
                    .map(|(_, c)| c.validity().not_after.timestamp())
                    .map_err(|e| format!("update {n}: unreadable leaf: {e}"))?
                    - tessera_agent::svids::unix_now();
                println!(
                    "update {n}: SPIFFE ID: {} leaf {} expires_in {expires_in}s",
                    svid.spiffe_id(),
                    fingerprint(svid.leaf().as_ref())
                );
            }
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

/// Creates `dir` if needed and lets only the agent's user into it.
fn private_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
        .with_context(|| {
            format!(
                "cannot create the state directory {} (mode 0700)",
                dir.display()
            )
        })
}

async fn connect(socket: &str) -> Result<spiffe::WorkloadApiClient, String> {
    let endpoint = if socket.starts_with("unix:") {
        socket.to_owned()
    } else {
        format!("unix:{socket}")
    };
    spiffe::WorkloadApiClient::connect_to(&endpoint)
        .await
        .map_err(|e| format!("cannot connect to {endpoint}: {e}"))
}

async fn fetch_jwt(socket: &str, audience: &[String]) -> Result<(), String> {
    let client = connect(socket).await?;
    let svid = client
        .fetch_jwt_svid(audience, None)
        .await
        .map_err(|e| format!("FetchJWTSVID: {e}"))?;
    println!(
        "SPIFFE ID: {} (audience {:?}, hint {:?})",
        svid.spiffe_id(),
        svid.audience(),
        svid.hint().unwrap_or_default()
    );
    println!("token: {}", svid.token());
    let bundles = client
        .fetch_jwt_bundles()
        .await
        .map_err(|e| format!("FetchJWTBundles: {e}"))?;
    for (td, bundle) in bundles.iter() {
        println!(
            "JWT bundle: {td} (has the token's key: {})",
            bundle.find_jwt_authority(svid.key_id()).is_some()
        );
    }
    let first = audience.first().map(String::as_str).unwrap_or_default();
    let validated = client
        .validate_jwt_token(first, svid.token())
        .await
        .map_err(|e| format!("ValidateJWTSVID: {e}"))?;
    println!("validated by the agent: {}", validated.spiffe_id());
    let offline = spiffe::JwtSvid::parse_and_validate(svid.token(), &bundles, &[first])
        .map_err(|e| format!("offline verification with the spiffe crate: {e}"))?;
    println!("verified offline: {}", offline.spiffe_id());
    Ok(())
}

async fn fetch_x509(socket: &str, updates: Option<usize>) -> Result<(), String> {
    let client = connect(socket).await?;
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

/// Runs `task` on a new runtime; prints its error and exits 1 on failure.
fn block_on(task: impl std::future::Future<Output = Result<(), String>>) -> ExitCode {
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
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Run(args) => {
            // Before anything allocates much: on success this does not return.
            let unbounded = tessera_agent::arenas::limit();
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info".into()),
                )
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .init();
            if let Some(e) = unbounded {
                tracing::warn!(error = %e, "cannot start again with fewer allocator arenas; memory use may be higher (set GLIBC_TUNABLES=glibc.malloc.arena_max=2)");
            }
            block_on(async {
                run(*args)
                    .await
                    .map_err(|e| format!("tessera-agent: {e:#}"))
            })
        }
        Command::FetchX509 { socket, updates } => block_on(async {
            fetch_x509(&socket, updates)
                .await
                .map_err(|e| format!("fetch failed: {e}"))
        }),
        Command::FetchJwt { socket, audience } => block_on(async {
            fetch_jwt(&socket, &audience)
                .await
                .map_err(|e| format!("fetch failed: {e}"))
        }),
        Command::BenchDatapath { repeat } => match tessera_bpf::cost::measure(repeat) {
            Ok(cost) => {
                println!("{}", cost.to_json());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tessera-agent bench-datapath: {e}");
                ExitCode::FAILURE
            }
        },
        Command::BenchHandshake { dir, seconds } => {
            let measured = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
                .and_then(|rt| {
                    rt.block_on(async {
                        let (client, server, bundles) =
                            tessera_agent::bench::make_material(&dir).map_err(|e| e.to_string())?;
                        tessera_agent::bench::handshakes(&client, &server, &bundles, seconds)
                            .await
                            .map_err(|e| e.to_string())
                    })
                });
            match measured {
                Ok(f) => {
                    println!(
                        "{{\"per_second\": {}, \"p50_ms\": {}, \"p99_ms\": {}, \"count\": {}}}",
                        f.per_second, f.p50_ms, f.p99_ms, f.count
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("tessera-agent bench-handshake: {e}");
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
