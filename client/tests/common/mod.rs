//! Test helpers: a real RabbitMQ with a throw-away task-request topology under a random prefix,
//! standing in for the orchestrator (which owns the topology in production).
//!
//! The connection and skip rules are those of the worker SDK's tests (`worker-sdk/tests/common`).

use anyhow::{Context, Result};
use lapin::options::{
    BasicAckOptions, BasicGetOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tasker_schemas::Names;

pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const NAMESPACE: &str = "shop";

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
    pub names: Names,
    pub connection: Connection,
    /// Publisher confirms on.
    pub channel: Channel,
    queues: Mutex<Vec<String>>,
}

/// Connects to `TASKER_TEST_AMQP_URL` (or the local default) with a fresh prefix.
/// `None` (with a notice) only when the variable is unset, nothing answers at the default, and
/// this is not CI (`CI` unset): in CI a missing broker fails the test.
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
    Ok(Some(Broker {
        names: Names::new(prefix),
        connection,
        channel,
        queues: Mutex::new(Vec::new()),
    }))
}

impl Broker {
    /// Declares the task-request exchange and its queue, bound for namespace [`NAMESPACE`].
    pub async fn declare_task_requests(&self) -> Result<()> {
        let n = &self.names;
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        self.channel
            .exchange_declare(
                n.tasks_exchange().into(),
                ExchangeKind::Direct,
                durable,
                FieldTable::default(),
            )
            .await?;
        self.declare_queue(&n.task_requests_queue()).await?;
        self.channel
            .queue_bind(
                n.task_requests_queue().into(),
                n.tasks_exchange().into(),
                NAMESPACE.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }

    /// A durable quorum queue with a delivery limit, as the orchestrator declares its queues.
    async fn declare_queue(&self, name: &str) -> Result<()> {
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(50));
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
                return Ok(Some((msg.delivery.data, msg.delivery.properties)));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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
        let _ = self
            .channel
            .exchange_delete(
                self.names.tasks_exchange().as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await;
        let _ = self.connection.close(200, "test done".into()).await;
        Ok(())
    }
}
