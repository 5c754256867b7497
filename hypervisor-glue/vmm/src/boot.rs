//! Loading the kernel, initrd and command line, and the 64-bit Linux boot protocol state:
//! boot_params (zero page) with the e820 map, identity page tables and a GDT.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};
use vrdma_device::GuestMemoryMmap;

use crate::layout::*;
use crate::vmm::Error;

/// `HdrS`: the setup header magic.
const HDR_MAGIC: u32 = 0x5372_6448;
/// `xloadflags` bit: the kernel has a 64-bit entry point at `code32_start + 0x200`.
const XLF_KERNEL_64: u16 = 1;
/// `type_of_loader`: undefined boot loader.
const LOADER_UNDEFINED: u8 = 0xff;
/// e820 types.
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// Where and how to start the kernel.
#[derive(Debug)]
pub struct Kernel {
    /// 64-bit entry point.
    pub entry: u64,
    /// First byte after the loaded image.
    pub end: u64,
    /// The bzImage setup header (None for ELF).
    pub setup_header: Option<setup_header>,
}

/// Loads a bzImage or an ELF vmlinux.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<Kernel, Error> {
    let mut f = File::open(path).map_err(|e| Error::Kernel(path.into(), e.to_string()))?;
    let mut magic = [0u8; 4];
    f.read_exact(&mut magic)
        .map_err(|e| Error::Kernel(path.into(), format!("cannot read: {e}")))?;
    let mut hdr = [0u8; 4];
    let is_bzimage = f.seek(SeekFrom::Start(0x202)).is_ok()
        && f.read_exact(&mut hdr).is_ok()
        && u32::from_le_bytes(hdr) == HDR_MAGIC;
    f.rewind()
        .map_err(|e| Error::Kernel(path.into(), e.to_string()))?;
    let bad = |e: linux_loader::loader::Error| Error::Kernel(path.into(), e.to_string());
    if is_bzimage {
        let r = BzImage::load(mem, None, &mut f, Some(GuestAddress(HIMEM))).map_err(bad)?;
        let h = r
            .setup_header
            .expect("bzImage loader returns the setup header");
        if h.xloadflags & XLF_KERNEL_64 == 0 {
            return Err(Error::Kernel(
                path.into(),
                "bzImage has no 64-bit entry point (xloadflags.XLF_KERNEL_64 clear)".into(),
            ));
        }
        Ok(Kernel {
            entry: r.kernel_load.0 + 0x200,
            end: r.kernel_end,
            setup_header: Some(h),
        })
    } else if magic == *b"\x7fELF" {
        let r = Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM))).map_err(bad)?;
        Ok(Kernel {
            entry: r.kernel_load.0,
            end: r.kernel_end,
            setup_header: None,
        })
    } else {
        Err(Error::Kernel(
            path.into(),
            "neither a bzImage nor an ELF image".into(),
        ))
    }
}

/// Loads the initrd at the top of low RAM (`low_end`; below `max_addr`, above the kernel). Returns its
/// address and size.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    low_end: u64,
    max_addr: u64,
) -> Result<(u64, u64), Error> {
    let err = |m: String| Error::Initrd(path.into(), m);
    let mut f = File::open(path).map_err(|e| err(e.to_string()))?;
    let size = f.metadata().map_err(|e| err(e.to_string()))?.len();
    let top = low_end.min(max_addr.saturating_add(1));
    let addr = top.checked_sub(size).map(|a| a & !0xfff);
    let addr = match addr {
        Some(a) if a >= kernel_end => a,
        _ => {
            return Err(err(format!(
                "{size} bytes do not fit between the kernel (ends at {kernel_end:#x}) and {top:#x}: give the guest more memory"
            )))
        }
    };
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(|e| err(e.to_string()))?;
    Ok((addr, size))
}

/// Writes the command line and returns its length (without the NUL).
pub fn load_command_line(mem: &GuestMemoryMmap, cmdline: &str) -> Result<usize, Error> {
    let cl = Cmdline::try_from(cmdline, CMDLINE_MAX).map_err(|e| Error::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE), &cl).map_err(|e| Error::Cmdline(e.to_string()))?;
    Ok(cmdline.len())
}

/// The e820 map for `ram` regions.
pub fn e820_map(ram: &[(u64, u64)]) -> Vec<boot_e820_entry> {
    let entry = |addr, size, type_| boot_e820_entry {
        addr,
        size,
        r#type: type_,
    };
    let mut v = Vec::new();
    for &(start, len) in ram {
        if start == 0 {
            v.push(entry(0, EBDA, E820_RAM));
            v.push(entry(EBDA, HIMEM - EBDA, E820_RESERVED));
            if len > HIMEM {
                v.push(entry(HIMEM, len - HIMEM, E820_RAM));
            }
        } else {
            v.push(entry(start, len, E820_RAM));
        }
    }
    v
}

/// Writes `boot_params` to the zero page.
#[allow(clippy::too_many_arguments)]
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    kernel: &Kernel,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
    rsdp: u64,
    ram: &[(u64, u64)],
) -> Result<(), Error> {
    let mut params = boot_params::default();
    let mut hdr = kernel.setup_header.unwrap_or_default();
    if kernel.setup_header.is_none() {
        hdr.header = HDR_MAGIC;
        hdr.boot_flag = 0xaa55;
        hdr.kernel_alignment = 0x0100_0000;
    }
    hdr.type_of_loader = LOADER_UNDEFINED;
    hdr.cmd_line_ptr = CMDLINE as u32;
    hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
        params.ext_ramdisk_image = (addr >> 32) as u32;
        params.ext_ramdisk_size = (size >> 32) as u32;
    }
    params.hdr = hdr;
    params.acpi_rsdp_addr = rsdp;
    let map = e820_map(ram);
    if map.len() > params.e820_table.len() {
        return Err(Error::Boot("too many e820 entries".into()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = *e;
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE))
        .map_err(|e| Error::Boot(format!("zero page: {e}")))
}

/// Identity-maps 0..4 GiB with 2 MiB pages (PML4 → PDPT → 4 page directories).
pub fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), Error> {
    let w = |v: u64, at: u64| {
        mem.write_obj(v, GuestAddress(at))
            .map_err(|e| Error::Boot(format!("page tables: {e}")))
    };
    w(PDPT | 0x03, PML4)?;
    for i in 0..4u64 {
        let pd = PD + i * 0x1000;
        w(pd | 0x03, PDPT + i * 8)?;
        for j in 0..512u64 {
            // Present, writable, 2 MiB page.
            w(((i * 512 + j) << 21) | 0x83, pd + j * 8)?;
        }
    }
    Ok(())
}

/// A stand-in for the firmware's reset code at the reset vector: `mov al, 6; mov dx, 0xcf9;
/// out dx, al; hlt; jmp $-3`. Linux's BIOS reboot method (used e.g. after a panic) drops to real
/// mode and jumps to F000:FFF0; with no firmware there the vCPU would spin for ever, with this it
/// writes the reset control register and the VMM stops.
pub const RESET_STUB: [u8; 9] = [0xb0, RESET_VALUE, 0xba, 0xf9, 0x0c, 0xee, 0xf4, 0xeb, 0xfd];

/// Writes [`RESET_STUB`] at the reset vector.
pub fn write_reset_stub(mem: &GuestMemoryMmap) -> Result<(), Error> {
    mem.write_slice(&RESET_STUB, GuestAddress(RESET_VECTOR))
        .map_err(|e| Error::Boot(format!("reset stub: {e}")))
}

/// A GDT descriptor from flags, base and limit (the classic encoding).
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0xffff)
}

/// The boot GDT: null, 64-bit code (0x08), data (0x10), TSS (0x18).
pub const BOOT_GDT: [(u16, u32, u32); 4] = [
    (0, 0, 0),
    (0xa09b, 0, 0xfffff),
    (0xc093, 0, 0xfffff),
    (0x808b, 0, 0xfffff),
];

/// Writes the GDT and an empty IDT.
pub fn write_gdt(mem: &GuestMemoryMmap) -> Result<(), Error> {
    for (i, &(flags, base, limit)) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(
            gdt_entry(flags, base, limit),
            GuestAddress(GDT + i as u64 * 8),
        )
        .map_err(|e| Error::Boot(format!("GDT: {e}")))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT))
        .map_err(|e| Error::Boot(format!("IDT: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_stub_targets_the_reset_register() {
        assert_eq!(
            u16::from_le_bytes([RESET_STUB[3], RESET_STUB[4]]),
            RESET_CONTROL
        );
        assert!(RESET_VECTOR + RESET_STUB.len() as u64 <= HIMEM);
    }

    #[test]
    fn gdt_encoding() {
        // Well-known values for a flat 64-bit code and data segment.
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(0x808b, 0, 0xfffff), 0x008f_8b00_0000_ffff);
    }

    #[test]
    fn e820_covers_ram_and_reserves_the_bios_area() {
        let m = e820_map(&ram_regions(4 << 30));
        // The entries are packed: copy fields out before comparing.
        let m: Vec<(u64, u64, u32)> = m
            .iter()
            .map(|e| ({ e.addr }, { e.size }, { e.r#type }))
            .collect();
        let ram: u64 = m.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        assert_eq!(ram, (4 << 30) - (HIMEM - EBDA));
        assert!(m
            .iter()
            .any(|e| e.2 == E820_RESERVED && e.0 <= ACPI_START && e.0 + e.1 >= ACPI_END));
        assert_eq!(m.last().unwrap().0, MMIO_GAP_END);
    }

    #[test]
    fn page_tables_identity_map() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_page_tables(&mem).unwrap();
        let r = |a: u64| mem.read_obj::<u64>(GuestAddress(a)).unwrap();
        assert_eq!(r(PML4), PDPT | 3);
        assert_eq!(r(PDPT + 3 * 8), (PD + 0x3000) | 3);
        // Last 2 MiB page below 4 GiB.
        assert_eq!(r(PD + 0x3000 + 511 * 8), (0xffe0_0000) | 0x83);
    }

    #[test]
    fn missing_and_bogus_kernels_are_clear_errors() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let e = load_kernel(&mem, Path::new("/nonexistent/vmlinuz")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/vmlinuz"), "{e}");
        let tmp = std::env::temp_dir().join(format!("vrdma-vmm-bogus-{}", std::process::id()));
        std::fs::write(&tmp, vec![0u8; 4096]).unwrap();
        let e = load_kernel(&mem, &tmp).unwrap_err();
        std::fs::remove_file(&tmp).unwrap();
        assert!(
            e.to_string().contains("neither a bzImage nor an ELF"),
            "{e}"
        );
    }
}
