//! One shared copy of strings that repeat across the cluster's pods and
//! identities (node names, SPIFFE IDs): at 10,000 pods a private copy in
//! every pod view and identity entry costs about a megabyte.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

static TABLE: Mutex<Option<HashSet<Arc<str>>>> = Mutex::new(None);

/// The shared copy of `s`. Strings nobody else holds any more are dropped
/// from the table whenever it would grow.
pub fn intern(s: &str) -> Arc<str> {
    let mut table = TABLE.lock().unwrap_or_else(|p| p.into_inner());
    let table = table.get_or_insert_with(HashSet::new);
    if let Some(shared) = table.get(s) {
        return shared.clone();
    }
    if table.len() == table.capacity() {
        table.retain(|a| Arc::strong_count(a) > 1);
    }
    let shared: Arc<str> = Arc::from(s);
    table.insert(shared.clone());
    shared
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_strings_share_one_copy_and_unused_ones_go() {
        let a = intern("spiffe://t.test/ns/a/sa/x");
        let b = intern(&String::from("spiffe://t.test/ns/a/sa/x"));
        assert!(Arc::ptr_eq(&a, &b));
        assert_ne!(&*intern("node-1"), &*a);
        // Ten thousand strings nobody keeps: the table drops them as it
        // fills instead of growing to hold them all.
        for i in 0..10_000 {
            intern(&format!("gone-{i}"));
        }
        let kept = TABLE
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map_or(0, HashSet::len);
        assert!(kept < 1_000, "{kept} entries kept");
        // A string still held survives every clean-up.
        assert!(Arc::ptr_eq(&a, &intern("spiffe://t.test/ns/a/sa/x")));
    }
}
