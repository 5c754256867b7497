//! Legacy devices and port I/O: the COM1 serial console (vm-superio), the ACPI sleep control
//! register (power off), reset ports; the stdin subscriber feeding the console; and the exit
//! event that vCPU threads use to stop the VMM.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSubscriber, Events};
use tracing::{debug, info, warn};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::layout::*;

/// An eventfd as a vm-superio interrupt trigger (registered with KVM as an irqfd).
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The serial console: vm-superio's 16550A, output to any writer (stdout in the VMM).
pub type Console = Serial<IrqTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>;

/// Why the VMM stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitReason {
    /// Still running.
    Running = 0,
    /// The guest powered off (ACPI S5).
    PowerOff = 1,
    /// The guest asked for a reset (i8042, 0xcf9, triple fault): the VMM stops.
    Reset = 2,
    /// A vCPU failed.
    Error = 3,
}

/// Raised by vCPU threads, waited for by the event loop.
pub struct ExitEvent {
    evt: EventFd,
    reason: AtomicU8,
}

impl ExitEvent {
    /// A new, unsignalled exit event.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            evt: EventFd::new(EFD_NONBLOCK)?,
            reason: AtomicU8::new(ExitReason::Running as u8),
        })
    }

    /// Requests the VMM to stop; the first reason wins.
    pub fn exit(&self, reason: ExitReason) {
        let _ = self.reason.compare_exchange(
            ExitReason::Running as u8,
            reason as u8,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
        if let Err(e) = self.evt.write(1) {
            warn!(error = %e, "cannot signal the exit event");
        }
    }

    /// The reason recorded by the first [`ExitEvent::exit`].
    pub fn reason(&self) -> ExitReason {
        match self.reason.load(Ordering::SeqCst) {
            1 => ExitReason::PowerOff,
            2 => ExitReason::Reset,
            3 => ExitReason::Error,
            _ => ExitReason::Running,
        }
    }

    /// The eventfd to watch.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// Port I/O of the guest.
pub struct PortIo {
    /// COM1.
    pub console: Arc<Mutex<Console>>,
    /// Where power-off and reset requests go.
    pub exit: Arc<ExitEvent>,
}

impl PortIo {
    fn console(&self) -> std::sync::MutexGuard<'_, Console> {
        self.console.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An `in` instruction.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        match port {
            p if (COM1..COM1 + 8).contains(&p) && data.len() == 1 => {
                data[0] = self.console().read((p - COM1) as u8);
            }
            SLEEP_CONTROL_PORT | SLEEP_STATUS_PORT => data.fill(0),
            _ => data.fill(0xff),
        }
    }

    /// An `out` instruction.
    pub fn write(&self, port: u16, data: &[u8]) {
        match port {
            p if (COM1..COM1 + 8).contains(&p) && data.len() == 1 => {
                if let Err(e) = self.console().write((p - COM1) as u8, data[0]) {
                    debug!(error = ?e, "serial write");
                }
            }
            SLEEP_CONTROL_PORT => {
                // SLP_EN (bit 5) with SLP_TYP (bits 2..4) = 5, the \_S5 value in the DSDT.
                let v = data.first().copied().unwrap_or(0);
                if v & 0x20 != 0 && (v >> 2) & 7 == 5 {
                    info!("guest powered off (ACPI S5)");
                    self.exit.exit(ExitReason::PowerOff);
                }
            }
            I8042_COMMAND if data.first() == Some(&0xfe) => {
                info!("guest reset through the i8042");
                self.exit.exit(ExitReason::Reset);
            }
            RESET_CONTROL if data.first().is_some_and(|v| v & 0x4 != 0) => {
                info!("guest reset through port 0xcf9");
                self.exit.exit(ExitReason::Reset);
            }
            _ => debug!(port, ?data, "port write ignored"),
        }
    }
}

/// Feeds stdin into the console's receive FIFO.
pub struct StdinInput {
    /// The console.
    pub console: Arc<Mutex<Console>>,
}

impl EventSubscriber for StdinInput {
    fn process(&self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        let n = if events.event_set().contains(EventSet::IN) {
            match io::stdin().lock().read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => return,
                Err(e) => {
                    warn!(error = %e, "stdin read failed");
                    0
                }
            }
        } else {
            0
        };
        if n == 0 {
            // EOF or hang-up: stop watching, or epoll would report it forever.
            debug!("stdin closed; console input off");
            let _ = ops.remove(Events::new_raw(io::stdin().as_raw_fd(), EventSet::IN));
            return;
        }
        let mut con = self.console.lock().unwrap_or_else(|e| e.into_inner());
        match con.enqueue_raw_bytes(&buf[..n]) {
            Ok(m) if m < n => warn!(dropped = n - m, "console input FIFO full"),
            Ok(_) => {}
            Err(e) => debug!(error = ?e, "console input"),
        }
    }

    fn init(&self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(io::stdin().as_raw_fd(), EventSet::IN)) {
            // epoll refuses regular files and /dev/null: run without console input.
            info!(error = ?e, "stdin is not pollable; console input disabled");
        }
    }
}

/// Stops the event loop when a vCPU raises the exit event.
pub struct ExitWatcher {
    /// The event.
    pub exit: Arc<ExitEvent>,
}

impl EventSubscriber for ExitWatcher {
    fn process(&self, _events: Events, _ops: &mut EventOps) {
        let _ = self.exit.eventfd().read();
    }

    fn init(&self, ops: &mut EventOps) {
        ops.add(Events::new(self.exit.eventfd(), EventSet::IN))
            .expect("watch the exit eventfd");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn pio() -> (PortIo, Sink) {
        let sink = Sink::default();
        let console = Serial::new(
            IrqTrigger(EventFd::new(EFD_NONBLOCK).unwrap()),
            Box::new(sink.clone()) as Box<dyn Write + Send>,
        );
        (
            PortIo {
                console: Arc::new(Mutex::new(console)),
                exit: Arc::new(ExitEvent::new().unwrap()),
            },
            sink,
        )
    }

    #[test]
    fn serial_output_and_input() {
        let (p, sink) = pio();
        for b in b"hi" {
            p.write(COM1, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi");
        p.console.lock().unwrap().enqueue_raw_bytes(b"x").unwrap();
        let mut lsr = [0u8];
        p.read(COM1 + 5, &mut lsr);
        assert_ne!(lsr[0] & 1, 0, "data ready");
        let mut d = [0u8];
        p.read(COM1, &mut d);
        assert_eq!(d[0], b'x');
    }

    #[test]
    fn power_off_and_reset() {
        let (p, _) = pio();
        p.write(SLEEP_STATUS_PORT, &[0x80]);
        p.write(SLEEP_CONTROL_PORT, &[5 << 2]); // no SLP_EN
        assert_eq!(p.exit.reason(), ExitReason::Running);
        p.write(SLEEP_CONTROL_PORT, &[(5 << 2) | 0x20]);
        assert_eq!(p.exit.reason(), ExitReason::PowerOff);
        assert_eq!(p.exit.eventfd().read().unwrap(), 1);

        let (p, _) = pio();
        p.write(I8042_COMMAND, &[0xfe]);
        assert_eq!(p.exit.reason(), ExitReason::Reset);
        let mut d = [0u8; 2];
        p.read(0x1234, &mut d);
        assert_eq!(d, [0xff, 0xff]);
    }
}
