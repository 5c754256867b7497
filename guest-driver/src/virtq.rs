//! Driver side of a virtio 1.x split virtqueue (spec §2.7): descriptor table, available ring and
//! used ring in guest memory.
//!
//! No indirect descriptors and no `VIRTIO_F_EVENT_IDX`: the driver publishes every chain with the
//! available index and always wants used-buffer interrupts (avail `flags` = 0).
//!
//! The driver keeps its own shadow of which descriptors form which chain, so that a misbehaving
//! device cannot corrupt the free list through the descriptor table.

use std::sync::atomic::{fence, Ordering};

use vm_memory::{Address, GuestAddress};

use crate::error::{Error, Result};
use crate::GuestMemoryMmap;

/// Descriptor continues via the `next` field.
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// Buffer is device-writable (otherwise device-readable).
pub const VIRTQ_DESC_F_WRITE: u16 = 2;

/// Size of one descriptor.
pub const DESC_SIZE: u64 = 16;
/// Size of one used-ring element (`id: u32, len: u32`).
pub const USED_ELEM_SIZE: u64 = 8;

/// Bytes of the descriptor table for `size` entries (alignment 16).
pub const fn desc_table_bytes(size: u16) -> u64 {
    DESC_SIZE * size as u64
}

/// Bytes of the available ring: `flags, idx, ring[size], used_event` (alignment 2).
pub const fn avail_ring_bytes(size: u16) -> u64 {
    4 + 2 * size as u64 + 2
}

/// Bytes of the used ring: `flags, idx, ring[size] of (id, len), avail_event` (alignment 4).
pub const fn used_ring_bytes(size: u16) -> u64 {
    4 + USED_ELEM_SIZE * size as u64 + 2
}

/// One buffer of a chain: guest-physical address, length, device-writable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seg {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (`VIRTQ_DESC_F_WRITE`).
    pub writable: bool,
}

/// The driver's view of one split virtqueue.
#[derive(Debug)]
pub struct SplitQueue {
    /// Queue size (number of descriptors), a power of two.
    size: u16,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    /// Free descriptor indices (a stack).
    free: Vec<u16>,
    /// Shadow of each descriptor's `next` within in-flight chains.
    next: Vec<u16>,
    /// For a chain head: the number of descriptors in its chain; 0 if not an in-flight head.
    chain_len: Vec<u16>,
    /// Next available-ring index to publish (free-running).
    avail_idx: u16,
    /// Next used-ring index to consume (free-running).
    last_used: u16,
}

impl SplitQueue {
    /// A queue whose three parts live at the given guest-physical addresses (which must be
    /// aligned and large enough for `size`; see the `*_bytes` functions). Call
    /// [`SplitQueue::reset`] before use.
    pub fn new(size: u16, desc: GuestAddress, avail: GuestAddress, used: GuestAddress) -> Self {
        let mut q = SplitQueue {
            size,
            desc,
            avail,
            used,
            free: Vec::new(),
            next: Vec::new(),
            chain_len: Vec::new(),
            avail_idx: 0,
            last_used: 0,
        };
        q.reset_state(size);
        q
    }

    fn reset_state(&mut self, size: u16) {
        assert!(size.is_power_of_two(), "queue size must be a power of two");
        self.size = size;
        self.free = (0..size).rev().collect();
        self.next = vec![0; size as usize];
        self.chain_len = vec![0; size as usize];
        self.avail_idx = 0;
        self.last_used = 0;
    }

    /// Forgets all chains, sets the size and zeroes the rings in guest memory (as before
    /// `QueueReady` after a device reset).
    pub fn reset(&mut self, mem: &GuestMemoryMmap, size: u16) -> Result<()> {
        self.reset_state(size);
        zero(mem, self.desc, desc_table_bytes(size))?;
        zero(mem, self.avail, avail_ring_bytes(size))?;
        zero(mem, self.used, used_ring_bytes(size))?;
        Ok(())
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Guest-physical addresses of (descriptor table, available ring, used ring).
    pub fn addresses(&self) -> (GuestAddress, GuestAddress, GuestAddress) {
        (self.desc, self.avail, self.used)
    }

    /// Free descriptors.
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Writes a descriptor chain and publishes it in the available ring. Returns the head index.
    ///
    /// Order: descriptors and the ring entry first, then a release store of `avail.idx` (the
    /// release orders everything before it). The caller notifies the device afterwards.
    pub fn add(&mut self, mem: &GuestMemoryMmap, segs: &[Seg]) -> Result<u16> {
        if segs.is_empty() {
            return Err(Error::InvalidArgument("empty descriptor chain"));
        }
        if segs.len() > self.free.len() {
            return Err(Error::QueueFull {
                queue: "virtqueue",
                needed: segs.len() as u32,
                free: self.free.len() as u32,
            });
        }
        let n = self.free.len();
        // Take the descriptors from the top of the free stack; the last one taken is the head.
        let ids = &self.free[n - segs.len()..];
        let head = ids[ids.len() - 1];
        for (k, seg) in segs.iter().enumerate() {
            let id = ids[ids.len() - 1 - k];
            let last = k + 1 == segs.len();
            let next = if last { 0 } else { ids[ids.len() - 2 - k] };
            let mut flags = 0;
            if !last {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            if seg.writable {
                flags |= VIRTQ_DESC_F_WRITE;
            }
            let mut d = [0u8; DESC_SIZE as usize];
            d[0..8].copy_from_slice(&seg.addr.to_le_bytes());
            d[8..12].copy_from_slice(&seg.len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
            crate::gmem::write_slice(mem, &d, self.desc_addr(id))?;
            self.next[id as usize] = next;
        }
        self.free.truncate(n - segs.len());
        self.chain_len[head as usize] = segs.len() as u16;

        let slot = self.avail_idx % self.size;
        crate::gmem::write_obj(mem, head, self.avail.unchecked_add(4 + 2 * slot as u64))?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        fence(Ordering::Release);
        crate::gmem::store(
            mem,
            self.avail_idx,
            self.avail.unchecked_add(2),
            Ordering::Release,
        )?;
        Ok(head)
    }

    /// Takes the next entry of the used ring, if the device published one: `(head, len)`. The
    /// chain's descriptors return to the free list.
    pub fn pop_used(&mut self, mem: &GuestMemoryMmap) -> Result<Option<(u16, u32)>> {
        let used_idx: u16 = crate::gmem::load(mem, self.used.unchecked_add(2), Ordering::Acquire)?;
        if used_idx == self.last_used {
            return Ok(None);
        }
        let slot = self.last_used % self.size;
        let mut e = [0u8; USED_ELEM_SIZE as usize];
        crate::gmem::read_slice(
            mem,
            &mut e,
            self.used.unchecked_add(4 + USED_ELEM_SIZE * slot as u64),
        )?;
        let id = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
        let len = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
        self.last_used = self.last_used.wrapping_add(1);
        let head = u16::try_from(id)
            .ok()
            .filter(|&h| h < self.size && self.chain_len[h as usize] != 0)
            .ok_or(Error::Protocol(
                "used ring names a descriptor that is not an in-flight head",
            ))?;
        let mut id = head;
        for _ in 0..std::mem::take(&mut self.chain_len[head as usize]) {
            self.free.push(id);
            id = self.next[id as usize];
        }
        Ok(Some((head, len)))
    }

    fn desc_addr(&self, id: u16) -> GuestAddress {
        self.desc.unchecked_add(DESC_SIZE * id as u64)
    }
}

/// Zeroes `len` bytes of guest memory at `addr`.
pub(crate) fn zero(mem: &GuestMemoryMmap, addr: GuestAddress, len: u64) -> Result<()> {
    static ZEROES: [u8; 4096] = [0; 4096];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(ZEROES.len() as u64);
        crate::gmem::write_slice(mem, &ZEROES[..n as usize], addr.unchecked_add(off))?;
        off += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring as vr;
    use virtio_queue::{Queue, QueueOwnedT, QueueT};

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    /// The device side, as our VMM's device implements it.
    fn device_queue(m: &GuestMemoryMmap, size: u16) -> Queue {
        let mut q = Queue::new(256).unwrap();
        q.set_size(size);
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_ready(true);
        assert!(q.is_valid(m));
        q
    }

    #[test]
    fn layout_math() {
        assert_eq!(desc_table_bytes(256), 4096);
        assert_eq!(avail_ring_bytes(256), 518);
        assert_eq!(used_ring_bytes(256), 2054);
        assert_eq!(VIRTQ_DESC_F_NEXT as u32, vr::VRING_DESC_F_NEXT);
        assert_eq!(VIRTQ_DESC_F_WRITE as u32, vr::VRING_DESC_F_WRITE);
    }

    #[test]
    fn chains_round_trip_through_virtio_queue() {
        let m = mem();
        let size = 8;
        let mut drv = SplitQueue::new(
            size,
            GuestAddress(DESC),
            GuestAddress(AVAIL),
            GuestAddress(USED),
        );
        drv.reset(&m, size).unwrap();
        let mut dev = device_queue(&m, size);

        // Many rounds so that the indices wrap the ring several times.
        for round in 0..40u32 {
            let segs = [
                Seg {
                    addr: 0x8000,
                    len: 24,
                    writable: false,
                },
                Seg {
                    addr: 0x9000,
                    len: 4096,
                    writable: false,
                },
                Seg {
                    addr: 0xa000,
                    len: 64 + round,
                    writable: true,
                },
            ];
            let head = drv.add(&m, &segs).unwrap();
            assert_eq!(drv.num_free(), size as usize - 3);
            assert_eq!(drv.pop_used(&m).unwrap(), None);

            let chain = dev.iter(&m).unwrap().next().expect("device sees the chain");
            assert_eq!(chain.head_index(), head);
            let got: Vec<Seg> = chain
                .map(|d| Seg {
                    addr: d.addr().0,
                    len: d.len(),
                    writable: d.is_write_only(),
                })
                .collect();
            assert_eq!(got, segs);
            dev.add_used(&m, head, 10 + round).unwrap();

            assert_eq!(drv.pop_used(&m).unwrap(), Some((head, 10 + round)));
            assert_eq!(drv.num_free(), size as usize);
            assert_eq!(drv.pop_used(&m).unwrap(), None);
        }
    }

    #[test]
    fn full_queue_and_out_of_order_completion() {
        let m = mem();
        let size = 4;
        let mut drv = SplitQueue::new(
            size,
            GuestAddress(DESC),
            GuestAddress(AVAIL),
            GuestAddress(USED),
        );
        drv.reset(&m, size).unwrap();
        let mut dev = device_queue(&m, size);
        let one = |a| {
            [Seg {
                addr: a,
                len: 16,
                writable: true,
            }]
        };
        let heads: Vec<u16> = (0..4)
            .map(|i| drv.add(&m, &one(0x8000 + i * 16)).unwrap())
            .collect();
        assert!(matches!(
            drv.add(&m, &one(0x9000)),
            Err(Error::QueueFull { .. })
        ));
        let mut seen = Vec::new();
        while let Some(c) = dev.pop_descriptor_chain(&m) {
            seen.push(c.head_index());
        }
        assert_eq!(seen, heads);
        // Complete in reverse order.
        for &h in heads.iter().rev() {
            dev.add_used(&m, h, 16).unwrap();
        }
        for &h in heads.iter().rev() {
            assert_eq!(drv.pop_used(&m).unwrap(), Some((h, 16)));
        }
        // A bogus used entry is a protocol error.
        let h = drv.add(&m, &one(0x8000)).unwrap();
        let bogus = (h + 1) % size;
        dev.add_used(&m, bogus, 0).unwrap();
        assert!(matches!(drv.pop_used(&m), Err(Error::Protocol(_))));
    }
}
