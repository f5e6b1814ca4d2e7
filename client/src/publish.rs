//! Confirmed publishing: every publish is `mandatory` and waits for its own broker confirm, so a
//! nack or an unroutable (returned) message is an error rather than a silent loss. Many tasks may
//! publish on one confirm channel at once; each awaits only its own confirm.
//!
//! [`PublishError`] is what [`amqp_submit`](crate::amqp_submit) returns. The publishing helpers
//! here are shared with the worker SDK (`tasker-worker`), which publishes step results the same
//! way; they are hidden from the docs and not part of this crate's supported API.

use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation, PublisherConfirm};
use tasker_schemas::message::CONTENT_TYPE;
use tasker_schemas::{EncodeError, MessageId};

/// AMQP `delivery_mode` of a message written to disk.
#[doc(hidden)]
pub const PERSISTENT: u8 = 2;

/// Why a confirmed publish did not succeed.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    #[error("AMQP error: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("cannot encode the message: {0}")]
    Encode(#[from] EncodeError),
    #[error("the broker refused the message on exchange {exchange:?} (nack)")]
    Nacked { exchange: String },
    #[error(
        "the message is unroutable: exchange {exchange:?} has no queue bound for routing key \
         {routing_key:?} ({reply_code} {reply_text})"
    )]
    Returned {
        exchange: String,
        routing_key: String,
        reply_code: u16,
        reply_text: String,
    },
    #[error("the channel is not in confirm mode; call confirm_select on it first")]
    NotConfirmed,
    /// Worker SDK only: the worker session's result publisher stopped before confirming.
    #[error("the session's result publisher has stopped")]
    Stopped,
    #[error("{what} {name:?} is longer than 255 bytes")]
    NameTooLong { what: &'static str, name: String },
}

impl PublishError {
    /// True when publishing again later may succeed (everything but a bad name or payload).
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self,
            Self::Encode(_) | Self::NameTooLong { .. } | Self::NotConfirmed
        )
    }
}

pub(crate) fn short(what: &'static str, name: &str) -> Result<ShortString, PublishError> {
    ShortString::try_new(name).map_err(|_| PublishError::NameTooLong {
        what,
        name: name.to_owned(),
    })
}

/// Properties of every message we write: MessagePack, persistent, with the envelope's id.
#[doc(hidden)]
pub fn message_properties(message_id: MessageId) -> BasicProperties {
    BasicProperties::default()
        .with_content_type(ShortString::from(CONTENT_TYPE))
        .with_delivery_mode(PERSISTENT)
        .with_message_id(ShortString::from(message_id.to_string()))
}

/// Sets the AMQP `user_id` property: the broker refuses a publish whose `user_id` is not the
/// connection's user, so the receiver knows who sent it (broker identity, CONTRACT.md §1).
pub fn with_user_id(properties: BasicProperties, user_id: &str) -> BasicProperties {
    properties.with_user_id(ShortString::from(user_id))
}

/// The user an AMQP URL connects as (`guest` when the URL names none, as the AMQP client
/// assumes), or `None` for a URL that does not parse.
pub fn amqp_user(url: &str) -> Option<String> {
    url.parse::<lapin::uri::AMQPUri>()
        .ok()
        .map(|uri| uri.authority.userinfo.username)
}

/// Publishes with `mandatory` set and waits for the broker's confirm. `Ok` means the broker
/// acknowledged the message and routed it to at least one queue.
#[doc(hidden)]
pub async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    payload: &[u8],
    properties: BasicProperties,
) -> Result<(), PublishError> {
    let confirm = publish_mandatory(channel, exchange, routing_key, payload, properties)
        .await?
        .await?;
    check_confirmation(confirm, exchange, routing_key)
}

/// Publishes with `mandatory` set; the caller awaits the confirm (and checks it with
/// [`check_confirmation`]), so several publishes can share one confirm round trip.
#[doc(hidden)]
pub async fn publish_mandatory(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    payload: &[u8],
    properties: BasicProperties,
) -> Result<PublisherConfirm, PublishError> {
    Ok(channel
        .basic_publish(
            short("exchange", exchange)?,
            short("routing key", routing_key)?,
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            payload,
            properties,
        )
        .await?)
}

/// `Ok` for an ack of a routed message; the matching [`PublishError`] otherwise.
#[doc(hidden)]
pub fn check_confirmation(
    confirm: Confirmation,
    exchange: &str,
    routing_key: &str,
) -> Result<(), PublishError> {
    match confirm {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(returned)) => Err(PublishError::Returned {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            reply_code: returned.reply_code,
            reply_text: returned.reply_text.to_string(),
        }),
        Confirmation::Nack(_) => Err(PublishError::Nacked {
            exchange: exchange.to_owned(),
        }),
        Confirmation::NotRequested => Err(PublishError::NotConfirmed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirmations_map_to_errors() {
        assert!(check_confirmation(Confirmation::Ack(None), "x", "k").is_ok());
        assert!(matches!(
            check_confirmation(Confirmation::Nack(None), "x", "k"),
            Err(PublishError::Nacked { .. })
        ));
        assert!(matches!(
            check_confirmation(Confirmation::NotRequested, "x", "k"),
            Err(PublishError::NotConfirmed)
        ));
        let long = "k".repeat(256);
        let err = short("routing key", &long).unwrap_err();
        assert!(err.to_string().contains("longer than 255 bytes"), "{err}");
        assert!(!err.is_retryable());
    }
}
