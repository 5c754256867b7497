//! Cache-line prefetches: hints that start moving a line another core wrote to this core before
//! the code that needs it gets there. A prefetch never faults, whatever the address.

use std::sync::atomic::Ordering;

/// Asks the CPU to fetch the line of `p` in a state that allows a write (x86 `prefetchw` where
/// the CPU has it, a plain prefetch otherwise). A hint: it never faults, whatever `p` is.
#[inline]
pub(crate) fn for_write(p: *const u8) {
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
