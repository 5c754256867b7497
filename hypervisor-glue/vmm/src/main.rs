//! `vrdma-vmm`: a small reference VMM that boots a Linux guest with vrdma devices.
//!
//! KVM (kvm-ioctls), linux-loader (bzImage or ELF kernel, initrd, command line), vm-memory,
//! a vm-superio 16550 serial console on COM1 (stdin → guest, guest → stdout), event-manager for
//! the device eventfds, and `--vrdma N` virtio-mmio vrdma devices on one soft fabric, described
//! to the guest through ACPI (`LNRO0005` devices in the DSDT). See `docs/embedding.md`.

mod acpi;
mod boot;
mod cpu;
mod devices;
mod layout;
mod vmm;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Command line of `vrdma-vmm`.
#[derive(Debug, Parser)]
#[command(
    name = "vrdma-vmm",
    version,
    about = "Reference VMM: boots a Linux guest on KVM with virtio-mmio vrdma devices (virtio device 42) on a soft fabric"
)]
pub struct Args {
    /// Guest memory: a number of MiB, or with a suffix K, M or G (e.g. 512, 1G).
    #[arg(long, default_value = "512M", value_parser = parse_size)]
    pub memory: u64,
    /// Back guest memory with transparent huge pages (madvise). Recommended on a KVM host for
    /// guests with many QPs (docs/embedding.md); off by default, and off in the nested test
    /// (KVM inside QEMU TCG), where it has not been shown safe.
    #[arg(long)]
    pub huge_pages: bool,
    /// Number of vCPUs (1..=32).
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Kernel image: a bzImage (e.g. Debian's /boot/vmlinuz-*) or an uncompressed ELF vmlinux.
    #[arg(long)]
    pub kernel: PathBuf,
    /// Initial ramdisk (e.g. a gzip'd cpio).
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "console=ttyS0 panic=-1")]
    pub cmdline: String,
    /// Number of vrdma devices (0..=8), all attached to one soft fabric in this process.
    #[arg(long, default_value_t = 1)]
    pub vrdma: u32,
    /// Local IP addresses for the vrdma devices' RoCEv2 presence (comma-separated, one per
    /// device, in order): device i gets the GID of the i-th address and reaches devices in other
    /// processes and hosts, Linux rdma_rxe and RoCE NICs over UDP port 4791. Devices without an
    /// address stay on the in-process fabric only.
    #[arg(long, value_delimiter = ',')]
    pub roce_addr: Vec<std::net::IpAddr>,
    /// Log level of the VMM and the device (error, warn, info, debug, trace); messages go to
    /// stderr.
    #[arg(long, default_value = "warn")]
    pub log_level: tracing::Level,
}

/// Parses `N`, `NK`, `NM`, `NG` (binary units; a bare number is MiB) into bytes.
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                _ => return Err(format!("unknown size suffix {c:?} (use K, M or G)")),
            };
            (&s[..i], shift)
        }
        _ => (s, 20),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 512, 512M, 1G)"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_max_level(args.log_level)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    match vmm::run(&args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("vrdma-vmm: error: {e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Ok(512 << 20));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("4096K"), Ok(4 << 20));
        assert!(parse_size("1T").is_err());
        assert!(parse_size("abc").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999999999G").is_err());
    }

    #[test]
    fn args_parse() {
        let a = Args::try_parse_from([
            "vrdma-vmm",
            "--kernel",
            "/k",
            "--memory",
            "1G",
            "--vcpus",
            "2",
            "--vrdma",
            "2",
        ])
        .unwrap();
        assert_eq!(a.memory, 1 << 30);
        assert_eq!(a.vcpus, 2);
        assert_eq!(a.vrdma, 2);
        assert!(
            Args::try_parse_from(["vrdma-vmm"]).is_err(),
            "--kernel is required"
        );
    }
}
