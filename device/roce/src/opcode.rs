//! BTH opcodes (IBTA 9.2.1, table 38) and which extension headers each one carries.
//!
//! The upper 3 bits of an opcode select the transport (000 RC, 001 UC, 010 RD, 011 UD,
//! 100 CNP, 110/111 manufacturer-specific), the lower 5 bits the operation. This crate supports
//! the RC opcodes `0x00..=0x14`, UD SEND ONLY (with and without immediate) and the
//! manufacturer-specific range [`VENDOR_FIRST`]`..=0xff`. The other opcodes listed here are named
//! for diagnostics only; [`parse`](crate::parse) rejects them with
//! [`WireError::UnsupportedOpcode`](crate::WireError::UnsupportedOpcode).

/// RC SEND First.
pub const RC_SEND_FIRST: u8 = 0x00;
/// RC SEND Middle.
pub const RC_SEND_MIDDLE: u8 = 0x01;
/// RC SEND Last.
pub const RC_SEND_LAST: u8 = 0x02;
/// RC SEND Last with Immediate (ImmDt).
pub const RC_SEND_LAST_IMM: u8 = 0x03;
/// RC SEND Only.
pub const RC_SEND_ONLY: u8 = 0x04;
/// RC SEND Only with Immediate (ImmDt).
pub const RC_SEND_ONLY_IMM: u8 = 0x05;
/// RC RDMA WRITE First (RETH).
pub const RC_WRITE_FIRST: u8 = 0x06;
/// RC RDMA WRITE Middle.
pub const RC_WRITE_MIDDLE: u8 = 0x07;
/// RC RDMA WRITE Last.
pub const RC_WRITE_LAST: u8 = 0x08;
/// RC RDMA WRITE Last with Immediate (ImmDt).
pub const RC_WRITE_LAST_IMM: u8 = 0x09;
/// RC RDMA WRITE Only (RETH).
pub const RC_WRITE_ONLY: u8 = 0x0a;
/// RC RDMA WRITE Only with Immediate (RETH, ImmDt).
pub const RC_WRITE_ONLY_IMM: u8 = 0x0b;
/// RC RDMA READ Request (RETH, no payload).
pub const RC_READ_REQUEST: u8 = 0x0c;
/// RC RDMA READ Response First (AETH).
pub const RC_READ_RESPONSE_FIRST: u8 = 0x0d;
/// RC RDMA READ Response Middle (no AETH).
pub const RC_READ_RESPONSE_MIDDLE: u8 = 0x0e;
/// RC RDMA READ Response Last (AETH).
pub const RC_READ_RESPONSE_LAST: u8 = 0x0f;
/// RC RDMA READ Response Only (AETH).
pub const RC_READ_RESPONSE_ONLY: u8 = 0x10;
/// RC Acknowledge (AETH, no payload).
pub const RC_ACKNOWLEDGE: u8 = 0x11;
/// RC ATOMIC Acknowledge (AETH, AtomicAckETH, no payload).
pub const RC_ATOMIC_ACKNOWLEDGE: u8 = 0x12;
/// RC CmpSwap (AtomicETH, no payload).
pub const RC_COMPARE_SWAP: u8 = 0x13;
/// RC FetchAdd (AtomicETH, no payload).
pub const RC_FETCH_ADD: u8 = 0x14;
/// RC SEND Last with Invalidate (IETH). Unsupported by [`parse`](crate::parse).
pub const RC_SEND_LAST_INV: u8 = 0x16;
/// RC SEND Only with Invalidate (IETH). Unsupported by [`parse`](crate::parse).
pub const RC_SEND_ONLY_INV: u8 = 0x17;
/// UD SEND Only (DETH).
pub const UD_SEND_ONLY: u8 = 0x64;
/// UD SEND Only with Immediate (DETH, ImmDt).
pub const UD_SEND_ONLY_IMM: u8 = 0x65;
/// RoCEv2 Congestion Notification Packet (Annex A17). Unsupported by [`parse`](crate::parse).
pub const CNP: u8 = 0x81;
/// First manufacturer-specific opcode; `VENDOR_FIRST..=0xff` are all manufacturer-specific.
/// [`parse`](crate::parse) accepts them with a BTH and no extension headers (payload only).
pub const VENDOR_FIRST: u8 = 0xc0;

/// True for a manufacturer-specific opcode (`0xc0..=0xff`).
pub fn is_vendor(opcode: u8) -> bool {
    opcode >= VENDOR_FIRST
}

/// Byte lengths of the headers (IBTA 9.2–9.5).
pub mod len {
    /// Base Transport Header.
    pub const BTH: usize = 12;
    /// Datagram Extended Transport Header.
    pub const DETH: usize = 8;
    /// RDMA Extended Transport Header.
    pub const RETH: usize = 16;
    /// Atomic Extended Transport Header.
    pub const ATOMIC_ETH: usize = 28;
    /// ACK Extended Transport Header.
    pub const AETH: usize = 4;
    /// Atomic ACK Extended Transport Header.
    pub const ATOMIC_ACK_ETH: usize = 8;
    /// Immediate data.
    pub const IMM: usize = 4;
    /// Invariant CRC.
    pub const ICRC: usize = 4;
}

/// What the payload of a packet may be, by its position in a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PayloadRule {
    /// No payload at all (READ request, ACKs, atomics).
    Empty,
    /// FIRST and MIDDLE: a full PMTU, so at least one byte and no pad.
    Full,
    /// LAST: 1 ..= PMTU bytes (IBA C9-92).
    NonEmpty,
    /// ONLY (and manufacturer-specific): 0 ..= PMTU bytes.
    Any,
}

/// The extension headers of an opcode, in wire order after the BTH.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Layout {
    pub deth: bool,
    pub reth: bool,
    pub atomic: bool,
    pub aeth: bool,
    pub atomic_ack: bool,
    pub imm: bool,
    pub payload: PayloadRule,
}

impl Layout {
    const fn new(payload: PayloadRule) -> Self {
        Layout {
            deth: false,
            reth: false,
            atomic: false,
            aeth: false,
            atomic_ack: false,
            imm: false,
            payload,
        }
    }

    /// BTH plus the extension headers.
    pub fn header_len(&self) -> usize {
        let mut n = len::BTH;
        if self.deth {
            n += len::DETH;
        }
        if self.reth {
            n += len::RETH;
        }
        if self.atomic {
            n += len::ATOMIC_ETH;
        }
        if self.aeth {
            n += len::AETH;
        }
        if self.atomic_ack {
            n += len::ATOMIC_ACK_ETH;
        }
        if self.imm {
            n += len::IMM;
        }
        n
    }
}

/// The layout of a supported opcode, `None` if unsupported.
pub(crate) fn layout(opcode: u8) -> Option<Layout> {
    use PayloadRule::*;
    let plain = |p| Layout::new(p);
    let imm = |p| Layout {
        imm: true,
        ..Layout::new(p)
    };
    let reth = |p| Layout {
        reth: true,
        ..Layout::new(p)
    };
    let aeth = |p| Layout {
        aeth: true,
        ..Layout::new(p)
    };
    Some(match opcode {
        RC_SEND_FIRST => plain(Full),
        RC_SEND_MIDDLE => plain(Full),
        RC_SEND_LAST => plain(NonEmpty),
        RC_SEND_LAST_IMM => imm(NonEmpty),
        RC_SEND_ONLY => plain(Any),
        RC_SEND_ONLY_IMM => imm(Any),
        RC_WRITE_FIRST => reth(Full),
        RC_WRITE_MIDDLE => plain(Full),
        RC_WRITE_LAST => plain(NonEmpty),
        RC_WRITE_LAST_IMM => imm(NonEmpty),
        RC_WRITE_ONLY => reth(Any),
        RC_WRITE_ONLY_IMM => Layout {
            reth: true,
            imm: true,
            ..Layout::new(Any)
        },
        RC_READ_REQUEST => reth(Empty),
        RC_READ_RESPONSE_FIRST => aeth(Full),
        RC_READ_RESPONSE_MIDDLE => plain(Full),
        RC_READ_RESPONSE_LAST => aeth(NonEmpty),
        RC_READ_RESPONSE_ONLY => aeth(Any),
        RC_ACKNOWLEDGE => aeth(Empty),
        RC_ATOMIC_ACKNOWLEDGE => Layout {
            aeth: true,
            atomic_ack: true,
            ..Layout::new(Empty)
        },
        RC_COMPARE_SWAP | RC_FETCH_ADD => Layout {
            atomic: true,
            ..Layout::new(Empty)
        },
        UD_SEND_ONLY => Layout {
            deth: true,
            ..Layout::new(Any)
        },
        UD_SEND_ONLY_IMM => Layout {
            deth: true,
            imm: true,
            ..Layout::new(Any)
        },
        op if is_vendor(op) => plain(Any),
        _ => return None,
    })
}

/// Every supported opcode: the RC set, UD SEND ONLY (+IMM) and the manufacturer-specific range.
pub fn supported() -> impl Iterator<Item = u8> {
    (0u8..=0xff).filter(|&op| layout(op).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Header lengths as in the IBTA opcode table (and rxe's `rxe_opcode[].length`).
    #[test]
    fn header_lengths_match_spec_table() {
        let expect: &[(u8, usize)] = &[
            (RC_SEND_FIRST, 12),
            (RC_SEND_MIDDLE, 12),
            (RC_SEND_LAST, 12),
            (RC_SEND_LAST_IMM, 16),
            (RC_SEND_ONLY, 12),
            (RC_SEND_ONLY_IMM, 16),
            (RC_WRITE_FIRST, 28),
            (RC_WRITE_MIDDLE, 12),
            (RC_WRITE_LAST, 12),
            (RC_WRITE_LAST_IMM, 16),
            (RC_WRITE_ONLY, 28),
            (RC_WRITE_ONLY_IMM, 32),
            (RC_READ_REQUEST, 28),
            (RC_READ_RESPONSE_FIRST, 16),
            (RC_READ_RESPONSE_MIDDLE, 12),
            (RC_READ_RESPONSE_LAST, 16),
            (RC_READ_RESPONSE_ONLY, 16),
            (RC_ACKNOWLEDGE, 16),
            (RC_ATOMIC_ACKNOWLEDGE, 24),
            (RC_COMPARE_SWAP, 40),
            (RC_FETCH_ADD, 40),
            (UD_SEND_ONLY, 20),
            (UD_SEND_ONLY_IMM, 24),
            (VENDOR_FIRST, 12),
            (0xff, 12),
        ];
        for &(op, n) in expect {
            assert_eq!(
                layout(op).map(|l| l.header_len()),
                Some(n),
                "opcode {op:#04x}"
            );
        }
        assert_eq!(supported().count(), 21 + 2 + 64);
    }

    #[test]
    fn unsupported_opcodes() {
        for op in [
            0x15,
            RC_SEND_LAST_INV,
            RC_SEND_ONLY_INV,
            0x20,
            0x40,
            0x60,
            0x63,
            0x66,
            CNP,
            0xbf,
        ] {
            assert!(layout(op).is_none(), "opcode {op:#04x}");
        }
    }
}
