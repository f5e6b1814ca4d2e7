//! Test helpers: a real RabbitMQ with a throw-away topology under a random prefix, standing in
//! for the orchestrator (which owns the topology in production).
#![allow(dead_code)] // Each test binary uses a different part of this module.

use anyhow::{Context, Result, bail};
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use serde_json::json;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tasker_schemas::{
    Envelope, Names, StepId, StepMessage, StepResult, TaskId, WorkerMessage, decode, encode_payload,
};
use tasker_worker::{CancellationToken, Worker, WorkerBuilder, WorkerError};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};

pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const NAMESPACE: &str = "shop";

use tasker_schemas::topology::step_routing_key;
pub const RESULT_ROUTING_KEY: &str = "shop.0";

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A broker with this test's own exchanges and queues.
pub struct Broker {
    pub url: String,
    pub names: Names,
    pub connection: Connection,
    /// Publisher confirms on.
    pub channel: Channel,
    queues: Mutex<Vec<String>>,
    /// Results that arrived in a batch and were not yet taken by `expect_result`.
    batched: Mutex<std::collections::VecDeque<StepResult>>,
}

/// Connects to `TASKER_TEST_AMQP_URL` (or the local default) and declares a fresh topology.
/// `None` (with a notice) only when the variable is unset and nothing answers at the default.
pub async fn broker() -> Result<Option<Broker>> {
    init_logs();
    let configured = std::env::var("TASKER_TEST_AMQP_URL").ok();
    let url = configured
        .clone()
        .unwrap_or_else(|| DEFAULT_AMQP_URL.to_owned());
    let connection = match Connection::connect(&url, ConnectionProperties::default()).await {
        Ok(c) => c,
        Err(e) if configured.is_none() && std::env::var_os("CI").is_none() => {
            eprintln!(
                "SKIPPED: no RabbitMQ at {DEFAULT_AMQP_URL} ({e}); set TASKER_TEST_AMQP_URL to run this test"
            );
            return Ok(None);
        }
        Err(e) => return Err(e).context("cannot connect to TASKER_TEST_AMQP_URL"),
    };
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let prefix = format!("test-{}", uuid::Uuid::now_v7().simple());
    let broker = Broker {
        url,
        names: Names::new(prefix),
        connection,
        channel,
        queues: Mutex::new(Vec::new()),
        batched: Mutex::default(),
    };
    broker.declare_topology().await?;
    Ok(Some(broker))
}

impl Broker {
    async fn declare_topology(&self) -> Result<()> {
        let n = &self.names;
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let ch = &self.channel;
        ch.exchange_declare(
            n.steps_exchange().into(),
            ExchangeKind::Direct,
            durable,
            FieldTable::default(),
        )
        .await?;
        ch.exchange_declare(
            n.results_exchange().into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await?;
        ch.exchange_declare(
            n.dead_letter_exchange().into(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await?;
        ch.exchange_declare(
            self.step_dlx().into(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await?;
        self.declare_queue(&self.dead_steps_queue(), false).await?;
        self.bind(&self.dead_steps_queue(), &self.step_dlx(), "")
            .await?;
        self.declare_step_queue("default").await?;
        self.declare_queue(&n.results_queue(0), false).await?;
        self.bind(&n.results_queue(0), &n.results_exchange(), "#")
            .await?;
        self.declare_queue(&n.dead_letter_queue(), false).await?;
        self.bind(&n.dead_letter_queue(), &n.dead_letter_exchange(), "")
            .await?;
        Ok(())
    }

    /// Declares the durable quorum queue behind template queue `queue` of [`NAMESPACE`] and
    /// binds it.
    pub async fn declare_step_queue(&self, queue: &str) -> Result<()> {
        let name = self.names.step_queue(NAMESPACE, queue);
        self.declare_queue(&name, true).await?;
        self.bind(
            &name,
            &self.names.steps_exchange(),
            &step_routing_key(NAMESPACE, queue),
        )
        .await
    }

    /// Where the broker dead-letters step messages (rejected, or over the delivery limit).
    pub fn step_dlx(&self) -> String {
        format!("{}.dlx.steps", self.names.prefix())
    }

    pub fn dead_steps_queue(&self) -> String {
        format!("{}.dead_steps", self.names.prefix())
    }

    async fn declare_queue(&self, name: &str, quorum: bool) -> Result<()> {
        let mut args = FieldTable::default();
        if quorum {
            // As the orchestrator declares step queues: quorum, a delivery limit, and a
            // dead-letter exchange of their own.
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
            args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(50));
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(self.step_dlx().into()),
            );
        }
        let options = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        self.channel
            .queue_declare(name.into(), options, args)
            .await?;
        let mut queues = self.queues.lock().unwrap();
        if !queues.iter().any(|q| q == name) {
            queues.push(name.to_owned());
        }
        Ok(())
    }

    pub async fn bind(&self, queue: &str, exchange: &str, key: &str) -> Result<()> {
        self.channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }

    pub async fn unbind(&self, queue: &str, exchange: &str, key: &str) -> Result<()> {
        self.channel
            .queue_unbind(
                queue.into(),
                exchange.into(),
                key.into(),
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }

    pub async fn delete_queue(&self, name: &str) -> Result<()> {
        self.channel
            .queue_delete(name.into(), QueueDeleteOptions::default())
            .await?;
        Ok(())
    }

    /// A step message for `handler` on queue `default`, attempt 1, 10 s timeout.
    pub fn step(&self, handler: &str) -> StepMessage {
        let task_id = TaskId::new();
        StepMessage {
            task_id,
            step_id: StepId::new(),
            namespace: NAMESPACE.into(),
            template: "order_fulfilment".into(),
            step: format!("{handler}_step"),
            handler: handler.into(),
            queue: "default".into(),
            attempt: 1,
            idempotency_key: format!("{task_id}:{handler}_step"),
            context: json!({}),
            parent_outputs: Default::default(),
            timeout_ms: 10_000,
            result_routing_key: RESULT_ROUTING_KEY.into(),
            map_index: None,
            map_item: None,
            failure: None,
        }
    }

    pub async fn publish_step(&self, step: &StepMessage) -> Result<()> {
        let bytes = encode_payload(step.clone())?;
        self.publish_raw(&step.queue, &bytes).await
    }

    /// Publishes a step message with a W3C `traceparent` header, confirmed.
    pub async fn publish_step_traced(&self, step: &StepMessage, traceparent: &str) -> Result<()> {
        let bytes = encode_payload(step.clone())?;
        let mut headers = lapin::types::FieldTable::default();
        headers.insert(
            tasker_schemas::message::HEADER_TRACEPARENT.into(),
            lapin::types::AMQPValue::LongString(traceparent.into()),
        );
        self.publish_with(
            &step.queue,
            &bytes,
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_headers(headers),
        )
        .await
    }

    /// Publishes bytes to the steps exchange, confirmed.
    pub async fn publish_raw(&self, queue: &str, bytes: &[u8]) -> Result<()> {
        self.publish_with(
            queue,
            bytes,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
    }

    async fn publish_with(
        &self,
        queue: &str,
        bytes: &[u8],
        properties: BasicProperties,
    ) -> Result<()> {
        let confirm = self
            .channel
            .basic_publish(
                self.names.steps_exchange().into(),
                step_routing_key(NAMESPACE, queue).into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                bytes,
                properties,
            )
            .await?
            .await?;
        if !confirm.is_ack() || confirm.take_message().is_some() {
            bail!("step message not confirmed or unroutable");
        }
        Ok(())
    }

    /// Takes (and acks) one message from `queue`, polling until `timeout`.
    pub async fn take(
        &self,
        queue: &str,
        timeout: Duration,
    ) -> Result<Option<(Vec<u8>, BasicProperties)>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(msg) = self
                .channel
                .basic_get(queue.into(), BasicGetOptions::default())
                .await?
            {
                msg.delivery.acker.ack(BasicAckOptions::default()).await?;
                // Workers also announce themselves on the results exchange (the registry):
                // these tests look at what they report about steps.
                let kind = msg.delivery.properties.kind().as_ref().map(|k| k.as_str());
                if kind == Some(tasker_schemas::Kind::WorkerHeartbeat.as_str()) {
                    continue;
                }
                return Ok(Some((msg.delivery.data, msg.delivery.properties)));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The next result on the results queue, with its envelope and properties.
    pub async fn next_result(
        &self,
        timeout: Duration,
    ) -> Result<Option<(Envelope<StepResult>, BasicProperties)>> {
        match self.take(&self.names.results_queue(0), timeout).await? {
            Some((bytes, props)) => Ok(Some((decode::<StepResult>(&bytes)?, props))),
            None => Ok(None),
        }
    }

    /// The next result, failing the test if none arrives within 10 s. Takes results from
    /// `result` and `result_batch` messages alike.
    pub async fn expect_result(&self) -> Result<StepResult> {
        if let Some(r) = self.batched.lock().unwrap().pop_front() {
            return Ok(r);
        }
        let Some((bytes, _)) = self
            .take(&self.names.results_queue(0), Duration::from_secs(10))
            .await?
        else {
            bail!("no result arrived within 10 s");
        };
        let WorkerMessage::Results(results) = WorkerMessage::decode(&bytes)?.1 else {
            bail!("expected a result or result batch on the results queue");
        };
        let mut batched = self.batched.lock().unwrap();
        batched.extend(results);
        batched.pop_front().context("an empty result batch")
    }

    pub async fn next_dead_letter(
        &self,
        timeout: Duration,
    ) -> Result<Option<(Vec<u8>, BasicProperties)>> {
        self.take(&self.names.dead_letter_queue(), timeout).await
    }

    /// (ready messages, consumers) of a step queue.
    pub async fn step_queue_state(&self, queue: &str) -> Result<(u32, u32)> {
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let q = self
            .channel
            .queue_declare(
                self.names.step_queue(NAMESPACE, queue).into(),
                passive,
                FieldTable::default(),
            )
            .await?;
        Ok((q.message_count(), q.consumer_count()))
    }

    /// Polls until the step queue holds `ready` messages, or fails after `timeout`.
    pub async fn wait_for_depth(&self, queue: &str, ready: u32, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let (depth, _) = self.step_queue_state(queue).await?;
            if depth == ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("step queue {queue} holds {depth} ready messages, expected {ready}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A worker builder for this broker and prefix, named `test-worker`.
    pub fn worker(&self) -> WorkerBuilder {
        Worker::builder(&self.url)
            .prefix(self.names.prefix())
            .namespace(NAMESPACE)
            .name("test-worker")
    }

    /// Deletes this test's queues and exchanges.
    pub async fn cleanup(self) -> Result<()> {
        let queues = self.queues.lock().unwrap().clone();
        for q in queues {
            let _ = self
                .channel
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let n = &self.names;
        for x in [
            n.steps_exchange(),
            n.results_exchange(),
            n.dead_letter_exchange(),
            self.step_dlx(),
        ] {
            let _ = self
                .channel
                .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
        let _ = self.connection.close(200, "test done".into()).await;
        Ok(())
    }
}

/// A worker running in the background.
pub struct Running {
    pub shutdown: CancellationToken,
    pub handle: JoinHandle<Result<(), WorkerError>>,
}

pub fn start(builder: WorkerBuilder) -> Running {
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(builder.build().run(shutdown.clone()));
    Running { shutdown, handle }
}

impl Running {
    /// Requests shutdown and waits (at most `limit`) for the worker to stop.
    pub async fn stop(self, limit: Duration) -> Result<Duration> {
        let since = Instant::now();
        self.shutdown.cancel();
        tokio::time::timeout(limit, self.handle)
            .await
            .context("worker did not stop in time")???;
        Ok(since.elapsed())
    }
}

/// A TCP proxy in front of the broker whose connections can be cut, to simulate a network failure.
pub struct Proxy {
    pub addr: SocketAddr,
    links: Arc<Mutex<Vec<AbortHandle>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: String) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let links: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let tracked = links.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let link = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                tracked.lock().unwrap().push(link.abort_handle());
            }
        });
        Ok(Self {
            addr,
            links,
            accept,
        })
    }

    /// Drops every proxied connection.
    pub fn cut(&self) {
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    /// `url` with its host and port replaced by the proxy's.
    pub fn url_for(&self, url: &str) -> Result<String> {
        let uri: lapin::uri::AMQPUri = url.parse().map_err(anyhow::Error::msg)?;
        let user = &uri.authority.userinfo;
        let vhost = uri.vhost.replace('/', "%2f");
        Ok(format!(
            "amqp://{}:{}@{}/{vhost}",
            user.username, user.password, self.addr
        ))
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// host:port of an AMQP URL.
pub fn upstream_of(url: &str) -> Result<String> {
    let uri: lapin::uri::AMQPUri = url.parse().map_err(anyhow::Error::msg)?;
    Ok(format!("{}:{}", uri.authority.host, uri.authority.port))
}
