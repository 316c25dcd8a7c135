//! JWT-SVIDs as the Workload API hands them out, and the cache that keeps
//! each until half its lifetime has passed, whichever source issued it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::time::Instant;

use crate::clock::renew_at;
use crate::svid::records::PodUid;

/// A JWT-SVID as the Workload API hands it out.
#[derive(Clone)]
pub struct JwtSvid {
    /// The subject.
    pub spiffe_id: String,
    /// The compact JWS.
    pub token: String,
    /// The WorkloadIdentity's hint, or empty.
    pub hint: String,
}

impl std::fmt::Debug for JwtSvid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A JWT is a bearer credential: never print it.
        f.debug_struct("JwtSvid")
            .field("spiffe_id", &self.spiffe_id)
            .finish_non_exhaustive()
    }
}

/// Cache key: pod, SPIFFE ID, sorted audiences.
type JwtKey = (PodUid, String, Vec<String>);

/// Most JWT-SVIDs kept in the cache; past it, expired entries go, then all.
const JWT_CACHE_MAX: usize = 4096;

/// JWT-SVIDs already obtained, each kept until half its lifetime has
/// passed, so a workload asking often costs one signature per audience per
/// half-lifetime, whichever the source.
#[derive(Clone, Default)]
pub struct JwtCache {
    map: Arc<Mutex<HashMap<JwtKey, (JwtSvid, Instant)>>>,
}

impl JwtCache {
    /// The key of pod `uid`'s `spiffe_id` for `audience` (in any order).
    pub fn key(uid: &PodUid, spiffe_id: &str, audience: &[String]) -> JwtKey {
        let mut aud = audience.to_vec();
        aud.sort();
        aud.dedup();
        (uid.clone(), spiffe_id.to_owned(), aud)
    }

    /// A cached JWT-SVID still worth handing out.
    pub fn get(&self, key: &JwtKey) -> Option<JwtSvid> {
        let cache = self.map.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get(key)
            .filter(|(_, renew_at)| *renew_at > Instant::now())
            .map(|(svid, _)| svid.clone())
    }

    /// Keeps `svid`, which expires at `expires_at` (Unix seconds).
    pub fn put(&self, key: JwtKey, svid: &JwtSvid, expires_at: i64) {
        let now = Instant::now();
        let mut cache = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= JWT_CACHE_MAX {
            cache.retain(|_, (_, renew_at)| *renew_at > now);
            if cache.len() >= JWT_CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(key, (svid.clone(), renew_at(expires_at)));
    }
}

impl std::fmt::Debug for JwtCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Tokens are bearer credentials: never print them.
        f.debug_struct("JwtCache").finish_non_exhaustive()
    }
}
