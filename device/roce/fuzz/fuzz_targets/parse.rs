//! Fuzz target: arbitrary bytes as a received RoCEv2 UDP payload.
//!
//! Input: the UDP payload itself (BTH .. ICRC). Checks that `parse`, `icrc_check` and
//! `icrc_ipv4_id` never panic, that an accepted packet's payload lies inside the input, and that
//! re-encoding what `parse` returned gives a packet that parses to the same headers and payload
//! and passes the ICRC check.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use vrdma_roce::{build_packet, header_len, icrc_check, icrc_ipv4_id, parse, IpPair, ROCE_PORT};

fuzz_target!(|data: &[u8]| {
    let v4 = IpPair::new(
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2)),
    );
    let v6 = IpPair::new(
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2)),
    );
    let _ = icrc_check(&v4, 49152, ROCE_PORT, data);
    let _ = icrc_check(&v6, 49152, ROCE_PORT, data);
    let _ = icrc_ipv4_id(&v4, 49152, ROCE_PORT, data);

    let Ok(p) = parse(data) else { return };
    let hlen = header_len(p.hdr.bth.opcode).expect("parsed opcode is supported");
    assert!(hlen + p.payload.len() + usize::from(p.hdr.bth.pad) + 4 == data.len());
    assert!(data[hlen..].starts_with(p.payload));

    let mut again = Vec::new();
    build_packet(&p.hdr, p.payload, &v6, 49152, ROCE_PORT, &mut again)
        .expect("parsed headers re-encode");
    let q = parse(&again).expect("re-encoded packet parses");
    assert_eq!(q.hdr, p.hdr);
    assert_eq!(q.payload, p.payload);
    assert!(icrc_check(&v6, 49152, ROCE_PORT, &again));
});
