//! Test and benchmark harness: guests built from real parts.
//!
//! A [`Vm`] is what a VMM would assemble for one guest: its guest memory, a [`Vrdma`] device
//! attached to a shared soft fabric, and the virtio-mmio transport in front of it. The guest side
//! is the real test guest driver (`vrdma-guest`), which reaches the device only through
//! [`MmioPort`]: MMIO register reads/writes (as an MMIO exit would deliver them) and the
//! transport's interrupt eventfd (as an irqfd would). Nothing is mocked.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::GuestAddress;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub mod fabric_path;
pub mod irq_bw;
pub mod migrate_bench;
pub mod node;
pub mod peer;
pub mod perf;
pub mod roce_perf;
pub mod wire;
use vrdma_device::soft::SoftFabric;
use vrdma_device::{DeviceConfig, GuestMemoryMmap, PrecopyState, Vrdma};
use vrdma_glue::MmioTransport;

/// The guest's view of its device: the MMIO window and the interrupt line.
pub struct MmioPort {
    transport: Arc<MmioTransport>,
    /// The interrupt eventfd the epoll instance watches (kept open with it; never read).
    _irq: EventFd,
    epoll: Epoll,
}

impl MmioPort {
    /// Wraps a transport; the interrupt is the transport's eventfd.
    pub fn new(transport: Arc<MmioTransport>) -> std::io::Result<Self> {
        let irq = transport.irq_evt().try_clone()?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            irq.as_raw_fd(),
            // Edge-triggered: every interrupt (eventfd write) is one wake-up, and the eventfd
            // is never read. Reading it after each wake-up is a second system call on the
            // woken side, which the wake-up floor (a blocking eventfd read) does not pay.
            EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, 0),
        )?;
        Ok(Self {
            transport,
            _irq: irq,
            epoll,
        })
    }
}

impl vrdma_guest::Transport for MmioPort {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.transport.read(offset, data)
    }

    fn write(&self, offset: u64, data: &[u8]) {
        self.transport.write(offset, data)
    }

    fn wait_interrupt(&self, timeout: Duration) -> bool {
        // virtio-mmio interrupts are level-triggered: a pending status counts as fired. An edge
        // left by an interrupt that was taken through the status (without sleeping) can end a
        // later wait early: then the status decides, and the wait goes on.
        let deadline = Instant::now() + timeout;
        loop {
            if self.transport.interrupt_status() != 0 {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let mut ev = [EpollEvent::default()];
            // Rounded up: a sub-millisecond rest must still sleep, not spin.
            let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
            let _ = self.epoll.wait(ms, &mut ev);
        }
    }
}

/// One guest: memory, device, transport.
pub struct Vm {
    /// Guest memory.
    pub mem: Arc<GuestMemoryMmap>,
    /// The device.
    pub device: Arc<Vrdma>,
    /// The virtio-mmio transport.
    pub transport: Arc<MmioTransport>,
}

static HUGE_PAGES: AtomicBool = AtomicBool::new(false);

/// Whether harness guest memory made from now on asks for transparent huge pages, as a VMM
/// can ([`vrdma_glue::memory::advise_huge_pages`]; `vrdma-vmm --huge-pages`). Off by
/// default: the test suite runs many guests that each touch a few pages of 256 MiB, and 2 MiB
/// pages would make each touch 2 MiB resident. `vrdma-perf` turns it on.
pub fn set_huge_pages(on: bool) {
    HUGE_PAGES.store(on, Ordering::Relaxed);
}

/// Whether [`set_huge_pages`] is on.
pub fn huge_pages() -> bool {
    HUGE_PAGES.load(Ordering::Relaxed)
}

/// Harness guest memory of `ranges`, with transparent huge pages if [`set_huge_pages`] is on.
pub fn guest_memory(ranges: &[(GuestAddress, usize)]) -> Result<GuestMemoryMmap, String> {
    let mem = GuestMemoryMmap::from_ranges(ranges).map_err(|e| e.to_string())?;
    if huge_pages() {
        vrdma_glue::memory::advise_huge_pages(&mem).map_err(|e| format!("huge pages: {e}"))?;
    }
    Ok(mem)
}

/// Guest RAM size of harness guests.
pub const GUEST_RAM: u64 = 256 << 20;
/// Where the guest driver's allocator starts (below is left to "the guest kernel").
pub const ALLOC_BASE: u64 = 1 << 20;

impl Vm {
    /// A guest with `GUEST_RAM` of memory and a device with GID `gid_for_id(id)` on `fabric`.
    pub fn new(fabric: &Arc<SoftFabric>, id: u32) -> Self {
        Self::with_config(fabric, DeviceConfig::with_gid(DeviceConfig::gid_for_id(id)))
    }

    /// A guest with a device of the given configuration.
    pub fn with_config(fabric: &Arc<SoftFabric>, cfg: DeviceConfig) -> Self {
        let mem =
            Arc::new(guest_memory(&[(GuestAddress(0), GUEST_RAM as usize)]).expect("guest memory"));
        let device = Vrdma::new(cfg, fabric).expect("device");
        let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let transport = Arc::new(MmioTransport::new(device.clone(), mem.clone(), irq));
        Self {
            mem,
            device,
            transport,
        }
    }

    /// The guest driver, probed over this guest's MMIO port, allocating from `ALLOC_BASE` to the
    /// end of `GUEST_RAM`.
    pub fn driver(&self) -> Result<vrdma_guest::Driver, String> {
        vrdma_guest::Driver::probe(
            self.port(),
            self.mem.clone(),
            vrdma_guest::GuestAlloc::new(GuestAddress(ALLOC_BASE), GUEST_RAM - ALLOC_BASE),
        )
        .map_err(|e| e.to_string())
    }

    /// The guest's MMIO port, for the driver.
    pub fn port(&self) -> MmioPort {
        MmioPort::new(self.transport.clone()).expect("mmio port")
    }
}

// ---------------------------------------------------------------------------------------------
// Live migration: what a VMM does (docs/migration.md, "The steps a VMM follows")
// ---------------------------------------------------------------------------------------------

/// Timings and sizes of one migration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MigrateTimes {
    /// Pre-copy rounds while the guest ran (after the first full copy); 0 for stop-and-copy.
    pub rounds: u32,
    /// Bytes of guest memory copied while the guest ran (pre-copy only).
    pub precopy_bytes: u64,
    /// Bytes of guest memory copied while the device was stopped.
    pub stopped_copy_bytes: u64,
    /// Work requests still in flight when the device was stopped.
    pub outstanding_at_stop: usize,
    /// `MmioTransport::save_state`.
    pub save_us: u64,
    /// `MmioTransport::restore`.
    pub restore_us: u64,
    /// From `stop()` to the destination's `resume()` returning.
    pub downtime_us: u64,
    /// Size of the transport state blob (device blob included).
    pub state_bytes: usize,
    /// Size of the device's pre-copy blob ([`Vm::precopy`]; 0 without a device pre-copy).
    pub precopy_state_bytes: usize,
    /// `Vrdma::save_precopy` on the running source (the device lock is held meanwhile).
    pub precopy_save_us: u64,
    /// `PrecopyState::load` on the destination (while the source runs).
    pub precopy_load_us: u64,
}

/// Knobs of [`Vm::migrate_with`] and [`Precopy::stop_and_copy`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MigrateOptions {
    /// After `quiesce()`, wait up to this long for `outstanding()` to reach 0 before `stop()`.
    pub quiesce_wait: Duration,
}

/// An empty guest memory with the same regions as `mem`.
pub fn memory_like(mem: &GuestMemoryMmap) -> GuestMemoryMmap {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let ranges: Vec<(GuestAddress, usize)> = mem
        .iter()
        .map(|r| (r.start_addr(), r.len() as usize))
        .collect();
    guest_memory(&ranges).expect("guest memory")
}

/// Guest-physical addresses of the 4 KiB pages whose contents differ between `a` and `b`
/// (which must have the same layout).
pub fn differing_pages(a: &GuestMemoryMmap, b: &GuestMemoryMmap) -> Vec<u64> {
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};
    let mut out = Vec::new();
    let (mut pa, mut pb) = (vec![0u8; 4096], vec![0u8; 4096]);
    for r in a.iter() {
        let (start, end) = (r.start_addr().0, r.start_addr().0 + r.len());
        let mut gpa = start;
        while gpa < end {
            let n = (end - gpa).min(4096) as usize;
            let ra = a.read_slice(&mut pa[..n], GuestAddress(gpa));
            let rb = b.read_slice(&mut pb[..n], GuestAddress(gpa));
            if ra.is_err() || rb.is_err() || pa[..n] != pb[..n] {
                out.push(gpa);
            }
            gpa += n as u64;
        }
    }
    out
}

fn us(d: Duration) -> u64 {
    d.as_micros().min(u64::MAX as u128) as u64
}

impl Vm {
    /// A guest with `ram` bytes of memory (one region at 0) and a device with GID
    /// `gid_for_id(id)` on `fabric`. Migration tests use small guests: every migration copies
    /// all of guest memory.
    pub fn with_ram(fabric: &Arc<SoftFabric>, id: u32, ram: u64) -> Self {
        let mem = Arc::new(guest_memory(&[(GuestAddress(0), ram as usize)]).expect("guest memory"));
        let device = Vrdma::new(DeviceConfig::with_gid(DeviceConfig::gid_for_id(id)), fabric)
            .expect("device");
        let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let transport = Arc::new(MmioTransport::new(device.clone(), mem.clone(), irq));
        Self {
            mem,
            device,
            transport,
        }
    }

    /// Stop-and-copy live migration with default options: see [`Vm::migrate_with`].
    pub fn migrate(&self, fabric: &Arc<SoftFabric>) -> Result<(Vm, MigrateTimes), String> {
        self.migrate_with(fabric, &MigrateOptions::default())
    }

    /// Migrates this VM to a new one on the same fabric, as a VMM does: `quiesce`, (wait for
    /// in-flight work), `stop`, copy all guest memory into a new memory of the same layout,
    /// `save_state`, `MmioTransport::restore` on the copy, `resume` (the destination takes over
    /// the GID). The caller plays the vCPUs: nothing may use the guest driver from the `stop`
    /// until it was rebound to the returned VM ([`vrdma_guest::Driver::rebind`]). A device the
    /// caller already stopped is migrated as it is.
    ///
    /// On an error after the stop the migration is aborted: the source device resumes.
    pub fn migrate_with(
        &self,
        fabric: &Arc<SoftFabric>,
        opts: &MigrateOptions,
    ) -> Result<(Vm, MigrateTimes), String> {
        let dst = Arc::new(memory_like(&self.mem));
        let mut times = MigrateTimes::default();
        let stopped = self.quiesce_and_stop(opts, &mut times)?;
        times.stopped_copy_bytes = vrdma_device::dirty::copy_all(&self.mem, &dst);
        self.finish_migration(fabric, dst, stopped, times, Ok(None))
    }

    /// Starts a pre-copy migration: clears the dirty log and copies all of guest memory while
    /// the guest keeps running, then pre-copies the device state (`Vrdma::save_precopy`, loaded
    /// on the destination at once with `PrecopyState::load`). Continue with
    /// [`Precopy::round`] and [`Precopy::stop_and_copy`], then [`Precopy::finish`].
    pub fn precopy(&self) -> Precopy<'_> {
        self.precopy_with(true)
    }

    /// [`Vm::precopy`], with or without the device pre-copy (without it, the stop-time blob is
    /// complete).
    pub fn precopy_with(&self, device_precopy: bool) -> Precopy<'_> {
        let dst = Arc::new(memory_like(&self.mem));
        vrdma_device::dirty::start(&self.mem).expect("dirty log start");
        let bytes = vrdma_device::dirty::copy_all(&self.mem, &dst);
        let mut times = MigrateTimes {
            precopy_bytes: bytes,
            ..Default::default()
        };
        let device = if device_precopy {
            self.precopy_device(&dst, &mut times).map(Some)
        } else {
            Ok(None)
        };
        Precopy {
            src: self,
            dst,
            times,
            stopped: None,
            device,
        }
    }

    /// Pre-copies the device state: saved on the running source, loaded for `dst`.
    fn precopy_device(
        &self,
        dst: &GuestMemoryMmap,
        times: &mut MigrateTimes,
    ) -> Result<PrecopyState, String> {
        let t = Instant::now();
        let blob = self
            .device
            .save_precopy()
            .map_err(|e| format!("save_precopy: {e}"))?;
        times.precopy_save_us = us(t.elapsed());
        times.precopy_state_bytes = blob.len();
        let t = Instant::now();
        let state =
            PrecopyState::load(dst, &blob).map_err(|e| format!("load pre-copy state: {e}"))?;
        times.precopy_load_us = us(t.elapsed());
        Ok(state)
    }

    /// Aborts a migration after `quiesce`/`stop`/`save`: the source device simply resumes.
    pub fn abort_migration(&self) -> Result<(), String> {
        self.device.resume().map_err(|e| e.to_string())
    }

    fn quiesce_and_stop(
        &self,
        opts: &MigrateOptions,
        times: &mut MigrateTimes,
    ) -> Result<Instant, String> {
        if self.device.migration_state() == vrdma_device::MigrationState::Stopped {
            // Already stopped by the caller (downtime is then counted from here).
            times.outstanding_at_stop = self.device.outstanding();
            return Ok(Instant::now());
        }
        self.device.quiesce().map_err(|e| format!("quiesce: {e}"))?;
        let deadline = Instant::now() + opts.quiesce_wait;
        while self.device.outstanding() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(100));
        }
        let stopped = Instant::now();
        if let Err(e) = self.device.stop() {
            let _ = self.device.resume();
            return Err(format!("stop: {e}"));
        }
        times.outstanding_at_stop = self.device.outstanding();
        Ok(stopped)
    }

    /// Save, restore on `dst` (with the device pre-copy, if one was taken), resume the
    /// destination; aborts (resumes the source) on errors.
    fn finish_migration(
        &self,
        fabric: &Arc<SoftFabric>,
        dst: Arc<GuestMemoryMmap>,
        stopped: Instant,
        mut times: MigrateTimes,
        precopy: Result<Option<PrecopyState>, String>,
    ) -> Result<(Vm, MigrateTimes), String> {
        let abort = |what: String| {
            let _ = self.device.resume();
            Err(what)
        };
        let precopy = match precopy {
            Ok(p) => p,
            Err(e) => return abort(e),
        };
        let t = Instant::now();
        let blob = match self.transport.save_state() {
            Ok(b) => b,
            Err(e) => return abort(format!("save: {e}")),
        };
        times.save_us = us(t.elapsed());
        times.state_bytes = blob.len();
        let irq = EventFd::new(EFD_NONBLOCK).map_err(|e| e.to_string())?;
        let t = Instant::now();
        let transport =
            match MmioTransport::restore_with_precopy(fabric, dst.clone(), irq, &blob, precopy) {
                Ok(t) => Arc::new(t),
                Err(e) => return abort(format!("restore: {e}")),
            };
        times.restore_us = us(t.elapsed());
        let device = transport.device().clone();
        if let Err(e) = device.resume() {
            return abort(format!("resume: {e}"));
        }
        times.downtime_us = us(stopped.elapsed());
        Ok((
            Vm {
                mem: dst,
                device,
                transport,
            },
            times,
        ))
    }
}

/// A pre-copy migration in progress ([`Vm::precopy`]): the destination memory is filled while
/// the guest runs, then the last dirty pages are copied with the device stopped.
pub struct Precopy<'a> {
    src: &'a Vm,
    dst: Arc<GuestMemoryMmap>,
    times: MigrateTimes,
    stopped: Option<Instant>,
    /// The device pre-copy, loaded for `dst` (`None`: not taken).
    device: Result<Option<PrecopyState>, String>,
}

impl Precopy<'_> {
    /// One round while the guest runs: takes the dirty log and copies those pages. Returns
    /// the number of pages copied.
    pub fn round(&mut self) -> u64 {
        let log = vrdma_device::dirty::take(&self.src.mem);
        let n = vrdma_device::dirty::copy_pages(&self.src.mem, &self.dst, &log);
        self.times.rounds += 1;
        self.times.precopy_bytes += n * 4096;
        n
    }

    /// The caller paused its vCPUs: quiesce, stop, and copy the pages dirtied since the last
    /// round. Returns the number of pages copied. Afterwards the destination memory equals the
    /// source's (which nothing writes any more).
    pub fn stop_and_copy(&mut self, opts: &MigrateOptions) -> Result<u64, String> {
        let stopped = self.src.quiesce_and_stop(opts, &mut self.times)?;
        self.stopped = Some(stopped);
        let log = vrdma_device::dirty::take(&self.src.mem);
        let n = vrdma_device::dirty::copy_pages(&self.src.mem, &self.dst, &log);
        self.times.stopped_copy_bytes = n * 4096;
        Ok(n)
    }

    /// The destination's guest memory.
    pub fn dst_mem(&self) -> &Arc<GuestMemoryMmap> {
        &self.dst
    }

    /// Saves, restores on the destination memory and resumes there (after
    /// [`Precopy::stop_and_copy`]). On an error the source resumes.
    pub fn finish(self, fabric: &Arc<SoftFabric>) -> Result<(Vm, MigrateTimes), String> {
        let Some(stopped) = self.stopped else {
            return Err("finish before stop_and_copy".into());
        };
        self.src
            .finish_migration(fabric, self.dst, stopped, self.times, self.device)
    }

    /// Gives up: the source resumes (if it was stopped) and the destination memory is dropped.
    pub fn abort(self) -> Result<(), String> {
        if self.stopped.is_some() {
            self.src.abort_migration()
        } else {
            Ok(())
        }
    }
}
