//! RoCEv2 over UDP: two guests, each on its own fabric with its own gateway and IP address
//! (127.0.x.y on loopback), so they share nothing but the network. Data is compared byte for
//! byte and completions are counted exactly.

mod common;

use std::net::{IpAddr, Ipv4Addr, UdpSocket};
use std::time::{Duration, Instant};

use common::*;
use vrdma_abi as abi;
use vrdma_device::soft::wire::Faults;
use vrdma_guest::{pattern, RecvWr, SendWr};
use vrdma_tests::wire::{connect, wire_node, WireNode};

const OK: u8 = abi::WC_SUCCESS;

/// A loopback address private to one test (tests run in parallel; each binds `ip:4791`).
fn ip(test: u8, node: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 100 + test, node))
}

fn pair(test: u8, buf: u64, faults: Option<Faults>) -> (WireNode, WireNode) {
    let a = wire_node(ip(test, 1), buf, faults).expect("node a");
    let b = wire_node(
        ip(test, 2),
        buf,
        faults.map(|f| Faults {
            seed: f.seed ^ 0x5555,
            ..f
        }),
    )
    .expect("node b");
    (a, b)
}

#[test]
fn rc_operations_cross_the_wire_segmented() {
    let (mut a, mut b) = pair(1, 1 << 20, None);
    let mut qa = a.rc_qp(64).unwrap();
    let mut qb = b.rc_qp(64).unwrap();
    // MTU 1024: a 10,000-byte message is 10 packets (FIRST, 8 MIDDLE, LAST).
    connect(&a, &qa, &b, &qb, abi::MTU_1024, 12).unwrap();
    let data = pattern(7, 10_000);
    a.buf.write(0, &data);

    // WRITE: A's [0, 10000) into B's [100_000, ...).
    let raddr = b.mr.addr(100_000);
    a.d.post_send(
        &mut qa,
        &[SendWr::write(1, &[a.mr.sge(0, 10_000)], raddr, b.mr.rkey)],
    )
    .unwrap();
    let c = poll_exact(&a.d, &mut a.cq, 1);
    assert_eq!(
        (c[0].wr_id, c[0].status),
        (1, OK),
        "{c:?} {:?} {:?}",
        a.gw.stats(),
        b.gw.stats()
    );
    assert_eq!(b.buf.read_vec(100_000, 10_000), data);

    // SEND with immediate into a posted RECV (multi-packet).
    b.d.post_recv(&mut qb, &[RecvWr::new(50, &[b.mr.sge(200_000, 16_384)])])
        .unwrap();
    a.d.post_send(
        &mut qa,
        &[SendWr::send_imm(2, &[a.mr.sge(0, 5_000)], 0xfeed_beef)],
    )
    .unwrap();
    let c = poll_exact(&a.d, &mut a.cq, 1);
    assert_eq!((c[0].wr_id, c[0].status), (2, OK));
    let r = poll_exact(&b.d, &mut b.cq, 1);
    assert_eq!((r[0].wr_id, r[0].status, r[0].byte_len), (50, OK, 5_000));
    assert_eq!(r[0].imm_data, 0xfeed_beef);
    assert_eq!(b.buf.read_vec(200_000, 5_000), data[..5_000]);

    // READ: B's [100_000, +9000) back into A's [300_000, ...) (9 response packets).
    a.d.post_send(
        &mut qa,
        &[SendWr::read(
            3,
            &[a.mr.sge(300_000, 9_000)],
            raddr,
            b.mr.rkey,
        )],
    )
    .unwrap();
    let c = poll_exact(&a.d, &mut a.cq, 1);
    assert_eq!((c[0].wr_id, c[0].status, c[0].byte_len), (3, OK, 9_000));
    assert_eq!(a.buf.read_vec(300_000, 9_000), data[..9_000]);

    // Atomics: fetch-add three times, then compare-and-swap.
    b.buf.write_u64(400_000, 1000);
    let target = b.mr.addr(400_000);
    for i in 0..3u64 {
        a.d.post_send(
            &mut qa,
            &[SendWr::fetch_add(
                10 + i,
                &[a.mr.sge(500_000 + 8 * i, 8)],
                target,
                b.mr.rkey,
                5,
            )],
        )
        .unwrap();
    }
    let c = poll_exact(&a.d, &mut a.cq, 3);
    assert!(c.iter().all(|c| c.status == OK), "{c:?}");
    for i in 0..3u64 {
        assert_eq!(a.buf.read_u64(500_000 + 8 * i), 1000 + 5 * i);
    }
    a.d.post_send(
        &mut qa,
        &[SendWr::cmp_swap(
            20,
            &[a.mr.sge(600_000, 8)],
            target,
            b.mr.rkey,
            1015,
            42,
        )],
    )
    .unwrap();
    let c = poll_exact(&a.d, &mut a.cq, 1);
    assert_eq!(c[0].status, OK);
    assert_eq!(a.buf.read_u64(600_000), 1015);
    assert_eq!(b.buf.read_u64(400_000), 42);

    // Nothing was dropped for a bad ICRC or a parse error.
    for n in [&a, &b] {
        let s = n.gw.stats();
        assert_eq!((s.rx_bad_icrc, s.rx_malformed), (0, 0), "{s:?}");
        assert!(s.tx_datagrams >= 10, "{s:?}");
    }
}

/// 1 % loss, 1 % reordering and 1 % duplication on both sides: every WR completes exactly
/// once, in order, with byte-exact data.
#[test]
fn faults_lose_nothing_duplicate_nothing_reorder_nothing() {
    let f = |k: &str| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.01)
    };
    let faults = Faults {
        loss: f("WIRE_LOSS"),
        reorder: f("WIRE_REORDER"),
        duplicate: f("WIRE_DUP"),
        seed: 0x1234_5678,
    };
    let (mut a, mut b) = pair(2, 4 << 20, Some(faults));
    let mut qa = a.rc_qp(256).unwrap();
    let mut qb = b.rc_qp(256).unwrap();
    // MTU 1024, ACK timeout 4.096 µs × 2^12 ≈ 17 ms: a lost tail costs one timeout; gaps
    // before it are repaired at once by PSN-sequence NAKs.
    connect(&a, &qa, &b, &qb, abi::MTU_1024, 12).unwrap();
    const N: u64 = 1500;
    const LEN: u64 = 2500; // 3 packets per message
    const WINDOW: u64 = 64;
    let (mut posted, mut done, mut received) = (0u64, 0u64, 0u64);
    let mut recv_posted = 0u64;
    let raddr = |i: u64| b.mr.addr((i % 512) * 4096);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut cqes = vec![abi::Cqe::default(); 64];
    while received < N || done < N {
        assert!(
            Instant::now() < deadline,
            "stuck: posted {posted} done {done} received {received}"
        );
        while recv_posted < N && recv_posted < received + 128 {
            b.d.post_recv(&mut qb, &[RecvWr::new(recv_posted, &[])])
                .unwrap();
            recv_posted += 1;
        }
        while posted < N && posted < done + WINDOW && posted < received + 500 {
            let slot = (posted % 512) * 4096;
            a.buf.write(slot, &pattern(posted, LEN as usize));
            a.d.post_send(
                &mut qa,
                &[SendWr::write_imm(
                    posted,
                    &[a.mr.sge(slot, LEN as u32)],
                    raddr(posted),
                    b.mr.rkey,
                    posted as u32,
                )],
            )
            .unwrap();
            posted += 1;
        }
        let n = a.d.poll_cq(&mut a.cq, &mut cqes);
        for c in &cqes[..n] {
            assert_eq!(
                (c.wr_id, c.status),
                (done, OK),
                "sender completion out of order {:?} {:?}",
                a.gw.stats(),
                b.gw.stats()
            );
            done += 1;
        }
        let n = b.d.poll_cq(&mut b.cq, &mut cqes);
        for c in &cqes[..n] {
            assert_eq!(c.status, OK);
            assert_eq!(c.wr_id, received, "receive completions in order");
            assert_eq!(c.imm_data as u64, received, "exactly once, in order");
            assert_eq!(c.byte_len as u64, LEN);
            let slot = (received % 512) * 4096;
            assert_eq!(
                b.buf.read_vec(slot, LEN as usize),
                pattern(received, LEN as usize),
                "message {received}"
            );
            received += 1;
        }
        if n == 0 {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
    assert_cq_empty(&a.d, &mut a.cq, QUIET);
    assert_cq_empty(&b.d, &mut b.cq, QUIET);
    let (sa, sb) = (a.gw.stats(), b.gw.stats());
    // The dice did roll: faults happened on both sides.
    assert!(
        sa.faults.0 > 0 && sa.faults.1 > 0 && sa.faults.2 > 0,
        "{sa:?}"
    );
    assert!(sb.faults.0 + sb.faults.1 + sb.faults.2 > 0, "{sb:?}");
    eprintln!("faults a {sa:?}\nfaults b {sb:?}");
}

/// A peer that goes away: the sender's WRs end with retry-exceeded (then flush), within the
/// configured timeout and retry budget, and nothing hangs.
#[test]
fn peer_death_gives_retry_exceeded() {
    let (mut a, b) = pair(3, 1 << 20, None);
    let mut qa = a.rc_qp(64).unwrap();
    let qb = b.rc_qp(64).unwrap();
    let mut p = a.params(qb.qpn(), b.gid(), abi::MTU_1024, 8);
    p.retry_cnt = 3;
    a.d.connect_rc_with(&qa, &p).unwrap();
    let pb = b.params(qa.qpn(), a.gid(), abi::MTU_1024, 8);
    b.d.connect_rc_with(&qb, &pb).unwrap();
    let raddr = b.mr.addr(0);
    let rkey = b.mr.rkey;
    a.d.post_send(
        &mut qa,
        &[SendWr::write(1, &[a.mr.sge(0, 64)], raddr, rkey)],
    )
    .unwrap();
    assert_eq!(poll_exact(&a.d, &mut a.cq, 1)[0].status, OK);
    drop(b);
    let t = Instant::now();
    for i in 0..4 {
        a.d.post_send(
            &mut qa,
            &[SendWr::write(10 + i, &[a.mr.sge(0, 64)], raddr, rkey)],
        )
        .unwrap();
    }
    let c = a.d.poll_cq_until(&mut a.cq, 4, Duration::from_secs(5));
    let took = t.elapsed();
    assert_eq!(c.len(), 4, "{c:?}");
    assert_eq!((c[0].wr_id, c[0].status), (10, abi::WC_RETRY_EXC_ERR));
    assert!(
        c[1..].iter().all(|c| c.status == abi::WC_WR_FLUSH_ERR),
        "{c:?}"
    );
    // 4 attempts of ~1 ms each (timeout 8); generous bound for a loaded machine.
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert_cq_empty(&a.d, &mut a.cq, QUIET);
}

/// Garbage, bad ICRCs, unknown QPNs, forged PSNs, bad rkeys and bad segment sizes sent to a
/// gateway from a raw socket: dropped or NAKed, never a panic; the device keeps working.
#[test]
fn malformed_datagrams_are_dropped() {
    use vrdma_roce::{icrc, icrc_bytes, opcode, write_headers, Bth, Headers, IpPair, Reth};
    let (mut a, b) = pair(4, 1 << 20, None);
    let mut qa = a.rc_qp(64).unwrap();
    let qb = b.rc_qp(64).unwrap();
    connect(&a, &qa, &b, &qb, abi::MTU_1024, 10).unwrap();
    let evil = UdpSocket::bind((ip(4, 9), 0)).unwrap();
    let to = (ip(4, 2), 4791);
    let evil_port = evil.local_addr().unwrap().port();
    let build = |op: u8, qpn: u32, psn: u32, reth: Option<Reth>, payload: &[u8], good_crc: bool| {
        let mut h = Headers::new(Bth::new(op, qpn, psn));
        h.reth = reth;
        let mut d = Vec::new();
        write_headers(&h, payload.len(), &mut d).unwrap();
        d.extend_from_slice(payload);
        d.resize(d.len() + (4 - payload.len() % 4) % 4, 0);
        let ips = IpPair {
            src: ip(4, 9),
            dst: ip(4, 2),
        };
        let mut crc = icrc(&ips, evil_port, 4791, &[&d]);
        if !good_crc {
            crc ^= 1;
        }
        d.extend_from_slice(&icrc_bytes(crc));
        d
    };
    let rkey = b.mr.rkey;
    let base = b.mr.addr(0);
    let reth = |va: u64, len: u32, rkey: u32| {
        Some(Reth {
            va,
            rkey,
            dma_len: len,
        })
    };
    let mut sent = 0;
    let mut send = |d: &[u8]| {
        evil.send_to(d, to).unwrap();
        sent += 1;
    };
    // Garbage of every short length and some random-looking bytes.
    for n in 0..64usize {
        send(&pattern(n as u64, n));
    }
    // Bad ICRC on a well-formed WRITE.
    send(&build(
        opcode::RC_WRITE_ONLY,
        qb.qpn(),
        0,
        reth(base, 4, rkey),
        b"evil",
        false,
    ));
    // Unknown QPN, forged PSN, bad rkey, out-of-bounds address (from an address that is not
    // the QP's peer, so rxe-style source checks drop them too).
    send(&build(
        opcode::RC_WRITE_ONLY,
        0x00ff_ff00,
        0,
        reth(base, 4, rkey),
        b"evil",
        true,
    ));
    send(&build(
        opcode::RC_WRITE_ONLY,
        qb.qpn(),
        0x77_7777,
        reth(base, 4, rkey),
        b"evil",
        true,
    ));
    send(&build(
        opcode::RC_WRITE_ONLY,
        qb.qpn(),
        0,
        reth(base, 4, rkey ^ 0x100),
        b"evil",
        true,
    ));
    send(&build(
        opcode::RC_WRITE_ONLY,
        qb.qpn(),
        0,
        reth(u64::MAX - 2, 4, rkey),
        b"evil",
        true,
    ));
    // RETH length that does not match the payload; a FIRST with a non-MTU segment; a LAST
    // with nothing before it; a MIDDLE with no FIRST.
    send(&build(
        opcode::RC_WRITE_ONLY,
        qb.qpn(),
        0,
        reth(base, 4000, rkey),
        b"evil",
        true,
    ));
    send(&build(
        opcode::RC_WRITE_FIRST,
        qb.qpn(),
        0,
        reth(base, 4000, rkey),
        &[1; 1000],
        true,
    ));
    send(&build(
        opcode::RC_WRITE_LAST,
        qb.qpn(),
        1,
        None,
        &[1; 100],
        true,
    ));
    send(&build(
        opcode::RC_SEND_MIDDLE,
        qb.qpn(),
        1,
        None,
        &[1; 1024],
        true,
    ));
    assert!(wait_until(LONG, || b.gw.stats().rx_datagrams >= sent as u64));
    let s = b.gw.stats();
    assert!(s.rx_malformed >= 60, "{s:?}");
    assert!(s.rx_bad_icrc >= 1, "{s:?}");
    // B's memory was not touched by any of it.
    assert!(b.buf.read_vec(0, 64).iter().all(|&x| x == 0));
    // And the real connection still works.
    let data = pattern(3, 3000);
    a.buf.write(0, &data);
    a.d.post_send(
        &mut qa,
        &[SendWr::write(1, &[a.mr.sge(0, 3000)], base + 8192, rkey)],
    )
    .unwrap();
    assert_eq!(poll_exact(&a.d, &mut a.cq, 1)[0].status, OK);
    assert_eq!(b.buf.read_vec(8192, 3000), data);
    assert!(b.buf.read_vec(0, 64).iter().all(|&x| x == 0));
}

/// UD across the wire: datagrams with and without immediate data reach the right QP with the
/// sender's QPN (from the DETH), a GRH carrying the sender's GID, and the right Q_Key; a wrong
/// Q_Key is dropped.
#[test]
fn ud_datagrams_cross_the_wire() {
    use vrdma_guest::{ah_attr_for, QpInitAttr};
    const QKEY: u32 = 0x2222_0002;
    let (mut a, mut b) = pair(5, 1 << 20, None);
    let ud = |n: &WireNode| {
        n.d.create_qp(
            n.pd,
            &QpInitAttr {
                qp_type: abi::QPT_UD,
                ..QpInitAttr::rc(&n.cq)
            },
        )
        .unwrap()
    };
    let (mut qa, mut qb) = (ud(&a), ud(&b));
    a.d.connect_ud(&qa, 0x1111_0001).unwrap();
    b.d.connect_ud(&qb, QKEY).unwrap();
    let ah = a.d.create_ah(a.pd, &ah_attr_for(b.gid())).unwrap();
    let data = pattern(9, 4000);
    a.buf.write(0, &data);
    b.d.post_recv(
        &mut qb,
        &[
            RecvWr::new(300, &[b.mr.sge(0, 40 + 2000)]),
            RecvWr::new(301, &[b.mr.sge(8192, 40 + 2000)]),
        ],
    )
    .unwrap();
    a.d.post_send(
        &mut qa,
        &[
            SendWr::ud_send(1, &[a.mr.sge(0, 1000)], ah, qb.qpn(), QKEY ^ 1),
            SendWr::ud_send(2, &[a.mr.sge(0, 1500)], ah, qb.qpn(), QKEY),
            SendWr::ud_send(3, &[a.mr.sge(1500, 2000)], ah, qb.qpn(), QKEY).with_imm(0xabcd),
        ],
    )
    .unwrap();
    let c = poll_exact(&a.d, &mut a.cq, 3);
    assert!(c.iter().all(|c| c.status == OK), "{c:?}");
    let r = poll_exact(&b.d, &mut b.cq, 2);
    assert_eq!(
        (r[0].wr_id, r[0].status, r[0].byte_len, r[0].src_qp),
        (300, OK, 1540, qa.qpn())
    );
    assert_eq!(
        (r[1].wr_id, r[1].status, r[1].byte_len, r[1].src_qp),
        (301, OK, 2040, qa.qpn())
    );
    assert_eq!(r[1].imm_data, 0xabcd);
    assert_ne!(r[1].wc_flags & abi::WC_F_WITH_IMM, 0);
    assert_eq!(b.buf.read_vec(8, 16), a.gid().raw, "GRH source GID");
    assert_eq!(b.buf.read_vec(40, 1500), data[..1500]);
    assert_eq!(b.buf.read_vec(8192 + 40, 2000), data[1500..3500]);
}
