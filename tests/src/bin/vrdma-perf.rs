//! `vrdma-perf`: guest-side RDMA benchmarks with perftest semantics, run in-process over the
//! soft fabric (two guests, the full ABI and device), with the soft fabric alone
//! (`path=fabric`) and physical floors measured in the same run.
//!
//! ```text
//! vrdma-perf write-lat  [-s BYTES | -a] [-n ITERS] [--inline] [--completion poll|interrupt] [--rounds N] [--json]
//! vrdma-perf send-lat   [-s BYTES | -a] [-n ITERS] [--inline] [--json]
//! vrdma-perf read-lat   [-s BYTES | -a] [-n ITERS] [--json]
//! vrdma-perf atomic-lat [-n ITERS] [--cmp-swap] [--json]
//! vrdma-perf write-bw   [-s BYTES] [--qps LIST] [--batch LIST] [-n MSGS] [--rounds N] [--json]
//! vrdma-perf write-bw   --completion interrupt [--qps LIST] [--batch LIST] [--offered LIST]
//!                       [--moderation EVENTS:USEC,...] [-n MSGS] [--json]
//! vrdma-perf --no-huge-pages <test> ...
//! vrdma-perf idle       [--secs S] [--json]
//! ```

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use vrdma_tests::perf::{
    atomic_lat_device, idle_cpu, memcpy_bw, read_lat_device, send_lat_device, write_lat_device,
    write_lat_device_interrupt, write_lat_eventfd, write_lat_fabric, write_lat_shm, BwDevice,
    BwFabric, BwStats, LatStats,
};
use vrdma_tests::roce_perf;

#[derive(Parser)]
#[command(name = "vrdma-perf", about = "vrdma benchmarks (perftest semantics)")]
struct Cli {
    #[command(subcommand)]
    test: Test,
    /// Guest memory without transparent huge pages (by default it asks for them, as Cloud
    /// Hypervisor does and `vrdma-vmm --huge-pages` can; the memcpy floor uses the same memory).
    #[arg(long, global = true)]
    no_huge_pages: bool,
}

/// The arguments that start a node process (`--roce`), with this process's memory policy.
fn node_args() -> &'static [&'static str] {
    if vrdma_tests::huge_pages() {
        &["node"]
    } else {
        &["--no-huge-pages", "node"]
    }
}

/// Size and iterations of a latency test.
#[derive(Args)]
struct LatArgs {
    /// Message size in bytes.
    #[arg(short = 's', long = "size", default_value_t = 2)]
    size: u64,
    /// Sweep sizes 2 B … 8 MiB.
    #[arg(short = 'a', long = "all")]
    all: bool,
    /// Iterations.
    #[arg(short = 'n', long = "iters", default_value_t = 1000)]
    iters: usize,
}

#[derive(Subcommand)]
enum Test {
    /// RDMA WRITE latency, ib_write_lat semantics (half round trip; t_typical = median).
    WriteLat {
        #[command(flatten)]
        lat: LatArgs,
        /// Send small messages inline (up to the QP's max inline size).
        #[arg(long)]
        inline: bool,
        /// How the peer's write is detected: `poll` (busy-poll the last byte, as ib_write_lat)
        /// or `interrupt` (WRITE with immediate; sleep on the armed receive CQ's interrupt).
        #[arg(long, default_value = "poll", value_parser = ["poll", "interrupt"])]
        completion: String,
        /// Runs of `--iters` iterations per path, by turns over the paths: each path's
        /// statistics are over all its runs' samples, so a machine's slow and fast periods
        /// weigh alike on the device and on its floor.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
        rounds: u32,
        #[command(flatten)]
        roce: RoceOpts,
        /// One JSON object per line instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// RDMA READ latency, ib_read_lat semantics (FULL round trip; t_typical = median).
    ReadLat {
        #[command(flatten)]
        lat: LatArgs,
        /// One JSON object per line instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// SEND latency, ib_send_lat semantics (ping-pong, receive CQ polled; half round trip).
    SendLat {
        #[command(flatten)]
        lat: LatArgs,
        /// Send small messages inline (up to the QP's max inline size).
        #[arg(long)]
        inline: bool,
        /// One JSON object per line instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// 8-byte atomic latency, ib_atomic_lat semantics (FULL round trip; FETCH_AND_ADD).
    AtomicLat {
        /// Iterations.
        #[arg(short = 'n', long = "iters", default_value_t = 1000)]
        iters: usize,
        /// CMP_AND_SWP instead of FETCH_AND_ADD.
        #[arg(long)]
        cmp_swap: bool,
        /// One JSON object per line instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Live migration of a guest with `--qps` QPs and `--mrs` extra MRs while its peer keeps
    /// sending: state size, save/restore times, downtime, and WRs lost/duplicated (must be 0).
    Migrate {
        /// Connected QPs.
        #[arg(long, default_value_t = 1024)]
        qps: u32,
        /// Extra memory regions.
        #[arg(long, default_value_t = 10_000)]
        mrs: u32,
        /// Runs (each a fresh pair of guests); one line per run.
        #[arg(long, default_value_t = 1)]
        runs: u32,
        #[command(flatten)]
        roce: RoceOpts,
        /// With --roce: migrations per run (alternately to the same address and to a new one).
        #[arg(long, default_value_t = 4)]
        hops: u32,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// CPU used by idle devices (after some traffic): should be ~0, nothing spins when idle.
    Idle {
        /// Seconds to stay idle.
        #[arg(long, default_value_t = 3.0)]
        secs: f64,
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// RDMA WRITE message rate and bandwidth from one sender thread.
    WriteBw {
        /// Message size in bytes.
        #[arg(short = 's', long = "size", default_value_t = 64)]
        size: u64,
        /// QP pairs (comma-separated list to sweep, e.g. 1,16,256,4096).
        #[arg(long = "qps", default_value = "1", value_delimiter = ',')]
        qps: Vec<u32>,
        /// WQEs per doorbell (comma-separated list to sweep).
        #[arg(long = "batch", default_value = "32", value_delimiter = ',')]
        batch: Vec<u32>,
        /// Messages per run.
        #[arg(short = 'n', long = "iters", default_value_t = 1_000_000)]
        iters: u64,
        /// Runs per set-up, by turns over all set-ups (each QP count, batch and path is set up
        /// once): the median is reported, so a machine's slow and fast periods weigh alike on
        /// every set-up being compared.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
        rounds: u32,
        /// `poll` (the sender busy-polls its send CQ) or `interrupt` (WRITE with immediate; the
        /// receiving guest sleeps on its armed receive CQs' moderated interrupt; path=device
        /// only).
        #[arg(long, default_value = "poll", value_parser = ["poll", "interrupt"])]
        completion: String,
        /// Interrupt moderation of the receiving device, `EVENTS:USEC` (comma-separated list to
        /// sweep): interrupt after EVENTS pending CQ notifications or when the oldest is USEC
        /// µs old (`--completion interrupt`).
        #[arg(long, default_value = "0:0,4:20,16:50,64:100", value_delimiter = ',', value_parser = parse_moderation)]
        moderation: Vec<(u32, u32)>,
        /// Offered load in million messages per second (`--completion interrupt`;
        /// comma-separated list to sweep; 0: as fast as the receive queues allow).
        #[arg(long, default_value = "0", value_delimiter = ',')]
        offered: Vec<f64>,
        #[command(flatten)]
        roce: RoceOpts,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// (internal) A node process for `--roce` runs: one guest behind a RoCEv2 gateway, driven
    /// by JSON lines on stdin.
    #[command(hide = true)]
    Node,
}

/// Options of the runs across two processes.
#[derive(clap::Args, Clone, Debug)]
struct RoceOpts {
    /// Run across two processes over RoCEv2/UDP (path=roce) with the raw-UDP floor between
    /// the same two processes (path=udp), instead of the in-process paths.
    #[arg(long)]
    roce: bool,
    /// This process's address (--roce).
    #[arg(long, default_value = "127.0.77.1")]
    local_ip: std::net::IpAddr,
    /// The node process's address (--roce).
    #[arg(long, default_value = "127.0.77.2")]
    remote_ip: std::net::IpAddr,
}

/// A node process and a local guest connected to it (`--roce`).
fn roce_pair(o: &RoceOpts, buf: u64) -> Result<roce_perf::CrossPair, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let ips = (o.local_ip, o.remote_ip);
    roce_perf::cross_pair(&exe, node_args(), ips, buf, vrdma_abi::MTU_4096, 14)
}

fn write_lat_roce(sizes: &[u64], iters: usize, o: &RoceOpts, json: bool) -> ExitCode {
    if !json {
        println!("# vrdma-perf write-lat --roce: two guests in two processes, RoCEv2 over UDP ({} <-> {})", o.local_ip, o.remote_ip);
        println!("# path=roce: guest driver -> device -> soft fabric -> gateway -> UDP -> gateway -> peer guest memory");
        println!("# path=udp: raw UDP ping-pong between the same two processes, datagrams of the same size, same run");
        println!("{}", LatStats::header());
    }
    let max = sizes.iter().copied().max().unwrap_or(2);
    let mut pair = match roce_pair(o, 2 * max.max(64)) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: --roce setup: {e}");
            return ExitCode::FAILURE;
        }
    };
    for &s in sizes {
        let roce = match roce_perf::write_lat_roce(&mut pair, s, iters) {
            Ok(r) => LatStats::from_rtts("write_lat", "roce", s, "poll", &r),
            Err(e) => {
                eprintln!("error: write-lat {s} B, path=roce: {e}");
                return ExitCode::FAILURE;
            }
        };
        let udp = match roce_perf::udp_pingpong(&mut pair, s, iters) {
            Ok(r) => LatStats::from_rtts("write_lat", "udp", s, "poll", &r),
            Err(e) => {
                eprintln!("error: write-lat {s} B, path=udp: {e}");
                return ExitCode::FAILURE;
            }
        };
        print_lat(&roce, json);
        print_lat(&udp, json);
        if !json {
            println!(
                "# {s} B: roce/udp t_typical ratio {:.2} (+{:.2} usec per half round trip)",
                roce.t_typical_us / udp.t_typical_us.max(1e-9),
                roce.t_typical_us - udp.t_typical_us
            );
        }
    }
    ExitCode::SUCCESS
}

fn write_bw_roce(size: u64, iters: u64, batch: &[u32], o: &RoceOpts, json: bool) -> ExitCode {
    if !json {
        println!("# vrdma-perf write-bw --roce: one sender thread, two guests in two processes, RoCEv2 over UDP");
        println!("# path=roce: RDMA WRITEs (path MTU 4096); path=udp: a raw UDP stream of the same datagrams between the same two processes, same run");
        println!(
            " {:<8} {:<6} {:<6} {:<10} {:<12} {:<10} {:<16} path",
            "#bytes", "qps", "window", "msgs", "rate[Mpps]", "bw[Gb/s]", "first_cqe[usec]"
        );
    }
    let mut pair = match roce_pair(o, size.max(64)) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: --roce setup: {e}");
            return ExitCode::FAILURE;
        }
    };
    for &w in batch {
        let mut st = match roce_perf::write_bw_roce(&mut pair, size, iters, w.max(1) as u64) {
            Ok(st) => st,
            Err(e) => {
                eprintln!("error: write-bw {size} B, path=roce: {e}");
                return ExitCode::FAILURE;
            }
        };
        st.batch = w;
        print_bw(&st, json);
        let udp = match roce_perf::udp_stream(&mut pair, size, iters, 4096) {
            Ok(g) => g,
            Err(e) => {
                eprintln!("error: write-bw {size} B, path=udp: {e}");
                return ExitCode::FAILURE;
            }
        };
        let u = BwStats {
            path: "udp",
            bw_gbps: udp,
            msg_rate_mpps: udp * 1e9 / 8.0 / size as f64 / 1e6,
            first_completion_us: 0.0,
            ..st.clone()
        };
        print_bw(&u, json);
        if !json {
            println!(
                "# {size} B window {w}: roce/udp bandwidth {:.2}",
                st.bw_gbps / udp.max(1e-9)
            );
        }
    }
    ExitCode::SUCCESS
}

/// Sizes of a run: `size`, or 2 B … 8 MiB with `-a`. Fails for sizes outside 1 ..= 8 MiB.
fn sizes(size: u64, all: bool) -> Result<Vec<u64>, ExitCode> {
    if size == 0 || size > 8 << 20 {
        eprintln!("error: --size must be 1 ..= 8388608");
        return Err(ExitCode::FAILURE);
    }
    Ok(if all {
        (1..=23).map(|s| 1u64 << s).collect()
    } else {
        vec![size]
    })
}

/// Prints one latency row (table or JSON).
fn print_lat(st: &LatStats, json: bool) {
    if json {
        println!("{}", serde_json::to_string(st).unwrap_or_default());
    } else {
        println!("{}", st.row());
    }
}

/// Prints one bandwidth row (table or JSON).
fn print_bw(st: &BwStats, json: bool) {
    if json {
        println!("{}", serde_json::to_string(st).unwrap_or_default());
    } else {
        println!(
            " {:<8} {:<6} {:<6} {:<10} {:<12.3} {:<10.2} {:<16.1} {}",
            st.bytes,
            st.qps,
            st.batch,
            st.msgs,
            st.msg_rate_mpps,
            st.bw_gbps,
            st.first_completion_us,
            st.path
        );
    }
}

fn write_lat(
    size: u64,
    all: bool,
    iters: usize,
    rounds: u32,
    inline: bool,
    interrupt: bool,
    json: bool,
) -> ExitCode {
    let sizes = match sizes(size, all) {
        Ok(s) => s,
        Err(c) => return c,
    };
    if !json {
        println!("# vrdma-perf write-lat: two in-process guests over the soft fabric");
        println!("# path=device: guest driver -> virtio-mmio -> device -> soft fabric -> peer guest memory");
        if interrupt {
            println!("# path=eventfd: two threads ping-ponging through blocking eventfds (the wake-up floor), same run");
        } else {
            println!("# path=fabric: the soft fabric's engine driven directly (no rings, WQEs, CQEs, virtio), same run");
            println!("# path=shm: two threads ping-ponging one cache line (the floor), same run");
        }
        if rounds > 1 {
            println!("# {rounds} runs of {iters} iterations per path, by turns; statistics over all samples of a path");
        }
        println!("{}", LatStats::header());
    }
    let mode = if interrupt { "interrupt" } else { "poll" };
    for s in sizes {
        // Round trips of device, fabric (poll only) and floor, over all rounds.
        let mut rtts: [Vec<u64>; 3] = Default::default();
        // t_typical ratio device/floor of each round.
        let mut ratios = Vec::new();
        for _ in 0..rounds {
            match lat_round(s, iters, inline, interrupt) {
                Ok(r) => {
                    ratios.push(median_of(&r[0]) / median_of(&r[2]).max(1e-9));
                    for (all, new) in rtts.iter_mut().zip(r) {
                        all.extend(new);
                    }
                }
                Err(e) => {
                    eprintln!("error: write-lat {s} B: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        let [d, f, fl] = &rtts;
        let dev = LatStats::from_rtts("write_lat", "device", s, mode, d);
        let fabric = (!interrupt).then(|| LatStats::from_rtts("write_lat", "fabric", s, mode, f));
        let floor_path = if interrupt { "eventfd" } else { "shm" };
        let floor = LatStats::from_rtts("write_lat", floor_path, s, mode, fl);
        if !json && rounds > 1 {
            ratios.sort_by(f64::total_cmp);
            println!(
                "# {s} B: device/{floor_path} t_typical ratio per round: median {:.2}, range {:.2} - {:.2}",
                ratios[ratios.len() / 2],
                ratios[0],
                ratios[ratios.len() - 1]
            );
        }
        for st in [Some(&dev), fabric.as_ref(), Some(&floor)]
            .into_iter()
            .flatten()
        {
            print_lat(st, json);
        }
        if !json {
            let ratio = |a: &LatStats, b: &LatStats| a.t_typical_us / b.t_typical_us.max(1e-9);
            print!(
                "# {s} B: device/{} t_typical ratio {:.2}",
                floor.path,
                ratio(&dev, &floor)
            );
            if let Some(f) = &fabric {
                print!(
                    "; fabric/{} {:.2}; device/fabric {:.2} (device layer +{:.2} usec per half round trip)",
                    floor.path,
                    ratio(f, &floor),
                    ratio(&dev, f),
                    dev.t_typical_us - f.t_typical_us
                );
            }
            println!();
        }
    }
    ExitCode::SUCCESS
}

/// One round of `write-lat` for `s`-byte messages: round trips (ns) of the device, the fabric
/// (poll mode; empty in interrupt mode) and the floor (shm, or eventfd in interrupt mode).
fn lat_round(s: u64, iters: usize, inline: bool, interrupt: bool) -> Result<[Vec<u64>; 3], String> {
    if interrupt {
        let dev = write_lat_device_interrupt(s, iters)?;
        let floor = write_lat_eventfd(iters).map_err(|e| format!("eventfd floor: {e}"))?;
        Ok([dev, Vec::new(), floor])
    } else {
        let dev = write_lat_device(s, iters, inline)?;
        let fabric = write_lat_fabric(s, iters, inline).map_err(|e| format!("path=fabric: {e}"))?;
        Ok([dev, fabric, write_lat_shm(iters)])
    }
}

/// The median of round trips, in ns.
fn median_of(rtts: &[u64]) -> f64 {
    let mut v = rtts.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0) as f64
}

/// `EVENTS:USEC`.
fn parse_moderation(s: &str) -> Result<(u32, u32), String> {
    let (e, u) = s
        .split_once(':')
        .ok_or_else(|| format!("{s}: expected EVENTS:USEC"))?;
    let num = |x: &str| x.trim().parse::<u32>().map_err(|err| format!("{s}: {err}"));
    Ok((num(e)?, num(u)?))
}

/// `write-bw --completion interrupt`: each QP count, batch, offered load and moderation setting
/// in turn.
fn write_bw_interrupt(
    size: u64,
    qps: &[u32],
    batch: &[u32],
    iters: u64,
    moderation: &[(u32, u32)],
    offered: &[f64],
    json: bool,
) -> ExitCode {
    if !json {
        println!("# vrdma-perf write-bw --completion interrupt: WRITE_WITH_IMM from one sender thread; the receiving guest sleeps on its armed receive CQs (one per QP)");
        println!("# moderation EVENTS:USEC of the receiving device (ABI 12.3); delivery = post -> the receiver handling the CQE, wake-up included; rx cpu = receiving thread's CPU time per message");
        println!(
            " {:<8} {:<6} {:<6} {:<13} {:<11} {:<10} {:<11} {:<10} {:<11} {:<16} {:<14}",
            "#bytes",
            "qps",
            "batch",
            "offered[Mpps]",
            "moderation",
            "msgs",
            "rate[Mpps]",
            "msgs/wake",
            "rx cpu[us]",
            "delivery med[us]",
            "delivery p99[us]"
        );
    }
    for &n in qps {
        for &b in batch {
            for &o in offered {
                for &m in moderation {
                    let st = match vrdma_tests::irq_bw::write_bw_interrupt(size, n, b, iters, m, o)
                    {
                        Ok(st) => st,
                        Err(e) => {
                            eprintln!(
                                "error: write-bw --completion interrupt {n} QPs batch {b} offered {o} moderation {}:{}: {e}",
                                m.0, m.1
                            );
                            return ExitCode::FAILURE;
                        }
                    };
                    if json {
                        println!("{}", serde_json::to_string(&st).unwrap_or_default());
                    } else {
                        println!(
                            " {:<8} {:<6} {:<6} {:<13} {:<11} {:<10} {:<11.3} {:<10.1} {:<11.3} {:<16.1} {:<14.1}",
                            st.bytes,
                            st.qps,
                            st.batch,
                            o,
                            format!("{}:{}", m.0, m.1),
                            st.msgs,
                            st.msg_rate_mpps,
                            st.msgs_per_wakeup,
                            st.receiver_cpu_us_per_msg,
                            st.delivery_median_us,
                            st.delivery_p99_us
                        );
                    }
                }
            }
        }
    }
    ExitCode::SUCCESS
}

/// One `write-bw` set-up, kept for its rounds.
enum BwSetup {
    Device(Box<BwDevice>),
    Fabric(BwFabric),
}

impl BwSetup {
    fn run(&mut self, msgs: u64) -> Result<BwStats, String> {
        match self {
            BwSetup::Device(s) => s.run(msgs),
            BwSetup::Fabric(s) => s.run(msgs),
        }
    }
}

fn write_bw(
    size: u64,
    qps: &[u32],
    batch: &[u32],
    iters: u64,
    rounds: u32,
    json: bool,
) -> ExitCode {
    if !json {
        println!("# vrdma-perf write-bw: one sender thread, two in-process guests");
        println!("# path=device: guest driver -> virtio-mmio -> device -> soft fabric -> peer guest memory");
        println!("# path=fabric: the soft fabric's engine driven directly (no rings, WQEs, CQEs, virtio), same run");
        if rounds > 1 {
            println!("# {rounds} runs per set-up, by turns over the set-ups; each line is the run with the median rate");
        }
        println!(
            " {:<8} {:<6} {:<6} {:<10} {:<12} {:<10} {:<16} path",
            "#bytes", "qps", "batch", "msgs", "rate[Mpps]", "bw[Gb/s]", "first_cqe[usec]"
        );
        let mc = memcpy_bw(size as usize, 1 << 30) * 8.0 / 1e9;
        println!("# single-thread memcpy of {size} B buffers, same run: {mc:.2} Gb/s");
    }
    // Device then fabric for each QP count and batch, in the order they are reported. With one
    // round each pair runs at once, without holding every set-up's memory.
    let mut setups = Vec::new();
    for &n in qps {
        for &b in batch {
            let pair = BwDevice::new(size, n, b).and_then(|d| {
                let f = BwFabric::new(size, n, b)?;
                Ok([
                    (n, b, BwSetup::Device(Box::new(d))),
                    (n, b, BwSetup::Fabric(f)),
                ])
            });
            let pair = match pair {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("error: write-bw {n} QPs batch {b}: {e}");
                    return ExitCode::FAILURE;
                }
            };
            if rounds > 1 {
                setups.extend(pair);
            } else if bw_report(pair.into(), iters, 1, json).is_err() {
                return ExitCode::FAILURE;
            }
        }
    }
    if !setups.is_empty() && bw_report(setups, iters, rounds, json).is_err() {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// Runs `setups` (device and fabric of each QP count and batch, in pairs) `rounds` times by
/// turns and prints each one's median run, with the device/fabric ratio of each pair.
fn bw_report(
    mut setups: Vec<(u32, u32, BwSetup)>,
    iters: u64,
    rounds: u32,
    json: bool,
) -> Result<(), ()> {
    let mut runs: Vec<Vec<BwStats>> = vec![Vec::new(); setups.len()];
    for _ in 0..rounds {
        for (k, (n, b, s)) in setups.iter_mut().enumerate() {
            match s.run(iters) {
                Ok(st) => runs[k].push(st),
                Err(e) => {
                    eprintln!("error: write-bw {n} QPs batch {b}: {e}");
                    return Err(());
                }
            }
        }
    }
    let medians: Vec<BwStats> = runs.into_iter().filter_map(BwStats::median).collect();
    for pair in medians.chunks(2) {
        for st in pair {
            print_bw(st, json);
        }
        if let (false, [dev, fab]) = (json, pair) {
            println!(
                "# {} QPs batch {}: device/fabric message rate {:.2} ({:.0} ns vs {:.0} ns per message)",
                dev.qps,
                dev.batch,
                dev.msg_rate_mpps / fab.msg_rate_mpps.max(1e-9),
                1e3 / dev.msg_rate_mpps.max(1e-9),
                1e3 / fab.msg_rate_mpps.max(1e-9)
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    vrdma_tests::set_huge_pages(!cli.no_huge_pages);
    match cli.test {
        Test::WriteLat {
            lat: LatArgs { size, all, iters },
            inline,
            completion,
            rounds,
            roce,
            json,
        } => {
            if roce.roce {
                match sizes(size, all) {
                    Ok(s) => write_lat_roce(&s, iters, &roce, json),
                    Err(c) => c,
                }
            } else {
                write_lat(
                    size,
                    all,
                    iters,
                    rounds,
                    inline,
                    completion == "interrupt",
                    json,
                )
            }
        }
        Test::ReadLat {
            lat: LatArgs { size, all, iters },
            json,
        } => {
            let sizes = match sizes(size, all) {
                Ok(s) => s,
                Err(c) => return c,
            };
            if !json {
                println!("# vrdma-perf read-lat: two in-process guests over the soft fabric (path=device, poll)");
                println!("# ib_read_lat semantics: one READ at a time, send CQ polled; figures are FULL round trips");
                println!("{}", LatStats::header());
            }
            for s in sizes {
                match read_lat_device(s, iters) {
                    Ok(st) => print_lat(&st, json),
                    Err(e) => {
                        eprintln!("error: read-lat {s} B: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            ExitCode::SUCCESS
        }
        Test::SendLat {
            lat: LatArgs { size, all, iters },
            inline,
            json,
        } => {
            let sizes = match sizes(size, all) {
                Ok(s) => s,
                Err(c) => return c,
            };
            if !json {
                println!("# vrdma-perf send-lat: two in-process guests over the soft fabric (path=device, poll)");
                println!("# ib_send_lat semantics: SEND ping-pong, receive CQ polled; figures are half round trips");
                println!(
                    "# path=shm: two threads ping-ponging one cache line (the floor), same run"
                );
                println!("{}", LatStats::header());
            }
            for s in sizes {
                let dev = match send_lat_device(s, iters, inline) {
                    Ok(st) => st,
                    Err(e) => {
                        eprintln!("error: send-lat {s} B: {e}");
                        return ExitCode::FAILURE;
                    }
                };
                let floor =
                    LatStats::from_rtts("send_lat", "shm", s, "poll", &write_lat_shm(iters));
                print_lat(&dev, json);
                print_lat(&floor, json);
                if !json {
                    println!(
                        "# {s} B: device/shm t_typical ratio {:.2}",
                        dev.t_typical_us / floor.t_typical_us.max(1e-9)
                    );
                }
            }
            ExitCode::SUCCESS
        }
        Test::AtomicLat {
            iters,
            cmp_swap,
            json,
        } => {
            if !json {
                let op = if cmp_swap {
                    "CMP_AND_SWP"
                } else {
                    "FETCH_AND_ADD"
                };
                println!("# vrdma-perf atomic-lat: two in-process guests over the soft fabric (path=device, poll)");
                println!("# ib_atomic_lat semantics: one 8 B {op} at a time, send CQ polled; figures are FULL round trips");
                println!("{}", LatStats::header());
            }
            match atomic_lat_device(iters, cmp_swap) {
                Ok(st) => {
                    print_lat(&st, json);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: atomic-lat: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Test::Idle { secs, json } => {
            match idle_cpu(secs, 10_000) {
                Ok(cpu) => {
                    if json {
                        println!("{{\"test\":\"idle\",\"secs\":{secs},\"cpu_s\":{cpu:.3},\"cpu_pct\":{:.3}}}", cpu / secs * 100.0);
                    } else {
                        println!("idle {secs:.1} s after 10000 writes: {cpu:.3} CPU s ({:.2}% of one core)", cpu / secs * 100.0);
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: idle: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Test::WriteBw {
            size,
            qps,
            batch,
            iters,
            rounds,
            completion,
            moderation,
            offered,
            roce,
            json,
        } => {
            if roce.roce {
                write_bw_roce(size, iters, &batch, &roce, json)
            } else if size == 0 || size > 8 << 20 {
                eprintln!("error: --size must be 1 ..= 8388608");
                ExitCode::FAILURE
            } else if completion == "interrupt" {
                write_bw_interrupt(size, &qps, &batch, iters, &moderation, &offered, json)
            } else {
                write_bw(size, &qps, &batch, iters, rounds, json)
            }
        }
        Test::Node => {
            vrdma_tests::node::serve();
            ExitCode::SUCCESS
        }
        Test::Migrate {
            qps,
            mrs,
            runs,
            roce,
            hops,
            json,
        } => {
            if roce.roce {
                migrate_roce(&roce, hops, runs, json)
            } else {
                migrate(qps, mrs, runs, json)
            }
        }
    }
}

fn migrate(qps: u32, mrs: u32, runs: u32, json: bool) -> ExitCode {
    if !json {
        println!("# vrdma-perf migrate: pre-copy live migration of one guest while its peer sends WRITE_WITH_IMM");
        println!(
            " {:<6} {:<7} {:<12} {:<9} {:<11} {:<12} {:<11} {:<9} {:<10} {:<9}",
            "qps",
            "mrs",
            "state[B]",
            "save[us]",
            "restore[us]",
            "downtime[us]",
            "ops_during",
            "ops_lost",
            "ops_dup",
            "ops_total"
        );
    }
    let mut ok = true;
    for _ in 0..runs.max(1) {
        match vrdma_tests::migrate_bench::migrate_bench(qps, mrs) {
            Ok(m) => {
                ok &= m.ops_lost == 0 && m.ops_duplicated == 0 && m.ops_reordered == 0;
                if json {
                    println!("{}", serde_json::to_string(&m).unwrap_or_default());
                } else {
                    println!(
                        " {:<6} {:<7} {:<12} {:<9} {:<11} {:<12} {:<11} {:<9} {:<10} {:<9}",
                        m.qps,
                        m.mrs,
                        m.state_bytes,
                        m.save_us,
                        m.restore_us,
                        m.downtime_us,
                        m.ops_during,
                        m.ops_lost,
                        m.ops_duplicated,
                        m.ops_total
                    );
                }
            }
            Err(e) => {
                eprintln!("error: migrate: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        eprintln!("error: work requests were lost, duplicated or reordered");
        ExitCode::FAILURE
    }
}

/// `migrate --roce`: a device migrates between processes while its peer (in this process)
/// keeps writing, reading and fetch-adding over RoCEv2; see `roce_perf::migrate_across`.
fn migrate_roce(o: &RoceOpts, hops: u32, runs: u32, json: bool) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The second address a device moves to: the remote one with the last octet + 1.
    let alt = match o.remote_ip {
        std::net::IpAddr::V4(v4) => {
            let mut b = v4.octets();
            b[3] = b[3].wrapping_add(1);
            std::net::IpAddr::from(b)
        }
        ip => ip,
    };
    if !json {
        println!("# vrdma-perf migrate --roce: a device moves between processes ({} and {alt}) while its peer at {} keeps sending", o.remote_ip, o.local_ip);
        println!("# downtime: stopped in one process -> running in the next (includes writing and reading the state and guest pages through a file)");
    }
    const PER_HOP: u64 = 2000;
    let iters = PER_HOP * (hops as u64 + 1);
    for _ in 0..runs.max(1) {
        let plan: Vec<(u64, std::net::IpAddr)> = (1..=hops as u64)
            .map(|k| (3 * PER_HOP * k, if k % 2 == 1 { o.remote_ip } else { alt }))
            .collect();
        match roce_perf::migrate_across(&exe, node_args(), o.remote_ip, o.local_ip, &plan, iters) {
            Ok(st) => {
                if json {
                    println!("{}", serde_json::to_string(&st).unwrap_or_default());
                } else {
                    println!(
                        " migrations {}  downtime_us {:?}  max_completion_gap_us {}  state_bytes {}  ops_total {}  ops_during {}  ops_lost {}  ops_duplicated {}",
                        st.migrations, st.downtime_us, st.max_completion_gap_us, st.state_bytes, st.ops_total, st.ops_during, st.ops_lost, st.ops_duplicated
                    );
                }
            }
            Err(e) => {
                eprintln!("error: migrate --roce: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
