//! One client connection: served with hyper (HTTP/1.1 or HTTP/2 by its
//! preface), each request gated with the rules held when it arrives, and
//! closed when its peer changes.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue, UPGRADE};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::preface::{Protocol, detect};
use super::{Peer, Policy, Port, Stats};
use crate::policy::{Decision, Gate, Refusal, Source, gate, identity_header, is_grpc};

/// What the client gets: the workload's body, or the waypoint's own.
type Body = Either<Incoming, Full<Bytes>>;

/// How a connection ended.
#[derive(Debug)]
pub enum Ended {
    /// The client (or hyper, on a protocol error) closed it; the error if
    /// any. An upgraded connection goes on after this.
    Closed(Option<Box<dyn std::error::Error + Send + Sync>>),
    /// Its peer changed since it began: the waypoint closed it.
    PeerChanged {
        /// The peer it began with.
        was: Peer,
        /// The peer at that address now.
        now: Peer,
    },
    /// The waypoint no longer serves the port.
    Unserved,
}

struct Conn {
    port: Arc<Port>,
    from: SocketAddr,
    /// The peer as named when the connection began.
    peer: Peer,
    /// The policy version the peer was last found unchanged at.
    checked: AtomicU64,
    /// The identity header the workload gets on this connection's requests.
    identity: Option<HeaderValue>,
}

/// Serves one TCP connection from `from` to the workload port `port`
/// until either side closes it or its peer changes; its protocol is told
/// by its first bytes.
pub async fn serve(tcp: TcpStream, from: SocketAddr, port: Arc<Port>) -> Ended {
    match detect(&tcp).await {
        Ok(protocol) => serve_io(tcp, protocol, from, port).await,
        Err(e) => Ended::Closed(Some(Box::new(e))),
    }
}

/// Serves one connection speaking `protocol` (as [`serve`] does; for
/// streams whose protocol is known otherwise, such as by ALPN).
pub async fn serve_io<IO>(io: IO, protocol: Protocol, from: SocketAddr, port: Arc<Port>) -> Ended
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    Stats::bump(&port.stats.connections);
    let mut policy = port.policy.clone();
    let (version, workload) = {
        let now = policy.borrow_and_update();
        (now.version, now.workload.clone())
    };
    let peer = (port.identify)(from.ip());
    let conn = Arc::new(Conn {
        identity: identity_header(&workload, &peer.source),
        peer,
        from,
        checked: AtomicU64::new(version),
        port,
    });
    let service = {
        let conn = conn.clone();
        service_fn(move |req| {
            let conn = conn.clone();
            async move { Ok::<_, Infallible>(conn.handle(req).await) }
        })
    };
    let io = TokioIo::new(io);
    // Boxed: a connection's future holds the larger of the two protocols'
    // states otherwise (HTTP/2's is twice HTTP/1.1's), idle or not.
    let serving: Pin<Box<dyn Future<Output = Result<(), hyper::Error>> + Send>> = match protocol {
        Protocol::Http1 => Box::pin(
            http1::Builder::new()
                .serve_connection(io, service)
                .with_upgrades(),
        ),
        Protocol::Http2 => {
            Box::pin(http2::Builder::new(TokioExecutor::new()).serve_connection(io, service))
        }
    };
    tokio::select! {
        served = serving => Ended::Closed(served.err().map(Into::into)),
        ended = conn.changed(policy) => {
            Stats::bump(&conn.port.stats.revoked);
            ended
        }
    }
}

impl Conn {
    /// Waits until the peer at the connection's address is no longer the
    /// one it began with (asked again on each new policy).
    async fn changed(&self, mut policy: watch::Receiver<Arc<Policy>>) -> Ended {
        loop {
            let now = (self.port.identify)(self.from.ip());
            if now != self.peer {
                return Ended::PeerChanged {
                    was: self.peer.clone(),
                    now,
                };
            }
            if policy.changed().await.is_err() {
                return Ended::Unserved;
            }
        }
    }

    /// The answer to one request.
    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let policy = self.port.policy.borrow().clone();
        if policy.version != self.checked.load(Ordering::Relaxed) {
            if (self.port.identify)(self.from.ip()) != self.peer {
                // The connection is about to be closed (see `changed`).
                Stats::bump(&self.port.stats.peer_changed);
                return refusal(&not_allowed(&req));
            }
            self.checked.store(policy.version, Ordering::Relaxed);
        }
        let rules = match &policy.rules {
            Ok(rules) => rules.clone(),
            Err(why) => {
                Stats::bump(&self.port.stats.no_rules);
                warn!(workload = %policy.workload, port = self.port.port, error = %why, "request refused: the workload's HTTP rules cannot be enforced");
                return refusal(&not_allowed(&req));
            }
        };
        let (method, target) = (req.method().clone(), req.uri().clone());
        match gate(
            &rules,
            &self.peer.source,
            self.identity.as_ref(),
            self.port.port,
            req,
        ) {
            Gate::Refuse(refused, body) => {
                self.log_refusal(&policy, &refused, &method, &target);
                drain(body);
                refusal(&refused)
            }
            Gate::Forward(req) => self.forward(req).await,
        }
    }

    /// Sends an allowed request to the workload; splices an accepted
    /// upgrade.
    async fn forward(self: Arc<Self>, mut req: Request<Incoming>) -> Response<Body> {
        let client_side = req
            .headers()
            .contains_key(UPGRADE)
            .then(|| hyper::upgrade::on(&mut req));
        match self.port.upstream.send(req).await {
            Ok((response, workload_side)) => {
                Stats::bump(&self.port.stats.allowed);
                if let (Some(client), Some(workload)) = (client_side, workload_side) {
                    tokio::spawn(self.clone().splice(client, workload));
                }
                response.map(Either::Left)
            }
            Err(e) => {
                Stats::bump(&self.port.stats.upstream_failed);
                warn!(port = self.port.port, from = %self.from, error = %e, "request allowed but not forwarded (502)");
                plain(StatusCode::BAD_GATEWAY, "bad gateway\n")
            }
        }
    }

    /// Copies the bytes of an upgraded connection both ways until either
    /// side closes it or its peer changes.
    async fn splice(
        self: Arc<Self>,
        client: hyper::upgrade::OnUpgrade,
        workload: hyper::upgrade::OnUpgrade,
    ) {
        let (client, workload) = match tokio::join!(client, workload) {
            (Ok(c), Ok(w)) => (c, w),
            (Err(e), _) | (_, Err(e)) => {
                debug!(from = %self.from, error = %e, "upgrade not completed");
                return;
            }
        };
        let (mut client, mut workload) = (TokioIo::new(client), TokioIo::new(workload));
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut client, &mut workload) => {}
            ended = self.changed(self.port.policy.clone()) => {
                Stats::bump(&self.port.stats.revoked);
                info!(from = %self.from, port = self.port.port, ?ended, "upgraded connection closed: its peer changed");
            }
        }
    }

    fn log_refusal(&self, policy: &Policy, refused: &Refusal, method: &Method, target: &Uri) {
        let stats = &self.port.stats;
        let source = who(&self.peer.source);
        match refused {
            Refusal::BadPath { error, .. } => {
                Stats::bump(&stats.bad_path);
                info!(workload = %policy.workload, port = self.port.port, %source, %method, path = %target, %error, "request refused (400): its path cannot be matched safely");
            }
            Refusal::Denied { decision, .. } => {
                let (counter, rule) = match decision {
                    Decision::DeniedByRule(i) => (&stats.denied_rule, Some(*i)),
                    _ => (&stats.denied_not_allowed, None),
                };
                Stats::bump(counter);
                info!(workload = %policy.workload, port = self.port.port, %source, authenticated = self.peer.source.authenticated, policies = %policy.policies, ?rule, reason = decision.reason().unwrap_or("allow"), %method, path = %target, "request denied (403)");
            }
        }
    }
}

/// Most of a refused request's body read (and dropped) so that its
/// client may finish sending it.
const DRAIN_BYTES: usize = 1 << 20;
/// Longest a refused request's body is read.
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(2);

/// Reads a refused request's body to its end (at most [`DRAIN_BYTES`]
/// within [`DRAIN_TIME`]) and drops it: an HTTP/2 stream then ends
/// normally rather than being reset, and an HTTP/1.1 connection can go
/// on to its next request.
fn drain(mut body: Incoming) {
    use http_body_util::BodyExt;
    if hyper::body::Body::is_end_stream(&body) {
        return;
    }
    tokio::spawn(tokio::time::timeout(DRAIN_TIME, async move {
        let mut read = 0;
        while let Some(Ok(frame)) = body.frame().await {
            read += frame.data_ref().map_or(0, Bytes::len);
            if read > DRAIN_BYTES {
                break;
            }
        }
    }));
}

/// A source for logs.
fn who(source: &Source) -> String {
    source
        .id
        .as_ref()
        .map_or_else(|| "<no identity>".to_owned(), ToString::to_string)
}

/// The refusal of a request no rule can allow now.
fn not_allowed<B>(req: &Request<B>) -> Refusal {
    Refusal::Denied {
        decision: Decision::NotAllowed,
        grpc: is_grpc(req),
    }
}

fn refusal(refused: &Refusal) -> Response<Body> {
    refused
        .response()
        .map(|text| Either::Right(Full::new(Bytes::from_static(text.as_bytes()))))
}

fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::from_static(
        text.as_bytes(),
    ))));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}
