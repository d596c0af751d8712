#!/usr/bin/env bash
# Fails when a test, example, bench script or CI script calls a program that
# a fresh machine lacks: one that neither the base image (scripts/base-image-packages.txt)
# nor scripts/setup.sh provides. Run after setup (it is part of scripts/test.sh).
#
# What counts as "called": quoted program names in Rust tests/examples
# (Command::new("x"), which("x"), have("x"), tool("x")), every quoted word that
# names an installed program there, and the command words of the shell
# scripts. A name is checked when it resolves to a program in the system
# directories; its Debian package must then be in the base list or in
# setup's PACKAGES. Programs the Rust code asks for by name must exist.
#
# With FRESH_IMAGE_PACKAGES=<file> (lines "apt<TAB>name<TAB>version", the
# image's own list) the base list itself is checked against the image.
set -euo pipefail
cd "$(dirname "$0")/.."

base_list=scripts/base-image-packages.txt
setup_packages=$(sed -n '/^PACKAGES=(/,/)/p' scripts/setup.sh | tr -d '()' | sed 's/PACKAGES=//')
in_setup() { grep -qw -- "$1" <<<"$setup_packages"; }
in_base() { grep -qx -- "$1" <(grep -v '^#' "$base_list"); }

failures=0
fail() { echo "check-tools: $*" >&2; failures=$((failures + 1)); }

# Names the Rust code explicitly runs or looks up: these must be installed.
explicit=$(grep -rhoE '(Command::new|which|have|tool)\("[a-z][a-z0-9_.+-]{1,40}"' \
               tests examples src 2>/dev/null | sed -E 's/.*\("//; s/"$//' | sort -u)
# Any quoted word in tests and examples that names an installed program.
quoted=$(grep -rhoE '"[a-z][a-z0-9_.+-]{1,40}"' tests examples 2>/dev/null | tr -d '"' | sort -u)
# Command words of the shell scripts: a line's first word, and the word after
# a pipe, &&, ||, $( or `sudo`/`exec`/`timeout N`.
shell_words=$(cat bench/*.sh scripts/*.sh .ci/run 2>/dev/null |
    sed -E 's/#.*//' |
    grep -oE '(^|[|;&(]|\$\(|\bexec |\bsudo |\btimeout [0-9.]+[smh]? )\s*[a-z][a-z0-9_.+-]{1,40}' |
    grep -oE '[a-z][a-z0-9_.+-]+$' | sort -u)

package_of() {
    local name=$1 p alt pkg=""
    p=$(command -v "$name" 2>/dev/null) || return 1
    case $p in /usr/bin/* | /usr/sbin/* | /bin/* | /sbin/*) ;; *) return 1 ;; esac
    for alt in "$(readlink -f "$p")" "$p" "/usr/bin/$name" "/usr/sbin/$name" "/bin/$name" "/sbin/$name"; do
        # (dpkg-divert's "diversion by ..." lines name no owner.)
        [[ -n $pkg ]] || pkg=$(dpkg-query -S "$alt" 2>/dev/null | grep -v '^diversion ' | head -1 | cut -d: -f1 | cut -d, -f1)
    done
    [[ -n $pkg ]] || return 1
    echo "$pkg"
}

for name in $explicit; do
    command -v "$name" >/dev/null 2>&1 || [[ -x /usr/sbin/$name || -x /sbin/$name ]] ||
        fail "the tests call '$name', which is not installed: add its Debian package to PACKAGES in scripts/setup.sh"
done

checked=0
for name in $(printf '%s\n' $explicit $quoted $shell_words | sort -u); do
    [[ $(type -t "$name" 2>/dev/null) == builtin || $(type -t "$name" 2>/dev/null) == keyword ]] && continue
    pkg=$(package_of "$name") || continue
    checked=$((checked + 1))
    in_setup "$pkg" || in_base "$pkg" ||
        fail "'$name' (Debian package $pkg) is called by the tests or scripts, but a fresh machine lacks it: add $pkg to PACKAGES in scripts/setup.sh"
done

if [[ -n ${FRESH_IMAGE_PACKAGES:-} ]]; then
    for pkg in $(grep -v '^#' "$base_list"); do
        grep -qP "^apt\t\Q$pkg\E\t" "$FRESH_IMAGE_PACKAGES" ||
            fail "$base_list names $pkg, but the image list $FRESH_IMAGE_PACKAGES does not have it"
    done
fi

if ((failures)); then
    echo "check-tools: $failures problem(s)" >&2
    exit 1
fi
echo "check-tools: $checked programs called by tests and scripts, each from the base image or scripts/setup.sh"
