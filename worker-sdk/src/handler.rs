//! Step handlers: the [`StepHandler`] trait, what a handler returns (an output, or a
//! [`Decision`] for a decision step), the [`StepError`] a failed one returns, and the
//! type-erased form the worker stores.

use crate::context::StepContext;
use futures_util::future::BoxFuture;
use serde_json::Value;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tasker_schemas::Outcome;

/// What most handlers return: the step's output (any JSON) or why it failed.
pub type StepOutput = Result<Value, StepError>;

/// What a decision step's handler returns: the branches it chose and its output.
///
/// A step whose template lists `decides: [express, standard]` is a **decision step**: its handler
/// must name the branches (direct children from that list) that run; the others are skipped
/// (`not chosen by <step>`). Choosing none is allowed ([`Decision::none`]). The orchestrator
/// fails the step for good if the handler of a decision step returns a plain output, if a
/// handler returns a decision for a step that declares no `decides`, or if it names a branch
/// not in `decides`.
///
/// ```
/// use serde_json::json;
/// use tasker_worker::{Decision, StepContext, StepError};
///
/// async fn route(ctx: StepContext) -> Result<Decision, StepError> {
///     let order: serde_json::Value = ctx.input()?;
///     if order["express"] == true {
///         Ok(Decision::choose(["express"]).output(json!({ "carrier": "dhl" })))
///     } else {
///         Ok(Decision::choose(["standard"]))
///     }
/// }
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
#[must_use]
pub struct Decision {
    /// The chosen branches, as given (step names from the step's `decides`).
    pub branches: Vec<String>,
    /// The step's output, as for any step (`null` unless set with [`output`](Self::output)).
    pub output: Value,
}

impl Decision {
    /// Runs `branches` (names from the step's `decides`) and skips its other branches.
    pub fn choose<I>(branches: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        Self {
            branches: branches.into_iter().map(Into::into).collect(),
            output: Value::Null,
        }
    }

    /// Chooses no branch: every branch of the step is skipped.
    pub fn none() -> Self {
        Self::default()
    }

    /// The same decision with this output (default `null`): the decision step's output, which
    /// its children read like any parent's.
    pub fn output(mut self, output: impl Into<Value>) -> Self {
        self.output = output.into();
        self
    }
}

/// What a successful attempt produced, whatever the handler returned: its output, and the chosen
/// branches when it was a [`Decision`] (`None` otherwise).
///
/// Handlers return a [`Value`] or a [`Decision`]; both convert into this (so does a
/// `StepReturn` itself).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct StepReturn {
    pub output: Value,
    /// `Some` for a decision (possibly empty: none chosen), `None` for a plain output.
    pub branches: Option<Vec<String>>,
}

impl From<Value> for StepReturn {
    fn from(output: Value) -> Self {
        Self {
            output,
            branches: None,
        }
    }
}

impl From<Decision> for StepReturn {
    fn from(d: Decision) -> Self {
        Self {
            output: d.output,
            branches: Some(d.branches),
        }
    }
}

impl StepReturn {
    /// The wire outcome of an attempt that returned this (the output is not checked here).
    pub fn into_outcome(self) -> Outcome {
        Outcome::Succeeded {
            output: self.output,
            branches: self.branches,
        }
    }
}

/// Code that runs one step.
///
/// `R` is what the handler returns on success: a [`Value`] (the default: `StepHandler` is
/// `StepHandler<Value>`), or a [`Decision`] for a decision step (`StepHandler<Decision>`).
/// Implement it for your own type (`async fn call` is accepted in the impl), or pass a closure
/// `|ctx: StepContext| async move { ... }` — every `Fn(StepContext) -> impl Future<Output =
/// Result<R, StepError>>` is a handler. [`WorkerBuilder::handler_fn`] (outputs) and
/// [`WorkerBuilder::decision_fn`] (decisions) take a closure without the type annotation.
///
/// ```
/// use serde_json::{json, Value};
/// use tasker_worker::{Decision, StepContext, StepError, StepHandler};
///
/// struct ChargeCard;
///
/// impl StepHandler for ChargeCard {
///     async fn call(&self, ctx: StepContext) -> Result<Value, StepError> {
///         // The idempotency key is the same on every attempt of this step.
///         Ok(json!({ "charge_id": format!("ch_{}", ctx.idempotency_key()) }))
///     }
/// }
///
/// /// A decision step: `decides: [express, standard]` in the template.
/// struct PickShipping;
///
/// impl StepHandler<Decision> for PickShipping {
///     async fn call(&self, ctx: StepContext) -> Result<Decision, StepError> {
///         let total: f64 = ctx.parent::<Value>("charge")?["amount"].as_f64().unwrap_or(0.0);
///         let branch = if total > 100.0 { "express" } else { "standard" };
///         Ok(Decision::choose([branch]).output(json!({ "shipping": branch })))
///     }
/// }
/// ```
///
/// A closure given to [`WorkerBuilder::handler`] returns either kind, told apart by its `Ok`
/// value (`Ok(json!(..))` or `Ok(Decision::..)`); a closure that only ever fails needs the type
/// spelled out (`Err::<Value, _>(..)`), or [`WorkerBuilder::handler_fn`].
///
/// A handler should watch [`StepContext::cancelled`] when it runs long: the worker cancels it
/// when its timeout passes or when a shutdown's grace period runs out.
///
/// [`WorkerBuilder::handler`]: crate::WorkerBuilder::handler
/// [`WorkerBuilder::handler_fn`]: crate::WorkerBuilder::handler_fn
/// [`WorkerBuilder::decision_fn`]: crate::WorkerBuilder::decision_fn
pub trait StepHandler<R = Value>: Send + Sync + 'static
where
    R: Into<StepReturn> + Send + 'static,
{
    /// Runs the step once. Called again (on some worker) for every retry.
    fn call(&self, ctx: StepContext) -> impl Future<Output = Result<R, StepError>> + Send;
}

impl<F, Fut, R> StepHandler<R> for F
where
    F: Fn(StepContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, StepError>> + Send + 'static,
    R: Into<StepReturn> + Send + 'static,
{
    fn call(&self, ctx: StepContext) -> impl Future<Output = Result<R, StepError>> + Send {
        self(ctx)
    }
}

/// A handler with its type erased, as the worker stores it.
pub(crate) type DynHandler =
    Arc<dyn Fn(StepContext) -> BoxFuture<'static, Result<StepReturn, StepError>> + Send + Sync>;

pub(crate) fn erase<R, H>(handler: H) -> DynHandler
where
    H: StepHandler<R>,
    R: Into<StepReturn> + Send + 'static,
{
    let handler = Arc::new(handler);
    Arc::new(move |ctx| {
        let handler = Arc::clone(&handler);
        Box::pin(async move { handler.call(ctx).await.map(Into::into) })
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
    use serde_json::json;

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

    #[test]
    fn decisions_and_outputs_convert() {
        let d = Decision::choose(["express", "gift_wrap"]).output(json!({"carrier": "dhl"}));
        assert_eq!(d.branches, ["express", "gift_wrap"]);
        assert_eq!(
            StepReturn::from(d).into_outcome(),
            Outcome::Succeeded {
                output: json!({"carrier": "dhl"}),
                branches: Some(vec!["express".into(), "gift_wrap".into()]),
            }
        );
        let owned: Vec<String> = vec!["standard".into()];
        assert_eq!(
            StepReturn::from(Decision::choose(owned)),
            StepReturn {
                output: Value::Null,
                branches: Some(vec!["standard".into()])
            }
        );
        assert_eq!(
            StepReturn::from(Decision::none()).into_outcome(),
            Outcome::Succeeded {
                output: Value::Null,
                branches: Some(Vec::new()),
            }
        );
        assert_eq!(Decision::none().output("x").output, json!("x"));
        assert_eq!(
            StepReturn::from(json!([1])).into_outcome(),
            Outcome::succeeded(json!([1]))
        );
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
        assert_eq!(typed(ctx.clone()).await, Ok(Value::from(42).into()));
        assert_eq!(closure(ctx.clone()).await, Ok(Value::from("double").into()));
        assert!(
            closure(ctx.with_attempt(2))
                .await
                .unwrap_err()
                .is_retryable()
        );
    }

    #[tokio::test]
    async fn decision_handlers() {
        struct Route;
        impl StepHandler<Decision> for Route {
            async fn call(&self, ctx: StepContext) -> Result<Decision, StepError> {
                let express: bool = ctx.input()?;
                Ok(if express {
                    Decision::choose(["express"]).output(json!({"carrier": "dhl"}))
                } else {
                    Decision::none()
                })
            }
        }
        async fn by_fn(_: StepContext) -> Result<Decision, StepError> {
            Ok(Decision::choose(["standard"]))
        }
        let typed = erase(Route);
        let closure = erase(|ctx: StepContext| async move {
            let _: bool = ctx.input()?;
            Ok(Decision::choose(vec![ctx.step().to_owned()]))
        });
        let ctx = StepContext::for_test("route", json!(true));
        assert_eq!(
            typed(ctx.clone()).await,
            Ok(StepReturn {
                output: json!({"carrier": "dhl"}),
                branches: Some(vec!["express".into()])
            })
        );
        assert_eq!(
            typed(StepContext::for_test("route", json!(false))).await,
            Ok(Decision::none().into())
        );
        assert_eq!(
            closure(ctx.clone()).await,
            Ok(Decision::choose(["route"]).into())
        );
        assert_eq!(
            erase(by_fn)(ctx.clone()).await.unwrap().branches,
            Some(vec!["standard".into()])
        );
        // A bad input is a permanent error, as for any handler.
        let bad = typed(StepContext::for_test("route", json!("yes")))
            .await
            .unwrap_err();
        assert!(!bad.is_retryable());
    }
}
