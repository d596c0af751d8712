#!/usr/bin/env bash
# Builds the fio external ioengine (fio-engine/, libfio_iscsi_bypass.so)
# against the INSTALLED fio's own headers, and prints the .so's path.
#
#   scripts/fio-engine.sh                 release build; prints the .so path
#   scripts/fio-engine.sh --debug         debug build
#   scripts/fio-engine.sh --source-only   only fetch + configure fio's source
#
# fio's source comes from Debian (apt-get source fio=<installed version>)
# into target/fio-src/, through a private sources list and private apt
# state (-o Dir::Etc::SourceList / Dir::State::Lists / Dir::Cache), so the
# system's sources and package lists stay as they are. fio's configure then
# writes config-host.h: the shim is compiled with it, as fio's own objects
# are, so thread_data, io_u and fio_file have the installed binary's layout.
# Then use it as
#
#   fio --ioengine=external:$(scripts/fio-engine.sh) \
#       --filename='iscsi\://127.0.0.1\:3260/iqn.2003-01.org.example\:disk/0' ...
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
source_only=0
for a in "$@"; do
    case $a in
        --debug) profile=debug ;;
        --source-only) source_only=1 ;;
        *) echo "usage: $0 [--debug] [--source-only]" >&2; exit 2 ;;
    esac
done

note() { printf 'fio-engine: %s\n' "$*" >&2; }
die() { note "$*"; exit 1; }

command -v fio >/dev/null || die "fio is not installed (scripts/setup.sh installs it)"
pkg_version=$(dpkg-query -W -f='${Version}' fio 2>/dev/null) ||
    die "fio is not a Debian package here; cannot fetch its matching source"
upstream=${pkg_version%%-*}
upstream=${upstream#*:}
[[ $(fio --version) == "fio-$upstream" ]] ||
    die "fio --version says $(fio --version), the package is $pkg_version: they must match"

base=$PWD/target/fio-src
src=$base/fio-$upstream
stamp=$src/.configured-for-$pkg_version
if [[ ! -f $stamp ]]; then
    command -v dpkg-source >/dev/null || die "dpkg-source missing (dpkg-dev; scripts/setup.sh installs it)"
    mkdir -p "$base/apt/lists/partial" "$base/apt/cache/archives/partial"
    # The mirror this machine's own sources use, as a deb-src line.
    # (URIs: of deb822 .sources files, or the URL of "deb" lines; comments skipped.)
    mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null |
                 sed -nE 's/^URIs:[[:space:]]*//p; s/^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?//p' |
                 grep -oE '^https?://[^ ]*debian[^ ]*' | grep -v security | head -1 || true)
    mirror=${mirror:-http://deb.debian.org/debian}
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
    printf 'deb-src %s %s main\n' "$mirror" "$codename" >"$base/apt/sources.list"
    apt_opts=(-o "Dir::Etc::SourceList=$base/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
              -o "Dir::State::Lists=$base/apt/lists" -o "Dir::Cache=$base/apt/cache")
    note "fetching fio $pkg_version source from $mirror ($codename)"
    apt-get "${apt_opts[@]}" -qq update >&2 || die "apt-get update of the private deb-src list failed"
    rm -rf "$src" "$base"/fio_*
    (cd "$base" && apt-get "${apt_opts[@]}" -qq source --download-only "fio=$pkg_version" >&2) ||
        die "apt-get source fio=$pkg_version failed"
    (cd "$base" && dpkg-source -x "fio_${pkg_version#*:}.dsc" "fio-$upstream" >&2) ||
        die "dpkg-source -x failed"
    # Debian's configure line (debian/rules) is
    #   ./configure --disable-native --prefix=/usr --enable-gfio --enable-libnbd
    # gfio and libnbd only add programs and an engine (and need their -dev
    # packages); the structures the shim reads do not depend on them.
    note "configuring fio: Debian's options less gfio and the nbd engine"
    (cd "$src" && ./configure --disable-native --prefix=/usr >"$base/configure.log" 2>&1) ||
        die "fio's configure failed: see $base/configure.log"
    [[ -f $src/config-host.h ]] || die "configure wrote no config-host.h"
    touch "$stamp"
fi
if ((source_only)); then
    echo "$src"
    exit 0
fi

flags=()
[[ $profile == release ]] && flags=(--release)
note "building libfio_iscsi_bypass.so ($profile)"
FIO_SRC=$src cargo build -p fio-iscsi-bypass "${flags[@]}" >&2
so=$PWD/target/$profile/libfio_iscsi_bypass.so
[[ -f $so ]] || die "the build produced no $so"
echo "$so"
