//! The `vrdma-perf` tool's plumbing: every test function and path runs with a small iteration
//! count, its data checks pass and its statistics are sane. No timing assertions: figures
//! belong in benchmarks (docs/benchmarks.md), not in tests.

use std::process::Command;
use std::sync::Mutex;

use vrdma_tests::perf::{
    atomic_lat_device, read_lat_device, send_lat_device, write_bw_device, write_bw_fabric,
    write_lat_device, write_lat_fabric, BwStats, LatStats,
};

/// The latency tests busy-poll with two threads each; on a small machine several at once would
/// mostly measure the scheduler. Run them one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const ITERS: usize = 100;

#[track_caller]
fn check_lat(s: &LatStats, test: &str, path: &str, bytes: u64) {
    assert_eq!((s.test, s.path, s.bytes), (test, path, bytes), "{s:?}");
    assert_eq!(s.iters, ITERS, "{s:?}");
    assert_eq!(s.completion, "poll");
    assert!(s.t_min_us > 0.0, "{s:?}");
    assert!(
        s.t_min_us <= s.t_typical_us && s.t_typical_us <= s.t_max_us,
        "{s:?}"
    );
    assert!(
        s.t_typical_us <= s.t_p99_us && s.t_p99_us <= s.t_p999_us,
        "{s:?}"
    );
    assert!(s.t_avg_us.is_finite() && s.t_stdev_us.is_finite(), "{s:?}");
}

#[track_caller]
fn check_bw(s: &BwStats, path: &str, bytes: u64, qps: u32, batch: u32, msgs: u64) {
    assert_eq!(
        (s.test, s.path, s.bytes, s.qps, s.batch, s.msgs),
        ("write_bw", path, bytes, qps, batch, msgs),
        "{s:?}"
    );
    assert!(
        s.msg_rate_mpps > 0.0 && s.msg_rate_mpps.is_finite(),
        "{s:?}"
    );
    assert!(s.bw_gbps > 0.0, "{s:?}");
    assert!(s.first_completion_us > 0.0, "{s:?}");
}

#[test]
fn write_lat_device_and_fabric_paths() {
    let _g = serial();
    // 2 B, and a message of several MTU-sized packets; DMA and inline.
    for (size, inline) in [(2, false), (2, true), (9000, false)] {
        for (path, r) in [
            ("device", write_lat_device(size, ITERS, inline)),
            ("fabric", write_lat_fabric(size, ITERS, inline)),
        ] {
            let rtts = r.unwrap_or_else(|e| panic!("{path} {size} B inline {inline}: {e}"));
            assert_eq!(rtts.len(), ITERS);
            assert!(rtts.iter().all(|&t| t > 0));
            let s = LatStats::from_rtts("write_lat", path, size, "poll", &rtts);
            check_lat(&s, "write_lat", path, size);
        }
    }
}

#[test]
fn write_bw_device_and_fabric_paths() {
    let _g = serial();
    for (size, qps, batch, msgs) in [(64, 1, 32, 3000), (64, 4, 8, 2000), (10000, 2, 3, 200)] {
        let d = write_bw_device(size, qps, batch, msgs).unwrap();
        check_bw(&d, "device", size, qps, batch, msgs);
        let f = write_bw_fabric(size, qps, batch, msgs).unwrap();
        check_bw(&f, "fabric", size, qps, batch, msgs);
    }
}

#[test]
fn read_lat_verifies_data_and_reports_full_round_trips() {
    let _g = serial();
    // 1 packet, several packets, a size that is not a multiple of the MTU.
    for size in [2, 8192, 5001] {
        let s = read_lat_device(size, ITERS).unwrap_or_else(|e| panic!("{size} B: {e}"));
        check_lat(&s, "read_lat", "device", size);
    }
}

#[test]
fn send_lat_verifies_data() {
    let _g = serial();
    for (size, inline) in [(2, false), (2, true), (300, true), (9000, false)] {
        let s = send_lat_device(size, ITERS, inline)
            .unwrap_or_else(|e| panic!("{size} B inline {inline}: {e}"));
        check_lat(&s, "send_lat", "device", size);
    }
}

#[test]
fn atomic_lat_fetch_add_and_cmp_swap() {
    let _g = serial();
    for cmp_swap in [false, true] {
        let s = atomic_lat_device(ITERS, cmp_swap).unwrap_or_else(|e| panic!("{e}"));
        check_lat(&s, "atomic_lat", "device", 8);
    }
}

#[test]
fn full_round_trips_are_not_halved() {
    let rtts: Vec<u64> = (1..=100u64).map(|us| us * 1000).collect();
    let half = LatStats::from_rtts("send_lat", "device", 2, "poll", &rtts);
    let full = LatStats::from_full_rtts("read_lat", "device", 2, "poll", &rtts);
    assert_eq!(half.t_typical_us, 25.0);
    assert_eq!(full.t_typical_us, 50.0);
    assert_eq!(full.t_max_us, 100.0);
}

/// Runs the tool with `args`; returns its JSON lines.
fn run_json(args: &[&str]) -> Vec<serde_json::Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_vrdma-perf"))
        .args(args)
        .arg("--json")
        .output()
        .expect("run vrdma-perf");
    assert!(
        out.status.success(),
        "vrdma-perf {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

fn field<'a>(v: &'a serde_json::Value, k: &str) -> &'a serde_json::Value {
    v.get(k).unwrap_or_else(|| panic!("no {k} in {v}"))
}

#[test]
fn cli_rows_and_json_shape() {
    let _g = serial();
    let lat_keys = [
        "test",
        "path",
        "bytes",
        "iters",
        "completion",
        "t_min_us",
        "t_max_us",
        "t_typical_us",
        "t_avg_us",
        "t_stdev_us",
        "t_p99_us",
        "t_p999_us",
    ];
    let check_lat_lines = |args: &[&str], test: &str, paths: &[&str], bytes: u64| {
        let v = run_json(args);
        let got: Vec<(&str, &str, u64)> = v
            .iter()
            .map(|l| {
                let o = l.as_object().expect("object");
                assert_eq!(o.len(), lat_keys.len(), "{l}");
                for k in lat_keys {
                    field(l, k);
                }
                (
                    field(l, "test").as_str().unwrap(),
                    field(l, "path").as_str().unwrap(),
                    field(l, "bytes").as_u64().unwrap(),
                )
            })
            .collect();
        let want: Vec<(&str, &str, u64)> = paths.iter().map(|p| (test, *p, bytes)).collect();
        assert_eq!(got, want, "vrdma-perf {args:?}");
    };
    check_lat_lines(
        &["write-lat", "-n", "100"],
        "write_lat",
        &["device", "fabric", "shm"],
        2,
    );
    check_lat_lines(
        &["read-lat", "-n", "100", "-s", "64"],
        "read_lat",
        &["device"],
        64,
    );
    check_lat_lines(
        &["send-lat", "-n", "100"],
        "send_lat",
        &["device", "shm"],
        2,
    );
    check_lat_lines(&["atomic-lat", "-n", "100"], "atomic_lat", &["device"], 8);
    check_lat_lines(
        &["atomic-lat", "-n", "100", "--cmp-swap"],
        "atomic_lat",
        &["device"],
        8,
    );

    // By turns: every path's samples of all rounds, in the same lines.
    let v = run_json(&["write-lat", "-n", "100", "--rounds", "3"]);
    let rows: Vec<(&str, u64)> = v
        .iter()
        .map(|l| {
            (
                field(l, "path").as_str().unwrap(),
                field(l, "iters").as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(rows, [("device", 300), ("fabric", 300), ("shm", 300)]);

    for (extra, rounds) in [(&[][..], 1), (&["--rounds", "3", "--no-huge-pages"][..], 3)] {
        let mut args = vec!["write-bw", "-n", "2000", "--qps", "1,2", "--batch", "4"];
        args.extend(extra);
        let v = run_json(&args);
        let rows: Vec<(String, u64, u64)> = v
            .iter()
            .map(|l| {
                assert_eq!(field(l, "test"), "write_bw");
                assert_eq!(field(l, "msgs"), 2000);
                assert_eq!(field(l, "rounds"), rounds, "{args:?}");
                assert!(field(l, "msg_rate_mpps").as_f64().unwrap() > 0.0);
                (
                    field(l, "path").as_str().unwrap().to_string(),
                    field(l, "qps").as_u64().unwrap(),
                    field(l, "batch").as_u64().unwrap(),
                )
            })
            .collect();
        let want: Vec<(String, u64, u64)> =
            [("device", 1), ("fabric", 1), ("device", 2), ("fabric", 2)]
                .iter()
                .map(|(p, q)| (p.to_string(), *q, 4))
                .collect();
        assert_eq!(rows, want, "{args:?}");
    }
}

#[test]
fn write_bw_interrupt_sweeps_offered_load_and_moderation() {
    let _g = serial();
    let v = run_json(&[
        "write-bw",
        "--completion",
        "interrupt",
        "--qps",
        "4",
        "--batch",
        "2",
        "-n",
        "2000",
        "--offered",
        "0,0.5",
        "--moderation",
        "0:0,4:50",
    ]);
    let rows: Vec<(f64, u64, u64)> = v
        .iter()
        .map(|l| {
            assert_eq!(field(l, "test"), "write_bw");
            assert_eq!(field(l, "completion"), "interrupt");
            assert_eq!(field(l, "qps"), 4);
            assert_eq!(field(l, "batch"), 2);
            // Every message was received and handled (the run ends only then).
            assert_eq!(field(l, "msgs"), 2000);
            assert!(field(l, "msg_rate_mpps").as_f64().unwrap() > 0.0, "{l}");
            assert!(field(l, "bw_gbps").as_f64().unwrap() > 0.0, "{l}");
            assert!(
                field(l, "first_completion_us").as_f64().unwrap() > 0.0,
                "{l}"
            );
            assert!(field(l, "msgs_per_wakeup").as_f64().unwrap() >= 1.0, "{l}");
            assert!(
                field(l, "receiver_cpu_us_per_msg").as_f64().unwrap() > 0.0,
                "{l}"
            );
            let (med, p99) = (
                field(l, "delivery_median_us").as_f64().unwrap(),
                field(l, "delivery_p99_us").as_f64().unwrap(),
            );
            assert!(med <= p99, "{l}");
            (
                field(l, "offered_mpps").as_f64().unwrap(),
                field(l, "moderation_events").as_u64().unwrap(),
                field(l, "moderation_usec").as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(rows, [(0.0, 0, 0), (0.0, 4, 50), (0.5, 0, 0), (0.5, 4, 50)]);
    // Several events without a timer could wait forever (ABI 12.3): refused.
    let out = Command::new(env!("CARGO_BIN_EXE_vrdma-perf"))
        .args([
            "write-bw",
            "--completion",
            "interrupt",
            "--moderation",
            "4:0",
            "-n",
            "10",
        ])
        .output()
        .expect("run vrdma-perf");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs a timer"));
}
