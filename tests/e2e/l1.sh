#!/bin/bash
# Runs in the L1 guest (under QEMU TCG with emulated SVM): loads kvm_amd and runs vrdma-vmm with
# the L2 guest. Every line of the VMM's output (the L2 serial console and the VMM's own log) is
# printed as `L2| <L1 time> <line>`, so that the host can tell the two guests apart and time L2.
[ -z "${BASH_VERSION:-}" ] && exec bash "$0" "$@"
. /tests/l1.env

modprobe kvm_amd 2>&1
if [ -c /dev/kvm ]; then
    echo "L1: KVM_READY /dev/kvm present, kvm_amd npt=$(cat /sys/module/kvm_amd/parameters/npt 2>/dev/null)"
else
    echo "L1: KVM_MISSING"
    exit 1
fi

echo "L1: VMM_START t=$EPOCHREALTIME"
start=$EPOCHREALTIME
# stdin: a FIFO held open read-write here, so the console input is pollable and never hits EOF
# (not /dev/null). When L2 asks for input, one line is typed into it.
mkfifo /tmp/vmm.in
exec 5<>/tmp/vmm.in
(
    timeout -k 5 300 /vrdma-vmm --kernel /l2/vmlinuz --initrd /l2/initrd.gz \
        --memory "$L2_MEMORY" --vcpus "$L2_VCPUS" --vrdma "$L2_VRDMA" --log-level "${L2_VMM_LOG_LEVEL:-info}" \
        --cmdline "console=ttyS0 panic=-1 run=l2 $L2_CMDLINE_EXTRA" </tmp/vmm.in 2>&1
    echo $? >/tmp/vmm.rc
) | while IFS= read -r line; do
    printf 'L2| %s %s\n' "$EPOCHREALTIME" "$line"
    case $line in
    *"L2: WAITING_INPUT"*) echo "typed-into-the-vmm-stdin" >&5 ;;
    esac
done
end=$EPOCHREALTIME
echo "L1: VMM_EXIT rc=$(cat /tmp/vmm.rc) after $(awk -v a="$start" -v b="$end" 'BEGIN{printf "%.1f", b-a}') s"
