//! The worker registry: what workers announce (`worker_heartbeat`), who is live, and which
//! handlers no live worker runs.

use super::{Result, Shared};
use crate::store::workers::{self, WorkerRow};
use std::collections::{HashMap, HashSet};
use tasker_schemas::WorkerHeartbeat;

/// Most queues or handlers one heartbeat may list.
pub const MAX_LISTED: usize = 1_000;
/// Longest host, SDK name or version (bytes).
pub const MAX_LABEL_BYTES: usize = 256;

/// Bounds a heartbeat: every text short and free of NUL, every queue and handler a valid name,
/// lists and the interval bounded. The reason names the first fault.
pub fn check(h: &WorkerHeartbeat) -> std::result::Result<(), String> {
    for (what, text) in [
        ("host", &h.host),
        ("sdk", &h.sdk),
        ("sdk_version", &h.sdk_version),
    ] {
        if text.len() > MAX_LABEL_BYTES {
            return Err(format!(
                "{what} is {} bytes; at most {MAX_LABEL_BYTES} are allowed",
                text.len()
            ));
        }
        if text.contains('\0') {
            return Err(format!(
                "{what} contains a NUL character, which is not allowed"
            ));
        }
    }
    for (what, list) in [("queues", &h.queues), ("handlers", &h.handlers)] {
        if list.len() > MAX_LISTED {
            return Err(format!(
                "{what} lists {} names; at most {MAX_LISTED} are allowed",
                list.len()
            ));
        }
        for name in list {
            tasker_schemas::template::validate_name(what, name).map_err(|e| e.to_string())?;
        }
    }
    if h.interval_ms == 0 || h.interval_ms > tasker_schemas::template::MAX_DURATION_MS {
        return Err(format!(
            "interval_ms {} is out of range: 1 to {}",
            h.interval_ms,
            tasker_schemas::template::MAX_DURATION_MS
        ));
    }
    Ok(())
}

/// Records a (checked) heartbeat; a stopping worker is forgotten at once.
pub async fn record(shared: &Shared, h: &WorkerHeartbeat) -> Result<()> {
    workers::record(&shared.db, h).await?;
    Ok(())
}

/// The live workers.
pub async fn live(shared: &Shared) -> Result<Vec<WorkerRow>> {
    Ok(workers::live(&shared.db).await?)
}

/// The handlers live workers run, per queue — or `None` when the registry has heard from no
/// worker at all (workers that do not announce themselves: nothing can be said).
pub async fn live_handlers(shared: &Shared) -> Result<Option<HashMap<String, HashSet<String>>>> {
    if !workers::any(&shared.db).await? {
        return Ok(None);
    }
    let mut by_queue: HashMap<String, HashSet<String>> = HashMap::new();
    for w in workers::live(&shared.db).await? {
        for q in &w.queues {
            by_queue
                .entry(q.clone())
                .or_default()
                .extend(w.handlers.iter().cloned());
        }
    }
    Ok(Some(by_queue))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat() -> WorkerHeartbeat {
        WorkerHeartbeat {
            worker_id: tasker_schemas::WorkerId::new(),
            worker: "w".into(),
            host: "h".into(),
            sdk: "rust".into(),
            sdk_version: "0.1.0".into(),
            queues: vec!["default".into()],
            handlers: vec!["charge".into()],
            concurrency: 4,
            in_flight: 0,
            interval_ms: 10_000,
            stopping: false,
        }
    }

    #[test]
    fn heartbeats_are_bounded_with_the_reason() {
        assert_eq!(check(&beat()), Ok(()));
        let mut h = beat();
        h.host = "x".repeat(300);
        assert!(check(&h).unwrap_err().contains("host is 300 bytes"));
        let mut h = beat();
        h.sdk = "a\0b".into();
        assert!(check(&h).unwrap_err().contains("NUL"));
        let mut h = beat();
        h.handlers = vec!["bad name".into()];
        assert!(check(&h).unwrap_err().contains("bad name"));
        let mut h = beat();
        h.queues = (0..1_001).map(|i| format!("q{i}")).collect();
        assert!(check(&h).unwrap_err().contains("lists 1001 names"));
        let mut h = beat();
        h.interval_ms = 0;
        assert!(
            check(&h)
                .unwrap_err()
                .contains("interval_ms 0 is out of range")
        );
    }
}
