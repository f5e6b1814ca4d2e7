#!/usr/bin/env bash
# Brings everything up and runs the order-fulfilment example end to end:
# PostgreSQL + RabbitMQ (deploy/local/services.sh up), the orchestrator (`tasker serve`), the
# example worker (`order-worker`), then submits one order and waits for it to finish.
#
#   deploy/demo.sh           # run the demo, then stop the orchestrator and worker
#   deploy/demo.sh --keep    # leave them running until Ctrl-C (try the CLI / HTTP API meanwhile)
#   deploy/demo.sh --python  # the Python example worker (examples/order-fulfilment/python) instead,
#                            # in the project-local venv (deploy/local/python-env.sh); with --keep too
#
# Settings (environment): TASKER_HTTP_ADDR (default 127.0.0.1:8080), TASKER_DEMO_TIMEOUT (seconds
# to wait for the task, default 120), TASKER_DEMO_READY_TIMEOUT (seconds to wait for /ready,
# default 120), TASKER_DEMO_CONTEXT (the order, JSON), RUST_LOG (default info).
# Logs go to .tasker/logs/.
# Exits non-zero unless the task completed.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
STATE=${TASKER_STATE_DIR:-$ROOT/.tasker}
LOGS=$STATE/logs
KEEP=0
PYTHON=0
for arg in "$@"; do
    case "$arg" in
    --keep) KEEP=1 ;;
    --python) PYTHON=1 ;;
    *)
        echo "usage: $0 [--keep] [--python]" >&2
        exit 2
        ;;
    esac
done

say() { printf '[demo] %s\n' "$*"; }
die() {
    printf '[demo] ERROR: %s\n' "$*" >&2
    exit 1
}

bash "$ROOT/deploy/local/services.sh" up
# shellcheck source=/dev/null
. "$STATE/env"

export TASKER_HTTP_ADDR=${TASKER_HTTP_ADDR:-127.0.0.1:8080}
export TASKER_TEMPLATES_DIR=${TASKER_TEMPLATES_DIR:-$ROOT/examples/order-fulfilment/templates}
export RUST_LOG=${RUST_LOG:-info}
HTTP_PORT=${TASKER_HTTP_ADDR##*:}
HTTP_HOST=${TASKER_HTTP_ADDR%:*}
case "$HTTP_HOST" in
0.0.0.0 | "") HTTP_HOST=127.0.0.1 ;;
"[::]") HTTP_HOST="[::1]" ;;
esac
# Always the orchestrator started here, whatever TASKER_API_URL said.
export TASKER_API_URL=http://$HTTP_HOST:$HTTP_PORT
READY_TIMEOUT=${TASKER_DEMO_READY_TIMEOUT:-120}
TASK_TIMEOUT=${TASKER_DEMO_TIMEOUT:-120}

# shellcheck disable=SC2016 # $1 and $2 expand in the inner bash
if curl -s -o /dev/null --max-time 2 "$TASKER_API_URL/health" ||
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "${HTTP_HOST//[\[\]]/}" "$HTTP_PORT" 2>/dev/null; then
    die "something already listens on $TASKER_HTTP_ADDR (an orchestrator left running?); stop it or set TASKER_HTTP_ADDR=127.0.0.1:8081"
fi

[ -d "$TASKER_TEMPLATES_DIR" ] || die "templates directory $TASKER_TEMPLATES_DIR does not exist"

say "building tasker and order-worker (debug)"
cargo build -p tasker-orchestrator -p tasker-example-orders
TARGET_DIR=${CARGO_TARGET_DIR:-${CARGO_BUILD_TARGET_DIR:-$ROOT/target}}
BIN=$TARGET_DIR/debug
for b in tasker order-worker; do
    [ -x "$BIN/$b" ] || die "$BIN/$b was not built"
done

if [ "$PYTHON" = 1 ]; then
    say "preparing the Python SDK's venv (deploy/local/python-env.sh)"
    VENV=$(bash "$ROOT/deploy/local/python-env.sh") || die "cannot prepare the Python venv"
fi

mkdir -p "$LOGS"
ORCH_PID=
WORKER_PID=

stop_pid() { # name pid
    local name=$1 pid=$2 i
    if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then return 0; fi
    say "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        say "$name did not stop within 15s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_pid order-worker "$WORKER_PID"
    stop_pid orchestrator "$ORCH_PID"
    say "logs: $LOGS/orchestrator.log, $LOGS/worker.log"
    say "PostgreSQL and RabbitMQ are still running; stop them with: deploy/local/services.sh down"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

show_log_tail() { # name file
    printf '[demo] --- last lines of %s (%s) ---\n' "$1" "$2" >&2
    tail -n 30 "$2" >&2 || true
}

say "starting orchestrator on $TASKER_HTTP_ADDR (templates $TASKER_TEMPLATES_DIR, log $LOGS/orchestrator.log)"
"$BIN/tasker" serve </dev/null >"$LOGS/orchestrator.log" 2>&1 &
ORCH_PID=$!

say "waiting for $TASKER_API_URL/ready"
ready=
for ((i = 0; i < READY_TIMEOUT * 2; i++)); do
    if ! kill -0 "$ORCH_PID" 2>/dev/null; then
        show_log_tail orchestrator "$LOGS/orchestrator.log"
        die "the orchestrator exited during startup"
    fi
    if curl -sf -o /dev/null --max-time 2 "$TASKER_API_URL/ready"; then
        ready=1
        break
    fi
    sleep 0.5
done
if [ -z "$ready" ]; then
    show_log_tail orchestrator "$LOGS/orchestrator.log"
    die "the orchestrator was not ready within ${READY_TIMEOUT}s"
fi
say "orchestrator ready"

say "starting order-worker (log $LOGS/worker.log)"
if [ "$PYTHON" = 1 ]; then
    say "(the Python one: examples/order-fulfilment/python/worker.py)"
    "$VENV/bin/python" "$ROOT/examples/order-fulfilment/python/worker.py" </dev/null >"$LOGS/worker.log" 2>&1 &
else
    "$BIN/order-worker" </dev/null >"$LOGS/worker.log" 2>&1 &
fi
WORKER_PID=$!
sleep 1
if ! kill -0 "$WORKER_PID" 2>/dev/null; then
    show_log_tail order-worker "$LOGS/worker.log"
    die "order-worker exited at startup"
fi

CONTEXT=${TASKER_DEMO_CONTEXT:-'{"order_id":"A-1001","customer_email":"ada@example.com","amount_cents":4999,"items":[{"sku":"BOOK-1","quantity":2}]}'}
say "tasker submit shop order_fulfilment --context '$CONTEXT'"
submit_out=$("$BIN/tasker" submit shop order_fulfilment --context "$CONTEXT") ||
    die "tasker submit failed (see $LOGS/orchestrator.log)"
# The task id is a UUID; take the first one printed, whatever surrounds it.
TASK_ID=$(grep -oE '[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}' \
    <<<"$submit_out" | head -n 1) || true
[ -n "$TASK_ID" ] || die "could not find a task id in the output of tasker submit: $submit_out"
say "task $TASK_ID submitted; waiting up to ${TASK_TIMEOUT}s for it to finish"

show_rc=0
# --foreground: Ctrl-C still reaches `tasker show`.
timeout --foreground "$((TASK_TIMEOUT + 15))" \
    "$BIN/tasker" show "$TASK_ID" --wait --timeout "$TASK_TIMEOUT" | tee "$LOGS/demo-task.txt" || show_rc=$?

# The authoritative answer: the task's state from the HTTP API (GET /v1/tasks/{id}).
state=
if body=$(curl -sf --max-time 5 "$TASKER_API_URL/v1/tasks/$TASK_ID"); then
    if command -v jq >/dev/null 2>&1; then
        state=$(jq -r '.state // empty' <<<"$body" 2>/dev/null) || state=
    else
        # The task's own "state" comes before its steps' in the JSON.
        state=$(grep -oE '"state"[[:space:]]*:[[:space:]]*"[a-z_]+"' <<<"$body" | head -n 1 |
            sed -E 's/.*"([a-z_]+)"$/\1/') || state=
    fi
fi

if [ "$show_rc" = 124 ]; then
    show_log_tail orchestrator "$LOGS/orchestrator.log"
    show_log_tail order-worker "$LOGS/worker.log"
    die "task $TASK_ID did not finish within ${TASK_TIMEOUT}s (state: ${state:-unknown})"
fi
if [ -n "$state" ]; then
    if [ "$state" != completed ]; then
        show_log_tail order-worker "$LOGS/worker.log"
        die "task $TASK_ID is '$state', expected 'completed'"
    fi
elif [ "$show_rc" != 0 ]; then
    die "tasker show exited with $show_rc"
elif ! grep -qiw completed "$LOGS/demo-task.txt"; then
    die "could not confirm that task $TASK_ID completed (see $LOGS/demo-task.txt)"
fi
[ "$show_rc" = 0 ] || say "note: tasker show exited with $show_rc although the task completed"
say "task $TASK_ID completed"

if [ "$KEEP" = 1 ]; then
    say "orchestrator and worker keep running; API at $TASKER_API_URL (try: $BIN/tasker show $TASK_ID). Ctrl-C stops them."
    wait "$ORCH_PID" || true
fi
