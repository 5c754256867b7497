/* SPDX-License-Identifier: (GPL-2.0 OR BSD-3-Clause) */
/* vrdma Linux driver: per-device state shared by the driver's files. */
#ifndef VRDMA_H
#define VRDMA_H

#include <linux/completion.h>
#include <linux/mutex.h>
#include <linux/spinlock.h>
#include <linux/virtio.h>

#include "vrdma_abi.h"

#define VRDMA_EVENT_BUFS	32

struct vrdma_dev {
	struct virtio_device *vdev;
	struct virtqueue *ctrlq;
	struct virtqueue *eventq;

	/* Control queue: one request in flight at a time (ctrl_mutex), completed from the
	 * queue's callback (ctrl_lock protects the virtqueue). */
	struct mutex ctrl_mutex;
	spinlock_t ctrl_lock;
	struct completion ctrl_done;

	/* Event queue buffers (device-writable, EVENT_SIZE each). */
	spinlock_t event_lock;
	struct vrdma_event *events;

	struct vrdma_config attr;	/* QUERY_DEVICE answer */
};

/* vrdma_ctrl.c */
int vrdma_ctrl_cmd(struct vrdma_dev *dev, u32 cmd, const void *req, size_t req_len,
		   void *resp, size_t resp_len, u32 *status);
void vrdma_ctrlq_done(struct virtqueue *vq);
const char *vrdma_status_name(u32 status);

#endif /* VRDMA_H */
