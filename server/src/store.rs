//! The embedded durable store (redb): channels, events, per-channel
//! queues, and the TTL / retention index.
//!
//! Every write goes through one writer thread that **group-commits**: it
//! takes the first waiting operation plus everything queued behind it (up
//! to 1024), applies them in one write transaction, and commits once (one
//! fsync for the batch). An operation is acknowledged to its caller only
//! after that commit, so a Publish that returned OK survives `kill -9`.
//! Reads use redb's MVCC snapshots and never wait for the writer.
//!
//! Tables:
//! - `channels`: channel id -> `StoredChannel`
//! - `events`: event id -> `StoredEvent` (kept after delivery for
//!   `status_retention`, so GetEvent can answer)
//! - `queue`: (channel id, seq) -> event id, arrival order per channel
//! - `collapse`: (channel id, collapse key) -> event id
//! - `sweep`: (due ms, event id) -> (): TTL expiry of queued events and the
//!   end of retention of finished ones
//! - `meta`: counters

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use redb::{Database, ReadableTable, TableDefinition, WriteTransaction};
use thiserror::Error;
use tokio::sync::{broadcast, mpsc, oneshot};
use wakewire_proto::pb::publish::EventState;
use wakewire_proto::pb::store::{StoredChannel, StoredEvent};

const CHANNELS: TableDefinition<&str, &[u8]> = TableDefinition::new("channels");
const EVENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("events");
const QUEUE: TableDefinition<(&str, u64), &str> = TableDefinition::new("queue");
const COLLAPSE: TableDefinition<(&str, &str), &str> = TableDefinition::new("collapse");
const SWEEP: TableDefinition<(u64, &str), ()> = TableDefinition::new("sweep");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// File name of the database in the data directory.
pub const DB_FILE: &str = "wakewire.redb";
/// Most operations committed together.
const MAX_BATCH: usize = 1024;
/// Most sweep entries handled per sweep.
const MAX_SWEEP: usize = 10_000;

/// A store failure. The operation did not take effect; retrying later may
/// help (disk full, I/O error) or not (corruption: see the message).
#[derive(Debug, Clone, Error)]
#[error("store: {0}")]
pub struct StoreError(String);

impl StoreError {
    fn from<E: std::fmt::Display>(e: E) -> Self {
        StoreError(e.to_string())
    }
}

/// Store settings.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Most queued events per channel; the oldest non-collapsible one is
    /// dropped to make room.
    pub queue_limit: usize,
    /// How long finished events stay queryable.
    pub status_retention: Duration,
    /// Commit many operations per fsync (true) or one each (false: only to
    /// measure what group commit saves).
    pub group_commit: bool,
}

enum Op {
    Enqueue(Box<StoredEvent>),
    Ack {
        event_id: String,
        at_ms: u64,
    },
    Sweep {
        now_ms: u64,
    },
    PutChannel {
        id: String,
        channel: StoredChannel,
    },
    ChannelGone {
        id: String,
        reason: String,
        at_ms: u64,
    },
}

/// What an operation changed.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The event as stored (enqueue, ack).
    pub event: Option<StoredEvent>,
    /// Events that reached a final state (dropped, expired, delivered).
    pub finished: Vec<StoredEvent>,
}

struct Job {
    op: Op,
    reply: oneshot::Sender<Result<Outcome, StoreError>>,
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    jobs: mpsc::Sender<Job>,
    receipts: broadcast::Sender<StoredEvent>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

fn dec<M: Message + Default>(bytes: &[u8]) -> Result<M, StoreError> {
    M::decode(bytes).map_err(|e| StoreError(format!("corrupt record: {e}")))
}

impl Store {
    /// Opens (or creates) the database in `dir` and starts the writer thread.
    pub fn open(dir: &Path, config: StoreConfig) -> Result<Self, StoreError> {
        let db = Arc::new(Database::create(dir.join(DB_FILE)).map_err(StoreError::from)?);
        let txn = db.begin_write().map_err(StoreError::from)?;
        let next_seq = {
            txn.open_table(CHANNELS).map_err(StoreError::from)?;
            txn.open_table(EVENTS).map_err(StoreError::from)?;
            txn.open_table(QUEUE).map_err(StoreError::from)?;
            txn.open_table(COLLAPSE).map_err(StoreError::from)?;
            txn.open_table(SWEEP).map_err(StoreError::from)?;
            let meta = txn.open_table(META).map_err(StoreError::from)?;
            let seq = meta
                .get("next_seq")
                .map_err(StoreError::from)?
                .map_or(1, |v| v.value());
            seq
        };
        txn.commit().map_err(StoreError::from)?;
        let (jobs, rx) = mpsc::channel(65_536);
        let (receipts, _) = broadcast::channel(65_536);
        let writer = Writer {
            db: db.clone(),
            config,
            next_seq,
            receipts: receipts.clone(),
        };
        std::thread::Builder::new()
            .name("wakewire-store".into())
            .spawn(move || writer.run(rx))
            .map_err(StoreError::from)?;
        Ok(Self { db, jobs, receipts })
    }

    async fn submit(&self, op: Op) -> Result<Outcome, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job { op, reply })
            .await
            .map_err(|_| StoreError("the store writer stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError("the store writer stopped".into()))?
    }

    /// Stores a new event durably (collapsing and bounding its channel's
    /// queue). Returns the stored event and any events it displaced.
    pub async fn enqueue(&self, event: StoredEvent) -> Result<Outcome, StoreError> {
        self.submit(Op::Enqueue(Box::new(event))).await
    }

    /// Marks an event delivered (idempotent).
    pub async fn ack(&self, event_id: String, at_ms: u64) -> Result<Outcome, StoreError> {
        self.submit(Op::Ack { event_id, at_ms }).await
    }

    /// Expires queued events past their TTL and deletes finished events past
    /// their retention.
    pub async fn sweep(&self, now_ms: u64) -> Result<Outcome, StoreError> {
        self.submit(Op::Sweep { now_ms }).await
    }

    /// Records a channel.
    pub async fn put_channel(&self, id: String, channel: StoredChannel) -> Result<(), StoreError> {
        self.submit(Op::PutChannel { id, channel })
            .await
            .map(|_| ())
    }

    /// Marks a channel gone and drops its queue.
    pub async fn channel_gone(
        &self,
        id: String,
        reason: String,
        at_ms: u64,
    ) -> Result<Outcome, StoreError> {
        self.submit(Op::ChannelGone { id, reason, at_ms }).await
    }

    /// Receipts of events reaching a final state, as they are committed.
    pub fn receipts(&self) -> broadcast::Receiver<StoredEvent> {
        self.receipts.subscribe()
    }

    /// Every channel record.
    pub fn channels(&self) -> Result<Vec<(String, StoredChannel)>, StoreError> {
        let txn = self.db.begin_read().map_err(StoreError::from)?;
        let table = txn.open_table(CHANNELS).map_err(StoreError::from)?;
        let mut out = vec![];
        for row in table.iter().map_err(StoreError::from)? {
            let (k, v) = row.map_err(StoreError::from)?;
            out.push((k.value().to_owned(), dec(v.value())?));
        }
        Ok(out)
    }

    /// One channel record.
    pub fn channel(&self, channel_id: &str) -> Result<Option<StoredChannel>, StoreError> {
        let txn = self.db.begin_read().map_err(StoreError::from)?;
        let table = txn.open_table(CHANNELS).map_err(StoreError::from)?;
        let found = table.get(channel_id).map_err(StoreError::from)?;
        found.map(|v| dec(v.value())).transpose()
    }

    /// One event.
    pub fn event(&self, event_id: &str) -> Result<Option<StoredEvent>, StoreError> {
        let txn = self.db.begin_read().map_err(StoreError::from)?;
        let table = txn.open_table(EVENTS).map_err(StoreError::from)?;
        let found = table.get(event_id).map_err(StoreError::from)?;
        found.map(|v| dec(v.value())).transpose()
    }

    /// The queued events of a channel, oldest first.
    pub fn queued(&self, channel_id: &str) -> Result<Vec<StoredEvent>, StoreError> {
        let txn = self.db.begin_read().map_err(StoreError::from)?;
        let queue = txn.open_table(QUEUE).map_err(StoreError::from)?;
        let events = txn.open_table(EVENTS).map_err(StoreError::from)?;
        let mut out = vec![];
        for row in queue
            .range((channel_id, 0)..=(channel_id, u64::MAX))
            .map_err(StoreError::from)?
        {
            let (_, id) = row.map_err(StoreError::from)?;
            if let Some(v) = events.get(id.value()).map_err(StoreError::from)? {
                out.push(dec(v.value())?);
            }
        }
        Ok(out)
    }
}

struct Writer {
    db: Arc<Database>,
    config: StoreConfig,
    next_seq: u64,
    receipts: broadcast::Sender<StoredEvent>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        while let Some(first) = rx.blocking_recv() {
            let mut batch = vec![first];
            while self.config.group_commit && batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            self.commit(batch);
        }
    }

    fn commit(&mut self, batch: Vec<Job>) {
        let seq_before = self.next_seq;
        let attempt = (|| -> Result<Vec<Result<Outcome, StoreError>>, StoreError> {
            let txn = self.db.begin_write().map_err(StoreError::from)?;
            let results = batch.iter().map(|job| self.apply(&txn, &job.op)).collect();
            txn.open_table(META)
                .map_err(StoreError::from)?
                .insert("next_seq", self.next_seq)
                .map_err(StoreError::from)?;
            txn.commit().map_err(StoreError::from)?;
            Ok(results)
        })();
        match attempt {
            Ok(results) => {
                for (job, result) in batch.into_iter().zip(results) {
                    if let Ok(outcome) = &result {
                        for e in &outcome.finished {
                            let _ = self.receipts.send(e.clone());
                        }
                    }
                    let _ = job.reply.send(result);
                }
            }
            Err(e) => {
                self.next_seq = seq_before;
                tracing::error!(error = %e, "store commit failed");
                for job in batch {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }

    fn apply(&mut self, txn: &WriteTransaction, op: &Op) -> Result<Outcome, StoreError> {
        let mut t = Tables::open(txn)?;
        let retention = u64::try_from(self.config.status_retention.as_millis()).unwrap_or(u64::MAX);
        match op {
            Op::Enqueue(ev) => {
                let mut ev = (**ev).clone();
                let mut out = Outcome::default();
                let ch = ev.channel_id.clone();
                if !ev.collapse_key.is_empty() {
                    let old = t
                        .collapse
                        .get((ch.as_str(), ev.collapse_key.as_str()))
                        .map_err(StoreError::from)?
                        .map(|v| v.value().to_owned());
                    if let Some(old) = old.and_then(|id| t.event(&id).transpose()) {
                        let old = old?;
                        if old.state == EventState::Queued as i32 {
                            out.finished.push(t.finish(
                                old,
                                EventState::Dropped,
                                "collapsed",
                                &ev.event_id,
                                ev.created_at_ms,
                                retention,
                            )?);
                        }
                    }
                    t.collapse
                        .insert(
                            (ch.as_str(), ev.collapse_key.as_str()),
                            ev.event_id.as_str(),
                        )
                        .map_err(StoreError::from)?;
                }
                let queued: Vec<String> = t
                    .queue
                    .range((ch.as_str(), 0)..=(ch.as_str(), u64::MAX))
                    .map_err(StoreError::from)?
                    .map(|r| r.map(|(_, id)| id.value().to_owned()))
                    .collect::<Result<_, _>>()
                    .map_err(StoreError::from)?;
                let mut excess = (queued.len() + 1).saturating_sub(self.config.queue_limit.max(1));
                if excess > 0 {
                    let mut victims: Vec<StoredEvent> = vec![];
                    let mut collapsible: Vec<StoredEvent> = vec![];
                    for id in &queued {
                        if let Some(e) = t.event(id)? {
                            if e.collapse_key.is_empty() {
                                victims.push(e);
                            } else {
                                collapsible.push(e);
                            }
                        }
                    }
                    // Oldest non-collapsible first; collapsible ones only if
                    // nothing else is left.
                    for v in victims.into_iter().chain(collapsible) {
                        if excess == 0 {
                            break;
                        }
                        out.finished.push(t.finish(
                            v,
                            EventState::Dropped,
                            "queue_full",
                            "",
                            ev.created_at_ms,
                            retention,
                        )?);
                        excess -= 1;
                    }
                }
                ev.seq = self.next_seq;
                self.next_seq += 1;
                ev.state = EventState::Queued as i32;
                ev.updated_at_ms = ev.created_at_ms;
                t.put(&ev)?;
                t.queue
                    .insert((ch.as_str(), ev.seq), ev.event_id.as_str())
                    .map_err(StoreError::from)?;
                t.sweep
                    .insert((expiry(&ev), ev.event_id.as_str()), ())
                    .map_err(StoreError::from)?;
                out.event = Some(ev);
                Ok(out)
            }
            Op::Ack { event_id, at_ms } => {
                let mut out = Outcome::default();
                if let Some(ev) = t.event(event_id)? {
                    if ev.state == EventState::Queued as i32 {
                        let done =
                            t.finish(ev, EventState::Delivered, "", "", *at_ms, retention)?;
                        out.event = Some(done.clone());
                        out.finished.push(done);
                    }
                }
                Ok(out)
            }
            Op::Sweep { now_ms } => {
                let mut out = Outcome::default();
                let due: Vec<(u64, String)> = t
                    .sweep
                    .range((0, "")..=(*now_ms, "\u{10ffff}"))
                    .map_err(StoreError::from)?
                    .take(MAX_SWEEP)
                    .map(|r| r.map(|(k, _)| (k.value().0, k.value().1.to_owned())))
                    .collect::<Result<_, _>>()
                    .map_err(StoreError::from)?;
                for (at, id) in due {
                    t.sweep
                        .remove((at, id.as_str()))
                        .map_err(StoreError::from)?;
                    let Some(ev) = t.event(&id)? else { continue };
                    if ev.state == EventState::Queued as i32 {
                        if expiry(&ev) == at {
                            out.finished.push(t.finish(
                                ev,
                                EventState::Expired,
                                "ttl",
                                "",
                                *now_ms,
                                retention,
                            )?);
                        }
                    } else if ev.updated_at_ms.saturating_add(retention) == at {
                        t.events.remove(id.as_str()).map_err(StoreError::from)?;
                        let key = (ev.channel_id.as_str(), ev.collapse_key.as_str());
                        let points_here = t
                            .collapse
                            .get(key)
                            .map_err(StoreError::from)?
                            .is_some_and(|v| v.value() == id);
                        if points_here {
                            t.collapse.remove(key).map_err(StoreError::from)?;
                        }
                    }
                }
                Ok(out)
            }
            Op::PutChannel { id, channel } => {
                t.channels
                    .insert(id.as_str(), channel.encode_to_vec().as_slice())
                    .map_err(StoreError::from)?;
                Ok(Outcome::default())
            }
            Op::ChannelGone { id, reason, at_ms } => {
                let mut out = Outcome::default();
                let existing = t
                    .channels
                    .get(id.as_str())
                    .map_err(StoreError::from)?
                    .map(|v| dec::<StoredChannel>(v.value()));
                if let Some(ch) = existing {
                    let mut ch = ch?;
                    ch.gone_reason = reason.clone();
                    ch.gone_at_ms = *at_ms;
                    t.channels
                        .insert(id.as_str(), ch.encode_to_vec().as_slice())
                        .map_err(StoreError::from)?;
                }
                let ids: Vec<String> = t
                    .queue
                    .range((id.as_str(), 0)..=(id.as_str(), u64::MAX))
                    .map_err(StoreError::from)?
                    .map(|r| r.map(|(_, v)| v.value().to_owned()))
                    .collect::<Result<_, _>>()
                    .map_err(StoreError::from)?;
                for eid in ids {
                    if let Some(ev) = t.event(&eid)? {
                        out.finished.push(t.finish(
                            ev,
                            EventState::Dropped,
                            "channel_gone",
                            "",
                            *at_ms,
                            retention,
                        )?);
                    }
                }
                Ok(out)
            }
        }
    }
}

/// When a queued event expires, Unix ms.
fn expiry(ev: &StoredEvent) -> u64 {
    ev.created_at_ms.saturating_add(u64::from(ev.ttl_s) * 1000)
}

struct Tables<'t> {
    channels: redb::Table<'t, &'static str, &'static [u8]>,
    events: redb::Table<'t, &'static str, &'static [u8]>,
    queue: redb::Table<'t, (&'static str, u64), &'static str>,
    collapse: redb::Table<'t, (&'static str, &'static str), &'static str>,
    sweep: redb::Table<'t, (u64, &'static str), ()>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Self, StoreError> {
        Ok(Self {
            channels: txn.open_table(CHANNELS).map_err(StoreError::from)?,
            events: txn.open_table(EVENTS).map_err(StoreError::from)?,
            queue: txn.open_table(QUEUE).map_err(StoreError::from)?,
            collapse: txn.open_table(COLLAPSE).map_err(StoreError::from)?,
            sweep: txn.open_table(SWEEP).map_err(StoreError::from)?,
        })
    }

    fn event(&self, id: &str) -> Result<Option<StoredEvent>, StoreError> {
        let found = self.events.get(id).map_err(StoreError::from)?;
        found.map(|v| dec(v.value())).transpose()
    }

    fn put(&mut self, ev: &StoredEvent) -> Result<(), StoreError> {
        self.events
            .insert(ev.event_id.as_str(), ev.encode_to_vec().as_slice())
            .map_err(StoreError::from)?;
        Ok(())
    }

    /// Moves a queued event to a final state: out of the queue and the TTL
    /// index, into the retention index.
    fn finish(
        &mut self,
        mut ev: StoredEvent,
        state: EventState,
        reason: &str,
        replaced_by: &str,
        at_ms: u64,
        retention: u64,
    ) -> Result<StoredEvent, StoreError> {
        self.queue
            .remove((ev.channel_id.as_str(), ev.seq))
            .map_err(StoreError::from)?;
        self.sweep
            .remove((expiry(&ev), ev.event_id.as_str()))
            .map_err(StoreError::from)?;
        ev.state = state as i32;
        ev.reason = reason.to_owned();
        ev.replaced_by = replaced_by.to_owned();
        ev.updated_at_ms = at_ms;
        ev.payload.clear();
        self.put(&ev)?;
        self.sweep
            .insert((at_ms.saturating_add(retention), ev.event_id.as_str()), ())
            .map_err(StoreError::from)?;
        Ok(ev)
    }
}
