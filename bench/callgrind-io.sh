#!/usr/bin/env bash
# Instructions per I/O of the initiator on the userspace stack, counted by
# callgrind, so the figure does not depend on load or on PMU counters (VMs
# often have none; bench/bypass.sh then prints instructions_per_io=na).
#
# Bed: examples/user_iscsi_reads — a Session over UserTcp on the in-memory
# link (phy::sim, software checksums both ways, MTU 1500 unless MTU is set)
# against the embedded target's sans-IO connection, both on one thread.
# Only the initiator's functions are collected (--toggle-collect on
# initiator_submit / initiator_round / initiator_complete: iSCSI, TCP/IP
# and the device's rx/tx); the target's side is not counted. Each case is
# run at two I/O counts and the difference is divided by the difference of
# I/Os, so the first rounds (cold caches, the login's leftovers) cancel.
#
# One line per case:
#   RESULT bed=sim rw=<read|write> bs= qd= mtu= instructions_per_io=<n> \
#          without_sim_per_io=<n>
# without_sim_per_io leaves out phy::sim's own code and the malloc/free/
# memset it does per frame (a DPDK port has its own, smaller, rx/tx cost).
#
# Env: SMALL/LARGE (I/Os per run, default 2000/6000), CASES (default
# "read:1 read:32 write:1 write:32"), BS (4096), MTU (1500), BIN (the
# example binary; default: cargo build --release --example user_iscsi_reads),
# CARGO_TARGET_DIR as for cargo.
set -euo pipefail
cd "$(dirname "$0")/.."
SMALL=${SMALL:-2000}
LARGE=${LARGE:-6000}
CASES=${CASES:-read:1 read:32 write:1 write:32}
BS=${BS:-4096}
MTU=${MTU:-1500}
command -v valgrind >/dev/null || { echo "valgrind not installed (scripts/setup.sh)" >&2; exit 1; }
if [[ -z ${BIN:-} ]]; then
    CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1} cargo build --release --example user_iscsi_reads >&2
    BIN=${CARGO_TARGET_DIR:-target}/release/examples/user_iscsi_reads
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Prints "<initiator Ir> <Ir without phy::sim and malloc/free/memset>".
measure() {
    local ios=$1 rw=$2 qd=$3 out=$tmp/cg.$1
    local args=(--ios "$ios" --qd "$qd" --bs "$BS" --mtu "$MTU")
    [[ $rw == write ]] && args+=(--write)
    valgrind --tool=callgrind --callgrind-out-file="$out" \
        --toggle-collect='*initiator_submit*' --toggle-collect='*initiator_round*' \
        --toggle-collect='*initiator_complete*' \
        "$BIN" "${args[@]}" >"$tmp/run.txt" 2>"$tmp/vg.txt" ||
        { cat "$tmp/vg.txt" "$tmp/run.txt" >&2; exit 1; }
    callgrind_annotate --auto=no --threshold=100 "$out" 2>/dev/null | awk '
        /PROGRAM TOTALS/ { gsub(",", "", $1); total = $1 }
        /^ *[0-9,]+ \(/ && !/PROGRAM TOTALS/ {
            n = $1; gsub(",", "", n)
            if ($0 ~ /phy::sim|malloc|_int_free|cfree|realloc|memset|calloc/) sim += n
        }
        END { printf "%d %d\n", total, total - sim }'
}

for case in $CASES; do
    rw=${case%:*}; qd=${case#*:}
    read -r t1 s1 < <(measure "$SMALL" "$rw" "$qd")
    read -r t2 s2 < <(measure "$LARGE" "$rw" "$qd")
    awk -v dt=$((t2 - t1)) -v ds=$((s2 - s1)) -v dn=$((LARGE - SMALL)) \
        -v rw="$rw" -v qd="$qd" -v bs="$BS" -v mtu="$MTU" 'BEGIN {
        printf "RESULT bed=sim rw=%s bs=%s qd=%s mtu=%s instructions_per_io=%.0f without_sim_per_io=%.0f\n",
            rw, bs, qd, mtu, dt / dn, ds / dn }'
done
