-- The worker registry: the latest `worker_heartbeat` of each worker process. A worker counts as
-- live until 3 of its intervals pass without a word; one that stopped gracefully is deleted at
-- once, and rows of workers gone for 10 minutes are deleted by the gauges loop.
CREATE TABLE workers (
    worker_id    uuid        PRIMARY KEY,
    name         text        NOT NULL,
    host         text        NOT NULL,
    sdk          text        NOT NULL,
    sdk_version  text        NOT NULL,
    queues       text[]      NOT NULL,
    handlers     text[]      NOT NULL,
    concurrency  int         NOT NULL,
    in_flight    int         NOT NULL,
    interval_ms  bigint      NOT NULL,
    first_seen   timestamptz NOT NULL DEFAULT now(),
    last_seen    timestamptz NOT NULL DEFAULT now()
);
