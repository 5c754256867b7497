//! Resource tables with virtual, generation-checked handles.
//!
//! A handle is `index << 8 | key` ([`vrdma_abi::make_handle`]). The index selects a slot; the
//! key byte is bumped every time the slot is reused, so a handle kept past the destruction of its
//! object is rejected instead of silently naming the next tenant. Handles are chosen by the
//! device and are part of the saved state, so they survive live migration unchanged.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::ser::{SerializeSeq, SerializeStruct};
use serde::{Deserialize, Serialize, Serializer};
use vrdma_abi::{handle_index, handle_key, make_handle};

/// Source of [`HandleTable`] instance ids (never 0).
static NEXT_TABLE_ID: AtomicU64 = AtomicU64::new(1);

fn fresh_id() -> u64 {
    NEXT_TABLE_ID.fetch_add(1, Ordering::Relaxed)
}

/// A point in the history of one table instance (see [`HandleTable::version`]). Every change to
/// a slot stamps it with the table's next generation, so "which slots changed since version
/// `v`" is exact: a slot reused until its key byte wraps around still counts as changed. A
/// table built anew (reset, restore, clone) has a new id, and nothing is "since" a version of
/// another instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableVersion {
    id: u64,
    gen: u64,
}

/// A table as saved for live migration: the key byte of every slot ever used (so handles that
/// were stale before migration stay stale after it), the free list in allocation order (so the
/// next handles are the same ones the source would have chosen), and the live objects by handle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableSnapshot<T> {
    /// Key byte of each slot, index 1 first.
    pub keys: Vec<u8>,
    /// Free slot indices, in the order the table reuses them (last first).
    pub free: Vec<u32>,
    /// Live objects with their handles.
    pub objs: Vec<(u32, T)>,
}

/// A table of objects addressed by handles. Index 0 is never used, so no valid handle is 0.
#[derive(Debug)]
pub struct HandleTable<T> {
    slots: Vec<Slot<T>>,
    free: Vec<u32>,
    max: u32,
    live: u32,
    /// This instance's id ([`TableVersion`]).
    id: u64,
    /// Number of slot changes so far; the stamp of the latest change.
    gen: u64,
    /// Whether changes are recorded ([`HandleTable::tracked`]).
    track: bool,
}

#[derive(Debug, Clone)]
struct Slot<T> {
    key: u8,
    /// The table generation of the slot's last change (key, object, or `get_mut` access).
    stamp: u64,
    obj: Option<T>,
}

impl<T> Slot<T> {
    fn empty(key: u8) -> Self {
        Slot {
            key,
            stamp: 0,
            obj: None,
        }
    }
}

impl<T: Clone> Clone for HandleTable<T> {
    /// A copy is a new instance: versions of the original do not apply to it.
    fn clone(&self) -> Self {
        Self {
            slots: self.slots.clone(),
            free: self.free.clone(),
            max: self.max,
            live: self.live,
            id: fresh_id(),
            gen: self.gen,
            track: self.track,
        }
    }
}

impl<T> HandleTable<T> {
    /// A table holding at most `max` objects (indices `1..=max`).
    pub fn new(max: u32) -> Self {
        Self {
            slots: Vec::new(),
            free: Vec::new(),
            max,
            live: 0,
            id: fresh_id(),
            gen: 0,
            track: false,
        }
    }

    /// Turns change tracking on: every later change of a slot (insert, remove, `get_mut`) is
    /// recorded, so that [`HandleTable::serialize_since`] can list the changes since a
    /// [`HandleTable::version`]. Only tables that are pre-copied need it; the others skip the
    /// write (their hot `get_mut`s, e.g. the QP table's on every doorbell, would otherwise move
    /// the table's header line between cores while peers' threads look objects up).
    pub fn tracked(mut self) -> Self {
        self.track = true;
        self
    }

    /// Records a change of slot `i` (0-based).
    fn touch(&mut self, i: usize) {
        if self.track {
            self.gen += 1;
            self.slots[i].stamp = self.gen;
        }
    }

    /// The table's current version: [`HandleTable::serialize_since`] lists the objects changed
    /// after it. An untracked table has no versions: what it returns is a version of no table
    /// ([`HandleTable::descends_from`] is false for it), so a delta is never built on it.
    pub fn version(&self) -> TableVersion {
        TableVersion {
            id: if self.track { self.id } else { 0 },
            gen: self.gen,
        }
    }

    /// Whether `v` is a version of this very table (not of a predecessor or a copy).
    pub fn descends_from(&self, v: TableVersion) -> bool {
        v.id == self.id && v.gen <= self.gen
    }

    /// Inserts an object, returning its new handle, or `None` if the table is full. Slots are
    /// allocated on demand, so memory grows with use, never beyond `max` entries.
    pub fn insert(&mut self, obj: T) -> Option<u32> {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                let next = self.slots.len() as u32 + 1;
                if next > self.max {
                    return None;
                }
                self.slots.push(Slot::empty(0));
                next
            }
        };
        self.touch(index as usize - 1);
        let slot = &mut self.slots[index as usize - 1];
        // Never hand out key 0 for index 1..: keeps every handle distinct from small integers a
        // careless driver might pass.
        slot.key = slot.key.wrapping_add(1).max(1);
        slot.obj = Some(obj);
        self.live += 1;
        Some(make_handle(index, slot.key))
    }

    /// Serializes the table exactly as [`HandleTable::snapshot`]`(f)` would (same encoding as
    /// [`TableSnapshot<U>`]) without building the snapshot: no copies of the objects. With
    /// `since`, `objs` holds only the live objects whose slot changed after that version (the
    /// caller checked [`HandleTable::descends_from`]); keys and free list are always complete.
    pub fn serialize_since<'a, U: Serialize, F: Fn(&'a T) -> U + 'a>(
        &'a self,
        since: Option<TableVersion>,
        f: F,
    ) -> impl Serialize + 'a {
        TableView {
            table: self,
            since: since.map_or(0, |v| v.gen),
            full: since.is_none(),
            f,
        }
    }

    /// Saves the table, converting each object with `f`.
    pub fn snapshot<U>(&self, mut f: impl FnMut(&T) -> U) -> TableSnapshot<U> {
        TableSnapshot {
            keys: self.slots.iter().map(|s| s.key).collect(),
            free: self.free.clone(),
            objs: self.iter().map(|(h, o)| (h, f(o))).collect(),
        }
    }

    /// Rebuilds a table of at most `max` objects from a snapshot, converting (and validating)
    /// each object with `f`. Refuses snapshots that do not describe a table this code could
    /// have built: too many slots, handles whose key does not match their slot, duplicates, or
    /// a free list that is not exactly the empty slots.
    pub fn from_snapshot<U>(
        max: u32,
        snap: TableSnapshot<U>,
        mut f: impl FnMut(u32, U) -> Result<T, String>,
    ) -> Result<Self, String> {
        if snap.keys.len() > max as usize {
            return Err(format!("{} slots, at most {max}", snap.keys.len()));
        }
        let mut slots: Vec<Slot<T>> = snap.keys.iter().map(|&key| Slot::empty(key)).collect();
        let mut live = 0;
        for (h, u) in snap.objs {
            let index = handle_index(h) as usize;
            let slot = index
                .checked_sub(1)
                .and_then(|i| slots.get_mut(i))
                .ok_or_else(|| format!("handle {h:#x} outside the table"))?;
            if slot.key != handle_key(h) || slot.obj.is_some() {
                return Err(format!("handle {h:#x} does not match its slot"));
            }
            slot.obj = Some(f(h, u)?);
            live += 1;
        }
        let mut seen = vec![false; slots.len()];
        for &i in &snap.free {
            let k = (i as usize).wrapping_sub(1);
            match (slots.get(k), seen.get_mut(k)) {
                (Some(s), Some(seen)) if s.obj.is_none() && !*seen => *seen = true,
                _ => return Err(format!("bad free slot {i}")),
            }
        }
        if snap.free.len() + live as usize != slots.len() {
            return Err("free list does not cover the empty slots".into());
        }
        Ok(Self {
            slots,
            free: snap.free,
            max,
            live,
            id: fresh_id(),
            gen: 0,
            track: false,
        })
    }

    /// Rebuilds a table from `base` (a table restored earlier from a full snapshot, e.g. a
    /// pre-copy) and `delta`, a snapshot taken later by [`HandleTable::serialize_since`] with
    /// the version `base` was saved at: its keys and free list are complete, its objects are
    /// the ones whose slot changed since (converted and validated with `f`). Every other live
    /// object of `base` stays, provided its slot's key is unchanged. The result is checked like
    /// [`HandleTable::from_snapshot`]'s: slots within `max`, handles matching their slots, no
    /// duplicates, a free list that is exactly the empty slots.
    pub fn from_delta<U>(
        max: u32,
        base: HandleTable<T>,
        delta: TableSnapshot<U>,
        mut f: impl FnMut(u32, U) -> Result<T, String>,
    ) -> Result<Self, String> {
        let n = delta.keys.len();
        if n > max as usize {
            return Err(format!("{n} slots, at most {max}"));
        }
        let mut slots = base.slots;
        if slots.iter().skip(n).any(|s| s.obj.is_some()) {
            return Err("a pre-copied object lies outside the table".into());
        }
        slots.truncate(n);
        slots.resize_with(n, || Slot::empty(0));
        // What the delta says about each slot: 1 free, 2 changed, 0 nothing (unchanged).
        let mut said = vec![0u8; n];
        for &i in &delta.free {
            let k = (i as usize).wrapping_sub(1);
            match said.get_mut(k) {
                Some(s) if *s == 0 => *s = 1,
                _ => return Err(format!("bad free slot {i}")),
            }
            slots[k].obj = None;
        }
        for (h, u) in delta.objs {
            let k = (handle_index(h) as usize).wrapping_sub(1);
            match said.get_mut(k) {
                Some(s) if *s == 0 && delta.keys[k] == handle_key(h) => *s = 2,
                Some(_) => return Err(format!("handle {h:#x} does not match its slot")),
                None => return Err(format!("handle {h:#x} outside the table")),
            }
            slots[k].obj = Some(f(h, u)?);
        }
        let mut live = 0u32;
        for (k, slot) in slots.iter_mut().enumerate() {
            match (said[k], slot.obj.is_some()) {
                (1, _) => {}
                (2, _) => live += 1,
                // Unchanged since the base: the object must be there, under the same key.
                (_, true) if slot.key == delta.keys[k] => live += 1,
                (_, true) => return Err(format!("slot {} changed key", k + 1)),
                (_, false) => return Err("free list does not cover the empty slots".into()),
            }
            slot.key = delta.keys[k];
            slot.stamp = 0;
        }
        Ok(Self {
            slots,
            free: delta.free,
            max,
            live,
            id: fresh_id(),
            gen: 0,
            track: false,
        })
    }

    /// Re-inserts an object under a known handle (restore). Fails if the slot is taken or the
    /// index is out of range.
    pub fn insert_at(&mut self, handle: u32, obj: T) -> Result<(), T> {
        let index = handle_index(handle);
        if index == 0 || index > self.max {
            return Err(obj);
        }
        while self.slots.len() < index as usize {
            self.slots.push(Slot::empty(0));
            self.free.push(self.slots.len() as u32);
        }
        if self.slots[index as usize - 1].obj.is_some() {
            return Err(obj);
        }
        self.touch(index as usize - 1);
        let slot = &mut self.slots[index as usize - 1];
        slot.key = handle_key(handle);
        slot.obj = Some(obj);
        self.free.retain(|&i| i != index);
        self.live += 1;
        Ok(())
    }

    fn slot_of(&self, handle: u32) -> Option<usize> {
        let index = handle_index(handle) as usize;
        let slot = self.slots.get(index.checked_sub(1)?)?;
        (slot.obj.is_some() && slot.key == handle_key(handle)).then_some(index - 1)
    }

    /// The object named by `handle`, if the handle is live and its key matches.
    pub fn get(&self, handle: u32) -> Option<&T> {
        self.slot_of(handle)
            .and_then(|i| self.slots[i].obj.as_ref())
    }

    /// Mutable access by handle. Counts as a change of the slot ([`HandleTable::version`]).
    pub fn get_mut(&mut self, handle: u32) -> Option<&mut T> {
        let i = self.slot_of(handle)?;
        self.touch(i);
        self.slots[i].obj.as_mut()
    }

    /// The object at a table index (ignoring the key), with its full handle.
    pub fn by_index(&self, index: u32) -> Option<(u32, &T)> {
        let slot = self.slots.get((index as usize).checked_sub(1)?)?;
        slot.obj.as_ref().map(|o| (make_handle(index, slot.key), o))
    }

    /// Removes and returns the object named by `handle`.
    pub fn remove(&mut self, handle: u32) -> Option<T> {
        let i = self.slot_of(handle)?;
        self.touch(i);
        let obj = self.slots[i].obj.take();
        self.free.push(i as u32 + 1);
        self.live -= 1;
        obj
    }

    /// Number of live objects.
    pub fn len(&self) -> u32 {
        self.live
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Live handles and objects, in index order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &T)> {
        self.slots.iter().enumerate().filter_map(|(i, s)| {
            s.obj
                .as_ref()
                .map(|o| (make_handle(i as u32 + 1, s.key), o))
        })
    }

    /// Live handles, in index order.
    pub fn handles(&self) -> Vec<u32> {
        self.iter().map(|(h, _)| h).collect()
    }

    /// Removes everything (keys are kept so old handles stay stale).
    pub fn clear(&mut self) {
        for i in 0..self.slots.len() {
            if self.slots[i].obj.take().is_some() {
                self.touch(i);
                self.free.push(i as u32 + 1);
            }
        }
        self.live = 0;
    }
}

/// [`HandleTable::serialize_since`]'s view: serializes as a [`TableSnapshot`].
struct TableView<'a, T, F> {
    table: &'a HandleTable<T>,
    since: u64,
    full: bool,
    f: F,
}

impl<'a, T, U: Serialize, F: Fn(&'a T) -> U> Serialize for TableView<'a, T, F> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        struct Keys<'a, T>(&'a [Slot<T>]);
        impl<T> Serialize for Keys<'_, T> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut seq = s.serialize_seq(Some(self.0.len()))?;
                for slot in self.0 {
                    seq.serialize_element(&slot.key)?;
                }
                seq.end()
            }
        }
        struct Objs<'b, 'a, T, F>(&'b TableView<'a, T, F>);
        impl<'a, T, U: Serialize, F: Fn(&'a T) -> U> Serialize for Objs<'_, 'a, T, F> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let v = self.0;
                let changed = |slot: &Slot<T>| v.full || slot.stamp > v.since;
                let objs = v.table.slots.iter().enumerate().filter_map(|(i, slot)| {
                    let o = slot.obj.as_ref().filter(|_| changed(slot))?;
                    Some((make_handle(i as u32 + 1, slot.key), o))
                });
                let mut seq = s.serialize_seq(Some(objs.clone().count()))?;
                for (h, o) in objs {
                    seq.serialize_element(&(h, (v.f)(o)))?;
                }
                seq.end()
            }
        }
        let mut st = s.serialize_struct("TableSnapshot", 3)?;
        st.serialize_field("keys", &Keys(&self.table.slots))?;
        st.serialize_field("free", &self.table.free)?;
        st.serialize_field("objs", &Objs(self))?;
        st.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_handles_are_rejected() {
        let mut t = HandleTable::new(2);
        let a = t.insert("a").unwrap();
        assert_eq!(t.get(a), Some(&"a"));
        assert_eq!(t.remove(a), Some("a"));
        let b = t.insert("b").unwrap();
        assert_eq!(handle_index(a), handle_index(b));
        assert_ne!(a, b);
        assert_eq!(t.get(a), None);
        assert_eq!(t.get(b), Some(&"b"));
        assert_eq!(t.remove(a), None);
    }

    #[test]
    fn capacity_is_enforced_and_zero_is_never_valid() {
        let mut t = HandleTable::new(2);
        let a = t.insert(1).unwrap();
        let b = t.insert(2).unwrap();
        assert!(t.insert(3).is_none());
        assert_ne!(a, 0);
        assert_ne!(b, 0);
        assert_eq!(t.get(0), None);
        assert_eq!(t.get(u32::MAX), None);
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn insert_at_restores_handles() {
        let mut t = HandleTable::new(8);
        let h = make_handle(5, 0x42);
        t.insert_at(h, "x").unwrap();
        assert_eq!(t.get(h), Some(&"x"));
        assert!(t.insert_at(h, "y").is_err());
        assert!(t.insert_at(make_handle(9, 1), "z").is_err());
        // Free slots below the restored one are reusable.
        let n = t.insert("n").unwrap();
        assert!(handle_index(n) < 5);
    }

    /// Encodes `t` (or its changes since `since`) with its view and decodes the snapshot.
    fn roundtrip(t: &HandleTable<u64>, since: Option<TableVersion>) -> TableSnapshot<u64> {
        let bytes = postcard::to_stdvec(&t.serialize_since(since, |v| *v)).unwrap();
        postcard::from_bytes(&bytes).unwrap()
    }

    #[test]
    fn view_encodes_like_the_snapshot() {
        let mut t = HandleTable::new(16);
        let hs: Vec<u32> = (0..5).map(|i| t.insert(i * 10).unwrap()).collect();
        t.remove(hs[1]);
        let full = roundtrip(&t, None);
        assert_eq!(full, t.snapshot(|v| *v));
        assert_eq!(
            postcard::to_stdvec(&t.serialize_since(None, |v| *v)).unwrap(),
            postcard::to_stdvec(&t.snapshot(|v| *v)).unwrap()
        );
    }

    /// A delta applied to the table restored from a full snapshot gives the table as it is
    /// now, whatever happened in between, including a slot reused until its key wrapped round
    /// to the same handle.
    #[test]
    fn untracked_tables_have_no_versions() {
        let mut t: HandleTable<u32> = HandleTable::new(4);
        let h = t.insert(1).unwrap();
        let v = t.version();
        *t.get_mut(h).unwrap() = 2;
        // No version of an untracked table is a base for a delta.
        assert!(!t.descends_from(v));
        let t = t.tracked();
        assert!(t.descends_from(t.version()));
    }

    #[test]
    fn delta_since_a_version_rebuilds_the_table() {
        let mut t = HandleTable::new(16).tracked();
        let hs: Vec<u32> = (0..6).map(|i| t.insert(i * 10).unwrap()).collect();
        t.remove(hs[5]);
        let base_snap = roundtrip(&t, None);
        let v = t.version();
        assert!(t.descends_from(v));
        // Changes after the base: two removals, an insertion reusing one of the slots, an
        // object changed in place, and a slot reused 255 times (same handle again, other
        // object).
        t.remove(hs[0]);
        t.remove(hs[1]);
        let new = t.insert(99).unwrap();
        assert_eq!(handle_index(new), handle_index(hs[1]));
        *t.get_mut(hs[2]).unwrap() += 1;
        let mut h = hs[3];
        for i in 0..255u64 {
            t.remove(h);
            h = t.insert(1000 + i).unwrap();
        }
        assert_eq!(h, hs[3], "the key wrapped round");
        assert_eq!(t.get(h), Some(&1254));
        let delta = roundtrip(&t, Some(v));
        let mut changed: Vec<u32> = delta.objs.iter().map(|(h, _)| *h).collect();
        changed.sort();
        let mut want = vec![hs[2], hs[3], new];
        want.sort();
        assert_eq!(changed, want, "only changed objects are in the delta");
        let base = HandleTable::from_snapshot(16, base_snap.clone(), |_, v| Ok(v)).unwrap();
        let rebuilt = HandleTable::from_delta(16, base, delta.clone(), |_, v| Ok(v)).unwrap();
        assert_eq!(rebuilt.snapshot(|v| *v), t.snapshot(|v| *v));
        assert_eq!(rebuilt.len(), t.len());
        // Versions of another instance (a copy, a restored table) do not apply.
        assert!(!t.clone().descends_from(t.version()));
        assert!(!rebuilt.descends_from(v));

        // Inconsistent deltas are refused.
        let base = || HandleTable::from_snapshot(16, base_snap.clone(), |_, v| Ok(v)).unwrap();
        let mut bad = delta.clone();
        bad.free.push(bad.free[0]);
        assert!(HandleTable::from_delta(16, base(), bad, |_, v| Ok(v)).is_err());
        let mut bad = delta.clone();
        bad.objs.push(bad.objs[0]);
        assert!(HandleTable::from_delta(16, base(), bad, |_, v| Ok(v)).is_err());
        let mut bad = delta.clone();
        bad.keys[handle_index(hs[4]) as usize - 1] ^= 1; // an unchanged slot's key
        assert!(HandleTable::from_delta(16, base(), bad, |_, v| Ok(v)).is_err());
        let mut bad = delta.clone();
        bad.keys.truncate(2); // pre-copied objects outside the table
        bad.free.clear();
        bad.objs.clear();
        assert!(HandleTable::from_delta(16, base(), bad, |_, v| Ok(v)).is_err());
        let mut bad = delta.clone();
        bad.free.retain(|&i| i != handle_index(hs[5])); // empty, yet not free
        assert!(HandleTable::from_delta(16, base(), bad, |_, v| Ok(v)).is_err());
        assert!(HandleTable::from_delta(4, base(), delta.clone(), |_, v| Ok(v)).is_err());
        let r = HandleTable::from_delta(16, base(), delta, |_, _| Err::<u64, _>("no".into()));
        assert!(r.is_err());
    }
}
