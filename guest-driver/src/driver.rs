//! Device bring-up, the control path and the event queue.

use std::collections::{HashMap, VecDeque};
use std::mem::size_of;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vm_memory::bitmap::Bitmap;
use vm_memory::{Address, ByteValued, GuestAddress, VolatileMemory};
use vrdma_abi as abi;
use vrdma_abi::{AhAttr, Event, Gid, PortAttr, QpAttr, VrdmaConfig};

use crate::alloc::{Buffer, GuestAlloc, Layout, PAGE_SHIFT, PAGE_SIZE};
use crate::error::{Error, Result};
use crate::mmio::{self, read32, write32, Transport};
use crate::verbs::{Ah, Cq, Mr, Pd, Qp, QpCaps, QpInitAttr, QpShared, RcParams, Ring, UdParams};
use crate::virtq::{self, Seg, SplitQueue};
use crate::GuestMemoryMmap;

/// Every `VRDMA_F_*` feature this driver understands.
pub const DRIVER_FEATURES: u64 = abi::VRDMA_F_UD
    | abi::VRDMA_F_ATOMICS
    | abi::VRDMA_F_DB_SUPPRESSION
    | abi::VRDMA_F_INTR_MODERATION
    | abi::VRDMA_F_CQ_NOTIFY
    | abi::VRDMA_F_HDR_SGE;

/// Spins on the control queue's used ring before falling back to interrupts.
const CTRL_SPINS: u32 = 2000;
/// Longest single interrupt wait. Waits are sliced and the rings re-checked after each slice, so
/// an interrupt consumed by another waiter (control path vs. event path) costs at most this much.
const WAIT_SLICE: Duration = Duration::from_millis(2);
/// How long a reset may take to read back as status 0.
const RESET_TIMEOUT: Duration = Duration::from_secs(1);

/// Knobs of the driver. `DriverOptions::default()` is what [`Driver::probe`] uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DriverOptions {
    /// `VRDMA_F_*` bits the driver accepts if offered (VIRTIO_F_VERSION_1 is always accepted and
    /// required). Default: [`DRIVER_FEATURES`].
    pub features: u64,
    /// Placement of SQ/RQ/CQ ring pages. Default: [`Layout::Discontiguous`], to exercise the
    /// device's page lists.
    pub ring_layout: Layout,
    /// How long a control command may take. Default: 5 s.
    pub ctrl_timeout: Duration,
    /// Largest virtqueue size to use (rounded down to a power of two, at most 256). Default 256.
    pub queue_size: u16,
    /// Put each 4 KiB of a control request's page list in its own descriptor (when the queue
    /// has room; otherwise one descriptor per part). Default: true.
    pub split_page_lists: bool,
}

impl Default for DriverOptions {
    fn default() -> Self {
        DriverOptions {
            features: DRIVER_FEATURES,
            ring_layout: Layout::Discontiguous,
            ctrl_timeout: Duration::from_secs(5),
            queue_size: abi::QUEUE_MAX_SIZE,
            split_page_lists: true,
        }
    }
}

/// The doorbell area (see the ABI notes): header, SQ bitmap, CQ-arm bitmap.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Doorbell {
    pub(crate) gpa: GuestAddress,
    pub(crate) len: u64,
    /// Byte offset of the CQ-arm bitmap.
    pub(crate) cq_bitmap: u64,
    /// Byte offset of the CQ-notify bitmap (`VRDMA_F_CQ_NOTIFY`).
    pub(crate) cq_notify_bitmap: u64,
    /// Words in each CQ bitmap.
    pub(crate) cq_words: u64,
}

/// Driver state of the event queue.
#[derive(Debug)]
struct EventQueue {
    q: SplitQueue,
    /// Guest-physical address of the event buffers (one 16-byte buffer per queue entry).
    bufs: GuestAddress,
    /// Buffer address of each in-flight chain head.
    buf_of_head: Vec<u64>,
    /// Events harvested but not yet returned.
    pending: VecDeque<Event>,
}

/// The vrdma guest driver: one device, reached through a [`Transport`], with its share of guest
/// memory.
///
/// All methods take `&self`; the driver is `Send + Sync`. Control commands are serialized
/// internally (one request in flight). The data path (`post_send`, `post_recv`, `poll_cq`,
/// `req_notify_cq`) does not allocate and takes no lock — except `poll_cq` on an error or flush
/// completion, which looks the QP up to record that it is in ERR. It needs `&mut` on the QP or
/// CQ, i.e. one thread per QP/CQ at a time.
pub struct Driver {
    pub(crate) transport: Box<dyn Transport>,
    pub(crate) mem: Arc<GuestMemoryMmap>,
    alloc: Mutex<GuestAlloc>,
    opts: DriverOptions,
    config: VrdmaConfig,
    /// Negotiated feature bits.
    pub(crate) features: AtomicU64,
    /// DRIVER_OK set and not reset since.
    active: AtomicBool,
    ctrlq: Mutex<SplitQueue>,
    evq: Mutex<EventQueue>,
    /// Live QPs by QPN, so that completions and events can update the driver's view of them.
    qps: Mutex<HashMap<u32, Arc<QpShared>>>,
    /// Live CQ handles by handle index (0 = none), so that a CQ-notify bit (an index) can be
    /// reported as `EV_CQ_COMP` with the full handle. Learnt from every successful
    /// CREATE_CQ/DESTROY_CQ sent through [`Driver::ctrl`].
    cq_handles: Box<[AtomicU32]>,
    pub(crate) db: Doorbell,
    /// Host addresses (0: none) of the lines that handling a CQ interrupt reads first, all
    /// written by the device's thread on another CPU: `cq_notify_summary`, then the notify word
    /// and the next CQE of the CQ armed last. Recorded when arming ([`Driver::req_notify_cq`]),
    /// prefetched as the wait for the interrupt returns, so that the three transfers overlap
    /// (and the interrupt status read) instead of following each other. Only hints: a stale
    /// address costs a wasted prefetch.
    pub(crate) wake_lines: [AtomicUsize; 3],
    pub(crate) stats: crate::datapath::Stats,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("features", &format_args!("{:#x}", self.features()))
            .field("active", &self.is_active())
            .field("doorbell", &self.db)
            .finish_non_exhaustive()
    }
}

/// Locks a mutex, ignoring poisoning (the protected state stays consistent between calls).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Driver {
    // -----------------------------------------------------------------------------------------
    // Bring-up
    // -----------------------------------------------------------------------------------------

    /// Probes and initializes the device with default [`DriverOptions`].
    ///
    /// `alloc` is the guest-physical range the driver may use for everything it shares with the
    /// device (queues, doorbell area, rings, buffers).
    pub fn probe(
        transport: impl Transport + 'static,
        mem: Arc<GuestMemoryMmap>,
        alloc: GuestAlloc,
    ) -> Result<Driver> {
        Self::probe_with(transport, mem, alloc, DriverOptions::default())
    }

    /// Probes and initializes the device, in the order of ABI §6:
    /// identity check → reset → ACKNOWLEDGE | DRIVER → features → FEATURES_OK (re-checked) →
    /// config (abi_version) → queue 0 and 1 setup → DRIVER_OK → stock the event queue and notify
    /// queue 1 → zero and register the doorbell area (SET_DOORBELL_AREA).
    pub fn probe_with(
        transport: impl Transport + 'static,
        mem: Arc<GuestMemoryMmap>,
        mut alloc: GuestAlloc,
        opts: DriverOptions,
    ) -> Result<Driver> {
        let transport: Box<dyn Transport> = Box::new(transport);
        let t = &*transport;
        check_identity(t)?;
        let (features, config) = negotiate(t, opts.features)?;

        // Each queue: descriptor table, available ring and used ring, one page each (enough for
        // 256 entries).
        let queue_pages = |alloc: &mut GuestAlloc| -> Result<[GuestAddress; 3]> {
            let a = alloc.alloc_contiguous(3 * PAGE_SIZE)?;
            Ok([
                a,
                a.unchecked_add(PAGE_SIZE),
                a.unchecked_add(2 * PAGE_SIZE),
            ])
        };
        let setup = (|| -> Result<_> {
            let [cd, ca, cu] = queue_pages(&mut alloc)?;
            let [ed, ea, eu] = queue_pages(&mut alloc)?;
            let ev_bufs =
                alloc.alloc_contiguous(abi::QUEUE_MAX_SIZE as u64 * abi::EVENT_SIZE as u64)?;
            let db_len = (config.doorbell_area_size as u64)
                .max(abi::doorbell_area_size(config.max_qp, config.max_cq))
                .next_multiple_of(PAGE_SIZE);
            let db_gpa = alloc.alloc_contiguous(db_len)?;
            Ok((cd, ca, cu, ed, ea, eu, ev_bufs, db_len, db_gpa))
        })();
        let (cd, ca, cu, ed, ea, eu, ev_bufs, db_len, db_gpa) = match setup {
            Ok(v) => v,
            Err(e) => {
                fail(t);
                return Err(e);
            }
        };

        let drv = Driver {
            transport,
            mem,
            alloc: Mutex::new(alloc),
            opts,
            config,
            features: AtomicU64::new(features),
            active: AtomicBool::new(false),
            ctrlq: Mutex::new(SplitQueue::new(1, cd, ca, cu)),
            evq: Mutex::new(EventQueue {
                q: SplitQueue::new(1, ed, ea, eu),
                bufs: ev_bufs,
                buf_of_head: vec![0; abi::QUEUE_MAX_SIZE as usize],
                pending: VecDeque::new(),
            }),
            qps: Mutex::new(HashMap::new()),
            // Handle indices are 1..=max_cq (at most 65535 by the ABI; a larger claim is capped
            // and the indices above the cap are never reported).
            cq_handles: (0..=config.max_cq.min(u16::MAX as u32))
                .map(|_| AtomicU32::new(0))
                .collect(),
            db: Doorbell {
                gpa: db_gpa,
                len: db_len,
                cq_bitmap: abi::db_cq_bitmap_offset(config.max_qp),
                cq_notify_bitmap: abi::db_cq_notify_bitmap_offset(config.max_qp, config.max_cq),
                cq_words: abi::bitmap_bytes(config.max_cq) / 8,
            },
            wake_lines: Default::default(),
            stats: Default::default(),
        };
        if let Err(e) = drv.activate() {
            fail(&*drv.transport);
            return Err(e);
        }
        Ok(drv)
    }

    /// Steps 4–8 of the bring-up (ABI §6), after negotiation: queue setup, DRIVER_OK, event
    /// queue stocking + notify, SET_DOORBELL_AREA.
    fn activate(&self) -> Result<()> {
        let t = &*self.transport;
        let cap = self.opts.queue_size.min(abi::QUEUE_MAX_SIZE);
        setup_queue(t, &self.mem, &mut lock(&self.ctrlq), abi::CTRLQ, cap)?;
        setup_queue(t, &self.mem, &mut lock(&self.evq).q, abi::EVENTQ, cap)?;

        let status = read32(t, mmio::STATUS) | mmio::STATUS_DRIVER_OK;
        write32(t, mmio::STATUS, status);
        if read32(t, mmio::STATUS) & mmio::STATUS_DEVICE_NEEDS_RESET != 0 {
            return Err(Error::Protocol(
                "device refused activation (DEVICE_NEEDS_RESET after DRIVER_OK)",
            ));
        }
        self.active.store(true, Ordering::Release);

        // Stock the event queue: one device-writable 16-byte buffer per entry, then notify.
        {
            let mut ev = lock(&self.evq);
            ev.pending.clear();
            virtq::zero(
                &self.mem,
                ev.bufs,
                abi::QUEUE_MAX_SIZE as u64 * abi::EVENT_SIZE as u64,
            )?;
            for i in 0..ev.q.size() as u64 {
                let addr = ev.bufs.0 + i * abi::EVENT_SIZE as u64;
                let seg = Seg {
                    addr,
                    len: abi::EVENT_SIZE,
                    writable: true,
                };
                let head = ev.q.add(&self.mem, &[seg])?;
                ev.buf_of_head[head as usize] = addr;
            }
        }
        self.notify_queue(abi::EVENTQ);

        // The doorbell area: zeroed, then registered (before any CQ or QP).
        virtq::zero(&self.mem, self.db.gpa, self.db.len)?;
        let req = abi::CmdSetDoorbellArea {
            gpa: self.db.gpa.0,
            len: self.db.len,
        };
        self.cmd0(abi::CMD_SET_DOORBELL_AREA, req.as_slice(), &[])
    }

    /// Resets the device (writes status 0 and waits until it reads back 0).
    ///
    /// The device flushes every outstanding WR to its CQ first, so CQs can still be polled
    /// afterwards (the driver keeps their memory). Control commands fail with
    /// [`Error::NotActive`] until [`Driver::reinitialize`]. Objects created before the reset no
    /// longer exist on the device: hand `Qp`/`Cq` to [`Driver::release_qp`] /
    /// [`Driver::release_cq`] to recycle their pages.
    pub fn reset_device(&self) -> Result<()> {
        self.active.store(false, Ordering::Release);
        lock(&self.qps).clear();
        self.forget_cqs();
        reset(&*self.transport)
    }

    /// Brings a reset device back up (same negotiation and setup as probe, reusing the queue
    /// and doorbell memory).
    pub fn reinitialize(&self) -> Result<()> {
        let t = &*self.transport;
        self.active.store(false, Ordering::Release);
        let (features, config) = negotiate(t, self.opts.features)?;
        if config != self.config {
            fail(t);
            return Err(Error::Protocol(
                "configuration space changed across a reset",
            ));
        }
        self.features.store(features, Ordering::Relaxed);
        self.activate().inspect_err(|_| fail(t))
    }

    /// Points the driver at a migrated device: from now on it reaches the device through
    /// `transport` and guest memory through `mem` (the destination's copy).
    ///
    /// **Test harness only.** In a real VM the driver's state lives in guest memory and the
    /// guest's vCPUs simply continue on the destination; nothing in the guest notices a live
    /// migration. The in-process harness keeps the driver's state (queue indices, QP and CQ
    /// producer/consumer indices, the allocator) in host objects instead, so after the VMM
    /// migrated the VM these objects stand for "the guest kernel's memory" and only their
    /// handles to the outside world change: this models the guest's CPU continuing on the
    /// destination. Call it while nothing else uses the driver (the vCPUs were paused for the
    /// migration), before the first access after the destination device resumed. Nothing is
    /// sent to the device. [`Buffer`]s keep their own memory handle: rebind them with
    /// [`Buffer::rebind`]; [`Qp`], [`Cq`] and [`Mr`] hold only indices and handles and need
    /// nothing.
    ///
    /// [`Buffer`]: crate::Buffer
    /// [`Buffer::rebind`]: crate::Buffer::rebind
    /// [`Mr`]: crate::Mr
    pub fn rebind(&mut self, transport: impl Transport + 'static, mem: Arc<GuestMemoryMmap>) {
        self.transport = Box::new(transport);
        self.mem = mem;
    }

    /// Whether the device is live (DRIVER_OK set, not reset since).
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// The device's configuration space, as read at probe.
    pub fn config(&self) -> &VrdmaConfig {
        &self.config
    }

    /// Negotiated feature bits (including `VIRTIO_F_VERSION_1`).
    pub fn features(&self) -> u64 {
        self.features.load(Ordering::Relaxed)
    }

    /// The driver's options.
    pub fn options(&self) -> &DriverOptions {
        &self.opts
    }

    /// Guest memory.
    pub fn mem(&self) -> &Arc<GuestMemoryMmap> {
        &self.mem
    }

    /// The transport.
    pub fn transport(&self) -> &dyn Transport {
        &*self.transport
    }

    /// Guest-physical address and length of the doorbell area.
    pub fn doorbell_area(&self) -> (GuestAddress, u64) {
        (self.db.gpa, self.db.len)
    }

    /// The host addresses that the driver prefetches when an interrupt wakes it, as the last
    /// [`Driver::req_notify_cq`] recorded them (0: none): `cq_notify_summary`, that CQ's word of
    /// the CQ-notify bitmap (both only with `VRDMA_F_CQ_NOTIFY`) and its next CQE.
    pub fn wake_lines(&self) -> [usize; 3] {
        self.wake_lines
            .each_ref()
            .map(|l| l.load(Ordering::Relaxed))
    }

    /// Writes `queue` to QueueNotify. Queue 0 = "control requests pending", queue 1 = "event
    /// buffers added" and "doorbell".
    pub fn notify_queue(&self, queue: u16) {
        write32(&*self.transport, mmio::QUEUE_NOTIFY, queue as u32);
    }

    /// Reads InterruptStatus and acknowledges every bit set; returns the bits.
    pub fn ack_interrupt(&self) -> u32 {
        let t = &*self.transport;
        let status = read32(t, mmio::INTERRUPT_STATUS);
        if status != 0 {
            write32(t, mmio::INTERRUPT_ACK, status);
        }
        status
    }

    // -----------------------------------------------------------------------------------------
    // Guest memory
    // -----------------------------------------------------------------------------------------

    /// Runs `f` on the allocator (e.g. to build page lists by hand).
    pub fn with_alloc<R>(&self, f: impl FnOnce(&mut GuestAlloc) -> R) -> R {
        f(&mut lock(&self.alloc))
    }

    /// Allocates a zeroed buffer of `len` bytes backed by 4 KiB pages.
    pub fn alloc_buffer(&self, len: u64, layout: Layout) -> Result<Buffer> {
        self.alloc_buffer_with_page_shift(len, PAGE_SHIFT, layout)
    }

    /// Allocates a zeroed buffer backed by naturally aligned blocks of `1 << page_shift` bytes
    /// (e.g. 21 for 2 MiB "huge pages"); its iova is aligned to that size.
    pub fn alloc_buffer_with_page_shift(
        &self,
        len: u64,
        page_shift: u32,
        layout: Layout,
    ) -> Result<Buffer> {
        Buffer::alloc(&mut lock(&self.alloc), &self.mem, len, page_shift, layout)
    }

    /// Returns a buffer's pages to the allocator. Deregister its MRs first.
    pub fn free_buffer(&self, buf: Buffer) {
        lock(&self.alloc).free_blocks(&buf.pages, buf.page_shift);
    }

    /// Allocates `n` zeroed ring pages with the configured layout.
    fn alloc_ring_pages(&self, n: u64) -> Result<Vec<u64>> {
        let n = usize::try_from(n).map_err(|_| Error::InvalidArgument("ring too large"))?;
        let pages = lock(&self.alloc).alloc_pages(n, self.opts.ring_layout)?;
        for &p in &pages {
            if let Err(e) = virtq::zero(&self.mem, GuestAddress(p), PAGE_SIZE) {
                lock(&self.alloc).free_pages_list(&pages);
                return Err(e);
            }
        }
        Ok(pages)
    }

    fn free_pages(&self, pages: &[u64]) {
        lock(&self.alloc).free_pages_list(pages);
    }

    // -----------------------------------------------------------------------------------------
    // Control path
    // -----------------------------------------------------------------------------------------

    /// Sends one control command and waits for its completion.
    ///
    /// The device-readable part is `CtrlHdr { cmd, flags: 0 }` + `req` (one descriptor) followed
    /// by `trailing_pages` as little-endian u64s (one descriptor per 4 KiB of the list, see
    /// [`DriverOptions::split_page_lists`]); the device-writable part is `CtrlResp` +
    /// `resp_len` bytes (one descriptor).
    ///
    /// Returns the device's status and the response bytes it wrote after `CtrlResp` (at most
    /// `resp_len`). A non-OK status is *not* an `Err` here — this is the raw interface that
    /// hostile-guest tests use; the typed wrappers turn it into [`Error::Status`].
    pub fn ctrl(
        &self,
        cmd: u32,
        req: &[u8],
        trailing_pages: &[u64],
        resp_len: usize,
    ) -> Result<(u32, Vec<u8>)> {
        let mut head = Vec::with_capacity(size_of::<abi::CtrlHdr>() + req.len());
        head.extend_from_slice(abi::CtrlHdr { cmd, flags: 0 }.as_slice());
        head.extend_from_slice(req);
        let list: Vec<u8> = trailing_pages
            .iter()
            .flat_map(|p| p.to_le_bytes())
            .collect();
        let resp_hdr = size_of::<abi::CtrlResp>();
        let (used_len, written) = self.ctrl_raw(&[&head, &list], resp_hdr + resp_len)?;
        if (used_len as usize) < resp_hdr {
            return Err(Error::Protocol("control response shorter than CtrlResp"));
        }
        let status = u32::from_le_bytes([written[0], written[1], written[2], written[3]]);
        let resp = &written[resp_hdr..];
        if status == abi::STATUS_OK {
            let handle = |b: &[u8]| {
                b.get(..4)
                    .map(|h| u32::from_le_bytes(h.try_into().unwrap()))
            };
            match cmd {
                abi::CMD_CREATE_CQ => {
                    if let Some(h) = handle(resp) {
                        self.learn_cq(h);
                    }
                }
                abi::CMD_DESTROY_CQ => {
                    if let Some(h) = handle(req) {
                        self.forget_cq(h);
                    }
                }
                _ => {}
            }
        }
        Ok((status, resp.to_vec()))
    }

    /// Records a live CQ handle for CQ-notify reporting.
    fn learn_cq(&self, cqn: u32) {
        if let Some(slot) = self.cq_handles.get(abi::handle_index(cqn) as usize) {
            slot.store(cqn, Ordering::Relaxed);
        }
    }

    /// Forgets a destroyed CQ, and clears its CQ-notify bit: the device no longer sets it, and
    /// a stale bit must not be reported for the next CQ with the same index.
    fn forget_cq(&self, cqn: u32) {
        let index = abi::handle_index(cqn);
        if let Some(slot) = self.cq_handles.get(index as usize) {
            let _ = slot.compare_exchange(cqn, 0, Ordering::Relaxed, Ordering::Relaxed);
        }
        if self.features() & abi::VRDMA_F_CQ_NOTIFY != 0 && (index as u64 / 64) < self.db.cq_words {
            let at = self
                .db
                .gpa
                .unchecked_add(self.db.cq_notify_bitmap + index as u64 / 64 * 8);
            if let Ok(s) = crate::gmem::slice(&self.mem, at, 8) {
                if let Ok(w) = s.get_atomic_ref::<AtomicU64>(0) {
                    w.fetch_and(!(1u64 << (index % 64)), Ordering::AcqRel);
                    s.bitmap().mark_dirty(0, 8);
                }
            }
        }
    }

    /// Forgets every CQ (device reset).
    fn forget_cqs(&self) {
        for slot in self.cq_handles.iter() {
            slot.store(0, Ordering::Relaxed);
        }
    }

    /// The rawest control interface: each slice of `readable` is copied to guest memory and
    /// becomes one or more device-readable descriptors (split per 4 KiB when
    /// [`DriverOptions::split_page_lists`] is set and the queue has room; empty slices are
    /// skipped), followed by one device-writable descriptor of `writable_len` bytes (none if 0).
    ///
    /// Returns the used length the device reported and the bytes it wrote (the writable
    /// buffer truncated to the used length).
    pub fn ctrl_raw(&self, readable: &[&[u8]], writable_len: usize) -> Result<(u32, Vec<u8>)> {
        if !self.is_active() {
            return Err(Error::NotActive);
        }
        let mut q = lock(&self.ctrlq);
        let pieces: usize = readable
            .iter()
            .map(|r| r.len().div_ceil(PAGE_SIZE as usize))
            .sum::<usize>()
            + usize::from(writable_len > 0);
        let split = self.opts.split_page_lists && pieces <= q.num_free();

        // Scratch memory for this request; freed once the device has answered.
        let mut scratch: Vec<(GuestAddress, u64)> = Vec::new();
        let mut segs: Vec<Seg> = Vec::new();
        let built = (|| -> Result<()> {
            for r in readable.iter().filter(|r| !r.is_empty()) {
                let len = r.len() as u64;
                if len > u32::MAX as u64 {
                    return Err(Error::InvalidArgument("control request part above 4 GiB"));
                }
                let a = lock(&self.alloc).alloc_contiguous(len)?;
                scratch.push((a, len));
                crate::gmem::write_slice(&self.mem, r, a)?;
                if split {
                    let mut off = 0;
                    while off < len {
                        let n = (len - off).min(PAGE_SIZE);
                        segs.push(Seg {
                            addr: a.0 + off,
                            len: n as u32,
                            writable: false,
                        });
                        off += n;
                    }
                } else {
                    segs.push(Seg {
                        addr: a.0,
                        len: len as u32,
                        writable: false,
                    });
                }
            }
            if writable_len > 0 {
                let len = writable_len as u64;
                if len > u32::MAX as u64 {
                    return Err(Error::InvalidArgument("control response above 4 GiB"));
                }
                let a = lock(&self.alloc).alloc_contiguous(len)?;
                scratch.push((a, len));
                virtq::zero(&self.mem, a, len)?;
                segs.push(Seg {
                    addr: a.0,
                    len: len as u32,
                    writable: true,
                });
            }
            Ok(())
        })();
        let free_scratch = |scratch: &[(GuestAddress, u64)]| {
            let mut a = lock(&self.alloc);
            for &(addr, len) in scratch {
                a.free_contiguous(addr, len);
            }
        };
        if let Err(e) = built {
            free_scratch(&scratch);
            return Err(e);
        }
        let head = match q.add(&self.mem, &segs) {
            Ok(h) => h,
            Err(Error::QueueFull { needed, free, .. }) => {
                free_scratch(&scratch);
                return Err(Error::QueueFull {
                    queue: "control queue",
                    needed,
                    free,
                });
            }
            Err(e) => {
                free_scratch(&scratch);
                return Err(e);
            }
        };
        self.notify_queue(abi::CTRLQ);

        // On a timeout the scratch memory is leaked on purpose: the device may still write it.
        let used_len = self.wait_ctrl(&mut q, head)?;
        let mut written = Vec::new();
        if writable_len > 0 {
            let (addr, len) = *scratch.last().expect("writable scratch");
            let n = (used_len as u64).min(len) as usize;
            written = vec![0; n];
            crate::gmem::read_slice(&self.mem, &mut written, addr)?;
        }
        free_scratch(&scratch);
        Ok((used_len, written))
    }

    /// Waits for the control chain `head` to come back: spin on the used ring, then wait for
    /// interrupts in short slices (re-checking the ring after each), until the timeout.
    fn wait_ctrl(&self, q: &mut SplitQueue, head: u16) -> Result<u32> {
        let deadline = Instant::now() + self.opts.ctrl_timeout;
        let mut spins = 0;
        loop {
            while let Some((id, len)) = q.pop_used(&self.mem)? {
                if id == head {
                    return Ok(len);
                }
                // A late answer to a request that timed out earlier; its descriptors are
                // recycled by pop_used and its scratch memory stays leaked.
            }
            if spins < CTRL_SPINS {
                spins += 1;
                std::hint::spin_loop();
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout("control command completion"));
            }
            if self
                .transport
                .wait_interrupt((deadline - now).min(WAIT_SLICE))
            {
                self.ack_interrupt();
            }
        }
    }

    /// A command with a typed response: status checked, response decoded.
    fn cmd<R: ByteValued + Default>(&self, cmd: u32, req: &[u8], pages: &[u64]) -> Result<R> {
        let (status, resp) = self.ctrl(cmd, req, pages, size_of::<R>())?;
        if status != abi::STATUS_OK {
            return Err(Error::Status { cmd, status });
        }
        let mut r = R::default();
        let out = r.as_mut_slice();
        if resp.len() < out.len() {
            return Err(Error::Protocol("control response shorter than its struct"));
        }
        out.copy_from_slice(&resp[..out.len()]);
        Ok(r)
    }

    /// A command without a response struct.
    fn cmd0(&self, cmd: u32, req: &[u8], pages: &[u64]) -> Result<()> {
        let (status, _) = self.ctrl(cmd, req, pages, 0)?;
        if status != abi::STATUS_OK {
            return Err(Error::Status { cmd, status });
        }
        Ok(())
    }

    fn cmd_handle(&self, cmd: u32, handle: u32) -> Result<()> {
        let req = abi::CmdHandle {
            handle,
            reserved: 0,
        };
        self.cmd0(cmd, req.as_slice(), &[])
    }

    // -----------------------------------------------------------------------------------------
    // Typed commands
    // -----------------------------------------------------------------------------------------

    /// QUERY_DEVICE.
    pub fn query_device(&self) -> Result<VrdmaConfig> {
        self.cmd(abi::CMD_QUERY_DEVICE, &[], &[])
    }

    /// QUERY_PORT (port 1 is the only port).
    pub fn query_port(&self, port: u32) -> Result<PortAttr> {
        let req = abi::CmdQueryPort { port, reserved: 0 };
        self.cmd(abi::CMD_QUERY_PORT, req.as_slice(), &[])
    }

    /// QUERY_GID of port 1.
    pub fn query_gid(&self, index: u32) -> Result<Gid> {
        let req = abi::CmdQueryGid { port: 1, index };
        self.cmd(abi::CMD_QUERY_GID, req.as_slice(), &[])
    }

    /// The port's GID (index 0): the device's address on the fabric.
    pub fn gid(&self) -> Result<Gid> {
        self.query_gid(0)
    }

    /// CREATE_PD.
    pub fn alloc_pd(&self) -> Result<Pd> {
        let r: abi::RespHandle = self.cmd(abi::CMD_CREATE_PD, &[], &[])?;
        Ok(Pd(r.handle))
    }

    /// DESTROY_PD.
    pub fn dealloc_pd(&self, pd: Pd) -> Result<()> {
        self.cmd_handle(abi::CMD_DESTROY_PD, pd.0)
    }

    /// REG_MR over the whole buffer (iova = `buf.iova()`, page list = its pages).
    pub fn reg_mr(&self, pd: Pd, buf: &Buffer, access: u32) -> Result<Mr> {
        self.reg_mr_range(pd, buf, 0, buf.len(), access)
    }

    /// REG_MR over `[offset, offset + len)` of the buffer: iova = `buf.addr(offset)`, page list =
    /// the buffer pages covering the range.
    pub fn reg_mr_range(
        &self,
        pd: Pd,
        buf: &Buffer,
        offset: u64,
        len: u64,
        access: u32,
    ) -> Result<Mr> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= buf.len())
            .ok_or(Error::InvalidArgument("MR range outside the buffer"))?;
        let ps = buf.page_size();
        let first = (offset / ps) as usize;
        let last = end.div_ceil(ps) as usize;
        let pages = if first < last {
            &buf.pages()[first..last]
        } else {
            &[][..]
        };
        self.reg_mr_pages(pd, buf.addr(offset), len, pages, buf.page_shift(), access)
    }

    /// REG_MR with an explicit page list (each page `1 << page_shift` bytes; `pages[0]` backs
    /// the page containing `iova`). No driver-side checks: the device validates everything.
    pub fn reg_mr_pages(
        &self,
        pd: Pd,
        iova: u64,
        len: u64,
        pages: &[u64],
        page_shift: u32,
        access: u32,
    ) -> Result<Mr> {
        let req = abi::CmdRegMr {
            pd: pd.0,
            access,
            iova,
            length: len,
            page_shift,
            npages: u32::try_from(pages.len())
                .map_err(|_| Error::InvalidArgument("page list too long"))?,
        };
        let r: abi::RespRegMr = self.cmd(abi::CMD_REG_MR, req.as_slice(), pages)?;
        Ok(Mr {
            lkey: r.lkey,
            rkey: r.rkey,
            iova,
            len,
        })
    }

    /// DEREG_MR.
    pub fn dereg_mr(&self, mr: Mr) -> Result<()> {
        self.cmd_handle(abi::CMD_DEREG_MR, mr.lkey)
    }

    /// CREATE_CQ with at least `min_cqes` entries (rounded up to a power of two), ring pages
    /// allocated with [`DriverOptions::ring_layout`].
    pub fn create_cq(&self, min_cqes: u32) -> Result<Cq> {
        let depth = min_cqes
            .max(1)
            .checked_next_power_of_two()
            .ok_or(Error::InvalidArgument("CQ depth too large"))?;
        let npages = abi::ring_pages(depth, abi::CQE_SIZE);
        let pages = self.alloc_ring_pages(npages)?;
        let req = abi::CmdCreateCq {
            depth,
            npages: npages as u32,
        };
        let r: abi::RespHandle = match self.cmd(abi::CMD_CREATE_CQ, req.as_slice(), &pages) {
            Ok(r) => r,
            Err(e) => {
                self.free_pages(&pages);
                return Err(e);
            }
        };
        if r.extra != depth {
            // The CQ exists on the device but not as requested; keep its pages (leaked).
            return Err(Error::Protocol("CREATE_CQ answered a different depth"));
        }
        Ok(Cq {
            cqn: r.handle,
            ring: Ring {
                pages,
                depth,
                stride: abi::CQE_SIZE,
            },
            cons: 0,
            arm_seq: 0,
        })
    }

    /// DESTROY_CQ. On success the ring pages go back to the allocator and `cq` becomes dead
    /// (polling it returns nothing). On failure (e.g. `STATUS_BUSY`) nothing changes.
    pub fn destroy_cq(&self, cq: &mut Cq) -> Result<()> {
        if !cq.ring.alive() {
            return Err(Error::InvalidArgument("CQ already destroyed"));
        }
        self.cmd_handle(abi::CMD_DESTROY_CQ, cq.cqn)?;
        self.free_pages(&std::mem::take(&mut cq.ring.pages));
        Ok(())
    }

    /// Recycles a CQ's pages *without* a device command — only after [`Driver::reset_device`]
    /// (the device no longer knows the CQ) or when the CQ was destroyed by a raw command.
    pub fn release_cq(&self, mut cq: Cq) {
        self.free_pages(&std::mem::take(&mut cq.ring.pages));
    }

    /// CREATE_QP. Ring geometry from [`crate::sq_geometry`] / [`crate::rq_geometry`]; ring
    /// pages allocated with [`DriverOptions::ring_layout`].
    pub fn create_qp(&self, pd: Pd, attr: &QpInitAttr) -> Result<Qp> {
        // With `VRDMA_F_HDR_SGE` an RC QP's one-SGE WQEs carry the SGE in the header: a QP of
        // at most one SGE needs no room for SGEs after it.
        let hdr_sge = abi::hdr_sge_usable(self.features(), attr.qp_type);
        let sges_after_header = if hdr_sge && attr.max_send_sge <= 1 {
            0
        } else {
            attr.max_send_sge
        };
        let (sq_depth, sq_stride) =
            crate::verbs::sq_geometry(attr.max_send_wr, sges_after_header, attr.max_inline)?;
        let (rq_depth, rq_stride) = crate::verbs::rq_geometry(attr.max_recv_wr, attr.max_recv_sge)?;
        let sq_npages = abi::ring_pages(sq_depth, sq_stride);
        let rq_npages = abi::ring_pages(rq_depth, rq_stride);
        let sq_pages = self.alloc_ring_pages(sq_npages)?;
        let rq_pages = match self.alloc_ring_pages(rq_npages) {
            Ok(p) => p,
            Err(e) => {
                self.free_pages(&sq_pages);
                return Err(e);
            }
        };
        let req = abi::CmdCreateQp {
            pd: pd.0,
            send_cq: attr.send_cq,
            recv_cq: attr.recv_cq,
            qp_type: attr.qp_type,
            sq_sig_all: attr.sq_sig_all as u8,
            reserved: 0,
            sq_depth,
            sq_stride,
            sq_npages: sq_npages as u32,
            rq_depth,
            rq_stride,
            rq_npages: rq_npages as u32,
        };
        let trailing: Vec<u64> = sq_pages.iter().chain(&rq_pages).copied().collect();
        let r: abi::RespCreateQp = match self.cmd(abi::CMD_CREATE_QP, req.as_slice(), &trailing) {
            Ok(r) => r,
            Err(e) => {
                self.free_pages(&trailing);
                return Err(e);
            }
        };
        let shared = QpShared::new();
        lock(&self.qps).insert(r.qpn, shared.clone());
        Ok(Qp {
            qpn: r.qpn,
            qp_type: attr.qp_type,
            pd,
            send_cq: attr.send_cq,
            recv_cq: attr.recv_cq,
            caps: QpCaps {
                max_send_wr: sq_depth,
                max_recv_wr: rq_depth,
                max_send_sge: r.max_send_sge,
                max_recv_sge: r.max_recv_sge,
                max_inline: r.max_inline,
            },
            sq: Ring {
                pages: sq_pages,
                depth: sq_depth,
                stride: sq_stride,
            },
            rq: Ring {
                pages: rq_pages,
                depth: rq_depth,
                stride: rq_stride,
            },
            sq_prod: 0,
            rq_prod: 0,
            sq_free: 0,
            rq_free: 0,
            shared,
        })
    }

    /// DESTROY_QP. On success the ring pages go back to the allocator and `qp` becomes dead
    /// (posting to it fails). On failure nothing changes.
    pub fn destroy_qp(&self, qp: &mut Qp) -> Result<()> {
        if !qp.sq.alive() {
            return Err(Error::InvalidArgument("QP already destroyed"));
        }
        self.cmd_handle(abi::CMD_DESTROY_QP, qp.qpn)?;
        self.forget_qp(qp);
        self.free_pages(&std::mem::take(&mut qp.sq.pages));
        self.free_pages(&std::mem::take(&mut qp.rq.pages));
        Ok(())
    }

    /// Recycles a QP's pages *without* a device command (see [`Driver::release_cq`]).
    pub fn release_qp(&self, mut qp: Qp) {
        self.forget_qp(&qp);
        self.free_pages(&std::mem::take(&mut qp.sq.pages));
        self.free_pages(&std::mem::take(&mut qp.rq.pages));
    }

    fn forget_qp(&self, qp: &Qp) {
        let mut qps = lock(&self.qps);
        if qps.get(&qp.qpn).is_some_and(|s| Arc::ptr_eq(s, &qp.shared)) {
            qps.remove(&qp.qpn);
        }
    }

    /// MODIFY_QP. On success with `QP_ATTR_STATE` the driver's view ([`Qp::state`]) follows;
    /// a move to ERR also rings the QP's SQ doorbell (ABI §9.3).
    pub fn modify_qp(&self, qp: &Qp, attr: &QpAttr, mask: u32) -> Result<()> {
        self.modify_qp_raw(qp.qpn, attr, mask)
    }

    /// MODIFY_QP by QP number (any value, for hostile tests). Updates the driver's view of the
    /// QP if it knows it.
    pub fn modify_qp_raw(&self, qpn: u32, attr: &QpAttr, mask: u32) -> Result<()> {
        let req = abi::CmdModifyQp {
            qpn,
            attr_mask: mask,
            attr: *attr,
        };
        self.cmd0(abi::CMD_MODIFY_QP, req.as_slice(), &[])?;
        if mask & abi::QP_ATTR_STATE != 0 {
            let shared = lock(&self.qps).get(&qpn).cloned();
            if let Some(shared) = shared {
                let old = shared.state.swap(attr.qp_state, Ordering::AcqRel);
                if attr.qp_state == abi::QPS_ERR && old != abi::QPS_ERR {
                    self.doorbell(abi::DB_SQ_BITMAP_OFFSET, abi::handle_index(qpn))?;
                }
            }
        }
        Ok(())
    }

    /// The driver learnt that QP `qpn` is in ERR (error or flush completion, `EV_QP_FATAL`).
    /// The first time, it rings the QP's SQ doorbell so that the device flushes receive WQEs
    /// posted since the QP entered ERR (ABI §9.3); later receive posts ring it again.
    pub(crate) fn learn_qp_error(&self, qpn: u32) {
        if !self.is_active() {
            return;
        }
        let shared = lock(&self.qps).get(&qpn).cloned();
        if shared.is_some_and(|s| s.learn_error()) {
            // Cannot fail: the bit index of a 24-bit QPN lies inside the SQ bitmap.
            let _ = self.doorbell(abi::DB_SQ_BITMAP_OFFSET, abi::handle_index(qpn));
        }
    }

    /// QUERY_QP.
    pub fn query_qp(&self, qp: &Qp) -> Result<QpAttr> {
        self.query_qp_raw(qp.qpn)
    }

    /// QUERY_QP by QP number.
    pub fn query_qp_raw(&self, qpn: u32) -> Result<QpAttr> {
        let req = abi::CmdHandle {
            handle: qpn,
            reserved: 0,
        };
        self.cmd(abi::CMD_QUERY_QP, req.as_slice(), &[])
    }

    /// The QP's current state (`abi::QPS_*`), via QUERY_QP.
    pub fn qp_state(&self, qp: &Qp) -> Result<u32> {
        Ok(self.query_qp(qp)?.qp_state)
    }

    /// CREATE_AH.
    pub fn create_ah(&self, pd: Pd, attr: &AhAttr) -> Result<Ah> {
        let req = abi::CmdCreateAh {
            pd: pd.0,
            reserved: 0,
            attr: *attr,
        };
        let r: abi::RespHandle = self.cmd(abi::CMD_CREATE_AH, req.as_slice(), &[])?;
        Ok(Ah(r.handle))
    }

    /// DESTROY_AH.
    pub fn destroy_ah(&self, ah: Ah) -> Result<()> {
        self.cmd_handle(abi::CMD_DESTROY_AH, ah.0)
    }

    /// SET_INTR_MODERATION: interrupt after `max_events` pending events or `usec` µs.
    pub fn set_intr_moderation(&self, max_events: u32, usec: u32) -> Result<()> {
        let req = abi::CmdIntrModeration { max_events, usec };
        self.cmd0(abi::CMD_SET_INTR_MODERATION, req.as_slice(), &[])
    }

    // -----------------------------------------------------------------------------------------
    // Connection helpers
    // -----------------------------------------------------------------------------------------

    /// [`RcParams::new`] with the READ/atomic depths clamped to the device's `max_qp_rd_atom`,
    /// and without remote atomic access unless `VRDMA_F_ATOMICS` was negotiated.
    pub fn rc_params(&self, remote_qpn: u32, remote_gid: Gid) -> RcParams {
        let rd = self.config.max_qp_rd_atom.min(16) as u8;
        let base = RcParams::new(remote_qpn, remote_gid);
        let access_flags = if self.features() & abi::VRDMA_F_ATOMICS != 0 {
            base.access_flags
        } else {
            base.access_flags & !abi::ACCESS_REMOTE_ATOMIC
        };
        RcParams {
            max_rd_atomic: rd,
            max_dest_rd_atomic: rd,
            access_flags,
            ..base
        }
    }

    /// Takes a fresh (RESET) RC QP to RTS, connected to `remote_qpn` at `remote_gid`, with the
    /// defaults of [`Driver::rc_params`].
    pub fn connect_rc(&self, qp: &Qp, remote_qpn: u32, remote_gid: Gid) -> Result<()> {
        self.connect_rc_with(qp, &self.rc_params(remote_qpn, remote_gid))
    }

    /// Takes a fresh (RESET) RC QP through INIT and RTR to RTS with explicit parameters.
    pub fn connect_rc_with(&self, qp: &Qp, p: &RcParams) -> Result<()> {
        for (attr, mask) in [p.init_attr(), p.rtr_attr(), p.rts_attr()] {
            self.modify_qp(qp, &attr, mask)?;
        }
        Ok(())
    }

    /// Takes a fresh (RESET) UD QP to RTS with Q_Key `qkey`.
    pub fn connect_ud(&self, qp: &Qp, qkey: u32) -> Result<()> {
        self.connect_ud_with(qp, &UdParams::new(qkey))
    }

    /// Takes a fresh (RESET) UD QP through INIT and RTR to RTS with explicit parameters.
    pub fn connect_ud_with(&self, qp: &Qp, p: &UdParams) -> Result<()> {
        for (attr, mask) in [p.init_attr(), p.rtr_attr(), p.rts_attr()] {
            self.modify_qp(qp, &attr, mask)?;
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Event queue
    // -----------------------------------------------------------------------------------------

    /// Waits up to `timeout` for the next event: harvests the event queue, and while it is
    /// empty waits for the interrupt (acknowledging it) and looks again.
    ///
    /// # Panics
    /// If the device returns a bogus event-queue used entry (a device bug).
    pub fn wait_event(&self, timeout: Duration) -> Option<Event> {
        let deadline = Instant::now() + timeout;
        let mut ev = lock(&self.evq);
        loop {
            if ev.pending.is_empty() {
                self.harvest_events(&mut ev);
            }
            if let Some(e) = ev.pending.pop_front() {
                return Some(e);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            if self
                .transport
                .wait_interrupt((deadline - now).min(WAIT_SLICE))
            {
                self.prefetch_wake_lines();
                self.ack_interrupt();
            }
        }
    }

    /// Starts fetching the [`Driver::wake_lines`].
    fn prefetch_wake_lines(&self) {
        for line in &self.wake_lines {
            let p = line.load(Ordering::Relaxed);
            if p != 0 {
                vrdma_memory::prefetch_for_write(p as *const u8);
            }
        }
    }

    /// The next event if one is pending (never blocks).
    pub fn poll_event(&self) -> Option<Event> {
        let mut ev = lock(&self.evq);
        if ev.pending.is_empty() {
            self.harvest_events(&mut ev);
        }
        ev.pending.pop_front()
    }

    /// Every pending event (never blocks). Also acknowledges a pending interrupt.
    pub fn poll_events(&self) -> Vec<Event> {
        self.ack_interrupt();
        let mut ev = lock(&self.evq);
        self.harvest_events(&mut ev);
        ev.pending.drain(..).collect()
    }

    /// Moves the event queue's used entries to `pending`, gives their buffers back to the
    /// device and notifies queue 1 if any were given back.
    fn harvest_events(&self, ev: &mut EventQueue) {
        if !self.is_active() {
            return;
        }
        self.harvest_cq_notify(ev);
        let mut reposted = false;
        loop {
            let (head, len) = match ev.q.pop_used(&self.mem) {
                Ok(Some(x)) => x,
                Ok(None) => break,
                Err(e) => panic!("vrdma event queue: {e}"),
            };
            let addr = ev.buf_of_head[head as usize];
            if len >= abi::EVENT_SIZE {
                let e: Event = crate::gmem::read_obj(&self.mem, GuestAddress(addr))
                    .expect("event buffer in guest memory");
                if e.kind == abi::EV_QP_FATAL {
                    self.learn_qp_error(e.handle);
                }
                ev.pending.push_back(e);
            }
            let seg = Seg {
                addr,
                len: abi::EVENT_SIZE,
                writable: true,
            };
            let head =
                ev.q.add(&self.mem, &[seg])
                    .expect("a used event buffer frees its descriptor");
            ev.buf_of_head[head as usize] = addr;
            reposted = true;
        }
        if reposted {
            self.notify_queue(abi::EVENTQ);
        }
    }
}

impl Driver {
    /// With `VRDMA_F_CQ_NOTIFY`: takes the CQ-notify bitmap (ABI §8.1, §9.5) — exchange
    /// `cq_notify_summary` with 0, then every word it flags with 0 — and queues one
    /// `EV_CQ_COMP` per set bit of a live CQ. Called after the interrupt was acknowledged, so a
    /// bit the device sets after our exchange comes with an interrupt still to be seen.
    fn harvest_cq_notify(&self, ev: &mut EventQueue) {
        if self.features() & abi::VRDMA_F_CQ_NOTIFY == 0 {
            return;
        }
        let swap = |off: u64| -> u64 {
            let Ok(s) = crate::gmem::slice(&self.mem, self.db.gpa.unchecked_add(off), 8) else {
                return 0;
            };
            let Ok(cell) = s.get_atomic_ref::<AtomicU64>(0) else {
                return 0;
            };
            if cell.load(Ordering::Relaxed) == 0 {
                return 0;
            }
            let v = cell.swap(0, Ordering::AcqRel);
            s.bitmap().mark_dirty(0, 8);
            v
        };
        let mut flagged = swap(abi::DB_CQ_NOTIFY_SUMMARY_OFFSET);
        while flagged != 0 {
            let mut w = flagged.trailing_zeros() as u64;
            flagged &= flagged - 1;
            while w < self.db.cq_words {
                let mut bits = swap(self.db.cq_notify_bitmap + w * 8);
                while bits != 0 {
                    let index = w * 64 + bits.trailing_zeros() as u64;
                    bits &= bits - 1;
                    let cqn = self
                        .cq_handles
                        .get(index as usize)
                        .map_or(0, |h| h.load(Ordering::Relaxed));
                    if cqn != 0 {
                        ev.pending.push_back(Event {
                            kind: abi::EV_CQ_COMP,
                            handle: cqn,
                            detail: 0,
                        });
                    }
                }
                w += 64;
            }
        }
    }
}

/// Checks magic, version and device ID.
fn check_identity(t: &dyn Transport) -> Result<()> {
    let magic = read32(t, mmio::MAGIC_VALUE);
    if magic != mmio::MAGIC {
        return Err(Error::NotVrdma {
            what: "MagicValue",
            value: magic.into(),
        });
    }
    let version = read32(t, mmio::VERSION);
    if version != mmio::MMIO_VERSION_2 {
        return Err(Error::NotVrdma {
            what: "Version",
            value: version.into(),
        });
    }
    let id = read32(t, mmio::DEVICE_ID);
    if id != abi::VIRTIO_ID_RDMA {
        return Err(Error::NotVrdma {
            what: "DeviceID",
            value: id.into(),
        });
    }
    Ok(())
}

/// Writes status 0 and waits until the device reads back 0.
fn reset(t: &dyn Transport) -> Result<()> {
    write32(t, mmio::STATUS, 0);
    let deadline = Instant::now() + RESET_TIMEOUT;
    while read32(t, mmio::STATUS) != 0 {
        if Instant::now() >= deadline {
            return Err(Error::Timeout("device reset"));
        }
        std::thread::sleep(Duration::from_micros(50));
    }
    Ok(())
}

/// Sets FAILED in the status register.
fn fail(t: &dyn Transport) {
    let status = read32(t, mmio::STATUS);
    write32(t, mmio::STATUS, status | mmio::STATUS_FAILED);
}

/// Reset → ACKNOWLEDGE → DRIVER → feature negotiation → FEATURES_OK (re-checked) → config read.
/// Returns the negotiated features and the configuration space.
fn negotiate(t: &dyn Transport, wanted: u64) -> Result<(u64, VrdmaConfig)> {
    reset(t)?;
    let mut status = mmio::STATUS_ACKNOWLEDGE;
    write32(t, mmio::STATUS, status);
    status |= mmio::STATUS_DRIVER;
    write32(t, mmio::STATUS, status);

    write32(t, mmio::DEVICE_FEATURES_SEL, 0);
    let lo = read32(t, mmio::DEVICE_FEATURES) as u64;
    write32(t, mmio::DEVICE_FEATURES_SEL, 1);
    let hi = read32(t, mmio::DEVICE_FEATURES) as u64;
    let offered = hi << 32 | lo;
    if offered & abi::VIRTIO_F_VERSION_1 == 0 {
        fail(t);
        return Err(Error::Features("device does not offer VIRTIO_F_VERSION_1"));
    }
    let accepted = offered & (abi::VIRTIO_F_VERSION_1 | (wanted & DRIVER_FEATURES));
    write32(t, mmio::DRIVER_FEATURES_SEL, 0);
    write32(t, mmio::DRIVER_FEATURES, accepted as u32);
    write32(t, mmio::DRIVER_FEATURES_SEL, 1);
    write32(t, mmio::DRIVER_FEATURES, (accepted >> 32) as u32);

    status |= mmio::STATUS_FEATURES_OK;
    write32(t, mmio::STATUS, status);
    if read32(t, mmio::STATUS) & mmio::STATUS_FEATURES_OK == 0 {
        fail(t);
        return Err(Error::Features("device did not keep FEATURES_OK"));
    }

    let config = read_config(t)?;
    if config.abi_version != abi::ABI_VERSION {
        fail(t);
        return Err(Error::NotVrdma {
            what: "abi_version",
            value: config.abi_version.into(),
        });
    }
    Ok((accepted, config))
}

/// Reads the configuration space with 32-bit accesses, retrying until ConfigGeneration is
/// stable across the read.
fn read_config(t: &dyn Transport) -> Result<VrdmaConfig> {
    for _ in 0..100 {
        let gen = read32(t, mmio::CONFIG_GENERATION);
        let mut cfg = VrdmaConfig::default();
        for (i, chunk) in cfg.as_mut_slice().chunks_mut(4).enumerate() {
            let v = read32(t, mmio::CONFIG + 4 * i as u64).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        if read32(t, mmio::CONFIG_GENERATION) == gen {
            return Ok(cfg);
        }
    }
    Err(Error::Protocol("configuration generation never settled"))
}

/// Sets up virtqueue `index`: size = largest power of two ≤ min(QueueNumMax, `cap`), rings
/// zeroed, addresses programmed, QueueReady.
fn setup_queue(
    t: &dyn Transport,
    mem: &GuestMemoryMmap,
    q: &mut SplitQueue,
    index: u16,
    cap: u16,
) -> Result<()> {
    write32(t, mmio::QUEUE_SEL, index as u32);
    if read32(t, mmio::QUEUE_READY) != 0 {
        return Err(Error::QueueSetup {
            queue: index,
            what: "queue already ready",
        });
    }
    let max = read32(t, mmio::QUEUE_NUM_MAX).min(cap as u32);
    if max == 0 {
        return Err(Error::QueueSetup {
            queue: index,
            what: "queue not available (QueueNumMax 0)",
        });
    }
    let size = 1u16 << (31 - max.leading_zeros());
    q.reset(mem, size)?;
    let (desc, avail, used) = q.addresses();
    write32(t, mmio::QUEUE_NUM, size as u32);
    let split = |a: GuestAddress| (a.0 as u32, (a.0 >> 32) as u32);
    let (lo, hi) = split(desc);
    write32(t, mmio::QUEUE_DESC_LOW, lo);
    write32(t, mmio::QUEUE_DESC_HIGH, hi);
    let (lo, hi) = split(avail);
    write32(t, mmio::QUEUE_DRIVER_LOW, lo);
    write32(t, mmio::QUEUE_DRIVER_HIGH, hi);
    let (lo, hi) = split(used);
    write32(t, mmio::QUEUE_DEVICE_LOW, lo);
    write32(t, mmio::QUEUE_DEVICE_HIGH, hi);
    write32(t, mmio::QUEUE_READY, 1);
    Ok(())
}
