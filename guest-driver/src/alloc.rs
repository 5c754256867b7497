//! Guest "physical" page allocator and guest "virtual" buffers.
//!
//! The driver owns a range of guest-physical memory handed to it at probe time. Everything the
//! device must reach — virtqueues, the doorbell area, rings, control-request scratch space and
//! data buffers — is carved out of that range in 4 KiB pages (or aligned blocks of `2^n` pages).
//!
//! Data buffers ([`Buffer`]) model what a guest application sees: one virtually contiguous range
//! (its *iova*, the address used in SGEs and by peers) backed by a list of guest-physical pages that
//! need not be contiguous. [`Layout::Discontiguous`] deliberately scatters the pages so that tests
//! exercise the device's page-list translation.

use std::sync::Arc;

use vm_memory::GuestAddress;
use vrdma_abi as abi;

use crate::error::{Error, Result};
use crate::GuestMemoryMmap;

/// Size of the allocator's unit page.
pub const PAGE_SIZE: u64 = abi::VRDMA_PAGE_SIZE;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = abi::VRDMA_PAGE_SHIFT;

/// First iova handed out to buffers (a typical user-space address).
pub const IOVA_BASE: u64 = 0x7f00_0000_0000;

/// How the guest-physical pages (blocks) of an allocation are placed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Layout {
    /// One physically contiguous run, in ascending order.
    Contiguous,
    /// Any free blocks, lowest addresses first (often contiguous on a fresh allocator).
    #[default]
    Any,
    /// No two blocks of the allocation are physically adjacent, and their order is shuffled
    /// (block *i+1* is usually *below* block *i*). Needs about twice the free space while
    /// allocating; the skipped blocks stay free for later allocations.
    Discontiguous,
}

impl Layout {
    fn name(self) -> &'static str {
        match self {
            Layout::Contiguous => "contiguous",
            Layout::Any => "any",
            Layout::Discontiguous => "discontiguous",
        }
    }
}

/// Hands out 4 KiB pages (or naturally aligned blocks of pages) from a guest-physical range.
///
/// Allocation is first-fit over a per-page bitmap; simple and deterministic, which is what a test
/// driver wants. It does not touch guest memory (zeroing is the caller's business).
#[derive(Clone, Debug)]
pub struct GuestAlloc {
    /// First page of the range (page aligned).
    base: u64,
    /// `used[i]`: page `base + i * PAGE_SIZE` is allocated.
    used: Vec<bool>,
    /// Number of free pages.
    free: u64,
    /// No page below this index is free (scan hint).
    first_free: usize,
    /// Next iova to hand out.
    next_iova: u64,
    /// xorshift64 state for [`Layout::Discontiguous`] shuffling.
    rng: u64,
}

impl GuestAlloc {
    /// An allocator over `[base, base + len)`. The range is shrunk to whole 4 KiB pages.
    pub fn new(base: GuestAddress, len: u64) -> Self {
        let start = base.0.next_multiple_of(PAGE_SIZE);
        let end = base.0.saturating_add(len) & !(PAGE_SIZE - 1);
        let npages = end.saturating_sub(start) / PAGE_SIZE;
        GuestAlloc {
            base: start,
            used: vec![false; npages as usize],
            free: npages,
            first_free: 0,
            next_iova: IOVA_BASE,
            rng: 0x9e37_79b9_7f4a_7c15,
        }
    }

    /// Reseeds the shuffle of [`Layout::Discontiguous`] (the default seed is fixed, so runs are
    /// reproducible).
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.rng = seed | 1;
        self
    }

    /// First guest-physical address managed.
    pub fn base(&self) -> GuestAddress {
        GuestAddress(self.base)
    }

    /// Total pages managed.
    pub fn total_pages(&self) -> u64 {
        self.used.len() as u64
    }

    /// Free pages.
    pub fn free_pages(&self) -> u64 {
        self.free
    }

    /// Allocates `count` 4 KiB pages; returns their guest-physical addresses in buffer order.
    pub fn alloc_pages(&mut self, count: usize, layout: Layout) -> Result<Vec<u64>> {
        self.alloc_blocks(count, PAGE_SHIFT, layout)
    }

    /// Allocates `bytes` (rounded up to pages) of physically contiguous memory.
    pub fn alloc_contiguous(&mut self, bytes: u64) -> Result<GuestAddress> {
        let count = bytes.div_ceil(PAGE_SIZE).max(1) as usize;
        let pages = self.alloc_blocks(count, PAGE_SHIFT, Layout::Contiguous)?;
        Ok(GuestAddress(pages[0]))
    }

    /// Allocates `count` blocks of `1 << block_shift` bytes (`block_shift >= 12`), each
    /// physically contiguous and aligned to its size; returns their addresses in buffer order.
    pub fn alloc_blocks(
        &mut self,
        count: usize,
        block_shift: u32,
        layout: Layout,
    ) -> Result<Vec<u64>> {
        if !(PAGE_SHIFT..=40).contains(&block_shift) {
            return Err(Error::InvalidArgument("block_shift must be in 12..=40"));
        }
        if count == 0 {
            return Ok(Vec::new());
        }
        let oom = Error::OutOfMemory {
            count: count as u64,
            block_size: 1 << block_shift,
            layout: layout.name(),
        };
        let ppb = 1usize << (block_shift - PAGE_SHIFT); // pages per block
        if (count as u64).saturating_mul(ppb as u64) > self.free {
            return Err(oom);
        }
        let picked: Vec<usize> = match layout {
            Layout::Any => self.candidates(ppb).take(count).collect(),
            Layout::Discontiguous => {
                // Every other free block: consecutive picks then have at least one block between
                // them, so no two blocks of the allocation are adjacent.
                let mut v: Vec<usize> = self.candidates(ppb).step_by(2).take(count).collect();
                self.shuffle(&mut v);
                v
            }
            Layout::Contiguous => {
                let mut run: Vec<usize> = Vec::with_capacity(count);
                for c in self.candidates(ppb) {
                    if run.last().is_some_and(|&l| l + ppb != c) {
                        run.clear();
                    }
                    run.push(c);
                    if run.len() == count {
                        break;
                    }
                }
                run
            }
        };
        if picked.len() < count {
            return Err(oom);
        }
        for &first in &picked {
            self.used[first..first + ppb].fill(true);
        }
        self.free -= (count * ppb) as u64;
        while self.first_free < self.used.len() && self.used[self.first_free] {
            self.first_free += 1;
        }
        Ok(picked
            .into_iter()
            .map(|i| self.base + i as u64 * PAGE_SIZE)
            .collect())
    }

    /// Returns blocks of `1 << block_shift` bytes to the allocator.
    ///
    /// # Panics
    /// If a block was not allocated from this allocator (a double free is a driver bug).
    pub fn free_blocks(&mut self, blocks: &[u64], block_shift: u32) {
        let ppb = 1usize << (block_shift - PAGE_SHIFT);
        for &gpa in blocks {
            let first = self
                .index_of(gpa)
                .expect("freed block is outside the allocator's range");
            let pages = &mut self.used[first..first + ppb];
            assert!(pages.iter().all(|&u| u), "double free of {gpa:#x}");
            pages.fill(false);
            self.free += ppb as u64;
            self.first_free = self.first_free.min(first);
        }
    }

    /// Returns 4 KiB pages to the allocator.
    pub fn free_pages_list(&mut self, pages: &[u64]) {
        self.free_blocks(pages, PAGE_SHIFT)
    }

    /// Returns a contiguous allocation made by [`GuestAlloc::alloc_contiguous`].
    pub fn free_contiguous(&mut self, addr: GuestAddress, bytes: u64) {
        let count = bytes.div_ceil(PAGE_SIZE).max(1);
        let pages: Vec<u64> = (0..count).map(|i| addr.0 + i * PAGE_SIZE).collect();
        self.free_blocks(&pages, PAGE_SHIFT)
    }

    /// Reserves `len` bytes of iova space aligned to `align` (a power of two ≥ 4 KiB). Successive
    /// reservations are separated by at least one unmapped guard page.
    pub fn alloc_iova(&mut self, len: u64, align: u64) -> u64 {
        let align = align.max(PAGE_SIZE);
        let iova = self.next_iova.next_multiple_of(align);
        self.next_iova = iova + len.next_multiple_of(PAGE_SIZE) + PAGE_SIZE;
        iova
    }

    /// Page index of `gpa` if it lies in the range.
    fn index_of(&self, gpa: u64) -> Option<usize> {
        let off = gpa.checked_sub(self.base)?;
        let i = (off / PAGE_SIZE) as usize;
        (off % PAGE_SIZE == 0 && i < self.used.len()).then_some(i)
    }

    /// Page indices of free, naturally aligned blocks of `ppb` pages, ascending.
    fn candidates(&self, ppb: usize) -> impl Iterator<Item = usize> + '_ {
        let block = ppb as u64 * PAGE_SIZE;
        // First index whose address is block aligned, at or after the scan hint.
        let hint_addr = self.base + self.first_free as u64 * PAGE_SIZE;
        let start = ((hint_addr.next_multiple_of(block) - self.base) / PAGE_SIZE) as usize;
        (start..self.used.len())
            .step_by(ppb)
            .filter(move |&i| i + ppb <= self.used.len() && !self.used[i..i + ppb].contains(&true))
    }

    fn next_rand(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }

    /// Fisher-Yates shuffle; for two or more elements it never leaves the order ascending.
    fn shuffle(&mut self, v: &mut [usize]) {
        for i in (1..v.len()).rev() {
            let j = (self.next_rand() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
        if v.len() >= 2 && v.windows(2).all(|w| w[0] < w[1]) {
            v.reverse();
        }
    }
}

/// A guest "virtual" buffer: `len` bytes at iova `iova`, backed by guest-physical blocks of
/// `1 << page_shift` bytes (4 KiB unless allocated with a larger page size).
///
/// Byte `o` of the buffer lives at `pages[o >> page_shift] + (o & (page_size - 1))`; the iova is
/// aligned to the page size, so this is also the MR page-list rule of the ABI.
///
/// Accessors panic when asked for bytes outside the buffer, like slice indexing. A buffer is
/// returned to the allocator with [`crate::Driver::free_buffer`]; dropping it leaks its pages
/// (deliberately: the device may still reach them through an MR).
#[derive(Clone)]
pub struct Buffer {
    pub(crate) mem: Arc<GuestMemoryMmap>,
    pub(crate) iova: u64,
    pub(crate) len: u64,
    pub(crate) page_shift: u32,
    pub(crate) pages: Vec<u64>,
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buffer")
            .field("iova", &format_args!("{:#x}", self.iova))
            .field("len", &self.len)
            .field("page_shift", &self.page_shift)
            .field("npages", &self.pages.len())
            .finish()
    }
}

impl Buffer {
    /// Allocates a zeroed buffer of `len` bytes backed by blocks of `1 << page_shift` bytes.
    pub fn alloc(
        alloc: &mut GuestAlloc,
        mem: &Arc<GuestMemoryMmap>,
        len: u64,
        page_shift: u32,
        layout: Layout,
    ) -> Result<Buffer> {
        let page_size = 1u64 << page_shift;
        let npages = len.div_ceil(page_size) as usize;
        let pages = alloc.alloc_blocks(npages, page_shift, layout)?;
        let iova = alloc.alloc_iova(len, page_size);
        let buf = Buffer {
            mem: mem.clone(),
            iova,
            len,
            page_shift,
            pages,
        };
        buf.fill(0);
        Ok(buf)
    }

    /// The buffer's iova (the address of byte 0 in SGEs, MRs and remote addresses).
    pub fn iova(&self) -> u64 {
        self.iova
    }

    /// Iova of byte `offset`.
    pub fn addr(&self, offset: u64) -> u64 {
        self.iova + offset
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// log2 of the backing page size.
    pub fn page_shift(&self) -> u32 {
        self.page_shift
    }

    /// Backing page size in bytes.
    pub fn page_size(&self) -> u64 {
        1 << self.page_shift
    }

    /// Guest-physical addresses of the backing pages, in buffer order.
    pub fn pages(&self) -> &[u64] {
        &self.pages
    }

    /// The guest memory the buffer lives in.
    pub fn mem(&self) -> &Arc<GuestMemoryMmap> {
        &self.mem
    }

    /// Points the buffer at `mem`, the destination's copy of guest memory after a live
    /// migration (same guest-physical addresses).
    ///
    /// **Test harness only**, like [`crate::Driver::rebind`]: a real guest's buffers are guest
    /// memory and move with it; the harness's host-side handle must be re-pointed.
    pub fn rebind(&mut self, mem: Arc<GuestMemoryMmap>) {
        self.mem = mem;
    }

    /// Guest-physical address of byte `offset`.
    ///
    /// # Panics
    /// If `offset >= len`.
    pub fn gpa_of(&self, offset: u64) -> GuestAddress {
        assert!(
            offset < self.len,
            "offset {offset:#x} outside buffer of {:#x} bytes",
            self.len
        );
        let mask = self.page_size() - 1;
        GuestAddress(self.pages[(offset >> self.page_shift) as usize] + (offset & mask))
    }

    /// The guest-memory slice of `[offset, offset + len)` if it lies within one backing page
    /// (and within the buffer).
    #[inline]
    fn page_slice(&self, offset: u64, len: usize) -> Option<crate::gmem::GuestSlice<'_>> {
        let end = offset
            .checked_add(len as u64)
            .filter(|&e| e <= self.len && len > 0)?;
        let page = offset >> self.page_shift;
        if (end - 1) >> self.page_shift != page {
            return None;
        }
        let gpa = self.pages.get(page as usize)? + (offset & (self.page_size() - 1));
        crate::gmem::slice(&self.mem, GuestAddress(gpa), len).ok()
    }

    /// Calls `f(gpa, range)` for each physically contiguous piece of `[offset, offset+len)`,
    /// where `range` is the piece's position relative to `offset`.
    fn for_each_chunk(
        &self,
        offset: u64,
        len: usize,
        mut f: impl FnMut(GuestAddress, std::ops::Range<usize>),
    ) {
        let end = offset
            .checked_add(len as u64)
            .filter(|&e| e <= self.len)
            .unwrap_or_else(|| {
                panic!(
                    "range {offset:#x}+{len:#x} outside buffer of {:#x} bytes",
                    self.len
                )
            });
        let mut o = offset;
        while o < end {
            let in_page = self.page_size() - (o & (self.page_size() - 1));
            let n = in_page.min(end - o);
            let start = (o - offset) as usize;
            f(self.gpa_of(o), start..start + n as usize);
            o += n;
        }
    }

    /// Writes `data` at byte `offset`.
    ///
    /// # Panics
    /// If the range is outside the buffer.
    pub fn write(&self, offset: u64, data: &[u8]) {
        // Within one backing page (the usual small write): one slice, no chunk walk.
        if let Some(s) = self.page_slice(offset, data.len()) {
            s.copy_from(data);
            return;
        }
        self.for_each_chunk(offset, data.len(), |gpa, r| {
            crate::gmem::write_slice(&self.mem, &data[r], gpa)
                .expect("buffer page outside guest memory");
        });
    }

    /// Reads `out.len()` bytes at byte `offset`.
    ///
    /// # Panics
    /// If the range is outside the buffer.
    pub fn read(&self, offset: u64, out: &mut [u8]) {
        if let Some(s) = self.page_slice(offset, out.len()) {
            s.copy_to(out);
            return;
        }
        self.for_each_chunk(offset, out.len(), |gpa, r| {
            crate::gmem::read_slice(&self.mem, &mut out[r], gpa)
                .expect("buffer page outside guest memory");
        });
    }

    /// Reads `len` bytes at `offset` into a new vector.
    pub fn read_vec(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.read(offset, &mut v);
        v
    }

    /// The whole buffer as a vector.
    pub fn to_vec(&self) -> Vec<u8> {
        self.read_vec(0, self.len as usize)
    }

    /// Reads the little-endian u64 at `offset` (e.g. an atomic's result).
    pub fn read_u64(&self, offset: u64) -> u64 {
        let mut b = [0u8; 8];
        self.read(offset, &mut b);
        u64::from_le_bytes(b)
    }

    /// Writes a little-endian u64 at `offset`.
    pub fn write_u64(&self, offset: u64, value: u64) {
        self.write(offset, &value.to_le_bytes());
    }

    /// Sets every byte to `byte`.
    pub fn fill(&self, byte: u8) {
        let chunk = [byte; PAGE_SIZE as usize];
        let mut o = 0;
        while o < self.len {
            let n = (self.len - o).min(PAGE_SIZE);
            self.write(o, &chunk[..n as usize]);
            o += n;
        }
    }

    /// Fills the buffer with [`pattern`]`(seed, len)`.
    pub fn fill_pattern(&self, seed: u64) {
        let mut chunk = [0u8; PAGE_SIZE as usize];
        let mut o = 0;
        while o < self.len {
            let n = (self.len - o).min(PAGE_SIZE) as usize;
            for (i, b) in chunk[..n].iter_mut().enumerate() {
                *b = pattern_byte(seed, o + i as u64);
            }
            self.write(o, &chunk[..n]);
            o += n as u64;
        }
    }
}

/// Byte `index` of the deterministic test pattern for `seed` (differs between neighbouring
/// bytes, pages and seeds, so misplaced or shifted data shows up).
pub fn pattern_byte(seed: u64, index: u64) -> u8 {
    let mut x = seed
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(index.wrapping_mul(0xbf58_476d_1ce4_e5b9));
    x ^= x >> 31;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    (x >> 56) as u8
}

/// `len` bytes of the test pattern for `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| pattern_byte(seed, i)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    const BASE: u64 = 0x10_0000;

    fn mem() -> Arc<GuestMemoryMmap> {
        Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap())
    }

    #[test]
    fn range_is_shrunk_to_pages() {
        let a = GuestAlloc::new(GuestAddress(BASE + 1), 10 * PAGE_SIZE);
        assert_eq!(a.base(), GuestAddress(BASE + PAGE_SIZE));
        assert_eq!(a.total_pages(), 9);
    }

    #[test]
    fn any_and_contiguous_and_free() {
        let mut a = GuestAlloc::new(GuestAddress(BASE), 16 * PAGE_SIZE);
        let p = a.alloc_pages(3, Layout::Any).unwrap();
        assert_eq!(p, vec![BASE, BASE + PAGE_SIZE, BASE + 2 * PAGE_SIZE]);
        // Punch a hole: page 1 free, pages 0 and 2 used.
        a.free_pages_list(&p[1..2]);
        assert_eq!(a.free_pages(), 14);
        // A 2-page contiguous run cannot use the hole.
        let c = a.alloc_contiguous(2 * PAGE_SIZE).unwrap();
        assert_eq!(c, GuestAddress(BASE + 3 * PAGE_SIZE));
        // Any fills the hole first.
        assert_eq!(
            a.alloc_pages(1, Layout::Any).unwrap(),
            vec![BASE + PAGE_SIZE]
        );
        a.free_contiguous(c, 2 * PAGE_SIZE);
        assert_eq!(a.free_pages(), 16 - 3);
    }

    #[test]
    fn discontiguous_pages_are_never_adjacent_nor_ascending() {
        let mut a = GuestAlloc::new(GuestAddress(BASE), 1024 * PAGE_SIZE);
        let p = a.alloc_pages(256, Layout::Discontiguous).unwrap();
        assert_eq!(p.len(), 256);
        let mut sorted = p.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 256, "pages are distinct");
        assert!(sorted.windows(2).all(|w| w[1] - w[0] >= 2 * PAGE_SIZE));
        assert!(p.windows(2).any(|w| w[1] < w[0]), "order is shuffled");
        // The skipped pages are still usable.
        let q = a.alloc_pages(700, Layout::Any).unwrap();
        assert!(q.iter().all(|x| !p.contains(x)));
        assert_eq!(a.free_pages(), 1024 - 256 - 700);
    }

    #[test]
    fn exhaustion_is_an_error() {
        let mut a = GuestAlloc::new(GuestAddress(BASE), 8 * PAGE_SIZE);
        assert!(matches!(
            a.alloc_pages(9, Layout::Any),
            Err(Error::OutOfMemory { count: 9, .. })
        ));
        // 5 discontiguous pages need 9 free pages.
        assert!(a.alloc_pages(5, Layout::Discontiguous).is_err());
        assert!(a.alloc_pages(4, Layout::Discontiguous).is_ok());
        assert!(a.alloc_contiguous(2 * PAGE_SIZE).is_err());
        assert_eq!(a.free_pages(), 4);
        assert_eq!(a.alloc_pages(4, Layout::Any).unwrap().len(), 4);
        assert_eq!(a.free_pages(), 0);
    }

    #[test]
    #[should_panic(expected = "double free")]
    fn double_free_panics() {
        let mut a = GuestAlloc::new(GuestAddress(BASE), 8 * PAGE_SIZE);
        let p = a.alloc_pages(1, Layout::Any).unwrap();
        a.free_pages_list(&p);
        a.free_pages_list(&p);
    }

    #[test]
    fn big_blocks_are_aligned() {
        // Base deliberately not 2 MiB aligned.
        let mut a = GuestAlloc::new(GuestAddress(BASE), 16 << 20);
        let b = a.alloc_blocks(3, 21, Layout::Discontiguous).unwrap();
        for &x in &b {
            assert_eq!(x % (2 << 20), 0);
            assert!(x >= BASE && x + (2 << 20) <= BASE + (16 << 20));
        }
        let mut s = b.clone();
        s.sort_unstable();
        assert!(s.windows(2).all(|w| w[1] - w[0] >= 4 << 20));
        a.free_blocks(&b, 21);
        assert_eq!(a.free_pages(), (16 << 20) / PAGE_SIZE);
    }

    #[test]
    fn iovas_are_aligned_and_separated() {
        let mut a = GuestAlloc::new(GuestAddress(BASE), PAGE_SIZE);
        let x = a.alloc_iova(10, PAGE_SIZE);
        let y = a.alloc_iova(PAGE_SIZE, PAGE_SIZE);
        let z = a.alloc_iova(1, 2 << 20);
        assert_eq!(x, IOVA_BASE);
        assert_eq!(y, IOVA_BASE + 2 * PAGE_SIZE);
        assert_eq!(z % (2 << 20), 0);
        assert!(z > y + PAGE_SIZE);
    }

    #[test]
    fn buffer_round_trip_across_discontiguous_pages() {
        let m = mem();
        let mut a = GuestAlloc::new(GuestAddress(BASE), 2 << 20);
        let buf = Buffer::alloc(
            &mut a,
            &m,
            5 * PAGE_SIZE + 100,
            PAGE_SHIFT,
            Layout::Discontiguous,
        )
        .unwrap();
        assert_eq!(buf.pages().len(), 6);
        assert_eq!(buf.iova() % PAGE_SIZE, 0);
        assert!(buf.to_vec().iter().all(|&b| b == 0));
        let data = pattern(7, buf.len() as usize);
        buf.write(0, &data);
        assert_eq!(buf.to_vec(), data);
        // Bytes land at gpa_of(offset), page by page.
        for off in [0, 4095, 4096, 12345, buf.len() - 1] {
            let mut b = [0u8];
            m.read_slice(&mut b, buf.gpa_of(off)).unwrap();
            assert_eq!(b[0], data[off as usize]);
        }
        // An unaligned write across a page boundary.
        buf.write(4090, &[0xaa; 20]);
        assert_eq!(buf.read_vec(4088, 24)[2..22], [0xaa; 20]);
        buf.write_u64(8, 0x1122_3344_5566_7788);
        assert_eq!(buf.read_u64(8), 0x1122_3344_5566_7788);
        buf.fill(0x5a);
        assert!(buf.to_vec().iter().all(|&b| b == 0x5a));
        buf.fill_pattern(3);
        assert_eq!(buf.to_vec(), pattern(3, buf.len() as usize));
    }

    #[test]
    #[should_panic(expected = "outside buffer")]
    fn buffer_bounds_are_checked() {
        let m = mem();
        let mut a = GuestAlloc::new(GuestAddress(BASE), 1 << 20);
        let buf = Buffer::alloc(&mut a, &m, 100, PAGE_SHIFT, Layout::Any).unwrap();
        buf.write(90, &[0; 11]);
    }

    #[test]
    fn rebound_buffer_uses_the_new_memory() {
        let (m1, m2) = (mem(), mem());
        let mut a = GuestAlloc::new(GuestAddress(BASE), 1 << 20);
        let mut buf = Buffer::alloc(
            &mut a,
            &m1,
            3 * PAGE_SIZE,
            PAGE_SHIFT,
            Layout::Discontiguous,
        )
        .unwrap();
        buf.fill_pattern(9);
        // "Migrate": copy the pages, then point the buffer at the copy.
        for &p in buf.pages() {
            let mut page = vec![0u8; PAGE_SIZE as usize];
            m1.read_slice(&mut page, GuestAddress(p)).unwrap();
            m2.write_slice(&page, GuestAddress(p)).unwrap();
        }
        buf.rebind(m2.clone());
        assert!(Arc::ptr_eq(buf.mem(), &m2));
        assert_eq!(buf.to_vec(), pattern(9, buf.len() as usize));
        buf.write(5000, &[0xcc; 4]);
        let (mut old, mut new) = ([0u8; 4], [0u8; 4]);
        m1.read_slice(&mut old, buf.gpa_of(5000)).unwrap();
        m2.read_slice(&mut new, buf.gpa_of(5000)).unwrap();
        assert_eq!(new, [0xcc; 4]);
        assert_eq!(old[..], pattern(9, 5004)[5000..]);
    }

    #[test]
    fn patterns_differ() {
        assert_ne!(pattern(1, 64), pattern(2, 64));
        let p = pattern(1, 8192);
        assert_ne!(p[..4096], p[4096..]);
    }
}
