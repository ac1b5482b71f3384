//! Metric names of the relay, in one place. Exported in Prometheus format
//! when `metrics_listen` is set.

/// Gauge: device connections currently open.
pub const CONNECTIONS: &str = "wakewire_relay_connections";
/// Counter: QUIC handshakes completed.
pub const HANDSHAKES: &str = "wakewire_relay_handshakes_total";
/// Counter: QUIC handshakes that failed.
pub const HANDSHAKE_FAILURES: &str = "wakewire_relay_handshake_failures_total";
/// Counter: device sessions refused for a bad credential.
pub const AUTH_FAILURES: &str = "wakewire_relay_auth_failures_total";
/// Counter: connections closed by the relay, label `code`.
pub const CLOSES: &str = "wakewire_relay_closes_total";
/// Counter: publishes, label `status` (delivered, sent_unacked,
/// not_connected, or the gRPC error code).
pub const PUBLISHES: &str = "wakewire_relay_publishes_total";
/// Histogram: publish handling time in seconds (includes the ack wait).
pub const PUBLISH_SECONDS: &str = "wakewire_relay_publish_seconds";
/// Counter: wake frames written to devices.
pub const WAKES_SENT: &str = "wakewire_relay_wakes_sent_total";
/// Counter: acks received from devices for wakes sent on their connection.
pub const ACKS: &str = "wakewire_relay_acks_total";
/// Counter: acks ignored because the event was not sent on that connection
/// (another device's event, a repeated or made-up id).
pub const IGNORED_ACKS: &str = "wakewire_relay_ignored_acks_total";
/// Counter: events delivered (acked by their device), counted as committed.
pub const DELIVERED: &str = "wakewire_relay_delivered_total";
/// Counter: failed accepts on the gRPC listener (retried).
pub const ACCEPT_ERRORS: &str = "wakewire_relay_grpc_accept_errors_total";
/// Counter: keepalive pings answered.
pub const KEEPALIVES: &str = "wakewire_relay_keepalives_total";
/// Counter: connection attempts refused by admission control, label `why`
/// (busy, prefix).
pub const REFUSED: &str = "wakewire_relay_refused_total";
/// Counter: events expired by their TTL, counted as committed.
pub const EXPIRED: &str = "wakewire_relay_expired_total";
/// Counter: events dropped, label `reason` (queue_full, collapsed,
/// channel_gone), counted as committed.
pub const DROPPED: &str = "wakewire_relay_dropped_total";
/// Counter: events stored for later delivery.
pub const QUEUED: &str = "wakewire_relay_queued_total";
/// Counter: binding-lifetime probes, label `result` (accepted, malformed, over_limit).
pub const PROBES: &str = "wakewire_relay_probes_total";
/// Counter: Register requests refused, label `reason` (too_many_channels).
pub const REGISTER_REFUSED: &str = "wakewire_relay_register_refused_total";
/// Counter: publisher requests refused by a limit, label `limit`
/// (in_flight, rate, stored_bytes, watchers, connections).
pub const THROTTLED: &str = "wakewire_relay_throttled_total";
/// Counter: device handshakes answered with a QUIC Retry.
pub const RETRIES: &str = "wakewire_relay_retries_total";
/// Counter: device connections closed because their token was revoked.
pub const REVOKED: &str = "wakewire_relay_revoked_total";
/// Counter: TLS handshakes on the publisher port that failed or timed out.
pub const GRPC_TLS_FAILURES: &str = "wakewire_relay_grpc_tls_failures_total";
