//! Device state: resource tables, the data path (SQ fetch, RQ take, CQE writing, CQ arming),
//! events and interrupts. The control commands are in `ctrl.rs`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{ByteValued, Bytes, GuestAddress, VolatileMemory};
use vrdma_abi::{self as abi, QpAttr};

use crate::backend::{Backend, Completion, DeviceOps, QpInfo, RecvWr, SendWr, TakeRecv, UdDest};
use crate::device::DeviceConfig;
use crate::gm;
use crate::interrupt::{Interrupt, InterruptKind};
use crate::mr::{Mr, SegList};
use crate::persist::MigrationState;
use crate::ring::Ring;
use crate::soft::engine::{wc_opcode, SoftBackend};
use crate::soft::{Port, Work};
use crate::tables::HandleTable;
use crate::GuestMemoryMmap;

/// Largest message (2 GiB), as most RDMA devices.
pub(crate) const MAX_MSG: u64 = 1 << 31;

pub(crate) struct Active {
    pub mem: Arc<GuestMemoryMmap>,
    pub queues: Vec<Queue>,
    pub irq: Arc<dyn Interrupt>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Pd {
    pub refs: u32,
}

#[derive(Debug, Clone)]
pub(crate) struct Ah {
    pub pd: u32,
    pub attr: abi::AhAttr,
}

#[derive(Debug, Clone)]
pub(crate) struct Cq {
    pub ring: Ring,
    /// Next CQE position (device producer index).
    pub prod: u32,
    /// Armed flags (`CQ_ARM_*`), 0 when disarmed.
    pub armed: u32,
    /// Sequence of the last arm request seen, if any.
    pub arm_seq: Option<u32>,
    /// Producer index just after the last solicited or error CQE.
    pub sol_pos: Option<u32>,
    /// The CQ overflowed and accepts no more CQEs.
    pub overflow: bool,
    /// QPs using this CQ.
    pub refs: u32,
}

#[derive(Debug, Clone)]
pub(crate) struct Qp {
    pub qp_type: u8,
    pub pd: u32,
    pub send_cq: u32,
    pub recv_cq: u32,
    pub sq_sig_all: bool,
    pub sq: Ring,
    pub rq: Ring,
    pub max_send_sge: u32,
    pub max_recv_sge: u32,
    pub max_inline: u32,
    pub attr: QpAttr,
    /// Next SQ index the device fetches. On lines of its own: written on every fetch, while
    /// the fields around it are read by peers' threads on the direct path.
    pub sq_cons: crossbeam_utils::CachePadded<u32>,
    /// Next RQ index the device takes.
    pub rq_cons: u32,
    /// Fetching stopped because the backend held a full queue.
    pub sq_stalled: bool,
}

impl Qp {
    pub fn info(&self, qpn: u32) -> QpInfo {
        let a = &self.attr;
        QpInfo {
            qpn,
            qp_type: self.qp_type,
            state: a.qp_state,
            dest_gid: a.ah_attr.dgid,
            dest_qpn: a.dest_qp_num,
            qkey: a.qkey,
            mtu: if self.qp_type == abi::QPT_UD {
                4096
            } else {
                abi::mtu_bytes(a.path_mtu).max(256)
            },
            timeout: a.timeout,
            retry_cnt: a.retry_cnt,
            rnr_retry: a.rnr_retry,
            min_rnr_timer: a.min_rnr_timer,
            max_rd_atomic: a.max_rd_atomic,
            sq_psn: a.sq_psn,
            rq_psn: a.rq_psn,
        }
    }
}

/// Interrupt moderation.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Moderation {
    pub max_events: u32,
    pub usec: u32,
    /// Events delivered since the last interrupt.
    pub pending: u32,
    pub first_pending: Option<Instant>,
    /// A CQ notification (`VRDMA_F_CQ_NOTIFY`) is among the pending events: the interrupt is
    /// sent even if the event queue suppresses used-buffer notifications (ABI §12.3).
    pub notify: bool,
}

impl Moderation {
    /// An interrupt is being raised: it covers every event pending so far. Returns whether a
    /// CQ notification was among them (then the interrupt is sent even where the event queue
    /// suppresses notifications). Writes only the fields that change: peers' threads raise CQ
    /// notifications on the direct path, and the device's own thread reads this line.
    fn take_for_interrupt(&mut self) -> bool {
        let notify = self.notify;
        if self.pending != 0 || self.first_pending.is_some() || notify {
            self.pending = 0;
            self.first_pending = None;
            self.notify = false;
        }
        notify
    }
}

/// A CQ's bit in the CQ-notify bitmap and its summary bit: guest-physical addresses of the
/// two words and the bit to set in each.
struct NotifyBits {
    word: u64,
    bit: u64,
    summary: u64,
    summary_bit: u64,
}

/// Everything the core owns; the backend sees it through [`DeviceOps`].
pub(crate) struct Core {
    pub cfg: DeviceConfig,
    /// Features the driver accepted (gates UD, atomics, moderation).
    pub features: u64,
    /// Guest memory as the VMM gave it (the driver holds the same `Arc`): read and written,
    /// not cloned on the data path.
    pub mem: Option<Arc<GuestMemoryMmap>>,
    /// The same regions under another `Arc`, for clones ([`DeviceOps::memory_handle`]).
    pub mem_handle: Option<Arc<GuestMemoryMmap>>,
    pub db_gpa: Option<u64>,
    pub pds: HandleTable<Pd>,
    pub mrs: HandleTable<Mr>,
    pub cqs: HandleTable<Cq>,
    pub qps: HandleTable<Qp>,
    pub ahs: HandleTable<Ah>,
    pub total_mr_pages: u64,
    pub total_ring_pages: u64,
    pub events: VecDeque<abi::Event>,
    pub events_dropped: u64,
    pub refetch: Vec<u32>,
    /// QPs the core wants failed (CQ overflow, ring overrun): done by `State` with the backend.
    pub pending_fail: Vec<(u32, u32)>,
    /// QPs that entered SQD and have not yet reported EV_SQ_DRAINED.
    pub draining: Vec<u32>,
    pub moderation: Moderation,
    /// The interrupt of the active device (a handle to the one in `State::active`), for CQ
    /// notifications raised as soon as they are set ([`Core::signal_cq`]).
    pub irq: Option<Arc<dyn Interrupt>>,
    /// CQ notifications set in the CQ-notify bitmap since the last `flush_events`
    /// (`VRDMA_F_CQ_NOTIFY`); each counts as one event for moderation.
    pub cq_notified: u32,
}

pub(crate) struct State {
    /// Where the device is in the migration state machine.
    pub mig: MigrationState,
    pub acked_features: u64,
    pub active: Option<Active>,
    pub core: Core,
    pub backend: SoftBackend,
    /// The last pre-copy of this migration attempt ([`State::save_precopy`]).
    pub precopy: Option<crate::persist::PrecopyBase>,
    port: Arc<Port>,
    /// Reused buffer for copying send WQEs out of an SQ (a run of slots per access). On lines
    /// of its own: taken and put back on every fetch, while peers' threads read the fields
    /// around it on the direct path.
    sq_buf: crossbeam_utils::CachePadded<Vec<u8>>,
}

/// Error status + vendor detail of a malformed WQE.
type WqeError = (u8, u32);

impl Core {
    /// Sets the guest memory, and a handle on it for clones (see [`Core::mem_handle`]).
    pub fn set_memory(&mut self, mem: Arc<GuestMemoryMmap>) {
        self.mem_handle = Some(Arc::new(GuestMemoryMmap::clone(&mem)));
        self.mem = Some(mem);
    }

    pub(crate) fn new(cfg: DeviceConfig) -> Self {
        Self {
            pds: HandleTable::new(cfg.max_pd),
            mrs: HandleTable::new(cfg.max_mr).tracked(),
            cqs: HandleTable::new(cfg.max_cq),
            qps: HandleTable::new(cfg.max_qp),
            ahs: HandleTable::new(cfg.max_ah),
            cfg,
            features: 0,
            mem: None,
            mem_handle: None,
            db_gpa: None,
            total_mr_pages: 0,
            total_ring_pages: 0,
            events: VecDeque::new(),
            events_dropped: 0,
            refetch: Vec::new(),
            pending_fail: Vec::new(),
            draining: Vec::new(),
            moderation: Moderation::default(),
            irq: None,
            cq_notified: 0,
        }
    }

    /// Reports that CQ `cqn` met its arm condition (ABI §9.5): with `VRDMA_F_CQ_NOTIFY`, sets
    /// the CQ's bit in the CQ-notify bitmap, then its word's bit in `cq_notify_summary`, both
    /// with an atomic OR (the CQE was stored before, so it is visible before the bit); the
    /// interrupt follows at once if moderation allows, else from `flush_events`. Otherwise
    /// queues `EV_CQ_COMP`.
    fn signal_cq(&mut self, cqn: u32) {
        if let (true, Some(mem), Some(_)) = (
            self.features & abi::VRDMA_F_CQ_NOTIFY != 0,
            self.mem.as_ref(),
            self.db_gpa,
        ) {
            // None only for a handle past max_cq (a broken invariant: handles index a table of
            // max_cq entries): then nothing is written past the bitmap.
            let Some(n) = self.cq_notify_bits(cqn) else {
                return;
            };
            // The area was validated at registration (one region, large enough).
            gm::fetch_or_u64(mem, n.word, n.bit);
            gm::fetch_or_u64(mem, n.summary, n.summary_bit);
            // When moderation lets this notification interrupt at once, it does so here
            // rather than when the device entry ends: the guest it wakes starts ~0.1 µs
            // earlier. Otherwise `flush_events` counts it with the entry's other events.
            if let Some(irq) = self.irq.as_ref() {
                let m = &mut self.moderation;
                if m.pending.saturating_add(1) >= m.max_events.max(1) {
                    m.take_for_interrupt();
                    let _ = irq.trigger(InterruptKind::Queue(abi::EVENTQ));
                    return;
                }
            }
            self.cq_notified = self.cq_notified.saturating_add(1);
            return;
        }
        self.push_event(abi::EV_CQ_COMP, cqn, 0);
    }

    /// Where CQ `cqn`'s bit of the CQ-notify bitmap and its summary bit are (ABI §8.4); `None`
    /// without a doorbell area or for an index past `max_cq`.
    fn cq_notify_bits(&self, cqn: u32) -> Option<NotifyBits> {
        let db = self.db_gpa?;
        let index = abi::handle_index(cqn);
        if index > self.cfg.max_cq {
            return None;
        }
        let word = (index / 64) as u64;
        let bitmap = db + abi::db_cq_notify_bitmap_offset(self.cfg.max_qp, self.cfg.max_cq);
        Some(NotifyBits {
            word: bitmap + word * 8,
            bit: 1 << (index % 64),
            summary: db + abi::DB_CQ_NOTIFY_SUMMARY_OFFSET,
            summary_bit: abi::db_summary_bit(word),
        })
    }

    pub fn push_event(&mut self, kind: u32, handle: u32, detail: u64) {
        let cap = (self.cfg.max_cq as usize + self.cfg.max_qp as usize) * 2 + 64;
        if self.events.len() >= cap {
            self.events_dropped += 1;
            return;
        }
        self.events.push_back(abi::Event {
            kind,
            handle,
            detail,
        });
    }

    /// Reads `n` SGEs at `at` in guest memory and resolves them in the QP's PD.
    /// `write` = the device writes into them.
    fn resolve_sges(
        &self,
        mem: &GuestMemoryMmap,
        at: u64,
        n: usize,
        pd: u32,
        write: bool,
        out: &mut SegList,
    ) -> Result<u64, WqeError> {
        let mut buf = [0u8; 4 * abi::SGE_SIZE as usize];
        let bytes = n * abi::SGE_SIZE as usize;
        if bytes <= buf.len() {
            if !gm::read_bytes(mem, at, &mut buf[..bytes]) {
                return Err((abi::WC_LOC_QP_OP_ERR, abi::VENDOR_ERR_BAD_WQE));
            }
            return self.resolve_sge_bytes(&buf[..bytes], pd, write, out);
        }
        let mut v = vec![0u8; bytes];
        if !gm::read_bytes(mem, at, &mut v) {
            return Err((abi::WC_LOC_QP_OP_ERR, abi::VENDOR_ERR_BAD_WQE));
        }
        self.resolve_sge_bytes(&v, pd, write, out)
    }

    /// Resolves the SGEs copied out of a WQE (`bytes`: a whole number of SGEs) in the QP's PD,
    /// one at a time (no intermediate list). `write` = the device writes into them.
    fn resolve_sge_bytes(
        &self,
        bytes: &[u8],
        pd: u32,
        write: bool,
        out: &mut SegList,
    ) -> Result<u64, WqeError> {
        let bad_sge = (abi::WC_LOC_PROT_ERR, abi::VENDOR_ERR_BAD_SGE);
        let mut total = 0u64;
        for raw in bytes.chunks_exact(abi::SGE_SIZE as usize) {
            let mut s = abi::Sge::default();
            s.as_mut_slice().copy_from_slice(raw);
            let mr = self.mrs.get(s.lkey).filter(|m| m.pd == pd).ok_or(bad_sge)?;
            if write && mr.access & abi::ACCESS_LOCAL_WRITE == 0 {
                return Err(bad_sge);
            }
            if !mr.resolve(s.addr, s.length as u64, out) {
                return Err(bad_sge);
            }
            total += s.length as u64;
        }
        if total > MAX_MSG {
            return Err((abi::WC_LOC_LEN_ERR, abi::VENDOR_ERR_BAD_SGE));
        }
        Ok(total)
    }

    /// Validates the send WQE at SQ index `idx` of `qp` from `copy`, the copy of its whole slot
    /// (`None`: the slot could not be read), into `wr`, which must be `SendWr::default()`
    /// (the caller's slot in the backend's send queue: the WR is built in place).
    fn parse_send(&self, qp: &Qp, idx: u32, copy: Option<&[u8]>, wr: &mut SendWr) {
        let slot = qp.sq.slot(idx);
        let hdr = abi::SEND_WQE_HDR as usize;
        let Some(head) = copy.filter(|c| c.len() >= hdr) else {
            wr.error = Some((abi::WC_LOC_QP_OP_ERR, abi::VENDOR_ERR_BAD_WQE));
            return;
        };
        let mut w = abi::SendWqe::default();
        w.as_mut_slice().copy_from_slice(&head[..hdr]);
        wr.wr_id = w.wr_id;
        wr.opcode = w.opcode;
        wr.flags = w.flags;
        wr.signaled = w.flags & abi::SEND_F_SIGNALED != 0 || qp.sq_sig_all;
        wr.imm = matches!(
            w.opcode,
            abi::WR_SEND_WITH_IMM | abi::WR_RDMA_WRITE_WITH_IMM
        )
        .then_some(w.imm_data);
        wr.remote_addr = w.remote_addr;
        wr.rkey = w.rkey;
        wr.compare_add = w.compare_add;
        wr.swap = w.swap;
        if let Err(e) = self.fill_send(qp, slot, &w, &head[hdr..], wr) {
            wr.error = Some(e);
            wr.local.clear();
            wr.inline = None;
        }
    }

    fn fill_send(
        &self,
        qp: &Qp,
        slot: u64,
        w: &abi::SendWqe,
        body: &[u8],
        wr: &mut SendWr,
    ) -> Result<(), WqeError> {
        let mem = self.mem.as_ref().expect("active");
        let bad = (abi::WC_LOC_QP_OP_ERR, abi::VENDOR_ERR_BAD_WQE);
        let ud = qp.qp_type == abi::QPT_UD;
        let known = abi::SEND_F_FENCE
            | abi::SEND_F_SIGNALED
            | abi::SEND_F_SOLICITED
            | abi::SEND_F_INLINE
            | abi::SEND_F_HDR_SGE;
        if w.flags & !known != 0 {
            return Err(bad);
        }
        // The one SGE in the header (ABI §10.2): only where negotiated and allowed, and then
        // exactly one, not inline.
        let hdr_sge = w.flags & abi::SEND_F_HDR_SGE != 0;
        if hdr_sge
            && (!abi::hdr_sge_usable(self.features, qp.qp_type)
                || w.flags & abi::SEND_F_INLINE != 0
                || w.num_sge != 1)
        {
            return Err(bad);
        }
        let op_ok = match w.opcode {
            abi::WR_SEND | abi::WR_SEND_WITH_IMM => true,
            abi::WR_RDMA_WRITE
            | abi::WR_RDMA_WRITE_WITH_IMM
            | abi::WR_RDMA_READ
            | abi::WR_ATOMIC_CMP_AND_SWP
            | abi::WR_ATOMIC_FETCH_AND_ADD => !ud,
            _ => false,
        };
        if !op_ok {
            return Err(bad);
        }
        let atomic = matches!(
            w.opcode,
            abi::WR_ATOMIC_CMP_AND_SWP | abi::WR_ATOMIC_FETCH_AND_ADD
        );
        let scatter = atomic || w.opcode == abi::WR_RDMA_READ;
        if atomic
            && (self.features & abi::VRDMA_F_ATOMICS == 0
                || w.flags & abi::SEND_F_INLINE != 0
                || w.num_sge != 1)
        {
            return Err(bad);
        }
        if w.flags & abi::SEND_F_INLINE != 0 {
            if scatter {
                return Err(bad);
            }
            if w.inline_len > qp.max_inline {
                return Err((abi::WC_LOC_LEN_ERR, abi::VENDOR_ERR_BAD_WQE));
            }
            let n = w.inline_len as usize;
            let data = match body.get(..n) {
                Some(b) => b.to_vec(),
                None => {
                    let mut data = vec![0u8; n];
                    if !gm::read_bytes(mem, slot + abi::SEND_WQE_HDR as u64, &mut data) {
                        return Err(bad);
                    }
                    data
                }
            };
            wr.len = data.len() as u64;
            wr.inline = Some(data);
        } else if hdr_sge {
            let sge = w.hdr_sge();
            wr.len = self.resolve_sge_bytes(sge.as_slice(), qp.pd, scatter, &mut wr.local)?;
        } else {
            if w.num_sge as u32 > qp.max_send_sge {
                return Err(bad);
            }
            let n = w.num_sge as usize;
            wr.len = match body.get(..n * abi::SGE_SIZE as usize) {
                Some(b) => self.resolve_sge_bytes(b, qp.pd, scatter, &mut wr.local)?,
                None => self.resolve_sges(
                    mem,
                    slot + abi::SEND_WQE_HDR as u64,
                    n,
                    qp.pd,
                    scatter,
                    &mut wr.local,
                )?,
            };
        }
        if atomic && (wr.len != 8 || !w.remote_addr.is_multiple_of(8)) {
            return Err(bad);
        }
        if ud {
            let ah = self
                .ahs
                .get(w.ah)
                .filter(|a| a.pd == qp.pd)
                .ok_or((abi::WC_LOC_QP_OP_ERR, abi::VENDOR_ERR_BAD_AH))?;
            if wr.len > 4096 {
                return Err((abi::WC_LOC_LEN_ERR, abi::VENDOR_ERR_BAD_WQE));
            }
            wr.ud = Some(UdDest {
                gid: ah.attr.dgid,
                qpn: w.remote_qpn & 0xff_ffff,
                qkey: w.compare_add as u32,
            });
        }
        Ok(())
    }

    /// Writes a CQE to `cqn`. Handles overflow and arming.
    fn push_cqe(&mut self, cqn: u32, qpn: u32, c: &Completion) {
        let Some(mem) = self.mem.as_deref() else {
            return;
        };
        let Some(cq) = self.cqs.get_mut(cqn) else {
            return;
        };
        if cq.overflow {
            return;
        }
        let cons = cq.ring.cons(mem);
        if cq.prod.wrapping_sub(cons) >= cq.ring.depth {
            cq.overflow = true;
            self.push_event(abi::EV_CQ_ERR, cqn, 0);
            let victims: Vec<u32> = self
                .qps
                .iter()
                .filter(|(_, q)| q.send_cq == cqn || q.recv_cq == cqn)
                .map(|(h, _)| h)
                .collect();
            for q in victims {
                self.pending_fail.push((q, 0));
            }
            return;
        }
        let pos = cq.prod;
        let cqe = abi::Cqe {
            wr_id: c.wr_id,
            qpn,
            byte_len: c.byte_len,
            imm_data: c.imm.unwrap_or(0),
            src_qp: c.src_qp,
            status: c.status,
            opcode: c.opcode,
            wc_flags: if c.imm.is_some() {
                abi::WC_F_WITH_IMM
            } else {
                0
            } | if c.grh { abi::WC_F_GRH } else { 0 },
            vendor_err: c.vendor_err,
            owner: abi::cqe_owner(pos, cq.ring.depth),
            ..Default::default()
        };
        // The slot in one slice: bytes 0..63, then the owner byte (release). Ring pages were
        // validated at creation; a failure means the memory map changed, and nothing is written.
        if let Some(s) = gm::slice(mem, cq.ring.slot(pos), abi::CQE_SIZE as usize) {
            let bytes = cqe.as_slice();
            let _ = s.write_slice(&bytes[..abi::CQE_OWNER_OFFSET as usize], 0);
            let _ = s.store(cqe.owner, abi::CQE_OWNER_OFFSET as usize, Ordering::Release);
        }
        cq.prod = pos.wrapping_add(1);
        cq.ring.set_prod(mem, cq.prod);
        let sol = c.solicited || c.status != abi::WC_SUCCESS;
        if sol {
            cq.sol_pos = Some(cq.prod);
        }
        let fire =
            (cq.armed & abi::CQ_ARM_NEXT != 0) || (cq.armed & abi::CQ_ARM_SOLICITED != 0 && sol);
        if fire {
            cq.armed = 0;
            self.signal_cq(cqn);
        }
    }

    /// Handles an arm request for the CQ with table index `index`.
    pub(crate) fn process_arm(&mut self, index: u32) {
        let Some(mem) = self.mem.as_deref() else {
            return;
        };
        let Some((cqn, _)) = self.cqs.by_index(index) else {
            return;
        };
        let Some(cq) = self.cqs.get_mut(cqn) else {
            return;
        };
        let (arm, arm_cons) = cq.ring.arm(mem);
        let seq = arm >> 2;
        let flags = arm & (abi::CQ_ARM_NEXT | abi::CQ_ARM_SOLICITED);
        if cq.arm_seq == Some(seq) || flags == 0 {
            return;
        }
        cq.arm_seq = Some(seq);
        let pending = cq.prod.wrapping_sub(arm_cons);
        // An arm_cons outside [prod - depth, prod] is a driver bug: signal at once, since a
        // spurious event is harmless and a lost one is not.
        let fire = if pending == 0 {
            false
        } else if pending > cq.ring.depth || flags & abi::CQ_ARM_NEXT != 0 {
            true
        } else {
            cq.sol_pos
                .is_some_and(|s| s.wrapping_sub(arm_cons).wrapping_sub(1) < pending)
        };
        if fire {
            cq.armed = 0;
            self.signal_cq(cqn);
        } else {
            cq.armed = flags;
        }
    }

    /// Completes the unfetched SQ entries and the posted receives of a QP with flush errors.
    pub fn flush_rings(&mut self, qpn: u32) {
        let Some(mem) = self.mem.as_deref() else {
            return;
        };
        let Some(qp) = self.qps.get_mut(qpn) else {
            return;
        };
        let mut out: Vec<(u32, Completion)> = Vec::new();
        let sq_prod = qp.sq.prod(mem);
        let n = sq_prod.wrapping_sub(*qp.sq_cons).min(qp.sq.depth);
        for _ in 0..n {
            let slot = qp.sq.slot(*qp.sq_cons);
            let w = mem
                .read_obj::<abi::SendWqe>(GuestAddress(slot))
                .unwrap_or_default();
            out.push((
                qp.send_cq,
                Completion {
                    wr_id: w.wr_id,
                    status: abi::WC_WR_FLUSH_ERR,
                    opcode: wc_opcode(w.opcode),
                    ..Default::default()
                },
            ));
            (*qp.sq_cons) = (*qp.sq_cons).wrapping_add(1);
        }
        (*qp.sq_cons) = sq_prod;
        qp.sq.set_cons(mem, *qp.sq_cons);
        let rq_prod = qp.rq.prod(mem);
        let n = rq_prod.wrapping_sub(qp.rq_cons).min(qp.rq.depth);
        for _ in 0..n {
            let slot = qp.rq.slot(qp.rq_cons);
            let w = mem
                .read_obj::<abi::RecvWqe>(GuestAddress(slot))
                .unwrap_or_default();
            out.push((
                qp.recv_cq,
                Completion {
                    wr_id: w.wr_id,
                    status: abi::WC_WR_FLUSH_ERR,
                    opcode: abi::WC_OP_RECV,
                    ..Default::default()
                },
            ));
            qp.rq_cons = qp.rq_cons.wrapping_add(1);
        }
        qp.rq_cons = rq_prod;
        qp.rq.set_cons(mem, qp.rq_cons);
        for (cq, c) in out {
            self.push_cqe(cq, qpn, &c);
        }
    }

    /// Moves a QP to ERR in the core's view and flushes its rings.
    fn set_error(&mut self, qpn: u32, vendor_err: u32) {
        let Some(qp) = self.qps.get_mut(qpn) else {
            return;
        };
        let was = qp.attr.qp_state;
        qp.attr.qp_state = abi::QPS_ERR;
        if was != abi::QPS_ERR && was != abi::QPS_RESET {
            self.push_event(abi::EV_QP_FATAL, qpn, vendor_err as u64);
        }
        self.flush_rings(qpn);
    }
}

impl DeviceOps for Core {
    fn memory(&self) -> &Arc<GuestMemoryMmap> {
        self.mem
            .as_ref()
            .expect("backend runs only on an active device")
    }

    fn memory_handle(&self) -> &Arc<GuestMemoryMmap> {
        self.mem_handle
            .as_ref()
            .expect("backend runs only on an active device")
    }

    fn qp_info(&self, qpn: u32) -> Option<QpInfo> {
        self.qps.get(qpn).map(|q| q.info(qpn))
    }

    fn resolve_remote(
        &self,
        qpn: u32,
        rkey: u32,
        addr: u64,
        len: u64,
        access: u32,
    ) -> Option<SegList> {
        let qp = self.qps.get(qpn)?;
        if qp.attr.qp_access_flags & access == 0 {
            return None;
        }
        if len == 0 && access != abi::ACCESS_REMOTE_ATOMIC {
            // Zero-length RDMA WRITE or READ: no memory access, so no key or address check.
            return Some(SegList::new());
        }
        let mr = self.mrs.get(rkey)?;
        if mr.pd != qp.pd || mr.access & access == 0 {
            return None;
        }
        let mut out = SegList::new();
        mr.resolve(addr, len, &mut out).then_some(out)
    }

    fn take_recv(&mut self, qpn: u32) -> TakeRecv {
        let Some(mem) = self.mem.as_deref() else {
            return TakeRecv::Empty;
        };
        let Some(qp) = self.qps.get(qpn) else {
            return TakeRecv::Empty;
        };
        let prod = qp.rq.prod(mem);
        let n = prod.wrapping_sub(qp.rq_cons);
        if n == 0 {
            return TakeRecv::Empty;
        }
        if n > qp.rq.depth {
            self.set_error(qpn, abi::VENDOR_ERR_RING_OVERRUN);
            return TakeRecv::Bad(abi::VENDOR_ERR_RING_OVERRUN);
        }
        let idx = qp.rq_cons;
        let slot = qp.rq.slot(idx);
        let (pd, max_sge, recv_cq, rq_hdr) = (qp.pd, qp.max_recv_sge, qp.recv_cq, qp.rq.header());
        let w = gm::read_obj::<abi::RecvWqe>(mem, slot).unwrap_or_default();
        let mut segs = SegList::new();
        let res = if w.num_sge > max_sge {
            Err((abi::WC_LOC_QP_OP_ERR, abi::VENDOR_ERR_BAD_WQE))
        } else {
            self.resolve_sges(
                mem,
                slot + abi::RECV_WQE_HDR as u64,
                w.num_sge as usize,
                pd,
                true,
                &mut segs,
            )
        };
        if let Some(qp) = self.qps.get_mut(qpn) {
            qp.rq_cons = idx.wrapping_add(1);
        }
        gm::store(
            mem,
            rq_hdr + abi::RING_CONS_OFFSET,
            idx.wrapping_add(1),
            Ordering::Release,
        );
        match res {
            Ok(len) => TakeRecv::Wr(RecvWr {
                wr_id: w.wr_id,
                segs,
                len,
            }),
            Err((status, vendor)) => {
                self.push_cqe(
                    recv_cq,
                    qpn,
                    &Completion {
                        wr_id: w.wr_id,
                        status,
                        opcode: abi::WC_OP_RECV,
                        vendor_err: vendor,
                        ..Default::default()
                    },
                );
                TakeRecv::Bad(vendor)
            }
        }
    }

    fn complete_send(&mut self, qpn: u32, c: Completion, signaled: bool) {
        let Some(qp) = self.qps.get(qpn) else {
            return;
        };
        let cq = qp.send_cq;
        if qp.sq_stalled && !self.refetch.contains(&qpn) {
            self.refetch.push(qpn);
        }
        if signaled || c.status != abi::WC_SUCCESS {
            self.push_cqe(cq, qpn, &c);
        }
    }

    fn complete_sends_quiet(&mut self, qpn: u32, _n: usize) {
        if self.qps.get(qpn).is_some_and(|q| q.sq_stalled) && !self.refetch.contains(&qpn) {
            self.refetch.push(qpn);
        }
    }

    fn recv_lines(&self, qpn: u32, out: &mut [usize; crate::backend::RECV_LINES]) {
        let (Some(mem), Some(qp)) = (self.mem.as_deref(), self.qps.get(qpn)) else {
            return;
        };
        // Only for a CQ the driver arms, i.e. sleeps on: there the requester's next post
        // comes after a wake-up, and these lines after the driver touched them all. A CQ that
        // is only polled gets its requests while its driver spins, and the lookups would only
        // lengthen the hold on this device's lock.
        let Some(cq) = self.cqs.get(qp.recv_cq).filter(|c| c.arm_seq.is_some()) else {
            return;
        };
        let host = |gpa: u64| vrdma_memory::host_address(mem, gpa);
        let mut lines = [0usize; crate::backend::RECV_LINES];
        lines[0] = host(qp.rq.header());
        lines[1] = host(qp.rq.slot(qp.rq_cons));
        lines[2] = host(cq.ring.header());
        lines[3] = host(cq.ring.slot(cq.prod));
        if self.features & abi::VRDMA_F_CQ_NOTIFY != 0 {
            if let Some(n) = self.cq_notify_bits(qp.recv_cq) {
                lines[4] = host(n.word);
                lines[5] = host(n.summary);
            }
        }
        *out = lines;
    }

    fn complete_recv(&mut self, qpn: u32, c: Completion) {
        if let Some(cq) = self.qps.get(qpn).map(|q| q.recv_cq) {
            self.push_cqe(cq, qpn, &c);
        }
    }

    fn qp_error(&mut self, qpn: u32, vendor_err: u32) {
        self.set_error(qpn, vendor_err);
    }
}

impl State {
    pub fn new(cfg: DeviceConfig, port: Arc<Port>) -> Self {
        Self {
            mig: MigrationState::Running,
            acked_features: 0,
            active: None,
            core: Core::new(cfg),
            backend: SoftBackend::new(port.clone()),
            precopy: None,
            port,
            sq_buf: Default::default(),
        }
    }

    pub fn activate(
        &mut self,
        mem: Arc<GuestMemoryMmap>,
        queues: Vec<Queue>,
        irq: Arc<dyn Interrupt>,
    ) {
        self.core.set_memory(mem.clone());
        self.core.features = self.acked_features;
        self.core.irq = Some(irq.clone());
        self.active = Some(Active { mem, queues, irq });
    }

    /// Fails a QP from the core's side: the backend flushes what it holds first, so that
    /// completions stay in order, then the core flushes the rings.
    pub fn fail_qp(&mut self, qpn: u32, vendor_err: u32) {
        self.flush_qp(qpn, Some(vendor_err));
    }

    /// Moves a QP to ERR, flushing everything outstanding; `event` raises EV_QP_FATAL.
    pub fn flush_qp(&mut self, qpn: u32, event: Option<u32>) {
        let Some(qp) = self.core.qps.get(qpn) else {
            return;
        };
        let prev = qp.attr.qp_state;
        if prev == abi::QPS_ERR {
            self.core.flush_rings(qpn);
            return;
        }
        let mut info = qp.info(qpn);
        info.state = abi::QPS_ERR;
        if let Some(q) = self.core.qps.get_mut(qpn) {
            q.attr.qp_state = abi::QPS_ERR;
        }
        self.backend.modify_qp(&mut self.core, &info, prev);
        if let (Some(v), true) = (event, prev != abi::QPS_RESET) {
            self.core.push_event(abi::EV_QP_FATAL, qpn, v as u64);
        }
        self.core.flush_rings(qpn);
    }

    /// Fetches and executes the QP's new send WQEs (or flushes them in ERR).
    pub fn process_sq(&mut self, qpn: u32) {
        // The memory is borrowed where it is used, never cloned: a clone and its drop are two
        // atomic read-modify-writes of the reference count per use.
        if self.core.mem.is_none() {
            return;
        }
        let Some(qp) = self.core.qps.get_mut(qpn) else {
            return;
        };
        if qp.sq_stalled {
            qp.sq_stalled = false;
        }
        match qp.attr.qp_state {
            // Quiescing for migration: no new WQEs are fetched (resume rescans every SQ).
            abi::QPS_RTS if self.mig != MigrationState::Running => return,
            abi::QPS_RTS => {}
            abi::QPS_ERR | abi::QPS_SQE => {
                self.core.flush_rings(qpn);
                return;
            }
            // RESET/INIT/RTR/SQD: WQEs wait in the ring.
            _ => return,
        }
        let Some(mem) = self.core.mem.as_deref() else {
            return;
        };
        let prod = qp.sq.prod(mem);
        if prod.wrapping_sub(*qp.sq_cons) > qp.sq.depth {
            self.fail_qp(qpn, abi::VENDOR_ERR_RING_OVERRUN);
            return;
        }
        let depth = qp.sq.depth as usize;
        let published = *qp.sq_cons;
        self.backend.prefetch_peer(qpn);
        self.fetch_sq(qpn, prod, depth);
        // The consumer index is published once for everything fetched (ABI §9.2: after the
        // copies), not per WQE. A failure meanwhile may have flushed the ring and published a
        // later index itself; this store repeats the device's current one.
        if let (Some(qp), Some(mem)) = (self.core.qps.get(qpn), self.core.mem.as_deref()) {
            if (*qp.sq_cons) != published {
                qp.sq.set_cons(mem, *qp.sq_cons);
            }
        }
    }

    /// Fetches and executes the WQEs of an RTS QP up to `prod` (see [`State::process_sq`]).
    fn fetch_sq(&mut self, qpn: u32, prod: u32, depth: usize) {
        let mut buf = std::mem::take(&mut *self.sq_buf);
        self.fetch_sq_with(qpn, prod, depth, &mut buf);
        *self.sq_buf = buf;
    }

    fn fetch_sq_with(&mut self, qpn: u32, prod: u32, depth: usize, buf: &mut Vec<u8>) {
        // Slots [first, first + copied) are in `buf`.
        let (mut first, mut copied) = (0u32, 0u32);
        // RC WRs posted to the backend and not yet sent: the backend sends once per fetch.
        let mut pending = false;
        while let Some(qp) = self.core.qps.get_mut(qpn) {
            if (*qp.sq_cons) == prod || qp.attr.qp_state != abi::QPS_RTS {
                break;
            }
            if self.backend.outstanding(qpn) >= depth {
                qp.sq_stalled = true;
                break;
            }
            let idx = *qp.sq_cons;
            let stride = qp.sq.stride as usize;
            if idx.wrapping_sub(first) >= copied {
                // Copy the posted slots that follow in this ring page with one access (ABI
                // 9.2: each WQE is copied once, whole; slots not consumed now are copied again
                // at the next fetch, their first copy unused).
                let (gpa, n) = qp.sq.run_from(idx, prod.wrapping_sub(idx));
                let len = n as usize * stride;
                if buf.len() < len {
                    buf.resize(len, 0);
                }
                let ok = self
                    .core
                    .mem
                    .as_deref()
                    .is_some_and(|mem| gm::read_bytes(mem, gpa, &mut buf[..len]));
                (first, copied) = (idx, if ok { n } else { 0 });
            }
            let copy = (idx.wrapping_sub(first) < copied).then(|| {
                let at = idx.wrapping_sub(first) as usize * stride;
                &buf[at..at + stride]
            });
            (*qp.sq_cons) = idx.wrapping_add(1);
            let qp = self.core.qps.get(qpn).expect("exists");
            match self.backend.send_slot(qpn) {
                // RC: the WR is built in its place in the backend's send queue (no move).
                Some(mut slot) => {
                    self.core.parse_send(qp, idx, copy, slot.wr());
                    pending = true;
                    if slot.commit() {
                        // Malformed: the QP fails (in order) before anything more is fetched.
                        self.backend.pump_posted(&mut self.core, qpn);
                        pending = false;
                        self.apply_failures();
                    }
                }
                None => {
                    let mut wr = SendWr::default();
                    self.core.parse_send(qp, idx, copy, &mut wr);
                    self.backend.post_send(&mut self.core, qpn, wr);
                    // A CQ overflow caused by this WR fails QPs (maybe this one) before the
                    // next fetch.
                    self.apply_failures();
                }
            }
        }
        if pending {
            self.backend.pump_posted(&mut self.core, qpn);
            self.apply_failures();
        }
    }

    fn apply_failures(&mut self) {
        while let Some((qpn, vendor)) = self.core.pending_fail.pop() {
            self.fail_qp(qpn, vendor);
        }
    }

    /// Applies what the core deferred: QP failures, then fetches for send queues that were
    /// stalled on a full backend queue and have room again.
    pub fn settle(&mut self) {
        loop {
            self.apply_failures();
            let Some(qpn) = self.core.refetch.pop() else {
                break;
            };
            self.process_sq(qpn);
        }
        self.check_drained();
    }

    /// Raises EV_SQ_DRAINED for QPs in SQD whose in-flight send WRs have all completed.
    fn check_drained(&mut self) {
        // Read-only when nothing drains: peers' threads run this on the direct path, and a
        // write here would move the core's line between the cores.
        if self.core.draining.is_empty() {
            return;
        }
        let backend = &self.backend;
        let core = &mut self.core;
        let mut done = Vec::new();
        core.draining.retain(|&qpn| {
            let in_sqd = core
                .qps
                .get(qpn)
                .is_some_and(|q| q.attr.qp_state == abi::QPS_SQD);
            if in_sqd && backend.outstanding(qpn) == 0 {
                done.push(qpn);
            }
            in_sqd && backend.outstanding(qpn) != 0
        });
        for qpn in done {
            core.push_event(abi::EV_SQ_DRAINED, qpn, 0);
        }
    }

    /// The doorbell: new event buffers, and the SQ doorbells and CQ arm requests that
    /// [`take_doorbells`] took (none when there is no doorbell area).
    pub fn process_doorbells(&mut self, rung: &Doorbells) {
        for &(word, bit) in &rung.sq {
            let index = word * 64 + bit;
            if let Some((qpn, _)) = self.core.qps.by_index(index) {
                self.process_sq(qpn);
            }
        }
        for &(word, bit) in &rung.cq {
            self.core.process_arm(word * 64 + bit);
        }
        self.settle();
        self.flush_events();
    }

    /// Handles inbound packets and timers.
    pub fn process_inbound(&mut self) {
        if self.core.mem.is_none() {
            self.port.clear();
            return;
        }
        self.backend.process(&mut self.core);
        self.settle();
        if let Some(first) = self.core.moderation.first_pending {
            if Instant::now() >= first + Duration::from_micros(self.core.moderation.usec as u64) {
                self.raise_event_irq();
            }
        }
        self.flush_events();
    }

    /// Runs the direct path's `f` on the engine and the core (see
    /// [`crate::soft::Endpoint::with_engine`]), then finishes as an inbound entry does.
    pub fn direct(
        &mut self,
        f: &mut dyn FnMut(&mut SoftBackend, &mut dyn crate::backend::DeviceOps),
    ) {
        f(&mut self.backend, &mut self.core);
        self.settle();
        self.flush_events();
    }

    pub fn take_fabric_work(&mut self) -> Work {
        self.backend.take_work()
    }

    fn raise_event_irq(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        // A CQ notification interrupts regardless of VIRTQ_AVAIL_F_NO_INTERRUPT: that flag
        // speaks for the event queue's used ring, and arming a CQ is the driver's request for
        // an interrupt (ABI §12.3).
        let forced = self.core.moderation.take_for_interrupt();
        let needs = forced
            || active.queues[abi::EVENTQ as usize]
                .needs_notification(active.mem.as_ref())
                .unwrap_or(true);
        if needs {
            let _ = active.irq.trigger(InterruptKind::Queue(abi::EVENTQ));
        }
    }

    /// Delivers pending events into event-queue buffers and raises the interrupt (moderated).
    pub fn flush_events(&mut self) {
        if self.core.events.is_empty()
            && self.core.events_dropped == 0
            && self.core.cq_notified == 0
        {
            return;
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        // CQ notifications are already in the bitmap; each counts as one event.
        let notified = std::mem::take(&mut self.core.cq_notified);
        // Borrowed, not cloned: a clone writes the reference count, which shares a cache line
        // with the memory's region list that the driver and the peers' threads read.
        let mem: &GuestMemoryMmap = &active.mem;
        let q = &mut active.queues[abi::EVENTQ as usize];
        let mut delivered = 0u32;
        loop {
            let ev = if let Some(ev) = self.core.events.front() {
                *ev
            } else if self.core.events_dropped > 0 {
                abi::Event {
                    kind: abi::EV_OVERFLOW,
                    handle: 0,
                    detail: self.core.events_dropped,
                }
            } else {
                break;
            };
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let mut written = 0;
            if let Some(d) = chain.writable().next() {
                if d.len() >= abi::EVENT_SIZE && mem.write_obj(ev, d.addr()).is_ok() {
                    written = abi::EVENT_SIZE;
                }
            }
            let _ = q.add_used(mem, head, written);
            if ev.kind == abi::EV_OVERFLOW && self.core.events.is_empty() {
                self.core.events_dropped = 0;
            } else {
                self.core.events.pop_front();
            }
            delivered += 1;
        }
        if delivered == 0 && notified == 0 {
            return;
        }
        let m = &mut self.core.moderation;
        m.notify |= notified > 0;
        m.pending = m.pending.saturating_add(delivered).saturating_add(notified);
        if m.pending >= m.max_events.max(1) {
            self.raise_event_irq();
        } else if m.first_pending.is_none() {
            let at = Instant::now();
            m.first_pending = Some(at);
            let deadline = at + Duration::from_micros(m.usec as u64);
            self.port.fabric().schedule(&self.port, deadline);
        }
    }

    /// After a stop (or a restore): does everything a notification or a timer might have
    /// asked for meanwhile. Control requests, every SQ (WQEs posted while quiescing), every CQ
    /// arm request, held inbound packets and expired timers; a restored device also re-arms its
    /// timers and re-raises a moderated interrupt that was pending (a spurious interrupt is
    /// harmless, a lost one is not).
    pub fn kick_all(&mut self, restored: bool) {
        if restored {
            self.backend.restart_timers();
            // A CQ notification the driver has not taken yet migrated in guest memory; its
            // interrupt may have been lost with the source (or held by moderation).
            if self.cq_notify_pending() {
                self.core.moderation.notify = true;
            }
            if self.core.moderation.pending > 0 || self.core.moderation.notify {
                self.raise_event_irq();
            }
        }
        if self.active.is_none() {
            return;
        }
        self.process_ctrlq();
        // Held inbound requests first: they were sent before anything this device fetches
        // now, and a WRITE fetched now may reach its peer at once (the direct path) and
        // overwrite the source of a request the peer sent while this device was stopped.
        self.process_inbound();
        for qpn in self.core.qps.handles() {
            self.process_sq(qpn);
        }
        let cqs: Vec<u32> = self
            .core
            .cqs
            .handles()
            .into_iter()
            .map(abi::handle_index)
            .collect();
        for index in cqs {
            self.core.process_arm(index);
        }
        self.process_inbound();
    }

    /// Whether `cq_notify_summary` is non-zero (`VRDMA_F_CQ_NOTIFY` negotiated and a
    /// notification not yet taken by the driver).
    fn cq_notify_pending(&self) -> bool {
        let (Some(mem), Some(db)) = (self.core.mem.as_ref(), self.core.db_gpa) else {
            return false;
        };
        self.core.features & abi::VRDMA_F_CQ_NOTIFY != 0
            && gm::load::<u64>(
                mem,
                db + abi::DB_CQ_NOTIFY_SUMMARY_OFFSET,
                Ordering::Acquire,
            )
            .is_some_and(|v| v != 0)
    }

    /// Device reset: flush every outstanding WR, then forget everything.
    pub fn reset(&mut self) {
        // The flushes below write CQEs but raise no interrupt (the device is going away).
        self.core.irq = None;
        if self.core.mem.is_some() {
            for qpn in self.core.qps.handles() {
                self.flush_qp(qpn, None);
            }
            self.settle();
        }
        for qpn in self.core.qps.handles() {
            self.backend.destroy_qp(qpn);
        }
        self.backend.clear();
        let cfg = self.core.cfg.clone();
        self.core = Core::new(cfg);
        self.active = None;
        self.acked_features = 0;
    }
}

/// The doorbells a scan of the doorbell area took: `(word, bit)` of each set bit of the SQ and
/// the CQ-arm bitmaps.
#[derive(Default)]
pub(crate) struct Doorbells {
    sq: smallvec::SmallVec<[(u32, u32); 8]>,
    cq: smallvec::SmallVec<[(u32, u32); 8]>,
}

/// Takes (clears) the rung doorbells of the area at `db` in `mem` into `out`, for a device of
/// `max_qp` QPs and `max_cq` CQs. Atomic swaps on guest memory: it needs no device lock, and a
/// bit taken here is processed by the caller's next locked entry.
pub(crate) fn take_doorbells(
    mem: &GuestMemoryMmap,
    db: u64,
    max_qp: u32,
    max_cq: u32,
    out: &mut Doorbells,
) {
    let cq_base = abi::db_cq_bitmap_offset(max_qp);
    // Both bitmaps and their summaries in one slice: one region lookup per entry. The area
    // was checked to lie in one region when it was registered (and on restore).
    let area = gm::slice(mem, db, (cq_base + abi::bitmap_bytes(max_cq)) as usize);
    let Some(area) = area.as_ref() else {
        return;
    };
    take_bits(
        area,
        abi::DB_SQ_SUMMARY_OFFSET,
        abi::DB_SQ_BITMAP_OFFSET,
        max_qp,
        &mut out.sq,
    );
    take_bits(
        area,
        abi::DB_CQ_SUMMARY_OFFSET,
        cq_base,
        max_cq,
        &mut out.cq,
    );
}

/// The `n` u64 words at byte `base` of `area`, as atomics (one bounds and alignment check for
/// all of them, instead of one per word); `None` if they are not inside it or not aligned.
fn atomic_words<'a>(area: &'a gm::GuestSlice<'_>, base: u64, n: u64) -> Option<&'a [AtomicU64]> {
    let end = base.checked_add(n.checked_mul(8)?)?;
    if end > area.len() as u64 {
        return None;
    }
    let ptr = area.ptr_guard().as_ptr().wrapping_add(base as usize);
    if !(ptr as usize).is_multiple_of(std::mem::align_of::<AtomicU64>()) {
        return None;
    }
    // SAFETY: `[base, base + 8n)` lies inside `area` (checked), whose memory stays mapped
    // while `area` is borrowed, and the pointer is aligned for `AtomicU64` (checked). Guest
    // memory is shared with the guest, which writes these words atomically (ABI §8.2); atomic
    // accesses to it are what vm-memory's `get_atomic_ref` hands out one word at a time.
    Some(unsafe { std::slice::from_raw_parts(ptr.cast::<AtomicU64>(), n as usize) })
}

/// Atomically takes (clears) the set bits of a doorbell bitmap covering indices `0..=max` at
/// byte `base` of the doorbell `area`, appending `(word, bit)` of each to `out`. Visits only
/// the words its summary word (at byte `summary` of the area) flags: summary first, then each
/// flagged word, both with an atomic exchange (ABI §8.3). A driver sets the word bit before
/// the summary bit, so a bit set after our summary exchange leaves its summary bit set for the
/// next scan. Inlined into its two calls: a call of its own saved and restored registers
/// around a body that usually only loads an empty summary word (~30 instructions per call).
#[inline(always)]
fn take_bits(
    area: &gm::GuestSlice<'_>,
    summary: u64,
    base: u64,
    max: u32,
    out: &mut smallvec::SmallVec<[(u32, u32); 8]>,
) {
    let Ok(sum) = area.get_atomic_ref::<AtomicU64>(summary as usize) else {
        return;
    };
    if sum.load(Ordering::Relaxed) == 0 {
        return;
    }
    let mut flagged = sum.swap(0, Ordering::AcqRel);
    // Atomic references bypass vm-memory's dirty log: record the cleared words by hand, so a
    // pre-copy round sees them (docs/migration.md).
    area.bitmap().mark_dirty(summary as usize, 8);
    let Some(words) = atomic_words(area, base, abi::bitmap_bytes(max) / 8) else {
        return;
    };
    while flagged != 0 {
        let first = flagged.trailing_zeros() as usize;
        flagged &= flagged - 1;
        // Summary bit `first` stands for words first, first + 64, ...
        let mut w = first;
        while let Some(cell) = words.get(w) {
            if cell.load(Ordering::Relaxed) != 0 {
                let mut bits = cell.swap(0, Ordering::AcqRel);
                area.bitmap().mark_dirty(base as usize + w * 8, 8);
                while bits != 0 {
                    let b = bits.trailing_zeros();
                    bits &= bits - 1;
                    out.push((w as u32, b));
                }
            }
            w += 64;
        }
    }
}
