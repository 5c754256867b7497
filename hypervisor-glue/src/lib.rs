//! Hypervisor glue for vrdma: the virtio-mmio transport that exposes a
//! [`vrdma_device::Vrdma`] device (virtio device ID 42) to a guest, an MMIO bus to dispatch
//! exits ([`bus`]), the KVM wiring — memory slots, ioeventfds, irqfd with resample, event-manager
//! subscriber ([`kvm`]) — and the ACPI description of virtio-mmio devices ([`acpi`]).
//!
//! # Why virtio-mmio
//!
//! The target VMMs (rust-vmm based, Firecracker-like) have no PCI bus, so the device is
//! exposed through the virtio-mmio transport, modern layout only (`Version` = 2, virtio 1.x
//! section 4.2.2; the legacy version-1 layout with `QueuePFN` is not implemented). The guest is
//! an L2 Debian guest that discovers devices through ACPI rather than the kernel command line
//! (`virtio_mmio.device=`) or a device tree, so every virtio-mmio device must also be described
//! in the DSDT as an `LNRO0005` device with its MMIO window and interrupt (`_CRS`):
//! [`acpi::virtio_mmio_device`] generates that AML.
//!
//! # Wiring it into a VMM
//!
//! [`MmioTransport`] has no KVM dependency: it is a plain register file that can be driven
//! equally by a VMM's MMIO-exit handler and by in-process tests that play the guest.
//!
//! 1. Allocate a [`mmio::MMIO_WINDOW_SIZE`] (4 KiB) window in guest physical space and a GSI.
//! 2. Create the device and an [`EventFd`](vmm_sys_util::eventfd::EventFd) for its interrupt,
//!    register that eventfd with KVM as an irqfd for the GSI (`KVM_IRQFD`), and build the
//!    transport with [`MmioTransport::new`]. virtio-mmio interrupts are level-triggered in
//!    principle: with a resample fd, re-signal the irqfd when it fires while
//!    [`MmioTransport::interrupt_status`] is still non-zero.
//! 3. On every MMIO exit inside the window, call [`MmioTransport::read`] or
//!    [`MmioTransport::write`] with the offset relative to the window base. Both take `&self`
//!    and can be called concurrently from several vCPU threads.
//! 4. Fast path: register one ioeventfd per queue at `base + `[`mmio::regs::QUEUE_NOTIFY`]
//!    with a 4-byte datamatch on the queue index, and call [`MmioTransport::queue_notify`] from
//!    the event loop when it fires, instead of taking an MMIO exit for every notification.
//!    [`kvm::MmioEvents`] and [`kvm::wire_mmio_device`] do exactly this (steps 2 and 4).
//!
//! Queue notifications are processed synchronously in the calling thread (the vCPU thread for
//! an MMIO exit).
#![deny(missing_docs)]

pub mod acpi;
pub mod bus;
pub mod kvm;
pub mod memory;
pub mod mmio;

pub use bus::{BusDevice, MmioBus};
pub use kvm::{IrqMode, MmioEvents};
pub use mmio::{MmioTransport, VENDOR_ID};
