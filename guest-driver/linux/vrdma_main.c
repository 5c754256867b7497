// SPDX-License-Identifier: (GPL-2.0 OR BSD-3-Clause)
/*
 * vrdma: Linux driver for the vrdma paravirtual RDMA device (virtio device ID 42).
 *
 * This first stage binds the device, negotiates features, brings it up in the order of
 * docs/abi.md §6 (features, abi_version check, control and event queues, DRIVER_OK, event
 * buffers), sends CMD_QUERY_DEVICE on the control queue and prints the answer. The ib_core
 * driver (ib_device registration and verbs) builds on this layout.
 */
#include <linux/module.h>
#include <linux/scatterlist.h>
#include <linux/slab.h>
#include <linux/virtio.h>
#include <linux/virtio_config.h>

#include "vrdma.h"

static void vrdma_fill_eventq(struct vrdma_dev *dev)
{
	struct scatterlist sg;
	unsigned long flags;
	bool added = false;
	int i;

	spin_lock_irqsave(&dev->event_lock, flags);
	for (i = 0; i < VRDMA_EVENT_BUFS; i++) {
		sg_init_one(&sg, &dev->events[i], sizeof(dev->events[i]));
		if (virtqueue_add_inbuf(dev->eventq, &sg, 1, &dev->events[i], GFP_ATOMIC))
			break;
		added = true;
	}
	/* Notifying queue 1 is also the doorbell (§8); with no rings yet it only stocks. */
	if (added)
		virtqueue_kick(dev->eventq);
	spin_unlock_irqrestore(&dev->event_lock, flags);
}

static void vrdma_eventq_done(struct virtqueue *vq)
{
	struct vrdma_dev *dev = vq->vdev->priv;
	struct vrdma_event *ev;
	struct scatterlist sg;
	unsigned long flags;
	unsigned int len;
	bool again = false;

	spin_lock_irqsave(&dev->event_lock, flags);
	while ((ev = virtqueue_get_buf(vq, &len))) {
		if (len >= sizeof(*ev))
			dev_info(&dev->vdev->dev, "event kind %u handle %#x detail %llu\n",
				 le32_to_cpu(ev->kind), le32_to_cpu(ev->handle),
				 le64_to_cpu(ev->detail));
		/* Re-post the buffer. */
		sg_init_one(&sg, ev, sizeof(*ev));
		if (!virtqueue_add_inbuf(vq, &sg, 1, ev, GFP_ATOMIC))
			again = true;
	}
	if (again)
		virtqueue_kick(vq);
	spin_unlock_irqrestore(&dev->event_lock, flags);
}

static void vrdma_print_attr(struct vrdma_dev *dev, const char *what,
			     const struct vrdma_config *a)
{
	dev_info(&dev->vdev->dev,
		 "%s: abi_version=%u phys_port_cnt=%u max_qp=%u max_qp_wr=%u max_sge=%u max_inline=%u max_cq=%u max_cqe=%u max_mr=%u max_pd=%u max_ah=%u max_qp_rd_atom=%u gid_tbl_len=%u\n",
		 what, le32_to_cpu(a->abi_version), le32_to_cpu(a->phys_port_cnt),
		 le32_to_cpu(a->max_qp), le32_to_cpu(a->max_qp_wr), le32_to_cpu(a->max_sge),
		 le32_to_cpu(a->max_inline), le32_to_cpu(a->max_cq), le32_to_cpu(a->max_cqe),
		 le32_to_cpu(a->max_mr), le32_to_cpu(a->max_pd), le32_to_cpu(a->max_ah),
		 le32_to_cpu(a->max_qp_rd_atom), le32_to_cpu(a->gid_tbl_len));
	dev_info(&dev->vdev->dev,
		 "%s: max_mr_pages=%u max_ring_pages=%u doorbell_area_size=%u max_mr_size=%llu page_size_cap=%#llx node_guid=%#llx max_total_mr_pages=%llu max_total_ring_pages=%llu\n",
		 what, le32_to_cpu(a->max_mr_pages), le32_to_cpu(a->max_ring_pages),
		 le32_to_cpu(a->doorbell_area_size), le64_to_cpu(a->max_mr_size),
		 le64_to_cpu(a->page_size_cap), le64_to_cpu(a->node_guid),
		 le64_to_cpu(a->max_total_mr_pages), le64_to_cpu(a->max_total_ring_pages));
}

static int vrdma_query_device(struct vrdma_dev *dev)
{
	struct vrdma_config cfg;
	u32 status;
	int err;

	err = vrdma_ctrl_cmd(dev, VRDMA_CMD_QUERY_DEVICE, NULL, 0, &dev->attr,
			     sizeof(dev->attr), &status);
	if (err)
		return err;
	if (status != VRDMA_STATUS_OK) {
		dev_err(&dev->vdev->dev, "QUERY_DEVICE failed: status %u (%s)\n", status,
			vrdma_status_name(status));
		return -EIO;
	}
	vrdma_print_attr(dev, "QUERY_DEVICE", &dev->attr);

	/* §5: CMD_QUERY_DEVICE returns the configuration space. */
	virtio_cread_bytes(dev->vdev, 0, &cfg, sizeof(cfg));
	if (memcmp(&cfg, &dev->attr, sizeof(cfg))) {
		vrdma_print_attr(dev, "config space", &cfg);
		dev_err(&dev->vdev->dev, "QUERY_DEVICE disagrees with the configuration space\n");
		return -EIO;
	}
	dev_info(&dev->vdev->dev, "QUERY_DEVICE matches the configuration space\n");
	return 0;
}

static int vrdma_probe(struct virtio_device *vdev)
{
	vq_callback_t *callbacks[VRDMA_NUM_QUEUES] = { vrdma_ctrlq_done, vrdma_eventq_done };
	static const char * const names[VRDMA_NUM_QUEUES] = { "ctrl", "event" };
	struct virtqueue *vqs[VRDMA_NUM_QUEUES];
	struct vrdma_dev *dev;
	u32 abi_version;
	int err;

	vrdma_abi_checks();

	/* §6 step 3: the virtio core negotiated features and set FEATURES_OK. */
	virtio_cread_le(vdev, struct vrdma_config, abi_version, &abi_version);
	if (abi_version != VRDMA_ABI_VERSION) {
		dev_err(&vdev->dev, "unsupported ABI version %u (driver implements %u)\n",
			abi_version, VRDMA_ABI_VERSION);
		return -ENODEV;
	}

	dev = kzalloc(sizeof(*dev), GFP_KERNEL);
	if (!dev)
		return -ENOMEM;
	dev->events = kcalloc(VRDMA_EVENT_BUFS, sizeof(*dev->events), GFP_KERNEL);
	if (!dev->events) {
		err = -ENOMEM;
		goto err_free;
	}
	dev->vdev = vdev;
	vdev->priv = dev;
	mutex_init(&dev->ctrl_mutex);
	spin_lock_init(&dev->ctrl_lock);
	spin_lock_init(&dev->event_lock);
	init_completion(&dev->ctrl_done);

	/* §6 step 4. */
	err = virtio_find_vqs(vdev, VRDMA_NUM_QUEUES, vqs, callbacks, names, NULL);
	if (err) {
		dev_err(&vdev->dev, "cannot set up the virtqueues: %d\n", err);
		goto err_free;
	}
	dev->ctrlq = vqs[VRDMA_CTRLQ];
	dev->eventq = vqs[VRDMA_EVENTQ];

	dev_info(&vdev->dev,
		 "vrdma device: abi_version %u, features %#llx (UD %d, ATOMICS %d, DB_SUPPRESSION %d, INTR_MODERATION %d), queues %u/%u\n",
		 abi_version, vdev->features,
		 virtio_has_feature(vdev, VRDMA_F_UD),
		 virtio_has_feature(vdev, VRDMA_F_ATOMICS),
		 virtio_has_feature(vdev, VRDMA_F_DB_SUPPRESSION),
		 virtio_has_feature(vdev, VRDMA_F_INTR_MODERATION),
		 virtqueue_get_vring_size(dev->ctrlq), virtqueue_get_vring_size(dev->eventq));

	/* §6 steps 5 and 6. */
	virtio_device_ready(vdev);
	vrdma_fill_eventq(dev);

	/* §6 step 7. */
	err = vrdma_query_device(dev);
	if (err)
		goto err_reset;
	dev_info(&vdev->dev, "vrdma device ready\n");
	return 0;

err_reset:
	virtio_reset_device(vdev);
	vdev->config->del_vqs(vdev);
err_free:
	kfree(dev->events);
	kfree(dev);
	vdev->priv = NULL;
	return err;
}

static void vrdma_remove(struct virtio_device *vdev)
{
	struct vrdma_dev *dev = vdev->priv;

	/* After the reset the device no longer touches our buffers (§15). */
	virtio_reset_device(vdev);
	vdev->config->del_vqs(vdev);
	kfree(dev->events);
	kfree(dev);
	dev_info(&vdev->dev, "vrdma device removed\n");
}

static unsigned int vrdma_features[] = {
	VRDMA_F_UD,
	VRDMA_F_ATOMICS,
	VRDMA_F_DB_SUPPRESSION,
	VRDMA_F_INTR_MODERATION,
};

static const struct virtio_device_id vrdma_id_table[] = {
	{ VIRTIO_ID_VRDMA, VIRTIO_DEV_ANY_ID },
	{ 0 },
};

static struct virtio_driver vrdma_driver = {
	.feature_table = vrdma_features,
	.feature_table_size = ARRAY_SIZE(vrdma_features),
	.driver.name = KBUILD_MODNAME,
	.driver.owner = THIS_MODULE,
	.id_table = vrdma_id_table,
	.probe = vrdma_probe,
	.remove = vrdma_remove,
};

module_virtio_driver(vrdma_driver);
MODULE_DEVICE_TABLE(virtio, vrdma_id_table);
MODULE_DESCRIPTION("vrdma paravirtual RDMA device driver (virtio device ID 42)");
MODULE_LICENSE("Dual BSD/GPL");
