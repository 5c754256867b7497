//! The control queue: parsing, validation and execution of control commands.
//!
//! Every request is read from guest-supplied descriptors; every count and size in it is checked
//! against the device limits *before* anything is allocated or read, so a request can neither
//! make the device allocate without bound nor read or write outside guest memory.

use std::sync::Arc;

use virtio_queue::{DescriptorChain, QueueT, Reader, Writer};
use vm_memory::ByteValued;
use vrdma_abi::{self as abi, CtrlHdr, CtrlResp};

use crate::backend::{Backend, DeviceOps};
use crate::interrupt::InterruptKind;
use crate::mr::{self, Mr, PageListError};
use crate::qp::{apply_modify, ModifyError};
use crate::ring::Ring;
use crate::state::{Ah, Cq, Pd, Qp, State};
use crate::GuestMemoryMmap;

type CmdResult = Result<Vec<u8>, u32>;

/// Size of the response struct of a command (after `CtrlResp`).
fn resp_size(cmd: u32) -> usize {
    use std::mem::size_of;
    match cmd {
        abi::CMD_QUERY_DEVICE => size_of::<abi::VrdmaConfig>(),
        abi::CMD_QUERY_PORT => size_of::<abi::PortAttr>(),
        abi::CMD_QUERY_GID => size_of::<abi::Gid>(),
        abi::CMD_CREATE_PD | abi::CMD_CREATE_CQ | abi::CMD_CREATE_AH => {
            size_of::<abi::RespHandle>()
        }
        abi::CMD_REG_MR => size_of::<abi::RespRegMr>(),
        abi::CMD_CREATE_QP => size_of::<abi::RespCreateQp>(),
        abi::CMD_QUERY_QP => size_of::<abi::QpAttr>(),
        _ => 0,
    }
}

fn bytes_of<T: ByteValued>(v: T) -> Vec<u8> {
    v.as_slice().to_vec()
}

fn page_err(e: PageListError) -> u32 {
    match e {
        PageListError::BadAddress => abi::STATUS_BAD_ADDRESS,
        PageListError::Invalid => abi::STATUS_INVALID,
    }
}

struct Req<'a, 'b, B> {
    r: &'a mut Reader<'b, B>,
}

impl<B: vm_memory::bitmap::BitmapSlice> Req<'_, '_, B> {
    fn obj<T: ByteValued>(&mut self) -> Result<T, u32> {
        if self.r.available_bytes() < std::mem::size_of::<T>() {
            return Err(abi::STATUS_BAD_LENGTH);
        }
        self.r.read_obj::<T>().map_err(|_| abi::STATUS_BAD_ADDRESS)
    }

    /// Reads `n` page addresses, after checking the request really carries them.
    fn pages(&mut self, n: u32) -> Result<Vec<u64>, u32> {
        if self.r.available_bytes() / 8 < n as usize {
            return Err(abi::STATUS_BAD_LENGTH);
        }
        (0..n).map(|_| self.obj::<u64>()).collect()
    }
}

impl State {
    /// Executes every pending control request.
    pub fn process_ctrlq(&mut self) {
        let mut any = false;
        loop {
            let Some(active) = self.active.as_mut() else {
                return;
            };
            let mem = active.mem.clone();
            let Some(chain) = active.queues[abi::CTRLQ as usize].pop_descriptor_chain(mem.as_ref())
            else {
                break;
            };
            let head = chain.head_index();
            let written = self.handle_request(&mem, chain);
            if let Some(a) = self.active.as_mut() {
                let _ = a.queues[abi::CTRLQ as usize].add_used(mem.as_ref(), head, written);
            }
            any = true;
        }
        self.flush_events();
        if !any {
            return;
        }
        if let Some(a) = self.active.as_mut() {
            let needs = a.queues[abi::CTRLQ as usize]
                .needs_notification(a.mem.as_ref())
                .unwrap_or(true);
            if needs {
                let _ = a.irq.trigger(InterruptKind::Queue(abi::CTRLQ));
            }
        }
    }

    fn handle_request(
        &mut self,
        mem: &Arc<GuestMemoryMmap>,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> u32 {
        let (Ok(mut reader), Ok(mut writer)) = (
            Reader::new(mem.as_ref(), chain.clone()),
            Writer::new(mem.as_ref(), chain),
        ) else {
            return 0;
        };
        let cap = writer.available_bytes();
        if cap < std::mem::size_of::<CtrlResp>() {
            return 0;
        }
        let mut req = Req { r: &mut reader };
        let result = match req.obj::<CtrlHdr>() {
            Err(e) => Err(e),
            Ok(hdr) if hdr.flags != 0 => Err(abi::STATUS_INVALID),
            Ok(hdr) if cap < std::mem::size_of::<CtrlResp>() + resp_size(hdr.cmd) => {
                Err(abi::STATUS_BAD_LENGTH)
            }
            Ok(hdr) => self.execute(hdr.cmd, &mut req),
        };
        let (status, body) = match result {
            Ok(b) => (abi::STATUS_OK, b),
            Err(s) => (s, Vec::new()),
        };
        let resp = CtrlResp {
            status,
            reserved: 0,
        };
        if writer.write_obj(resp).is_err() {
            return 0;
        }
        if !body.is_empty() && std::io::Write::write_all(&mut writer, &body).is_err() {
            return std::mem::size_of::<CtrlResp>() as u32;
        }
        writer.bytes_written() as u32
    }

    fn execute<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        cmd: u32,
        req: &mut Req<'_, '_, B>,
    ) -> CmdResult {
        let res = match cmd {
            abi::CMD_QUERY_DEVICE => Ok(bytes_of(self.core.cfg.config_space())),
            abi::CMD_QUERY_PORT => {
                let c: abi::CmdQueryPort = req.obj()?;
                if c.port != 1 {
                    return Err(abi::STATUS_INVALID);
                }
                Ok(bytes_of(abi::PortAttr {
                    state: abi::PORT_ACTIVE,
                    max_mtu: abi::MTU_4096,
                    active_mtu: abi::MTU_4096,
                    gid_tbl_len: 1,
                    max_msg_sz: crate::state::MAX_MSG as u32,
                    port_cap_flags: 0,
                    link_layer: abi::LINK_LAYER_ETHERNET,
                    reserved: 0,
                }))
            }
            abi::CMD_QUERY_GID => {
                let c: abi::CmdQueryGid = req.obj()?;
                if c.port != 1 || c.index != 0 {
                    return Err(abi::STATUS_INVALID);
                }
                Ok(bytes_of(self.core.cfg.gid))
            }
            abi::CMD_SET_DOORBELL_AREA => self.cmd_set_doorbell(req.obj()?),
            abi::CMD_CREATE_PD => {
                let h = self
                    .core
                    .pds
                    .insert(Pd::default())
                    .ok_or(abi::STATUS_NO_RESOURCE)?;
                Ok(bytes_of(abi::RespHandle {
                    handle: h,
                    extra: 0,
                }))
            }
            abi::CMD_DESTROY_PD => {
                let c: abi::CmdHandle = req.obj()?;
                let pd = self.core.pds.get(c.handle).ok_or(abi::STATUS_BAD_HANDLE)?;
                if pd.refs > 0 {
                    return Err(abi::STATUS_BUSY);
                }
                self.core.pds.remove(c.handle);
                Ok(Vec::new())
            }
            abi::CMD_REG_MR => {
                let c: abi::CmdRegMr = req.obj()?;
                self.cmd_reg_mr(c, req)
            }
            abi::CMD_DEREG_MR => {
                let c: abi::CmdHandle = req.obj()?;
                let mr = self
                    .core
                    .mrs
                    .remove(c.handle)
                    .ok_or(abi::STATUS_BAD_HANDLE)?;
                self.core.total_mr_pages -= mr.pages.len() as u64;
                if let Some(pd) = self.core.pds.get_mut(mr.pd) {
                    pd.refs = pd.refs.saturating_sub(1);
                }
                Ok(Vec::new())
            }
            abi::CMD_CREATE_CQ => {
                let c: abi::CmdCreateCq = req.obj()?;
                self.cmd_create_cq(c, req)
            }
            abi::CMD_DESTROY_CQ => {
                let c: abi::CmdHandle = req.obj()?;
                let cq = self.core.cqs.get(c.handle).ok_or(abi::STATUS_BAD_HANDLE)?;
                if cq.refs > 0 {
                    return Err(abi::STATUS_BUSY);
                }
                let pages = cq.ring.pages.len() as u64;
                self.core.cqs.remove(c.handle);
                self.core.total_ring_pages -= pages;
                Ok(Vec::new())
            }
            abi::CMD_CREATE_QP => {
                let c: abi::CmdCreateQp = req.obj()?;
                self.cmd_create_qp(c, req)
            }
            abi::CMD_MODIFY_QP => self.cmd_modify_qp(req.obj()?),
            abi::CMD_QUERY_QP => {
                let c: abi::CmdHandle = req.obj()?;
                let qp = self.core.qps.get(c.handle).ok_or(abi::STATUS_BAD_HANDLE)?;
                let mut a = qp.attr;
                a.max_send_wr = qp.sq.depth;
                a.max_recv_wr = qp.rq.depth;
                a.max_send_sge = qp.max_send_sge;
                a.max_recv_sge = qp.max_recv_sge;
                a.max_inline_data = qp.max_inline;
                a.qp_type = qp.qp_type as u32;
                a.sq_draining = self.core.draining.contains(&c.handle) as u8;
                Ok(bytes_of(a))
            }
            abi::CMD_DESTROY_QP => {
                let c: abi::CmdHandle = req.obj()?;
                self.cmd_destroy_qp(c.handle)
            }
            abi::CMD_CREATE_AH => {
                let c: abi::CmdCreateAh = req.obj()?;
                if self.core.pds.get(c.pd).is_none() {
                    return Err(abi::STATUS_BAD_HANDLE);
                }
                if c.attr.port_num > 1 || c.attr.sgid_index != 0 {
                    return Err(abi::STATUS_INVALID);
                }
                let h = self
                    .core
                    .ahs
                    .insert(Ah {
                        pd: c.pd,
                        attr: c.attr,
                    })
                    .ok_or(abi::STATUS_NO_RESOURCE)?;
                if let Some(pd) = self.core.pds.get_mut(c.pd) {
                    pd.refs += 1;
                }
                Ok(bytes_of(abi::RespHandle {
                    handle: h,
                    extra: 0,
                }))
            }
            abi::CMD_DESTROY_AH => {
                let c: abi::CmdHandle = req.obj()?;
                let ah = self
                    .core
                    .ahs
                    .remove(c.handle)
                    .ok_or(abi::STATUS_BAD_HANDLE)?;
                if let Some(pd) = self.core.pds.get_mut(ah.pd) {
                    pd.refs = pd.refs.saturating_sub(1);
                }
                Ok(Vec::new())
            }
            abi::CMD_SET_INTR_MODERATION => {
                let c: abi::CmdIntrModeration = req.obj()?;
                if self.core.features & abi::VRDMA_F_INTR_MODERATION == 0 {
                    return Err(abi::STATUS_UNSUPPORTED);
                }
                if (c.max_events > 1 && c.usec == 0) || c.usec > 1_000_000 {
                    return Err(abi::STATUS_INVALID);
                }
                self.core.moderation.max_events = c.max_events;
                self.core.moderation.usec = c.usec;
                Ok(Vec::new())
            }
            _ => Err(abi::STATUS_UNSUPPORTED),
        };
        res
    }

    fn cmd_set_doorbell(&mut self, c: abi::CmdSetDoorbellArea) -> CmdResult {
        if self.core.db_gpa.is_some() {
            return Err(abi::STATUS_BAD_STATE);
        }
        // The CQ-notify bitmap is part of the area only when VRDMA_F_CQ_NOTIFY was negotiated:
        // without it the revision-1 minimum still holds (the device never writes past it).
        let cfg = &self.core.cfg;
        let size = abi::doorbell_area_min(cfg.max_qp, cfg.max_cq, self.core.features);
        if c.len < size {
            return Err(abi::STATUS_INVALID);
        }
        let mem = self.core.memory().clone();
        if !c.gpa.is_multiple_of(abi::VRDMA_PAGE_SIZE) || !mr::in_one_region(&mem, c.gpa, c.len) {
            return Err(abi::STATUS_BAD_ADDRESS);
        }
        self.core.db_gpa = Some(c.gpa);
        Ok(Vec::new())
    }

    fn cmd_reg_mr<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        c: abi::CmdRegMr,
        req: &mut Req<'_, '_, B>,
    ) -> CmdResult {
        let cfg = &self.core.cfg;
        if self.core.pds.get(c.pd).is_none() {
            return Err(abi::STATUS_BAD_HANDLE);
        }
        let remote_needs_write = abi::ACCESS_REMOTE_WRITE | abi::ACCESS_REMOTE_ATOMIC;
        if c.access & abi::ACCESS_REMOTE_ATOMIC != 0
            && self.core.features & abi::VRDMA_F_ATOMICS == 0
        {
            return Err(abi::STATUS_UNSUPPORTED);
        }
        if c.access & !abi::ACCESS_ALL != 0
            || (c.access & remote_needs_write != 0 && c.access & abi::ACCESS_LOCAL_WRITE == 0)
            || c.length > cfg.max_mr_size
            || c.npages > cfg.max_mr_pages
            || Mr::pages_needed(c.iova, c.length, c.page_shift) != Some(c.npages as u64)
        {
            return Err(abi::STATUS_INVALID);
        }
        if self.core.total_mr_pages + c.npages as u64 > cfg.max_total_mr_pages
            || self.core.mrs.len() >= cfg.max_mr
        {
            return Err(abi::STATUS_NO_RESOURCE);
        }
        let pages = req.pages(c.npages)?;
        let mem = self.core.memory().clone();
        let mr = Mr::new(&mem, c.pd, c.access, c.iova, c.length, c.page_shift, pages)
            .map_err(page_err)?;
        let lkey = self.core.mrs.insert(mr).ok_or(abi::STATUS_NO_RESOURCE)?;
        self.core.total_mr_pages += c.npages as u64;
        if let Some(pd) = self.core.pds.get_mut(c.pd) {
            pd.refs += 1;
        }
        let remote = abi::ACCESS_REMOTE_WRITE | abi::ACCESS_REMOTE_READ | abi::ACCESS_REMOTE_ATOMIC;
        let rkey = if c.access & remote != 0 { lkey } else { 0 };
        Ok(bytes_of(abi::RespRegMr { lkey, rkey }))
    }

    fn cmd_create_cq<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        c: abi::CmdCreateCq,
        req: &mut Req<'_, '_, B>,
    ) -> CmdResult {
        if self.core.db_gpa.is_none() {
            return Err(abi::STATUS_BAD_STATE);
        }
        let cfg = &self.core.cfg;
        if c.npages > cfg.max_ring_pages || c.depth == 0 || c.depth > cfg.max_cqe {
            return Err(abi::STATUS_INVALID);
        }
        if self.core.cqs.len() >= cfg.max_cq
            || self.core.total_ring_pages + c.npages as u64 > cfg.max_total_ring_pages
        {
            return Err(abi::STATUS_NO_RESOURCE);
        }
        let (max_cqe, max_pages) = (cfg.max_cqe, cfg.max_ring_pages);
        let pages = req.pages(c.npages)?;
        let mem = self.core.memory().clone();
        let ring =
            Ring::new(&mem, pages, c.depth, abi::CQE_SIZE, max_cqe, max_pages).map_err(page_err)?;
        ring.set_prod(&mem, 0);
        let cq = Cq {
            ring,
            prod: 0,
            armed: 0,
            arm_seq: None,
            sol_pos: None,
            overflow: false,
            refs: 0,
        };
        let h = self.core.cqs.insert(cq).ok_or(abi::STATUS_NO_RESOURCE)?;
        self.core.total_ring_pages += c.npages as u64;
        Ok(bytes_of(abi::RespHandle {
            handle: h,
            extra: c.depth,
        }))
    }

    fn cmd_create_qp<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        c: abi::CmdCreateQp,
        req: &mut Req<'_, '_, B>,
    ) -> CmdResult {
        if self.core.db_gpa.is_none() {
            return Err(abi::STATUS_BAD_STATE);
        }
        if self.core.pds.get(c.pd).is_none()
            || self.core.cqs.get(c.send_cq).is_none()
            || self.core.cqs.get(c.recv_cq).is_none()
        {
            return Err(abi::STATUS_BAD_HANDLE);
        }
        if c.qp_type == abi::QPT_UD && self.core.features & abi::VRDMA_F_UD == 0 {
            return Err(abi::STATUS_UNSUPPORTED);
        }
        let cfg = &self.core.cfg;
        if !matches!(c.qp_type, abi::QPT_RC | abi::QPT_UD)
            || c.reserved != 0
            || c.sq_npages > cfg.max_ring_pages
            || c.rq_npages > cfg.max_ring_pages
            || c.sq_depth == 0
            || c.rq_depth == 0
            || c.sq_depth > cfg.max_qp_wr
            || c.rq_depth > cfg.max_qp_wr
        {
            return Err(abi::STATUS_INVALID);
        }
        let ring_pages = c.sq_npages as u64 + c.rq_npages as u64;
        if self.core.qps.len() >= cfg.max_qp
            || self.core.total_ring_pages + ring_pages > cfg.max_total_ring_pages
        {
            return Err(abi::STATUS_NO_RESOURCE);
        }
        let (max_wr, max_pages, max_sge, max_inline) = (
            cfg.max_qp_wr,
            cfg.max_ring_pages,
            cfg.max_sge,
            cfg.max_inline,
        );
        let sq_pages = req.pages(c.sq_npages)?;
        let rq_pages = req.pages(c.rq_npages)?;
        let mem = self.core.memory().clone();
        let sq = Ring::new(&mem, sq_pages, c.sq_depth, c.sq_stride, max_wr, max_pages)
            .map_err(page_err)?;
        let rq = Ring::new(&mem, rq_pages, c.rq_depth, c.rq_stride, max_wr, max_pages)
            .map_err(page_err)?;
        let qp = Qp {
            qp_type: c.qp_type,
            pd: c.pd,
            send_cq: c.send_cq,
            recv_cq: c.recv_cq,
            sq_sig_all: c.sq_sig_all != 0,
            max_send_sge: ((c.sq_stride - abi::SEND_WQE_HDR) / abi::SGE_SIZE).min(max_sge),
            max_recv_sge: ((c.rq_stride - abi::RECV_WQE_HDR) / abi::SGE_SIZE).min(max_sge),
            max_inline: (c.sq_stride - abi::SEND_WQE_HDR).min(max_inline),
            attr: Default::default(),
            sq_cons: sq.prod(&mem).into(),
            rq_cons: rq.prod(&mem),
            sq,
            rq,
            sq_stalled: false,
        };
        qp.sq.set_cons(&mem, *qp.sq_cons);
        qp.rq.set_cons(&mem, qp.rq_cons);
        // An RC QP can post one SGE in the WQE header (`VRDMA_F_HDR_SGE`) whatever its stride.
        let hdr_sge = abi::hdr_sge_usable(self.core.features, c.qp_type);
        let resp = abi::RespCreateQp {
            qpn: 0,
            max_send_sge: qp.max_send_sge.max(hdr_sge as u32),
            max_recv_sge: qp.max_recv_sge,
            max_inline: qp.max_inline,
        };
        let qpn = self.core.qps.insert(qp).ok_or(abi::STATUS_NO_RESOURCE)?;
        self.core.total_ring_pages += ring_pages;
        if let Some(pd) = self.core.pds.get_mut(c.pd) {
            pd.refs += 1;
        }
        for cq in [c.send_cq, c.recv_cq] {
            if let Some(cq) = self.core.cqs.get_mut(cq) {
                cq.refs += 1;
            }
        }
        let info = self
            .core
            .qps
            .get(qpn)
            .map(|q| q.info(qpn))
            .unwrap_or_default();
        self.backend.create_qp(&info);
        Ok(bytes_of(abi::RespCreateQp { qpn, ..resp }))
    }

    fn cmd_modify_qp(&mut self, c: abi::CmdModifyQp) -> CmdResult {
        let max_rd = self.core.cfg.max_qp_rd_atom;
        if c.attr_mask & abi::QP_ATTR_ACCESS_FLAGS != 0
            && c.attr.qp_access_flags & abi::ACCESS_REMOTE_ATOMIC != 0
            && self.core.features & abi::VRDMA_F_ATOMICS == 0
        {
            return Err(abi::STATUS_UNSUPPORTED);
        }
        let qp = self.core.qps.get_mut(c.qpn).ok_or(abi::STATUS_BAD_HANDLE)?;
        let prev = qp.attr.qp_state;
        let mut attr = qp.attr;
        apply_modify(qp.qp_type, &mut attr, c.attr_mask, &c.attr, max_rd).map_err(|e| match e {
            ModifyError::BadState => abi::STATUS_BAD_STATE,
            ModifyError::Invalid => abi::STATUS_INVALID,
        })?;
        qp.attr = attr;
        let new = attr.qp_state;
        let mem = self.core.memory().clone();
        if new == abi::QPS_RESET {
            // Discard ring contents without completions.
            let qp = self.core.qps.get_mut(c.qpn).expect("exists");
            (*qp.sq_cons) = qp.sq.prod(&mem);
            qp.rq_cons = qp.rq.prod(&mem);
            qp.sq.set_cons(&mem, *qp.sq_cons);
            qp.rq.set_cons(&mem, qp.rq_cons);
            qp.attr = abi::QpAttr::default();
        }
        let info = self.core.qps.get(c.qpn).expect("exists").info(c.qpn);
        self.backend.modify_qp(&mut self.core, &info, prev);
        if new == abi::QPS_ERR {
            self.core.flush_rings(c.qpn);
        }
        if new == abi::QPS_SQD && prev == abi::QPS_RTS {
            self.core.draining.push(c.qpn);
        }
        if new == abi::QPS_RTS {
            self.process_sq(c.qpn);
        }
        self.settle();
        Ok(Vec::new())
    }

    fn cmd_destroy_qp(&mut self, qpn: u32) -> CmdResult {
        if self.core.qps.get(qpn).is_none() {
            return Err(abi::STATUS_BAD_HANDLE);
        }
        // Work still outstanding is flushed to the CQs first: nothing is lost.
        self.flush_qp(qpn, None);
        self.backend.destroy_qp(qpn);
        let qp = self.core.qps.remove(qpn).ok_or(abi::STATUS_BAD_HANDLE)?;
        self.core.total_ring_pages -= (qp.sq.pages.len() + qp.rq.pages.len()) as u64;
        if let Some(pd) = self.core.pds.get_mut(qp.pd) {
            pd.refs = pd.refs.saturating_sub(1);
        }
        for cq in [qp.send_cq, qp.recv_cq] {
            if let Some(cq) = self.core.cqs.get_mut(cq) {
                cq.refs = cq.refs.saturating_sub(1);
            }
        }
        self.core.refetch.retain(|&q| q != qpn);
        self.core.draining.retain(|&q| q != qpn);
        self.core.pending_fail.retain(|&(q, _)| q != qpn);
        Ok(Vec::new())
    }
}
