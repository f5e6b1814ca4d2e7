-- Tasker core schema. Forward-only; written so that an older orchestrator can keep running
-- beside a newer one during an upgrade (later migrations only add).
--
-- Hot state (tasks, steps, outbox) is kept small by partial indexes on live states, so the hot
-- queries do not slow down as finished tasks accumulate; attempts are append-only history.

CREATE TABLE templates (
    id           uuid        PRIMARY KEY,
    namespace    text        NOT NULL,
    name         text        NOT NULL,
    version      integer     NOT NULL CHECK (version > 0),
    description  text,
    content      jsonb       NOT NULL,
    content_hash text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (namespace, name, version)
);

CREATE TABLE tasks (
    id               uuid        PRIMARY KEY,
    namespace        text        NOT NULL,
    template_id      uuid        NOT NULL REFERENCES templates (id),
    template_name    text        NOT NULL,
    template_version integer     NOT NULL,
    state            text        NOT NULL
        CHECK (state IN ('pending', 'running', 'completed', 'failed', 'cancelled')),
    priority         smallint    NOT NULL DEFAULT 0,
    context          jsonb       NOT NULL,
    output           jsonb,
    error            text,
    -- Idempotency: (namespace, idempotency_key) and (namespace, request_id) are unique; the hash
    -- of the request body tells a repeat from a conflicting reuse of the key.
    idempotency_key  text,
    request_id       uuid,
    request_hash     text        NOT NULL,
    -- Steps not yet in a terminal state: the task finishes when this reaches zero.
    unfinished_steps integer     NOT NULL CHECK (unfinished_steps >= 0),
    -- A step failed for good: nothing new is admitted (fail-fast).
    failing          boolean     NOT NULL DEFAULT false,
    cancel_requested boolean     NOT NULL DEFAULT false,
    event_seq        bigint      NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz
);

CREATE UNIQUE INDEX tasks_idempotency_key ON tasks (namespace, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE UNIQUE INDEX tasks_request_id ON tasks (namespace, request_id)
    WHERE request_id IS NOT NULL;
-- Listing newest first, per namespace and overall.
CREATE INDEX tasks_namespace_id ON tasks (namespace, id DESC);
CREATE INDEX tasks_state_id ON tasks (state, id DESC);
-- Live tasks only: what the reconciler walks.
CREATE INDEX tasks_live ON tasks (updated_at) WHERE state IN ('pending', 'running');
-- Pruning finished tasks.
CREATE INDEX tasks_finished_at ON tasks (finished_at) WHERE finished_at IS NOT NULL;

CREATE TABLE steps (
    id                    uuid        PRIMARY KEY,
    task_id               uuid        NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    namespace             text        NOT NULL,
    name                  text        NOT NULL,
    position              integer     NOT NULL,
    handler               text        NOT NULL,
    queue                 text        NOT NULL,
    state                 text        NOT NULL
        CHECK (state IN ('waiting', 'queued', 'dispatched', 'retrying',
                         'succeeded', 'failed', 'skipped', 'cancelled')),
    priority              smallint    NOT NULL DEFAULT 0,
    -- The newest attempt number; only ever grows.
    attempt               integer     NOT NULL DEFAULT 0,
    -- Attempts that counted against max_attempts (a missing handler does not count).
    failures              integer     NOT NULL DEFAULT 0,
    max_attempts          integer     NOT NULL CHECK (max_attempts > 0),
    retry_policy          jsonb       NOT NULL,
    queue_wait_timeout_ms bigint      NOT NULL CHECK (queue_wait_timeout_ms > 0),
    execution_timeout_ms  bigint      NOT NULL CHECK (execution_timeout_ms > 0),
    -- Parents not yet succeeded; the step is admitted when this reaches zero.
    pending_parents       integer     NOT NULL CHECK (pending_parents >= 0),
    parent_ids            uuid[]      NOT NULL DEFAULT '{}',
    child_ids             uuid[]      NOT NULL DEFAULT '{}',
    queued_at             timestamptz,
    -- The current attempt (state dispatched): when it was published and by whom it runs.
    dispatched_at         timestamptz,
    started_at            timestamptz,
    worker                text,
    lease_expires_at      timestamptz,
    -- State retrying: when the next attempt is due.
    next_attempt_at       timestamptz,
    output                jsonb,
    error                 text,
    updated_at            timestamptz NOT NULL DEFAULT now(),
    UNIQUE (task_id, name)
);

-- Backlog per queue, by priority then age (admission).
CREATE INDEX steps_queued ON steps (queue, priority DESC, queued_at, id) WHERE state = 'queued';
-- In-flight per queue, and lease expiry.
CREATE INDEX steps_dispatched ON steps (queue) WHERE state = 'dispatched';
CREATE INDEX steps_lease ON steps (lease_expires_at) WHERE state = 'dispatched';
-- Due retries.
CREATE INDEX steps_retry_due ON steps (next_attempt_at) WHERE state = 'retrying';

-- One row per finished attempt. The primary key makes applying an outcome twice impossible.
CREATE TABLE attempts (
    step_id       uuid        NOT NULL,
    attempt       integer     NOT NULL CHECK (attempt > 0),
    task_id       uuid        NOT NULL,
    namespace     text        NOT NULL,
    outcome       text        NOT NULL
        CHECK (outcome IN ('succeeded', 'failed', 'timed_out', 'handler_missing',
                           'cancelled', 'dead_lettered')),
    dispatched_at timestamptz,
    started_at    timestamptz,
    finished_at   timestamptz NOT NULL DEFAULT now(),
    worker        text,
    error         text,
    PRIMARY KEY (step_id, attempt)
);
CREATE INDEX attempts_task ON attempts (task_id);

-- Admitted attempts whose publish is not yet confirmed. Cleared in batches after the confirm;
-- a relay republishes entries left behind by a crash.
CREATE TABLE outbox (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    step_id    uuid        NOT NULL,
    attempt    integer     NOT NULL,
    namespace  text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX outbox_created_at ON outbox (created_at);
