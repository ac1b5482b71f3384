//! The SDK's public value types: channel ids, wake events, priorities,
//! statuses, what a connection negotiated, keepalive policies.

use std::net::SocketAddr;
use std::time::Duration;

use crate::error::ConnectError;
use crate::tls::CipherSuite;
use crate::tuner::IntervalReason;

/// A channel id: stable for one device and channel name, unguessable.
/// Hand it to your app server; it publishes to it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelId(String);

impl ChannelId {
    /// Wraps an id the relay handed out (22 base64url characters).
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id as an owned string.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl std::fmt::Display for ChannelId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for ChannelId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// How urgently a publisher wanted an event delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Priority {
    /// The relay may hold it to share a radio wake with other traffic.
    Normal,
    /// Delivered at once.
    High,
}

impl Priority {
    /// From the wire value (unknown values are treated as high).
    pub(crate) fn from_wire(v: i32) -> Self {
        if v == wakewire_proto::pb::device::Priority::Normal as i32 {
            Priority::Normal
        } else {
            Priority::High
        }
    }
}

/// A wake event for one of the app's channels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WakeEvent {
    /// Unique event id.
    pub event_id: String,
    /// Channel id.
    pub channel_id: ChannelId,
    /// Channel name, as registered.
    pub channel: String,
    /// Publisher's payload (at most 4 KiB).
    pub payload: Vec<u8>,
    /// Priority.
    pub priority: Priority,
    /// When the relay accepted it, Unix ms.
    pub created_at_ms: u64,
    /// Time to live from `created_at_ms`, seconds.
    pub ttl_s: u32,
}

/// Connection state changes, in the spirit of ControlChannelTrigger's
/// status and reset triggers.
#[derive(Debug, Clone)]
pub enum Status {
    /// A connection attempt is starting.
    Connecting {
        /// 1 for the first attempt after a loss.
        attempt: u32,
    },
    /// Connected and authenticated.
    Connected(ConnectionInfo),
    /// The connection is gone; `retry_in` is the backoff before the next
    /// attempt, `None` when the SDK has given up (the error is not retryable
    /// or the client was closed).
    Disconnected {
        /// What happened.
        error: ConnectError,
        /// Delay before the next attempt.
        retry_in: Option<Duration>,
    },
    /// The channels were registered again on a new connection (their ids
    /// are unchanged); events queued meanwhile follow.
    Reset {
        /// Channel names re-registered.
        channels: Vec<String>,
    },
    /// A keepalive round trip completed.
    KeepaliveCompleted {
        /// Round-trip time of the Ping.
        rtt: Duration,
        /// The device's address and port as the relay saw them.
        observed_addr: String,
    },
    /// The adaptive keepalive changed the interval (ControlChannelTrigger's
    /// CurrentKeepAliveIntervalInMinutes).
    KeepaliveInterval {
        /// New interval.
        interval: Duration,
        /// Why.
        reason: IntervalReason,
    },
    /// The adaptive keepalive finished learning this network.
    KeepaliveConverged {
        /// Network id.
        network: String,
        /// Interval in use.
        interval: Duration,
        /// NAT timeout bounds learned.
        learned: crate::tuner::Learned,
    },
    /// The NAT had dropped the connection's binding (seen after `after_idle`
    /// of silence); QUIC moved to the new one, nothing was lost.
    BindingLost {
        /// Silence after which it was gone.
        after_idle: Duration,
    },
}

/// What a connection actually negotiated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// Transport ("QUIC v1").
    pub transport: &'static str,
    /// TLS version ("TLSv1.3").
    pub tls_version: &'static str,
    /// Negotiated cipher suite.
    pub cipher_suite: CipherSuite,
    /// Negotiated ALPN.
    pub alpn: String,
    /// Relay address connected to.
    pub relay_addr: SocketAddr,
    /// Local socket address.
    pub local_addr: Option<SocketAddr>,
    /// Relay's session id.
    pub session_id: String,
    /// Device id the relay authenticated.
    pub device_id: String,
    /// Keepalive interval in use.
    pub keepalive_interval: Duration,
    /// Whether the Hello went out in 0-RTT (a resumed reconnect).
    pub zero_rtt: bool,
}

/// How the SDK keeps the network path alive.
#[derive(Debug, Clone, PartialEq)]
pub enum KeepalivePolicy {
    /// A Ping after this long without sending anything.
    Fixed(Duration),
    /// Learn the NAT's binding timeout on each network and keep alive just
    /// below it (see [`crate::tuner`]).
    Adaptive(crate::tuner::TunerConfig),
}

impl Default for KeepalivePolicy {
    fn default() -> Self {
        KeepalivePolicy::Fixed(Duration::from_secs(25))
    }
}
