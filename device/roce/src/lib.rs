//! RoCEv2 wire codec: the InfiniBand transport headers carried over UDP (IBTA Annex A17,
//! destination port [`ROCE_PORT`] 4791), as Linux `rdma_rxe` and RoCE NICs send them.
//!
//! This crate is pure: no I/O, no threads, no `unsafe`. It turns bytes into [`Headers`] and back
//! ([`parse`], [`write_headers`], [`build_packet`]), computes and checks the invariant CRC
//! ([`icrc`], [`icrc_check`]), and has the small helpers a transport needs for 24-bit PSNs
//! ([`psn`]) and message segmentation ([`segment_opcode`], [`position`]). The UDP gateway of the
//! vrdma soft fabric is its user.
//!
//! # Packet layout
//!
//! A RoCEv2 UDP payload is `BTH | extension headers | payload | pad (0..=3 bytes) | ICRC (4)`.
//! All header fields are big-endian; the ICRC is stored little-endian (see [`icrc`]).
//!
//! BTH (12 bytes):
//!
//! | byte | bits |
//! |---|---|
//! | 0 | opcode |
//! | 1 | SE (7), M (6), pad count (5..4), TVer (3..0) |
//! | 2–3 | P_Key |
//! | 4 | FECN (7), BECN (6), reserved (5..0) — masked in the ICRC |
//! | 5–7 | destination QP |
//! | 8 | AckReq (7), reserved (6..0) |
//! | 9–11 | PSN |
//!
//! Extension headers: DETH 8 (Q_Key, reserved byte, source QP), RETH 16 (VA, R_Key, DMA length),
//! AtomicETH 28 (VA, R_Key, swap/add, compare), AETH 4 (syndrome, MSN), AtomicAckETH 8 (original
//! data), ImmDt 4. They follow the BTH in this order, and each opcode has a fixed set:
//!
//! | opcode | name | after the BTH | header bytes | payload |
//! |---|---|---|---|---|
//! | `0x00` | RC SEND FIRST | — | 12 | ≥ 1, no pad |
//! | `0x01` | RC SEND MIDDLE | — | 12 | ≥ 1, no pad |
//! | `0x02` | RC SEND LAST | — | 12 | ≥ 1 |
//! | `0x03` | RC SEND LAST with IMM | ImmDt | 16 | ≥ 1 |
//! | `0x04` | RC SEND ONLY | — | 12 | any |
//! | `0x05` | RC SEND ONLY with IMM | ImmDt | 16 | any |
//! | `0x06` | RC WRITE FIRST | RETH | 28 | ≥ 1, no pad |
//! | `0x07` | RC WRITE MIDDLE | — | 12 | ≥ 1, no pad |
//! | `0x08` | RC WRITE LAST | — | 12 | ≥ 1 |
//! | `0x09` | RC WRITE LAST with IMM | ImmDt | 16 | ≥ 1 |
//! | `0x0a` | RC WRITE ONLY | RETH | 28 | any |
//! | `0x0b` | RC WRITE ONLY with IMM | RETH, ImmDt | 32 | any |
//! | `0x0c` | RC READ REQUEST | RETH | 28 | none |
//! | `0x0d` | RC READ RESPONSE FIRST | AETH | 16 | ≥ 1, no pad |
//! | `0x0e` | RC READ RESPONSE MIDDLE | — | 12 | ≥ 1, no pad |
//! | `0x0f` | RC READ RESPONSE LAST | AETH | 16 | ≥ 1 |
//! | `0x10` | RC READ RESPONSE ONLY | AETH | 16 | any |
//! | `0x11` | RC ACKNOWLEDGE | AETH | 16 | none |
//! | `0x12` | RC ATOMIC ACKNOWLEDGE | AETH, AtomicAckETH | 24 | none |
//! | `0x13` | RC CmpSwap | AtomicETH | 40 | none |
//! | `0x14` | RC FetchAdd | AtomicETH | 40 | none |
//! | `0x64` | UD SEND ONLY | DETH | 20 | any |
//! | `0x65` | UD SEND ONLY with IMM | DETH, ImmDt | 24 | any |
//! | `0xc0`–`0xff` | manufacturer-specific | — | 12 | any |
//!
//! Other opcodes (UC, RD, SEND with Invalidate, CNP, …) are rejected by [`parse`] as unsupported.
//! "≥ 1, no pad": FIRST and MIDDLE packets carry a full PMTU, which is a multiple of 4; the PMTU
//! itself is not known to the codec and not checked.
//!
//! # Example
//!
//! ```
//! use std::net::{IpAddr, Ipv4Addr};
//! use vrdma_roce::*;
//!
//! let ips = IpPair::new(
//!     IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
//!     IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2)),
//! );
//! let mut hdr = Headers::new(Bth::new(opcode::RC_SEND_ONLY_IMM, 0x11, 0x123456));
//! hdr.imm = Some(0xdead_beef);
//! let mut pkt = Vec::new();
//! build_packet(&hdr, b"hello", &ips, 49152, ROCE_PORT, &mut pkt).unwrap();
//! assert!(icrc_check(&ips, 49152, ROCE_PORT, &pkt));
//! let p = parse(&pkt).unwrap();
//! assert_eq!(p.payload, b"hello");
//! assert_eq!(p.hdr.imm, Some(0xdead_beef));
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod error;
mod headers;
mod icrc;
pub mod opcode;
pub mod psn;
mod segment;

pub use error::WireError;
pub use headers::{
    header_len, nak, pad_len, parse, write_headers, Aeth, AethKind, AtomicAckEth, AtomicEth, Bth,
    Deth, Headers, Parsed, Reth,
};
pub use icrc::{
    icrc, icrc_bytes, icrc_check, icrc_check_with_ip_id, icrc_ipv4_id, icrc_with_ip_id, IpPair,
};
pub use segment::{position, segment_opcode, MsgKind, Position};

/// The UDP destination port of RoCEv2 (IANA).
pub const ROCE_PORT: u16 = 4791;

/// Appends a whole RoCEv2 UDP payload to `out`: the headers ([`write_headers`]), `payload`, the
/// pad and the ICRC ([`icrc`], i.e. for an IPv4 header with identification 0 and DF). Returns the
/// number of bytes appended; on error nothing is appended.
pub fn build_packet(
    hdr: &Headers,
    payload: &[u8],
    ips: &IpPair,
    udp_src_port: u16,
    udp_dst_port: u16,
    out: &mut Vec<u8>,
) -> Result<usize, WireError> {
    let start = out.len();
    write_headers(hdr, payload.len(), out)?;
    out.extend_from_slice(payload);
    out.resize(out.len() + usize::from(pad_len(payload.len())), 0);
    let v = icrc(
        ips,
        udp_src_port,
        udp_dst_port,
        &[out.get(start..).unwrap_or(&[])],
    );
    out.extend_from_slice(&icrc_bytes(v));
    Ok(out.len() - start)
}

#[cfg(test)]
mod tests;
