/* SPDX-License-Identifier: (GPL-2.0 OR BSD-3-Clause) */
/*
 * vrdma guest ABI, revision 1: the subset this driver uses, transcribed from docs/abi.md
 * (sections 3, 4, 5, 7 and 12). All multi-byte fields are little-endian.
 */
#ifndef VRDMA_ABI_H
#define VRDMA_ABI_H

#include <linux/types.h>
#include <linux/build_bug.h>

/* Virtio device ID (docs/abi.md header). */
#define VIRTIO_ID_VRDMA			42

/* §3 Feature bits. */
#define VRDMA_F_UD			0
#define VRDMA_F_ATOMICS			1
#define VRDMA_F_DB_SUPPRESSION		2
#define VRDMA_F_INTR_MODERATION		3

/* §17 ABI revision this driver implements. */
#define VRDMA_ABI_VERSION		1

/* §4 Virtqueues. */
#define VRDMA_CTRLQ			0
#define VRDMA_EVENTQ			1
#define VRDMA_NUM_QUEUES		2

/* §7.5 Commands (the ones this driver sends). */
#define VRDMA_CMD_QUERY_DEVICE		1

/* §7.3 Status codes. */
#define VRDMA_STATUS_OK			0
#define VRDMA_STATUS_INVALID		1
#define VRDMA_STATUS_NO_RESOURCE	2
#define VRDMA_STATUS_BAD_HANDLE		3
#define VRDMA_STATUS_BUSY		4
#define VRDMA_STATUS_BAD_STATE		5
#define VRDMA_STATUS_UNSUPPORTED	6
#define VRDMA_STATUS_BAD_ADDRESS	7
#define VRDMA_STATUS_BAD_LENGTH		8

/* §12 Event kinds. */
#define VRDMA_EV_CQ_COMP		1
#define VRDMA_EV_CQ_ERR			2
#define VRDMA_EV_QP_FATAL		3
#define VRDMA_EV_SQ_DRAINED		4
#define VRDMA_EV_OVERFLOW		5

/* §7.1 Control request header and response header. */
struct vrdma_ctrl_hdr {
	__le32 cmd;
	__le32 flags;		/* MUST be 0 */
};

struct vrdma_ctrl_resp {
	__le32 status;
	__le32 reserved;
};

/* §5 Configuration space; also the CMD_QUERY_DEVICE response (104 bytes). */
struct vrdma_config {
	__le32 abi_version;
	__le32 phys_port_cnt;
	__le32 max_qp;
	__le32 max_qp_wr;
	__le32 max_sge;
	__le32 max_inline;
	__le32 max_cq;
	__le32 max_cqe;
	__le32 max_mr;
	__le32 max_pd;
	__le32 max_ah;
	__le32 max_qp_rd_atom;
	__le32 gid_tbl_len;
	__le32 max_mr_pages;
	__le32 max_ring_pages;
	__le32 doorbell_area_size;
	__le64 max_mr_size;
	__le64 page_size_cap;
	__le64 node_guid;
	__le64 max_total_mr_pages;
	__le64 max_total_ring_pages;
};

/* §12.1 Event (16 bytes). */
struct vrdma_event {
	__le32 kind;
	__le32 handle;
	__le64 detail;
};

static inline void vrdma_abi_checks(void)
{
	BUILD_BUG_ON(sizeof(struct vrdma_ctrl_hdr) != 8);
	BUILD_BUG_ON(sizeof(struct vrdma_ctrl_resp) != 8);
	BUILD_BUG_ON(sizeof(struct vrdma_config) != 104);
	BUILD_BUG_ON(sizeof(struct vrdma_event) != 16);
}

#endif /* VRDMA_ABI_H */
