//! The credential follower: rebuilds the handshake credentials whenever
//! this node's SVIDs or the trust bundles change, and revokes every
//! authentication when a CA leaves the bundles.

use std::sync::Arc;

use tracing::{debug, warn};

use super::Inner;
use crate::mesh::handshake::{self, Credentials};
use crate::svid::{Bundles, IdentityStore};
use crate::sync::lock;

/// Follows `store` until it is dropped; asks for a pass through `tx` after
/// every rebuild.
pub(super) async fn follow(
    inner: Arc<Inner>,
    store: IdentityStore,
    tx: tokio::sync::mpsc::Sender<()>,
) {
    let mut pods_changed = store.watch_changes();
    let mut bundles_changed = store.watch_bundles();
    let mut trusted: Option<Arc<Bundles>> = None;
    loop {
        if apply(&inner, &store, &mut trusted) {
            inner.cap_restored();
            // A new pod's SVID (or new bundles): authenticate its pairs
            // now, not after the next pass over the cluster.
            inner.preauthenticate();
            let _ = tx.try_send(());
        }
        tokio::select! {
            r = pods_changed.changed() => if r.is_err() { break },
            r = bundles_changed.changed() => if r.is_err() { break },
        }
    }
}

/// Builds credentials from the SVIDs and bundles held now; true when they
/// were rebuilt. A CA that left the bundles may have signed the SVIDs of
/// authentications still in the map: they are all revoked, once handshakes
/// trust only the new bundles (a handshake begun before the revocation is
/// not recorded after it).
fn apply(inner: &Inner, store: &IdentityStore, trusted: &mut Option<Arc<Bundles>>) -> bool {
    let svids = store.all_svids();
    let bundles = store.bundles();
    let removed = trusted
        .as_ref()
        .is_some_and(|old| handshake::authorities_removed(old, &bundles));
    *trusted = Some(bundles.clone());
    let mut rebuilt = false;
    if !bundles.trust_domain_id.is_empty() {
        match Credentials::rebuild(inner.creds().as_ref(), &svids, &bundles) {
            Ok(c) => {
                debug!(identities = ?c.identities(), "handshake credentials rebuilt");
                *lock(&inner.creds) = Some(c);
                rebuilt = true;
            }
            Err(e) if removed => {
                // Never go on trusting what left the bundles.
                *lock(&inner.creds) = None;
                tracing::error!(error = %e, "cannot build handshake credentials for the new bundles; no handshakes until they can be built");
            }
            Err(e) => {
                warn!(error = %e, "cannot build handshake credentials; the previous ones stay in use")
            }
        }
    }
    if removed {
        match inner.plane.revoke_all() {
            Ok(epoch) => {
                warn!(
                    epoch,
                    "a CA left the trust bundles: every authentication is revoked and pairs are authenticated again"
                );
                inner.revoke_connections();
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot revoke authentications after a CA left the trust bundles; check the eBPF maps")
            }
        }
    }
    rebuilt
}
