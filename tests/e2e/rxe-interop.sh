#!/usr/bin/env bash
# rxe interop suite (`tests/e2e/run.sh rxe-interop`): the real rdma-core and perftest tools on
# Linux rdma_rxe in a QEMU TCG guest against a host process whose side is a vrdma device
# (vrdma-peer: the soft fabric with its RoCEv2 gateway, driven by the Rust test guest driver).
#
#   host netns: tap0 10.77.0.1/24, vrdma-peer (UDP 4791 + TCP OOB 18515)
#        │ tap
#   QEMU TCG guest: virtio-net eth0 10.77.0.2/24, rdma_rxe rxe0 (GID index 1 = ::ffff:10.77.0.2)
#
# Cases: rc_pingpong, write_lat, read_lat, send_lat, atomic_lat (default sizes) and write_lat,
# read_lat, send_lat with 4096-byte messages (segmented at MTU 1024) × {guest server, guest
# client}, all in one boot. For a guest server the guest prints `IOP READY <case>` on its serial console
# and the host then starts its client (which retries the TCP connect); for a guest client the
# host starts its server first and the guest retries its tool while it cannot connect. Each
# case passes when the host's vrdma-peer printed `PEER ok` and the guest tool exited 0 with
# its result line.
#
# Prints `RESULT PASS|FAIL|SKIP name detail` per case and `N passed, N failed`; exits non-zero on
# any failure. Every stage has a timeout; the netns and QEMU are removed on exit.
#
# Environment: E2E_DIR (target/e2e; the guest base is shared with the main suite),
# E2E_IOP_ITERS (1000), E2E_IOP_CASES (all, comma-separated case names), E2E_IOP_TOOL_TIMEOUT
# (60 s per tool run), E2E_IOP_QP_TIMEOUT (18: vrdma-peer's local ACK timeout exponent), E2E_QEMU_TIMEOUT (900 s), E2E_IOP_PCAP (1: capture UDP 4791 on tap0 with
# tcpdump if installed).
set -uo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
out=${E2E_DIR:-$repo/target/e2e}
mkdir -p "$out"
out=$(cd "$out" && pwd)
iop=$out/interop
mkdir -p "$iop"
iters=${E2E_IOP_ITERS:-1000}
tool_timeout=${E2E_IOP_TOOL_TIMEOUT:-60}
# Our QP's local ACK timeout exponent. rxe in a TCG guest at times leaves received packets
# unprocessed for ~0.5 s (see /work/notes/interop.md); the tools' 14 (67 ms × 7 retries) then
# gives up before it answers. 18 ≈ 1.07 s per retry.
qp_timeout=${E2E_IOP_QP_TIMEOUT:-18}
qemu_timeout=${E2E_QEMU_TIMEOUT:-900}
# A size suffix (write_lat_4096) passes -s to both sides: 4 packets per message at MTU 1024.
tools="rc_pingpong write_lat read_lat send_lat atomic_lat write_lat_4096 read_lat_4096 send_lat_4096"
all_cases=""
for t in $tools; do all_cases="$all_cases,$t-guest-server,$t-guest-client"; done
cases=${E2E_IOP_CASES:-${all_cases#,}}
host_ip=10.77.0.1
guest_ip=10.77.0.2
ns=vrdma-iop-$$
t_start=$(date +%s)

passed=0
failed=0
skipped=0
result() { # result PASS|FAIL|SKIP name detail...
    local verdict=$1 name=$2
    shift 2
    echo "RESULT $verdict $name $*"
    case $verdict in
    PASS) passed=$((passed + 1)) ;;
    SKIP) skipped=$((skipped + 1)) ;;
    *) failed=$((failed + 1)) ;;
    esac
}
qemu_pid=
pcap_pid=
peer_pid=
cleanup() {
    [[ -n $peer_pid ]] && kill "$peer_pid" 2>/dev/null
    [[ -n $pcap_pid ]] && kill "$pcap_pid" 2>/dev/null
    if [[ -n $qemu_pid ]] && kill -0 "$qemu_pid" 2>/dev/null; then
        kill "$qemu_pid" 2>/dev/null
        sleep 1
        kill -9 "$qemu_pid" 2>/dev/null
    fi
    ip netns del "$ns" 2>/dev/null
}
trap cleanup EXIT
trap 'exit 130' INT TERM
finish() {
    echo "e2e rxe-interop: total $(($(date +%s) - t_start)) s"
    ((skipped)) && echo "$skipped skipped (documented in the RESULT SKIP lines)"
    echo "$passed passed, $failed failed"
    [[ $failed -eq 0 ]]
    exit $?
}
stage() { echo "== rxe-interop: $* ($(($(date +%s) - t_start)) s)"; }

# ------------------------------------------------------------------------------------------
stage "packages"
if [[ $(id -u) -ne 0 ]]; then
    result FAIL packages "must run as root (network namespace, tap device)"
    finish
fi
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v cpio >/dev/null || need+=(cpio)
command -v modprobe >/dev/null || need+=(kmod)
command -v ip >/dev/null || need+=(iproute2)
dpkg -s linux-image-amd64 >/dev/null 2>&1 || need+=(linux-image-amd64)
if ((${#need[@]})); then
    echo "installing: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if timeout 300 apt-get update -q >"$iop/apt.log" 2>&1 &&
        timeout 900 apt-get install -y -q --no-install-recommends "${need[@]}" >>"$iop/apt.log" 2>&1; then
        result PASS packages "installed ${need[*]}"
    else
        tail -20 "$iop/apt.log"
        result FAIL packages "apt-get install ${need[*]} failed (see $iop/apt.log)"
        finish
    fi
else
    result PASS packages "all present"
fi
kver=$(dpkg-query -W -f='${Depends}' linux-image-amd64 | grep -o 'linux-image-[0-9][^ ,]*' | head -1 | sed 's/^linux-image-//')
kernel=/boot/vmlinuz-$kver
if [[ -z $kver || ! -f $kernel ]]; then
    result FAIL packages "guest kernel '$kver' ($kernel) missing"
    finish
fi

# ------------------------------------------------------------------------------------------
stage "build vrdma-peer"
if timeout 1200 cargo build --release -p vrdma-tests --bin vrdma-peer >"$iop/cargo.log" 2>&1; then
    peer=$repo/target/release/vrdma-peer
    result PASS build-peer "$(du -h "$peer" | cut -f1)"
else
    tail -30 "$iop/cargo.log"
    result FAIL build-peer "cargo build failed (see $iop/cargo.log)"
    finish
fi

stage "guest root"
if timeout 900 bash "$repo/tests/e2e/build-base.sh" "$out" "$kver"; then
    missing=$(zcat "$out/base.cpio.gz" | cpio -t --quiet 2>/dev/null |
        grep -cE '^usr/bin/(ibv_rc_pingpong|ib_write_lat|ib_read_lat|ib_send_lat|ib_atomic_lat)$')
    if [[ $missing -eq 5 ]]; then
        result PASS guest-root "$(du -h "$out/base.cpio.gz" | cut -f1) base.cpio.gz with ibverbs-utils and perftest"
    else
        result FAIL guest-root "base.cpio.gz lacks the tools (found $missing of 5)"
        finish
    fi
else
    result FAIL guest-root "build-base.sh failed"
    finish
fi

stage "initrd"
# The overlay adds virtio_net (not in the shared base) and the guest script. No entries for
# existing directories: an overlay's ./lib would replace the base's /lib symlink.
ov=$iop/overlay
rm -rf "$ov"
mkdir -p "$ov/iop/mods" "$ov/tests"
: >"$ov/iop/mods/order"
for f in $(modprobe -S "$kver" --show-depends virtio_net | awk '$1=="insmod"{print $2}'); do
    cp "$f" "$ov/iop/mods/"
    basename "$f" >>"$ov/iop/mods/order"
done
cp "$repo/tests/e2e/iop-guest.sh" "$ov/tests/iop.sh"
(cd "$ov" && find iop tests | cpio -o -H newc --quiet | gzip -1) >"$iop/overlay.cpio.gz"
cat "$out/base.cpio.gz" "$iop/overlay.cpio.gz" >"$iop/initrd.gz"
echo "virtio_net modules: $(tr '\n' ' ' <"$ov/iop/mods/order")"

# ------------------------------------------------------------------------------------------
stage "network namespace $ns"
if ip netns add "$ns" &&
    ip -n "$ns" link set lo up &&
    ip netns exec "$ns" ip tuntap add dev tap0 mode tap &&
    ip -n "$ns" addr add "$host_ip/24" dev tap0 &&
    ip -n "$ns" link set tap0 up; then
    result PASS netns "$ns: tap0 $host_ip/24"
else
    result FAIL netns "could not create $ns with tap0"
    finish
fi
if [[ ${E2E_IOP_PCAP:-1} == 1 ]] && command -v tcpdump >/dev/null; then
    ip netns exec "$ns" tcpdump -i tap0 -s 256 -w "$iop/roce.pcap" udp port 4791 >/dev/null 2>&1 &
    pcap_pid=$!
fi

stage "boot the guest (QEMU TCG, rxe on virtio-net)"
log=$iop/serial.log
: >"$log"
ip netns exec "$ns" timeout -k 10 "$qemu_timeout" qemu-system-x86_64 -accel tcg -m 2G -smp 2 \
    -nographic -no-reboot \
    -netdev tap,id=n0,ifname=tap0,script=no,downscript=no -device virtio-net-pci,netdev=n0 \
    -kernel "$kernel" -initrd "$iop/initrd.gz" \
    -append "console=ttyS0 panic=-1 loglevel=4 run=iop iop_ip=$guest_ip/24 iop_host=$host_ip iop_iters=$iters iop_cases=$cases iop_tool_timeout=$tool_timeout" \
    </dev/null >"$log" 2>&1 &
qemu_pid=$!

# wait_marker PATTERN SECONDS: waits until the serial log has a line matching PATTERN (ERE).
wait_marker() {
    local pat=$1 deadline=$(($(date +%s) + $2))
    while (($(date +%s) < deadline)); do
        tr -d '\r' <"$log" | grep -aqE "$pat" && return 0
        kill -0 "$qemu_pid" 2>/dev/null || { tr -d '\r' <"$log" | grep -aqE "$pat"; return $?; }
        sleep 0.5
    done
    return 1
}
slog() { tr -d '\r' <"$log"; }

if wait_marker "^IOP NET_READY" 180; then
    result PASS guest-rxe "$(slog | grep -a -m1 '^IOP NET_READY' | cut -d' ' -f3-) ($(slog | grep -a '^IOP DEVINFO' | sed 's/IOP DEVINFO //' | tr -s ' \t' ' ' | paste -sd ';'))"
else
    result FAIL guest-rxe "the guest did not bring up rxe0 (see $log)"
    tail -40 "$log"
    finish
fi

# ------------------------------------------------------------------------------------------
peer_run() { # peer_run LOG ARGS...: vrdma-peer in the netns, with a timeout
    ip netns exec "$ns" timeout -k 5 $((tool_timeout + 30)) "$peer" "${@:2}" --qp-timeout "$qp_timeout" >"$1" 2>&1
}
guest_detail() { # guest_detail CASE TOOL: the guest tool's figure
    local c=$1 t=$2
    if [[ $t == rc_pingpong ]]; then
        slog | grep -a "^IOPLOG $c| .*usec/iter" | head -1 | sed 's/^IOPLOG [^|]*| //'
    else
        # perftest's result row: #bytes #iterations t_min t_max t_typical ...
        slog | grep -aE "^IOPLOG $c\|[[:space:]]+[0-9]+[[:space:]]+[0-9]+[[:space:]]+[0-9.]+" | head -1 |
            awk '{print "guest t_typical=" $7 "us t_avg=" $8 "us (" $3 " B x " $4 ")"}'
    fi
}

for c in ${cases//,/ }; do
    tool=${c%%-guest-*}
    role=${c##*-guest-}
    size_opt=()
    if [[ $tool =~ ^(.*)_([0-9]+)$ ]]; then
        tool=${BASH_REMATCH[1]}
        size_opt=(-s "${BASH_REMATCH[2]}")
    fi
    sub=${tool//_/-}
    stage "case $c"
    plog=$iop/peer-$c.log
    t_case=$(date +%s)
    if [[ $role == server ]]; then
        if ! wait_marker "^IOP READY $c\$" $((tool_timeout * 2 + 60)); then
            result FAIL "$c" "the guest never started its server"
            continue
        fi
        peer_run "$plog" "$sub" "$guest_ip" --bind "$host_ip" -n "$iters" "${size_opt[@]}" --timeout "$tool_timeout"
    else
        peer_run "$plog" "$sub" --bind "$host_ip" -n "$iters" "${size_opt[@]}" --timeout "$tool_timeout" &
        peer_pid=$!
        wait "$peer_pid"
        peer_pid=
    fi
    wait_marker "^IOP DONE $c rc=" $((tool_timeout + 30))
    grc=$(slog | sed -n "s/^IOP DONE $c rc=\([0-9]*\).*/\1/p" | head -1)
    pline=$(grep -a '^PEER ' "$plog" | head -1)
    gdet=$(guest_detail "$c" "$tool")
    hdet=$(echo "$pline" | grep -o 't_typical_us=[0-9.]*\|usec_per_iter=[0-9.]*' | head -1)
    secs=$(($(date +%s) - t_case))
    if [[ $tool == atomic_lat ]] && slog | grep -aqiE "^IOPLOG $c\| .*(atomic.*not supported|doesn't support atomic)"; then
        result SKIP "$c" "rxe does not support the tool's atomics: $(slog | grep -aiE "^IOPLOG $c\| .*atomic" | head -1 | sed 's/^IOPLOG [^|]*| //')"
    elif [[ $pline == "PEER ok"* && $grc == 0 && $role == server && ($tool == read_lat || $tool == atomic_lat) ]]; then
        # The READ/atomic server measures nothing (perftest prints no result row there).
        result PASS "$c" "guest server answered $(echo "$pline" | grep -o 'completions=[0-9]*') operations; host ${hdet:-?} (${secs} s)"
    elif [[ $pline == "PEER ok"* && $grc == 0 && -n $gdet ]]; then
        result PASS "$c" "$gdet; host ${hdet:-(server: no figures)} (${secs} s)"
    else
        result FAIL "$c" "guest rc=${grc:-none} ${gdet:+($gdet) }host: ${pline:-no PEER line, see $plog} (${secs} s)"
        slog | grep -a "^IOPLOG $c| " | tail -8
        slog | grep -a "^IOP COUNTERS $c" | head -1
        tail -3 "$plog" | grep -v '^PEER ' | sed 's/^/  peer: /'
    fi
done

stage "power off"
wait_marker "^=== POWEROFF" 60 || echo "guest did not power off by itself"
wait "$qemu_pid" 2>/dev/null
qemu_pid=
echo "serial log: $log${pcap_pid:+; capture: $iop/roce.pcap}"
finish
