-- Dispatched steps per queue, kept in step with admissions (+) and applied outcomes (-), so that
-- admission checks the in-flight bound without counting dispatched steps (a count grows with
-- the number in flight). The row is also the per-queue admission lock: admission and the outcome
-- apply change it under its row lock. The reconciler recounts it under the same lock.
CREATE TABLE queue_slots (
    queue     text   PRIMARY KEY,
    in_flight bigint NOT NULL
) WITH (fillfactor = 50);

INSERT INTO queue_slots (queue, in_flight)
SELECT queue, count(*) FILTER (WHERE state = 'dispatched') FROM steps GROUP BY queue;
