#!/bin/sh
# Runs in the TCG guest of the rxe interop suite (tests/e2e/rxe-interop.sh): brings up rdma_rxe
# on eth0 and runs the real tools against the host's vrdma-peer, one case after the other, in
# the order of `iop_cases=` on the kernel command line. Case names: TOOL-guest-server or
# TOOL-guest-client, TOOL optionally with a message size (`write_lat_4096`). Markers (the host script waits on them):
#   IOP NET_READY …            rxe0 is up with its RoCE v2 GID
#   IOP READY <case>           a guest server is about to listen (the host then starts its client)
#   IOPLOG <case>| <line>      the tool's output
#   IOP DONE <case> rc=N       the case finished on the guest side
arg() { tr ' ' '\n' </proc/cmdline | sed -n "s/^$1=//p" | head -1; }
ip=$(arg iop_ip)
host=$(arg iop_host)
iters=$(arg iop_iters)
cases=$(arg iop_cases)
tool_timeout=$(arg iop_tool_timeout)
connect_wait=$(arg iop_connect_wait)
: "${iters:=1000}" "${tool_timeout:=60}" "${connect_wait:=60}"

modprobe virtio_pci || echo "IOP: modprobe virtio_pci failed"
for m in $(cat /iop/mods/order); do
    [ -d "/sys/module/${m%.ko}" ] && continue
    insmod "/iop/mods/$m" || echo "IOP: insmod $m failed"
done
for m in crc32_generic rdma_rxe ib_uverbs; do
    modprobe "$m" || echo "IOP: modprobe $m failed"
done
n=0
while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
ip link set lo up
ip addr add "$ip" dev eth0
ip link set eth0 up
rdma link add rxe0 type rxe netdev eth0 || echo "IOP: rdma link add failed"
gidf=/sys/class/infiniband/rxe0/ports/1/gids/1
n=0
while ! grep -q "ffff:" "$gidf" 2>/dev/null && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
echo "IOP NET_READY gid1=$(cat $gidf 2>/dev/null) type=$(cat /sys/class/infiniband/rxe0/ports/1/gid_attrs/types/1 2>/dev/null) state=$(cat /sys/class/infiniband/rxe0/ports/1/state 2>/dev/null) mtu=$(cat /sys/class/net/eth0/mtu)"
ibv_devinfo -d rxe0 -v 2>&1 | grep -E "active_mtu|atomic_cap|max_qp_rd_atom" | sed 's/^[[:space:]]*/IOP DEVINFO /'

counters() { # counters CASE: rxe's non-zero hw_counters (cumulative) on one line
    cnt=""
    for f in /sys/class/infiniband/rxe0/ports/1/hw_counters/*; do
        v=$(cat "$f" 2>/dev/null)
        [ "$v" != "0" ] && cnt="$cnt $(basename "$f")=$v"
    done
    echo "IOP COUNTERS $1$cnt"
}

tool_cmd() { # tool_cmd TOOL: the guest tool's command line (server form)
    case $1 in
    rc_pingpong) echo "ibv_rc_pingpong -d rxe0 -g 1 -n $iters" ;;
    write_lat) echo "ib_write_lat -d rxe0 -x 1 -n $iters" ;;
    read_lat) echo "ib_read_lat -d rxe0 -x 1 -n $iters" ;;
    send_lat) echo "ib_send_lat -d rxe0 -x 1 -n $iters" ;;
    atomic_lat) echo "ib_atomic_lat -d rxe0 -x 1 -n $iters" ;;
    esac
}

for c in $(echo "$cases" | tr ',' ' '); do
    tool=${c%%-guest-*}
    role=${c##*-guest-}
    size=
    case $tool in
    *_[0-9]*) size=${tool##*_} tool=${tool%_*} ;;
    esac
    cmd="$(tool_cmd "$tool")${size:+ -s $size}"
    out=/tmp/$c.out
    if [ "$role" = server ]; then
        echo "IOP READY $c"
        timeout "$tool_timeout" stdbuf -oL -eL $cmd >"$out" 2>&1
        rc=$?
    else
        # The host's server may not listen yet: retry while the tool cannot connect.
        start=$(cut -d. -f1 /proc/uptime)
        while :; do
            timeout "$tool_timeout" stdbuf -oL -eL $cmd "$host" >"$out" 2>&1
            rc=$?
            now=$(cut -d. -f1 /proc/uptime)
            if [ $rc -ne 0 ] && grep -qE "Couldn't connect|Unable to init the socket connection|Connection refused" "$out" &&
                [ $((now - start)) -lt "$connect_wait" ]; then
                sleep 1
                continue
            fi
            break
        done
    fi
    sed "s/^/IOPLOG $c| /" "$out"
    counters "$c"
    echo "IOP DONE $c rc=$rc"
done
