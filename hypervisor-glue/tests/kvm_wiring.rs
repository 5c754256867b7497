//! The KVM wiring of `vrdma-glue`.
//!
//! * Without KVM: the event-manager subscriber ([`MmioEvents`]) drives a real device for the
//!   real test guest driver, with queue notifications delivered through eventfds exactly as
//!   KVM's ioeventfd delivers them; the resample logic of the level-triggered interrupt.
//! * With KVM (skipped, with the reason printed, where `/dev/kvm` is missing or unusable): a
//!   real-mode guest reads the virtio-mmio window through MMIO exits dispatched by [`MmioBus`]
//!   and kicks a queue through the ioeventfd that [`wire_mmio_device`] registered.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use event_manager::{EventManager, SubscriberOps};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vrdma_device::soft::SoftFabric;
use vrdma_device::{DeviceConfig, GuestMemoryMmap, Vrdma};
use vrdma_glue::kvm::{register_guest_memory, wire_mmio_device};
use vrdma_glue::mmio::{regs, MAGIC_VALUE};
use vrdma_glue::{MmioBus, MmioEvents, MmioTransport};
use vrdma_guest::{Driver, GuestAlloc, Transport};

const RAM: usize = 64 << 20;

fn transport(fabric: &Arc<SoftFabric>) -> (Arc<MmioTransport>, Arc<GuestMemoryMmap>) {
    let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM)]).unwrap());
    let dev = Vrdma::new(DeviceConfig::with_gid(DeviceConfig::gid_for_id(7)), fabric).unwrap();
    let t = Arc::new(MmioTransport::new(
        dev,
        mem.clone(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
    ));
    (t, mem)
}

/// The guest's view when KVM would deliver `QueueNotify` writes through ioeventfds: a 4-byte
/// write of a queue index to `QueueNotify` only signals that queue's eventfd (no exit); every
/// other access goes to the transport as an MMIO exit would.
struct IoeventfdPort {
    transport: Arc<MmioTransport>,
    queue_evts: Vec<EventFd>,
    irq: EventFd,
    epoll: Epoll,
}

impl IoeventfdPort {
    fn new(events: &MmioEvents) -> Self {
        let irq = events.transport().irq_evt().try_clone().unwrap();
        let epoll = Epoll::new().unwrap();
        epoll
            .ctl(
                ControlOperation::Add,
                irq.as_raw_fd(),
                EpollEvent::new(EventSet::IN, 0),
            )
            .unwrap();
        Self {
            transport: events.transport().clone(),
            queue_evts: events
                .queue_evts()
                .iter()
                .map(|e| e.try_clone().unwrap())
                .collect(),
            irq,
            epoll,
        }
    }
}

impl Transport for IoeventfdPort {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.transport.read(offset, data)
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if offset == regs::QUEUE_NOTIFY {
            if let Ok(b) = <[u8; 4]>::try_from(data) {
                if let Some(evt) = self.queue_evts.get(u32::from_le_bytes(b) as usize) {
                    evt.write(1).unwrap();
                    return;
                }
            }
        }
        self.transport.write(offset, data)
    }

    fn wait_interrupt(&self, timeout: Duration) -> bool {
        if self.transport.interrupt_status() != 0 {
            let _ = self.irq.read();
            return true;
        }
        let mut ev = [EpollEvent::default()];
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        match self.epoll.wait(ms, &mut ev) {
            Ok(n) if n > 0 => {
                let _ = self.irq.read();
                true
            }
            _ => self.transport.interrupt_status() != 0,
        }
    }
}

/// Runs an event manager with `events` on its own thread until the returned flag is set.
fn spawn_event_loop(events: Arc<MmioEvents>) -> (Arc<AtomicBool>, thread::JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let h = thread::spawn(move || {
        let mut em = EventManager::<Arc<MmioEvents>>::new().unwrap();
        em.add_subscriber(events);
        while !s.load(Ordering::SeqCst) {
            em.run_with_timeout(20).unwrap();
        }
    });
    (stop, h)
}

#[test]
fn ioeventfd_subscriber_drives_the_device_for_the_guest_driver() {
    let fabric = SoftFabric::new();
    let (t, mem) = transport(&fabric);
    let events = Arc::new(MmioEvents::new(t.clone()).unwrap());
    let port = IoeventfdPort::new(&events);
    let (stop, h) = spawn_event_loop(events);

    // Probe (including SET_DOORBELL_AREA, a control command) and QUERY_DEVICE: every queue
    // notification took the eventfd → subscriber → queue_notify path.
    let drv = Driver::probe(port, mem, GuestAlloc::new(GuestAddress(1 << 20), 32 << 20))
        .expect("probe through ioeventfds");
    let cfg = drv.query_device().expect("QUERY_DEVICE");
    assert_eq!(cfg.abi_version, vrdma_guest::abi::ABI_VERSION);
    assert_eq!(cfg.max_qp, t.device().config().max_qp);
    let pd = drv.alloc_pd().expect("CREATE_PD");
    drv.dealloc_pd(pd).expect("DESTROY_PD");

    stop.store(true, Ordering::SeqCst);
    h.join().unwrap();
}

#[test]
fn resample_reasserts_only_while_status_is_pending() {
    let fabric = SoftFabric::new();
    let (t, _mem) = transport(&fabric);
    let events = MmioEvents::new(t.clone()).unwrap();
    let w = |off: u64, v: u32| t.write(off, &v.to_le_bytes());

    // EOI with nothing pending: no re-assertion.
    events.resample_evt().write(1).unwrap();
    events.handle_resample();
    assert!(t.irq_evt().read().is_err(), "no interrupt expected");

    // Make the device raise a configuration interrupt: DRIVER_OK without ready queues fails
    // activation, which sets DEVICE_NEEDS_RESET and notifies the driver.
    w(regs::STATUS, 1);
    w(regs::STATUS, 1 | 2);
    w(regs::DRIVER_FEATURES_SEL, 1);
    w(regs::DRIVER_FEATURES, 1); // VIRTIO_F_VERSION_1 (bit 32)
    w(regs::STATUS, 1 | 2 | 8);
    w(regs::STATUS, 1 | 2 | 8 | 4);
    assert_ne!(t.interrupt_status(), 0);
    assert_eq!(t.irq_evt().read().unwrap(), 1);

    // The guest EOIs without acknowledging: the line must be asserted again.
    events.resample_evt().write(1).unwrap();
    events.handle_resample();
    assert_eq!(t.irq_evt().read().unwrap(), 1, "re-asserted");

    // After InterruptACK, an EOI de-asserts for good.
    w(regs::INTERRUPT_ACK, t.interrupt_status());
    assert_eq!(t.interrupt_status(), 0);
    events.resample_evt().write(1).unwrap();
    events.handle_resample();
    assert!(t.irq_evt().read().is_err(), "no interrupt expected");

    // A spurious wakeup (resample fd not signalled) does nothing.
    events.handle_resample();
    assert!(t.irq_evt().read().is_err());
}

#[test]
fn queue_eventfd_before_driver_ok_is_ignored() {
    let fabric = SoftFabric::new();
    let (t, _mem) = transport(&fabric);
    let events = MmioEvents::new(t.clone()).unwrap();
    events.queue_evts()[0].write(1).unwrap();
    events.handle_queue(0);
    // Drained, device untouched, nothing raised.
    assert!(events.queue_evts()[0].read().is_err());
    assert!(!t.device().is_active());
    assert_eq!(t.interrupt_status(), 0);
    // Out-of-range indices are ignored.
    events.handle_queue(99);
}

// ---------------------------------------------------------------------------------------------
// With KVM
// ---------------------------------------------------------------------------------------------

/// Skips the calling test (returns `None`) with a printed reason when KVM cannot be used here.
macro_rules! kvm_or_skip {
    ($e:expr, $what:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => {
                eprintln!("SKIP: KVM unusable here ({}: {e})", $what);
                return;
            }
        }
    };
}

#[test]
fn kvm_real_mode_guest_reads_the_window_and_kicks_through_ioeventfd() {
    use kvm_ioctls::{Kvm, VcpuExit};

    const WINDOW: u64 = 0x2_0000;
    const GSI: u32 = 5;
    const CODE: u64 = 0x1000;

    let kvm = kvm_or_skip!(Kvm::new(), "open /dev/kvm");
    let vm = kvm_or_skip!(kvm.create_vm(), "KVM_CREATE_VM");
    let fabric = SoftFabric::new();
    let (t, _) = transport(&fabric);
    // The guest's RAM: 64 KiB at 0 (the transport's own memory is for the device only).
    let ram = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
    kvm_or_skip!(register_guest_memory(&vm, &ram, 0), "memory slot");
    kvm_or_skip!(vm.create_irq_chip(), "KVM_CREATE_IRQCHIP");

    let events = MmioEvents::new(t.clone()).unwrap();
    let mode = kvm_or_skip!(wire_mmio_device(&vm, &events, WINDOW, GSI), "wiring");
    eprintln!("interrupt mode: {mode:?}");
    let mut bus = MmioBus::new();
    bus.insert(WINDOW, 0x1000, t.clone()).unwrap();

    // mov ax, 0x2000; mov ds, ax; mov eax, [0] (MagicValue); out 0x10, eax;
    // mov dword [0x50], 1 (QueueNotify = 1, taken by the ioeventfd); mov eax, [4] (Version);
    // out 0x11, eax
    let code: &[u8] = &[
        0xb8, 0x00, 0x20, // mov ax, 0x2000
        0x8e, 0xd8, // mov ds, ax
        0x66, 0xa1, 0x00, 0x00, // mov eax, [0x0000]
        0x66, 0xe7, 0x10, // out 0x10, eax
        0x66, 0xc7, 0x06, 0x50, 0x00, 0x01, 0x00, 0x00, 0x00, // mov dword [0x50], 1
        0x66, 0xa1, 0x04, 0x00, // mov eax, [0x0004]
        0x66, 0xe7, 0x11, // out 0x11, eax
    ];
    ram.write_slice(code, GuestAddress(CODE)).unwrap();

    let mut vcpu = kvm_or_skip!(vm.create_vcpu(0), "KVM_CREATE_VCPU");
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = CODE;
    regs.rflags = 2;
    vcpu.set_regs(&regs).unwrap();

    let mut outs = Vec::new();
    let mut mmio_exits = Vec::new();
    for _ in 0..100 {
        match vcpu.run() {
            Ok(VcpuExit::MmioRead(addr, data)) => {
                mmio_exits.push(addr);
                assert!(bus.read(addr, data));
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                mmio_exits.push(addr);
                bus.write(addr, data);
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                outs.push((port, u32::from_le_bytes(data.try_into().unwrap())));
                if port == 0x11 {
                    break;
                }
            }
            Ok(VcpuExit::InternalError) => {
                eprintln!("SKIP: KVM unusable here (internal error running a real-mode guest)");
                return;
            }
            Ok(other) => panic!("unexpected exit {other:?}"),
            Err(e) => {
                eprintln!("SKIP: KVM unusable here (KVM_RUN: {e})");
                return;
            }
        }
    }
    assert_eq!(outs, vec![(0x10, MAGIC_VALUE), (0x11, 2)]);
    // The notification did not exit: it went to queue 1's eventfd.
    assert_eq!(mmio_exits, vec![WINDOW, WINDOW + 4]);
    assert_eq!(events.queue_evts()[1].read().unwrap(), 1);
    assert!(events.queue_evts()[0].read().is_err());
}
