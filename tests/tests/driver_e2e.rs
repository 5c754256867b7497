use std::sync::Arc;
use std::time::Duration;

use vm_memory::GuestAddress;
use vrdma_abi as abi;
use vrdma_abi::{Cqe, ACCESS_ALL};
use vrdma_device::soft::SoftFabric;
use vrdma_guest::*;
use vrdma_tests::{Vm, ALLOC_BASE};

fn driver(vm: &Vm) -> Driver {
    Driver::probe(
        vm.port(),
        vm.mem.clone(),
        GuestAlloc::new(GuestAddress(ALLOC_BASE), 200 << 20),
    )
    .unwrap()
}

fn wait1(d: &Driver, cq: &mut Cq) -> Cqe {
    let v = d.poll_cq_until(cq, 1, Duration::from_secs(5));
    assert_eq!(v.len(), 1, "no completion");
    v[0]
}

struct Side {
    d: Driver,
    pd: Pd,
    buf: Buffer,
    mr: Mr,
    cq: Cq,
    qp: Qp,
}

fn side(vm: &Vm, qp_type: u8) -> Side {
    let d = driver(vm);
    let pd = d.alloc_pd().unwrap();
    let buf = d.alloc_buffer(1 << 20, Layout::Discontiguous).unwrap();
    let mr = d.reg_mr(pd, &buf, ACCESS_ALL).unwrap();
    let cq = d.create_cq(256).unwrap();
    let attr = QpInitAttr {
        qp_type,
        max_send_sge: 4,
        ..QpInitAttr::rc(&cq)
    };
    let qp = d.create_qp(pd, &attr).unwrap();
    Side {
        d,
        pd,
        buf,
        mr,
        cq,
        qp,
    }
}

#[test]
fn rc_end_to_end() {
    let fabric = SoftFabric::new();
    let (va, vb) = (Vm::new(&fabric, 1), Vm::new(&fabric, 2));
    let mut a = side(&va, abi::QPT_RC);
    let mut b = side(&vb, abi::QPT_RC);
    assert_eq!(
        a.d.features() & abi::VIRTIO_F_VERSION_1,
        abi::VIRTIO_F_VERSION_1
    );
    let (ga, gb) = (a.d.gid().unwrap(), b.d.gid().unwrap());
    a.d.connect_rc(&a.qp, b.qp.qpn(), gb).unwrap();
    b.d.connect_rc(&b.qp, a.qp.qpn(), ga).unwrap();
    assert_eq!(a.d.qp_state(&a.qp).unwrap(), abi::QPS_RTS);

    // 1 MiB RDMA WRITE across discontiguous pages.
    a.buf.fill_pattern(11);
    a.d.post_send(
        &mut a.qp,
        &[SendWr::write(1, &[a.mr.sge_all()], b.mr.iova, b.mr.rkey)],
    )
    .unwrap();
    let c = wait1(&a.d, &mut a.cq);
    assert_eq!(
        (c.wr_id, c.status, c.opcode),
        (1, abi::WC_SUCCESS, abi::WC_OP_RDMA_WRITE)
    );
    assert_eq!(b.buf.to_vec(), pattern(11, 1 << 20));

    // SEND with imm + inline into a posted receive, solicited, with CQ arm + event.
    b.d.post_recv(&mut b.qp, &[RecvWr::new(77, &[b.mr.sge(4096, 100)])])
        .unwrap();
    b.d.req_notify_cq(&mut b.cq, true).unwrap();
    a.d.post_send(
        &mut a.qp,
        &[SendWr::send_inline(2, b"hello vrdma")
            .with_imm(0x1234)
            .solicited()],
    )
    .unwrap();
    let c = wait1(&a.d, &mut a.cq);
    assert_eq!((c.wr_id, c.status), (2, abi::WC_SUCCESS));
    let ev = b.d.wait_event(Duration::from_secs(5)).expect("CQ event");
    assert_eq!((ev.kind, ev.handle), (abi::EV_CQ_COMP, b.cq.cqn()));
    let c = wait1(&b.d, &mut b.cq);
    assert_eq!(
        (c.wr_id, c.status, c.opcode, c.byte_len, c.imm_data),
        (77, abi::WC_SUCCESS, abi::WC_OP_RECV, 11, 0x1234)
    );
    assert_eq!(b.buf.read_vec(4096, 11), b"hello vrdma");

    // READ back 64 KiB from the middle.
    a.buf.fill(0);
    a.d.post_send(
        &mut a.qp,
        &[SendWr::read(
            3,
            &[a.mr.sge(8192, 65536)],
            b.mr.addr(100_000),
            b.mr.rkey,
        )],
    )
    .unwrap();
    let c = wait1(&a.d, &mut a.cq);
    assert_eq!(
        (c.status, c.opcode, c.byte_len),
        (abi::WC_SUCCESS, abi::WC_OP_RDMA_READ, 65536)
    );
    assert_eq!(a.buf.read_vec(8192, 65536), b.buf.read_vec(100_000, 65536));

    // Atomics.
    b.buf.write_u64(0, 40);
    a.d.post_send(
        &mut a.qp,
        &[SendWr::fetch_add(
            4,
            &[a.mr.sge(0, 8)],
            b.mr.iova,
            b.mr.rkey,
            2,
        )],
    )
    .unwrap();
    let c = wait1(&a.d, &mut a.cq);
    assert_eq!((c.status, c.byte_len), (abi::WC_SUCCESS, 8));
    assert_eq!((a.buf.read_u64(0), b.buf.read_u64(0)), (40, 42));
    a.d.post_send(
        &mut a.qp,
        &[SendWr::cmp_swap(
            5,
            &[a.mr.sge(0, 8)],
            b.mr.iova,
            b.mr.rkey,
            42,
            7,
        )],
    )
    .unwrap();
    wait1(&a.d, &mut a.cq);
    assert_eq!(b.buf.read_u64(0), 7);

    // Many small writes, batched, to wrap the SQ (depth 128) and CQ (256) several times.
    for round in 0..20u64 {
        let sges: Vec<_> = (0..100).map(|i| [a.mr.sge(i * 64, 64)]).collect();
        let wrs: Vec<_> = (0..100u64)
            .map(|i| {
                SendWr::write(1000 + i, &sges[i as usize], b.mr.addr(i * 64), b.mr.rkey)
                    .with_flags(if i == 99 { abi::SEND_F_SIGNALED } else { 0 })
            })
            .collect();
        a.d.post_send(&mut a.qp, &wrs).unwrap();
        let c = wait1(&a.d, &mut a.cq);
        assert_eq!(
            (c.wr_id, c.status),
            (1099, abi::WC_SUCCESS),
            "round {round}"
        );
    }
    println!("stats A: {:?}", a.d.stats());

    // Bad rkey: REM_ACCESS_ERR, QP_FATAL; receives posted in ERR get flushed.
    a.d.post_send(
        &mut a.qp,
        &[SendWr::write(
            9,
            &[a.mr.sge(0, 8)],
            b.mr.iova,
            b.mr.rkey ^ 0x100,
        )],
    )
    .unwrap();
    let c = wait1(&a.d, &mut a.cq);
    assert_eq!(c.status, abi::WC_REM_ACCESS_ERR);
    assert_eq!(a.qp.state(), abi::QPS_ERR);
    let ev = a.d.wait_event(Duration::from_secs(5)).expect("fatal event");
    assert_eq!((ev.kind, ev.handle), (abi::EV_QP_FATAL, a.qp.qpn()));
    a.d.post_recv(&mut a.qp, &[RecvWr::new(55, &[])]).unwrap();
    let c = wait1(&a.d, &mut a.cq);
    assert_eq!(
        (c.wr_id, c.status, c.opcode),
        (55, abi::WC_WR_FLUSH_ERR, abi::WC_OP_RECV)
    );

    // Teardown order.
    assert_eq!(
        b.d.destroy_cq(&mut b.cq).unwrap_err().status(),
        Some(abi::STATUS_BUSY)
    );
    b.d.destroy_qp(&mut b.qp).unwrap();
    b.d.destroy_cq(&mut b.cq).unwrap();
    b.d.dereg_mr(b.mr).unwrap();
    b.d.dealloc_pd(b.pd).unwrap();
    b.d.free_buffer(b.buf);

    // Reset with outstanding receives: flush completions remain pollable.
    let mut a2 = side(&va2(&fabric), abi::QPT_RC);
    let _ = &mut a2;
    a.d.destroy_qp(&mut a.qp).unwrap();
    let mut qp = a.d.create_qp(a.pd, &QpInitAttr::rc(&a.cq)).unwrap();
    a.d.connect_rc(&qp, 0x123, gb).unwrap();
    a.d.post_recv(&mut qp, &[RecvWr::new(66, &[]), RecvWr::new(67, &[])])
        .unwrap();
    while a.d.poll_cq(&mut a.cq, &mut [Cqe::default(); 8]) > 0 {}
    a.d.reset_device().unwrap();
    let v = a.d.poll_cq_until(&mut a.cq, 2, Duration::from_secs(1));
    assert_eq!(
        v.iter().map(|c| (c.wr_id, c.status)).collect::<Vec<_>>(),
        [(66, abi::WC_WR_FLUSH_ERR), (67, abi::WC_WR_FLUSH_ERR)]
    );
    a.d.release_qp(qp);
    a.d.release_cq(a.cq);
    a.d.reinitialize().unwrap();
    let _pd = a.d.alloc_pd().unwrap();
    let _cq = a.d.create_cq(16).unwrap();
}

fn va2(f: &Arc<SoftFabric>) -> Vm {
    Vm::new(f, 3)
}

#[test]
fn ud_end_to_end() {
    let fabric = SoftFabric::new();
    let (va, vb) = (Vm::new(&fabric, 1), Vm::new(&fabric, 2));
    let mut a = side(&va, abi::QPT_UD);
    let mut b = side(&vb, abi::QPT_UD);
    a.d.connect_ud(&a.qp, 0x11).unwrap();
    b.d.connect_ud(&b.qp, 0x11).unwrap();
    let ah =
        a.d.create_ah(a.pd, &ah_attr_for(b.d.gid().unwrap()))
            .unwrap();
    b.d.post_recv(&mut b.qp, &[RecvWr::new(1, &[b.mr.sge(0, 4096 + 40)])])
        .unwrap();
    a.buf.fill_pattern(5);
    a.d.post_send(
        &mut a.qp,
        &[SendWr::ud_send(
            2,
            &[a.mr.sge(0, 4096)],
            ah,
            b.qp.qpn(),
            0x11,
        )],
    )
    .unwrap();
    assert_eq!(wait1(&a.d, &mut a.cq).status, abi::WC_SUCCESS);
    let c = wait1(&b.d, &mut b.cq);
    assert_eq!(
        (c.status, c.byte_len, c.src_qp, c.wc_flags & abi::WC_F_GRH),
        (abi::WC_SUCCESS, 4136, a.qp.qpn(), abi::WC_F_GRH)
    );
    assert_eq!(b.buf.read_vec(40, 4096), pattern(5, 4096));
    assert_eq!(b.buf.read_vec(8, 16), a.d.gid().unwrap().raw);
}

#[test]
fn threads_and_hostile_ctrl() {
    let fabric = SoftFabric::new();
    let (va, vb) = (Vm::new(&fabric, 1), Vm::new(&fabric, 2));
    let mut a = side(&va, abi::QPT_RC);
    let mut b = side(&vb, abi::QPT_RC);
    let (ga, gb) = (a.d.gid().unwrap(), b.d.gid().unwrap());
    a.d.connect_rc(&a.qp, b.qp.qpn(), gb).unwrap();
    b.d.connect_rc(&b.qp, a.qp.qpn(), ga).unwrap();
    // Raw: unknown command, bad length.
    let (st, _) = a.d.ctrl(999, &[], &[], 0).unwrap();
    assert_eq!(st, abi::STATUS_UNSUPPORTED);
    let (st, _) = a.d.ctrl(abi::CMD_REG_MR, &[0; 8], &[], 8).unwrap();
    assert_eq!(st, abi::STATUS_BAD_LENGTH);
    let (len, _) =
        a.d.ctrl_raw(&[&[abi::CMD_CREATE_PD as u8, 0, 0, 0, 0, 0, 0, 0]], 4)
            .unwrap();
    assert_eq!(len, 0);
    // Ping-pong between two threads.
    let n = 2000u64;
    let tb = std::thread::spawn(move || {
        for i in 0..n {
            b.d.post_recv(&mut b.qp, &[RecvWr::new(i, &[b.mr.sge(0, 64)])])
                .unwrap();
            let c = loop {
                let v = b.d.poll_cq_until(&mut b.cq, 1, Duration::from_secs(5));
                if !v.is_empty() {
                    break v[0];
                }
            };
            assert_eq!(c.status, abi::WC_SUCCESS);
            if c.opcode == abi::WC_OP_RECV {
                b.d.post_send(&mut b.qp, &[SendWr::send(i, &[b.mr.sge(0, 64)])])
                    .unwrap();
                let c = wait1(&b.d, &mut b.cq);
                assert_eq!(c.status, abi::WC_SUCCESS);
            }
        }
        b
    });
    let t0 = std::time::Instant::now();
    for i in 0..n {
        a.d.post_recv(&mut a.qp, &[RecvWr::new(i, &[a.mr.sge(0, 64)])])
            .unwrap();
        a.d.post_send(&mut a.qp, &[SendWr::send(i, &[a.mr.sge(64, 64)])])
            .unwrap();
        let mut got = 0;
        while got < 2 {
            let v =
                a.d.poll_cq_until(&mut a.cq, 2 - got, Duration::from_secs(5));
            assert!(!v.is_empty());
            for c in &v {
                assert_eq!(c.status, abi::WC_SUCCESS, "{c:?}");
            }
            got += v.len();
        }
    }
    println!(
        "{} round trips in {:?}; stats {:?}",
        n,
        t0.elapsed(),
        a.d.stats()
    );
    let _b = tb.join().unwrap();
}

#[test]
fn big_mrs_and_queries() {
    let fabric = SoftFabric::new();
    let (va, vb) = (Vm::new(&fabric, 1), Vm::new(&fabric, 2));
    let mut a = side(&va, abi::QPT_RC);
    let b = side(&vb, abi::QPT_RC);
    assert_eq!(a.d.query_device().unwrap(), *a.d.config());
    assert_eq!(a.d.query_port(1).unwrap().state, abi::PORT_ACTIVE);
    a.d.set_intr_moderation(4, 100).unwrap();
    let (ga, gb) = (a.d.gid().unwrap(), b.d.gid().unwrap());
    a.d.connect_rc(&a.qp, b.qp.qpn(), gb).unwrap();
    b.d.connect_rc(&b.qp, a.qp.qpn(), ga).unwrap();
    // 8 MiB source with 4 KiB pages (16 KiB page list, split in 4 descriptors) → 8 MiB sink
    // with 2 MiB pages.
    let src = a.d.alloc_buffer(8 << 20, Layout::Discontiguous).unwrap();
    let dst =
        b.d.alloc_buffer_with_page_shift(8 << 20, 21, Layout::Discontiguous)
            .unwrap();
    let smr = a.d.reg_mr(a.pd, &src, abi::ACCESS_LOCAL_WRITE).unwrap();
    assert_eq!(smr.rkey, 0);
    let dmr = b.d.reg_mr(b.pd, &dst, ACCESS_ALL).unwrap();
    src.fill_pattern(99);
    let sges: Vec<_> = (0..4).map(|i| smr.sge(i * (2 << 20), 2 << 20)).collect();
    a.d.post_send(&mut a.qp, &[SendWr::write(1, &sges, dmr.iova, dmr.rkey)])
        .unwrap();
    let c = wait1(&a.d, &mut a.cq);
    assert_eq!(c.status, abi::WC_SUCCESS);
    assert_eq!(dst.to_vec(), pattern(99, 8 << 20));
    // Sub-range MR: out-of-bounds access fails locally.
    let sub =
        a.d.reg_mr_range(a.pd, &src, 4096 + 7, 100, abi::ACCESS_LOCAL_WRITE)
            .unwrap();
    a.d.post_send(
        &mut a.qp,
        &[SendWr::write(2, &[sub.sge(50, 51)], dmr.iova, dmr.rkey)],
    )
    .unwrap();
    let c = wait1(&a.d, &mut a.cq);
    assert_eq!(
        (c.status, c.vendor_err),
        (abi::WC_LOC_PROT_ERR, abi::VENDOR_ERR_BAD_SGE)
    );
    assert_eq!(
        a.d.wait_event(Duration::from_millis(100)).map(|e| e.kind),
        Some(abi::EV_QP_FATAL)
    );
    assert_eq!(a.d.wait_event(Duration::from_millis(50)), None);
    // Hostile: overrun the SQ with raw prod.
    let mut qp = b.d.create_qp(b.pd, &QpInitAttr::rc(&b.cq)).unwrap();
    b.d.connect_rc(&qp, 0x100, ga).unwrap();
    let depth = qp.caps().max_send_wr;
    b.d.set_sq_prod(&mut qp, depth + 5).unwrap();
    b.d.ring_sq_doorbell(abi::handle_index(qp.qpn())).unwrap();
    let ev = b.d.wait_event(Duration::from_secs(1)).unwrap();
    assert_eq!(
        (ev.kind, ev.handle, ev.detail),
        (
            abi::EV_QP_FATAL,
            qp.qpn(),
            abi::VENDOR_ERR_RING_OVERRUN as u64
        )
    );
    println!("b state {}", b.d.qp_state(&qp).unwrap());
}
