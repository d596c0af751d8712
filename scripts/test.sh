#!/usr/bin/env bash
# Sets up the machine (idempotent) and runs every check and test:
# formatting, clippy, unit + integration tests (tgtd, libiscsi, DPDK vdevs,
# network namespaces), and the short fuzz/simulation runs.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/privilege.sh
# .ci/run sets CI=true: a missing prerequisite then fails its test instead of
# skipping it. Run by hand, tests that cannot run here say SKIPPED and why.
if [ "${CI:-}" = true ] || is_root || command -v sudo >/dev/null 2>&1; then
    as_root bash scripts/setup.sh
else
    echo "note: not root and no sudo: skipping scripts/setup.sh (tests needing root will skip)" >&2
fi
if ! is_root && command -v sudo >/dev/null 2>&1; then
    # Build as this user, run the test binaries as root (namespaces, tgtd, DPDK).
    export CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="sudo -E --"
fi

export CARGO_TERM_COLOR=never
# Incremental state is as large as the build itself and a one-shot CI run
# never reuses it; a CI machine once ran out of disk linking the fuzz build.
if [ "${CI:-}" = true ]; then
    export CARGO_INCREMENTAL=0
fi
# Every step runs even when an earlier one failed, so one failure never hides
# the next; the script exits non-zero if any step failed.
failed=()
step() {
    local name=$1
    shift
    echo "== $name"
    "$@" || failed+=("$name")
}
step "prerequisites: every program the tests and scripts call is installed by setup" \
    bash scripts/check-tools.sh
step "cargo fmt --check" cargo fmt --all -- --check
step "cargo clippy" cargo clippy --workspace --all-targets -- -D warnings
# Integration tests start tgtd/namespaces/DPDK themselves; cargo runs the test
# binaries one at a time, so two of them never fight over the same resources.
# --no-fail-fast: one failing binary must not hide the failures of the rest.
step "cargo test" cargo test --workspace --no-fail-fast -- --test-threads=4
# The fuzz builds are the largest link jobs of the run: say how much room
# is left, so a failure for want of disk reads as such.
df -h . >&2 || true
step "fuzz: replay committed regressions and seeds (stable)" \
    cargo test --manifest-path fuzz/Cargo.toml
step "fuzz: short coverage-guided runs of every target" bash scripts/fuzz.sh "${FUZZ_SECONDS:-5}"

if ((${#failed[@]})); then
    printf 'FAILED: %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "all checks passed"
