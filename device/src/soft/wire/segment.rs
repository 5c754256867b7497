//! Sending side of the wire: a fabric [`Packet`] (one whole message) becomes RoCEv2 datagrams,
//! one per MTU-sized segment, each with its PSN, headers, pad and ICRC.
//!
//! The engine already numbers a message of `n` segments with `n` consecutive PSNs (it uses the
//! same MTU rule), so PSNs on the wire are exactly the engine's.

use vm_memory::{Bytes, GuestAddress};
use vrdma_roce::{
    opcode, Aeth, AtomicAckEth, AtomicEth, Bth, Deth, Headers, IpPair, MsgKind, Reth,
};

use crate::soft::packet::{psn, AtomicOp, Body, Data, Packet, Syndrome};

/// The MTU a message is segmented with: the engine's rule (`max(256)`), capped at the largest
/// IB MTU.
pub(crate) fn wire_mtu(mtu: u32) -> u64 {
    mtu.clamp(256, 4096) as u64
}

/// The AETH of a syndrome.
pub(crate) fn aeth_of(s: Syndrome, msn: u32) -> Aeth {
    match s {
        Syndrome::Ack => Aeth::ack(msn),
        Syndrome::RnrNak(t) => Aeth::rnr_nak(t & 0x1f, msn),
        Syndrome::NakSeq => Aeth::nak(0, msn),
        Syndrome::NakInvalid => Aeth::nak(1, msn),
        Syndrome::NakAccess => Aeth::nak(2, msn),
        Syndrome::NakOperational => Aeth::nak(3, msn),
    }
}

/// Reads a payload front to back, segment by segment, appending to a datagram buffer.
struct Cursor<'a> {
    data: Data<'a>,
    seg: usize,
    off: u64,
}

impl<'a> Cursor<'a> {
    fn new(data: Data<'a>) -> Self {
        Self {
            data,
            seg: 0,
            off: 0,
        }
    }

    /// Appends the next `n` bytes of the payload to `out` (zeros if guest memory went away,
    /// which cannot happen for segments resolved against live memory).
    fn read(&mut self, mut n: u64, out: &mut Vec<u8>) {
        match self.data {
            Data::Bytes(b) => {
                let start = (self.off as usize).min(b.len());
                let end = (start + n as usize).min(b.len());
                out.extend_from_slice(&b[start..end]);
                self.off = end as u64;
            }
            Data::Segs(mem, segs) => {
                while n > 0 {
                    let Some(s) = segs.get(self.seg) else {
                        return;
                    };
                    let take = (s.len - self.off).min(n);
                    let start = out.len();
                    out.resize(start + take as usize, 0);
                    let _ = mem.read_slice(&mut out[start..], GuestAddress(s.gpa + self.off));
                    self.off += take;
                    n -= take;
                    if self.off == s.len {
                        self.seg += 1;
                        self.off = 0;
                    }
                }
            }
        }
    }
}

/// Where a datagram goes and how its ICRC is computed.
pub(crate) struct Route<'a> {
    /// Source and destination IP addresses.
    pub ips: &'a IpPair,
    /// UDP source port.
    pub sport: u16,
    /// UDP destination port.
    pub dport: u16,
}

fn bth(pkt: &Packet, opcode: u8, index: u32, solicited: bool, ack_req: bool) -> Bth {
    Bth {
        solicited,
        ack_req,
        ..Bth::new(opcode, pkt.dst_qpn & psn::MASK, psn::add(pkt.psn, index))
    }
}

/// Finishes one datagram in `buf` (headers already written): payload, pad, ICRC; emits it.
fn finish(
    route: &Route<'_>,
    cursor: &mut Cursor<'_>,
    len: u64,
    buf: &mut Vec<u8>,
    emit: &mut dyn FnMut(&[u8]),
) {
    cursor.read(len, buf);
    let pad = (4 - (len % 4) as usize) % 4;
    buf.resize(buf.len() + pad, 0);
    let crc = vrdma_roce::icrc(route.ips, route.sport, route.dport, &[buf.as_slice()]);
    buf.extend_from_slice(&vrdma_roce::icrc_bytes(crc));
    emit(buf);
}

/// Encodes `pkt` as RoCEv2 datagrams (UDP payloads), calling `emit` for each, in PSN order.
/// `buf` is scratch space reused across calls. Returns the number of datagrams.
pub(crate) fn encode(
    pkt: &Packet,
    route: &Route<'_>,
    buf: &mut Vec<u8>,
    emit: &mut dyn FnMut(&[u8]),
) -> usize {
    let one = |hdr: Headers, data: Data<'_>, buf: &mut Vec<u8>, emit: &mut dyn FnMut(&[u8])| {
        buf.clear();
        let len = data.len();
        if vrdma_roce::write_headers(&hdr, len as usize, buf).is_err() {
            return 0;
        }
        finish(route, &mut Cursor::new(data), len, buf, emit);
        1
    };
    let none = Data::Bytes(&[]);
    match &pkt.body {
        Body::Send { .. } | Body::Write { .. } => {
            let Some(m) = pkt.body.message() else {
                return 0;
            };
            let kind = match (m.write.is_some(), m.imm.is_some()) {
                (false, false) => MsgKind::Send,
                (false, true) => MsgKind::SendImm,
                (true, false) => MsgKind::Write,
                (true, true) => MsgKind::WriteImm,
            };
            let reth = m.write.map(|(va, rkey)| Reth {
                va,
                rkey,
                dma_len: m.data.len().min(u32::MAX as u64) as u32,
            });
            message(
                pkt,
                route,
                kind,
                m.data,
                reth,
                m.imm,
                m.solicited,
                buf,
                emit,
            )
        }
        Body::ReadResp { payload } => message(
            pkt,
            route,
            MsgKind::ReadResp,
            payload.data(),
            None,
            None,
            false,
            buf,
            emit,
        ),
        Body::ReadReq { addr, rkey, len } => {
            let mut h = Headers::new(bth(pkt, opcode::RC_READ_REQUEST, 0, false, true));
            h.reth = Some(Reth {
                va: *addr,
                rkey: *rkey,
                dma_len: (*len).min(u32::MAX as u64) as u32,
            });
            one(h, none, buf, emit)
        }
        Body::Atomic { addr, rkey, op } => {
            let (code, swap_add, compare) = match *op {
                AtomicOp::CmpSwap { compare, swap } => (opcode::RC_COMPARE_SWAP, swap, compare),
                AtomicOp::FetchAdd { add } => (opcode::RC_FETCH_ADD, add, 0),
            };
            let mut h = Headers::new(bth(pkt, code, 0, false, true));
            h.atomic = Some(AtomicEth {
                va: *addr,
                rkey: *rkey,
                swap_add,
                compare,
            });
            one(h, none, buf, emit)
        }
        Body::Ack { syndrome, msn } => {
            let mut h = Headers::new(bth(pkt, opcode::RC_ACKNOWLEDGE, 0, false, false));
            h.aeth = Some(aeth_of(*syndrome, *msn & psn::MASK));
            one(h, none, buf, emit)
        }
        Body::AtomicAck { orig } => {
            let mut h = Headers::new(bth(pkt, opcode::RC_ATOMIC_ACKNOWLEDGE, 0, false, false));
            h.aeth = Some(Aeth::ack(0));
            h.atomic_ack = Some(AtomicAckEth { orig: *orig });
            one(h, none, buf, emit)
        }
        Body::Ud {
            qkey,
            imm,
            solicited,
            payload,
        } => {
            let code = if imm.is_some() {
                opcode::UD_SEND_ONLY_IMM
            } else {
                opcode::UD_SEND_ONLY
            };
            let mut h = Headers::new(bth(pkt, code, 0, *solicited, false));
            h.deth = Some(Deth {
                qkey: *qkey,
                src_qp: pkt.src_qpn & psn::MASK,
            });
            h.imm = *imm;
            one(h, payload.data(), buf, emit)
        }
    }
}

/// A SEND, WRITE or READ response message: `n` segments of the MTU, FIRST/MIDDLE/LAST or ONLY.
#[allow(clippy::too_many_arguments)]
fn message(
    pkt: &Packet,
    route: &Route<'_>,
    kind: MsgKind,
    data: Data<'_>,
    reth: Option<Reth>,
    imm: Option<u32>,
    solicited: bool,
    buf: &mut Vec<u8>,
    emit: &mut dyn FnMut(&[u8]),
) -> usize {
    let mtu = wire_mtu(pkt.mtu);
    let len = data.len();
    let n = len.div_ceil(mtu).max(1);
    let mut cursor = Cursor::new(data);
    let response = matches!(kind, MsgKind::ReadResp);
    for i in 0..n {
        let (first, last) = (i == 0, i == n - 1);
        let chunk = if last { len - i * mtu } else { mtu };
        let code = vrdma_roce::segment_opcode(kind, i as usize, n as usize);
        let mut h = Headers::new(bth(
            pkt,
            code,
            i as u32,
            solicited && last,
            last && !response && pkt.ack_req,
        ));
        if first {
            h.reth = reth;
        }
        if last {
            h.imm = imm;
        }
        if response && (first || last) {
            h.aeth = Some(Aeth::ack(0));
        }
        buf.clear();
        if vrdma_roce::write_headers(&h, chunk as usize, buf).is_err() {
            return i as usize;
        }
        finish(route, &mut cursor, chunk, buf, emit);
    }
    n as usize
}
