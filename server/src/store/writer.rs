//! The store's writer thread: applies operations in batches, one write
//! transaction and one commit per batch, and decides every event's fate.
//!
//! A batch is committed durably (fsync) when it holds an operation whose
//! answer promises durability (an enqueue, a key reservation, a channel's
//! end, a sweep) or a [`Op::Sync`]. A batch of only acks, channel
//! registrations, idempotency answers and channel pruning is committed
//! without fsync: visible at once to every read, on disk with the next
//! durable commit, which the store's sync thread forces within
//! [`LAZY_SYNC`]. A crash in that window only undoes "delivered" marks
//! (those events are queued again and re-sent, and the device drops the
//! repeat by its event id) and fresh channel records (the device registers
//! its channels again when it reconnects).
//!
//! A small batch that needs an fsync waits up to the commit delay for more
//! operations to share it ([`Writer::gather`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use metrics::counter;
use prost::Message;
use std::collections::HashMap;

use dashmap::DashMap;
use redb::{Database, ReadableTable, TableDefinition, WriteTransaction};
use tokio::sync::{broadcast, mpsc};
use wakewire_api::pb::EventState;

use super::queues::{Queues, QUEUE_LOG};
use super::{
    db, decode, AckItem, AckOutcome, Duplicate, Enqueued, FinishReason, IdempotencyKey, Job, Reply,
    StoreConfig, StoreError,
};
use crate::claims::Claims;
use crate::metrics as m;
use crate::pb::{StoredChannel, StoredEvent, StoredIdempotency};

pub(crate) const CHANNELS: TableDefinition<&str, &[u8]> = TableDefinition::new("channels");
pub(crate) const EVENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("events");
const COLLAPSE: TableDefinition<(&str, &str), &str> = TableDefinition::new("collapse");
const SWEEP: TableDefinition<(u64, &str), ()> = TableDefinition::new("sweep");
const IDEMPOTENCY: TableDefinition<&str, &[u8]> = TableDefinition::new("idempotency");
const IDEMPOTENCY_SWEEP: TableDefinition<(u64, &str), ()> =
    TableDefinition::new("idempotency_sweep");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const PUBLISHER_BYTES: TableDefinition<&str, u64> = TableDefinition::new("publisher_bytes");

/// Most operations committed together.
const MAX_BATCH: usize = 1024;
/// Most sweep entries handled per sweep.
const MAX_SWEEP: usize = 10_000;
/// A batch with this many operations to make durable commits without
/// waiting for the commit delay.
const DELAY_UNTIL_OPS: usize = 64;
/// Longest time a commit without fsync stays off the disk: the store's
/// sync thread asks for a durable commit this often while one is pending.
pub(crate) const LAZY_SYNC: std::time::Duration = std::time::Duration::from_millis(100);

/// An operation for the writer.
pub(crate) enum Op {
    Enqueue(Box<StoredEvent>, Option<IdempotencyKey>),
    Reserve {
        key: IdempotencyKey,
        event_id: String,
        now_ms: u64,
    },
    Settle {
        scoped_key: String,
        status: i32,
    },
    Ack {
        acks: Vec<AckItem>,
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
    ClaimQueued {
        channel_ids: Vec<String>,
    },
    ForgetChannels {
        ids: Vec<String>,
        gone_before_ms: u64,
    },
    /// Answered once everything before it is committed durably (fsync).
    Sync,
}

impl Op {
    /// Whether the operation changes the database.
    fn writes(&self) -> bool {
        !matches!(self, Op::ClaimQueued { .. } | Op::Sync)
    }

    /// Whether its answer promises the change is on disk: an accepted
    /// event, a reserved idempotency key, a channel's end, a sweep's final
    /// states. Acks (a crash re-sends the event, which the device drops as
    /// a repeat), channel registrations (the device registers again on its
    /// next connection), idempotency answers and pruning need not be.
    fn needs_fsync(&self) -> bool {
        match self {
            Op::Enqueue(..) | Op::Reserve { .. } | Op::ChannelGone { .. } | Op::Sweep { .. } => {
                true
            }
            Op::Ack { .. }
            | Op::PutChannel { .. }
            | Op::Settle { .. }
            | Op::ForgetChannels { .. }
            | Op::ClaimQueued { .. }
            | Op::Sync => false,
        }
    }
}

type Finished = Vec<(StoredEvent, FinishReason)>;
/// What [`Writer::enqueue`] stored: the event, what it displaced, and its
/// own final state if it was delivered in the same batch.
type Stored = (StoredEvent, Finished, Option<(StoredEvent, FinishReason)>);
/// Each operation's result, or the batch's failure.
type BatchResult = Result<Vec<Result<(Reply, Finished), StoreError>>, StoreError>;

pub(crate) struct Writer {
    db: Arc<Database>,
    config: StoreConfig,
    next_seq: u64,
    receipts: broadcast::Sender<(StoredEvent, FinishReason)>,
    claims: Arc<Claims>,
    /// Mirror of the `publisher_bytes` table, for cheap checks before a
    /// publish reaches the writer.
    mirror: Arc<DashMap<String, u64>>,
    /// Byte counts changed by the batch being applied (into the mirror
    /// once committed).
    touched: HashMap<String, u64>,
    /// Every channel's queue, as committed; `None` after a failed commit
    /// until it is read again from the log.
    queues: Option<Queues>,
    /// Set while a commit without fsync is not yet on disk; the store's
    /// sync thread then sends [`Op::Sync`].
    unsynced: Arc<std::sync::atomic::AtomicBool>,
    /// Durable commits begun.
    durable_begun: Arc<std::sync::atomic::AtomicU64>,
}

impl Writer {
    /// Creates the tables if needed, moves a legacy queue table into the
    /// log, and reads the queues and the queue sequence.
    pub(crate) fn open(
        db: Arc<Database>,
        config: StoreConfig,
        receipts: broadcast::Sender<(StoredEvent, FinishReason)>,
        claims: Arc<Claims>,
        mirror: Arc<DashMap<String, u64>>,
        (unsynced, durable_begun): (
            Arc<std::sync::atomic::AtomicBool>,
            Arc<std::sync::atomic::AtomicU64>,
        ),
    ) -> Result<Self, StoreError> {
        let txn = db.begin_write().map_err(super::db)?;
        let (loaded, migrated) = Queues::load(&txn)?;
        let queues;
        let next_seq = {
            let mut t = Tables::open(&txn)?;
            t.queues = loaded;
            if migrated {
                // Only a relay older than `queue_log` writes the legacy
                // table: what it finished may still have log entries.
                t.drop_stale_entries()?;
            }
            queues = std::mem::take(&mut t.queues);
            for row in t.publisher_bytes.iter().map_err(super::db)? {
                let (k, v) = row.map_err(super::db)?;
                mirror.insert(k.value().to_owned(), v.value());
            }
            let meta = txn.open_table(META).map_err(super::db)?;
            drop(t);
            let seq = meta
                .get("next_seq")
                .map_err(super::db)?
                .map_or(1, |v| v.value());
            seq
        };
        txn.commit().map_err(super::db)?;
        metrics::gauge!(m::QUEUED_EVENTS).set(queues.total() as f64);
        Ok(Self {
            db,
            config,
            next_seq,
            receipts,
            claims,
            mirror,
            touched: HashMap::new(),
            queues: Some(queues),
            unsynced,
            durable_begun,
        })
    }

    /// Applies batches until every sender is gone, on `rt`: the thread's
    /// own runtime, for the commit delay's timer (redb's calls block this
    /// thread only).
    pub(crate) fn run(mut self, rt: tokio::runtime::Runtime, mut rx: mpsc::Receiver<Job>) {
        rt.block_on(async {
            // New events held back from the last batch for their acks.
            let mut held: Vec<Job> = vec![];
            loop {
                let (start, aged) = if held.is_empty() {
                    match rx.recv().await {
                        Some(job) => (vec![job], 0),
                        None => break,
                    }
                } else {
                    let n = held.len();
                    (std::mem::take(&mut held), n)
                };
                let mut batch = self.gather(start, &mut rx).await;
                if self.config.group_commit && !self.config.commit_delay.is_zero() {
                    held = hold_back(&mut batch, aged);
                }
                if !batch.is_empty() {
                    self.dispatch(batch);
                }
            }
        });
    }

    /// The batch to apply with `first`: everything already waiting and,
    /// when it must be made durable and is still small, whatever arrives
    /// within the commit delay (one fsync for more publishes: fewer
    /// commits, less CPU per event; the device does not wait for it).
    async fn gather(&self, start: Vec<Job>, rx: &mut mpsc::Receiver<Job>) -> Vec<Job> {
        let mut batch = start;
        if !self.config.group_commit {
            return batch;
        }
        take_waiting(&mut batch, rx);
        if self.config.commit_delay.is_zero() || !wants_company(&batch) {
            return batch;
        }
        let window = tokio::time::sleep(self.config.commit_delay);
        tokio::pin!(window);
        while wants_company(&batch) {
            tokio::select! {
                () = &mut window => break,
                job = rx.recv() => match job {
                    Some(job) => {
                        batch.push(job);
                        take_waiting(&mut batch, rx);
                    }
                    None => break,
                },
            }
        }
        batch
    }

    /// Commits a batch or answers it from a snapshot, as [`plan`] says.
    fn dispatch(&mut self, batch: Vec<Job>) {
        let unsynced = self.unsynced.load(Ordering::Acquire);
        match plan(&batch, self.config.group_commit, unsynced) {
            Plan::Commit { durable } => self.commit(batch, durable),
            Plan::Read => self.read_only(batch),
        }
    }

    /// Queue reads only: the in-memory queues and one read snapshot of the
    /// events, no commit.
    fn read_only(&mut self, batch: Vec<Job>) {
        let snapshot = (|| {
            self.reload_queues()?;
            let txn = self.db.begin_read().map_err(db)?;
            let events = txn.open_table(EVENTS).map_err(db)?;
            Ok::<_, StoreError>(events)
        })();
        let queues = self.queues.as_ref();
        for job in batch {
            let result = match (&snapshot, queues, &job.op) {
                (Ok(events), Some(queues), Op::ClaimQueued { channel_ids }) => {
                    self.claim_queued(queues, events, channel_ids)
                }
                (_, _, Op::Sync) => Ok(Reply::Done),
                (Err(e), _, _) => Err(e.clone()),
                _ => Err(StoreError::Read("not a read".into())),
            };
            let _ = job.reply.send(result);
        }
    }

    /// Reads the queues from the log again after a failed commit left
    /// them unknown.
    fn reload_queues(&mut self) -> Result<(), StoreError> {
        if self.queues.is_none() {
            let txn = self.db.begin_read().map_err(db)?;
            let log = txn.open_table(QUEUE_LOG).map_err(db)?;
            self.queues = Some(Queues::read(&log)?);
        }
        Ok(())
    }

    fn claim_queued(
        &self,
        queues: &Queues,
        events: &impl ReadableTable<&'static str, &'static [u8]>,
        channel_ids: &[String],
    ) -> Result<Reply, StoreError> {
        let mut out = vec![];
        for ch in channel_ids {
            for (seq, id) in queues.oldest(ch, usize::MAX) {
                if let Some(v) = events.get(id.as_str()).map_err(db)? {
                    let ev: StoredEvent = decode("events", v.value())?;
                    if !is_queued_at(&ev, ch, seq) {
                        continue;
                    }
                    let claim = self.claims.claim(&ev.event_id);
                    out.push((ev, claim));
                }
            }
        }
        Ok(Reply::Queued(out))
    }

    /// Applies a batch in one write transaction and commits it, with fsync
    /// when `durable`.
    fn commit(&mut self, batch: Vec<Job>, durable: bool) {
        let seq_before = self.next_seq;
        let started = crate::state::clock::now();
        let ops = batch.len();
        let attempt = (|| -> BatchResult {
            self.reload_queues()?;
            let mut txn = self.db.begin_write().map_err(db)?;
            if !durable {
                txn.set_durability(redb::Durability::None);
            }
            let results = {
                let mut t = Tables::open(&txn)?;
                t.queues = self
                    .queues
                    .take()
                    .ok_or_else(|| StoreError::Read("the queues are not loaded".into()))?;
                t.acked_in_batch = acked_in(&batch);
                let results = batch
                    .iter()
                    .map(|job| self.apply_on(&mut t, &job.op))
                    .collect();
                t.write_publisher_bytes()?;
                self.touched = std::mem::take(&mut t.touched);
                self.queues = Some(std::mem::take(&mut t.queues));
                results
            };
            txn.open_table(META)
                .map_err(db)?
                .insert("next_seq", self.next_seq)
                .map_err(db)?;
            if durable {
                self.durable_begun.fetch_add(1, Ordering::AcqRel);
            }
            txn.commit().map_err(db)?;
            Ok(results)
        })();
        match attempt {
            Ok(results) => {
                // A durable commit also puts every earlier one on disk.
                self.unsynced.store(!durable, Ordering::Release);
                if durable {
                    counter!(m::STORE_FSYNCS).increment(1);
                }
                metrics::histogram!(m::STORE_COMMIT_SECONDS).record(
                    crate::state::clock::now()
                        .saturating_duration_since(started)
                        .as_secs_f64(),
                );
                metrics::histogram!(m::STORE_BATCH_OPS).record(ops as f64);
                if let Some(q) = &self.queues {
                    metrics::gauge!(m::QUEUED_EVENTS).set(q.total() as f64);
                }
                for (p, v) in std::mem::take(&mut self.touched) {
                    if v == 0 {
                        self.mirror.remove(&p);
                    } else {
                        self.mirror.insert(p, v);
                    }
                }
                for (job, result) in batch.into_iter().zip(results) {
                    let reply = result.map(|(reply, finished)| {
                        for (mut ev, why) in finished {
                            count(&why);
                            // Receipts carry no payload and no collapse key:
                            // a slow watcher pins only small records.
                            ev.collapse_key.clear();
                            ev.payload.clear();
                            let _ = self.receipts.send((ev, why));
                        }
                        reply
                    });
                    let _ = job.reply.send(reply);
                }
            }
            Err(e) => {
                self.next_seq = seq_before;
                self.touched.clear();
                // The queues may hold what was not committed: read them
                // again from the log before the next batch.
                self.queues = None;
                tracing::error!(error = %e, "store commit failed");
                for job in batch {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }

    fn apply_on(&mut self, t: &mut Tables<'_>, op: &Op) -> Result<(Reply, Finished), StoreError> {
        let retention = millis(self.config.status_retention);
        match op {
            Op::Enqueue(ev, idempotency) => {
                if let Some(key) = idempotency {
                    if let Some(dup) = t.duplicate(key)? {
                        return Ok((Reply::Enqueued(Enqueued::Duplicate(dup)), vec![]));
                    }
                }
                if !ev.publisher.is_empty() {
                    let stored = t.publisher_bytes(&ev.publisher)?;
                    let limit = self.config.max_bytes_per_publisher;
                    if stored.saturating_add(stored_size(ev)) > limit {
                        return Ok((
                            Reply::Enqueued(Enqueued::OverQuota { stored, limit }),
                            vec![],
                        ));
                    }
                }
                if let Some(key) = idempotency {
                    t.remember_key(
                        key,
                        &ev.event_id,
                        ev.created_at_ms,
                        true,
                        self.idem_retention(),
                    )?;
                }
                let (event, displaced, delivered) = self.enqueue(t, (**ev).clone(), retention)?;
                let reply = Reply::Enqueued(Enqueued::Stored {
                    event,
                    displaced: displaced.clone(),
                });
                let mut finished = displaced;
                finished.extend(delivered);
                Ok((reply, finished))
            }
            Op::Reserve {
                key,
                event_id,
                now_ms,
            } => {
                if let Some(dup) = t.duplicate(key)? {
                    return Ok((Reply::Reserved(Some(dup)), vec![]));
                }
                t.remember_key(key, event_id, *now_ms, false, self.idem_retention())?;
                Ok((Reply::Reserved(None), vec![]))
            }
            Op::Settle { scoped_key, status } => {
                let found = t
                    .idempotency
                    .get(scoped_key.as_str())
                    .map_err(db)?
                    .map(|v| decode::<StoredIdempotency>("idempotency", v.value()));
                if let Some(rec) = found {
                    let mut rec = rec?;
                    rec.status = *status;
                    t.idempotency
                        .insert(scoped_key.as_str(), rec.encode_to_vec().as_slice())
                        .map_err(db)?;
                }
                Ok((Reply::Done, vec![]))
            }
            Op::Ack { acks, at_ms } => {
                let mut outcome = AckOutcome::default();
                let mut finished = vec![];
                for a in acks {
                    // Stored as delivered by its enqueue, in this batch.
                    if t.delivered_at_enqueue.get(&a.event_id) == Some(&a.channel_id) {
                        t.delivered_at_enqueue.remove(&a.event_id);
                        outcome.delivered += 1;
                        continue;
                    }
                    match t.event(&a.event_id)? {
                        Some(ev)
                            if ev.state == EventState::Queued as i32
                                && ev.channel_id == a.channel_id =>
                        {
                            finished.push(t.finish(
                                ev,
                                FinishReason::Delivered,
                                *at_ms,
                                retention,
                            )?);
                            outcome.delivered += 1;
                        }
                        _ => outcome.ignored += 1,
                    }
                }
                Ok((Reply::Acked(outcome), finished))
            }
            Op::Sweep { now_ms } => {
                let finished = self.sweep(t, *now_ms, retention)?;
                Ok((Reply::Finished(finished.clone()), finished))
            }
            Op::PutChannel { id, channel } => {
                t.channels
                    .insert(id.as_str(), channel.encode_to_vec().as_slice())
                    .map_err(db)?;
                Ok((Reply::Done, vec![]))
            }
            Op::ChannelGone { id, reason, at_ms } => {
                let existing = t
                    .channels
                    .get(id.as_str())
                    .map_err(db)?
                    .map(|v| decode::<StoredChannel>("channels", v.value()));
                if let Some(ch) = existing {
                    let mut ch = ch?;
                    ch.gone_reason = reason.clone();
                    ch.gone_at_ms = *at_ms;
                    t.channels
                        .insert(id.as_str(), ch.encode_to_vec().as_slice())
                        .map_err(db)?;
                }
                let mut finished = vec![];
                // The device no longer has the channel: nothing it holds
                // can be acked, so claims do not keep these events.
                for ev in t.queued(id)? {
                    finished.push(t.finish(ev, FinishReason::ChannelGone, *at_ms, retention)?);
                }
                Ok((Reply::Finished(finished.clone()), finished))
            }
            Op::ClaimQueued { channel_ids } => {
                let reply = self.claim_queued(&t.queues, &t.events, channel_ids)?;
                Ok((reply, vec![]))
            }
            Op::Sync => Ok((Reply::Done, vec![])),
            Op::ForgetChannels {
                ids,
                gone_before_ms,
            } => {
                for id in ids {
                    let found = t
                        .channels
                        .get(id.as_str())
                        .map_err(db)?
                        .map(|v| decode::<StoredChannel>("channels", v.value()));
                    let Some(ch) = found else { continue };
                    let ch = ch?;
                    // Only channels gone long enough; a channel registered
                    // again meanwhile is live and stays.
                    if !ch.gone_reason.is_empty() && ch.gone_at_ms < *gone_before_ms {
                        t.channels.remove(id.as_str()).map_err(db)?;
                    }
                }
                Ok((Reply::Done, vec![]))
            }
        }
    }

    fn idem_retention(&self) -> u64 {
        millis(self.config.idempotency_retention)
    }

    /// Stores an accepted event: queued, or, when its device's ack is in
    /// the same batch, straight as delivered (one record and its retention
    /// entry, instead of queue and TTL entries written and removed again
    /// within one commit). Returns the event, what it displaced, and its
    /// own final state if it was delivered.
    fn enqueue(
        &mut self,
        t: &mut Tables<'_>,
        mut ev: StoredEvent,
        retention: u64,
    ) -> Result<Stored, StoreError> {
        let mut finished = vec![];
        let ch = ev.channel_id.clone();
        if !ev.collapse_key.is_empty() {
            let old = t
                .collapse
                .get((ch.as_str(), ev.collapse_key.as_str()))
                .map_err(db)?
                .map(|v| v.value().to_owned());
            if let Some(old) = old {
                match t.event(&old)? {
                    // An older event on its way to the device is delivered
                    // as well: it cannot be taken back.
                    Some(old)
                        if old.state == EventState::Queued as i32
                            && !self.claims.is_claimed(&old.event_id) =>
                    {
                        finished.push(t.finish(
                            old,
                            FinishReason::Collapsed {
                                by: ev.event_id.clone(),
                            },
                            ev.created_at_ms,
                            retention,
                        )?);
                    }
                    _ => {}
                }
            }
            t.collapse
                .insert(
                    (ch.as_str(), ev.collapse_key.as_str()),
                    ev.event_id.as_str(),
                )
                .map_err(db)?;
        }
        if let Some(at_ms) = t.early_ack(&ev.event_id, &ch) {
            ev.seq = self.next_seq;
            self.next_seq += 1;
            t.write_final(&mut ev, &FinishReason::Delivered, at_ms, retention)?;
            t.delivered_at_enqueue
                .insert(ev.event_id.clone(), ch.clone());
            let done = (ev.clone(), FinishReason::Delivered);
            return Ok((ev, finished, Some(done)));
        }
        let queued = t.queues.len(&ch);
        let mut excess = (queued + 1).saturating_sub(self.config.queue_limit.max(1));
        if excess > 0 {
            // Oldest non-collapsible first; collapsible ones only if nothing
            // else is left. Events on their way to the device are never
            // dropped: the queue may then exceed its limit for a while.
            // The oldest few nearly always hold the victims; the whole
            // queue is read only when they do not.
            let mut collapsible = vec![];
            let mut most = excess + 1;
            loop {
                let entries = t.queues.oldest(&ch, most);
                let whole = entries.len() < most;
                collapsible.clear();
                for (seq, id) in entries {
                    if excess == 0 {
                        break;
                    }
                    if self.claims.is_claimed(&id) {
                        continue;
                    }
                    let Some(e) = t.live_queued(&ch, seq, &id)? else {
                        // A stale entry, now removed: the queue is shorter.
                        excess -= 1;
                        continue;
                    };
                    if e.collapse_key.is_empty() {
                        finished.push(t.finish(
                            e,
                            FinishReason::QueueFull,
                            ev.created_at_ms,
                            retention,
                        )?);
                        excess -= 1;
                    } else {
                        collapsible.push(e);
                    }
                }
                if excess == 0 || whole {
                    break;
                }
                most = usize::MAX;
            }
            for victim in collapsible {
                if excess == 0 {
                    break;
                }
                finished.push(t.finish(
                    victim,
                    FinishReason::QueueFull,
                    ev.created_at_ms,
                    retention,
                )?);
                excess -= 1;
            }
        }
        ev.seq = self.next_seq;
        self.next_seq += 1;
        t.add_publisher_bytes(&ev.publisher, stored_size(&ev), true)?;
        ev.state = EventState::Queued as i32;
        ev.updated_at_ms = ev.created_at_ms;
        t.put(&ev)?;
        t.queue_log
            .insert(ev.seq, (ch.as_str(), ev.event_id.as_str()))
            .map_err(db)?;
        t.queues.push(&ch, ev.seq, &ev.event_id);
        t.sweep
            .insert((expiry(&ev), ev.event_id.as_str()), ())
            .map_err(db)?;
        Ok((ev, finished, None))
    }

    fn sweep(
        &self,
        t: &mut Tables<'_>,
        now_ms: u64,
        retention: u64,
    ) -> Result<Finished, StoreError> {
        let mut finished = vec![];
        let due: Vec<(u64, String)> = t
            .sweep
            .range((0, "")..=(now_ms, "\u{10ffff}"))
            .map_err(db)?
            .take(MAX_SWEEP)
            .map(|r| r.map(|(k, _)| (k.value().0, k.value().1.to_owned())))
            .collect::<Result<_, _>>()
            .map_err(db)?;
        for (at, id) in due {
            let Some(ev) = t.event(&id)? else {
                t.sweep.remove((at, id.as_str())).map_err(db)?;
                continue;
            };
            if ev.state == EventState::Queued as i32 {
                if expiry(&ev) != at {
                    t.sweep.remove((at, id.as_str())).map_err(db)?;
                } else if !self.claims.is_claimed(&id) {
                    // (finish removes the entry). A claimed event may be
                    // on the device already: it stays until its ack or the
                    // claim ends, and is looked at again next sweep.
                    finished.push(t.finish(ev, FinishReason::Expired, now_ms, retention)?);
                }
            } else {
                t.sweep.remove((at, id.as_str())).map_err(db)?;
                if ev.updated_at_ms.saturating_add(retention) == at {
                    t.forget(&ev)?;
                }
            }
        }
        let keys: Vec<(u64, String)> = t
            .idempotency_sweep
            .range((0, "")..=(now_ms, "\u{10ffff}"))
            .map_err(db)?
            .take(MAX_SWEEP)
            .map(|r| r.map(|(k, _)| (k.value().0, k.value().1.to_owned())))
            .collect::<Result<_, _>>()
            .map_err(db)?;
        for (at, key) in keys {
            t.idempotency_sweep.remove((at, key.as_str())).map_err(db)?;
            t.idempotency.remove(key.as_str()).map_err(db)?;
        }
        Ok(finished)
    }
}

/// The acks of a batch: by event id, each channel it was acked on with the
/// time of its first ack there (an ack from a connection that was never
/// sent the event must not hide the real one).
fn acked_in(batch: &[Job]) -> HashMap<String, Vec<(String, u64)>> {
    let mut out: HashMap<String, Vec<(String, u64)>> = HashMap::new();
    for job in batch {
        if let Op::Ack { acks, at_ms } = &job.op {
            for a in acks {
                let on = out.entry(a.event_id.clone()).or_default();
                if !on.iter().any(|(ch, _)| *ch == a.channel_id) {
                    on.push((a.channel_id.clone(), *at_ms));
                }
            }
        }
    }
    out
}

/// What the writer does with a batch.
#[derive(Debug, PartialEq, Eq)]
enum Plan {
    /// Only reads (and syncs with nothing to sync): one read snapshot.
    Read,
    /// One write transaction, committed with fsync when `durable`.
    Commit { durable: bool },
}

/// Decides a batch's [`Plan`]: a commit if it writes, or if it asks for a
/// sync while a commit without fsync is `unsynced`; durable if it asks for
/// a sync, if any operation needs an fsync, or without group commit.
fn plan(batch: &[Job], group_commit: bool, unsynced: bool) -> Plan {
    let sync = batch.iter().any(|j| matches!(j.op, Op::Sync));
    let writes = batch.iter().any(|j| j.op.writes());
    if !(writes || (sync && unsynced)) {
        return Plan::Read;
    }
    Plan::Commit {
        durable: sync || !group_commit || durable_ops(batch) > 0,
    }
}

/// How many operations of `batch` need an fsync. A new event whose ack is
/// in the same batch needs none: the device has it, so the publisher may be
/// told so at once, and its record (written once, as delivered) reaches the
/// disk with the next sync like an ack does. Unless it carries an
/// idempotency key or a collapse key: losing the key in a crash could turn
/// a publisher's retry into a second wake, and losing a collapse could
/// bring back the event it replaced.
fn durable_ops(batch: &[Job]) -> usize {
    let mut acked: Option<std::collections::HashSet<(&str, &str)>> = None;
    let mut n = 0;
    for job in batch {
        let needs = match &job.op {
            Op::Enqueue(ev, None) if ev.collapse_key.is_empty() => {
                let acked = acked.get_or_insert_with(|| acks_in(batch));
                !acked.contains(&(ev.event_id.as_str(), ev.channel_id.as_str()))
            }
            op => op.needs_fsync(),
        };
        n += usize::from(needs);
    }
    n
}

/// Takes out of `batch` the new events to hold back for the next one.
///
/// The device gets its wake beside the commit, and its ack often arrives a
/// moment after the commit window closed. When the only writes of `batch`
/// that need an fsync are such events, and none of them was held before
/// (the first `aged` jobs were), they wait for the next batch, where their
/// acks likely are: each is then written once, as delivered, with no fsync,
/// and the rest of this batch commits without one. An event held once is
/// committed with the next batch, acked or not, so a Publish answer waits at
/// most two commit windows. Anything else that needs the disk, and queue
/// reads (which must see every enqueue submitted before them), keep the
/// batch whole. So does a batch without acks: its events are for devices
/// that are not acking (offline ones, mostly), and holding them would only
/// delay their answer.
fn hold_back(batch: &mut Vec<Job>, aged: usize) -> Vec<Job> {
    if !batch.iter().any(|j| matches!(j.op, Op::Ack { .. })) {
        return vec![];
    }
    let hold: Vec<usize> = {
        let acked = acks_in(batch);
        let mut hold = vec![];
        for (i, job) in batch.iter().enumerate() {
            match &job.op {
                Op::Enqueue(ev, None) if ev.collapse_key.is_empty() => {
                    if acked.contains(&(ev.event_id.as_str(), ev.channel_id.as_str())) {
                        continue;
                    }
                    if i < aged {
                        return vec![];
                    }
                    hold.push(i);
                }
                Op::Ack { .. } | Op::PutChannel { .. } | Op::Settle { .. } => {}
                _ => return vec![],
            }
        }
        hold
    };
    if hold.is_empty() {
        return vec![];
    }
    let mut held = Vec::with_capacity(hold.len());
    let mut kept = Vec::with_capacity(batch.len() - hold.len());
    let mut next = hold.iter().peekable();
    for (i, job) in std::mem::take(batch).into_iter().enumerate() {
        if next.peek() == Some(&&i) {
            next.next();
            held.push(job);
        } else {
            kept.push(job);
        }
    }
    *batch = kept;
    held
}

/// Each (event id, channel) acked in `batch`, as [`acked_in`] sees them.
fn acks_in(batch: &[Job]) -> std::collections::HashSet<(&str, &str)> {
    let mut out = std::collections::HashSet::new();
    for job in batch {
        if let Op::Ack { acks, .. } = &job.op {
            for a in acks {
                out.insert((a.event_id.as_str(), a.channel_id.as_str()));
            }
        }
    }
    out
}

/// Whether a batch should wait (up to the commit delay) for more
/// operations: it holds writes that may need an fsync (new events, even
/// those acked already: closing early would double the commits), and fewer
/// than [`DELAY_UNTIL_OPS`] of them. Batches of only acks, reads and the
/// like commit at once: waiting makes their callers slower and saves no
/// fsync.
fn wants_company(batch: &[Job]) -> bool {
    let durable = batch.iter().filter(|j| j.op.needs_fsync()).count();
    durable > 0 && durable < DELAY_UNTIL_OPS && batch.len() < MAX_BATCH
}

/// Adds what is already waiting to `batch`, up to [`MAX_BATCH`].
fn take_waiting(batch: &mut Vec<Job>, rx: &mut mpsc::Receiver<Job>) {
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
}

fn count(why: &FinishReason) {
    match why {
        FinishReason::Delivered => counter!(m::DELIVERED).increment(1),
        FinishReason::Expired => counter!(m::EXPIRED).increment(1),
        other => counter!(m::DROPPED, "reason" => other.label()).increment(1),
    }
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// What a queued event counts against its publisher's storage quota.
fn stored_size(ev: &StoredEvent) -> u64 {
    (ev.payload.len() + ev.collapse_key.len()) as u64
}

/// Whether `ev` is queued as the entry (`channel`, `seq`) of a queue.
fn is_queued_at(ev: &StoredEvent, channel: &str, seq: u64) -> bool {
    ev.state == EventState::Queued as i32 && ev.channel_id == channel && ev.seq == seq
}

/// When a queued event expires, Unix ms.
fn expiry(ev: &StoredEvent) -> u64 {
    ev.created_at_ms.saturating_add(u64::from(ev.ttl_s) * 1000)
}

struct Tables<'t> {
    channels: redb::Table<'t, &'static str, &'static [u8]>,
    events: redb::Table<'t, &'static str, &'static [u8]>,
    queue_log: redb::Table<'t, u64, (&'static str, &'static str)>,
    collapse: redb::Table<'t, (&'static str, &'static str), &'static str>,
    sweep: redb::Table<'t, (u64, &'static str), ()>,
    idempotency: redb::Table<'t, &'static str, &'static [u8]>,
    idempotency_sweep: redb::Table<'t, (u64, &'static str), ()>,
    publisher_bytes: redb::Table<'t, &'static str, u64>,
    /// Publishers whose byte count changed, with the new count.
    touched: HashMap<String, u64>,
    /// [`Writer::queues`], while the batch is applied.
    queues: Queues,
    /// Acks in the batch being applied: event id -> [(channel, when)].
    acked_in_batch: HashMap<String, Vec<(String, u64)>>,
    /// Events the batch stored as delivered at their enqueue, with their
    /// channel; their acks on that channel count as delivered once.
    delivered_at_enqueue: HashMap<String, String>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Self, StoreError> {
        Ok(Self {
            channels: txn.open_table(CHANNELS).map_err(db)?,
            events: txn.open_table(EVENTS).map_err(db)?,
            queue_log: txn.open_table(QUEUE_LOG).map_err(db)?,
            collapse: txn.open_table(COLLAPSE).map_err(db)?,
            sweep: txn.open_table(SWEEP).map_err(db)?,
            idempotency: txn.open_table(IDEMPOTENCY).map_err(db)?,
            idempotency_sweep: txn.open_table(IDEMPOTENCY_SWEEP).map_err(db)?,
            publisher_bytes: txn.open_table(PUBLISHER_BYTES).map_err(db)?,
            touched: HashMap::new(),
            queues: Queues::default(),
            acked_in_batch: HashMap::new(),
            delivered_at_enqueue: HashMap::new(),
        })
    }

    /// Bytes `publisher` has queued, counting this batch's changes.
    fn publisher_bytes(&self, publisher: &str) -> Result<u64, StoreError> {
        if let Some(n) = self.touched.get(publisher) {
            return Ok(*n);
        }
        Ok(self
            .publisher_bytes
            .get(publisher)
            .map_err(db)?
            .map_or(0, |v| v.value()))
    }

    /// Adds (or removes) bytes queued by `publisher`; written to the table
    /// once per batch by [`Tables::write_publisher_bytes`].
    fn add_publisher_bytes(
        &mut self,
        publisher: &str,
        n: u64,
        add: bool,
    ) -> Result<(), StoreError> {
        if publisher.is_empty() || n == 0 {
            return Ok(());
        }
        let cur = self.publisher_bytes(publisher)?;
        let next = if add {
            cur.saturating_add(n)
        } else {
            cur.saturating_sub(n)
        };
        self.touched.insert(publisher.to_owned(), next);
        Ok(())
    }

    /// Writes the batch's changed byte counts.
    fn write_publisher_bytes(&mut self) -> Result<(), StoreError> {
        for (publisher, n) in &self.touched {
            if *n == 0 {
                self.publisher_bytes
                    .remove(publisher.as_str())
                    .map_err(db)?;
            } else {
                self.publisher_bytes
                    .insert(publisher.as_str(), *n)
                    .map_err(db)?;
            }
        }
        Ok(())
    }

    fn event(&self, id: &str) -> Result<Option<StoredEvent>, StoreError> {
        let found = self.events.get(id).map_err(db)?;
        found.map(|v| decode("events", v.value())).transpose()
    }

    fn put(&mut self, ev: &StoredEvent) -> Result<(), StoreError> {
        self.events
            .insert(ev.event_id.as_str(), ev.encode_to_vec().as_slice())
            .map_err(db)?;
        Ok(())
    }

    /// When the device acked this event on `channel`, if its ack is in the
    /// batch being applied (taken: it counts once).
    fn early_ack(&mut self, event_id: &str, channel: &str) -> Option<u64> {
        let at = self
            .acked_in_batch
            .get(event_id)?
            .iter()
            .find(|(ch, _)| ch == channel)
            .map(|(_, at)| *at)?;
        self.acked_in_batch.remove(event_id);
        Some(at)
    }

    fn queued(&mut self, channel: &str) -> Result<Vec<StoredEvent>, StoreError> {
        let mut out = vec![];
        for (seq, id) in self.queues.oldest(channel, usize::MAX) {
            if let Some(ev) = self.live_queued(channel, seq, &id)? {
                out.push(ev);
            }
        }
        Ok(out)
    }

    /// The event of a queue entry, if it is still queued there. An entry
    /// whose event is gone or finished is stale (left by a relay older
    /// than `queue_log` run on the same store in between): it is removed.
    fn live_queued(
        &mut self,
        channel: &str,
        seq: u64,
        id: &str,
    ) -> Result<Option<StoredEvent>, StoreError> {
        match self.event(id)? {
            Some(ev) if is_queued_at(&ev, channel, seq) => Ok(Some(ev)),
            _ => {
                self.queue_log.remove(seq).map_err(db)?;
                self.queues.remove(channel, seq);
                Ok(None)
            }
        }
    }

    /// Removes every stale queue entry (see [`Tables::live_queued`]).
    fn drop_stale_entries(&mut self) -> Result<(), StoreError> {
        let before = self.queues.total();
        for (channel, seq, id) in self.queues.entries() {
            self.live_queued(&channel, seq, &id)?;
        }
        let dropped = before - self.queues.total();
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "queue entries of events finished by an older relay removed"
            );
        }
        Ok(())
    }

    /// An earlier use of an idempotency key, if any.
    fn duplicate(&self, key: &IdempotencyKey) -> Result<Option<Duplicate>, StoreError> {
        let found = self
            .idempotency
            .get(key.scoped_key.as_str())
            .map_err(db)?
            .map(|v| decode::<StoredIdempotency>("idempotency", v.value()));
        let Some(rec) = found else { return Ok(None) };
        let rec = rec?;
        if rec.request_hash != key.request_hash {
            return Ok(Some(Duplicate::Mismatch));
        }
        if !rec.stored {
            return Ok(Some(Duplicate::NotStored(rec)));
        }
        Ok(Some(match self.event(&rec.event_id)? {
            Some(ev) => Duplicate::Stored(ev),
            None => Duplicate::Forgotten(rec.event_id),
        }))
    }

    fn remember_key(
        &mut self,
        key: &IdempotencyKey,
        event_id: &str,
        now_ms: u64,
        stored: bool,
        retention: u64,
    ) -> Result<(), StoreError> {
        let rec = StoredIdempotency {
            event_id: event_id.to_owned(),
            request_hash: key.request_hash.clone(),
            created_at_ms: now_ms,
            status: 0,
            stored,
        };
        self.idempotency
            .insert(key.scoped_key.as_str(), rec.encode_to_vec().as_slice())
            .map_err(db)?;
        self.idempotency_sweep
            .insert(
                (now_ms.saturating_add(retention), key.scoped_key.as_str()),
                (),
            )
            .map_err(db)?;
        Ok(())
    }

    /// Deletes a finished event past its retention.
    fn forget(&mut self, ev: &StoredEvent) -> Result<(), StoreError> {
        self.events.remove(ev.event_id.as_str()).map_err(db)?;
        let key = (ev.channel_id.as_str(), ev.collapse_key.as_str());
        let points_here = self
            .collapse
            .get(key)
            .map_err(db)?
            .is_some_and(|v| v.value() == ev.event_id);
        if points_here {
            self.collapse.remove(key).map_err(db)?;
        }
        Ok(())
    }

    /// Moves a queued event to a final state: out of the queue and the TTL
    /// index, into the retention index.
    fn finish(
        &mut self,
        mut ev: StoredEvent,
        why: FinishReason,
        at_ms: u64,
        retention: u64,
    ) -> Result<(StoredEvent, FinishReason), StoreError> {
        // Disk first: an error here leaves the index as it was.
        self.queue_log.remove(ev.seq).map_err(db)?;
        self.queues.remove(&ev.channel_id, ev.seq);
        self.sweep
            .remove((expiry(&ev), ev.event_id.as_str()))
            .map_err(db)?;
        self.add_publisher_bytes(&ev.publisher, stored_size(&ev), false)?;
        self.write_final(&mut ev, &why, at_ms, retention)?;
        Ok((ev, why))
    }

    /// Writes an event's final state (without its payload) and when its
    /// record is forgotten.
    fn write_final(
        &mut self,
        ev: &mut StoredEvent,
        why: &FinishReason,
        at_ms: u64,
        retention: u64,
    ) -> Result<(), StoreError> {
        let (state, reason) = why.state_and_reason();
        ev.state = state as i32;
        ev.reason = reason.to_owned();
        ev.replaced_by = match why {
            FinishReason::Collapsed { by } => by.clone(),
            _ => String::new(),
        };
        ev.updated_at_ms = at_ms;
        ev.payload.clear();
        self.put(ev)?;
        self.sweep
            .insert((at_ms.saturating_add(retention), ev.event_id.as_str()), ())
            .map_err(db)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(op: Op) -> Job {
        Job {
            op,
            reply: tokio::sync::oneshot::channel().0,
        }
    }

    fn enqueue() -> Job {
        job(Op::Enqueue(Box::default(), None))
    }

    fn ack() -> Job {
        job(Op::Ack {
            acks: vec![],
            at_ms: 0,
        })
    }

    fn read() -> Job {
        job(Op::ClaimQueued {
            channel_ids: vec![],
        })
    }

    #[test]
    fn a_batch_is_read_committed_lazily_or_durably_by_what_it_holds() {
        let durable = Plan::Commit { durable: true };
        let lazy = Plan::Commit { durable: false };
        assert_eq!(plan(&[read()], true, false), Plan::Read);
        assert_eq!(plan(&[read(), ack()], true, false), lazy);
        assert_eq!(plan(&[ack(), enqueue()], true, false), durable);
        // Without group commit every write is durable.
        assert_eq!(plan(&[ack()], false, false), durable);
        // A sync commits only when something is waiting for the disk.
        assert_eq!(plan(&[job(Op::Sync)], true, false), Plan::Read);
        assert_eq!(plan(&[job(Op::Sync)], true, true), durable);
        assert_eq!(plan(&[ack(), job(Op::Sync)], true, false), durable);
    }

    fn enqueue_of(id: &str, channel: &str, key: Option<&str>, collapse: &str) -> Job {
        let ev = StoredEvent {
            event_id: id.into(),
            channel_id: channel.into(),
            collapse_key: collapse.into(),
            ..Default::default()
        };
        let key = key.map(|k| IdempotencyKey {
            scoped_key: k.into(),
            request_hash: vec![],
        });
        job(Op::Enqueue(Box::new(ev), key))
    }

    fn ack_of(id: &str, channel: &str) -> Job {
        job(Op::Ack {
            acks: vec![AckItem {
                event_id: id.into(),
                channel_id: channel.into(),
            }],
            at_ms: 1,
        })
    }

    #[test]
    fn an_event_acked_in_its_own_batch_needs_no_fsync_unless_a_key_rides_on_it() {
        let lazy = Plan::Commit { durable: false };
        let durable = Plan::Commit { durable: true };
        let plain = || enqueue_of("e", "ch", None, "");
        assert_eq!(plan(&[plain(), ack_of("e", "ch")], true, false), lazy);
        // The ack may come first in the batch.
        assert_eq!(plan(&[ack_of("e", "ch"), plain()], true, false), lazy);
        // Acked on another channel, or another event acked: still durable.
        assert_eq!(plan(&[plain(), ack_of("e", "other")], true, false), durable);
        assert_eq!(plan(&[plain(), ack_of("f", "ch")], true, false), durable);
        // A stranger's ack first does not hide the owner's.
        let both = [plain(), ack_of("e", "other"), ack_of("e", "ch")];
        assert_eq!(plan(&both, true, false), lazy);
        // An idempotency key or a collapse must survive a crash.
        let keyed = enqueue_of("e", "ch", Some("k"), "");
        assert_eq!(plan(&[keyed, ack_of("e", "ch")], true, false), durable);
        let collapsing = enqueue_of("e", "ch", None, "score");
        assert_eq!(plan(&[collapsing, ack_of("e", "ch")], true, false), durable);
        // One unacked event makes the whole batch durable.
        let two = [plain(), enqueue_of("g", "ch", None, ""), ack_of("e", "ch")];
        assert_eq!(plan(&two, true, false), durable);
        assert_eq!(durable_ops(&two), 1);
    }

    fn ids(batch: &[Job]) -> Vec<String> {
        batch
            .iter()
            .map(|j| match &j.op {
                Op::Enqueue(ev, _) => ev.event_id.clone(),
                Op::Ack { acks, .. } => format!("ack:{}", acks[0].event_id),
                _ => "other".into(),
            })
            .collect()
    }

    #[test]
    fn unacked_new_events_wait_one_batch_for_their_acks_and_no_longer() {
        let plain = |id: &str| enqueue_of(id, "ch", None, "");
        // e is acked: it stays; f and g wait, in order.
        let mut batch = vec![plain("e"), plain("f"), ack_of("e", "ch"), plain("g")];
        let held = hold_back(&mut batch, 0);
        assert_eq!(ids(&held), ["f", "g"]);
        assert_eq!(ids(&batch), ["e", "ack:e"]);
        assert_eq!(plan(&batch, true, false), Plan::Commit { durable: false });
        // Next batch: f was acked meanwhile, g was not: g was held once
        // already, so the batch is committed whole, with fsync.
        let mut next = held;
        next.extend([ack_of("f", "ch"), plain("h")]);
        assert!(hold_back(&mut next, 2).is_empty());
        assert_eq!(next.len(), 4);
        assert_eq!(plan(&next, true, false), Plan::Commit { durable: true });
        // Both held ones acked: only the new one waits.
        let mut next = vec![plain("f"), plain("g"), ack_of("f", "ch"), ack_of("g", "ch")];
        next.push(plain("h"));
        assert_eq!(ids(&hold_back(&mut next, 2)), ["h"]);
        assert_eq!(plan(&next, true, false), Plan::Commit { durable: false });
    }

    #[test]
    fn a_batch_that_needs_the_disk_or_reads_a_queue_holds_nothing_back() {
        let plain = || enqueue_of("f", "ch", None, "");
        for other in [
            enqueue_of("k", "ch", Some("key"), ""),
            enqueue_of("c", "ch", None, "score"),
            read(),
            job(Op::Sync),
            job(Op::Sweep { now_ms: 1 }),
        ] {
            let mut batch = vec![plain(), other];
            assert!(hold_back(&mut batch, 0).is_empty());
            assert_eq!(batch.len(), 2);
        }
        // Nothing unacked: nothing to hold.
        let mut batch = vec![plain(), ack_of("f", "ch")];
        assert!(hold_back(&mut batch, 0).is_empty());
        // Only unacked new events, and acks of others: all wait.
        let mut batch = vec![plain(), ack_of("old", "ch")];
        assert_eq!(hold_back(&mut batch, 0).len(), 1);
        assert_eq!(ids(&batch), ["ack:old"]);
        // No acks at all (offline devices): nothing waits.
        let mut batch = vec![plain(), enqueue_of("g", "ch", None, "")];
        assert!(hold_back(&mut batch, 0).is_empty());
    }

    #[test]
    fn only_a_small_batch_that_needs_an_fsync_waits_for_company() {
        assert!(wants_company(&[enqueue()]));
        assert!(wants_company(&[enqueue(), ack(), read()]));
        assert!(!wants_company(&[ack(), read()]), "nothing to fsync");
        let full: Vec<Job> = (0..DELAY_UNTIL_OPS).map(|_| enqueue()).collect();
        assert!(!wants_company(&full), "enough to share one fsync");
    }
}
