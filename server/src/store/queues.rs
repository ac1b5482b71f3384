//! Per-channel queues: an index in memory over an on-disk log.
//!
//! On disk, `queue_log` maps an event's sequence number (global, rising) to
//! its (channel, event id). New entries always land at the end of that
//! table, and entries leave it in roughly the order they came, so a batch of
//! publishes to many channels dirties a few pages of it instead of one page
//! per channel: the former `queue` table, keyed by (channel, seq), spread a
//! batch over as many B-tree leaves as it had channels, and writing those
//! pages was the largest cost of a durable publish.
//!
//! In memory, [`Queues`] holds each channel's queued (seq, event id) in
//! arrival order, rebuilt from the log when the store opens (a scan of the
//! log only: finished events are not read). It costs about 70 bytes per
//! queued event (a 24-byte entry and the id's allocation) and ~100 per
//! channel with a queue, and answers queue lengths, victims for a full
//! queue and queue reads without touching the disk. The number of queued
//! events is bounded by `queue_limit` per channel and by each publisher's
//! stored bytes.
//!
//! The writer thread owns it: it changes with the write transaction it
//! applies and is rebuilt from the log when a commit fails.

use std::collections::{HashMap, VecDeque};

use redb::{ReadableTable, TableDefinition, TableHandle, WriteTransaction};

use super::{db, StoreError};

/// seq -> (channel id, event id): every queued event, in arrival order.
pub(crate) const QUEUE_LOG: TableDefinition<u64, (&str, &str)> = TableDefinition::new("queue_log");
/// The layout before `queue_log` (relays up to 2026-11-30): (channel id,
/// seq) -> event id. Moved into `queue_log` when a store opens.
pub(crate) const LEGACY_QUEUE: TableDefinition<(&str, u64), &str> = TableDefinition::new("queue");

/// Each channel's queued events, oldest first.
#[derive(Debug, Default)]
pub(crate) struct Queues {
    by_channel: HashMap<Box<str>, VecDeque<(u64, Box<str>)>>,
    total: u64,
}

impl Queues {
    /// Reads the queues from `queue_log`, first moving any queue kept in
    /// the legacy layout into it (in `txn`, committed by the caller); and
    /// whether there was one. Only a relay older than `queue_log` writes
    /// the legacy table: when it ran on this store in between, it finished
    /// events without removing their `queue_log` entries, and the caller
    /// checks every entry ([`Queues::remove`] what is stale).
    pub(crate) fn load(txn: &WriteTransaction) -> Result<(Self, bool), StoreError> {
        let migrated = migrate_legacy(txn)?;
        let log = txn.open_table(QUEUE_LOG).map_err(db)?;
        Ok((Self::read(&log)?, migrated))
    }

    /// Every entry: (channel, seq, event id).
    pub(crate) fn entries(&self) -> Vec<(String, u64, String)> {
        self.by_channel
            .iter()
            .flat_map(|(ch, q)| {
                q.iter()
                    .map(move |(seq, id)| (ch.to_string(), *seq, id.to_string()))
            })
            .collect()
    }

    /// Builds the index from the log table.
    pub(crate) fn read(
        log: &impl ReadableTable<u64, (&'static str, &'static str)>,
    ) -> Result<Self, StoreError> {
        let mut q = Self::default();
        for row in log.iter().map_err(db)? {
            let (seq, v) = row.map_err(db)?;
            let (channel, id) = v.value();
            q.push(channel, seq.value(), id);
        }
        Ok(q)
    }

    /// Appends an event to its channel's queue (seqs rise).
    pub(crate) fn push(&mut self, channel: &str, seq: u64, id: &str) {
        let q = match self.by_channel.get_mut(channel) {
            Some(q) => q,
            None => self.by_channel.entry(channel.into()).or_default(),
        };
        // Seqs only rise, so pushing at the back keeps the order; an entry
        // out of order (never expected) is placed where it belongs.
        match q.back() {
            Some((last, _)) if *last > seq => {
                let at = q.partition_point(|(s, _)| *s < seq);
                q.insert(at, (seq, id.into()));
            }
            _ => q.push_back((seq, id.into())),
        }
        self.total += 1;
    }

    /// Takes an event out of its channel's queue; whether it was there.
    pub(crate) fn remove(&mut self, channel: &str, seq: u64) -> bool {
        let Some(q) = self.by_channel.get_mut(channel) else {
            return false;
        };
        let at = q.partition_point(|(s, _)| *s < seq);
        if q.get(at).is_none_or(|(s, _)| *s != seq) {
            return false;
        }
        q.remove(at);
        if q.is_empty() {
            self.by_channel.remove(channel);
        }
        self.total -= 1;
        true
    }

    /// How many events `channel` has queued.
    pub(crate) fn len(&self, channel: &str) -> usize {
        self.by_channel.get(channel).map_or(0, VecDeque::len)
    }

    /// Events queued on all channels.
    pub(crate) fn total(&self) -> u64 {
        self.total
    }

    /// The (seq, id) of the (at most `most`) oldest events queued on
    /// `channel`.
    pub(crate) fn oldest(&self, channel: &str, most: usize) -> Vec<(u64, String)> {
        self.by_channel.get(channel).map_or_else(Vec::new, |q| {
            q.iter()
                .take(most)
                .map(|(seq, id)| (*seq, id.to_string()))
                .collect()
        })
    }
}

/// Moves a queue kept in the legacy `queue` table into `queue_log` and
/// deletes the legacy table; whether there was one.
fn migrate_legacy(txn: &WriteTransaction) -> Result<bool, StoreError> {
    let exists = txn
        .list_tables()
        .map_err(db)?
        .any(|t| t.name() == LEGACY_QUEUE.name());
    if !exists {
        return Ok(false);
    }
    {
        let legacy = txn.open_table(LEGACY_QUEUE).map_err(db)?;
        let mut log = txn.open_table(QUEUE_LOG).map_err(db)?;
        for row in legacy.iter().map_err(db)? {
            let (k, id) = row.map_err(db)?;
            let (channel, seq) = k.value();
            log.insert(seq, (channel, id.value())).map_err(db)?;
        }
    }
    txn.delete_table(LEGACY_QUEUE).map_err(db)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(q: &Queues, channel: &str, most: usize) -> Vec<String> {
        q.oldest(channel, most)
            .into_iter()
            .map(|(_, id)| id)
            .collect()
    }

    #[test]
    fn queues_keep_arrival_order_and_forget_empty_channels() {
        let mut q = Queues::default();
        q.push("a", 1, "e1");
        q.push("b", 2, "e2");
        q.push("a", 3, "e3");
        q.push("a", 5, "e5");
        assert_eq!((q.len("a"), q.len("b"), q.total()), (3, 1, 4));
        assert_eq!(ids(&q, "a", 2), ["e1", "e3"]);
        assert!(q.remove("a", 3));
        assert!(!q.remove("a", 3), "already gone");
        assert!(!q.remove("a", 4), "never there");
        assert!(!q.remove("c", 1), "no such channel");
        assert_eq!(q.oldest("a", 10), [(1, "e1".into()), (5, "e5".into())]);
        assert!(q.remove("b", 2));
        assert_eq!(q.len("b"), 0);
        assert!(!q.by_channel.contains_key("b"), "an empty queue is dropped");
        assert_eq!(q.total(), 2);
        // An entry out of order lands in its place.
        q.push("a", 4, "e4");
        assert_eq!(ids(&q, "a", 10), ["e1", "e4", "e5"]);
    }

    #[test]
    fn a_legacy_queue_table_is_moved_into_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let database = redb::Database::create(dir.path().join("q.redb")).unwrap();
        let txn = database.begin_write().unwrap();
        {
            let mut legacy = txn.open_table(LEGACY_QUEUE).unwrap();
            legacy.insert(("b", 2), "e2").unwrap();
            legacy.insert(("a", 3), "e3").unwrap();
            legacy.insert(("a", 1), "e1").unwrap();
        }
        txn.commit().unwrap();

        let txn = database.begin_write().unwrap();
        let (q, migrated) = Queues::load(&txn).unwrap();
        txn.commit().unwrap();
        assert!(migrated);
        assert_eq!(ids(&q, "a", 10), ["e1", "e3"]);
        assert_eq!(ids(&q, "b", 10), ["e2"]);
        assert_eq!(q.total(), 3);

        // Gone from the old layout, kept in the new one.
        let txn = database.begin_write().unwrap();
        assert!(!txn.list_tables().unwrap().any(|t| t.name() == "queue"));
        let (again, migrated) = Queues::load(&txn).unwrap();
        assert!(!migrated, "moved once");
        assert_eq!(ids(&again, "a", 10), ["e1", "e3"]);
        assert_eq!(again.total(), 3);
    }
}
