//! What a cluster relay decides, sans-IO: how one publish becomes a
//! JetStream write (collapse, full queues, contention), which receipt may
//! overwrite which, and whether NATS has been away too long to serve.
//! The drivers in `cluster/` carry out the actions and feed back results;
//! nothing here touches NATS, tokio or a clock.

use std::time::{Duration, Instant};

use crate::store::FinishReason;

/// How many times one publish retries after contention (a concurrent
/// collapse, a queue another publisher filled) before it is refused.
pub const MAX_ATTEMPTS: u32 = 8;

/// A stored event as the plan sees it: its sequence in the events stream
/// and its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    /// Stream sequence.
    pub seq: u64,
    /// Event id.
    pub event_id: String,
}

/// The next thing the driver does for a publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnqueueAction {
    /// Read the last event on the collapse subject (there is at most one),
    /// then call [`EnqueuePlan::handle_collapse_read`].
    ReadCollapsed,
    /// Publish the event. With `expected_last`, only if the subject's last
    /// sequence is that (0: the subject is empty), and rolling up (purging)
    /// what is there. Then [`EnqueuePlan::handle_published`].
    Publish {
        /// Compare-and-set on the subject's last sequence.
        expected_last: Option<u64>,
    },
    /// The channel queue is full: read its oldest event and delete it
    /// (only if it is still there), then [`EnqueuePlan::handle_dropped`].
    DropOldest,
}

/// How a JetStream publish ended, as the plan needs to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishOutcome {
    /// Stored (replicated) at `seq`.
    Stored {
        /// Stream sequence.
        seq: u64,
    },
    /// The deduplication window knew the message id: nothing new stored.
    Duplicate,
    /// The subject holds its most messages (JetStream error 10077).
    SubjectFull,
    /// The compare-and-set failed (error 10071): someone else wrote first.
    WrongLastSequence,
}

/// What became of the publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnqueueDone {
    /// Stored; `displaced` lists events this publish made final (the
    /// collapsed one, queue-full drops), each to be given a receipt.
    Stored {
        /// Stream sequence.
        seq: u64,
        /// Events made final, with why.
        displaced: Vec<(Located, FinishReason)>,
    },
    /// A retry of a keyed publish: answer with the first one's state.
    Duplicate {
        /// Events made final on the way (a drop before the duplicate was
        /// seen): still to be given receipts.
        displaced: Vec<(Located, FinishReason)>,
    },
    /// Gave up after [`MAX_ATTEMPTS`] rounds of contention: not stored,
    /// the publisher may retry.
    Contended,
}

/// One publish of a stored event, from first write to stored.
#[derive(Debug, Clone)]
pub struct EnqueuePlan {
    event_id: String,
    collapsible: bool,
    attempts: u32,
    /// The event on the collapse subject when it was read.
    collapsed: Option<Located>,
    displaced: Vec<(Located, FinishReason)>,
    done: Option<EnqueueDone>,
}

impl EnqueuePlan {
    /// Plans the publish of `event_id` (with a collapse key or not).
    pub fn new(event_id: &str, collapsible: bool) -> Self {
        Self {
            event_id: event_id.to_owned(),
            collapsible,
            attempts: 0,
            collapsed: None,
            displaced: Vec::new(),
            done: None,
        }
    }

    /// The first action.
    pub fn start(&mut self) -> EnqueueAction {
        self.attempts = 1;
        if self.collapsible {
            EnqueueAction::ReadCollapsed
        } else {
            EnqueueAction::Publish {
                expected_last: None,
            }
        }
    }

    /// The collapse subject held `last` (or nothing).
    pub fn handle_collapse_read(&mut self, last: Option<Located>) -> EnqueueAction {
        let expected = last.as_ref().map_or(0, |l| l.seq);
        self.collapsed = last.filter(|l| l.event_id != self.event_id);
        EnqueueAction::Publish {
            expected_last: Some(expected),
        }
    }

    /// The publish ended with `outcome`; `None` when the plan is done
    /// ([`EnqueuePlan::poll_done`]).
    pub fn handle_published(&mut self, outcome: PublishOutcome) -> Option<EnqueueAction> {
        match outcome {
            PublishOutcome::Stored { seq } => {
                let mut displaced = std::mem::take(&mut self.displaced);
                if let Some(old) = self.collapsed.take() {
                    displaced.push((
                        old,
                        FinishReason::Collapsed {
                            by: self.event_id.clone(),
                        },
                    ));
                }
                self.done = Some(EnqueueDone::Stored { seq, displaced });
                None
            }
            PublishOutcome::Duplicate => {
                self.done = Some(EnqueueDone::Duplicate {
                    displaced: std::mem::take(&mut self.displaced),
                });
                None
            }
            PublishOutcome::SubjectFull => self.again(EnqueueAction::DropOldest),
            PublishOutcome::WrongLastSequence => self.again(EnqueueAction::ReadCollapsed),
        }
    }

    /// The oldest queued event was `dropped` (deleted by this relay), or
    /// was gone already (`None`: another publisher or the device's relay
    /// took it): publish again.
    pub fn handle_dropped(&mut self, dropped: Option<Located>) -> EnqueueAction {
        if let Some(d) = dropped {
            self.displaced.push((d, FinishReason::QueueFull));
        }
        EnqueueAction::Publish {
            expected_last: None,
        }
    }

    /// The result, once the plan is done.
    pub fn poll_done(&mut self) -> Option<EnqueueDone> {
        self.done.take()
    }

    fn again(&mut self, next: EnqueueAction) -> Option<EnqueueAction> {
        if self.attempts >= MAX_ATTEMPTS {
            self.done = Some(EnqueueDone::Contended);
            return None;
        }
        self.attempts += 1;
        Some(next)
    }
}

/// How a receipt is written to the status subject of its event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiptWrite {
    /// Always (it replaces any earlier receipt): an event that reached its
    /// app is delivered, whatever was said before.
    Overwrite,
    /// Only if the event has no receipt yet (compare-and-set on sequence
    /// 0): a drop or an expiry never replaces a delivery.
    IfNone,
}

/// The write rule for a receipt of `reason`.
pub fn receipt_write(reason: &FinishReason) -> ReceiptWrite {
    match reason {
        FinishReason::Delivered => ReceiptWrite::Overwrite,
        _ => ReceiptWrite::IfNone,
    }
}

/// Whether NATS has been reachable recently enough to serve: a relay
/// that cannot write to JetStream for longer than `bound` reports
/// NOT_SERVING (publishes are refused UNAVAILABLE all along: nothing is
/// answered OK without a replicated write).
#[derive(Debug, Clone)]
pub struct NatsHealth {
    bound: Duration,
    down_since: Option<Instant>,
}

impl NatsHealth {
    /// Connected at `now` (the relay starts only once connected).
    pub fn new(bound: Duration) -> Self {
        Self {
            bound,
            down_since: None,
        }
    }

    /// The connection is up.
    pub fn handle_connected(&mut self) {
        self.down_since = None;
    }

    /// The connection dropped at `now` (a second report keeps the first
    /// time).
    pub fn handle_disconnected(&mut self, now: Instant) {
        self.down_since.get_or_insert(now);
    }

    /// Whether the relay should report SERVING at `now`.
    pub fn serving(&self, now: Instant) -> bool {
        self.down_since
            .is_none_or(|since| now.saturating_duration_since(since) < self.bound)
    }

    /// When [`NatsHealth::serving`] changes next without new input.
    pub fn poll_timeout(&self, now: Instant) -> Option<Instant> {
        self.down_since
            .map(|since| since + self.bound)
            .filter(|t| *t > now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seq: u64, id: &str) -> Located {
        Located {
            seq,
            event_id: id.into(),
        }
    }

    #[test]
    fn a_plain_event_is_one_write() {
        let mut p = EnqueuePlan::new("e", false);
        assert_eq!(
            p.start(),
            EnqueueAction::Publish {
                expected_last: None
            }
        );
        assert_eq!(p.handle_published(PublishOutcome::Stored { seq: 7 }), None);
        assert_eq!(
            p.poll_done(),
            Some(EnqueueDone::Stored {
                seq: 7,
                displaced: vec![]
            })
        );
    }

    #[test]
    fn a_collapse_replaces_exactly_the_event_it_read_or_reads_again() {
        let mut p = EnqueuePlan::new("new", true);
        assert_eq!(p.start(), EnqueueAction::ReadCollapsed);
        assert_eq!(
            p.handle_collapse_read(Some(at(3, "old"))),
            EnqueueAction::Publish {
                expected_last: Some(3)
            }
        );
        // Another publisher collapsed it first: read again, the receipt
        // goes to whatever this publish really replaces.
        assert_eq!(
            p.handle_published(PublishOutcome::WrongLastSequence),
            Some(EnqueueAction::ReadCollapsed)
        );
        assert_eq!(
            p.handle_collapse_read(Some(at(9, "other"))),
            EnqueueAction::Publish {
                expected_last: Some(9)
            }
        );
        assert_eq!(p.handle_published(PublishOutcome::Stored { seq: 10 }), None);
        assert_eq!(
            p.poll_done(),
            Some(EnqueueDone::Stored {
                seq: 10,
                displaced: vec![(at(9, "other"), FinishReason::Collapsed { by: "new".into() })]
            })
        );
    }

    #[test]
    fn an_empty_collapse_subject_is_written_only_if_still_empty() {
        let mut p = EnqueuePlan::new("new", true);
        p.start();
        assert_eq!(
            p.handle_collapse_read(None),
            EnqueueAction::Publish {
                expected_last: Some(0)
            }
        );
        p.handle_published(PublishOutcome::Stored { seq: 1 });
        assert!(matches!(
            p.poll_done(),
            Some(EnqueueDone::Stored { displaced, .. }) if displaced.is_empty()
        ));
    }

    #[test]
    fn a_full_queue_drops_its_oldest_event_and_gives_it_a_receipt() {
        let mut p = EnqueuePlan::new("e", false);
        p.start();
        assert_eq!(
            p.handle_published(PublishOutcome::SubjectFull),
            Some(EnqueueAction::DropOldest)
        );
        assert_eq!(
            p.handle_dropped(Some(at(1, "oldest"))),
            EnqueueAction::Publish {
                expected_last: None
            }
        );
        // Someone else filled it again and took the next oldest itself.
        p.handle_published(PublishOutcome::SubjectFull);
        p.handle_dropped(None);
        p.handle_published(PublishOutcome::Stored { seq: 5 });
        assert_eq!(
            p.poll_done(),
            Some(EnqueueDone::Stored {
                seq: 5,
                displaced: vec![(at(1, "oldest"), FinishReason::QueueFull)]
            })
        );
    }

    #[test]
    fn contention_ends_in_a_refusal_not_a_loop() {
        let mut p = EnqueuePlan::new("e", false);
        p.start();
        let mut rounds = 0;
        while let Some(a) = p.handle_published(PublishOutcome::SubjectFull) {
            assert_eq!(a, EnqueueAction::DropOldest);
            p.handle_dropped(None);
            rounds += 1;
        }
        assert_eq!(rounds, MAX_ATTEMPTS - 1);
        assert_eq!(p.poll_done(), Some(EnqueueDone::Contended));
    }

    #[test]
    fn a_duplicate_still_reports_what_it_dropped() {
        let mut p = EnqueuePlan::new("e", false);
        p.start();
        p.handle_published(PublishOutcome::SubjectFull);
        p.handle_dropped(Some(at(2, "old")));
        assert_eq!(p.handle_published(PublishOutcome::Duplicate), None);
        assert_eq!(
            p.poll_done(),
            Some(EnqueueDone::Duplicate {
                displaced: vec![(at(2, "old"), FinishReason::QueueFull)]
            })
        );
    }

    #[test]
    fn only_a_delivery_overwrites_a_receipt() {
        assert_eq!(
            receipt_write(&FinishReason::Delivered),
            ReceiptWrite::Overwrite
        );
        for r in [
            FinishReason::Expired,
            FinishReason::QueueFull,
            FinishReason::ChannelGone,
            FinishReason::Collapsed { by: "x".into() },
        ] {
            assert_eq!(receipt_write(&r), ReceiptWrite::IfNone);
        }
    }

    #[test]
    fn nats_away_longer_than_the_bound_stops_serving_and_coming_back_restores_it() {
        let t0 = crate::state::clock::now();
        let bound = Duration::from_secs(5);
        let mut h = NatsHealth::new(bound);
        assert!(h.serving(t0));
        assert_eq!(h.poll_timeout(t0), None);
        h.handle_disconnected(t0);
        h.handle_disconnected(t0 + Duration::from_secs(3)); // keeps the first time
        assert!(h.serving(t0 + Duration::from_secs(4)));
        assert_eq!(h.poll_timeout(t0), Some(t0 + bound));
        assert!(!h.serving(t0 + bound));
        assert_eq!(h.poll_timeout(t0 + bound), None);
        h.handle_connected();
        assert!(h.serving(t0 + Duration::from_secs(60)));
    }
}
