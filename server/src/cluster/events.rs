//! The publisher side of a cluster relay: stores events in JetStream
//! (driving [`EnqueuePlan`]), writes receipts, answers GetEvent, asks the
//! relay holding a device (presence, deliver-now-or-never), and keeps the
//! channel bucket.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::HeaderMap;
use prost::Message as _;
use tokio_stream::StreamExt;
use tracing::debug;

use super::core::{
    receipt_write, EnqueueAction, EnqueueDone, EnqueuePlan, Located, PublishOutcome, ReceiptWrite,
};
use super::naming::{devkey_of, hex, DEVICE_HEADER, REQUEST_HEADER};
use super::{nats_err, Cluster, ClusterError};
use crate::metrics as m;
use crate::pb::{live_request, LiveReply, LiveRequest, StoredChannel, StoredEvent};
use crate::registry::Registry;
use crate::store::FinishReason;

/// JetStream: the store refused the message (10077, "stream store
/// failed"); with the description below, because the subject is full.
const STORE_FAILED: u64 = 10077;
const SUBJECT_FULL_TEXT: &str = "maximum messages per subject exceeded";
/// JetStream: no message at that sequence.
const NO_MESSAGE_FOUND: u64 = 10037;
/// Most messages a status lookup reads from one device's queue.
const MAX_SCAN: usize = 20_000;

/// Where an accepted event now is.
#[derive(Debug)]
pub enum StoredIn {
    /// Written (replicated) at this sequence of the events stream.
    Stream(u64),
    /// The idempotency key was used before: the first event, as it is now
    /// (`None`: past every retention).
    Duplicate(Option<Box<StoredEvent>>),
}

/// The answer of the relay holding a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiveOutcome {
    /// Delivered and acked (or, for presence: connected there).
    Delivered,
    /// No relay holds the device, or its connection did not take the wake.
    NotSent,
    /// Sent, no ack in time.
    SentUnacked,
}

impl LiveOutcome {
    pub(crate) fn code(self) -> i32 {
        match self {
            LiveOutcome::Delivered => 1,
            LiveOutcome::NotSent => 2,
            LiveOutcome::SentUnacked => 3,
        }
    }

    fn from_code(c: i32) -> Self {
        match c {
            1 => LiveOutcome::Delivered,
            3 => LiveOutcome::SentUnacked,
            _ => LiveOutcome::NotSent,
        }
    }
}

/// Whether a publish was refused because its subject holds
/// `max_messages_per_subject` messages (and not for another store failure,
/// such as a full disk, which shares the code).
fn subject_full(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(js) = err.downcast_ref::<async_nats::jetstream::Error>() {
            return js.error_code().0 == STORE_FAILED && js.to_string().contains(SUBJECT_FULL_TEXT);
        }
        cur = err.source();
    }
    false
}

impl Cluster {
    /// Stores `event` for the device `device_id` (its channel queue, or its
    /// collapse key), dropping the oldest queued event of a full queue; with
    /// `keyed = Some(msg_id)`, once per message id within the deduplication
    /// window. Returns where it is and the events it made final (to be
    /// given receipts by the caller, [`Cluster::finish_displaced`]).
    pub async fn enqueue(
        &self,
        event: &StoredEvent,
        device_id: &str,
        keyed: Option<String>,
    ) -> Result<(StoredIn, Vec<(StoredEvent, FinishReason)>), ClusterError> {
        let devkey = self.names.devkey(device_id);
        let subject = if event.collapse_key.is_empty() {
            self.names.queue_subject(&devkey, &event.channel_id)
        } else {
            self.names
                .collapse_subject(&devkey, &event.channel_id, &event.collapse_key)
        };
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err(ClusterError::Disconnected);
        }
        let payload: bytes::Bytes = event.encode_to_vec().into();
        let mut plan = EnqueuePlan::new(&event.event_id, !event.collapse_key.is_empty());
        // Events read on the way (collapsed, dropped), for their receipts.
        let mut read: HashMap<u64, StoredEvent> = HashMap::new();
        let mut keep = |ev: StoredEvent| {
            let l = Located {
                seq: ev.seq,
                event_id: ev.event_id.clone(),
            };
            read.insert(ev.seq, ev);
            l
        };
        let mut action = plan.start();
        loop {
            action = match action {
                EnqueueAction::ReadCollapsed => {
                    let last = self.last_on(&subject).await?.map(&mut keep);
                    plan.handle_collapse_read(last)
                }
                EnqueueAction::Publish { expected_last } => {
                    let mut headers = HeaderMap::new();
                    headers.insert(DEVICE_HEADER, self.names.device_hash(device_id).as_str());
                    if let Some(id) = &keyed {
                        headers.insert("Nats-Msg-Id", id.as_str());
                        headers.insert(REQUEST_HEADER, hex(&event.request_hash).as_str());
                    }
                    if let Some(seq) = expected_last {
                        headers.insert(
                            "Nats-Expected-Last-Subject-Sequence",
                            seq.to_string().as_str(),
                        );
                        headers.insert("Nats-Rollup", "sub");
                    }
                    let outcome = self.write(&subject, headers, payload.clone()).await?;
                    match plan.handle_published(outcome) {
                        Some(next) => next,
                        None => break,
                    }
                }
                EnqueueAction::DropOldest => {
                    let dropped = self.drop_oldest(&subject).await?.map(&mut keep);
                    plan.handle_dropped(dropped)
                }
            };
        }
        let records =
            |displaced: Vec<(Located, FinishReason)>| -> Vec<(StoredEvent, FinishReason)> {
                displaced
                    .into_iter()
                    .filter_map(|(l, why)| read.get(&l.seq).cloned().map(|ev| (ev, why)))
                    .collect()
            };
        match plan.poll_done() {
            Some(EnqueueDone::Stored { seq, displaced }) => {
                Ok((StoredIn::Stream(seq), records(displaced)))
            }
            Some(EnqueueDone::Duplicate { displaced }) => {
                let displaced = records(displaced);
                let first = self.event(&event.event_id).await?.map(Box::new);
                Ok((StoredIn::Duplicate(first), displaced))
            }
            Some(EnqueueDone::Contended) | None => Err(ClusterError::Contended),
        }
    }

    async fn write(
        &self,
        subject: &str,
        headers: HeaderMap,
        payload: bytes::Bytes,
    ) -> Result<PublishOutcome, ClusterError> {
        timed("publish", async {
            let ack = self
                .js
                .publish_with_headers(subject.to_owned(), headers, payload)
                .await
                .map_err(nats_err)?
                .await;
            match ack {
                Ok(a) if a.duplicate => Ok(PublishOutcome::Duplicate),
                Ok(a) => Ok(PublishOutcome::Stored { seq: a.sequence }),
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                    Ok(PublishOutcome::WrongLastSequence)
                }
                Err(e) if subject_full(&e) => Ok(PublishOutcome::SubjectFull),
                Err(e) if e.kind() == PublishErrorKind::TimedOut => Err(ClusterError::Unconfirmed),
                Err(e) => Err(nats_err(e)),
            }
        })
        .await
    }

    /// The last event on `subject` (`seq` set), if any.
    async fn last_on(&self, subject: &str) -> Result<Option<StoredEvent>, ClusterError> {
        match timed("read", self.events.get_last_raw_message_by_subject(subject)).await {
            Ok(m) => {
                let mut ev = decode_event(&m.payload)?;
                ev.seq = m.sequence;
                Ok(Some(ev))
            }
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(nats_err(e)),
        }
    }

    /// The first event on `filter` at or after stream sequence `seq`.
    async fn next_on(
        &self,
        filter: &str,
        seq: u64,
    ) -> Result<Option<async_nats::jetstream::message::StreamMessage>, ClusterError> {
        let read = self
            .events
            .raw_message_builder()
            .sequence(seq)
            .next_by_subject(filter.to_owned())
            .send();
        match timed("read", read).await {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(nats_err(e)),
        }
    }

    /// Deletes the oldest event on `subject` (returned, `seq` set); `None`
    /// if another relay took it first.
    async fn drop_oldest(&self, subject: &str) -> Result<Option<StoredEvent>, ClusterError> {
        let Some(m) = self.next_on(subject, 1).await? else {
            return Ok(None);
        };
        let mut ev = decode_event(&m.payload)?;
        ev.seq = m.sequence;
        Ok(self.delete(m.sequence).await?.then_some(ev))
    }

    /// Deletes the event at `seq`; false if it was not there.
    pub(crate) async fn delete(&self, seq: u64) -> Result<bool, ClusterError> {
        match timed("delete", self.events.delete_message(seq)).await {
            Ok(done) => Ok(done),
            Err(e) => match e.kind() {
                async_nats::jetstream::stream::DeleteMessageErrorKind::JetStream(js)
                    if js.error_code().0 == NO_MESSAGE_FOUND || js.code() == 404 =>
                {
                    Ok(false)
                }
                _ => Err(nats_err(e)),
            },
        }
    }

    /// Records the final state of `event` (its receipt): a delivery
    /// replaces any earlier receipt, anything else is written only if the
    /// event has none ([`receipt_write`]). Watchers of its publisher are
    /// told. Returns whether it was written.
    pub(crate) async fn finish(
        &self,
        event: &StoredEvent,
        reason: &FinishReason,
        at_ms: u64,
    ) -> Result<bool, ClusterError> {
        let (state, why) = reason.state_and_reason();
        let record = StoredEvent {
            payload: Vec::new(),
            state: state as i32,
            reason: why.into(),
            replaced_by: match reason {
                FinishReason::Collapsed { by } => by.clone(),
                _ => String::new(),
            },
            updated_at_ms: at_ms,
            ..event.clone()
        };
        let mut headers = HeaderMap::new();
        if receipt_write(reason) == ReceiptWrite::IfNone {
            headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
        }
        let bytes: bytes::Bytes = record.encode_to_vec().into();
        let written = timed("receipt", async {
            Ok::<_, ClusterError>(
                self.js
                    .publish_with_headers(
                        self.names.status_subject(&event.event_id),
                        headers,
                        bytes.clone(),
                    )
                    .await
                    .map_err(nats_err)?
                    .await,
            )
        })
        .await?;
        match written {
            Ok(_) => {}
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => return Ok(false),
            Err(e) => return Err(nats_err(e)),
        }
        if !event.publisher.is_empty() {
            // Core NATS, not stored: only watchers connected now see it.
            let _ = self
                .client
                .publish(self.names.watch_subject(&event.publisher), bytes)
                .await;
        }
        Ok(true)
    }

    /// Writes receipts for events made final by this relay (dropped,
    /// collapsed); what fails is logged (the event is gone either way).
    pub(crate) async fn finish_displaced(
        &self,
        displaced: Vec<(StoredEvent, FinishReason)>,
        at_ms: u64,
    ) {
        for (event, reason) in displaced {
            if let Err(e) = self.finish(&event, &reason, at_ms).await {
                debug!(error = %e, event = %event.event_id, "receipt not written");
            }
        }
    }

    /// An event as it is now: its receipt if it is final, else its queued
    /// copy (state QUEUED); `None` if unknown or past its retention.
    pub async fn event(&self, event_id: &str) -> Result<Option<StoredEvent>, ClusterError> {
        match self
            .status
            .get_last_raw_message_by_subject(&self.names.status_subject(event_id))
            .await
        {
            Ok(m) => return decode_event(&m.payload).map(Some),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {}
            Err(e) => return Err(nats_err(e)),
        }
        let Some(devkey) = devkey_of(event_id) else {
            return Ok(None);
        };
        let filter = self.names.device_filter(devkey);
        let mut seq = 1;
        for _ in 0..MAX_SCAN {
            let Some(m) = self.next_on(&filter, seq).await? else {
                return Ok(None);
            };
            let mut ev = decode_event(&m.payload)?;
            if ev.event_id == event_id {
                ev.seq = m.sequence;
                ev.state = wakewire_api::pb::EventState::Queued as i32;
                return Ok(Some(ev));
            }
            seq = m.sequence + 1;
        }
        Ok(None)
    }

    /// Records a deliver-now-or-never keyed publish's first answer (0:
    /// still running); `Some` with the first record if the key was used
    /// before.
    pub(crate) async fn reserve(
        &self,
        record: &StoredEvent,
    ) -> Result<Option<StoredEvent>, ClusterError> {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
        let written = self
            .js
            .publish_with_headers(
                self.names.status_subject(&record.event_id),
                headers,
                record.encode_to_vec().into(),
            )
            .await
            .map_err(nats_err)?
            .await;
        match written {
            Ok(_) => Ok(None),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(self
                .event(&record.event_id)
                .await?
                .or_else(|| Some(record.clone()))),
            Err(e) => Err(nats_err(e)),
        }
    }

    /// Records the first answer of a reserved deliver-now-or-never publish.
    pub(crate) async fn settle(&self, record: &StoredEvent) -> Result<(), ClusterError> {
        self.js
            .publish(
                self.names.status_subject(&record.event_id),
                record.encode_to_vec().into(),
            )
            .await
            .map_err(nats_err)?
            .await
            .map(|_| ())
            .map_err(nats_err)
    }

    /// Asks the relay holding `device_id` (if any) a live request.
    async fn live(
        &self,
        device_id: &str,
        request: LiveRequest,
        timeout: Duration,
    ) -> Result<LiveOutcome, ClusterError> {
        let subject = self.names.live_subject(&self.names.devkey(device_id));
        let req = async_nats::Request::new()
            .payload(request.encode_to_vec().into())
            .timeout(Some(timeout));
        match self.client.send_request(subject, req).await {
            Ok(m) => Ok(LiveReply::decode(m.payload.as_ref())
                .map(|r| LiveOutcome::from_code(r.outcome))
                .unwrap_or(LiveOutcome::NotSent)),
            Err(e) => match e.kind() {
                async_nats::RequestErrorKind::NoResponders => Ok(LiveOutcome::NotSent),
                async_nats::RequestErrorKind::TimedOut => Ok(LiveOutcome::SentUnacked),
                _ => Err(nats_err(e)),
            },
        }
    }

    /// Whether some relay holds a connection of `device_id` now.
    pub async fn present(&self, device_id: &str) -> bool {
        let ask = LiveRequest {
            kind: Some(live_request::Kind::Presence(true)),
        };
        matches!(
            self.live(device_id, ask, Duration::from_secs(2)).await,
            Ok(LiveOutcome::Delivered)
        )
    }

    /// Hands a deliver-now-or-never wake to the relay holding the device,
    /// waiting up to `ack_wait` for the device's ack.
    pub async fn deliver_now(
        &self,
        device_id: &str,
        event: StoredEvent,
        ack_wait: Duration,
    ) -> Result<LiveOutcome, ClusterError> {
        let ask = LiveRequest {
            kind: Some(live_request::Kind::Wake(event)),
        };
        // The holder answers SENT_UNACKED itself at ack_wait; a little
        // more here covers the round trip.
        self.live(device_id, ask, ack_wait + Duration::from_millis(500))
            .await
    }

    /// Tells whoever holds `device_id` that it connected here now.
    pub(crate) async fn take_over(&self, device_id: &str, new_conn: String) {
        let subject = self.names.live_subject(&self.names.devkey(device_id));
        let msg = LiveRequest {
            kind: Some(live_request::Kind::Takeover(new_conn)),
        };
        let _ = self
            .client
            .publish(subject, msg.encode_to_vec().into())
            .await;
    }

    /// Subscribes to the receipts of `publisher`'s events (core NATS).
    pub async fn watch(&self, publisher: &str) -> Result<async_nats::Subscriber, ClusterError> {
        self.client
            .subscribe(self.names.watch_subject(publisher))
            .await
            .map_err(nats_err)
    }

    /// Subscribes to the receipt of one event (to answer DELIVERED when
    /// its device acks in time). Subscribe before publishing it.
    pub async fn await_receipt(
        &self,
        event_id: &str,
    ) -> Result<async_nats::Subscriber, ClusterError> {
        self.client
            .subscribe(self.names.status_subject(event_id))
            .await
            .map_err(nats_err)
    }

    /// A channel record from the bucket.
    pub async fn channel(&self, channel_id: &str) -> Result<Option<StoredChannel>, ClusterError> {
        match self.channels.get(channel_id).await {
            Ok(Some(v)) => {
                StoredChannel::decode(v.as_ref())
                    .map(Some)
                    .map_err(|e| ClusterError::Corrupt {
                        what: "channels bucket",
                        message: e.to_string(),
                    })
            }
            Ok(None) => Ok(None),
            Err(e) => Err(nats_err(e)),
        }
    }

    /// Writes a channel record.
    pub async fn put_channel(
        &self,
        channel_id: &str,
        record: &StoredChannel,
    ) -> Result<(), ClusterError> {
        self.channels
            .put(channel_id, record.encode_to_vec().into())
            .await
            .map(|_| ())
            .map_err(nats_err)
    }

    /// Marks a channel gone and drops its queue with receipts.
    pub async fn channel_gone(
        &self,
        channel_id: &str,
        device_id: &str,
        reason: &str,
        at_ms: u64,
    ) -> Result<(), ClusterError> {
        let mut record = self.channel(channel_id).await?.unwrap_or_default();
        record.device_id = device_id.to_owned();
        record.gone_reason = reason.to_owned();
        record.gone_at_ms = at_ms;
        self.put_channel(channel_id, &record).await?;
        let filter = self
            .names
            .channel_filter(&self.names.devkey(device_id), channel_id);
        let mut seq = 1;
        for _ in 0..MAX_SCAN {
            let Some(m) = self.next_on(&filter, seq).await? else {
                break;
            };
            seq = m.sequence + 1;
            if self.delete(m.sequence).await? {
                let ev = decode_event(&m.payload)?;
                self.finish(&ev, &FinishReason::ChannelGone, at_ms).await?;
            }
        }
        Ok(())
    }

    /// Deletes the records of gone channels (after their retention).
    pub(crate) async fn forget_channels(&self, ids: &[String]) -> Result<(), ClusterError> {
        for id in ids {
            self.channels.purge(id).await.map_err(nats_err)?;
        }
        Ok(())
    }

    /// Loads every channel record into `registry`, then follows changes
    /// made by any relay until the connection closes.
    pub(crate) async fn follow_channels(
        &self,
        registry: &Registry,
        loaded: tokio::sync::oneshot::Sender<usize>,
    ) -> Result<(), ClusterError> {
        let mut watch = self
            .channels
            .watch_with_history(">")
            .await
            .map_err(nats_err)?;
        let mut loaded = Some(loaded);
        let mut count = 0usize;
        // An empty bucket has no history to report "current" with.
        if self
            .channels
            .status()
            .await
            .map(|s| s.values() == 0)
            .unwrap_or(false)
        {
            if let Some(tx) = loaded.take() {
                let _ = tx.send(0);
            }
        }
        while let Some(entry) = watch.next().await {
            let entry = entry.map_err(nats_err)?;
            match entry.operation {
                async_nats::jetstream::kv::Operation::Put => {
                    if let Ok(ch) = StoredChannel::decode(entry.value.as_ref()) {
                        let device: std::sync::Arc<str> = ch.device_id.as_str().into();
                        if ch.gone_reason.is_empty() {
                            registry.register_channel(
                                &entry.key,
                                &device,
                                &ch.name,
                                ch.last_used_ms,
                            );
                            count += 1;
                        } else {
                            registry.channel_gone(
                                &entry.key,
                                &device,
                                &ch.gone_reason,
                                ch.gone_at_ms,
                            );
                        }
                    }
                }
                _ => registry.forget_gone(&entry.key),
            }
            if entry.delta == 0 || entry.seen_current {
                if let Some(tx) = loaded.take() {
                    let _ = tx.send(count);
                }
            }
        }
        Err(ClusterError::Nats("channel watch ended".into()))
    }
}

/// Runs one JetStream request, timing it (and counting its failure) as
/// `op` in the relay's metrics.
pub(crate) async fn timed<T, E>(
    op: &'static str,
    request: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let started = crate::state::clock::now();
    let r = request.await;
    metrics::histogram!(m::NATS_SECONDS, "op" => op).record(
        crate::state::clock::now()
            .saturating_duration_since(started)
            .as_secs_f64(),
    );
    if r.is_err() {
        metrics::counter!(m::NATS_ERRORS, "op" => op).increment(1);
    }
    r
}

pub(crate) fn decode_event(bytes: &[u8]) -> Result<StoredEvent, ClusterError> {
    StoredEvent::decode(bytes).map_err(|e| ClusterError::Corrupt {
        what: "events stream",
        message: e.to_string(),
    })
}
