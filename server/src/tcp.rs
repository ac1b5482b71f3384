//! The device endpoint over TLS on TCP: the fallback for networks that
//! block or throttle UDP. Same admission as QUIC (connection and pending
//! handshake limits, per-prefix caps, a handshake deadline), then the same
//! connection task (`device_conn::serve_tcp`). Accept errors (out of file
//! descriptors) are retried with a growing pause, like the publisher port.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tracing::warn;

use crate::metrics as m;
use crate::quic::PrefixCounts;
use crate::state::Shared;

/// First pause after a failed accept; it grows with each failure in a row.
const ACCEPT_RETRY: Duration = Duration::from_millis(5);
/// Longest pause between accepts after failures.
const ACCEPT_RETRY_MAX: Duration = Duration::from_millis(500);

/// Accepts device connections on `listener` (none once the relay drains)
/// until the task is aborted.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    shared: Arc<Shared>,
) {
    let prefixes = Arc::new(PrefixCounts::default());
    let per_prefix = shared.config.admission.max_pending_per_prefix;
    let mut failures = 0u32;
    loop {
        match listener.accept().await {
            Ok((stream, remote)) => {
                failures = 0;
                if shared.draining.load(Ordering::Relaxed) {
                    continue;
                }
                if !shared.admit() {
                    metrics::counter!(m::REFUSED, "why" => "busy").increment(1);
                    continue;
                }
                let Some(slot) = prefixes.enter(remote.ip(), per_prefix) else {
                    metrics::counter!(m::REFUSED, "why" => "prefix").increment(1);
                    continue;
                };
                shared.handshaking.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(crate::device_conn::serve_tcp(
                    stream,
                    remote,
                    acceptor.clone(),
                    shared.clone(),
                    slot,
                ));
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                metrics::counter!(m::ACCEPT_ERRORS).increment(1);
                if failures.is_power_of_two() {
                    warn!(error = %e, failures, "device TCP accept failed; retrying");
                }
                let pause = ACCEPT_RETRY
                    .saturating_mul(failures.min(100))
                    .min(ACCEPT_RETRY_MAX);
                tokio::time::sleep(pause).await;
            }
        }
    }
}
