#!/usr/bin/env bash
# The kernel-bypass data path with no kernel on either side, against the
# kernel TCP path, in one run. The embedded target (null LUN) runs as a
# process of its own in every bed; the initiator is `iscsi-bypass bench`:
#   (a) kernel    kernel TCP on loopback; target on kernel TCP
#   (b) memif     DPDK net_memif (shared memory) between the two processes;
#                 target = memif server on the userspace stack; the
#                 initiator a zero-copy client (its mbufs are the shared
#                 buffers, which the server writes as a NIC's DMA would;
#                 MEMIF_ZC=0: a copying client, the PMD copies each frame)
#   (b') memif-trusted the same with --checksum trusted on both ends (no
#                 software checksums: memif cannot corrupt a frame); its
#                 lines say bed=memif csum=trusted
#   (b'') memif9000 the same at MTU 9000 (--mtu 9000 on both ends: jumbo
#                 frames in 9 KiB mbufs, MSS 8960; memif buffers made
#                 9 KiB by the stacks)
#   (c) af_xdp    DPDK net_af_xdp on each end of a veth pair (XDP sockets)
#   (d) af_packet DPDK net_af_packet on each end of a veth pair
# Cases: 4 KiB randread and randwrite at QD1 and QD32, 128 KiB randread at
# QD8. One line per case:
#   RESULT bed=<kernel|memif|memif9000|af_xdp|af_packet> rw= bs= qd= iops= p50_us=
#          p99_us= busy_ns_per_io= cpu_ns_per_io= instructions_per_io=<n|na>
#          csum=<kernel|sw|trusted> gbit_s=
# then, per userspace bed and case, the ratios to (a):
#   RATIO bed= csum= rw= bs= qd= iops_x= p50_x= per_cpu_x=
# csum: who checks the checksums (kernel: the kernel's TCP; sw: the
# userspace stack, or the port's offload where it has one; trusted:
# nobody, docs/architecture.md "Checksums"). gbit_s: the payload moved,
# in Gbit/s (10^9 bits), of the case's direction.
# per_cpu_x compares IOPS per CPU-second, the userspace bed counted by its
# busy poll time (busy_ns_per_io), the kernel bed by its CPU time.
#
# busy_ns_per_io: time of the initiator's poll-loop rounds that did work
# (worker::poll_meter); cpu_ns_per_io: the initiator process's CPU time
# (every thread; a busy-polling thread's spin included) per I/O.
# instructions_per_io: `perf stat -e instructions:u` over the whole bench
# process (setup and ramp included) per measured I/O; na where the machine
# has no PMU counters (VMs often have none).
#
# Pinning: the target on the last allowed CPU, the initiator on the first
# (EAL -l, or taskset for the kernel bed). The userspace beds busy-poll
# (--busy-poll); the kernel bed uses the default idle mode unless
# KERNEL_BUSY_POLL=1.
#
# Env: RUNTIME (3s), RAMP (1s), MEMIF_ZC (1),
#      BEDS ("kernel memif memif-trusted memif9000 af_xdp af_packet"),
#      BIN (default: cargo build --release, target/release/iscsi-bypass).
# Root only (DPDK, veth); everything it creates is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $(id -u) == 0 ]] || { echo "needs root" >&2; exit 1; }
RUNTIME=${RUNTIME:-3s}; RAMP=${RAMP:-1s}
MEMIF_ZC=${MEMIF_ZC:-1}
BEDS=${BEDS:-kernel memif memif-trusted memif9000 af_xdp af_packet}
# Who checks the checksums in the bed being run (the csum= column).
csum=kernel
if [[ -z ${BIN:-} ]]; then
    CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1} cargo build --release --bin iscsi-bypass >&2
    BIN=target/release/iscsi-bypass
fi
PMD=/usr/lib/x86_64-linux-gnu/dpdk/pmds-23.0

id=$$
cpus=$(python3 -c 'import os; c=sorted(os.sched_getaffinity(0)); print(c[0], c[-1])')
icpu=${cpus% *}; tcpu=${cpus#* }
dir=$(mktemp -d /tmp/ibx-bypass.XXXXXX)
va=ibxa$id; vb=ibxb$id
sock=/run/ibx-bypass-$id.sock
kport=$((20000 + id % 20000))
iqn=iqn.2026-11.org.iscsi-bypass:bypass
tpid=""
stop_target() {
    if [[ -n $tpid ]]; then kill "$tpid" 2>/dev/null || true; wait "$tpid" 2>/dev/null || true; fi
    tpid=""
}
cleanup() {
    set +e
    stop_target
    ip link del "$va" 2>/dev/null
    rm -f "$sock"
    rm -rf "$dir" /var/run/dpdk/ibx-bp-*"$id"
}
trap cleanup EXIT

perf_ok=0
if command -v perf >/dev/null && perf stat -x, -e instructions:u -- true 2>&1 | grep -q '^[0-9]'; then
    perf_ok=1
fi

# start_target <log> <args...>: runs the target, waits until it listens.
start_target() {
    local log=$1; shift
    : >"$log"
    "$@" >"$log" 2>&1 &
    tpid=$!
    for _ in $(seq 200); do
        grep -q "listening on" "$log" && return 0
        kill -0 "$tpid" 2>/dev/null || break
        sleep 0.1
    done
    echo "target did not start: $*" >&2
    cat "$log" >&2
    exit 1
}

eal_common="--no-pci --no-huge -m 512 --no-telemetry -d $PMD --log-level lib.eal:error --log-level pmd.net.*:error"
failures=0
# The memif client's vdev options and EAL options (zero-copy needs the
# client's memory in one file, which it shares with the server).
memif_client=""; memif_eal=""
if [[ $MEMIF_ZC == 1 ]]; then
    memif_client=",zero-copy=yes"; memif_eal="--single-file-segments"
fi

# run_case <bed> <rw> <bs> <qd> <bench args...>
run_case() {
    local bed=$1 rw=$2 bs=$3 qd=$4; shift 4
    local json=$dir/$bed-$rw-$bs-$qd.json perfout=$dir/$bed-$rw-$bs-$qd.perf
    local cmd=("$@" --rw "$rw" --bs "$bs" --iodepth "$qd" --runtime "$RUNTIME" --ramp "$RAMP" --size 512m --json)
    local ok=1
    if [[ $perf_ok == 1 ]]; then
        perf stat -x, -e instructions:u -o "$perfout" -- "${cmd[@]}" >"$json" 2>"$dir/bench.err" || ok=0
    else
        "${cmd[@]}" >"$json" 2>"$dir/bench.err" || ok=0
    fi
    if [[ $ok == 0 ]]; then
        # One line saying why, and on to the next case.
        local why
        why=$(grep -m1 '^error' "$dir/bench.err" | tr -s ' "' ' ' || true)
        cat "$dir/bench.err" >&2
        echo "RESULT bed=$bed rw=$rw bs=$bs qd=$qd csum=$csum failed=\"${why:-bench exited non-zero}\""
        failures=$((failures + 1))
        return 0
    fi
    local line
    line=$(python3 - "$json" "$perfout" "$bed" "$rw" "$bs" "$qd" "$csum" <<'EOF'
import json, sys, os
path, perf, bed, rw, bs, qd, csum = sys.argv[1:]
v = json.load(open(path))
d = v["jobs"][0]["write" if "write" in rw else "read"]
ours = v["iscsi_bypass"]
ios = ours["total"]["total_ios"]
pct = d["clat_ns"]["percentile"]
instr = "na"
if os.path.exists(perf):
    for l in open(perf):
        f = l.strip().split(",")
        if len(f) > 2 and f[2].startswith("instructions") and f[0].isdigit() and ios:
            instr = str(int(f[0]) // ios)
print(f"RESULT bed={bed} rw={rw} bs={bs} qd={qd} iops={d['iops']:.0f} "
      f"p50_us={pct['50.000000']/1e3:.1f} p99_us={pct['99.000000']/1e3:.1f} "
      f"busy_ns_per_io={ours['busy_ns_per_io']:.0f} cpu_ns_per_io={ours['cpu_ns_per_io']:.0f} "
      f"instructions_per_io={instr} csum={csum} gbit_s={d['bw_bytes'] * 8 / 1e9:.2f}")
EOF
)
    echo "$line"
    echo "$line" >>"$dir/results"
}

cases() {
    local bed=$1; shift
    run_case "$bed" randread 4k 1 "$@"
    run_case "$bed" randread 4k 32 "$@"
    run_case "$bed" randwrite 4k 1 "$@"
    run_case "$bed" randwrite 4k 32 "$@"
    run_case "$bed" randread 128k 8 "$@"
}

# dpdk_bed <bed> <target vdev> <initiator vdev> <port name> <net> [options of both ends...]
# (ieal: more EAL options for the initiator)
dpdk_bed() {
    local bed=$1 tvdev=$2 ivdev=$3 port=$4 net=$5; shift 5
    start_target "$dir/target-$bed.log" "$BIN" target --transport dpdk --null --size 1g --iqn "$iqn" \
        --eal "-l $tcpu $eal_common --file-prefix ibx-bp-t$id --vdev $tvdev" \
        --dpdk-port "$port" --local-ip "$net.1/24" "$@"
    cases "$bed" "$BIN" bench "iscsi://$net.1:3260/$iqn/0" --transport dpdk --busy-poll \
        --eal "-l $icpu $eal_common ${ieal:-} --file-prefix ibx-bp-i$id --vdev $ivdev" \
        --dpdk-port "$port" --local-ip "$net.2/24" "$@"
    stop_target
}

veth() {
    ip link show "$va" >/dev/null 2>&1 && return
    ip link add "$va" type veth peer name "$vb"
    for d in $va $vb; do
        sysctl -qw "net.ipv6.conf.$d.disable_ipv6=1" || true
        ip link set "$d" up
    done
}

echo "# $(nproc) CPUs online, initiator on CPU $icpu, target on CPU $tcpu; load: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# RUNTIME=$RUNTIME RAMP=$RAMP perf counters: $([[ $perf_ok == 1 ]] && echo yes || echo no) memif client: $([[ $MEMIF_ZC == 1 ]] && echo zero-copy || echo copying)"
for bed in $BEDS; do
    # The userspace beds check checksums themselves (or by the port's offload).
    csum=sw
    case $bed in
    kernel)
        csum=kernel
        start_target "$dir/target-kernel.log" taskset -c "$tcpu" "$BIN" target --null --size 1g \
            --iqn "$iqn" --portal "127.0.0.1:$kport"
        kbusy=(); [[ ${KERNEL_BUSY_POLL:-0} == 1 ]] && kbusy=(--busy-poll)
        cases kernel taskset -c "$icpu" "$BIN" bench "iscsi://127.0.0.1:$kport/$iqn/0" \
            --transport kernel "${kbusy[@]}"
        stop_target
        ;;
    memif)
        rm -f "$sock"
        ieal=$memif_eal dpdk_bed memif "net_memif0,role=server,socket=$sock" "net_memif0,role=client,socket=$sock$memif_client" \
            net_memif0 10.215.1
        ;;
    memif-trusted)
        rm -f "$sock"
        csum=trusted
        ieal=$memif_eal dpdk_bed memif "net_memif0,role=server,socket=$sock" "net_memif0,role=client,socket=$sock$memif_client" \
            net_memif0 10.215.5 --checksum trusted
        ;;
    memif9000)
        rm -f "$sock"
        # memif's default 2 KiB buffers: with --mtu 9000 each end's stack
        # makes them hold a whole frame (bsize=9216; DPDK 22.11's memif
        # corrupts frames spread over several buffers, docs/dpdk.md).
        ieal=$memif_eal dpdk_bed memif9000 "net_memif0,role=server,socket=$sock" \
            "net_memif0,role=client,socket=$sock$memif_client" net_memif0 10.215.4 --mtu 9000
        ;;
    af_xdp)
        veth
        dpdk_bed af_xdp "net_af_xdp0,iface=$va" "net_af_xdp0,iface=$vb" net_af_xdp0 10.215.2
        ;;
    af_packet)
        veth
        dpdk_bed af_packet "net_af_packet0,iface=$va" "net_af_packet0,iface=$vb" net_af_packet0 10.215.3
        ;;
    *) echo "unknown bed $bed" >&2; exit 1 ;;
    esac
done

# Ratios to the kernel bed, case by case.
touch "$dir/results"
python3 - "$dir/results" <<'EOF'
import sys
rows = []
for l in open(sys.argv[1]):
    kv = dict(f.split("=", 1) for f in l.split()[1:])
    rows.append(kv)
key = lambda r: (r["rw"], r["bs"], r["qd"])
rows = [r for r in rows if "failed" not in r]
kernel = {key(r): r for r in rows if r["bed"] == "kernel"}
for r in rows:
    k = kernel.get(key(r))
    if r["bed"] == "kernel" or k is None:
        continue
    f = lambda x: float(x)
    iops_x = f(r["iops"]) / max(f(k["iops"]), 1e-9)
    p50_x = f(r["p50_us"]) / max(f(k["p50_us"]), 1e-9)
    # IOPS per CPU-second: the bed by its busy time, kernel by its CPU time.
    per_cpu_x = f(k["cpu_ns_per_io"]) / max(f(r["busy_ns_per_io"]), 1e-9)
    print(f"RATIO bed={r['bed']} csum={r.get('csum', 'na')} rw={r['rw']} bs={r['bs']} qd={r['qd']} "
          f"iops_x={iops_x:.2f} p50_x={p50_x:.2f} per_cpu_x={per_cpu_x:.2f}")
EOF
[[ $failures == 0 ]] || { echo "$failures case(s) failed" >&2; exit 1; }
