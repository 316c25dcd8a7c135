//! The proxy with real clients over loopback: curl (HTTP/1.1 and HTTP/2
//! with prior knowledge) and hyper's client, in front of a real hyper
//! server that records what reaches it. The peer is named by the client's
//! address (127.0.0.1 is `web`, 127.0.0.2 `other`), as the agent names it
//! by the data path's view.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tessera_api::crd::IdentityPolicySpec;
use tessera_api::crd::auth_policy::{
    HeaderMatch, HttpMethod, HttpRule, PathMatch, PathMatchType, PolicyAction, PortRange,
};
use tessera_api::crd::identity_policy::{CompiledPeer, CompiledRule};
use tessera_waypoint::policy::{Rules, Source};
use tessera_waypoint::proxy::{self, Peer, Policy, Port, Stats};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const DB: &str = "spiffe://cluster.test/ns/shop/sa/db";
const WEB: &str = "spiffe://cluster.test/ns/shop/sa/web";
const OTHER: &str = "spiffe://cluster.test/ns/shop/sa/other";

/// What the workload saw of one request.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    method: String,
    path: String,
    xfcc: Option<String>,
    version: http::Version,
}

type Log = Arc<Mutex<Vec<Seen>>>;

/// The workload: answers 200 with the path, echoes the bytes of an
/// `Upgrade: echo` connection, and records every request.
async fn workload() -> (SocketAddr, Log, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log: Log = Arc::default();
    let seen = log.clone();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            count.fetch_add(1, Ordering::Relaxed);
            let seen = seen.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| answer(req, seen.clone()));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (addr, log, accepted)
}

async fn answer(
    mut req: Request<Incoming>,
    seen: Log,
) -> Result<Response<Full<Bytes>>, Infallible> {
    seen.lock().unwrap().push(Seen {
        method: req.method().to_string(),
        path: req.uri().path().to_owned(),
        xfcc: req
            .headers()
            .get("x-forwarded-client-cert")
            .map(|v| v.to_str().unwrap().to_owned()),
        version: req.version(),
    });
    if req.headers().get("upgrade").is_some() {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let mut io = TokioIo::new(upgrade.await.unwrap());
            let mut buf = [0u8; 64];
            while let Ok(n) = io.read(&mut buf).await {
                if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut().insert("upgrade", "echo".parse().unwrap());
        r.headers_mut()
            .insert("connection", "upgrade".parse().unwrap());
        return Ok(r);
    }
    Ok(Response::new(Full::new(Bytes::from(format!(
        "ok {}\n",
        req.uri().path()
    )))))
}

fn peer(id: &str) -> CompiledPeer {
    CompiledPeer {
        spiffe_ids: Some(vec![id.into()]),
        ..Default::default()
    }
}

/// db's rules: web may GET (or HEAD) /api/* and POST /upload with an
/// `x-tenant` header; everyone may open `/ws`; nobody may read
/// /api/secret.
fn spec() -> IdentityPolicySpec {
    let allow = |from: Vec<CompiledPeer>, http: HttpRule| CompiledRule {
        action: PolicyAction::Allow,
        from,
        ports: vec![PortRange::tcp(8080, None)],
        http: vec![http],
        ..Default::default()
    };
    let path = |t, v: &str| PathMatch {
        match_type: t,
        value: v.into(),
    };
    IdentityPolicySpec {
        spiffe_id: DB.into(),
        default_deny: true,
        rules: vec![
            allow(
                vec![peer(WEB)],
                HttpRule {
                    methods: vec![HttpMethod::Get, HttpMethod::Head],
                    paths: vec![path(PathMatchType::Prefix, "/api")],
                    headers: Vec::new(),
                },
            ),
            allow(
                vec![peer(WEB)],
                HttpRule {
                    methods: vec![HttpMethod::Post],
                    paths: vec![path(PathMatchType::Exact, "/upload")],
                    headers: vec![HeaderMatch {
                        name: "X-Tenant".into(),
                        exact: None,
                        prefix: None,
                    }],
                },
            ),
            allow(
                Vec::new(),
                HttpRule {
                    methods: Vec::new(),
                    paths: vec![path(PathMatchType::Exact, "/ws")],
                    headers: Vec::new(),
                },
            ),
            CompiledRule {
                action: PolicyAction::Deny,
                ports: vec![PortRange::tcp(8080, None)],
                http: vec![HttpRule {
                    methods: Vec::new(),
                    paths: vec![path(PathMatchType::Prefix, "/api/secret")],
                    headers: Vec::new(),
                }],
                ..Default::default()
            },
        ],
        sources: vec!["shop/db-http".into()],
    }
}

fn policy(spec: &IdentityPolicySpec, version: u64) -> Arc<Policy> {
    Arc::new(Policy {
        workload: DB.into(),
        rules: Ok(Arc::new(Rules::compile(spec).unwrap())),
        policies: spec.sources.join(", ").into(),
        version,
    })
}

/// Who each loopback address is; changed by tests.
type Names = Arc<Mutex<Vec<(IpAddr, &'static str)>>>;

struct Waypoint {
    addr: SocketAddr,
    log: Log,
    /// Connections the workload accepted.
    accepted: Arc<AtomicUsize>,
    stats: Arc<Stats>,
    policy: watch::Sender<Arc<Policy>>,
    names: Names,
}

impl Waypoint {
    async fn start() -> Waypoint {
        let (upstream, log, accepted) = workload().await;
        let (policy, rx) = watch::channel(policy(&spec(), 1));
        let names: Names = Arc::new(Mutex::new(vec![
            ("127.0.0.1".parse().unwrap(), WEB),
            ("127.0.0.2".parse().unwrap(), OTHER),
        ]));
        let named = names.clone();
        let stats = Arc::new(Stats::default());
        let port = Port::new(
            8080,
            rx,
            Arc::new(move |ip| {
                let id = named
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|(a, _)| *a == ip)
                    .map(|(_, id)| id.parse().unwrap());
                Peer {
                    source: Source {
                        id,
                        authenticated: true,
                    },
                    generation: 1,
                }
            }),
            Arc::new(move || Box::pin(TcpStream::connect(upstream))),
            stats.clone(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (tcp, from) = listener.accept().await.unwrap();
                tokio::spawn(proxy::serve(tcp, from, port.clone()));
            }
        });
        Waypoint {
            addr,
            log,
            accepted,
            stats,
            policy,
            names,
        }
    }

    /// curl's status code and body for each of `paths`: on one connection
    /// over HTTP/1.1; over HTTP/2 one connection each, as Debian's curl
    /// 7.88.1 fails to reuse a prior-knowledge connection ("Error in the
    /// HTTP2 framing layer", against a plain hyper server too). Streams
    /// side by side on one connection are tested with hyper's client.
    async fn curl(&self, from: &str, args: &[&str], paths: &[&str]) -> Vec<(u16, String)> {
        if args.contains(&"--http2-prior-knowledge") && paths.len() > 1 {
            let mut answers = Vec::new();
            for p in paths {
                answers.extend(Box::pin(self.curl(from, args, &[p])).await);
            }
            return answers;
        }
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--interface", from]).args(args);
        for (i, p) in paths.iter().enumerate() {
            if i > 0 {
                cmd.arg("--next").args(["--interface", from]).args(args);
            }
            // --path-as-is: curl would squash the dot segments itself.
            cmd.args(["--path-as-is", "-w", "\n%{http_code}\n"])
                .arg(format!("http://{}{p}", self.addr));
        }
        let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let mut lines: Vec<&str> = text.lines().collect();
        let mut answers = Vec::new();
        // Each answer: its body lines, then the status line.
        let mut body = String::new();
        for line in lines.drain(..) {
            if let Ok(code) = line.parse::<u16>()
                && line.len() == 3
            {
                answers.push((code, std::mem::take(&mut body)));
            } else {
                body.push_str(line);
            }
        }
        answers
    }

    fn seen(&self) -> Vec<Seen> {
        self.log.lock().unwrap().clone()
    }
}

async fn refused_requests_never_reach_the_workload(http2: bool) {
    let w = Waypoint::start().await;
    let mut args = vec![];
    if http2 {
        args.push("--http2-prior-knowledge");
    }
    let answers = w
        .curl(
            "127.0.0.1",
            &args,
            &[
                "/api/items",
                "/public/../admin",
                "//admin",
                "/%2Fadmin",
                "/api/%2e%2e/admin",
                "/api/secret/key",
                "/upload",
                "/api/./items/../orders",
            ],
        )
        .await;
    let codes: Vec<u16> = answers.iter().map(|(c, _)| *c).collect();
    assert_eq!(
        codes,
        [200, 403, 403, 400, 403, 403, 403, 200],
        "{answers:?}"
    );
    assert_eq!(answers[0].1, "ok /api/items");
    assert_eq!(answers[1].1, "forbidden", "a short body naming no policy");
    // The canonical path is the one forwarded.
    assert_eq!(answers[7].1, "ok /api/orders");
    let seen = w.seen();
    let paths: Vec<&str> = seen.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(paths, ["/api/items", "/api/orders"], "{seen:?}");
    let version = if http2 {
        http::Version::HTTP_2
    } else {
        http::Version::HTTP_11
    };
    assert!(seen.iter().all(|s| s.version == version), "{seen:?}");
    assert_eq!(w.stats.allowed.load(Ordering::Relaxed), 2);
    assert_eq!(w.stats.bad_path.load(Ordering::Relaxed), 1);
    assert_eq!(w.stats.denied_rule.load(Ordering::Relaxed), 1);
    assert_eq!(w.stats.denied_not_allowed.load(Ordering::Relaxed), 4);
}

#[tokio::test]
async fn http1_refused_requests_never_reach_the_workload() {
    refused_requests_never_reach_the_workload(false).await;
}

#[tokio::test]
async fn http2_refused_requests_never_reach_the_workload() {
    refused_requests_never_reach_the_workload(true).await;
}

#[tokio::test]
async fn methods_and_required_headers_are_checked() {
    let w = Waypoint::start().await;
    let post = ["-X", "POST", "-d", "x"];
    let without = w.curl("127.0.0.1", &post, &["/upload"]).await;
    let with = w
        .curl(
            "127.0.0.1",
            &["-X", "POST", "-d", "x", "-H", "x-tenant: t1"],
            &["/upload"],
        )
        .await;
    let delete = w
        .curl("127.0.0.1", &["-X", "DELETE"], &["/api/items"])
        .await;
    assert_eq!(without[0].0, 403);
    assert_eq!(with[0].0, 200);
    assert_eq!(delete[0].0, 403);
    let seen = w.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].method, "POST");
}

#[tokio::test]
async fn another_identity_is_refused_the_same_request() {
    let w = Waypoint::start().await;
    let web = w.curl("127.0.0.1", &[], &["/api/items"]).await;
    let other = w.curl("127.0.0.2", &[], &["/api/items"]).await;
    assert_eq!((web[0].0, other[0].0), (200, 403));
    assert_eq!(w.seen().len(), 1);
}

#[tokio::test]
async fn the_client_cannot_set_the_identity_header() {
    let w = Waypoint::start().await;
    let forged = format!("x-forwarded-client-cert: By={DB};URI={OTHER}");
    let answers = w.curl("127.0.0.1", &["-H", &forged], &["/api/items"]).await;
    assert_eq!(answers[0].0, 200);
    assert_eq!(
        w.seen()[0].xfcc.as_deref(),
        Some(format!("By={DB};URI={WEB}").as_str())
    );
}

/// An HTTP/1.1 or HTTP/2 client connection of hyper's to the waypoint.
enum Client {
    Http1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

impl Client {
    async fn connect(addr: SocketAddr, http2: bool) -> Client {
        let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
        if http2 {
            let (s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .unwrap();
            tokio::spawn(conn);
            Client::Http2(s)
        } else {
            let (s, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            Client::Http1(s)
        }
    }

    async fn get(&mut self, addr: SocketAddr, path: &str) -> Result<StatusCode, hyper::Error> {
        let req = Request::get(format!("http://{addr}{path}"))
            .header("host", addr.to_string())
            .body(Empty::new())
            .unwrap();
        let response = match self {
            Client::Http1(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
            Client::Http2(s) => s.send_request(req).await?,
        };
        let status = response.status();
        response.into_body().collect().await?;
        Ok(status)
    }
}

async fn a_policy_change_applies_to_the_next_request(http2: bool) {
    let w = Waypoint::start().await;
    let mut client = Client::connect(w.addr, http2).await;
    assert_eq!(client.get(w.addr, "/api/items").await.unwrap(), 200);
    let mut stricter = spec();
    stricter.rules[0].http[0].paths[0].value = "/api/public".into();
    w.policy.send_replace(policy(&stricter, 2));
    assert_eq!(client.get(w.addr, "/api/items").await.unwrap(), 403);
    assert_eq!(client.get(w.addr, "/api/public/x").await.unwrap(), 200);
    assert_eq!(w.stats.connections.load(Ordering::Relaxed), 1);
    assert_eq!(w.seen().len(), 2);
}

#[tokio::test]
async fn http1_keep_alive_gets_the_new_policy_on_its_next_request() {
    a_policy_change_applies_to_the_next_request(false).await;
}

#[tokio::test]
async fn http2_policy_change_applies_to_the_next_stream() {
    a_policy_change_applies_to_the_next_request(true).await;
}

#[tokio::test]
async fn a_connection_whose_peer_changed_is_closed() {
    let w = Waypoint::start().await;
    let mut client = Client::connect(w.addr, false).await;
    assert_eq!(client.get(w.addr, "/api/items").await.unwrap(), 200);
    // The address now names another identity (the pod behind it was
    // replaced): the next pass closes the connection.
    w.names.lock().unwrap()[0].1 = OTHER;
    w.policy.send_replace(policy(&spec(), 2));
    let mut closed = false;
    for _ in 0..100 {
        if client.get(w.addr, "/api/items").await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(closed, "the connection outlived its peer");
    assert_eq!(w.stats.revoked.load(Ordering::Relaxed), 1);
    assert_eq!(w.seen().len(), 1, "nothing forwarded after the change");
}

/// Sends an `Upgrade: echo` request for `path` on a raw connection; the
/// status line, and after a 101 what the workload echoes back.
async fn upgrade(addr: SocketAddr, path: &str) -> (String, Option<String>) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let head =
        format!("GET {path} HTTP/1.1\r\nhost: db\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n");
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before a response");
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got).into_owned();
    let status = text.lines().next().unwrap().to_owned();
    if !status.contains(" 101 ") {
        return (status, None);
    }
    tcp.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    tcp.read_exact(&mut echo).await.unwrap();
    (status, Some(String::from_utf8_lossy(&echo).into_owned()))
}

#[tokio::test]
async fn upgrades_are_checked_then_spliced() {
    let w = Waypoint::start().await;
    let (status, echo) = upgrade(w.addr, "/ws").await;
    assert!(status.contains(" 101 "), "{status}");
    assert_eq!(echo.as_deref(), Some("ping"));
    let (status, echo) = upgrade(w.addr, "/api/secret/ws").await;
    assert!(status.contains(" 403 "), "{status}");
    assert_eq!(echo, None);
    let paths: Vec<String> = w.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(paths, ["/ws"]);
}

#[tokio::test]
async fn what_is_not_http_reaches_nothing() {
    let w = Waypoint::start().await;
    let mut tcp = TcpStream::connect(w.addr).await.unwrap();
    tcp.write_all(b"\x16\x03\x01\x00\x05hello not http\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tcp.read_to_end(&mut buf).await;
    assert!(w.seen().is_empty());
}

#[tokio::test]
async fn client_connections_share_the_workload_connections() {
    let w = Waypoint::start().await;
    for http2 in [false, true] {
        for _ in 0..3 {
            let mut client = Client::connect(w.addr, http2).await;
            assert_eq!(client.get(w.addr, "/api/items").await.unwrap(), 200);
            // The connection goes back to the pool once its response is read.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    // Three client connections in turn, each protocol: one connection to
    // the workload each (the HTTP/1.1 one back in the pool between).
    assert_eq!(w.stats.connections.load(Ordering::Relaxed), 6);
    assert_eq!(w.accepted.load(Ordering::Relaxed), 2);
    // Refused requests dial nothing.
    let other = Waypoint::start().await;
    let mut client = Client::connect(other.addr, false).await;
    assert_eq!(client.get(other.addr, "/admin").await.unwrap(), 403);
    assert_eq!(other.accepted.load(Ordering::Relaxed), 0);
}
