//! The QP state machine (IB spec, chapter 10.3) and attribute validation.

use vrdma_abi::{self as abi, QpAttr};

/// Attributes required (beyond `QP_ATTR_STATE`) for a transition, or `None` if the transition is
/// not allowed.
pub fn required_attrs(qp_type: u8, cur: u32, new: u32) -> Option<u32> {
    use abi::*;
    let rc = qp_type == QPT_RC;
    Some(match (cur, new) {
        (_, QPS_RESET) | (_, QPS_ERR) => 0,
        (QPS_RESET, QPS_INIT) => {
            if rc {
                QP_ATTR_PKEY_INDEX | QP_ATTR_PORT | QP_ATTR_ACCESS_FLAGS
            } else {
                QP_ATTR_PKEY_INDEX | QP_ATTR_PORT | QP_ATTR_QKEY
            }
        }
        (QPS_INIT, QPS_INIT) => 0,
        (QPS_INIT, QPS_RTR) => {
            if rc {
                QP_ATTR_AV
                    | QP_ATTR_PATH_MTU
                    | QP_ATTR_DEST_QPN
                    | QP_ATTR_RQ_PSN
                    | QP_ATTR_MAX_DEST_RD_ATOMIC
                    | QP_ATTR_MIN_RNR_TIMER
            } else {
                0
            }
        }
        (QPS_RTR, QPS_RTS) => {
            if rc {
                QP_ATTR_SQ_PSN
                    | QP_ATTR_TIMEOUT
                    | QP_ATTR_RETRY_CNT
                    | QP_ATTR_RNR_RETRY
                    | QP_ATTR_MAX_QP_RD_ATOMIC
            } else {
                QP_ATTR_SQ_PSN
            }
        }
        (QPS_RTS, QPS_RTS) | (QPS_RTS, QPS_SQD) | (QPS_SQD, QPS_RTS) | (QPS_SQD, QPS_SQD) => 0,
        (QPS_SQE, QPS_RTS) => 0,
        _ => return None,
    })
}

/// Why a modify was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModifyError {
    /// Transition not allowed.
    BadState,
    /// Missing required attribute, unknown mask bit or out-of-range value.
    Invalid,
}

/// Validates `mask`/`attr` against the QP's type and current state and applies it to `cur`.
/// `max_rd_atom` is the device limit for the READ/atomic depths.
pub fn apply_modify(
    qp_type: u8,
    cur: &mut QpAttr,
    mask: u32,
    attr: &QpAttr,
    max_rd_atom: u32,
) -> Result<(), ModifyError> {
    use abi::*;
    if mask & !QP_ATTR_SUPPORTED != 0 {
        return Err(ModifyError::Invalid);
    }
    let new_state = if mask & QP_ATTR_STATE != 0 {
        if attr.qp_state > QPS_ERR {
            return Err(ModifyError::Invalid);
        }
        attr.qp_state
    } else {
        cur.qp_state
    };
    let required = required_attrs(qp_type, cur.qp_state, new_state).ok_or(ModifyError::BadState)?;
    if mask & required != required {
        return Err(ModifyError::Invalid);
    }
    // Value checks.
    let bad = (mask & QP_ATTR_ACCESS_FLAGS != 0 && attr.qp_access_flags & !(ACCESS_ALL) != 0)
        || (mask & QP_ATTR_PORT != 0 && attr.port_num != 1)
        || (mask & QP_ATTR_PKEY_INDEX != 0 && attr.pkey_index != 0)
        || (mask & QP_ATTR_PATH_MTU != 0 && mtu_bytes(attr.path_mtu) == 0)
        || (mask & QP_ATTR_RETRY_CNT != 0 && attr.retry_cnt > 7)
        || (mask & QP_ATTR_RNR_RETRY != 0 && attr.rnr_retry > 7)
        || (mask & QP_ATTR_MIN_RNR_TIMER != 0 && attr.min_rnr_timer > 31)
        || (mask & QP_ATTR_TIMEOUT != 0 && attr.timeout > 31)
        || (mask & QP_ATTR_RQ_PSN != 0 && attr.rq_psn > 0xff_ffff)
        || (mask & QP_ATTR_SQ_PSN != 0 && attr.sq_psn > 0xff_ffff)
        || (mask & QP_ATTR_DEST_QPN != 0 && attr.dest_qp_num > 0xff_ffff)
        || (mask & QP_ATTR_MAX_QP_RD_ATOMIC != 0 && attr.max_rd_atomic as u32 > max_rd_atom)
        || (mask & QP_ATTR_MAX_DEST_RD_ATOMIC != 0 && attr.max_dest_rd_atomic as u32 > max_rd_atom)
        || (mask & QP_ATTR_AV != 0 && attr.ah_attr.sgid_index != 0);
    if bad {
        return Err(ModifyError::Invalid);
    }
    let rc = qp_type == QPT_RC;
    macro_rules! take {
        ($bit:expr, $field:ident) => {
            if mask & $bit != 0 {
                cur.$field = attr.$field;
            }
        };
    }
    take!(QP_ATTR_ACCESS_FLAGS, qp_access_flags);
    take!(QP_ATTR_PKEY_INDEX, pkey_index);
    take!(QP_ATTR_PORT, port_num);
    take!(QP_ATTR_QKEY, qkey);
    take!(QP_ATTR_SQ_PSN, sq_psn);
    if rc {
        take!(QP_ATTR_AV, ah_attr);
        take!(QP_ATTR_PATH_MTU, path_mtu);
        take!(QP_ATTR_TIMEOUT, timeout);
        take!(QP_ATTR_RETRY_CNT, retry_cnt);
        take!(QP_ATTR_RNR_RETRY, rnr_retry);
        take!(QP_ATTR_RQ_PSN, rq_psn);
        take!(QP_ATTR_MAX_QP_RD_ATOMIC, max_rd_atomic);
        take!(QP_ATTR_MIN_RNR_TIMER, min_rnr_timer);
        take!(QP_ATTR_MAX_DEST_RD_ATOMIC, max_dest_rd_atomic);
        take!(QP_ATTR_DEST_QPN, dest_qp_num);
    }
    cur.qp_state = new_state;
    Ok(())
}

/// RNR NAK timer code → microseconds (IB spec table 45).
pub fn rnr_timer_us(code: u8) -> u64 {
    const T: [u64; 32] = [
        655_360, 10, 20, 30, 40, 60, 80, 120, 160, 240, 320, 480, 640, 960, 1280, 1920, 2560, 3840,
        5120, 7680, 10240, 15360, 20480, 30720, 40960, 61440, 81920, 122_880, 163_840, 245_760,
        327_680, 491_520,
    ];
    T[(code & 31) as usize]
}

/// Local ACK timeout exponent → microseconds (4.096 µs × 2^t); `None` for 0 (infinite).
pub fn ack_timeout_us(t: u8) -> Option<u64> {
    (t != 0).then(|| (4096u64 << (t.min(31) as u64)) / 1000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use abi::*;

    fn rc_init() -> (u32, QpAttr) {
        let a = QpAttr {
            qp_state: QPS_INIT,
            port_num: 1,
            qp_access_flags: ACCESS_REMOTE_WRITE,
            ..Default::default()
        };
        (
            QP_ATTR_STATE | QP_ATTR_PKEY_INDEX | QP_ATTR_PORT | QP_ATTR_ACCESS_FLAGS,
            a,
        )
    }

    #[test]
    fn rc_walks_reset_to_rts() {
        let mut cur = QpAttr::default();
        let (m, a) = rc_init();
        apply_modify(QPT_RC, &mut cur, m, &a, 16).unwrap();
        assert_eq!(cur.qp_state, QPS_INIT);
        let rtr = QpAttr {
            qp_state: QPS_RTR,
            path_mtu: MTU_4096,
            dest_qp_num: 0x123,
            rq_psn: 5,
            max_dest_rd_atomic: 4,
            min_rnr_timer: 1,
            ..Default::default()
        };
        let m = QP_ATTR_STATE
            | QP_ATTR_AV
            | QP_ATTR_PATH_MTU
            | QP_ATTR_DEST_QPN
            | QP_ATTR_RQ_PSN
            | QP_ATTR_MAX_DEST_RD_ATOMIC;
        // Missing MIN_RNR_TIMER.
        assert_eq!(
            apply_modify(QPT_RC, &mut cur, m, &rtr, 16),
            Err(ModifyError::Invalid)
        );
        apply_modify(QPT_RC, &mut cur, m | QP_ATTR_MIN_RNR_TIMER, &rtr, 16).unwrap();
        assert_eq!(cur.dest_qp_num, 0x123);
        // RTR → RESET → RTS is not allowed.
        let rts = QpAttr {
            qp_state: QPS_RTS,
            ..Default::default()
        };
        let mut reset = cur;
        reset.qp_state = QPS_RESET;
        assert_eq!(
            apply_modify(QPT_RC, &mut reset, QP_ATTR_STATE | QP_ATTR_SQ_PSN, &rts, 16),
            Err(ModifyError::BadState)
        );
    }

    #[test]
    fn rejects_out_of_range_values_and_unknown_bits() {
        let mut cur = QpAttr::default();
        let (m, mut a) = rc_init();
        a.port_num = 2;
        assert_eq!(
            apply_modify(QPT_RC, &mut cur, m, &a, 16),
            Err(ModifyError::Invalid)
        );
        let (m, a) = rc_init();
        assert_eq!(
            apply_modify(QPT_RC, &mut cur, m | (1 << 30), &a, 16),
            Err(ModifyError::Invalid)
        );
        let bad = QpAttr {
            qp_state: 99,
            ..Default::default()
        };
        assert_eq!(
            apply_modify(QPT_RC, &mut cur, QP_ATTR_STATE, &bad, 16),
            Err(ModifyError::Invalid)
        );
        assert_eq!(cur.qp_state, QPS_RESET);
    }

    #[test]
    fn timers() {
        assert_eq!(rnr_timer_us(1), 10);
        assert_eq!(rnr_timer_us(0), 655_360);
        assert_eq!(ack_timeout_us(0), None);
        assert_eq!(ack_timeout_us(10), Some(4194));
    }
}
