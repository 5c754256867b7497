//! Guest-memory accesses of the data path, the way a guest makes them: a plain access to the one
//! RAM region that holds the object. vm-memory's `Bytes` methods on a whole memory walk a
//! generic, region-spanning iterator per access; every ring slot, index and doorbell word lies
//! in one region, so the region is found directly and accessed through its volatile slice
//! (bounds-checked, dirty-tracked). An object that does not lie in one region takes the general
//! path, with its errors.

use std::sync::atomic::Ordering;

use vm_memory::{
    Address, AtomicAccess, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError,
};

use crate::GuestMemoryMmap;

pub(crate) use vrdma_memory::GuestSlice;

/// The volatile slice `[gpa, gpa + len)` of the region that holds all of it; if none does,
/// vm-memory's error for the range.
#[inline]
pub(crate) fn slice(
    mem: &GuestMemoryMmap,
    gpa: GuestAddress,
    len: usize,
) -> Result<GuestSlice<'_>, GuestMemoryError> {
    match vrdma_memory::region_slice(mem, gpa.raw_value(), len) {
        Some(s) => Ok(s),
        None => mem.get_slice(gpa, len),
    }
}

/// Atomic store of `v` at `gpa`.
#[inline]
pub(crate) fn store<T: AtomicAccess>(
    mem: &GuestMemoryMmap,
    v: T,
    gpa: GuestAddress,
    order: Ordering,
) -> Result<(), GuestMemoryError> {
    match slice(mem, gpa, std::mem::size_of::<T>()) {
        Ok(s) => Ok(s.store(v, 0, order)?),
        Err(_) => mem.store(v, gpa, order),
    }
}

/// Atomic load of a `T` at `gpa`.
#[inline]
pub(crate) fn load<T: AtomicAccess>(
    mem: &GuestMemoryMmap,
    gpa: GuestAddress,
    order: Ordering,
) -> Result<T, GuestMemoryError> {
    match slice(mem, gpa, std::mem::size_of::<T>()) {
        Ok(s) => Ok(s.load(0, order)?),
        Err(_) => mem.load(gpa, order),
    }
}

/// Writes `bytes` at `gpa`.
#[inline]
pub(crate) fn write_slice(
    mem: &GuestMemoryMmap,
    bytes: &[u8],
    gpa: GuestAddress,
) -> Result<(), GuestMemoryError> {
    match slice(mem, gpa, bytes.len()) {
        Ok(s) => {
            s.copy_from(bytes);
            Ok(())
        }
        Err(_) => mem.write_slice(bytes, gpa),
    }
}

/// Reads `buf.len()` bytes at `gpa`.
#[inline]
pub(crate) fn read_slice(
    mem: &GuestMemoryMmap,
    buf: &mut [u8],
    gpa: GuestAddress,
) -> Result<(), GuestMemoryError> {
    match slice(mem, gpa, buf.len()) {
        Ok(s) => {
            s.copy_to(buf);
            Ok(())
        }
        Err(_) => mem.read_slice(buf, gpa),
    }
}

/// Writes `v` at `gpa`.
#[inline]
pub(crate) fn write_obj<T: ByteValued>(
    mem: &GuestMemoryMmap,
    v: T,
    gpa: GuestAddress,
) -> Result<(), GuestMemoryError> {
    write_slice(mem, v.as_slice(), gpa)
}

/// Reads a `T` at `gpa`.
#[inline]
pub(crate) fn read_obj<T: ByteValued>(
    mem: &GuestMemoryMmap,
    gpa: GuestAddress,
) -> Result<T, GuestMemoryError> {
    match slice(mem, gpa, std::mem::size_of::<T>()) {
        Ok(s) => Ok(s.read_obj(0)?),
        Err(_) => mem.read_obj(gpa),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_region_fast_and_spanning_general() {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
        ])
        .unwrap();
        store(&mem, 7u32, GuestAddress(0xff8), Ordering::Release).unwrap();
        assert_eq!(
            load::<u32>(&mem, GuestAddress(0xff8), Ordering::Acquire).unwrap(),
            7
        );
        // Spanning the two regions: the general path (which refuses an atomic access there).
        assert!(slice(&mem, GuestAddress(0xffc), 8).is_err());
        assert!(load::<u64>(&mem, GuestAddress(0xffc), Ordering::Acquire).is_err());
        assert!(slice(&mem, GuestAddress(0x2000), 1).is_err());
    }
}
