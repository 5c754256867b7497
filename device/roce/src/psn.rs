//! 24-bit packet sequence number arithmetic (IBTA 9.7.1): PSNs wrap at 2^24.

/// Mask of the 24 PSN bits.
pub const MASK: u32 = 0xff_ffff;

/// `a + n` modulo 2^24 (`a` and `n` may have bits above 24; they are ignored by the wrap).
pub fn add(a: u32, n: u32) -> u32 {
    a.wrapping_add(n) & MASK
}

/// Signed distance `a - b` in the 24-bit sequence space, in `-2^23 ..= 2^23 - 1`.
///
/// Positive when `a` is after `b` (within half the space), negative when before.
pub fn diff(a: u32, b: u32) -> i32 {
    // Move the 24-bit difference into the top of an i32 and shift back arithmetically.
    ((a.wrapping_sub(b) << 8) as i32) >> 8
}

/// True if `a` comes strictly before `b` in the 24-bit sequence space.
pub fn before(a: u32, b: u32) -> bool {
    diff(a, b) < 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_wraps() {
        assert_eq!(add(MASK, 1), 0);
        assert_eq!(add(0xff_fff0, 0x20), 0x10);
        assert_eq!(add(5, 7), 12);
        assert_eq!(add(1, u32::MAX), 0);
    }

    #[test]
    fn diff_signed() {
        assert_eq!(diff(5, 3), 2);
        assert_eq!(diff(3, 5), -2);
        assert_eq!(diff(0, MASK), 1);
        assert_eq!(diff(MASK, 0), -1);
        assert_eq!(diff(0x80_0000, 0), -0x80_0000);
        assert_eq!(diff(0x7f_ffff, 0), 0x7f_ffff);
        assert!(before(MASK, 0));
        assert!(!before(0, 0));
    }

    #[test]
    fn add_diff_inverse() {
        for &a in &[0u32, 1, 0x123456, MASK, 0x80_0000] {
            for &n in &[0i32, 1, -1, 1000, -1000, 0x7f_ffff, -0x80_0000] {
                let b = add(a, n as u32);
                assert_eq!(diff(b, a), n, "a={a:#x} n={n}");
            }
        }
    }
}
