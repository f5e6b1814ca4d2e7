-- Traces (docs/observability.md): the W3C traceparent of the request that submitted a task, when
-- it had a valid one. The task's trace continues it (its trace id, the task span's parent);
-- without one the trace id is the task id. Nullable, no default: adding it rewrites nothing.
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS trace_parent text;
