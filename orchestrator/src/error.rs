//! The orchestrator's top-level error: what building or running a replica can fail with,
//! composed from the layers' own errors ([`StoreError`], [`BrokerError`], [`ServiceError`]).

use crate::broker::BrokerError;
use crate::service::ServiceError;
use crate::store::StoreError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    /// A templates directory or file that cannot be read or parsed.
    #[error("{0}")]
    Templates(String),
    /// Settings that do not fit together.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A certificate, key or CA file that cannot be read or used.
    #[error("TLS: {0}")]
    Tls(String),
    /// The trace exporter cannot be built (an invalid OTLP endpoint).
    #[error("traces: {0}")]
    Telemetry(String),
}

impl Error {
    /// True when the same operation may succeed later (a dependency is down or busy).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Store(e) => e.is_transient(),
            Error::Broker(_) => true,
            Error::Service(e) => e.is_retryable(),
            _ => false,
        }
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        Error::Store(StoreError::Database(e))
    }
}

impl From<lapin::Error> for Error {
    fn from(e: lapin::Error) -> Self {
        Error::Broker(BrokerError::Amqp(e))
    }
}
