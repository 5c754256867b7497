//! The vrdma guest ABI: every structure and constant a driver and the device exchange.
//!
//! This crate is the executable form of `docs/abi.md`. It holds only plain data: `#[repr(C)]`
//! structures with explicit padding (so that every byte pattern is a valid value and the layout is
//! fixed), and the constants that give them meaning. All multi-byte fields are little-endian; the
//! crate refuses to build on big-endian targets rather than silently mis-describe the layout.
//!
//! Handles (QPN, lkey/rkey, PD/CQ/AH numbers) are *virtual*: the device chooses them, they survive
//! live migration unchanged, and each carries a generation byte ([`handle_key`]) so that a handle
//! or key kept past the destruction of its object is rejected.
#![deny(missing_docs)]

#[cfg(target_endian = "big")]
compile_error!("the vrdma ABI is little-endian; big-endian hosts are not supported");

use serde::{Deserialize, Serialize};
use vm_memory::ByteValued;

/// Virtio device ID reserved for RDMA devices.
pub const VIRTIO_ID_RDMA: u32 = 42;
/// ABI revision reported in [`VrdmaConfig::abi_version`]. Bumped on incompatible change.
pub const ABI_VERSION: u32 = 1;

/// Size of a page for rings, doorbell area and page lists of rings. MR pages may be larger.
pub const VRDMA_PAGE_SIZE: u64 = 4096;
/// log2 of [`VRDMA_PAGE_SIZE`].
pub const VRDMA_PAGE_SHIFT: u32 = 12;

// ---------------------------------------------------------------------------------------------
// Feature bits (device-specific range 0..=23). VIRTIO_F_VERSION_1 (bit 32) is mandatory.
// ---------------------------------------------------------------------------------------------

/// Unreliable datagram QPs are supported.
pub const VRDMA_F_UD: u64 = 1 << 0;
/// Atomic operations (compare-and-swap, fetch-and-add) are supported.
pub const VRDMA_F_ATOMICS: u64 = 1 << 1;
/// The device may set [`DB_DEVICE_POLLING`]; the driver honours it to suppress doorbell kicks.
pub const VRDMA_F_DB_SUPPRESSION: u64 = 1 << 2;
/// Interrupt moderation ([`CMD_SET_INTR_MODERATION`]).
pub const VRDMA_F_INTR_MODERATION: u64 = 1 << 3;
/// CQ notifications go into the CQ-notify bitmap of the doorbell area (plus an interrupt)
/// instead of `EV_CQ_COMP` events on the event queue.
pub const VRDMA_F_CQ_NOTIFY: u64 = 1 << 4;
/// An RC WQE with one SGE may carry it in its header ([`SEND_F_HDR_SGE`]): such a WQE fits a
/// 64-byte slot.
pub const VRDMA_F_HDR_SGE: u64 = 1 << 5;
/// Virtio 1.0 or later (standard feature bit 32).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

// ---------------------------------------------------------------------------------------------
// Virtqueues
// ---------------------------------------------------------------------------------------------

/// Control virtqueue: driver requests, device responses.
pub const CTRLQ: u16 = 0;
/// Event virtqueue: the driver supplies writable 16-byte buffers; the device fills one
/// [`Event`] per event and signals a used-buffer notification (the interrupt). A notification
/// *from* the driver on this queue also means "doorbell": the device scans the doorbell area.
pub const EVENTQ: u16 = 1;
/// Number of virtqueues.
pub const NUM_QUEUES: usize = 2;
/// Maximum size of each virtqueue.
pub const QUEUE_MAX_SIZE: u16 = 256;

// ---------------------------------------------------------------------------------------------
// Config space (read-only)
// ---------------------------------------------------------------------------------------------

/// Device configuration space: capabilities and limits. Read-only for the driver.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VrdmaConfig {
    /// [`ABI_VERSION`] implemented by the device.
    pub abi_version: u32,
    /// Number of ports (always 1).
    pub phys_port_cnt: u32,
    /// Maximum number of QPs.
    pub max_qp: u32,
    /// Maximum work requests per send or receive queue.
    pub max_qp_wr: u32,
    /// Maximum scatter/gather entries per work request.
    pub max_sge: u32,
    /// Maximum inline data bytes per send work request.
    pub max_inline: u32,
    /// Maximum number of CQs.
    pub max_cq: u32,
    /// Maximum number of CQEs per CQ.
    pub max_cqe: u32,
    /// Maximum number of memory regions.
    pub max_mr: u32,
    /// Maximum number of protection domains.
    pub max_pd: u32,
    /// Maximum number of address handles.
    pub max_ah: u32,
    /// Maximum outstanding RDMA READ/atomic operations per QP (initiator and responder).
    pub max_qp_rd_atom: u32,
    /// Number of entries in the GID table of port 1.
    pub gid_tbl_len: u32,
    /// Maximum pages in one MR page list.
    pub max_mr_pages: u32,
    /// Maximum pages in one ring (SQ, RQ or CQ) page list.
    pub max_ring_pages: u32,
    /// Size in bytes of the doorbell area the driver must provide ([`CMD_SET_DOORBELL_AREA`]).
    pub doorbell_area_size: u32,
    /// Maximum bytes of one MR.
    pub max_mr_size: u64,
    /// Bit `n` set: MR pages of `1 << n` bytes are supported.
    pub page_size_cap: u64,
    /// Node GUID.
    pub node_guid: u64,
    /// Total MR pages the device accepts over all MRs (host memory budget).
    pub max_total_mr_pages: u64,
    /// Total ring pages (SQ, RQ and CQ page lists together) the device accepts.
    pub max_total_ring_pages: u64,
}

// ---------------------------------------------------------------------------------------------
// Handles
// ---------------------------------------------------------------------------------------------

/// Bits of a handle below the table index: the generation ("key") byte.
pub const HANDLE_KEY_BITS: u32 = 8;

/// Table index of a handle.
pub const fn handle_index(h: u32) -> u32 {
    h >> HANDLE_KEY_BITS
}

/// Generation byte of a handle.
pub const fn handle_key(h: u32) -> u8 {
    (h & 0xff) as u8
}

/// Builds a handle from a table index and generation byte.
pub const fn make_handle(index: u32, key: u8) -> u32 {
    (index << HANDLE_KEY_BITS) | key as u32
}

// ---------------------------------------------------------------------------------------------
// Control queue
// ---------------------------------------------------------------------------------------------

/// Query device attributes: response [`VrdmaConfig`].
pub const CMD_QUERY_DEVICE: u32 = 1;
/// Query port attributes: command [`CmdQueryPort`], response [`PortAttr`].
pub const CMD_QUERY_PORT: u32 = 2;
/// Query one GID: command [`CmdQueryGid`], response [`Gid`].
pub const CMD_QUERY_GID: u32 = 3;
/// Register the doorbell area: command [`CmdSetDoorbellArea`]. Must precede CQ/QP creation.
pub const CMD_SET_DOORBELL_AREA: u32 = 4;
/// Create a PD: response [`RespHandle`].
pub const CMD_CREATE_PD: u32 = 5;
/// Destroy a PD: command [`CmdHandle`].
pub const CMD_DESTROY_PD: u32 = 6;
/// Register an MR: command [`CmdRegMr`] + page list, response [`RespRegMr`].
pub const CMD_REG_MR: u32 = 7;
/// Deregister an MR: command [`CmdHandle`] (the lkey).
pub const CMD_DEREG_MR: u32 = 8;
/// Create a CQ: command [`CmdCreateCq`] + page list, response [`RespHandle`].
pub const CMD_CREATE_CQ: u32 = 9;
/// Destroy a CQ: command [`CmdHandle`].
pub const CMD_DESTROY_CQ: u32 = 10;
/// Create a QP: command [`CmdCreateQp`] + SQ page list + RQ page list, response [`RespCreateQp`].
pub const CMD_CREATE_QP: u32 = 11;
/// Modify a QP: command [`CmdModifyQp`].
pub const CMD_MODIFY_QP: u32 = 12;
/// Query a QP: command [`CmdHandle`], response [`QpAttr`].
pub const CMD_QUERY_QP: u32 = 13;
/// Destroy a QP: command [`CmdHandle`].
pub const CMD_DESTROY_QP: u32 = 14;
/// Create an AH: command [`CmdCreateAh`], response [`RespHandle`].
pub const CMD_CREATE_AH: u32 = 15;
/// Destroy an AH: command [`CmdHandle`].
pub const CMD_DESTROY_AH: u32 = 16;
/// Set interrupt moderation: command [`CmdIntrModeration`].
pub const CMD_SET_INTR_MODERATION: u32 = 17;

/// Request header, first in the device-readable part of every control request.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtrlHdr {
    /// One of the `CMD_*` values.
    pub cmd: u32,
    /// Must be zero.
    pub flags: u32,
}

/// Response header, first in the device-writable part of every control request.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtrlResp {
    /// One of the `STATUS_*` values.
    pub status: u32,
    /// Reserved, written as zero.
    pub reserved: u32,
}

/// Success.
pub const STATUS_OK: u32 = 0;
/// A field has an invalid value (bad size, flag, alignment, enum value).
pub const STATUS_INVALID: u32 = 1;
/// A limit was reached (table full, page budget exhausted).
pub const STATUS_NO_RESOURCE: u32 = 2;
/// A handle or key does not name a live object (or its generation byte is stale).
pub const STATUS_BAD_HANDLE: u32 = 3;
/// The object is still referenced by another (e.g. a PD with MRs, a CQ with QPs).
pub const STATUS_BUSY: u32 = 4;
/// The command is not allowed in the current state (command order, QP state transition).
pub const STATUS_BAD_STATE: u32 = 5;
/// Unknown command or unsupported option.
pub const STATUS_UNSUPPORTED: u32 = 6;
/// A guest-physical address or range lies outside guest memory, or is misaligned.
pub const STATUS_BAD_ADDRESS: u32 = 7;
/// The request is shorter than its command requires, or the response buffer is too small.
pub const STATUS_BAD_LENGTH: u32 = 8;

/// A command whose only argument is one handle.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CmdHandle {
    /// The handle.
    pub handle: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

/// A response that carries one new handle.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RespHandle {
    /// The new handle.
    pub handle: u32,
    /// Command-specific (CQ: the depth).
    pub extra: u32,
}

/// [`CMD_QUERY_PORT`] arguments.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CmdQueryPort {
    /// Port number, 1.
    pub port: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

/// Port attributes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortAttr {
    /// `PORT_*` state.
    pub state: u32,
    /// Largest path MTU (`MTU_*` enum).
    pub max_mtu: u32,
    /// Active MTU (`MTU_*` enum).
    pub active_mtu: u32,
    /// Entries in the GID table.
    pub gid_tbl_len: u32,
    /// Largest message in bytes.
    pub max_msg_sz: u32,
    /// Port capability flags (reserved, zero).
    pub port_cap_flags: u32,
    /// Link layer: 2 = Ethernet (RoCE).
    pub link_layer: u32,
    /// Reserved.
    pub reserved: u32,
}

/// Port is active.
pub const PORT_ACTIVE: u32 = 4;
/// Ethernet link layer (RoCE).
pub const LINK_LAYER_ETHERNET: u32 = 2;

/// Path MTU enumeration, as in the IB spec: 1 = 256 … 5 = 4096 bytes.
pub const MTU_256: u32 = 1;
/// 512-byte MTU.
pub const MTU_512: u32 = 2;
/// 1024-byte MTU (RoCE on a 1500-byte Ethernet MTU).
pub const MTU_1024: u32 = 3;
/// 2048-byte MTU.
pub const MTU_2048: u32 = 4;
/// 4096-byte MTU.
pub const MTU_4096: u32 = 5;
/// MTU enum → bytes (0 for an invalid value).
pub const fn mtu_bytes(mtu: u32) -> u32 {
    match mtu {
        1..=5 => 128 << mtu,
        _ => 0,
    }
}

/// [`CMD_QUERY_GID`] arguments.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CmdQueryGid {
    /// Port number, 1.
    pub port: u32,
    /// GID table index.
    pub index: u32,
}

/// A 128-bit GID (network byte order, as on the wire).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct Gid {
    /// The raw GID.
    pub raw: [u8; 16],
}

/// [`CMD_SET_DOORBELL_AREA`] arguments.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CmdSetDoorbellArea {
    /// Guest-physical address, page aligned, physically contiguous for
    /// [`VrdmaConfig::doorbell_area_size`] bytes.
    pub gpa: u64,
    /// Length in bytes; at least `doorbell_area_size`.
    pub len: u64,
}

/// [`CMD_REG_MR`] arguments. Followed by `npages` little-endian u64 page addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CmdRegMr {
    /// Protection domain.
    pub pd: u32,
    /// `ACCESS_*` flags.
    pub access: u32,
    /// The MR's first virtual address (the address used in SGEs and by peers).
    pub iova: u64,
    /// Length in bytes.
    pub length: u64,
    /// log2 of the page size of the page list (12 = 4 KiB …), allowed by `page_size_cap`.
    pub page_shift: u32,
    /// Number of pages: exactly those covering `[iova, iova + length)` at that page size.
    pub npages: u32,
}

/// [`CMD_REG_MR`] response.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RespRegMr {
    /// Local key.
    pub lkey: u32,
    /// Remote key (equal to lkey in this revision; 0 if no remote access was requested).
    pub rkey: u32,
}

/// Local write access.
pub const ACCESS_LOCAL_WRITE: u32 = 1;
/// Remote write access.
pub const ACCESS_REMOTE_WRITE: u32 = 2;
/// Remote read access.
pub const ACCESS_REMOTE_READ: u32 = 4;
/// Remote atomic access.
pub const ACCESS_REMOTE_ATOMIC: u32 = 8;
/// All access flags this revision knows.
pub const ACCESS_ALL: u32 =
    ACCESS_LOCAL_WRITE | ACCESS_REMOTE_WRITE | ACCESS_REMOTE_READ | ACCESS_REMOTE_ATOMIC;

/// [`CMD_CREATE_CQ`] arguments. Followed by `npages` u64 page addresses (4 KiB pages).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CmdCreateCq {
    /// Number of CQE slots: a power of two, 1..=`max_cqe`.
    pub depth: u32,
    /// Pages in the ring: at least `ring_pages(depth, CQE_SIZE)`.
    pub npages: u32,
}

/// Reliable connected QP (value as in verbs).
pub const QPT_RC: u8 = 2;
/// Unreliable datagram QP (value as in verbs).
pub const QPT_UD: u8 = 4;

/// [`CMD_CREATE_QP`] arguments. Followed by `sq_npages` then `rq_npages` u64 page addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CmdCreateQp {
    /// Protection domain.
    pub pd: u32,
    /// Send CQ.
    pub send_cq: u32,
    /// Receive CQ.
    pub recv_cq: u32,
    /// `QPT_RC` or `QPT_UD`.
    pub qp_type: u8,
    /// Non-zero: every send WR generates a completion, whatever its SIGNALED flag.
    pub sq_sig_all: u8,
    /// Reserved, zero.
    pub reserved: u16,
    /// SQ slots: power of two, 1..=`max_qp_wr`.
    pub sq_depth: u32,
    /// SQ slot size in bytes: power of two, 64..=4096.
    pub sq_stride: u32,
    /// Pages of the SQ ring.
    pub sq_npages: u32,
    /// RQ slots: power of two, 1..=`max_qp_wr`.
    pub rq_depth: u32,
    /// RQ slot size in bytes: power of two, 64..=4096.
    pub rq_stride: u32,
    /// Pages of the RQ ring.
    pub rq_npages: u32,
}

/// [`CMD_CREATE_QP`] response.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RespCreateQp {
    /// The QP number (24 bits).
    pub qpn: u32,
    /// SGEs that fit a send slot (capped by `max_sge`).
    pub max_send_sge: u32,
    /// SGEs that fit a receive slot (capped by `max_sge`).
    pub max_recv_sge: u32,
    /// Inline bytes that fit a send slot (capped by `max_inline`).
    pub max_inline: u32,
}

/// Address vector: where a QP (RC) or a datagram (UD) goes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AhAttr {
    /// Destination GID.
    pub dgid: Gid,
    /// IPv6 flow label (20 bits).
    pub flow_label: u32,
    /// Source GID index.
    pub sgid_index: u8,
    /// Hop limit.
    pub hop_limit: u8,
    /// Traffic class.
    pub traffic_class: u8,
    /// Service level.
    pub sl: u8,
    /// Port number (1).
    pub port_num: u8,
    /// Reserved, zero.
    pub reserved: [u8; 7],
}

/// [`CMD_CREATE_AH`] arguments.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CmdCreateAh {
    /// Protection domain.
    pub pd: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// The address.
    pub attr: AhAttr,
}

/// QP attributes, for [`CMD_MODIFY_QP`] (selected by a mask) and [`CMD_QUERY_QP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QpAttr {
    /// `QPS_*` state.
    pub qp_state: u32,
    /// `ACCESS_REMOTE_*` flags the QP allows as a responder.
    pub qp_access_flags: u32,
    /// Path MTU (`MTU_*`).
    pub path_mtu: u32,
    /// Q_Key (UD).
    pub qkey: u32,
    /// Expected PSN of the receive side (24 bits).
    pub rq_psn: u32,
    /// Next PSN of the send side (24 bits).
    pub sq_psn: u32,
    /// Destination QP number (RC, 24 bits).
    pub dest_qp_num: u32,
    /// Partition key index.
    pub pkey_index: u16,
    /// Port (1).
    pub port_num: u8,
    /// Local ACK timeout: 4.096 µs × 2^timeout (0 = infinite).
    pub timeout: u8,
    /// Transport retries (0..=7).
    pub retry_cnt: u8,
    /// RNR retries (0..=7; 7 = infinite).
    pub rnr_retry: u8,
    /// Minimum RNR NAK timer (IB encoding 0..=31).
    pub min_rnr_timer: u8,
    /// Outstanding READ/atomic as initiator.
    pub max_rd_atomic: u8,
    /// Outstanding READ/atomic as responder.
    pub max_dest_rd_atomic: u8,
    /// Query only: SQ drain in progress in SQD.
    pub sq_draining: u8,
    /// Reserved, zero.
    pub reserved: [u8; 2],
    /// Primary path (RC).
    pub ah_attr: AhAttr,
    /// Query only: SQ depth.
    pub max_send_wr: u32,
    /// Query only: RQ depth.
    pub max_recv_wr: u32,
    /// Query only: send SGEs.
    pub max_send_sge: u32,
    /// Query only: receive SGEs.
    pub max_recv_sge: u32,
    /// Query only: inline bytes.
    pub max_inline_data: u32,
    /// Query only: QP type.
    pub qp_type: u32,
}

/// [`CMD_MODIFY_QP`] arguments.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CmdModifyQp {
    /// QP number.
    pub qpn: u32,
    /// `QP_ATTR_*` bits selecting the fields of `attr` to apply.
    pub attr_mask: u32,
    /// The attributes.
    pub attr: QpAttr,
}

/// [`CMD_SET_INTR_MODERATION`] arguments.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CmdIntrModeration {
    /// Raise the interrupt once this many events are pending (0 or 1 = every event).
    pub max_events: u32,
    /// …or once the oldest pending event is this many microseconds old (0 = no timer).
    pub usec: u32,
}

// QP states (verbs values).
/// RESET.
pub const QPS_RESET: u32 = 0;
/// INIT.
pub const QPS_INIT: u32 = 1;
/// Ready to receive.
pub const QPS_RTR: u32 = 2;
/// Ready to send.
pub const QPS_RTS: u32 = 3;
/// Send queue drained.
pub const QPS_SQD: u32 = 4;
/// Send queue error.
pub const QPS_SQE: u32 = 5;
/// Error.
pub const QPS_ERR: u32 = 6;

// Attribute mask bits (verbs values).
/// `qp_state`.
pub const QP_ATTR_STATE: u32 = 1 << 0;
/// Current state (ignored).
pub const QP_ATTR_CUR_STATE: u32 = 1 << 1;
/// `qp_access_flags`.
pub const QP_ATTR_ACCESS_FLAGS: u32 = 1 << 3;
/// `pkey_index`.
pub const QP_ATTR_PKEY_INDEX: u32 = 1 << 4;
/// `port_num`.
pub const QP_ATTR_PORT: u32 = 1 << 5;
/// `qkey`.
pub const QP_ATTR_QKEY: u32 = 1 << 6;
/// `ah_attr`.
pub const QP_ATTR_AV: u32 = 1 << 7;
/// `path_mtu`.
pub const QP_ATTR_PATH_MTU: u32 = 1 << 8;
/// `timeout`.
pub const QP_ATTR_TIMEOUT: u32 = 1 << 9;
/// `retry_cnt`.
pub const QP_ATTR_RETRY_CNT: u32 = 1 << 10;
/// `rnr_retry`.
pub const QP_ATTR_RNR_RETRY: u32 = 1 << 11;
/// `rq_psn`.
pub const QP_ATTR_RQ_PSN: u32 = 1 << 12;
/// `max_rd_atomic`.
pub const QP_ATTR_MAX_QP_RD_ATOMIC: u32 = 1 << 13;
/// `min_rnr_timer`.
pub const QP_ATTR_MIN_RNR_TIMER: u32 = 1 << 15;
/// `sq_psn`.
pub const QP_ATTR_SQ_PSN: u32 = 1 << 16;
/// `max_dest_rd_atomic`.
pub const QP_ATTR_MAX_DEST_RD_ATOMIC: u32 = 1 << 17;
/// `dest_qp_num`.
pub const QP_ATTR_DEST_QPN: u32 = 1 << 20;
/// Every mask bit this revision accepts.
pub const QP_ATTR_SUPPORTED: u32 = QP_ATTR_STATE
    | QP_ATTR_CUR_STATE
    | QP_ATTR_ACCESS_FLAGS
    | QP_ATTR_PKEY_INDEX
    | QP_ATTR_PORT
    | QP_ATTR_QKEY
    | QP_ATTR_AV
    | QP_ATTR_PATH_MTU
    | QP_ATTR_TIMEOUT
    | QP_ATTR_RETRY_CNT
    | QP_ATTR_RNR_RETRY
    | QP_ATTR_RQ_PSN
    | QP_ATTR_MAX_QP_RD_ATOMIC
    | QP_ATTR_MIN_RNR_TIMER
    | QP_ATTR_SQ_PSN
    | QP_ATTR_MAX_DEST_RD_ATOMIC
    | QP_ATTR_DEST_QPN;

// ---------------------------------------------------------------------------------------------
// Doorbell area
// ---------------------------------------------------------------------------------------------

/// Header of the doorbell area (first 64 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DoorbellHeader {
    /// Written by the device: `DB_DEVICE_*` flags.
    pub device_flags: u32,
    /// Reserved for the driver, ignored by the device.
    pub driver_flags: u32,
    /// SQ summary: bit `w % 64` set = SQ bitmap word `w` may have bits set.
    pub sq_summary: u64,
    /// CQ-arm summary: bit `w % 64` set = CQ-arm bitmap word `w` may have bits set.
    pub cq_summary: u64,
    /// CQ-notify summary (device-written, with [`VRDMA_F_CQ_NOTIFY`]): bit `w % 64` set =
    /// CQ-notify bitmap word `w` may have bits set.
    pub cq_notify_summary: u64,
    /// Reserved.
    pub reserved: [u64; 4],
}

/// The device is polling the doorbell bitmaps: the driver need not notify.
pub const DB_DEVICE_POLLING: u32 = 1;
/// Byte offset of [`DoorbellHeader::sq_summary`].
pub const DB_SQ_SUMMARY_OFFSET: u64 = 8;
/// Byte offset of [`DoorbellHeader::cq_summary`].
pub const DB_CQ_SUMMARY_OFFSET: u64 = 16;
/// Byte offset of [`DoorbellHeader::cq_notify_summary`].
pub const DB_CQ_NOTIFY_SUMMARY_OFFSET: u64 = 24;

/// The summary word and bit that cover bitmap word `word`.
pub const fn db_summary_bit(word: u64) -> u64 {
    1 << (word % 64)
}

/// Byte offset of the SQ doorbell bitmap in the doorbell area.
pub const DB_SQ_BITMAP_OFFSET: u64 = 64;

/// Byte offset of the CQ-arm bitmap in the doorbell area for a device with `max_qp` QPs.
pub const fn db_cq_bitmap_offset(max_qp: u32) -> u64 {
    DB_SQ_BITMAP_OFFSET + bitmap_bytes(max_qp)
}

/// Byte offset of the CQ-notify bitmap (device-written, with [`VRDMA_F_CQ_NOTIFY`]) in the
/// doorbell area: right after the CQ-arm bitmap.
pub const fn db_cq_notify_bitmap_offset(max_qp: u32, max_cq: u32) -> u64 {
    db_cq_bitmap_offset(max_qp) + bitmap_bytes(max_cq)
}

/// Bytes of a bitmap with one bit per table index `0..=max` (u64 words).
pub const fn bitmap_bytes(max: u32) -> u64 {
    (max as u64 + 1).div_ceil(64) * 8
}

/// Doorbell area size for the given table sizes, rounded up to whole pages: room for every
/// bitmap of every feature (the value of [`VrdmaConfig::doorbell_area_size`]).
pub const fn doorbell_area_size(max_qp: u32, max_cq: u32) -> u64 {
    doorbell_area_min(max_qp, max_cq, VRDMA_F_CQ_NOTIFY)
}

/// The smallest doorbell area [`CMD_SET_DOORBELL_AREA`] accepts under the negotiated
/// `features`, rounded up to whole pages: the CQ-notify bitmap counts only with
/// [`VRDMA_F_CQ_NOTIFY`], so a driver without it may size the area as revision 1 did.
pub const fn doorbell_area_min(max_qp: u32, max_cq: u32, features: u64) -> u64 {
    let mut raw = db_cq_bitmap_offset(max_qp) + bitmap_bytes(max_cq);
    if features & VRDMA_F_CQ_NOTIFY != 0 {
        raw += bitmap_bytes(max_cq);
    }
    raw.div_ceil(VRDMA_PAGE_SIZE) * VRDMA_PAGE_SIZE
}

// ---------------------------------------------------------------------------------------------
// Rings
// ---------------------------------------------------------------------------------------------

/// Control block at slot position 0 of every ring (padded to the ring's stride).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingHeader {
    /// Free-running producer index (SQ/RQ: written by the driver; CQ: by the device).
    pub prod: u32,
    /// Reserved.
    pub reserved0: u32,
    /// Free-running consumer index (SQ/RQ: written by the device; CQ: by the driver).
    pub cons: u32,
    /// Reserved.
    pub reserved1: u32,
    /// CQ only, written by the driver: `(sequence << 2) | CQ_ARM_*`. A new sequence arms.
    pub arm: u32,
    /// CQ only, written by the driver before `arm`: its consumer index when arming.
    pub arm_cons: u32,
    /// Reserved.
    pub reserved2: [u32; 10],
}

/// Byte offset of [`RingHeader::prod`].
pub const RING_PROD_OFFSET: u64 = 0;
/// Byte offset of [`RingHeader::cons`].
pub const RING_CONS_OFFSET: u64 = 8;
/// Byte offset of [`RingHeader::arm`].
pub const RING_ARM_OFFSET: u64 = 16;
/// Byte offset of [`RingHeader::arm_cons`].
pub const RING_ARM_CONS_OFFSET: u64 = 20;

/// Arm for the next completion.
pub const CQ_ARM_NEXT: u32 = 1;
/// Arm for the next solicited (or error) completion.
pub const CQ_ARM_SOLICITED: u32 = 2;

/// Pages a ring of `depth` slots of `stride` bytes needs (the control block takes one slot).
pub const fn ring_pages(depth: u32, stride: u32) -> u64 {
    ((depth as u64 + 1) * stride as u64).div_ceil(VRDMA_PAGE_SIZE)
}

/// Minimum slot size.
pub const MIN_STRIDE: u32 = 64;
/// Maximum slot size.
pub const MAX_STRIDE: u32 = 4096;

/// A scatter/gather element.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sge {
    /// Address inside the MR named by `lkey`.
    pub addr: u64,
    /// Length in bytes.
    pub length: u32,
    /// Local key.
    pub lkey: u32,
}

/// Send WQE header (64 bytes), followed by `num_sge` [`Sge`]s or `inline_len` data bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendWqe {
    /// Returned in the completion.
    pub wr_id: u64,
    /// `WR_*` opcode.
    pub opcode: u8,
    /// `SEND_F_*` flags.
    pub flags: u8,
    /// Number of SGEs following the header (ignored with `SEND_F_INLINE`).
    pub num_sge: u16,
    /// Immediate data (network byte order, opaque to the device).
    pub imm_data: u32,
    /// Inline data bytes following the header (with `SEND_F_INLINE`).
    pub inline_len: u32,
    /// UD: address handle.
    pub ah: u32,
    /// RDMA/atomic: remote address.
    pub remote_addr: u64,
    /// RDMA/atomic: remote key.
    pub rkey: u32,
    /// UD: destination QP number.
    pub remote_qpn: u32,
    /// Atomic: compare (CMP_AND_SWP) or add (FETCH_AND_ADD) operand. UD: low 32 bits = Q_Key.
    pub compare_add: u64,
    /// Atomic: swap operand.
    pub swap: u64,
    /// With [`SEND_F_HDR_SGE`]: the SGE's address. Otherwise reserved (0).
    pub hdr_sge_addr: u64,
}

/// Receive WQE header (16 bytes), followed by `num_sge` [`Sge`]s.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecvWqe {
    /// Returned in the completion.
    pub wr_id: u64,
    /// Number of SGEs.
    pub num_sge: u32,
    /// Reserved.
    pub reserved: u32,
}

/// Size of [`SendWqe`].
pub const SEND_WQE_HDR: u32 = 64;
/// Size of [`RecvWqe`].
pub const RECV_WQE_HDR: u32 = 16;
/// Size of [`Sge`].
pub const SGE_SIZE: u32 = 16;

// Send opcodes (verbs values).
/// RDMA WRITE.
pub const WR_RDMA_WRITE: u8 = 0;
/// RDMA WRITE with immediate.
pub const WR_RDMA_WRITE_WITH_IMM: u8 = 1;
/// SEND.
pub const WR_SEND: u8 = 2;
/// SEND with immediate.
pub const WR_SEND_WITH_IMM: u8 = 3;
/// RDMA READ.
pub const WR_RDMA_READ: u8 = 4;
/// Atomic compare and swap (8 bytes).
pub const WR_ATOMIC_CMP_AND_SWP: u8 = 5;
/// Atomic fetch and add (8 bytes).
pub const WR_ATOMIC_FETCH_AND_ADD: u8 = 6;

// Send flags (verbs values).
/// Wait for prior READ/atomics to complete.
pub const SEND_F_FENCE: u8 = 1;
/// Generate a completion.
pub const SEND_F_SIGNALED: u8 = 2;
/// Set the solicited-event bit.
pub const SEND_F_SOLICITED: u8 = 4;
/// Data follows the header inline.
pub const SEND_F_INLINE: u8 = 8;
/// With [`VRDMA_F_HDR_SGE`], on an RC QP: the WQE's one SGE is in its header (address in
/// `hdr_sge_addr`, length in `inline_len`, lkey in `ah`: fields an RC WQE without inline data
/// does not otherwise use), `num_sge` is 1 and nothing follows the header.
pub const SEND_F_HDR_SGE: u8 = 16;

/// Whether a QP of `qp_type` may post [`SEND_F_HDR_SGE`] WQEs under the negotiated `features`:
/// [`VRDMA_F_HDR_SGE`] and an RC QP.
pub fn hdr_sge_usable(features: u64, qp_type: u8) -> bool {
    features & VRDMA_F_HDR_SGE != 0 && qp_type == QPT_RC
}

impl SendWqe {
    /// The SGE a [`SEND_F_HDR_SGE`] WQE carries in its header.
    pub fn hdr_sge(&self) -> Sge {
        Sge {
            addr: self.hdr_sge_addr,
            length: self.inline_len,
            lkey: self.ah,
        }
    }

    /// Stores `sge` in the header and sets [`SEND_F_HDR_SGE`] and `num_sge` = 1.
    pub fn set_hdr_sge(&mut self, sge: Sge) {
        self.flags |= SEND_F_HDR_SGE;
        self.num_sge = 1;
        self.hdr_sge_addr = sge.addr;
        self.inline_len = sge.length;
        self.ah = sge.lkey;
    }
}

/// Completion queue entry (64 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cqe {
    /// The WR's `wr_id`.
    pub wr_id: u64,
    /// The local QP.
    pub qpn: u32,
    /// Bytes transferred (receives, READ, atomics).
    pub byte_len: u32,
    /// Immediate data (with `WC_F_WITH_IMM`).
    pub imm_data: u32,
    /// UD receives: source QP.
    pub src_qp: u32,
    /// `WC_*` status.
    pub status: u8,
    /// `WC_OP_*` opcode.
    pub opcode: u8,
    /// `WC_F_*` flags.
    pub wc_flags: u8,
    /// Reserved.
    pub reserved0: u8,
    /// Device-specific detail for an error status (`VENDOR_ERR_*`).
    pub vendor_err: u32,
    /// Reserved.
    pub reserved1: [u8; 31],
    /// Phase bit: 1 on the first lap of the ring, 0 on the second, and so on. Written last.
    pub owner: u8,
}

/// Size of a CQE slot.
pub const CQE_SIZE: u32 = 64;
/// Byte offset of [`Cqe::owner`].
pub const CQE_OWNER_OFFSET: u64 = 63;

/// Owner value the device writes for absolute CQE position `pos` in a ring of `depth` slots:
/// 1 on the first lap, 0 on the second, and so on (`depth` is a power of two; the lap is then a
/// shift, not a division, on every CQE written and polled).
pub const fn cqe_owner(pos: u32, depth: u32) -> u8 {
    let lap = if depth.is_power_of_two() {
        pos >> depth.trailing_zeros()
    } else {
        pos / depth
    };
    ((lap & 1) ^ 1) as u8
}

// Completion status (verbs values).
/// Success.
pub const WC_SUCCESS: u8 = 0;
/// Local length error.
pub const WC_LOC_LEN_ERR: u8 = 1;
/// Local QP operation error.
pub const WC_LOC_QP_OP_ERR: u8 = 2;
/// Local protection error.
pub const WC_LOC_PROT_ERR: u8 = 4;
/// Flushed.
pub const WC_WR_FLUSH_ERR: u8 = 5;
/// Bad response.
pub const WC_BAD_RESP_ERR: u8 = 7;
/// Local access error.
pub const WC_LOC_ACCESS_ERR: u8 = 8;
/// Remote invalid request.
pub const WC_REM_INV_REQ_ERR: u8 = 9;
/// Remote access error.
pub const WC_REM_ACCESS_ERR: u8 = 10;
/// Remote operation error.
pub const WC_REM_OP_ERR: u8 = 11;
/// Transport retry counter exceeded.
pub const WC_RETRY_EXC_ERR: u8 = 12;
/// RNR retry counter exceeded.
pub const WC_RNR_RETRY_EXC_ERR: u8 = 13;
/// General error.
pub const WC_GENERAL_ERR: u8 = 21;

// Completion opcodes (verbs values).
/// SEND completed.
pub const WC_OP_SEND: u8 = 0;
/// RDMA WRITE completed.
pub const WC_OP_RDMA_WRITE: u8 = 1;
/// RDMA READ completed.
pub const WC_OP_RDMA_READ: u8 = 2;
/// Compare and swap completed.
pub const WC_OP_COMP_SWAP: u8 = 3;
/// Fetch and add completed.
pub const WC_OP_FETCH_ADD: u8 = 4;
/// A receive completed.
pub const WC_OP_RECV: u8 = 128;
/// A receive consumed by RDMA WRITE with immediate.
pub const WC_OP_RECV_RDMA_WITH_IMM: u8 = 129;

/// Completion flag: a GRH is present in the first 40 bytes of the receive buffer (UD).
pub const WC_F_GRH: u8 = 1;
/// Completion flag: `imm_data` is valid.
pub const WC_F_WITH_IMM: u8 = 2;

/// Bytes of the GRH a UD receive places before the payload.
pub const GRH_SIZE: u32 = 40;

/// Vendor error: malformed WQE (bad opcode, SGE count, inline length or flags).
pub const VENDOR_ERR_BAD_WQE: u32 = 1;
/// Vendor error: SGE outside its MR, bad lkey or missing local access.
pub const VENDOR_ERR_BAD_SGE: u32 = 2;
/// Vendor error: bad address handle.
pub const VENDOR_ERR_BAD_AH: u32 = 3;
/// Vendor error: the ring's producer index moved more than the ring's depth.
pub const VENDOR_ERR_RING_OVERRUN: u32 = 4;

// ---------------------------------------------------------------------------------------------
// Event queue
// ---------------------------------------------------------------------------------------------

/// One event, written by the device into a driver-supplied event-queue buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// `EV_*` kind.
    pub kind: u32,
    /// The CQ or QP handle it concerns.
    pub handle: u32,
    /// Kind-specific detail.
    pub detail: u64,
}

/// Size of [`Event`].
pub const EVENT_SIZE: u32 = 16;

/// An armed CQ received a completion.
pub const EV_CQ_COMP: u32 = 1;
/// A CQ overflowed; its QPs moved to ERR.
pub const EV_CQ_ERR: u32 = 2;
/// A QP moved to ERR because of a local or remote error.
pub const EV_QP_FATAL: u32 = 3;
/// A QP in SQD finished draining its send queue.
pub const EV_SQ_DRAINED: u32 = 4;
/// The event queue had no buffer for some events; `detail` counts those dropped.
pub const EV_OVERFLOW: u32 = 5;

macro_rules! byte_valued {
    ($($t:ty),* $(,)?) => {$(
        // SAFETY: `$t` is `#[repr(C)]`, built only from integers and arrays of integers with
        // explicit padding fields, so it has no implicit padding and every bit pattern is valid.
        unsafe impl ByteValued for $t {}
    )*};
}

byte_valued!(
    VrdmaConfig,
    CtrlHdr,
    CtrlResp,
    CmdHandle,
    RespHandle,
    CmdQueryPort,
    PortAttr,
    CmdQueryGid,
    Gid,
    CmdSetDoorbellArea,
    CmdRegMr,
    RespRegMr,
    CmdCreateCq,
    CmdCreateQp,
    RespCreateQp,
    AhAttr,
    CmdCreateAh,
    QpAttr,
    CmdModifyQp,
    CmdIntrModeration,
    DoorbellHeader,
    RingHeader,
    Sge,
    SendWqe,
    RecvWqe,
    Cqe,
    Event,
);

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::size_of;

    #[test]
    fn layouts_are_fixed() {
        assert_eq!(size_of::<VrdmaConfig>(), 104);
        assert_eq!(size_of::<CtrlHdr>(), 8);
        assert_eq!(size_of::<CtrlResp>(), 8);
        assert_eq!(size_of::<PortAttr>(), 32);
        assert_eq!(size_of::<Gid>(), 16);
        assert_eq!(size_of::<CmdRegMr>(), 32);
        assert_eq!(size_of::<CmdCreateQp>(), 40);
        assert_eq!(size_of::<RespCreateQp>(), 16);
        assert_eq!(size_of::<AhAttr>(), 32);
        assert_eq!(size_of::<CmdCreateAh>(), 40);
        assert_eq!(size_of::<QpAttr>(), 96);
        assert_eq!(size_of::<CmdModifyQp>(), 104);
        assert_eq!(size_of::<DoorbellHeader>(), 64);
        assert_eq!(size_of::<RingHeader>(), 64);
        assert_eq!(size_of::<Sge>() as u32, SGE_SIZE);
        assert_eq!(size_of::<SendWqe>() as u32, SEND_WQE_HDR);
        assert_eq!(size_of::<RecvWqe>() as u32, RECV_WQE_HDR);
        assert_eq!(size_of::<Cqe>() as u32, CQE_SIZE);
        assert_eq!(std::mem::offset_of!(Cqe, owner) as u64, CQE_OWNER_OFFSET);
        assert_eq!(size_of::<Event>() as u32, EVENT_SIZE);
        assert_eq!(
            std::mem::offset_of!(DoorbellHeader, sq_summary) as u64,
            DB_SQ_SUMMARY_OFFSET
        );
        assert_eq!(
            std::mem::offset_of!(DoorbellHeader, cq_summary) as u64,
            DB_CQ_SUMMARY_OFFSET
        );
        assert_eq!(
            std::mem::offset_of!(DoorbellHeader, cq_notify_summary) as u64,
            DB_CQ_NOTIFY_SUMMARY_OFFSET
        );
        assert_eq!(
            std::mem::offset_of!(RingHeader, cons) as u64,
            RING_CONS_OFFSET
        );
        assert_eq!(
            std::mem::offset_of!(RingHeader, arm) as u64,
            RING_ARM_OFFSET
        );
        assert_eq!(
            std::mem::offset_of!(RingHeader, arm_cons) as u64,
            RING_ARM_CONS_OFFSET
        );
    }

    #[test]
    fn handles_round_trip() {
        let h = make_handle(0x1234, 0xab);
        assert_eq!(handle_index(h), 0x1234);
        assert_eq!(handle_key(h), 0xab);
    }

    #[test]
    fn owner_flips_each_lap() {
        assert_eq!(cqe_owner(0, 4), 1);
        assert_eq!(cqe_owner(3, 4), 1);
        assert_eq!(cqe_owner(4, 4), 0);
        assert_eq!(cqe_owner(8, 4), 1);
        assert_eq!(cqe_owner(u32::MAX, 4), 0);
        // Not a power of two (never a valid depth): still the lap by division.
        assert_eq!(cqe_owner(5, 3), 0);
        assert_eq!(cqe_owner(6, 3), 1);
    }

    #[test]
    fn ring_and_doorbell_sizes() {
        assert_eq!(ring_pages(63, 64), 1);
        assert_eq!(ring_pages(64, 64), 2);
        assert_eq!(mtu_bytes(MTU_256), 256);
        assert_eq!(mtu_bytes(MTU_4096), 4096);
        assert_eq!(mtu_bytes(9), 0);
        assert_eq!(doorbell_area_size(16383, 16383), 8192);
        assert_eq!(db_cq_notify_bitmap_offset(16383, 16383), 64 + 2048 + 2048);
        // 64 + 2 × 8 + 2 × 4096 bytes: only the notify bitmap spills into a third page.
        assert_eq!(doorbell_area_min(127, 32767, 0), 8192);
        assert_eq!(doorbell_area_min(127, 32767, VRDMA_F_CQ_NOTIFY), 12288);
        assert_eq!(doorbell_area_size(127, 32767), 12288);
    }
}
