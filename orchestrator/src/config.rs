//! Orchestrator configuration: defaults, an optional YAML file, then `TASKER_*` environment
//! variables (the environment wins).

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tasker_schemas::DataLimits;

/// Everything the orchestrator can be told. Field names match the YAML file; each field also
/// has an environment variable `TASKER_<FIELD>` in upper case.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub database_url: String,
    pub amqp_url: String,
    pub http_addr: SocketAddr,
    /// Prefix of every exchange and queue name.
    pub prefix: String,
    /// Directory of `*.yaml` templates registered at start.
    pub templates_dir: Option<PathBuf>,
    /// Bearer tokens accepted by the HTTP API; empty = no authentication (local use).
    pub api_keys: Vec<String>,
    /// Connections in the Postgres pool.
    pub db_pool_size: u32,
    /// Number of result queues (shards).
    pub result_shards: u16,
    /// Unacked result messages per result consumer.
    pub result_prefetch: u16,
    /// Most results applied in one transaction.
    pub result_batch_size: usize,
    /// Most steps admitted in one dispatch transaction.
    pub dispatch_batch_size: i64,
    /// Most dispatched-but-unfinished steps per queue; the rest wait in the database.
    pub max_in_flight_per_queue: i64,
    /// Deliveries of one message before the broker dead-letters it.
    pub delivery_limit: u32,
    /// Outbox entries older than this are republished by the relay.
    pub relay_after_ms: u64,
    /// Backstop poll interval of the dispatcher and timers.
    pub poll_interval_ms: u64,
    /// Delay before re-offering a step whose handler no worker had.
    pub handler_missing_delay_ms: u64,
    pub max_context_bytes: usize,
    pub max_output_bytes: usize,
    pub max_step_message_bytes: usize,
    /// Largest accepted HTTP request body.
    pub max_request_bytes: usize,
    /// Time allowed for draining on shutdown.
    pub shutdown_grace_ms: u64,
    /// How often the reconciler checks that every live task has a live owner.
    pub reconcile_interval_ms: u64,
    /// Tasks changed more recently than this are left alone by the reconciler.
    pub reconcile_quiet_ms: u64,
    /// Finished tasks (and their idempotency keys) are kept this long, then pruned.
    pub retention_hours: u64,
}

impl Default for Config {
    fn default() -> Self {
        let limits = DataLimits::default();
        Self {
            database_url: "postgres://postgres@127.0.0.1:5432/tasker".into(),
            amqp_url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            prefix: tasker_schemas::topology::DEFAULT_PREFIX.into(),
            templates_dir: None,
            api_keys: Vec::new(),
            db_pool_size: 16,
            result_shards: 1,
            result_prefetch: 256,
            result_batch_size: 256,
            dispatch_batch_size: 256,
            max_in_flight_per_queue: 10_000,
            delivery_limit: 10,
            relay_after_ms: 2_000,
            poll_interval_ms: 250,
            handler_missing_delay_ms: 1_000,
            max_context_bytes: limits.max_context_bytes,
            max_output_bytes: limits.max_output_bytes,
            max_step_message_bytes: limits.max_step_message_bytes,
            max_request_bytes: 2 * 1024 * 1024,
            shutdown_grace_ms: 10_000,
            reconcile_interval_ms: 30_000,
            reconcile_quiet_ms: 10_000,
            retention_hours: 7 * 24,
        }
    }
}

impl std::fmt::Debug for Config {
    // Hand-written so that passwords in URLs and API keys never reach a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("database_url", &redact_url(&self.database_url))
            .field("amqp_url", &redact_url(&self.amqp_url))
            .field("http_addr", &self.http_addr)
            .field("prefix", &self.prefix)
            .field("templates_dir", &self.templates_dir)
            .field("api_keys", &format_args!("[{} keys]", self.api_keys.len()))
            .field("result_shards", &self.result_shards)
            .field("max_in_flight_per_queue", &self.max_in_flight_per_queue)
            .finish_non_exhaustive()
    }
}

/// Replaces the password of a URL with `***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return url.to_owned();
    };
    let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
    let sep = if rest.contains('/') { "/" } else { "" };
    format!("{scheme}://{user}:***@{host}{sep}{path}")
}

/// A configuration problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("invalid config file {path}: {error}")]
    Parse { path: PathBuf, error: String },
    #[error("invalid value for {var}: {error}")]
    Env { var: &'static str, error: String },
}

impl Config {
    /// Defaults, then the file (if any), then the environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut config = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
                    path: path.to_owned(),
                    error,
                })?;
                serde_saphyr::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: path.to_owned(),
                    error: e.to_string(),
                })?
            }
            None => Config::default(),
        };
        config.apply_env(|k| std::env::var(k).ok())?;
        Ok(config)
    }

    /// Applies `TASKER_*` variables read through `get`.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        fn parse<T: std::str::FromStr>(var: &'static str, v: String) -> Result<T, ConfigError>
        where
            T::Err: std::fmt::Display,
        {
            v.parse().map_err(|e: T::Err| ConfigError::Env {
                var,
                error: e.to_string(),
            })
        }
        macro_rules! env {
            ($var:literal => $field:expr, string) => {
                if let Some(v) = get($var) {
                    $field = v;
                }
            };
            ($var:literal => $field:expr) => {
                if let Some(v) = get($var) {
                    $field = parse($var, v)?;
                }
            };
        }
        env!("TASKER_DATABASE_URL" => self.database_url, string);
        env!("TASKER_AMQP_URL" => self.amqp_url, string);
        env!("TASKER_HTTP_ADDR" => self.http_addr);
        env!("TASKER_PREFIX" => self.prefix, string);
        if let Some(v) = get("TASKER_TEMPLATES_DIR") {
            self.templates_dir = Some(PathBuf::from(v));
        }
        if let Some(v) = get("TASKER_API_KEYS") {
            self.api_keys = v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect();
        }
        env!("TASKER_DB_POOL_SIZE" => self.db_pool_size);
        env!("TASKER_RESULT_SHARDS" => self.result_shards);
        env!("TASKER_RESULT_PREFETCH" => self.result_prefetch);
        env!("TASKER_RESULT_BATCH_SIZE" => self.result_batch_size);
        env!("TASKER_DISPATCH_BATCH_SIZE" => self.dispatch_batch_size);
        env!("TASKER_MAX_IN_FLIGHT_PER_QUEUE" => self.max_in_flight_per_queue);
        env!("TASKER_DELIVERY_LIMIT" => self.delivery_limit);
        env!("TASKER_RELAY_AFTER_MS" => self.relay_after_ms);
        env!("TASKER_POLL_INTERVAL_MS" => self.poll_interval_ms);
        env!("TASKER_HANDLER_MISSING_DELAY_MS" => self.handler_missing_delay_ms);
        env!("TASKER_SHUTDOWN_GRACE_MS" => self.shutdown_grace_ms);
        env!("TASKER_RECONCILE_INTERVAL_MS" => self.reconcile_interval_ms);
        env!("TASKER_RECONCILE_QUIET_MS" => self.reconcile_quiet_ms);
        env!("TASKER_RETENTION_HOURS" => self.retention_hours);
        env!("TASKER_MAX_CONTEXT_BYTES" => self.max_context_bytes);
        env!("TASKER_MAX_OUTPUT_BYTES" => self.max_output_bytes);
        env!("TASKER_MAX_STEP_MESSAGE_BYTES" => self.max_step_message_bytes);
        Ok(())
    }

    pub fn limits(&self) -> DataLimits {
        DataLimits {
            max_context_bytes: self.max_context_bytes,
            max_output_bytes: self.max_output_bytes,
            max_step_message_bytes: self.max_step_message_bytes,
        }
    }

    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_url("amqp://host"), "amqp://host");
        let c = Config {
            database_url: "postgres://u:hunter2@h/db".into(),
            ..Config::default()
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn environment_overrides() {
        let mut c = Config::default();
        c.apply_env(|k| match k {
            "TASKER_PREFIX" => Some("p1".into()),
            "TASKER_RESULT_SHARDS" => Some("4".into()),
            "TASKER_API_KEYS" => Some("a, b".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.prefix, "p1");
        assert_eq!(c.result_shards, 4);
        assert_eq!(c.api_keys, vec!["a", "b"]);
        let err = c
            .apply_env(|k| (k == "TASKER_RESULT_SHARDS").then(|| "many".into()))
            .unwrap_err();
        assert!(err.to_string().contains("TASKER_RESULT_SHARDS"));
    }
}
