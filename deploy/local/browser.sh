#!/usr/bin/env bash
# Installs the browser of the console's browser suite (tests/src/bin/browser.rs) when missing:
# Debian's `chromium` and `chromium-driver` (ChromeDriver), with apt-get, as root or through
# passwordless sudo. Prints the versions found. Exits non-zero when they cannot be installed: the
# suite never skips for a missing browser.
#
#   deploy/local/browser.sh
set -euo pipefail

say() { printf '[browser] %s\n' "$*" >&2; }
die() {
    printf '[browser] ERROR: %s\n' "$*" >&2
    exit 1
}

if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || die "chromium or chromedriver is missing and apt-get is not here: install them"
    as_root=()
    if [ "$(id -u)" -ne 0 ]; then
        if sudo -n true 2>/dev/null; then
            as_root=(sudo -n)
        else
            die "chromium or chromedriver is missing: apt-get install chromium chromium-driver (as root)"
        fi
    fi
    say "apt-get install chromium chromium-driver"
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >&2
fi
# Debian's launcher script prints a harmless shell warning on some systems: keep the version line.
say "$(chromium --version 2>/dev/null | grep -i chromium | head -n 1)"
say "$(chromedriver --version 2>/dev/null | head -n 1)"
