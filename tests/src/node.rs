//! A node process: one guest with a vrdma device behind a RoCEv2 gateway, in its own process
//! (the `vrdma-node` binary, or `vrdma-perf node`).
//!
//! Cross-process tests and `vrdma-perf --path roce` start it and drive it with one JSON command
//! per line on stdin ([`NodeCmd`]); it answers one JSON object per line on stdout
//! ([`NodeReply`]). It can also be the source or the destination of a live migration across
//! processes.

use std::collections::HashMap;
use std::io::{BufRead, Read, Write};
use std::net::{IpAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use crate::wire::{wall_us, wire_node, write_lat_side, NodeCmd, NodeReply, WireNode};
use crate::GUEST_RAM;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vrdma_abi::Gid;
use vrdma_device::soft::wire::{WireConfig, WireGateway};
use vrdma_device::soft::SoftFabric;
use vrdma_device::GuestMemoryMmap;
use vrdma_glue::MmioTransport;
use vrdma_guest::Qp;

/// What a migration file holds before the memory pages.
#[derive(serde::Serialize, serde::Deserialize)]
struct MigrationHeader {
    gid: [u8; 16],
    blob: Vec<u8>,
    /// Guest-physical pages of the node's buffer and their size (to serve `Read` afterwards).
    buf_pages: Vec<u64>,
    page_size: u64,
    /// Number of non-zero 4 KiB pages that follow, each as (gpa u64 LE, 4096 bytes).
    pages: u64,
}

/// A device restored from another process: no driver, only what serves peers and `Read`.
struct Restored {
    mem: Arc<GuestMemoryMmap>,
    transport: Arc<MmioTransport>,
    buf_pages: Vec<u64>,
    page_size: u64,
    gw: Arc<WireGateway>,
    fabric: Arc<SoftFabric>,
}

#[derive(Default)]
struct Node {
    node: Option<WireNode>,
    qps: HashMap<u32, Qp>,
    restored: Option<Restored>,
    /// Destination: guest memory filled from a pre-copy file before the source stops.
    prepared: Option<Arc<GuestMemoryMmap>>,
}

/// Writes `(gpa, page)` records of the pages of `mem` that `want` selects.
fn write_pages(
    f: &mut impl Write,
    mem: &GuestMemoryMmap,
    want: impl Fn(u64, &[u8]) -> bool,
    gpas: impl Iterator<Item = u64>,
) -> Result<u64, String> {
    let mut page = vec![0u8; 4096];
    let mut n = 0;
    for gpa in gpas {
        if mem.read_slice(&mut page, GuestAddress(gpa)).is_ok() && want(gpa, &page) {
            f.write_all(&gpa.to_le_bytes()).map_err(|e| e.to_string())?;
            f.write_all(&page).map_err(|e| e.to_string())?;
            n += 1;
        }
    }
    Ok(n)
}

/// Reads `count` page records into `mem`.
fn read_pages(f: &mut impl Read, mem: &GuestMemoryMmap, count: u64) -> Result<(), String> {
    let mut rec = vec![0u8; 4104];
    for _ in 0..count {
        f.read_exact(&mut rec).map_err(|e| e.to_string())?;
        let gpa = u64::from_le_bytes(rec[..8].try_into().map_err(|_| "bad record")?);
        mem.write_slice(&rec[8..], GuestAddress(gpa))
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn guest_memory() -> Result<Arc<GuestMemoryMmap>, String> {
    Ok(Arc::new(crate::guest_memory(&[(
        GuestAddress(0),
        GUEST_RAM as usize,
    )])?))
}

fn parse_ip(s: &str) -> Result<IpAddr, String> {
    s.parse().map_err(|e| format!("{s}: {e}"))
}

fn read_gpa(mem: &GuestMemoryMmap, pages: &[u64], page: u64, off: u64, len: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len as usize);
    let mut at = off;
    while (out.len() as u64) < len {
        let Some(&p) = pages.get((at / page) as usize) else {
            break;
        };
        let n = (page - at % page).min(len - out.len() as u64) as usize;
        let mut chunk = vec![0u8; n];
        let _ = mem.read_slice(&mut chunk, GuestAddress(p + at % page));
        out.extend_from_slice(&chunk);
        at += n as u64;
    }
    out
}

impl Node {
    fn wire(&mut self) -> Result<&mut WireNode, String> {
        self.node
            .as_mut()
            .ok_or_else(|| "no node (init first)".into())
    }

    /// A socket for the raw-UDP floor at the gateway's address, set up as the gateway's own
    /// (`udp_socket`); its port is announced at once (the answer the command's caller waits
    /// for before it starts sending).
    fn floor_socket(&mut self) -> Result<UdpSocket, String> {
        let ip = self.wire()?.gw.addr().ip();
        let s =
            crate::wire::udp_socket(std::net::SocketAddr::new(ip, 0)).map_err(|e| e.to_string())?;
        reply(&NodeReply {
            port: Some(s.local_addr().map_err(|e| e.to_string())?.port()),
            ..Default::default()
        });
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        Ok(s)
    }

    fn handle(&mut self, cmd: NodeCmd) -> Result<NodeReply, String> {
        let mut r = NodeReply::default();
        match cmd {
            NodeCmd::Init { bind, buf } => {
                let n = wire_node(parse_ip(&bind)?, buf, None)?;
                r.gid = Some(n.gid().raw);
                r.addr = Some(n.mr.addr(0));
                r.rkey = Some(n.mr.rkey);
                self.node = Some(n);
            }
            NodeCmd::Qp { depth } => {
                let qp = self.wire()?.rc_qp(depth)?;
                r.qpn = Some(qp.qpn());
                self.qps.insert(qp.qpn(), qp);
            }
            NodeCmd::Connect {
                qpn,
                rqpn,
                rgid,
                mtu,
                timeout,
            } => {
                let n = self.node.as_ref().ok_or("no node")?;
                let qp = self.qps.get(&qpn).ok_or("no such QP")?;
                let p = n.params(rqpn, Gid { raw: rgid }, mtu, timeout);
                n.d.connect_rc_with(qp, &p).map_err(|e| e.to_string())?;
            }
            NodeCmd::WriteLatServer {
                qpn,
                size,
                iters,
                raddr,
                rkey,
            } => {
                let mut qp = self.qps.remove(&qpn).ok_or("no such QP")?;
                let res = write_lat_side(self.wire()?, &mut qp, size, iters, (raddr, rkey), false);
                self.qps.insert(qpn, qp);
                res?;
            }
            NodeCmd::WriteFrom {
                qpn,
                off,
                len,
                seed,
                raddr,
                rkey,
            } => {
                let mut qp = self.qps.remove(&qpn).ok_or("no such QP")?;
                let n = self.wire()?;
                n.buf.write(off, &vrdma_guest::pattern(seed, len as usize));
                let sge = [n.mr.sge(off, len as u32)];
                let res =
                    n.d.post_send(&mut qp, &[vrdma_guest::SendWr::write(1, &sge, raddr, rkey)])
                        .map_err(|e| e.to_string());
                let c = n.d.poll_cq_until(&mut n.cq, 1, Duration::from_secs(10));
                self.qps.insert(qpn, qp);
                res?;
                match c.first() {
                    Some(c) if c.status == vrdma_abi::WC_SUCCESS => {}
                    other => return Err(format!("write completion: {other:?}")),
                }
            }
            NodeCmd::UdpEcho { count } => {
                let s = self.floor_socket()?;
                let mut b = vec![0u8; 65536];
                for _ in 0..count {
                    let (n, from) = s.recv_from(&mut b).map_err(|e| e.to_string())?;
                    s.send_to(&b[..n], from).map_err(|e| e.to_string())?;
                }
                r.count = Some(count as u64);
            }
            NodeCmd::UdpSink => {
                let s = self.floor_socket()?;
                let mut b = vec![0u8; 65536];
                let mut total = 0u64;
                loop {
                    let (n, from) = s.recv_from(&mut b).map_err(|e| e.to_string())?;
                    if n == 0 {
                        s.send_to(&total.to_le_bytes(), from)
                            .map_err(|e| e.to_string())?;
                        break;
                    }
                    total += n as u64;
                }
                r.count = Some(total);
            }
            NodeCmd::Read { off, len } => {
                let len = len.min(16 << 20);
                r.data = Some(match (&self.node, &self.restored) {
                    (Some(n), _) => n.buf.read_vec(off, len as usize),
                    (None, Some(x)) => read_gpa(&x.mem, &x.buf_pages, x.page_size, off, len),
                    _ => return Err("no node".into()),
                });
            }
            NodeCmd::MigratePrecopy { path } => {
                let mem = match (&self.node, &self.restored) {
                    (Some(n), _) => n.vm.mem.clone(),
                    (None, Some(x)) => x.mem.clone(),
                    _ => return Err("no node".into()),
                };
                // Start the dirty log, then copy every non-zero page while the guest runs.
                vrdma_device::dirty::start(&mem).map_err(|e| e.to_string())?;
                let mut f = std::io::BufWriter::new(
                    std::fs::File::create(&path).map_err(|e| e.to_string())?,
                );
                let size = mem.last_addr().0 + 1;
                let nonzero = |_: u64, p: &[u8]| p.iter().any(|&b| b != 0);
                r.count = Some(write_pages(&mut f, &mem, nonzero, (0..size).step_by(4096))?);
                f.flush().map_err(|e| e.to_string())?;
            }
            NodeCmd::MigratePrepare { path, pages } => {
                let mem = guest_memory()?;
                let mut f =
                    std::io::BufReader::new(std::fs::File::open(&path).map_err(|e| e.to_string())?);
                read_pages(&mut f, &mem, pages)?;
                self.prepared = Some(mem);
            }
            NodeCmd::MigrateOut { path } => {
                r.at_us = Some(self.migrate_out(&path)?);
            }
            NodeCmd::MigrateIn { path, bind } => {
                let (x, at, state) = migrate_in(&path, parse_ip(&bind)?, self.prepared.take())?;
                r.gid = Some(x.gw.gid().raw);
                r.count = Some(state);
                r.at_us = Some(at);
                self.restored = Some(x);
            }
            NodeCmd::Exit => std::process::exit(0),
        }
        Ok(r)
    }

    /// Stops the device (after in-flight work drained, bounded), saves it and the guest memory
    /// to `path` — the pages dirtied since `MigratePrecopy`, or every non-zero page without
    /// one — and closes the gateway. Returns the wall-clock time of the stop.
    fn migrate_out(&mut self, path: &str) -> Result<u64, String> {
        // The source is this process's own guest, or one restored here earlier.
        let (transport, mem, gid, buf_pages, page_size, fabric, gw) =
            match (self.node.take(), self.restored.take()) {
                (Some(n), _) => {
                    // Ask the device before it stops (a stopped device answers no control
                    // requests).
                    let gid = n.gid().raw;
                    let parts = (
                        n.vm.transport.clone(),
                        n.vm.mem.clone(),
                        gid,
                        n.buf.pages().to_vec(),
                        n.buf.page_size(),
                        n.fabric.clone(),
                        n.gw.clone(),
                    );
                    // The driver must not touch the stopped device again: keep it, unused.
                    std::mem::forget(n);
                    parts
                }
                (None, Some(x)) => (
                    x.transport.clone(),
                    x.mem.clone(),
                    x.gw.gid().raw,
                    x.buf_pages.clone(),
                    x.page_size,
                    x.fabric.clone(),
                    x.gw.clone(),
                ),
                _ => return Err("no node".into()),
            };
        let dev = transport.device().clone();
        dev.quiesce().map_err(|e| e.to_string())?;
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        while dev.outstanding() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(100));
        }
        dev.stop().map_err(|e| e.to_string())?;
        let at = wall_us();
        let blob = transport.save_state().map_err(|e| e.to_string())?;
        let log = vrdma_device::dirty::take(&mem);
        let logged = vrdma_device::dirty::count(&log) > 0;
        let mut pages = Vec::new();
        let n = if logged {
            let gpas = log.iter().flat_map(|r| r.pages()).collect::<Vec<_>>();
            write_pages(&mut pages, &mem, |_, _| true, gpas.into_iter())?
        } else {
            let size = mem.last_addr().0 + 1;
            let nonzero = |_: u64, p: &[u8]| p.iter().any(|&b| b != 0);
            write_pages(&mut pages, &mem, nonzero, (0..size).step_by(4096))?
        };
        let hdr = MigrationHeader {
            gid,
            blob,
            buf_pages,
            page_size,
            pages: n,
        };
        let mut f = std::fs::File::create(path).map_err(|e| e.to_string())?;
        let line = serde_json::to_string(&hdr).map_err(|e| e.to_string())?;
        writeln!(f, "{line}").map_err(|e| e.to_string())?;
        f.write_all(&pages).map_err(|e| e.to_string())?;
        // The address is free for a destination on this host; the stopped device stays
        // around (as a VMM keeps the source until the destination runs).
        fabric.detach_wire(&gw);
        Ok(at)
    }
}

/// Restores a device saved by `migrate_out` behind a gateway on `bind` and resumes it, on
/// `prepared` memory (filled by a pre-copy) or a fresh one. Also returns the resume time (wall
/// clock, µs) and the device state's size in bytes.
fn migrate_in(
    path: &str,
    bind: IpAddr,
    prepared: Option<Arc<GuestMemoryMmap>>,
) -> Result<(Restored, u64, u64), String> {
    let f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut f = std::io::BufReader::new(f);
    let mut line = String::new();
    f.read_line(&mut line).map_err(|e| e.to_string())?;
    let hdr: MigrationHeader = serde_json::from_str(&line).map_err(|e| e.to_string())?;
    let mem = match prepared {
        Some(m) => m,
        None => guest_memory()?,
    };
    read_pages(&mut f, &mem, hdr.pages)?;
    let fabric = SoftFabric::new();
    let mut cfg = WireConfig::new(bind);
    cfg.gid = Some(Gid { raw: hdr.gid });
    let gw = fabric.attach_wire(cfg).map_err(|e| e.to_string())?;
    let irq = EventFd::new(EFD_NONBLOCK).map_err(|e| e.to_string())?;
    let transport = Arc::new(
        MmioTransport::restore(&fabric, mem.clone(), irq, &hdr.blob).map_err(|e| e.to_string())?,
    );
    transport.device().resume().map_err(|e| e.to_string())?;
    let at = wall_us();
    let state = hdr.blob.len() as u64;
    Ok((
        Restored {
            mem,
            transport,
            buf_pages: hdr.buf_pages,
            page_size: hdr.page_size,
            gw,
            fabric,
        },
        at,
        state,
    ))
}

fn reply(r: &NodeReply) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{}",
        serde_json::to_string(r).unwrap_or_else(|_| "{}".into())
    );
    let _ = out.flush();
}

/// Serves commands from stdin until it closes or an `exit` command arrives.
pub fn serve() {
    let mut node = Node::default();
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        if line.trim().is_empty() {
            continue;
        }
        let r = match serde_json::from_str::<NodeCmd>(&line) {
            Ok(cmd) => node.handle(cmd),
            Err(e) => Err(format!("bad command: {e}")),
        };
        reply(&r.unwrap_or_else(|e| NodeReply {
            error: Some(e),
            ..Default::default()
        }));
    }
    if let Some(x) = node.restored.take() {
        x.fabric.detach_wire(&x.gw);
    }
}
