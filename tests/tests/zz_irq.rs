use std::time::{Duration, Instant};
use vrdma_abi::Cqe;
use vrdma_guest::{RecvWr, SendWr};
use vrdma_tests::perf::{rc_pair, Side};

fn arm(s: &mut Side) {
    let mut c = [Cqe::default(); 1];
    assert_eq!(s.d.poll_cq(&mut s.rcq, &mut c), 0);
    s.d.req_notify_cq(&mut s.rcq, false).unwrap();
    assert_eq!(s.d.poll_cq(&mut s.rcq, &mut c), 0);
}

fn wake(s: &mut Side) {
    let mut c = [Cqe::default(); 1];
    assert!(s.d.wait_event(Duration::from_millis(100)).is_some());
    assert_eq!(s.d.poll_cq(&mut s.rcq, &mut c), 1);
    s.d.post_recv(&mut s.qp, &[RecvWr::new(0, &[])]).unwrap();
}

#[test]
#[ignore]
fn zz_irq() {
    let n: usize = std::env::var("ZZ_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let (fabric, mut a, mut b) = rc_pair(2, 0).unwrap();
    for s in [&mut a, &mut b] {
        let r: Vec<RecvWr> = (0..128).map(|i| RecvWr::new(i, &[])).collect();
        s.d.post_recv(&mut s.qp, &r).unwrap();
    }
    let to_a = (a.mr.iova + 64, a.mr.rkey);
    let to_b = (b.mr.iova + 64, b.mr.rkey);
    let mut cqes = [Cqe::default(); 64];
    let t = Instant::now();
    arm(&mut b);
    for i in 0..n {
        for k in 0..2 {
            let (s, p, (ra, rk)) = if k == 0 {
                (&mut a, &mut b, to_b)
            } else {
                (&mut b, &mut a, to_a)
            };
            // s was woken (or starts); it posts; then arms and sleeps; p wakes.
            let sge = [s.mr.sge(0, 2)];
            let wr = SendWr::write_imm(i as u64, &sge, ra, rk, i as u32);
            let wr = if i % 16 == 15 { wr } else { wr.unsignaled() };
            s.d.post_send(&mut s.qp, &[wr]).unwrap();
            s.d.poll_cq(&mut s.cq, &mut cqes);
            arm(s);
            wake(p);
        }
    }
    let el = t.elapsed();
    eprintln!(
        "half trips {} in {:?}: {:.1} ns each; fabric {:?}",
        2 * n,
        el,
        el.as_nanos() as f64 / (2 * n) as f64,
        fabric.stats()
    );
}
