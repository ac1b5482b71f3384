//! The publisher gRPC service (its errors, and their one mapping to gRPC
//! statuses, are in `publish_error.rs`).
//!
//! A publish runs in its own task: once it has started, a client that
//! disconnects or cancels cannot stop it half-way (between the commit and
//! the delivery, say). Publish answers UNAVAILABLE only when the event was
//! not stored; a client that lost its answer retries with the same
//! `idempotency_key` and gets the first event's id back.

use std::pin::Pin;
use std::sync::Arc;

use metrics::{counter, histogram};
use tokio::sync::oneshot;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use tracing::{debug, info_span, Instrument};
use wakewire_api::pb::{
    publisher_server::Publisher, DeliveryStatus, EventState, EventStatus, GetEventRequest,
    Priority, PublishBatchRequest, PublishBatchResponse, PublishRequest, PublishResponse,
    WatchDeliveriesRequest,
};
use wakewire_proto::ids::{event_id, is_channel_id};
use wakewire_proto::pb::device::{Priority as WirePriority, Wake};
use wakewire_proto::token::{Claims, TokenError};
use wakewire_proto::MAX_PAYLOAD_SIZE;

use crate::auth::Authed;
use crate::metrics as m;
use crate::pb::StoredEvent;
pub(crate) use crate::publish_error::result_of;
pub use crate::publish_error::PublishError;
use crate::quota::RetryAfter;
use crate::registry::{ConnCommand, Delivery};
use crate::state::{clock, Shared};
use crate::store::{Duplicate, Enqueued, IdempotencyKey};

/// Most events in one `PublishBatch`.
pub const MAX_BATCH: usize = 1000;
/// Longest collapse key, in bytes.
pub const MAX_COLLAPSE_KEY: usize = 64;
/// Longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY: usize = 128;

/// Implements `wakewire.publish.v1.Publisher`. Requests reach it through
/// the authentication interceptor ([`crate::auth`]).
#[derive(Debug, Clone)]
pub struct PublisherService {
    pub(crate) shared: Arc<Shared>,
}

impl PublisherService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// The publisher of a request (set by the interceptor) after its rate
    /// check for `cost` publishes.
    #[allow(clippy::result_large_err)]
    fn admit<T>(&self, req: &Request<T>, cost: u32) -> Result<Authed, PublishError> {
        let a = req
            .extensions()
            .get::<Authed>()
            .cloned()
            .ok_or(PublishError::MissingCredential)?;
        self.charge(&a.claims, cost)?;
        Ok(a)
    }

    /// Takes `cost` publishes from the publisher's rate quota.
    pub(crate) fn charge(&self, claims: &Claims, cost: u32) -> Result<(), PublishError> {
        if cost > 0 {
            if let Err(RetryAfter(wait)) =
                self.shared
                    .quotas
                    .take(&quota_key(claims), cost, clock::now())
            {
                counter!(m::THROTTLED, "limit" => "rate").increment(1);
                return Err(PublishError::RateLimited(wait));
            }
        }
        Ok(())
    }

    /// Whether a credential checked when a stream opened is still good:
    /// not expired, not revoked since.
    pub(crate) fn still_valid(&self, claims: &Claims) -> Result<(), PublishError> {
        let now = clock::unix_secs();
        if claims.exp <= now {
            return Err(PublishError::BadCredential(TokenError::Expired {
                exp: claims.exp,
                now,
            }));
        }
        self.shared.check_revoked(claims)
    }

    /// Publishes in a task of its own, so that a cancelled request cannot
    /// stop it half-way.
    async fn publish_one(
        &self,
        claims: Arc<Claims>,
        req: PublishRequest,
        span: tracing::Span,
    ) -> Result<PublishResponse, PublishError> {
        let task = tokio::spawn(self.clone().publish_counted(claims, req).instrument(span));
        task.await
            .map_err(|e| PublishError::Internal(format!("publish task failed: {e}")))?
    }

    /// One publish with its metrics (run in a task of its own).
    pub(crate) async fn publish_counted(
        self,
        claims: Arc<Claims>,
        req: PublishRequest,
    ) -> Result<PublishResponse, PublishError> {
        let started = clock::now();
        let result = self.publish_checked(&claims, req).await;
        let status = match &result {
            Ok(r) => delivery_label(r.status()),
            Err(e) => e.label(),
        };
        counter!(m::PUBLISHES, "status" => status).increment(1);
        histogram!(m::PUBLISH_SECONDS).record(
            clock::now()
                .saturating_duration_since(started)
                .as_secs_f64(),
        );
        result
    }

    async fn publish_checked(
        &self,
        claims: &Claims,
        req: PublishRequest,
    ) -> Result<PublishResponse, PublishError> {
        let config = &self.shared.config;
        if !is_channel_id(&req.channel_id) {
            return Err(invalid(format!(
                "channel_id {:?} is not a channel id (22 base64url characters)",
                truncate(&req.channel_id)
            )));
        }
        if req.payload.len() > MAX_PAYLOAD_SIZE {
            return Err(invalid(format!(
                "payload of {} bytes exceeds the maximum of {MAX_PAYLOAD_SIZE}",
                req.payload.len()
            )));
        }
        if req.collapse_key.len() > MAX_COLLAPSE_KEY {
            return Err(invalid(format!(
                "collapse_key of {} bytes exceeds the maximum of {MAX_COLLAPSE_KEY}",
                req.collapse_key.len()
            )));
        }
        if req.idempotency_key.len() > MAX_IDEMPOTENCY_KEY {
            return Err(invalid(format!(
                "idempotency_key of {} bytes exceeds the maximum of {MAX_IDEMPOTENCY_KEY}",
                req.idempotency_key.len()
            )));
        }
        let ttl_s = req.ttl_s.unwrap_or(config.default_ttl_secs);
        if ttl_s > config.max_ttl_secs {
            return Err(invalid(format!(
                "ttl_s {ttl_s} exceeds the maximum of {}",
                config.max_ttl_secs
            )));
        }
        let priority = match Priority::try_from(req.priority) {
            Ok(Priority::Normal) => WirePriority::Normal,
            Ok(Priority::High | Priority::Unspecified) => WirePriority::High,
            Err(_) => return Err(invalid(format!("unknown priority {}", req.priority))),
        };
        let channel = match self.shared.registry.channel(&req.channel_id) {
            Some(c) => c,
            None => match self.channel_elsewhere(&req.channel_id).await? {
                Some(c) => c,
                None => {
                    return Err(match self.shared.registry.gone_reason(&req.channel_id) {
                        Some(reason) => PublishError::ChannelGone {
                            channel: req.channel_id,
                            reason,
                        },
                        None => PublishError::ChannelNotFound(req.channel_id),
                    })
                }
            },
        };
        if !claims.allows(&req.channel_id, &channel.device_id) {
            return Err(PublishError::PermissionDenied(req.channel_id));
        }
        let idempotency = (!req.idempotency_key.is_empty()).then(|| IdempotencyKey {
            scoped_key: format!("{}:{}", scope_of(claims), req.idempotency_key),
            request_hash: request_hash(&req, ttl_s),
        });
        if let Some(cluster) = self.shared.cluster.clone() {
            let stored = StoredEvent {
                channel_id: req.channel_id,
                payload: req.payload,
                priority: priority as i32,
                ttl_s,
                collapse_key: req.collapse_key,
                publisher: quota_key(claims),
                ..Default::default()
            };
            return self
                .publish_in_cluster(&cluster, &channel.device_id, stored, idempotency)
                .await;
        }
        let now_ms = clock::unix_ms();
        let id = event_id(now_ms, random10());
        tracing::Span::current().record("event", id.as_str());
        let wake = Wake {
            event_id: id.clone(),
            channel_id: req.channel_id.clone(),
            payload: req.payload.clone(),
            priority: priority as i32,
            created_at_ms: now_ms,
            ttl_s,
        };
        let device = channel.device_id.clone();
        let status = if ttl_s == 0 {
            // Deliver now or drop (like APNs expiration 0): never stored.
            if let Some(key) = &idempotency {
                let reserved = self
                    .shared
                    .store
                    .reserve_key(key.clone(), id.clone(), now_ms)
                    .await
                    .map_err(|source| PublishError::NotStored {
                        source,
                        event_id: None,
                    })?;
                if let Some(dup) = reserved {
                    return duplicate_answer(dup);
                }
            }
            let status = match self.deliver(&device, wake, false, false).await {
                Some(Delivery::Delivered) => DeliveryStatus::Delivered,
                Some(Delivery::NotSent) => DeliveryStatus::NotConnected,
                None => DeliveryStatus::SentUnacked,
            };
            if let Some(key) = idempotency {
                if let Err(e) = self
                    .shared
                    .store
                    .settle_key(key.scoped_key, status as i32)
                    .await
                {
                    debug!(error = %e, "idempotency answer not recorded");
                }
            }
            status
        } else {
            let stored = StoredEvent {
                event_id: id.clone(),
                channel_id: req.channel_id,
                payload: req.payload,
                priority: priority as i32,
                created_at_ms: now_ms,
                ttl_s,
                collapse_key: req.collapse_key,
                publisher: quota_key(claims),
                ..Default::default()
            };
            // Cheap check before anything goes to the device; the store's
            // writer checks again where it counts.
            let stored_bytes = self.shared.store.publisher_bytes(&stored.publisher);
            let limit = self.shared.config.quotas.max_stored_bytes;
            if stored_bytes
                .saturating_add((stored.payload.len() + stored.collapse_key.len()) as u64)
                > limit
            {
                return Err(over_quota(stored_bytes, limit));
            }
            let keyed = idempotency.is_some();
            // Submitted before the wake goes to the connection: a queue read
            // that follows the delivery attempt sees this event.
            let pending = self
                .shared
                .store
                .begin_enqueue(stored, idempotency)
                .await
                .map_err(|source| PublishError::NotStored {
                    source,
                    event_id: None,
                })?;
            if keyed {
                // A retry must not reach the device twice: deliver only once
                // the key is known to be new.
                match pending.enqueued().await {
                    Ok(Enqueued::Duplicate(dup)) => return duplicate_answer(dup),
                    Ok(Enqueued::OverQuota { stored, limit }) => {
                        return Err(over_quota(stored, limit))
                    }
                    Ok(Enqueued::Stored { .. }) => {}
                    Err(source) => {
                        return Err(PublishError::NotStored {
                            source,
                            event_id: None,
                        })
                    }
                }
                match self.deliver(&device, wake, true, true).await {
                    Some(Delivery::Delivered) => DeliveryStatus::Delivered,
                    _ => DeliveryStatus::Queued,
                }
            } else {
                // Commit and deliver at the same time: answered only after
                // the commit, but the device does not wait for the disk.
                let (stored, delivered) =
                    tokio::join!(pending.enqueued(), self.deliver(&device, wake, true, true));
                match (stored, delivered) {
                    // Over quota (a race with the check above): not stored,
                    // but the device has it and its app ran.
                    (Ok(Enqueued::OverQuota { .. }), Some(Delivery::Delivered)) => {
                        DeliveryStatus::Delivered
                    }
                    (Ok(Enqueued::OverQuota { stored, limit }), _) => {
                        return Err(over_quota(stored, limit))
                    }
                    (Ok(_), Some(Delivery::Delivered)) => DeliveryStatus::Delivered,
                    (Ok(_), _) => DeliveryStatus::Queued,
                    // Not stored, but the device has it and its app ran.
                    (Err(_), Some(Delivery::Delivered)) => DeliveryStatus::Delivered,
                    (Err(source), delivered) => {
                        return Err(PublishError::NotStored {
                            source,
                            event_id: (delivered.is_none()).then_some(id),
                        })
                    }
                }
            }
        };
        if status == DeliveryStatus::Queued {
            counter!(m::QUEUED).increment(1);
        }
        debug!(?status, "published");
        Ok(PublishResponse {
            event_id: id,
            status: status as i32,
            duplicate: false,
        })
    }

    /// Hands a wake to the device's connection (if connected) and waits up
    /// to `ack_wait` for its ack. `None`: no answer in time.
    async fn deliver(
        &self,
        device: &str,
        wake: Wake,
        durable: bool,
        claim: bool,
    ) -> Option<Delivery> {
        let Some(conn) = self.shared.registry.connection(device) else {
            return Some(Delivery::NotSent);
        };
        let (reply, answer) = oneshot::channel();
        let cmd = Box::new(ConnCommand::Deliver {
            claim: claim.then(|| self.shared.store.claims().claim(&wake.event_id)),
            wake,
            durable,
            reply: Some(reply),
            stored: None,
        });
        if let Err(back) = conn.send(cmd).await {
            // That connection just ended: its successor, if any, takes it.
            let next = self.shared.registry.connection(device)?;
            next.send(back.0).await.ok()?;
        }
        match tokio::time::timeout(self.shared.config.ack_wait, answer).await {
            Ok(Ok(d)) => Some(d),
            // The connection ended without answering: handed over or queued.
            Ok(Err(_)) => Some(Delivery::NotSent),
            Err(_) => None,
        }
    }

    async fn event_status(
        &self,
        claims: &Claims,
        event_id: &str,
    ) -> Result<EventStatus, PublishError> {
        if event_id.len() != wakewire_proto::ids::EVENT_ID_LEN
            || !event_id.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(invalid(format!(
                "event_id {:?} is not an event id (32 hex characters)",
                truncate(event_id)
            )));
        }
        let not_found = || PublishError::EventNotFound(event_id.to_owned());
        let ev = match &self.shared.cluster {
            Some(cluster) => cluster
                .event(event_id)
                .await
                .map_err(PublishError::ClusterRead)?,
            None => self
                .shared
                .store
                .event(event_id)
                .await
                .map_err(PublishError::StoreRead)?,
        }
        .ok_or_else(not_found)?;
        // Another publisher's event does not exist as far as this one knows.
        if !self.may_see(claims, &ev) {
            return Err(not_found());
        }
        Ok(status_of(&ev))
    }

    pub(crate) fn may_see(&self, claims: &Claims, ev: &StoredEvent) -> bool {
        let device = self
            .shared
            .registry
            .owner(&ev.channel_id)
            .map(|d| d.to_string())
            .unwrap_or_default();
        claims.allows(&ev.channel_id, &device)
    }
}

fn over_quota(stored: u64, limit: u64) -> PublishError {
    counter!(m::THROTTLED, "limit" => "stored_bytes").increment(1);
    PublishError::StorageQuota { stored, limit }
}

fn invalid(message: String) -> PublishError {
    PublishError::InvalidArgument(message)
}

/// The answer to a retried Publish.
pub(crate) fn duplicate_answer(dup: Duplicate) -> Result<PublishResponse, PublishError> {
    let (event_id, status) = match dup {
        Duplicate::Mismatch => {
            return Err(invalid(
                "idempotency_key was already used for a different request".into(),
            ))
        }
        Duplicate::Stored(ev) => {
            let status = match EventState::try_from(ev.state).unwrap_or(EventState::Unspecified) {
                EventState::Delivered => DeliveryStatus::Delivered,
                EventState::Expired => DeliveryStatus::Expired,
                EventState::Dropped => DeliveryStatus::Dropped,
                EventState::Queued | EventState::Unspecified => DeliveryStatus::Queued,
            };
            (ev.event_id, status)
        }
        Duplicate::NotStored(rec) => {
            let status = DeliveryStatus::try_from(rec.status)
                .ok()
                .filter(|s| *s != DeliveryStatus::Unspecified)
                .unwrap_or(DeliveryStatus::SentUnacked);
            (rec.event_id, status)
        }
        Duplicate::Forgotten(id) => (id, DeliveryStatus::Unspecified),
    };
    counter!(m::PUBLISHES, "status" => "duplicate").increment(1);
    Ok(PublishResponse {
        event_id,
        status: status as i32,
        duplicate: true,
    })
}

/// The key of a publisher's rate limits and quotas: its token id, or (for
/// tokens without one) its scope.
pub(crate) fn quota_key(claims: &Claims) -> String {
    match &claims.jti {
        Some(jti) => format!("jti:{jti}"),
        None => format!("scope:{}", scope_of(claims)),
    }
}

/// A publisher's idempotency namespace: a digest of its token's scope.
pub(crate) fn scope_of(claims: &Claims) -> String {
    let mut channels = claims.channels.clone();
    let mut devices = claims.devices.clone();
    channels.sort_unstable();
    devices.sort_unstable();
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for c in &channels {
        ctx.update(b"c");
        ctx.update(c.as_bytes());
        ctx.update(&[0]);
    }
    for d in &devices {
        ctx.update(b"d");
        ctx.update(d.as_bytes());
        ctx.update(&[0]);
    }
    hex(&ctx.finish().as_ref()[..16])
}

/// Digest of what a Publish asks for, to tell a retry from a reuse.
fn request_hash(req: &PublishRequest, ttl_s: u32) -> Vec<u8> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [
        req.channel_id.as_bytes(),
        &req.payload,
        &req.priority.to_le_bytes(),
        &ttl_s.to_le_bytes(),
        req.collapse_key.as_bytes(),
    ] {
        ctx.update(&(part.len() as u64).to_le_bytes());
        ctx.update(part);
    }
    ctx.finish().as_ref().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The API view of a stored event.
pub(crate) fn status_of(ev: &StoredEvent) -> EventStatus {
    EventStatus {
        event_id: ev.event_id.clone(),
        channel_id: ev.channel_id.clone(),
        state: ev.state,
        created_at_ms: ev.created_at_ms,
        updated_at_ms: ev.updated_at_ms,
        reason: ev.reason.clone(),
        replaced_by: ev.replaced_by.clone(),
    }
}

/// Receipts stream of WatchDeliveries (the item type is fixed by tonic).
pub type ReceiptStream = Pin<Box<dyn Stream<Item = Result<EventStatus, Status>> + Send>>;

#[tonic::async_trait]
impl Publisher for PublisherService {
    type WatchDeliveriesStream = ReceiptStream;
    type PublishStreamStream = crate::publish_stream::AnswerStream;

    async fn publish_stream(
        &self,
        request: Request<tonic::Streaming<wakewire_api::pb::PublishStreamRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        // Authenticated once, on the stream's headers; each event is then
        // charged to the rate quota and the credential checked again.
        let a = self.admit(&request, 0)?;
        Ok(Response::new(crate::publish_stream::serve(
            self.clone(),
            a,
            request.into_inner(),
        )))
    }

    async fn get_event(
        &self,
        request: Request<GetEventRequest>,
    ) -> Result<Response<EventStatus>, Status> {
        let a = self.admit(&request, 1)?;
        Ok(Response::new(
            self.event_status(&a.claims, &request.get_ref().event_id)
                .await?,
        ))
    }

    #[allow(clippy::result_large_err)] // tonic's stream item is Result<_, Status>
    async fn watch_deliveries(
        &self,
        request: Request<WatchDeliveriesRequest>,
    ) -> Result<Response<Self::WatchDeliveriesStream>, Status> {
        let a = self.admit(&request, 0)?;
        let claims = a.claims.clone();
        let guard = self
            .shared
            .quotas
            .watch(&quota_key(&claims), clock::now())
            .ok_or_else(|| {
                counter!(m::THROTTLED, "limit" => "watchers").increment(1);
                PublishError::TooManyWatchers(self.shared.quotas.config().max_watchers)
            })?;
        let this = self.clone();
        if let Some(cluster) = &self.shared.cluster {
            let receipts = cluster
                .watch(&quota_key(&claims))
                .await
                .map_err(PublishError::ClusterRead)?;
            let stream = receipts.filter_map(move |m| {
                let _slot = &guard;
                let ev = <StoredEvent as prost::Message>::decode(m.payload.as_ref()).ok()?;
                this.may_see(&claims, &ev).then(|| Ok(status_of(&ev)))
            });
            return Ok(Response::new(Box::pin(stream)));
        }
        let stream = BroadcastStream::new(self.shared.store.receipts()).filter_map(move |r| {
            // The stream owns its watcher slot.
            let _slot = &guard;
            match r {
                Ok((ev, _why)) => this.may_see(&claims, &ev).then(|| Ok(status_of(&ev))),
                Err(BroadcastStreamRecvError::Lagged(n)) => Some(Err(Status::data_loss(format!(
                    "{n} receipts were skipped because this watcher fell behind; use GetEvent for the events you track"
                )))),
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn publish(
        &self,
        request: Request<PublishRequest>,
    ) -> Result<Response<PublishResponse>, Status> {
        let span = info_span!("publish", channel = %truncate(&request.get_ref().channel_id), event = tracing::field::Empty);
        let a = self.admit(&request, 1)?;
        let r = self
            .publish_one(a.claims.clone(), request.into_inner(), span)
            .await?;
        drop(a);
        Ok(Response::new(r))
    }

    async fn publish_batch(
        &self,
        request: Request<PublishBatchRequest>,
    ) -> Result<Response<PublishBatchResponse>, Status> {
        let n = request.get_ref().events.len();
        if n > MAX_BATCH {
            return Err(invalid(format!(
                "batch of {n} events exceeds the maximum of {MAX_BATCH}"
            ))
            .into());
        }
        let a = self.admit(&request, u32::try_from(n).unwrap_or(u32::MAX))?;
        let events = request.into_inner().events;
        // Each event runs in its own task (see publish_one): detached, so a
        // cancelled batch still finishes what it started.
        let tasks: Vec<_> = events
            .into_iter()
            .enumerate()
            .map(|(i, ev)| {
                let this = self.clone();
                let claims = a.claims.clone();
                let span = info_span!("publish", batch_index = i, channel = %truncate(&ev.channel_id), event = tracing::field::Empty);
                tokio::spawn(async move { this.publish_one(claims, ev, span).await })
            })
            .collect();
        let mut results = Vec::with_capacity(tasks.len());
        for task in tasks {
            let r = task.await.unwrap_or_else(|e| {
                Err(PublishError::Internal(format!("publish task failed: {e}")))
            });
            results.push(result_of(r));
        }
        drop(a);
        Ok(Response::new(PublishBatchResponse { results }))
    }
}

pub(crate) fn delivery_label(s: DeliveryStatus) -> &'static str {
    match s {
        DeliveryStatus::Delivered => "delivered",
        DeliveryStatus::SentUnacked => "sent_unacked",
        DeliveryStatus::NotConnected => "not_connected",
        DeliveryStatus::Queued => "queued",
        DeliveryStatus::Expired => "expired",
        DeliveryStatus::Dropped => "dropped",
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
        b[..8].copy_from_slice(&clock::unix_ms().to_le_bytes());
    }
    b
}
