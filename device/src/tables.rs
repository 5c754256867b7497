//! Resource tables with virtual, generation-checked handles.
//!
//! A handle is `index << 8 | key` ([`vrdma_abi::make_handle`]). The index selects a slot; the
//! key byte is bumped every time the slot is reused, so a handle kept past the destruction of its
//! object is rejected instead of silently naming the next tenant. Handles are chosen by the
//! device and are part of the saved state, so they survive live migration unchanged.

use serde::{Deserialize, Serialize};
use vrdma_abi::{handle_index, handle_key, make_handle};

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
#[derive(Debug, Clone)]
pub struct HandleTable<T> {
    slots: Vec<Slot<T>>,
    free: Vec<u32>,
    max: u32,
    live: u32,
}

#[derive(Debug, Clone)]
struct Slot<T> {
    key: u8,
    obj: Option<T>,
}

impl<T> HandleTable<T> {
    /// A table holding at most `max` objects (indices `1..=max`).
    pub fn new(max: u32) -> Self {
        Self {
            slots: Vec::new(),
            free: Vec::new(),
            max,
            live: 0,
        }
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
                self.slots.push(Slot { key: 0, obj: None });
                next
            }
        };
        let slot = &mut self.slots[index as usize - 1];
        // Never hand out key 0 for index 1..: keeps every handle distinct from small integers a
        // careless driver might pass.
        slot.key = slot.key.wrapping_add(1).max(1);
        slot.obj = Some(obj);
        self.live += 1;
        Some(make_handle(index, slot.key))
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
        let mut slots: Vec<Slot<T>> = snap
            .keys
            .iter()
            .map(|&key| Slot { key, obj: None })
            .collect();
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
            self.slots.push(Slot { key: 0, obj: None });
            self.free.push(self.slots.len() as u32);
        }
        let slot = &mut self.slots[index as usize - 1];
        if slot.obj.is_some() {
            return Err(obj);
        }
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

    /// Mutable access by handle.
    pub fn get_mut(&mut self, handle: u32) -> Option<&mut T> {
        let i = self.slot_of(handle)?;
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
        for (i, s) in self.slots.iter_mut().enumerate() {
            if s.obj.take().is_some() {
                self.free.push(i as u32 + 1);
            }
        }
        self.live = 0;
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
}
