#!/usr/bin/env bash
# Soak: a long run under load and faults, watching the initiator's memory,
# file descriptors and threads.
#
#   bench/soak.sh [minutes]      (default 30; root only)
#
# Two two-path netns beds (scripts/netns-multipath.sh), each with tgtd on
# both portals (file-backed LUNs in /dev/shm, so data survives a restart):
#   - bed K (kernel TCP): `bench --verify` (randrw 4k, QD8) over both paths
#     on LUN 1, and `export-nbd` of LUN 2 over both paths, with two NBD
#     clients beside it: an nbdcopy round trip (a 16 MiB file in, back out,
#     compared) and qemu-io write+read-verify patterns at moving offsets;
#   - bed D (DPDK, net_af_packet + the userspace stack): `bench --verify`
#     over both paths.
# Faults: path 1 of both beds goes down for 5 s every 20 s; bed K's tgtd is
# killed (-9) and restarted once, halfway.
# Every 10 s it samples RSS, open fds and threads of the three initiator
# processes (summed, and per process in the log). It ends with one line:
#   RESULT soak minutes=<m> ios=<n> errors=<n> mismatches=<n> rss_start_mb=<x>
#          rss_end_mb=<x> fds_start=<n> fds_end=<n> threads_start=<n> threads_end=<n>
# "start" is the sample after the first minute (the first sample for runs
# of one minute); "end" the last sample before the benches finish. ios
# counts bench I/Os plus NBD client operations; errors and mismatches are
# summed over all of them. Exit status: 0 when errors=mismatches=0.
#
# Env: BIN (default: cargo build, target/debug/iscsi-bypass), SOAK_KEEP=1
# keeps the work directory.
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-30}
[[ "$minutes" =~ ^[0-9]+$ && "$minutes" -ge 1 ]] || { echo "usage: $0 [minutes>=1]" >&2; exit 2; }
[[ $(id -u) == 0 ]] || { echo "soak: needs root (network namespaces, tgtd)" >&2; exit 1; }
for t in tgtd tgtadm ip nbdcopy qemu-io cmp ethtool; do
    command -v "$t" >/dev/null || { echo "soak: $t is missing (run scripts/setup.sh)" >&2; exit 1; }
done
pmds=/usr/lib/x86_64-linux-gnu/dpdk/pmds-23.0
[[ -d $pmds ]] || { echo "soak: DPDK PMDs missing in $pmds (run scripts/setup.sh)" >&2; exit 1; }
secs=$((minutes * 60))
if [[ -z ${BIN:-} ]]; then
    CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1} cargo build --bin iscsi-bypass >&2
    BIN=target/debug/iscsi-bypass
fi
BIN=$(realpath "$BIN")

id=$$
K=soak${id}k
D=soak${id}d
dir=$(mktemp -d /dev/shm/soak.XXXXXX)
iqn=iqn.2026-11.org.iscsi-bypass.soak:t$id
port=3260
pids=()
declare -A tgtd_pid
log() { printf 'soak %s %s\n' "$(date -u +%H:%M:%S)" "$*"; }

cleanup() {
    set +e
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
    sleep 0.5
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
    # tgtd ignores SIGTERM while it has targets.
    for b in "${!tgtd_pid[@]}"; do kill -9 "${tgtd_pid[$b]}" 2>/dev/null; wait "${tgtd_pid[$b]}" 2>/dev/null; done
    scripts/netns-multipath.sh down "$K"
    scripts/netns-multipath.sh down "$D"
    if [[ ${SOAK_KEEP:-0} == 1 ]]; then echo "soak: kept $dir" >&2; else rm -rf "$dir"; fi
}
trap cleanup EXIT

ctl_of() { if [[ $1 == "$K" ]]; then echo $((3000 + id % 9000)); else echo $((12000 + id % 9000)); fi; }
adm() { local b=$1; shift; tgtadm -C "$(ctl_of "$b")" --lld iscsi "$@"; }

# Starts (or restarts) tgtd in bed $1 with LUN files that already exist.
start_tgtd() {
    local b=$1
    ip netns exec "$b-tgt" tgtd -f -C "$(ctl_of "$b")" --iscsi "portal=10.231.1.2:$port" \
        >>"$dir/tgtd-$b.log" 2>&1 &
    tgtd_pid[$b]=$!
    local ok=0
    for _ in $(seq 100); do
        if adm "$b" --mode target --op show >/dev/null 2>&1; then ok=1; break; fi
        sleep 0.1
    done
    [[ $ok == 1 ]] || { echo "soak: tgtd in $b-tgt did not start" >&2; cat "$dir/tgtd-$b.log" >&2; exit 1; }
    # tgtd keeps only the last --iscsi portal=: add the second one.
    adm "$b" --mode portal --op new --param "portal=10.231.2.2:$port"
    adm "$b" --mode target --op new --tid 1 -T "$iqn"
    adm "$b" --mode logicalunit --op new --tid 1 --lun 1 -b "$dir/$b-lun1.img"
    adm "$b" --mode logicalunit --op new --tid 1 --lun 2 -b "$dir/$b-lun2.img"
    adm "$b" --mode target --op bind --tid 1 -I ALL
}

scripts/netns-multipath.sh up "$K" kernel
scripts/netns-multipath.sh up "$D" dpdk
for b in "$K" "$D"; do
    truncate -s 512M "$dir/$b-lun1.img"
    truncate -s 64M "$dir/$b-lun2.img"
    start_tgtd "$b"
done
urls() { echo "iscsi://10.231.1.2:$port/$iqn/$1 iscsi://10.231.2.2:$port/$iqn/$1"; }
job=(--rw randrw --bs 4k --iodepth 8 --size 256m --verify --runtime "${secs}s" --json)

# --- initiators ---------------------------------------------------------
# shellcheck disable=SC2046
ip netns exec "$K-ini" "$BIN" bench $(urls 1) --transport kernel "${job[@]}" \
    >"$dir/bench-kernel.json" 2>"$dir/bench-kernel.err" &
kbench=$!; pids+=("$kbench")

cpu=$(awk '/Cpus_allowed_list/ {split($2, a, "[,-]"); print a[1]}' /proc/self/status)
free=$(awk '/HugePages_Free/ {print $2}' /proc/meminfo)
if [[ ${free:-0} -ge 64 ]]; then mem="--in-memory --no-telemetry"; else mem="--no-huge -m 256"; fi
eal="-l $cpu --no-pci --vdev net_af_packet0,iface=v0 --vdev net_af_packet1,iface=v1 -d $pmds"
eal+=" --log-level lib.eal:notice $mem --file-prefix soak$id"
# shellcheck disable=SC2046
ip netns exec "$D-ini" "$BIN" bench $(urls 1) --transport dpdk --eal "$eal" \
    --dpdk-port net_af_packet0 --local-ip 10.231.1.1/24 \
    --dpdk-port net_af_packet1 --local-ip 10.231.2.1/24 "${job[@]}" \
    >"$dir/bench-dpdk.json" 2>"$dir/bench-dpdk.err" &
dbench=$!; pids+=("$dbench")

sock=$dir/nbd.sock
# shellcheck disable=SC2046
ip netns exec "$K-ini" "$BIN" export-nbd $(urls 2) --socket "$sock" --no-path-timeout 60 \
    2>"$dir/export-nbd.err" &
nbd=$!; pids+=("$nbd")
for _ in $(seq 300); do [[ -S $sock ]] && break; sleep 0.1; done
[[ -S $sock ]] || { echo "soak: export-nbd did not start" >&2; cat "$dir/export-nbd.err" >&2; exit 1; }
uri="nbd+unix:///?socket=$sock"

# --- NBD clients (until $dir/stop exists) -------------------------------
# Each writes "<ops> <errors> <mismatches>" to its result file at the end.
nbdcopy_loop() {
    local ops=0 err=0 mis=0 n=0
    while [[ ! -e $dir/stop ]]; do
        head -c $((16 << 20)) /dev/urandom >"$dir/copy-in"
        if nbdcopy "$dir/copy-in" "$uri" 2>>"$dir/nbdcopy.err" \
            && nbdcopy "$uri" "$dir/copy-out" 2>>"$dir/nbdcopy.err"; then
            ops=$((ops + 2))
            cmp -n $((16 << 20)) "$dir/copy-in" "$dir/copy-out" >/dev/null \
                || { mis=$((mis + 1)); echo "round $n: data differs" >>"$dir/nbdcopy.err"; }
        else
            err=$((err + 1))
        fi
        n=$((n + 1))
    done
    echo "$ops $err $mis" >"$dir/nbdcopy.result"
}
qemu_io_loop() {
    local ops=0 err=0 mis=0 n=0 out
    while [[ ! -e $dir/stop ]]; do
        local pat=$(( (n * 37 + 11) % 255 + 1 )) off=$(( 16 + (n % 12) * 4 ))
        if out=$(qemu-io -f raw -c "write -P $pat ${off}M 4M" -c "read -P $pat ${off}M 4M" \
            -c "write -z $((off + 1))M 512k" -c "read -P 0 $((off + 1))M 512k" "$uri" 2>&1); then
            ops=$((ops + 4))
            if grep -q "Pattern verification failed" <<<"$out"; then
                mis=$((mis + 1)); echo "round $n: $out" >>"$dir/qemu-io.err"
            elif grep -qiE "fail|error" <<<"$out"; then
                err=$((err + 1)); echo "round $n: $out" >>"$dir/qemu-io.err"
            fi
        else
            err=$((err + 1)); echo "round $n: $out" >>"$dir/qemu-io.err"
        fi
        n=$((n + 1))
    done
    echo "$ops $err $mis" >"$dir/qemu-io.result"
}
nbdcopy_loop & pids+=($!); copyp=$!
qemu_io_loop & pids+=($!); qemup=$!

# --- faults ---------------------------------------------------------------
flapper() {
    local n=0
    while [[ ! -e $dir/stop ]]; do
        sleep 15
        [[ -e $dir/stop ]] && break
        ip -n "$K-tgt" link set t1 down; ip -n "$D-tgt" link set t1 down
        sleep 5
        ip -n "$K-tgt" link set t1 up; ip -n "$D-tgt" link set t1 up
        n=$((n + 1))
    done
    echo "$n" >"$dir/flaps"
}
flapper & pids+=($!); flapp=$!

# --- sampling -------------------------------------------------------------
sample() { # prints "rss_kb fds threads" summed over the initiators
    local rss=0 fds=0 thr=0 p r f t
    for p in "$kbench" "$dbench" "$nbd"; do
        [[ -d /proc/$p ]] || continue
        r=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
        t=$(awk '/^Threads:/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
        f=$(find "/proc/$p/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
        rss=$((rss + ${r:-0})); fds=$((fds + f)); thr=$((thr + ${t:-0}))
        printf ' pid%s=%sKiB/%sfd/%st' "$p" "${r:-0}" "$f" "${t:-0}" >>"$dir/samples.log"
    done
    echo >>"$dir/samples.log"
    echo "$rss $fds $thr"
}
log "running $minutes min: kernel bench pid $kbench, dpdk bench pid $dbench, export-nbd pid $nbd"
start_sample="" end_sample="" restarted=0 t=0 t0=$SECONDS
# Wall-clock time; stop sampling once an initiator has exited (the benches
# end on their own after their runtime, which started a little earlier).
while ((t + 10 <= secs - 5)); do
    next=$((t + 10))
    while ((SECONDS - t0 < next)); do sleep 1; done
    t=$((SECONDS - t0))
    alive=1
    for p in "$kbench" "$dbench" "$nbd"; do
        [[ -d /proc/$p ]] || { log "initiator $p has exited"; alive=0; }
    done
    ((alive)) || break
    s=$(sample)
    log "t=${t}s rss_kb/fds/threads: $s"
    if [[ -z $start_sample && ( $t -ge 60 || $minutes -lt 2 ) ]]; then start_sample=$s; fi
    end_sample=$s
    tail -1 "$dir/samples.log" >"$dir/last-sample"
    [[ -n ${first_proc:-} ]] || { [[ $t -ge 60 || $minutes -lt 2 ]] && first_proc=$(tail -1 "$dir/samples.log"); }
    if [[ $restarted == 0 && $t -ge $((secs / 2)) ]]; then
        log "restarting tgtd of bed $K"
        kill -9 "${tgtd_pid[$K]}"; wait "${tgtd_pid[$K]}" 2>/dev/null || true
        start_tgtd "$K"
        restarted=1
    fi
done
[[ -n $start_sample ]] || start_sample=$end_sample

# --- the end ----------------------------------------------------------------
kst=ok dst=ok
wait "$kbench" || kst=fail
wait "$dbench" || dst=fail
touch "$dir/stop"
wait "$copyp" "$qemup" "$flapp" || true
kill -INT "$nbd" 2>/dev/null || true
sleep 1
kill -9 "$nbd" 2>/dev/null || true
wait "$nbd" 2>/dev/null || true

# Bench I/Os and errors from the JSON reports; a failed verify is a mismatch.
bench_fig() { # file -> "ios errors"
    python3 - "$1" <<'EOF' 2>/dev/null || echo "0 1"
import json, sys
r = json.load(open(sys.argv[1]))
j = r["jobs"][0]
print(j["read"]["total_ios"] + j["write"]["total_ios"], j["error"])
EOF
}
read -r kios kerr <<<"$(bench_fig "$dir/bench-kernel.json")"
read -r dios derr <<<"$(bench_fig "$dir/bench-dpdk.json")"
mis=0 err=$((kerr + derr))
for b in kernel dpdk; do
    if grep -qiE "verify|mismatch|corrupt" "$dir/bench-$b.err"; then mis=$((mis + 1)); fi
done
[[ $kst == ok ]] || { [[ $kerr -gt 0 ]] || err=$((err + 1)); log "kernel bench failed: $(tail -3 "$dir/bench-kernel.err")"; }
[[ $dst == ok ]] || { [[ $derr -gt 0 ]] || err=$((err + 1)); log "dpdk bench failed: $(tail -3 "$dir/bench-dpdk.err")"; }
read -r cops cerr cmis <"$dir/nbdcopy.result" || { cops=0; cerr=1; cmis=0; }
read -r qops qerr qmis <"$dir/qemu-io.result" || { qops=0; qerr=1; qmis=0; }
ios=$((kios + dios + cops + qops))
err=$((err + cerr + qerr))
mis=$((mis + cmis + qmis))
log "kernel bench: $kios I/Os, $kerr errors ($kst); dpdk bench: $dios I/Os, $derr errors ($dst)"
log "nbdcopy: $cops ops, $cerr errors, $cmis mismatches; qemu-io: $qops ops, $qerr errors, $qmis mismatches"
log "path flaps: $(cat "$dir/flaps" 2>/dev/null || echo 0) per bed; tgtd restarts: $restarted"
for f in nbdcopy.err qemu-io.err; do [[ -s $dir/$f ]] && { log "$f:"; tail -5 "$dir/$f"; }; done
log "per process (pid=RSS/fds/threads) at start:${first_proc:-}"
log "per process at end:$(cat "$dir/last-sample" 2>/dev/null)"
read -r rs fs ts <<<"$start_sample"
read -r re fe te <<<"$end_sample"
mb() { awk -v k="$1" 'BEGIN {printf "%.1f", k / 1024}'; }
echo "RESULT soak minutes=$minutes ios=$ios errors=$err mismatches=$mis rss_start_mb=$(mb "$rs") rss_end_mb=$(mb "$re") fds_start=$fs fds_end=$fe threads_start=$ts threads_end=$te"
[[ $err == 0 && $mis == 0 ]]
