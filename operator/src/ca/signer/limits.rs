//! What keeps the signer's cost bounded whatever its callers send: a
//! rejected token is remembered for a while (asking again costs no
//! TokenReview), TokenReviews of unknown tokens are budgeted per source
//! address, requests in flight are bounded, and each pod may ask for only so
//! many distinct JWT-SVID audiences in a window.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;
use tonic::Status;

/// How long a rejected token is refused without asking the API server again.
pub const REJECTED_TTL: Duration = Duration::from_secs(10);
/// TokenReviews of unknown tokens one source address may cause in a burst...
pub const REVIEW_BURST: f64 = 20.0;
/// ...and per second after it.
pub const REVIEWS_PER_SECOND: f64 = 2.0;
/// Requests the signer works on at once; more wait up to [`QUEUE_WAIT`].
pub const MAX_IN_FLIGHT: usize = 64;
/// How long a request waits for a free slot before it is refused.
pub const QUEUE_WAIT: Duration = Duration::from_secs(5);
/// Distinct JWT-SVID audience lists one pod may ask for per [`AUDIENCE_WINDOW`].
pub const MAX_AUDIENCE_SETS: usize = 32;
/// The window over which a pod's distinct audience lists are counted.
pub const AUDIENCE_WINDOW: Duration = Duration::from_secs(600);
/// Most entries any of the maps below holds; past it, expired entries go,
/// then (rejected tokens, review budgets) everything.
const MAX_ENTRIES: usize = 4096;

/// A token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn take(&mut self, now: Instant) -> bool {
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * REVIEWS_PER_SECOND;
        self.tokens = (self.tokens + refill).min(REVIEW_BURST);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn full(&self, now: Instant) -> bool {
        self.tokens + now.saturating_duration_since(self.at).as_secs_f64() * REVIEWS_PER_SECOND
            >= REVIEW_BURST
    }
}

/// One pod's distinct audience lists, and since when they are counted.
type AudienceWindow = (Instant, HashSet<Vec<String>>);

/// The signer's limits, shared by its requests.
#[derive(Debug)]
pub struct Limits {
    rejected: Mutex<HashMap<[u8; 32], Instant>>,
    budgets: Mutex<HashMap<IpAddr, Bucket>>,
    in_flight: Semaphore,
    audiences: Mutex<HashMap<String, AudienceWindow>>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            rejected: Mutex::default(),
            budgets: Mutex::default(),
            in_flight: Semaphore::new(MAX_IN_FLIGHT),
            audiences: Mutex::default(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Limits {
    /// A slot to work in, waiting up to [`QUEUE_WAIT`] for one.
    pub async fn slot(&self) -> Result<SemaphorePermit<'_>, Status> {
        match tokio::time::timeout(QUEUE_WAIT, self.in_flight.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(Status::resource_exhausted(format!(
                "the signer is working on {MAX_IN_FLIGHT} requests already; retry shortly"
            ))),
        }
    }

    /// Refuses a token rejected within [`REJECTED_TTL`].
    pub fn check_rejected(&self, digest: &[u8; 32]) -> Result<(), Status> {
        let now = Instant::now();
        match lock(&self.rejected).get(digest) {
            Some(until) if *until > now => Err(Status::unauthenticated(
                "token rejected (a TokenReview refused it moments ago)",
            )),
            _ => Ok(()),
        }
    }

    /// Remembers a rejected token.
    pub fn remember_rejected(&self, digest: [u8; 32]) {
        let now = Instant::now();
        let mut rejected = lock(&self.rejected);
        if rejected.len() >= MAX_ENTRIES {
            rejected.retain(|_, until| *until > now);
            if rejected.len() >= MAX_ENTRIES {
                rejected.clear();
            }
        }
        rejected.insert(digest, now + REJECTED_TTL);
    }

    /// Takes one TokenReview from `source`'s budget, or refuses.
    pub fn review_budget(&self, source: Option<IpAddr>) -> Result<(), Status> {
        let Some(source) = source else {
            return Ok(());
        };
        let now = Instant::now();
        let mut budgets = lock(&self.budgets);
        if budgets.len() >= MAX_ENTRIES && !budgets.contains_key(&source) {
            budgets.retain(|_, b| !b.full(now));
            if budgets.len() >= MAX_ENTRIES {
                budgets.clear();
            }
        }
        let bucket = budgets.entry(source).or_insert(Bucket {
            tokens: REVIEW_BURST,
            at: now,
        });
        if bucket.take(now) {
            Ok(())
        } else {
            Err(Status::resource_exhausted(format!(
                "too many unknown tokens from {source}: at most {REVIEWS_PER_SECOND} TokenReviews per second after a burst of {REVIEW_BURST}; check the caller's token"
            )))
        }
    }

    /// Counts `audience` (sorted) against the pod's budget of distinct
    /// audience lists; refuses past [`MAX_AUDIENCE_SETS`] in the window.
    pub fn audiences(&self, pod_uid: &str, audience: &[String]) -> Result<(), Status> {
        let now = Instant::now();
        let mut key = audience.to_vec();
        key.sort();
        key.dedup();
        let mut all = lock(&self.audiences);
        if all.len() >= MAX_ENTRIES && !all.contains_key(pod_uid) {
            all.retain(|_, (since, _)| now.saturating_duration_since(*since) < AUDIENCE_WINDOW);
        }
        let (since, seen) = all
            .entry(pod_uid.to_owned())
            .or_insert_with(|| (now, HashSet::new()));
        if now.saturating_duration_since(*since) >= AUDIENCE_WINDOW {
            *since = now;
            seen.clear();
        }
        if seen.contains(&key) {
            return Ok(());
        }
        if seen.len() >= MAX_AUDIENCE_SETS {
            return Err(Status::resource_exhausted(format!(
                "this pod asked for more than {MAX_AUDIENCE_SETS} distinct JWT-SVID audiences within {} s; reuse audiences",
                AUDIENCE_WINDOW.as_secs()
            )));
        }
        seen.insert(key);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_source_gets_a_burst_then_a_steady_rate_of_reviews() {
        let limits = Limits::default();
        let source = Some("198.18.0.9".parse().unwrap());
        let granted = (0..100)
            .filter(|_| limits.review_budget(source).is_ok())
            .count();
        assert_eq!(granted, REVIEW_BURST as usize);
        tokio::time::advance(Duration::from_secs(5)).await;
        let granted = (0..100)
            .filter(|_| limits.review_budget(source).is_ok())
            .count();
        assert_eq!(granted, (5.0 * REVIEWS_PER_SECOND) as usize);
        // Another source has its own budget.
        assert!(
            limits
                .review_budget(Some("198.18.0.8".parse().unwrap()))
                .is_ok()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn rejected_tokens_are_remembered_for_a_while() {
        let limits = Limits::default();
        let digest = [7u8; 32];
        assert!(limits.check_rejected(&digest).is_ok());
        limits.remember_rejected(digest);
        assert_eq!(
            limits.check_rejected(&digest).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        tokio::time::advance(REJECTED_TTL).await;
        assert!(limits.check_rejected(&digest).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn each_pod_has_a_budget_of_distinct_audiences() {
        let limits = Limits::default();
        for i in 0..MAX_AUDIENCE_SETS {
            limits.audiences("pod-a", &[format!("aud-{i}")]).unwrap();
        }
        // Asked again (in any order) costs nothing; a new one is refused.
        limits
            .audiences("pod-a", &["aud-0".to_owned(), "aud-0".to_owned()])
            .unwrap();
        let refused = limits.audiences("pod-a", &["new".to_owned()]).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("reuse audiences"));
        limits.audiences("pod-b", &["new".to_owned()]).unwrap();
        tokio::time::advance(AUDIENCE_WINDOW).await;
        limits.audiences("pod-a", &["new".to_owned()]).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn requests_past_the_limit_wait_then_are_refused() {
        let limits = Limits::default();
        let mut held = Vec::new();
        for _ in 0..MAX_IN_FLIGHT {
            held.push(limits.slot().await.unwrap());
        }
        let refused = limits.slot().await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        held.pop();
        assert!(limits.slot().await.is_ok());
    }
}
