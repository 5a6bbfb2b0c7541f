//! The RAM tier: entries by key, least recently used first out when over the byte budget.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::entry::{BlockEntry, Snapshot};
use super::key::{Key, Namespace};

pub(super) enum Entry {
    Block(Arc<BlockEntry>),
    Snap(Arc<Snapshot>),
}

impl Entry {
    fn bytes(&self) -> usize {
        match self {
            Entry::Block(b) => b.bytes,
            Entry::Snap(s) => s.bytes,
        }
    }
    /// Held by a lookup's hit that has not been restored yet.
    fn referenced(&self) -> bool {
        match self {
            Entry::Block(b) => Arc::strong_count(b) > 1,
            Entry::Snap(s) => Arc::strong_count(s) > 1,
        }
    }
}

struct Slot {
    entry: Entry,
    /// Tick of the last use: the smallest goes first.
    last: u64,
    /// A snapshot's namespace and length (to find it again by length).
    snap: Option<(Namespace, usize)>,
}

/// Counters of a store, since it was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Lookups that found at least one cached token.
    pub hits: u64,
    /// Lookups that found none.
    pub misses: u64,
    /// Entries dropped to stay under the byte budget.
    pub evictions: u64,
    /// Tokens all hits covered.
    pub hit_tokens: u64,
    /// Entries stored.
    pub inserts: u64,
}

pub(super) struct Ram {
    map: HashMap<Key, Slot>,
    /// Snapshot lengths per namespace (length → how many snapshots of that length).
    snap_lens: HashMap<Namespace, BTreeMap<usize, usize>>,
    tick: u64,
    bytes: usize,
    budget: usize,
    pub(super) counters: Counters,
}

impl Ram {
    pub(super) fn new(budget: usize) -> Self {
        Self {
            map: HashMap::new(),
            snap_lens: HashMap::new(),
            tick: 0,
            bytes: 0,
            budget,
            counters: Counters::default(),
        }
    }

    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    /// Marks `key` used now.
    pub(super) fn touch(&mut self, key: &Key) {
        self.tick += 1;
        if let Some(s) = self.map.get_mut(key) {
            s.last = self.tick;
        }
    }

    pub(super) fn block(&self, key: &Key) -> Option<&Arc<BlockEntry>> {
        match self.map.get(key).map(|s| &s.entry) {
            Some(Entry::Block(b)) => Some(b),
            _ => None,
        }
    }

    pub(super) fn snapshot(&self, key: &Key) -> Option<&Arc<Snapshot>> {
        match self.map.get(key).map(|s| &s.entry) {
            Some(Entry::Snap(s)) => Some(s),
            _ => None,
        }
    }

    /// Snapshot lengths stored under `ns`, longest first.
    pub(super) fn snap_lens(&self, ns: &Namespace) -> Vec<usize> {
        self.snap_lens
            .get(ns)
            .map_or(Vec::new(), |m| m.keys().rev().copied().collect())
    }

    /// Stores `entry` under `key` (replacing what was there), then evicts down to the budget. An entry larger than
    /// the whole budget is not kept.
    pub(super) fn put(&mut self, key: Key, entry: Entry, snap: Option<(Namespace, usize)>) {
        if entry.bytes() > self.budget {
            return;
        }
        self.remove(&key);
        self.tick += 1;
        self.bytes += entry.bytes();
        if let Some((ns, len)) = snap {
            *self
                .snap_lens
                .entry(ns)
                .or_default()
                .entry(len)
                .or_default() += 1;
        }
        self.map.insert(
            key,
            Slot {
                entry,
                last: self.tick,
                snap,
            },
        );
        self.counters.inserts += 1;
        self.evict();
    }

    fn remove(&mut self, key: &Key) -> bool {
        let Some(slot) = self.map.remove(key) else {
            return false;
        };
        self.bytes -= slot.entry.bytes();
        if let Some((ns, len)) = slot.snap {
            if let Some(m) = self.snap_lens.get_mut(&ns) {
                if let Some(n) = m.get_mut(&len) {
                    *n -= 1;
                    if *n == 0 {
                        m.remove(&len);
                    }
                }
                if m.is_empty() {
                    self.snap_lens.remove(&ns);
                }
            }
        }
        true
    }

    /// Drops least recently used unreferenced entries until the bytes fit the budget (referenced ones stay, even
    /// over it, until their hit is restored or dropped).
    fn evict(&mut self) {
        while self.bytes > self.budget {
            let victim = self
                .map
                .iter()
                .filter(|(_, s)| !s.entry.referenced())
                .min_by_key(|(_, s)| s.last)
                .map(|(k, _)| *k);
            let Some(k) = victim else {
                return;
            };
            self.remove(&k);
            self.counters.evictions += 1;
        }
    }
}
