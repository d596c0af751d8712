#!/usr/bin/env bash
# Sets up the machine (idempotent) and runs every check and test:
# formatting, clippy, unit + integration tests (tgtd, libiscsi, DPDK vdevs,
# network namespaces), and the short fuzz/simulation runs.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -eq 0 ]; then
    bash scripts/setup.sh
else
    echo "note: not root; skipping scripts/setup.sh (tests needing root will skip)" >&2
fi

export CARGO_TERM_COLOR=never
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test"
# Integration tests start tgtd/namespaces/DPDK themselves; run test binaries
# one at a time so two of them never fight over the same resources.
cargo test --workspace -- --test-threads=4

echo "== fuzz: replay committed regressions and seeds (stable)"
cargo test --manifest-path fuzz/Cargo.toml
echo "== fuzz: short coverage-guided runs of every target"
bash scripts/fuzz.sh "${FUZZ_SECONDS:-5}"
