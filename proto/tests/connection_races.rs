//! Delivery races, decided by the sans-IO cores and tested on a simulated
//! clock: a relay-side [`RelayConnection`] and a device-side
//! [`DeviceConnection`] joined in memory. No sockets, no runtime, no sleep:
//! time moves only when a test says so.
//!
//! The "driver" here plays the relay's part exactly as the real one does:
//! it accepts credential "token-1", derives channel ids as `<name>-id`,
//! answers Register, then hands in the channel's stored queue (the test's
//! `store`), and records acks in the store.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::collections::HashMap;
use std::time::{Duration, Instant};

use wakewire_proto::codec::encode_to_bytes;
use wakewire_proto::device_connection::{DeviceConnection, DeviceConnectionEvent};
use wakewire_proto::device_session::DeviceSessionConfig;
use wakewire_proto::pb::device::{frame::Body, Ack, GoAwayReason, Priority, Wake};
use wakewire_proto::relay_connection::{
    ConnectionEvent, RelayConnection, RelayConnectionConfig, ReleaseReason, WakeRefused,
};
use wakewire_proto::ErrorCode;
use wakewire_proto::MAX_FRAME_SIZE;

const UNIX_MS: u64 = 1_700_000_000_000;

/// The simulated clock's origin (the only real clock read).
#[allow(clippy::disallowed_methods)]
fn origin() -> Instant {
    Instant::now()
}

/// A relay connection, a device, the relay's store, and a clock.
struct World {
    now: Instant,
    origin: Instant,
    relay: RelayConnection,
    device: DeviceConnection,
    /// Stored queue per channel id (what a Register reads).
    store: HashMap<String, Vec<Wake>>,
    /// Events the driver saw, in order.
    relay_events: Vec<ConnectionEvent>,
    /// Wakes the app received (event ids), in order.
    app: Vec<String>,
    /// Acks recorded in the store.
    acked: Vec<String>,
    /// Registers answered but whose queue is not handed in yet (to test
    /// publishes that race the queue read).
    hold_queue_reads: bool,
    queue_reads: Vec<Vec<String>>,
    /// The app acks what it receives.
    auto_handle: bool,
}

impl World {
    fn new(config: RelayConnectionConfig) -> Self {
        let now = origin();
        let mut device = DeviceConnection::new(16, vec![]);
        device.connect(now, DeviceSessionConfig::new("token-1"));
        Self {
            now,
            origin: now,
            relay: RelayConnection::new(now, UNIX_MS, config),
            device,
            store: HashMap::new(),
            relay_events: vec![],
            app: vec![],
            acked: vec![],
            hold_queue_reads: false,
            queue_reads: vec![],
            auto_handle: true,
        }
    }

    /// Wall clock now, Unix ms.
    fn unix_ms(&self) -> u64 {
        UNIX_MS + u64::try_from((self.now - self.origin).as_millis()).unwrap()
    }

    /// Moves bytes and events until nothing moves.
    fn pump(&mut self) {
        loop {
            let mut moved = false;
            while let Some(b) = self.device.poll_transmit() {
                self.relay.handle_data(self.now, &b);
                moved = true;
            }
            while let Some(e) = self.relay.poll_event() {
                self.on_relay_event(&e);
                self.relay_events.push(e);
                moved = true;
            }
            while let Some(b) = self.relay.poll_transmit() {
                self.device.handle_data(self.now, &b);
                moved = true;
            }
            while let Some(e) = self.device.poll_event() {
                if let DeviceConnectionEvent::Wake { wake, .. } = e {
                    self.app.push(wake.event_id.clone());
                    if self.auto_handle {
                        self.device.handled(self.now, &wake.event_id);
                    }
                }
                moved = true;
            }
            if !moved {
                return;
            }
        }
    }

    fn on_relay_event(&mut self, e: &ConnectionEvent) {
        match e {
            ConnectionEvent::Hello { credential, .. } if credential == "token-1" => {
                self.relay.accept(self.now, "dev1".into(), "s1".into())
            }
            ConnectionEvent::Hello { .. } => self.relay.reject(ErrorCode::Unauthorized, "bad"),
            ConnectionEvent::Register { request_id, names } => {
                let bindings: Vec<(String, String)> = names
                    .iter()
                    .map(|n| (n.clone(), format!("{n}-id")))
                    .collect();
                let ids: Vec<String> = bindings.iter().map(|b| b.1.clone()).collect();
                self.relay.registered(self.now, *request_id, bindings);
                if self.hold_queue_reads {
                    self.queue_reads.push(ids);
                } else {
                    self.hand_in_queue(&ids);
                }
            }
            ConnectionEvent::Refill { channel_ids } => self.hand_in_queue(channel_ids),
            ConnectionEvent::Acked {
                event_id, durable, ..
            } => {
                if *durable {
                    for q in self.store.values_mut() {
                        q.retain(|w| &w.event_id != event_id);
                    }
                }
                self.acked.push(event_id.clone());
            }
            _ => {}
        }
    }

    /// The driver's queue read: the stored events of these channels.
    fn hand_in_queue(&mut self, ids: &[String]) {
        let wakes: Vec<Wake> = ids
            .iter()
            .flat_map(|id| self.store.get(id).cloned().unwrap_or_default())
            .collect();
        self.relay.handle_queued(self.now, ids, wakes);
    }

    fn release_queue_reads(&mut self) {
        for ids in std::mem::take(&mut self.queue_reads) {
            self.hand_in_queue(&ids);
        }
        self.pump();
    }

    /// A publish: stored, then handed to the connection.
    fn publish(&mut self, w: Wake) -> Result<(), WakeRefused> {
        self.store
            .entry(w.channel_id.clone())
            .or_default()
            .push(w.clone());
        let r = self.relay.handle_wake(self.now, w, true);
        self.pump();
        r
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.relay.handle_timeout(self.now);
        self.device.handle_timeout(self.now);
        self.pump();
    }

    fn register(&mut self, name: &str) {
        self.device.register(self.now, name.into()).unwrap();
        self.pump();
    }

    fn released(&self) -> Vec<(String, ReleaseReason)> {
        self.relay_events
            .iter()
            .filter_map(|e| match e {
                ConnectionEvent::Released {
                    event_id, reason, ..
                } => Some((event_id.clone(), *reason)),
                _ => None,
            })
            .collect()
    }
}

/// One encoded Ack frame, as a device would send it.
fn ack_frame(event_id: &str) -> Vec<u8> {
    encode_to_bytes(
        Body::Ack(Ack {
            event_id: event_id.into(),
        }),
        MAX_FRAME_SIZE,
    )
    .unwrap()
    .to_vec()
}

fn wake_at(id: &str, channel: &str, created_at_ms: u64) -> Wake {
    Wake {
        event_id: id.into(),
        channel_id: channel.into(),
        payload: id.as_bytes().to_vec(),
        priority: Priority::High as i32,
        created_at_ms,
        ttl_s: 3600,
    }
}

fn wake(w: &World, id: &str, channel: &str) -> Wake {
    wake_at(id, channel, w.unix_ms())
}

/// Fresh world with the device connected and welcomed.
fn connected() -> World {
    let mut w = World::new(RelayConnectionConfig::default());
    w.pump();
    assert!(w.device.is_established());
    w
}

#[test]
fn publish_during_handshake_is_sent_once_the_channel_is_registered() {
    let mut w = World::new(RelayConnectionConfig::default());
    // The relay accepted the device in the registry but Hello is not even
    // read yet: the wake waits on this connection.
    let e = wake(&w, "e1", "mail-id");
    assert_eq!(w.publish(e), Ok(()));
    assert!(w.app.is_empty());
    w.pump(); // Hello, Welcome
    assert!(w.app.is_empty(), "sent before the channel was registered");
    w.register("mail");
    assert_eq!(w.app, ["e1"], "stalled until the next reconnect");
    assert_eq!(w.acked, ["e1"]);
}

#[test]
fn publish_racing_the_queue_read_goes_out_after_the_older_queue() {
    let mut w = connected();
    // Two events waited while the device was away.
    let t = w.unix_ms();
    let (a, b) = (
        wake_at("a", "mail-id", t - 20),
        wake_at("b", "mail-id", t - 10),
    );
    w.store.insert("mail-id".into(), vec![a, b]);
    w.hold_queue_reads = true;
    w.register("mail");
    // A new publish lands between Registered and the queue read; it is also
    // in the store by the time the read completes (a duplicate to drop).
    let c = wake(&w, "c", "mail-id");
    w.publish(c).unwrap();
    assert!(w.app.is_empty(), "a live wake overtook the stored queue");
    w.release_queue_reads();
    assert_eq!(w.app, ["a", "b", "c"]);
    assert_eq!(w.acked, ["a", "b", "c"]);
}

#[test]
fn wake_not_registered_in_time_is_released_not_lost() {
    let mut w = connected();
    let e = wake(&w, "e1", "never-id");
    w.publish(e).unwrap();
    let grace = RelayConnectionConfig::default().register_grace;
    w.advance(grace - Duration::from_millis(1));
    assert!(w.released().is_empty());
    w.advance(Duration::from_millis(1));
    assert_eq!(w.released(), [("e1".into(), ReleaseReason::NotRegistered)]);
    assert_eq!(w.relay.in_flight(), 0);
}

#[test]
fn connection_lost_between_wake_and_ack_hands_the_wake_to_the_next_one() {
    let mut w = connected();
    w.register("mail");
    w.auto_handle = false;
    let e = wake(&w, "e1", "mail-id");
    w.publish(e).unwrap();
    assert_eq!(w.app, ["e1"]);
    // The app finishes after the connection died: the ack cannot go out.
    let undelivered = w.relay.drain_undelivered();
    assert_eq!(undelivered.len(), 1);
    w.device.disconnected();
    w.device.handled(w.now, "e1");

    // The next connection gets it (from the store's queue on Register, and
    // again by handover: one copy is tracked); the device acks the
    // duplicate without handing it to the app again.
    w.relay = RelayConnection::new(w.now, w.unix_ms(), RelayConnectionConfig::default());
    w.device.connect(w.now, DeviceSessionConfig::new("token-1"));
    w.pump();
    for wk in undelivered {
        assert_eq!(
            w.relay.handle_wake(w.now, wk, true),
            Err(WakeRefused::Duplicate)
        );
    }
    w.pump();
    assert_eq!(w.app, ["e1"], "the app saw it twice");
    assert_eq!(w.acked, ["e1"]);
}

#[test]
fn wake_sent_again_while_the_app_still_has_it_is_not_handed_out_twice() {
    let mut w = connected();
    w.register("mail");
    w.auto_handle = false;
    let e = wake(&w, "e1", "mail-id");
    w.publish(e.clone()).unwrap();
    // Reconnect: the relay sends it again while the app is still busy.
    let _ = w.relay.drain_undelivered();
    w.relay = RelayConnection::new(w.now, w.unix_ms(), RelayConnectionConfig::default());
    w.device.disconnected();
    w.device.connect(w.now, DeviceSessionConfig::new("token-1"));
    w.pump(); // Register: the stored copy is sent again
    assert_eq!(
        w.relay.handle_wake(w.now, e, true),
        Err(WakeRefused::Duplicate)
    );
    w.pump();
    assert_eq!(w.app, ["e1"]);
    // Done now: the ack goes out on the current connection.
    w.device.handled(w.now, "e1");
    w.pump();
    assert_eq!(w.acked, ["e1"]);
    // Abandoned instead: it would be handed out again.
    let f = wake(&w, "e2", "mail-id");
    w.publish(f.clone()).unwrap();
    w.device.abandoned("e2");
    let _ = w.relay.drain_undelivered();
    w.relay = RelayConnection::new(w.now, w.unix_ms(), RelayConnectionConfig::default());
    w.device.disconnected();
    w.device.connect(w.now, DeviceSessionConfig::new("token-1"));
    w.pump(); // Register: the stored copy of e2 is sent again
    let _ = f;
    assert_eq!(w.app, ["e1", "e2", "e2"]);
}

#[test]
fn reconnect_registers_every_channel_again_in_one_request() {
    let mut w = connected();
    w.register("mail");
    w.register("chat");
    w.device.disconnected();
    w.relay = RelayConnection::new(w.now, w.unix_ms(), RelayConnectionConfig::default());
    w.device.connect(w.now, DeviceSessionConfig::new("token-1"));
    w.pump();
    let registers: Vec<_> = w
        .relay_events
        .iter()
        .filter_map(|e| match e {
            ConnectionEvent::Register { names, .. } => Some(names.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(registers.last().unwrap(), &["chat", "mail"]);
    let mut saw_reset = false;
    while let Some(e) = w.device.poll_event() {
        saw_reset |= matches!(e, DeviceConnectionEvent::Reset { .. });
    }
    // (Events were consumed by pump; the channel ids stay.)
    let _ = saw_reset;
    assert_eq!(w.device.channel_id("mail"), Some("mail-id"));
    // A wake published during the reconnect (before the Register) arrives.
    let e = wake(&w, "e9", "chat-id");
    assert_eq!(w.relay.handle_wake(w.now, e, true), Ok(()));
    w.pump();
    assert_eq!(w.app, ["e9"]);
}

#[test]
fn ack_from_a_device_that_was_not_sent_the_event_is_ignored() {
    let mut w = connected();
    w.register("mail");
    // Another device's event id, acked by this device: ignored.
    let forged = ack_frame("someone-elses");
    w.relay.handle_data(w.now, &forged);
    w.pump();
    assert!(w.acked.is_empty());
    assert!(w.relay_events.contains(&ConnectionEvent::IgnoredAck {
        event_id: "someone-elses".into()
    }));
    // An ack for an event held (not sent yet) is not honoured either.
    let mut normal = wake(&w, "n1", "mail-id");
    normal.priority = Priority::Normal as i32;
    let config = RelayConnectionConfig {
        radio_awake: Duration::ZERO,
        ..RelayConnectionConfig::default()
    };
    let mut w2 = World::new(config);
    w2.pump();
    w2.register("mail");
    w2.store.clear();
    w2.relay.handle_wake(w2.now, normal, true).unwrap();
    let early = ack_frame("n1");
    // (Feeding bytes counts as radio activity and flushes the hold, so the
    // ack is decided first: it arrives in the same read.)
    w2.relay.handle_data(w2.now, &early);
    w2.pump();
    assert!(w2.relay_events.contains(&ConnectionEvent::IgnoredAck {
        event_id: "n1".into()
    }));
    assert_eq!(w2.acked, ["n1"], "the real ack after the send counts");
}

#[test]
fn ack_flood_closes_the_connection_with_protocol_violation() {
    let mut w = connected();
    w.register("mail");
    let limit = RelayConnectionConfig::default().max_unknown_acks;
    let mut flood = Vec::new();
    for i in 0..limit - 1 {
        flood.extend_from_slice(&ack_frame(&format!("bogus-{i}")));
    }
    w.relay.handle_data(w.now, &flood);
    assert!(!w.relay.is_closed(), "closed before the limit");
    // Honoured acks earn budget back.
    let e = wake(&w, "real", "mail-id");
    w.publish(e).unwrap();
    assert_eq!(w.acked, ["real"]);
    let two = [ack_frame("x1"), ack_frame("x2")].concat();
    w.relay.handle_data(w.now, &two);
    assert!(w.relay.is_closed());
    let close = w.relay.poll_close().unwrap();
    assert_eq!(close.code, ErrorCode::ProtocolViolation);
    assert!(
        close.reason.contains("acks for events not sent"),
        "{close:?}"
    );
}

/// A registered "mail" channel on a relay that holds normal-priority wakes
/// for the radio (never "awake"), and `n1`, a normal-priority wake with
/// `ttl_s` (0: the default), published to it.
fn held_normal_wake(mut config: RelayConnectionConfig, ttl_s: Option<u32>) -> World {
    config.radio_awake = Duration::ZERO;
    let mut w = World::new(config);
    w.pump();
    w.register("mail");
    let mut n = wake(&w, "n1", "mail-id");
    n.priority = Priority::Normal as i32;
    if let Some(t) = ttl_s {
        n.ttl_s = t;
    }
    w.publish(n).unwrap();
    w
}

#[test]
fn normal_priority_rides_the_canary_that_is_the_keepalive() {
    let mut w = held_normal_wake(RelayConnectionConfig::default(), None);
    // The device pinged right after Welcome, asking for a canary after its
    // keepalive interval of silence: the wake goes with it.
    let start = w.now;
    let keepalive = DeviceSessionConfig::new("t").keepalive_interval;
    while w.app.is_empty() && w.now < start + keepalive * 2 {
        w.advance(Duration::from_millis(100));
    }
    let at = w.now - start;
    assert_eq!(at, keepalive, "sent with the canary");
    assert_eq!(w.app, ["n1"]);
}

#[test]
fn normal_priority_is_held_until_a_high_one_or_the_hold_timer() {
    let config = RelayConnectionConfig {
        radio_awake: Duration::ZERO,
        normal_max_delay: Duration::from_secs(10),
        ..RelayConnectionConfig::default()
    };
    let max = config.normal_max_delay;
    let mut w = World::new(config);
    w.pump();
    w.register("mail");
    let mut n1 = wake(&w, "n1", "mail-id");
    n1.priority = Priority::Normal as i32;
    w.publish(n1).unwrap();
    assert!(w.app.is_empty());
    assert_eq!(w.relay.poll_timeout(), Some(w.now + max));
    // A high-priority wake arrives: the held one goes first.
    let h = wake(&w, "h1", "mail-id");
    w.publish(h).unwrap();
    assert_eq!(w.app, ["n1", "h1"]);

    // Alone, a held wake goes when the hold timer fires, not before.
    let mut n2 = wake(&w, "n2", "mail-id");
    n2.priority = Priority::Normal as i32;
    w.publish(n2).unwrap();
    w.advance(max - Duration::from_millis(1));
    assert_eq!(w.app, ["n1", "h1"]);
    w.advance(Duration::from_millis(1));
    assert_eq!(w.app, ["n1", "h1", "n2"]);
}

#[test]
fn normal_priority_rides_the_device_s_next_keepalive() {
    let mut config = RelayConnectionConfig::default();
    config.session.canary = false;
    let mut w = held_normal_wake(config, None);
    let keepalive = DeviceSessionConfig::new("t").keepalive_interval;
    w.advance(keepalive - Duration::from_millis(1));
    assert!(w.app.is_empty());
    w.advance(Duration::from_millis(1)); // the Ping reaches the relay
    assert_eq!(w.app, ["n1"]);
    assert!(w.relay_events.contains(&ConnectionEvent::Ping));
}

#[test]
fn a_wake_is_never_sent_after_its_ttl() {
    let mut w = held_normal_wake(RelayConnectionConfig::default(), Some(10));
    w.advance(Duration::from_secs(60)); // the hold timer fires after the TTL
    assert!(w.app.is_empty());
    assert_eq!(w.released(), [("n1".into(), ReleaseReason::Expired)]);
    // Already expired when handed over: refused.
    let mut old = wake_at("old", "mail-id", 1);
    old.ttl_s = 1;
    assert_eq!(
        w.relay.handle_wake(w.now, old, true),
        Err(WakeRefused::Expired)
    );
}

#[test]
fn in_flight_is_bounded_and_refilled_as_acks_come_in() {
    let config = RelayConnectionConfig {
        max_in_flight: 4,
        ..RelayConnectionConfig::default()
    };
    let mut w = World::new(config);
    w.pump();
    w.register("mail");
    w.auto_handle = false;
    let mut refused = 0;
    for i in 0..6 {
        let e = wake(&w, &format!("e{i}"), "mail-id");
        if w.publish(e) == Err(WakeRefused::Full) {
            refused += 1;
        }
    }
    assert_eq!(refused, 2);
    assert_eq!(w.relay.in_flight(), 4);
    // The app catches up: once half the room is free, the relay asks for
    // the channel's queue again and the rest follows.
    for i in 0..4 {
        w.device.handled(w.now, &format!("e{i}"));
        w.pump();
    }
    for id in ["e4", "e5"] {
        w.device.handled(w.now, id);
    }
    w.pump();
    assert!(w.relay_events.iter().any(
        |e| matches!(e, ConnectionEvent::Refill { channel_ids } if channel_ids == &["mail-id"])
    ));
    assert_eq!(w.app, ["e0", "e1", "e2", "e3", "e4", "e5"]);
    assert_eq!(w.acked.len(), 6);
}

#[test]
fn duplicates_and_acked_events_are_not_sent_twice_on_one_connection() {
    let mut w = connected();
    w.register("mail");
    let e = wake(&w, "e1", "mail-id");
    w.publish(e.clone()).unwrap();
    // A stale copy from a queue read that raced the ack.
    assert_eq!(
        w.relay.handle_wake(w.now, e, true),
        Err(WakeRefused::Duplicate)
    );
    w.pump();
    assert_eq!(w.app, ["e1"]);
}

#[test]
fn unregister_releases_the_channel_s_tracked_wakes() {
    let mut w = held_normal_wake(RelayConnectionConfig::default(), None);
    w.device.unregister(w.now, "mail-id").unwrap();
    w.pump();
    assert_eq!(w.released(), [("n1".into(), ReleaseReason::Unregistered)]);
    assert!(w.app.is_empty());
}

#[test]
fn not_durable_wakes_are_sent_now_or_never() {
    let mut w = connected();
    let e = wake(&w, "t0", "mail-id");
    assert_eq!(
        w.relay.handle_wake(w.now, e.clone(), false),
        Err(WakeRefused::NotRegistered)
    );
    w.register("mail");
    assert_eq!(w.relay.handle_wake(w.now, e, false), Ok(()));
    w.pump();
    assert_eq!(w.app, ["t0"]);
    // On close, a not-durable wake still waiting is released, not handed
    // over.
    w.auto_handle = false;
    let f = wake(&w, "t1", "mail-id");
    w.relay.handle_wake(w.now, f, false).unwrap();
    assert!(w.relay.drain_undelivered().is_empty());
}

#[test]
fn go_away_closes_and_everything_unacked_is_handed_over() {
    let mut w = connected();
    w.register("mail");
    w.auto_handle = false;
    for i in 0..3 {
        let e = wake(&w, &format!("e{i}"), "mail-id");
        w.publish(e).unwrap();
    }
    w.relay
        .go_away(GoAwayReason::Shutdown, Duration::from_secs(1), "bye");
    w.pump();
    assert!(w.relay.is_closed());
    let ids: Vec<String> = w
        .relay
        .drain_undelivered()
        .into_iter()
        .map(|w| w.event_id)
        .collect();
    assert_eq!(ids, ["e0", "e1", "e2"]);
}

#[test]
fn a_path_change_mid_flight_changes_nothing_for_delivery() {
    let mut w = connected();
    w.register("mail");
    w.auto_handle = false;
    let e = wake(&w, "e1", "mail-id");
    w.publish(e).unwrap();
    // The device moved (QUIC migration): same connection, new address.
    w.relay
        .set_observed_addr("198.51.100.9:40000".parse().unwrap());
    let f = wake(&w, "e2", "mail-id");
    w.publish(f).unwrap();
    w.device.handled(w.now, "e1");
    w.device.handled(w.now, "e2");
    w.pump();
    assert_eq!(w.app, ["e1", "e2"]);
    assert_eq!(w.acked, ["e1", "e2"]);
    // The next Pong reports the new address.
    w.device.session_mut().unwrap().ping(w.now);
    w.pump();
    let _ = w.device.poll_event();
    assert_eq!(w.relay.in_flight(), 0);
}

#[test]
fn a_sent_wake_never_acked_is_given_up_after_its_ttl_and_the_ack_grace() {
    let mut w = connected();
    w.register("mail");
    w.auto_handle = false; // the device took it and went silent
    let mut e = wake(&w, "e1", "mail-id");
    e.ttl_s = 10;
    w.publish(e).unwrap();
    assert_eq!(w.app, ["e1"]);
    let grace = RelayConnectionConfig::default().ack_grace;
    w.advance(Duration::from_secs(10) + grace - Duration::from_millis(1));
    assert!(w.released().is_empty(), "given up before TTL + grace");
    w.advance(Duration::from_millis(1));
    assert_eq!(w.released(), [("e1".into(), ReleaseReason::Expired)]);
    // A late ack no longer counts.
    w.device.handled(w.now, "e1");
    w.pump();
    assert!(w.acked.is_empty());
}
