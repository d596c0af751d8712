#!/usr/bin/env bash
# Userspace TCP/IP stack benchmark.
#
# (a) CPU cost of the stack alone: examples/stack_bulk moves data between two
#     stacks over the in-memory link (phy::sim, virtual time, no loss).
#     Under valgrind/callgrind, the marginal instruction count per data
#     segment (difference of a SMALL and a LARGE run, so start-up cancels)
#     is reported in total and without the simulated link (phy::sim and the
#     malloc/free it does per frame). Both stacks count: the sender's tx +
#     ACK rx and the receiver's rx + ACK tx, plus the application copies.
#     Then plain throughput of the same program.
# (b) Bulk TCP over one veth pair to a kernel TCP peer in a netns: the
#     kernel socket path vs the userspace stack on DPDK (net_af_packet),
#     printed as a ratio (examples/veth_bulk; needs root).
#
# Env: SMALL/LARGE (MiB under callgrind, default 8/24), THROUGHPUT_MIB
# (default 256), VETH_MIB (default 512), SKIP_VETH=1, CARGO_BUILD_JOBS.
set -euo pipefail
cd "$(dirname "$0")/.."

SMALL=${SMALL:-8}
LARGE=${LARGE:-24}
THROUGHPUT_MIB=${THROUGHPUT_MIB:-256}
VETH_MIB=${VETH_MIB:-512}
export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1}

examples=(--example stack_bulk)
[[ ${SKIP_VETH:-0} == 1 ]] || examples+=(--example veth_bulk)
cargo build --release "${examples[@]}" >&2
bin=target/release/examples
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

command -v valgrind >/dev/null || { echo "valgrind not installed" >&2; exit 1; }

# Prints "<total Ir> <Ir without phy::sim and malloc/free> <data segments>".
measure() {
    local mib=$1; shift
    local out=$tmp/cg.$mib.$#
    valgrind --tool=callgrind --callgrind-out-file="$out" \
        "$bin/stack_bulk" "$mib" "$@" >"$tmp/run.txt" 2>/dev/null
    local segs
    segs=$(sed -n 's/.*data_segments=\([0-9]*\).*/\1/p' "$tmp/run.txt")
    callgrind_annotate --auto=no --threshold=100 "$out" 2>/dev/null | awk -v segs="$segs" '
        /PROGRAM TOTALS/ { gsub(",", "", $1); total = $1 }
        /^ *[0-9,]+ \(/ && !/PROGRAM TOTALS/ {
            n = $1; gsub(",", "", n)
            if ($0 ~ /phy::sim|malloc|_int_free|cfree|realloc/) sim += n
        }
        END { printf "%d %d %d\n", total, total - sim, segs }'
}

echo "== (a) stack alone, two stacks over phy::sim (callgrind, marginal ${SMALL}->${LARGE} MiB)"
for mode in "" "--offload"; do
    read -r t1 s1 n1 < <(measure "$SMALL" $mode)
    read -r t2 s2 n2 < <(measure "$LARGE" $mode)
    dn=$((n2 - n1))
    label=${mode:-"--software-checksums"}
    awk -v dt=$((t2 - t1)) -v ds=$((s2 - s1)) -v dn=$dn -v label="$label" 'BEGIN {
        printf "  %-22s %7.0f instructions/data segment in total, %7.0f without the sim link (%d segments, MSS payload)\n",
            label, dt / dn, ds / dn, dn }'
done
echo "  (--offload: the sim link computes/validates checksums like a NIC would, so that work"
echo "   is counted as link cost; software mode is the stack doing checksums itself)"

echo "== (a) throughput, ${THROUGHPUT_MIB} MiB, both stacks on one thread"
"$bin/stack_bulk" "$THROUGHPUT_MIB" | sed -n 1p | sed 's/^/  /'
"$bin/stack_bulk" "$THROUGHPUT_MIB" --offload | sed -n 1p | sed 's/^/  /'

if [[ ${SKIP_VETH:-0} == 1 ]]; then
    echo "== (b) skipped (SKIP_VETH=1)"
elif [[ $(id -u) != 0 ]]; then
    echo "== (b) skipped: needs root (netns, veth, DPDK)"
else
    echo "== (b) bulk over one veth pair, kernel TCP peer in a netns"
    free=$(awk '/HugePages_Free/ {print $2}' /proc/meminfo)
    flag=""
    [[ ${free:-0} -ge 64 ]] || flag="--no-huge"
    "$bin/veth_bulk" "$VETH_MIB" $flag 2> >(grep -v -e '^EAL: No free' -e '^TELEMETRY' >&2) | sed 's/^/  /'
fi
