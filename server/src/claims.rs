//! Claims on stored events that may be on their way to a device.
//!
//! An event that a connection may have written to its device must not be
//! reported DROPPED (queue full, collapsed) or EXPIRED by the store: the
//! device's callback may run and its ack would then contradict the receipt.
//! So every holder of a stored event outside the store (a publish handing a
//! new event to a connection, a connection that read a channel's queue)
//! holds a [`Claim`]; the store's writer never drops or expires an event
//! with a claim. Claims count (two connections of one device may both hold
//! an event during a failover) and are released when dropped, so a
//! cancelled task cannot leak one.
//!
//! Claims on events already in the store are only taken by the store's
//! writer thread (while it reads a queue), the same thread that decides
//! drops and expiries, so "not claimed, drop it" and "claim it" never race.
//! A publish claims its new event before the event is enqueued.

use std::sync::Arc;

use dashmap::DashMap;

/// The claim table, shared by the store writer and the connections.
#[derive(Debug, Default)]
pub struct Claims {
    counts: DashMap<Arc<str>, u32>,
}

impl Claims {
    /// Claims `event_id` once more.
    pub fn claim(self: &Arc<Self>, event_id: &str) -> Claim {
        let key: Arc<str> = Arc::from(event_id);
        *self.counts.entry(key.clone()).or_insert(0) += 1;
        Claim {
            table: self.clone(),
            event_id: key,
        }
    }

    /// Whether anyone holds a claim on `event_id`.
    pub fn is_claimed(&self, event_id: &str) -> bool {
        self.counts.contains_key(event_id)
    }

    /// Events with at least one claim.
    pub fn len(&self) -> usize {
        self.counts.len()
    }

    /// Whether no event is claimed.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    fn release(&self, event_id: &str) {
        self.counts.remove_if_mut(event_id, |_, n| {
            *n -= 1;
            *n == 0
        });
    }
}

/// One claim on one event; released when dropped.
#[derive(Debug)]
pub struct Claim {
    table: Arc<Claims>,
    event_id: Arc<str>,
}

impl Claim {
    /// The claimed event.
    pub fn event_id(&self) -> &str {
        &self.event_id
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.table.release(&self.event_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_count_and_release_on_drop() {
        let t = Arc::new(Claims::default());
        let a = t.claim("e1");
        let b = t.claim("e1");
        assert!(t.is_claimed("e1"));
        drop(a);
        assert!(t.is_claimed("e1"), "one claim is left");
        drop(b);
        assert!(!t.is_claimed("e1"));
        assert!(t.is_empty());
    }
}
