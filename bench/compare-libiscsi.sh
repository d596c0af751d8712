#!/usr/bin/env bash
# One command: builds the release binary and compares iscsi-bypass with
# libiscsi's iscsi-perf on the same targets (embedded null target, tgtd).
# Usage: bench/compare-libiscsi.sh [seconds-per-run]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -eq 0 ]; then bash scripts/setup.sh >/dev/null; fi
cargo build --release --quiet
exec python3 bench/compare_libiscsi.py "$@"
