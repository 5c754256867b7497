// SPDX-License-Identifier: (GPL-2.0 OR BSD-3-Clause)
/*
 * vrdma control queue (docs/abi.md §7): one descriptor chain per command — CtrlHdr plus the
 * command structure device-readable, CtrlResp plus the response device-writable — executed in
 * order, completed through the queue-0 used-buffer interrupt.
 */
#include <linux/jiffies.h>
#include <linux/scatterlist.h>
#include <linux/slab.h>
#include <linux/virtio.h>

#include "vrdma.h"

#define VRDMA_CTRL_TIMEOUT_MS	5000

const char *vrdma_status_name(u32 status)
{
	static const char *const names[] = {
		[VRDMA_STATUS_OK] = "OK",
		[VRDMA_STATUS_INVALID] = "INVALID",
		[VRDMA_STATUS_NO_RESOURCE] = "NO_RESOURCE",
		[VRDMA_STATUS_BAD_HANDLE] = "BAD_HANDLE",
		[VRDMA_STATUS_BUSY] = "BUSY",
		[VRDMA_STATUS_BAD_STATE] = "BAD_STATE",
		[VRDMA_STATUS_UNSUPPORTED] = "UNSUPPORTED",
		[VRDMA_STATUS_BAD_ADDRESS] = "BAD_ADDRESS",
		[VRDMA_STATUS_BAD_LENGTH] = "BAD_LENGTH",
	};

	return status < ARRAY_SIZE(names) ? names[status] : "unknown";
}

void vrdma_ctrlq_done(struct virtqueue *vq)
{
	struct vrdma_dev *dev = vq->vdev->priv;

	complete(&dev->ctrl_done);
}

/*
 * Sends one control command and waits for its completion. On return 0, *status holds the
 * device's status and, if it is STATUS_OK, resp holds resp_len bytes of response.
 */
int vrdma_ctrl_cmd(struct vrdma_dev *dev, u32 cmd, const void *req, size_t req_len,
		   void *resp, size_t resp_len, u32 *status)
{
	struct scatterlist out, in, *sgs[2] = { &out, &in };
	size_t out_len = sizeof(struct vrdma_ctrl_hdr) + req_len;
	size_t in_len = sizeof(struct vrdma_ctrl_resp) + resp_len;
	unsigned long deadline = jiffies + msecs_to_jiffies(VRDMA_CTRL_TIMEOUT_MS);
	struct vrdma_ctrl_hdr *hdr;
	struct vrdma_ctrl_resp *rhdr;
	unsigned long flags;
	unsigned int len = 0;
	void *buf, *got = NULL;
	int err;

	/* The device reads and writes these bytes by guest-physical address: not on the stack. */
	buf = kzalloc(out_len + in_len, GFP_KERNEL);
	if (!buf)
		return -ENOMEM;
	hdr = buf;
	hdr->cmd = cpu_to_le32(cmd);
	hdr->flags = 0;
	if (req_len)
		memcpy(hdr + 1, req, req_len);
	rhdr = buf + out_len;
	sg_init_one(&out, hdr, out_len);
	sg_init_one(&in, rhdr, in_len);

	mutex_lock(&dev->ctrl_mutex);
	reinit_completion(&dev->ctrl_done);
	spin_lock_irqsave(&dev->ctrl_lock, flags);
	err = virtqueue_add_sgs(dev->ctrlq, sgs, 1, 1, buf, GFP_ATOMIC);
	if (!err)
		virtqueue_kick(dev->ctrlq);
	spin_unlock_irqrestore(&dev->ctrl_lock, flags);
	if (err) {
		mutex_unlock(&dev->ctrl_mutex);
		kfree(buf);
		return err;
	}

	while (!got) {
		long left = (long)deadline - (long)jiffies;

		if (left <= 0 || !wait_for_completion_timeout(&dev->ctrl_done, left))
			break;
		spin_lock_irqsave(&dev->ctrl_lock, flags);
		got = virtqueue_get_buf(dev->ctrlq, &len);
		spin_unlock_irqrestore(&dev->ctrl_lock, flags);
		reinit_completion(&dev->ctrl_done);
	}
	if (!got) {
		/* Still owned by the device: leak it rather than let the device write freed memory. */
		spin_lock_irqsave(&dev->ctrl_lock, flags);
		got = virtqueue_get_buf(dev->ctrlq, &len);
		spin_unlock_irqrestore(&dev->ctrl_lock, flags);
		if (!got) {
			mutex_unlock(&dev->ctrl_mutex);
			dev_err(&dev->vdev->dev, "control command %u timed out\n", cmd);
			return -ETIMEDOUT;
		}
	}
	mutex_unlock(&dev->ctrl_mutex);

	if (got != buf) {
		dev_err(&dev->vdev->dev, "control queue returned an unknown buffer\n");
		kfree(buf);
		return -EIO;
	}
	if (len < sizeof(*rhdr)) {
		dev_err(&dev->vdev->dev, "command %u: response of %u bytes\n", cmd, len);
		kfree(buf);
		return -EIO;
	}
	*status = le32_to_cpu(rhdr->status);
	if (*status == VRDMA_STATUS_OK && resp_len) {
		if (len < in_len) {
			dev_err(&dev->vdev->dev, "command %u: short response (%u of %zu bytes)\n",
				cmd, len, in_len);
			kfree(buf);
			return -EIO;
		}
		memcpy(resp, rhdr + 1, resp_len);
	}
	kfree(buf);
	return 0;
}
