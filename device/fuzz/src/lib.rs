//! Helpers shared by the vrdma fuzz targets: a small guest (memory + real device + real
//! virtio-mmio transport) driven by a minimal raw virtio driver, and a byte-stream reader for
//! fuzz inputs.
//!
//! Every check here is an invariant the device must keep for *any* input; a failing check
//! panics, which libFuzzer reports as a crash.

use std::sync::Arc;

use vm_memory::{ByteValued, Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vrdma_abi as abi;
use vrdma_device::soft::SoftFabric;
use vrdma_device::{DeviceConfig, GuestMemoryMmap, Vrdma};
use vrdma_glue::MmioTransport;
use vrdma_guest::mmio as reg;

/// Guest memory of the small guest.
pub const MEM_SIZE: u64 = 4 << 20;
/// Virtqueue size used by the raw driver.
pub const QSIZE: u16 = 16;
/// Queue memory: descriptor table, available ring, used ring (one page each) per queue.
pub const QUEUES: [u64; 2] = [0x1_0000, 0x1_4000];
/// Event buffers.
pub const EVBUF: u64 = 0x1_8000;
/// Request scratch (64 KiB).
pub const REQ: u64 = 0x2_0000;
/// Response scratch (64 KiB).
pub const RESP: u64 = 0x3_0000;
/// Doorbell area.
pub const DB: u64 = 0x4_0000;
/// First page handed out for rings and MRs (the rest of memory up to `MEM_SIZE`).
pub const FREE: u64 = 0x8_0000;

/// Virtqueue descriptor flag: next is valid.
pub const VQ_NEXT: u16 = 1;
/// Virtqueue descriptor flag: device-writable.
pub const VQ_WRITE: u16 = 2;

/// A small configuration, so that table limits are reachable by a fuzzer.
pub fn small_config() -> DeviceConfig {
    DeviceConfig {
        max_qp: 8,
        max_cq: 8,
        max_pd: 8,
        max_ah: 8,
        max_mr: 16,
        max_qp_wr: 64,
        max_cqe: 256,
        max_ring_pages: 64,
        max_mr_pages: 256,
        max_total_mr_pages: 512,
        max_total_ring_pages: 256,
        max_mr_size: 1 << 20,
        ..DeviceConfig::with_gid(DeviceConfig::gid_for_id(1))
    }
}

/// One descriptor as the raw driver writes it.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    /// Descriptor table index (indices outside the table are not written).
    pub index: u16,
    /// Guest address.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// `VQ_*` flags.
    pub flags: u16,
    /// Next index.
    pub next: u16,
}

/// A small guest with a raw virtio driver.
pub struct RawGuest {
    /// Keeps the fabric (and its timer thread) alive as long as the guest.
    pub fabric: Arc<SoftFabric>,
    /// Guest memory.
    pub mem: Arc<GuestMemoryMmap>,
    /// The transport (the guest's MMIO window).
    pub t: Arc<MmioTransport>,
    next_avail: [u16; 2],
    last_used: [u16; 2],
}

impl RawGuest {
    /// A fresh device, brought up to DRIVER_OK with both queues and stocked event buffers.
    pub fn new() -> RawGuest {
        let fabric = SoftFabric::new();
        let mem = Arc::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
                .expect("guest memory"),
        );
        let dev = Vrdma::new(small_config(), &fabric).expect("device");
        let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let t = Arc::new(MmioTransport::new(dev, mem.clone(), irq));
        let mut g = RawGuest {
            fabric,
            mem,
            t,
            next_avail: [0; 2],
            last_used: [0; 2],
        };
        g.bring_up();
        g
    }

    /// Reads a 32-bit register.
    pub fn r32(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    /// Writes a 32-bit register.
    pub fn w32(&self, off: u64, v: u32) {
        self.t.write(off, &v.to_le_bytes());
    }

    fn bring_up(&mut self) {
        self.w32(reg::STATUS, 0);
        self.w32(reg::STATUS, reg::STATUS_ACKNOWLEDGE);
        self.w32(reg::STATUS, reg::STATUS_ACKNOWLEDGE | reg::STATUS_DRIVER);
        for sel in 0..2 {
            self.w32(reg::DEVICE_FEATURES_SEL, sel);
            let f = self.r32(reg::DEVICE_FEATURES);
            self.w32(reg::DRIVER_FEATURES_SEL, sel);
            self.w32(reg::DRIVER_FEATURES, f);
        }
        let st = reg::STATUS_ACKNOWLEDGE | reg::STATUS_DRIVER | reg::STATUS_FEATURES_OK;
        self.w32(reg::STATUS, st);
        assert_eq!(self.r32(reg::STATUS), st, "FEATURES_OK refused");
        for (i, &base) in QUEUES.iter().enumerate() {
            self.mem
                .write_slice(&[0u8; 0x3000], GuestAddress(base))
                .unwrap();
            self.w32(reg::QUEUE_SEL, i as u32);
            self.w32(reg::QUEUE_NUM, QSIZE as u32);
            for (lo, addr) in [
                (reg::QUEUE_DESC_LOW, base),
                (reg::QUEUE_DRIVER_LOW, base + 0x1000),
                (reg::QUEUE_DEVICE_LOW, base + 0x2000),
            ] {
                self.w32(lo, addr as u32);
                self.w32(lo + 4, (addr >> 32) as u32);
            }
            self.w32(reg::QUEUE_READY, 1);
        }
        self.w32(reg::STATUS, st | reg::STATUS_DRIVER_OK);
        assert_eq!(
            self.r32(reg::STATUS) & reg::STATUS_DEVICE_NEEDS_RESET,
            0,
            "activation failed"
        );
        for i in 0..QSIZE {
            let d = Desc {
                index: i,
                addr: EVBUF + i as u64 * 16,
                len: 16,
                flags: VQ_WRITE,
                next: 0,
            };
            self.push(1, &[d], i);
        }
        self.notify(1);
    }

    /// Writes descriptors and publishes `head` (no notification).
    pub fn push(&mut self, q: usize, descs: &[Desc], head: u16) {
        let base = QUEUES[q];
        for d in descs {
            if d.index >= QSIZE {
                continue;
            }
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&d.addr.to_le_bytes());
            b[8..12].copy_from_slice(&d.len.to_le_bytes());
            b[12..14].copy_from_slice(&d.flags.to_le_bytes());
            b[14..16].copy_from_slice(&d.next.to_le_bytes());
            self.mem
                .write_slice(&b, GuestAddress(base + d.index as u64 * 16))
                .unwrap();
        }
        let n = self.next_avail[q];
        self.mem
            .write_obj(
                head,
                GuestAddress(base + 0x1000 + 4 + 2 * (n % QSIZE) as u64),
            )
            .unwrap();
        self.next_avail[q] = n.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem
            .write_obj(self.next_avail[q], GuestAddress(base + 0x1002))
            .unwrap();
    }

    /// QueueNotify.
    pub fn notify(&self, q: u32) {
        self.w32(reg::QUEUE_NOTIFY, q);
    }

    /// Every used entry the device returned since the last call.
    ///
    /// The guest may legitimately have pointed the device at the driver's own queue memory (a
    /// ring page or a response buffer on top of the used ring), so a used index that ran more
    /// than a queue size ahead is treated as clobbered: nothing is returned, and the device's
    /// next used entry rewrites the index.
    pub fn drain_used(&mut self, q: usize) -> Vec<(u32, u32)> {
        let base = QUEUES[q] + 0x2000;
        let idx: u16 = self.mem.read_obj(GuestAddress(base + 2)).unwrap();
        if idx.wrapping_sub(self.last_used[q]) > QSIZE {
            return Vec::new();
        }
        let mut out = Vec::new();
        while self.last_used[q] != idx {
            let at = base + 4 + 8 * (self.last_used[q] % QSIZE) as u64;
            let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
            out.push((id, len));
            self.last_used[q] = self.last_used[q].wrapping_add(1);
        }
        out
    }

    /// Sends `readable` (split into `pieces` descriptors) with `writable` bytes of response
    /// room; returns `(used_len, response bytes)` if the device returned the chain.
    pub fn request(
        &mut self,
        readable: &[u8],
        pieces: usize,
        writable: usize,
    ) -> Option<(u32, Vec<u8>)> {
        let readable = &readable[..readable.len().min(0x1_0000)];
        let writable = writable.min(0x1_0000);
        self.mem.write_slice(readable, GuestAddress(REQ)).unwrap();
        self.mem
            .write_slice(&vec![0xee; writable], GuestAddress(RESP))
            .unwrap();
        let pieces = pieces.clamp(1, 8);
        let chunk = readable.len().div_ceil(pieces).max(1);
        let mut descs = Vec::new();
        let mut off = 0;
        while off < readable.len() {
            let n = chunk.min(readable.len() - off);
            descs.push(Desc {
                index: descs.len() as u16,
                addr: REQ + off as u64,
                len: n as u32,
                flags: VQ_NEXT,
                next: descs.len() as u16 + 1,
            });
            off += n;
        }
        if writable > 0 {
            descs.push(Desc {
                index: descs.len() as u16,
                addr: RESP,
                len: writable as u32,
                flags: VQ_WRITE,
                next: 0,
            });
        }
        match descs.last_mut() {
            Some(last) => last.flags &= !VQ_NEXT,
            None => return None,
        }
        self.push(0, &descs, 0);
        self.notify(0);
        let used = self.drain_used(0);
        let &(id, len) = used.last()?;
        if id != 0 {
            return None;
        }
        assert!(
            len as usize <= writable,
            "used length {len} larger than the writable part {writable}"
        );
        let mut out = vec![0u8; len as usize];
        self.mem.read_slice(&mut out, GuestAddress(RESP)).unwrap();
        Some((len, out))
    }

    /// One control command with a well-formed chain; returns the status and the response.
    pub fn ctrl(&mut self, cmd: u32, req: &[u8], pages: &[u64], resp: usize) -> (u32, Vec<u8>) {
        let mut r = abi::CtrlHdr { cmd, flags: 0 }.as_slice().to_vec();
        r.extend_from_slice(req);
        for p in pages {
            r.extend_from_slice(&p.to_le_bytes());
        }
        let (len, out) = self.request(&r, 1, 8 + resp).expect("control completion");
        assert!(len >= 8);
        let st = u32::from_le_bytes(out[..4].try_into().unwrap());
        (st, out[8..].to_vec())
    }

    /// The device still answers QUERY_DEVICE with its configuration.
    pub fn assert_alive(&mut self) {
        let n = std::mem::size_of::<abi::VrdmaConfig>();
        let (st, body) = self.ctrl(abi::CMD_QUERY_DEVICE, &[], &[], n);
        assert_eq!(st, abi::STATUS_OK, "QUERY_DEVICE after the fuzz input");
        let want = self.t.device().config().config_space();
        assert_eq!(body.as_slice(), want.as_slice());
    }
}

impl Default for RawGuest {
    fn default() -> Self {
        Self::new()
    }
}

/// Reads little-endian values from a fuzz input; past the end everything reads as zero.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// Wraps the input.
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    /// Whether the input is used up.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The next `n` bytes (fewer at the end).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (a, b) = self.data.split_at(n);
        self.data = b;
        a
    }

    /// A byte.
    pub fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        let b = self.bytes(2);
        let mut a = [0u8; 2];
        a[..b.len()].copy_from_slice(b);
        u16::from_le_bytes(a)
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> u32 {
        let b = self.bytes(4);
        let mut a = [0u8; 4];
        a[..b.len()].copy_from_slice(b);
        u32::from_le_bytes(a)
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        let b = self.bytes(8);
        let mut a = [0u8; 8];
        a[..b.len()].copy_from_slice(b);
        u64::from_le_bytes(a)
    }
}

/// Maps a fuzzer-chosen value to a page address: mostly a page of the free area of the small
/// guest (so that ring and MR commands can succeed), sometimes the raw value (bit 63 set) — but
/// never inside the raw driver's own structures below [`FREE`].
pub fn page_of(v: u64) -> u64 {
    if v >> 63 == 1 {
        let v = v & !(1 << 63);
        if v < FREE {
            v + FREE
        } else {
            v
        }
    } else {
        FREE + (v % ((MEM_SIZE - FREE) / 4096)) * 4096 + (v >> 62 & 1) * (v >> 32 & 0xfff)
    }
}
