#!/usr/bin/env bash
# iSCSI over the kernel TCP path vs over the userspace stack on DPDK, same
# topology: tgtd in a network namespace behind a veth pair; the initiator
# (`iscsi-bypass bench`) on the root end, first with a kernel address on it
# (--transport kernel), then without one, through net_af_packet
# (--transport dpdk). Root only; everything is removed on exit.
# NUMJOBS=N makes N veth pairs into one bridge in the namespace and gives
# each DPDK job its own port (net_af_packetJ) and address (.2, .3, ...);
# the kernel run uses the first pair.
#
# Env: RW (randread), BS (4k), IODEPTH (16), RUNTIME (5s), NUMJOBS (1),
#      LUN_MIB (256), BUSY_POLL=1 adds --busy-poll to both runs.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $(id -u) == 0 ]] || { echo "needs root" >&2; exit 1; }
RW=${RW:-randread}; BS=${BS:-4k}; IODEPTH=${IODEPTH:-16}; RUNTIME=${RUNTIME:-5s}
NUMJOBS=${NUMJOBS:-1}; LUN_MIB=${LUN_MIB:-256}
export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1}
cargo build --release --bin iscsi-bypass >&2
bin=target/release/iscsi-bypass

id=$$
ns=ibbench$id; dev=ibbd$id; kdev=ibbk$id
net=10.234.$((id % 250 + 1))
kip=$net.1; sip=$net.2
port=3260
ctl=$((2000 + id % 20000))
dir=$(mktemp -d /dev/shm/iscsi-dpdk.XXXXXX)
tgtd_pid=""
cleanup() {
    set +e
    # tgtd ignores SIGTERM while it has targets.
    if [[ -n $tgtd_pid ]]; then kill -9 "$tgtd_pid" 2>/dev/null; wait "$tgtd_pid" 2>/dev/null; fi
    for j in $(seq 0 $((NUMJOBS - 1))); do ip link del "$dev${j/#0/}" 2>/dev/null; done
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "$dir" "/var/run/dpdk/iscsi-dpdk-$id"
}
trap cleanup EXIT

ip netns add "$ns"
ip -n "$ns" link add br0 type bridge
ip -n "$ns" link set br0 up
for j in $(seq 0 $((NUMJOBS - 1))); do
    d=$dev${j/#0/}; k=$kdev$j
    ip link add "$d" type veth peer name "$k" netns "$ns"
    sysctl -qw "net.ipv6.conf.$d.disable_ipv6=1" || true
    sysctl -qw "net.ipv4.conf.$d.forwarding=0"
    # af_packet passes the kernel's CHECKSUM_PARTIAL frames on as they are.
    ip netns exec "$ns" ethtool -K "$k" tx off >/dev/null
    ip link set "$d" up
    ip -n "$ns" link set "$k" master br0
    ip -n "$ns" link set "$k" up
done
ip netns exec "$ns" ethtool -K br0 tx off >/dev/null
ip -n "$ns" addr add "$kip/24" dev br0
ip -n "$ns" link set lo up

truncate -s "${LUN_MIB}M" "$dir/lun1.img"
ip netns exec "$ns" tgtd -f -C "$ctl" --iscsi "portal=$kip:$port" >"$dir/tgtd.log" 2>&1 &
tgtd_pid=$!
iqn=iqn.2026-11.org.iscsi-bypass.bench:dpdk
adm() { tgtadm -C "$ctl" --lld iscsi "$@"; }
for _ in $(seq 50); do adm --mode target --op show >/dev/null 2>&1 && break; sleep 0.1; done
adm --mode target --op new --tid 1 -T "$iqn"
adm --mode logicalunit --op new --tid 1 --lun 1 -b "$dir/lun1.img"
adm --mode target --op bind --tid 1 -I ALL
url="iscsi://$kip:$port/$iqn/1"
job=(--rw "$RW" --bs "$BS" --iodepth "$IODEPTH" --runtime "$RUNTIME" --numjobs "$NUMJOBS" --ramp 1s)
[[ ${BUSY_POLL:-0} == 1 ]] && job+=(--busy-poll)

echo "== kernel TCP ($sip on $dev -> tgtd $kip in netns $ns): ${job[*]}"
ip addr add "$sip/24" dev "$dev"
"$bin" bench "$url" "${job[@]}" --transport kernel
ip addr del "$sip/24" dev "$dev"
ip neigh flush dev "$dev" || true

free=$(awk '/HugePages_Free/ {print $2}' /proc/meminfo)
mem="--in-memory"; [[ ${free:-0} -ge 64 ]] || mem="--no-huge -m 256"
eal="-l 0 --no-pci $mem --file-prefix iscsi-dpdk-$id --log-level lib.eal:notice"
ports=()
for j in $(seq 0 $((NUMJOBS - 1))); do
    eal+=" --vdev net_af_packet$j,iface=$dev${j/#0/}"
    ports+=(--dpdk-port "net_af_packet$j" --local-ip "$net.$((j + 2))/24")
done
echo "== userspace TCP on DPDK (net_af_packet0..$((NUMJOBS - 1)), stack $sip..): ${job[*]}"
"$bin" bench "$url" "${job[@]}" --transport dpdk --eal "$eal" "${ports[@]}" \
    2> >(grep -v -e '^EAL: No free' -e '^TELEMETRY' >&2)
