//! Which items carry which label, in memory: a filtered search reads its
//! label's ids here instead of from the store, and an unknown label answers
//! at once. Copy-on-write per label, so a search holds its label's ids
//! without holding a lock, and an add copies a label's ids only while a
//! search is reading them.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

#[derive(Default)]
pub(super) struct LabelMap {
    inner: RwLock<Inner>,
    /// Held by a label edit or a deletion from its store write to its update
    /// here, so that the map ends in the order the store did.
    edits: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Inner {
    /// Ascending ids per label.
    ids: HashMap<Arc<str>, Arc<Vec<i64>>>,
    labels: HashMap<i64, Arc<str>>,
}

impl LabelMap {
    /// From `(id, label)` pairs.
    pub(super) fn new(items: Vec<(i64, String)>) -> Self {
        let map = Self::default();
        for (id, label) in items {
            map.insert(id, &label);
        }
        map
    }

    /// The label's ids, ascending; `None` for a label no item has.
    pub(super) fn ids(&self, label: &str) -> Option<Arc<Vec<i64>>> {
        self.read().ids.get(label).cloned()
    }

    pub(super) fn insert(&self, id: i64, label: &str) {
        self.write().insert(id, label);
    }

    pub(super) fn remove(&self, id: i64) {
        self.write().remove(id);
    }

    /// Gives the ids `label`, or no label, in one step for readers.
    pub(super) fn set(&self, ids: &[i64], label: Option<&str>) {
        let mut inner = self.write();
        for &id in ids {
            match label {
                Some(label) => inner.insert(id, label),
                None => inner.remove(id),
            }
        }
    }

    /// Taken around a store write that changes labels and the update here.
    pub(super) async fn lock_edits(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.edits.lock().await
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    /// Gives `id` the label `label`, and no other.
    fn insert(&mut self, id: i64, label: &str) {
        self.remove(id);
        let label: Arc<str> = self.ids.get_key_value(label).map(|(k, _)| k.clone()).unwrap_or_else(|| label.into());
        let ids = Arc::make_mut(self.ids.entry(label.clone()).or_default());
        if let Err(position) = ids.binary_search(&id) {
            ids.insert(position, id);
        }
        self.labels.insert(id, label);
    }

    fn remove(&mut self, id: i64) {
        let Some(label) = self.labels.remove(&id) else { return };
        if let Some(ids) = self.ids.get_mut(&label) {
            let ids = Arc::make_mut(ids);
            if let Ok(position) = ids.binary_search(&id) {
                ids.remove(position);
            }
            if ids.is_empty() {
                self.ids.remove(&label);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_follow_inserts_and_removals() {
        let map = LabelMap::new(vec![(1, "a".into()), (3, "a".into()), (2, "b".into())]);
        let held = map.ids("a").unwrap();
        map.insert(0, "a");
        assert_eq!(*map.ids("a").unwrap(), vec![0, 1, 3]);
        assert_eq!(*held, vec![1, 3], "a reader keeps the ids it took");
        map.remove(2);
        assert!(map.ids("b").is_none(), "a label with no item left is unknown");
        map.remove(42);
        assert_eq!(*map.ids("a").unwrap(), vec![0, 1, 3]);
        map.insert(1, "b");
        assert_eq!(
            (map.ids("a").unwrap().to_vec(), map.ids("b").unwrap().to_vec()),
            (vec![0, 3], vec![1]),
            "one label per id"
        );
        map.set(&[1, 3], Some("c"));
        map.set(&[0], None);
        assert!(map.ids("a").is_none());
        assert_eq!(*map.ids("c").unwrap(), vec![1, 3]);
    }
}
