//! The virtio-mmio register window (virtio 1.x spec §4.2.2, "modern" version 2 layout) and the
//! [`Transport`] trait through which the driver reaches it.
//!
//! Every register is 32 bits wide and accessed with 32-bit reads and writes; the device-specific
//! configuration space starts at [`CONFIG`].

use std::sync::Arc;
use std::time::Duration;

/// How the driver reaches the device: MMIO accesses to the virtio-mmio register window plus a
/// way to wait for the device's interrupt.
///
/// The driver only ever performs aligned 32-bit accesses to registers and aligned 32-bit accesses
/// to the configuration space.
pub trait Transport: Send + Sync {
    /// MMIO read of the virtio-mmio register window at `offset` (virtio spec 4.2.2, version 2
    /// layout; config space at 0x100).
    fn read(&self, offset: u64, data: &mut [u8]);
    /// MMIO write of the virtio-mmio register window at `offset`.
    fn write(&self, offset: u64, data: &[u8]);
    /// Blocks until the device raises its interrupt or `timeout` passes; true if it fired.
    fn wait_interrupt(&self, timeout: Duration) -> bool;
}

impl<T: Transport + ?Sized> Transport for Arc<T> {
    fn read(&self, offset: u64, data: &mut [u8]) {
        (**self).read(offset, data)
    }
    fn write(&self, offset: u64, data: &[u8]) {
        (**self).write(offset, data)
    }
    fn wait_interrupt(&self, timeout: Duration) -> bool {
        (**self).wait_interrupt(timeout)
    }
}

impl<T: Transport + ?Sized> Transport for Box<T> {
    fn read(&self, offset: u64, data: &mut [u8]) {
        (**self).read(offset, data)
    }
    fn write(&self, offset: u64, data: &[u8]) {
        (**self).write(offset, data)
    }
    fn wait_interrupt(&self, timeout: Duration) -> bool {
        (**self).wait_interrupt(timeout)
    }
}

/// Reads a 32-bit little-endian register.
pub(crate) fn read32(t: &dyn Transport, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// Writes a 32-bit little-endian register.
pub(crate) fn write32(t: &dyn Transport, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

// Register offsets (virtio 1.x spec, table "MMIO Device Register Layout").

/// `MagicValue` (R): 0x74726976 ("virt").
pub const MAGIC_VALUE: u64 = 0x000;
/// `Version` (R): 2 for the modern layout.
pub const VERSION: u64 = 0x004;
/// `DeviceID` (R): virtio device type.
pub const DEVICE_ID: u64 = 0x008;
/// `VendorID` (R).
pub const VENDOR_ID: u64 = 0x00c;
/// `DeviceFeatures` (R): 32 feature bits selected by [`DEVICE_FEATURES_SEL`].
pub const DEVICE_FEATURES: u64 = 0x010;
/// `DeviceFeaturesSel` (W).
pub const DEVICE_FEATURES_SEL: u64 = 0x014;
/// `DriverFeatures` (W): 32 feature bits selected by [`DRIVER_FEATURES_SEL`].
pub const DRIVER_FEATURES: u64 = 0x020;
/// `DriverFeaturesSel` (W).
pub const DRIVER_FEATURES_SEL: u64 = 0x024;
/// `QueueSel` (W).
pub const QUEUE_SEL: u64 = 0x030;
/// `QueueNumMax` (R).
pub const QUEUE_NUM_MAX: u64 = 0x034;
/// `QueueNum` (W).
pub const QUEUE_NUM: u64 = 0x038;
/// `QueueReady` (RW).
pub const QUEUE_READY: u64 = 0x044;
/// `QueueNotify` (W): the value written is the queue index.
pub const QUEUE_NOTIFY: u64 = 0x050;
/// `InterruptStatus` (R).
pub const INTERRUPT_STATUS: u64 = 0x060;
/// `InterruptACK` (W).
pub const INTERRUPT_ACK: u64 = 0x064;
/// `Status` (RW): device status; writing 0 resets the device.
pub const STATUS: u64 = 0x070;
/// `QueueDescLow` (W).
pub const QUEUE_DESC_LOW: u64 = 0x080;
/// `QueueDescHigh` (W).
pub const QUEUE_DESC_HIGH: u64 = 0x084;
/// `QueueDriverLow` (W): the available ring.
pub const QUEUE_DRIVER_LOW: u64 = 0x090;
/// `QueueDriverHigh` (W).
pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
/// `QueueDeviceLow` (W): the used ring.
pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
/// `QueueDeviceHigh` (W).
pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
/// `ConfigGeneration` (R).
pub const CONFIG_GENERATION: u64 = 0x0fc;
/// Start of the device-specific configuration space ([`vrdma_abi::VrdmaConfig`]).
pub const CONFIG: u64 = 0x100;

/// The value of [`MAGIC_VALUE`].
pub const MAGIC: u32 = 0x7472_6976;
/// The modern virtio-mmio version.
pub const MMIO_VERSION_2: u32 = 2;

// Device status bits (virtio 1.x spec §2.1).

/// The guest found the device.
pub const STATUS_ACKNOWLEDGE: u32 = 1;
/// The guest has a driver for it.
pub const STATUS_DRIVER: u32 = 2;
/// The driver is ready.
pub const STATUS_DRIVER_OK: u32 = 4;
/// Feature negotiation is complete.
pub const STATUS_FEATURES_OK: u32 = 8;
/// The device hit an error and needs a reset.
pub const STATUS_DEVICE_NEEDS_RESET: u32 = 64;
/// The driver gave up on the device.
pub const STATUS_FAILED: u32 = 128;

// InterruptStatus bits.

/// A used buffer was added to one of the queues.
pub const INT_VRING: u32 = 1;
/// The configuration space changed.
pub const INT_CONFIG: u32 = 2;

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_config as cfg;
    use virtio_bindings::virtio_mmio as m;

    #[test]
    fn offsets_match_virtio_bindings() {
        assert_eq!(MAGIC_VALUE, u64::from(m::VIRTIO_MMIO_MAGIC_VALUE));
        assert_eq!(VERSION, u64::from(m::VIRTIO_MMIO_VERSION));
        assert_eq!(DEVICE_ID, u64::from(m::VIRTIO_MMIO_DEVICE_ID));
        assert_eq!(VENDOR_ID, u64::from(m::VIRTIO_MMIO_VENDOR_ID));
        assert_eq!(DEVICE_FEATURES, u64::from(m::VIRTIO_MMIO_DEVICE_FEATURES));
        assert_eq!(
            DEVICE_FEATURES_SEL,
            u64::from(m::VIRTIO_MMIO_DEVICE_FEATURES_SEL)
        );
        assert_eq!(DRIVER_FEATURES, u64::from(m::VIRTIO_MMIO_DRIVER_FEATURES));
        assert_eq!(
            DRIVER_FEATURES_SEL,
            u64::from(m::VIRTIO_MMIO_DRIVER_FEATURES_SEL)
        );
        assert_eq!(QUEUE_SEL, u64::from(m::VIRTIO_MMIO_QUEUE_SEL));
        assert_eq!(QUEUE_NUM_MAX, u64::from(m::VIRTIO_MMIO_QUEUE_NUM_MAX));
        assert_eq!(QUEUE_NUM, u64::from(m::VIRTIO_MMIO_QUEUE_NUM));
        assert_eq!(QUEUE_READY, u64::from(m::VIRTIO_MMIO_QUEUE_READY));
        assert_eq!(QUEUE_NOTIFY, u64::from(m::VIRTIO_MMIO_QUEUE_NOTIFY));
        assert_eq!(INTERRUPT_STATUS, u64::from(m::VIRTIO_MMIO_INTERRUPT_STATUS));
        assert_eq!(INTERRUPT_ACK, u64::from(m::VIRTIO_MMIO_INTERRUPT_ACK));
        assert_eq!(STATUS, u64::from(m::VIRTIO_MMIO_STATUS));
        assert_eq!(QUEUE_DESC_LOW, u64::from(m::VIRTIO_MMIO_QUEUE_DESC_LOW));
        assert_eq!(QUEUE_DESC_HIGH, u64::from(m::VIRTIO_MMIO_QUEUE_DESC_HIGH));
        assert_eq!(QUEUE_DRIVER_LOW, u64::from(m::VIRTIO_MMIO_QUEUE_AVAIL_LOW));
        assert_eq!(
            QUEUE_DRIVER_HIGH,
            u64::from(m::VIRTIO_MMIO_QUEUE_AVAIL_HIGH)
        );
        assert_eq!(QUEUE_DEVICE_LOW, u64::from(m::VIRTIO_MMIO_QUEUE_USED_LOW));
        assert_eq!(QUEUE_DEVICE_HIGH, u64::from(m::VIRTIO_MMIO_QUEUE_USED_HIGH));
        assert_eq!(
            CONFIG_GENERATION,
            u64::from(m::VIRTIO_MMIO_CONFIG_GENERATION)
        );
        assert_eq!(CONFIG, u64::from(m::VIRTIO_MMIO_CONFIG));
        assert_eq!(INT_VRING, m::VIRTIO_MMIO_INT_VRING);
        assert_eq!(INT_CONFIG, m::VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(STATUS_ACKNOWLEDGE, cfg::VIRTIO_CONFIG_S_ACKNOWLEDGE);
        assert_eq!(STATUS_DRIVER, cfg::VIRTIO_CONFIG_S_DRIVER);
        assert_eq!(STATUS_DRIVER_OK, cfg::VIRTIO_CONFIG_S_DRIVER_OK);
        assert_eq!(STATUS_FEATURES_OK, cfg::VIRTIO_CONFIG_S_FEATURES_OK);
        assert_eq!(STATUS_FAILED, cfg::VIRTIO_CONFIG_S_FAILED);
    }
}
