//! Numeric identity allocation, stored in the API server.
//!
//! Each SPIFFE ID in use holds one `NumericIdentity` object whose name is a
//! hash of the SPIFFE ID, so two operators can never create two objects for
//! one ID: the second create fails and that operator reads the first. Numbers
//! and generations come from the `IdentityCounter` object, advanced in blocks
//! of [`BLOCK`] with compare-and-swap on its resourceVersion; a block belongs
//! to the one process whose update succeeded, so no two allocations ever take
//! the same generation, across restarts and between replicas. A number is reused
//! only after the 24-bit space wraps, and never while a live object holds it;
//! since the generation is always new, an (id, generation) pair is never
//! issued twice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};

use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams, Preconditions};
use kube::runtime::reflector::{ObjectRef, Store};
use tessera_api::crd::identity::{COUNTER_NAME, MAX_ID, MIN_ID};
use tessera_api::crd::{
    IdentityCounter, IdentityCounterSpec, NumericIdentity, NumericIdentitySpec,
};
use tessera_api::spiffe::SpiffeId;

/// Label on every NumericIdentity holding its number, to find who holds an id.
pub const ID_LABEL: &str = "tessera.dev/id";
use tessera_api::names::FIELD_MANAGER;
/// How many counter updates may conflict before one allocation gives up.
const MAX_CONFLICTS: usize = 64;

/// How many numbers and generations one counter update reserves.
pub const BLOCK: u32 = 16;

/// One allocation in flight, awaited by every caller wanting that SPIFFE ID.
type SharedAllocation = Shared<BoxFuture<'static, Result<Allocation, AllocatorError>>>;

/// Numbers and generations reserved from the counter and not yet handed out.
#[derive(Debug, Default)]
struct Block {
    next_id: u32,
    next_generation: i64,
    left: u32,
}

/// A numeric identity and its generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Allocation {
    /// The numeric identity.
    pub id: u32,
    /// Its generation; unique across all allocations ever made.
    pub generation: i64,
}

/// Why an allocation or release failed. Clone, so it can travel over watch
/// channels.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AllocatorError {
    /// The API server refused or failed a request.
    #[error(
        "API server error during identity allocation: {0}; check that the operator may get, list, create, update and delete numericidentities and identitycounters.tessera.dev, and that the CRDs are installed"
    )]
    Api(#[source] Arc<kube::Error>),
    /// Too many concurrent writers kept changing the counter.
    #[error(
        "gave up after {MAX_CONFLICTS} conflicting updates of the IdentityCounter; is another writer stuck in a loop?"
    )]
    Contention,
    /// Every number in the space is held by a live identity.
    #[error("no free numeric identity between {MIN_ID} and {MAX_ID}")]
    Exhausted,
    /// The object named after this SPIFFE ID belongs to another one.
    #[error(
        "NumericIdentity {name} should hold {wanted} but holds {found}; refusing to share it (a hash collision or a hand-made object)"
    )]
    NameClash {
        /// Object name.
        name: String,
        /// The SPIFFE ID being allocated.
        wanted: String,
        /// The SPIFFE ID the object holds.
        found: String,
    },
}

impl From<kube::Error> for AllocatorError {
    fn from(e: kube::Error) -> Self {
        AllocatorError::Api(Arc::new(e))
    }
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

pub use tessera_api::crd::identity::numeric_identity_name as object_name;

/// The number after `id`, wrapping from [`MAX_ID`] to [`MIN_ID`].
pub fn next_id(id: u32) -> u32 {
    if (MIN_ID..MAX_ID).contains(&id) {
        id + 1
    } else {
        MIN_ID
    }
}

/// Allocates and releases numeric identities. Holds no state of its own, so
/// any number of allocators (in one operator or several) may run at once.
#[derive(Clone)]
pub struct Allocator {
    identities: Api<NumericIdentity>,
    counters: Api<IdentityCounter>,
    /// Allocations under way in this process, by object name: concurrent
    /// callers for one SPIFFE ID (many pods of a new workload arrive
    /// together) share one allocation instead of racing for the counter.
    in_flight: Arc<Mutex<HashMap<String, SharedAllocation>>>,
    /// Numbers and generations this process took from the counter and has
    /// not handed out yet; one counter update serves [`BLOCK`] allocations.
    block: Arc<tokio::sync::Mutex<Block>>,
    /// A watch-fed view of the NumericIdentity objects, read before asking
    /// the API server (see [`Allocator::with_cache`]).
    cache: Option<Store<NumericIdentity>>,
}

impl std::fmt::Debug for Allocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Allocator")
    }
}

impl Allocator {
    /// An allocator using `client`.
    pub fn new(client: kube::Client) -> Allocator {
        Allocator {
            identities: Api::all(client.clone()),
            counters: Api::all(client),
            in_flight: Arc::default(),
            block: Arc::default(),
            cache: None,
        }
    }

    /// An allocator that answers [`Allocator::allocate`] from `cache` when
    /// the SPIFFE ID's object is there, and asks the API server only when it
    /// is not. A cached object may already have been released; whoever uses
    /// the cache must re-run allocate for the pods naming an object when
    /// the cache sees that object change or go (the identity controller
    /// does, from the same watch that fills the cache), so a stale answer is
    /// corrected as soon as the watch catches up. A released allocation is
    /// never handed to another SPIFFE ID, so a stale answer never confuses
    /// two identities.
    pub fn with_cache(client: kube::Client, cache: Store<NumericIdentity>) -> Allocator {
        Allocator {
            cache: Some(cache),
            ..Allocator::new(client)
        }
    }

    fn cached(&self, id: &SpiffeId) -> Option<Allocation> {
        let name = object_name(id);
        let obj = self.cache.as_ref()?.get(&ObjectRef::new(&name))?;
        held_by(&name, id, &obj).ok()
    }

    /// The allocation a SPIFFE ID holds now, if any.
    pub async fn get(&self, id: &SpiffeId) -> Result<Option<Allocation>, AllocatorError> {
        let name = object_name(id);
        match self.identities.get_opt(&name).await? {
            None => Ok(None),
            Some(obj) => held_by(&name, id, &obj).map(Some),
        }
    }

    /// Returns the SPIFFE ID's allocation, making a new one if it has none.
    pub async fn allocate(&self, id: &SpiffeId) -> Result<Allocation, AllocatorError> {
        if let Some(existing) = self.cached(id) {
            return Ok(existing);
        }
        let name = object_name(id);
        let shared = {
            let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            in_flight
                .entry(name.clone())
                .or_insert_with(|| {
                    let (this, id) = (self.clone(), id.clone());
                    async move { this.get_or_create(&id).await }
                        .boxed()
                        .shared()
                })
                .clone()
        };
        let result = shared.clone().await;
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        if in_flight.get(&name).is_some_and(|s| s.ptr_eq(&shared)) {
            in_flight.remove(&name);
        }
        result
    }

    /// Reads the SPIFFE ID's object, creating it with a new number and
    /// generation when there is none.
    async fn get_or_create(&self, id: &SpiffeId) -> Result<Allocation, AllocatorError> {
        let name = object_name(id);
        loop {
            if let Some(existing) = self.get(id).await? {
                return Ok(existing);
            }
            let allocation = self.reserve().await?;
            let obj = NumericIdentity {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    labels: Some([(ID_LABEL.to_owned(), allocation.id.to_string())].into()),
                    ..ObjectMeta::default()
                },
                spec: NumericIdentitySpec {
                    spiffe_id: id.to_string(),
                    id: allocation.id,
                    generation: allocation.generation,
                },
            };
            let params = PostParams {
                field_manager: Some(FIELD_MANAGER.to_owned()),
                ..PostParams::default()
            };
            match self.identities.create(&params, &obj).await {
                Ok(_) => return Ok(allocation),
                // Another allocator created it first; the reserved number and
                // generation are simply never used. Read theirs.
                Err(e) if is_status(&e, 409) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Releases `allocation` of a SPIFFE ID. Deletes nothing when the ID holds a
    /// different (newer) allocation; returns whether it deleted.
    pub async fn release(
        &self,
        id: &SpiffeId,
        allocation: Allocation,
    ) -> Result<bool, AllocatorError> {
        let name = object_name(id);
        let Some(obj) = self.identities.get_opt(&name).await? else {
            return Ok(false);
        };
        if held_by(&name, id, &obj)? != allocation {
            return Ok(false);
        }
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: obj.metadata.uid.clone(),
                resource_version: obj.metadata.resource_version.clone(),
            }),
            ..DeleteParams::default()
        };
        match self.identities.delete(&name, &params).await {
            Ok(_) => Ok(true),
            // Gone or replaced meanwhile: not ours to delete any more.
            Err(e) if is_status(&e, 404) || is_status(&e, 409) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Takes the next number and generation from this process's block,
    /// refilling the block from the counter when it is empty, and skipping
    /// numbers a live identity still holds.
    async fn reserve(&self) -> Result<Allocation, AllocatorError> {
        let mut skipped = 0u64;
        loop {
            let taken = {
                let mut block = self.block.lock().await;
                if block.left == 0 {
                    *block = self.take_block().await?;
                }
                let taken = Allocation {
                    id: block.next_id,
                    generation: block.next_generation,
                };
                block.next_id = next_id(block.next_id);
                block.next_generation += 1;
                block.left -= 1;
                taken
            };
            if self.in_use(taken.id).await? {
                skipped += 1;
                if skipped > u64::from(MAX_ID - MIN_ID) {
                    return Err(AllocatorError::Exhausted);
                }
                continue;
            }
            return Ok(taken);
        }
    }

    /// Advances the counter by [`BLOCK`] numbers and generations
    /// (compare-and-swap on its resourceVersion) and returns what it skipped
    /// over: from then on they are this process's alone. Those it never
    /// hands out (it stops first) are simply never used.
    async fn take_block(&self) -> Result<Block, AllocatorError> {
        for _ in 0..MAX_CONFLICTS {
            let counter = match self.counters.get_opt(COUNTER_NAME).await? {
                Some(c) => c,
                None => {
                    self.create_counter().await?;
                    continue;
                }
            };
            let block = Block {
                next_id: counter.spec.next_id,
                next_generation: counter.spec.next_generation,
                left: BLOCK,
            };
            let mut updated = counter.clone();
            updated.spec.next_id = (0..BLOCK).fold(block.next_id, |id, _| next_id(id));
            updated.spec.next_generation = block.next_generation + i64::from(BLOCK);
            let params = PostParams {
                field_manager: Some(FIELD_MANAGER.to_owned()),
                ..PostParams::default()
            };
            // replace() sends the resourceVersion we read: a concurrent update
            // makes this fail with 409 and we read again.
            match self.counters.replace(COUNTER_NAME, &params, &updated).await {
                Ok(_) => return Ok(block),
                Err(e) if is_status(&e, 409) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(AllocatorError::Contention)
    }

    /// Creates the IdentityCounter if it does not exist yet, so that the
    /// first allocation does not pay for it.
    pub async fn ensure_counter(&self) -> Result<(), AllocatorError> {
        if self.counters.get_opt(COUNTER_NAME).await?.is_none() {
            self.create_counter().await?;
        }
        Ok(())
    }

    async fn create_counter(&self) -> Result<(), AllocatorError> {
        let counter = IdentityCounter {
            metadata: ObjectMeta {
                name: Some(COUNTER_NAME.to_owned()),
                ..ObjectMeta::default()
            },
            spec: IdentityCounterSpec {
                next_id: MIN_ID,
                next_generation: 1,
            },
        };
        match self.counters.create(&PostParams::default(), &counter).await {
            Ok(_) => Ok(()),
            Err(e) if is_status(&e, 409) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn in_use(&self, id: u32) -> Result<bool, AllocatorError> {
        let lp = ListParams::default()
            .labels(&format!("{ID_LABEL}={id}"))
            .limit(1);
        Ok(!self.identities.list_metadata(&lp).await?.items.is_empty())
    }
}

/// The allocation in `obj`, checking it belongs to `id`.
fn held_by(name: &str, id: &SpiffeId, obj: &NumericIdentity) -> Result<Allocation, AllocatorError> {
    if obj.spec.spiffe_id != id.as_str() {
        return Err(AllocatorError::NameClash {
            name: name.to_owned(),
            wanted: id.to_string(),
            found: obj.spec.spiffe_id.clone(),
        });
    }
    Ok(Allocation {
        id: obj.spec.id,
        generation: obj.spec.generation,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names_are_stable_dns_labels() {
        let a: SpiffeId = "spiffe://example.org/ns/a/sa/b".parse().unwrap();
        let b: SpiffeId = "spiffe://example.org/ns/a/sa/c".parse().unwrap();
        let name = object_name(&a);
        assert_eq!(name, object_name(&a.to_string().parse().unwrap()));
        assert_ne!(name, object_name(&b));
        assert_eq!(name.len(), 44);
        assert!(
            name.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        );
    }

    #[test]
    fn ids_wrap_inside_the_space() {
        assert_eq!(next_id(MIN_ID), MIN_ID + 1);
        assert_eq!(next_id(MAX_ID), MIN_ID);
        assert_eq!(next_id(0), MIN_ID);
    }
}
