use crate::service::Shared;
use sqlx::postgres::PgListener;
use tasker_schemas::TaskId;
use tokio_util::sync::CancellationToken;

/// Forwards `tasker_task_finished` notifications (from every replica) to local waiters.
pub struct FinishListener {
    pub shared: Shared,
}

impl FinishListener {
    /// Runs until `shutdown`, or until the listening connection fails (the supervisor restarts it).
    pub async fn run(self, shutdown: CancellationToken) -> crate::Result<()> {
        let shared = self.shared;
        let mut listener = PgListener::connect_with(&shared.db)
            .await
            .map_err(crate::store::StoreError::from)?;
        listener
            .listen("tasker_task_finished")
            .await
            .map_err(crate::store::StoreError::from)?;
        loop {
            let n = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                n = listener.recv() => n.map_err(crate::store::StoreError::from)?,
            };
            if let Ok(id) = n.payload().parse::<TaskId>() {
                let _ = shared.finished.send(id);
            }
        }
    }
}
