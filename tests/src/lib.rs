//! Test and benchmark harness: guests built from real parts.
//!
//! A [`Vm`] is what a VMM would assemble for one guest: its guest memory, a [`Vrdma`] device
//! attached to a shared soft fabric, and the virtio-mmio transport in front of it. The guest side
//! is the real test guest driver (`vrdma-guest`), which reaches the device only through
//! [`MmioPort`]: MMIO register reads/writes (as an MMIO exit would deliver them) and the
//! transport's interrupt eventfd (as an irqfd would). Nothing is mocked.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use vm_memory::GuestAddress;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub mod perf;
use vrdma_device::soft::SoftFabric;
use vrdma_device::{DeviceConfig, GuestMemoryMmap, Vrdma};
use vrdma_glue::MmioTransport;

/// The guest's view of its device: the MMIO window and the interrupt line.
pub struct MmioPort {
    transport: Arc<MmioTransport>,
    irq: EventFd,
    epoll: Epoll,
}

impl MmioPort {
    /// Wraps a transport; the interrupt is the transport's eventfd.
    pub fn new(transport: Arc<MmioTransport>) -> std::io::Result<Self> {
        let irq = transport.irq_evt().try_clone()?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            irq.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 0),
        )?;
        Ok(Self {
            transport,
            irq,
            epoll,
        })
    }
}

impl vrdma_guest::Transport for MmioPort {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.transport.read(offset, data)
    }

    fn write(&self, offset: u64, data: &[u8]) {
        self.transport.write(offset, data)
    }

    fn wait_interrupt(&self, timeout: Duration) -> bool {
        // virtio-mmio interrupts are level-triggered: a pending status counts as fired.
        if self.transport.interrupt_status() != 0 {
            let _ = self.irq.read();
            return true;
        }
        let mut ev = [EpollEvent::default()];
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        match self.epoll.wait(ms, &mut ev) {
            Ok(n) if n > 0 => {
                let _ = self.irq.read();
                true
            }
            _ => self.transport.interrupt_status() != 0,
        }
    }
}

/// One guest: memory, device, transport.
pub struct Vm {
    /// Guest memory.
    pub mem: Arc<GuestMemoryMmap>,
    /// The device.
    pub device: Arc<Vrdma>,
    /// The virtio-mmio transport.
    pub transport: Arc<MmioTransport>,
}

/// Guest RAM size of harness guests.
pub const GUEST_RAM: u64 = 256 << 20;
/// Where the guest driver's allocator starts (below is left to "the guest kernel").
pub const ALLOC_BASE: u64 = 1 << 20;

impl Vm {
    /// A guest with `GUEST_RAM` of memory and a device with GID `gid_for_id(id)` on `fabric`.
    pub fn new(fabric: &Arc<SoftFabric>, id: u32) -> Self {
        Self::with_config(fabric, DeviceConfig::with_gid(DeviceConfig::gid_for_id(id)))
    }

    /// A guest with a device of the given configuration.
    pub fn with_config(fabric: &Arc<SoftFabric>, cfg: DeviceConfig) -> Self {
        let mem = Arc::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), GUEST_RAM as usize)])
                .expect("guest memory"),
        );
        let device = Vrdma::new(cfg, fabric).expect("device");
        let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let transport = Arc::new(MmioTransport::new(device.clone(), mem.clone(), irq));
        Self {
            mem,
            device,
            transport,
        }
    }

    /// The guest's MMIO port, for the driver.
    pub fn port(&self) -> MmioPort {
        MmioPort::new(self.transport.clone()).expect("mmio port")
    }
}
