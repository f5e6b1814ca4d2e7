//! Step handlers: the [`StepHandler`] trait, the [`StepError`] a handler returns, and the
//! type-erased form the worker stores.

use crate::context::StepContext;
use futures_util::future::BoxFuture;
use serde_json::Value;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tasker_schemas::Outcome;

/// What a handler returns: the step's output (any JSON) or why it failed.
pub type StepOutput = Result<Value, StepError>;

/// Code that runs one step.
///
/// Implement it for your own type (`async fn call` is accepted in the impl), or pass a closure
/// `|ctx: StepContext| async move { ... }` — every `Fn(StepContext) -> impl Future<Output =
/// Result<Value, StepError>>` is a handler. [`WorkerBuilder::handler_fn`] takes a closure without
/// the type annotation.
///
/// ```
/// use serde_json::{json, Value};
/// use tasker_worker::{StepContext, StepError, StepHandler};
///
/// struct ChargeCard;
///
/// impl StepHandler for ChargeCard {
///     async fn call(&self, ctx: StepContext) -> Result<Value, StepError> {
///         // The idempotency key is the same on every attempt of this step.
///         Ok(json!({ "charge_id": format!("ch_{}", ctx.idempotency_key()) }))
///     }
/// }
/// ```
///
/// A handler should watch [`StepContext::cancelled`] when it runs long: the worker cancels it
/// when its timeout passes or when a shutdown's grace period runs out.
///
/// [`WorkerBuilder::handler_fn`]: crate::WorkerBuilder::handler_fn
pub trait StepHandler: Send + Sync + 'static {
    /// Runs the step once. Called again (on some worker) for every retry.
    fn call(&self, ctx: StepContext) -> impl Future<Output = StepOutput> + Send;
}

impl<F, Fut> StepHandler for F
where
    F: Fn(StepContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = StepOutput> + Send + 'static,
{
    fn call(&self, ctx: StepContext) -> impl Future<Output = StepOutput> + Send {
        self(ctx)
    }
}

/// A handler with its type erased, as the worker stores it.
pub(crate) type DynHandler =
    Arc<dyn Fn(StepContext) -> BoxFuture<'static, StepOutput> + Send + Sync>;

pub(crate) fn erase<H: StepHandler>(handler: H) -> DynHandler {
    let handler = Arc::new(handler);
    Arc::new(move |ctx| {
        let handler = Arc::clone(&handler);
        Box::pin(async move { handler.call(ctx).await })
    })
}

/// Why a step failed, and whether it is worth another attempt.
///
/// Build it with [`StepError::retryable`], [`StepError::permanent`] or [`StepError::retry_after`].
/// A `String` or `&str` converts into a retryable error, so `Err("no stock yet".into())` works.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StepError {
    /// Try again, after the template's backoff or after `retry_after` when given.
    #[error("{message}")]
    Retryable {
        message: String,
        retry_after: Option<Duration>,
    },
    /// Do not try again: fail the step now, whatever attempts are left.
    #[error("{message}")]
    Permanent { message: String },
}

impl StepError {
    /// A failure worth retrying, after the template's backoff.
    pub fn retryable(message: impl Into<String>) -> Self {
        Self::Retryable {
            message: message.into(),
            retry_after: None,
        }
    }

    /// A failure that no retry can fix (bad input, a refused payment): the step fails now.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self::Permanent {
            message: message.into(),
        }
    }

    /// A failure worth retrying after `delay`, overriding the template's backoff for the next
    /// attempt (e.g. a rate limit's `Retry-After`).
    pub fn retry_after(message: impl Into<String>, delay: Duration) -> Self {
        Self::Retryable {
            message: message.into(),
            retry_after: Some(delay),
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Self::Retryable { message, .. } | Self::Permanent { message } => message,
        }
    }

    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Retryable { .. })
    }

    /// The delay the handler asked for before the next attempt, if any.
    pub fn retry_delay(&self) -> Option<Duration> {
        match self {
            Self::Retryable { retry_after, .. } => *retry_after,
            Self::Permanent { .. } => None,
        }
    }

    /// The wire outcome of an attempt that failed with this error.
    pub fn into_outcome(self) -> Outcome {
        let retry_after_ms = self
            .retry_delay()
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let retryable = self.is_retryable();
        let message = match self {
            Self::Retryable { message, .. } | Self::Permanent { message } => message,
        };
        Outcome::Failed {
            message,
            retryable,
            retry_after_ms,
        }
    }
}

impl From<String> for StepError {
    /// A retryable error with this message.
    fn from(message: String) -> Self {
        Self::retryable(message)
    }
}

impl From<&str> for StepError {
    /// A retryable error with this message.
    fn from(message: &str) -> Self {
        Self::retryable(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_outcomes() {
        assert_eq!(
            StepError::retryable("busy").into_outcome(),
            Outcome::Failed {
                message: "busy".into(),
                retryable: true,
                retry_after_ms: None
            }
        );
        assert_eq!(
            StepError::permanent("bad card").into_outcome(),
            Outcome::Failed {
                message: "bad card".into(),
                retryable: false,
                retry_after_ms: None
            }
        );
        assert_eq!(
            StepError::retry_after("rate limited", Duration::from_millis(1_500)).into_outcome(),
            Outcome::Failed {
                message: "rate limited".into(),
                retryable: true,
                retry_after_ms: Some(1_500)
            }
        );
        let e: StepError = "plain".into();
        assert!(e.is_retryable());
        assert_eq!(e.to_string(), "plain");
        assert_eq!(StepError::permanent("x").retry_delay(), None);
    }

    #[tokio::test]
    async fn closures_and_types_are_handlers() {
        struct Double;
        impl StepHandler for Double {
            async fn call(&self, ctx: StepContext) -> StepOutput {
                let n: u64 = ctx.input()?;
                Ok(Value::from(n * 2))
            }
        }
        let typed = erase(Double);
        let closure = erase(|ctx: StepContext| async move {
            if ctx.attempt() > 1 {
                return Err("only once".into());
            }
            Ok(Value::from(ctx.step()))
        });
        let ctx = StepContext::for_test("double", Value::from(21));
        assert_eq!(typed(ctx.clone()).await, Ok(Value::from(42)));
        assert_eq!(closure(ctx.clone()).await, Ok(Value::from("double")));
        assert!(
            closure(ctx.with_attempt(2))
                .await
                .unwrap_err()
                .is_retryable()
        );
    }
}
