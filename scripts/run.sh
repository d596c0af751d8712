#!/usr/bin/env bash
# Sets up the machine (idempotent), builds, and runs the main job: a short
# 4 KiB random-read benchmark over two paths against the embedded target.
# Extra arguments go to `iscsi-bypass bench`. Run it as root or as a user
# with sudo: only the set-up needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/privilege.sh
as_root bash scripts/setup.sh
cargo build --release
exec ./target/release/iscsi-bypass bench "$@"
