//! The device front door: the QUIC endpoint (stateless resets and
//! connection ids keyed from the data directory, so a restarted relay
//! resets its predecessor's connections) and its accept loop with
//! admission control.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::data_dir::Keys;
use crate::state::Shared;

/// Builds the device endpoint on an already-bound UDP socket.
pub(crate) fn endpoint(
    socket: std::net::UdpSocket,
    keys: &Keys,
    server_config: quinn::ServerConfig,
    udp_buffer_bytes: usize,
) -> std::io::Result<quinn::Endpoint> {
    tune(&socket, udp_buffer_bytes);
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

/// Accepts connections until the endpoint closes; refuses cheaply when the
/// relay is at its handshake or connection limit.
pub(crate) async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    while let Some(incoming) = endpoint.accept().await {
        if !shared.admit() {
            // Cheap refusal: the device backs off (with jitter) and retries.
            metrics::counter!(crate::metrics::REFUSED).increment(1);
            incoming.refuse();
            continue;
        }
        shared.handshaking.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(crate::device_conn::serve(incoming, shared.clone()));
    }
}
