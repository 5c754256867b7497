//! Guest memory as the vrdma crates share it.
//!
//! The device, the test guest driver and the VMM glue hold the same [`GuestMemoryMmap`]: vm-memory's
//! mmap backend whose regions carry a [`DirtyBitmap`]. Every write through vm-memory's accessors
//! (the device's CQEs, ring indices and inbound data; in the in-process harness also the test
//! driver's stores) reports its pages to the region's bitmap.
//!
//! A dirty log is needed only while a live migration copies memory ahead of the stop (pre-copy),
//! so logging is **off** when memory is created, as KVM's dirty logging and Firecracker's
//! dirty-page tracking are until a VMM asks for them. [`start_logging`] switches it on for a
//! whole memory, [`stop_logging`] off again. While it is off a write costs one load of a
//! read-mostly flag instead of an atomic read-modify-write per page on a bitmap word that the
//! guest's and the peers' threads share.
//!
//! # Why no write is missed when logging starts
//!
//! A writer stores its data and then loads the region's flag; the starter sets the flag, then
//! issues `membarrier(2)`, which runs a full memory barrier on every thread of the process, and
//! only then returns (and the VMM copies all of memory, its first pre-copy round). Either the
//! writer's load saw the flag, and the page is logged, or it ran before the barrier, and then its
//! data store was visible before the copy began. This is the asymmetric-fence pattern of
//! `liburcu`'s membarrier flavour: the frequent side (every write) pays a compiler fence, the
//! rare side (the start of a migration) a system call.

use std::fmt;
use std::sync::atomic::{compiler_fence, AtomicBool, Ordering};

use vm_memory::bitmap::{AtomicBitmap, Bitmap, NewBitmap, RefSlice, WithBitmapSlice};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, VolatileMemory};

/// Guest memory with a switchable dirty log per region.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<DirtyBitmap>;
/// One region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<DirtyBitmap>;

/// A region's dirty log (one bit per 4 KiB page) and its on/off switch.
pub struct DirtyBitmap {
    log: AtomicBitmap,
    on: AtomicBool,
}

impl fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirtyBitmap")
            .field("on", &self.on.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Default for DirtyBitmap {
    fn default() -> Self {
        DirtyBitmap {
            log: AtomicBitmap::default(),
            on: AtomicBool::new(false),
        }
    }
}

impl NewBitmap for DirtyBitmap {
    fn with_len(len: usize) -> Self {
        DirtyBitmap {
            log: AtomicBitmap::with_len(len),
            on: AtomicBool::new(false),
        }
    }
}

impl<'a> WithBitmapSlice<'a> for DirtyBitmap {
    type S = RefSlice<'a, Self>;
}

impl Bitmap for DirtyBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        // The data was stored before this call; the flag must be loaded after it (see the
        // crate documentation). The starter's membarrier supplies the hardware barrier.
        compiler_fence(Ordering::SeqCst);
        if self.on.load(Ordering::Relaxed) {
            self.log.mark_dirty(offset, len);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.log.dirty_at(offset)
    }

    fn slice_at(&self, offset: usize) -> RefSlice<'_, Self> {
        RefSlice::new(self, offset)
    }
}

impl DirtyBitmap {
    /// Whether writes are being logged.
    pub fn is_logging(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// Clears the log.
    pub fn reset(&self) {
        self.log.reset();
    }

    /// Returns the log's words (bit `i` of word `i / 64`: page `i` of the region) and clears them,
    /// atomically per word.
    pub fn get_and_reset(&self) -> Vec<u64> {
        self.log.get_and_reset()
    }
}

/// A volatile slice of guest memory, with its dirty log.
pub type GuestSlice<'a> = vm_memory::VolatileSlice<'a, vm_memory::bitmap::BS<'a, DirtyBitmap>>;

/// The region of `mem` that holds all of `[gpa, gpa + len)`, and `gpa`'s offset in it; `None`
/// if no one region does. A linear scan: guest memories have one or a few regions, and the data
/// path's accesses (a ring slot, an index, a doorbell word) each lie in one, so this avoids
/// vm-memory's generic, region-spanning lookup.
#[inline]
pub fn region_of(mem: &GuestMemoryMmap, gpa: u64, len: u64) -> Option<(&GuestRegionMmap, usize)> {
    let end = gpa.checked_add(len)?;
    mem.iter().find_map(|r| {
        let start = r.start_addr().0;
        (gpa >= start && end - start <= r.len()).then(|| (r, (gpa - start) as usize))
    })
}

/// The volatile slice `[gpa, gpa + len)` of the one region that holds all of it (bounds-checked,
/// dirty-tracked); `None` if no region does.
#[inline]
pub fn region_slice(mem: &GuestMemoryMmap, gpa: u64, len: usize) -> Option<GuestSlice<'_>> {
    let (r, off) = region_of(mem, gpa, len as u64)?;
    std::ops::Deref::deref(r).get_slice(off, len).ok()
}

/// The host address of guest-physical `gpa` in `mem`, 0 if no region holds it: for prefetch
/// hints ([`prefetch_for_write`]), which are never dereferenced.
pub fn host_address(mem: &GuestMemoryMmap, gpa: u64) -> usize {
    region_of(mem, gpa, 1).map_or(0, |(r, off)| {
        std::ops::Deref::deref(r).as_ptr() as usize + off
    })
}

/// The bitmap of a whole region.
pub fn region_bitmap(r: &GuestRegionMmap) -> &DirtyBitmap {
    std::ops::Deref::deref(r).bitmap()
}

/// Errors of [`start_logging`].
#[derive(Debug)]
pub struct BarrierError(std::io::Error);

impl fmt::Display for BarrierError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "membarrier(2) is unavailable, so writes racing with the start of dirty logging \
             could be missed: {}",
            self.0
        )
    }
}

impl std::error::Error for BarrierError {}

/// Switches logging on for every region of `mem` and clears the logs. When it returns, every
/// write that is not in the log happened before the call and is visible to the calling thread:
/// copying all of memory now (the first pre-copy round) and then the logged pages in later
/// rounds misses nothing. On error logging is on too, but the guarantee is not given.
pub fn start_logging(mem: &GuestMemoryMmap) -> Result<(), BarrierError> {
    for r in mem.iter() {
        let b = region_bitmap(r);
        b.on.store(true, Ordering::SeqCst);
        b.reset();
    }
    process_barrier().map_err(BarrierError)
}

/// Switches logging off for every region of `mem` (after a migration finished or was given up).
/// The logs keep their bits until taken.
pub fn stop_logging(mem: &GuestMemoryMmap) {
    for r in mem.iter() {
        region_bitmap(r).on.store(false, Ordering::SeqCst);
    }
}

/// Whether every region of `mem` is logging.
pub fn is_logging(mem: &GuestMemoryMmap) -> bool {
    mem.iter().all(|r| region_bitmap(r).is_logging()) && mem.num_regions() > 0
}

const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_long = 1 << 3;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_long = 1 << 4;

fn membarrier(cmd: libc::c_long) -> std::io::Result<()> {
    // SAFETY: membarrier takes two integer arguments and touches no memory of ours.
    let r = unsafe { libc::syscall(libc::SYS_membarrier, cmd, 0 as libc::c_long) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A full memory barrier on every running thread of this process: the expedited command (IPIs to
/// the CPUs running our threads; needs a registration, which is idempotent), else the global one
/// (waits for an RCU grace period: slower, no registration).
fn process_barrier() -> std::io::Result<()> {
    membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED)
        .and_then(|()| membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED))
        .or_else(|_| membarrier(MEMBARRIER_CMD_GLOBAL))
}

/// Asks the CPU to fetch the cache line of `p` in a state that allows a write (x86 `prefetchw`
/// where the CPU has it, a plain prefetch otherwise): a hint that starts moving a line another
/// core wrote to this core before the code that needs it gets there (the device's lock before
/// it is taken, a CQ's next entry before the driver polls it). It never faults and never reads
/// or writes anything, whatever `p` is: a stale or wild pointer costs at most a wasted fetch.
#[inline]
pub fn prefetch_for_write(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::atomic::AtomicU8;
        // 0: not yet asked, 1: no PREFETCHW, 2: PREFETCHW.
        static HAS_PREFETCHW: AtomicU8 = AtomicU8::new(0);
        let mut has = HAS_PREFETCHW.load(Ordering::Relaxed);
        if has == 0 {
            // CPUID 0x8000_0001, ECX bit 8: PREFETCHW (AMD "3DNowPrefetch", Intel since
            // Broadwell). Both leaves exist on every x86-64 CPU.
            let ext = std::arch::x86_64::__cpuid(0x8000_0001);
            has = if ext.ecx & (1 << 8) != 0 { 2 } else { 1 };
            HAS_PREFETCHW.store(has, Ordering::Relaxed);
        }
        if has == 2 {
            // SAFETY: the CPU has PREFETCHW (checked above); a prefetch never faults, writes
            // nothing and reads nothing into the program, whatever the address.
            unsafe {
                std::arch::asm!(
                    "prefetchw [{0}]",
                    in(reg) p,
                    options(nostack, preserves_flags, readonly)
                );
            }
        } else {
            // SAFETY: as above, for a plain prefetch (SSE, part of x86-64).
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Pushes the cache line that holds `p` out of this core's private caches into the cache that
/// all cores share (x86 `CLDEMOTE`), for a line that another core reads or writes next: that
/// core then finds it there instead of snooping this core's caches, as it finds the data a NIC
/// writes into the last-level cache. A hint: it never faults and changes no data, whatever `p`
/// is. CPUs without it execute its encoding as a NOP (it lies in the hint-NOP space); on other
/// architectures it does nothing.
#[inline]
pub fn demote(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a cache hint (or a NOP): it neither faults nor reads or writes anything, whatever
    // the address.
    unsafe {
        std::arch::asm!(
            "cldemote [{0}]",
            in(reg) p,
            options(nostack, preserves_flags, readonly)
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryRegion};

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000), (GuestAddress(0x20000), 0x4000)])
            .unwrap()
    }

    fn dirty_pages(m: &GuestMemoryMmap) -> Vec<u64> {
        m.iter()
            .flat_map(|r| {
                let start = r.start_addr().0;
                region_bitmap(r)
                    .get_and_reset()
                    .into_iter()
                    .enumerate()
                    .flat_map(move |(w, bits)| {
                        (0..64u64)
                            .filter(move |b| bits & (1 << b) != 0)
                            .map(move |b| start + (w as u64 * 64 + b) * 4096)
                    })
            })
            .collect()
    }

    #[test]
    fn logs_only_between_start_and_stop() {
        let m = mem();
        assert!(!is_logging(&m));
        m.write_obj(1u32, GuestAddress(0x3000)).unwrap();
        assert_eq!(dirty_pages(&m), Vec::<u64>::new());

        start_logging(&m).unwrap();
        assert!(is_logging(&m));
        m.write_obj(2u32, GuestAddress(0x5004)).unwrap();
        m.write_slice(&[9u8; 8], GuestAddress(0x20ffc)).unwrap();
        assert_eq!(dirty_pages(&m), vec![0x5000, 0x20000, 0x21000]);
        // Taken: cleared, still logging.
        assert_eq!(dirty_pages(&m), Vec::<u64>::new());
        m.write_obj(3u8, GuestAddress(0xffff)).unwrap();
        assert_eq!(dirty_pages(&m), vec![0xf000]);

        stop_logging(&m);
        assert!(!is_logging(&m));
        m.write_obj(4u8, GuestAddress(0x1000)).unwrap();
        assert_eq!(dirty_pages(&m), Vec::<u64>::new());
    }

    /// Cache hints change no data and never fault: bytes stay as written after their lines are
    /// demoted or prefetched, and wild addresses (null, unmapped, non-canonical) are ignored.
    #[test]
    fn hints_change_nothing_and_never_fault() {
        let mut buf = vec![0u8; 4096];
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (i * 7) as u8;
        }
        let want = buf.clone();
        for line in buf.chunks(64) {
            demote(line.as_ptr());
            prefetch_for_write(line.as_ptr());
        }
        assert_eq!(buf, want);
        for wild in [0usize, 8, 0x7fff_ffff_f000, 0xdead_beef_0000_0000] {
            demote(wild as *const u8);
            prefetch_for_write(wild as *const u8);
        }
    }

    #[test]
    fn start_clears_what_was_logged_before() {
        let m = mem();
        start_logging(&m).unwrap();
        m.write_obj(1u64, GuestAddress(0x2000)).unwrap();
        start_logging(&m).unwrap();
        assert_eq!(dirty_pages(&m), Vec::<u64>::new());
    }

    /// A writer thread stores sequence numbers into pages while logging starts; the starter then
    /// copies memory and takes the log as a pre-copy would. Every value the writer stored is in
    /// the copy or its page is in the log.
    #[test]
    fn no_write_is_missed_across_the_start() {
        use std::sync::atomic::AtomicU64;
        use std::sync::Arc;
        for _ in 0..50 {
            let m = Arc::new(mem());
            let last = Arc::new(AtomicU64::new(0));
            let go = Arc::new(AtomicBool::new(true));
            let w = {
                let (m, last, go) = (m.clone(), last.clone(), go.clone());
                std::thread::spawn(move || {
                    let mut i = 0u64;
                    while go.load(Ordering::Relaxed) {
                        i += 1;
                        let page = (i % 16) * 4096;
                        m.write_obj(i, GuestAddress(page)).unwrap();
                        last.store(i, Ordering::Release);
                    }
                    i
                })
            };
            while last.load(Ordering::Acquire) < 1000 {
                std::hint::spin_loop();
            }
            start_logging(&m).unwrap();
            // The first round: what each page holds now.
            let copy: Vec<u64> = (0..16u64)
                .map(|p| m.read_obj::<u64>(GuestAddress(p * 4096)).unwrap())
                .collect();
            go.store(false, Ordering::Relaxed);
            let n = w.join().unwrap();
            let logged = dirty_pages(&m);
            // Each page's final value is either the copied one or its page was logged.
            for p in 0..16u64 {
                let now = m.read_obj::<u64>(GuestAddress(p * 4096)).unwrap();
                assert!(
                    now == copy[p as usize] || logged.contains(&(p * 4096)),
                    "page {p}: copied {} but holds {now} (writer reached {n}) and is not logged",
                    copy[p as usize]
                );
            }
        }
    }
}
