//! One broker session: a connection, a publisher channel in confirm mode, and one consumer channel
//! per step queue. A session ends on shutdown (drained gracefully) or when anything in it breaks
//! (the worker then opens a new one); there is never more than one consumer per queue.

use crate::delivery;
use crate::handler::DynHandler;
use futures_util::StreamExt;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, Consumer, ErrorKind};
use std::collections::HashMap;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tasker_schemas::{DataLimits, Names};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// How long connecting (TCP, TLS, AMQP handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// After the grace period: how long cancelled handlers get before their steps are abandoned.
const ABANDON_WAIT: Duration = Duration::from_secs(1);
/// How long shutdown waits for outstanding publisher confirms.
const CONFIRM_WAIT: Duration = Duration::from_secs(5);

/// State that outlives sessions: handlers, the concurrency bound and the running steps.
/// When a step counts as long, and how often its lease is renewed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LongSteps {
    pub(crate) after: Duration,
    pub(crate) heartbeat: Duration,
}

pub(crate) struct Shared {
    pub(crate) names: Names,
    pub(crate) worker: String,
    pub(crate) handlers: HashMap<String, DynHandler>,
    /// Bounds running steps over all queues and sessions.
    pub(crate) semaphore: Arc<Semaphore>,
    /// Every delivery task, whatever session took it.
    pub(crate) tracker: TaskTracker,
    pub(crate) limits: DataLimits,
    grace_period: Duration,
    /// Cancelled when the grace period runs out: asks every handler to stop.
    pub(crate) abort: CancellationToken,
    /// Cancelled when the remaining steps are abandoned: every delivery task ends at once,
    /// without acknowledging its message.
    pub(crate) hard_stop: CancellationToken,
    /// Publishes that failed in a row; the delay before requeueing grows with it.
    pub(crate) publish_failures: AtomicU32,
    pub(crate) long_steps: LongSteps,
    /// Tasks cancelled by an operator (from the cancel exchange).
    pub(crate) cancellations: crate::cancel::Cancellations,
    /// What the worker announces to the registry, and the user it publishes as.
    pub(crate) identity: crate::registry::Identity,
}

impl Shared {
    pub(crate) fn new(
        names: Names,
        worker: String,
        handlers: HashMap<String, DynHandler>,
        limits: DataLimits,
        grace_period: Duration,
        long_steps: LongSteps,
        identity: crate::registry::Identity,
    ) -> Self {
        Self {
            names,
            worker,
            handlers,
            semaphore: Arc::new(Semaphore::new(identity.concurrency)),
            tracker: TaskTracker::new(),
            limits,
            grace_period,
            abort: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
            publish_failures: AtomicU32::new(0),
            long_steps,
            cancellations: Default::default(),
            identity,
        }
    }

    /// Waits for running steps: up to the grace period, then cancels them, then abandons them.
    /// Call it once no new step can start.
    pub(crate) async fn drain(&self) {
        self.tracker.close();
        let running = self.tracker.len();
        if running > 0 {
            info!(worker = %self.worker, running, grace_period = ?self.grace_period, "waiting for running steps to finish");
        }
        if tokio::time::timeout(self.grace_period, self.tracker.wait())
            .await
            .is_ok()
        {
            return;
        }
        warn!(worker = %self.worker, running = self.tracker.len(), "grace period over: cancelling running steps");
        self.abort.cancel();
        if tokio::time::timeout(ABANDON_WAIT, self.tracker.wait())
            .await
            .is_ok()
        {
            return;
        }
        warn!(
            worker = %self.worker,
            abandoned = self.tracker.len(),
            "abandoning steps that are still running: they are not acknowledged and return to their queue"
        );
        self.hard_stop.cancel();
        self.tracker.wait().await;
    }
}

/// Why a session could not be opened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    #[error("queue {0} does not exist; register a template that uses it first")]
    QueueMissing(String),
    #[error("the broker refused access to queue {queue}: {reason}")]
    AccessRefused { queue: String, reason: String },
    #[error("AMQP error: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("connecting timed out after {0:?}")]
    ConnectTimeout(Duration),
}

/// How a session ended.
pub(crate) enum SessionEnd {
    /// Shutdown was requested and the session drained and closed.
    Shutdown,
    /// Something broke; the reason is in words.
    Lost(String),
}

struct QueueConsumer {
    queue: String,
    channel: Channel,
    consumer: Consumer,
}

pub(crate) struct Session {
    connection: Connection,
    publisher: Channel,
    consumers: Vec<QueueConsumer>,
    cancels: Option<Consumer>,
}

/// What a delivery task needs from its session. Cheap to clone.
#[derive(Clone)]
pub(crate) struct SessionEnv {
    pub(crate) shared: Arc<Shared>,
    pub(crate) publisher: Channel,
    /// Publishes step results (batched while the publisher is busy).
    pub(crate) results: crate::batch::ResultSender,
    /// Parent of the handlers' tokens; cancelled when the session is lost.
    pub(crate) handler_cancel: CancellationToken,
    stop: CancellationToken,
    lost: CancellationToken,
    lost_reason: Arc<Mutex<Option<String>>>,
}

impl SessionEnv {
    /// Ends the session (unless it is already stopping) so the worker reconnects.
    pub(crate) fn lose(&self, reason: String) {
        if self.stop.is_cancelled() {
            return;
        }
        let mut slot = self.lost_reason.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(reason);
        }
        drop(slot);
        self.lost.cancel();
    }

    fn lost_reason(&self) -> String {
        let slot = self.lost_reason.lock().unwrap_or_else(|e| e.into_inner());
        slot.clone().unwrap_or_else(|| "unknown".to_owned())
    }
}

fn is_not_found(error: &lapin::Error) -> bool {
    matches!(error.kind(), ErrorKind::ProtocolError(e) if *e.kind() == AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
}

fn is_access_refused(error: &lapin::Error) -> bool {
    matches!(error.kind(), ErrorKind::ProtocolError(e) if *e.kind() == AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED))
}

/// A queue's refusal as a [`SessionError`]: missing, access refused (another namespace's
/// broker user), or another broker error.
fn queue_error(queue: &str, e: lapin::Error) -> SessionError {
    if is_not_found(&e) {
        SessionError::QueueMissing(queue.to_owned())
    } else if is_access_refused(&e) {
        SessionError::AccessRefused {
            queue: queue.to_owned(),
            reason: e.to_string(),
        }
    } else {
        e.into()
    }
}

impl Session {
    /// Connects, checks that every step queue exists, and starts consuming. `queues` holds
    /// (template queue name, AMQP queue name) pairs.
    pub(crate) async fn open(
        shared: &Shared,
        url: &str,
        tls: &OwnedTLSConfig,
        queues: &[(String, String)],
        prefetch: u16,
    ) -> Result<Self, SessionError> {
        let properties =
            ConnectionProperties::default().with_connection_name(shared.worker.clone().into());
        let connect = tasker_client::tls::amqp_connect(url, properties, tls);
        let connection = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| SessionError::ConnectTimeout(CONNECT_TIMEOUT))??;
        match Self::subscribe(&connection, shared, queues, prefetch).await {
            Ok((publisher, consumers, cancels)) => {
                info!(
                    worker = %shared.worker,
                    queues = ?consumers.iter().map(|c| c.queue.as_str()).collect::<Vec<_>>(),
                    prefetch,
                    "connected; consuming step queues"
                );
                Ok(Self {
                    connection,
                    publisher,
                    consumers,
                    cancels,
                })
            }
            Err(e) => {
                let _ = connection.close(200, "worker setup failed".into()).await;
                Err(e)
            }
        }
    }

    async fn subscribe(
        connection: &Connection,
        shared: &Shared,
        queues: &[(String, String)],
        prefetch: u16,
    ) -> Result<(Channel, Vec<QueueConsumer>, Option<Consumer>), SessionError> {
        // The orchestrator owns the topology: only check that the queues exist. A failed passive
        // declare closes its channel, hence a channel of its own.
        let check = connection.create_channel().await?;
        for (_, queue) in queues {
            let passive = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            };
            if let Err(e) = check
                .queue_declare(queue.as_str().into(), passive, FieldTable::default())
                .await
            {
                return Err(queue_error(queue, e));
            }
        }
        let _ = check.close(200, "queues checked".into()).await;

        let publisher = connection.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;

        let mut consumers = Vec::with_capacity(queues.len());
        for (name, queue) in queues {
            let channel = connection.create_channel().await?;
            channel
                .basic_qos(prefetch, BasicQosOptions::default())
                .await?;
            // An empty tag lets the broker choose one.
            let tag = ShortString::try_new(format!("{}.{name}", shared.worker))
                .unwrap_or_else(|_| "".into());
            let consumer = channel
                .basic_consume(
                    queue.as_str().into(),
                    tag,
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| queue_error(queue, e))?;
            consumers.push(QueueConsumer {
                queue: queue.clone(),
                channel,
                consumer,
            });
        }
        // Cancel messages are best effort: without them a cancelled task's results are still
        // refused by the orchestrator, its steps just run.
        let cancels = match listen_to_cancels(connection, shared).await {
            Ok(c) => Some(c),
            Err(e) => {
                warn!(worker = %shared.worker, error = %e, "not listening for cancel messages");
                None
            }
        };
        Ok((publisher, consumers, cancels))
    }

    /// Runs until shutdown (then drains and closes) or until the session breaks.
    pub(crate) async fn run(
        self,
        shared: &Arc<Shared>,
        shutdown: &CancellationToken,
    ) -> SessionEnd {
        let env = SessionEnv {
            shared: Arc::clone(shared),
            publisher: self.publisher.clone(),
            results: crate::batch::ResultSender::start(
                self.publisher.clone(),
                shared.names.results_exchange(),
                shared.identity.user_id.clone(),
            ),
            handler_cancel: shared.abort.child_token(),
            stop: CancellationToken::new(),
            lost: CancellationToken::new(),
            lost_reason: Arc::new(Mutex::new(None)),
        };
        let loops: Vec<_> = self
            .consumers
            .iter()
            .map(|c| tokio::spawn(consume(c.queue.clone(), c.consumer.clone(), env.clone())))
            .collect();
        let _announce = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(
            crate::registry::announce_loop(self.publisher.clone(), Arc::clone(shared)),
        ));
        let cancel_loop = self.cancels.clone().map(|c| {
            tokio_util::task::AbortOnDropHandle::new(tokio::spawn(record_cancels(
                c,
                Arc::clone(shared),
            )))
        });

        let lost = tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = env.lost.cancelled() => true,
        };
        env.stop.cancel();
        for handle in loops {
            let _ = handle.await;
        }
        drop(cancel_loop);
        if lost {
            // Closing the connection returns every unacknowledged message to its queue, so the
            // steps still running here will run again: ask them to stop.
            env.handler_cancel.cancel();
            let _ = self
                .connection
                .close(200, "worker reconnecting".into())
                .await;
            return SessionEnd::Lost(env.lost_reason());
        }
        self.shutdown(shared).await;
        SessionEnd::Shutdown
    }

    async fn shutdown(self, shared: &Shared) {
        for c in &self.consumers {
            if let Err(e) = c
                .channel
                .basic_cancel(c.consumer.tag(), BasicCancelOptions::default())
                .await
            {
                warn!(worker = %shared.worker, queue = %c.queue, error = %e, "cannot cancel the consumer");
            }
        }
        info!(worker = %shared.worker, "shutting down: stopped taking new steps");
        shared.drain().await;
        // Leaving the registry at once (best effort: otherwise it forgets us after 3 intervals).
        match tokio::time::timeout(
            CONFIRM_WAIT,
            crate::registry::announce(&self.publisher, shared, true),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(worker = %shared.worker, error = %e, "could not leave the worker registry")
            }
            Err(_) => warn!(worker = %shared.worker, "leaving the worker registry timed out"),
        }
        match tokio::time::timeout(CONFIRM_WAIT, self.publisher.wait_for_confirms()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                warn!(worker = %shared.worker, error = %e, "waiting for publisher confirms failed")
            }
            Err(_) => {
                warn!(worker = %shared.worker, "publisher confirms still outstanding after {CONFIRM_WAIT:?}")
            }
        }
        // Closing the consumer channels returns abandoned steps' messages to their queues.
        for c in &self.consumers {
            let _ = c.channel.close(200, "worker stopping".into()).await;
        }
        let _ = self.publisher.close(200, "worker stopping".into()).await;
        if let Err(e) = self.connection.close(200, "worker stopped".into()).await {
            warn!(worker = %shared.worker, error = %e, "closing the connection failed");
        }
        info!(worker = %shared.worker, "worker stopped");
    }
}

/// A private, server-named queue bound to the cancel exchange (on a channel of its own: a
/// missing exchange closes it).
async fn listen_to_cancels(
    connection: &Connection,
    shared: &Shared,
) -> Result<Consumer, lapin::Error> {
    let channel = connection.create_channel().await?;
    let private = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..QueueDeclareOptions::default()
    };
    let queue = channel
        .queue_declare("".into(), private, FieldTable::default())
        .await?;
    channel
        .queue_bind(
            queue.name().clone(),
            shared.names.cancel_exchange().into(),
            "".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await?;
    let no_ack = BasicConsumeOptions {
        no_ack: true,
        ..BasicConsumeOptions::default()
    };
    channel
        .basic_consume(
            queue.name().clone(),
            "".into(),
            no_ack,
            FieldTable::default(),
        )
        .await
}

/// Records cancel messages (best effort: a worker that misses one still has its result refused).
async fn record_cancels(mut consumer: Consumer, shared: Arc<Shared>) {
    while let Some(Ok(delivery)) = consumer.next().await {
        match tasker_schemas::decode::<tasker_schemas::Cancel>(&delivery.data) {
            Ok(cancel) => {
                info!(worker = %shared.worker, task_id = %cancel.payload.task_id, "task cancelled: refusing its steps");
                let at = crate::delivery::published_ms(&delivery.properties);
                shared.cancellations.cancel(cancel.payload.task_id, at);
            }
            Err(e) => {
                warn!(worker = %shared.worker, error = %e, "ignoring an unreadable cancel message")
            }
        }
    }
}

/// Takes deliveries from one queue and starts a task for each once a concurrency slot is free.
/// A delivery taken but not started when the session stops is dropped unacknowledged: closing
/// its channel returns it to the queue.
async fn consume(queue: String, mut consumer: Consumer, env: SessionEnv) {
    loop {
        let next = tokio::select! {
            biased;
            _ = env.stop.cancelled() => return,
            next = consumer.next() => next,
        };
        let delivery = match next {
            Some(Ok(delivery)) => delivery,
            Some(Err(e)) => return env.lose(format!("consumer of queue {queue} failed: {e}")),
            None => {
                return env.lose(format!(
                    "the broker cancelled the consumer of queue {queue}"
                ));
            }
        };
        let permit = tokio::select! {
            biased;
            _ = env.stop.cancelled() => return,
            permit = Arc::clone(&env.shared.semaphore).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        env.shared
            .tracker
            .spawn(delivery::process(env.clone(), delivery, permit));
    }
}
