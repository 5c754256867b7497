//! `vrdma-perf`: guest-side RDMA benchmarks with perftest semantics, run in-process over the
//! soft fabric (two guests, the full ABI and device).
//!
//! ```text
//! vrdma-perf write-lat [-s BYTES | -a] [-n ITERS] [--inline] [--json]
//! ```

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vrdma_tests::perf::{
    idle_cpu, memcpy_bw, write_bw_device, write_lat_device, write_lat_device_interrupt,
    write_lat_eventfd, write_lat_shm, LatStats,
};

#[derive(Parser)]
#[command(name = "vrdma-perf", about = "vrdma benchmarks (perftest semantics)")]
struct Cli {
    #[command(subcommand)]
    test: Test,
}

#[derive(Subcommand)]
enum Test {
    /// RDMA WRITE latency, ib_write_lat semantics (half round trip; t_typical = median).
    WriteLat {
        /// Message size in bytes.
        #[arg(short = 's', long = "size", default_value_t = 2)]
        size: u64,
        /// Sweep sizes 2 B … 8 MiB.
        #[arg(short = 'a', long = "all")]
        all: bool,
        /// Iterations.
        #[arg(short = 'n', long = "iters", default_value_t = 1000)]
        iters: usize,
        /// Send small messages inline (up to the QP's max inline size).
        #[arg(long)]
        inline: bool,
        /// How the peer's write is detected: `poll` (busy-poll the last byte, as ib_write_lat)
        /// or `interrupt` (WRITE with immediate; sleep on the armed receive CQ's interrupt).
        #[arg(long, default_value = "poll", value_parser = ["poll", "interrupt"])]
        completion: String,
        /// One JSON object per line instead of the table.
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
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.test {
        Test::WriteLat {
            size,
            all,
            iters,
            inline,
            completion,
            json,
        } => {
            let interrupt = completion == "interrupt";
            if size == 0 || size > 8 << 20 {
                eprintln!("error: --size must be 1 ..= 8388608");
                return ExitCode::FAILURE;
            }
            let sizes: Vec<u64> = if all {
                (1..=23).map(|s| 1u64 << s).collect()
            } else {
                vec![size]
            };
            if !json {
                println!("# vrdma-perf write-lat: two in-process guests over the soft fabric");
                println!("# path=device: guest driver -> virtio-mmio -> device -> soft fabric -> peer guest memory");
                if interrupt {
                    println!("# path=eventfd: two threads ping-ponging through blocking eventfds (the wake-up floor), same run");
                } else {
                    println!(
                        "# path=shm: two threads ping-ponging one cache line (the floor), same run"
                    );
                }
                println!("{}", LatStats::header());
            }
            for s in sizes {
                let res = if interrupt {
                    write_lat_device_interrupt(s, iters)
                } else {
                    write_lat_device(s, iters, inline)
                };
                let rtts = match res {
                    Ok(r) => r,
                    Err(e) => {
                        eprintln!("error: write-lat {s} B: {e}");
                        return ExitCode::FAILURE;
                    }
                };
                let mode = if interrupt { "interrupt" } else { "poll" };
                let dev = LatStats::from_rtts("write_lat", "device", s, mode, &rtts);
                let floor = if interrupt {
                    match write_lat_eventfd(iters) {
                        Ok(r) => LatStats::from_rtts("write_lat", "eventfd", s, mode, &r),
                        Err(e) => {
                            eprintln!("error: eventfd floor: {e}");
                            return ExitCode::FAILURE;
                        }
                    }
                } else {
                    LatStats::from_rtts("write_lat", "shm", s, mode, &write_lat_shm(iters))
                };
                for st in [&dev, &floor] {
                    if json {
                        println!("{}", serde_json::to_string(st).unwrap_or_default());
                    } else {
                        println!("{}", st.row());
                    }
                }
                if !json {
                    println!(
                        "# {s} B: device/{} t_typical ratio {:.2}",
                        floor.path,
                        dev.t_typical_us / floor.t_typical_us.max(1e-9)
                    );
                }
            }
            ExitCode::SUCCESS
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
            json,
        } => {
            if size == 0 || size > 8 << 20 {
                eprintln!("error: --size must be 1 ..= 8388608");
                return ExitCode::FAILURE;
            }
            if !json {
                println!("# vrdma-perf write-bw: one sender thread, two in-process guests");
                println!(
                    " {:<8} {:<6} {:<6} {:<10} {:<12} {:<10} first_cqe[usec]",
                    "#bytes", "qps", "batch", "msgs", "rate[Mpps]", "bw[Gb/s]"
                );
            }
            if !json {
                let mc = memcpy_bw(size as usize, 1 << 30) * 8.0 / 1e9;
                println!("# single-thread memcpy of {size} B buffers, same run: {mc:.2} Gb/s");
            }
            for &n in &qps {
                for &b in &batch {
                    match write_bw_device(size, n, b, iters) {
                        Ok(st) if json => {
                            println!("{}", serde_json::to_string(&st).unwrap_or_default())
                        }
                        Ok(st) => println!(
                            " {:<8} {:<6} {:<6} {:<10} {:<12.3} {:<10.2} {:.1}",
                            st.bytes,
                            st.qps,
                            st.batch,
                            st.msgs,
                            st.msg_rate_mpps,
                            st.bw_gbps,
                            st.first_completion_us
                        ),
                        Err(e) => {
                            eprintln!("error: write-bw {n} QPs batch {b}: {e}");
                            return ExitCode::FAILURE;
                        }
                    }
                }
            }
            ExitCode::SUCCESS
        }
    }
}
