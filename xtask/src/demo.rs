//! `cargo xtask demo`: what Tessera does today, on this machine.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use tessera_tests::{ControlPlane, repo_root, resources};

/// An object the API server must refuse: an http:// bundle endpoint and an
/// https_spiffe profile without the endpoint's SPIFFE ID.
const INVALID: &str = r#"apiVersion: tessera.dev/v1alpha1
kind: FederatedTrustDomain
metadata:
  name: broken
spec:
  trustDomain: partner.test
  bundleEndpointURL: http://bundles.partner.test/bundle
  bundleEndpointProfile:
    type: https_spiffe
"#;

fn step(n: u32, text: &str) {
    println!("\n== {n}. {text}");
}

/// Runs the demo; the control plane is stopped and deleted when it returns.
pub async fn run() -> Result<()> {
    step(
        1,
        "start a local control plane (etcd + kube-apiserver from the Go module proxy)",
    );
    let started = Instant::now();
    let cp = ControlPlane::start().await?;
    println!(
        "API server ready at {} after {:.1}s (kubeconfig {})",
        cp.server(),
        started.elapsed().as_secs_f64(),
        cp.kubeconfig().display()
    );
    let client = cp.client().await?;

    step(
        2,
        "install the Tessera CRDs and wait until they are Established",
    );
    let crds = tessera_api::crd::all();
    resources::install_crds(&client, &crds).await?;
    for crd in &crds {
        println!(
            "established: {}",
            crd.metadata.name.as_deref().unwrap_or_default()
        );
    }

    step(3, "apply the samples in crds/examples");
    let dir = repo_root().join("crds/examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    for file in &files {
        let yaml = std::fs::read_to_string(file)?;
        for obj in resources::apply_manifest(&client, &yaml).await? {
            let kind = obj.types.as_ref().map_or("?", |t| t.kind.as_str());
            println!(
                "created {kind}/{}",
                obj.metadata.name.as_deref().unwrap_or_default()
            );
        }
    }

    step(4, "kubectl get shows them with their printer columns");
    for args in [
        &["get", "workloadidentities", "-o", "wide"][..],
        &["get", "authpolicies", "--all-namespaces", "-o", "wide"],
        &["get", "federatedtrustdomains", "-o", "wide"],
    ] {
        println!("$ kubectl {}", args.join(" "));
        print!("{}", cp.kubectl_output(args)?);
    }

    step(5, "the API server itself rejects an invalid object");
    println!("{INVALID}");
    let obj = resources::parse_manifest(INVALID)?
        .pop()
        .context("the invalid sample has no object")?;
    match resources::create(&client, &obj, false).await {
        Ok(_) => bail!(
            "the API server accepted an invalid FederatedTrustDomain; the CRD validation is broken"
        ),
        Err(e) => println!("rejected: {}", resources::api_message(&e)),
    }

    step(
        6,
        "run tessera-operator: it creates the trust-domain CA and gives pods identities",
    );
    identities(&cp, &client).await?;

    step(9, "stop the control plane and delete its files");
    let dir = cp.dir().to_path_buf();
    cp.stop();
    println!("stopped; {} removed: {}", dir.display(), !dir.exists());
    print_install();
    Ok(())
}

/// How to install Tessera on a real cluster, from this checkout: both ways
/// (docs/install.md has the steps).
fn print_install() {
    println!(
        "\nTo install Tessera on a cluster (docs/install.md has every step):\n\
         \x20 cargo xtask images   # target/images/*.oci.tar: import them on the nodes or push them to a registry\n\
         With the manifests (deploy/, least-privilege RBAC in deploy/RBAC.md):\n\
         \x20 kubectl apply --server-side -f deploy/namespace.yaml\n\
         \x20 kubectl apply --server-side -k deploy/\n\
         With OLM: push tessera-bundle.oci.tar with the images, add it to a catalog with opm\n\
         (package tessera, channel {}), then a CatalogSource, an OperatorGroup in tessera-system\n\
         (Pod Security privileged) and a Subscription; the operator runs the agents itself.",
        tessera_api::install::olm::CHANNEL
    );
}

/// Pods for the identity step: one picked by the `payments` sample
/// WorkloadIdentity, one that falls back to the default-service-accounts one.
const PODS: &str = r#"apiVersion: v1
kind: Namespace
metadata:
  name: payments
  labels: {team: payments}
---
apiVersion: v1
kind: Namespace
metadata: {name: tessera-system}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: default, namespace: payments}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: default, namespace: default}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: tessera-agent, namespace: tessera-system}
---
apiVersion: v1
kind: Node
metadata: {name: node-a}
---
apiVersion: v1
kind: Pod
metadata:
  name: ledger-0
  namespace: payments
  labels: {app.kubernetes.io/name: ledger}
spec:
  nodeName: node-a
  containers: [{name: app, image: registry.invalid/ledger:1}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: default}
spec:
  containers: [{name: app, image: registry.invalid/web:1}]
"#;

async fn identities(cp: &ControlPlane, client: &kube::Client) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = std::process::Command::new(cargo)
        .current_dir(repo_root())
        .args([
            "build",
            "--quiet",
            "-p",
            "tessera-operator",
            "-p",
            "tessera-agent",
        ])
        .status()?;
    if !status.success() {
        bail!("cannot build tessera-operator");
    }
    let binary = repo_root().join("target/debug/tessera-operator");
    let signer_port = tessera_tests::free_port()?;
    let mut operator =
        tessera_tests::procs::operator_run(&binary, cp.kubeconfig(), "cluster.local")
            .arg("--metrics-addr=127.0.0.1:0")
            .arg(format!("--signer-addr=127.0.0.1:{signer_port}"))
            .env("RUST_LOG", "warn")
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
    let result = async {
        resources::apply_manifest(client, PODS).await?;
        // Each pod's identity is a PodIdentity record only the operator may
        // write; nothing on the pod itself decides it.
        for (namespace, pod) in [("payments", "ledger-0"), ("default", "web-0")] {
            resources::wait_for_pod_identity(client, namespace, pod)
                .await
                .context("is tessera-operator running?")?;
        }
        for args in [
            &["get", "podidentities"][..],
            &["get", "numericidentities"],
            &["get", "configmap", "tessera-trust-bundle", "-n", "tessera-system"],
        ] {
            println!("$ kubectl {}", args.join(" "));
            print!("{}", cp.kubectl_output(args)?);
        }
        step(7, "run tessera-agent for node-a: pod ledger-0 fetches its SVID over the Workload API");
        agent(cp, client, signer_port).await?;
        step(
            8,
            "mutual authentication in the data path (two nodes with agents, pods in network namespaces, a policy), then HTTP rules checked per request by the waypoint",
        );
        datapath(cp, client, signer_port).await
    }
    .await;
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &operator.id().to_string()])
        .status();
    let _ = operator.wait();
    result
}

/// Runs the node agent for node-a and has a process in ledger-0's cgroup
/// fetch its SVID, with Tessera's client and with SPIRE's.
async fn agent(cp: &ControlPlane, client: &kube::Client, signer_port: u16) -> Result<()> {
    use k8s_openapi::api::core::v1::Pod;
    let Some(cgroup_root) =
        tessera_tests::cluster::pod_cgroup_root("placing a process in a pod's cgroup")
    else {
        return Ok(());
    };
    let token_file = resources::agent_token_file(
        client,
        "node-a",
        tessera_api::signer_api::TOKEN_AUDIENCE,
        cp.dir(),
    )
    .await?;
    let socket = cp.dir().join("agent.sock");
    let agent_bin = repo_root().join("target/debug/tessera-agent");
    let mut agent = tessera_tests::procs::agent_run(
        &agent_bin,
        cp.kubeconfig(),
        "node-a",
        signer_port,
        &token_file,
        &socket,
    )
    .env("RUST_LOG", "warn")
    .spawn()?;
    let uid = kube::Api::<Pod>::namespaced(client.clone(), "payments")
        .get("ledger-0")
        .await?
        .metadata
        .uid
        .context("pod without uid")?;
    let top = cgroup_root.join(format!("tessera-demo-{}", std::process::id()));
    let leaf = top.join("kubepods").join(format!("pod{uid}"));
    std::fs::create_dir_all(&leaf)?;
    let in_pod = |program: &std::path::Path, args: &[&str]| {
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec \"$0\" \"$@\"",
            leaf.display()
        );
        std::process::Command::new("sh")
            .args(["-c", &script])
            .arg(program)
            .args(args)
            .output()
    };
    let socket_arg = socket.display().to_string();
    let result = async {
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        let out = loop {
            let out = in_pod(&agent_bin, &["fetch-x509", "--socket", &socket_arg])?;
            if out.status.success() {
                break out;
            }
            if Instant::now() > deadline {
                bail!(
                    "ledger-0 got no SVID: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        };
        println!("$ tessera-agent fetch-x509   (inside ledger-0's cgroup)");
        print!("{}", String::from_utf8_lossy(&out.stdout));
        if let Ok(bins) = tessera_tests::TestBins::locate() {
            let out = in_pod(
                &bins.spire_agent,
                &["api", "fetch", "x509", "-socketPath", &socket_arg],
            )?;
            println!("$ spire-agent api fetch x509   (SPIRE's client, inside ledger-0's cgroup)");
            print!("{}", String::from_utf8_lossy(&out.stdout));
        }
        let outsider = std::process::Command::new(&agent_bin)
            .args(["fetch-x509", "--socket", &socket_arg])
            .output()?;
        println!("$ tessera-agent fetch-x509   (a process in no pod)");
        print!("{}", String::from_utf8_lossy(&outsider.stderr));
        Ok(())
    }
    .await;
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &agent.id().to_string()])
        .status();
    let _ = agent.wait();
    let _ = std::fs::write(leaf.join("cgroup.kill"), "1");
    for dir in [
        leaf.clone(),
        leaf.parent().map(|p| p.to_path_buf()).unwrap_or_default(),
        top,
    ] {
        for _ in 0..50 {
            if std::fs::remove_dir(&dir).is_ok() || !dir.exists() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    result
}

/// HTTP rules on db's port 8080: web may GET /api/*, batch only GET
/// /status.
const DB_HTTP: &str = r#"apiVersion: tessera.dev/v1alpha1
kind: AuthPolicy
metadata: {name: db-http, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  rules:
  - from: [{podSelector: {matchLabels: {app: web}}}]
    ports: [{port: 8080}]
    http: [{methods: [GET], paths: [{type: Prefix, value: /api}]}]
  - from: [{podSelector: {matchLabels: {app: batch}}}]
    ports: [{port: 8080}]
    http: [{methods: [GET], paths: [{type: Exact, value: /status}]}]
"#;

/// Runs an HTTP server in db and shows what the waypoint in node-b's
/// agent lets through: requests from web and batch with curl.
async fn http_rules(client: &kube::Client, sims: &[Sim], node_b: &DemoAgent) -> Result<()> {
    let bins = tessera_tests::TestBins::ensure_built()?;
    let db = &sims[2];
    let log = std::env::temp_dir().join(format!("tessera-demo-{}-db.log", std::process::id()));
    let mut server = tessera_tests::procs::KillOnDrop(db.cgroup.spawn_in(
        &db.ns,
        &bins.node.workload.to_string_lossy(),
        &["http", "8080", "db", &log.to_string_lossy()],
    ));
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.0.stdout.take().context("no stdout")?),
        &mut line,
    )?;
    resources::apply_manifest(client, DB_HTTP).await?;
    println!(
        "\npolicy shop/db-http: on db's port 8080, web may GET /api/*, batch only GET /status"
    );
    wait_for_log(node_b, "checking the port's HTTP requests").await?;
    println!(
        "node-b's agent steers every connection to db:8080 to its waypoint, which checks each request\n"
    );
    println!("{:<22} {:<28} {:>6}  body", "from", "request", "status");
    for (sim, method, path) in [
        (&sims[0], "GET", "/api/orders"),
        (&sims[0], "POST", "/api/orders"),
        (&sims[0], "GET", "/api/../admin"),
        (&sims[1], "GET", "/api/orders"),
        (&sims[1], "GET", "/status"),
    ] {
        let url = format!("http://{}:8080{path}", db.ip);
        let out = sim
            .cgroup
            .spawn_in(
                &sim.ns,
                "curl",
                &[
                    "-sS",
                    "--path-as-is",
                    "-X",
                    method,
                    "-w",
                    "\n%{http_code}",
                    &url,
                ],
            )
            .wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let (body, code) = text.trim().rsplit_once('\n').unwrap_or(("", text.trim()));
        let from = format!("shop/{} ({})", sim.name, sim.node);
        println!(
            "{from:<22} {:<28} {code:>6}  {}",
            format!("{method} {path}"),
            body.trim()
        );
    }
    let seen = std::fs::read_to_string(&log).unwrap_or_default();
    println!("\nwhat db's server got (the waypoint set x-forwarded-client-cert):");
    print!("{seen}");
    let _ = std::fs::remove_file(&log);
    Ok(())
}

/// Waits up to 30 s for an agent to log `needle`.
async fn wait_for_log(agent: &DemoAgent, needle: &str) -> Result<()> {
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let found = agent
            .1
            .lock()
            .map_err(|_| anyhow::anyhow!("log lock"))?
            .iter()
            .any(|l| l.contains(needle));
        if found {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the agent did not log {needle:?} within 30 s");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Namespaces, accounts and the second node for the data-path step.
const SHOP: &str = r#"apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: web, namespace: shop}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: db, namespace: shop}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: batch, namespace: shop}
---
apiVersion: v1
kind: Node
metadata: {name: node-b}
---
apiVersion: tessera.dev/v1alpha1
kind: AuthPolicy
metadata: {name: db-from-web, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  rules:
  - from: [{podSelector: {matchLabels: {app: web}}}]
    ports: [{port: 5432}]
"#;

/// The simulated nodes: name and address (node-c has no agent).
const NODES: [(&str, &str); 3] = [
    ("node-a", "198.18.0.1"),
    ("node-b", "198.18.0.2"),
    ("node-c", "198.18.0.3"),
];

/// An agent the demo runs, and its log lines.
type DemoAgent = (
    tessera_tests::procs::KillOnDrop,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
);

/// A simulated pod: its name, node, address, network namespace, cgroup and
/// the TCP server in it.
struct Sim {
    name: &'static str,
    node: &'static str,
    ip: &'static str,
    ns: String,
    cgroup: tessera_tests::netns::Cgroup,
    _server: tessera_tests::procs::KillOnDrop,
}

/// Runs agents with the eBPF data path for node-a and node-b, pods as
/// network namespaces with real TCP servers, and prints what connects.
async fn datapath(cp: &ControlPlane, client: &kube::Client, signer_port: u16) -> Result<()> {
    use tessera_tests::netns::{Cgroup, Topology};
    let Some(cgroup_root) = tessera_tests::cluster::pod_cgroup_root("the data path") else {
        return Ok(());
    };
    resources::apply_manifest(client, SHOP).await?;
    let tag = format!("tessera-demo-{}", std::process::id());
    let topology = Topology::create(&NODES.map(|(_, ip)| ip));
    let top = Cgroup::create(cgroup_root.join(&tag));
    let _nodes: Vec<Cgroup> = NODES
        .iter()
        .map(|(n, _)| Cgroup::create(top.0.join(n)))
        .collect();
    let agents = start_agents(cp, client, signer_port, &top.0, &tag).await?;
    let result = async {
        let sims = create_pods(client, &topology, &top.0).await?;
        println!("pods: web and batch on node-a, db on node-b, web-rogue (app=web, no agent, so no SVID) on node-c");
        println!("policy shop/db-from-web: db accepts port 5432 from app=web, with mutual authentication");
        let took = first_handshake(&agents[0]).await?;
        println!("node-a's agent authenticated web with db on node-b before any traffic (handshake {took:.2} ms)\n");
        print_connections(&sims);
        http_rules(client, &sims, &agents[1]).await
    }
    .await;
    for (agent, _) in &agents {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &agent.0.id().to_string()])
            .status();
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    drop(agents);
    for (node, _) in &NODES[..2] {
        let _ = std::fs::remove_dir_all(
            std::path::Path::new("/sys/fs/bpf").join(format!("{tag}-{node}")),
        );
    }
    result
}

/// Starts the agents of node-a and node-b, each attached to its node's
/// cgroup below `top`.
async fn start_agents(
    cp: &ControlPlane,
    client: &kube::Client,
    signer_port: u16,
    top: &std::path::Path,
    tag: &str,
) -> Result<Vec<DemoAgent>> {
    let agent_bin = repo_root().join("target/debug/tessera-agent");
    let mut agents = Vec::new();
    for (node, ip) in &NODES[..2] {
        let audience = tessera_api::signer_api::TOKEN_AUDIENCE;
        let token_file = resources::agent_token_file(client, node, audience, cp.dir()).await?;
        let socket = cp.dir().join(format!("{node}-dp.sock"));
        let mut child = tessera_tests::procs::agent_run(
            &agent_bin,
            cp.kubeconfig(),
            node,
            signer_port,
            &token_file,
            &socket,
        )
        .arg("--cgroup-root")
        .arg(top.join(node))
        .arg(format!("--pin-name={tag}-{node}"))
        .arg(format!("--handshake-addr={ip}:4434"))
        .arg("--state-dir")
        .arg(cp.dir().join(format!("{node}-state")))
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
        let lines = tessera_tests::netns::collect_stderr(&mut child, node, false);
        agents.push((tessera_tests::procs::KillOnDrop(child), lines));
        println!(
            "started tessera-agent for {node}: eBPF programs on {}, handshakes on {ip}:4434",
            top.join(node).display()
        );
    }
    Ok(agents)
}

/// Creates the demo's pods (web, batch, db, web-rogue), each a network
/// namespace with a TCP server on 5432 in its node's cgroup.
async fn create_pods(
    client: &kube::Client,
    topology: &tessera_tests::netns::Topology,
    top: &std::path::Path,
) -> Result<Vec<Sim>> {
    use tessera_tests::fixtures::PodBuilder;
    use tessera_tests::netns::{self, Cgroup};
    // name, app (and service account), node index, address
    let pods = [
        ("web", "web", 0, "198.18.1.10"),
        ("batch", "batch", 0, "198.18.1.11"),
        ("db", "db", 1, "198.18.2.10"),
        ("web-rogue", "web", 2, "198.18.3.10"),
    ];
    let mut sims = Vec::new();
    for (name, app, node, ip) in pods {
        let (node, host_ip) = NODES[node];
        let pod = PodBuilder::new("shop", name)
            .label("app", app)
            .service_account(app)
            .node(node);
        let uid = pod.create(client).await?;
        pod.running(client, ip, host_ip).await?;
        let ns = topology.pod(ip);
        let cgroup = Cgroup::create(top.join(node).join(format!("pod{uid}")));
        let server = tessera_tests::procs::KillOnDrop(netns::serve(&cgroup, &ns, 5432, name));
        sims.push(Sim {
            name,
            node,
            ip,
            ns,
            cgroup,
            _server: server,
        });
    }
    Ok(sims)
}

/// How long node-a's agent took (ms) for its first handshake with db, as
/// its log says; waits up to 60 s for it.
async fn first_handshake(agent: &DemoAgent) -> Result<f64> {
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let found = agent
            .1
            .lock()
            .map_err(|_| anyhow::anyhow!("log lock"))?
            .iter()
            .find_map(|l| {
                (l.contains(" authenticated ") && l.contains("sa/db"))
                    .then(|| {
                        l.split("took_us=")
                            .nth(1)
                            .and_then(|t| t.split_whitespace().next())
                    })
                    .flatten()
                    .and_then(|t| t.parse::<f64>().ok())
            });
        if let Some(us) = found {
            return Ok(us / 1000.0);
        }
        if Instant::now() > deadline {
            bail!("node-a's agent authenticated nothing within 60 s");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Connects from web, batch and web-rogue to db and prints what happened.
fn print_connections(sims: &[Sim]) {
    use tessera_tests::netns;
    let db_ip = sims[2].ip;
    println!(
        "{:<28} {:<18} {:<10} {:>9}  why",
        "from", "to", "result", "time"
    );
    for sim in [&sims[0], &sims[1], &sims[3]] {
        let out = netns::connect(
            &sim.cgroup,
            &sim.ns,
            db_ip,
            5432,
            std::time::Duration::from_millis(1500),
        );
        let mut words = out.split_whitespace();
        let (result, secs, why) = match words.next() {
            Some("ok") => (
                "allowed",
                words.next(),
                "authenticated pair (pre-authenticated)",
            ),
            Some("errno") => {
                let errno = words.next().unwrap_or("?");
                let why = if errno == "1" {
                    "no policy allows it: refused at connect() (EPERM)"
                } else {
                    "refused"
                };
                ("denied", words.next(), why)
            }
            _ => (
                "denied",
                words.next(),
                "peer not authenticated: SYN dropped at db's node",
            ),
        };
        let ms = secs
            .and_then(|s| s.parse::<f64>().ok())
            .map_or("-".to_owned(), |s| format!("{:.1} ms", s * 1000.0));
        let from = format!("shop/{} ({})", sim.name, sim.node);
        println!(
            "{from:<28} {:<18} {result:<10} {ms:>9}  {why}",
            "shop/db:5432"
        );
    }
}
