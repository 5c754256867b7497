//! Interrupt delivery from the device to the guest.

use std::io;

use vmm_sys_util::eventfd::EventFd;

/// Why the device interrupts the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptKind {
    /// A used-buffer notification for the given virtqueue.
    Queue(u16),
    /// The configuration space changed.
    Config,
}

/// Raises guest interrupts. Implemented by transports (virtio-mmio sets its interrupt status
/// register, then signals an irqfd).
pub trait Interrupt: Send + Sync {
    /// Raises the interrupt.
    fn trigger(&self, kind: InterruptKind) -> io::Result<()>;
}

/// An [`Interrupt`] that writes to one [`EventFd`] (an irqfd under KVM).
#[derive(Debug)]
pub struct EventFdInterrupt {
    evt: EventFd,
}

impl EventFdInterrupt {
    /// Wraps an eventfd.
    pub fn new(evt: EventFd) -> Self {
        Self { evt }
    }

    /// The eventfd written on every interrupt.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

impl Interrupt for EventFdInterrupt {
    fn trigger(&self, _kind: InterruptKind) -> io::Result<()> {
        self.evt.write(1)
    }
}
