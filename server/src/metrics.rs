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
/// Histogram: seconds from a wake written to its device to the device's
/// ack (the radio round trip plus the app's callback).
pub const WAKE_TO_ACK_SECONDS: &str = "wakewire_relay_wake_to_ack_seconds";
/// Histogram: seconds one store commit (a group of operations, one fsync)
/// takes.
pub const STORE_COMMIT_SECONDS: &str = "wakewire_relay_store_commit_seconds";
/// Histogram: operations committed together (group commit size).
pub const STORE_BATCH_OPS: &str = "wakewire_relay_store_batch_ops";
/// Counter: TLS session tickets opened (a device resuming its session
/// without a certificate signature).
pub const TLS_TICKETS_OPENED: &str = "wakewire_relay_tls_tickets_opened_total";
/// Counter: store commits made durable with fsync (the others, of acks
/// only, reach the disk with the next of these).
pub const STORE_FSYNCS: &str = "wakewire_relay_store_fsyncs_total";
/// Gauge: events queued in the store (accepted, not yet finished).
pub const QUEUED_EVENTS: &str = "wakewire_relay_queued_events";
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
/// Histogram: cluster mode, seconds of one JetStream round trip, label
/// `op` (publish, receipt, delete, read, consumer).
pub const NATS_SECONDS: &str = "wakewire_relay_nats_request_seconds";
/// Counter: cluster mode, JetStream requests that failed, label `op`.
pub const NATS_ERRORS: &str = "wakewire_relay_nats_errors_total";
/// Gauge: cluster mode, 1 while connected to NATS.
pub const NATS_CONNECTED: &str = "wakewire_relay_nats_connected";
/// Gauge: cluster mode, messages in a cluster stream, label `stream`
/// (events: accepted and not yet finished, the cluster's backlog;
/// status: receipts kept).
pub const CLUSTER_STREAM_MESSAGES: &str = "wakewire_relay_cluster_stream_messages";

/// Kind of a metric, for its description and pre-registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Monotonic count.
    Counter,
    /// Current value.
    Gauge,
    /// Distribution (exported as a Prometheus histogram).
    Histogram,
}

/// Every metric the relay exports: name, kind, help text. docs/operations.md
/// lists the same, with labels; a test checks the dashboard and alerts use
/// only these.
pub const ALL: &[(&str, Kind, &str)] = &[
    (CONNECTIONS, Kind::Gauge, "device connections open"),
    (HANDSHAKES, Kind::Counter, "QUIC handshakes completed"),
    (
        HANDSHAKE_FAILURES,
        Kind::Counter,
        "QUIC handshakes failed or timed out",
    ),
    (
        AUTH_FAILURES,
        Kind::Counter,
        "device sessions refused for their credential",
    ),
    (
        CLOSES,
        Kind::Counter,
        "device connections closed by the relay, by close code",
    ),
    (PUBLISHES, Kind::Counter, "publishes, by result"),
    (
        PUBLISH_SECONDS,
        Kind::Histogram,
        "publish handling time, seconds (includes the ack wait)",
    ),
    (WAKES_SENT, Kind::Counter, "wake frames written to devices"),
    (
        ACKS,
        Kind::Counter,
        "acks for wakes sent on their connection",
    ),
    (
        IGNORED_ACKS,
        Kind::Counter,
        "acks for events not sent on that connection",
    ),
    (
        DELIVERED,
        Kind::Counter,
        "events delivered (acked), as committed",
    ),
    (
        ACCEPT_ERRORS,
        Kind::Counter,
        "failed accepts on the gRPC listener",
    ),
    (KEEPALIVES, Kind::Counter, "device keepalive pings answered"),
    (
        REFUSED,
        Kind::Counter,
        "device handshakes refused by admission control, by reason",
    ),
    (
        EXPIRED,
        Kind::Counter,
        "events expired by their TTL, as committed",
    ),
    (
        DROPPED,
        Kind::Counter,
        "events dropped before delivery, by reason",
    ),
    (
        WAKE_TO_ACK_SECONDS,
        Kind::Histogram,
        "seconds from a wake written to its ack",
    ),
    (
        STORE_COMMIT_SECONDS,
        Kind::Histogram,
        "seconds per store commit",
    ),
    (
        STORE_BATCH_OPS,
        Kind::Histogram,
        "operations per store commit",
    ),
    (
        TLS_TICKETS_OPENED,
        Kind::Counter,
        "TLS session tickets opened (resumptions)",
    ),
    (
        STORE_FSYNCS,
        Kind::Counter,
        "store commits made durable with fsync",
    ),
    (QUEUED_EVENTS, Kind::Gauge, "events queued in the store"),
    (QUEUED, Kind::Counter, "publishes answered QUEUED"),
    (
        PROBES,
        Kind::Counter,
        "binding-lifetime probe requests, by result",
    ),
    (
        REGISTER_REFUSED,
        Kind::Counter,
        "Register requests refused, by reason",
    ),
    (
        THROTTLED,
        Kind::Counter,
        "publisher requests refused by a limit, by limit",
    ),
    (
        RETRIES,
        Kind::Counter,
        "device handshakes answered with a QUIC Retry",
    ),
    (
        REVOKED,
        Kind::Counter,
        "device connections closed for a revoked token",
    ),
    (
        GRPC_TLS_FAILURES,
        Kind::Counter,
        "failed TLS handshakes on the publisher port",
    ),
    (
        NATS_SECONDS,
        Kind::Histogram,
        "cluster mode: JetStream round trips, by operation",
    ),
    (
        NATS_ERRORS,
        Kind::Counter,
        "cluster mode: failed JetStream requests, by operation",
    ),
    (
        NATS_CONNECTED,
        Kind::Gauge,
        "cluster mode: 1 while connected to NATS",
    ),
    (
        CLUSTER_STREAM_MESSAGES,
        Kind::Gauge,
        "cluster mode: messages in the cluster's streams (events: backlog)",
    ),
];

/// Histogram buckets, seconds (and counts, for the batch size): from half
/// a millisecond to ten seconds.
pub const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 100.0,
    1000.0,
];

/// Every `wakewire_relay_*` name a text mentions (a dashboard, alert rules,
/// a scrape): for the checks that they use only exported metrics.
pub fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("wakewire_relay_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

/// Whether a metric only exists in cluster mode.
pub fn cluster_only(help: &str) -> bool {
    help.starts_with("cluster mode")
}

/// Describes every metric to the recorder and creates its series at zero,
/// so dashboards and alerts see each one from the start (the cluster's
/// only in cluster mode).
pub fn register_all(cluster: bool) {
    for (name, kind, help) in ALL {
        if cluster_only(help) && !cluster {
            continue;
        }
        match kind {
            Kind::Counter => {
                metrics::describe_counter!(*name, *help);
                metrics::counter!(*name).increment(0);
            }
            Kind::Gauge => {
                metrics::describe_gauge!(*name, *help);
                metrics::gauge!(*name).increment(0.0);
            }
            Kind::Histogram => metrics::describe_histogram!(*name, *help),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo_file(path: &str) -> String {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(path);
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    #[test]
    fn every_metric_is_documented_and_the_dashboard_uses_only_these() {
        let docs = repo_file("docs/operations.md");
        for (name, _, _) in ALL {
            assert!(
                docs.contains(&format!("`{name}`")),
                "{name} is not in docs/operations.md"
            );
        }
        for file in [
            "deploy/grafana/wakewire.json",
            "deploy/prometheus/alerts.yaml",
        ] {
            for r in metric_names(&repo_file(file)) {
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| r.strip_suffix(s))
                    .filter(|b| ALL.iter().any(|(n, k, _)| n == b && *k == Kind::Histogram))
                    .unwrap_or(&r);
                assert!(
                    ALL.iter().any(|(n, _, _)| *n == base),
                    "{file} uses {r}, which the relay does not export"
                );
            }
        }
    }
}
