//! `vrdma-guest`: the test guest driver for the vrdma paravirtual RDMA device (virtio device
//! ID 42).
//!
//! It plays the guest and speaks only the documented ABI — the wire structures and constants of
//! [`vrdma_abi`] and the semantics of the ABI notes — through a virtio-mmio (version 2)
//! [`Transport`] and the guest's RAM. It is the reference a Linux kernel driver will mirror, so
//! every step is spelled out:
//!
//! * **Bring-up** ([`Driver::probe`]): magic/version/device-ID check, reset, ACKNOWLEDGE |
//!   DRIVER, feature negotiation (VIRTIO_F_VERSION_1 plus the offered `VRDMA_F_*` bits),
//!   FEATURES_OK (re-read), config space read, control queue (0) and event queue (1) setup,
//!   event-queue stocking, DRIVER_OK, and SET_DOORBELL_AREA.
//! * **Control path** ([`Driver::ctrl`] and typed wrappers): one descriptor chain per command,
//!   `CtrlHdr` + request (+ page lists in their own descriptors) readable, `CtrlResp` + response
//!   writable; completion by polling the used ring, then interrupts, with a timeout.
//! * **Data path** ([`Driver::post_send`], [`Driver::post_recv`], [`Driver::poll_cq`],
//!   [`Driver::req_notify_cq`]): WQEs written into rings in guest memory, producer indices
//!   published with release stores, doorbells as atomic ORs into the doorbell area plus a queue-1
//!   notification unless the device is polling. Allocation- and lock-free.
//! * **Events** ([`Driver::wait_event`]): the event queue's used buffers, re-posted as they are
//!   harvested.
//! * **Guest memory** ([`GuestAlloc`], [`Buffer`]): a page allocator over a guest-physical range
//!   and "virtual" buffers whose pages can be deliberately discontiguous.
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use vm_memory::GuestAddress;
//! use vrdma_abi::{Cqe, Gid, ACCESS_ALL, WC_SUCCESS};
//! use vrdma_guest::{Driver, GuestAlloc, GuestMemoryMmap, Layout, QpInitAttr, RecvWr, SendWr,
//!                   Transport};
//!
//! fn rdma_write(
//!     transport: impl Transport + 'static,
//!     mem: Arc<GuestMemoryMmap>,
//!     peer_qpn: u32,
//!     peer_gid: Gid,
//!     peer_addr: u64,
//!     peer_rkey: u32,
//! ) -> Result<(), vrdma_guest::Error> {
//!     let d = Driver::probe(transport, mem.clone(), GuestAlloc::new(GuestAddress(0x10_0000), 60 << 20))?;
//!     let pd = d.alloc_pd()?;
//!     let buf = d.alloc_buffer(1 << 20, Layout::Discontiguous)?;
//!     buf.fill_pattern(1);
//!     let mr = d.reg_mr(pd, &buf, ACCESS_ALL)?;
//!     let mut cq = d.create_cq(256)?;
//!     let mut qp = d.create_qp(pd, &QpInitAttr { max_send_wr: 64, ..QpInitAttr::rc(&cq) })?;
//!     // Exchange (qp.qpn(), d.gid()?, mr.iova, mr.rkey) with the peer out of band, then:
//!     d.connect_rc(&qp, peer_qpn, peer_gid)?;
//!     d.post_recv(&mut qp, &[RecvWr::new(7, &[mr.sge(0, 4096)])])?;
//!     d.post_send(&mut qp, &[SendWr::write(1, &[mr.sge_all()], peer_addr, peer_rkey)])?;
//!     let mut cqes = [Cqe::default(); 16];
//!     let n = loop {
//!         let n = d.poll_cq(&mut cq, &mut cqes);
//!         if n > 0 { break n; }
//!     };
//!     assert_eq!((cqes[0].wr_id, cqes[0].status), (1, WC_SUCCESS));
//!     # let _ = n;
//!     // Or sleep until the next completion:
//!     d.req_notify_cq(&mut cq, false)?;
//!     let _event = d.wait_event(Duration::from_secs(1));
//!     d.destroy_qp(&mut qp)?;
//!     d.destroy_cq(&mut cq)?;
//!     d.dereg_mr(mr)?;
//!     d.free_buffer(buf);
//!     d.dealloc_pd(pd)?;
//!     Ok(())
//! }
//! ```
//!
//! # Threads
//!
//! [`Driver`] is `Send + Sync` (all methods take `&self`); [`Qp`] and [`Cq`] are `Send`. The data
//! path needs `&mut Qp` / `&mut Cq`, so each QP's send queue and each CQ has one poster/poller at
//! a time, as in verbs. A benchmark can run each guest (driver) in its own thread.
//!
//! # Hostile-guest helpers
//!
//! [`Driver::ctrl`] / [`Driver::ctrl_raw`] send arbitrary commands and chains;
//! [`Driver::post_send_unchecked`], [`Driver::write_sq_slot`], [`Driver::set_sq_prod`],
//! [`Driver::ring_sq_doorbell`], [`Driver::write_ring_u32`] and friends write arbitrary WQEs,
//! indices and doorbell bits; [`Pd`] and [`Ah`] can be forged from raw handles.
#![deny(missing_docs)]

pub mod alloc;
mod datapath;
mod driver;
pub mod error;
pub(crate) mod gmem;
pub mod mmio;
mod verbs;
pub mod virtq;

pub use alloc::{pattern, pattern_byte, Buffer, GuestAlloc, Layout, IOVA_BASE, PAGE_SIZE};
pub use datapath::{send_wqe_header, uses_hdr_sge, DriverStats};
pub use driver::{Driver, DriverOptions, DRIVER_FEATURES};
pub use error::{cmd_name, status_name, wc_status_name, Error, Result};
pub use mmio::Transport;
pub use verbs::{
    ah_attr_for, rq_geometry, sq_geometry, Ah, Cq, Mr, Pd, Qp, QpCaps, QpInitAttr, RcParams,
    RecvWr, Ring, SendWr, UdParams,
};
pub use vrdma_abi as abi;
pub use vrdma_abi::{Cqe, Event, Gid, Sge};

/// Guest memory as the driver (and the device) see it: mmap-backed with a switchable dirty log.
pub use vrdma_memory::GuestMemoryMmap;

#[cfg(test)]
mod send_sync {
    fn send<T: Send>() {}
    fn sync<T: Sync>() {}

    #[test]
    fn driver_objects_cross_threads() {
        send::<super::Driver>();
        sync::<super::Driver>();
        send::<super::Qp>();
        send::<super::Cq>();
        send::<super::Buffer>();
        sync::<super::Buffer>();
        send::<super::Error>();
        sync::<super::Error>();
    }
}
