//! The relay's end of one device connection, as a sans-IO state machine.
//!
//! States: `AwaitHello` (until the first frame or the hello timeout) ->
//! `Authenticating` (the driver checks the credential and calls
//! [`RelaySession::accept`] or [`RelaySession::reject`]) -> `Established`
//! (register, wake/ack, ping/pong) -> closed. Anything the protocol forbids
//! closes the session with [`ErrorCode::ProtocolViolation`] and a reason.
//!
//! Driver loop: feed stream bytes to [`RelaySession::handle_data`], timer
//! expiry to [`RelaySession::handle_timeout`]; then write
//! [`RelaySession::poll_transmit`], act on [`RelaySession::poll_event`],
//! arm a timer for [`RelaySession::poll_timeout`], and once
//! [`RelaySession::poll_close`] yields, close the connection with its code
//! after writing what was transmitted.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::codec::DecodeError;
use crate::names::validate_channel_name;
use crate::pb::device::{
    frame::Body, Canary, ChannelBinding, GoAway, GoAwayReason, Pong, Registered, ServerLimits,
    Wake, Welcome,
};
pub use crate::session_core::Close;
use crate::session_core::{millis, Core, WallClock};
use crate::{ErrorCode, MAX_FRAME_SIZE, MAX_PAYLOAD_SIZE, PROTOCOL_VERSION};

/// `Registered.error_code`: a requested name is invalid.
pub const REGISTER_ERROR_INVALID_NAME: u32 = 1;
/// `Registered.error_code`: the device would exceed its channel limit.
pub const REGISTER_ERROR_TOO_MANY_CHANNELS: u32 = 2;
/// `Registered.error_code`: too many new channels too fast; retry later.
pub const REGISTER_ERROR_RATE_LIMITED: u32 = 3;

/// Shortest silence a canary may be asked for.
pub const MIN_CANARY_AFTER: Duration = Duration::from_secs(1);

/// Limits and timers of relay sessions.
#[derive(Debug, Clone)]
pub struct RelaySessionConfig {
    /// Largest frame accepted or sent.
    pub max_frame_size: usize,
    /// Largest wake payload.
    pub max_payload_size: usize,
    /// Most channels per device.
    pub max_channels: usize,
    /// How long a new connection may take to send Hello.
    pub hello_timeout: Duration,
    /// Connection idle timeout, announced to the device in Welcome.
    pub idle_timeout: Duration,
    /// UDP port of the probe service announced in Welcome (0 = none).
    pub probe_port: u16,
    /// New channel names a connection may register at once (names already
    /// registered on it are free).
    pub register_burst: u32,
    /// New channel names per minute a connection may register after its
    /// burst.
    pub register_per_minute: u32,
    /// Send Canary frames when a Ping asks for them (announced in Welcome).
    pub canary: bool,
}

impl Default for RelaySessionConfig {
    fn default() -> Self {
        Self {
            max_frame_size: MAX_FRAME_SIZE,
            max_payload_size: MAX_PAYLOAD_SIZE,
            max_channels: 64,
            hello_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(660),
            probe_port: 0,
            register_burst: 128,
            register_per_minute: 60,
            canary: true,
        }
    }
}

/// Something the driver must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayEvent {
    /// The device said Hello: verify `credential`, then call
    /// [`RelaySession::accept`] or [`RelaySession::reject`].
    Hello {
        /// Device credential (token).
        credential: String,
        /// SDK description, for logs.
        sdk: String,
    },
    /// The device asks for channel ids for these (valid, distinct) names,
    /// none of them registered on this session yet: answer with
    /// [`RelaySession::registered`] (or [`RelaySession::refuse_register`]).
    Register {
        /// Echo in the answer.
        request_id: u64,
        /// Channel names.
        names: Vec<String>,
    },
    /// The device no longer wants these channels (only ids registered on
    /// this session are listed).
    Unregister {
        /// Channel ids.
        channel_ids: Vec<String>,
    },
    /// The device has handed an event to its app.
    Ack {
        /// Event id.
        event_id: String,
    },
    /// The device sent a keepalive ping (already answered).
    Ping,
    /// A canary went out: it wakes the device's radio, so what waits for
    /// the radio may go with it.
    CanarySent,
}

/// Why a wake could not be queued on this session.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SendWakeError {
    /// The session is not (or no longer) established.
    #[error("device session is not established")]
    NotEstablished,
    /// The channel is not registered on this session.
    #[error("channel {0} is not registered on this connection")]
    UnknownChannel(String),
    /// Payload above the limit.
    #[error("payload of {len} bytes exceeds the maximum of {max}")]
    PayloadTooLarge {
        /// Payload length.
        len: usize,
        /// Limit.
        max: usize,
    },
}

#[derive(Debug)]
enum State {
    AwaitHello { deadline: Instant },
    Authenticating,
    Established { device_id: String },
}

/// Relay side of one device connection.
#[derive(Debug)]
pub struct RelaySession {
    core: Core<RelayEvent>,
    state: State,
    config: RelaySessionConfig,
    clock: WallClock,
    observed_addr: String,
    /// Names requested so far (counted against the limit at request time).
    names: HashSet<String>,
    /// Registered channel id -> name.
    channels: HashMap<String, String>,
    /// Name -> channel id, for names registered on this session.
    by_name: HashMap<String, String>,
    /// Register requests waiting for the driver: request id -> every name
    /// asked for, in order (known ones are answered from `by_name`).
    waiting: HashMap<u64, Vec<String>>,
    /// Token bucket of new names (milli-names, refilled with time).
    register_budget: u64,
    budget_at: Instant,
    /// The canary the device asked for: silence that triggers it, nonce of
    /// the Ping that asked, and when it is due.
    canary: Option<CanaryTimer>,
}

#[derive(Debug, Clone, Copy)]
struct CanaryTimer {
    after: Duration,
    nonce: u64,
    due: Instant,
}

impl RelaySession {
    /// A new session at `now`; `unix_ms` is the wall clock at `now`.
    pub fn new(now: Instant, unix_ms: u64, config: RelaySessionConfig) -> Self {
        let register_budget = u64::from(config.register_burst) * 1000;
        Self {
            core: Core::new(config.max_frame_size),
            state: State::AwaitHello {
                deadline: now + config.hello_timeout,
            },
            clock: WallClock::new(now, unix_ms),
            config,
            observed_addr: String::new(),
            names: HashSet::new(),
            channels: HashMap::new(),
            by_name: HashMap::new(),
            waiting: HashMap::new(),
            register_budget,
            budget_at: now,
            canary: None,
        }
    }

    /// Records the device's address as the relay sees it (echoed in Pong).
    pub fn set_observed_addr(&mut self, addr: SocketAddr) {
        self.observed_addr = addr.to_string();
    }

    /// The authenticated device id, once established.
    pub fn device_id(&self) -> Option<&str> {
        match &self.state {
            State::Established { device_id } => Some(device_id),
            _ => None,
        }
    }

    /// Whether `channel_id` is registered on this session.
    pub fn has_channel(&self, channel_id: &str) -> bool {
        self.channels.contains_key(channel_id)
    }

    /// Channel ids registered on this session.
    pub fn channel_ids(&self) -> impl Iterator<Item = &str> {
        self.channels.keys().map(String::as_str)
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
                Err(e) => self.violation(decode_reason(&e)),
            }
        }
    }

    /// The peer finished its side of the control stream.
    pub fn handle_stream_finished(&mut self) {
        if self.core.decoder.buffered() > 0 {
            self.core.fail(
                ErrorCode::ProtocolViolation,
                "bad frame: control stream ended inside a frame",
            );
        } else {
            self.core
                .fail(ErrorCode::NoError, "device closed the control stream");
        }
    }

    /// Timer expiry.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let State::AwaitHello { deadline } = self.state {
            if now >= deadline {
                self.core
                    .fail(ErrorCode::HelloTimeout, "no Hello within the hello timeout");
            }
        }
        if let Some(c) = self.canary {
            if now >= c.due && !self.core.is_closed() && self.device_id().is_some() {
                // One canary per Ping: the device answers it with a Ping
                // that asks for the next one.
                self.canary = None;
                self.core.send(Body::Canary(Canary { nonce: c.nonce }));
                self.core.push_event(RelayEvent::CanarySent);
            }
        }
    }

    /// Accepts the Hello: the credential names `device_id`.
    pub fn accept(&mut self, now: Instant, device_id: String, session_id: String) {
        if !matches!(self.state, State::Authenticating) || self.core.is_closed() {
            return;
        }
        self.core.send(Body::Welcome(Welcome {
            session_id,
            limits: Some(ServerLimits {
                max_frame_size: self.config.max_frame_size as u32,
                max_payload_size: self.config.max_payload_size as u32,
                max_channels: self.config.max_channels as u32,
                idle_timeout_ms: millis(self.config.idle_timeout),
                probe_port: u32::from(self.config.probe_port),
                canary: self.config.canary,
            }),
            server_time_ms: self.clock.unix_ms(now),
            device_id: device_id.clone(),
        }));
        self.state = State::Established { device_id };
    }

    /// Refuses the session (bad credential, unsupported version...).
    pub fn reject(&mut self, code: ErrorCode, reason: impl Into<String>) {
        self.core.fail(code, reason);
    }

    /// Answers a [`RelayEvent::Register`] with one channel id per name it
    /// listed, in order; names of the request already registered on this
    /// session are added from the session's own table.
    pub fn registered(&mut self, request_id: u64, bindings: Vec<(String, String)>) {
        for (name, channel_id) in bindings {
            self.channels.insert(channel_id.clone(), name.clone());
            self.by_name.insert(name, channel_id);
        }
        let names = self.waiting.remove(&request_id).unwrap_or_default();
        let channels = names
            .into_iter()
            .filter_map(|name| {
                let channel_id = self.by_name.get(&name)?.clone();
                Some(ChannelBinding { name, channel_id })
            })
            .collect();
        self.core.send(Body::Registered(Registered {
            request_id,
            channels,
            error_code: 0,
            error_message: String::new(),
        }));
    }

    /// Refuses a [`RelayEvent::Register`] (e.g. the device's channel limit
    /// across its connections); nothing of it is registered.
    pub fn refuse_register(&mut self, request_id: u64, code: u32, message: String) {
        if let Some(names) = self.waiting.remove(&request_id) {
            for n in names {
                if !self.by_name.contains_key(&n) {
                    self.names.remove(&n);
                }
            }
        }
        self.core.send(Body::Registered(Registered {
            request_id,
            channels: vec![],
            error_code: code,
            error_message: message,
        }));
    }

    /// Queues a wake event for the device.
    pub fn send_wake(&mut self, wake: Wake) -> Result<(), SendWakeError> {
        if self.core.is_closed() || self.device_id().is_none() {
            return Err(SendWakeError::NotEstablished);
        }
        if wake.payload.len() > self.config.max_payload_size {
            return Err(SendWakeError::PayloadTooLarge {
                len: wake.payload.len(),
                max: self.config.max_payload_size,
            });
        }
        if !self.channels.contains_key(&wake.channel_id) {
            return Err(SendWakeError::UnknownChannel(wake.channel_id));
        }
        self.core.send(Body::Wake(wake));
        Ok(())
    }

    /// Asks the device to leave, then closes with [`ErrorCode::GoingAway`]
    /// (or [`ErrorCode::Replaced`] for [`GoAwayReason::Replaced`]).
    pub fn go_away(&mut self, reason: GoAwayReason, reconnect_after: Duration, message: &str) {
        self.go_away_to(reason, reconnect_after, message, Vec::new());
    }

    /// [`RelaySession::go_away`], naming other relays of the cluster the
    /// device may connect to instead.
    pub fn go_away_to(
        &mut self,
        reason: GoAwayReason,
        reconnect_after: Duration,
        message: &str,
        alternatives: Vec<String>,
    ) {
        if self.device_id().is_some() {
            self.core.send(Body::GoAway(GoAway {
                reason: reason as i32,
                reconnect_after_ms: millis(reconnect_after),
                message: message.to_owned(),
                alternatives,
            }));
        }
        let code = match reason {
            GoAwayReason::Replaced => ErrorCode::Replaced,
            _ => ErrorCode::GoingAway,
        };
        self.core.fail(code, message);
    }

    /// Bytes to write on the control stream.
    pub fn poll_transmit(&mut self) -> Option<bytes::Bytes> {
        self.core.poll_transmit()
    }

    /// Next event for the driver.
    pub fn poll_event(&mut self) -> Option<RelayEvent> {
        self.core.poll_event()
    }

    /// When [`RelaySession::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.core.is_closed() {
            return None;
        }
        match self.state {
            State::AwaitHello { deadline } => Some(deadline),
            State::Established { .. } => self.canary.map(|c| c.due),
            State::Authenticating => None,
        }
    }

    /// The close to perform, yielded once.
    pub fn poll_close(&mut self) -> Option<Close> {
        self.core.poll_close()
    }

    /// Whether the session has ended (its close may not be polled yet).
    pub fn is_closed(&self) -> bool {
        self.core.is_closed()
    }

    fn violation(&mut self, reason: impl Into<String>) {
        self.core.fail(ErrorCode::ProtocolViolation, reason);
    }

    fn handle_frame(&mut self, now: Instant, body: Body) {
        // The canary measures silence from the device: anything it sends
        // starts the wait again.
        if let Some(c) = &mut self.canary {
            c.due = now + c.after;
        }
        match (&self.state, body) {
            (State::AwaitHello { .. }, Body::Hello(h)) => {
                if h.protocol_version != PROTOCOL_VERSION {
                    self.core.fail(
                        ErrorCode::UnsupportedVersion,
                        format!(
                            "protocol version {} is not supported; this relay speaks {PROTOCOL_VERSION}",
                            h.protocol_version
                        ),
                    );
                    return;
                }
                self.state = State::Authenticating;
                self.core.push_event(RelayEvent::Hello {
                    credential: h.credential,
                    sdk: h.sdk,
                });
            }
            (State::AwaitHello { .. }, other) => {
                self.violation(format!("expected Hello, got {}", frame_name(&other)))
            }
            (State::Authenticating, other) => {
                self.violation(format!("{} before Welcome", frame_name(&other)))
            }
            (State::Established { .. }, Body::Register(r)) => {
                self.handle_register(now, r.request_id, r.names)
            }
            (State::Established { .. }, Body::Unregister(u)) => {
                let channel_ids: Vec<String> = u
                    .channel_ids
                    .into_iter()
                    .filter(|id| match self.channels.remove(id) {
                        Some(name) => {
                            self.names.remove(&name);
                            self.by_name.remove(&name);
                            true
                        }
                        None => false,
                    })
                    .collect();
                if !channel_ids.is_empty() {
                    self.core.push_event(RelayEvent::Unregister { channel_ids });
                }
            }
            (State::Established { .. }, Body::Ack(a)) => self.core.push_event(RelayEvent::Ack {
                event_id: a.event_id,
            }),
            (State::Established { .. }, Body::Ping(p)) => {
                self.canary = (self.config.canary && p.canary_after_ms > 0).then(|| {
                    let after = Duration::from_millis(p.canary_after_ms)
                        .clamp(MIN_CANARY_AFTER, self.config.idle_timeout);
                    CanaryTimer {
                        after,
                        nonce: p.nonce,
                        due: now + after,
                    }
                });
                self.core.send(Body::Pong(Pong {
                    nonce: p.nonce,
                    observed_addr: self.observed_addr.clone(),
                    server_time_ms: self.clock.unix_ms(now),
                }));
                self.core.push_event(RelayEvent::Ping);
            }
            // The device closes a TCP connection: nothing more to do.
            (_, Body::Close(c)) => self.core.fail(
                ErrorCode::from_u32(c.code).unwrap_or(ErrorCode::NoError),
                truncate_reason(c.reason),
            ),
            (State::Established { .. }, other) => {
                self.violation(format!("unexpected {} from a device", frame_name(&other)))
            }
        }
    }

    fn handle_register(&mut self, now: Instant, request_id: u64, names: Vec<String>) {
        let refuse = |this: &mut Self, code: u32, msg: String| {
            this.core.send(Body::Registered(Registered {
                request_id,
                channels: vec![],
                error_code: code,
                error_message: msg,
            }))
        };
        if self.waiting.contains_key(&request_id) {
            return self.violation(format!(
                "Register request id {request_id} is already pending"
            ));
        }
        if let Some(err) = names.iter().find_map(|n| validate_channel_name(n).err()) {
            return refuse(self, REGISTER_ERROR_INVALID_NAME, err.to_string());
        }
        let mut unique: Vec<String> = Vec::with_capacity(names.len());
        for n in names {
            if !unique.contains(&n) {
                unique.push(n);
            }
        }
        let new: Vec<String> = unique
            .iter()
            .filter(|n| !self.names.contains(*n))
            .cloned()
            .collect();
        if self.names.len() + new.len() > self.config.max_channels {
            return refuse(
                self,
                REGISTER_ERROR_TOO_MANY_CHANNELS,
                format!(
                    "registering {} more channels would exceed the limit of {} per device",
                    new.len(),
                    self.config.max_channels
                ),
            );
        }
        // Only names new to this session cost anything (a channel id
        // derivation and a store write): they are rate-limited.
        let cost = new.len() as u64 * 1000;
        self.refill_budget(now);
        if cost > self.register_budget {
            return refuse(
                self,
                REGISTER_ERROR_RATE_LIMITED,
                format!(
                    "too many new channels: {} at once, then {} per minute; retry later",
                    self.config.register_burst, self.config.register_per_minute
                ),
            );
        }
        self.register_budget -= cost;
        self.names.extend(new.iter().cloned());
        // The driver only sees names without a channel id on this session.
        let unknown: Vec<String> = unique
            .iter()
            .filter(|n| !self.by_name.contains_key(*n))
            .cloned()
            .collect();
        self.waiting.insert(request_id, unique);
        if unknown.is_empty() {
            return self.registered(request_id, vec![]);
        }
        self.core.push_event(RelayEvent::Register {
            request_id,
            names: unknown,
        });
    }

    fn refill_budget(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.budget_at);
        let earned = u64::try_from(elapsed.as_millis())
            .unwrap_or(u64::MAX)
            .saturating_mul(u64::from(self.config.register_per_minute))
            / 60;
        let cap = u64::from(self.config.register_burst) * 1000;
        self.register_budget = self.register_budget.saturating_add(earned).min(cap);
        self.budget_at = now;
    }
}

pub(crate) fn decode_reason(e: &DecodeError) -> String {
    format!("bad frame: {e}")
}

pub(crate) fn frame_name(b: &Body) -> &'static str {
    match b {
        Body::Hello(_) => "Hello",
        Body::Welcome(_) => "Welcome",
        Body::Register(_) => "Register",
        Body::Registered(_) => "Registered",
        Body::Unregister(_) => "Unregister",
        Body::Wake(_) => "Wake",
        Body::Ack(_) => "Ack",
        Body::Ping(_) => "Ping",
        Body::Pong(_) => "Pong",
        Body::GoAway(_) => "GoAway",
        Body::Close(_) => "Close",
        Body::Canary(_) => "Canary",
    }
}

/// A peer's close reason, at most 256 bytes (it ends up in logs).
pub(crate) fn truncate_reason(mut reason: String) -> String {
    if reason.len() > 256 {
        let mut end = 256;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    reason
}
