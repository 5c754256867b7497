//! Memory regions: guest page lists resolved once, at registration, into runs of guest-physical
//! memory, and the copy routines that move data between guest memories with no bounce buffer.

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vrdma_abi as abi;

use crate::GuestMemoryMmap;

/// A scatter/gather list of guest segments; most lists have one or two entries, which live
/// inline (no allocation on the data path).
pub type SegList = smallvec::SmallVec<[Seg; 2]>;

/// A contiguous piece of guest-physical memory, inside one memory region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seg {
    /// Guest-physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Why a page list was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageListError {
    /// Misaligned page, or a page (partly) outside guest memory.
    BadAddress,
    /// Wrong count or size.
    Invalid,
}

/// Checks that every page of `pages` is aligned to `1 << shift` and lies wholly inside one
/// guest memory region.
pub fn check_pages(mem: &GuestMemoryMmap, pages: &[u64], shift: u32) -> Result<(), PageListError> {
    let size = 1u64 << shift;
    for &p in pages {
        if p & (size - 1) != 0 || !in_one_region(mem, p, size) {
            return Err(PageListError::BadAddress);
        }
    }
    Ok(())
}

/// Whether `[gpa, gpa + len)` lies inside a single memory region.
pub fn in_one_region(mem: &GuestMemoryMmap, gpa: u64, len: u64) -> bool {
    let Some(end) = gpa.checked_add(len) else {
        return false;
    };
    match mem.find_region(GuestAddress(gpa)) {
        Some(r) => {
            let r_end = r.start_addr().0 + r.len();
            end <= r_end
        }
        None => false,
    }
}

/// A run of MR bytes `[off, off + len)` (offsets from the MR's iova) at guest address `gpa`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    off: u64,
    gpa: u64,
    len: u64,
}

/// A registered memory region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mr {
    /// Owning PD handle.
    pub pd: u32,
    /// `ACCESS_*` flags.
    pub access: u32,
    /// First virtual address.
    pub iova: u64,
    /// Length in bytes.
    pub length: u64,
    /// log2 page size.
    pub page_shift: u32,
    /// The guest's page list, kept for save/restore (translations are rebuilt from it).
    pub pages: Vec<u64>,
    runs: Vec<Run>,
}

impl Mr {
    /// Number of pages needed to cover `[iova, iova + length)` with pages of `1 << shift`.
    pub fn pages_needed(iova: u64, length: u64, shift: u32) -> Option<u64> {
        if length == 0 || !(12..=30).contains(&shift) {
            return None;
        }
        // The end, iova + length, must be representable (the MR may not touch 2^64).
        iova.checked_add(length)?;
        let last = iova + (length - 1);
        Some((last >> shift) - (iova >> shift) + 1)
    }

    /// Validates a registration and builds its translation.
    pub fn new(
        mem: &GuestMemoryMmap,
        pd: u32,
        access: u32,
        iova: u64,
        length: u64,
        page_shift: u32,
        pages: Vec<u64>,
    ) -> Result<Self, PageListError> {
        let need = Self::pages_needed(iova, length, page_shift).ok_or(PageListError::Invalid)?;
        if need != pages.len() as u64 {
            return Err(PageListError::Invalid);
        }
        check_pages(mem, &pages, page_shift)?;
        let size = 1u64 << page_shift;
        let first_off = iova & (size - 1);
        let mut runs: Vec<Run> = Vec::new();
        for (i, &p) in pages.iter().enumerate() {
            // Bytes of this page that belong to the MR.
            let page_start_off = (i as u64 * size).saturating_sub(first_off);
            let skip = if i == 0 { first_off } else { 0 };
            let len = (size - skip).min(length - page_start_off);
            let gpa = p + skip;
            if let Some(last) = runs.last_mut() {
                if last.gpa + last.len == gpa && in_one_region(mem, last.gpa, last.len + len) {
                    last.len += len;
                    continue;
                }
            }
            runs.push(Run {
                off: page_start_off,
                gpa,
                len,
            });
        }
        Ok(Self {
            pd,
            access,
            iova,
            length,
            page_shift,
            pages,
            runs,
        })
    }

    /// Appends the guest segments backing `[addr, addr + len)` to `out`. Returns false (and
    /// appends nothing) if the range is not wholly inside the MR.
    pub fn resolve(&self, addr: u64, len: u64, out: &mut SegList) -> bool {
        if len == 0 {
            // A zero-length SGE transfers nothing: its address is not checked.
            return true;
        }
        let Some(off) = addr.checked_sub(self.iova) else {
            return false;
        };
        match off.checked_add(len) {
            Some(end) if end <= self.length => {}
            _ => return false,
        }
        if let [r] = self.runs.as_slice() {
            // One run (physically contiguous MR): the range checked above lies inside it.
            out.push(Seg {
                gpa: r.gpa + off,
                len,
            });
            return true;
        }
        let mut i = self.runs.partition_point(|r| r.off + r.len <= off);
        let (mut off, mut left) = (off, len);
        while left > 0 {
            let Some(r) = self.runs.get(i) else {
                return false;
            };
            let within = off - r.off;
            let n = (r.len - within).min(left);
            push_seg(out, r.gpa + within, n);
            off += n;
            left -= n;
            i += 1;
        }
        true
    }
}

fn push_seg(out: &mut SegList, gpa: u64, len: u64) {
    // Runs are already merged where that is safe (same region); merging here could join two
    // adjacent regions, which no single slice can span.
    out.push(Seg { gpa, len });
}

/// Total bytes of a segment list.
pub fn total_len(segs: &[Seg]) -> u64 {
    segs.iter().map(|s| s.len).sum()
}

/// Copies `min(total(src), total(dst))` bytes from `src` segments of `src_mem` into `dst`
/// segments of `dst_mem`: one copy, straight between the two guests' memories. Writes are
/// recorded in the destination's dirty bitmap. Returns the bytes copied.
pub fn copy_between(
    src_mem: &GuestMemoryMmap,
    src: &[Seg],
    dst_mem: &GuestMemoryMmap,
    dst: &[Seg],
) -> u64 {
    if let ([s], [d]) = (src, dst) {
        // One segment each (most messages): one copy.
        let n = s.len.min(d.len);
        return if n == 0 || crate::gm::copy(src_mem, s.gpa, dst_mem, d.gpa, n) {
            n
        } else {
            0
        };
    }
    let (mut si, mut di) = (0usize, 0usize);
    let (mut soff, mut doff) = (0u64, 0u64);
    let mut copied = 0u64;
    while si < src.len() && di < dst.len() {
        let (s, d) = (src[si], dst[di]);
        let n = (s.len - soff).min(d.len - doff);
        if n > 0 {
            // Segments were validated against their memories when resolved; a failure here
            // means a region went away, which we treat as "nothing more to copy".
            if !crate::gm::copy(src_mem, s.gpa + soff, dst_mem, d.gpa + doff, n) {
                return copied;
            }
            copied += n;
        }
        soff += n;
        doff += n;
        if soff == s.len {
            si += 1;
            soff = 0;
        }
        if doff == d.len {
            di += 1;
            doff = 0;
        }
    }
    copied
}

/// Writes `bytes` into `dst` segments; returns the bytes written.
pub fn write_segs(mem: &GuestMemoryMmap, dst: &[Seg], mut bytes: &[u8]) -> u64 {
    let mut done = 0;
    for d in dst {
        if bytes.is_empty() {
            break;
        }
        let n = (d.len as usize).min(bytes.len());
        if mem.write_slice(&bytes[..n], GuestAddress(d.gpa)).is_err() {
            break;
        }
        bytes = &bytes[n..];
        done += n as u64;
    }
    done
}

/// Reads `src` segments into a byte vector.
pub fn read_segs(mem: &GuestMemoryMmap, src: &[Seg], out: &mut Vec<u8>) {
    for s in src {
        let start = out.len();
        out.resize(start + s.len as usize, 0);
        if mem
            .read_slice(&mut out[start..], GuestAddress(s.gpa))
            .is_err()
        {
            out.truncate(start);
            return;
        }
    }
}

/// The MR access bits a remote operation needs.
pub fn remote_access_for(op: u8) -> u32 {
    match op {
        abi::WR_RDMA_READ => abi::ACCESS_REMOTE_READ,
        abi::WR_ATOMIC_CMP_AND_SWP | abi::WR_ATOMIC_FETCH_AND_ADD => abi::ACCESS_REMOTE_ATOMIC,
        _ => abi::ACCESS_REMOTE_WRITE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 1 << 20),
            (GuestAddress(2 << 20), 1 << 20),
        ])
        .unwrap()
    }

    #[test]
    fn resolves_across_discontiguous_pages() {
        let m = mem();
        // iova starts 100 bytes into its first page; pages are out of order.
        let pages = vec![0x3000, 0x1000, 0x2000];
        let mr = Mr::new(&m, 1, 0, 0x10064, 8192, 12, pages).unwrap();
        let mut out = SegList::new();
        assert!(mr.resolve(0x10064, 8192, &mut out));
        assert_eq!(
            out.to_vec(),
            vec![
                Seg {
                    gpa: 0x3064,
                    len: 4096 - 100
                },
                Seg {
                    gpa: 0x1000,
                    len: 4096 + 100
                },
            ]
        );
        assert_eq!(total_len(&out), 8192);
        out.clear();
        assert!(!mr.resolve(0x10064, 8193, &mut out));
        assert!(!mr.resolve(0x10063, 1, &mut out));
        assert!(!mr.resolve(u64::MAX, 2, &mut out));
        assert!(out.is_empty());
        assert!(mr.resolve(0x10064 + 8192, 0, &mut out));
    }

    #[test]
    fn rejects_bad_page_lists() {
        let m = mem();
        assert_eq!(
            Mr::new(&m, 1, 0, 0, 4096, 12, vec![0x1001]),
            Err(PageListError::BadAddress)
        );
        // Page straddling the end of the first region.
        assert_eq!(
            Mr::new(&m, 1, 0, 0, 8192, 13, vec![(1 << 20) - 8192 + 8192]),
            Err(PageListError::BadAddress)
        );
        assert_eq!(
            Mr::new(&m, 1, 0, 0, 4096, 12, vec![0x1000, 0x2000]),
            Err(PageListError::Invalid)
        );
        assert_eq!(
            Mr::new(&m, 1, 0, 0, 0, 12, vec![]),
            Err(PageListError::Invalid)
        );
        assert_eq!(
            Mr::new(&m, 1, 0, u64::MAX, 2, 12, vec![0]),
            Err(PageListError::Invalid)
        );
    }

    #[test]
    fn contiguous_pages_do_not_merge_across_regions() {
        let m =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4096), (GuestAddress(4096), 4096)])
                .unwrap();
        let mr = Mr::new(&m, 1, 0, 0, 8192, 12, vec![0, 4096]).unwrap();
        let mut out = SegList::new();
        assert!(mr.resolve(0, 8192, &mut out));
        assert_eq!(out.len(), 2);
        let dst = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap();
        m.write_slice(&[7u8; 8192], GuestAddress(0)).unwrap();
        let n = copy_between(&m, &out, &dst, &[Seg { gpa: 0, len: 8192 }]);
        assert_eq!(n, 8192);
    }

    #[test]
    fn copies_between_memories_byte_for_byte() {
        let a = mem();
        let b = mem();
        let data: Vec<u8> = (0..10000u32).map(|i| (i * 7 + 3) as u8).collect();
        a.write_slice(&data, GuestAddress(0x5000)).unwrap();
        let src = [
            Seg {
                gpa: 0x5000,
                len: 3000,
            },
            Seg {
                gpa: 0x5000 + 3000,
                len: 7000,
            },
        ];
        let dst = [
            Seg {
                gpa: 0x9000,
                len: 5000,
            },
            Seg {
                gpa: 0x20_0000,
                len: 5000,
            },
        ];
        assert_eq!(copy_between(&a, &src, &b, &dst), 10000);
        let mut out = vec![];
        read_segs(&b, &dst, &mut out);
        assert_eq!(out, data);
    }
}
