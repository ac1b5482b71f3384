//! The embedded durable store (redb): channels, events, per-channel
//! queues, idempotency keys, and the TTL / retention index.
//!
//! Every operation goes through one writer thread that **group-commits**: it
//! takes the first waiting operation plus everything queued behind it (up
//! to 1024), applies them in one write transaction, and commits once (one
//! fsync for the batch). An operation is answered only after that commit,
//! so a Publish that returned OK survives `kill -9`. The writer is also the
//! one place that decides what happens to a stored event (queued, dropped,
//! expired, delivered), and it counts each final state once, as it commits.
//!
//! Queue reads for delivery ([`Store::claim_queued`]) go through the same
//! thread: they see every operation submitted before them (so an event
//! whose enqueue was submitted before a device's Register is never missed),
//! and they claim what they return ([`crate::claims`]) in the thread that
//! decides drops, so an event on its way to a device is never reported
//! dropped or expired. Other reads (GetEvent) use redb's MVCC snapshots on
//! tokio's blocking pool, never on the async workers.
//!
//! Tables:
//! - `channels`: channel id -> `StoredChannel`
//! - `events`: event id -> `StoredEvent` (kept after delivery for
//!   `status_retention`, so GetEvent can answer)
//! - `queue_log`: seq -> (channel id, event id), every queued event in
//!   arrival order; each channel's queue is indexed in memory
//!   ([`queues`]). Stores of earlier versions kept `queue`: (channel id,
//!   seq) -> event id, moved into `queue_log` on open
//! - `collapse`: (channel id, collapse key) -> event id
//! - `sweep`: (due ms, event id) -> (): TTL expiry of queued events and the
//!   end of retention of finished ones
//! - `idempotency`: scoped key -> `StoredIdempotency`, and
//!   `idempotency_sweep`: (due ms, scoped key) -> ()
//! - `meta`: counters

mod queues;
mod writer;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redb::{Database, ReadableTable};
use thiserror::Error;
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::claims::{Claim, Claims};
use crate::pb::{StoredChannel, StoredEvent, StoredIdempotency};
use writer::{Op, Writer, CHANNELS, EVENTS};

/// File name of the database in the data directory.
pub const DB_FILE: &str = "wakewire.redb";

/// A store failure. The operation did not take effect.
#[derive(Debug, Clone, Error)]
pub enum StoreError {
    /// The database failed (I/O error, disk full, corruption): see the
    /// source. Retrying later may help for I/O errors.
    #[error("store: {0}")]
    Database(Arc<redb::Error>),
    /// A record could not be decoded: the file is damaged or from an
    /// incompatible version.
    #[error("store: corrupt record in table {table}: {source}")]
    Corrupt {
        /// Table name.
        table: &'static str,
        /// Decoder error.
        source: prost::DecodeError,
    },
    /// The writer thread has stopped (the relay is shutting down).
    #[error("store: the writer has stopped")]
    WriterStopped,
    /// The writer thread could not be started.
    #[error("store: cannot start the writer thread: {0}")]
    Thread(Arc<std::io::Error>),
    /// A blocking read could not run (the runtime is shutting down).
    #[error("store: read task failed: {0}")]
    Read(String),
}

impl StoreError {
    /// Whether trying the same operation again later may succeed.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, StoreError::Corrupt { .. })
    }
}

/// Wraps any redb error.
pub(crate) fn db<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Database(Arc::new(e.into()))
}

/// Decodes a record of `table`.
pub(crate) fn decode<M: prost::Message + Default>(
    table: &'static str,
    bytes: &[u8],
) -> Result<M, StoreError> {
    M::decode(bytes).map_err(|source| StoreError::Corrupt { table, source })
}

/// Why a stored event reached a final state: counted once, where the store
/// commits, and reported in receipts as `EventStatus.state` and `.reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    /// Its device acked it.
    Delivered,
    /// Its TTL ran out before any ack.
    Expired,
    /// Dropped to make room in its channel's full queue.
    QueueFull,
    /// Replaced by a newer event with the same collapse key.
    Collapsed {
        /// The newer event.
        by: String,
    },
    /// Its channel is gone (unregistered or expired).
    ChannelGone,
}

impl FinishReason {
    /// The API state and reason string of this final state.
    pub fn state_and_reason(&self) -> (wakewire_api::pb::EventState, &'static str) {
        use wakewire_api::pb::EventState;
        match self {
            FinishReason::Delivered => (EventState::Delivered, ""),
            FinishReason::Expired => (EventState::Expired, "ttl"),
            FinishReason::QueueFull => (EventState::Dropped, "queue_full"),
            FinishReason::Collapsed { .. } => (EventState::Dropped, "collapsed"),
            FinishReason::ChannelGone => (EventState::Dropped, "channel_gone"),
        }
    }

    /// Metric label.
    pub fn label(&self) -> &'static str {
        match self {
            FinishReason::Delivered => "delivered",
            FinishReason::Expired => "expired",
            FinishReason::QueueFull => "queue_full",
            FinishReason::Collapsed { .. } => "collapsed",
            FinishReason::ChannelGone => "channel_gone",
        }
    }
}

/// Store settings.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Most queued events per channel; the oldest non-collapsible event not
    /// on its way to the device is dropped to make room.
    pub queue_limit: usize,
    /// How long finished events stay queryable.
    pub status_retention: Duration,
    /// How long a Publish idempotency key is remembered.
    pub idempotency_retention: Duration,
    /// Commit many operations per fsync (true) or one each (false: only to
    /// measure what group commit saves).
    pub group_commit: bool,
    /// How long a small batch that needs an fsync waits for more operations
    /// to share it (zero: commit at once).
    pub commit_delay: Duration,
    /// Bytes (payloads and collapse keys) one publisher may have queued.
    pub max_bytes_per_publisher: u64,
}

/// A Publish idempotency key, scoped to its publisher.
#[derive(Debug, Clone)]
pub struct IdempotencyKey {
    /// Publisher scope and key, joined.
    pub scoped_key: String,
    /// SHA-256 of the request content.
    pub request_hash: Vec<u8>,
}

/// What [`Store::enqueue`] did.
#[derive(Debug)]
pub enum Enqueued {
    /// The event is stored and queued; `displaced` reached a final state to
    /// make room (queue full, collapsed).
    Stored {
        /// The event as stored.
        event: StoredEvent,
        /// Events it displaced.
        displaced: Vec<(StoredEvent, FinishReason)>,
    },
    /// The idempotency key was used before: nothing was stored.
    Duplicate(Duplicate),
    /// The publisher has `stored` bytes queued and `limit` is its quota:
    /// nothing was stored.
    OverQuota {
        /// Bytes it has queued.
        stored: u64,
        /// Its quota.
        limit: u64,
    },
}

/// An earlier Publish with the same idempotency key.
#[derive(Debug, Clone)]
pub enum Duplicate {
    /// The earlier event, as stored now (its current state).
    Stored(StoredEvent),
    /// The earlier event was never stored (ttl 0): its first answer.
    NotStored(StoredIdempotency),
    /// The earlier event is stored but past its retention.
    Forgotten(String),
    /// The same key came with a different request.
    Mismatch,
}

/// One ack to record.
#[derive(Debug, Clone)]
pub struct AckItem {
    /// Event id.
    pub event_id: String,
    /// The channel the acking connection delivered it on.
    pub channel_id: String,
}

/// What [`Store::ack`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AckOutcome {
    /// Events now delivered.
    pub delivered: usize,
    /// Acks ignored: unknown event, not queued, or not of that channel.
    pub ignored: usize,
}

/// An operation's result, as the writer hands it back.
pub(crate) enum Reply {
    Enqueued(Enqueued),
    Acked(AckOutcome),
    Finished(Vec<(StoredEvent, FinishReason)>),
    Queued(Vec<(StoredEvent, Claim)>),
    Reserved(Option<Duplicate>),
    Done,
}

pub(crate) struct Job {
    pub(crate) op: Op,
    pub(crate) reply: oneshot::Sender<Result<Reply, StoreError>>,
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    jobs: mpsc::Sender<Job>,
    receipts: broadcast::Sender<(StoredEvent, FinishReason)>,
    claims: Arc<Claims>,
    /// Bytes queued per publisher, as last committed (mirror of a table).
    publisher_bytes: Arc<dashmap::DashMap<String, u64>>,
    /// Set while a commit without fsync is not on disk yet.
    unsynced: Arc<AtomicBool>,
    /// Durable commits begun (counted before each starts).
    durable_begun: Arc<AtomicU64>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

/// An operation submitted to the writer, not yet answered. Everything
/// submitted after it is applied after it.
pub struct Pending(oneshot::Receiver<Result<Reply, StoreError>>);

impl Pending {
    async fn reply(self) -> Result<Reply, StoreError> {
        self.0.await.map_err(|_| StoreError::WriterStopped)?
    }

    /// Waits for the enqueue this was submitted for.
    pub async fn enqueued(self) -> Result<Enqueued, StoreError> {
        match self.reply().await? {
            Reply::Enqueued(e) => Ok(e),
            _ => Err(StoreError::Read("unexpected store reply".into())),
        }
    }
}

impl Store {
    /// Opens (or creates) the database in `dir` and starts the writer
    /// thread. Events claimed in `claims` are never dropped or expired.
    pub fn open(dir: &Path, config: StoreConfig, claims: Arc<Claims>) -> Result<Self, StoreError> {
        let path = dir.join(DB_FILE);
        let database = Database::create(&path).map_err(db)?;
        // redb creates the file with the process umask (often 0644): like
        // every file of the data directory, it is the owner's only.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| db(redb::StorageError::Io(e)))?;
        Self::start(database, config, claims)
    }

    /// A store in memory, for a relay whose state lives elsewhere (cluster
    /// mode keeps it in JetStream): it holds nothing and writes no file.
    pub fn open_in_memory(config: StoreConfig, claims: Arc<Claims>) -> Result<Self, StoreError> {
        let database = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(db)?;
        Self::start(database, config, claims)
    }

    fn start(
        database: Database,
        config: StoreConfig,
        claims: Arc<Claims>,
    ) -> Result<Self, StoreError> {
        let database = Arc::new(database);
        let (receipts, _) = broadcast::channel(65_536);
        let publisher_bytes = Arc::new(dashmap::DashMap::new());
        let unsynced = Arc::new(AtomicBool::new(false));
        let durable_begun = Arc::new(AtomicU64::new(0));
        let writer = Writer::open(
            database.clone(),
            config,
            receipts.clone(),
            claims.clone(),
            publisher_bytes.clone(),
            (unsynced.clone(), durable_begun.clone()),
        )?;
        let (jobs, rx) = mpsc::channel(65_536);
        let thread = |e| StoreError::Thread(Arc::new(e));
        // The writer runs on a runtime of its own (for the commit delay's
        // timer), built in its thread; a failure to build it is reported
        // here.
        let (ready, started) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("wakewire-store".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                {
                    Ok(rt) => {
                        let _ = ready.send(Ok(()));
                        writer.run(rt, rx);
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                    }
                }
            })
            .map_err(thread)?;
        started
            .recv()
            .map_err(|_| StoreError::WriterStopped)?
            .map_err(thread)?;
        let sync_jobs = jobs.downgrade();
        std::thread::Builder::new()
            .name("wakewire-store-sync".into())
            .spawn({
                let unsynced = unsynced.clone();
                move || sync_loop(&sync_jobs, &unsynced)
            })
            .map_err(thread)?;
        Ok(Self {
            db: database,
            jobs,
            receipts,
            claims,
            publisher_bytes,
            unsynced,
            durable_begun,
        })
    }

    /// How many durable commits (with fsync) have begun since the store
    /// opened. Unchanged across a span means none started within it: a
    /// copy of the file taken then holds nothing newer than the last
    /// durable commit before it, which is what a crash would leave.
    pub fn durable_commits_begun(&self) -> u64 {
        self.durable_begun.load(Ordering::Acquire)
    }

    /// Whether a commit made without fsync (acks) is not yet on disk; the
    /// store's sync thread makes it durable within 100 ms.
    pub fn pending_sync(&self) -> bool {
        self.unsynced.load(Ordering::Acquire)
    }

    /// Bytes `publisher` has queued (as of the last commit).
    pub fn publisher_bytes(&self, publisher: &str) -> u64 {
        self.publisher_bytes.get(publisher).map_or(0, |v| *v)
    }

    /// The claim table the writer respects.
    pub fn claims(&self) -> &Arc<Claims> {
        &self.claims
    }

    /// Hands an operation to the writer; answers once it is queued there.
    async fn begin(&self, op: Op) -> Result<Pending, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job { op, reply })
            .await
            .map_err(|_| StoreError::WriterStopped)?;
        Ok(Pending(answer))
    }

    async fn submit(&self, op: Op) -> Result<Reply, StoreError> {
        self.begin(op).await?.reply().await
    }

    /// Submits a new event (collapsing and bounding its channel's queue),
    /// deduplicated by `idempotency` if given. Await the returned
    /// [`Pending::enqueued`] for the commit.
    pub async fn begin_enqueue(
        &self,
        event: StoredEvent,
        idempotency: Option<IdempotencyKey>,
    ) -> Result<Pending, StoreError> {
        self.begin(Op::Enqueue(Box::new(event), idempotency)).await
    }

    /// Stores a new event and waits for the commit.
    pub async fn enqueue(
        &self,
        event: StoredEvent,
        idempotency: Option<IdempotencyKey>,
    ) -> Result<Enqueued, StoreError> {
        self.begin_enqueue(event, idempotency)
            .await?
            .enqueued()
            .await
    }

    /// Records an idempotency key for an event that is not stored (ttl 0);
    /// `Some` if the key was used before.
    pub async fn reserve_key(
        &self,
        key: IdempotencyKey,
        event_id: String,
        now_ms: u64,
    ) -> Result<Option<Duplicate>, StoreError> {
        match self
            .submit(Op::Reserve {
                key,
                event_id,
                now_ms,
            })
            .await?
        {
            Reply::Reserved(d) => Ok(d),
            _ => Err(StoreError::Read("unexpected store reply".into())),
        }
    }

    /// Records the first answer to a not-stored event's idempotency key.
    pub async fn settle_key(&self, scoped_key: String, status: i32) -> Result<(), StoreError> {
        self.submit(Op::Settle { scoped_key, status })
            .await
            .map(|_| ())
    }

    /// Marks events delivered. An ack counts only for a queued event of
    /// the named channel.
    pub async fn ack(&self, acks: Vec<AckItem>, at_ms: u64) -> Result<AckOutcome, StoreError> {
        match self.submit(Op::Ack { acks, at_ms }).await? {
            Reply::Acked(o) => Ok(o),
            _ => Err(StoreError::Read("unexpected store reply".into())),
        }
    }

    /// Expires unclaimed queued events past their TTL, deletes finished
    /// events past their retention, forgets old idempotency keys.
    pub async fn sweep(&self, now_ms: u64) -> Result<Vec<(StoredEvent, FinishReason)>, StoreError> {
        match self.submit(Op::Sweep { now_ms }).await? {
            Reply::Finished(f) => Ok(f),
            _ => Err(StoreError::Read("unexpected store reply".into())),
        }
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
    ) -> Result<Vec<(StoredEvent, FinishReason)>, StoreError> {
        match self.submit(Op::ChannelGone { id, reason, at_ms }).await? {
            Reply::Finished(f) => Ok(f),
            _ => Err(StoreError::Read("unexpected store reply".into())),
        }
    }

    /// Deletes the records of channels gone before `gone_before_ms`.
    pub async fn forget_channels(
        &self,
        ids: Vec<String>,
        gone_before_ms: u64,
    ) -> Result<(), StoreError> {
        self.submit(Op::ForgetChannels {
            ids,
            gone_before_ms,
        })
        .await
        .map(|_| ())
    }

    /// Waits until every operation submitted before has been committed
    /// and is on disk (fsync).
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.submit(Op::Sync).await.map(|_| ())
    }

    /// The queued events of these channels, oldest first per channel, each
    /// claimed for the caller. Sees every operation submitted before it.
    pub async fn claim_queued(
        &self,
        channel_ids: Vec<String>,
    ) -> Result<Vec<(StoredEvent, Claim)>, StoreError> {
        match self.submit(Op::ClaimQueued { channel_ids }).await? {
            Reply::Queued(q) => Ok(q),
            _ => Err(StoreError::Read("unexpected store reply".into())),
        }
    }

    /// Receipts of events reaching a final state, as they are committed.
    pub fn receipts(&self) -> broadcast::Receiver<(StoredEvent, FinishReason)> {
        self.receipts.subscribe()
    }

    /// Every channel record (blocking: call at start or from a blocking
    /// task).
    pub fn channels_blocking(&self) -> Result<Vec<(String, StoredChannel)>, StoreError> {
        let txn = self.db.begin_read().map_err(db)?;
        let table = txn.open_table(CHANNELS).map_err(db)?;
        let mut out = vec![];
        for row in table.iter().map_err(db)? {
            let (k, v) = row.map_err(db)?;
            out.push((k.value().to_owned(), decode("channels", v.value())?));
        }
        Ok(out)
    }

    /// One channel record.
    pub async fn channel(&self, channel_id: &str) -> Result<Option<StoredChannel>, StoreError> {
        let (database, id) = (self.db.clone(), channel_id.to_owned());
        blocking(move || {
            let txn = database.begin_read().map_err(db)?;
            let table = txn.open_table(CHANNELS).map_err(db)?;
            let found = table.get(id.as_str()).map_err(db)?;
            found.map(|v| decode("channels", v.value())).transpose()
        })
        .await
    }

    /// One event.
    pub async fn event(&self, event_id: &str) -> Result<Option<StoredEvent>, StoreError> {
        let (database, id) = (self.db.clone(), event_id.to_owned());
        blocking(move || {
            let txn = database.begin_read().map_err(db)?;
            let table = txn.open_table(EVENTS).map_err(db)?;
            let found = table.get(id.as_str()).map_err(db)?;
            found.map(|v| decode("events", v.value())).transpose()
        })
        .await
    }
}

/// The store's sync thread: while a commit without fsync is pending, asks
/// the writer for a durable one every [`writer::LAZY_SYNC`]. Ends with the
/// store (when every handle is dropped).
fn sync_loop(jobs: &mpsc::WeakSender<Job>, unsynced: &AtomicBool) {
    loop {
        std::thread::sleep(writer::LAZY_SYNC);
        let Some(jobs) = jobs.upgrade() else { return };
        if unsynced.load(Ordering::Acquire) {
            let (reply, _) = oneshot::channel();
            // A full queue means the writer is busy: a durable commit is
            // due soon anyway; try again next round.
            if let Err(mpsc::error::TrySendError::Closed(_)) = jobs.try_send(Job {
                op: Op::Sync,
                reply,
            }) {
                return;
            }
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Read(e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use wakewire_api::pb::EventState;

    fn store(queue_limit: usize) -> (tempfile::TempDir, Store) {
        store_with_delay(queue_limit, Duration::from_millis(1))
    }

    fn config(queue_limit: usize, commit_delay: Duration) -> StoreConfig {
        StoreConfig {
            queue_limit,
            status_retention: Duration::from_secs(3600),
            idempotency_retention: Duration::from_secs(86_400),
            group_commit: true,
            commit_delay,
            max_bytes_per_publisher: 10_000,
        }
    }

    fn store_with_delay(queue_limit: usize, commit_delay: Duration) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(
            dir.path(),
            config(queue_limit, commit_delay),
            Arc::default(),
        )
        .unwrap();
        (dir, s)
    }

    fn event(id: &str, channel: &str, at: u64) -> StoredEvent {
        StoredEvent {
            event_id: id.into(),
            channel_id: channel.into(),
            payload: b"x".to_vec(),
            created_at_ms: at,
            ttl_s: 60,
            ..Default::default()
        }
    }

    async fn state(s: &Store, id: &str) -> (i32, String) {
        let ev = s.event(id).await.unwrap().unwrap();
        (ev.state, ev.reason)
    }

    #[tokio::test]
    async fn an_event_on_its_way_to_the_device_is_not_dropped_for_a_full_queue() {
        let (_dir, s) = store(2);
        s.enqueue(event("a", "ch", 1), None).await.unwrap();
        s.enqueue(event("b", "ch", 2), None).await.unwrap();
        // A connection read the queue: both are claimed (on their way).
        let claimed = s.claim_queued(vec!["ch".into()]).await.unwrap();
        assert_eq!(claimed.len(), 2);
        // The queue is full, but nothing unclaimed can make room: the new
        // event is stored and the queue exceeds its limit for a while.
        let Enqueued::Stored { displaced, .. } =
            s.enqueue(event("c", "ch", 3), None).await.unwrap()
        else {
            panic!("not stored")
        };
        assert!(displaced.is_empty(), "{displaced:?}");
        // The device acks a; then b's claim ends (its connection closed).
        let acked = s
            .ack(
                vec![AckItem {
                    event_id: "a".into(),
                    channel_id: "ch".into(),
                }],
                4,
            )
            .await
            .unwrap();
        assert_eq!(acked.delivered, 1);
        drop(claimed);
        assert_eq!(state(&s, "a").await.0, EventState::Delivered as i32);
        // Now b is fair game: the next event displaces it.
        let Enqueued::Stored { displaced, .. } =
            s.enqueue(event("d", "ch", 5), None).await.unwrap()
        else {
            panic!("not stored")
        };
        assert_eq!(displaced.len(), 1);
        assert_eq!(displaced[0].0.event_id, "b");
        assert_eq!(displaced[0].1, FinishReason::QueueFull);
        assert_eq!(
            state(&s, "b").await,
            (EventState::Dropped as i32, "queue_full".into())
        );
    }

    #[tokio::test]
    async fn claimed_events_neither_expire_nor_collapse() {
        let (_dir, s) = store(100);
        let mut a = event("a", "ch", 1_000);
        a.ttl_s = 1;
        a.collapse_key = "k".into();
        s.enqueue(a, None).await.unwrap();
        let claimed = s.claim_queued(vec!["ch".into()]).await.unwrap();
        assert!(
            s.sweep(10_000).await.unwrap().is_empty(),
            "expired while claimed"
        );
        let mut b = event("b", "ch", 2_000);
        b.collapse_key = "k".into();
        let Enqueued::Stored { displaced, .. } = s.enqueue(b, None).await.unwrap() else {
            panic!("not stored")
        };
        assert!(displaced.is_empty(), "collapsed while claimed");
        drop(claimed);
        let finished = s.sweep(10_000).await.unwrap();
        assert_eq!(finished.len(), 1);
        assert_eq!(finished[0].1, FinishReason::Expired);
    }

    #[tokio::test]
    async fn an_ack_counts_only_for_the_channel_that_delivered_it() {
        let (_dir, s) = store(100);
        s.enqueue(event("a", "victim", 1), None).await.unwrap();
        let o = s
            .ack(
                vec![AckItem {
                    event_id: "a".into(),
                    channel_id: "attacker".into(),
                }],
                2,
            )
            .await
            .unwrap();
        assert_eq!(
            o,
            AckOutcome {
                delivered: 0,
                ignored: 1
            }
        );
        assert_eq!(state(&s, "a").await.0, EventState::Queued as i32);
    }

    fn ack_of(id: &str) -> Vec<AckItem> {
        vec![AckItem {
            event_id: id.into(),
            channel_id: "ch".into(),
        }]
    }

    #[tokio::test]
    async fn an_ack_is_committed_without_fsync_and_reaches_the_disk_soon_after() {
        let (_dir, s) = store(100);
        s.enqueue(event("a", "ch", 1), None).await.unwrap();
        assert!(
            !s.pending_sync(),
            "an accepted event is on disk when answered"
        );
        s.ack(ack_of("a"), 2).await.unwrap();
        // Every read sees it at once...
        assert_eq!(state(&s, "a").await.0, EventState::Delivered as i32);
        assert!(s.pending_sync(), "an ack alone costs no fsync");
        // ...and the sync thread puts it on disk by itself.
        tokio::time::timeout(Duration::from_secs(10), async {
            while s.pending_sync() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the sync thread made the ack durable");
        // flush() waits for the disk.
        s.enqueue(event("b", "ch", 3), None).await.unwrap();
        s.ack(ack_of("b"), 4).await.unwrap();
        s.flush().await.unwrap();
        assert!(!s.pending_sync());
        // A durable operation in the same batch as acks syncs them too.
        s.enqueue(event("c", "ch", 5), None).await.unwrap();
        let ack = s.ack(ack_of("c"), 6);
        let enq = s.enqueue(event("d", "ch", 7), None);
        let (ack, enq) = tokio::join!(ack, enq);
        ack.unwrap();
        enq.unwrap();
        assert_eq!(state(&s, "c").await.0, EventState::Delivered as i32);
    }

    #[tokio::test]
    async fn an_event_acked_within_its_commit_is_written_once_as_delivered() {
        // The commit delay keeps the enqueue's batch open until the ack
        // (from the device, which got the wake beside the commit) joins it;
        // were the ack late, the unacked event would wait for it in the
        // next batch. Either way the batch needs no fsync.
        let (_dir, s) = store_with_delay(100, Duration::from_millis(300));
        let mut receipts = s.receipts();
        let pending = s.begin_enqueue(event("a", "ch", 1), None).await.unwrap();
        // An ack from another channel does not count, the right one does.
        let stranger = s.ack(
            vec![AckItem {
                event_id: "a".into(),
                channel_id: "other".into(),
            }],
            2,
        );
        let owner = s.ack(ack_of("a"), 3);
        let (enqueued, stranger, owner) = tokio::join!(pending.enqueued(), stranger, owner);
        assert!(matches!(enqueued.unwrap(), Enqueued::Stored { .. }));
        assert_eq!(
            stranger.unwrap(),
            AckOutcome {
                delivered: 0,
                ignored: 1
            }
        );
        assert_eq!(
            owner.unwrap(),
            AckOutcome {
                delivered: 1,
                ignored: 0
            }
        );
        assert!(
            s.pending_sync(),
            "committed without fsync, like an ack: the sync thread makes it durable"
        );
        s.flush().await.unwrap();
        assert!(!s.pending_sync());
        let ev = s.event("a").await.unwrap().unwrap();
        assert_eq!(ev.state, EventState::Delivered as i32);
        assert_eq!(ev.updated_at_ms, 3);
        assert!(ev.payload.is_empty(), "a delivered event keeps no payload");
        assert!(s.claim_queued(vec!["ch".into()]).await.unwrap().is_empty());
        let (receipt, why) = receipts.recv().await.unwrap();
        assert_eq!(
            (receipt.event_id.as_str(), why),
            ("a", FinishReason::Delivered)
        );
        assert!(receipts.try_recv().is_err(), "one receipt");
    }

    #[tokio::test]
    async fn a_full_queue_drops_its_oldest_plain_event_before_any_collapsible_one() {
        let (_dir, s) = store(3);
        let mut collapsible = event("k1", "ch", 1);
        collapsible.collapse_key = "score".into();
        s.enqueue(collapsible, None).await.unwrap();
        s.enqueue(event("p1", "ch", 2), None).await.unwrap();
        s.enqueue(event("p2", "ch", 3), None).await.unwrap();
        let Enqueued::Stored { displaced, .. } =
            s.enqueue(event("p3", "ch", 4), None).await.unwrap()
        else {
            panic!("not stored")
        };
        let ids: Vec<_> = displaced.iter().map(|(e, _)| e.event_id.as_str()).collect();
        assert_eq!(ids, ["p1"]);
        assert_eq!(
            state(&s, "p1").await,
            (EventState::Dropped as i32, "queue_full".into())
        );
        // Only collapsible ones left besides the newest: the oldest goes.
        let (_dir2, s2) = store(1);
        let mut k = event("k", "ch", 1);
        k.collapse_key = "a".into();
        s2.enqueue(k, None).await.unwrap();
        let Enqueued::Stored { displaced, .. } =
            s2.enqueue(event("n", "ch", 2), None).await.unwrap()
        else {
            panic!("not stored")
        };
        assert_eq!(displaced.len(), 1);
        assert_eq!(displaced[0].0.event_id, "k");

        // The plain event sits behind many collapsible ones: still found.
        let (_dir3, s3) = store(30);
        for i in 0..25 {
            let mut k = event(&format!("k{i}"), "ch", i);
            k.collapse_key = format!("key{i}");
            s3.enqueue(k, None).await.unwrap();
        }
        for i in 0..5 {
            s3.enqueue(event(&format!("p{i}"), "ch", 100 + i), None)
                .await
                .unwrap();
        }
        let Enqueued::Stored { displaced, .. } =
            s3.enqueue(event("new", "ch", 200), None).await.unwrap()
        else {
            panic!("not stored")
        };
        assert_eq!(displaced.len(), 1);
        assert_eq!(displaced[0].0.event_id, "p0");
        // The count kept in memory follows acks, drops and new events.
        s3.ack(ack_of("k0"), 201).await.unwrap();
        s3.enqueue(event("n2", "ch", 202), None).await.unwrap();
        assert_eq!(
            state(&s3, "p1").await.0,
            EventState::Queued as i32,
            "room after the ack"
        );
        s3.enqueue(event("n3", "ch", 203), None).await.unwrap();
        assert_eq!(state(&s3, "p1").await.1, "queue_full");
    }

    /// What a `kill -9` leaves on disk: the store file as the page cache
    /// holds it.
    fn crash_image(dir: &Path) -> tempfile::TempDir {
        let image = tempfile::tempdir().unwrap();
        std::fs::copy(dir.join(DB_FILE), image.path().join(DB_FILE)).unwrap();
        image
    }

    /// Opens a crash image as a relay restarting would.
    fn reopen(image: &tempfile::TempDir, queue_limit: usize) -> Store {
        let config = config(queue_limit, Duration::from_millis(1));
        Store::open(image.path(), config, Arc::default()).unwrap()
    }

    #[tokio::test]
    async fn a_crash_before_the_lazy_sync_loses_only_what_devices_have_acked() {
        // Commits without fsync (acks, and events acked within their own
        // commit) reach the disk within 100 ms. A crash inside that window
        // may lose them, and only them: an ack lost sends its event again
        // after the restart (the device drops the duplicate by id); an
        // event acked at its enqueue was answered DELIVERED, and the device
        // has it. Nothing answered as stored is lost.
        let (dir, s) = store_with_delay(100, Duration::from_millis(300));
        let mut inside_the_window = 0;
        for i in 0..10 {
            let (a, b) = (format!("a{i}"), format!("b{i}"));
            // `a` is stored durably (its answer waited for the fsync).
            s.enqueue(event(&a, "ch", 1), None).await.unwrap();
            let durable_before = s.durable_commits_begun();
            // `b` is acked within its commit; `a`'s ack joins that batch.
            let pending = s.begin_enqueue(event(&b, "ch", 2), None).await.unwrap();
            let acks = s.ack(vec![ack_of(&a)[0].clone(), ack_of(&b)[0].clone()], 3);
            let (stored, acks) = tokio::join!(pending.enqueued(), acks);
            assert!(matches!(stored.unwrap(), Enqueued::Stored { .. }));
            assert_eq!(acks.unwrap().delivered, 2);
            assert!(s.pending_sync(), "the acks' commit waits for no fsync");
            let image = crash_image(dir.path());
            // No durable commit (the sync's) began since `a`'s: the copy
            // holds exactly what a crash would leave.
            let before_the_sync = s.durable_commits_begun() == durable_before;
            let crashed = reopen(&image, 100);
            // Whatever the sync thread managed: `a` is there, and `b` is
            // either gone or delivered.
            let a_after = crashed
                .event(&a)
                .await
                .unwrap()
                .expect("a stored event survives");
            let b_after = crashed.event(&b).await.unwrap();
            if let Some(b_after) = &b_after {
                assert_eq!(b_after.state, EventState::Delivered as i32);
            }
            if before_the_sync {
                // The image was taken before the sync: exactly the lazy
                // commit is lost.
                inside_the_window += 1;
                assert_eq!(a_after.state, EventState::Queued as i32);
                assert!(b_after.is_none());
                let again = crashed.claim_queued(vec!["ch".into()]).await.unwrap();
                assert!(
                    again.iter().any(|(ev, _)| ev.event_id == a),
                    "the event whose ack was lost is delivered again"
                );
            }
            drop(crashed);
            s.flush().await.unwrap();
            let image = crash_image(dir.path());
            let synced = reopen(&image, 100);
            for id in [&a, &b] {
                let ev = synced
                    .event(id)
                    .await
                    .unwrap()
                    .expect("on disk after the sync");
                assert_eq!(ev.state, EventState::Delivered as i32);
            }
            if inside_the_window >= 3 {
                break;
            }
        }
        // The sync thread runs every 100 ms: most images fall before it.
        assert!(
            inside_the_window >= 3,
            "only {inside_the_window} images inside the window"
        );
    }

    #[tokio::test]
    async fn queue_entries_left_stale_by_an_older_relay_are_dropped_on_open() {
        // A relay older than `queue_log`, run on this store in between,
        // keeps its queue in the legacy table and finishes events without
        // touching the log. On the next open: its queue is moved into the
        // log, and the log's entries of events it finished are dropped,
        // not delivered again nor counted against the queue limit.
        let (dir, s) = store(2);
        s.enqueue(event("a", "ch", 1), None).await.unwrap();
        s.enqueue(event("b", "ch", 2), None).await.unwrap();
        s.flush().await.unwrap();
        {
            // What the older relay did: delivered "b", queued "d".
            let txn = s.db.begin_write().unwrap();
            {
                let mut events = txn.open_table(EVENTS).unwrap();
                let mut b = s.event("b").await.unwrap().unwrap();
                b.state = EventState::Delivered as i32;
                events.insert("b", b.encode_to_vec().as_slice()).unwrap();
                let mut d = event("d", "ch", 3);
                d.seq = 500;
                d.state = EventState::Queued as i32;
                events.insert("d", d.encode_to_vec().as_slice()).unwrap();
                let mut legacy = txn.open_table(queues::LEGACY_QUEUE).unwrap();
                legacy.insert(("ch", 500), "d").unwrap();
                // And an entry whose event is gone altogether.
                let mut log = txn.open_table(queues::QUEUE_LOG).unwrap();
                log.insert(900, ("ch", "ghost")).unwrap();
            }
            txn.commit().unwrap();
        }
        let image = crash_image(dir.path());
        let s = reopen(&image, 2);
        let queued: Vec<String> = s
            .claim_queued(vec!["ch".into()])
            .await
            .unwrap()
            .into_iter()
            .map(|(ev, _)| ev.event_id)
            .collect();
        assert_eq!(queued, ["a", "d"]);
        // The limit (2) counts live entries only: "e" drops "a", the oldest.
        let stored = s.enqueue(event("e", "ch", 4), None).await.unwrap();
        let Enqueued::Stored { displaced, .. } = stored else {
            panic!("{stored:?}")
        };
        let dropped: Vec<&str> = displaced.iter().map(|(e, _)| e.event_id.as_str()).collect();
        assert_eq!(dropped, ["a"]);
        assert_eq!(state(&s, "b").await.0, EventState::Delivered as i32);
        assert_eq!(state(&s, "d").await.0, EventState::Queued as i32);
    }

    #[test]
    fn the_store_file_is_the_owner_s_only() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, _s) = store(1);
        let mode = std::fs::metadata(dir.path().join(DB_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[tokio::test]
    async fn a_queue_read_sees_every_enqueue_submitted_before_it() {
        let (_dir, s) = store(100);
        let pending = s.begin_enqueue(event("a", "ch", 1), None).await.unwrap();
        // Submitted after the enqueue, before its commit is awaited.
        let read = s.claim_queued(vec!["ch".into()]).await.unwrap();
        assert_eq!(read.len(), 1);
        assert!(matches!(
            pending.enqueued().await.unwrap(),
            Enqueued::Stored { .. }
        ));
    }

    #[tokio::test]
    async fn an_idempotency_key_returns_the_first_event() {
        let (_dir, s) = store(100);
        let key = |hash: &[u8]| IdempotencyKey {
            scoped_key: "scope:k1".into(),
            request_hash: hash.to_vec(),
        };
        let first = s
            .enqueue(event("a", "ch", 1), Some(key(b"h")))
            .await
            .unwrap();
        assert!(matches!(first, Enqueued::Stored { .. }));
        let again = s
            .enqueue(event("b", "ch", 2), Some(key(b"h")))
            .await
            .unwrap();
        let Enqueued::Duplicate(Duplicate::Stored(ev)) = again else {
            panic!("{again:?}")
        };
        assert_eq!(ev.event_id, "a");
        assert!(
            s.event("b").await.unwrap().is_none(),
            "a second event was stored"
        );
        let other = s
            .enqueue(event("c", "ch", 3), Some(key(b"other")))
            .await
            .unwrap();
        assert!(matches!(other, Enqueued::Duplicate(Duplicate::Mismatch)));
        // Not-stored events (ttl 0) keep their first answer.
        let k0 = IdempotencyKey {
            scoped_key: "scope:k0".into(),
            request_hash: b"h0".to_vec(),
        };
        assert!(s
            .reserve_key(k0.clone(), "t".into(), 5)
            .await
            .unwrap()
            .is_none());
        s.settle_key(k0.scoped_key.clone(), 3).await.unwrap();
        let Some(Duplicate::NotStored(rec)) = s.reserve_key(k0, "u".into(), 6).await.unwrap()
        else {
            panic!("not remembered")
        };
        assert_eq!((rec.event_id.as_str(), rec.status), ("t", 3));
        // Keys are forgotten after their retention.
        s.sweep(86_400_000 + 10).await.unwrap();
        let fresh = s
            .enqueue(event("d", "ch", 7), Some(key(b"h")))
            .await
            .unwrap();
        assert!(matches!(fresh, Enqueued::Stored { .. }));
    }

    #[tokio::test]
    async fn a_publisher_s_stored_bytes_are_bounded_and_freed_as_events_finish() {
        let (_dir, s) = store(1000);
        let ev = |id: &str| StoredEvent {
            publisher: "p".into(),
            payload: vec![0; 4000],
            ..event(id, "ch", 1)
        };
        s.enqueue(ev("a"), None).await.unwrap();
        s.enqueue(ev("b"), None).await.unwrap();
        let over = s.enqueue(ev("c"), None).await.unwrap();
        assert!(
            matches!(
                over,
                Enqueued::OverQuota {
                    stored: 8000,
                    limit: 10_000
                }
            ),
            "{over:?}"
        );
        assert!(s.event("c").await.unwrap().is_none());
        // Another publisher is not affected.
        let other = StoredEvent {
            publisher: "q".into(),
            ..ev("d")
        };
        assert!(matches!(
            s.enqueue(other, None).await.unwrap(),
            Enqueued::Stored { .. }
        ));
        // A delivery frees its bytes.
        s.ack(
            vec![AckItem {
                event_id: "a".into(),
                channel_id: "ch".into(),
            }],
            2,
        )
        .await
        .unwrap();
        assert!(matches!(
            s.enqueue(ev("c"), None).await.unwrap(),
            Enqueued::Stored { .. }
        ));
    }
}
