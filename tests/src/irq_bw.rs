//! `write-bw --completion interrupt`: message rate against delivery latency under interrupt
//! moderation, the batching knob of the receive side.
//!
//! One sender thread streams RDMA WRITE_WITH_IMM round robin over `qps` QP pairs, `batch` per
//! doorbell. The receiving guest gives each QP its own receive CQ, armed, and sleeps on its
//! device's interrupt (`Driver::wait_event`); on each wake-up it takes every pending CQ event,
//! drains those CQs, re-posts the consumed receives and re-arms them. Its device moderates the
//! interrupt (`CMD_SET_INTR_MODERATION`, ABI §12.3): `max_events` pending CQ notifications, or
//! the oldest one `usec` µs old. More coalescing means fewer wake-ups per message and a higher
//! rate, and a later first sight of each completion.
//!
//! Each WRITE carries the sender's clock (µs since the run's start) as immediate data, so the
//! receiver measures each message's *delivery latency*: from the post to the receiving thread
//! handling its CQE, wake-up included. Flow control is the harness's, not the device's: the
//! sender keeps at most `RQ_DEPTH - batch` messages per QP beyond what the receiver has
//! re-posted (a counter per QP), so no receive queue runs dry (which would cost RNR retries and
//! measure those instead).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;
use vrdma_abi::{self as abi, Cqe, ACCESS_ALL, WC_SUCCESS};
use vrdma_device::soft::SoftFabric;
use vrdma_guest::{Cq, Driver, Layout, Qp, QpInitAttr, RecvWr, SendWr};

use crate::Vm;

/// Receives posted per QP (and the most a QP may have outstanding beyond them).
pub const RQ_DEPTH: u32 = 256;
/// QP pairs at most (each has a receive CQ of its own on the receiving side).
pub const MAX_QPS: u32 = 1024;

/// Result of one `write-bw --completion interrupt` run.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct IrqBwStats {
    /// `write_bw`.
    pub test: &'static str,
    /// `device`.
    pub path: &'static str,
    /// `interrupt`.
    pub completion: &'static str,
    /// Message size.
    pub bytes: u64,
    /// QP pairs.
    pub qps: u32,
    /// WQEs per doorbell.
    pub batch: u32,
    /// Moderation: pending CQ notifications that raise the interrupt (0 or 1: each one).
    pub moderation_events: u32,
    /// Moderation: age in µs of the oldest pending notification that raises it (0: no timer).
    pub moderation_usec: u32,
    /// Offered load in million messages per second (0: unpaced).
    pub offered_mpps: f64,
    /// Messages received.
    pub msgs: u64,
    /// Million messages per second (first post to last receive handled).
    pub msg_rate_mpps: f64,
    /// Gigabits per second of payload.
    pub bw_gbps: f64,
    /// Time from the first post to the receiver handling the first completion, µs.
    pub first_completion_us: f64,
    /// Messages handled per wake-up of the receiving thread (a return of `wait_event` with
    /// events: it slept unless an event was already pending).
    pub msgs_per_wakeup: f64,
    /// CPU time of the receiving thread per message, µs (wake-ups, CQ polls, re-posts).
    pub receiver_cpu_us_per_msg: f64,
    /// Median delivery latency (post to the receiver handling the CQE), µs.
    pub delivery_median_us: f64,
    /// 99th percentile of the delivery latency, µs.
    pub delivery_p99_us: f64,
}

struct Sender {
    _vm: Vm,
    d: Driver,
    mr_sge: vrdma_abi::Sge,
    /// Where every message goes: the receiver's buffer and its key.
    raddr: u64,
    rkey: u32,
    cq: Cq,
    qps: Vec<Qp>,
}

struct Receiver {
    _vm: Vm,
    d: Driver,
    /// QP `i` receives into CQ `cqs[i]`.
    cqs: Vec<Cq>,
    qps: Vec<Qp>,
    /// CQ handle → QP index.
    index_of_cq: std::collections::HashMap<u32, usize>,
}

fn e(e: vrdma_guest::Error) -> String {
    e.to_string()
}

fn guest(fabric: &Arc<SoftFabric>, id: u32) -> Result<(Vm, Driver), String> {
    let vm = Vm::new(fabric, id);
    let d = vm.driver()?;
    Ok((vm, d))
}

fn set_up(size: u64, qps: u32, batch: u32) -> Result<(Arc<SoftFabric>, Sender, Receiver), String> {
    let fabric = SoftFabric::new();
    let sq_depth = crate::perf::BwRun::sq_depth(batch);
    let (vm_a, a) = guest(&fabric, 1)?;
    let pd_a = a.alloc_pd().map_err(e)?;
    let buf_a = a.alloc_buffer(size.max(64), Layout::Any).map_err(e)?;
    let mr_a = a.reg_mr(pd_a, &buf_a, ACCESS_ALL).map_err(e)?;
    let cq_a = a.create_cq((qps * sq_depth).clamp(256, 65536)).map_err(e)?;
    let (vm_b, b) = guest(&fabric, 2)?;
    let pd_b = b.alloc_pd().map_err(e)?;
    let buf_b = b.alloc_buffer(size.max(64), Layout::Any).map_err(e)?;
    let mr_b = b.reg_mr(pd_b, &buf_b, ACCESS_ALL).map_err(e)?;
    let (mut qa, mut qb, mut cqs) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..qps {
        qa.push(
            a.create_qp(
                pd_a,
                &QpInitAttr {
                    max_send_wr: sq_depth,
                    max_recv_wr: 1,
                    max_send_sge: 1,
                    max_recv_sge: 1,
                    max_inline: 0,
                    ..QpInitAttr::rc(&cq_a)
                },
            )
            .map_err(e)?,
        );
        let cq = b.create_cq(RQ_DEPTH).map_err(e)?;
        qb.push(
            b.create_qp(
                pd_b,
                &QpInitAttr {
                    max_send_wr: 1,
                    max_recv_wr: RQ_DEPTH,
                    max_send_sge: 1,
                    max_recv_sge: 1,
                    max_inline: 0,
                    ..QpInitAttr::rc(&cq)
                },
            )
            .map_err(e)?,
        );
        cqs.push(cq);
    }
    let (ga, gb) = (a.gid().map_err(e)?, b.gid().map_err(e)?);
    for (x, y) in qa.iter().zip(&qb) {
        a.connect_rc(x, y.qpn(), gb).map_err(e)?;
        b.connect_rc(y, x.qpn(), ga).map_err(e)?;
    }
    // Every message writes the same bytes of B's buffer; the receives take no data.
    let recvs: Vec<RecvWr> = (0..RQ_DEPTH as u64).map(|i| RecvWr::new(i, &[])).collect();
    for (qp, cq) in qb.iter_mut().zip(cqs.iter_mut()) {
        b.post_recv(qp, &recvs).map_err(e)?;
        b.req_notify_cq(cq, false).map_err(e)?;
    }
    let index_of_cq = cqs.iter().enumerate().map(|(i, c)| (c.cqn(), i)).collect();
    let sender = Sender {
        _vm: vm_a,
        mr_sge: mr_a.sge(0, size as u32),
        raddr: mr_b.iova,
        rkey: mr_b.rkey,
        d: a,
        cq: cq_a,
        qps: qa,
    };
    let receiver = Receiver {
        _vm: vm_b,
        d: b,
        cqs,
        qps: qb,
        index_of_cq,
    };
    Ok((fabric, sender, receiver))
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the call only writes it.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// What the receiving thread counted.
struct Received {
    wakeups: u64,
    /// When the first receive completion was handled.
    first: Option<Instant>,
    /// CPU time of the receiving thread.
    cpu: Duration,
    delivery_us: Vec<u32>,
    end: Instant,
}

/// The receiving thread: wake-ups until `msgs` receives were handled.
fn receive(
    mut r: Receiver,
    msgs: u64,
    start: Instant,
    credits: &[AtomicU64],
    stop: &AtomicBool,
) -> Result<Received, String> {
    let mut cqes = [Cqe::default(); 64];
    let mut got = 0u64;
    let mut wakeups = 0u64;
    let mut first_seen = None;
    let mut delivery_us = Vec::with_capacity(msgs as usize);
    let recvs: Vec<RecvWr> = (0..RQ_DEPTH as u64).map(|i| RecvWr::new(i, &[])).collect();
    let mut fired: Vec<usize> = Vec::new();
    let deadline = start + Duration::from_secs(120);
    let cpu0 = thread_cpu();
    while got < msgs {
        if stop.load(Ordering::Relaxed) {
            return Err("sender failed".into());
        }
        if Instant::now() > deadline {
            return Err(format!("timed out after {got} of {msgs} receives"));
        }
        let Some(first) = r.d.wait_event(Duration::from_millis(100)) else {
            continue;
        };
        wakeups += 1;
        fired.clear();
        let mut ev = Some(first);
        while let Some(x) = ev {
            if x.kind != abi::EV_CQ_COMP {
                return Err(format!(
                    "unexpected event {} on handle {}",
                    x.kind, x.handle
                ));
            }
            if let Some(&i) = r.index_of_cq.get(&x.handle) {
                fired.push(i);
            }
            ev = r.d.poll_event();
        }
        for &i in &fired {
            // Drain, re-post, re-arm; the device notifies at once for CQEs that arrived after
            // the drain and before the arm.
            let mut n = 0u32;
            loop {
                let k = r.d.poll_cq(&mut r.cqs[i], &mut cqes);
                if k == 0 {
                    break;
                }
                first_seen.get_or_insert_with(Instant::now);
                let now_us = start.elapsed().as_micros() as u32;
                for c in &cqes[..k] {
                    if c.status != WC_SUCCESS || c.opcode != abi::WC_OP_RECV_RDMA_WITH_IMM {
                        return Err(format!(
                            "receive completion status {} opcode {}",
                            c.status, c.opcode
                        ));
                    }
                    delivery_us.push(now_us.wrapping_sub(c.imm_data));
                }
                n += k as u32;
            }
            let mut left = n;
            while left > 0 {
                let k = left.min(RQ_DEPTH);
                r.d.post_recv(&mut r.qps[i], &recvs[..k as usize])
                    .map_err(e)?;
                left -= k;
            }
            credits[i].fetch_add(n as u64, Ordering::Release);
            got += n as u64;
            r.d.req_notify_cq(&mut r.cqs[i], false).map_err(e)?;
        }
    }
    Ok(Received {
        wakeups,
        first: first_seen,
        cpu: thread_cpu().saturating_sub(cpu0),
        delivery_us,
        end: Instant::now(),
    })
}

/// One run: `msgs` WRITE_WITH_IMMs of `size` bytes over `qps` QP pairs, `batch` per doorbell,
/// with the receiving device's interrupt moderated by `(max_events, usec)`, offered at
/// `offered_mpps` million messages per second (0: as fast as the receive queues allow).
pub fn write_bw_interrupt(
    size: u64,
    qps: u32,
    batch: u32,
    msgs: u64,
    moderation: (u32, u32),
    offered_mpps: f64,
) -> Result<IrqBwStats, String> {
    let qps = qps.clamp(1, MAX_QPS);
    let batch = batch.clamp(1, RQ_DEPTH / 2);
    if moderation.0 > 1 && moderation.1 == 0 {
        // ABI §12.3: the interrupt could wait forever for events that are not coming.
        return Err("moderation of more than one event needs a timer (usec > 0)".into());
    }
    let (_fabric, mut s, r) = set_up(size, qps, batch)?;
    r.d.set_intr_moderation(moderation.0, moderation.1)
        .map_err(e)?;
    let credits: Arc<Vec<AtomicU64>> = Arc::new((0..qps).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let receiver = {
        let (credits, stop) = (credits.clone(), stop.clone());
        thread::spawn(move || receive(r, msgs, start, &credits, &stop))
    };
    // Time per message at the offered rate.
    let pace = (offered_mpps > 0.0).then(|| Duration::from_secs_f64(1e-6 / offered_mpps));
    let sent = send(&mut s, msgs, batch, pace, start, &credits);
    if sent.is_err() {
        stop.store(true, Ordering::Relaxed);
    }
    let got = receiver
        .join()
        .map_err(|_| "receiver panicked".to_string())?;
    sent?;
    let mut got = got?;
    got.delivery_us.sort_unstable();
    let at = |q: f64| {
        let v = &got.delivery_us;
        v.get(((v.len() as f64 * q) as usize).min(v.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
    };
    let secs = (got.end - start).as_secs_f64();
    Ok(IrqBwStats {
        test: "write_bw",
        path: "device",
        completion: "interrupt",
        bytes: size,
        qps,
        batch,
        moderation_events: moderation.0,
        moderation_usec: moderation.1,
        offered_mpps,
        msgs,
        msg_rate_mpps: msgs as f64 / secs / 1e6,
        bw_gbps: (msgs * size) as f64 * 8.0 / secs / 1e9,
        first_completion_us: got.first.map_or(0.0, |t| (t - start).as_secs_f64() * 1e6),
        msgs_per_wakeup: msgs as f64 / got.wakeups.max(1) as f64,
        receiver_cpu_us_per_msg: got.cpu.as_secs_f64() * 1e6 / msgs.max(1) as f64,
        delivery_median_us: at(0.5),
        delivery_p99_us: at(0.99),
    })
}

/// The sending thread: batches round robin, each QP within its receive credit, the send CQ
/// busy-polled (each signaled CQE retires its batch).
fn send(
    s: &mut Sender,
    msgs: u64,
    batch: u32,
    pace: Option<Duration>,
    start: Instant,
    credits: &[AtomicU64],
) -> Result<(), String> {
    let qps = s.qps.len();
    let sq_depth = crate::perf::BwRun::sq_depth(batch);
    let mut posted = vec![0u64; qps];
    let mut in_sq = vec![0u32; qps];
    let mut total = 0u64;
    let mut cqes = [Cqe::default(); 64];
    let sge = [s.mr_sge];
    let mut wrs: Vec<SendWr> = Vec::with_capacity(batch as usize);
    let deadline = start + Duration::from_secs(120);
    let mut q = 0usize;
    let mut done = 0u64;
    while done < msgs {
        if total < msgs {
            let n = batch.min((msgs - total) as u32);
            let room_rq = posted[q] + n as u64
                <= credits[q].load(Ordering::Acquire) + (RQ_DEPTH - batch) as u64;
            // Paced: the next batch leaves at its time.
            let due = pace.is_none_or(|p| start.elapsed() >= p.mul_f64(total as f64));
            if due && room_rq && in_sq[q] + n <= sq_depth {
                let imm = start.elapsed().as_micros() as u32;
                wrs.clear();
                for k in 0..n {
                    let wr = SendWr::write_imm(q as u64, &sge, s.raddr, s.rkey, imm);
                    wrs.push(if k + 1 == n { wr } else { wr.unsignaled() });
                }
                s.d.post_send(&mut s.qps[q], &wrs).map_err(e)?;
                posted[q] += n as u64;
                in_sq[q] += n;
                total += n as u64;
            }
        }
        q = (q + 1) % qps;
        let k = s.d.poll_cq(&mut s.cq, &mut cqes);
        for c in &cqes[..k] {
            if c.status != WC_SUCCESS {
                return Err(format!("send completion status {}", c.status));
            }
            let i = c.wr_id as usize;
            let retired = batch.min(in_sq[i]);
            in_sq[i] -= retired;
            done += retired as u64;
        }
        if Instant::now() > deadline {
            return Err(format!("sender timed out after {done} of {msgs}"));
        }
    }
    Ok(())
}
