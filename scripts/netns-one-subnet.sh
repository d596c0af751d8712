#!/usr/bin/env bash
# One-subnet port-binding test bed: the case the vSphere set-up warns about.
# The initiator namespace has two veths on ONE subnet, both into one bridge
# in the target namespace:
#
#   NAME-ini: v0 10.233.1.11/24 ─┐             (v2 10.233.1.13/24, link down:
#             v1 10.233.1.12/24 ─┤              a binding that reaches nothing)
#   NAME-tgt:         t0, t1 in br0 10.233.1.2/24 [+ 10.233.1.3/24]
#
# PORTALS 1 (default) gives the bridge one address (one portal), 2 gives it
# a second one (two portals on the same subnet).
#
# MODE `kernel` (default) gives v0/v1/v2 their addresses. The initiator
# namespace is left as a fresh host would be (no arp_ignore/arp_announce,
# no routing rules): scripts/check-port-binding.sh reports what is missing.
# MODE `dpdk` leaves v0/v1 without addresses (and IPv6 off) for DPDK's
# net_af_packet; the target side then computes its own TCP checksums
# (`ethtool -K ... tx off`), since af_packet passes CHECKSUM_PARTIAL frames
# to DPDK as they are.
#
# Everything lives inside the two namespaces this script creates; the
# host's interfaces and routes are never touched. `up` tears an old copy
# down first; `down` removes both namespaces (and so the veths and bridge).
#
# usage: netns-one-subnet.sh up|down NAME [kernel|dpdk] [1|2]
set -euo pipefail

cmd=${1:-}
name=${2:-}
mode=${3:-kernel}
portals=${4:-1}
if [[ -z "$cmd" || -z "$name" || ! "$name" =~ ^[A-Za-z0-9_-]{1,24}$ ]]; then
    echo "usage: $0 up|down NAME [kernel|dpdk] [1|2] (NAME: letters, digits, - and _, at most 24)" >&2
    exit 2
fi
if [[ "$mode" != kernel && "$mode" != dpdk ]]; then
    echo "unknown mode $mode (kernel or dpdk)" >&2
    exit 2
fi
if [[ "$portals" != 1 && "$portals" != 2 ]]; then
    echo "PORTALS must be 1 or 2, not $portals" >&2
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
    ip -n "$tgt" link add br0 type bridge
    # Forward at once (no STP listening/learning delay).
    ip -n "$tgt" link set br0 type bridge forward_delay 0 stp_state 0
    for i in 0 1; do
        # Created directly inside the namespaces: never visible on the host.
        ip -n "$ini" link add "v$i" type veth peer name "t$i" netns "$tgt"
        ip -n "$tgt" link set "t$i" master br0
        if [[ "$mode" == kernel ]]; then
            ip -n "$ini" addr add "10.233.1.1$((i + 1))/24" dev "v$i"
        else
            ip netns exec "$ini" sysctl -qw "net.ipv6.conf.v$i.disable_ipv6=1"
            ip netns exec "$tgt" sysctl -qw "net.ipv6.conf.t$i.disable_ipv6=1"
            ip netns exec "$tgt" ethtool -K "t$i" tx off >/dev/null
        fi
        ip -n "$ini" link set "v$i" up
        ip -n "$tgt" link set "t$i" up
    done
    if [[ "$mode" == kernel ]]; then
        # A third interface on the subnet whose link stays down.
        ip -n "$ini" link add v2 type veth peer name t2 netns "$tgt"
        ip -n "$ini" addr add 10.233.1.13/24 dev v2
    else
        ip netns exec "$tgt" sysctl -qw "net.ipv6.conf.br0.disable_ipv6=1"
        ip netns exec "$tgt" ethtool -K br0 tx off >/dev/null
    fi
    ip -n "$tgt" addr add 10.233.1.2/24 dev br0
    if [[ "$portals" == 2 ]]; then
        ip -n "$tgt" addr add 10.233.1.3/24 dev br0
    fi
    ip -n "$tgt" link set br0 up
    ip -n "$ini" link set lo up
    ip -n "$tgt" link set lo up
}

case "$cmd" in
    up) up ;;
    down) down ;;
    *) echo "unknown command $cmd" >&2; exit 2 ;;
esac
