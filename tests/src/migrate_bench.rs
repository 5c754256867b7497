//! `vrdma-perf migrate`: live-migrates a guest with `qps` connected QPs and `mrs` extra memory
//! regions while its peer keeps sending, and counts what arrived.
//!
//! Guest A (the one migrated) and guest B (its peer) share `qps` RC QP pairs. B's thread posts
//! RDMA WRITE_WITH_IMM round robin over its QPs, the immediate carrying a per-QP sequence
//! number; A consumes the receive completions, checks each QP's sequence and reposts receives.
//! The main thread plays A's vCPU and its VMM: it runs A's receive loop, then migrates A with
//! pre-copy (memory and the device's MR table, two memory rounds while traffic flows, then stop,
//! final round, save, restore, resume),
//! rebinds A's driver to the destination and runs the loop again. At the end B stops and A
//! drains: every WR B posted must have arrived exactly once, in order.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;
use vrdma_abi::{Cqe, ACCESS_ALL, ACCESS_LOCAL_WRITE, WC_SUCCESS};
use vrdma_device::soft::SoftFabric;
use vrdma_guest::{Driver, Layout, QpInitAttr, RecvWr, SendWr};

use crate::Vm;

/// One line of `vrdma-perf migrate --json`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct MigrateStats {
    /// `migrate`.
    pub test: &'static str,
    /// Connected QPs of the migrated guest.
    pub qps: u32,
    /// Extra MRs registered by the migrated guest.
    pub mrs: u32,
    /// Size of the state saved at the stop (transport + device).
    pub state_bytes: usize,
    /// Size of the device state pre-copied while the guest ran (the MR table).
    pub precopy_state_bytes: usize,
    /// Time to save the pre-copy on the running source (its device lock is held meanwhile).
    pub precopy_save_us: u64,
    /// Time to load the pre-copy on the destination (while the source runs).
    pub precopy_load_us: u64,
    /// Time to save the state (device stopped).
    pub save_us: u64,
    /// Time to restore it into the new device.
    pub restore_us: u64,
    /// From the device's stop to the restored device running (includes the final memory
    /// round, save, restore and resume).
    pub downtime_us: u64,
    /// WRs the peer posted while the migrated device was stopped.
    pub ops_during: u64,
    /// WRs the peer posted that never arrived.
    pub ops_lost: u64,
    /// WRs that arrived more than once.
    pub ops_duplicated: u64,
    /// WRs that arrived out of order.
    pub ops_reordered: u64,
    /// Total WRs the peer posted.
    pub ops_total: u64,
    /// Dirty 4 KiB pages copied in the final (stopped) round.
    pub final_round_pages: u64,
}

const RECVS_PER_QP: u32 = 16;

/// Runs the benchmark.
pub fn migrate_bench(qps: u32, mrs: u32) -> Result<MigrateStats, String> {
    let e = |e: vrdma_guest::Error| e.to_string();
    let fabric = SoftFabric::new();
    let a_vm = Vm::new(&fabric, 1);
    let b_vm = Vm::new(&fabric, 2);
    let mut da = a_vm.driver()?;
    let db = b_vm.driver()?;
    let (pa, pb) = (da.alloc_pd().map_err(e)?, db.alloc_pd().map_err(e)?);
    let mut abuf = da.alloc_buffer(64 * qps as u64, Layout::Any).map_err(e)?;
    let amr = da.reg_mr(pa, &abuf, ACCESS_ALL).map_err(e)?;
    let bbuf = db.alloc_buffer(64, Layout::Any).map_err(e)?;
    let bmr = db.reg_mr(pb, &bbuf, ACCESS_ALL).map_err(e)?;
    // The extra MRs: all over one page (what matters is the table and the page lists).
    let mut spare = da.alloc_buffer(4096, Layout::Any).map_err(e)?;
    for _ in 0..mrs {
        da.reg_mr(pa, &spare, ACCESS_LOCAL_WRITE).map_err(e)?;
    }
    let depth = (qps * RECVS_PER_QP).next_power_of_two().clamp(256, 65536);
    let mut acq = da.create_cq(depth).map_err(e)?;
    let mut bcq = db.create_cq(depth).map_err(e)?;
    let attr = |cq: &vrdma_guest::Cq| QpInitAttr {
        max_send_wr: 32,
        max_recv_wr: RECVS_PER_QP * 2,
        max_send_sge: 1,
        max_recv_sge: 1,
        max_inline: 0,
        ..QpInitAttr::rc(cq)
    };
    let mut aq = Vec::new();
    let mut bq = Vec::new();
    for _ in 0..qps {
        aq.push(da.create_qp(pa, &attr(&acq)).map_err(e)?);
        bq.push(db.create_qp(pb, &attr(&bcq)).map_err(e)?);
    }
    let (ga, gb) = (da.gid().map_err(e)?, db.gid().map_err(e)?);
    let mut index = HashMap::new();
    for (i, (qa, qb)) in aq.iter_mut().zip(&bq).enumerate() {
        da.connect_rc(qa, qb.qpn(), gb).map_err(e)?;
        db.connect_rc(qb, qa.qpn(), ga).map_err(e)?;
        let recvs: Vec<RecvWr> = (0..RECVS_PER_QP)
            .map(|k| RecvWr::new(k as u64, &[]))
            .collect();
        da.post_recv(qa, &recvs).map_err(e)?;
        index.insert(qa.qpn(), i);
    }

    // The peer: posts until told to stop; returns how many it posted per QP.
    let stop = Arc::new(AtomicBool::new(false));
    let a_stopped = Arc::new(AtomicBool::new(false));
    let during = Arc::new(AtomicU64::new(0));
    let (raddr, rkey) = (amr.iova, amr.rkey);
    let peer = {
        let (stop, a_stopped, during) = (stop.clone(), a_stopped.clone(), during.clone());
        let sge = [bmr.sge(0, 8)];
        thread::spawn(move || -> Result<Vec<u64>, String> {
            let mut posted = vec![0u64; bq.len()];
            let mut inflight = vec![0u32; bq.len()];
            let mut cqes = vec![Cqe::default(); 256];
            let mut q = 0usize;
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::Acquire) {
                // Every 8th WR is signaled and retires the 8 before it.
                if inflight[q] + 8 <= 32 {
                    let mut wrs = Vec::with_capacity(8);
                    for k in 0..8u64 {
                        let seq = posted[q] + k;
                        let wr = SendWr::write_imm(
                            q as u64,
                            &sge,
                            raddr + 64 * q as u64,
                            rkey,
                            seq as u32,
                        );
                        wrs.push(if k == 7 { wr } else { wr.unsignaled() });
                    }
                    db.post_send(&mut bq[q], &wrs).map_err(|e| e.to_string())?;
                    posted[q] += 8;
                    inflight[q] += 8;
                    if a_stopped.load(Ordering::Acquire) {
                        during.fetch_add(8, Ordering::Relaxed);
                    }
                }
                q = (q + 1) % bq.len();
                let n = db.poll_cq(&mut bcq, &mut cqes);
                for c in &cqes[..n] {
                    if c.status != WC_SUCCESS {
                        return Err(format!("peer completion status {}", c.status));
                    }
                    inflight[c.wr_id as usize] -= 8;
                }
                if n == 0 {
                    thread::yield_now();
                }
                if Instant::now() > deadline {
                    return Err("peer timed out".into());
                }
            }
            Ok(posted)
        })
    };

    // A's receive loop: per-QP expected sequence numbers.
    let mut next = vec![0u64; qps as usize];
    let (mut dup, mut reord) = (0u64, 0u64);
    let mut cqes = vec![Cqe::default(); 256];
    let mut receive_for = |da: &mut Driver,
                           acq: &mut vrdma_guest::Cq,
                           aq: &mut [vrdma_guest::Qp],
                           until: &dyn Fn(&[u64]) -> bool,
                           deadline: Instant|
     -> Result<(), String> {
        while !until(&next) {
            let n = da.poll_cq(acq, &mut cqes);
            for c in &cqes[..n] {
                if c.status != WC_SUCCESS {
                    return Err(format!("receive completion status {}", c.status));
                }
                let Some(&i) = index.get(&c.qpn) else {
                    return Err(format!("completion for unknown QP {:#x}", c.qpn));
                };
                let seq = c.imm_data as u64;
                match seq.cmp(&next[i]) {
                    std::cmp::Ordering::Equal => next[i] += 1,
                    std::cmp::Ordering::Less => dup += 1,
                    std::cmp::Ordering::Greater => {
                        reord += 1;
                        next[i] = seq + 1;
                    }
                }
                da.post_recv(&mut aq[i], &[RecvWr::new(0, &[])])
                    .map_err(|e| e.to_string())?;
            }
            if Instant::now() > deadline {
                return Err("receiver timed out".into());
            }
        }
        Ok(())
    };
    let warm = Instant::now() + Duration::from_millis(200);
    let run_until = move |_: &[u64]| Instant::now() >= warm;
    receive_for(
        &mut da,
        &mut acq,
        &mut aq,
        &run_until,
        warm + Duration::from_secs(5),
    )?;

    // Migrate A: pre-copy while the peer keeps sending.
    let mut pre = a_vm.precopy();
    pre.round();
    pre.round();
    a_stopped.store(true, Ordering::Release);
    let final_pages = pre.stop_and_copy(&Default::default())?;
    let (a2, times) = pre.finish(&fabric)?;
    a_stopped.store(false, Ordering::Release);
    da.rebind(a2.port(), a2.mem.clone());
    abuf.rebind(a2.mem.clone());
    spare.rebind(a2.mem.clone());

    let after = Instant::now() + Duration::from_millis(200);
    let run_until = move |_: &[u64]| Instant::now() >= after;
    receive_for(
        &mut da,
        &mut acq,
        &mut aq,
        &run_until,
        after + Duration::from_secs(5),
    )?;
    stop.store(true, Ordering::Release);
    let posted = peer.join().map_err(|_| "peer panicked".to_string())??;
    let want = posted.clone();
    let done = move |n: &[u64]| n.iter().zip(&want).all(|(a, b)| a >= b);
    let drained = receive_for(
        &mut da,
        &mut acq,
        &mut aq,
        &done,
        Instant::now() + Duration::from_secs(10),
    );
    let lost: u64 = posted
        .iter()
        .zip(&next)
        .map(|(p, n)| p.saturating_sub(*n))
        .sum();
    if let Err(e) = drained {
        if lost == 0 {
            return Err(e);
        }
    }
    drop(a_vm);
    Ok(MigrateStats {
        test: "migrate",
        qps,
        mrs,
        state_bytes: times.state_bytes,
        precopy_state_bytes: times.precopy_state_bytes,
        precopy_save_us: times.precopy_save_us,
        precopy_load_us: times.precopy_load_us,
        save_us: times.save_us,
        restore_us: times.restore_us,
        downtime_us: times.downtime_us,
        ops_during: during.load(Ordering::Relaxed),
        ops_lost: lost,
        ops_duplicated: dup,
        ops_reordered: reord,
        ops_total: posted.iter().sum(),
        final_round_pages: final_pages,
    })
}
