//! The guest's ACPI tables: RSDP → XSDT → FADT (→ DSDT) and MADT.
//!
//! Hardware-reduced ACPI (no PM blocks, no SCI), as Firecracker and Cloud Hypervisor do:
//! * FADT: `HW_REDUCED_ACPI`; a reset register (port 0xcf9) so that reboots and panics stop
//!   the VMM at once; no VGA, no CMOS RTC, no i8042 (Linux skips probing them); the
//!   sleep control/status registers are I/O ports so that `\_S5` powers the VM off.
//! * MADT: one local APIC per vCPU and the IOAPIC (GSI base 0). No interrupt source overrides:
//!   ISA IRQ n is GSI n, matching KVM's default routing.
//! * DSDT: one `LNRO0005` device per vrdma virtio-mmio window (`vrdma_glue::acpi`), COM1 and
//!   `\_S5`. COM1 must be described: with hardware-reduced ACPI Linux assumes no 8259 PIC and
//!   maps no ISA IRQs by default, so the legacy serial port would get no interrupt (the console
//!   then prints kernel messages, which are polled, but never user-space output).

use vrdma_glue::acpi::{aml, resource, rsdp, virtio_mmio_device, Sdt};

use crate::layout::*;

/// A virtio-mmio device to describe.
#[derive(Clone, Copy, Debug)]
pub struct MmioDeviceInfo {
    /// Window base.
    pub base: u64,
    /// Window length.
    pub len: u64,
    /// Its GSI.
    pub gsi: u32,
}

/// Generic Address Structure for a byte-wide I/O port.
fn gas_io_port(port: u16) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // system I/O
    g[1] = 8; // register bit width
    g[2] = 0; // bit offset
    g[3] = 1; // access size: byte
    g[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

fn dsdt(devices: &[MmioDeviceInfo]) -> Vec<u8> {
    let mut t = Sdt::new(*b"DSDT", 2);
    let devs: Vec<Vec<u8>> = devices
        .iter()
        .enumerate()
        .map(|(i, d)| virtio_mmio_device(i as u32, d.base, d.len, d.gsi))
        .collect();
    let mut devs = devs;
    devs.push(aml::device(
        "COM1",
        &[
            aml::name("_HID", &aml::string("PNP0501")),
            aml::name("_UID", &aml::integer(0)),
            aml::name(
                "_CRS",
                &resource::template(&[
                    resource::io_port(COM1, 8),
                    resource::interrupt(COM1_GSI, resource::Trigger::Edge),
                ]),
            ),
        ],
    ));
    t.append(&aml::scope("\\_SB", &devs));
    // \_S5: SLP_TYPa = SLP_TYPb = 5, written to the sleep control register to power off.
    t.append(&aml::name(
        "_S5",
        &aml::package(&[aml::integer(5), aml::integer(5)]),
    ));
    t.finish()
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    const FADT_LEN: usize = 276;
    let mut t = Sdt::new(*b"FACP", 6);
    t.write_at(FADT_LEN - 1, &[0]);
    t.write_at(40, &(dsdt_addr as u32).to_le_bytes()); // DSDT
                                                       // IAPC_BOOT_ARCH: VGA not present (bit 2), CMOS RTC not present (bit 5); no 8042 (bit 1).
    t.write_at(109, &((1u16 << 2) | (1 << 5)).to_le_bytes());
    // Flags: RESET_REG_SUP (bit 10), HW_REDUCED_ACPI (bit 20).
    t.write_at(112, &((1u32 << 10) | (1 << 20)).to_le_bytes());
    // RESET_REG and RESET_VALUE: writing 6 to port 0xcf9 resets (the VMM stops).
    t.write_at(116, &gas_io_port(RESET_CONTROL));
    t.write_at(128, &[RESET_VALUE]);
    t.write_at(131, &[5]); // FADT minor version (ACPI 6.5)
    t.write_at(140, &dsdt_addr.to_le_bytes()); // X_DSDT
    t.write_at(244, &gas_io_port(SLEEP_CONTROL_PORT));
    t.write_at(256, &gas_io_port(SLEEP_STATUS_PORT));
    t.write_at(268, b"VRDMAVMM"); // hypervisor vendor identity
    t.finish()
}

fn madt(vcpus: u8) -> Vec<u8> {
    let mut t = Sdt::new(*b"APIC", 5);
    t.append(&(LAPIC as u32).to_le_bytes());
    t.append(&1u32.to_le_bytes()); // PCAT_COMPAT: dual 8259s present (KVM's PIC)
    for id in 0..vcpus {
        // Processor local APIC: UID, APIC ID, enabled.
        t.append(&[0, 8, id, id]);
        t.append(&1u32.to_le_bytes());
    }
    // I/O APIC: ID (after the CPUs'), reserved, address, GSI base.
    t.append(&[1, 12, vcpus, 0]);
    t.append(&(IOAPIC as u32).to_le_bytes());
    t.append(&0u32.to_le_bytes());
    t.finish()
}

/// The tables, laid out from [`ACPI_START`]: `(address, bytes)` pairs, RSDP first.
pub fn tables(vcpus: u8, devices: &[MmioDeviceInfo]) -> Vec<(u64, Vec<u8>)> {
    let align = |a: u64| (a + 15) & !15;
    let rsdp_addr = ACPI_START;
    let xsdt_addr = align(rsdp_addr + 36);
    let xsdt_len = Sdt::HEADER_LEN as u64 + 2 * 8;
    let dsdt_addr = align(xsdt_addr + xsdt_len);
    let dsdt = dsdt(devices);
    let fadt_addr = align(dsdt_addr + dsdt.len() as u64);
    let fadt = fadt(dsdt_addr);
    let madt_addr = align(fadt_addr + fadt.len() as u64);
    let madt = madt(vcpus);
    let mut xsdt = Sdt::new(*b"XSDT", 1);
    xsdt.append(&fadt_addr.to_le_bytes());
    xsdt.append(&madt_addr.to_le_bytes());
    let xsdt = xsdt.finish();
    debug_assert_eq!(xsdt.len() as u64, xsdt_len);
    let end = madt_addr + madt.len() as u64;
    assert!(end <= ACPI_END, "ACPI tables overflow their area");
    vec![
        (rsdp_addr, rsdp(xsdt_addr)),
        (xsdt_addr, xsdt),
        (dsdt_addr, dsdt),
        (fadt_addr, fadt),
        (madt_addr, madt),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
    }

    #[test]
    fn tables_are_consistent() {
        let devs = [
            MmioDeviceInfo {
                base: vrdma_window(0),
                len: 0x1000,
                gsi: 16,
            },
            MmioDeviceInfo {
                base: vrdma_window(1),
                len: 0x1000,
                gsi: 17,
            },
        ];
        let t = tables(2, &devs);
        let find = |sig: &[u8]| t.iter().find(|(_, b)| &b[..sig.len()] == sig).unwrap();
        let (rsdp_addr, r) = find(b"RSD PTR ");
        assert_eq!(*rsdp_addr, ACPI_START);
        let xsdt_addr = u64::from_le_bytes(r[24..32].try_into().unwrap());
        let (xa, x) = find(b"XSDT");
        assert_eq!(*xa, xsdt_addr);
        let (fa, f) = find(b"FACP");
        let (ma, m) = find(b"APIC");
        let (da, d) = find(b"DSDT");
        assert_eq!(u64::from_le_bytes(x[36..44].try_into().unwrap()), *fa);
        assert_eq!(u64::from_le_bytes(x[44..52].try_into().unwrap()), *ma);
        assert_eq!(f.len(), 276);
        assert_eq!(u64::from_le_bytes(f[140..148].try_into().unwrap()), *da);
        assert_eq!(
            u32::from_le_bytes(f[112..116].try_into().unwrap()),
            (1 << 10) | (1 << 20)
        );
        assert_eq!(f[128], RESET_VALUE);
        for (_, b) in &t[1..] {
            assert_eq!(sum(b), 0);
            assert_eq!(
                u32::from_le_bytes(b[4..8].try_into().unwrap()) as usize,
                b.len()
            );
        }
        // Two LNRO0005 devices, two local APICs.
        let hid = b"LNRO0005";
        assert_eq!(d.windows(hid.len()).filter(|w| w == hid).count(), 2);
        assert_eq!(d.windows(7).filter(|w| w == b"PNP0501").count(), 1);
        assert_eq!(m.len(), 36 + 8 + 2 * 8 + 12);
        // Tables do not overlap.
        let mut spans: Vec<(u64, u64)> = t.iter().map(|(a, b)| (*a, *a + b.len() as u64)).collect();
        spans.sort();
        assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0));
    }
}
