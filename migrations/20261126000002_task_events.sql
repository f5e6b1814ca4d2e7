-- A task's history: finish, cancel and retry, each with the task's event sequence number.
CREATE TABLE task_events (
    task_id   uuid        NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    seq       bigint      NOT NULL,
    namespace text        NOT NULL,
    kind      text        NOT NULL,
    detail    jsonb,
    at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task_id, seq)
);

-- The reconciler looks at steps waiting on parents.
CREATE INDEX steps_waiting ON steps (task_id) WHERE state = 'waiting';
