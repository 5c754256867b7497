//! Receiving side of the wire: parsed RoCEv2 datagrams become fabric [`Packet`]s.
//!
//! Single-packet operations (READ requests, atomics, ACKs, UD sends, ONLY messages) map one to
//! one. Multi-packet messages (FIRST, MIDDLE…, LAST) are collected per flow — source address,
//! destination QPN, request or response — in PSN order and handed to the engine whole, with the
//! first PSN, exactly as an in-process peer would send them. The engine then does everything a
//! responder or completer does: PSN checks, duplicates, NAKs, execution.
//!
//! A gap (a lost or reordered segment) discards the partial message; the engine never sees it
//! and the peer's go-back-N (a PSN-sequence NAK on the next message, or its ACK timeout)
//! resends it. Duplicated segments of the message being collected are ignored. Every rule a
//! malformed or hostile stream could break is checked here: segment sizes (FIRST and MIDDLE
//! carry exactly one MTU, 256…4096), a WRITE's total against its RETH length, and the bytes held
//! by partial messages against a budget.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use vrdma_abi::Gid;
use vrdma_roce::{opcode, AethKind, MsgKind, Parsed, Position};

use crate::soft::packet::{psn, AtomicOp, Body, Packet, Payload, Syndrome, SRC_QPN_WIRE};

/// Why a datagram produced no packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    /// Middle or last segment with no message being collected, or out of PSN order.
    Sequence,
    /// Sizes or headers that break the segmentation rules.
    Malformed,
    /// The partial-message budget is exhausted.
    Budget,
}

#[derive(Debug)]
struct Partial {
    family: u8,
    first_psn: u32,
    next_psn: u32,
    seg_len: usize,
    reth: Option<vrdma_roce::Reth>,
    data: Vec<u8>,
}

/// Partial messages of one gateway.
#[derive(Debug)]
pub struct Reassembler {
    partial: HashMap<(IpAddr, u32, bool), Partial>,
    bytes: usize,
    limit: usize,
}

fn family(kind: MsgKind) -> u8 {
    match kind {
        MsgKind::Send | MsgKind::SendImm => 0,
        MsgKind::Write | MsgKind::WriteImm => 1,
        MsgKind::ReadResp => 2,
    }
}

fn syndrome(kind: AethKind) -> Option<Syndrome> {
    Some(match kind {
        AethKind::Ack => Syndrome::Ack,
        AethKind::RnrNak(t) => Syndrome::RnrNak(t),
        AethKind::Nak(0) => Syndrome::NakSeq,
        AethKind::Nak(1) => Syndrome::NakInvalid,
        AethKind::Nak(2) => Syndrome::NakAccess,
        AethKind::Nak(3) => Syndrome::NakOperational,
        _ => return None,
    })
}

/// Segment sizes a FIRST or MIDDLE packet may carry: one IB MTU.
fn is_mtu(n: usize) -> bool {
    matches!(n, 256 | 512 | 1024 | 2048 | 4096)
}

impl Reassembler {
    /// A reassembler holding at most `limit` bytes of partial messages.
    pub fn new(limit: usize) -> Self {
        Self {
            partial: HashMap::new(),
            bytes: 0,
            limit,
        }
    }

    /// Bytes held by partial messages.
    #[cfg(test)]
    pub fn held_bytes(&self) -> usize {
        self.bytes
    }

    fn discard(&mut self, key: &(IpAddr, u32, bool)) {
        if let Some(p) = self.partial.remove(key) {
            self.bytes -= p.data.len();
        }
    }

    /// Takes one parsed datagram from `from` (whose GID is `src`) to this gateway's `dst`.
    pub fn push(
        &mut self,
        from: IpAddr,
        src: Gid,
        dst: Gid,
        p: &Parsed<'_>,
    ) -> Result<Option<Packet>, Dropped> {
        let h = &p.hdr;
        let bth = &h.bth;
        let mk = |body: Body, psn: u32| Packet {
            src,
            dst,
            src_qpn: SRC_QPN_WIRE,
            dst_qpn: bth.dest_qp,
            psn,
            mtu: 0,
            ack_req: bth.ack_req,
            body,
        };
        let bytes = |b: &[u8]| {
            if b.is_empty() {
                Payload::Empty
            } else {
                Payload::Bytes(Arc::new(b.to_vec()))
            }
        };
        match bth.opcode {
            opcode::RC_READ_REQUEST => {
                let r = h.reth.ok_or(Dropped::Malformed)?;
                return Ok(Some(mk(
                    Body::ReadReq {
                        addr: r.va,
                        rkey: r.rkey,
                        len: r.dma_len as u64,
                    },
                    bth.psn,
                )));
            }
            opcode::RC_COMPARE_SWAP | opcode::RC_FETCH_ADD => {
                let a = h.atomic.ok_or(Dropped::Malformed)?;
                let op = if bth.opcode == opcode::RC_COMPARE_SWAP {
                    AtomicOp::CmpSwap {
                        compare: a.compare,
                        swap: a.swap_add,
                    }
                } else {
                    AtomicOp::FetchAdd { add: a.swap_add }
                };
                return Ok(Some(mk(
                    Body::Atomic {
                        addr: a.va,
                        rkey: a.rkey,
                        op,
                    },
                    bth.psn,
                )));
            }
            opcode::RC_ACKNOWLEDGE => {
                let a = h.aeth.ok_or(Dropped::Malformed)?;
                let syndrome = syndrome(a.kind()).ok_or(Dropped::Malformed)?;
                return Ok(Some(mk(
                    Body::Ack {
                        syndrome,
                        msn: a.msn,
                    },
                    bth.psn,
                )));
            }
            opcode::RC_ATOMIC_ACKNOWLEDGE => {
                let a = h.aeth.ok_or(Dropped::Malformed)?;
                let orig = h.atomic_ack.ok_or(Dropped::Malformed)?.orig;
                let body = match syndrome(a.kind()).ok_or(Dropped::Malformed)? {
                    Syndrome::Ack => Body::AtomicAck { orig },
                    s => Body::Ack {
                        syndrome: s,
                        msn: a.msn,
                    },
                };
                return Ok(Some(mk(body, bth.psn)));
            }
            opcode::UD_SEND_ONLY | opcode::UD_SEND_ONLY_IMM => {
                let d = h.deth.ok_or(Dropped::Malformed)?;
                let mut pkt = mk(
                    Body::Ud {
                        qkey: d.qkey,
                        imm: h.imm,
                        solicited: bth.solicited,
                        payload: bytes(p.payload),
                    },
                    bth.psn,
                );
                pkt.src_qpn = d.src_qp;
                return Ok(Some(pkt));
            }
            _ => {}
        }
        let (kind, pos) = vrdma_roce::position(bth.opcode).ok_or(Dropped::Malformed)?;
        // A READ response may carry a NAK in its AETH (not sent by rxe, but legal).
        if let Some(a) = h.aeth {
            match syndrome(a.kind()) {
                Some(Syndrome::Ack) => {}
                Some(s) => {
                    return Ok(Some(mk(
                        Body::Ack {
                            syndrome: s,
                            msn: a.msn,
                        },
                        bth.psn,
                    )))
                }
                None => return Err(Dropped::Malformed),
            }
        }
        let key = (from, bth.dest_qp, kind == MsgKind::ReadResp);
        let fam = family(kind);
        match pos {
            Position::Only => {
                // A new message ends whatever was being collected on this flow.
                self.discard(&key);
                if let Some(r) = h.reth {
                    if r.dma_len as usize != p.payload.len() {
                        return Err(Dropped::Malformed);
                    }
                }
                Ok(Some(self.build(
                    kind,
                    &h.reth,
                    h.imm,
                    bth.solicited,
                    bytes(p.payload),
                    mk,
                    bth.psn,
                )))
            }
            Position::First => {
                self.discard(&key);
                let n = p.payload.len();
                if !is_mtu(n) {
                    return Err(Dropped::Malformed);
                }
                if let Some(r) = h.reth {
                    if (r.dma_len as usize) <= n {
                        return Err(Dropped::Malformed);
                    }
                }
                if self.bytes + n > self.limit {
                    return Err(Dropped::Budget);
                }
                self.bytes += n;
                self.partial.insert(
                    key,
                    Partial {
                        family: fam,
                        first_psn: bth.psn,
                        next_psn: psn::add(bth.psn, 1),
                        seg_len: n,
                        reth: h.reth,
                        data: p.payload.to_vec(),
                    },
                );
                Ok(None)
            }
            Position::Middle | Position::Last => {
                let Some(part) = self.partial.get_mut(&key) else {
                    return Err(Dropped::Sequence);
                };
                let d = psn::diff(bth.psn, part.next_psn);
                if d < 0 && psn::diff(bth.psn, part.first_psn) >= 0 {
                    // A duplicate of a segment already collected.
                    return Err(Dropped::Sequence);
                }
                let n = p.payload.len();
                let bad_size = if pos == Position::Middle {
                    n != part.seg_len
                } else {
                    n == 0 || n > part.seg_len
                };
                if d != 0 || part.family != fam || bad_size {
                    let malformed = d == 0;
                    self.discard(&key);
                    return Err(if malformed {
                        Dropped::Malformed
                    } else {
                        Dropped::Sequence
                    });
                }
                let total = part.data.len() + n;
                let cap = part.reth.map_or(usize::MAX, |r| r.dma_len as usize);
                let over = if pos == Position::Middle {
                    total >= cap
                } else {
                    part.reth.is_some() && total != cap
                };
                if over {
                    self.discard(&key);
                    return Err(Dropped::Malformed);
                }
                if self.bytes + n > self.limit {
                    self.discard(&key);
                    return Err(Dropped::Budget);
                }
                part.data.extend_from_slice(p.payload);
                part.next_psn = psn::add(part.next_psn, 1);
                self.bytes += n;
                if pos == Position::Middle {
                    return Ok(None);
                }
                let part = self.partial.remove(&key).ok_or(Dropped::Sequence)?;
                self.bytes -= part.data.len();
                let first = part.first_psn;
                Ok(Some(self.build(
                    kind,
                    &part.reth,
                    h.imm,
                    bth.solicited,
                    Payload::Bytes(Arc::new(part.data)),
                    mk,
                    first,
                )))
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        &self,
        kind: MsgKind,
        reth: &Option<vrdma_roce::Reth>,
        imm: Option<u32>,
        solicited: bool,
        payload: Payload,
        mk: impl Fn(Body, u32) -> Packet,
        psn: u32,
    ) -> Packet {
        let body = match kind {
            MsgKind::Send | MsgKind::SendImm => Body::Send {
                imm,
                solicited,
                payload,
            },
            MsgKind::Write | MsgKind::WriteImm => {
                let r = reth.unwrap_or(vrdma_roce::Reth {
                    va: 0,
                    rkey: 0,
                    dma_len: 0,
                });
                Body::Write {
                    addr: r.va,
                    rkey: r.rkey,
                    imm,
                    solicited,
                    payload,
                }
            }
            MsgKind::ReadResp => Body::ReadResp { payload },
        };
        mk(body, psn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vrdma_roce::{write_headers, Bth, Headers, Reth};

    fn datagram(op: u8, psn: u32, reth: Option<Reth>, payload: &[u8]) -> Vec<u8> {
        let mut h = Headers::new(Bth::new(op, 0x100, psn));
        h.reth = reth;
        let mut d = Vec::new();
        write_headers(&h, payload.len(), &mut d).unwrap();
        d.extend_from_slice(payload);
        d.resize(d.len() + (4 - payload.len() % 4) % 4 + 4, 0);
        d
    }

    fn push(r: &mut Reassembler, d: &[u8]) -> Result<Option<Packet>, Dropped> {
        let p = vrdma_roce::parse(d).unwrap();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        r.push(ip, Gid::default(), Gid::default(), &p)
    }

    fn write_msg(psn: u32, total: usize) -> Vec<Vec<u8>> {
        let reth = Reth {
            va: 0x1000,
            rkey: 7,
            dma_len: total as u32,
        };
        let n = total.div_ceil(256);
        (0..n)
            .map(|i| {
                let len = if i + 1 == n { total - i * 256 } else { 256 };
                let op = vrdma_roce::segment_opcode(MsgKind::Write, i, n);
                let data = vec![i as u8; len];
                datagram(op, psn + i as u32, (i == 0).then_some(reth), &data)
            })
            .collect()
    }

    fn st(r: &mut Reassembler, d: &[u8]) -> Result<bool, Dropped> {
        push(r, d).map(|p| p.is_some())
    }

    #[test]
    fn in_order_segments_make_one_message() {
        let mut r = Reassembler::new(1 << 20);
        let segs = write_msg(10, 700);
        assert_eq!(st(&mut r, &segs[0]), Ok(false));
        assert_eq!(st(&mut r, &segs[1]), Ok(false));
        // A duplicate of a collected segment is ignored.
        assert_eq!(st(&mut r, &segs[1]), Err(Dropped::Sequence));
        let pkt = push(&mut r, &segs[2]).unwrap().unwrap();
        assert_eq!(pkt.psn, 10);
        let Body::Write {
            addr,
            rkey,
            payload,
            ..
        } = pkt.body
        else {
            panic!("not a write");
        };
        assert_eq!((addr, rkey, payload.len()), (0x1000, 7, 700));
        let v = payload.to_vec();
        assert!(v[..256].iter().all(|&b| b == 0) && v[512..].iter().all(|&b| b == 2));
        assert_eq!(r.held_bytes(), 0);
    }

    #[test]
    fn a_gap_discards_the_partial_message() {
        let mut r = Reassembler::new(1 << 20);
        let segs = write_msg(0, 1000);
        assert_eq!(st(&mut r, &segs[0]), Ok(false));
        assert_eq!(st(&mut r, &segs[2]), Err(Dropped::Sequence));
        assert_eq!(r.held_bytes(), 0);
        assert_eq!(st(&mut r, &segs[3]), Err(Dropped::Sequence));
        // The retransmission from FIRST succeeds.
        for s in &segs[..3] {
            assert_eq!(st(&mut r, s), Ok(false));
        }
        assert!(push(&mut r, &segs[3]).unwrap().is_some());
    }

    #[test]
    fn sizes_and_budget_are_enforced() {
        // A WRITE whose LAST would exceed the RETH length.
        let mut r = Reassembler::new(1 << 20);
        let mut segs = write_msg(0, 600);
        segs[2] = datagram(vrdma_roce::opcode::RC_WRITE_LAST, 2, None, &[0; 200]);
        assert_eq!(st(&mut r, &segs[0]), Ok(false));
        assert_eq!(st(&mut r, &segs[1]), Ok(false));
        assert_eq!(st(&mut r, &segs[2]), Err(Dropped::Malformed));
        assert_eq!(r.held_bytes(), 0);
        // A budget of one segment.
        let mut r = Reassembler::new(300);
        let segs = write_msg(0, 600);
        assert_eq!(st(&mut r, &segs[0]), Ok(false));
        assert_eq!(st(&mut r, &segs[1]), Err(Dropped::Budget));
        assert_eq!(r.held_bytes(), 0);
    }
}

#[cfg(test)]
mod prop {
    use super::*;
    use proptest::prelude::*;
    use vrdma_roce::{opcode, write_headers, Aeth, AtomicEth, Bth, Deth, Headers, Reth};

    /// Any well-formed datagram of any supported opcode, with PSNs, QPNs, lengths and RETH
    /// values chosen to collide often (small ranges), so that sequences exercise gaps,
    /// duplicates, restarts and size violations.
    fn datagram() -> impl Strategy<Value = Vec<u8>> {
        let ops: Vec<u8> = (0x00..=0x14).chain([0x64, 0x65]).collect();
        (
            proptest::sample::select(ops),
            0u32..6,
            0u32..3,
            prop_oneof![
                Just(0usize),
                Just(1),
                Just(100),
                Just(256),
                Just(512),
                Just(1024)
            ],
            0u32..3000,
        )
            .prop_filter_map("valid headers", |(op, psn, qp, len, dma)| {
                let mut h = Headers::new(Bth::new(op, qp, psn));
                let reth = Some(Reth {
                    va: 0x1000,
                    rkey: 7,
                    dma_len: dma,
                });
                match op {
                    opcode::RC_WRITE_FIRST
                    | opcode::RC_WRITE_ONLY
                    | opcode::RC_WRITE_ONLY_IMM
                    | opcode::RC_READ_REQUEST => h.reth = reth,
                    _ => {}
                }
                if matches!(op, 0x03 | 0x05 | 0x09 | 0x0b | 0x65) {
                    h.imm = Some(1);
                }
                if matches!(op, 0x0d | 0x0f | 0x10 | 0x11 | 0x12) {
                    h.aeth = Some(Aeth::ack(0));
                }
                if op == 0x12 {
                    h.atomic_ack = Some(vrdma_roce::AtomicAckEth { orig: 5 });
                }
                if matches!(op, 0x13 | 0x14) {
                    h.atomic = Some(AtomicEth {
                        va: 8,
                        rkey: 7,
                        swap_add: 1,
                        compare: 0,
                    });
                }
                if matches!(op, 0x64 | 0x65) {
                    h.deth = Some(Deth { qkey: 1, src_qp: 2 });
                }
                let mut d = Vec::new();
                write_headers(&h, len, &mut d).ok()?;
                d.resize(d.len() + len + (4 - len % 4) % 4 + 4, 0xab);
                vrdma_roce::parse(&d).ok()?;
                Some(d)
            })
    }

    proptest! {
        /// Whatever sequence of datagrams arrives, reassembly never panics, never holds more
        /// than its budget, and every message it completes has a payload no larger than what
        /// was received.
        #[test]
        fn any_sequence_is_handled(seq in proptest::collection::vec(datagram(), 1..60)) {
            let mut r = Reassembler::new(2048);
            let ip: IpAddr = "10.0.0.9".parse().unwrap();
            let mut received = 0u64;
            for d in &seq {
                let p = vrdma_roce::parse(d).unwrap();
                received += p.payload.len() as u64;
                if let Ok(Some(pkt)) = r.push(ip, Gid::default(), Gid::default(), &p) {
                    let len = match &pkt.body {
                        Body::Send { payload, .. } | Body::Write { payload, .. }
                        | Body::ReadResp { payload } | Body::Ud { payload, .. } => payload.len(),
                        _ => 0,
                    };
                    prop_assert!(len <= received);
                }
                prop_assert!(r.held_bytes() <= 2048);
            }
        }
    }
}
