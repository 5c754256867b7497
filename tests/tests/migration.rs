//! Live migration scenarios (docs/migration.md): guests with real traffic are migrated by the
//! harness's VMM steps ([`Vm::migrate`], [`Vm::precopy`]) — quiesce, stop, copy guest memory,
//! save the transport, restore it on the copy, resume — and the guest driver continues on the
//! destination ([`Driver::rebind`]). Every test builds its own fabric.
//!
//! Checks are exact: every work request completes exactly once and in order, data is compared
//! byte for byte (whole buffers against an image of what must be there), atomics ran exactly
//! once, and after the expected completions no further one arrives.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::*;
use vm_memory::GuestAddress;
use vrdma_abi as abi;
use vrdma_abi::{Cqe, Sge};
use vrdma_device::soft::SoftFabric;
use vrdma_device::{DeviceConfig, GuestMemoryMmap, MigrationError, MigrationState, PrecopyState};
use vrdma_glue::mmio::{TransportMigrationError, STATE_HEADER_LEN};
use vrdma_glue::MmioTransport;
use vrdma_guest::{
    pattern, pattern_byte, Driver, Layout, Mr, Qp, QpInitAttr, RcParams, RecvWr, SendWr,
};
use vrdma_tests::{
    differing_pages, memory_like, MigrateOptions, MigrateTimes, MmioPort, Vm, ALLOC_BASE,
};

const OK: u8 = abi::WC_SUCCESS;
/// Guest RAM of the migrated guests (each migration copies all of it).
const RAM: u64 = 16 << 20;

// ---------------------------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------------------------

fn guest(vm: &Vm, buf_len: u64) -> Guest {
    guest_with(
        vm,
        RAM,
        buf_len,
        1024,
        vrdma_guest::DriverOptions::default(),
    )
}

impl Guest {
    /// The guest continues on the destination VM.
    fn rebind_to(&mut self, vm: &Vm) {
        self.rebind(vm.port(), vm.mem.clone());
    }

    fn rebind(&mut self, port: MmioPort, mem: Arc<GuestMemoryMmap>) {
        self.d.rebind(port, mem.clone());
        self.buf.rebind(mem);
    }

    fn qp(&self) -> Qp {
        self.d
            .create_qp(
                self.pd,
                &QpInitAttr {
                    max_send_wr: 64,
                    max_recv_wr: 256,
                    ..QpInitAttr::rc(&self.cq)
                },
            )
            .unwrap()
    }

    fn params(&self, peer: &Guest, peer_qp: &Qp) -> RcParams {
        self.d.rc_params(peer_qp.qpn(), peer.d.gid().unwrap())
    }
}

fn connect(a: &Guest, qa: &Qp, b: &Guest, qb: &Qp) {
    a.d.connect_rc_with(qa, &a.params(b, qb)).unwrap();
    b.d.connect_rc_with(qb, &b.params(a, qa)).unwrap();
}

/// A fabric with two small guests (ids 1 and 2).
fn two_vms() -> (Arc<SoftFabric>, Vm, Vm) {
    let fabric = SoftFabric::new();
    let a = Vm::with_ram(&fabric, 1, RAM);
    let b = Vm::with_ram(&fabric, 2, RAM);
    (fabric, a, b)
}

/// Migrates `vm` (stop-and-copy) and moves the guest over; checks the state machine.
#[track_caller]
fn migrate(fabric: &Arc<SoftFabric>, vm: &mut Vm, g: &mut Guest) -> MigrateTimes {
    let (new, t) = vm.migrate(fabric).unwrap();
    assert_eq!(vm.device.migration_state(), MigrationState::MigratedAway);
    assert_eq!(new.device.migration_state(), MigrationState::Running);
    assert!(
        t.state_bytes > 0 && t.downtime_us >= t.save_us + t.restore_us,
        "{t:?}"
    );
    *vm = new;
    g.rebind_to(vm);
    t
}

fn keys(v: &[Cqe]) -> Vec<(u64, u8, u8)> {
    v.iter().map(key).collect()
}

// ---------------------------------------------------------------------------------------------
// Continuous mixed traffic between two guests, each played by its own thread
// ---------------------------------------------------------------------------------------------

/// Bytes per slot: every operation owns one slot in each area it touches.
const P: u64 = 64;
/// Most operations one side posts.
const MAX_OPS: u64 = 16384;
/// Operations per millisecond a side posts (token bucket: the traffic goes on at this pace
/// during migrations, so a stopped peer accumulates held requests).
const RATE_PER_MS: f64 = 2.0;
/// Token bucket depth.
const BURST: f64 = 8.0;
/// Receives kept posted ahead of the peer.
const RQ_KEEP: u64 = 128;
/// Most send WRs outstanding per side.
const WINDOW: u64 = 24;
/// Slots of the READ source area (static data).
const READ_SLOTS: u64 = 64;
const RECV_SLOTS: u64 = MAX_OPS + RQ_KEEP;
// The buffer of each side: areas of P-byte slots.
/// Own payloads, slot = own sequence number.
const SRC: u64 = 0;
/// The peer's WRITE / WRITE_WITH_IMM payloads land here, slot = the peer's sequence number.
const WDST: u64 = SRC + MAX_OPS * P;
/// Receive buffers, slot = receive WR id.
const RECV: u64 = WDST + MAX_OPS * P;
/// Static data the peer READs.
const RSRC: u64 = RECV + RECV_SLOTS * P;
/// READ results and atomic originals of own operations, slot = own sequence number.
const RDST: u64 = RSRC + READ_SLOTS * P;
/// The two counters the peer's FETCH_AND_ADD and CMP_AND_SWP work on.
const ATOM: u64 = RDST + MAX_OPS * P;
const BUF_LEN: u64 = (ATOM + 16).next_multiple_of(4096);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Write,
    WriteImm,
    Send,
    Read,
    FetchAdd,
    SendInline,
    CmpSwap,
}

fn kind(seq: u64) -> Kind {
    match seq % 7 {
        0 => Kind::Write,
        1 => Kind::WriteImm,
        2 => Kind::Send,
        3 => Kind::Read,
        4 => Kind::FetchAdd,
        5 => Kind::SendInline,
        _ => Kind::CmpSwap,
    }
}

/// Whether the operation consumes a receive at the peer.
fn is_message(k: Kind) -> bool {
    matches!(k, Kind::WriteImm | Kind::Send | Kind::SendInline)
}

/// Payload length of operation `seq` (16..=64 bytes).
fn len_of(seq: u64) -> u64 {
    16 + (seq * 13) % 49
}

/// The payload of `side`'s operation `seq`: its sequence number, side and kind, then a
/// pattern.
fn payload(side: u8, seq: u64) -> Vec<u8> {
    let seed = (u64::from(side) << 32) | seq;
    let mut v: Vec<u8> = (0..len_of(seq)).map(|i| pattern_byte(seed, i)).collect();
    v[..8].copy_from_slice(&seq.to_le_bytes());
    v[8] = side;
    v[9] = kind(seq) as u8;
    v
}

fn imm_of(side: u8, seq: u64) -> u32 {
    (seq as u32) ^ (u32::from(side) << 24)
}

/// The static READ source of `side`.
fn read_source(side: u8) -> Vec<u8> {
    pattern(0x5eed_0000 + u64::from(side), (READ_SLOTS * P) as usize)
}

/// Operations of `kind` among sequence numbers `0..seq`.
fn count_before(k: Kind, seq: u64) -> u64 {
    (0..seq).filter(|&s| kind(s) == k).count() as u64
}

fn wc_opcode(k: Kind) -> u8 {
    match k {
        Kind::Write | Kind::WriteImm => abi::WC_OP_RDMA_WRITE,
        Kind::Send | Kind::SendInline => abi::WC_OP_SEND,
        Kind::Read => abi::WC_OP_RDMA_READ,
        Kind::FetchAdd => abi::WC_OP_FETCH_ADD,
        Kind::CmpSwap => abi::WC_OP_COMP_SWAP,
    }
}

/// Where the peer's areas are.
#[derive(Clone, Copy)]
struct Peer {
    iova: u64,
    rkey: u32,
}

/// What a side's thread owns and records.
struct Side {
    id: u8,
    g: Guest,
    qp: Qp,
    peer: Peer,
    posted: u64,
    recv_posted: u64,
    send_cqes: Vec<Cqe>,
    recv_cqes: Vec<Cqe>,
}

type Rebind = Option<(MmioPort, Arc<GuestMemoryMmap>)>;

/// Control of a side's thread.
#[derive(Default)]
struct Ctl {
    /// Park at the next loop iteration ("pause the vCPU").
    pause: AtomicBool,
    /// Post nothing more.
    stop_posting: AtomicBool,
    /// Operations posted.
    posted: AtomicU64,
    /// Send completions polled.
    completed: AtomicU64,
    /// Return.
    finish: AtomicBool,
}

impl Side {
    fn post_batch(&mut self, n: u64) {
        let (mr, peer) = (self.g.mr, self.peer);
        let seqs: Vec<u64> = (self.posted..self.posted + n).collect();
        let payloads: Vec<Vec<u8>> = seqs.iter().map(|&s| payload(self.id, s)).collect();
        let sges: Vec<[Sge; 1]> = seqs
            .iter()
            .zip(&payloads)
            .map(|(&s, p)| match kind(s) {
                Kind::Read => [mr.sge(RDST + s * P, len_of(s) as u32)],
                Kind::FetchAdd | Kind::CmpSwap => [mr.sge(RDST + s * P, 8)],
                _ => {
                    self.g.buf.write(SRC + s * P, p);
                    [mr.sge(SRC + s * P, len_of(s) as u32)]
                }
            })
            .collect();
        let wrs: Vec<SendWr> = seqs
            .iter()
            .enumerate()
            .map(|(i, &s)| {
                let (sge, raddr) = (&sges[i][..], peer.iova);
                match kind(s) {
                    Kind::Write => SendWr::write(s, sge, raddr + WDST + s * P, peer.rkey),
                    Kind::WriteImm => SendWr::write_imm(
                        s,
                        sge,
                        raddr + WDST + s * P,
                        peer.rkey,
                        imm_of(self.id, s),
                    ),
                    Kind::Send => SendWr::send(s, sge),
                    Kind::SendInline => SendWr::send_inline(s, &payloads[i]),
                    Kind::Read => {
                        SendWr::read(s, sge, raddr + RSRC + (s % READ_SLOTS) * P, peer.rkey)
                    }
                    Kind::FetchAdd => SendWr::fetch_add(s, sge, raddr + ATOM, peer.rkey, 1),
                    Kind::CmpSwap => {
                        // The k-th compare-and-swap expects k: exactly-once execution.
                        let k = count_before(Kind::CmpSwap, s);
                        SendWr::cmp_swap(s, sge, raddr + ATOM + 8, peer.rkey, k, k + 1)
                    }
                }
            })
            .collect();
        self.g.d.post_send(&mut self.qp, &wrs).unwrap();
        self.posted += n;
    }

    fn top_up_recvs(&mut self) {
        let want = (self.recv_cqes.len() as u64 + RQ_KEEP).min(RECV_SLOTS);
        while self.recv_posted < want {
            let n = (want - self.recv_posted).min(16);
            let ids: Vec<u64> = (self.recv_posted..self.recv_posted + n).collect();
            let sges: Vec<[Sge; 1]> = ids
                .iter()
                .map(|&r| [self.g.mr.sge(RECV + r * P, P as u32)])
                .collect();
            let wrs: Vec<RecvWr> = ids
                .iter()
                .zip(&sges)
                .map(|(&r, s)| RecvWr::new(r, s))
                .collect();
            self.g.d.post_recv(&mut self.qp, &wrs).unwrap();
            self.recv_posted += n;
        }
    }

    fn poll(&mut self) -> usize {
        let mut out = [Cqe::default(); 64];
        let n = self.g.d.poll_cq(&mut self.g.cq, &mut out);
        for c in &out[..n] {
            if c.opcode < abi::WC_OP_RECV {
                self.send_cqes.push(*c);
            } else {
                self.recv_cqes.push(*c);
            }
        }
        n
    }

    /// The guest's "program": keep receives posted, post operations within the window and the
    /// budget, poll; park when asked to (and continue wherever the VM now lives).
    fn run(mut self, ctl: Arc<Ctl>, parked: Sender<()>, resume: Receiver<Rebind>) -> Side {
        let deadline = Instant::now() + Duration::from_secs(120);
        let (mut tokens, mut last) = (BURST, Instant::now());
        loop {
            assert!(Instant::now() < deadline, "side {} ran too long", self.id);
            if ctl.pause.load(Ordering::Acquire) {
                parked.send(()).unwrap();
                if let Some((port, mem)) = resume.recv().unwrap() {
                    self.g.rebind(port, mem);
                }
                continue;
            }
            self.top_up_recvs();
            let now = Instant::now();
            tokens =
                (tokens + now.duration_since(last).as_secs_f64() * 1e3 * RATE_PER_MS).min(BURST);
            last = now;
            let outstanding = self.posted - self.send_cqes.len() as u64;
            if !ctl.stop_posting.load(Ordering::Acquire)
                && self.posted < MAX_OPS
                && outstanding < WINDOW
                && tokens >= 1.0
            {
                let n = (MAX_OPS - self.posted)
                    .min(WINDOW - outstanding)
                    .min(tokens as u64)
                    .min(4);
                tokens -= n as f64;
                self.post_batch(n);
                ctl.posted.store(self.posted, Ordering::Release);
            }
            let n = self.poll();
            ctl.completed
                .store(self.send_cqes.len() as u64, Ordering::Release);
            if ctl.finish.load(Ordering::Acquire) {
                return self;
            }
            if n == 0 {
                thread::sleep(Duration::from_micros(30));
            }
        }
    }
}

/// Two guests with continuous mixed traffic in both directions, each in its own thread, and a
/// VMM (the test thread) that migrates them.
struct Traffic {
    fabric: Arc<SoftFabric>,
    vms: [Vm; 2],
    ctl: [Arc<Ctl>; 2],
    parked: [Receiver<()>; 2],
    resume: [Sender<Rebind>; 2],
    threads: [Option<JoinHandle<Side>>; 2],
    times: Vec<MigrateTimes>,
}

impl Traffic {
    fn start() -> Self {
        let (fabric, va, vb) = two_vms();
        let (ga, gb) = (guest(&va, BUF_LEN), guest(&vb, BUF_LEN));
        let (qa, qb) = (ga.qp(), gb.qp());
        connect(&ga, &qa, &gb, &qb);
        ga.buf.write(RSRC, &read_source(0));
        gb.buf.write(RSRC, &read_source(1));
        let peer = |g: &Guest| Peer {
            iova: g.mr.iova,
            rkey: g.mr.rkey,
        };
        let (pa, pb) = (peer(&gb), peer(&ga));
        let sides = [(0u8, ga, qa, pa), (1u8, gb, qb, pb)];
        let mut ctl = Vec::new();
        let mut parked = Vec::new();
        let mut resume = Vec::new();
        let mut threads = Vec::new();
        for (id, g, qp, peer) in sides {
            let c = Arc::new(Ctl::default());
            let (ptx, prx) = channel();
            let (rtx, rrx) = channel();
            let side = Side {
                id,
                g,
                qp,
                peer,
                posted: 0,
                recv_posted: 0,
                send_cqes: Vec::new(),
                recv_cqes: Vec::new(),
            };
            let c2 = c.clone();
            threads.push(Some(
                thread::Builder::new()
                    .name(format!("guest-{id}"))
                    .spawn(move || side.run(c2, ptx, rrx))
                    .unwrap(),
            ));
            ctl.push(c);
            parked.push(prx);
            resume.push(rtx);
        }
        Traffic {
            fabric,
            vms: [va, vb],
            ctl: arr(ctl),
            parked: arr(parked),
            resume: arr(resume),
            threads: arr(threads),
            times: Vec::new(),
        }
    }

    fn posted(&self, side: usize) -> u64 {
        self.ctl[side].posted.load(Ordering::Acquire)
    }

    /// Waits until each side posted `n` more operations (the guests run meanwhile).
    fn advance(&self, n: u64) {
        let start = [self.posted(0), self.posted(1)];
        for (side, start) in start.into_iter().enumerate() {
            let target = (start + n).min(MAX_OPS);
            assert!(
                wait_until(LONG, || self.posted(side) >= target),
                "side {side} stuck at {} (< {target})",
                self.posted(side)
            );
        }
    }

    /// Pauses the side's vCPU: its thread parks between two driver calls.
    fn park(&self, side: usize) {
        self.ctl[side].pause.store(true, Ordering::Release);
        if self.parked[side].recv_timeout(LONG).is_err() {
            panic!("side {side} did not park (see its thread's panic above)");
        }
    }

    /// Resumes the side's vCPU, on its (possibly new) VM.
    fn resume(&self, side: usize, rebind: bool) {
        self.ctl[side].pause.store(false, Ordering::Release);
        let msg = rebind.then(|| (self.vms[side].port(), self.vms[side].mem.clone()));
        self.resume[side].send(msg).unwrap();
    }

    /// Stop-and-copy migration of one side.
    fn migrate(&mut self, side: usize, opts: &MigrateOptions) {
        self.park(side);
        let (new, t) = self.vms[side].migrate_with(&self.fabric, opts).unwrap();
        assert_eq!(
            self.vms[side].device.migration_state(),
            MigrationState::MigratedAway
        );
        self.vms[side] = new;
        self.times.push(t);
        self.resume(side, true);
    }

    /// Pre-copy migration of one side with `rounds` rounds while both guests run; checks that
    /// the final image equals the source memory byte for byte.
    fn migrate_precopy(&mut self, side: usize, rounds: usize) -> u64 {
        let fabric = self.fabric.clone();
        let mut pre = self.vms[side].precopy();
        let mut dirty = 0;
        for _ in 0..rounds {
            thread::sleep(Duration::from_millis(2));
            dirty += pre.round();
        }
        self.park(side);
        pre.stop_and_copy(&MigrateOptions::default()).unwrap();
        let diff = differing_pages(&self.vms[side].mem, pre.dst_mem());
        assert!(diff.is_empty(), "final image differs at {diff:x?}");
        let (new, t) = pre.finish(&fabric).unwrap();
        self.vms[side] = new;
        self.times.push(t);
        self.resume(side, true);
        dirty
    }

    /// Both sides at once: `first` stops (its peer keeps running and sends to it), then the
    /// other; both final images are checked; the destinations resume in `first_resumes_first`
    /// order.
    fn migrate_both(&mut self, first: usize, first_resumes_first: bool) {
        let second = 1 - first;
        let fabric = self.fabric.clone();
        let [v0, v1] = &self.vms;
        let (vf, vs) = if first == 0 { (v0, v1) } else { (v1, v0) };
        let mut pf = vf.precopy();
        pf.round();
        self.park(first);
        pf.stop_and_copy(&MigrateOptions::default()).unwrap();
        // The second guest keeps posting to the stopped one: its requests are held.
        let p0 = self.posted(second);
        wait_until(Duration::from_millis(50), || self.posted(second) >= p0 + 8);
        let mut ps = vs.precopy();
        ps.round();
        self.park(second);
        ps.stop_and_copy(&MigrateOptions::default()).unwrap();
        for (vm, pre) in [(vf, &pf), (vs, &ps)] {
            let diff = differing_pages(&vm.mem, pre.dst_mem());
            assert!(diff.is_empty(), "final image differs at {diff:x?}");
        }
        let (rf, rs) = if first_resumes_first {
            let rf = pf.finish(&fabric).unwrap();
            (rf, ps.finish(&fabric).unwrap())
        } else {
            let rs = ps.finish(&fabric).unwrap();
            (pf.finish(&fabric).unwrap(), rs)
        };
        for vm in [vf, vs] {
            assert_eq!(vm.device.migration_state(), MigrationState::MigratedAway);
        }
        self.vms[first] = rf.0;
        self.vms[second] = rs.0;
        self.times.extend([rf.1, rs.1]);
        self.resume(first, true);
        self.resume(second, true);
    }

    /// Stops posting, waits until everything completed, collects both sides and their last
    /// completions, and checks everything.
    fn finish_and_verify(mut self) -> ([Side; 2], Vec<MigrateTimes>) {
        for c in &self.ctl {
            c.stop_posting.store(true, Ordering::Release);
        }
        for side in 0..2 {
            let c = &self.ctl[side];
            // `posted` is final once the thread saw `stop_posting`: wait for it to settle.
            let done = wait_until(Duration::from_secs(10), || {
                let p = c.posted.load(Ordering::Acquire);
                c.completed.load(Ordering::Acquire) == p && {
                    thread::sleep(Duration::from_millis(2));
                    c.posted.load(Ordering::Acquire) == p
                        && c.completed.load(Ordering::Acquire) == p
                }
            });
            assert!(
                done,
                "side {side}: posted {}, completed {}",
                c.posted.load(Ordering::Acquire),
                c.completed.load(Ordering::Acquire)
            );
        }
        let mut sides = Vec::new();
        for side in 0..2 {
            self.ctl[side].finish.store(true, Ordering::Release);
            let t = self.threads[side].take().unwrap();
            sides.push(t.join().unwrap_or_else(|e| std::panic::resume_unwind(e)));
        }
        let mut sides = arr(sides);
        // Every receive CQE is in the CQ by now (the sender saw its ACK); poll the rest.
        for x in 0..2 {
            let want = (0..sides[1 - x].posted)
                .filter(|&s| is_message(kind(s)))
                .count();
            let s = &mut sides[x];
            let deadline = Instant::now() + LONG;
            while s.recv_cqes.len() < want && Instant::now() < deadline {
                if s.poll() == 0 {
                    thread::sleep(Duration::from_micros(100));
                }
            }
            let extra = s.g.d.poll_cq_until(&mut s.g.cq, 1, QUIET);
            assert!(extra.is_empty(), "side {x}: extra CQE {extra:?}");
        }
        verify(&sides);
        for s in &sides {
            assert_eq!(s.g.d.qp_state(&s.qp).unwrap(), abi::QPS_RTS);
            let ev = events_until_quiet(&s.g.d, QUIET);
            assert!(ev.is_empty(), "side {}: events {ev:?}", s.id);
        }
        (sides, std::mem::take(&mut self.times))
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        // On a failed assertion: let the threads end (they return when finished).
        for (c, tx) in self.ctl.iter().zip(&self.resume) {
            c.finish.store(true, Ordering::Release);
            c.pause.store(false, Ordering::Release);
            let _ = tx.send(None);
        }
    }
}

/// Checks completions (exact count, order, status, opcode, length, immediate) and both buffers
/// byte for byte against the image they must hold.
fn verify(sides: &[Side; 2]) {
    for x in 0..2 {
        let (me, peer) = (&sides[x], &sides[1 - x]);
        // My send completions: one per operation, in posting order.
        assert_eq!(me.send_cqes.len() as u64, me.posted, "side {x} send CQEs");
        for (i, c) in me.send_cqes.iter().enumerate() {
            let s = i as u64;
            let k = kind(s);
            let byte_len = match k {
                Kind::Read => len_of(s) as u32,
                Kind::FetchAdd | Kind::CmpSwap => 8,
                _ => 0,
            };
            assert_eq!(
                (c.wr_id, c.status, c.opcode, c.byte_len, c.qpn),
                (s, OK, wc_opcode(k), byte_len, me.qp.qpn()),
                "side {x} send CQE #{i}: {c:?}"
            );
        }
        // My receive completions: one per message of the peer, in the peer's order.
        let msgs: Vec<u64> = (0..peer.posted).filter(|&s| is_message(kind(s))).collect();
        assert_eq!(me.recv_cqes.len(), msgs.len(), "side {x} receive CQEs");
        for (r, (c, &s)) in me.recv_cqes.iter().zip(&msgs).enumerate() {
            let (opcode, flags, imm) = if kind(s) == Kind::WriteImm {
                (
                    abi::WC_OP_RECV_RDMA_WITH_IMM,
                    abi::WC_F_WITH_IMM,
                    imm_of(peer.id, s),
                )
            } else {
                (abi::WC_OP_RECV, 0, 0)
            };
            assert_eq!(
                (c.wr_id, c.status, c.opcode, c.byte_len, c.wc_flags, c.qpn),
                (r as u64, OK, opcode, len_of(s) as u32, flags, me.qp.qpn()),
                "side {x} receive CQE #{r} (peer op {s}): {c:?}"
            );
            if flags != 0 {
                assert_eq!(c.imm_data, imm, "side {x} receive #{r}");
            }
        }
        // My buffer, byte for byte.
        let mut img = vec![0u8; BUF_LEN as usize];
        let put = |img: &mut Vec<u8>, at: u64, b: &[u8]| {
            img[at as usize..at as usize + b.len()].copy_from_slice(b);
        };
        let peer_read_src = read_source(peer.id);
        for s in 0..me.posted {
            match kind(s) {
                Kind::Read => {
                    let o = ((s % READ_SLOTS) * P) as usize;
                    put(
                        &mut img,
                        RDST + s * P,
                        &peer_read_src[o..o + len_of(s) as usize],
                    );
                }
                k @ (Kind::FetchAdd | Kind::CmpSwap) => {
                    // The original value: the number of such operations before this one.
                    put(&mut img, RDST + s * P, &count_before(k, s).to_le_bytes());
                }
                _ => put(&mut img, SRC + s * P, &payload(me.id, s)),
            }
        }
        for s in 0..peer.posted {
            if matches!(kind(s), Kind::Write | Kind::WriteImm) {
                put(&mut img, WDST + s * P, &payload(peer.id, s));
            }
        }
        for (r, &s) in msgs.iter().enumerate() {
            if kind(s) != Kind::WriteImm {
                put(&mut img, RECV + r as u64 * P, &payload(peer.id, s));
            }
        }
        put(&mut img, RSRC, &read_source(me.id));
        put(
            &mut img,
            ATOM,
            &count_before(Kind::FetchAdd, peer.posted).to_le_bytes(),
        );
        put(
            &mut img,
            ATOM + 8,
            &count_before(Kind::CmpSwap, peer.posted).to_le_bytes(),
        );
        let got = me.g.buf.to_vec();
        if got != img {
            let at = got.iter().zip(&img).position(|(a, b)| a != b).unwrap() as u64;
            let area = [
                ("SRC", SRC),
                ("WDST", WDST),
                ("RECV", RECV),
                ("RSRC", RSRC),
                ("RDST", RDST),
                ("ATOM", ATOM),
            ]
            .into_iter()
            .rev()
            .find(|(_, base)| at >= *base)
            .unwrap();
            panic!(
                "side {x}: buffer differs first at {at:#x} ({} slot {}): got {:02x?}, want {:02x?}",
                area.0,
                (at - area.1) / P,
                &got[at as usize..(at as usize + 16).min(got.len())],
                &img[at as usize..(at as usize + 16).min(img.len())]
            );
        }
    }
}

fn arr<T>(v: Vec<T>) -> [T; 2] {
    v.try_into().map_err(|_| ()).unwrap()
}

fn report(what: &str, times: &[MigrateTimes]) {
    let n = times.len().max(1) as u64;
    let max_down = times.iter().map(|t| t.downtime_us).max().unwrap_or(0);
    let avg = |f: fn(&MigrateTimes) -> u64| times.iter().map(f).sum::<u64>() / n;
    eprintln!(
        "{what}: {} migrations, downtime avg {} us max {max_down} us, save avg {} us, restore avg {} us, state avg {} bytes, in flight at stop max {}",
        times.len(),
        avg(|t| t.downtime_us),
        avg(|t| t.save_us),
        avg(|t| t.restore_us),
        avg(|t| t.state_bytes as u64),
        times.iter().map(|t| t.outstanding_at_stop).max().unwrap_or(0),
    );
}

/// Migrations of one side under continuous traffic.
const ONE_SIDE_MIGRATIONS: usize = 100;
/// Migrations of both sides at once.
const BOTH_SIDES_MIGRATIONS: usize = 8;
/// Operations each side posts between two migrations (at least).
const STEP: u64 = 16;

#[test]
fn continuous_mixed_traffic_survives_repeated_migrations() {
    let mut t = Traffic::start();
    t.advance(STEP);
    for i in 0..ONE_SIDE_MIGRATIONS {
        t.advance(STEP);
        match i % 3 {
            0 => t.migrate(0, &MigrateOptions::default()),
            1 => {
                // Quiesce while the guest runs: what it posts now stays in the SQ ring and runs
                // on the destination.
                t.vms[0].device.quiesce().unwrap();
                let p0 = t.posted(0);
                wait_until(Duration::from_millis(20), || t.posted(0) >= p0 + 4);
                t.migrate(0, &MigrateOptions::default());
            }
            _ => t.migrate(
                0,
                &MigrateOptions {
                    quiesce_wait: Duration::from_millis(2),
                },
            ),
        }
    }
    for j in 0..BOTH_SIDES_MIGRATIONS {
        t.advance(STEP);
        t.migrate_both(j % 2, j % 4 < 2);
    }
    t.advance(STEP);
    let (sides, times) = t.finish_and_verify();
    assert_eq!(times.len(), ONE_SIDE_MIGRATIONS + 2 * BOTH_SIDES_MIGRATIONS);
    // The traffic never ran dry, and some migrations saved operations in flight (the second
    // of two stopped guests had requests held by the first).
    assert!(sides.iter().all(|s| s.posted < MAX_OPS));
    assert!(times.iter().any(|t| t.outstanding_at_stop > 0), "{times:?}");
    report("continuous traffic", &times);
    eprintln!(
        "operations: side 0 {} (+{} receives), side 1 {} (+{} receives)",
        sides[0].posted,
        sides[0].recv_cqes.len(),
        sides[1].posted,
        sides[1].recv_cqes.len()
    );
}

#[test]
fn precopy_under_traffic_final_image_is_exact() {
    let mut t = Traffic::start();
    t.advance(STEP);
    let mut dirty = Vec::new();
    for i in 0..6 {
        t.advance(STEP);
        dirty.push(t.migrate_precopy(i % 2, 3));
    }
    t.advance(STEP);
    let (_sides, times) = t.finish_and_verify();
    report("pre-copy", &times);
    eprintln!("pages dirtied during the running rounds: {dirty:?}");
    // The guests kept running during the rounds: they dirtied pages.
    assert!(dirty.iter().any(|&d| d > 0), "{dirty:?}");
    assert!(times
        .iter()
        .all(|t| t.rounds == 3 && t.precopy_bytes >= RAM));
}

// ---------------------------------------------------------------------------------------------
// Dirty tracking of the doorbell area
// ---------------------------------------------------------------------------------------------

/// The device clears doorbell bits it consumes (ABI §8.3). That is a write into guest memory,
/// so the final pre-copy round must carry it: otherwise the destination keeps a doorbell bit the
/// source had already consumed, its image differs from the source's, and the guest's next
/// doorbell on that QP finds the bit set, takes it for a pending doorbell and does not notify —
/// the WQE would never run. `check_image`: compare the images (else only the liveness).
fn consumed_doorbell_then_precopy(check_image: bool) {
    let (fabric, mut va, vb) = two_vms();
    let (mut a, b) = (guest(&va, 64 << 10), guest(&vb, 64 << 10));
    let (mut qa, qb) = (a.qp(), b.qp());
    connect(&a, &qa, &b, &qb);
    a.buf.fill_pattern(3);
    let mut pre = va.precopy();
    // The guest rings the doorbell (the bit is logged as dirty)...
    let sge = [a.mr.sge(0, 512)];
    a.d.post_send(&mut qa, &[SendWr::write(1, &sge, b.mr.addr(0), b.mr.rkey)])
        .unwrap();
    // ...a round copies the page while the bit is still set...
    let (db_gpa, _) = a.d.doorbell_area();
    a.d.set_doorbell_bit(abi::DB_SQ_BITMAP_OFFSET, abi::handle_index(qa.qpn()))
        .unwrap();
    assert!(pre.round() > 0);
    // ...then the device consumes it (clears the bit).
    a.d.notify_queue(abi::EVENTQ);
    assert_eq!(
        keys(&poll_exact(&a.d, &mut a.cq, 1)),
        [(1, OK, abi::WC_OP_RDMA_WRITE)]
    );
    pre.stop_and_copy(&MigrateOptions::default()).unwrap();
    let diff = differing_pages(&va.mem, pre.dst_mem());
    if check_image {
        assert!(
            diff.is_empty(),
            "final image differs at {diff:x?} (doorbell area at {:#x})",
            db_gpa.0
        );
    }
    let (new, _) = pre.finish(&fabric).unwrap();
    va = new;
    a.rebind_to(&va);
    // The next WQE on the same QP runs.
    a.d.post_send(
        &mut qa,
        &[SendWr::write(2, &sge, b.mr.addr(4096), b.mr.rkey)],
    )
    .unwrap();
    assert_eq!(
        keys(&poll_exact(&a.d, &mut a.cq, 1)),
        [(2, OK, abi::WC_OP_RDMA_WRITE)]
    );
    assert_eq!(b.buf.read_vec(4096, 512), a.buf.read_vec(0, 512));
}

#[test]
fn consumed_doorbells_are_in_the_final_image() {
    consumed_doorbell_then_precopy(true);
}

#[test]
fn no_doorbell_is_lost_after_a_precopy_migration() {
    consumed_doorbell_then_precopy(false);
}

// ---------------------------------------------------------------------------------------------
// QPs between states, RNR-pending work
// ---------------------------------------------------------------------------------------------

/// QPs are migrated in INIT and RTR (and one in RESET), with a receive posted in INIT and a
/// SEND posted in INIT that must wait for RTS; the transitions finish on the destinations and
/// traffic flows.
#[test]
fn migrate_mid_qp_transition() {
    let (fabric, mut va, mut vb) = two_vms();
    let (mut a, mut b) = (guest(&va, 64 << 10), guest(&vb, 64 << 10));
    let (mut qa, mut qb) = (a.qp(), b.qp());
    let qr = a.qp(); // stays in RESET until after the migrations
    let (pa, pb) = (a.params(&b, &qb), b.params(&a, &qa));
    let modify = |d: &Driver, qp: &Qp, (attr, mask): (abi::QpAttr, u32)| {
        d.modify_qp(qp, &attr, mask).unwrap()
    };
    modify(&a.d, &qa, pa.init_attr());
    modify(&b.d, &qb, pb.init_attr());
    modify(&b.d, &qb, pb.rtr_attr());
    a.buf.fill_pattern(1);
    b.buf.fill_pattern(2);
    b.d.post_recv(&mut qb, &[RecvWr::new(10, &[b.mr.sge(0, 4096)])])
        .unwrap();
    a.d.post_recv(&mut qa, &[RecvWr::new(20, &[a.mr.sge(0, 4096)])])
        .unwrap();
    // Posted in INIT: it waits for RTS.
    a.d.post_send(&mut qa, &[SendWr::send(1, &[a.mr.sge(8192, 1000)])])
        .unwrap();
    assert_cq_empty(&a.d, &mut a.cq, QUIET);
    let (attr_a, attr_b, attr_r) = (
        a.d.query_qp(&qa).unwrap(),
        b.d.query_qp(&qb).unwrap(),
        a.d.query_qp(&qr).unwrap(),
    );
    assert_eq!(
        (attr_a.qp_state, attr_b.qp_state, attr_r.qp_state),
        (abi::QPS_INIT, abi::QPS_RTR, abi::QPS_RESET)
    );

    migrate(&fabric, &mut va, &mut a);
    migrate(&fabric, &mut vb, &mut b);
    assert_eq!(a.d.query_qp(&qa).unwrap(), attr_a);
    assert_eq!(b.d.query_qp(&qb).unwrap(), attr_b);
    assert_eq!(a.d.query_qp(&qr).unwrap(), attr_r);
    assert_cq_empty(&a.d, &mut a.cq, QUIET);

    // INIT → RTR on the destination, migrate again in RTR, then RTS.
    modify(&a.d, &qa, pa.rtr_attr());
    let attr_a = a.d.query_qp(&qa).unwrap();
    migrate(&fabric, &mut va, &mut a);
    assert_eq!(a.d.query_qp(&qa).unwrap(), attr_a);
    assert_cq_empty(&a.d, &mut a.cq, QUIET);
    modify(&b.d, &qb, pb.rts_attr());
    modify(&a.d, &qa, pa.rts_attr());
    // The SEND posted in INIT before two migrations runs now, exactly once.
    assert_eq!(
        keys(&poll_exact(&a.d, &mut a.cq, 1)),
        [(1, OK, abi::WC_OP_SEND)]
    );
    let rc = poll_exact(&b.d, &mut b.cq, 1);
    assert_eq!(
        (rc[0].wr_id, rc[0].status, rc[0].opcode, rc[0].byte_len),
        (10, OK, abi::WC_OP_RECV, 1000)
    );
    assert_eq!(b.buf.read_vec(0, 1000), a.buf.read_vec(8192, 1000));
    // And the other way, into the receive posted in INIT; then WRITE, READ, atomics.
    b.d.post_send(
        &mut qb,
        &[
            SendWr::send_imm(5, &[b.mr.sge(2000, 300)], 0xabcd),
            SendWr::write(6, &[b.mr.sge(4096, 2048)], a.mr.addr(16384), a.mr.rkey),
            SendWr::read(7, &[b.mr.sge(20000, 512)], a.mr.addr(30000), a.mr.rkey),
            SendWr::fetch_add(8, &[b.mr.sge(40000, 8)], a.mr.addr(48000), a.mr.rkey, 5),
        ],
    )
    .unwrap();
    let sc = poll_exact(&b.d, &mut b.cq, 4);
    assert_eq!(
        keys(&sc),
        [
            (5, OK, abi::WC_OP_SEND),
            (6, OK, abi::WC_OP_RDMA_WRITE),
            (7, OK, abi::WC_OP_RDMA_READ),
            (8, OK, abi::WC_OP_FETCH_ADD)
        ]
    );
    let rc = poll_exact(&a.d, &mut a.cq, 1);
    assert_eq!(
        (rc[0].wr_id, rc[0].opcode, rc[0].byte_len, rc[0].imm_data),
        (20, abi::WC_OP_RECV, 300, 0xabcd)
    );
    let (ab, bb) = (pattern(1, 64 << 10), pattern(2, 64 << 10));
    assert_eq!(a.buf.read_vec(0, 300), bb[2000..2300]);
    assert_eq!(a.buf.read_vec(16384, 2048), bb[4096..6144]);
    assert_eq!(b.buf.read_vec(20000, 512), ab[30000..30512]);
    let orig = u64::from_le_bytes(ab[48000..48008].try_into().unwrap());
    assert_eq!(b.buf.read_u64(40000), orig);
    assert_eq!(a.buf.read_u64(48000), orig.wrapping_add(5));

    // The QP that stayed in RESET is connected on the destination and works.
    let mut qr = qr;
    let mut q2 = b.qp();
    connect(&a, &qr, &b, &q2);
    b.d.post_recv(&mut q2, &[RecvWr::new(30, &[b.mr.sge(50000, 64)])])
        .unwrap();
    a.d.post_send(&mut qr, &[SendWr::send_inline(9, b"after the migration")])
        .unwrap();
    assert_eq!(
        keys(&poll_exact(&a.d, &mut a.cq, 1)),
        [(9, OK, abi::WC_OP_SEND)]
    );
    assert_eq!(
        keys(&poll_exact(&b.d, &mut b.cq, 1)),
        [(30, OK, abi::WC_OP_RECV)]
    );
    assert_eq!(b.buf.read_vec(50000, 19), b"after the migration");
}

/// A SEND bounces off RNR NAKs (no receive at the peer) with a WRITE_WITH_IMM and a WRITE
/// queued behind it; one side is migrated while the requester waits; then the receives are
/// posted on the (possibly new) peer: everything completes exactly once, in order.
fn rnr_pending(migrate_sender: bool, migrate_receiver: bool) {
    let (fabric, mut va, mut vb) = two_vms();
    let (mut a, mut b) = (guest(&va, 64 << 10), guest(&vb, 64 << 10));
    let (mut qa, mut qb) = (a.qp(), b.qp());
    let mut pa = a.params(&b, &qb);
    pa.rnr_retry = 7;
    let mut pb = b.params(&a, &qa);
    pb.min_rnr_timer = 1;
    a.d.connect_rc_with(&qa, &pa).unwrap();
    b.d.connect_rc_with(&qb, &pb).unwrap();
    a.buf.fill_pattern(60);
    a.d.post_send(
        &mut qa,
        &[
            SendWr::send(1, &[a.mr.sge(0, 1000)]),
            SendWr::write_imm(2, &[a.mr.sge(1000, 500)], b.mr.addr(8192), b.mr.rkey, 42),
            SendWr::write(3, &[a.mr.sge(2000, 700)], b.mr.addr(16384), b.mr.rkey),
        ],
    )
    .unwrap();
    // RNR-waiting.
    assert_cq_empty(&a.d, &mut a.cq, Duration::from_millis(60));
    if migrate_sender {
        let t = migrate(&fabric, &mut va, &mut a);
        assert_eq!(t.outstanding_at_stop, 3, "{t:?}");
    }
    if migrate_receiver {
        migrate(&fabric, &mut vb, &mut b);
    }
    // Still waiting on the destination(s), still in RTS.
    assert_cq_empty(&a.d, &mut a.cq, Duration::from_millis(40));
    assert_cq_empty(&b.d, &mut b.cq, QUIET);
    assert_eq!(a.d.qp_state(&qa).unwrap(), abi::QPS_RTS);
    b.d.post_recv(&mut qb, &[RecvWr::new(10, &[b.mr.sge(0, 4096)])])
        .unwrap();
    assert_eq!(
        keys(&a.d.poll_cq_until(&mut a.cq, 1, LONG)),
        [(1, OK, abi::WC_OP_SEND)]
    );
    // The WRITE with immediate now waits for its receive, and the WRITE behind it.
    assert_cq_empty(&a.d, &mut a.cq, Duration::from_millis(40));
    b.d.post_recv(&mut qb, &[RecvWr::new(11, &[])]).unwrap();
    assert_eq!(
        keys(&poll_exact(&a.d, &mut a.cq, 2)),
        [
            (2, OK, abi::WC_OP_RDMA_WRITE),
            (3, OK, abi::WC_OP_RDMA_WRITE)
        ]
    );
    let rc = poll_exact(&b.d, &mut b.cq, 2);
    assert_eq!(
        rc.iter()
            .map(|c| (c.wr_id, c.status, c.opcode, c.byte_len, c.imm_data))
            .collect::<Vec<_>>(),
        [
            (10, OK, abi::WC_OP_RECV, 1000, 0),
            (11, OK, abi::WC_OP_RECV_RDMA_WITH_IMM, 500, 42)
        ]
    );
    let src = pattern(60, 64 << 10);
    assert_eq!(b.buf.read_vec(0, 1000), src[..1000]);
    assert_eq!(b.buf.read_vec(1000, 3096), vec![0; 3096]);
    assert_eq!(b.buf.read_vec(8192, 500), src[1000..1500]);
    assert_eq!(b.buf.read_vec(16384, 700), src[2000..2700]);
    assert_no_events(&a, &b);
}

fn assert_no_events(a: &Guest, b: &Guest) {
    for g in [a, b] {
        let ev = events_until_quiet(&g.d, QUIET);
        assert!(ev.is_empty(), "unexpected events: {ev:?}");
    }
}

#[test]
fn rnr_pending_sender_migrated() {
    rnr_pending(true, false);
}

#[test]
fn rnr_pending_receiver_migrated() {
    rnr_pending(false, true);
}

#[test]
fn rnr_pending_both_migrated() {
    rnr_pending(true, true);
}

// ---------------------------------------------------------------------------------------------
// Abort, and the source after a migration
// ---------------------------------------------------------------------------------------------

/// quiesce + stop + save, then the source resumes without a restore (the migration was
/// aborted): WQEs posted while quiescing and requests the peer sent while it was stopped all
/// complete, exactly once and in order.
#[test]
fn aborted_migration_loses_nothing() {
    let (fabric, va, vb) = two_vms();
    let (mut a, mut b) = (guest(&va, 64 << 10), guest(&vb, 64 << 10));
    let (mut qa, mut qb) = (a.qp(), b.qp());
    connect(&a, &qa, &b, &qb);
    a.buf.fill_pattern(7);
    b.buf.fill_pattern(8);
    let (ab, bb) = (pattern(7, 64 << 10), pattern(8, 64 << 10));
    a.d.post_recv(&mut qa, &[RecvWr::new(100, &[a.mr.sge(0, 2048)])])
        .unwrap();

    va.device.quiesce().unwrap();
    assert_eq!(va.device.migration_state(), MigrationState::Quiescing);
    // Posted while quiescing: stays in the ring.
    a.d.post_send(
        &mut qa,
        &[
            SendWr::write(1, &[a.mr.sge(4096, 1024)], b.mr.addr(0), b.mr.rkey),
            SendWr::read(2, &[a.mr.sge(8192, 512)], b.mr.addr(20000), b.mr.rkey),
        ],
    )
    .unwrap();
    assert_cq_empty(&a.d, &mut a.cq, QUIET);
    // Inbound work is still served while quiescing.
    b.d.post_send(&mut qb, &[SendWr::send(50, &[b.mr.sge(30000, 2000)])])
        .unwrap();
    assert_eq!(
        keys(&poll_exact(&b.d, &mut b.cq, 1)),
        [(50, OK, abi::WC_OP_SEND)]
    );
    assert_eq!(
        keys(&poll_exact(&a.d, &mut a.cq, 1)),
        [(100, OK, abi::WC_OP_RECV)]
    );

    va.device.stop().unwrap();
    // Requests to a stopped device are held (B's operations wait).
    b.d.post_send(
        &mut qb,
        &[
            SendWr::write(51, &[b.mr.sge(0, 4096)], a.mr.addr(12288), a.mr.rkey),
            SendWr::fetch_add(52, &[b.mr.sge(40000, 8)], a.mr.addr(48000), a.mr.rkey, 3),
        ],
    )
    .unwrap();
    assert_cq_empty(&b.d, &mut b.cq, Duration::from_millis(50));
    let blob = va.transport.save_state().unwrap();
    assert!(blob.len() > STATE_HEADER_LEN);
    // Abort.
    va.abort_migration().unwrap();
    assert_eq!(va.device.migration_state(), MigrationState::Running);
    assert_eq!(
        keys(&poll_exact(&a.d, &mut a.cq, 2)),
        [
            (1, OK, abi::WC_OP_RDMA_WRITE),
            (2, OK, abi::WC_OP_RDMA_READ)
        ]
    );
    assert_eq!(
        keys(&poll_exact(&b.d, &mut b.cq, 2)),
        [
            (51, OK, abi::WC_OP_RDMA_WRITE),
            (52, OK, abi::WC_OP_FETCH_ADD)
        ]
    );
    assert_eq!(b.buf.read_vec(0, 1024), ab[4096..5120]);
    assert_eq!(a.buf.read_vec(8192, 512), bb[20000..20512]);
    assert_eq!(a.buf.read_vec(0, 2000), bb[30000..32000]);
    assert_eq!(a.buf.read_vec(12288, 4096), bb[..4096]);
    let orig = u64::from_le_bytes(ab[48000..48008].try_into().unwrap());
    assert_eq!(b.buf.read_u64(40000), orig);
    assert_eq!(a.buf.read_u64(48000), orig.wrapping_add(3));
    // The aborted source can still be migrated for real.
    let mut va = va;
    migrate(&fabric, &mut va, &mut a);
    a.d.post_send(
        &mut qa,
        &[SendWr::write(
            3,
            &[a.mr.sge(60000, 100)],
            b.mr.addr(60000),
            b.mr.rkey,
        )],
    )
    .unwrap();
    assert_eq!(
        keys(&poll_exact(&a.d, &mut a.cq, 1)),
        [(3, OK, abi::WC_OP_RDMA_WRITE)]
    );
    assert_eq!(b.buf.read_vec(60000, 100), ab[60000..60100]);
    assert_no_events(&a, &b);
}

/// After a successful migration the source is MigratedAway: it refuses every migration step
/// and its transport cannot be saved; a restored device that is never resumed does not take
/// the GID; the destination can be migrated again.
#[test]
fn migrated_away_source_refuses_everything() {
    let (fabric, va, vb) = two_vms();
    let (mut a, mut b) = (guest(&va, 64 << 10), guest(&vb, 64 << 10));
    let (mut qa, mut qb) = (a.qp(), b.qp());
    connect(&a, &qa, &b, &qb);

    // A restore that is never resumed changes nothing: the source resumes and keeps the GID.
    va.device.quiesce().unwrap();
    va.device.stop().unwrap();
    let blob = va.transport.save_state().unwrap();
    let dst = Arc::new(memory_like(&va.mem));
    vrdma_device::dirty::copy_all(&va.mem, &dst);
    let evt = vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
    let orphan = MmioTransport::restore(&fabric, dst, evt, &blob).unwrap();
    assert_eq!(orphan.device().migration_state(), MigrationState::Stopped);
    drop(orphan);
    va.abort_migration().unwrap();
    b.d.post_recv(&mut qb, &[RecvWr::new(1, &[b.mr.sge(0, 64)])])
        .unwrap();
    a.d.post_send(&mut qa, &[SendWr::send_inline(1, b"still here")])
        .unwrap();
    assert_eq!(
        keys(&poll_exact(&a.d, &mut a.cq, 1)),
        [(1, OK, abi::WC_OP_SEND)]
    );
    assert_eq!(
        keys(&poll_exact(&b.d, &mut b.cq, 1)),
        [(1, OK, abi::WC_OP_RECV)]
    );

    let old = va;
    let mut va = {
        let (new, _) = old.migrate(&fabric).unwrap();
        a.rebind_to(&new);
        new
    };
    let away = MigrationState::MigratedAway;
    assert_eq!(old.device.migration_state(), away);
    let wrong = |op: &'static str| MigrationError::WrongState { op, state: away };
    assert_eq!(old.device.resume(), Err(wrong("resume")));
    assert_eq!(old.device.save(), Err(wrong("save")));
    assert_eq!(old.device.quiesce(), Err(wrong("quiesce")));
    assert_eq!(old.device.stop(), Err(wrong("stop")));
    assert_eq!(
        old.transport.save_state(),
        Err(TransportMigrationError::Device(wrong("save")))
    );
    assert!(old.abort_migration().is_err());
    // Still refused after the attempts; the destination is unaffected and runs traffic.
    assert_eq!(old.device.migration_state(), away);
    drop(old);
    b.d.post_recv(&mut qb, &[RecvWr::new(2, &[b.mr.sge(64, 64)])])
        .unwrap();
    a.d.post_send(&mut qa, &[SendWr::send_inline(2, b"moved")])
        .unwrap();
    assert_eq!(
        keys(&poll_exact(&a.d, &mut a.cq, 1)),
        [(2, OK, abi::WC_OP_SEND)]
    );
    assert_eq!(
        keys(&poll_exact(&b.d, &mut b.cq, 1)),
        [(2, OK, abi::WC_OP_RECV)]
    );
    assert_eq!(b.buf.read_vec(64, 5), b"moved");
    // And the destination migrates on.
    migrate(&fabric, &mut va, &mut a);
    assert_eq!(a.d.gid().unwrap(), DeviceConfig::gid_for_id(1));
}

// ---------------------------------------------------------------------------------------------
// Bad blobs
// ---------------------------------------------------------------------------------------------

fn new_evt() -> vmm_sys_util::eventfd::EventFd {
    vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap()
}

/// Offset of the device blob inside a transport blob (the body's last field).
fn device_blob_at(blob: &[u8]) -> usize {
    STATE_HEADER_LEN
        + blob[STATE_HEADER_LEN..]
            .windows(8)
            .position(|w| w == b"VRDMAMIG")
            .expect("device blob")
}

/// Recomputes the device blob's CRC (if `inner`) and the transport's, after an edit.
fn fix_crcs(blob: &mut [u8], d: usize, inner: bool) {
    if inner {
        let crc = crc32fast::hash(&blob[d + 32..]);
        blob[d + 24..d + 28].copy_from_slice(&crc.to_le_bytes());
    }
    let crc = crc32fast::hash(&blob[STATE_HEADER_LEN..]);
    blob[24..28].copy_from_slice(&crc.to_le_bytes());
}

fn varint(mut n: usize) -> Vec<u8> {
    let mut v = Vec::new();
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            v.push(b);
            return v;
        }
        v.push(b | 0x80);
    }
}

/// The transport blob with its device blob replaced (any length; checksums recomputed).
fn with_device_blob(blob: &[u8], dev: &[u8]) -> Vec<u8> {
    let d = device_blob_at(blob);
    let n = varint(blob.len() - d).len();
    let mut body = blob[STATE_HEADER_LEN..d - n].to_vec();
    body.extend(varint(dev.len()));
    body.extend_from_slice(dev);
    let mut out = blob[..16].to_vec();
    out.extend((body.len() as u64).to_le_bytes());
    out.extend(crc32fast::hash(&body).to_le_bytes());
    out.extend(0u32.to_le_bytes());
    out.extend(body);
    out
}

/// The sections of a device blob: (name, version, data).
fn sections(dev: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
    let count = u32::from_le_bytes(dev[12..16].try_into().unwrap());
    let mut at = 32;
    let mut out = Vec::new();
    let u32_at = |o: usize| u32::from_le_bytes(dev[o..o + 4].try_into().unwrap());
    for _ in 0..count {
        let nl = u16::from_le_bytes(dev[at..at + 2].try_into().unwrap()) as usize;
        let name = String::from_utf8(dev[at + 2..at + 2 + nl].to_vec()).unwrap();
        at += 2 + nl;
        let (version, len) = (u32_at(at), u32_at(at + 4) as usize);
        out.push((name, version, dev[at + 8..at + 8 + len].to_vec()));
        at += 8 + len;
    }
    assert_eq!(at, dev.len());
    out
}

/// A device blob (format version 1) of `sections`.
fn device_blob(sections: &[(String, u32, Vec<u8>)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, version, data) in sections {
        body.extend((name.len() as u16).to_le_bytes());
        body.extend(name.as_bytes());
        body.extend(version.to_le_bytes());
        body.extend((data.len() as u32).to_le_bytes());
        body.extend(data);
    }
    let mut out = b"VRDMAMIG".to_vec();
    out.extend(1u32.to_le_bytes());
    out.extend((sections.len() as u32).to_le_bytes());
    out.extend((body.len() as u64).to_le_bytes());
    out.extend(crc32fast::hash(&body).to_le_bytes());
    out.extend(0u32.to_le_bytes());
    out.extend(body);
    out
}

/// Bad blobs — truncated, corrupted, wrong version or magic (transport and device), broken
/// sections, limits the state exceeds, rings outside the destination's memory, and every body
/// byte changed with valid checksums — are refused (or, where the change is harmless, restore a
/// device that is never resumed); nothing panics, and the source resumes and works, with the
/// operation that was in flight when it stopped.
#[test]
fn bad_blobs_are_refused_and_the_source_resumes() {
    use TransportMigrationError as T;
    let (fabric, va, vb) = two_vms();
    let (mut a, mut b) = (guest(&va, 64 << 10), guest(&vb, 64 << 10));
    // QP table slots beyond the live QP: 3 created, 2 destroyed.
    let mut spare = [a.qp(), a.qp()];
    let (mut qa, mut qb) = (a.qp(), b.qp());
    for q in &mut spare {
        a.d.destroy_qp(q).unwrap();
    }
    connect(&a, &qa, &b, &qb);
    // More kinds of state: a second PD with an MR, an AH, a UD QP with a receive, an armed CQ.
    let pd2 = a.d.alloc_pd().unwrap();
    let buf2 = a.d.alloc_buffer(40 << 10, Layout::Discontiguous).unwrap();
    let mr2 = a.d.reg_mr(pd2, &buf2, abi::ACCESS_LOCAL_WRITE).unwrap();
    let _ah =
        a.d.create_ah(pd2, &vrdma_guest::ah_attr_for(b.d.gid().unwrap()))
            .unwrap();
    let mut cq2 = a.d.create_cq(64).unwrap();
    let mut qu = a.d.create_qp(pd2, &QpInitAttr::ud(&cq2)).unwrap();
    a.d.connect_ud(&qu, 0x1234).unwrap();
    a.d.post_recv(&mut qu, &[RecvWr::new(77, &[mr2.sge(0, 2048)])])
        .unwrap();
    a.d.req_notify_cq(&mut cq2, false).unwrap();
    a.buf.fill_pattern(11);
    // In flight in the saved state: a SEND waiting for B's receive (RNR), and a WRITE with two
    // SGEs and a READ behind it.
    a.d.post_send(
        &mut qa,
        &[
            SendWr::send(1, &[a.mr.sge(0, 1500)]),
            SendWr::write(
                2,
                &[a.mr.sge(4096, 1000), a.mr.sge(6000, 2000)],
                b.mr.addr(8192),
                b.mr.rkey,
            ),
            SendWr::read(3, &[a.mr.sge(16384, 100)], b.mr.addr(0), b.mr.rkey),
        ],
    )
    .unwrap();
    assert_cq_empty(&a.d, &mut a.cq, Duration::from_millis(30));
    va.device.quiesce().unwrap();
    va.device.stop().unwrap();
    let blob = va.transport.save_state().unwrap();
    let dst = Arc::new(memory_like(&va.mem));
    vrdma_device::dirty::copy_all(&va.mem, &dst);
    let restore_into = |mem: &Arc<GuestMemoryMmap>, bytes: &[u8]| {
        MmioTransport::restore(&fabric, mem.clone(), new_evt(), bytes).map(drop)
    };
    let restore = |bytes: &[u8]| restore_into(&dst, bytes);
    // Untouched, it restores (and is dropped without taking over).
    assert_eq!(restore(&blob), Ok(()));
    let d = device_blob_at(&blob);
    let dev = blob[d..].to_vec();
    assert_eq!(with_device_blob(&blob, &dev), blob);

    // Truncated anywhere, the transport blob or the device blob inside it.
    for cut in 0..blob.len() {
        assert!(restore(&blob[..cut]).is_err(), "transport cut at {cut}");
    }
    for cut in 0..dev.len() {
        let r = restore(&with_device_blob(&blob, &dev[..cut]));
        assert!(matches!(r, Err(T::Device(_))), "device cut at {cut}: {r:?}");
    }
    // A flipped byte (checksums left alone).
    for at in [STATE_HEADER_LEN, d - 1, d + 8, d + 40, blob.len() - 1] {
        let mut bad = blob.clone();
        bad[at] ^= 0x04;
        assert_eq!(restore(&bad), Err(T::Checksum), "byte {at}");
        // With the transport checksum fixed, the device's own checksum catches it.
        if at >= d + 32 {
            fix_crcs(&mut bad, d, false);
            assert_eq!(restore(&bad), Err(T::Device(MigrationError::Checksum)));
        }
    }
    // Wrong versions and magics.
    let edit = |at: usize, v: u8, inner: bool| {
        let mut bad = blob.clone();
        bad[at] = v;
        if at >= STATE_HEADER_LEN {
            fix_crcs(&mut bad, d, inner);
        }
        restore(&bad)
    };
    assert_eq!(edit(8, 2, false), Err(T::UnsupportedVersion(2)));
    assert_eq!(edit(0, b'X', false), Err(T::BadMagic));
    assert_eq!(
        edit(d + 8, 9, false),
        Err(T::Device(MigrationError::UnsupportedVersion(9)))
    );
    assert_eq!(
        edit(d, b'X', false),
        Err(T::Device(MigrationError::BadMagic))
    );

    // Sections: unknown, missing, duplicated, of an unknown version, not decoding.
    let secs = sections(&dev);
    assert_eq!(
        secs.iter().map(|s| (s.0.as_str(), s.1)).collect::<Vec<_>>(),
        [
            ("config", 1),
            ("virtio", 1),
            ("core", 2),
            ("backend", 1),
            ("mrs", 1)
        ]
    );
    let section_err = |s: Vec<(String, u32, Vec<u8>)>| {
        let r = restore(&with_device_blob(&blob, &device_blob(&s)));
        assert!(
            matches!(r, Err(T::Device(MigrationError::Section { .. }))),
            "{r:?}"
        );
    };
    let mut s = secs.clone();
    s[2].0 = "cora".into();
    section_err(s);
    let mut s = secs.clone();
    s.remove(3);
    section_err(s);
    let mut s = secs.clone();
    s[3] = s[2].clone();
    section_err(s);
    let mut s = secs.clone();
    s[1].1 = 2;
    section_err(s);
    let mut s = secs.clone();
    let half = s[2].2.len() / 2;
    s[2].2.truncate(half);
    section_err(s);
    let mut s = secs.clone();
    s[3].2.push(0);
    section_err(s);
    // Core versions: 3 is unknown; 1 (which holds the MR table) next to an `mrs` section.
    let mut s = secs.clone();
    s[2].1 = 3;
    section_err(s);
    let mut s = secs.clone();
    s[2].1 = 1;
    section_err(s);
    let mut s = secs.clone();
    s.remove(4);
    section_err(s);

    // Limits the saved state exceeds (the configuration section rewritten): handles out of
    // range, rings deeper or larger than allowed, page budgets, QP capabilities.
    let cfg: DeviceConfig = postcard::from_bytes(&secs[0].2).unwrap();
    assert_eq!(cfg.gid, DeviceConfig::gid_for_id(1));
    type CfgEdit = fn(&mut DeviceConfig);
    let limits: [(&str, CfgEdit); 8] = [
        ("max_qp below the QP slots in use", |c| c.max_qp = 2),
        ("max_cqe below a CQ's depth", |c| c.max_cqe = 2),
        ("max_qp_wr below a queue's depth", |c| c.max_qp_wr = 2),
        ("max_mr_pages below an MR's pages", |c| c.max_mr_pages = 1),
        ("max_ring_pages below a ring's pages", |c| {
            c.max_ring_pages = 1
        }),
        ("ring page budget", |c| c.max_total_ring_pages = 1),
        ("max_sge below a QP's SGEs", |c| c.max_sge = 1),
        ("an invalid configuration", |c| c.max_qp = 0),
    ];
    for (what, f) in limits {
        let mut c = cfg.clone();
        f(&mut c);
        let mut s = secs.clone();
        s[0].2 = postcard::to_stdvec(&c).unwrap();
        let r = restore(&with_device_blob(&blob, &device_blob(&s)));
        assert!(
            matches!(r, Err(T::Device(MigrationError::Invalid(_)))),
            "{what}: {r:?}"
        );
    }

    // A destination memory that is too small: a ring page (or the queues) outside it.
    let top = [qa.sq(), qa.rq(), a.cq.ring()]
        .iter()
        .flat_map(|r| r.pages().iter().copied())
        .max()
        .unwrap();
    for size in [ALLOC_BASE, top] {
        let small =
            Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap());
        let r = restore_into(&small, &blob);
        assert!(
            matches!(r, Err(T::Device(MigrationError::Invalid(_)))),
            "memory of {size:#x}: {r:?}"
        );
    }

    // Every byte of the device body changed, both checksums valid: refused, or accepted as a
    // different but consistent state. Accepted ones are run on a fabric of their own (over a
    // scratch copy of the memory): resumed, notified, reset — nothing may panic.
    let (mut refused, mut accepted) = (0, 0);
    let lab = SoftFabric::new();
    let scratch = Arc::new(memory_like(&va.mem));
    vrdma_device::dirty::copy_all(&va.mem, &scratch);
    for at in d + 32..blob.len() {
        for f in [|v: u8| v ^ 0xff, |v: u8| v.wrapping_add(1)] {
            let mut bad = blob.clone();
            bad[at] = f(bad[at]);
            fix_crcs(&mut bad, d, true);
            match restore(&bad) {
                Ok(()) => {
                    accepted += 1;
                    let t = MmioTransport::restore(&lab, scratch.clone(), new_evt(), &bad)
                        .unwrap_or_else(|e| panic!("byte {at}: restores once, not twice: {e}"));
                    t.device().resume().unwrap();
                    t.queue_notify(abi::CTRLQ);
                    t.queue_notify(abi::EVENTQ);
                    t.write(0x70, &0u32.to_le_bytes()); // Status = 0: device reset
                }
                Err(T::Device(_)) => refused += 1,
                Err(e) => panic!("byte {at}: not a device error: {e}"),
            }
        }
    }
    eprintln!(
        "device body of {} bytes: {refused} mutations refused, {accepted} accepted",
        blob.len() - d - 32
    );
    assert!(refused > accepted, "{refused} refused, {accepted} accepted");

    // The source resumes (abort) and works: the SEND in flight completes once.
    va.abort_migration().unwrap();
    b.d.post_recv(&mut qb, &[RecvWr::new(10, &[b.mr.sge(0, 4096)])])
        .unwrap();
    assert_eq!(
        keys(&poll_exact(&a.d, &mut a.cq, 3)),
        [
            (1, OK, abi::WC_OP_SEND),
            (2, OK, abi::WC_OP_RDMA_WRITE),
            (3, OK, abi::WC_OP_RDMA_READ)
        ]
    );
    let rc = poll_exact(&b.d, &mut b.cq, 1);
    assert_eq!((rc[0].wr_id, rc[0].byte_len), (10, 1500));
    let src = pattern(11, 64 << 10);
    assert_eq!(b.buf.read_vec(0, 1500), src[..1500]);
    assert_eq!(b.buf.read_vec(8192, 1000), src[4096..5096]);
    assert_eq!(b.buf.read_vec(9192, 2000), src[6000..8000]);
    assert_eq!(a.buf.read_vec(16384, 100), src[..100]);
    a.d.post_send(
        &mut qa,
        &[SendWr::fetch_add(
            4,
            &[a.mr.sge(20000, 8)],
            b.mr.addr(32768),
            b.mr.rkey,
            1,
        )],
    )
    .unwrap();
    assert_eq!(
        keys(&poll_exact(&a.d, &mut a.cq, 1)),
        [(4, OK, abi::WC_OP_FETCH_ADD)]
    );
    assert_eq!(a.buf.read_u64(20000), 0);
    assert_eq!(b.buf.read_u64(32768), 1);
    assert_cq_empty(&a.d, &mut cq2, QUIET);
    assert_no_events(&a, &b);
}

// ---------------------------------------------------------------------------------------------
// Device pre-copy, blob versions
// ---------------------------------------------------------------------------------------------

/// The device pre-copy (the MR table, saved while the guest runs and loaded on the destination
/// before the stop) followed by MR changes: an MR deregistered, one registered into the freed
/// slot, and a slot reused until its key wrapped round to the very same rkey, now for a larger
/// buffer with other access rights. The blob saved at the stop carries only the changes; the
/// destination has exactly the source's MRs: the unchanged ones work, the new ones work with
/// their new bounds and rights, the deregistered one is refused.
#[test]
fn mr_changes_after_the_precopy_reach_the_destination() {
    let (fabric, va, vb) = two_vms();
    let (mut a, mut b) = (guest(&va, 64 << 10), guest(&vb, 64 << 10));
    let (mut qa, mut qb) = (a.qp(), b.qp());
    connect(&a, &qa, &b, &qb);
    let rw = abi::ACCESS_LOCAL_WRITE | abi::ACCESS_REMOTE_WRITE;
    let mut spare = a.d.alloc_buffer(4096, Layout::Any).unwrap();
    spare.fill_pattern(30);
    let steady: Vec<Mr> = (0..200)
        .map(|_| a.d.reg_mr(a.pd, &spare, abi::ACCESS_LOCAL_WRITE).unwrap())
        .collect();
    let mut gone_buf = a.d.alloc_buffer(4096, Layout::Any).unwrap();
    gone_buf.fill(0x11);
    let gone = a.d.reg_mr(a.pd, &gone_buf, rw).unwrap();
    let small = a.d.alloc_buffer(4096, Layout::Any).unwrap();
    let wrap = a.d.reg_mr(a.pd, &small, rw).unwrap();

    let mut pre = va.precopy();
    // Changes after the pre-copy, while the guest runs.
    a.d.dereg_mr(gone).unwrap();
    let mut fresh_buf = a.d.alloc_buffer(8192, Layout::Discontiguous).unwrap();
    fresh_buf.fill(0x22);
    let fresh = a.d.reg_mr(a.pd, &fresh_buf, rw).unwrap();
    assert_eq!(abi::handle_index(fresh.rkey), abi::handle_index(gone.rkey));
    assert_ne!(fresh.rkey, gone.rkey);
    let mut big = a.d.alloc_buffer(16 << 10, Layout::Discontiguous).unwrap();
    big.fill(0x33);
    let mut w = wrap;
    for i in 0..255 {
        a.d.dereg_mr(w).unwrap();
        w = if i < 254 {
            a.d.reg_mr(a.pd, &small, rw).unwrap()
        } else {
            a.d.reg_mr(a.pd, &big, rw | abi::ACCESS_REMOTE_READ)
                .unwrap()
        };
    }
    assert_eq!(w.rkey, wrap.rkey, "the slot's key wrapped round");
    assert_ne!((w.len, w.iova), (wrap.len, wrap.iova));
    pre.round();
    pre.stop_and_copy(&MigrateOptions::default()).unwrap();
    let (vm2, t) = pre.finish(&fabric).unwrap();
    assert_eq!(va.device.migration_state(), MigrationState::MigratedAway);
    assert!(t.precopy_state_bytes > 200 * 20, "{t:?}");
    // The stop-time blob holds 3 MRs of 203 (and 2 QPs, 2 CQs): far less than the pre-copy.
    assert!(t.state_bytes < t.precopy_state_bytes, "{t:?}");
    a.rebind_to(&vm2);
    for buf in [&mut spare, &mut gone_buf, &mut fresh_buf, &mut big] {
        buf.rebind(vm2.mem.clone());
    }

    // Pre-copied MRs work: a SEND gathers from one of them.
    b.buf.fill(0);
    b.d.post_recv(&mut qb, &[RecvWr::new(10, &[b.mr.sge(0, 4096)])])
        .unwrap();
    a.d.post_send(&mut qa, &[SendWr::send(1, &[steady[150].sge(0, 4096)])])
        .unwrap();
    assert_eq!(
        keys(&poll_exact(&a.d, &mut a.cq, 1)),
        [(1, OK, abi::WC_OP_SEND)]
    );
    assert_eq!(
        keys(&poll_exact(&b.d, &mut b.cq, 1)),
        [(10, OK, abi::WC_OP_RECV)]
    );
    assert_eq!(b.buf.read_vec(0, 4096), pattern(30, 4096));
    // The new MRs, with the rights and bounds they have now: the whole fresh buffer, the end
    // of the big buffer (beyond the small one the rkey named before), and a READ.
    b.buf.fill_pattern(31);
    let src = pattern(31, 64 << 10);
    b.d.post_send(
        &mut qb,
        &[
            SendWr::write(2, &[b.mr.sge(0, 8192)], fresh.iova, fresh.rkey),
            SendWr::write(3, &[b.mr.sge(8192, 4096)], w.iova + 12288, w.rkey),
            SendWr::read(4, &[b.mr.sge(32768, 8192)], w.iova + 8192, w.rkey),
        ],
    )
    .unwrap();
    assert_eq!(
        keys(&poll_exact(&b.d, &mut b.cq, 3)),
        [
            (2, OK, abi::WC_OP_RDMA_WRITE),
            (3, OK, abi::WC_OP_RDMA_WRITE),
            (4, OK, abi::WC_OP_RDMA_READ)
        ]
    );
    assert!(fresh_buf.to_vec() == src[..8192]);
    let mut want = vec![0x33; 16 << 10];
    want[12288..].copy_from_slice(&src[8192..12288]);
    assert!(big.to_vec() == want);
    assert_eq!(b.buf.read_vec(32768, 8192), want[8192..]);
    // The deregistered MR is gone on the destination too.
    b.d.post_send(
        &mut qb,
        &[SendWr::write(5, &[b.mr.sge(0, 64)], gone.iova, gone.rkey)],
    )
    .unwrap();
    assert_eq!(
        keys(&poll_exact(&b.d, &mut b.cq, 1)),
        [(5, abi::WC_REM_ACCESS_ERR, abi::WC_OP_RDMA_WRITE)]
    );
    assert!(gone_buf.to_vec() == vec![0x11; 4096]);
    assert_cq_empty(&a.d, &mut a.cq, QUIET);
}

/// A device that was never activated (no driver yet) migrates with a device pre-copy too, and
/// the driver then brings it up on the destination.
#[test]
fn inactive_device_migrates_with_precopy() {
    let (fabric, va, vb) = two_vms();
    let mut b = guest(&vb, 64 << 10);
    let mut pre = va.precopy();
    pre.stop_and_copy(&MigrateOptions::default()).unwrap();
    let (vm2, t) = pre.finish(&fabric).unwrap();
    assert!(t.precopy_state_bytes > 0);
    assert!(!vm2.device.is_active());
    let mut a = guest(&vm2, 64 << 10);
    let (mut qa, mut qb) = (a.qp(), b.qp());
    connect(&a, &qa, &b, &qb);
    a.buf.fill_pattern(50);
    b.d.post_recv(&mut qb, &[RecvWr::new(10, &[b.mr.sge(0, 4096)])])
        .unwrap();
    a.d.post_send(&mut qa, &[SendWr::send(1, &[a.mr.sge(0, 1000)])])
        .unwrap();
    assert_eq!(
        keys(&poll_exact(&a.d, &mut a.cq, 1)),
        [(1, OK, abi::WC_OP_SEND)]
    );
    assert_eq!(
        keys(&poll_exact(&b.d, &mut b.cq, 1)),
        [(10, OK, abi::WC_OP_RECV)]
    );
    assert_eq!(b.buf.read_vec(0, 1000), pattern(50, 1000));
}

/// The byte offset of section `name` (its header) in a device blob, and its total length.
fn section_span(dev: &[u8], name: &str) -> (usize, usize) {
    let mut at = 32;
    for (n, _, data) in sections(dev) {
        let len = 2 + n.len() + 8 + data.len();
        if n == name {
            return (at, len);
        }
        at += len;
    }
    panic!("no section {name}");
}

/// Pre-copy misuse and bad pre-copy blobs: a blob saved after a pre-copy is refused without it,
/// with an earlier pre-copy, or with one loaded for another memory layout; pre-copy and device
/// blobs are not taken for each other; truncated, corrupted or mutated pre-copy blobs (and
/// mutated `mrs` deltas) are refused or restore a consistent device, never panic. An aborted
/// migration forgets its pre-copy: the next stop-and-copy blob is complete.
#[test]
fn precopy_misuse_and_bad_precopy_blobs_are_refused() {
    use TransportMigrationError as T;
    let (fabric, mut va, vb) = two_vms();
    let (mut a, mut b) = (guest(&va, 64 << 10), guest(&vb, 64 << 10));
    let (mut qa, mut qb) = (a.qp(), b.qp());
    connect(&a, &qa, &b, &qb);
    let extra: Vec<Mr> = (0..3)
        .map(|_| a.d.reg_mr(a.pd, &a.buf, abi::ACCESS_LOCAL_WRITE).unwrap())
        .collect();
    let pre1 = va.device.save_precopy().unwrap();
    let pre2 = va.device.save_precopy().unwrap();
    assert_eq!(&pre2[..8], b"VRDMAPRE");
    a.d.dereg_mr(extra[0]).unwrap();
    va.device.quiesce().unwrap();
    va.device.stop().unwrap();
    let blob = va.transport.save_state().unwrap();
    let dst = Arc::new(memory_like(&va.mem));
    vrdma_device::dirty::copy_all(&va.mem, &dst);
    let load = |bytes: &[u8]| PrecopyState::load(&dst, bytes);
    let restore = |p: Option<PrecopyState>, bytes: &[u8]| {
        MmioTransport::restore_with_precopy(&fabric, dst.clone(), new_evt(), bytes, p).map(drop)
    };
    let precopy_err = |r: Result<(), T>| {
        assert!(
            matches!(r, Err(T::Device(MigrationError::Precopy(_)))),
            "{r:?}"
        )
    };
    precopy_err(restore(None, &blob));
    precopy_err(restore(Some(load(&pre1).unwrap()), &blob));
    let other = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 * RAM as usize)]).unwrap();
    precopy_err(restore(
        Some(PrecopyState::load(&other, &pre2).unwrap()),
        &blob,
    ));
    // The other kind of blob.
    let d = device_blob_at(&blob);
    assert_eq!(load(&blob[d..]).unwrap_err(), MigrationError::BadMagic);
    assert_eq!(
        restore(None, &with_device_blob(&blob, &pre2)),
        Err(T::Device(MigrationError::BadMagic))
    );
    // Truncated or corrupted pre-copy blobs.
    for cut in 0..pre2.len() {
        assert!(load(&pre2[..cut]).is_err(), "cut at {cut}");
    }
    let mut bad = pre2.clone();
    bad[40] ^= 1;
    assert_eq!(load(&bad).unwrap_err(), MigrationError::Checksum);
    // Every body byte of the pre-copy blob changed, checksum valid: refused, or loaded; a
    // loaded one then restores the delta or is refused.
    let (mut refused, mut accepted) = (0, 0);
    for at in 32..pre2.len() {
        for f in [|v: u8| v ^ 0xff, |v: u8| v.wrapping_add(1)] {
            let mut bad = pre2.clone();
            bad[at] = f(bad[at]);
            let crc = crc32fast::hash(&bad[32..]);
            bad[24..28].copy_from_slice(&crc.to_le_bytes());
            match load(&bad) {
                Ok(p) => {
                    accepted += 1;
                    let _ = restore(Some(p), &blob);
                }
                Err(_) => refused += 1,
            }
        }
    }
    eprintln!("pre-copy mutations: {refused} refused, {accepted} loaded");
    assert!(refused > accepted, "{refused} refused, {accepted} loaded");
    // Every byte of the `mrs` delta changed (checksums valid), restored with the right
    // pre-copy: refused, or a device that is resumed on a fabric of its own and survives use.
    let (at, len) = section_span(&blob[d..], "mrs");
    let (mut refused, mut accepted) = (0, 0);
    let lab = SoftFabric::new();
    for at in d + at..d + at + len {
        for f in [|v: u8| v ^ 0xff, |v: u8| v.wrapping_add(1)] {
            let mut bad = blob.clone();
            bad[at] = f(bad[at]);
            fix_crcs(&mut bad, d, true);
            match MmioTransport::restore_with_precopy(
                &lab,
                dst.clone(),
                new_evt(),
                &bad,
                Some(load(&pre2).unwrap()),
            ) {
                Ok(t) => {
                    accepted += 1;
                    t.device().resume().unwrap();
                    t.queue_notify(abi::CTRLQ);
                    t.queue_notify(abi::EVENTQ);
                    t.write(0x70, &0u32.to_le_bytes());
                }
                Err(T::Device(_)) => refused += 1,
                Err(e) => panic!("byte {at}: not a device error: {e}"),
            }
        }
    }
    eprintln!("mrs delta mutations: {refused} refused, {accepted} accepted");
    assert!(refused > 0);
    // With the right pre-copy it restores.
    assert_eq!(restore(Some(load(&pre2).unwrap()), &blob), Ok(()));

    // Abort: the source resumes and forgets the pre-copy; a plain stop-and-copy migration
    // (complete blob, no pre-copy) then works, and so do the MRs.
    va.abort_migration().unwrap();
    migrate(&fabric, &mut va, &mut a);
    a.buf.fill_pattern(40);
    b.d.post_recv(&mut qb, &[RecvWr::new(10, &[b.mr.sge(0, 4096)])])
        .unwrap();
    a.d.post_send(&mut qa, &[SendWr::send(1, &[extra[2].sge(100, 500)])])
        .unwrap();
    assert_eq!(
        keys(&poll_exact(&a.d, &mut a.cq, 1)),
        [(1, OK, abi::WC_OP_SEND)]
    );
    let rc = poll_exact(&b.d, &mut b.cq, 1);
    assert_eq!((rc[0].wr_id, rc[0].status, rc[0].byte_len), (10, OK, 500));
    assert_eq!(b.buf.read_vec(0, 500), pattern(40, 600)[100..]);
    assert_status(a.d.dereg_mr(extra[0]), abi::STATUS_BAD_HANDLE);
}

/// A device blob written by the first release (format 1 with `core` version 1, which held the
/// MR table; `tests/tests/data/device-blob-v1.bin`: an RC QP with a SEND in flight and a
/// posted receive, three MRs registered and one deregistered) is still restored, and saving the
/// restored device converts it: `core` version 2 is the old `core` without the MR table, which
/// moved unchanged into a complete `mrs` section.
#[test]
fn blobs_of_the_first_format_are_still_restored() {
    let v1 = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/device-blob-v1.bin"
    ))
    .unwrap();
    let old = sections(&v1);
    assert_eq!(
        old.iter().map(|s| (s.0.as_str(), s.1)).collect::<Vec<_>>(),
        [("config", 1), ("virtio", 1), ("core", 1), ("backend", 1)]
    );
    let fabric = SoftFabric::new();
    let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap());
    let evt = new_evt();
    let irq = Arc::new(vrdma_device::EventFdInterrupt::new(evt));
    let dev = vrdma_device::Vrdma::restore(&fabric, mem.clone(), irq.clone(), &v1).unwrap();
    assert_eq!(dev.migration_state(), MigrationState::Stopped);
    assert_eq!(dev.outstanding(), 1);
    let new = sections(&dev.save().unwrap());
    assert_eq!(
        new.iter().map(|s| (s.0.as_str(), s.1)).collect::<Vec<_>>(),
        [
            ("config", 1),
            ("virtio", 1),
            ("core", 2),
            ("backend", 1),
            ("mrs", 1)
        ]
    );
    for i in [0, 1, 3] {
        assert_eq!(new[i], old[i]);
    }
    // `mrs` = variant 0 (complete) + the table as v1 held it, right after the PD table.
    let (core1, core2, mrs) = (&old[2].2, &new[2].2, &new[4].2);
    assert_eq!(mrs[0], 0);
    let table = &mrs[1..];
    let at = core1
        .windows(table.len())
        .position(|w| w == table)
        .expect("the MR table inside core v1");
    assert_eq!([&core1[..at], &core1[at + table.len()..]].concat(), *core2);
    // An `mrs` section next to core version 1 is refused.
    let mut both = old.clone();
    both.push(new[4].clone());
    assert!(matches!(
        vrdma_device::Vrdma::restore(&fabric, mem, irq, &device_blob(&both)),
        Err(MigrationError::Section { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// UD
// ---------------------------------------------------------------------------------------------

/// UD datagrams sent to a stopped device are held and delivered by its destination; a
/// migrated UD sender keeps its QPN, Q_Key and AH.
#[test]
fn ud_datagrams_follow_the_migrated_device() {
    const QKEY: u32 = 0x2222_0002;
    let (fabric, mut va, mut vb) = two_vms();
    let (mut a, mut b) = (guest(&va, 64 << 10), guest(&vb, 64 << 10));
    let ud = |g: &Guest| g.d.create_qp(g.pd, &QpInitAttr::ud(&g.cq)).unwrap();
    let (mut qa, mut qb) = (ud(&a), ud(&b));
    a.d.connect_ud(&qa, 0x1111_0001).unwrap();
    b.d.connect_ud(&qb, QKEY).unwrap();
    let ah =
        a.d.create_ah(a.pd, &vrdma_guest::ah_attr_for(b.d.gid().unwrap()))
            .unwrap();
    a.buf.fill_pattern(21);
    let src = pattern(21, 64 << 10);
    let recvs: Vec<[Sge; 1]> = (0..4u64).map(|i| [b.mr.sge(i * 4096, 40 + 2000)]).collect();
    let wrs: Vec<RecvWr> = (0..4u64)
        .map(|i| RecvWr::new(300 + i, &recvs[i as usize]))
        .collect();
    b.d.post_recv(&mut qb, &wrs).unwrap();

    // B stops; A's datagrams complete at A (UD) and wait in the fabric for B.
    vb.device.quiesce().unwrap();
    vb.device.stop().unwrap();
    a.d.post_send(
        &mut qa,
        &[
            SendWr::ud_send(1, &[a.mr.sge(0, 1500)], ah, qb.qpn(), QKEY),
            SendWr::ud_send(2, &[a.mr.sge(8000, 2000)], ah, qb.qpn(), QKEY).with_imm(77),
        ],
    )
    .unwrap();
    assert_eq!(
        keys(&poll_exact(&a.d, &mut a.cq, 2)),
        [(1, OK, abi::WC_OP_SEND), (2, OK, abi::WC_OP_SEND)]
    );
    migrate(&fabric, &mut vb, &mut b);
    let rc = poll_exact(&b.d, &mut b.cq, 2);
    let r = |c: &Cqe| {
        (
            c.wr_id, c.status, c.byte_len, c.src_qp, c.wc_flags, c.imm_data,
        )
    };
    assert_eq!(
        rc.iter().map(r).collect::<Vec<_>>(),
        [
            (300, OK, 1540, qa.qpn(), abi::WC_F_GRH, 0),
            (
                301,
                OK,
                2040,
                qa.qpn(),
                abi::WC_F_GRH | abi::WC_F_WITH_IMM,
                77
            )
        ]
    );
    assert_eq!(b.buf.read_vec(40, 1500), src[..1500]);
    assert_eq!(b.buf.read_vec(4096 + 40, 2000), src[8000..10000]);

    // The sender migrates; same QPN and AH on the destination.
    migrate(&fabric, &mut va, &mut a);
    a.d.post_send(
        &mut qa,
        &[SendWr::ud_send(
            3,
            &[a.mr.sge(20000, 100)],
            ah,
            qb.qpn(),
            QKEY,
        )],
    )
    .unwrap();
    assert_eq!(
        keys(&poll_exact(&a.d, &mut a.cq, 1)),
        [(3, OK, abi::WC_OP_SEND)]
    );
    let rc = poll_exact(&b.d, &mut b.cq, 1);
    assert_eq!(r(&rc[0]), (302, OK, 140, qa.qpn(), abi::WC_F_GRH, 0));
    assert_eq!(b.buf.read_vec(2 * 4096 + 8, 16), a.d.gid().unwrap().raw);
    assert_eq!(b.buf.read_vec(2 * 4096 + 40, 100), src[20000..20100]);
    assert_no_events(&a, &b);
}

// ---------------------------------------------------------------------------------------------
// Events, SQD draining, retry budgets
// ---------------------------------------------------------------------------------------------

fn state_attr(state: u32) -> (abi::QpAttr, u32) {
    (
        abi::QpAttr {
            qp_state: state,
            ..Default::default()
        },
        abi::QP_ATTR_STATE,
    )
}

fn cq_event(cqn: u32) -> vrdma_abi::Event {
    vrdma_abi::Event {
        kind: abi::EV_CQ_COMP,
        handle: cqn,
        detail: 0,
    }
}

/// CQ arming and events: armed before and completed after a migration → exactly one event on
/// the destination; an event delivered before the migration but not yet harvested is harvested
/// once after it; an armed CQ without completions stays silent.
#[test]
fn cq_arming_and_events_survive_migration() {
    let (fabric, mut va, mut vb) = two_vms();
    let (mut a, mut b) = (guest(&va, 64 << 10), guest(&vb, 64 << 10));
    let (mut qa, mut qb) = (a.qp(), b.qp());
    connect(&a, &qa, &b, &qb);
    let recvs: Vec<[Sge; 1]> = (0..3u64).map(|i| [b.mr.sge(i * 256, 256)]).collect();
    let wrs: Vec<RecvWr> = (0..3u64)
        .map(|i| RecvWr::new(i, &recvs[i as usize]))
        .collect();
    b.d.post_recv(&mut qb, &wrs).unwrap();
    let cqn = b.cq.cqn();
    let send = |a: &mut Guest, qa: &mut Qp, id: u64| {
        a.d.post_send(qa, &[SendWr::send_inline(id, b"hello")])
            .unwrap();
        assert_eq!(
            keys(&poll_exact(&a.d, &mut a.cq, 1)),
            [(id, OK, abi::WC_OP_SEND)]
        );
    };

    // (1) Armed, then migrated (both), then a completion.
    b.d.req_notify_cq(&mut b.cq, false).unwrap();
    migrate(&fabric, &mut vb, &mut b);
    migrate(&fabric, &mut va, &mut a);
    assert!(events_until_quiet(&b.d, QUIET).is_empty());
    send(&mut a, &mut qa, 10);
    assert_eq!(events_until_quiet(&b.d, QUIET), [cq_event(cqn)]);
    assert_eq!(
        keys(&poll_exact(&b.d, &mut b.cq, 1)),
        [(0, OK, abi::WC_OP_RECV)]
    );

    // (2) Armed, completed (the event is in the event queue, unharvested), migrated.
    b.d.req_notify_cq(&mut b.cq, false).unwrap();
    send(&mut a, &mut qa, 11);
    migrate(&fabric, &mut vb, &mut b);
    assert_eq!(events_until_quiet(&b.d, QUIET), [cq_event(cqn)]);
    assert_eq!(
        keys(&poll_exact(&b.d, &mut b.cq, 1)),
        [(1, OK, abi::WC_OP_RECV)]
    );

    // (3) Not armed: a completion after a migration raises nothing.
    migrate(&fabric, &mut vb, &mut b);
    send(&mut a, &mut qa, 12);
    assert_eq!(
        keys(&poll_exact(&b.d, &mut b.cq, 1)),
        [(2, OK, abi::WC_OP_RECV)]
    );
    assert!(events_until_quiet(&b.d, QUIET).is_empty());
    assert_no_events(&a, &b);
}

/// A QP moved to SQD while an operation is outstanding (its peer is stopped, so the request is
/// held) is migrated while draining: EV_SQ_DRAINED comes exactly once from the destination when
/// the operation completes, a WQE posted in SQD waits, and back in RTS it runs.
#[test]
fn sqd_draining_survives_migration() {
    sqd_draining(false);
}

/// The same with the outstanding operation bouncing off RNR NAKs instead (no receive at the
/// peer): the QP keeps retrying in SQD, before and after the migration (`SQD_NO_MIGRATION=1`
/// runs it without the migration).
#[test]
fn sqd_draining_with_rnr_survives_migration() {
    sqd_draining(true);
}

fn sqd_draining(rnr: bool) {
    let (fabric, mut va, vb) = two_vms();
    let (mut a, mut b) = (guest(&va, 64 << 10), guest(&vb, 64 << 10));
    let (mut qa, mut qb) = (a.qp(), b.qp());
    connect(&a, &qa, &b, &qb);
    a.buf.fill_pattern(4);
    let post_recvs = |b: &mut Guest, qb: &mut Qp| {
        b.d.post_recv(
            qb,
            &[
                RecvWr::new(10, &[b.mr.sge(0, 1024)]),
                RecvWr::new(11, &[b.mr.sge(1024, 1024)]),
            ],
        )
        .unwrap()
    };
    if !rnr {
        post_recvs(&mut b, &mut qb);
        vb.device.quiesce().unwrap();
        vb.device.stop().unwrap();
    }
    a.d.post_send(&mut qa, &[SendWr::send(1, &[a.mr.sge(0, 300)])])
        .unwrap();
    assert_cq_empty(&a.d, &mut a.cq, Duration::from_millis(30));
    let (attr, mask) = state_attr(abi::QPS_SQD);
    a.d.modify_qp(&qa, &attr, mask).unwrap();
    assert!(events_until_quiet(&a.d, QUIET).is_empty());
    assert_eq!(a.d.query_qp(&qa).unwrap().sq_draining, 1);
    if std::env::var("SQD_NO_MIGRATION").is_err() {
        let t = migrate(&fabric, &mut va, &mut a);
        assert_eq!(t.outstanding_at_stop, 1);
        assert_eq!(a.d.query_qp(&qa).unwrap().sq_draining, 1);
    }
    // Posted in SQD: waits.
    a.d.post_send(&mut qa, &[SendWr::send(2, &[a.mr.sge(300, 200)])])
        .unwrap();
    if rnr {
        post_recvs(&mut b, &mut qb);
    } else {
        vb.abort_migration().unwrap();
    }
    assert_eq!(
        keys(&a.d.poll_cq_until(&mut a.cq, 1, LONG)),
        [(1, OK, abi::WC_OP_SEND)]
    );
    assert_eq!(
        events_until_quiet(&a.d, QUIET),
        [vrdma_abi::Event {
            kind: abi::EV_SQ_DRAINED,
            handle: qa.qpn(),
            detail: 0
        }]
    );
    assert_cq_empty(&a.d, &mut a.cq, QUIET);
    let q = a.d.query_qp(&qa).unwrap();
    assert_eq!((q.qp_state, q.sq_draining), (abi::QPS_SQD, 0));
    let (attr, mask) = state_attr(abi::QPS_RTS);
    a.d.modify_qp(&qa, &attr, mask).unwrap();
    assert_eq!(
        keys(&poll_exact(&a.d, &mut a.cq, 1)),
        [(2, OK, abi::WC_OP_SEND)]
    );
    assert_eq!(
        keys(&poll_exact(&b.d, &mut b.cq, 2)),
        [(10, OK, abi::WC_OP_RECV), (11, OK, abi::WC_OP_RECV)]
    );
    let src = pattern(4, 64 << 10);
    assert_eq!(b.buf.read_vec(0, 300), src[..300]);
    assert_eq!(b.buf.read_vec(1024, 200), src[300..500]);
    assert_no_events(&a, &b);
}

/// A requester retrying towards an unreachable peer is migrated between retries: the retry
/// budget carries over (counted by the fabric's unroutable packets: exactly one transmission
/// plus `retry_cnt` retries in all), and the operation fails exactly once with RETRY_EXC_ERR,
/// with one EV_QP_FATAL, on the destination.
#[test]
fn retry_budget_survives_migration() {
    let (fabric, mut va, _vb) = two_vms();
    let mut a = guest(&va, 64 << 10);
    let mut qa = a.qp();
    let nobody = DeviceConfig::gid_for_id(77);
    let mut p = a.d.rc_params(abi::make_handle(5, 1), nobody);
    p.timeout = 12; // 4.096 µs × 2^12 ≈ 17 ms
    p.retry_cnt = 3;
    a.d.connect_rc_with(&qa, &p).unwrap();
    let sent = || fabric.stats().unroutable;
    assert_eq!(sent(), 0);
    a.d.post_send(&mut qa, &[SendWr::send(1, &[a.mr.sge(0, 64)])])
        .unwrap();
    // The first transmission and two retries, then the migration.
    assert!(wait_until(LONG, || sent() >= 3));
    migrate(&fabric, &mut va, &mut a);
    let before = sent();
    assert!(
        before <= 4,
        "{before} transmissions before the migration finished"
    );
    let c = a.d.poll_cq_until(&mut a.cq, 1, LONG);
    assert_eq!(keys(&c), [(1, abi::WC_RETRY_EXC_ERR, abi::WC_OP_SEND)]);
    assert_cq_empty(&a.d, &mut a.cq, QUIET);
    assert_eq!(sent(), 4, "transmissions: 1 + retry_cnt");
    let ev = events_until_quiet(&a.d, QUIET);
    assert_eq!(
        ev.iter()
            .filter(|e| e.kind == abi::EV_QP_FATAL && e.handle == qa.qpn())
            .count(),
        1,
        "{ev:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Resources and handles on the destination
// ---------------------------------------------------------------------------------------------

#[track_caller]
fn assert_status(r: Result<(), vrdma_guest::Error>, status: u32) {
    match r {
        Err(e) => assert_eq!(e.status(), Some(status), "{e}"),
        Ok(()) => panic!("succeeded, expected status {status}"),
    }
}

/// Handles survive: a stale handle stays stale, the next handle is the one the source would
/// have chosen, reference counts are right (destroy order enforced), and everything can be
/// destroyed on the destination.
#[test]
fn handles_and_references_after_migration() {
    let (fabric, mut va, vb) = two_vms();
    let (mut a, b) = (guest(&va, 64 << 10), guest(&vb, 64 << 10));
    let (mut qa, qb) = (a.qp(), b.qp());
    connect(&a, &qa, &b, &qb);
    let stale = a.d.alloc_pd().unwrap();
    a.d.dealloc_pd(stale).unwrap();
    let t = migrate(&fabric, &mut va, &mut a);
    assert!(t.state_bytes > 0);
    assert_status(a.d.dealloc_pd(stale), abi::STATUS_BAD_HANDLE);
    // The freed slot is reused with the next key, as the source would have done.
    let again = a.d.alloc_pd().unwrap();
    assert_eq!(abi::handle_index(again.0), abi::handle_index(stale.0));
    assert_ne!(again.0, stale.0);
    a.d.dealloc_pd(again).unwrap();
    // References: the PD has an MR and a QP, the CQ a QP.
    assert_status(a.d.dealloc_pd(a.pd), abi::STATUS_BUSY);
    let mut cq = std::mem::replace(&mut a.cq, a.d.create_cq(16).unwrap());
    assert_status(a.d.destroy_cq(&mut cq), abi::STATUS_BUSY);
    migrate(&fabric, &mut va, &mut a);
    a.d.destroy_qp(&mut qa).unwrap();
    a.d.destroy_cq(&mut cq).unwrap();
    assert_status(a.d.dealloc_pd(a.pd), abi::STATUS_BUSY);
    a.d.dereg_mr(a.mr).unwrap();
    a.d.dealloc_pd(a.pd).unwrap();
    a.d.destroy_cq(&mut a.cq).unwrap();
}

/// A device reset on the destination flushes what was outstanding on the source: the
/// RNR-waiting SEND and the posted receives, one flush completion each.
#[test]
fn reset_after_migration_flushes_everything() {
    let (fabric, mut va, vb) = two_vms();
    let (mut a, b) = (guest(&va, 64 << 10), guest(&vb, 64 << 10));
    let (mut qa, qb) = (a.qp(), b.qp());
    connect(&a, &qa, &b, &qb);
    a.d.post_recv(
        &mut qa,
        &[
            RecvWr::new(20, &[a.mr.sge(0, 64)]),
            RecvWr::new(21, &[a.mr.sge(64, 64)]),
        ],
    )
    .unwrap();
    a.d.post_send(
        &mut qa,
        &[
            SendWr::send(1, &[a.mr.sge(4096, 100)]),
            SendWr::write(2, &[a.mr.sge(4096, 100)], b.mr.addr(0), b.mr.rkey),
        ],
    )
    .unwrap();
    assert_cq_empty(&a.d, &mut a.cq, Duration::from_millis(30));
    migrate(&fabric, &mut va, &mut a);
    a.d.reset_device().unwrap();
    let c = poll_exact(&a.d, &mut a.cq, 4);
    let mut sq = sq_keys(&c);
    let mut rq = rq_keys(&c);
    sq.sort();
    rq.sort();
    let flush = abi::WC_WR_FLUSH_ERR;
    assert_eq!(
        sq,
        [
            (1, flush, abi::WC_OP_SEND),
            (2, flush, abi::WC_OP_RDMA_WRITE)
        ]
    );
    assert_eq!(
        rq,
        [(20, flush, abi::WC_OP_RECV), (21, flush, abi::WC_OP_RECV)]
    );
    // The reset device comes back up on the destination.
    a.d.reinitialize().unwrap();
    let pd = a.d.alloc_pd().unwrap();
    a.d.dealloc_pd(pd).unwrap();
}

/// A QP in ERR is migrated as such: work posted on the destination is flushed (no event), and
/// its peer notices nothing.
#[test]
fn qp_in_err_stays_flushing_after_migration() {
    let (fabric, mut va, vb) = two_vms();
    let (mut a, b) = (guest(&va, 64 << 10), guest(&vb, 64 << 10));
    let (mut qa, qb) = (a.qp(), b.qp());
    connect(&a, &qa, &b, &qb);
    let (attr, mask) = state_attr(abi::QPS_ERR);
    a.d.modify_qp(&qa, &attr, mask).unwrap();
    assert_cq_empty(&a.d, &mut a.cq, QUIET);
    migrate(&fabric, &mut va, &mut a);
    assert_eq!(a.d.qp_state(&qa).unwrap(), abi::QPS_ERR);
    let s = [a.mr.sge(0, 64)];
    a.d.post_send(
        &mut qa,
        &[
            SendWr::send(1, &s),
            SendWr::write(2, &s, b.mr.iova, b.mr.rkey),
        ],
    )
    .unwrap();
    a.d.post_recv(&mut qa, &[RecvWr::new(60, &s)]).unwrap();
    let v = poll_exact(&a.d, &mut a.cq, 3);
    let flush = abi::WC_WR_FLUSH_ERR;
    assert_eq!(
        sq_keys(&v),
        [
            (1, flush, abi::WC_OP_SEND),
            (2, flush, abi::WC_OP_RDMA_WRITE)
        ]
    );
    assert_eq!(rq_keys(&v), [(60, flush, abi::WC_OP_RECV)]);
    assert_no_events(&a, &b);
    assert_eq!(b.buf.to_vec(), vec![0; 64 << 10]);
}
