//! Guest memory advice for the host kernel.
//!
//! With thousands of QPs a guest's rings and buffers span tens of MiB, more than the TLB maps
//! with 4 KiB pages: every ring slot the driver writes and the device reads is then a TLB
//! miss on both sides. A VMM can back guest RAM with transparent huge pages (2 MiB), as Cloud
//! Hypervisor does by default; [`advise_huge_pages`] asks for them. It is advice: the host
//! may have THP disabled (`/sys/kernel/mm/transparent_hugepage/enabled` = `never`), and the
//! guest sees no difference either way. Dirty-page tracking stays at 4 KiB (vm-memory's
//! bitmap), so migration copies the same pages as without.

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use vrdma_device::GuestMemoryMmap;

/// Asks the host kernel to back every region of `mem` with transparent huge pages
/// (`madvise(MADV_HUGEPAGE)`). Contents are unchanged.
pub fn advise_huge_pages(mem: &GuestMemoryMmap) -> std::io::Result<()> {
    for region in mem.iter() {
        let len = region.len() as usize;
        let addr = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(std::io::Error::other)?;
        // SAFETY: `[addr, addr + len)` is the region's own anonymous mapping, alive as long as
        // `mem`. MADV_HUGEPAGE changes only how the kernel backs the pages, never their
        // contents or the mapping's validity.
        let rc = unsafe { libc::madvise(addr.cast(), len, libc::MADV_HUGEPAGE) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn advice_keeps_contents_and_covers_every_region() {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 4 << 20),
            (GuestAddress(8 << 20), 2 << 20),
        ])
        .unwrap();
        mem.write_slice(b"before", GuestAddress(4096)).unwrap();
        mem.write_slice(b"second", GuestAddress(9 << 20)).unwrap();
        advise_huge_pages(&mem).unwrap();
        let mut b = [0u8; 6];
        mem.read_slice(&mut b, GuestAddress(4096)).unwrap();
        assert_eq!(&b, b"before");
        mem.read_slice(&mut b, GuestAddress(9 << 20)).unwrap();
        assert_eq!(&b, b"second");
        // The kernel records the advice on the mapping: the VMA holding each region has `hg`.
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        for region in mem.iter() {
            let addr = region.get_host_address(MemoryRegionAddress(0)).unwrap() as usize;
            let mut inside = false;
            let mut found = false;
            for line in smaps.lines() {
                let range = line.split_once(' ').and_then(|(r, _)| r.split_once('-'));
                if let Some((a, b)) = range {
                    if let (Ok(a), Ok(b)) =
                        (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                    {
                        inside = a <= addr && addr < b;
                        continue;
                    }
                }
                if inside && line.starts_with("VmFlags:") {
                    assert!(line.contains(" hg"), "{addr:#x}: {line}");
                    found = true;
                }
            }
            assert!(found, "no mapping holds {addr:#x}");
        }
    }
}
