-- Schedules (docs/schedules.md): a cron expression in a time zone that submits a task of a
-- template at each tick. `next_tick_at` is the next tick that has not fired; the schedules loop
-- of any replica claims a due row (FOR UPDATE SKIP LOCKED), creates the tasks of its due ticks
-- and advances it, in one transaction. NULL while paused, or when the expression has no more.
CREATE TABLE schedules (
    id             uuid        PRIMARY KEY,
    namespace      text        NOT NULL,
    name           text        NOT NULL,
    template_name  text        NOT NULL,
    cron           text        NOT NULL,
    timezone       text        NOT NULL,
    context        jsonb       NOT NULL,
    catch_up       text        NOT NULL CHECK (catch_up IN ('skip', 'latest', 'all')),
    paused         boolean     NOT NULL DEFAULT false,
    next_tick_at   timestamptz,
    last_tick_at   timestamptz,
    last_error     text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (namespace, name)
);

-- The claim: the due, unpaused schedules, oldest tick first.
CREATE INDEX schedules_due ON schedules (next_tick_at) WHERE NOT paused;

-- One row per tick that fired: the unique (schedule, tick) key. A tick's task is created in
-- the transaction that inserts its row, so no tick creates two tasks, whatever the number of
-- replicas. `task_id` is the task it created (no foreign key: tasks are pruned).
CREATE TABLE schedule_ticks (
    schedule_id  uuid        NOT NULL REFERENCES schedules (id) ON DELETE CASCADE,
    tick_at      timestamptz NOT NULL,
    task_id      uuid        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (schedule_id, tick_at)
);
