//! Fast guest-memory accessors for the data path.
//!
//! vm-memory's `Bytes` methods on a whole `GuestMemory` walk a generic slice iterator so that an
//! access may span regions; on the data path every access is to an object the device validated to
//! lie inside one region (a ring slot inside one ring page, a doorbell word, an SGE inside its
//! WQE). These helpers take the single-region slice directly and access it through the same
//! volatile, bounds-checked and dirty-tracking primitives. An access that does not fit one region
//! fails (returns `None`/`false`), exactly like an out-of-bounds access.

use std::sync::atomic::Ordering;

use vm_memory::bitmap::Bitmap;
use vm_memory::{AtomicAccess, ByteValued, Bytes, VolatileMemory};

use crate::GuestMemoryMmap;
use vrdma_memory::region_of;

/// Copies `len` bytes at `src` in `src_mem` to `dst` in `dst_mem` (the two may be the same
/// memory; the ranges may overlap) and records the destination pages in `dst_mem`'s dirty
/// bitmap. Each range must lie inside one region; returns false (copying nothing) otherwise.
#[inline]
pub fn copy(
    src_mem: &GuestMemoryMmap,
    src: u64,
    dst_mem: &GuestMemoryMmap,
    dst: u64,
    len: u64,
) -> bool {
    let (Some((sr, so)), Some((dr, dof))) =
        (region_of(src_mem, src, len), region_of(dst_mem, dst, len))
    else {
        return false;
    };
    let (s, d) = (std::ops::Deref::deref(sr), std::ops::Deref::deref(dr));
    // SAFETY: `region_of` checked that `[so, so + len)` lies inside `sr` and `[dof, dof + len)`
    // inside `dr`; a region's mapping (`as_ptr()`, `size()` == the region's length) stays
    // valid while the borrowed memory object lives. Guest memory may be written by the guest
    // concurrently; like vm-memory's own slice copies this is a plain byte copy of memory the
    // device does not otherwise reference. `copy` (memmove) allows overlapping ranges.
    unsafe {
        std::ptr::copy(s.as_ptr().add(so), d.as_ptr().add(dof), len as usize);
    }
    // The write is logged for migration as vm-memory's accessors would log it.
    d.bitmap().mark_dirty(dof, len as usize);
    true
}

pub use vrdma_memory::{region_slice as slice, GuestSlice};

/// Runs `f` on [`slice`]`(mem, gpa, len)`.
#[inline]
fn with_slice<R>(
    mem: &GuestMemoryMmap,
    gpa: u64,
    len: usize,
    f: impl FnOnce(GuestSlice<'_>) -> Option<R>,
) -> Option<R> {
    f(slice(mem, gpa, len)?)
}

/// Reads a `T` at `gpa`.
#[inline]
pub fn read_obj<T: ByteValued>(mem: &GuestMemoryMmap, gpa: u64) -> Option<T> {
    with_slice(mem, gpa, std::mem::size_of::<T>(), |s| s.read_obj(0).ok())
}

/// Reads `buf.len()` bytes at `gpa` into the device's own buffer (what the device then parses
/// is its copy, which the guest cannot change under it).
#[inline]
pub fn read_bytes(mem: &GuestMemoryMmap, gpa: u64, buf: &mut [u8]) -> bool {
    let Some((r, off)) = region_of(mem, gpa, buf.len() as u64) else {
        return false;
    };
    // SAFETY: `region_of` checked that `[off, off + buf.len())` lies inside the region, whose
    // mapping stays valid while `mem` is borrowed; `buf` is the device's own memory, distinct
    // from guest memory. The guest may write those bytes concurrently: like `copy` (and
    // vm-memory's slice copies), this is a plain byte copy, and only the copy is parsed.
    unsafe {
        std::ptr::copy_nonoverlapping(
            std::ops::Deref::deref(r).as_ptr().add(off),
            buf.as_mut_ptr(),
            buf.len(),
        );
    }
    true
}

/// Atomic load of a naturally aligned `T` at `gpa`.
#[inline]
pub fn load<T: AtomicAccess>(mem: &GuestMemoryMmap, gpa: u64, order: Ordering) -> Option<T> {
    with_slice(mem, gpa, std::mem::size_of::<T>(), |s| {
        s.load(0, order).ok()
    })
}

/// Atomic store of a naturally aligned `T` at `gpa` (recorded in the dirty bitmap).
#[inline]
pub fn store<T: AtomicAccess>(mem: &GuestMemoryMmap, gpa: u64, v: T, order: Ordering) -> bool {
    with_slice(mem, gpa, std::mem::size_of::<T>(), |s| {
        s.store(v, 0, order).ok()
    })
    .is_some()
}

/// Atomic OR of `bits` into the naturally aligned u64 at `gpa` (sequentially consistent), logged
/// in the dirty bitmap by hand (atomic references bypass vm-memory's log). Returns the old value,
/// `None` if the word is not inside one region or not aligned.
#[inline]
pub fn fetch_or_u64(mem: &GuestMemoryMmap, gpa: u64, bits: u64) -> Option<u64> {
    with_slice(mem, gpa, 8, |s| {
        let cell = s.get_atomic_ref::<std::sync::atomic::AtomicU64>(0).ok()?;
        let old = cell.fetch_or(bits, Ordering::SeqCst);
        s.bitmap().mark_dirty(0, 8);
        Some(old)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

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
        assert!(slice(&mem, 0xffe, 4).is_none());
        assert!(!read_bytes(&mem, 0x2000, &mut [0u8; 1]));
        slice(&mem, 0x1000, 4).unwrap().copy_from(&[9u8; 4]);
        let mut b = [0u8; 4];
        assert!(read_bytes(&mem, 0x1000, &mut b));
        assert_eq!(b, [9; 4]);
        assert_eq!(fetch_or_u64(&mem, 0x1008, 1 << 3), Some(0));
        assert_eq!(fetch_or_u64(&mem, 0x1008, 1), Some(1 << 3));
        assert_eq!(load::<u64>(&mem, 0x1008, Ordering::Acquire), Some(9));
        // Misaligned or straddling: refused.
        assert_eq!(fetch_or_u64(&mem, 0x1004, 1), None);
        assert_eq!(fetch_or_u64(&mem, 0xffc, 1), None);
    }
}
