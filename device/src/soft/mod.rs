//! The soft fabric: the embedded backend that needs no RDMA hardware.
//!
//! Devices in one process attach to a shared [`SoftFabric`] through a [`Port`] named by their
//! GID. The transport engine ([`engine::SoftBackend`], shaped like Linux rxe: requester,
//! responder, completer) keeps explicit protocol state per QP — PSNs, ACKs, NAKs, retry and RNR
//! timers — and exchanges [`packet::Packet`]s through the fabric, so that a later RoCEv2 wire can
//! carry the same packets across processes and hosts.
//!
//! In-process, a packet's payload is a reference to the sender's guest memory; the receiver
//! copies straight from it into its own guest memory (one copy, no bounce buffer). On the direct
//! path the same copy happens in the sender's thread.
//!
//! Concurrency: a device handles packets only under its own lock, and never *waits* for another
//! device's lock while holding its own. Senders push packets into the destination port's inbox
//! (in PSN order, under the sender's lock) and collect the destination in a [`Work`] list; after
//! releasing their lock they run that list ([`SoftFabric::run`]), draining each destination in
//! turn. One timer thread per fabric serves every device's retry and RNR timers; it sleeps when
//! no timer is armed.
//!
//! The direct path: when a QP has nothing in flight and its peer is in this process, the sender
//! `try_lock`s the peer ([`Endpoint::with_engine`]) and runs the peer's responder on its requests
//! at once, then completes the responses with its own completer — the same engine code, PSNs and
//! order as with packets, minus the inboxes, the ACK packets, the ACK timer and the hand-over of
//! both devices' state between two threads. A peer that is busy (its lock taken), stopped for
//! migration or across a wire gets packets as before; `try_lock` never waits, so no lock order
//! exists to violate. [`FabricStats::direct`] counts these requests.

pub mod engine;
pub mod packet;
pub mod wire;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, Weak};
use std::thread::JoinHandle;
use std::time::Instant;

use thiserror::Error;
use vrdma_abi::Gid;

use packet::Packet;

/// Errors of fabric membership.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FabricError {
    /// Another device already uses this GID.
    #[error("GID {0:02x?} is already attached")]
    GidInUse([u8; 16]),
    /// The port belongs to another fabric.
    #[error("the port belongs to another fabric")]
    OtherFabric,
    /// The fabric is being dropped.
    #[error("the fabric is gone")]
    Gone,
}

/// What a [`Port`] delivers to: a device, or anything else that drives a
/// [`engine::SoftBackend`] (benchmarks use a bare endpoint without the device layer to measure
/// the fabric alone).
///
/// The fabric calls [`Endpoint::process_fabric`] with no endpoint lock held, after packets were
/// pushed into the endpoint's port inbox or one of its timers expired. The endpoint handles them
/// (typically: lock itself, run its backend's `process`) and returns the ports its processing
/// sent packets to, which the fabric drives next.
pub trait Endpoint: Send + Sync {
    /// Handles packets queued for this endpoint and timers that expired.
    fn process_fabric(&self) -> Work;

    /// The direct path ([`engine::SoftBackend`]'s synchronous delivery to a peer in this
    /// process): if the endpoint's lock is free right now (`try_lock`: the caller holds its
    /// own endpoint's lock) and the endpoint runs, calls `f` with its engine and its
    /// [`DeviceOps`](crate::backend::DeviceOps), finishes the entry as after
    /// [`Endpoint::process_fabric`] (completions, events, interrupts) and returns the ports its
    /// processing sent packets to. `None`: `f` was not called; the caller sends packets.
    fn with_engine(
        &self,
        f: &mut dyn FnMut(&mut engine::SoftBackend, &mut dyn crate::backend::DeviceOps),
    ) -> Option<Work> {
        let _ = f;
        None
    }

    /// The address of the line the direct path takes first (the endpoint's lock), for a
    /// prefetch; null if none.
    fn hot_line(&self) -> *const u8 {
        std::ptr::null()
    }
}

/// Where a packet goes: an in-process port or a wire gateway.
#[derive(Clone)]
enum Target {
    Port(Arc<Port>),
    Wire(Arc<wire::WireGateway>),
}

/// A sender's memory of its last destination.
#[derive(Default)]
pub struct RouteCache(Option<(Gid, u64, Target)>);

/// Ports with pending inbound work, to be driven once the caller released its device lock.
#[derive(Default, Debug)]
pub struct Work {
    ports: Vec<Arc<Port>>,
}

impl Work {
    /// Adds a port (once).
    pub fn add(&mut self, p: &Arc<Port>) {
        if !self.ports.iter().any(|q| Arc::ptr_eq(q, p)) {
            self.ports.push(p.clone());
        }
    }

    /// Merges another list.
    pub fn extend(&mut self, other: Work) {
        for p in other.ports {
            self.add(&p);
        }
    }

    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.ports.is_empty()
    }
}

#[derive(Default)]
struct Timers {
    heap: BinaryHeap<Reverse<(Instant, u64)>>,
    shutdown: bool,
}

struct TimerShared {
    timers: Mutex<Timers>,
    cv: Condvar,
}

/// Counters of the fabric.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FabricStats {
    /// Packets delivered into a port's inbox.
    pub delivered: u64,
    /// Packets dropped because no port had the destination GID.
    pub unroutable: u64,
    /// Requests handed to an in-process peer's responder at once (the engine's direct path)
    /// instead of being delivered as packets.
    pub direct: u64,
}

/// An in-process fabric connecting devices by GID.
pub struct SoftFabric {
    ports: RwLock<HashMap<Gid, Arc<Port>>>,
    by_id: RwLock<HashMap<u64, Weak<Port>>>,
    next_id: Mutex<u64>,
    timer: Arc<TimerShared>,
    timer_thread: Mutex<Option<JoinHandle<()>>>,
    delivered: AtomicU64,
    unroutable: AtomicU64,
    /// Direct requests of ports that detached (the attached ones count their own).
    direct_detached: AtomicU64,
    /// Bumped on every attach and detach; invalidates route caches.
    epoch: AtomicU64,
    /// RoCEv2 gateways of local GIDs ([`wire`]).
    wires: RwLock<Vec<Arc<wire::WireGateway>>>,
    self_ref: Weak<SoftFabric>,
}

impl std::fmt::Debug for SoftFabric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftFabric")
            .field("ports", &self.ports.read().map(|p| p.len()).unwrap_or(0))
            .finish()
    }
}

impl SoftFabric {
    /// A new, empty fabric.
    pub fn new() -> Arc<Self> {
        Arc::new_cyclic(|w| Self {
            ports: RwLock::new(HashMap::new()),
            by_id: RwLock::new(HashMap::new()),
            next_id: Mutex::new(1),
            timer: Arc::new(TimerShared {
                timers: Mutex::new(Timers::default()),
                cv: Condvar::new(),
            }),
            timer_thread: Mutex::new(None),
            delivered: AtomicU64::new(0),
            unroutable: AtomicU64::new(0),
            direct_detached: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            wires: RwLock::new(Vec::new()),
            self_ref: w.clone(),
        })
    }

    /// Counters.
    pub fn stats(&self) -> FabricStats {
        let attached: u64 = self
            .ports
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|p| p.direct.load(Ordering::Relaxed))
            .sum();
        FabricStats {
            delivered: self.delivered.load(Ordering::Relaxed),
            unroutable: self.unroutable.load(Ordering::Relaxed),
            direct: attached + self.direct_detached.load(Ordering::Relaxed),
        }
    }

    /// Makes `port` reachable under its GID (and its timers servable). Devices attach
    /// themselves; other endpoints attach the port they created with [`Port::new`] and detach it
    /// with [`SoftFabric::detach`] when they go away.
    pub fn attach(&self, port: Arc<Port>) -> Result<(), FabricError> {
        let mut ports = self.ports.write().unwrap_or_else(|e| e.into_inner());
        if ports.contains_key(&port.gid) {
            return Err(FabricError::GidInUse(port.gid.raw));
        }
        ports.insert(port.gid, port.clone());
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.by_id
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(port.id, Arc::downgrade(&port));
        Ok(())
    }

    /// The migration step that re-targets peers: `new` (a restored endpoint) takes the place of
    /// whichever port is attached under its GID. From now on every packet for the GID reaches
    /// `new`: route caches are invalidated (epoch), packets held in the old port's inbox move
    /// to `new` in order, and late packets that still reach the old port are forwarded. Peers
    /// keep their QPNs, PSNs and operations; nothing is lost or duplicated.
    ///
    /// Across processes (RoCEv2) the same step is a message to every peer naming the GID's new
    /// location; in-process the port table is that location.
    pub fn take_over(&self, new: &Arc<Port>) -> Result<(), FabricError> {
        if !Arc::ptr_eq(
            &new.fabric,
            &self.self_ref.upgrade().ok_or(FabricError::Gone)?,
        ) {
            return Err(FabricError::OtherFabric);
        }
        // All under the port table's write lock, held packets moved before anything can reach
        // the new port: a sender looking the GID up waits for the lock, one with a cached route
        // pushes to the old port and is forwarded behind the held packets. Order is kept.
        let mut ports = self.ports.write().unwrap_or_else(|e| e.into_inner());
        let old = ports.insert(new.gid, new.clone());
        if let Some(old) = old.as_ref().filter(|o| o.id != new.id) {
            let mut inbox = old.inbox.lock().unwrap_or_else(|e| e.into_inner());
            *old.moved_to.lock().unwrap_or_else(|e| e.into_inner()) = Some(new.clone());
            let held = std::mem::take(&mut *inbox);
            new.inbox
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(held);
        }
        self.epoch.fetch_add(1, Ordering::AcqRel);
        let mut by_id = self.by_id.write().unwrap_or_else(|e| e.into_inner());
        by_id.insert(new.id, Arc::downgrade(new));
        if let Some(o) = old.filter(|o| o.id != new.id) {
            by_id.remove(&o.id);
        }
        Ok(())
    }

    /// A remote device resumed after a migration: every local endpoint resends what its QPs
    /// towards `gid` have not had acknowledged (go-back-N now, not at the next ACK timeout).
    pub(crate) fn peer_resumed(&self, gid: Gid) {
        let ports: Vec<Arc<Port>> = self
            .ports
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let mut work = Work::default();
        for p in ports {
            let mut r = p.resumed.lock().unwrap_or_else(|e| e.into_inner());
            if r.len() < 64 && !r.contains(&gid) {
                r.push(gid);
            }
            drop(r);
            p.has_resumed.store(true, Ordering::Release);
            work.add(&p);
        }
        self.run(work);
    }

    /// Whether the device of `gid` is paused (stopped for migration): an in-process port, or
    /// a remote device that said so through a wire gateway.
    pub fn is_paused(&self, gid: &Gid) -> bool {
        let local = self
            .ports
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(gid)
            .map(|p| p.paused.load(Ordering::Acquire));
        match local {
            Some(p) => p,
            None => self.wire_paused(gid),
        }
    }

    /// Removes `port` (if it is the one attached under its GID).
    pub fn detach(&self, port: &Port) {
        let mut ports = self.ports.write().unwrap_or_else(|e| e.into_inner());
        if ports.get(&port.gid).is_some_and(|p| p.id == port.id) {
            ports.remove(&port.gid);
            self.direct_detached
                .fetch_add(port.direct.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.by_id
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&port.id);
    }

    fn alloc_id(&self) -> u64 {
        let mut n = self.next_id.lock().unwrap_or_else(|e| e.into_inner());
        *n += 1;
        *n
    }

    /// Where `pkt` goes: the in-process port owning `pkt.dst`, else the wire gateway of the
    /// sender's GID.
    fn target(&self, pkt: &Packet) -> Option<Target> {
        let port = self
            .ports
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&pkt.dst)
            .cloned();
        match port {
            Some(p) => Some(Target::Port(p)),
            None => self.wire_for(&pkt.src).map(Target::Wire),
        }
    }

    fn deliver(&self, pkt: Packet, target: Option<&Target>, work: &mut Work) {
        match target {
            Some(Target::Port(p)) => {
                self.delivered.fetch_add(1, Ordering::Relaxed);
                let got = p.push(pkt);
                work.add(&got);
            }
            Some(Target::Wire(w)) => {
                self.delivered.fetch_add(1, Ordering::Relaxed);
                w.transmit(&pkt);
            }
            None => {
                self.unroutable.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Routes a packet to the port owning `pkt.dst` (recorded in `work`) or onto the wire.
    /// Unroutable packets are dropped, as a network would (the sender's retry timer notices).
    pub(crate) fn route(&self, pkt: Packet, work: &mut Work) {
        let t = self.target(&pkt);
        self.deliver(pkt, t.as_ref(), work);
    }

    /// Routes `pkts` (emptied) in order, as [`SoftFabric::route`] would one by one (remembering the last destination: consecutive
    /// packets to the same GID skip the table lookup until a port or gateway attaches or detaches), with
    /// one inbox lock per run of consecutive packets to the same destination.
    pub(crate) fn route_all(
        &self,
        pkts: &mut VecDeque<Packet>,
        cache: &mut RouteCache,
        work: &mut Work,
    ) {
        let epoch = self.epoch.load(Ordering::Acquire);
        // The common case, every packet to one in-process port: the buffer itself is handed
        // over (no per-packet move) when that port's inbox is empty.
        if let (Some((gid, e, Target::Port(p))), Some(first)) = (&cache.0, pkts.front()) {
            if *gid == first.dst && *e == epoch && pkts.iter().all(|q| q.dst == *gid) {
                let p = p.clone();
                let (got, n) = p.push_deque(pkts);
                self.delivered.fetch_add(n, Ordering::Relaxed);
                work.add(&got);
                return;
            }
        }
        let mut it = pkts.drain(..).peekable();
        while let Some(first) = it.next() {
            let dst = first.dst;
            let target = match &cache.0 {
                Some((gid, e, t)) if *gid == dst && *e == epoch => Some(t.clone()),
                _ => {
                    let t = self.target(&first);
                    if let Some(t) = &t {
                        cache.0 = Some((dst, epoch, t.clone()));
                    }
                    t
                }
            };
            let mut run =
                std::iter::once(first).chain(std::iter::from_fn(|| it.next_if(|p| p.dst == dst)));
            match target {
                Some(Target::Port(p)) => {
                    let (got, n) = p.push_all(&mut run);
                    self.delivered.fetch_add(n, Ordering::Relaxed);
                    work.add(&got);
                }
                Some(Target::Wire(w)) => {
                    for pkt in run {
                        self.delivered.fetch_add(1, Ordering::Relaxed);
                        w.transmit(&pkt);
                    }
                }
                None => {
                    self.unroutable
                        .fetch_add(run.count() as u64, Ordering::Relaxed);
                }
            }
        }
    }

    /// Drives every port in `work` (and the ports their processing reaches) until no packet is
    /// pending. Must be called with no device lock held.
    pub fn run(&self, mut work: Work) {
        while let Some(port) = work.ports.pop() {
            if let Some(dev) = port.dev.upgrade() {
                let more = dev.process_fabric();
                work.extend(more);
            }
        }
    }

    /// The endpoint attached under `gid` in this process (not across a wire, not paused), for
    /// the engine's direct path. Consults and refreshes the sender's route cache.
    pub(crate) fn local_endpoint(
        &self,
        gid: &Gid,
        cache: &mut RouteCache,
    ) -> Option<Arc<dyn Endpoint>> {
        let epoch = self.epoch.load(Ordering::Acquire);
        let fresh = matches!(&cache.0, Some((g, e, _)) if g == gid && *e == epoch);
        if !fresh {
            let port = self
                .ports
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(gid)
                .cloned()?;
            cache.0 = Some((*gid, epoch, Target::Port(port)));
        }
        match &cache.0 {
            Some((_, _, Target::Port(p))) if !p.paused.load(Ordering::Acquire) => p.dev.upgrade(),
            _ => None,
        }
    }

    /// Asks the timer thread to process `port` at `deadline`.
    pub(crate) fn schedule(&self, port: &Port, deadline: Instant) {
        let mut t = self.timer.timers.lock().unwrap_or_else(|e| e.into_inner());
        t.heap.push(Reverse((deadline, port.id)));
        drop(t);
        self.timer.cv.notify_one();
        self.ensure_timer_thread();
    }

    fn ensure_timer_thread(&self) {
        let mut th = self.timer_thread.lock().unwrap_or_else(|e| e.into_inner());
        if th.is_some() {
            return;
        }
        let shared = self.timer.clone();
        let fabric = self.self_ref.clone();
        *th = std::thread::Builder::new()
            .name("vrdma-fabric-timer".into())
            .spawn(move || timer_loop(shared, fabric))
            .ok();
    }
}

fn timer_loop(shared: Arc<TimerShared>, fabric: Weak<SoftFabric>) {
    let mut t = shared.timers.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if t.shutdown {
            return;
        }
        let now = Instant::now();
        let mut due = Vec::new();
        while let Some(Reverse((at, id))) = t.heap.peek().copied() {
            if at > now {
                break;
            }
            t.heap.pop();
            if !due.contains(&id) {
                due.push(id);
            }
        }
        if !due.is_empty() {
            drop(t);
            if let Some(f) = fabric.upgrade() {
                let mut work = Work::default();
                for id in due {
                    let port = f
                        .by_id
                        .read()
                        .unwrap_or_else(|e| e.into_inner())
                        .get(&id)
                        .and_then(Weak::upgrade);
                    if let Some(p) = port {
                        work.add(&p);
                    }
                }
                f.run(work);
            }
            t = shared.timers.lock().unwrap_or_else(|e| e.into_inner());
            continue;
        }
        t = match t.heap.peek().copied() {
            Some(Reverse((at, _))) => {
                let wait = at.saturating_duration_since(now);
                shared
                    .cv
                    .wait_timeout(t, wait)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0)
            }
            // Nothing armed: sleep until someone schedules a timer (no CPU when idle).
            None => shared.cv.wait(t).unwrap_or_else(|e| e.into_inner()),
        };
    }
}

impl Drop for SoftFabric {
    fn drop(&mut self) {
        self.stop_wires();
        self.timer
            .timers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .shutdown = true;
        self.timer.cv.notify_all();
        if let Some(h) = self
            .timer_thread
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            // The last reference may be dropped by the timer thread itself.
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }
}

/// An endpoint's (normally a device's) attachment to the fabric.
pub struct Port {
    fabric: Arc<SoftFabric>,
    gid: Gid,
    id: u64,
    dev: Weak<dyn Endpoint>,
    inbox: Mutex<VecDeque<Packet>>,
    /// Set when a restored endpoint took over this port's GID: packets that still reach this
    /// port (a sender that looked the route up just before) are forwarded there.
    moved_to: Mutex<Option<Arc<Port>>>,
    paused: AtomicBool,
    /// Remote GIDs whose device resumed after a migration (a wire resume message): this
    /// endpoint's QPs towards them resend what is unacknowledged at once.
    resumed: Mutex<Vec<Gid>>,
    has_resumed: AtomicBool,
    /// Requests this port's endpoint handed to peers directly ([`FabricStats::direct`]); on
    /// a line of its own, written by the sender only.
    direct: crossbeam_utils::CachePadded<AtomicU64>,
}

impl std::fmt::Debug for Port {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Port").field("gid", &self.gid).finish()
    }
}

impl Port {
    /// A port of `fabric` with address `gid`, delivering to `dev`. It is not reachable until
    /// [`SoftFabric::attach`]ed.
    pub fn new<E: Endpoint + 'static>(
        fabric: Arc<SoftFabric>,
        gid: Gid,
        dev: Weak<E>,
    ) -> Arc<Self> {
        let dev: Weak<dyn Endpoint> = dev;
        let id = fabric.alloc_id();
        Arc::new(Self {
            fabric,
            gid,
            id,
            dev,
            inbox: Mutex::new(VecDeque::new()),
            moved_to: Mutex::new(None),
            paused: AtomicBool::new(false),
            resumed: Mutex::new(Vec::new()),
            has_resumed: AtomicBool::new(false),
            direct: Default::default(),
        })
    }

    /// Marks the endpoint paused (stopped for migration) or running again. Peers whose ACK
    /// timer expires while their destination is paused wait instead of spending a retry: the
    /// in-process form of MigrOS's "paused" connection state.
    pub fn set_paused(&self, paused: bool) {
        let was = self.paused.swap(paused, Ordering::AcqRel);
        if was != paused {
            // Peers on a wire learn it through the gateway's pause/resume messages.
            self.fabric.announce(&self.gid, paused, &[]);
        }
    }

    /// Whether another port took this one's place ([`SoftFabric::take_over`]).
    pub fn is_moved(&self) -> bool {
        self.moved_to
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// The fabric.
    pub fn fabric(&self) -> &Arc<SoftFabric> {
        &self.fabric
    }

    /// This port's GID.
    pub fn gid(&self) -> Gid {
        self.gid
    }

    /// Queues a packet; returns the port that now holds it (this one, or its successor).
    fn push(self: &Arc<Self>, pkt: Packet) -> Arc<Port> {
        self.push_all(&mut std::iter::once(pkt)).0
    }

    /// Queues every packet of `pkts` (emptied) in order under one inbox lock, swapping the
    /// buffers when the inbox is empty; returns the port that now holds them and how many.
    fn push_deque(self: &Arc<Self>, pkts: &mut VecDeque<Packet>) -> (Arc<Port>, u64) {
        let n = pkts.len() as u64;
        let mut inbox = self.inbox.lock().unwrap_or_else(|e| e.into_inner());
        let next = self
            .moved_to
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match next {
            None => {
                if inbox.is_empty() {
                    std::mem::swap(&mut *inbox, pkts);
                } else {
                    inbox.extend(pkts.drain(..));
                }
                (self.clone(), n)
            }
            Some(next) => {
                drop(inbox);
                next.push_deque(pkts)
            }
        }
    }

    /// Queues packets in order under one inbox lock; returns the port that now holds them
    /// (this one, or its successor) and how many there were.
    fn push_all(self: &Arc<Self>, pkts: &mut dyn Iterator<Item = Packet>) -> (Arc<Port>, u64) {
        let mut inbox = self.inbox.lock().unwrap_or_else(|e| e.into_inner());
        let next = self
            .moved_to
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match next {
            None => {
                let before = inbox.len();
                inbox.extend(pkts);
                let n = (inbox.len() - before) as u64;
                (self.clone(), n)
            }
            Some(next) => {
                drop(inbox);
                next.push_all(pkts)
            }
        }
    }

    /// Counts requests handed to a peer directly.
    pub(crate) fn count_direct(&self, n: u64) {
        self.direct.fetch_add(n, Ordering::Relaxed);
    }

    /// Takes the remote GIDs that resumed since the last call (cheap when there are none).
    pub(crate) fn take_resumed(&self) -> Vec<Gid> {
        if !self.has_resumed.swap(false, Ordering::AcqRel) {
            return Vec::new();
        }
        std::mem::take(&mut *self.resumed.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Moves every pending inbound packet to the back of `out`.
    pub(crate) fn drain_into(&self, out: &mut VecDeque<Packet>) {
        let mut inbox = self.inbox.lock().unwrap_or_else(|e| e.into_inner());
        if out.is_empty() {
            std::mem::swap(&mut *inbox, out);
        } else {
            out.extend(inbox.drain(..));
        }
    }

    /// Drops pending inbound packets (device reset).
    pub(crate) fn clear(&self) {
        self.inbox.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}
