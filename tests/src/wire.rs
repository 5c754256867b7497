//! Guests whose devices reach each other over RoCEv2 (UDP), not through one in-process fabric.
//!
//! A [`WireNode`] is a guest on its own [`SoftFabric`] with a wire gateway on its own IP
//! address: two nodes in one test process share nothing but the network, exactly as two
//! processes (or hosts) would. The `vrdma-node` binary puts one node in its own process.

use std::net::IpAddr;
use std::sync::Arc;

use vm_memory::GuestAddress;
use vrdma_abi as abi;
use vrdma_abi::Gid;
use vrdma_device::soft::wire::{gid_from_ip, Faults, WireConfig, WireGateway};
use vrdma_device::soft::SoftFabric;
use vrdma_device::DeviceConfig;
use vrdma_guest::{Buffer, Cq, Driver, GuestAlloc, Layout, Mr, Pd, Qp, QpInitAttr, RcParams};

use crate::{Vm, ALLOC_BASE, GUEST_RAM};

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
    let d = Driver::probe(
        vm.port(),
        vm.mem.clone(),
        GuestAlloc::new(GuestAddress(ALLOC_BASE), GUEST_RAM - ALLOC_BASE),
    )
    .map_err(|e| e.to_string())?;
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
