//! Device state (placeholder while the device core lands).
use std::sync::Arc;
use std::time::Instant;

use virtio_queue::Queue;

use crate::device::DeviceConfig;
use crate::interrupt::Interrupt;
use crate::soft::{Port, Work};
use crate::GuestMemoryMmap;

pub(crate) struct Active {
    pub mem: Arc<GuestMemoryMmap>,
    pub queues: Vec<Queue>,
    pub irq: Arc<dyn Interrupt>,
}

pub(crate) struct State {
    pub acked_features: u64,
    pub active: Option<Active>,
    #[allow(dead_code)]
    cfg: DeviceConfig,
    #[allow(dead_code)]
    port: Arc<Port>,
    work: Work,
}

impl State {
    pub fn new(cfg: DeviceConfig, port: Arc<Port>) -> Self {
        Self { acked_features: 0, active: None, cfg, port, work: Work::default() }
    }
    pub fn activate(&mut self, mem: Arc<GuestMemoryMmap>, queues: Vec<Queue>, irq: Arc<dyn Interrupt>) {
        self.active = Some(Active { mem, queues, irq });
    }
    pub fn process_ctrlq(&mut self) {}
    pub fn process_doorbells(&mut self) {}
    pub fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
    }
    pub fn process_inbound(&mut self, _port: &Port, _now: Instant) {}
    pub fn take_fabric_work(&mut self) -> Work {
        std::mem::take(&mut self.work)
    }
}
