//! The device front door: the QUIC endpoint (stateless resets, connection
//! ids and Retry tokens keyed from the data directory, so a restarted relay
//! resets its predecessor's connections and accepts its Retry tokens) and
//! its accept loop with admission control:
//!
//! - beyond `max_pending_handshakes` (or `max_connections`), or while the
//!   relay drains, new handshakes are refused (devices back off and retry);
//! - beyond `retry_threshold` pending handshakes, a new one must first
//!   prove it owns its source address with a QUIC Retry (one round trip,
//!   no state kept), so spoofed ClientHellos cannot hold handshake slots;
//! - at most `max_pending_per_prefix` handshakes per /24 or /64, so one
//!   source cannot take every slot;
//! - a handshake must complete within `handshake_timeout`.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use wakewire_proto::probe::prefix_of;

use crate::data_dir::Keys;
use crate::metrics as m;
use crate::state::Shared;

/// Builds the device endpoint on an already-bound UDP socket.
pub(crate) fn endpoint(
    socket: std::net::UdpSocket,
    keys: &Keys,
    mut server_config: quinn::ServerConfig,
    udp_buffer_bytes: usize,
) -> std::io::Result<quinn::Endpoint> {
    tune(&socket, udp_buffer_bytes);
    // Retry tokens sealed with a key from the data directory.
    let token_key = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, &[]).extract(&keys.retry_key);
    server_config.token_key(Arc::new(token_key));
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime for quinn"))?;
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(keys.reset_key.clone()));
    // Answer every packet of a connection we no longer know with a stateless
    // reset (quinn's default allows one per 20 ms): after a crash, devices
    // whose keepalives arrive together must all learn at once that they
    // should reconnect. A reset is always smaller than the packet that
    // caused it, so this cannot amplify traffic.
    endpoint_config.min_reset_interval(Duration::ZERO);
    // Connection ids validated with a key that survives restarts: quinn only
    // answers packets whose id it recognises as its own with a reset.
    let cid_key = keys.cid_key;
    endpoint_config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    quinn::Endpoint::new(endpoint_config, Some(server_config), socket, runtime)
}

/// Asks for the configured socket buffers (the kernel may cap them at
/// net.core.rmem_max / wmem_max).
fn tune(socket: &std::net::UdpSocket, buffer: usize) {
    let s = socket2::SockRef::from(socket);
    if s.set_recv_buffer_size(buffer).is_err() {
        tracing::debug!(buffer, "could not set the UDP receive buffer");
    }
    if s.set_send_buffer_size(buffer).is_err() {
        tracing::debug!(buffer, "could not set the UDP send buffer");
    }
}

/// Handshakes in progress per source prefix.
#[derive(Debug, Default)]
pub(crate) struct PrefixCounts(DashMap<IpAddr, usize>);

impl PrefixCounts {
    /// Counts one more handshake from `ip`'s prefix unless it has `max`.
    pub(crate) fn enter(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<PrefixSlot> {
        let prefix = prefix_of(ip);
        let mut n = self.0.entry(prefix).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(PrefixSlot {
            counts: self.clone(),
            prefix,
        })
    }
}

/// One handshake's place in its prefix's count; given back on drop.
#[derive(Debug)]
pub(crate) struct PrefixSlot {
    counts: Arc<PrefixCounts>,
    prefix: IpAddr,
}

impl Drop for PrefixSlot {
    fn drop(&mut self) {
        self.counts.0.remove_if_mut(&self.prefix, |_, n| {
            *n -= 1;
            *n == 0
        });
    }
}

/// Accepts connections until the endpoint closes; refuses cheaply when the
/// relay is at its handshake or connection limit, asks for a Retry under
/// pressure, and bounds handshakes per source prefix.
pub(crate) async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    let prefixes = Arc::new(PrefixCounts::default());
    let admission = shared.config.admission.clone();
    while let Some(incoming) = endpoint.accept().await {
        if shared.draining.load(Ordering::Relaxed) {
            // Refused, not ignored: the device learns at once to go
            // elsewhere or come back later, instead of waiting out its
            // connect timeout.
            metrics::counter!(m::REFUSED, "why" => "draining").increment(1);
            incoming.refuse();
            continue;
        }
        if !shared.admit() {
            // Cheap refusal: the device backs off (with jitter) and retries.
            metrics::counter!(m::REFUSED, "why" => "busy").increment(1);
            incoming.refuse();
            continue;
        }
        let pending = shared.handshaking.load(Ordering::Relaxed);
        if pending >= admission.retry_threshold && !incoming.remote_address_validated() {
            match incoming.retry() {
                Ok(()) => {
                    metrics::counter!(m::RETRIES).increment(1);
                    continue;
                }
                // Already retried once: validated by now, go on.
                Err(e) => {
                    let incoming = e.into_incoming();
                    spawn_handshake(
                        incoming,
                        &shared,
                        &prefixes,
                        admission.max_pending_per_prefix,
                    );
                    continue;
                }
            }
        }
        spawn_handshake(
            incoming,
            &shared,
            &prefixes,
            admission.max_pending_per_prefix,
        );
    }
}

fn spawn_handshake(
    incoming: quinn::Incoming,
    shared: &Arc<Shared>,
    prefixes: &Arc<PrefixCounts>,
    per_prefix: usize,
) {
    let Some(slot) = prefixes.enter(incoming.remote_address().ip(), per_prefix) else {
        metrics::counter!(m::REFUSED, "why" => "prefix").increment(1);
        incoming.refuse();
        return;
    };
    shared.handshaking.fetch_add(1, Ordering::Relaxed);
    tokio::spawn(crate::device_conn::serve(incoming, shared.clone(), slot));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshakes_are_counted_per_prefix() {
        let c = Arc::new(PrefixCounts::default());
        let a: IpAddr = "198.51.100.1".parse().unwrap();
        let b: IpAddr = "198.51.100.2".parse().unwrap();
        let other: IpAddr = "203.0.113.1".parse().unwrap();
        let s1 = c.enter(a, 2).unwrap();
        let _s2 = c.enter(b, 2).unwrap();
        assert!(c.enter(a, 2).is_none(), "the /24 is full");
        assert!(c.enter(other, 2).is_some());
        drop(s1);
        assert!(c.enter(b, 2).is_some());
    }
}
