#!/usr/bin/env bash
# Three ways to drive the same LU with the same workload, in one run,
# against the embedded null target (`iscsi-bypass target --null`, two
# loopback portals, so two paths each):
#   fio-engine  fio with the external ioengine (libfio_iscsi_bypass.so);
#   bench       `iscsi-bypass bench` (the library's own fio-like engine);
#   fio-nbd     fio's nbd engine against `iscsi-bypass export-nbd` (Unix socket).
# Each case prints
#   RESULT tool=T rw=RW bs=BS qd=QD iops=N cpu_ns_per_io=N iops_vs_bench=R cpu_vs_bench=R
# CPU is user+system time of everything on the initiator side (fio and its
# job processes, the bench process, or fio plus the export-nbd server; the
# target is left out), divided by the I/Os completed; no ramp, so login and
# setup are in it (a few ms in RUNTIME seconds).
#
#   bench/fio.sh                 (RUNTIME=8 seconds per run; PROFILE=release)
#   PROFILE=debug bench/fio.sh   (the dev-profile builds, e.g. those the tests made)
#   SKIP_BUILD=1 ...             (use target/$PROFILE/{iscsi-bypass,libfio_iscsi_bypass.so} as they are)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNTIME=${RUNTIME:-8}
PROFILE=${PROFILE:-release}
CASES=${CASES:-"randread:4k:32 randread:4k:1 randwrite:64k:8"}
command -v fio >/dev/null || { echo "fio missing (scripts/setup.sh)" >&2; exit 1; }

flags=()
[[ $PROFILE == release ]] && flags=(--release)
[[ $PROFILE == debug ]] && engine_flag=--debug || engine_flag=""
bin=$PWD/target/$PROFILE/iscsi-bypass
so=$PWD/target/$PROFILE/libfio_iscsi_bypass.so
if [[ ${SKIP_BUILD:-0} == 1 ]]; then
    [[ -x $bin && -f $so ]] || { echo "SKIP_BUILD=1 but $bin or $so is missing" >&2; exit 1; }
else
    cargo build -q "${flags[@]}" --bin iscsi-bypass
    so=$(bash scripts/fio-engine.sh $engine_flag)
fi

work=$(mktemp -d /tmp/fio-bench.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
    for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
    echo "nothing listens on port $1" >&2; return 1
}

iqn=iqn.2026-11.org.iscsi-bypass:fio-bench
p1=$(free_port); p2=$(free_port)
"$bin" target --null --size 1g --iqn "$iqn" --portal "127.0.0.1:$p1" --portal "127.0.0.1:$p2" \
    --no-auth >"$work/target.log" 2>&1 &
pids+=($!)
wait_port "$p1"; wait_port "$p2"
url1=iscsi://127.0.0.1:$p1/$iqn/0
url2=iscsi://127.0.0.1:$p2/$iqn/0

tck=$(python3 -c 'import os; print(os.sysconf("SC_CLK_TCK"))')
# CPU seconds (user+sys) of the children a shell waited for, from the last
# line of `times` (run in that shell itself: a pipe would fork it).
cpu_of() { tail -1 <<<"$1" | awk '{ gsub(/[ms]/, " "); print $1*60 + $2 + $3*60 + $4 }'; }
# CPU ticks (user+sys) of a running process.
proc_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
# I/Os (read + write) of fio's or bench's JSON report.
json_ios() { python3 -c 'import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index("{"):])["jobs"][0]; print(j["read"]["total_ios"]+j["write"]["total_ios"])'; }

fio_common=(--name=bench --rw=RW --bs=BS --iodepth=QD --time_based --runtime="$RUNTIME"
            --norandommap --randrepeat=0 --output-format=json)

results=()
for case in $CASES; do
    IFS=: read -r rw bs qd <<<"$case"
    job=("${fio_common[@]/RW/$rw}"); job=("${job[@]/BS/$bs}"); job=("${job[@]/QD/$qd}")

    # fio + the engine.
    cpu=$( { fio "${job[@]}" --ioengine="external:$so" --filename="${url1//:/\\:}" \
               --iscsi_paths="$url2" >"$work/engine.json" 2>"$work/engine.err" ||
             { cat "$work/engine.err" >&2; exit 1; }; times; } )
    cpu=$(cpu_of "$cpu")
    ios=$(json_ios <"$work/engine.json")
    engine=("$ios" "$cpu")

    # iscsi-bypass bench, the same job.
    cpu=$( { "$bin" bench --json --rw "$rw" --bs "$bs" --iodepth "$qd" --runtime "$RUNTIME" \
               "$url1" "$url2" >"$work/bench.json" 2>"$work/bench.err" ||
             { cat "$work/bench.err" >&2; exit 1; }; times; } )
    cpu=$(cpu_of "$cpu")
    ios=$(json_ios <"$work/bench.json")
    bench=("$ios" "$cpu")

    # fio's nbd engine through export-nbd.
    sock=$work/nbd.sock
    rm -f "$sock"
    "$bin" export-nbd --socket "$sock" "$url1" "$url2" >"$work/nbd.log" 2>&1 &
    nbd_pid=$!
    pids+=("$nbd_pid")
    for _ in $(seq 100); do [[ -S $sock ]] && break; sleep 0.1; done
    [[ -S $sock ]] || { cat "$work/nbd.log" >&2; exit 1; }
    before=$(proc_ticks "$nbd_pid")
    cpu=$( { fio "${job[@]}" --ioengine=nbd --uri="nbd+unix:///?socket=$sock" \
               >"$work/nbd.json" 2>"$work/nbd.err" || { cat "$work/nbd.err" >&2; exit 1; }; times; } )
    after=$(proc_ticks "$nbd_pid")
    cpu=$(cpu_of "$cpu")
    kill "$nbd_pid"; wait "$nbd_pid" 2>/dev/null || true
    ios=$(json_ios <"$work/nbd.json")
    nbd=("$ios" "$(awk -v c="$cpu" -v t=$((after - before)) -v k="$tck" 'BEGIN { print c + t / k }')")

    for tool in fio-engine bench fio-nbd; do
        case $tool in
            fio-engine) r=("${engine[@]}") ;;
            bench) r=("${bench[@]}") ;;
            fio-nbd) r=("${nbd[@]}") ;;
        esac
        awk -v tool="$tool" -v rw="$rw" -v bs="$bs" -v qd="$qd" -v t="$RUNTIME" \
            -v ios="${r[0]}" -v cpu="${r[1]}" -v bios="${bench[0]}" -v bcpu="${bench[1]}" 'BEGIN {
                iops = ios / t; per = ios > 0 ? cpu * 1e9 / ios : 0
                biops = bios / t; bper = bios > 0 ? bcpu * 1e9 / bios : 0
                printf "RESULT tool=%s rw=%s bs=%s qd=%s iops=%.0f cpu_ns_per_io=%.0f iops_vs_bench=%.2f cpu_vs_bench=%.2f\n",
                    tool, rw, bs, qd, iops, per, (biops > 0 ? iops / biops : 0), (bper > 0 ? per / bper : 0)
            }'
    done
done
