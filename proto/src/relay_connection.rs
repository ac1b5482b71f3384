//! Everything the relay decides about one device connection, as a sans-IO
//! state machine: the protocol session ([`RelaySession`]) plus the delivery
//! state around it.
//!
//! - **Pending**: a wake for a channel the device has not (yet) registered
//!   on this connection waits until the Register arrives (an event published
//!   while the device connects is sent on that same connection), or until
//!   `register_grace` passes; then it is released and stays queued in the
//!   relay's store.
//! - **Held**: a normal-priority wake waits for the device's radio: it goes
//!   out with the next frame the device sends (keepalive, ack, register) or
//!   after `normal_max_delay`. A high-priority wake flushes the held ones
//!   first, so the order is kept.
//! - **Sent**: written, waiting for the device's Ack.
//! - An Ack is honoured only for a wake sent on this connection (so only for
//!   a channel this device registered); any other Ack is ignored and costs
//!   the connection budget: too many closes it with
//!   [`ErrorCode::ProtocolViolation`].
//! - At most `max_in_flight` wakes are tracked; the rest stay in the store
//!   and are asked for again ([`ConnectionEvent::Refill`]) once there is
//!   room. A wake is never tracked twice, never sent after its TTL, and a
//!   wake acked on this connection is not sent again on it.
//! - When the connection ends, [`RelayConnection::drain_undelivered`] hands
//!   the durable wakes not yet acked back to the driver, which gives them to
//!   the device's next connection.
//!
//! Inputs take the time (`handle_*(now, ..)`); outputs are polled
//! (`poll_transmit`, `poll_event`, `poll_timeout`, `poll_close`). No socket,
//! runtime or clock is touched, so every race is tested on a simulated clock.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::pb::device::{GoAwayReason, Priority, Wake};
use crate::relay_session::{Close, RelayEvent, RelaySession, RelaySessionConfig};
use crate::session_core::WallClock;
use crate::ErrorCode;

/// Acked event ids remembered per connection, so a stale copy of an
/// acked event (from a queue read that raced the ack) is not sent again.
/// Kept as 64-bit digests: 16 bytes per id instead of ~110 (a busy
/// connection holds the full window for as long as it lives).
const RECENT_ACKS: usize = 1024;

/// The digest of an event id kept in the recent-ack window. Event ids are
/// random and chosen by the relay, so a collision (a fresh event taken
/// for an acked one) has a chance of about 2^-54 per connection.
fn ack_digest(event_id: &str) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault};
    BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(event_id)
}

/// Limits and timers of a relay connection.
#[derive(Debug, Clone)]
pub struct RelayConnectionConfig {
    /// The protocol session's limits.
    pub session: RelaySessionConfig,
    /// Most wakes tracked (pending, held or sent and not acked).
    pub max_in_flight: usize,
    /// Longest hold of a normal-priority wake.
    pub normal_max_delay: Duration,
    /// How long a wake for a channel not registered on this connection
    /// waits for its Register.
    pub register_grace: Duration,
    /// Acks for events not sent on this connection tolerated before the
    /// connection is closed (each honoured ack earns one back).
    pub max_unknown_acks: u32,
    /// A device that sent a frame this recently has its radio on: a
    /// normal-priority wake goes out at once instead of being held.
    pub radio_awake: Duration,
    /// A sent wake not acked this long after its TTL ran out is given up
    /// (released as expired): a connection that died silently must not keep
    /// its events from expiring until the idle timeout.
    pub ack_grace: Duration,
}

impl Default for RelayConnectionConfig {
    fn default() -> Self {
        Self {
            session: RelaySessionConfig::default(),
            max_in_flight: 4096,
            normal_max_delay: Duration::from_secs(60),
            register_grace: Duration::from_secs(30),
            max_unknown_acks: 64,
            radio_awake: Duration::from_secs(2),
            ack_grace: Duration::from_secs(30),
        }
    }
}

/// Why [`RelayConnection::handle_wake`] did not take a wake. The caller
/// still owns it (a durable one stays queued in the store).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WakeRefused {
    /// The session is not established, or has ended.
    NotEstablished,
    /// The same event is already tracked here, or was acked here.
    Duplicate,
    /// `max_in_flight` wakes are tracked; a [`ConnectionEvent::Refill`]
    /// follows when there is room.
    Full,
    /// Its TTL has run out.
    Expired,
    /// The payload exceeds the session's maximum.
    PayloadTooLarge,
    /// A deliver-now-or-never wake (not durable) for a channel that is not
    /// registered on this connection.
    NotRegistered,
}

/// Why a tracked wake was let go without an ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseReason {
    /// Its TTL ran out before it could be sent.
    Expired,
    /// The device unregistered its channel.
    Unregistered,
    /// Its channel was not registered within `register_grace`.
    NotRegistered,
    /// The connection ended before it was sent (not durable: dropped).
    Closed,
}

/// Something the driver must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionEvent {
    /// The device said Hello: verify `credential`, then call
    /// [`RelayConnection::accept`] or [`RelayConnection::reject`].
    Hello {
        /// Device credential (token).
        credential: String,
        /// SDK description, for logs.
        sdk: String,
    },
    /// The device asks for channel ids for these (valid, distinct) names:
    /// answer with [`RelayConnection::registered`], then hand the channels'
    /// queued events to [`RelayConnection::handle_wake`].
    Register {
        /// Echo in the answer.
        request_id: u64,
        /// Channel names.
        names: Vec<String>,
    },
    /// The device no longer wants these channels (only ids registered on
    /// this connection are listed); their tracked wakes were released.
    Unregister {
        /// Channel ids.
        channel_ids: Vec<String>,
    },
    /// A wake was written to the control stream.
    Sent {
        /// Event id.
        event_id: String,
    },
    /// The device acked a wake sent on this connection: record it.
    Acked {
        /// Event id.
        event_id: String,
        /// Its channel (registered by this device).
        channel_id: String,
        /// Whether the event is in the store.
        durable: bool,
        /// Time from the wake's send to its ack.
        after: Duration,
    },
    /// A tracked wake will not be sent here.
    Released {
        /// Event id.
        event_id: String,
        /// Whether the event is in the store (then it stays queued there).
        durable: bool,
        /// Why.
        reason: ReleaseReason,
    },
    /// An Ack for an event not sent on this connection was ignored.
    IgnoredAck {
        /// The event id the device sent.
        event_id: String,
    },
    /// There is room again: read these channels' queues and hand their
    /// events to [`RelayConnection::handle_wake`].
    Refill {
        /// Channel ids whose events were refused with [`WakeRefused::Full`].
        channel_ids: Vec<String>,
    },
    /// The device sent a keepalive ping (already answered).
    Ping,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Pending,
    Held,
    Sent,
}

#[derive(Debug)]
struct Tracked {
    wake: Wake,
    durable: bool,
    stage: Stage,
    /// Arrival order, to hand wakes over in order.
    seq: u64,
    /// When it was written (stage Sent).
    sent_at: Option<Instant>,
}

/// The relay's end of one device connection.
#[derive(Debug)]
pub struct RelayConnection {
    session: RelaySession,
    config: RelayConnectionConfig,
    clock: WallClock,
    tracked: HashMap<String, Tracked>,
    next_seq: u64,
    /// Pending wakes by arrival: (give-up time, event id); stale entries
    /// (no longer pending) are skipped.
    pending: VecDeque<(Instant, String)>,
    /// Held wakes in arrival order.
    held: Vec<String>,
    held_until: Option<Instant>,
    recent_acks: VecDeque<u64>,
    recent_ack_set: HashSet<u64>,
    unknown_budget: u32,
    /// Channels with events refused for lack of room.
    starved: HashSet<String>,
    /// Registered channels whose stored queue has not been handed in yet
    /// ([`RelayConnection::handle_queued`]), with the time to stop waiting:
    /// new wakes for them wait, so the queue goes out first, in order.
    loading: HashMap<String, Instant>,
    last_rx: Option<Instant>,
    /// Sent durable wakes by give-up time (TTL + `ack_grace`); stale
    /// entries (acked, released) are skipped.
    give_up: BinaryHeap<Reverse<(Instant, String)>>,
    events: VecDeque<ConnectionEvent>,
}

impl RelayConnection {
    /// A new connection at `now`; `unix_ms` is the wall clock at `now`.
    pub fn new(now: Instant, unix_ms: u64, config: RelayConnectionConfig) -> Self {
        Self {
            session: RelaySession::new(now, unix_ms, config.session.clone()),
            clock: WallClock::new(now, unix_ms),
            unknown_budget: config.max_unknown_acks,
            config,
            tracked: HashMap::new(),
            next_seq: 0,
            pending: VecDeque::new(),
            held: Vec::new(),
            held_until: None,
            recent_acks: VecDeque::new(),
            recent_ack_set: HashSet::new(),
            starved: HashSet::new(),
            loading: HashMap::new(),
            last_rx: None,
            give_up: BinaryHeap::new(),
            events: VecDeque::new(),
        }
    }

    /// Records the device's address as the relay sees it (echoed in Pong).
    pub fn set_observed_addr(&mut self, addr: SocketAddr) {
        self.session.set_observed_addr(addr);
    }

    /// The authenticated device id, once established.
    pub fn device_id(&self) -> Option<&str> {
        self.session.device_id()
    }

    /// Number of wakes tracked (pending, held, sent).
    pub fn in_flight(&self) -> usize {
        self.tracked.len()
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.session.is_closed()
    }

    /// Feeds bytes read from the control stream.
    pub fn handle_data(&mut self, now: Instant, data: &[u8]) {
        if self.session.is_closed() {
            return;
        }
        self.last_rx = Some(now);
        self.session.handle_data(now, data);
        self.pump(now);
        // The device just sent something: its radio is on.
        if !self.held.is_empty() && self.session.device_id().is_some() {
            self.flush_held(now);
        }
    }

    /// The device finished its side of the control stream.
    pub fn handle_stream_finished(&mut self, now: Instant) {
        self.session.handle_stream_finished();
        self.pump(now);
    }

    /// Timer expiry: hello timeout, hold timer, register grace.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.session.handle_timeout(now);
        while let Some(Reverse((at, _))) = self.give_up.peek() {
            if *at > now {
                break;
            }
            if let Some(Reverse((_, id))) = self.give_up.pop() {
                if self
                    .tracked
                    .get(&id)
                    .is_some_and(|t| t.stage == Stage::Sent)
                {
                    self.release(&id, ReleaseReason::Expired);
                }
            }
        }
        if self.held_until.is_some_and(|t| now >= t) {
            self.flush_held(now);
        }
        let overdue: Vec<String> = self
            .loading
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(id, _)| id.clone())
            .collect();
        if !overdue.is_empty() {
            // The queue never came (a store failure): send what waits.
            for id in &overdue {
                self.loading.remove(id);
            }
            self.dispatch_ready(now, &overdue);
        }
        while let Some((deadline, id)) = self.pending.front() {
            if *deadline > now {
                break;
            }
            let id = id.clone();
            self.pending.pop_front();
            if self
                .tracked
                .get(&id)
                .is_some_and(|t| t.stage == Stage::Pending)
            {
                self.release(&id, ReleaseReason::NotRegistered);
            }
        }
        self.pump(now);
    }

    /// Accepts the Hello: the credential names `device_id`.
    pub fn accept(&mut self, now: Instant, device_id: String, session_id: String) {
        self.session.accept(now, device_id, session_id);
    }

    /// Refuses the session (bad credential...), or closes it.
    pub fn reject(&mut self, code: ErrorCode, reason: impl Into<String>) {
        self.session.reject(code, reason);
    }

    /// Answers a [`ConnectionEvent::Register`] with one channel id per
    /// name, in request order. Their stored queues are expected next
    /// ([`RelayConnection::handle_queued`]); wakes for them wait until then
    /// (at most `register_grace`), so older events go out first.
    pub fn registered(&mut self, now: Instant, request_id: u64, bindings: Vec<(String, String)>) {
        for (_, id) in &bindings {
            self.loading
                .insert(id.clone(), now + self.config.register_grace);
        }
        self.session.registered(request_id, bindings);
    }

    /// Refuses a [`ConnectionEvent::Register`] (the device's channel limit
    /// across its connections, say): nothing of it is registered.
    pub fn refuse_register(&mut self, request_id: u64, code: u32, message: String) {
        self.session.refuse_register(request_id, code, message);
    }

    /// Hands in stored events of `channel_ids` (read after their Register,
    /// or after a [`ConnectionEvent::Refill`]); the channels' waiting wakes
    /// then go out, oldest first. Returns, per wake, whether it was taken:
    /// the caller keeps the ones that were not (they stay in the store).
    pub fn handle_queued(
        &mut self,
        now: Instant,
        channel_ids: &[String],
        wakes: Vec<Wake>,
    ) -> Vec<(String, Result<(), WakeRefused>)> {
        let results = wakes
            .into_iter()
            .map(|w| {
                let id = w.event_id.clone();
                (id, self.track(now, w, true))
            })
            .collect();
        for id in channel_ids {
            self.loading.remove(id);
        }
        self.dispatch_ready(now, channel_ids);
        results
    }

    /// Sends (or holds) the pending wakes of these channels that can go
    /// now, oldest first.
    fn dispatch_ready(&mut self, now: Instant, channel_ids: &[String]) {
        let ready: HashSet<&String> = channel_ids
            .iter()
            .filter(|id| self.session.has_channel(id) && !self.loading.contains_key(*id))
            .collect();
        let mut due: Vec<(u64, u64, String)> = self
            .tracked
            .iter()
            .filter(|(_, t)| t.stage == Stage::Pending && ready.contains(&t.wake.channel_id))
            .map(|(id, t)| (t.wake.created_at_ms, t.seq, id.clone()))
            .collect();
        due.sort_unstable();
        for (_, _, id) in due {
            self.dispatch(now, &id);
        }
        self.prune_pending();
    }

    /// Takes a wake for this device. Durable wakes are in the store (they
    /// are handed over when the connection ends); others are sent now or
    /// never. On `Err` the caller keeps the wake.
    pub fn handle_wake(
        &mut self,
        now: Instant,
        wake: Wake,
        durable: bool,
    ) -> Result<(), WakeRefused> {
        let id = wake.event_id.clone();
        let channel = wake.channel_id.clone();
        self.track(now, wake, durable)?;
        if self.session.has_channel(&channel) && !self.loading.contains_key(&channel) {
            self.dispatch(now, &id);
            self.prune_pending();
        }
        Ok(())
    }

    /// Starts tracking a wake as pending.
    fn track(&mut self, now: Instant, wake: Wake, durable: bool) -> Result<(), WakeRefused> {
        if self.session.is_closed() {
            return Err(WakeRefused::NotEstablished);
        }
        if self.tracked.contains_key(&wake.event_id)
            || self.recent_ack_set.contains(&ack_digest(&wake.event_id))
        {
            return Err(WakeRefused::Duplicate);
        }
        if wake.payload.len() > self.config.session.max_payload_size {
            return Err(WakeRefused::PayloadTooLarge);
        }
        if durable && self.expired(now, &wake) {
            return Err(WakeRefused::Expired);
        }
        let ready = self.session.device_id().is_some()
            && self.session.has_channel(&wake.channel_id)
            && !self.loading.contains_key(&wake.channel_id);
        if !durable && !ready {
            return Err(WakeRefused::NotRegistered);
        }
        if self.tracked.len() >= self.config.max_in_flight {
            if durable {
                self.starved.insert(wake.channel_id);
            }
            return Err(WakeRefused::Full);
        }
        let id = wake.event_id.clone();
        self.next_seq += 1;
        self.tracked.insert(
            id.clone(),
            Tracked {
                wake,
                durable,
                stage: Stage::Pending,
                seq: self.next_seq,
                sent_at: None,
            },
        );
        self.pending
            .push_back((now + self.config.register_grace, id));
        Ok(())
    }

    /// Asks the device to leave, then closes with [`ErrorCode::GoingAway`]
    /// (or [`ErrorCode::Replaced`]).
    pub fn go_away(&mut self, reason: GoAwayReason, reconnect_after: Duration, message: &str) {
        self.go_away_to(reason, reconnect_after, message, Vec::new());
    }

    /// [`RelayConnection::go_away`], naming other relays of the cluster
    /// the device may connect to instead.
    pub fn go_away_to(
        &mut self,
        reason: GoAwayReason,
        reconnect_after: Duration,
        message: &str,
        alternatives: Vec<String>,
    ) {
        self.session
            .go_away_to(reason, reconnect_after, message, alternatives);
    }

    /// Ends the connection's delivery state: returns the durable wakes not
    /// acked, in arrival order, for the device's next connection; wakes
    /// that are not durable are released ([`ReleaseReason::Closed`]).
    pub fn drain_undelivered(&mut self) -> Vec<Wake> {
        let mut all: Vec<Tracked> = self.tracked.drain().map(|(_, t)| t).collect();
        all.sort_unstable_by_key(|t| t.seq);
        self.pending.clear();
        self.loading.clear();
        self.give_up.clear();
        self.held.clear();
        self.held_until = None;
        let mut out = Vec::new();
        for t in all {
            if t.durable {
                out.push(t.wake);
            } else {
                self.events.push_back(ConnectionEvent::Released {
                    event_id: t.wake.event_id,
                    durable: false,
                    reason: ReleaseReason::Closed,
                });
            }
        }
        out
    }

    /// Bytes to write on the control stream.
    pub fn poll_transmit(&mut self) -> Option<bytes::Bytes> {
        self.session.poll_transmit()
    }

    /// Next event for the driver.
    pub fn poll_event(&mut self) -> Option<ConnectionEvent> {
        self.events.pop_front()
    }

    /// When [`RelayConnection::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.session.is_closed() {
            return None;
        }
        let pending = self.pending.front().map(|(t, _)| *t);
        let loading = self.loading.values().min().copied();
        [
            self.session.poll_timeout(),
            self.held_until,
            pending,
            loading,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The close to perform, yielded once.
    pub fn poll_close(&mut self) -> Option<Close> {
        self.session.poll_close()
    }

    /// Moves the session's events into ours, deciding on acks, unregisters
    /// and pings on the way.
    fn pump(&mut self, now: Instant) {
        while let Some(ev) = self.session.poll_event() {
            match ev {
                RelayEvent::Hello { credential, sdk } => self
                    .events
                    .push_back(ConnectionEvent::Hello { credential, sdk }),
                RelayEvent::Register { request_id, names } => self
                    .events
                    .push_back(ConnectionEvent::Register { request_id, names }),
                RelayEvent::Unregister { channel_ids } => {
                    let gone: HashSet<&String> = channel_ids.iter().collect();
                    let mut ids: Vec<(u64, String)> = self
                        .tracked
                        .iter()
                        .filter(|(_, t)| gone.contains(&t.wake.channel_id))
                        .map(|(id, t)| (t.seq, id.clone()))
                        .collect();
                    ids.sort_unstable();
                    for (_, id) in ids {
                        self.release(&id, ReleaseReason::Unregistered);
                    }
                    for id in &channel_ids {
                        self.starved.remove(id);
                        self.loading.remove(id);
                    }
                    self.held.retain(|id| self.tracked.contains_key(id));
                    self.events
                        .push_back(ConnectionEvent::Unregister { channel_ids });
                }
                RelayEvent::Ack { event_id } => self.handle_ack(now, event_id),
                RelayEvent::Ping => self.events.push_back(ConnectionEvent::Ping),
                // Held normal-priority wakes ride the radio wake the canary
                // causes.
                RelayEvent::CanarySent => self.flush_held(now),
            }
        }
        self.maybe_refill();
    }

    fn handle_ack(&mut self, now: Instant, event_id: String) {
        let sent = self
            .tracked
            .get(&event_id)
            .is_some_and(|t| t.stage == Stage::Sent);
        if !sent {
            self.events
                .push_back(ConnectionEvent::IgnoredAck { event_id });
            self.unknown_budget = self.unknown_budget.saturating_sub(1);
            if self.unknown_budget == 0 {
                self.session.reject(
                    ErrorCode::ProtocolViolation,
                    format!(
                        "more than {} acks for events not sent on this connection",
                        self.config.max_unknown_acks
                    ),
                );
            }
            return;
        }
        let Some(t) = self.tracked.remove(&event_id) else {
            return;
        };
        // A burst is over: an idle connection keeps no room for the next.
        if self.tracked.is_empty() && self.tracked.capacity() > 16 {
            self.tracked.shrink_to_fit();
        }
        self.unknown_budget = (self.unknown_budget + 1).min(self.config.max_unknown_acks);
        let digest = ack_digest(&event_id);
        if self.recent_ack_set.insert(digest) {
            self.recent_acks.push_back(digest);
            if self.recent_acks.len() > RECENT_ACKS {
                if let Some(old) = self.recent_acks.pop_front() {
                    self.recent_ack_set.remove(&old);
                }
            }
        }
        self.events.push_back(ConnectionEvent::Acked {
            event_id,
            channel_id: t.wake.channel_id,
            durable: t.durable,
            after: t
                .sent_at
                .map_or(Duration::ZERO, |at| now.saturating_duration_since(at)),
        });
    }

    /// Sends a tracked wake now, or holds it for the radio.
    fn dispatch(&mut self, now: Instant, id: &str) {
        let Some(t) = self.tracked.get_mut(id) else {
            return;
        };
        let normal = t.wake.priority == Priority::Normal as i32;
        let awake = self
            .last_rx
            .is_some_and(|at| now.saturating_duration_since(at) < self.config.radio_awake);
        if normal && t.durable && !awake {
            t.stage = Stage::Held;
            self.held.push(id.to_owned());
            self.held_until
                .get_or_insert(now + self.config.normal_max_delay);
            return;
        }
        // Keep the order: what was held goes first.
        self.flush_held(now);
        self.send(now, id);
    }

    fn flush_held(&mut self, now: Instant) {
        self.held_until = None;
        for id in std::mem::take(&mut self.held) {
            self.send(now, &id);
        }
    }

    fn send(&mut self, now: Instant, id: &str) {
        let Some(t) = self.tracked.get(id) else {
            return;
        };
        if t.durable && self.expired(now, &t.wake) {
            self.release(id, ReleaseReason::Expired);
            return;
        }
        let wake = t.wake.clone();
        let give_up = (t.durable && t.wake.ttl_s > 0).then(|| {
            let expiry = t
                .wake
                .created_at_ms
                .saturating_add(u64::from(t.wake.ttl_s) * 1000);
            let left = expiry.saturating_sub(self.clock.unix_ms(now));
            now + Duration::from_millis(left) + self.config.ack_grace
        });
        // On error (not established or closing) the wake stays tracked: it
        // is handed over or released when the connection ends.
        if self.session.send_wake(wake).is_ok() {
            if let Some(t) = self.tracked.get_mut(id) {
                t.stage = Stage::Sent;
                t.sent_at = Some(now);
            }
            if let Some(at) = give_up {
                self.give_up.push(Reverse((at, id.to_owned())));
            }
            self.events.push_back(ConnectionEvent::Sent {
                event_id: id.to_owned(),
            });
        }
    }

    fn release(&mut self, id: &str, reason: ReleaseReason) {
        if let Some(t) = self.tracked.remove(id) {
            self.events.push_back(ConnectionEvent::Released {
                event_id: t.wake.event_id,
                durable: t.durable,
                reason,
            });
        }
    }

    fn expired(&self, now: Instant, wake: &Wake) -> bool {
        wake.ttl_s > 0
            && self.clock.unix_ms(now)
                >= wake
                    .created_at_ms
                    .saturating_add(u64::from(wake.ttl_s) * 1000)
    }

    fn prune_pending(&mut self) {
        let tracked = &self.tracked;
        self.pending
            .retain(|(_, id)| tracked.get(id).is_some_and(|t| t.stage == Stage::Pending));
    }

    fn maybe_refill(&mut self) {
        if !self.starved.is_empty()
            && !self.session.is_closed()
            && self.tracked.len() <= self.config.max_in_flight / 2
        {
            let mut channel_ids: Vec<String> = self.starved.drain().collect();
            channel_ids.sort_unstable();
            self.events
                .push_back(ConnectionEvent::Refill { channel_ids });
        }
    }
}
