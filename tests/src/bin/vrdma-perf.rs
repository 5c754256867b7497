//! `vrdma-perf`: guest-side RDMA benchmarks with perftest semantics, run in-process over the
//! soft fabric (two guests, the full ABI and device).
//!
//! ```text
//! vrdma-perf write-lat [-s BYTES | -a] [-n ITERS] [--inline] [--json]
//! ```

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vrdma_tests::perf::{write_bw_device, write_lat_device, write_lat_shm, LatStats};

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
        /// One JSON object per line instead of the table.
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
            json,
        } => {
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
                println!(
                    "# path=shm: two threads ping-ponging one cache line (the floor), same run"
                );
                println!("{}", LatStats::header());
            }
            for s in sizes {
                let rtts = match write_lat_device(s, iters, inline) {
                    Ok(r) => r,
                    Err(e) => {
                        eprintln!("error: write-lat {s} B: {e}");
                        return ExitCode::FAILURE;
                    }
                };
                let dev = LatStats::from_rtts("write_lat", "device", s, "poll", &rtts);
                let shm = LatStats::from_rtts("write_lat", "shm", s, "poll", &write_lat_shm(iters));
                for st in [&dev, &shm] {
                    if json {
                        println!("{}", serde_json::to_string(st).unwrap_or_default());
                    } else {
                        println!("{}", st.row());
                    }
                }
                if !json {
                    println!(
                        "# {s} B: device/shm t_typical ratio {:.1}",
                        dev.t_typical_us / shm.t_typical_us.max(1e-9)
                    );
                }
            }
            ExitCode::SUCCESS
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
