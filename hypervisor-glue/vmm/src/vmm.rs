//! Building the VM and running it.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;

use event_manager::{EventManager, EventSubscriber, SubscriberOps};
use kvm_bindings::{
    kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, KVM_SYSTEM_EVENT_CRASH,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use thiserror::Error;
use tracing::{debug, error, info, warn};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vrdma_device::soft::wire::{gid_from_ip, WireConfig};
use vrdma_device::soft::SoftFabric;
use vrdma_device::{DeviceConfig, GuestMemoryMmap, Vrdma};
use vrdma_glue::kvm::{register_guest_memory, wire_mmio_device, KvmError};
use vrdma_glue::mmio::MMIO_WINDOW_SIZE;
use vrdma_glue::{MmioBus, MmioEvents, MmioTransport};

use crate::acpi::{self, MmioDeviceInfo};
use crate::boot;
use crate::cpu;
use crate::devices::{Console, ExitEvent, ExitReason, ExitWatcher, IrqTrigger, PortIo, StdinInput};
use crate::layout::*;
use crate::Args;

/// Everything that can stop the VMM before or while it runs.
#[derive(Debug, Error)]
pub enum Error {
    /// Bad command-line values.
    #[error("{0}")]
    Config(String),
    /// The kernel image.
    #[error("kernel {path}: {1}", path = .0.display())]
    Kernel(PathBuf, String),
    /// The initrd.
    #[error("initrd {path}: {1}", path = .0.display())]
    Initrd(PathBuf, String),
    /// The command line.
    #[error("kernel command line: {0}")]
    Cmdline(String),
    /// Boot state (zero page, page tables, ...).
    #[error("boot setup: {0}")]
    Boot(String),
    /// `/dev/kvm` cannot be used.
    #[error("cannot use /dev/kvm: {0} (is KVM available here? load kvm_intel or kvm_amd, and check the permissions of /dev/kvm)")]
    NoKvm(kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("{0}: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    /// Glue wiring.
    #[error("device wiring: {0}")]
    Wiring(#[from] KvmError),
    /// Guest memory.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The vrdma device.
    #[error("vrdma device: {0}")]
    Device(String),
    /// Host I/O.
    #[error("{0}: {1}")]
    Io(&'static str, io::Error),
}

fn kerr(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> Error {
    move |e| Error::Kvm(what, e)
}

/// Checks the options before touching KVM, so that mistakes get clear messages.
pub fn validate(args: &Args) -> Result<(), Error> {
    if args.memory < MIN_MEMORY || args.memory > MAX_MEMORY {
        return Err(Error::Config(format!(
            "--memory {} MiB is out of range ({} MiB ..= {} GiB)",
            args.memory >> 20,
            MIN_MEMORY >> 20,
            MAX_MEMORY >> 30
        )));
    }
    if !args.memory.is_multiple_of(2 << 20) {
        return Err(Error::Config(format!(
            "--memory must be a multiple of 2 MiB (got {} bytes)",
            args.memory
        )));
    }
    if args.vcpus == 0 || args.vcpus > MAX_VCPUS {
        return Err(Error::Config(format!(
            "--vcpus {} is out of range (1..={MAX_VCPUS})",
            args.vcpus
        )));
    }
    if args.vrdma > MAX_VRDMA {
        return Err(Error::Config(format!(
            "--vrdma {} is out of range (0..={MAX_VRDMA}: one IOAPIC pin each)",
            args.vrdma
        )));
    }
    let file = |p: &Path, what: fn(PathBuf, String) -> Error| -> Result<(), Error> {
        match std::fs::metadata(p) {
            Ok(m) if m.is_file() => Ok(()),
            Ok(_) => Err(what(p.into(), "not a regular file".into())),
            Err(e) => Err(what(p.into(), e.to_string())),
        }
    };
    file(&args.kernel, Error::Kernel)?;
    if let Some(initrd) = &args.initrd {
        file(initrd, Error::Initrd)?;
    }
    if args.cmdline.len() >= CMDLINE_MAX {
        return Err(Error::Cmdline(format!(
            "{} bytes is too long (max {})",
            args.cmdline.len(),
            CMDLINE_MAX - 1
        )));
    }
    Ok(())
}

/// Builds the VM, runs it until the guest powers off or resets, and returns the exit code.
pub fn run(args: &Args) -> Result<u8, Error> {
    validate(args)?;
    let kvm = Kvm::new().map_err(Error::NoKvm)?;
    let vm = kvm.create_vm().map_err(Error::NoKvm)?;

    // Memory.
    let ram = ram_regions(args.memory);
    let ranges: Vec<(GuestAddress, usize)> = ram
        .iter()
        .map(|&(a, l)| (GuestAddress(a), l as usize))
        .collect();
    let mem =
        Arc::new(GuestMemoryMmap::from_ranges(&ranges).map_err(|e| Error::Memory(e.to_string()))?);
    // Transparent huge pages if asked (rings and buffers of many QPs outgrow the TLB's reach
    // with 4 KiB pages); advice only, so a refusal is not fatal.
    if args.huge_pages {
        if let Err(e) = vrdma_glue::memory::advise_huge_pages(&mem) {
            tracing::warn!("guest memory without huge pages: {e}");
        }
    }
    // KVM keeps pointers into the mapping until the process exits.
    std::mem::forget(mem.clone());
    register_guest_memory(&vm, &mem, 0)?;

    // Platform: TSS, in-kernel PIC/IOAPIC/LAPICs, PIT.
    vm.set_tss_address(KVM_TSS as usize)
        .map_err(kerr("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip().map_err(kerr("KVM_CREATE_IRQCHIP"))?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(kerr("KVM_CREATE_PIT2"))?;

    // Devices.
    let fabric = SoftFabric::new();
    let mut bus = MmioBus::new();
    let mut subscribers: Vec<Arc<dyn EventSubscriber + Send + Sync>> = Vec::new();
    let mut described = Vec::new();
    let mut gateways = Vec::new();
    for i in 0..args.vrdma {
        let (base, gsi) = (vrdma_window(i), VRDMA_FIRST_GSI + i);
        let gid = match args.roce_addr.get(i as usize) {
            Some(&ip) => {
                let gw = fabric
                    .attach_wire(WireConfig::new(ip))
                    .map_err(|e| Error::Device(format!("RoCEv2 gateway on {ip}: {e}")))?;
                info!(device = i, %ip, "vrdma RoCEv2 gateway");
                gateways.push(gw);
                gid_from_ip(ip)
            }
            None => DeviceConfig::gid_for_id(i + 1),
        };
        let dev = Vrdma::new(DeviceConfig::with_gid(gid), &fabric)
            .map_err(|e| Error::Device(e.to_string()))?;
        let irq = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::Io("eventfd", e))?;
        let transport = Arc::new(MmioTransport::new(dev, mem.clone(), irq));
        let events =
            Arc::new(MmioEvents::new(transport.clone()).map_err(|e| Error::Io("eventfd", e))?);
        let mode = wire_mmio_device(&vm, &events, base, gsi)?;
        info!(device = i, base, gsi, ?mode, "vrdma virtio-mmio device");
        bus.insert(base, MMIO_WINDOW_SIZE, transport)
            .map_err(|e| Error::Device(e.to_string()))?;
        subscribers.push(events);
        described.push(MmioDeviceInfo {
            base,
            len: MMIO_WINDOW_SIZE,
            gsi,
        });
    }
    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::Io("eventfd", e))?;
    vm.register_irqfd(&serial_irq, COM1_GSI)
        .map_err(kerr("KVM_IRQFD (serial)"))?;
    let console: Arc<Mutex<Console>> = Arc::new(Mutex::new(Console::new(
        IrqTrigger(serial_irq),
        Box::new(io::stdout()),
    )));
    let exit = Arc::new(ExitEvent::new().map_err(|e| Error::Io("eventfd", e))?);
    let pio = Arc::new(PortIo {
        console: console.clone(),
        exit: exit.clone(),
    });
    subscribers.push(Arc::new(StdinInput { console }));
    subscribers.push(Arc::new(ExitWatcher { exit: exit.clone() }));

    // Boot state.
    let kernel = boot::load_kernel(&mem, &args.kernel)?;
    let cmdline_len = boot::load_command_line(&mem, &args.cmdline)?;
    let initrd = match &args.initrd {
        Some(p) => {
            let max = kernel
                .setup_header
                .map(|h| u64::from(h.initrd_addr_max))
                .filter(|&m| m != 0)
                .unwrap_or(0x7fff_ffff);
            Some(boot::load_initrd(&mem, p, kernel.end, ram[0].1, max)?)
        }
        None => None,
    };
    let tables = acpi::tables(args.vcpus, &described);
    for (addr, bytes) in &tables {
        mem.write_slice(bytes, GuestAddress(*addr))
            .map_err(|e| Error::Boot(format!("ACPI tables: {e}")))?;
    }
    boot::write_boot_params(&mem, &kernel, cmdline_len, initrd, ACPI_START, &ram)?;
    boot::write_page_tables(&mem)?;
    boot::write_gdt(&mem)?;
    boot::write_reset_stub(&mem)?;
    info!(
        entry = kernel.entry,
        initrd = ?initrd,
        vcpus = args.vcpus,
        memory_mib = args.memory >> 20,
        "booting"
    );

    // vCPUs.
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kerr("KVM_GET_SUPPORTED_CPUID"))?;
    let mut vcpus = Vec::new();
    for id in 0..args.vcpus {
        let vcpu = vm
            .create_vcpu(u64::from(id))
            .map_err(kerr("KVM_CREATE_VCPU"))?;
        cpu::configure(&vcpu, &cpuid, id, args.vcpus)?;
        if id == 0 {
            cpu::setup_boot_vcpu(&vcpu, kernel.entry)?;
        }
        vcpus.push(vcpu);
    }

    let mut em = EventManager::<Arc<dyn EventSubscriber + Send + Sync>>::new()
        .map_err(|e| Error::Io("event manager", io::Error::other(format!("{e:?}"))))?;
    for s in subscribers {
        em.add_subscriber(s);
    }

    let bus = Arc::new(bus);
    for (id, vcpu) in vcpus.into_iter().enumerate() {
        let (bus, pio, exit) = (bus.clone(), pio.clone(), exit.clone());
        thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || vcpu_loop(vcpu, id, &bus, &pio, &exit))
            .map_err(|e| Error::Io("spawning a vCPU thread", e))?;
    }

    while exit.reason() == ExitReason::Running {
        if let Err(e) = em.run() {
            warn!(error = ?e, "event loop");
        }
    }
    let _ = io::stdout().flush();
    // The VM, its vCPU threads and the devices live until the process exits.
    std::mem::forget(vm);
    let code = match exit.reason() {
        ExitReason::PowerOff | ExitReason::Reset | ExitReason::Running => 0,
        ExitReason::Error => 1,
    };
    eprintln!("vrdma-vmm: guest stopped ({:?})", exit.reason());
    Ok(code)
}

fn vcpu_loop(mut vcpu: VcpuFd, id: usize, bus: &MmioBus, pio: &PortIo, exit: &ExitEvent) {
    loop {
        let stop = match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                pio.read(port, data);
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                pio.write(port, data);
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !bus.read(addr, data) {
                    debug!(addr, len = data.len(), "MMIO read outside any device");
                }
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !bus.write(addr, data) {
                    debug!(addr, len = data.len(), "MMIO write outside any device");
                }
                None
            }
            Ok(VcpuExit::Hlt) => {
                info!(vcpu = id, "vCPU halted");
                Some(ExitReason::PowerOff)
            }
            Ok(VcpuExit::Shutdown) => {
                info!(vcpu = id, "guest shutdown (triple fault or reset)");
                Some(ExitReason::Reset)
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => Some(match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::PowerOff,
                KVM_SYSTEM_EVENT_RESET => ExitReason::Reset,
                KVM_SYSTEM_EVENT_CRASH => ExitReason::Error,
                _ => ExitReason::Error,
            }),
            Ok(VcpuExit::Intr) => None,
            Ok(VcpuExit::InternalError) => {
                // SAFETY: KVM_EXIT_INTERNAL_ERROR fills the `internal` member of the union.
                let (sub, n, data) = unsafe {
                    let i = &vcpu.get_kvm_run().__bindgen_anon_1.internal;
                    (i.suberror, i.ndata, i.data)
                };
                let n = (n as usize).min(data.len());
                error!(vcpu = id, suberror = sub, data = ?&data[..n], "KVM internal error");
                Some(ExitReason::Error)
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                error!(vcpu = id, reason, cpu, "KVM entry failed");
                Some(ExitReason::Error)
            }
            Ok(other) => {
                error!(vcpu = id, exit = ?other, "unhandled vCPU exit");
                Some(ExitReason::Error)
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => {
                if exit.reason() == ExitReason::Running {
                    error!(vcpu = id, error = %e, "KVM_RUN failed");
                }
                Some(ExitReason::Error)
            }
        };
        if let Some(reason) = stop {
            if reason == ExitReason::Error {
                eprintln!("vrdma-vmm: vCPU {id} stopped: see the log above");
            }
            exit.exit(reason);
            return;
        }
        if exit.reason() != ExitReason::Running {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> Args {
        let mut v = vec!["vrdma-vmm", "--kernel", "/proc/self/exe"];
        v.extend_from_slice(extra);
        let mut a = Args::try_parse_from(v).unwrap();
        // A regular file that surely exists.
        a.kernel = std::env::current_exe().unwrap();
        a
    }

    #[test]
    fn validation_errors_are_clear() {
        assert!(validate(&args(&[])).is_ok());
        let e = validate(&args(&["--memory", "16"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--memory 16 MiB is out of range"), "{e}");
        let e = validate(&args(&["--memory", "65M"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("multiple of 2 MiB"), "{e}");
        let e = validate(&args(&["--vcpus", "0"])).unwrap_err().to_string();
        assert!(e.contains("--vcpus 0 is out of range"), "{e}");
        let e = validate(&args(&["--vrdma", "9"])).unwrap_err().to_string();
        assert!(e.contains("--vrdma 9 is out of range"), "{e}");
        let mut a = args(&[]);
        a.kernel = "/no/such/kernel".into();
        let e = validate(&a).unwrap_err().to_string();
        assert!(e.starts_with("kernel /no/such/kernel: "), "{e}");
        let mut a = args(&[]);
        a.initrd = Some("/no/such/initrd".into());
        let e = validate(&a).unwrap_err().to_string();
        assert!(e.starts_with("initrd /no/such/initrd: "), "{e}");
        let mut a = args(&[]);
        a.kernel = "/tmp".into();
        assert!(validate(&a)
            .unwrap_err()
            .to_string()
            .contains("not a regular file"));
    }
}
