//! The proxy around [`crate::policy`]: it serves one connection steered to
//! a workload's port with HTTP rules (HTTP/1.1, or HTTP/2 with prior
//! knowledge, told apart by the connection preface), checks each request
//! (each HTTP/2 stream) with [`crate::policy::gate`] against the rules held
//! at that moment, and forwards the allowed ones over a connection of its
//! own to the workload, in the same protocol. WebSocket and other upgrades
//! are checked as requests, then their bytes are spliced.
//!
//! Who the peer is comes from the caller ([`Identify`], the data path's own
//! view in the agent), never from the request. It is asked again each time
//! the caller publishes a new [`Policy`] (every pass of the agent): a peer
//! whose identity, generation or authentication changed has its
//! connection, upgraded ones included, closed.

mod connection;
mod preface;
mod upstream;

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::policy::{Rules, Source};

pub use connection::{Ended, serve, serve_io};
pub use preface::Protocol;

/// Why a request could not be forwarded (the client gets 502).
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The workload does not accept the forwarded connection.
    #[error(
        "the workload does not accept on its port over loopback ({0}); with HTTP rules it must listen on loopback (or any address) in its network namespace"
    )]
    Dial(io::Error),
    /// The HTTP handshake with the workload failed (an HTTP/2 client's
    /// workload must speak HTTP/2 with prior knowledge too).
    #[error("the HTTP handshake with the workload failed: {0}")]
    Handshake(hyper::Error),
    /// The workload's connection failed or closed during the request.
    #[error("the workload's connection failed: {0}")]
    Upstream(hyper::Error),
}

/// A workload port's rules as the waypoint holds them now.
#[derive(Debug)]
pub struct Policy {
    /// The workload's SPIFFE ID (for the identity header and logs).
    pub workload: Arc<str>,
    /// Its rules; the reason when they could not be compiled (then every
    /// request is refused).
    pub rules: Result<Arc<Rules>, Arc<str>>,
    /// The AuthPolicies the rules come from, for logs.
    pub policies: Arc<str>,
    /// Told apart from the previous one: connections name their peer again
    /// when it changes.
    pub version: u64,
}

/// Who a connection's peer is, as the data path knows it now.
#[derive(Debug, Clone, PartialEq)]
pub struct Peer {
    /// Its identity and whether the agents authenticated it with the
    /// workload.
    pub source: Source,
    /// The generation of its numeric identity (0 without one): a reused
    /// identity is another peer.
    pub generation: u64,
}

impl Peer {
    /// A peer the data path knows nothing of: no identity, not
    /// authenticated.
    pub fn unnamed() -> Peer {
        Peer {
            source: Source {
                id: None,
                authenticated: false,
            },
            generation: 0,
        }
    }
}

/// Names a connection's peer by its address.
pub type Identify = Arc<dyn Fn(IpAddr) -> Peer + Send + Sync>;

/// A future dialling the workload.
pub type Dialling = Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>>;

/// Dials the workload's port (over its loopback, in the agent).
pub type Dial = Arc<dyn Fn() -> Dialling + Send + Sync>;

/// What the connections to one workload port share.
pub struct Port {
    /// The workload's port.
    pub port: u16,
    /// The rules now; a new value makes connections name their peer again.
    pub policy: watch::Receiver<Arc<Policy>>,
    /// Names peers.
    pub identify: Identify,
    /// Counters.
    pub stats: Arc<Stats>,
    /// The connections to the workload.
    upstream: upstream::Upstream,
}

impl Port {
    /// A workload port whose rules `policy` gives, whose peers `identify`
    /// names and which `dial` reaches.
    pub fn new(
        port: u16,
        policy: watch::Receiver<Arc<Policy>>,
        identify: Identify,
        dial: Dial,
        stats: Arc<Stats>,
    ) -> Arc<Port> {
        Arc::new(Port {
            port,
            policy,
            identify,
            stats,
            upstream: upstream::Upstream::new(dial),
        })
    }
}

impl std::fmt::Debug for Port {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Port")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

/// The waypoint's counters (exported as metrics by the agent).
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections served.
    pub connections: AtomicU64,
    /// Requests forwarded.
    pub allowed: AtomicU64,
    /// Requests a Deny rule refused.
    pub denied_rule: AtomicU64,
    /// Requests no Allow rule matched.
    pub denied_not_allowed: AtomicU64,
    /// Requests refused for their path (400).
    pub bad_path: AtomicU64,
    /// Requests refused because the rules could not be compiled.
    pub no_rules: AtomicU64,
    /// Requests refused because their peer changed since the connection
    /// began.
    pub peer_changed: AtomicU64,
    /// Requests the workload could not be reached for (502).
    pub upstream_failed: AtomicU64,
    /// Connections closed because their peer changed.
    pub revoked: AtomicU64,
}

impl Stats {
    /// Adds one to `counter`.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The refusal counters by reason label.
    pub fn refusals(&self) -> [(&'static str, u64); 6] {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("deny_rule", get(&self.denied_rule)),
            ("no_allow_rule", get(&self.denied_not_allowed)),
            ("bad_path", get(&self.bad_path)),
            ("no_rules", get(&self.no_rules)),
            ("peer_changed", get(&self.peer_changed)),
            ("upstream_failed", get(&self.upstream_failed)),
        ]
    }
}

/// Where a connection to the workload goes: its port on the loopback of
/// the family of `to` (the address the peer dialled).
pub fn loopback(to: SocketAddr) -> SocketAddr {
    let ip = match to.ip().to_canonical() {
        IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
    };
    SocketAddr::new(ip, to.port())
}
