//! `order-worker`: runs the order-fulfilment handlers until SIGTERM or Ctrl-C.

use anyhow::Context;
use clap::Parser;
use std::time::Duration;
use tasker_example_orders::{ChooseShipping, EXPRESS_FROM_CENTS, steps};
use tracing_subscriber::EnvFilter;

/// Runs the handlers of the `shop/order_fulfilment` workflow.
#[derive(Debug, Parser)]
#[command(name = "order-worker", version, about)]
struct Args {
    /// AMQP URL of RabbitMQ.
    #[arg(
        long,
        env = "TASKER_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    amqp_url: String,
    /// Prefix of every exchange and queue name; must match the orchestrator's.
    #[arg(long, env = "TASKER_PREFIX", default_value = "tasker")]
    prefix: String,
    /// Steps run at once.
    #[arg(long, env = "TASKER_CONCURRENCY", default_value_t = 16)]
    concurrency: usize,
    /// Seconds running steps get to finish on shutdown.
    #[arg(long, env = "TASKER_GRACE_PERIOD_SECS", default_value_t = 30)]
    grace_period_secs: u64,
    /// Name reported with every result (default: hostname-pid).
    #[arg(long, env = "TASKER_WORKER_NAME")]
    name: Option<String>,
    /// Orders whose total reaches this many cents ship express even when they did not ask for
    /// it (the `choose_shipping` decision).
    #[arg(
        long,
        env = "ORDER_EXPRESS_FROM_CENTS",
        default_value_t = EXPRESS_FROM_CENTS,
        value_parser = clap::value_parser!(i64).range(1..)
    )]
    express_from_cents: i64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();

    let mut builder = tasker_example_orders::worker(&args.amqp_url, &args.prefix)
        .concurrency(args.concurrency)
        .grace_period(Duration::from_secs(args.grace_period_secs))
        // Replaces the default decision handler with one using the configured threshold.
        .handler(
            steps::CHOOSE_SHIPPING,
            ChooseShipping {
                express_from_cents: args.express_from_cents,
            },
        );
    if let Some(name) = args.name {
        builder = builder.name(name);
    }
    builder
        .build()
        .run_until_signal()
        .await
        .context("order worker failed")
}
