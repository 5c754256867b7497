//! The data path: posting work requests, polling and arming CQs, doorbells — plus raw ring
//! access for hostile-guest tests.
//!
//! Nothing here allocates or takes a lock: WQEs are written straight into the rings in guest
//! memory, producer indices are published with release stores, and the doorbell is an atomic OR
//! into the doorbell area followed (unless the device is polling) by a queue-1 notification.

use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vm_memory::bitmap::Bitmap;
use vm_memory::{Address, Bytes, VolatileMemory};
use vrdma_abi as abi;
use vrdma_abi::{Cqe, RecvWqe, SendWqe};

use crate::error::{Error, Result};
use crate::verbs::{Cq, Qp, RecvWr, Ring, SendWr};
use crate::Driver;

/// Valid `SEND_F_*` bits.
const SEND_FLAGS: u8 =
    abi::SEND_F_FENCE | abi::SEND_F_SIGNALED | abi::SEND_F_SOLICITED | abi::SEND_F_INLINE;

/// Whether the driver puts `wr`'s SGE into its WQE header (`SEND_F_HDR_SGE`, ABI §10.2):
/// `VRDMA_F_HDR_SGE` is among `features` and `wr` is an RC WR with exactly one SGE and no
/// inline data. Such a WQE is one cache line, and a QP of at most one SGE gets 64-byte slots:
/// the driver writes, and the device reads, one line per WR instead of two. With 4096 QPs,
/// whose send rings no longer fit the caches, the post of a batch of 32 took ~0.5 µs longer
/// than with one QP, in the stores to the rings' cold lines (64 B write-bw).
pub fn uses_hdr_sge(features: u64, qp_type: u8, wr: &SendWr<'_>) -> bool {
    abi::hdr_sge_usable(features, qp_type) && wr.inline.is_none() && wr.sges.len() == 1
}

/// The [`SendWqe`] header the driver writes for `wr` on a QP of type `qp_type`.
///
/// With inline data: `SEND_F_INLINE` is added, `num_sge` = 0 and `inline_len` = data length;
/// otherwise `num_sge` = number of SGEs. On a UD QP, `compare_add` carries the Q_Key. With
/// `hdr_sge` (see [`uses_hdr_sge`]): `SEND_F_HDR_SGE` is added and the one SGE is stored in the
/// header ([`SendWqe::set_hdr_sge`]).
pub fn send_wqe_header(qp_type: u8, wr: &SendWr<'_>, hdr_sge: bool) -> SendWqe {
    let (flags, num_sge, inline_len) = match wr.inline {
        Some(d) => (wr.flags | abi::SEND_F_INLINE, 0, d.len() as u32),
        None => (wr.flags, wr.sges.len() as u16, 0),
    };
    let mut w = SendWqe {
        wr_id: wr.wr_id,
        opcode: wr.opcode,
        flags,
        num_sge,
        imm_data: wr.imm,
        inline_len,
        ah: wr.ah,
        remote_addr: wr.remote_addr,
        rkey: wr.rkey,
        remote_qpn: wr.remote_qpn,
        compare_add: if qp_type == abi::QPT_UD {
            wr.qkey as u64
        } else {
            wr.compare_add
        },
        swap: wr.swap,
        hdr_sge_addr: 0,
    };
    if let (true, [sge]) = (hdr_sge, wr.sges) {
        w.set_hdr_sge(*sge);
    }
    w
}

/// Checks what the driver itself must guarantee for any WQE: it fits its slot.
#[inline]
fn check_fits(stride: u32, hdr: u32, body: usize, index: usize) -> Result<()> {
    if hdr as u64 + body as u64 > stride as u64 {
        return Err(Error::InvalidWr {
            index,
            what: "WQE does not fit the ring slot",
        });
    }
    Ok(())
}

/// The checks a verbs driver makes before posting a send WR (like EINVAL/ENOMEM of
/// `ibv_post_send`). Semantic checks (lkeys, bounds, atomics' SGE size) are the device's.
fn validate_send(qp: &Qp, index: usize, wr: &SendWr<'_>) -> Result<()> {
    let bad = |what| Err(Error::InvalidWr { index, what });
    if wr.opcode > abi::WR_ATOMIC_FETCH_AND_ADD {
        return bad("unknown opcode");
    }
    if wr.flags & !SEND_FLAGS != 0 {
        return bad("unknown send flags");
    }
    if qp.qp_type == abi::QPT_UD && !matches!(wr.opcode, abi::WR_SEND | abi::WR_SEND_WITH_IMM) {
        return bad("UD QPs only SEND");
    }
    match wr.inline {
        Some(d) => {
            if !matches!(
                wr.opcode,
                abi::WR_SEND
                    | abi::WR_SEND_WITH_IMM
                    | abi::WR_RDMA_WRITE
                    | abi::WR_RDMA_WRITE_WITH_IMM
            ) {
                return bad("inline data with an opcode that cannot carry it");
            }
            if d.len() as u64 > qp.caps.max_inline as u64 {
                return bad("inline data exceeds the QP's max_inline");
            }
        }
        None => {
            if wr.flags & abi::SEND_F_INLINE != 0 {
                return bad("SEND_F_INLINE without inline data");
            }
            if wr.sges.len() as u64 > qp.caps.max_send_sge as u64 {
                return bad("more SGEs than the QP's max_send_sge");
            }
        }
    }
    Ok(())
}

impl Driver {
    // -----------------------------------------------------------------------------------------
    // Posting
    // -----------------------------------------------------------------------------------------

    /// Posts send WRs: validates them all, checks ring space against the device's
    /// `header.cons`, writes one WQE per slot, release-stores `header.prod` once, rings the
    /// doorbell once. All or nothing: on error nothing was posted.
    ///
    /// Refused while the driver knows the QP to be in RESET (ABI §9.2: the driver MUST NOT post
    /// then); use [`Driver::post_send_unchecked`] to post anyway.
    pub fn post_send(&self, qp: &mut Qp, wrs: &[SendWr<'_>]) -> Result<()> {
        if qp.state() == abi::QPS_RESET {
            return Err(Error::InvalidArgument(
                "QP is in RESET: posting is not allowed",
            ));
        }
        for (i, wr) in wrs.iter().enumerate() {
            validate_send(qp, i, wr)?;
        }
        self.post_send_unchecked(qp, wrs)
    }

    /// [`Driver::post_send`] without the verbs-level checks (opcode, flags, SGE count against
    /// the QP's caps, inline rules), so the device sees malformed WQEs. The WQE must still fit
    /// its slot.
    pub fn post_send_unchecked(&self, qp: &mut Qp, wrs: &[SendWr<'_>]) -> Result<()> {
        if !qp.sq.alive() {
            return Err(Error::InvalidArgument("QP destroyed"));
        }
        if wrs.is_empty() {
            return Ok(());
        }
        let features = self.features();
        for (i, wr) in wrs.iter().enumerate() {
            let body = match wr.inline {
                _ if uses_hdr_sge(features, qp.qp_type, wr) => 0,
                Some(d) => d.len(),
                None => {
                    if wr.sges.len() > u16::MAX as usize {
                        return Err(Error::InvalidWr {
                            index: i,
                            what: "more than 65535 SGEs",
                        });
                    }
                    wr.sges.len() * abi::SGE_SIZE as usize
                }
            };
            check_fits(qp.sq.stride, abi::SEND_WQE_HDR, body, i)?;
        }
        qp.sq_free = Self::reserve(&qp.sq, qp.sq_free, wrs.len(), "send queue", || {
            self.ring_free(&qp.sq, qp.sq_prod)
        })?;
        // Each WQE is stored into its slot (one slice per slot: slots never cross a page), the
        // header and then the SGEs or inline data; the rest of the slot is padding, which the
        // device does not read (ABI §9.2).
        let mut prod = qp.sq_prod;
        for wr in wrs {
            let slot = crate::gmem::slice(&self.mem, qp.sq.slot_gpa(prod), qp.sq.stride as usize)?;
            let hdr_sge = uses_hdr_sge(features, qp.qp_type, wr);
            slot.write_obj(send_wqe_header(qp.qp_type, wr, hdr_sge), 0)?;
            let body = abi::SEND_WQE_HDR as usize;
            match wr.inline {
                Some(d) => slot.write_slice(d, body)?,
                None if hdr_sge => {}
                None => {
                    for (k, sge) in wr.sges.iter().enumerate() {
                        slot.write_obj(*sge, body + k * abi::SGE_SIZE as usize)?;
                    }
                }
            }
            prod = prod.wrapping_add(1);
        }
        // Release: the WQEs are visible before the new producer index.
        crate::gmem::store(
            &self.mem,
            prod,
            qp.sq.header_gpa(abi::RING_PROD_OFFSET),
            Ordering::Release,
        )?;
        qp.sq_prod = prod;
        qp.sq_free -= wrs.len() as u32;
        self.doorbell(abi::DB_SQ_BITMAP_OFFSET, abi::handle_index(qp.qpn))
    }

    /// Posts receive WRs: RecvWqe + SGEs per slot, then a release store of the RQ's
    /// `header.prod`. No doorbell (the device reads the RQ producer when it needs a receive) —
    /// except for a QP the driver knows to be in ERR, whose SQ doorbell is rung so the device
    /// flushes the new receives (ABI §9.3).
    ///
    /// Refused while the driver knows the QP to be in RESET (receives may be posted from INIT
    /// on); use [`Driver::post_recv_unchecked`] to post anyway.
    pub fn post_recv(&self, qp: &mut Qp, wrs: &[RecvWr<'_>]) -> Result<()> {
        if qp.state() == abi::QPS_RESET {
            return Err(Error::InvalidArgument(
                "QP is in RESET: posting is not allowed",
            ));
        }
        for (i, wr) in wrs.iter().enumerate() {
            if wr.sges.len() as u64 > qp.caps.max_recv_sge as u64 {
                return Err(Error::InvalidWr {
                    index: i,
                    what: "more SGEs than the QP's max_recv_sge",
                });
            }
        }
        self.post_recv_unchecked(qp, wrs)
    }

    /// [`Driver::post_recv`] without the SGE-count check against the QP's caps (the WQE must
    /// still fit its slot).
    pub fn post_recv_unchecked(&self, qp: &mut Qp, wrs: &[RecvWr<'_>]) -> Result<()> {
        if !qp.rq.alive() {
            return Err(Error::InvalidArgument("QP destroyed"));
        }
        if wrs.is_empty() {
            return Ok(());
        }
        for (i, wr) in wrs.iter().enumerate() {
            check_fits(
                qp.rq.stride,
                abi::RECV_WQE_HDR,
                wr.sges.len().saturating_mul(abi::SGE_SIZE as usize),
                i,
            )?;
        }
        qp.rq_free = Self::reserve(&qp.rq, qp.rq_free, wrs.len(), "receive queue", || {
            self.ring_free(&qp.rq, qp.rq_prod)
        })?;
        let mut prod = qp.rq_prod;
        for wr in wrs {
            let slot = qp.rq.slot_gpa(prod);
            let hdr = RecvWqe {
                wr_id: wr.wr_id,
                num_sge: wr.sges.len() as u32,
                reserved: 0,
            };
            crate::gmem::write_obj(&self.mem, hdr, slot)?;
            let body = slot.unchecked_add(abi::RECV_WQE_HDR as u64);
            for (k, sge) in wr.sges.iter().enumerate() {
                crate::gmem::write_obj(
                    &self.mem,
                    *sge,
                    body.unchecked_add(k as u64 * abi::SGE_SIZE as u64),
                )?;
            }
            prod = prod.wrapping_add(1);
        }
        crate::gmem::store(
            &self.mem,
            prod,
            qp.rq.header_gpa(abi::RING_PROD_OFFSET),
            Ordering::Release,
        )?;
        qp.rq_prod = prod;
        qp.rq_free -= wrs.len() as u32;
        if qp.state() == abi::QPS_ERR {
            self.doorbell(abi::DB_SQ_BITMAP_OFFSET, abi::handle_index(qp.qpn))?;
        }
        Ok(())
    }

    /// Room for `n` more WQEs in a ring whose cached free count is `cached`: the count to keep
    /// (before the `n` are subtracted), reading the consumer index (`read_free`) only when the
    /// cached count does not suffice.
    #[inline]
    fn reserve(
        ring: &Ring,
        cached: u32,
        n: usize,
        queue: &'static str,
        read_free: impl FnOnce() -> Result<u32>,
    ) -> Result<u32> {
        if n as u64 <= cached as u64 && cached <= ring.depth {
            return Ok(cached);
        }
        let free = read_free()?;
        if n as u64 > free as u64 {
            return Err(Error::QueueFull {
                queue,
                needed: n.min(u32::MAX as usize) as u32,
                free,
            });
        }
        Ok(free)
    }

    /// Free slots of an SQ/RQ: depth − (prod − header.cons). A consumer index that is ahead of
    /// the producer (a device bug) leaves no free slot.
    #[inline]
    fn ring_free(&self, ring: &Ring, prod: u32) -> Result<u32> {
        let cons: u32 = crate::gmem::load(
            &self.mem,
            ring.header_gpa(abi::RING_CONS_OFFSET),
            Ordering::Acquire,
        )?;
        Ok(ring.depth.saturating_sub(prod.wrapping_sub(cons)))
    }

    // -----------------------------------------------------------------------------------------
    // Completions
    // -----------------------------------------------------------------------------------------

    /// Polls up to `out.len()` CQEs; returns how many were written to `out`.
    ///
    /// A slot is valid when its owner byte equals `cqe_owner(cons, depth)` (acquire load); the
    /// CQE is then read, `cons` advances, and the new `cons` is release-stored to `header.cons`
    /// once at the end so the device can reuse the slots.
    ///
    /// An error or flush completion tells the driver that its QP is in ERR ([`Qp::state`]); the
    /// first time, the driver rings that QP's SQ doorbell (ABI §9.3).
    pub fn poll_cq(&self, cq: &mut Cq, out: &mut [Cqe]) -> usize {
        if !cq.ring.alive() {
            return 0;
        }
        let mut n = 0;
        let mut err_qpn = None;
        while n < out.len() {
            // The slot in one slice: owner byte (acquire), then the CQE.
            let Ok(s) =
                crate::gmem::slice(&self.mem, cq.ring.slot_gpa(cq.cons), abi::CQE_SIZE as usize)
            else {
                break;
            };
            let owner: u8 = match s.load(abi::CQE_OWNER_OFFSET as usize, Ordering::Acquire) {
                Ok(o) => o,
                Err(_) => break,
            };
            if owner != abi::cqe_owner(cq.cons, cq.ring.depth) {
                break;
            }
            match s.read_obj::<Cqe>(0) {
                Ok(c) => out[n] = c,
                Err(_) => break,
            }
            if out[n].status != abi::WC_SUCCESS && err_qpn != Some(out[n].qpn) {
                err_qpn = Some(out[n].qpn);
                self.learn_qp_error(out[n].qpn);
            }
            cq.cons = cq.cons.wrapping_add(1);
            n += 1;
        }
        if n > 0 {
            // Cannot fail: the header page was just read through the same mapping.
            let _ = crate::gmem::store(
                &self.mem,
                cq.cons,
                cq.ring.header_gpa(abi::RING_CONS_OFFSET),
                Ordering::Release,
            );
        }
        n
    }

    /// Polls until `count` CQEs arrived or `timeout` passed; returns those polled (maybe
    /// fewer). Convenience for tests; allocates.
    pub fn poll_cq_until(&self, cq: &mut Cq, count: usize, timeout: Duration) -> Vec<Cqe> {
        let deadline = Instant::now() + timeout;
        let mut out = vec![Cqe::default(); count];
        let mut n = 0;
        while n < count {
            let got = self.poll_cq(cq, &mut out[n..]);
            n += got;
            if got == 0 {
                if Instant::now() >= deadline {
                    break;
                }
                std::thread::yield_now();
            }
        }
        out.truncate(n);
        out
    }

    /// Arms the CQ: store `header.arm_cons` = cons, then release-store `header.arm` =
    /// `(seq << 2) | CQ_ARM_NEXT` (or `CQ_ARM_SOLICITED`) with a new sequence number, then set the
    /// CQ's bit in the CQ-arm bitmap and ring the doorbell. One [`abi::EV_CQ_COMP`] event follows
    /// per arm — at once if a matching CQE already exists at or after `cons`.
    pub fn req_notify_cq(&self, cq: &mut Cq, solicited_only: bool) -> Result<()> {
        if !cq.ring.alive() {
            return Err(Error::InvalidArgument("CQ destroyed"));
        }
        // The control block in one slice.
        let hdr = crate::gmem::slice(
            &self.mem,
            cq.ring.header_gpa(0),
            std::mem::size_of::<abi::RingHeader>(),
        )?;
        hdr.store(
            cq.cons,
            abi::RING_ARM_CONS_OFFSET as usize,
            Ordering::Relaxed,
        )?;
        cq.arm_seq = cq.arm_seq.wrapping_add(1);
        let flag = if solicited_only {
            abi::CQ_ARM_SOLICITED
        } else {
            abi::CQ_ARM_NEXT
        };
        // Release: arm_cons is visible before the new arm value.
        hdr.store(
            (cq.arm_seq << 2) | flag,
            abi::RING_ARM_OFFSET as usize,
            Ordering::Release,
        )?;
        self.note_wake_lines(cq);
        self.doorbell(self.db.cq_bitmap, abi::handle_index(cq.cqn))
    }

    /// Records where the interrupt that this arm asks for will first be read (see
    /// [`Driver::wake_lines`]): the notify summary and word (with `VRDMA_F_CQ_NOTIFY`) and the
    /// CQE the next poll reads.
    fn note_wake_lines(&self, cq: &Cq) {
        let host = |gpa: vm_memory::GuestAddress| vrdma_memory::host_address(&self.mem, gpa.0);
        let mut lines = [0usize; 3];
        if self.features() & abi::VRDMA_F_CQ_NOTIFY != 0 {
            let word = abi::handle_index(cq.cqn) as u64 / 64 * 8;
            lines[0] = host(self.db.gpa.unchecked_add(abi::DB_CQ_NOTIFY_SUMMARY_OFFSET));
            lines[1] = host(self.db.gpa.unchecked_add(self.db.cq_notify_bitmap + word));
        }
        lines[2] = host(cq.ring.slot_gpa(cq.cons));
        for (cell, v) in self.wake_lines.iter().zip(lines) {
            if cell.load(Ordering::Relaxed) != v {
                cell.store(v, Ordering::Relaxed);
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Doorbell
    // -----------------------------------------------------------------------------------------

    /// Sets bit `index` of the bitmap at `bitmap_offset` of the doorbell area with an atomic OR,
    /// without notifying; returns whether the bit was already set. Fails if the bit lies outside
    /// the doorbell area.
    pub fn set_doorbell_bit(&self, bitmap_offset: u64, index: u32) -> Result<bool> {
        let (area, off) = self.doorbell_slice(bitmap_offset, index)?;
        Self::set_bit_in(&area, bitmap_offset, off, index)
    }

    /// The doorbell area from its start (the header and the summaries) to the bitmap word of
    /// bit `index` of the bitmap at `bitmap_offset`, in one slice, and that word's offset.
    #[inline]
    fn doorbell_slice(
        &self,
        bitmap_offset: u64,
        index: u32,
    ) -> Result<(crate::gmem::GuestSlice<'_>, u64)> {
        let off = bitmap_offset
            .checked_add(index as u64 / 64 * 8)
            .filter(|o| o.checked_add(8).is_some_and(|e| e <= self.db.len))
            .ok_or(Error::InvalidArgument(
                "doorbell bit outside the doorbell area",
            ))?;
        Ok((
            crate::gmem::slice(&self.mem, self.db.gpa, (off + 8) as usize)?,
            off,
        ))
    }

    /// [`Driver::set_doorbell_bit`] in the slice of [`Driver::doorbell_slice`].
    #[inline]
    fn set_bit_in(
        area: &crate::gmem::GuestSlice<'_>,
        bitmap_offset: u64,
        off: u64,
        index: u32,
    ) -> Result<bool> {
        let word = area.get_atomic_ref::<AtomicU64>(off as usize)?;
        let bit = 1u64 << (index % 64);
        let old = word.fetch_or(bit, Ordering::SeqCst);
        // Keep the dirty log honest (a real guest's write would be logged by the hypervisor).
        area.bitmap().mark_dirty(off as usize, 8);
        if old & bit != 0 {
            return Ok(true);
        }
        // Then the summary bit of that word (ABI §8.2): word bit first, summary second.
        let summary = if bitmap_offset == abi::DB_SQ_BITMAP_OFFSET {
            abi::DB_SQ_SUMMARY_OFFSET
        } else {
            abi::DB_CQ_SUMMARY_OFFSET
        };
        let sword = area.get_atomic_ref::<AtomicU64>(summary as usize)?;
        sword.fetch_or(abi::db_summary_bit(index as u64 / 64), Ordering::SeqCst);
        area.bitmap().mark_dirty(summary as usize, 8);
        Ok(false)
    }

    /// Rings the doorbell for bit `index` of the bitmap at `bitmap_offset` (ABI §8.2): atomic
    /// OR; if the bit was already set, an earlier doorbell that the device has not consumed yet
    /// covers this one and nothing more is needed; otherwise full fence, read `device_flags`,
    /// and notify queue 1 unless `DB_DEVICE_POLLING` is set (and `VRDMA_F_DB_SUPPRESSION` was
    /// negotiated).
    #[inline]
    pub(crate) fn doorbell(&self, bitmap_offset: u64, index: u32) -> Result<()> {
        // The bit, its summary and `device_flags` through one slice.
        let (area, off) = self.doorbell_slice(bitmap_offset, index)?;
        if Self::set_bit_in(&area, bitmap_offset, off, index)? {
            self.stats.coalesced.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        self.kick_in(&area)
    }

    /// Full fence, read `device_flags`, notify queue 1 unless the device is polling.
    fn kick_unless_polling(&self) -> Result<()> {
        let area = crate::gmem::slice(&self.mem, self.db.gpa, 4)?;
        self.kick_in(&area)
    }

    /// [`Driver::kick_unless_polling`] with `device_flags` read through `area` (the doorbell
    /// area from its start).
    #[inline]
    fn kick_in(&self, area: &crate::gmem::GuestSlice<'_>) -> Result<()> {
        fence(Ordering::SeqCst);
        let flags: u32 = area.load(0, Ordering::SeqCst)?;
        let polling = flags & abi::DB_DEVICE_POLLING != 0
            && self.features() & abi::VRDMA_F_DB_SUPPRESSION != 0;
        if polling {
            self.stats.suppressed.fetch_add(1, Ordering::Relaxed);
        } else {
            // Counted after the notification: the count is a locked instruction, and the
            // notification (in this process, the device's whole post) is what the peer waits
            // for.
            self.notify_queue(abi::EVENTQ);
            self.stats.kicks.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Rings the SQ doorbell for any QP index (the QP bit = `handle_index(qpn)`): sets the bit
    /// and notifies unless the device is polling — even if the bit was already set.
    pub fn ring_sq_doorbell(&self, index: u32) -> Result<()> {
        self.set_doorbell_bit(abi::DB_SQ_BITMAP_OFFSET, index)?;
        self.kick_unless_polling()
    }

    /// Rings the CQ-arm doorbell for any CQ index (the CQ bit = `handle_index(cqn)`), like
    /// [`Driver::ring_sq_doorbell`].
    pub fn ring_cq_doorbell(&self, index: u32) -> Result<()> {
        self.set_doorbell_bit(self.db.cq_bitmap, index)?;
        self.kick_unless_polling()
    }

    /// Byte offset of the CQ-arm bitmap in the doorbell area.
    pub fn cq_bitmap_offset(&self) -> u64 {
        self.db.cq_bitmap
    }

    /// Byte offset of the CQ-notify bitmap in the doorbell area (device-written, used only with
    /// `VRDMA_F_CQ_NOTIFY`).
    pub fn cq_notify_bitmap_offset(&self) -> u64 {
        self.db.cq_notify_bitmap
    }

    /// `DoorbellHeader::device_flags`.
    pub fn device_flags(&self) -> Result<u32> {
        Ok(crate::gmem::load(
            &self.mem,
            self.db.gpa,
            Ordering::Acquire,
        )?)
    }

    // -----------------------------------------------------------------------------------------
    // Raw ring access (hostile-guest tests)
    // -----------------------------------------------------------------------------------------

    /// Writes arbitrary bytes at the start of SQ slot `index & (depth - 1)`.
    pub fn write_sq_slot(&self, qp: &Qp, index: u32, bytes: &[u8]) -> Result<()> {
        write_slot(self, &qp.sq, index, bytes)
    }

    /// Writes arbitrary bytes at the start of RQ slot `index & (depth - 1)`.
    pub fn write_rq_slot(&self, qp: &Qp, index: u32, bytes: &[u8]) -> Result<()> {
        write_slot(self, &qp.rq, index, bytes)
    }

    /// Release-stores any value as the SQ producer index (the driver adopts it as its own).
    /// Does not ring the doorbell.
    pub fn set_sq_prod(&self, qp: &mut Qp, prod: u32) -> Result<()> {
        self.write_ring_u32(&qp.sq, abi::RING_PROD_OFFSET, prod)?;
        qp.sq_prod = prod;
        qp.sq_free = 0;
        Ok(())
    }

    /// Release-stores any value as the RQ producer index (the driver adopts it as its own).
    pub fn set_rq_prod(&self, qp: &mut Qp, prod: u32) -> Result<()> {
        self.write_ring_u32(&qp.rq, abi::RING_PROD_OFFSET, prod)?;
        qp.rq_prod = prod;
        qp.rq_free = 0;
        Ok(())
    }

    /// Release-stores a u32 at byte `offset` of a ring's control block.
    pub fn write_ring_u32(&self, ring: &Ring, offset: u64, value: u32) -> Result<()> {
        if !ring.alive() || offset + 4 > ring.stride as u64 {
            return Err(Error::InvalidArgument(
                "offset outside the ring's control block",
            ));
        }
        Ok(crate::gmem::store(
            &self.mem,
            value,
            ring.header_gpa(offset),
            Ordering::Release,
        )?)
    }

    /// Acquire-loads a u32 at byte `offset` of a ring's control block.
    pub fn read_ring_u32(&self, ring: &Ring, offset: u64) -> Result<u32> {
        if !ring.alive() || offset + 4 > ring.stride as u64 {
            return Err(Error::InvalidArgument(
                "offset outside the ring's control block",
            ));
        }
        Ok(crate::gmem::load(
            &self.mem,
            ring.header_gpa(offset),
            Ordering::Acquire,
        )?)
    }

    /// The device's SQ consumer index.
    pub fn sq_cons(&self, qp: &Qp) -> Result<u32> {
        self.read_ring_u32(&qp.sq, abi::RING_CONS_OFFSET)
    }

    /// The device's RQ consumer index.
    pub fn rq_cons(&self, qp: &Qp) -> Result<u32> {
        self.read_ring_u32(&qp.rq, abi::RING_CONS_OFFSET)
    }

    /// The device's CQ producer index.
    pub fn cq_prod(&self, cq: &Cq) -> Result<u32> {
        self.read_ring_u32(&cq.ring, abi::RING_PROD_OFFSET)
    }

    /// Doorbell statistics.
    pub fn stats(&self) -> DriverStats {
        DriverStats {
            doorbell_kicks: self.stats.kicks.load(Ordering::Relaxed),
            doorbell_suppressed: self.stats.suppressed.load(Ordering::Relaxed),
            doorbell_coalesced: self.stats.coalesced.load(Ordering::Relaxed),
        }
    }
}

fn write_slot(d: &Driver, ring: &Ring, index: u32, bytes: &[u8]) -> Result<()> {
    if !ring.alive() || bytes.len() > ring.stride as usize {
        return Err(Error::InvalidArgument("slot write larger than the stride"));
    }
    Ok(crate::gmem::write_slice(
        &d.mem,
        bytes,
        ring.slot_gpa(index),
    )?)
}

/// Doorbell counters, for benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DriverStats {
    /// Doorbells that notified queue 1.
    pub doorbell_kicks: u64,
    /// Doorbells whose notification was suppressed because the device was polling.
    pub doorbell_suppressed: u64,
    /// Doorbells that found their bit still set (an unconsumed earlier doorbell covers them).
    pub doorbell_coalesced: u64,
}

/// Counters behind [`DriverStats`].
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) kicks: AtomicU64,
    pub(crate) suppressed: AtomicU64,
    pub(crate) coalesced: AtomicU64,
}
