//! Errors of the device model.

use thiserror::Error;

/// Errors returned to the transport on activation.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ActivateError {
    /// The driver gave the wrong number of queues.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device needs.
        expected: usize,
        /// Queues given.
        got: usize,
    },
    /// A queue is not ready or its rings lie outside guest memory.
    #[error("queue {0} is not valid")]
    InvalidQueue(usize),
    /// VIRTIO_F_VERSION_1 was not negotiated.
    #[error("the driver did not accept VIRTIO_F_VERSION_1")]
    NoVersion1,
    /// The device is already active.
    #[error("the device is already active")]
    AlreadyActive,
}

/// Errors of device construction.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DeviceError {
    /// A configured limit is out of range.
    #[error("invalid device configuration: {0}")]
    InvalidConfig(&'static str),
    /// The fabric refused the device (e.g. its GID is already attached).
    #[error("fabric: {0}")]
    Fabric(String),
}
