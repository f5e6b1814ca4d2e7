-- Dead letters: AMQP cannot browse a queue without consuming it, so the orchestrator consumes
-- `{prefix}.dead_letters` into this table (insert, then ack). Bounded by
-- TASKER_DEAD_LETTER_MAX_ROWS: the oldest rows are deleted beyond it.
CREATE TABLE dead_letters (
    id           bigserial   PRIMARY KEY,
    received_at  timestamptz NOT NULL DEFAULT now(),
    -- What the message was: from its envelope, else its death queue or routing key.
    kind         text        NOT NULL CHECK (kind IN ('task_request', 'step', 'result', 'other')),
    -- Why: the orchestrator's `x-tasker-reason` header, else the broker's death reason.
    reason       text        NOT NULL,
    -- Where the original was going: the exchange and queue it died from (x-death, when the
    -- broker dead-lettered it) and its routing key.
    exchange     text        NOT NULL,
    routing_key  text        NOT NULL,
    message_id   text,
    headers      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    -- The body, cut at TASKER_MAX_REQUEST_BYTES (`body_bytes` is the original size).
    body         bytea       NOT NULL,
    body_bytes   integer     NOT NULL,
    -- Decoded from the body when it could be.
    namespace    text,
    task_id      uuid,
    step         text
);
-- At-least-once intake: a redelivered dead letter is recorded once.
CREATE UNIQUE INDEX dead_letters_message ON dead_letters (message_id) WHERE message_id IS NOT NULL;
CREATE INDEX dead_letters_kind ON dead_letters (kind, id);
CREATE INDEX dead_letters_namespace ON dead_letters (namespace, id);
CREATE INDEX dead_letters_received ON dead_letters (received_at);
