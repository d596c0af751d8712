#!/usr/bin/env bash
# Multipath figures on the two-path netns bed (scripts/netns-multipath.sh,
# tgtd on two portals), over kernel TCP and over DPDK (one net_af_packet
# port + userspace stack per path), from the scenarios of tests/multipath.rs
# (test profile: opt-level 1, dependencies 2):
#   - IOPS split per path under queue-depth (4 KiB random reads, QD16);
#   - two rate-limited paths vs one (tbf 200 Mbit/s each, 128 KiB reads);
#   - a slow path (netem delay, or tbf 20 Mbit/s where netem is missing):
#     IOPS, fast-path share, p50/p99/p99.9 per policy, round-robin being
#     the peer the others are compared with;
#   - link down during write+verify and 20 s of flapping: errors,
#     mismatches, p50/p99/p99.9, failover stall (the longest gap between any
#     two completions, and the longest time one failed-over write took).
# Root only; the tests create and remove everything themselves.
#
#   bench/multipath.sh [kernel|dpdk|all]   (default all)
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $(id -u) == 0 ]] || { echo "needs root" >&2; exit 1; }
which=${1:-all}
filter=""
case "$which" in
    kernel) filter=kernel_ ;;
    dpdk) filter=dpdk_ ;;
    all) ;;
    *) echo "usage: $0 [kernel|dpdk|all]" >&2; exit 2 ;;
esac
export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1}
log=$(mktemp /tmp/multipath-bench.XXXXXX)
trap 'rm -f "$log"' EXIT
CI=true cargo test --test multipath -- $filter --test-threads=1 --nocapture \
    >"$log" 2>&1 || { cat "$log"; exit 1; }
# Each scenario's lines start with "MP == <scenario> over <transport>".
sed -n -e 's/^.*MP == /== /p' -e 's/^.*MP /  /p' -e '/^test result/p' "$log"
