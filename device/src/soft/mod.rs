//! The soft fabric (placeholder while it lands).
use std::sync::{Arc, Weak};

use vrdma_abi::Gid;

use crate::device::Vrdma;

/// Ports with pending work, to be driven after the caller released its device lock.
#[derive(Default, Debug)]
pub struct Work {
    ports: Vec<Arc<Port>>,
}

/// The in-process fabric.
#[derive(Debug, Default)]
pub struct SoftFabric {}

impl SoftFabric {
    /// A new, empty fabric.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }
    pub(crate) fn attach(&self, _p: Arc<Port>) -> Result<(), String> {
        Ok(())
    }
    pub(crate) fn detach(&self, _p: &Port) {}
    pub(crate) fn run(&self, w: Work) {
        drop(w)
    }
}

/// A device's attachment to the fabric.
#[derive(Debug)]
pub struct Port {
    fabric: Arc<SoftFabric>,
    #[allow(dead_code)]
    gid: Gid,
    #[allow(dead_code)]
    dev: Weak<Vrdma>,
}

impl Port {
    pub(crate) fn new(fabric: Arc<SoftFabric>, gid: Gid, dev: Weak<Vrdma>) -> Arc<Self> {
        Arc::new(Self { fabric, gid, dev })
    }
    pub(crate) fn fabric(&self) -> &Arc<SoftFabric> {
        &self.fabric
    }
}
