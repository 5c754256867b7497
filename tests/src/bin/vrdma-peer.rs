//! `vrdma-peer`: the host side of the rdma_rxe interop suite (`tests/e2e/run.sh rxe-interop`).
//!
//! A vrdma device on a soft fabric with a RoCEv2 gateway for `--bind`, driven by the Rust test
//! guest driver, plays the peer of a real tool, speaking the tool's out-of-band exchange:
//!
//! ```text
//! vrdma-peer rc-pingpong [SERVER] --bind IP [-s 4096] [-n 1000] [-m 1024] [-r 500] [-p 18515] [-g N]
//! vrdma-peer write-lat   [SERVER] --bind IP [-s 2] [-n 1000] [-m 1024] [-p 18515] [-x N]
//! vrdma-peer read-lat | send-lat | atomic-lat   (the same options)
//! ```
//!
//! Without SERVER it is the server (listens on the TCP port); with it, the client. Prints one
//! line `PEER ok test=… role=… t_typical_us=…` or `PEER error test=… stage=… msg="…"` and exits
//! 0 or 1.

use std::net::IpAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use vrdma_device::soft::wire::{gid_from_ip, WireConfig, WireGateway};
use vrdma_device::soft::SoftFabric;
use vrdma_device::DeviceConfig;
use vrdma_tests::peer::{self, PeerOpts, Test};

#[derive(Parser)]
#[command(
    name = "vrdma-peer",
    about = "vrdma peer of ibv_rc_pingpong and perftest over RoCEv2"
)]
struct Cli {
    #[command(subcommand)]
    test: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// ibv_rc_pingpong (SEND/RECV ping-pong).
    RcPingpong(Common),
    /// ib_write_lat.
    WriteLat(Common),
    /// ib_read_lat.
    ReadLat(Common),
    /// ib_send_lat.
    SendLat(Common),
    /// ib_atomic_lat (FETCH_AND_ADD).
    AtomicLat(Common),
}

#[derive(Args)]
struct Common {
    /// Server address: run as the client. Without it, run as the server.
    server: Option<IpAddr>,
    /// This side's RoCE address (the device's GID is its IPv4-mapped form; the gateway binds
    /// UDP 4791 there).
    #[arg(long)]
    bind: IpAddr,
    /// Message size (default: 4096 for rc-pingpong, 2 otherwise; atomics are 8).
    #[arg(short = 's', long = "size")]
    size: Option<u64>,
    /// Iterations.
    #[arg(short = 'n', long = "iters", default_value_t = 1000)]
    iters: usize,
    /// Path MTU in bytes (perftest uses the smaller of both sides').
    #[arg(short = 'm', long = "mtu", default_value_t = 1024)]
    mtu: u32,
    /// rc-pingpong: receive queue depth.
    #[arg(short = 'r', long = "rx-depth", default_value_t = 500)]
    rx_depth: u32,
    /// TCP port of the out-of-band exchange.
    #[arg(short = 'p', long = "port", default_value_t = 18515)]
    port: u16,
    /// GID index (accepted for CLI parity with the tools; the device has one GID).
    #[arg(short = 'g', short_alias = 'x', long = "gid-index")]
    gid_index: Option<u32>,
    /// Seconds allowed for each stage (connect, each handshake, the data phase).
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// Busy-poll without yielding.
    #[arg(long)]
    busy_poll: bool,
    /// Local ACK timeout exponent of our QP (4.096 µs × 2^N; the tools use 14 ≈ 67 ms).
    #[arg(long, default_value_t = 14)]
    qp_timeout: u8,
    /// Accept received datagrams without checking their ICRC (diagnosis).
    #[arg(long)]
    no_icrc_check: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (test, c) = match cli.test {
        Cmd::RcPingpong(c) => (Test::RcPingpong, c),
        Cmd::WriteLat(c) => (Test::WriteLat, c),
        Cmd::ReadLat(c) => (Test::ReadLat, c),
        Cmd::SendLat(c) => (Test::SendLat, c),
        Cmd::AtomicLat(c) => (Test::AtomicLat, c),
    };
    let mut opts = PeerOpts::new(test);
    opts.server = c.server;
    if let Some(s) = c.size {
        opts.size = s;
    }
    opts.iters = c.iters;
    opts.mtu = c.mtu;
    opts.rx_depth = c.rx_depth;
    opts.port = c.port;
    opts.timeout = Duration::from_secs(c.timeout);
    opts.busy_poll = c.busy_poll;
    opts.qp_timeout = c.qp_timeout;
    let _ = c.gid_index;

    let fabric = SoftFabric::new();
    let gateway = match attach_wire(&fabric, c.bind, !c.no_icrc_check) {
        Ok(g) => g,
        Err(msg) => {
            let e = peer::PeerError {
                stage: "setup",
                msg,
            };
            println!("{}", peer::error_line(&opts, &e));
            return ExitCode::FAILURE;
        }
    };
    let cfg = DeviceConfig::with_gid(gid_from_ip(c.bind));
    eprintln!(
        "vrdma-peer: {} {} on {} (GID {}), OOB port {}",
        test.name(),
        opts.role(),
        c.bind,
        peer::gid_str(&cfg.gid),
        opts.port
    );
    let res = peer::run(&fabric, cfg, &opts, None);
    fabric.detach_wire(&gateway);
    match res {
        Ok(r) => {
            println!("{}", r.line());
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("{}", peer::error_line(&opts, &e));
            ExitCode::FAILURE
        }
    }
}

/// Attaches the RoCEv2 gateway for `addr` (UDP `addr`:4791) to the fabric.
fn attach_wire(
    fabric: &Arc<SoftFabric>,
    addr: IpAddr,
    check_icrc: bool,
) -> Result<Arc<WireGateway>, String> {
    let mut cfg = WireConfig::new(addr);
    cfg.check_icrc = check_icrc;
    fabric
        .attach_wire(cfg)
        .map_err(|e| format!("RoCEv2 gateway on {addr}:4791: {e}"))
}
