//! Model-based property tests of the data path: random verb sequences between two guests over RC
//! (and, smaller, UD), checked against a small model of the semantics in `docs/abi.md`.
//!
//! Each case builds a fresh fabric and two [`Vm`]s (guest memory, real device, real virtio-mmio
//! transport, real guest driver), registers the same set of MRs on both sides (different access
//! flags, one in a second PD, page-crossing and unaligned ranges) over buffers with known
//! contents, and connects one QP pair. The model keeps a shadow copy of every buffer and, for
//! every step, predicts:
//!
//! * the completions of each queue (SQ and RQ of both QPs): `wr_id`, status, opcode, `byte_len`,
//!   immediate data, vendor error for local faults, and their order within the queue;
//! * the events (`EV_QP_FATAL` for every device-initiated move to ERR, `EV_CQ_COMP` for armed
//!   CQs), and the QP state (`QUERY_QP`);
//! * every byte of every buffer.
//!
//! Steps run one at a time: post, wait for exactly the predicted completions (generous timeout),
//! check that nothing else arrived, check events, QP states and the touched buffers, go on. An
//! unsignaled WR that succeeds produces nothing to wait for, so it is followed by a signaled
//! zero-length RDMA WRITE (a "probe", no memory access) that completes only after it. `Batch`
//! steps post several WRs with one doorbell; the harness sets `SEND_F_FENCE` on a WR that touches
//! memory an earlier READ or atomic of the batch reads or writes (IB does not order those
//! otherwise, so without the fence the outcome would not be determined).
//!
//! Where `docs/abi.md` leaves an outcome open the step is skipped rather than guessed (see
//! `Model::predict_send`): an RDMA WRITE with immediate that fails its remote check while the
//! responder has no receive posted (RNR vs. access error first), and a receive WQE with a bad SGE
//! consumed by a WRITE with immediate (whose SGEs are "not used"). Where the spec allows several
//! statuses (two local faults in one WQE), any of them is accepted. Buffers that IB leaves
//! undefined after an error (the sink of a failed READ/atomic, a receive buffer that completed in
//! error) are re-read into the shadow rather than predicted.
//!
//! Per case, parameters that do not change any predicted outcome are randomized too: path MTU
//! (multi-packet messages), READ/atomic depth, starting PSNs (also just below the 2^24 wrap),
//! `sq_sig_all`, and each QP's remote access flags (which do change outcomes, and are modelled).
//! With `rnr_retry` 7 (unlimited) a SEND or WRITE with immediate that finds no receive is given
//! one by the harness 2 ms later ("late receive") and must then succeed; with 0..=2 it must end
//! in RNR_RETRY_EXC_ERR. `Heal` reconnects the pair if a QP is in ERR, so long cases keep doing
//! real work after an error.
//!
//! At the end of a case the test waits briefly and checks that no CQE or event is left over,
//! compares every buffer byte for byte, and destroys both QPs, which must flush the receives the
//! model still holds.
//!
//! `MODEL_CASES=n` changes the number of cases; the ignored test `model_outcome_histogram` prints
//! how often each outcome occurs (to check the generators still reach every path).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use vm_memory::GuestAddress;
use vrdma_abi as abi;
use vrdma_abi::{Cqe, Event, Gid, QpAttr, Sge};
use vrdma_device::soft::SoftFabric;
use vrdma_guest::{
    ah_attr_for, pattern, wc_status_name, Ah, Buffer, Cq, Driver, GuestAlloc, Layout, Mr, Pd, Qp,
    QpInitAttr, RcParams, RecvWr, SendWr,
};
use vrdma_tests::{Vm, ALLOC_BASE};

// -------------------------------------------------------------------------------------------------
// Parameters
// -------------------------------------------------------------------------------------------------

const LW: u32 = abi::ACCESS_LOCAL_WRITE;
const RW: u32 = abi::ACCESS_REMOTE_WRITE;
const RR: u32 = abi::ACCESS_REMOTE_READ;
const RA: u32 = abi::ACCESS_REMOTE_ATOMIC;
const REMOTE_ALL: u32 = RW | RR | RA;

/// How long to wait for a predicted completion or event (they normally take microseconds; RNR
/// and transport retries take milliseconds).
const WAIT: Duration = Duration::from_secs(2);
/// How long to wait at the end of a case before checking that nothing else arrives.
const SETTLE: Duration = Duration::from_millis(30);
/// Inline bytes requested per send WR.
const MAX_INLINE: u32 = 128;
/// Receive queue depth; the model never lets more receives be outstanding.
const RQ_DEPTH: usize = 32;
/// Send queue depth (a batch plus its probe always fits).
const SQ_DEPTH: u32 = 64;
/// Largest UD payload (the port's active MTU).
const UD_MTU: u64 = 4096;
/// The UD QPs' Q_Key.
const UD_QKEY: u32 = 0x1111_2222;
/// XORed into a key's generation byte to make a stale (invalid) key.
const STALE: u32 = 0x5a;
/// Local ACK timeout exponent (4.096 µs × 2^12 ≈ 17 ms) and transport retries: a request to a
/// QP in ERR fails with RETRY_EXC_ERR after ~50 ms.
const ACK_TIMEOUT: u8 = 12;
const RETRY_CNT: u8 = 2;
/// Responder RNR NAK delay (IB encoding 1 = 0.01 ms).
const MIN_RNR_TIMER: u8 = 1;

const SQ: usize = 0;
const RQ: usize = 1;

/// One memory region of the fixed per-side layout. Each MR has a buffer of its own, `buf_off +
/// len + SLACK` bytes, and covers `[buf_off, buf_off + len)` of it.
struct MrDef {
    access: u32,
    buf_off: u64,
    len: u64,
    /// Registered in a second PD (not the QP's).
    other_pd: bool,
}

const SLACK: u64 = 160;
const NMR: usize = 7;
const MR_DEFS: [MrDef; NMR] = [
    // 0: everything.
    MrDef {
        access: LW | REMOTE_ALL,
        buf_off: 0,
        len: 6000,
        other_pd: false,
    },
    // 1: no REMOTE_WRITE (iova ≡ 4 mod 8).
    MrDef {
        access: LW | RR | RA,
        buf_off: 100,
        len: 4500,
        other_pd: false,
    },
    // 2: no REMOTE_READ.
    MrDef {
        access: LW | RW | RA,
        buf_off: 4000,
        len: 5000,
        other_pd: false,
    },
    // 3: no REMOTE_ATOMIC.
    MrDef {
        access: LW | RW | RR,
        buf_off: 8,
        len: 4096,
        other_pd: false,
    },
    // 4: local write only (rkey 0).
    MrDef {
        access: LW,
        buf_off: 3000,
        len: 3000,
        other_pd: false,
    },
    // 5: no access at all: a gather source only (rkey 0).
    MrDef {
        access: 0,
        buf_off: 17,
        len: 2000,
        other_pd: false,
    },
    // 6: everything, but in another PD.
    MrDef {
        access: LW | REMOTE_ALL,
        buf_off: 0,
        len: 1024,
        other_pd: true,
    },
];

// -------------------------------------------------------------------------------------------------
// Operations (what proptest generates and shrinks)
// -------------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    A,
    B,
}

impl Side {
    fn i(self) -> usize {
        self as usize
    }
}

/// A local or remote key: one of the MRs of the layout (of this side for SGEs, of the peer for
/// remote targets), or a stale key.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Key {
    Mr(u8),
    Stale,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Mr(i) => write!(f, "mr{i}"),
            Key::Stale => write!(f, "stale"),
        }
    }
}

/// An SGE: `len` bytes at byte `off` of an MR.
#[derive(Clone, Copy, PartialEq, Eq)]
struct SgeSpec {
    key: Key,
    off: u64,
    len: u32,
}

impl fmt::Debug for SgeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}[{}+{}]", self.key, self.off, self.len)
    }
}

#[derive(Clone, PartialEq, Eq)]
enum Payload {
    /// `len` inline bytes, `pattern(1000 + seed, len)`.
    Inline {
        len: u32,
        seed: u8,
    },
    Sges(Vec<SgeSpec>),
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Payload::Inline { len, seed } => write!(f, "inline({len}, seed {seed})"),
            Payload::Sges(s) => write!(f, "{s:?}"),
        }
    }
}

impl Payload {
    fn len(&self) -> u64 {
        match self {
            Payload::Inline { len, .. } => *len as u64,
            Payload::Sges(s) => sges_len(s),
        }
    }
}

fn sges_len(s: &[SgeSpec]) -> u64 {
    s.iter().map(|g| g.len as u64).sum()
}

/// A remote target: byte `off` of the peer's MR named by `key`.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Target {
    key: Key,
    off: u64,
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "peer {:?}[{}]", self.key, self.off)
    }
}

/// Compare operand of a CMP_AND_SWP: the value the model expects there (the swap happens), or a
/// given one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Compare {
    Current,
    Value(u64),
}

/// A send work request on an RC QP.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Wr {
    Send {
        payload: Payload,
        imm: Option<u32>,
        solicited: bool,
        signaled: bool,
    },
    Write {
        payload: Payload,
        target: Target,
        imm: Option<u32>,
        solicited: bool,
        signaled: bool,
    },
    Read {
        sinks: Vec<SgeSpec>,
        target: Target,
        signaled: bool,
    },
    CmpSwap {
        sink: Vec<SgeSpec>,
        target: Target,
        compare: Compare,
        swap: u64,
        signaled: bool,
    },
    FetchAdd {
        sink: Vec<SgeSpec>,
        target: Target,
        add: u64,
        signaled: bool,
    },
}

impl Wr {
    fn signaled(&self) -> bool {
        match self {
            Wr::Send { signaled, .. }
            | Wr::Write { signaled, .. }
            | Wr::Read { signaled, .. }
            | Wr::CmpSwap { signaled, .. }
            | Wr::FetchAdd { signaled, .. } => *signaled,
        }
    }

    fn len(&self) -> u64 {
        match self {
            Wr::Send { payload, .. } | Wr::Write { payload, .. } => payload.len(),
            Wr::Read { sinks, .. } => sges_len(sinks),
            Wr::CmpSwap { .. } | Wr::FetchAdd { .. } => 8,
        }
    }

    fn is_rd_atomic(&self) -> bool {
        matches!(
            self,
            Wr::Read { .. } | Wr::CmpSwap { .. } | Wr::FetchAdd { .. }
        )
    }

    fn wc_opcode(&self) -> u8 {
        match self {
            Wr::Send { .. } => abi::WC_OP_SEND,
            Wr::Write { .. } => abi::WC_OP_RDMA_WRITE,
            Wr::Read { .. } => abi::WC_OP_RDMA_READ,
            Wr::CmpSwap { .. } => abi::WC_OP_COMP_SWAP,
            Wr::FetchAdd { .. } => abi::WC_OP_FETCH_ADD,
        }
    }

    /// The local scatter list (READ sink, atomic result).
    fn sinks(&self) -> &[SgeSpec] {
        match self {
            Wr::Read { sinks, .. } => sinks,
            Wr::CmpSwap { sink, .. } | Wr::FetchAdd { sink, .. } => sink,
            _ => &[],
        }
    }

    fn target(&self) -> Option<&Target> {
        match self {
            Wr::Send { .. } => None,
            Wr::Write { target, .. }
            | Wr::Read { target, .. }
            | Wr::CmpSwap { target, .. }
            | Wr::FetchAdd { target, .. } => Some(target),
        }
    }

    /// The signaled WR the harness posts after an unsignaled success: a zero-length RDMA WRITE
    /// or READ (no memory access), or a fetch-and-add of 0, whichever the peer QP accepts.
    fn probe(peer_access: u32) -> Wr {
        let target = Target {
            key: Key::Mr(0),
            off: 0,
        };
        if peer_access & RW == 0 && peer_access & RR != 0 {
            Wr::Read {
                sinks: vec![],
                target,
                signaled: true,
            }
        } else if peer_access & (RW | RR) == 0 && peer_access & RA != 0 {
            Wr::FetchAdd {
                sink: vec![SgeSpec {
                    key: Key::Mr(0),
                    off: 0,
                    len: 8,
                }],
                target,
                add: 0,
                signaled: true,
            }
        } else {
            // With no remote access at all this fails (both QPs go to ERR), as predicted.
            Wr::Write {
                payload: Payload::Sges(vec![]),
                target,
                imm: None,
                solicited: false,
                signaled: true,
            }
        }
    }
}

/// One step of an RC case.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Op {
    /// Post receive WRs (one scatter list each).
    Recv { side: Side, wrs: Vec<Vec<SgeSpec>> },
    /// Post one send WR and wait for its outcome.
    Post { side: Side, wr: Wr },
    /// Post several send WRs with one doorbell, then wait for all outcomes.
    Batch { side: Side, wrs: Vec<Wr> },
    /// Arm the side's CQ (`solicited`: CQ_ARM_SOLICITED, else CQ_ARM_NEXT).
    Arm { side: Side, solicited: bool },
    /// MODIFY_QP to ERR.
    ModifyErr { side: Side },
    /// Both QPs to RESET, then connected again.
    Reconnect,
    /// `Reconnect` if either QP is in ERR, otherwise nothing (keeps long cases out of ERR).
    Heal,
}

#[derive(Clone, Debug)]
struct RcCase {
    /// Each side's QP access flags (what it accepts as responder).
    qp_access: [u32; 2],
    /// Each side's QP was created with `sq_sig_all`.
    sig_all: [bool; 2],
    /// Transport parameters that do not change any outcome.
    transport: Transport,
    ops: Vec<Op>,
}

/// RC connection parameters; none of them changes what the model predicts.
#[derive(Clone, Copy, Debug)]
struct Transport {
    /// RNR retries; 7 = unlimited: a SEND that finds no receive waits until the harness posts
    /// one ("late receive").
    rnr_retry: u8,
    /// `abi::MTU_*` enum (multi-packet messages with small MTUs).
    path_mtu: u32,
    /// READ/atomic depth, both ways.
    max_rd_atomic: u8,
    /// First send PSN of each side (the peer's expected receive PSN); near 2^24 they wrap.
    sq_psn: [u32; 2],
}

/// Where a UD datagram is addressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum UdDest {
    Peer,
    WrongQkey,
    WrongQpn,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum UdOp {
    Recv {
        side: Side,
        wrs: Vec<Vec<SgeSpec>>,
    },
    Send {
        side: Side,
        payload: Payload,
        imm: Option<u32>,
        dest: UdDest,
        solicited: bool,
        signaled: bool,
    },
    Arm {
        side: Side,
        solicited: bool,
    },
    ModifyErr {
        side: Side,
    },
    /// Both QPs to RESET and back to RTS if either is in ERR, otherwise nothing.
    Heal,
}

// -------------------------------------------------------------------------------------------------
// Strategies
// -------------------------------------------------------------------------------------------------

fn side() -> impl Strategy<Value = Side> {
    prop_oneof![Just(Side::A), Just(Side::B)]
}

/// An MR for an SGE: mostly valid ones; the no-access MR (invalid as a scatter target), the MR of
/// the other PD and a stale key rarely.
fn lkey(scatter: bool) -> BoxedStrategy<Key> {
    let no_access = if scatter { 1 } else { 15 };
    prop_oneof![
        30 => Just(Key::Mr(0)),
        15 => Just(Key::Mr(1)),
        15 => Just(Key::Mr(2)),
        15 => Just(Key::Mr(3)),
        15 => Just(Key::Mr(4)),
        no_access => Just(Key::Mr(5)),
        1 => Just(Key::Mr(6)),
        1 => Just(Key::Stale),
    ]
    .boxed()
}

/// SGE lengths: receive buffers (`big`) tend to be larger than send payloads.
fn sge_len(big: bool) -> BoxedStrategy<u32> {
    if big {
        prop_oneof![
            1 => Just(0u32),
            2 => 1..=64u32,
            3 => 65..=1024u32,
            5 => 1025..=4000u32,
        ]
        .boxed()
    } else {
        prop_oneof![
            2 => Just(0u32),
            6 => 1..=64u32,
            4 => 65..=512u32,
            2 => 513..=2048u32,
            1 => 2049..=4000u32,
        ]
        .boxed()
    }
}

fn make_sge(mut key: Key, len: u32, frac: u32, oob: bool, scatter: bool) -> SgeSpec {
    // Whether a zero-length scatter SGE on an MR without LOCAL_WRITE is valid is not specified
    // ("its lkey is still checked"): do not generate it.
    if let Key::Mr(i) = key {
        if scatter && len == 0 && MR_DEFS[i as usize].access & LW == 0 {
            key = Key::Mr(0);
        }
    }
    let mr_len = match key {
        Key::Mr(i) => MR_DEFS[i as usize].len,
        Key::Stale => MR_DEFS[0].len,
    };
    let len = (len as u64).min(mr_len);
    let off = if oob {
        mr_len - len + 1 + frac as u64 % 64
    } else {
        frac as u64 % (mr_len - len + 1)
    };
    SgeSpec {
        key,
        off,
        len: len as u32,
    }
}

/// One SGE; about 1 in 100 reaches past the end of its MR.
fn sge(scatter: bool, big: bool) -> impl Strategy<Value = SgeSpec> {
    (
        lkey(scatter),
        sge_len(big),
        any::<u32>(),
        prop::bool::weighted(0.01),
    )
        .prop_map(move |(key, len, frac, oob)| make_sge(key, len, frac, oob, scatter))
}

/// An 8-byte scatter SGE (atomic result).
fn sge8() -> impl Strategy<Value = SgeSpec> {
    (lkey(true), any::<u32>(), prop::bool::weighted(0.01))
        .prop_map(|(key, frac, oob)| make_sge(key, 8, frac, oob, true))
}

fn payload(max_sges: usize) -> impl Strategy<Value = Payload> {
    prop_oneof![
        1 => (0..=MAX_INLINE, any::<u8>()).prop_map(|(len, seed)| Payload::Inline { len, seed }),
        3 => prop::collection::vec(sge(false, false), 0..=max_sges).prop_map(Payload::Sges),
    ]
}

/// Receive scatter lists: mostly 1..=3 SGEs, sometimes none.
fn recv_sges() -> impl Strategy<Value = Vec<SgeSpec>> {
    prop_oneof![
        1 => Just(vec![]),
        8 => prop::collection::vec(sge(true, true), 1..=3),
    ]
}

/// Raw material of a remote target: (valid, pick, frac, out of bounds, misaligned).
type TargetRaw = (bool, u8, u32, bool, bool);

fn target_raw() -> impl Strategy<Value = TargetRaw> {
    (
        prop::bool::weighted(0.94),
        any::<u8>(),
        any::<u32>(),
        prop::bool::weighted(0.03),
        prop::bool::weighted(0.05),
    )
}

/// Resolves a target for an access of `len` bytes needing `access`: with `valid`, one of the
/// MRs that grant it (the QP's access flags may still refuse); otherwise any MR or a stale key.
/// Atomic targets are 8-byte aligned unless `misaligned`.
fn make_target(raw: TargetRaw, access: u32, len: u64, atomic: bool) -> Target {
    let (valid, pick, frac, oob, misaligned) = raw;
    let keys: Vec<Key> = if valid {
        (0..NMR)
            .filter(|&j| !MR_DEFS[j].other_pd && MR_DEFS[j].access & access != 0)
            .map(|j| Key::Mr(j as u8))
            .collect()
    } else {
        (0..NMR as u8)
            .map(Key::Mr)
            .chain(std::iter::once(Key::Stale))
            .collect()
    };
    let key = keys[pick as usize % keys.len()];
    let def = match key {
        Key::Mr(j) => &MR_DEFS[j as usize],
        Key::Stale => &MR_DEFS[0],
    };
    let span = def.len.saturating_sub(len) + 1;
    let mut off = if oob {
        def.len.saturating_sub(len) + 1 + frac as u64 % 64
    } else {
        frac as u64 % span
    };
    if atomic {
        // Align the iova (buffers are page aligned, so the MR's iova ≡ buf_off mod 8).
        if oob {
            off = def.len - 4;
        }
        let r = (def.buf_off + off) % 8;
        off = if oob || off < r {
            off + (8 - r) % 8
        } else {
            off - r
        };
        if misaligned {
            off += 1 + (frac as u64 >> 8) % 7;
        }
    }
    Target { key, off }
}

fn signaled() -> impl Strategy<Value = bool> {
    prop::bool::weighted(0.75)
}

fn imm() -> impl Strategy<Value = Option<u32>> {
    prop::option::weighted(0.3, any::<u32>())
}

fn atomic_sink() -> impl Strategy<Value = Vec<SgeSpec>> {
    prop_oneof![
        12 => sge8().prop_map(|s| vec![s]),
        1 => prop::collection::vec(sge(true, false), 0..=2),
    ]
}

fn wr() -> BoxedStrategy<Wr> {
    let send = (payload(3), imm(), prop::bool::weighted(0.3), signaled()).prop_map(
        |(payload, imm, solicited, signaled)| Wr::Send {
            payload,
            imm,
            solicited,
            signaled,
        },
    );
    let write = (
        payload(3),
        target_raw(),
        imm(),
        prop::bool::weighted(0.3),
        signaled(),
    )
        .prop_map(|(payload, t, imm, solicited, signaled)| Wr::Write {
            target: make_target(t, RW, payload.len(), false),
            payload,
            imm,
            solicited,
            signaled,
        });
    let read = (
        prop::collection::vec(sge(true, false), 0..=3),
        target_raw(),
        signaled(),
    )
        .prop_map(|(sinks, t, signaled)| Wr::Read {
            target: make_target(t, RR, sges_len(&sinks), false),
            sinks,
            signaled,
        });
    let compare = prop_oneof![
        3 => Just(Compare::Current),
        1 => (0..1000u64).prop_map(Compare::Value),
    ];
    let cas = (
        atomic_sink(),
        target_raw(),
        compare,
        0..1_000_000u64,
        signaled(),
    )
        .prop_map(|(sink, t, compare, swap, signaled)| Wr::CmpSwap {
            sink,
            target: make_target(t, RA, 8, true),
            compare,
            swap,
            signaled,
        });
    let faa = (atomic_sink(), target_raw(), 0..1_000_000u64, signaled()).prop_map(
        |(sink, t, add, signaled)| Wr::FetchAdd {
            sink,
            target: make_target(t, RA, 8, true),
            add,
            signaled,
        },
    );
    prop_oneof![
        5 => send,
        4 => write,
        3 => read,
        1 => cas,
        1 => faa,
    ]
    .boxed()
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        32 => (side(), prop::collection::vec(recv_sges(), 1..=3))
            .prop_map(|(side, wrs)| Op::Recv { side, wrs }),
        40 => (side(), wr()).prop_map(|(side, wr)| Op::Post { side, wr }),
        8 => (side(), prop::collection::vec(wr(), 2..=6))
            .prop_map(|(side, wrs)| Op::Batch { side, wrs }),
        4 => (side(), any::<bool>()).prop_map(|(side, solicited)| Op::Arm { side, solicited }),
        1 => side().prop_map(|side| Op::ModifyErr { side }),
        3 => Just(Op::Reconnect),
        8 => Just(Op::Heal),
    ]
}

fn qp_access() -> impl Strategy<Value = u32> {
    prop_oneof![
        4 => Just(REMOTE_ALL),
        1 => (0..8u32).prop_map(|b| b << 1),
    ]
}

/// Receives posted on both sides before the random steps (as ordinary `Recv` steps), so that
/// SENDs do not mostly end in RNR.
fn prefill() -> impl Strategy<Value = [Vec<Vec<SgeSpec>>; 2]> {
    let one = || prop::collection::vec(recv_sges(), 0..=12);
    (one(), one()).prop_map(|(a, b)| [a, b])
}

fn with_prefill<T>(
    prefill: [Vec<Vec<SgeSpec>>; 2],
    ops: Vec<T>,
    recv: fn(Side, Vec<Vec<SgeSpec>>) -> T,
) -> Vec<T> {
    let [a, b] = prefill;
    let mut all: Vec<T> = [(Side::A, a), (Side::B, b)]
        .into_iter()
        .filter(|(_, wrs)| !wrs.is_empty())
        .map(|(side, wrs)| recv(side, wrs))
        .collect();
    all.extend(ops);
    all
}

fn psn() -> impl Strategy<Value = u32> {
    prop_oneof![Just(0u32), 0xff_ff00..=0xff_ffffu32, 0..=0xff_ffffu32,]
}

fn transport() -> impl Strategy<Value = Transport> {
    (
        prop_oneof![3 => 0..=2u8, 1 => Just(7u8)],
        prop_oneof![
            Just(abi::MTU_4096),
            Just(3u32 /* 1024 */),
            Just(abi::MTU_256)
        ],
        prop_oneof![Just(16u8), Just(2u8), Just(1u8)],
        (psn(), psn()),
    )
        .prop_map(|(rnr_retry, path_mtu, max_rd_atomic, (a, b))| Transport {
            rnr_retry,
            path_mtu,
            max_rd_atomic,
            sq_psn: [a, b],
        })
}

fn rc_case() -> impl Strategy<Value = RcCase> {
    (
        (qp_access(), qp_access()),
        (prop::bool::weighted(0.2), prop::bool::weighted(0.2)),
        transport(),
        prefill(),
        prop::collection::vec(op(), 1..40),
    )
        .prop_map(|((a, b), (sa, sb), transport, prefill, ops)| RcCase {
            qp_access: [a, b],
            sig_all: [sa, sb],
            transport,
            ops: with_prefill(prefill, ops, |side, wrs| Op::Recv { side, wrs }),
        })
}

fn ud_case() -> impl Strategy<Value = Vec<UdOp>> {
    (prefill(), prop::collection::vec(ud_op(), 1..30))
        .prop_map(|(prefill, ops)| with_prefill(prefill, ops, |side, wrs| UdOp::Recv { side, wrs }))
}

fn ud_op() -> impl Strategy<Value = UdOp> {
    let dest = prop_oneof![
        10 => Just(UdDest::Peer),
        1 => Just(UdDest::WrongQkey),
        1 => Just(UdDest::WrongQpn),
    ];
    prop_oneof![
        6 => (side(), prop::collection::vec(recv_sges(), 1..=3))
            .prop_map(|(side, wrs)| UdOp::Recv { side, wrs }),
        10 => (
            side(),
            payload(3),
            imm(),
            dest,
            prop::bool::weighted(0.3),
            signaled(),
        )
            .prop_map(|(side, payload, imm, dest, solicited, signaled)| UdOp::Send {
                side,
                payload,
                imm,
                dest,
                solicited,
                signaled,
            }),
        1 => (side(), any::<bool>()).prop_map(|(side, solicited)| UdOp::Arm { side, solicited }),
        1 => side().prop_map(|side| UdOp::ModifyErr { side }),
        1 => Just(UdOp::Heal),
    ]
}

// -------------------------------------------------------------------------------------------------
// Expectations
// -------------------------------------------------------------------------------------------------

/// A predicted CQE.
#[derive(Clone, Debug)]
struct ExpCqe {
    wr_id: u64,
    opcode: u8,
    /// Accepted (status, vendor_err) pairs; `None` = vendor_err not checked.
    alts: Vec<(u8, Option<u32>)>,
    /// Checked on success.
    byte_len: Option<u32>,
    /// Receives (checked on success): whether WC_F_WITH_IMM is set, and the value.
    imm: Option<Option<u32>>,
    /// UD receives (checked on success): WC_F_GRH set and this `src_qp`.
    ud_src: Option<u32>,
    /// A successful receive of a solicited message (model only: CQ_ARM_SOLICITED).
    solicited: bool,
}

impl ExpCqe {
    fn ok(wr_id: u64, opcode: u8, byte_len: Option<u32>) -> Self {
        ExpCqe {
            wr_id,
            opcode,
            alts: vec![(abi::WC_SUCCESS, None)],
            byte_len,
            imm: None,
            ud_src: None,
            solicited: false,
        }
    }

    fn recv(wr_id: u64, opcode: u8, len: u64, imm: Option<u32>, solicited: bool) -> Self {
        ExpCqe {
            imm: Some(imm),
            solicited,
            ..Self::ok(wr_id, opcode, Some(len as u32))
        }
    }

    fn error(wr_id: u64, opcode: u8, alts: Vec<(u8, Option<u32>)>) -> Self {
        ExpCqe {
            alts,
            ..Self::ok(wr_id, opcode, None)
        }
    }

    fn error1(wr_id: u64, opcode: u8, status: u8) -> Self {
        Self::error(wr_id, opcode, vec![(status, None)])
    }

    fn flush(wr_id: u64, opcode: u8) -> Self {
        Self::error1(wr_id, opcode, abi::WC_WR_FLUSH_ERR)
    }

    fn is_error(&self) -> bool {
        self.alts[0].0 != abi::WC_SUCCESS
    }

    fn check(&self, c: &Cqe, qpn: u32) -> Result<(), String> {
        let mut bad = Vec::new();
        if c.wr_id != self.wr_id {
            bad.push("wr_id");
        }
        if c.qpn != qpn {
            bad.push("qpn");
        }
        if !self
            .alts
            .iter()
            .any(|&(s, v)| s == c.status && v.is_none_or(|v| v == c.vendor_err))
        {
            bad.push("status/vendor_err");
        }
        if c.opcode != self.opcode {
            bad.push("opcode");
        }
        if c.status == abi::WC_SUCCESS && !self.is_error() {
            if self.byte_len.is_some_and(|l| l != c.byte_len) {
                bad.push("byte_len");
            }
            if let Some(imm) = self.imm {
                let has = c.wc_flags & abi::WC_F_WITH_IMM != 0;
                if has != imm.is_some() || imm.is_some_and(|v| v != c.imm_data) {
                    bad.push("imm");
                }
            }
            if let Some(src) = self.ud_src {
                if c.wc_flags & abi::WC_F_GRH == 0 || c.src_qp != src {
                    bad.push("GRH flag/src_qp");
                }
            }
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(format!("wrong {}", bad.join(", ")))
        }
    }
}

fn fmt_cqe(c: &Cqe) -> String {
    format!(
        "Cqe {{ wr_id: {}, qpn: {:#x}, status: {}, opcode: {}, byte_len: {}, imm: {:#x}, \
         wc_flags: {}, vendor_err: {}, src_qp: {:#x} }}",
        c.wr_id,
        c.qpn,
        wc_status_name(c.status),
        c.opcode,
        c.byte_len,
        c.imm_data,
        c.wc_flags,
        c.vendor_err,
        c.src_qp
    )
}

fn fmt_exp(e: &ExpCqe) -> String {
    let alts: Vec<String> = e
        .alts
        .iter()
        .map(|&(s, v)| match v {
            Some(v) => format!("{}/vendor {v}", wc_status_name(s)),
            None => wc_status_name(s).to_string(),
        })
        .collect();
    format!(
        "Exp {{ wr_id: {}, status: {}, opcode: {}, byte_len: {:?}, imm: {:?}, ud_src: {:?} }}",
        e.wr_id,
        alts.join(" | "),
        e.opcode,
        e.byte_len,
        e.imm,
        e.ud_src
    )
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum ExpEvent {
    /// `detail`: accepted values, or `None` = not checked.
    QpFatal {
        qpn: u32,
        detail: Option<Vec<u64>>,
    },
    CqComp {
        cqn: u32,
    },
}

impl ExpEvent {
    fn matches(&self, e: &Event) -> bool {
        match self {
            ExpEvent::QpFatal { qpn, detail } => {
                e.kind == abi::EV_QP_FATAL
                    && e.handle == *qpn
                    && detail.as_ref().is_none_or(|d| d.contains(&e.detail))
            }
            ExpEvent::CqComp { cqn } => e.kind == abi::EV_CQ_COMP && e.handle == *cqn,
        }
    }
}

/// What one step must produce.
#[derive(Default)]
struct Expect {
    /// `[side][SQ | RQ]`, in completion order.
    cqes: [[Vec<ExpCqe>; 2]; 2],
    events: [Vec<ExpEvent>; 2],
    /// Buffer bytes IB leaves undefined: `(side, buffer, range)`, re-read into the shadow.
    undefined: Vec<(usize, usize, Range<usize>)>,
    /// Buffers the step may have changed: `(side, buffer)`.
    touched: BTreeSet<(usize, usize)>,
    /// Receives the harness posts after the send WRs and a pause (unlimited RNR retries).
    late: Vec<(usize, u64, Vec<Sge>)>,
}

impl Expect {
    fn sq(&mut self, side: usize) -> &mut Vec<ExpCqe> {
        &mut self.cqes[side][SQ]
    }

    fn rq(&mut self, side: usize) -> &mut Vec<ExpCqe> {
        &mut self.cqes[side][RQ]
    }
}

/// What the harness must do for one step.
enum Action {
    PostRecv {
        side: usize,
        wrs: Vec<(u64, Vec<Sge>)>,
    },
    PostSend {
        side: usize,
        wrs: Vec<SendPlan>,
    },
    Sleep(Duration),
    Arm {
        side: usize,
        solicited: bool,
    },
    ModifyErr {
        side: usize,
    },
    Reconnect,
}

/// A fully resolved send WR.
#[derive(Clone, Debug, Default)]
struct SendPlan {
    wr_id: u64,
    opcode: u8,
    flags: u8,
    sges: Vec<Sge>,
    inline: Option<Vec<u8>>,
    imm: u32,
    remote_addr: u64,
    rkey: u32,
    compare_add: u64,
    swap: u64,
    ah: u32,
    remote_qpn: u32,
    qkey: u32,
}

// -------------------------------------------------------------------------------------------------
// The model
// -------------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct MrKeys {
    iova: u64,
    lkey: u32,
    rkey: u32,
}

#[derive(Clone, Debug)]
struct PostedRecv {
    wr_id: u64,
    sges: Vec<SgeSpec>,
}

impl PostedRecv {
    fn cap(&self) -> u64 {
        sges_len(&self.sges)
    }
}

struct SideModel {
    mrs: Vec<MrKeys>,
    /// Shadow of every MR's buffer (index = MR index).
    shadow: Vec<Vec<u8>>,
    qpn: u32,
    cqn: u32,
    gid: Gid,
    /// UD: the address handle of the peer.
    ah: u32,
    qp_access: u32,
    /// The QP was created with `sq_sig_all`.
    sig_all: bool,
    err: bool,
    /// Outstanding receive WRs, in posting order.
    rq: VecDeque<PostedRecv>,
    /// Armed CQ: `Some(solicited_only)`.
    armed: Option<bool>,
}

/// The buffer range of an SGE of MR `i` at `off`, `len` bytes (not checked against the MR).
fn buf_range(i: u8, off: u64, len: u64) -> (usize, Range<usize>) {
    let start = (MR_DEFS[i as usize].buf_off + off) as usize;
    (i as usize, start..start + len as usize)
}

/// The buffer range of an SGE if it is a non-empty range inside its MR.
fn sge_buf_range(s: &SgeSpec) -> Option<(usize, Range<usize>)> {
    match s.key {
        Key::Mr(i) if s.len > 0 && s.off + s.len as u64 <= MR_DEFS[i as usize].len => {
            Some(buf_range(i, s.off, s.len as u64))
        }
        _ => None,
    }
}

impl SideModel {
    /// §10.1: the lkey names a live MR of the QP's PD, the range lies inside it, scatter targets
    /// need LOCAL_WRITE; a zero-length SGE's address is not checked.
    fn sge_ok(&self, s: &SgeSpec, scatter: bool) -> bool {
        let Key::Mr(i) = s.key else {
            return false;
        };
        let d = &MR_DEFS[i as usize];
        !d.other_pd
            && (!scatter || d.access & LW != 0)
            && (s.len == 0 || s.off + s.len as u64 <= d.len)
    }

    fn recv_ok(&self, r: &PostedRecv) -> bool {
        r.sges.iter().all(|s| self.sge_ok(s, true))
    }

    /// §10.5 remote checks: a live MR of the responder QP's PD whose access and the QP's access
    /// flags grant `bit`, the whole range inside it.
    fn remote_ok(&self, t: &Target, len: u64, bit: u32) -> bool {
        if self.qp_access & bit == 0 {
            return false;
        }
        // Zero-length RDMA: no rkey or address check (the QP's access flags still apply).
        if len == 0 && bit != RA {
            return true;
        }
        let Key::Mr(j) = t.key else {
            return false;
        };
        let d = &MR_DEFS[j as usize];
        !d.other_pd
            && d.access & bit != 0
            && self.qp_access & bit != 0
            && t.off.checked_add(len).is_some_and(|e| e <= d.len)
    }

    fn sge_abi(&self, s: &SgeSpec) -> Sge {
        match s.key {
            Key::Mr(i) => Sge {
                addr: self.mrs[i as usize].iova + s.off,
                length: s.len,
                lkey: self.mrs[i as usize].lkey,
            },
            Key::Stale => Sge {
                addr: self.mrs[0].iova + s.off,
                length: s.len,
                lkey: self.mrs[0].lkey ^ STALE,
            },
        }
    }

    /// `(remote_addr, rkey)` of a target on this side.
    fn target_abi(&self, t: &Target) -> (u64, u32) {
        match t.key {
            Key::Mr(j) => (self.mrs[j as usize].iova + t.off, self.mrs[j as usize].rkey),
            Key::Stale => (self.mrs[0].iova + t.off, self.mrs[0].rkey ^ STALE),
        }
    }

    /// The u64 at a target, if it lies inside its MR.
    fn target_u64(&self, t: &Target) -> Option<u64> {
        let Key::Mr(j) = t.key else {
            return None;
        };
        if t.off + 8 > MR_DEFS[j as usize].len {
            return None;
        }
        let (b, r) = buf_range(j, t.off, 8);
        Some(u64::from_le_bytes(self.shadow[b][r].try_into().unwrap()))
    }

    /// Bytes of a (valid) gather list.
    fn gather(&self, sges: &[SgeSpec]) -> Vec<u8> {
        let mut out = Vec::new();
        for s in sges {
            if let Some((b, r)) = sge_buf_range(s) {
                out.extend_from_slice(&self.shadow[b][r]);
            }
        }
        out
    }

    fn payload(&self, p: &Payload) -> Vec<u8> {
        match p {
            Payload::Inline { len, seed } => inline_bytes(*len, *seed),
            Payload::Sges(s) => self.gather(s),
        }
    }

    /// Buffer ranges of bytes `span` of the concatenation of a (valid) scatter list.
    fn span(&self, sges: &[SgeSpec], span: Range<usize>) -> Vec<(usize, Range<usize>)> {
        let mut out = Vec::new();
        let mut pos = 0;
        for s in sges {
            let Some((b, r)) = sge_buf_range(s) else {
                continue;
            };
            let (lo, hi) = (pos.max(span.start), (pos + r.len()).min(span.end));
            if lo < hi {
                out.push((b, r.start + lo - pos..r.start + hi - pos));
            }
            pos += r.len();
        }
        out
    }
}

fn inline_bytes(len: u32, seed: u8) -> Vec<u8> {
    pattern(1000 + seed as u64, len as usize)
}

struct Model {
    s: [SideModel; 2],
    /// RC with `rnr_retry` 7: RNR never ends in an error.
    rnr_unlimited: bool,
    next_wr_id: u64,
    stats: BTreeMap<&'static str, u64>,
}

impl Model {
    fn new(rig: &Rig, qp_access: [u32; 2]) -> Self {
        let s = [0, 1].map(|i| {
            let r = &rig.s[i];
            SideModel {
                mrs: r
                    .mrs
                    .iter()
                    .map(|m| MrKeys {
                        iova: m.iova,
                        lkey: m.lkey,
                        rkey: m.rkey,
                    })
                    .collect(),
                shadow: r.bufs.iter().map(|b| b.to_vec()).collect(),
                qpn: r.qp.qpn(),
                cqn: r.cq.cqn(),
                gid: r.gid,
                ah: r.ah.map_or(0, |a| a.0),
                qp_access: qp_access[i],
                sig_all: r.qp_sig_all,
                err: false,
                rq: VecDeque::new(),
                armed: None,
            }
        });
        Model {
            s,
            rnr_unlimited: false,
            next_wr_id: 1,
            stats: BTreeMap::new(),
        }
    }

    fn count(&mut self, what: &'static str) {
        *self.stats.entry(what).or_default() += 1;
    }

    fn next_id(&mut self) -> u64 {
        self.next_wr_id += 1;
        self.next_wr_id
    }

    /// The QP moves to ERR: every outstanding receive is flushed, in order. `event`: `None` for
    /// a driver-requested transition (no event), else `Some(accepted details)`.
    fn enter_err(&mut self, side: usize, exp: &mut Expect, event: Option<Option<Vec<u64>>>) {
        let s = &mut self.s[side];
        if s.err {
            return;
        }
        s.err = true;
        if let Some(detail) = event {
            exp.events[side].push(ExpEvent::QpFatal { qpn: s.qpn, detail });
        }
        while let Some(r) = s.rq.pop_front() {
            exp.rq(side).push(ExpCqe::flush(r.wr_id, abi::WC_OP_RECV));
        }
    }

    fn write_shadow(
        &mut self,
        side: usize,
        b: usize,
        r: Range<usize>,
        data: &[u8],
        exp: &mut Expect,
    ) {
        self.s[side].shadow[b][r].copy_from_slice(data);
        exp.touched.insert((side, b));
    }

    fn scatter(&mut self, side: usize, sges: &[SgeSpec], data: &[u8], exp: &mut Expect) {
        let mut pos = 0;
        for (b, r) in self.s[side].span(sges, 0..data.len()) {
            let n = r.len();
            self.write_shadow(side, b, r, &data[pos..pos + n], exp);
            pos += n;
        }
        assert_eq!(pos, data.len(), "model: scatter list too short");
    }

    fn undefined(&mut self, side: usize, sges: &[SgeSpec], exp: &mut Expect) {
        for s in sges {
            if let Some((b, r)) = sge_buf_range(s) {
                exp.undefined.push((side, b, r));
                exp.touched.insert((side, b));
            }
        }
    }

    /// Posting receives. Beyond the RQ depth nothing is posted.
    fn predict_recv(
        &mut self,
        side: usize,
        wrs: &[Vec<SgeSpec>],
        exp: &mut Expect,
        acts: &mut Vec<Action>,
    ) {
        let room = RQ_DEPTH - self.s[side].rq.len();
        let mut posted = Vec::new();
        for sges in wrs.iter().take(room) {
            let wr_id = self.next_id();
            let abi_sges = sges.iter().map(|s| self.s[side].sge_abi(s)).collect();
            posted.push((wr_id, abi_sges));
            if self.s[side].err {
                // §9.3: posted to a QP in ERR, flushed after the doorbell the driver rings.
                exp.rq(side).push(ExpCqe::flush(wr_id, abi::WC_OP_RECV));
                self.count("recv into ERR");
            } else {
                self.s[side].rq.push_back(PostedRecv {
                    wr_id,
                    sges: sges.clone(),
                });
            }
        }
        if !posted.is_empty() {
            acts.push(Action::PostRecv { side, wrs: posted });
        }
    }

    /// §10.6 local checks of a send WR: accepted (status, vendor_err) pairs, or `None` if valid.
    fn local_error(&self, x: usize, wr: &Wr) -> Option<Vec<(u8, Option<u32>)>> {
        let sx = &self.s[x];
        let mut alts = Vec::new();
        let bad_sge = Some((abi::WC_LOC_PROT_ERR, Some(abi::VENDOR_ERR_BAD_SGE)));
        match wr {
            Wr::Send { payload, .. } | Wr::Write { payload, .. } => {
                if let Payload::Sges(s) = payload {
                    if s.iter().any(|g| !sx.sge_ok(g, false)) {
                        alts.extend(bad_sge);
                    }
                }
            }
            Wr::Read { sinks, .. } => {
                if sinks.iter().any(|g| !sx.sge_ok(g, true)) {
                    alts.extend(bad_sge);
                }
            }
            Wr::CmpSwap { sink, target, .. } | Wr::FetchAdd { sink, target, .. } => {
                let (addr, _) = self.s[1 - x].target_abi(target);
                if sink.len() != 1 || sink[0].len != 8 || addr % 8 != 0 {
                    alts.push((abi::WC_LOC_QP_OP_ERR, Some(abi::VENDOR_ERR_BAD_WQE)));
                }
                if sink.iter().any(|g| !sx.sge_ok(g, true)) {
                    alts.extend(bad_sge);
                }
            }
        }
        (!alts.is_empty()).then_some(alts)
    }

    fn plan(&self, x: usize, wr: &Wr, wr_id: u64, fence: bool) -> SendPlan {
        let (sx, sy) = (&self.s[x], &self.s[1 - x]);
        let flags = |signaled: bool, solicited: bool| {
            (if signaled { abi::SEND_F_SIGNALED } else { 0 })
                | (if solicited { abi::SEND_F_SOLICITED } else { 0 })
                | (if fence { abi::SEND_F_FENCE } else { 0 })
        };
        let sges = |l: &[SgeSpec]| l.iter().map(|s| sx.sge_abi(s)).collect::<Vec<_>>();
        let payload = |p: &Payload| match p {
            Payload::Inline { len, seed } => (vec![], Some(inline_bytes(*len, *seed))),
            Payload::Sges(s) => (sges(s), None),
        };
        let mut p = SendPlan {
            wr_id,
            ..Default::default()
        };
        if let Some(t) = wr.target() {
            (p.remote_addr, p.rkey) = sy.target_abi(t);
        }
        match wr {
            Wr::Send {
                payload: pl,
                imm,
                solicited,
                signaled,
            } => {
                p.opcode = if imm.is_some() {
                    abi::WR_SEND_WITH_IMM
                } else {
                    abi::WR_SEND
                };
                p.flags = flags(*signaled, *solicited);
                (p.sges, p.inline) = payload(pl);
                p.imm = imm.unwrap_or(0);
            }
            Wr::Write {
                payload: pl,
                imm,
                solicited,
                signaled,
                ..
            } => {
                p.opcode = if imm.is_some() {
                    abi::WR_RDMA_WRITE_WITH_IMM
                } else {
                    abi::WR_RDMA_WRITE
                };
                p.flags = flags(*signaled, *solicited);
                (p.sges, p.inline) = payload(pl);
                p.imm = imm.unwrap_or(0);
            }
            Wr::Read {
                sinks, signaled, ..
            } => {
                p.opcode = abi::WR_RDMA_READ;
                p.flags = flags(*signaled, false);
                p.sges = sges(sinks);
            }
            Wr::CmpSwap {
                sink,
                target,
                compare,
                swap,
                signaled,
            } => {
                p.opcode = abi::WR_ATOMIC_CMP_AND_SWP;
                p.flags = flags(*signaled, false);
                p.sges = sges(sink);
                p.compare_add = match compare {
                    Compare::Current => sy.target_u64(target).unwrap_or(0),
                    Compare::Value(v) => *v,
                };
                p.swap = *swap;
            }
            Wr::FetchAdd {
                sink,
                add,
                signaled,
                ..
            } => {
                p.opcode = abi::WR_ATOMIC_FETCH_AND_ADD;
                p.flags = flags(*signaled, false);
                p.sges = sges(sink);
                p.compare_add = *add;
            }
        }
        p
    }

    /// The requester's WR fails remotely: error CQE, QP to ERR with an event.
    fn req_fail(&mut self, x: usize, wr_id: u64, wr: &Wr, status: u8, exp: &mut Expect) {
        exp.sq(x)
            .push(ExpCqe::error1(wr_id, wr.wc_opcode(), status));
        self.undefined(x, wr.sinks(), exp);
        self.enter_err(x, exp, Some(None));
    }

    /// Memory an RC send WR may touch: `(side, buffer, range)`, including the receive buffer a
    /// SEND lands in.
    fn touched(&self, x: usize, wr: &Wr) -> Vec<(usize, usize, Range<usize>)> {
        let y = 1 - x;
        let mut out = Vec::new();
        let local = |l: &[SgeSpec], side: usize, out: &mut Vec<_>| {
            for s in l {
                if let Some((b, r)) = sge_buf_range(s) {
                    out.push((side, b, r));
                }
            }
        };
        match wr {
            Wr::Send { payload, .. } | Wr::Write { payload, .. } => {
                if let Payload::Sges(s) = payload {
                    local(s, x, &mut out);
                }
            }
            _ => local(wr.sinks(), x, &mut out),
        }
        if let Wr::Send { .. } = wr {
            match self.s[y].rq.front() {
                Some(r) => local(&r.sges, y, &mut out),
                // The late receive it will get (see `late_recv`).
                None if self.rnr_unlimited => out.push((y, 0, 0..MR_DEFS[0].len as usize)),
                None => {}
            }
        }
        out.extend(self.remote_range(x, wr));
        out
    }

    /// The peer memory an RC WR addresses (if it is inside an MR).
    fn remote_range(&self, x: usize, wr: &Wr) -> Option<(usize, usize, Range<usize>)> {
        let t = wr.target()?;
        let len = wr.len();
        match t.key {
            Key::Mr(j) if len > 0 && t.off + len <= MR_DEFS[j as usize].len => {
                let (b, r) = buf_range(j, t.off, len);
                Some((1 - x, b, r))
            }
            _ => None,
        }
    }

    /// Predicts one RC send WR posted on side `x`. Returns the resolved WR and whether it
    /// produces a CQE on `x`; `None` when the spec leaves the outcome open (nothing is posted
    /// and the model is unchanged).
    fn predict_send(
        &mut self,
        x: usize,
        wr: &Wr,
        fence: bool,
        exp: &mut Expect,
    ) -> Option<(SendPlan, bool)> {
        let y = 1 - x;
        let len = wr.len();
        let local = self.local_error(x, wr);
        if let Wr::Write {
            imm: Some(_),
            target,
            ..
        } = wr
        {
            if !self.s[x].err && local.is_none() && !self.s[y].err {
                let access_ok = self.s[y].remote_ok(target, len, RW);
                match self.s[y].rq.front() {
                    // A receive WQE with a bad SGE whose SGEs the WRITE does not use.
                    Some(r) if !self.s[y].recv_ok(r) => {
                        self.count("skipped: WRITE_IMM into bad receive");
                        return None;
                    }
                    // RNR or remote access error first?
                    None if !access_ok => {
                        self.count("skipped: WRITE_IMM access error without receive");
                        return None;
                    }
                    _ => {}
                }
            }
        }
        let wr_id = self.next_id();
        let plan = self.plan(x, wr, wr_id, fence);
        let opc = wr.wc_opcode();
        if self.s[x].err {
            exp.sq(x).push(ExpCqe::flush(wr_id, opc));
            self.count("send: flushed");
            return Some((plan, true));
        }
        if let Some(alts) = local {
            let details = alts.iter().filter_map(|a| a.1.map(u64::from)).collect();
            exp.sq(x).push(ExpCqe::error(wr_id, opc, alts));
            self.undefined(x, wr.sinks(), exp);
            self.enter_err(x, exp, Some(Some(details)));
            self.count("send: local error");
            return Some((plan, true));
        }
        if self.s[y].err {
            self.req_fail(x, wr_id, wr, abi::WC_RETRY_EXC_ERR, exp);
            self.count("send: peer in ERR → RETRY_EXC");
            return Some((plan, true));
        }
        let signaled = wr.signaled() || self.s[x].sig_all;
        let ok = |byte_len: Option<u32>, exp: &mut Expect| {
            if signaled {
                exp.sq(x).push(ExpCqe::ok(wr_id, opc, byte_len));
            }
            signaled
        };
        let cqe = match wr {
            Wr::Send {
                payload,
                imm,
                solicited,
                ..
            } => {
                let data = self.s[x].payload(payload);
                if self.s[y].rq.is_empty() && self.rnr_unlimited {
                    self.late_recv(y, exp);
                }
                match self.s[y].rq.pop_front() {
                    None => {
                        self.req_fail(x, wr_id, wr, abi::WC_RNR_RETRY_EXC_ERR, exp);
                        self.count("SEND: RNR");
                        true
                    }
                    Some(r) => {
                        let malformed = !self.s[y].recv_ok(&r);
                        let short = r.cap() < len;
                        if malformed || short {
                            let (mut ralts, mut salts) = (Vec::new(), Vec::new());
                            if malformed {
                                ralts.push((abi::WC_LOC_PROT_ERR, Some(abi::VENDOR_ERR_BAD_SGE)));
                                salts.push((abi::WC_REM_OP_ERR, None));
                            }
                            if short {
                                ralts.push((abi::WC_LOC_LEN_ERR, None));
                                salts.push((abi::WC_REM_INV_REQ_ERR, None));
                            }
                            let detail =
                                (malformed && !short).then(|| vec![abi::VENDOR_ERR_BAD_SGE as u64]);
                            exp.rq(y)
                                .push(ExpCqe::error(r.wr_id, abi::WC_OP_RECV, ralts));
                            self.undefined(y, &r.sges, exp);
                            self.enter_err(y, exp, Some(detail));
                            exp.sq(x).push(ExpCqe::error(wr_id, opc, salts));
                            self.enter_err(x, exp, Some(None));
                            self.count(if malformed {
                                "SEND: bad receive WQE"
                            } else {
                                "SEND: receive too small"
                            });
                            true
                        } else {
                            self.scatter(y, &r.sges, &data, exp);
                            exp.rq(y).push(ExpCqe::recv(
                                r.wr_id,
                                abi::WC_OP_RECV,
                                len,
                                *imm,
                                *solicited,
                            ));
                            self.count("SEND: ok");
                            ok(None, exp)
                        }
                    }
                }
            }
            Wr::Write {
                payload,
                target,
                imm,
                solicited,
                ..
            } => {
                let access_ok = self.s[y].remote_ok(target, len, RW);
                if access_ok && imm.is_some() && self.s[y].rq.is_empty() && self.rnr_unlimited {
                    self.late_recv(y, exp);
                }
                if !access_ok {
                    if imm.is_some() {
                        let r = self.s[y].rq.pop_front().expect("checked above");
                        exp.rq(y).push(ExpCqe::error1(
                            r.wr_id,
                            abi::WC_OP_RECV,
                            abi::WC_LOC_ACCESS_ERR,
                        ));
                    }
                    self.enter_err(y, exp, Some(None));
                    self.req_fail(x, wr_id, wr, abi::WC_REM_ACCESS_ERR, exp);
                    self.count("WRITE: remote access error");
                    true
                } else if imm.is_some() && self.s[y].rq.is_empty() {
                    // IB lets the leading packets of a multi-packet WRITE land before the RNR.
                    if let Some((side, b, r)) = self.remote_range(x, wr) {
                        exp.undefined.push((side, b, r));
                        exp.touched.insert((side, b));
                    }
                    self.req_fail(x, wr_id, wr, abi::WC_RNR_RETRY_EXC_ERR, exp);
                    self.count("WRITE_IMM: RNR");
                    true
                } else {
                    let data = self.s[x].payload(payload);
                    if let Some((side, b, r)) = self.remote_range(x, wr) {
                        self.write_shadow(side, b, r, &data, exp);
                    }
                    if imm.is_some() {
                        let r = self.s[y].rq.pop_front().expect("checked above");
                        exp.rq(y).push(ExpCqe::recv(
                            r.wr_id,
                            abi::WC_OP_RECV_RDMA_WITH_IMM,
                            len,
                            *imm,
                            *solicited,
                        ));
                    }
                    self.count("WRITE: ok");
                    ok(None, exp)
                }
            }
            Wr::Read { sinks, target, .. } => {
                if !self.s[y].remote_ok(target, len, RR) {
                    self.enter_err(y, exp, Some(None));
                    self.req_fail(x, wr_id, wr, abi::WC_REM_ACCESS_ERR, exp);
                    self.count("READ: remote access error");
                    true
                } else {
                    let data = match self.remote_range(x, wr) {
                        Some((side, b, r)) => self.s[side].shadow[b][r].to_vec(),
                        None => vec![],
                    };
                    self.scatter(x, sinks, &data, exp);
                    self.count("READ: ok");
                    ok(Some(len as u32), exp)
                }
            }
            Wr::CmpSwap { sink, target, .. } | Wr::FetchAdd { sink, target, .. } => {
                if !self.s[y].remote_ok(target, 8, RA) {
                    self.enter_err(y, exp, Some(None));
                    self.req_fail(x, wr_id, wr, abi::WC_REM_ACCESS_ERR, exp);
                    self.count("atomic: remote access error");
                    true
                } else {
                    let orig = self.s[y].target_u64(target).expect("checked");
                    let new = match wr {
                        Wr::CmpSwap { swap, .. } if orig == plan.compare_add => *swap,
                        Wr::CmpSwap { .. } => orig,
                        _ => orig.wrapping_add(plan.compare_add),
                    };
                    let (side, b, r) = self.remote_range(x, wr).expect("checked");
                    self.write_shadow(side, b, r, &new.to_le_bytes(), exp);
                    self.scatter(x, sink, &orig.to_le_bytes(), exp);
                    self.count("atomic: ok");
                    ok(Some(8), exp)
                }
            }
        };
        Some((plan, cqe))
    }

    /// One step of an RC case: the harness actions and what they must produce.
    fn predict_rc(&mut self, op: &Op) -> (Vec<Action>, Expect) {
        let mut exp = Expect::default();
        let mut acts = Vec::new();
        match op {
            Op::Recv { side, wrs } => self.predict_recv(side.i(), wrs, &mut exp, &mut acts),
            Op::Post { side, wr } => {
                let x = side.i();
                if let Some((plan, cqe)) = self.predict_send(x, wr, false, &mut exp) {
                    let mut plans = vec![plan];
                    if !cqe {
                        plans.extend(self.probe(x, &mut exp));
                    }
                    acts.push(Action::PostSend {
                        side: x,
                        wrs: plans,
                    });
                }
            }
            Op::Batch { side, wrs } => {
                let x = side.i();
                let mut plans = Vec::new();
                let mut last_cqe = true;
                // Memory that earlier READs/atomics of the batch access.
                let mut pending: Vec<(usize, usize, Range<usize>)> = Vec::new();
                for wr in wrs {
                    let touched = self.touched(x, wr);
                    let fence = touched.iter().any(|(s, b, r)| {
                        pending.iter().any(|(ps, pb, pr)| {
                            s == ps && b == pb && r.start < pr.end && pr.start < r.end
                        })
                    });
                    if let Some((plan, cqe)) = self.predict_send(x, wr, fence, &mut exp) {
                        // Only a posted fenced WR orders what follows it.
                        if fence {
                            pending.clear();
                            self.count("batch: fence");
                        }
                        if wr.is_rd_atomic() {
                            for s in wr.sinks() {
                                if let Some((b, r)) = sge_buf_range(s) {
                                    pending.push((x, b, r));
                                }
                            }
                            pending.extend(self.remote_range(x, wr));
                        }
                        plans.push(plan);
                        last_cqe = cqe;
                    }
                }
                if !last_cqe {
                    plans.extend(self.probe(x, &mut exp));
                }
                if !plans.is_empty() {
                    acts.push(Action::PostSend {
                        side: x,
                        wrs: plans,
                    });
                }
            }
            Op::Arm { side, solicited } => {
                self.s[side.i()].armed = Some(*solicited);
                acts.push(Action::Arm {
                    side: side.i(),
                    solicited: *solicited,
                });
            }
            Op::ModifyErr { side } => {
                self.enter_err(side.i(), &mut exp, None);
                acts.push(Action::ModifyErr { side: side.i() });
            }
            Op::Heal if !self.s.iter().any(|s| s.err) => {}
            Op::Reconnect | Op::Heal => self.reset_both(&mut acts),
        }
        if !exp.late.is_empty() {
            // Let the requester see RNR NAKs first (the outcome does not depend on it).
            acts.push(Action::Sleep(Duration::from_millis(2)));
            for (side, wr_id, sges) in &exp.late {
                acts.push(Action::PostRecv {
                    side: *side,
                    wrs: vec![(*wr_id, sges.clone())],
                });
            }
        }
        self.arm_events(&mut exp);
        (acts, exp)
    }

    /// A receive on `y` that the harness posts after the send WRs of the step, so that a
    /// requester with unlimited RNR retries gets it on a retry.
    fn late_recv(&mut self, y: usize, exp: &mut Expect) {
        let wr_id = self.next_id();
        let sges = vec![SgeSpec {
            key: Key::Mr(0),
            off: 0,
            len: MR_DEFS[0].len as u32,
        }];
        let abi_sges = sges.iter().map(|s| self.s[y].sge_abi(s)).collect();
        exp.late.push((y, wr_id, abi_sges));
        self.s[y].rq.push_back(PostedRecv { wr_id, sges });
        self.count("late receive after RNR");
    }

    /// Both QPs to RESET and connected again. §13.3 → RESET: ring contents are discarded
    /// without completions.
    fn reset_both(&mut self, acts: &mut Vec<Action>) {
        for s in &mut self.s {
            s.rq.clear();
            s.err = false;
        }
        acts.push(Action::Reconnect);
    }

    fn probe(&mut self, x: usize, exp: &mut Expect) -> Option<SendPlan> {
        let probe = Wr::probe(self.s[1 - x].qp_access);
        let (plan, cqe) = self.predict_send(x, &probe, false, exp)?;
        assert!(cqe, "model: the probe must complete");
        self.count("probe");
        Some(plan)
    }

    /// §9.5: an armed CQ raises one EV_CQ_COMP at the first matching CQE, then is disarmed.
    fn arm_events(&mut self, exp: &mut Expect) {
        for side in 0..2 {
            let s = &mut self.s[side];
            let Some(solicited_only) = s.armed else {
                continue;
            };
            let fires = exp.cqes[side]
                .iter()
                .flatten()
                .any(|c| !solicited_only || c.is_error() || c.solicited);
            if fires {
                exp.events[side].push(ExpEvent::CqComp { cqn: s.cqn });
                s.armed = None;
            }
        }
    }

    /// Predicts a UD send posted on side `x`; `None` when the spec leaves the outcome open.
    fn predict_ud_send(&mut self, x: usize, op: &UdOp, exp: &mut Expect) -> Option<SendPlan> {
        let UdOp::Send {
            payload,
            imm,
            dest,
            solicited,
            signaled,
            ..
        } = op
        else {
            unreachable!()
        };
        let y = 1 - x;
        let len = payload.len();
        let mut alts = Vec::new();
        if let Payload::Sges(s) = payload {
            if s.iter().any(|g| !self.s[x].sge_ok(g, false)) {
                alts.push((abi::WC_LOC_PROT_ERR, Some(abi::VENDOR_ERR_BAD_SGE)));
            }
        }
        if len > UD_MTU {
            alts.push((abi::WC_LOC_LEN_ERR, Some(abi::VENDOR_ERR_BAD_WQE)));
        }
        let delivered =
            !self.s[x].err && alts.is_empty() && *dest == UdDest::Peer && !self.s[y].err;
        if delivered {
            if let Some(r) = self.s[y].rq.front() {
                // A bad receive WQE moves the QP to ERR, a too small one does not: which first?
                if !self.s[y].recv_ok(r) && r.cap() < abi::GRH_SIZE as u64 + len {
                    self.count("skipped: UD into bad and small receive");
                    return None;
                }
            }
        }
        let wr_id = self.next_id();
        let sy = &self.s[y];
        let mut plan = SendPlan {
            wr_id,
            opcode: if imm.is_some() {
                abi::WR_SEND_WITH_IMM
            } else {
                abi::WR_SEND
            },
            flags: (if *signaled { abi::SEND_F_SIGNALED } else { 0 })
                | (if *solicited { abi::SEND_F_SOLICITED } else { 0 }),
            imm: imm.unwrap_or(0),
            ah: self.s[x].ah,
            remote_qpn: if *dest == UdDest::WrongQpn {
                sy.qpn ^ STALE
            } else {
                sy.qpn
            },
            qkey: if *dest == UdDest::WrongQkey {
                UD_QKEY ^ 1
            } else {
                UD_QKEY
            },
            ..Default::default()
        };
        match payload {
            Payload::Inline { len, seed } => plan.inline = Some(inline_bytes(*len, *seed)),
            Payload::Sges(s) => plan.sges = s.iter().map(|g| self.s[x].sge_abi(g)).collect(),
        }
        if self.s[x].err {
            exp.sq(x).push(ExpCqe::flush(wr_id, abi::WC_OP_SEND));
            self.count("UD send: flushed");
            return Some(plan);
        }
        if !alts.is_empty() {
            let details = alts.iter().filter_map(|a| a.1.map(u64::from)).collect();
            exp.sq(x).push(ExpCqe::error(wr_id, abi::WC_OP_SEND, alts));
            self.enter_err(x, exp, Some(Some(details)));
            self.count("UD send: local error");
            return Some(plan);
        }
        // Unreliable: the sender completes successfully whatever happens to the datagram.
        if *signaled {
            exp.sq(x).push(ExpCqe::ok(wr_id, abi::WC_OP_SEND, None));
        }
        if !delivered {
            self.count("UD send: dropped (address, Q_Key or receiver in ERR)");
            return Some(plan);
        }
        let Some(r) = self.s[y].rq.pop_front() else {
            self.count("UD send: dropped (no receive)");
            return Some(plan);
        };
        let total = abi::GRH_SIZE as u64 + len;
        if !self.s[y].recv_ok(&r) {
            exp.rq(y).push(ExpCqe::error(
                r.wr_id,
                abi::WC_OP_RECV,
                vec![(abi::WC_LOC_PROT_ERR, Some(abi::VENDOR_ERR_BAD_SGE))],
            ));
            self.undefined(y, &r.sges, exp);
            self.enter_err(y, exp, Some(Some(vec![abi::VENDOR_ERR_BAD_SGE as u64])));
            self.count("UD send: bad receive WQE");
        } else if r.cap() < total {
            // §14: the receive completes with LOC_LEN_ERR, the UD QP is unaffected.
            exp.rq(y).push(ExpCqe::error1(
                r.wr_id,
                abi::WC_OP_RECV,
                abi::WC_LOC_LEN_ERR,
            ));
            self.undefined(y, &r.sges, exp);
            self.count("UD send: receive too small");
        } else {
            let mut data = vec![0u8; 8];
            data.extend_from_slice(&self.s[x].gid.raw);
            data.extend_from_slice(&self.s[y].gid.raw);
            data.extend_from_slice(&self.s[x].payload(payload));
            self.scatter(y, &r.sges, &data, exp);
            // GRH bytes 0..8 are reserved.
            for (b, range) in self.s[y].span(&r.sges, 0..8) {
                exp.undefined.push((y, b, range));
            }
            exp.rq(y).push(ExpCqe {
                ud_src: Some(self.s[x].qpn),
                ..ExpCqe::recv(r.wr_id, abi::WC_OP_RECV, total, *imm, *solicited)
            });
            self.count("UD send: delivered");
        }
        Some(plan)
    }

    fn predict_ud(&mut self, op: &UdOp) -> (Vec<Action>, Expect) {
        let mut exp = Expect::default();
        let mut acts = Vec::new();
        match op {
            UdOp::Recv { side, wrs } => self.predict_recv(side.i(), wrs, &mut exp, &mut acts),
            UdOp::Send { side, .. } => {
                if let Some(plan) = self.predict_ud_send(side.i(), op, &mut exp) {
                    acts.push(Action::PostSend {
                        side: side.i(),
                        wrs: vec![plan],
                    });
                }
            }
            UdOp::Arm { side, solicited } => {
                self.s[side.i()].armed = Some(*solicited);
                acts.push(Action::Arm {
                    side: side.i(),
                    solicited: *solicited,
                });
            }
            UdOp::ModifyErr { side } => {
                self.enter_err(side.i(), &mut exp, None);
                acts.push(Action::ModifyErr { side: side.i() });
            }
            UdOp::Heal => {
                if self.s.iter().any(|s| s.err) {
                    self.reset_both(&mut acts);
                }
            }
        }
        self.arm_events(&mut exp);
        (acts, exp)
    }
}

// -------------------------------------------------------------------------------------------------
// The rig: two guests
// -------------------------------------------------------------------------------------------------

struct SideRig {
    d: Driver,
    bufs: Vec<Buffer>,
    mrs: Vec<Mr>,
    cq: Cq,
    qp: Qp,
    gid: Gid,
    ah: Option<Ah>,
    params: Option<RcParams>,
    qp_sig_all: bool,
}

struct Rig {
    s: [SideRig; 2],
    // Kept alive for the drivers (and dropped after them).
    _vms: [Vm; 2],
    _fabric: Arc<SoftFabric>,
}

fn driver(vm: &Vm) -> Result<Driver, String> {
    Driver::probe(
        vm.port(),
        vm.mem.clone(),
        GuestAlloc::new(GuestAddress(ALLOC_BASE), 200 << 20),
    )
    .map_err(|e| format!("probe: {e:?}"))
}

fn side_rig(vm: &Vm, id: usize, qp_type: u8, sig_all: bool) -> Result<SideRig, String> {
    let e = |what: &'static str| move |err: vrdma_guest::Error| format!("{what}: {err:?}");
    let d = driver(vm)?;
    let pd: Pd = d.alloc_pd().map_err(e("alloc_pd"))?;
    let pd2: Pd = d.alloc_pd().map_err(e("alloc_pd"))?;
    let mut bufs = Vec::new();
    let mut mrs = Vec::new();
    for (i, def) in MR_DEFS.iter().enumerate() {
        let buf = d
            .alloc_buffer(def.buf_off + def.len + SLACK, Layout::Discontiguous)
            .map_err(e("alloc_buffer"))?;
        buf.fill_pattern((id * 16 + i) as u64);
        let mr = d
            .reg_mr_range(
                if def.other_pd { pd2 } else { pd },
                &buf,
                def.buf_off,
                def.len,
                def.access,
            )
            .map_err(e("reg_mr"))?;
        assert_eq!(mr.iova % 8, def.buf_off % 8, "buffers are page aligned");
        bufs.push(buf);
        mrs.push(mr);
    }
    let cq = d.create_cq(256).map_err(e("create_cq"))?;
    let attr = QpInitAttr {
        qp_type,
        max_send_wr: SQ_DEPTH,
        max_recv_wr: RQ_DEPTH as u32,
        max_send_sge: 4,
        max_recv_sge: 4,
        max_inline: MAX_INLINE,
        sq_sig_all: sig_all,
        ..QpInitAttr::rc(&cq)
    };
    let qp = d.create_qp(pd, &attr).map_err(e("create_qp"))?;
    assert!(qp.caps().max_inline >= MAX_INLINE && qp.caps().max_recv_sge >= 3);
    assert_eq!(qp.caps().max_recv_wr as usize, RQ_DEPTH);
    let gid = d.gid().map_err(e("gid"))?;
    Ok(SideRig {
        d,
        bufs,
        mrs,
        cq,
        qp,
        gid,
        ah: None,
        params: None,
        qp_sig_all: sig_all,
    })
}

impl Rig {
    fn rc(qp_access: [u32; 2], sig_all: [bool; 2], t: &Transport) -> Result<Rig, String> {
        let mut rig = Rig::new(abi::QPT_RC, sig_all)?;
        for (x, &access_flags) in qp_access.iter().enumerate() {
            let y = 1 - x;
            let (qpn, gid) = (rig.s[y].qp.qpn(), rig.s[y].gid);
            let s = &mut rig.s[x];
            s.params = Some(RcParams {
                timeout: ACK_TIMEOUT,
                retry_cnt: RETRY_CNT,
                rnr_retry: t.rnr_retry,
                min_rnr_timer: MIN_RNR_TIMER,
                access_flags,
                path_mtu: t.path_mtu,
                max_rd_atomic: t.max_rd_atomic,
                max_dest_rd_atomic: t.max_rd_atomic,
                sq_psn: t.sq_psn[x],
                rq_psn: t.sq_psn[y],
                ..s.d.rc_params(qpn, gid)
            });
        }
        rig.connect()?;
        Ok(rig)
    }

    fn ud() -> Result<Rig, String> {
        let mut rig = Rig::new(abi::QPT_UD, [false; 2])?;
        rig.connect()?;
        for x in 0..2 {
            let peer_gid = rig.s[1 - x].gid;
            let s = &mut rig.s[x];
            let pd = s.qp.pd();
            s.ah = Some(
                s.d.create_ah(pd, &ah_attr_for(peer_gid))
                    .map_err(|e| format!("create_ah: {e:?}"))?,
            );
        }
        Ok(rig)
    }

    fn new(qp_type: u8, sig_all: [bool; 2]) -> Result<Rig, String> {
        let fabric = SoftFabric::new();
        let vms = [Vm::new(&fabric, 1), Vm::new(&fabric, 2)];
        let s = [
            side_rig(&vms[0], 0, qp_type, sig_all[0])?,
            side_rig(&vms[1], 1, qp_type, sig_all[1])?,
        ];
        Ok(Rig {
            s,
            _vms: vms,
            _fabric: fabric,
        })
    }

    fn connect(&mut self) -> Result<(), String> {
        for s in &self.s {
            match &s.params {
                Some(p) => s.d.connect_rc_with(&s.qp, p),
                None => s.d.connect_ud(&s.qp, UD_QKEY),
            }
            .map_err(|e| format!("connect: {e:?}"))?;
        }
        Ok(())
    }

    fn act(&mut self, a: &Action) -> Result<(), String> {
        match a {
            Action::PostRecv { side, wrs } => {
                let s = &mut self.s[*side];
                let rwrs: Vec<RecvWr> = wrs
                    .iter()
                    .map(|(id, sges)| RecvWr::new(*id, sges))
                    .collect();
                s.d.post_recv(&mut s.qp, &rwrs)
                    .map_err(|e| format!("post_recv: {e:?}"))
            }
            Action::PostSend { side, wrs } => {
                let s = &mut self.s[*side];
                let swrs: Vec<SendWr> = wrs
                    .iter()
                    .map(|p| SendWr {
                        wr_id: p.wr_id,
                        opcode: p.opcode,
                        flags: p.flags,
                        sges: &p.sges,
                        inline: p.inline.as_deref(),
                        imm: p.imm,
                        remote_addr: p.remote_addr,
                        rkey: p.rkey,
                        compare_add: p.compare_add,
                        swap: p.swap,
                        ah: p.ah,
                        remote_qpn: p.remote_qpn,
                        qkey: p.qkey,
                    })
                    .collect();
                s.d.post_send(&mut s.qp, &swrs)
                    .map_err(|e| format!("post_send: {e:?}"))
            }
            Action::Sleep(d) => {
                std::thread::sleep(*d);
                Ok(())
            }
            Action::Arm { side, solicited } => {
                let s = &mut self.s[*side];
                s.d.req_notify_cq(&mut s.cq, *solicited)
                    .map_err(|e| format!("req_notify_cq: {e:?}"))
            }
            Action::ModifyErr { side } => {
                let s = &self.s[*side];
                let attr = QpAttr {
                    qp_state: abi::QPS_ERR,
                    ..Default::default()
                };
                s.d.modify_qp(&s.qp, &attr, abi::QP_ATTR_STATE)
                    .map_err(|e| format!("modify_qp(ERR): {e:?}"))
            }
            Action::Reconnect => {
                for s in &self.s {
                    let attr = QpAttr {
                        qp_state: abi::QPS_RESET,
                        ..Default::default()
                    };
                    s.d.modify_qp(&s.qp, &attr, abi::QP_ATTR_STATE)
                        .map_err(|e| format!("modify_qp(RESET): {e:?}"))?;
                }
                self.connect()
            }
        }
    }

    /// Waits for exactly the predicted CQEs of one side and checks them queue by queue.
    fn check_cqes(&mut self, side: usize, exp: &[Vec<ExpCqe>; 2]) -> Result<(), String> {
        let s = &mut self.s[side];
        let want = exp[SQ].len() + exp[RQ].len();
        let mut got = s.d.poll_cq_until(&mut s.cq, want, WAIT);
        let mut extra = [Cqe::default(); 16];
        let n = s.d.poll_cq(&mut s.cq, &mut extra);
        got.extend_from_slice(&extra[..n]);
        let qpn = s.qp.qpn();
        let name = ["A", "B"][side];
        let dump = |got: &[Cqe]| {
            let mut m = format!("\n  expected SQ of {name}:");
            for e in &exp[SQ] {
                m += &format!("\n    {}", fmt_exp(e));
            }
            m += &format!("\n  expected RQ of {name}:");
            for e in &exp[RQ] {
                m += &format!("\n    {}", fmt_exp(e));
            }
            m += &format!("\n  got on CQ of {name}:");
            for c in got {
                m += &format!("\n    {}", fmt_cqe(c));
            }
            m
        };
        if got.len() != want {
            return Err(format!(
                "{name}: expected {want} CQEs, got {}{}",
                got.len(),
                dump(&got)
            ));
        }
        let (rq, sq): (Vec<Cqe>, Vec<Cqe>) = got.iter().partition(|c| c.opcode & 0x80 != 0);
        for (q, qname, got_q) in [(SQ, "SQ", &sq), (RQ, "RQ", &rq)] {
            if got_q.len() != exp[q].len() {
                return Err(format!(
                    "{name}: {qname} completions: expected {}, got {}{}",
                    exp[q].len(),
                    got_q.len(),
                    dump(&got)
                ));
            }
            for (i, (e, c)) in exp[q].iter().zip(got_q.iter()).enumerate() {
                e.check(c, qpn)
                    .map_err(|m| format!("{name}: {qname} completion #{i}: {m}{}", dump(&got)))?;
            }
        }
        Ok(())
    }

    fn check_events(&mut self, side: usize, exp: &[ExpEvent]) -> Result<(), String> {
        let s = &self.s[side];
        let name = ["A", "B"][side];
        let mut want = exp.to_vec();
        let deadline = Instant::now() + WAIT;
        while !want.is_empty() {
            let Some(ev) =
                s.d.wait_event(deadline.saturating_duration_since(Instant::now()))
            else {
                return Err(format!("{name}: missing events {want:?}"));
            };
            match want.iter().position(|w| w.matches(&ev)) {
                Some(i) => {
                    want.remove(i);
                }
                None => {
                    return Err(format!(
                        "{name}: unexpected event {ev:?} (still expecting {want:?}, \
                         qpn {:#x}, cqn {:#x})",
                        s.qp.qpn(),
                        s.cq.cqn()
                    ))
                }
            }
        }
        if let Some(ev) = s.d.wait_event(Duration::ZERO) {
            return Err(format!(
                "{name}: unexpected event {ev:?} (qpn {:#x}, cqn {:#x})",
                s.qp.qpn(),
                s.cq.cqn()
            ));
        }
        Ok(())
    }

    fn check_buffer(&self, model: &Model, side: usize, b: usize) -> Result<(), String> {
        let got = self.s[side].bufs[b].to_vec();
        let want = &model.s[side].shadow[b];
        if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
            let end = (0..got.len())
                .rev()
                .find(|&j| got[j] != want[j])
                .unwrap_or(i);
            let n = (end + 1 - i).min(16);
            return Err(format!(
                "{} mr{b}: bytes differ from offset {} of the MR (buffer offset {i}) to {}: \
                 expected {:02x?}…, got {:02x?}…",
                ["A", "B"][side],
                i as i64 - MR_DEFS[b].buf_off as i64,
                end as i64 - MR_DEFS[b].buf_off as i64,
                &want[i..i + n],
                &got[i..i + n],
            ));
        }
        Ok(())
    }

    fn check_states(&self, model: &Model) -> Result<(), String> {
        for side in 0..2 {
            let s = &self.s[side];
            let state =
                s.d.qp_state(&s.qp)
                    .map_err(|e| format!("query_qp: {e:?}"))?;
            let want = if model.s[side].err {
                abi::QPS_ERR
            } else {
                abi::QPS_RTS
            };
            if state != want {
                return Err(format!(
                    "{}: QP state {state}, expected {want}",
                    ["A", "B"][side]
                ));
            }
        }
        Ok(())
    }

    /// Runs a predicted step and checks everything it must produce.
    fn run_step(
        &mut self,
        model: &mut Model,
        acts: Vec<Action>,
        exp: Expect,
    ) -> Result<(), String> {
        for a in &acts {
            self.act(a)?;
        }
        for side in 0..2 {
            self.check_cqes(side, &exp.cqes[side])?;
        }
        for side in 0..2 {
            self.check_events(side, &exp.events[side])?;
        }
        for (side, b, r) in &exp.undefined {
            let buf = &self.s[*side].bufs[*b];
            let r = r.start.min(buf.len() as usize)..r.end.min(buf.len() as usize);
            let actual = buf.read_vec(r.start as u64, r.len());
            model.s[*side].shadow[*b][r].copy_from_slice(&actual);
        }
        for &(side, b) in &exp.touched {
            self.check_buffer(model, side, b)?;
        }
        self.check_states(model)
    }

    /// End of a case: nothing left over, every byte as predicted; destroying the QPs flushes the
    /// receives the model still holds (§7.5.12, no event).
    fn finish(&mut self, model: &mut Model) -> Result<(), String> {
        std::thread::sleep(SETTLE);
        for side in 0..2 {
            self.check_cqes(side, &[vec![], vec![]])?;
            self.check_events(side, &[])?;
            for b in 0..NMR {
                self.check_buffer(model, side, b)?;
            }
        }
        self.check_states(model)?;
        for side in 0..2 {
            let s = &mut self.s[side];
            s.d.destroy_qp(&mut s.qp)
                .map_err(|e| format!("destroy_qp: {e:?}"))?;
            let flushes: Vec<ExpCqe> = model.s[side]
                .rq
                .drain(..)
                .map(|r| ExpCqe::flush(r.wr_id, abi::WC_OP_RECV))
                .collect();
            let mut events = Vec::new();
            if !flushes.is_empty() && model.s[side].armed.take().is_some() {
                events.push(ExpEvent::CqComp {
                    cqn: model.s[side].cqn,
                });
            }
            // The QP is gone: its completions still name its QPN.
            self.check_cqes(side, &[vec![], flushes])
                .map_err(|m| format!("after destroy_qp: {m}"))?;
            self.check_events(side, &events)
                .map_err(|m| format!("after destroy_qp: {m}"))?;
        }
        std::thread::sleep(SETTLE);
        for side in 0..2 {
            self.check_cqes(side, &[vec![], vec![]])?;
            self.check_events(side, &[])?;
        }
        Ok(())
    }
}

// -------------------------------------------------------------------------------------------------
// Runners
// -------------------------------------------------------------------------------------------------

fn run_rc(case: &RcCase, stats: Option<&mut BTreeMap<&'static str, u64>>) -> Result<(), String> {
    let mut rig = Rig::rc(case.qp_access, case.sig_all, &case.transport)?;
    let mut model = Model::new(&rig, case.qp_access);
    model.rnr_unlimited = case.transport.rnr_retry == 7;
    for (i, op) in case.ops.iter().enumerate() {
        let (acts, exp) = model.predict_rc(op);
        rig.run_step(&mut model, acts, exp)
            .map_err(|m| format!("step {i} {op:?}:\n{m}"))?;
    }
    rig.finish(&mut model)
        .map_err(|m| format!("at the end: {m}"))?;
    if let Some(stats) = stats {
        for (k, v) in model.stats {
            *stats.entry(k).or_default() += v;
        }
    }
    Ok(())
}

fn run_ud(ops: &[UdOp], stats: Option<&mut BTreeMap<&'static str, u64>>) -> Result<(), String> {
    let mut rig = Rig::ud()?;
    let mut model = Model::new(&rig, [0, 0]);
    for (i, op) in ops.iter().enumerate() {
        let (acts, exp) = model.predict_ud(op);
        rig.run_step(&mut model, acts, exp)
            .map_err(|m| format!("step {i} {op:?}:\n{m}"))?;
    }
    rig.finish(&mut model)
        .map_err(|m| format!("at the end: {m}"))?;
    if let Some(stats) = stats {
        for (k, v) in model.stats {
            *stats.entry(k).or_default() += v;
        }
    }
    Ok(())
}

/// `cases` unless `MODEL_CASES` says otherwise (for longer runs).
fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        max_shrink_iters: 1000,
        // A failing step waits up to `WAIT`: bound the time spent shrinking.
        max_shrink_time: 180_000,
        // Do not write regression files next to the test sources.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(48))]

    /// Random RC verb sequences between two guests against the model.
    #[test]
    fn rc_model(case in rc_case()) {
        run_rc(&case, None).map_err(TestCaseError::fail)?;
    }
}

proptest! {
    #![proptest_config(config(24))]

    /// Random UD verb sequences between two guests against the model.
    #[test]
    fn ud_model(ops in ud_case()) {
        run_ud(&ops, None).map_err(TestCaseError::fail)?;
    }
}

/// Prints how often each outcome occurs over many generated cases (to tune the generators):
/// `cargo test -p vrdma-tests --test model -- --ignored --nocapture`.
#[test]
#[ignore]
fn model_outcome_histogram() {
    let mut runner = TestRunner::new(config(1));
    let mut stats = BTreeMap::new();
    let strategy = rc_case();
    for _ in 0..100 {
        let case = strategy.new_tree(&mut runner).unwrap().current();
        if let Err(m) = run_rc(&case, Some(&mut stats)) {
            println!("RC case failed: {m}");
        }
    }
    let strategy = ud_case();
    for _ in 0..50 {
        let ops = strategy.new_tree(&mut runner).unwrap().current();
        if let Err(m) = run_ud(&ops, Some(&mut stats)) {
            println!("UD case failed: {m}");
        }
    }
    for (k, v) in stats {
        println!("{v:8}  {k}");
    }
}
