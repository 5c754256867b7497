//! Errors of the guest driver.

use vrdma_abi as abi;

/// Everything that can go wrong in the driver.
///
/// The variants carry no heap data, so returning an error from the data path never allocates.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The register window does not belong to a vrdma virtio-mmio (version 2) device.
    #[error("not a vrdma virtio-mmio v2 device: {what} is {value:#x}")]
    NotVrdma {
        /// The register or field that did not match.
        what: &'static str,
        /// The value found.
        value: u64,
    },
    /// Feature negotiation failed (VIRTIO_F_VERSION_1 not offered, or FEATURES_OK not kept).
    #[error("feature negotiation failed: {0}")]
    Features(&'static str),
    /// A virtqueue could not be set up.
    #[error("virtqueue {queue} setup failed: {what}")]
    QueueSetup {
        /// Queue index.
        queue: u16,
        /// What went wrong.
        what: &'static str,
    },
    /// The device answered a control command with a status other than [`abi::STATUS_OK`].
    #[error("control command {cmd} ({}) failed: status {status} ({})", cmd_name(*cmd), status_name(*status))]
    Status {
        /// The `CMD_*` value.
        cmd: u32,
        /// The `STATUS_*` value.
        status: u32,
    },
    /// The device did not answer in time.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// The guest memory range handed to the allocator is exhausted (or too fragmented).
    #[error("guest allocator: cannot allocate {count} block(s) of {block_size} bytes ({layout})")]
    OutOfMemory {
        /// Number of blocks requested.
        count: u64,
        /// Size of each block.
        block_size: u64,
        /// The requested layout.
        layout: &'static str,
    },
    /// Not enough free slots in a send or receive queue for the work requests (like ENOMEM from
    /// `ibv_post_send`). Nothing was posted.
    #[error("{queue} full: {needed} slot(s) needed, {free} free")]
    QueueFull {
        /// "send queue", "receive queue" or "control queue".
        queue: &'static str,
        /// Slots needed.
        needed: u32,
        /// Slots free.
        free: u32,
    },
    /// A work request the driver refuses to post (like EINVAL from `ibv_post_send`). Nothing was
    /// posted. Use the `*_unchecked` / raw helpers to hand such requests to the device anyway.
    #[error("invalid work request #{index}: {what}")]
    InvalidWr {
        /// Index of the offending request in the batch.
        index: usize,
        /// Why it was refused.
        what: &'static str,
    },
    /// A caller-supplied argument is out of range.
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
    /// The device broke the protocol (bad used-ring entry, short response, ...).
    #[error("device protocol violation: {0}")]
    Protocol(&'static str),
    /// The device is not live (reset, or DRIVER_OK never reached): no control commands.
    #[error("device is not active (reset or not initialized)")]
    NotActive,
    /// A guest-memory access failed (an address outside guest memory).
    #[error("guest memory access failed: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    /// A volatile/atomic access to guest memory failed (misaligned or out of range).
    #[error("guest memory atomic access failed: {0}")]
    Volatile(#[from] vm_memory::VolatileMemoryError),
}

/// Result type of the driver.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The device status code if this is an [`Error::Status`].
    pub fn status(&self) -> Option<u32> {
        match self {
            Error::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Name of a `STATUS_*` code.
pub fn status_name(status: u32) -> &'static str {
    match status {
        abi::STATUS_OK => "OK",
        abi::STATUS_INVALID => "INVALID",
        abi::STATUS_NO_RESOURCE => "NO_RESOURCE",
        abi::STATUS_BAD_HANDLE => "BAD_HANDLE",
        abi::STATUS_BUSY => "BUSY",
        abi::STATUS_BAD_STATE => "BAD_STATE",
        abi::STATUS_UNSUPPORTED => "UNSUPPORTED",
        abi::STATUS_BAD_ADDRESS => "BAD_ADDRESS",
        abi::STATUS_BAD_LENGTH => "BAD_LENGTH",
        _ => "unknown",
    }
}

/// Name of a `CMD_*` code.
pub fn cmd_name(cmd: u32) -> &'static str {
    match cmd {
        abi::CMD_QUERY_DEVICE => "QUERY_DEVICE",
        abi::CMD_QUERY_PORT => "QUERY_PORT",
        abi::CMD_QUERY_GID => "QUERY_GID",
        abi::CMD_SET_DOORBELL_AREA => "SET_DOORBELL_AREA",
        abi::CMD_CREATE_PD => "CREATE_PD",
        abi::CMD_DESTROY_PD => "DESTROY_PD",
        abi::CMD_REG_MR => "REG_MR",
        abi::CMD_DEREG_MR => "DEREG_MR",
        abi::CMD_CREATE_CQ => "CREATE_CQ",
        abi::CMD_DESTROY_CQ => "DESTROY_CQ",
        abi::CMD_CREATE_QP => "CREATE_QP",
        abi::CMD_MODIFY_QP => "MODIFY_QP",
        abi::CMD_QUERY_QP => "QUERY_QP",
        abi::CMD_DESTROY_QP => "DESTROY_QP",
        abi::CMD_CREATE_AH => "CREATE_AH",
        abi::CMD_DESTROY_AH => "DESTROY_AH",
        abi::CMD_SET_INTR_MODERATION => "SET_INTR_MODERATION",
        _ => "unknown",
    }
}

/// Name of a `WC_*` completion status.
pub fn wc_status_name(status: u8) -> &'static str {
    match status {
        abi::WC_SUCCESS => "SUCCESS",
        abi::WC_LOC_LEN_ERR => "LOC_LEN_ERR",
        abi::WC_LOC_QP_OP_ERR => "LOC_QP_OP_ERR",
        abi::WC_LOC_PROT_ERR => "LOC_PROT_ERR",
        abi::WC_WR_FLUSH_ERR => "WR_FLUSH_ERR",
        abi::WC_BAD_RESP_ERR => "BAD_RESP_ERR",
        abi::WC_LOC_ACCESS_ERR => "LOC_ACCESS_ERR",
        abi::WC_REM_INV_REQ_ERR => "REM_INV_REQ_ERR",
        abi::WC_REM_ACCESS_ERR => "REM_ACCESS_ERR",
        abi::WC_REM_OP_ERR => "REM_OP_ERR",
        abi::WC_RETRY_EXC_ERR => "RETRY_EXC_ERR",
        abi::WC_RNR_RETRY_EXC_ERR => "RNR_RETRY_EXC_ERR",
        abi::WC_GENERAL_ERR => "GENERAL_ERR",
        _ => "unknown",
    }
}
