//! Measurements with perftest semantics, shared by `vrdma-perf` and the tests that check the
//! tool's plumbing (not its figures: figures belong in benchmarks).
//!
//! `write-lat` (`ib_write_lat`): each side RDMA-WRITEs `size` bytes into the peer's buffer and
//! busy-polls the last byte of its own buffer for the peer's write; the client time-stamps every
//! iteration and the reported latency is half the round trip. `t_typical` is the median.
//! `send-lat` (`ib_send_lat`): the same ping-pong with SENDs, each side polling its receive CQ;
//! half round trips. `read-lat` and `atomic-lat` (`ib_read_lat`, `ib_atomic_lat`): the client
//! posts one READ / atomic at a time and polls its send CQ for the completion; the reported
//! latency is the *full* round trip, as perftest reports it.
//!
//! `path=device` runs two guests through the guest driver, virtio-mmio and the device;
//! `path=fabric` drives the same soft-fabric engine directly ([`crate::fabric_path`]), so the
//! difference is what the device layer costs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;
use vm_memory::GuestAddress;
use vrdma_abi::{self as abi, Cqe, Gid, ACCESS_ALL, WC_SUCCESS};
use vrdma_device::backend::Completion;
use vrdma_device::soft::SoftFabric;
use vrdma_guest::{Buffer, Cq, Driver, Layout, Mr, Qp, QpInitAttr, RecvWr, SendWr};

use crate::fabric_path::{bare_pair, write_wr, BareEndpoint};
use crate::{Vm, ALLOC_BASE, GUEST_RAM};

/// Summary of one latency run, in microseconds: half round trips for the ping-pong tests
/// (`write_lat`, `send_lat`), full round trips for `read_lat` and `atomic_lat` (as perftest).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct LatStats {
    /// Test name: `write_lat`, `send_lat`, `read_lat` or `atomic_lat`.
    pub test: &'static str,
    /// `device` (two guests through the ABI and device), `fabric` (the soft fabric's engine
    /// driven directly, no device layer), `shm` (cache-line ping-pong floor) or `eventfd`
    /// (blocking eventfd ping-pong floor).
    pub path: &'static str,
    /// Message size.
    pub bytes: u64,
    /// Iterations measured.
    pub iters: usize,
    /// `poll` or `interrupt`.
    pub completion: &'static str,
    /// Minimum.
    pub t_min_us: f64,
    /// Maximum.
    pub t_max_us: f64,
    /// Median.
    pub t_typical_us: f64,
    /// Mean.
    pub t_avg_us: f64,
    /// Standard deviation.
    pub t_stdev_us: f64,
    /// 99th percentile.
    pub t_p99_us: f64,
    /// 99.9th percentile.
    pub t_p999_us: f64,
}

impl LatStats {
    /// Statistics of half round trips given full round trips in nanoseconds (ping-pong tests).
    pub fn from_rtts(
        test: &'static str,
        path: &'static str,
        bytes: u64,
        completion: &'static str,
        rtt_ns: &[u64],
    ) -> Self {
        Self::from_ns(test, path, bytes, completion, rtt_ns, 2000.0)
    }

    /// Statistics of full round trips given in nanoseconds (`read_lat`, `atomic_lat`).
    pub fn from_full_rtts(
        test: &'static str,
        path: &'static str,
        bytes: u64,
        completion: &'static str,
        rtt_ns: &[u64],
    ) -> Self {
        Self::from_ns(test, path, bytes, completion, rtt_ns, 1000.0)
    }

    fn from_ns(
        test: &'static str,
        path: &'static str,
        bytes: u64,
        completion: &'static str,
        ns: &[u64],
        per_us: f64,
    ) -> Self {
        let mut v: Vec<f64> = ns.iter().map(|&n| n as f64 / per_us).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len().max(1) as f64;
        let avg = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - avg) * (x - avg)).sum::<f64>() / n;
        let pct = |p: f64| -> f64 {
            if v.is_empty() {
                return 0.0;
            }
            let i = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
            v[i]
        };
        Self {
            test,
            path,
            bytes,
            iters: v.len(),
            completion,
            t_min_us: v.first().copied().unwrap_or(0.0),
            t_max_us: v.last().copied().unwrap_or(0.0),
            t_typical_us: pct(0.5),
            t_avg_us: avg,
            t_stdev_us: var.sqrt(),
            t_p99_us: pct(0.99),
            t_p999_us: pct(0.999),
        }
    }

    /// The header line of `ib_write_lat`'s table.
    pub fn header() -> String {
        format!(
            " {:<7} {:<11} {:<12} {:<12} {:<16} {:<12} {:<14} {:<22} {:<22} {}",
            "#bytes",
            "#iterations",
            "t_min[usec]",
            "t_max[usec]",
            "t_typical[usec]",
            "t_avg[usec]",
            "t_stdev[usec]",
            "99% percentile[usec]",
            "99.9% percentile[usec]",
            "path"
        )
    }

    /// One table row, in `ib_write_lat`'s column layout (plus the path).
    pub fn row(&self) -> String {
        format!(
            " {:<7} {:<11} {:<12.2} {:<12.2} {:<16.2} {:<12.2} {:<14.2} {:<22.2} {:<22.2} {}",
            self.bytes,
            self.iters,
            self.t_min_us,
            self.t_max_us,
            self.t_typical_us,
            self.t_avg_us,
            self.t_stdev_us,
            self.t_p99_us,
            self.t_p999_us,
            self.path
        )
    }
}

/// One side of a connected RC pair.
pub struct Side {
    /// The guest (kept alive for the device and memory).
    pub vm: Vm,
    /// The driver.
    pub d: Driver,
    /// Local buffer (registered).
    pub buf: Buffer,
    /// Its MR.
    pub mr: Mr,
    /// Send CQ.
    pub cq: Cq,
    /// Receive CQ (armed in interrupt mode).
    pub rcq: Cq,
    /// The QP.
    pub qp: Qp,
}

/// Two guests on one fabric with a connected RC QP pair and registered buffers of `2 * size`
/// bytes: the first half is the send buffer, the second half receives the peer's writes.
pub fn rc_pair(size: u64, max_inline: u32) -> Result<(Arc<SoftFabric>, Side, Side), String> {
    let fabric = SoftFabric::new();
    let mk = |id: u32| -> Result<Side, String> {
        let vm = Vm::new(&fabric, id);
        let d = vm.driver()?;
        let pd = d.alloc_pd().map_err(|e| e.to_string())?;
        let buf = d
            .alloc_buffer(2 * size.max(64), Layout::Any)
            .map_err(|e| e.to_string())?;
        let mr = d.reg_mr(pd, &buf, ACCESS_ALL).map_err(|e| e.to_string())?;
        let cq = d.create_cq(1024).map_err(|e| e.to_string())?;
        let rcq = d.create_cq(1024).map_err(|e| e.to_string())?;
        let qp = d
            .create_qp(
                pd,
                &QpInitAttr {
                    max_send_wr: 256,
                    max_recv_wr: 256,
                    max_inline,
                    recv_cq: rcq.cqn(),
                    ..QpInitAttr::rc(&cq)
                },
            )
            .map_err(|e| e.to_string())?;
        Ok(Side {
            vm,
            d,
            buf,
            mr,
            cq,
            rcq,
            qp,
        })
    };
    let a = mk(1)?;
    let b = mk(2)?;
    let gid = |s: &Side| -> Result<Gid, String> { s.d.gid().map_err(|e| e.to_string()) };
    let (ga, gb) = (gid(&a)?, gid(&b)?);
    a.d.connect_rc(&a.qp, b.qp.qpn(), gb)
        .map_err(|e| e.to_string())?;
    b.d.connect_rc(&b.qp, a.qp.qpn(), ga)
        .map_err(|e| e.to_string())?;
    Ok((fabric, a, b))
}

fn spin_until_byte(buf: &Buffer, off: u64, want: u8, deadline: Instant) -> bool {
    spin_until(|b| buf.read(off, b), want, deadline)
}

/// Busy-polls one byte through `read` until it equals `want` or `deadline` passes.
pub fn spin_until(read: impl Fn(&mut [u8]), want: u8, deadline: Instant) -> bool {
    let mut b = [0u8];
    let mut spins = 0u32;
    loop {
        read(&mut b);
        if b[0] == want {
            return true;
        }
        spins += 1;
        if spins.is_multiple_of(4096) && Instant::now() > deadline {
            return false;
        }
        std::hint::spin_loop();
    }
}

fn drain_send_cq(s: &mut Side, cqes: &mut [Cqe]) -> Result<(), String> {
    let n = s.d.poll_cq(&mut s.cq, cqes);
    for c in &cqes[..n] {
        if c.status != WC_SUCCESS {
            return Err(format!("completion error status {}", c.status));
        }
    }
    Ok(())
}

/// One side of a ping-pong: how it reaps its send completions.
trait PingSide: Send + 'static {
    /// Drains the send CQ (`scratch` is room for CQEs); fails on an error completion.
    fn drain_send(&mut self, scratch: &mut [Cqe]) -> Result<(), String>;
}

impl PingSide for Side {
    fn drain_send(&mut self, scratch: &mut [Cqe]) -> Result<(), String> {
        drain_send_cq(self, scratch)
    }
}

/// Iterations of warm-up before `iters` measured ones: 10 %, at least 16.
pub fn warmup_of(iters: usize) -> usize {
    (iters / 10).max(16)
}

/// The ping-pong tag of iteration `i`: never 0, so a zeroed buffer never matches.
pub fn tag(i: usize) -> u8 {
    (i % 255) as u8 + 1
}

/// Runs a ping-pong between `a` (client, time-stamping every iteration) and `b` (server, in its
/// own thread). The server sends to `to_a` (remote address, rkey), the client to `to_b`. `wait`
/// blocks until the peer's message of iteration `i` arrived; `post` sends this side's message.
/// One WR in 16 is signaled (perftest's `cq_mod`) and the send CQ is drained every iteration.
/// Returns the client's round trips in ns, after a warm-up of 10 % of the iterations, and the
/// two sides (for checking the data).
fn ping_pong<S, W, P>(
    a: S,
    b: S,
    to_a: (u64, u32),
    to_b: (u64, u32),
    iters: usize,
    wait: W,
    post: P,
) -> Result<(Vec<u64>, S, S), String>
where
    S: PingSide,
    W: Fn(&mut S, usize) -> Result<(), String> + Send + Sync + 'static,
    P: Fn(&mut S, usize, u64, u32, bool) -> Result<(), String> + Send + Sync + 'static,
{
    let (a_raddr, a_rkey) = to_a;
    let (b_raddr, b_rkey) = to_b;
    let warmup = warmup_of(iters);
    let total = iters + warmup;
    let barrier = Arc::new(Barrier::new(2));
    let steps = Arc::new((wait, post));
    let run = move |mut s: S,
                    client: bool,
                    raddr: u64,
                    rkey: u32,
                    barrier: Arc<Barrier>,
                    steps: Arc<(W, P)>| {
        let (wait, post) = (&steps.0, &steps.1);
        let mut stamps = Vec::with_capacity(if client { total + 1 } else { 0 });
        let mut cqes = [Cqe::default(); 64];
        barrier.wait();
        // perftest's loop on both sides: wait for the peer's message (the client's first
        // iteration starts with its own), post, reap send completions; the next wait follows.
        // Reaping between the post and the wait keeps it off the path from the peer's message
        // to this side's reply, as in perftest.
        for i in 0..total {
            if client {
                stamps.push(Instant::now());
            } else {
                wait(&mut s, i)?;
            }
            post(&mut s, i, raddr, rkey, i % 16 == 15)?;
            s.drain_send(&mut cqes)?;
            if client {
                wait(&mut s, i)?;
            }
        }
        if client {
            stamps.push(Instant::now());
        }
        let rtts: Vec<u64> = stamps
            .windows(2)
            .skip(warmup)
            .map(|w| (w[1] - w[0]).as_nanos() as u64)
            .collect();
        Ok::<_, String>((rtts, s))
    };
    let (bar2, steps2) = (barrier.clone(), steps.clone());
    let server = thread::spawn(move || run(b, false, a_raddr, a_rkey, bar2, steps2));
    let client = run(a, true, b_raddr, b_rkey, barrier, steps);
    let server = server.join().map_err(|_| "server panicked".to_string())?;
    let (rtts, a) = client?;
    let (_, b) = server?;
    Ok((rtts, a, b))
}

/// `wr`, unsignaled unless `signaled`.
fn signal_if(wr: SendWr<'_>, signaled: bool) -> SendWr<'_> {
    if signaled {
        wr
    } else {
        wr.unsignaled()
    }
}

/// `write-lat` through two guests, the device and the soft fabric. Returns round trips in ns.
pub fn write_lat_device(size: u64, iters: usize, inline: bool) -> Result<Vec<u64>, String> {
    let max_inline = if inline { 512 } else { 0 };
    let (_fabric, a, b) = rc_pair(size, max_inline)?;
    let use_inline = inline && size <= a.qp.caps().max_inline as u64;
    // Each side writes from its send half into the peer's receive half, and polls the last byte
    // of its own receive half for the iteration's tag.
    let half = size.max(64);
    let last = size - 1;
    let deadline = Instant::now() + Duration::from_secs(60);
    let wait = move |s: &mut Side, i: usize| {
        if spin_until_byte(&s.buf, half + last, tag(i), deadline) {
            Ok(())
        } else {
            Err(format!("timed out at iteration {i}"))
        }
    };
    let post = move |s: &mut Side, i: usize, raddr: u64, rkey: u32, signaled: bool| {
        let signal = |wr| signal_if(wr, signaled);
        // The inline buffer only on the inline path: zeroing it costs a 512-byte memset per
        // post, on the way from the peer's message to this side's reply.
        let r = if use_inline {
            let mut inline_data = [0u8; 512];
            inline_data[last as usize] = tag(i);
            let wr = SendWr::write_inline(i as u64, &inline_data[..size as usize], raddr, rkey);
            s.d.post_send(&mut s.qp, &[signal(wr)])
        } else {
            s.buf.write(last, &[tag(i)]);
            let sge = [s.mr.sge(0, size as u32)];
            s.d.post_send(
                &mut s.qp,
                &[signal(SendWr::write(i as u64, &sge, raddr, rkey))],
            )
        };
        r.map_err(|e| e.to_string())
    };
    let to_a = (a.mr.iova + half, a.mr.rkey);
    let to_b = (b.mr.iova + half, b.mr.rkey);
    ping_pong(a, b, to_a, to_b, iters, wait, post).map(|(rtts, _, _)| rtts)
}

/// The physical floor: two threads ping-ponging one cache line. Returns round trips in ns.
pub fn write_lat_shm(iters: usize) -> Vec<u64> {
    #[repr(align(128))]
    struct Line(AtomicU64);
    let ping = Arc::new(Line(AtomicU64::new(0)));
    let pong = Arc::new(Line(AtomicU64::new(0)));
    let warmup = warmup_of(iters);
    let total = (iters + warmup) as u64;
    let (p2, q2) = (ping.clone(), pong.clone());
    let server = thread::spawn(move || {
        for i in 1..=total {
            while p2.0.load(Ordering::Acquire) != i {
                std::hint::spin_loop();
            }
            q2.0.store(i, Ordering::Release);
        }
    });
    let mut stamps = Vec::with_capacity(total as usize + 1);
    for i in 1..=total {
        stamps.push(Instant::now());
        ping.0.store(i, Ordering::Release);
        while pong.0.load(Ordering::Acquire) != i {
            std::hint::spin_loop();
        }
    }
    stamps.push(Instant::now());
    let _ = server.join();
    stamps
        .windows(2)
        .skip(warmup)
        .map(|w| (w[1] - w[0]).as_nanos() as u64)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_follow_perftest_definitions() {
        // Half round trips of 1..=100 µs.
        let rtts: Vec<u64> = (1..=100u64).map(|us| us * 2000).collect();
        let s = LatStats::from_rtts("write_lat", "device", 2, "poll", &rtts);
        assert_eq!(s.iters, 100);
        assert_eq!(s.t_min_us, 1.0);
        assert_eq!(s.t_max_us, 100.0);
        assert_eq!(s.t_typical_us, 50.0);
        assert_eq!(s.t_p99_us, 99.0);
        assert_eq!(s.t_p999_us, 100.0);
        assert!((s.t_avg_us - 50.5).abs() < 1e-9);
    }
}

/// Result of a bandwidth run.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct BwStats {
    /// `write_bw`.
    pub test: &'static str,
    /// `device` or `fabric` (the soft fabric's engine driven directly, no device layer).
    pub path: &'static str,
    /// Message size.
    pub bytes: u64,
    /// QP pairs.
    pub qps: u32,
    /// WQEs per doorbell (one `post_send` call).
    pub batch: u32,
    /// Messages completed.
    pub msgs: u64,
    /// Million messages per second.
    pub msg_rate_mpps: f64,
    /// Gigabits per second of payload.
    pub bw_gbps: f64,
    /// Time from the first post to the first completion, in microseconds.
    pub first_completion_us: f64,
    /// Runs this result is the median of (`vrdma-perf write-bw --rounds`; 1 for one run).
    pub rounds: u32,
}

impl BwStats {
    /// The run with the median message rate among `runs` of one set-up, with `rounds` set.
    pub fn median(mut runs: Vec<BwStats>) -> Option<BwStats> {
        let rounds = runs.len() as u32;
        runs.sort_by(|a, b| a.msg_rate_mpps.total_cmp(&b.msg_rate_mpps));
        let mut m = runs.get(runs.len() / 2)?.clone();
        m.rounds = rounds;
        Some(m)
    }
}

/// Guest pair with `qps` connected RC QP pairs sharing one CQ per side, and a receive buffer
/// of `size` bytes per QP at the peer.
pub struct MultiPair {
    /// Fabric.
    pub fabric: Arc<SoftFabric>,
    /// Sender side.
    pub a: MultiSide,
    /// Receiver side.
    pub b: MultiSide,
}

/// One side of a [`MultiPair`].
pub struct MultiSide {
    /// The guest.
    pub vm: Vm,
    /// Driver.
    pub d: Driver,
    /// Buffer of `qps * size` bytes (at least 64 per QP).
    pub buf: Buffer,
    /// Its MR.
    pub mr: Mr,
    /// Shared CQ.
    pub cq: Cq,
    /// QPs.
    pub qps: Vec<Qp>,
}

/// Builds a [`MultiPair`] with SQs of `sq_depth`.
pub fn multi_pair(qps: u32, size: u64, sq_depth: u32) -> Result<MultiPair, String> {
    let fabric = SoftFabric::new();
    let slot = size.max(64);
    let e = |e: vrdma_guest::Error| e.to_string();
    let mk = |id: u32| -> Result<MultiSide, String> {
        let vm = Vm::new(&fabric, id);
        let d = vm.driver()?;
        let pd = d.alloc_pd().map_err(e)?;
        let buf = d.alloc_buffer(slot * qps as u64, Layout::Any).map_err(e)?;
        let mr = d.reg_mr(pd, &buf, ACCESS_ALL).map_err(e)?;
        // Room for every signaled completion that can be outstanding.
        let cq = d.create_cq((qps * sq_depth).clamp(256, 65536)).map_err(e)?;
        let mut v = Vec::with_capacity(qps as usize);
        for _ in 0..qps {
            let attr = QpInitAttr {
                max_send_wr: sq_depth,
                max_recv_wr: 1,
                max_send_sge: 1,
                max_recv_sge: 1,
                max_inline: 0,
                ..QpInitAttr::rc(&cq)
            };
            v.push(d.create_qp(pd, &attr).map_err(e)?);
        }
        Ok(MultiSide {
            vm,
            d,
            buf,
            mr,
            cq,
            qps: v,
        })
    };
    let a = mk(1)?;
    let b = mk(2)?;
    let (ga, gb) = (a.d.gid().map_err(e)?, b.d.gid().map_err(e)?);
    for (qa, qb) in a.qps.iter().zip(&b.qps) {
        a.d.connect_rc(qa, qb.qpn(), gb).map_err(e)?;
        b.d.connect_rc(qb, qa.qpn(), ga).map_err(e)?;
    }
    Ok(MultiPair { fabric, a, b })
}

/// `write-bw`: one sender thread posts `size`-byte RDMA WRITEs round-robin over `qps` QPs,
/// `batch` WQEs per doorbell (the last one signaled), for `msgs` messages in total.
pub fn write_bw_device(size: u64, qps: u32, batch: u32, msgs: u64) -> Result<BwStats, String> {
    BwDevice::new(size, qps, batch)?.run(msgs)
}

/// A `write-bw` set-up through the device ([`write_bw_device`]) that can run again: the
/// interleaved rounds of `vrdma-perf write-bw --rounds` run several set-ups by turns.
pub struct BwDevice {
    p: MultiPair,
    size: u64,
    qps: u32,
    batch: u32,
    sges: Vec<[vrdma_abi::Sge; 1]>,
}

impl BwDevice {
    /// Two guests with `qps` connected QP pairs.
    pub fn new(size: u64, qps: u32, batch: u32) -> Result<Self, String> {
        let p = multi_pair(qps, size, BwRun::sq_depth(batch))?;
        let slot = size.max(64);
        let sges = (0..qps as u64)
            .map(|i| [p.a.mr.sge(i * slot, size as u32)])
            .collect();
        Ok(Self {
            p,
            size,
            qps,
            batch,
            sges,
        })
    }

    /// Sends `msgs` messages; returns when all are complete.
    pub fn run(&mut self, msgs: u64) -> Result<BwStats, String> {
        let (size, qps, batch) = (self.size, self.qps, self.batch);
        let slot = size.max(64);
        let a = &mut self.p.a;
        let (raddr, rkey) = (self.p.b.mr.iova, self.p.b.mr.rkey);
        let mut cqes = vec![Cqe::default(); 4096];
        let mut q = 0usize;
        let mut wrs: Vec<SendWr> = Vec::with_capacity(batch.max(1) as usize);
        // The clock starts here, after the set-up.
        let mut run = BwRun::new(qps, batch, msgs);
        while !run.finished() {
            // Post one batch on the next QP with room.
            if let Some(n) = run.next_batch(q) {
                wrs.clear();
                for k in 0..n {
                    let wr = SendWr::write(q as u64, &self.sges[q], raddr + q as u64 * slot, rkey);
                    wrs.push(if k + 1 == n { wr } else { wr.unsignaled() });
                }
                a.d.post_send(&mut a.qps[q], &wrs)
                    .map_err(|e| e.to_string())?;
            }
            q = (q + 1) % qps as usize;
            // Reap completions: each signaled CQE retires its whole batch.
            let n = a.d.poll_cq(&mut a.cq, &mut cqes);
            for c in &cqes[..n] {
                run.retire(c.wr_id, c.status)?;
            }
            run.check_deadline("write-bw")?;
        }
        Ok(run.stats("device", size, qps))
    }
}

/// The bookkeeping of a `write-bw` loop, shared by its paths: `qps` QP pairs round robin,
/// `batch` WRs per post with the last one signaled, at most two batches in flight per QP.
pub(crate) struct BwRun {
    batch: u32,
    sq_depth: u32,
    msgs: u64,
    inflight: Vec<u32>,
    posted: u64,
    done: u64,
    start: Instant,
    deadline: Instant,
    first_completion: Option<Duration>,
}

impl BwRun {
    /// The SQ depth for `batch`: two batches in flight per QP keep the pipe full without
    /// overrunning the SQ.
    pub(crate) fn sq_depth(batch: u32) -> u32 {
        (2 * batch.max(1)).next_power_of_two().max(16)
    }

    /// Starts the clock.
    fn new(qps: u32, batch: u32, msgs: u64) -> Self {
        let batch = batch.max(1);
        let start = Instant::now();
        Self {
            batch,
            sq_depth: Self::sq_depth(batch),
            msgs,
            inflight: vec![0; qps.max(1) as usize],
            posted: 0,
            done: 0,
            start,
            deadline: start + Duration::from_secs(120),
            first_completion: None,
        }
    }

    fn finished(&self) -> bool {
        self.done >= self.msgs
    }

    /// If QP `q` has room for a batch and messages remain: their number, counted as posted.
    fn next_batch(&mut self, q: usize) -> Option<u32> {
        if self.posted >= self.msgs || self.inflight[q] + self.batch > self.sq_depth {
            return None;
        }
        let n = self.batch.min((self.msgs - self.posted) as u32);
        self.inflight[q] += n;
        self.posted += n as u64;
        Some(n)
    }

    /// A signaled completion (`wr_id` = its QP's index) retires its whole batch.
    fn retire(&mut self, wr_id: u64, status: u8) -> Result<(), String> {
        if status != WC_SUCCESS {
            return Err(format!("completion status {status}"));
        }
        let qi = wr_id as usize;
        let retired = self.batch.min(self.inflight[qi]);
        self.inflight[qi] -= retired;
        self.done += retired as u64;
        let start = self.start;
        self.first_completion.get_or_insert_with(|| start.elapsed());
        Ok(())
    }

    fn check_deadline(&self, what: &str) -> Result<(), String> {
        if Instant::now() > self.deadline {
            return Err(format!("{what} timed out"));
        }
        Ok(())
    }

    fn stats(&self, path: &'static str, size: u64, qps: u32) -> BwStats {
        let secs = self.start.elapsed().as_secs_f64();
        BwStats {
            test: "write_bw",
            path,
            bytes: size,
            qps,
            batch: self.batch,
            msgs: self.done,
            msg_rate_mpps: self.done as f64 / secs / 1e6,
            bw_gbps: self.done as f64 * size as f64 * 8.0 / secs / 1e9,
            first_completion_us: self.first_completion.map_or(0.0, |d| d.as_secs_f64() * 1e6),
            rounds: 1,
        }
    }
}

/// Replaces the previous wait's receive if `replace`, then waits for one receive completion on
/// `s.rcq` through the armed CQ's interrupt (no busy polling): poll, arm, poll again (the
/// device fires at once for CQEs past the arm), sleep on the interrupt.
fn wait_recv_interrupt(s: &mut Side, replace: bool, deadline: Instant) -> Result<(), String> {
    let mut cqe = [Cqe::default(); 1];
    if replace {
        // Replace the receive the previous wait consumed: here, while the peer is busy, rather
        // than between the wake-up and the next post (the receive queue holds 128).
        s.d.post_recv(&mut s.qp, &[vrdma_guest::RecvWr::new(0, &[])])
            .map_err(|e| e.to_string())?;
    }
    loop {
        if s.d.poll_cq(&mut s.rcq, &mut cqe) == 1 {
            break;
        }
        s.d.req_notify_cq(&mut s.rcq, false)
            .map_err(|e| e.to_string())?;
        if s.d.poll_cq(&mut s.rcq, &mut cqe) == 1 {
            break;
        }
        if Instant::now() > deadline {
            return Err("timed out waiting for the interrupt".into());
        }
        let _ = s.d.wait_event(Duration::from_millis(100));
    }
    if cqe[0].status != WC_SUCCESS {
        return Err(format!("receive completion status {}", cqe[0].status));
    }
    Ok(())
}

/// `write-lat` with interrupt completions: each side RDMA-WRITEs with immediate data into the
/// `write-lat` with interrupt completions: each side RDMA-WRITEs with immediate data into the
/// peer, which sleeps on its armed receive CQ's interrupt instead of polling memory.
pub fn write_lat_device_interrupt(size: u64, iters: usize) -> Result<Vec<u64>, String> {
    let (_fabric, mut a, mut b) = rc_pair(size, 0)?;
    for s in [&mut a, &mut b] {
        let recvs: Vec<vrdma_guest::RecvWr> =
            (0..128).map(|i| vrdma_guest::RecvWr::new(i, &[])).collect();
        s.d.post_recv(&mut s.qp, &recvs)
            .map_err(|e| e.to_string())?;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let wait = move |s: &mut Side, i: usize| wait_recv_interrupt(s, i > 0, deadline);
    let post = move |s: &mut Side, i: usize, raddr: u64, rkey: u32, signaled: bool| {
        let sge = [s.mr.sge(0, size as u32)];
        let wr = SendWr::write_imm(i as u64, &sge, raddr, rkey, i as u32);
        let wr = if signaled { wr } else { wr.unsignaled() };
        s.d.post_send(&mut s.qp, &[wr]).map_err(|e| e.to_string())
    };
    let half = size.max(64);
    let to_a = (a.mr.iova + half, a.mr.rkey);
    let to_b = (b.mr.iova + half, b.mr.rkey);
    ping_pong(a, b, to_a, to_b, iters, wait, post).map(|(rtts, _, _)| rtts)
}

/// The wake-up floor: two threads ping-ponging through blocking eventfds. Round trips in ns.
pub fn write_lat_eventfd(iters: usize) -> Result<Vec<u64>, String> {
    use vmm_sys_util::eventfd::EventFd;
    let e = |e: std::io::Error| e.to_string();
    let ping = EventFd::new(0).map_err(e)?;
    let pong = EventFd::new(0).map_err(e)?;
    let (p2, q2) = (ping.try_clone().map_err(e)?, pong.try_clone().map_err(e)?);
    let warmup = warmup_of(iters);
    let total = iters + warmup;
    let server = thread::spawn(move || {
        for _ in 0..total {
            if p2.read().is_err() || q2.write(1).is_err() {
                return;
            }
        }
    });
    let mut stamps = Vec::with_capacity(total + 1);
    for _ in 0..total {
        stamps.push(Instant::now());
        ping.write(1).map_err(e)?;
        pong.read().map_err(e)?;
    }
    stamps.push(Instant::now());
    let _ = server.join();
    Ok(stamps
        .windows(2)
        .skip(warmup)
        .map(|w| (w[1] - w[0]).as_nanos() as u64)
        .collect())
}

/// Single-thread copy bandwidth (bytes/s) of `size`-byte buffers: the ceiling for large
/// writes, measured in the same run. Like the soft fabric, it copies from one guest memory into
/// another (two separate mappings of `GUEST_RAM` bytes, the harness's guests) with the same
/// volatile-slice copy the device uses, at the same offsets, so that page size, TLB reach and
/// the copy routine are the same for the floor and the device. Best of three passes.
pub fn memcpy_bw(size: usize, total: u64) -> f64 {
    use vm_memory::{Bytes, GuestMemoryBackend};
    let mk =
        || crate::guest_memory(&[(GuestAddress(0), GUEST_RAM as usize)]).expect("guest memory");
    let (src, dst) = (mk(), mk());
    let size = size.min((GUEST_RAM - ALLOC_BASE) as usize);
    let at = GuestAddress(ALLOC_BASE);
    let _ = src.write_slice(&vec![0x5au8; size], at);
    let _ = dst.write_slice(&vec![0u8; size], at);
    let (Ok(s), Ok(d)) = (src.get_slice(at, size), dst.get_slice(at, size)) else {
        return 0.0;
    };
    let reps = (total / size as u64).max(1);
    let mut best = 0.0f64;
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..reps {
            s.copy_to_volatile_slice(std::hint::black_box(d));
        }
        best = best.max((reps * size as u64) as f64 / t.elapsed().as_secs_f64());
    }
    best
}

/// CPU seconds (user + system) this process has used, from `/proc/self/stat`.
pub fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Idle cost: two guests exchange `warm` writes, then nothing happens for `secs` seconds.
/// Returns the CPU seconds the process used while idle (devices, fabric and its timer thread).
pub fn idle_cpu(secs: f64, warm: u64) -> Result<f64, String> {
    let (_fabric, mut a, b) = rc_pair(64, 0)?;
    let mut cqes = [Cqe::default(); 64];
    let sge = [a.mr.sge(0, 64)];
    for i in 0..warm {
        let wr = SendWr::write(i, &sge, b.mr.iova + 64, b.mr.rkey);
        a.d.post_send(&mut a.qp, &[wr]).map_err(|e| e.to_string())?;
        while a.d.poll_cq(&mut a.cq, &mut cqes) == 0 {
            std::hint::spin_loop();
        }
    }
    let before = process_cpu_seconds().ok_or("no /proc/self/stat")?;
    thread::sleep(Duration::from_secs_f64(secs));
    let after = process_cpu_seconds().ok_or("no /proc/self/stat")?;
    drop(b);
    Ok(after - before)
}

// ---------------------------------------------------------------------------------------------
// path=fabric: the soft fabric's engine without the device layer
// ---------------------------------------------------------------------------------------------

/// One side of the fabric-path ping-pong: a bare endpoint and its connected QP. Memory layout
/// as [`Side`]: `[0, half)` is the send half, `[half, 2 * half)` receives the peer's writes.
struct FabricSide {
    ep: Arc<BareEndpoint>,
    qpn: u32,
    cqes: Vec<(u32, Completion)>,
}

impl PingSide for FabricSide {
    fn drain_send(&mut self, _scratch: &mut [Cqe]) -> Result<(), String> {
        self.ep.poll(&mut self.cqes);
        match self.cqes.iter().find(|(_, c)| c.status != WC_SUCCESS) {
            Some((_, c)) => Err(format!("completion error status {}", c.status)),
            None => Ok(()),
        }
    }
}

/// `write-lat` over the soft fabric without the device layer: two [`BareEndpoint`]s, one RC QP
/// pair, the same ping-pong as [`write_lat_device`] (same tags, same signaling, same warm-up).
/// Returns round trips in ns.
pub fn write_lat_fabric(size: u64, iters: usize, inline: bool) -> Result<Vec<u64>, String> {
    let half = size.max(64);
    let (_fabric, a, b, qa, qb) = bare_pair(1, 2 * half)?;
    // The device's limit (DeviceConfig::max_inline).
    let use_inline = inline && size <= 512;
    let last = size - 1;
    let deadline = Instant::now() + Duration::from_secs(60);
    let wait = move |s: &mut FabricSide, i: usize| {
        let ep = &s.ep;
        if spin_until(|b| ep.read(half + last, b), tag(i), deadline) {
            Ok(())
        } else {
            Err(format!("timed out at iteration {i}"))
        }
    };
    let post = move |s: &mut FabricSide, i: usize, raddr: u64, _rkey: u32, signaled: bool| {
        let inline_data = if use_inline {
            let mut v = vec![0u8; size as usize];
            v[last as usize] = tag(i);
            Some(v)
        } else {
            s.ep.write(last, &[tag(i)]);
            None
        };
        s.ep.post_send(
            s.qpn,
            [write_wr(i as u64, 0, size, raddr, signaled, inline_data)],
        );
        Ok(())
    };
    let side = |ep: &Arc<BareEndpoint>, qpn: u32| FabricSide {
        ep: ep.clone(),
        qpn,
        cqes: Vec::with_capacity(64),
    };
    let to = (half, crate::fabric_path::MR_KEY);
    let (rtts, sa, sb) = ping_pong(side(&a, qa[0]), side(&b, qb[0]), to, to, iters, wait, post)?;
    for s in [&sa, &sb] {
        if let Some((qpn, v)) = s.ep.failures().first() {
            return Err(format!("QP {qpn:#x} failed (vendor error {v})"));
        }
    }
    Ok(rtts)
}

/// `write-bw` over the soft fabric without the device layer: the loop of [`write_bw_device`]
/// (one thread, `qps` QP pairs round robin, `batch` WRs handed to the engine under one lock
/// acquisition, the last one signaled), with two [`BareEndpoint`]s.
pub fn write_bw_fabric(size: u64, qps: u32, batch: u32, msgs: u64) -> Result<BwStats, String> {
    BwFabric::new(size, qps, batch)?.run(msgs)
}

/// A `write-bw` set-up over the bare fabric ([`write_bw_fabric`]) that can run again.
pub struct BwFabric {
    _fabric: Arc<SoftFabric>,
    a: Arc<BareEndpoint>,
    b: Arc<BareEndpoint>,
    qa: Vec<u32>,
    size: u64,
    qps: u32,
    batch: u32,
}

impl BwFabric {
    /// Two bare endpoints with `qps` connected QP pairs.
    pub fn new(size: u64, qps: u32, batch: u32) -> Result<Self, String> {
        let qps = qps.max(1);
        let slot = size.max(64);
        let (_fabric, a, b, qa, _qb) = bare_pair(qps, slot * qps as u64)?;
        Ok(Self {
            _fabric,
            a,
            b,
            qa,
            size,
            qps,
            batch,
        })
    }

    /// Sends `msgs` messages; returns when all are complete.
    pub fn run(&mut self, msgs: u64) -> Result<BwStats, String> {
        let (size, qps, batch) = (self.size, self.qps, self.batch);
        let slot = size.max(64);
        let (a, b) = (&self.a, &self.b);
        let mut cqes = Vec::with_capacity(4096);
        let mut q = 0usize;
        // The clock starts here, after the set-up.
        let mut run = BwRun::new(qps, batch, msgs);
        while !run.finished() {
            if let Some(n) = run.next_batch(q) {
                let off = q as u64 * slot;
                a.post_send(
                    self.qa[q],
                    (0..n).map(|k| write_wr(q as u64, off, size, off, k + 1 == n, None)),
                );
            }
            q = (q + 1) % qps as usize;
            a.poll(&mut cqes);
            for (_, c) in &cqes {
                run.retire(c.wr_id, c.status)?;
            }
            run.check_deadline("write-bw (fabric)")?;
        }
        let stats = run.stats("fabric", size, qps);
        if let Some((qpn, v)) = a.failures().first().or(b.failures().first()) {
            return Err(format!("QP {qpn:#x} failed (vendor error {v})"));
        }
        Ok(stats)
    }
}

// ---------------------------------------------------------------------------------------------
// read-lat, send-lat, atomic-lat (path=device, poll)
// ---------------------------------------------------------------------------------------------

/// A byte pattern that differs per side and per offset (and is never all zero).
fn pattern(seed: u8, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

/// Spins on the send CQ for one completion; checks its status, opcode and byte count.
fn poll_one(s: &mut Side, opcode: u8, byte_len: u32, deadline: Instant) -> Result<Cqe, String> {
    let mut cqe = [Cqe::default(); 1];
    let mut spins = 0u32;
    while s.d.poll_cq(&mut s.cq, &mut cqe) == 0 {
        spins += 1;
        if spins.is_multiple_of(4096) && Instant::now() > deadline {
            return Err("timed out waiting for a completion".into());
        }
        std::hint::spin_loop();
    }
    let c = cqe[0];
    if c.status != WC_SUCCESS {
        return Err(format!("completion error status {}", c.status));
    }
    if c.opcode != opcode || c.byte_len != byte_len {
        return Err(format!(
            "unexpected completion: opcode {} byte_len {} (want {opcode}, {byte_len})",
            c.opcode, c.byte_len
        ));
    }
    Ok(c)
}

/// `read-lat` (ib_read_lat semantics): the client RDMA-READs `size` bytes of the server's buffer
/// into its own, one READ at a time, and busy-polls its send CQ for the completion; the
/// server's CPU does nothing (its device answers in the client's thread, as a NIC would). The
/// latency is the full round trip. At the end the client's copy must equal the server's bytes.
pub fn read_lat_device(size: u64, iters: usize) -> Result<LatStats, String> {
    let (_fabric, mut a, b) = rc_pair(size, 0)?;
    let half = size.max(64);
    let data = pattern(0x5b, size);
    b.buf.write(0, &data);
    let sge = [a.mr.sge(half, size as u32)];
    let (raddr, rkey) = (b.mr.iova, b.mr.rkey);
    let total = iters + warmup_of(iters);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut stamps = Vec::with_capacity(total + 1);
    for i in 0..total {
        stamps.push(Instant::now());
        let wr = SendWr::read(i as u64, &sge, raddr, rkey);
        a.d.post_send(&mut a.qp, &[wr]).map_err(|e| e.to_string())?;
        poll_one(&mut a, abi::WC_OP_RDMA_READ, size as u32, deadline)?;
    }
    stamps.push(Instant::now());
    let got = a.buf.read_vec(half, size as usize);
    if got != data {
        return Err("READ data differs from the server's buffer".into());
    }
    let rtts = rtts_of(&stamps, warmup_of(iters));
    Ok(LatStats::from_full_rtts(
        "read_lat", "device", size, "poll", &rtts,
    ))
}

/// `atomic-lat` (ib_atomic_lat semantics): the client posts one 8-byte FETCH_AND_ADD (add 1) —
/// or CMP_AND_SWP (compare `i`, swap `i + 1`), with `cmp_swap` — at a time on the server's
/// buffer and busy-polls its send CQ; full round trips. At the end the server's word must equal
/// the number of operations and the last returned original value one less.
pub fn atomic_lat_device(iters: usize, cmp_swap: bool) -> Result<LatStats, String> {
    let (_fabric, mut a, b) = rc_pair(8, 0)?;
    if a.d.features() & abi::VRDMA_F_ATOMICS == 0 {
        return Err("the device did not negotiate VRDMA_F_ATOMICS".into());
    }
    let sge = [a.mr.sge(64, 8)];
    let (raddr, rkey) = (b.mr.iova, b.mr.rkey);
    let total = iters + warmup_of(iters);
    let deadline = Instant::now() + Duration::from_secs(120);
    let opcode = if cmp_swap {
        abi::WC_OP_COMP_SWAP
    } else {
        abi::WC_OP_FETCH_ADD
    };
    let mut stamps = Vec::with_capacity(total + 1);
    for i in 0..total {
        stamps.push(Instant::now());
        let n = i as u64;
        let wr = if cmp_swap {
            SendWr::cmp_swap(n, &sge, raddr, rkey, n, n + 1)
        } else {
            SendWr::fetch_add(n, &sge, raddr, rkey, 1)
        };
        a.d.post_send(&mut a.qp, &[wr]).map_err(|e| e.to_string())?;
        poll_one(&mut a, opcode, 8, deadline)?;
    }
    stamps.push(Instant::now());
    let (word, orig) = (b.buf.read_u64(0), a.buf.read_u64(64));
    if word != total as u64 || orig != total as u64 - 1 {
        return Err(format!(
            "atomics: remote word {word}, last original {orig} after {total} operations"
        ));
    }
    let rtts = rtts_of(&stamps, warmup_of(iters));
    Ok(LatStats::from_full_rtts(
        "atomic_lat",
        "device",
        8,
        "poll",
        &rtts,
    ))
}

/// Receives kept posted per side in `send-lat`.
const SEND_LAT_RECVS: u64 = 128;

/// `send-lat` (ib_send_lat semantics): a ping-pong of `size`-byte SENDs; each side keeps
/// receives posted into its receive half, busy-polls its receive CQ for the peer's message and
/// re-posts the consumed receive; one SEND in 16 is signaled and the send CQ drained every
/// iteration. Half round trips. Every received message's last byte must carry the iteration's
/// tag, and at the end each side's receive half must equal the peer's send half.
pub fn send_lat_device(size: u64, iters: usize, inline: bool) -> Result<LatStats, String> {
    let max_inline = if inline { 512 } else { 0 };
    let (_fabric, mut a, mut b) = rc_pair(size, max_inline)?;
    let use_inline = inline && size <= a.qp.caps().max_inline as u64;
    let half = size.max(64);
    let last = size - 1;
    for (s, seed) in [(&mut a, 0x11u8), (&mut b, 0x77)] {
        s.buf.write(0, &pattern(seed, size));
        let sge = [s.mr.sge(half, size as u32)];
        let recvs: Vec<RecvWr> = (0..SEND_LAT_RECVS).map(|i| RecvWr::new(i, &sge)).collect();
        s.d.post_recv(&mut s.qp, &recvs)
            .map_err(|e| e.to_string())?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let wait = move |s: &mut Side, i: usize| {
        let mut cqe = [Cqe::default(); 1];
        let mut spins = 0u32;
        while s.d.poll_cq(&mut s.rcq, &mut cqe) == 0 {
            spins += 1;
            if spins.is_multiple_of(4096) && Instant::now() > deadline {
                return Err(format!("timed out at iteration {i}"));
            }
            std::hint::spin_loop();
        }
        let c = cqe[0];
        if c.status != WC_SUCCESS || c.opcode != abi::WC_OP_RECV || c.byte_len != size as u32 {
            return Err(format!(
                "receive completion: status {} opcode {} byte_len {}",
                c.status, c.opcode, c.byte_len
            ));
        }
        let mut t = [0u8];
        s.buf.read(half + last, &mut t);
        if t[0] != tag(i) {
            return Err(format!(
                "iteration {i}: received tag {} want {}",
                t[0],
                tag(i)
            ));
        }
        let sge = [s.mr.sge(half, size as u32)];
        s.d.post_recv(&mut s.qp, &[RecvWr::new(i as u64, &sge)])
            .map_err(|e| e.to_string())
    };
    let post = move |s: &mut Side, i: usize, _raddr: u64, _rkey: u32, signaled: bool| {
        let signal = |wr| signal_if(wr, signaled);
        let r = if use_inline {
            // As write-lat's inline path: zeros and the tag, no buffer access (and the buffer
            // only here).
            let mut inline_data = [0u8; 512];
            inline_data[last as usize] = tag(i);
            let wr = SendWr::send_inline(i as u64, &inline_data[..size as usize]);
            s.d.post_send(&mut s.qp, &[signal(wr)])
        } else {
            s.buf.write(last, &[tag(i)]);
            let sge = [s.mr.sge(0, size as u32)];
            s.d.post_send(&mut s.qp, &[signal(SendWr::send(i as u64, &sge))])
        };
        r.map_err(|e| e.to_string())
    };
    let (rtts, a, b) = ping_pong(a, b, (0, 0), (0, 0), iters, wait, post)?;
    // The last message each way carried the last tag, after the sender's send half (or, inline,
    // zeros).
    let total = iters + warmup_of(iters);
    for (rx, tx) in [(&a, &b), (&b, &a)] {
        let got = rx.buf.read_vec(half, size as usize);
        let mut want = if use_inline {
            vec![0u8; size as usize]
        } else {
            tx.buf.read_vec(0, size as usize)
        };
        want[last as usize] = tag(total - 1);
        if got != want {
            return Err("SEND data differs from the peer's send buffer".into());
        }
    }
    Ok(LatStats::from_rtts(
        "send_lat", "device", size, "poll", &rtts,
    ))
}

/// Consecutive differences of `stamps` in ns, after `skip` warm-up iterations.
fn rtts_of(stamps: &[Instant], skip: usize) -> Vec<u64> {
    stamps
        .windows(2)
        .skip(skip)
        .map(|w| (w[1] - w[0]).as_nanos() as u64)
        .collect()
}
