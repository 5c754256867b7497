//! Fast guest-memory accessors for the data path.
//!
//! vm-memory's `Bytes` methods on a whole `GuestMemory` walk a generic slice iterator so that an
//! access may span regions; on the data path every access is to an object the device validated to
//! lie inside one region (a ring slot inside one ring page, a doorbell word, an SGE inside its
//! WQE). These helpers take the single-region slice directly and access it through the same
//! volatile, bounds-checked and dirty-tracking primitives. An access that does not fit one region
//! fails (returns `None`/`false`), exactly like an out-of-bounds access.

use std::sync::atomic::Ordering;

use vm_memory::{AtomicAccess, ByteValued, Bytes, GuestAddress, GuestMemoryBackend};

use crate::GuestMemoryMmap;

/// Reads a `T` at `gpa`.
#[inline]
pub fn read_obj<T: ByteValued>(mem: &GuestMemoryMmap, gpa: u64) -> Option<T> {
    mem.get_slice(GuestAddress(gpa), std::mem::size_of::<T>())
        .ok()?
        .read_obj(0)
        .ok()
}

/// Reads `buf.len()` bytes at `gpa`.
#[inline]
pub fn read_bytes(mem: &GuestMemoryMmap, gpa: u64, buf: &mut [u8]) -> bool {
    match mem.get_slice(GuestAddress(gpa), buf.len()) {
        Ok(s) => s.read_slice(buf, 0).is_ok(),
        Err(_) => false,
    }
}

/// Writes `bytes` at `gpa` (recorded in the dirty bitmap).
#[inline]
pub fn write_bytes(mem: &GuestMemoryMmap, gpa: u64, bytes: &[u8]) -> bool {
    match mem.get_slice(GuestAddress(gpa), bytes.len()) {
        Ok(s) => s.write_slice(bytes, 0).is_ok(),
        Err(_) => false,
    }
}

/// Atomic load of a naturally aligned `T` at `gpa`.
#[inline]
pub fn load<T: AtomicAccess>(mem: &GuestMemoryMmap, gpa: u64, order: Ordering) -> Option<T> {
    mem.get_slice(GuestAddress(gpa), std::mem::size_of::<T>())
        .ok()?
        .load(0, order)
        .ok()
}

/// Atomic store of a naturally aligned `T` at `gpa` (recorded in the dirty bitmap).
#[inline]
pub fn store<T: AtomicAccess>(mem: &GuestMemoryMmap, gpa: u64, v: T, order: Ordering) -> bool {
    match mem.get_slice(GuestAddress(gpa), std::mem::size_of::<T>()) {
        Ok(s) => s.store(v, 0, order).is_ok(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accesses_stay_inside_one_region() {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
        ])
        .unwrap();
        assert!(store(&mem, 0x10, 7u32, Ordering::Release));
        assert_eq!(load::<u32>(&mem, 0x10, Ordering::Acquire), Some(7));
        assert_eq!(read_obj::<u32>(&mem, 0x10), Some(7));
        // Straddles the two regions: refused, as an out-of-bounds access would be.
        assert_eq!(read_obj::<u64>(&mem, 0xffc), None);
        assert!(!write_bytes(&mem, 0xffe, &[1, 2, 3, 4]));
        assert!(!read_bytes(&mem, 0x2000, &mut [0u8; 1]));
        assert!(write_bytes(&mem, 0x1000, &[9; 4]));
        let mut b = [0u8; 4];
        assert!(read_bytes(&mem, 0x1000, &mut b));
        assert_eq!(b, [9; 4]);
    }
}
