//! The states of a task and of a step, and how an attempt ended: one name for each, the same in
//! SQL (`tasks.state`, `steps.state`, `attempts.outcome`), in Rust, in the HTTP API and in the CLI.
//!
//! With the `sqlx` feature, each maps to PostgreSQL `text` (and `text[]`), so the orchestrator
//! reads and writes them typed.
//!
//! ```
//! use tasker_schemas::state::{StepState, TaskState};
//!
//! assert_eq!("dispatched".parse::<StepState>()?, StepState::Dispatched);
//! assert!(TaskState::Cancelled.is_finished());
//! assert_eq!(StepState::Succeeded.to_string(), "succeeded");
//! # Ok::<(), tasker_schemas::state::UnknownState>(())
//! ```

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A name that is not one of a state enum's values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {value:?}; expected one of: {expected}")]
pub struct UnknownState {
    pub kind: &'static str,
    pub value: String,
    pub expected: String,
}

macro_rules! named_enum {
    ($(#[$meta:meta])* $name:ident, $kind:literal, { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// Every value, in lifecycle order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The name used in SQL, JSON and the CLI.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownState;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(UnknownState {
                        kind: $kind,
                        value: s.to_owned(),
                        expected: [$($text),+].join(", "),
                    }),
                }
            }
        }

        #[cfg(feature = "sqlx")]
        impl sqlx::Type<sqlx::Postgres> for $name {
            fn type_info() -> sqlx::postgres::PgTypeInfo {
                <str as sqlx::Type<sqlx::Postgres>>::type_info()
            }

            fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
                <str as sqlx::Type<sqlx::Postgres>>::compatible(ty)
            }
        }

        #[cfg(feature = "sqlx")]
        impl sqlx::postgres::PgHasArrayType for $name {
            fn array_type_info() -> sqlx::postgres::PgTypeInfo {
                <&str as sqlx::postgres::PgHasArrayType>::array_type_info()
            }

            fn array_compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
                <&str as sqlx::postgres::PgHasArrayType>::array_compatible(ty)
            }
        }

        #[cfg(feature = "sqlx")]
        impl sqlx::Encode<'_, sqlx::Postgres> for $name {
            fn encode_by_ref(
                &self,
                buf: &mut sqlx::postgres::PgArgumentBuffer,
            ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                <&str as sqlx::Encode<'_, sqlx::Postgres>>::encode_by_ref(&self.as_str(), buf)
            }
        }

        #[cfg(feature = "sqlx")]
        impl<'r> sqlx::Decode<'r, sqlx::Postgres> for $name {
            fn decode(
                value: sqlx::postgres::PgValueRef<'r>,
            ) -> Result<Self, sqlx::error::BoxDynError> {
                let text = <&str as sqlx::Decode<'r, sqlx::Postgres>>::decode(value)?;
                Ok(text.parse()?)
            }
        }
    };
}

named_enum!(
    /// The state of a task (`tasks.state`). `pending` and `running` are live; the others are
    /// final until an operator retries a `failed` or `cancelled` task.
    TaskState, "task state", {
        /// Created, no step admitted yet (reserved: tasks are created `running` today).
        Pending = "pending",
        Running = "running",
        /// Every step succeeded; the output holds the leaf steps' outputs.
        Completed = "completed",
        /// A step failed for good; the rest were skipped or reported.
        Failed = "failed",
        Cancelled = "cancelled",
    }
);

named_enum!(
    /// The state of a step (`steps.state`).
    StepState, "step state", {
        /// Some parent has not succeeded yet.
        Waiting = "waiting",
        /// Ready: waits for a slot on its queue.
        Queued = "queued",
        /// An attempt was admitted (published, or in its outbox entry) and may be running.
        Dispatched = "dispatched",
        /// An attempt failed; the next one is due at `next_attempt_at`.
        Retrying = "retrying",
        /// Its work runs elsewhere: a mapped step's instances, or a child workflow's task (it is
        /// never dispatched itself). It finishes when they have.
        Delegated = "delegated",
        Succeeded = "succeeded",
        Failed = "failed",
        /// Will not run: not chosen by a decision, a parent was skipped, or its task is failing
        /// (`skip_reason` says which).
        Skipped = "skipped",
        Cancelled = "cancelled",
    }
);

named_enum!(
    /// How one attempt ended (`attempts.outcome`).
    AttemptOutcome, "attempt outcome", {
        Succeeded = "succeeded",
        Failed = "failed",
        /// Its lease ran out: no result within queue-wait plus execution, or the execution lease.
        TimedOut = "timed_out",
        /// The worker that took it has no such handler (spends no attempt).
        HandlerMissing = "handler_missing",
        Cancelled = "cancelled",
        /// The step message was dead-lettered (broker delivery limit, unroutable, too large).
        DeadLettered = "dead_lettered",
    }
);

impl TaskState {
    /// States in which a task still makes progress.
    pub const LIVE: &'static [TaskState] = &[TaskState::Pending, TaskState::Running];

    /// `completed`, `failed` or `cancelled`.
    pub const fn is_finished(self) -> bool {
        !self.is_live()
    }

    /// `pending` or `running`.
    pub const fn is_live(self) -> bool {
        matches!(self, TaskState::Pending | TaskState::Running)
    }
}

impl StepState {
    /// States that still count in `tasks.unfinished_steps`.
    pub const UNFINISHED: &'static [StepState] = &[
        StepState::Waiting,
        StepState::Queued,
        StepState::Dispatched,
        StepState::Retrying,
        StepState::Delegated,
    ];

    /// States in which no attempt is in flight and none has finished for good: what a failing
    /// task skips and a cancel cancels at once.
    pub const NOT_STARTED: &'static [StepState] =
        &[StepState::Waiting, StepState::Queued, StepState::Retrying];

    /// States a retried task runs again.
    pub const RETRYABLE: &'static [StepState] =
        &[StepState::Failed, StepState::Skipped, StepState::Cancelled];

    /// `succeeded`, `failed`, `skipped` or `cancelled`.
    pub const fn is_terminal(self) -> bool {
        matches!(
            self,
            StepState::Succeeded | StepState::Failed | StepState::Skipped | StepState::Cancelled
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_text_and_json() {
        for s in StepState::ALL {
            assert_eq!(s.as_str().parse::<StepState>().unwrap(), *s);
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::Value::from(s.as_str())
            );
        }
        for s in TaskState::ALL {
            assert_eq!(s.as_str().parse::<TaskState>().unwrap(), *s);
        }
        for o in AttemptOutcome::ALL {
            assert_eq!(o.as_str().parse::<AttemptOutcome>().unwrap(), *o);
            assert_eq!(
                serde_json::from_value::<AttemptOutcome>(o.as_str().into()).unwrap(),
                *o
            );
        }
    }

    #[test]
    fn an_unknown_name_lists_the_valid_ones() {
        let e = "done".parse::<TaskState>().unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"unknown task state "done"; expected one of: pending, running, completed, failed, cancelled"#
        );
    }

    #[test]
    fn unfinished_is_exactly_the_non_terminal_states() {
        for s in StepState::ALL {
            assert_eq!(StepState::UNFINISHED.contains(s), !s.is_terminal(), "{s}");
        }
        assert!(
            StepState::NOT_STARTED
                .iter()
                .all(|s| StepState::UNFINISHED.contains(s))
        );
        assert!(StepState::RETRYABLE.iter().all(|s| s.is_terminal()));
        assert_eq!(
            TaskState::ALL.iter().filter(|t| t.is_live()).count(),
            TaskState::LIVE.len()
        );
    }
}
