//! virtio-mmio transport, modern register layout (`Version` = 2, virtio 1.x section 4.2.2).
//!
//! [`MmioTransport`] is the register file of one 4 KiB virtio-mmio window. The embedding VMM
//! calls [`MmioTransport::read`] / [`MmioTransport::write`] with offsets relative to the window
//! base; tests call them directly to play the guest.
//!
//! Every value written by the guest is untrusted: out-of-range selectors, invalid queue sizes,
//! misaligned ring addresses, wrong access widths, unknown offsets and out-of-order status
//! transitions are ignored (or make activation fail with `DEVICE_NEEDS_RESET`), never a panic.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::{debug, warn};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;
use vrdma_device::persist::QueueSnapshot;
use vrdma_device::soft::SoftFabric;
use vrdma_device::{
    ActivateError, GuestMemoryMmap, Interrupt, InterruptKind, MigrationError, Vrdma,
};

/// Value of the `MagicValue` register: little-endian "virt".
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// Value of the `Version` register: 2, the modern (virtio 1.x) layout.
pub const MMIO_VERSION: u32 = 2;
/// Value of the `VendorID` register: little-endian ASCII "VRDM" (`0x4d44_5256`).
///
/// virtio-mmio vendor IDs are not registered anywhere and guest drivers do not match on them
/// (Linux only shows it in sysfs), so vrdma uses its own constant to be easy to spot in a guest.
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"VRDM");
/// Size of the MMIO window a VMM must allocate for one transport (register file plus device
/// configuration space).
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

/// Register offsets inside the window (virtio 1.x section 4.2.2, table "MMIO Device Register
/// Layout"). All registers are 32 bits wide and little-endian; the device configuration space
/// starts at [`regs::CONFIG`].
pub mod regs {
    /// `MagicValue` (R).
    pub const MAGIC_VALUE: u64 = 0x000;
    /// `Version` (R).
    pub const VERSION: u64 = 0x004;
    /// `DeviceID` (R).
    pub const DEVICE_ID: u64 = 0x008;
    /// `VendorID` (R).
    pub const VENDOR_ID: u64 = 0x00c;
    /// `DeviceFeatures` (R): 32 feature bits selected by `DeviceFeaturesSel`.
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// `DeviceFeaturesSel` (W).
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// `DriverFeatures` (W): 32 feature bits selected by `DriverFeaturesSel`.
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// `DriverFeaturesSel` (W).
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// `QueueSel` (W).
    pub const QUEUE_SEL: u64 = 0x030;
    /// `QueueNumMax` (R): 0 if the selected queue does not exist.
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// `QueueNum` (W).
    pub const QUEUE_NUM: u64 = 0x038;
    /// `QueueReady` (RW).
    pub const QUEUE_READY: u64 = 0x044;
    /// `QueueNotify` (W): the value is the queue index. Target of a per-queue ioeventfd with
    /// datamatch.
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// `InterruptStatus` (R).
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// `InterruptACK` (W).
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// `Status` (RW).
    pub const STATUS: u64 = 0x070;
    /// `QueueDescLow` (W).
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// `QueueDescHigh` (W).
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// `QueueDriverLow` (W): available ring.
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    /// `QueueDriverHigh` (W).
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    /// `QueueDeviceLow` (W): used ring.
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    /// `QueueDeviceHigh` (W).
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    /// `SHMSel` (W). vrdma has no shared memory regions.
    pub const SHM_SEL: u64 = 0x0ac;
    /// `SHMLenLow` (R): reads `0xffff_ffff` (no such region).
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    /// `SHMLenHigh` (R): reads `0xffff_ffff` (no such region).
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    /// `SHMBaseLow` (R).
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    /// `SHMBaseHigh` (R).
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    /// `ConfigGeneration` (R).
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Start of the device configuration space.
    pub const CONFIG: u64 = 0x100;
}

/// `InterruptStatus` bit: used buffer notification.
const INT_VRING: u32 = VIRTIO_MMIO_INT_VRING;
/// `InterruptStatus` bit: configuration change notification.
const INT_CONFIG: u32 = VIRTIO_MMIO_INT_CONFIG;

const S_ACKNOWLEDGE: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const S_DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
const S_DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const S_FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const S_NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;
const S_FAILED: u32 = VIRTIO_CONFIG_S_FAILED;

const F_VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
const F_EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;

/// Why activation on `DRIVER_OK` failed. Logged; the guest sees `DEVICE_NEEDS_RESET`.
#[derive(Debug, Error)]
enum ActivationError {
    #[error("queue {0} is unavailable (the device reported an invalid maximum size)")]
    QueueUnavailable(usize),
    #[error("queue {0} is not ready")]
    NotReady(usize),
    #[error("queue {index}: {ring} address {addr:#x} is misaligned")]
    Misaligned {
        index: usize,
        ring: &'static str,
        addr: u64,
    },
    #[error("queue {0}: {1}")]
    Queue(usize, virtio_queue::Error),
    #[error("device refused activation: {0}")]
    Device(#[from] ActivateError),
}

/// The interrupt the device raises: sets a bit in `InterruptStatus`, then signals the eventfd
/// (an irqfd under KVM).
struct MmioInterrupt {
    status: Arc<AtomicU32>,
    evt: EventFd,
}

impl Interrupt for MmioInterrupt {
    fn trigger(&self, kind: InterruptKind) -> io::Result<()> {
        let bit = match kind {
            InterruptKind::Queue(_) => INT_VRING,
            InterruptKind::Config => INT_CONFIG,
        };
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.evt.write(1)
    }
}

/// The three rings of a split virtqueue, as addressed by the `Queue{Desc,Driver,Device}*`
/// registers.
#[derive(Clone, Copy, Debug)]
enum Ring {
    Desc,
    Driver,
    Device,
}

/// One virtqueue while the driver configures it.
struct QueueSlot {
    queue: Queue,
    /// Ring addresses exactly as the driver wrote them (the `Queue` rejects misaligned ones and
    /// keeps its previous value; a mismatch makes activation fail).
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueSlot {
    fn new(index: usize, max_size: u16) -> Option<Self> {
        match Queue::new(max_size) {
            Ok(queue) => Some(Self {
                queue,
                desc: 0,
                driver: 0,
                device: 0,
            }),
            Err(e) => {
                tracing::error!(index, max_size, error = %e, "device reported an invalid queue size");
                None
            }
        }
    }

    fn reset(&mut self) {
        self.queue.reset();
        self.desc = 0;
        self.driver = 0;
        self.device = 0;
    }

    /// Writes one 32-bit half of a ring address.
    fn set_address_half(&mut self, ring: Ring, high: bool, value: u32) {
        let raw = match ring {
            Ring::Desc => &mut self.desc,
            Ring::Driver => &mut self.driver,
            Ring::Device => &mut self.device,
        };
        *raw = if high {
            (*raw & 0xffff_ffff) | (u64::from(value) << 32)
        } else {
            (*raw & !0xffff_ffff) | u64::from(value)
        };
        let addr = GuestAddress(*raw);
        let res = match ring {
            Ring::Desc => self.queue.try_set_desc_table_address(addr),
            Ring::Driver => self.queue.try_set_avail_ring_address(addr),
            Ring::Device => self.queue.try_set_used_ring_address(addr),
        };
        if let Err(e) = res {
            debug!(?ring, addr = addr.0, error = %e, "rejected ring address");
        }
    }

    /// Builds the queue handed to the device on activation.
    fn to_queue(&self, index: usize, event_idx: bool) -> Result<Queue, ActivationError> {
        if !self.queue.ready() {
            return Err(ActivationError::NotReady(index));
        }
        for (ring, written, accepted) in [
            ("descriptor table", self.desc, self.queue.desc_table()),
            (
                "driver (available) ring",
                self.driver,
                self.queue.avail_ring(),
            ),
            ("device (used) ring", self.device, self.queue.used_ring()),
        ] {
            if written != accepted {
                return Err(ActivationError::Misaligned {
                    index,
                    ring,
                    addr: written,
                });
            }
        }
        let mut q =
            Queue::try_from(self.queue.state()).map_err(|e| ActivationError::Queue(index, e))?;
        q.set_event_idx(event_idx);
        Ok(q)
    }
}

/// Register state, guarded by the transport's mutex.
struct State {
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    /// `None` for a queue whose maximum size (reported by the device) is invalid.
    queues: Vec<Option<QueueSlot>>,
}

impl State {
    fn selected(&self) -> Option<&QueueSlot> {
        let idx = usize::try_from(self.queue_sel).ok()?;
        self.queues.get(idx)?.as_ref()
    }

    fn selected_mut(&mut self) -> Option<&mut QueueSlot> {
        let idx = usize::try_from(self.queue_sel).ok()?;
        self.queues.get_mut(idx)?.as_mut()
    }

    /// The device is live: activation succeeded and no reset happened since.
    fn is_live(&self) -> bool {
        self.status & S_DRIVER_OK != 0 && self.status & S_NEEDS_RESET == 0
    }
}

/// A virtio-mmio (version 2) transport for one [`Vrdma`] device.
///
/// `read` and `write` take `&self`: the register state sits behind a mutex so that several
/// vCPU threads can access the window concurrently. Queue notifications run the device's work
/// synchronously in the caller's thread, without holding that mutex.
pub struct MmioTransport {
    device: Arc<Vrdma>,
    mem: Arc<GuestMemoryMmap>,
    interrupt_status: Arc<AtomicU32>,
    interrupt: Arc<MmioInterrupt>,
    state: Mutex<State>,
    /// The number of queues while the device is live, else 0: `state`'s answer for queue
    /// notifications, which then take no lock (the data path's doorbell rings here). Written
    /// with `state` locked, after every change of the status.
    live_queues: AtomicU32,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device", &self.device)
            .field("status", &self.status())
            .field("interrupt_status", &self.interrupt_status())
            .finish()
    }
}

impl MmioTransport {
    /// Creates the transport. `irq_evt` is written on every interrupt; under KVM it is an irqfd
    /// bound to the GSI the VMM assigned to this window.
    pub fn new(device: Arc<Vrdma>, mem: Arc<GuestMemoryMmap>, irq_evt: EventFd) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .enumerate()
            .map(|(i, &max)| QueueSlot::new(i, max))
            .collect();
        let interrupt_status = Arc::new(AtomicU32::new(0));
        let interrupt = Arc::new(MmioInterrupt {
            status: interrupt_status.clone(),
            evt: irq_evt,
        });
        Self {
            device,
            mem,
            interrupt_status,
            interrupt,
            state: Mutex::new(State {
                status: 0,
                device_features_sel: 0,
                driver_features_sel: 0,
                driver_features: 0,
                queue_sel: 0,
                queues,
            }),
            live_queues: AtomicU32::new(0),
        }
    }

    /// The wrapped device.
    pub fn device(&self) -> &Arc<Vrdma> {
        &self.device
    }

    /// The current value of the `InterruptStatus` register.
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status.load(Ordering::SeqCst)
    }

    /// The current value of the `Status` register.
    pub fn status(&self) -> u32 {
        self.lock().status
    }

    /// The eventfd signalled on every interrupt (the one given to [`MmioTransport::new`]).
    pub fn irq_evt(&self) -> &EventFd {
        &self.interrupt.evt
    }

    /// Handles a guest read of `data.len()` bytes at `offset` in the window.
    ///
    /// Registers must be read with aligned 4-byte accesses; the configuration space (from
    /// [`regs::CONFIG`]) with 1, 2, 4 or 8-byte accesses. Anything else reads as zeros.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        if offset >= regs::CONFIG {
            if matches!(data.len(), 1 | 2 | 4 | 8) {
                self.device.read_config(offset - regs::CONFIG, data);
            } else {
                warn!(offset, len = data.len(), "bad config space read width");
                data.fill(0);
            }
            return;
        }
        let Ok(buf) = <&mut [u8; 4]>::try_from(&mut *data) else {
            warn!(offset, len = data.len(), "bad register read width");
            data.fill(0);
            return;
        };
        *buf = self.read_reg(offset).to_le_bytes();
    }

    /// Handles a guest write of `data` at `offset` in the window.
    ///
    /// Registers must be written with aligned 4-byte accesses; the configuration space (from
    /// [`regs::CONFIG`]) with 1, 2, 4 or 8-byte accesses. Anything else is ignored.
    pub fn write(&self, offset: u64, data: &[u8]) {
        if offset >= regs::CONFIG {
            if matches!(data.len(), 1 | 2 | 4 | 8) {
                self.device.write_config(offset - regs::CONFIG, data);
            } else {
                warn!(offset, len = data.len(), "bad config space write width");
            }
            return;
        }
        let Ok(buf) = <[u8; 4]>::try_from(data) else {
            warn!(offset, len = data.len(), "bad register write width");
            return;
        };
        self.write_reg(offset, u32::from_le_bytes(buf));
    }

    /// The driver notified queue `index` (a `QueueNotify` write; also the entry point for an
    /// ioeventfd registered on [`regs::QUEUE_NOTIFY`]). Forwarded to the device, synchronously,
    /// only while it is active.
    pub fn queue_notify(&self, index: u16) {
        let nqueues = self.live_queues.load(Ordering::Acquire);
        if nqueues == 0 {
            debug!(index, "queue notification while the device is not active");
            return;
        }
        if u32::from(index) >= nqueues {
            debug!(index, "notification for a queue that does not exist");
            return;
        }
        // The transport lock is not held: the device may take long, and other vCPUs must still
        // be able to access the register file (e.g. InterruptACK) meanwhile.
        self.device.queue_notify(index);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock means a panic while holding it, which is a bug; keep serving the
        // guest with the state as it is rather than propagating the panic into the VMM.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn read_reg(&self, offset: u64) -> u32 {
        match offset {
            regs::MAGIC_VALUE => MAGIC_VALUE,
            regs::VERSION => MMIO_VERSION,
            regs::DEVICE_ID => self.device.device_type(),
            regs::VENDOR_ID => VENDOR_ID,
            regs::DEVICE_FEATURES => {
                let features = self.device.avail_features();
                match self.lock().device_features_sel {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            regs::QUEUE_NUM_MAX => self
                .lock()
                .selected()
                .map_or(0, |s| u32::from(s.queue.max_size())),
            regs::QUEUE_READY => self
                .lock()
                .selected()
                .map_or(0, |s| u32::from(s.queue.ready())),
            regs::INTERRUPT_STATUS => self.interrupt_status(),
            regs::STATUS => self.lock().status,
            // No shared memory regions: a non-existent region has length -1.
            regs::SHM_LEN_LOW | regs::SHM_LEN_HIGH => u32::MAX,
            regs::SHM_BASE_LOW | regs::SHM_BASE_HIGH => 0,
            // The configuration space is read-only and never changes.
            regs::CONFIG_GENERATION => 0,
            _ => {
                debug!(offset, "read of an unknown or write-only register");
                0
            }
        }
    }

    fn write_reg(&self, offset: u64, value: u32) {
        match offset {
            regs::QUEUE_NOTIFY => match u16::try_from(value) {
                Ok(index) => self.queue_notify(index),
                Err(_) => debug!(value, "queue notification with an invalid index"),
            },
            regs::INTERRUPT_ACK => {
                self.interrupt_status.fetch_and(!value, Ordering::SeqCst);
            }
            regs::STATUS => {
                let mut st = self.lock();
                self.write_status(&mut st, value);
                self.publish_live(&st);
            }
            _ => {
                let mut st = self.lock();
                self.write_other(&mut st, offset, value);
                self.publish_live(&st);
            }
        }
    }

    /// Updates `live_queues` from the register state (called with it locked).
    fn publish_live(&self, st: &State) {
        let n = if st.is_live() {
            st.queues.len() as u32
        } else {
            0
        };
        self.live_queues.store(n, Ordering::Release);
    }

    fn write_other(&self, st: &mut State, offset: u64, value: u32) {
        match offset {
            regs::DEVICE_FEATURES_SEL => st.device_features_sel = value,
            regs::DRIVER_FEATURES_SEL => st.driver_features_sel = value,
            regs::DRIVER_FEATURES => {
                if st.status & S_DRIVER == 0 || st.status & S_FEATURES_OK != 0 {
                    debug!(
                        status = st.status,
                        "DriverFeatures write out of sequence, ignored"
                    );
                    return;
                }
                let v = u64::from(value);
                st.driver_features = match st.driver_features_sel {
                    0 => (st.driver_features & !0xffff_ffff) | v,
                    1 => (st.driver_features & 0xffff_ffff) | (v << 32),
                    sel => {
                        debug!(
                            sel,
                            "DriverFeatures write with an invalid selector, ignored"
                        );
                        return;
                    }
                };
                self.device.ack_features(st.driver_features);
            }
            regs::QUEUE_SEL => st.queue_sel = value,
            regs::QUEUE_NUM
            | regs::QUEUE_READY
            | regs::QUEUE_DESC_LOW
            | regs::QUEUE_DESC_HIGH
            | regs::QUEUE_DRIVER_LOW
            | regs::QUEUE_DRIVER_HIGH
            | regs::QUEUE_DEVICE_LOW
            | regs::QUEUE_DEVICE_HIGH => {
                if st.status & S_DRIVER_OK != 0 {
                    debug!(offset, "queue register write after DRIVER_OK, ignored");
                    return;
                }
                let sel = st.queue_sel;
                let Some(slot) = st.selected_mut() else {
                    debug!(sel, offset, "queue register write for a non-existent queue");
                    return;
                };
                match offset {
                    regs::QUEUE_NUM => match u16::try_from(value) {
                        Ok(size) => {
                            if let Err(e) = slot.queue.try_set_size(size) {
                                debug!(sel, value, error = %e, "invalid QueueNum, ignored");
                            }
                        }
                        Err(_) => debug!(sel, value, "invalid QueueNum, ignored"),
                    },
                    regs::QUEUE_READY => match value {
                        0 => slot.queue.set_ready(false),
                        1 => slot.queue.set_ready(true),
                        _ => debug!(sel, value, "invalid QueueReady value, ignored"),
                    },
                    regs::QUEUE_DESC_LOW => slot.set_address_half(Ring::Desc, false, value),
                    regs::QUEUE_DESC_HIGH => slot.set_address_half(Ring::Desc, true, value),
                    regs::QUEUE_DRIVER_LOW => slot.set_address_half(Ring::Driver, false, value),
                    regs::QUEUE_DRIVER_HIGH => slot.set_address_half(Ring::Driver, true, value),
                    regs::QUEUE_DEVICE_LOW => slot.set_address_half(Ring::Device, false, value),
                    regs::QUEUE_DEVICE_HIGH => slot.set_address_half(Ring::Device, true, value),
                    _ => {}
                }
            }
            // No shared memory regions: the selector has no effect.
            regs::SHM_SEL => {}
            _ => debug!(offset, value, "write to an unknown or read-only register"),
        }
    }

    /// Handles a `Status` write: 0 resets; otherwise the driver may only add bits, in the order
    /// of virtio 1.x section 3.1.1 (bits set out of order are dropped).
    fn write_status(&self, st: &mut State, value: u32) {
        if value == 0 {
            self.reset(st);
            return;
        }
        let old = st.status;
        if value & old != old {
            warn!(
                old,
                value, "driver tried to clear status bits without a reset, ignored"
            );
            return;
        }
        // DEVICE_NEEDS_RESET is set by the device only; unknown bits are dropped.
        let new =
            value & !old & (S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK | S_FAILED);
        let mut status = old;
        if new & S_ACKNOWLEDGE != 0 {
            status |= S_ACKNOWLEDGE;
        }
        if new & S_DRIVER != 0 {
            if status & S_ACKNOWLEDGE != 0 {
                status |= S_DRIVER;
            } else {
                debug!(value, "DRIVER set before ACKNOWLEDGE, ignored");
            }
        }
        if new & S_FEATURES_OK != 0 {
            let features = st.driver_features;
            let offered = self.device.avail_features();
            if status & S_DRIVER == 0 {
                debug!(value, "FEATURES_OK set before DRIVER, ignored");
            } else if features & F_VERSION_1 == 0 {
                warn!(
                    features,
                    "driver did not accept VIRTIO_F_VERSION_1, FEATURES_OK refused"
                );
            } else if features & !offered != 0 {
                warn!(
                    features,
                    offered, "driver accepted features not offered, FEATURES_OK refused"
                );
            } else {
                self.device.ack_features(features);
                status |= S_FEATURES_OK;
            }
        }
        if new & S_DRIVER_OK != 0 {
            if status & S_FEATURES_OK == 0 {
                debug!(value, "DRIVER_OK set before FEATURES_OK, ignored");
            } else {
                status |= S_DRIVER_OK;
                if let Err(e) = self.activate(st) {
                    warn!(error = %e, "activation failed, setting DEVICE_NEEDS_RESET");
                    status |= S_NEEDS_RESET;
                    // virtio 1.x 2.1.2: with DRIVER_OK set, the device must send a
                    // configuration change notification when it sets DEVICE_NEEDS_RESET.
                    if let Err(e) = self.interrupt.trigger(InterruptKind::Config) {
                        warn!(error = %e, "failed to signal the interrupt eventfd");
                    }
                }
            }
        }
        if new & S_FAILED != 0 {
            status |= S_FAILED;
        }
        st.status = status;
    }

    fn activate(&self, st: &State) -> Result<(), ActivationError> {
        let event_idx = st.driver_features & F_EVENT_IDX != 0;
        let queues = st
            .queues
            .iter()
            .enumerate()
            .map(|(i, slot)| {
                slot.as_ref()
                    .ok_or(ActivationError::QueueUnavailable(i))?
                    .to_queue(i, event_idx)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let irq: Arc<dyn Interrupt> = self.interrupt.clone();
        self.device.activate(self.mem.clone(), queues, irq)?;
        Ok(())
    }

    fn reset(&self, st: &mut State) {
        // Harmless if the device was never activated.
        self.device.reset();
        st.status = 0;
        st.device_features_sel = 0;
        st.driver_features_sel = 0;
        st.driver_features = 0;
        st.queue_sel = 0;
        for slot in st.queues.iter_mut().flatten() {
            slot.reset();
        }
        self.interrupt_status.store(0, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------------------------
// Live migration (docs/migration.md)
// ---------------------------------------------------------------------------------------------

/// Magic bytes at the start of a transport state blob ([`MmioTransport::save_state`]).
pub const STATE_MAGIC: [u8; 8] = *b"VRDMMMIO";
/// The transport state format version this build writes (and the only one it reads).
pub const STATE_VERSION: u32 = 1;
/// Length of the transport state header:
///
/// ```text
/// offset  size  field
/// 0       8     magic "VRDMMMIO"
/// 8       4     format version (u32 LE) = 1
/// 12      4     reserved, 0
/// 16      8     body length in bytes (u64 LE)
/// 24      4     CRC-32 (IEEE) of the body (u32 LE)
/// 28      4     reserved, 0
/// 32      ...   body: postcard encoding of the registers, the queue slots and the device blob
/// ```
///
/// The device blob inside the body ([`Vrdma::save`]) has its own header and checksum.
pub const STATE_HEADER_LEN: usize = 32;

/// Errors of [`MmioTransport::save_state`] and [`MmioTransport::restore`]. A failed save
/// changes nothing; a failed restore builds nothing (and leaves the source untouched).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TransportMigrationError {
    /// The device refused the step or its blob (see [`MigrationError`]).
    #[error("device: {0}")]
    Device(#[from] MigrationError),
    /// The blob ends early.
    #[error("transport state truncated ({0})")]
    Truncated(&'static str),
    /// The blob does not start with [`STATE_MAGIC`].
    #[error("not a vrdma transport state (bad magic)")]
    BadMagic,
    /// The blob's format version is not one this build reads.
    #[error("unsupported transport state version {0} (this build reads version {STATE_VERSION})")]
    UnsupportedVersion(u32),
    /// The body does not match its checksum.
    #[error("transport state checksum mismatch (corrupted)")]
    Checksum,
    /// The body does not decode.
    #[error("transport state does not decode: {0}")]
    Decode(String),
    /// The decoded registers are inconsistent (with each other, the device or guest memory).
    #[error("inconsistent transport state: {0}")]
    Invalid(String),
}

fn invalid(what: impl Into<String>) -> TransportMigrationError {
    TransportMigrationError::Invalid(what.into())
}

/// One queue slot as saved: virtio-queue's state (the device crate's serde mirror) plus the
/// ring addresses exactly as the driver wrote them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct QueueSlotSnapshot {
    queue: QueueSnapshot,
    raw_desc: u64,
    raw_driver: u64,
    raw_device: u64,
}

impl QueueSlotSnapshot {
    fn save(slot: &QueueSlot) -> Self {
        Self {
            queue: slot.queue.state().into(),
            raw_desc: slot.desc,
            raw_driver: slot.driver,
            raw_device: slot.device,
        }
    }

    /// Rebuilds the slot; virtio-queue checks the size and the ring alignments.
    fn restore(self, index: usize, max_size: u16) -> Result<QueueSlot, TransportMigrationError> {
        if self.queue.max_size != max_size {
            return Err(invalid(format!(
                "queue {index}: maximum size {} (the device's is {max_size})",
                self.queue.max_size
            )));
        }
        let queue = Queue::try_from(virtio_queue::QueueState::from(self.queue))
            .map_err(|e| invalid(format!("queue {index}: {e}")))?;
        Ok(QueueSlot {
            queue,
            desc: self.raw_desc,
            driver: self.raw_driver,
            device: self.raw_device,
        })
    }
}

/// The body of a transport state blob.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct TransportSnapshot {
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<Option<QueueSlotSnapshot>>,
    interrupt_status: u32,
    /// The device's own blob ([`Vrdma::save`]).
    device: Vec<u8>,
}

fn encode_state(snap: &TransportSnapshot) -> Vec<u8> {
    let body = postcard::to_stdvec(snap).expect("serializing plain data into memory");
    let mut out = Vec::with_capacity(STATE_HEADER_LEN + body.len());
    out.extend_from_slice(&STATE_MAGIC);
    out.extend_from_slice(&STATE_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&body);
    out
}

fn decode_state(blob: &[u8]) -> Result<TransportSnapshot, TransportMigrationError> {
    use TransportMigrationError as E;
    if blob.len() < STATE_HEADER_LEN {
        // A short blob that is not even the start of ours is reported as such.
        let n = blob.len().min(STATE_MAGIC.len());
        if blob[..n] != STATE_MAGIC[..n] {
            return Err(E::BadMagic);
        }
        return Err(E::Truncated("header"));
    }
    if blob[..8] != STATE_MAGIC {
        return Err(E::BadMagic);
    }
    let u32_at = |o: usize| u32::from_le_bytes([blob[o], blob[o + 1], blob[o + 2], blob[o + 3]]);
    let version = u32_at(8);
    if version != STATE_VERSION {
        return Err(E::UnsupportedVersion(version));
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&blob[16..24]);
    let body_len = u64::from_le_bytes(len);
    let body = &blob[STATE_HEADER_LEN..];
    if (body.len() as u64) < body_len {
        return Err(E::Truncated("body"));
    }
    if body.len() as u64 != body_len {
        return Err(invalid("trailing bytes after the body"));
    }
    if crc32fast::hash(body) != u32_at(24) {
        return Err(E::Checksum);
    }
    if u32_at(12) != 0 || u32_at(28) != 0 {
        return Err(invalid("reserved header fields are not zero"));
    }
    let (snap, rest) = postcard::take_from_bytes::<TransportSnapshot>(body)
        .map_err(|e| E::Decode(e.to_string()))?;
    if !rest.is_empty() {
        return Err(E::Decode("trailing bytes in the body".into()));
    }
    Ok(snap)
}

/// Status bits a transport can hold.
const S_KNOWN: u32 =
    S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK | S_NEEDS_RESET | S_FAILED;

/// Checks the registers against each other: the combinations [`MmioTransport::write_status`]
/// can produce.
fn check_registers(s: &TransportSnapshot, offered: u64) -> Result<(), TransportMigrationError> {
    let st = s.status;
    if st & !S_KNOWN != 0 {
        return Err(invalid(format!("unknown status bits {st:#x}")));
    }
    for (bit, needs, what) in [
        (S_DRIVER, S_ACKNOWLEDGE, "DRIVER without ACKNOWLEDGE"),
        (S_FEATURES_OK, S_DRIVER, "FEATURES_OK without DRIVER"),
        (S_DRIVER_OK, S_FEATURES_OK, "DRIVER_OK without FEATURES_OK"),
        (
            S_NEEDS_RESET,
            S_DRIVER_OK,
            "DEVICE_NEEDS_RESET without DRIVER_OK",
        ),
    ] {
        if st & bit != 0 && st & needs == 0 {
            return Err(invalid(format!("status {st:#x}: {what}")));
        }
    }
    if st & S_DRIVER == 0 && s.driver_features != 0 {
        return Err(invalid("driver features before DRIVER"));
    }
    if st & S_FEATURES_OK != 0
        && (s.driver_features & F_VERSION_1 == 0 || s.driver_features & !offered != 0)
    {
        return Err(invalid("FEATURES_OK with features the device refuses"));
    }
    if s.interrupt_status & !(INT_VRING | INT_CONFIG) != 0 {
        return Err(invalid(format!(
            "unknown interrupt status bits {:#x}",
            s.interrupt_status
        )));
    }
    Ok(())
}

impl MmioTransport {
    /// The guest memory the transport (and its device) works on.
    pub fn mem(&self) -> &Arc<GuestMemoryMmap> {
        &self.mem
    }

    /// Saves the transport for live migration: the registers (status, feature selects and
    /// accepted features, `QueueSel`, every queue's configuration with the ring addresses as
    /// written, `InterruptStatus`) and the device's state ([`Vrdma::save`]), in a versioned,
    /// checksummed envelope ([`STATE_HEADER_LEN`]).
    ///
    /// The device must be stopped ([`Vrdma::stop`]) and the vCPUs paused. Nothing changes, so
    /// an aborted migration just resumes the device.
    pub fn save_state(&self) -> Result<Vec<u8>, TransportMigrationError> {
        let device = self.device.save()?;
        Ok(encode_state(&self.snapshot(device)))
    }

    /// The transport registers, with `device` as the device's blob.
    fn snapshot(&self, device: Vec<u8>) -> TransportSnapshot {
        let st = self.lock();
        TransportSnapshot {
            status: st.status,
            device_features_sel: st.device_features_sel,
            driver_features_sel: st.driver_features_sel,
            driver_features: st.driver_features,
            queue_sel: st.queue_sel,
            queues: st
                .queues
                .iter()
                .map(|q| q.as_ref().map(QueueSlotSnapshot::save))
                .collect(),
            interrupt_status: self.interrupt_status(),
            device,
        }
    }

    /// Rebuilds a transport from [`MmioTransport::save_state`]'s blob over `mem` (the copy of
    /// the source's guest memory), signalling `irq_evt` on interrupts. The device is restored
    /// with [`Vrdma::restore`]: it is Stopped and not yet on the fabric until
    /// `device().resume()`. A pending `InterruptStatus` is re-asserted on `irq_evt` (a spurious
    /// interrupt is harmless; a lost one is not).
    ///
    /// The blob is untrusted: every register is checked against the others, the device and
    /// guest memory; a bad blob is an error, never a panic, and builds nothing.
    pub fn restore(
        fabric: &Arc<SoftFabric>,
        mem: Arc<GuestMemoryMmap>,
        irq_evt: EventFd,
        blob: &[u8],
    ) -> Result<MmioTransport, TransportMigrationError> {
        Self::restore_with_precopy(fabric, mem, irq_evt, blob, None)
    }

    /// [`MmioTransport::restore`] for a blob saved after a device pre-copy: the device is
    /// restored with [`Vrdma::restore_with_precopy`] and `precopy`.
    pub fn restore_with_precopy(
        fabric: &Arc<SoftFabric>,
        mem: Arc<GuestMemoryMmap>,
        irq_evt: EventFd,
        blob: &[u8],
        precopy: Option<vrdma_device::PrecopyState>,
    ) -> Result<MmioTransport, TransportMigrationError> {
        let snap = decode_state(blob)?;
        let status = snap.status;
        let interrupt_status = Arc::new(AtomicU32::new(snap.interrupt_status));
        let interrupt = Arc::new(MmioInterrupt {
            status: interrupt_status.clone(),
            evt: irq_evt,
        });
        let irq: Arc<dyn Interrupt> = interrupt.clone();
        // The registers among themselves first, then the device (which validates its own
        // blob), then the registers against the device.
        check_registers(&snap, vrdma_device::device::AVAIL_FEATURES)?;
        let live = status & S_DRIVER_OK != 0 && status & S_NEEDS_RESET == 0;
        let device = Vrdma::restore_with_precopy(fabric, mem.clone(), irq, &snap.device, precopy)?;
        if device.acked_features() != snap.driver_features & device.avail_features() {
            return Err(invalid(
                "the device's accepted features differ from DriverFeatures",
            ));
        }
        if device.is_active() != live {
            return Err(invalid(format!(
                "status {status:#x} but the device is {}active",
                if device.is_active() { "" } else { "not " }
            )));
        }
        let max_sizes = device.queue_max_sizes();
        if snap.queues.len() != max_sizes.len() {
            return Err(invalid(format!(
                "{} queues (the device has {})",
                snap.queues.len(),
                max_sizes.len()
            )));
        }
        let mut queues = Vec::with_capacity(max_sizes.len());
        for (i, (q, &max)) in snap.queues.into_iter().zip(max_sizes.iter()).enumerate() {
            // Queue::new(max) is what MmioTransport::new used: the slot exists iff it succeeds.
            let exists = Queue::new(max).is_ok();
            let slot = match (q, exists) {
                (Some(q), true) => q.restore(i, max)?,
                (None, false) => {
                    queues.push(None);
                    continue;
                }
                _ => {
                    return Err(invalid(format!(
                        "queue {i}: presence differs from the device"
                    )))
                }
            };
            if live {
                // What activation checked must still hold (the device has its own copy).
                slot.to_queue(i, false)
                    .map_err(|e| invalid(e.to_string()))?;
                if !slot.queue.is_valid(mem.as_ref()) {
                    return Err(invalid(format!("queue {i}: rings outside guest memory")));
                }
            }
            queues.push(Some(slot));
        }
        if snap.interrupt_status != 0 {
            if let Err(e) = interrupt.evt.write(1) {
                warn!(error = %e, "failed to re-assert the interrupt after restore");
            }
        }
        let t = MmioTransport {
            device,
            mem,
            interrupt_status,
            interrupt,
            state: Mutex::new(State {
                status,
                device_features_sel: snap.device_features_sel,
                driver_features_sel: snap.driver_features_sel,
                driver_features: snap.driver_features,
                queue_sel: snap.queue_sel,
                queues,
            }),
            live_queues: AtomicU32::new(0),
        };
        t.publish_live(&t.lock());
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;
    use vrdma_device::soft::SoftFabric;
    use vrdma_device::DeviceConfig;

    const QUEUE_BASE: u64 = 0x10_0000;
    const QUEUE_STRIDE: u64 = 0x1_0000;

    struct Guest {
        t: MmioTransport,
        _fabric: Arc<SoftFabric>,
    }

    impl Guest {
        fn new() -> Self {
            let fabric = SoftFabric::new();
            let dev =
                Vrdma::new(DeviceConfig::with_gid(DeviceConfig::gid_for_id(1)), &fabric).unwrap();
            let mem =
                Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap());
            let evt = EventFd::new(EFD_NONBLOCK).unwrap();
            Self {
                t: MmioTransport::new(dev, mem, evt),
                _fabric: fabric,
            }
        }

        fn r32(&self, off: u64) -> u32 {
            let mut b = [0xa5u8; 4];
            self.t.read(off, &mut b);
            u32::from_le_bytes(b)
        }

        fn w32(&self, off: u64, v: u32) {
            self.t.write(off, &v.to_le_bytes());
        }

        fn dev(&self) -> &Arc<Vrdma> {
            self.t.device()
        }

        fn set_features(&self, f: u64) {
            self.w32(regs::DRIVER_FEATURES_SEL, 0);
            self.w32(regs::DRIVER_FEATURES, f as u32);
            self.w32(regs::DRIVER_FEATURES_SEL, 1);
            self.w32(regs::DRIVER_FEATURES, (f >> 32) as u32);
        }

        /// ACKNOWLEDGE, DRIVER, features, FEATURES_OK; returns the status read back.
        fn negotiate(&self, f: u64) -> u32 {
            self.w32(regs::STATUS, S_ACKNOWLEDGE);
            self.w32(regs::STATUS, S_ACKNOWLEDGE | S_DRIVER);
            self.set_features(f);
            self.w32(regs::STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
            self.r32(regs::STATUS)
        }

        fn setup_queue(&self, q: u32, size: u32) {
            let base = QUEUE_BASE + u64::from(q) * QUEUE_STRIDE;
            self.w32(regs::QUEUE_SEL, q);
            self.w32(regs::QUEUE_NUM, size);
            for (lo, addr) in [
                (regs::QUEUE_DESC_LOW, base),
                (regs::QUEUE_DRIVER_LOW, base + 0x4000),
                (regs::QUEUE_DEVICE_LOW, base + 0x8000),
            ] {
                self.w32(lo, addr as u32);
                self.w32(lo + 4, (addr >> 32) as u32);
            }
            self.w32(regs::QUEUE_READY, 1);
        }

        fn driver_ok(&self) -> u32 {
            self.w32(
                regs::STATUS,
                S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
            );
            self.r32(regs::STATUS)
        }

        /// Full bring-up with all offered features.
        fn bring_up(&self) {
            let f = self.dev().avail_features();
            assert_ne!(self.negotiate(f) & S_FEATURES_OK, 0);
            for q in 0..2 {
                self.setup_queue(q, 256);
            }
            assert_eq!(self.driver_ok() & S_NEEDS_RESET, 0);
            assert!(self.dev().is_active());
        }

        fn queue_size(&self, q: usize) -> u16 {
            self.t.lock().queues[q].as_ref().unwrap().queue.size()
        }
    }

    #[test]
    fn register_offsets_match_virtio_bindings() {
        use virtio_bindings::virtio_mmio as b;
        for (ours, theirs) in [
            (regs::MAGIC_VALUE, b::VIRTIO_MMIO_MAGIC_VALUE),
            (regs::VERSION, b::VIRTIO_MMIO_VERSION),
            (regs::DEVICE_ID, b::VIRTIO_MMIO_DEVICE_ID),
            (regs::VENDOR_ID, b::VIRTIO_MMIO_VENDOR_ID),
            (regs::DEVICE_FEATURES, b::VIRTIO_MMIO_DEVICE_FEATURES),
            (
                regs::DEVICE_FEATURES_SEL,
                b::VIRTIO_MMIO_DEVICE_FEATURES_SEL,
            ),
            (regs::DRIVER_FEATURES, b::VIRTIO_MMIO_DRIVER_FEATURES),
            (
                regs::DRIVER_FEATURES_SEL,
                b::VIRTIO_MMIO_DRIVER_FEATURES_SEL,
            ),
            (regs::QUEUE_SEL, b::VIRTIO_MMIO_QUEUE_SEL),
            (regs::QUEUE_NUM_MAX, b::VIRTIO_MMIO_QUEUE_NUM_MAX),
            (regs::QUEUE_NUM, b::VIRTIO_MMIO_QUEUE_NUM),
            (regs::QUEUE_READY, b::VIRTIO_MMIO_QUEUE_READY),
            (regs::QUEUE_NOTIFY, b::VIRTIO_MMIO_QUEUE_NOTIFY),
            (regs::INTERRUPT_STATUS, b::VIRTIO_MMIO_INTERRUPT_STATUS),
            (regs::INTERRUPT_ACK, b::VIRTIO_MMIO_INTERRUPT_ACK),
            (regs::STATUS, b::VIRTIO_MMIO_STATUS),
            (regs::QUEUE_DESC_LOW, b::VIRTIO_MMIO_QUEUE_DESC_LOW),
            (regs::QUEUE_DESC_HIGH, b::VIRTIO_MMIO_QUEUE_DESC_HIGH),
            (regs::QUEUE_DRIVER_LOW, b::VIRTIO_MMIO_QUEUE_AVAIL_LOW),
            (regs::QUEUE_DRIVER_HIGH, b::VIRTIO_MMIO_QUEUE_AVAIL_HIGH),
            (regs::QUEUE_DEVICE_LOW, b::VIRTIO_MMIO_QUEUE_USED_LOW),
            (regs::QUEUE_DEVICE_HIGH, b::VIRTIO_MMIO_QUEUE_USED_HIGH),
            (regs::SHM_SEL, b::VIRTIO_MMIO_SHM_SEL),
            (regs::SHM_LEN_LOW, b::VIRTIO_MMIO_SHM_LEN_LOW),
            (regs::SHM_LEN_HIGH, b::VIRTIO_MMIO_SHM_LEN_HIGH),
            (regs::SHM_BASE_LOW, b::VIRTIO_MMIO_SHM_BASE_LOW),
            (regs::SHM_BASE_HIGH, b::VIRTIO_MMIO_SHM_BASE_HIGH),
            (regs::CONFIG_GENERATION, b::VIRTIO_MMIO_CONFIG_GENERATION),
            (regs::CONFIG, b::VIRTIO_MMIO_CONFIG),
        ] {
            assert_eq!(ours, u64::from(theirs));
        }
    }

    #[test]
    fn identity_registers() {
        let g = Guest::new();
        assert_eq!(g.r32(regs::MAGIC_VALUE), 0x7472_6976);
        assert_eq!(g.r32(regs::VERSION), 2);
        assert_eq!(g.r32(regs::DEVICE_ID), 42);
        assert_eq!(g.r32(regs::DEVICE_ID), g.dev().device_type());
        assert_eq!(g.r32(regs::VENDOR_ID), VENDOR_ID);
        assert_eq!(g.r32(regs::CONFIG_GENERATION), 0);
        assert_eq!(g.r32(regs::STATUS), 0);
        assert_eq!(g.r32(regs::SHM_LEN_LOW), u32::MAX);
        assert_eq!(g.r32(regs::SHM_LEN_HIGH), u32::MAX);
        // Write-only and unknown registers read as zero.
        assert_eq!(g.r32(regs::QUEUE_NUM), 0);
        assert_eq!(g.r32(0x0f0), 0);
        // Registers are read-only where they should be.
        g.w32(regs::MAGIC_VALUE, 0);
        g.w32(regs::DEVICE_ID, 7);
        assert_eq!(g.r32(regs::MAGIC_VALUE), MAGIC_VALUE);
        assert_eq!(g.r32(regs::DEVICE_ID), 42);
    }

    #[test]
    fn bad_widths_and_alignment() {
        let g = Guest::new();
        for len in [0usize, 1, 2, 3, 5, 8, 16] {
            let mut b = vec![0xa5u8; len];
            g.t.read(regs::MAGIC_VALUE, &mut b);
            assert!(b.iter().all(|&x| x == 0), "len {len}");
        }
        // Unaligned 4-byte read inside a register.
        assert_eq!(g.r32(regs::MAGIC_VALUE + 1), 0);
        // 2-byte status write is ignored.
        g.t.write(regs::STATUS, &[1, 0]);
        assert_eq!(g.r32(regs::STATUS), 0);
        // 8-byte status write is ignored.
        g.t.write(regs::STATUS, &1u64.to_le_bytes());
        assert_eq!(g.r32(regs::STATUS), 0);
        // Bad config-space widths read as zeros.
        let mut b = [0xa5u8; 3];
        g.t.read(regs::CONFIG, &mut b);
        assert_eq!(b, [0; 3]);
    }

    #[test]
    fn device_features_both_halves() {
        let g = Guest::new();
        let f = g.dev().avail_features();
        assert_ne!(f & F_VERSION_1, 0);
        g.w32(regs::DEVICE_FEATURES_SEL, 0);
        assert_eq!(g.r32(regs::DEVICE_FEATURES), f as u32);
        g.w32(regs::DEVICE_FEATURES_SEL, 1);
        assert_eq!(g.r32(regs::DEVICE_FEATURES), (f >> 32) as u32);
        assert_eq!(
            g.r32(regs::DEVICE_FEATURES) & 1,
            1,
            "VERSION_1 is bit 0 of the high half"
        );
        g.w32(regs::DEVICE_FEATURES_SEL, 2);
        assert_eq!(g.r32(regs::DEVICE_FEATURES), 0);
        g.w32(regs::DEVICE_FEATURES_SEL, u32::MAX);
        assert_eq!(g.r32(regs::DEVICE_FEATURES), 0);
    }

    #[test]
    fn driver_features_negotiation() {
        let g = Guest::new();
        let f = g.dev().avail_features();
        let status = g.negotiate(f);
        assert_eq!(status, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        assert_eq!(g.dev().acked_features(), f);
        assert_eq!(g.t.lock().driver_features, f);

        // Feature writes after FEATURES_OK are ignored.
        g.set_features(F_VERSION_1);
        assert_eq!(g.dev().acked_features(), f);
        assert_eq!(g.t.lock().driver_features, f);
    }

    #[test]
    fn driver_features_subset_and_bad_selector() {
        let g = Guest::new();
        g.w32(regs::STATUS, S_ACKNOWLEDGE);
        g.w32(regs::STATUS, S_ACKNOWLEDGE | S_DRIVER);
        g.w32(regs::DRIVER_FEATURES_SEL, 5);
        g.w32(regs::DRIVER_FEATURES, u32::MAX);
        assert_eq!(g.t.lock().driver_features, 0);
        g.set_features(F_VERSION_1);
        g.w32(regs::STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        assert_ne!(g.r32(regs::STATUS) & S_FEATURES_OK, 0);
        assert_eq!(g.dev().acked_features(), F_VERSION_1);
    }

    #[test]
    fn feature_writes_before_driver_are_ignored() {
        let g = Guest::new();
        g.set_features(F_VERSION_1);
        assert_eq!(g.t.lock().driver_features, 0);
    }

    #[test]
    fn features_ok_refused_without_version_1() {
        let g = Guest::new();
        let f = g.dev().avail_features() & !F_VERSION_1;
        let status = g.negotiate(f);
        assert_eq!(status & S_FEATURES_OK, 0);
        assert_eq!(status, S_ACKNOWLEDGE | S_DRIVER);
        // DRIVER_OK is ignored without FEATURES_OK.
        for q in 0..2 {
            g.setup_queue(q, 256);
        }
        assert_eq!(g.driver_ok() & (S_DRIVER_OK | S_FEATURES_OK), 0);
        assert!(!g.dev().is_active());
        // The driver may still fix its features and retry.
        g.set_features(F_VERSION_1);
        g.w32(regs::STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        assert_ne!(g.r32(regs::STATUS) & S_FEATURES_OK, 0);
    }

    #[test]
    fn features_ok_refused_with_unoffered_features() {
        let g = Guest::new();
        let f = g.dev().avail_features() | (1 << 23);
        assert_eq!(g.dev().avail_features() & (1 << 23), 0);
        assert_eq!(g.negotiate(f) & S_FEATURES_OK, 0);
    }

    #[test]
    fn status_state_machine() {
        let g = Guest::new();
        // DRIVER without ACKNOWLEDGE is dropped.
        g.w32(regs::STATUS, S_DRIVER);
        assert_eq!(g.r32(regs::STATUS), 0);
        // The driver cannot set DEVICE_NEEDS_RESET or unknown bits.
        g.w32(regs::STATUS, S_ACKNOWLEDGE | S_NEEDS_RESET | 0x30);
        assert_eq!(g.r32(regs::STATUS), S_ACKNOWLEDGE);
        // Clearing bits without a reset is ignored.
        g.w32(regs::STATUS, S_ACKNOWLEDGE | S_DRIVER);
        g.w32(regs::STATUS, S_ACKNOWLEDGE);
        assert_eq!(g.r32(regs::STATUS), S_ACKNOWLEDGE | S_DRIVER);
        // FAILED is accepted.
        g.w32(regs::STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FAILED);
        assert_eq!(g.r32(regs::STATUS), S_ACKNOWLEDGE | S_DRIVER | S_FAILED);
    }

    #[test]
    fn queue_registers() {
        let g = Guest::new();
        let max = g.dev().queue_max_sizes();
        for q in 0..2u32 {
            g.w32(regs::QUEUE_SEL, q);
            assert_eq!(g.r32(regs::QUEUE_NUM_MAX), u32::from(max[q as usize]));
            assert_eq!(g.r32(regs::QUEUE_READY), 0);
        }
        for q in [2u32, 3, 0x1_0000, u32::MAX] {
            g.w32(regs::QUEUE_SEL, q);
            assert_eq!(g.r32(regs::QUEUE_NUM_MAX), 0);
            assert_eq!(g.r32(regs::QUEUE_READY), 0);
            // Writes to a non-existent queue are ignored.
            g.w32(regs::QUEUE_READY, 1);
            g.w32(regs::QUEUE_NUM, 8);
            assert_eq!(g.r32(regs::QUEUE_READY), 0);
        }
        assert_eq!(g.queue_size(0), max[0]);
        assert_eq!(g.queue_size(1), max[1]);

        g.w32(regs::QUEUE_SEL, 0);
        g.w32(regs::QUEUE_NUM, 64);
        assert_eq!(g.queue_size(0), 64);
        // Too big, zero, not a power of two, beyond u16: ignored.
        for bad in [u32::from(max[0]) * 2, 0, 3, 100, 0x1_0000, u32::MAX] {
            g.w32(regs::QUEUE_NUM, bad);
            assert_eq!(g.queue_size(0), 64, "QueueNum {bad}");
        }
        g.w32(regs::QUEUE_READY, 1);
        assert_eq!(g.r32(regs::QUEUE_READY), 1);
        g.w32(regs::QUEUE_READY, 2);
        assert_eq!(g.r32(regs::QUEUE_READY), 1);
        g.w32(regs::QUEUE_READY, 0);
        assert_eq!(g.r32(regs::QUEUE_READY), 0);
        // Queue 1 is unaffected.
        assert_eq!(g.queue_size(1), max[1]);

        // 64-bit addresses are assembled from both halves.
        g.w32(regs::QUEUE_DESC_LOW, 0x1000);
        g.w32(regs::QUEUE_DESC_HIGH, 0x2);
        g.w32(regs::QUEUE_DRIVER_LOW, 0x3000);
        g.w32(regs::QUEUE_DEVICE_HIGH, 0x4);
        g.w32(regs::QUEUE_DEVICE_LOW, 0x5000);
        let st = g.t.lock();
        let q = &st.queues[0].as_ref().unwrap().queue;
        assert_eq!(q.desc_table(), 0x2_0000_1000);
        assert_eq!(q.avail_ring(), 0x3000);
        assert_eq!(q.used_ring(), 0x4_0000_5000);
    }

    #[test]
    fn driver_ok_activates_the_device() {
        let g = Guest::new();
        assert!(!g.dev().is_active());
        g.bring_up();
        assert_eq!(
            g.r32(regs::STATUS),
            S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK
        );
        assert_eq!(g.t.interrupt_status(), 0);
        // Notifications reach the device (synchronously); unknown queues are ignored.
        g.w32(regs::QUEUE_NOTIFY, 0);
        g.w32(regs::QUEUE_NOTIFY, 1);
        g.w32(regs::QUEUE_NOTIFY, 2);
        g.w32(regs::QUEUE_NOTIFY, u32::MAX);
        assert!(g.dev().is_active());
    }

    #[test]
    fn queue_writes_after_driver_ok_are_ignored() {
        let g = Guest::new();
        g.bring_up();
        g.w32(regs::QUEUE_SEL, 0);
        g.w32(regs::QUEUE_NUM, 16);
        g.w32(regs::QUEUE_READY, 0);
        g.w32(regs::QUEUE_DESC_LOW, 0xdead_0000);
        assert_eq!(g.queue_size(0), 256);
        assert_eq!(g.r32(regs::QUEUE_READY), 1);
        assert_eq!(
            g.t.lock().queues[0].as_ref().unwrap().queue.desc_table(),
            QUEUE_BASE
        );
        // A second DRIVER_OK write (same value) changes nothing.
        assert_eq!(g.driver_ok() & S_NEEDS_RESET, 0);
        assert!(g.dev().is_active());
    }

    #[test]
    fn activation_failure_sets_needs_reset() {
        // Queue 1 not ready.
        let g = Guest::new();
        assert_ne!(g.negotiate(g.dev().avail_features()) & S_FEATURES_OK, 0);
        g.setup_queue(0, 256);
        let status = g.driver_ok();
        assert_ne!(status & S_NEEDS_RESET, 0);
        assert_ne!(status & S_DRIVER_OK, 0);
        assert!(!g.dev().is_active());
        assert_eq!(g.t.interrupt_status(), INT_CONFIG);
        assert_eq!(g.t.irq_evt().read().unwrap(), 1);
        // Notifications are not forwarded; reset recovers.
        g.w32(regs::QUEUE_NOTIFY, 0);
        g.w32(regs::STATUS, 0);
        assert_eq!(g.r32(regs::STATUS), 0);
        assert_eq!(g.t.interrupt_status(), 0);
        g.bring_up();
    }

    #[test]
    fn misaligned_ring_fails_activation() {
        let g = Guest::new();
        assert_ne!(g.negotiate(g.dev().avail_features()) & S_FEATURES_OK, 0);
        g.setup_queue(0, 256);
        g.setup_queue(1, 256);
        g.w32(regs::QUEUE_SEL, 1);
        g.w32(regs::QUEUE_DESC_LOW, (QUEUE_BASE + QUEUE_STRIDE + 8) as u32);
        assert_ne!(g.driver_ok() & S_NEEDS_RESET, 0);
        assert!(!g.dev().is_active());
    }

    #[test]
    fn rings_outside_memory_fail_activation() {
        let g = Guest::new();
        assert_ne!(g.negotiate(g.dev().avail_features()) & S_FEATURES_OK, 0);
        g.setup_queue(0, 256);
        g.setup_queue(1, 256);
        g.w32(regs::QUEUE_SEL, 1);
        g.w32(regs::QUEUE_DEVICE_HIGH, 1);
        assert_ne!(g.driver_ok() & S_NEEDS_RESET, 0);
        assert!(!g.dev().is_active());
    }

    #[test]
    fn reset_deactivates() {
        let g = Guest::new();
        g.bring_up();
        g.t.interrupt.trigger(InterruptKind::Queue(0)).unwrap();
        g.w32(regs::STATUS, 0);
        assert!(!g.dev().is_active());
        assert_eq!(g.r32(regs::STATUS), 0);
        assert_eq!(g.t.interrupt_status(), 0);
        assert_eq!(g.dev().acked_features(), 0);
        for q in 0..2 {
            g.w32(regs::QUEUE_SEL, q);
            assert_eq!(g.r32(regs::QUEUE_READY), 0);
            assert_eq!(g.queue_size(q as usize), 256);
        }
        {
            let st = g.t.lock();
            assert_eq!(st.driver_features, 0);
            let q = &st.queues[0].as_ref().unwrap().queue;
            assert_eq!(q.desc_table(), 0);
        }
        // Notifications after reset are not forwarded (and do not panic).
        g.w32(regs::QUEUE_NOTIFY, 0);
        // The driver can bring the device up again.
        g.bring_up();
        // Reset before any activation is harmless.
        let g2 = Guest::new();
        g2.w32(regs::STATUS, 0);
        assert_eq!(g2.r32(regs::STATUS), 0);
    }

    #[test]
    fn interrupts_and_ack() {
        let g = Guest::new();
        g.bring_up();
        let irq = g.t.interrupt.clone();
        irq.trigger(InterruptKind::Queue(1)).unwrap();
        assert_eq!(g.r32(regs::INTERRUPT_STATUS), INT_VRING);
        assert_eq!(g.t.irq_evt().read().unwrap(), 1);
        irq.trigger(InterruptKind::Config).unwrap();
        irq.trigger(InterruptKind::Queue(0)).unwrap();
        assert_eq!(g.r32(regs::INTERRUPT_STATUS), INT_VRING | INT_CONFIG);
        assert_eq!(g.t.irq_evt().read().unwrap(), 2);
        g.w32(regs::INTERRUPT_ACK, INT_VRING);
        assert_eq!(g.r32(regs::INTERRUPT_STATUS), INT_CONFIG);
        assert_eq!(g.t.interrupt_status(), INT_CONFIG);
        g.w32(regs::INTERRUPT_ACK, u32::MAX);
        assert_eq!(g.r32(regs::INTERRUPT_STATUS), 0);
        // InterruptStatus is read-only.
        g.w32(regs::INTERRUPT_STATUS, 3);
        assert_eq!(g.r32(regs::INTERRUPT_STATUS), 0);
    }

    #[test]
    fn config_space_is_forwarded() {
        let g = Guest::new();
        for off in 0..0x80u64 {
            for len in [1usize, 2, 4, 8] {
                let mut ours = vec![0xa5u8; len];
                let mut want = vec![0x5au8; len];
                g.t.read(regs::CONFIG + off, &mut ours);
                g.dev().read_config(off, &mut want);
                assert_eq!(ours, want, "offset {off:#x} len {len}");
            }
        }
        let mut first = [0u8; 4];
        g.dev().read_config(0, &mut first);
        assert_ne!(
            first, [0; 4],
            "config space starts with a non-zero ABI version"
        );
        // Writes go to the device, which ignores them (read-only config space).
        g.t.write(regs::CONFIG, &[0xff; 4]);
        let mut after = [0u8; 4];
        g.t.read(regs::CONFIG, &mut after);
        assert_eq!(after, first);
        // Far offsets read as zero.
        let mut far = [0xa5u8; 8];
        g.t.read(u64::MAX - 3, &mut far);
        assert_eq!(far, [0; 8]);
    }

    #[test]
    fn concurrent_access() {
        let g = Arc::new(Guest::new());
        g.bring_up();
        let threads: Vec<_> = (0..4u32)
            .map(|i| {
                let g = g.clone();
                std::thread::spawn(move || {
                    for n in 0..500u32 {
                        match (n + i) % 4 {
                            0 => assert_eq!(g.r32(regs::MAGIC_VALUE), MAGIC_VALUE),
                            1 => g.w32(regs::QUEUE_NOTIFY, n % 2),
                            2 => g.w32(regs::INTERRUPT_ACK, 1),
                            _ => {
                                let mut b = [0u8; 4];
                                g.t.read(regs::CONFIG, &mut b);
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(g.dev().is_active());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Read {
            offset: u64,
            len: usize,
        },
        Write {
            offset: u64,
            data: Vec<u8>,
        },
        W32 {
            offset: u64,
            value: u32,
        },
        /// A bring-up (status sequence, features, the queues in the mask, DRIVER_OK) from
        /// whatever state the random accesses left, so that the active and needs-reset states
        /// get explored.
        BringUp {
            queues: u8,
        },
    }

    const REGISTERS: [u64; 30] = [
        regs::MAGIC_VALUE,
        regs::VERSION,
        regs::DEVICE_ID,
        regs::VENDOR_ID,
        regs::DEVICE_FEATURES,
        regs::DEVICE_FEATURES_SEL,
        regs::DRIVER_FEATURES,
        regs::DRIVER_FEATURES_SEL,
        regs::QUEUE_SEL,
        regs::QUEUE_NUM_MAX,
        regs::QUEUE_NUM,
        regs::QUEUE_READY,
        regs::QUEUE_NOTIFY,
        regs::INTERRUPT_STATUS,
        regs::INTERRUPT_ACK,
        regs::STATUS,
        regs::QUEUE_DESC_LOW,
        regs::QUEUE_DESC_HIGH,
        regs::QUEUE_DRIVER_LOW,
        regs::QUEUE_DRIVER_HIGH,
        regs::QUEUE_DEVICE_LOW,
        regs::QUEUE_DEVICE_HIGH,
        regs::SHM_SEL,
        regs::SHM_LEN_LOW,
        regs::SHM_LEN_HIGH,
        regs::SHM_BASE_LOW,
        regs::SHM_BASE_HIGH,
        regs::CONFIG_GENERATION,
        regs::CONFIG,
        regs::CONFIG + 4,
    ];

    fn offset() -> impl Strategy<Value = u64> {
        prop_oneof![
            6 => prop::sample::select(REGISTERS.to_vec()),
            2 => (0u64..0x400).prop_map(|i| i * 4),
            2 => 0u64..0x1000,
            1 => any::<u64>(),
            1 => (u64::MAX - 16)..=u64::MAX,
        ]
    }

    fn value() -> impl Strategy<Value = u32> {
        prop_oneof![
            4 => prop::sample::select(vec![
                0u32, 1, 2, 3, 7, 0xb, 0xf, 0x40, 0x80, 0xff, 16, 256, 512,
                QUEUE_BASE as u32, (QUEUE_BASE + 0x4000) as u32, (QUEUE_BASE + 0x8000) as u32,
            ]),
            1 => any::<u32>(),
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            2 => (offset(), 0usize..=16).prop_map(|(offset, len)| Op::Read { offset, len }),
            1 => (offset(), prop::collection::vec(any::<u8>(), 0..=16))
                .prop_map(|(offset, data)| Op::Write { offset, data }),
            6 => (offset(), value()).prop_map(|(offset, value)| Op::W32 { offset, value }),
            1 => (0u8..4).prop_map(|queues| Op::BringUp { queues }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn random_accesses_never_panic(
            start_active in any::<bool>(),
            ops in prop::collection::vec(op(), 0..200),
        ) {
            let g = Guest::new();
            if start_active {
                g.bring_up();
            }
            for op in ops {
                match op {
                    Op::Read { offset, len } => {
                        let mut b = vec![0u8; len];
                        g.t.read(offset, &mut b);
                    }
                    Op::Write { offset, data } => g.t.write(offset, &data),
                    Op::W32 { offset, value } => g.w32(offset, value),
                    Op::BringUp { queues } => {
                        g.negotiate(g.dev().avail_features());
                        for q in 0..2 {
                            if queues & (1 << q) != 0 {
                                g.setup_queue(q, 256);
                            }
                        }
                        g.driver_ok();
                    }
                }
                let status = g.r32(regs::STATUS);
                prop_assert_eq!(g.r32(regs::MAGIC_VALUE), MAGIC_VALUE);
                prop_assert_eq!(status & !0xcf, 0);
                if status & S_DRIVER_OK != 0 {
                    prop_assert_ne!(status & S_FEATURES_OK, 0);
                }
                if status & S_FEATURES_OK != 0 {
                    prop_assert_ne!(g.dev().acked_features() & F_VERSION_1, 0);
                }
                prop_assert_eq!(
                    g.dev().is_active(),
                    status & S_DRIVER_OK != 0 && status & S_NEEDS_RESET == 0
                );
            }
        }
    }

    // ---- live migration ------------------------------------------------------------------

    /// `VRDMA_F_UD` (bit 0): an optional feature the device offers.
    const F_UD: u64 = 1;

    fn new_evt() -> EventFd {
        EventFd::new(EFD_NONBLOCK).unwrap()
    }

    /// A copy of `src` with the same layout (what the VMM transfers).
    fn copy_mem(src: &GuestMemoryMmap) -> Arc<GuestMemoryMmap> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let ranges: Vec<_> = src
            .iter()
            .map(|r| (r.start_addr(), r.len() as usize))
            .collect();
        let dst = GuestMemoryMmap::from_ranges(&ranges).unwrap();
        vrdma_device::dirty::copy_all(src, &dst);
        Arc::new(dst)
    }

    /// Stops the guest's device and saves its transport.
    fn stop_and_save(g: &Guest) -> Vec<u8> {
        g.dev().quiesce().unwrap();
        g.dev().stop().unwrap();
        g.t.save_state().unwrap()
    }

    fn restore(g: &Guest, blob: &[u8]) -> Result<MmioTransport, TransportMigrationError> {
        MmioTransport::restore(&g._fabric, copy_mem(&g.t.mem), new_evt(), blob)
    }

    /// The transport registers as the snapshot sees them (device blob excluded).
    fn registers(t: &MmioTransport) -> TransportSnapshot {
        t.snapshot(Vec::new())
    }

    /// Re-encodes a modified snapshot (valid envelope and checksum).
    fn reencode(blob: &[u8], f: impl FnOnce(&mut TransportSnapshot)) -> Vec<u8> {
        let mut snap = decode_state(blob).unwrap();
        f(&mut snap);
        encode_state(&snap)
    }

    #[test]
    fn migration_round_trip_mid_negotiation() {
        let g = Guest::new();
        g.w32(regs::STATUS, S_ACKNOWLEDGE);
        g.w32(regs::STATUS, S_ACKNOWLEDGE | S_DRIVER);
        g.set_features(F_VERSION_1 | F_UD);
        g.w32(regs::DEVICE_FEATURES_SEL, 1);
        g.setup_queue(0, 64);
        g.w32(regs::QUEUE_SEL, 1);
        g.w32(regs::QUEUE_NUM, 32);
        // A misaligned address as written (the queue keeps its previous, aligned value).
        g.w32(regs::QUEUE_DESC_LOW, 0x1_0008);
        let before = registers(&g.t);
        let blob = stop_and_save(&g);
        assert_eq!(&blob[..8], &STATE_MAGIC);
        let t = restore(&g, &blob).unwrap();
        assert_eq!(registers(&t), before);
        assert_eq!(t.device().acked_features(), g.dev().acked_features());
        assert!(!t.device().is_active());
        t.device().resume().unwrap();
        assert_eq!(
            g.dev().migration_state(),
            vrdma_device::MigrationState::MigratedAway
        );
        // The destination's driver finishes the bring-up where the source's left off.
        let g2 = Guest {
            t,
            _fabric: g._fabric.clone(),
        };
        assert_eq!(g2.r32(regs::QUEUE_NUM_MAX), 256);
        g2.setup_queue(1, 256);
        g2.w32(regs::STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        assert_ne!(g2.r32(regs::STATUS) & S_FEATURES_OK, 0);
        assert_eq!(g2.driver_ok() & S_NEEDS_RESET, 0);
        assert!(g2.dev().is_active());
        assert_eq!(g2.queue_size(0), 64);
    }

    #[test]
    fn migration_round_trip_active_with_pending_interrupt() {
        let g = Guest::new();
        g.bring_up();
        g.w32(regs::QUEUE_SEL, 1);
        g.w32(regs::DRIVER_FEATURES_SEL, 1);
        g.t.interrupt.trigger(InterruptKind::Queue(1)).unwrap();
        assert_eq!(g.t.irq_evt().read().unwrap(), 1);
        let before = registers(&g.t);
        let blob = stop_and_save(&g);
        let t = restore(&g, &blob).unwrap();
        assert_eq!(registers(&t), before);
        assert_eq!(t.interrupt_status(), INT_VRING);
        // The pending interrupt is re-asserted on the new line.
        assert_eq!(t.irq_evt().read().unwrap(), 1);
        assert!(t.device().is_active());
        assert_eq!(
            t.device().migration_state(),
            vrdma_device::MigrationState::Stopped
        );
        t.device().resume().unwrap();
        assert_eq!(
            t.device().migration_state(),
            vrdma_device::MigrationState::Running
        );
        let g2 = Guest {
            t,
            _fabric: g._fabric.clone(),
        };
        g2.w32(regs::INTERRUPT_ACK, INT_VRING);
        assert_eq!(g2.r32(regs::INTERRUPT_STATUS), 0);
        g2.w32(regs::QUEUE_NOTIFY, 0);
        g2.w32(regs::QUEUE_NOTIFY, 1);
        assert_eq!(
            g2.r32(regs::STATUS),
            S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK
        );
        // The source is gone for good.
        assert!(matches!(
            g.t.save_state(),
            Err(TransportMigrationError::Device(
                MigrationError::WrongState { .. }
            ))
        ));
        assert!(g.dev().resume().is_err());
    }

    #[test]
    fn save_requires_a_stopped_device() {
        let g = Guest::new();
        g.bring_up();
        let running = vrdma_device::MigrationState::Running;
        assert_eq!(
            g.t.save_state(),
            Err(TransportMigrationError::Device(
                MigrationError::WrongState {
                    op: "save",
                    state: running
                }
            ))
        );
        g.dev().quiesce().unwrap();
        assert!(g.t.save_state().is_err());
        g.dev().stop().unwrap();
        assert!(g.t.save_state().is_ok());
        // Abort: the source resumes and works.
        g.dev().resume().unwrap();
        g.w32(regs::QUEUE_NOTIFY, 1);
        assert!(g.dev().is_active());
    }

    #[test]
    fn damaged_blobs_are_refused() {
        use TransportMigrationError as E;
        let g = Guest::new();
        g.bring_up();
        let blob = stop_and_save(&g);
        for cut in 0..blob.len() {
            assert!(restore(&g, &blob[..cut]).is_err(), "truncated at {cut}");
        }
        assert_eq!(restore(&g, &blob[..20]).err(), Some(E::Truncated("header")));
        assert_eq!(
            restore(&g, &blob[..blob.len() - 1]).err(),
            Some(E::Truncated("body"))
        );
        assert_eq!(restore(&g, b"nonsense").err(), Some(E::BadMagic));
        let mut bad = blob.clone();
        bad[3] ^= 0x20;
        assert_eq!(restore(&g, &bad).err(), Some(E::BadMagic));
        let mut bad = blob.clone();
        bad[8] = 2;
        assert_eq!(restore(&g, &bad).err(), Some(E::UnsupportedVersion(2)));
        let mut bad = blob.clone();
        bad[12] = 1;
        assert!(matches!(restore(&g, &bad), Err(E::Invalid(_))));
        for at in [STATE_HEADER_LEN, STATE_HEADER_LEN + 40, blob.len() - 1] {
            let mut bad = blob.clone();
            bad[at] ^= 0x01;
            assert_eq!(restore(&g, &bad).err(), Some(E::Checksum), "byte {at}");
        }
        let mut long = blob.clone();
        long.push(0);
        assert!(matches!(restore(&g, &long), Err(E::Invalid(_))));
        // The source is untouched: it resumes.
        g.dev().resume().unwrap();
        assert!(g.dev().is_active());
    }

    #[test]
    fn inconsistent_registers_are_refused() {
        use TransportMigrationError as E;
        let g = Guest::new();
        g.bring_up();
        let blob = stop_and_save(&g);
        let idle = {
            let g = Guest::new();
            stop_and_save(&g)
        };
        let idle_device = decode_state(&idle).unwrap().device;
        type Edit = Box<dyn Fn(&mut TransportSnapshot)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("unknown status bit", Box::new(|s| s.status |= 0x10)),
            (
                "DRIVER_OK without FEATURES_OK",
                Box::new(|s| s.status = S_ACKNOWLEDGE | S_DRIVER | S_DRIVER_OK),
            ),
            (
                "not live but the device is active",
                Box::new(|s| s.status = S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK),
            ),
            (
                "needs reset but the device is active",
                Box::new(|s| s.status |= S_NEEDS_RESET),
            ),
            (
                "live but the device never activated",
                Box::new(move |s| s.device = idle_device.clone()),
            ),
            (
                "features differ from the device's",
                Box::new(|s| s.driver_features &= !F_UD),
            ),
            (
                "features not offered",
                Box::new(|s| s.driver_features |= 1 << 23),
            ),
            (
                "interrupt status bits",
                Box::new(|s| s.interrupt_status = 4),
            ),
            (
                "a queue missing",
                Box::new(|s| {
                    s.queues.pop();
                }),
            ),
            ("a queue too many", Box::new(|s| s.queues.push(None))),
            ("a queue absent", Box::new(|s| s.queues[0] = None)),
            (
                "bad queue size",
                Box::new(|s| s.queues[0].as_mut().unwrap().queue.size = 3),
            ),
            (
                "bad maximum size",
                Box::new(|s| s.queues[0].as_mut().unwrap().queue.max_size = 128),
            ),
            (
                "misaligned descriptor table",
                Box::new(|s| s.queues[1].as_mut().unwrap().queue.desc_table += 8),
            ),
            (
                "live queue written misaligned",
                Box::new(|s| s.queues[1].as_mut().unwrap().raw_desc += 8),
            ),
            (
                "live queue not ready",
                Box::new(|s| s.queues[1].as_mut().unwrap().queue.ready = false),
            ),
            (
                "live queue outside guest memory",
                Box::new(|s| {
                    let q = s.queues[0].as_mut().unwrap();
                    q.queue.used_ring = 0xffff_0000_0000;
                    q.raw_device = 0xffff_0000_0000;
                }),
            ),
        ];
        for (what, edit) in cases {
            let bad = reencode(&blob, edit);
            match restore(&g, &bad) {
                Err(E::Invalid(_)) => {}
                other => panic!("{what}: {other:?}"),
            }
        }
        let garbage = reencode(&blob, |s| s.device = b"VRDMAMIG".to_vec());
        assert!(matches!(
            restore(&g, &garbage),
            Err(E::Device(MigrationError::Truncated(_)))
        ));
        let garbage = reencode(&blob, |s| s.device.clear());
        assert!(matches!(restore(&g, &garbage), Err(E::Device(_))));
        // Unmodified, it restores (and is dropped without taking over).
        assert!(restore(&g, &blob).is_ok());
        g.dev().resume().unwrap();
        assert!(g.dev().is_active());
    }

    #[test]
    fn restore_into_a_smaller_memory_fails() {
        let g = Guest::new();
        g.bring_up();
        let blob = stop_and_save(&g);
        let small = Arc::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), QUEUE_BASE as usize)]).unwrap(),
        );
        let r = MmioTransport::restore(&g._fabric, small, new_evt(), &blob);
        assert!(
            matches!(
                r,
                Err(TransportMigrationError::Device(MigrationError::Invalid(_)))
            ),
            "{r:?}"
        );
        g.dev().resume().unwrap();
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// Corrupted bodies with a valid checksum: an error or a (never resumed) device, never a
        /// panic.
        #[test]
        fn mutated_bodies_never_panic(
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        ) {
            let g = Guest::new();
            g.bring_up();
            let mut blob = stop_and_save(&g);
            let body_len = blob.len() - STATE_HEADER_LEN;
            for (at, v) in edits {
                blob[STATE_HEADER_LEN + at.index(body_len)] = v;
            }
            let crc = crc32fast::hash(&blob[STATE_HEADER_LEN..]);
            blob[24..28].copy_from_slice(&crc.to_le_bytes());
            let _ = restore(&g, &blob);
            g.dev().resume().unwrap();
            prop_assert!(g.dev().is_active());
        }
    }
}
