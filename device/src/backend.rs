//! The backend boundary: what executes verbs once the device core has validated them.
//!
//! The device core owns the guest ABI: control commands, resource tables, rings, WQE
//! validation, translation of SGEs into guest segments, CQE writing and events. A backend owns
//! the *transport*: it carries validated work requests to peers and brings back responses. The
//! embedded soft fabric ([`crate::soft`]) is one backend; a host-ibverbs backend (a later issue)
//! implements the same trait by posting to a host QP and polling a host CQ.
//!
//! Every call gets a [`DeviceOps`]: the narrow view of the device core a backend may use (MR
//! checks for inbound requests, taking receive WQEs, reporting completions, failing a QP). All
//! calls happen with the device lock held; a backend never blocks.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vrdma_abi::Gid;

use crate::mr::SegList;
use crate::GuestMemoryMmap;

/// A validated send work request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendWr {
    /// The guest's WR id.
    pub wr_id: u64,
    /// `WR_*` opcode.
    pub opcode: u8,
    /// `SEND_F_*` flags.
    pub flags: u8,
    /// A completion must be written on success.
    pub signaled: bool,
    /// Immediate data.
    pub imm: Option<u32>,
    /// Gather list (SEND/WRITE) or scatter list (READ, atomic result), in local guest memory.
    pub local: SegList,
    /// Inline payload (copied from the WQE when it was fetched).
    pub inline: Option<Vec<u8>>,
    /// Message length in bytes.
    pub len: u64,
    /// RDMA/atomic remote address.
    pub remote_addr: u64,
    /// RDMA/atomic remote key.
    pub rkey: u32,
    /// Atomic compare or add operand.
    pub compare_add: u64,
    /// Atomic swap operand.
    pub swap: u64,
    /// UD destination.
    pub ud: Option<UdDest>,
    /// The core found the WQE malformed: complete it with this status when it reaches the
    /// head of the send queue (so completions stay in order), then fail the QP.
    pub error: Option<(u8, u32)>,
}

/// Where a UD datagram goes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UdDest {
    /// Destination GID.
    pub gid: Gid,
    /// Destination QPN.
    pub qpn: u32,
    /// Q_Key.
    pub qkey: u32,
}

/// A receive WQE, validated and translated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecvWr {
    /// The guest's WR id.
    pub wr_id: u64,
    /// Scatter list.
    pub segs: SegList,
    /// Capacity in bytes.
    pub len: u64,
}

/// What taking a receive WQE produced.
#[derive(Debug, PartialEq, Eq)]
pub enum TakeRecv {
    /// A receive WQE.
    Wr(RecvWr),
    /// No receive WQE is posted (receiver not ready).
    Empty,
    /// The next receive WQE is malformed (it was completed with an error; the vendor error
    /// says why), or the receive queue overran (0: the QP already failed). The caller fails the
    /// QP with this vendor error.
    Bad(u32),
}

/// A completion, before it becomes a CQE.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Completion {
    /// WR id.
    pub wr_id: u64,
    /// `WC_*` status.
    pub status: u8,
    /// `WC_OP_*` opcode.
    pub opcode: u8,
    /// Bytes (receives, READ, atomics).
    pub byte_len: u32,
    /// Immediate data.
    pub imm: Option<u32>,
    /// UD: source QPN.
    pub src_qp: u32,
    /// `WC_F_GRH` for UD receives.
    pub grh: bool,
    /// The sender set the solicited-event bit.
    pub solicited: bool,
    /// Vendor error detail.
    pub vendor_err: u32,
}

/// The QP attributes a backend needs, as the core holds them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QpInfo {
    /// QPN.
    pub qpn: u32,
    /// `QPT_*`.
    pub qp_type: u8,
    /// `QPS_*`.
    pub state: u32,
    /// Destination GID (RC).
    pub dest_gid: Gid,
    /// Destination QPN (RC).
    pub dest_qpn: u32,
    /// Q_Key (UD).
    pub qkey: u32,
    /// Path MTU in bytes.
    pub mtu: u32,
    /// Local ACK timeout exponent (0 = infinite).
    pub timeout: u8,
    /// Transport retries.
    pub retry_cnt: u8,
    /// RNR retries (7 = infinite).
    pub rnr_retry: u8,
    /// Minimum RNR NAK timer code (responder side).
    pub min_rnr_timer: u8,
    /// Outstanding READ/atomic as initiator.
    pub max_rd_atomic: u8,
    /// Initial send PSN.
    pub sq_psn: u32,
    /// Initial expected receive PSN.
    pub rq_psn: u32,
}

/// The device core as a backend sees it.
pub trait DeviceOps {
    /// This device's guest memory, to read and write (not to clone on the data path: see
    /// [`DeviceOps::memory_handle`]).
    fn memory(&self) -> &Arc<GuestMemoryMmap>;
    /// A handle on the same memory for the clones that packets carry ([`Payload`]).
    ///
    /// A clone writes the `Arc`'s reference count, which shares a cache line with the memory's
    /// region list. When every access goes through the one `Arc`, the clones of this
    /// device's thread and the reads of another thread (a guest driver; a peer running this
    /// device's responder on the direct path) move that line between cores on every message.
    /// A device therefore keeps a second `Arc` (another allocation over the same regions) for
    /// clones. The default is [`DeviceOps::memory`] itself.
    ///
    /// [`Payload`]: crate::soft::packet::Payload
    fn memory_handle(&self) -> &Arc<GuestMemoryMmap> {
        self.memory()
    }
    /// The QP's attributes, if it exists.
    fn qp_info(&self, qpn: u32) -> Option<QpInfo>;
    /// Checks an inbound remote access against the QP's PD and access flags and the MR named by
    /// `rkey`; returns the guest segments on success.
    fn resolve_remote(
        &self,
        qpn: u32,
        rkey: u32,
        addr: u64,
        len: u64,
        access: u32,
    ) -> Option<SegList>;
    /// Takes the next receive WQE of the QP.
    fn take_recv(&mut self, qpn: u32) -> TakeRecv;
    /// A send WR finished. A CQE is written if `signaled` or the status is an error.
    fn complete_send(&mut self, qpn: u32, c: Completion, signaled: bool);
    /// `n` (> 0) unsignaled send WRs of the QP finished successfully: no CQEs, only room in
    /// the send queue. The same as `n` calls of [`DeviceOps::complete_send`] with a successful
    /// completion and `signaled` false, in one call.
    fn complete_sends_quiet(&mut self, qpn: u32, n: usize);
    /// A receive WR finished.
    fn complete_recv(&mut self, qpn: u32, c: Completion);
    /// Host addresses (0: none) of the lines the next receive-consuming request to `qpn` will
    /// touch in this device's guest memory: the RQ's control block and next slot, the receive
    /// CQ's control block and next slot, and its CQ-notify word and summary. Hints for a
    /// prefetch only; the default has none.
    fn recv_lines(&self, _qpn: u32, _out: &mut [usize; RECV_LINES]) {}
    /// The QP failed: move it to ERR and flush what the core still holds for it.
    fn qp_error(&mut self, qpn: u32, vendor_err: u32);
}

/// How many lines [`DeviceOps::recv_lines`] reports.
pub const RECV_LINES: usize = 6;

/// A verbs execution engine.
pub trait Backend: Send {
    /// A QP was created (in RESET).
    fn create_qp(&mut self, info: &QpInfo);
    /// A QP's attributes or state changed. Moving to ERR must complete every WR the backend
    /// holds (flush errors); moving to RESET drops them without completions.
    fn modify_qp(&mut self, ops: &mut dyn DeviceOps, info: &QpInfo, prev_state: u32);
    /// A QP is being destroyed; the backend drops its state (the core flushed it before).
    fn destroy_qp(&mut self, qpn: u32);
    /// Executes a send WR; its completion is reported through `ops` later or at once.
    fn post_send(&mut self, ops: &mut dyn DeviceOps, qpn: u32, wr: SendWr);
    /// Makes progress: inbound packets, responses, expired timers.
    fn process(&mut self, ops: &mut dyn DeviceOps);
    /// WRs the backend holds for the QP (accepted, not yet completed).
    fn outstanding(&self, qpn: u32) -> usize;
}
