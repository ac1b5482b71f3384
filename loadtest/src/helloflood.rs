//! `wakewire-loadtest hello-flood`: legitimate devices connecting while a
//! flood of QUIC ClientHellos (real Initial packets, from many source
//! prefixes that never answer, as spoofed sources would) hits the relay,
//! once with the relay's Retry under pressure and once with Retry turned
//! off. Reported: handshakes/s and failures of the legitimate devices, the
//! flood rate achieved, and the relay's RSS before and after.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use wakewire_sdk::{ClientBuilder, KeepalivePolicy};
use wakewire_server::data_dir::{DataDir, DEV_CERT_FILE};
use wakewire_test_support::flood::client_hellos;

use crate::procstat;
use crate::target::RelayProc;

/// Settings.
pub struct HelloFloodOpts {
    /// Offered ClientHellos per second.
    pub flood_rate: u64,
    /// Seconds of flood (legitimate connects run meanwhile).
    pub secs: f64,
    /// Legitimate connection attempts in flight.
    pub concurrency: usize,
    /// The relay binary.
    pub relay_bin: PathBuf,
    /// Output directory.
    pub out: PathBuf,
}

/// One run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct FloodRun {
    /// "Retry on" or "Retry off".
    pub name: String,
    /// ClientHellos sent per second.
    pub flood_per_s: f64,
    /// Legitimate connections established per second.
    pub handshakes_per_s: f64,
    /// Legitimate attempts that failed.
    pub failures: u64,
    /// Legitimate attempts that succeeded.
    pub connected: u64,
    /// Relay RSS before the flood, MiB.
    pub rss_before_mib: f64,
    /// Relay RSS after it, MiB.
    pub rss_after_mib: f64,
}

/// Runs both variants; writes `helloflood.md` and `.json`.
pub async fn run(opts: HelloFloodOpts) -> anyhow::Result<Vec<FloodRun>> {
    std::fs::create_dir_all(&opts.out)?;
    let mut runs = vec![];
    for (name, extra, rate) in [
        ("no flood (reference)", vec![], 0),
        (
            "Retry on (default: beyond 256 pending handshakes)",
            vec![],
            opts.flood_rate,
        ),
        (
            "Retry off (--retry-threshold 1000000000)",
            vec!["--retry-threshold", "1000000000"],
            opts.flood_rate,
        ),
    ] {
        runs.push(one(&opts, name, &extra, rate).await?);
    }
    let mut md = format!(
        "A flood of {} QUIC ClientHellos/s (real Initial packets from 200 loopback addresses in 50 /24 prefixes, never answered) for {:.0} s, while legitimate devices connect ({} attempts in flight, each a full handshake, Hello, Welcome and Register, connect timeout 5 s).\n\n",
        opts.flood_rate, opts.secs, opts.concurrency
    );
    md.push_str("| relay | flood sent/s | legitimate handshakes/s | connected | failed | relay RSS before / after (MiB) |\n|---|---|---|---|---|---|\n");
    for r in &runs {
        md.push_str(&format!(
            "| {} | {:.0} | {:.0} | {} | {} | {:.1} / {:.1} |\n",
            r.name,
            r.flood_per_s,
            r.handshakes_per_s,
            r.connected,
            r.failures,
            r.rss_before_mib,
            r.rss_after_mib
        ));
    }
    std::fs::write(opts.out.join("helloflood.md"), &md)?;
    std::fs::write(
        opts.out.join("helloflood.json"),
        serde_json::to_string_pretty(&runs)?,
    )?;
    Ok(runs)
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

async fn one(
    opts: &HelloFloodOpts,
    name: &str,
    extra: &[&str],
    flood_rate: u64,
) -> anyhow::Result<FloodRun> {
    let work = opts.out.join(format!(
        "helloflood-{}-{}-{flood_rate}",
        std::process::id(),
        extra.len()
    ));
    let data = work.join("data");
    let any = "127.0.0.1:0".parse()?;
    let mut relay = RelayProc::start(&opts.relay_bin, &data, any, any, extra).await?;
    let pid = relay.pid();
    let keys = Arc::new(DataDir::open(&data)?.keys()?);
    let ca = data.join(DEV_CERT_FILE);
    let before = procstat::read(pid).map_or(0.0, |r| mib(r.rss));

    // Pre-made Initials (making them costs the generator, not the relay).
    let per_batch = if flood_rate == 0 { 1 } else { 20_000usize };
    let hellos = Arc::new(client_hellos(relay.quic, &ca, per_batch)?);
    let sources: Vec<IpAddr> = (10..60u8)
        .flat_map(|p| (1..=4u8).map(move |h| IpAddr::from([127, 0, p, h])))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let flood = {
        let (stop, sent, hellos) = (stop.clone(), sent.clone(), hellos.clone());
        let (target, rate) = (relay.quic, flood_rate);
        tokio::spawn(async move {
            let mut sockets = vec![];
            for ip in sources {
                if let Ok(s) = tokio::net::UdpSocket::bind(SocketAddr::new(ip, 0)).await {
                    sockets.push(s);
                }
            }
            let start = Instant::now();
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) && !sockets.is_empty() && rate > 0 {
                let due = (start.elapsed().as_secs_f64() * rate as f64) as usize;
                while i < due {
                    let s = &sockets[i % sockets.len()];
                    let _ = s.try_send_to(&hellos[i % hellos.len()], target);
                    i += 1;
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    // Legitimate devices while the flood runs.
    let connected = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(opts.secs);
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..opts.concurrency {
        let (keys, ca) = (keys.clone(), ca.clone());
        let (connected, failed) = (connected.clone(), failed.clone());
        let quic = relay.quic;
        workers.spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                let token = keys.device_token(
                    &format!("legit-{w}-{n}"),
                    Duration::from_secs(600),
                    unix_secs(),
                );
                n += 1;
                let r = ClientBuilder::new(quic.to_string())
                    .server_name("localhost")
                    .trust_pem_file(&ca)
                    .device_token(token)
                    .keepalive(KeepalivePolicy::Fixed(Duration::from_secs(600)))
                    .connect_timeout(Duration::from_secs(5))
                    .connect()
                    .await;
                match r {
                    Ok(c) => match c.channel("c").register().await {
                        Ok(_) => {
                            connected.fetch_add(1, Ordering::Relaxed);
                            c.close().await;
                        }
                        Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    },
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
    }
    while workers.join_next().await.is_some() {}
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let _ = flood.await;
    // Let pending handshakes time out before reading the RSS.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let after = procstat::read(pid).map_or(0.0, |r| mib(r.rss));
    relay.kill().await?;
    let _ = std::fs::remove_dir_all(&work);
    let ok = connected.load(Ordering::Relaxed);
    Ok(FloodRun {
        name: name.into(),
        flood_per_s: sent.load(Ordering::Relaxed) as f64 / elapsed,
        handshakes_per_s: ok as f64 / elapsed,
        failures: failed.load(Ordering::Relaxed),
        connected: ok,
        rss_before_mib: before,
        rss_after_mib: after,
    })
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
