//! `wakewire-loadtest`: simulates fleets of devices against a relay it
//! starts as a child process, and runs the same scenarios against a
//! raw-quinn floor server with the same TLS and transport settings, so each
//! figure has a floor measured in the same run. Loopback only; every phase
//! is bounded in count and time.
//!
//! ```text
//! wakewire-loadtest compare --devices 10000 --push-rate 10000 --out loadtest-out
//! ```
//! writes `report.json`, `report.md` (the table for docs/benchmarks.md) and
//! SVG plots into the output directory.

// A benchmark harness measures real elapsed time everywhere: the
// workspace ban on reading clocks outside a clock module (sans-IO) does not
// apply to it.
#![allow(clippy::disallowed_methods)]

mod ackflood;
mod cluster;
mod fleet;
mod floor;
mod helloflood;
mod plot;
mod procstat;
mod publisher;
mod report;
mod runner;
mod standby;
mod stats;
mod target;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use crate::report::{Params, Report};
use crate::runner::{Live, Opts, StormMode};

#[derive(Parser)]
#[command(
    name = "wakewire-loadtest",
    version,
    about = "Fleet simulator and benchmarks: wakewire relay vs raw QUIC floor"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Which {
    Both,
    Relay,
    Floor,
}

/// `--transport`.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum TransportArg {
    Quic,
    Tcp,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once at start-up
enum Cmd {
    /// One relay on its embedded store against three relays on a
    /// three-node NATS JetStream cluster: publish-to-callback latency,
    /// durable publishes/s, failover time (needs nats-server).
    Cluster {
        /// Connected devices in the latency phase.
        #[arg(long, default_value_t = 1000)]
        devices: usize,
        /// Publishes in the latency phase.
        #[arg(long, default_value_t = 5000)]
        publishes: usize,
        /// Publishes in flight in the latency phase.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Durable phase, seconds.
        #[arg(long, default_value_t = 10.0)]
        durable_secs: f64,
        /// Concurrent publishers in the durable phase.
        #[arg(long, default_value_t = 256)]
        durable_workers: usize,
        /// Devices in the failover phase (0 = skip).
        #[arg(long, default_value_t = 10000)]
        failover_devices: usize,
        /// Device keepalive in the failover phase, seconds.
        #[arg(long, default_value_t = 5.0)]
        failover_keepalive_secs: f64,
        /// Path of wakewire-relay (default: next to this binary).
        #[arg(long)]
        relay_bin: Option<PathBuf>,
        /// Output directory.
        #[arg(long, default_value = "loadtest-out/cluster")]
        out: PathBuf,
    },
    /// Run the scenarios against the floor and/or the relay and report.
    Compare {
        /// Which targets to run.
        #[arg(long, value_enum, default_value = "both")]
        target: Which,
        /// Simulated devices (one connection each).
        #[arg(long, default_value_t = 1000)]
        devices: usize,
        /// Channels per device (relay).
        #[arg(long, default_value_t = 1)]
        channels: usize,
        /// Client UDP endpoints shared by the devices.
        #[arg(long, default_value_t = 8)]
        endpoints: usize,
        /// Connection attempts in flight.
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        /// Idle phase, seconds.
        #[arg(long, default_value_t = 10.0)]
        idle_secs: f64,
        /// Offered push rate per second (0 = skip).
        #[arg(long, default_value_t = 1000)]
        push_rate: u64,
        /// Push phase, seconds.
        #[arg(long, default_value_t = 10.0)]
        push_secs: f64,
        /// In-flight wakes for the saturation phase (0 = skip).
        #[arg(long, default_value_t = 1000)]
        saturate_outstanding: usize,
        /// Saturation phase, seconds.
        #[arg(long, default_value_t = 10.0)]
        saturate_secs: f64,
        /// Device keepalive interval, seconds.
        #[arg(long, default_value_t = 25.0)]
        keepalive_secs: f64,
        /// Reconnect storm after the other phases (relay only).
        #[arg(long, value_enum, default_value = "none")]
        storm: StormMode,
        /// Longest wait for every device to come back, seconds.
        #[arg(long, default_value_t = 180.0)]
        storm_limit_secs: f64,
        /// gRPC connections of the publisher.
        #[arg(long, default_value_t = 4)]
        publishers: usize,
        /// The call single publishes use in the push and durable phases:
        /// unary Publish, or one PublishStream per connection.
        #[arg(long, value_enum, default_value_t = publisher::PublishApi::Unary)]
        publish_api: publisher::PublishApi,
        /// Events per PublishBatch in the saturation phase (1 = Publish).
        #[arg(long, default_value_t = 50)]
        batch: usize,
        /// Test a relay that is already running at this device address
        /// (needs --relay-grpc and --relay-data-dir; no storm).
        #[arg(long, requires_all = ["relay_grpc", "relay_data_dir"])]
        relay_quic: Option<SocketAddr>,
        /// gRPC address of the running relay.
        #[arg(long)]
        relay_grpc: Option<SocketAddr>,
        /// Data directory of the running relay (tokens, dev certificate).
        #[arg(long)]
        relay_data_dir: Option<PathBuf>,
        /// Pid of the running relay, to sample its RSS and CPU.
        #[arg(long, default_value_t = 0)]
        relay_pid: u32,
        /// Extra flag for the relay child process (repeatable), e.g.
        /// --relay-arg=--store-group-commit --relay-arg=false.
        #[arg(long = "relay-arg", allow_hyphen_values = true)]
        relay_args: Vec<String>,
        /// Durable-publish phase: devices go offline and publishers publish
        /// one event at a time, each a store commit (seconds, 0 = skip).
        #[arg(long, default_value_t = 0.0)]
        durable_secs: f64,
        /// Concurrent publishers in the durable phase.
        #[arg(long, default_value_t = 256)]
        durable_workers: usize,
        /// Device transport for the relay target: quic, or tcp (TLS 1.3
        /// over TCP, the fallback for networks that block UDP).
        #[arg(long, value_enum, default_value = "quic")]
        transport: TransportArg,
        /// Give the load generator CPU 0 and the server under test CPU 1
        /// (taskset), for the floor and the relay alike, where the machine
        /// has two cores or more.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        pin: bool,
        /// Path of wakewire-relay (default: next to this binary).
        #[arg(long)]
        relay_bin: Option<PathBuf>,
        /// Output directory (report.json, report.md, plots).
        #[arg(long, default_value = "loadtest-out")]
        out: PathBuf,
    },
    /// Deterministic standby simulation of the adaptive keepalive (no
    /// network): keepalives/h vs 3600/T, convergence, reachability, wake
    /// delays, radio energy, for each NAT timeout.
    Standby {
        /// NAT idle timeouts to simulate, seconds.
        #[arg(long, value_delimiter = ',', default_value = "30,60,120,300,900,1800")]
        nat_timeouts: Vec<u64>,
        /// Simulated standby per timeout, hours.
        #[arg(long, default_value_t = 24.0)]
        hours: f64,
        /// Wake events per hour.
        #[arg(long, default_value_t = 2.0)]
        wakes_per_hour: f64,
        /// Seed of the wake events.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Output directory (standby.md, standby-interval.svg).
        #[arg(long, default_value = "loadtest-out")]
        out: PathBuf,
    },
    /// What one hostile device costs the others: good devices' latency and
    /// the relay's memory while flooders send acks for made-up events.
    AckFlood {
        /// Well-behaved devices.
        #[arg(long, default_value_t = 200)]
        devices: usize,
        /// Wakes per second published to them.
        #[arg(long, default_value_t = 500)]
        rate: u64,
        /// Seconds per phase (baseline, flood, after).
        #[arg(long, default_value_t = 10.0)]
        phase_secs: f64,
        /// Flooding devices.
        #[arg(long, default_value_t = 1)]
        flooders: usize,
        /// Path of wakewire-relay (default: next to this binary).
        #[arg(long)]
        relay_bin: Option<PathBuf>,
        /// Output directory (ackflood.md, ackflood.json).
        #[arg(long, default_value = "loadtest-out")]
        out: PathBuf,
    },
    /// Legitimate devices connecting during a ClientHello flood, with and
    /// without the relay's QUIC Retry.
    HelloFlood {
        /// ClientHellos per second.
        #[arg(long, default_value_t = 10_000)]
        flood_rate: u64,
        /// Seconds of flood.
        #[arg(long, default_value_t = 10.0)]
        secs: f64,
        /// Legitimate connection attempts in flight.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Path of wakewire-relay (default: next to this binary).
        #[arg(long)]
        relay_bin: Option<PathBuf>,
        /// Output directory (helloflood.md, helloflood.json).
        #[arg(long, default_value = "loadtest-out")]
        out: PathBuf,
    },
    /// The raw-quinn floor server (started by `compare`; commands on stdin).
    #[command(hide = true)]
    FloorServer {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
}

/// A UDP socket with large buffers (loopback bursts overflow the defaults).
pub(crate) fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    let _ = s.set_recv_buffer_size(8 << 20);
    let _ = s.set_send_buffer_size(8 << 20);
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// The relay binary given, or the one next to this binary.
fn relay_bin_or_sibling(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match given {
        Some(b) => Ok(b),
        None => target::sibling_binary("wakewire-relay"),
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:").map(|v| v.trim().to_owned()))
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} cores ({cpu}), {mem} RAM, Linux {}", kernel.trim())
}

fn now_utc() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WAKEWIRE_LOG")
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::FloorServer { listen, cert, key } => floor::serve(listen, &cert, &key).await,
        Cmd::Standby {
            nat_timeouts,
            hours,
            wakes_per_hour,
            seed,
            out,
        } => {
            let md = standby::standby(&nat_timeouts, hours, wakes_per_hour, seed, &out)?;
            println!(
                "{md}\nwrote {}/standby.md, standby-interval.svg",
                out.display()
            );
            Ok(())
        }
        Cmd::Cluster {
            devices,
            publishes,
            concurrency,
            durable_secs,
            durable_workers,
            failover_devices,
            failover_keepalive_secs,
            relay_bin,
            out,
        } => {
            let relay_bin = relay_bin_or_sibling(relay_bin)?;
            let header = format!(
                "### Run of {}\n\n- command: `wakewire-loadtest {}`\n- machine: {}\n",
                now_utc(),
                std::env::args().skip(1).collect::<Vec<_>>().join(" "),
                machine()
            );
            cluster::run(
                &cluster::ClusterOpts {
                    devices,
                    publishes,
                    concurrency,
                    durable_secs,
                    durable_workers,
                    failover_devices,
                    failover_keepalive: Duration::from_secs_f64(failover_keepalive_secs),
                    relay_bin,
                    out: out.clone(),
                },
                header,
            )
            .await?;
            println!(
                "{}",
                std::fs::read_to_string(out.join("cluster.md")).unwrap_or_default()
            );
            Ok(())
        }
        Cmd::HelloFlood {
            flood_rate,
            secs,
            concurrency,
            relay_bin,
            out,
        } => {
            let relay_bin = relay_bin_or_sibling(relay_bin)?;
            helloflood::run(helloflood::HelloFloodOpts {
                flood_rate,
                secs,
                concurrency,
                relay_bin,
                out: out.clone(),
            })
            .await?;
            println!(
                "{}\nwrote {}/helloflood.md, helloflood.json",
                std::fs::read_to_string(out.join("helloflood.md")).unwrap_or_default(),
                out.display()
            );
            Ok(())
        }
        Cmd::AckFlood {
            devices,
            rate,
            phase_secs,
            flooders,
            relay_bin,
            out,
        } => {
            let relay_bin = relay_bin_or_sibling(relay_bin)?;
            let report = ackflood::run(ackflood::AckFloodOpts {
                devices,
                rate,
                phase: Duration::from_secs_f64(phase_secs),
                flooders,
                relay_bin,
                out: out.clone(),
            })
            .await?;
            println!(
                "{}\nwrote {}/ackflood.md, ackflood.json",
                std::fs::read_to_string(out.join("ackflood.md")).unwrap_or_default(),
                out.display()
            );
            let _ = report;
            Ok(())
        }
        Cmd::Compare {
            target,
            devices,
            channels,
            endpoints,
            concurrency,
            idle_secs,
            push_rate,
            push_secs,
            saturate_outstanding,
            saturate_secs,
            keepalive_secs,
            storm,
            storm_limit_secs,
            publishers,
            publish_api,
            batch,
            relay_quic,
            relay_grpc,
            relay_data_dir,
            relay_pid,
            relay_args,
            durable_secs,
            durable_workers,
            transport,
            pin,
            relay_bin,
            out,
        } => {
            let external = match (relay_quic, relay_grpc, relay_data_dir) {
                (Some(quic), Some(grpc), Some(data_dir)) => Some(runner::External {
                    quic,
                    grpc,
                    data_dir,
                    pid: relay_pid,
                }),
                _ => None,
            };
            let relay_bin = match (&external, relay_bin) {
                (_, Some(p)) => p,
                (Some(_), None) => PathBuf::new(),
                (None, None) => target::sibling_binary("wakewire-relay")?,
            };
            std::fs::create_dir_all(&out)?;
            let work = tempfile_dir(&out)?;
            let opts = Opts {
                devices,
                channels: channels.max(1),
                endpoints,
                concurrency,
                idle: Duration::from_secs_f64(idle_secs),
                push_rate,
                push: Duration::from_secs_f64(push_secs),
                saturate_outstanding,
                saturate: Duration::from_secs_f64(saturate_secs),
                keepalive: Duration::from_secs_f64(keepalive_secs),
                storm,
                storm_limit: Duration::from_secs_f64(storm_limit_secs),
                publishers,
                publish_api,
                batch,
                relay_bin,
                work_dir: work.clone(),
                external,
                relay_args,
                durable: Duration::from_secs_f64(durable_secs),
                tcp: matches!(transport, TransportArg::Tcp),
                pin: pin && std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2,
                durable_workers,
            };
            // Read before pinning narrows this process to one CPU.
            let machine_desc = machine();
            let live = Arc::new(Live::default());
            let progress = runner::spawn_progress(live.clone());
            let floor = if target != Which::Relay {
                Some(
                    runner::run_floor(&opts, live.clone())
                        .await
                        .context("floor run")?,
                )
            } else {
                None
            };
            let relay = if target != Which::Floor {
                Some(
                    runner::run_relay(&opts, live.clone())
                        .await
                        .context("relay run")?,
                )
            } else {
                None
            };
            progress.abort();
            let _ = std::fs::remove_dir_all(&work);
            let report = Report {
                date: now_utc(),
                machine: if opts.pin {
                    format!("{machine_desc}; generator pinned to CPU 0, server to CPU 1 (taskset)")
                } else {
                    machine_desc
                },
                command: std::env::args()
                    .map(|a| if a.contains(' ') { format!("{a:?}") } else { a })
                    .collect::<Vec<_>>()
                    .join(" "),
                params: Params {
                    devices,
                    channels: opts.channels,
                    endpoints,
                    concurrency,
                    idle_s: idle_secs,
                    push_rate,
                    push_s: push_secs,
                    saturate_outstanding,
                    saturate_s: saturate_secs,
                    keepalive_s: keepalive_secs,
                },
                floor,
                relay,
            };
            std::fs::write(out.join("report.json"), serde_json::to_vec_pretty(&report)?)?;
            let md = report.markdown();
            std::fs::write(out.join("report.md"), &md)?;
            let plots = report.plots(&out)?;
            println!(
                "\n{md}\nwrote {}/report.json, report.md, {}",
                out.display(),
                plots.join(", ")
            );
            // Skip tearing down (possibly 100k) simulated clients.
            std::process::exit(0);
        }
    }
}

fn tempfile_dir(out: &std::path::Path) -> anyhow::Result<PathBuf> {
    let dir = out.join(format!("work-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
