-- The console (docs/console.md): signed-in browser sessions, and the one index its task list
-- needs beyond the API's.

-- A browser session: the hash of the session cookie's random value (the cookie itself is never
-- stored), the hash of the API key it signed in with (re-checked on every request, so a revoked
-- key ends its sessions), the CSRF token its forms carry, and when it expires.
CREATE TABLE console_sessions (
    id_hash    bytea       PRIMARY KEY,
    key_hash   bytea       NOT NULL,
    csrf       text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE INDEX console_sessions_expires ON console_sessions (expires_at);

-- The tasks page filters by template and state within namespaces, newest first: it scans this
-- index once per (namespace, template, state) and merges, so a rare combination (the failed
-- tasks of one template among a million) reads only what it finds.
CREATE INDEX tasks_template ON tasks (namespace, template_name, state, id DESC);
