//! Benchmarks across two processes: `path=roce` (two guests whose devices talk RoCEv2 over UDP
//! through their gateways) and its floor `path=udp` (raw UDP between the same two processes,
//! on sockets set up as the gateway's), measured in the same run.
//!
//! The local process runs the measuring side; a node process (`vrdma-perf node`, see
//! [`crate::node`]) runs the other.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use vrdma_abi as abi;
use vrdma_abi::Gid;
use vrdma_guest::{Qp, SendWr};

use crate::perf::BwStats;
use crate::wire::{udp_socket, wire_node, write_lat_side, NodeCmd, RemoteNode, WireNode};

/// UDP payload bytes RoCEv2 adds to an RDMA WRITE segment of the first (or only) packet:
/// BTH 12 + RETH 16 + ICRC 4.
pub const WRITE_OVERHEAD: usize = 32;

/// A local guest and a guest in a node process, with one connected RC QP each.
pub struct CrossPair {
    /// The local guest.
    pub local: WireNode,
    /// Its QP.
    pub qp: Qp,
    /// The node process.
    pub remote: RemoteNode,
    /// The remote QPN.
    pub rqpn: u32,
    /// The remote buffer (address, rkey).
    pub rbuf: (u64, u32),
    /// The node process's address.
    pub rip: IpAddr,
    /// The remote device's GID.
    pub rgid: Gid,
}

/// Starts a node process (`exe args…`) at `remote_ip`, a local guest at `local_ip`, both with
/// `buf` bytes of buffer, and connects them with path MTU `mtu` (`abi::MTU_*`) and ACK timeout
/// exponent `timeout`.
pub fn cross_pair(
    exe: &Path,
    args: &[&str],
    (local_ip, remote_ip): (IpAddr, IpAddr),
    buf: u64,
    mtu: u32,
    timeout: u8,
) -> Result<CrossPair, String> {
    let mut remote = RemoteNode::spawn(exe, args, None)?;
    let info = remote.call(&NodeCmd::Init {
        bind: remote_ip.to_string(),
        buf,
    })?;
    let rqpn = remote
        .call(&NodeCmd::Qp { depth: 1024 })?
        .qpn
        .ok_or("no qpn")?;
    let local = wire_node(local_ip, buf, None)?;
    let qp = local.rc_qp(1024)?;
    let rgid = Gid {
        raw: info.gid.ok_or("no gid")?,
    };
    let p = local.params(rqpn, rgid, mtu, timeout);
    local
        .d
        .connect_rc_with(&qp, &p)
        .map_err(|e| e.to_string())?;
    remote.call(&NodeCmd::Connect {
        qpn: rqpn,
        rqpn: qp.qpn(),
        rgid: local.gid().raw,
        mtu,
        timeout,
    })?;
    Ok(CrossPair {
        local,
        qp,
        remote,
        rqpn,
        rbuf: (info.addr.ok_or("no addr")?, info.rkey.ok_or("no rkey")?),
        rip: remote_ip,
        rgid,
    })
}

/// `write-lat` across the processes (ib_write_lat semantics). Returns round trips in ns.
pub fn write_lat_roce(p: &mut CrossPair, size: u64, iters: usize) -> Result<Vec<u64>, String> {
    p.remote.send(&NodeCmd::WriteLatServer {
        qpn: p.rqpn,
        size,
        iters,
        raddr: p.local.mr.addr(0),
        rkey: p.local.mr.rkey,
    })?;
    let rtts = write_lat_side(&mut p.local, &mut p.qp, size, iters, p.rbuf, true);
    let done = p.remote.recv();
    let rtts = rtts?;
    done?;
    Ok(rtts)
}

/// The floor of `write_lat_roce`: a UDP ping-pong between the same two processes with
/// datagrams of the size a `size`-byte WRITE takes on the wire, both sides blocking in
/// `recv` (as the gateway's receive thread waits in `poll`). Returns round trips in ns.
pub fn udp_pingpong(p: &mut CrossPair, size: u64, iters: usize) -> Result<Vec<u64>, String> {
    let total = iters + crate::perf::warmup_of(iters);
    let port = p
        .remote
        .call(&NodeCmd::UdpEcho { count: total })?
        .port
        .ok_or("no port")?;
    let to = SocketAddr::new(p.rip, port);
    let s = udp_socket(SocketAddr::new(p.local.gw.addr().ip(), 0)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let len = (size as usize).div_ceil(4) * 4 + WRITE_OVERHEAD;
    let msg = vec![0x5au8; len];
    let mut back = vec![0u8; 65536];
    let mut rtts = Vec::with_capacity(iters);
    for i in 0..total {
        let t = Instant::now();
        s.send_to(&msg, to).map_err(|e| e.to_string())?;
        let (n, _) = s
            .recv_from(&mut back)
            .map_err(|e| format!("udp echo: {e}"))?;
        if n != len {
            return Err(format!("echo of {n} bytes, sent {len}"));
        }
        if i >= total - iters {
            rtts.push(t.elapsed().as_nanos() as u64);
        }
    }
    p.remote.recv()?;
    Ok(rtts)
}

/// `write-bw` across the processes: `msgs` WRITEs of `size` bytes from the local guest into
/// the remote buffer, `window` outstanding, every 16th signaled.
pub fn write_bw_roce(
    p: &mut CrossPair,
    size: u64,
    msgs: u64,
    window: u64,
) -> Result<BwStats, String> {
    let l = &mut p.local;
    let sge = [l.mr.sge(0, size as u32)];
    let (raddr, rkey) = p.rbuf;
    let mut cqes = [abi::Cqe::default(); 64];
    let (mut posted, mut done) = (0u64, 0u64);
    let start = Instant::now();
    let mut first = None;
    let deadline = start + Duration::from_secs(300);
    while done < msgs {
        if Instant::now() > deadline {
            return Err(format!("stuck at {done} of {msgs}"));
        }
        while posted < msgs && posted < done + window {
            // Every 16th, the last one, and the one that fills the window (else a window
            // below 16 would wait for a completion nobody asked for).
            let signaled = posted % 16 == 15 || posted + 1 == msgs || posted + 1 == done + window;
            let mut wr = SendWr::write(posted, &sge, raddr, rkey);
            if !signaled {
                wr = wr.unsignaled();
            }
            l.d.post_send(&mut p.qp, &[wr]).map_err(|e| e.to_string())?;
            posted += 1;
        }
        let n = l.d.poll_cq(&mut l.cq, &mut cqes);
        for c in &cqes[..n] {
            if c.status != abi::WC_SUCCESS {
                return Err(format!("completion status {}", c.status));
            }
            first.get_or_insert_with(|| start.elapsed());
            done = c.wr_id + 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(BwStats {
        test: "write_bw",
        path: "roce",
        bytes: size,
        qps: 1,
        batch: 1,
        msgs,
        msg_rate_mpps: msgs as f64 / secs / 1e6,
        bw_gbps: (msgs * size) as f64 * 8.0 / secs / 1e9,
        first_completion_us: first.unwrap_or_default().as_secs_f64() * 1e6,
        rounds: 1,
    })
}

/// The floor of `write_bw_roce` for `size`-byte messages: a raw UDP stream of the datagrams
/// those messages become on the wire (`mtu`-byte segments plus headers), sent as fast as one
/// thread can to the node process, which counts what arrives. Returns Gb/s of payload that
/// arrived.
pub fn udp_stream(p: &mut CrossPair, size: u64, msgs: u64, mtu: u64) -> Result<f64, String> {
    let port = p.remote.call(&NodeCmd::UdpSink)?.port.ok_or("no port")?;
    let to = SocketAddr::new(p.rip, port);
    let s = udp_socket(SocketAddr::new(p.local.gw.addr().ip(), 0)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let segs = size.div_ceil(mtu).max(1);
    let dgram = vec![0xa5u8; mtu.min(size) as usize + WRITE_OVERHEAD];
    let start = Instant::now();
    for _ in 0..msgs * segs {
        s.send_to(&dgram, to).map_err(|e| e.to_string())?;
    }
    s.send_to(&[], to).map_err(|e| e.to_string())?;
    let mut b = [0u8; 8];
    let (n, _) = s.recv_from(&mut b).map_err(|e| format!("udp sink: {e}"))?;
    let secs = start.elapsed().as_secs_f64();
    p.remote.recv()?;
    if n != 8 {
        return Err("bad sink answer".into());
    }
    let got = u64::from_le_bytes(b);
    let payload = got as f64 * (mtu.min(size) as f64 / dgram.len() as f64);
    Ok(payload * 8.0 / secs / 1e9)
}

/// What [`migrate_across`] measured.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CrossMigrateStats {
    /// `migrate`.
    pub test: &'static str,
    /// `roce`.
    pub path: &'static str,
    /// Migrations done.
    pub migrations: usize,
    /// Downtime of each migration: device stopped in one process → running in the next, µs
    /// (wall clock of the two processes). Guest pages are pre-copied while the source runs;
    /// the downtime includes saving the device, writing the state and the pages dirtied since
    /// the pre-copy to a file, reading them in the other process, restoring and resuming.
    pub downtime_us: Vec<u64>,
    /// The longest time the peer saw no completion, µs: what the migrations cost the
    /// application (downtime plus the peer's resend after the resume message).
    pub max_completion_gap_us: u64,
    /// Bytes of device state (the blob) at the last migration.
    pub state_bytes: u64,
    /// WRs the peer completed (all successful, in order).
    pub ops_total: u64,
    /// WRs posted by the peer while a device was down (between its stop and resume).
    pub ops_during: u64,
    /// WRs lost (always 0 when this returns: a lost WR means a timeout error instead).
    pub ops_lost: u64,
    /// WRs executed twice (0: the fetch-add results prove it).
    pub ops_duplicated: u64,
}

/// Live migration across processes while the peer works: a node process at `a_ip` holds
/// device A; a local guest at `b_ip` keeps sending A WRITEs, FETCH_ADDs (+1 on one counter) and
/// READs of what it wrote (3 × `iters` WRs, 48 in flight). After `hops[k].0` WRs, A migrates to
/// a fresh node process bound to `hops[k].1` (the same address, or a new one that peers learn
/// from the resume message). Every completion is checked: successful and in order, the k-th
/// fetch-add returns exactly k (executed once), each READ returns its WRITE's bytes, and at the
/// end A's memory (read from its last process) holds the counter and the last slot contents.
pub fn migrate_across(
    exe: &Path,
    args: &[&str],
    a_ip: IpAddr,
    b_ip: IpAddr,
    hops: &[(u64, IpAddr)],
    iters: u64,
) -> Result<CrossMigrateStats, String> {
    use vrdma_guest::pattern;
    const SLOT: u64 = 256;
    // B, the peer, is the local guest; A is the device that migrates (a node process).
    let CrossPair {
        local: mut b,
        qp: mut qb,
        remote: current,
        rbuf: (aaddr, arkey),
        rgid: agid,
        ..
    } = cross_pair(exe, args, (b_ip, a_ip), 1 << 20, abi::MTU_1024, 12)?;
    // A's buffer: the counter at 0, slots from 4096. B's: sources, READ targets, FA results.
    let slot = |i: u64| 4096 + (i % 512) * SLOT;
    let (src, rd, fa) = (
        |i: u64| 64 * 1024 + (i % 512) * SLOT,
        |i: u64| 256 * 1024 + (i % 512) * SLOT,
        |i: u64| 512 * 1024 + (i % 4096) * 8,
    );
    let mut st = CrossMigrateStats {
        test: "migrate",
        path: "roce",
        ..Default::default()
    };
    let (mut next, mut done) = (0u64, 0u64);
    let mut cqes = vec![abi::Cqe::default(); 64];
    let deadline = Instant::now() + Duration::from_secs(300);
    let path = std::env::temp_dir().join(format!("vrdma-migrate-{}.state", std::process::id()));
    let path_s = path.display().to_string();
    let mut hop = 0;
    let mut last_completion = Instant::now();
    let mut current = Some(current);
    let mut migrating: Option<std::thread::JoinHandle<Result<HopResult, String>>> = None;
    let down = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Every hop happens (after the traffic, if the traffic ended first).
    while done < 3 * iters || migrating.is_some() || hop < hops.len() {
        if Instant::now() > deadline {
            return Err(format!("stuck at WR {done} of {}", 3 * iters));
        }
        if next / 3 < iters && next < done + 48 {
            let i = next / 3;
            b.buf.write(src(i), &pattern(i, SLOT as usize));
            let (w, f, r) = (
                [b.mr.sge(src(i), SLOT as u32)],
                [b.mr.sge(fa(i), 8)],
                [b.mr.sge(rd(i), SLOT as u32)],
            );
            b.d.post_send(
                &mut qb,
                &[
                    SendWr::write(3 * i, &w, aaddr + slot(i), arkey),
                    SendWr::fetch_add(3 * i + 1, &f, aaddr, arkey, 1),
                    SendWr::read(3 * i + 2, &r, aaddr + slot(i), arkey),
                ],
            )
            .map_err(|e| e.to_string())?;
            next += 3;
            if down.load(std::sync::atomic::Ordering::Acquire) {
                st.ops_during += 3;
            }
        }
        let n = b.d.poll_cq(&mut b.cq, &mut cqes);
        if n > 0 {
            let gap = last_completion.elapsed().as_micros() as u64;
            st.max_completion_gap_us = st.max_completion_gap_us.max(gap);
            last_completion = Instant::now();
        }
        for c in &cqes[..n] {
            if (c.wr_id, c.status) != (done, abi::WC_SUCCESS) {
                return Err(format!("completion {c:?}, expected WR {done} successful"));
            }
            let i = done / 3;
            if done % 3 == 1 && b.buf.read_u64(fa(i)) != i {
                return Err(format!(
                    "fetch-add {i} returned {} (lost or executed twice)",
                    b.buf.read_u64(fa(i))
                ));
            }
            if done % 3 == 2 && b.buf.read_vec(rd(i), SLOT as usize) != pattern(i, SLOT as usize) {
                return Err(format!("READ {i} returned wrong data"));
            }
            done += 1;
        }
        // Migrations run beside the traffic, as a VMM migrates while the peer keeps working.
        if let (Some(&(at, to)), true) = (hops.get(hop), migrating.is_none()) {
            if done >= at.min(3 * iters) {
                let src_node = current.take().ok_or("no node")?;
                let (exe, args) = (
                    exe.to_path_buf(),
                    args.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                );
                let (path_s, down) = (path_s.clone(), down.clone());
                migrating = Some(std::thread::spawn(move || {
                    let args: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
                    migrate_hop(src_node, &exe, &args, &path_s, to, &down)
                }));
                hop += 1;
            }
        }
        if migrating.as_ref().is_some_and(|h| h.is_finished()) {
            let h = migrating.take().ok_or("no migration")?;
            let (dst, downtime, state, gid) =
                h.join().map_err(|_| "migration thread panicked")??;
            if gid != agid.raw {
                return Err("the GID changed".into());
            }
            st.downtime_us.push(downtime);
            st.state_bytes = state;
            current = Some(dst);
        }
        if n == 0 {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
    let _ = std::fs::remove_file(&path);
    let mut current = current.ok_or("no node")?;
    st.migrations = hop;
    st.ops_total = done;
    let counter = current
        .call(&NodeCmd::Read { off: 0, len: 8 })?
        .data
        .unwrap_or_default();
    if counter != iters.to_le_bytes() {
        return Err(format!("counter {counter:?}, expected {iters}"));
    }
    for i in iters.saturating_sub(512)..iters {
        let got = current
            .call(&NodeCmd::Read {
                off: slot(i),
                len: SLOT,
            })?
            .data
            .unwrap_or_default();
        if got != pattern(i, SLOT as usize) {
            return Err(format!("A's slot of WRITE {i} differs"));
        }
    }
    Ok(st)
}

/// A migrated node: its process, the downtime (µs), the state size and the GID it serves.
type HopResult = (RemoteNode, u64, u64, [u8; 16]);

/// One migration: a destination process is started and pre-loaded with a pre-copy of guest
/// memory (before the stop, as a VMM prepares its target first), then the source stops and
/// saves to `path` and the destination restores at `to`; `down` is set while the device is
/// stopped.
fn migrate_hop(
    mut src: RemoteNode,
    exe: &Path,
    args: &[&str],
    path: &str,
    to: IpAddr,
    down: &std::sync::atomic::AtomicBool,
) -> Result<HopResult, String> {
    use std::sync::atomic::Ordering;
    let mut dst = RemoteNode::spawn(exe, args, None)?;
    // Pre-copy: guest pages move while the source runs; only pages dirtied since then move
    // during the downtime.
    let pre = format!("{path}.pre");
    let pages = src
        .call(&NodeCmd::MigratePrecopy { path: pre.clone() })?
        .count
        .unwrap_or(0);
    dst.call(&NodeCmd::MigratePrepare {
        path: pre.clone(),
        pages,
    })?;
    let _ = std::fs::remove_file(&pre);
    down.store(true, Ordering::Release);
    let out = src.call(&NodeCmd::MigrateOut {
        path: path.to_string(),
    });
    let inr = out.and_then(|out| {
        let inr = dst.call(&NodeCmd::MigrateIn {
            path: path.to_string(),
            bind: to.to_string(),
        })?;
        Ok((out, inr))
    });
    down.store(false, Ordering::Release);
    let (out, inr) = inr?;
    let downtime = inr
        .at_us
        .unwrap_or(0)
        .saturating_sub(out.at_us.unwrap_or(0));
    Ok((
        dst,
        downtime,
        inr.count.unwrap_or(0),
        inr.gid.unwrap_or_default(),
    ))
}
