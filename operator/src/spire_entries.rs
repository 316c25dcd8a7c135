//! SPIRE mode, the operator's part: every workload identity in use on a
//! node is registered in the SPIRE server through its Entry API, so that
//! node's SPIRE agent can hand the identity's SVIDs to the Tessera agent
//! (Delegated Identity API). Least privilege: an entry is parented to the
//! SPIRE agent of one node, and exists only while a pod of that identity
//! runs there, so no SPIRE agent can obtain the key of an identity that
//! does not run on its node.
//!
//! Each entry carries one selector, `tessera:spiffe_id:<SPIFFE ID>`, that no
//! workload attestor produces: only a delegate asking for that selector
//! gets the SVID. The Tessera agent subscribes with exactly that selector,
//! one subscription per local identity.
//!
//! Ownership: the operator creates entries with IDs that start with a
//! configured prefix and only ever updates or deletes entries whose ID has
//! that prefix; every other entry is someone else's and is left alone.
//! Changes go in batches. A dry run computes the same plan and only prints
//! it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tessera_api::crd::{PodIdentity, WorkloadIdentity};
use tessera_api::spiffe::{SpiffeId, TrustDomain};
use tessera_api::spire_api::api::server::entry::v1 as entry_api;
use tessera_api::spire_api::api::types::{Entry, EntryMask, Selector, Spiffeid};
use tonic::transport::Channel;
use tracing::{info, warn};

/// Entries per batch request.
pub const BATCH: usize = 50;
/// Entries per page when listing.
const PAGE: i32 = 500;

/// Why registration failed.
#[derive(Debug, thiserror::Error)]
pub enum SpireError {
    /// The server's socket could not be reached.
    #[error(
        "cannot connect to the SPIRE server API at {socket}: {reason}; is spire-server running, and may the operator open its socket?"
    )]
    Connect {
        /// The socket path.
        socket: PathBuf,
        /// The transport error.
        reason: String,
    },
    /// A call failed as a whole.
    #[error(
        "SPIRE Entry API {call} failed: {status}; the operator needs the admin rights of an `admin` entry or the server's local socket"
    )]
    Call {
        /// Which RPC.
        call: &'static str,
        /// The gRPC status.
        #[source]
        status: tonic::Status,
    },
    /// The configuration is unusable.
    #[error("SPIRE registration: {0}")]
    Config(String),
}

/// How entries are made and which are ours.
#[derive(Debug, Clone)]
pub struct SpireConfig {
    /// The SPIRE server's API socket.
    pub socket: PathBuf,
    /// Entry IDs Tessera creates start with this; only such entries are
    /// ever changed or deleted.
    pub id_prefix: String,
    /// The parent ID of a node's entries, with `{trustDomain}` and
    /// `{nodeName}`: the SPIFFE ID of that node's SPIRE agent or of a node
    /// alias that matches only it. A Node annotated with
    /// [`PARENT_ANNOTATION`] uses that instead.
    pub parent_template: String,
    /// Compute and print the plan; change nothing.
    pub dry_run: bool,
}

/// Node annotation naming the SPIFFE ID of that node's SPIRE agent, used as
/// the parent of its entries (instead of the template).
pub const PARENT_ANNOTATION: &str = "tessera.dev/spire-agent-id";

impl SpireConfig {
    /// Checks the prefix (letters, digits, `.`, `-`, `_`; 1 to 32 bytes, so
    /// every ID stays within SPIRE's limits) and the template.
    pub fn validate(&self) -> Result<(), SpireError> {
        let ok = !self.id_prefix.is_empty()
            && self.id_prefix.len() <= 32
            && self
                .id_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
        if !ok {
            return Err(SpireError::Config(format!(
                "entry ID prefix {:?} must be 1 to 32 letters, digits, '.', '-' or '_'",
                self.id_prefix
            )));
        }
        if !self.parent_template.contains("{nodeName}") {
            return Err(SpireError::Config(format!(
                "parent ID template {:?} must contain {{nodeName}}: each node's entries belong to that node's SPIRE agent",
                self.parent_template
            )));
        }
        Ok(())
    }
}

/// The selector that names `id` (see [`tessera_api::spire_api::tessera_selector`]).
pub fn selector(id: &str) -> Selector {
    tessera_api::spire_api::tessera_selector(id)
}

/// The ID of the entry for `id` under `parent`: the prefix and 32 hex
/// digits of SHA-256 over both.
pub fn entry_id(prefix: &str, id: &str, parent: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, format!("{id}\n{parent}").as_bytes());
    let hex: String = digest.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{prefix}{hex}")
}

fn spiffeid(id: &SpiffeId) -> Spiffeid {
    Spiffeid {
        trust_domain: id.trust_domain().to_string(),
        path: id.path().to_owned(),
    }
}

fn id_string(id: Option<&Spiffeid>) -> String {
    id.map(Spiffeid::uri).unwrap_or_default()
}

fn ttl_secs(text: Option<&str>) -> i32 {
    text.and_then(|t| tessera_api::duration::parse(t).ok())
        .map_or(0, |d| i32::try_from(d.as_secs()).unwrap_or(i32::MAX))
}

/// The entries the pods call for, from their PodIdentity records: one per
/// (SPIFFE ID, node) with a pod of that identity on that node, by entry ID.
/// Pods without a record (no identity, or terminating) or a node count for
/// nothing; `parents` gives each node's parent ID.
pub fn desired(
    cfg: &SpireConfig,
    trust_domain: &TrustDomain,
    pods: &[Arc<PodIdentity>],
    wids: &[Arc<WorkloadIdentity>],
    parents: &BTreeMap<String, String>,
) -> BTreeMap<String, Entry> {
    let by_name: BTreeMap<String, &WorkloadIdentity> = wids
        .iter()
        .filter_map(|w| Some((w.metadata.name.clone()?, w.as_ref())))
        .collect();
    let mut out = BTreeMap::new();
    for record in pods {
        // Only the operator writes records, and it deletes those of
        // terminating pods; the pod's own annotations play no part.
        let Some(record) = record.checked() else {
            continue;
        };
        let node = record.node_name.as_str();
        if node.is_empty() {
            continue;
        }
        let Some(id) = record
            .spiffe_id
            .parse::<SpiffeId>()
            .ok()
            .filter(|id| id.is_member_of(trust_domain))
        else {
            continue;
        };
        let parent = parents.get(node).cloned().unwrap_or_else(|| {
            cfg.parent_template
                .replace("{trustDomain}", trust_domain.as_str())
                .replace("{nodeName}", node)
        });
        let Ok(parent_id) = parent.parse::<SpiffeId>() else {
            warn!(
                node,
                parent,
                "the parent ID for this node is not a SPIFFE ID; its pods are not registered"
            );
            continue;
        };
        let wid = record.source.as_deref().and_then(|name| by_name.get(name));
        let mut federates_with: Vec<String> = wid
            .map(|w| w.spec.federates_with.clone())
            .unwrap_or_default();
        federates_with.sort();
        federates_with.dedup();
        let entry = Entry {
            id: entry_id(&cfg.id_prefix, id.as_str(), parent_id.as_str()),
            spiffe_id: Some(spiffeid(&id)),
            parent_id: Some(spiffeid(&parent_id)),
            selectors: vec![selector(id.as_str())],
            x509_svid_ttl: ttl_secs(wid.and_then(|w| w.spec.ttl.as_deref())),
            jwt_svid_ttl: ttl_secs(wid.and_then(|w| w.spec.jwt_ttl.as_deref())),
            federates_with,
            hint: wid.and_then(|w| w.spec.hint.clone()).unwrap_or_default(),
            ..Entry::default()
        };
        out.insert(entry.id.clone(), entry);
    }
    out
}

/// What a sync would do.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Plan {
    /// Entries to create.
    pub create: Vec<Entry>,
    /// Owned entries to change (the desired state, with their IDs).
    pub update: Vec<Entry>,
    /// IDs of owned entries no pod calls for.
    pub delete: Vec<String>,
    /// Entries left alone because another owner's.
    pub foreign: usize,
}

impl Plan {
    /// True when nothing needs doing.
    pub fn is_empty(&self) -> bool {
        self.create.is_empty() && self.update.is_empty() && self.delete.is_empty()
    }

    /// One line per change, for the dry run.
    pub fn lines(&self) -> Vec<String> {
        let describe = |e: &Entry| {
            format!(
                "{} {} (parent {}, ttl {}s, federates with [{}])",
                e.id,
                id_string(e.spiffe_id.as_ref()),
                id_string(e.parent_id.as_ref()),
                e.x509_svid_ttl,
                e.federates_with.join(", ")
            )
        };
        self.create
            .iter()
            .map(|e| format!("create {}", describe(e)))
            .chain(
                self.update
                    .iter()
                    .map(|e| format!("update {}", describe(e))),
            )
            .chain(self.delete.iter().map(|id| format!("delete {id}")))
            .collect()
    }
}

/// The fields Tessera sets, for comparing what is with what should be.
fn comparable(e: &Entry) -> impl PartialEq + '_ {
    let mut selectors: Vec<(&str, &str)> = e
        .selectors
        .iter()
        .map(|s| (s.r#type.as_str(), s.value.as_str()))
        .collect();
    selectors.sort();
    let mut federates: Vec<&str> = e.federates_with.iter().map(String::as_str).collect();
    federates.sort();
    (
        id_string(e.spiffe_id.as_ref()),
        id_string(e.parent_id.as_ref()),
        selectors,
        e.x509_svid_ttl,
        e.jwt_svid_ttl,
        federates,
        e.hint.as_str(),
        e.admin,
        e.downstream,
        e.dns_names.clone(),
    )
}

/// Compares the desired entries with the server's; only entries whose ID
/// starts with `prefix` may be updated or deleted. An entry TTL of 0 in
/// the desired state means the server's default, so a server that fills
/// it in is not a difference.
pub fn plan(desired: &BTreeMap<String, Entry>, current: &[Entry], prefix: &str) -> Plan {
    let mut plan = Plan::default();
    let mut seen = BTreeSet::new();
    for entry in current {
        if !entry.id.starts_with(prefix) {
            plan.foreign += 1;
            continue;
        }
        seen.insert(entry.id.as_str());
        match desired.get(&entry.id) {
            None => plan.delete.push(entry.id.clone()),
            Some(want) => {
                let mut have = entry.clone();
                if want.x509_svid_ttl == 0 {
                    have.x509_svid_ttl = 0;
                }
                if want.jwt_svid_ttl == 0 {
                    have.jwt_svid_ttl = 0;
                }
                if comparable(&have) != comparable(want) {
                    plan.update.push(want.clone());
                }
            }
        }
    }
    plan.create = desired
        .values()
        .filter(|e| !seen.contains(e.id.as_str()))
        .cloned()
        .collect();
    plan
}

/// A client of the SPIRE server's Entry API over its unix socket.
pub async fn connect(
    socket: &Path,
) -> Result<entry_api::entry_client::EntryClient<Channel>, SpireError> {
    let channel = tessera_api::spire_api::unix_channel(socket)
        .await
        .map_err(|e| SpireError::Connect {
            socket: socket.to_owned(),
            reason: e.to_string(),
        })?;
    Ok(entry_api::entry_client::EntryClient::new(channel))
}

/// Every entry on the server (all pages).
pub async fn list(
    client: &mut entry_api::entry_client::EntryClient<Channel>,
) -> Result<Vec<Entry>, SpireError> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_entries(entry_api::ListEntriesRequest {
                filter: None,
                output_mask: None,
                page_size: PAGE,
                page_token: token,
            })
            .await
            .map_err(|status| SpireError::Call {
                call: "ListEntries",
                status,
            })?
            .into_inner();
        out.extend(page.entries);
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        token = page.next_page_token;
    }
}

/// What applying a plan did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Entries created, updated, deleted.
    pub created: usize,
    /// Entries updated.
    pub updated: usize,
    /// Entries deleted.
    pub deleted: usize,
    /// Per-entry failures: (entry ID, what the server said).
    pub failed: Vec<(String, String)>,
}

fn failed_status(
    id: String,
    status: Option<tessera_api::spire_api::api::types::Status>,
) -> Option<(String, String)> {
    match status {
        Some(s) if s.code != 0 => Some((id, format!("code {}: {}", s.code, s.message))),
        _ => None,
    }
}

/// Applies `plan` in batches of [`BATCH`]: creates, then updates, then
/// deletes. A batch call that fails as a whole stops the pass (the next
/// pass starts over from the server's state); per-entry failures are
/// collected.
pub async fn apply(
    client: &mut entry_api::entry_client::EntryClient<Channel>,
    plan: &Plan,
) -> Result<Applied, SpireError> {
    let mut done = Applied::default();
    let call = |call: &'static str| move |status| SpireError::Call { call, status };
    for batch in plan.create.chunks(BATCH) {
        let results = client
            .batch_create_entry(entry_api::BatchCreateEntryRequest {
                entries: batch.to_vec(),
                output_mask: Some(EntryMask::default()),
            })
            .await
            .map_err(call("BatchCreateEntry"))?
            .into_inner()
            .results;
        for (entry, r) in batch.iter().zip(results) {
            match failed_status(entry.id.clone(), r.status) {
                Some(f) => done.failed.push(f),
                None => done.created += 1,
            }
        }
    }
    let mask = EntryMask {
        spiffe_id: true,
        parent_id: true,
        selectors: true,
        x509_svid_ttl: true,
        jwt_svid_ttl: true,
        federates_with: true,
        hint: true,
        admin: true,
        downstream: true,
        dns_names: true,
        ..EntryMask::default()
    };
    for batch in plan.update.chunks(BATCH) {
        let results = client
            .batch_update_entry(entry_api::BatchUpdateEntryRequest {
                entries: batch.to_vec(),
                input_mask: Some(mask),
                output_mask: Some(EntryMask::default()),
            })
            .await
            .map_err(call("BatchUpdateEntry"))?
            .into_inner()
            .results;
        for (entry, r) in batch.iter().zip(results) {
            match failed_status(entry.id.clone(), r.status) {
                Some(f) => done.failed.push(f),
                None => done.updated += 1,
            }
        }
    }
    for batch in plan.delete.chunks(BATCH) {
        let results = client
            .batch_delete_entry(entry_api::BatchDeleteEntryRequest {
                ids: batch.to_vec(),
            })
            .await
            .map_err(call("BatchDeleteEntry"))?
            .into_inner()
            .results;
        for (id, r) in batch.iter().zip(results) {
            match failed_status(id.clone(), r.status) {
                Some(f) => done.failed.push(f),
                None => done.deleted += 1,
            }
        }
    }
    Ok(done)
}

/// The server's entries after `plan` was applied to `before` without a
/// single failure.
fn after(before: Vec<Entry>, plan: &Plan) -> Vec<Entry> {
    let gone: BTreeSet<&str> = plan
        .delete
        .iter()
        .map(String::as_str)
        .chain(plan.update.iter().map(|e| e.id.as_str()))
        .collect();
    let mut out: Vec<Entry> = before
        .into_iter()
        .filter(|e| !gone.contains(e.id.as_str()))
        .collect();
    out.extend(plan.update.iter().cloned());
    out.extend(plan.create.iter().cloned());
    out
}

/// One pass: desired entries from `pods` and `wids`, the server's entries,
/// the plan, and (unless a dry run) its application. Returns the plan and
/// what was applied.
///
/// `known` holds the server's entries as of the last pass, kept up to date
/// with what this pass applies, so a pass after a pod change does not list
/// every entry again; `None` (at start, on every resync, after any
/// failure) lists them.
pub async fn sync_once(
    cfg: &SpireConfig,
    trust_domain: &TrustDomain,
    pods: &[Arc<PodIdentity>],
    wids: &[Arc<WorkloadIdentity>],
    parents: &BTreeMap<String, String>,
    known: &mut Option<Vec<Entry>>,
) -> Result<(Plan, Option<Applied>), SpireError> {
    let mut client = connect(&cfg.socket).await?;
    let want = desired(cfg, trust_domain, pods, wids, parents);
    let current = match known.take() {
        Some(current) => current,
        None => list(&mut client).await?,
    };
    let plan = plan(&want, &current, &cfg.id_prefix);
    if cfg.dry_run || plan.is_empty() {
        *known = Some(current);
        return Ok((plan, None));
    }
    let applied = apply(&mut client, &plan).await?;
    if applied.failed.is_empty() {
        *known = Some(after(current, &plan));
    }
    for (id, why) in &applied.failed {
        warn!(entry = %id, reason = %why, "SPIRE refused a registration change; retried on the next pass");
    }
    info!(
        created = applied.created,
        updated = applied.updated,
        deleted = applied.deleted,
        failed = applied.failed.len(),
        foreign = plan.foreign,
        "SPIRE entries synced"
    );
    Ok((plan, Some(applied)))
}

/// Which watched store finished its first list, if an event says so.
type Listed = Option<usize>;

/// Keeps the SPIRE server's entries in step with the pods, until the task
/// is dropped: a pass after every change of pods, nodes or
/// WorkloadIdentities (gathered for half a second), planned against the
/// entries known from the last pass, and every `resync` a pass against a
/// fresh list of every entry.
pub async fn run(
    client: kube::Client,
    cfg: SpireConfig,
    trust_domain: TrustDomain,
    resync: Duration,
) -> Result<(), SpireError> {
    use futures::StreamExt;
    cfg.validate()?;
    let (stores, changes) = Stores::follow(&client);
    let mut changes = std::pin::pin!(changes);
    let mut ready = [false; 3];
    let mut known: Option<Vec<Entry>> = None;
    loop {
        tokio::select! {
            change = changes.next() => match change {
                None => return Ok(()),
                Some(listed) => note_listed(&mut ready, listed),
            },
            // Entries may change under the operator (an administrator, a
            // server restored from backup): list them afresh.
            _ = tokio::time::sleep(resync) => known = None,
        }
        // Gather a burst of changes into one pass.
        let gather = tokio::time::sleep(Duration::from_millis(500));
        tokio::pin!(gather);
        loop {
            tokio::select! {
                _ = &mut gather => break,
                change = changes.next() => match change {
                    None => return Ok(()),
                    Some(listed) => note_listed(&mut ready, listed),
                },
            }
        }
        // Never plan from a partial list: it would delete what it missed.
        if ready.iter().all(|r| *r) {
            stores.pass(&cfg, &trust_domain, &mut known).await;
        }
    }
}

fn note_listed(ready: &mut [bool; 3], listed: Listed) {
    if let Some(i) = listed {
        ready[i] = true;
    }
}

/// What registration follows.
struct Stores {
    pods: kube::runtime::reflector::Store<PodIdentity>,
    wids: kube::runtime::reflector::Store<WorkloadIdentity>,
    nodes: kube::runtime::reflector::Store<k8s_openapi::api::core::v1::Node>,
}

impl Stores {
    /// The stores, and one stream of their changes saying which store
    /// finished its first list (0 pods, 1 WorkloadIdentities, 2 nodes).
    fn follow(
        client: &kube::Client,
    ) -> (Stores, impl futures::Stream<Item = Listed> + Send + 'static) {
        use futures::StreamExt;
        use k8s_openapi::api::core::v1::Node;
        use kube::Api;
        use kube::runtime::{WatchStreamExt, reflector, watcher};
        fn listed<K>(i: usize) -> impl FnMut(Result<watcher::Event<K>, watcher::Error>) -> Listed {
            move |e| matches!(e, Ok(watcher::Event::InitDone)).then_some(i)
        }
        let (pods, pods_w) = reflector::store::<PodIdentity>();
        let (wids, wids_w) = reflector::store::<WorkloadIdentity>();
        let (nodes, nodes_w) = reflector::store::<Node>();
        let all = watcher::Config::default;
        let changes = futures::stream::select_all([
            watcher(Api::<PodIdentity>::all(client.clone()), all())
                .default_backoff()
                .reflect(pods_w)
                .map(listed(0))
                .boxed(),
            watcher(Api::<WorkloadIdentity>::all(client.clone()), all())
                .default_backoff()
                .reflect(wids_w)
                .map(listed(1))
                .boxed(),
            watcher(Api::<Node>::all(client.clone()), all())
                .default_backoff()
                .reflect(nodes_w)
                .map(listed(2))
                .boxed(),
        ]);
        (Stores { pods, wids, nodes }, changes)
    }

    /// One registration pass over what the stores hold.
    #[tracing::instrument(name = "reconcile", skip_all, fields(spire = "entries"))]
    async fn pass(
        &self,
        cfg: &SpireConfig,
        trust_domain: &TrustDomain,
        known: &mut Option<Vec<Entry>>,
    ) {
        let parents: BTreeMap<String, String> = self
            .nodes
            .state()
            .iter()
            .filter_map(|n| {
                let parent = n.metadata.annotations.as_ref()?.get(PARENT_ANNOTATION)?;
                Some((n.metadata.name.clone()?, parent.clone()))
            })
            .collect();
        match sync_once(
            cfg,
            trust_domain,
            &self.pods.state(),
            &self.wids.state(),
            &parents,
            known,
        )
        .await
        {
            Ok((plan, None)) if cfg.dry_run && !plan.is_empty() => {
                for line in plan.lines() {
                    info!("SPIRE dry run: would {line}");
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, "SPIRE registration pass failed; new workloads get no SVIDs until it succeeds; retrying")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(prefix: &str, id: &str, parent: &str) -> Entry {
        let (id, parent): (SpiffeId, SpiffeId) = (id.parse().unwrap(), parent.parse().unwrap());
        Entry {
            id: entry_id(prefix, id.as_str(), parent.as_str()),
            spiffe_id: Some(spiffeid(&id)),
            parent_id: Some(spiffeid(&parent)),
            selectors: vec![selector(id.as_str())],
            ..Entry::default()
        }
    }

    #[test]
    fn only_owned_entries_are_changed() {
        let p = "tessera-";
        let keep = entry(p, "spiffe://b.test/web", "spiffe://b.test/node/a");
        let gone = entry(p, "spiffe://b.test/old", "spiffe://b.test/node/a");
        let mut changed = entry(p, "spiffe://b.test/db", "spiffe://b.test/node/a");
        let new = entry(p, "spiffe://b.test/api", "spiffe://b.test/node/b");
        let mut foreign = entry("", "spiffe://b.test/web", "spiffe://b.test/node/a");
        foreign.id = "1234-5678".into();
        let mut server_changed = changed.clone();
        server_changed.x509_svid_ttl = 60;
        changed.x509_svid_ttl = 120;
        let want: BTreeMap<String, Entry> = [&keep, &changed, &new]
            .into_iter()
            .map(|e| (e.id.clone(), (*e).clone()))
            .collect();
        let current = vec![keep.clone(), gone.clone(), server_changed, foreign];
        let plan = plan(&want, &current, p);
        assert_eq!(plan.create, vec![new]);
        assert_eq!(plan.update, vec![changed]);
        assert_eq!(plan.delete, vec![gone.id]);
        assert_eq!(plan.foreign, 1);
        assert_eq!(plan.lines().len(), 3);
    }

    #[test]
    fn applying_a_plan_leaves_what_the_next_plan_expects() {
        let p = "t-";
        let keep = entry(p, "spiffe://b.test/web", "spiffe://b.test/node/a");
        let gone = entry(p, "spiffe://b.test/old", "spiffe://b.test/node/a");
        let mut changed = entry(p, "spiffe://b.test/db", "spiffe://b.test/node/a");
        let new = entry(p, "spiffe://b.test/api", "spiffe://b.test/node/b");
        let mut foreign = entry("", "spiffe://b.test/web", "spiffe://b.test/node/a");
        foreign.id = "1234".into();
        let before = vec![keep.clone(), gone, changed.clone(), foreign];
        changed.x509_svid_ttl = 120;
        let want: BTreeMap<String, Entry> = [&keep, &changed, &new]
            .into_iter()
            .map(|e| (e.id.clone(), (*e).clone()))
            .collect();
        let first = plan(&want, &before, p);
        assert!(!first.is_empty());
        let now = after(before, &first);
        assert_eq!(now.len(), 4, "keep, changed, new and the foreign entry");
        let second = plan(&want, &now, p);
        assert!(second.is_empty(), "{second:?}");
        assert_eq!(second.foreign, 1);
    }

    #[test]
    fn a_default_ttl_filled_in_by_the_server_is_no_difference() {
        let want = entry("t-", "spiffe://b.test/web", "spiffe://b.test/node/a");
        let mut have = want.clone();
        have.x509_svid_ttl = 3600;
        have.jwt_svid_ttl = 300;
        have.revision_number = 7;
        let desired = BTreeMap::from([(want.id.clone(), want)]);
        assert!(plan(&desired, &[have], "t-").is_empty());
    }

    #[test]
    fn ids_are_stable_and_distinct_per_node() {
        let a = entry_id("t-", "spiffe://b.test/web", "spiffe://b.test/node/a");
        assert_eq!(
            a,
            entry_id("t-", "spiffe://b.test/web", "spiffe://b.test/node/a")
        );
        assert_ne!(
            a,
            entry_id("t-", "spiffe://b.test/web", "spiffe://b.test/node/b")
        );
        assert!(a.starts_with("t-") && a.len() == 2 + 32);
    }

    #[test]
    fn configuration_is_checked() {
        let mut cfg = SpireConfig {
            socket: "/x".into(),
            id_prefix: "tessera.".into(),
            parent_template: "spiffe://{trustDomain}/tessera/node/{nodeName}".into(),
            dry_run: false,
        };
        assert!(cfg.validate().is_ok());
        cfg.id_prefix = "bad prefix".into();
        assert!(cfg.validate().is_err());
        cfg.id_prefix = "ok".into();
        cfg.parent_template = "spiffe://b.test/all-nodes".into();
        assert!(cfg.validate().is_err());
    }
}
