#!/usr/bin/env bash
# Builds the Debian guest root as a gzip'd newc cpio (the recipe of guest-testing.md):
# debootstrap minbase + rdma-core tools, the kernel modules the tests need (dependency closure),
# and a generic /init that runs /tests/<name>.sh for each name in `run=a,b` on the kernel
# command line, prints `=== BEGIN name` / `=== END name rc=N` markers and powers off.
#
# Usage: build-base.sh OUT_DIR KVER
# Produces OUT_DIR/base.cpio.gz. Rebuilt only when KVER or this script changes (OUT_DIR/base.stamp).
set -euo pipefail
out=$1
kver=$2
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
stamp="$kver $(sha256sum "$here/build-base.sh" | cut -c1-16)"
if [[ -f $out/base.cpio.gz && -f $out/base.stamp && "$(cat "$out/base.stamp")" == "$stamp" ]]; then
    echo "base: cached ($out/base.cpio.gz)"
    exit 0
fi
root=$out/base-root
rm -rf "$root" "$out/base.cpio.gz" "$out/base.stamp"
echo "base: debootstrap (bookworm, minbase)"
timeout 600 debootstrap --variant=minbase \
    --include=rdma-core,ibverbs-providers,ibverbs-utils,perftest,rdmacm-utils,iproute2,kmod,procps \
    bookworm "$root" >"$out/debootstrap.log" 2>&1 || {
    echo "base: debootstrap failed; last lines of $out/debootstrap.log:" >&2
    tail -20 "$out/debootstrap.log" >&2
    exit 1
}
rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* \
    "$root"/usr/share/{doc,man,locale,info}

echo "base: kernel modules for $kver"
mods="kvm kvm_amd virtio_mmio virtio_pci rdma_rxe ib_uverbs rdma_ucm dummy crc32_generic"
for m in $mods; do
    modprobe -S "$kver" --show-depends "$m" | awk '$1=="insmod"{print $2}'
done | sort -u | while read -r f; do
    mkdir -p "$root$(dirname "$f")"
    cp "$f" "$root$f"
done
cp /lib/modules/"$kver"/modules.order /lib/modules/"$kver"/modules.builtin* "$root/lib/modules/$kver/"
depmod -b "$root" "$kver"

cat >"$root/init" <<'INIT'
#!/bin/sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
echo "=== INIT uptime=$(cut -d' ' -f1 /proc/uptime)"
run=$(tr ' ' '\n' </proc/cmdline | sed -n 's/^run=//p')
for t in $(echo "$run" | tr ',' ' '); do
    echo "=== BEGIN $t"
    sh "/tests/$t.sh"
    echo "=== END $t rc=$?"
done
echo "=== POWEROFF uptime=$(cut -d' ' -f1 /proc/uptime)"
echo o >/proc/sysrq-trigger
sleep 10
INIT
chmod +x "$root/init"
mkdir -p "$root/tests"

echo "base: packing"
(cd "$root" && find . -xdev | cpio -o -H newc --quiet | gzip -1) >"$out/base.cpio.gz.tmp"
mv "$out/base.cpio.gz.tmp" "$out/base.cpio.gz"
rm -rf "$root"
echo "$stamp" >"$out/base.stamp"
echo "base: built $out/base.cpio.gz ($(du -h "$out/base.cpio.gz" | cut -f1))"
