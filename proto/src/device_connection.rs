//! Everything a device decides across its connections, as a sans-IO state
//! machine: the current [`DeviceSession`] (if connected), the channel
//! table, re-registration after a reconnect, and duplicate suppression.
//!
//! - Channels live here, not in a session: after a reconnect every channel
//!   is registered again in one request (ids are stable), and
//!   [`DeviceConnectionEvent::Reset`] tells the app.
//! - A wake is handed to the app once ([`DeviceConnectionEvent::Wake`]):
//!   one already handled (in the dedup window) is acked again without
//!   reaching the app; one the app is still working on is not handed out
//!   twice. The app reports [`DeviceConnection::handled`] (then the ack goes
//!   out) or [`DeviceConnection::abandoned`] (no ack: the relay sends it
//!   again on a later connection).
//!
//! Inputs take the time (`handle_*(now, ..)`); outputs are polled. No
//! socket, runtime or clock.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use crate::device_session::{
    Close, DeviceEvent, DeviceSession, DeviceSessionConfig, RegisterRefused,
};
use crate::pb::device::{GoAwayReason, ServerLimits, Wake};

/// Default number of handled event ids remembered.
pub const DEFAULT_DEDUP_WINDOW: usize = 4096;

/// Something the driver (the SDK) must act on.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceConnectionEvent {
    /// The relay accepted the device on the current connection.
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
    /// A channel has its id (first registration, or confirmed again).
    Registered {
        /// Channel name.
        name: String,
        /// Its id.
        channel_id: String,
    },
    /// The relay refused to register these channels; channels that never
    /// had an id are forgotten.
    RegisterRefused {
        /// Channel names of the request.
        names: Vec<String>,
        /// The relay's answer.
        refused: RegisterRefused,
    },
    /// Every channel was registered again on a new connection.
    Reset {
        /// Channel names.
        channels: Vec<String>,
    },
    /// A new wake for the app: hand it over, then call
    /// [`DeviceConnection::handled`] or [`DeviceConnection::abandoned`].
    Wake {
        /// Name of its channel.
        channel: String,
        /// The event.
        wake: Wake,
    },
    /// A wake for a channel this device does not have; not acked.
    UnknownChannel {
        /// The event.
        wake: Wake,
    },
    /// A keepalive round trip completed.
    KeepaliveCompleted {
        /// Ping to Pong time.
        rtt: Duration,
        /// The device's address as the relay saw it.
        observed_addr: String,
        /// How long the device had sent nothing before this Ping.
        idle: Duration,
    },
    /// The canary arrived: the NAT binding survived `idle` of silence.
    CanaryReceived {
        /// Silence before the canary.
        idle: Duration,
    },
    /// The canary did not arrive: the binding died within `after_idle`.
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

/// Why a channel cannot be added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddChannelError {
    /// A channel with this name is already registered by this client.
    AlreadyRegistered(String),
}

#[derive(Debug)]
struct Channel {
    id: Option<String>,
}

/// A bounded window of handled event ids.
#[derive(Debug)]
struct Window {
    order: VecDeque<String>,
    set: HashSet<String>,
    cap: usize,
}

impl Window {
    fn insert(&mut self, id: String) -> bool {
        if !self.set.insert(id.clone()) {
            return false;
        }
        self.order.push_back(id);
        while self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

/// The device's end, across reconnects.
#[derive(Debug)]
pub struct DeviceConnection {
    session: Option<DeviceSession>,
    channels: BTreeMap<String, Channel>,
    by_id: HashMap<String, String>,
    /// Register requests of the current session: request id -> names.
    requests: HashMap<u64, Vec<String>>,
    reregister: Option<u64>,
    seen: Window,
    /// Handed to the app and not yet reported back.
    with_app: HashSet<String>,
    events: VecDeque<DeviceConnectionEvent>,
}

impl DeviceConnection {
    /// A device with no connection yet, remembering `dedup_window` handled
    /// ids, starting with `handled` (e.g. loaded from disk, oldest first).
    pub fn new(dedup_window: usize, handled: impl IntoIterator<Item = String>) -> Self {
        let mut seen = Window {
            order: VecDeque::new(),
            set: HashSet::new(),
            cap: dedup_window.max(1),
        };
        for id in handled {
            seen.insert(id);
        }
        Self {
            session: None,
            channels: BTreeMap::new(),
            by_id: HashMap::new(),
            requests: HashMap::new(),
            reregister: None,
            seen,
            with_app: HashSet::new(),
            events: VecDeque::new(),
        }
    }

    /// Starts a session on a new connection (Hello is queued).
    pub fn connect(&mut self, now: Instant, config: DeviceSessionConfig) {
        self.session = Some(DeviceSession::new(now, config));
        self.requests.clear();
        self.reregister = None;
    }

    /// The connection is gone; channels and the dedup window stay.
    pub fn disconnected(&mut self) {
        self.session = None;
        self.requests.clear();
        self.reregister = None;
    }

    /// Whether a session is established.
    pub fn is_established(&self) -> bool {
        self.session.as_ref().is_some_and(|s| s.is_established())
    }

    /// The current session, if connected.
    pub fn session(&self) -> Option<&DeviceSession> {
        self.session.as_ref()
    }

    /// The current session, if connected (keepalive settings, pings).
    pub fn session_mut(&mut self) -> Option<&mut DeviceSession> {
        self.session.as_mut()
    }

    /// The id of channel `name`, once registered.
    pub fn channel_id(&self, name: &str) -> Option<&str> {
        self.channels.get(name).and_then(|c| c.id.as_deref())
    }

    /// The name of the channel with this id.
    pub fn channel_name(&self, channel_id: &str) -> Option<&str> {
        self.by_id.get(channel_id).map(String::as_str)
    }

    /// Handled event ids in the window, oldest first.
    pub fn handled_ids(&self) -> impl Iterator<Item = &str> {
        self.seen.order.iter().map(String::as_str)
    }

    /// Adds a channel; it is registered now if connected, else with the
    /// others on the next connection. The answer is a
    /// [`DeviceConnectionEvent::Registered`] or `RegisterRefused`.
    pub fn register(&mut self, now: Instant, name: String) -> Result<(), AddChannelError> {
        if self.channels.contains_key(&name) {
            return Err(AddChannelError::AlreadyRegistered(name));
        }
        self.channels.insert(name.clone(), Channel { id: None });
        if let Some(s) = self.session.as_mut().filter(|s| s.is_established()) {
            let request = s.register(now, vec![name.clone()]);
            self.requests.insert(request, vec![name]);
        }
        Ok(())
    }

    /// Removes a channel by id; returns its name if it was known.
    pub fn unregister(&mut self, now: Instant, channel_id: &str) -> Option<String> {
        let name = self.by_id.remove(channel_id)?;
        self.channels.remove(&name);
        if let Some(s) = self.session.as_mut().filter(|s| s.is_established()) {
            s.unregister(now, vec![channel_id.to_owned()]);
        }
        Some(name)
    }

    /// The app handled the event: remember it and ack it. Returns whether
    /// it is newly remembered (then a persisted window should record it
    /// before the ack is written).
    pub fn handled(&mut self, now: Instant, event_id: &str) -> bool {
        self.with_app.remove(event_id);
        let new = self.seen.insert(event_id.to_owned());
        if let Some(s) = self.session.as_mut().filter(|s| s.is_established()) {
            s.ack(now, event_id.to_owned());
        }
        new
    }

    /// The app gave up on the event (a callback panicked, a wake was
    /// dropped unacked): no ack; the relay sends it again later.
    pub fn abandoned(&mut self, event_id: &str) {
        self.with_app.remove(event_id);
    }

    /// Feeds bytes read from the control stream.
    pub fn handle_data(&mut self, now: Instant, data: &[u8]) {
        if let Some(s) = self.session.as_mut() {
            s.handle_data(now, data);
        }
        self.pump(now);
    }

    /// The relay finished its side of the control stream.
    pub fn handle_stream_finished(&mut self, now: Instant) {
        if let Some(s) = self.session.as_mut() {
            s.handle_stream_finished();
        }
        self.pump(now);
    }

    /// Timer expiry (Welcome timeout, keepalive, Pong overdue).
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(s) = self.session.as_mut() {
            s.handle_timeout(now);
        }
        self.pump(now);
    }

    /// Bytes to write on the control stream.
    pub fn poll_transmit(&mut self) -> Option<bytes::Bytes> {
        self.session.as_mut().and_then(|s| s.poll_transmit())
    }

    /// Next event for the driver.
    pub fn poll_event(&mut self) -> Option<DeviceConnectionEvent> {
        self.events.pop_front()
    }

    /// When [`DeviceConnection::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.session.as_ref().and_then(|s| s.poll_timeout())
    }

    /// The close to perform, yielded once per session.
    pub fn poll_close(&mut self) -> Option<Close> {
        self.session.as_mut().and_then(|s| s.poll_close())
    }

    fn pump(&mut self, now: Instant) {
        loop {
            let Some(ev) = self.session.as_mut().and_then(|s| s.poll_event()) else {
                return;
            };
            match ev {
                DeviceEvent::Welcome {
                    session_id,
                    device_id,
                    limits,
                    server_time_ms,
                } => {
                    self.events.push_back(DeviceConnectionEvent::Welcome {
                        session_id,
                        device_id,
                        limits,
                        server_time_ms,
                    });
                    let names: Vec<String> = self.channels.keys().cloned().collect();
                    if !names.is_empty() {
                        if let Some(s) = self.session.as_mut() {
                            let request = s.register(now, names.clone());
                            self.requests.insert(request, names);
                            self.reregister = Some(request);
                        }
                    }
                }
                DeviceEvent::Registered { request_id, result } => {
                    self.on_registered(request_id, result)
                }
                DeviceEvent::Wake(w) => self.on_wake(now, w),
                DeviceEvent::KeepaliveCompleted {
                    rtt,
                    observed_addr,
                    idle,
                } => self
                    .events
                    .push_back(DeviceConnectionEvent::KeepaliveCompleted {
                        rtt,
                        observed_addr,
                        idle,
                    }),
                DeviceEvent::CanaryReceived { idle } => self
                    .events
                    .push_back(DeviceConnectionEvent::CanaryReceived { idle }),
                DeviceEvent::CanaryMissed { after_idle } => self
                    .events
                    .push_back(DeviceConnectionEvent::CanaryMissed { after_idle }),
                DeviceEvent::GoAway {
                    reason,
                    reconnect_after,
                    message,
                    alternatives,
                } => self.events.push_back(DeviceConnectionEvent::GoAway {
                    reason,
                    reconnect_after,
                    message,
                    alternatives,
                }),
            }
        }
    }

    fn on_registered(
        &mut self,
        request_id: u64,
        result: Result<Vec<crate::pb::device::ChannelBinding>, RegisterRefused>,
    ) {
        let names = self.requests.remove(&request_id).unwrap_or_default();
        match result {
            Ok(bindings) => {
                for b in bindings {
                    let Some(ch) = self.channels.get_mut(&b.name) else {
                        // Unregistered while the request was on its way.
                        continue;
                    };
                    if let Some(old) = ch.id.take() {
                        self.by_id.remove(&old);
                    }
                    ch.id = Some(b.channel_id.clone());
                    self.by_id.insert(b.channel_id.clone(), b.name.clone());
                    self.events.push_back(DeviceConnectionEvent::Registered {
                        name: b.name,
                        channel_id: b.channel_id,
                    });
                }
                if self.reregister == Some(request_id) {
                    self.reregister = None;
                    self.events
                        .push_back(DeviceConnectionEvent::Reset { channels: names });
                }
            }
            Err(refused) => {
                for name in &names {
                    if self.channels.get(name).is_some_and(|c| c.id.is_none()) {
                        self.channels.remove(name);
                    }
                }
                self.events
                    .push_back(DeviceConnectionEvent::RegisterRefused { names, refused });
            }
        }
    }

    fn on_wake(&mut self, now: Instant, wake: Wake) {
        if self.seen.set.contains(&wake.event_id) {
            // Handled before (its ack was lost): ack again, do not repeat.
            if let Some(s) = self.session.as_mut() {
                s.ack(now, wake.event_id);
            }
            return;
        }
        if self.with_app.contains(&wake.event_id) {
            // Sent again while the app still has it: the ack follows.
            return;
        }
        let Some(name) = self.by_id.get(&wake.channel_id) else {
            self.events
                .push_back(DeviceConnectionEvent::UnknownChannel { wake });
            return;
        };
        self.with_app.insert(wake.event_id.clone());
        self.events.push_back(DeviceConnectionEvent::Wake {
            channel: name.clone(),
            wake,
        });
    }
}
