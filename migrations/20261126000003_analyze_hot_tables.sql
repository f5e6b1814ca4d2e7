-- The hot tables grow from empty in bursts: keep their statistics fresh so plans never assume
-- they are tiny (a stale plan seq-scanned `steps` on every dispatch under load).
ALTER TABLE steps SET (autovacuum_analyze_scale_factor = 0.02, autovacuum_analyze_threshold = 500);
ALTER TABLE tasks SET (autovacuum_analyze_scale_factor = 0.02, autovacuum_analyze_threshold = 500);
ALTER TABLE outbox SET (autovacuum_vacuum_scale_factor = 0.01, autovacuum_analyze_threshold = 500);
