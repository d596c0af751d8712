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
#   - MC/S beside MPIO (kernel TCP; tgtd with MaxConnections raised), the
#     two paths as two sessions (mode=mpio) and as two connections of one
#     session (mode=mcs), one `RESULT case=... mode=mpio|mcs` line each:
#     iops_split (4 KiB random reads QD16, path 0's share);
#     rate_limited_pair (tbf 200 Mbit/s per path, two paths over one:
#     two_over_one, goal 2); slow_link_p99 (path 1 with 4 ms netem delay,
#     or tbf 20 Mbit/s, queue-depth and historical-service-time, p99 over
#     the fast path alone measured in the same run, goal <= 1.5);
#     failover_stall scenario=linkdown (max_gap_ms, the longest gap between
#     write completions when path 0's link goes down); write_ordering (300
#     rounds of 4 overlapping writes to one chunk in flight at once,
#     round-robin, then read back: reorderings counted, waited-for writes
#     must read back the newest). Then `RESULT case=mcs_vs_mpio` with the
#     mcs/mpio ratios of the cases both modes ran.
# Root only; the tests create and remove everything themselves.
#
#   bench/multipath.sh [kernel|dpdk|slow|relay|mcs|all]   (default all;
#   slow: only the slow-path cases, the policies over both transports and
#   slow_link_p99 as MPIO and MC/S over kernel TCP; mcs: the MC/S
#   cases and their MPIO peers)
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $(id -u) == 0 ]] || { echo "needs root" >&2; exit 1; }
which=${1:-all}
filter=""
case "$which" in
    kernel) filter=kernel_ ;;
    dpdk) filter=dpdk_ ;;
    slow) filter="slow_path p99_beside_a_slow_link" ;;
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
        kernel_two_rate_limited_paths kernel_p99_beside_a_slow_link \
        kernel_overlapping_writes \
        >"$log" 2>&1 || { cat "$log"; exit 1; }
elif [[ $which != relay ]]; then
    CI=true cargo test --test multipath -- $filter --test-threads=1 --nocapture \
        >"$log" 2>&1 || { cat "$log"; exit 1; }
fi
if [[ $which != relay ]]; then
    # Each scenario's lines start with "MP == <scenario> over <transport>".
    sed -n -e 's/^.*MP == /== /p' -e 's/^.*MP RESULT /RESULT /p' -e 's/^.*MP /  /p' \
        -e '/^test result/p' "$log"
    grep -o 'MP RESULT case=.*' "$log" | sed 's/^MP //' | awk '
        { delete v
          for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
          m = v["mode"]; c = v["case"]
          if (c == "iops_split") iops[m] = v["iops"]
          else if (c == "failover_stall" && v["scenario"] == "linkdown") stall[m] = v["max_gap_ms"]
          else if (c == "rate_limited_pair") { pair[m] = v["two_paths_mbs"]; pairx[m] = v["two_over_one"] }
          else if (c == "slow_link_p99" && v["policy"] == "historical-service-time") { hp99[m] = v["p99_us"]; hp99x[m] = v["p99_over_fast_alone"] }
          else if (c == "slow_link_p99") { p99[m] = v["p99_us"]; p99x[m] = v["p99_over_fast_alone"] }
          else if (c == "write_ordering") { newest[m] = v["not_newest_issued"]; lastack[m] = v["not_last_acked"]; rounds[m] = v["rounds"] } }
        function ratio(name, a) {
          if (("mcs" in a) && ("mpio" in a) && a["mpio"] > 0) out = out sprintf(" %s_mcs_over_mpio=%.2f", name, a["mcs"] / a["mpio"])
        }
        END {
          out = ""
          ratio("iops", iops); ratio("rate_limited_mbs", pair); ratio("slow_link_p99", p99)
          ratio("slow_link_p99_hst", hp99); ratio("failover_stall", stall)
          if (("mcs" in pairx) && ("mpio" in pairx)) out = out sprintf(" two_over_one_mpio=%s two_over_one_mcs=%s", pairx["mpio"], pairx["mcs"])
          if (("mcs" in p99x) && ("mpio" in p99x)) out = out sprintf(" p99_over_fast_alone_mpio=%s p99_over_fast_alone_mcs=%s", p99x["mpio"], p99x["mcs"])
          if (("mcs" in hp99x) && ("mpio" in hp99x)) out = out sprintf(" hst_p99_over_fast_alone_mpio=%s hst_p99_over_fast_alone_mcs=%s", hp99x["mpio"], hp99x["mcs"])
          if (("mcs" in newest) && ("mpio" in newest)) out = out sprintf(" reordered_of_%s_mpio=%s reordered_of_%s_mcs=%s not_last_acked_mpio=%s not_last_acked_mcs=%s", rounds["mpio"], newest["mpio"], rounds["mcs"], newest["mcs"], lastack["mpio"], lastack["mcs"])
          if (out != "") print "RESULT case=mcs_vs_mpio" out
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
