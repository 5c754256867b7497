//! RoCEv2 across processes (and network namespaces): guests in `vrdma-node` child processes
//! talk to a guest in the test process, or to each other, over UDP; a device migrates from one
//! process to another while its peer keeps sending.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::Duration;

use vrdma_abi as abi;
use vrdma_abi::Gid;
use vrdma_guest::{pattern, SendWr};
use vrdma_tests::roce_perf::migrate_across;
use vrdma_tests::wire::{wire_node, NodeCmd, NodeReply, RemoteNode};

const NODE: &str = env!("CARGO_BIN_EXE_vrdma-node");

fn ip(test: u8, node: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 120 + test, node))
}

/// A child node at `bind` with a QP; returns (node, its init reply, its QPN).
fn child(bind: IpAddr, netns: Option<&str>) -> (RemoteNode, NodeReply, u32) {
    let mut n = RemoteNode::spawn(Path::new(NODE), &[], netns).expect("spawn vrdma-node");
    let info = n
        .call(&NodeCmd::Init {
            bind: bind.to_string(),
            buf: 1 << 20,
        })
        .expect("init");
    let qpn = n
        .call(&NodeCmd::Qp { depth: 256 })
        .expect("qp")
        .qpn
        .unwrap();
    (n, info, qpn)
}

fn connect_child(n: &mut RemoteNode, qpn: u32, rqpn: u32, rgid: Gid, timeout: u8) {
    n.call(&NodeCmd::Connect {
        qpn,
        rqpn,
        rgid: rgid.raw,
        mtu: abi::MTU_1024,
        timeout,
    })
    .expect("connect");
}

#[test]
fn a_guest_in_another_process() {
    let (mut b, binfo, bqpn) = child(ip(1, 2), None);
    let mut a = wire_node(ip(1, 1), 1 << 20, None).unwrap();
    let mut qa = a.rc_qp(256).unwrap();
    let bgid = Gid {
        raw: binfo.gid.unwrap(),
    };
    let p = a.params(bqpn, bgid, abi::MTU_1024, 12);
    a.d.connect_rc_with(&qa, &p).unwrap();
    connect_child(&mut b, bqpn, qa.qpn(), a.gid(), 12);
    let (baddr, brkey) = (binfo.addr.unwrap(), binfo.rkey.unwrap());

    // A writes 100,000 bytes (98 packets) into B; B's memory, read back from its process.
    let data = pattern(11, 100_000);
    a.buf.write(0, &data);
    a.d.post_send(
        &mut qa,
        &[SendWr::write(
            1,
            &[a.mr.sge(0, 100_000)],
            baddr + 4096,
            brkey,
        )],
    )
    .unwrap();
    let c = a.d.poll_cq_until(&mut a.cq, 1, Duration::from_secs(10));
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].status, abi::WC_SUCCESS);
    let got = b
        .call(&NodeCmd::Read {
            off: 4096,
            len: 100_000,
        })
        .unwrap()
        .data
        .unwrap();
    assert_eq!(got, data);

    // B writes into A from its process.
    b.call(&NodeCmd::WriteFrom {
        qpn: bqpn,
        off: 8192,
        len: 5000,
        seed: 5,
        raddr: a.mr.addr(200_000),
        rkey: a.mr.rkey,
    })
    .unwrap();
    assert_eq!(a.buf.read_vec(200_000, 5000), pattern(5, 5000));

    // A short write-lat ping-pong across the two processes.
    b.send(&NodeCmd::WriteLatServer {
        qpn: bqpn,
        size: 2,
        iters: 200,
        raddr: a.mr.addr(0),
        rkey: a.mr.rkey,
    })
    .unwrap();
    let rtts =
        vrdma_tests::wire::write_lat_side(&mut a, &mut qa, 2, 200, (baddr, brkey), true).unwrap();
    b.recv().unwrap();
    assert_eq!(rtts.len(), 200);
}

fn have(cmd: &str) -> bool {
    std::process::Command::new(cmd)
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Two network namespaces joined by a veth pair, removed on drop.
struct Netns {
    names: [String; 2],
}

impl Netns {
    fn new() -> Option<Self> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 || !have("ip") {
            return None;
        }
        let id = std::process::id() % 10_000;
        let names = [format!("vrdma-a{id}"), format!("vrdma-b{id}")];
        let run = |args: &str| {
            let ok = std::process::Command::new("ip")
                .args(args.split_whitespace())
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "ip {args}");
        };
        let n = Netns {
            names: names.clone(),
        };
        let (a, b) = (&names[0], &names[1]);
        run(&format!("netns add {a}"));
        run(&format!("netns add {b}"));
        run(&format!(
            "link add va{id} netns {a} type veth peer name vb{id} netns {b}"
        ));
        run(&format!("-n {a} addr add 10.98.0.1/24 dev va{id}"));
        run(&format!("-n {b} addr add 10.98.0.2/24 dev vb{id}"));
        // IPv6 too (no duplicate address detection: the addresses are usable at once).
        run(&format!("-n {a} addr add fd98::1/64 dev va{id} nodad"));
        run(&format!("-n {b} addr add fd98::2/64 dev vb{id} nodad"));
        for (ns, dev) in [(a, format!("va{id}")), (b, format!("vb{id}"))] {
            run(&format!("-n {ns} link set {dev} up"));
            run(&format!("-n {ns} link set lo up"));
        }
        // IPv6 is usable once no address is tentative (the link-local ones go through
        // duplicate address detection when the link comes up); until then the first datagrams
        // can vanish, as on any host whose network is still coming up.
        let settled = |ns: &str| {
            std::process::Command::new("ip")
                .args(["-n", ns, "-6", "addr", "show", "tentative"])
                .output()
                .is_ok_and(|o| o.status.success() && o.stdout.is_empty())
        };
        // And both ends of the veth have carrier.
        let up = |ns: &str, dev: &str| {
            std::process::Command::new("ip")
                .args(["-n", ns, "link", "show", "dev", dev])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("LOWER_UP"))
        };
        let (da, db) = (format!("va{id}"), format!("vb{id}"));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !(settled(a) && settled(b) && up(a, &da) && up(b, &db))
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(n)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", n])
                .status();
        }
    }
}

/// Two devices in two processes in two network namespaces ("hosts" joined by veth), the
/// Ethernet MTU 1500 so RoCE path MTU 1024: writes both ways, data checked from each process;
/// over IPv4 (IPv4-mapped GIDs) and over IPv6 (the addresses are the GIDs).
#[test]
fn two_processes_in_two_network_namespaces() {
    let Some(ns) = Netns::new() else {
        eprintln!("SKIPPED: needs root and iproute2 (ip netns)");
        return;
    };
    for (a, b) in [("10.98.0.1", "10.98.0.2"), ("fd98::1", "fd98::2")] {
        writes_both_ways(&ns, a.parse().unwrap(), b.parse().unwrap());
    }
}

fn writes_both_ways(ns: &Netns, a_ip: IpAddr, b_ip: IpAddr) {
    let (mut a, ainfo, aqpn) = child(a_ip, Some(&ns.names[0]));
    let (mut b, binfo, bqpn) = child(b_ip, Some(&ns.names[1]));
    let (agid, bgid) = (
        Gid {
            raw: ainfo.gid.unwrap(),
        },
        Gid {
            raw: binfo.gid.unwrap(),
        },
    );
    // ACK timeout 268 ms (exponent 16), 7 retries: the first datagrams on a fresh veth can
    // vanish while neighbour discovery runs, and on a loaded 2-vCPU CI machine a node process
    // can stall for longer than 7 × 17 ms (exponent 12 once ran out of retries there). The
    // test checks the data, not the timing.
    connect_child(&mut a, aqpn, bqpn, bgid, 16);
    connect_child(&mut b, bqpn, aqpn, agid, 16);
    for (i, len) in [
        (1u64, 2u64),
        (2, 1024),
        (3, 1025),
        (4, 65_536),
        (5, 300_000),
    ] {
        write_and_check(&mut a, aqpn, &mut b, &binfo, i, len, "A -> B");
        write_and_check(&mut b, bqpn, &mut a, &ainfo, 100 + i, len, "B -> A");
    }
}

/// `from` writes `len` bytes of `pattern(seed)` through QP `qpn` into the second half of `to`'s
/// buffer (described by `to_info`); the bytes are then read back from `to`'s process.
fn write_and_check(
    from: &mut RemoteNode,
    qpn: u32,
    to: &mut RemoteNode,
    to_info: &NodeReply,
    seed: u64,
    len: u64,
    what: &str,
) {
    from.call(&NodeCmd::WriteFrom {
        qpn,
        off: 0,
        len,
        seed,
        raddr: to_info.addr.unwrap() + 512 * 1024,
        rkey: to_info.rkey.unwrap(),
    })
    .unwrap();
    let got = to
        .call(&NodeCmd::Read {
            off: 512 * 1024,
            len,
        })
        .unwrap()
        .data
        .unwrap();
    assert_eq!(got, pattern(seed, len as usize), "{what} {len} bytes");
}

/// The device of a child process migrates to a new process — first at the same address, then
/// at another one (peers learn it from the resume message) — while the peer keeps writing,
/// reading and fetch-adding (see [`migrate_across`] for what is checked: every WR completes
/// once and in order, fetch-add results are exactly 0, 1, 2, …, READs return what was
/// written, and A's memory in its last process is exact).
#[test]
fn migration_across_processes_loses_nothing() {
    let hops = [(900, ip(3, 1)), (2400, ip(3, 3))];
    let st = migrate_across(Path::new(NODE), &[], ip(3, 1), ip(3, 2), &hops, 1200).unwrap();
    eprintln!("{st:?}");
    assert_eq!(st.migrations, 2);
    assert_eq!(st.downtime_us.len(), 2);
    assert_eq!(st.ops_total, 3600);
    assert!(st.state_bytes > 0);
}
