//! The enforcer's recurring work: the pass that brings the maps in line
//! with the cluster after every change (and each [`SWEEP`]), the poll of
//! the data path's missing-authentication events, and the two threads that
//! follow a pass: housekeeping (terminators, veths, revocation, the auth
//! cache) and the discovery of new pods' sandbox addresses.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use tracing::{error, warn};

use super::{EVENT_POLL, Inner, SETTLE, SETTLE_AFTER, SWEEP, Stores};
use crate::datapath::sandbox;
use crate::mesh::EnforceError;

/// What a pass wakes when it is done.
#[derive(Debug)]
pub(super) struct Wake {
    /// The housekeeping thread.
    pub housekeeping: Arc<tokio::sync::Notify>,
    /// The sandbox discovery thread.
    pub sandboxes: Arc<tokio::sync::Notify>,
}

/// Runs a pass after every change and every [`SWEEP`] until `shutdown`
/// resolves or every sender of `changed` is gone.
pub(super) async fn run(
    inner: &Arc<Inner>,
    stores: &Stores,
    mut changed: tokio::sync::mpsc::Receiver<()>,
    mut shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
    wake: Wake,
) {
    let mut sweep = tokio::time::interval(SWEEP);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last_pass = Instant::now();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            got = changed.recv() => if got.is_none() { break },
            _ = sweep.tick() => {}
        }
        // A change after a quiet spell goes to the maps at once (a new
        // pod's first connection waits for it); one in a burst lets the
        // rest of the burst settle into the same pass.
        if last_pass.elapsed() < SETTLE_AFTER {
            tokio::time::sleep(SETTLE).await;
        }
        while changed.try_recv().is_ok() {}
        last_pass = Instant::now();
        // A pass is synchronous work (map writes): the other tasks (the
        // handshakes above all) move to other workers meanwhile.
        if let Err(e) = tokio::task::block_in_place(|| inner.sync(stores)) {
            error!(error = %e, "data path sync failed: the maps may hold what the cluster no longer allows; retrying");
            continue;
        }
        inner.publish_waypoints();
        inner.preauthenticate();
        wake.housekeeping.notify_one();
        wake.sandboxes.notify_one();
    }
}

/// Handshakes for the missing authentications the data path reports: read
/// when the ring buffer wakes its reader, and every [`EVENT_POLL`] besides.
pub(super) async fn poll_events(inner: Arc<Inner>) {
    let ring = match inner.plane.events_fd().map(watch) {
        Ok(Ok(ring)) => Some(ring),
        Ok(Err(e)) => {
            warn!(error = %e, "cannot watch the auth event ring buffer with epoll; reading it every {EVENT_POLL:?} instead, so first connections may wait that much longer");
            None
        }
        Err(e) => {
            warn!(error = %e, "cannot watch the auth event ring buffer; reading it every {EVENT_POLL:?} instead, so first connections may wait that much longer");
            None
        }
    };
    let mut tick = tokio::time::interval(EVENT_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        match &ring {
            Some(ring) => tokio::select! {
                ready = ring.readable() => {
                    // Readiness is cleared before the drain: an event
                    // written during it wakes this loop again.
                    if let Ok(mut guard) = ready {
                        guard.clear_ready();
                    }
                }
                _ = tick.tick() => {}
            },
            None => {
                tick.tick().await;
            }
        }
        inner.drain_events();
    }
}

/// `fd` registered with the runtime's epoll. tokio deprecates
/// `AsyncFd::new` for descriptors it does not own (one closed while
/// registered); an `OwnedFd` is owned by the `AsyncFd` until it drops, and
/// the safe constructor keeps this crate free of `unsafe`.
#[allow(deprecated)]
fn watch(fd: std::os::fd::OwnedFd) -> std::io::Result<AsyncFd<std::os::fd::OwnedFd>> {
    AsyncFd::with_interest(fd, tokio::io::Interest::READABLE)
}

/// What follows a pass and may take long (a thread per pod namespace,
/// rtnetlink, disk), on one long-lived thread of its own (not the blocking
/// pool's changing ones: with glibc each new thread may get a malloc arena
/// of its own), so that the next change reaches the maps without waiting
/// for it. Its wake-up.
pub(super) fn spawn_housekeeping(
    inner: &Arc<Inner>,
) -> Result<Arc<tokio::sync::Notify>, EnforceError> {
    let wake = Arc::new(tokio::sync::Notify::new());
    let inner = Arc::downgrade(inner);
    let woken = wake.clone();
    let runtime = tokio::runtime::Handle::current();
    std::thread::Builder::new()
        .name("housekeeping".into())
        .spawn(move || {
            let _in_runtime = runtime.enter();
            loop {
                runtime.block_on(woken.notified());
                match inner.upgrade() {
                    Some(inner) => inner.housekeeping(),
                    None => break,
                }
            }
        })
        .map_err(EnforceError::Thread)?;
    Ok(wake)
}

/// The thread that looks into new local pods' sandboxes for their
/// addresses (see [`crate::datapath::sandbox`]): every few milliseconds while some
/// pod's status gives none, otherwise after each pass. Its wake-up.
pub(super) fn spawn_sandbox_discovery(
    inner: &Arc<Inner>,
    stores: &Stores,
) -> Result<Arc<tokio::sync::Notify>, EnforceError> {
    let wake = Arc::new(tokio::sync::Notify::new());
    let inner = Arc::downgrade(inner);
    let (stores, woken) = (stores.clone(), wake.clone());
    let runtime = tokio::runtime::Handle::current();
    std::thread::Builder::new()
        .name("sandboxes".into())
        .spawn(move || {
            let _in_runtime = runtime.enter();
            let mut poller = sandbox::Poller::default();
            let mut pending = 0;
            loop {
                if pending == 0 {
                    runtime.block_on(woken.notified());
                } else {
                    let nap = sandbox::poll_interval(Duration::ZERO);
                    let _ = runtime.block_on(tokio::time::timeout(nap, woken.notified()));
                }
                let Some(inner) = inner.upgrade() else { break };
                pending = inner.discover_sandboxes(&mut poller, &stores);
            }
        })
        .map_err(EnforceError::Thread)?;
    Ok(wake)
}
