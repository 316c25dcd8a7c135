//! HTTP rules end to end, as root: etcd and kube-apiserver, the operator,
//! an agent per simulated node with real eBPF programs, pods as network
//! namespaces with cgroups, the workload a real HTTP/1.1 and h2c server
//! (Go's net/http, the `workload` test program) that logs every request it
//! gets, and curl as the client in the pods.
//!
//! Shows: every request to the port with HTTP rules is checked with the
//! identity the agents authenticated (one pod gets 200, another 403 on the
//! same request); forbidden methods, dot segments, doubled slashes,
//! encoded slashes and missing headers are refused over HTTP/1.1 and
//! HTTP/2 and never reach the workload; h2load's multiplexed streams are
//! each checked (exact counts); grpcurl's allowed call succeeds, a denied
//! one gets PermissionDenied, a server-streaming call streams; a
//! connection kept alive from
//! before the port had HTTP rules is reset when it gets them; a client's
//! `x-forwarded-client-cert` is replaced; a WebSocket is checked then
//! spliced; with the agent killed (`kill -9`) the port refuses while a
//! port without HTTP rules keeps working, and service resumes with the
//! agent; a connection kept alive across a policy change gets the new
//! rules on its next request; the policy's status says the rules are
//! enforced.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use kube::api::{Api, Patch, PatchParams};
use tessera_api::crd::{AuthPolicy, CONDITION_HTTP_RULES};
use tessera_tests::cluster::{SimCluster, SimPod};
use tessera_tests::procs::KillOnDrop;
use tessera_tests::resources;

mod common;
use common::HttpServer;

/// The port with HTTP rules.
const HTTP_PORT: u16 = 8080;
/// A port without: plain TCP.
const TCP_PORT: u16 = 5432;
const WEB_ID: &str = "spiffe://cluster.test/ns/shop/sa/web";

/// db's rules: web may GET /api/* and POST /upload with an x-tenant
/// header, and open /ws; other may only GET /status; both reach the plain
/// port.
const POLICY: &str = "apiVersion: tessera.dev/v1alpha1
kind: AuthPolicy
metadata: {name: db-http, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  rules:
  - from: [{podSelector: {matchLabels: {app: web}}}]
    ports: [{port: 8080}]
    http:
    - {methods: [GET], paths: [{type: Prefix, value: /api}, {type: Exact, value: /ws}]}
    - {methods: [POST], paths: [{type: Exact, value: /upload}], headers: [{name: x-tenant}]}
  - from: [{podSelector: {matchLabels: {app: other}}}]
    ports: [{port: 8080}]
    http: [{methods: [GET], paths: [{type: Exact, value: /status}]}]
  - from: [{podSelector: {matchLabels: {app: web}}}, {podSelector: {matchLabels: {app: other}}}]
    ports: [{port: 5432}]
  - from: [{podSelector: {matchLabels: {app: web}}}]
    ports: [{port: 8079}]
    http:
    - paths:
      - {type: Regex, value: '/grpc\\.reflection\\.v1(alpha)?\\.ServerReflection/ServerReflectionInfo'}
      - {type: Exact, value: /fgrpc.PingServer/Ping}
      - {type: Exact, value: /grpc.health.v1.Health/Watch}
";

/// fortio's gRPC server in db: reflection, health and its ping service.
const GRPC_PORT: u16 = 8079;

/// db-http before it has HTTP rules: web reaches both ports, other the
/// plain one.
const PLAIN_POLICY: &str = "apiVersion: tessera.dev/v1alpha1
kind: AuthPolicy
metadata: {name: db-http, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  rules:
  - from: [{podSelector: {matchLabels: {app: web}}}]
    ports: [{port: 8080}]
  - from: [{podSelector: {matchLabels: {app: web}}}, {podSelector: {matchLabels: {app: other}}}]
    ports: [{port: 5432}]
";

/// curl from `pod` to db's `path` on [`HTTP_PORT`] with `args`: the status
/// code (0 when there was no HTTP answer) and the body.
fn curl(pod: &SimPod, db: &SimPod, args: &[&str], path: &str) -> (u16, String) {
    let url = format!("http://{}:{HTTP_PORT}{path}", db.ip);
    let mut all = vec![
        "-sS",
        "--max-time",
        "5",
        "--path-as-is",
        "-w",
        "\n%{http_code}",
    ];
    all.extend_from_slice(args);
    all.push(&url);
    let out = pod
        .cgroup
        .spawn_in(&pod.ns, "curl", &all)
        .wait_with_output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    match code.trim().parse() {
        Ok(code) if code > 0 => (code, body.trim().to_owned()),
        // No answer: what curl said instead.
        _ => (0, String::from_utf8_lossy(&out.stderr).trim().to_owned()),
    }
}

/// Waits until `pod` gets `want` for `path`, within 30 s.
async fn until_status(pod: &SimPod, db: &SimPod, args: &[&str], path: &str, want: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, body) = curl(pod, db, args, path);
        if code == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} {path}: still {code} {body}",
            pod.name
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn pod(cluster: &SimCluster, name: &str, node: &str, ip: &str) -> SimPod {
    cluster
        .app_pod("shop", name, (node, ip), Some(TCP_PORT))
        .await
}

/// The operator says the HTTP rules are enforced.
async fn status_says_enforced(client: &kube::Client) {
    let policies: Api<AuthPolicy> = Api::namespaced(client.clone(), "shop");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let found = policies.get("db-http").await.unwrap().status.and_then(|s| {
            s.conditions
                .into_iter()
                .find(|c| c.type_ == CONDITION_HTTP_RULES)
        });
        if let Some(c) = found {
            assert_eq!(
                (c.status.as_str(), c.reason.as_str()),
                ("True", "EnforcedByWaypoint"),
                "{}",
                c.message
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {CONDITION_HTTP_RULES} condition"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every refused request over one protocol: none reaches the workload.
fn refusals(web: &SimPod, db: &SimPod, proto: &[&str]) {
    let with = |extra: &[&'static str]| -> Vec<&str> { [proto, extra].concat() };
    for (args, path, want) in [
        (with(&["-X", "DELETE"]), "/api/items", 403),
        (with(&[]), "/public/../admin", 403),
        (with(&[]), "/api/../admin", 403),
        (with(&[]), "//admin", 403),
        (with(&[]), "/%2Fadmin", 400),
        (with(&[]), "/api%2F..%2Fadmin", 400),
        (with(&["-X", "POST", "-d", "x"]), "/upload", 403),
    ] {
        let (code, body) = curl(web, db, &args, path);
        assert_eq!(code, want, "web {args:?} {path}: {body}");
        if want == 403 {
            assert_eq!(body, "forbidden", "a short body naming no policy");
        }
    }
}

/// grpcurl (server reflection through the waypoint) against fortio's gRPC
/// server in db: an allowed unary call succeeds, a denied one gets
/// PermissionDenied, a server-streaming call streams.
fn grpc_methods_are_checked(web: &SimPod, db: &SimPod) {
    let bins = tessera_tests::testbin::TestBins::ensure_built().unwrap();
    let _server = KillOnDrop(db.cgroup.spawn_in(
        &db.ns,
        bins.http.fortio.to_str().unwrap(),
        &[
            "server",
            "-grpc-port",
            &GRPC_PORT.to_string(),
            "-http-port",
            "18080",
            "-redirect-port",
            "disabled",
            "-tcp-port",
            "disabled",
            "-udp-port",
            "disabled",
        ],
    ));
    let target = format!("{}:{GRPC_PORT}", db.ip);
    // grpcurl [flags] <address> <method>
    let grpcurl = |args: &[&str]| {
        let (method, flags) = args.split_last().unwrap();
        let mut all = vec!["-plaintext", "-max-time", "3"];
        all.extend_from_slice(flags);
        all.push(&target);
        all.push(method);
        let out = web
            .cgroup
            .spawn_in(&web.ns, bins.http.grpcurl.to_str().unwrap(), &all)
            .wait_with_output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let ping = loop {
        let out = grpcurl(&[
            "-d",
            r#"{"payload": "through the waypoint"}"#,
            "fgrpc.PingServer/Ping",
        ]);
        if out.contains("through the waypoint") || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(
        ping.contains("through the waypoint"),
        "allowed unary call: {ping}"
    );
    let check = grpcurl(&["grpc.health.v1.Health/Check"]);
    assert!(check.contains("PermissionDenied"), "denied method: {check}");
    let watch = grpcurl(&["-max-time", "2", "grpc.health.v1.Health/Watch"]);
    assert!(watch.contains("SERVING"), "server streaming: {watch}");
}

/// h2load: 4 connections with 16 streams each side by side, half the
/// requests allowed and half denied; exact counts, and the workload gets
/// exactly the allowed ones.
fn multiplexed_streams_are_each_checked(web: &SimPod, db: &SimPod, server: &HttpServer) {
    let before = server.seen().len();
    let allowed = format!("http://{}:{HTTP_PORT}/api/h2load", db.ip);
    let denied = format!("http://{}:{HTTP_PORT}/admin/h2load", db.ip);
    let out = web
        .cgroup
        .spawn_in(
            &web.ns,
            "h2load",
            &["-n", "400", "-c", "4", "-m", "16", &allowed, &denied],
        )
        .wait_with_output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    // h2load counts a 403 as failed; none errored.
    assert!(
        text.contains("400 done, 200 succeeded, 200 failed, 0 errored, 0 timeout")
            && text.contains("status codes: 200 2xx, 0 3xx, 200 4xx, 0 5xx"),
        "{text}"
    );
    let seen = server.seen();
    assert_eq!(seen.len() - before, 200, "{:#?}", &seen[before..]);
    assert!(
        seen[before..]
            .iter()
            .all(|l| l.starts_with("HTTP/2.0 GET /api/h2load ")),
        "{:#?}",
        &seen[before..]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_rules_are_checked_per_request_with_the_authenticated_identity() {
    let (cp, client) = common::control_plane().await;
    let signer_port = tessera_tests::free_port().unwrap();
    let _operator = common::start_operator(cp.kubeconfig(), signer_port, 3600);
    resources::wait_for_trust_bundle(&client, Duration::from_secs(60))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let launch = common::launch(&cp, dir.path(), signer_port, Vec::new());
    let (mut cluster, tokens) = common::cluster_with_agents(&client, &launch).await;
    let web = pod(&cluster, "web", "node-a", "198.18.1.10").await;
    let other = pod(&cluster, "other", "node-a", "198.18.1.11").await;
    let db = pod(&cluster, "db", "node-b", "198.18.2.10").await;
    let server = HttpServer::start(&db, HTTP_PORT, dir.path());
    resources::server_side_apply(&client, PLAIN_POLICY)
        .await
        .unwrap();
    until_status(&web, &db, &[], "/api/items", 200).await;
    // A connection kept alive from before the port has HTTP rules is reset
    // when it gets them: its next request needs a new connection, which
    // goes through the waypoint.
    let (first, second) = kept_alive_pair(&web, &db, "/api/items", || async {
        resources::server_side_apply(&client, POLICY).await.unwrap();
    })
    .await;
    assert_eq!(first, "200 1");
    assert_eq!(
        second, "200 1",
        "the second request went over the connection made before the port had HTTP rules"
    );
    status_says_enforced(&client).await;
    let seen = server.seen();
    assert!(
        seen.last().unwrap().contains(&format!("URI={WEB_ID}")),
        "{seen:#?}"
    );
    let checked_from = seen.len();
    cluster
        .agent("node-b")
        .wait_for("checking the port's HTTP requests", 1)
        .await;

    // The same request: web is allowed, other is not.
    until_status(&web, &db, &[], "/api/items", 200).await;
    let (code, body) = curl(&other, &db, &[], "/api/items");
    assert_eq!((code, body.as_str()), (403, "forbidden"));
    assert_eq!(curl(&other, &db, &[], "/status").0, 200);
    let h2 = ["--http2-prior-knowledge"];
    assert_eq!(curl(&web, &db, &h2, "/api/items").0, 200);
    assert_eq!(curl(&other, &db, &h2, "/api/items").0, 403);
    refusals(&web, &db, &[]);
    refusals(&web, &db, &h2);
    multiplexed_streams_are_each_checked(&web, &db, &server);
    let tenant = ["-X", "POST", "-d", "x", "-H", "x-tenant: t1"];
    assert_eq!(curl(&web, &db, &tenant, "/upload").0, 200);
    // The client's identity header never reaches the workload as sent.
    let forged = "x-forwarded-client-cert: By=x;URI=spiffe://cluster.test/ns/shop/sa/admin";
    assert_eq!(curl(&web, &db, &["-H", forged], "/api/forged").0, 200);

    let seen = server.seen();
    let uris: Vec<&str> = seen[checked_from..]
        .iter()
        .map(|l| l.split(' ').nth(2).unwrap_or(""))
        .collect();
    assert!(
        uris.iter().all(|u| [
            "/api/items",
            "/status",
            "/upload",
            "/api/forged",
            "/api/h2load"
        ]
        .contains(u)),
        "the workload got a refused request: {seen:#?}"
    );
    let forwarded = seen.iter().find(|l| l.contains("/api/forged")).unwrap();
    assert!(
        forwarded.ends_with(&format!(
            "\"By=spiffe://cluster.test/ns/shop/sa/db;URI={WEB_ID}\""
        )),
        "{forwarded}"
    );
    assert!(
        seen.iter()
            .any(|l| l.starts_with("HTTP/2.0 GET /api/items"))
    );

    // The WebSocket: checked, then spliced.
    let bins = tessera_tests::testbin::TestBins::ensure_built().unwrap();
    let ws = |path: &str| {
        let out = web
            .cgroup
            .spawn_in(
                &web.ns,
                bins.node.workload.to_str().unwrap(),
                &["ws", &format!("ws://{}:{HTTP_PORT}{path}", db.ip), "hello"],
            )
            .wait_with_output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(ws("/ws"), "echo hello");
    assert!(ws("/admin").starts_with("status 403"));

    grpc_methods_are_checked(&web, &db);

    // kill -9 of the agent: the port refuses, the plain port works on.
    let before = server.seen().len();
    let stopped = cluster.agents.pop().unwrap();
    assert_eq!(stopped.node, "node-b");
    drop(stopped);
    for _ in 0..5 {
        let (code, body) = curl(&web, &db, &["--max-time", "2"], "/api/items");
        assert_eq!(code, 0, "an answer with the waypoint down: {body}");
        assert!(web.connect(&db.ip, TCP_PORT).starts_with("ok "));
    }
    assert_eq!(
        server.seen().len(),
        before,
        "a request reached the workload unchecked"
    );
    cluster.start_agent(&launch, "node-b", &tokens[1]);
    until_status(&web, &db, &[], "/api/items", 200).await;

    kept_alive_connection_gets_the_new_rules(&client, &web, &db).await;
}

/// Two requests for `path` from `pod` on one connection with a pause
/// between (curl with two URLs and a rate limit of 20 a minute), `change`
/// made in the pause: each answer's status code and how many connections
/// curl made for it ("200 1", "403 0": the second went over the first's
/// connection).
async fn kept_alive_pair<F, Fut>(
    pod: &SimPod,
    db: &SimPod,
    path: &str,
    change: F,
) -> (String, String)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let url = format!("http://{}:{HTTP_PORT}{path}", db.ip);
    let child = pod.cgroup.spawn_in(
        &pod.ns,
        "curl",
        &[
            "-sS",
            "--rate",
            "20/m",
            "-w",
            "\n%{http_code} %{num_connects}\n",
            &url,
            &url,
        ],
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    change().await;
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let answers: Vec<String> = text
        .lines()
        .filter(|l| l.len() > 4 && l.as_bytes()[3] == b' ')
        .map(str::to_owned)
        .collect();
    match &answers[..] {
        [first, second] => (first.clone(), second.clone()),
        _ => panic!(
            "not two answers: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// A policy change reaches a kept-alive connection's next request.
async fn kept_alive_connection_gets_the_new_rules(
    client: &kube::Client,
    web: &SimPod,
    db: &SimPod,
) {
    let policies: Api<AuthPolicy> = Api::namespaced(client.clone(), "shop");
    let narrower = serde_json::json!({"spec": {"rules": [{
        "from": [{"podSelector": {"matchLabels": {"app": "web"}}}],
        "ports": [{"port": HTTP_PORT}],
        "http": [{"methods": ["GET"], "paths": [{"type": "Exact", "value": "/api/other"}]}],
    }]}});
    let answers = kept_alive_pair(web, db, "/api/items", || async {
        policies
            .patch("db-http", &PatchParams::default(), &Patch::Merge(&narrower))
            .await
            .unwrap();
    })
    .await;
    assert_eq!(
        answers,
        ("200 1".to_owned(), "403 0".to_owned()),
        "two answers on one connection (the second made no new connection)"
    );
}
