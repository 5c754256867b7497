//! Small generic helpers for the integration tests: probing a driver on a harness guest, and
//! polling completions and events with timeouts and exact counts.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use vm_memory::GuestAddress;
use vrdma_abi as abi;
use vrdma_guest::{Buffer, Cq, Cqe, Driver, DriverOptions, Event, GuestAlloc, Layout, Mr, Pd};
use vrdma_tests::{Vm, ALLOC_BASE};

/// Upper bound for anything that is expected to happen.
pub const LONG: Duration = Duration::from_secs(5);
/// How long to watch for something that must *not* happen.
pub const QUIET: Duration = Duration::from_millis(30);

/// Probes the guest driver on `vm` with 200 MiB of guest memory for it to allocate from.
pub fn driver(vm: &Vm) -> Driver {
    Driver::probe(
        vm.port(),
        vm.mem.clone(),
        GuestAlloc::new(GuestAddress(ALLOC_BASE), 200 << 20),
    )
    .expect("driver probe")
}

/// One guest's verbs objects: what its kernel would hold in guest memory. Whoever owns it plays
/// the guest's vCPU.
pub struct Guest {
    pub d: Driver,
    pub pd: Pd,
    pub buf: Buffer,
    pub mr: Mr,
    pub cq: Cq,
}

/// A guest on `vm`: the driver probed with `opts` and allocating from `[ALLOC_BASE, ram)`, a
/// PD, a `buf_len` buffer with an all-access MR, and a CQ of `cq_depth`.
pub fn guest_with(vm: &Vm, ram: u64, buf_len: u64, cq_depth: u32, opts: DriverOptions) -> Guest {
    let d = Driver::probe_with(
        vm.port(),
        vm.mem.clone(),
        GuestAlloc::new(GuestAddress(ALLOC_BASE), ram - ALLOC_BASE),
        opts,
    )
    .expect("driver probe");
    let pd = d.alloc_pd().unwrap();
    let buf = d.alloc_buffer(buf_len, Layout::Discontiguous).unwrap();
    let mr = d.reg_mr(pd, &buf, abi::ACCESS_ALL).unwrap();
    let cq = d.create_cq(cq_depth).unwrap();
    Guest { d, pd, buf, mr, cq }
}

/// Polls exactly `n` CQEs (waiting up to [`LONG`]), then checks that no further CQE arrives
/// within [`QUIET`].
#[track_caller]
pub fn poll_exact(d: &Driver, cq: &mut Cq, n: usize) -> Vec<Cqe> {
    let v = d.poll_cq_until(cq, n, LONG);
    assert_eq!(v.len(), n, "expected {n} CQE(s), got {}: {v:#?}", v.len());
    assert_cq_empty(d, cq, QUIET);
    v
}

/// Asserts that no CQE arrives within `wait`.
#[track_caller]
pub fn assert_cq_empty(d: &Driver, cq: &mut Cq, wait: Duration) {
    let extra = d.poll_cq_until(cq, 1, wait);
    assert!(extra.is_empty(), "unexpected CQE: {extra:#?}");
}

/// Every event that arrives until none has arrived for `quiet` (at most 1000).
pub fn events_until_quiet(d: &Driver, quiet: Duration) -> Vec<Event> {
    let mut v = Vec::new();
    while v.len() < 1000 {
        match d.wait_event(quiet) {
            Some(e) => v.push(e),
            None => break,
        }
    }
    v
}

/// Waits until `cond` holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// `(wr_id, status, opcode)` of a CQE: what identifies a completion.
pub fn key(c: &Cqe) -> (u64, u8, u8) {
    (c.wr_id, c.status, c.opcode)
}

/// Keys of the send-queue completions (opcode below `WC_OP_RECV`), in CQ order.
pub fn sq_keys(v: &[Cqe]) -> Vec<(u64, u8, u8)> {
    v.iter()
        .filter(|c| c.opcode < vrdma_abi::WC_OP_RECV)
        .map(key)
        .collect()
}

/// Keys of the receive-queue completions (opcode `WC_OP_RECV` or above), in CQ order.
pub fn rq_keys(v: &[Cqe]) -> Vec<(u64, u8, u8)> {
    v.iter()
        .filter(|c| c.opcode >= vrdma_abi::WC_OP_RECV)
        .map(key)
        .collect()
}
