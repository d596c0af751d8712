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
# BED=dpdk-ring: examples/dpdk_iscsi_reads instead, the same loop over a
# real DPDK PMD: each side on its own port of a net_ring pair (EAL with
# --no-huge, software checksums), so the counts include the PMD's rx/tx
# bursts, mbuf alloc/free, the C shim (dpdk-sys) and phy::dpdk. Needs root.
#   RESULT bed=ring side= csum= rw= bs= qd= mtu=1500 instructions_per_io=<n> \
#          dpdk_per_io=<n> rte_per_io=<n> shim_per_io=<n> glue_per_io=<n>
# dpdk_per_io is the sum of the part in DPDK's libraries and the net_ring
# PMD (rte_: librte_*), the C shim with the DPDK inlines it wraps (shim_)
# and phy::dpdk's Rust (glue_). (Call counts are not given: callgrind
# counts calls outside the collected functions too, the target's.)
#
# SIDE=target (dpdk-ring only): collect the target's side instead
# (--toggle-collect on target_round: its stack, its TargetConn, its output
# pump `target::user::send_output`, as `iscsi-bypass target --transport
# dpdk` runs them); the line then says side=target. CSUM=sw|trusted
# (dpdk-ring only; sw): both ports' checksum mode. COPY_DATA_IN=1
# (dpdk-ring only): the target copies Data-In payload into its output
# instead of lending it by reference (as before it did), for comparison.
# The dpdk-ring lines also carry side= and csum=. The default,
# SIDE=initiator, is the initiator's CPU per I/O: no target function runs
# inside the initiator's three functions (both share the thread, not the
# calls).
#
# Env: BED (sim | dpdk-ring), SIDE (initiator | target), CSUM, COPY_DATA_IN, SMALL/LARGE (I/Os per run, default
# 2000/6000), CASES (default "read:1 read:32 write:1 write:32"), BS (4096),
# MTU (1500; sim only), BIN (the example binary; default: cargo build
# --release --example user_iscsi_reads or dpdk_iscsi_reads), PROFILE
# (release; dev-opt: the crate optimised as for release over the dev
# profile's dependencies, when a release build is too long), CARGO_TARGET_DIR
# as for cargo.
set -euo pipefail
cd "$(dirname "$0")/.."
SMALL=${SMALL:-2000}
LARGE=${LARGE:-6000}
CASES=${CASES:-read:1 read:32 write:1 write:32}
BS=${BS:-4096}
MTU=${MTU:-1500}
BED=${BED:-sim}
SIDE=${SIDE:-initiator}
CSUM=${CSUM:-sw}
COPY_DATA_IN=${COPY_DATA_IN:-0}
PROFILE=${PROFILE:-release}
case $SIDE in
    initiator) collect=(--toggle-collect='*initiator_submit*' --toggle-collect='*initiator_round*'
                        --toggle-collect='*initiator_complete*') ;;
    target) collect=(--toggle-collect='*target_round*') ;;
    *) echo "SIDE must be initiator or target, not $SIDE" >&2; exit 2 ;;
esac
if [[ $BED != dpdk-ring && ( $SIDE != initiator || $CSUM != sw || $COPY_DATA_IN != 0 ) ]]; then
    echo "SIDE, CSUM and COPY_DATA_IN are for BED=dpdk-ring" >&2; exit 2
fi
case $BED in
    sim) example=user_iscsi_reads ;;
    dpdk-ring) example=dpdk_iscsi_reads; MTU=1500 ;;
    *) echo "BED must be sim or dpdk-ring, not $BED" >&2; exit 2 ;;
esac
command -v valgrind >/dev/null || { echo "valgrind not installed (scripts/setup.sh)" >&2; exit 1; }
if [[ -z ${BIN:-} ]]; then
    cargo_args=(--profile "$PROFILE"); dir=$PROFILE
    if [[ $PROFILE == dev-opt ]]; then
        # The dev profile's dependencies (already built at opt-level 2)
        # with the crate built as for release: a near-release binary
        # without a release build of every dependency.
        cargo_args=(--profile dev)
        for c in opt-level=3 debug-assertions=false overflow-checks=false codegen-units=4; do
            cargo_args+=(--config "profile.dev.package.iscsi-bypass.$c")
        done
        cargo_args+=(--config profile.dev.package.dpdk-sys.opt-level=3)
    fi
    [[ $PROFILE == dev* ]] && dir=debug
    CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1} cargo build "${cargo_args[@]}" --example "$example" >&2
    BIN=${CARGO_TARGET_DIR:-target}/$dir/examples/$example
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Prints "<initiator Ir> <Ir without phy::sim and malloc/free/memset>"
# (sim) or dpdk_split's four figures (dpdk-ring).
measure() {
    local ios=$1 rw=$2 qd=$3 out=$tmp/cg.$1
    local args=(--ios "$ios" --qd "$qd" --bs "$BS")
    [[ $BED == sim ]] && args+=(--mtu "$MTU")
    [[ $BED == dpdk-ring ]] && args+=(--prefix "ib-cg-$$-$ios" --checksum "$CSUM")
    [[ $COPY_DATA_IN == 1 ]] && args+=(--copy-data-in)
    [[ $rw == write ]] && args+=(--write)
    # --fair-sched: the setup (login, TEST UNIT READY) runs the target on
    # a second thread; valgrind's default lock lets the busy-polling main
    # thread starve it past the login's and the NOP ping's timeouts. The
    # counted loop is one thread, so its count does not change.
    local vg=(--tool=callgrind --fair-sched=yes --callgrind-out-file="$out")
    valgrind "${vg[@]}" "${collect[@]}" \
        "$BIN" "${args[@]}" >"$tmp/run.txt" 2>"$tmp/vg.txt" ||
        { cat "$tmp/vg.txt" "$tmp/run.txt" >&2; exit 1; }
    if [[ $BED == dpdk-ring ]]; then
        dpdk_split "$out"
        return
    fi
    callgrind_annotate --auto=no --threshold=100 "$out" 2>/dev/null | awk '
        /PROGRAM TOTALS/ { gsub(",", "", $1); total = $1 }
        /^ *[0-9,]+ \(/ && !/PROGRAM TOTALS/ {
            n = $1; gsub(",", "", n)
            if ($0 ~ /phy::sim|malloc|_int_free|cfree|realloc|memset|calloc/) sim += n
        }
        END { printf "%d %d\n", total, total - sim }'
}

# The DPDK bed's split of the initiator's Ir (self cost by function):
# total, DPDK's libraries and PMD (librte_*), the C shim (shim_*, with
# the DPDK inlines it wraps) and phy::dpdk (the Rust glue).
dpdk_split() {
    callgrind_annotate --auto=no --threshold=100 "$1" 2>/dev/null | awk '
        /PROGRAM TOTALS/ { gsub(",", "", $1); total = $1 }
        /^ *[0-9,]+ \(/ && !/PROGRAM TOTALS/ {
            n = $1; gsub(",", "", n)
            if ($0 ~ /librte_/) lib += n
            else if ($0 ~ /:shim_/) shim += n
            else if ($0 ~ /phy::dpdk/) glue += n
        }
        END { printf "%d %d %d %d\n", total, lib, shim, glue }'
}

if [[ $BED == dpdk-ring ]]; then
    for case in $CASES; do
        rw=${case%:*}; qd=${case#*:}
        read -r t1 l1 s1 g1 < <(measure "$SMALL" "$rw" "$qd")
        read -r t2 l2 s2 g2 < <(measure "$LARGE" "$rw" "$qd")
        awk -v dt=$((t2 - t1)) -v dl=$((l2 - l1)) -v ds=$((s2 - s1)) -v dg=$((g2 - g1)) \
            -v dn=$((LARGE - SMALL)) -v rw="$rw" -v qd="$qd" -v bs="$BS" -v side="$SIDE" \
            -v csum="$CSUM$([[ $COPY_DATA_IN == 1 ]] && echo ' data_in=copy')" 'BEGIN {
            printf "RESULT bed=ring side=%s csum=%s rw=%s bs=%s qd=%s mtu=1500 instructions_per_io=%.0f dpdk_per_io=%.0f rte_per_io=%.0f shim_per_io=%.0f glue_per_io=%.0f\n",
                side, csum, rw, bs, qd, dt / dn, (dl + ds + dg) / dn, dl / dn, ds / dn, dg / dn }'
    done
    exit 0
fi

for case in $CASES; do
    rw=${case%:*}; qd=${case#*:}
    read -r t1 s1 < <(measure "$SMALL" "$rw" "$qd")
    read -r t2 s2 < <(measure "$LARGE" "$rw" "$qd")
    awk -v dt=$((t2 - t1)) -v ds=$((s2 - s1)) -v dn=$((LARGE - SMALL)) \
        -v rw="$rw" -v qd="$qd" -v bs="$BS" -v mtu="$MTU" 'BEGIN {
        printf "RESULT bed=sim rw=%s bs=%s qd=%s mtu=%s instructions_per_io=%.0f without_sim_per_io=%.0f\n",
            rw, bs, qd, mtu, dt / dn, ds / dn }'
done
