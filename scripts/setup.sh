#!/usr/bin/env bash
# Prepares a Debian/Ubuntu host for building and testing iscsi-bypass.
# Idempotent: every step checks before it changes anything. Run as root.
#
#   - packages: DPDK (runtime + headers), libclang for bindgen, the tgt
#     target and libiscsi tools for integration tests, qemu-img/nbd tools,
#     valgrind;
#   - 2 MiB hugepages for DPDK (best effort: tests fall back to --no-huge);
#   - hugetlbfs mounted at /dev/hugepages;
#   - rustfmt and clippy for the Rust toolchain (best effort);
#   - the installed fio's configured source under target/fio-src/, which the
#     fio engine crate (fio-engine/) is compiled against (its build fails,
#     naming the reason, when this step could not fetch it).
set -euo pipefail

PACKAGES=(dpdk libdpdk-dev libclang-dev clang pkg-config tgt libiscsi-bin
          iproute2 libnbd-bin qemu-utils valgrind ethtool fio dpkg-dev
          linux-perf)  # perf (bench/bypass.sh); in the image, named so it stays
HUGEPAGES_WANTED=${HUGEPAGES_WANTED:-512}
HUGEPAGE_MOUNT=/dev/hugepages

note() { printf 'setup: %s\n' "$*"; }

if [[ $(id -u) -ne 0 ]]; then
    note "must run as root (packages, hugepages, mounts)" >&2
    exit 1
fi

# --- packages ---------------------------------------------------------------
missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if ((${#missing[@]})); then
    note "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Refresh the index only when installing from it fails (stale or empty lists).
    if ! apt-get install -y --no-install-recommends "${missing[@]}"; then
        apt-get update
        apt-get install -y --no-install-recommends "${missing[@]}"
    fi
else
    note "packages already installed"
fi

# --- hugepages --------------------------------------------------------------
nr_hugepages=/proc/sys/vm/nr_hugepages
current=$(cat "$nr_hugepages" 2>/dev/null || echo 0)
if ((current >= HUGEPAGES_WANTED)); then
    note "hugepages: $current x 2 MiB already reserved"
else
    if echo "$HUGEPAGES_WANTED" >"$nr_hugepages" 2>/dev/null; then
        current=$(cat "$nr_hugepages")
    fi
    if ((current >= HUGEPAGES_WANTED)); then
        note "hugepages: reserved $current x 2 MiB"
    else
        # Containers often cannot reserve hugepages, and fragmented memory may
        # yield fewer than asked. DPDK then runs with --no-huge.
        note "hugepages: only $current of $HUGEPAGES_WANTED reserved; DPDK tests fall back to --no-huge"
    fi
fi

if grep -qs " $HUGEPAGE_MOUNT hugetlbfs " /proc/mounts; then
    note "hugetlbfs already mounted at $HUGEPAGE_MOUNT"
else
    mkdir -p "$HUGEPAGE_MOUNT"
    if mount -t hugetlbfs -o pagesize=2M nodev "$HUGEPAGE_MOUNT" 2>/dev/null; then
        note "mounted hugetlbfs at $HUGEPAGE_MOUNT"
    else
        note "could not mount hugetlbfs at $HUGEPAGE_MOUNT (fine with --in-memory or --no-huge)"
    fi
fi

# --- Rust components --------------------------------------------------------
if command -v rustup >/dev/null 2>&1; then
    for component in rustfmt clippy; do
        if ! rustup component list --installed 2>/dev/null | grep -q "^$component"; then
            rustup component add "$component" || note "could not add $component (ignored)"
        fi
    done
else
    note "rustup not found; install rustfmt and clippy with your toolchain"
fi

# --- fio source for the fio engine ------------------------------------------
if src=$(bash "$(dirname "$0")/fio-engine.sh" --source-only); then
    note "fio source for the fio engine at $src"
else
    note "could not fetch/configure fio's source: the fio-engine crate will not build (see above)"
fi

note "done"
