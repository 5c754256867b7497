//! `vrdma-peer`: the host side of the rdma_rxe interop suite. One vrdma device, driven by the
//! Rust test guest driver, plays one side of `ibv_rc_pingpong`, `ib_write_lat`, `ib_read_lat`,
//! `ib_send_lat` or `ib_atomic_lat` against the real tool, as server or as client, speaking the
//! tool's out-of-band QP exchange over TCP ([`oob`]) and its data-path semantics:
//!
//! * `rc_pingpong`: both sides keep `rx_depth` receives posted; the client sends first; each side
//!   posts its next SEND once both its previous SEND and a RECV completed (`pending` logic of
//!   rc_pingpong.c). `iters` sends and receives per side.
//! * `write_lat`: each side RDMA-WRITEs `size` bytes (last byte = its send counter) into the
//!   peer's advertised buffer and busy-polls the last byte of its own; the *server* writes first
//!   (run_iter_lat_write). Every write is signaled and reaped.
//! * `read_lat` / `atomic_lat`: the client posts one READ / FETCH_AND_ADD at a time and polls
//!   for its completion; the server only waits for the closing handshake (run_iter_lat).
//! * `send_lat`: both sides keep receives posted; the client sends first; one send in
//!   `cq_mod` (100) and the last are signaled and waited for (run_iter_lat_send).
//!
//! Latencies follow perftest: half round trips for the ping-pong tests, full round trips for
//! READ and atomics; rc_pingpong reports µs per iteration (one round trip).

pub mod oob;

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::GuestAddress;
use vrdma_abi::{self as abi, Cqe, Gid, ACCESS_ALL, WC_SUCCESS};
use vrdma_device::soft::SoftFabric;
use vrdma_device::DeviceConfig;
use vrdma_guest::{
    wc_status_name, Buffer, Cq, Driver, GuestAlloc, Layout, Mr, Qp, QpInitAttr, RecvWr, SendWr,
};

use crate::perf::LatStats;
use crate::{Vm, ALLOC_BASE, GUEST_RAM};
use oob::{Oob, PerftestDest, PingpongDest};

/// The tool whose peer we play.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Test {
    /// `ibv_rc_pingpong`.
    RcPingpong,
    /// `ib_write_lat`.
    WriteLat,
    /// `ib_read_lat`.
    ReadLat,
    /// `ib_send_lat`.
    SendLat,
    /// `ib_atomic_lat`.
    AtomicLat,
}

impl Test {
    /// Name in reports (`rc_pingpong`, `write_lat`, …).
    pub fn name(self) -> &'static str {
        match self {
            Test::RcPingpong => "rc_pingpong",
            Test::WriteLat => "write_lat",
            Test::ReadLat => "read_lat",
            Test::SendLat => "send_lat",
            Test::AtomicLat => "atomic_lat",
        }
    }
}

/// Options of one run (the tools' command-line options).
#[derive(Clone, Debug)]
pub struct PeerOpts {
    /// Which tool.
    pub test: Test,
    /// `Some(server address)` for the client role, `None` for the server.
    pub server: Option<IpAddr>,
    /// TCP port of the out-of-band exchange (18515).
    pub port: u16,
    /// Message size (`-s`); the tools' defaults: 4096 for rc_pingpong, 2 for perftest
    /// (atomics are always 8).
    pub size: u64,
    /// Iterations (`-n`).
    pub iters: usize,
    /// Path MTU in bytes (`-m`); perftest takes the smaller of both sides'.
    pub mtu: u32,
    /// rc_pingpong's `rx_depth` (`-r`).
    pub rx_depth: u32,
    /// Limit of every stage: connecting/accepting, each handshake, the data phase.
    pub timeout: Duration,
    /// Busy-poll only (lower latency; burns a core). Default: spin, then yield.
    pub busy_poll: bool,
    /// Local ACK timeout exponent of our QP (4.096 µs × 2^t; the tools use 14 ≈ 67 ms).
    pub qp_timeout: u8,
}

impl PeerOpts {
    /// Defaults of the real tool for `test` (server role).
    pub fn new(test: Test) -> Self {
        Self {
            test,
            server: None,
            port: 18515,
            size: match test {
                Test::RcPingpong => 4096,
                Test::AtomicLat => 8,
                _ => 2,
            },
            iters: 1000,
            mtu: 1024,
            rx_depth: 500,
            timeout: Duration::from_secs(60),
            busy_poll: false,
            qp_timeout: 14,
        }
    }

    /// `client` or `server`.
    pub fn role(&self) -> &'static str {
        if self.server.is_some() {
            "client"
        } else {
            "server"
        }
    }
}

/// What one run did.
#[derive(Clone, Debug)]
pub struct PeerReport {
    /// Tool name.
    pub test: &'static str,
    /// `client` or `server`.
    pub role: &'static str,
    /// Message size.
    pub size: u64,
    /// Iterations.
    pub iters: usize,
    /// Path MTU used, bytes.
    pub mtu: u32,
    /// Latency statistics of the side that measures (None for the READ/atomic server).
    pub stats: Option<LatStats>,
    /// rc_pingpong: µs per iteration (total time / iterations).
    pub usec_per_iter: Option<f64>,
    /// Data-phase wall time.
    pub secs: f64,
    /// Our QPN and the peer's QPN and GID.
    pub local_qpn: u32,
    /// Peer QPN.
    pub remote_qpn: u32,
    /// Peer GID.
    pub remote_gid: Gid,
    /// Completions reaped (send + receive).
    pub completions: u64,
    /// The first `size` bytes of our receive region after the run (what the peer wrote or
    /// sent last; for `atomic_lat` on the server, the 8-byte target; on the client, the last
    /// value fetched).
    pub received: Vec<u8>,
    /// The bytes our side sent (the pattern of the send region), for checks.
    pub sent: Vec<u8>,
}

impl PeerReport {
    /// The line the e2e suite parses: `PEER ok test=… role=… …`.
    pub fn line(&self) -> String {
        let mut s = format!(
            "PEER ok test={} role={} size={} iters={} mtu={} qpn={:#x} remote_qpn={:#x} remote_gid={} completions={} secs={:.3}",
            self.test,
            self.role,
            self.size,
            self.iters,
            self.mtu,
            self.local_qpn,
            self.remote_qpn,
            gid_str(&self.remote_gid),
            self.completions,
            self.secs
        );
        if let Some(st) = &self.stats {
            s.push_str(&format!(
                " t_min_us={:.2} t_typical_us={:.2} t_avg_us={:.2} t_p99_us={:.2} t_max_us={:.2}",
                st.t_min_us, st.t_typical_us, st.t_avg_us, st.t_p99_us, st.t_max_us
            ));
        }
        if let Some(u) = self.usec_per_iter {
            s.push_str(&format!(" usec_per_iter={u:.2}"));
        }
        s
    }
}

/// A GID in IPv6 notation (IPv4-mapped ones as `::ffff:a.b.c.d`).
pub fn gid_str(g: &Gid) -> String {
    std::net::Ipv6Addr::from(g.raw).to_string()
}

/// A failed run: at which stage and why.
#[derive(Clone, Debug)]
pub struct PeerError {
    /// `setup`, `oob`, `connect`, `data`, `close`.
    pub stage: &'static str,
    /// What happened.
    pub msg: String,
}

impl std::fmt::Display for PeerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.stage, self.msg)
    }
}

impl std::error::Error for PeerError {}

fn err<E: std::fmt::Display>(stage: &'static str) -> impl FnOnce(E) -> PeerError {
    move |e| PeerError {
        stage,
        msg: e.to_string(),
    }
}

/// The `PEER error …` line.
pub fn error_line(opts: &PeerOpts, e: &PeerError) -> String {
    format!(
        "PEER error test={} role={} stage={} msg=\"{}\"",
        opts.test.name(),
        opts.role(),
        e.stage,
        e.msg.replace('"', "'")
    )
}

fn random_u32() -> u32 {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish() as u32
}

/// MTU in bytes → IB enum (1 = 256 … 5 = 4096).
pub fn mtu_enum(bytes: u32) -> Option<u32> {
    match bytes {
        256 => Some(abi::MTU_256),
        512 => Some(2),
        1024 => Some(3),
        2048 => Some(4),
        4096 => Some(abi::MTU_4096),
        _ => None,
    }
}

/// IB MTU enum → bytes.
pub fn mtu_bytes(e: u32) -> u32 {
    128 << e.clamp(1, 5)
}

/// Our side: one guest with its device on `fabric`, a registered buffer of two slots (send
/// region, then the receive region the peer targets), a send CQ, a receive CQ and an RC QP.
struct Endpoint {
    qp_timeout: u8,
    _vm: Vm,
    d: Driver,
    buf: Buffer,
    mr: Mr,
    scq: Cq,
    rcq: Cq,
    qp: Qp,
    /// Offset of the receive region.
    slot: u64,
    busy: bool,
}

impl Endpoint {
    fn new(
        fabric: &Arc<SoftFabric>,
        cfg: DeviceConfig,
        size: u64,
        recv_wr: u32,
        busy: bool,
    ) -> Result<Self, PeerError> {
        let e = err("setup");
        let vm = Vm::with_config(fabric, cfg);
        let d = Driver::probe(
            vm.port(),
            vm.mem.clone(),
            GuestAlloc::new(GuestAddress(ALLOC_BASE), GUEST_RAM - ALLOC_BASE),
        )
        .map_err(err("setup"))?;
        let pd = d.alloc_pd().map_err(err("setup"))?;
        let slot = size.max(64).next_multiple_of(64);
        let buf = d
            .alloc_buffer(2 * slot, Layout::Any)
            .map_err(err("setup"))?;
        buf.fill(0);
        let mr = d.reg_mr(pd, &buf, ACCESS_ALL).map_err(err("setup"))?;
        let scq = d.create_cq(1024).map_err(err("setup"))?;
        let rcq = d.create_cq(recv_wr.max(64) * 2).map_err(err("setup"))?;
        let qp = d
            .create_qp(
                pd,
                &QpInitAttr {
                    max_send_wr: 256,
                    max_recv_wr: recv_wr.max(16),
                    max_send_sge: 1,
                    max_recv_sge: 1,
                    max_inline: 0,
                    recv_cq: rcq.cqn(),
                    ..QpInitAttr::rc(&scq)
                },
            )
            .map_err(e)?;
        // RESET → INIT now, as the tools do at creation: receives may be posted from INIT on.
        let (attr, mask) = d.rc_params(0, Gid::default()).init_attr();
        d.modify_qp(&qp, &attr, mask).map_err(err("setup"))?;
        Ok(Self {
            qp_timeout: 14,
            _vm: vm,
            d,
            buf,
            mr,
            scq,
            rcq,
            qp,
            slot,
            busy,
        })
    }

    fn gid(&self) -> Result<Gid, PeerError> {
        self.d.gid().map_err(err("setup"))
    }

    /// INIT → RTR → RTS with the tools' attributes.
    #[allow(clippy::too_many_arguments)]
    fn connect(
        &self,
        remote_qpn: u32,
        remote_gid: Gid,
        sq_psn: u32,
        rq_psn: u32,
        mtu: u32,
        max_rd_atomic: u8,
        max_dest_rd_atomic: u8,
        min_rnr_timer: u8,
    ) -> Result<(), PeerError> {
        let base = self.d.rc_params(remote_qpn, remote_gid);
        let p = vrdma_guest::RcParams {
            sq_psn,
            rq_psn,
            path_mtu: mtu,
            timeout: self.qp_timeout,
            retry_cnt: 7,
            rnr_retry: 7,
            min_rnr_timer,
            max_rd_atomic: max_rd_atomic.clamp(1, base.max_rd_atomic.max(1)),
            max_dest_rd_atomic: max_dest_rd_atomic.clamp(1, base.max_dest_rd_atomic.max(1)),
            ..base
        };
        for (attr, mask) in [p.rtr_attr(), p.rts_attr()] {
            self.d
                .modify_qp(&self.qp, &attr, mask)
                .map_err(err("connect"))?;
        }
        Ok(())
    }

    fn post_recvs(&mut self, n: u32, len: u32) -> Result<(), PeerError> {
        let sge = [self.mr.sge(self.slot, len)];
        for _ in 0..n {
            self.d
                .post_recv(&mut self.qp, &[RecvWr::new(RECV_WRID, &sge)])
                .map_err(err("data"))?;
        }
        Ok(())
    }

    fn post_send(&mut self, wr: SendWr<'_>) -> Result<(), PeerError> {
        self.d.post_send(&mut self.qp, &[wr]).map_err(err("data"))
    }

    /// Polls one CQE from the send CQ (`send`) or the receive CQ, until `deadline`.
    fn poll_one(&mut self, send: bool, deadline: Instant) -> Result<Cqe, PeerError> {
        let mut out = [Cqe::default()];
        let mut spins = 0u32;
        loop {
            let cq = if send { &mut self.scq } else { &mut self.rcq };
            if self.d.poll_cq(cq, &mut out) == 1 {
                return check(out[0]);
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) {
                if Instant::now() > deadline {
                    return Err(PeerError {
                        stage: "data",
                        msg: format!(
                            "no {} completion before the deadline",
                            if send { "send" } else { "receive" }
                        ),
                    });
                }
                if !self.busy {
                    std::thread::yield_now();
                }
            }
            std::hint::spin_loop();
        }
    }

    /// Polls either CQ for one CQE.
    fn poll_any(&mut self, deadline: Instant) -> Result<Cqe, PeerError> {
        let mut out = [Cqe::default()];
        let mut spins = 0u32;
        loop {
            if self.d.poll_cq(&mut self.scq, &mut out) == 1
                || self.d.poll_cq(&mut self.rcq, &mut out) == 1
            {
                return check(out[0]);
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) {
                if Instant::now() > deadline {
                    return Err(PeerError {
                        stage: "data",
                        msg: "no completion before the deadline".into(),
                    });
                }
                if !self.busy {
                    std::thread::yield_now();
                }
            }
            std::hint::spin_loop();
        }
    }

    /// Busy-polls the byte at `off` of our buffer until it equals `want`.
    fn wait_byte(&self, off: u64, want: u8, deadline: Instant) -> Result<(), PeerError> {
        let mut b = [0u8];
        let mut spins = 0u32;
        loop {
            self.buf.read(off, &mut b);
            if b[0] == want {
                return Ok(());
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) {
                if Instant::now() > deadline {
                    return Err(PeerError {
                        stage: "data",
                        msg: format!(
                            "the peer's write {want} never arrived (last byte is {})",
                            b[0]
                        ),
                    });
                }
                if !self.busy {
                    std::thread::yield_now();
                }
            }
            std::hint::spin_loop();
        }
    }
}

const SEND_WRID: u64 = 1;
const RECV_WRID: u64 = 2;

fn check(c: Cqe) -> Result<Cqe, PeerError> {
    if c.status == WC_SUCCESS {
        Ok(c)
    } else {
        Err(PeerError {
            stage: "data",
            msg: format!(
                "completion error: wr_id {} opcode {} status {} ({}) vendor_err {}",
                c.wr_id,
                c.opcode,
                c.status,
                wc_status_name(c.status),
                c.vendor_err
            ),
        })
    }
}

/// The OOB connection: connect to the server or accept one client. The listener is closed
/// after the accept (as the tools do), so a later client is refused instead of queued.
fn open_oob(opts: &PeerOpts, listener: Option<TcpListener>) -> Result<Oob, PeerError> {
    let deadline = Instant::now() + opts.timeout;
    let oob = match opts.server {
        Some(ip) => Oob::connect(SocketAddr::new(ip, opts.port), deadline),
        None => {
            let l = listener.ok_or_else(|| PeerError {
                stage: "oob",
                msg: "server without a listener".into(),
            })?;
            Oob::accept(&l, deadline)
        }
    }
    .map_err(err("oob"))?;
    oob.set_timeout(opts.timeout).map_err(err("oob"))?;
    Ok(oob)
}

/// Binds the OOB listener of the server role (0.0.0.0:port).
pub fn listen(port: u16) -> std::io::Result<TcpListener> {
    TcpListener::bind(SocketAddr::new(
        IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        port,
    ))
}

/// Runs one test on a new device with configuration `cfg` attached to `fabric`. For the
/// server role, `listener` is the bound OOB listener (see [`listen`]); `None` binds one.
pub fn run(
    fabric: &Arc<SoftFabric>,
    cfg: DeviceConfig,
    opts: &PeerOpts,
    listener: Option<TcpListener>,
) -> Result<PeerReport, PeerError> {
    let listener = match (opts.server, listener) {
        (None, None) => Some(listen(opts.port).map_err(err("oob"))?),
        (_, l) => l,
    };
    let mtu = mtu_enum(opts.mtu).ok_or_else(|| PeerError {
        stage: "setup",
        msg: format!("MTU {} is not one of 256, 512, 1024, 2048, 4096", opts.mtu),
    })?;
    let size = if opts.test == Test::AtomicLat {
        8
    } else {
        opts.size.max(1)
    };
    if size > u32::MAX as u64 || opts.iters == 0 {
        return Err(PeerError {
            stage: "setup",
            msg: "bad size or iterations".into(),
        });
    }
    let recv_wr = match opts.test {
        Test::RcPingpong => opts.rx_depth.max(2),
        Test::SendLat => (opts.iters as u32).min(512),
        _ => 1,
    };
    let mut ep = Endpoint::new(fabric, cfg, size, recv_wr, opts.busy_poll)?;
    ep.qp_timeout = opts.qp_timeout.min(31);
    // The send region carries a pattern (perftest/rc_pingpong send whatever is in the buffer).
    let seed = if opts.server.is_some() { 0xc1 } else { 0x5e };
    let sent = vrdma_guest::pattern(seed, size as usize);
    ep.buf.write(0, &sent);
    if opts.test == Test::ReadLat {
        // What a READ of our advertised region returns (perftest zeroes it; any data will do).
        ep.buf.write(ep.slot, &sent);
    }
    let psn = random_u32() & 0xff_ffff;
    let gid = ep.gid()?;
    match opts.test {
        Test::RcPingpong => run_pingpong(ep, opts, listener, size, mtu, psn, gid, sent),
        t => run_perftest(t, ep, opts, listener, size, mtu, psn, gid, sent),
    }
}

#[allow(clippy::too_many_arguments)]
fn run_pingpong(
    mut ep: Endpoint,
    opts: &PeerOpts,
    listener: Option<TcpListener>,
    size: u64,
    mtu: u32,
    psn: u32,
    gid: Gid,
    sent: Vec<u8>,
) -> Result<PeerReport, PeerError> {
    let len = size as u32;
    let rx_depth = opts.rx_depth.max(2);
    // rc_pingpong posts its receives before the exchange.
    ep.post_recvs(rx_depth, len)?;
    let my = PingpongDest {
        lid: 0,
        qpn: ep.qp.qpn(),
        psn,
        gid,
    };
    let mut oob = open_oob(opts, listener)?;
    let connect = |ep: &Endpoint, rem: &PingpongDest| {
        // pp_connect_ctx: max_dest_rd_atomic 1, min_rnr_timer 12, timeout 14, retry 7, rnr 7,
        // max_rd_atomic 1.
        ep.connect(rem.qpn, rem.gid, psn, rem.psn, mtu, 1, 1, 12)
    };
    let rem = if oob.is_client() {
        oob.send(&my.encode()).map_err(err("oob"))?;
        let m = oob.recv(oob::PINGPONG_MSG_SIZE).map_err(err("oob"))?;
        oob.send(oob::DONE).map_err(err("oob"))?;
        let rem = PingpongDest::decode(&m).map_err(err("oob"))?;
        connect(&ep, &rem)?;
        rem
    } else {
        let m = oob.recv(oob::PINGPONG_MSG_SIZE).map_err(err("oob"))?;
        let rem = PingpongDest::decode(&m).map_err(err("oob"))?;
        connect(&ep, &rem)?;
        oob.send(&my.encode()).map_err(err("oob"))?;
        let done = oob.recv(oob::DONE.len()).map_err(err("oob"))?;
        if done != oob::DONE {
            return Err(PeerError {
                stage: "oob",
                msg: format!("expected \"done\", got {done:?}"),
            });
        }
        rem
    };

    let iters = opts.iters;
    let deadline = Instant::now() + opts.timeout;
    let sge = [ep.mr.sge(0, len)];
    let (mut scnt, mut rcnt, mut routs) = (0usize, 0usize, rx_depth);
    let mut stamps = Vec::with_capacity(iters + 1);
    let mut completions = 0u64;
    let start = Instant::now();
    let mut pending = RECV_WRID;
    if oob.is_client() {
        stamps.push(Instant::now());
        ep.post_send(SendWr::send(SEND_WRID, &sge))?;
        pending |= SEND_WRID;
    }
    while rcnt < iters || scnt < iters {
        let c = ep.poll_any(deadline)?;
        completions += 1;
        match c.wr_id {
            SEND_WRID => scnt += 1,
            RECV_WRID => {
                if c.byte_len != len {
                    return Err(PeerError {
                        stage: "data",
                        msg: format!("received {} bytes, expected {len}", c.byte_len),
                    });
                }
                routs -= 1;
                if routs <= 1 {
                    ep.post_recvs(rx_depth - routs, len)?;
                    routs = rx_depth;
                }
                rcnt += 1;
            }
            w => {
                return Err(PeerError {
                    stage: "data",
                    msg: format!("completion with unknown wr_id {w}"),
                })
            }
        }
        pending &= !c.wr_id;
        if scnt < iters && pending == 0 {
            stamps.push(Instant::now());
            ep.post_send(SendWr::send(SEND_WRID, &sge))?;
            pending = RECV_WRID | SEND_WRID;
        }
    }
    let elapsed = start.elapsed();
    stamps.push(Instant::now());
    let rtts: Vec<u64> = stamps
        .windows(2)
        .map(|w| (w[1] - w[0]).as_nanos() as u64)
        .collect();
    let received = ep.buf.read_vec(ep.slot, size as usize);
    oob.linger(Duration::from_secs(10));
    Ok(PeerReport {
        test: "rc_pingpong",
        role: opts.role(),
        size,
        iters,
        mtu: mtu_bytes(mtu),
        stats: Some(LatStats::from_full_rtts(
            "rc_pingpong",
            "peer",
            size,
            "poll",
            &rtts,
        )),
        usec_per_iter: Some(elapsed.as_secs_f64() * 1e6 / iters as f64),
        secs: elapsed.as_secs_f64(),
        local_qpn: ep.qp.qpn(),
        remote_qpn: rem.qpn,
        remote_gid: rem.gid,
        completions,
        received,
        sent,
    })
}

#[allow(clippy::too_many_arguments)]
fn run_perftest(
    test: Test,
    mut ep: Endpoint,
    opts: &PeerOpts,
    listener: Option<TcpListener>,
    size: u64,
    mtu: u32,
    psn: u32,
    gid: Gid,
    sent: Vec<u8>,
) -> Result<PeerReport, PeerError> {
    let mut oob = open_oob(opts, listener)?;
    let o = err("oob");
    // Start-up exchanges: version, cycle buffer, cache line size, MTU.
    let mut version = [0u8; oob::PERFTEST_VERSION_SIZE];
    version[..oob::PERFTEST_VERSION.len()].copy_from_slice(oob::PERFTEST_VERSION.as_bytes());
    // The tools refuse peers older than 5.70; we accept any version.
    oob.xchg(&version).map_err(o)?;
    oob.xchg(&4096u32.to_be_bytes()).map_err(err("oob"))?;
    oob.xchg(&64u32.to_be_bytes()).map_err(err("oob"))?;
    let rm = oob.xchg(&oob::mtu_msg(mtu)).map_err(err("oob"))?;
    let mtu = match oob::parse_mtu_msg(&rm) {
        Some(r) if (1..=5).contains(&r) => mtu.min(r),
        _ => mtu,
    };
    let out_reads = ep.d.config().max_qp_rd_atom.clamp(1, 16);
    let my = PerftestDest {
        lid: 0,
        out_reads,
        qpn: ep.qp.qpn(),
        psn,
        rkey: ep.mr.rkey,
        vaddr: ep.mr.iova + ep.slot,
        gid,
        srqn: 0,
    };
    let msg = my.encode();
    let hs = |oob: &mut Oob| -> Result<PerftestDest, PeerError> {
        let m = oob.xchg(&msg).map_err(err("oob"))?;
        PerftestDest::decode(&m).map_err(err("oob"))
    };
    // Handshakes (QP messages), perftest 4.5:
    //   write_lat, read_lat, atomic_lat: 2 before connecting, 2 after;
    //   send_lat: 1 before, 2 after, receives posted, 1 more;
    //   read/atomic/send_lat then close with one more and a "done".
    let mut rem = hs(&mut oob)?;
    if test != Test::SendLat {
        rem = hs(&mut oob)?;
    }
    if !is_v4_mapped(&rem.gid) || !is_v4_mapped(&gid) {
        // ctx_check_gid_compatibility compares only the kinds.
        if is_v4_mapped(&rem.gid) != is_v4_mapped(&gid) {
            return Err(PeerError {
                stage: "oob",
                msg: "GID types differ (IPv4-mapped vs IPv6)".into(),
            });
        }
    }
    // ctx_modify_qp_to_rtr/rts: max_dest_rd_atomic = my out_reads, max_rd_atomic = the peer's,
    // min_rnr_timer MIN_RNR_TIMER (12).
    ep.connect(
        rem.qpn,
        rem.gid,
        psn,
        rem.psn,
        mtu,
        rem.out_reads.min(255) as u8,
        out_reads as u8,
        12,
    )?;
    // After connecting: two handshakes (write_lat: "after RTR"; send_lat: after RTR and the
    // per-QP one) …
    hs(&mut oob)?;
    hs(&mut oob)?;
    let client = oob.is_client();
    let len = size as u32;
    let rx_depth = (opts.iters as u32).min(512);
    if test == Test::SendLat {
        // … and ib_send_lat posts its receives (ctx_set_recv_wqes), then shakes hands once
        // more so that no SEND arrives before the peer's receives.
        ep.post_recvs(rx_depth, len)?;
        hs(&mut oob)?;
    }

    let iters = opts.iters;
    let deadline = Instant::now() + opts.timeout;
    let mut stamps: Vec<Instant> = Vec::with_capacity(iters + 1);
    let mut completions = 0u64;
    let start = Instant::now();
    let sge = [ep.mr.sge(0, len)];
    let mut half_rtt = true;
    match test {
        Test::WriteLat => {
            // run_iter_lat_write: the server writes first.
            let poll_off = ep.slot + size - 1;
            let (mut scnt, mut ccnt, mut rcnt) = (0usize, 0usize, 0usize);
            while scnt < iters || ccnt < iters || rcnt < iters {
                if rcnt < iters && (scnt >= 1 || client) {
                    rcnt += 1;
                    ep.wait_byte(poll_off, rcnt as u8, deadline)?;
                }
                if scnt < iters {
                    stamps.push(Instant::now());
                    scnt += 1;
                    ep.buf.write(size - 1, &[scnt as u8]);
                    ep.post_send(SendWr::write(SEND_WRID, &sge, rem.vaddr, rem.rkey))?;
                }
                if ccnt < iters {
                    ep.poll_one(true, deadline)?;
                    completions += 1;
                    ccnt += 1;
                }
            }
        }
        Test::ReadLat | Test::AtomicLat if client => {
            half_rtt = false;
            let local = [ep.mr.sge(ep.slot, len)];
            for _ in 0..iters {
                stamps.push(Instant::now());
                let wr = if test == Test::ReadLat {
                    SendWr::read(SEND_WRID, &local, rem.vaddr, rem.rkey)
                } else {
                    SendWr::fetch_add(SEND_WRID, &local, rem.vaddr, rem.rkey, 1)
                };
                ep.post_send(wr)?;
                ep.poll_one(true, deadline)?;
                completions += 1;
            }
        }
        Test::ReadLat | Test::AtomicLat => {
            // The server only answers; it waits in the closing handshake.
        }
        Test::SendLat => {
            // run_iter_lat_send: the client sends first; cq_mod 100.
            let (mut scnt, mut rcnt) = (0usize, 0usize);
            while scnt < iters || rcnt < iters {
                if rcnt < iters && (scnt >= 1 || !client) {
                    let c = ep.poll_one(false, deadline)?;
                    completions += 1;
                    if c.byte_len != len {
                        return Err(PeerError {
                            stage: "data",
                            msg: format!("received {} bytes, expected {len}", c.byte_len),
                        });
                    }
                    rcnt += 1;
                    if rcnt + rx_depth as usize <= iters {
                        ep.post_recvs(1, len)?;
                    }
                }
                if scnt < iters {
                    stamps.push(Instant::now());
                    scnt += 1;
                    let signaled = scnt % 100 == 0 || scnt == iters;
                    let wr = SendWr::send(SEND_WRID, &sge);
                    ep.post_send(if signaled { wr } else { wr.unsignaled() })?;
                    if signaled {
                        ep.poll_one(true, deadline)?;
                        completions += 1;
                    }
                }
            }
        }
        Test::RcPingpong => unreachable!(),
    }
    stamps.push(Instant::now());
    let elapsed = start.elapsed();
    // ctx_close_connection (read/atomic/send): one more handshake and an unread "done".
    if test != Test::WriteLat {
        hs(&mut oob).map_err(|e| PeerError {
            stage: "close",
            msg: e.msg,
        })?;
        oob.send(oob::DONE).map_err(err("close"))?;
    }
    let received = ep.buf.read_vec(ep.slot, size as usize);
    oob.linger(Duration::from_secs(10));
    let rtts: Vec<u64> = stamps
        .windows(2)
        .map(|w| (w[1] - w[0]).as_nanos() as u64)
        .collect();
    let stats = if rtts.is_empty() || stamps.len() < 2 {
        None
    } else if half_rtt {
        Some(LatStats::from_rtts(
            test.name(),
            "peer",
            size,
            "poll",
            &rtts,
        ))
    } else {
        Some(LatStats::from_full_rtts(
            test.name(),
            "peer",
            size,
            "poll",
            &rtts,
        ))
    };
    Ok(PeerReport {
        test: test.name(),
        role: opts.role(),
        size,
        iters,
        mtu: mtu_bytes(mtu),
        stats,
        usec_per_iter: None,
        secs: elapsed.as_secs_f64(),
        local_qpn: ep.qp.qpn(),
        remote_qpn: rem.qpn,
        remote_gid: rem.gid,
        completions,
        received,
        sent,
    })
}

fn is_v4_mapped(g: &Gid) -> bool {
    g.raw[..10].iter().all(|&b| b == 0) && g.raw[10] == 0xff && g.raw[11] == 0xff
}
