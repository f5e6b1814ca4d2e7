#!/bin/sh
# The Compose "demo" service: submit one order to the orchestrator and wait for it to finish.
# Exits non-zero unless the task completed. Needs TASKER_API_URL (set in docker-compose.yml).
set -eu
CONTEXT=${TASKER_DEMO_CONTEXT:-'{"order_id":"A-1001","customer_email":"ada@example.com","amount_cents":4999,"items":[{"sku":"BOOK-1","quantity":2}]}'}
echo "[demo] tasker submit shop order_fulfilment --context '$CONTEXT' (API $TASKER_API_URL)"
out=$(tasker submit shop order_fulfilment --context "$CONTEXT")
id=$(printf '%s\n' "$out" | grep -oE '[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}' | head -n 1)
[ -n "$id" ] || { echo "[demo] ERROR: no task id in: $out" >&2; exit 1; }
echo "[demo] task $id submitted; waiting for it"
rc=0
t=${TASKER_DEMO_TIMEOUT:-120}
timeout "$((t + 15))" tasker show "$id" --wait --timeout "$t" || rc=$?
state=$(curl -sf "$TASKER_API_URL/v1/tasks/$id" | grep -oE '"state"[[:space:]]*:[[:space:]]*"[a-z_]+"' | head -n 1 | sed -E 's/.*"([a-z_]+)"$/\1/' || true)
if [ "$state" = completed ]; then
    echo "[demo] task $id completed"
    exit 0
fi
echo "[demo] ERROR: task $id is '${state:-unknown}' (tasker show exited $rc)" >&2
exit 1
