#!/usr/bin/env bash
# Tests the Python SDK (worker-sdk/python) against the real orchestrator, PostgreSQL and
# RabbitMQ: creates or reuses the project-local venv (deploy/local/python-env.sh), builds the
# binaries the tests start (tasker, chaos-worker), then runs ruff, mypy --strict and pytest
# (about a minute once built).
# deploy/test.sh runs it after the Rust tests.
#
#   deploy/test-python.sh              # everything
#   deploy/test-python.sh -k timeouts  # extra arguments go to pytest
#
# Needs the services (deploy/local/services.sh up) and their URLs (it loads .tasker/env).
# The broker-restart test (last) restarts the shared RabbitMQ.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
STATE=${TASKER_STATE_DIR:-$ROOT/.tasker}
# shellcheck source=/dev/null
[ -n "${TASKER_TEST_DATABASE_URL:-}" ] || . "$STATE/env"

say() { printf '[test-python] %s\n' "$*"; }

VENV=$(bash "$ROOT/deploy/local/python-env.sh")
# The binaries the tests start (tasker, chaos-worker), built as CI's build-bins phase builds them
# (same features as the Rust tests: nothing is compiled twice).
say "cargo build --workspace --all-features --bins"
cargo build -q --workspace --all-features --bins
TARGET_DIR=${CARGO_TARGET_DIR:-${CARGO_BUILD_TARGET_DIR:-$ROOT/target}}
export TASKER_BIN=$TARGET_DIR/debug/tasker
export PATH=$TARGET_DIR/debug:$PATH

cd "$ROOT/worker-sdk/python"
say "ruff check"
"$VENV/bin/ruff" check src tests bench "$ROOT/examples/order-fulfilment/python"
say "mypy --strict"
"$VENV/bin/mypy" --strict src/tasker_worker
say "pytest"
"$VENV/bin/python" -m pytest "$@"
