//! Packets of the soft fabric. They mirror RoCEv2 (BTH with PSN, RETH, AETH, AtomicETH,
//! ImmDt) at message granularity: a message of `n` MTU-sized packets carries its first PSN and
//! occupies `n` PSNs, exactly as it will on the wire.

use std::sync::Arc;

use vrdma_abi::Gid;

use crate::mr::{self, Seg, SegList};
use crate::GuestMemoryMmap;

/// 24-bit PSN arithmetic.
pub mod psn {
    /// PSN mask.
    pub const MASK: u32 = 0xff_ffff;

    /// `a + n` modulo 2^24.
    pub fn add(a: u32, n: u32) -> u32 {
        a.wrapping_add(n) & MASK
    }

    /// Signed distance `a - b` in the 24-bit circle (-2^23 .. 2^23).
    pub fn diff(a: u32, b: u32) -> i32 {
        ((a.wrapping_sub(b) & MASK) << 8) as i32 >> 8
    }
}

/// Where a payload's bytes are.
#[derive(Clone)]
pub enum Payload {
    /// No data.
    Empty,
    /// Bytes carried in the packet (inline data, or bytes from a wire).
    Bytes(Arc<Vec<u8>>),
    /// Segments of the sender's guest memory: the receiver copies straight from them.
    Guest {
        /// The sender's guest memory.
        mem: Arc<GuestMemoryMmap>,
        /// Segments, in order.
        segs: SegList,
    },
}

/// A payload's bytes, borrowed: from a packet ([`Payload::data`]) or, on the direct path, from
/// the requester's work request itself, whose memory is lent for the call (no reference of
/// its own: cloning the memory's `Arc` would write its count, on the cache line the peer's
/// thread reads to find that memory's regions).
#[derive(Clone, Copy, Debug)]
pub enum Data<'a> {
    /// Bytes (inline data, bytes from a wire; empty for no data).
    Bytes(&'a [u8]),
    /// Segments of a guest memory.
    Segs(&'a GuestMemoryMmap, &'a [Seg]),
}

impl Data<'_> {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Data::Bytes(b) => b.len() as u64,
            Data::Segs(_, segs) => mr::total_len(segs),
        }
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies the bytes into `dst` segments of `mem`; returns the bytes copied.
    pub fn copy_to(&self, mem: &GuestMemoryMmap, dst: &[Seg]) -> u64 {
        match *self {
            Data::Bytes(b) => mr::write_segs(mem, dst, b),
            Data::Segs(src, segs) => mr::copy_between(src, segs, mem, dst),
        }
    }
}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Payload::Empty => write!(f, "Empty"),
            Payload::Bytes(b) => write!(f, "Bytes({})", b.len()),
            Payload::Guest { segs, .. } => write!(f, "Guest({:?})", segs),
        }
    }
}

impl Payload {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Payload::Empty => 0,
            Payload::Bytes(b) => b.len() as u64,
            Payload::Guest { segs, .. } => mr::total_len(segs),
        }
    }

    /// Whether it carries no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The payload's bytes, borrowed.
    pub fn data(&self) -> Data<'_> {
        match self {
            Payload::Empty => Data::Bytes(&[]),
            Payload::Bytes(b) => Data::Bytes(b),
            Payload::Guest { mem, segs } => Data::Segs(mem, segs),
        }
    }

    /// Copies the payload into `dst` segments of `mem`; returns the bytes copied.
    pub fn copy_to(&self, mem: &GuestMemoryMmap, dst: &[Seg]) -> u64 {
        self.data().copy_to(mem, dst)
    }

    /// The payload as bytes (small payloads only: GRH building, atomics, tests).
    pub fn to_vec(&self) -> Vec<u8> {
        match self {
            Payload::Empty => Vec::new(),
            Payload::Bytes(b) => b.as_ref().clone(),
            Payload::Guest { mem, segs } => {
                let mut v = Vec::new();
                mr::read_segs(mem, segs, &mut v);
                v
            }
        }
    }
}

/// A SEND or an RDMA WRITE, whole: what the responder executes and the wire segments. Built
/// from a request packet's body ([`Body::message`]) or, on the direct path, from the
/// requester's work request itself.
#[derive(Clone, Copy, Debug)]
pub struct Message<'a> {
    /// An RDMA WRITE's target `(addr, rkey)`; `None` for a SEND.
    pub write: Option<(u64, u32)>,
    /// Immediate data.
    pub imm: Option<u32>,
    /// Solicited event.
    pub solicited: bool,
    /// The bytes.
    pub data: Data<'a>,
}

/// AETH syndromes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Syndrome {
    /// Positive ACK.
    Ack,
    /// Receiver not ready; retry after the given RNR timer code.
    RnrNak(u8),
    /// PSN sequence error: resend from the PSN.
    NakSeq,
    /// Invalid request.
    NakInvalid,
    /// Remote access error.
    NakAccess,
    /// Remote operational error.
    NakOperational,
}

/// Atomic operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AtomicOp {
    /// Compare and swap.
    CmpSwap {
        /// Compare value.
        compare: u64,
        /// Swap value.
        swap: u64,
    },
    /// Fetch and add.
    FetchAdd {
        /// Addend.
        add: u64,
    },
}

/// Packet body.
#[derive(Clone, Debug)]
pub enum Body {
    /// SEND (with optional immediate).
    Send {
        /// Immediate data.
        imm: Option<u32>,
        /// Solicited event.
        solicited: bool,
        /// Data.
        payload: Payload,
    },
    /// RDMA WRITE (with optional immediate).
    Write {
        /// Remote address.
        addr: u64,
        /// Remote key.
        rkey: u32,
        /// Immediate data.
        imm: Option<u32>,
        /// Solicited event.
        solicited: bool,
        /// Data.
        payload: Payload,
    },
    /// RDMA READ request.
    ReadReq {
        /// Remote address.
        addr: u64,
        /// Remote key.
        rkey: u32,
        /// Bytes.
        len: u64,
    },
    /// Atomic request.
    Atomic {
        /// Remote address.
        addr: u64,
        /// Remote key.
        rkey: u32,
        /// Operation.
        op: AtomicOp,
    },
    /// ACK or NAK for `psn` (everything up to it, for a positive ACK).
    Ack {
        /// Syndrome.
        syndrome: Syndrome,
        /// Message sequence number.
        msn: u32,
    },
    /// READ response (the whole message: first PSN in the header).
    ReadResp {
        /// Data.
        payload: Payload,
    },
    /// Atomic acknowledge with the original value.
    AtomicAck {
        /// Value before the operation.
        orig: u64,
    },
    /// UD datagram.
    Ud {
        /// Q_Key.
        qkey: u32,
        /// Immediate data.
        imm: Option<u32>,
        /// Solicited event.
        solicited: bool,
        /// Data.
        payload: Payload,
    },
}

impl Body {
    /// The message of a SEND or RDMA WRITE request; `None` for any other body.
    pub fn message(&self) -> Option<Message<'_>> {
        let (write, imm, solicited, payload) = match self {
            Body::Send {
                imm,
                solicited,
                payload,
            } => (None, imm, solicited, payload),
            Body::Write {
                addr,
                rkey,
                imm,
                solicited,
                payload,
            } => (Some((*addr, *rkey)), imm, solicited, payload),
            _ => return None,
        };
        Some(Message {
            write,
            imm: *imm,
            solicited: *solicited,
            data: payload.data(),
        })
    }
}

/// A packet between two ports.
#[derive(Clone, Debug)]
pub struct Packet {
    /// Source GID.
    pub src: Gid,
    /// Destination GID.
    pub dst: Gid,
    /// Source QPN.
    pub src_qpn: u32,
    /// Destination QPN.
    pub dst_qpn: u32,
    /// First PSN of the message (requests) or PSN acknowledged (responses).
    pub psn: u32,
    /// Path MTU of the sending QP: a wire segments the message into packets of this size
    /// (0: single-packet messages only, e.g. ACKs).
    pub mtu: u32,
    /// The requester asks for an acknowledgement (BTH AckReq). A responder acknowledges a
    /// wire request without it within a short delay, coalesced with later ones, instead of
    /// at once (see the engine's delayed ACKs).
    pub ack_req: bool,
    /// Body.
    pub body: Body,
}

/// `src_qpn` of an RC packet that came from a wire: RoCEv2 RC packets carry only the
/// destination QPN; the connection is identified by it and by the source address.
pub const SRC_QPN_WIRE: u32 = u32::MAX;

#[cfg(test)]
mod tests {
    use super::{psn, Data, Payload};
    use crate::mr::{Seg, SegList};
    use crate::GuestMemoryMmap;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn data_copies_from_its_memory_or_bytes() {
        let mem = |fill: u8| {
            let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x2000)]).unwrap();
            m.write_slice(&[fill; 0x2000], GuestAddress(0)).unwrap();
            m
        };
        let (src, dst) = (mem(0), mem(0xee));
        src.write_slice(b"hello, ", GuestAddress(0x100)).unwrap();
        src.write_slice(b"world", GuestAddress(0x1ff0)).unwrap();
        let segs: SegList = [
            Seg { gpa: 0x100, len: 7 },
            Seg {
                gpa: 0x1ff0,
                len: 5,
            },
        ]
        .into_iter()
        .collect();
        // Lent segments: gathered from two places of the sender's memory.
        let d = Data::Segs(&src, &segs);
        assert_eq!(d.len(), 12);
        let dst_segs = [Seg {
            gpa: 0x800,
            len: 12,
        }];
        assert_eq!(d.copy_to(&dst, &dst_segs), 12);
        let mut got = [0u8; 14];
        dst.read_slice(&mut got, GuestAddress(0x7ff)).unwrap();
        assert_eq!(&got, b"\xeehello, world\xee");
        // Bytes, scattered over two segments; a packet's payload by its view.
        let bytes = Payload::Bytes(std::sync::Arc::new(b"0123456789".to_vec()));
        let two = [Seg { gpa: 0x900, len: 4 }, Seg { gpa: 0xa00, len: 6 }];
        assert_eq!(bytes.data().len(), 10);
        assert_eq!(bytes.copy_to(&dst, &two), 10);
        let (mut a, mut b) = ([0u8; 5], [0u8; 7]);
        dst.read_slice(&mut a, GuestAddress(0x900)).unwrap();
        dst.read_slice(&mut b, GuestAddress(0xa00)).unwrap();
        assert_eq!((&a, &b), (b"0123\xee", b"456789\xee"));
        assert!(Payload::Empty.data().is_empty());
    }

    #[test]
    fn psn_wraps() {
        assert_eq!(psn::add(psn::MASK, 1), 0);
        assert_eq!(psn::diff(0, psn::MASK), 1);
        assert_eq!(psn::diff(psn::MASK, 0), -1);
        assert_eq!(psn::diff(5, 3), 2);
    }
}
