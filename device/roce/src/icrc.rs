//! The RoCEv2 Invariant CRC (IBTA Annex A17.3.3).
//!
//! The ICRC is the standard CRC-32 (IEEE 802.3 / zlib: reflected polynomial `0xEDB88320`, initial
//! value `0xffffffff`, final complement) over, in this order:
//!
//! 1. 8 bytes of `0xff` (the masked LRH that RoCEv2 does not have),
//! 2. the IP header with its variant fields masked to ones: IPv4 TOS, TTL and header checksum;
//!    IPv6 traffic class, flow label and hop limit (so its first 4 bytes read `6f ff ff ff`),
//! 3. the UDP header with the checksum masked to `0xffff`,
//! 4. the BTH with byte 4 (FECN, BECN, resv6a) masked to `0xff`,
//! 5. the extension headers, payload and pad.
//!
//! The 32-bit value is stored after the pad as 4 little-endian bytes ([`icrc_bytes`]), as Linux
//! rxe does.
//!
//! The IPv4 identification and flags fields are *not* masked, so a receiver behind a UDP socket,
//! which cannot see them, does not know two inputs of the CRC. [`icrc_check`] handles that by
//! solving for them (see there); [`icrc_check_with_ip_id`] checks exactly when they are known.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::opcode::len;

/// The IP addresses of a packet, which the ICRC covers.
///
/// Both should be of one family. An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, as a dual-stack
/// IPv6 socket reports IPv4 peers) is taken as the IPv4 address: such addresses never appear in an
/// IPv6 header on the wire. A mixed pair cannot be on the wire either: [`icrc`] then treats both as
/// IPv6 (the IPv4 one mapped), and [`icrc_check`] rejects the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpPair {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
}

enum Family {
    V4(Ipv4Addr, Ipv4Addr),
    V6(Ipv6Addr, Ipv6Addr),
}

fn as_v4(a: IpAddr) -> Option<Ipv4Addr> {
    match a {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(v6) => v6.to_ipv4_mapped(),
    }
}

fn as_v6(a: IpAddr) -> Ipv6Addr {
    match a {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

impl IpPair {
    /// Source and destination.
    pub fn new(src: IpAddr, dst: IpAddr) -> Self {
        IpPair { src, dst }
    }

    /// The family of the pair, `None` for a mixed pair.
    fn family(&self) -> Option<Family> {
        match (as_v4(self.src), as_v4(self.dst)) {
            (Some(s), Some(d)) => Some(Family::V4(s, d)),
            (None, None) => Some(Family::V6(as_v6(self.src), as_v6(self.dst))),
            _ => None,
        }
    }

    fn family_or_v6(&self) -> Family {
        self.family()
            .unwrap_or_else(|| Family::V6(as_v6(self.src), as_v6(self.dst)))
    }

    /// True if the ICRC of this pair covers an IPv4 header.
    pub fn is_ipv4(&self) -> bool {
        matches!(self.family(), Some(Family::V4(..)))
    }
}

/// The IPv4 flags/fragment-offset field with DF set, as our sender's kernel writes it.
const IPV4_DF: u16 = 0x4000;
/// Offset in the CRC input of the IPv4 identification field (after the 8-byte masked LRH).
const V4_ID_OFFSET: usize = 8 + 4;
/// Offset in the CRC input of the IPv4 flags byte holding DF (mask `0x40`).
const V4_FLAGS_OFFSET: usize = 8 + 6;
/// 8 bytes masked LRH + 40 bytes IPv6 header + 8 bytes UDP header.
const MAX_PSEUDO: usize = 8 + 40 + 8;

/// The masked LRH, IP and UDP headers for a UDP payload of `udp_payload_len` bytes (ICRC
/// included). Lengths that do not fit the 16-bit length fields are truncated to them (such a
/// datagram cannot be sent anyway).
fn pseudo_header(
    fam: &Family,
    ip_id: u16,
    df: bool,
    sport: u16,
    dport: u16,
    udp_payload_len: usize,
) -> ([u8; MAX_PSEUDO], usize) {
    let mut b = [0xffu8; MAX_PSEUDO];
    let udp_len = (8 + udp_payload_len) as u16;
    let mut i = 8;
    match fam {
        Family::V4(src, dst) => {
            let total = udp_len.wrapping_add(20);
            b[i] = 0x45; // version 4, IHL 5
            b[i + 1] = 0xff; // TOS masked
            b[i + 2..i + 4].copy_from_slice(&total.to_be_bytes());
            b[i + 4..i + 6].copy_from_slice(&ip_id.to_be_bytes());
            let flags = if df { IPV4_DF } else { 0 };
            b[i + 6..i + 8].copy_from_slice(&flags.to_be_bytes());
            b[i + 8] = 0xff; // TTL masked
            b[i + 9] = 17; // UDP
            b[i + 10..i + 12].copy_from_slice(&[0xff, 0xff]); // checksum masked
            b[i + 12..i + 16].copy_from_slice(&src.octets());
            b[i + 16..i + 20].copy_from_slice(&dst.octets());
            i += 20;
        }
        Family::V6(src, dst) => {
            // Version 6; traffic class and flow label masked.
            b[i..i + 4].copy_from_slice(&[0x6f, 0xff, 0xff, 0xff]);
            b[i + 4..i + 6].copy_from_slice(&udp_len.to_be_bytes());
            b[i + 6] = 17; // next header UDP
            b[i + 7] = 0xff; // hop limit masked
            b[i + 8..i + 24].copy_from_slice(&src.octets());
            b[i + 24..i + 40].copy_from_slice(&dst.octets());
            i += 40;
        }
    }
    b[i..i + 2].copy_from_slice(&sport.to_be_bytes());
    b[i + 2..i + 4].copy_from_slice(&dport.to_be_bytes());
    b[i + 4..i + 6].copy_from_slice(&udp_len.to_be_bytes());
    b[i + 6..i + 8].copy_from_slice(&[0xff, 0xff]); // checksum masked
    (b, i + 8)
}

/// CRC-32 over the pseudo header and `parts`, with byte 4 of the concatenated parts (BTH byte 4)
/// taken as `0xff`.
fn crc_over(pseudo: &[u8], parts: &[&[u8]]) -> u32 {
    const BTH_MASKED_BYTE: usize = 4;
    let mut h = crc32fast::Hasher::new();
    h.update(pseudo);
    let mut off = 0usize;
    for part in parts {
        match BTH_MASKED_BYTE.checked_sub(off) {
            Some(i) if i < part.len() => {
                let (before, rest) = part.split_at(i);
                h.update(before);
                h.update(&[0xff]);
                h.update(rest.get(1..).unwrap_or(&[]));
            }
            _ => h.update(part),
        }
        off = off.saturating_add(part.len());
    }
    h.finalize()
}

fn parts_len(parts: &[&[u8]]) -> usize {
    parts.iter().fold(0usize, |n, p| n.saturating_add(p.len()))
}

/// The ICRC of a packet as our sender builds it.
///
/// `parts` is the UDP payload without the 4 ICRC bytes, in as many slices as convenient (headers,
/// payload segments, pad); the masked BTH byte may fall in any of them. For IPv4 the header is the
/// one Linux builds for an unconnected UDP socket with `IP_MTU_DISCOVER = IP_PMTUDISC_DO`:
/// identification 0 and DF set. Use [`icrc_with_ip_id`] for other IPv4 senders.
pub fn icrc(ips: &IpPair, udp_src_port: u16, udp_dst_port: u16, parts: &[&[u8]]) -> u32 {
    icrc_with_ip_id(ips, 0, true, udp_src_port, udp_dst_port, parts)
}

/// [`icrc`] with an explicit IPv4 identification and DF flag (both ignored for IPv6).
pub fn icrc_with_ip_id(
    ips: &IpPair,
    ip_id: u16,
    df: bool,
    udp_src_port: u16,
    udp_dst_port: u16,
    parts: &[&[u8]],
) -> u32 {
    let udp_payload_len = parts_len(parts).saturating_add(len::ICRC);
    let (pseudo, n) = pseudo_header(
        &ips.family_or_v6(),
        ip_id,
        df,
        udp_src_port,
        udp_dst_port,
        udp_payload_len,
    );
    crc_over(&pseudo[..n], parts)
}

/// The 4 trailing ICRC bytes of a packet for the value `v` (little-endian, as Linux rxe stores it).
pub fn icrc_bytes(v: u32) -> [u8; 4] {
    v.to_le_bytes()
}

/// Splits a UDP payload into the covered bytes and the stored ICRC value.
fn split_icrc(udp_payload: &[u8]) -> Option<(&[u8], u32)> {
    if udp_payload.len() < len::BTH + len::ICRC {
        return None;
    }
    let (body, tail) = udp_payload.split_last_chunk::<{ len::ICRC }>()?;
    Some((body, u32::from_le_bytes(*tail)))
}

/// Checks the ICRC of a received packet exactly, given the IPv4 identification and DF flag of its
/// IP header (both ignored for IPv6).
///
/// Use this when the sender's IP header is known, e.g. `ip_id = 0, df = true` for a peer that is
/// itself a vrdma gateway (see [`icrc`]): that gives the full 32 check bits for IPv4.
pub fn icrc_check_with_ip_id(
    ips: &IpPair,
    ip_id: u16,
    df: bool,
    udp_src_port: u16,
    udp_dst_port: u16,
    udp_payload: &[u8],
) -> bool {
    match split_icrc(udp_payload) {
        Some((body, stored)) if ips.family().is_some() => {
            icrc_with_ip_id(ips, ip_id, df, udp_src_port, udp_dst_port, &[body]) == stored
        }
        _ => false,
    }
}

/// Checks the ICRC (the last 4 bytes of `udp_payload`) of a received packet.
///
/// **IPv6**: exact, all 32 bits of the CRC are checked.
///
/// **IPv4**: a receiver behind a UDP socket does not see the sender's IP identification and
/// flags, which the ICRC covers unmasked (Linux rxe sends random identifications; a Linux UDP
/// socket with DF sends 0). The packet is accepted iff *some* identification (16 bits) and DF flag
/// (1 bit) make the ICRC match; [`icrc_ipv4_id`] tells which. CRC-32 is affine over GF(2), so this
/// is solved as a linear system of 32 equations in the 17 unknown bits (their syndromes for this
/// packet length, then Gaussian elimination) instead of trying 2^17 headers. The 17 syndromes
/// are linearly independent (any change to those 17 bits is an error burst shorter than 32 bits,
/// which CRC-32 always detects), so exactly 2^17 of the 2^32 ICRC values are accepted: **only
/// 32 − 17 = 15 effective check bits** for IPv4 from unknown senders. A random corruption passes
/// with probability 2^-15; a corruption confined to the IP identification and flags is not
/// detected at all, and neither is any error whose CRC syndrome equals that of some change of
/// those bits. Single-bit errors are such at a few fixed places, whatever the packet length:
/// counting from the first BTH byte, byte 173 bit `0x08` and byte 1834 bit `0x40` within the first
/// 9000 bytes, and 10 places within 64 KiB (the unit tests list them). Use
/// [`icrc_check_with_ip_id`] where the sender's header is known.
///
/// Returns false for a payload shorter than a BTH plus ICRC and for a mixed IPv4/IPv6 pair.
pub fn icrc_check(ips: &IpPair, udp_src_port: u16, udp_dst_port: u16, udp_payload: &[u8]) -> bool {
    match ips.family() {
        Some(Family::V6(..)) => {
            icrc_check_with_ip_id(ips, 0, false, udp_src_port, udp_dst_port, udp_payload)
        }
        Some(Family::V4(..)) => {
            icrc_ipv4_id(ips, udp_src_port, udp_dst_port, udp_payload).is_some()
        }
        None => false,
    }
}

/// For an IPv4 pair: the IP identification and DF flag for which the packet's ICRC matches, if any
/// (see [`icrc_check`]; the solution is unique). `None` also for IPv6 and mixed pairs and payloads
/// shorter than a BTH plus ICRC.
pub fn icrc_ipv4_id(
    ips: &IpPair,
    udp_src_port: u16,
    udp_dst_port: u16,
    udp_payload: &[u8],
) -> Option<(u16, bool)> {
    if !ips.is_ipv4() {
        return None;
    }
    let (body, stored) = split_icrc(udp_payload)?;
    let base = icrc_with_ip_id(ips, 0, false, udp_src_port, udp_dst_port, &[body]);
    // CRC input length: masked LRH + IPv4 + UDP headers + covered UDP payload.
    let total = (8 + 20 + 8usize).checked_add(body.len())?;
    let syn = ipv4_unknown_syndromes(total);
    let solution = solve(&syn, stored ^ base)?;
    let id = (solution & 0xffff) as u16;
    let df = solution & (1 << 16) != 0;
    Some((id, df))
}

/// Reflected CRC-32 polynomial.
const POLY: u32 = 0xedb8_8320;
/// `x^0` in the reflected representation (bit 31 is the coefficient of `x^0`, bit 0 of `x^31`).
const X0: u32 = 0x8000_0000;

/// `a * x mod P`.
fn mul_x(a: u32) -> u32 {
    if a & 1 != 0 {
        (a >> 1) ^ POLY
    } else {
        a >> 1
    }
}

/// `a * b mod P`.
fn mul_mod(a: u32, mut b: u32) -> u32 {
    let mut p = 0;
    for i in 0..32 {
        if a & (X0 >> i) != 0 {
            p ^= b;
        }
        b = mul_x(b);
    }
    p
}

/// `x^n mod P`, by square and multiply.
fn x_pow(mut n: u64) -> u32 {
    let mut result = X0;
    let mut sq = X0 >> 1; // x^1
    while n != 0 {
        if n & 1 != 0 {
            result = mul_mod(sq, result);
        }
        sq = mul_mod(sq, sq);
        n >>= 1;
    }
    result
}

/// The CRC change caused by each unknown IPv4 bit in a CRC input of `total` bytes: index `j < 16`
/// is bit `j` of the identification, index 16 the DF flag.
///
/// Flipping bit `k` (value `1 << k`) of byte `o` of an `N`-byte input adds to the CRC register
/// (before the final complement, which cancels in the difference) the polynomial
/// `x^(32 + 8 * (N - 1 - o) + 7 - k) mod P`, independent of the rest of the input.
fn ipv4_unknown_syndromes(total: usize) -> [u32; 17] {
    // Degree of bit 7 of the flags byte (the one after the DF bit); everything else is a small
    // number of further multiplications by x.
    let trailing = total.saturating_sub(V4_FLAGS_OFFSET + 1) as u64;
    let base = x_pow(32 + 8 * trailing);
    // pow[d] = x^(base degree + d), d up to 8 * 2 + 7 for bit 0 of the id's high byte.
    let mut pow = [0u32; 24];
    let mut v = base;
    for p in pow.iter_mut() {
        *p = v;
        v = mul_x(v);
    }
    let degree = |byte_off: usize, k: usize| 8 * (V4_FLAGS_OFFSET - byte_off) + 7 - k;
    let mut s = [0u32; 17];
    for (j, sj) in s.iter_mut().enumerate().take(16) {
        // Identification is big-endian: bits 15..8 in byte V4_ID_OFFSET, 7..0 in the next.
        let (byte_off, k) = if j >= 8 {
            (V4_ID_OFFSET, j - 8)
        } else {
            (V4_ID_OFFSET + 1, j)
        };
        *sj = pow[degree(byte_off, k)];
    }
    s[16] = pow[degree(V4_FLAGS_OFFSET, 6)]; // DF is 0x40 of the flags byte
    s
}

/// Solves `sum(u_j * syn[j]) = target` over GF(2) for the bit vector `u` (bit `j` = `u_j`), by
/// Gaussian elimination. `None` if `target` is not in the span.
fn solve(syn: &[u32; 17], target: u32) -> Option<u32> {
    // basis[b]: a vector whose highest set bit is b, and which unknowns combine to it.
    let mut basis = [(0u32, 0u32); 32];
    for (j, &s) in syn.iter().enumerate() {
        let (mut v, mut combo) = (s, 1u32 << j);
        while v != 0 {
            let b = 31 - v.leading_zeros() as usize;
            let (bv, bc) = basis[b];
            if bv == 0 {
                basis[b] = (v, combo);
                break;
            }
            v ^= bv;
            combo ^= bc;
        }
    }
    let (mut t, mut combo) = (target, 0u32);
    while t != 0 {
        let b = 31 - t.leading_zeros() as usize;
        let (bv, bc) = basis[b];
        if bv == 0 {
            return None;
        }
        t ^= bv;
        combo ^= bc;
    }
    Some(combo)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4() -> IpPair {
        IpPair::new(
            IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)),
            IpAddr::V4(Ipv4Addr::new(10, 4, 5, 6)),
        )
    }

    #[test]
    fn x_pow_small() {
        assert_eq!(x_pow(0), X0);
        assert_eq!(x_pow(1), X0 >> 1);
        assert_eq!(x_pow(31), 1);
        assert_eq!(x_pow(32), POLY); // x^32 = P - x^32
        assert_eq!(x_pow(33), mul_x(POLY));
        assert_eq!(mul_mod(x_pow(1000), x_pow(2345)), x_pow(3345));
    }

    /// The closed-form syndromes equal the CRC differences of actually flipping each bit.
    #[test]
    fn syndromes_match_bit_flips() {
        let ips = v4();
        for body_len in [12usize, 13, 100, 1500] {
            let body: Vec<u8> = (0..body_len).map(|i| (i * 13 + 5) as u8).collect();
            let syn = ipv4_unknown_syndromes(36 + body_len);
            let base = icrc_with_ip_id(&ips, 0, false, 7, 4791, &[&body]);
            for (j, &s) in syn.iter().enumerate().take(16) {
                let c = icrc_with_ip_id(&ips, 1 << j, false, 7, 4791, &[&body]);
                assert_eq!(c ^ base, s, "len {body_len} id bit {j}");
            }
            let c = icrc_with_ip_id(&ips, 0, true, 7, 4791, &[&body]);
            assert_eq!(c ^ base, syn[16], "len {body_len} DF");
        }
    }

    #[test]
    fn syndromes_independent() {
        for total in [36 + 12, 36 + 4096, 36 + 65535] {
            let syn = ipv4_unknown_syndromes(total);
            // Every one of the 2^17 combinations is distinct iff the solver maps each syndrome
            // back to exactly its own unknown.
            for (j, &s) in syn.iter().enumerate() {
                assert_eq!(solve(&syn, s), Some(1 << j));
            }
            assert_eq!(solve(&syn, 0), Some(0));
        }
    }

    /// The single-bit errors an unknown-id IPv4 check cannot see, by offset in the UDP payload
    /// (byte, bit), for every length up to 64 KiB: their CRC change equals that of some change of
    /// the IP identification and DF. Independent of the packet length. (BTH byte 4 is masked.)
    #[test]
    fn ipv4_single_bit_blind_spots() {
        let n = 36 + 65536usize;
        let syn = ipv4_unknown_syndromes(n);
        let mut blind = vec![];
        // Walk from the last byte backwards: `cur` = x^(32 + 8 * (n - 1 - o)), the degree of bit 7.
        let mut cur = x_pow(32);
        for q in (0..65536usize).rev() {
            let mut s = cur;
            for k in (0..8).rev() {
                // bit k has degree (bit 7's) + 7 - k
                if q != 4 && solve(&syn, s).is_some() {
                    blind.push((q, k));
                }
                s = mul_x(s);
            }
            cur = s;
        }
        blind.reverse();
        let expect = [
            (173, 3),
            (1834, 6),
            (26744, 6),
            (26745, 5),
            (28451, 2),
            (36245, 6),
            (36245, 7),
            (37980, 0),
            (38066, 0),
            (43596, 5),
        ];
        assert_eq!(blind, expect);
    }
}
