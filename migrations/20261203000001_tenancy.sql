-- Tenancy: scoped API keys (stored hashed), the audit log of operator actions, per-namespace
-- settings (retention), and purged tasks.

-- An API key: its SHA-256 hash (the key itself is shown once, at creation), a role and the
-- namespaces it may act in (NULL = every namespace).
CREATE TABLE api_keys (
    id          uuid        PRIMARY KEY,
    name        text        NOT NULL DEFAULT '',
    token_hash  bytea       NOT NULL UNIQUE,
    role        text        NOT NULL CHECK (role IN ('read', 'submit', 'operate', 'admin')),
    namespaces  text[],
    created_at  timestamptz NOT NULL DEFAULT now(),
    created_by  text        NOT NULL,
    revoked_at  timestamptz,
    revoked_by  text
);

-- Who did what: every operator action (cancel, retry, template registration, key changes,
-- purge, namespace settings, console actions).
CREATE TABLE audit_log (
    id         bigserial   PRIMARY KEY,
    at         timestamptz NOT NULL DEFAULT now(),
    actor      text        NOT NULL,
    key_id     uuid,
    action     text        NOT NULL,
    namespace  text,
    task_id    uuid,
    detail     jsonb       NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX audit_log_task ON audit_log (task_id, id) WHERE task_id IS NOT NULL;
CREATE INDEX audit_log_namespace ON audit_log (namespace, id);
CREATE INDEX audit_log_at ON audit_log (at);

-- Per-namespace settings; a NULL retention means the global one (TASKER_RETENTION_MS).
CREATE TABLE namespace_settings (
    namespace     text        PRIMARY KEY,
    retention_ms  bigint      CHECK (retention_ms IS NULL OR retention_ms > 0),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- When a finished task's context and outputs were erased (`tasker purge`).
ALTER TABLE tasks ADD COLUMN purged_at timestamptz;

-- Pruning namespace by namespace, each with its own retention: this index replaces the one on
-- finished_at alone (one index to maintain per finished task, as before).
CREATE INDEX tasks_namespace_finished_at ON tasks (namespace, finished_at)
    WHERE finished_at IS NOT NULL;
DROP INDEX IF EXISTS tasks_finished_at;
