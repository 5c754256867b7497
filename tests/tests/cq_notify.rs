//! CQ notifications with and without `VRDMA_F_CQ_NOTIFY` (ABI §8.1, §9.5, §12.3): every test
//! runs twice, once with the driver accepting the feature (notifications in the doorbell area's
//! CQ-notify bitmap) and once without (`EV_CQ_COMP` on the event queue). The driver's
//! `wait_event` reports both the same way, so the checks are the same.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vrdma_abi as abi;
use vrdma_abi::Event;
use vrdma_device::soft::SoftFabric;
use vrdma_guest::{Cq, DriverOptions, Qp, QpInitAttr, RecvWr, SendWr, DRIVER_FEATURES};
use vrdma_tests::Vm;

/// Guest RAM of the guests here (small: the migration test copies all of it).
const RAM: u64 = 32 << 20;

fn guest(vm: &Vm, notify: bool) -> Guest {
    let features = if notify {
        DRIVER_FEATURES
    } else {
        DRIVER_FEATURES & !abi::VRDMA_F_CQ_NOTIFY
    };
    let options = DriverOptions {
        features,
        ..Default::default()
    };
    let g = guest_with(vm, RAM, 64 << 10, 256, options);
    assert_eq!(g.d.features() & abi::VRDMA_F_CQ_NOTIFY != 0, notify);
    g
}

fn two(notify: bool) -> (Arc<SoftFabric>, Vm, Vm, Guest, Guest) {
    let fabric = SoftFabric::new();
    let (va, vb) = (Vm::with_ram(&fabric, 1, RAM), Vm::with_ram(&fabric, 2, RAM));
    let (a, b) = (guest(&va, notify), guest(&vb, notify));
    (fabric, va, vb, a, b)
}

/// A connected RC pair: `qa` on `a` (both queues on `a_cq`), `qb` on `b` (on `b_cq`).
fn pair(a: &Guest, a_cq: &Cq, b: &Guest, b_cq: &Cq) -> (Qp, Qp) {
    let small = |cq: &Cq| QpInitAttr {
        max_send_wr: 16,
        max_recv_wr: 16,
        ..QpInitAttr::rc(cq)
    };
    let qa = a.d.create_qp(a.pd, &small(a_cq)).unwrap();
    let qb = b.d.create_qp(b.pd, &small(b_cq)).unwrap();
    let (ga, gb) = (a.d.gid().unwrap(), b.d.gid().unwrap());
    a.d.connect_rc(&qa, qb.qpn(), gb).unwrap();
    b.d.connect_rc(&qb, qa.qpn(), ga).unwrap();
    (qa, qb)
}

fn comp(cqn: u32) -> Event {
    Event {
        kind: abi::EV_CQ_COMP,
        handle: cqn,
        detail: 0,
    }
}

/// Waits until `cq`'s producer index reaches `n`.
#[track_caller]
fn prod_reaches(g: &Guest, cq: &Cq, n: u32) {
    assert!(wait_until(LONG, || g.d.cq_prod(cq).unwrap() == n));
}

fn both(f: impl Fn(bool)) {
    for notify in [true, false] {
        f(notify);
    }
}

/// Arming records the lines that handling the interrupt reads first, which the driver
/// prefetches as it wakes: the notify summary and the CQ's notify word (with the feature) and
/// the CQE its next poll reads.
#[test]
fn arming_records_the_lines_a_wake_up_reads() {
    both(|notify| {
        let (_f, _va, vb, _a, mut b) = two(notify);
        let host = |gpa: u64| vb.mem.get_host_address(GuestAddress(gpa)).unwrap() as usize;
        let slot = |cq: &Cq| cq.ring().slot_gpa(cq.cons()).0;
        assert_eq!(b.d.wake_lines(), [0; 3], "nothing armed yet");
        b.d.req_notify_cq(&mut b.cq, false).unwrap();
        let (db, _) = b.d.doorbell_area();
        let word = abi::handle_index(b.cq.cqn()) as u64 / 64 * 8;
        let expect_notify = |on: bool, gpa: u64| if on { host(gpa) } else { 0 };
        assert_eq!(
            b.d.wake_lines(),
            [
                expect_notify(notify, db.0 + abi::DB_CQ_NOTIFY_SUMMARY_OFFSET),
                expect_notify(notify, db.0 + b.d.cq_notify_bitmap_offset() + word),
                host(slot(&b.cq)),
            ],
            "notify={notify}"
        );
        // Another CQ armed later: its lines replace the first one's.
        let mut other = b.d.create_cq(16).unwrap();
        b.d.req_notify_cq(&mut other, true).unwrap();
        assert_eq!(b.d.wake_lines()[2], host(slot(&other)), "notify={notify}");
    });
}

#[test]
fn next_and_solicited_arms_notify_exactly_once() {
    both(|notify| {
        let (_f, _va, _vb, mut a, mut b) = two(notify);
        let (mut qa, mut qb) = pair(&a, &a.cq, &b, &b.cq);
        let recvs: Vec<_> = (0..16).map(|i| RecvWr::new(i, &[])).collect();
        b.d.post_recv(&mut qb, &recvs).unwrap();
        let cqn = b.cq.cqn();

        // NEXT, armed before the completions: one notification for three CQEs.
        b.d.req_notify_cq(&mut b.cq, false).unwrap();
        assert_eq!(b.d.wait_event(QUIET), None, "notify={notify}");
        let sends: Vec<_> = (1..=3).map(|i| SendWr::send(i, &[])).collect();
        a.d.post_send(&mut qa, &sends).unwrap();
        poll_exact(&a.d, &mut a.cq, 3);
        assert_eq!(
            events_until_quiet(&b.d, QUIET),
            [comp(cqn)],
            "notify={notify}"
        );
        poll_exact(&b.d, &mut b.cq, 3);

        // Not re-armed: no notification.
        a.d.post_send(&mut qa, &[SendWr::send(4, &[])]).unwrap();
        poll_exact(&a.d, &mut a.cq, 1);
        poll_exact(&b.d, &mut b.cq, 1);
        assert_eq!(b.d.wait_event(QUIET), None, "notify={notify}");

        // SOLICITED: unsolicited CQEs do not fire, the solicited one fires once.
        b.d.req_notify_cq(&mut b.cq, true).unwrap();
        a.d.post_send(&mut qa, &[SendWr::send(5, &[]), SendWr::send(6, &[])])
            .unwrap();
        poll_exact(&a.d, &mut a.cq, 2);
        prod_reaches(&b, &b.cq, 6);
        assert_eq!(b.d.wait_event(QUIET), None, "notify={notify}");
        a.d.post_send(
            &mut qa,
            &[
                SendWr::send(7, &[]).solicited(),
                SendWr::send(8, &[]).solicited(),
            ],
        )
        .unwrap();
        poll_exact(&a.d, &mut a.cq, 2);
        assert_eq!(
            events_until_quiet(&b.d, QUIET),
            [comp(cqn)],
            "notify={notify}"
        );
        poll_exact(&b.d, &mut b.cq, 4);

        // CQEs already present at arm time: NEXT fires at once, once.
        a.d.post_send(&mut qa, &[SendWr::send(9, &[])]).unwrap();
        poll_exact(&a.d, &mut a.cq, 1);
        prod_reaches(&b, &b.cq, 9);
        assert_eq!(b.d.wait_event(QUIET), None);
        b.d.req_notify_cq(&mut b.cq, false).unwrap();
        assert_eq!(
            events_until_quiet(&b.d, QUIET),
            [comp(cqn)],
            "notify={notify}"
        );
        // A solicited CQE present at arm time: SOLICITED fires at once, once.
        a.d.post_send(&mut qa, &[SendWr::send(10, &[]).solicited()])
            .unwrap();
        poll_exact(&a.d, &mut a.cq, 1);
        prod_reaches(&b, &b.cq, 10);
        b.d.req_notify_cq(&mut b.cq, true).unwrap();
        assert_eq!(
            events_until_quiet(&b.d, QUIET),
            [comp(cqn)],
            "notify={notify}"
        );
        poll_exact(&b.d, &mut b.cq, 2);
        // Nothing on the requester's CQ, which was never armed.
        assert_eq!(a.d.wait_event(QUIET), None);
    });
}

#[test]
fn many_cqs_armed_at_once_are_all_reported() {
    both(|notify| {
        let (_f, _va, _vb, a, b) = two(notify);
        // 140 CQs on b: handle indices across three bitmap words (and the node's CQ).
        let n = 140;
        let mut cqs: Vec<Cq> = (0..n).map(|_| b.d.create_cq(4).unwrap()).collect();
        let words: std::collections::BTreeSet<u32> = cqs
            .iter()
            .map(|c| abi::handle_index(c.cqn()) / 64)
            .collect();
        assert!(words.len() >= 3, "{words:?}");
        let mut qps: Vec<(Qp, Qp)> = cqs.iter().map(|c| pair(&a, &a.cq, &b, c)).collect();
        for cq in cqs.iter_mut() {
            b.d.req_notify_cq(cq, false).unwrap();
        }
        assert_eq!(b.d.wait_event(QUIET), None, "notify={notify}");
        // One signaled WRITE from every b QP: a CQE on each armed CQ.
        let src = [b.mr.sge(0, 8)];
        for (_, qb) in qps.iter_mut() {
            b.d.post_send(qb, &[SendWr::write(1, &src, a.mr.addr(0), a.mr.rkey)])
                .unwrap();
        }
        for cq in cqs.iter_mut() {
            assert_eq!(b.d.poll_cq_until(cq, 1, LONG).len(), 1);
        }
        let mut got: Vec<u32> = events_until_quiet(&b.d, Duration::from_millis(100))
            .iter()
            .map(|e| {
                assert_eq!(e.kind, abi::EV_CQ_COMP, "{e:?}");
                e.handle
            })
            .collect();
        got.sort_unstable();
        let mut want: Vec<u32> = cqs.iter().map(|c| c.cqn()).collect();
        want.sort_unstable();
        assert_eq!(got, want, "notify={notify}");
        // A destroyed CQ's stale bit is not reported for the next CQ at its index.
        let (qa0, mut qb0) = qps.remove(0);
        let mut cq0 = cqs.remove(0);
        b.d.req_notify_cq(&mut cq0, false).unwrap();
        b.d.post_send(&mut qb0, &[SendWr::write(2, &src, a.mr.addr(0), a.mr.rkey)])
            .unwrap();
        assert_eq!(b.d.poll_cq_until(&mut cq0, 1, LONG).len(), 1);
        b.d.destroy_qp(&mut qb0).unwrap();
        b.d.destroy_cq(&mut cq0).unwrap();
        let again = b.d.create_cq(4).unwrap();
        assert_eq!(abi::handle_index(again.cqn()), abi::handle_index(cq0.cqn()));
        let ev = events_until_quiet(&b.d, QUIET);
        assert!(
            ev.iter().all(|e| e.handle != again.cqn()),
            "notify={notify}: {ev:?}"
        );
        drop(qa0);
    });
}

#[test]
fn other_events_still_use_the_event_queue() {
    both(|notify| {
        let (_f, _va, _vb, mut a, b) = two(notify);
        let (mut qa, _qb) = pair(&a, &a.cq, &b, &b.cq);
        a.d.req_notify_cq(&mut a.cq, true).unwrap();
        // An SGE past its MR: an error CQE (matches SOLICITED) and EV_QP_FATAL.
        let past_end = [a.mr.sge(a.mr.len - 10, 20)];
        a.d.post_send(&mut qa, &[SendWr::send(1, &past_end)])
            .unwrap();
        let c = poll_exact(&a.d, &mut a.cq, 1)[0];
        assert_eq!(c.status, abi::WC_LOC_PROT_ERR);
        let ev = events_until_quiet(&a.d, Duration::from_millis(100));
        let fatal = Event {
            kind: abi::EV_QP_FATAL,
            handle: qa.qpn(),
            detail: abi::VENDOR_ERR_BAD_SGE as u64,
        };
        assert_eq!(ev.len(), 2, "notify={notify}: {ev:?}");
        assert!(ev.contains(&comp(a.cq.cqn())), "{ev:?}");
        assert!(ev.contains(&fatal), "{ev:?}");
        // With the feature the CQ notification took no event buffer: the queue-1 used ring
        // carried exactly the one EV_QP_FATAL.
        if notify {
            let (gpa, len) = a.d.doorbell_area();
            let bitmap = a.d.cq_notify_bitmap_offset();
            assert!(bitmap + abi::bitmap_bytes(a.d.config().max_cq) <= len);
            let mut zeros = vec![0xffu8; abi::bitmap_bytes(a.d.config().max_cq) as usize];
            a.d.mem()
                .read_slice(&mut zeros, GuestAddress(gpa.0 + bitmap))
                .unwrap();
            assert!(zeros.iter().all(|&x| x == 0), "the driver took every bit");
        }
    });
}

/// Interrupt moderation counts a CQ notification as one event (ABI §12.3).
#[test]
fn moderation_counts_notifications_as_events() {
    both(|notify| {
        let (_f, _va, _vb, mut a, mut b) = two(notify);
        let (mut qa, mut qb) = pair(&a, &a.cq, &b, &b.cq);
        b.d.post_recv(&mut qb, &[RecvWr::new(0, &[])]).unwrap();
        a.d.post_send(&mut qa, &[SendWr::send(1, &[])]).unwrap();
        poll_exact(&a.d, &mut a.cq, 1);
        prod_reaches(&b, &b.cq, 1);
        b.d.set_intr_moderation(3, 1_000_000).unwrap();
        b.d.ack_interrupt();
        // Each NEXT arm fires at once (a CQE is present): the third raises the interrupt.
        for i in 0..6 {
            b.d.req_notify_cq(&mut b.cq, false).unwrap();
            let irq = b.d.ack_interrupt() & 1 != 0;
            assert_eq!(irq, i % 3 == 2, "notify={notify} arm {i}");
            // poll_event takes the notification without acknowledging interrupts.
            assert_eq!(b.d.poll_event(), Some(comp(b.cq.cqn())), "notify={notify}");
            assert_eq!(b.d.poll_event(), None);
        }
        // Back to the default: every notification interrupts.
        b.d.set_intr_moderation(0, 0).unwrap();
        b.d.ack_interrupt();
        b.d.req_notify_cq(&mut b.cq, false).unwrap();
        assert_ne!(b.d.ack_interrupt() & 1, 0, "notify={notify}");
        assert_eq!(b.d.poll_event(), Some(comp(b.cq.cqn())));
    });
}

/// A notification pending when the guest migrates — not yet taken by the driver, its
/// interrupt held back by moderation or already acknowledged — is delivered on the destination.
#[test]
fn migration_with_a_pending_notification_loses_nothing() {
    for acked in [false, true] {
        both(|notify| {
            let (fabric, va, mut vb, mut a, mut b) = two(notify);
            let (mut qa, mut qb) = pair(&a, &a.cq, &b, &b.cq);
            b.d.post_recv(&mut qb, &[RecvWr::new(0, &[]), RecvWr::new(1, &[])])
                .unwrap();
            if !acked {
                // Held by moderation (the 1 s timer does not expire before the
                // migration): no interrupt before it.
                b.d.set_intr_moderation(2, 1_000_000).unwrap();
            }
            b.d.ack_interrupt();
            b.d.req_notify_cq(&mut b.cq, false).unwrap();
            a.d.post_send(&mut qa, &[SendWr::send(1, &[])]).unwrap();
            poll_exact(&a.d, &mut a.cq, 1);
            prod_reaches(&b, &b.cq, 1);
            let irq = b.d.ack_interrupt() & 1 != 0;
            assert_eq!(irq, acked, "notify={notify}");

            let (new, _) = vb.migrate(&fabric).unwrap();
            vb = new;
            b.d.rebind(vb.port(), vb.mem.clone());
            b.buf.rebind(vb.mem.clone());
            if !acked || notify {
                // Re-raised by the restored device (moderation pending, or the notify bitmap).
                assert!(
                    wait_until(LONG, || b.d.ack_interrupt() & 1 != 0),
                    "notify={notify} acked={acked}: no interrupt after the migration"
                );
            }
            assert_eq!(
                events_until_quiet(&b.d, QUIET),
                [comp(b.cq.cqn())],
                "notify={notify} acked={acked}"
            );
            // The destination keeps notifying.
            poll_exact(&b.d, &mut b.cq, 1);
            b.d.set_intr_moderation(0, 0).unwrap();
            b.d.req_notify_cq(&mut b.cq, false).unwrap();
            a.d.post_send(&mut qa, &[SendWr::send(2, &[])]).unwrap();
            poll_exact(&a.d, &mut a.cq, 1);
            assert_eq!(events_until_quiet(&b.d, QUIET), [comp(b.cq.cqn())]);
            poll_exact(&b.d, &mut b.cq, 1);
            drop(va);
        });
    }
}

/// The guest scribbles over the CQ-notify bitmap and summary: the device only ORs bits into
/// it, the driver reports only live CQs, and notifications keep working.
#[test]
fn garbage_in_the_notify_bitmap_is_harmless() {
    let (_f, _va, _vb, mut a, mut b) = two(true);
    let (mut qa, mut qb) = pair(&a, &a.cq, &b, &b.cq);
    let (gpa, len) = b.d.doorbell_area();
    let from = abi::DB_CQ_NOTIFY_SUMMARY_OFFSET;
    b.d.mem()
        .write_slice(&[0xff; 8], GuestAddress(gpa.0 + from))
        .unwrap();
    let bitmap = b.d.cq_notify_bitmap_offset();
    b.d.mem()
        .write_slice(
            &vec![0xff; (len - bitmap) as usize],
            GuestAddress(gpa.0 + bitmap),
        )
        .unwrap();
    // Spurious reports for the live CQ at most (harmless), nothing for other indices.
    let ev = events_until_quiet(&b.d, QUIET);
    assert!(ev.iter().all(|e| *e == comp(b.cq.cqn())), "{ev:?}");
    b.d.post_recv(&mut qb, &[RecvWr::new(0, &[])]).unwrap();
    b.d.req_notify_cq(&mut b.cq, false).unwrap();
    a.d.post_send(&mut qa, &[SendWr::send(1, &[])]).unwrap();
    poll_exact(&a.d, &mut a.cq, 1);
    assert_eq!(events_until_quiet(&b.d, QUIET), [comp(b.cq.cqn())]);
    poll_exact(&b.d, &mut b.cq, 1);
}
