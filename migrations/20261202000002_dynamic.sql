-- Dynamic workflows: decision steps, joins, and mapped steps (one instance per element of an
-- array in the parent's output). Only adds (an older orchestrator keeps running beside a newer
-- one during an upgrade, on templates that use none of this).

-- A mapped step waits in `delegated` while its instances run (it is never dispatched itself).
ALTER TABLE steps DROP CONSTRAINT IF EXISTS steps_state_check;
ALTER TABLE steps ADD CONSTRAINT steps_state_check
    CHECK (state IN ('waiting', 'queued', 'dispatched', 'retrying', 'delegated',
                     'succeeded', 'failed', 'skipped', 'cancelled'));

ALTER TABLE steps
    -- A decision step: the names of the children it may choose among.
    ADD COLUMN decides          text[],
    -- join: any — runs when every parent finished, none failed, at least one succeeded.
    -- `pending_parents` counts parents not yet succeeded or skipped.
    ADD COLUMN join_any         boolean NOT NULL DEFAULT false,
    -- Why a skipped step was skipped: 'not_chosen' and 'parent_skipped' stay skipped when the
    -- task is retried, 'halted' (its task failed) runs again. `skip_reason` says it in words.
    ADD COLUMN skip_cause       text CHECK (skip_cause IN ('not_chosen', 'parent_skipped', 'halted')),
    ADD COLUMN skip_reason      text,
    -- A mapped step: the path into its parent's output, its limits, and its progress.
    ADD COLUMN map_over         text[],
    ADD COLUMN map_max_parallel integer,
    ADD COLUMN map_max_items    integer,
    ADD COLUMN map_tolerate     integer,
    -- Elements of the mapped array (set when the parent succeeded), instances created so far
    -- (they are created in index order, at most max_parallel live at once), live instances
    -- (queued, dispatched or retrying), instances waiting to be let in again after a task
    -- retry, finished instances and failed ones.
    ADD COLUMN map_total        integer,
    ADD COLUMN map_created      integer NOT NULL DEFAULT 0,
    ADD COLUMN map_live         integer NOT NULL DEFAULT 0,
    ADD COLUMN map_waiting      integer NOT NULL DEFAULT 0,
    ADD COLUMN map_done         integer NOT NULL DEFAULT 0,
    ADD COLUMN map_failed       integer NOT NULL DEFAULT 0,
    -- An instance of a mapped step: its mapped step, index and element. Instances share the
    -- mapped step's name.
    ADD COLUMN map_of           uuid,
    ADD COLUMN map_index        integer,
    ADD COLUMN map_item         jsonb;

-- A step name is unique within its task, instances of a mapped step apart.
ALTER TABLE steps DROP CONSTRAINT IF EXISTS steps_task_id_name_key;
CREATE UNIQUE INDEX steps_task_name ON steps (task_id, name, coalesce(map_index, -1));
-- A mapped step's instances in index order (its output, the instance listing, re-admission).
CREATE INDEX steps_map_of ON steps (map_of, map_index) WHERE map_of IS NOT NULL;

-- A template's `on_failure` handler (its step settings as JSON), kept with each task.
ALTER TABLE tasks ADD COLUMN on_failure jsonb;
-- The step an `on_failure` handler runs as: created when its task fails (it must not exist
-- before, so nothing counts or halts it), with the failed step's name and error.
ALTER TABLE steps
    ADD COLUMN failure_handler boolean NOT NULL DEFAULT false,
    ADD COLUMN failure         jsonb;

-- Child workflows: a step with `workflow:` runs another template as a child task (the step is
-- `delegated` meanwhile, and finishes with the child's output or error).
ALTER TABLE tasks
    ADD COLUMN parent_task_id uuid,
    ADD COLUMN parent_step_id uuid,
    ADD COLUMN depth          integer NOT NULL DEFAULT 0;
ALTER TABLE steps
    ADD COLUMN workflow      jsonb,
    ADD COLUMN child_task_id uuid;
-- Steps waiting for their child task (the timers settle those whose child finished).
CREATE INDEX steps_child_running ON steps (child_task_id)
    WHERE state = 'delegated' AND child_task_id IS NOT NULL;
CREATE INDEX tasks_parent ON tasks (parent_task_id) WHERE parent_task_id IS NOT NULL;

-- A step whose handler no worker has: one history row per streak of re-offers, with a count,
-- and the streak bounded by the step's queue-wait timeout.
ALTER TABLE attempts ADD COLUMN repeats integer NOT NULL DEFAULT 1 CHECK (repeats >= 1);
ALTER TABLE steps
    ADD COLUMN missing_since   timestamptz,
    ADD COLUMN missing_attempt integer,
    ADD COLUMN missing_workers text[];
