//! Fuzz target: bytes → WQEs in the SQs and RQs of a connected QP pair between two guests
//! (real devices on one soft fabric, real transports, the real guest driver), then doorbells.
//!
//! Input format (little-endian; a short input reads as zeros):
//!
//! ```text
//! u8 mode        bit 0: UD instead of RC
//! records until the input ends (at most 64):
//!   u8 op        op % 10:
//!     0..=3      raw WQE: side = op & 1, queue = SQ if op < 2 else RQ; u8 len, len bytes
//!                (written at the side's next producer slot, published later)
//!     4..=5      "plausible" send WQE on side op & 1: 64 header bytes, then u8 n and n SGEs of
//!                (u8 lkey selector, u32 offset, u32 length); lkeys, rkey, remote address and
//!                AH are rebased onto the real MRs/AH by selector bits
//!     6          publish the producer indices of side (u8 & 1) and ring its SQ doorbell
//!     7          raw producer index: u8 which (bit 0 side, bit 1 RQ), u32 value
//!     8          move side (u8 & 1) to ERR
//!     9          CQ arm garbage on side (u8 & 1): u32 arm_cons, u32 arm; ring the CQ doorbell
//! ```
//!
//! Invariants: no panic; memory outside the MRs (canaries around them and the guests' low
//! memory) unchanged; every CQE has a known status; after the input both devices answer
//! QUERY_DEVICE and every WQE is accounted for after both QPs went to ERR (at most one
//! completion per posted WQE unless the input overran a ring).
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use vm_memory::{ByteValued, Bytes, GuestAddress};
use vrdma_abi as abi;
use vrdma_abi::{Cqe, SendWqe, Sge};
use vrdma_device::soft::SoftFabric;
use vrdma_device_fuzz::Input;
use vrdma_guest::{
    ah_attr_for, pattern, Ah, Buffer, Cq, Driver, GuestAlloc, Layout, Mr, Pd, Qp, QpInitAttr,
    RcParams,
};
use vrdma_tests::{Vm, ALLOC_BASE};

const MR_LEN: u64 = 16 << 10;
const LOW: (u64, u64) = (0x1000, 0x2_0000);
const QKEY: u32 = 0x1111;

struct Side {
    d: Driver,
    pd: Pd,
    buf: Buffer,
    mr: Mr,
    cq: Cq,
    qp: Qp,
    ah: Ah,
    sq_prod: u32,
    rq_prod: u32,
    posted: usize,
}

fn canaries_ok(s: &Side, seed: u64) -> bool {
    let all = pattern(seed, 3 * MR_LEN as usize);
    let m = MR_LEN as usize;
    let mut low = vec![0u8; (LOW.1 - LOW.0) as usize];
    s.d.mem().read_slice(&mut low, GuestAddress(LOW.0)).unwrap();
    s.buf.read_vec(0, m) == all[..m]
        && s.buf.read_vec(2 * MR_LEN, m) == all[2 * m..]
        && low == pattern(seed + 1, low.len())
}

fn publish(s: &mut Side) {
    let sq = s.qp.sq().clone();
    let rq = s.qp.rq().clone();
    let _ = s.d.write_ring_u32(&rq, abi::RING_PROD_OFFSET, s.rq_prod);
    let _ = s.d.write_ring_u32(&sq, abi::RING_PROD_OFFSET, s.sq_prod);
    let _ = s.d.ring_sq_doorbell(abi::handle_index(s.qp.qpn()));
}

fn poll(s: &mut Side, out: &mut Vec<Cqe>) {
    let mut buf = [Cqe::default(); 64];
    loop {
        let n = s.d.poll_cq(&mut s.cq, &mut buf);
        if n == 0 {
            return;
        }
        out.extend_from_slice(&buf[..n]);
    }
}

/// Polls both CQs until they stay quiet for a millisecond (most work runs synchronously inside
/// the doorbell), or until `max` (retry and RNR timers).
fn settle(sides: &mut [Side], got: &mut [Vec<Cqe>; 2], max: Duration) {
    let start = Instant::now();
    let mut quiet = Instant::now();
    while start.elapsed() < max && quiet.elapsed() < Duration::from_millis(1) {
        for (i, s) in sides.iter_mut().enumerate() {
            let before = got[i].len();
            poll(s, &mut got[i]);
            if got[i].len() != before {
                quiet = Instant::now();
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let ud = inp.u8() & 1 != 0;
    let qp_type = if ud { abi::QPT_UD } else { abi::QPT_RC };
    let fabric = SoftFabric::new();
    let vms = [Vm::new(&fabric, 1), Vm::new(&fabric, 2)];
    let mut sides: Vec<Side> = vms
        .iter()
        .enumerate()
        .map(|(i, vm)| {
            let d = Driver::probe(
                vm.port(),
                vm.mem.clone(),
                GuestAlloc::new(GuestAddress(ALLOC_BASE), 32 << 20),
            )
            .expect("probe");
            let pd = d.alloc_pd().unwrap();
            let buf = d.alloc_buffer(3 * MR_LEN, Layout::Contiguous).unwrap();
            buf.fill_pattern(10 + i as u64);
            let mr = d
                .reg_mr_range(pd, &buf, MR_LEN, MR_LEN, abi::ACCESS_ALL)
                .unwrap();
            let low = pattern(11 + i as u64, (LOW.1 - LOW.0) as usize);
            vm.mem.write_slice(&low, GuestAddress(LOW.0)).unwrap();
            let cq = d.create_cq(1024).unwrap();
            let attr = QpInitAttr {
                qp_type,
                sq_sig_all: true,
                max_send_wr: 16,
                max_recv_wr: 16,
                ..QpInitAttr::rc(&cq)
            };
            let qp = d.create_qp(pd, &attr).unwrap();
            Side {
                ah: Ah(0),
                d,
                pd,
                buf,
                mr,
                cq,
                qp,
                sq_prod: 0,
                rq_prod: 0,
                posted: 0,
            }
        })
        .collect();
    let gids = [sides[0].d.gid().unwrap(), sides[1].d.gid().unwrap()];
    let qpns = [sides[0].qp.qpn(), sides[1].qp.qpn()];
    for i in 0..2 {
        let s = &mut sides[i];
        if ud {
            s.d.connect_ud(&s.qp, QKEY).unwrap();
        } else {
            let p = RcParams {
                timeout: 8,
                retry_cnt: 1,
                rnr_retry: 1,
                ..s.d.rc_params(qpns[1 - i], gids[1 - i])
            };
            s.d.connect_rc_with(&s.qp, &p).unwrap();
        }
        s.ah = s.d.create_ah(s.pd, &ah_attr_for(gids[1 - i])).unwrap();
    }
    let keys = [
        (sides[0].mr.lkey, sides[0].mr.iova),
        (sides[1].mr.lkey, sides[1].mr.iova),
    ];
    let mut overran = false;
    let mut records = 0;
    while !inp.is_empty() && records < 64 {
        records += 1;
        let op = inp.u8() % 10;
        match op {
            0..=3 => {
                let i = (op & 1) as usize;
                let s = &mut sides[i];
                let len = inp.u8() as usize;
                let bytes = inp.bytes(len);
                if op < 2 {
                    let stride = s.qp.sq().stride() as usize;
                    let _ =
                        s.d.write_sq_slot(&s.qp, s.sq_prod, &bytes[..bytes.len().min(stride)]);
                    s.sq_prod = s.sq_prod.wrapping_add(1);
                } else {
                    let stride = s.qp.rq().stride() as usize;
                    let _ =
                        s.d.write_rq_slot(&s.qp, s.rq_prod, &bytes[..bytes.len().min(stride)]);
                    s.rq_prod = s.rq_prod.wrapping_add(1);
                }
                s.posted += 1;
            }
            4 | 5 => {
                let i = (op & 1) as usize;
                let mut hdr_bytes = [0u8; 64];
                let b = inp.bytes(64);
                hdr_bytes[..b.len()].copy_from_slice(b);
                let mut w = SendWqe::from_slice(&hdr_bytes).copied().unwrap_or_default();
                // The header's last field picks fix-ups (low byte) and, for a WQE that carries
                // its SGE in the header, an offset into the sender's MR (the rest).
                let sel = w.hdr_sge_addr;
                let (peer_key, peer_iova) = keys[1 - i];
                if sel & 1 != 0 {
                    w.rkey = peer_key;
                    w.remote_addr = peer_iova + w.remote_addr % (MR_LEN + 1);
                }
                if sel & 2 != 0 {
                    w.ah = sides[i].ah.0;
                    w.remote_qpn = qpns[1 - i];
                    w.compare_add = QKEY as u64;
                }
                w.hdr_sge_addr = if sel & 4 != 0 {
                    let (key, iova) = keys[i];
                    w.ah = key;
                    iova + (sel >> 8) % (MR_LEN + 1)
                } else {
                    sel >> 8
                };
                let mut slot = w.as_slice().to_vec();
                let n = inp.u8() % 8;
                for _ in 0..n {
                    let ks = inp.u8();
                    let off = inp.u32() as u64;
                    let length = inp.u32();
                    let (key, iova) = keys[(ks as usize >> 1) & 1 ^ i];
                    let sge = Sge {
                        addr: if ks & 4 != 0 {
                            off
                        } else {
                            iova + off % (MR_LEN + 1)
                        },
                        length,
                        lkey: if ks & 8 != 0 {
                            key ^ u32::from(ks)
                        } else {
                            key
                        },
                    };
                    slot.extend_from_slice(sge.as_slice());
                }
                let s = &mut sides[i];
                slot.truncate(s.qp.sq().stride() as usize);
                let _ = s.d.write_sq_slot(&s.qp, s.sq_prod, &slot);
                s.sq_prod = s.sq_prod.wrapping_add(1);
                s.posted += 1;
            }
            6 => {
                let i = (inp.u8() & 1) as usize;
                publish(&mut sides[i]);
            }
            7 => {
                let which = inp.u8();
                let v = inp.u32();
                let s = &mut sides[(which & 1) as usize];
                if which & 2 != 0 {
                    s.rq_prod = v;
                } else {
                    s.sq_prod = v;
                }
                overran = true;
            }
            8 => {
                let s = &mut sides[(inp.u8() & 1) as usize];
                let err = abi::QpAttr {
                    qp_state: abi::QPS_ERR,
                    ..Default::default()
                };
                let _ = s.d.modify_qp(&s.qp, &err, abi::QP_ATTR_STATE);
            }
            _ => {
                let s = &mut sides[(inp.u8() & 1) as usize];
                let (arm_cons, arm) = (inp.u32(), inp.u32());
                let ring = s.cq.ring().clone();
                let _ =
                    s.d.write_ring_u32(&ring, abi::RING_ARM_CONS_OFFSET, arm_cons);
                let _ = s.d.write_ring_u32(&ring, abi::RING_ARM_OFFSET, arm);
                let _ = s.d.ring_cq_doorbell(abi::handle_index(s.cq.cqn()));
            }
        }
    }
    // Publish everything, let it run, then flush both QPs.
    for s in sides.iter_mut() {
        publish(s);
    }
    let mut got: [Vec<Cqe>; 2] = [Vec::new(), Vec::new()];
    settle(&mut sides, &mut got, Duration::from_millis(20));
    let err = abi::QpAttr {
        qp_state: abi::QPS_ERR,
        ..Default::default()
    };
    for s in sides.iter_mut() {
        s.d.modify_qp(&s.qp, &err, abi::QP_ATTR_STATE)
            .expect("MODIFY_QP to ERR is always allowed");
    }
    settle(&mut sides, &mut got, Duration::from_millis(50));
    for (i, s) in sides.iter_mut().enumerate() {
        s.d.destroy_qp(&mut s.qp).expect("DESTROY_QP");
        poll(s, &mut got[i]);
        for c in &got[i] {
            assert!(
                c.status <= abi::WC_GENERAL_ERR,
                "unknown CQE status {}",
                c.status
            );
        }
        if !overran {
            assert!(
                got[i].len() <= s.posted,
                "side {i}: {} completions for {} WQEs",
                got[i].len(),
                s.posted
            );
        }
        assert!(
            canaries_ok(s, 10 + i as u64),
            "side {i}: memory outside the MR changed"
        );
        assert_eq!(s.d.query_device().unwrap(), *s.d.config());
    }
});
