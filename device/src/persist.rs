//! Live migration: the migration state machine's states, and save/restore of the device state
//! as a versioned, self-describing blob.
//!
//! # Blob format (version 1)
//!
//! ```text
//! offset  size  field
//! 0       8     magic "VRDMAMIG" ("VRDMAPRE" for a pre-copy blob)
//! 8       4     format version (u32 LE) = 1
//! 12      4     section count (u32 LE)
//! 16      8     body length in bytes (u64 LE)
//! 24      4     CRC-32 (IEEE) of the body (u32 LE)
//! 28      4     reserved, 0
//! 32      ...   body: `section count` sections
//! ```
//!
//! Each section is `name_len: u16 LE, name (UTF-8), version: u32 LE, len: u32 LE, data`, where
//! `data` is the section's postcard encoding. A device blob has the sections `config` (limits
//! and GID, v1), `virtio` (accepted features, the queues' state, v1), `core` (every resource
//! table but the MRs with its handles, ring indices, CQ arming, pending events, moderation, v2;
//! v1 also held the MR table and is still read), `backend` (the soft transport's per-QP PSNs,
//! operations in flight and responder state, v1) and `mrs` (the MR table, v1: complete, or only
//! what changed since a pre-copy). A pre-copy blob ([`Vrdma::save_precopy`]) has `config`,
//! `precopy` (its id) and `mrs` (complete). Every section is required; an unknown section, a
//! section version this build does not read, trailing bytes or a bad checksum refuse the blob.
//! `docs/migration.md` gives the versioning rules.
//!
//! Restoring treats the blob like guest input: every handle, count, index, page and segment is
//! validated again (the same checks the control path applies), reference counts and page
//! totals are recomputed rather than trusted, and any inconsistency is a [`MigrationError`].
//!
//! [`Vrdma::save_precopy`]: crate::Vrdma::save_precopy

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use thiserror::Error;
use virtio_queue::{Queue, QueueState, QueueT};
use vrdma_abi as abi;

use crate::device::DeviceConfig;
use crate::interrupt::Interrupt;
use crate::mr::{self, Mr};
use crate::ring::Ring;
use crate::soft::engine::{BackendSnapshot, QpLimits, SoftBackend};
use crate::soft::Port;
use crate::state::{Ah, Core, Cq, Moderation, Pd, Qp, State};
use crate::tables::{HandleTable, TableSnapshot, TableVersion};
use crate::GuestMemoryMmap;

/// Magic bytes at the start of every state blob.
pub const MAGIC: [u8; 8] = *b"VRDMAMIG";
/// Magic bytes at the start of every pre-copy blob ([`crate::Vrdma::save_precopy`]).
pub const PRECOPY_MAGIC: [u8; 8] = *b"VRDMAPRE";
/// The blob format version this build writes (and the only one it reads).
pub const FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = 32;

/// Where a device is in the migration state machine (modelled on VFIO migration v2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MigrationState {
    /// Normal operation.
    Running,
    /// Stop initiating: no new WQEs are fetched from send queues; everything already accepted
    /// keeps going (inbound requests, responses, completions, interrupts).
    Quiescing,
    /// Nothing happens: no guest-memory writes, no interrupts, no packets handled. Inbound
    /// packets are held by the fabric. The state can be saved.
    Stopped,
    /// A restored instance took this device's place on the fabric; it can only be dropped.
    MigratedAway,
}

/// Errors of the migration API. None of them changes the device on which the call was made.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum MigrationError {
    /// The call is not allowed in the device's current migration state.
    #[error("{op} is not allowed while the device is {state:?}")]
    WrongState {
        /// The refused operation.
        op: &'static str,
        /// The device's state.
        state: MigrationState,
    },
    /// The blob ends early.
    #[error("state blob truncated ({0})")]
    Truncated(&'static str),
    /// The blob does not start with [`MAGIC`].
    #[error("not a vrdma state blob (bad magic)")]
    BadMagic,
    /// The blob's format version is not one this build reads.
    #[error("unsupported state format version {0} (this build reads version {FORMAT_VERSION})")]
    UnsupportedVersion(u32),
    /// The body does not match its checksum.
    #[error("state blob checksum mismatch (corrupted)")]
    Checksum,
    /// A section is missing, unknown, duplicated, of an unknown version, or does not decode.
    #[error("section {section}: {reason}")]
    Section {
        /// Section name.
        section: String,
        /// What is wrong.
        reason: String,
    },
    /// The decoded state is inconsistent (handles out of range, rings outside guest memory,
    /// tables that disagree).
    #[error("inconsistent device state: {0}")]
    Invalid(String),
    /// The fabric refused the step (e.g. the device's GID is already taken).
    #[error("fabric: {0}")]
    Fabric(String),
    /// The blob was saved after a pre-copy, and the pre-copy state given to restore is missing
    /// or is not that pre-copy (another id, device configuration or memory layout).
    #[error("pre-copy state: {0}")]
    Precopy(String),
}

impl MigrationState {
    /// Whether the device handles notifications, packets and timers in this state.
    pub(crate) fn processes_guest_work(self) -> bool {
        matches!(self, MigrationState::Running | MigrationState::Quiescing)
    }
}

fn invalid(what: impl Into<String>) -> MigrationError {
    MigrationError::Invalid(what.into())
}

// ---------------------------------------------------------------------------------------------
// Sections
// ---------------------------------------------------------------------------------------------

/// Serde mirror of virtio-queue's [`QueueState`] (which has no serde support), shared with
/// transports that save their queue configuration. Untrusted: convert it back with
/// `Queue::try_from(QueueState::from(..))`, which validates it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Maximum size offered by the device.
    pub max_size: u16,
    /// Next available-ring index the device reads.
    pub next_avail: u16,
    /// Next used-ring index the device writes.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX negotiated.
    pub event_idx_enabled: bool,
    /// Size the driver chose.
    pub size: u16,
    /// Queue ready.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnapshot {
    fn from(s: QueueState) -> Self {
        Self {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(s: QueueSnapshot) -> Self {
        QueueState {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct VirtioSection {
    acked_features: u64,
    /// The queues, if the device was active.
    queues: Option<Vec<QueueSnapshot>>,
}

// The saved structures come in pairs: an owned one that restore decodes (`…Snapshot`) and a
// borrowed one that save encodes straight from the live state without copying it (`…Out`).
// Both MUST list the same fields, of the same types, in the same order: they are one encoding.

#[derive(Clone, Debug, Deserialize)]
struct RingSnapshot {
    pages: Vec<u64>,
    depth: u32,
    stride: u32,
}

#[derive(Serialize)]
struct RingOut<'a> {
    pages: &'a [u64],
    depth: u32,
    stride: u32,
}

impl<'a> From<&'a Ring> for RingOut<'a> {
    fn from(r: &'a Ring) -> Self {
        Self {
            pages: &r.pages,
            depth: r.depth,
            stride: r.stride,
        }
    }
}

#[derive(Debug, Deserialize)]
struct MrSnapshot {
    pd: u32,
    access: u32,
    iova: u64,
    length: u64,
    page_shift: u32,
    pages: Vec<u64>,
}

#[derive(Serialize)]
struct MrOut<'a> {
    pd: u32,
    access: u32,
    iova: u64,
    length: u64,
    page_shift: u32,
    pages: &'a [u64],
}

fn mr_out(m: &Mr) -> MrOut<'_> {
    MrOut {
        pd: m.pd,
        access: m.access,
        iova: m.iova,
        length: m.length,
        page_shift: m.page_shift,
        pages: &m.pages,
    }
}

#[derive(Debug, Deserialize)]
struct CqSnapshot {
    ring: RingSnapshot,
    prod: u32,
    armed: u32,
    arm_seq: Option<u32>,
    sol_pos: Option<u32>,
    overflow: bool,
}

#[derive(Serialize)]
struct CqOut<'a> {
    ring: RingOut<'a>,
    prod: u32,
    armed: u32,
    arm_seq: Option<u32>,
    sol_pos: Option<u32>,
    overflow: bool,
}

#[derive(Debug, Deserialize)]
struct QpSnapshot {
    qp_type: u8,
    pd: u32,
    send_cq: u32,
    recv_cq: u32,
    sq_sig_all: bool,
    sq: RingSnapshot,
    rq: RingSnapshot,
    max_send_sge: u32,
    max_recv_sge: u32,
    max_inline: u32,
    attr: abi::QpAttr,
    sq_cons: u32,
    rq_cons: u32,
}

#[derive(Serialize)]
struct QpOut<'a> {
    qp_type: u8,
    pd: u32,
    send_cq: u32,
    recv_cq: u32,
    sq_sig_all: bool,
    sq: RingOut<'a>,
    rq: RingOut<'a>,
    max_send_sge: u32,
    max_recv_sge: u32,
    max_inline: u32,
    attr: abi::QpAttr,
    sq_cons: u32,
    rq_cons: u32,
}

/// The `core` section, version 2 (the MR table moved to its own section, `mrs`).
#[derive(Debug, Deserialize)]
struct CoreSection {
    db_gpa: Option<u64>,
    pds: TableSnapshot<()>,
    cqs: TableSnapshot<CqSnapshot>,
    qps: TableSnapshot<QpSnapshot>,
    ahs: TableSnapshot<(u32, abi::AhAttr)>,
    events: Vec<abi::Event>,
    events_dropped: u64,
    draining: Vec<u32>,
    moderation_max_events: u32,
    moderation_usec: u32,
    moderation_pending: u32,
}

#[derive(Serialize)]
struct CoreOut<'a, P, C, Q, A> {
    db_gpa: Option<u64>,
    pds: P,
    cqs: C,
    qps: Q,
    ahs: A,
    events: &'a std::collections::VecDeque<abi::Event>,
    events_dropped: u64,
    draining: &'a [u32],
    moderation_max_events: u32,
    moderation_usec: u32,
    moderation_pending: u32,
}

/// The `core` section, version 1 (format version 1 as first released): read, converted to
/// version 2 plus a complete `mrs` section.
#[derive(Debug, Deserialize)]
struct CoreSectionV1 {
    db_gpa: Option<u64>,
    pds: TableSnapshot<()>,
    mrs: TableSnapshot<MrSnapshot>,
    cqs: TableSnapshot<CqSnapshot>,
    qps: TableSnapshot<QpSnapshot>,
    ahs: TableSnapshot<(u32, abi::AhAttr)>,
    events: Vec<abi::Event>,
    events_dropped: u64,
    draining: Vec<u32>,
    moderation_max_events: u32,
    moderation_usec: u32,
    moderation_pending: u32,
}

impl CoreSectionV1 {
    fn upgrade(self) -> (CoreSection, MrsSection) {
        let core = CoreSection {
            db_gpa: self.db_gpa,
            pds: self.pds,
            cqs: self.cqs,
            qps: self.qps,
            ahs: self.ahs,
            events: self.events,
            events_dropped: self.events_dropped,
            draining: self.draining,
            moderation_max_events: self.moderation_max_events,
            moderation_usec: self.moderation_usec,
            moderation_pending: self.moderation_pending,
        };
        (core, MrsSection::Full(self.mrs))
    }
}

/// The `mrs` section (version 1).
#[derive(Debug, Deserialize)]
enum MrsSection {
    /// Every MR.
    Full(TableSnapshot<MrSnapshot>),
    /// Relative to the pre-copy `precopy`: the table's keys and free list are complete, `mrs`
    /// holds the MRs whose slot changed after the pre-copy was taken; every other MR is the
    /// pre-copy's.
    Delta {
        precopy: u64,
        mrs: TableSnapshot<MrSnapshot>,
    },
}

#[derive(Serialize)]
enum MrsOut<V> {
    Full(V),
    Delta { precopy: u64, mrs: V },
}

/// What the source remembers of its last pre-copy: the id the destination knows it by and the
/// MR table's version when it was taken.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PrecopyBase {
    id: u64,
    mrs: TableVersion,
}

/// A random pre-copy id (std's randomly keyed hasher; no id repeats in practice).
fn random_id() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

// ---------------------------------------------------------------------------------------------
// Framing
// ---------------------------------------------------------------------------------------------

/// Sections of a device blob with the versions this build reads (the first one is written).
const SECTIONS: &[(&str, &[u32])] = &[
    ("config", &[1]),
    ("virtio", &[1]),
    ("core", &[2, 1]),
    ("backend", &[1]),
    ("mrs", &[1]),
];
/// Sections of a pre-copy blob.
const PRECOPY_SECTIONS: &[(&str, &[u32])] = &[("config", &[1]), ("precopy", &[1]), ("mrs", &[1])];

/// Writes a blob: header, then sections encoded straight into the output buffer.
struct BlobWriter {
    out: Vec<u8>,
    count: u32,
}

impl BlobWriter {
    fn new(magic: [u8; 8], capacity: usize) -> Self {
        let mut out = Vec::with_capacity(HEADER_LEN + capacity);
        out.extend_from_slice(&magic);
        out.resize(HEADER_LEN, 0);
        Self { out, count: 0 }
    }

    fn section<T: Serialize>(&mut self, name: &str, version: u32, value: &T) {
        let out = &mut self.out;
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&version.to_le_bytes());
        let len_at = out.len();
        out.extend_from_slice(&[0; 4]);
        let start = out.len();
        self.out = postcard::to_extend(value, std::mem::take(&mut self.out))
            .expect("serializing plain data into memory");
        let len = (self.out.len() - start) as u32;
        self.out[len_at..len_at + 4].copy_from_slice(&len.to_le_bytes());
        self.count += 1;
    }

    fn finish(mut self) -> Vec<u8> {
        let body_len = (self.out.len() - HEADER_LEN) as u64;
        let crc = crc32fast::hash(&self.out[HEADER_LEN..]);
        let h = &mut self.out[8..HEADER_LEN];
        h[0..4].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        h[4..8].copy_from_slice(&self.count.to_le_bytes());
        h[8..16].copy_from_slice(&body_len.to_le_bytes());
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        self.out
    }
}

/// One section of a checked blob.
struct Section<'a> {
    name: String,
    version: u32,
    data: &'a [u8],
}

/// Splits a blob into its sections, checking magic, version, length, checksum, and that each
/// section is one of `known`, of a version listed there, and present once.
fn unframe<'a>(
    blob: &'a [u8],
    magic: [u8; 8],
    known: &[(&str, &[u32])],
) -> Result<Vec<Section<'a>>, MigrationError> {
    if blob.len() < HEADER_LEN {
        return Err(MigrationError::Truncated("header"));
    }
    if blob[0..8] != magic {
        return Err(MigrationError::BadMagic);
    }
    let u32_at = |o: usize| u32::from_le_bytes(blob[o..o + 4].try_into().expect("4 bytes"));
    let version = u32_at(8);
    if version != FORMAT_VERSION {
        return Err(MigrationError::UnsupportedVersion(version));
    }
    let count = u32_at(12) as usize;
    let body_len = u64::from_le_bytes(blob[16..24].try_into().expect("8 bytes"));
    let body = &blob[HEADER_LEN..];
    if (body.len() as u64) < body_len {
        return Err(MigrationError::Truncated("body"));
    }
    if body.len() as u64 != body_len {
        return Err(invalid("trailing bytes after the body"));
    }
    if crc32fast::hash(body) != u32_at(24) {
        return Err(MigrationError::Checksum);
    }
    let mut out: Vec<Section<'a>> = Vec::new();
    let mut rest = body;
    let mut take = |n: usize, what: &'static str| -> Result<&'a [u8], MigrationError> {
        if rest.len() < n {
            return Err(MigrationError::Truncated(what));
        }
        let (a, b) = rest.split_at(n);
        rest = b;
        Ok(a)
    };
    for _ in 0..count.min(known.len() + 1) {
        let nl = u16::from_le_bytes(take(2, "section name")?.try_into().expect("2")) as usize;
        let name = String::from_utf8(take(nl, "section name")?.to_vec())
            .map_err(|_| invalid("section name is not UTF-8"))?;
        let sv = u32::from_le_bytes(take(4, "section version")?.try_into().expect("4"));
        let len = u32::from_le_bytes(take(4, "section length")?.try_into().expect("4")) as usize;
        let data = take(len, "section data")?;
        let section_err = |reason: String| MigrationError::Section {
            section: name.clone(),
            reason,
        };
        let Some((_, versions)) = known.iter().find(|(n, _)| *n == name) else {
            return Err(section_err("unknown section".into()));
        };
        if !versions.contains(&sv) {
            return Err(section_err(format!("unsupported section version {sv}")));
        }
        if out.iter().any(|s| s.name == name) {
            return Err(section_err("duplicated".into()));
        }
        out.push(Section {
            name,
            version: sv,
            data,
        });
    }
    if out.len() != count || !rest.is_empty() {
        return Err(invalid("section count does not match the body"));
    }
    Ok(out)
}

fn find<'s, 'a>(
    sections: &'s [Section<'a>],
    name: &'static str,
) -> Result<&'s Section<'a>, MigrationError> {
    sections
        .iter()
        .find(|s| s.name == name)
        .ok_or(MigrationError::Section {
            section: name.into(),
            reason: "missing".into(),
        })
}

fn decode<T: DeserializeOwned>(
    sections: &[Section<'_>],
    name: &'static str,
) -> Result<T, MigrationError> {
    decode_data(find(sections, name)?.data, name)
}

fn decode_data<T: DeserializeOwned>(data: &[u8], name: &'static str) -> Result<T, MigrationError> {
    let (v, rest) = postcard::take_from_bytes(data).map_err(|e| MigrationError::Section {
        section: name.into(),
        reason: e.to_string(),
    })?;
    if !rest.is_empty() {
        return Err(MigrationError::Section {
            section: name.into(),
            reason: "trailing bytes".into(),
        });
    }
    Ok(v)
}

// ---------------------------------------------------------------------------------------------
// Save
// ---------------------------------------------------------------------------------------------

impl State {
    /// Saves the device state. The device must be stopped (checked by the caller). After a
    /// pre-copy ([`State::save_precopy`]) of this very MR table, the `mrs` section holds only
    /// what changed since; otherwise (no pre-copy, or the table was rebuilt by a reset) it is
    /// complete.
    pub(crate) fn save(&self) -> Vec<u8> {
        let c = &self.core;
        let virtio = VirtioSection {
            acked_features: self.acked_features,
            queues: self
                .active
                .as_ref()
                .map(|a| a.queues.iter().map(|q| q.state().into()).collect()),
        };
        let core = CoreOut {
            db_gpa: c.db_gpa,
            pds: c.pds.serialize_since(None, |_| ()),
            cqs: c.cqs.serialize_since(None, |q| CqOut {
                ring: (&q.ring).into(),
                prod: q.prod,
                armed: q.armed,
                arm_seq: q.arm_seq,
                sol_pos: q.sol_pos,
                overflow: q.overflow,
            }),
            qps: c.qps.serialize_since(None, |q| QpOut {
                qp_type: q.qp_type,
                pd: q.pd,
                send_cq: q.send_cq,
                recv_cq: q.recv_cq,
                sq_sig_all: q.sq_sig_all,
                sq: (&q.sq).into(),
                rq: (&q.rq).into(),
                max_send_sge: q.max_send_sge,
                max_recv_sge: q.max_recv_sge,
                max_inline: q.max_inline,
                attr: q.attr,
                sq_cons: (*q.sq_cons),
                rq_cons: q.rq_cons,
            }),
            ahs: c.ahs.serialize_since(None, |a| (a.pd, a.attr)),
            events: &c.events,
            events_dropped: c.events_dropped,
            draining: &c.draining,
            moderation_max_events: c.moderation.max_events,
            moderation_usec: c.moderation.usec,
            moderation_pending: c.moderation.pending,
        };
        let backend = self.backend.save();
        // Rough size: a few hundred bytes per QP and CQ; the MR table's share depends on the
        // pre-copy.
        let estimate = 4096 + 256 * (c.qps.len() + c.cqs.len()) as usize;
        let mut w = BlobWriter::new(MAGIC, estimate);
        w.section("config", 1, &c.cfg);
        w.section("virtio", 1, &virtio);
        w.section("core", 2, &core);
        w.section("backend", 1, &backend);
        match self.precopy.filter(|p| c.mrs.descends_from(p.mrs)) {
            Some(p) => w.section(
                "mrs",
                1,
                &MrsOut::Delta {
                    precopy: p.id,
                    mrs: c.mrs.serialize_since(Some(p.mrs), mr_out),
                },
            ),
            None => w.section("mrs", 1, &MrsOut::Full(c.mrs.serialize_since(None, mr_out))),
        }
        w.finish()
    }

    /// Saves the rarely changing part of the state (the MR table) while the device runs, and
    /// remembers it: the next [`State::save`] then carries only the MRs changed since.
    pub(crate) fn save_precopy(&mut self) -> Vec<u8> {
        let c = &self.core;
        let id = random_id();
        let estimate = 1024 + 48 * c.mrs.len() as usize;
        let mut w = BlobWriter::new(PRECOPY_MAGIC, estimate);
        w.section("config", 1, &c.cfg);
        w.section("precopy", 1, &id);
        w.section("mrs", 1, &MrsOut::Full(c.mrs.serialize_since(None, mr_out)));
        self.precopy = Some(PrecopyBase {
            id,
            mrs: c.mrs.version(),
        });
        w.finish()
    }
}

// ---------------------------------------------------------------------------------------------
// Restore
// ---------------------------------------------------------------------------------------------

/// A blob whose framing (magic, version, length, checksum, section list) was checked.
pub(crate) struct Blob<'a> {
    sections: Vec<Section<'a>>,
    /// The saved configuration: the destination device is built with the same identity and
    /// limits.
    pub cfg: DeviceConfig,
}

/// Checks a blob's framing and decodes its configuration; the rest is decoded and validated by
/// [`State::restore`].
pub(crate) fn parse(blob: &[u8]) -> Result<Blob<'_>, MigrationError> {
    let sections = unframe(blob, MAGIC, SECTIONS)?;
    let cfg = decode(&sections, "config")?;
    Ok(Blob { sections, cfg })
}

/// Decodes the `core` section and the MR table: `core` version 2 with the `mrs` section, or
/// `core` version 1 (which holds the MR table; an `mrs` section is then refused).
fn decode_core(sections: &[Section<'_>]) -> Result<(CoreSection, MrsSection), MigrationError> {
    let core = find(sections, "core")?;
    if core.version == 1 {
        if sections.iter().any(|s| s.name == "mrs") {
            return Err(MigrationError::Section {
                section: "mrs".into(),
                reason: "next to a version 1 core section, which holds the MRs".into(),
            });
        }
        let v1: CoreSectionV1 = decode_data(core.data, "core")?;
        return Ok(v1.upgrade());
    }
    Ok((decode_data(core.data, "core")?, decode(sections, "mrs")?))
}

/// The regions of a guest memory: what MR validation depends on.
fn layout_of(mem: &GuestMemoryMmap) -> Vec<(u64, u64)> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    mem.iter().map(|r| (r.start_addr().0, r.len())).collect()
}

/// Validates a saved MR against the device limits and guest memory and builds it. Its PD is
/// checked separately (a pre-copied MR is built before the PD table is known).
fn mr_from(mem: &GuestMemoryMmap, cfg: &DeviceConfig, m: MrSnapshot) -> Result<Mr, String> {
    if m.access & !abi::ACCESS_ALL != 0
        || m.length > cfg.max_mr_size
        || m.pages.len() as u64 > cfg.max_mr_pages as u64
    {
        return Err("MR attributes out of range".into());
    }
    Mr::new(mem, m.pd, m.access, m.iova, m.length, m.page_shift, m.pages)
        .map_err(|e| format!("MR pages: {e:?}"))
}

/// The destination's side of a pre-copy: the pre-copy blob ([`crate::Vrdma::save_precopy`])
/// decoded and validated against the destination's guest memory while the source still runs,
/// so that the restore during the downtime only applies what changed since
/// ([`crate::Vrdma::restore_with_precopy`]).
pub struct PrecopyState {
    id: u64,
    cfg: DeviceConfig,
    layout: Vec<(u64, u64)>,
    mrs: HandleTable<Mr>,
}

impl std::fmt::Debug for PrecopyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrecopyState")
            .field("id", &self.id)
            .field("mrs", &self.mrs.len())
            .finish()
    }
}

impl PrecopyState {
    /// Loads a pre-copy blob for a destination whose guest memory has `mem`'s layout (its
    /// contents do not matter yet). The blob is untrusted: framing, configuration and every MR
    /// (attributes within the limits, pages inside guest memory, page budget) are checked as
    /// on a full restore; a bad blob is an error.
    pub fn load(mem: &GuestMemoryMmap, blob: &[u8]) -> Result<Self, MigrationError> {
        let sections = unframe(blob, PRECOPY_MAGIC, PRECOPY_SECTIONS)?;
        let cfg: DeviceConfig = decode(&sections, "config")?;
        cfg.validate().map_err(|e| invalid(e.to_string()))?;
        let id: u64 = decode(&sections, "precopy")?;
        let MrsSection::Full(snap) = decode(&sections, "mrs")? else {
            return Err(invalid("a pre-copy holds the complete MR table"));
        };
        let mut pages = 0u64;
        let mrs = HandleTable::from_snapshot(cfg.max_mr, snap, |_, m| {
            pages += m.pages.len() as u64;
            mr_from(mem, &cfg, m)
        })
        .map_err(|e| invalid(format!("MR table: {e}")))?;
        if pages > cfg.max_total_mr_pages {
            return Err(invalid("page budgets exceeded"));
        }
        Ok(Self {
            id,
            cfg,
            layout: layout_of(mem),
            mrs,
        })
    }

    /// The pre-copy's id (the blob saved at the stop names the pre-copy it builds on).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Whether a blob saved after pre-copy `id` of a device with `cfg` may build on this one,
    /// restored over `mem`.
    fn check(
        &self,
        id: u64,
        cfg: &DeviceConfig,
        mem: &GuestMemoryMmap,
    ) -> Result<(), MigrationError> {
        let e = |what: &str| Err(MigrationError::Precopy(what.into()));
        if id != self.id {
            return e("the blob builds on another pre-copy");
        }
        if *cfg != self.cfg {
            return e("the device configuration differs from the pre-copy's");
        }
        if layout_of(mem) != self.layout {
            return e("guest memory layout differs from the one the pre-copy was loaded for");
        }
        Ok(())
    }
}

fn ring_from(
    mem: &GuestMemoryMmap,
    s: RingSnapshot,
    max_depth: u32,
    max_pages: u32,
    what: &str,
) -> Result<Ring, String> {
    Ring::new(mem, s.pages, s.depth, s.stride, max_depth, max_pages)
        .map_err(|e| format!("{what}: {e:?}"))
}

impl State {
    /// Rebuilds a device state from a parsed blob over `mem`. `port` is the new device's
    /// fabric port.
    pub(crate) fn restore(
        blob: &Blob<'_>,
        port: Arc<Port>,
        mem: Arc<GuestMemoryMmap>,
        irq: Arc<dyn Interrupt>,
        precopy: Option<PrecopyState>,
    ) -> Result<State, MigrationError> {
        let (sections, cfg) = (&blob.sections, blob.cfg.clone());
        let virtio: VirtioSection = decode(sections, "virtio")?;
        let (core, mrs) = decode_core(sections)?;
        let backend: BackendSnapshot = decode(sections, "backend")?;

        if virtio.acked_features & !crate::device::AVAIL_FEATURES != 0 {
            return Err(invalid("features the device never offered"));
        }
        let mut st = State::new(cfg.clone(), port.clone());
        st.acked_features = virtio.acked_features;
        let Some(qs) = virtio.queues else {
            // Never activated: nothing else may be present.
            // (A device pre-copied before it was ever activated saves an empty delta.)
            let mrs_empty = match &mrs {
                MrsSection::Full(t) => t.objs.is_empty(),
                MrsSection::Delta { mrs: t, .. } => {
                    t.objs.is_empty() && t.keys.is_empty() && t.free.is_empty()
                }
            };
            if core.db_gpa.is_some()
                || !core.pds.objs.is_empty()
                || !mrs_empty
                || !core.cqs.objs.is_empty()
                || !core.qps.objs.is_empty()
                || !core.ahs.objs.is_empty()
                || !backend_is_empty(&backend)
            {
                return Err(invalid("resources on a device that was never activated"));
            }
            return Ok(st);
        };
        if qs.len() != abi::NUM_QUEUES {
            return Err(invalid("wrong number of queues"));
        }
        let mut queues = Vec::with_capacity(qs.len());
        for (i, q) in qs.into_iter().enumerate() {
            if q.max_size != abi::QUEUE_MAX_SIZE {
                return Err(invalid(format!("queue {i}: wrong maximum size")));
            }
            let q = Queue::try_from(QueueState::from(q))
                .map_err(|e| invalid(format!("queue {i}: {e}")))?;
            if !q.is_valid(mem.as_ref()) {
                return Err(invalid(format!("queue {i}: rings outside guest memory")));
            }
            queues.push(q);
        }
        st.activate(mem.clone(), queues, irq);
        st.core = restore_core(cfg, &mem, st.acked_features, core, mrs, precopy)?;
        // The restored core raises CQ notifications through the interrupt `activate` gave the
        // core it replaces.
        st.core.irq = st.active.as_ref().map(|a| a.irq.clone());
        let c = &st.core;
        let limits = |qpn: u32| {
            c.qps.get(qpn).map(|q| QpLimits {
                info: q.info(qpn),
                sq_depth: q.sq.depth,
                max_inline: q.max_inline,
            })
        };
        st.backend = SoftBackend::restore(port, Some(&mem), backend, &limits)
            .map_err(MigrationError::Invalid)?;
        // Every QP of the core that can hold operations must have a backend twin.
        for qpn in st.core.qps.handles() {
            if !st.backend.has_qp(qpn) {
                return Err(invalid(format!("QP {qpn:#x} has no transport state")));
            }
        }
        Ok(st)
    }
}

fn backend_is_empty(b: &BackendSnapshot) -> bool {
    b == &BackendSnapshot::default()
}

fn restore_core(
    cfg: DeviceConfig,
    mem_arc: &Arc<GuestMemoryMmap>,
    features: u64,
    s: CoreSection,
    mrs: MrsSection,
    precopy: Option<PrecopyState>,
) -> Result<Core, MigrationError> {
    let mem = mem_arc.as_ref();
    let mut core = Core::new(cfg.clone());
    core.set_memory(mem_arc.clone());
    core.features = features;
    if let Some(gpa) = s.db_gpa {
        // What registration required under these features (the CQ-notify bitmap only with
        // VRDMA_F_CQ_NOTIFY).
        let size = abi::doorbell_area_min(cfg.max_qp, cfg.max_cq, features);
        if !gpa.is_multiple_of(abi::VRDMA_PAGE_SIZE) || !mr::in_one_region(mem, gpa, size) {
            return Err(invalid("doorbell area outside guest memory"));
        }
    } else if !s.cqs.objs.is_empty() || !s.qps.objs.is_empty() {
        return Err(invalid("rings without a doorbell area"));
    }
    core.db_gpa = s.db_gpa;
    let t = |what: &'static str| move |e: String| invalid(format!("{what}: {e}"));
    core.pds = HandleTable::from_snapshot(cfg.max_pd, s.pds, |_, ()| Ok(Pd::default()))
        .map_err(t("PD table"))?;
    let pds = core.pds.clone();
    let pd_ok = |pd: u32| {
        pds.get(pd)
            .map(|_| ())
            .ok_or_else(|| format!("unknown PD {pd:#x}"))
    };
    core.mrs = match mrs {
        MrsSection::Full(snap) => {
            HandleTable::from_snapshot(cfg.max_mr, snap, |_, m| mr_from(mem, &cfg, m))
        }
        MrsSection::Delta { precopy: id, mrs } => {
            let Some(pre) = precopy else {
                return Err(MigrationError::Precopy(
                    "the blob builds on a pre-copy, and none was given".into(),
                ));
            };
            pre.check(id, &cfg, mem)?;
            // The pre-copied MRs were validated when the pre-copy was loaded (same limits,
            // same memory layout); the changed ones are validated here.
            HandleTable::from_delta(cfg.max_mr, pre.mrs, mrs, |_, m| mr_from(mem, &cfg, m))
        }
    }
    // The restored device may be migrated again, with a pre-copy of its MR table.
    .map(HandleTable::tracked)
    .map_err(t("MR table"))?;
    let mut mr_pages = 0u64;
    for (h, m) in core.mrs.iter() {
        pd_ok(m.pd).map_err(|e| invalid(format!("MR table: MR {h:#x}: {e}")))?;
        mr_pages += m.pages.len() as u64;
    }
    let mut ring_pages = 0u64;
    core.cqs = HandleTable::from_snapshot(cfg.max_cq, s.cqs, |_, c| {
        if c.ring.stride != abi::CQE_SIZE {
            return Err("CQ ring stride".into());
        }
        let ring = ring_from(mem, c.ring, cfg.max_cqe, cfg.max_ring_pages, "CQ ring")?;
        ring_pages += ring.pages.len() as u64;
        if c.armed & !(abi::CQ_ARM_NEXT | abi::CQ_ARM_SOLICITED) != 0 {
            return Err("CQ arm flags".into());
        }
        Ok(Cq {
            ring,
            prod: c.prod,
            armed: c.armed,
            arm_seq: c.arm_seq,
            sol_pos: c.sol_pos,
            overflow: c.overflow,
            refs: 0,
        })
    })
    .map_err(t("CQ table"))?;
    let cqs = core.cqs.clone();
    core.qps = HandleTable::from_snapshot(cfg.max_qp, s.qps, |_, q| {
        pd_ok(q.pd)?;
        if cqs.get(q.send_cq).is_none() || cqs.get(q.recv_cq).is_none() {
            return Err("unknown CQ".into());
        }
        if !matches!(q.qp_type, abi::QPT_RC | abi::QPT_UD) {
            return Err("QP type".into());
        }
        if q.attr.qp_state > abi::QPS_ERR {
            return Err("QP state".into());
        }
        let sq = ring_from(mem, q.sq, cfg.max_qp_wr, cfg.max_ring_pages, "SQ")?;
        let rq = ring_from(mem, q.rq, cfg.max_qp_wr, cfg.max_ring_pages, "RQ")?;
        ring_pages += (sq.pages.len() + rq.pages.len()) as u64;
        let send_room = sq.stride.saturating_sub(abi::SEND_WQE_HDR);
        if q.max_send_sge > (send_room / abi::SGE_SIZE).min(cfg.max_sge)
            || q.max_recv_sge
                > (rq.stride.saturating_sub(abi::RECV_WQE_HDR) / abi::SGE_SIZE).min(cfg.max_sge)
            || q.max_inline > send_room.min(cfg.max_inline)
        {
            return Err("QP capabilities exceed its rings".into());
        }
        let qp = Qp {
            qp_type: q.qp_type,
            pd: q.pd,
            send_cq: q.send_cq,
            recv_cq: q.recv_cq,
            sq_sig_all: q.sq_sig_all,
            sq,
            rq,
            max_send_sge: q.max_send_sge,
            max_recv_sge: q.max_recv_sge,
            max_inline: q.max_inline,
            attr: q.attr,
            sq_cons: q.sq_cons.into(),
            rq_cons: q.rq_cons,
            sq_stalled: false,
        };
        Ok(qp)
    })
    .map_err(t("QP table"))?;
    core.ahs = HandleTable::from_snapshot(cfg.max_ah, s.ahs, |_, (pd, attr)| {
        pd_ok(pd)?;
        Ok(Ah { pd, attr })
    })
    .map_err(t("AH table"))?;
    if mr_pages > cfg.max_total_mr_pages || ring_pages > cfg.max_total_ring_pages {
        return Err(invalid("page budgets exceeded"));
    }
    core.total_mr_pages = mr_pages;
    core.total_ring_pages = ring_pages;
    // Reference counts are derived, never trusted.
    let mut pd_refs: Vec<u32> = Vec::new();
    pd_refs.extend(core.mrs.iter().map(|(_, m)| m.pd));
    pd_refs.extend(core.ahs.iter().map(|(_, a)| a.pd));
    pd_refs.extend(core.qps.iter().map(|(_, q)| q.pd));
    for pd in pd_refs {
        if let Some(p) = core.pds.get_mut(pd) {
            p.refs += 1;
        }
    }
    let cq_refs: Vec<u32> = core
        .qps
        .iter()
        .flat_map(|(_, q)| [q.send_cq, q.recv_cq])
        .collect();
    for cq in cq_refs {
        if let Some(c) = core.cqs.get_mut(cq) {
            c.refs += 1;
        }
    }
    let cap = (cfg.max_cq as usize + cfg.max_qp as usize) * 2 + 64;
    if s.events.len() > cap {
        return Err(invalid("too many pending events"));
    }
    core.events = s.events.into_iter().collect();
    core.events_dropped = s.events_dropped;
    for &qpn in &s.draining {
        if core.qps.get(qpn).is_none() {
            return Err(invalid("draining an unknown QP"));
        }
    }
    core.draining = s.draining;
    core.moderation = Moderation {
        max_events: s.moderation_max_events,
        usec: s.moderation_usec,
        pending: s.moderation_pending,
        first_pending: None,
        // A CQ notification pending under moderation is re-raised from guest memory
        // (`State::kick_all`).
        notify: false,
    };
    Ok(core)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KNOWN: &[(&str, &[u32])] = &[("config", &[1]), ("virtio", &[1, 2]), ("core", &[1])];

    fn blob_of(magic: [u8; 8], parts: &[(&str, u32)]) -> Vec<u8> {
        let mut w = BlobWriter::new(magic, 0);
        for (name, v) in parts {
            w.section(name, *v, &7u32);
        }
        w.finish()
    }

    fn check(blob: &[u8]) -> Result<usize, MigrationError> {
        unframe(blob, MAGIC, KNOWN).map(|s| s.len())
    }

    #[test]
    fn framing_rejects_damage() {
        let blob = blob_of(MAGIC, &[("config", 1), ("virtio", 2)]);
        let s = unframe(&blob, MAGIC, KNOWN).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!((s[1].name.as_str(), s[1].version), ("virtio", 2));
        assert_eq!(decode::<u32>(&s, "config").unwrap(), 7);
        assert!(matches!(
            decode::<u32>(&s, "core"),
            Err(MigrationError::Section { .. })
        ));
        for cut in 0..blob.len() {
            assert!(check(&blob[..cut]).is_err(), "truncated at {cut}");
        }
        let mut bad = blob.clone();
        bad[0] ^= 1;
        assert_eq!(check(&bad), Err(MigrationError::BadMagic));
        // A pre-copy blob is not a device blob, and the other way round.
        let pre = blob_of(PRECOPY_MAGIC, &[("config", 1)]);
        assert_eq!(check(&pre), Err(MigrationError::BadMagic));
        assert!(matches!(
            unframe(&blob, PRECOPY_MAGIC, KNOWN),
            Err(MigrationError::BadMagic)
        ));
        let mut bad = blob.clone();
        bad[8] = 2;
        assert_eq!(check(&bad), Err(MigrationError::UnsupportedVersion(2)));
        let mut bad = blob.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x40;
        assert_eq!(check(&bad), Err(MigrationError::Checksum));
        let mut long = blob.clone();
        long.push(0);
        assert!(check(&long).is_err());
        // Section versions: only the listed ones; names: known, once.
        for parts in [
            &[("config", 2)][..],
            &[("virtio", 3)],
            &[("cfg", 1)],
            &[("config", 1), ("config", 1)],
        ] {
            let r = check(&blob_of(MAGIC, parts));
            assert!(
                matches!(r, Err(MigrationError::Section { .. })),
                "{parts:?}"
            );
        }
    }
}
