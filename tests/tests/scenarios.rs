//! Scenario tests: two guests (separate guest memories and devices) on one soft fabric, driven
//! through the real virtio-mmio transport by the guest driver. Every test builds its own fabric.
//!
//! Data is compared byte for byte, and completions are counted exactly: after the expected CQEs
//! each check also waits a little to make sure no further CQE shows up.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use vrdma_abi as abi;
use vrdma_abi::{Cqe, Event, Gid, Sge};
use vrdma_device::soft::{FabricStats, SoftFabric};
use vrdma_device::DeviceConfig;
use vrdma_guest::{
    ah_attr_for, pattern, Ah, Buffer, Cq, Driver, Error, Layout, Mr, Pd, Qp, QpInitAttr, RcParams,
    RecvWr, SendWr,
};
use vrdma_tests::Vm;

const OK: u8 = abi::WC_SUCCESS;
const FLUSH: u8 = abi::WC_WR_FLUSH_ERR;

// ---------------------------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------------------------

/// One guest's verbs context: driver, a PD, one buffer with an all-access MR, one CQ.
struct Node {
    d: Arc<Driver>,
    pd: Pd,
    buf: Buffer,
    mr: Mr,
    cq: Cq,
}

fn node(vm: &Vm, buf_len: u64) -> Node {
    let d = Arc::new(driver(vm));
    let pd = d.alloc_pd().unwrap();
    let buf = d.alloc_buffer(buf_len, Layout::Discontiguous).unwrap();
    let mr = d.reg_mr(pd, &buf, abi::ACCESS_ALL).unwrap();
    let cq = d.create_cq(256).unwrap();
    Node { d, pd, buf, mr, cq }
}

impl Node {
    /// A QP on this node's CQ (both queues), RC with the driver defaults unless `f` changes it.
    fn qp(&self, f: impl FnOnce(&mut QpInitAttr)) -> Qp {
        let mut attr = QpInitAttr::rc(&self.cq);
        f(&mut attr);
        self.d.create_qp(self.pd, &attr).unwrap()
    }

    fn gid(&self) -> Gid {
        self.d.gid().unwrap()
    }

    /// RC parameters towards `peer` on `peer_qp`, modified by `f`.
    fn params(&self, peer: &Node, peer_qp: &Qp, f: impl FnOnce(&mut RcParams)) -> RcParams {
        let mut p = self.d.rc_params(peer_qp.qpn(), peer.gid());
        f(&mut p);
        p
    }
}

/// A fabric with two guests (GIDs for ids 1 and 2), each with a `buf_len` buffer.
fn two(buf_len: u64) -> (Arc<SoftFabric>, Node, Node) {
    let fabric = SoftFabric::new();
    let a = node(&Vm::new(&fabric, 1), buf_len);
    let b = node(&Vm::new(&fabric, 2), buf_len);
    (fabric, a, b)
}

fn connect_with(
    a: &Node,
    qa: &Qp,
    b: &Node,
    qb: &Qp,
    fa: impl FnOnce(&mut RcParams),
    fb: impl FnOnce(&mut RcParams),
) {
    let pa = a.params(b, qb, fa);
    let pb = b.params(a, qa, fb);
    a.d.connect_rc_with(qa, &pa).unwrap();
    b.d.connect_rc_with(qb, &pb).unwrap();
}

fn connect(a: &Node, qa: &Qp, b: &Node, qb: &Qp) {
    connect_with(a, qa, b, qb, |_| {}, |_| {});
}

/// A connected RC pair with default attributes.
fn rc_pair(a: &Node, b: &Node) -> (Qp, Qp) {
    let qa = a.qp(|_| {});
    let qb = b.qp(|_| {});
    connect(a, &qa, b, &qb);
    (qa, qb)
}

/// Takes a fresh RC QP through the transitions up to `state` (INIT, RTR or RTS).
fn rc_to_state(d: &Driver, qp: &Qp, p: &RcParams, state: u32) {
    let steps = [p.init_attr(), p.rtr_attr(), p.rts_attr()];
    for (attr, mask) in steps.iter().take(state as usize) {
        d.modify_qp(qp, attr, *mask).unwrap();
    }
    assert_eq!(d.qp_state(qp).unwrap(), state);
}

/// Waits until the device reports `state` for `qp` (bounded), then asserts it.
#[track_caller]
fn assert_state_soon(d: &Driver, qp: &Qp, state: u32) {
    wait_until(LONG, || d.qp_state(qp).unwrap() == state);
    assert_eq!(d.qp_state(qp).unwrap(), state, "QP {:#x}", qp.qpn());
}

#[track_caller]
fn assert_status(r: Result<(), Error>, status: u32) {
    match r {
        Err(e) => assert_eq!(e.status(), Some(status), "{e}"),
        Ok(()) => panic!("succeeded, expected status {status}"),
    }
}

#[track_caller]
fn assert_no_events(d: &Driver, quiet: Duration) {
    let ev = events_until_quiet(d, quiet);
    assert!(ev.is_empty(), "unexpected events: {ev:?}");
}

fn fatal_events(ev: &[Event], qpn: u32) -> Vec<u64> {
    ev.iter()
        .filter(|e| e.kind == abi::EV_QP_FATAL && e.handle == qpn)
        .map(|e| e.detail)
        .collect()
}

fn cq_events(ev: &[Event], cqn: u32) -> usize {
    ev.iter()
        .filter(|e| e.kind == abi::EV_CQ_COMP && e.handle == cqn)
        .count()
}

fn concat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.iter().flatten().copied().collect()
}

// ---------------------------------------------------------------------------------------------
// 1. Every RC opcode
// ---------------------------------------------------------------------------------------------

#[test]
fn rc_send_and_send_with_imm() {
    let (_f, mut a, mut b) = two(64 << 10);
    let (mut qa, mut qb) = rc_pair(&a, &b);
    a.buf.fill_pattern(1);
    b.buf.fill(0xee);
    b.d.post_recv(
        &mut qb,
        &[
            RecvWr::new(100, &[b.mr.sge(0, 4096)]),
            RecvWr::new(101, &[b.mr.sge(8192, 4096)]),
        ],
    )
    .unwrap();
    a.d.post_send(
        &mut qa,
        &[
            SendWr::send(1, &[a.mr.sge(10, 1000)]),
            SendWr::send_imm(2, &[a.mr.sge(3000, 2000)], 0xdead_beef),
        ],
    )
    .unwrap();
    let sc = poll_exact(&a.d, &mut a.cq, 2);
    assert_eq!(
        sc.iter().map(key).collect::<Vec<_>>(),
        [(1, OK, abi::WC_OP_SEND), (2, OK, abi::WC_OP_SEND)]
    );
    assert!(sc.iter().all(|c| c.qpn == qa.qpn()), "{sc:?}");
    let rc = poll_exact(&b.d, &mut b.cq, 2);
    let r = |c: &Cqe| (c.wr_id, c.status, c.opcode, c.byte_len, c.wc_flags, c.qpn);
    assert_eq!(r(&rc[0]), (100, OK, abi::WC_OP_RECV, 1000, 0, qb.qpn()));
    assert_eq!(
        r(&rc[1]),
        (101, OK, abi::WC_OP_RECV, 2000, abi::WC_F_WITH_IMM, qb.qpn())
    );
    assert_eq!(rc[1].imm_data, 0xdead_beef);
    assert_eq!(b.buf.read_vec(0, 1000), a.buf.read_vec(10, 1000));
    assert_eq!(b.buf.read_vec(1000, 3096), vec![0xee; 3096]);
    assert_eq!(b.buf.read_vec(8192, 2000), a.buf.read_vec(3000, 2000));
    assert_eq!(b.buf.read_vec(10192, 2096), vec![0xee; 2096]);

    // And the other direction, on the same connection.
    a.d.post_recv(&mut qa, &[RecvWr::new(7, &[a.mr.sge(40000, 300)])])
        .unwrap();
    b.d.post_send(&mut qb, &[SendWr::send(8, &[b.mr.sge(0, 300)])])
        .unwrap();
    assert_eq!(
        key(&poll_exact(&b.d, &mut b.cq, 1)[0]),
        (8, OK, abi::WC_OP_SEND)
    );
    let c = poll_exact(&a.d, &mut a.cq, 1)[0];
    assert_eq!(
        (c.wr_id, c.status, c.opcode, c.byte_len, c.qpn),
        (7, OK, abi::WC_OP_RECV, 300, qa.qpn())
    );
    assert_eq!(a.buf.read_vec(40000, 300), b.buf.read_vec(0, 300));
}

#[test]
fn rc_rdma_write_and_write_with_imm() {
    let (_f, mut a, mut b) = two(64 << 10);
    let (mut qa, mut qb) = rc_pair(&a, &b);
    a.buf.fill_pattern(2);
    b.buf.fill(0xee);

    // Plain WRITE: no receive consumed, nothing at the responder's CQ.
    a.d.post_send(
        &mut qa,
        &[SendWr::write(
            1,
            &[a.mr.sge(0, 5000)],
            b.mr.addr(100),
            b.mr.rkey,
        )],
    )
    .unwrap();
    assert_eq!(
        key(&poll_exact(&a.d, &mut a.cq, 1)[0]),
        (1, OK, abi::WC_OP_RDMA_WRITE)
    );
    assert_cq_empty(&b.d, &mut b.cq, QUIET);
    assert_eq!(b.buf.read_vec(100, 5000), a.buf.read_vec(0, 5000));
    assert_eq!(b.buf.read_vec(0, 100), vec![0xee; 100]);
    assert_eq!(b.buf.read_vec(5100, 100), vec![0xee; 100]);

    // WRITE with immediate: consumes one receive (its SGEs are not used, and it may have none).
    b.d.post_recv(
        &mut qb,
        &[
            RecvWr::new(200, &[b.mr.sge(60000, 16)]),
            RecvWr::new(201, &[]),
        ],
    )
    .unwrap();
    a.d.post_send(
        &mut qa,
        &[
            SendWr::write_imm(
                2,
                &[a.mr.sge(5000, 3000)],
                b.mr.addr(20000),
                b.mr.rkey,
                0x0102_0304,
            ),
            SendWr::write_imm(
                3,
                &[a.mr.sge(9000, 123)],
                b.mr.addr(30000),
                b.mr.rkey,
                0xa0b0_c0d0,
            ),
        ],
    )
    .unwrap();
    assert_eq!(
        poll_exact(&a.d, &mut a.cq, 2)
            .iter()
            .map(key)
            .collect::<Vec<_>>(),
        [
            (2, OK, abi::WC_OP_RDMA_WRITE),
            (3, OK, abi::WC_OP_RDMA_WRITE)
        ]
    );
    let rc = poll_exact(&b.d, &mut b.cq, 2);
    let r = |c: &Cqe| {
        (
            c.wr_id, c.status, c.opcode, c.byte_len, c.wc_flags, c.imm_data,
        )
    };
    assert_eq!(
        r(&rc[0]),
        (
            200,
            OK,
            abi::WC_OP_RECV_RDMA_WITH_IMM,
            3000,
            abi::WC_F_WITH_IMM,
            0x0102_0304
        )
    );
    assert_eq!(
        r(&rc[1]),
        (
            201,
            OK,
            abi::WC_OP_RECV_RDMA_WITH_IMM,
            123,
            abi::WC_F_WITH_IMM,
            0xa0b0_c0d0
        )
    );
    assert_eq!(b.buf.read_vec(20000, 3000), a.buf.read_vec(5000, 3000));
    assert_eq!(b.buf.read_vec(30000, 123), a.buf.read_vec(9000, 123));
    assert_eq!(
        b.buf.read_vec(60000, 16),
        vec![0xee; 16],
        "receive SGE was written"
    );
}

#[test]
fn rc_rdma_read_into_scatter_list() {
    let (_f, mut a, b) = two(64 << 10);
    let (mut qa, _qb) = rc_pair(&a, &b);
    b.buf.fill_pattern(3);
    a.buf.fill(0xee);
    let sges = [a.mr.sge(0, 1), a.mr.sge(5000, 4097), a.mr.sge(20000, 9000)];
    a.d.post_send(
        &mut qa,
        &[SendWr::read(1, &sges, b.mr.addr(777), b.mr.rkey)],
    )
    .unwrap();
    let c = poll_exact(&a.d, &mut a.cq, 1)[0];
    assert_eq!(
        (c.wr_id, c.status, c.opcode, c.byte_len, c.qpn),
        (1, OK, abi::WC_OP_RDMA_READ, 1 + 4097 + 9000, qa.qpn())
    );
    let remote = b.buf.read_vec(777, 13098);
    assert_eq!(a.buf.read_vec(0, 1), remote[..1]);
    assert_eq!(a.buf.read_vec(5000, 4097), remote[1..4098]);
    assert_eq!(a.buf.read_vec(20000, 9000), remote[4098..]);
    assert_eq!(a.buf.read_vec(1, 4999), vec![0xee; 4999]);
    assert_eq!(a.buf.read_vec(9097, 10903), vec![0xee; 10903]);
    assert_eq!(a.buf.read_vec(29000, 1000), vec![0xee; 1000]);
}

#[test]
fn rc_atomics_cmp_swap_and_fetch_add() {
    let (_f, mut a, b) = two(64 << 10);
    let (mut qa, _qb) = rc_pair(&a, &b);
    b.buf.fill(0xee);
    a.buf.fill(0xee);
    b.buf.write_u64(64, 0x1111_2222_3333_4444);

    // Compare matches: swapped, original returned.
    let s0 = [a.mr.sge(0, 8)];
    let s1 = [a.mr.sge(8, 8)];
    a.d.post_send(
        &mut qa,
        &[
            SendWr::cmp_swap(
                1,
                &s0,
                b.mr.addr(64),
                b.mr.rkey,
                0x1111_2222_3333_4444,
                0x5555,
            ),
            // Compare fails (the value is 0x5555 now): nothing stored, original returned.
            SendWr::cmp_swap(
                2,
                &s1,
                b.mr.addr(64),
                b.mr.rkey,
                0x1111_2222_3333_4444,
                0x6666,
            ),
        ],
    )
    .unwrap();
    let v = poll_exact(&a.d, &mut a.cq, 2);
    for (c, id) in v.iter().zip([1, 2]) {
        assert_eq!(
            (c.wr_id, c.status, c.opcode, c.byte_len),
            (id, OK, abi::WC_OP_COMP_SWAP, 8)
        );
    }
    assert_eq!(a.buf.read_u64(0), 0x1111_2222_3333_4444);
    assert_eq!(a.buf.read_u64(8), 0x5555);
    assert_eq!(b.buf.read_u64(64), 0x5555);

    // Several fetch-and-adds in one batch, wrapping past u64::MAX.
    let start = u64::MAX - 5;
    b.buf.write_u64(128, start);
    let sinks: Vec<[Sge; 1]> = (0..8).map(|i| [a.mr.sge(64 + 8 * i, 8)]).collect();
    let wrs: Vec<SendWr> = (0..8u64)
        .map(|i| SendWr::fetch_add(10 + i, &sinks[i as usize], b.mr.addr(128), b.mr.rkey, i + 1))
        .collect();
    a.d.post_send(&mut qa, &wrs).unwrap();
    let v = poll_exact(&a.d, &mut a.cq, 8);
    let mut expect = start;
    for (i, c) in v.iter().enumerate() {
        assert_eq!(
            (c.wr_id, c.status, c.opcode, c.byte_len),
            (10 + i as u64, OK, abi::WC_OP_FETCH_ADD, 8)
        );
        assert_eq!(a.buf.read_u64(64 + 8 * i as u64), expect, "original #{i}");
        expect = expect.wrapping_add(i as u64 + 1);
    }
    assert_eq!(b.buf.read_u64(128), start.wrapping_add(36));
    // Only the 8 target bytes changed.
    assert_eq!(b.buf.read_vec(120, 8), vec![0xee; 8]);
    assert_eq!(b.buf.read_vec(136, 8), vec![0xee; 8]);
    assert_eq!(b.buf.read_vec(56, 8), vec![0xee; 8]);
    assert_eq!(b.buf.read_vec(72, 8), vec![0xee; 8]);
}

// ---------------------------------------------------------------------------------------------
// 2. Inline, multi-SGE, zero length, large transfers, 2 MiB pages
// ---------------------------------------------------------------------------------------------

#[test]
fn inline_send_and_write_up_to_max_inline() {
    let (_f, mut a, mut b) = two(64 << 10);
    let mut qa = a.qp(|x| x.max_inline = 256);
    let mut qb = b.qp(|_| {});
    connect(&a, &qa, &b, &qb);
    let cfg = *a.d.config();
    let max = qa.caps().max_inline;
    assert!(max >= 256, "max_inline {max}");
    assert_eq!(max, (qa.sq().stride() - 64).min(cfg.max_inline));
    assert_eq!(a.d.query_qp(&qa).unwrap().max_inline_data, max);

    b.buf.fill(0xee);
    let full = pattern(5, max as usize);
    b.d.post_recv(
        &mut qb,
        &[
            RecvWr::new(1, &[b.mr.sge(0, 4096)]),
            RecvWr::new(2, &[b.mr.sge(4096, 16)]),
        ],
    )
    .unwrap();
    a.d.post_send(
        &mut qa,
        &[
            SendWr::send_inline(10, &full),
            SendWr::send_inline(11, b"x").with_imm(0x77),
            SendWr::write_inline(12, &full, b.mr.addr(8192), b.mr.rkey),
            SendWr::write_inline(13, &full[..17], b.mr.addr(16384), b.mr.rkey),
        ],
    )
    .unwrap();
    assert_eq!(
        poll_exact(&a.d, &mut a.cq, 4)
            .iter()
            .map(key)
            .collect::<Vec<_>>(),
        [
            (10, OK, abi::WC_OP_SEND),
            (11, OK, abi::WC_OP_SEND),
            (12, OK, abi::WC_OP_RDMA_WRITE),
            (13, OK, abi::WC_OP_RDMA_WRITE)
        ]
    );
    let rc = poll_exact(&b.d, &mut b.cq, 2);
    assert_eq!((rc[0].wr_id, rc[0].status, rc[0].byte_len), (1, OK, max));
    assert_eq!(
        (rc[1].wr_id, rc[1].status, rc[1].byte_len, rc[1].imm_data),
        (2, OK, 1, 0x77)
    );
    assert_eq!(b.buf.read_vec(0, max as usize), full);
    assert_eq!(b.buf.read_vec(max as u64, 1), [0xee]);
    assert_eq!(b.buf.read_vec(4096, 2), [b'x', 0xee]);
    assert_eq!(b.buf.read_vec(8192, max as usize), full);
    assert_eq!(
        b.buf.read_vec(16384, 18),
        [&full[..17], &[0xee][..]].concat()
    );

    // One byte more than max_inline: the driver refuses, nothing is posted.
    let long = pattern(6, max as usize + 1);
    assert!(matches!(
        a.d.post_send(&mut qa, &[SendWr::send_inline(14, &long)]),
        Err(Error::InvalidWr { .. })
    ));
    assert_cq_empty(&a.d, &mut a.cq, QUIET);
}

#[test]
fn multi_sge_gather_and_scatter_uneven() {
    let (_f, mut a, mut b) = two(64 << 10);
    let (mut qa, mut qb) = rc_pair(&a, &b);
    a.buf.fill_pattern(7);
    b.buf.fill(0xee);
    // Gather: 4 SGEs of uneven lengths, one across a page boundary, out of order in memory.
    let gather = [
        a.mr.sge(1, 1),
        a.mr.sge(4090, 4095),
        a.mr.sge(20000, 7),
        a.mr.sge(9000, 3000),
    ];
    let total: u32 = gather.iter().map(|s| s.length).sum();
    let expect = concat(&[
        a.buf.read_vec(1, 1),
        a.buf.read_vec(4090, 4095),
        a.buf.read_vec(20000, 7),
        a.buf.read_vec(9000, 3000),
    ]);
    // Scatter: 3 SGEs of uneven lengths; the last one is only partly filled.
    let scatter = [b.mr.sge(5, 10), b.mr.sge(4000, 5000), b.mr.sge(30000, 4000)];
    b.d.post_recv(&mut qb, &[RecvWr::new(50, &scatter)])
        .unwrap();
    a.d.post_send(&mut qa, &[SendWr::send(1, &gather)]).unwrap();
    assert_eq!(
        key(&poll_exact(&a.d, &mut a.cq, 1)[0]),
        (1, OK, abi::WC_OP_SEND)
    );
    let c = poll_exact(&b.d, &mut b.cq, 1)[0];
    assert_eq!((c.wr_id, c.status, c.byte_len), (50, OK, total));
    let t = total as usize;
    assert_eq!(b.buf.read_vec(5, 10), expect[..10]);
    assert_eq!(b.buf.read_vec(4000, 5000), expect[10..5010]);
    assert_eq!(b.buf.read_vec(30000, t - 5010), expect[5010..]);
    assert_eq!(
        b.buf.read_vec(30000 + (t - 5010) as u64, 4000 - (t - 5010)),
        vec![0xee; 4000 - (t - 5010)]
    );
    assert_eq!(b.buf.read_vec(0, 5), vec![0xee; 5]);
    assert_eq!(b.buf.read_vec(15, 3985), vec![0xee; 3985]);

    // Gather list on an RDMA WRITE.
    a.d.post_send(
        &mut qa,
        &[SendWr::write(2, &gather, b.mr.addr(40000), b.mr.rkey)],
    )
    .unwrap();
    assert_eq!(
        key(&poll_exact(&a.d, &mut a.cq, 1)[0]),
        (2, OK, abi::WC_OP_RDMA_WRITE)
    );
    assert_eq!(b.buf.read_vec(40000, t), expect);
    assert_eq!(b.buf.read_vec(40000 + t as u64, 8), vec![0xee; 8]);
}

#[test]
fn zero_length_send_write_and_read() {
    let (_f, mut a, mut b) = two(64 << 10);
    let (mut qa, mut qb) = rc_pair(&a, &b);
    a.buf.fill_pattern(8);
    b.buf.fill(0xee);
    b.d.post_recv(
        &mut qb,
        &[
            RecvWr::new(50, &[b.mr.sge(0, 64)]),
            RecvWr::new(51, &[]),
            RecvWr::new(52, &[b.mr.sge(64, 64)]),
        ],
    )
    .unwrap();
    a.d.post_send(
        &mut qa,
        &[
            // No SGE at all, and one zero-length SGE.
            SendWr::send(1, &[]),
            SendWr::send(2, &[a.mr.sge(0, 0)]),
            // Zero-length WRITEs: no memory access, the responder checks neither rkey nor
            // address.
            SendWr::write(3, &[], b.mr.addr(0), b.mr.rkey),
            SendWr::write(4, &[], 0xdead_0000, b.mr.rkey ^ 0x5500),
            SendWr::write_imm(5, &[], b.mr.addr(0), b.mr.rkey, 0x1234),
            SendWr::read(6, &[], 0xbad0_0000, 0x4242),
        ],
    )
    .unwrap();
    assert_eq!(
        poll_exact(&a.d, &mut a.cq, 6)
            .iter()
            .map(|c| (c.wr_id, c.status, c.opcode))
            .collect::<Vec<_>>(),
        [
            (1, OK, abi::WC_OP_SEND),
            (2, OK, abi::WC_OP_SEND),
            (3, OK, abi::WC_OP_RDMA_WRITE),
            (4, OK, abi::WC_OP_RDMA_WRITE),
            (5, OK, abi::WC_OP_RDMA_WRITE),
            (6, OK, abi::WC_OP_RDMA_READ)
        ]
    );
    let rc = poll_exact(&b.d, &mut b.cq, 3);
    let r = |c: &Cqe| (c.wr_id, c.status, c.opcode, c.byte_len, c.wc_flags);
    assert_eq!(r(&rc[0]), (50, OK, abi::WC_OP_RECV, 0, 0));
    assert_eq!(r(&rc[1]), (51, OK, abi::WC_OP_RECV, 0, 0));
    assert_eq!(
        r(&rc[2]),
        (52, OK, abi::WC_OP_RECV_RDMA_WITH_IMM, 0, abi::WC_F_WITH_IMM)
    );
    assert_eq!(rc[2].imm_data, 0x1234);
    assert_eq!(b.buf.to_vec(), vec![0xee; 64 << 10]);
    assert_eq!(a.d.qp_state(&qa).unwrap(), abi::QPS_RTS);
    assert_eq!(b.d.qp_state(&qb).unwrap(), abi::QPS_RTS);
}

#[test]
fn four_mib_write_read_send_across_discontiguous_pages() {
    const N: u64 = 4 << 20;
    let (_f, mut a, mut b) = two(N);
    for buf in [&a.buf, &b.buf] {
        assert!(
            buf.pages().windows(2).all(|w| w[1] != w[0] + 4096),
            "buffer pages are contiguous somewhere"
        );
    }
    let (mut qa, mut qb) = rc_pair(&a, &b);

    // WRITE a → b.
    a.buf.fill_pattern(81);
    a.d.post_send(
        &mut qa,
        &[SendWr::write(1, &[a.mr.sge_all()], b.mr.iova, b.mr.rkey)],
    )
    .unwrap();
    assert_eq!(
        key(&poll_exact(&a.d, &mut a.cq, 1)[0]),
        (1, OK, abi::WC_OP_RDMA_WRITE)
    );
    assert!(
        b.buf.to_vec() == pattern(81, N as usize),
        "WRITE data differs"
    );

    // READ b → a.
    b.buf.fill_pattern(82);
    a.buf.fill(0);
    a.d.post_send(
        &mut qa,
        &[SendWr::read(2, &[a.mr.sge_all()], b.mr.iova, b.mr.rkey)],
    )
    .unwrap();
    let c = poll_exact(&a.d, &mut a.cq, 1)[0];
    assert_eq!(
        (c.wr_id, c.status, c.opcode, c.byte_len),
        (2, OK, abi::WC_OP_RDMA_READ, N as u32)
    );
    assert!(
        a.buf.to_vec() == pattern(82, N as usize),
        "READ data differs"
    );

    // SEND/RECV a → b.
    a.buf.fill_pattern(83);
    b.buf.fill(0);
    b.d.post_recv(&mut qb, &[RecvWr::new(3, &[b.mr.sge_all()])])
        .unwrap();
    a.d.post_send(&mut qa, &[SendWr::send(4, &[a.mr.sge_all()])])
        .unwrap();
    assert_eq!(
        key(&poll_exact(&a.d, &mut a.cq, 1)[0]),
        (4, OK, abi::WC_OP_SEND)
    );
    let c = poll_exact(&b.d, &mut b.cq, 1)[0];
    assert_eq!(
        (c.wr_id, c.status, c.opcode, c.byte_len),
        (3, OK, abi::WC_OP_RECV, N as u32)
    );
    assert!(
        b.buf.to_vec() == pattern(83, N as usize),
        "SEND data differs"
    );
}

#[test]
fn mrs_with_2mib_pages() {
    const N: u64 = 4 << 20;
    const HUGE: u64 = 2 << 20;
    let (_f, mut a, mut b) = two(1 << 20);
    assert_ne!(a.d.config().page_size_cap & (1 << 21), 0, "no 2 MiB pages");
    let (mut qa, mut qb) = rc_pair(&a, &b);
    let ha =
        a.d.alloc_buffer_with_page_shift(N, 21, Layout::Discontiguous)
            .unwrap();
    let hb =
        b.d.alloc_buffer_with_page_shift(N, 21, Layout::Discontiguous)
            .unwrap();
    assert_eq!((ha.pages().len(), hb.pages().len()), (2, 2));
    assert_ne!(hb.pages()[1], hb.pages()[0] + HUGE, "2 MiB pages adjacent");
    let mra = a.d.reg_mr(a.pd, &ha, abi::ACCESS_ALL).unwrap();
    let mrb = b.d.reg_mr(b.pd, &hb, abi::ACCESS_ALL).unwrap();
    ha.fill_pattern(21);
    hb.fill(0xee);

    // WRITE 3 MiB crossing the 2 MiB page boundary on both sides, at unaligned offsets.
    let (src, dst, len) = (HUGE - (1 << 20) - 3, 512 * 1024 + 5, 3u64 << 20);
    a.d.post_send(
        &mut qa,
        &[SendWr::write(
            1,
            &[mra.sge(src, len as u32)],
            mrb.addr(dst),
            mrb.rkey,
        )],
    )
    .unwrap();
    assert_eq!(
        key(&poll_exact(&a.d, &mut a.cq, 1)[0]),
        (1, OK, abi::WC_OP_RDMA_WRITE)
    );
    assert!(hb.read_vec(dst, len as usize) == ha.read_vec(src, len as usize));
    assert_eq!(hb.read_vec(dst - 5, 5), vec![0xee; 5]);
    assert_eq!(hb.read_vec(dst + len, 5), vec![0xee; 5]);

    // READ from the 2 MiB-page MR into the 4 KiB-page (discontiguous) MR.
    a.buf.fill(0);
    a.d.post_send(
        &mut qa,
        &[SendWr::read(
            2,
            &[a.mr.sge_all()],
            mrb.addr(HUGE - 4000),
            mrb.rkey,
        )],
    )
    .unwrap();
    let c = poll_exact(&a.d, &mut a.cq, 1)[0];
    assert_eq!((c.wr_id, c.status, c.byte_len), (2, OK, a.mr.len as u32));
    assert!(a.buf.to_vec() == hb.read_vec(HUGE - 4000, a.mr.len as usize));

    // A sub-range MR whose iova is not page aligned and which straddles the 2 MiB boundary.
    let sub =
        b.d.reg_mr_range(b.pd, &hb, HUGE - 100, 200, abi::ACCESS_ALL)
            .unwrap();
    assert_eq!(sub.iova, hb.addr(HUGE - 100));
    a.d.post_send(
        &mut qa,
        &[SendWr::write(3, &[mra.sge(0, 200)], sub.iova, sub.rkey)],
    )
    .unwrap();
    assert_eq!(
        key(&poll_exact(&a.d, &mut a.cq, 1)[0]),
        (3, OK, abi::WC_OP_RDMA_WRITE)
    );
    assert_eq!(hb.read_vec(HUGE - 100, 200), ha.read_vec(0, 200));

    // SEND into a receive buffer in the 2 MiB-page MR.
    b.d.post_recv(&mut qb, &[RecvWr::new(9, &[mrb.sge(HUGE - 10, 5000)])])
        .unwrap();
    a.d.post_send(&mut qa, &[SendWr::send(4, &[mra.sge(HUGE + 7, 5000)])])
        .unwrap();
    assert_eq!(
        key(&poll_exact(&a.d, &mut a.cq, 1)[0]),
        (4, OK, abi::WC_OP_SEND)
    );
    let c = poll_exact(&b.d, &mut b.cq, 1)[0];
    assert_eq!((c.wr_id, c.status, c.byte_len), (9, OK, 5000));
    assert_eq!(hb.read_vec(HUGE - 10, 5000), ha.read_vec(HUGE + 7, 5000));
}

// ---------------------------------------------------------------------------------------------
// 3. UD
// ---------------------------------------------------------------------------------------------

const QKEY_B: u32 = 0x2222_0002;

/// Two UD QPs (a: Q_Key 0x1111_0001, b: `QKEY_B`) and an AH on `a` towards `b`.
fn ud_pair(a: &Node, b: &Node) -> (Qp, Qp, Ah) {
    let qa = a.qp(|x| x.qp_type = abi::QPT_UD);
    let qb = b.qp(|x| x.qp_type = abi::QPT_UD);
    a.d.connect_ud(&qa, 0x1111_0001).unwrap();
    b.d.connect_ud(&qb, QKEY_B).unwrap();
    let ah = a.d.create_ah(a.pd, &ah_attr_for(b.gid())).unwrap();
    (qa, qb, ah)
}

#[test]
fn ud_send_recv_grh_src_qp_and_qkey() {
    let (_f, mut a, mut b) = two(64 << 10);
    let (mut qa, mut qb, ah) = ud_pair(&a, &b);
    a.buf.fill_pattern(30);
    b.buf.fill(0xee);
    b.d.post_recv(
        &mut qb,
        &[
            RecvWr::new(300, &[b.mr.sge(0, 40 + 2000)]),
            RecvWr::new(301, &[b.mr.sge(4096, 40 + 2000)]),
        ],
    )
    .unwrap();

    // Wrong Q_Key: the sender completes, the datagram is dropped (no receive consumed).
    a.d.post_send(
        &mut qa,
        &[SendWr::ud_send(
            1,
            &[a.mr.sge(5000, 700)],
            ah,
            qb.qpn(),
            QKEY_B ^ 1,
        )],
    )
    .unwrap();
    assert_eq!(
        key(&poll_exact(&a.d, &mut a.cq, 1)[0]),
        (1, OK, abi::WC_OP_SEND)
    );
    assert_cq_empty(&b.d, &mut b.cq, Duration::from_millis(100));
    // Unknown destination QP: dropped too.
    let ghost = abi::make_handle(999, 1);
    a.d.post_send(
        &mut qa,
        &[SendWr::ud_send(
            2,
            &[a.mr.sge(5000, 700)],
            ah,
            ghost,
            QKEY_B,
        )],
    )
    .unwrap();
    assert_eq!(
        key(&poll_exact(&a.d, &mut a.cq, 1)[0]),
        (2, OK, abi::WC_OP_SEND)
    );
    assert_cq_empty(&b.d, &mut b.cq, QUIET);
    assert_eq!(b.buf.read_vec(0, 8192), vec![0xee; 8192]);

    // The right Q_Key: exactly one receive, the first one posted.
    a.d.post_send(
        &mut qa,
        &[
            SendWr::ud_send(3, &[a.mr.sge(0, 1500)], ah, qb.qpn(), QKEY_B),
            SendWr::ud_send(4, &[a.mr.sge(10000, 2000)], ah, qb.qpn(), QKEY_B)
                .with_imm(0xabcd_0123),
        ],
    )
    .unwrap();
    assert_eq!(
        poll_exact(&a.d, &mut a.cq, 2)
            .iter()
            .map(key)
            .collect::<Vec<_>>(),
        [(3, OK, abi::WC_OP_SEND), (4, OK, abi::WC_OP_SEND)]
    );
    let rc = poll_exact(&b.d, &mut b.cq, 2);
    let r = |c: &Cqe| {
        (
            c.wr_id, c.status, c.opcode, c.byte_len, c.src_qp, c.wc_flags, c.qpn,
        )
    };
    assert_eq!(
        r(&rc[0]),
        (
            300,
            OK,
            abi::WC_OP_RECV,
            40 + 1500,
            qa.qpn(),
            abi::WC_F_GRH,
            qb.qpn()
        )
    );
    assert_eq!(
        r(&rc[1]),
        (
            301,
            OK,
            abi::WC_OP_RECV,
            40 + 2000,
            qa.qpn(),
            abi::WC_F_GRH | abi::WC_F_WITH_IMM,
            qb.qpn()
        )
    );
    assert_eq!(rc[1].imm_data, 0xabcd_0123);
    let (ga, gb) = (a.gid(), b.gid());
    assert_eq!(b.buf.read_vec(8, 16), ga.raw, "GRH source GID");
    assert_eq!(b.buf.read_vec(24, 16), gb.raw, "GRH destination GID");
    assert_eq!(b.buf.read_vec(40, 1500), a.buf.read_vec(0, 1500));
    assert_eq!(b.buf.read_vec(1540, 500), vec![0xee; 500]);
    assert_eq!(b.buf.read_vec(4096 + 8, 16), ga.raw);
    assert_eq!(b.buf.read_vec(4096 + 40, 2000), a.buf.read_vec(10000, 2000));
}

#[test]
fn ud_receive_too_small_and_oversized_datagram() {
    let (_f, mut a, mut b) = two(64 << 10);
    let (mut qa, mut qb, ah) = ud_pair(&a, &b);
    a.buf.fill_pattern(31);
    // A datagram longer than the receive: LOC_LEN_ERR at the receiver, which stays in RTS; the
    // sender completes successfully.
    b.d.post_recv(
        &mut qb,
        &[
            RecvWr::new(1, &[b.mr.sge(0, 40 + 100)]),
            RecvWr::new(2, &[b.mr.sge(4096, 40 + 300)]),
        ],
    )
    .unwrap();
    a.d.post_send(
        &mut qa,
        &[
            SendWr::ud_send(10, &[a.mr.sge(0, 101)], ah, qb.qpn(), QKEY_B),
            SendWr::ud_send(11, &[a.mr.sge(200, 300)], ah, qb.qpn(), QKEY_B),
        ],
    )
    .unwrap();
    assert_eq!(
        poll_exact(&a.d, &mut a.cq, 2)
            .iter()
            .map(key)
            .collect::<Vec<_>>(),
        [(10, OK, abi::WC_OP_SEND), (11, OK, abi::WC_OP_SEND)]
    );
    let rc = poll_exact(&b.d, &mut b.cq, 2);
    assert_eq!(
        (rc[0].wr_id, rc[0].status, rc[0].opcode),
        (1, abi::WC_LOC_LEN_ERR, abi::WC_OP_RECV)
    );
    assert_eq!(
        (rc[1].wr_id, rc[1].status, rc[1].byte_len, rc[1].src_qp),
        (2, OK, 340, qa.qpn())
    );
    assert_eq!(b.buf.read_vec(4096 + 40, 300), a.buf.read_vec(200, 300));
    assert_eq!(b.d.qp_state(&qb).unwrap(), abi::QPS_RTS);

    // Payload above the port MTU: a local length error at the sender, QP → ERR, later WRs
    // flushed.
    let mtu = abi::mtu_bytes(a.d.query_port(1).unwrap().active_mtu);
    a.d.post_recv(&mut qa, &[RecvWr::new(20, &[a.mr.sge(60000, 100)])])
        .unwrap();
    a.d.post_send(
        &mut qa,
        &[
            SendWr::ud_send(12, &[a.mr.sge(0, mtu + 1)], ah, qb.qpn(), QKEY_B),
            SendWr::ud_send(13, &[a.mr.sge(0, 8)], ah, qb.qpn(), QKEY_B),
        ],
    )
    .unwrap();
    let v = poll_exact(&a.d, &mut a.cq, 3);
    assert_eq!(
        (v[0].wr_id, v[0].status, v[0].opcode, v[0].vendor_err),
        (
            12,
            abi::WC_LOC_LEN_ERR,
            abi::WC_OP_SEND,
            abi::VENDOR_ERR_BAD_WQE
        )
    );
    assert_eq!(sq_keys(&v[1..]), [(13, FLUSH, abi::WC_OP_SEND)]);
    assert_eq!(rq_keys(&v[1..]), [(20, FLUSH, abi::WC_OP_RECV)]);
    assert_eq!(a.d.qp_state(&qa).unwrap(), abi::QPS_ERR);
    assert_cq_empty(&b.d, &mut b.cq, QUIET);
}

#[test]
fn ud_bad_address_handles() {
    let (_f, mut a, mut b) = two(64 << 10);
    let (mut qa, mut qb, ah) = ud_pair(&a, &b);
    b.d.post_recv(&mut qb, &[RecvWr::new(1, &[b.mr.sge(0, 4096)])])
        .unwrap();
    // A live AH works.
    a.d.post_send(
        &mut qa,
        &[SendWr::ud_send(1, &[a.mr.sge(0, 64)], ah, qb.qpn(), QKEY_B)],
    )
    .unwrap();
    assert_eq!(
        key(&poll_exact(&a.d, &mut a.cq, 1)[0]),
        (1, OK, abi::WC_OP_SEND)
    );
    assert_eq!(key(&poll_exact(&b.d, &mut b.cq, 1)[0]).1, OK);

    // A destroyed AH: VENDOR_ERR_BAD_AH, QP → ERR, the next WR flushed.
    a.d.destroy_ah(ah).unwrap();
    a.d.post_send(
        &mut qa,
        &[
            SendWr::ud_send(2, &[a.mr.sge(0, 64)], ah, qb.qpn(), QKEY_B),
            SendWr::ud_send(3, &[a.mr.sge(0, 64)], ah, qb.qpn(), QKEY_B),
        ],
    )
    .unwrap();
    let v = poll_exact(&a.d, &mut a.cq, 2);
    assert_eq!(
        (v[0].wr_id, v[0].status, v[0].vendor_err),
        (2, abi::WC_LOC_QP_OP_ERR, abi::VENDOR_ERR_BAD_AH)
    );
    assert_eq!(key(&v[1]), (3, FLUSH, abi::WC_OP_SEND));
    assert_eq!(a.d.qp_state(&qa).unwrap(), abi::QPS_ERR);
    let ev = events_until_quiet(&a.d, QUIET);
    assert_eq!(fatal_events(&ev, qa.qpn()), [abi::VENDOR_ERR_BAD_AH as u64]);

    // An AH of another PD.
    let pd2 = a.d.alloc_pd().unwrap();
    let ah2 = a.d.create_ah(pd2, &ah_attr_for(b.gid())).unwrap();
    let mut qa2 = a.qp(|x| x.qp_type = abi::QPT_UD);
    a.d.connect_ud(&qa2, 0x1111_0001).unwrap();
    a.d.post_send(
        &mut qa2,
        &[SendWr::ud_send(
            4,
            &[a.mr.sge(0, 64)],
            ah2,
            qb.qpn(),
            QKEY_B,
        )],
    )
    .unwrap();
    let v = poll_exact(&a.d, &mut a.cq, 1);
    assert_eq!(
        (v[0].wr_id, v[0].status, v[0].vendor_err),
        (4, abi::WC_LOC_QP_OP_ERR, abi::VENDOR_ERR_BAD_AH)
    );
    assert_cq_empty(&b.d, &mut b.cq, QUIET);
}

// ---------------------------------------------------------------------------------------------
// 4. Exact completion counts
// ---------------------------------------------------------------------------------------------

#[test]
fn unsignaled_wrs_produce_no_cqe() {
    let (_f, mut a, mut b) = two(64 << 10);
    let (mut qa, mut qb) = rc_pair(&a, &b);
    a.buf.fill_pattern(40);
    let sges: Vec<[Sge; 1]> = (0..10).map(|i| [a.mr.sge(i * 100, 100)]).collect();
    let wrs: Vec<SendWr> = (0..10u64)
        .map(|i| {
            let w = SendWr::write(i, &sges[i as usize], b.mr.addr(i * 100), b.mr.rkey);
            if i == 4 || i == 9 {
                w
            } else {
                w.unsignaled()
            }
        })
        .collect();
    a.d.post_send(&mut qa, &wrs).unwrap();
    let v = poll_exact(&a.d, &mut a.cq, 2);
    assert_eq!(
        v.iter().map(key).collect::<Vec<_>>(),
        [
            (4, OK, abi::WC_OP_RDMA_WRITE),
            (9, OK, abi::WC_OP_RDMA_WRITE)
        ]
    );
    assert_eq!(b.buf.read_vec(0, 1000), a.buf.read_vec(0, 1000));

    // Only unsignaled WRs: their effects happen, no CQE ever. An unsignaled SEND still
    // consumes (and completes) the responder's receive.
    b.d.post_recv(&mut qb, &[RecvWr::new(77, &[b.mr.sge(8192, 64)])])
        .unwrap();
    a.d.post_send(
        &mut qa,
        &[
            SendWr::write(20, &[a.mr.sge(0, 4096)], b.mr.addr(4096), b.mr.rkey).unsignaled(),
            SendWr::send(21, &[a.mr.sge(100, 64)]).unsignaled(),
        ],
    )
    .unwrap();
    let c = poll_exact(&b.d, &mut b.cq, 1)[0];
    assert_eq!((c.wr_id, c.status, c.byte_len), (77, OK, 64));
    assert_cq_empty(&a.d, &mut a.cq, Duration::from_millis(50));
    assert_eq!(b.buf.read_vec(4096, 4096), a.buf.read_vec(0, 4096));
    assert_eq!(b.buf.read_vec(8192, 64), a.buf.read_vec(100, 64));
    // A later signaled WR completes alone, and implies the earlier ones finished.
    a.d.post_send(
        &mut qa,
        &[SendWr::write(
            22,
            &[a.mr.sge(0, 8)],
            b.mr.addr(0),
            b.mr.rkey,
        )],
    )
    .unwrap();
    assert_eq!(
        key(&poll_exact(&a.d, &mut a.cq, 1)[0]),
        (22, OK, abi::WC_OP_RDMA_WRITE)
    );
}

#[test]
fn sq_sig_all_signals_every_wr() {
    let (_f, mut a, b) = two(64 << 10);
    let mut qa = a.qp(|x| x.sq_sig_all = true);
    let qb = b.qp(|_| {});
    connect(&a, &qa, &b, &qb);
    let s = [a.mr.sge(0, 32)];
    let wrs: Vec<SendWr> = (0..6u64)
        .map(|i| SendWr::write(i, &s, b.mr.addr(i * 32), b.mr.rkey).unsignaled())
        .collect();
    a.d.post_send(&mut qa, &wrs).unwrap();
    let v = poll_exact(&a.d, &mut a.cq, 6);
    assert_eq!(
        v.iter().map(key).collect::<Vec<_>>(),
        (0..6)
            .map(|i| (i, OK, abi::WC_OP_RDMA_WRITE))
            .collect::<Vec<_>>()
    );
}

#[test]
fn batched_doorbells_wrap_sq_and_cq_in_order() {
    let (_f, a, b) = two(64 << 10);
    // Small rings so that the run wraps them many times: SQ/RQ depth 16, CQ depth 32.
    let mut cqa = a.d.create_cq(32).unwrap();
    let mut cqb = b.d.create_cq(32).unwrap();
    let attr = |cq: &Cq| QpInitAttr {
        max_send_wr: 16,
        max_recv_wr: 16,
        ..QpInitAttr::rc(cq)
    };
    let mut qa = a.d.create_qp(a.pd, &attr(&cqa)).unwrap();
    let mut qb = b.d.create_qp(b.pd, &attr(&cqb)).unwrap();
    connect(&a, &qa, &b, &qb);
    assert_eq!((qa.caps().max_send_wr, cqa.depth()), (16, 32));

    const ROUNDS: u64 = 20;
    const BATCH: u64 = 16;
    let mut next_recv = 0u64;
    for round in 0..ROUNDS {
        // Sources: a[i*64..]; WRITE targets b[i*64..]; READ sources b[12288 + i*64..];
        // READ sinks a[4096 + i*64..]; receive buffers b[8192 + j*64..].
        for i in 0..BATCH {
            a.buf.write(i * 64, &pattern(round * 1000 + i, 64));
            b.buf
                .write(12288 + i * 64, &pattern(round * 1000 + 500 + i, 64));
        }
        let rsges: Vec<[Sge; 1]> = (0..BATCH / 2)
            .map(|j| [b.mr.sge(8192 + j * 64, 64)])
            .collect();
        let recvs: Vec<RecvWr> = (0..BATCH / 2)
            .map(|j| RecvWr::new(next_recv + j, &rsges[j as usize]))
            .collect();
        b.d.post_recv(&mut qb, &recvs).unwrap();
        let src: Vec<[Sge; 1]> = (0..BATCH).map(|i| [a.mr.sge(i * 64, 64)]).collect();
        let sink: Vec<[Sge; 1]> = (0..BATCH).map(|i| [a.mr.sge(4096 + i * 64, 64)]).collect();
        let wrs: Vec<SendWr> = (0..BATCH)
            .map(|i| {
                let id = round * BATCH + i;
                let k = i as usize;
                match i % 4 {
                    0 => SendWr::write(id, &src[k], b.mr.addr(i * 64), b.mr.rkey),
                    1 => SendWr::send(id, &src[k]),
                    2 => SendWr::read(id, &sink[k], b.mr.addr(12288 + i * 64), b.mr.rkey),
                    _ => SendWr::write_imm(id, &src[k], b.mr.addr(i * 64), b.mr.rkey, id as u32),
                }
            })
            .collect();
        // One post = one doorbell for the whole batch (the SQ is full afterwards).
        a.d.post_send(&mut qa, &wrs).unwrap();
        let v = a.d.poll_cq_until(&mut cqa, BATCH as usize, LONG);
        let expect: Vec<_> = (0..BATCH)
            .map(|i| {
                let op = [
                    abi::WC_OP_RDMA_WRITE,
                    abi::WC_OP_SEND,
                    abi::WC_OP_RDMA_READ,
                    abi::WC_OP_RDMA_WRITE,
                ][(i % 4) as usize];
                (round * BATCH + i, OK, op)
            })
            .collect();
        assert_eq!(
            v.iter().map(key).collect::<Vec<_>>(),
            expect,
            "round {round}"
        );
        let r = b.d.poll_cq_until(&mut cqb, (BATCH / 2) as usize, LONG);
        let expect: Vec<_> = (0..BATCH / 2)
            .map(|j| {
                let i = 2 * j + 1; // the SEND (i%4 == 1) or WRITE_IMM (i%4 == 3) of the batch
                let (op, flags, imm) = if i % 4 == 1 {
                    (abi::WC_OP_RECV, 0, 0)
                } else {
                    (
                        abi::WC_OP_RECV_RDMA_WITH_IMM,
                        abi::WC_F_WITH_IMM,
                        (round * BATCH + i) as u32,
                    )
                };
                (next_recv + j, OK, op, 64, flags, imm)
            })
            .collect();
        assert_eq!(
            r.iter()
                .map(|c| {
                    let imm = if c.wc_flags & abi::WC_F_WITH_IMM != 0 {
                        c.imm_data
                    } else {
                        0
                    };
                    (c.wr_id, c.status, c.opcode, c.byte_len, c.wc_flags, imm)
                })
                .collect::<Vec<_>>(),
            expect,
            "round {round}"
        );
        next_recv += BATCH / 2;
        for i in 0..BATCH {
            let data = pattern(round * 1000 + i, 64);
            match i % 4 {
                0 | 3 => assert_eq!(b.buf.read_vec(i * 64, 64), data, "round {round} #{i}"),
                1 => assert_eq!(b.buf.read_vec(8192 + (i / 2) * 64, 64), data),
                _ => assert_eq!(
                    a.buf.read_vec(4096 + i * 64, 64),
                    pattern(round * 1000 + 500 + i, 64)
                ),
            }
        }
    }
    assert_cq_empty(&a.d, &mut cqa, QUIET);
    assert_cq_empty(&b.d, &mut cqb, Duration::ZERO);
    // 320 send completions through a 32-entry CQ: its consumer index lapped it 10 times.
    assert_eq!(cqa.cons(), (ROUNDS * BATCH) as u32);
    assert_eq!(a.d.sq_cons(&qa).unwrap(), (ROUNDS * BATCH) as u32);
}

// ---------------------------------------------------------------------------------------------
// 5. Interrupts only when armed
// ---------------------------------------------------------------------------------------------

#[test]
fn no_cq_event_without_arm() {
    let (_f, mut a, mut b) = two(64 << 10);
    let (mut qa, mut qb) = rc_pair(&a, &b);
    b.d.post_recv(
        &mut qb,
        &(0..4).map(|i| RecvWr::new(i, &[])).collect::<Vec<_>>(),
    )
    .unwrap();
    a.d.post_send(
        &mut qa,
        &[
            SendWr::send(1, &[]),
            SendWr::send(2, &[]).solicited(),
            SendWr::write_imm(3, &[], b.mr.iova, b.mr.rkey, 9).solicited(),
            SendWr::write(4, &[a.mr.sge(0, 64)], b.mr.addr(0), b.mr.rkey),
        ],
    )
    .unwrap();
    poll_exact(&a.d, &mut a.cq, 4);
    poll_exact(&b.d, &mut b.cq, 3);
    assert_no_events(&a.d, Duration::from_millis(50));
    assert_no_events(&b.d, QUIET);
    // Arming an empty CQ does not fire by itself either.
    b.d.req_notify_cq(&mut b.cq, false).unwrap();
    assert_eq!(b.d.wait_event(Duration::from_millis(50)), None);
}

#[test]
fn exactly_one_event_per_arm() {
    let (_f, mut a, mut b) = two(64 << 10);
    let (mut qa, mut qb) = rc_pair(&a, &b);
    b.d.post_recv(
        &mut qb,
        &(0..5).map(|i| RecvWr::new(i, &[])).collect::<Vec<_>>(),
    )
    .unwrap();
    b.d.req_notify_cq(&mut b.cq, false).unwrap();
    a.d.post_send(
        &mut qa,
        &[
            SendWr::send(1, &[]),
            SendWr::send(2, &[]),
            SendWr::send(3, &[]),
        ],
    )
    .unwrap();
    poll_exact(&a.d, &mut a.cq, 3);
    let ev = events_until_quiet(&b.d, Duration::from_millis(100));
    assert_eq!(
        ev,
        [Event {
            kind: abi::EV_CQ_COMP,
            handle: b.cq.cqn(),
            detail: 0
        }]
    );
    assert_eq!(poll_exact(&b.d, &mut b.cq, 3).len(), 3);
    // Not re-armed: more completions, no event.
    a.d.post_send(&mut qa, &[SendWr::send(4, &[])]).unwrap();
    poll_exact(&a.d, &mut a.cq, 1);
    poll_exact(&b.d, &mut b.cq, 1);
    assert_eq!(b.d.wait_event(QUIET), None);
    // Re-armed: one more event.
    b.d.req_notify_cq(&mut b.cq, false).unwrap();
    assert_eq!(b.d.wait_event(QUIET), None);
    a.d.post_send(&mut qa, &[SendWr::send(5, &[])]).unwrap();
    poll_exact(&a.d, &mut a.cq, 1);
    let ev = events_until_quiet(&b.d, Duration::from_millis(100));
    assert_eq!(cq_events(&ev, b.cq.cqn()), 1, "{ev:?}");
    assert_eq!(ev.len(), 1, "{ev:?}");
    poll_exact(&b.d, &mut b.cq, 1);
    // The requester's CQ was never armed.
    assert_no_events(&a.d, QUIET);
}

#[test]
fn solicited_only_arm() {
    let (_f, mut a, mut b) = two(64 << 10);
    let (mut qa, mut qb) = rc_pair(&a, &b);
    let rs = [b.mr.sge(0, 64)];
    b.d.post_recv(
        &mut qb,
        &(0..8).map(|i| RecvWr::new(i, &rs)).collect::<Vec<_>>(),
    )
    .unwrap();
    b.d.req_notify_cq(&mut b.cq, true).unwrap();
    // Unsolicited SEND, SEND with immediate and WRITE with immediate: no event.
    a.d.post_send(
        &mut qa,
        &[
            SendWr::send(1, &[a.mr.sge(0, 8)]),
            SendWr::send_imm(2, &[], 5),
            SendWr::write_imm(3, &[], b.mr.iova, b.mr.rkey, 6),
            // SOLICITED on a plain WRITE is ignored (and consumes no receive).
            SendWr::write(4, &[a.mr.sge(0, 8)], b.mr.addr(100), b.mr.rkey).solicited(),
        ],
    )
    .unwrap();
    poll_exact(&a.d, &mut a.cq, 4);
    poll_exact(&b.d, &mut b.cq, 3);
    assert_eq!(b.d.wait_event(Duration::from_millis(100)), None);
    // A solicited SEND fires.
    a.d.post_send(&mut qa, &[SendWr::send(5, &[]).solicited()])
        .unwrap();
    poll_exact(&a.d, &mut a.cq, 1);
    let ev = events_until_quiet(&b.d, Duration::from_millis(100));
    assert_eq!((ev.len(), cq_events(&ev, b.cq.cqn())), (1, 1), "{ev:?}");
    poll_exact(&b.d, &mut b.cq, 1);
    // So does a solicited WRITE with immediate.
    b.d.req_notify_cq(&mut b.cq, true).unwrap();
    a.d.post_send(
        &mut qa,
        &[SendWr::write_imm(6, &[], b.mr.iova, b.mr.rkey, 7).solicited()],
    )
    .unwrap();
    poll_exact(&a.d, &mut a.cq, 1);
    let ev = events_until_quiet(&b.d, Duration::from_millis(100));
    assert_eq!((ev.len(), cq_events(&ev, b.cq.cqn())), (1, 1), "{ev:?}");
    poll_exact(&b.d, &mut b.cq, 1);
    // And an error completion matches a solicited arm: a message longer than the receive.
    b.d.req_notify_cq(&mut b.cq, true).unwrap();
    a.d.post_send(&mut qa, &[SendWr::send(7, &[a.mr.sge(0, 65)])])
        .unwrap();
    let c = poll_exact(&a.d, &mut a.cq, 1)[0];
    assert_eq!(key(&c), (7, abi::WC_REM_INV_REQ_ERR, abi::WC_OP_SEND));
    // Receives 0..=4 were consumed above; 5 fails, 6 and 7 are flushed.
    let rc = poll_exact(&b.d, &mut b.cq, 3);
    assert_eq!(
        rc.iter().map(key).collect::<Vec<_>>(),
        [
            (5, abi::WC_LOC_LEN_ERR, abi::WC_OP_RECV),
            (6, FLUSH, abi::WC_OP_RECV),
            (7, FLUSH, abi::WC_OP_RECV)
        ]
    );
    let ev = events_until_quiet(&b.d, Duration::from_millis(100));
    assert_eq!(cq_events(&ev, b.cq.cqn()), 1, "{ev:?}");
    assert_eq!(fatal_events(&ev, qb.qpn()).len(), 1, "{ev:?}");
}

#[test]
fn arming_with_pending_cqes_fires_at_once() {
    let (_f, mut a, mut b) = two(64 << 10);
    let (mut qa, mut qb) = rc_pair(&a, &b);
    b.d.post_recv(
        &mut qb,
        &(0..8).map(|i| RecvWr::new(i, &[])).collect::<Vec<_>>(),
    )
    .unwrap();
    let cq_prod_is = |b: &Node, n: u32| wait_until(LONG, || b.d.cq_prod(&b.cq).unwrap() == n);

    // One unsolicited CQE pending (not polled). A solicited arm does not fire for it...
    a.d.post_send(&mut qa, &[SendWr::send(1, &[])]).unwrap();
    poll_exact(&a.d, &mut a.cq, 1);
    assert!(cq_prod_is(&b, 1));
    b.d.req_notify_cq(&mut b.cq, true).unwrap();
    assert_eq!(b.d.wait_event(Duration::from_millis(50)), None);
    // ... a NEXT arm (replacing it) fires at once, exactly once.
    b.d.req_notify_cq(&mut b.cq, false).unwrap();
    let ev = events_until_quiet(&b.d, Duration::from_millis(50));
    assert_eq!((ev.len(), cq_events(&ev, b.cq.cqn())), (1, 1), "{ev:?}");
    assert_eq!(
        key(&poll_exact(&b.d, &mut b.cq, 1)[0]),
        (0, OK, abi::WC_OP_RECV)
    );

    // A solicited CQE arrives while disarmed: no event; arming SOLICITED then fires at once.
    a.d.post_send(&mut qa, &[SendWr::send(2, &[]).solicited()])
        .unwrap();
    poll_exact(&a.d, &mut a.cq, 1);
    assert!(cq_prod_is(&b, 2));
    assert_eq!(b.d.wait_event(QUIET), None);
    b.d.req_notify_cq(&mut b.cq, true).unwrap();
    let ev = events_until_quiet(&b.d, Duration::from_millis(50));
    assert_eq!((ev.len(), cq_events(&ev, b.cq.cqn())), (1, 1), "{ev:?}");
    poll_exact(&b.d, &mut b.cq, 1);

    // Everything polled: a new arm waits for the next completion.
    b.d.req_notify_cq(&mut b.cq, false).unwrap();
    assert_eq!(b.d.wait_event(Duration::from_millis(50)), None);
    a.d.post_send(&mut qa, &[SendWr::send(3, &[])]).unwrap();
    poll_exact(&a.d, &mut a.cq, 1);
    let ev = events_until_quiet(&b.d, Duration::from_millis(50));
    assert_eq!((ev.len(), cq_events(&ev, b.cq.cqn())), (1, 1), "{ev:?}");
    poll_exact(&b.d, &mut b.cq, 1);
}

// ---------------------------------------------------------------------------------------------
// 6. Error completions
// ---------------------------------------------------------------------------------------------

/// Posts `recvs` receives (wr_ids 500..) and then `wrs` on `qa` (whose CQ is `a.cq`); expects
/// the first WR to fail with `status` (error CQE first), every other WR (sends and receives) to
/// be flushed exactly once in posting order per queue, the QP to be in ERR, and WRs posted
/// afterwards to be flushed too. Returns the error CQE.
fn expect_first_fails(
    a: &mut Node,
    qa: &mut Qp,
    wrs: &[SendWr<'_>],
    recvs: u64,
    status: u8,
) -> Cqe {
    expect_first_fails_with(a, qa, wrs, recvs, status, false)
}

/// [`expect_first_fails`] posting with `post_send_unchecked` (WRs the driver would refuse).
fn expect_first_fails_raw(
    a: &mut Node,
    qa: &mut Qp,
    wrs: &[SendWr<'_>],
    recvs: u64,
    status: u8,
) -> Cqe {
    expect_first_fails_with(a, qa, wrs, recvs, status, true)
}

fn expect_first_fails_with(
    a: &mut Node,
    qa: &mut Qp,
    wrs: &[SendWr<'_>],
    recvs: u64,
    status: u8,
    unchecked: bool,
) -> Cqe {
    let rsge = [a.mr.sge(60000, 16)];
    let rwrs: Vec<RecvWr> = (0..recvs).map(|i| RecvWr::new(500 + i, &rsge)).collect();
    a.d.post_recv(qa, &rwrs).unwrap();
    if unchecked {
        a.d.post_send_unchecked(qa, wrs).unwrap();
    } else {
        a.d.post_send(qa, wrs).unwrap();
    }
    let v = poll_exact(&a.d, &mut a.cq, wrs.len() + recvs as usize);
    let op = |o: u8| match o {
        abi::WR_RDMA_WRITE | abi::WR_RDMA_WRITE_WITH_IMM => abi::WC_OP_RDMA_WRITE,
        abi::WR_SEND | abi::WR_SEND_WITH_IMM => abi::WC_OP_SEND,
        abi::WR_RDMA_READ => abi::WC_OP_RDMA_READ,
        abi::WR_ATOMIC_CMP_AND_SWP => abi::WC_OP_COMP_SWAP,
        _ => abi::WC_OP_FETCH_ADD,
    };
    // The error CQE comes first, then the flushes in posting order per queue.
    assert_eq!(
        (v[0].wr_id, v[0].status, v[0].opcode, v[0].qpn),
        (wrs[0].wr_id, status, op(wrs[0].opcode), qa.qpn()),
        "{v:#?}"
    );
    assert_eq!(
        sq_keys(&v[1..]),
        wrs[1..]
            .iter()
            .map(|w| (w.wr_id, FLUSH, op(w.opcode)))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        rq_keys(&v[1..]),
        (0..recvs)
            .map(|i| (500 + i, FLUSH, abi::WC_OP_RECV))
            .collect::<Vec<_>>()
    );
    assert!(v.iter().all(|c| c.qpn == qa.qpn()));
    assert_eq!(a.d.qp_state(qa).unwrap(), abi::QPS_ERR);
    // WRs posted in ERR are flushed too, each exactly once.
    let s = [a.mr.sge(0, 8)];
    a.d.post_send(qa, &[SendWr::send(990, &s).unsignaled()])
        .unwrap();
    a.d.post_recv(qa, &[RecvWr::new(991, &rsge)]).unwrap();
    let v2 = poll_exact(&a.d, &mut a.cq, 2);
    assert_eq!(sq_keys(&v2), [(990, FLUSH, abi::WC_OP_SEND)]);
    assert_eq!(rq_keys(&v2), [(991, FLUSH, abi::WC_OP_RECV)]);
    v[0]
}

#[test]
fn bad_rkey_rem_access_err_then_everything_flushed() {
    let (_f, mut a, b) = two(64 << 10);
    let (mut qa, qb) = rc_pair(&a, &b);
    b.buf.fill(0xee);
    let s = [a.mr.sge(0, 64)];
    let stale = abi::make_handle(
        abi::handle_index(b.mr.rkey),
        abi::handle_key(b.mr.rkey).wrapping_add(1),
    );
    let wrs = [
        SendWr::write(1, &s, b.mr.addr(0), stale),
        SendWr::write(2, &s, b.mr.addr(4096), b.mr.rkey).unsignaled(),
        SendWr::send(3, &s),
        SendWr::read(4, &s, b.mr.addr(0), b.mr.rkey),
    ];
    expect_first_fails(&mut a, &mut qa, &wrs, 3, abi::WC_REM_ACCESS_ERR);
    // Nothing after the failed WRITE was executed at the responder.
    assert_eq!(b.buf.to_vec(), vec![0xee; 64 << 10]);
    let ev = events_until_quiet(&a.d, QUIET);
    assert_eq!(fatal_events(&ev, qa.qpn()).len(), 1, "{ev:?}");
    // The responder QP goes to ERR as well, with an event.
    assert_state_soon(&b.d, &qb, abi::QPS_ERR);
    let ev = events_until_quiet(&b.d, QUIET);
    assert_eq!(fatal_events(&ev, qb.qpn()).len(), 1, "{ev:?}");
}

#[test]
fn out_of_bounds_remote_addresses() {
    let (_f, mut a, b) = two(64 << 10);
    b.buf.fill(0xee);
    a.buf.fill(0x11);
    let len = b.mr.len;
    let s8 = [a.mr.sge(0, 8)];
    let cases: Vec<(&str, SendWr)> = vec![
        (
            "write past the end",
            SendWr::write(1, &s8, b.mr.addr(len - 4), b.mr.rkey),
        ),
        (
            "write before the start",
            SendWr::write(1, &s8, b.mr.iova - 8, b.mr.rkey),
        ),
        (
            "write wrapping the address space",
            SendWr::write(1, &s8, u64::MAX - 3, b.mr.rkey),
        ),
        (
            "read past the end",
            SendWr::read(1, &s8, b.mr.addr(len - 4), b.mr.rkey),
        ),
        (
            "atomic past the end",
            SendWr::fetch_add(1, &s8, b.mr.addr(len), b.mr.rkey, 1),
        ),
    ];
    for (what, wr) in cases {
        let (mut qa, qb) = rc_pair(&a, &b);
        let wrs = [wr, SendWr::send(2, &s8)];
        let c = expect_first_fails(&mut a, &mut qa, &wrs, 1, abi::WC_REM_ACCESS_ERR);
        assert_eq!(c.status, abi::WC_REM_ACCESS_ERR, "{what}");
        assert_state_soon(&b.d, &qb, abi::QPS_ERR);
        assert_eq!(b.buf.to_vec(), vec![0xee; 64 << 10], "{what}");
        assert_eq!(a.buf.read_vec(0, 8), vec![0x11; 8], "{what}");
    }
}

#[test]
fn remote_access_permissions() {
    let (_f, mut a, mut b) = two(64 << 10);
    b.buf.fill_pattern(50);
    let orig = b.buf.to_vec();
    let lw = abi::ACCESS_LOCAL_WRITE;
    let no_read =
        b.d.reg_mr_range(
            b.pd,
            &b.buf,
            0,
            4096,
            lw | abi::ACCESS_REMOTE_WRITE | abi::ACCESS_REMOTE_ATOMIC,
        )
        .unwrap();
    let no_write =
        b.d.reg_mr_range(
            b.pd,
            &b.buf,
            4096,
            4096,
            lw | abi::ACCESS_REMOTE_READ | abi::ACCESS_REMOTE_ATOMIC,
        )
        .unwrap();
    let no_atomic =
        b.d.reg_mr_range(
            b.pd,
            &b.buf,
            8192,
            4096,
            lw | abi::ACCESS_REMOTE_READ | abi::ACCESS_REMOTE_WRITE,
        )
        .unwrap();
    let s8 = [a.mr.sge(0, 8)];

    // What each MR does allow works (so the failures below are about the missing right).
    let (mut qa, _qb) = rc_pair(&a, &b);
    a.buf.write_u64(16, 0x1234);
    a.d.post_send(
        &mut qa,
        &[
            SendWr::read(1, &s8, no_write.iova, no_write.rkey),
            SendWr::write(2, &[a.mr.sge(16, 8)], no_read.iova, no_read.rkey),
            SendWr::fetch_add(3, &[a.mr.sge(24, 8)], no_read.addr(8), no_read.rkey, 1),
            SendWr::read(4, &[a.mr.sge(32, 8)], no_atomic.iova, no_atomic.rkey),
        ],
    )
    .unwrap();
    assert!(poll_exact(&a.d, &mut a.cq, 4)
        .iter()
        .all(|c| c.status == OK));
    assert_eq!(a.buf.read_vec(0, 8), orig[4096..4104]);
    assert_eq!(b.buf.read_u64(0), 0x1234);
    let v8 = u64::from_le_bytes(orig[8..16].try_into().unwrap());
    assert_eq!(b.buf.read_u64(8), v8.wrapping_add(1));
    assert_eq!(a.buf.read_u64(24), v8);
    assert_eq!(a.buf.read_vec(32, 8), orig[8192..8200]);
    let orig = b.buf.to_vec();

    let cases: Vec<(&str, SendWr)> = vec![
        (
            "READ without REMOTE_READ",
            SendWr::read(1, &s8, no_read.iova, no_read.rkey),
        ),
        (
            "WRITE without REMOTE_WRITE",
            SendWr::write(1, &s8, no_write.iova, no_write.rkey),
        ),
        (
            "CMP_SWAP without REMOTE_ATOMIC",
            SendWr::cmp_swap(1, &s8, no_atomic.iova, no_atomic.rkey, 0, 0),
        ),
        (
            "FETCH_ADD without REMOTE_ATOMIC",
            SendWr::fetch_add(1, &s8, no_atomic.iova, no_atomic.rkey, 1),
        ),
    ];
    for (what, wr) in cases {
        let (mut qa, qb) = rc_pair(&a, &b);
        let c = expect_first_fails(&mut a, &mut qa, &[wr], 1, abi::WC_REM_ACCESS_ERR);
        assert_eq!(c.status, abi::WC_REM_ACCESS_ERR, "{what}");
        assert_state_soon(&b.d, &qb, abi::QPS_ERR);
        assert!(b.buf.to_vec() == orig, "{what}: responder memory changed");
    }

    // The responder QP's access flags are checked too: READ-only QP, all-access MR.
    let mut qa = a.qp(|_| {});
    let qb = b.qp(|_| {});
    connect_with(
        &a,
        &qa,
        &b,
        &qb,
        |_| {},
        |p| p.access_flags = abi::ACCESS_REMOTE_READ,
    );
    a.d.post_send(&mut qa, &[SendWr::read(1, &s8, b.mr.iova, b.mr.rkey)])
        .unwrap();
    assert_eq!(poll_exact(&a.d, &mut a.cq, 1)[0].status, OK);
    expect_first_fails(
        &mut a,
        &mut qa,
        &[SendWr::write(2, &s8, b.mr.iova, b.mr.rkey)],
        0,
        abi::WC_REM_ACCESS_ERR,
    );
    assert!(b.buf.to_vec() == orig);

    // WRITE with immediate to a bad rkey: the consumed receive completes with LOC_ACCESS_ERR.
    let (mut qa, mut qb) = rc_pair(&a, &b);
    b.d.post_recv(&mut qb, &[RecvWr::new(70, &[]), RecvWr::new(71, &[])])
        .unwrap();
    expect_first_fails(
        &mut a,
        &mut qa,
        &[SendWr::write_imm(3, &s8, no_write.iova, no_write.rkey, 1)],
        0,
        abi::WC_REM_ACCESS_ERR,
    );
    let v = poll_exact(&b.d, &mut b.cq, 2);
    assert_eq!(
        v.iter().map(key).collect::<Vec<_>>(),
        [
            (70, abi::WC_LOC_ACCESS_ERR, abi::WC_OP_RECV),
            (71, FLUSH, abi::WC_OP_RECV)
        ]
    );
    assert_eq!(b.d.qp_state(&qb).unwrap(), abi::QPS_ERR);
    assert!(b.buf.to_vec() == orig);
}

#[test]
fn rnr_retry_exceeded() {
    let (_f, mut a, mut b) = two(64 << 10);
    b.buf.fill(0xee);
    let mut qa = a.qp(|_| {});
    let qb = b.qp(|_| {});
    connect_with(
        &a,
        &qa,
        &b,
        &qb,
        |p| p.rnr_retry = 1,
        |p| p.min_rnr_timer = 1,
    );
    let s = [a.mr.sge(0, 64)];
    let t0 = Instant::now();
    expect_first_fails(
        &mut a,
        &mut qa,
        &[
            SendWr::send(1, &s),
            SendWr::write(2, &s, b.mr.addr(0), b.mr.rkey).unsignaled(),
        ],
        1,
        abi::WC_RNR_RETRY_EXC_ERR,
    );
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    // The responder is unaffected, and nothing behind the SEND executed there.
    assert_eq!(b.d.qp_state(&qb).unwrap(), abi::QPS_RTS);
    assert_cq_empty(&b.d, &mut b.cq, QUIET);
    assert_no_events(&b.d, QUIET);
    assert_eq!(b.buf.read_vec(0, 64), vec![0xee; 64]);
}

#[test]
fn rnr_recovers_when_a_receive_is_posted_later() {
    let (_f, mut a, mut b) = two(64 << 10);
    a.buf.fill_pattern(60);
    let mut qa = a.qp(|_| {});
    let mut qb = b.qp(|_| {});
    connect_with(
        &a,
        &qa,
        &b,
        &qb,
        |p| p.rnr_retry = 7,
        |p| p.min_rnr_timer = 1,
    );
    a.d.post_send(
        &mut qa,
        &[
            SendWr::send(1, &[a.mr.sge(0, 1000)]),
            SendWr::write_imm(2, &[a.mr.sge(1000, 500)], b.mr.addr(8192), b.mr.rkey, 42),
        ],
    )
    .unwrap();
    // The SEND is stuck on RNR: no completion yet.
    assert_cq_empty(&a.d, &mut a.cq, Duration::from_millis(60));
    assert_eq!(a.d.qp_state(&qa).unwrap(), abi::QPS_RTS);
    b.d.post_recv(&mut qb, &[RecvWr::new(10, &[b.mr.sge(0, 4096)])])
        .unwrap();
    let c = a.d.poll_cq_until(&mut a.cq, 1, LONG);
    assert_eq!(
        c.iter().map(key).collect::<Vec<_>>(),
        [(1, OK, abi::WC_OP_SEND)]
    );
    // The WRITE with immediate now waits for its receive in turn.
    assert_cq_empty(&a.d, &mut a.cq, Duration::from_millis(60));
    b.d.post_recv(&mut qb, &[RecvWr::new(11, &[])]).unwrap();
    assert_eq!(
        key(&poll_exact(&a.d, &mut a.cq, 1)[0]),
        (2, OK, abi::WC_OP_RDMA_WRITE)
    );
    let rc = poll_exact(&b.d, &mut b.cq, 2);
    assert_eq!(
        rc.iter()
            .map(|c| (c.wr_id, c.status, c.opcode, c.byte_len))
            .collect::<Vec<_>>(),
        [
            (10, OK, abi::WC_OP_RECV, 1000),
            (11, OK, abi::WC_OP_RECV_RDMA_WITH_IMM, 500)
        ]
    );
    assert_eq!(b.buf.read_vec(0, 1000), a.buf.read_vec(0, 1000));
    assert_eq!(b.buf.read_vec(8192, 500), a.buf.read_vec(1000, 500));
}

#[test]
fn retry_exceeded_on_unreachable_peer() {
    let (_f, mut a, b) = two(64 << 10);
    let nobody = DeviceConfig::gid_for_id(77);
    let mut qa = a.qp(|_| {});
    let mut p = a.d.rc_params(abi::make_handle(5, 1), nobody);
    p.timeout = 8; // 4.096 µs × 2^8 ≈ 1 ms
    p.retry_cnt = 2;
    a.d.connect_rc_with(&qa, &p).unwrap();
    let s = [a.mr.sge(0, 64)];
    let t0 = Instant::now();
    expect_first_fails(
        &mut a,
        &mut qa,
        &[
            SendWr::send(1, &s),
            SendWr::write(2, &s, 0x1000, 0x100).unsignaled(),
            SendWr::read(3, &s, 0x1000, 0x100),
        ],
        2,
        abi::WC_RETRY_EXC_ERR,
    );
    let took = t0.elapsed();
    // One transmission and two retries, each waiting for the ~1 ms ACK timeout.
    assert!(took >= Duration::from_millis(3), "gave up after {took:?}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    let ev = events_until_quiet(&a.d, QUIET);
    assert_eq!(fatal_events(&ev, qa.qpn()).len(), 1, "{ev:?}");

    // A peer QP that exists but is in ERR does not answer either.
    let mut qa = a.qp(|_| {});
    let qb = b.qp(|_| {});
    connect_with(
        &a,
        &qa,
        &b,
        &qb,
        |p| {
            p.timeout = 8;
            p.retry_cnt = 2
        },
        |_| {},
    );
    let (attr, mask) = (
        abi::QpAttr {
            qp_state: abi::QPS_ERR,
            ..Default::default()
        },
        abi::QP_ATTR_STATE,
    );
    b.d.modify_qp(&qb, &attr, mask).unwrap();
    expect_first_fails(
        &mut a,
        &mut qa,
        &[SendWr::write(5, &s, b.mr.iova, b.mr.rkey)],
        0,
        abi::WC_RETRY_EXC_ERR,
    );
}

/// A fresh RC pair on `a`/`b` with QP attributes changed by `fa`/`fb`.
fn pair_with(
    a: &Node,
    b: &Node,
    fa: impl FnOnce(&mut QpInitAttr),
    fb: impl FnOnce(&mut QpInitAttr),
) -> (Qp, Qp) {
    let qa = a.qp(fa);
    let qb = b.qp(fb);
    connect(a, &qa, b, &qb);
    (qa, qb)
}

/// `a` and `b` for the local-error tests: `a.buf` holds pattern 70, `b.buf` is all 0xee.
fn local_error_nodes() -> (Arc<SoftFabric>, Node, Node) {
    let (f, a, b) = two(64 << 10);
    a.buf.fill_pattern(70);
    b.buf.fill(0xee);
    (f, a, b)
}

#[test]
fn local_bad_lkey_on_unsignaled_wr() {
    let (_f, mut a, b) = local_error_nodes();
    // Bad lkey (stale key byte) on an unsignaled WR: the error CQE is written anyway.
    let (mut qa, _qb) = rc_pair(&a, &b);
    let stale = abi::make_handle(
        abi::handle_index(a.mr.lkey),
        abi::handle_key(a.mr.lkey).wrapping_add(1),
    );
    let bad = [Sge {
        addr: a.mr.iova,
        length: 64,
        lkey: stale,
    }];
    let good = [a.mr.sge(0, 64)];
    let c = expect_first_fails(
        &mut a,
        &mut qa,
        &[
            SendWr::write(1, &bad, b.mr.iova, b.mr.rkey).unsignaled(),
            SendWr::write(2, &good, b.mr.iova, b.mr.rkey),
        ],
        2,
        abi::WC_LOC_PROT_ERR,
    );
    assert_eq!(c.vendor_err, abi::VENDOR_ERR_BAD_SGE);
    let ev = events_until_quiet(&a.d, QUIET);
    assert_eq!(
        fatal_events(&ev, qa.qpn()),
        [abi::VENDOR_ERR_BAD_SGE as u64]
    );
    assert_eq!(b.buf.to_vec(), vec![0xee; 64 << 10]);
}

#[test]
fn local_sge_outside_its_mr() {
    let (_f, mut a, b) = local_error_nodes();
    let (mut qa, _qb) = rc_pair(&a, &b);
    let past_end = [a.mr.sge(a.mr.len - 10, 20)];
    let c = expect_first_fails(
        &mut a,
        &mut qa,
        &[SendWr::send(1, &past_end)],
        1,
        abi::WC_LOC_PROT_ERR,
    );
    assert_eq!(c.vendor_err, abi::VENDOR_ERR_BAD_SGE);
}

#[test]
fn local_read_into_mr_without_local_write() {
    let (_f, mut a, b) = local_error_nodes();
    let ro = a.d.reg_mr_range(a.pd, &a.buf, 0, 4096, 0).unwrap();
    let (mut qa, _qb) = rc_pair(&a, &b);
    let sink = [ro.sge(0, 64)];
    let c = expect_first_fails(
        &mut a,
        &mut qa,
        &[SendWr::read(1, &sink, b.mr.iova, b.mr.rkey)],
        0,
        abi::WC_LOC_PROT_ERR,
    );
    assert_eq!(c.vendor_err, abi::VENDOR_ERR_BAD_SGE);
    assert!(a.buf.to_vec() == pattern(70, 64 << 10));
}

#[test]
fn local_too_many_sges() {
    let (_f, mut a, b) = local_error_nodes();
    let max_sge = a.d.config().max_sge;
    // More SGEs than the QP's max_send_sge (the slot has room for them).
    let (mut qa, _qb) = pair_with(&a, &b, |x| x.max_send_sge = max_sge, |_| {});
    let cap = qa.caps().max_send_sge;
    assert_eq!(cap, ((qa.sq().stride() - 64) / 16).min(max_sge));
    assert!(
        64 + 16 * (cap + 1) <= qa.sq().stride(),
        "no room for an extra SGE"
    );
    let many: Vec<Sge> = (0..cap as u64 + 1).map(|i| a.mr.sge(i * 8, 8)).collect();
    assert!(matches!(
        a.d.post_send(&mut qa, &[SendWr::send(1, &many)]),
        Err(Error::InvalidWr { .. })
    ));
    let good = [a.mr.sge(0, 64)];
    let c = expect_first_fails_raw(
        &mut a,
        &mut qa,
        &[SendWr::send(1, &many), SendWr::send(2, &good)],
        1,
        abi::WC_LOC_QP_OP_ERR,
    );
    assert_eq!(c.vendor_err, abi::VENDOR_ERR_BAD_WQE);
    assert_eq!(b.buf.to_vec(), vec![0xee; 64 << 10]);
}

#[test]
fn local_inline_longer_than_max_inline() {
    let (_f, mut a, b) = local_error_nodes();
    // Inline data longer than max_inline (but fitting the slot).
    let (mut qa, _qb) = pair_with(&a, &b, |x| x.max_inline = 600, |_| {});
    let max = qa.caps().max_inline;
    assert_eq!(max, (qa.sq().stride() - 64).min(a.d.config().max_inline));
    assert!(64 + max < qa.sq().stride(), "no room for a longer inline");
    let long = pattern(71, max as usize + 1);
    let good = [a.mr.sge(0, 64)];
    let c = expect_first_fails_raw(
        &mut a,
        &mut qa,
        &[SendWr::send_inline(1, &long), SendWr::send(2, &good)],
        1,
        abi::WC_LOC_LEN_ERR,
    );
    assert_eq!(c.vendor_err, abi::VENDOR_ERR_BAD_WQE);
    assert_eq!(b.buf.to_vec(), vec![0xee; 64 << 10]);
}

#[test]
fn local_malformed_atomics() {
    let (_f, mut a, b) = local_error_nodes();
    b.buf.write_u64(0, 5);
    let pristine_b = b.buf.to_vec();
    let (four, eight, halves) = (
        [a.mr.sge(0, 4)],
        [a.mr.sge(0, 8)],
        [a.mr.sge(0, 4), a.mr.sge(4, 4)],
    );
    for (what, wr) in [
        (
            "4-byte atomic SGE",
            SendWr::fetch_add(1, &four, b.mr.iova, b.mr.rkey, 1),
        ),
        (
            "two 4-byte SGEs",
            SendWr::fetch_add(1, &halves, b.mr.iova, b.mr.rkey, 1),
        ),
        (
            "misaligned remote address",
            SendWr::cmp_swap(1, &eight, b.mr.addr(4), b.mr.rkey, 0, 1),
        ),
    ] {
        let (mut qa, _qb) = rc_pair(&a, &b);
        let wrs = [wr, SendWr::send(2, &eight)];
        let c = expect_first_fails(&mut a, &mut qa, &wrs, 1, abi::WC_LOC_QP_OP_ERR);
        assert_eq!(c.vendor_err, abi::VENDOR_ERR_BAD_WQE, "{what}");
        assert!(b.buf.to_vec() == pristine_b, "{what}");
    }
}

#[test]
fn responder_side_errors() {
    let (_f, mut a, mut b) = two(64 << 10);
    let max_sge = a.d.config().max_sge;
    let s = [a.mr.sge(0, 100)];

    // Message longer than the receive: requester REM_INV_REQ_ERR, responder LOC_LEN_ERR; both
    // QPs end in ERR and the responder's other receives are flushed.
    let (mut qa, mut qb) = rc_pair(&a, &b);
    b.d.post_recv(
        &mut qb,
        &[
            RecvWr::new(1, &[b.mr.sge(0, 50)]),
            RecvWr::new(2, &[b.mr.sge(100, 50)]),
        ],
    )
    .unwrap();
    expect_first_fails(
        &mut a,
        &mut qa,
        &[SendWr::send(10, &s), SendWr::send(11, &s)],
        0,
        abi::WC_REM_INV_REQ_ERR,
    );
    let v = poll_exact(&b.d, &mut b.cq, 2);
    assert_eq!(
        v.iter().map(key).collect::<Vec<_>>(),
        [
            (1, abi::WC_LOC_LEN_ERR, abi::WC_OP_RECV),
            (2, FLUSH, abi::WC_OP_RECV)
        ]
    );
    assert_eq!(b.d.qp_state(&qb).unwrap(), abi::QPS_ERR);
    let ev = events_until_quiet(&b.d, QUIET);
    assert_eq!(fatal_events(&ev, qb.qpn()).len(), 1, "{ev:?}");

    // A malformed receive WQE (too many SGEs): requester REM_OP_ERR, the receive completes
    // with LOC_QP_OP_ERR.
    let (mut qa, mut qb) = pair_with(&a, &b, |_| {}, |x| x.max_recv_sge = max_sge);
    let cap = qb.caps().max_recv_sge;
    assert_eq!(cap, ((qb.rq().stride() - 16) / 16).min(max_sge));
    assert!(
        16 + 16 * (cap + 1) <= qb.rq().stride(),
        "no room for an extra SGE"
    );
    let many: Vec<Sge> = (0..cap as u64 + 1).map(|i| b.mr.sge(i * 8, 8)).collect();
    b.d.post_recv_unchecked(&mut qb, &[RecvWr::new(3, &many), RecvWr::new(4, &[])])
        .unwrap();
    expect_first_fails(
        &mut a,
        &mut qa,
        &[SendWr::send(12, &s)],
        0,
        abi::WC_REM_OP_ERR,
    );
    let v = poll_exact(&b.d, &mut b.cq, 2);
    assert_eq!(
        (key(&v[0]), v[0].vendor_err),
        (
            (3, abi::WC_LOC_QP_OP_ERR, abi::WC_OP_RECV),
            abi::VENDOR_ERR_BAD_WQE
        )
    );
    assert_eq!(key(&v[1]), (4, FLUSH, abi::WC_OP_RECV));
    assert_eq!(b.d.qp_state(&qb).unwrap(), abi::QPS_ERR);
}

// ---------------------------------------------------------------------------------------------
// 7. Destroy with work outstanding; destroy order
// ---------------------------------------------------------------------------------------------

#[test]
fn destroy_qp_flushes_outstanding_work_and_destroy_order() {
    let (_f, mut a, mut b) = two(64 << 10);
    let s = [a.mr.sge(0, 64)];

    // QP 1 in RTR: its sends wait, its receives are posted.
    let mut q1 = a.qp(|_| {});
    let qb = b.qp(|_| {});
    b.d.connect_rc_with(&qb, &b.params(&a, &q1, |_| {}))
        .unwrap();
    rc_to_state(&a.d, &q1, &a.params(&b, &qb, |_| {}), abi::QPS_RTR);
    a.d.post_recv(
        &mut q1,
        &(0..4)
            .map(|i| RecvWr::new(1000 + i, &s))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    a.d.post_send(
        &mut q1,
        &[
            SendWr::send(1, &s),
            SendWr::send(2, &s).unsignaled(),
            SendWr::write(3, &s, b.mr.iova, b.mr.rkey),
        ],
    )
    .unwrap();
    // QP 2 in RTS towards nobody with an infinite ACK timeout: its WRs stay in flight.
    let mut q2 = a.qp(|_| {});
    let mut p2 =
        a.d.rc_params(abi::make_handle(9, 1), DeviceConfig::gid_for_id(88));
    p2.timeout = 0;
    a.d.connect_rc_with(&q2, &p2).unwrap();
    a.d.post_send(
        &mut q2,
        &[
            SendWr::write(10, &s, 0x1000, 0x100),
            SendWr::read(11, &s, 0x1000, 0x100).unsignaled(),
        ],
    )
    .unwrap();
    assert_cq_empty(&a.d, &mut a.cq, Duration::from_millis(50));

    // Busy while referenced.
    assert_status(a.d.destroy_cq(&mut a.cq), abi::STATUS_BUSY);
    assert_status(a.d.dealloc_pd(a.pd), abi::STATUS_BUSY);

    let (qpn1, qpn2) = (q1.qpn(), q2.qpn());
    a.d.destroy_qp(&mut q1).unwrap();
    let v = poll_exact(&a.d, &mut a.cq, 7);
    assert_eq!(
        sq_keys(&v),
        [
            (1, FLUSH, abi::WC_OP_SEND),
            (2, FLUSH, abi::WC_OP_SEND),
            (3, FLUSH, abi::WC_OP_RDMA_WRITE)
        ]
    );
    assert_eq!(
        rq_keys(&v),
        (0..4)
            .map(|i| (1000 + i, FLUSH, abi::WC_OP_RECV))
            .collect::<Vec<_>>()
    );
    assert!(v.iter().all(|c| c.qpn == qpn1));
    a.d.destroy_qp(&mut q2).unwrap();
    let v = poll_exact(&a.d, &mut a.cq, 2);
    assert_eq!(
        v.iter().map(key).collect::<Vec<_>>(),
        [
            (10, FLUSH, abi::WC_OP_RDMA_WRITE),
            (11, FLUSH, abi::WC_OP_RDMA_READ)
        ]
    );
    assert!(v.iter().all(|c| c.qpn == qpn2));
    for qpn in [qpn1, qpn2] {
        assert_eq!(
            a.d.query_qp_raw(qpn).unwrap_err().status(),
            Some(abi::STATUS_BAD_HANDLE)
        );
    }
    // The peer saw nothing.
    assert_cq_empty(&b.d, &mut b.cq, QUIET);

    // A PD with only a QP, and a CQ used only as a receive CQ, are busy too.
    let pd2 = a.d.alloc_pd().unwrap();
    let mut scq = a.d.create_cq(16).unwrap();
    let mut rcq = a.d.create_cq(16).unwrap();
    let mut q3 =
        a.d.create_qp(
            pd2,
            &QpInitAttr {
                recv_cq: rcq.cqn(),
                ..QpInitAttr::rc(&scq)
            },
        )
        .unwrap();
    assert_status(a.d.dealloc_pd(pd2), abi::STATUS_BUSY);
    assert_status(a.d.destroy_cq(&mut rcq), abi::STATUS_BUSY);
    assert_status(a.d.destroy_cq(&mut scq), abi::STATUS_BUSY);
    a.d.destroy_qp(&mut q3).unwrap();
    a.d.destroy_cq(&mut rcq).unwrap();
    a.d.destroy_cq(&mut scq).unwrap();
    a.d.dealloc_pd(pd2).unwrap();

    // MRs and AHs keep their PD busy.
    let ah = a.d.create_ah(a.pd, &ah_attr_for(b.gid())).unwrap();
    assert_status(a.d.dealloc_pd(a.pd), abi::STATUS_BUSY);
    a.d.dereg_mr(a.mr).unwrap();
    assert_status(a.d.dealloc_pd(a.pd), abi::STATUS_BUSY);
    a.d.destroy_ah(ah).unwrap();
    a.d.dealloc_pd(a.pd).unwrap();
    let cqn = a.cq.cqn();
    a.d.destroy_cq(&mut a.cq).unwrap();
    // Stale handles.
    let req = [cqn.to_le_bytes(), [0; 4]].concat();
    let (st, _) = a.d.ctrl(abi::CMD_DESTROY_CQ, &req, &[], 0).unwrap();
    assert_eq!(st, abi::STATUS_BAD_HANDLE);
    assert_status(a.d.dealloc_pd(a.pd), abi::STATUS_BAD_HANDLE);
    assert_status(a.d.dereg_mr(a.mr), abi::STATUS_BAD_HANDLE);
}

// ---------------------------------------------------------------------------------------------
// 8. Device reset mid-traffic
// ---------------------------------------------------------------------------------------------

/// RC parameters with a ~1 ms ACK timeout and 2 retries (RNR retries stay unlimited).
fn fast_params(d: &Driver, peer: &Qp, gid: Gid) -> RcParams {
    let mut p = d.rc_params(peer.qpn(), gid);
    p.timeout = 8;
    p.retry_cnt = 2;
    p
}

/// Control of a streaming thread.
#[derive(Default)]
struct StreamCtl {
    /// Set (under the lock, which the thread also holds while posting) to stop posting.
    stop: Mutex<bool>,
    /// Asks for one last batch that cannot complete: a SEND the peer has no receive for
    /// (it keeps bouncing off RNR NAKs), followed by 7 WRITEs queued behind it.
    finish: AtomicBool,
    /// The last batch was posted.
    final_posted: AtomicBool,
    /// CQEs polled so far.
    progress: AtomicUsize,
}

/// What a streaming thread reports: WR ids posted (in order) and the CQEs polled.
struct Stream {
    posted: Vec<u64>,
    done: Vec<Cqe>,
    qp: Qp,
    cq: Cq,
    first_error_at: Option<Instant>,
}

/// Where a stream's WRs go: the local MR and the peer's buffer.
#[derive(Clone, Copy)]
struct Target {
    mr: Mr,
    raddr: u64,
    rkey: u32,
}

/// Streams batches of 8 signaled 4 KiB WRITE/READs on `qp` (keeping at most 48 outstanding)
/// until `ctl.stop` is set or, with `stop_on_error`, until an error completion; then collects
/// the completions of everything posted (bounded wait).
fn stream(
    d: Arc<Driver>,
    mut qp: Qp,
    mut cq: Cq,
    t: Target,
    ctl: Arc<StreamCtl>,
    stop_on_error: bool,
) -> Stream {
    let (mut posted, mut done) = (Vec::new(), Vec::<Cqe>::new());
    let mut first_error_at = None;
    let mut out = [Cqe::default(); 32];
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        {
            let stop = ctl.stop.lock().unwrap();
            if *stop || first_error_at.is_some() {
                break;
            }
            let base = posted.len() as u64;
            let sges: Vec<[Sge; 1]> = (0..8)
                .map(|i| [t.mr.sge(((base + i) % 64) * 4096, 4096)])
                .collect();
            let remote = |id: u64| t.raddr + (id % 64) * 4096;
            if ctl.finish.load(Ordering::Acquire) {
                if !ctl.final_posted.load(Ordering::Relaxed) {
                    let mut wrs = vec![SendWr::send(base, &sges[0])];
                    wrs.extend((1..8u64).map(|i| {
                        SendWr::write(base + i, &sges[i as usize], remote(base + i), t.rkey)
                    }));
                    d.post_send(&mut qp, &wrs).unwrap();
                    posted.extend(base..base + 8);
                    ctl.final_posted.store(true, Ordering::Release);
                }
            } else if posted.len() - done.len() <= 40 {
                let wrs: Vec<SendWr> = (0..8u64)
                    .map(|i| {
                        let (id, s) = (base + i, &sges[i as usize]);
                        if id % 2 == 0 {
                            SendWr::write(id, s, remote(id), t.rkey)
                        } else {
                            SendWr::read(id, s, remote(id), t.rkey)
                        }
                    })
                    .collect();
                d.post_send(&mut qp, &wrs).unwrap();
                posted.extend(base..base + 8);
            }
        }
        let n = d.poll_cq(&mut cq, &mut out);
        if stop_on_error && first_error_at.is_none() && out[..n].iter().any(|c| c.status != OK) {
            first_error_at = Some(Instant::now());
        }
        done.extend_from_slice(&out[..n]);
        ctl.progress.store(done.len(), Ordering::Relaxed);
        if n == 0 {
            thread::yield_now();
        }
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while done.len() < posted.len() && Instant::now() < deadline {
        let n = d.poll_cq(&mut cq, &mut out);
        done.extend_from_slice(&out[..n]);
        if n == 0 {
            thread::sleep(Duration::from_micros(200));
        }
    }
    // Nothing beyond one completion per WR.
    let extra = d.poll_cq_until(&mut cq, 1, QUIET);
    done.extend(extra);
    Stream {
        posted,
        done,
        qp,
        cq,
        first_error_at,
    }
}

#[test]
fn device_reset_mid_traffic() {
    let fabric = SoftFabric::new();
    let a = node(&Vm::new(&fabric, 1), 1 << 20);
    let b = node(&Vm::new(&fabric, 2), 1 << 20);
    let Node {
        d: da,
        pd: pda,
        buf: bufa,
        mr: mra,
        cq: cqa,
    } = a;
    let Node {
        d: db,
        pd: pdb,
        buf: bufb,
        mr: mrb,
        cq: cqb,
    } = b;
    let qa = da.create_qp(pda, &QpInitAttr::rc(&cqa)).unwrap();
    let qb = db.create_qp(pdb, &QpInitAttr::rc(&cqb)).unwrap();
    let (ga, gb) = (da.gid().unwrap(), db.gid().unwrap());
    da.connect_rc_with(&qa, &fast_params(&da, &qb, gb)).unwrap();
    db.connect_rc_with(&qb, &fast_params(&db, &qa, ga)).unwrap();

    // A QP on A whose WRs can never complete on their own (nobody there, infinite timeout).
    let mut cq_stuck = da.create_cq(16).unwrap();
    let mut q_stuck = da.create_qp(pda, &QpInitAttr::rc(&cq_stuck)).unwrap();
    let mut p = da.rc_params(abi::make_handle(3, 1), DeviceConfig::gid_for_id(99));
    p.timeout = 0;
    da.connect_rc_with(&q_stuck, &p).unwrap();
    let s = [mra.sge(0, 64)];
    da.post_recv(&mut q_stuck, &[RecvWr::new(200, &s), RecvWr::new(201, &s)])
        .unwrap();
    da.post_send(
        &mut q_stuck,
        &[
            SendWr::write(100, &s, 0x1000, 1),
            SendWr::send(101, &s).unsignaled(),
            SendWr::read(102, &s, 0x1000, 1),
        ],
    )
    .unwrap();

    // Both directions stream: A writes into / reads from B's buffer, B into / from A's.
    let (ctl_a, ctl_b) = (
        Arc::new(StreamCtl::default()),
        Arc::new(StreamCtl::default()),
    );
    let ta = {
        let (d, ctl) = (da.clone(), ctl_a.clone());
        let t = Target {
            mr: mra,
            raddr: mrb.iova,
            rkey: mrb.rkey,
        };
        thread::spawn(move || stream(d, qa, cqa, t, ctl, false))
    };
    let tb = {
        let (d, ctl) = (db.clone(), ctl_b.clone());
        let t = Target {
            mr: mrb,
            raddr: mra.iova,
            rkey: mra.rkey,
        };
        thread::spawn(move || stream(d, qb, cqb, t, ctl, true))
    };
    let flowing = wait_until(LONG, || {
        ctl_a.progress.load(Ordering::Relaxed) >= 200
            && ctl_b.progress.load(Ordering::Relaxed) >= 200
    });
    // A's last batch is stuck behind a SEND that B has no receive for.
    ctl_a.finish.store(true, Ordering::Release);
    let final_posted = wait_until(LONG, || ctl_a.final_posted.load(Ordering::Acquire));
    thread::sleep(Duration::from_millis(5));

    // Reset A while both stream (no post can race with it: the stop lock is held).
    let reset_at;
    {
        let mut stop = ctl_a.stop.lock().unwrap();
        *stop = true;
        da.reset_device().unwrap();
        reset_at = Instant::now();
    }
    // From now on the device must not touch A's memory: B's WRITEs must not land.
    bufa.fill(0x5a);
    let sa = ta.join().unwrap();
    // B keeps streaming until its QP fails (its peer is gone); a deadline bounds it.
    let sb = tb.join().unwrap();
    assert!(flowing, "traffic never got going");
    assert!(final_posted, "A's last batch was never posted");

    // A: every WR accounted for exactly once, successes then flushes, in posting order.
    assert_eq!(
        sa.done.iter().map(|c| c.wr_id).collect::<Vec<_>>(),
        sa.posted,
        "A: completions vs posted WRs"
    );
    let ok_a = sa.done.iter().take_while(|c| c.status == OK).count();
    assert!(
        sa.done[ok_a..].iter().all(|c| c.status == FLUSH),
        "A: after the reset only flushes: {:?}",
        sa.done[ok_a..].iter().map(key).collect::<Vec<_>>()
    );
    // The stuck last batch (at least) was flushed by the reset.
    let n = sa.done.len();
    assert!(n - ok_a >= 8, "only {} flushes", n - ok_a);
    assert_eq!(
        key(&sa.done[n - 8]),
        (sa.posted[n - 8], FLUSH, abi::WC_OP_SEND)
    );
    // The stuck QP's WRs were flushed by the reset, into a CQ that is still readable.
    let v = poll_exact(&da, &mut cq_stuck, 5);
    assert_eq!(
        sq_keys(&v),
        [
            (100, FLUSH, abi::WC_OP_RDMA_WRITE),
            (101, FLUSH, abi::WC_OP_SEND),
            (102, FLUSH, abi::WC_OP_RDMA_READ)
        ]
    );
    assert_eq!(
        rq_keys(&v),
        [(200, FLUSH, abi::WC_OP_RECV), (201, FLUSH, abi::WC_OP_RECV)]
    );

    // B: its QP failed with RETRY_EXC_ERR soon after the reset; everything else completed or
    // was flushed, exactly once each.
    assert_eq!(
        sb.done.iter().map(|c| c.wr_id).collect::<Vec<_>>(),
        sb.posted,
        "B: completions vs posted WRs"
    );
    let ok_b = sb.done.iter().take_while(|c| c.status == OK).count();
    assert!(ok_b < sb.done.len(), "B never failed");
    assert_eq!(
        sb.done[ok_b].status,
        abi::WC_RETRY_EXC_ERR,
        "{:?}",
        sb.done[ok_b]
    );
    assert!(sb.done[ok_b + 1..].iter().all(|c| c.status == FLUSH));
    let failed_after = sb.first_error_at.unwrap() - reset_at;
    println!(
        "A: {} posted, {} succeeded, {} flushed; B: {} posted, {} succeeded, failed {:?} after the reset",
        sa.posted.len(),
        ok_a,
        n - ok_a,
        sb.posted.len(),
        ok_b,
        failed_after
    );
    assert!(failed_after < Duration::from_secs(2), "{failed_after:?}");
    assert_eq!(db.qp_state(&sb.qp).unwrap(), abi::QPS_ERR);
    assert!(
        bufa.to_vec().iter().all(|&x| x == 0x5a),
        "A's memory was written after its reset"
    );

    // A comes back: new objects, new connection, traffic works.
    da.release_qp(sa.qp);
    da.release_qp(q_stuck);
    da.release_cq(sa.cq);
    da.release_cq(cq_stuck);
    da.reinitialize().unwrap();
    let pda = da.alloc_pd().unwrap();
    let mra = da.reg_mr(pda, &bufa, abi::ACCESS_ALL).unwrap();
    let mut cqa = da.create_cq(64).unwrap();
    let mut qa = da.create_qp(pda, &QpInitAttr::rc(&cqa)).unwrap();
    let (mut old_qb, mut cqb) = (sb.qp, sb.cq);
    db.destroy_qp(&mut old_qb).unwrap();
    assert_cq_empty(&db, &mut cqb, QUIET);
    let mut qb = db.create_qp(pdb, &QpInitAttr::rc(&cqb)).unwrap();
    assert_eq!(da.gid().unwrap(), ga);
    da.connect_rc(&qa, qb.qpn(), gb).unwrap();
    db.connect_rc(&qb, qa.qpn(), ga).unwrap();
    bufa.fill_pattern(90);
    bufb.fill(0);
    da.post_recv(&mut qa, &[RecvWr::new(1, &[mra.sge(8192, 4096)])])
        .unwrap();
    da.post_send(
        &mut qa,
        &[SendWr::write(2, &[mra.sge(0, 8192)], mrb.iova, mrb.rkey)],
    )
    .unwrap();
    assert_eq!(
        key(&poll_exact(&da, &mut cqa, 1)[0]),
        (2, OK, abi::WC_OP_RDMA_WRITE)
    );
    assert_eq!(bufb.read_vec(0, 8192), pattern(90, 8192));
    db.post_send(&mut qb, &[SendWr::send(3, &[mrb.sge(100, 4000)])])
        .unwrap();
    assert_eq!(
        key(&poll_exact(&db, &mut cqb, 1)[0]),
        (3, OK, abi::WC_OP_SEND)
    );
    let c = poll_exact(&da, &mut cqa, 1)[0];
    assert_eq!((c.wr_id, c.status, c.byte_len), (1, OK, 4000));
    assert_eq!(bufa.read_vec(8192, 4000), bufb.read_vec(100, 4000));
}

// ---------------------------------------------------------------------------------------------
// 9. QP state machine through the driver
// ---------------------------------------------------------------------------------------------

#[test]
fn sends_posted_in_init_and_rtr_wait_for_rts() {
    let (_f, mut a, mut b) = two(64 << 10);
    a.buf.fill_pattern(100);
    b.buf.fill(0xee);
    let mut qa = a.qp(|_| {});
    let mut qb = b.qp(|_| {});
    let pb = b.params(&a, &qa, |_| {});
    b.d.connect_rc_with(&qb, &pb).unwrap();
    b.d.post_recv(
        &mut qb,
        &[
            RecvWr::new(10, &[b.mr.sge(0, 4096)]),
            RecvWr::new(11, &[b.mr.sge(4096, 4096)]),
        ],
    )
    .unwrap();
    let pa = a.params(&b, &qb, |_| {});

    rc_to_state(&a.d, &qa, &pa, abi::QPS_INIT);
    a.d.post_recv(&mut qa, &[RecvWr::new(20, &[a.mr.sge(30000, 100)])])
        .unwrap();
    a.d.post_send(
        &mut qa,
        &[
            SendWr::send(1, &[a.mr.sge(0, 100)]),
            SendWr::write(2, &[a.mr.sge(100, 100)], b.mr.addr(8192), b.mr.rkey),
        ],
    )
    .unwrap();
    assert_cq_empty(&a.d, &mut a.cq, Duration::from_millis(50));

    let (attr, mask) = pa.rtr_attr();
    a.d.modify_qp(&qa, &attr, mask).unwrap();
    a.d.post_send(&mut qa, &[SendWr::send(3, &[a.mr.sge(200, 100)])])
        .unwrap();
    assert_cq_empty(&a.d, &mut a.cq, Duration::from_millis(50));
    assert_cq_empty(&b.d, &mut b.cq, Duration::ZERO);
    assert_eq!(b.buf.to_vec(), vec![0xee; 64 << 10]);
    // RTR receives.
    b.d.post_send(&mut qb, &[SendWr::send(30, &[b.mr.sge(60000, 50)])])
        .unwrap();
    assert_eq!(
        key(&poll_exact(&b.d, &mut b.cq, 1)[0]),
        (30, OK, abi::WC_OP_SEND)
    );
    let c = poll_exact(&a.d, &mut a.cq, 1)[0];
    assert_eq!((c.wr_id, c.status, c.byte_len), (20, OK, 50));

    // RTS: the waiting WRs run without a new doorbell.
    let (attr, mask) = pa.rts_attr();
    a.d.modify_qp(&qa, &attr, mask).unwrap();
    assert_eq!(
        poll_exact(&a.d, &mut a.cq, 3)
            .iter()
            .map(key)
            .collect::<Vec<_>>(),
        [
            (1, OK, abi::WC_OP_SEND),
            (2, OK, abi::WC_OP_RDMA_WRITE),
            (3, OK, abi::WC_OP_SEND)
        ]
    );
    let v = poll_exact(&b.d, &mut b.cq, 2);
    assert_eq!(
        v.iter()
            .map(|c| (c.wr_id, c.status, c.byte_len))
            .collect::<Vec<_>>(),
        [(10, OK, 100), (11, OK, 100)]
    );
    assert_eq!(b.buf.read_vec(0, 100), a.buf.read_vec(0, 100));
    assert_eq!(b.buf.read_vec(8192, 100), a.buf.read_vec(100, 100));
    assert_eq!(b.buf.read_vec(4096, 100), a.buf.read_vec(200, 100));
}

fn err_attr(state: u32) -> (abi::QpAttr, u32) {
    (
        abi::QpAttr {
            qp_state: state,
            ..Default::default()
        },
        abi::QP_ATTR_STATE,
    )
}

#[test]
fn modify_to_err_flushes_everything_without_event() {
    let (_f, mut a, mut b) = two(64 << 10);
    b.buf.fill(0xee);
    let mut qa = a.qp(|_| {});
    let qb = b.qp(|_| {});
    b.d.connect_rc_with(&qb, &b.params(&a, &qa, |_| {}))
        .unwrap();
    rc_to_state(&a.d, &qa, &a.params(&b, &qb, |_| {}), abi::QPS_RTR);
    let s = [a.mr.sge(0, 64)];
    a.d.post_send(
        &mut qa,
        &[
            SendWr::send(1, &s),
            SendWr::write(2, &s, b.mr.iova, b.mr.rkey).unsignaled(),
            SendWr::read(3, &s, b.mr.iova, b.mr.rkey),
        ],
    )
    .unwrap();
    a.d.post_recv(
        &mut qa,
        &(0..4).map(|i| RecvWr::new(50 + i, &s)).collect::<Vec<_>>(),
    )
    .unwrap();
    assert_cq_empty(&a.d, &mut a.cq, QUIET);
    let (attr, mask) = err_attr(abi::QPS_ERR);
    a.d.modify_qp(&qa, &attr, mask).unwrap();
    let v = poll_exact(&a.d, &mut a.cq, 7);
    assert_eq!(
        sq_keys(&v),
        [
            (1, FLUSH, abi::WC_OP_SEND),
            (2, FLUSH, abi::WC_OP_RDMA_WRITE),
            (3, FLUSH, abi::WC_OP_RDMA_READ)
        ]
    );
    assert_eq!(
        rq_keys(&v),
        (0..4)
            .map(|i| (50 + i, FLUSH, abi::WC_OP_RECV))
            .collect::<Vec<_>>()
    );
    assert_eq!(a.d.qp_state(&qa).unwrap(), abi::QPS_ERR);
    // Driver-requested: no EV_QP_FATAL.
    assert_no_events(&a.d, QUIET);
    // Posted later: flushed as well.
    a.d.post_send(&mut qa, &[SendWr::send(4, &s)]).unwrap();
    a.d.post_recv(&mut qa, &[RecvWr::new(60, &s)]).unwrap();
    let v = poll_exact(&a.d, &mut a.cq, 2);
    assert_eq!(sq_keys(&v), [(4, FLUSH, abi::WC_OP_SEND)]);
    assert_eq!(rq_keys(&v), [(60, FLUSH, abi::WC_OP_RECV)]);
    // None of it reached the peer.
    assert_cq_empty(&b.d, &mut b.cq, Duration::ZERO);
    assert_eq!(b.buf.to_vec(), vec![0xee; 64 << 10]);
}

#[test]
fn modify_to_reset_discards_without_completions() {
    let (_f, mut a, mut b) = two(64 << 10);
    a.buf.fill_pattern(110);
    let mut qa = a.qp(|_| {});
    let mut qb = b.qp(|_| {});
    b.d.connect_rc_with(&qb, &b.params(&a, &qa, |_| {}))
        .unwrap();
    let pa = a.params(&b, &qb, |_| {});
    rc_to_state(&a.d, &qa, &pa, abi::QPS_RTR);
    let s = [a.mr.sge(0, 64)];
    a.d.post_send(
        &mut qa,
        &[
            SendWr::send(1, &s),
            SendWr::send(2, &s),
            SendWr::send(3, &s),
        ],
    )
    .unwrap();
    a.d.post_recv(
        &mut qa,
        &(0..4).map(|i| RecvWr::new(20 + i, &s)).collect::<Vec<_>>(),
    )
    .unwrap();
    let (attr, mask) = err_attr(abi::QPS_RESET);
    a.d.modify_qp(&qa, &attr, mask).unwrap();
    assert_cq_empty(&a.d, &mut a.cq, Duration::from_millis(50));
    let q = a.d.query_qp(&qa).unwrap();
    assert_eq!(
        (
            q.qp_state,
            q.dest_qp_num,
            q.qp_access_flags,
            q.path_mtu,
            q.timeout,
            q.retry_cnt,
            q.rnr_retry,
            q.max_rd_atomic,
            q.ah_attr.dgid.raw
        ),
        (abi::QPS_RESET, 0, 0, 0, 0, 0, 0, 0, [0; 16])
    );
    assert_eq!(
        (a.d.sq_cons(&qa).unwrap(), a.d.rq_cons(&qa).unwrap()),
        (3, 4)
    );
    // The driver refuses to post in RESET.
    assert!(a.d.post_send(&mut qa, &[SendWr::send(4, &s)]).is_err());

    // Back to RTS: the discarded WRs never run; new ones do.
    a.d.connect_rc_with(&qa, &pa).unwrap();
    assert_cq_empty(&a.d, &mut a.cq, QUIET);
    assert_cq_empty(&b.d, &mut b.cq, Duration::ZERO);
    a.d.post_recv(&mut qa, &[RecvWr::new(30, &[a.mr.sge(8192, 64)])])
        .unwrap();
    b.d.post_recv(&mut qb, &[RecvWr::new(40, &[b.mr.sge(0, 64)])])
        .unwrap();
    a.d.post_send(&mut qa, &[SendWr::send(5, &[a.mr.sge(100, 64)])])
        .unwrap();
    assert_eq!(
        key(&poll_exact(&a.d, &mut a.cq, 1)[0]),
        (5, OK, abi::WC_OP_SEND)
    );
    let c = poll_exact(&b.d, &mut b.cq, 1)[0];
    assert_eq!((c.wr_id, c.status, c.byte_len), (40, OK, 64));
    assert_eq!(b.buf.read_vec(0, 64), a.buf.read_vec(100, 64));
    b.d.post_send(&mut qb, &[SendWr::send(6, &[b.mr.sge(0, 32)])])
        .unwrap();
    assert_eq!(
        key(&poll_exact(&b.d, &mut b.cq, 1)[0]),
        (6, OK, abi::WC_OP_SEND)
    );
    let c = poll_exact(&a.d, &mut a.cq, 1)[0];
    assert_eq!((c.wr_id, c.status, c.byte_len), (30, OK, 32));
}

#[test]
fn illegal_transitions_fail_with_bad_state_and_change_nothing() {
    let (_f, a, b) = two(4096);
    let qa = a.qp(|_| {});
    let qb = b.qp(|_| {});
    let p = a.params(&b, &qb, |_| {});
    let [init, rtr, rts] = [p.init_attr(), p.rtr_attr(), p.rts_attr()];
    let to = |s: u32| err_attr(s);
    let check = |attrs: &[(abi::QpAttr, u32)], state: u32| {
        for (attr, mask) in attrs {
            assert_status(a.d.modify_qp(&qa, attr, *mask), abi::STATUS_BAD_STATE);
            assert_eq!(a.d.qp_state(&qa).unwrap(), state, "to {}", attr.qp_state);
        }
    };
    check(
        &[rtr, rts, to(abi::QPS_SQD), to(abi::QPS_SQE)],
        abi::QPS_RESET,
    );
    // Missing required attributes / unknown mask bits: INVALID, no effect.
    assert_status(
        a.d.modify_qp(&qa, &init.0, init.1 & !abi::QP_ATTR_ACCESS_FLAGS),
        abi::STATUS_INVALID,
    );
    assert_status(
        a.d.modify_qp(&qa, &init.0, init.1 | 1 << 2),
        abi::STATUS_INVALID,
    );
    assert_status(a.d.modify_qp(&qa, &to(7).0, to(7).1), abi::STATUS_INVALID);
    assert_eq!(a.d.qp_state(&qa).unwrap(), abi::QPS_RESET);

    a.d.modify_qp(&qa, &init.0, init.1).unwrap();
    check(&[rts, to(abi::QPS_SQD), to(abi::QPS_SQE)], abi::QPS_INIT);
    a.d.modify_qp(&qa, &rtr.0, rtr.1).unwrap();
    check(&[init, rtr, to(abi::QPS_SQD)], abi::QPS_RTR);
    a.d.modify_qp(&qa, &rts.0, rts.1).unwrap();
    check(&[init, rtr, to(abi::QPS_SQE)], abi::QPS_RTS);
    let (e, m) = to(abi::QPS_ERR);
    a.d.modify_qp(&qa, &e, m).unwrap();
    check(&[init, rtr, rts, to(abi::QPS_SQD)], abi::QPS_ERR);
    let (r, m) = to(abi::QPS_RESET);
    a.d.modify_qp(&qa, &r, m).unwrap();
    a.d.modify_qp(&qa, &init.0, init.1).unwrap();
    assert_eq!(a.d.qp_state(&qa).unwrap(), abi::QPS_INIT);
}

#[test]
fn sqd_drains_then_resumes() {
    let (_f, mut a, mut b) = two(64 << 10);
    let (mut qa, mut qb) = rc_pair(&a, &b);
    let (attr, mask) = err_attr(abi::QPS_SQD);
    a.d.modify_qp(&qa, &attr, mask).unwrap();
    let ev = events_until_quiet(&a.d, QUIET);
    assert_eq!(
        ev,
        [Event {
            kind: abi::EV_SQ_DRAINED,
            handle: qa.qpn(),
            detail: 0
        }]
    );
    let q = a.d.query_qp(&qa).unwrap();
    assert_eq!((q.qp_state, q.sq_draining), (abi::QPS_SQD, 0));
    // New sends wait in SQD; receives continue.
    b.d.post_recv(&mut qb, &[RecvWr::new(1, &[b.mr.sge(0, 64)])])
        .unwrap();
    a.d.post_send(&mut qa, &[SendWr::send(2, &[a.mr.sge(0, 64)])])
        .unwrap();
    assert_cq_empty(&a.d, &mut a.cq, Duration::from_millis(50));
    assert_cq_empty(&b.d, &mut b.cq, Duration::ZERO);
    a.d.post_recv(&mut qa, &[RecvWr::new(3, &[a.mr.sge(4096, 64)])])
        .unwrap();
    b.d.post_send(&mut qb, &[SendWr::send(4, &[b.mr.sge(100, 10)])])
        .unwrap();
    assert_eq!(
        key(&poll_exact(&b.d, &mut b.cq, 1)[0]),
        (4, OK, abi::WC_OP_SEND)
    );
    assert_eq!(
        key(&poll_exact(&a.d, &mut a.cq, 1)[0]),
        (3, OK, abi::WC_OP_RECV)
    );
    // Back to RTS: the waiting SEND runs.
    let (attr, mask) = err_attr(abi::QPS_RTS);
    a.d.modify_qp(&qa, &attr, mask).unwrap();
    assert_eq!(
        key(&poll_exact(&a.d, &mut a.cq, 1)[0]),
        (2, OK, abi::WC_OP_SEND)
    );
    assert_eq!(
        key(&poll_exact(&b.d, &mut b.cq, 1)[0]),
        (1, OK, abi::WC_OP_RECV)
    );
}

/// `(wr_id, status, opcode)` of each CQE, in order.
fn keys(v: &[Cqe]) -> Vec<(u64, u8, u8)> {
    v.iter().map(key).collect()
}

/// The EV_SQ_DRAINED event of `qp`, as the device raises it.
fn sq_drained(qp: &Qp) -> Event {
    Event {
        kind: abi::EV_SQ_DRAINED,
        handle: qp.qpn(),
        detail: 0,
    }
}

/// IB SQD: operations started before the transition complete normally, including RNR retries;
/// only new WQEs wait. A SEND, a WRITE and a WRITE_WITH_IMM are posted while the responder has
/// no receive, so the SEND bounces off RNR NAKs; then the requester enters SQD and posts one
/// more SEND. Receives posted at the responder while the requester is in SQD let the three
/// operations finish one after the other (the WRITE_WITH_IMM bounces off RNR NAKs in SQD in
/// turn); EV_SQ_DRAINED comes exactly once, after the last of them, and the SEND posted in SQD
/// runs only back in RTS.
#[test]
fn sqd_completes_rnr_naked_operations_started_before_it() {
    let (_f, mut a, mut b) = two(64 << 10);
    a.buf.fill_pattern(61);
    b.buf.fill(0xee);
    let mut qa = a.qp(|_| {});
    let mut qb = b.qp(|_| {});
    connect_with(
        &a,
        &qa,
        &b,
        &qb,
        |p| p.rnr_retry = 7,
        |p| p.min_rnr_timer = 1,
    );
    a.d.post_send(
        &mut qa,
        &[
            SendWr::send(1, &[a.mr.sge(0, 1000)]),
            SendWr::write(2, &[a.mr.sge(1000, 500)], b.mr.addr(8192), b.mr.rkey),
            SendWr::write_imm(3, &[a.mr.sge(1500, 300)], b.mr.addr(12288), b.mr.rkey, 0x55),
        ],
    )
    .unwrap();
    // The SEND is stuck on RNR.
    assert_cq_empty(&a.d, &mut a.cq, Duration::from_millis(40));
    let (attr, mask) = err_attr(abi::QPS_SQD);
    a.d.modify_qp(&qa, &attr, mask).unwrap();
    assert_no_events(&a.d, QUIET);
    assert_eq!(a.d.query_qp(&qa).unwrap().sq_draining, 1);
    // Posted in SQD: not started until the QP is back in RTS.
    a.d.post_send(&mut qa, &[SendWr::send(4, &[a.mr.sge(4096, 64)])])
        .unwrap();

    // A receive for the SEND: the SEND and the WRITE behind it complete; the WRITE_WITH_IMM
    // now waits for a receive of its own.
    b.d.post_recv(&mut qb, &[RecvWr::new(10, &[b.mr.sge(0, 4096)])])
        .unwrap();
    assert_eq!(
        keys(&a.d.poll_cq_until(&mut a.cq, 2, LONG)),
        [(1, OK, abi::WC_OP_SEND), (2, OK, abi::WC_OP_RDMA_WRITE)]
    );
    assert_cq_empty(&a.d, &mut a.cq, Duration::from_millis(40));
    assert_no_events(&a.d, QUIET);
    assert_eq!(a.d.query_qp(&qa).unwrap().sq_draining, 1);

    // Two more receives: the WRITE_WITH_IMM takes the first; the SEND posted in SQD must not
    // take the second.
    b.d.post_recv(
        &mut qb,
        &[
            RecvWr::new(11, &[]),
            RecvWr::new(12, &[b.mr.sge(16384, 4096)]),
        ],
    )
    .unwrap();
    assert_eq!(
        keys(&poll_exact(&a.d, &mut a.cq, 1)),
        [(3, OK, abi::WC_OP_RDMA_WRITE)]
    );
    assert_eq!(events_until_quiet(&a.d, QUIET), [sq_drained(&qa)]);
    let q = a.d.query_qp(&qa).unwrap();
    assert_eq!((q.qp_state, q.sq_draining), (abi::QPS_SQD, 0));
    let rc = poll_exact(&b.d, &mut b.cq, 2);
    assert_eq!(
        rc.iter()
            .map(|c| (c.wr_id, c.status, c.opcode, c.byte_len, c.imm_data))
            .collect::<Vec<_>>(),
        [
            (10, OK, abi::WC_OP_RECV, 1000, 0),
            (11, OK, abi::WC_OP_RECV_RDMA_WITH_IMM, 300, 0x55)
        ]
    );
    assert_eq!(b.buf.read_vec(16384, 4096), vec![0xee; 4096]);

    // Back to RTS: the SEND posted in SQD runs into receive 12.
    let (attr, mask) = err_attr(abi::QPS_RTS);
    a.d.modify_qp(&qa, &attr, mask).unwrap();
    assert_eq!(
        keys(&poll_exact(&a.d, &mut a.cq, 1)),
        [(4, OK, abi::WC_OP_SEND)]
    );
    let rc = poll_exact(&b.d, &mut b.cq, 1);
    assert_eq!(
        (rc[0].wr_id, rc[0].status, rc[0].opcode, rc[0].byte_len),
        (12, OK, abi::WC_OP_RECV, 64)
    );
    let src = pattern(61, 64 << 10);
    let mut want = vec![0xee; 64 << 10];
    want[..1000].copy_from_slice(&src[..1000]);
    want[8192..8692].copy_from_slice(&src[1000..1500]);
    want[12288..12588].copy_from_slice(&src[1500..1800]);
    want[16384..16448].copy_from_slice(&src[4096..4160]);
    assert!(b.buf.to_vec() == want, "responder memory differs");
    assert_no_events(&a.d, QUIET);
    assert_no_events(&b.d, Duration::ZERO);
}

/// IB SQD with lost requests: the responder drops everything (its QP is still in INIT), so the
/// requester's operations — a SEND, a WRITE and two READs, the second held back by
/// `max_rd_atomic` 1 — time out and are retransmitted (go back N) while the requester is in
/// SQD. Once the responder is ready, they all complete, in order and with their data, and then
/// EV_SQ_DRAINED comes, once; a SEND posted in SQD waits for RTS.
#[test]
fn sqd_retransmits_after_ack_timeouts() {
    let (f, mut a, mut b) = two(64 << 10);
    a.buf.fill_pattern(62);
    b.buf.fill_pattern(63);
    let a_before = a.buf.to_vec();
    let b_before = b.buf.to_vec();
    let mut qa = a.qp(|_| {});
    let mut qb = b.qp(|_| {});
    let pa = a.params(&b, &qb, |p| {
        p.timeout = 13; // 4.096 µs × 2^13 ≈ 34 ms
        p.retry_cnt = 7;
        p.max_rd_atomic = 1;
    });
    let pb = b.params(&a, &qa, |_| {});
    rc_to_state(&a.d, &qa, &pa, abi::QPS_RTS);
    rc_to_state(&b.d, &qb, &pb, abi::QPS_INIT);
    b.d.post_recv(
        &mut qb,
        &[
            RecvWr::new(10, &[b.mr.sge(0, 2048)]),
            RecvWr::new(11, &[b.mr.sge(2048, 2048)]),
        ],
    )
    .unwrap();
    // Requests sent, as packets or handed to the peer directly.
    let delivered = || {
        let s = f.stats();
        s.delivered + s.direct
    };
    let before = delivered();
    a.d.post_send(
        &mut qa,
        &[
            SendWr::send(1, &[a.mr.sge(0, 1000)]),
            SendWr::write(2, &[a.mr.sge(1000, 500)], b.mr.addr(8192), b.mr.rkey),
            SendWr::read(3, &[a.mr.sge(16384, 700)], b.mr.addr(20480), b.mr.rkey),
            SendWr::read(4, &[a.mr.sge(24576, 300)], b.mr.addr(28672), b.mr.rkey),
        ],
    )
    .unwrap();
    // SEND, WRITE and the first READ are on the wire (and dropped); the second READ waits for
    // the first.
    assert!(wait_until(LONG, || delivered() >= before + 3));
    let (attr, mask) = err_attr(abi::QPS_SQD);
    a.d.modify_qp(&qa, &attr, mask).unwrap();
    let in_sqd = delivered();
    a.d.post_send(&mut qa, &[SendWr::send(5, &[a.mr.sge(4096, 64)])])
        .unwrap();
    // An ACK timeout in SQD: the three are sent again.
    assert!(
        wait_until(LONG, || delivered() >= in_sqd + 3),
        "no retransmission in SQD"
    );
    assert_cq_empty(&a.d, &mut a.cq, Duration::ZERO);
    assert_eq!(a.d.query_qp(&qa).unwrap().sq_draining, 1);
    // The responder becomes ready; the next retransmission gets through.
    b.d.modify_qp(&qb, &pb.rtr_attr().0, pb.rtr_attr().1)
        .unwrap();
    b.d.modify_qp(&qb, &pb.rts_attr().0, pb.rts_attr().1)
        .unwrap();
    assert_eq!(
        keys(&a.d.poll_cq_until(&mut a.cq, 4, LONG)),
        [
            (1, OK, abi::WC_OP_SEND),
            (2, OK, abi::WC_OP_RDMA_WRITE),
            (3, OK, abi::WC_OP_RDMA_READ),
            (4, OK, abi::WC_OP_RDMA_READ)
        ]
    );
    assert_cq_empty(&a.d, &mut a.cq, QUIET);
    assert_eq!(events_until_quiet(&a.d, QUIET), [sq_drained(&qa)]);
    assert_eq!(a.d.qp_state(&qa).unwrap(), abi::QPS_SQD);
    let rc = poll_exact(&b.d, &mut b.cq, 1);
    assert_eq!(
        (rc[0].wr_id, rc[0].status, rc[0].opcode, rc[0].byte_len),
        (10, OK, abi::WC_OP_RECV, 1000)
    );
    // Back to RTS: the SEND posted in SQD takes receive 11.
    let (attr, mask) = err_attr(abi::QPS_RTS);
    a.d.modify_qp(&qa, &attr, mask).unwrap();
    assert_eq!(
        keys(&poll_exact(&a.d, &mut a.cq, 1)),
        [(5, OK, abi::WC_OP_SEND)]
    );
    let rc = poll_exact(&b.d, &mut b.cq, 1);
    assert_eq!(
        (rc[0].wr_id, rc[0].status, rc[0].opcode, rc[0].byte_len),
        (11, OK, abi::WC_OP_RECV, 64)
    );
    let mut want_b = b_before.clone();
    want_b[..1000].copy_from_slice(&a_before[..1000]);
    want_b[8192..8692].copy_from_slice(&a_before[1000..1500]);
    want_b[2048..2112].copy_from_slice(&a_before[4096..4160]);
    assert!(b.buf.to_vec() == want_b, "responder memory differs");
    let mut want_a = a_before.clone();
    want_a[16384..17084].copy_from_slice(&b_before[20480..21180]);
    want_a[24576..24876].copy_from_slice(&b_before[28672..28972]);
    assert!(a.buf.to_vec() == want_a, "requester memory differs");
    assert_no_events(&a.d, QUIET);
    assert_no_events(&b.d, Duration::ZERO);
}

// ---------------------------------------------------------------------------------------------
// The direct path (in-process peers) and its fallback to packets
// ---------------------------------------------------------------------------------------------

/// Asserts that `n` requests went to a peer directly since `before` and no packet was
/// delivered; returns the fabric's counters now.
#[track_caller]
fn assert_direct_since(fabric: &SoftFabric, before: &FabricStats, n: u64) -> FabricStats {
    let now = fabric.stats();
    assert_eq!(
        (now.direct - before.direct, now.delivered),
        (n, before.delivered),
        "{now:?}"
    );
    now
}

/// One QP's operations go to the peer directly while the peer runs, as packets while it is
/// stopped (held in its inbox until it resumes), and directly again afterwards; after an RNR NAK
/// the QP retries when its RNR timer expires. Whichever way, operations execute and complete in
/// order: a READ after a WRITE to the same bytes returns the written bytes, a FETCH_AND_ADD
/// returns the value before it.
#[test]
fn direct_path_and_packets_keep_order() {
    let fabric = SoftFabric::new();
    let (va, vb) = (Vm::new(&fabric, 1), Vm::new(&fabric, 2));
    let (mut a, mut b) = (node(&va, 64 << 10), node(&vb, 64 << 10));
    a.buf.fill_pattern(90);
    let ab = pattern(90, 64 << 10);
    let mut qa = a.qp(|_| {});
    let mut qb = b.qp(|_| {});
    connect_with(
        &a,
        &qa,
        &b,
        &qb,
        |p| p.rnr_retry = 7,
        |p| p.min_rnr_timer = 1,
    );
    let s0 = fabric.stats();
    // The peer runs: directly, no packet.
    a.d.post_send(
        &mut qa,
        &[
            SendWr::write(1, &[a.mr.sge(0, 1000)], b.mr.addr(0), b.mr.rkey),
            SendWr::read(2, &[a.mr.sge(8192, 1000)], b.mr.addr(0), b.mr.rkey),
        ],
    )
    .unwrap();
    assert_eq!(
        keys(&poll_exact(&a.d, &mut a.cq, 2)),
        [
            (1, OK, abi::WC_OP_RDMA_WRITE),
            (2, OK, abi::WC_OP_RDMA_READ)
        ]
    );
    assert!(a.buf.read_vec(8192, 1000) == ab[..1000]);
    let s1 = assert_direct_since(&fabric, &s0, 2);
    // The peer is stopped: packets, held until it resumes.
    vb.device.stop().unwrap();
    a.d.post_send(
        &mut qa,
        &[
            SendWr::write(3, &[a.mr.sge(4096, 512)], b.mr.addr(100), b.mr.rkey),
            SendWr::read(4, &[a.mr.sge(12288, 612)], b.mr.addr(0), b.mr.rkey),
            SendWr::fetch_add(5, &[a.mr.sge(16384, 8)], b.mr.addr(32768), b.mr.rkey, 5),
        ],
    )
    .unwrap();
    assert_cq_empty(&a.d, &mut a.cq, QUIET);
    let s2 = fabric.stats();
    assert_eq!(
        (s2.direct, s2.delivered - s1.delivered),
        (s1.direct, 3),
        "{s2:?}"
    );
    vb.device.resume().unwrap();
    assert_eq!(
        keys(&poll_exact(&a.d, &mut a.cq, 3)),
        [
            (3, OK, abi::WC_OP_RDMA_WRITE),
            (4, OK, abi::WC_OP_RDMA_READ),
            (5, OK, abi::WC_OP_FETCH_ADD)
        ]
    );
    // The READ saw WRITE 1's first 100 bytes and WRITE 3's 512, in that order.
    let mut want = ab[..100].to_vec();
    want.extend_from_slice(&ab[4096..4608]);
    assert!(a.buf.read_vec(12288, 612) == want);
    // The fetch-and-add returned the word's value before it (zero: B's buffer was not filled).
    assert_eq!((a.buf.read_u64(16384), b.buf.read_u64(32768)), (0, 5));
    // A SEND with no receive posted: RNR NAKs until the receive is there; the WRITE and the
    // FETCH_AND_ADD behind it wait and then follow in order.
    a.d.post_send(
        &mut qa,
        &[
            SendWr::send(6, &[a.mr.sge(2000, 100)]),
            SendWr::write(7, &[a.mr.sge(6000, 64)], b.mr.addr(200), b.mr.rkey),
            SendWr::fetch_add(8, &[a.mr.sge(16384, 8)], b.mr.addr(32768), b.mr.rkey, 1),
        ],
    )
    .unwrap();
    assert_cq_empty(&a.d, &mut a.cq, QUIET);
    b.d.post_recv(&mut qb, &[RecvWr::new(30, &[b.mr.sge(40000, 256)])])
        .unwrap();
    assert_eq!(
        keys(&poll_exact(&a.d, &mut a.cq, 3)),
        [
            (6, OK, abi::WC_OP_SEND),
            (7, OK, abi::WC_OP_RDMA_WRITE),
            (8, OK, abi::WC_OP_FETCH_ADD)
        ]
    );
    let rc = poll_exact(&b.d, &mut b.cq, 1);
    assert_eq!((rc[0].wr_id, rc[0].status, rc[0].byte_len), (30, OK, 100));
    assert!(b.buf.read_vec(40000, 100) == ab[2000..2100]);
    assert!(b.buf.read_vec(200, 64) == ab[6000..6064]);
    assert_eq!((a.buf.read_u64(16384), b.buf.read_u64(32768)), (5, 6));
    // Running and idle again: directly.
    let s3 = fabric.stats();
    a.d.post_send(
        &mut qa,
        &[SendWr::read(
            9,
            &[a.mr.sge(20000, 64)],
            b.mr.addr(200),
            b.mr.rkey,
        )],
    )
    .unwrap();
    assert_eq!(
        keys(&poll_exact(&a.d, &mut a.cq, 1)),
        [(9, OK, abi::WC_OP_RDMA_READ)]
    );
    assert!(a.buf.read_vec(20000, 64) == ab[6000..6064]);
    assert_direct_since(&fabric, &s3, 1);
    assert_cq_empty(&a.d, &mut a.cq, QUIET);
    assert_cq_empty(&b.d, &mut b.cq, Duration::ZERO);
}

/// RDMA WRITEs on the direct path execute straight from the requester's WR, with no request
/// packet: a gather list, inline data, a zero-length and a multi-packet WRITE land byte for
/// byte, and the responder's expected PSN moves as the packets would have moved it, across the
/// 24-bit wrap, so the SEND and the READ after them are taken in order. None of it became a
/// packet.
#[test]
fn direct_writes_keep_the_responders_psn_in_step() {
    let (fabric, mut a, mut b) = two(64 << 10);
    a.buf.fill_pattern(33);
    let ab = pattern(33, 64 << 10);
    let (mut qa, mut qb) = (a.qp(|_| {}), b.qp(|_| {}));
    // 1 KiB packets; the first WRITE's six PSNs cross the wrap.
    let at_wrap = |p: &mut RcParams| {
        p.path_mtu = abi::MTU_1024;
        (p.sq_psn, p.rq_psn) = (0xff_fffd, 0xff_fffd);
    };
    connect_with(&a, &qa, &b, &qb, at_wrap, at_wrap);
    b.d.post_recv(&mut qb, &[RecvWr::new(50, &[b.mr.sge(50000, 256)])])
        .unwrap();
    let s0 = fabric.stats();
    let gather = [a.mr.sge(0, 3000), a.mr.sge(10000, 2500)];
    let inline: Vec<u8> = (0..40u8).map(|i| i ^ 0x5a).collect();
    let empty = [a.mr.sge(0, 0)];
    let big = [a.mr.sge(30000, 4096)];
    let send = [a.mr.sge(40000, 100)];
    let read = [a.mr.sge(60000, 2000)];
    a.d.post_send(
        &mut qa,
        &[
            SendWr::write(1, &gather, b.mr.addr(1000), b.mr.rkey),
            SendWr::write_inline(2, &inline, b.mr.addr(20000), b.mr.rkey),
            SendWr::write(3, &empty, b.mr.addr(0), b.mr.rkey),
            SendWr::write(4, &big, b.mr.addr(30000), b.mr.rkey),
            SendWr::send(5, &send),
            SendWr::read(6, &read, b.mr.addr(1000), b.mr.rkey),
        ],
    )
    .unwrap();
    const WRITE: u8 = abi::WC_OP_RDMA_WRITE;
    assert_eq!(
        keys(&poll_exact(&a.d, &mut a.cq, 6)),
        [
            (1, OK, WRITE),
            (2, OK, WRITE),
            (3, OK, WRITE),
            (4, OK, WRITE),
            (5, OK, abi::WC_OP_SEND),
            (6, OK, abi::WC_OP_RDMA_READ)
        ]
    );
    let rc = poll_exact(&b.d, &mut b.cq, 1);
    assert_eq!((rc[0].wr_id, rc[0].status, rc[0].byte_len), (50, OK, 100));
    let mut gathered = ab[..3000].to_vec();
    gathered.extend_from_slice(&ab[10000..12500]);
    assert!(b.buf.read_vec(1000, 5500) == gathered);
    assert_eq!(b.buf.read_vec(20000, 40), inline);
    assert!(b.buf.read_vec(30000, 4096) == ab[30000..34096]);
    assert!(b.buf.read_vec(50000, 100) == ab[40000..40100]);
    assert!(a.buf.read_vec(60000, 2000) == gathered[..2000]);
    // Around the WRITEs B's buffer is untouched (it was never filled: zero).
    assert_eq!(b.buf.read_vec(0, 1000), vec![0; 1000]);
    assert_eq!(b.buf.read_vec(6500, 100), vec![0; 100]);
    assert_direct_since(&fabric, &s0, 6);
    assert_cq_empty(&a.d, &mut a.cq, QUIET);
    assert_cq_empty(&b.d, &mut b.cq, Duration::ZERO);
}

/// An idle QP borrows the engine's spare send queue for a post and returns it when the post
/// completes at once (the direct path). A QP whose operations stay in flight (its peer is
/// stopped) keeps it, and the next idle QP borrows that QP's own empty queue. The operations
/// of both QPs complete in order with their data, whichever queue holds them.
#[test]
fn lent_send_queue_keeps_each_qps_operations() {
    let fabric = SoftFabric::new();
    let (va, vb, vc) = (
        Vm::new(&fabric, 1),
        Vm::new(&fabric, 2),
        Vm::new(&fabric, 3),
    );
    let (mut a, b, c) = (
        node(&va, 64 << 10),
        node(&vb, 64 << 10),
        node(&vc, 64 << 10),
    );
    a.buf.fill_pattern(17);
    let ab = pattern(17, 64 << 10);
    let (mut q1, qb) = (a.qp(|_| {}), b.qp(|_| {}));
    let (mut q2, qc) = (a.qp(|_| {}), c.qp(|_| {}));
    connect(&a, &q1, &b, &qb);
    connect(&a, &q2, &c, &qc);
    const WRITE: u8 = abi::WC_OP_RDMA_WRITE;
    // 256-byte WRITEs (wr_id, offset) from A's buffer to the same offset of `to`'s, one post.
    let post = |qp: &mut Qp, wrs: &[(u64, u64)], to: &Node| {
        let sges: Vec<[Sge; 1]> = wrs.iter().map(|&(_, off)| [a.mr.sge(off, 256)]).collect();
        let wrs: Vec<SendWr> = wrs
            .iter()
            .zip(&sges)
            .map(|(&(id, off), sge)| SendWr::write(id, sge, to.mr.addr(off), to.mr.rkey))
            .collect();
        a.d.post_send(qp, &wrs).unwrap();
    };
    // B stopped: Q1's three WRITEs stay in flight in the queue it borrowed.
    vb.device.stop().unwrap();
    post(&mut q1, &[(1, 0), (2, 256), (3, 512)], &b);
    // Q2 borrows Q1's own (empty) queue; C runs, so they complete at once.
    post(&mut q2, &[(10, 1024), (11, 1280)], &c);
    assert_eq!(
        keys(&poll_exact(&a.d, &mut a.cq, 2)),
        [(10, OK, WRITE), (11, OK, WRITE)]
    );
    // More on Q1 queue behind the ones in flight, more on Q2.
    post(&mut q1, &[(4, 768)], &b);
    post(&mut q2, &[(12, 1536)], &c);
    assert_eq!(keys(&poll_exact(&a.d, &mut a.cq, 1)), [(12, OK, WRITE)]);
    vb.device.resume().unwrap();
    assert_eq!(
        keys(&poll_exact(&a.d, &mut a.cq, 4)),
        [
            (1, OK, WRITE),
            (2, OK, WRITE),
            (3, OK, WRITE),
            (4, OK, WRITE)
        ]
    );
    // Both idle again: each post borrows and returns the spare.
    post(&mut q1, &[(5, 2048)], &b);
    post(&mut q2, &[(13, 2304)], &c);
    assert_eq!(
        keys(&poll_exact(&a.d, &mut a.cq, 2)),
        [(5, OK, WRITE), (13, OK, WRITE)]
    );
    assert!(b.buf.read_vec(0, 1024) == ab[..1024]);
    assert!(b.buf.read_vec(2048, 256) == ab[2048..2304]);
    assert!(c.buf.read_vec(1024, 768) == ab[1024..1792]);
    assert!(c.buf.read_vec(2304, 256) == ab[2304..2560]);
    // Nothing else was written: the neighbours of each target are still zero.
    assert!(b.buf.read_vec(1024, 1024).iter().all(|&x| x == 0));
    assert!(c.buf.read_vec(0, 1024).iter().all(|&x| x == 0));
    assert_cq_empty(&a.d, &mut a.cq, QUIET);
}

/// Two threads post to each other at once, so each device's lock is often taken when the other
/// tries the direct path: those operations go as packets. Each round WRITEs 1 KiB, READs the
/// same bytes back and FETCH_AND_ADDs one counter on the peer; the READ must return what the
/// WRITE wrote and the counter must count up by one, in order, whichever path each operation
/// took.
#[test]
fn direct_path_under_contention_keeps_order() {
    let (f, a, b) = two(256 << 10);
    let (qa, qb) = rc_pair(&a, &b);
    const ROUNDS: u64 = 3000;
    // Each side stages its WRITEs at [96 KiB, 128 KiB) of its own buffer, targets [0, 32 KiB)
    // and the counter at 200 000 of the peer's, and reads back into [64 KiB, 96 KiB).
    fn run(me: &mut Node, qp: &mut Qp, peer_addr: u64, rkey: u32, seed: u8) {
        for i in 0..ROUNDS {
            let off = (i % 32) * 1024;
            let tag = seed.wrapping_add(i as u8);
            me.buf.write(98304 + off, &[tag; 1024]);
            let result = 131072 + 8 * (i % 32);
            me.d.post_send(
                qp,
                &[
                    SendWr::write(
                        3 * i,
                        &[me.mr.sge(98304 + off, 1024)],
                        peer_addr + off,
                        rkey,
                    ),
                    SendWr::read(
                        3 * i + 1,
                        &[me.mr.sge(65536 + off, 1024)],
                        peer_addr + off,
                        rkey,
                    ),
                    SendWr::fetch_add(
                        3 * i + 2,
                        &[me.mr.sge(result, 8)],
                        peer_addr + 200_000,
                        rkey,
                        1,
                    ),
                ],
            )
            .unwrap();
            // No quiet wait per round: the final checks catch any extra completion.
            let c = me.d.poll_cq_until(&mut me.cq, 3, LONG);
            assert_eq!(
                keys(&c),
                [
                    (3 * i, OK, abi::WC_OP_RDMA_WRITE),
                    (3 * i + 1, OK, abi::WC_OP_RDMA_READ),
                    (3 * i + 2, OK, abi::WC_OP_FETCH_ADD)
                ]
            );
            assert!(
                me.buf.read_vec(65536 + off, 1024) == [tag; 1024],
                "round {i}"
            );
            assert_eq!(me.buf.read_u64(result), i, "round {i}");
        }
    }
    let (b_addr, b_rkey) = (b.mr.addr(0), b.mr.rkey);
    let (a_addr, a_rkey) = (a.mr.addr(0), a.mr.rkey);
    let tb = thread::spawn(move || {
        let (mut b, mut qb) = (b, qb);
        run(&mut b, &mut qb, a_addr, a_rkey, 0x80);
        b
    });
    let (mut a, mut qa) = (a, qa);
    run(&mut a, &mut qa, b_addr, b_rkey, 0x10);
    let b = tb.join().unwrap();
    assert_eq!(
        (a.buf.read_u64(200_000), b.buf.read_u64(200_000)),
        (ROUNDS, ROUNDS)
    );
    let (mut a, mut b) = (a, b);
    assert_cq_empty(&a.d, &mut a.cq, QUIET);
    assert_cq_empty(&b.d, &mut b.cq, Duration::ZERO);
    let s = f.stats();
    assert!(s.direct > 0, "{s:?}");
    println!("contention: {s:?}");
}

/// A doorbell rung while the device is stopped for migration (a vCPU the VMM did not pause, or a
/// ring just before the pause): the device may take the doorbell bits before it finds itself
/// stopped, and then drops them. Nothing is lost: resume rescans every send queue, so the WRs
/// run then, each with its one completion, and the data lands.
#[test]
fn doorbell_rung_while_stopped_runs_on_resume() {
    let fabric = SoftFabric::new();
    let (va, vb) = (Vm::new(&fabric, 1), Vm::new(&fabric, 2));
    let (mut a, b) = (node(&va, 16 << 10), node(&vb, 16 << 10));
    a.buf.fill_pattern(77);
    let src = a.buf.read_vec(0, 4096);
    let mut qa = a.qp(|_| {});
    let qb = b.qp(|_| {});
    connect_with(&a, &qa, &b, &qb, |_| {}, |_| {});

    va.device.stop().unwrap();
    a.d.post_send(
        &mut qa,
        &[
            SendWr::write(1, &[a.mr.sge(0, 4096)], b.mr.addr(0), b.mr.rkey),
            SendWr::write(2, &[a.mr.sge(0, 100)], b.mr.addr(8192), b.mr.rkey),
        ],
    )
    .unwrap();
    // Stopped: nothing runs, nothing completes, the peer's memory is untouched.
    assert_cq_empty(&a.d, &mut a.cq, QUIET);
    assert_eq!(b.buf.read_vec(0, 4096), vec![0u8; 4096]);
    // The device took the doorbell (its bits are clear) and dropped it.
    let (db, _) = a.d.doorbell_area();
    let summary: u64 = vm_memory::Bytes::read_obj(
        &*va.mem,
        vm_memory::GuestAddress(db.0 + abi::DB_SQ_SUMMARY_OFFSET),
    )
    .unwrap();
    assert_eq!(
        summary, 0,
        "SQ summary still set: the doorbell was not taken"
    );

    va.device.resume().unwrap();
    let c = poll_exact(&a.d, &mut a.cq, 2);
    assert_eq!(
        c.iter().map(|c| (c.wr_id, c.status)).collect::<Vec<_>>(),
        [(1, abi::WC_SUCCESS), (2, abi::WC_SUCCESS)]
    );
    assert_cq_empty(&a.d, &mut a.cq, QUIET);
    assert_eq!(b.buf.read_vec(0, 4096), src);
    assert_eq!(b.buf.read_vec(8192, 100), src[..100]);
}
