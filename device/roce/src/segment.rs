//! Which opcode each packet of a multi-packet message carries, and back.

use crate::opcode::*;

/// The kind of a (possibly multi-packet) RC message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MsgKind {
    /// SEND.
    Send,
    /// SEND with immediate (ImmDt on the LAST or ONLY packet).
    SendImm,
    /// RDMA WRITE (RETH on the FIRST or ONLY packet).
    Write,
    /// RDMA WRITE with immediate (RETH on FIRST/ONLY, ImmDt on LAST/ONLY).
    WriteImm,
    /// RDMA READ response (AETH on FIRST, LAST and ONLY, not on MIDDLE).
    ReadResp,
}

/// The place of a packet in its message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Position {
    /// First of several.
    First,
    /// Neither first nor last.
    Middle,
    /// Last of several.
    Last,
    /// The only packet.
    Only,
}

/// The RC opcode of packet `index` of a `count`-packet message of `kind`.
///
/// A message of `count <= 1` packets (a zero-length message is one packet) uses the ONLY opcode;
/// otherwise packet 0 is FIRST, `count - 1` LAST, the others MIDDLE. An `index >= count` is taken
/// as the last packet. The `*Imm` kinds differ from the plain ones only on LAST and ONLY.
pub fn segment_opcode(kind: MsgKind, index: usize, count: usize) -> u8 {
    let pos = if count <= 1 {
        Position::Only
    } else if index == 0 {
        Position::First
    } else if index >= count - 1 {
        Position::Last
    } else {
        Position::Middle
    };
    use MsgKind::*;
    use Position::*;
    match (kind, pos) {
        (Send | SendImm, First) => RC_SEND_FIRST,
        (Send | SendImm, Middle) => RC_SEND_MIDDLE,
        (Send, Last) => RC_SEND_LAST,
        (SendImm, Last) => RC_SEND_LAST_IMM,
        (Send, Only) => RC_SEND_ONLY,
        (SendImm, Only) => RC_SEND_ONLY_IMM,
        (Write | WriteImm, First) => RC_WRITE_FIRST,
        (Write | WriteImm, Middle) => RC_WRITE_MIDDLE,
        (Write, Last) => RC_WRITE_LAST,
        (WriteImm, Last) => RC_WRITE_LAST_IMM,
        (Write, Only) => RC_WRITE_ONLY,
        (WriteImm, Only) => RC_WRITE_ONLY_IMM,
        (ReadResp, First) => RC_READ_RESPONSE_FIRST,
        (ReadResp, Middle) => RC_READ_RESPONSE_MIDDLE,
        (ReadResp, Last) => RC_READ_RESPONSE_LAST,
        (ReadResp, Only) => RC_READ_RESPONSE_ONLY,
    }
}

/// The message kind and position of a data-carrying opcode, `None` for the others (READ request,
/// ACKs, atomics, vendor, unsupported).
///
/// FIRST and MIDDLE opcodes do not say whether the message ends with immediate data: they are
/// classified as [`MsgKind::Send`] / [`MsgKind::Write`]. UD SEND ONLY (+IMM) classify as
/// [`MsgKind::Send`] / [`MsgKind::SendImm`] with [`Position::Only`].
pub fn position(opcode: u8) -> Option<(MsgKind, Position)> {
    use MsgKind::*;
    use Position::*;
    Some(match opcode {
        RC_SEND_FIRST => (Send, First),
        RC_SEND_MIDDLE => (Send, Middle),
        RC_SEND_LAST => (Send, Last),
        RC_SEND_LAST_IMM => (SendImm, Last),
        RC_SEND_ONLY | UD_SEND_ONLY => (Send, Only),
        RC_SEND_ONLY_IMM | UD_SEND_ONLY_IMM => (SendImm, Only),
        RC_WRITE_FIRST => (Write, First),
        RC_WRITE_MIDDLE => (Write, Middle),
        RC_WRITE_LAST => (Write, Last),
        RC_WRITE_LAST_IMM => (WriteImm, Last),
        RC_WRITE_ONLY => (Write, Only),
        RC_WRITE_ONLY_IMM => (WriteImm, Only),
        RC_READ_RESPONSE_FIRST => (ReadResp, First),
        RC_READ_RESPONSE_MIDDLE => (ReadResp, Middle),
        RC_READ_RESPONSE_LAST => (ReadResp, Last),
        RC_READ_RESPONSE_ONLY => (ReadResp, Only),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KINDS: [MsgKind; 5] = [
        MsgKind::Send,
        MsgKind::SendImm,
        MsgKind::Write,
        MsgKind::WriteImm,
        MsgKind::ReadResp,
    ];

    #[test]
    fn segments() {
        assert_eq!(segment_opcode(MsgKind::Send, 0, 0), RC_SEND_ONLY);
        assert_eq!(segment_opcode(MsgKind::Send, 0, 1), RC_SEND_ONLY);
        assert_eq!(segment_opcode(MsgKind::SendImm, 0, 1), RC_SEND_ONLY_IMM);
        assert_eq!(segment_opcode(MsgKind::SendImm, 0, 3), RC_SEND_FIRST);
        assert_eq!(segment_opcode(MsgKind::SendImm, 1, 3), RC_SEND_MIDDLE);
        assert_eq!(segment_opcode(MsgKind::SendImm, 2, 3), RC_SEND_LAST_IMM);
        assert_eq!(segment_opcode(MsgKind::WriteImm, 0, 2), RC_WRITE_FIRST);
        assert_eq!(segment_opcode(MsgKind::WriteImm, 1, 2), RC_WRITE_LAST_IMM);
        assert_eq!(segment_opcode(MsgKind::Write, 0, 1), RC_WRITE_ONLY);
        assert_eq!(
            segment_opcode(MsgKind::ReadResp, 5, 9),
            RC_READ_RESPONSE_MIDDLE
        );
        assert_eq!(
            segment_opcode(MsgKind::ReadResp, 9, 9),
            RC_READ_RESPONSE_LAST
        );
        assert_eq!(
            segment_opcode(MsgKind::ReadResp, usize::MAX, usize::MAX),
            RC_READ_RESPONSE_LAST
        );
    }

    #[test]
    fn position_inverts_segment_opcode() {
        for kind in KINDS {
            for count in 1..5 {
                for index in 0..count {
                    let op = segment_opcode(kind, index, count);
                    let (k, pos) = position(op).expect("data opcode");
                    let want_pos = match (index, count) {
                        (_, 1) => Position::Only,
                        (0, _) => Position::First,
                        (i, c) if i + 1 == c => Position::Last,
                        _ => Position::Middle,
                    };
                    assert_eq!(pos, want_pos);
                    // FIRST/MIDDLE of *Imm messages classify as the plain kind.
                    let want_kind = match (kind, pos) {
                        (MsgKind::SendImm, Position::First | Position::Middle) => MsgKind::Send,
                        (MsgKind::WriteImm, Position::First | Position::Middle) => MsgKind::Write,
                        (k, _) => k,
                    };
                    assert_eq!(k, want_kind);
                }
            }
        }
        for op in [
            RC_READ_REQUEST,
            RC_ACKNOWLEDGE,
            RC_ATOMIC_ACKNOWLEDGE,
            RC_COMPARE_SWAP,
            RC_FETCH_ADD,
            VENDOR_FIRST,
            CNP,
        ] {
            assert_eq!(position(op), None);
        }
        assert_eq!(
            position(UD_SEND_ONLY_IMM),
            Some((MsgKind::SendImm, Position::Only))
        );
    }
}
