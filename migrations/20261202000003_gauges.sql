-- The gauges of /metrics (ready, in flight and retrying steps per queue, live tasks per
-- template): one replica at a time computes them on a timer (the one whose UPDATE of
-- `computed_at` succeeds) and every replica reads the snapshot, so the database answers the
-- counting queries once per interval, not once per replica or per scrape.
CREATE TABLE gauge_snapshot (
    id          int PRIMARY KEY CHECK (id = 1),
    computed_at timestamptz NOT NULL DEFAULT '-infinity',
    body        jsonb       NOT NULL DEFAULT '{}'
);
INSERT INTO gauge_snapshot (id) VALUES (1);
