//! A minimal MMIO bus: maps guest-physical windows to devices so that a vCPU's MMIO exit can be
//! dispatched with one lookup.
//!
//! The bus has no KVM dependency. A VMM builds it once at start-up (devices are not hot-plugged)
//! and shares it, read-only, between its vCPU threads.

use std::collections::BTreeMap;
use std::sync::Arc;

use thiserror::Error;

use crate::MmioTransport;

/// A device that occupies a window on the [`MmioBus`]. Offsets are relative to the window base.
///
/// Both methods take `&self`: several vCPU threads may access the same device concurrently.
pub trait BusDevice: Send + Sync {
    /// Handles a read of `data.len()` bytes at `offset`.
    fn read(&self, offset: u64, data: &mut [u8]);
    /// Handles a write of `data` at `offset`.
    fn write(&self, offset: u64, data: &[u8]);
}

impl BusDevice for MmioTransport {
    fn read(&self, offset: u64, data: &mut [u8]) {
        MmioTransport::read(self, offset, data)
    }

    fn write(&self, offset: u64, data: &[u8]) {
        MmioTransport::write(self, offset, data)
    }
}

/// Why a window could not be inserted.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    /// The window is empty or wraps around the address space.
    #[error("invalid window {base:#x} + {len:#x}")]
    InvalidWindow {
        /// Requested base.
        base: u64,
        /// Requested length.
        len: u64,
    },
    /// The window overlaps one that is already on the bus.
    #[error("window {base:#x} + {len:#x} overlaps an existing window at {other:#x}")]
    Overlap {
        /// Requested base.
        base: u64,
        /// Requested length.
        len: u64,
        /// Base of the existing window.
        other: u64,
    },
}

struct Entry {
    len: u64,
    device: Arc<dyn BusDevice>,
}

/// Guest-physical windows and the devices behind them.
#[derive(Default)]
pub struct MmioBus {
    windows: BTreeMap<u64, Entry>,
}

impl std::fmt::Debug for MmioBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.windows.iter().map(|(b, e)| (*b, e.len)))
            .finish()
    }
}

impl MmioBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<dyn BusDevice>,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidWindow { base, len })?;
        // The window starting at or below `base`, and the first one above it.
        let below = self.windows.range(..=base).next_back();
        let above = self.windows.range(base..).next();
        for (&b, e) in below.into_iter().chain(above) {
            let overlaps = b < end && base < b.saturating_add(e.len);
            if overlaps {
                return Err(BusError::Overlap {
                    base,
                    len,
                    other: b,
                });
            }
        }
        self.windows.insert(base, Entry { len, device });
        Ok(())
    }

    /// The device whose window contains the whole access `[addr, addr + size)`, with the offset
    /// of `addr` in that window. An access that straddles a window's end matches nothing.
    pub fn resolve(&self, addr: u64, size: usize) -> Option<(&Arc<dyn BusDevice>, u64)> {
        let (&base, e) = self.windows.range(..=addr).next_back()?;
        let offset = addr - base;
        let end = offset.checked_add(size as u64)?;
        (end <= e.len).then_some((&e.device, offset))
    }

    /// Dispatches a read. Returns `false` (and fills `data` with `0xff`, like an unclaimed bus)
    /// when no device claims the address.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((dev, offset)) => {
                dev.read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write. Returns `false` when no device claims the address (the write is
    /// dropped).
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((dev, offset)) => {
                dev.write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder {
        log: Mutex<Vec<(bool, u64, usize)>>,
    }

    impl BusDevice for Recorder {
        fn read(&self, offset: u64, data: &mut [u8]) {
            self.log.lock().unwrap().push((false, offset, data.len()));
            data.fill(0x11);
        }
        fn write(&self, offset: u64, data: &[u8]) {
            self.log.lock().unwrap().push((true, offset, data.len()));
        }
    }

    #[test]
    fn dispatch_and_offsets() {
        let a = Arc::new(Recorder::default());
        let b = Arc::new(Recorder::default());
        let mut bus = MmioBus::new();
        bus.insert(0x1000, 0x1000, a.clone()).unwrap();
        bus.insert(0x3000, 0x1000, b.clone()).unwrap();
        let mut d = [0u8; 4];
        assert!(bus.read(0x1050, &mut d));
        assert_eq!(d, [0x11; 4]);
        assert!(bus.write(0x3ffc, &[0; 4]));
        assert!(!bus.write(0x2000, &[0; 4]));
        assert!(!bus.read(0x0fff, &mut d));
        assert_eq!(d, [0xff; 4]);
        // Straddles the end of a's window.
        assert!(!bus.read(0x1ffe, &mut d));
        assert_eq!(*a.log.lock().unwrap(), vec![(false, 0x50, 4)]);
        assert_eq!(*b.log.lock().unwrap(), vec![(true, 0xffc, 4)]);
    }

    #[test]
    fn overlaps_and_bad_windows_are_rejected() {
        let d: Arc<dyn BusDevice> = Arc::new(Recorder::default());
        let mut bus = MmioBus::new();
        bus.insert(0x1000, 0x1000, d.clone()).unwrap();
        for (base, len) in [(0x1000, 1), (0x0800, 0x1000), (0x1fff, 0x10), (0, 0x2000)] {
            assert!(matches!(
                bus.insert(base, len, d.clone()),
                Err(BusError::Overlap { .. })
            ));
        }
        assert!(matches!(
            bus.insert(0x5000, 0, d.clone()),
            Err(BusError::InvalidWindow { .. })
        ));
        assert!(matches!(
            bus.insert(u64::MAX, 2, d.clone()),
            Err(BusError::InvalidWindow { .. })
        ));
        // Adjacent windows are fine.
        bus.insert(0x0, 0x1000, d.clone()).unwrap();
        bus.insert(0x2000, 0x1000, d).unwrap();
        assert!(bus.resolve(u64::MAX, 1).is_none());
    }
}
