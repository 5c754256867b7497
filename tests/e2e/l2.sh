#!/bin/sh
# Runs in the L2 guest (booted by vrdma-vmm): enumerates the virtio-mmio devices described by
# ACPI, loads vrdma.ko and reports what happened as `L2: ...` lines.
echo "L2: kernel $(uname -r), $(nproc) CPUs, $(awk '/MemTotal/{print $2 " kB"}' /proc/meminfo)"
modprobe virtio_mmio || echo "L2: modprobe virtio_mmio failed"
for d in /sys/bus/virtio/devices/*; do
    [ -e "$d" ] || continue
    echo "L2: VIRTIO_DEV $(basename "$d") device=$(cat "$d/device") vendor=$(cat "$d/vendor") features=$(cat "$d/features")"
done
insmod /vrdma/vrdma.ko
echo "L2: INSMOD rc=$?"
[ -d /sys/module/vrdma ] && echo "L2: MODULE_LOADED vrdma"
for d in /sys/bus/virtio/devices/*; do
    [ -e "$d/driver" ] && echo "L2: BOUND $(basename "$d") driver=$(basename "$(readlink "$d/driver")")"
done
grep -E "virtio|vrdma" /proc/interrupts | sed 's/^/L2: IRQ /'
dmesg | grep -iE "vrdma|virtio|LNRO" | sed 's/^/L2: DMESG /'
rmmod vrdma && echo "L2: RMMOD ok"
# Console input: L1 types a line into vrdma-vmm's stdin when it sees this marker.
echo "L2: WAITING_INPUT"
line=$(timeout 30 head -n 1)
echo "L2: CONSOLE_INPUT '$line'"
dmesg | grep -E "vrdma device removed" | sed 's/^/L2: DMESG /'
