//! The publisher gRPC service, and the one place where publish errors map
//! to gRPC statuses.

use std::sync::Arc;
use std::time::Instant;

use metrics::{counter, histogram};
use thiserror::Error;
use tokio::sync::oneshot;
use tonic::{metadata::MetadataMap, Code, Request, Response, Status};
use tracing::{debug, info_span, Instrument};
use wakewire_proto::ids::{event_id, is_channel_id};
use wakewire_proto::pb::device::{Priority as WirePriority, Wake};
use wakewire_proto::pb::publish::{
    publisher_server::Publisher, DeliveryStatus, Priority, PublishBatchRequest,
    PublishBatchResponse, PublishBatchResult, PublishRequest, PublishResponse,
};
use wakewire_proto::token::{Claims, TokenError, TokenKind};
use wakewire_proto::MAX_PAYLOAD_SIZE;

use crate::metrics as m;
use crate::registry::{ConnCommand, Delivery};
use crate::relay::{unix_ms, unix_secs, Shared};

/// Most events in one `PublishBatch`.
pub const MAX_BATCH: usize = 1000;

/// Why a publish was refused. Each maps to one gRPC code in
/// [`From<PublishError> for Status`].
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
    /// No channel with this id exists (never registered, or unregistered).
    #[error("channel {0} not found: it was never registered, was unregistered, or its device has not connected since the relay started")]
    ChannelNotFound(String),
    /// The token's scope does not include the channel.
    #[error("publisher credential does not allow publishing to channel {0}")]
    PermissionDenied(String),
}

impl PublishError {
    /// The gRPC code of this error: the one mapping of publish errors to
    /// statuses.
    pub fn code(&self) -> Code {
        match self {
            PublishError::MissingCredential | PublishError::BadCredential(_) => {
                Code::Unauthenticated
            }
            PublishError::InvalidArgument(_) => Code::InvalidArgument,
            PublishError::ChannelNotFound(_) => Code::NotFound,
            PublishError::PermissionDenied(_) => Code::PermissionDenied,
        }
    }

    /// Metric label of the code.
    fn label(&self) -> &'static str {
        match self.code() {
            Code::Unauthenticated => "unauthenticated",
            Code::InvalidArgument => "invalid_argument",
            Code::NotFound => "not_found",
            Code::PermissionDenied => "permission_denied",
            _ => "other",
        }
    }
}

impl From<PublishError> for Status {
    fn from(e: PublishError) -> Self {
        Status::new(e.code(), e.to_string())
    }
}

/// Implements `wakewire.publish.v1.Publisher`.
#[derive(Debug, Clone)]
pub struct PublisherService {
    shared: Arc<Shared>,
}

impl PublisherService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    fn authenticate(&self, md: &MetadataMap) -> Result<Claims, PublishError> {
        let value = md
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .ok_or(PublishError::MissingCredential)?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or(PublishError::MissingCredential)?
            .trim();
        Ok(self
            .shared
            .keys
            .verifier
            .verify(token, TokenKind::Publisher, unix_secs())?)
    }

    async fn publish_one(
        &self,
        claims: &Claims,
        req: PublishRequest,
    ) -> Result<PublishResponse, PublishError> {
        let started = Instant::now();
        let result = self.publish_checked(claims, req).await;
        let status = match &result {
            Ok(r) => delivery_label(r.status()),
            Err(e) => e.label(),
        };
        counter!(m::PUBLISHES, "status" => status).increment(1);
        histogram!(m::PUBLISH_SECONDS).record(started.elapsed().as_secs_f64());
        result
    }

    async fn publish_checked(
        &self,
        claims: &Claims,
        req: PublishRequest,
    ) -> Result<PublishResponse, PublishError> {
        if !is_channel_id(&req.channel_id) {
            return Err(PublishError::InvalidArgument(format!(
                "channel_id {:?} is not a channel id (22 base64url characters)",
                truncate(&req.channel_id)
            )));
        }
        if req.payload.len() > MAX_PAYLOAD_SIZE {
            return Err(PublishError::InvalidArgument(format!(
                "payload of {} bytes exceeds the maximum of {MAX_PAYLOAD_SIZE}",
                req.payload.len()
            )));
        }
        let config = &self.shared.config;
        let ttl_s = req.ttl_s.unwrap_or(config.default_ttl_secs);
        if ttl_s > config.max_ttl_secs {
            return Err(PublishError::InvalidArgument(format!(
                "ttl_s {ttl_s} exceeds the maximum of {}",
                config.max_ttl_secs
            )));
        }
        let priority = match Priority::try_from(req.priority) {
            Ok(Priority::Normal) => WirePriority::Normal,
            Ok(Priority::High | Priority::Unspecified) => WirePriority::High,
            Err(_) => {
                return Err(PublishError::InvalidArgument(format!(
                    "unknown priority {}",
                    req.priority
                )));
            }
        };
        let channel = self
            .shared
            .registry
            .channel(&req.channel_id)
            .ok_or_else(|| PublishError::ChannelNotFound(req.channel_id.clone()))?;
        if !claims.allows(&req.channel_id, &channel.device_id) {
            return Err(PublishError::PermissionDenied(req.channel_id));
        }
        let now_ms = unix_ms();
        let id = event_id(now_ms, random10());
        tracing::Span::current().record("event", id.as_str());
        let status = match self.shared.registry.connection(&channel.device_id) {
            None => Delivery::NotConnected,
            Some(conn) => {
                let (reply, answer) = oneshot::channel();
                let wake = Wake {
                    event_id: id.clone(),
                    channel_id: req.channel_id,
                    payload: req.payload,
                    priority: priority as i32,
                    created_at_ms: now_ms,
                    ttl_s,
                };
                if conn
                    .send(Box::new(ConnCommand::Deliver { wake, reply }))
                    .await
                    .is_err()
                {
                    Delivery::NotConnected
                } else {
                    match tokio::time::timeout(config.ack_wait, answer).await {
                        Ok(Ok(d)) => d,
                        // The connection ended before handling the command.
                        Ok(Err(_)) => Delivery::NotConnected,
                        Err(_) => Delivery::SentUnacked,
                    }
                }
            }
        };
        debug!(?status, "published");
        Ok(PublishResponse {
            event_id: id,
            status: match status {
                Delivery::Delivered => DeliveryStatus::Delivered,
                Delivery::SentUnacked => DeliveryStatus::SentUnacked,
                Delivery::NotConnected => DeliveryStatus::NotConnected,
            } as i32,
        })
    }
}

#[tonic::async_trait]
impl Publisher for PublisherService {
    async fn publish(
        &self,
        request: Request<PublishRequest>,
    ) -> Result<Response<PublishResponse>, Status> {
        let span = info_span!("publish", channel = %truncate(&request.get_ref().channel_id), event = tracing::field::Empty);
        async {
            let claims = self.authenticate(request.metadata())?;
            let r = self.publish_one(&claims, request.into_inner()).await?;
            Ok(Response::new(r))
        }
        .instrument(span)
        .await
        .map_err(|e: PublishError| e.into())
    }

    async fn publish_batch(
        &self,
        request: Request<PublishBatchRequest>,
    ) -> Result<Response<PublishBatchResponse>, Status> {
        let claims = Arc::new(
            self.authenticate(request.metadata())
                .map_err(Status::from)?,
        );
        let events = request.into_inner().events;
        if events.len() > MAX_BATCH {
            return Err(PublishError::InvalidArgument(format!(
                "batch of {} events exceeds the maximum of {MAX_BATCH}",
                events.len()
            ))
            .into());
        }
        let mut tasks = tokio::task::JoinSet::new();
        for (i, ev) in events.into_iter().enumerate() {
            let this = self.clone();
            let claims = claims.clone();
            let span = info_span!("publish", batch_index = i, channel = %truncate(&ev.channel_id), event = tracing::field::Empty);
            tasks.spawn(async move { (i, this.publish_one(&claims, ev).await) }.instrument(span));
        }
        let mut results = vec![PublishBatchResult::default(); tasks.len()];
        while let Some(joined) = tasks.join_next().await {
            let (i, r) =
                joined.map_err(|e| Status::internal(format!("publish task failed: {e}")))?;
            results[i] = match r {
                Ok(resp) => PublishBatchResult {
                    response: Some(resp),
                    error_code: 0,
                    error_message: String::new(),
                },
                Err(e) => {
                    let s = Status::from(e);
                    PublishBatchResult {
                        response: None,
                        error_code: s.code() as i32,
                        error_message: s.message().to_owned(),
                    }
                }
            };
        }
        Ok(Response::new(PublishBatchResponse { results }))
    }
}

fn delivery_label(s: DeliveryStatus) -> &'static str {
    match s {
        DeliveryStatus::Delivered => "delivered",
        DeliveryStatus::SentUnacked => "sent_unacked",
        DeliveryStatus::NotConnected => "not_connected",
        DeliveryStatus::Unspecified => "unspecified",
    }
}

/// At most 64 characters of client input, for messages and logs.
fn truncate(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn random10() -> [u8; 10] {
    let mut b = [0u8; 10];
    // The system RNG failing is not recoverable; fall back to the clock so a
    // publish still gets an id (uniqueness then rests on the timestamp).
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).is_err() {
        b[..8].copy_from_slice(&unix_ms().to_le_bytes());
    }
    b
}
