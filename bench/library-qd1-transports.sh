#!/usr/bin/env bash
# QD1 latency of the library path (the multipath device: application thread
# -> ring -> path worker -> iSCSI session) and of a raw session (the job
# thread drives its connection itself, `--engine inline`) over kernel TCP
# and over the userspace stack on DPDK, 4 KiB, same topology, same run:
# the embedded RAM target (`iscsi-bypass target`) in a network namespace
# behind a veth pair; the initiator on the root end, first with a kernel
# address on it (--transport kernel), then without one, through
# net_af_packet (--transport dpdk). Prints p50/p99/p99.9 per row and the
# DPDK/kernel ratio. Root only; everything is removed on exit.
#
#   bench/library-qd1-transports.sh        Env: RUNTIME (5s), LUN_MIB (256),
#   POLL=busy (default: pollers spin; needs a core per poller: the
#   application thread, the path worker, the target) or POLL=sleep (idle
#   pollers nap 20 us: for machines with fewer cores than pollers).
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $(id -u) == 0 ]] || { echo "needs root" >&2; exit 1; }
RUNTIME=${RUNTIME:-5s}; LUN_MIB=${LUN_MIB:-256}
export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1}
cargo build --release --bin iscsi-bypass >&2
bin=target/release/iscsi-bypass

id=$$
ns=ibqd$id; dev=ibqdd$id; kdev=ibqdk$id
net=10.235.$((id % 250 + 1))
kip=$net.1; sip=$net.2
iqn=iqn.2026-11.org.iscsi-bypass.bench:qd1
dir=$(mktemp -d /tmp/library-qd1.XXXXXX)
target_pid=""
cleanup() {
    set +e
    [[ -n $target_pid ]] && { kill "$target_pid" 2>/dev/null; wait "$target_pid" 2>/dev/null; }
    ip link del "$dev" 2>/dev/null
    ip netns del "$ns" 2>/dev/null
    rm -rf "$dir" "/var/run/dpdk/library-qd1-$id"
}
trap cleanup EXIT

ip netns add "$ns"
ip link add "$dev" type veth peer name "$kdev" netns "$ns"
sysctl -qw "net.ipv6.conf.$dev.disable_ipv6=1" || true
sysctl -qw "net.ipv4.conf.$dev.forwarding=0"
# af_packet passes the kernel's CHECKSUM_PARTIAL frames on as they are.
ip netns exec "$ns" ethtool -K "$kdev" tx off >/dev/null
ip link set "$dev" up
ip -n "$ns" addr add "$kip/24" dev "$kdev"
ip -n "$ns" link set "$kdev" up
ip -n "$ns" link set lo up

ip netns exec "$ns" "$bin" target --portal "$kip:3260" --iqn "$iqn" --size "${LUN_MIB}m" \
    >"$dir/target.log" 2>&1 &
target_pid=$!
for _ in $(seq 50); do
    ip netns exec "$ns" ss -ltn | grep -q "$kip:3260" && break
    sleep 0.1
done
url="iscsi://$kip:3260/$iqn/0"
job=(--bs 4k --iodepth 1 --runtime "$RUNTIME" --ramp 1s --json)
[[ ${POLL:-busy} == busy ]] && job+=(--busy-poll)

free=$(awk '/HugePages_Free/ {print $2}' /proc/meminfo)
mem="--in-memory"; [[ ${free:-0} -ge 64 ]] || mem="--no-huge -m 256"
eal="-l 0 --no-pci $mem --file-prefix library-qd1-$id --log-level lib.eal:notice --vdev net_af_packet0,iface=$dev"
dpdk=(--transport dpdk --eal "$eal" --dpdk-port net_af_packet0 --local-ip "$sip/24")

run() { # transport engine rw
    local extra=()
    [[ $1 == dpdk ]] && extra=("${dpdk[@]}")
    echo "== $1 $2 $3" >&2
    "$bin" bench "$url" "${job[@]}" --rw "$3" --engine "$2" "${extra[@]}" \
        >"$dir/$1-$2-$3.json" 2> >(grep -v -e '^EAL: No free' -e '^TELEMETRY' >&2)
}
ip addr add "$sip/24" dev "$dev"
for engine in multipath inline; do for rw in randwrite randread; do run kernel $engine $rw; done; done
ip addr del "$sip/24" dev "$dev"
ip neigh flush dev "$dev" || true
for engine in multipath inline; do for rw in randwrite randread; do run dpdk $engine $rw; done; done

python3 - "$dir" <<'PY'
import json, sys, os
d = sys.argv[1]
def lat(t, e, rw):
    j = json.load(open(os.path.join(d, f"{t}-{e}-{rw}.json")))["jobs"][0]
    side = j["write" if "write" in rw else "read"]
    p = side["clat_ns"]["percentile"]
    pick = lambda q: next(v for k, v in p.items() if abs(float(k) - q) < 1e-6) / 1000
    return side["iops"], pick(50), pick(99), pick(99.9)
name = {"multipath": "library (multipath device)", "inline": "raw session"}
print(f"{'path':28} {'op':10} {'transport':9} {'IOPS':>8} {'p50 us':>8} {'p99 us':>8} {'p99.9 us':>9}")
for e in ["multipath", "inline"]:
    for rw in ["randwrite", "randread"]:
        rows = {t: lat(t, e, rw) for t in ["kernel", "dpdk"]}
        for t, (iops, p50, p99, p999) in rows.items():
            print(f"{name[e]:28} {rw:10} {t:9} {iops:8.0f} {p50:8.1f} {p99:8.1f} {p999:9.1f}")
        k, u = rows["kernel"], rows["dpdk"]
        print(f"{'':28} {rw:10} {'dpdk/kern':9} {u[0]/k[0]:8.2f} {u[1]/k[1]:8.2f} {u[2]/k[2]:8.2f} {u[3]/k[3]:9.2f}")
PY
