//! The virtio surface of the device: features, config space, activation, notifications, reset.
//!
//! A transport owns the virtio registers and the queue configuration; on DRIVER_OK it calls
//! [`Vrdma::activate`] with the guest memory, the configured queues and an [`Interrupt`]. Every
//! later driver notification is forwarded to [`Vrdma::queue_notify`], which does the work in the
//! caller's thread (a vCPU thread on an MMIO exit, or an event-loop thread on an ioeventfd).

use std::sync::{Arc, Mutex, MutexGuard};

use crossbeam_utils::CachePadded;

use virtio_queue::{Queue, QueueT};
use vm_memory::ByteValued;
use vrdma_abi as abi;

use crate::error::{ActivateError, DeviceError};
use crate::interrupt::Interrupt;
use crate::persist::{MigrationError, MigrationState, PrecopyState};
use crate::soft::{Port, SoftFabric};
use crate::{state::State, GuestMemoryMmap};

/// Limits and identity of one device. Every limit bounds host memory a guest can make the
/// device allocate.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceConfig {
    /// The port's GID (index 0 of the GID table); the device's address on the fabric.
    pub gid: abi::Gid,
    /// Node GUID.
    pub node_guid: u64,
    /// Maximum QPs.
    pub max_qp: u32,
    /// Maximum WRs per send or receive queue.
    pub max_qp_wr: u32,
    /// Maximum SGEs per WR.
    pub max_sge: u32,
    /// Maximum inline bytes.
    pub max_inline: u32,
    /// Maximum CQs.
    pub max_cq: u32,
    /// Maximum CQEs per CQ.
    pub max_cqe: u32,
    /// Maximum MRs.
    pub max_mr: u32,
    /// Maximum PDs.
    pub max_pd: u32,
    /// Maximum AHs.
    pub max_ah: u32,
    /// Maximum outstanding READ/atomics per QP.
    pub max_qp_rd_atom: u32,
    /// Maximum pages of one MR.
    pub max_mr_pages: u32,
    /// Maximum pages of one ring.
    pub max_ring_pages: u32,
    /// Maximum bytes of one MR.
    pub max_mr_size: u64,
    /// Maximum MR pages over all MRs.
    pub max_total_mr_pages: u64,
    /// Maximum ring pages over all SQs, RQs and CQs.
    pub max_total_ring_pages: u64,
}

impl DeviceConfig {
    /// Default limits with the given GID.
    pub fn with_gid(gid: abi::Gid) -> Self {
        Self {
            gid,
            node_guid: u64::from_be_bytes(gid.raw[8..16].try_into().unwrap_or([0; 8])),
            max_qp: 16383,
            max_qp_wr: 4096,
            max_sge: 30,
            max_inline: 512,
            max_cq: 16383,
            max_cqe: 65536,
            max_mr: 65535,
            max_pd: 4095,
            max_ah: 16383,
            max_qp_rd_atom: 16,
            max_mr_pages: 1 << 20,
            max_ring_pages: 2048,
            max_mr_size: 1 << 32,
            max_total_mr_pages: 1 << 22,
            max_total_ring_pages: 1 << 18,
        }
    }

    /// A GID for a device on the soft fabric: IPv4-mapped `10.0.0.<n>` style, from a small id.
    pub fn gid_for_id(id: u32) -> abi::Gid {
        let mut raw = [0u8; 16];
        raw[10] = 0xff;
        raw[11] = 0xff;
        raw[12] = 10;
        raw[13..16].copy_from_slice(&id.to_be_bytes()[1..4]);
        abi::Gid { raw }
    }

    pub(crate) fn validate(&self) -> Result<(), DeviceError> {
        let check = |ok: bool, what: &'static str| {
            if ok {
                Ok(())
            } else {
                Err(DeviceError::InvalidConfig(what))
            }
        };
        // Handles carry a 24-bit index at most (QPNs are 24 bits with an 8-bit key byte).
        check(
            (1..=0xffff).contains(&self.max_qp),
            "max_qp must be 1..=65535",
        )?;
        check(
            (1..=0xffff).contains(&self.max_cq),
            "max_cq must be 1..=65535",
        )?;
        check((1..=0xff_ffff).contains(&self.max_mr), "max_mr")?;
        check((1..=0xff_ffff).contains(&self.max_pd), "max_pd")?;
        check((1..=0xff_ffff).contains(&self.max_ah), "max_ah")?;
        check(
            self.max_qp_wr.is_power_of_two() && self.max_qp_wr <= 1 << 15,
            "max_qp_wr",
        )?;
        check(
            self.max_cqe.is_power_of_two() && self.max_cqe <= 1 << 22,
            "max_cqe",
        )?;
        check((1..=255).contains(&self.max_sge), "max_sge")?;
        check(
            self.max_inline <= abi::MAX_STRIDE - abi::SEND_WQE_HDR,
            "max_inline",
        )?;
        check((1..=255).contains(&self.max_qp_rd_atom), "max_qp_rd_atom")?;
        check(self.max_mr_pages >= 1, "max_mr_pages")?;
        check(
            (1..=1 << 16).contains(&self.max_ring_pages),
            "max_ring_pages",
        )?;
        Ok(())
    }

    /// The config space this configuration presents.
    pub fn config_space(&self) -> abi::VrdmaConfig {
        abi::VrdmaConfig {
            abi_version: abi::ABI_VERSION,
            phys_port_cnt: 1,
            max_qp: self.max_qp,
            max_qp_wr: self.max_qp_wr,
            max_sge: self.max_sge,
            max_inline: self.max_inline,
            max_cq: self.max_cq,
            max_cqe: self.max_cqe,
            max_mr: self.max_mr,
            max_pd: self.max_pd,
            max_ah: self.max_ah,
            max_qp_rd_atom: self.max_qp_rd_atom,
            gid_tbl_len: 1,
            max_mr_pages: self.max_mr_pages,
            max_ring_pages: self.max_ring_pages,
            doorbell_area_size: abi::doorbell_area_size(self.max_qp, self.max_cq) as u32,
            max_mr_size: self.max_mr_size,
            // 4 KiB to 1 GiB pages.
            page_size_cap: (12..=30).fold(0u64, |m, s| m | (1 << s)),
            node_guid: self.node_guid,
            max_total_mr_pages: self.max_total_mr_pages,
            max_total_ring_pages: self.max_total_ring_pages,
        }
    }
}

/// Features the device offers.
pub const AVAIL_FEATURES: u64 = abi::VIRTIO_F_VERSION_1
    | abi::VRDMA_F_UD
    | abi::VRDMA_F_ATOMICS
    | abi::VRDMA_F_DB_SUPPRESSION
    | abi::VRDMA_F_INTR_MODERATION
    | abi::VRDMA_F_CQ_NOTIFY
    | abi::VRDMA_F_HDR_SGE;

/// A vrdma device.
pub struct Vrdma {
    cfg: DeviceConfig,
    config_space: abi::VrdmaConfig,
    port: Arc<Port>,
    state: Mutex<State>,
    /// Built by [`Vrdma::restore`] and not yet resumed (not yet attached to the fabric).
    restored: std::sync::atomic::AtomicBool,
    /// Where the doorbell area is, as the state last said: the doorbell scan runs before
    /// the state lock is taken (see [`Vrdma::queue_notify`]). Only this guest's notifications
    /// take it, and it has lines of its own: no other thread writes them.
    doorbells: CachePadded<Mutex<Option<DoorbellArea>>>,
}

/// The guest memory and guest-physical address of a registered doorbell area.
struct DoorbellArea {
    mem: Arc<GuestMemoryMmap>,
    gpa: u64,
}

impl std::fmt::Debug for Vrdma {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vrdma").field("gid", &self.cfg.gid).finish()
    }
}

impl Vrdma {
    /// Creates a device and attaches it to the soft fabric under `cfg.gid`.
    pub fn new(cfg: DeviceConfig, fabric: &Arc<SoftFabric>) -> Result<Arc<Self>, DeviceError> {
        cfg.validate()?;
        let config_space = cfg.config_space();
        let dev = Arc::new_cyclic(|weak| {
            let port = Port::new(fabric.clone(), cfg.gid, weak.clone());
            Vrdma {
                config_space,
                state: Mutex::new(State::new(cfg.clone(), port.clone())),
                cfg,
                port,
                restored: std::sync::atomic::AtomicBool::new(false),
                doorbells: Default::default(),
            }
        });
        fabric
            .attach(dev.port.clone())
            .map_err(|e| DeviceError::Fabric(e.to_string()))?;
        Ok(dev)
    }

    /// The device's configuration.
    pub fn config(&self) -> &DeviceConfig {
        &self.cfg
    }

    /// Virtio device type (42).
    pub fn device_type(&self) -> u32 {
        abi::VIRTIO_ID_RDMA
    }

    /// Features offered to the driver.
    pub fn avail_features(&self) -> u64 {
        AVAIL_FEATURES
    }

    /// Records the features the driver accepted; unknown bits are dropped.
    pub fn ack_features(&self, features: u64) {
        self.lock().acked_features = features & AVAIL_FEATURES;
    }

    /// Features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.lock().acked_features
    }

    /// Maximum size of each queue (index = queue index).
    pub fn queue_max_sizes(&self) -> [u16; abi::NUM_QUEUES] {
        [abi::QUEUE_MAX_SIZE; abi::NUM_QUEUES]
    }

    /// Reads the config space. Bytes past its end read as zero; the read never fails.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        let bytes = self.config_space.as_slice();
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| bytes.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    /// Writes to the config space are ignored: it is read-only.
    pub fn write_config(&self, offset: u64, data: &[u8]) {
        tracing::debug!(
            offset,
            len = data.len(),
            "ignored write to read-only config space"
        );
    }

    /// Activates the device (the driver set DRIVER_OK).
    pub fn activate(
        &self,
        mem: Arc<GuestMemoryMmap>,
        queues: Vec<Queue>,
        irq: Arc<dyn Interrupt>,
    ) -> Result<(), ActivateError> {
        let mut st = self.lock();
        if st.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        if st.acked_features & abi::VIRTIO_F_VERSION_1 == 0 {
            return Err(ActivateError::NoVersion1);
        }
        if queues.len() != abi::NUM_QUEUES {
            return Err(ActivateError::QueueCount {
                expected: abi::NUM_QUEUES,
                got: queues.len(),
            });
        }
        for (i, q) in queues.iter().enumerate() {
            if !q.is_valid(mem.as_ref()) {
                return Err(ActivateError::InvalidQueue(i));
            }
        }
        st.activate(mem, queues, irq);
        self.note_doorbells(&st);
        Ok(())
    }

    /// Whether the device is active.
    pub fn is_active(&self) -> bool {
        self.lock().active.is_some()
    }

    /// The driver notified queue `index`. The control queue executes pending commands; the
    /// event queue is also the doorbell: the device takes new event buffers and scans the
    /// doorbell area. Unknown indices are ignored.
    ///
    /// The doorbell area is scanned before the device lock is taken. On the direct path a
    /// peer's thread takes this device's lock (its messages run this device's responder), so
    /// the lock's cache line is usually on the peer's core when the guest rings: its transfer
    /// is started first and runs while the scan swaps the doorbell words. The bits taken are
    /// processed under the lock just after; if the device is stopped meanwhile, they are
    /// dropped, as resume rescans every queue anyway.
    pub fn queue_notify(&self, index: u16) {
        let mut rung = crate::state::Doorbells::default();
        if index == abi::EVENTQ {
            vrdma_memory::prefetch_for_write((&self.state as *const Mutex<State>).cast());
            let area = self.doorbells.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(a) = area.as_ref() {
                crate::state::take_doorbells(
                    &a.mem,
                    a.gpa,
                    self.cfg.max_qp,
                    self.cfg.max_cq,
                    &mut rung,
                );
            }
        }
        let (work, peer) = {
            let mut st = self.lock();
            if !st.mig.processes_guest_work() {
                // Stopped for migration (the vCPUs should be paused): resume rescans everything.
                return;
            }
            match index {
                abi::CTRLQ => {
                    st.process_ctrlq();
                    self.note_doorbells(&st);
                }
                abi::EVENTQ => st.process_doorbells(&rung),
                _ => tracing::debug!(index, "notification for unknown queue"),
            }
            (st.take_fabric_work(), st.backend.last_peer())
        };
        // Both locks this entry took go to the shared cache once this device's lock is free:
        // this device's is usually taken next by a peer's thread (running this device's
        // responder on the direct path), the peer's by that peer's own thread (its guest's next
        // post). Write-lat poll, in-process A/B: x0.97-0.99 (three series of 24-30 rounds);
        // interrupt x0.999. Demoting the peer's lock at once after the direct call, while this
        // device's lock was still held, was worse (x1.035-1.064 against this), and on the
        // bare fabric path (no device) 20-35 % slower: it lengthened the hold of the sender's
        // own lock, which the peer's next direct call then found taken.
        vrdma_memory::demote(crate::soft::Endpoint::hot_line(self));
        if peer != 0 {
            vrdma_memory::demote(peer as *const u8);
        }
        self.port.fabric().run(work);
    }

    /// Records where the state says the doorbell area is (after anything that may change it:
    /// activation, control commands, reset, resume). Called with the state locked.
    fn note_doorbells(&self, st: &State) {
        let mut noted = self.doorbells.lock().unwrap_or_else(|e| e.into_inner());
        let same = match (&*noted, &st.core.mem, st.core.db_gpa) {
            (Some(a), Some(mem), Some(gpa)) => a.gpa == gpa && Arc::ptr_eq(&a.mem, mem),
            (None, _, None) | (None, None, _) => true,
            _ => false,
        };
        // Unchanged (most control commands): no clone, so no write to the memory's reference
        // count, whose line the guest's and the peers' threads read.
        if !same {
            *noted = match (&st.core.mem, st.core.db_gpa) {
                (Some(mem), Some(gpa)) => Some(DoorbellArea {
                    mem: mem.clone(),
                    gpa,
                }),
                _ => None,
            };
        }
    }

    /// Resets the device: every outstanding work request is flushed to its CQ (so none is
    /// lost), every resource is destroyed and the device returns to its initial state. No
    /// interrupt is raised.
    pub fn reset(&self) {
        let work = {
            let mut st = self.lock();
            if !st.mig.processes_guest_work() {
                tracing::warn!("device reset while stopped for migration: ignored");
                return;
            }
            st.reset();
            self.note_doorbells(&st);
            st.take_fabric_work()
        };
        self.port.fabric().run(work);
    }

    /// Handles packets queued for this device and timers that expired. Called by the fabric.
    pub(crate) fn process_fabric(&self) -> crate::soft::Work {
        let mut st = self.lock();
        if !st.mig.processes_guest_work() {
            // Held: the packets stay in the port's inbox and follow the device on migration.
            return crate::soft::Work::default();
        }
        st.process_inbound();
        st.take_fabric_work()
    }

    // -----------------------------------------------------------------------------------------
    // Live migration (docs/migration.md)
    // -----------------------------------------------------------------------------------------

    /// Where the device is in the migration state machine.
    pub fn migration_state(&self) -> MigrationState {
        if self.port.is_moved() {
            return MigrationState::MigratedAway;
        }
        self.lock().mig
    }

    /// Running → Quiescing: stop initiating. New send WQEs stay in their rings; everything
    /// already accepted keeps making progress (see [`Vrdma::outstanding`]). Idempotent.
    pub fn quiesce(&self) -> Result<(), MigrationError> {
        self.refuse_if_moved("quiesce")?;
        let mut st = self.lock();
        match st.mig {
            MigrationState::Running | MigrationState::Quiescing => {
                st.mig = MigrationState::Quiescing;
                Ok(())
            }
            state => Err(MigrationError::WrongState {
                op: "quiesce",
                state,
            }),
        }
    }

    /// Running or Quiescing → Stopped: from now on the device writes nothing into guest memory,
    /// raises no interrupt and handles no packet; inbound packets are held by the fabric and
    /// peers' ACK timers wait instead of counting retries. Coalesced ACKs still owed to peers
    /// are sent first. Idempotent.
    pub fn stop(&self) -> Result<(), MigrationError> {
        self.refuse_if_moved("stop")?;
        let work = {
            let mut st = self.lock();
            match st.mig {
                MigrationState::Running | MigrationState::Quiescing => {}
                MigrationState::Stopped => return Ok(()),
                state => return Err(MigrationError::WrongState { op: "stop", state }),
            }
            st.backend.flush_pending_acks();
            st.mig = MigrationState::Stopped;
            self.port.set_paused(true);
            st.take_fabric_work()
        };
        self.port.fabric().run(work);
        Ok(())
    }

    /// A device whose place a restored instance took refuses every migration step (its own
    /// state says Stopped; [`Vrdma::migration_state`] says MigratedAway).
    fn refuse_if_moved(&self, op: &'static str) -> Result<(), MigrationError> {
        if self.port.is_moved() {
            return Err(MigrationError::WrongState {
                op,
                state: MigrationState::MigratedAway,
            });
        }
        Ok(())
    }

    /// Work requests the device accepted and has not completed yet (all QPs).
    pub fn outstanding(&self) -> usize {
        self.lock().backend.total_outstanding()
    }

    /// Saves the device state as a versioned blob ([`crate::persist`]). Only when stopped; the
    /// device is not changed, so an aborted migration simply resumes it.
    pub fn save(&self) -> Result<Vec<u8>, MigrationError> {
        if self.port.is_moved() {
            return Err(MigrationError::WrongState {
                op: "save",
                state: MigrationState::MigratedAway,
            });
        }
        let st = self.lock();
        if st.mig != MigrationState::Stopped {
            return Err(MigrationError::WrongState {
                op: "save",
                state: st.mig,
            });
        }
        Ok(st.save())
    }

    /// Pre-copy: saves the part of the state that rarely changes (the MR table) while the
    /// device keeps running, and remembers it. The next [`Vrdma::save`] then holds only what
    /// changed since (exactly: every change of an MR slot counts), so the stop-time blob is
    /// smaller and quicker to save and restore; the destination loads this blob beforehand
    /// ([`PrecopyState::load`]) and passes it to [`Vrdma::restore_with_precopy`]. Calling it
    /// again replaces the previous pre-copy; [`Vrdma::resume`] (an aborted migration) forgets
    /// it. Takes the device lock for about as long as saving the MR table takes.
    pub fn save_precopy(&self) -> Result<Vec<u8>, MigrationError> {
        self.refuse_if_moved("save_precopy")?;
        Ok(self.lock().save_precopy())
    }

    /// Builds a device from a saved blob over `mem` (a copy of the source's guest memory),
    /// raising interrupts through `irq`. The new device is Stopped and not yet reachable on the
    /// fabric: [`Vrdma::resume`] makes it take over the source's GID. Every value in the blob
    /// is validated; a bad blob is an error and changes nothing. A blob saved after a
    /// pre-copy needs [`Vrdma::restore_with_precopy`].
    pub fn restore(
        fabric: &Arc<SoftFabric>,
        mem: Arc<GuestMemoryMmap>,
        irq: Arc<dyn Interrupt>,
        blob: &[u8],
    ) -> Result<Arc<Self>, MigrationError> {
        Self::restore_with_precopy(fabric, mem, irq, blob, None)
    }

    /// [`Vrdma::restore`] for a blob saved after a pre-copy ([`Vrdma::save_precopy`]):
    /// `precopy` is that pre-copy, loaded over a memory of `mem`'s layout. A blob that does not
    /// build on a pre-copy ignores `precopy`; one that builds on another pre-copy (or on one
    /// loaded for another configuration or memory layout) is refused with
    /// [`MigrationError::Precopy`].
    pub fn restore_with_precopy(
        fabric: &Arc<SoftFabric>,
        mem: Arc<GuestMemoryMmap>,
        irq: Arc<dyn Interrupt>,
        blob: &[u8],
        precopy: Option<PrecopyState>,
    ) -> Result<Arc<Self>, MigrationError> {
        let parsed = crate::persist::parse(blob)?;
        let cfg = parsed.cfg.clone();
        cfg.validate()
            .map_err(|e| MigrationError::Invalid(e.to_string()))?;
        let config_space = cfg.config_space();
        let mut err = None;
        let dev = Arc::new_cyclic(|weak| {
            let port = Port::new(fabric.clone(), cfg.gid, weak.clone());
            let state = match State::restore(&parsed, port.clone(), mem, irq, precopy) {
                Ok(mut s) => {
                    s.mig = MigrationState::Stopped;
                    s
                }
                Err(e) => {
                    err = Some(e);
                    State::new(cfg.clone(), port.clone())
                }
            };
            port.set_paused(true);
            Vrdma {
                config_space,
                state: Mutex::new(state),
                cfg,
                port,
                restored: std::sync::atomic::AtomicBool::new(true),
                doorbells: Default::default(),
            }
        });
        match err {
            Some(e) => Err(e),
            None => Ok(dev),
        }
    }

    /// Quiescing or Stopped → Running. On a restored device this is the moment it takes the
    /// source's place on the fabric (peers re-targeted, held packets moved over). On a source
    /// whose migration was aborted it simply resumes. Either way the device then catches up with
    /// everything posted or received meanwhile.
    pub fn resume(&self) -> Result<(), MigrationError> {
        use std::sync::atomic::Ordering;
        if self.port.is_moved() {
            return Err(MigrationError::WrongState {
                op: "resume",
                state: MigrationState::MigratedAway,
            });
        }
        let work = {
            let mut st = self.lock();
            match st.mig {
                MigrationState::Running => return Ok(()),
                MigrationState::Quiescing | MigrationState::Stopped => {}
                state => {
                    return Err(MigrationError::WrongState {
                        op: "resume",
                        state,
                    })
                }
            }
            let restored = self.restored.swap(false, Ordering::AcqRel);
            if restored {
                if let Err(e) = self.port.fabric().take_over(&self.port) {
                    self.restored.store(true, Ordering::Release);
                    return Err(MigrationError::Fabric(e.to_string()));
                }
            }
            st.mig = MigrationState::Running;
            // A pre-copy belongs to one migration attempt: after an abort, the next save is
            // complete unless a new pre-copy is taken.
            st.precopy = None;
            self.port.set_paused(false);
            st.kick_all(restored);
            self.note_doorbells(&st);
            st.take_fabric_work()
        };
        self.port.fabric().run(work);
        Ok(())
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock means a panic in device code, which is a bug; keep serving the guest
        // with the state as it is rather than propagating the panic into the VMM.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl crate::soft::Endpoint for Vrdma {
    fn process_fabric(&self) -> crate::soft::Work {
        Vrdma::process_fabric(self)
    }

    fn with_engine(
        &self,
        f: &mut dyn FnMut(
            &mut crate::soft::engine::SoftBackend,
            &mut dyn crate::backend::DeviceOps,
        ),
    ) -> Option<crate::soft::Work> {
        let mut st = match self.state.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        // Stopped (held packets wait in the inbox) or not active: packets, as usual.
        if !st.mig.processes_guest_work() || st.core.mem.is_none() {
            return None;
        }
        st.direct(f);
        Some(st.take_fabric_work())
    }

    fn hot_line(&self) -> *const u8 {
        (&self.state as *const Mutex<State>).cast()
    }
}

impl Drop for Vrdma {
    fn drop(&mut self) {
        self.port.fabric().detach(&self.port);
    }
}
