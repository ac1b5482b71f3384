//! The phases of a run against one target: connect, idle, push, saturate,
//! and (relay only) a reconnect storm. Everything is bounded in count and
//! time.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use wakewire_server::data_dir::DataDir;

use crate::fleet::{self, FleetConfig, FleetState};
use crate::procstat::{self, Sampler};
use crate::publisher::Publisher;
use crate::report::{
    CpuStats, DurableStats, IdleStats, PushStats, SaturateStats, StormStats, TargetReport,
};
use crate::stats::Percentiles;
use crate::target::{FloorProc, RelayProc};

/// How the storm stops the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StormMode {
    /// No storm.
    None,
    /// SIGKILL, as a crash: devices notice at their next keepalive.
    Kill,
    /// SIGTERM: GoAway with spread reconnect hints.
    Term,
}

/// Run options.
#[derive(Debug, Clone)]
pub struct Opts {
    pub devices: usize,
    pub channels: usize,
    pub endpoints: usize,
    pub concurrency: usize,
    pub idle: Duration,
    pub push_rate: u64,
    pub push: Duration,
    pub saturate_outstanding: usize,
    pub saturate: Duration,
    pub keepalive: Duration,
    pub storm: StormMode,
    pub storm_limit: Duration,
    pub publishers: usize,
    /// The call single publishes use (push and durable phases).
    pub publish_api: crate::publisher::PublishApi,
    pub batch: usize,
    pub relay_bin: PathBuf,
    pub work_dir: PathBuf,
    /// A relay already running (not started by the harness).
    pub external: Option<External>,
    /// Extra flags for the relay child process.
    pub relay_args: Vec<String>,
    /// Durable-publish phase length (0 = skip).
    pub durable: Duration,
    /// Concurrent publishers in the durable phase.
    pub durable_workers: usize,
    /// Devices connect with TLS over TCP instead of QUIC (relay only).
    pub tcp: bool,
    /// The load generator on CPU 0, the server under test on CPU 1.
    pub pin: bool,
}

/// Pins every thread of `pid` to `cpus` (taskset, util-linux); a failure
/// is reported, not fatal (the run is then unpinned, and says so).
pub fn pin(pid: u32, cpus: &str) -> bool {
    let ok = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("warning: cannot pin pid {pid} to CPU {cpus} (taskset)");
    }
    ok
}

/// The fair split of a two-core machine: generator and server apart.
fn pin_apart(opts: &Opts, server: u32) {
    if opts.pin && server != 0 {
        pin(server, "1");
        pin(std::process::id(), "0");
    }
}

/// A running relay to test instead of a child process.
#[derive(Debug, Clone)]
pub struct External {
    /// Device endpoint.
    pub quic: std::net::SocketAddr,
    /// gRPC endpoint.
    pub grpc: std::net::SocketAddr,
    /// Its data directory (for tokens and the dev certificate).
    pub data_dir: PathBuf,
    /// Its pid, to sample RSS/CPU (0 = do not sample).
    pub pid: u32,
}

/// Live counters for the progress line and the sampler.
#[derive(Debug, Default)]
pub struct Live {
    phase: Mutex<String>,
    /// Work items done in this phase.
    pub done: AtomicUsize,
    /// Work items in this phase.
    pub total: AtomicUsize,
    /// Connected devices.
    pub connected: AtomicUsize,
    /// Publishes issued.
    pub issued: AtomicU64,
    /// Target pid to sample.
    pub pid: AtomicU32,
    /// Latest target RSS, bytes.
    pub rss: AtomicU64,
}

impl Live {
    fn phase(&self, p: &str, total: usize) {
        if let Ok(mut g) = self.phase.lock() {
            *g = p.to_owned();
        }
        self.done.store(0, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
        eprintln!("\n== {p}");
    }
}

/// Prints a progress line every second until `stop` is set.
pub fn spawn_progress(live: Arc<Live>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let tty = std::io::stderr().is_terminal();
        let mut last_issued = 0;
        let mut tick = 0u64;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            tick += 1;
            let (done, total) = (
                live.done.load(Ordering::Relaxed),
                live.total.load(Ordering::Relaxed),
            );
            let issued = live.issued.load(Ordering::Relaxed);
            let width = 30;
            let filled = (done * width).checked_div(total).unwrap_or(0).min(width);
            let phase = live.phase.lock().map(|p| p.clone()).unwrap_or_default();
            let line = format!(
                "[{phase}] [{}{}] {done}/{total} connected {} publish {}/s rss {:.0} MiB",
                "#".repeat(filled),
                ".".repeat(width - filled),
                live.connected.load(Ordering::Relaxed),
                issued - last_issued,
                live.rss.load(Ordering::Relaxed) as f64 / 1048576.0
            );
            last_issued = issued;
            if tty {
                eprint!("\r{line}    ");
            } else if tick.is_multiple_of(5) {
                eprintln!("{line}");
            }
        }
    })
}

/// Samples the target's RSS/CPU every 500 ms.
fn spawn_sampler(
    live: Arc<Live>,
    samples: Arc<Mutex<Vec<procstat::Sample>>>,
    epoch: Instant,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut sampler: Option<Sampler> = None;
        loop {
            let pid = live.pid.load(Ordering::Relaxed);
            if sampler.as_ref().map(|s| s.pid()) != Some(pid) {
                sampler = Some(Sampler::new(pid, epoch));
            }
            if let Some(s) = sampler
                .as_mut()
                .and_then(|s| s.sample(live.connected.load(Ordering::Relaxed) as u64))
            {
                live.rss
                    .store((s.rss_mib * 1048576.0) as u64, Ordering::Relaxed);
                samples.lock().map(|mut v| v.push(s)).ok();
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
}

/// CPU time of `pid` (zero if unknown).
fn cpu_of(pid: u32) -> Duration {
    procstat::read(pid).map_or(Duration::ZERO, |r| r.cpu)
}

/// Microseconds of CPU per operation.
fn per_op_us(cpu: Duration, ops: u64) -> f64 {
    if ops == 0 {
        return f64::NAN;
    }
    cpu.as_secs_f64() * 1e6 / ops as f64
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Idle phase: waits, measures RSS and CPU of `pid`.
async fn idle_phase(
    opts: &Opts,
    live: &Live,
    pid: u32,
    rss_before: u64,
    connected: usize,
) -> IdleStats {
    live.phase("idle", opts.idle.as_secs() as usize);
    // Let the last handshakes settle before measuring CPU.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let r0 = procstat::read(pid);
    let t0 = Instant::now();
    let mut ticks = 0;
    while t0.elapsed() < opts.idle {
        tokio::time::sleep(Duration::from_millis(250).min(opts.idle)).await;
        ticks += 1;
        live.done.store(ticks / 4, Ordering::Relaxed);
    }
    let r1 = procstat::read(pid);
    let (rss_idle, cpu) = match (r0, r1) {
        (Some(a), Some(b)) => (
            b.rss,
            100.0 * b.cpu.saturating_sub(a.cpu).as_secs_f64() / t0.elapsed().as_secs_f64(),
        ),
        _ => (0, 0.0),
    };
    let still = live.connected.load(Ordering::Relaxed);
    IdleStats {
        rss_before_mib: rss_before as f64 / 1048576.0,
        rss_idle_mib: rss_idle as f64 / 1048576.0,
        rss_per_device_bytes: rss_idle.saturating_sub(rss_before) as f64 / connected.max(1) as f64,
        cpu_idle_pct: cpu,
        connected_after_idle: still,
    }
}

/// The relay scenario.
pub async fn run_relay(opts: &Opts, live: Arc<Live>) -> anyhow::Result<TargetReport> {
    let epoch = Instant::now();
    anyhow::ensure!(
        !(opts.tcp && opts.external.is_some()),
        "--transport tcp needs the relay child process (its TCP port is not known otherwise)"
    );
    let (data_dir, mut relay, quic, grpc, pid) = match &opts.external {
        Some(e) => (e.data_dir.clone(), None, e.quic, e.grpc, e.pid),
        None => {
            let data_dir = opts.work_dir.join("relay-data");
            let any = "127.0.0.1:0".parse()?;
            let extra: Vec<&str> = opts.relay_args.iter().map(String::as_str).collect();
            let r = RelayProc::start(&opts.relay_bin, &data_dir, any, any, &extra).await?;
            let (q, g, p) = (r.quic, r.grpc, r.pid());
            (data_dir, Some(r), q, g, p)
        }
    };
    let keys = DataDir::open(&data_dir)?.keys()?;
    live.pid.store(pid, Ordering::Relaxed);
    pin_apart(opts, pid);
    live.connected.store(0, Ordering::Relaxed);
    let samples = Arc::new(Mutex::new(vec![]));
    let sampler = spawn_sampler(live.clone(), samples.clone(), epoch);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = procstat::read(pid).map_or(0, |r| r.rss);

    live.phase("relay: connect", opts.devices);
    let mut cpu = CpuStats::default();
    let cpu0 = cpu_of(pid);
    let endpoints = fleet::endpoints(opts.endpoints)?;
    let tcp_port = match (&relay, opts.tcp) {
        (Some(r), true) => Some(
            r.tcp
                .ok_or_else(|| anyhow::anyhow!("the relay has no TCP device listener"))?
                .port(),
        ),
        _ => None,
    };
    let config = Arc::new(FleetConfig {
        relay: quic,
        ca: data_dir.join(wakewire_server::data_dir::DEV_CERT_FILE),
        channels: opts.channels,
        keepalive: opts.keepalive,
        tcp_port,
        handshake_limit: wakewire_sdk::HandshakeLimit::new(opts.concurrency),
    });
    let state = Arc::new(FleetState::default());
    let now = unix_secs();
    let connect = {
        let watcher = mirror(state.clone(), live.clone());
        let fleet_state = state.clone();
        let stats =
            fleet::connect_phase(opts.devices, opts.concurrency, live_done(&live), move |i| {
                let token = fleet::device_token(&keys, i, now);
                fleet::connect_device(
                    config.clone(),
                    token,
                    endpoints[i % endpoints.len()].clone(),
                    fleet_state.clone(),
                    epoch,
                )
            })
            .await;
        watcher.abort();
        stats
    };
    cpu.per_handshake_us = per_op_us(cpu_of(pid).saturating_sub(cpu0), connect.connected as u64);
    live.connected
        .store(state.connected.load(Ordering::Relaxed), Ordering::Relaxed);
    let watcher = mirror(state.clone(), live.clone());
    eprintln!(
        "\nconnected {}/{} in {:.1} s ({:.0}/s), failures: {:?}",
        connect.connected, connect.attempted, connect.elapsed_s, connect.rate_per_s, connect.errors
    );

    let idle = idle_phase(opts, &live, pid, rss_before, connect.connected).await;

    let keys = DataDir::open(&data_dir)?.keys()?;
    let token = keys.publisher_token(
        &[],
        &["*".to_owned()],
        Duration::from_secs(86_400),
        unix_secs(),
    );
    let ids: Vec<String> = state
        .channel_ids
        .lock()
        .map(|v| v.clone())
        .unwrap_or_default();
    let new_publisher = || {
        Publisher::connect(
            grpc,
            opts.publishers,
            &token,
            ids.clone(),
            epoch,
            opts.publish_api,
        )
    };
    let mut push = None;
    let mut saturate = None;
    if !ids.is_empty() {
        let publisher = new_publisher().await?;
        if opts.push_rate > 0 && !opts.push.is_zero() {
            live.phase(
                &format!("relay: push {}/s", opts.push_rate),
                (opts.push_rate as f64 * opts.push.as_secs_f64()) as usize,
            );
            state.latency.reset();
            let received0 = state.received.load(Ordering::Relaxed);
            let c0 = cpu_of(pid);
            let p = publisher
                .open_loop(opts.push_rate, opts.push, 50_000, &live.issued)
                .await;
            let delivered = p.statuses.get("delivered").copied().unwrap_or(0);
            cpu.per_wake_push_us = per_op_us(cpu_of(pid).saturating_sub(c0), delivered);
            wait_until(Duration::from_secs(5), || {
                state.received.load(Ordering::Relaxed) - received0 >= delivered
            })
            .await;
            push = Some(PushStats {
                offered_rate: opts.push_rate,
                received: state.received.load(Ordering::Relaxed) - received0,
                latency: state.latency.summary(),
                per_second: state.latency.per_second(),
                publish: p,
            });
        }
        if opts.saturate_outstanding > 0 && !opts.saturate.is_zero() {
            live.phase(
                &format!(
                    "relay: saturate ({} outstanding, batches of {})",
                    opts.saturate_outstanding, opts.batch
                ),
                0,
            );
            state.latency.reset();
            let workers = opts.saturate_outstanding.div_ceil(opts.batch.max(1));
            let c0 = cpu_of(pid);
            let p = publisher
                .saturate(workers, opts.batch, opts.saturate, &live.issued)
                .await;
            cpu.per_wake_saturate_us = per_op_us(
                cpu_of(pid).saturating_sub(c0),
                p.statuses.get("delivered").copied().unwrap_or(0),
            );
            saturate = Some(SaturateStats {
                outstanding: opts.saturate_outstanding,
                per_s: p.statuses.get("delivered").copied().unwrap_or(0) as f64
                    / p.elapsed_s.max(1e-9),
                latency: state.latency.summary(),
            });
        }
    }

    let storm = if let Some(mut proc) = relay.take_if(|_| opts.storm != StormMode::None) {
        live.phase("relay: reconnect storm", connect.connected);
        let before = state.connected.load(Ordering::Relaxed);
        let resets0 = state.resets.load(Ordering::Relaxed);
        match opts.storm {
            StormMode::Kill => proc.kill().await?,
            _ => proc.terminate().await?,
        }
        let restarted = proc.restart().await.context("relay restart")?;
        let new_pid = restarted.pid();
        relay = Some(restarted);
        live.pid.store(new_pid, Ordering::Relaxed);
        let t0 = Instant::now();
        let mut timeline = vec![];
        let mut max_rss = 0u64;
        let mut recovery = None;
        while t0.elapsed() < opts.storm_limit {
            let back = state.resets.load(Ordering::Relaxed) - resets0;
            live.done.store(back, Ordering::Relaxed);
            if timeline.len() % 25 == 0 {
                let errors = state.errors.lock().map(|m| m.clone()).unwrap_or_default();
                eprintln!(
                    "\nstorm t={:.0}s back={back} device errors so far: {errors:?}",
                    t0.elapsed().as_secs_f64()
                );
            }
            timeline.push((t0.elapsed().as_secs_f64(), back as u64));
            max_rss = max_rss.max(procstat::read(new_pid).map_or(0, |r| r.rss));
            if back >= before {
                recovery = Some(t0.elapsed().as_secs_f64());
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Some(StormStats {
            mode: format!("{:?}", opts.storm).to_lowercase(),
            devices: before,
            recovered: (state.resets.load(Ordering::Relaxed) - resets0).min(before),
            recovery_s: recovery,
            max_rss_mib: max_rss as f64 / 1048576.0,
            timeline,
            device_errors: state.errors.lock().map(|m| m.clone()).unwrap_or_default(),
        })
    } else {
        None
    };

    let durable = if !opts.durable.is_zero() && !ids.is_empty() {
        live.phase("relay: durable publish to offline devices", 0);
        // Take every device offline: each publish is then a store commit.
        let clients: Vec<_> = state
            .clients
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default();
        for c in &clients {
            c.close().await;
        }
        wait_until(Duration::from_secs(30), || {
            state.connected.load(Ordering::Relaxed) == 0
        })
        .await;
        let publisher = new_publisher().await?;
        let latency = Arc::new(crate::stats::Recorder::default());
        let p = publisher
            .closed_loop(
                opts.durable_workers,
                opts.durable,
                latency.clone(),
                &live.issued,
            )
            .await;
        Some(DurableStats {
            workers: opts.durable_workers,
            relay_args: opts.relay_args.clone(),
            per_s: p
                .statuses
                .get("delivery_status_queued")
                .copied()
                .unwrap_or(0) as f64
                / p.elapsed_s.max(1e-9),
            statuses: p.statuses,
            latency: latency.summary(),
        })
    } else {
        None
    };

    watcher.abort();
    sampler.abort();
    // Stop the relay first, then let the (possibly 100k) clients wind down
    // in the background: main exits once the report is written.
    if let Some(mut r) = relay {
        r.kill().await.ok();
    }
    let clients: Vec<_> = state
        .clients
        .lock()
        .map(|mut v| std::mem::take(&mut *v))
        .unwrap_or_default();
    tokio::spawn(async move { drop(clients) });
    let samples = samples.lock().map(|v| v.clone()).unwrap_or_default();
    Ok(TargetReport {
        target: "relay".into(),
        connect,
        idle,
        push,
        saturate,
        storm,
        durable,
        cpu,
        samples,
    })
}

/// The floor scenario.
pub async fn run_floor(opts: &Opts, live: Arc<Live>) -> anyhow::Result<TargetReport> {
    let epoch = Instant::now();
    let dir = DataDir::open(&opts.work_dir.join("floor-data"))?;
    let (cert, key) = dir.dev_certificate()?;
    let mut floor = FloorProc::start(&cert, &key).await?;
    live.pid.store(floor.pid(), Ordering::Relaxed);
    pin_apart(opts, floor.pid());
    live.connected.store(0, Ordering::Relaxed);
    let samples = Arc::new(Mutex::new(vec![]));
    let sampler = spawn_sampler(live.clone(), samples.clone(), epoch);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = procstat::read(floor.pid()).map_or(0, |r| r.rss);

    live.phase("floor: connect", opts.devices);
    let mut cpu = CpuStats::default();
    let cpu0 = cpu_of(floor.pid());
    let endpoints = fleet::endpoints(opts.endpoints)?;
    let to_close = endpoints.clone();
    let config = crate::floor::client_config(&cert, opts.keepalive)?;
    let connected = Arc::new(AtomicUsize::new(0));
    let addr = floor.addr;
    let connect = {
        let connected = connected.clone();
        let watcher = {
            let (c, live) = (connected.clone(), live.clone());
            tokio::spawn(async move {
                loop {
                    live.connected
                        .store(c.load(Ordering::Relaxed), Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            })
        };
        let stats =
            fleet::connect_phase(opts.devices, opts.concurrency, live_done(&live), move |i| {
                let (ep, cfg, c) = (
                    endpoints[i % endpoints.len()].clone(),
                    config.clone(),
                    connected.clone(),
                );
                async move { crate::floor::connect_one(&ep, cfg, addr, c).await }
            })
            .await;
        watcher.abort();
        stats
    };
    cpu.per_handshake_us = per_op_us(
        cpu_of(floor.pid()).saturating_sub(cpu0),
        connect.connected as u64,
    );
    live.connected
        .store(connected.load(Ordering::Relaxed), Ordering::Relaxed);
    eprintln!(
        "\nconnected {}/{} in {:.1} s ({:.0}/s), failures: {:?}",
        connect.connected, connect.attempted, connect.elapsed_s, connect.rate_per_s, connect.errors
    );
    let idle = idle_phase(opts, &live, floor.pid(), rss_before, connect.connected).await;

    let mut push = None;
    if opts.push_rate > 0 && !opts.push.is_zero() {
        live.phase(&format!("floor: push {}/s", opts.push_rate), 0);
        let c0 = cpu_of(floor.pid());
        let v = floor
            .command(
                &format!("push {} {}", opts.push_rate, opts.push.as_secs_f64()),
                opts.push + Duration::from_secs(30),
            )
            .await?;
        let latency: Percentiles = serde_json::from_value(v["latency"].clone()).unwrap_or_default();
        let per_second: Vec<(u64, Percentiles)> =
            serde_json::from_value(v["per_second"].clone()).unwrap_or_default();
        let acked = v["acked"].as_u64().unwrap_or(0);
        cpu.per_wake_push_us = per_op_us(cpu_of(floor.pid()).saturating_sub(c0), acked);
        let elapsed = v["elapsed_s"].as_f64().unwrap_or(1.0);
        push = Some(PushStats {
            offered_rate: opts.push_rate,
            publish: crate::publisher::PublishStats {
                issued: v["sent"].as_u64().unwrap_or(0),
                statuses: [("acked".to_owned(), acked)].into(),
                skipped: v["dropped"].as_u64().unwrap_or(0),
                elapsed_s: elapsed,
                per_s: acked as f64 / elapsed.max(1e-9),
            },
            received: acked,
            latency,
            per_second,
        });
    }
    let mut saturate = None;
    if opts.saturate_outstanding > 0 && !opts.saturate.is_zero() {
        live.phase(
            &format!(
                "floor: saturate ({} outstanding)",
                opts.saturate_outstanding
            ),
            0,
        );
        let c0 = cpu_of(floor.pid());
        let v = floor
            .command(
                &format!(
                    "saturate {} {}",
                    opts.saturate_outstanding,
                    opts.saturate.as_secs_f64()
                ),
                opts.saturate + Duration::from_secs(30),
            )
            .await?;
        cpu.per_wake_saturate_us = per_op_us(
            cpu_of(floor.pid()).saturating_sub(c0),
            v["acked"].as_u64().unwrap_or(0),
        );
        saturate = Some(SaturateStats {
            outstanding: opts.saturate_outstanding,
            per_s: v["per_s"].as_f64().unwrap_or(0.0),
            latency: serde_json::from_value(v["latency"].clone()).unwrap_or_default(),
        });
    }
    sampler.abort();
    // Close the floor's client connections before the relay's turn: left
    // open, they would keep sending keepalives and retransmissions to a
    // server that is gone until they time out, on the generator's core,
    // during the relay's connect phase (at 100k devices the relay after
    // the floor lost ~150 connections and a quarter of its handshake rate
    // that way, and none when run alone).
    close_all(&to_close).await;
    drop(floor);
    let samples = samples.lock().map(|v| v.clone()).unwrap_or_default();
    Ok(TargetReport {
        target: "floor".into(),
        connect,
        idle,
        push,
        saturate,
        storm: None,
        durable: None,
        cpu,
        samples,
    })
}

/// Closes every connection of `endpoints` and waits (bounded) until the
/// peer has been told.
async fn close_all(endpoints: &[quinn::Endpoint]) {
    for ep in endpoints {
        ep.close(0u32.into(), b"phase over");
    }
    for ep in endpoints {
        let _ = tokio::time::timeout(Duration::from_secs(5), ep.wait_idle()).await;
    }
}

fn live_done(live: &Arc<Live>) -> Arc<AtomicUsize> {
    // connect_phase counts into its own counter; mirror it into `live`.
    let c = Arc::new(AtomicUsize::new(0));
    let (c2, live) = (c.clone(), live.clone());
    tokio::spawn(async move {
        loop {
            live.done
                .store(c2.load(Ordering::Relaxed), Ordering::Relaxed);
            if Arc::strong_count(&c2) == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    c
}

fn mirror(state: Arc<FleetState>, live: Arc<Live>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            live.connected
                .store(state.connected.load(Ordering::Relaxed), Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

async fn wait_until(limit: Duration, cond: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !cond() && t0.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
