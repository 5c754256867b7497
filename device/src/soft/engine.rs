//! The soft transport engine: requester, responder and completer of every QP of one device.
//!
//! Shaped like Linux rxe. The *requester* turns send WRs into request packets, assigning PSNs
//! (one per MTU-sized packet of the message), and respects the READ/atomic depth and fences. The
//! *responder* checks each request's PSN against the expected PSN, executes it once (duplicates
//! are re-acknowledged; duplicate atomics replay the saved result instead of executing again),
//! and answers with an ACK, a READ response, an atomic ACK or a NAK (RNR, sequence, access,
//! invalid, operational). The *completer* retires WRs in order on responses, and drives the
//! retry (ACK timeout) and RNR timers.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;
use smallvec::SmallVec;

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, VolatileMemory};
use vrdma_abi as abi;

use super::packet::{psn, AtomicOp, Body, Data, Message, Packet, Payload, Syndrome, SRC_QPN_WIRE};
use super::{Port, RouteCache, Work};
use crate::backend::{Backend, Completion, DeviceOps, QpInfo, SendWr, TakeRecv, RECV_LINES};
use crate::mr::{self, Seg, SegList};
use crate::qp::{ack_timeout_us, rnr_timer_us};

thread_local! {
    /// This thread is inside a direct call into a peer ([`SoftBackend::pump_direct`]).
    static IN_DIRECT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks this thread as inside a direct call until dropped (also on unwinding).
struct DirectScope;

impl DirectScope {
    fn enter() -> Self {
        IN_DIRECT.set(true);
        DirectScope
    }
}

impl Drop for DirectScope {
    fn drop(&mut self) {
        IN_DIRECT.set(false);
    }
}

/// Saved results of recent atomics per QP, for replaying duplicates.
const ATOMIC_REPLAY: usize = 32;

/// A requester asks for an ACK (BTH AckReq) on signaled WRs, READs and atomics, and at least
/// every this many messages.
const ACK_REQ_EVERY: u32 = 8;

/// How long a responder may hold the ACK of wire requests that did not ask for one, and how
/// many such messages it coalesces at most. Across a wire every ACK is a datagram and a
/// wake-up at the requester; one per message doubles the packets of a ping-pong.
const ACK_DELAY: Duration = Duration::from_micros(100);
const ACK_DELAY_MAX_MSGS: u32 = 16;

#[derive(Debug)]
struct ReqOp {
    wr: SendWr,
    psn: u32,
    npsn: u32,
    sent: bool,
}

impl ReqOp {
    fn last_psn(&self) -> u32 {
        psn::add(self.psn, self.npsn.max(1) - 1)
    }

    fn is_rd_atomic(&self) -> bool {
        matches!(
            self.wr.opcode,
            abi::WR_RDMA_READ | abi::WR_ATOMIC_CMP_AND_SWP | abi::WR_ATOMIC_FETCH_AND_ADD
        )
    }
}

/// The responder's state of a QP. On the direct path another device's thread updates it (under
/// this device's lock), so it sits on cache lines of its own: the owner's requester work does
/// not move it between cores, nor it the requester's.
#[derive(Debug, Default)]
struct Resp {
    epsn: u32,
    msn: u32,
    atomic_replay: VecDeque<(u32, u64)>,
    /// A positive ACK not sent yet. ACKs are coalesced over one inbox drain: the last one
    /// acknowledges every request before it.
    ack_due: Option<AckDue>,
    /// Messages whose ACK is held (delayed ACKs).
    acks_held: u32,
    /// A PSN-sequence NAK was sent for the current gap (one per gap, as the spec asks; cleared
    /// when the expected PSN arrives). Not migrated: at worst one more NAK.
    nak_sent: bool,
}

#[derive(Debug)]
struct SoftQp {
    /// Read by both sides; written only by control operations.
    info: CachePadded<QpInfo>,
    next_psn: u32,
    ops: VecDeque<ReqOp>,
    retry_left: u8,
    rnr_left: u8,
    deadline: Option<Instant>,
    rnr_wait: bool,
    /// Ops `[0, sent)` are on the wire, the rest not yet (sends happen in order).
    sent: usize,
    /// READ/atomic ops among the sent ones.
    rd_out: u32,
    /// Requester: messages sent since the last one that asked for an ACK.
    since_ack_req: u32,
    /// Where the direct path last found the peer's lock (an address only, for a prefetch:
    /// never dereferenced).
    peer_hint: usize,
    /// Where the peer's last receive-consuming request (SEND, WRITE with immediate) found the
    /// lines its responder reads and writes in the peer's guest memory ([`DeviceOps::recv_lines`]),
    /// prefetched with the peer's lock: addresses only, never dereferenced.
    peer_lines: [usize; RECV_LINES],
    resp: CachePadded<Resp>,
}

impl SoftQp {
    fn new(info: QpInfo) -> Self {
        Self {
            info: CachePadded::new(info),
            next_psn: 0,
            ops: VecDeque::new(),
            retry_left: 0,
            rnr_left: 0,
            deadline: None,
            rnr_wait: false,
            sent: 0,
            rd_out: 0,
            since_ack_req: 0,
            peer_hint: 0,
            peer_lines: [0; RECV_LINES],
            resp: CachePadded::new(Resp::default()),
        }
    }

    /// Retires the head op.
    fn pop_front(&mut self) -> Option<ReqOp> {
        let op = self.ops.pop_front()?;
        if op.sent {
            self.sent -= 1;
            self.rd_out -= op.is_rd_atomic() as u32;
        }
        Some(op)
    }

    /// Go back N: everything not acknowledged is sent again, from the head.
    fn unsend_all(&mut self) {
        for o in self.ops.iter_mut() {
            o.sent = false;
        }
        self.sent = 0;
        self.rd_out = 0;
    }

    /// Assigns the PSNs of the op just appended (the last one); returns whether its WR is
    /// malformed.
    fn number_last(&mut self) -> bool {
        let first = self.next_psn;
        let Some(op) = self.ops.back_mut() else {
            return false;
        };
        let wr = &op.wr;
        let npsn = if wr.error.is_some() {
            0
        } else if matches!(
            wr.opcode,
            abi::WR_ATOMIC_CMP_AND_SWP | abi::WR_ATOMIC_FETCH_AND_ADD
        ) {
            1
        } else {
            packets(wr.len, self.info.mtu)
        };
        op.psn = first;
        op.npsn = npsn;
        self.next_psn = psn::add(first, npsn);
        npsn == 0
    }

    /// The next op, if it may be sent now. Ops leave in order; one must wait if it is
    /// malformed (it fails the QP when it reaches the head), a READ/atomic over the depth, or
    /// fenced behind an outstanding READ/atomic.
    fn next_sendable(&self) -> Option<&ReqOp> {
        let max_rd = (self.info.max_rd_atomic as u32).max(1);
        let op = self.ops.get(self.sent)?;
        let rd = op.is_rd_atomic();
        if op.wr.error.is_some()
            || (rd && self.rd_out >= max_rd)
            || (op.wr.flags & abi::SEND_F_FENCE != 0 && self.rd_out > 0)
        {
            return None;
        }
        Some(op)
    }

    /// Marks the next op (which [`SoftQp::next_sendable`] returned) as sent; returns whether
    /// its request asks for an ACK.
    fn mark_sent(&mut self) -> bool {
        let op = &mut self.ops[self.sent];
        let rd = op.is_rd_atomic();
        op.sent = true;
        let ack_req = op.wr.signaled || rd || self.since_ack_req + 1 >= ACK_REQ_EVERY;
        self.sent += 1;
        self.rd_out += rd as u32;
        self.since_ack_req = if ack_req { 0 } else { self.since_ack_req + 1 };
        ack_req
    }

    /// Marks the next op that may be sent now as sent and builds its request packet (`src`:
    /// this device's GID).
    fn next_request(&mut self, mem: &Arc<crate::GuestMemoryMmap>, src: abi::Gid) -> Option<Packet> {
        self.next_sendable()?;
        let ack_req = self.mark_sent();
        let mut pkt = build_request(mem, &self.info, &self.ops[self.sent - 1]);
        pkt.src = src;
        pkt.ack_req = ack_req;
        Some(pkt)
    }

    /// Whether the responder takes requests from `src`'s QP `src_qpn`: an RC QP in a state
    /// that receives (RTR to SQE), connected to that GID and QP (a request from a wire carries
    /// no source QPN, [`SRC_QPN_WIRE`]).
    fn accepts(&self, src: abi::Gid, src_qpn: u32) -> bool {
        self.info.qp_type == abi::QPT_RC
            && matches!(
                self.info.state,
                abi::QPS_RTR | abi::QPS_RTS | abi::QPS_SQD | abi::QPS_SQE
            )
            && src == self.info.dest_gid
            && (src_qpn == self.info.dest_qpn || src_qpn == SRC_QPN_WIRE)
    }

    /// The responder executed the expected message (first PSN `first`, `npsn` PSNs) from
    /// `to` (the requester's GID; `from` is this device's): it expects the next one, and owes
    /// the returned ACK.
    fn executed(&mut self, to: abi::Gid, from: abi::Gid, first: u32, npsn: u32) -> AckDue {
        let r = &mut self.resp;
        r.epsn = psn::add(r.epsn, npsn);
        r.msn = r.msn.wrapping_add(1) & psn::MASK;
        self.ack_due(to, from, psn::add(first, npsn - 1))
    }

    /// The positive ACK of everything up to `psn`, from this device (`from`) to the
    /// requester (`to`), with the responder's current MSN.
    fn ack_due(&self, to: abi::Gid, from: abi::Gid, psn: u32) -> AckDue {
        AckDue {
            to,
            from,
            dst_qpn: self.info.dest_qpn,
            psn,
            msn: self.resp.msn,
        }
    }

    /// In a state that sends (RTS, or SQD for what was fetched before) and not waiting for an
    /// RNR timer.
    fn may_send_state(&self) -> bool {
        matches!(self.info.state, abi::QPS_RTS | abi::QPS_SQD) && !self.rnr_wait
    }

    fn npsn(&self, len: u64) -> u32 {
        packets(len, self.info.mtu)
    }
}

/// The packets (PSNs) of a `len`-byte message at path MTU `mtu` (at least 256): at least one.
/// Path MTUs are powers of two, so this shifts instead of dividing (a 64-bit division on every
/// post and every request); any other value, which only a bad migration stream could bring,
/// still divides.
fn packets(len: u64, mtu: u32) -> u32 {
    let mtu = mtu.max(256) as u64;
    let n = if mtu.is_power_of_two() {
        (len >> mtu.trailing_zeros()) + u64::from(len & (mtu - 1) != 0)
    } else {
        len.div_ceil(mtu)
    };
    n.clamp(1, psn::MASK as u64 / 2) as u32
}

/// An operation just appended to a QP's send queue ([`SoftBackend::send_slot`]).
pub struct SendSlot<'a>(&'a mut SoftQp);

impl SendSlot<'_> {
    /// The WR, to be filled in place.
    pub fn wr(&mut self) -> &mut SendWr {
        &mut self.0.ops.back_mut().expect("just appended").wr
    }

    /// Numbers the filled-in WR. Returns whether it is malformed (the caller then runs
    /// [`SoftBackend::pump_posted`] at once, so that the QP fails before more WQEs are
    /// fetched).
    pub fn commit(self) -> bool {
        self.0.number_last()
    }
}

/// What a responder's replies need of the request they answer.
#[derive(Debug, Clone, Copy)]
struct ReqHdr {
    /// The requester's GID.
    src: abi::Gid,
    /// This device's GID, as the request named it.
    dst: abi::Gid,
    /// The QP the request is for.
    dst_qpn: u32,
}

impl ReqHdr {
    fn of(pkt: &Packet) -> Self {
        Self {
            src: pkt.src,
            dst: pkt.dst,
            dst_qpn: pkt.dst_qpn,
        }
    }
}

/// A positive ACK a responder owes (built into a packet only when it is sent: coalesced ACKs
/// replace each other without building one per message).
#[derive(Debug, Clone, Copy)]
struct AckDue {
    /// The requester's GID (the ACK's destination) and this device's (its source).
    to: abi::Gid,
    from: abi::Gid,
    dst_qpn: u32,
    psn: u32,
    msn: u32,
}

impl AckDue {
    fn packet(self, src_qpn: u32) -> Packet {
        Packet {
            src: self.from,
            dst: self.to,
            src_qpn,
            dst_qpn: self.dst_qpn,
            psn: self.psn,
            mtu: 0,
            ack_req: false,
            body: Body::Ack {
                syndrome: Syndrome::Ack,
                msn: self.msn,
            },
        }
    }
}

/// Completion opcode for a send opcode.
pub fn wc_opcode(op: u8) -> u8 {
    match op {
        abi::WR_RDMA_WRITE | abi::WR_RDMA_WRITE_WITH_IMM => abi::WC_OP_RDMA_WRITE,
        abi::WR_RDMA_READ => abi::WC_OP_RDMA_READ,
        abi::WR_ATOMIC_CMP_AND_SWP => abi::WC_OP_COMP_SWAP,
        abi::WR_ATOMIC_FETCH_AND_ADD => abi::WC_OP_FETCH_ADD,
        _ => abi::WC_OP_SEND,
    }
}

/// QPs by table index (QPNs are dense, generation-checked handles): no hashing on the hot path.
/// Each QP is boxed: whether a slot is occupied is then the box pointer in this table, not a
/// niche inside the QP (in the requester's queue), which its owner writes on every post while a
/// peer's thread looks the QP up on the direct path.
#[derive(Default)]
struct QpMap {
    slots: Vec<Option<Box<SoftQp>>>,
    len: usize,
}

impl QpMap {
    fn slot(qpn: &u32) -> usize {
        abi::handle_index(*qpn) as usize
    }

    fn get(&self, qpn: &u32) -> Option<&SoftQp> {
        self.slots
            .get(Self::slot(qpn))?
            .as_deref()
            .filter(|q| q.info.qpn == *qpn)
    }

    fn get_mut(&mut self, qpn: &u32) -> Option<&mut SoftQp> {
        self.slots
            .get_mut(Self::slot(qpn))?
            .as_deref_mut()
            .filter(|q| q.info.qpn == *qpn)
    }

    fn insert(&mut self, qpn: u32, qp: SoftQp) {
        let i = Self::slot(&qpn);
        if self.slots.len() <= i {
            self.slots.resize_with(i + 1, || None);
        }
        if self.slots[i].replace(Box::new(qp)).is_none() {
            self.len += 1;
        }
    }

    fn remove(&mut self, qpn: &u32) {
        if self.get(qpn).is_some() {
            self.slots[Self::slot(qpn)] = None;
            self.len -= 1;
        }
    }

    fn clear(&mut self) {
        self.slots.clear();
        self.len = 0;
    }

    fn len(&self) -> usize {
        self.len
    }
}

impl std::ops::Index<&u32> for QpMap {
    type Output = SoftQp;
    fn index(&self, qpn: &u32) -> &SoftQp {
        self.get(qpn).expect("QP exists")
    }
}

/// The soft fabric's backend for one device.
pub struct SoftBackend {
    port: Arc<Port>,
    qps: QpMap,
    /// QPNs with an armed timer (small: only QPs with traffic in flight).
    timed: Vec<u32>,
    scheduled: Option<Instant>,
    /// The time of the current device entry, read at most once per entry.
    now: Option<Instant>,
    inbox: VecDeque<Packet>,
    route_cache: RouteCache,
    /// QPs with an `ack_due` to send when the drain ends.
    acks: Vec<u32>,
    /// QPs with an `ack_due` held back (delayed ACKs), and until when at most.
    held_acks: Vec<u32>,
    held_until: Option<Instant>,
    /// A timer was armed or a delayed ACK held since the last [`SoftBackend::reschedule`].
    timers_changed: bool,
    /// Packets sent during the current device entry, routed together when it ends
    /// ([`SoftBackend::take_work`]): one inbox lock per destination instead of one per packet.
    outbox: VecDeque<Packet>,
    work: Work,
    /// An empty operation queue, lent to a QP whose queue is empty when WRs are posted and
    /// taken back when `pump_posted` leaves it empty again (see [`SoftBackend::send_slot`]).
    /// On lines of its own: it changes on every post, and on the direct path the peers'
    /// threads use the fields around it (`outbox`, `work`). Unpadded, it cost 0.06–0.1 µs per
    /// half round trip of a 2-byte write-lat.
    spare_ops: CachePadded<VecDeque<ReqOp>>,
    /// See [`SoftBackend::last_peer`]. Written only when it changes (this line is read by
    /// peers' threads on the direct path).
    last_peer: usize,
}

impl std::fmt::Debug for SoftBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftBackend")
            .field("qps", &self.qps.len())
            .finish()
    }
}

impl SoftBackend {
    /// A backend sending through `port`.
    pub fn new(port: Arc<Port>) -> Self {
        Self {
            port,
            qps: QpMap::default(),
            timed: Vec::new(),
            scheduled: None,
            now: None,
            inbox: VecDeque::new(),
            route_cache: RouteCache::default(),
            acks: Vec::new(),
            held_acks: Vec::new(),
            held_until: None,
            timers_changed: false,
            outbox: VecDeque::new(),
            work: Work::default(),
            spare_ops: CachePadded::new(VecDeque::new()),
            last_peer: 0,
        }
    }

    /// Ports that received packets since the last call. Ends the current device entry.
    pub fn take_work(&mut self) -> Work {
        // Written only when set: on the direct path another thread runs this device's
        // responder, and an unconditional store would move this line between the cores.
        if self.now.is_some() {
            self.now = None;
        }
        if !self.outbox.is_empty() {
            self.port
                .fabric()
                .route_all(&mut self.outbox, &mut self.route_cache, &mut self.work);
        }
        if self.work.is_empty() {
            return Work::default();
        }
        std::mem::take(&mut self.work)
    }

    /// The current time, read once per device entry.
    fn now(&mut self) -> Instant {
        *self.now.get_or_insert_with(Instant::now)
    }

    /// Drops every QP and pending packet (device reset).
    pub fn clear(&mut self) {
        self.qps.clear();
        self.acks.clear();
        self.held_acks.clear();
        self.held_until = None;
        self.timed.clear();
        self.port.clear();
    }

    /// Sends a packet: it leaves, in order, when the device entry ends.
    fn send(&mut self, pkt: Packet) {
        self.outbox.push_back(pkt);
    }

    fn reply(&mut self, req: ReqHdr, psn: u32, body: Body) {
        // Responses of one QP leave in order: a deferred ACK goes first.
        if let Some(ack) = self
            .qps
            .get_mut(&req.dst_qpn)
            .and_then(|q| q.resp.ack_due.take())
        {
            self.send(ack.packet(req.dst_qpn));
        }
        // Responses go to the connected peer QP (a wire request names only the destination).
        let Some(info) = self.qps.get(&req.dst_qpn).map(|q| &q.info) else {
            return;
        };
        let pkt = Packet {
            src: req.dst,
            dst: req.src,
            src_qpn: req.dst_qpn,
            dst_qpn: info.dest_qpn,
            psn,
            mtu: info.mtu,
            ack_req: false,
            body,
        };
        self.send(pkt);
    }

    fn complete_op(ops: &mut dyn DeviceOps, qpn: u32, op: &ReqOp, status: u8, vendor_err: u32) {
        let byte_len = match op.wr.opcode {
            abi::WR_RDMA_READ => op.wr.len as u32,
            abi::WR_ATOMIC_CMP_AND_SWP | abi::WR_ATOMIC_FETCH_AND_ADD => 8,
            _ => 0,
        };
        ops.complete_send(
            qpn,
            Completion {
                wr_id: op.wr.wr_id,
                status,
                opcode: wc_opcode(op.wr.opcode),
                byte_len: if status == abi::WC_SUCCESS {
                    byte_len
                } else {
                    0
                },
                vendor_err,
                ..Default::default()
            },
            op.wr.signaled,
        );
    }

    /// Completes every held WR of the QP with a flush error.
    fn flush_ops(&mut self, ops: &mut dyn DeviceOps, qpn: u32) {
        let Some(qp) = self.qps.get_mut(&qpn) else {
            return;
        };
        let held = std::mem::take(&mut qp.ops);
        qp.sent = 0;
        qp.rd_out = 0;
        qp.deadline = None;
        qp.rnr_wait = false;
        for op in held {
            Self::complete_op(ops, qpn, &op, abi::WC_WR_FLUSH_ERR, 0);
        }
    }

    /// Fails the QP: flushes what this backend holds, then lets the core flush the rest.
    fn fail(&mut self, ops: &mut dyn DeviceOps, qpn: u32, vendor_err: u32) {
        self.flush_ops(ops, qpn);
        if let Some(qp) = self.qps.get_mut(&qpn) {
            qp.info.state = abi::QPS_ERR;
        }
        ops.qp_error(qpn, vendor_err);
    }

    /// Completes the head op with `status` and fails the QP.
    fn fail_head(&mut self, ops: &mut dyn DeviceOps, qpn: u32, status: u8, vendor_err: u32) {
        if let Some(op) = self.qps.get_mut(&qpn).and_then(|q| q.pop_front()) {
            Self::complete_op(ops, qpn, &op, status, vendor_err);
        }
        self.fail(ops, qpn, vendor_err);
    }

    fn arm_timer(&mut self, qpn: u32, at: Instant) {
        if let Some(qp) = self.qps.get_mut(&qpn) {
            qp.deadline = Some(at);
            self.timers_changed = true;
            if !self.timed.contains(&qpn) {
                self.timed.push(qpn);
            }
        }
    }

    /// Sends what the QP may send now.
    ///
    /// In SQD too: SQD stops the *core* from fetching new WQEs (`State::process_sq` fetches in
    /// RTS only), so every operation held here was fetched — started, with its PSNs assigned —
    /// before the QP left RTS. Those run to completion as in RTS, including retransmissions
    /// (RNR retry, go-back-N after a sequence NAK or an ACK timeout) and operations the
    /// READ/atomic depth or a fence held back; EV_SQ_DRAINED waits for all of them.
    fn pump(&mut self, ops: &mut dyn DeviceOps, qpn: u32) {
        if !self.may_send(ops, qpn) {
            return;
        }
        // An idle QP whose peer is in this process: executed at once in the peer. What is
        // left (the peer was busy, or answered with an RNR NAK, ...) goes the usual way.
        if self.qps.get(&qpn).is_some_and(|q| q.sent == 0) {
            self.pump_direct(ops, qpn);
            if !self.may_send(ops, qpn) {
                return;
            }
        }
        let Some(qp) = self.qps.get_mut(&qpn) else {
            return;
        };
        // Send the unsent ops in order, as packets.
        let src = self.port.gid();
        let mut any = false;
        while let Some(pkt) = qp.next_request(ops.memory_handle(), src) {
            // Sent, in order, when the device entry ends.
            self.outbox.push_back(pkt);
            any = true;
        }
        // The ACK timer runs from the first send of an idle QP (the time is the entry's).
        if any {
            self.arm_ack_timer(qpn);
        }
    }

    /// Whether the QP may send now: it exists, is in RTS or SQD and waits for no RNR timer.
    /// A malformed WR at the head completes, in order, once everything before it has: the QP
    /// fails then.
    fn may_send(&mut self, ops: &mut dyn DeviceOps, qpn: u32) -> bool {
        let Some(qp) = self.qps.get(&qpn) else {
            return false;
        };
        if !qp.may_send_state() {
            return false;
        }
        if let Some((status, vendor)) = qp.ops.front().and_then(|f| f.wr.error) {
            self.fail_head(ops, qpn, status, vendor);
            return false;
        }
        true
    }

    /// Arms the QP's ACK timer if it has operations in flight and none is armed.
    fn arm_ack_timer(&mut self, qpn: u32) {
        let Some(qp) = self.qps.get(&qpn) else {
            return;
        };
        if qp.sent > 0 && qp.deadline.is_none() {
            if let Some(us) = ack_timeout_us(qp.info.timeout) {
                let at = self.now() + Duration::from_micros(us);
                self.arm_timer(qpn, at);
            }
        }
    }

    /// The direct path to a peer in this process: the QP's sendable operations are handed to
    /// the peer's responder synchronously, in this thread, under the peer's lock (taken with
    /// `try_lock`: never waiting while this device's lock is held, so no lock order exists to
    /// violate), and the peer's responses are completed here at once. Nothing else changes:
    /// the same PSNs, the same responder checks and execution, the same completer, in the same
    /// order as the packets would have been. What it saves is everything between: the
    /// request and response packets, both inboxes, the ACK timer, and the hand-off of both
    /// devices' state between the two threads (the peer's thread need not run its responder
    /// nor this device's completer). A SEND or an RDMA WRITE that comes in order does not even
    /// become a request packet ([`SoftBackend::message_direct`]).
    ///
    /// Used only when nothing of the QP is in flight, so a direct operation can never overtake
    /// one sent as a packet. When the peer is busy (its lock is taken), stopped for migration
    /// or across a wire, nothing happens and the caller sends packets as usual.
    fn pump_direct(&mut self, ops: &mut dyn DeviceOps, qpn: u32) {
        // Not from inside another device's direct call (the peer's entry may fetch its own
        // stalled send queues): one level only, so a chain of devices cannot nest locks and
        // stack frames without bound.
        if IN_DIRECT.get() {
            return;
        }
        let Some(dest) = self.qps.get(&qpn).map(|q| q.info.dest_gid) else {
            return;
        };
        // Field by field (no clone of the fabric's `Arc`: its count is shared by every
        // device's thread).
        let Some(peer) = self
            .port
            .fabric()
            .local_endpoint(&dest, &mut self.route_cache)
        else {
            return;
        };
        let hint = peer.hot_line() as usize;
        if let Some(qp) = self.qps.get_mut(&qpn).filter(|q| q.peer_hint != hint) {
            qp.peer_hint = hint;
        }
        let src = self.port.gid();
        // The peer's responses: completed while it is locked when they carry data, else
        // after (no move of the list in between).
        let mut replies: SmallVec<[Packet; 2]> = SmallVec::new();
        let mut ack: Option<(AckDue, u32)> = None;
        loop {
            let mut handed = 0;
            let mut progress = false;
            let scope = DirectScope::enter();
            let work = peer.with_engine(&mut |engine, peer_ops| {
                let Some(qp) = self.qps.get_mut(&qpn) else {
                    return;
                };
                let peer_qpn = qp.info.dest_qpn;
                // SENDs and WRITEs borrow this device's memory for the call.
                let lender = ops.memory_handle();
                let mut took_recv = false;
                while let Some(op) = qp.next_sendable() {
                    handed += 1;
                    took_recv |= matches!(
                        op.wr.opcode,
                        abi::WR_SEND | abi::WR_SEND_WITH_IMM | abi::WR_RDMA_WRITE_WITH_IMM
                    );
                    if engine.message_direct(peer_ops, src, &qp.info, op, lender) {
                        qp.mark_sent();
                    } else {
                        let Some(pkt) = qp.next_request(lender, src) else {
                            break;
                        };
                        engine.respond(peer_ops, pkt, true);
                    }
                    // A NAK or a READ/atomic response: complete it before sending more.
                    if !engine.outbox.is_empty() {
                        break;
                    }
                }
                // Where the next such request will find the peer's rings, for the prefetch of
                // this QP's next post (`prefetch_peer`).
                if took_recv {
                    peer_ops.recv_lines(peer_qpn, &mut qp.peer_lines);
                }
                engine.take_replies(src, qpn, &mut replies);
                // The positive ACK (always the last response) is only taken here; it becomes a
                // packet and is completed after the peer is unlocked, after `replies`.
                ack = engine.take_direct_ack(peer_qpn).map(|a| (a, peer_qpn));
                progress = !replies.is_empty() || ack.is_some();
                // A response with data is completed while the peer is still locked: a READ
                // response is copied from the peer's memory as the responder found it, before
                // its guest can change it. Plain ACKs/NAKs wait until the peer is unlocked and
                // has raised its interrupt, so that its woken guest does not wait for this
                // completer.
                if !replies.iter().all(|p| matches!(p.body, Body::Ack { .. })) {
                    for pkt in replies.drain(..) {
                        self.complete_response(ops, pkt);
                    }
                }
            });
            drop(scope);
            if self.last_peer != hint {
                self.last_peer = hint;
            }
            let Some(work) = work else {
                break;
            };
            for pkt in replies.drain(..) {
                self.complete_response(ops, pkt);
            }
            if let Some((a, peer_qpn)) = ack.take() {
                self.complete_response(ops, a.packet(peer_qpn));
            }
            self.port.count_direct(handed);
            self.work.extend(work);
            // Idle again with a well-formed WR at the head (a malformed one fails the QP in
            // `may_send`, after this loop).
            let more = self.qps.get(&qpn).is_some_and(|q| {
                q.sent == 0
                    && q.may_send_state()
                    && q.ops.front().is_some_and(|o| o.wr.error.is_none())
            });
            if !progress || !more {
                break;
            }
        }
        // Requests the peer dropped (as a wire would) are retried by the ACK timer.
        self.arm_ack_timer(qpn);
    }

    /// The positive ACK the direct path's last request left on the QP (the last response:
    /// anything sent before it went through the outbox), taken as it is: the caller builds its
    /// packet once the peer is unlocked.
    fn take_direct_ack(&mut self, qpn: u32) -> Option<AckDue> {
        self.qps.get_mut(&qpn)?.resp.ack_due.take()
    }

    /// Moves the packets this engine queued for `(gid, qpn)` (the responses of the direct
    /// path) from its outbox to `out`, in order.
    fn take_replies(&mut self, gid: abi::Gid, qpn: u32, out: &mut SmallVec<[Packet; 2]>) {
        if self.outbox.is_empty() {
            return;
        }
        let ours = |p: &Packet| p.dst == gid && p.dst_qpn == qpn;
        if self.outbox.iter().all(ours) {
            out.extend(self.outbox.drain(..));
            return;
        }
        let mut i = 0;
        while i < self.outbox.len() {
            if ours(&self.outbox[i]) {
                out.extend(self.outbox.remove(i));
            } else {
                i += 1;
            }
        }
    }

    /// Where the lock of the peer that the last direct call went to is (an address only, 0 if
    /// none): the device demotes that line when its entry ends ([`crate::Vrdma::queue_notify`]).
    pub fn last_peer(&self) -> usize {
        self.last_peer
    }

    /// Starts moving the line of the peer's lock, which the direct path will take, to this core,
    /// so that its transfer overlaps the WQE fetch and parse. The caller calls it when it learns
    /// that the QP has work, before fetching it.
    ///
    /// The peer's own thread took that line at its last post. Waiting for it at the `try_lock`
    /// cost ~0.07 µs of a ~0.7 µs half round trip (write-lat, poll): most of a cache-line
    /// transfer between the cores, which is the whole of the shm floor (~0.17 µs per half round
    /// trip here). The address is the one the direct path last found; a prefetch never faults,
    /// so a stale address (the peer is gone) costs nothing.
    ///
    /// With it go the peer's receive-side lines (`SoftQp::peer_lines`) when the QP's last
    /// request consumed a receive of a CQ the peer sleeps on: after its wake-up the peer's
    /// driver has touched every one of them (notify bits, CQE, RQ slot, arm), and the responder
    /// would otherwise miss on them one after the other. Interrupt write-lat, in-process A/B
    /// over 40 rounds: x0.977 and x0.981.
    #[inline]
    pub fn prefetch_peer(&self, qpn: u32) {
        let Some(qp) = self.qps.get(&qpn) else {
            return;
        };
        if qp.peer_hint != 0 {
            vrdma_memory::prefetch_for_write(qp.peer_hint as *const u8);
        }
        // Recorded together (or not at all, for a CQ that is only polled): one test for all.
        if qp.peer_lines[0] != 0 {
            for &line in qp.peer_lines.iter().filter(|&&l| l != 0) {
                vrdma_memory::prefetch_for_write(line as *const u8);
            }
        }
    }

    /// The batch form of [`Backend::post_send`] for an RC QP, used by the core's SQ fetch:
    /// appends an operation to the QP's send queue and returns its WR, which the caller fills
    /// in place (no move of the WR), then commits ([`SendSlot::commit`]). After the last
    /// WR of a doorbell, [`SoftBackend::pump_posted`] sends what may be sent (one call per
    /// batch instead of one per WR). `None` for an unknown or UD QP: those take `post_send`.
    pub fn send_slot(&mut self, qpn: u32) -> Option<SendSlot<'_>> {
        let qp = self.qps.get_mut(&qpn)?;
        if qp.info.qp_type == abi::QPT_UD {
            return None;
        }
        if qp.ops.is_empty() {
            // An idle QP borrows the spare queue, which the previous post used and left in
            // the cache: with thousands of QPs each QP's own queue would be a fresh ~12 KiB
            // (ReqOps of ~180 B) to miss on per batch. Usually it comes back at once
            // (`pump_posted`, the direct path completes everything).
            debug_assert!(self.spare_ops.is_empty());
            std::mem::swap(&mut qp.ops, &mut *self.spare_ops);
        }
        qp.ops.push_back(ReqOp {
            wr: SendWr::default(),
            psn: 0,
            npsn: 0,
            sent: false,
        });
        Some(SendSlot(qp))
    }

    /// Sends what the QP may send after WRs were posted (see [`SoftBackend::send_slot`]).
    pub fn pump_posted(&mut self, ops: &mut dyn DeviceOps, qpn: u32) {
        self.pump(ops, qpn);
        if let Some(qp) = self.qps.get_mut(&qpn) {
            if qp.ops.is_empty() {
                // Both queues are empty: the spare (warm) one returns to the backend.
                std::mem::swap(&mut qp.ops, &mut *self.spare_ops);
                // std's `clear` also moves the ring's head back to the buffer's start.
                self.spare_ops.clear();
            }
        }
        // Only a newly armed timer can move the next deadline earlier.
        if self.timers_changed {
            self.reschedule();
        }
    }

    fn post_ud(&mut self, ops: &mut dyn DeviceOps, qpn: u32, wr: SendWr) {
        let Some(qp) = self.qps.get(&qpn) else {
            return;
        };
        let op = ReqOp {
            wr,
            psn: qp.next_psn,
            npsn: 1,
            sent: true,
        };
        if let Some((status, vendor)) = op.wr.error {
            Self::complete_op(ops, qpn, &op, status, vendor);
            self.fail(ops, qpn, vendor);
            return;
        }
        if let Some(dest) = op.wr.ud {
            let pkt = Packet {
                src: self.port.gid(),
                dst: dest.gid,
                src_qpn: qpn,
                dst_qpn: dest.qpn,
                psn: op.psn,
                mtu: qp.info.mtu,
                ack_req: false,
                body: Body::Ud {
                    qkey: dest.qkey,
                    imm: op.wr.imm,
                    solicited: op.wr.flags & abi::SEND_F_SOLICITED != 0,
                    payload: payload_of(ops.memory_handle(), &op.wr),
                },
            };
            self.send(pkt);
        }
        if let Some(qp) = self.qps.get_mut(&qpn) {
            qp.next_psn = psn::add(qp.next_psn, 1);
        }
        // Unreliable: complete as soon as it is on the wire.
        Self::complete_op(ops, qpn, &op, abi::WC_SUCCESS, 0);
    }

    fn handle(&mut self, ops: &mut dyn DeviceOps, pkt: Packet) {
        match &pkt.body {
            Body::Send { .. } | Body::Write { .. } | Body::ReadReq { .. } | Body::Atomic { .. } => {
                self.respond(ops, pkt, false)
            }
            Body::Ack { .. } | Body::ReadResp { .. } | Body::AtomicAck { .. } => {
                self.complete(ops, pkt)
            }
            Body::Ud { .. } => self.receive_ud(ops, pkt),
        }
    }

    // ---- responder --------------------------------------------------------------------------

    /// Executes a request. `direct`: on the direct path, where the caller takes the positive
    /// ACK from the QP at once ([`SoftBackend::take_direct_ack`]) instead of it being queued.
    fn respond(&mut self, ops: &mut dyn DeviceOps, pkt: Packet, direct: bool) {
        let qpn = pkt.dst_qpn;
        let hdr = ReqHdr::of(&pkt);
        let Some(qp) = self.qps.get_mut(&qpn) else {
            return; // Unknown QPN: dropped, as on a wire.
        };
        if !qp.accepts(pkt.src, pkt.src_qpn) {
            return;
        }
        let len = match &pkt.body {
            Body::Send { payload, .. } | Body::Write { payload, .. } => payload.len(),
            Body::ReadReq { len, .. } => *len,
            _ => 8,
        };
        let npsn = match &pkt.body {
            Body::Atomic { .. } => 1,
            _ => qp.npsn(len),
        };
        let d = psn::diff(pkt.psn, qp.resp.epsn);
        if d > 0 {
            // Out of sequence: a packet before it was refused (RNR) or lost. Drop it and, once
            // per gap, NAK the expected PSN so the requester goes back to it without waiting
            // for its ACK timeout (a requester waiting on an RNR timer ignores the NAK).
            if !qp.resp.nak_sent {
                qp.resp.nak_sent = true;
                let epsn = qp.resp.epsn;
                self.reply(hdr, epsn, nak(Syndrome::NakSeq));
            }
            return;
        }
        if d < 0 {
            self.duplicate(ops, qpn, pkt);
            return;
        }
        qp.resp.nak_sent = false;
        if let Some(msg) = pkt.body.message() {
            if self.execute_message(ops, hdr, pkt.psn, msg) {
                self.acknowledge(hdr, pkt.psn, npsn, lazy_ack(&pkt), direct);
            }
            return;
        }
        match pkt.body {
            Body::ReadReq { addr, rkey, len } => {
                let Some(segs) = ops.resolve_remote(qpn, rkey, addr, len, abi::ACCESS_REMOTE_READ)
                else {
                    self.reply(hdr, pkt.psn, nak(Syndrome::NakAccess));
                    self.fail(ops, qpn, 0);
                    return;
                };
                let payload = Payload::Guest {
                    mem: ops.memory_handle().clone(),
                    segs,
                };
                if let Some(qp) = self.qps.get_mut(&qpn) {
                    qp.resp.epsn = psn::add(qp.resp.epsn, npsn);
                }
                self.reply(hdr, pkt.psn, Body::ReadResp { payload });
            }
            Body::Atomic { addr, rkey, op } => {
                let res = if !addr.is_multiple_of(8) {
                    None
                } else {
                    ops.resolve_remote(qpn, rkey, addr, 8, abi::ACCESS_REMOTE_ATOMIC)
                };
                let orig = res.and_then(|segs| execute_atomic(ops, &segs, op));
                let Some(orig) = orig else {
                    let syn = if !addr.is_multiple_of(8) {
                        Syndrome::NakInvalid
                    } else {
                        Syndrome::NakAccess
                    };
                    self.reply(hdr, pkt.psn, nak(syn));
                    self.fail(ops, qpn, 0);
                    return;
                };
                if let Some(qp) = self.qps.get_mut(&qpn) {
                    qp.resp.epsn = psn::add(qp.resp.epsn, 1);
                    qp.resp.atomic_replay.push_back((pkt.psn, orig));
                    if qp.resp.atomic_replay.len() > ATOMIC_REPLAY {
                        qp.resp.atomic_replay.pop_front();
                    }
                }
                self.reply(hdr, pkt.psn, Body::AtomicAck { orig });
            }
            _ => {}
        }
    }

    /// Executes a SEND or an RDMA WRITE whose PSN is the expected one `psn`, from a packet or,
    /// on the direct path, from the requester's WR ([`SoftBackend::message_direct`]): consumes
    /// a receive for a SEND or a WRITE with immediate, copies the data and completes the
    /// receive. Returns whether it executed; if not, it answered (an RNR NAK, or a NAK and the
    /// QP fails) and the responder still expects `psn`.
    fn execute_message(
        &mut self,
        ops: &mut dyn DeviceOps,
        req: ReqHdr,
        psn: u32,
        msg: Message<'_>,
    ) -> bool {
        let qpn = req.dst_qpn;
        let len = msg.data.len();
        // A WRITE's target is checked before a receive is consumed.
        let target = match msg.write {
            Some((addr, rkey)) => {
                let access = abi::ACCESS_REMOTE_WRITE;
                let Some(segs) = ops.resolve_remote(qpn, rkey, addr, len, access) else {
                    if msg.imm.is_some() {
                        // The receive this WRITE would have consumed completes in error.
                        if let TakeRecv::Wr(r) = ops.take_recv(qpn) {
                            ops.complete_recv(
                                qpn,
                                recv_completion(r.wr_id, abi::WC_LOC_ACCESS_ERR),
                            );
                        }
                    }
                    self.reply(req, psn, nak(Syndrome::NakAccess));
                    self.fail(ops, qpn, 0);
                    return false;
                };
                Some(segs)
            }
            None => None,
        };
        let recv = if target.is_none() || msg.imm.is_some() {
            match ops.take_recv(qpn) {
                TakeRecv::Wr(r) => Some(r),
                TakeRecv::Empty => {
                    let t = self.qps.get(&qpn).map_or(0, |q| q.info.min_rnr_timer);
                    self.reply(req, psn, nak(Syndrome::RnrNak(t)));
                    return false;
                }
                TakeRecv::Bad(vendor) => {
                    self.reply(req, psn, nak(Syndrome::NakOperational));
                    self.fail(ops, qpn, vendor);
                    return false;
                }
            }
        } else {
            None
        };
        if let Some(segs) = &target {
            msg.data.copy_to(ops.memory(), segs);
        } else if let Some(r) = &recv {
            if len > r.len {
                ops.complete_recv(qpn, recv_completion(r.wr_id, abi::WC_LOC_LEN_ERR));
                self.reply(req, psn, nak(Syndrome::NakInvalid));
                self.fail(ops, qpn, 0);
                return false;
            }
            msg.data.copy_to(ops.memory(), &r.segs);
        }
        if let Some(r) = recv {
            let opcode = if target.is_some() {
                abi::WC_OP_RECV_RDMA_WITH_IMM
            } else {
                abi::WC_OP_RECV
            };
            ops.complete_recv(
                qpn,
                Completion {
                    wr_id: r.wr_id,
                    status: abi::WC_SUCCESS,
                    opcode,
                    byte_len: len as u32,
                    imm: msg.imm,
                    solicited: msg.solicited,
                    ..Default::default()
                },
            );
        }
        true
    }

    /// The direct path's SEND or RDMA WRITE (with or without immediate), executed straight
    /// from the requester's WR `op` of QP `req` (`src`: the requester's GID; `lender`: its
    /// memory), with no request packet built, moved and dropped. Write-lat, in-process A/B:
    /// x0.88 per half round trip in poll mode (WRITE), x0.985 in interrupt mode (WRITE with
    /// immediate). Returns `false`, having changed nothing, for any other operation, or when the
    /// QP does not take the request as the next in order (not accepted, a duplicate, out of
    /// sequence): the caller then builds the request packet for [`SoftBackend::respond`],
    /// which decides those cases. Otherwise `true`: executed, or answered with a NAK.
    fn message_direct(
        &mut self,
        ops: &mut dyn DeviceOps,
        src: abi::Gid,
        req: &QpInfo,
        op: &ReqOp,
        lender: &crate::GuestMemoryMmap,
    ) -> bool {
        let wr = &op.wr;
        let write = match wr.opcode {
            abi::WR_SEND | abi::WR_SEND_WITH_IMM => None,
            abi::WR_RDMA_WRITE | abi::WR_RDMA_WRITE_WITH_IMM => Some((wr.remote_addr, wr.rkey)),
            _ => return false,
        };
        let qpn = req.dest_qpn;
        let Some(qp) = self.qps.get_mut(&qpn) else {
            return false;
        };
        if !qp.accepts(src, req.qpn) || op.psn != qp.resp.epsn {
            return false;
        }
        qp.resp.nak_sent = false;
        let msg = Message {
            write,
            imm: wr.imm,
            solicited: wr.flags & abi::SEND_F_SOLICITED != 0,
            data: match &wr.inline {
                Some(bytes) => Data::Bytes(bytes),
                None => Data::Segs(lender, &wr.local),
            },
        };
        let hdr = ReqHdr {
            src,
            dst: req.dest_gid,
            dst_qpn: qpn,
        };
        if self.execute_message(ops, hdr, op.psn, msg) {
            self.acknowledge(hdr, op.psn, op.npsn, false, true);
        }
        true
    }

    /// The responder executed the expected message `req` (first PSN `first`, `npsn` PSNs): it
    /// expects the next one and owes its ACK ([`SoftBackend::defer_ack`]).
    fn acknowledge(&mut self, req: ReqHdr, first: u32, npsn: u32, lazy: bool, direct: bool) {
        let Some(qp) = self.qps.get_mut(&req.dst_qpn) else {
            return;
        };
        let due = qp.executed(req.src, req.dst, first, npsn);
        self.defer_ack(req.dst_qpn, due, lazy, direct);
    }

    /// Records the positive ACK `due` of QP `qpn`, to be sent when the inbox drain ends (or
    /// before any other response of that QP). A `lazy` one (a wire request that did not ask
    /// for an ACK) is sent within [`ACK_DELAY`] (or after [`ACK_DELAY_MAX_MSGS`] such
    /// messages), coalesced with what follows. On the `direct` path the caller takes it at once
    /// ([`SoftBackend::take_direct_ack`]).
    fn defer_ack(&mut self, qpn: u32, due: AckDue, lazy: bool, direct: bool) {
        let Some(qp) = self.qps.get_mut(&qpn) else {
            return;
        };
        let first = qp.resp.ack_due.is_none();
        // Supersedes any ACK still owed: this one acknowledges everything before it.
        qp.resp.ack_due = Some(due);
        if direct {
            return;
        }
        let held = qp.resp.acks_held;
        qp.resp.acks_held = if lazy && held + 1 < ACK_DELAY_MAX_MSGS {
            held + 1
        } else {
            0
        };
        let lazy = qp.resp.acks_held > 0;
        if lazy {
            if first {
                self.held_acks.push(qpn);
            }
            if self.held_until.is_none() {
                self.held_until = Some(self.now() + ACK_DELAY);
                self.timers_changed = true;
            }
        } else if first || held > 0 {
            self.acks.push(qpn);
        }
    }

    /// The device of `gid` resumed after a migration: QPs towards it resend everything not
    /// acknowledged, from the oldest (packets sent while it moved were lost), without spending
    /// a retry. A QP waiting for an RNR timer keeps waiting.
    fn go_back(&mut self, ops: &mut dyn DeviceOps, gid: abi::Gid) {
        let qpns: Vec<u32> = self
            .qps
            .slots
            .iter()
            .flatten()
            .filter(|q| q.info.dest_gid == gid && q.sent > 0 && !q.rnr_wait)
            .map(|q| q.info.qpn)
            .collect();
        for qpn in qpns {
            if let Some(qp) = self.qps.get_mut(&qpn) {
                qp.unsend_all();
                qp.deadline = None;
            }
            self.pump(ops, qpn);
        }
    }

    /// Sends the held (delayed) ACKs.
    fn flush_held_acks(&mut self) {
        self.held_until = None;
        while let Some(qpn) = self.held_acks.pop() {
            if let Some(qp) = self.qps.get_mut(&qpn) {
                qp.resp.acks_held = 0;
                if let Some(ack) = qp.resp.ack_due.take() {
                    self.send(ack.packet(qpn));
                }
            }
        }
    }

    fn flush_acks(&mut self) {
        while let Some(qpn) = self.acks.pop() {
            if let Some(qp) = self.qps.get_mut(&qpn) {
                qp.resp.acks_held = 0;
                if let Some(ack) = qp.resp.ack_due.take() {
                    self.send(ack.packet(qpn));
                }
            }
        }
    }

    fn duplicate(&mut self, ops: &mut dyn DeviceOps, qpn: u32, pkt: Packet) {
        let Some(qp) = self.qps.get(&qpn) else {
            return;
        };
        match &pkt.body {
            Body::Atomic { .. } => {
                // Never execute twice: replay the saved result.
                if let Some(&(_, orig)) = qp.resp.atomic_replay.iter().find(|(p, _)| *p == pkt.psn)
                {
                    self.reply(ReqHdr::of(&pkt), pkt.psn, Body::AtomicAck { orig });
                }
            }
            Body::ReadReq { addr, rkey, len } => {
                if let Some(segs) =
                    ops.resolve_remote(qpn, *rkey, *addr, *len, abi::ACCESS_REMOTE_READ)
                {
                    let payload = Payload::Guest {
                        mem: ops.memory_handle().clone(),
                        segs,
                    };
                    self.reply(ReqHdr::of(&pkt), pkt.psn, Body::ReadResp { payload });
                }
            }
            _ => {
                // Re-acknowledge up to the last PSN received so far.
                let last = psn::add(qp.resp.epsn, psn::MASK);
                let due = qp.ack_due(pkt.src, pkt.dst, last);
                self.defer_ack(qpn, due, lazy_ack(&pkt), false);
            }
        }
    }

    fn receive_ud(&mut self, ops: &mut dyn DeviceOps, pkt: Packet) {
        let qpn = pkt.dst_qpn;
        let Some(qp) = self.qps.get(&qpn) else {
            return;
        };
        let Body::Ud {
            qkey,
            imm,
            solicited,
            payload,
        } = &pkt.body
        else {
            return;
        };
        if qp.info.qp_type != abi::QPT_UD
            || !matches!(
                qp.info.state,
                abi::QPS_RTR | abi::QPS_RTS | abi::QPS_SQD | abi::QPS_SQE
            )
            || *qkey != qp.info.qkey
        {
            return;
        }
        let recv = match ops.take_recv(qpn) {
            TakeRecv::Wr(r) => r,
            // Unreliable: no receive, no delivery.
            TakeRecv::Empty => return,
            // The core completed the malformed receive with an error; the QP fails as for RC.
            TakeRecv::Bad(vendor) => {
                self.fail(ops, qpn, vendor);
                return;
            }
        };
        let total = abi::GRH_SIZE as u64 + payload.len();
        if total > recv.len {
            ops.complete_recv(qpn, recv_completion(recv.wr_id, abi::WC_LOC_LEN_ERR));
            return;
        }
        let grh = build_grh(&pkt, payload.len());
        let mem = ops.memory_handle().clone();
        mr::write_segs(&mem, &recv.segs, &grh);
        let tail = split_segs(&recv.segs, abi::GRH_SIZE as u64);
        payload.copy_to(&mem, &tail);
        ops.complete_recv(
            qpn,
            Completion {
                wr_id: recv.wr_id,
                status: abi::WC_SUCCESS,
                opcode: abi::WC_OP_RECV,
                byte_len: total as u32,
                imm: *imm,
                src_qp: pkt.src_qpn,
                grh: true,
                solicited: *solicited,
                ..Default::default()
            },
        );
    }

    // ---- completer --------------------------------------------------------------------------

    /// Retires SEND/WRITE ops whose last PSN is at or before `upto` (an ACK for a later PSN
    /// acknowledges them too). Stops at READ/atomic ops, which need their own response.
    fn retire_acked(&mut self, ops: &mut dyn DeviceOps, qpn: u32, upto: u32, inclusive: bool) {
        let Some(qp) = self.qps.get_mut(&qpn) else {
            return;
        };
        // Complete in order by reference, then drop the retired ops in place.
        // Unsignaled successes write no CQE: they are reported together, once.
        let (mut n, mut quiet) = (0, 0);
        for op in qp.ops.iter() {
            let d = psn::diff(op.last_psn(), upto);
            let covered = if inclusive { d <= 0 } else { d < 0 };
            if !op.sent || op.is_rd_atomic() || !covered {
                break;
            }
            if op.wr.signaled {
                Self::complete_op(ops, qpn, op, abi::WC_SUCCESS, 0);
            } else {
                quiet += 1;
            }
            n += 1;
        }
        if quiet > 0 {
            ops.complete_sends_quiet(qpn, quiet);
        }
        if n > 0 {
            qp.ops.drain(..n);
            // Every retired op was sent and none was a READ/atomic.
            qp.sent -= n;
            qp.retry_left = qp.info.retry_cnt;
            qp.rnr_left = qp.info.rnr_retry;
        }
    }

    fn complete(&mut self, ops: &mut dyn DeviceOps, pkt: Packet) {
        let qpn = pkt.dst_qpn;
        if self.complete_response(ops, pkt) {
            self.pump(ops, qpn);
        }
    }

    /// The completer proper: handles one response; returns whether the QP made progress
    /// (then the caller sends what may be sent now).
    fn complete_response(&mut self, ops: &mut dyn DeviceOps, pkt: Packet) -> bool {
        let qpn = pkt.dst_qpn;
        let Some(qp) = self.qps.get(&qpn) else {
            return false;
        };
        if qp.info.qp_type != abi::QPT_RC
            || !matches!(qp.info.state, abi::QPS_RTS | abi::QPS_SQD | abi::QPS_SQE)
            || pkt.src != qp.info.dest_gid
            || (pkt.src_qpn != qp.info.dest_qpn && pkt.src_qpn != SRC_QPN_WIRE)
        {
            return false;
        }
        match pkt.body {
            Body::Ack {
                syndrome: Syndrome::Ack,
                ..
            } => self.retire_acked(ops, qpn, pkt.psn, true),
            Body::Ack { syndrome, .. } => {
                // Everything before the NAKed PSN was received.
                self.retire_acked(ops, qpn, pkt.psn, false);
                let Some(qp) = self.qps.get_mut(&qpn) else {
                    return false;
                };
                let Some(idx) = qp
                    .ops
                    .iter()
                    .position(|o| o.sent && psn::diff(o.last_psn(), pkt.psn) >= 0)
                else {
                    return false;
                };
                if idx != 0 || psn::diff(qp.ops[0].psn, pkt.psn) > 0 {
                    return false; // Stale NAK.
                }
                match syndrome {
                    Syndrome::RnrNak(t) => {
                        if qp.rnr_left == 0 {
                            self.fail_head(ops, qpn, abi::WC_RNR_RETRY_EXC_ERR, 0);
                            return false;
                        }
                        if qp.info.rnr_retry != 7 {
                            qp.rnr_left -= 1;
                        }
                        qp.unsend_all();
                        qp.rnr_wait = true;
                        let at = self.now() + Duration::from_micros(rnr_timer_us(t));
                        self.arm_timer(qpn, at);
                        return false;
                    }
                    Syndrome::NakSeq if qp.rnr_wait => return false,
                    Syndrome::NakSeq => {
                        qp.unsend_all();
                        qp.deadline = None;
                    }
                    Syndrome::NakAccess => {
                        self.fail_head(ops, qpn, abi::WC_REM_ACCESS_ERR, 0);
                        return false;
                    }
                    Syndrome::NakInvalid => {
                        self.fail_head(ops, qpn, abi::WC_REM_INV_REQ_ERR, 0);
                        return false;
                    }
                    Syndrome::NakOperational | Syndrome::Ack => {
                        self.fail_head(ops, qpn, abi::WC_REM_OP_ERR, 0);
                        return false;
                    }
                }
            }
            Body::ReadResp { ref payload } => {
                self.retire_acked(ops, qpn, pkt.psn, false);
                let Some(qp) = self.qps.get_mut(&qpn) else {
                    return false;
                };
                // A response of the wrong length (only a wire peer can send one) is ignored
                // like a lost one: the retry timer asks again.
                let matches = qp.ops.front().is_some_and(|o| {
                    o.sent
                        && o.wr.opcode == abi::WR_RDMA_READ
                        && o.psn == pkt.psn
                        && payload.len() == o.wr.len
                });
                if !matches {
                    return false;
                }
                let op = qp.pop_front().expect("front exists");
                qp.retry_left = qp.info.retry_cnt;
                payload.copy_to(ops.memory(), &op.wr.local);
                Self::complete_op(ops, qpn, &op, abi::WC_SUCCESS, 0);
            }
            Body::AtomicAck { orig } => {
                self.retire_acked(ops, qpn, pkt.psn, false);
                let Some(qp) = self.qps.get_mut(&qpn) else {
                    return false;
                };
                let matches = qp
                    .ops
                    .front()
                    .is_some_and(|o| o.sent && o.is_rd_atomic() && o.psn == pkt.psn);
                if !matches {
                    return false;
                }
                let op = qp.pop_front().expect("front exists");
                qp.retry_left = qp.info.retry_cnt;
                mr::write_segs(ops.memory(), &op.wr.local, &orig.to_le_bytes());
                Self::complete_op(ops, qpn, &op, abi::WC_SUCCESS, 0);
            }
            _ => return false,
        }
        // Progress: restart the ACK timer for what is still in flight, then send more.
        if let Some(qp) = self.qps.get_mut(&qpn) {
            qp.deadline = None;
            let inflight = qp.sent > 0;
            let timeout = ack_timeout_us(qp.info.timeout);
            if let (true, Some(us)) = (inflight, timeout) {
                let at = self.now() + Duration::from_micros(us);
                self.arm_timer(qpn, at);
            }
        }
        true
    }

    fn expire(&mut self, ops: &mut dyn DeviceOps, now: Instant) {
        let due: Vec<u32> = self
            .timed
            .iter()
            .copied()
            .filter(|q| {
                self.qps
                    .get(q)
                    .and_then(|qp| qp.deadline)
                    .is_some_and(|d| d <= now)
            })
            .collect();
        for qpn in due {
            let Some(qp) = self.qps.get_mut(&qpn) else {
                continue;
            };
            qp.deadline = None;
            if qp.rnr_wait {
                qp.rnr_wait = false;
            } else {
                if qp.sent == 0 {
                    continue;
                }
                // The peer is stopped for migration: wait for it instead of spending a retry.
                if self.port.fabric().is_paused(&qp.info.dest_gid) {
                    if let Some(us) = ack_timeout_us(qp.info.timeout) {
                        qp.deadline = Some(now + Duration::from_micros(us));
                    }
                    continue;
                }
                if qp.retry_left == 0 {
                    self.fail_head(ops, qpn, abi::WC_RETRY_EXC_ERR, 0);
                    continue;
                }
                qp.retry_left -= 1;
                qp.unsend_all();
            }
            self.pump(ops, qpn);
        }
        let qps = &self.qps;
        self.timed
            .retain(|q| qps.get(q).is_some_and(|qp| qp.deadline.is_some()));
    }

    fn reschedule(&mut self) {
        self.timers_changed = false;
        if self.timed.is_empty() && self.held_until.is_none() {
            return;
        }
        let next = self
            .timed
            .iter()
            .filter_map(|q| self.qps.get(q).and_then(|qp| qp.deadline))
            .chain(self.held_until)
            .min();
        if let Some(at) = next {
            let now = self.now();
            let stale = self.scheduled.is_none_or(|s| at < s || s <= now);
            if stale {
                self.scheduled = Some(at);
                self.port.fabric().schedule(&self.port, at);
            }
        }
    }
}

fn nak(s: Syndrome) -> Body {
    Body::Ack {
        syndrome: s,
        msn: 0,
    }
}

/// A request whose ACK the responder may hold and coalesce (see [`ACK_DELAY`]): one from a
/// wire that did not ask for an ACK.
fn lazy_ack(req: &Packet) -> bool {
    req.src_qpn == SRC_QPN_WIRE && !req.ack_req
}

fn recv_completion(wr_id: u64, status: u8) -> Completion {
    Completion {
        wr_id,
        status,
        opcode: abi::WC_OP_RECV,
        ..Default::default()
    }
}

/// The payload of a request: the WR's inline bytes, or its segments of `mem`.
fn payload_of(mem: &Arc<crate::GuestMemoryMmap>, wr: &SendWr) -> Payload {
    match &wr.inline {
        Some(b) => Payload::Bytes(Arc::new(b.clone())),
        None if wr.local.is_empty() => Payload::Empty,
        None => Payload::Guest {
            mem: mem.clone(),
            segs: SegList::from_slice(&wr.local),
        },
    }
}

fn build_request(mem: &Arc<crate::GuestMemoryMmap>, info: &QpInfo, op: &ReqOp) -> Packet {
    let wr = &op.wr;
    let solicited = wr.flags & abi::SEND_F_SOLICITED != 0;
    let body = match wr.opcode {
        abi::WR_SEND | abi::WR_SEND_WITH_IMM => Body::Send {
            imm: wr.imm,
            solicited,
            payload: payload_of(mem, wr),
        },
        abi::WR_RDMA_WRITE | abi::WR_RDMA_WRITE_WITH_IMM => Body::Write {
            addr: wr.remote_addr,
            rkey: wr.rkey,
            imm: wr.imm,
            solicited,
            payload: payload_of(mem, wr),
        },
        abi::WR_RDMA_READ => Body::ReadReq {
            addr: wr.remote_addr,
            rkey: wr.rkey,
            len: wr.len,
        },
        abi::WR_ATOMIC_CMP_AND_SWP => Body::Atomic {
            addr: wr.remote_addr,
            rkey: wr.rkey,
            op: AtomicOp::CmpSwap {
                compare: wr.compare_add,
                swap: wr.swap,
            },
        },
        _ => Body::Atomic {
            addr: wr.remote_addr,
            rkey: wr.rkey,
            op: AtomicOp::FetchAdd {
                add: wr.compare_add,
            },
        },
    };
    Packet {
        src: Default::default(),
        dst: info.dest_gid,
        src_qpn: info.qpn,
        dst_qpn: info.dest_qpn,
        psn: op.psn,
        mtu: info.mtu,
        ack_req: true,
        body,
    }
}

fn execute_atomic(ops: &mut dyn DeviceOps, segs: &[Seg], op: AtomicOp) -> Option<u64> {
    let seg = segs.first().filter(|s| segs.len() == 1 && s.len == 8)?;
    let mem = ops.memory();
    let slice = mem.get_slice(GuestAddress(seg.gpa), 8).ok()?;
    let cell = slice.get_atomic_ref::<AtomicU64>(0).ok()?;
    let orig = match op {
        AtomicOp::CmpSwap { compare, swap } => {
            match cell.compare_exchange(compare, swap, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(v) | Err(v) => v,
            }
        }
        AtomicOp::FetchAdd { add } => cell.fetch_add(add, Ordering::SeqCst),
    };
    // Atomic references bypass the dirty bitmap: record the write for migration ourselves.
    slice.bitmap().mark_dirty(0, 8);
    Some(orig)
}

fn build_grh(pkt: &Packet, payload_len: u64) -> [u8; 40] {
    let mut g = [0u8; 40];
    g[0] = 0x60; // IPv6 version; traffic class and flow label zero.
    g[4..6].copy_from_slice(&(payload_len as u16).to_be_bytes());
    g[6] = 0x1b; // next header: IB BTH
    g[7] = 64; // hop limit
    g[8..24].copy_from_slice(&pkt.src.raw);
    g[24..40].copy_from_slice(&pkt.dst.raw);
    g
}

/// The part of `segs` after the first `skip` bytes.
pub(crate) fn split_segs(segs: &[Seg], mut skip: u64) -> SegList {
    let mut out = SegList::new();
    for s in segs {
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        out.push(Seg {
            gpa: s.gpa + skip,
            len: s.len - skip,
        });
        skip = 0;
    }
    out
}

impl Backend for SoftBackend {
    fn create_qp(&mut self, info: &QpInfo) {
        self.qps.insert(info.qpn, SoftQp::new(*info));
    }

    fn modify_qp(&mut self, ops: &mut dyn DeviceOps, info: &QpInfo, prev_state: u32) {
        let qpn = info.qpn;
        let Some(qp) = self.qps.get_mut(&qpn) else {
            return;
        };
        *qp.info = *info;
        match info.state {
            abi::QPS_RESET => {
                *qp = SoftQp::new(*info);
            }
            abi::QPS_ERR if prev_state != abi::QPS_ERR => {
                self.flush_ops(ops, qpn);
            }
            abi::QPS_RTR if prev_state == abi::QPS_INIT => {
                qp.resp.epsn = info.rq_psn;
            }
            abi::QPS_RTS => {
                if prev_state == abi::QPS_RTR {
                    qp.next_psn = info.sq_psn;
                    qp.retry_left = info.retry_cnt;
                    qp.rnr_left = info.rnr_retry;
                }
                self.pump(ops, qpn);
            }
            _ => {}
        }
    }

    fn destroy_qp(&mut self, qpn: u32) {
        self.qps.remove(&qpn);
        self.timed.retain(|&q| q != qpn);
    }

    fn post_send(&mut self, ops: &mut dyn DeviceOps, qpn: u32, wr: SendWr) {
        let Some(qp) = self.qps.get_mut(&qpn) else {
            return;
        };
        if qp.info.qp_type == abi::QPT_UD {
            self.post_ud(ops, qpn, wr);
            return;
        }
        qp.ops.push_back(ReqOp {
            wr,
            psn: 0,
            npsn: 0,
            sent: false,
        });
        qp.number_last();
        self.pump_posted(ops, qpn);
    }

    fn process(&mut self, ops: &mut dyn DeviceOps) {
        for gid in self.port.take_resumed() {
            self.go_back(ops, gid);
        }
        let mut inbox = std::mem::take(&mut self.inbox);
        self.port.drain_into(&mut inbox);
        // Packets that arrive meanwhile (e.g. to a QP of this device) put this port on the
        // caller's work list again.
        while let Some(pkt) = inbox.pop_front() {
            self.handle(ops, pkt);
        }
        self.flush_acks();
        if self.held_until.is_some_and(|t| t <= self.now()) {
            self.flush_held_acks();
        }
        // Keep the buffer's capacity for the next entry.
        self.inbox = inbox;
        if !self.timed.is_empty() {
            let now = self.now();
            self.expire(ops, now);
        }
        self.reschedule();
    }

    fn outstanding(&self, qpn: u32) -> usize {
        self.qps.get(&qpn).map_or(0, |q| q.ops.len())
    }
}

/// A saved requester operation (see [`BackendSnapshot`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct ReqOpSnapshot {
    wr: SendWr,
    psn: u32,
    npsn: u32,
    sent: bool,
}

/// The saved transport state of one QP: requester (PSNs, operations in flight with their
/// sequence numbers, retry budgets, whether a timer was armed) and responder (expected PSN,
/// MSN, the saved results of recent atomics that make duplicates replay instead of re-execute).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct SoftQpSnapshot {
    info: QpInfo,
    next_psn: u32,
    ops: Vec<ReqOpSnapshot>,
    retry_left: u8,
    rnr_left: u8,
    timer_armed: bool,
    rnr_wait: bool,
    epsn: u32,
    msn: u32,
    atomic_replay: Vec<(u32, u64)>,
}

/// The saved state of a [`SoftBackend`]. Packets in flight are not part of it: inbound ones
/// stay held in the fabric (the port's inbox) and follow the device to its new port; outbound
/// ones were already delivered to the peers' inboxes.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct BackendSnapshot {
    qps: Vec<SoftQpSnapshot>,
}

/// What [`SoftBackend::restore`] checks each saved QP against: the core's view of it.
pub(crate) struct QpLimits {
    /// The QP's attributes as the restored core holds them.
    pub info: QpInfo,
    /// Send queue depth: the most operations the backend may hold.
    pub sq_depth: u32,
    /// The QP's maximum inline size.
    pub max_inline: u32,
}

impl SoftBackend {
    /// Sends the coalesced ACKs still pending, so that a stopped device owes its peers nothing.
    pub(crate) fn flush_pending_acks(&mut self) {
        self.flush_acks();
        self.flush_held_acks();
    }

    /// Whether the backend knows the QP.
    pub(crate) fn has_qp(&self, qpn: u32) -> bool {
        self.qps.get(&qpn).is_some()
    }

    /// Operations held over all QPs.
    pub(crate) fn total_outstanding(&self) -> usize {
        self.qps.slots.iter().flatten().map(|q| q.ops.len()).sum()
    }

    /// Saves the transport state. Coalesced ACKs must have been flushed.
    pub(crate) fn save(&self) -> BackendSnapshot {
        let qps = self
            .qps
            .slots
            .iter()
            .flatten()
            .map(|q| SoftQpSnapshot {
                info: *q.info,
                next_psn: q.next_psn,
                ops: q
                    .ops
                    .iter()
                    .map(|o| ReqOpSnapshot {
                        wr: o.wr.clone(),
                        psn: o.psn,
                        npsn: o.npsn,
                        sent: o.sent,
                    })
                    .collect(),
                retry_left: q.retry_left,
                rnr_left: q.rnr_left,
                timer_armed: q.deadline.is_some(),
                rnr_wait: q.rnr_wait,
                epsn: q.resp.epsn,
                msn: q.resp.msn,
                atomic_replay: q.resp.atomic_replay.iter().copied().collect(),
            })
            .collect();
        BackendSnapshot { qps }
    }

    /// Rebuilds a backend from a snapshot. Every value is checked as if a guest had written it:
    /// `limits` gives, for a QPN, the restored core's view of the QP (`None`: no such QP).
    /// Timers are not armed here; [`SoftBackend::restart_timers`] does that on resume.
    pub(crate) fn restore(
        port: Arc<Port>,
        mem: Option<&crate::GuestMemoryMmap>,
        snap: BackendSnapshot,
        limits: &dyn Fn(u32) -> Option<QpLimits>,
    ) -> Result<Self, String> {
        let mut b = Self::new(port);
        for s in snap.qps {
            let qpn = s.info.qpn;
            let lim = limits(qpn).ok_or_else(|| format!("backend QP {qpn:#x} has no core QP"))?;
            if s.info != lim.info {
                return Err(format!("QP {qpn:#x}: backend and core attributes differ"));
            }
            if b.qps.get(&qpn).is_some() {
                return Err(format!("QP {qpn:#x} saved twice"));
            }
            let psn_ok = |p: u32| p <= psn::MASK;
            if !psn_ok(s.next_psn) || !psn_ok(s.epsn) || s.msn > psn::MASK {
                return Err(format!("QP {qpn:#x}: PSN out of range"));
            }
            if s.ops.len() > lim.sq_depth as usize {
                return Err(format!("QP {qpn:#x}: more operations than SQ slots"));
            }
            if s.atomic_replay.len() > ATOMIC_REPLAY {
                return Err(format!("QP {qpn:#x}: atomic replay log too long"));
            }
            if s.info.retry_cnt < s.retry_left || s.rnr_left > s.info.rnr_retry.max(7) {
                return Err(format!("QP {qpn:#x}: retry budget out of range"));
            }
            let mut qp = SoftQp::new(s.info);
            qp.next_psn = s.next_psn;
            qp.retry_left = s.retry_left;
            qp.rnr_left = s.rnr_left;
            qp.rnr_wait = s.rnr_wait;
            qp.resp.epsn = s.epsn;
            qp.resp.msn = s.msn;
            qp.resp.atomic_replay = s.atomic_replay.into_iter().collect();
            let mut expect_psn = s.ops.first().map(|o| o.psn);
            let mut unsent_seen = false;
            for o in s.ops {
                let wr = &o.wr;
                let npsn = if wr.error.is_some() {
                    0
                } else if matches!(
                    wr.opcode,
                    abi::WR_ATOMIC_CMP_AND_SWP | abi::WR_ATOMIC_FETCH_AND_ADD
                ) {
                    1
                } else {
                    qp.npsn(wr.len)
                };
                let bad = |what: &str| Err(format!("QP {qpn:#x}: operation {}: {what}", wr.wr_id));
                if s.info.qp_type != abi::QPT_RC {
                    return bad("only RC QPs hold operations");
                }
                if o.npsn != npsn || Some(o.psn) != expect_psn || !psn_ok(o.psn) {
                    return bad("inconsistent PSNs");
                }
                expect_psn = Some(psn::add(o.psn, o.npsn));
                if o.sent && unsent_seen {
                    return bad("sent operations must be a prefix");
                }
                unsent_seen |= !o.sent;
                if wr.len > crate::state::MAX_MSG {
                    return bad("message too long");
                }
                match &wr.inline {
                    Some(data)
                        if data.len() as u64 != wr.len
                            || data.len() as u64 > lim.max_inline as u64 =>
                    {
                        return bad("bad inline data");
                    }
                    Some(_) => {}
                    None if wr.error.is_none() => {
                        let Some(mem) = mem else {
                            return bad("no guest memory");
                        };
                        if !wr
                            .local
                            .iter()
                            .all(|g| mr::in_one_region(mem, g.gpa, g.len))
                        {
                            return bad("segment outside guest memory");
                        }
                        let total = mr::total_len(&wr.local);
                        let want = match wr.opcode {
                            abi::WR_ATOMIC_CMP_AND_SWP | abi::WR_ATOMIC_FETCH_AND_ADD => 8,
                            _ => wr.len,
                        };
                        if total != want {
                            return bad("segment lengths do not add up");
                        }
                    }
                    None => {}
                }
                qp.ops.push_back(ReqOp {
                    wr: o.wr,
                    psn: o.psn,
                    npsn: o.npsn,
                    sent: o.sent,
                });
                if o.sent {
                    qp.sent += 1;
                    qp.rd_out += qp.ops.back().is_some_and(|op| op.is_rd_atomic()) as u32;
                }
            }
            if let Some(e) = expect_psn {
                if e != qp.next_psn {
                    return Err(format!(
                        "QP {qpn:#x}: next PSN does not follow the operations"
                    ));
                }
            }
            if s.timer_armed || qp.rnr_wait {
                // Re-armed with a fresh deadline on resume.
                qp.deadline = Some(Instant::now());
            }
            b.qps.insert(qpn, qp);
        }
        Ok(b)
    }

    /// Re-arms the retry and RNR timers of restored QPs with full, fresh deadlines (the time a
    /// device spent stopped does not count against its peers or itself), and resends nothing:
    /// operations on the wire are answered to the device's GID wherever it now lives.
    pub(crate) fn restart_timers(&mut self) {
        let now = Instant::now();
        let mut armed = Vec::new();
        for q in self.qps.slots.iter_mut().flatten() {
            if q.deadline.is_none() {
                continue;
            }
            // The RNR delay the peer asked for is not saved: retry after the shortest one.
            let us = if q.rnr_wait {
                Some(rnr_timer_us(1))
            } else {
                ack_timeout_us(q.info.timeout)
            };
            q.deadline = us.map(|us| now + Duration::from_micros(us));
            if q.deadline.is_some() {
                armed.push(q.info.qpn);
            }
        }
        for qpn in armed {
            if !self.timed.contains(&qpn) {
                self.timed.push(qpn);
            }
        }
        self.scheduled = None;
        self.now = None;
        self.reschedule();
        // Peers across a wire: tell them where this GID runs now (they may not have talked to
        // this process's gateway yet).
        let mut peers: Vec<abi::Gid> = Vec::new();
        for q in self.qps.slots.iter().flatten() {
            if q.info.qp_type == abi::QPT_RC && !peers.contains(&q.info.dest_gid) {
                peers.push(q.info.dest_gid);
            }
        }
        self.port.fabric().announce(&self.port.gid(), false, &peers);
    }
}

#[cfg(test)]
mod tests {
    use super::{packets, psn};

    #[test]
    fn packets_shift_as_the_division_would() {
        for mtu in [0u32, 256, 512, 1024, 2048, 4096, 1000, 1500] {
            let m = mtu.max(256) as u64;
            for len in [
                0u64,
                1,
                255,
                256,
                257,
                4095,
                4096,
                4097,
                1 << 20,
                (1 << 31) + 3,
            ] {
                let want = len.div_ceil(m).clamp(1, psn::MASK as u64 / 2) as u32;
                assert_eq!(packets(len, mtu), want, "len {len} mtu {mtu}");
            }
        }
        // More packets than half the PSN space: clamped, as before.
        assert_eq!(packets(u64::MAX, 256), psn::MASK / 2);
    }
}
