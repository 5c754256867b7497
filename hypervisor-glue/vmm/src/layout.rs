//! Guest-physical memory map of `vrdma-vmm` (x86_64).
//!
//! ```text
//! 0x0000_0500  GDT                    0x0000_9000  PML4
//! 0x0000_0520  IDT (empty)            0x0000_a000  PDPT
//! 0x0000_7000  boot_params (zero page) 0x0000_b000  4 page directories (identity map 0..4 GiB)
//! 0x0000_8ff0  boot stack top         0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA .. 0x0010_0000: reserved; ACPI tables at 0x000e_0000 (RSDP first)
//! 0x0010_0000  kernel (bzImage protected-mode part / ELF segments), then RAM
//!              initrd at the top of low RAM
//! 0xc000_0000  MMIO gap (3 GiB .. 4 GiB): vrdma windows at 0xd000_0000 + i * 4 KiB,
//!              IOAPIC 0xfec0_0000, LAPIC 0xfee0_0000
//! 0x1_0000_0000 RAM above 3 GiB, if any
//! ```

/// GDT.
pub const GDT: u64 = 0x500;
/// IDT (one empty entry).
pub const IDT: u64 = 0x520;
/// The zero page (`struct boot_params`).
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Page map level 4.
pub const PML4: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPT: u64 = 0xa000;
/// First of the four page directories (2 MiB pages, identity map of 0..4 GiB).
pub const PD: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE: u64 = 0x2_0000;
/// Maximum command line length including the NUL.
pub const CMDLINE_MAX: usize = 4096;
/// Start of the EBDA: RAM below it is usable.
pub const EBDA: u64 = 0x9_fc00;
/// RSDP and the other ACPI tables (in the reserved BIOS area).
pub const ACPI_START: u64 = 0xe_0000;
/// End of the area reserved for ACPI tables.
pub const ACPI_END: u64 = 0x10_0000;
/// The x86 reset vector (F000:FFF0), where a BIOS would start.
pub const RESET_VECTOR: u64 = 0xf_fff0;
/// Where the kernel is loaded, and the start of high RAM.
pub const HIMEM: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Base of the first vrdma virtio-mmio window.
pub const VRDMA_MMIO_BASE: u64 = 0xd000_0000;
/// IOAPIC registers.
pub const IOAPIC: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const LAPIC: u64 = 0xfee0_0000;
/// TSS address for `KVM_SET_TSS_ADDRESS` (three pages just below the IOAPIC window's end of
/// usable space, as other VMMs do).
pub const KVM_TSS: u64 = 0xfffb_d000;

/// COM1 I/O ports.
pub const COM1: u16 = 0x3f8;
/// COM1 interrupt (ISA IRQ 4 = GSI 4, edge-triggered).
pub const COM1_GSI: u32 = 4;
/// First GSI of the vrdma devices: GSIs 16..=23 are IOAPIC-only pins, free of ISA defaults.
pub const VRDMA_FIRST_GSI: u32 = 16;
/// Maximum number of vrdma devices (one IOAPIC pin each: 16..=23).
pub const MAX_VRDMA: u32 = 8;
/// ACPI sleep control register (hardware-reduced ACPI), an I/O port.
pub const SLEEP_CONTROL_PORT: u16 = 0x3c0;
/// ACPI sleep status register, an I/O port.
pub const SLEEP_STATUS_PORT: u16 = 0x3c1;
/// i8042 command port: writing 0xfe resets the machine.
pub const I8042_COMMAND: u16 = 0x64;
/// PCI reset control register: writing with bit 2 set resets the machine.
pub const RESET_CONTROL: u16 = 0xcf9;
/// Value the FADT tells the guest to write to [`RESET_CONTROL`] to reset.
pub const RESET_VALUE: u8 = 0x06;

/// Smallest guest memory `vrdma-vmm` accepts.
pub const MIN_MEMORY: u64 = 64 << 20;
/// Largest guest memory `vrdma-vmm` accepts.
pub const MAX_MEMORY: u64 = 64 << 30;
/// Maximum number of vCPUs (APIC IDs below the IOAPIC's, one MADT entry each).
pub const MAX_VCPUS: u8 = 32;

/// The vrdma window of device `i`.
pub fn vrdma_window(i: u32) -> u64 {
    VRDMA_MMIO_BASE + u64::from(i) * vrdma_glue::mmio::MMIO_WINDOW_SIZE
}

/// The RAM regions for `size` bytes: below the MMIO gap, and the rest above 4 GiB.
pub fn ram_regions(size: u64) -> Vec<(u64, u64)> {
    let low = size.min(MMIO_GAP_START);
    let mut v = vec![(0, low)];
    if size > low {
        v.push((MMIO_GAP_END, size - low));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions() {
        assert_eq!(ram_regions(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(ram_regions(3 << 30), vec![(0, 3 << 30)]);
        assert_eq!(
            ram_regions(4 << 30),
            vec![(0, 3 << 30), (MMIO_GAP_END, 1 << 30)]
        );
    }

    #[test]
    fn windows_fit_the_gap() {
        let last = vrdma_window(MAX_VRDMA - 1) + vrdma_glue::mmio::MMIO_WINDOW_SIZE;
        assert!(VRDMA_MMIO_BASE >= MMIO_GAP_START && last <= IOAPIC);
    }
}
