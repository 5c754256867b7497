//! Minimal ACPI support for describing virtio-mmio devices to a guest.
//!
//! Linux's `virtio_mmio` driver binds ACPI devices with `_HID "LNRO0005"`; their `_CRS` gives the
//! register window (a `Memory32Fixed` descriptor) and the interrupt (an Extended Interrupt
//! descriptor). Kernels that ignore `virtio_mmio.device=` on the command line (Debian's) find
//! the devices only this way. [`virtio_mmio_device`] produces the AML of one such device, to be
//! placed in a DSDT `\_SB` scope; the small [`aml`] encoder and [`Sdt`] table builder are enough
//! for a VMM to generate the rest of a minimal table set (see `vrdma-vmm`).
//!
//! Encodings follow the ACPI 6.5 specification, sections 5.2 (tables), 6.4 (resource
//! descriptors) and 20 (AML grammar).

/// AML encoding primitives (ACPI 6.5 section 20.2).
pub mod aml {
    /// `ZeroOp`.
    pub const ZERO: u8 = 0x00;
    /// `OneOp`.
    pub const ONE: u8 = 0x01;
    const NAME_OP: u8 = 0x08;
    const BYTE_PREFIX: u8 = 0x0a;
    const WORD_PREFIX: u8 = 0x0b;
    const DWORD_PREFIX: u8 = 0x0c;
    const STRING_PREFIX: u8 = 0x0d;
    const QWORD_PREFIX: u8 = 0x0e;
    const SCOPE_OP: u8 = 0x10;
    const BUFFER_OP: u8 = 0x11;
    const PACKAGE_OP: u8 = 0x12;
    const EXT_OP_PREFIX: u8 = 0x5b;
    const DEVICE_OP: u8 = 0x82;
    const ROOT_CHAR: u8 = b'\\';

    /// Encodes a `PkgLength` for a body of `body_len` bytes. The encoded length counts itself.
    pub fn pkg_length(body_len: usize) -> Vec<u8> {
        // One byte holds up to 63 (6 bits); n extra bytes add 4 + 8n bits.
        for extra in 0..=3usize {
            let total = body_len + 1 + extra;
            let limit = if extra == 0 {
                1 << 6
            } else {
                1 << (4 + 8 * extra)
            };
            if total < limit {
                if extra == 0 {
                    return vec![total as u8];
                }
                let mut out = vec![((extra as u8) << 6) | (total & 0xf) as u8];
                for i in 0..extra {
                    out.push((total >> (4 + 8 * i)) as u8);
                }
                return out;
            }
        }
        panic!("AML package too large: {body_len} bytes");
    }

    /// Wraps `body` with `op` and a `PkgLength`.
    fn with_pkg(op: &[u8], body: &[u8]) -> Vec<u8> {
        let mut out = op.to_vec();
        out.extend(pkg_length(body.len()));
        out.extend_from_slice(body);
        out
    }

    /// A `NameSeg`: 1 to 4 characters, padded with `_`. Panics on characters AML forbids.
    pub fn name_seg(name: &str) -> [u8; 4] {
        let b = name.as_bytes();
        assert!(
            (1..=4).contains(&b.len()),
            "AML NameSeg must have 1..=4 characters: {name:?}"
        );
        let mut seg = [b'_'; 4];
        for (i, &c) in b.iter().enumerate() {
            let ok = c == b'_' || c.is_ascii_uppercase() || (i > 0 && c.is_ascii_digit());
            assert!(ok, "invalid AML NameSeg {name:?}");
            seg[i] = c;
        }
        seg
    }

    /// A `NameString`: an optional leading `\` and one `NameSeg` (`"\\_SB"`, `"_HID"`).
    pub fn name_string(name: &str) -> Vec<u8> {
        match name.strip_prefix('\\') {
            Some(rest) => {
                let mut out = vec![ROOT_CHAR];
                out.extend(name_seg(rest));
                out
            }
            None => name_seg(name).to_vec(),
        }
    }

    /// An integer constant in its shortest encoding.
    pub fn integer(v: u64) -> Vec<u8> {
        match v {
            0 => vec![ZERO],
            1 => vec![ONE],
            2..=0xff => vec![BYTE_PREFIX, v as u8],
            0x100..=0xffff => {
                let mut o = vec![WORD_PREFIX];
                o.extend((v as u16).to_le_bytes());
                o
            }
            0x1_0000..=0xffff_ffff => {
                let mut o = vec![DWORD_PREFIX];
                o.extend((v as u32).to_le_bytes());
                o
            }
            _ => {
                let mut o = vec![QWORD_PREFIX];
                o.extend(v.to_le_bytes());
                o
            }
        }
    }

    /// A string constant (ASCII, without NUL).
    pub fn string(s: &str) -> Vec<u8> {
        assert!(s.is_ascii() && !s.contains('\0'), "AML strings are ASCII");
        let mut o = vec![STRING_PREFIX];
        o.extend_from_slice(s.as_bytes());
        o.push(0);
        o
    }

    /// `Buffer () { bytes }`.
    pub fn buffer(bytes: &[u8]) -> Vec<u8> {
        let mut body = integer(bytes.len() as u64);
        body.extend_from_slice(bytes);
        with_pkg(&[BUFFER_OP], &body)
    }

    /// `Package () { elements }` (each element already encoded).
    pub fn package(elements: &[Vec<u8>]) -> Vec<u8> {
        assert!(elements.len() <= 255, "AML package with too many elements");
        let mut body = vec![elements.len() as u8];
        for e in elements {
            body.extend_from_slice(e);
        }
        with_pkg(&[PACKAGE_OP], &body)
    }

    /// `Name (name, object)`.
    pub fn name(name: &str, object: &[u8]) -> Vec<u8> {
        let mut o = vec![NAME_OP];
        o.extend(name_string(name));
        o.extend_from_slice(object);
        o
    }

    /// `Device (name) { terms }`.
    pub fn device(name: &str, terms: &[Vec<u8>]) -> Vec<u8> {
        let mut body = name_string(name);
        for t in terms {
            body.extend_from_slice(t);
        }
        with_pkg(&[EXT_OP_PREFIX, DEVICE_OP], &body)
    }

    /// `Scope (name) { terms }`.
    pub fn scope(name: &str, terms: &[Vec<u8>]) -> Vec<u8> {
        let mut body = name_string(name);
        for t in terms {
            body.extend_from_slice(t);
        }
        with_pkg(&[SCOPE_OP], &body)
    }
}

/// Resource descriptors for `_CRS` (ACPI 6.5 section 6.4).
pub mod resource {
    /// `Memory32Fixed (ReadWrite, base, len)`: large item 0x06.
    pub fn memory32_fixed(base: u32, len: u32, writable: bool) -> Vec<u8> {
        let mut o = vec![0x86, 9, 0, u8::from(writable)];
        o.extend(base.to_le_bytes());
        o.extend(len.to_le_bytes());
        o
    }

    /// `IO (Decode16, base, base, 1, len)`: small item 0x08, a fixed range of I/O ports.
    pub fn io_port(base: u16, len: u8) -> Vec<u8> {
        let b = base.to_le_bytes();
        vec![0x47, 0x01, b[0], b[1], b[0], b[1], 1, len]
    }

    /// Trigger mode of an interrupt.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Trigger {
        /// Level-triggered.
        Level,
        /// Edge-triggered.
        Edge,
    }

    /// `Interrupt (ResourceConsumer, trigger, ActiveHigh, Exclusive) { gsi }`: large item 0x09.
    pub fn interrupt(gsi: u32, trigger: Trigger) -> Vec<u8> {
        // Flags: bit 0 consumer, bit 1 edge, bit 2 active-low, bit 3 shared.
        let flags = 0x01 | if trigger == Trigger::Edge { 0x02 } else { 0 };
        let mut o = vec![0x89, 6, 0, flags, 1];
        o.extend(gsi.to_le_bytes());
        o
    }

    /// A `ResourceTemplate` buffer: the descriptors plus an End Tag (checksum 0 = "valid").
    pub fn template(descriptors: &[Vec<u8>]) -> Vec<u8> {
        let mut bytes: Vec<u8> = descriptors.concat();
        bytes.extend([0x79, 0]);
        super::aml::buffer(&bytes)
    }
}

/// The `_HID` Linux's `virtio_mmio` driver matches.
pub const VIRTIO_MMIO_HID: &str = "LNRO0005";

/// AML for one virtio-mmio device: `Device (Vnnn) { _HID "LNRO0005", _UID uid, _CRS { the
/// window; the interrupt, level-triggered, active high } }`. `uid` must be below 4096 and unique
/// among the VMM's virtio-mmio devices. Place the result inside `Scope (\_SB)`.
pub fn virtio_mmio_device(uid: u32, base: u64, len: u64, gsi: u32) -> Vec<u8> {
    assert!(uid < 0x1000, "uid must be below 4096");
    let base = u32::try_from(base).expect("virtio-mmio window must lie below 4 GiB");
    let len = u32::try_from(len).expect("virtio-mmio window length");
    aml::device(
        &format!("V{uid:03X}"),
        &[
            aml::name("_HID", &aml::string(VIRTIO_MMIO_HID)),
            aml::name("_UID", &aml::integer(uid.into())),
            aml::name(
                "_CRS",
                &resource::template(&[
                    resource::memory32_fixed(base, len, true),
                    resource::interrupt(gsi, resource::Trigger::Level),
                ]),
            ),
        ],
    )
}

/// A system description table: the 36-byte header plus a body; [`Sdt::finish`] fills in the
/// length and checksum.
#[derive(Clone, Debug)]
pub struct Sdt {
    bytes: Vec<u8>,
}

/// OEM ID written into every table.
pub const OEM_ID: [u8; 6] = *b"VRDMA ";

impl Sdt {
    /// Length of the header.
    pub const HEADER_LEN: usize = 36;

    /// A table with `signature` and `revision`, and an empty body.
    pub fn new(signature: [u8; 4], revision: u8) -> Self {
        let mut bytes = Vec::with_capacity(256);
        bytes.extend(signature);
        bytes.extend([0; 4]); // length
        bytes.push(revision);
        bytes.push(0); // checksum
        bytes.extend(OEM_ID);
        let mut table_id = *b"VRDMA   ";
        table_id[6..].copy_from_slice(&signature[..2]);
        bytes.extend(table_id);
        bytes.extend(1u32.to_le_bytes()); // OEM revision
        bytes.extend(*b"VRDM"); // creator ID
        bytes.extend(1u32.to_le_bytes()); // creator revision
        Self { bytes }
    }

    /// Appends bytes to the body.
    pub fn append(&mut self, data: &[u8]) -> &mut Self {
        self.bytes.extend_from_slice(data);
        self
    }

    /// Current length of the table (header included).
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the body is empty.
    pub fn is_empty(&self) -> bool {
        self.bytes.len() == Self::HEADER_LEN
    }

    /// Overwrites bytes at `offset` (header included) — for fields of fixed-layout tables.
    pub fn write_at(&mut self, offset: usize, data: &[u8]) -> &mut Self {
        if self.bytes.len() < offset + data.len() {
            self.bytes.resize(offset + data.len(), 0);
        }
        self.bytes[offset..offset + data.len()].copy_from_slice(data);
        self
    }

    /// The finished table: length and checksum filled in.
    pub fn finish(mut self) -> Vec<u8> {
        let len = self.bytes.len() as u32;
        self.bytes[4..8].copy_from_slice(&len.to_le_bytes());
        self.bytes[9] = 0;
        self.bytes[9] = checksum(&self.bytes);
        self.bytes
    }
}

/// The byte that makes `data` sum to zero (mod 256).
pub fn checksum(data: &[u8]) -> u8 {
    0u8.wrapping_sub(data.iter().fold(0u8, |a, &b| a.wrapping_add(b)))
}

/// An ACPI 2.0+ RSDP pointing at an XSDT (36 bytes, both checksums set).
pub fn rsdp(xsdt_addr: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(36);
    r.extend(*b"RSD PTR ");
    r.push(0); // checksum of the first 20 bytes
    r.extend(OEM_ID);
    r.push(2); // revision: ACPI 2.0+
    r.extend(0u32.to_le_bytes()); // RSDT address: none
    r.extend(36u32.to_le_bytes());
    r.extend(xsdt_addr.to_le_bytes());
    r.push(0); // extended checksum
    r.extend([0; 3]);
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
    }

    /// Decodes a PkgLength; returns (value, bytes used).
    fn decode_pkg_length(b: &[u8]) -> (usize, usize) {
        let n = (b[0] >> 6) as usize;
        if n == 0 {
            return ((b[0] & 0x3f) as usize, 1);
        }
        let mut v = (b[0] & 0xf) as usize;
        for i in 0..n {
            v |= (b[1 + i] as usize) << (4 + 8 * i);
        }
        (v, n + 1)
    }

    #[test]
    fn pkg_length_round_trips() {
        for body in [
            0usize,
            1,
            61,
            62,
            63,
            64,
            100,
            4000,
            4093,
            4094,
            4095,
            70_000,
            1 << 20,
        ] {
            let enc = aml::pkg_length(body);
            let (v, used) = decode_pkg_length(&enc);
            assert_eq!(used, enc.len(), "body {body}");
            assert_eq!(v, body + used, "body {body}");
        }
        assert_eq!(aml::pkg_length(10), vec![11]);
        // 0x3f + 1 needs two bytes: 0x40 | low nibble, then the rest.
        assert_eq!(aml::pkg_length(63), vec![0x41, 0x04]);
    }

    #[test]
    fn integers_use_the_shortest_encoding() {
        assert_eq!(aml::integer(0), vec![0x00]);
        assert_eq!(aml::integer(1), vec![0x01]);
        assert_eq!(aml::integer(5), vec![0x0a, 5]);
        assert_eq!(aml::integer(0x1234), vec![0x0b, 0x34, 0x12]);
        assert_eq!(aml::integer(0xd000_0000), vec![0x0c, 0, 0, 0, 0xd0]);
        assert_eq!(aml::integer(1 << 40)[0], 0x0e);
    }

    #[test]
    fn names() {
        assert_eq!(aml::name_string("\\_SB"), b"\\_SB_".to_vec());
        assert_eq!(aml::name_string("_HID"), b"_HID".to_vec());
        assert_eq!(aml::name_seg("V01"), *b"V01_");
    }

    #[test]
    #[should_panic]
    fn bad_name_panics() {
        aml::name_seg("1ABC");
    }

    #[test]
    fn virtio_device_encoding() {
        let d = virtio_mmio_device(1, 0xd000_1000, 0x1000, 17);
        // ExtOpPrefix DeviceOp PkgLength "V001".
        assert_eq!(&d[..2], &[0x5b, 0x82]);
        let (len, used) = decode_pkg_length(&d[2..]);
        assert_eq!(len, d.len() - 2);
        assert_eq!(&d[2 + used..2 + used + 4], b"V001");
        let body = &d[2 + used + 4..];
        // Name(_HID, "LNRO0005").
        let hid = [&[0x08u8][..], b"_HID", &[0x0d], b"LNRO0005", &[0]].concat();
        assert!(body.starts_with(&hid));
        // Name(_UID, One).
        let uid = [&[0x08u8][..], b"_UID", &[0x01]].concat();
        assert_eq!(&body[hid.len()..hid.len() + uid.len()], &uid[..]);
        // _CRS: Memory32Fixed, Interrupt (level, active high, exclusive, consumer), EndTag.
        let crs = &body[hid.len() + uid.len()..];
        assert_eq!(&crs[..5], &[0x08, b'_', b'C', b'R', b'S']);
        let mem = [0x86, 9, 0, 1, 0x00, 0x10, 0x00, 0xd0, 0x00, 0x10, 0, 0];
        let irq = [0x89, 6, 0, 0x01, 1, 17, 0, 0, 0];
        let rt = [&mem[..], &irq[..], &[0x79, 0][..]].concat();
        // BufferOp PkgLength BufferSize(byte) bytes.
        assert_eq!(crs[5], 0x11);
        assert_eq!(&crs[7..9], &[0x0a, rt.len() as u8]);
        assert_eq!(&crs[9..], &rt[..]);
    }

    #[test]
    fn io_port_descriptor() {
        assert_eq!(
            resource::io_port(0x3f8, 8),
            vec![0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08]
        );
        assert_eq!(resource::interrupt(4, resource::Trigger::Edge)[3], 0x03);
    }

    #[test]
    fn tables_checksum_to_zero() {
        let mut t = Sdt::new(*b"DSDT", 2);
        t.append(&aml::scope(
            "\\_SB",
            &[virtio_mmio_device(0, 0xd000_0000, 0x1000, 16)],
        ));
        let t = t.finish();
        assert_eq!(&t[..4], b"DSDT");
        assert_eq!(
            u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize,
            t.len()
        );
        assert_eq!(sum(&t), 0);

        let r = rsdp(0xe0040);
        assert_eq!(r.len(), 36);
        assert_eq!(sum(&r[..20]), 0);
        assert_eq!(sum(&r), 0);
        assert_eq!(u64::from_le_bytes(r[24..32].try_into().unwrap()), 0xe0040);
    }

    #[test]
    fn package_and_scope() {
        let p = aml::package(&[aml::integer(5)]);
        assert_eq!(p, vec![0x12, 4, 1, 0x0a, 5]);
        let s = aml::scope("\\_SB", &[]);
        assert_eq!(s, vec![0x10, 6, b'\\', b'_', b'S', b'B', b'_']);
    }
}
