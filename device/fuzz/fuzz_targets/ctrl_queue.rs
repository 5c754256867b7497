//! Fuzz target: bytes → control requests on the real control virtqueue of a small guest,
//! through the real virtio-mmio transport.
//!
//! Input format (everything little-endian; a short input reads as zeros):
//!
//! ```text
//! u8 setup     bit 0: register the doorbell area first (so CQs/QPs can be created)
//!              bit 1: also create a PD and a CQ first (handles 0x101 / 0x101)
//! records until the input ends:
//!   u8  kind   0..=1: request, bytes verbatim
//!              2:     request whose trailing u64s (after `skip` bytes) become page addresses
//!                     in guest memory (see `page_of`), so ring/MR commands can succeed
//!              3:     a raw descriptor chain (loops, bad addresses, bad indices)
//!              4:     doorbell: write a doorbell-area word, then notify queue 1
//!              5:     an MMIO register write
//!   kind 0..=2: u8 pieces, u16 writable, u16 len, [u8 skip (kind 2)], len bytes
//!   kind 3:     u8 n (≤ 4), u16 head, n × (u64 addr, u32 len, u16 flags, u16 next)
//!   kind 4:     u16 word index, u64 value
//!   kind 5:     u16 offset, u32 value
//! ```
//!
//! Invariants: no panic, used length ≤ writable part, a returned status is a known one, and
//! after the input the device still answers QUERY_DEVICE.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vm_memory::{ByteValued, Bytes, GuestAddress};
use vrdma_abi as abi;
use vrdma_device_fuzz::{page_of, Desc, Input, RawGuest, DB, FREE, REQ, RESP};
use vrdma_guest::mmio as reg;

fuzz_target!(|data: &[u8]| {
    let mut g = RawGuest::new();
    let mut inp = Input::new(data);
    let setup = inp.u8();
    let cfg = g.t.device().config().clone();
    let db_len = abi::doorbell_area_size(cfg.max_qp, cfg.max_cq);
    if setup & 1 != 0 {
        let c = abi::CmdSetDoorbellArea {
            gpa: DB,
            len: db_len,
        };
        let (st, _) = g.ctrl(abi::CMD_SET_DOORBELL_AREA, c.as_slice(), &[], 0);
        assert_eq!(st, abi::STATUS_OK);
        if setup & 2 != 0 {
            let (st, _) = g.ctrl(abi::CMD_CREATE_PD, &[], &[], 8);
            assert_eq!(st, abi::STATUS_OK);
            let cq = abi::CmdCreateCq {
                depth: 16,
                npages: 1,
            };
            let (st, _) = g.ctrl(abi::CMD_CREATE_CQ, cq.as_slice(), &[FREE], 8);
            assert_eq!(st, abi::STATUS_OK);
        }
    }
    let mut records = 0;
    while !inp.is_empty() && records < 64 {
        records += 1;
        match inp.u8() % 6 {
            k @ 0..=2 => {
                let pieces = inp.u8() as usize % 8 + 1;
                let writable = inp.u16() as usize % 1024;
                let len = inp.u16() as usize % 4096;
                let skip = if k == 2 { inp.u8() as usize } else { 0 };
                let mut bytes = inp.bytes(len).to_vec();
                if k == 2 {
                    let mut off = skip.min(bytes.len());
                    while off + 8 <= bytes.len() {
                        let v = u64::from_le_bytes(bytes[off..off + 8].try_into().unwrap());
                        bytes[off..off + 8].copy_from_slice(&page_of(v).to_le_bytes());
                        off += 8;
                    }
                }
                if let Some((used, out)) = g.request(&bytes, pieces, writable) {
                    if writable < 8 {
                        assert_eq!(used, 0, "no room for CtrlResp: empty answer");
                    } else if used >= 8 {
                        let st = u32::from_le_bytes(out[..4].try_into().unwrap());
                        assert!(st <= abi::STATUS_BAD_LENGTH, "unknown status {st}");
                    }
                }
            }
            3 => {
                let n = inp.u8() as usize % 5;
                let head = inp.u16();
                let mut descs = Vec::new();
                for i in 0..n {
                    let raw = inp.u64();
                    // Mostly inside the scratch areas, sometimes anywhere.
                    let addr = if raw >> 63 == 1 {
                        // Anywhere but the raw driver's queues.
                        (raw & !(1 << 63)).max(FREE)
                    } else {
                        [REQ, RESP][raw as usize & 1] + (raw >> 1) % 0x1_0000
                    };
                    descs.push(Desc {
                        index: i as u16,
                        addr,
                        len: inp.u32() % 0x2_0000,
                        flags: inp.u16(),
                        next: inp.u16(),
                    });
                }
                g.push(0, &descs, head);
                g.notify(0);
                let _ = g.drain_used(0);
            }
            4 => {
                let word = inp.u16() as u64 % (db_len / 8);
                let v = inp.u64();
                if setup & 1 != 0 {
                    g.mem.write_obj(v, GuestAddress(DB + 8 * word)).unwrap();
                }
                g.notify(1);
            }
            _ => {
                let off = (inp.u16() as u64 % 0x100) & !3;
                let v = inp.u32();
                // Keep the transport live: no resets, no status or queue programming (that is
                // the MMIO sweep of the hostile tests).
                if ![reg::STATUS, reg::QUEUE_READY].contains(&off) && !(0x80..0xb0).contains(&off) {
                    g.w32(off, v);
                }
            }
        }
        // Keep the readable/writable scratch sane for the next request.
        g.mem.write_slice(&[0u8; 16], GuestAddress(RESP)).unwrap();
    }
    g.assert_alive();
});
