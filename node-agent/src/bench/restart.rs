//! `tessera-agent bench-restart`: the handshake side of an agent's restart.
//! An agent with 100 local identities authenticates every pair with 1,000
//! identities of an agent on another node (100,000 pairs) from an empty
//! cache: [`crate::mesh::channel::MAX_STREAMS`] handshakes at a time (the
//! most one channel carries) over one channel, each recorded in an auth cache
//! (sled) on both sides. The two agents run in one process, each on a
//! thread and runtime of its own pinned to a core of its own, talking over
//! loopback TCP. Not measured here: choosing the pairs from the policy and
//! writing the eBPF maps.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use tessera_bpf::abi::AuthKey;

use super::{BenchError, TRUST_DOMAIN, bench_ca, leaf};
use crate::datapath::authcache::{AuthCache, Entry, MacKey};
use crate::mesh::channel::Channels;
use crate::mesh::handshake::{self, Credentials, Initiate};
use crate::svid::store::{Bundles, X509Svid};

/// What the benchmark measured.
#[derive(Debug, Clone, Copy)]
pub struct RestartFigures {
    /// Pairs authenticated.
    pub pairs: usize,
    /// Pairs that failed.
    pub failed: usize,
    /// From the first handshake to the last, seconds.
    pub wall_s: f64,
    /// CPU seconds per pair of the initiating agent's thread.
    pub initiator_cpu_per_pair_us: f64,
    /// CPU seconds per pair of the responding agent's thread.
    pub responder_cpu_per_pair_us: f64,
    /// The process's peak resident memory (both agents), MiB.
    pub peak_rss_mib: f64,
}

/// SVIDs for `count` identities named `spiffe://bench.test/<prefix>-<i>`.
fn svids(
    issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
    prefix: &str,
    count: usize,
) -> Result<Vec<X509Svid>, BenchError> {
    (0..count)
        .map(|i| {
            let id = format!("{TRUST_DOMAIN}/{prefix}-{i}");
            let (_, der, key) = leaf(&id, issuer)?;
            Ok(X509Svid {
                spiffe_id: id,
                chain_der: der,
                key_der: key.serialize_der(),
                hint: String::new(),
            })
        })
        .collect()
}

/// This thread's CPU time so far, seconds (utime + stime of
/// /proc/thread-self/stat, in clock ticks of 10 ms).
fn thread_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Fields 14 and 15 of the file, counted after the name (field 2).
    (ticks(11) + ticks(12)) / 100.0
}

/// The process's peak resident memory, MiB (VmHWM).
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Pins the calling thread to `cpu` (best effort: fewer cores, no pin).
fn pin(cpu: usize) {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    let _ = rustix::thread::sched_setaffinity(None, &set);
}

/// Records `auth` in `cache` with numeric identities `local` and `remote`.
fn record(
    cache: &AuthCache,
    local: u32,
    remote: u32,
    auth: &crate::datapath::Authenticated,
) -> Result<(), BenchError> {
    let entry = Entry {
        key: AuthKey {
            local,
            remote,
            remote_node: 1,
            pad: 0,
        },
        local_gen: 1,
        remote_gen: 1,
        not_after: auth.not_after,
        made: crate::clock::unix_now(),
        local_id: auth.local.clone(),
        remote_id: auth.remote.clone(),
        remote_node: auth.remote_node.clone(),
    };
    cache
        .put(&entry)
        .map_err(|e| BenchError::Cache(e.to_string()))
}

/// Runs the benchmark with `local` × `remote` pairs and `workers`
/// handshakes at a time; the caches live under `dir`. The figures as JSON.
pub fn run_json(
    local: usize,
    remote: usize,
    workers: usize,
    dir: &Path,
) -> Result<String, BenchError> {
    let f = run(local, remote, workers, dir)?;
    Ok(format!(
        "{{\"pairs\": {}, \"failed\": {}, \"wall_s\": {}, \"initiator_cpu_per_pair_us\": {}, \"responder_cpu_per_pair_us\": {}, \"peak_rss_mib\": {}}}",
        f.pairs,
        f.failed,
        f.wall_s,
        f.initiator_cpu_per_pair_us,
        f.responder_cpu_per_pair_us,
        f.peak_rss_mib
    ))
}

/// Runs the benchmark with `local` × `remote` pairs and `workers`
/// handshakes at a time; the caches live under `dir`.
pub fn run(
    local: usize,
    remote: usize,
    workers: usize,
    dir: &Path,
) -> Result<RestartFigures, BenchError> {
    let (issuer, ca_der) = bench_ca()?;
    let bundles = Bundles {
        trust_domain_id: TRUST_DOMAIN.to_owned(),
        own_der: ca_der,
        ..Default::default()
    };
    let locals = svids(&issuer, "local", local)?;
    let remotes = svids(&issuer, "remote", remote)?;
    let secret = MacKey::new(&[7; 32]);
    let open = |name: &str| {
        AuthCache::open(&dir.join(name), &secret)
            .map(|(c, _)| c)
            .map_err(|e| BenchError::Cache(e.to_string()))
    };
    let (initiator_cache, responder_cache) = (open("initiator")?, open("responder")?);
    let responder = Credentials::build(&remotes, &bundles)?;
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let responding = std::thread::spawn(move || -> Result<f64, BenchError> {
        pin(0);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let cpu = thread_cpu();
        runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let _ = addr_tx.send(listener.local_addr()?);
            let cache = Arc::new(responder_cache);
            tokio::select! {
                _ = serve(listener, responder, cache) => {}
                _ = stop_rx => {}
            }
            Ok::<_, BenchError>(())
        })?;
        Ok(thread_cpu() - cpu)
    });
    let addr = addr_rx
        .recv()
        .map_err(|_| BenchError::Io(std::io::Error::other("the responder did not start")))?;
    let initiator = Credentials::build(&locals, &bundles)?;
    let pairs: Vec<(usize, usize)> = (0..local)
        .flat_map(|l| (0..remote).map(move |r| (l, r)))
        .collect();
    let initiating = std::thread::spawn(move || -> Result<(f64, f64, usize), BenchError> {
        pin(1);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (cpu, started) = (thread_cpu(), Instant::now());
        let failed = runtime.block_on(initiate_all(
            initiator,
            addr,
            locals,
            remotes,
            pairs,
            workers,
            initiator_cache,
        ));
        Ok((started.elapsed().as_secs_f64(), thread_cpu() - cpu, failed))
    });
    let joined = |e| {
        BenchError::Io(std::io::Error::other(format!(
            "a benchmark thread panicked: {e:?}"
        )))
    };
    let (wall_s, initiator_cpu, failed) = initiating.join().map_err(joined)??;
    let _ = stop_tx.send(());
    let responder_cpu = responding.join().map_err(joined)??;
    let pairs = local * remote;
    Ok(RestartFigures {
        pairs: pairs - failed,
        failed,
        wall_s,
        initiator_cpu_per_pair_us: initiator_cpu / pairs as f64 * 1e6,
        responder_cpu_per_pair_us: responder_cpu / pairs as f64 * 1e6,
        peak_rss_mib: peak_rss_mib(),
    })
}

/// The responding agent: answers every stream of every channel, recording
/// each authentication.
async fn serve(listener: tokio::net::TcpListener, creds: Credentials, cache: Arc<AuthCache>) {
    let remote_ids: Arc<std::collections::HashMap<String, u32>> = Arc::new(
        creds
            .identities()
            .into_iter()
            .enumerate()
            .map(|(i, id)| (id, i as u32))
            .collect(),
    );
    while let Ok((tcp, from)) = listener.accept().await {
        let (creds, cache, ids) = (creds.clone(), cache.clone(), remote_ids.clone());
        tokio::spawn(crate::mesh::channel::serve(tcp, move |stream| {
            let (creds, cache, ids) = (creds.clone(), cache.clone(), ids.clone());
            async move {
                let record = |auth: &crate::datapath::Authenticated| {
                    let local = ids.get(&auth.local).copied().unwrap_or_default();
                    let remote = auth
                        .remote
                        .rsplit('-')
                        .next()
                        .and_then(|n| n.parse().ok())
                        .unwrap_or_default();
                    record(&cache, local, remote, auth).is_ok()
                };
                let _ = handshake::respond_on(&creds, stream, from, |_| Ok(()), record).await;
            }
        }));
    }
}

/// The initiating agent: `workers` at a time over one channel, as the
/// enforcer runs them; how many failed.
async fn initiate_all(
    creds: Credentials,
    addr: std::net::SocketAddr,
    locals: Vec<X509Svid>,
    remotes: Vec<X509Svid>,
    pairs: Vec<(usize, usize)>,
    workers: usize,
    cache: AuthCache,
) -> usize {
    let channels = Arc::new(Channels::default());
    let (next, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let shared = Arc::new((creds, locals, remotes, pairs, cache));
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let (channels, next, failed, shared) = (
                channels.clone(),
                next.clone(),
                failed.clone(),
                shared.clone(),
            );
            tokio::spawn(async move {
                let (creds, locals, remotes, pairs, cache) = &*shared;
                while let Some(&(l, r)) = pairs.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let ask = Initiate {
                        local: &locals[l].spiffe_id,
                        remote: &remotes[r].spiffe_id,
                        local_node: "node-a",
                        remote_node: "node-b",
                        source: None,
                        vouch: &[],
                    };
                    let recorded = match channels.authenticate(creds, addr, &ask).await {
                        Ok(auth) => record(cache, l as u32, r as u32, &auth).is_ok(),
                        Err(_) => false,
                    };
                    if !recorded {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        let _ = task.await;
    }
    failed.load(Ordering::Relaxed)
}
