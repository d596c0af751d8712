#!/usr/bin/env bash
# Multipath test bed: an initiator namespace and a target namespace joined by
# two veth pairs on separate subnets (two independent paths).
#
#   NAME-ini: v0 10.231.1.1/24   v1 10.231.2.1/24
#   NAME-tgt: t0 10.231.1.2/24   t1 10.231.2.2/24
#
# Everything lives inside the two namespaces this script creates; the
# host's interfaces and routes are never touched. Idempotent: `up` tears an
# old copy down first; `down` removes both namespaces (and so the veths).
#
# MODE `kernel` (default) gives v0/v1 their addresses for kernel TCP. MODE
# `dpdk` leaves v0/v1 without addresses (and IPv6 off): the initiator's
# userspace stacks own 10.231.N.1 and drive v0/v1 through DPDK's
# net_af_packet; the target ends then compute their own TCP checksums
# (`ethtool -K tN tx off`), since af_packet passes CHECKSUM_PARTIAL frames
# to DPDK as they are.
#
# usage: netns-multipath.sh up|down NAME [kernel|dpdk]
set -euo pipefail

cmd=${1:-}
name=${2:-}
mode=${3:-kernel}
if [[ -z "$cmd" || -z "$name" || ! "$name" =~ ^[A-Za-z0-9_-]{1,24}$ ]]; then
    echo "usage: $0 up|down NAME (NAME: letters, digits, - and _, at most 24)" >&2
    exit 2
fi
if [[ "$mode" != kernel && "$mode" != dpdk ]]; then
    echo "unknown mode $mode (kernel or dpdk)" >&2
    exit 2
fi
ini="${name}-ini"
tgt="${name}-tgt"

down() {
    ip netns del "$ini" 2>/dev/null || true
    ip netns del "$tgt" 2>/dev/null || true
}

up() {
    down
    ip netns add "$ini"
    ip netns add "$tgt"
    for i in 0 1; do
        # Created directly inside the namespaces: never visible on the host.
        ip -n "$ini" link add "v$i" type veth peer name "t$i" netns "$tgt"
        if [[ "$mode" == kernel ]]; then
            ip -n "$ini" addr add "10.231.$((i + 1)).1/24" dev "v$i"
        else
            ip netns exec "$ini" sysctl -qw "net.ipv6.conf.v$i.disable_ipv6=1"
            ip netns exec "$tgt" sysctl -qw "net.ipv6.conf.t$i.disable_ipv6=1"
            ip netns exec "$tgt" ethtool -K "t$i" tx off >/dev/null
        fi
        ip -n "$tgt" addr add "10.231.$((i + 1)).2/24" dev "t$i"
        ip -n "$ini" link set "v$i" up
        ip -n "$tgt" link set "t$i" up
    done
    ip -n "$ini" link set lo up
    ip -n "$tgt" link set lo up
}

case "$cmd" in
    up) up ;;
    down) down ;;
    *) echo "unknown command $cmd" >&2; exit 2 ;;
esac
