#!/usr/bin/env bash
# Multipath figures on the two-path netns bed (scripts/netns-multipath.sh,
# tgtd on two portals), over kernel TCP and over DPDK (one net_af_packet
# port + userspace stack per path), from the scenarios of tests/multipath.rs
# (test profile: opt-level 1, dependencies 2):
#   - IOPS split per path under queue-depth (4 KiB random reads, QD16);
#   - two rate-limited paths vs one (tbf 200 Mbit/s each, 128 KiB reads);
#   - a slow path (netem delay, or tbf 20 Mbit/s where netem is missing):
#     IOPS, fast-path share, p50/p99/p99.9 per policy, and per policy
#     `RESULT case=slow_path policy=... p99_us=... fast_alone_p99_us=...
#     p99_over_fast_alone=...`: the peer is the fast path alone, measured
#     first in the same run (goal: ratio <= 1.5);
#   - link down during write+verify and 20 s of flapping: errors,
#     mismatches, p50/p99/p99.9, failover stall (the longest gap between any
#     two completions, and the longest time one failed-over write took);
#   - write fencing stall with the default detection and fence settings
#     (tests/multipath_relay.rs: tgtd on 127.0.0.1 + 127.0.0.2, one path
#     through a pausable relay): `RESULT case=dead_link|hung_path
#     max_stall_ms=...`, the longest a write waited after the relay stopped
#     delivering (goals: dead link <= 1000 ms, hung path <= 2000 ms), and
#     the unfenced run (retried at once, the stale write lands) as the peer:
#     `RESULT case=fence_cost ..._over_unfenced=` ratios.
#   - MC/S beside MPIO (kernel TCP; tgtd with MaxConnections raised): the
#     IOPS split and the link-down failover stall with the two paths as two
#     connections of one session, `RESULT case=iops_split|failover_stall
#     mode=mcs|mpio ...`, and `RESULT case=mcs_vs_mpio` ratios.
# Root only; the tests create and remove everything themselves.
#
#   bench/multipath.sh [kernel|dpdk|slow|relay|mcs|all]   (default all;
#   slow: only the slow-path case, over both transports; mcs: the MC/S
#   cases and their MPIO peers)
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $(id -u) == 0 ]] || { echo "needs root" >&2; exit 1; }
which=${1:-all}
filter=""
case "$which" in
    kernel) filter=kernel_ ;;
    dpdk) filter=dpdk_ ;;
    slow) filter=slow_path ;;
    relay) ;;
    mcs) filter="kernel_" ;;
    all) ;;
    *) echo "usage: $0 [kernel|dpdk|slow|relay|mcs|all]" >&2; exit 2 ;;
esac
export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1}
log=$(mktemp /tmp/multipath-bench.XXXXXX)
trap 'rm -f "$log"' EXIT
if [[ $which == mcs ]]; then
    # The MC/S cases and the same scenarios as MPIO, in one run.
    CI=true cargo test --test multipath -- --test-threads=1 --nocapture \
        kernel_mcs_ kernel_both_paths_carry_io kernel_link_down_fails_over \
        >"$log" 2>&1 || { cat "$log"; exit 1; }
elif [[ $which != relay ]]; then
    CI=true cargo test --test multipath -- $filter --test-threads=1 --nocapture \
        >"$log" 2>&1 || { cat "$log"; exit 1; }
fi
if [[ $which != relay ]]; then
    # Each scenario's lines start with "MP == <scenario> over <transport>".
    sed -n -e 's/^.*MP == /== /p' -e 's/^.*MP RESULT /RESULT /p' -e 's/^.*MP /  /p' \
        -e '/^test result/p' "$log"
    grep -o 'MP RESULT case=\(iops_split\|failover_stall scenario=linkdown\) .*' "$log" | sed 's/^MP //' | awk '
        { for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
          if (v["case"] == "iops_split") iops[v["mode"]] = v["iops"]
          else stall[v["mode"]] = v["max_gap_ms"] }
        END {
          if (iops["mpio"] > 0 && stall["mpio"] > 0 && ("mcs" in iops) && ("mcs" in stall))
            printf "RESULT case=mcs_vs_mpio iops_mcs_over_mpio=%.2f failover_stall_mcs_over_mpio=%.2f\n", iops["mcs"] / iops["mpio"], stall["mcs"] / stall["mpio"]
        }'
fi
if [[ $which == relay || $which == all ]]; then
    CI=true cargo test --test multipath_relay -- --test-threads=1 --nocapture \
        >"$log" 2>&1 || { cat "$log"; exit 1; }
    echo "== write fencing stall (tgtd, one path through a pausable relay, default settings)"
    grep -o 'RESULT .*' "$log"
    grep -o 'RESULT .*' "$log" | awk '
        { for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
          stall[v["case"]] = v["max_stall_ms"] }
        END {
          u = stall["hung_path_unfenced"]
          if (u > 0)
            printf "RESULT case=fence_cost dead_link_over_unfenced=%.2f hung_path_over_unfenced=%.2f dead_link_goal_ms=1000 hung_path_goal_ms=2000\n", stall["dead_link"] / u, stall["hung_path"] / u
        }'
fi
