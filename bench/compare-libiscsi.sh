#!/usr/bin/env bash
# One command: builds the release binary (unless BIN names one) and compares
# iscsi-bypass with libiscsi's iscsi-perf on the same targets (embedded null
# target, tgtd).
# Usage: [BIN=path/to/iscsi-bypass] bench/compare-libiscsi.sh [seconds-per-run]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -eq 0 ]; then bash scripts/setup.sh >/dev/null; fi
if [ -z "${BIN:-}" ]; then cargo build --release --quiet; fi
exec python3 bench/compare_libiscsi.py "$@"
