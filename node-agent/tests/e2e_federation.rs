//! End to end, as root: a workload of a SPIRE trust domain (`b.test`, real
//! spire-server and spire-agent, join-token attestation) and a Tessera
//! workload (`cluster.test`, the operator and `tessera-agent run`)
//! authenticate each other with mutual TLS, each verifying the other with
//! the federated bundle its own Workload API hands it: SPIRE federates with
//! the operator's bundle endpoint, Tessera with SPIRE's through a
//! FederatedTrustDomain, and the Tessera pod's WorkloadIdentity lists
//! `b.test` in `federatesWith`. Both sides use SPIRE's Workload API client
//! (`spire-agent api fetch x509 -write`) and OpenSSL for the TLS.
//!
//! JWT-SVIDs cross the same way: each side validates the other's through
//! its own Workload API, with the federated JWT authorities.
//!
//! A pod whose WorkloadIdentity does not federate gets no b.test bundle; a
//! new X.509 authority SPIRE prepares reaches the Tessera pod's Workload API
//! within the refresh hint; and once the FederatedTrustDomain is deleted
//! the Tessera pod's Workload API drops b.test's bundle: the same
//! connection is refused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams};
use tessera_api::crd::federated_trust_domain::FederatedTrustDomain;
use tessera_api::signer_api::TOKEN_AUDIENCE;
use tessera_tests::resources;
use tessera_tests::spire::{SpireAgent, SpireServer};

mod common;
use common::{PodCgroup, fetch_jwt, validate_jwt};

fn pod(name: &str, app: &str) -> Pod {
    tessera_tests::fixtures::PodBuilder::new("shop", name)
        .label("app", app)
        .node("node-a")
        .build()
}

/// Runs `spire-agent api fetch x509 -socketPath <socket> -write <dir>`
/// (inside `cgroup` when given) until `done(dir)` holds; fails after 60 s
/// with the last output.
async fn fetch_until(
    spire_agent: &Path,
    socket: &Path,
    cgroup: Option<&PodCgroup>,
    dir: &Path,
    what: &str,
    done: impl Fn(&Path) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).unwrap();
        let args = [
            "api",
            "fetch",
            "x509",
            "-socketPath",
            socket.to_str().unwrap(),
            "-write",
            dir.to_str().unwrap(),
        ];
        let (ok, out, err) = match cgroup {
            Some(cgroup) => cgroup.run(spire_agent, &args),
            None => {
                let o = Command::new(spire_agent).args(args).output().unwrap();
                (
                    o.status.success(),
                    String::from_utf8_lossy(&o.stdout).into_owned(),
                    String::from_utf8_lossy(&o.stderr).into_owned(),
                )
            }
        };
        if ok && done(dir) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within 60 s; last fetch:\n{out}\n{err}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One mutual TLS connection: `openssl s_server` with the server's SVID,
/// trusting `server_ca`, and `openssl s_client` with the client's SVID,
/// trusting `client_ca`. Returns whether both sides accepted the other and
/// the server received the client's line, and what both printed.
fn mutual_tls(server: &Path, server_ca: &Path, client: &Path, client_ca: &Path) -> (bool, String) {
    let port = tessera_tests::free_port().unwrap();
    let accept = format!("127.0.0.1:{port}");
    let mut s_server = Command::new("openssl")
        .args(["s_server", "-accept", &accept, "-Verify", "2"])
        .args(["-verify_return_error", "-tls1_3"])
        .arg("-cert")
        .arg(server.join("svid.0.pem"))
        .arg("-key")
        .arg(server.join("svid.0.key"))
        .arg("-CAfile")
        .arg(server_ca)
        // s_server quits when its stdin ends: keep it open.
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "openssl s_server did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &accept,
            "-verify_return_error",
            "-tls1_3",
        ])
        .args(["-verify", "2"])
        .arg("-cert")
        .arg(client.join("svid.0.pem"))
        .arg("-key")
        .arg(client.join("svid.0.key"))
        .arg("-CAfile")
        .arg(client_ca)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            // Close stdin after a line: s_client exits once the handshake and
            // the first read are done.
            if let Some(mut stdin) = c.stdin.take() {
                let _ = stdin.write_all(b"hello\n");
            }
            c.wait_with_output()
        })
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The server prints what it receives once the handshake, its check of
    // the client's certificate included, is done (with TLS 1.3 the client
    // finishes before that check).
    std::thread::sleep(Duration::from_millis(500));
    let _ = s_server.kill();
    let server_out = s_server.wait_with_output().map(|o| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    });
    let server_out = server_out.unwrap_or_default();
    let ok = out.status.success()
        && text.contains("Verify return code: 0 (ok)")
        && server_out.contains("hello")
        && !server_out.contains("verify error");
    (ok, format!("client:\n{text}\nserver:\n{server_out}"))
}

/// The certificates of a PEM text, in any order.
fn pem_set(text: &str) -> std::collections::BTreeSet<String> {
    text.split("-----END CERTIFICATE-----")
        .map(|c| c.trim().to_owned())
        .filter(|c| !c.is_empty())
        .collect()
}

fn spiffe_id_of(pem: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(pem)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.split(|c: char| c.is_whitespace() || c == ',')
        .find_map(|w| w.strip_prefix("URI:"))
        .unwrap_or_default()
        .to_owned()
}

/// What the tests of this file start from.
struct Setup {
    bins: tessera_tests::TestBins,
    cp: tessera_tests::ControlPlane,
    client: kube::Client,
    dir: tempfile::TempDir,
    signer_port: u16,
    _operator: common::Proc,
    spire: SpireServer,
    spire_agent: SpireAgent,
}

/// A control plane with two nodes; the operator (cluster.test) serving its
/// bundle endpoint with a 5 s refresh hint; b.test's SPIRE server federated
/// with that endpoint; and a SPIRE agent (join token, `node-x`).
async fn setup() -> Setup {
    let bins = tessera_tests::TestBins::locate().unwrap();
    let (cp, client) = resources::control_plane_with_crds().await.unwrap();
    resources::apply_manifest(&client, resources::TWO_NODES)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let signer_port = tessera_tests::free_port().unwrap();
    let endpoint_port = tessera_tests::free_port().unwrap();
    let operator = common::start_operator_with(
        cp.kubeconfig(),
        signer_port,
        3600,
        &[
            format!("--bundle-endpoint-addr=127.0.0.1:{endpoint_port}"),
            "--bundle-refresh-hint-seconds=5".to_owned(),
        ],
    );
    let tessera_pem = resources::wait_for_trust_bundle(&client, Duration::from_secs(60))
        .await
        .unwrap();
    let spire = SpireServer::start(
        &bins.spire_server,
        &dir.path().join("spire-server"),
        "b.test",
        "5s",
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", endpoint_port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the bundle endpoint did not listen"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    spire
        .federate_with_tessera("cluster.test", endpoint_port, &tessera_pem)
        .unwrap();
    let spire_agent = SpireAgent::start(
        &bins.spire_agent,
        &dir.path().join("spire-agent"),
        &spire,
        "node-x",
        &[],
    )
    .await
    .unwrap();
    Setup {
        bins,
        cp,
        client,
        dir,
        signer_port,
        _operator: operator,
        spire,
        spire_agent,
    }
}

/// The tests of this file run one at a time (each runs a control plane
/// and SPIRE; the first measures a propagation time).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spire_workload_and_a_tessera_workload_authenticate_across_trust_domains() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let Setup {
        bins,
        cp,
        client,
        dir,
        signer_port,
        _operator,
        mut spire,
        spire_agent,
    } = setup().await;
    spire
        .create_entry(
            &spire_agent.id,
            "spiffe://b.test/client",
            &["unix:uid:0"],
            &["spiffe://cluster.test"],
        )
        .unwrap();
    let b_dir = dir.path().join("b-client");
    fetch_until(
        &bins.spire_agent,
        &spire_agent.socket,
        None,
        &b_dir,
        "the SPIRE workload's SVID with cluster.test's bundle",
        |d| d.join("svid.0.pem").exists() && d.join("federated_bundle.0.0.pem").exists(),
    )
    .await;
    assert_eq!(
        spiffe_id_of(&b_dir.join("svid.0.pem")),
        "spiffe://b.test/client"
    );

    // cluster.test federates with b.test; web pods federate with it.
    let ftds: Api<FederatedTrustDomain> = Api::all(client.clone());
    ftds.create(
        &PostParams::default(),
        &spire.federated_trust_domain("b-test").unwrap(),
    )
    .await
    .unwrap();
    resources::apply_manifest(
        &client,
        r#"
apiVersion: tessera.dev/v1alpha1
kind: WorkloadIdentity
metadata: {name: web}
spec:
  spiffeIDTemplate: "spiffe://{trustDomain}/ns/{namespace}/web"
  podSelector: {matchLabels: {app: web}}
  federatesWith: [b.test]
"#,
    )
    .await
    .unwrap();
    let token = resources::agent_token(&client, "node-a", TOKEN_AUDIENCE)
        .await
        .unwrap();
    let (_agent, socket) =
        common::spawn_agent(cp.kubeconfig(), "node-a", signer_port, &token, dir.path());
    let pods: Api<Pod> = Api::namespaced(client.clone(), "shop");
    let web = pods
        .create(&PostParams::default(), &pod("web", "web"))
        .await
        .unwrap();
    let other = pods
        .create(&PostParams::default(), &pod("other", "other"))
        .await
        .unwrap();
    let web_cgroup = PodCgroup::create("fed-web", web.metadata.uid.as_deref().unwrap());
    let other_cgroup = PodCgroup::create("fed-other", other.metadata.uid.as_deref().unwrap());
    let t_dir = dir.path().join("tessera-web");
    fetch_until(
        &bins.spire_agent,
        &socket,
        Some(&web_cgroup),
        &t_dir,
        "the Tessera workload's SVID with b.test's bundle",
        |d| d.join("federated_bundle.0.0.pem").exists(),
    )
    .await;
    assert_eq!(
        spiffe_id_of(&t_dir.join("svid.0.pem")),
        "spiffe://cluster.test/ns/shop/web"
    );
    let b_bundle = std::fs::read_to_string(t_dir.join("federated_bundle.0.0.pem")).unwrap();
    let spire_pem = spire.cli(&["bundle", "show"]).unwrap();
    assert_eq!(
        b_bundle.trim(),
        spire_pem.trim(),
        "b.test's bundle, as SPIRE has it"
    );

    // A pod that does not federate gets its SVID and no b.test bundle.
    let o_dir = dir.path().join("tessera-other");
    fetch_until(
        &bins.spire_agent,
        &socket,
        Some(&other_cgroup),
        &o_dir,
        "the other pod's SVID",
        |d| d.join("svid.0.pem").exists(),
    )
    .await;
    assert!(!o_dir.join("federated_bundle.0.0.pem").exists());

    // Mutual TLS across the trust domains, each side verifying the other
    // with what its own Workload API gave it.
    let (ok, log) = mutual_tls(
        &t_dir,
        &t_dir.join("federated_bundle.0.0.pem"),
        &b_dir,
        &b_dir.join("federated_bundle.0.0.pem"),
    );
    assert!(ok, "{log}");
    // And the other way round.
    let (ok, log) = mutual_tls(
        &b_dir,
        &b_dir.join("federated_bundle.0.0.pem"),
        &t_dir,
        &t_dir.join("federated_bundle.0.0.pem"),
    );
    assert!(ok, "{log}");

    // JWT-SVIDs across the trust domains, each validated with the federated
    // JWT authorities the validating side's Workload API holds.
    let (b_token, b_jwt_bundles) =
        fetch_jwt(&bins.spire_agent, &spire_agent.socket, None, "tessera-web");
    assert!(
        b_jwt_bundles.contains(&"spiffe://cluster.test".to_owned()),
        "SPIRE hands its workload cluster.test's JWT keys: {b_jwt_bundles:?}"
    );
    let (ok, out) = validate_jwt(
        &bins.spire_agent,
        &socket,
        Some(&web_cgroup),
        "tessera-web",
        &b_token,
    );
    assert!(
        ok && out.contains("SPIFFE ID : spiffe://b.test/client"),
        "{out}"
    );
    let (ok, out) = validate_jwt(
        &bins.spire_agent,
        &socket,
        Some(&other_cgroup),
        "tessera-web",
        &b_token,
    );
    assert!(
        !ok && out.contains("not valid"),
        "a pod that does not federate with b.test must refuse its JWT-SVIDs:\n{out}"
    );
    let (t_token, t_jwt_bundles) =
        fetch_jwt(&bins.spire_agent, &socket, Some(&web_cgroup), "b-client");
    assert_eq!(t_jwt_bundles.len(), 2, "{t_jwt_bundles:?}");
    assert!(t_jwt_bundles.contains(&"spiffe://b.test".to_owned()));
    let (_, o_jwt_bundles) = fetch_jwt(&bins.spire_agent, &socket, Some(&other_cgroup), "b-client");
    assert_eq!(o_jwt_bundles, ["spiffe://cluster.test"]);
    let (ok, out) = validate_jwt(
        &bins.spire_agent,
        &spire_agent.socket,
        None,
        "b-client",
        &t_token,
    );
    assert!(
        ok && out.contains("SPIFFE ID : spiffe://cluster.test/ns/shop/web"),
        "{out}"
    );

    // SPIRE prepares a new X.509 authority: it reaches the Tessera pod's
    // Workload API within the refresh hint (5 s; the FederatedTrustDomain
    // fetches, the agent follows the published bundle, the stream updates).
    spire.cli(&["localauthority", "x509", "prepare"]).unwrap();
    let grown = spire.cli(&["bundle", "show"]).unwrap();
    assert_eq!(grown.matches("BEGIN CERTIFICATE").count(), 2);
    let prepared = Instant::now();
    let rotated_dir = dir.path().join("tessera-web-rotated");
    fetch_until(
        &bins.spire_agent,
        &socket,
        Some(&web_cgroup),
        &rotated_dir,
        "SPIRE's new authority to reach the Tessera workload",
        |d| {
            std::fs::read_to_string(d.join("federated_bundle.0.0.pem"))
                .is_ok_and(|b| pem_set(&b) == pem_set(&grown))
        },
    )
    .await;
    let took = prepared.elapsed();
    println!("SPIRE's new authority reached the Tessera workload in {took:?}");
    assert!(
        took < Duration::from_secs(5 + 3),
        "took {took:?}, more than the 5 s refresh hint"
    );

    // The federation is deleted: the Tessera pod's Workload API no longer
    // hands out b.test's bundle, and with what it hands out (its own trust
    // domain's bundle) the SPIRE workload is refused.
    ftds.delete("b-test", &DeleteParams::default())
        .await
        .unwrap();
    let after = dir.path().join("tessera-web-after");
    fetch_until(
        &bins.spire_agent,
        &socket,
        Some(&web_cgroup),
        &after,
        "b.test's bundle to leave the Tessera workload's Workload API",
        |d| d.join("svid.0.pem").exists() && !d.join("federated_bundle.0.0.pem").exists(),
    )
    .await;
    let (ok, log) = mutual_tls(
        &after,
        &after.join("bundle.0.pem"),
        &b_dir,
        &b_dir.join("federated_bundle.0.0.pem"),
    );
    assert!(!ok, "the SPIRE workload must be refused:\n{log}");
    assert!(
        log.contains("verify") || log.contains("alert"),
        "refused for its certificate:\n{log}"
    );
    // And its JWT-SVIDs too.
    let (ok, out) = validate_jwt(
        &bins.spire_agent,
        &socket,
        Some(&web_cgroup),
        "tessera-web",
        &b_token,
    );
    assert!(!ok && out.contains("not valid"), "{out}");
    spire.stop();
}

/// The X509-SVID files `spire-agent api fetch x509 -write` wrote to `dir`
/// for `spiffe_id`: (certificate chain, key).
fn svid_files(dir: &Path, spiffe_id: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    (0..8)
        .map(|i| {
            (
                dir.join(format!("svid.{i}.pem")),
                dir.join(format!("svid.{i}.key")),
            )
        })
        .find(|(pem, _)| pem.exists() && spiffe_id_of(pem) == spiffe_id)
        .unwrap_or_else(|| panic!("no SVID for {spiffe_id} in {}", dir.display()))
}

/// One TLS connection from network namespace `ns` to `addr` with `openssl
/// s_client`, presenting `cert`/`key` and verifying the server with `ca`:
/// what the server sent once the handshake was done (empty when refused),
/// the SPIFFE ID of the certificate the server presented, and the log.
fn s_client_from(
    ns: &str,
    addr: &str,
    (cert, key): &(std::path::PathBuf, std::path::PathBuf),
    ca: &Path,
    dir: &Path,
) -> (String, String, String) {
    let out = Command::new("ip")
        // At most 10 s an attempt (a connect() without an answer would
        // take minutes).
        .args(["netns", "exec", ns, "timeout", "10", "openssl", "s_client"])
        .args(["-connect", addr])
        .args([
            "-tls1_3",
            "-verify_return_error",
            "-verify",
            "2",
            "-showcerts",
            "-ign_eof",
        ])
        .arg("-cert")
        .arg(cert)
        .arg("-key")
        .arg(key)
        .arg("-CAfile")
        .arg(ca)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let log = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    // The server's leaf: the first certificate shown.
    let presented = stdout
        .split_once("-----BEGIN CERTIFICATE-----")
        .and_then(|(_, rest)| rest.split_once("-----END CERTIFICATE-----"))
        .map(|(body, _)| {
            let pem = dir.join("presented.pem");
            std::fs::write(
                &pem,
                format!("-----BEGIN CERTIFICATE-----{body}-----END CERTIFICATE-----\n"),
            )
            .unwrap();
            spiffe_id_of(&pem)
        })
        .unwrap_or_default();
    // What the server sent after the handshake, before it closed (s_client
    // then prints "closed").
    let received = stdout
        .rsplit_once("---\n")
        .map(|(_, tail)| {
            let tail = tail.trim();
            tail.strip_suffix("closed")
                .unwrap_or(tail)
                .trim()
                .to_owned()
        })
        .unwrap_or_default();
    (received, presented, log)
}

/// web's policy: b.test/client on 8443, its TLS terminated by the agent
/// and the plaintext forwarded to the workload.
const TERMINATED_POLICY: &str = r#"
apiVersion: tessera.dev/v1alpha1
kind: AuthPolicy
metadata: {name: web-from-b-client, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules:
  - from: [{spiffeIDs: ["spiffe://b.test/client"]}]
    ports: [{port: 8443}]
    externalPeers: TerminateTLS
"#;

/// [`TERMINATED_POLICY`] and, on 8080, `GET /api...` only (HTTP rules
/// checked by the agent).
fn http_policy() -> String {
    format!(
        "{TERMINATED_POLICY}  - from: [{{spiffeIDs: [\"spiffe://b.test/client\"]}}]
    ports: [{{port: 8080}}]
    externalPeers: TerminateTLS
    http: [{{methods: [GET], paths: [{{type: Prefix, value: /api}}]}}]
"
    )
}

/// curl over TLS from network namespace `ns`, presenting `svid`, with
/// `args`: the status code (0 when no HTTP answer came) and the HTTP
/// version. The server's certificate is not checked here (it has no DNS
/// name for curl to match; `s_client_from` checks its SPIFFE ID).
fn curl_tls(
    ns: &str,
    url: &str,
    (cert, key): &(std::path::PathBuf, std::path::PathBuf),
    args: &[&str],
) -> (u16, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "curl", "-sS", "-k", "--max-time", "5"])
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .args(["-o", "/dev/null", "-w", "%{http_code} %{http_version}"])
        .args(args)
        .arg(url)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (code, version) = stdout.split_once(' ').unwrap_or(("0", ""));
    (code.parse().unwrap_or(0), version.to_owned())
}

/// b.test/client may `GET /api...` on web's port 8080, where the agent
/// terminates its TLS and checks each request against the HTTP rules with
/// its verified SPIFFE ID: over HTTP/1.1 and HTTP/2 (ALPN) its GETs get
/// 200 and reach the workload with that ID in the identity header; its
/// POST and a GET elsewhere get 403 and never reach the workload; a
/// b.test identity the rules do not name is refused in the handshake.
async fn http_rules_apply_to_terminated_peers(
    client: &kube::Client,
    agent: &tessera_tests::cluster::Agent,
    (web, outside): (&tessera_tests::cluster::SimPod, &str),
    (allowed, other): (
        &(std::path::PathBuf, std::path::PathBuf),
        &(std::path::PathBuf, std::path::PathBuf),
    ),
    dir: &Path,
) {
    let server = common::HttpServer::start(web, 8080, dir);
    resources::server_side_apply(client, &http_policy())
        .await
        .unwrap();
    agent.wait_for("checking the port's HTTP requests", 1).await;
    let url = |path: &str| format!("https://{}:8080{path}", web.ip);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, _) = curl_tls(outside, &url("/api/orders"), allowed, &["--http1.1"]);
        if code == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "GET /api/orders over TLS still {code} after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let get2 = curl_tls(outside, &url("/api/items"), allowed, &["--http2"]);
    assert_eq!(get2, (200, "2".to_owned()), "GET over HTTP/2 by ALPN");
    let post = curl_tls(
        outside,
        &url("/api/orders"),
        allowed,
        &["--http1.1", "-X", "POST", "-d", "x"],
    );
    assert_eq!(post.0, 403, "POST is not allowed");
    let admin = curl_tls(outside, &url("/admin"), allowed, &["--http2"]);
    assert_eq!(admin.0, 403, "GET /admin is not allowed");
    let stranger = curl_tls(outside, &url("/api/orders"), other, &["--http1.1"]);
    assert_eq!(
        stranger.0, 0,
        "b.test/other must be refused in the handshake"
    );
    let seen = server.seen();
    assert!(
        seen.iter().any(|l| l.contains("GET /api/items")),
        "the HTTP/2 GET: {seen:#?}"
    );
    for line in &seen {
        assert!(
            line.contains("GET /api/") && line.contains("URI=spiffe://b.test/client"),
            "only allowed requests reach the workload, each with the peer's verified ID: {line}"
        );
    }
    agent.wait_for("request denied (403)", 2).await;
}

/// End to end, as root, with the data path: a SPIRE workload of `b.test`
/// outside the mesh (a network namespace with no agent, no Pod, no cgroup)
/// reaches a Tessera workload whose AuthPolicy allows
/// `spiffe://b.test/client` with `externalPeers: TerminateTLS`. The node
/// agent terminates the TLS with the workload's X509-SVID, verifies the
/// peer's SPIRE-issued SVID with b.test's federated bundle, and forwards to
/// the workload's plain TCP server. Another b.test identity and a plain
/// TCP client are refused; a recreated sandbox (new network namespace) is
/// followed; once the FederatedTrustDomain is deleted, the allowed
/// identity is refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spire_workload_outside_the_mesh_reaches_a_tessera_workload_its_policy_admits() {
    use tessera_tests::cluster::{AgentLaunch, PodSpec, SimCluster};
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    assert!(
        tessera_bpf::pinning::ensure_bpffs(Path::new("/sys/fs/bpf")).is_ok(),
        "no bpffs at /sys/fs/bpf: this test needs root"
    );
    let Setup {
        bins,
        cp,
        client,
        dir,
        signer_port,
        _operator,
        mut spire,
        spire_agent,
    } = setup().await;
    resources::apply_manifest(
        &client,
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: web, namespace: shop}\n",
    )
    .await
    .unwrap();
    for id in ["spiffe://b.test/client", "spiffe://b.test/other"] {
        spire
            .create_entry(
                &spire_agent.id,
                id,
                &["unix:uid:0"],
                &["spiffe://cluster.test"],
            )
            .unwrap();
    }
    let b_dir = dir.path().join("b-workload");
    fetch_until(
        &bins.spire_agent,
        &spire_agent.socket,
        None,
        &b_dir,
        "the SPIRE workload's SVIDs with cluster.test's bundle",
        |d| d.join("svid.1.pem").exists() && d.join("federated_bundle.0.0.pem").exists(),
    )
    .await;
    let client_svid = svid_files(&b_dir, "spiffe://b.test/client");
    let other_svid = svid_files(&b_dir, "spiffe://b.test/other");
    let cluster_ca = b_dir.join("federated_bundle.0.0.pem");

    let ftds: Api<FederatedTrustDomain> = Api::all(client.clone());
    ftds.create(
        &PostParams::default(),
        &spire.federated_trust_domain("b-test").unwrap(),
    )
    .await
    .unwrap();

    // cluster.test: one node with an agent and the data path, one pod.
    let launch = AgentLaunch {
        bin: env!("CARGO_BIN_EXE_tessera-agent").into(),
        kubeconfig: cp.kubeconfig().to_owned(),
        signer_port,
        dir: dir.path().to_owned(),
        echo: true,
        extra: Vec::new(),
    };
    let mut cluster = SimCluster::create(
        client.clone(),
        &common::cgroup2_root(),
        &format!("tessera-ext-{}", std::process::id()),
        &[("node-a", "198.18.0.1"), ("node-b", "198.18.0.2")],
    )
    .await;
    let token_file = resources::agent_token_file(&client, "node-a", TOKEN_AUDIENCE, dir.path())
        .await
        .unwrap();
    cluster.start_agent(&launch, "node-a", &token_file);
    cluster.agents[0].wait_for("data path in sync", 1).await;
    // The agent joins a cgroup below the node's, as a DaemonSet pod sits
    // below the pods' cgroup: the ingress program then checks connection
    // starts to its sockets too, and lets through only those to the
    // terminator sockets it registered.
    let agent_cgroup =
        tessera_tests::netns::Cgroup::create(cluster.node_cgroup("node-a").join("tessera-agent"));
    std::fs::write(
        agent_cgroup.0.join("cgroup.procs"),
        cluster.agents[0].proc.0.id().to_string(),
    )
    .unwrap();
    let mut web = cluster
        .pod(
            PodSpec {
                namespace: "shop",
                name: "web",
                labels: &[("app", "web")],
                service_account: "web",
                node: "node-a",
                ip: "198.18.1.10",
                ..Default::default()
            },
            Some(8443),
        )
        .await;
    resources::apply_manifest(&client, TERMINATED_POLICY)
        .await
        .unwrap();
    cluster.agents[0]
        .wait_for("terminating TLS of external peers", 1)
        .await;
    let outside = cluster.outside("198.18.9.10");
    let target = format!("{}:8443", web.ip);

    // The allowed identity: verified both ways, forwarded to the workload.
    // (Retried: b.test's bundle reaches the agent through the operator.)
    let deadline = Instant::now() + Duration::from_secs(30);
    let (received, presented, log) = loop {
        let got = s_client_from(&outside, &target, &client_svid, &cluster_ca, dir.path());
        if got.0 == "web" || Instant::now() > deadline {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(
        received, "web",
        "the workload's banner through the terminator:\n{log}"
    );
    assert_eq!(presented, "spiffe://cluster.test/ns/shop/sa/web", "{log}");
    assert!(log.contains("Verify return code: 0 (ok)"), "{log}");
    cluster.agents[0]
        .wait_for("external peer admitted", 1)
        .await;
    assert_eq!(
        cluster.agents[0].metric("tessera_agent_external_admitted_total"),
        Some(1.0)
    );

    // Another b.test identity: the policy does not name it.
    let (received, _, log) = s_client_from(&outside, &target, &other_svid, &cluster_ca, dir.path());
    assert_eq!(received, "", "b.test/other must be refused:\n{log}");
    cluster.agents[0]
        .wait_for(
            "no TerminateTLS rule of shop/web-from-b-client admits spiffe://b.test/other",
            1,
        )
        .await;
    // Plain TCP from outside gets nothing from the workload.
    let plain = Command::new("ip")
        .args([
            "netns",
            "exec",
            &outside,
            "python3",
            "-c",
            tessera_tests::netns::CLIENT,
        ])
        .args([&web.ip, "8443", "1.5"])
        .output()
        .unwrap();
    let plain = String::from_utf8_lossy(&plain.stdout).into_owned();
    assert!(
        !plain.contains("web"),
        "plain TCP must not reach the workload: {plain}"
    );

    // The pod's sandbox is recreated (a new network namespace, same Pod
    // and address): the agent moves its terminator there.
    cluster.recreate_sandbox(&mut web, 8443);
    cluster.agents[0]
        .wait_for("the pod's network namespace changed", 1)
        .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (received, _, log) =
            s_client_from(&outside, &target, &client_svid, &cluster_ca, dir.path());
        if received == "web" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not admitted into the recreated sandbox within 30 s:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // An admitted connection is held open while the rule that admitted it
    // changes: it ends, within 1 s.
    let policy = |peer: &str| {
        format!(
            r#"
apiVersion: tessera.dev/v1alpha1
kind: AuthPolicy
metadata: {{name: web-from-b-client, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  rules:
  - from: [{{spiffeIDs: ["{peer}"]}}]
    ports: [{{port: 8443}}]
    externalPeers: TerminateTLS
"#
        )
    };
    let hold = || {
        tessera_tests::netns::Held::open_tls(
            (&common::cgroup2_root(), Some(&outside)),
            (&web.ip, 8443),
            [&client_svid.0, &client_svid.1, &cluster_ca],
        )
    };
    let mut held = hold();
    assert!(held.connected() && held.alive(), "{}", held.first);
    resources::server_side_apply(&client, &policy("spiffe://b.test/other"))
        .await
        .unwrap();
    let (how, after) = held
        .ended_within(Duration::from_secs(5))
        .expect("the connection outlived the rule that admitted it");
    println!("external connection ended {after:?} after its rule changed ({how})");
    assert!(after < Duration::from_secs(1), "{after:?}");
    cluster.agents[0]
        .wait_for("external connection ended: no longer admitted", 1)
        .await;
    resources::server_side_apply(&client, &policy("spiffe://b.test/client"))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut held = loop {
        let held = hold();
        if held.connected() || Instant::now() > deadline {
            break held;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(held.alive(), "admitted again: {}", held.first);

    // A port with HTTP rules: the terminated peer's requests are checked.
    http_rules_apply_to_terminated_peers(
        &client,
        &cluster.agents[0],
        (&web, &outside),
        (&client_svid, &other_svid),
        dir.path(),
    )
    .await;

    // The federation goes: b.test's bundle leaves the agent, the held
    // connection ends, and the same identity is refused.
    ftds.delete("b-test", &DeleteParams::default())
        .await
        .unwrap();
    let (how, after) = held
        .ended_within(Duration::from_secs(30))
        .expect("the connection outlived its peer's trust bundle");
    println!(
        "external connection ended {after:?} after the FederatedTrustDomain was deleted ({how})"
    );
    cluster.agents[0]
        .wait_for("its X509-SVID no longer verifies", 1)
        .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (received, _, log) =
            s_client_from(&outside, &target, &client_svid, &cluster_ca, dir.path());
        if received.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still admitted 30 s after the FederatedTrustDomain was deleted:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    cluster.agents[0]
        .wait_for("no trust bundle for spiffe://b.test", 1)
        .await;
    drop(web);
    drop(cluster);
    drop(agent_cgroup);
    spire.stop();
}
