#!/usr/bin/env bash
# QD1 latency of the library path (IoQueue::write_at/flush/read_at through
# the multipath device) vs a raw iscsi::session::Session, 4 KiB, against the
# embedded RAM target on loopback over kernel TCP.
#
#   bench/library-qd1.sh [IOS] [busy|sleep]
#
# Pollers spin by default (the latency setting: needs a free core per
# poller: the app thread + one worker per path + the target's threads).
set -euo pipefail
cd "$(dirname "$0")/.."
IOS="${1:-20000}"
IDLE="${2:-busy}"
cargo build --release --example qd1_latency
exec target/release/examples/qd1_latency "$IOS" "$IDLE"
