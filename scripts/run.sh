#!/usr/bin/env bash
# Sets up the machine (idempotent), builds, and runs the main job: a short
# 4 KiB random-read benchmark over two paths against the embedded target.
# Extra arguments go to `iscsi-bypass bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -eq 0 ]; then
    bash scripts/setup.sh
fi
cargo build --release
exec ./target/release/iscsi-bypass bench "$@"
