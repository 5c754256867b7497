#!/usr/bin/env bash
# End-to-end test: vrdma-vmm boots a real Linux guest with vrdma devices, and the Linux module
# binds them and talks to them.
#
#   host ── QEMU TCG (SVM emulated) ── L1 Debian guest: kvm_amd + vrdma-vmm ── L2 Debian guest:
#                                                      virtio_mmio (ACPI LNRO0005) + vrdma.ko
#
# The host's /dev/kvm cannot boot a stock kernel (see shared/reference/guest-testing.md), so the
# VMM runs one level down, on KVM inside a TCG guest. Nothing in vrdma-vmm is specific to that:
# the same binary boots the same L2 guest directly on a normal KVM host.
#
# Stages: install packages (if missing) → build vrdma-vmm and vrdma.ko → build (or reuse) the
# Debian guest root (target/e2e/base.cpio.gz) → pack L2 and L1 initrds → boot L1 → check the
# L2 serial log. Prints `RESULT PASS|FAIL name detail` lines and a last line
# `N passed, N failed`; exits non-zero on any failure. Every stage has a timeout.
#
# `run.sh rxe-interop` runs the rdma_rxe interop suite instead (tests/e2e/rxe-interop.sh).
#
# Environment: E2E_DIR (default target/e2e), E2E_L2_VCPUS (2), E2E_L2_VRDMA (2),
# E2E_L2_MEMORY (1G), E2E_L2_CMDLINE_EXTRA (appended to L2's command line), E2E_VMM_LOG_LEVEL (info), E2E_QEMU_TIMEOUT (900 s).
set -uo pipefail

# `run.sh rxe-interop`: the rdma_rxe interop suite (tests/e2e/rxe-interop.sh). Without an
# argument: the vrdma-vmm suite below.
case ${1:-} in
"") ;;
rxe-interop)
    shift
    exec bash "$(dirname "$0")/rxe-interop.sh" "$@"
    ;;
*)
    echo "usage: $0 [rxe-interop]" >&2
    exit 2
    ;;
esac

repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
out=${E2E_DIR:-$repo/target/e2e}
mkdir -p "$out"
out=$(cd "$out" && pwd)
l2_vcpus=${E2E_L2_VCPUS:-2}
l2_vrdma=${E2E_L2_VRDMA:-2}
l2_memory=${E2E_L2_MEMORY:-1G}
qemu_timeout=${E2E_QEMU_TIMEOUT:-900}
t_start=$(date +%s)

passed=0
failed=0
result() { # result PASS|FAIL name detail...
    local verdict=$1 name=$2
    shift 2
    echo "RESULT $verdict $name $*"
    if [[ $verdict == PASS ]]; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
}
finish() {
    echo "e2e: total $(($(date +%s) - t_start)) s"
    echo "$passed passed, $failed failed"
    [[ $failed -eq 0 ]]
    exit $?
}
stage() { echo "== e2e: $* ($(($(date +%s) - t_start)) s)"; }

# ------------------------------------------------------------------------------------------
stage "packages"
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v cpio >/dev/null || need+=(cpio)
command -v modprobe >/dev/null || need+=(kmod)
command -v make >/dev/null || need+=(make)
command -v gcc >/dev/null || need+=(gcc)
dpkg -s linux-image-amd64 >/dev/null 2>&1 || need+=(linux-image-amd64)
dpkg -s linux-headers-amd64 >/dev/null 2>&1 || need+=(linux-headers-amd64)
if ((${#need[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        result FAIL packages "missing ${need[*]} and not root: apt-get install -y ${need[*]}"
        finish
    fi
    echo "installing: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if timeout 300 apt-get update -q >"$out/apt.log" 2>&1 &&
        timeout 900 apt-get install -y -q --no-install-recommends "${need[@]}" >>"$out/apt.log" 2>&1; then
        result PASS packages "installed ${need[*]}"
    else
        tail -20 "$out/apt.log"
        result FAIL packages "apt-get install ${need[*]} failed (see $out/apt.log)"
        finish
    fi
else
    result PASS packages "all present"
fi
# The guest kernel version comes from the package, never from the host's uname -r.
kver=$(dpkg-query -W -f='${Depends}' linux-image-amd64 | grep -o 'linux-image-[0-9][^ ,]*' | head -1 | sed 's/^linux-image-//')
kernel=/boot/vmlinuz-$kver
headers=/usr/src/linux-headers-$kver
if [[ -z $kver || ! -f $kernel || ! -d $headers ]]; then
    result FAIL packages "kernel '$kver': $kernel or $headers missing (linux-image-amd64 and linux-headers-amd64 must match)"
    finish
fi
echo "guest kernel $kver"

# ------------------------------------------------------------------------------------------
stage "build vrdma-vmm"
if timeout 1200 cargo build --release -p vrdma-vmm >"$out/cargo.log" 2>&1; then
    vmm=$repo/target/release/vrdma-vmm
    result PASS build-vmm "$(du -h "$vmm" | cut -f1)"
else
    tail -30 "$out/cargo.log"
    result FAIL build-vmm "cargo build failed (see $out/cargo.log)"
    finish
fi

stage "build vrdma.ko"
mod=$out/module
rm -rf "$mod"
mkdir -p "$mod"
cp "$repo"/guest-driver/linux/{Kbuild,Makefile,*.c,*.h} "$mod/"
if timeout 300 make -C "$headers" M="$mod" modules >"$out/module.log" 2>&1 && [[ -f $mod/vrdma.ko ]]; then
    warnings=$(grep -c "warning:" "$out/module.log" || true)
    result PASS build-module "vrdma.ko for $kver ($warnings compiler warnings)"
else
    tail -30 "$out/module.log"
    result FAIL build-module "make failed (see $out/module.log)"
    finish
fi

stage "guest root"
if timeout 900 bash "$repo/tests/e2e/build-base.sh" "$out" "$kver"; then
    result PASS guest-root "$(du -h "$out/base.cpio.gz" | cut -f1) base.cpio.gz"
else
    result FAIL guest-root "build-base.sh failed"
    finish
fi

# ------------------------------------------------------------------------------------------
stage "initrds"
pack() { # pack DIR OUT: an overlay cpio
    # No entries for existing directories: an overlay's ./lib would replace the base's
    # /lib -> usr/lib symlink (merged /usr) and break every binary.
    (cd "$1" && find . -mindepth 1 | cpio -o -H newc --quiet | gzip -1) >"$2"
}
l2=$out/l2-overlay
l1=$out/l1-overlay
rm -rf "$l2" "$l1"
mkdir -p "$l2/tests" "$l2/vrdma" "$l1/tests" "$l1/l2"
cp "$mod/vrdma.ko" "$l2/vrdma/vrdma.ko"
cp "$repo/tests/e2e/l2.sh" "$l2/tests/l2.sh"
pack "$l2" "$out/l2-overlay.cpio.gz"
cat "$out/base.cpio.gz" "$out/l2-overlay.cpio.gz" >"$l1/l2/initrd.gz"
cp "$kernel" "$l1/l2/vmlinuz"
objcopy --strip-debug "$vmm" "$l1/vrdma-vmm" 2>/dev/null || cp "$vmm" "$l1/vrdma-vmm"
cp "$repo/tests/e2e/l1.sh" "$l1/tests/l1.sh"
cat >"$l1/tests/l1.env" <<EOF
L2_VCPUS=$l2_vcpus
L2_VRDMA=$l2_vrdma
L2_MEMORY=$l2_memory
L2_CMDLINE_EXTRA="${E2E_L2_CMDLINE_EXTRA:-}"
L2_VMM_LOG_LEVEL="${E2E_VMM_LOG_LEVEL:-info}"
EOF
pack "$l1" "$out/l1-overlay.cpio.gz"
cat "$out/base.cpio.gz" "$out/l1-overlay.cpio.gz" >"$out/l1-initrd.gz"
echo "L1 initrd $(du -h "$out/l1-initrd.gz" | cut -f1)"

# ------------------------------------------------------------------------------------------
stage "boot L1 (QEMU TCG, emulated SVM) → vrdma-vmm → L2"
log=$out/l1-serial.log
t_boot=$(date +%s)
timeout -k 10 "$qemu_timeout" qemu-system-x86_64 -accel tcg -cpu qemu64,+svm,+npt,vendor=AuthenticAMD \
    -m 3G -smp 2 -nographic -no-reboot -nic none \
    -kernel "$kernel" -initrd "$out/l1-initrd.gz" \
    -append "console=ttyS0 panic=-1 run=l1" </dev/null >"$log" 2>&1
qemu_rc=$?
t_qemu=$(($(date +%s) - t_boot))
echo "QEMU exited rc=$qemu_rc after $t_qemu s; serial log: $log"
tr -d '\r' <"$log" >"$log.txt"
L=$log.txt

# ------------------------------------------------------------------------------------------
stage "checks"
if grep -q "^=== END l1" "$L"; then
    result PASS l1-boot "L1 ran its test script (QEMU $t_qemu s)"
else
    result FAIL l1-boot "L1 did not finish its test script (QEMU rc=$qemu_rc after $t_qemu s)"
fi
if grep -q "^L1: KVM_READY" "$L"; then
    result PASS l1-kvm "$(grep -m1 '^L1: KVM_READY' "$L" | cut -d' ' -f3-)"
else
    result FAIL l1-kvm "no /dev/kvm in L1 after modprobe kvm_amd"
fi

vmm_start=$(sed -n 's/^L1: VMM_START t=//p' "$L" | head -1)
init_line=$(grep -m1 "^L2| [0-9.]* === INIT" "$L" || true)
if [[ -n $vmm_start && -n $init_line ]]; then
    t_init=$(awk -v a="$vmm_start" -v b="$(echo "$init_line" | cut -d' ' -f2)" 'BEGIN{printf "%.1f", b-a}')
    if awk -v t="$t_init" 'BEGIN{exit !(t <= 60)}'; then
        result PASS l2-init "L2 reached /init ${t_init} s after the VMM started (target ≤ 60 s)"
    else
        result FAIL l2-init "L2 reached /init only ${t_init} s after the VMM started (target ≤ 60 s)"
    fi
else
    result FAIL l2-init "L2 never reached /init"
fi

ndev=$(grep -c "^L2| [0-9.]* L2: VIRTIO_DEV .* device=0x002a" "$L" || true)
if [[ $ndev -eq $l2_vrdma ]]; then
    result PASS l2-virtio-device-42 "$ndev virtio devices with ID 42 under /sys/bus/virtio/devices"
else
    result FAIL l2-virtio-device-42 "found $ndev devices with ID 42, expected $l2_vrdma"
fi

nbound=$(grep -c "^L2| [0-9.]* L2: BOUND .* driver=vrdma" "$L" || true)
if grep -q "^L2| [0-9.]* L2: MODULE_LOADED vrdma" "$L" && [[ $nbound -eq $l2_vrdma ]]; then
    result PASS l2-module "vrdma.ko loaded and bound to $nbound devices"
else
    result FAIL l2-module "module loaded: $(grep -c 'L2: MODULE_LOADED' "$L"), bound devices: $nbound of $l2_vrdma"
fi

# Each device's lines appear twice in the log (the kernel console and L2's dmesg dump); the nested
# serial consoles can garble characters under load, so count the distinct devices whose line
# arrived intact at least once.
nquery=$(grep -o "vrdma virtio[0-9]*: QUERY_DEVICE: abi_version=1 .*max_qp=[1-9]" "$L" | grep -o "virtio[0-9]*" | sort -u | wc -l)
nmatch=$(grep -o "vrdma virtio[0-9]*: QUERY_DEVICE matches the configuration space" "$L" | grep -o "virtio[0-9]*" | sort -u | wc -l)
if [[ $nquery -eq $l2_vrdma && $nmatch -eq $l2_vrdma ]]; then
    result PASS l2-query-device "$(grep -m1 'L2: DMESG .*QUERY_DEVICE: abi_version' "$L" | sed 's/.*QUERY_DEVICE: //')"
else
    result FAIL l2-query-device "QUERY_DEVICE answers: $nquery, matching config space: $nmatch, expected $l2_vrdma"
fi

if grep -q "^L2| [0-9.]* L2: IRQ .*vrdma\|^L2| [0-9.]* L2: IRQ .*virtio" "$L"; then
    irqs=$(grep "^L2| [0-9.]* L2: IRQ " "$L" | sed 's/.*L2: IRQ *//' | tr -s ' ' | head -2 | paste -sd ';')
    result PASS l2-interrupts "$irqs"
else
    result FAIL l2-interrupts "no virtio interrupt lines in L2's /proc/interrupts"
fi

if grep -q "^L2| [0-9.]* L2: CONSOLE_INPUT 'typed-into-the-vmm-stdin'" "$L"; then
    result PASS l2-console-input "a line written to vrdma-vmm's stdin was read by L2 from its console"
else
    result FAIL l2-console-input "L2 did not read the line written to vrdma-vmm's stdin"
fi

vmm_exit=$(sed -n 's/^L1: VMM_EXIT rc=\([0-9]*\).*/\1/p' "$L" | head -1)
if [[ $vmm_exit == 0 ]] && grep -q "guest stopped (PowerOff)" "$L"; then
    result PASS l2-poweroff "L2 powered off through ACPI S5; vrdma-vmm exited 0 ($(sed -n 's/^L1: VMM_EXIT rc=0 //p' "$L" | head -1))"
else
    result FAIL l2-poweroff "vrdma-vmm exit status '${vmm_exit:-none}'"
fi

if ((failed)); then
    echo "---- last 60 lines of the L1 serial log ($L)"
    tail -60 "$L"
fi
finish
