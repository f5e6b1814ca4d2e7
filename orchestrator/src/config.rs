//! Orchestrator configuration: defaults, an optional YAML file, then `TASKER_*` environment
//! variables (the environment wins).

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tasker_schemas::DataLimits;

/// Everything the orchestrator can be told. Field names match the YAML file; each field also
/// has an environment variable `TASKER_<FIELD>` in upper case, listed in [`SETTINGS`] (a test
/// checks that none is missing).
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub database_url: String,
    pub amqp_url: String,
    /// PEM file of CA certificates trusted for `amqps://` on top of the platform's roots.
    pub amqp_ca_cert: Option<PathBuf>,
    pub http_addr: SocketAddr,
    /// PEM file of the HTTP API's certificate chain: with `http_tls_key`, the API serves HTTPS
    /// (and only HTTPS).
    pub http_tls_cert: Option<PathBuf>,
    /// PEM file of the private key of `http_tls_cert`.
    pub http_tls_key: Option<PathBuf>,
    /// Prefix of every exchange and queue name.
    pub prefix: String,
    /// Directory of `*.yaml` templates registered at start.
    pub templates_dir: Option<PathBuf>,
    /// Bootstrap admin keys (bearer tokens with role `admin` over every namespace). When set,
    /// every `/v1` request needs a key (these, or keys created with `tasker keys create`); empty
    /// = no authentication (local use).
    pub api_keys: Vec<String>,
    /// With authentication on, `/metrics` and `/ready` need a key too (any role).
    pub protect_metrics: bool,
    /// Audit log entries are kept this long, then pruned.
    pub audit_retention_ms: u64,
    /// Most rows of the `dead_letters` table; the oldest are deleted beyond it.
    pub dead_letter_max_rows: u64,
    /// Whether this orchestrator moves `{prefix}.dead_letters` into the `dead_letters` table
    /// (off: the queue keeps its messages, for tools that read it directly).
    pub dead_letter_reader: bool,
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
    pub max_task_output_bytes: usize,
    /// Largest accepted HTTP request body.
    pub max_request_bytes: usize,
    /// Longest time an HTTP request may take, body read included (0: no limit). A long-poll
    /// (`wait_ms`) gets its wait on top.
    pub http_request_timeout_ms: u64,
    /// Longest time an HTTP connection may spend without a request being handled: idle between
    /// requests, sending a request's headers, or not reading an answer (0: no limit).
    pub http_idle_timeout_ms: u64,
    /// Most open HTTP connections; further ones wait in the listen backlog until one closes.
    pub http_max_connections: usize,
    /// Most long-polls (`GET /v1/tasks/{id}?wait_ms=N`) waiting at once; over it, a long-poll
    /// answers at once with the task as it is.
    pub http_max_long_polls: usize,
    /// Time allowed for draining on shutdown.
    pub shutdown_grace_ms: u64,
    /// How often the reconciler checks that every live task has a live owner.
    pub reconcile_interval_ms: u64,
    /// Tasks changed more recently than this are left alone by the reconciler.
    pub reconcile_quiet_ms: u64,
    /// Finished tasks (and their idempotency keys) are kept this long, then pruned.
    pub retention_ms: u64,
    /// How often the gauges of `/metrics` are refreshed (one replica counts per interval).
    pub metrics_interval_ms: u64,
    /// OTLP/HTTP endpoint (base URL) traces are exported to; unset: `OTEL_EXPORTER_OTLP_ENDPOINT`,
    /// and with neither, no traces (docs/observability.md).
    pub otlp_endpoint: Option<String>,
    /// Broker identity: apply a worker message, or accept a task request, only when its AMQP
    /// `user_id` is the user of the namespace concerned ([`crate::identity`]); otherwise
    /// dead-letter it with the reason.
    pub broker_identity: bool,
    /// The RabbitMQ user of a namespace: `{namespace}` is replaced by the namespace.
    pub broker_user_format: String,
}

impl Default for Config {
    fn default() -> Self {
        let limits = DataLimits::default();
        Self {
            database_url: "postgres://postgres@127.0.0.1:5432/tasker".into(),
            amqp_url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            amqp_ca_cert: None,
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            http_tls_cert: None,
            http_tls_key: None,
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
            max_task_output_bytes: limits.max_task_output_bytes,
            max_request_bytes: 2 * 1024 * 1024,
            http_request_timeout_ms: 30_000,
            http_idle_timeout_ms: 60_000,
            http_max_connections: 1024,
            http_max_long_polls: 256,
            shutdown_grace_ms: 10_000,
            reconcile_interval_ms: 30_000,
            reconcile_quiet_ms: 10_000,
            retention_ms: 7 * 24 * 3600 * 1000,
            protect_metrics: false,
            audit_retention_ms: 400 * 24 * 3600 * 1000,
            dead_letter_max_rows: 100_000,
            dead_letter_reader: true,
            metrics_interval_ms: 10_000,
            otlp_endpoint: None,
            broker_identity: false,
            broker_user_format: crate::identity::DEFAULT_USER_FORMAT.into(),
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
            .field(
                "otlp_endpoint",
                &self.otlp_endpoint.as_deref().map(redact_url),
            )
            .finish_non_exhaustive()
    }
}

/// Replaces the password of a URL with `***`: the one in the user info (`user:secret@`) and a
/// `password=` query parameter. A URL without a password is returned as it is.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (rest, query) = rest
        .split_once('?')
        .map_or((rest, None), |(r, q)| (r, Some(q)));
    let (authority, path) = rest
        .split_once('/')
        .map_or((rest, None), |(a, p)| (a, Some(p)));
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, password)) if !password.is_empty() => format!("{user}:***@{host}"),
            _ => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    let mut out = format!("{scheme}://{authority}");
    if let Some(path) = path {
        out.push('/');
        out.push_str(path);
    }
    if let Some(query) = query {
        out.push('?');
        let params: Vec<String> = query
            .split('&')
            .map(|param| match param.split_once('=') {
                Some((key, value)) if key.eq_ignore_ascii_case("password") && !value.is_empty() => {
                    format!("{key}=***")
                }
                _ => param.to_owned(),
            })
            .collect();
        out.push_str(&params.join("&"));
    }
    out
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
    /// Settings that do not fit together.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// One `TASKER_*` environment variable: its name, what it sets, its default and how it is
/// applied. [`SETTINGS`] is the only list: [`Config::apply_env`] reads these variables and
/// `tasker serve --help` shows them ([`settings_help`]), so the two cannot disagree.
pub struct Setting {
    /// The variable, `TASKER_` and the config field in upper case.
    pub var: &'static str,
    /// What it sets, in one line.
    pub help: &'static str,
    default: fn(&Config) -> String,
    apply: fn(&mut Config, String) -> Result<(), ConfigError>,
}

impl Setting {
    /// The key of the same setting in the YAML file (the config field).
    pub fn file_key(&self) -> String {
        self.var
            .strip_prefix("TASKER_")
            .unwrap_or(self.var)
            .to_ascii_lowercase()
    }

    /// Its value when neither the file nor the environment sets it (empty when unset).
    pub fn default_value(&self) -> String {
        (self.default)(&Config::default())
    }
}

fn parse<T: std::str::FromStr>(var: &'static str, v: &str) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    v.parse().map_err(|e: T::Err| ConfigError::Env {
        var,
        error: e.to_string(),
    })
}

/// Defines [`SETTINGS`]: `VAR => field (kind): "help"`, where kind says how the text becomes the
/// value: `value` (parsed with `FromStr`), `string`, `path` (optional), `optional` (a string,
/// unset when absent) or `list` (comma-separated).
macro_rules! settings {
    ($($var:literal => $field:ident ($kind:ident): $help:literal,)*) => {
        /// Every `TASKER_*` variable the orchestrator reads, in the order `--help` shows them.
        pub const SETTINGS: &[Setting] = &[$(
            Setting {
                var: $var,
                help: $help,
                default: |c| settings!(@show $kind, c.$field),
                apply: |c, v| {
                    settings!(@set $kind, $var, c.$field, v);
                    Ok(())
                },
            },
        )*];
    };
    (@show value, $e:expr) => { $e.to_string() };
    (@show string, $e:expr) => { $e.clone() };
    (@show path, $e:expr) => { $e.as_ref().map(|p| p.display().to_string()).unwrap_or_default() };
    (@show optional, $e:expr) => { $e.clone().unwrap_or_default() };
    (@show list, $e:expr) => { $e.join(",") };
    (@set value, $var:literal, $f:expr, $v:ident) => { $f = parse($var, &$v)? };
    (@set string, $var:literal, $f:expr, $v:ident) => { $f = $v };
    (@set path, $var:literal, $f:expr, $v:ident) => { $f = Some(PathBuf::from($v)) };
    (@set optional, $var:literal, $f:expr, $v:ident) => { $f = Some($v) };
    (@set list, $var:literal, $f:expr, $v:ident) => {
        $f = $v
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    };
}

settings! {
    "TASKER_DATABASE_URL" => database_url (string):
        "PostgreSQL URL; migrations run on start, and a missing database is created when the user may",
    "TASKER_AMQP_URL" => amqp_url (string): "RabbitMQ URL (amqp://, or amqps:// for TLS)",
    "TASKER_AMQP_CA_CERT" => amqp_ca_cert (path):
        "PEM file of CA certificates trusted for amqps:// on top of the system's (a private CA)",
    "TASKER_HTTP_ADDR" => http_addr (value): "Address of the HTTP API, /health, /ready and /metrics",
    "TASKER_HTTP_TLS_CERT" => http_tls_cert (path):
        "PEM certificate chain of the HTTP API; with TASKER_HTTP_TLS_KEY it serves HTTPS only",
    "TASKER_HTTP_TLS_KEY" => http_tls_key (path):
        "PEM private key (PKCS#8, PKCS#1 or SEC1) of TASKER_HTTP_TLS_CERT",
    "TASKER_PREFIX" => prefix (string): "Prefix of every exchange and queue name",
    "TASKER_TEMPLATES_DIR" => templates_dir (path):
        "Directory of *.yaml, *.yml and *.json templates registered on start",
    "TASKER_API_KEYS" => api_keys (list):
        "Comma-separated bootstrap admin keys; when set, /v1 requires a key: one of these or one made with `tasker keys create` (unset: no authentication)",
    "TASKER_PROTECT_METRICS" => protect_metrics (value):
        "With keys set, /metrics and /ready need a key too (any role): true or false",
    "TASKER_AUDIT_RETENTION_MS" => audit_retention_ms (value):
        "Audit log entries are kept this long, then pruned (ms; default 400 days)",
    "TASKER_DEAD_LETTER_MAX_ROWS" => dead_letter_max_rows (value):
        "Most dead letters kept in the dead_letters table; the oldest are deleted beyond it",
    "TASKER_DEAD_LETTER_READER" => dead_letter_reader (value):
        "Move the dead-letter queue into the dead_letters table: true or false (false: the queue keeps its messages for tools that read it)",
    "TASKER_DB_POOL_SIZE" => db_pool_size (value): "Connections in the PostgreSQL pool",
    "TASKER_RESULT_SHARDS" => result_shards (value): "Number of result queues (shards)",
    "TASKER_RESULT_PREFETCH" => result_prefetch (value):
        "Unacked result messages per result consumer",
    "TASKER_RESULT_BATCH_SIZE" => result_batch_size (value):
        "Most results applied in one transaction",
    "TASKER_DISPATCH_BATCH_SIZE" => dispatch_batch_size (value):
        "Most steps admitted in one dispatch transaction",
    "TASKER_MAX_IN_FLIGHT_PER_QUEUE" => max_in_flight_per_queue (value):
        "Most dispatched, unfinished steps per queue of a namespace; the rest wait in PostgreSQL by priority",
    "TASKER_DELIVERY_LIMIT" => delivery_limit (value):
        "Deliveries of one message before the broker dead-letters it",
    "TASKER_RELAY_AFTER_MS" => relay_after_ms (value):
        "Outbox entries older than this (ms) are published again by the relay",
    "TASKER_POLL_INTERVAL_MS" => poll_interval_ms (value):
        "Backstop poll interval of the dispatcher and timers (ms)",
    "TASKER_HANDLER_MISSING_DELAY_MS" => handler_missing_delay_ms (value):
        "Delay before offering again a step whose handler no worker had (ms)",
    "TASKER_MAX_CONTEXT_BYTES" => max_context_bytes (value): "Largest task context (bytes)",
    "TASKER_MAX_OUTPUT_BYTES" => max_output_bytes (value): "Largest step output (bytes)",
    "TASKER_MAX_STEP_MESSAGE_BYTES" => max_step_message_bytes (value):
        "Largest step message, context and parent outputs included (bytes)",
    "TASKER_MAX_TASK_OUTPUT_BYTES" => max_task_output_bytes (value):
        "Largest task output, all its leaf steps' outputs together (bytes)",
    "TASKER_MAX_REQUEST_BYTES" => max_request_bytes (value): "Largest HTTP request body (bytes)",
    "TASKER_HTTP_REQUEST_TIMEOUT_MS" => http_request_timeout_ms (value):
        "Longest HTTP request, body read included; a long-poll gets its wait on top (ms; 0: no limit)",
    "TASKER_HTTP_IDLE_TIMEOUT_MS" => http_idle_timeout_ms (value):
        "Longest time an HTTP connection may go without a request being handled: idle, sending headers or not reading an answer (ms; 0: no limit)",
    "TASKER_HTTP_MAX_CONNECTIONS" => http_max_connections (value):
        "Most open HTTP connections; more wait in the listen backlog until one closes",
    "TASKER_HTTP_MAX_LONG_POLLS" => http_max_long_polls (value):
        "Most long-polls (wait_ms) waiting at once; over it, a long-poll answers at once",
    "TASKER_SHUTDOWN_GRACE_MS" => shutdown_grace_ms (value):
        "Time allowed for draining on shutdown (ms)",
    "TASKER_RECONCILE_INTERVAL_MS" => reconcile_interval_ms (value):
        "How often the reconciler checks that every live task has a live owner (ms)",
    "TASKER_RECONCILE_QUIET_MS" => reconcile_quiet_ms (value):
        "Tasks changed more recently than this are left alone by the reconciler (ms)",
    "TASKER_METRICS_INTERVAL_MS" => metrics_interval_ms (value):
        "How often the gauges of /metrics are refreshed; one replica counts per interval (ms)",
    "TASKER_RETENTION_MS" => retention_ms (value):
        "Finished tasks (and their idempotency keys) are kept this long, then pruned (ms; default 7 days)",
    "TASKER_BROKER_IDENTITY" => broker_identity (value):
        "true: a worker message or task request is applied only if its AMQP user_id is the user of its namespace, else dead-lettered (docs/operations.md)",
    "TASKER_BROKER_USER_FORMAT" => broker_user_format (string):
        "The RabbitMQ user of a namespace, {namespace} replaced (broker identity; `tasker broker-permissions`)",
    "TASKER_OTLP_ENDPOINT" => otlp_endpoint (optional):
        "OTLP/HTTP base URL traces are exported to (unset: OTEL_EXPORTER_OTLP_ENDPOINT; neither: no traces)",
}

/// The settings as `tasker serve --help` shows them: every variable with its default.
pub fn settings_help() -> String {
    let mut out = String::from(
        "Settings: each is a TASKER_* environment variable and a key of the --config file (the \
         name in lower case without TASKER_, e.g. db_pool_size). The environment wins over the \
         file, the file over the defaults.\n",
    );
    for s in SETTINGS {
        let default = s.default_value();
        let default = if default.is_empty() { "none" } else { &default };
        out.push_str(&format!(
            "\n  {}\n          {}\n          [default: {default}]\n",
            s.var, s.help
        ));
    }
    out
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
        config.validate()?;
        Ok(config)
    }

    /// Checks the settings that must fit together (today: the HTTP certificate and key).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.broker_identity()?;
        self.http_tls().map(|_| ())
    }

    /// The user naming rule when broker identity is on; `None` when it is off.
    pub fn broker_identity(&self) -> Result<Option<crate::identity::UserFormat>, ConfigError> {
        if !self.broker_identity {
            return Ok(None);
        }
        crate::identity::UserFormat::parse(&self.broker_user_format)
            .map(Some)
            .map_err(|e| ConfigError::Invalid(format!("TASKER_BROKER_USER_FORMAT: {e}")))
    }

    /// The HTTP API's certificate and key files, when it serves HTTPS: both set, or neither.
    pub fn http_tls(&self) -> Result<Option<(&Path, &Path)>, ConfigError> {
        fn set(p: &Option<PathBuf>) -> Option<&Path> {
            p.as_deref().filter(|p| !p.as_os_str().is_empty())
        }
        match (set(&self.http_tls_cert), set(&self.http_tls_key)) {
            (Some(cert), Some(key)) => Ok(Some((cert, key))),
            (None, None) => Ok(None),
            (Some(_), None) => Err(ConfigError::Invalid(
                "TASKER_HTTP_TLS_CERT (http_tls_cert) is set but TASKER_HTTP_TLS_KEY (http_tls_key) is not: set both to serve HTTPS, or neither".into(),
            )),
            (None, Some(_)) => Err(ConfigError::Invalid(
                "TASKER_HTTP_TLS_KEY (http_tls_key) is set but TASKER_HTTP_TLS_CERT (http_tls_cert) is not: set both to serve HTTPS, or neither".into(),
            )),
        }
    }

    /// [`Config::amqp_ca_cert`] when set (an empty path counts as unset).
    pub fn amqp_ca_cert(&self) -> Option<&Path> {
        self.amqp_ca_cert
            .as_deref()
            .filter(|p| !p.as_os_str().is_empty())
    }

    /// Applies the `TASKER_*` variables of [`SETTINGS`], read through `get`.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        for setting in SETTINGS {
            if let Some(value) = get(setting.var) {
                (setting.apply)(self, value)?;
            }
        }
        Ok(())
    }

    /// The most data (context, parent outputs, element; as JSON) a step message may carry:
    /// over it the message is refused before it is assembled.
    pub fn step_data_limit(&self) -> i64 {
        i64::try_from(self.max_step_message_bytes).unwrap_or(i64::MAX)
    }

    pub fn limits(&self) -> DataLimits {
        DataLimits {
            max_context_bytes: self.max_context_bytes,
            max_output_bytes: self.max_output_bytes,
            max_step_message_bytes: self.max_step_message_bytes,
            max_task_output_bytes: self.max_task_output_bytes,
        }
    }

    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms)
    }

    /// [`Config::http_request_timeout_ms`] (`None`: no limit).
    pub fn http_request_timeout(&self) -> Option<Duration> {
        (self.http_request_timeout_ms > 0)
            .then(|| Duration::from_millis(self.http_request_timeout_ms))
    }

    /// Whether `/v1` requires a key: bootstrap keys are configured.
    pub fn auth_enabled(&self) -> bool {
        !self.api_keys.is_empty()
    }

    /// [`Config::http_idle_timeout_ms`] (`None`: no limit).
    pub fn http_idle_timeout(&self) -> Option<Duration> {
        (self.http_idle_timeout_ms > 0).then(|| Duration::from_millis(self.http_idle_timeout_ms))
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
        assert_eq!(redact_url("postgres://u:p@h"), "postgres://u:***@h");
        assert_eq!(
            redact_url("postgres://h/db?sslmode=require&password=secret"),
            "postgres://h/db?sslmode=require&password=***"
        );
        let c = Config {
            database_url: "postgres://u:hunter2@h/db".into(),
            ..Config::default()
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn urls_without_a_password_are_shown_as_they_are() {
        for url in [
            "postgres://postgres@127.0.0.1:5432/tasker",
            "postgres://u@h/db?sslmode=disable",
            "postgres://u:@h/db",
            "postgres://h:5432/db",
            "postgres:///db?host=/run/postgresql",
            "amqp://guest@127.0.0.1:5672/%2f",
            "not a url",
        ] {
            assert_eq!(redact_url(url), url);
        }
        assert!(
            format!("{:?}", Config::default())
                .contains("postgres://postgres@127.0.0.1:5432/tasker")
        );
    }

    #[test]
    fn every_setting_is_read_and_its_default_reads_back() {
        let mut seen = std::collections::HashSet::new();
        for s in SETTINGS {
            assert!(s.var.starts_with("TASKER_"), "{}", s.var);
            assert!(seen.insert(s.var), "{} is listed twice", s.var);
            assert!(!s.help.is_empty(), "{} has no help", s.var);
            // The file key names a field of Config (the file rejects unknown keys).
            let default = s.default_value();
            if !default.is_empty() && s.var != "TASKER_API_KEYS" {
                let value = if default.parse::<f64>().is_ok() {
                    default.clone()
                } else {
                    serde_json::json!(default).to_string()
                };
                let yaml = format!("{}: {value}", s.file_key());
                let _: Config =
                    serde_saphyr::from_str(&yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"));
            }
            // Applying the default as the variable's value changes nothing.
            let mut c = Config::default();
            c.apply_env(|k| (k == s.var && !default.is_empty()).then(|| default.clone()))
                .unwrap();
            assert_eq!(s.default_value(), (s.default)(&c), "{}", s.var);
        }
    }

    #[test]
    fn every_config_field_has_a_setting() {
        let source = include_str!("config.rs");
        let body = source
            .split_once("pub struct Config {")
            .and_then(|(_, rest)| rest.split_once("\n}"))
            .map(|(body, _)| body)
            .expect("struct Config");
        let keys: Vec<String> = SETTINGS.iter().map(Setting::file_key).collect();
        let fields: Vec<&str> = body
            .lines()
            .filter_map(|l| l.trim().strip_prefix("pub "))
            .filter_map(|l| l.split_once(':').map(|(name, _)| name))
            .collect();
        assert!(fields.len() > 20, "{fields:?}");
        for field in fields {
            assert!(
                keys.iter().any(|k| k == field),
                "Config.{field} has no TASKER_ variable in SETTINGS"
            );
        }
        let help = settings_help();
        for s in SETTINGS {
            assert!(help.contains(s.var), "{}", s.var);
        }
        assert!(help.contains("[default: postgres://postgres@127.0.0.1:5432/tasker]"));
        assert!(help.contains("[default: none]"));
    }

    #[test]
    fn the_http_certificate_and_key_come_together() {
        let mut c = Config::default();
        assert!(c.http_tls().unwrap().is_none());
        c.apply_env(|k| (k == "TASKER_HTTP_TLS_CERT").then(|| "/tls/cert.pem".into()))
            .unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("TASKER_HTTP_TLS_KEY") && err.contains("set both"),
            "{err}"
        );
        c.apply_env(|k| (k == "TASKER_HTTP_TLS_KEY").then(|| "/tls/key.pem".into()))
            .unwrap();
        assert_eq!(
            c.http_tls().unwrap(),
            Some((Path::new("/tls/cert.pem"), Path::new("/tls/key.pem")))
        );
        c.http_tls_cert = None;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("TASKER_HTTP_TLS_CERT"), "{err}");
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
