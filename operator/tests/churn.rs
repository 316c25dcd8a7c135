//! Randomized churn against a real control plane: pods and WorkloadIdentity
//! objects created and deleted at random while two `tessera-operator run`
//! replicas are killed (SIGKILL) and stopped (SIGTERM) and restarted. Checks
//! what must hold throughout (no (id, generation) pair is ever issued for two
//! SPIFFE IDs or by two allocations) and at the end (every pod converges to the
//! SPIFFE ID a reference model in this file expects, with the numeric identity
//! currently allocated for it).
//!
//! The seed is printed; set TESSERA_CHURN_SEED to replay a run, and
//! TESSERA_CHURN_STEPS to make it longer.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::collections::{BTreeMap, HashMap};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use tessera_api::crd::{NumericIdentity, PodIdentity};
use tessera_tests::{ControlPlane, resources};

mod common;
use common::RunningOperator;

const NAMESPACES: [&str; 2] = ["shop", "bank"];
const ACCOUNTS: [&str; 2] = ["default", "api"];
const APPS: [&str; 4] = ["a", "b", "c", "d"];

/// xorshift64*: small, seedable, good enough to pick actions.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A pod as the model knows it.
#[derive(Clone)]
struct ModelPod {
    ns: &'static str,
    sa: &'static str,
    app: Option<&'static str>,
}

/// The reference model: a WorkloadIdentity `wid-<app>` selects pods labelled
/// `app=<app>` in every namespace and names them
/// `spiffe://cluster.test/app/<app>/ns/<ns>`; other pods get the default
/// `spiffe://cluster.test/ns/<ns>/sa/<sa>`.
fn expected(pod: &ModelPod, wids: &[&'static str]) -> String {
    match pod.app.filter(|a| wids.contains(a)) {
        Some(app) => format!("spiffe://cluster.test/app/{app}/ns/{}", pod.ns),
        None => format!("spiffe://cluster.test/ns/{}/sa/{}", pod.ns, pod.sa),
    }
}

fn wid(app: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "tessera.dev/v1alpha1", "kind": "WorkloadIdentity",
        "metadata": {"name": format!("wid-{app}")},
        "spec": {
            "spiffeIDTemplate": format!("spiffe://{{trustDomain}}/app/{app}/ns/{{namespace}}"),
            "podSelector": {"matchLabels": {"app": app}}
        }
    })
}

fn pod(name: &str, p: &ModelPod) -> Pod {
    let pod = tessera_tests::fixtures::PodBuilder::new(p.ns, name).service_account(p.sa);
    match p.app {
        Some(app) => pod.label("app", app).build(),
        None => pod.build(),
    }
}

/// Everything seen while churning.
#[derive(Default)]
struct Seen {
    /// (id, generation) -> SPIFFE ID, from NumericIdentity objects and pods.
    pairs: HashMap<(u32, i64), String>,
    /// generation -> UID of the NumericIdentity object that had it.
    generations: HashMap<i64, String>,
    violations: Vec<String>,
}

impl Seen {
    fn pair(&mut self, id: u32, generation: i64, spiffe_id: &str, whence: &str) {
        let known = self
            .pairs
            .entry((id, generation))
            .or_insert_with(|| spiffe_id.to_owned());
        if known != spiffe_id {
            self.violations.push(format!(
                "({id}, {generation}) stands for {known} and, in {whence}, for {spiffe_id}"
            ));
        }
    }
}

/// Records every NumericIdentity and PodIdentity the API server shows.
fn observe(client: &kube::Client, seen: Arc<Mutex<Seen>>) -> Vec<tokio::task::JoinHandle<()>> {
    let ids = watcher(
        Api::<NumericIdentity>::all(client.clone()),
        Default::default(),
    )
    .default_backoff()
    .applied_objects();
    let seen_ids = seen.clone();
    let a = tokio::spawn(async move {
        let mut ids = std::pin::pin!(ids);
        while let Some(event) = ids.next().await {
            let Ok(obj) = event else { continue };
            let uid = obj.metadata.uid.clone().unwrap_or_default();
            let mut s = seen_ids.lock().unwrap();
            s.pair(
                obj.spec.id,
                obj.spec.generation,
                &obj.spec.spiffe_id,
                "a NumericIdentity",
            );
            let owner = s
                .generations
                .entry(obj.spec.generation)
                .or_insert_with(|| uid.clone());
            if *owner != uid {
                let msg = format!(
                    "generation {} allocated twice (objects {owner} and {uid})",
                    obj.spec.generation
                );
                s.violations.push(msg);
            }
        }
    });
    let records = watcher(Api::<PodIdentity>::all(client.clone()), Default::default())
        .default_backoff()
        .applied_objects();
    let b = tokio::spawn(async move {
        let mut records = std::pin::pin!(records);
        while let Some(event) = records.next().await {
            let Ok(record) = event else { continue };
            let r = &record.spec;
            seen.lock()
                .unwrap()
                .pair(r.id, r.generation, &r.spiffe_id, "a pod's PodIdentity");
        }
    });
    vec![a, b]
}

/// Index of the replica that leads now, waiting up to 30 s for one.
async fn leader(ops: &[RunningOperator; 2]) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(i) = ops.iter().position(RunningOperator::is_leader) {
            return i;
        }
        assert!(Instant::now() < deadline, "no leader within 30 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_with_two_replicas_and_restarts_never_reuses_an_identity() -> Result<()> {
    let seed = std::env::var("TESSERA_CHURN_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    let steps: usize = std::env::var("TESSERA_CHURN_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    println!("churn seed {seed} ({steps} steps); replay with TESSERA_CHURN_SEED={seed}");
    let mut rng = Rng(seed);

    let (cp, client) = resources::control_plane_with_crds().await?;
    let mut manifest =
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: tessera-system}\n".to_owned();
    for ns in NAMESPACES {
        manifest += &format!("---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n");
        for sa in ACCOUNTS {
            manifest += &format!(
                "---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {sa}, namespace: {ns}}}\n"
            );
        }
    }
    resources::apply_manifest(&client, &manifest).await?;

    let seen = Arc::new(Mutex::new(Seen::default()));
    let observers = observe(&client, seen.clone());
    // The replicas' logs, for a failure's post-mortem.
    let log_path = std::env::temp_dir().join(format!("tessera-churn-{seed}.log"));
    let log = std::fs::File::create(&log_path)?;
    println!("operator logs: {}", log_path.display());
    let start = |cp: &ControlPlane| -> Result<RunningOperator> {
        RunningOperator::start_with(cp, 2, Stdio::from(log.try_clone()?))
    };
    let mut ops = [start(&cp)?, start(&cp)?];

    let mut model: BTreeMap<String, ModelPod> = BTreeMap::new();
    let mut wids: Vec<&'static str> = Vec::new();
    let (mut kills, mut stops) = (0, 0);
    for step in 0..steps {
        match rng.below(100) {
            0..40 => {
                let p = ModelPod {
                    ns: NAMESPACES[rng.below(NAMESPACES.len())],
                    sa: ACCOUNTS[rng.below(ACCOUNTS.len())],
                    app: (rng.below(4) != 0).then(|| APPS[rng.below(APPS.len())]),
                };
                let name = format!("p{step}");
                Api::<Pod>::namespaced(client.clone(), p.ns)
                    .create(&PostParams::default(), &pod(&name, &p))
                    .await?;
                model.insert(name, p);
            }
            40..60 if !model.is_empty() => {
                let name = model.keys().nth(rng.below(model.len())).unwrap().clone();
                let p = model.remove(&name).unwrap();
                Api::<Pod>::namespaced(client.clone(), p.ns)
                    .delete(&name, &DeleteParams::default())
                    .await?;
            }
            60..75 => {
                let app = APPS[rng.below(APPS.len())];
                if !wids.contains(&app) {
                    resources::create(&client, &serde_json::from_value(wid(app))?, false).await?;
                    wids.push(app);
                }
            }
            75..87 if !wids.is_empty() => {
                let app = wids.remove(rng.below(wids.len()));
                Api::<tessera_api::crd::WorkloadIdentity>::all(client.clone())
                    .delete(&format!("wid-{app}"), &DeleteParams::default())
                    .await?;
            }
            87..93 => {
                // The leader dies without releasing its lease.
                let i = leader(&ops).await;
                ops[i] = start(&cp)?;
                kills += 1;
            }
            93..97 => {
                // The leader shuts down cleanly and hands over.
                let i = leader(&ops).await;
                let old = std::mem::replace(&mut ops[i], start(&cp)?);
                let (ok, _) = old.terminate().await?;
                assert!(ok, "a replica failed to stop cleanly");
                stops += 1;
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
        tokio::time::sleep(Duration::from_millis(rng.below(60) as u64)).await;
    }
    println!(
        "churn done: {} pods, WorkloadIdentities {wids:?}, {kills} leader kills, {stops} clean handovers",
        model.len()
    );

    // Convergence: every pod has the model's SPIFFE ID and the numeric
    // identity currently allocated for that ID.
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut last = String::new();
    loop {
        let allocated: HashMap<String, (u32, i64)> = Api::<NumericIdentity>::all(client.clone())
            .list(&Default::default())
            .await?
            .items
            .into_iter()
            .map(|n| (n.spec.spiffe_id, (n.spec.id, n.spec.generation)))
            .collect();
        let mut wrong = Vec::new();
        for (name, p) in &model {
            let want = expected(p, &wids);
            let got = resources::pod_identity(&client, p.ns, name).await?;
            let id = got
                .as_ref()
                .map(|r| r.spiffe_id.clone())
                .unwrap_or_default();
            let numeric = got.as_ref().map(|r| (r.id, r.generation));
            if id != want || numeric.is_none() || numeric != allocated.get(&want).copied() {
                wrong.push(format!(
                    "{}/{name}: {id:?} {numeric:?}, want {want} {:?}",
                    p.ns,
                    allocated.get(&want)
                ));
            }
        }
        if wrong.is_empty() {
            break;
        }
        last = wrong.join("\n");
        assert!(
            Instant::now() < deadline,
            "no convergence within 90 s (seed {seed}):\n{last}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let _ = last;
    drop(ops);
    let _ = std::fs::remove_file(&log_path);
    for o in observers {
        o.abort();
    }
    let seen = seen.lock().unwrap();
    assert!(
        seen.violations.is_empty(),
        "seed {seed}:\n{}",
        seen.violations.join("\n")
    );
    assert!(
        seen.pairs.len() >= 2,
        "the observers saw almost nothing; the test would prove nothing"
    );
    println!(
        "{} distinct (id, generation) pairs seen, none reused",
        seen.pairs.len()
    );
    Ok(())
}
