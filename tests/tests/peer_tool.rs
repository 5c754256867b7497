//! `vrdma-peer` against itself: server and client in two threads of one process, two devices
//! on one in-process soft fabric, the out-of-band exchange over TCP on 127.0.0.1. Checks the
//! tools' OOB protocols end to end (both roles) and that the data really moved.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use vrdma_device::soft::wire::{gid_from_ip, WireConfig};
use vrdma_device::soft::SoftFabric;
use vrdma_device::DeviceConfig;
use vrdma_tests::peer::{self, PeerOpts, PeerReport, Test};

fn pair(test: Test, size: u64, iters: usize, mtu: u32) -> (PeerReport, PeerReport) {
    pair_on(test, size, iters, mtu, None)
}

/// Two peers: on one in-process fabric (`wire` None), or each on its own fabric with a RoCEv2
/// gateway on 127.0.`wire`.1 / 127.0.`wire`.2, so the RDMA traffic crosses UDP on loopback as
/// it does between processes.
fn pair_on(
    test: Test,
    size: u64,
    iters: usize,
    mtu: u32,
    wire: Option<u8>,
) -> (PeerReport, PeerReport) {
    let fabric = SoftFabric::new();
    let fabric2 = if wire.is_some() {
        SoftFabric::new()
    } else {
        fabric.clone()
    };
    let (gid_s, gid_c, _gws) = match wire {
        None => (
            DeviceConfig::gid_for_id(1),
            DeviceConfig::gid_for_id(2),
            vec![],
        ),
        Some(n) => {
            let ip = |h: u8| IpAddr::V4(Ipv4Addr::new(127, 0, n, h));
            let gs = fabric2
                .attach_wire(WireConfig::new(ip(1)))
                .expect("gateway 1");
            let gc = fabric
                .attach_wire(WireConfig::new(ip(2)))
                .expect("gateway 2");
            (gid_from_ip(ip(1)), gid_from_ip(ip(2)), vec![gs, gc])
        }
    };
    // Port 0: the kernel picks a free one, the client learns it from the listener.
    let listener = peer::listen(0).expect("listen");
    let port = listener.local_addr().unwrap().port();
    let mk = |server: Option<IpAddr>| {
        let mut o = PeerOpts::new(test);
        o.server = server;
        o.port = port;
        o.size = size;
        o.iters = iters;
        o.mtu = mtu;
        o.rx_depth = 16;
        o.timeout = Duration::from_secs(30);
        o
    };
    let (so, co) = (mk(None), mk(Some(IpAddr::V4(Ipv4Addr::LOCALHOST))));
    let f2 = Arc::clone(&fabric2);
    let server =
        thread::spawn(move || peer::run(&f2, DeviceConfig::with_gid(gid_s), &so, Some(listener)));
    let client = peer::run(&fabric, DeviceConfig::with_gid(gid_c), &co, None);
    let server = server.join().expect("server thread");
    let (s, c) = (
        server.unwrap_or_else(|e| panic!("server: {e}")),
        client.unwrap_or_else(|e| panic!("client: {e}")),
    );
    assert_eq!(s.role, "server");
    assert_eq!(c.role, "client");
    assert_eq!(s.remote_qpn, c.local_qpn);
    assert_eq!(c.remote_qpn, s.local_qpn);
    assert_eq!(s.remote_gid, gid_c);
    assert_eq!(c.remote_gid, gid_s);
    assert!(s.line().starts_with("PEER ok test="), "{}", s.line());
    (s, c)
}

/// What the peer wrote/sent: its pattern with the last byte replaced by the last counter.
fn with_last(mut v: Vec<u8>, last: u8) -> Vec<u8> {
    let n = v.len();
    v[n - 1] = last;
    v
}

#[test]
fn rc_pingpong_both_roles() {
    // 3000 bytes at MTU 1024: three packets per SEND; rx_depth 16 forces re-posting.
    let (s, c) = pair(Test::RcPingpong, 3000, 50, 1024);
    assert_eq!(s.received, c.sent);
    assert_eq!(c.received, s.sent);
    // Each side: 50 sends and 50 receives completed.
    assert_eq!(s.completions, 100);
    assert_eq!(c.completions, 100);
    assert!(c.usec_per_iter.unwrap() > 0.0);
}

#[test]
fn write_lat_both_roles() {
    let iters = 300; // wraps the one-byte counter
    let (s, c) = pair(Test::WriteLat, 1500, iters, 512);
    assert_eq!(s.received, with_last(c.sent.clone(), iters as u8));
    assert_eq!(c.received, with_last(s.sent.clone(), iters as u8));
    assert_eq!(s.completions, iters as u64);
    assert_eq!(c.completions, iters as u64);
    assert_eq!(c.stats.as_ref().unwrap().iters, iters);
    assert_eq!(s.mtu, 512);
}

#[test]
fn send_lat_both_roles() {
    let iters = 250;
    let (s, c) = pair(Test::SendLat, 100, iters, 1024);
    assert_eq!(s.received, c.sent);
    assert_eq!(c.received, s.sent);
    // Receives plus the signaled sends (every 100th and the last).
    assert_eq!(s.completions, iters as u64 + 3);
    assert_eq!(c.completions, iters as u64 + 3);
}

#[test]
fn read_lat_both_roles() {
    let (s, c) = pair(Test::ReadLat, 5000, 40, 2048);
    // The client READ the server's advertised region (which holds the server's pattern) into
    // its own receive region, 5000 bytes over three 2048-byte response packets.
    assert_eq!(c.completions, 40);
    assert_eq!(s.completions, 0);
    assert!(s.stats.is_none());
    assert_eq!(c.received, s.sent);
    assert_eq!(c.stats.as_ref().unwrap().iters, 40);
}

#[test]
fn atomic_lat_both_roles() {
    let iters = 64;
    let (s, c) = pair(Test::AtomicLat, 8, iters, 1024);
    // FETCH_AND_ADD 1 per iteration on the server's 8-byte target.
    assert_eq!(
        u64::from_le_bytes(s.received[..8].try_into().unwrap()),
        iters as u64
    );
    // The last fetch returned the value before the last add.
    assert_eq!(
        u64::from_le_bytes(c.received[..8].try_into().unwrap()),
        iters as u64 - 1
    );
    assert_eq!(c.completions, iters as u64);
}

// The same over RoCEv2 on loopback: each peer on its own fabric with its own gateway.

#[test]
fn over_the_wire_rc_pingpong() {
    let (s, c) = pair_on(Test::RcPingpong, 3000, 30, 1024, Some(71));
    assert_eq!(s.received, c.sent);
    assert_eq!(c.received, s.sent);
}

#[test]
fn over_the_wire_write_lat() {
    let iters = 100;
    let (s, c) = pair_on(Test::WriteLat, 2, iters, 1024, Some(72));
    assert_eq!(s.received, with_last(c.sent.clone(), iters as u8));
    assert_eq!(c.received, with_last(s.sent.clone(), iters as u8));
}

#[test]
fn over_the_wire_read_send_atomic_lat() {
    let (s, c) = pair_on(Test::ReadLat, 3000, 20, 1024, Some(73));
    assert_eq!(c.received, s.sent);
    let (s, c) = pair_on(Test::SendLat, 64, 120, 1024, Some(74));
    assert_eq!(s.received, c.sent);
    assert_eq!(c.received, s.sent);
    let (s, _) = pair_on(Test::AtomicLat, 8, 30, 1024, Some(75));
    assert_eq!(u64::from_le_bytes(s.received[..8].try_into().unwrap()), 30);
}
