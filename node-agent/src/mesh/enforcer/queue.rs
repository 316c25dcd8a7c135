//! The handshakes waiting to run, one queue per peer node. At most
//! [`MAX_STREAMS`] of one node's pairs run at once (as many as the channel
//! to its agent carries), each on a worker task that takes the node's next
//! pair when it is done and ends when the queue is empty. So a burst (an
//! agent's restart: every pair of every local pod) waits as a few bytes a
//! pair rather than as that many tasks, no handshake's time runs out while
//! it waits for a stream, and a peer that does not answer holds up only
//! its own pairs.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use crate::datapath::view::Pair;
use crate::mesh::channel::MAX_STREAMS;
use crate::sync::lock;

/// Most handshakes with one peer node at once.
pub const WORKERS_PER_NODE: usize = MAX_STREAMS;

/// The queues, by peer node.
#[derive(Debug, Default)]
pub(super) struct Queues {
    by_node: Mutex<HashMap<String, NodeQueue>>,
}

#[derive(Debug, Default)]
struct NodeQueue {
    pending: VecDeque<Pair>,
    /// Workers taking from this queue.
    workers: usize,
}

impl Queues {
    /// Queues `pair`; true when the caller is to start one more worker
    /// for its node (fewer than [`WORKERS_PER_NODE`] run).
    pub(super) fn push(&self, pair: Pair) -> bool {
        let mut all = lock(&self.by_node);
        let queue = all.entry(pair.remote_node.clone()).or_default();
        queue.pending.push_back(pair);
        let start = queue.workers < WORKERS_PER_NODE;
        queue.workers += usize::from(start);
        start
    }

    /// The next pair of `node`'s queue for a worker; None when it is empty,
    /// and the worker that asked is to end (it no longer counts).
    pub(super) fn next(&self, node: &str) -> Option<Pair> {
        let mut all = lock(&self.by_node);
        let queue = all.get_mut(node)?;
        if let Some(pair) = queue.pending.pop_front() {
            return Some(pair);
        }
        queue.workers = queue.workers.saturating_sub(1);
        if queue.workers == 0 {
            all.remove(node);
        }
        None
    }

    /// Pairs waiting, over all nodes.
    pub(super) fn waiting(&self) -> usize {
        lock(&self.by_node).values().map(|q| q.pending.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(local: usize, node: &str) -> Pair {
        Pair {
            local: format!("spiffe://td/l{local}"),
            remote: "spiffe://td/r".into(),
            remote_node: node.into(),
        }
    }

    #[test]
    fn a_node_gets_at_most_its_share_of_workers_and_each_ends_when_its_queue_is_empty() {
        let q = Queues::default();
        let started = (0..WORKERS_PER_NODE + 10)
            .filter(|&i| q.push(pair(i, "node-b")))
            .count();
        assert_eq!(started, WORKERS_PER_NODE);
        // Another node's pairs do not wait for node-b's workers.
        assert!(q.push(pair(0, "node-c")));
        assert_eq!(q.waiting(), WORKERS_PER_NODE + 11);
        let mut taken = 0;
        while q.next("node-b").is_some() {
            taken += 1;
        }
        assert_eq!(taken, WORKERS_PER_NODE + 10);
        // The first worker to find the queue empty ended; the rest end too,
        // then a new pair starts a worker again.
        for _ in 1..WORKERS_PER_NODE {
            assert!(q.next("node-b").is_none());
        }
        assert!(q.push(pair(1, "node-b")));
        assert_eq!(q.next("node-c"), Some(pair(0, "node-c")));
        assert_eq!(q.next("node-c"), None);
        assert_eq!(q.waiting(), 1);
    }

    #[test]
    fn pairs_run_in_the_order_they_were_queued() {
        let q = Queues::default();
        for i in 0..5 {
            q.push(pair(i, "node-b"));
        }
        let order: Vec<Pair> = std::iter::from_fn(|| q.next("node-b")).collect();
        assert_eq!(order, (0..5).map(|i| pair(i, "node-b")).collect::<Vec<_>>());
    }
}
