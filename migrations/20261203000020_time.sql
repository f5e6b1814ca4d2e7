-- Time: durable sleeps, signals, delayed start and task deadlines. Only adds (an older
-- orchestrator keeps running beside a newer one during an upgrade, on templates that use none
-- of this).

-- A timed step (`sleep`, `sleep_until`, `wait_for`) runs no handler and is never queued: it
-- waits in `delegated` with a due time, and the timers wake it. `wait` is what it waits for
-- (tasker_schemas::Wait as JSON); `wake_at` when it wakes: the end of a sleep, a signal wait's
-- timeout, or now when a signal was taken for it.
ALTER TABLE steps
    ADD COLUMN wait    jsonb,
    ADD COLUMN wake_at timestamptz;
CREATE INDEX steps_wake_due ON steps (wake_at) WHERE state = 'delegated' AND wake_at IS NOT NULL;

-- Delayed start: a `pending` task starts at `start_at`. Deadline: a live task still live at
-- `deadline_at` (its start plus `deadline_ms`) is cancelled.
ALTER TABLE tasks
    ADD COLUMN start_at    timestamptz,
    ADD COLUMN deadline_ms bigint CHECK (deadline_ms > 0),
    ADD COLUMN deadline_at timestamptz;
CREATE INDEX tasks_start_due ON tasks (start_at) WHERE state = 'pending';
CREATE INDEX tasks_deadline_due ON tasks (deadline_at)
    WHERE state IN ('pending', 'running') AND deadline_at IS NOT NULL AND NOT cancel_requested;

-- Signals sent to a task: unique per (task, name, signal_id), so a repeat is a no-op that finds
-- the first. A signal is kept until a `wait_for` step of its name takes it (oldest first):
-- `consumed_by` is that step, `consumed_attempt` its attempt. Deleted with its task.
CREATE TABLE signals (
    task_id          uuid        NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    name             text        NOT NULL,
    signal_id        text        NOT NULL,
    seq              bigint      GENERATED ALWAYS AS IDENTITY,
    payload          jsonb       NOT NULL,
    received_at      timestamptz NOT NULL DEFAULT now(),
    consumed_by      uuid,
    consumed_attempt integer,
    consumed_at      timestamptz,
    PRIMARY KEY (task_id, name, signal_id)
);
CREATE INDEX signals_unconsumed ON signals (task_id, name, seq) WHERE consumed_by IS NULL;
CREATE INDEX signals_consumed_by ON signals (consumed_by) WHERE consumed_by IS NOT NULL;
