#!/usr/bin/env bash
# Checks that this host is set up for port binding over kernel TCP on the
# given interfaces (those that share a subnet), the way Linux needs it when
# several NICs sit in one broadcast domain (docs/multipath.md, "Port
# binding"):
#   - arp_ignore=1: an interface answers ARP only for its own addresses
#     (else every NIC answers for all of them, and the target sends a
#     path's replies to whichever NIC answered first);
#   - arp_announce=2: ARP requests out of an interface carry its own address;
#   - rp_filter not 1 (strict): replies arriving on the "second" NIC of the
#     subnet would be dropped;
#   - a routing rule per address (`from ADDR lookup T`) whose table routes
#     the subnet through that interface, so that a connection bound by
#     source address alone leaves through the interface owning it.
# Prints the commands that fix what is missing on stdout (pipe them to sh
# to apply), the reasons on stderr; exits 0 when all is set, 1 when not,
# 2 on bad usage.
#
# usage: check-port-binding.sh IFACE [IFACE...]
set -uo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 IFACE [IFACE...]" >&2
    exit 2
fi

fixes=()
add_fix() {
    local f
    for f in "${fixes[@]}"; do [[ "$f" == "$1" ]] && return; done
    fixes+=("$1")
}
conf() { cat "/proc/sys/net/ipv4/conf/$1/$2" 2>/dev/null || echo 0; }
max() { if (($1 > $2)); then echo "$1"; else echo "$2"; fi; }

for dev in "$@"; do
    if [[ ! -d "/proc/sys/net/ipv4/conf/$dev" ]]; then
        echo "no interface $dev here" >&2
        exit 2
    fi
    v=$(max "$(conf all arp_ignore)" "$(conf "$dev" arp_ignore)")
    if ((v < 1)); then
        echo "$dev: arp_ignore=$v: answers ARP for the other interfaces' addresses" >&2
        add_fix "sysctl -qw net.ipv4.conf.$dev.arp_ignore=1"
    fi
    v=$(max "$(conf all arp_announce)" "$(conf "$dev" arp_announce)")
    if ((v < 2)); then
        echo "$dev: arp_announce=$v: its ARP requests may carry another interface's address" >&2
        add_fix "sysctl -qw net.ipv4.conf.$dev.arp_announce=2"
    fi
    v=$(max "$(conf all rp_filter)" "$(conf "$dev" rp_filter)")
    if ((v == 1)); then
        echo "$dev: rp_filter=1 (strict) drops replies that arrive on it for another interface's route" >&2
        add_fix "sysctl -qw net.ipv4.conf.all.rp_filter=2"
        add_fix "sysctl -qw net.ipv4.conf.$dev.rp_filter=2"
    fi
    table=$((100 + $(cat "/sys/class/net/$dev/ifindex")))
    for cidr in $(ip -o -4 addr show dev "$dev" | awk '{print $4}'); do
        addr=${cidr%/*}
        t=$(ip rule show | awk -v a="$addr" '$2 == "from" && $3 == a && $4 == "lookup" {print $5; exit}')
        if [[ -z "$t" ]]; then
            echo "$dev: no routing rule for source $addr (ip rule: from $addr lookup TABLE)" >&2
            add_fix "ip rule add from $addr table $table"
            t=$table
        fi
        if ! ip route show table "$t" 2>/dev/null | grep -qw "dev $dev"; then
            net=$(ip -o -4 route show dev "$dev" proto kernel scope link | awk -v a="$addr" '$0 ~ ("src " a "( |$)") {print $1; exit}')
            [[ -n "$net" ]] || net=$cidr
            echo "$dev: routing table $t has no route through $dev for $addr" >&2
            add_fix "ip route add $net dev $dev src $addr table $t"
        fi
    done
done

if ((${#fixes[@]} == 0)); then
    echo "port binding set-up OK on: $*" >&2
    exit 0
fi
printf '%s\n' "${fixes[@]}"
exit 1
