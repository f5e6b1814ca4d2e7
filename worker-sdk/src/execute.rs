//! Running one handler for one attempt and turning whatever happens into an [`Outcome`]: its
//! output (with a decision's branches), its error, a panic, a timeout, an oversized output, or a
//! missing handler.

use crate::context::StepContext;
use crate::handler::{DynHandler, StepReturn};
use std::any::Any;
use std::time::Duration;
use tasker_schemas::Outcome;
use tasker_schemas::data::check_value;
use tokio_util::task::AbortOnDropHandle;

/// Runs `handler` on `ctx` in its own task, so a panic is caught, bounded by `timeout_ms`.
///
/// On timeout the context's token is cancelled and the handler's task aborted. If this future is
/// dropped, the handler's task is aborted too.
pub(crate) async fn run_handler(
    handler: Option<DynHandler>,
    ctx: StepContext,
    timeout_ms: u64,
    max_output_bytes: usize,
) -> Outcome {
    let Some(handler) = handler else {
        return Outcome::HandlerMissing {
            handler: ctx.handler().to_owned(),
        };
    };
    let step = ctx.step().to_owned();
    let cancel = ctx.cancellation_token().clone();
    // In the caller's span (the attempt's `step` span): the handler's own spans nest below it.
    let mut task = AbortOnDropHandle::new(tokio::spawn(tracing::Instrument::in_current_span(
        handler(ctx),
    )));
    let joined = match tokio::time::timeout(Duration::from_millis(timeout_ms), &mut task).await {
        Ok(joined) => joined,
        Err(_) => {
            cancel.cancel();
            task.abort();
            return failed(format!("timed out after {timeout_ms} ms"), true);
        }
    };
    match joined {
        Ok(Ok(returned)) => match check_value(
            &format!("output of step {step:?}"),
            &returned.output,
            max_output_bytes,
        ) {
            Ok(_) => StepReturn::into_outcome(returned),
            Err(e) => failed(e.to_string(), false),
        },
        Ok(Err(e)) => e.into_outcome(),
        Err(e) if e.is_panic() => failed(
            format!("handler panicked: {}", panic_message(e.into_panic())),
            true,
        ),
        Err(e) => failed(format!("handler task ended early: {e}"), true),
    }
}

fn failed(message: String, retryable: bool) -> Outcome {
    Outcome::Failed {
        message,
        retryable,
        retry_after_ms: None,
    }
}

fn panic_message(payload: Box<dyn Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(s) => (*s).to_owned(),
            Err(_) => "a non-string panic payload".to_owned(),
        },
    }
}

/// A short word for logs.
pub(crate) fn outcome_status(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Succeeded { .. } => "succeeded",
        Outcome::Failed {
            retryable: true, ..
        } => "failed (retryable)",
        Outcome::Failed {
            retryable: false, ..
        } => "failed (permanent)",
        Outcome::HandlerMissing { .. } => "handler missing",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::{Decision, StepError, StepOutput, erase};
    use serde_json::{Value, json};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn ctx() -> StepContext {
        StepContext::for_test("s", json!({}))
    }

    #[tokio::test]
    async fn output_and_errors() {
        let ok = erase(|_: StepContext| async { Ok(json!({"a": 1})) });
        assert_eq!(
            run_handler(Some(ok), ctx(), 1_000, 1_000).await,
            Outcome::succeeded(json!({"a": 1}))
        );
        let perm = erase(|_: StepContext| async { Err::<Value, _>(StepError::permanent("no")) });
        assert_eq!(
            run_handler(Some(perm), ctx(), 1_000, 1_000).await,
            Outcome::Failed {
                message: "no".into(),
                retryable: false,
                retry_after_ms: None
            }
        );
    }

    #[tokio::test]
    async fn decisions_carry_their_branches() {
        let route = erase(|ctx: StepContext| async move {
            Ok(Decision::choose(["express"]).output(json!({"step": ctx.step()})))
        });
        assert_eq!(
            run_handler(Some(route), ctx(), 1_000, 1_000).await,
            Outcome::Succeeded {
                output: json!({"step": "s"}),
                branches: Some(vec!["express".into()]),
            }
        );
        let none = erase(|_: StepContext| async { Ok(Decision::none()) });
        assert_eq!(
            run_handler(Some(none), ctx(), 1_000, 1_000).await,
            Outcome::Succeeded {
                output: Value::Null,
                branches: Some(Vec::new()),
            }
        );
        // The output cap applies to a decision's output too.
        let big = erase(|_: StepContext| async {
            Ok(Decision::choose(["express"]).output("x".repeat(100)))
        });
        let Outcome::Failed {
            message, retryable, ..
        } = run_handler(Some(big), ctx(), 1_000, 50).await
        else {
            panic!("expected a failure");
        };
        assert!(!retryable);
        assert!(message.contains("limit of 50 bytes"), "{message}");
    }

    #[tokio::test]
    async fn missing_handler() {
        assert_eq!(
            run_handler(None, ctx(), 1_000, 1_000).await,
            Outcome::HandlerMissing {
                handler: "s".into()
            }
        );
    }

    #[tokio::test]
    async fn panics_are_caught() {
        let boom = erase(|_: StepContext| async { panic!("boom {}", 7) as StepOutput });
        let Outcome::Failed {
            message, retryable, ..
        } = run_handler(Some(boom), ctx(), 1_000, 1_000).await
        else {
            panic!("expected a failure");
        };
        assert_eq!(message, "handler panicked: boom 7");
        assert!(retryable);
        let boom = erase(|_: StepContext| async { std::panic::panic_any(42_u8) as StepOutput });
        let Outcome::Failed { message, .. } = run_handler(Some(boom), ctx(), 1_000, 1_000).await
        else {
            panic!("expected a failure");
        };
        assert_eq!(message, "handler panicked: a non-string panic payload");
    }

    #[tokio::test]
    async fn timeouts_cancel_and_abort() {
        let saw_cancel = Arc::new(AtomicBool::new(false));
        let seen = saw_cancel.clone();
        let slow = erase(move |ctx: StepContext| {
            let seen = seen.clone();
            async move {
                let token = ctx.cancellation_token().clone();
                tokio::spawn(async move {
                    token.cancelled().await;
                    seen.store(true, Ordering::SeqCst);
                });
                tokio::time::sleep(Duration::from_secs(30)).await;
                Ok(Value::Null)
            }
        });
        let started = std::time::Instant::now();
        assert_eq!(
            run_handler(Some(slow), ctx(), 50, 1_000).await,
            Outcome::Failed {
                message: "timed out after 50 ms".into(),
                retryable: true,
                retry_after_ms: None
            }
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(saw_cancel.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn oversized_output_is_a_permanent_failure() {
        let big = erase(|_: StepContext| async { Ok(json!("x".repeat(100))) });
        let Outcome::Failed {
            message, retryable, ..
        } = run_handler(Some(big), ctx(), 1_000, 50).await
        else {
            panic!("expected a failure");
        };
        assert!(!retryable);
        assert!(
            message.contains("output of step \"s\"") && message.contains("limit of 50 bytes"),
            "{message}"
        );
    }
}
