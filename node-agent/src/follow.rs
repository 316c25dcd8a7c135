//! Watch-fed maps holding only what the agent reads of each object.
//!
//! The agent follows every pod and numeric identity of the cluster. A
//! reflector store would keep each whole object (tens of optional fields
//! per pod even when empty); [`Compact`] keeps one small value per object
//! instead, made by an `extract` function, keyed by namespace/name. A new
//! listing (start, or a watch that had to start over) is collected aside
//! and swapped in whole, so readers never see a half-listed cluster.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use k8s_openapi::serde::de::DeserializeOwned;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use tracing::warn;

/// Values by namespace/name (by name for cluster-scoped objects), filled
/// by [`Compact::follow`].
#[derive(Debug)]
pub struct Compact<V> {
    items: Arc<RwLock<HashMap<String, V>>>,
    /// Bumped by every write: equal versions, equal contents.
    version: Arc<AtomicU64>,
    ready: tokio::sync::watch::Receiver<bool>,
    ready_tx: Arc<tokio::sync::watch::Sender<bool>>,
}

impl<V> Clone for Compact<V> {
    fn clone(&self) -> Self {
        Compact {
            items: self.items.clone(),
            version: self.version.clone(),
            ready: self.ready.clone(),
            ready_tx: self.ready_tx.clone(),
        }
    }
}

impl<V> Default for Compact<V> {
    fn default() -> Self {
        let (ready_tx, ready) = tokio::sync::watch::channel(false);
        Compact {
            items: Arc::default(),
            version: Arc::default(),
            ready,
            ready_tx: Arc::new(ready_tx),
        }
    }
}

/// `namespace/name`, or the name alone for a cluster-scoped object (so a
/// lookup by name needs no new string).
fn key<K: Resource>(obj: &K) -> String {
    match obj.namespace() {
        Some(ns) => format!("{ns}/{}", obj.name_any()),
        None => obj.name_any(),
    }
}

impl<V: Clone + PartialEq + Send + Sync + 'static> Compact<V> {
    /// Runs `f` over the values held.
    pub fn read<T>(&self, f: impl FnOnce(&HashMap<String, V>) -> T) -> T {
        match self.items.read() {
            Ok(items) => f(&items),
            Err(poisoned) => f(&poisoned.into_inner()),
        }
    }

    /// A copy of every value held.
    pub fn values(&self) -> Vec<V> {
        self.read(|items| items.values().cloned().collect())
    }

    /// Waits until the first listing is in.
    pub async fn wait_until_ready(&self) {
        let mut ready = self.ready.clone();
        let _ = ready.wait_for(|r| *r).await;
    }

    /// Holds `value` under `key` (None: holds nothing); whether that
    /// changed what is held.
    fn put(&self, key: String, value: Option<V>) -> bool {
        let mut changed = false;
        self.write(|items| match value {
            Some(v) if items.get(&key) != Some(&v) => {
                items.insert(key, v);
                changed = true;
            }
            Some(_) => {}
            None => changed = items.remove(&key).is_some(),
        });
        changed
    }

    fn write(&self, f: impl FnOnce(&mut HashMap<String, V>)) {
        match self.items.write() {
            Ok(mut items) => f(&mut items),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
        self.version.fetch_add(1, Ordering::Release);
    }

    /// A number that changes with every write: a reader that saw this
    /// number before reading the values knows they are still current while
    /// it is unchanged.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Follows `api` until the watch ends (it retries with backoff on its
    /// own): keeps `extract(obj)` for every object that yields a value and
    /// calls `changed` after every change of what is kept (an update that
    /// changes nothing extracted, such as a pod's phase or conditions,
    /// calls nothing). `what` names the resource in logs.
    pub async fn follow<K>(
        self,
        api: Api<K>,
        extract: fn(&K) -> Option<V>,
        changed: impl Fn(),
        what: &'static str,
    ) where
        K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    {
        let stream = watcher(api, watcher::Config::default()).default_backoff();
        let mut stream = std::pin::pin!(stream);
        let mut listing: Option<HashMap<String, V>> = None;
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Init) => listing = Some(HashMap::new()),
                Ok(watcher::Event::InitApply(obj)) => {
                    if let (Some(listing), Some(v)) = (listing.as_mut(), extract(&obj)) {
                        listing.insert(key(&obj), v);
                    }
                }
                Ok(watcher::Event::InitDone) => {
                    if let Some(listed) = listing.take() {
                        self.write(|items| *items = listed);
                    }
                    self.ready_tx.send_replace(true);
                    changed();
                }
                Ok(watcher::Event::Apply(obj)) => {
                    let k = key(&obj);
                    let value = extract(&obj);
                    if self.put(k, value) {
                        changed();
                    }
                }
                Ok(watcher::Event::Delete(obj)) => {
                    if self.put(key(&obj), None) {
                        changed();
                    }
                }
                Err(e) => warn!(error = %e, what, "watch error; retrying"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn only_a_change_of_what_is_kept_counts_as_a_change() {
        let held: Compact<u32> = Compact::default();
        assert!(held.put("a".into(), Some(1)), "new");
        assert!(!held.put("a".into(), Some(1)), "the same value again");
        assert!(held.put("a".into(), Some(2)), "another value");
        assert!(held.put("a".into(), None), "no value any more");
        assert!(!held.put("a".into(), None), "already gone");
        assert_eq!(held.values(), Vec::<u32>::new());
    }

    #[test]
    fn the_version_changes_with_every_write() {
        let held: Compact<u32> = Compact::default();
        let before = held.version();
        held.put("a".into(), Some(1));
        let after = held.version();
        assert_ne!(before, after);
        assert_eq!(held.clone().version(), after, "clones share it");
    }

    #[test]
    fn keys_are_namespace_and_name_or_the_name_alone() {
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(
            serde_json::json!({"metadata": {"name": "web-1", "namespace": "shop"}}),
        )
        .unwrap();
        assert_eq!(key(&pod), "shop/web-1");
        let record: tessera_api::crd::PodIdentity = serde_json::from_value(serde_json::json!({
            "apiVersion": "tessera.dev/v1alpha1", "kind": "PodIdentity",
            "metadata": {"name": "0f0e0d0c-0b0a-0908-0706-050403020100"},
            "spec": {"podUID": "0f0e0d0c-0b0a-0908-0706-050403020100", "namespace": "shop",
                "podName": "web-1", "nodeName": "node-a", "spiffeID": "spiffe://td/web",
                "id": 300, "generation": 2}
        }))
        .unwrap();
        assert_eq!(key(&record), "0f0e0d0c-0b0a-0908-0706-050403020100");
    }
}
