//! The BTH and extension headers, [`parse`] and [`write_headers`].

use crate::error::WireError;
use crate::opcode::{self, len, Layout, PayloadRule};
use crate::psn;

/// Fields of the Base Transport Header (IBTA 9.2, 12 bytes).
///
/// The reserved bits (`resv6a` in byte 4, `resv7` in byte 8) are ignored when parsing and written
/// as zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Bth {
    /// Opcode (see [`opcode`](crate::opcode)).
    pub opcode: u8,
    /// Solicited event (SE).
    pub solicited: bool,
    /// Migration request (M).
    pub mig_req: bool,
    /// Pad count, `0..=3`: bytes of pad between payload and ICRC. [`write_headers`] sets it from
    /// the payload length and ignores this value.
    pub pad: u8,
    /// Transport header version; only 0 is valid.
    pub tver: u8,
    /// Partition key (`0xffff`: the default partition).
    pub pkey: u16,
    /// Forward explicit congestion notification.
    pub fecn: bool,
    /// Backward explicit congestion notification.
    pub becn: bool,
    /// Destination QP number, 24 bits.
    pub dest_qp: u32,
    /// Acknowledge request (A).
    pub ack_req: bool,
    /// Packet sequence number, 24 bits.
    pub psn: u32,
}

impl Bth {
    /// A BTH with the given opcode, destination QP and PSN, the default partition key `0xffff` and
    /// all flags clear.
    pub fn new(opcode: u8, dest_qp: u32, psn: u32) -> Self {
        Bth {
            opcode,
            pkey: 0xffff,
            dest_qp,
            psn,
            ..Bth::default()
        }
    }

    fn decode(b: &[u8; len::BTH]) -> Self {
        Bth {
            opcode: b[0],
            solicited: b[1] & 0x80 != 0,
            mig_req: b[1] & 0x40 != 0,
            pad: (b[1] >> 4) & 0x3,
            tver: b[1] & 0x0f,
            pkey: u16::from_be_bytes([b[2], b[3]]),
            fecn: b[4] & 0x80 != 0,
            becn: b[4] & 0x40 != 0,
            dest_qp: u32::from_be_bytes([0, b[5], b[6], b[7]]),
            ack_req: b[8] & 0x80 != 0,
            psn: u32::from_be_bytes([0, b[9], b[10], b[11]]),
        }
    }

    fn encode(&self, pad: u8, out: &mut Vec<u8>) {
        out.push(self.opcode);
        out.push(
            (u8::from(self.solicited) << 7)
                | (u8::from(self.mig_req) << 6)
                | ((pad & 0x3) << 4)
                | (self.tver & 0x0f),
        );
        out.extend_from_slice(&self.pkey.to_be_bytes());
        out.push((u8::from(self.fecn) << 7) | (u8::from(self.becn) << 6));
        out.extend_from_slice(&self.dest_qp.to_be_bytes()[1..]);
        out.push(u8::from(self.ack_req) << 7);
        out.extend_from_slice(&self.psn.to_be_bytes()[1..]);
    }
}

/// RDMA Extended Transport Header (IBTA 9.3.3, 16 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Reth {
    /// Remote virtual address.
    pub va: u64,
    /// Remote key.
    pub rkey: u32,
    /// Length of the whole RDMA operation in bytes.
    pub dma_len: u32,
}

/// The meaning of an AETH syndrome (IBTA 9.7.5.1, table 43).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AethKind {
    /// Positive acknowledgement (the low 5 bits are the credit count; `0x1f`: unlimited).
    Ack,
    /// Receiver-not-ready NAK with its 5-bit RNR timer code.
    RnrNak(u8),
    /// NAK with its 5-bit code (see [`nak`]).
    Nak(u8),
    /// A reserved syndrome (`0b10xxxxx`, or bit 7 set).
    Reserved,
}

/// NAK codes for [`Aeth::nak`] (IBTA 9.7.5.2.4, table 44).
pub mod nak {
    /// PSN sequence error.
    pub const PSN_SEQ_ERROR: u8 = 0;
    /// Invalid request.
    pub const INVALID_REQUEST: u8 = 1;
    /// Remote access error.
    pub const REMOTE_ACCESS_ERROR: u8 = 2;
    /// Remote operational error.
    pub const REMOTE_OP_ERROR: u8 = 3;
    /// Invalid RD request.
    pub const INVALID_RD_REQUEST: u8 = 4;
}

/// ACK Extended Transport Header (IBTA 9.3.5, 4 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Aeth {
    /// Syndrome: bits 6..5 select ACK (00), RNR NAK (01), NAK (11); bits 4..0 the value.
    pub syndrome: u8,
    /// Message sequence number, 24 bits.
    pub msn: u32,
}

impl Aeth {
    /// Syndrome of an ACK with the credit count "unlimited" (`0x1f`).
    pub const ACK_UNLIMITED: u8 = 0x1f;

    /// An ACK with unlimited credits (syndrome `0x1f`).
    pub fn ack(msn: u32) -> Self {
        Aeth {
            syndrome: Self::ACK_UNLIMITED,
            msn: msn & psn::MASK,
        }
    }

    /// An RNR NAK with the 5-bit RNR timer code `timer` (upper bits ignored).
    pub fn rnr_nak(timer: u8, msn: u32) -> Self {
        Aeth {
            syndrome: 0x20 | (timer & 0x1f),
            msn: msn & psn::MASK,
        }
    }

    /// A NAK with the 5-bit code `code` (upper bits ignored; see [`nak`]).
    pub fn nak(code: u8, msn: u32) -> Self {
        Aeth {
            syndrome: 0x60 | (code & 0x1f),
            msn: msn & psn::MASK,
        }
    }

    /// What the syndrome means.
    pub fn kind(&self) -> AethKind {
        let value = self.syndrome & 0x1f;
        match self.syndrome >> 5 {
            0b000 => AethKind::Ack,
            0b001 => AethKind::RnrNak(value),
            0b011 => AethKind::Nak(value),
            _ => AethKind::Reserved,
        }
    }
}

/// Atomic Extended Transport Header (IBTA 9.3.4, 28 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct AtomicEth {
    /// Remote virtual address (8-byte aligned).
    pub va: u64,
    /// Remote key.
    pub rkey: u32,
    /// Swap value (CmpSwap) or addend (FetchAdd).
    pub swap_add: u64,
    /// Compare value (CmpSwap; ignored for FetchAdd).
    pub compare: u64,
}

/// Atomic ACK Extended Transport Header (IBTA 9.5.3, 8 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct AtomicAckEth {
    /// The original remote data.
    pub orig: u64,
}

/// Datagram Extended Transport Header (IBTA 9.3.2, 8 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Deth {
    /// Queue key.
    pub qkey: u32,
    /// Source QP number, 24 bits.
    pub src_qp: u32,
}

/// All headers of a packet: the BTH and exactly the extension headers of its opcode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Headers {
    /// Base transport header.
    pub bth: Bth,
    /// UD SEND.
    pub deth: Option<Deth>,
    /// WRITE FIRST/ONLY(+IMM), READ REQUEST.
    pub reth: Option<Reth>,
    /// CmpSwap, FetchAdd.
    pub atomic: Option<AtomicEth>,
    /// READ RESPONSE FIRST/LAST/ONLY, ACKNOWLEDGE, ATOMIC ACKNOWLEDGE.
    pub aeth: Option<Aeth>,
    /// ATOMIC ACKNOWLEDGE.
    pub atomic_ack: Option<AtomicAckEth>,
    /// Immediate data of *_IMM opcodes: the 4 wire bytes read as a big-endian `u32`.
    pub imm: Option<u32>,
}

impl Headers {
    /// Headers with this BTH and no extension headers.
    pub fn new(bth: Bth) -> Self {
        Headers {
            bth,
            ..Headers::default()
        }
    }

    /// BTH plus the extension headers present here.
    pub fn len(&self) -> usize {
        self.present().header_len()
    }

    /// Always false: there is at least a BTH.
    pub fn is_empty(&self) -> bool {
        false
    }

    fn present(&self) -> Layout {
        Layout {
            deth: self.deth.is_some(),
            reth: self.reth.is_some(),
            atomic: self.atomic.is_some(),
            aeth: self.aeth.is_some(),
            atomic_ack: self.atomic_ack.is_some(),
            imm: self.imm.is_some(),
            payload: PayloadRule::Any,
        }
    }
}

/// A parsed packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Parsed<'a> {
    /// The BTH and the extension headers of its opcode.
    pub hdr: Headers,
    /// The payload, without pad and ICRC.
    pub payload: &'a [u8],
}

/// Header length (BTH + extension headers) of an opcode; `None` if unsupported.
pub fn header_len(opcode: u8) -> Option<usize> {
    opcode::layout(opcode).map(|l| l.header_len())
}

/// Pad bytes after a payload of `payload_len` bytes so that payload + pad is a multiple of 4.
pub fn pad_len(payload_len: usize) -> u8 {
    ((4 - payload_len % 4) % 4) as u8
}

/// Reads fixed-size big-endian fields off the front of a slice.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let (head, rest) = self.0.split_first_chunk::<N>().ok_or(WireError::TooShort)?;
        self.0 = rest;
        Ok(*head)
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        self.take().map(u64::from_be_bytes)
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        self.take().map(u32::from_be_bytes)
    }
    /// One ignored byte, then 24 bits.
    fn u24_after_byte(&mut self) -> Result<(u8, u32), WireError> {
        let b: [u8; 4] = self.take()?;
        Ok((b[0], u32::from_be_bytes([0, b[1], b[2], b[3]])))
    }
}

/// Checks the payload length rules of a layout. `padded` is payload + pad.
fn check_payload(rule: PayloadRule, payload_len: usize, pad: usize) -> Result<(), WireError> {
    match rule {
        PayloadRule::Empty if payload_len + pad != 0 => Err(WireError::BadLength),
        PayloadRule::Full | PayloadRule::NonEmpty if payload_len == 0 => Err(WireError::BadLength),
        PayloadRule::Full if pad != 0 => Err(WireError::BadPad),
        _ => Ok(()),
    }
}

/// Parses a RoCEv2 UDP payload: BTH, extension headers, payload, pad, ICRC.
///
/// Checks, in this order: at least a BTH and an ICRC ([`WireError::TooShort`]); `tver == 0`
/// ([`WireError::BadVersion`]); the opcode is supported ([`WireError::UnsupportedOpcode`]): the RC
/// opcodes `0x00..=0x14`, UD SEND ONLY (+IMM), or manufacturer-specific `0xc0..=0xff` (BTH only);
/// the headers of the opcode and the ICRC fit ([`WireError::TooShort`]); payload + pad is a
/// multiple of 4 ([`WireError::BadLength`]); the pad count is at most payload + pad
/// ([`WireError::BadPad`]); and the payload rules of the opcode: READ REQUEST, ACKNOWLEDGE, ATOMIC
/// ACKNOWLEDGE, CmpSwap and FetchAdd carry nothing, FIRST and MIDDLE packets carry at least one
/// byte and no pad, LAST packets at least one byte ([`WireError::BadLength`], [`WireError::BadPad`]).
/// The PMTU is not known here, so payloads are not checked against it.
///
/// The ICRC is not checked (see [`icrc_check`](crate::icrc_check)). Never panics.
pub fn parse(udp_payload: &[u8]) -> Result<Parsed<'_>, WireError> {
    let mut r = Reader(udp_payload);
    let bth = Bth::decode(&r.take::<{ len::BTH }>()?);
    if udp_payload.len() < len::BTH + len::ICRC {
        return Err(WireError::TooShort);
    }
    if bth.tver != 0 {
        return Err(WireError::BadVersion);
    }
    let layout = opcode::layout(bth.opcode).ok_or(WireError::UnsupportedOpcode(bth.opcode))?;
    let hdr_len = layout.header_len();
    let padded = udp_payload
        .len()
        .checked_sub(hdr_len + len::ICRC)
        .ok_or(WireError::TooShort)?;
    if padded % 4 != 0 {
        return Err(WireError::BadLength);
    }
    let pad = usize::from(bth.pad);
    let payload_len = padded.checked_sub(pad).ok_or(WireError::BadPad)?;
    check_payload(layout.payload, payload_len, pad)?;

    let mut hdr = Headers::new(bth);
    if layout.deth {
        let qkey = r.u32()?;
        let (_reserved, src_qp) = r.u24_after_byte()?;
        hdr.deth = Some(Deth { qkey, src_qp });
    }
    if layout.reth {
        hdr.reth = Some(Reth {
            va: r.u64()?,
            rkey: r.u32()?,
            dma_len: r.u32()?,
        });
    }
    if layout.atomic {
        hdr.atomic = Some(AtomicEth {
            va: r.u64()?,
            rkey: r.u32()?,
            swap_add: r.u64()?,
            compare: r.u64()?,
        });
    }
    if layout.aeth {
        let (syndrome, msn) = r.u24_after_byte()?;
        hdr.aeth = Some(Aeth { syndrome, msn });
    }
    if layout.atomic_ack {
        hdr.atomic_ack = Some(AtomicAckEth { orig: r.u64()? });
    }
    if layout.imm {
        hdr.imm = Some(r.u32()?);
    }
    let payload = r.0.get(..payload_len).ok_or(WireError::TooShort)?;
    Ok(Parsed { hdr, payload })
}

/// Appends the BTH and the extension headers of `hdr` to `out`, in wire order (BTH, DETH, RETH,
/// AtomicETH, AETH, AtomicAckETH, ImmDt), and returns their length.
///
/// The BTH pad count is computed from `payload_len` (`hdr.bth.pad` is ignored) so that payload +
/// pad is a multiple of 4; the caller appends the payload, [`pad_len`] zero bytes and the ICRC
/// (or uses [`build_packet`](crate::build_packet)).
///
/// Errors (nothing is appended then): unsupported opcode, `tver != 0`, extension headers that are
/// not exactly those of the opcode ([`WireError::HeaderMismatch`]), 24-bit fields out of range
/// ([`WireError::FieldRange`]), and a `payload_len` that [`parse`] would reject for the opcode
/// ([`WireError::BadLength`], [`WireError::BadPad`] for FIRST/MIDDLE payloads that are not a
/// multiple of 4).
pub fn write_headers(
    hdr: &Headers,
    payload_len: usize,
    out: &mut Vec<u8>,
) -> Result<usize, WireError> {
    let bth = &hdr.bth;
    let layout = opcode::layout(bth.opcode).ok_or(WireError::UnsupportedOpcode(bth.opcode))?;
    if bth.tver != 0 {
        return Err(WireError::BadVersion);
    }
    if hdr.present()
        != (Layout {
            payload: PayloadRule::Any,
            ..layout
        })
    {
        return Err(WireError::HeaderMismatch);
    }
    let fits24 = |v: u32| v <= psn::MASK;
    if !fits24(bth.dest_qp)
        || !fits24(bth.psn)
        || !hdr.deth.is_none_or(|d| fits24(d.src_qp))
        || !hdr.aeth.is_none_or(|a| fits24(a.msn))
    {
        return Err(WireError::FieldRange);
    }
    let pad = pad_len(payload_len);
    check_payload(layout.payload, payload_len, usize::from(pad))?;

    let start = out.len();
    out.reserve(layout.header_len());
    bth.encode(pad, out);
    if let Some(d) = &hdr.deth {
        out.extend_from_slice(&d.qkey.to_be_bytes());
        out.extend_from_slice(&d.src_qp.to_be_bytes()); // top byte is the reserved byte, 0
    }
    if let Some(r) = &hdr.reth {
        out.extend_from_slice(&r.va.to_be_bytes());
        out.extend_from_slice(&r.rkey.to_be_bytes());
        out.extend_from_slice(&r.dma_len.to_be_bytes());
    }
    if let Some(a) = &hdr.atomic {
        out.extend_from_slice(&a.va.to_be_bytes());
        out.extend_from_slice(&a.rkey.to_be_bytes());
        out.extend_from_slice(&a.swap_add.to_be_bytes());
        out.extend_from_slice(&a.compare.to_be_bytes());
    }
    if let Some(a) = &hdr.aeth {
        out.push(a.syndrome);
        out.extend_from_slice(&a.msn.to_be_bytes()[1..]);
    }
    if let Some(a) = &hdr.atomic_ack {
        out.extend_from_slice(&a.orig.to_be_bytes());
    }
    if let Some(imm) = hdr.imm {
        out.extend_from_slice(&imm.to_be_bytes());
    }
    Ok(out.len() - start)
}
