//! vrdma device model: a paravirtual RDMA device (virtio device ID 42) for rust-vmm VMMs.
//!
//! The crate is transport-agnostic and knows nothing of KVM. A transport (virtio-mmio or
//! virtio-pci, see `vrdma-glue`) forwards feature negotiation, config-space reads, queue setup and
//! queue notifications to a [`Vrdma`] device; the device raises interrupts through the small
//! [`Interrupt`] trait.
//!
//! The guest ABI (control queue, doorbell area, rings in guest memory) is specified in
//! `docs/abi.md` and encoded in the `vrdma-abi` crate. Every value a guest writes is treated as
//! hostile: it is validated before use, and bad input yields an error status or an error
//! completion, never a panic or an access outside that guest's memory.
//!
//! Verbs are executed by a [`backend::Backend`]. The embedded default is the soft fabric
//! ([`soft::SoftFabric`]): devices attached to one fabric exchange RC/UD traffic with InfiniBand
//! semantics, copying data once, straight from one guest's memory into the other's.
#![deny(missing_docs)]

pub mod backend;
mod ctrl;
pub mod device;
pub mod dirty;
pub mod error;
mod gm;
pub mod interrupt;
pub mod mr;
pub mod persist;
pub mod qp;
pub mod ring;
pub mod soft;
mod state;
pub mod tables;

pub use device::{DeviceConfig, Vrdma};
pub use error::{ActivateError, DeviceError};
pub use interrupt::{EventFdInterrupt, Interrupt, InterruptKind};
pub use persist::{MigrationError, MigrationState, PrecopyState};

/// Guest memory as the device sees it: mmap-backed, with a dirty log that records every write the
/// device makes while a VMM's migration loop has logging on ([`dirty::start`]).
pub use vrdma_memory::GuestMemoryMmap;
