//! What the Kubernetes source knows of one kind: the converted model objects,
//! fed by a kube-rs watcher's events. A relist (after `410 Gone` or a restart)
//! is buffered and swapped in whole when complete, so the agent keeps serving
//! its last state meanwhile; an object whose new version is invalid keeps its
//! last good version in force, and its rejection is reported.

use std::collections::HashMap;

use crate::state::ObjectError;

/// `namespace/name`, or `name` for a cluster-scoped object: one allocation per
/// object, as every pod of the cluster has one.
pub type ObjectKey = Box<str>;

/// One object: its last good conversion, and why its current version was rejected.
/// Both are boxed: a map slot holds every entry's inline size whether used or
/// not, and at 10,000 pods that is most of the store.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry<T> {
    /// The last version that converted cleanly.
    pub good: Option<Box<T>>,
    /// Why the current version was rejected, if it was.
    pub rejection: Option<Box<ObjectError>>,
}

/// The objects of one kind.
#[derive(Debug)]
pub struct KindStore<T> {
    items: HashMap<ObjectKey, Entry<T>>,
    /// A relist in progress.
    relist: Option<HashMap<ObjectKey, Entry<T>>>,
    /// Whether a complete list has arrived at least once.
    pub synced: bool,
}

impl<T> Default for KindStore<T> {
    fn default() -> Self {
        KindStore {
            items: HashMap::new(),
            relist: None,
            synced: false,
        }
    }
}

/// A converted object: `Ok(None)` when the object exists but gives the mesh
/// nothing (a headless Service, a pod without an address).
pub type Converted<T> = Result<Option<T>, ObjectError>;

impl<T: Clone> KindStore<T> {
    /// An object was added or changed.
    pub fn apply(&mut self, key: ObjectKey, converted: Converted<T>) {
        let entry = merge(self.items.get(&key), converted);
        self.items.insert(key, entry);
    }

    /// An object was deleted.
    pub fn delete(&mut self, key: &ObjectKey) {
        self.items.remove(key);
    }

    /// A (re)list starts.
    pub fn init(&mut self) {
        self.relist = Some(HashMap::new());
    }

    /// An object of the (re)list.
    pub fn init_apply(&mut self, key: ObjectKey, converted: Converted<T>) {
        let entry = merge(self.items.get(&key), converted);
        self.relist
            .get_or_insert_with(HashMap::new)
            .insert(key, entry);
    }

    /// The (re)list is complete: objects it did not name are gone.
    pub fn init_done(&mut self) {
        if let Some(listed) = self.relist.take() {
            self.items = listed;
        }
        self.synced = true;
    }

    /// The objects in force.
    pub fn good(&self) -> impl Iterator<Item = (&ObjectKey, &T)> {
        self.items
            .iter()
            .filter_map(|(k, e)| e.good.as_deref().map(|g| (k, g)))
    }

    /// The good object at `key`.
    pub fn get(&self, key: &str) -> Option<&T> {
        self.items.get(key).and_then(|e| e.good.as_deref())
    }

    /// Current rejections.
    pub fn rejections(&self) -> impl Iterator<Item = &ObjectError> {
        self.items.values().filter_map(|e| e.rejection.as_deref())
    }

    /// Number of objects known (good, ignored or rejected).
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether no object is known.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

fn merge<T: Clone>(previous: Option<&Entry<T>>, converted: Converted<T>) -> Entry<T> {
    match converted {
        Ok(good) => Entry {
            good: good.map(Box::new),
            rejection: None,
        },
        Err(rejection) => Entry {
            good: previous.and_then(|p| p.good.clone()),
            rejection: Some(Box::new(rejection)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> ObjectKey {
        format!("ns/{name}").into()
    }

    fn bad(name: &str) -> Converted<u32> {
        Err(ObjectError {
            subject: format!("Thing ns/{name}"),
            field: "spec.x".into(),
            message: "bad".into(),
        })
    }

    #[test]
    fn an_invalid_update_keeps_the_last_good_version() {
        let mut store = KindStore::default();
        store.apply(key("a"), Ok(Some(1)));
        store.apply(key("a"), bad("a"));
        assert_eq!(store.get(&key("a")), Some(&1));
        assert_eq!(store.rejections().count(), 1);
        store.apply(key("a"), Ok(Some(2)));
        assert_eq!(store.get(&key("a")), Some(&2));
        assert_eq!(store.rejections().count(), 0);
        store.apply(key("new"), bad("new"));
        assert_eq!(store.get(&key("new")), None);
        store.delete(&key("new"));
        assert_eq!(store.rejections().count(), 0);
    }

    #[test]
    fn a_relist_is_swapped_in_whole() {
        let mut store = KindStore::default();
        store.init();
        store.init_apply(key("a"), Ok(Some(1)));
        store.init_apply(key("b"), Ok(Some(2)));
        assert!(!store.synced);
        assert_eq!(store.good().count(), 0);
        store.init_done();
        assert!(store.synced);
        assert_eq!(store.good().count(), 2);
        // During a relist the old state stays in force.
        store.init();
        store.init_apply(key("a"), bad("a"));
        assert_eq!(store.good().count(), 2);
        store.init_done();
        // b was not listed again: it is gone; a keeps its last good version.
        assert_eq!(store.get(&key("b")), None);
        assert_eq!(store.get(&key("a")), Some(&1));
        assert_eq!(store.len(), 1);
    }
}
