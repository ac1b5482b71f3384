//! Simulated devices: N real SDK clients sharing a few UDP endpoints, and
//! the connect phase both targets share (bounded concurrency, handshake
//! latency, failures by kind).

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::Semaphore;
use wakewire_sdk::{Client, ClientBuilder, KeepalivePolicy, Status};
use wakewire_server::data_dir::Keys;

use crate::stats::{Percentiles, Recorder};

/// Outcome of a connect phase.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectStats {
    /// Connections attempted.
    pub attempted: usize,
    /// Connections established.
    pub connected: usize,
    /// Attempts that failed.
    pub failed: usize,
    /// Failures by error text.
    pub errors: BTreeMap<String, usize>,
    /// Phase duration, seconds.
    pub elapsed_s: f64,
    /// Established connections per second.
    pub rate_per_s: f64,
    /// Time per connection (handshake + session setup), ms.
    pub handshake: Percentiles,
}

/// Runs `connect(i)` for `0..n` with at most `concurrency` in flight.
pub async fn connect_phase<F, Fut>(
    n: usize,
    concurrency: usize,
    progress: Arc<AtomicUsize>,
    connect: F,
) -> ConnectStats
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let sem = Arc::new(Semaphore::new(concurrency.max(1)));
    let latency = Arc::new(Recorder::default());
    let errors = Arc::new(Mutex::new(BTreeMap::<String, usize>::new()));
    let ok = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        let fut = connect(i);
        let (latency, errors, ok, progress) = (
            latency.clone(),
            errors.clone(),
            ok.clone(),
            progress.clone(),
        );
        tasks.spawn(async move {
            let t0 = Instant::now();
            match tokio::time::timeout(Duration::from_secs(60), fut).await {
                Ok(Ok(())) => {
                    latency.record(t0.elapsed(), start.elapsed());
                    ok.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Err(e)) => count(&errors, short(&format!("{e:#}"))),
                Err(_) => count(&errors, "timed out after 60 s".into()),
            }
            progress.fetch_add(1, Ordering::Relaxed);
            drop(permit);
        });
        // Reap finished tasks as we go so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = start.elapsed().as_secs_f64();
    let connected = ok.load(Ordering::Relaxed);
    let errors = errors.lock().map(|m| m.clone()).unwrap_or_default();
    ConnectStats {
        attempted: n,
        connected,
        failed: n - connected,
        errors,
        elapsed_s: elapsed,
        rate_per_s: connected as f64 / elapsed.max(1e-9),
        handshake: latency.summary(),
    }
}

fn count<N: std::ops::AddAssign + From<u8> + Default>(
    errors: &Mutex<BTreeMap<String, N>>,
    key: String,
) {
    if let Ok(mut m) = errors.lock() {
        *m.entry(key).or_default() += N::from(1u8);
    }
}

fn short(e: &str) -> String {
    e.chars().take(80).collect()
}

/// Client UDP endpoints shared by the simulated devices.
pub fn endpoints(count: usize) -> anyhow::Result<Vec<quinn::Endpoint>> {
    let runtime = quinn::default_runtime().ok_or_else(|| anyhow::anyhow!("no runtime"))?;
    (0..count.max(1))
        .map(|_| {
            let socket = crate::udp_socket(SocketAddr::from(([127, 0, 0, 1], 0)))?;
            Ok(quinn::Endpoint::new(
                quinn::EndpointConfig::default(),
                None,
                socket,
                runtime.clone(),
            )?)
        })
        .collect()
}

/// Settings of a simulated fleet.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// Relay device endpoint.
    pub relay: SocketAddr,
    /// Dev certificate to trust.
    pub ca: PathBuf,
    /// Channels per device.
    pub channels: usize,
    /// Keepalive interval.
    pub keepalive: Duration,
    /// Connect with TLS over TCP to this port instead of QUIC.
    pub tcp_port: Option<u16>,
    /// Handshakes in flight across the fleet, reconnects included: the
    /// generator shares two cores with the relay, and unbounded, a 100k
    /// reconnect storm overloads the generator itself (its sockets overflow
    /// and its established devices time out), which is not the relay's
    /// doing. The connect phase has the same bound.
    pub handshake_limit: wakewire_sdk::HandshakeLimit,
}

/// What every device's callbacks update.
#[derive(Debug, Default)]
pub struct FleetState {
    /// Devices currently connected.
    pub connected: AtomicUsize,
    /// Reset statuses seen (re-registrations after reconnects).
    pub resets: AtomicUsize,
    /// Wakes received.
    pub received: AtomicU64,
    /// Publish -> callback latency.
    pub latency: Recorder,
    /// Registered channel ids.
    pub channel_ids: Mutex<Vec<String>>,
    /// Clients (kept alive).
    pub clients: Mutex<Vec<Client>>,
    /// Disconnections and failed reconnects by error kind.
    pub errors: Mutex<BTreeMap<String, u64>>,
}

/// Connects device `i` with the real SDK and registers its channels.
pub async fn connect_device(
    config: Arc<FleetConfig>,
    token: String,
    endpoint: quinn::Endpoint,
    state: Arc<FleetState>,
    epoch: Instant,
) -> anyhow::Result<()> {
    let up = Arc::new(AtomicBool::new(false));
    let status_state = state.clone();
    let builder = ClientBuilder::new(config.relay.to_string())
        .server_name("localhost")
        .trust_pem_file(&config.ca)
        .device_token(token)
        .endpoint(endpoint)
        .keepalive(KeepalivePolicy::Fixed(config.keepalive))
        .handshake_limit(config.handshake_limit.clone())
        .on_status(move |s| match s {
            Status::Connected(_) if !up.swap(true, Ordering::Relaxed) => {
                status_state.connected.fetch_add(1, Ordering::Relaxed);
            }
            Status::Disconnected { error, .. } => {
                if up.swap(false, Ordering::Relaxed) {
                    status_state.connected.fetch_sub(1, Ordering::Relaxed);
                }
                let kind = format!("{error:?}");
                let kind = kind.split(['(', ' ', '{']).next().unwrap_or("").to_owned();
                count(&status_state.errors, kind);
            }
            Status::Reset { .. } => {
                status_state.resets.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        });
    let builder = match config.tcp_port {
        Some(port) => builder
            .transport(wakewire_sdk::Transport::Tcp)
            .tcp_port(port),
        None => builder,
    };
    let client = builder.connect().await?;
    for k in 0..config.channels {
        let s = state.clone();
        let id = client
            .channel(format!("c{k}"))
            .on_wake(move |w| {
                record_latency(w, epoch, &s.latency);
                s.received.fetch_add(1, Ordering::Relaxed);
            })
            .register()
            .await?
            .into_string();
        state.channel_ids.lock().map(|mut v| v.push(id)).ok();
    }
    state.clients.lock().map(|mut v| v.push(client)).ok();
    Ok(())
}

/// Records a wake's publish-to-callback latency: its payload starts with
/// the publish time, nanoseconds since `epoch` (little-endian).
pub fn record_latency(w: &wakewire_sdk::WakeEvent, epoch: Instant, rec: &Recorder) {
    let now = epoch.elapsed();
    let sent = w
        .payload
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0);
    rec.record(now.saturating_sub(Duration::from_nanos(sent)), now);
}

/// Mints the device token of simulated device `i`.
pub fn device_token(keys: &Keys, i: usize, now_unix: u64) -> String {
    keys.device_token(
        &format!("lt-{i}"),
        Duration::from_secs(7 * 86_400),
        now_unix,
    )
}
