#!/usr/bin/env bash
# Checks deploy/observability/ (CI phase `observability`):
#   1. promtool check rules alerts.yml      (syntax, PromQL, templates)
#   2. promtool test rules alerts_test.yml  (the alerts' unit tests)
#   3. grafana-dashboard.json is valid JSON, and every query of the dashboard and of alerts.yml
#      names only metrics documented in docs/observability.md (histograms through their
#      _bucket/_sum/_count series); every alert has a severity, a summary and a description
#      (check_metrics.py);
#   4. the dashboard's queries parse as PromQL (check_metrics.py writes them, Grafana variables
#      filled in, as recording rules to a temporary file for `promtool check rules`).
#
# promtool comes with Debian's `prometheus` package: when it is missing, this script installs it
# with apt (as root, or through passwordless sudo), with --no-install-recommends and without
# letting the package start a Prometheus server (a policy-rc.d forbids starting services during
# the install; a server started anyway is stopped and disabled). Nothing listens on :9090
# afterwards unless something did before. Set PROMTOOL to use another promtool binary.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
STATE=${TASKER_STATE_DIR:-$ROOT/.tasker}
LOG_DIR=$STATE/logs
PROM_PORT=9090

export DEBIAN_FRONTEND=noninteractive

say() { printf '[observability] %s\n' "$*"; }
die() {
    printf '[observability] ERROR: %s\n' "$*" >&2
    exit 1
}
is_root() { [ "$(id -u)" = 0 ]; }
have() { command -v "$1" >/dev/null 2>&1; }

# Runs a command as root (directly, or through passwordless sudo).
as_root() {
    if is_root; then
        "$@"
    elif have sudo && sudo -n true 2>/dev/null; then
        sudo -n "$@"
    else
        die "need root for: $* (run as root, use passwordless sudo, or install promtool and set PROMTOOL)"
    fi
}

# True when something accepts TCP connections on 127.0.0.1:$1.
tcp_open() {
    # shellcheck disable=SC2016 # $1 expands in the inner bash
    timeout 3 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null
}

POLICY=/usr/sbin/policy-rc.d
POLICY_OURS=
TMP=
cleanup() {
    if [ -n "$POLICY_OURS" ]; then
        as_root rm -f "$POLICY" || true
        POLICY_OURS=
    fi
    if [ -n "$TMP" ]; then
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT

# Stops and disables the prometheus service that the package may have started or enabled.
stop_prometheus_service() {
    if have systemctl && [ -d /run/systemd/system ]; then
        as_root systemctl disable --now prometheus.service >/dev/null 2>&1 || true
    elif [ -x /etc/init.d/prometheus ]; then
        as_root /etc/init.d/prometheus stop >/dev/null 2>&1 || true
        if have update-rc.d; then
            as_root update-rc.d prometheus disable >/dev/null 2>&1 || true
        fi
    fi
}

install_promtool() {
    have apt-get || die "promtool is missing and apt-get is not available: install Prometheus's promtool by hand (or set PROMTOOL)"
    mkdir -p "$LOG_DIR"
    local log=$LOG_DIR/apt.log port_was_open=
    tcp_open "$PROM_PORT" && port_was_open=1
    # Keep the package's maintainer scripts from starting a Prometheus server (invoke-rc.d and
    # deb-systemd-invoke obey policy-rc.d; 101 = action forbidden). An existing policy is kept.
    if [ ! -e "$POLICY" ]; then
        printf '#!/bin/sh\n# deploy/observability/check.sh: no service starts while it installs promtool\nexit 101\n' |
            as_root tee "$POLICY" >/dev/null
        as_root chmod 755 "$POLICY"
        POLICY_OURS=1
    fi
    local install=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus)
    say "apt-get install --no-install-recommends prometheus (for promtool; log: $log)"
    if ! as_root "${install[@]}" >>"$log" 2>&1 9>&-; then
        say "install failed; apt-get update, then once more"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >>"$log" 2>&1 9>&- ||
            { tail -n 20 "$log" >&2; die "apt-get update failed (log: $log)"; }
        as_root "${install[@]}" >>"$log" 2>&1 9>&- ||
            { tail -n 20 "$log" >&2; die "apt-get install prometheus failed (log: $log)"; }
    fi
    cleanup
    stop_prometheus_service
    if [ -z "$port_was_open" ]; then
        local i
        for ((i = 0; i < 10; i++)); do
            tcp_open "$PROM_PORT" || break
            sleep 1
        done
        ! tcp_open "$PROM_PORT" ||
            die "something listens on :$PROM_PORT after installing prometheus; stop it (systemctl disable --now prometheus)"
    fi
    have promtool || die "the prometheus package is installed but promtool is not on PATH"
}

PROMTOOL=${PROMTOOL:-}
if [ -z "$PROMTOOL" ]; then
    have promtool || install_promtool
    PROMTOOL=promtool
fi
say "$("$PROMTOOL" --version 2>&1 | head -n 1)"

cd "$HERE"
say "promtool check rules alerts.yml"
"$PROMTOOL" check rules alerts.yml
say "promtool test rules alerts_test.yml"
"$PROMTOOL" test rules alerts_test.yml
say "dashboard and rules: JSON, documented metrics, alert labels and annotations"
TMP=$(mktemp -d)
python3 "$HERE/check_metrics.py" "$ROOT/docs/observability.md" grafana-dashboard.json alerts.yml \
    "$TMP/dashboard-queries.yml"
say "promtool check rules (the dashboard's queries)"
"$PROMTOOL" check rules "$TMP/dashboard-queries.yml"
say "ok"
