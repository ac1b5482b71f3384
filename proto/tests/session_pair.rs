//! The two sans-IO sessions wired to each other in memory, on a simulated
//! clock: no sockets, no runtime, no sleeping.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::time::{Duration, Instant};

use wakewire_proto::codec::encode_to_bytes;
use wakewire_proto::device_session::RegisterRefused;
use wakewire_proto::device_session::{DeviceEvent, DeviceSession, DeviceSessionConfig};
use wakewire_proto::pb::device::{frame::Body, GoAwayReason, Hello, Priority, Register, Wake};
use wakewire_proto::relay_session::{
    RelayEvent, RelaySession, RelaySessionConfig, REGISTER_ERROR_INVALID_NAME,
    REGISTER_ERROR_RATE_LIMITED, REGISTER_ERROR_TOO_MANY_CHANNELS,
};
use wakewire_proto::{ErrorCode, MAX_FRAME_SIZE};

/// The simulated clock's origin (the only real clock read; time then
/// moves only when a test says so).
#[allow(clippy::disallowed_methods)]
fn origin() -> Instant {
    Instant::now()
}

/// A device and a relay session joined by in-memory streams, with a clock.
struct Pair {
    now: Instant,
    device: DeviceSession,
    relay: RelaySession,
    device_events: Vec<DeviceEvent>,
    relay_events: Vec<RelayEvent>,
    /// The device's NAT binding is dead: what the relay sends waits here
    /// (as QUIC or TCP would retransmit it) until the device sends
    /// something, which opens a new binding (on the same port, for a
    /// port-preserving NAT: nothing else tells the relay or the device).
    dead_binding: Option<Vec<bytes::Bytes>>,
}

impl Pair {
    fn new(config: RelaySessionConfig) -> Self {
        let now = origin();
        let mut relay = RelaySession::new(now, 1_700_000_000_000, config);
        relay.set_observed_addr("203.0.113.7:51234".parse().unwrap());
        Self {
            now,
            device: DeviceSession::new(now, DeviceSessionConfig::new("token-1")),
            relay,
            device_events: vec![],
            relay_events: vec![],
            dead_binding: None,
        }
    }

    /// Moves bytes both ways until nothing is left; the relay driver part
    /// accepts any Hello whose credential is "token-1" and names channels
    /// "<name>-id".
    fn pump(&mut self) {
        loop {
            let mut moved = false;
            while let Some(b) = self.device.poll_transmit() {
                self.relay.handle_data(self.now, &b);
                moved = true;
                // Outbound traffic re-creates the binding: held bytes flow.
                for held in self.dead_binding.take().unwrap_or_default() {
                    self.device.handle_data(self.now, &held);
                }
            }
            while let Some(e) = self.relay.poll_event() {
                match &e {
                    RelayEvent::Hello { credential, .. } if credential == "token-1" => {
                        self.relay.accept(self.now, "dev1".into(), "s1".into())
                    }
                    RelayEvent::Hello { .. } => {
                        self.relay.reject(ErrorCode::Unauthorized, "bad token")
                    }
                    RelayEvent::Register { request_id, names } => {
                        let b = names
                            .iter()
                            .map(|n| (n.clone(), format!("{n}-id")))
                            .collect();
                        self.relay.registered(*request_id, b)
                    }
                    _ => {}
                }
                self.relay_events.push(e);
                moved = true;
            }
            while let Some(b) = self.relay.poll_transmit() {
                match &mut self.dead_binding {
                    Some(held) => held.push(b),
                    None => self.device.handle_data(self.now, &b),
                }
                moved = true;
            }
            while let Some(e) = self.device.poll_event() {
                self.device_events.push(e);
                moved = true;
            }
            if !moved {
                return;
            }
        }
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.device.handle_timeout(self.now);
        self.relay.handle_timeout(self.now);
        self.pump();
    }

    fn established() -> Self {
        let mut p = Self::new(RelaySessionConfig::default());
        p.pump();
        assert!(p.device.is_established());
        p
    }
}

fn wake(id: &str, channel: &str, payload: &[u8]) -> Wake {
    Wake {
        event_id: id.into(),
        channel_id: channel.into(),
        payload: payload.to_vec(),
        priority: Priority::High as i32,
        created_at_ms: 1,
        ttl_s: 60,
    }
}

#[test]
fn handshake_register_wake_ack() {
    let mut p = Pair::new(RelaySessionConfig::default());
    p.pump();
    assert!(
        matches!(&p.device_events[0], DeviceEvent::Welcome { device_id, session_id, limits, server_time_ms }
        if device_id == "dev1" && session_id == "s1" && limits.max_payload_size == 4096 && *server_time_ms == 1_700_000_000_000)
    );
    assert_eq!(p.relay.device_id(), Some("dev1"));

    let req = p
        .device
        .register(p.now, vec!["mail".into(), "chat".into(), "mail".into()]);
    p.pump();
    let Some(DeviceEvent::Registered {
        request_id,
        result: Ok(bindings),
    }) = p
        .device_events
        .iter()
        .find(|e| matches!(e, DeviceEvent::Registered { .. }))
    else {
        panic!("{:?}", p.device_events)
    };
    assert_eq!(*request_id, req);
    let ids: Vec<_> = bindings
        .iter()
        .map(|b| (b.name.as_str(), b.channel_id.as_str()))
        .collect();
    assert_eq!(ids, [("mail", "mail-id"), ("chat", "chat-id")]);

    p.relay.send_wake(wake("e1", "chat-id", b"hi")).unwrap();
    p.pump();
    assert!(
        matches!(&p.device_events.last().unwrap(), DeviceEvent::Wake(w) if w.event_id == "e1" && w.payload == b"hi")
    );
    p.device.ack(p.now, "e1".into());
    p.pump();
    assert_eq!(
        p.relay_events.last(),
        Some(&RelayEvent::Ack {
            event_id: "e1".into()
        })
    );

    // A wake to a channel this session never registered is refused locally.
    assert!(p.relay.send_wake(wake("e2", "other-id", b"")).is_err());
    p.device
        .unregister(p.now, vec!["chat-id".into(), "never".into()]);
    p.pump();
    assert_eq!(
        p.relay_events.last(),
        Some(&RelayEvent::Unregister {
            channel_ids: vec!["chat-id".into()]
        })
    );
    assert!(p.relay.send_wake(wake("e3", "chat-id", b"")).is_err());
    assert!(!p.relay.is_closed() && !p.device.is_closed());
}

#[test]
fn keepalive_runs_on_the_simulated_clock_and_reports_observed_address() {
    // A relay without canaries: the plain keepalive.
    let mut p = Pair::new(RelaySessionConfig {
        canary: false,
        ..RelaySessionConfig::default()
    });
    p.pump();
    let interval = p.device.keepalive_interval();
    assert_eq!(p.device.poll_timeout(), Some(p.now + interval));
    p.advance(interval - Duration::from_millis(1));
    assert!(!p
        .device_events
        .iter()
        .any(|e| matches!(e, DeviceEvent::KeepaliveCompleted { .. })));
    p.advance(Duration::from_millis(1));
    assert!(p.device_events.iter().any(
        |e| matches!(e, DeviceEvent::KeepaliveCompleted { observed_addr, idle, .. } if observed_addr == "203.0.113.7:51234" && *idle == interval)
    ));
    assert!(p.relay_events.contains(&RelayEvent::Ping));

    // Sending anything postpones the next keepalive.
    p.advance(interval / 2);
    p.device.ack(p.now, "x".into());
    p.pump();
    assert_eq!(p.device.poll_timeout(), Some(p.now + interval));
}

#[test]
fn keepalive_timeout_closes_when_pongs_stop() {
    let mut p = Pair::established();
    // The relay goes silent: advance the device alone to its own ping.
    p.now = p.device.poll_timeout().unwrap();
    p.device.handle_timeout(p.now);
    assert!(p.device.poll_transmit().is_some(), "ping written");
    p.now += Duration::from_secs(10);
    p.device.handle_timeout(p.now);
    assert_eq!(
        p.device.poll_close().map(|c| c.code),
        Some(ErrorCode::KeepaliveTimeout)
    );
}

#[test]
fn hello_timeout_and_welcome_timeout() {
    let now = origin();
    let mut relay = RelaySession::new(now, 0, RelaySessionConfig::default());
    assert_eq!(relay.poll_timeout(), Some(now + Duration::from_secs(10)));
    relay.handle_timeout(now + Duration::from_secs(9));
    assert!(!relay.is_closed());
    relay.handle_timeout(now + Duration::from_secs(10));
    assert_eq!(
        relay.poll_close().map(|c| c.code),
        Some(ErrorCode::HelloTimeout)
    );
    assert_eq!(relay.poll_close(), None, "a close is yielded once");

    let mut device = DeviceSession::new(now, DeviceSessionConfig::new("t"));
    device.handle_timeout(now + Duration::from_secs(10));
    assert_eq!(
        device.poll_close().map(|c| c.code),
        Some(ErrorCode::HelloTimeout)
    );
}

#[test]
fn bad_credential_is_rejected_with_unauthorized() {
    let now = origin();
    let mut p = Pair::new(RelaySessionConfig::default());
    p.device = DeviceSession::new(now, DeviceSessionConfig::new("wrong"));
    p.pump();
    assert_eq!(
        p.relay.poll_close().map(|c| c.code),
        Some(ErrorCode::Unauthorized)
    );
    assert!(!p.device.is_established());
}

fn relay_after(frames: &[Body]) -> RelaySession {
    let now = origin();
    let mut relay = RelaySession::new(now, 0, RelaySessionConfig::default());
    for f in frames {
        relay.handle_data(now, &encode_to_bytes(f.clone(), MAX_FRAME_SIZE).unwrap());
        while let Some(e) = relay.poll_event() {
            if let RelayEvent::Hello { .. } = e {
                relay.accept(now, "d".into(), "s".into());
            }
        }
    }
    relay
}

fn hello(v: u32) -> Body {
    Body::Hello(Hello {
        protocol_version: v,
        credential: "t".into(),
        sdk: String::new(),
    })
}

#[test]
fn frames_in_the_wrong_state_are_protocol_violations() {
    let cases: Vec<(Vec<Body>, &str)> = vec![
        (
            vec![Body::Register(Register {
                request_id: 1,
                names: vec![],
            })],
            "expected Hello",
        ),
        (vec![hello(1), hello(1)], "unexpected Hello"),
        (
            vec![hello(1), Body::Wake(wake("e", "c", b""))],
            "unexpected Wake",
        ),
        // Canaries go relay -> device only.
        (
            vec![
                hello(1),
                Body::Canary(wakewire_proto::pb::device::Canary { nonce: 1 }),
            ],
            "unexpected Canary",
        ),
    ];
    for (frames, why) in cases {
        let mut relay = relay_after(&frames);
        let close = relay.poll_close().expect(why);
        assert_eq!(close.code, ErrorCode::ProtocolViolation, "{why}");
        assert!(close.reason.contains(why), "{} / {why}", close.reason);
    }
    let mut relay = relay_after(&[hello(7)]);
    assert_eq!(
        relay.poll_close().map(|c| c.code),
        Some(ErrorCode::UnsupportedVersion)
    );
}

#[test]
fn garbage_oversize_and_unknown_frames_close_with_protocol_violation() {
    let now = origin();
    let http = b"GET / HTTP/1.1\r\n\r\n".repeat(5);
    let inputs: [&[u8]; 4] = [
        &http,
        &[0xff, 0xff, 0xff, 0x7f],       // announces a huge frame
        &[0x02, 0x78, 0x01],             // frame type 15, unknown
        &[0x04, 0x0a, 0x02, 0xff, 0xff], // Hello with a truncated field
    ];
    for input in inputs {
        let mut relay = RelaySession::new(now, 0, RelaySessionConfig::default());
        relay.handle_data(now, input);
        let close = relay
            .poll_close()
            .unwrap_or_else(|| panic!("{input:?} not refused"));
        assert_eq!(close.code, ErrorCode::ProtocolViolation, "{input:?}");
        assert!(close.reason.starts_with("bad frame"), "{}", close.reason);
        // Further input after the close is ignored, never a panic.
        relay.handle_data(now, input);
        assert!(relay.poll_event().is_none());
    }
    // A stream that ends inside a frame is a violation too.
    let mut relay = RelaySession::new(now, 0, RelaySessionConfig::default());
    relay.handle_data(now, b"GET /");
    assert!(!relay.is_closed());
    relay.handle_stream_finished();
    assert_eq!(
        relay.poll_close().map(|c| c.code),
        Some(ErrorCode::ProtocolViolation)
    );

    let mut device = DeviceSession::new(now, DeviceSessionConfig::new("t"));
    device.handle_data(now, b"\x05hello");
    assert_eq!(
        device.poll_close().map(|c| c.code),
        Some(ErrorCode::ProtocolViolation)
    );
}

#[test]
fn register_refusals_do_not_close_the_session() {
    let mut p = Pair::new(RelaySessionConfig {
        max_channels: 2,
        ..RelaySessionConfig::default()
    });
    p.pump();
    p.device.register(p.now, vec!["bad name".into()]);
    p.device
        .register(p.now, vec!["a".into(), "b".into(), "c".into()]);
    p.device.register(p.now, vec!["a".into(), "b".into()]);
    p.device.register(p.now, vec!["a".into()]); // already registered: no new slot used
    p.pump();
    let results: Vec<_> = p
        .device_events
        .iter()
        .filter_map(|e| match e {
            DeviceEvent::Registered { result, .. } => {
                Some(result.as_ref().map(|b| b.len()).map_err(|r| r.code))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        results,
        [
            Err(REGISTER_ERROR_INVALID_NAME),
            Err(REGISTER_ERROR_TOO_MANY_CHANNELS),
            Ok(2),
            Ok(1)
        ]
    );
    assert!(!p.relay.is_closed());
}

#[test]
fn go_away_reaches_the_device_before_the_close() {
    let mut p = Pair::established();
    p.relay
        .go_away(GoAwayReason::Shutdown, Duration::from_secs(3), "restarting");
    p.pump();
    assert!(
        matches!(p.device_events.last(), Some(DeviceEvent::GoAway { reason: GoAwayReason::Shutdown, reconnect_after, .. }) if *reconnect_after == Duration::from_secs(3))
    );
    assert_eq!(
        p.relay.poll_close().map(|c| c.code),
        Some(ErrorCode::GoingAway)
    );
}

#[test]
fn oversize_wake_is_refused_by_the_relay_session() {
    let mut p = Pair::established();
    p.device.register(p.now, vec!["m".into()]);
    p.pump();
    let err = p
        .relay
        .send_wake(wake("e", "m-id", &[0; 4097]))
        .unwrap_err();
    assert!(err.to_string().contains("4097"));
    assert!(!p.relay.is_closed());
}

#[test]
fn names_already_registered_are_answered_without_the_driver_and_new_ones_are_rate_limited() {
    let mut p = Pair::new(RelaySessionConfig {
        register_burst: 4,
        register_per_minute: 60,
        ..RelaySessionConfig::default()
    });
    p.pump();
    p.device.register(p.now, vec!["a".into(), "b".into()]);
    p.pump();
    let registers = |p: &Pair| {
        p.relay_events
            .iter()
            .filter(|e| matches!(e, RelayEvent::Register { .. }))
            .count()
    };
    assert_eq!(registers(&p), 1);
    // Asking again for known names: answered by the session itself.
    let again = p.device.register(p.now, vec!["b".into(), "a".into()]);
    p.pump();
    assert_eq!(registers(&p), 1, "the driver was asked again");
    let Some(DeviceEvent::Registered {
        request_id,
        result: Ok(bindings),
    }) = p.device_events.last()
    else {
        panic!("{:?}", p.device_events)
    };
    assert_eq!(*request_id, again);
    let got: Vec<_> = bindings.iter().map(|b| b.channel_id.as_str()).collect();
    assert_eq!(got, ["b-id", "a-id"]);
    // Mixed: the known one from the table, the new one from the driver.
    p.device.register(p.now, vec!["a".into(), "c".into()]);
    p.pump();
    assert!(
        matches!(p.relay_events.last(), Some(RelayEvent::Register { names, .. }) if names == &["c"])
    );
    let Some(DeviceEvent::Registered {
        result: Ok(bindings),
        ..
    }) = p.device_events.last()
    else {
        panic!()
    };
    let got: Vec<_> = bindings.iter().map(|b| b.channel_id.as_str()).collect();
    assert_eq!(got, ["a-id", "c-id"]);
    // The burst (4 new names) is spent after one more; then one per second.
    p.device.register(p.now, vec!["d".into(), "e".into()]);
    p.pump();
    assert!(matches!(
        p.device_events.last(),
        Some(DeviceEvent::Registered {
            result: Err(RegisterRefused {
                code: REGISTER_ERROR_RATE_LIMITED,
                ..
            }),
            ..
        })
    ));
    p.advance(Duration::from_secs(1));
    p.device.register(p.now, vec!["d".into()]);
    p.pump();
    assert!(matches!(
        p.device_events.last(),
        Some(DeviceEvent::Registered { result: Ok(b), .. }) if b.len() == 1
    ));
    assert!(!p.relay.is_closed());
}

fn canaries(events: &[DeviceEvent]) -> (Vec<Duration>, Vec<Duration>) {
    let mut received = vec![];
    let mut missed = vec![];
    for e in events {
        match e {
            DeviceEvent::CanaryReceived { idle } => received.push(*idle),
            DeviceEvent::CanaryMissed { after_idle } => missed.push(*after_idle),
            _ => {}
        }
    }
    (received, missed)
}

/// Runs the pair for `total`, a second at a time.
fn run_for(p: &mut Pair, total: Duration) {
    let end = p.now + total;
    while p.now < end {
        p.advance(Duration::from_secs(1));
    }
}

#[test]
fn a_canary_crosses_the_silence_just_before_each_keepalive() {
    let mut p = Pair::established();
    let interval = p.device.keepalive_interval();
    assert!(p.device.relay_sends_canaries(), "announced in Welcome");
    // The device pinged right after Welcome, asking for the first canary.
    let pings = |p: &Pair| {
        p.relay_events
            .iter()
            .filter(|e| **e == RelayEvent::Ping)
            .count()
    };
    assert_eq!(pings(&p), 1);
    assert!(p
        .device_events
        .iter()
        .any(|e| matches!(e, DeviceEvent::KeepaliveCompleted { .. })));
    // Four cycles: each one is a canary answered by a Ping at once, so
    // the canary is the keepalive, never a missed one.
    run_for(&mut p, interval * 4);
    let (received, missed) = canaries(&p.device_events);
    assert!(missed.is_empty(), "{missed:?}");
    assert!(received.len() >= 4, "{received:?}");
    assert!(pings(&p) >= 5);
    for idle in &received[1..] {
        assert_eq!(*idle, interval);
    }
    assert!(!p.device.is_closed());
}

#[test]
fn a_binding_that_dies_on_a_port_preserving_nat_is_seen_at_the_next_keepalive() {
    let mut p = Pair::established();
    let interval = p.device.keepalive_interval();
    run_for(&mut p, interval * 2);
    let before = canaries(&p.device_events);
    assert!(before.1.is_empty());
    // The NAT drops the binding in the silence; the relay's canary is lost
    // (held for retransmission). Nothing about ports changes.
    p.device_events.clear();
    p.dead_binding = Some(vec![]);
    // Within one interval and the margin (1 s + 4 round trips, at most a
    // quarter of the interval).
    run_for(&mut p, interval + interval / 4);
    let (received, missed) = canaries(&p.device_events);
    assert_eq!(
        missed.len(),
        1,
        "seen within one interval: {:?}",
        p.device_events
    );
    assert_eq!(missed[0], interval, "the silence the canary was to cross");
    // The late canary (retransmitted once the keepalive re-opened the
    // binding) proves nothing and is ignored.
    assert!(received.is_empty(), "{received:?}");
    assert!(
        p.dead_binding.is_none(),
        "the keepalive re-opened the binding"
    );
    // Afterwards canaries flow again.
    p.device_events.clear();
    run_for(&mut p, interval * 2);
    let (received, missed) = canaries(&p.device_events);
    assert!(missed.is_empty());
    assert!(!received.is_empty());
}

#[test]
fn anything_the_device_sends_postpones_the_canary_and_no_false_miss_follows() {
    let mut p = Pair::established();
    let interval = p.device.keepalive_interval();
    run_for(&mut p, interval * 2);
    p.device_events.clear();
    // The device acks something every 10 s: its keepalive and the relay's
    // canary both keep moving; no canary is due, none is missed.
    for i in 0..10 {
        run_for(&mut p, Duration::from_secs(10));
        p.device.ack(p.now, format!("e{i}"));
        p.pump();
    }
    let (received, missed) = canaries(&p.device_events);
    assert!(
        missed.is_empty() && received.is_empty(),
        "{:?}",
        p.device_events
    );
    // A shorter interval set while a canary is pending is not a miss.
    p.device.set_keepalive_interval(Duration::from_secs(5));
    run_for(&mut p, Duration::from_secs(30));
    let (_, missed) = canaries(&p.device_events);
    assert!(missed.is_empty(), "{:?}", p.device_events);
}

#[test]
fn relays_without_canaries_are_not_asked_and_the_relay_clamps_what_it_is_asked() {
    let mut p = Pair::new(RelaySessionConfig {
        canary: false,
        ..RelaySessionConfig::default()
    });
    p.pump();
    assert!(!p.device.relay_sends_canaries());
    let interval = p.device.keepalive_interval();
    run_for(&mut p, interval * 3);
    let (received, missed) = canaries(&p.device_events);
    assert!(received.is_empty() && missed.is_empty());

    // A hostile Ping asking for a canary after 0 ms or u64::MAX ms: at
    // least 1 s, at most the idle timeout, one per Ping.
    let now = origin();
    let mut relay = relay_after(&[hello(1)]);
    while relay.poll_transmit().is_some() {}
    for ask in [1u64, u64::MAX] {
        let ping = Body::Ping(wakewire_proto::pb::device::Ping {
            nonce: 7,
            canary_after_ms: ask,
        });
        relay.handle_data(now, &encode_to_bytes(ping, MAX_FRAME_SIZE).unwrap());
        while relay.poll_transmit().is_some() {}
        let due = relay.poll_timeout().expect("canary armed");
        let after = due - now;
        assert!(after >= Duration::from_secs(1), "{after:?}");
        assert!(
            after <= RelaySessionConfig::default().idle_timeout,
            "{after:?}"
        );
        relay.handle_timeout(due);
        assert!(relay.poll_transmit().is_some(), "canary sent");
        assert_eq!(relay.poll_timeout(), None, "one canary per Ping");
    }
}

/// With a real round trip the Pong comes after the Ping: the canary's
/// deadline runs from what the device sent (the relay re-arms on that), so
/// a missing canary is still seen at the keepalive.
#[test]
fn a_missing_canary_is_seen_with_a_real_round_trip() {
    use wakewire_proto::pb::device::{Pong, ServerLimits, Welcome};
    let mut now = origin();
    let mut device = DeviceSession::new(now, DeviceSessionConfig::new("t"));
    while device.poll_transmit().is_some() {}
    let frame = |b: Body| encode_to_bytes(b, MAX_FRAME_SIZE).unwrap();
    device.handle_data(
        now,
        &frame(Body::Welcome(Welcome {
            session_id: "s".into(),
            limits: Some(ServerLimits {
                canary: true,
                ..ServerLimits::default()
            }),
            server_time_ms: 0,
            device_id: "d".into(),
        })),
    );
    let rtt = Duration::from_millis(300);
    for (nonce, round) in (1..).zip(0..3) {
        // The Ping went out (right after Welcome, then at each keepalive).
        assert!(device.poll_transmit().is_some(), "round {round}: ping");
        now += rtt;
        device.handle_data(
            now,
            &frame(Body::Pong(Pong {
                nonce,
                observed_addr: "203.0.113.7:1".into(),
                server_time_ms: 0,
            })),
        );
        // No canary comes: at the keepalive, a miss (not on the first
        // round, whose margin used the default round trip).
        let due = device.poll_timeout().unwrap();
        now = due;
        device.handle_timeout(now);
        let events: Vec<_> = std::iter::from_fn(|| device.poll_event()).collect();
        assert!(
            events
                .iter()
                .any(|e| matches!(e, DeviceEvent::CanaryMissed { .. })),
            "round {round}: {events:?}"
        );
    }
}
