//! Peers outside the mesh: connections from workloads without a Tessera
//! agent (a federated SPIRE trust domain's, say) that an AuthPolicy rule
//! with `externalPeers: TerminateTLS` names. No agent can authenticate such
//! a peer, so this agent terminates its TLS: it presents the local
//! workload's X509-SVID, verifies the peer's against the bundle of the
//! peer's trust domain, checks the peer's SPIFFE ID against the workload's
//! rules, and only then forwards the plaintext to the workload (on the same
//! port, over the pod's loopback interface). On a port with HTTP rules it
//! serves the decrypted connection with the waypoint's proxy instead: each
//! request is checked against those rules with the peer's verified SPIFFE
//! ID as its source.
//!
//! The connections reach this agent through `ts_steer`, an sk_lookup
//! program attached to the pod's network namespace: a connection start from
//! an address with no endpoint entry to a terminated address and port is
//! handed to a listening socket this agent opened in that namespace (before
//! the waypoint's socket on the same port, which takes everyone else).
//! `ts_ingress` lets connection starts to those sockets (known by cookie)
//! through; everything else, mesh peers included, is decided as before. If
//! this agent stops, its sockets close, the steering finds none, and such
//! connections meet the ordinary ingress check (denied): it fails closed.
//!
//! The data path's revocation sweep leaves these connections alone (their
//! peer has no endpoint; `ts_terminated` says whose they are). Instead each
//! forwarded connection is checked again on every pass of the agent and
//! closed once its rule no longer admits the peer, the peer's chain no
//! longer verifies against the bundles held now, or the port is no longer
//! terminated.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use tessera_api::crd::IdentityPolicySpec;
use tessera_api::crd::auth_policy::{ExternalPeers, PolicyAction, PortRange, Protocol};
use tessera_api::crd::identity_policy::CompiledRule;
use tessera_api::spiffe::SpiffeId;
use tessera_bpf::abi::TermKey;
use tessera_bpf::datapath::DatapathError;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::mesh::limits::{ConnLimits, EXTERNAL_PER_PEER, EXTERNAL_TOTAL};
use crate::mesh::waypoint;
use tessera_waypoint::proxy::{self, Policy};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::datapath::{DataPlane, Stats};
use crate::mesh::handshake::{Admit, Credentials, HandshakeError, Refusal};
use crate::netns::NetnsError;
use crate::sync::lock;

/// Most ports one workload may have terminated.
pub const MAX_TERMINATED_PORTS: usize = 256;
/// Time a peer has to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time the workload has to accept the forwarded connection.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a terminator could not be set up (logged; retried on the next pass).
#[derive(Debug, thiserror::Error)]
pub enum ExternalError {
    /// No process of the pod was found to enter its network namespace.
    #[error(
        "no process found in the pod's cgroup {0} (is the pod running?); its external peers stay refused"
    )]
    NoProcess(PathBuf),
    /// The pod shares the host's network namespace.
    #[error(
        "the pod runs in the host's network namespace; TerminateTLS is not available for hostNetwork pods"
    )]
    HostNetwork,
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// The eBPF maps or program refused.
    #[error("eBPF: {0}")]
    Datapath(#[from] DatapathError),
    /// A connection reached the terminator for another address or port.
    #[error("made to {to}, not to the terminated {ip}:{port}")]
    WrongDestination {
        /// Where it was made to.
        to: SocketAddr,
        /// The terminated address.
        ip: IpAddr,
        /// The terminated port.
        port: u16,
    },
    /// The pod has no identity or SVID on this agent yet.
    #[error("the pod has no identity or no SVID on this agent yet")]
    NoIdentity,
    /// The terminator's TLS configuration could not be made.
    #[error(transparent)]
    Terminator(#[from] HandshakeError),
    /// The peer did not finish its TLS handshake in time.
    #[error("no TLS handshake within {HANDSHAKE_TIMEOUT:?}")]
    HandshakeTimeout,
    /// Refused by policy during the TLS handshake.
    #[error("refused: {0}")]
    Refused(String),
    /// The peer's X509-SVID was not accepted.
    #[error("its X509-SVID is not accepted: {0}")]
    Svid(String),
    /// Another TLS failure.
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    /// The peer's certificate is gone after the handshake.
    #[error("the peer's certificate is gone after the handshake")]
    PeerGone,
    /// The workload does not accept the forwarded connection.
    #[error(
        "{peer} admitted, but the workload does not accept on {addr} in its network namespace ({source}); with TerminateTLS it must listen on loopback (or any address) in plain TCP"
    )]
    Upstream {
        /// The admitted peer.
        peer: SpiffeId,
        /// Where the workload was dialled.
        addr: SocketAddr,
        /// The connection error.
        source: std::io::Error,
    },
    /// The pod no longer terminates the port.
    #[error("the pod no longer terminates this port")]
    Unterminated,
    /// The pod or its SVID is gone from this node.
    #[error("the pod or its SVID is gone from this node")]
    PodGone,
    /// The peer's chain no longer verifies against the bundles held.
    #[error("its X509-SVID no longer verifies: {0}")]
    NoLongerVerifies(rustls::Error),
    /// The peer is no longer admitted by policy.
    #[error(transparent)]
    NotAdmitted(#[from] Refusal),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ExternalError {
    let what = what.into();
    move |source| ExternalError::Io { what, source }
}

fn port_in(ranges: &[PortRange], port: u16) -> bool {
    ranges.is_empty()
        || ranges.iter().any(|r| {
            r.protocol == Protocol::Tcp
                && i32::from(port) >= r.port
                && i32::from(port) <= r.end_port.unwrap_or(r.port)
        })
}

fn terminates(rule: &CompiledRule) -> bool {
    rule.action == PolicyAction::Allow && rule.external_peers == ExternalPeers::TerminateTls
}

/// The TCP ports on which a workload with these rules has peers outside the
/// mesh terminated, at most [`MAX_TERMINATED_PORTS`] (the lowest). Those
/// among `checked` (the ports whose HTTP rules the waypoint checks) have
/// each decrypted request checked too; a port with HTTP rules beyond them
/// is not terminated (it stays closed: nothing would check its requests).
pub fn terminated_ports(spec: &IdentityPolicySpec, checked: &BTreeSet<u16>) -> BTreeSet<u16> {
    let unchecked: BTreeSet<u16> = spec.http_ports().difference(checked).copied().collect();
    let ports: BTreeSet<u16> = spec
        .tcp_ports_of(terminates)
        .difference(&unchecked)
        .copied()
        .collect();
    capped(spec, ports, "terminated")
}

/// The lowest [`MAX_TERMINATED_PORTS`] of `ports`, said when some are left
/// out.
fn capped(spec: &IdentityPolicySpec, ports: BTreeSet<u16>, what: &str) -> BTreeSet<u16> {
    if ports.len() <= MAX_TERMINATED_PORTS {
        return ports;
    }
    warn!(spiffe_id = %spec.spiffe_id, ports = ports.len(), "more {what} ports than the limit; only the lowest {MAX_TERMINATED_PORTS} are served");
    ports.into_iter().take(MAX_TERMINATED_PORTS).collect()
}

/// Whether the workload whose rules are `spec` admits `peer`, a peer
/// outside the mesh whose X509-SVID was verified, on `port`: no Deny rule
/// matches and a TerminateTLS Allow rule does. A Deny rule with HTTP rules
/// denies requests, not the connection: the waypoint's checks apply it to
/// each. The reason when not.
pub fn admits(
    spec: Option<&IdentityPolicySpec>,
    peer: &SpiffeId,
    port: u16,
) -> Result<(), Refusal> {
    let Some(spec) = spec else {
        return Err(Refusal::NoPolicy);
    };
    let matches = |r: &CompiledRule| {
        (r.from.is_empty() || r.from.iter().any(|p| p.matches(peer))) && port_in(&r.ports, port)
    };
    let sources = spec.sources.join(", ");
    if spec
        .rules
        .iter()
        .any(|r| r.action == PolicyAction::Deny && r.http.is_empty() && matches(r))
    {
        return Err(Refusal::Denied {
            sources,
            peer: peer.clone(),
            port,
        });
    }
    if spec.rules.iter().any(|r| terminates(r) && matches(r)) {
        Ok(())
    } else {
        Err(Refusal::NotAllowed {
            sources,
            peer: peer.clone(),
            port,
        })
    }
}

/// What the agent's socket on a local pod's port does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Terminates the TLS of peers outside the mesh; with `http`, on a port
    /// with HTTP rules, whose each request it checks as the waypoint does.
    Terminator {
        /// The port has HTTP rules the waypoint checks.
        http: bool,
    },
    /// Checks every request of every peer against the port's HTTP rules
    /// (see [`crate::mesh::waypoint`]).
    Waypoint,
}

/// A port of a local pod the agent serves, as the enforcer wants it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Want {
    /// What the agent does with its connections.
    pub kind: Kind,
    /// The pod's UID.
    pub uid: String,
    /// `namespace/name`, for logs.
    pub pod: String,
    /// The pod's address.
    pub ip: IpAddr,
    /// The port.
    pub port: u16,
    /// The pod's cgroup directory.
    pub cgroup: PathBuf,
}

/// One of the agent's sockets: the pod's UID, the port, and what it does
/// (a port may have a terminator and the waypoint side by side).
type SocketKey = (String, u16, Kind);

impl Want {
    fn key(&self) -> SocketKey {
        (self.uid.clone(), self.port, self.kind)
    }
}

/// What a terminated connection needs at the time it arrives: the pod's
/// SPIFFE ID and its rules, and the handshake credentials.
pub type Terminating =
    Arc<dyn Fn(&str) -> Option<(Arc<str>, Option<IdentityPolicySpec>, Credentials)> + Send + Sync>;

/// What the agent's sockets learn from it, by pod UID.
#[derive(Clone)]
pub struct Context {
    /// For terminators.
    pub terminating: Terminating,
    /// For waypoints.
    pub waypoint: waypoint::Context,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

struct Running {
    want: Want,
    cookie: u64,
    task: JoinHandle<()>,
    /// Told on every pass of the agent: the connections served check again
    /// that their peer is still admitted, and end when it is dropped.
    pass: Pass,
}

enum Pass {
    /// With the port's rules now on a port with HTTP rules.
    Terminator(watch::Sender<()>, Option<watch::Sender<Arc<Policy>>>),
    /// The port's rules now.
    Waypoint(watch::Sender<Arc<Policy>>),
}

struct Steered {
    netns: Arc<File>,
    /// The namespace's inode: a recreated sandbox has another.
    inode: u64,
    link: tessera_bpf::datapath::SkLookupLinkId,
}

/// The terminators of this node's pods.
pub struct External {
    running: Mutex<HashMap<SocketKey, Running>>,
    steered: Mutex<HashMap<String, Steered>>,
    /// The last reason each wanted terminator could not be opened.
    failing: Mutex<HashMap<SocketKey, String>>,
    stats: Arc<Stats>,
    /// Caps shared by every terminator socket.
    limits: Arc<ConnLimits>,
}

impl std::fmt::Debug for External {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("External").finish_non_exhaustive()
    }
}

impl External {
    /// No terminators yet; counts in `stats`.
    pub fn new(stats: Arc<Stats>) -> External {
        External {
            running: Mutex::default(),
            steered: Mutex::default(),
            failing: Mutex::default(),
            stats,
            limits: ConnLimits::new(EXTERNAL_PER_PEER, EXTERNAL_TOTAL),
        }
    }

    /// Brings the terminators in line with `wanted`: new ones are opened
    /// (steering attached to the pod's namespace first), ones no longer
    /// wanted stop being steered to and are closed.
    pub fn reconcile(&self, plane: &DataPlane, wanted: &[Want], ctx: &Context) {
        // Pods whose network namespace is no longer the one steered (the
        // sandbox was recreated): their terminators move to the new one.
        let moved: BTreeSet<String> = lock(&self.steered)
            .iter()
            .filter_map(|(uid, s)| {
                let cgroup = &wanted.iter().find(|w| &w.uid == uid)?.cgroup;
                let now = crate::netns::pod_inode(cgroup)?;
                (now != s.inode).then(|| uid.clone())
            })
            .collect();
        {
            let mut running = lock(&self.running);
            let stale: Vec<SocketKey> = running
                .iter()
                .filter(|(_, r)| !wanted.contains(&r.want) || moved.contains(&r.want.uid))
                .map(|(k, _)| k.clone())
                .collect();
            for key in stale {
                if let Some(r) = running.remove(&key) {
                    Self::close(plane, r);
                }
            }
        }
        for uid in &moved {
            info!(pod_uid = %uid, "the pod's network namespace changed; terminating in the new one");
            self.unsteer(plane, uid);
        }
        lock(&self.failing).retain(|key, _| wanted.iter().any(|w| w.key() == *key));
        for want in wanted {
            let key = want.key();
            if lock(&self.running).contains_key(&key) {
                continue;
            }
            match self.open(plane, want, ctx) {
                Ok(r) => {
                    lock(&self.failing).remove(&key);
                    match want.kind {
                        Kind::Terminator { .. } => {
                            info!(pod = %want.pod, ip = %want.ip, port = want.port, "terminating TLS of external peers")
                        }
                        Kind::Waypoint => {
                            info!(pod = %want.pod, ip = %want.ip, port = want.port, "checking the port's HTTP requests")
                        }
                    }
                    lock(&self.running).insert(key, r);
                }
                Err(e) => {
                    // Said once per new reason, not on every pass.
                    let why = e.to_string();
                    if lock(&self.failing).insert(key, why.clone()).as_ref() != Some(&why) {
                        match want.kind {
                            Kind::Terminator { .. } => {
                                warn!(pod = %want.pod, port = want.port, error = %why, "cannot terminate the TLS of external peers yet (they stay refused); retrying every second")
                            }
                            Kind::Waypoint => {
                                warn!(pod = %want.pod, port = want.port, error = %why, "cannot serve the port's HTTP rules yet (its connections are refused); retrying every second")
                            }
                        }
                    }
                }
            }
        }
        self.publish(ctx);
        // Namespaces with no socket left: steering ends.
        self.end_unused_steering(plane);
    }

    /// Tells every socket's connections to check their peer again, and
    /// hands each waypoint the rules now.
    pub fn publish(&self, ctx: &Context) {
        for r in lock(&self.running).values() {
            match &r.pass {
                Pass::Terminator(pass, http) => {
                    if let (Some(http), Some(policy)) = (http, (ctx.waypoint.policy)(&r.want.uid)) {
                        http.send_replace(policy);
                    }
                    pass.send_replace(());
                }
                Pass::Waypoint(pass) => {
                    if let Some(policy) = (ctx.waypoint.policy)(&r.want.uid) {
                        pass.send_replace(policy);
                    }
                }
            }
        }
    }

    fn end_unused_steering(&self, plane: &DataPlane) {
        let in_use: BTreeSet<String> = lock(&self.running)
            .values()
            .map(|r| r.want.uid.clone())
            .collect();
        let done: Vec<(String, Steered)> = {
            let mut steered = lock(&self.steered);
            let gone: Vec<String> = steered
                .keys()
                .filter(|uid| !in_use.contains(*uid))
                .cloned()
                .collect();
            gone.into_iter()
                .filter_map(|uid| steered.remove(&uid).map(|s| (uid, s)))
                .collect()
        };
        for (uid, s) in done {
            Self::detach(plane, &uid, s);
        }
    }

    /// Stops steering to a socket and closes it.
    fn close(plane: &DataPlane, r: Running) {
        let key = TermKey::new(r.want.ip, r.want.port);
        let removed = plane.with_datapath(|dp| match r.want.kind {
            Kind::Terminator { .. } => dp.remove_terminator(&key, r.cookie),
            Kind::Waypoint => dp.remove_waypoint(&key, r.cookie),
        });
        if let Err(e) = removed {
            tracing::error!(pod = %r.want.pod, port = r.want.port, error = %e, "cannot remove the agent's socket from the maps; its peers may still be steered to it");
        }
        r.task.abort();
        match r.want.kind {
            Kind::Terminator { .. } => {
                info!(pod = %r.want.pod, port = r.want.port, "no longer terminating external peers")
            }
            Kind::Waypoint => {
                info!(pod = %r.want.pod, port = r.want.port, "no longer checking the port's HTTP requests")
            }
        }
    }

    /// Ends the steering of pod `uid`'s namespace, if any.
    fn unsteer(&self, plane: &DataPlane, uid: &str) {
        let steered = lock(&self.steered).remove(uid);
        if let Some(s) = steered {
            Self::detach(plane, uid, s);
        }
    }

    fn detach(plane: &DataPlane, uid: &str, s: Steered) {
        // A namespace that is gone took the attachment with it.
        if let Err(e) = plane.with_datapath(|dp| dp.unsteer(s.link)) {
            debug!(pod_uid = %uid, error = %e, "steering already gone");
        }
    }

    /// The pod's namespace, with the steering program attached.
    fn steer(&self, plane: &DataPlane, want: &Want) -> Result<Arc<File>, ExternalError> {
        if let Some(s) = lock(&self.steered).get(&want.uid) {
            return Ok(s.netns.clone());
        }
        let crate::netns::PodNetns { file, inode } =
            crate::netns::open_pod(&want.cgroup).map_err(|e| match e {
                NetnsError::NoProcess(cgroup) => ExternalError::NoProcess(cgroup),
                NetnsError::HostNetwork => ExternalError::HostNetwork,
                NetnsError::Open { path, source } => ExternalError::Io {
                    what: format!("cannot open {}", path.display()),
                    source,
                },
            })?;
        let netns = Arc::new(file);
        let link = plane.with_datapath(|dp| dp.steer(netns.as_fd()))?;
        lock(&self.steered).insert(
            want.uid.clone(),
            Steered {
                netns: netns.clone(),
                inode,
                link,
            },
        );
        Ok(netns)
    }

    fn open(
        &self,
        plane: &DataPlane,
        want: &Want,
        ctx: &Context,
    ) -> Result<Running, ExternalError> {
        let netns = self.steer(plane, want)?;
        // Any address and port: ts_steer hands connections over whatever
        // the socket is bound to; connections made to its own port are
        // dropped by the handler.
        let listener = crate::netns::run_in(&netns, || {
            let l = std::net::TcpListener::bind((Ipv6Addr::UNSPECIFIED, 0))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .map_err(io("cannot open a socket in the pod's network namespace"))?;
        let cookie = rustix::net::sockopt::socket_cookie(&listener)
            .map_err(|e| io("cannot read the socket's cookie")(e.into()))?;
        let key = TermKey::new(want.ip, want.port);
        let (task, pass) = match want.kind {
            Kind::Terminator { http } => {
                let (http_pass, checked) = if http {
                    let policy =
                        (ctx.waypoint.policy)(&want.uid).ok_or(ExternalError::NoIdentity)?;
                    let (pass, policy) = watch::channel(policy);
                    let checked = Checked {
                        policy,
                        stats: ctx.waypoint.stats.clone(),
                    };
                    (Some(pass), Some(checked))
                } else {
                    (None, None)
                };
                let listener =
                    TcpListener::from_std(listener).map_err(io("cannot register the socket"))?;
                plane.with_datapath(|dp| dp.set_terminator(key, &listener, cookie))?;
                let (pass, passes) = watch::channel(());
                let task = tokio::spawn(serve(
                    listener,
                    Terminated {
                        want: Arc::new(want.clone()),
                        netns,
                        ctx: ctx.terminating.clone(),
                        passes,
                        checked,
                    },
                    (self.stats.clone(), self.limits.clone()),
                ));
                (task, Pass::Terminator(pass, http_pass))
            }
            Kind::Waypoint => {
                let policy = (ctx.waypoint.policy)(&want.uid).ok_or(ExternalError::NoIdentity)?;
                plane.with_datapath(|dp| dp.set_waypoint(key, &listener, cookie))?;
                let (pass, policies) = watch::channel(policy);
                let target = waypoint::Target {
                    uid: want.uid.clone(),
                    pod: want.pod.clone(),
                    addr: SocketAddr::new(want.ip, want.port),
                };
                let task = waypoint::spawn(listener, target, netns, policies, &ctx.waypoint)
                    .map_err(io("cannot start the waypoint's runtime"))?;
                (task, Pass::Waypoint(pass))
            }
        };
        Ok(Running {
            want: want.clone(),
            cookie,
            task,
            pass,
        })
    }
}

impl Drop for External {
    fn drop(&mut self) {
        for r in lock(&self.running).values() {
            r.task.abort();
        }
    }
}

/// What the connections of one terminator share.
#[derive(Clone)]
struct Terminated {
    want: Arc<Want>,
    netns: Arc<File>,
    ctx: Terminating,
    passes: watch::Receiver<()>,
    /// On a port with HTTP rules: how its requests are checked.
    checked: Option<Checked>,
}

/// The waypoint's side of a terminated port with HTTP rules.
#[derive(Clone)]
struct Checked {
    /// The pod's rules now (as the waypoint holds them).
    policy: watch::Receiver<Arc<Policy>>,
    /// The waypoint's counters.
    stats: Arc<proxy::Stats>,
}

async fn serve(
    listener: TcpListener,
    t: Terminated,
    (stats, limits): (Arc<Stats>, Arc<ConnLimits>),
) {
    loop {
        let (tcp, from) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(pod = %t.want.pod, error = %e, "accepting an external connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let slot = match limits.admit(from.ip()) {
            Ok(slot) => slot,
            Err(e) => {
                Stats::bump(&stats.connections_capped);
                debug!(pod = %t.want.pod, %from, reason = %e, "external connection closed at once");
                continue;
            }
        };
        let (t, stats) = (t.clone(), stats.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let from = SocketAddr::new(from.ip().to_canonical(), from.port());
            match handle(tcp, from, &t).await {
                Ok((peer, None)) => {
                    Stats::bump(&stats.external_admitted);
                    debug!(pod = %t.want.pod, %peer, %from, "external connection closed");
                }
                Ok((peer, Some(why))) => {
                    Stats::bump(&stats.external_admitted);
                    Stats::bump(&stats.external_revoked);
                    info!(pod = %t.want.pod, port = t.want.port, %peer, %from, reason = %why, "external connection ended: no longer admitted");
                }
                Err(e) => {
                    Stats::bump(&stats.external_refused);
                    warn!(pod = %t.want.pod, port = t.want.port, %from, error = %e, "external peer refused");
                }
            }
        });
    }
}

/// Waits until a forwarded connection of `peer_chain` is no longer
/// admitted (checked again on every pass of the agent); why.
async fn revoked(t: &mut Terminated, peer_chain: &[CertificateDer<'static>]) -> ExternalError {
    loop {
        if t.passes.changed().await.is_err() {
            return ExternalError::Unterminated;
        }
        let Some((_, spec, creds)) = (t.ctx)(&t.want.uid) else {
            return ExternalError::PodGone;
        };
        let peer = match creds.verify_client_chain(peer_chain) {
            Ok(peer) => peer,
            Err(e) => return ExternalError::NoLongerVerifies(e),
        };
        if let Err(why) = admits(spec.as_ref(), &peer, t.want.port) {
            return why.into();
        }
    }
}

/// Why a TLS handshake failed: a policy refusal's reason as it is,
/// anything else as rustls says it.
fn tls_failure(e: std::io::Error) -> ExternalError {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other))) => {
            ExternalError::Refused(other.0.to_string())
        }
        Some(rustls::Error::General(why)) => ExternalError::Svid(why.clone()),
        _ => ExternalError::Tls(e),
    }
}

/// A connection handed on to the workload, and why it ended if the agent
/// ended it.
type Outcome = (SpiffeId, Option<ExternalError>);

/// Terminates one connection and forwards it until either end closes or
/// the peer is no longer admitted; on a port with HTTP rules, each of its
/// requests is checked first.
async fn handle(
    tcp: TcpStream,
    from: SocketAddr,
    t: &Terminated,
) -> Result<Outcome, ExternalError> {
    let (tls, chain, peer) = accept(tcp, t).await?;
    let mut t = t.clone();
    // Passes before this one were about connections before it.
    t.passes.mark_unchanged();
    let Some(checked) = t.checked.clone() else {
        return forward(tls, peer, &chain, t).await;
    };
    info!(pod = %t.want.pod, port = t.want.port, %peer, "external peer admitted; its requests are checked against the port's HTTP rules");
    let protocol = match tls.get_ref().1.alpn_protocol() {
        Some(b"h2") => proxy::Protocol::Http2,
        _ => proxy::Protocol::Http1,
    };
    let port = checked.port(&t, &peer);
    tokio::select! {
        _ = proxy::serve_io(tls, protocol, from, port) => Ok((peer, None)),
        why = revoked(&mut t, &chain) => Ok((peer, Some(why))),
    }
}

/// A terminated connection: its TLS stream once the peer is verified and
/// admitted, the peer's chain and its SPIFFE ID.
type Accepted = (
    tokio_rustls::server::TlsStream<TcpStream>,
    Vec<CertificateDer<'static>>,
    SpiffeId,
);

/// The TLS handshake of a connection to `t`'s port, as the workload, with
/// the peer admitted by the workload's rules during it.
async fn accept(tcp: TcpStream, t: &Terminated) -> Result<Accepted, ExternalError> {
    let want = &t.want;
    let to = tcp
        .local_addr()
        .map_err(io("reading the connection's address"))?;
    if to.ip().to_canonical() != want.ip || to.port() != want.port {
        return Err(ExternalError::WrongDestination {
            to,
            ip: want.ip,
            port: want.port,
        });
    }
    let (local, spec, creds) = (t.ctx)(&want.uid).ok_or(ExternalError::NoIdentity)?;
    let port = want.port;
    let admit: Admit = Arc::new(move |peer: &SpiffeId| admits(spec.as_ref(), peer, port));
    let mut config = creds.terminator(&local, admit)?;
    if t.checked.is_some() {
        config = offering_http(&config);
    }
    let tls = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio_rustls::TlsAcceptor::from(config).accept(tcp),
    )
    .await
    .map_err(|_| ExternalError::HandshakeTimeout)?
    .map_err(tls_failure)?;
    let chain: Vec<CertificateDer<'static>> = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(<[_]>::to_vec)
        .unwrap_or_default();
    let peer = chain
        .first()
        .and_then(|leaf| tessera_api::svid::leaf(leaf).ok())
        .map(|l| l.id)
        .ok_or(ExternalError::PeerGone)?;
    Ok((tls, chain, peer))
}

/// Forwards a terminated connection's bytes to the workload until either
/// end closes or the peer is no longer admitted.
async fn forward(
    mut tls: tokio_rustls::server::TlsStream<TcpStream>,
    peer: SpiffeId,
    chain: &[CertificateDer<'static>],
    mut t: Terminated,
) -> Result<Outcome, ExternalError> {
    let mut upstream = connect_upstream(&t, &peer).await?;
    info!(pod = %t.want.pod, port = t.want.port, %peer, "external peer admitted");
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream) => Ok((peer, None)),
        why = revoked(&mut t, chain) => Ok((peer, Some(why))),
    }
}

/// `config` offering HTTP/2 and HTTP/1.1 by ALPN (a client offering
/// neither, or nothing, is served HTTP/1.1).
fn offering_http(config: &rustls::ServerConfig) -> Arc<rustls::ServerConfig> {
    let mut config = config.clone();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

impl Checked {
    /// The waypoint's view of one terminated connection to the workload
    /// port of `t`: its rules, and `peer` (verified in the handshake, and
    /// checked again on every pass by [`revoked`]) as the source of every
    /// request.
    fn port(&self, t: &Terminated, peer: &SpiffeId) -> Arc<proxy::Port> {
        let source = proxy::Peer {
            source: tessera_waypoint::policy::Source {
                id: Some(peer.clone()),
                authenticated: true,
            },
            generation: 0,
        };
        waypoint::port(
            SocketAddr::new(t.want.ip, t.want.port),
            t.netns.clone(),
            self.policy.clone(),
            Arc::new(move |_| source.clone()),
            self.stats.clone(),
        )
    }
}

/// A plain TCP connection to the workload's port over its loopback.
async fn connect_upstream(t: &Terminated, peer: &SpiffeId) -> Result<TcpStream, ExternalError> {
    let addr = tessera_waypoint::proxy::loopback(SocketAddr::new(t.want.ip, t.want.port));
    crate::netns::connect_in(t.netns.clone(), addr, UPSTREAM_TIMEOUT)
        .await
        .map_err(|source| ExternalError::Upstream {
            peer: peer.clone(),
            addr,
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_api::crd::identity_policy::CompiledPeer;

    fn rule(
        action: PolicyAction,
        from: &[&str],
        ports: &[(i32, Option<i32>)],
        ext: ExternalPeers,
    ) -> CompiledRule {
        CompiledRule {
            action,
            from: from
                .iter()
                .map(|p| CompiledPeer {
                    spiffe_id_prefixes: vec![(*p).to_owned()],
                    ..Default::default()
                })
                .collect(),
            ports: ports
                .iter()
                .map(|(port, end_port)| PortRange::tcp(*port, *end_port))
                .collect(),
            external_peers: ext,
            ..Default::default()
        }
    }

    fn spec(rules: Vec<CompiledRule>) -> IdentityPolicySpec {
        IdentityPolicySpec {
            spiffe_id: "spiffe://cluster.test/ns/shop/web".into(),
            default_deny: true,
            rules,
            sources: vec!["shop/partners".into()],
        }
    }

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    #[test]
    fn only_terminate_rules_of_allow_policies_open_ports() {
        use PolicyAction::{Allow, Deny};
        const T: ExternalPeers = ExternalPeers::TerminateTls;
        const N: ExternalPeers = ExternalPeers::Deny;
        let s = spec(vec![
            rule(
                Allow,
                &["spiffe://b.test"],
                &[(8443, None), (9000, Some(9002))],
                T,
            ),
            rule(Allow, &["spiffe://cluster.test"], &[(80, None)], N),
            rule(Deny, &["spiffe://b.test/bad"], &[(7000, None)], T),
        ]);
        let none = BTreeSet::new();
        assert_eq!(
            terminated_ports(&s, &none).into_iter().collect::<Vec<_>>(),
            [8443, 9000, 9001, 9002]
        );
        let wide = spec(vec![rule(Allow, &[], &[(1000, Some(2000))], T)]);
        assert_eq!(terminated_ports(&wide, &none).len(), MAX_TERMINATED_PORTS);
    }

    /// A GET-only rule for `from` on `port`.
    fn get_only(
        action: PolicyAction,
        from: &[&str],
        port: i32,
        ext: ExternalPeers,
    ) -> CompiledRule {
        CompiledRule {
            http: vec![tessera_api::crd::auth_policy::HttpRule {
                methods: vec![tessera_api::crd::auth_policy::HttpMethod::Get],
                paths: Vec::new(),
                headers: Vec::new(),
            }],
            ..rule(action, from, &[(port, None)], ext)
        }
    }

    #[test]
    fn ports_with_http_rules_are_terminated_only_where_the_waypoint_checks_them() {
        use PolicyAction::Allow;
        const T: ExternalPeers = ExternalPeers::TerminateTls;
        let s = spec(vec![
            rule(Allow, &["spiffe://b.test"], &[(8443, None)], T),
            get_only(Allow, &["spiffe://b.test"], 8080, T),
            get_only(Allow, &["spiffe://b.test"], 8081, T),
        ]);
        let checked = BTreeSet::from([8080]);
        assert_eq!(
            terminated_ports(&s, &checked)
                .into_iter()
                .collect::<Vec<_>>(),
            [8080, 8443],
            "8081 has HTTP rules nothing checks: not terminated"
        );
    }

    #[test]
    fn a_deny_rule_with_http_rules_denies_requests_not_the_connection() {
        use PolicyAction::{Allow, Deny};
        const T: ExternalPeers = ExternalPeers::TerminateTls;
        const N: ExternalPeers = ExternalPeers::Deny;
        let s = spec(vec![
            rule(Allow, &["spiffe://b.test/client"], &[(8080, None)], T),
            get_only(Deny, &["spiffe://b.test/client"], 8080, N),
        ]);
        assert!(admits(Some(&s), &id("spiffe://b.test/client"), 8080).is_ok());
        let s = spec(vec![
            rule(Allow, &["spiffe://b.test/client"], &[(8080, None)], T),
            rule(Deny, &["spiffe://b.test/client"], &[(8080, None)], N),
        ]);
        assert!(admits(Some(&s), &id("spiffe://b.test/client"), 8080).is_err());
    }

    #[test]
    fn admission_follows_the_rules() {
        use PolicyAction::{Allow, Deny};
        const T: ExternalPeers = ExternalPeers::TerminateTls;
        const N: ExternalPeers = ExternalPeers::Deny;
        let s = spec(vec![
            rule(Allow, &["spiffe://b.test/client"], &[(8443, None)], T),
            rule(Allow, &["spiffe://b.test/mesh-only"], &[(8443, None)], N),
            rule(Deny, &["spiffe://b.test/client/banned"], &[], N),
        ]);
        assert!(admits(Some(&s), &id("spiffe://b.test/client"), 8443).is_ok());
        assert!(admits(Some(&s), &id("spiffe://b.test/client/x"), 8443).is_ok());
        let other = admits(Some(&s), &id("spiffe://b.test/other"), 8443).unwrap_err();
        assert!(
            matches!(&other, Refusal::NotAllowed { sources, .. } if sources == "shop/partners"),
            "{other}"
        );
        assert!(admits(Some(&s), &id("spiffe://b.test/client"), 8444).is_err());
        assert!(
            admits(Some(&s), &id("spiffe://b.test/mesh-only"), 8443).is_err(),
            "a rule without TerminateTLS admits no external peer"
        );
        let banned = admits(Some(&s), &id("spiffe://b.test/client/banned"), 8443).unwrap_err();
        assert!(matches!(banned, Refusal::Denied { .. }), "{banned}");
        assert_eq!(
            admits(None, &id("spiffe://b.test/client"), 8443),
            Err(Refusal::NoPolicy)
        );
    }
}
