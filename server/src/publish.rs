//! The publisher gRPC service, and the one place where publish errors map
//! to gRPC statuses.

use std::sync::Arc;

use dashmap::DashMap;
use std::time::Instant;

use metrics::{counter, histogram};
use std::pin::Pin;
use thiserror::Error;
use tokio::sync::oneshot;
use tonic::{metadata::MetadataMap, Code, Request, Response, Status};
use tracing::{debug, info_span, Instrument};
use wakewire_proto::ids::{event_id, is_channel_id};
use wakewire_proto::pb::device::{Priority as WirePriority, Wake};

use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::{Stream, StreamExt};
use wakewire_proto::pb::publish::{
    publisher_server::Publisher, DeliveryStatus, EventStatus, GetEventRequest, Priority,
    PublishBatchRequest, PublishBatchResponse, PublishBatchResult, PublishRequest, PublishResponse,
    WatchDeliveriesRequest,
};
use wakewire_proto::pb::store::StoredEvent;
use wakewire_proto::token::{Claims, TokenError, TokenKind};
use wakewire_proto::MAX_PAYLOAD_SIZE;

use crate::metrics as m;
use crate::registry::{ConnCommand, Delivery};
use crate::relay::{unix_ms, unix_secs, Shared};
use crate::store::StoreError;

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
    /// No event with this id (never accepted, or past its retention).
    #[error("event {0} not found (unknown, or finished longer ago than the status retention)")]
    EventNotFound(String),
    /// The store failed; the event was not accepted. Retrying may help.
    #[error("{0}; the event was not accepted, retry later")]
    Store(#[from] StoreError),
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
            PublishError::ChannelNotFound(_)
            | PublishError::ChannelGone { .. }
            | PublishError::EventNotFound(_) => Code::NotFound,
            PublishError::Store(_) => Code::Unavailable,
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
            Code::Unavailable => "unavailable",
            _ => "other",
        }
    }
}

impl From<PublishError> for Status {
    fn from(e: PublishError) -> Self {
        Status::new(e.code(), e.to_string())
    }
}

/// Most publisher tokens whose verification is remembered.
const TOKEN_CACHE: usize = 4096;

/// Implements `wakewire.publish.v1.Publisher`.
#[derive(Debug, Clone)]
pub struct PublisherService {
    shared: Arc<Shared>,
    /// Publisher tokens already verified: a backend sends the same token
    /// with every request, and an Ed25519 verification costs more than the
    /// rest of a publish. The signature binds the claims to the exact token
    /// text, so a hit needs only the expiry checked again.
    verified: Arc<DashMap<String, Arc<Claims>>>,
}

impl PublisherService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            verified: Arc::default(),
        }
    }

    fn authenticate(&self, md: &MetadataMap) -> Result<Arc<Claims>, PublishError> {
        let value = md
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .ok_or(PublishError::MissingCredential)?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or(PublishError::MissingCredential)?
            .trim();
        let now = unix_secs();
        if let Some(claims) = self.verified.get(token) {
            if claims.exp > now {
                return Ok(claims.clone());
            }
        }
        let claims = Arc::new(self.shared.keys.verifier.verify(
            token,
            TokenKind::Publisher,
            now,
        )?);
        if self.verified.len() >= TOKEN_CACHE {
            self.verified.clear();
        }
        self.verified.insert(token.to_owned(), claims.clone());
        Ok(claims)
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
        let Some(channel) = self.shared.registry.channel(&req.channel_id) else {
            return Err(match self.shared.registry.gone_reason(&req.channel_id) {
                Some(reason) => PublishError::ChannelGone {
                    channel: req.channel_id,
                    reason,
                },
                None => PublishError::ChannelNotFound(req.channel_id),
            });
        };
        if !claims.allows(&req.channel_id, &channel.device_id) {
            return Err(PublishError::PermissionDenied(req.channel_id));
        }
        let now_ms = unix_ms();
        let id = event_id(now_ms, random10());
        tracing::Span::current().record("event", id.as_str());
        let wake = Wake {
            event_id: id.clone(),
            channel_id: req.channel_id,
            payload: req.payload,
            priority: priority as i32,
            created_at_ms: now_ms,
            ttl_s,
        };
        let connection = self.shared.registry.connection(&channel.device_id);
        let status = if ttl_s == 0 {
            // Deliver now or drop (like APNs expiration 0): never stored.
            match connection {
                None => DeliveryStatus::NotConnected,
                Some(conn) => match self.send_and_wait(&conn, wake).await {
                    Some(Delivery::Delivered) => DeliveryStatus::Delivered,
                    Some(Delivery::SentUnacked) | None => DeliveryStatus::SentUnacked,
                    Some(Delivery::NotConnected) => DeliveryStatus::NotConnected,
                },
            }
        } else {
            let stored = StoredEvent {
                event_id: id.clone(),
                channel_id: wake.channel_id.clone(),
                payload: wake.payload.clone(),
                priority: wake.priority,
                created_at_ms: now_ms,
                ttl_s,
                collapse_key: req.collapse_key,
                ..Default::default()
            };
            // Commit and deliver at the same time: the publisher is answered
            // only after the commit (an accepted event is durable), but the
            // device does not wait for the disk. The ack, if it comes, is
            // recorded after the enqueue (one writer, in order).
            let (stored, delivered) = match connection {
                None => (self.shared.store.enqueue(stored).await, None),
                Some(conn) => {
                    let (s, d) = tokio::join!(
                        self.shared.store.enqueue(stored),
                        self.send_and_wait(&conn, wake)
                    );
                    (s, d)
                }
            };
            let outcome = stored?;
            counter!(m::QUEUED).increment(1);
            for ev in &outcome.finished {
                counter!(m::DROPPED, "reason" => dropped_label(&ev.reason)).increment(1);
            }
            match delivered {
                Some(Delivery::Delivered) => DeliveryStatus::Delivered,
                _ => DeliveryStatus::Queued,
            }
        };
        debug!(?status, "published");
        Ok(PublishResponse {
            event_id: id,
            status: status as i32,
        })
    }

    /// Hands a wake to the device's connection and waits (up to `ack_wait`)
    /// for its ack. `None`: no answer in time, or the connection ended.
    async fn send_and_wait(
        &self,
        conn: &crate::registry::ConnSender,
        wake: Wake,
    ) -> Option<Delivery> {
        let (reply, answer) = oneshot::channel();
        conn.send(Box::new(ConnCommand::Deliver {
            wake,
            reply: Some(reply),
        }))
        .await
        .ok()?;
        tokio::time::timeout(self.shared.config.ack_wait, answer)
            .await
            .ok()?
            .ok()
    }

    fn event_status(&self, claims: &Claims, event_id: &str) -> Result<EventStatus, PublishError> {
        if event_id.len() != wakewire_proto::ids::EVENT_ID_LEN
            || !event_id.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(PublishError::InvalidArgument(format!(
                "event_id {:?} is not an event id (32 hex characters)",
                truncate(event_id)
            )));
        }
        let ev = self
            .shared
            .store
            .event(event_id)?
            .ok_or_else(|| PublishError::EventNotFound(event_id.to_owned()))?;
        if !self.may_see(claims, &ev) {
            return Err(PublishError::PermissionDenied(ev.channel_id));
        }
        Ok(status_of(ev))
    }

    fn may_see(&self, claims: &Claims, ev: &StoredEvent) -> bool {
        let device = match self.shared.registry.channel(&ev.channel_id) {
            Some(c) => c.device_id.to_string(),
            // A gone channel: its device is still on record in the store.
            None => self
                .shared
                .store
                .channel(&ev.channel_id)
                .ok()
                .flatten()
                .map(|c| c.device_id)
                .unwrap_or_default(),
        };
        claims.allows(&ev.channel_id, &device)
    }
}

/// The API view of a stored event.
fn status_of(ev: StoredEvent) -> EventStatus {
    EventStatus {
        event_id: ev.event_id,
        channel_id: ev.channel_id,
        state: ev.state,
        created_at_ms: ev.created_at_ms,
        updated_at_ms: ev.updated_at_ms,
        reason: ev.reason,
        replaced_by: ev.replaced_by,
    }
}

fn dropped_label(reason: &str) -> &'static str {
    match reason {
        "queue_full" => "queue_full",
        "collapsed" => "collapsed",
        "channel_gone" => "channel_gone",
        _ => "other",
    }
}

/// Receipts stream of WatchDeliveries (the item type is fixed by tonic).
pub type ReceiptStream = Pin<Box<dyn Stream<Item = Result<EventStatus, Status>> + Send>>;

#[tonic::async_trait]
impl Publisher for PublisherService {
    type WatchDeliveriesStream = ReceiptStream;

    async fn get_event(
        &self,
        request: Request<GetEventRequest>,
    ) -> Result<Response<EventStatus>, Status> {
        let claims = self.authenticate(request.metadata())?;
        Ok(Response::new(
            self.event_status(&claims, &request.get_ref().event_id)?,
        ))
    }

    #[allow(clippy::result_large_err)] // tonic's stream item is Result<_, Status>
    async fn watch_deliveries(
        &self,
        request: Request<WatchDeliveriesRequest>,
    ) -> Result<Response<Self::WatchDeliveriesStream>, Status> {
        let claims = self.authenticate(request.metadata())?;
        let this = self.clone();
        let stream = BroadcastStream::new(self.shared.store.receipts()).filter_map(move |r| match r {
            Ok(ev) => this.may_see(&claims, &ev).then(|| Ok(status_of(ev))),
            Err(BroadcastStreamRecvError::Lagged(n)) => Some(Err(Status::data_loss(format!(
                "{n} receipts were skipped because this watcher fell behind; use GetEvent for the events you track"
            )))),
        });
        Ok(Response::new(Box::pin(stream)))
    }

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
        let claims = self
            .authenticate(request.metadata())
            .map_err(Status::from)?;
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
        DeliveryStatus::Queued => "queued",
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
