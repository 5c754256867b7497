//! Verbs objects as the driver sees them (PD, MR, AH, CQ, QP), work requests, ring geometry and
//! the QP-connection parameter sets.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use vm_memory::GuestAddress;
use vrdma_abi as abi;
use vrdma_abi::{AhAttr, Gid, QpAttr, Sge};

use crate::error::{Error, Result};

/// A protection domain handle. The field is public so that tests can forge handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Pd(pub u32);

/// An address handle. The field is public so that tests can forge handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ah(pub u32);

/// A registered memory region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Mr {
    /// Local key (for SGEs).
    pub lkey: u32,
    /// Remote key (for peers); 0 if no remote access was granted.
    pub rkey: u32,
    /// First iova of the region.
    pub iova: u64,
    /// Length in bytes.
    pub len: u64,
}

impl Mr {
    /// An SGE for `len` bytes at byte `offset` of the region.
    pub fn sge(&self, offset: u64, len: u32) -> Sge {
        Sge {
            addr: self.iova + offset,
            length: len,
            lkey: self.lkey,
        }
    }

    /// An SGE covering the whole region (lengths above 4 GiB are truncated).
    pub fn sge_all(&self) -> Sge {
        self.sge(0, self.len.min(u32::MAX as u64) as u32)
    }

    /// Iova of byte `offset` (what a peer uses as `remote_addr`).
    pub fn addr(&self, offset: u64) -> u64 {
        self.iova + offset
    }
}

/// A ring in guest memory: a list of 4 KiB pages holding the control block ([`abi::RingHeader`])
/// in slot position 0 and `depth` slots of `stride` bytes after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ring {
    pub(crate) pages: Vec<u64>,
    pub(crate) depth: u32,
    pub(crate) stride: u32,
}

impl Ring {
    /// Guest-physical pages of the ring (empty once the owning object was destroyed).
    pub fn pages(&self) -> &[u64] {
        &self.pages
    }

    /// Number of slots.
    pub fn depth(&self) -> u32 {
        self.depth
    }

    /// Slot size in bytes.
    pub fn stride(&self) -> u32 {
        self.stride
    }

    /// Guest-physical address of byte `offset` of the ring's byte space.
    pub fn byte_gpa(&self, offset: u64) -> GuestAddress {
        GuestAddress(
            self.pages[(offset / abi::VRDMA_PAGE_SIZE) as usize] + offset % abi::VRDMA_PAGE_SIZE,
        )
    }

    /// Guest-physical address of the slot for free-running index `index`
    /// (slot `index & (depth - 1)` at byte offset `(1 + slot) * stride`).
    #[inline]
    pub fn slot_gpa(&self, index: u32) -> GuestAddress {
        let off = (1 + (index & (self.depth - 1)) as u64) * self.stride as u64;
        GuestAddress(
            self.pages[(off >> abi::VRDMA_PAGE_SHIFT) as usize]
                + (off & (abi::VRDMA_PAGE_SIZE - 1)),
        )
    }

    /// Guest-physical address of a [`abi::RingHeader`] field (`abi::RING_*_OFFSET`).
    #[inline]
    pub fn header_gpa(&self, field_offset: u64) -> GuestAddress {
        GuestAddress(self.pages[0] + field_offset)
    }

    pub(crate) fn alive(&self) -> bool {
        !self.pages.is_empty()
    }
}

/// Smallest power of two ≥ `n` (and ≥ 1).
fn pow2_at_least(n: u32) -> Result<u32> {
    n.max(1)
        .checked_next_power_of_two()
        .ok_or(Error::InvalidArgument("ring depth too large"))
}

/// Send-queue geometry for the requested capabilities: `(depth, stride)`.
///
/// depth = next power of two ≥ `max_send_wr`; stride = smallest power of two ≥
/// max(64, 64-byte header + max(16 × `max_send_sge`, `max_inline`)).
pub fn sq_geometry(max_send_wr: u32, max_send_sge: u32, max_inline: u32) -> Result<(u32, u32)> {
    let payload = (abi::SGE_SIZE as u64 * max_send_sge as u64).max(max_inline as u64);
    let stride = stride_for(abi::SEND_WQE_HDR as u64 + payload)?;
    Ok((pow2_at_least(max_send_wr)?, stride))
}

/// Receive-queue geometry: `(depth, stride)`; stride = smallest power of two ≥
/// max(64, 16-byte header + 16 × `max_recv_sge`).
pub fn rq_geometry(max_recv_wr: u32, max_recv_sge: u32) -> Result<(u32, u32)> {
    let stride = stride_for(abi::RECV_WQE_HDR as u64 + abi::SGE_SIZE as u64 * max_recv_sge as u64)?;
    Ok((pow2_at_least(max_recv_wr)?, stride))
}

fn stride_for(bytes: u64) -> Result<u32> {
    let s = bytes.max(abi::MIN_STRIDE as u64).next_power_of_two();
    if s > abi::MAX_STRIDE as u64 {
        return Err(Error::InvalidArgument(
            "WQE does not fit the largest slot (4096 bytes)",
        ));
    }
    Ok(s as u32)
}

/// A completion queue.
#[derive(Debug)]
pub struct Cq {
    pub(crate) cqn: u32,
    pub(crate) ring: Ring,
    /// Free-running consumer index.
    pub(crate) cons: u32,
    /// Sequence number of the last arm request.
    pub(crate) arm_seq: u32,
}

impl Cq {
    /// The CQ handle.
    pub fn cqn(&self) -> u32 {
        self.cqn
    }

    /// Number of CQE slots.
    pub fn depth(&self) -> u32 {
        self.ring.depth
    }

    /// The driver's consumer index.
    pub fn cons(&self) -> u32 {
        self.cons
    }

    /// The ring (for raw access in tests).
    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    /// Whether the CQ was destroyed (or released) through the driver.
    pub fn is_destroyed(&self) -> bool {
        !self.ring.alive()
    }
}

/// What to create: [`crate::Driver::create_qp`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QpInitAttr {
    /// `abi::QPT_RC` or `abi::QPT_UD`.
    pub qp_type: u8,
    /// Send CQ handle ([`Cq::cqn`]).
    pub send_cq: u32,
    /// Receive CQ handle.
    pub recv_cq: u32,
    /// Send WRs the QP must hold (rounded up to a power of two).
    pub max_send_wr: u32,
    /// Receive WRs the QP must hold (rounded up to a power of two).
    pub max_recv_wr: u32,
    /// SGEs per send WR.
    pub max_send_sge: u32,
    /// SGEs per receive WR.
    pub max_recv_sge: u32,
    /// Inline bytes per send WR.
    pub max_inline: u32,
    /// Every send WR generates a completion.
    pub sq_sig_all: bool,
}

impl Default for QpInitAttr {
    /// An RC QP with 128 send and receive WRs, 4 SGEs each way and 64 inline bytes; CQ handles 0
    /// (fill them in).
    fn default() -> Self {
        QpInitAttr {
            qp_type: abi::QPT_RC,
            send_cq: 0,
            recv_cq: 0,
            max_send_wr: 128,
            max_recv_wr: 128,
            max_send_sge: 4,
            max_recv_sge: 4,
            max_inline: 64,
            sq_sig_all: false,
        }
    }
}

impl QpInitAttr {
    /// Defaults for an RC QP using `cq` for both queues.
    pub fn rc(cq: &Cq) -> Self {
        QpInitAttr {
            send_cq: cq.cqn,
            recv_cq: cq.cqn,
            ..Default::default()
        }
    }

    /// Defaults for a UD QP using `cq` for both queues.
    pub fn ud(cq: &Cq) -> Self {
        QpInitAttr {
            qp_type: abi::QPT_UD,
            ..Self::rc(cq)
        }
    }
}

/// What the QP can actually hold, from the ring geometry and the CREATE_QP response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QpCaps {
    /// SQ depth.
    pub max_send_wr: u32,
    /// RQ depth.
    pub max_recv_wr: u32,
    /// SGEs per send WR (device answer).
    pub max_send_sge: u32,
    /// SGEs per receive WR (device answer).
    pub max_recv_sge: u32,
    /// Inline bytes per send WR (device answer).
    pub max_inline: u32,
}

/// What the driver knows about a QP that the device can change behind its back, shared between
/// the [`Qp`] and the driver's registry (so completions and events can update it).
#[derive(Debug)]
pub(crate) struct QpShared {
    /// The driver's view of the QP state (`abi::QPS_*`): set by successful MODIFY_QP and by
    /// learning of an error (error/flush completion, `EV_QP_FATAL`).
    pub(crate) state: AtomicU32,
}

impl QpShared {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(QpShared {
            state: AtomicU32::new(abi::QPS_RESET),
        })
    }

    /// Records that the QP is in ERR. True if this is news (it was not in ERR or RESET).
    pub(crate) fn learn_error(&self) -> bool {
        self.state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                (s != abi::QPS_ERR && s != abi::QPS_RESET).then_some(abi::QPS_ERR)
            })
            .is_ok()
    }
}

/// A queue pair.
#[derive(Debug)]
pub struct Qp {
    pub(crate) qpn: u32,
    pub(crate) qp_type: u8,
    pub(crate) pd: Pd,
    pub(crate) send_cq: u32,
    pub(crate) recv_cq: u32,
    pub(crate) caps: QpCaps,
    pub(crate) sq: Ring,
    pub(crate) rq: Ring,
    /// Driver's SQ producer index (free-running).
    pub(crate) sq_prod: u32,
    /// Driver's RQ producer index (free-running).
    pub(crate) rq_prod: u32,
    /// SQ slots known to be free: as many as the consumer index showed when last read, less
    /// those posted since. The device only ever advances the consumer index, so the true
    /// number is never smaller, and the index is read again only when this does not suffice.
    pub(crate) sq_free: u32,
    /// The same for the RQ.
    pub(crate) rq_free: u32,
    pub(crate) shared: Arc<QpShared>,
}

impl Qp {
    /// The QP number (24 bits).
    pub fn qpn(&self) -> u32 {
        self.qpn
    }

    /// `abi::QPT_RC` or `abi::QPT_UD`.
    pub fn qp_type(&self) -> u8 {
        self.qp_type
    }

    /// The QP's protection domain.
    pub fn pd(&self) -> Pd {
        self.pd
    }

    /// Send CQ handle.
    pub fn send_cq(&self) -> u32 {
        self.send_cq
    }

    /// Receive CQ handle.
    pub fn recv_cq(&self) -> u32 {
        self.recv_cq
    }

    /// Capabilities.
    pub fn caps(&self) -> QpCaps {
        self.caps
    }

    /// The send ring.
    pub fn sq(&self) -> &Ring {
        &self.sq
    }

    /// The receive ring.
    pub fn rq(&self) -> &Ring {
        &self.rq
    }

    /// Driver's send producer index.
    pub fn sq_prod(&self) -> u32 {
        self.sq_prod
    }

    /// Driver's receive producer index.
    pub fn rq_prod(&self) -> u32 {
        self.rq_prod
    }

    /// Whether the QP was destroyed (or released) through the driver.
    pub fn is_destroyed(&self) -> bool {
        !self.sq.alive()
    }

    /// The driver's view of the QP state (`abi::QPS_*`), without asking the device: the last
    /// state set with MODIFY_QP, or ERR once the driver saw an error or flush completion or an
    /// `EV_QP_FATAL` for it. [`crate::Driver::query_qp`] asks the device.
    pub fn state(&self) -> u32 {
        self.shared.state.load(Ordering::Acquire)
    }
}

/// A send work request. Borrows its SGE list / inline data, so posting never allocates.
///
/// The constructors set [`abi::SEND_F_SIGNALED`] (every WR completes; unlike verbs, where
/// unsignaled is the default) — clear it with [`SendWr::unsignaled`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendWr<'a> {
    /// Returned in the completion.
    pub wr_id: u64,
    /// `abi::WR_*`.
    pub opcode: u8,
    /// `abi::SEND_F_*` flags except `SEND_F_INLINE`, which the driver sets when `inline` is
    /// `Some`.
    pub flags: u8,
    /// Gather list (ignored when `inline` is `Some`).
    pub sges: &'a [Sge],
    /// Inline payload, copied into the WQE.
    pub inline: Option<&'a [u8]>,
    /// Immediate data (`*_WITH_IMM`), opaque.
    pub imm: u32,
    /// RDMA/atomic remote address.
    pub remote_addr: u64,
    /// RDMA/atomic remote key.
    pub rkey: u32,
    /// Atomic compare (CMP_AND_SWP) or add (FETCH_AND_ADD) operand.
    pub compare_add: u64,
    /// Atomic swap operand.
    pub swap: u64,
    /// UD: address handle.
    pub ah: u32,
    /// UD: destination QPN.
    pub remote_qpn: u32,
    /// UD: Q_Key. On a UD QP the driver encodes it as the low 32 bits of the WQE's
    /// `compare_add` (and ignores [`SendWr::compare_add`]).
    pub qkey: u32,
}

impl<'a> SendWr<'a> {
    fn new(wr_id: u64, opcode: u8, sges: &'a [Sge]) -> Self {
        SendWr {
            wr_id,
            opcode,
            flags: abi::SEND_F_SIGNALED,
            sges,
            ..Default::default()
        }
    }

    /// SEND.
    pub fn send(wr_id: u64, sges: &'a [Sge]) -> Self {
        Self::new(wr_id, abi::WR_SEND, sges)
    }

    /// SEND with immediate data.
    pub fn send_imm(wr_id: u64, sges: &'a [Sge], imm: u32) -> Self {
        Self::new(wr_id, abi::WR_SEND_WITH_IMM, sges).with_imm(imm)
    }

    /// SEND of inline data.
    pub fn send_inline(wr_id: u64, data: &'a [u8]) -> Self {
        Self::new(wr_id, abi::WR_SEND, &[]).with_inline(data)
    }

    /// RDMA WRITE of the gather list to `remote_addr`/`rkey`.
    pub fn write(wr_id: u64, sges: &'a [Sge], remote_addr: u64, rkey: u32) -> Self {
        SendWr {
            remote_addr,
            rkey,
            ..Self::new(wr_id, abi::WR_RDMA_WRITE, sges)
        }
    }

    /// RDMA WRITE with immediate data.
    pub fn write_imm(wr_id: u64, sges: &'a [Sge], remote_addr: u64, rkey: u32, imm: u32) -> Self {
        SendWr {
            opcode: abi::WR_RDMA_WRITE_WITH_IMM,
            ..Self::write(wr_id, sges, remote_addr, rkey).with_imm(imm)
        }
    }

    /// RDMA WRITE of inline data.
    pub fn write_inline(wr_id: u64, data: &'a [u8], remote_addr: u64, rkey: u32) -> Self {
        Self::write(wr_id, &[], remote_addr, rkey).with_inline(data)
    }

    /// RDMA READ from `remote_addr`/`rkey` into the scatter list.
    pub fn read(wr_id: u64, sges: &'a [Sge], remote_addr: u64, rkey: u32) -> Self {
        SendWr {
            remote_addr,
            rkey,
            ..Self::new(wr_id, abi::WR_RDMA_READ, sges)
        }
    }

    /// Atomic compare-and-swap of the 8 bytes at `remote_addr`; the original value lands in
    /// `sge` (8 bytes, LOCAL_WRITE MR).
    pub fn cmp_swap(
        wr_id: u64,
        sge: &'a [Sge],
        remote_addr: u64,
        rkey: u32,
        compare: u64,
        swap: u64,
    ) -> Self {
        SendWr {
            remote_addr,
            rkey,
            compare_add: compare,
            swap,
            ..Self::new(wr_id, abi::WR_ATOMIC_CMP_AND_SWP, sge)
        }
    }

    /// Atomic fetch-and-add of `add` to the 8 bytes at `remote_addr`; the original value lands
    /// in `sge`.
    pub fn fetch_add(wr_id: u64, sge: &'a [Sge], remote_addr: u64, rkey: u32, add: u64) -> Self {
        SendWr {
            remote_addr,
            rkey,
            compare_add: add,
            ..Self::new(wr_id, abi::WR_ATOMIC_FETCH_AND_ADD, sge)
        }
    }

    /// UD SEND to (`ah`, `remote_qpn`, `qkey`).
    pub fn ud_send(wr_id: u64, sges: &'a [Sge], ah: Ah, remote_qpn: u32, qkey: u32) -> Self {
        SendWr {
            ah: ah.0,
            remote_qpn,
            qkey,
            ..Self::new(wr_id, abi::WR_SEND, sges)
        }
    }

    /// Adds immediate data and turns SEND/WRITE into their `*_WITH_IMM` forms.
    pub fn with_imm(mut self, imm: u32) -> Self {
        self.imm = imm;
        self.opcode = match self.opcode {
            abi::WR_SEND => abi::WR_SEND_WITH_IMM,
            abi::WR_RDMA_WRITE => abi::WR_RDMA_WRITE_WITH_IMM,
            op => op,
        };
        self
    }

    /// Sends `data` inline instead of the gather list.
    pub fn with_inline(mut self, data: &'a [u8]) -> Self {
        self.inline = Some(data);
        self
    }

    /// Replaces the flags.
    pub fn with_flags(mut self, flags: u8) -> Self {
        self.flags = flags;
        self
    }

    /// Clears `SEND_F_SIGNALED`.
    pub fn unsignaled(mut self) -> Self {
        self.flags &= !abi::SEND_F_SIGNALED;
        self
    }

    /// Sets `SEND_F_SOLICITED`.
    pub fn solicited(mut self) -> Self {
        self.flags |= abi::SEND_F_SOLICITED;
        self
    }

    /// Sets `SEND_F_FENCE`.
    pub fn fenced(mut self) -> Self {
        self.flags |= abi::SEND_F_FENCE;
        self
    }
}

/// A receive work request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecvWr<'a> {
    /// Returned in the completion.
    pub wr_id: u64,
    /// Scatter list.
    pub sges: &'a [Sge],
}

impl<'a> RecvWr<'a> {
    /// A receive WR.
    pub fn new(wr_id: u64, sges: &'a [Sge]) -> Self {
        RecvWr { wr_id, sges }
    }
}

/// Parameters of [`crate::Driver::connect_rc_with`]: everything the RESET→INIT→RTR→RTS
/// transitions of an RC QP set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RcParams {
    /// Peer QPN.
    pub remote_qpn: u32,
    /// Peer GID.
    pub remote_gid: Gid,
    /// Our first send PSN (the peer's `rq_psn`).
    pub sq_psn: u32,
    /// Our expected receive PSN (the peer's `sq_psn`).
    pub rq_psn: u32,
    /// `abi::MTU_*` enum (5 = 4096).
    pub path_mtu: u32,
    /// Local ACK timeout exponent.
    pub timeout: u8,
    /// Transport retries.
    pub retry_cnt: u8,
    /// RNR retries (7 = infinite).
    pub rnr_retry: u8,
    /// Minimum RNR NAK timer (IB encoding).
    pub min_rnr_timer: u8,
    /// Outstanding READ/atomics as initiator.
    pub max_rd_atomic: u8,
    /// Outstanding READ/atomics as responder.
    pub max_dest_rd_atomic: u8,
    /// Remote access the QP allows as responder (`ACCESS_REMOTE_*`).
    pub access_flags: u32,
    /// P_Key index.
    pub pkey_index: u16,
    /// Port number.
    pub port_num: u8,
    /// Source GID index.
    pub sgid_index: u8,
    /// Hop limit.
    pub hop_limit: u8,
    /// Traffic class.
    pub traffic_class: u8,
    /// Service level.
    pub sl: u8,
    /// Flow label.
    pub flow_label: u32,
}

impl RcParams {
    /// Sane defaults: PSNs 0, path MTU 4096, timeout 14, retry_cnt 7, rnr_retry 7,
    /// min_rnr_timer 1, 16 outstanding READ/atomics each way, all remote access, port 1.
    pub fn new(remote_qpn: u32, remote_gid: Gid) -> Self {
        RcParams {
            remote_qpn,
            remote_gid,
            sq_psn: 0,
            rq_psn: 0,
            path_mtu: abi::MTU_4096,
            timeout: 14,
            retry_cnt: 7,
            rnr_retry: 7,
            min_rnr_timer: 1,
            max_rd_atomic: 16,
            max_dest_rd_atomic: 16,
            access_flags: abi::ACCESS_REMOTE_WRITE
                | abi::ACCESS_REMOTE_READ
                | abi::ACCESS_REMOTE_ATOMIC,
            pkey_index: 0,
            port_num: 1,
            sgid_index: 0,
            hop_limit: 64,
            traffic_class: 0,
            sl: 0,
            flow_label: 0,
        }
    }

    /// The address vector of the path.
    pub fn ah_attr(&self) -> AhAttr {
        AhAttr {
            dgid: self.remote_gid,
            flow_label: self.flow_label,
            sgid_index: self.sgid_index,
            hop_limit: self.hop_limit,
            traffic_class: self.traffic_class,
            sl: self.sl,
            port_num: self.port_num,
            reserved: [0; 7],
        }
    }

    /// RESET→INIT attributes and mask.
    pub fn init_attr(&self) -> (QpAttr, u32) {
        let attr = QpAttr {
            qp_state: abi::QPS_INIT,
            pkey_index: self.pkey_index,
            port_num: self.port_num,
            qp_access_flags: self.access_flags,
            ..Default::default()
        };
        let mask = abi::QP_ATTR_STATE
            | abi::QP_ATTR_PKEY_INDEX
            | abi::QP_ATTR_PORT
            | abi::QP_ATTR_ACCESS_FLAGS;
        (attr, mask)
    }

    /// INIT→RTR attributes and mask.
    pub fn rtr_attr(&self) -> (QpAttr, u32) {
        let attr = QpAttr {
            qp_state: abi::QPS_RTR,
            ah_attr: self.ah_attr(),
            path_mtu: self.path_mtu,
            dest_qp_num: self.remote_qpn,
            rq_psn: self.rq_psn,
            max_dest_rd_atomic: self.max_dest_rd_atomic,
            min_rnr_timer: self.min_rnr_timer,
            ..Default::default()
        };
        let mask = abi::QP_ATTR_STATE
            | abi::QP_ATTR_AV
            | abi::QP_ATTR_PATH_MTU
            | abi::QP_ATTR_DEST_QPN
            | abi::QP_ATTR_RQ_PSN
            | abi::QP_ATTR_MAX_DEST_RD_ATOMIC
            | abi::QP_ATTR_MIN_RNR_TIMER;
        (attr, mask)
    }

    /// RTR→RTS attributes and mask.
    pub fn rts_attr(&self) -> (QpAttr, u32) {
        let attr = QpAttr {
            qp_state: abi::QPS_RTS,
            sq_psn: self.sq_psn,
            timeout: self.timeout,
            retry_cnt: self.retry_cnt,
            rnr_retry: self.rnr_retry,
            max_rd_atomic: self.max_rd_atomic,
            ..Default::default()
        };
        let mask = abi::QP_ATTR_STATE
            | abi::QP_ATTR_SQ_PSN
            | abi::QP_ATTR_TIMEOUT
            | abi::QP_ATTR_RETRY_CNT
            | abi::QP_ATTR_RNR_RETRY
            | abi::QP_ATTR_MAX_QP_RD_ATOMIC;
        (attr, mask)
    }
}

/// Parameters of [`crate::Driver::connect_ud_with`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdParams {
    /// The QP's Q_Key (incoming datagrams must carry it).
    pub qkey: u32,
    /// First send PSN.
    pub sq_psn: u32,
    /// P_Key index.
    pub pkey_index: u16,
    /// Port number.
    pub port_num: u8,
}

impl UdParams {
    /// Defaults: PSN 0, P_Key index 0, port 1.
    pub fn new(qkey: u32) -> Self {
        UdParams {
            qkey,
            sq_psn: 0,
            pkey_index: 0,
            port_num: 1,
        }
    }

    /// RESET→INIT attributes and mask.
    pub fn init_attr(&self) -> (QpAttr, u32) {
        let attr = QpAttr {
            qp_state: abi::QPS_INIT,
            pkey_index: self.pkey_index,
            port_num: self.port_num,
            qkey: self.qkey,
            ..Default::default()
        };
        let mask =
            abi::QP_ATTR_STATE | abi::QP_ATTR_PKEY_INDEX | abi::QP_ATTR_PORT | abi::QP_ATTR_QKEY;
        (attr, mask)
    }

    /// INIT→RTR attributes and mask.
    pub fn rtr_attr(&self) -> (QpAttr, u32) {
        let attr = QpAttr {
            qp_state: abi::QPS_RTR,
            ..Default::default()
        };
        (attr, abi::QP_ATTR_STATE)
    }

    /// RTR→RTS attributes and mask.
    pub fn rts_attr(&self) -> (QpAttr, u32) {
        let attr = QpAttr {
            qp_state: abi::QPS_RTS,
            sq_psn: self.sq_psn,
            ..Default::default()
        };
        (attr, abi::QP_ATTR_STATE | abi::QP_ATTR_SQ_PSN)
    }
}

/// An address vector for `dgid` with the defaults used by [`RcParams::new`] (port 1, GID index
/// 0, hop limit 64).
pub fn ah_attr_for(dgid: Gid) -> AhAttr {
    RcParams::new(0, dgid).ah_attr()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_choice() {
        // Header alone fits the minimum slot.
        assert_eq!(sq_geometry(1, 0, 0).unwrap(), (1, 64));
        assert_eq!(sq_geometry(0, 0, 0).unwrap(), (1, 64));
        // 64 + 4 × 16 = 128.
        assert_eq!(sq_geometry(100, 4, 0).unwrap(), (128, 128));
        // 64 + 65 inline → 256.
        assert_eq!(sq_geometry(128, 1, 65).unwrap(), (128, 256));
        // Inline dominates SGEs, and vice versa.
        assert_eq!(sq_geometry(3, 2, 200).unwrap(), (4, 512));
        assert_eq!(sq_geometry(3, 30, 64).unwrap(), (4, 1024));
        // The largest slot: 64 + 4032.
        assert_eq!(sq_geometry(1, 0, 4032).unwrap().1, 4096);
        assert!(sq_geometry(1, 0, 4033).is_err());
        assert!(sq_geometry(1, 253, 0).is_err());
        assert!(sq_geometry(u32::MAX, 1, 0).is_err());

        assert_eq!(rq_geometry(1, 1).unwrap(), (1, 64));
        assert_eq!(rq_geometry(65, 3).unwrap(), (128, 64));
        assert_eq!(rq_geometry(2, 4).unwrap(), (2, 128));
        assert_eq!(rq_geometry(2, 255).unwrap(), (2, 4096));
        assert!(rq_geometry(2, 256).is_err());
    }

    #[test]
    fn ring_slot_addressing() {
        // Discontiguous pages; 64-byte slots: 63 slots in page 0 after the header.
        let r = Ring {
            pages: vec![0x5000, 0x1000, 0x9000],
            depth: 128,
            stride: 64,
        };
        assert_eq!(r.header_gpa(abi::RING_CONS_OFFSET), GuestAddress(0x5008));
        assert_eq!(r.slot_gpa(0), GuestAddress(0x5040));
        assert_eq!(r.slot_gpa(62), GuestAddress(0x5fc0));
        assert_eq!(r.slot_gpa(63), GuestAddress(0x1000));
        assert_eq!(r.slot_gpa(127), GuestAddress(0x9000));
        // Free-running indices wrap onto the same slots.
        assert_eq!(r.slot_gpa(128), r.slot_gpa(0));
        assert_eq!(r.slot_gpa(u32::MAX), r.slot_gpa(127));
        // 4096-byte slots: slot i is page i+1.
        let big = Ring {
            pages: vec![0x3000, 0x7000, 0x2000],
            depth: 2,
            stride: 4096,
        };
        assert_eq!(big.slot_gpa(0), GuestAddress(0x7000));
        assert_eq!(big.slot_gpa(1), GuestAddress(0x2000));
        assert_eq!(big.slot_gpa(2), GuestAddress(0x7000));
        assert_eq!(abi::ring_pages(128, 64), 3);
    }

    #[test]
    fn send_wr_builders() {
        let sge = [Sge {
            addr: 1,
            length: 2,
            lkey: 3,
        }];
        let w = SendWr::write(7, &sge, 0x1000, 9);
        assert_eq!(
            (w.opcode, w.flags, w.remote_addr, w.rkey),
            (abi::WR_RDMA_WRITE, abi::SEND_F_SIGNALED, 0x1000, 9)
        );
        let w = w.with_imm(5).unsignaled().solicited();
        assert_eq!(
            (w.opcode, w.imm, w.flags),
            (abi::WR_RDMA_WRITE_WITH_IMM, 5, abi::SEND_F_SOLICITED)
        );
        let s = SendWr::send_inline(1, b"hi");
        assert_eq!(
            (s.opcode, s.inline, s.sges.len()),
            (abi::WR_SEND, Some(&b"hi"[..]), 0)
        );
        let a = SendWr::fetch_add(2, &sge, 8, 1, 42);
        assert_eq!(
            (a.opcode, a.compare_add),
            (abi::WR_ATOMIC_FETCH_AND_ADD, 42)
        );
        let u = SendWr::ud_send(3, &sge, Ah(5), 0x77, 0x1111);
        assert_eq!((u.ah, u.remote_qpn, u.qkey), (5, 0x77, 0x1111));
    }

    #[test]
    fn connect_masks_cover_the_required_attributes() {
        let p = RcParams::new(0x123, Gid::default());
        let (a, m) = p.init_attr();
        assert_eq!(a.qp_state, abi::QPS_INIT);
        assert_eq!(m & abi::QP_ATTR_ACCESS_FLAGS, abi::QP_ATTR_ACCESS_FLAGS);
        let (a, m) = p.rtr_attr();
        assert_eq!((a.dest_qp_num, a.path_mtu), (0x123, abi::MTU_4096));
        assert_eq!(m & !abi::QP_ATTR_SUPPORTED, 0);
        assert_eq!(m & abi::QP_ATTR_RQ_PSN, abi::QP_ATTR_RQ_PSN);
        let (_, m) = p.rts_attr();
        assert_eq!(m & abi::QP_ATTR_SQ_PSN, abi::QP_ATTR_SQ_PSN);
        let (a, m) = UdParams::new(0x42).init_attr();
        assert_eq!((a.qkey, m & abi::QP_ATTR_QKEY), (0x42, abi::QP_ATTR_QKEY));
    }
}
