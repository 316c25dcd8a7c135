//! The waypoint, in the agent's process: for each local pod's port with
//! HTTP rules, a socket in the pod's network namespace to which `ts_steer`
//! hands every connection to that port (mesh peers and peers without an
//! identity alike), serving each with [`tessera_waypoint::proxy`] and
//! forwarding allowed requests over the pod's loopback.
//!
//! Why in the agent rather than a process of its own: the peer of each
//! connection is named by the agent's own view (endpoint and authentication
//! state, with generations) at the moment it is asked, with no second copy
//! of that state to keep in step or to trust; and there is no second
//! process whose absence would have to be detected. The waypoint runs on
//! threads of its own (one single-threaded runtime per CPU, each serving
//! whole listeners), so requests do not queue behind the agent's passes
//! and handshakes, and a request wakes no other thread on its way. If the agent stops (even `kill -9`), its sockets close
//! with it, the steering finds none, and `ts_ingress` refuses connection
//! starts to those ports that reach the workload's own socket
//! (`ts_waypointed`, pinned): the port refuses until the agent is back.

use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tessera_waypoint::proxy::{self, Ended, Peer, Policy, Port};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::mesh::limits::ConnLimits;

/// Connections at once from one address to the waypoint (each lives as
/// long as the client keeps it).
pub const PER_PEER: usize = 4096;
/// Connections at once to the waypoint in all.
pub const TOTAL: usize = 32768;

/// The rules of a local pod's ports with HTTP rules now, by pod UID.
pub type Policies = Arc<dyn Fn(&str) -> Option<Arc<Policy>> + Send + Sync>;

/// Names the peer at an address for the workload of a local pod (by UID).
pub type Identify = Arc<dyn Fn(&str, IpAddr) -> Peer + Send + Sync>;

/// What the waypoint asks the agent.
#[derive(Clone)]
pub struct Context {
    /// The rules now.
    pub policy: Policies,
    /// Who a peer is now.
    pub identify: Identify,
    /// The waypoint's counters.
    pub stats: Arc<proxy::Stats>,
    /// Caps shared by every waypoint socket.
    pub limits: Arc<ConnLimits>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

/// The caps on the waypoint's connections (shared by every waypoint
/// socket).
pub fn limits() -> Arc<ConnLimits> {
    ConnLimits::new(PER_PEER, TOTAL)
}

/// Time the workload has to accept a forwarded connection.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);

/// A local pod's port with HTTP rules.
#[derive(Debug, Clone)]
pub struct Target {
    /// The pod's UID.
    pub uid: String,
    /// `namespace/name`, for logs.
    pub pod: String,
    /// The pod's address and the port.
    pub addr: SocketAddr,
}

/// The waypoint's threads, started with the first waypoint: one
/// single-threaded runtime per CPU the agent may run on then. A listener
/// and all its connections stay on one of them (given out in turn), so a
/// request wakes no other thread on its way through.
struct Workers {
    handles: Vec<tokio::runtime::Handle>,
    next: AtomicUsize,
}

impl Workers {
    fn get() -> std::io::Result<Arc<Workers>> {
        static WORKERS: Mutex<Option<Arc<Workers>>> = Mutex::new(None);
        let mut slot = crate::sync::lock(&WORKERS);
        if let Some(w) = slot.as_ref() {
            return Ok(w.clone());
        }
        let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let mut handles = Vec::with_capacity(threads);
        for i in 0..threads {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(rt.handle().clone());
            std::thread::Builder::new()
                .name(format!("waypoint-{i}"))
                .spawn(move || rt.block_on(std::future::pending::<()>()))?;
        }
        let workers = Arc::new(Workers {
            handles,
            next: AtomicUsize::new(0),
        });
        *slot = Some(workers.clone());
        Ok(workers)
    }

    /// The next thread's runtime, in turn.
    fn pick(&self) -> &tokio::runtime::Handle {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        &self.handles[i]
    }
}

/// Serves `listener` (a socket in the namespace `netns` of the pod of
/// `want`) on the waypoint's runtime, with the rules `policy` gives.
pub fn spawn(
    listener: std::net::TcpListener,
    want: Target,
    netns: Arc<File>,
    policy: watch::Receiver<Arc<Policy>>,
    ctx: &Context,
) -> std::io::Result<JoinHandle<()>> {
    let workers = Workers::get()?;
    let uid = want.uid.clone();
    let identify = ctx.identify.clone();
    let port = port(
        want.addr,
        netns,
        policy,
        Arc::new(move |ip| identify(&uid, ip)),
        ctx.stats.clone(),
    );
    let want = Arc::new(want);
    let limits = ctx.limits.clone();
    Ok(workers.pick().spawn(async move {
        match TcpListener::from_std(listener) {
            Ok(listener) => accept(listener, want, port, limits).await,
            Err(e) => warn!(pod = %want.pod, port = want.addr.port(), error = %e, "cannot register the waypoint's socket"),
        }
    }))
}

/// The proxy's view of the workload port at `addr` (in the namespace
/// `netns`): its rules from `policy`, its callers named by `identify`, and
/// the workload dialled over the pod's loopback.
pub fn port(
    addr: SocketAddr,
    netns: Arc<File>,
    policy: watch::Receiver<Arc<Policy>>,
    identify: proxy::Identify,
    stats: Arc<proxy::Stats>,
) -> Arc<Port> {
    let workload = proxy::loopback(addr);
    Port::new(
        addr.port(),
        policy,
        identify,
        Arc::new(move || {
            Box::pin(crate::netns::connect_in(
                netns.clone(),
                workload,
                UPSTREAM_TIMEOUT,
            ))
        }),
        stats,
    )
}

async fn accept(
    listener: TcpListener,
    want: Arc<Target>,
    port: Arc<Port>,
    limits: Arc<ConnLimits>,
) {
    loop {
        let (tcp, from) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(pod = %want.pod, error = %e, "accepting a connection to the waypoint failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Only what ts_steer handed over: a connection made to the
        // socket's own port is not to the workload.
        let steered = tcp
            .local_addr()
            .is_ok_and(|to| SocketAddr::new(to.ip().to_canonical(), to.port()) == want.addr);
        if !steered {
            debug!(pod = %want.pod, %from, "connection to the waypoint's own port closed");
            continue;
        }
        let slot = match limits.admit(from.ip()) {
            Ok(slot) => slot,
            Err(e) => {
                debug!(pod = %want.pod, %from, reason = %e, "waypoint connection closed at once");
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (port, want) = (port.clone(), want.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let from = SocketAddr::new(from.ip().to_canonical(), from.port());
            match proxy::serve(tcp, from, port).await {
                Ended::PeerChanged { was, now } => {
                    info!(pod = %want.pod, port = want.addr.port(), %from, ?was, ?now, "connection closed: its peer is no longer the one it began with")
                }
                Ended::Closed(Some(e)) => {
                    debug!(pod = %want.pod, port = want.addr.port(), %from, error = %e, "connection ended")
                }
                Ended::Closed(None) | Ended::Unserved => {}
            }
        });
    }
}
