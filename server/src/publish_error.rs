//! Why a publisher request was refused, and the one place where that maps
//! to gRPC: a status for a whole call ([`Status`]), or an in-band result
//! for one event of a batch or stream ([`result_of`]).

use thiserror::Error;
use tonic::{Code, Status};
use wakewire_api::pb::{PublishBatchResult, PublishResponse};
use wakewire_proto::token::TokenError;

use crate::store::StoreError;

/// Why a publisher request was refused. Each maps to one gRPC code in
/// [`PublishError::code`].
#[derive(Debug, Error)]
pub enum PublishError {
    /// No `authorization: Bearer ...` metadata.
    #[error("missing credential: send metadata 'authorization: Bearer <publisher token>'")]
    MissingCredential,
    /// The token is malformed, badly signed, expired or not a publisher token.
    #[error("publisher credential refused: {0}")]
    BadCredential(#[from] TokenError),
    /// The request itself is invalid.
    #[error("{0}")]
    InvalidArgument(String),
    /// No channel with this id was ever registered here.
    #[error("channel {0} not found: no device registered it on this relay")]
    ChannelNotFound(String),
    /// The channel existed and is gone (like HTTP 410): stop publishing to it.
    #[error("channel {channel} is gone ({reason}): remove it from your records")]
    ChannelGone {
        /// Channel id.
        channel: String,
        /// Why (unregistered, expired).
        reason: String,
    },
    /// No event with this id that the caller may see (never accepted,
    /// past its retention, or another publisher's).
    #[error("event {0} not found (unknown, or finished longer ago than the status retention)")]
    EventNotFound(String),
    /// The store failed; the event was not stored. Retrying may help.
    #[error("{source}; the event was not stored, retry later")]
    NotStored {
        /// What failed.
        source: StoreError,
        /// Set if the wake was handed to the device's connection anyway
        /// (it may reach the device): the id is in the
        /// `wakewire-event-id` trailer.
        event_id: Option<String>,
    },
    /// A read of the store failed.
    #[error("{0}; retry later")]
    StoreRead(StoreError),
    /// Cluster mode: JetStream did not take the event (NATS unreachable,
    /// no quorum, a contended queue), or did not confirm it in time (the
    /// message says which). Retrying with the same idempotency key cannot
    /// duplicate it.
    #[error("{0}; retry later (with an idempotency key a retry cannot duplicate the event)")]
    ClusterNotStored(crate::cluster::ClusterError),
    /// Cluster mode: a read failed.
    #[error("{0}; retry later")]
    ClusterRead(crate::cluster::ClusterError),
    /// The token's scope does not include the channel.
    #[error("publisher credential does not allow publishing to channel {0}")]
    PermissionDenied(String),
    /// The publish task ended unexpectedly.
    #[error("internal error: {0}")]
    Internal(String),
    /// The relay is handling as many requests as it allows: retry shortly.
    #[error("relay busy: too many requests in flight; retry shortly")]
    Overloaded,
    /// The publisher token is over its publish rate.
    #[error("publish rate of this publisher token exceeded; retry in {} ms", .0.as_millis())]
    RateLimited(std::time::Duration),
    /// The publisher token has as many events queued as it may store.
    #[error("this publisher token has {stored} bytes queued, the most it may store is {limit}; wait for deliveries or expiries")]
    StorageQuota {
        /// Bytes it has queued.
        stored: u64,
        /// Its quota.
        limit: u64,
    },
    /// The publisher token holds as many WatchDeliveries streams as it may.
    #[error("this publisher token already has {0} WatchDeliveries streams open")]
    TooManyWatchers(u32),
}

impl PublishError {
    /// The gRPC code of this error: the one mapping of publisher errors to
    /// statuses (docs/protocol.md lists them).
    pub fn code(&self) -> Code {
        match self {
            PublishError::MissingCredential | PublishError::BadCredential(_) => {
                Code::Unauthenticated
            }
            PublishError::InvalidArgument(_) => Code::InvalidArgument,
            PublishError::ChannelNotFound(_)
            | PublishError::ChannelGone { .. }
            | PublishError::EventNotFound(_) => Code::NotFound,
            PublishError::NotStored { .. }
            | PublishError::StoreRead(_)
            | PublishError::ClusterNotStored(_)
            | PublishError::ClusterRead(_) => Code::Unavailable,
            PublishError::PermissionDenied(_) => Code::PermissionDenied,
            PublishError::Internal(_) => Code::Internal,
            PublishError::Overloaded
            | PublishError::RateLimited(_)
            | PublishError::StorageQuota { .. }
            | PublishError::TooManyWatchers(_) => Code::ResourceExhausted,
        }
    }

    /// When a retry may succeed, for the errors that say so.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            PublishError::RateLimited(d) => Some((*d).max(std::time::Duration::from_millis(1))),
            PublishError::Overloaded => Some(std::time::Duration::from_millis(100)),
            _ => None,
        }
    }

    /// Metric label of the code.
    pub(crate) fn label(&self) -> &'static str {
        match self.code() {
            Code::Unauthenticated => "unauthenticated",
            Code::InvalidArgument => "invalid_argument",
            Code::NotFound => "not_found",
            Code::PermissionDenied => "permission_denied",
            Code::Unavailable => "unavailable",
            Code::ResourceExhausted => "resource_exhausted",
            _ => "internal",
        }
    }
}

impl From<PublishError> for Status {
    fn from(e: PublishError) -> Self {
        let mut status = Status::new(e.code(), e.to_string());
        let retry_ms = e.retry_after().map(|d| d.as_millis());
        if let Some(ms) = retry_ms {
            if let Ok(v) = ms.to_string().parse() {
                status
                    .metadata_mut()
                    .insert(wakewire_api::RETRY_AFTER_METADATA, v);
            }
        }
        if let PublishError::NotStored {
            event_id: Some(id), ..
        } = &e
        {
            if let Ok(v) = id.parse() {
                status
                    .metadata_mut()
                    .insert(wakewire_api::EVENT_ID_METADATA, v);
            }
        }
        status
    }
}

/// One event's outcome as an in-band result (PublishBatch, PublishStream):
/// the error mapping of [`PublishError::code`], its message, and when to
/// retry.
pub(crate) fn result_of(r: Result<PublishResponse, PublishError>) -> PublishBatchResult {
    match r {
        Ok(resp) => PublishBatchResult {
            response: Some(resp),
            ..Default::default()
        },
        Err(e) => PublishBatchResult {
            response: None,
            error_code: e.code() as i32,
            error_message: e.to_string(),
            retry_after_ms: e
                .retry_after()
                .map_or(0, |d| u32::try_from(d.as_millis()).unwrap_or(u32::MAX)),
        },
    }
}
