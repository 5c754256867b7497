//! The error type of the codec.

/// Why a packet could not be parsed, or headers could not be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum WireError {
    /// Shorter than the BTH, or than the headers of its opcode plus the 4-byte ICRC.
    #[error("packet too short for its headers and ICRC")]
    TooShort,
    /// BTH transport header version (`TVer`) is not 0.
    #[error("unsupported BTH transport header version")]
    BadVersion,
    /// Opcode not in the supported set (RC, UD SEND, manufacturer-specific range).
    #[error("unsupported opcode {0:#04x}")]
    UnsupportedOpcode(u8),
    /// Pad count larger than the bytes after the headers, or pad on a FIRST/MIDDLE packet.
    #[error("bad pad count")]
    BadPad,
    /// Payload length not allowed for the opcode (payload where none may be, empty FIRST/MIDDLE/LAST,
    /// payload + pad not a multiple of 4).
    #[error("payload length not allowed for this opcode")]
    BadLength,
    /// The extension headers given to [`write_headers`](crate::write_headers) are not exactly those
    /// of the opcode.
    #[error("extension headers do not match the opcode")]
    HeaderMismatch,
    /// A field given to [`write_headers`](crate::write_headers) does not fit its wire width (a
    /// 24-bit QPN, PSN or MSN above `0xff_ffff`).
    #[error("header field out of range for its wire width")]
    FieldRange,
}
