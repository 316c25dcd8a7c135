//! The auth cache on a real sled store: records survive a reopen, and a
//! damaged store or record is discarded whole, never half-trusted.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Seek, SeekFrom, Write};

use tessera_agent::datapath::authcache::{AuthCache, Damage, Entry, MacKey};
use tessera_bpf::abi::AuthKey;

fn entry(i: u32) -> Entry {
    Entry {
        key: AuthKey {
            local: i,
            remote: i + 1,
            remote_node: 7,
            pad: 0,
        },
        local_gen: u64::from(i) * 3,
        remote_gen: u64::from(i) * 5,
        not_after: 1_900_000_000 + i64::from(i),
        made: 1_800_000_000,
        local_id: format!("spiffe://a.test/ns/shop/sa/w{i}"),
        remote_id: format!("spiffe://a.test/ns/shop/sa/w{}", i + 1),
        remote_node: "node-b".into(),
    }
}

fn sorted(mut v: Vec<Entry>) -> Vec<Entry> {
    v.sort_by_key(|e| e.key);
    v
}

#[test]
fn records_survive_a_reopen_and_removals_stick() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("auth");
    let (cache, opened) = AuthCache::open(&path, &secret()).unwrap();
    assert_eq!(opened.entries, vec![]);
    assert_eq!(opened.discarded, None);
    let all: Vec<Entry> = (1..=50).map(entry).collect();
    for e in &all {
        cache.put(e).unwrap();
    }
    assert!(cache.remove(&entry(10).key).unwrap());
    assert!(!cache.remove(&entry(10).key).unwrap());
    let mut replaced = entry(11);
    replaced.remote_gen = 99;
    cache.put(&replaced).unwrap();
    cache.flush().unwrap();
    drop(cache);

    let (cache, opened) = AuthCache::open(&path, &secret()).unwrap();
    assert_eq!(opened.discarded, None);
    let want: Vec<Entry> = all
        .iter()
        .filter(|e| e.key != entry(10).key)
        .map(|e| {
            if e.key == replaced.key {
                replaced.clone()
            } else {
                e.clone()
            }
        })
        .collect();
    assert_eq!(sorted(opened.entries), want);
    assert_eq!(cache.len(), 49);
    cache.clear().unwrap();
    cache.flush().unwrap();
    drop(cache);
    assert!(
        AuthCache::open(&path, &secret())
            .unwrap()
            .1
            .entries
            .is_empty()
    );
}

#[test]
fn one_tampered_record_discards_the_whole_cache() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("auth");
    let (cache, _) = AuthCache::open(&path, &secret()).unwrap();
    for i in 1..=5 {
        cache.put(&entry(i)).unwrap();
    }
    cache.flush().unwrap();
    drop(cache);
    {
        // Someone (or a bug) rewrites one value behind the cache's back.
        let db = sled::open(&path).unwrap();
        let tree = db.open_tree("auth-v1").unwrap();
        let (k, mut v) = tree
            .iter()
            .nth(2)
            .unwrap()
            .map(|(k, v)| (k, v.to_vec()))
            .unwrap();
        v[10] ^= 0x40; // a generation changes
        tree.insert(k, v).unwrap();
        db.flush().unwrap();
    }
    let (cache, opened) = AuthCache::open(&path, &secret()).unwrap();
    assert!(
        opened.entries.is_empty(),
        "nothing of a damaged cache is used"
    );
    assert_eq!(opened.discarded, Some(Damage::Mac));
    // The rebuilt cache works.
    cache.put(&entry(1)).unwrap();
    cache.flush().unwrap();
    drop(cache);
    let (_, opened) = AuthCache::open(&path, &secret()).unwrap();
    assert_eq!(opened.entries, vec![entry(1)]);
}

#[test]
fn damaged_files_are_discarded_or_read_back_exactly_never_half() {
    let all: Vec<Entry> = (1..=200).map(entry).collect();
    let (mut discarded, mut lost) = (0, 0);
    for round in 0..24u64 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auth");
        let (cache, _) = AuthCache::open(&path, &secret()).unwrap();
        for e in &all {
            cache.put(e).unwrap();
        }
        cache.flush().unwrap();
        drop(cache);
        // Overwrite a stretch of every file in the store with garbage, at a
        // different place each round.
        for file in walk(&path) {
            let len = std::fs::metadata(&file).unwrap().len();
            if len == 0 {
                continue;
            }
            let at = (round * 7919 + 13) % len;
            let mut f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
            f.seek(SeekFrom::Start(at)).unwrap();
            f.write_all(&[0xA5; 48][..48.min((len - at) as usize)])
                .unwrap();
        }
        let (_, opened) = AuthCache::open(&path, &secret()).unwrap();
        match opened.discarded {
            Some(_) => {
                assert!(opened.entries.is_empty());
                discarded += 1;
            }
            // sled recovers a damaged log by dropping what follows the
            // damage: records may be missing (they are re-authenticated),
            // but each one read back is exactly one that was written.
            None => {
                lost += all.len() - opened.entries.len();
                for e in &opened.entries {
                    assert!(all.contains(e), "an altered record came back: {e:?}");
                }
            }
        }
    }
    println!("of 24 damaged stores: {discarded} discarded, {lost} records lost in the others");
}

#[test]
fn an_unreadable_store_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("auth");
    // Not a sled store at all: a file where the directory should be.
    std::fs::write(&path, b"garbage").unwrap();
    let (cache, opened) = AuthCache::open(&path, &secret()).unwrap_or_else(|e| panic!("{e}"));
    assert!(opened.discarded.is_some());
    cache.put(&entry(1)).unwrap();
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_store_still_locked_by_its_last_holder_is_waited_for_not_discarded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("auth");
    let (cache, _) = AuthCache::open(&path, &secret()).unwrap();
    cache.put(&entry(1)).unwrap();
    cache.flush().unwrap();
    let holder = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        drop(cache);
    });
    let (_reopened, opened) = AuthCache::open(&path, &secret()).unwrap();
    holder.join().unwrap();
    assert_eq!(opened.discarded, None);
    assert_eq!(opened.entries, vec![entry(1)]);
}

#[test]
fn the_cache_directory_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cache");
    std::fs::create_dir(&path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
    let _cache = AuthCache::open(&path, &secret()).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "mode {mode:o}");
}

/// The agent's MAC key in these tests.
fn secret() -> MacKey {
    MacKey::new(&[42; 32])
}

#[test]
fn a_record_written_without_the_agents_key_is_not_restored() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cache");
    {
        let (cache, _) = AuthCache::open(&path, &secret()).unwrap();
        cache.put(&entry(1)).unwrap();
    }
    let (_, opened) = AuthCache::open(&path, &secret()).unwrap();
    assert_eq!(
        opened.entries,
        vec![entry(1)],
        "the agent's own record comes back"
    );
    // Whoever can write the directory but lacks the key adds a record of
    // the right format for current generations, a year ahead (MACed under
    // a key of its choosing).
    {
        let (forger, _) = AuthCache::open(&path, &MacKey::new(&[0; 32])).unwrap();
        let mut forged = entry(2);
        forged.not_after += 365 * 24 * 3600;
        forger.put(&forged).unwrap();
    }
    let (_, opened) = AuthCache::open(&path, &secret()).unwrap();
    assert!(opened.entries.is_empty(), "restored {:?}", opened.entries);
    assert_eq!(opened.discarded, Some(Damage::Mac));
}
