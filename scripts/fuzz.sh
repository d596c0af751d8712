#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for N seconds each (default 10).
#
#   scripts/fuzz.sh [seconds-per-target] [target...]
#
# Works on stable Rust: cargo-fuzz needs nightly-only flags (-Zsanitizer,
# -Cpasses=sancov), which RUSTC_BOOTSTRAP=1 unlocks on a stable toolchain.
# Builds with debug assertions (integer overflow checks) and AddressSanitizer.
# New inputs libFuzzer finds go to a scratch corpus, so the committed seeds
# in fuzz/corpus/<target>/ stay small; pass FUZZ_KEEP_CORPUS=1 to merge the
# new inputs back into them instead. Exits non-zero on the first crash,
# leak, timeout or OOM, printing the path of the input that caused it
# (reproduce with `RUSTC_BOOTSTRAP=1 cargo fuzz run -O -a <target> <path>`;
# then copy it to fuzz/regressions/<target>/, which the stable replay test
# `cargo test --manifest-path fuzz/Cargo.toml` runs on every CI build).
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-10}"
shift || true
export RUSTC_BOOTSTRAP=1
export CARGO_TERM_COLOR=never

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

flags=(-O -a)
echo "== cargo fuzz build ${flags[*]} (${#targets[@]} targets)"
cargo fuzz build "${flags[@]}" >&2
# Run the built binaries directly: `cargo fuzz run` would call cargo again
# per target, and anything that makes cargo rebuild (e.g. a build script
# that reruns every time) would then cost a rebuild per target.
triple="$(rustc -vV | sed -n 's/^host: //p')"
bindir="fuzz/target/$triple/release"

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
summary=()
for t in "${targets[@]}"; do
    seeds="fuzz/corpus/$t"
    mkdir -p "$seeds" "$scratch/$t"
    log="$scratch/$t.log"
    echo "== $t for ${secs}s"
    corpus=("$scratch/$t" "$seeds")
    if [ "${FUZZ_KEEP_CORPUS:-0}" = 1 ]; then
        corpus=("$seeds")
    fi
    # Inputs that once crashed a target (kept as regressions) seed it too.
    if [ -d "fuzz/regressions/$t" ]; then
        corpus+=("fuzz/regressions/$t")
    fi
    set +e
    mkdir -p "fuzz/artifacts/$t"
    "$bindir/$t" -artifact_prefix="fuzz/artifacts/$t/" \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 "${corpus[@]}" >"$log" 2>&1
    rc=$?
    set -e
    execs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)"
    cov="$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*')"
    if [ "$rc" -ne 0 ]; then
        tail -n 60 "$log" >&2
        artifact="$(grep -o 'Test unit written to [^ ]*' "$log" | tail -1 | sed 's/Test unit written to //')"
        echo "FAIL: $t (exit $rc) after ${execs:-?} runs; crashing input: ${artifact:-see log above}" >&2
        exit 1
    fi
    summary+=("$t: ${secs}s, ${execs:-?} runs, cov ${cov:-?}")
    echo "   ok: ${summary[-1]}"
done
echo "== all ${#targets[@]} targets passed"
printf '  %s\n' "${summary[@]}"
