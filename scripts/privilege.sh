# Sourced by the scripts: raise privileges only for the steps that need
# them, and only where sudo exists (a root shell needs none, and Debian's
# minimal images have no sudo).

is_root() { [ "$(id -u)" -eq 0 ]; }

# Runs the command as root: directly when we are root, through sudo when it
# is installed; otherwise says what to run and fails.
as_root() {
    if is_root; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -- "$@"
    else
        echo "error: '$*' needs root, and sudo is not installed; run it as root (su -c '...')" >&2
        return 1
    fi
}
