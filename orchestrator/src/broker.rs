//! RabbitMQ: connection, the topology the orchestrator owns, and confirmed publishing.

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use lapin::{Confirmation, PublisherConfirm};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tasker_schemas::message::{
    CONTENT_TYPE, HEADER_DEAD_LETTER_REASON, HEADER_ORIGINAL_USER_ID, HEADER_TRACEPARENT,
};
use tasker_schemas::topology::split_step_routing_key;
use tasker_schemas::{MessageId, Names, StepId, TaskId};
use tokio::sync::RwLock;

/// What talking to the broker can fail with. Every variant may succeed later: the broker is
/// down, restarting or refusing for now.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker error: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// A publish that must be confirmed was refused or returned.
    #[error("publish not confirmed: {0}")]
    NotConfirmed(String),
}

pub type Result<T, E = BrokerError> = std::result::Result<T, E>;

/// How long connecting (TCP, TLS, AMQP handshake) and declaring the topology may take: a broker
/// that accepts connections but does not answer must not hang the orchestrator.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens a connection named after this process (visible in the broker's management UI), with
/// the TLS settings `tls` for an `amqps://` URL.
pub async fn connect(url: &str, tls: &OwnedTLSConfig) -> Result<Connection> {
    let props = ConnectionProperties::default().with_connection_name("tasker-orchestrator".into());
    let connect = tasker_client::tls::amqp_connect(url, props, tls);
    match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Ok(connection) => Ok(connection?),
        Err(_) => Err(BrokerError::Unavailable(format!(
            "no answer within {CONNECT_TIMEOUT:?}"
        ))),
    }
}

/// Arguments of every queue the orchestrator declares: durable quorum queues that dead-letter
/// to the prefix's dead-letter exchange after `delivery_limit` deliveries.
fn queue_args(names: &Names, delivery_limit: u32) -> FieldTable {
    queue_args_to(&names.dead_letter_exchange(), delivery_limit)
}

fn queue_args_to(dead_letter_exchange: &str, delivery_limit: u32) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(i64::from(delivery_limit)),
    );
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from(dead_letter_exchange)),
    );
    args
}

fn durable() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

/// Declares every exchange and the orchestrator's own queues. Idempotent.
pub async fn declare_topology(
    ch: &Channel,
    names: &Names,
    shards: u16,
    delivery_limit: u32,
) -> Result<()> {
    for (name, kind) in [
        (names.tasks_exchange(), ExchangeKind::Topic),
        (names.steps_exchange(), ExchangeKind::Direct),
        (names.results_exchange(), ExchangeKind::Topic),
        (names.events_exchange(), ExchangeKind::Topic),
        (names.cancel_exchange(), ExchangeKind::Fanout),
        (names.dead_letter_exchange(), ExchangeKind::Fanout),
        (names.step_dead_letter_exchange(), ExchangeKind::Fanout),
    ] {
        ch.exchange_declare(name.into(), kind, durable(), FieldTable::default())
            .await?;
    }
    let queue_opts = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    // The dead-letter queue itself does not dead-letter.
    let mut dl_args = FieldTable::default();
    dl_args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    ch.queue_declare(names.dead_letter_queue().into(), queue_opts, dl_args)
        .await?;
    ch.queue_bind(
        names.dead_letter_queue().into(),
        names.dead_letter_exchange().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    // Dead step messages go to their own queue: the orchestrator turns each into a failed attempt.
    ch.queue_declare(
        names.step_dead_letter_queue().into(),
        queue_opts,
        queue_args(names, delivery_limit),
    )
    .await?;
    ch.queue_bind(
        names.step_dead_letter_queue().into(),
        names.step_dead_letter_exchange().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    ch.queue_declare(
        names.task_requests_queue().into(),
        queue_opts,
        queue_args(names, delivery_limit),
    )
    .await?;
    ch.queue_bind(
        names.task_requests_queue().into(),
        names.tasks_exchange().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    for shard in 0..shards.max(1) {
        ch.queue_declare(
            names.results_queue(shard).into(),
            queue_opts,
            queue_args(names, delivery_limit),
        )
        .await?;
        ch.queue_bind(
            names.results_queue(shard).into(),
            names.results_exchange().into(),
            format!("*.{shard}").into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    // Workers announce themselves on results queue 0 (the worker registry).
    ch.queue_bind(
        names.results_queue(0).into(),
        names.results_exchange().into(),
        tasker_schemas::topology::WORKER_HEARTBEAT_ROUTING_KEY.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    Ok(())
}

/// Declares the queue of a template queue of one namespace (`key` is
/// [`tasker_schemas::topology::step_routing_key`], `{namespace}.{queue}`) and binds it to the
/// steps exchange with that key.
pub async fn declare_step_queue(
    ch: &Channel,
    names: &Names,
    key: &str,
    delivery_limit: u32,
) -> Result<()> {
    let Some((namespace, queue)) = split_step_routing_key(key) else {
        return Err(BrokerError::Unavailable(format!(
            "{key:?} is not a namespace and a queue"
        )));
    };
    let amqp_queue = names.step_queue(namespace, queue);
    ch.queue_declare(
        amqp_queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        queue_args_to(&names.step_dead_letter_exchange(), delivery_limit),
    )
    .await?;
    ch.queue_bind(
        amqp_queue.into(),
        names.steps_exchange().into(),
        key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    Ok(())
}

/// Properties of every message we publish.
pub fn properties(message_id: MessageId) -> BasicProperties {
    // The publish time: a worker refuses a cancelled task's steps published before the cancel,
    // and runs those of a retry (milliseconds in a header; the AMQP timestamp has seconds).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut headers = FieldTable::default();
    headers.insert(
        tasker_schemas::message::HEADER_PUBLISHED_MS.into(),
        AMQPValue::LongLongInt(i64::try_from(now.as_millis()).unwrap_or(i64::MAX)),
    );
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(CONTENT_TYPE.into())
        .with_message_id(message_id.to_string().into())
        .with_timestamp(now.as_secs())
        .with_headers(headers)
}

/// The W3C trace context (`traceparent`, version `00`, sampled) of one attempt of a step:
/// `00-{trace}-{span}-01`. The trace id is the task id's 32 hex digits, so every step of a task
/// (every attempt, every replica, every relay) is in one trace; the span id is derived from the
/// step id and the attempt, so a message published again for the same attempt has the same span.
pub fn traceparent(task_id: TaskId, step_id: StepId, attempt: u32) -> String {
    use sha2::{Digest, Sha256};
    let mut digest = Sha256::new();
    digest.update(step_id.0.as_bytes());
    digest.update(attempt.to_be_bytes());
    let mut span = [0u8; 8];
    span.copy_from_slice(&digest.finalize()[..8]);
    // All zeros is an invalid span id (W3C trace context, 3.2.2.4).
    if span == [0; 8] {
        span[7] = 1;
    }
    format!("00-{}-{}-01", task_id.0.simple(), hex::encode(span))
}

/// Adds the `traceparent` header ([`traceparent`]) to a message's properties.
pub fn with_traceparent(props: BasicProperties, traceparent: &str) -> BasicProperties {
    let mut headers = props.headers().clone().unwrap_or_default();
    headers.insert(
        HEADER_TRACEPARENT.into(),
        AMQPValue::LongString(LongString::from(traceparent)),
    );
    props.with_headers(headers)
}

/// The orchestrator's publishing link: one connection and one channel in confirm mode, shared
/// by every task; publishes are pipelined (await the returned confirm later). When the broker
/// goes away, the next publish reconnects (with the topology redeclared); publishes that were in
/// flight fail and their outbox entries are relayed later.
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<PublisherInner>,
}

struct PublisherInner {
    url: String,
    tls: OwnedTLSConfig,
    names: Names,
    shards: u16,
    delivery_limit: u32,
    step_queues: std::sync::Mutex<HashSet<String>>,
    link: RwLock<Link>,
    /// Reconnect attempts of the current outage, and when one was last logged (an outage logs
    /// a line every [`RECONNECT_LOG_EVERY`] at most, with the attempts held back since).
    reconnects: std::sync::Mutex<(u64, Option<std::time::Instant>)>,
}

/// At most one "reconnecting" line per this interval during an outage.
const RECONNECT_LOG_EVERY: Duration = Duration::from_secs(10);

struct Link {
    connection: Connection,
    channel: Channel,
}

/// How a confirmed publish ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivered {
    /// Routed and stored by the broker.
    Confirmed,
    /// The broker had no queue for it (mandatory publish returned).
    Unroutable(String),
    /// The broker refused it.
    Nacked,
}

impl Publisher {
    /// Connects and declares the topology the orchestrator owns.
    pub async fn connect(
        url: &str,
        tls: &OwnedTLSConfig,
        names: &Names,
        shards: u16,
        delivery_limit: u32,
    ) -> Result<Self> {
        let none = HashSet::new();
        let open = Self::open(url, tls, names, shards, delivery_limit, &none);
        let link = tokio::time::timeout(CONNECT_TIMEOUT * 2, open)
            .await
            .map_err(|_| BrokerError::Unavailable("declaring the topology timed out".into()))??;
        Ok(Self {
            inner: Arc::new(PublisherInner {
                url: url.to_owned(),
                tls: tls.clone(),
                names: names.clone(),
                shards,
                delivery_limit,
                step_queues: Default::default(),
                link: RwLock::new(link),
                reconnects: std::sync::Mutex::new((0, None)),
            }),
        })
    }

    async fn open(
        url: &str,
        tls: &OwnedTLSConfig,
        names: &Names,
        shards: u16,
        delivery_limit: u32,
        queues: &HashSet<String>,
    ) -> Result<Link> {
        let connection = connect(url, tls).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        declare_topology(&channel, names, shards, delivery_limit).await?;
        for q in queues {
            declare_step_queue(&channel, names, q, delivery_limit).await?;
        }
        Ok(Link {
            connection,
            channel,
        })
    }

    /// The confirm channel, reconnecting first if the broker connection was lost. Only one
    /// caller reconnects, within a bounded time; the others fail at once (their publishes are
    /// covered by the outbox, or are best effort) instead of queueing behind it.
    pub async fn channel(&self) -> Result<Channel> {
        {
            let link = self.inner.link.read().await;
            if link.channel.status().connected() {
                return Ok(link.channel.clone());
            }
        }
        let Ok(mut link) = self.inner.link.try_write() else {
            return Err(BrokerError::Unavailable(
                "reconnecting to the broker".into(),
            ));
        };
        if !link.channel.status().connected() {
            {
                let mut r = self
                    .inner
                    .reconnects
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                r.0 += 1;
                if r.1.is_none_or(|at| at.elapsed() >= RECONNECT_LOG_EVERY) {
                    tracing::warn!(
                        attempts = r.0,
                        "broker link lost; reconnecting (logged at most every 10 s)"
                    );
                    r.1 = Some(std::time::Instant::now());
                }
            }
            let queues = self
                .inner
                .step_queues
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let i = &self.inner;
            let open = Self::open(
                &i.url,
                &i.tls,
                &i.names,
                i.shards,
                i.delivery_limit,
                &queues,
            );
            *link = match tokio::time::timeout(CONNECT_TIMEOUT * 2, open).await {
                Ok(link) => link?,
                Err(_) => return Err(BrokerError::Unavailable("reconnecting timed out".into())),
            };
            let (attempts, _) = std::mem::take(
                &mut *self
                    .inner
                    .reconnects
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()),
            );
            tracing::info!(attempts, "broker link re-established");
        }
        Ok(link.channel.clone())
    }

    /// Messages waiting in `queue` (a passive declare on a channel of its own: a queue that does
    /// not exist closes that channel, not the publishing one).
    pub async fn message_count(&self, queue: &str) -> Result<u32> {
        let channel = {
            let link = self.inner.link.read().await;
            link.connection.create_channel().await?
        };
        let q = channel
            .queue_declare(
                queue.into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await;
        let _ = channel.close(200, "done".into()).await;
        Ok(q?.message_count())
    }

    /// True while the publishing link is up (for `/ready`).
    pub fn is_connected(&self) -> bool {
        self.inner
            .link
            .try_read()
            .map(|l| l.channel.status().connected())
            .unwrap_or(false)
    }

    /// Declares a step queue (`{namespace}.{queue}`) now and after every reconnect.
    pub async fn declare_step_queue(&self, queue: &str) -> Result<()> {
        let ch = self.channel().await?;
        declare_step_queue(&ch, &self.inner.names, queue, self.inner.delivery_limit).await?;
        self.inner
            .step_queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(queue.to_owned());
        Ok(())
    }

    /// Closes the connection.
    pub async fn close(&self) {
        let link = self.inner.link.read().await;
        let _ = link.connection.close(200, "shutdown".into()).await;
    }

    /// Sends a mandatory, persistent message; await the result with [`Publisher::settle`].
    pub async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        props: BasicProperties,
    ) -> Result<PublisherConfirm> {
        Ok(self
            .channel()
            .await?
            .basic_publish(
                ShortString::from(exchange),
                ShortString::from(routing_key),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                payload,
                props,
            )
            .await?)
    }

    /// Sends a persistent message that may have no subscriber (lifecycle events): not mandatory.
    pub async fn send_event(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        props: BasicProperties,
    ) -> Result<()> {
        let confirm = self
            .channel()
            .await?
            .basic_publish(
                ShortString::from(exchange),
                ShortString::from(routing_key),
                BasicPublishOptions::default(),
                payload,
                props,
            )
            .await?;
        // A confirm dropped unresolved stays in lapin's bookkeeping until `wait_for_confirms`:
        // settle it off the caller's path so memory does not grow with every event.
        tokio::spawn(async move {
            let _ = confirm.await;
        });
        Ok(())
    }

    /// Waits for the broker's verdict on one publish.
    pub async fn settle(confirm: PublisherConfirm) -> Result<Delivered> {
        Ok(match confirm.await? {
            Confirmation::Ack(None) | Confirmation::NotRequested => Delivered::Confirmed,
            Confirmation::Ack(Some(returned)) => {
                Delivered::Unroutable(returned.reply_text.to_string())
            }
            Confirmation::Nack(_) => Delivered::Nacked,
        })
    }

    /// Sends and waits for the confirm.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        props: BasicProperties,
    ) -> Result<Delivered> {
        Self::settle(self.send(exchange, routing_key, payload, props).await?).await
    }

    /// Puts bytes on the dead-letter exchange with the reason in a header, confirmed. The
    /// exchange is a fanout: `routing_key` only travels with the message, so that whoever reads
    /// the dead letter sees where the original was going (pass the original delivery's key).
    pub async fn dead_letter(
        &self,
        names: &Names,
        routing_key: &str,
        payload: &[u8],
        mut props: BasicProperties,
        reason: &str,
    ) -> Result<Delivered> {
        let mut headers = props.headers().clone().unwrap_or_default();
        headers.insert(
            HEADER_DEAD_LETTER_REASON.into(),
            AMQPValue::LongString(LongString::from(reason)),
        );
        // The broker refuses a `user_id` other than this connection's user: the original's
        // (a worker's) travels in a header instead.
        if let Some(user) = props.user_id() {
            headers.insert(
                HEADER_ORIGINAL_USER_ID.into(),
                AMQPValue::LongString(LongString::from(user.as_str())),
            );
        }
        props = without_user_id(&props)
            .with_headers(headers)
            .with_delivery_mode(2);
        self.publish(&names.dead_letter_exchange(), routing_key, payload, props)
            .await
    }
}

/// A message's properties without its `user_id` (every other property kept).
pub fn without_user_id(p: &BasicProperties) -> BasicProperties {
    let mut out = BasicProperties::default();
    if let Some(v) = p.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = p.content_encoding() {
        out = out.with_content_encoding(v.clone());
    }
    if let Some(v) = p.headers() {
        out = out.with_headers(v.clone());
    }
    if let Some(v) = p.delivery_mode() {
        out = out.with_delivery_mode(*v);
    }
    if let Some(v) = p.priority() {
        out = out.with_priority(*v);
    }
    if let Some(v) = p.correlation_id() {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = p.reply_to() {
        out = out.with_reply_to(v.clone());
    }
    if let Some(v) = p.expiration() {
        out = out.with_expiration(v.clone());
    }
    if let Some(v) = p.message_id() {
        out = out.with_message_id(v.clone());
    }
    if let Some(v) = p.timestamp() {
        out = out.with_timestamp(*v);
    }
    if let Some(v) = p.kind() {
        out = out.with_type(v.clone());
    }
    if let Some(v) = p.app_id() {
        out = out.with_app_id(v.clone());
    }
    if let Some(v) = p.cluster_id() {
        out = out.with_cluster_id(v.clone());
    }
    out
}

/// Deletes every queue and exchange of a prefix (best effort): the orchestrator's own, the step
/// queues named in `step_queues` (`{namespace}.{queue}` keys), and 16 result shards. For tests and tools that
/// give each run its own prefix.
pub async fn delete_topology(amqp_url: &str, names: &Names, step_queues: &[String]) -> Result<()> {
    use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
    let conn = connect(amqp_url, &OwnedTLSConfig::default()).await?;
    let mut queues = vec![
        names.task_requests_queue(),
        names.dead_letter_queue(),
        names.step_dead_letter_queue(),
    ];
    queues.extend((0..16).map(|shard| names.results_queue(shard)));
    queues.extend(
        step_queues
            .iter()
            .filter_map(|k| split_step_routing_key(k))
            .map(|(ns, q)| names.step_queue(ns, q)),
    );
    for q in queues {
        // A failed delete closes its channel: a fresh one each time.
        let ch = conn.create_channel().await?;
        if ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await
            .is_ok()
        {
            let _ = ch.close(200, "done".into()).await;
        }
    }
    for x in [
        names.tasks_exchange(),
        names.steps_exchange(),
        names.results_exchange(),
        names.events_exchange(),
        names.cancel_exchange(),
        names.dead_letter_exchange(),
        names.step_dead_letter_exchange(),
    ] {
        let ch = conn.create_channel().await?;
        if ch
            .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .is_ok()
        {
            let _ = ch.close(200, "done".into()).await;
        }
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_w3c_with_the_task_as_trace() {
        let task = TaskId::new();
        let step = StepId::new();
        let t = traceparent(task, step, 1);
        let parts: Vec<&str> = t.split('-').collect();
        assert_eq!(parts.len(), 4, "{t}");
        assert_eq!(parts[0], "00");
        assert_eq!(parts[1], task.0.simple().to_string());
        assert_eq!(parts[2].len(), 16);
        assert!(
            parts[2]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert_ne!(parts[2], "0000000000000000");
        assert_eq!(parts[3], "01");
        // Stable for one attempt, a new span for the next one and for another step.
        assert_eq!(traceparent(task, step, 1), t);
        assert_ne!(traceparent(task, step, 2), t);
        let other = traceparent(task, StepId::new(), 1);
        assert_eq!(other[..35], t[..35], "one trace per task");
        assert_ne!(other, t);
        let props = with_traceparent(properties(MessageId::new()), &t);
        assert_eq!(
            props
                .headers()
                .as_ref()
                .unwrap()
                .inner()
                .get(HEADER_TRACEPARENT),
            Some(&AMQPValue::LongString(LongString::from(t.as_str())))
        );
    }

    #[test]
    fn without_user_id_keeps_every_other_property() {
        let p = properties(MessageId::new())
            .with_user_id("tasker-shop".into())
            .with_type("result".into())
            .with_priority(3)
            .with_app_id("w".into());
        let q = without_user_id(&p);
        assert_eq!(q.user_id(), &None);
        assert_eq!(q.clone().with_user_id("tasker-shop".into()), p);
    }

    /// A broker that accepts the connection and then says nothing must not hang us.
    #[tokio::test]
    async fn connecting_to_a_silent_broker_times_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let started = std::time::Instant::now();
        let err = connect(
            &format!("amqp://guest:guest@{addr}/%2f"),
            &OwnedTLSConfig::default(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, BrokerError::Unavailable(_)), "{err}");
        assert!(started.elapsed() < CONNECT_TIMEOUT + Duration::from_secs(2));
    }
}
