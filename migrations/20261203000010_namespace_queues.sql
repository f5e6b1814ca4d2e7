-- Step queues are per namespace (`{prefix}.step.{namespace}.{queue}`): the slot of a queue is
-- keyed by `{namespace}.{queue}` (neither name holds a dot), so the in-flight bound holds per
-- namespace and queue. The queue slots are recounted under their new keys.
--
-- Upgrade: stop every older replica before starting a newer one (an older one would keep
-- counting under the old keys and publish to the old queue names); then drain the old
-- `{prefix}.step.{queue}` queues (see docs/operations.md).
DELETE FROM slots WHERE scope = 'queue';

INSERT INTO slots (scope, key, in_flight)
SELECT 'queue', namespace || '.' || queue, count(*) FILTER (WHERE state = 'dispatched')
FROM steps GROUP BY namespace, queue;

-- Admission picks the queued steps of one namespace and queue.
DROP INDEX IF EXISTS steps_queued;
CREATE INDEX steps_queued ON steps (namespace, queue, priority DESC, queued_at, id)
    WHERE state = 'queued';
