#!/usr/bin/env bash
# Runs Tasker's whole test suite against local PostgreSQL and RabbitMQ.
#
#   deploy/test.sh                 # everything: unit, system and doc tests
#   deploy/test.sh -E 'test(foo)'  # extra arguments go to cargo nextest (or cargo test)
#
# Starts or reuses the services with deploy/local/services.sh up, loads .tasker/env (the
# TASKER_TEST_* URLs), then runs `cargo nextest run` when cargo-nextest is installed, otherwise
# `cargo test`. Nextest does not run doc tests, so they run afterwards with `cargo test --doc`
# (skipped when extra arguments narrow the run, or with TASKER_SKIP_DOCTESTS=1).
# Then the Python SDK's tests (deploy/test-python.sh; not with extra arguments; TASKER_SKIP_PYTHON=1
# skips them, except in CI).
# The exit code is the tests' exit code.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

bash "$ROOT/deploy/local/services.sh" up
# shellcheck source=/dev/null
. "${TASKER_STATE_DIR:-$ROOT/.tasker}/env"

say() { printf '[test] %s\n' "$*"; }

rc=0
if cargo nextest --version >/dev/null 2>&1; then
    say "cargo nextest run --workspace --all-features --no-fail-fast $*"
    cargo nextest run --workspace --all-features --no-fail-fast "$@" || rc=$?
    if [ $# -eq 0 ] && [ "${TASKER_SKIP_DOCTESTS:-0}" != 1 ]; then
        say "cargo test --doc --workspace --all-features --no-fail-fast"
        cargo test --doc --workspace --all-features --no-fail-fast || { r=$?; [ "$rc" != 0 ] || rc=$r; }
    fi
else
    say "cargo-nextest not installed; cargo test --workspace --all-features --no-fail-fast $*"
    cargo test --workspace --all-features --no-fail-fast "$@" || rc=$?
fi

# The Python SDK (worker-sdk/python): ruff, mypy --strict and pytest against the real services,
# in the project-local venv .tasker/venv (deploy/test-python.sh). Skipped when extra arguments
# narrow the run; TASKER_SKIP_PYTHON=1 skips it locally; in CI (CI set) skipping is refused.
if [ $# -gt 0 ] && [ -z "${CI:-}" ]; then
    say "extra arguments narrow the run: not running the Python SDK tests (deploy/test-python.sh)"
elif [ "${TASKER_SKIP_PYTHON:-0}" = 1 ] && [ -z "${CI:-}" ]; then
    say "skipping the Python SDK tests (TASKER_SKIP_PYTHON=1)"
else
    [ "${TASKER_SKIP_PYTHON:-0}" != 1 ] || say "TASKER_SKIP_PYTHON=1 is ignored in CI"
    say "deploy/test-python.sh"
    bash "$ROOT/deploy/test-python.sh" || { r=$?; [ "$rc" != 0 ] || rc=$r; }
fi

if [ "$rc" = 0 ]; then say "all tests passed"; else say "tests FAILED (exit $rc)"; fi
exit "$rc"
