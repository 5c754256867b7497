//! Guests whose devices reach each other over RoCEv2 (UDP), not through one in-process fabric.
//!
//! A [`WireNode`] is a guest on its own [`SoftFabric`] with a wire gateway on its own IP
//! address: two nodes in one test process share nothing but the network, exactly as two
//! processes (or hosts) would. The `vrdma-node` binary puts one node in its own process.

use std::net::IpAddr;
use std::sync::Arc;

use vrdma_abi as abi;
use vrdma_abi::Gid;
pub use vrdma_device::soft::wire::udp_socket;
use vrdma_device::soft::wire::{gid_from_ip, Faults, WireConfig, WireGateway};
use vrdma_device::soft::SoftFabric;
use vrdma_device::DeviceConfig;
use vrdma_guest::{Buffer, Cq, Driver, Layout, Mr, Pd, Qp, QpInitAttr, RcParams};

use crate::Vm;

/// One guest with its own fabric and gateway.
pub struct WireNode {
    /// The guest.
    pub vm: Vm,
    /// Its driver.
    pub d: Arc<Driver>,
    /// A PD.
    pub pd: Pd,
    /// A registered buffer (all access).
    pub buf: Buffer,
    /// Its MR.
    pub mr: Mr,
    /// A CQ for both queues of the node's QPs.
    pub cq: Cq,
    /// The gateway.
    pub gw: Arc<WireGateway>,
    /// The fabric (last: dropped after the device).
    pub fabric: Arc<SoftFabric>,
}

/// A guest at `ip` (GID `::ffff:ip`) with a `buf_len` buffer; `faults` are injected into what
/// it sends.
pub fn wire_node(ip: IpAddr, buf_len: u64, faults: Option<Faults>) -> Result<WireNode, String> {
    let mut cfg = WireConfig::new(ip);
    cfg.faults = faults;
    wire_node_with(cfg, buf_len)
}

/// A guest behind a gateway configured by `cfg`.
pub fn wire_node_with(cfg: WireConfig, buf_len: u64) -> Result<WireNode, String> {
    let fabric = SoftFabric::new();
    let gid = cfg.gid.unwrap_or_else(|| gid_from_ip(cfg.addr));
    let gw = fabric
        .attach_wire(cfg)
        .map_err(|e| format!("gateway: {e}"))?;
    let vm = Vm::with_config(&fabric, DeviceConfig::with_gid(gid));
    let d = vm.driver()?;
    let d = Arc::new(d);
    let e = |e: vrdma_guest::Error| e.to_string();
    let pd = d.alloc_pd().map_err(e)?;
    let buf = d.alloc_buffer(buf_len, Layout::Discontiguous).map_err(e)?;
    let mr = d.reg_mr(pd, &buf, abi::ACCESS_ALL).map_err(e)?;
    let cq = d.create_cq(4096).map_err(e)?;
    Ok(WireNode {
        vm,
        d,
        pd,
        buf,
        mr,
        cq,
        gw,
        fabric,
    })
}

impl WireNode {
    /// The device's GID.
    pub fn gid(&self) -> Gid {
        self.d.gid().expect("gid")
    }

    /// A new RC QP on the node's CQ with room for `depth` WRs each way.
    pub fn rc_qp(&self, depth: u32) -> Result<Qp, String> {
        self.d
            .create_qp(
                self.pd,
                &QpInitAttr {
                    max_send_wr: depth,
                    max_recv_wr: depth,
                    ..QpInitAttr::rc(&self.cq)
                },
            )
            .map_err(|e| e.to_string())
    }

    /// RC parameters towards `(remote_qpn, remote_gid)` with path MTU `mtu` (`abi::MTU_*`) and
    /// ACK timeout exponent `timeout`.
    pub fn params(&self, remote_qpn: u32, remote_gid: Gid, mtu: u32, timeout: u8) -> RcParams {
        let mut p = self.d.rc_params(remote_qpn, remote_gid);
        p.path_mtu = mtu;
        p.timeout = timeout;
        p
    }
}

/// Connects `qa` of `a` and `qb` of `b` (RC, path MTU `mtu`, ACK timeout exponent `timeout`).
pub fn connect(
    a: &WireNode,
    qa: &Qp,
    b: &WireNode,
    qb: &Qp,
    mtu: u32,
    timeout: u8,
) -> Result<(), String> {
    let pa = a.params(qb.qpn(), b.gid(), mtu, timeout);
    let pb = b.params(qa.qpn(), a.gid(), mtu, timeout);
    a.d.connect_rc_with(qa, &pa).map_err(|e| e.to_string())?;
    b.d.connect_rc_with(qb, &pb).map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------------------------
// A node in its own process (`vrdma-node`), driven over its stdin/stdout
// ---------------------------------------------------------------------------------------------

/// Commands to a `vrdma-node` process, one JSON object per line on its stdin.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum NodeCmd {
    /// Create the node: fabric, gateway on `bind`, guest, driver, buffer, MR, CQ.
    Init {
        /// Local IP address.
        bind: String,
        /// Buffer bytes.
        buf: u64,
    },
    /// Create an RC QP.
    Qp {
        /// Depth of each queue.
        depth: u32,
    },
    /// Connect QP `qpn` to `(rqpn, rgid)`.
    Connect {
        /// Local QPN.
        qpn: u32,
        /// Remote QPN.
        rqpn: u32,
        /// Remote GID.
        rgid: [u8; 16],
        /// Path MTU (`abi::MTU_*`).
        mtu: u32,
        /// ACK timeout exponent.
        timeout: u8,
    },
    /// Serve a write-lat ping-pong ([`write_lat_side`], server side).
    WriteLatServer {
        /// Local QPN.
        qpn: u32,
        /// Bytes per write.
        size: u64,
        /// Measured iterations (the warm-up is added).
        iters: usize,
        /// Peer buffer address.
        raddr: u64,
        /// Peer rkey.
        rkey: u32,
    },
    /// Fill `[off, off + len)` of the buffer with `pattern(seed)` and RDMA WRITE it to
    /// `raddr`/`rkey` through QP `qpn`; answers when the WRITE completed.
    WriteFrom {
        /// Local QPN.
        qpn: u32,
        /// Offset in the local buffer.
        off: u64,
        /// Bytes.
        len: u64,
        /// Pattern seed.
        seed: u64,
        /// Peer address.
        raddr: u64,
        /// Peer rkey.
        rkey: u32,
    },
    /// Echo `count` UDP datagrams on a new socket at `bind` (replies with its port first).
    UdpEcho {
        /// Iterations.
        count: usize,
    },
    /// Receive a UDP stream on a new socket (replies with its port first); on an empty
    /// datagram, answer with the byte count received and stop.
    UdpSink,
    /// Read `len` bytes at `off` of the node's buffer.
    Read {
        /// Offset.
        off: u64,
        /// Length.
        len: u64,
    },
    /// Migration source, while running: start dirty logging and write every non-zero guest
    /// page to `path` (the pre-copy). Answers with the page count.
    MigratePrecopy {
        /// File for the pages.
        path: String,
    },
    /// Migration destination, before the source stops: load `pages` pre-copied pages.
    MigratePrepare {
        /// File with the pages.
        path: String,
        /// Page count (from `MigratePrecopy`).
        pages: u64,
    },
    /// Migration source: quiesce, stop, save the device and guest memory to `path`, close the
    /// gateway.
    MigrateOut {
        /// File for the state.
        path: String,
    },
    /// Migration destination: restore from `path` behind a gateway on `bind` and resume.
    MigrateIn {
        /// File with the state.
        path: String,
        /// Local IP address of the destination.
        bind: String,
    },
    /// Exit.
    Exit,
}

/// Answers of a `vrdma-node`, one JSON object per line on its stdout.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct NodeReply {
    /// Error, if the command failed.
    pub error: Option<String>,
    /// GID.
    pub gid: Option<[u8; 16]>,
    /// Buffer address (iova) and rkey.
    pub addr: Option<u64>,
    /// Remote key of the buffer.
    pub rkey: Option<u32>,
    /// QPN.
    pub qpn: Option<u32>,
    /// UDP port.
    pub port: Option<u16>,
    /// Bytes.
    pub data: Option<Vec<u8>>,
    /// A count.
    pub count: Option<u64>,
    /// Wall-clock time of an event (µs since the Unix epoch), for cross-process downtime.
    pub at_us: Option<u64>,
}

/// Microseconds since the Unix epoch (processes on one host share the clock).
pub fn wall_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A `vrdma-node` child process.
pub struct RemoteNode {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl RemoteNode {
    /// Starts `exe args…` (the `vrdma-node` binary, or `vrdma-perf node`), in network
    /// namespace `netns` if given.
    pub fn spawn(
        exe: &std::path::Path,
        args: &[&str],
        netns: Option<&str>,
    ) -> Result<Self, String> {
        use std::process::{Command, Stdio};
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        cmd.args(args);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", exe.display()))?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let stdout = std::io::BufReader::new(child.stdout.take().ok_or("no stdout")?);
        Ok(Self {
            child,
            stdin,
            stdout,
        })
    }

    /// Sends a command without waiting for the answer.
    pub fn send(&mut self, cmd: &NodeCmd) -> Result<(), String> {
        use std::io::Write;
        let line = serde_json::to_string(cmd).map_err(|e| e.to_string())?;
        writeln!(self.stdin, "{line}").map_err(|e| format!("node stdin: {e}"))?;
        self.stdin.flush().map_err(|e| e.to_string())
    }

    /// Waits for the next answer.
    pub fn recv(&mut self) -> Result<NodeReply, String> {
        use std::io::BufRead;
        let mut line = String::new();
        let n = self
            .stdout
            .read_line(&mut line)
            .map_err(|e| format!("node stdout: {e}"))?;
        if n == 0 {
            return Err("node exited".into());
        }
        let r: NodeReply = serde_json::from_str(&line).map_err(|e| format!("{e}: {line}"))?;
        match &r.error {
            Some(e) => Err(format!("node: {e}")),
            None => Ok(r),
        }
    }

    /// Sends a command and waits for its answer.
    pub fn call(&mut self, cmd: &NodeCmd) -> Result<NodeReply, String> {
        self.send(cmd)?;
        self.recv()
    }
}

impl Drop for RemoteNode {
    fn drop(&mut self) {
        let _ = self.send(&NodeCmd::Exit);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One side of a write-lat ping-pong across processes (perftest `ib_write_lat` semantics):
/// each side writes `size` bytes into the second half of the peer's buffer, the last byte
/// tagged with the iteration, and busy-polls the last byte of its own second half. The client
/// writes first and time-stamps every iteration; it returns `iters` round trips in ns (after a
/// warm-up of [`crate::perf::warmup_of`]); the server returns nothing.
pub fn write_lat_side(
    node: &mut WireNode,
    qp: &mut Qp,
    size: u64,
    iters: usize,
    peer: (u64, u32),
    client: bool,
) -> Result<Vec<u64>, String> {
    let size = size.max(1);
    let (raddr, rkey) = peer;
    let total = iters + crate::perf::warmup_of(iters);
    let mut cqes = [abi::Cqe::default(); 64];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let mut stamps = Vec::with_capacity(if client { total + 1 } else { 0 });
    let wait = |node: &WireNode, i: usize| {
        let t = crate::perf::tag(i);
        if crate::perf::spin_until(|b| node.buf.read(2 * size - 1, b), t, deadline) {
            Ok(())
        } else {
            Err(format!("timeout in iteration {i}"))
        }
    };
    for i in 0..total {
        if client {
            stamps.push(std::time::Instant::now());
        } else {
            wait(node, i)?;
        }
        node.buf.write(size - 1, &[crate::perf::tag(i)]);
        let sge = [node.mr.sge(0, size as u32)];
        let mut wr = vrdma_guest::SendWr::write(i as u64, &sge, raddr + size, rkey);
        if i % 16 != 15 {
            wr = wr.unsignaled();
        }
        node.d.post_send(qp, &[wr]).map_err(|e| e.to_string())?;
        if client {
            wait(node, i)?;
        }
        let n = node.d.poll_cq(&mut node.cq, &mut cqes);
        if let Some(c) = cqes[..n].iter().find(|c| c.status != abi::WC_SUCCESS) {
            return Err(format!("completion status {}", c.status));
        }
    }
    if !client {
        return Ok(Vec::new());
    }
    stamps.push(std::time::Instant::now());
    Ok(stamps
        .windows(2)
        .skip(total - iters)
        .map(|w| (w[1] - w[0]).as_nanos() as u64)
        .collect())
}
