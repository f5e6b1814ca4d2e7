//! Newtype ids. On the wire every id is the canonical lowercase hyphenated UUID string
//! (`"0192f0c4-8b3e-7c1a-9d2e-3f4a5b6c7d8e"`); new ids are UUIDv7 so they index well.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub Uuid);

        // Always a string, even in MessagePack (uuid's own impl writes 16 raw bytes there).
        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(&self.0.hyphenated())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Uuid::parse_str(&s).map(Self).map_err(serde::de::Error::custom)
            }
        }

        impl $name {
            /// A new time-ordered (v7) id.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            pub fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.hyphenated().fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }

        impl From<Uuid> for $name {
            fn from(id: Uuid) -> Self {
                Self(id)
            }
        }
    };
}

id_type!(
    /// One run of a workflow template.
    TaskId
);
id_type!(
    /// One step of one task.
    StepId
);
id_type!(
    /// One message; used for de-duplication and tracing.
    MessageId
);
id_type!(
    /// The id a client gives an AMQP task request so a redelivery never creates a second task.
    RequestId
);
id_type!(
    /// One worker process, chosen by the worker when it starts (its `worker_heartbeat`s).
    WorkerId
);
