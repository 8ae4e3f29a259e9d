//! Interned strings with reference counts, kept in one arena: a SPIFFE ID shared by a thousand
//! pods is held once, and each leaf refers to it by a 4-byte index.

use std::hash::BuildHasher;

use hashbrown::HashTable;

/// One interned string: where it is in the arena, and how many holders it has (0: the index is
/// free for reuse).
#[derive(Debug, Clone, Copy, Default)]
struct Entry {
    start: u32,
    len: u32,
    refs: u32,
    /// Written to the ledger file since its last rewrite (the file refers to it by index).
    written: bool,
}

/// The interned strings.
#[derive(Debug, Clone, Default)]
pub(super) struct Names {
    arena: String,
    entries: Vec<Entry>,
    free: Vec<u32>,
    /// Entry indices, found by their string's hash.
    index: HashTable<u32>,
    hasher: std::hash::RandomState,
    /// Arena bytes of released strings, reclaimed by [`Names::repack`].
    garbage: usize,
}

fn text<'a>(arena: &'a str, e: &Entry) -> &'a str {
    let start = e.start as usize;
    arena.get(start..start + e.len as usize).unwrap_or_default()
}

impl Names {
    fn hash(&self, s: &str) -> u64 {
        self.hasher.hash_one(s)
    }

    /// The index of `s`, if held.
    pub(super) fn find(&self, s: &str) -> Option<u32> {
        let (arena, entries) = (&self.arena, &self.entries);
        self.index
            .find(self.hash(s), |&i| text(arena, &entries[i as usize]) == s)
            .copied()
    }

    /// The string at `i` (empty for a free index).
    pub(super) fn get(&self, i: u32) -> &str {
        self.entries
            .get(i as usize)
            .map_or("", |e| text(&self.arena, e))
    }

    /// How many holders `i` has.
    pub(super) fn refs(&self, i: u32) -> u32 {
        self.entries.get(i as usize).map_or(0, |e| e.refs)
    }

    /// Takes one more hold of `s`, interning it if new.
    pub(super) fn hold(&mut self, s: &str) -> u32 {
        if let Some(i) = self.find(s) {
            self.entries[i as usize].refs += 1;
            return i;
        }
        let start = u32::try_from(self.arena.len()).unwrap_or(u32::MAX);
        self.arena.push_str(s);
        let e = Entry {
            start,
            len: u32::try_from(s.len()).unwrap_or(u32::MAX),
            refs: 1,
            written: false,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.entries[i as usize] = e;
                i
            }
            None => {
                self.entries.push(e);
                u32::try_from(self.entries.len() - 1).unwrap_or(u32::MAX)
            }
        };
        let h = self.hash(s);
        let Self {
            index,
            arena,
            entries,
            hasher,
            ..
        } = self;
        index.insert_unique(h, i, |&j| {
            hasher.hash_one(text(arena, &entries[j as usize]))
        });
        i
    }

    /// Takes one more hold of an index already held.
    pub(super) fn hold_index(&mut self, i: u32) {
        if let Some(e) = self.entries.get_mut(i as usize) {
            e.refs += 1;
        }
    }

    /// Gives up one hold of `i`; the last one frees it.
    pub(super) fn release(&mut self, i: u32) {
        let Some(e) = self.entries.get_mut(i as usize) else {
            return;
        };
        e.refs = e.refs.saturating_sub(1);
        if e.refs > 0 {
            return;
        }
        let e = *e;
        let h = self.hash(text(&self.arena, &e));
        if let Ok(found) = self.index.find_entry(h, |&j| j == i) {
            found.remove();
        }
        self.entries[i as usize] = Entry::default();
        self.free.push(i);
        self.garbage += e.len as usize;
        if self.garbage > 1 << 16 && self.garbage > self.arena.len() / 2 {
            self.repack();
        }
    }

    /// Copies the held strings into a new arena (indices do not change).
    fn repack(&mut self) {
        let mut arena = String::with_capacity(self.arena.len() - self.garbage);
        for e in self.entries.iter_mut().filter(|e| e.refs > 0) {
            let start = u32::try_from(arena.len()).unwrap_or(u32::MAX);
            arena.push_str(text(&self.arena, e));
            e.start = start;
        }
        self.arena = arena;
        self.garbage = 0;
    }

    /// Whether `i` must be written to the file before a record that names it (marks it written).
    pub(super) fn needs_writing(&mut self, i: u32) -> bool {
        match self.entries.get_mut(i as usize) {
            Some(e) if e.refs > 0 && !e.written => {
                e.written = true;
                true
            }
            _ => false,
        }
    }

    /// The file is being written afresh: nothing in it yet.
    pub(super) fn forget_written(&mut self) {
        for e in &mut self.entries {
            e.written = false;
        }
    }

    /// Strings held.
    pub(super) fn len(&self) -> usize {
        self.entries.len() - self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_count_and_the_last_release_frees_and_reuses_the_index() {
        let mut n = Names::default();
        let a = n.hold("spiffe://td/ns/a/sa/x");
        assert_eq!(n.hold("spiffe://td/ns/a/sa/x"), a);
        let b = n.hold("spiffe://td/ns/a/sa/y");
        assert_ne!(a, b);
        assert_eq!((n.refs(a), n.refs(b), n.len()), (2, 1, 2));
        n.release(a);
        assert_eq!(n.find("spiffe://td/ns/a/sa/x"), Some(a));
        n.release(a);
        assert_eq!(n.find("spiffe://td/ns/a/sa/x"), None);
        assert_eq!(n.get(b), "spiffe://td/ns/a/sa/y");
        assert_eq!(n.hold("z"), a, "a freed index is reused");
        assert_eq!(n.get(a), "z");
    }

    #[test]
    fn the_arena_is_repacked_and_every_string_survives() {
        let mut n = Names::default();
        let held: Vec<u32> = (0..20_000)
            .map(|i| n.hold(&format!("spiffe://cluster.local/ns/team/sa/service-{i}")))
            .collect();
        let before = n.arena.len();
        for (i, idx) in held.iter().enumerate() {
            if i % 4 != 0 {
                n.release(*idx);
            }
        }
        assert!(
            n.arena.len() < before,
            "repacked: {} of {before}",
            n.arena.len()
        );
        for (i, idx) in held.iter().enumerate().filter(|(i, _)| i % 4 == 0) {
            let s = format!("spiffe://cluster.local/ns/team/sa/service-{i}");
            assert_eq!(n.get(*idx), s);
            assert_eq!(n.find(&s), Some(*idx));
        }
    }
}
