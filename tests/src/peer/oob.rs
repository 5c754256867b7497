//! The out-of-band QP-information exchanges of the real tools, over TCP.
//!
//! * `ibv_rc_pingpong` (rdma-core `libibverbs/examples/rc_pingpong.c`): one fixed-size message
//!   each way, `"%04x:%06x:%06x:%s"` (LID, QPN, PSN, GID as 32 hex digits in wire byte order)
//!   plus its NUL: 52 bytes. The client writes first, then reads the server's message, then
//!   writes `"done"` with its NUL (5 bytes). The server reads, connects its QP, writes its own
//!   message and reads the `"done"`.
//! * perftest (`src/perftest_communication.c`): every exchange is "the client writes, then
//!   reads; the server reads, then writes" of a buffer of the same size on both sides. With a
//!   GID (always on RoCE) the QP message is `KEY_PRINT_FMT_GID`:
//!   `"%04x:%04x:%06x:%06x:%08x:%016llx:" + 16 × "%02x:" + "%08x:"` (LID, out_reads, QPN, PSN,
//!   rkey, vaddr, GID bytes, SRQ number) plus its NUL: 108 bytes. Before the QP messages the
//!   tools exchange the version string (16 bytes), the cycle buffer and the cache line size
//!   (4 bytes each, network order) and the MTU (a 2-byte decimal string of the `ibv_mtu` enum).
//!   `ctx_close_connection` is one more QP-message exchange followed by a `"done"` write (5
//!   bytes) that nobody reads.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use vrdma_abi::Gid;

/// Size of `ibv_rc_pingpong`'s message (`sizeof "0000:000000:000000:" + 32 hex digits`).
pub const PINGPONG_MSG_SIZE: usize = 52;
/// perftest's `KEY_MSG_SIZE_GID`.
pub const PERFTEST_MSG_SIZE: usize = 108;
/// perftest's `MAX_VERSION`: the size of the version exchange.
pub const PERFTEST_VERSION_SIZE: usize = 16;
/// The version string we announce: perftest 4.5's `VERSION` (6.06); the tools refuse peers
/// older than 5.70.
pub const PERFTEST_VERSION: &str = "6.06";
/// `"done"` with its NUL, as both tools write it.
pub const DONE: &[u8; 5] = b"done\0";

/// One side's QP information as `ibv_rc_pingpong` exchanges it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PingpongDest {
    /// LID (0 on RoCE).
    pub lid: u16,
    /// QP number.
    pub qpn: u32,
    /// First send PSN.
    pub psn: u32,
    /// GID.
    pub gid: Gid,
}

fn hex_gid(gid: &Gid) -> String {
    gid.raw.iter().map(|b| format!("{b:02x}")).collect()
}

impl PingpongDest {
    /// The 52-byte message (NUL-terminated).
    pub fn encode(&self) -> [u8; PINGPONG_MSG_SIZE] {
        let s = format!(
            "{:04x}:{:06x}:{:06x}:{}",
            self.lid,
            self.qpn,
            self.psn,
            hex_gid(&self.gid)
        );
        let mut out = [0u8; PINGPONG_MSG_SIZE];
        let n = s.len().min(PINGPONG_MSG_SIZE - 1);
        out[..n].copy_from_slice(&s.as_bytes()[..n]);
        out
    }

    /// Parses a message as `sscanf("%x:%x:%x:%s")` and `wire_gid_to_gid` do.
    pub fn decode(msg: &[u8]) -> Result<Self, String> {
        let s = c_str(msg)?;
        let mut it = s.splitn(4, ':');
        let mut field = |what: &str| {
            it.next()
                .ok_or_else(|| format!("rc_pingpong message {s:?}: no {what}"))
                .map(str::to_string)
        };
        let lid = parse_hex(&field("LID")?, "LID")? as u16;
        let qpn = parse_hex(&field("QPN")?, "QPN")? as u32;
        let psn = parse_hex(&field("PSN")?, "PSN")? as u32;
        let g = field("GID")?;
        if g.len() < 32 {
            return Err(format!(
                "rc_pingpong message {s:?}: GID is not 32 hex digits"
            ));
        }
        let mut raw = [0u8; 16];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = u8::from_str_radix(&g[2 * i..2 * i + 2], 16)
                .map_err(|_| format!("rc_pingpong message {s:?}: bad GID"))?;
        }
        Ok(Self {
            lid,
            qpn: qpn & 0xff_ffff,
            psn: psn & 0xff_ffff,
            gid: Gid { raw },
        })
    }
}

/// One side's QP information as perftest exchanges it (`struct pingpong_dest`, GID form).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PerftestDest {
    /// LID (0 on RoCE).
    pub lid: u16,
    /// Outstanding READs/atomics this side accepts as responder.
    pub out_reads: u32,
    /// QP number.
    pub qpn: u32,
    /// First send PSN.
    pub psn: u32,
    /// Remote key of the buffer.
    pub rkey: u32,
    /// Address of this side's receive buffer (where the peer writes / reads / does atomics).
    pub vaddr: u64,
    /// GID.
    pub gid: Gid,
    /// SRQ number (0).
    pub srqn: u32,
}

impl PerftestDest {
    /// The 108-byte `KEY_PRINT_FMT_GID` message (NUL-terminated).
    pub fn encode(&self) -> [u8; PERFTEST_MSG_SIZE] {
        let mut s = format!(
            "{:04x}:{:04x}:{:06x}:{:06x}:{:08x}:{:016x}:",
            self.lid, self.out_reads, self.qpn, self.psn, self.rkey, self.vaddr
        );
        for b in self.gid.raw {
            s.push_str(&format!("{b:02x}:"));
        }
        s.push_str(&format!("{:08x}:", self.srqn));
        let mut out = [0u8; PERFTEST_MSG_SIZE];
        let n = s.len().min(PERFTEST_MSG_SIZE - 1);
        out[..n].copy_from_slice(&s.as_bytes()[..n]);
        out
    }

    /// Parses a `KEY_PRINT_FMT_GID` message (colon-separated hex fields).
    pub fn decode(msg: &[u8]) -> Result<Self, String> {
        let s = c_str(msg)?;
        let f: Vec<&str> = s.split(':').collect();
        if f.len() < 23 {
            return Err(format!(
                "perftest message {s:?}: {} fields, want 23",
                f.len()
            ));
        }
        let mut raw = [0u8; 16];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = parse_hex(f[6 + i], "GID byte")? as u8;
        }
        Ok(Self {
            lid: parse_hex(f[0], "LID")? as u16,
            out_reads: parse_hex(f[1], "out_reads")? as u32,
            qpn: parse_hex(f[2], "QPN")? as u32 & 0xff_ffff,
            psn: parse_hex(f[3], "PSN")? as u32 & 0xff_ffff,
            rkey: parse_hex(f[4], "rkey")? as u32,
            vaddr: parse_hex(f[5], "vaddr")?,
            gid: Gid { raw },
            srqn: parse_hex(f[22], "SRQN")? as u32,
        })
    }
}

fn c_str(msg: &[u8]) -> Result<&str, String> {
    let end = msg.iter().position(|&b| b == 0).unwrap_or(msg.len());
    std::str::from_utf8(&msg[..end]).map_err(|_| "message is not ASCII".to_string())
}

fn parse_hex(s: &str, what: &str) -> Result<u64, String> {
    u64::from_str_radix(s.trim(), 16).map_err(|_| format!("bad {what} {s:?}"))
}

/// perftest's MTU exchange: the `ibv_mtu` enum as a decimal string in a 2-byte buffer.
pub fn mtu_msg(mtu_enum: u32) -> [u8; 2] {
    let s = format!("{mtu_enum}");
    let mut out = [0u8; 2];
    out[0] = s.as_bytes()[0];
    out
}

/// Parses perftest's MTU message (`strtol` of the buffer).
pub fn parse_mtu_msg(msg: &[u8]) -> Option<u32> {
    c_str(msg).ok()?.trim().parse().ok()
}

/// The TCP connection of the out-of-band exchange.
pub struct Oob {
    stream: TcpStream,
    client: bool,
}

impl Oob {
    /// Connects to `addr`, retrying refused/unreachable connections until `deadline` (the
    /// server may not listen yet).
    pub fn connect(addr: SocketAddr, deadline: Instant) -> io::Result<Self> {
        loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                Ok(stream) => {
                    stream.set_nodelay(true)?;
                    return Ok(Self {
                        stream,
                        client: true,
                    });
                }
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("connect to {addr}: {e} (gave up at the deadline)"),
                    ))
                }
            }
        }
    }

    /// Listens on `addr` and accepts one connection before `deadline`.
    pub fn accept(listener: &TcpListener, deadline: Instant) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false)?;
                    stream.set_nodelay(true)?;
                    return Ok(Self {
                        stream,
                        client: false,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "no client connected before the deadline",
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether this is the client (the side that writes first).
    pub fn is_client(&self) -> bool {
        self.client
    }

    /// Sets the timeout of every later read and write.
    pub fn set_timeout(&self, t: Duration) -> io::Result<()> {
        self.stream.set_read_timeout(Some(t))?;
        self.stream.set_write_timeout(Some(t))
    }

    /// Writes one message in one `write`.
    pub fn send(&mut self, msg: &[u8]) -> io::Result<()> {
        self.stream.write_all(msg)
    }

    /// Reads exactly `n` bytes.
    pub fn recv(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; n];
        self.stream.read_exact(&mut buf)?;
        Ok(buf)
    }

    /// perftest's exchange of equal-sized buffers: the client writes then reads, the server
    /// reads then writes.
    pub fn xchg(&mut self, mine: &[u8]) -> io::Result<Vec<u8>> {
        if self.client {
            self.send(mine)?;
            self.recv(mine.len())
        } else {
            let theirs = self.recv(mine.len())?;
            self.send(mine)?;
            Ok(theirs)
        }
    }

    /// The end of a run: half-closes our side and waits (up to `t`) until the peer closes its
    /// side, discarding whatever it still sends (perftest's unread `"done"`). Keeps our QP
    /// alive until the peer tool has exited, so its last packets still get ACKed.
    pub fn linger(&mut self, t: Duration) {
        let _ = self.stream.shutdown(Shutdown::Write);
        let deadline = Instant::now() + t;
        let mut buf = [0u8; 256];
        while Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if self
                .stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .is_err()
            {
                return;
            }
            match self.stream.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pingpong_message_is_52_bytes_and_round_trips() {
        let mut raw = [0u8; 16];
        raw[10] = 0xff;
        raw[11] = 0xff;
        raw[12..].copy_from_slice(&[10, 77, 0, 2]);
        let d = PingpongDest {
            lid: 0,
            qpn: 0x11,
            psn: 0xabcdef,
            gid: Gid { raw },
        };
        let m = d.encode();
        assert_eq!(
            &m[..51],
            b"0000:000011:abcdef:00000000000000000000ffff0a4d0002"
        );
        assert_eq!(m[51], 0);
        assert_eq!(PingpongDest::decode(&m).unwrap(), d);
    }

    #[test]
    fn perftest_message_is_108_bytes_and_round_trips() {
        let mut raw = [0u8; 16];
        raw[10] = 0xff;
        raw[11] = 0xff;
        raw[12..].copy_from_slice(&[10, 77, 0, 1]);
        let d = PerftestDest {
            lid: 0,
            out_reads: 16,
            qpn: 0x123,
            psn: 0x456789,
            rkey: 0xdeadbeef,
            vaddr: 0x5555_0000_1000,
            gid: Gid { raw },
            srqn: 0,
        };
        let m = d.encode();
        // Every byte but the NUL is used: the format fills KEY_MSG_SIZE_GID exactly.
        assert_eq!(m.iter().position(|&b| b == 0), Some(107));
        assert!(m.starts_with(b"0000:0010:000123:456789:deadbeef:0000555500001000:00:00:"));
        assert!(m[..107].ends_with(b"ff:ff:0a:4d:00:01:00000000:"));
        assert_eq!(PerftestDest::decode(&m).unwrap(), d);
        assert_eq!(parse_mtu_msg(&mtu_msg(3)), Some(3));
    }
}
