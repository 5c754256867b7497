//! Rings in guest memory: SQ, RQ and CQ, each a page list with a control block at slot 0.

use std::sync::atomic::Ordering;

use vrdma_abi as abi;

use crate::mr::{check_pages, PageListError};
use crate::GuestMemoryMmap;

/// A ring: `depth` slots of `stride` bytes after a control block, in guest pages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ring {
    /// 4 KiB guest pages.
    pub pages: Vec<u64>,
    /// Slots (power of two).
    pub depth: u32,
    /// Slot size (power of two, 64..=4096).
    pub stride: u32,
}

impl Ring {
    /// Validates geometry and pages. `max_depth` and `max_pages` are the device's limits.
    pub fn new(
        mem: &GuestMemoryMmap,
        pages: Vec<u64>,
        depth: u32,
        stride: u32,
        max_depth: u32,
        max_pages: u32,
    ) -> Result<Self, PageListError> {
        if !depth.is_power_of_two()
            || depth > max_depth
            || !stride.is_power_of_two()
            || !(abi::MIN_STRIDE..=abi::MAX_STRIDE).contains(&stride)
            || pages.len() as u64 > max_pages as u64
            || (pages.len() as u64) < abi::ring_pages(depth, stride)
        {
            return Err(PageListError::Invalid);
        }
        check_pages(mem, &pages, abi::VRDMA_PAGE_SHIFT)?;
        Ok(Self {
            pages,
            depth,
            stride,
        })
    }

    fn addr_of_pos(&self, pos: u64) -> u64 {
        let off = pos * self.stride as u64;
        // In bounds: pos <= depth and pages cover (depth + 1) * stride bytes (checked in new).
        self.pages[(off >> abi::VRDMA_PAGE_SHIFT) as usize] + (off & (abi::VRDMA_PAGE_SIZE - 1))
    }

    /// Guest address of the control block.
    pub fn header(&self) -> u64 {
        self.pages[0]
    }

    /// Guest address of the slot for free-running index `idx`.
    pub fn slot(&self, idx: u32) -> u64 {
        self.addr_of_pos(1 + (idx & (self.depth - 1)) as u64)
    }

    /// The slots of free-running indices `idx, idx + 1, …` (at most `max`) that are contiguous
    /// in guest memory: within one ring page and before the ring wraps. Returns the guest
    /// address of the first and how many (at least 1 when `max` > 0).
    pub fn run_from(&self, idx: u32, max: u32) -> (u64, u32) {
        let rel = idx & (self.depth - 1);
        let off = (1 + rel as u64) * self.stride as u64;
        // Slots are stride-aligned and stride divides the page size: a slot never crosses a page.
        // The stride is a power of two (checked in `new`): a shift, not a division per fetch.
        let in_page = ((abi::VRDMA_PAGE_SIZE - (off & (abi::VRDMA_PAGE_SIZE - 1)))
            >> self.stride.trailing_zeros()) as u32;
        let before_wrap = self.depth - rel;
        (self.slot(idx), max.min(in_page).min(before_wrap))
    }

    fn load(&self, mem: &GuestMemoryMmap, off: u64) -> u32 {
        // The header page was validated at creation; a failure can only mean the memory map
        // changed under us, and 0 is a safe answer (no new work).
        crate::gm::load::<u32>(mem, self.header() + off, Ordering::Acquire).unwrap_or(0)
    }

    fn store(&self, mem: &GuestMemoryMmap, off: u64, v: u32) {
        crate::gm::store(mem, self.header() + off, v, Ordering::Release);
    }

    /// Producer index.
    pub fn prod(&self, mem: &GuestMemoryMmap) -> u32 {
        self.load(mem, abi::RING_PROD_OFFSET)
    }

    /// Consumer index.
    pub fn cons(&self, mem: &GuestMemoryMmap) -> u32 {
        self.load(mem, abi::RING_CONS_OFFSET)
    }

    /// Publishes the producer index.
    pub fn set_prod(&self, mem: &GuestMemoryMmap, v: u32) {
        self.store(mem, abi::RING_PROD_OFFSET, v)
    }

    /// Publishes the consumer index.
    pub fn set_cons(&self, mem: &GuestMemoryMmap, v: u32) {
        self.store(mem, abi::RING_CONS_OFFSET, v)
    }

    /// CQ arm word and the consumer index the driver saw when arming.
    pub fn arm(&self, mem: &GuestMemoryMmap) -> (u32, u32) {
        let cons = self.load(mem, abi::RING_ARM_CONS_OFFSET);
        let arm = self.load(mem, abi::RING_ARM_OFFSET);
        (arm, cons)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn slots_map_through_discontiguous_pages() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let r = Ring::new(&mem, vec![0x8000, 0x2000], 64, 64, 4096, 16).unwrap();
        assert_eq!(r.header(), 0x8000);
        assert_eq!(r.slot(0), 0x8040);
        assert_eq!(r.slot(62), 0x8000 + 63 * 64);
        assert_eq!(r.slot(63), 0x2000);
        assert_eq!(r.slot(64), 0x8040);
        // Slots 0..=61 share the first page with the header; 62 ends it; 63 is on the second.
        assert_eq!(r.run_from(0, 100), (0x8040, 63));
        assert_eq!(r.run_from(60, 2), (0x8000 + 61 * 64, 2));
        assert_eq!(r.run_from(63, 100), (0x2000, 1));
        assert_eq!(r.run_from(64 + 62, 5), (0x8000 + 63 * 64, 1));
        r.set_prod(&mem, 7);
        assert_eq!(r.prod(&mem), 7);
    }

    #[test]
    fn rejects_bad_geometry() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let bad = |pages: Vec<u64>, depth, stride| Ring::new(&mem, pages, depth, stride, 4096, 16);
        assert!(bad(vec![0x1000], 64, 64).is_err()); // needs 2 pages
        assert!(bad(vec![0x1000], 3, 64).is_err());
        assert!(bad(vec![0x1000], 0, 64).is_err());
        assert!(bad(vec![0x1000], 4, 32).is_err());
        assert!(bad(vec![0x1000], 4, 8192).is_err());
        assert!(bad(vec![0x1000; 17], 4, 64).is_err());
        assert!(bad(vec![0x1001], 4, 64).is_err());
        assert!(bad(vec![1 << 20], 4, 64).is_err());
        assert!(Ring::new(&mem, vec![0x1000], 8192, 64, 4096, 16).is_err());
    }
}
