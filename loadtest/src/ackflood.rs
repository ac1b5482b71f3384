//! `wakewire-loadtest ack-flood`: what one hostile device costs the others.
//! Well-behaved devices receive wakes published at a fixed rate; in the
//! second phase, flooders send acks for made-up events as fast as they can
//! (reconnecting whenever the relay closes them). Reported per phase: the
//! good devices' publish-to-callback latency, the relay's RSS and CPU, and
//! what the flooders managed to send.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use wakewire_sdk::{ClientBuilder, KeepalivePolicy};
use wakewire_server::data_dir::{DataDir, DEV_CERT_FILE};
use wakewire_test_support::RawDevice;

use crate::procstat;
use crate::publisher::Publisher;
use crate::stats::{Percentiles, Recorder};
use crate::target::RelayProc;

/// Settings of the run.
pub struct AckFloodOpts {
    /// Well-behaved devices.
    pub devices: usize,
    /// Wakes published per second to them.
    pub rate: u64,
    /// Length of each phase.
    pub phase: Duration,
    /// Hostile devices in the flood phase.
    pub flooders: usize,
    /// The relay binary.
    pub relay_bin: PathBuf,
    /// Output directory.
    pub out: PathBuf,
}

/// One phase's figures.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseReport {
    /// Phase name.
    pub name: String,
    /// Publish-to-callback latency of the good devices.
    pub latency: Percentiles,
    /// Wakes their callbacks received.
    pub delivered: u64,
    /// Relay RSS at the start, MiB.
    pub rss_before_mib: f64,
    /// Highest relay RSS sampled, MiB.
    pub rss_peak_mib: f64,
    /// Relay RSS at the end, MiB.
    pub rss_after_mib: f64,
    /// Relay CPU time used, s.
    pub relay_cpu_s: f64,
    /// Acks the flooders wrote.
    pub flood_acks_sent: u64,
    /// Connections the flooders opened.
    pub flood_connections: u64,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct AckFloodReport {
    /// Well-behaved devices.
    pub devices: usize,
    /// Offered wakes per second.
    pub rate: u64,
    /// Phase length, s.
    pub phase_s: f64,
    /// Flooders.
    pub flooders: usize,
    /// Baseline, flood, after.
    pub phases: Vec<PhaseReport>,
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// Runs the benchmark; writes `ackflood.json` and `ackflood.md` to `out`.
pub async fn run(opts: AckFloodOpts) -> anyhow::Result<AckFloodReport> {
    std::fs::create_dir_all(&opts.out)?;
    let work = opts.out.join(format!("ackflood-{}", std::process::id()));
    let data = work.join("data");
    let any = "127.0.0.1:0".parse()?;
    let mut relay = RelayProc::start(&opts.relay_bin, &data, any, any, &[]).await?;
    let pid = relay.pid();
    let keys = DataDir::open(&data)?.keys()?;
    let ca = data.join(DEV_CERT_FILE);
    let epoch = Instant::now();
    let latency = Arc::new(Recorder::default());
    let delivered = Arc::new(AtomicU64::new(0));

    // The well-behaved devices, each with a channel.
    let mut clients = vec![];
    let mut ids = vec![];
    for i in 0..opts.devices {
        let token = keys.device_token(&format!("good-{i}"), Duration::from_secs(3600), unix_secs());
        let client = ClientBuilder::new(relay.quic.to_string())
            .server_name("localhost")
            .trust_pem_file(&ca)
            .device_token(token)
            .keepalive(KeepalivePolicy::Fixed(Duration::from_secs(600)))
            .connect()
            .await?;
        let (lat, n) = (latency.clone(), delivered.clone());
        let id = client
            .channel("c")
            .on_wake(move |w| {
                if let Some(b) = w.payload.get(..8) {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    let sent = epoch + Duration::from_nanos(u64::from_le_bytes(a));
                    let now = Instant::now();
                    lat.record(now.saturating_duration_since(sent), now - epoch);
                }
                n.fetch_add(1, Ordering::Relaxed);
            })
            .register()
            .await?;
        ids.push(id.into_string());
        clients.push(client);
    }
    let token = keys.publisher_token(&[], &["*".into()], Duration::from_secs(3600), unix_secs());
    let publisher = Publisher::connect(
        relay.grpc,
        2,
        &token,
        ids,
        epoch,
        crate::publisher::PublishApi::Unary,
    )
    .await?;

    let mut phases = vec![];
    for (name, flood) in [("baseline", false), ("ack flood", true), ("after", false)] {
        let before = procstat::read(pid);
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let conns = Arc::new(AtomicU64::new(0));
        let mut flooders = tokio::task::JoinSet::new();
        if flood {
            for f in 0..opts.flooders {
                let token = keys.device_token(
                    &format!("flooder-{f}"),
                    Duration::from_secs(3600),
                    unix_secs(),
                );
                flooders.spawn(flooder(
                    relay.quic,
                    ca.clone(),
                    token,
                    stop.clone(),
                    sent.clone(),
                    conns.clone(),
                ));
            }
        }
        let peak = Arc::new(AtomicU64::new(before.map_or(0, |r| r.rss)));
        let sampler = {
            let (peak, stop) = (peak.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(r) = procstat::read(pid) {
                        peak.fetch_max(r.rss, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        latency.reset();
        let n0 = delivered.load(Ordering::Relaxed);
        let progress = AtomicU64::new(0);
        let stats = publisher
            .open_loop(opts.rate, opts.phase, 10_000, &progress)
            .await;
        // Let the last wakes arrive (bounded).
        let want = n0 + stats.issued;
        let until = Instant::now() + Duration::from_secs(10);
        while delivered.load(Ordering::Relaxed) < want && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.store(true, Ordering::Relaxed);
        while flooders.join_next().await.is_some() {}
        let _ = sampler.await;
        let after = procstat::read(pid);
        phases.push(PhaseReport {
            name: name.into(),
            latency: latency.summary(),
            delivered: delivered.load(Ordering::Relaxed) - n0,
            rss_before_mib: before.map_or(0.0, |r| mib(r.rss)),
            rss_peak_mib: mib(peak.load(Ordering::Relaxed)),
            rss_after_mib: after.map_or(0.0, |r| mib(r.rss)),
            relay_cpu_s: match (before, after) {
                (Some(b), Some(a)) => (a.cpu - b.cpu).as_secs_f64(),
                _ => 0.0,
            },
            flood_acks_sent: sent.load(Ordering::Relaxed),
            flood_connections: conns.load(Ordering::Relaxed),
        });
    }
    for c in &clients {
        c.close().await;
    }
    relay.kill().await?;
    let _ = std::fs::remove_dir_all(&work);
    let report = AckFloodReport {
        devices: opts.devices,
        rate: opts.rate,
        phase_s: opts.phase.as_secs_f64(),
        flooders: opts.flooders,
        phases,
    };
    std::fs::write(
        opts.out.join("ackflood.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(opts.out.join("ackflood.md"), markdown(&report))?;
    Ok(report)
}

/// Sends acks for made-up events as fast as possible, reconnecting when
/// the relay closes the connection, until `stop`.
async fn flooder(
    relay: std::net::SocketAddr,
    ca: PathBuf,
    token: String,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    conns: Arc<AtomicU64>,
) {
    const BURST: usize = 256;
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut d) = RawDevice::connect_to(relay, Path::new(&ca), token.clone()).await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        conns.fetch_add(1, Ordering::Relaxed);
        while !stop.load(Ordering::Relaxed) {
            if d.ack_flood(BURST).await.is_err() {
                break;
            }
            sent.fetch_add(BURST as u64, Ordering::Relaxed);
        }
    }
}

fn markdown(r: &AckFloodReport) -> String {
    let mut s = format!(
        "{} well-behaved devices receive {} wakes/s for {:.0} s per phase; in the second phase {} flooder(s) send acks for made-up events as fast as they can, reconnecting whenever the relay closes them.\n\n",
        r.devices, r.rate, r.phase_s, r.flooders
    );
    s.push_str("| phase | good devices' p50 / p99 / max (ms) | wakes delivered | relay RSS before / peak / after (MiB) | relay CPU (s) | flood acks sent | flood connections |\n|---|---|---|---|---|---|---|\n");
    for p in &r.phases {
        s.push_str(&format!(
            "| {} | {:.1} / {:.1} / {:.1} | {} | {:.1} / {:.1} / {:.1} | {:.2} | {} | {} |\n",
            p.name,
            p.latency.p50_ms,
            p.latency.p99_ms,
            p.latency.max_ms,
            p.delivered,
            p.rss_before_mib,
            p.rss_peak_mib,
            p.rss_after_mib,
            p.relay_cpu_s,
            p.flood_acks_sent,
            p.flood_connections
        ));
    }
    s
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
