//! The persistent auth cache: every authentication this agent recorded, with
//! the generations it was made for and its expiry, kept in sled so a
//! restarted agent restores its auth map without repeating handshakes.
//!
//! Each record carries a MAC (HMAC-SHA-256) over its key and value under a
//! key that does not live in the cache's directory (the data path keeps it
//! in a pinned map, see `tessera_bpf::datapath::Datapath::cache_key`), so
//! whoever can write that directory still cannot make the agent restore an
//! authentication it did not make. A record that fails the MAC, a store sled
//! cannot open or read (errors and panics alike), or one written by another
//! format version means the whole cache is discarded and rebuilt empty: the
//! agent then removes every auth map entry the cache does not vouch for and
//! authenticates again. It fails closed, never open. (sled itself recovers
//! a damaged log by dropping what follows the damage; the records lost that
//! way are simply re-authenticated, and none can come back altered.)
//!
//! [`reconcile`] decides, from the cache, the pinned auth map and the
//! agent's current view of generations, what to write and what to remove.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tessera_bpf::abi::{AuthKey, AuthValue};

/// Format version of records; a different one discards the cache.
const FORMAT: u8 = 3;
/// Name of the sled tree holding the records.
const TREE: &str = "auth-v1";
/// Bytes of a record's MAC (the whole HMAC-SHA-256).
const CHECKSUM: usize = 32;
/// A SPIFFE ID is at most 2048 bytes; node names far less.
const MAX_TEXT: usize = 4096;

/// Why the cache could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthCacheError {
    /// sled failed on a healthy-looking store (disk full, permissions).
    #[error(
        "the auth cache at {path} failed: {source}; check the disk and the directory's permissions"
    )]
    Store {
        /// The cache directory.
        path: PathBuf,
        /// sled's error.
        source: sled::Error,
    },
    /// Removing a corrupted store failed.
    #[error("cannot remove the corrupted auth cache at {path}: {source}")]
    Remove {
        /// The cache directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A record is too large to store.
    #[error("an auth cache record is too large ({0} bytes of text)")]
    TooLarge(usize),
    /// Another process holds the store's lock (kept, never discarded).
    #[error(
        "the auth cache at {path} is still locked by another process after {LOCK_WAIT:?}; is another agent running on this node with the same --cache-dir?"
    )]
    Locked {
        /// The cache directory.
        path: PathBuf,
    },
}

/// How long opening waits for another holder of the store's lock to let go
/// (sled's background flusher keeps it briefly after the store is dropped;
/// a previous agent may still be exiting).
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Why a store could not be opened.
enum OpenFailure {
    /// Another process (or a store not yet fully closed) holds its lock.
    Locked,
    /// Unreadable or damaged: discarded and rebuilt.
    Damaged(Damage),
}

/// What makes a stored cache unusable: it is then discarded whole and
/// rebuilt, never half used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Damage {
    /// A key that is not 12 bytes.
    #[error("a key of {0} bytes")]
    KeyLength(usize),
    /// A value shorter than its MAC.
    #[error("a record shorter than its MAC")]
    Short,
    /// A value whose MAC is not this agent's.
    #[error("a record whose MAC does not match (not written by this agent under its key)")]
    Mac,
    /// A value that ends inside a field.
    #[error("a truncated record")]
    Truncated,
    /// A value of another format.
    #[error("a record of format {0}, not {FORMAT}")]
    Format(u8),
    /// Text fields that are not UTF-8.
    #[error("text that is not UTF-8")]
    NotUtf8,
    /// Bytes after the last field.
    #[error("a record with {0} bytes after its last field")]
    Trailing(usize),
    /// sled refused the files.
    #[error("sled cannot open it: {0}")]
    Open(String),
    /// sled failed while reading.
    #[error("sled cannot read it: {0}")]
    Read(String),
    /// sled panicked on the files.
    #[error("sled failed reading it (damaged files)")]
    Panicked,
}

/// One recorded authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Map key: local identity, peer identity, peer node.
    pub key: AuthKey,
    /// Generation of the local identity it was made for.
    pub local_gen: u64,
    /// Generation of the peer identity it was made for.
    pub remote_gen: u64,
    /// Expiry, Unix seconds (the earlier NotAfter of the two SVIDs).
    pub not_after: i64,
    /// When the handshake was made, Unix seconds (renewal is planned from
    /// the lifetime `not_after - made`).
    pub made: i64,
    /// The local workload's SPIFFE ID.
    pub local_id: String,
    /// The peer's SPIFFE ID.
    pub remote_id: String,
    /// The peer's node name.
    pub remote_node: String,
}

fn key_bytes(key: &AuthKey) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[..4].copy_from_slice(&key.local.to_be_bytes());
    out[4..8].copy_from_slice(&key.remote.to_be_bytes());
    out[8..].copy_from_slice(&key.remote_node.to_be_bytes());
    out
}

/// The key records are MACed under.
#[derive(Clone)]
pub struct MacKey(ring::hmac::Key);

impl MacKey {
    /// A MAC key from 32 secret bytes.
    pub fn new(secret: &[u8; 32]) -> MacKey {
        MacKey(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret))
    }
}

impl std::fmt::Debug for MacKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MacKey(..)")
    }
}

fn mac(secret: &MacKey, key: &[u8], body: &[u8]) -> ring::hmac::Tag {
    let mut ctx = ring::hmac::Context::with_key(&secret.0);
    ctx.update(key);
    ctx.update(body);
    ctx.sign()
}

/// Encodes `entry`'s value: format, generations, expiry, three texts, MAC.
fn encode(secret: &MacKey, entry: &Entry) -> Result<Vec<u8>, AuthCacheError> {
    let texts = [&entry.local_id, &entry.remote_id, &entry.remote_node];
    let total: usize = texts.iter().map(|t| t.len()).sum();
    if texts.iter().any(|t| t.len() > MAX_TEXT) {
        return Err(AuthCacheError::TooLarge(total));
    }
    let mut body = Vec::with_capacity(33 + total + 6 + CHECKSUM);
    body.push(FORMAT);
    body.extend_from_slice(&entry.local_gen.to_be_bytes());
    body.extend_from_slice(&entry.remote_gen.to_be_bytes());
    body.extend_from_slice(&entry.not_after.to_be_bytes());
    body.extend_from_slice(&entry.made.to_be_bytes());
    for text in texts {
        // Bounded by MAX_TEXT above.
        body.extend_from_slice(&(text.len() as u16).to_be_bytes());
        body.extend_from_slice(text.as_bytes());
    }
    let sum = mac(secret, &key_bytes(&entry.key), &body);
    body.extend_from_slice(sum.as_ref());
    Ok(body)
}

/// Decodes one record as stored (its key and value bytes) under `secret`:
/// the entry, or why it is not a valid record. What the cache applies to
/// every record it reads (public for the fuzz targets).
pub fn decode_record(secret: &MacKey, key: &[u8], value: &[u8]) -> Result<Entry, Damage> {
    decode(secret, key, value)
}

/// Encodes `entry` as the cache stores its value (public for the fuzz
/// targets).
pub fn encode_record(secret: &MacKey, entry: &Entry) -> Result<Vec<u8>, AuthCacheError> {
    encode(secret, entry)
}

/// The stored key of `entry`.
pub fn record_key(entry: &Entry) -> [u8; 12] {
    key_bytes(&entry.key)
}

/// `body` with its MAC under `secret` for the stored key `key` appended: a
/// value the decoder reads past its MAC check (for the fuzz targets, which
/// exercise what follows it).
pub fn seal_record(secret: &MacKey, key: &[u8], body: &[u8]) -> Vec<u8> {
    let mut value = body.to_vec();
    value.extend_from_slice(mac(secret, key, body).as_ref());
    value
}

/// Decodes a record; the reason when it is not a valid one.
fn decode(secret: &MacKey, key: &[u8], value: &[u8]) -> Result<Entry, Damage> {
    let key: [u8; 12] = key.try_into().map_err(|_| Damage::KeyLength(key.len()))?;
    let split = value.len().checked_sub(CHECKSUM).ok_or(Damage::Short)?;
    let (body, sum) = value.split_at(split);
    if ring::hmac::verify(&secret.0, &[&key[..], body].concat(), sum).is_err() {
        return Err(Damage::Mac);
    }
    let mut rest = body;
    let mut take = |n: usize| -> Result<&[u8], Damage> {
        if rest.len() < n {
            return Err(Damage::Truncated);
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Ok(head)
    };
    let format = take(1)?[0];
    if format != FORMAT {
        return Err(Damage::Format(format));
    }
    let u64_at = |b: &[u8]| {
        b.try_into()
            .map(u64::from_be_bytes)
            .map_err(|_| Damage::Truncated)
    };
    let local_gen = u64_at(take(8)?)?;
    let remote_gen = u64_at(take(8)?)?;
    let not_after = u64_at(take(8)?)? as i64;
    let made = u64_at(take(8)?)? as i64;
    let mut text = || -> Result<String, Damage> {
        let len = u16::from_be_bytes([take(1)?[0], take(1)?[0]]);
        String::from_utf8(take(usize::from(len))?.to_vec()).map_err(|_| Damage::NotUtf8)
    };
    let (local_id, remote_id, remote_node) = (text()?, text()?, text()?);
    if !rest.is_empty() {
        return Err(Damage::Trailing(rest.len()));
    }
    let word = |i: usize| u32::from_be_bytes([key[i], key[i + 1], key[i + 2], key[i + 3]]);
    Ok(Entry {
        key: AuthKey {
            local: word(0),
            remote: word(4),
            remote_node: word(8),
            pad: 0,
        },
        local_gen,
        remote_gen,
        not_after,
        made,
        local_id,
        remote_id,
        remote_node,
    })
}

/// What opening the cache found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Opened {
    /// Records loaded.
    pub entries: Vec<Entry>,
    /// Why the previous cache was discarded, when it was.
    pub discarded: Option<Damage>,
}

/// The cache; one per agent, in its state directory.
#[derive(Debug)]
pub struct AuthCache {
    path: PathBuf,
    db: sled::Db,
    tree: sled::Tree,
    secret: MacKey,
}

/// Only the agent (its user) may read or change the cache.
/// The store's page cache: sled's default is 1 GiB. The agent reads the
/// store only when it starts and keeps its entries in memory, so a small
/// cache costs nothing but bounds the agent's memory.
const CACHE_BYTES: u64 = 2 << 20;

fn open_db(dir: &Path) -> sled::Result<sled::Db> {
    sled::Config::new()
        .path(dir)
        .cache_capacity(CACHE_BYTES)
        .open()
}

fn restrict(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

fn store_io(dir: &Path) -> impl FnOnce(std::io::Error) -> AuthCacheError + '_ {
    move |e| AuthCacheError::Store {
        path: dir.to_owned(),
        source: sled::Error::Io(e),
    }
}

impl AuthCache {
    /// Opens (or creates) the cache in `dir` (mode 0700) and reads every
    /// record, checking each one's MAC under `secret`. A store that cannot
    /// be read, or any invalid record, discards the whole cache and starts
    /// empty, saying why in [`Opened::discarded`].
    pub fn open(dir: &Path, secret: &MacKey) -> Result<(AuthCache, Opened), AuthCacheError> {
        let store = |source| AuthCacheError::Store {
            path: dir.to_owned(),
            source,
        };
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        let found = loop {
            match Self::open_store(dir) {
                Err(OpenFailure::Locked) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(OpenFailure::Locked) => {
                    return Err(AuthCacheError::Locked {
                        path: dir.to_owned(),
                    });
                }
                Err(OpenFailure::Damaged(reason)) => break Err(reason),
                Ok((db, tree)) => {
                    break Self::read_all(&tree, secret).map(|entries| (db, tree, entries));
                }
            }
        };
        restrict(dir).map_err(store_io(dir))?;
        match found {
            Ok((db, tree, entries)) => Ok((
                AuthCache {
                    path: dir.to_owned(),
                    db,
                    tree,
                    secret: secret.clone(),
                },
                Opened {
                    entries,
                    discarded: None,
                },
            )),
            Err(reason) => {
                // Nothing in a store we cannot trust is used.
                let removed = if dir.is_dir() {
                    std::fs::remove_dir_all(dir)
                } else {
                    std::fs::remove_file(dir)
                };
                match removed {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => {
                        return Err(AuthCacheError::Remove {
                            path: dir.to_owned(),
                            source,
                        });
                    }
                }
                let db = open_db(dir).map_err(store)?;
                let tree = db.open_tree(TREE).map_err(store)?;
                restrict(dir).map_err(store_io(dir))?;
                Ok((
                    AuthCache {
                        path: dir.to_owned(),
                        db,
                        tree,
                        secret: secret.clone(),
                    },
                    Opened {
                        entries: Vec::new(),
                        discarded: Some(reason),
                    },
                ))
            }
        }
    }

    fn open_store(dir: &Path) -> Result<(sled::Db, sled::Tree), OpenFailure> {
        // sled reports most damage as errors; some damaged files make it
        // panic instead. Either way the store is unusable and is rebuilt.
        let opened = std::panic::catch_unwind(|| {
            let db = open_db(dir)?;
            let tree = db.open_tree(TREE)?;
            Ok::<_, sled::Error>((db, tree))
        });
        match opened {
            Ok(Ok(pair)) => Ok(pair),
            // sled 0.34 reports a held lock as an I/O error of kind Other
            // whose text names it.
            Ok(Err(sled::Error::Io(e)))
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.to_string().contains("could not acquire lock") =>
            {
                Err(OpenFailure::Locked)
            }
            Ok(Err(e)) => Err(OpenFailure::Damaged(Damage::Open(e.to_string()))),
            Err(_) => Err(OpenFailure::Damaged(Damage::Panicked)),
        }
    }

    fn read_all(tree: &sled::Tree, secret: &MacKey) -> Result<Vec<Entry>, Damage> {
        // A damaged store can make sled panic while reading too: contained,
        // and the cache is discarded like any other unreadable one.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut out = Vec::new();
            for item in tree.iter() {
                let (k, v) = item.map_err(|e| Damage::Read(e.to_string()))?;
                out.push(decode(secret, &k, &v)?);
            }
            Ok(out)
        }))
        .unwrap_or(Err(Damage::Panicked))
    }

    /// Where the cache lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records `entry`, replacing the one with its key.
    pub fn put(&self, entry: &Entry) -> Result<(), AuthCacheError> {
        let value = encode(&self.secret, entry)?;
        self.tree
            .insert(key_bytes(&entry.key), value)
            .map_err(|source| self.error(source))?;
        Ok(())
    }

    /// Forgets the entry under `key`; whether there was one.
    pub fn remove(&self, key: &AuthKey) -> Result<bool, AuthCacheError> {
        self.tree
            .remove(key_bytes(key))
            .map(|old| old.is_some())
            .map_err(|source| self.error(source))
    }

    /// Forgets everything (mass revocation).
    pub fn clear(&self) -> Result<(), AuthCacheError> {
        self.tree.clear().map_err(|source| self.error(source))
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.tree.len()
    }

    /// Whether there are no records.
    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }

    /// Writes everything recorded so far to disk.
    pub fn flush(&self) -> Result<(), AuthCacheError> {
        self.db
            .flush()
            .map(|_| ())
            .map_err(|source| self.error(source))
    }

    fn error(&self, source: sled::Error) -> AuthCacheError {
        AuthCacheError::Store {
            path: self.path.clone(),
            source,
        }
    }
}

/// What the agent currently believes about generations: the current
/// generation of a numeric identity on this node (`local`) and of a peer
/// identity on a given node (`remote`); None when it no longer exists.
pub trait Generations {
    /// Current generation of local identity `id`.
    fn local(&self, id: u32) -> Option<u64>;
    /// Current generation of identity `id` on node `node`.
    fn remote(&self, id: u32, node: u32) -> Option<u64>;
}

/// Clocks needed to turn a Unix expiry into the data path's CLOCK_MONOTONIC.
#[derive(Debug, Clone, Copy)]
pub struct Clocks {
    /// Wall clock now, Unix seconds.
    pub unix_now: i64,
    /// CLOCK_MONOTONIC now, nanoseconds.
    pub mono_now_ns: u64,
}

impl Clocks {
    /// Both clocks, now.
    pub fn now() -> Clocks {
        Clocks {
            unix_now: crate::clock::unix_now(),
            mono_now_ns: tessera_bpf::monotonic_ns(),
        }
    }

    /// The CLOCK_MONOTONIC instant of Unix time `not_after`, or None when it
    /// has passed.
    pub fn deadline_ns(&self, not_after: i64) -> Option<u64> {
        let left = not_after.checked_sub(self.unix_now).filter(|s| *s > 0)?;
        Some(
            self.mono_now_ns
                .saturating_add((left as u64).saturating_mul(1_000_000_000)),
        )
    }
}

/// The auth map value an entry stands for in `epoch`, or None when it is
/// expired or its generations are no longer current.
pub fn map_value(
    entry: &Entry,
    generations: &dyn Generations,
    clocks: Clocks,
    epoch: u64,
) -> Option<AuthValue> {
    let current = generations.local(entry.key.local) == Some(entry.local_gen)
        && generations.remote(entry.key.remote, entry.key.remote_node) == Some(entry.remote_gen);
    if !current {
        return None;
    }
    Some(AuthValue {
        local_gen: entry.local_gen,
        remote_gen: entry.remote_gen,
        expires_ns: clocks.deadline_ns(entry.not_after)?,
        epoch,
    })
}

/// What [`reconcile`] decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Auth map entries to write (missing or different).
    pub write: BTreeMap<AuthKey, AuthValue>,
    /// Auth map entries to remove (not vouched for by a valid record).
    pub remove: Vec<AuthKey>,
    /// Records to drop from the cache (expired or stale).
    pub forget: Vec<AuthKey>,
    /// Valid records whose map entries were already right.
    pub kept: usize,
}

/// Brings the pinned auth map in line with the cache: valid records are
/// (re)written, everything else in the map is removed, and records that
/// expired or lost their generations are forgotten. No handshake is needed
/// for a valid record.
pub fn reconcile(
    cached: &[Entry],
    pinned: &BTreeMap<AuthKey, AuthValue>,
    generations: &dyn Generations,
    clocks: Clocks,
    epoch: u64,
) -> Reconciled {
    let mut out = Reconciled::default();
    let mut wanted = BTreeMap::new();
    for entry in cached {
        match map_value(entry, generations, clocks, epoch) {
            Some(value) => {
                wanted.insert(entry.key, value);
            }
            None => out.forget.push(entry.key),
        }
    }
    for (key, value) in &wanted {
        match pinned.get(key) {
            // The data path keeps an expiry it already has when it is not
            // later than the record's (a restart never extends one).
            Some(old)
                if old.local_gen == value.local_gen
                    && old.remote_gen == value.remote_gen
                    && old.epoch == value.epoch
                    && old.expires_ns <= value.expires_ns =>
            {
                out.kept += 1;
            }
            _ => {
                out.write.insert(*key, *value);
            }
        }
    }
    out.remove = pinned
        .keys()
        .filter(|k| !wanted.contains_key(k))
        .copied()
        .collect();
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use proptest::prelude::*;

    fn entry(local: u32, remote: u32, node: u32) -> Entry {
        Entry {
            key: AuthKey {
                local,
                remote,
                remote_node: node,
                pad: 0,
            },
            local_gen: 1,
            remote_gen: 2,
            not_after: 2_000,
            made: 1_000,
            local_id: "spiffe://td/a".into(),
            remote_id: "spiffe://td/b".into(),
            remote_node: format!("node-{node}"),
        }
    }

    fn secret() -> MacKey {
        MacKey::new(&[7; 32])
    }

    proptest! {
        #[test]
        fn records_round_trip(local: u32, remote: u32, node: u32, lg: u64, rg: u64, na: i64,
                              a in ".{0,64}", b in ".{0,64}", n in "[a-z0-9.-]{0,63}") {
            let e = Entry {
                key: AuthKey { local, remote, remote_node: node, pad: 0 },
                local_gen: lg, remote_gen: rg, not_after: na, made: na / 2,
                local_id: a, remote_id: b, remote_node: n,
            };
            let value = encode(&secret(), &e).unwrap();
            prop_assert_eq!(decode(&secret(), &key_bytes(&e.key), &value).unwrap(), e);
        }

        #[test]
        fn damaged_records_never_decode(flip in 0usize..200, bit in 0u8..8, cut in 0usize..200) {
            let e = entry(1, 2, 3);
            let key = key_bytes(&e.key);
            let mut value = encode(&secret(), &e).unwrap();
            let i = flip % value.len();
            value[i] ^= 1 << bit;
            prop_assert!(decode(&secret(), &key, &value).is_err());
            let value = encode(&secret(), &e).unwrap();
            prop_assert!(decode(&secret(), &key, &value[..cut % value.len()]).is_err());
            // The same value under another key is not valid either...
            prop_assert!(decode(&secret(), &key_bytes(&entry(1, 2, 4).key), &value).is_err());
            // ...nor under another MAC key.
            prop_assert!(decode(&MacKey::new(&[9; 32]), &key, &value).is_err());
        }

        #[test]
        fn trailing_bytes_are_refused(extra in proptest::collection::vec(any::<u8>(), 1..16)) {
            let e = entry(1, 2, 3);
            let key = key_bytes(&e.key);
            let value = encode(&secret(), &e).unwrap();
            let mut body = value[..value.len() - CHECKSUM].to_vec();
            body.extend_from_slice(&extra);
            let sealed = seal_record(&secret(), &key, &body);
            prop_assert!(decode(&secret(), &key, &sealed).is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic(k in proptest::collection::vec(any::<u8>(), 0..16),
                                       v in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = decode(&secret(), &k, &v);
        }
    }

    struct Gens(BTreeMap<(u32, u32), u64>, BTreeMap<u32, u64>);
    impl Generations for Gens {
        fn local(&self, id: u32) -> Option<u64> {
            self.1.get(&id).copied()
        }
        fn remote(&self, id: u32, node: u32) -> Option<u64> {
            self.0.get(&(id, node)).copied()
        }
    }

    #[test]
    fn reconcile_keeps_valid_records_and_removes_everything_else() {
        let clocks = Clocks {
            unix_now: 1_000,
            mono_now_ns: 5_000_000_000,
        };
        let valid = entry(1, 2, 3);
        let mut expired = entry(1, 4, 3);
        expired.not_after = 1_000;
        let mut stale = entry(1, 5, 3);
        stale.remote_gen = 1; // the peer identity was reassigned since
        let mut rewrite = entry(6, 2, 3);
        rewrite.local_gen = 9;
        let gens = Gens(
            [((2, 3), 2), ((4, 3), 2), ((5, 3), 7)].into(),
            [(1, 1), (6, 9)].into(),
        );
        let good = map_value(&valid, &gens, clocks, 4).unwrap();
        assert_eq!(good.expires_ns, 5_000_000_000 + 1_000 * 1_000_000_000);
        let pinned: BTreeMap<AuthKey, AuthValue> = [
            (valid.key, good),
            // In the map with another epoch: rewritten.
            (rewrite.key, AuthValue { epoch: 3, ..good }),
            (stale.key, good),
            // Not in the cache at all: removed.
            (entry(9, 9, 9).key, good),
        ]
        .into();
        let r = reconcile(
            &[
                valid.clone(),
                expired.clone(),
                stale.clone(),
                rewrite.clone(),
            ],
            &pinned,
            &gens,
            clocks,
            4,
        );
        assert_eq!(r.kept, 1);
        assert_eq!(
            r.write.keys().copied().collect::<Vec<_>>(),
            vec![rewrite.key]
        );
        assert_eq!(r.write[&rewrite.key].local_gen, 9);
        assert_eq!(r.remove, vec![stale.key, entry(9, 9, 9).key]);
        assert_eq!(r.forget, vec![expired.key, stale.key]);
        // A pinned expiry later than the record's is rewritten down.
        let later: BTreeMap<AuthKey, AuthValue> = [(
            valid.key,
            AuthValue {
                expires_ns: good.expires_ns + 1,
                ..good
            },
        )]
        .into();
        assert_eq!(
            reconcile(std::slice::from_ref(&valid), &later, &gens, clocks, 4)
                .write
                .len(),
            1
        );
    }

    #[test]
    fn an_empty_cache_removes_every_pinned_entry() {
        let pinned: BTreeMap<AuthKey, AuthValue> =
            [(entry(1, 2, 3).key, AuthValue::default())].into();
        let r = reconcile(
            &[],
            &pinned,
            &Gens(BTreeMap::new(), BTreeMap::new()),
            Clocks {
                unix_now: 0,
                mono_now_ns: 0,
            },
            0,
        );
        assert_eq!(r.remove.len(), 1);
        assert!(r.write.is_empty());
    }
}

/// The result of one successful handshake, as one side records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    /// The SPIFFE ID of this side's workload.
    pub local: String,
    /// The peer workload's SPIFFE ID, verified.
    pub remote: String,
    /// The node the peer agent speaks for (on the responder: as admitted;
    /// on the initiator: the node it dialled, as given by the caller).
    pub remote_node: String,
    /// When the authentication ends: the earlier NotAfter of the two
    /// certificates, Unix seconds.
    pub not_after: i64,
}
