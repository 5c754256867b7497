//! Dirty-page tracking for pre-copy live migration.
//!
//! Every write the device makes into guest memory (CQEs, receive data, inbound WRITEs, READ
//! responses, atomic results, ring indices, event-queue entries) goes through vm-memory's
//! volatile accessors, which report the written pages to each region's
//! [`DirtyBitmap`](vrdma_memory::DirtyBitmap). The log runs only between [`start`] and [`stop`]:
//! outside a migration a write pays no logging (see [`vrdma_memory`]). A VMM's iterative copy
//! loop calls [`start`], copies all of memory ([`copy_all`]), then reads and clears the log with
//! [`take`] and copies the pages it names with [`copy_pages`]; the final round runs after the
//! device is stopped, so the destination image is identical (see `docs/migration.md`).
//!
//! Under KVM the guest's own CPU writes are logged by KVM (`KVM_GET_DIRTY_LOG`); a VMM ORs both
//! logs. In the in-process test harness the guest driver writes through the same memory object,
//! so this log covers its writes too.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vrdma_memory::region_bitmap;

pub use vrdma_memory::BarrierError;

use crate::GuestMemoryMmap;

/// Dirty pages of one memory region: bit `i` of word `i / 64` covers the page at
/// `start + i * page_size`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionLog {
    /// First guest-physical address of the region.
    pub start: u64,
    /// Bytes in the region.
    pub len: u64,
    /// Tracking granularity in bytes.
    pub page_size: u64,
    /// The bitmap words.
    pub words: Vec<u64>,
}

impl RegionLog {
    /// Guest-physical addresses of the dirty pages.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(move |(w, &bits)| {
            (0..64)
                .filter(move |b| bits & (1u64 << b) != 0)
                .map(move |b| self.start + (w as u64 * 64 + b) * self.page_size)
                .filter(move |&a| a < self.start + self.len)
        })
    }
}

/// A dirty log of a whole guest memory, region by region.
pub type DirtyLog = Vec<RegionLog>;

/// Starts logging: switches every region's log on and clears it. Pages written afterwards are
/// logged; a write this misses happened before it returned and is in the memory a copy made
/// now reads. The first pre-copy round copies all of memory after this call. An error means
/// the process-wide barrier that gives this guarantee is unavailable (logging is on
/// regardless).
pub fn start(mem: &GuestMemoryMmap) -> Result<(), BarrierError> {
    vrdma_memory::start_logging(mem)
}

/// Stops logging (the migration finished or was given up). Writes are no longer logged.
pub fn stop(mem: &GuestMemoryMmap) {
    vrdma_memory::stop_logging(mem);
}

/// Whether the log of `mem` is on.
pub fn is_logging(mem: &GuestMemoryMmap) -> bool {
    vrdma_memory::is_logging(mem)
}

/// Takes the log: returns the pages written since the previous call (or [`start`]) and clears
/// them, atomically per bitmap word.
pub fn take(mem: &GuestMemoryMmap) -> DirtyLog {
    mem.iter()
        .map(|r| RegionLog {
            start: r.start_addr().0,
            len: r.len(),
            page_size: 4096,
            words: region_bitmap(r).get_and_reset(),
        })
        .collect()
}

/// Number of dirty pages in a log.
pub fn count(log: &DirtyLog) -> u64 {
    log.iter()
        .flat_map(|r| r.words.iter())
        .map(|w| w.count_ones() as u64)
        .sum()
}

/// Copies the pages named by `log` from `src` to `dst` (which must have the same layout).
/// Returns the number of pages copied. Pages outside `dst` are skipped.
pub fn copy_pages(src: &GuestMemoryMmap, dst: &GuestMemoryMmap, log: &DirtyLog) -> u64 {
    let mut n = 0;
    let mut buf = vec![0u8; 4096];
    for r in log {
        buf.resize(r.page_size as usize, 0);
        for gpa in r.pages() {
            let len = (r.start + r.len - gpa).min(r.page_size) as usize;
            if src.read_slice(&mut buf[..len], GuestAddress(gpa)).is_ok()
                && dst.write_slice(&buf[..len], GuestAddress(gpa)).is_ok()
            {
                n += 1;
            }
        }
    }
    n
}

/// Copies all of `src` into `dst` (same layout): the first pre-copy round.
pub fn copy_all(src: &GuestMemoryMmap, dst: &GuestMemoryMmap) -> u64 {
    let mut bytes = 0;
    for r in src.iter() {
        let (Ok(s), Ok(d)) = (
            src.get_slice(r.start_addr(), r.len() as usize),
            dst.get_slice(r.start_addr(), r.len() as usize),
        ) else {
            continue;
        };
        // A plain copy between two volatile slices of equal length.
        s.copy_to_volatile_slice(d);
        bytes += r.len();
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_writes_and_copies_them() {
        let mk = || {
            GuestMemoryMmap::from_ranges(&[
                (GuestAddress(0), 0x10000),
                (GuestAddress(0x100000), 0x4000),
            ])
            .unwrap()
        };
        let (src, dst) = (mk(), mk());
        start(&src).unwrap();
        src.write_obj(0xdead_beefu32, GuestAddress(0x2004)).unwrap();
        src.write_slice(&[7u8; 10], GuestAddress(0x100ffc)).unwrap();
        let log = take(&src);
        let pages: Vec<u64> = log.iter().flat_map(|r| r.pages()).collect();
        assert_eq!(pages, vec![0x2000, 0x100000, 0x101000]);
        assert_eq!(count(&log), 3);
        assert_eq!(copy_pages(&src, &dst, &log), 3);
        assert_eq!(
            dst.read_obj::<u32>(GuestAddress(0x2004)).unwrap(),
            0xdead_beef
        );
        let mut b = [0u8; 10];
        dst.read_slice(&mut b, GuestAddress(0x100ffc)).unwrap();
        assert_eq!(b, [7u8; 10]);
        // Taking the log cleared it.
        assert_eq!(count(&take(&src)), 0);
        src.write_obj(1u8, GuestAddress(0xffff)).unwrap();
        let (s2, d2) = (mk(), mk());
        s2.write_obj(5u64, GuestAddress(0x100008)).unwrap();
        assert_eq!(copy_all(&s2, &d2), 0x14000);
        assert_eq!(d2.read_obj::<u64>(GuestAddress(0x100008)).unwrap(), 5);
    }
}
