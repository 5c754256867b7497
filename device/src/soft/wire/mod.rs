//! RoCEv2 over UDP: the soft fabric across processes and hosts.
//!
//! A [`WireGateway`] gives one local address (a GID derived from an IP address) a RoCEv2
//! presence on the network: it owns a UDP socket bound to `addr:4791` and a few source-port
//! sockets. Devices in this process whose GID is the gateway's send every packet whose
//! destination is not an in-process device through it; datagrams arriving on the socket are
//! parsed, ICRC-checked, reassembled into whole messages and delivered to the device like an
//! in-process peer's packets. The engine ([`super::engine`]) is the same on both paths: PSNs,
//! ACK coalescing, NAKs, retransmission and RNR handling do not know which path a peer is on.
//!
//! One receive thread per gateway (not per device or QP) waits in `poll(2)` and sleeps when
//! there is no traffic. Sends happen in the sender's context (the device entry that produced
//! the packet), with no hand-off.
//!
//! Migration across processes adds two control messages (a manufacturer-specific opcode, see
//! [`CONTROL_OPCODE`]): *pause* tells peers a GID's device is stopped, so their ACK timers wait
//! instead of spending retries; *resume* tells them it runs again — possibly at a new address,
//! which they adopt as the GID's location. Peers then go back N from their oldest unacknowledged
//! PSN when their retry timer fires; the responder's saved PSN state drops the duplicates.

mod reassembly;
mod segment;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::thread::JoinHandle;

use thiserror::Error;
use vrdma_abi::Gid;
use vrdma_roce::{Bth, Headers, IpPair};

pub use reassembly::Dropped;
use reassembly::Reassembler;

use super::packet::Packet;
use super::{SoftFabric, Work};

/// The opcode of vrdma's control messages (first of the manufacturer-specific range).
pub const CONTROL_OPCODE: u8 = vrdma_roce::opcode::VENDOR_FIRST;
const CONTROL_MAGIC: &[u8; 4] = b"VRDM";
const CONTROL_PAUSE: u8 = 1;
const CONTROL_RESUME: u8 = 2;

/// Default bytes of partial messages a gateway holds.
pub const DEFAULT_REASSEMBLY_LIMIT: usize = 64 << 20;

/// The GID of an IP address: IPv4-mapped (`::ffff:a.b.c.d`) for IPv4, the address itself for
/// IPv6, as RoCEv2 GID tables do.
pub fn gid_from_ip(ip: IpAddr) -> Gid {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    Gid { raw: v6.octets() }
}

/// The IP address of a GID (the inverse of [`gid_from_ip`]).
pub fn ip_from_gid(gid: &Gid) -> IpAddr {
    let v6 = Ipv6Addr::from(gid.raw);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// Fault injection for tests: each datagram sent is independently lost, duplicated or held back
/// and sent after the next one, with these probabilities.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Faults {
    /// Probability of dropping a datagram.
    pub loss: f64,
    /// Probability of swapping a datagram with the next one.
    pub reorder: f64,
    /// Probability of sending a datagram twice.
    pub duplicate: f64,
    /// Seed of the generator (runs are reproducible).
    pub seed: u64,
}

/// How a gateway attaches to the network.
#[derive(Clone, Debug)]
pub struct WireConfig {
    /// Local IP address (must be a specific address, not unspecified: it is part of the ICRC
    /// and of the GID).
    pub addr: IpAddr,
    /// UDP port to receive on (RoCEv2: 4791).
    pub port: u16,
    /// UDP port of peers (RoCEv2: 4791).
    pub peer_port: u16,
    /// The GID this gateway serves; default: [`gid_from_ip`] of `addr`. A device restored in
    /// another place keeps its GID while its address changes.
    pub gid: Option<Gid>,
    /// Source-port sockets for per-QP UDP source-port entropy (0: send from the receive
    /// socket).
    pub entropy_ports: u16,
    /// Bytes of partial messages held at most.
    pub reassembly_limit: usize,
    /// Check the ICRC of received datagrams.
    pub check_icrc: bool,
    /// Test-only fault injection on the send side.
    pub faults: Option<Faults>,
}

impl WireConfig {
    /// RoCEv2 defaults for `addr`.
    pub fn new(addr: IpAddr) -> Self {
        Self {
            addr,
            port: vrdma_roce::ROCE_PORT,
            peer_port: vrdma_roce::ROCE_PORT,
            gid: None,
            entropy_ports: 4,
            reassembly_limit: DEFAULT_REASSEMBLY_LIMIT,
            check_icrc: true,
            faults: None,
        }
    }
}

/// Errors of attaching a gateway.
#[derive(Debug, Error)]
pub enum WireError {
    /// The address is unspecified or multicast.
    #[error("{0} cannot be a gateway address")]
    BadAddress(IpAddr),
    /// Another gateway of this fabric serves the GID.
    #[error("a gateway for GID {0:02x?} exists")]
    GidInUse([u8; 16]),
    /// Socket setup failed.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// The fabric is being dropped.
    #[error("the fabric is gone")]
    Gone,
}

/// Counters of a gateway.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WireStats {
    /// Datagrams sent (after fault injection).
    pub tx_datagrams: u64,
    /// Datagrams received.
    pub rx_datagrams: u64,
    /// Received datagrams that did not parse.
    pub rx_malformed: u64,
    /// Received datagrams with a bad ICRC.
    pub rx_bad_icrc: u64,
    /// Segments dropped by reassembly (gaps, duplicates, bad sizes, budget).
    pub rx_reassembly_drops: u64,
    /// Messages delivered to devices.
    pub rx_messages: u64,
    /// Send errors (e.g. no route, unreachable).
    pub tx_errors: u64,
    /// Datagrams dropped, duplicated, reordered by fault injection.
    pub faults: (u64, u64, u64),
}

#[derive(Default)]
struct Counters {
    tx: AtomicU64,
    rx: AtomicU64,
    malformed: AtomicU64,
    icrc: AtomicU64,
    reasm: AtomicU64,
    msgs: AtomicU64,
    tx_err: AtomicU64,
    lost: AtomicU64,
    dup: AtomicU64,
    reord: AtomicU64,
}

struct FaultState {
    cfg: Faults,
    rng: u64,
    held: Option<(Vec<u8>, SocketAddr, usize)>,
}

impl FaultState {
    fn next(&mut self) -> f64 {
        // xorshift64*: reproducible, good enough for fault dice.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

struct TxState {
    buf: Vec<u8>,
    faults: Option<FaultState>,
    /// The last destination recorded in `seen` (skips the set for runs to one peer).
    last_peer: Option<SocketAddr>,
}

struct Sockets {
    /// Bound to `addr:port`: receives (the receive thread has its own handle) and sends
    /// control messages.
    rx: UdpSocket,
    /// Source-port sockets and their ports.
    tx: Vec<(UdpSocket, u16)>,
}

impl Sockets {
    /// The socket for QP `qpn` (per-QP source-port entropy), its port and index.
    fn for_qp(&self, qpn: u32, rx_port: u16) -> (&UdpSocket, u16, usize) {
        if self.tx.is_empty() {
            return (&self.rx, rx_port, usize::MAX);
        }
        let i = (qpn.wrapping_mul(0x9e37_79b9) >> 16) as usize % self.tx.len();
        let (s, p) = &self.tx[i];
        (s, *p, i)
    }

    fn by_index(&self, i: usize) -> &UdpSocket {
        self.tx.get(i).map_or(&self.rx, |(s, _)| s)
    }
}

/// A local address's RoCEv2 presence (see the module docs).
pub struct WireGateway {
    cfg: WireConfig,
    gid: Gid,
    /// The sockets; `None` once detached (closed, so the address is free again).
    socks: RwLock<Option<Sockets>>,
    tx: Mutex<TxState>,
    /// GIDs whose device moved to another address (learned from resume messages).
    locations: RwLock<HashMap<Gid, SocketAddr>>,
    by_addr: RwLock<HashMap<IpAddr, Gid>>,
    /// Remote GIDs whose device is stopped for migration.
    paused: RwLock<HashSet<Gid>>,
    /// Addresses this gateway exchanged traffic with (told about pause and resume).
    seen: Mutex<HashSet<SocketAddr>>,
    stats: Counters,
    stop: AtomicBool,
    /// Wakes the receive thread out of `poll` when the gateway closes.
    stop_evt: vmm_sys_util::eventfd::EventFd,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for WireGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WireGateway")
            .field("addr", &self.cfg.addr)
            .field("port", &self.cfg.port)
            .finish()
    }
}

fn set_int_opt(sock: &UdpSocket, level: i32, name: i32, value: i32) -> std::io::Result<()> {
    // SAFETY: the descriptor is an open socket owned by `sock` for the duration of the call;
    // the option value is a c_int that lives on the stack and whose exact size is passed.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Waits until `sock` is readable or `stop` is signalled; returns whether `sock` is readable.
fn wait_readable(sock: &UdpSocket, stop: &vmm_sys_util::eventfd::EventFd) -> bool {
    let mut pfd = [
        libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: `pfd` is an array of two valid pollfds on the stack and we pass its length.
    let n = unsafe { libc::poll(pfd.as_mut_ptr(), pfd.len() as libc::nfds_t, -1) };
    n > 0 && pfd[0].revents & libc::POLLIN != 0
}

/// A UDP socket bound to `addr` and set up as the gateway's are: IPv4 "don't fragment" with IP
/// id 0 (so the ICRC covers a predictable header) and large buffers. Benchmarks use it for the
/// raw-UDP floor, so both paths get the same socket.
pub fn udp_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let s = UdpSocket::bind(addr)?;
    // IPv4: DF set and IP id 0 for an unconnected socket, so the ICRC covers a header we can
    // predict. Large buffers: a 1 MiB message is hundreds of datagrams.
    if addr.is_ipv4() {
        set_int_opt(
            &s,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DO,
        )?;
    }
    // The FORCE variants pass net.core.[rw]mem_max (they need CAP_NET_ADMIN); without them
    // the kernel caps the buffers (often at 208 KiB) and drops bursts, which go-back-N then
    // has to repair.
    for (force, plain, size) in [
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, 4 << 20),
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, 16 << 20),
    ] {
        if set_int_opt(&s, libc::SOL_SOCKET, force, size).is_err() {
            let _ = set_int_opt(&s, libc::SOL_SOCKET, plain, size);
        }
    }
    Ok(s)
}

impl WireGateway {
    fn open(cfg: WireConfig) -> Result<Self, WireError> {
        if cfg.addr.is_unspecified() || cfg.addr.is_multicast() {
            return Err(WireError::BadAddress(cfg.addr));
        }
        let rx_sock = udp_socket(SocketAddr::new(cfg.addr, cfg.port))?;
        rx_sock.set_nonblocking(true)?;
        let mut tx_socks = Vec::new();
        for _ in 0..cfg.entropy_ports {
            let s = udp_socket(SocketAddr::new(cfg.addr, 0))?;
            let port = s.local_addr()?.port();
            tx_socks.push((s, port));
        }
        let faults = cfg.faults.map(|f| FaultState {
            cfg: f,
            rng: f.seed | 1,
            held: None,
        });
        Ok(Self {
            gid: cfg.gid.unwrap_or_else(|| gid_from_ip(cfg.addr)),
            socks: RwLock::new(Some(Sockets {
                rx: rx_sock,
                tx: tx_socks,
            })),
            tx: Mutex::new(TxState {
                buf: Vec::with_capacity(4200),
                faults,
                last_peer: None,
            }),
            locations: RwLock::new(HashMap::new()),
            by_addr: RwLock::new(HashMap::new()),
            paused: RwLock::new(HashSet::new()),
            seen: Mutex::new(HashSet::new()),
            stats: Counters::default(),
            stop: AtomicBool::new(false),
            stop_evt: vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)?,
            thread: Mutex::new(None),
            cfg,
        })
    }

    /// The GID this gateway serves.
    pub fn gid(&self) -> Gid {
        self.gid
    }

    /// The local address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.cfg.addr, self.cfg.port)
    }

    /// Counters.
    pub fn stats(&self) -> WireStats {
        let s = &self.stats;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        WireStats {
            tx_datagrams: l(&s.tx),
            rx_datagrams: l(&s.rx),
            rx_malformed: l(&s.malformed),
            rx_bad_icrc: l(&s.icrc),
            rx_reassembly_drops: l(&s.reasm),
            rx_messages: l(&s.msgs),
            tx_errors: l(&s.tx_err),
            faults: (l(&s.lost), l(&s.dup), l(&s.reord)),
        }
    }

    /// Where `gid` is reached: a location learned from a resume message, or its own address.
    fn location(&self, gid: &Gid) -> SocketAddr {
        if let Some(a) = self
            .locations
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(gid)
        {
            return *a;
        }
        SocketAddr::new(ip_from_gid(gid), self.cfg.peer_port)
    }

    /// The GID of a datagram's source address.
    fn gid_of(&self, ip: IpAddr) -> Gid {
        self.by_addr
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ip)
            .copied()
            .unwrap_or_else(|| gid_from_ip(ip))
    }

    /// Whether the device of remote `gid` said it is stopped for migration.
    pub fn is_paused(&self, gid: &Gid) -> bool {
        self.paused
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(gid)
    }

    /// Sends a packet as RoCEv2 datagrams.
    pub(crate) fn transmit(&self, pkt: &Packet) {
        let dst = self.location(&pkt.dst);
        if dst.is_ipv4() != self.cfg.addr.is_ipv4() {
            self.stats.tx_err.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let guard = self.socks.read().unwrap_or_else(|e| e.into_inner());
        let Some(socks) = guard.as_ref() else {
            self.stats.tx_err.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let (sock, sport, sidx) = socks.for_qp(pkt.src_qpn, self.cfg.port);
        let ips = IpPair {
            src: self.cfg.addr,
            dst: dst.ip(),
        };
        let route = segment::Route {
            ips: &ips,
            sport,
            dport: dst.port(),
        };
        let mut tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let TxState {
            buf,
            faults,
            last_peer,
        } = &mut *tx;
        let new_peer = *last_peer != Some(dst);
        *last_peer = Some(dst);
        let stats = &self.stats;
        let mut emit = |d: &[u8]| {
            let send = |s: &UdpSocket, d: &[u8], to: SocketAddr| match s.send_to(d, to) {
                Ok(_) => stats.tx.fetch_add(1, Ordering::Relaxed),
                Err(_) => stats.tx_err.fetch_add(1, Ordering::Relaxed),
            };
            let Some(f) = faults.as_mut() else {
                send(sock, d, dst);
                return;
            };
            let r = f.next();
            let c = f.cfg;
            if r < c.loss {
                stats.lost.fetch_add(1, Ordering::Relaxed);
                return;
            }
            if r < c.loss + c.reorder && f.held.is_none() {
                stats.reord.fetch_add(1, Ordering::Relaxed);
                f.held = Some((d.to_vec(), dst, sidx));
                return;
            }
            send(sock, d, dst);
            if r >= c.loss + c.reorder && r < c.loss + c.reorder + c.duplicate {
                stats.dup.fetch_add(1, Ordering::Relaxed);
                send(sock, d, dst);
            }
            if let Some((h, to, i)) = f.held.take() {
                send(socks.by_index(i), &h, to);
            }
        };
        segment::encode(pkt, &route, buf, &mut emit);
        drop(tx);
        drop(guard);
        if new_peer {
            self.note_peer(dst);
        }
    }

    fn note_peer(&self, a: SocketAddr) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() < 4096 {
            seen.insert(a);
        }
    }

    /// Tells peers that the device of this gateway's GID is stopped (`pause`) or runs again.
    /// `extra` names peers this gateway may not have talked to yet (a restored device's).
    pub(crate) fn announce(&self, pause: bool, extra: &[Gid]) {
        let mut to: HashSet<SocketAddr> =
            self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
        to.extend(extra.iter().map(|g| self.location(g)));
        let mut payload = Vec::with_capacity(21);
        payload.extend_from_slice(CONTROL_MAGIC);
        payload.push(if pause { CONTROL_PAUSE } else { CONTROL_RESUME });
        payload.extend_from_slice(&self.gid.raw);
        for dst in to {
            if dst.is_ipv4() != self.cfg.addr.is_ipv4() {
                continue;
            }
            let hdr = Headers::new(Bth::new(CONTROL_OPCODE, 0, 0));
            let mut d = Vec::with_capacity(64);
            if vrdma_roce::write_headers(&hdr, payload.len(), &mut d).is_err() {
                return;
            }
            d.extend_from_slice(&payload);
            d.resize(d.len() + (4 - payload.len() % 4) % 4, 0);
            let ips = IpPair {
                src: self.cfg.addr,
                dst: dst.ip(),
            };
            let crc = vrdma_roce::icrc(&ips, self.cfg.port, dst.port(), &[d.as_slice()]);
            d.extend_from_slice(&vrdma_roce::icrc_bytes(crc));
            let socks = self.socks.read().unwrap_or_else(|e| e.into_inner());
            let sent = socks
                .as_ref()
                .is_some_and(|s| s.rx.send_to(&d, dst).is_ok());
            if !sent {
                self.stats.tx_err.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn control(&self, from: SocketAddr, payload: &[u8], fabric: &SoftFabric) {
        if payload.len() < 21 || &payload[..4] != CONTROL_MAGIC {
            self.stats.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut raw = [0u8; 16];
        raw.copy_from_slice(&payload[5..21]);
        let gid = Gid { raw };
        match payload[4] {
            CONTROL_PAUSE => {
                let mut p = self.paused.write().unwrap_or_else(|e| e.into_inner());
                if p.len() < 4096 {
                    p.insert(gid);
                }
            }
            CONTROL_RESUME => {
                self.paused
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&gid);
                let at = SocketAddr::new(from.ip(), self.cfg.peer_port);
                let mut loc = self.locations.write().unwrap_or_else(|e| e.into_inner());
                let mut rev = self.by_addr.write().unwrap_or_else(|e| e.into_inner());
                if ip_from_gid(&gid) == from.ip() {
                    loc.remove(&gid);
                    rev.remove(&from.ip());
                } else if loc.len() < 4096 {
                    loc.insert(gid, at);
                    rev.insert(from.ip(), gid);
                }
                drop((loc, rev));
                self.note_peer(at);
                fabric.peer_resumed(gid);
            }
            _ => {
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Handles one received datagram; a finished message goes to the fabric.
    fn receive(
        &self,
        reasm: &mut Reassembler,
        from: SocketAddr,
        data: &[u8],
        fabric: &SoftFabric,
        work: &mut Work,
    ) {
        self.stats.rx.fetch_add(1, Ordering::Relaxed);
        let parsed = match vrdma_roce::parse(data) {
            Ok(p) => p,
            Err(_) => {
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        if self.cfg.check_icrc {
            let ips = IpPair {
                src: from.ip(),
                dst: self.cfg.addr,
            };
            if !vrdma_roce::icrc_check(&ips, from.port(), self.cfg.port, data) {
                self.stats.icrc.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        if parsed.hdr.bth.opcode == CONTROL_OPCODE {
            self.control(from, parsed.payload, fabric);
            return;
        }
        let src = self.gid_of(from.ip());
        match reasm.push(from.ip(), src, self.gid, &parsed) {
            Ok(Some(pkt)) => {
                self.stats.msgs.fetch_add(1, Ordering::Relaxed);
                fabric.route(pkt, work);
            }
            Ok(None) => {}
            Err(_) => {
                self.stats.reasm.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn rx_loop(self: Arc<Self>, sock: UdpSocket, fabric: Weak<SoftFabric>) {
        let mut reasm = Reassembler::new(self.cfg.reassembly_limit);
        let mut buf = vec![0u8; 65536];
        let mut peers = HashSet::new();
        while !self.stop.load(Ordering::Acquire) {
            if !wait_readable(&sock, &self.stop_evt) {
                continue;
            }
            let Some(f) = fabric.upgrade() else {
                return;
            };
            let mut work = Work::default();
            // Drain what is there (bounded), then run the devices once: ACKs coalesce over
            // the batch like over an in-process inbox drain.
            for _ in 0..256 {
                match sock.recv_from(&mut buf) {
                    Ok((n, from)) => {
                        if peers.insert(from.ip()) && peers.len() < 4096 {
                            self.note_peer(SocketAddr::new(from.ip(), self.cfg.peer_port));
                        }
                        self.receive(&mut reasm, from, &buf[..n], &f, &mut work);
                    }
                    Err(_) => break,
                }
            }
            f.run(work);
        }
    }

    /// Stops the receive thread and closes the sockets.
    fn close(&self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.stop_evt.write(1);
        let h = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = h {
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
        *self.socks.write().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl SoftFabric {
    /// Gives the GID of `cfg.addr` (or `cfg.gid`) a RoCEv2 presence: binds the sockets and
    /// starts the gateway's receive thread. Devices with that GID then reach every GID that is
    /// not in this process over the network.
    pub fn attach_wire(&self, cfg: WireConfig) -> Result<Arc<WireGateway>, WireError> {
        let gw = Arc::new(WireGateway::open(cfg)?);
        let fabric = self.self_ref.clone();
        {
            let mut wires = self.wires.write().unwrap_or_else(|e| e.into_inner());
            if wires.iter().any(|w| w.gid == gw.gid) {
                return Err(WireError::GidInUse(gw.gid.raw));
            }
            wires.push(gw.clone());
        }
        self.epoch.fetch_add(1, Ordering::AcqRel);
        let g = gw.clone();
        let sock = gw
            .socks
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .ok_or(WireError::Gone)?
            .rx
            .try_clone()?;
        let h = std::thread::Builder::new()
            .name("vrdma-wire-rx".into())
            .spawn(move || g.rx_loop(sock, fabric))?;
        *gw.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(h);
        Ok(gw)
    }

    /// Stops `gw` and closes its sockets (once the last reference goes).
    pub fn detach_wire(&self, gw: &Arc<WireGateway>) {
        self.wires
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|w| !Arc::ptr_eq(w, gw));
        self.epoch.fetch_add(1, Ordering::AcqRel);
        gw.close();
    }

    /// The gateway serving `gid`.
    pub(crate) fn wire_for(&self, gid: &Gid) -> Option<Arc<WireGateway>> {
        self.wires
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|w| w.gid == *gid)
            .cloned()
    }

    pub(crate) fn wire_paused(&self, gid: &Gid) -> bool {
        self.wires
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|w| w.is_paused(gid))
    }

    pub(crate) fn stop_wires(&self) {
        let wires = std::mem::take(&mut *self.wires.write().unwrap_or_else(|e| e.into_inner()));
        for w in wires {
            w.close();
        }
    }

    /// Tells the wire peers of `gid`'s gateway (if it has one) that its device paused or
    /// resumed; `extra` adds peers the gateway may not know yet.
    pub(crate) fn announce(&self, gid: &Gid, pause: bool, extra: &[Gid]) {
        if let Some(w) = self.wire_for(gid) {
            w.announce(pause, extra);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn gid_ip_round_trip() {
        let v4 = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 1));
        let g = gid_from_ip(v4);
        assert_eq!(&g.raw[10..], &[0xff, 0xff, 10, 77, 0, 1]);
        assert_eq!(ip_from_gid(&g), v4);
        let v6: IpAddr = "fd00::5".parse().unwrap();
        assert_eq!(ip_from_gid(&gid_from_ip(v6)), v6);
    }
}
