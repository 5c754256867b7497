//! KVM wiring for a virtio-mmio vrdma device: guest memory slots, ioeventfds for queue
//! notifications, an irqfd (with a resample fd) for the interrupt, and the event-manager
//! subscriber that services those eventfds.
//!
//! The pieces are deliberately small so that a Firecracker- or Cloud-Hypervisor-style VMM can
//! take the ones it needs (see `docs/embedding.md`):
//!
//! * [`register_guest_memory`] maps every region of a [`GuestMemoryMmap`] into a KVM VM.
//! * [`MmioEvents`] owns one eventfd per virtqueue and the interrupt resample eventfd, and is an
//!   [`event_manager::EventSubscriber`]: a queue eventfd firing becomes
//!   [`MmioTransport::queue_notify`]; the resample eventfd firing re-raises the interrupt while
//!   `InterruptStatus` is still non-zero.
//! * [`wire_mmio_device`] registers those eventfds with KVM for a window at `base` and a GSI.
//!
//! # Interrupts: level-triggered, with a resample fd
//!
//! A virtio-mmio interrupt line is level-triggered: it is asserted while `InterruptStatus` is
//! non-zero. KVM models this with `KVM_IRQFD_FLAG_RESAMPLE`: writing the irqfd asserts the GSI and
//! keeps it asserted; when the guest EOIs the interrupt, KVM de-asserts the line and signals the
//! resample eventfd. [`MmioEvents`] then checks `InterruptStatus`: if the device raised a new
//! interrupt that the guest has not acknowledged yet (set between the guest's read of
//! `InterruptStatus` and its EOI), it writes the irqfd again. No interrupt is lost and none is
//! injected twice for the same status. The GSI must be programmed level-triggered in the guest
//! (the ACPI description says so) and must be routed to the in-kernel IOAPIC.
//!
//! When KVM lacks `KVM_CAP_IRQFD_RESAMPLE`, [`wire_mmio_device`] falls back to a plain irqfd,
//! which KVM injects as a pulse (assert then de-assert). That is edge semantics, which is also
//! correct for virtio-mmio because the device writes the eventfd on every status change.

use std::io;
use std::sync::Arc;

use event_manager::{EventOps, EventSubscriber, Events};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Cap, IoEventAddress, VmFd};
use thiserror::Error;
use tracing::{debug, warn};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vrdma_device::GuestMemoryMmap;

use crate::mmio::regs;
use crate::MmioTransport;

/// Errors of the KVM wiring.
#[derive(Debug, Error)]
pub enum KvmError {
    /// `KVM_SET_USER_MEMORY_REGION` failed.
    #[error("KVM_SET_USER_MEMORY_REGION slot {slot} at {gpa:#x} (+{len:#x}): {err}")]
    MemorySlot {
        /// Slot number.
        slot: u32,
        /// Guest-physical base.
        gpa: u64,
        /// Length.
        len: u64,
        /// The KVM error.
        err: kvm_ioctls::Error,
    },
    /// `KVM_IOEVENTFD` failed.
    #[error("KVM_IOEVENTFD at {addr:#x} for queue {queue}: {err}")]
    IoEventFd {
        /// Address of the notification register.
        addr: u64,
        /// Queue index (the datamatch value).
        queue: u16,
        /// The KVM error.
        err: kvm_ioctls::Error,
    },
    /// `KVM_IRQFD` failed.
    #[error("KVM_IRQFD for GSI {gsi}: {err}")]
    IrqFd {
        /// The GSI.
        gsi: u32,
        /// The KVM error.
        err: kvm_ioctls::Error,
    },
    /// Creating or cloning an eventfd failed.
    #[error("eventfd: {0}")]
    EventFd(#[from] io::Error),
}

/// Registers every region of `mem` as a KVM memory slot, numbering slots from `first_slot`.
/// Returns the next free slot number.
///
/// `mem` must outlive the VM (or the slots must be removed before it is dropped): KVM keeps
/// pointers to its mappings.
pub fn register_guest_memory(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    first_slot: u32,
) -> Result<u32, KvmError> {
    let mut slot = first_slot;
    for region in mem.iter() {
        let gpa = region.start_addr().0;
        let len = region.len();
        let region_desc = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the host range is a live mmap owned by `mem`, `len` bytes long; the caller
        // keeps `mem` alive for as long as the VM uses the slot (documented above).
        unsafe { vm.set_user_memory_region(region_desc) }.map_err(|err| KvmError::MemorySlot {
            slot,
            gpa,
            len,
            err,
        })?;
        slot += 1;
    }
    Ok(slot)
}

/// The interrupt mode [`wire_mmio_device`] set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqMode {
    /// Level-triggered: irqfd with a resample eventfd (the default).
    LevelResample,
    /// Pulse (edge) irqfd: KVM has no `KVM_CAP_IRQFD_RESAMPLE`.
    Edge,
}

/// Event-manager data value of the resample eventfd (queue eventfds use their queue index).
const RESAMPLE_DATA: u32 = u32::MAX;

/// The eventfds of one virtio-mmio vrdma device and the event-manager subscriber that services
/// them.
///
/// * One eventfd per virtqueue. Registered with KVM as an ioeventfd on `QueueNotify` with the
///   queue index as 4-byte datamatch, it fires instead of an MMIO exit; the subscriber then calls
///   [`MmioTransport::queue_notify`] in the event-loop thread. Queue 1 (the event queue) is also
///   the doorbell, so doorbell kicks take this path too.
/// * One resample eventfd for the level-triggered interrupt (see the module documentation).
///
/// Fabric events (packets from other devices, retry and RNR timers) need no eventfd: the soft
/// fabric delivers them to the device on its own timer thread or in the sender's thread.
pub struct MmioEvents {
    transport: Arc<MmioTransport>,
    queue_evts: Vec<EventFd>,
    resample_evt: EventFd,
}

impl std::fmt::Debug for MmioEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioEvents")
            .field("queues", &self.queue_evts.len())
            .finish()
    }
}

impl MmioEvents {
    /// Creates the eventfds for `transport`'s queues.
    pub fn new(transport: Arc<MmioTransport>) -> io::Result<Self> {
        let nqueues = transport.device().queue_max_sizes().len();
        let queue_evts = (0..nqueues)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Self {
            transport,
            queue_evts,
            resample_evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// The transport these events drive.
    pub fn transport(&self) -> &Arc<MmioTransport> {
        &self.transport
    }

    /// One eventfd per virtqueue (index = queue index).
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The interrupt resample eventfd.
    pub fn resample_evt(&self) -> &EventFd {
        &self.resample_evt
    }

    /// Services queue `index`'s eventfd: drains it and notifies the device.
    pub fn handle_queue(&self, index: u16) {
        let Some(evt) = self.queue_evts.get(usize::from(index)) else {
            return;
        };
        match evt.read() {
            Ok(_) => self.transport.queue_notify(index),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => warn!(index, error = %e, "queue eventfd read failed"),
        }
    }

    /// Services the resample eventfd: the guest EOI'd the interrupt and KVM de-asserted the
    /// line. Re-assert it if the device has raised an interrupt the guest has not acknowledged.
    pub fn handle_resample(&self) {
        match self.resample_evt.read() {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => {
                warn!(error = %e, "resample eventfd read failed");
                return;
            }
        }
        if self.transport.interrupt_status() != 0 {
            if let Err(e) = self.transport.irq_evt().write(1) {
                warn!(error = %e, "failed to re-assert the interrupt");
            }
        }
    }
}

impl EventSubscriber for MmioEvents {
    fn process(&self, events: Events, ops: &mut EventOps) {
        if events
            .event_set()
            .intersects(EventSet::ERROR | EventSet::HANG_UP)
        {
            warn!(data = events.data(), "eventfd error, unregistering it");
            let _ = ops.remove(events);
            return;
        }
        match events.data() {
            RESAMPLE_DATA => self.handle_resample(),
            q => match u16::try_from(q) {
                Ok(q) => self.handle_queue(q),
                Err(_) => debug!(q, "unexpected event data"),
            },
        }
    }

    fn init(&self, ops: &mut EventOps) {
        for (i, evt) in self.queue_evts.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, i as u32, EventSet::IN)) {
                warn!(queue = i, error = ?e, "cannot watch queue eventfd");
            }
        }
        if let Err(e) = ops.add(Events::with_data(
            &self.resample_evt,
            RESAMPLE_DATA,
            EventSet::IN,
        )) {
            warn!(error = ?e, "cannot watch resample eventfd");
        }
    }
}

/// Registers `events`' eventfds with KVM for a virtio-mmio window at `base` whose interrupt is
/// `gsi`:
///
/// * an ioeventfd per queue on `base + QueueNotify`, 4-byte datamatch = queue index;
/// * the transport's interrupt eventfd as an irqfd for `gsi`, with `events`' resample eventfd
///   when KVM supports it (requires the in-kernel irqchip, `KVM_CREATE_IRQCHIP`).
///
/// MMIO exits for the rest of the window must still be dispatched to the transport (e.g.
/// through [`crate::bus::MmioBus`]); a notification that does not match a datamatch (another
/// width or an unknown index) also exits and is handled there.
pub fn wire_mmio_device(
    vm: &VmFd,
    events: &MmioEvents,
    base: u64,
    gsi: u32,
) -> Result<IrqMode, KvmError> {
    let notify = base + regs::QUEUE_NOTIFY;
    for (i, evt) in events.queue_evts.iter().enumerate() {
        let queue = i as u16;
        vm.register_ioevent(evt, &IoEventAddress::Mmio(notify), u32::from(queue))
            .map_err(|err| KvmError::IoEventFd {
                addr: notify,
                queue,
                err,
            })?;
    }
    let irq = events.transport.irq_evt();
    if vm.check_extension(Cap::IrqfdResample) {
        vm.register_irqfd_with_resample(irq, &events.resample_evt, gsi)
            .map_err(|err| KvmError::IrqFd { gsi, err })?;
        // An interrupt raised before the irqfd existed is still pending in the eventfd; KVM
        // consumes it on registration. A status set before that is covered by the first EOI.
        Ok(IrqMode::LevelResample)
    } else {
        vm.register_irqfd(irq, gsi)
            .map_err(|err| KvmError::IrqFd { gsi, err })?;
        Ok(IrqMode::Edge)
    }
}

/// Removes what [`wire_mmio_device`] registered (e.g. before the device is dropped while the VM
/// keeps running).
pub fn unwire_mmio_device(
    vm: &VmFd,
    events: &MmioEvents,
    base: u64,
    gsi: u32,
) -> Result<(), KvmError> {
    let notify = base + regs::QUEUE_NOTIFY;
    for (i, evt) in events.queue_evts.iter().enumerate() {
        let queue = i as u16;
        vm.unregister_ioevent(evt, &IoEventAddress::Mmio(notify), u32::from(queue))
            .map_err(|err| KvmError::IoEventFd {
                addr: notify,
                queue,
                err,
            })?;
    }
    vm.unregister_irqfd(events.transport.irq_evt(), gsi)
        .map_err(|err| KvmError::IrqFd { gsi, err })
}
