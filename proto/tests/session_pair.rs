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
                self.device.handle_data(self.now, &b);
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
    let DeviceEvent::Registered {
        request_id,
        result: Ok(bindings),
    } = &p.device_events[1]
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
        matches!(&p.device_events[2], DeviceEvent::Wake(w) if w.event_id == "e1" && w.payload == b"hi")
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
    let mut p = Pair::established();
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
    let interval = p.device.keepalive_interval();
    // The relay goes silent: advance the device alone.
    p.now += interval;
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
