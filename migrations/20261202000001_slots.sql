-- One slot mechanism: in-flight counters per (scope, key). Today the only scope is `queue` (the
-- dispatched steps of one queue, formerly `queue_slots`); narrower limits (a mapped step's
-- max_parallel, per-key concurrency) become further scopes of the same counter. Admission adds
-- to a slot under its row lock, applied outcomes take from it, the reconciler recounts it.
--
-- Upgrade: `queue_slots` is left in place (only added to, as every migration here) so that an
-- older orchestrator can keep running beside a newer one during a rolling upgrade. While both
-- run, each keeps its own counter: the in-flight bound may be exceeded briefly, and the newer
-- replicas' reconciler recounts `slots` from the steps. Once no older replica runs,
-- `queue_slots` is unused; a later release drops it.
CREATE TABLE slots (
    scope     text   NOT NULL,
    key       text   NOT NULL,
    in_flight bigint NOT NULL,
    PRIMARY KEY (scope, key)
) WITH (fillfactor = 50);

INSERT INTO slots (scope, key, in_flight)
SELECT 'queue', queue, count(*) FILTER (WHERE state = 'dispatched') FROM steps GROUP BY queue;
