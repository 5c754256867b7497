//! `path=fabric`: the soft fabric driven directly, without the device layer.
//!
//! A [`BareEndpoint`] is what is left of a device when the guest ABI is taken away: the same
//! transport engine ([`SoftBackend`]: requester, responder, completer, ACK coalescing, timers) on
//! a fabric [`Port`], behind one lock, serving a tiny [`DeviceOps`] instead of the device core. There
//! are no rings, no WQE fetching or validation, no CQE writing, no doorbells and no virtio
//! transport: work requests are handed to the engine as already-validated
//! [`vrdma_device::backend::SendWr`]s, and completions land in a [`VecDeque`]. The memory is a
//! [`GuestMemoryMmap`] with one flat memory region covering all of it (iova = guest-physical
//! address, rkey [`MR_KEY`]).
//!
//! The lock discipline is the device's: post under the endpoint's lock, release it, then drive
//! the ports the engine sent packets to ([`SoftFabric::run`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vm_memory::{Bytes, GuestAddress};
use vrdma_abi::{self as abi, Gid};
use vrdma_device::backend::{Backend, Completion, DeviceOps, QpInfo, SendWr, TakeRecv};
use vrdma_device::mr::{Seg, SegList};
use vrdma_device::soft::engine::SoftBackend;
use vrdma_device::soft::{Endpoint, Port, SoftFabric, Work};
use vrdma_device::GuestMemoryMmap;

/// The rkey of every bare endpoint's single memory region.
pub const MR_KEY: u32 = 0x0000_0101;

/// The device core's stand-in: memory with one flat MR, a QP table and a completion queue.
pub struct BareOps {
    mem: Arc<GuestMemoryMmap>,
    mem_len: u64,
    /// QPs by handle index (QPNs are `index << 8 | 1`, index ≥ 1).
    qps: Vec<Option<QpInfo>>,
    /// Completions: `(qpn, completion)`, send and receive alike.
    cq: VecDeque<(u32, Completion)>,
    /// QPs the engine failed: `(qpn, vendor error)`.
    failed: Vec<(u32, u32)>,
}

impl BareOps {
    fn slot(qpn: u32) -> usize {
        abi::handle_index(qpn) as usize
    }

    fn info_mut(&mut self, qpn: u32) -> Option<&mut QpInfo> {
        self.qps
            .get_mut(Self::slot(qpn))?
            .as_mut()
            .filter(|q| q.qpn == qpn)
    }
}

impl DeviceOps for BareOps {
    fn memory(&self) -> &Arc<GuestMemoryMmap> {
        &self.mem
    }

    fn qp_info(&self, qpn: u32) -> Option<QpInfo> {
        self.qps
            .get(Self::slot(qpn))
            .copied()
            .flatten()
            .filter(|q| q.qpn == qpn)
    }

    fn resolve_remote(
        &self,
        qpn: u32,
        rkey: u32,
        addr: u64,
        len: u64,
        _access: u32,
    ) -> Option<SegList> {
        self.qp_info(qpn)?;
        let mut out = SegList::new();
        if len == 0 {
            return Some(out);
        }
        let end = addr.checked_add(len)?;
        if rkey != MR_KEY || end > self.mem_len {
            return None;
        }
        out.push(Seg { gpa: addr, len });
        Some(out)
    }

    fn take_recv(&mut self, _qpn: u32) -> TakeRecv {
        // No receive queues: the fabric path measures RDMA WRITE only.
        TakeRecv::Empty
    }

    fn complete_send(&mut self, qpn: u32, c: Completion, signaled: bool) {
        if signaled || c.status != abi::WC_SUCCESS {
            self.cq.push_back((qpn, c));
        }
    }

    fn complete_sends_quiet(&mut self, _qpn: u32, _n: usize) {}

    fn complete_recv(&mut self, qpn: u32, c: Completion) {
        self.cq.push_back((qpn, c));
    }

    fn qp_error(&mut self, qpn: u32, vendor_err: u32) {
        if let Some(q) = self.info_mut(qpn) {
            q.state = abi::QPS_ERR;
        }
        self.failed.push((qpn, vendor_err));
    }
}

struct Inner {
    backend: SoftBackend,
    ops: BareOps,
}

/// A fabric endpoint without the device layer (see the module documentation).
pub struct BareEndpoint {
    port: Arc<Port>,
    mem: Arc<GuestMemoryMmap>,
    inner: Mutex<Inner>,
    /// Completions queued in `inner.ops.cq`: lets a poller skip the lock when there are none,
    /// as a CQ poller reads one owner byte.
    cq_len: AtomicUsize,
}

impl std::fmt::Debug for BareEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BareEndpoint")
            .field("gid", &self.port.gid())
            .finish()
    }
}

impl Endpoint for BareEndpoint {
    fn process_fabric(&self) -> Work {
        let mut g = self.lock();
        let Inner { backend, ops } = &mut *g;
        backend.process(ops);
        self.publish_cq_len(ops.cq.len());
        backend.take_work()
    }

    fn with_engine(&self, f: &mut dyn FnMut(&mut SoftBackend, &mut dyn DeviceOps)) -> Option<Work> {
        let mut g = match self.inner.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        let Inner { backend, ops } = &mut *g;
        f(backend, ops);
        self.publish_cq_len(ops.cq.len());
        Some(backend.take_work())
    }

    fn hot_line(&self) -> *const u8 {
        (&self.inner as *const Mutex<Inner>).cast()
    }
}

impl Drop for BareEndpoint {
    fn drop(&mut self) {
        self.port.fabric().detach(&self.port);
    }
}

impl BareEndpoint {
    /// An endpoint with `mem_len` bytes of memory (rounded up to 4 KiB), all of it one MR with
    /// rkey [`MR_KEY`], attached to `fabric` under `gid`.
    pub fn new(fabric: &Arc<SoftFabric>, gid: Gid, mem_len: u64) -> Result<Arc<Self>, String> {
        let mem_len = mem_len.max(4096).next_multiple_of(4096);
        let mem = Arc::new(
            crate::guest_memory(&[(GuestAddress(0), mem_len as usize)])
                .map_err(|e| format!("endpoint memory: {e}"))?,
        );
        let ep = Arc::new_cyclic(|weak| {
            let port = Port::new(fabric.clone(), gid, weak.clone());
            BareEndpoint {
                port: port.clone(),
                mem: mem.clone(),
                inner: Mutex::new(Inner {
                    backend: SoftBackend::new(port),
                    ops: BareOps {
                        mem: mem.clone(),
                        mem_len,
                        qps: Vec::new(),
                        cq: VecDeque::new(),
                        failed: Vec::new(),
                    },
                }),
                cq_len: AtomicUsize::new(0),
            }
        });
        fabric.attach(ep.port.clone()).map_err(|e| e.to_string())?;
        Ok(ep)
    }

    /// Publishes the number of queued completions, writing only when it changed: the count is
    /// read on every poll and peers' threads run this endpoint's engine on the direct path.
    fn publish_cq_len(&self, n: usize) {
        if self.cq_len.load(Ordering::Relaxed) != n {
            self.cq_len.store(n, Ordering::Release);
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The endpoint's GID.
    pub fn gid(&self) -> Gid {
        self.port.gid()
    }

    /// The endpoint's memory (iova = guest-physical address).
    pub fn memory(&self) -> &Arc<GuestMemoryMmap> {
        &self.mem
    }

    /// Reads `out.len()` bytes at `addr`.
    pub fn read(&self, addr: u64, out: &mut [u8]) {
        self.mem
            .read_slice(out, GuestAddress(addr))
            .expect("read inside endpoint memory");
    }

    /// Writes `data` at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) {
        self.mem
            .write_slice(data, GuestAddress(addr))
            .expect("write inside endpoint memory");
    }

    /// Creates an RC QP (in RESET) and returns its QPN.
    pub fn create_rc_qp(&self) -> u32 {
        let mut g = self.lock();
        let Inner { backend, ops } = &mut *g;
        let index = ops.qps.len().max(1);
        let qpn = ((index as u32) << 8) | 1;
        ops.qps.resize(index + 1, None);
        let info = QpInfo {
            qpn,
            qp_type: abi::QPT_RC,
            state: abi::QPS_RESET,
            // What the device core reports for an RC QP without a path MTU yet.
            mtu: abi::mtu_bytes(0).max(256),
            ..Default::default()
        };
        ops.qps[index] = Some(info);
        backend.create_qp(&info);
        qpn
    }

    /// Takes a fresh RC QP through INIT, RTR and RTS, connected to `dest_qpn` at `dest_gid`,
    /// with the attributes the guest driver's `connect_rc` gives a device QP (PSNs 0, MTU 4096,
    /// timeout 14, retry_cnt 7, rnr_retry 7, min_rnr_timer 1, 16 READ/atomics in flight).
    pub fn connect_rc(&self, qpn: u32, dest_gid: Gid, dest_qpn: u32) -> Result<(), String> {
        let mut g = self.lock();
        let Inner { backend, ops } = &mut *g;
        let mut info = ops.qp_info(qpn).ok_or("no such QP")?;
        if info.state != abi::QPS_RESET {
            return Err("QP is not in RESET".into());
        }
        let steps: [&dyn Fn(&mut QpInfo); 3] = [
            &|i| i.state = abi::QPS_INIT,
            &|i| {
                i.state = abi::QPS_RTR;
                i.dest_gid = dest_gid;
                i.dest_qpn = dest_qpn;
                i.mtu = abi::mtu_bytes(abi::MTU_4096);
                i.rq_psn = 0;
                i.min_rnr_timer = 1;
            },
            &|i| {
                i.state = abi::QPS_RTS;
                i.sq_psn = 0;
                i.timeout = 14;
                i.retry_cnt = 7;
                i.rnr_retry = 7;
                i.max_rd_atomic = 16;
            },
        ];
        for step in steps {
            let prev = info.state;
            step(&mut info);
            if let Some(q) = ops.info_mut(qpn) {
                *q = info;
            }
            backend.modify_qp(ops, &info, prev);
        }
        let work = backend.take_work();
        drop(g);
        self.port.fabric().run(work);
        Ok(())
    }

    /// Hands `wrs` to the engine for QP `qpn` under the endpoint's lock (as one doorbell would),
    /// then drives the fabric with the lock released.
    pub fn post_send(&self, qpn: u32, wrs: impl IntoIterator<Item = SendWr>) {
        let work = {
            let mut g = self.lock();
            let Inner { backend, ops } = &mut *g;
            // As the device's SQ fetch: the peer's lock is prefetched first, RC WRs are
            // appended in place and sent once per batch.
            backend.prefetch_peer(qpn);
            let mut batched = false;
            for wr in wrs {
                match backend.send_slot(qpn) {
                    Some(mut slot) => {
                        *slot.wr() = wr;
                        batched = true;
                        if slot.commit() {
                            backend.pump_posted(ops, qpn);
                            batched = false;
                        }
                    }
                    None => backend.post_send(ops, qpn, wr),
                }
            }
            if batched {
                backend.pump_posted(ops, qpn);
            }
            self.publish_cq_len(ops.cq.len());
            backend.take_work()
        };
        self.port.fabric().run(work);
    }

    /// Moves every queued completion to `out` (cleared first); returns how many. Takes the lock
    /// only when there is something to take.
    pub fn poll(&self, out: &mut Vec<(u32, Completion)>) -> usize {
        out.clear();
        if self.cq_len.load(Ordering::Acquire) == 0 {
            return 0;
        }
        let mut g = self.lock();
        out.extend(g.ops.cq.drain(..));
        self.cq_len.store(0, Ordering::Release);
        out.len()
    }

    /// QPs the engine failed so far, with their vendor errors.
    pub fn failures(&self) -> Vec<(u32, u32)> {
        self.lock().ops.failed.clone()
    }
}

/// A WRITE of `len` bytes at `local` of the poster's memory to `remote_addr` of the peer's.
pub fn write_wr(
    wr_id: u64,
    local: u64,
    len: u64,
    remote_addr: u64,
    signaled: bool,
    inline: Option<Vec<u8>>,
) -> SendWr {
    let mut segs = SegList::new();
    if inline.is_none() && len > 0 {
        segs.push(Seg { gpa: local, len });
    }
    SendWr {
        wr_id,
        opcode: abi::WR_RDMA_WRITE,
        flags: if signaled { abi::SEND_F_SIGNALED } else { 0 },
        signaled,
        local: segs,
        inline,
        len,
        remote_addr,
        rkey: MR_KEY,
        ..Default::default()
    }
}

/// Two bare endpoints on a new fabric, each with `mem_len` bytes, connected by `qps` RC QP
/// pairs. Returns the fabric, the endpoints and the QPNs (`a[i]` is connected to `b[i]`).
#[allow(clippy::type_complexity)]
pub fn bare_pair(
    qps: u32,
    mem_len: u64,
) -> Result<
    (
        Arc<SoftFabric>,
        Arc<BareEndpoint>,
        Arc<BareEndpoint>,
        Vec<u32>,
        Vec<u32>,
    ),
    String,
> {
    let fabric = SoftFabric::new();
    let gid = vrdma_device::DeviceConfig::gid_for_id;
    let a = BareEndpoint::new(&fabric, gid(1), mem_len)?;
    let b = BareEndpoint::new(&fabric, gid(2), mem_len)?;
    let qa: Vec<u32> = (0..qps).map(|_| a.create_rc_qp()).collect();
    let qb: Vec<u32> = (0..qps).map(|_| b.create_rc_qp()).collect();
    for (&x, &y) in qa.iter().zip(&qb) {
        a.connect_rc(x, b.gid(), y)?;
        b.connect_rc(y, a.gid(), x)?;
    }
    Ok((fabric, a, b, qa, qb))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_endpoints_write_and_complete() {
        let (_f, a, b, qa, _qb) = bare_pair(2, 8192).unwrap();
        a.write(0, b"hello fabric");
        a.post_send(qa[1], [write_wr(7, 0, 12, 4096, true, None)]);
        let mut out = Vec::new();
        assert_eq!(a.poll(&mut out), 1);
        assert_eq!(out[0].0, qa[1]);
        assert_eq!(
            (out[0].1.wr_id, out[0].1.status, out[0].1.opcode),
            (7, abi::WC_SUCCESS, abi::WC_OP_RDMA_WRITE)
        );
        let mut got = [0u8; 12];
        b.read(4096, &mut got);
        assert_eq!(&got, b"hello fabric");
        // Inline, unsignaled: data arrives, no completion.
        a.post_send(
            qa[0],
            [write_wr(8, 0, 3, 100, false, Some(b"xyz".to_vec()))],
        );
        assert_eq!(a.poll(&mut out), 0);
        let mut got = [0u8; 3];
        b.read(100, &mut got);
        assert_eq!(&got, b"xyz");
        // A message of many MTU-sized packets, copied whole.
        let (_f2, c, d, qc, _qd) = bare_pair(1, 4 << 20).unwrap();
        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        c.write(0, &data);
        c.post_send(qc[0], [write_wr(1, 0, 1 << 20, 2 << 20, true, None)]);
        assert_eq!(c.poll(&mut out), 1);
        assert_eq!(out[0].1.status, abi::WC_SUCCESS);
        let mut got = vec![0u8; 1 << 20];
        d.read(2 << 20, &mut got);
        assert!(got == data);
        // Out of bounds: remote access error, the QP fails.
        a.post_send(qa[0], [write_wr(9, 0, 16, 8190, false, None)]);
        assert_eq!(a.poll(&mut out), 1);
        assert_eq!(out[0].1.status, abi::WC_REM_ACCESS_ERR);
        assert_eq!(a.failures().len(), 1);
    }
}
