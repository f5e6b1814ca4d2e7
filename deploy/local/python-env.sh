#!/usr/bin/env bash
# Creates (or reuses) the project-local Python virtual environment and installs the Python SDK
# (worker-sdk/python, editable, with its `test` extras) into it. Prints the venv's directory on
# stdout (messages go to stderr).
#
#   deploy/local/python-env.sh
#
# Settings (environment): TASKER_STATE_DIR (default <repo>/.tasker; the venv is $STATE/venv),
# TASKER_PYTHON (the interpreter to create it with, default python3; 3.10 or newer).
# If the interpreter lacks venv/ensurepip (Debian's python3-venv), installs python3-venv with apt
# (as root, or through passwordless sudo), as deploy/local/services.sh does for the services.
# Reinstalls the package only when worker-sdk/python/pyproject.toml changed (pip's own cache is
# used for downloads).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
STATE=${TASKER_STATE_DIR:-$ROOT/.tasker}
VENV=$STATE/venv
PY=${TASKER_PYTHON:-python3}
SDK=$ROOT/worker-sdk/python

say() { printf '[python-env] %s\n' "$*" >&2; }
die() {
    printf '[python-env] ERROR: %s\n' "$*" >&2
    exit 1
}

command -v "$PY" >/dev/null 2>&1 || die "$PY not found: install Python 3.10 or newer"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
    die "$("$PY" --version 2>&1) is too old: the Python SDK needs 3.10 or newer (set TASKER_PYTHON)"

if [ ! -x "$VENV/bin/python" ]; then
    if ! "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1; then
        command -v apt-get >/dev/null 2>&1 || die "$PY has no venv/ensurepip and apt-get is missing: install python3-venv"
        if [ "$(id -u)" = 0 ]; then
            as_root=()
        elif sudo -n true 2>/dev/null; then
            as_root=(sudo -n)
        else
            die "$PY has no venv/ensurepip: install python3-venv (needs root)"
        fi
        say "apt-get install python3-venv"
        "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
        "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
            --no-install-recommends python3-venv >&2
    fi
    say "creating $VENV ($("$PY" --version 2>&1))"
    mkdir -p "$STATE"
    "$PY" -m venv "$VENV" >&2
fi

stamp=$VENV/.tasker-worker-installed
want=$(sha256sum "$SDK/pyproject.toml" | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! "$VENV/bin/python" -c 'import tasker_worker' 2>/dev/null; then
    say "pip install -e 'worker-sdk/python[test]'"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >&2
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$SDK[test]" >&2
    echo "$want" >"$stamp"
fi
echo "$VENV"
