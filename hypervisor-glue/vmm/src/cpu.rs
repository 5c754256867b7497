//! vCPU configuration: CPUID, MSRs, local APIC LINT pins, and the 64-bit boot state of the
//! boot vCPU (the other vCPUs wait for INIT/SIPI in the in-kernel local APIC).

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs};
use kvm_ioctls::VcpuFd;

use crate::boot::{gdt_entry, BOOT_GDT};
use crate::layout::*;
use crate::vmm::Error;

const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default memory type write-back: without it Linux maps RAM uncached.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;
const MISC_ENABLE_FAST_STRING: u64 = 1;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn kerr(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> Error {
    move |e| Error::Kvm(what, e)
}

/// Adjusts the host-supported CPUID for vCPU `id` of `count`.
pub fn cpuid_for(base: &CpuId, id: u8, count: u8) -> CpuId {
    let mut c = base.clone();
    for e in c.as_mut_slice() {
        match e.function {
            1 => {
                // APIC ID, logical processor count, CLFLUSH line size (8 × 8 bytes).
                e.ebx = (u32::from(id) << 24) | (u32::from(count) << 16) | (8 << 8);
                e.ecx |= 1 << 31; // running on a hypervisor
                if count > 1 {
                    e.edx |= 1 << 28; // HTT: the count field is valid
                }
            }
            0xb | 0x1f => e.edx = u32::from(id), // x2APIC ID
            _ => {}
        }
    }
    c
}

/// Configures vCPU `id`: CPUID, MSRs, LAPIC LINT0/LINT1.
pub fn configure(vcpu: &VcpuFd, cpuid: &CpuId, id: u8, count: u8) -> Result<(), Error> {
    vcpu.set_cpuid2(&cpuid_for(cpuid, id, count))
        .map_err(kerr("KVM_SET_CPUID2"))?;
    let msrs = Msrs::from_entries(&[
        kvm_msr_entry {
            index: MSR_IA32_MISC_ENABLE,
            data: MISC_ENABLE_FAST_STRING,
            ..Default::default()
        },
        kvm_msr_entry {
            index: MSR_MTRR_DEF_TYPE,
            data: MTRR_ENABLE_WB,
            ..Default::default()
        },
    ])
    .map_err(|e| Error::Boot(format!("MSR list: {e:?}")))?;
    let n = vcpu.set_msrs(&msrs).map_err(kerr("KVM_SET_MSRS"))?;
    if n != 2 {
        return Err(Error::Boot(format!("KVM_SET_MSRS set {n} of 2 MSRs")));
    }
    // LINT0: ExtINT (the PIC), LINT1: NMI, as a BIOS leaves them.
    let mut lapic = vcpu.get_lapic().map_err(kerr("KVM_GET_LAPIC"))?;
    for (off, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[off + i] as u8);
        let v = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(kerr("KVM_SET_LAPIC"))?;
    Ok(())
}

fn segment(entry: u64, index: u16) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit,
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Puts the boot vCPU in 64-bit mode at `entry` with `rsi` = the zero page (Linux 64-bit boot
/// protocol).
pub fn setup_boot_vcpu(vcpu: &VcpuFd, entry: u64) -> Result<(), Error> {
    let mut sregs = vcpu.get_sregs().map_err(kerr("KVM_GET_SREGS"))?;
    let gdt: Vec<u64> = BOOT_GDT
        .iter()
        .map(|&(f, b, l)| gdt_entry(f, b, l))
        .collect();
    let code = segment(gdt[1], 1);
    let data = segment(gdt[2], 2);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(gdt[3], 3);
    sregs.gdt.base = GDT;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = IDT;
    sregs.idt.limit = 7;
    sregs.cr3 = PML4;
    sregs.cr4 |= 0x20; // PAE
    sregs.cr0 |= 0x8000_0001; // PG | PE
    sregs.efer |= 0x500; // LMA | LME
    vcpu.set_sregs(&sregs).map_err(kerr("KVM_SET_SREGS"))?;

    let regs = kvm_regs {
        rflags: 2,
        rip: entry,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: ZERO_PAGE,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kerr("KVM_SET_REGS"))?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kerr("KVM_SET_FPU"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_from_the_boot_gdt() {
        let code = segment(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!((code.selector, code.l, code.db, code.present), (8, 1, 0, 1));
        assert_eq!((code.type_, code.s, code.limit), (0xb, 1, 0xffff_ffff));
        let data = segment(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!(
            (data.selector, data.l, data.db, data.type_),
            (0x10, 0, 1, 3)
        );
        let tss = segment(gdt_entry(0x808b, 0, 0xfffff), 3);
        assert_eq!(
            (tss.selector, tss.s, tss.type_, tss.unusable),
            (0x18, 0, 0xb, 0)
        );
    }

    #[test]
    fn cpuid_identifies_each_vcpu() {
        let mut base = CpuId::new(2).unwrap();
        base.as_mut_slice()[0].function = 1;
        base.as_mut_slice()[1].function = 0xb;
        let c = cpuid_for(&base, 3, 4);
        assert_eq!(c.as_slice()[0].ebx >> 24, 3);
        assert_eq!((c.as_slice()[0].ebx >> 16) & 0xff, 4);
        assert_ne!(c.as_slice()[0].edx & (1 << 28), 0);
        assert_eq!(c.as_slice()[1].edx, 3);
    }
}
