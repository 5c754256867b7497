//! Hostile-guest regression tests.
//!
//! One or more tests per QEMU pvrdma CVE class (prior art §1, ABI §18), plus property tests that
//! throw random control commands and random WQEs at the device. Every test asserts the device's
//! concrete answer (status code, error CQE, event) *and* that the device still works afterwards
//! (a normal command or an RDMA WRITE between two guests succeeds).
//!
//! Multi-case tests collect mismatches in [`Checks`] and report them all at the end, so one
//! device bug does not hide the others.

use std::cell::RefCell;
use std::fmt::Debug;
use std::mem::size_of;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config as PtConfig, TestRunner};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress};
use vrdma_abi as abi;
use vrdma_abi::{Cqe, Event, RecvWqe, SendWqe, Sge, ACCESS_ALL};
use vrdma_device::soft::SoftFabric;
use vrdma_device::{DeviceConfig, GuestMemoryMmap};
use vrdma_glue::MmioTransport;
use vrdma_guest::mmio as reg;
use vrdma_guest::{
    ah_attr_for, pattern, status_name, Buffer, Cq, Driver, Gid, GuestAlloc, Layout, Mr, Pd, Qp,
    QpInitAttr, RcParams, RecvWr, SendWr,
};
use vrdma_tests::{Vm, ALLOC_BASE, GUEST_RAM};

const RC: u8 = abi::QPT_RC;
const UD: u8 = abi::QPT_UD;
const WAIT: Duration = Duration::from_secs(5);
/// Events are produced while the doorbell or command that causes them runs; this is plenty.
const EV_WAIT: Duration = Duration::from_secs(1);
const QKEY: u32 = 0x1111;
/// Size of each side's data buffer (one MR over all of it).
const BUF_LEN: u64 = 64 << 10;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Soft assertions: every mismatch is recorded, the test fails at [`Checks::finish`].
#[derive(Default)]
struct Checks(Vec<String>);

impl Checks {
    fn eq<T: PartialEq + Debug>(&mut self, what: impl std::fmt::Display, got: T, want: T) {
        if got != want {
            self.0.push(format!("{what}: got {got:?}, want {want:?}"));
        }
    }

    /// A status check with readable names.
    fn st(&mut self, what: impl std::fmt::Display, got: u32, want: u32) {
        if got != want {
            self.0.push(format!(
                "{what}: got {} ({}), want {} ({})",
                got,
                status_name(got),
                want,
                status_name(want)
            ));
        }
    }

    fn ok(&mut self, what: impl std::fmt::Display, cond: bool) {
        if !cond {
            self.0.push(format!("{what}: failed"));
        }
    }

    fn finish(self) {
        assert!(
            self.0.is_empty(),
            "{} mismatch(es):\n  {}",
            self.0.len(),
            self.0.join("\n  ")
        );
    }
}

fn driver(vm: &Vm) -> Driver {
    Driver::probe(
        vm.port(),
        vm.mem.clone(),
        GuestAlloc::new(GuestAddress(ALLOC_BASE), 200 << 20),
    )
    .expect("probe")
}

fn small_cfg(id: u32) -> DeviceConfig {
    DeviceConfig {
        max_qp: 4,
        max_cq: 4,
        max_pd: 4,
        max_ah: 4,
        max_mr: 8,
        max_total_mr_pages: 64,
        max_mr_pages: 32,
        max_mr_size: 256 << 10,
        max_total_ring_pages: 64,
        ..DeviceConfig::with_gid(DeviceConfig::gid_for_id(id))
    }
}

/// One guest's verbs objects.
struct Side {
    d: Driver,
    pd: Pd,
    buf: Buffer,
    mr: Mr,
    cq: Cq,
    qp: Qp,
    gid: Gid,
    qp_type: u8,
}

fn side_from(d: Driver, qp_type: u8) -> Side {
    let pd = d.alloc_pd().unwrap();
    let buf = d.alloc_buffer(BUF_LEN, Layout::Discontiguous).unwrap();
    let mr = d.reg_mr(pd, &buf, ACCESS_ALL).unwrap();
    let cq = d.create_cq(512).unwrap();
    let qp = d.create_qp(pd, &qp_attr(qp_type, &cq)).unwrap();
    let gid = d.gid().unwrap();
    Side {
        d,
        pd,
        buf,
        mr,
        cq,
        qp,
        gid,
        qp_type,
    }
}

fn side(vm: &Vm, qp_type: u8) -> Side {
    side_from(driver(vm), qp_type)
}

fn qp_attr(qp_type: u8, cq: &Cq) -> QpInitAttr {
    QpInitAttr {
        qp_type,
        ..QpInitAttr::rc(cq)
    }
}

/// RC parameters with short timers (16 ms ACK timeout, 3 retries), so that error paths (retries,
/// RNR) finish fast, yet a loaded machine does not exhaust the retries of healthy traffic.
fn fast(d: &Driver, remote_qpn: u32, remote_gid: Gid) -> RcParams {
    RcParams {
        timeout: 12,
        retry_cnt: 3,
        rnr_retry: 2,
        min_rnr_timer: 1,
        ..d.rc_params(remote_qpn, remote_gid)
    }
}

fn connect(a: &Side, b: &Side) {
    if a.qp_type == RC {
        a.d.connect_rc_with(&a.qp, &fast(&a.d, b.qp.qpn(), b.gid))
            .unwrap();
        b.d.connect_rc_with(&b.qp, &fast(&b.d, a.qp.qpn(), a.gid))
            .unwrap();
    } else {
        a.d.connect_ud(&a.qp, QKEY).unwrap();
        b.d.connect_ud(&b.qp, QKEY).unwrap();
    }
}

/// Two guests on one fabric, each with a PD, a 64 KiB MR (all access), a CQ and a connected QP.
fn pair(qp_type: u8) -> (Arc<SoftFabric>, Side, Side) {
    pair_with(qp_type, None)
}

fn pair_with(qp_type: u8, cfg: Option<fn(u32) -> DeviceConfig>) -> (Arc<SoftFabric>, Side, Side) {
    let fabric = SoftFabric::new();
    let vm = |id| match cfg {
        Some(f) => Vm::with_config(&fabric, f(id)),
        None => Vm::new(&fabric, id),
    };
    let (va, vb) = (vm(1), vm(2));
    let a = side(&va, qp_type);
    let b = side(&vb, qp_type);
    connect(&a, &b);
    (fabric, a, b)
}

/// Replaces both QPs by fresh, connected ones (the old ones are destroyed if still alive).
fn new_qps(a: &mut Side, b: &mut Side) {
    for s in [&mut *a, &mut *b] {
        if !s.qp.is_destroyed() {
            s.d.destroy_qp(&mut s.qp).unwrap();
        }
        drain(&s.d, &mut s.cq);
        s.qp = s.d.create_qp(s.pd, &qp_attr(s.qp_type, &s.cq)).unwrap();
    }
    connect(a, b);
}

/// Polls until the CQ stays empty for a moment.
fn drain(d: &Driver, cq: &mut Cq) -> Vec<Cqe> {
    let mut all = Vec::new();
    let mut quiet = Instant::now();
    let mut buf = [Cqe::default(); 32];
    while quiet.elapsed() < Duration::from_millis(5) {
        let n = d.poll_cq(cq, &mut buf);
        if n > 0 {
            all.extend_from_slice(&buf[..n]);
            quiet = Instant::now();
        }
    }
    all
}

fn wait_cqes(d: &Driver, cq: &mut Cq, n: usize) -> Vec<Cqe> {
    d.poll_cq_until(cq, n, WAIT)
}

fn wait1(d: &Driver, cq: &mut Cq) -> Cqe {
    let v = wait_cqes(d, cq, 1);
    assert_eq!(v.len(), 1, "no completion within {WAIT:?}");
    v[0]
}

/// Waits for an event matching `pred`; events that do not match are skipped.
fn wait_ev(d: &Driver, pred: impl Fn(&Event) -> bool) -> Option<Event> {
    let deadline = Instant::now() + EV_WAIT;
    while let Some(e) = d.wait_event(deadline.saturating_duration_since(Instant::now())) {
        if pred(&e) {
            return Some(e);
        }
    }
    None
}

fn fatal_of(d: &Driver, qpn: u32) -> Option<u64> {
    wait_ev(d, |e| e.kind == abi::EV_QP_FATAL && e.handle == qpn).map(|e| e.detail)
}

/// A signaled RDMA WRITE of 4 KiB from `a` into `b`'s MR succeeds and lands.
fn write_ok(a: &mut Side, b: &Side, seed: u64) {
    drain(&a.d, &mut a.cq);
    let data = pattern(seed, 4096);
    a.buf.write(0, &data);
    a.d.post_send(
        &mut a.qp,
        &[SendWr::write(
            0xfeed,
            &[a.mr.sge(0, 4096)],
            b.mr.addr(BUF_LEN - 4096),
            b.mr.rkey,
        )],
    )
    .unwrap();
    let c = wait1(&a.d, &mut a.cq);
    assert_eq!(
        (c.wr_id, c.status, c.opcode),
        (0xfeed, abi::WC_SUCCESS, abi::WC_OP_RDMA_WRITE),
        "RDMA WRITE after the hostile part: {c:?}"
    );
    assert_eq!(b.buf.read_vec(BUF_LEN - 4096, 4096), data);
}

/// The device still works: QUERY_DEVICE answers the config on both sides, and fresh QPs carry an
/// RDMA WRITE.
fn still_works(a: &mut Side, b: &mut Side) {
    assert_eq!(a.d.query_device().unwrap(), *a.d.config());
    assert_eq!(b.d.query_device().unwrap(), *b.d.config());
    if a.qp_type != RC {
        return;
    }
    new_qps(a, b);
    write_ok(a, b, 0x5eed);
}

/// `n` zeroed 4 KiB pages from the driver's allocator.
fn zpages(d: &Driver, n: usize) -> Vec<u64> {
    let pages = d
        .with_alloc(|a| a.alloc_pages(n, Layout::Any))
        .expect("pages");
    for &p in &pages {
        d.mem().write_slice(&[0u8; 4096], GuestAddress(p)).unwrap();
    }
    pages
}

fn status(d: &Driver, cmd: u32, req: &[u8], pages: &[u64], resp_len: usize) -> u32 {
    d.ctrl(cmd, req, pages, resp_len)
        .expect("control command")
        .0
}

fn handle_cmd(d: &Driver, cmd: u32, handle: u32) -> u32 {
    let c = abi::CmdHandle {
        handle,
        reserved: 0,
    };
    let resp = if cmd == abi::CMD_QUERY_QP {
        size_of::<abi::QpAttr>()
    } else {
        0
    };
    status(d, cmd, c.as_slice(), &[], resp)
}

fn create_cq_raw(d: &Driver, depth: u32, npages: u32, pages: &[u64]) -> (u32, u32) {
    let c = abi::CmdCreateCq { depth, npages };
    let (st, resp) = d
        .ctrl(abi::CMD_CREATE_CQ, c.as_slice(), pages, 8)
        .expect("control command");
    let h = if st == abi::STATUS_OK {
        u32::from_le_bytes(resp[..4].try_into().unwrap())
    } else {
        0
    };
    (st, h)
}

fn qp_cmd(pd: u32, cq: u32) -> abi::CmdCreateQp {
    abi::CmdCreateQp {
        pd,
        send_cq: cq,
        recv_cq: cq,
        qp_type: RC,
        sq_sig_all: 0,
        reserved: 0,
        sq_depth: 16,
        sq_stride: 64,
        sq_npages: 1,
        rq_depth: 16,
        rq_stride: 64,
        rq_npages: 1,
    }
}

fn create_qp_raw(d: &Driver, c: &abi::CmdCreateQp, pages: &[u64]) -> (u32, u32) {
    let (st, resp) = d
        .ctrl(abi::CMD_CREATE_QP, c.as_slice(), pages, 16)
        .expect("control command");
    let h = if st == abi::STATUS_OK {
        u32::from_le_bytes(resp[..4].try_into().unwrap())
    } else {
        0
    };
    (st, h)
}

#[allow(clippy::too_many_arguments)]
fn reg_mr_raw(
    d: &Driver,
    pd: u32,
    access: u32,
    iova: u64,
    length: u64,
    page_shift: u32,
    npages: u32,
    pages: &[u64],
) -> (u32, u32) {
    let c = abi::CmdRegMr {
        pd,
        access,
        iova,
        length,
        page_shift,
        npages,
    };
    let (st, resp) = d
        .ctrl(abi::CMD_REG_MR, c.as_slice(), pages, 8)
        .expect("control command");
    let h = if st == abi::STATUS_OK {
        u32::from_le_bytes(resp[..4].try_into().unwrap())
    } else {
        0
    };
    (st, h)
}

/// A send WQE slot image: header, then SGEs, cut or padded to `stride`.
fn send_slot(w: SendWqe, sges: &[Sge], stride: u32) -> Vec<u8> {
    let mut v = w.as_slice().to_vec();
    for s in sges {
        v.extend_from_slice(s.as_slice());
    }
    v.resize(stride as usize, 0);
    v
}

/// A receive WQE slot image.
fn recv_slot(wr_id: u64, num_sge: u32, sges: &[Sge], stride: u32) -> Vec<u8> {
    let w = RecvWqe {
        wr_id,
        num_sge,
        reserved: 0,
    };
    let mut v = w.as_slice().to_vec();
    for s in sges {
        v.extend_from_slice(s.as_slice());
    }
    v.resize(stride as usize, 0);
    v
}

/// Fills the SGE area of a slot with valid SGEs into `mr` (so that a device that read past
/// `max_*_sge` would find plausible entries and transfer data).
fn filler_sges(mr: &Mr, stride: u32, hdr: u32) -> Vec<Sge> {
    (0..(stride - hdr) / abi::SGE_SIZE)
        .map(|k| mr.sge(k as u64 * 64, 64))
        .collect()
}

fn sq_index(qp: &Qp) -> u32 {
    abi::handle_index(qp.qpn())
}

// ---------------------------------------------------------------------------------------------
// A raw virtio driver: bring-up step by step and hand-made descriptor chains, for what the
// guest driver (rightly) never does: commands before SET_DOORBELL_AREA, notifications before
// DRIVER_OK, descriptor loops.
// ---------------------------------------------------------------------------------------------

const VQ_NEXT: u16 = 1;
const VQ_WRITE: u16 = 2;
const RAW_QSIZE: u16 = 16;
/// Raw driver memory (below the guest driver's allocator).
const RAW_QUEUES: [u64; 2] = [0x1_0000, 0x1_4000];
const RAW_EVBUF: u64 = 0x1_8000;
const RAW_REQ: u64 = 0x2_0000;
const RAW_RESP: u64 = 0x4_0000;
const RAW_DB: u64 = 0x8_0000;
const RAW_RING: u64 = 0xc_0000;

#[derive(Clone, Copy, Debug)]
struct RawDesc {
    index: u16,
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

struct RawQ {
    base: u64,
    next_avail: u16,
    last_used: u16,
}

impl RawQ {
    fn desc(&self) -> u64 {
        self.base
    }
    fn avail(&self) -> u64 {
        self.base + 0x1000
    }
    fn used(&self) -> u64 {
        self.base + 0x2000
    }
}

struct RawDev {
    t: Arc<MmioTransport>,
    mem: Arc<GuestMemoryMmap>,
    q: [RawQ; 2],
}

impl RawDev {
    fn r32(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w32(&self, off: u64, v: u32) {
        self.t.write(off, &v.to_le_bytes());
    }

    /// Reset, ACKNOWLEDGE, DRIVER, features (VERSION_1 + all offered), FEATURES_OK, both queues
    /// set up and ready. Not DRIVER_OK.
    fn new(vm: &Vm) -> RawDev {
        let d = RawDev {
            t: vm.transport.clone(),
            mem: vm.mem.clone(),
            q: RAW_QUEUES.map(|base| RawQ {
                base,
                next_avail: 0,
                last_used: 0,
            }),
        };
        d.w32(reg::STATUS, 0);
        assert_eq!(d.r32(reg::STATUS), 0);
        d.w32(reg::STATUS, reg::STATUS_ACKNOWLEDGE);
        d.w32(reg::STATUS, reg::STATUS_ACKNOWLEDGE | reg::STATUS_DRIVER);
        for sel in 0..2 {
            d.w32(reg::DEVICE_FEATURES_SEL, sel);
            let f = d.r32(reg::DEVICE_FEATURES);
            d.w32(reg::DRIVER_FEATURES_SEL, sel);
            d.w32(reg::DRIVER_FEATURES, f);
        }
        let st = reg::STATUS_ACKNOWLEDGE | reg::STATUS_DRIVER | reg::STATUS_FEATURES_OK;
        d.w32(reg::STATUS, st);
        assert_eq!(d.r32(reg::STATUS), st, "FEATURES_OK refused");
        for (i, q) in d.q.iter().enumerate() {
            d.mem
                .write_slice(&[0u8; 0x3000], GuestAddress(q.base))
                .unwrap();
            d.w32(reg::QUEUE_SEL, i as u32);
            d.w32(reg::QUEUE_NUM, RAW_QSIZE as u32);
            for (lo, addr) in [
                (reg::QUEUE_DESC_LOW, q.desc()),
                (reg::QUEUE_DRIVER_LOW, q.avail()),
                (reg::QUEUE_DEVICE_LOW, q.used()),
            ] {
                d.w32(lo, addr as u32);
                d.w32(lo + 4, (addr >> 32) as u32);
            }
            d.w32(reg::QUEUE_READY, 1);
        }
        d
    }

    fn driver_ok(&mut self) {
        let st = self.r32(reg::STATUS) | reg::STATUS_DRIVER_OK;
        self.w32(reg::STATUS, st);
        assert_eq!(
            self.r32(reg::STATUS) & reg::STATUS_DEVICE_NEEDS_RESET,
            0,
            "activation failed"
        );
        // Event buffers: RAW_QSIZE one-descriptor chains.
        for i in 0..RAW_QSIZE {
            let d = RawDesc {
                index: i,
                addr: RAW_EVBUF + i as u64 * 16,
                len: 16,
                flags: VQ_WRITE,
                next: 0,
            };
            self.push(1, &[d], i);
        }
        self.notify(1);
    }

    /// Writes the descriptors and publishes `head` in the available ring (no notification).
    fn push(&mut self, qi: usize, descs: &[RawDesc], head: u16) {
        let q = &mut self.q[qi];
        for d in descs {
            let at = q.desc() + d.index as u64 * 16;
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&d.addr.to_le_bytes());
            b[8..12].copy_from_slice(&d.len.to_le_bytes());
            b[12..14].copy_from_slice(&d.flags.to_le_bytes());
            b[14..16].copy_from_slice(&d.next.to_le_bytes());
            // Descriptor indices outside the table are written nowhere (the device must cope).
            if d.index < RAW_QSIZE {
                self.mem.write_slice(&b, GuestAddress(at)).unwrap();
            }
        }
        let slot = q.avail() + 4 + 2 * (q.next_avail % RAW_QSIZE) as u64;
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        q.next_avail = q.next_avail.wrapping_add(1);
        let idx = q.next_avail;
        self.set_avail_idx(qi, idx);
    }

    fn set_avail_idx(&self, qi: usize, idx: u16) {
        let q = &self.q[qi];
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem
            .write_obj(idx, GuestAddress(q.avail() + 2))
            .unwrap();
    }

    fn notify(&self, qi: u32) {
        self.w32(reg::QUEUE_NOTIFY, qi);
    }

    fn used_idx(&self, qi: usize) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.q[qi].used() + 2))
            .unwrap()
    }

    /// The next used entry, waiting up to `timeout`.
    fn pop_used(&mut self, qi: usize, timeout: Duration) -> Option<(u32, u32)> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.used_idx(qi) != self.q[qi].last_used {
                let q = &mut self.q[qi];
                let at = q.used() + 4 + 8 * (q.last_used % RAW_QSIZE) as u64;
                let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
                let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
                q.last_used = q.last_used.wrapping_add(1);
                return Some((id, len));
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::yield_now();
        }
    }

    /// One command: `CtrlHdr` + `req` + `pages` readable, `8 + resp_len` writable. Returns the
    /// status and the response bytes.
    fn ctrl(&mut self, cmd: u32, req: &[u8], pages: &[u64], resp_len: usize) -> (u32, Vec<u8>) {
        let mut r = abi::CtrlHdr { cmd, flags: 0 }.as_slice().to_vec();
        r.extend_from_slice(req);
        for p in pages {
            r.extend_from_slice(&p.to_le_bytes());
        }
        self.mem.write_slice(&r, GuestAddress(RAW_REQ)).unwrap();
        let wlen = 8 + resp_len;
        self.mem
            .write_slice(&vec![0xeeu8; wlen], GuestAddress(RAW_RESP))
            .unwrap();
        let descs = [
            RawDesc {
                index: 0,
                addr: RAW_REQ,
                len: r.len() as u32,
                flags: VQ_NEXT,
                next: 1,
            },
            RawDesc {
                index: 1,
                addr: RAW_RESP,
                len: wlen as u32,
                flags: VQ_WRITE,
                next: 0,
            },
        ];
        self.push(0, &descs, 0);
        self.notify(0);
        let (id, len) = self.pop_used(0, WAIT).expect("control command completion");
        assert_eq!(id, 0);
        assert!(len >= 8, "used length {len}");
        let mut out = vec![0u8; len as usize];
        self.mem
            .read_slice(&mut out, GuestAddress(RAW_RESP))
            .unwrap();
        let st = u32::from_le_bytes(out[..4].try_into().unwrap());
        (st, out[8..].to_vec())
    }

    fn query_ok(&mut self) -> bool {
        let n = size_of::<abi::VrdmaConfig>();
        let (st, body) = self.ctrl(abi::CMD_QUERY_DEVICE, &[], &[], n);
        st == abi::STATUS_OK
            && body.len() == n
            && body.as_slice() == self.t.device().config().config_space().as_slice()
    }
}

// ---------------------------------------------------------------------------------------------
// CVE-2018-20124: WQE num_sge larger than the SGE array / the QP's max_*_sge
// ---------------------------------------------------------------------------------------------

#[test]
fn cve_2018_20124_send_num_sge_beyond_max_send_sge() {
    let (_f, mut a, mut b) = pair(RC);
    a.buf.fill_pattern(1);
    let max = a.qp.caps().max_send_sge;
    let stride = a.qp.sq().stride();
    assert!(max >= 1 && max <= (stride - abi::SEND_WQE_HDR) / abi::SGE_SIZE);

    // Positive control: exactly max_send_sge SGEs work.
    let sges: Vec<Sge> = (0..max as u64).map(|k| a.mr.sge(k * 100, 100)).collect();
    a.d.post_send(
        &mut a.qp,
        &[SendWr::write(1, &sges, b.mr.addr(32 << 10), b.mr.rkey)],
    )
    .unwrap();
    assert_eq!(wait1(&a.d, &mut a.cq).status, abi::WC_SUCCESS);
    assert_eq!(
        b.buf.read_vec(32 << 10, 100 * max as usize),
        a.buf.read_vec(0, 100 * max as usize)
    );

    for (i, bad) in [max + 1, 2 * max + 3, 255, u16::MAX as u32]
        .into_iter()
        .enumerate()
    {
        let wr_id = 0x100 + i as u64;
        let w = SendWqe {
            wr_id,
            opcode: abi::WR_RDMA_WRITE,
            flags: abi::SEND_F_SIGNALED,
            num_sge: bad as u16,
            remote_addr: b.mr.addr(0),
            rkey: b.mr.rkey,
            ..Default::default()
        };
        let ok = SendWqe {
            wr_id: wr_id + 0x1000,
            num_sge: 1,
            ..w
        };
        let p = a.qp.sq_prod();
        let filler = filler_sges(&a.mr, stride, abi::SEND_WQE_HDR);
        a.d.write_sq_slot(&a.qp, p, &send_slot(w, &filler, stride))
            .unwrap();
        a.d.write_sq_slot(&a.qp, p + 1, &send_slot(ok, &filler, stride))
            .unwrap();
        a.d.set_sq_prod(&mut a.qp, p + 2).unwrap();
        a.d.ring_sq_doorbell(sq_index(&a.qp)).unwrap();
        let v = wait_cqes(&a.d, &mut a.cq, 2);
        assert_eq!(v.len(), 2, "num_sge {bad}: completions {v:?}");
        assert_eq!(
            (
                v[0].wr_id,
                v[0].status,
                v[0].vendor_err,
                v[0].opcode,
                v[0].qpn
            ),
            (
                wr_id,
                abi::WC_LOC_QP_OP_ERR,
                abi::VENDOR_ERR_BAD_WQE,
                abi::WC_OP_RDMA_WRITE,
                a.qp.qpn()
            ),
            "num_sge {bad}"
        );
        assert_eq!(
            (v[1].wr_id, v[1].status),
            (wr_id + 0x1000, abi::WC_WR_FLUSH_ERR),
            "WR behind the malformed one is flushed"
        );
        assert_eq!(
            fatal_of(&a.d, a.qp.qpn()),
            Some(abi::VENDOR_ERR_BAD_WQE as u64)
        );
        assert_eq!(a.d.qp_state(&a.qp).unwrap(), abi::QPS_ERR);
        // Later WRs are flushed too.
        a.d.post_send(
            &mut a.qp,
            &[SendWr::write(7, &[a.mr.sge(0, 8)], b.mr.addr(0), b.mr.rkey)],
        )
        .unwrap();
        let c = wait1(&a.d, &mut a.cq);
        assert_eq!((c.wr_id, c.status), (7, abi::WC_WR_FLUSH_ERR));
        // Nothing reached the peer.
        assert!(b.buf.read_vec(0, 4096).iter().all(|&x| x == 0));
        new_qps(&mut a, &mut b);
    }
    still_works(&mut a, &mut b);
}

/// Posts a raw receive WQE with `num_sge` on `b` (plus a valid one behind it), sends to it from
/// `a`, and returns b's completions.
fn bad_recv_round(a: &mut Side, b: &mut Side, wr_id: u64, num_sge: u32) -> Vec<Cqe> {
    let stride = b.qp.rq().stride();
    let filler = filler_sges(&b.mr, stride, abi::RECV_WQE_HDR);
    let p = b.qp.rq_prod();
    b.d.write_rq_slot(&b.qp, p, &recv_slot(wr_id, num_sge, &filler, stride))
        .unwrap();
    b.d.write_rq_slot(&b.qp, p + 1, &recv_slot(wr_id + 0x1000, 1, &filler, stride))
        .unwrap();
    b.d.set_rq_prod(&mut b.qp, p + 2).unwrap();
    let payload = [0xabu8; 64];
    let wr = if a.qp_type == RC {
        SendWr::send_inline(wr_id + 0x2000, &payload)
    } else {
        let ah = a.d.create_ah(a.pd, &ah_attr_for(b.gid)).unwrap();
        SendWr::ud_send(wr_id + 0x2000, &[], ah, b.qp.qpn(), QKEY).with_inline(&payload)
    };
    a.d.post_send(&mut a.qp, &[wr]).unwrap();
    b.d.poll_cq_until(&mut b.cq, 2, EV_WAIT)
}

#[test]
fn cve_2018_20124_recv_num_sge_beyond_max_recv_sge_rc() {
    let (_f, mut a, mut b) = pair(RC);
    let max = b.qp.caps().max_recv_sge;
    for (i, bad) in [max + 1, 0xffff, u32::MAX].into_iter().enumerate() {
        let wr_id = 0x200 + i as u64;
        let v = bad_recv_round(&mut a, &mut b, wr_id, bad);
        assert_eq!(v.len(), 2, "num_sge {bad}: {v:?}");
        assert_eq!(
            (v[0].wr_id, v[0].status, v[0].vendor_err, v[0].opcode),
            (
                wr_id,
                abi::WC_LOC_QP_OP_ERR,
                abi::VENDOR_ERR_BAD_WQE,
                abi::WC_OP_RECV
            ),
            "num_sge {bad}"
        );
        assert_eq!(
            (v[1].wr_id, v[1].status, v[1].opcode),
            (wr_id + 0x1000, abi::WC_WR_FLUSH_ERR, abi::WC_OP_RECV)
        );
        assert_eq!(
            fatal_of(&b.d, b.qp.qpn()),
            Some(abi::VENDOR_ERR_BAD_WQE as u64)
        );
        assert_eq!(b.d.qp_state(&b.qp).unwrap(), abi::QPS_ERR);
        // The requester learns that the responder failed (§14: WC_REM_OP_ERR).
        let c = wait1(&a.d, &mut a.cq);
        assert_eq!((c.wr_id, c.status), (wr_id + 0x2000, abi::WC_REM_OP_ERR));
        assert_eq!(a.d.qp_state(&a.qp).unwrap(), abi::QPS_ERR);
        // Later receives are flushed.
        b.d.post_recv(&mut b.qp, &[RecvWr::new(9, &[b.mr.sge(0, 64)])])
            .unwrap();
        let c = wait1(&b.d, &mut b.cq);
        assert_eq!((c.wr_id, c.status), (9, abi::WC_WR_FLUSH_ERR));
        assert!(
            b.buf.to_vec().iter().all(|&x| x == 0),
            "no data may land through a malformed receive WQE"
        );
        new_qps(&mut a, &mut b);
    }
    still_works(&mut a, &mut b);
}

#[test]
fn cve_2018_20124_recv_num_sge_beyond_max_recv_sge_ud() {
    let (_f, mut a, mut b) = pair(UD);
    let max = b.qp.caps().max_recv_sge;
    let mut ck = Checks::default();
    for (i, bad) in [max + 1, u32::MAX].into_iter().enumerate() {
        let wr_id = 0x300 + i as u64;
        let v = bad_recv_round(&mut a, &mut b, wr_id, bad);
        // The sender's datagram completes (unreliable).
        let c = wait1(&a.d, &mut a.cq);
        ck.eq(
            format!("UD sender, num_sge {bad}"),
            (c.wr_id, c.status),
            (wr_id + 0x2000, abi::WC_SUCCESS),
        );
        ck.eq(
            format!("UD malformed receive num_sge {bad}: first CQE"),
            v.first()
                .map(|c| (c.wr_id, c.status, c.vendor_err, c.opcode)),
            Some((
                wr_id,
                abi::WC_LOC_QP_OP_ERR,
                abi::VENDOR_ERR_BAD_WQE,
                abi::WC_OP_RECV,
            )),
        );
        // §10.6 / §14: a malformed receive WQE moves the QP to ERR (also for UD), with
        // EV_QP_FATAL(BAD_WQE), and later WQEs are flushed.
        ck.eq(
            format!("UD malformed receive num_sge {bad}: QP state"),
            b.d.qp_state(&b.qp).unwrap(),
            abi::QPS_ERR,
        );
        ck.eq(
            format!("UD malformed receive num_sge {bad}: second CQE (flush)"),
            v.get(1).map(|c| (c.wr_id, c.status)),
            Some((wr_id + 0x1000, abi::WC_WR_FLUSH_ERR)),
        );
        ck.eq(
            format!("UD malformed receive num_sge {bad}: EV_QP_FATAL"),
            fatal_of(&b.d, b.qp.qpn()),
            Some(abi::VENDOR_ERR_BAD_WQE as u64),
        );
        ck.ok(
            "no data lands through a malformed UD receive WQE",
            b.buf.read_vec(0, 4096).iter().all(|&x| x == 0),
        );
        new_qps(&mut a, &mut b);
    }
    still_works(&mut a, &mut b);
    ck.finish();
}

// ---------------------------------------------------------------------------------------------
// CVE-2018-20125: ring sizes unchecked → NULL deref / huge allocation
// ---------------------------------------------------------------------------------------------

#[test]
fn cve_2018_20125_ring_sizes_are_checked_without_allocating() {
    let (_f, mut a, mut b) = pair(RC);
    let d = &a.d;
    let cfg = *d.config();
    let mut ck = Checks::default();
    let t0 = Instant::now();
    let pg = zpages(d, 4);
    let (inv, len) = (abi::STATUS_INVALID, abi::STATUS_BAD_LENGTH);

    // CREATE_CQ.
    for (depth, npages, list, want) in [
        (0, 1, &pg[..1], inv),
        (3, 1, &pg[..1], inv),
        (100, 2, &pg[..2], inv),
        (cfg.max_cqe * 2, 1, &pg[..1], inv),
        (0x8000_0000, 1, &pg[..1], inv),
        (u32::MAX, 1, &pg[..1], inv),
        (64, u32::MAX, &[][..], inv),
        (64, cfg.max_ring_pages + 1, &[][..], inv),
        (64, cfg.max_ring_pages, &[][..], len),
        (64, 1, &pg[..1], inv), // needs 2 pages
        (64, 0, &[][..], inv),
        (64, 2, &pg[..1], len),
    ] {
        let (st, _) = create_cq_raw(d, depth, npages, list);
        ck.st(
            format!(
                "CREATE_CQ depth {depth:#x} npages {npages:#x} list {}",
                list.len()
            ),
            st,
            want,
        );
    }

    // CREATE_QP.
    let cq = a.cq.cqn();
    let base = qp_cmd(a.pd.0, cq);
    let two = &pg[..2];
    let mut cases: Vec<(String, abi::CmdCreateQp, &[u64], u32)> = Vec::new();
    for v in [0, 3, 100, cfg.max_qp_wr * 2, 0x8000_0000, u32::MAX] {
        cases.push((
            format!("sq_depth {v:#x}"),
            abi::CmdCreateQp {
                sq_depth: v,
                ..base
            },
            two,
            inv,
        ));
        cases.push((
            format!("rq_depth {v:#x}"),
            abi::CmdCreateQp {
                rq_depth: v,
                ..base
            },
            two,
            inv,
        ));
    }
    for v in [0, 1, 16, 32, 63, 65, 96, 8192, 0x8000_0000, u32::MAX] {
        cases.push((
            format!("sq_stride {v:#x}"),
            abi::CmdCreateQp {
                sq_stride: v,
                ..base
            },
            two,
            inv,
        ));
        cases.push((
            format!("rq_stride {v:#x}"),
            abi::CmdCreateQp {
                rq_stride: v,
                ..base
            },
            two,
            inv,
        ));
    }
    for (name, c, want) in [
        (
            "sq_npages u32::MAX, no list",
            abi::CmdCreateQp {
                sq_npages: u32::MAX,
                ..base
            },
            inv,
        ),
        (
            "rq_npages u32::MAX, no list",
            abi::CmdCreateQp {
                rq_npages: u32::MAX,
                ..base
            },
            inv,
        ),
        (
            "sq_npages max_ring_pages + 1, no list",
            abi::CmdCreateQp {
                sq_npages: cfg.max_ring_pages + 1,
                ..base
            },
            inv,
        ),
        (
            "sq_npages max_ring_pages, no list",
            abi::CmdCreateQp {
                sq_npages: cfg.max_ring_pages,
                ..base
            },
            len,
        ),
        (
            "rq_npages max_ring_pages, short list",
            abi::CmdCreateQp {
                rq_npages: cfg.max_ring_pages,
                ..base
            },
            len,
        ),
        (
            "sq_npages 0",
            abi::CmdCreateQp {
                sq_npages: 0,
                ..base
            },
            inv,
        ),
        (
            "sq ring too small for depth",
            abi::CmdCreateQp {
                sq_depth: 128,
                ..base
            },
            inv,
        ),
        ("qp_type 0", abi::CmdCreateQp { qp_type: 0, ..base }, inv),
        ("qp_type 3", abi::CmdCreateQp { qp_type: 3, ..base }, inv),
        (
            "qp_type 255",
            abi::CmdCreateQp {
                qp_type: 255,
                ..base
            },
            inv,
        ),
        (
            "reserved 1",
            abi::CmdCreateQp {
                reserved: 1,
                ..base
            },
            inv,
        ),
    ] {
        cases.push((name.to_string(), c, two, want));
    }
    for (name, c, list, want) in &cases {
        let (st, _) = create_qp_raw(d, c, list);
        ck.st(format!("CREATE_QP {name}"), st, *want);
    }
    // Reading a 16 GiB page list or allocating a 2^31-slot ring would take far longer.
    let took = t0.elapsed();
    ck.ok(
        format!("bounded time for all ring-size cases (took {took:?})"),
        took < Duration::from_secs(3),
    );
    // Positive control: the same base request is valid.
    let (st, qpn) = create_qp_raw(d, &base, two);
    ck.st("CREATE_QP base request", st, abi::STATUS_OK);
    ck.st(
        "DESTROY_QP base request",
        handle_cmd(d, abi::CMD_DESTROY_QP, qpn),
        abi::STATUS_OK,
    );
    drain(&a.d, &mut a.cq);
    still_works(&mut a, &mut b);
    ck.finish();
}

// ---------------------------------------------------------------------------------------------
// CVE-2018-20123 / CVE-2018-20126: leaks on create error paths
// ---------------------------------------------------------------------------------------------

fn st_of<T: Debug>(r: vrdma_guest::Result<T>) -> Option<u32> {
    match r {
        Ok(_) => Some(abi::STATUS_OK),
        Err(e) => e.status(),
    }
}

#[test]
fn cve_2018_20123_20126_failed_creates_consume_nothing() {
    let fabric = SoftFabric::new();
    let vm = Vm::with_config(&fabric, small_cfg(1));
    let d = driver(&vm);
    let cfg = *d.config();
    let pd = d.alloc_pd().unwrap();
    let cq0 = d.create_cq(16).unwrap();
    let good = zpages(&d, 32);
    let bad_pages = [good[0] + 8, GUEST_RAM, GUEST_RAM + 0x1000, !0xfff_u64];
    let base = qp_cmd(pd.0, cq0.cqn());
    for round in 0..200usize {
        let bad = bad_pages[round % bad_pages.len()];
        let (st, _) = create_cq_raw(&d, 64, 2, &[good[0], bad]);
        assert_eq!(st, abi::STATUS_BAD_ADDRESS, "CREATE_CQ, bad page {bad:#x}");
        let (st, _) = create_qp_raw(&d, &base, &[good[1], bad]);
        assert_eq!(
            st,
            abi::STATUS_BAD_ADDRESS,
            "CREATE_QP, bad RQ page {bad:#x}"
        );
        let (st, _) = create_qp_raw(&d, &base, &[bad, good[1]]);
        assert_eq!(
            st,
            abi::STATUS_BAD_ADDRESS,
            "CREATE_QP, bad SQ page {bad:#x}"
        );
        let c = abi::CmdCreateQp {
            rq_stride: 32,
            ..base
        };
        let (st, _) = create_qp_raw(&d, &c, &good[..2]);
        assert_eq!(st, abi::STATUS_INVALID);
        let c = abi::CmdCreateQp {
            recv_cq: cq0.cqn() ^ 0x80,
            ..base
        };
        let (st, _) = create_qp_raw(&d, &c, &good[..2]);
        assert_eq!(st, abi::STATUS_BAD_HANDLE);
        let mut list = good[..16].to_vec();
        list[15] = bad;
        let (st, _) = reg_mr_raw(&d, pd.0, 1, 0x1_0000, 16 << 12, 12, 16, &list);
        assert_eq!(
            st,
            abi::STATUS_BAD_ADDRESS,
            "REG_MR, bad last page {bad:#x}"
        );
        let (st, _) = reg_mr_raw(&d, pd.0 ^ 0x40, 1, 0, 16 << 12, 12, 16, &good[..16]);
        assert_eq!(st, abi::STATUS_BAD_HANDLE);
        let attr = abi::AhAttr {
            port_num: 2,
            ..ah_attr_for(d.gid().unwrap())
        };
        assert_eq!(st_of(d.create_ah(pd, &attr)), Some(abi::STATUS_INVALID));
    }
    // Every slot and every MR page is still available.
    let mut pds = vec![pd];
    for _ in 1..cfg.max_pd {
        pds.push(d.alloc_pd().expect("PD slot leaked by a failed command"));
    }
    assert_eq!(st_of(d.alloc_pd()), Some(abi::STATUS_NO_RESOURCE));
    let mut cqs = vec![cq0];
    for _ in 1..cfg.max_cq {
        cqs.push(d.create_cq(16).expect("CQ slot leaked by a failed command"));
    }
    assert_eq!(st_of(d.create_cq(16)), Some(abi::STATUS_NO_RESOURCE));
    let mut qps = Vec::new();
    for _ in 0..cfg.max_qp {
        qps.push(
            d.create_qp(pd, &QpInitAttr::rc(&cqs[0]))
                .expect("QP slot leaked by a failed command"),
        );
    }
    assert_eq!(
        st_of(d.create_qp(pd, &QpInitAttr::rc(&cqs[0]))),
        Some(abi::STATUS_NO_RESOURCE)
    );
    let per_mr = (cfg.max_total_mr_pages / cfg.max_mr as u64) as usize;
    let mut mrs = Vec::new();
    for _ in 0..cfg.max_mr {
        let buf = d
            .alloc_buffer(per_mr as u64 * 4096, Layout::Discontiguous)
            .unwrap();
        mrs.push((
            d.reg_mr(pd, &buf, ACCESS_ALL)
                .expect("MR slot or MR pages leaked by a failed command"),
            buf,
        ));
    }
    let one = d.alloc_buffer(4096, Layout::Any).unwrap();
    assert_eq!(
        st_of(d.reg_mr(pd, &one, ACCESS_ALL)),
        Some(abi::STATUS_NO_RESOURCE)
    );
    let mut ahs = Vec::new();
    for _ in 0..cfg.max_ah {
        ahs.push(
            d.create_ah(pd, &ah_attr_for(d.gid().unwrap()))
                .expect("AH slot leaked"),
        );
    }

    // The full device still carries traffic: QP 0 to a peer.
    let vb = Vm::new(&fabric, 2);
    let b = side(&vb, RC);
    d.connect_rc_with(&qps[0], &fast(&d, b.qp.qpn(), b.gid))
        .unwrap();
    b.d.connect_rc_with(&b.qp, &fast(&b.d, qps[0].qpn(), d.gid().unwrap()))
        .unwrap();
    let (mr, buf) = &mrs[0];
    buf.fill_pattern(77);
    d.post_send(
        &mut qps[0],
        &[SendWr::write(5, &[mr.sge_all()], b.mr.iova, b.mr.rkey)],
    )
    .unwrap();
    let c = wait1(&d, &mut cqs[0]);
    assert_eq!((c.wr_id, c.status), (5, abi::WC_SUCCESS));
    assert_eq!(b.buf.read_vec(0, buf.len() as usize), buf.to_vec());
}

// ---------------------------------------------------------------------------------------------
// Resource limits
// ---------------------------------------------------------------------------------------------

#[test]
fn resource_limits_answer_no_resource_and_freeing_makes_room() {
    let fabric = SoftFabric::new();
    let vm = Vm::with_config(&fabric, small_cfg(1));
    let d = driver(&vm);
    let cfg = *d.config();
    let nr = Some(abi::STATUS_NO_RESOURCE);
    let inv = Some(abi::STATUS_INVALID);

    // PDs.
    let mut pds: Vec<Pd> = (0..cfg.max_pd).map(|_| d.alloc_pd().unwrap()).collect();
    assert_eq!(st_of(d.alloc_pd()), nr);
    d.dealloc_pd(pds.pop().unwrap()).unwrap();
    pds.push(d.alloc_pd().expect("a freed PD slot is reusable"));
    assert_eq!(st_of(d.alloc_pd()), nr);
    let pd = pds[0];

    // MRs: the table.
    let pages = d.alloc_buffer(64 * 4096, Layout::Contiguous).unwrap();
    let mut mrs: Vec<Mr> = (0..cfg.max_mr as u64)
        .map(|i| {
            d.reg_mr_range(pd, &pages, i * 4096, 4096, ACCESS_ALL)
                .unwrap()
        })
        .collect();
    assert_eq!(
        st_of(d.reg_mr_range(pd, &pages, 0, 4096, ACCESS_ALL)),
        nr,
        "max_mr"
    );
    d.dereg_mr(mrs.pop().unwrap()).unwrap();
    mrs.push(d.reg_mr_range(pd, &pages, 0, 4096, ACCESS_ALL).unwrap());
    for m in mrs.drain(..) {
        d.dereg_mr(m).unwrap();
    }
    // MRs: the total page budget (64 pages, at most 32 per MR).
    let half = cfg.max_mr_pages as u64 * 4096;
    assert_eq!(cfg.max_total_mr_pages, 2 * cfg.max_mr_pages as u64);
    let m1 = d.reg_mr_range(pd, &pages, 0, half, ACCESS_ALL).unwrap();
    let m2 = d.reg_mr_range(pd, &pages, half, half, ACCESS_ALL).unwrap();
    assert_eq!(
        st_of(d.reg_mr_range(pd, &pages, 0, 4096, ACCESS_ALL)),
        nr,
        "max_total_mr_pages"
    );
    d.dereg_mr(m2).unwrap();
    let m3 = d
        .reg_mr_range(pd, &pages, 0, 4096, ACCESS_ALL)
        .expect("budget returned by DEREG_MR");
    d.dereg_mr(m3).unwrap();
    d.dereg_mr(m1).unwrap();
    // Per-object bounds are STATUS_INVALID.
    assert_eq!(
        st_of(d.reg_mr_range(pd, &pages, 0, half + 4096, ACCESS_ALL)),
        inv,
        "npages > max_mr_pages"
    );
    let big = d
        .alloc_buffer(cfg.max_mr_size + 4096, Layout::Contiguous)
        .unwrap();
    assert_eq!(
        st_of(d.reg_mr_range(pd, &big, 0, cfg.max_mr_size + 1, ACCESS_ALL)),
        inv,
        "length > max_mr_size"
    );

    // CQs.
    let mut cqs: Vec<Cq> = (0..cfg.max_cq).map(|_| d.create_cq(16).unwrap()).collect();
    assert_eq!(st_of(d.create_cq(16)), nr);
    let mut last = cqs.pop().unwrap();
    d.destroy_cq(&mut last).unwrap();
    cqs.push(d.create_cq(16).expect("a freed CQ slot is reusable"));
    assert_eq!(st_of(d.create_cq(16)), nr);
    assert_eq!(st_of(d.create_cq(cfg.max_cqe * 2)), inv, "depth > max_cqe");

    // QPs.
    let mut qps: Vec<Qp> = (0..cfg.max_qp)
        .map(|_| d.create_qp(pd, &QpInitAttr::rc(&cqs[0])).unwrap())
        .collect();
    assert_eq!(st_of(d.create_qp(pd, &QpInitAttr::rc(&cqs[0]))), nr);
    let mut last = qps.pop().unwrap();
    d.destroy_qp(&mut last).unwrap();
    qps.push(
        d.create_qp(pd, &QpInitAttr::rc(&cqs[1]))
            .expect("a freed QP slot is reusable"),
    );
    assert_eq!(st_of(d.create_qp(pd, &QpInitAttr::rc(&cqs[0]))), nr);
    let too_deep = QpInitAttr {
        max_send_wr: cfg.max_qp_wr * 2,
        ..QpInitAttr::rc(&cqs[0])
    };
    d.destroy_qp(&mut qps.pop().unwrap()).unwrap();
    assert_eq!(st_of(d.create_qp(pd, &too_deep)), inv, "depth > max_qp_wr");

    // AHs.
    let attr = ah_attr_for(d.gid().unwrap());
    let mut ahs: Vec<_> = (0..cfg.max_ah)
        .map(|_| d.create_ah(pd, &attr).unwrap())
        .collect();
    assert_eq!(st_of(d.create_ah(pd, &attr)), nr);
    d.destroy_ah(ahs.pop().unwrap()).unwrap();
    ahs.push(d.create_ah(pd, &attr).expect("a freed AH slot is reusable"));

    // A PD still referenced is busy, and the device still answers.
    assert_eq!(st_of(d.dealloc_pd(pd)), Some(abi::STATUS_BUSY));
    assert_eq!(d.query_device().unwrap(), cfg);
}

// ---------------------------------------------------------------------------------------------
// CVE-2018-20191: register read with no handler
// ---------------------------------------------------------------------------------------------

#[test]
fn cve_2018_20191_every_mmio_offset_and_width() {
    let fabric = SoftFabric::new();
    let va = Vm::new(&fabric, 1);
    let vb = Vm::new(&fabric, 2);
    let t = va.transport.clone();
    let cfg_bytes = va.device.config().config_space().as_slice().to_vec();
    {
        // A live device with objects, so that resets and notifications have work to do.
        let s = side(&va, RC);
        let _ =
            s.d.post_recv_unchecked(&mut { s.qp }, &[RecvWr::new(1, &[s.mr.sge(0, 64)])]);
        let widths = [0usize, 1, 2, 3, 4, 5, 8, 16];
        for off in 0..0x1000u64 {
            for &w in &widths {
                let mut b = vec![0xa5u8; w];
                t.read(off, &mut b);
                if w == 1 && off >= reg::CONFIG {
                    let i = (off - reg::CONFIG) as usize;
                    let want = cfg_bytes.get(i).copied().unwrap_or(0);
                    assert_eq!(b[0], want, "config byte {i}");
                }
            }
        }
        for off in [0x1000, 0x1_0000, u64::MAX / 2, u64::MAX - 7, u64::MAX] {
            for &w in &widths {
                let mut b = vec![0xa5u8; w];
                t.read(off, &mut b);
                t.write(off, &b);
            }
        }
        // Writes of every width and a few values everywhere (this resets the device, notifies
        // queues with garbage indices and programs garbage queue addresses).
        for off in 0..0x1000u64 {
            for &w in &widths {
                for v in [0u64, 1, 0xffff_ffff_ffff_ffff, 0x8000_0000, 0x0000_0101] {
                    t.write(off, &v.to_le_bytes().repeat(2)[..w]);
                }
            }
        }
    }
    // Identity registers still read right, and a fresh bring-up works end to end.
    let r32 = |off| {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    };
    assert_eq!(r32(reg::MAGIC_VALUE), reg::MAGIC);
    assert_eq!(r32(reg::VERSION), 2);
    assert_eq!(r32(reg::DEVICE_ID), abi::VIRTIO_ID_RDMA);
    let mut a = side(&va, RC);
    let mut b = side(&vb, RC);
    connect(&a, &b);
    write_ok(&mut a, &b, 3);
    still_works(&mut a, &mut b);
}

// ---------------------------------------------------------------------------------------------
// CVE-2018-20216: ring walk error value mishandled → endless loop
// ---------------------------------------------------------------------------------------------

#[test]
fn cve_2018_20216_sq_overrun_is_fatal_and_bounded() {
    let (_f, mut a, mut b) = pair(RC);
    let depth = a.qp.caps().max_send_wr;
    for delta in [depth + 1, depth + 5, 0x8000_0000, u32::MAX] {
        let cons = a.d.sq_cons(&a.qp).unwrap();
        let prod = cons.wrapping_add(delta);
        let t0 = Instant::now();
        a.d.set_sq_prod(&mut a.qp, prod).unwrap();
        a.d.ring_sq_doorbell(sq_index(&a.qp)).unwrap();
        assert_eq!(
            fatal_of(&a.d, a.qp.qpn()),
            Some(abi::VENDOR_ERR_RING_OVERRUN as u64),
            "prod - cons = {delta:#x}"
        );
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        assert_eq!(a.d.qp_state(&a.qp).unwrap(), abi::QPS_ERR);
        // §9.6: `depth` slots are flushed, then the consumer index jumps to the producer index.
        let v = drain(&a.d, &mut a.cq);
        assert_eq!(v.len(), depth as usize, "flushes after an overrun");
        assert!(v.iter().all(|c| c.status == abi::WC_WR_FLUSH_ERR));
        assert_eq!(a.d.sq_cons(&a.qp).unwrap(), prod);
        new_qps(&mut a, &mut b);
    }
    // An overrun published while the QP waits in RTR is caught on the way to RTS.
    a.d.destroy_qp(&mut a.qp).unwrap();
    a.qp = a.d.create_qp(a.pd, &QpInitAttr::rc(&a.cq)).unwrap();
    let p = fast(&a.d, b.qp.qpn(), b.gid);
    for (attr, mask) in [p.init_attr(), p.rtr_attr()] {
        a.d.modify_qp(&a.qp, &attr, mask).unwrap();
    }
    a.d.set_sq_prod(&mut a.qp, 3 * depth).unwrap();
    a.d.ring_sq_doorbell(sq_index(&a.qp)).unwrap();
    let (attr, mask) = p.rts_attr();
    a.d.modify_qp(&a.qp, &attr, mask).unwrap();
    assert_eq!(
        fatal_of(&a.d, a.qp.qpn()),
        Some(abi::VENDOR_ERR_RING_OVERRUN as u64)
    );
    assert_eq!(a.d.qp_state(&a.qp).unwrap(), abi::QPS_ERR);
    still_works(&mut a, &mut b);
}

#[test]
fn cve_2018_20216_rq_overrun_is_fatal_and_bounded() {
    let (_f, mut a, mut b) = pair(RC);
    let depth = b.qp.caps().max_recv_wr;
    for delta in [depth + 1, 0x8000_0000, u32::MAX] {
        let cons = b.d.rq_cons(&b.qp).unwrap();
        let prod = cons.wrapping_add(delta);
        b.d.set_rq_prod(&mut b.qp, prod).unwrap();
        let t0 = Instant::now();
        a.d.post_send(&mut a.qp, &[SendWr::send_inline(1, b"overrun")])
            .unwrap();
        assert_eq!(
            fatal_of(&b.d, b.qp.qpn()),
            Some(abi::VENDOR_ERR_RING_OVERRUN as u64),
            "prod - cons = {delta:#x}"
        );
        assert!(t0.elapsed() < Duration::from_secs(2));
        assert_eq!(b.d.qp_state(&b.qp).unwrap(), abi::QPS_ERR);
        let v = drain(&b.d, &mut b.cq);
        assert_eq!(v.len(), depth as usize, "flushes after an RQ overrun");
        assert!(v
            .iter()
            .all(|c| c.status == abi::WC_WR_FLUSH_ERR && c.opcode == abi::WC_OP_RECV));
        assert_eq!(b.d.rq_cons(&b.qp).unwrap(), prod);
        let c = wait1(&a.d, &mut a.cq);
        assert_eq!((c.wr_id, c.status), (1, abi::WC_REM_OP_ERR));
        new_qps(&mut a, &mut b);
    }
    still_works(&mut a, &mut b);
}

#[test]
fn cve_2018_20216_ctrlq_descriptor_loops_do_not_hang() {
    let fabric = SoftFabric::new();
    let vm = Vm::new(&fabric, 1);
    let mut raw = RawDev::new(&vm);
    raw.driver_ok();
    assert!(raw.query_ok());
    let hdr = abi::CtrlHdr {
        cmd: abi::CMD_QUERY_DEVICE,
        flags: 0,
    };
    vm.mem
        .write_slice(hdr.as_slice(), GuestAddress(RAW_REQ))
        .unwrap();
    let d = |index, addr, len, flags, next| RawDesc {
        index,
        addr,
        len,
        flags,
        next,
    };
    let cases: Vec<(&str, Vec<RawDesc>, u16)> = vec![
        ("readable self-loop", vec![d(0, RAW_REQ, 8, VQ_NEXT, 0)], 0),
        (
            "writable self-loop",
            vec![d(0, RAW_RESP, 200, VQ_NEXT | VQ_WRITE, 0)],
            0,
        ),
        (
            "readable -> writable -> readable",
            vec![
                d(0, RAW_REQ, 8, VQ_NEXT, 1),
                d(1, RAW_RESP, 200, VQ_NEXT | VQ_WRITE, 0),
            ],
            0,
        ),
        (
            "three-descriptor cycle",
            vec![
                d(2, RAW_REQ, 8, VQ_NEXT, 3),
                d(3, RAW_RESP, 8, VQ_NEXT | VQ_WRITE, 4),
                d(4, RAW_RESP + 8, 192, VQ_NEXT | VQ_WRITE, 3),
            ],
            2,
        ),
        (
            "next out of the table",
            vec![d(0, RAW_REQ, 8, VQ_NEXT, 999)],
            0,
        ),
        ("head out of the table", vec![], 999),
        (
            "descriptor beyond guest memory",
            vec![
                d(0, GUEST_RAM - 4, 4096, VQ_NEXT, 1),
                d(1, RAW_RESP, 200, VQ_WRITE, 0),
            ],
            0,
        ),
        (
            "descriptor length wraps the address space",
            vec![
                d(0, u64::MAX - 3, u32::MAX, VQ_NEXT, 1),
                d(1, RAW_RESP, 200, VQ_WRITE, 0),
            ],
            0,
        ),
        (
            "writable descriptor covering the used ring",
            vec![
                d(0, RAW_REQ, 8, VQ_NEXT, 1),
                d(1, RAW_QUEUES[0] + 0x2000, 200, VQ_WRITE, 0),
            ],
            0,
        ),
    ];
    for (name, descs, head) in cases {
        let t0 = Instant::now();
        raw.push(0, &descs, head);
        raw.notify(0);
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "{name}: {:?}",
            t0.elapsed()
        );
        // Consume whatever the device returned (maybe nothing), then check it still answers.
        while raw.pop_used(0, Duration::from_millis(10)).is_some() {}
        raw.q[0].last_used = raw.used_idx(0);
        assert!(raw.query_ok(), "device answers after: {name}");
    }
    // An available index that jumps past the queue size: no hang; the device recovers once
    // the driver publishes a sane index again.
    let good = raw.q[0].next_avail;
    raw.set_avail_idx(0, good.wrapping_add(1000));
    let t0 = Instant::now();
    raw.notify(0);
    assert!(t0.elapsed() < Duration::from_secs(2));
    raw.set_avail_idx(0, good);
    assert!(raw.query_ok(), "device answers after an avail-index jump");
}

#[test]
fn ring_page_budget_answers_no_resource_and_freeing_makes_room() {
    let fabric = SoftFabric::new();
    let vm = Vm::with_config(&fabric, small_cfg(1));
    let d = driver(&vm);
    let cfg = *d.config();
    let budget = cfg.max_total_ring_pages;
    // A CQ of depth 1024 needs ceil(1025 * 64 / 4096) = 17 pages; three fit into 64, four not.
    let per = abi::ring_pages(1024, abi::CQE_SIZE);
    assert!(3 * per <= budget && 4 * per > budget);
    let mut cqs: Vec<Cq> = (0..3).map(|_| d.create_cq(1024).unwrap()).collect();
    assert_eq!(
        st_of(d.create_cq(1024)),
        Some(abi::STATUS_NO_RESOURCE),
        "max_total_ring_pages (CQ)"
    );
    // Extra pages in a list count too: a depth-1 CQ with the rest of the budget plus one.
    let left = (budget - 3 * per) as usize;
    let pages = zpages(&d, left + 1);
    let (st, _) = create_cq_raw(&d, 1, (left + 1) as u32, &pages);
    assert_eq!(st, abi::STATUS_NO_RESOURCE, "extra pages count");
    let (st, h) = create_cq_raw(&d, 1, left as u32, &pages[..left]);
    assert_eq!(st, abi::STATUS_OK, "exactly the budget");
    assert_eq!(handle_cmd(&d, abi::CMD_DESTROY_CQ, h), abi::STATUS_OK);
    // QPs draw from the same budget.
    let pd = d.alloc_pd().unwrap();
    let mut big = abi::CmdCreateQp {
        sq_npages: left as u32,
        ..qp_cmd(pd.0, cqs[0].cqn())
    };
    big.rq_npages = 1;
    let mut list = pages[..left].to_vec();
    list.push(pages[left]);
    let (st, _) = create_qp_raw(&d, &big, &list);
    assert_eq!(st, abi::STATUS_NO_RESOURCE, "max_total_ring_pages (QP)");
    // Freeing returns the pages.
    let mut c = cqs.pop().unwrap();
    d.destroy_cq(&mut c).unwrap();
    let (st, qpn) = create_qp_raw(&d, &big, &list);
    assert_eq!(st, abi::STATUS_OK, "budget returned by DESTROY_CQ");
    assert_eq!(handle_cmd(&d, abi::CMD_DESTROY_QP, qpn), abi::STATUS_OK);
    cqs.push(d.create_cq(1024).expect("budget returned by DESTROY_QP"));
    assert_eq!(d.query_device().unwrap(), cfg);
}

// ---------------------------------------------------------------------------------------------
// CVE-2021-3582: MR page mapping arithmetic
// ---------------------------------------------------------------------------------------------

/// name, pd, access, iova, length, page_shift, npages, pages, expected status
type RegMrCase = (&'static str, u32, u32, u64, u64, u32, u32, Vec<u64>, u32);

#[test]
fn cve_2021_3582_reg_mr_arithmetic_is_checked() {
    let (_f, mut a, mut b) = pair(RC);
    let d = &a.d;
    let cfg = *d.config();
    let pd = a.pd.0;
    let mut ck = Checks::default();
    let p = zpages(d, 4);
    let (inv, bad_addr, blen, bh) = (
        abi::STATUS_INVALID,
        abi::STATUS_BAD_ADDRESS,
        abi::STATUS_BAD_LENGTH,
        abi::STATUS_BAD_HANDLE,
    );
    let lw = abi::ACCESS_LOCAL_WRITE;
    let top = !0xfff_u64;
    #[rustfmt::skip]
    let cases: Vec<RegMrCase> = vec![
        // name, pd, access, iova, length, page_shift, npages, pages, expected
        ("iova + length overflows", pd, lw, u64::MAX - 100, 4096, 12, 2, vec![p[0], p[1]], inv),
        ("iova + length == 2^64", pd, lw, top, 4096, 12, 1, vec![p[0]], inv),
        ("iova u64::MAX, length 1", pd, lw, u64::MAX, 1, 12, 1, vec![p[0]], inv),
        ("length u64::MAX", pd, lw, 0, u64::MAX, 12, 1, vec![p[0]], inv),
        ("length 0", pd, lw, 0x1000, 0, 12, 0, vec![], inv),
        ("length 0, one page", pd, lw, 0x1000, 0, 12, 1, vec![p[0]], inv),
        ("length > max_mr_size", pd, lw, 0, cfg.max_mr_size + 1, 12, 1, vec![p[0]], inv),
        ("page_shift 0", pd, lw, 0, 4096, 0, 1, vec![p[0]], inv),
        ("page_shift 11", pd, lw, 0, 2048, 11, 1, vec![p[0]], inv),
        ("page_shift 31", pd, lw, 0, 4096, 31, 1, vec![0], inv),
        ("page_shift 63", pd, lw, 0, 4096, 63, 1, vec![0], inv),
        ("page_shift 64", pd, lw, 0, 4096, 64, 1, vec![0], inv),
        ("page_shift 200", pd, lw, 0, 4096, 200, 1, vec![0], inv),
        ("page_shift u32::MAX", pd, lw, 0, 4096, u32::MAX, 1, vec![0], inv),
        ("page misaligned", pd, lw, 0, 4096, 12, 1, vec![p[0] + 8], bad_addr),
        ("page misaligned for 2 MiB pages", pd, lw, 0, 4096, 21, 1, vec![p[0]], bad_addr),
        ("page outside guest memory", pd, lw, 0, 4096, 12, 1, vec![GUEST_RAM], bad_addr),
        ("page far outside guest memory", pd, lw, 0, 4096, 12, 1, vec![GUEST_RAM << 8], bad_addr),
        ("page at the top of the address space", pd, lw, 0, 4096, 12, 1, vec![top], bad_addr),
        ("second page outside", pd, lw, 0, 8192, 12, 2, vec![p[0], GUEST_RAM], bad_addr),
        ("1 GiB page straddles the end of memory", pd, lw, 0, 4096, 30, 1, vec![0], bad_addr),
        ("512 MiB page straddles the end of memory", pd, lw, 0, 4096, 29, 1, vec![0], bad_addr),
        ("npages too large", pd, lw, 0, 4096, 12, 2, vec![p[0], p[1]], inv),
        ("npages too small", pd, lw, 0x10, 8192, 12, 2, vec![p[0], p[1]], inv),
        ("npages 0", pd, lw, 0, 4096, 12, 0, vec![], inv),
        ("npages u32::MAX", pd, lw, 0, 4096, 12, u32::MAX, vec![], inv),
        ("npages > max_mr_pages", pd, lw, 0, 4096, 12, cfg.max_mr_pages + 1, vec![], inv),
        ("unaligned iova spans two pages", pd, lw, 0x1000_0064, 4096, 12, 1, vec![p[0]], inv),
        ("page list shorter than npages", pd, lw, 0, 8192, 12, 2, vec![p[0]], blen),
        ("page list missing", pd, lw, 0, 1 << 20, 12, 256, vec![], blen),
        ("unknown access bit", pd, 0x10, 0, 4096, 12, 1, vec![p[0]], inv),
        ("REMOTE_WRITE without LOCAL_WRITE", pd, abi::ACCESS_REMOTE_WRITE, 0, 4096, 12, 1, vec![p[0]], inv),
        ("REMOTE_ATOMIC without LOCAL_WRITE", pd, abi::ACCESS_REMOTE_ATOMIC, 0, 4096, 12, 1, vec![p[0]], inv),
        ("PD 0", 0, lw, 0, 4096, 12, 1, vec![p[0]], bh),
        ("PD u32::MAX", u32::MAX, lw, 0, 4096, 12, 1, vec![p[0]], bh),
        ("PD with a wrong key", pd ^ 0x7f, lw, 0, 4096, 12, 1, vec![p[0]], bh),
    ];
    let t0 = Instant::now();
    for (name, pd, access, iova, length, shift, npages, pages, want) in &cases {
        let (st, lkey) = reg_mr_raw(d, *pd, *access, *iova, *length, *shift, *npages, pages);
        ck.st(format!("REG_MR {name}"), st, *want);
        if st == abi::STATUS_OK {
            handle_cmd(d, abi::CMD_DEREG_MR, lkey);
        }
    }
    ck.ok("bounded time", t0.elapsed() < Duration::from_secs(3));
    // Positive controls: a 2 MiB page ending exactly at the end of guest memory, and the most
    // distant iova that still fits.
    let last2m = GUEST_RAM - (2 << 20);
    for (name, iova, len, shift, page) in [
        (
            "2 MiB page at the end of memory",
            0x20_0000,
            2 << 20,
            21,
            last2m,
        ),
        ("iova + length == u64::MAX", top - 1, 4096, 12, p[0]),
    ] {
        let npages = if name.starts_with("iova") { 2 } else { 1 };
        let pages = vec![page; npages];
        let (st, lkey) = reg_mr_raw(d, pd, lw, iova, len, shift, npages as u32, &pages);
        ck.st(format!("REG_MR {name}"), st, abi::STATUS_OK);
        if st == abi::STATUS_OK {
            ck.st(
                format!("DEREG_MR {name}"),
                handle_cmd(d, abi::CMD_DEREG_MR, lkey),
                abi::STATUS_OK,
            );
        }
    }

    // Bounds at access time. Local: an MR of 5000 bytes starting 100 bytes into a page.
    a.buf.fill_pattern(9);
    let (l_off, l_len) = (100u64, 5000u64);
    let lmr =
        a.d.reg_mr_range(a.pd, &a.buf, l_off, l_len, abi::ACCESS_LOCAL_WRITE)
            .unwrap();
    // Remote: an MR of 7000 bytes starting 300 bytes into b's buffer.
    let (r_off, r_len) = (300u64, 7000u64);
    let rmr =
        b.d.reg_mr_range(b.pd, &b.buf, r_off, r_len, ACCESS_ALL)
            .unwrap();
    let lsge = |addr: u64, len: u32| Sge {
        addr,
        length: len,
        lkey: lmr.lkey,
    };
    let end = lmr.iova + l_len;
    let rend = rmr.iova + r_len;
    // Good: last local byte → last remote byte.
    a.d.post_send(
        &mut a.qp,
        &[SendWr::write(1, &[lsge(end - 1, 1)], rend - 1, rmr.rkey)],
    )
    .unwrap();
    let c = wait1(&a.d, &mut a.cq);
    ck.eq("last byte of both MRs", c.status, abi::WC_SUCCESS);
    ck.eq(
        "last remote byte written",
        b.buf.read_vec(r_off + r_len - 1, 2),
        vec![a.buf.read_vec(l_off + l_len - 1, 1)[0], 0],
    );
    let local_bad: [(&str, Sge); 4] = [
        ("local SGE one past the end", lsge(end, 1)),
        ("local SGE crossing the end", lsge(end - 1, 2)),
        ("local SGE one before the start", lsge(lmr.iova - 1, 1)),
        ("local SGE at u64::MAX", lsge(u64::MAX, 2)),
    ];
    for (name, sge) in local_bad {
        a.d.post_send(&mut a.qp, &[SendWr::write(2, &[sge], rmr.iova, rmr.rkey)])
            .unwrap();
        let c = wait1(&a.d, &mut a.cq);
        ck.eq(
            name,
            (c.status, c.vendor_err),
            (abi::WC_LOC_PROT_ERR, abi::VENDOR_ERR_BAD_SGE),
        );
        new_qps(&mut a, &mut b);
    }
    let before = b.buf.to_vec();
    let remote_bad: [(&str, u8, u64, u32); 5] = [
        ("remote WRITE one past the end", abi::WR_RDMA_WRITE, rend, 1),
        (
            "remote WRITE crossing the end",
            abi::WR_RDMA_WRITE,
            rend - 1,
            2,
        ),
        (
            "remote WRITE before the start",
            abi::WR_RDMA_WRITE,
            rmr.iova - 1,
            1,
        ),
        ("remote WRITE at u64::MAX", abi::WR_RDMA_WRITE, u64::MAX, 2),
        ("remote READ one past the end", abi::WR_RDMA_READ, rend, 1),
    ];
    for (name, op, raddr, len) in remote_bad {
        let sge = [lsge(lmr.iova, len)];
        let wr = if op == abi::WR_RDMA_READ {
            SendWr::read(3, &sge, raddr, rmr.rkey)
        } else {
            SendWr::write(3, &sge, raddr, rmr.rkey)
        };
        a.d.post_send(&mut a.qp, &[wr]).unwrap();
        let c = wait1(&a.d, &mut a.cq);
        ck.eq(name, c.status, abi::WC_REM_ACCESS_ERR);
        new_qps(&mut a, &mut b);
    }
    ck.ok(
        "remote memory unchanged by refused accesses",
        b.buf.to_vec() == before,
    );
    still_works(&mut a, &mut b);
    ck.finish();
}

// ---------------------------------------------------------------------------------------------
// CVE-2021-3607: integer overflow in ring init
// ---------------------------------------------------------------------------------------------

#[test]
fn cve_2021_3607_ring_init_arithmetic_is_checked() {
    let (_f, mut a, mut b) = pair(RC);
    let d = &a.d;
    let cfg = *d.config();
    let mut ck = Checks::default();
    let pg = zpages(d, 2);
    let (inv, bad_addr) = (abi::STATUS_INVALID, abi::STATUS_BAD_ADDRESS);
    let top = !0xfff_u64;
    let base = qp_cmd(a.pd.0, a.cq.cqn());
    let maxlist = vec![pg[0]; cfg.max_ring_pages as usize];
    let t0 = Instant::now();
    // depth * stride beyond what max_ring_pages can hold, and products that overflow u32.
    for (name, c, list, want) in [
        (
            "sq: max depth x max stride",
            abi::CmdCreateQp {
                sq_depth: cfg.max_qp_wr,
                sq_stride: abi::MAX_STRIDE,
                sq_npages: cfg.max_ring_pages,
                ..base
            },
            [&maxlist[..], &pg[1..2]].concat(),
            inv,
        ),
        (
            "rq: max depth x max stride",
            abi::CmdCreateQp {
                rq_depth: cfg.max_qp_wr,
                rq_stride: abi::MAX_STRIDE,
                rq_npages: cfg.max_ring_pages,
                ..base
            },
            [&pg[..1], &maxlist[..]].concat(),
            inv,
        ),
        (
            "sq: 2^31 x 2^31",
            abi::CmdCreateQp {
                sq_depth: 1 << 31,
                sq_stride: 1 << 31,
                ..base
            },
            pg.clone(),
            inv,
        ),
        (
            "rq: 2^20 x 2^12 (product 2^32)",
            abi::CmdCreateQp {
                rq_depth: 1 << 20,
                rq_stride: 1 << 12,
                ..base
            },
            pg.clone(),
            inv,
        ),
        (
            "sq page at the top of the address space",
            base,
            vec![top, pg[1]],
            bad_addr,
        ),
        (
            "rq page at the top of the address space",
            base,
            vec![pg[0], top],
            bad_addr,
        ),
        ("sq page u64::MAX", base, vec![u64::MAX, pg[1]], bad_addr),
        (
            "rq page just below 2^64, misaligned",
            base,
            vec![pg[0], u64::MAX - 4094],
            bad_addr,
        ),
        (
            "sq page straddling the end of memory",
            base,
            vec![GUEST_RAM - 2048, pg[1]],
            bad_addr,
        ),
    ] {
        let (st, h) = create_qp_raw(d, &c, &list);
        ck.st(format!("CREATE_QP {name}"), st, want);
        if st == abi::STATUS_OK {
            handle_cmd(d, abi::CMD_DESTROY_QP, h);
        }
    }
    for (name, depth, npages, list, want) in [
        ("depth 2^30", 1 << 30, 1, vec![pg[0]], inv),
        ("depth 2^26 (2^32 bytes)", 1 << 26, 1, vec![pg[0]], inv),
        ("page at the top", 1, 1, vec![top], bad_addr),
        ("second page at the top", 64, 2, vec![pg[0], top], bad_addr),
        (
            "page u64::MAX - 4095",
            1,
            1,
            vec![u64::MAX - 4095],
            bad_addr,
        ),
    ] {
        let (st, h) = create_cq_raw(d, depth, npages, &list);
        ck.st(format!("CREATE_CQ {name}"), st, want);
        if st == abi::STATUS_OK {
            handle_cmd(d, abi::CMD_DESTROY_CQ, h);
        }
    }
    ck.ok("bounded time", t0.elapsed() < Duration::from_secs(3));
    // Positive control: the deepest legal CQ (max_cqe slots, 1025 distinct pages).
    let need = abi::ring_pages(cfg.max_cqe, abi::CQE_SIZE) as usize;
    let pages = zpages(d, need);
    let (st, h) = create_cq_raw(d, cfg.max_cqe, need as u32, &pages);
    ck.st("CREATE_CQ of max_cqe", st, abi::STATUS_OK);
    ck.st(
        "DESTROY_CQ of max_cqe",
        handle_cmd(d, abi::CMD_DESTROY_CQ, h),
        abi::STATUS_OK,
    );
    // The interrupt moderation "registers": out-of-range values are refused, extremes work.
    let im = |max_events: u32, usec: u32| {
        let c = abi::CmdIntrModeration { max_events, usec };
        status(d, abi::CMD_SET_INTR_MODERATION, c.as_slice(), &[], 0)
    };
    ck.st("moderation usec u32::MAX", im(1, u32::MAX), inv);
    ck.st(
        "moderation max_events u32::MAX",
        im(u32::MAX, 1),
        abi::STATUS_OK,
    );
    ck.st("moderation back to default", im(0, 0), abi::STATUS_OK);
    still_works(&mut a, &mut b);
    ck.finish();
}

// ---------------------------------------------------------------------------------------------
// CVE-2021-3608: uninitialised pointer on the ring-init error path
// ---------------------------------------------------------------------------------------------

#[test]
fn cve_2021_3608_failed_create_leaves_no_half_built_object() {
    let (_f, mut a, mut b) = pair(RC);
    let d = &a.d;
    let mut ck = Checks::default();
    let pg = zpages(d, 4);
    let base = qp_cmd(a.pd.0, a.cq.cqn());
    // A QP that lived and died, so that its index is the next one handed out.
    let (st, old) = create_qp_raw(d, &base, &pg[..2]);
    assert_eq!(st, abi::STATUS_OK);
    assert_eq!(handle_cmd(d, abi::CMD_DESTROY_QP, old), abi::STATUS_OK);
    let idx = abi::handle_index(old);
    let key = abi::handle_key(old);
    // Creates that fail late: after every handle was checked, on the last ring page.
    for bad in [pg[3] + 1, GUEST_RAM, !0xfff_u64] {
        let (st, _) = create_qp_raw(d, &base, &[pg[0], bad]);
        ck.st(
            format!("CREATE_QP with rq page {bad:#x}"),
            st,
            abi::STATUS_BAD_ADDRESS,
        );
    }
    let (st, _) = create_cq_raw(d, 64, 2, &[pg[2], GUEST_RAM]);
    ck.st("CREATE_CQ with a bad page", st, abi::STATUS_BAD_ADDRESS);
    // None of the would-be handles names anything.
    let mut guesses = vec![old, 0, u32::MAX, abi::make_handle(idx, 0)];
    for k in 1..=3u8 {
        guesses.push(abi::make_handle(idx, key.wrapping_add(k)));
        guesses.push(abi::make_handle(idx + 1, k));
    }
    let attr = abi::QpAttr {
        qp_state: abi::QPS_ERR,
        ..Default::default()
    };
    for &h in &guesses {
        ck.st(
            format!("QUERY_QP {h:#x}"),
            handle_cmd(d, abi::CMD_QUERY_QP, h),
            abi::STATUS_BAD_HANDLE,
        );
        let m = abi::CmdModifyQp {
            qpn: h,
            attr_mask: abi::QP_ATTR_STATE,
            attr,
        };
        ck.st(
            format!("MODIFY_QP {h:#x}"),
            status(d, abi::CMD_MODIFY_QP, m.as_slice(), &[], 0),
            abi::STATUS_BAD_HANDLE,
        );
        ck.st(
            format!("DESTROY_QP {h:#x}"),
            handle_cmd(d, abi::CMD_DESTROY_QP, h),
            abi::STATUS_BAD_HANDLE,
        );
        if h != a.cq.cqn() {
            ck.st(
                format!("DESTROY_CQ {h:#x}"),
                handle_cmd(d, abi::CMD_DESTROY_CQ, h),
                abi::STATUS_BAD_HANDLE,
            );
        }
        d.ring_sq_doorbell(abi::handle_index(h) & 0x3fff).unwrap();
    }
    // A create that succeeds afterwards gets a working object.
    let (st, qpn) = create_qp_raw(d, &base, &pg[..2]);
    ck.st("CREATE_QP after the failures", st, abi::STATUS_OK);
    ck.ok("new handle differs from the stale one", qpn != old);
    ck.st(
        "QUERY_QP of the new QP",
        handle_cmd(d, abi::CMD_QUERY_QP, qpn),
        abi::STATUS_OK,
    );
    ck.st(
        "DESTROY_QP of the new QP",
        handle_cmd(d, abi::CMD_DESTROY_QP, qpn),
        abi::STATUS_OK,
    );
    drain(&a.d, &mut a.cq);
    still_works(&mut a, &mut b);
    ck.finish();
}

// ---------------------------------------------------------------------------------------------
// CVE-2022-1050: commands executed before the shared region existed
// ---------------------------------------------------------------------------------------------

#[test]
fn cve_2022_1050_nothing_runs_before_driver_ok_or_doorbell_area() {
    let fabric = SoftFabric::new();
    let vm = Vm::new(&fabric, 1);
    let mut ck = Checks::default();
    let size = abi::doorbell_area_size(vm.device.config().max_qp, vm.device.config().max_cq);
    let mut raw = RawDev::new(&vm);

    // QueueNotify before DRIVER_OK does nothing (a request is already available).
    let hdr = abi::CtrlHdr {
        cmd: abi::CMD_CREATE_PD,
        flags: 0,
    };
    vm.mem
        .write_slice(hdr.as_slice(), GuestAddress(RAW_REQ))
        .unwrap();
    let descs = [
        RawDesc {
            index: 0,
            addr: RAW_REQ,
            len: 8,
            flags: VQ_NEXT,
            next: 1,
        },
        RawDesc {
            index: 1,
            addr: RAW_RESP,
            len: 16,
            flags: VQ_WRITE,
            next: 0,
        },
    ];
    raw.push(0, &descs, 0);
    for q in [0, 1, 2, 0xffff, 0x1_0000, u32::MAX] {
        raw.notify(q);
    }
    ck.eq("ctrl used index before DRIVER_OK", raw.used_idx(0), 0);
    ck.eq("event used index before DRIVER_OK", raw.used_idx(1), 0);
    ck.ok("device inactive before DRIVER_OK", !vm.device.is_active());
    raw.driver_ok();
    raw.notify(0);
    ck.ok(
        "the early request runs once the device is live",
        raw.pop_used(0, WAIT).is_some(),
    );

    // Before SET_DOORBELL_AREA: queries, PDs, MRs and AHs work; CQs and QPs do not.
    ck.ok("QUERY_DEVICE before the doorbell area", raw.query_ok());
    let (st, resp) = raw.ctrl(abi::CMD_CREATE_PD, &[], &[], 8);
    ck.st("CREATE_PD before the doorbell area", st, abi::STATUS_OK);
    let pd = u32::from_le_bytes(resp[..4].try_into().unwrap());
    let mr = abi::CmdRegMr {
        pd,
        access: abi::ACCESS_LOCAL_WRITE,
        iova: 0x1000,
        length: 4096,
        page_shift: 12,
        npages: 1,
    };
    let (st, _) = raw.ctrl(abi::CMD_REG_MR, mr.as_slice(), &[RAW_RING + 0x8000], 8);
    ck.st("REG_MR before the doorbell area", st, abi::STATUS_OK);
    let cq = abi::CmdCreateCq {
        depth: 16,
        npages: 1,
    };
    let (st, _) = raw.ctrl(abi::CMD_CREATE_CQ, cq.as_slice(), &[RAW_RING], 8);
    ck.st(
        "CREATE_CQ before the doorbell area",
        st,
        abi::STATUS_BAD_STATE,
    );
    let qp = qp_cmd(pd, 0x101);
    let (st, _) = raw.ctrl(
        abi::CMD_CREATE_QP,
        qp.as_slice(),
        &[RAW_RING, RAW_RING + 0x1000],
        16,
    );
    ck.ok(
        format!("CREATE_QP before the doorbell area: {}", status_name(st)),
        st == abi::STATUS_BAD_STATE || st == abi::STATUS_BAD_HANDLE,
    );
    // A doorbell kick with no doorbell area.
    raw.notify(1);

    let set = |raw: &mut RawDev, gpa: u64, len: u64| {
        let c = abi::CmdSetDoorbellArea { gpa, len };
        raw.ctrl(abi::CMD_SET_DOORBELL_AREA, c.as_slice(), &[], 0).0
    };
    let (bad_addr, inv) = (abi::STATUS_BAD_ADDRESS, abi::STATUS_INVALID);
    let mut pd = pd;
    for (name, gpa, len, want) in [
        ("misaligned", RAW_DB + 8, size, bad_addr),
        ("misaligned by 2 KiB", RAW_DB + 2048, size, bad_addr),
        ("outside guest memory", GUEST_RAM, size, bad_addr),
        (
            "straddling the end of memory",
            GUEST_RAM - 4096,
            size,
            bad_addr,
        ),
        (
            "at the top of the address space",
            !0xfff_u64,
            size,
            bad_addr,
        ),
        ("too small", RAW_DB, size - 4096, inv),
        ("length 0", RAW_DB, 0, inv),
        ("length 64", RAW_DB, 64, inv),
        (
            "length running past the end of memory",
            GUEST_RAM - size,
            size + 4096,
            bad_addr,
        ),
        (
            "length wrapping the address space",
            RAW_DB,
            u64::MAX,
            bad_addr,
        ),
    ] {
        let st = set(&mut raw, gpa, len);
        ck.st(format!("SET_DOORBELL_AREA {name}"), st, want);
        if st == abi::STATUS_OK {
            // Wrongly accepted: start over so that the remaining cases stay independent.
            raw = RawDev::new(&vm);
            raw.driver_ok();
            let (_, resp) = raw.ctrl(abi::CMD_CREATE_PD, &[], &[], 8);
            pd = u32::from_le_bytes(resp[..4].try_into().unwrap());
        }
    }
    let short = [0u8; 8];
    let (st, _) = raw.ctrl(abi::CMD_SET_DOORBELL_AREA, &short, &[], 0);
    ck.st(
        "SET_DOORBELL_AREA, short request",
        st,
        abi::STATUS_BAD_LENGTH,
    );
    // Nothing above may have set the area (unless the device wrongly accepted one).
    let (st, _) = raw.ctrl(abi::CMD_CREATE_CQ, cq.as_slice(), &[RAW_RING], 8);
    ck.st(
        "CREATE_CQ after refused SET_DOORBELL_AREAs",
        st,
        abi::STATUS_BAD_STATE,
    );
    ck.st(
        "SET_DOORBELL_AREA valid",
        set(&mut raw, RAW_DB, size),
        abi::STATUS_OK,
    );
    ck.st(
        "SET_DOORBELL_AREA twice",
        set(&mut raw, RAW_DB, size),
        abi::STATUS_BAD_STATE,
    );
    ck.st(
        "SET_DOORBELL_AREA twice, another area",
        set(&mut raw, RAW_DB + 0x4000, size),
        abi::STATUS_BAD_STATE,
    );
    let (st, cqn) = {
        let (st, r) = raw.ctrl(abi::CMD_CREATE_CQ, cq.as_slice(), &[RAW_RING + 0x2000], 8);
        (
            st,
            if st == 0 {
                u32::from_le_bytes(r[..4].try_into().unwrap())
            } else {
                0
            },
        )
    };
    ck.st("CREATE_CQ after SET_DOORBELL_AREA", st, abi::STATUS_OK);
    let qp = qp_cmd(pd, cqn);
    let (st, _) = raw.ctrl(
        abi::CMD_CREATE_QP,
        qp.as_slice(),
        &[RAW_RING + 0x3000, RAW_RING + 0x4000],
        16,
    );
    ck.st("CREATE_QP after SET_DOORBELL_AREA", st, abi::STATUS_OK);

    // A reset forgets the doorbell area (and everything else).
    let mut raw = RawDev::new(&vm);
    raw.driver_ok();
    let (st, _) = raw.ctrl(abi::CMD_CREATE_CQ, cq.as_slice(), &[RAW_RING], 8);
    ck.st(
        "CREATE_CQ after reset, before SET_DOORBELL_AREA",
        st,
        abi::STATUS_BAD_STATE,
    );
    let c = abi::CmdHandle {
        handle: pd,
        reserved: 0,
    };
    let (st, _) = raw.ctrl(abi::CMD_DESTROY_PD, c.as_slice(), &[], 0);
    ck.st(
        "DESTROY_PD of a pre-reset handle",
        st,
        abi::STATUS_BAD_HANDLE,
    );
    drop(raw);

    // The guest driver brings the same device up normally; its own doorbell area cannot be
    // registered a second time.
    let vb = Vm::new(&fabric, 2);
    let mut a = side(&vm, RC);
    let mut b = side(&vb, RC);
    let (gpa, len) = a.d.doorbell_area();
    let c = abi::CmdSetDoorbellArea { gpa: gpa.0, len };
    ck.st(
        "SET_DOORBELL_AREA again after probe",
        status(&a.d, abi::CMD_SET_DOORBELL_AREA, c.as_slice(), &[], 0),
        abi::STATUS_BAD_STATE,
    );
    connect(&a, &b);
    write_ok(&mut a, &b, 11);
    still_works(&mut a, &mut b);
    ck.finish();
}

// ---------------------------------------------------------------------------------------------
// CVE-2023-1544: ring page count larger than one page table
// ---------------------------------------------------------------------------------------------

#[test]
fn cve_2023_1544_ring_page_count_beyond_max_ring_pages() {
    let (_f, mut a, mut b) = pair(RC);
    let d = &a.d;
    let cfg = *d.config();
    let max = cfg.max_ring_pages;
    let mut ck = Checks::default();
    let pg = zpages(d, 2);
    let over = vec![pg[0]; max as usize + 1];
    let base = qp_cmd(a.pd.0, a.cq.cqn());
    let inv = abi::STATUS_INVALID;
    let (st, _) = create_cq_raw(d, 64, max + 1, &over);
    ck.st("CREATE_CQ npages max_ring_pages + 1", st, inv);
    let (st, _) = create_cq_raw(d, 64, u32::MAX, &over);
    ck.st("CREATE_CQ npages u32::MAX", st, inv);
    let (st, _) = create_cq_raw(d, 64, 1 << 31, &over);
    ck.st("CREATE_CQ npages 2^31", st, inv);
    for (name, c, list) in [
        (
            "sq_npages max + 1",
            abi::CmdCreateQp {
                sq_npages: max + 1,
                ..base
            },
            [&over[..], &pg[1..]].concat(),
        ),
        (
            "rq_npages max + 1",
            abi::CmdCreateQp {
                rq_npages: max + 1,
                ..base
            },
            [&pg[1..], &over[..]].concat(),
        ),
        (
            "both max + 1",
            abi::CmdCreateQp {
                sq_npages: max + 1,
                rq_npages: max + 1,
                ..base
            },
            [&over[..], &over[..]].concat(),
        ),
        (
            "sq_npages u32::MAX, rq_npages u32::MAX",
            abi::CmdCreateQp {
                sq_npages: u32::MAX,
                rq_npages: u32::MAX,
                ..base
            },
            over.clone(),
        ),
    ] {
        let (st, _) = create_qp_raw(d, &c, &list);
        ck.st(format!("CREATE_QP {name}"), st, inv);
    }
    // Exactly max_ring_pages is legal (extra pages are allowed and unused).
    let (st, h) = create_cq_raw(d, 1, max, &over[..max as usize]);
    ck.st("CREATE_CQ npages max_ring_pages", st, abi::STATUS_OK);
    ck.st(
        "DESTROY_CQ",
        handle_cmd(d, abi::CMD_DESTROY_CQ, h),
        abi::STATUS_OK,
    );
    let c = abi::CmdCreateQp {
        sq_npages: max,
        rq_npages: max,
        ..base
    };
    let list = [vec![pg[0]; max as usize], vec![pg[1]; max as usize]].concat();
    let (st, h) = create_qp_raw(d, &c, &list);
    ck.st(
        "CREATE_QP with max_ring_pages on both rings",
        st,
        abi::STATUS_OK,
    );
    ck.st(
        "DESTROY_QP",
        handle_cmd(d, abi::CMD_DESTROY_QP, h),
        abi::STATUS_OK,
    );
    drain(&a.d, &mut a.cq);
    still_works(&mut a, &mut b);
    ck.finish();
}

// ---------------------------------------------------------------------------------------------
// Stale and bogus handles, keys and QPNs
// ---------------------------------------------------------------------------------------------

#[test]
fn stale_and_bogus_handles_are_refused() {
    let (_f, mut a, mut b) = pair(RC);
    let mut ck = Checks::default();
    let bh = abi::STATUS_BAD_HANDLE;

    // Objects that live and die.
    let pd2 = a.d.alloc_pd().unwrap();
    let buf2 = a.d.alloc_buffer(8192, Layout::Any).unwrap();
    let mr2 = a.d.reg_mr(pd2, &buf2, ACCESS_ALL).unwrap();
    let mut cq2 = a.d.create_cq(16).unwrap();
    let mut qp2 = a.d.create_qp(pd2, &QpInitAttr::rc(&cq2)).unwrap();
    let ah2 = a.d.create_ah(pd2, &ah_attr_for(b.gid)).unwrap();
    let (pd_h, lkey, cq_h, qpn, ah_h) = (pd2.0, mr2.lkey, cq2.cqn(), qp2.qpn(), ah2.0);
    a.d.destroy_qp(&mut qp2).unwrap();
    a.d.destroy_cq(&mut cq2).unwrap();
    a.d.destroy_ah(ah2).unwrap();
    a.d.dereg_mr(mr2).unwrap();
    a.d.dealloc_pd(pd2).unwrap();

    let flip = |h: u32| abi::make_handle(abi::handle_index(h), abi::handle_key(h) ^ 0x5a);
    let zero_key = |h: u32| abi::make_handle(abi::handle_index(h), 0);
    let bogus = |stale: u32, live: u32| {
        vec![
            ("stale", stale),
            ("0", 0),
            ("u32::MAX", u32::MAX),
            ("live index, wrong key", flip(live)),
            ("live index, key 0", zero_key(live)),
            ("index beyond the table", abi::make_handle(0xff_ffff, 1)),
        ]
    };
    let modify = |d: &Driver, h: u32| {
        let m = abi::CmdModifyQp {
            qpn: h,
            attr_mask: abi::QP_ATTR_STATE,
            attr: abi::QpAttr {
                qp_state: abi::QPS_ERR,
                ..Default::default()
            },
        };
        status(d, abi::CMD_MODIFY_QP, m.as_slice(), &[], 0)
    };
    for (cmd, stale, live) in [
        (abi::CMD_DESTROY_PD, pd_h, a.pd.0),
        (abi::CMD_DEREG_MR, lkey, a.mr.lkey),
        (abi::CMD_DESTROY_CQ, cq_h, a.cq.cqn()),
        (abi::CMD_DESTROY_QP, qpn, a.qp.qpn()),
        (abi::CMD_QUERY_QP, qpn, a.qp.qpn()),
        (abi::CMD_DESTROY_AH, ah_h, ah_h),
        (abi::CMD_MODIFY_QP, qpn, a.qp.qpn()),
    ] {
        for (what, h) in bogus(stale, live) {
            let st = if cmd == abi::CMD_MODIFY_QP {
                modify(&a.d, h)
            } else {
                handle_cmd(&a.d, cmd, h)
            };
            ck.st(
                format!("{} with {what} handle {h:#x}", vrdma_guest::cmd_name(cmd)),
                st,
                bh,
            );
        }
    }
    // Handles inside create commands.
    let pg = zpages(&a.d, 2);
    let one = pg[..1].to_vec();
    for (what, h) in bogus(pd_h, a.pd.0) {
        let (st, _) = reg_mr_raw(&a.d, h, 1, 0, 4096, 12, 1, &one);
        ck.st(format!("REG_MR with {what} PD"), st, bh);
        let (st, _) = create_qp_raw(&a.d, &qp_cmd(h, a.cq.cqn()), &pg);
        ck.st(format!("CREATE_QP with {what} PD"), st, bh);
        let c = abi::CmdCreateAh {
            pd: h,
            reserved: 0,
            attr: ah_attr_for(b.gid),
        };
        let st = status(&a.d, abi::CMD_CREATE_AH, c.as_slice(), &[], 8);
        ck.st(format!("CREATE_AH with {what} PD"), st, bh);
    }
    for (what, h) in bogus(cq_h, a.cq.cqn()) {
        let mut c = qp_cmd(a.pd.0, a.cq.cqn());
        c.send_cq = h;
        let (st, _) = create_qp_raw(&a.d, &c, &pg);
        ck.st(format!("CREATE_QP with {what} send CQ"), st, bh);
        let mut c = qp_cmd(a.pd.0, a.cq.cqn());
        c.recv_cq = h;
        let (st, _) = create_qp_raw(&a.d, &c, &pg);
        ck.st(format!("CREATE_QP with {what} recv CQ"), st, bh);
    }
    // A re-created object in the same slot gets a new key.
    let pd3 = a.d.alloc_pd().unwrap();
    ck.ok(
        format!(
            "re-created PD {:#x} differs from the stale {pd_h:#x}",
            pd3.0
        ),
        pd3.0 != pd_h,
    );

    // Data path: stale lkey, lkey of another PD.
    let lbuf = a.d.alloc_buffer(4096, Layout::Any).unwrap();
    let lmr = a.d.reg_mr(a.pd, &lbuf, ACCESS_ALL).unwrap();
    a.d.dereg_mr(lmr).unwrap();
    let omr = a.d.reg_mr(pd3, &lbuf, ACCESS_ALL).unwrap();
    for (what, sge) in [
        ("stale lkey", lmr.sge(0, 8)),
        ("lkey of another PD", omr.sge(0, 8)),
        (
            "lkey 0",
            Sge {
                lkey: 0,
                ..lmr.sge(0, 8)
            },
        ),
        (
            "lkey u32::MAX",
            Sge {
                lkey: u32::MAX,
                ..lmr.sge(0, 8)
            },
        ),
    ] {
        a.d.post_send(&mut a.qp, &[SendWr::write(1, &[sge], b.mr.iova, b.mr.rkey)])
            .unwrap();
        let c = wait1(&a.d, &mut a.cq);
        ck.eq(
            what,
            (c.status, c.vendor_err),
            (abi::WC_LOC_PROT_ERR, abi::VENDOR_ERR_BAD_SGE),
        );
        new_qps(&mut a, &mut b);
    }
    // Remote: stale rkey, rkey of another PD, rkey 0, the lkey of a local-only MR.
    let rbuf = b.d.alloc_buffer(4096, Layout::Any).unwrap();
    let stale = b.d.reg_mr(b.pd, &rbuf, ACCESS_ALL).unwrap();
    b.d.dereg_mr(stale).unwrap();
    let bpd2 = b.d.alloc_pd().unwrap();
    let other = b.d.reg_mr(bpd2, &rbuf, ACCESS_ALL).unwrap();
    let local_only = b.d.reg_mr(b.pd, &rbuf, abi::ACCESS_LOCAL_WRITE).unwrap();
    ck.eq("rkey of a local-only MR", local_only.rkey, 0);
    let before = rbuf.to_vec();
    for (what, iova, rkey) in [
        ("stale rkey", stale.iova, stale.rkey),
        ("rkey of another PD", other.iova, other.rkey),
        ("rkey 0", local_only.iova, 0),
        (
            "lkey of a local-only MR as rkey",
            local_only.iova,
            local_only.lkey,
        ),
        ("rkey u32::MAX", stale.iova, u32::MAX),
    ] {
        a.d.post_send(
            &mut a.qp,
            &[SendWr::write(2, &[a.mr.sge(0, 8)], iova, rkey)],
        )
        .unwrap();
        let c = wait1(&a.d, &mut a.cq);
        ck.eq(what, c.status, abi::WC_REM_ACCESS_ERR);
        new_qps(&mut a, &mut b);
    }
    ck.ok("remote memory unchanged", rbuf.to_vec() == before);

    // Stale AH and AH 0 on a UD QP.
    let mut ud = a.d.create_qp(a.pd, &qp_attr(UD, &a.cq)).unwrap();
    a.d.connect_ud(&ud, QKEY).unwrap();
    let ah = a.d.create_ah(a.pd, &ah_attr_for(b.gid)).unwrap();
    a.d.destroy_ah(ah).unwrap();
    for (what, ahh) in [
        ("stale AH", ah),
        ("AH 0", vrdma_guest::Ah(0)),
        ("AH of another PD", {
            a.d.create_ah(pd3, &ah_attr_for(b.gid)).unwrap()
        }),
    ] {
        a.d.post_send(&mut ud, &[SendWr::ud_send(3, &[], ahh, 0x10, QKEY)])
            .unwrap();
        let c = wait1(&a.d, &mut a.cq);
        ck.eq(
            what,
            (c.status, c.vendor_err),
            (abi::WC_LOC_QP_OP_ERR, abi::VENDOR_ERR_BAD_AH),
        );
        a.d.destroy_qp(&mut ud).unwrap();
        drain(&a.d, &mut a.cq);
        ud = a.d.create_qp(a.pd, &qp_attr(UD, &a.cq)).unwrap();
        a.d.connect_ud(&ud, QKEY).unwrap();
    }
    a.d.destroy_qp(&mut ud).unwrap();

    // Stale QPN: the peer QP is gone; its slot is reused by a new QP with a new key.
    let old_b = b.qp.qpn();
    b.d.destroy_qp(&mut b.qp).unwrap();
    drain(&b.d, &mut b.cq);
    b.buf.fill(0);
    a.d.post_send(
        &mut a.qp,
        &[SendWr::write(4, &[a.mr.sge(0, 64)], b.mr.iova, b.mr.rkey)],
    )
    .unwrap();
    let c = wait1(&a.d, &mut a.cq);
    ck.eq(
        "write to a destroyed peer QP",
        c.status,
        abi::WC_RETRY_EXC_ERR,
    );
    a.d.destroy_qp(&mut a.qp).unwrap();
    drain(&a.d, &mut a.cq);
    a.qp = a.d.create_qp(a.pd, &QpInitAttr::rc(&a.cq)).unwrap();
    b.qp = b.d.create_qp(b.pd, &QpInitAttr::rc(&b.cq)).unwrap();
    ck.ok(
        format!(
            "new peer QPN {:#x} differs from the stale {old_b:#x}",
            b.qp.qpn()
        ),
        b.qp.qpn() != old_b,
    );
    a.d.connect_rc_with(&a.qp, &fast(&a.d, old_b, b.gid))
        .unwrap();
    b.d.connect_rc_with(&b.qp, &fast(&b.d, a.qp.qpn(), a.gid))
        .unwrap();
    a.d.post_send(
        &mut a.qp,
        &[SendWr::write(5, &[a.mr.sge(0, 64)], b.mr.iova, b.mr.rkey)],
    )
    .unwrap();
    let c = wait1(&a.d, &mut a.cq);
    ck.eq("write to a stale QPN", c.status, abi::WC_RETRY_EXC_ERR);
    ck.ok(
        "nothing reached the QP that reuses the slot",
        b.buf.to_vec().iter().all(|&x| x == 0),
    );
    // A doorbell for the destroyed QP's index.
    a.d.ring_sq_doorbell(abi::handle_index(qpn)).unwrap();
    new_qps(&mut a, &mut b);
    still_works(&mut a, &mut b);
    ck.finish();
}

// ---------------------------------------------------------------------------------------------
// Doorbells, arm words and ring indices with garbage
// ---------------------------------------------------------------------------------------------

/// Counts EV_CQ_COMP events for `cqn`: waits up to [`EV_WAIT`] for the first one if `expect`,
/// then (or otherwise) a short quiet period for more.
fn cq_comp_events(d: &Driver, cqn: u32, expect: bool) -> usize {
    let quiet = Duration::from_millis(30);
    let mut deadline = Instant::now() + if expect { EV_WAIT } else { quiet };
    let mut n = 0;
    while let Some(e) = d.wait_event(deadline.saturating_duration_since(Instant::now())) {
        if e.kind == abi::EV_CQ_COMP && e.handle == cqn {
            n += 1;
            deadline = Instant::now() + quiet;
        }
    }
    n
}

#[test]
fn doorbell_garbage_and_index_abuse() {
    let (_f, mut a, mut b) = pair(RC);
    let cfg = *a.d.config();
    let mut ck = Checks::default();

    // Bits for indices that name nothing.
    for i in [0, 2, 3, 100, cfg.max_qp - 1, cfg.max_qp] {
        a.d.ring_sq_doorbell(i).unwrap();
    }
    for i in [0, 2, 100, cfg.max_cq - 1, cfg.max_cq] {
        a.d.ring_cq_doorbell(i).unwrap();
    }
    // Every byte of the doorbell area set, header included, then a kick.
    let (gpa, len) = a.d.doorbell_area();
    a.d.mem()
        .write_slice(&vec![0xff; len as usize], gpa)
        .unwrap();
    a.d.notify_queue(abi::EVENTQ);
    let bitmaps_end = abi::db_cq_bitmap_offset(cfg.max_qp) + abi::bitmap_bytes(cfg.max_cq);
    let mut bits = vec![0u8; (bitmaps_end - abi::DB_SQ_BITMAP_OFFSET) as usize];
    a.d.mem()
        .read_slice(&mut bits, gpa.unchecked_add(abi::DB_SQ_BITMAP_OFFSET))
        .unwrap();
    ck.ok(
        "the device consumed (zeroed) every bitmap word it was kicked for",
        bits.iter().all(|&x| x == 0),
    );
    // Give the header back to the driver: device_flags garbage would suppress its kicks.
    a.d.mem().write_slice(&[0u8; 64], gpa).unwrap();
    assert_eq!(a.d.query_device().unwrap(), cfg);
    write_ok(&mut a, &b, 21);

    // Arm words with garbage on a's CQ.
    let _ = a.d.poll_events();
    drain(&a.d, &mut a.cq);
    let cqn = a.cq.cqn();
    let arm = |a: &Side, word: u32, arm_cons: u32| {
        let ring = a.cq.ring();
        a.d.write_ring_u32(ring, abi::RING_ARM_CONS_OFFSET, arm_cons)
            .unwrap();
        a.d.write_ring_u32(ring, abi::RING_ARM_OFFSET, word)
            .unwrap();
        a.d.ring_cq_doorbell(abi::handle_index(a.cq.cqn())).unwrap();
    };
    // Mode 0 is ignored: the CQ stays disarmed.
    arm(&a, 100 << 2, a.cq.cons());
    ck.eq(
        "mode 0: no event at once",
        cq_comp_events(&a.d, cqn, false),
        0,
    );
    write_ok(&mut a, &b, 22);
    ck.eq("mode 0: not armed", cq_comp_events(&a.d, cqn, false), 0);
    // Mode 3 is treated as NEXT.
    arm(&a, (101 << 2) | 3, a.cq.cons());
    ck.eq(
        "mode 3: no event at once",
        cq_comp_events(&a.d, cqn, false),
        0,
    );
    write_ok(&mut a, &b, 23);
    ck.eq("mode 3: armed as NEXT", cq_comp_events(&a.d, cqn, true), 1);
    // arm_cons outside [prod - depth, prod]: event at once.
    for (seq, arm_cons) in [(102, a.cq.cons() + 1000), (103, a.cq.cons() + (1 << 31))] {
        arm(&a, (seq << 2) | abi::CQ_ARM_NEXT, arm_cons);
        ck.eq(
            format!("arm_cons {arm_cons:#x} ahead of prod: event at once"),
            cq_comp_events(&a.d, cqn, true),
            1,
        );
    }
    // The same sequence again is no new arm.
    arm(&a, (103 << 2) | abi::CQ_ARM_NEXT, a.cq.cons());
    write_ok(&mut a, &b, 24);
    ck.eq(
        "repeated seq: no event",
        cq_comp_events(&a.d, cqn, false),
        0,
    );
    // SOLICITED: a plain success does not fire, an error does.
    arm(&a, (104 << 2) | abi::CQ_ARM_SOLICITED, a.cq.cons());
    write_ok(&mut a, &b, 25);
    ck.eq(
        "solicited arm, plain success",
        cq_comp_events(&a.d, cqn, false),
        0,
    );
    a.d.post_send(
        &mut a.qp,
        &[SendWr::write(
            6,
            &[a.mr.sge(0, 8)],
            b.mr.iova,
            b.mr.rkey ^ 0x300,
        )],
    )
    .unwrap();
    ck.eq(
        "error completion",
        wait1(&a.d, &mut a.cq).status,
        abi::WC_REM_ACCESS_ERR,
    );
    ck.eq(
        "solicited arm, error CQE",
        cq_comp_events(&a.d, cqn, true),
        1,
    );
    drain(&a.d, &mut a.cq);
    new_qps(&mut a, &mut b);
    // All ones.
    arm(&a, u32::MAX, u32::MAX);
    ck.eq(
        "arm word and arm_cons all ones: event at once",
        cq_comp_events(&a.d, cqn, true),
        1,
    );

    // Device-owned indices overwritten by the guest: the device keeps its own.
    a.d.write_ring_u32(a.cq.ring(), abi::RING_PROD_OFFSET, 0xdead_beef)
        .unwrap();
    let sq = a.qp.sq().clone();
    a.d.write_ring_u32(&sq, abi::RING_CONS_OFFSET, 0x1234_5678)
        .unwrap();
    let stride = sq.stride();
    let p = a.qp.sq_prod();
    let w = SendWqe {
        wr_id: 77,
        opcode: abi::WR_RDMA_WRITE,
        flags: abi::SEND_F_SIGNALED,
        num_sge: 1,
        remote_addr: b.mr.iova,
        rkey: b.mr.rkey,
        ..Default::default()
    };
    a.d.write_sq_slot(&a.qp, p, &send_slot(w, &[a.mr.sge(0, 64)], stride))
        .unwrap();
    a.d.set_sq_prod(&mut a.qp, p + 1).unwrap();
    a.d.ring_sq_doorbell(sq_index(&a.qp)).unwrap();
    let c = wait1(&a.d, &mut a.cq);
    ck.eq(
        "WQE after garbage in device-owned indices",
        (c.wr_id, c.status),
        (77, abi::WC_SUCCESS),
    );
    ck.eq(
        "SQ cons rewritten by the device",
        a.d.sq_cons(&a.qp).unwrap(),
        p + 1,
    );

    // A CQ consumer index ahead of the producer is treated as overflow (§9.6).
    let mut cq3 = a.d.create_cq(16).unwrap();
    let mut qp3 = a.d.create_qp(a.pd, &QpInitAttr::rc(&cq3)).unwrap();
    let mut bq = b.d.create_qp(b.pd, &QpInitAttr::rc(&b.cq)).unwrap();
    a.d.connect_rc_with(&qp3, &fast(&a.d, bq.qpn(), b.gid))
        .unwrap();
    b.d.connect_rc_with(&bq, &fast(&b.d, qp3.qpn(), a.gid))
        .unwrap();
    let prod = a.d.cq_prod(&cq3).unwrap();
    a.d.write_ring_u32(cq3.ring(), abi::RING_CONS_OFFSET, prod.wrapping_add(1000))
        .unwrap();
    let _ = a.d.poll_events();
    a.d.post_send(
        &mut qp3,
        &[SendWr::write(8, &[a.mr.sge(0, 8)], b.mr.iova, b.mr.rkey)],
    )
    .unwrap();
    ck.ok(
        "EV_CQ_ERR for a consumer index ahead of the producer",
        wait_ev(&a.d, |e| e.kind == abi::EV_CQ_ERR && e.handle == cq3.cqn()).is_some(),
    );
    ck.eq(
        "its QP fails with EV_QP_FATAL(0)",
        fatal_of(&a.d, qp3.qpn()),
        Some(0),
    );
    ck.eq("QP state", a.d.qp_state(&qp3).unwrap(), abi::QPS_ERR);
    a.d.destroy_qp(&mut qp3).unwrap();
    a.d.destroy_cq(&mut cq3).unwrap();
    b.d.destroy_qp(&mut bq).unwrap();
    drain(&b.d, &mut b.cq);
    still_works(&mut a, &mut b);
    ck.finish();
}

// ---------------------------------------------------------------------------------------------
// Property test: random control commands, interleaved with valid traffic
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum PageSel {
    /// A page of the scratch buffer.
    Scratch(usize),
    /// A scratch page, misaligned.
    Misaligned(usize, u16),
    /// The first page past guest memory.
    PastEnd,
    /// Any value.
    Any(u64),
}

#[derive(Clone, Debug)]
struct CtrlCase {
    cmd: u32,
    flags: u32,
    body: Vec<u8>,
    /// (u32 slot, value) patches: small numbers land in count/depth/size fields.
    words: Vec<(usize, u32)>,
    /// (u32 slot, selector) patches with handles of live objects.
    handles: Vec<(usize, usize)>,
    pages: Vec<PageSel>,
    /// Truncate the readable part to this many bytes.
    truncate: Option<usize>,
    writable: usize,
    /// Start from a well-formed request for `cmd` (then apply the patches), instead of `body`.
    template: bool,
}

/// A well-formed request body and page list for `cmd`, with choices taken from `r`.
fn ctrl_template(cmd: u32, r: &[u8], h: &[u32], a: &Side, scratch: &Buffer) -> (Vec<u8>, Vec<u64>) {
    let b = |i: usize| r.get(i).copied().unwrap_or(0);
    let pages = |n: u64| -> Vec<u64> {
        (0..n as usize)
            .map(|i| scratch.pages()[(b(9) as usize + i) % scratch.pages().len()])
            .collect()
    };
    let handle = h[b(0) as usize % h.len()];
    match cmd {
        abi::CMD_QUERY_PORT => (
            abi::CmdQueryPort {
                port: 1,
                reserved: 0,
            }
            .as_slice()
            .to_vec(),
            vec![],
        ),
        abi::CMD_QUERY_GID => (
            abi::CmdQueryGid { port: 1, index: 0 }.as_slice().to_vec(),
            vec![],
        ),
        abi::CMD_SET_DOORBELL_AREA => {
            let c = abi::CmdSetDoorbellArea {
                gpa: scratch.pages()[0],
                len: 2 * 4096,
            };
            (c.as_slice().to_vec(), vec![])
        }
        abi::CMD_REG_MR => {
            let k = 1 + b(3) as u64 % 4;
            let c = abi::CmdRegMr {
                pd: a.pd.0,
                access: (b(1) & 0xf) as u32 | abi::ACCESS_LOCAL_WRITE,
                iova: 0x10000 * b(2) as u64,
                length: 4096 * k,
                page_shift: 12,
                npages: k as u32,
            };
            (c.as_slice().to_vec(), pages(k))
        }
        abi::CMD_CREATE_CQ => {
            let depth = 1u32 << (b(1) % 8);
            let n = abi::ring_pages(depth, abi::CQE_SIZE);
            let c = abi::CmdCreateCq {
                depth,
                npages: n as u32,
            };
            (c.as_slice().to_vec(), pages(n))
        }
        abi::CMD_CREATE_QP => {
            let (sd, ss) = (1u32 << (b(1) % 6), 64u32 << (b(2) % 3));
            let (rd, rs) = (1u32 << (b(3) % 6), 64u32 << (b(4) % 3));
            let (sn, rn) = (abi::ring_pages(sd, ss), abi::ring_pages(rd, rs));
            let c = abi::CmdCreateQp {
                qp_type: if b(5) & 1 == 0 { RC } else { UD },
                sq_depth: sd,
                sq_stride: ss,
                sq_npages: sn as u32,
                rq_depth: rd,
                rq_stride: rs,
                rq_npages: rn as u32,
                ..qp_cmd(a.pd.0, a.cq.cqn())
            };
            (c.as_slice().to_vec(), pages(sn + rn))
        }
        abi::CMD_MODIFY_QP => {
            let masks = [
                abi::QP_ATTR_STATE,
                abi::QP_ATTR_STATE | abi::QP_ATTR_PKEY_INDEX | abi::QP_ATTR_PORT,
                abi::QP_ATTR_STATE
                    | abi::QP_ATTR_PKEY_INDEX
                    | abi::QP_ATTR_PORT
                    | abi::QP_ATTR_ACCESS_FLAGS,
                abi::QP_ATTR_STATE
                    | abi::QP_ATTR_QKEY
                    | abi::QP_ATTR_PKEY_INDEX
                    | abi::QP_ATTR_PORT,
                abi::QP_ATTR_SUPPORTED,
            ];
            let c = abi::CmdModifyQp {
                qpn: handle,
                attr_mask: masks[b(1) as usize % masks.len()],
                attr: abi::QpAttr {
                    qp_state: b(2) as u32 % 7,
                    port_num: 1,
                    path_mtu: 1 + b(3) as u32 % 5,
                    ah_attr: ah_attr_for(a.gid),
                    ..Default::default()
                },
            };
            (c.as_slice().to_vec(), vec![])
        }
        abi::CMD_CREATE_AH => {
            let c = abi::CmdCreateAh {
                pd: a.pd.0,
                reserved: 0,
                attr: ah_attr_for(a.gid),
            };
            (c.as_slice().to_vec(), vec![])
        }
        abi::CMD_SET_INTR_MODERATION => {
            let c = abi::CmdIntrModeration {
                max_events: b(1) as u32 % 4,
                usec: b(2) as u32 * 10,
            };
            (c.as_slice().to_vec(), vec![])
        }
        abi::CMD_DESTROY_PD
        | abi::CMD_DEREG_MR
        | abi::CMD_DESTROY_CQ
        | abi::CMD_QUERY_QP
        | abi::CMD_DESTROY_QP
        | abi::CMD_DESTROY_AH => (
            abi::CmdHandle {
                handle,
                reserved: 0,
            }
            .as_slice()
            .to_vec(),
            vec![],
        ),
        _ => (r.to_vec(), vec![]),
    }
}

fn ctrl_case() -> impl Strategy<Value = CtrlCase> {
    let page = prop_oneof![
        4 => (0usize..64).prop_map(PageSel::Scratch),
        1 => (0usize..64, 1u16..4096).prop_map(|(i, o)| PageSel::Misaligned(i, o)),
        1 => Just(PageSel::PastEnd),
        1 => any::<u64>().prop_map(PageSel::Any),
    ];
    let word = prop_oneof![0u32..8, 1u32..=4096, Just(u32::MAX), any::<u32>()];
    (
        prop_oneof![8 => 0u32..=18, 1 => any::<u32>()],
        prop_oneof![9 => Just(0u32), 1 => any::<u32>()],
        proptest::collection::vec(any::<u8>(), 0..160),
        proptest::collection::vec((0usize..40, word), 0..4),
        proptest::collection::vec((0usize..40, 0usize..10), 0..3),
        proptest::collection::vec(page, 0..8),
        prop_oneof![8 => Just(None), 1 => (0usize..24).prop_map(Some)],
        prop_oneof![
            1 => Just(0usize),
            1 => 1usize..8,
            1 => Just(8usize),
            4 => 8usize..256,
        ],
        any::<bool>(),
    )
        .prop_map(
            |(cmd, flags, body, words, handles, pages, truncate, writable, template)| CtrlCase {
                template,
                cmd,
                flags,
                body,
                words,
                handles,
                pages,
                truncate,
                writable,
            },
        )
}

/// Gives `s` brand-new objects (the old ones are left to the device) and reconnects it to `b`.
fn rebuild(s: &mut Side, b: &mut Side) {
    s.pd = s.d.alloc_pd().unwrap();
    s.buf = s.d.alloc_buffer(BUF_LEN, Layout::Discontiguous).unwrap();
    s.mr = s.d.reg_mr(s.pd, &s.buf, ACCESS_ALL).unwrap();
    s.cq = s.d.create_cq(512).unwrap();
    s.qp = s.d.create_qp(s.pd, &qp_attr(RC, &s.cq)).unwrap();
    if !b.qp.is_destroyed() {
        b.d.destroy_qp(&mut b.qp).unwrap();
    }
    drain(&b.d, &mut b.cq);
    b.qp = b.d.create_qp(b.pd, &qp_attr(RC, &b.cq)).unwrap();
    connect(s, b);
}

/// One RDMA WRITE a → b; false if it did not complete successfully within a second.
fn try_write(a: &mut Side, b: &Side, seed: u64) -> bool {
    let data = pattern(seed, 256);
    a.buf.write(0, &data);
    if a.d
        .post_send(
            &mut a.qp,
            &[SendWr::write(
                seed,
                &[a.mr.sge(0, 256)],
                b.mr.addr(0),
                b.mr.rkey,
            )],
        )
        .is_err()
    {
        return false;
    }
    let v = a.d.poll_cq_until(&mut a.cq, 1, EV_WAIT);
    v.len() == 1
        && v[0].status == abi::WC_SUCCESS
        && v[0].wr_id == seed
        && b.buf.read_vec(0, 256) == data
}

#[test]
fn proptest_random_control_commands() {
    let (_f, a, b) = pair(RC);
    let scratch = a.d.alloc_buffer(64 * 4096, Layout::Contiguous).unwrap();
    let cfg = *a.d.config();
    let state = RefCell::new((a, b, 0u64));
    let mut runner = TestRunner::new(PtConfig {
        cases: 128,
        failure_persistence: None,
        ..PtConfig::default()
    });
    let result = runner.run(&ctrl_case(), |case| {
        let mut guard = state.borrow_mut();
        let (a, b, n) = &mut *guard;
        *n += 1;
        let handles = [
            a.pd.0,
            a.mr.lkey,
            a.cq.cqn(),
            a.qp.qpn(),
            0,
            u32::MAX,
            0x101,
            0x201,
            0x102,
            abi::make_handle(cfg.max_qp, 1),
        ];
        let (mut body, mut tmpl_pages) = if case.template {
            ctrl_template(case.cmd, &case.body, &handles, a, &scratch)
        } else {
            (case.body.clone(), vec![])
        };
        // A template gets at most one mutation, so that most of them reach execution.
        let nwords = if case.template { 1 } else { case.words.len() };
        for &(slot, v) in case.words.iter().take(nwords) {
            if body.len() >= slot * 4 + 4 {
                body[slot * 4..slot * 4 + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
        for &(slot, sel) in case.handles.iter().filter(|_| !case.template) {
            if body.len() >= slot * 4 + 4 {
                body[slot * 4..slot * 4 + 4].copy_from_slice(&handles[sel].to_le_bytes());
            }
        }
        let mut req = abi::CtrlHdr {
            cmd: case.cmd,
            flags: case.flags,
        }
        .as_slice()
        .to_vec();
        req.extend_from_slice(&body);
        let mut list = Vec::new();
        if case.template && !tmpl_pages.is_empty() {
            // Mutate the page list a little: maybe replace one entry.
            if let Some(PageSel::Any(v)) = case.pages.first() {
                let i = *v as usize % tmpl_pages.len();
                tmpl_pages[i] = *v;
            }
            for p in &tmpl_pages {
                list.extend_from_slice(&p.to_le_bytes());
            }
        }
        for p in case.pages.iter().filter(|_| !case.template) {
            let v = match *p {
                PageSel::Scratch(i) => scratch.pages()[i],
                PageSel::Misaligned(i, o) => scratch.pages()[i] + o as u64,
                PageSel::PastEnd => GUEST_RAM,
                PageSel::Any(v) => v,
            };
            list.extend_from_slice(&v.to_le_bytes());
        }
        // A chain needs at least one descriptor: with nothing readable and nothing writable
        // there is no request a guest could make available.
        if case.truncate == Some(0) && case.writable == 0 {
            return Ok(());
        }
        let (used, written) = if let Some(t) = case.truncate {
            let mut all = [req, list].concat();
            all.truncate(t);
            a.d.ctrl_raw(&[&all], case.writable)
        } else {
            a.d.ctrl_raw(&[&req, &list], case.writable)
        }
        .map_err(|e| TestCaseError::fail(format!("control request: {e}")))?;
        let used = used as usize;
        prop_assert!(
            used <= case.writable,
            "used {used} > writable {}",
            case.writable
        );
        if case.writable < 8 {
            prop_assert_eq!(used, 0, "no CtrlResp room: chain returned empty");
        } else {
            prop_assert!(used >= 8);
            let st = u32::from_le_bytes(written[..4].try_into().unwrap());
            prop_assert!(st <= abi::STATUS_BAD_LENGTH, "unknown status {st}");
            prop_assert_eq!(&written[4..8], &[0u8; 4][..], "CtrlResp.reserved");
            let full_hdr = case.truncate.is_none_or(|t| t >= 8);
            if case.flags != 0 && full_hdr {
                prop_assert_eq!(st, abi::STATUS_INVALID, "non-zero CtrlHdr.flags");
            }
            if case.cmd == abi::CMD_QUERY_DEVICE && case.flags == 0 && full_hdr {
                let n = size_of::<abi::VrdmaConfig>();
                if case.writable >= 8 + n {
                    prop_assert_eq!(st, abi::STATUS_OK);
                    prop_assert_eq!(&written[8..8 + n], cfg.as_slice());
                } else {
                    prop_assert_eq!(st, abi::STATUS_BAD_LENGTH);
                }
            }
            if case.cmd > abi::CMD_SET_INTR_MODERATION && case.flags == 0 && full_hdr {
                prop_assert_eq!(st, abi::STATUS_UNSUPPORTED);
            }
        }
        // The device still answers and still carries traffic (rebuilt if the random command
        // legitimately destroyed or broke the reference objects).
        prop_assert_eq!(a.d.query_device().unwrap(), cfg);
        if *n % 4 == 0 && !try_write(a, b, *n) {
            rebuild(a, b);
            prop_assert!(try_write(a, b, *n + 1_000_000), "traffic after a rebuild");
        }
        Ok(())
    });
    let (mut a, mut b, _) = state.into_inner();
    if let Err(e) = result {
        panic!("{e}");
    }
    if !try_write(&mut a, &b, 42) {
        rebuild(&mut a, &mut b);
    }
    assert_eq!(a.d.query_device().unwrap(), cfg);
    still_works(&mut a, &mut b);
}

// ---------------------------------------------------------------------------------------------
// Property test: random bytes in SQ and RQ slots
// ---------------------------------------------------------------------------------------------

/// A random SGE: (lkey selector, address selector, offset, length).
type RandSge = (u8, u8, u32, u32);

#[derive(Clone, Debug)]
struct RandSend {
    bytes: Vec<u8>,
    opcode: u8,
    flags: u8,
    num_sge: u16,
    inline_len: u32,
    remote: (u8, u32),
    rkey: u8,
    ah: u8,
    rqpn: u8,
    qkey: u8,
    sges: Vec<RandSge>,
}

#[derive(Clone, Debug)]
struct RandRecv {
    bytes: Vec<u8>,
    num_sge: u32,
    sges: Vec<RandSge>,
}

#[derive(Clone, Debug)]
struct WqeCase {
    ud: bool,
    sends: [Vec<RandSend>; 2],
    recvs: [Vec<RandRecv>; 2],
}

fn rand_sge() -> impl Strategy<Value = RandSge> {
    (
        0u8..5,
        0u8..4,
        any::<u32>(),
        prop_oneof![4 => 0u32..=512, 1 => 0u32..=65537, 1 => any::<u32>()],
    )
}

fn rand_send() -> impl Strategy<Value = RandSend> {
    (
        proptest::collection::vec(any::<u8>(), 256),
        prop_oneof![6 => 0u8..=6, 1 => any::<u8>()],
        prop_oneof![6 => 0u8..16, 1 => any::<u8>()],
        prop_oneof![6 => 0u16..=6, 1 => any::<u16>()],
        prop_oneof![6 => 0u32..=80, 1 => any::<u32>()],
        (0u8..5, any::<u32>()),
        0u8..5,
        0u8..3,
        0u8..3,
        0u8..3,
        proptest::collection::vec(rand_sge(), 0..5),
    )
        .prop_map(
            |(bytes, opcode, flags, num_sge, inline_len, remote, rkey, ah, rqpn, qkey, sges)| {
                RandSend {
                    bytes,
                    opcode,
                    flags,
                    num_sge,
                    inline_len,
                    remote,
                    rkey,
                    ah,
                    rqpn,
                    qkey,
                    sges,
                }
            },
        )
}

fn rand_recv() -> impl Strategy<Value = RandRecv> {
    (
        proptest::collection::vec(any::<u8>(), 256),
        prop_oneof![6 => 0u32..=8, 1 => any::<u32>()],
        proptest::collection::vec(rand_sge(), 0..8),
    )
        .prop_map(|(bytes, num_sge, sges)| RandRecv {
            bytes,
            num_sge,
            sges,
        })
}

fn wqe_case() -> impl Strategy<Value = WqeCase> {
    let sends = || proptest::collection::vec(rand_send(), 0..5);
    let recvs = || proptest::collection::vec(rand_recv(), 0..5);
    (
        prop::bool::weighted(0.25),
        sends(),
        sends(),
        recvs(),
        recvs(),
    )
        .prop_map(|(ud, s0, s1, r0, r1)| WqeCase {
            ud,
            sends: [s0, s1],
            recvs: [r0, r1],
        })
}

/// One guest of the WQE property test: an MR over the middle third of a contiguous buffer,
/// whose outer thirds (and the guest's low memory) are canaries.
struct Guest {
    d: Driver,
    pd: Pd,
    buf: Buffer,
    mr: Mr,
    cq: Cq,
    ah: vrdma_guest::Ah,
    gid: Gid,
}

const MR_LEN: u64 = 64 << 10;
const LOW: (u64, u64) = (0x1000, ALLOC_BASE);

fn canary_seed(i: usize, part: u64) -> u64 {
    0xc0ffee + i as u64 * 10 + part
}

fn fill_canaries(g: &Guest, i: usize) {
    g.buf.fill_pattern(canary_seed(i, 0));
    g.buf.write(MR_LEN, &vec![0; MR_LEN as usize]);
    let low = pattern(canary_seed(i, 1), (LOW.1 - LOW.0) as usize);
    g.d.mem().write_slice(&low, GuestAddress(LOW.0)).unwrap();
}

fn canaries_intact(g: &Guest, i: usize) -> bool {
    let all = pattern(canary_seed(i, 0), 3 * MR_LEN as usize);
    let (m0, m1) = (MR_LEN as usize, 2 * MR_LEN as usize);
    let mut low = vec![0u8; (LOW.1 - LOW.0) as usize];
    g.d.mem().read_slice(&mut low, GuestAddress(LOW.0)).unwrap();
    g.buf.read_vec(0, m0) == all[..m0]
        && g.buf.read_vec(m1 as u64, m0) == all[m1..]
        && low == pattern(canary_seed(i, 1), low.len())
}

#[test]
fn proptest_random_wqes_complete_exactly_once_and_stay_inside_mrs() {
    let fabric = SoftFabric::new();
    let vms = [Vm::new(&fabric, 1), Vm::new(&fabric, 2)];
    let mut guests: Vec<Guest> = vms
        .iter()
        .map(|vm| {
            let d = driver(vm);
            let pd = d.alloc_pd().unwrap();
            let buf = d.alloc_buffer(3 * MR_LEN, Layout::Contiguous).unwrap();
            let mr = d
                .reg_mr_range(pd, &buf, MR_LEN, MR_LEN, ACCESS_ALL)
                .unwrap();
            let cq = d.create_cq(1024).unwrap();
            let gid = d.gid().unwrap();
            Guest {
                d,
                pd,
                buf,
                mr,
                cq,
                ah: vrdma_guest::Ah(0),
                gid,
            }
        })
        .collect();
    for i in 0..2 {
        let peer = guests[1 - i].gid;
        guests[i].ah = guests[i]
            .d
            .create_ah(guests[i].pd, &ah_attr_for(peer))
            .unwrap();
        fill_canaries(&guests[i], i);
    }
    let state = RefCell::new((guests, 0u64));
    let mut runner = TestRunner::new(PtConfig {
        cases: 48,
        failure_persistence: None,
        ..PtConfig::default()
    });
    let result = runner.run(&wqe_case(), |case| {
        let mut guard = state.borrow_mut();
        let (g, n) = &mut *guard;
        *n += 1;
        let qp_type = if case.ud { UD } else { RC };
        let mut qps: Vec<Qp> = g
            .iter()
            .map(|s| {
                let attr = QpInitAttr {
                    sq_sig_all: true,
                    ..qp_attr(qp_type, &s.cq)
                };
                s.d.create_qp(s.pd, &attr).unwrap()
            })
            .collect();
        for i in 0..2 {
            let (me, peer) = (&g[i], &g[1 - i]);
            if case.ud {
                me.d.connect_ud(&qps[i], QKEY).unwrap();
            } else {
                me.d.connect_rc_with(&qps[i], &fast(&me.d, qps[1 - i].qpn(), peer.gid))
                    .unwrap();
            }
        }
        let sge_of = |i: usize, (ks, asel, off, len): RandSge| -> Sge {
            let (me, peer) = (&g[i], &g[1 - i]);
            let lkey = match ks {
                0 => me.mr.lkey,
                1 => peer.mr.lkey,
                2 => 0,
                3 => me.mr.lkey ^ 0x100,
                _ => off,
            };
            let o = off as u64 % (MR_LEN + 1);
            let addr = match asel {
                0 => me.mr.iova + o,
                1 => me.mr.iova.wrapping_sub(1 + o % 64),
                2 => me.mr.iova + MR_LEN - o % 64,
                _ => (off as u64) << 20 ^ off as u64,
            };
            Sge {
                addr,
                length: len,
                lkey,
            }
        };
        let mut posted: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
        // Receives first (both sides), then sends.
        for i in 0..2 {
            let stride = qps[i].rq().stride();
            let p = qps[i].rq_prod();
            for (k, r) in case.recvs[i].iter().enumerate() {
                let wr_id = (*n << 16) | (i as u64) << 12 | 0x800 | k as u64;
                let mut slot = r.bytes[..stride as usize].to_vec();
                let hdr = RecvWqe {
                    wr_id,
                    num_sge: r.num_sge,
                    reserved: u32::from_le_bytes(slot[12..16].try_into().unwrap()),
                };
                slot[..16].copy_from_slice(hdr.as_slice());
                for (j, s) in r.sges.iter().enumerate() {
                    let at = 16 + j * 16;
                    if at + 16 <= slot.len() {
                        slot[at..at + 16].copy_from_slice(sge_of(i, *s).as_slice());
                    }
                }
                g[i].d.write_rq_slot(&qps[i], p + k as u32, &slot).unwrap();
                posted[i].push(wr_id);
            }
            g[i].d
                .set_rq_prod(&mut qps[i], p + case.recvs[i].len() as u32)
                .unwrap();
        }
        for i in 0..2 {
            let (me, peer) = (&g[i], &g[1 - i]);
            let stride = qps[i].sq().stride();
            let p = qps[i].sq_prod();
            for (k, w) in case.sends[i].iter().enumerate() {
                let wr_id = (*n << 16) | (i as u64) << 12 | k as u64;
                let mut slot = w.bytes[..stride as usize].to_vec();
                let mut hdr = SendWqe::from_slice(&slot[..64])
                    .copied()
                    .unwrap_or_default();
                hdr.wr_id = wr_id;
                hdr.opcode = w.opcode;
                hdr.flags = w.flags;
                hdr.num_sge = w.num_sge;
                hdr.inline_len = w.inline_len;
                let ro = w.remote.1 as u64 % (MR_LEN + 1);
                hdr.remote_addr = match w.remote.0 {
                    0 => peer.mr.iova + ro,
                    1 => peer.mr.iova + (ro & !7),
                    2 => peer.mr.iova.wrapping_sub(1 + ro % 64),
                    3 => peer.mr.iova + MR_LEN - ro % 64,
                    _ => hdr.remote_addr,
                };
                hdr.rkey = match w.rkey {
                    0 | 1 => peer.mr.rkey,
                    2 => me.mr.rkey,
                    3 => 0,
                    _ => hdr.rkey,
                };
                hdr.ah = match w.ah {
                    0 => me.ah.0,
                    1 => 0,
                    _ => hdr.ah,
                };
                hdr.remote_qpn = match w.rqpn {
                    0 => qps[1 - i].qpn(),
                    1 => qps[i].qpn(),
                    _ => hdr.remote_qpn,
                };
                if case.ud && w.qkey != 2 {
                    hdr.compare_add = QKEY as u64;
                }
                slot[..64].copy_from_slice(hdr.as_slice());
                if w.flags & abi::SEND_F_INLINE == 0 {
                    for (j, s) in w.sges.iter().enumerate() {
                        let at = 64 + j * 16;
                        if at + 16 <= slot.len() {
                            slot[at..at + 16].copy_from_slice(sge_of(i, *s).as_slice());
                        }
                    }
                }
                me.d.write_sq_slot(&qps[i], p + k as u32, &slot).unwrap();
                posted[i].push(wr_id);
            }
            me.d.set_sq_prod(&mut qps[i], p + case.sends[i].len() as u32)
                .unwrap();
        }
        for i in 0..2 {
            g[i].d
                .ring_sq_doorbell(abi::handle_index(qps[i].qpn()))
                .unwrap();
        }
        // Let the traffic run, then move both QPs to ERR to flush what is left.
        let mut got: [Vec<Cqe>; 2] = [Vec::new(), Vec::new()];
        let collect = |g: &mut Vec<Guest>, got: &mut [Vec<Cqe>; 2], until: Instant| loop {
            for i in 0..2 {
                let mut buf = [Cqe::default(); 64];
                let Guest { d, cq, .. } = &mut g[i];
                let k = d.poll_cq(cq, &mut buf);
                got[i].extend_from_slice(&buf[..k]);
            }
            if (0..2).all(|i| got[i].len() >= posted[i].len()) || Instant::now() >= until {
                return;
            }
            std::thread::yield_now();
        };
        collect(g, &mut got, Instant::now() + Duration::from_millis(50));
        let err = abi::QpAttr {
            qp_state: abi::QPS_ERR,
            ..Default::default()
        };
        for i in 0..2 {
            g[i].d.modify_qp(&qps[i], &err, abi::QP_ATTR_STATE).unwrap();
        }
        collect(g, &mut got, Instant::now() + WAIT);
        // Nothing more may come, not even when the QPs are destroyed.
        std::thread::sleep(Duration::from_millis(5));
        for i in 0..2 {
            g[i].d.destroy_qp(&mut qps[i]).unwrap();
        }
        collect(g, &mut got, Instant::now());
        for i in 0..2 {
            let mut ids: Vec<u64> = got[i].iter().map(|c| c.wr_id).collect();
            ids.sort_unstable();
            let mut want = posted[i].clone();
            want.sort_unstable();
            prop_assert_eq!(
                &ids,
                &want,
                "side {}: every WQE completes exactly once; CQEs {:?}",
                i,
                &got[i]
            );
            for c in &got[i] {
                prop_assert!(c.status <= abi::WC_GENERAL_ERR, "status {}", c.status);
            }
            prop_assert!(
                canaries_intact(&g[i], i),
                "side {i}: memory outside the MR changed"
            );
        }
        Ok(())
    });
    let (mut g, _) = state.into_inner();
    if let Err(e) = result {
        panic!("{e}");
    }
    // Afterwards a normal RDMA WRITE between the two guests works.
    let mut qps: Vec<Qp> = g
        .iter()
        .map(|s| s.d.create_qp(s.pd, &qp_attr(RC, &s.cq)).unwrap())
        .collect();
    for i in 0..2 {
        g[i].d
            .connect_rc_with(&qps[i], &fast(&g[i].d, qps[1 - i].qpn(), g[1 - i].gid))
            .unwrap();
    }
    let data = pattern(99, 4096);
    g[0].buf.write(MR_LEN, &data);
    let (mr0, mr1) = (g[0].mr, g[1].mr);
    g[0].d
        .post_send(
            &mut qps[0],
            &[SendWr::write(1, &[mr0.sge(0, 4096)], mr1.iova, mr1.rkey)],
        )
        .unwrap();
    let Guest { d, cq, .. } = &mut g[0];
    let c = wait1(d, cq);
    assert_eq!((c.wr_id, c.status), (1, abi::WC_SUCCESS));
    assert_eq!(g[1].buf.read_vec(MR_LEN, 4096), data);
}

// ---------------------------------------------------------------------------------------------
// Features the driver did not negotiate (ABI §3)
// ---------------------------------------------------------------------------------------------

#[test]
fn features_not_negotiated_are_refused() {
    let fabric = SoftFabric::new();
    let (va, vb) = (Vm::new(&fabric, 1), Vm::new(&fabric, 2));
    let d = driver_with(&va, 0);
    assert_eq!(d.features(), abi::VIRTIO_F_VERSION_1);
    let mut ck = Checks::default();
    let unsup = Some(abi::STATUS_UNSUPPORTED);
    let pd = d.alloc_pd().unwrap();
    let buf = d.alloc_buffer(BUF_LEN, Layout::Any).unwrap();
    ck.eq(
        "REG_MR with REMOTE_ATOMIC without VRDMA_F_ATOMICS",
        st_of(d.reg_mr(pd, &buf, ACCESS_ALL)),
        unsup,
    );
    let no_atomic = ACCESS_ALL & !abi::ACCESS_REMOTE_ATOMIC;
    let mr = d.reg_mr(pd, &buf, no_atomic).unwrap();
    let mut cq = d.create_cq(64).unwrap();
    ck.eq(
        "CREATE_QP UD without VRDMA_F_UD",
        st_of(d.create_qp(pd, &qp_attr(UD, &cq))),
        unsup,
    );
    ck.eq(
        "SET_INTR_MODERATION without VRDMA_F_INTR_MODERATION",
        st_of(d.set_intr_moderation(4, 100)),
        unsup,
    );
    let mut b = side(&vb, RC);
    let mut qp = d.create_qp(pd, &QpInitAttr::rc(&cq)).unwrap();
    let gid = d.gid().unwrap();
    // Explicitly: the driver's own defaults leave REMOTE_ATOMIC out without the feature.
    let with_atomic = RcParams {
        access_flags: abi::ACCESS_REMOTE_WRITE
            | abi::ACCESS_REMOTE_READ
            | abi::ACCESS_REMOTE_ATOMIC,
        ..fast(&d, b.qp.qpn(), b.gid)
    };
    let (attr, mask) = with_atomic.init_attr();
    ck.eq(
        "MODIFY_QP with REMOTE_ATOMIC access without VRDMA_F_ATOMICS",
        st_of(d.modify_qp(&qp, &attr, mask)),
        unsup,
    );
    let p = RcParams {
        access_flags: abi::ACCESS_REMOTE_WRITE | abi::ACCESS_REMOTE_READ,
        ..with_atomic
    };
    if d.qp_state(&qp).unwrap() != abi::QPS_RESET {
        d.modify_qp(&qp, &abi::QpAttr::default(), abi::QP_ATTR_STATE)
            .unwrap();
    }
    d.connect_rc_with(&qp, &p).unwrap();
    b.d.connect_rc_with(&b.qp, &fast(&b.d, qp.qpn(), gid))
        .unwrap();
    // An atomic WQE is malformed without VRDMA_F_ATOMICS (§3, §10.6).
    d.post_send(
        &mut qp,
        &[SendWr::fetch_add(
            1,
            &[mr.sge(0, 8)],
            b.mr.iova,
            b.mr.rkey,
            1,
        )],
    )
    .unwrap();
    let c = wait1(&d, &mut cq);
    ck.eq(
        "atomic WQE without VRDMA_F_ATOMICS",
        (c.status, c.vendor_err),
        (abi::WC_LOC_QP_OP_ERR, abi::VENDOR_ERR_BAD_WQE),
    );
    ck.eq("peer memory untouched by the atomic", b.buf.read_u64(0), 0);
    ck.eq(
        "DB_DEVICE_POLLING stays clear without VRDMA_F_DB_SUPPRESSION",
        d.device_flags().unwrap() & abi::DB_DEVICE_POLLING,
        0,
    );
    // The device still carries traffic for this driver.
    let _ = d.destroy_qp(&mut qp);
    drain(&d, &mut cq);
    b.d.destroy_qp(&mut b.qp).unwrap();
    drain(&b.d, &mut b.cq);
    let mut qp = d.create_qp(pd, &QpInitAttr::rc(&cq)).unwrap();
    b.qp = b.d.create_qp(b.pd, &QpInitAttr::rc(&b.cq)).unwrap();
    d.connect_rc_with(
        &qp,
        &RcParams {
            remote_qpn: b.qp.qpn(),
            ..p
        },
    )
    .unwrap();
    b.d.connect_rc_with(&b.qp, &fast(&b.d, qp.qpn(), gid))
        .unwrap();
    buf.fill_pattern(8);
    d.post_send(
        &mut qp,
        &[SendWr::write(2, &[mr.sge(0, 4096)], b.mr.iova, b.mr.rkey)],
    )
    .unwrap();
    let c = wait1(&d, &mut cq);
    assert_eq!((c.wr_id, c.status), (2, abi::WC_SUCCESS));
    assert_eq!(b.buf.read_vec(0, 4096), buf.read_vec(0, 4096));
    ck.finish();
}

/// With `VRDMA_F_CQ_NOTIFY` negotiated the doorbell area must also hold the CQ-notify bitmap
/// the device writes into: an area of the revision-1 size is refused when that is smaller, so
/// the device never ORs a bit past the end of what the driver registered.
#[test]
fn doorbell_area_must_hold_the_cq_notify_bitmap() {
    let fabric = SoftFabric::new();
    let cfg = DeviceConfig {
        max_qp: 127,
        max_cq: 32767,
        ..DeviceConfig::with_gid(DeviceConfig::gid_for_id(1))
    };
    let vm = Vm::with_config(&fabric, cfg);
    let mut raw = RawDev::new(&vm);
    raw.driver_ok();
    let old = abi::doorbell_area_min(127, 32767, 0);
    let new = abi::doorbell_area_min(127, 32767, abi::VRDMA_F_CQ_NOTIFY);
    assert!(old < new, "this configuration must tell the two apart");
    let set = |raw: &mut RawDev, len: u64| {
        let c = abi::CmdSetDoorbellArea { gpa: RAW_DB, len };
        raw.ctrl(abi::CMD_SET_DOORBELL_AREA, c.as_slice(), &[], 0).0
    };
    assert_eq!(set(&mut raw, old), abi::STATUS_INVALID);
    assert_eq!(set(&mut raw, new), abi::STATUS_OK);
}

// ---------------------------------------------------------------------------------------------
// One SGE in the WQE header (VRDMA_F_HDR_SGE, ABI §10.2)
// ---------------------------------------------------------------------------------------------

/// Writes `bad` and then `ok` into `a`'s SQ by hand, rings, and checks that `bad` completes in
/// error with `(status, vendor_err)`, `ok` is flushed behind it and the QP fails; nothing reaches
/// `b`. Then both QPs are replaced.
fn expect_bad_send(
    a: &mut Side,
    b: &mut Side,
    what: &str,
    bad: SendWqe,
    ok: SendWqe,
    status: u8,
    vendor: u32,
) {
    let stride = a.qp.sq().stride();
    let p = a.qp.sq_prod();
    a.d.write_sq_slot(&a.qp, p, &send_slot(bad, &[], stride))
        .unwrap();
    a.d.write_sq_slot(&a.qp, p + 1, &send_slot(ok, &[], stride))
        .unwrap();
    a.d.set_sq_prod(&mut a.qp, p + 2).unwrap();
    a.d.ring_sq_doorbell(sq_index(&a.qp)).unwrap();
    let v = wait_cqes(&a.d, &mut a.cq, 2);
    assert_eq!(v.len(), 2, "{what}: completions {v:?}");
    assert_eq!(
        (v[0].wr_id, v[0].status, v[0].vendor_err),
        (bad.wr_id, status, vendor),
        "{what}"
    );
    assert_eq!(
        (v[1].wr_id, v[1].status),
        (ok.wr_id, abi::WC_WR_FLUSH_ERR),
        "{what}"
    );
    assert_eq!(a.d.qp_state(&a.qp).unwrap(), abi::QPS_ERR, "{what}");
    assert!(b.buf.read_vec(0, 4096).iter().all(|&x| x == 0), "{what}");
    new_qps(a, b);
}

/// A signaled RDMA WRITE of `sge` to offset `off` of `to`'s buffer, its SGE in the header.
fn hdr_sge_write(wr_id: u64, to: &Side, off: u64, sge: Sge) -> SendWqe {
    let mut w = SendWqe {
        wr_id,
        opcode: abi::WR_RDMA_WRITE,
        flags: abi::SEND_F_SIGNALED,
        remote_addr: to.mr.addr(off),
        rkey: to.mr.rkey,
        ..Default::default()
    };
    w.set_hdr_sge(sge);
    w
}

/// RC QP attributes for one SGE and no inline data.
fn one_sge(cq: &Cq) -> QpInitAttr {
    QpInitAttr {
        max_send_sge: 1,
        max_inline: 0,
        ..qp_attr(RC, cq)
    }
}

/// A guest driver that accepts only `features` (of those the device offers).
fn driver_with(vm: &Vm, features: u64) -> Driver {
    let opts = vrdma_guest::DriverOptions {
        features,
        ..Default::default()
    };
    Driver::probe_with(
        vm.port(),
        vm.mem.clone(),
        GuestAlloc::new(GuestAddress(ALLOC_BASE), 200 << 20),
        opts,
    )
    .unwrap()
}

/// A WQE that carries its SGE in the header is checked like any other: the flag needs the
/// feature, an RC QP, exactly one SGE and no inline data, and the SGE itself its MR. A valid
/// one moves its bytes; a QP of one SGE gets 64-byte slots.
#[test]
fn hdr_sge_wqes_are_validated() {
    let (_f, mut a, mut b) = pair(RC);
    a.buf.fill_pattern(5);
    assert_ne!(a.d.features() & abi::VRDMA_F_HDR_SGE, 0);
    let w = hdr_sge_write(1, &b, 8192, a.mr.sge(100, 300));
    assert_eq!(
        (w.num_sge, w.flags & abi::SEND_F_HDR_SGE),
        (1, abi::SEND_F_HDR_SGE)
    );
    // Positive control, by hand: the SGE in the header is read and its bytes move.
    let stride = a.qp.sq().stride();
    let p = a.qp.sq_prod();
    a.d.write_sq_slot(&a.qp, p, &send_slot(w, &[], stride))
        .unwrap();
    a.d.set_sq_prod(&mut a.qp, p + 1).unwrap();
    a.d.ring_sq_doorbell(sq_index(&a.qp)).unwrap();
    let c = wait1(&a.d, &mut a.cq);
    assert_eq!((c.wr_id, c.status, c.byte_len), (1, abi::WC_SUCCESS, 0));
    assert_eq!(b.buf.read_vec(8192, 300), a.buf.read_vec(100, 300));
    b.buf.fill(0);
    let ok = SendWqe { wr_id: 99, ..w };
    let bad_wqe = (abi::WC_LOC_QP_OP_ERR, abi::VENDOR_ERR_BAD_WQE);
    let cases: Vec<(&str, SendWqe, (u8, u32))> = vec![
        (
            "num_sge 0",
            SendWqe {
                wr_id: 2,
                num_sge: 0,
                ..w
            },
            bad_wqe,
        ),
        (
            "num_sge 2",
            SendWqe {
                wr_id: 3,
                num_sge: 2,
                ..w
            },
            bad_wqe,
        ),
        (
            "with SEND_F_INLINE",
            SendWqe {
                wr_id: 4,
                flags: w.flags | abi::SEND_F_INLINE,
                ..w
            },
            bad_wqe,
        ),
        (
            "an SGE past its MR",
            SendWqe {
                wr_id: 5,
                hdr_sge_addr: a.mr.addr(BUF_LEN - 8),
                ..w
            },
            (abi::WC_LOC_PROT_ERR, abi::VENDOR_ERR_BAD_SGE),
        ),
        (
            "an SGE with a stale lkey",
            SendWqe {
                wr_id: 6,
                ah: a.mr.lkey ^ 0x100,
                ..w
            },
            (abi::WC_LOC_PROT_ERR, abi::VENDOR_ERR_BAD_SGE),
        ),
    ];
    for (what, bad, (status, vendor)) in cases {
        expect_bad_send(&mut a, &mut b, what, bad, ok, status, vendor);
    }
    // A QP of one SGE and no inline data: 64-byte slots, one SGE in caps, and all of a WQE's
    // kinds (here an atomic, whose operands share the header) go through.
    let mut q1 = a.d.create_qp(a.pd, &one_sge(&a.cq)).unwrap();
    let q2 = b.d.create_qp(b.pd, &qp_attr(RC, &b.cq)).unwrap();
    assert_eq!((q1.sq().stride(), q1.caps().max_send_sge), (64, 1));
    a.d.connect_rc_with(&q1, &fast(&a.d, q2.qpn(), b.gid))
        .unwrap();
    b.d.connect_rc_with(&q2, &fast(&b.d, q1.qpn(), a.gid))
        .unwrap();
    b.buf.write(0, &7u64.to_le_bytes());
    let res = [a.mr.sge(4096, 8)];
    a.d.post_send(
        &mut q1,
        &[vrdma_guest::SendWr::fetch_add(
            11,
            &res,
            b.mr.addr(0),
            b.mr.rkey,
            5,
        )],
    )
    .unwrap();
    let c = wait1(&a.d, &mut a.cq);
    assert_eq!((c.wr_id, c.status), (11, abi::WC_SUCCESS));
    assert_eq!(a.buf.read_u64(4096), 7);
    assert_eq!(b.buf.read_u64(0), 12);
    still_works(&mut a, &mut b);
}

/// The flag is refused on a UD QP, and on any QP of a driver that did not negotiate the feature.
#[test]
fn hdr_sge_needs_rc_and_the_feature() {
    let (_f, mut a, mut b) = pair(UD);
    let mut w = SendWqe {
        wr_id: 1,
        opcode: abi::WR_SEND,
        flags: abi::SEND_F_SIGNALED,
        ..Default::default()
    };
    w.set_hdr_sge(a.mr.sge(0, 64));
    let bad_wqe = (abi::WC_LOC_QP_OP_ERR, abi::VENDOR_ERR_BAD_WQE);
    let ok = SendWqe { wr_id: 99, ..w };
    expect_bad_send(&mut a, &mut b, "UD", w, ok, bad_wqe.0, bad_wqe.1);

    let fabric = SoftFabric::new();
    let (va, vb) = (Vm::new(&fabric, 1), Vm::new(&fabric, 2));
    let d = driver_with(&va, vrdma_guest::DRIVER_FEATURES & !abi::VRDMA_F_HDR_SGE);
    let mut a = side_from(d, RC);
    let mut b = side(&vb, RC);
    connect(&a, &b);
    assert_eq!(a.d.features() & abi::VRDMA_F_HDR_SGE, 0);
    let w = hdr_sge_write(2, &b, 0, a.mr.sge(0, 64));
    let ok = SendWqe { wr_id: 98, ..w };
    expect_bad_send(
        &mut a,
        &mut b,
        "not negotiated",
        w,
        ok,
        bad_wqe.0,
        bad_wqe.1,
    );
    // Without the feature a QP of one SGE keeps room for it after the header: a 128-byte
    // slot, which holds four.
    let q = a.d.create_qp(a.pd, &one_sge(&a.cq)).unwrap();
    assert_eq!((q.sq().stride(), q.caps().max_send_sge), (128, 4));
    still_works(&mut a, &mut b);
}
