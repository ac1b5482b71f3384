//! The device's end of the control stream, as a sans-IO state machine.
//!
//! On creation it queues Hello; once Welcome arrives the session is
//! established and the app can register channels, receive wakes and ack
//! them. It also runs the application keepalive: a Ping after
//! `keepalive_interval` without anything sent (only the device's outgoing
//! packets refresh a NAT binding), and a close with
//! [`ErrorCode::KeepaliveTimeout`] if the Pong does not come back within
//! `keepalive_timeout`. The Pong carries the address the relay observed,
//! which the keepalive tuner uses to detect NAT rebinding.

use std::time::{Duration, Instant};

use crate::codec::DecodeError;
use crate::pb::device::{
    frame::Body, Ack, ChannelBinding, GoAwayReason, Hello, Ping, Register, ServerLimits,
    Unregister, Wake,
};
use crate::relay_session::{decode_reason, frame_name};
pub use crate::session_core::Close;
use crate::session_core::{millis, Core};
use crate::{ErrorCode, MAX_FRAME_SIZE, MAX_PAYLOAD_SIZE, PROTOCOL_VERSION};

/// Settings of a device session.
#[derive(Debug, Clone)]
pub struct DeviceSessionConfig {
    /// Device credential sent in Hello.
    pub credential: String,
    /// SDK description sent in Hello.
    pub sdk: String,
    /// Send a Ping after this long without sending anything.
    pub keepalive_interval: Duration,
    /// Give up on the connection if a Pong takes longer than this.
    pub keepalive_timeout: Duration,
    /// Give up if Welcome takes longer than this.
    pub welcome_timeout: Duration,
    /// Ask relays that offer it for a Canary after each keepalive interval
    /// of silence (the canary then is the keepalive): the proof, or
    /// disproof, that the NAT binding survived the silence, whatever port
    /// the NAT gives back.
    pub canary: bool,
}

impl DeviceSessionConfig {
    /// Defaults for everything but the credential.
    pub fn new(credential: impl Into<String>) -> Self {
        Self {
            credential: credential.into(),
            sdk: concat!("wakewire-proto/", env!("CARGO_PKG_VERSION")).to_owned(),
            keepalive_interval: Duration::from_secs(25),
            keepalive_timeout: Duration::from_secs(10),
            welcome_timeout: Duration::from_secs(10),
            canary: true,
        }
    }
}

/// How long the device waits for a canary past the keepalive interval
/// before it pings on its own and calls the binding lost: four round trips
/// and a second (room for QUIC to retransmit a lost canary), at most a
/// quarter of the interval.
pub fn canary_margin(interval: Duration, rtt: Duration) -> Duration {
    (rtt * 4 + Duration::from_secs(1)).min(interval / 4)
}

/// A refused Register request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterRefused {
    /// `Registered.error_code` (see the `REGISTER_ERROR_*` constants).
    pub code: u32,
    /// The relay's explanation.
    pub message: String,
}

/// Something the driver (the SDK) must act on.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceEvent {
    /// The relay accepted the device.
    Welcome {
        /// Session id, for logs.
        session_id: String,
        /// Device id the credential names.
        device_id: String,
        /// Relay limits.
        limits: ServerLimits,
        /// Relay wall clock at Welcome, Unix ms.
        server_time_ms: u64,
    },
    /// Answer to [`DeviceSession::register`].
    Registered {
        /// Request id returned by `register`.
        request_id: u64,
        /// Bindings, or why nothing was registered.
        result: Result<Vec<ChannelBinding>, RegisterRefused>,
    },
    /// A wake event: hand it to the app, then [`DeviceSession::ack`] it.
    Wake(Wake),
    /// A keepalive round trip completed.
    KeepaliveCompleted {
        /// Ping to Pong time.
        rtt: Duration,
        /// The device's address as the relay saw it.
        observed_addr: String,
        /// How long the device had sent nothing before this Ping (the idle
        /// time its NAT binding had to survive).
        idle: Duration,
    },
    /// The canary arrived: the connection's NAT binding survived `idle` of
    /// silence in both directions (the session has answered with a Ping).
    CanaryReceived {
        /// Silence before the canary, as the device saw it.
        idle: Duration,
    },
    /// The canary asked for did not arrive within its margin: the binding
    /// died within `after_idle` of silence (or the relay's packet was lost
    /// on the way). The device's own Ping has been sent, which opens a new
    /// binding.
    CanaryMissed {
        /// The silence the canary was to cross.
        after_idle: Duration,
    },
    /// The relay is about to close the connection.
    GoAway {
        /// Why.
        reason: GoAwayReason,
        /// Suggested wait before reconnecting.
        reconnect_after: Duration,
        /// The relay's message.
        message: String,
        /// Other relays to connect to instead (`host:port`), if any.
        alternatives: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitWelcome { deadline: Instant },
    Established,
}

/// Device side of the control stream.
#[derive(Debug)]
pub struct DeviceSession {
    core: Core<DeviceEvent>,
    state: State,
    config: DeviceSessionConfig,
    max_payload: usize,
    next_request_id: u64,
    next_nonce: u64,
    last_send: Instant,
    ping_out: Option<(u64, Instant)>,
    ping_idle: Duration,
    last_recv: Instant,
    /// Whether the relay sends canaries (from Welcome).
    relay_canary: bool,
    /// The canary asked for and not yet seen.
    canary_wait: Option<CanaryWait>,
    /// Last keepalive round trip.
    rtt: Duration,
}

#[derive(Debug, Clone, Copy)]
struct CanaryWait {
    nonce: u64,
    after: Duration,
    margin: Duration,
}

impl DeviceSession {
    /// Starts a session at `now`: Hello is queued.
    pub fn new(now: Instant, config: DeviceSessionConfig) -> Self {
        let mut core = Core::new(MAX_FRAME_SIZE);
        core.send(Body::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            credential: config.credential.clone(),
            sdk: config.sdk.clone(),
        }));
        Self {
            core,
            state: State::AwaitWelcome {
                deadline: now + config.welcome_timeout,
            },
            config,
            max_payload: MAX_PAYLOAD_SIZE,
            next_request_id: 1,
            next_nonce: 1,
            last_send: now,
            ping_out: None,
            ping_idle: Duration::ZERO,
            last_recv: now,
            relay_canary: false,
            canary_wait: None,
            rtt: Duration::from_millis(250),
        }
    }

    /// Whether Welcome has arrived and the session is open.
    pub fn is_established(&self) -> bool {
        self.state == State::Established && !self.core.is_closed()
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.core.is_closed()
    }

    /// Why the session ended, if it did.
    pub fn close_reason(&self) -> Option<&Close> {
        self.core.close_reason()
    }

    /// Current keepalive interval.
    pub fn keepalive_interval(&self) -> Duration {
        self.config.keepalive_interval
    }

    /// Changes the keepalive interval; the next Ping is due `interval` after
    /// the last thing sent (or, while a canary is awaited, when it is
    /// overdue, if that is later).
    pub fn set_keepalive_interval(&mut self, interval: Duration) {
        self.config.keepalive_interval = interval;
    }

    /// Asks for channel ids for `names`; the answer is a
    /// [`DeviceEvent::Registered`] with the returned request id.
    pub fn register(&mut self, now: Instant, names: Vec<String>) -> u64 {
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        self.send(now, Body::Register(Register { request_id, names }));
        request_id
    }

    /// Stops wakes on these channels.
    pub fn unregister(&mut self, now: Instant, channel_ids: Vec<String>) {
        self.send(now, Body::Unregister(Unregister { channel_ids }));
    }

    /// Acknowledges an event after the app has handled it.
    pub fn ack(&mut self, now: Instant, event_id: String) {
        self.send(now, Body::Ack(Ack { event_id }));
    }

    /// Sends a Ping now (unless one is outstanding).
    pub fn ping(&mut self, now: Instant) {
        if self.ping_out.is_some() || !self.is_established() {
            return;
        }
        let nonce = self.next_nonce;
        self.next_nonce += 1;
        self.ping_out = Some((nonce, now));
        self.ping_idle = now.saturating_duration_since(self.last_send);
        // The canary comes after the keepalive interval of silence: it is
        // the keepalive (the device answers it at once). The device's own
        // Ping waits one margin longer, for a canary that does not come.
        let interval = self.config.keepalive_interval;
        self.canary_wait = (self.config.canary
            && self.relay_canary
            && interval >= crate::relay_session::MIN_CANARY_AFTER)
            .then(|| CanaryWait {
                nonce,
                after: interval,
                margin: canary_margin(interval, self.rtt),
            });
        let canary_after_ms = self.canary_wait.map_or(0, |c| millis(c.after));
        self.send(
            now,
            Body::Ping(Ping {
                nonce,
                canary_after_ms,
            }),
        );
    }

    /// Whether the relay sends canaries on this session.
    pub fn relay_sends_canaries(&self) -> bool {
        self.relay_canary
    }

    /// Feeds bytes read from the control stream.
    pub fn handle_data(&mut self, now: Instant, data: &[u8]) {
        if self.core.is_closed() {
            return;
        }
        self.core.decoder.extend(data);
        while !self.core.is_closed() {
            match self.core.decoder.next_frame() {
                Ok(Some(body)) => self.handle_frame(now, body),
                Ok(None) => break,
                Err(e) => self.violation(&e),
            }
        }
    }

    /// The relay finished its side of the control stream.
    pub fn handle_stream_finished(&mut self) {
        if self.core.decoder.buffered() > 0 {
            self.core.fail(
                ErrorCode::ProtocolViolation,
                "bad frame: control stream ended inside a frame",
            );
        } else {
            self.core
                .fail(ErrorCode::NoError, "relay closed the control stream");
        }
    }

    /// Timer expiry: Welcome timeout, keepalive due, Pong overdue.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.core.is_closed() {
            return;
        }
        match self.state {
            State::AwaitWelcome { deadline } if now >= deadline => {
                self.core
                    .fail(ErrorCode::HelloTimeout, "no Welcome from the relay in time");
            }
            State::AwaitWelcome { .. } => {}
            State::Established => match self.ping_out {
                Some((_, sent)) if now >= sent + self.config.keepalive_timeout => {
                    self.core.fail(
                        ErrorCode::KeepaliveTimeout,
                        "relay did not answer a keepalive in time",
                    );
                }
                Some(_) => {}
                None if now >= self.next_keepalive() => {
                    if let Some(c) = self.canary_wait.take() {
                        // The relay times the canary from the device's last
                        // frame: it had its chance if the device stayed
                        // silent for its silence and the margin.
                        if now >= self.last_send + c.after + c.margin {
                            self.core.push_event(DeviceEvent::CanaryMissed {
                                after_idle: c.after,
                            });
                        }
                    }
                    self.ping(now)
                }
                None => {}
            },
        }
    }

    /// When [`DeviceSession::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.core.is_closed() {
            return None;
        }
        match self.state {
            State::AwaitWelcome { deadline } => Some(deadline),
            State::Established => Some(match self.ping_out {
                Some((_, sent)) => sent + self.config.keepalive_timeout,
                None => self.next_keepalive(),
            }),
        }
    }

    /// Bytes to write on the control stream.
    pub fn poll_transmit(&mut self) -> Option<bytes::Bytes> {
        self.core.poll_transmit()
    }

    /// Next event for the driver.
    pub fn poll_event(&mut self) -> Option<DeviceEvent> {
        self.core.poll_event()
    }

    /// The close to perform, yielded once.
    pub fn poll_close(&mut self) -> Option<Close> {
        self.core.poll_close()
    }

    /// When the device pings on its own: the interval after its last
    /// frame, plus the margin while a canary is awaited.
    fn next_keepalive(&self) -> Instant {
        let interval = self.config.keepalive_interval;
        let wait = match self.canary_wait {
            // A shorter interval set since: ping at it (the canary has
            // not had its chance, so no loss is judged).
            Some(c) if interval < c.after => interval,
            Some(c) => c.after + c.margin,
            None => interval,
        };
        self.last_send + wait
    }

    fn send(&mut self, now: Instant, body: Body) {
        self.last_send = now;
        self.core.send(body);
    }

    fn violation(&mut self, e: &DecodeError) {
        self.core
            .fail(ErrorCode::ProtocolViolation, decode_reason(e));
    }

    fn handle_frame(&mut self, now: Instant, body: Body) {
        let silence = now.saturating_duration_since(self.last_send.max(self.last_recv));
        self.last_recv = now;
        match (self.state, body) {
            (State::AwaitWelcome { .. }, Body::Welcome(w)) => {
                let limits = w.limits.unwrap_or_default();
                let relay_canary = limits.canary;
                if limits.max_payload_size > 0 {
                    self.max_payload = limits.max_payload_size as usize;
                }
                self.state = State::Established;
                self.relay_canary = relay_canary;
                self.last_send = now;
                self.core.push_event(DeviceEvent::Welcome {
                    session_id: w.session_id,
                    device_id: w.device_id,
                    limits,
                    server_time_ms: w.server_time_ms,
                });
                if self.config.canary && self.relay_canary {
                    // While the radio is up from the handshake: the first
                    // round trip, the observed address, and the canary that
                    // covers the first silence.
                    self.ping(now);
                }
            }
            // The relay closes a TCP connection: its code says why, as
            // QUIC's CONNECTION_CLOSE would.
            (_, Body::Close(c)) => self.core.fail(
                ErrorCode::from_u32(c.code).unwrap_or(ErrorCode::Internal),
                crate::relay_session::truncate_reason(c.reason),
            ),
            (_, Body::GoAway(g)) => self.core.push_event(DeviceEvent::GoAway {
                reason: GoAwayReason::try_from(g.reason).unwrap_or(GoAwayReason::Unspecified),
                reconnect_after: Duration::from_millis(g.reconnect_after_ms),
                message: g.message,
                alternatives: g.alternatives,
            }),
            (State::Established, Body::Registered(r)) => {
                let result = if r.error_code == 0 {
                    Ok(r.channels)
                } else {
                    Err(RegisterRefused {
                        code: r.error_code,
                        message: r.error_message,
                    })
                };
                self.core.push_event(DeviceEvent::Registered {
                    request_id: r.request_id,
                    result,
                });
            }
            (State::Established, Body::Wake(w)) => {
                if w.payload.len() > self.max_payload {
                    self.core.fail(
                        ErrorCode::ProtocolViolation,
                        format!(
                            "wake payload of {} bytes exceeds {}",
                            w.payload.len(),
                            self.max_payload
                        ),
                    );
                } else {
                    self.core.push_event(DeviceEvent::Wake(w));
                }
            }
            (State::Established, Body::Pong(p)) => match self.ping_out {
                Some((nonce, sent)) if nonce == p.nonce => {
                    self.ping_out = None;
                    self.rtt = now.saturating_duration_since(sent);
                    self.core.push_event(DeviceEvent::KeepaliveCompleted {
                        rtt: now.saturating_duration_since(sent),
                        observed_addr: p.observed_addr,
                        idle: self.ping_idle,
                    });
                }
                // A late or unsolicited Pong is harmless.
                _ => {}
            },
            (State::Established, Body::Canary(c)) => {
                // A late canary (after the keepalive it was to precede) or
                // one for another Ping proves nothing.
                if self.canary_wait.is_some_and(|w| w.nonce == c.nonce) {
                    self.canary_wait = None;
                    self.core
                        .push_event(DeviceEvent::CanaryReceived { idle: silence });
                    // Answer in the same radio wake: this Ping is the
                    // keepalive.
                    self.ping(now);
                }
            }
            (state, other) => self.core.fail(
                ErrorCode::ProtocolViolation,
                format!(
                    "unexpected {} from the relay{}",
                    frame_name(&other),
                    if matches!(state, State::AwaitWelcome { .. }) {
                        " before Welcome"
                    } else {
                        ""
                    }
                ),
            ),
        }
    }
}
