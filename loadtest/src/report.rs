//! Reports: the JSON structure, the markdown table with floor ratios and
//! targets, and the SVG plots.

use std::path::Path;

use serde::Serialize;

use crate::fleet::ConnectStats;
use crate::plot::{line_chart, Series};
use crate::procstat::Sample;
use crate::publisher::PublishStats;
use crate::stats::Percentiles;

/// Parameters of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Params {
    /// Simulated devices.
    pub devices: usize,
    /// Channels per device.
    pub channels: usize,
    /// Client UDP endpoints.
    pub endpoints: usize,
    /// Connect concurrency.
    pub concurrency: usize,
    /// Idle phase, s.
    pub idle_s: f64,
    /// Offered push rate, /s.
    pub push_rate: u64,
    /// Push phase, s.
    pub push_s: f64,
    /// Saturation outstanding.
    pub saturate_outstanding: usize,
    /// Saturation phase, s.
    pub saturate_s: f64,
    /// Keepalive interval, s.
    pub keepalive_s: f64,
}

/// Memory and CPU while idle.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IdleStats {
    /// Target RSS before any connection, MiB.
    pub rss_before_mib: f64,
    /// Target RSS with every device connected and idle, MiB.
    pub rss_idle_mib: f64,
    /// (idle - before) / connected, bytes.
    pub rss_per_device_bytes: f64,
    /// Average CPU while idle, % of one core.
    pub cpu_idle_pct: f64,
    /// Devices still connected at the end of the idle phase.
    pub connected_after_idle: usize,
}

/// Push latency and outcome.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PushStats {
    /// Offered rate, /s.
    pub offered_rate: u64,
    /// Publish side.
    pub publish: PublishStats,
    /// Wakes received (relay: callbacks; floor: acks).
    pub received: u64,
    /// Latency (relay: publish -> callback; floor: write -> ack), from the
    /// intended send time.
    pub latency: Percentiles,
    /// Per-second percentiles.
    pub per_second: Vec<(u64, Percentiles)>,
}

/// Saturation throughput.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SaturateStats {
    /// Outstanding requests kept in flight.
    pub outstanding: usize,
    /// Completed (acked) wakes per second.
    pub per_s: f64,
    /// Latency at saturation.
    pub latency: Percentiles,
}

/// Durable publishing to offline devices: every publish is a store commit.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DurableStats {
    /// Concurrent publishers.
    pub workers: usize,
    /// Extra relay flags of the run (e.g. `--store-group-commit false`).
    pub relay_args: Vec<String>,
    /// Answers by status.
    pub statuses: std::collections::BTreeMap<String, u64>,
    /// Accepted (QUEUED) publishes per second.
    pub per_s: f64,
    /// Publish call latency (request to answer).
    pub latency: Percentiles,
}

/// Reconnect storm.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StormStats {
    /// How the relay was stopped ("kill" = SIGKILL, "term" = graceful).
    pub mode: String,
    /// Devices connected before.
    pub devices: usize,
    /// Devices connected again at the end.
    pub recovered: usize,
    /// Seconds from the restart until every device was back (None: not all
    /// came back within the limit).
    pub recovery_s: Option<f64>,
    /// Highest relay RSS during the storm, MiB.
    pub max_rss_mib: f64,
    /// Connected devices over time (s since restart, count).
    pub timeline: Vec<(f64, u64)>,
    /// Disconnections and failed attempts seen by the devices, by kind.
    pub device_errors: std::collections::BTreeMap<String, u64>,
}

/// Server (target process) CPU time per operation, from /proc: independent
/// of how much CPU the load generator takes on the same machine.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CpuStats {
    /// Per established connection during the connect phase, microseconds.
    pub per_handshake_us: f64,
    /// Per wake during the push phase, microseconds.
    pub per_wake_push_us: f64,
    /// Per wake during the saturation phase, microseconds.
    pub per_wake_saturate_us: f64,
}

/// Everything measured against one target.
#[derive(Debug, Clone, Serialize)]
pub struct TargetReport {
    /// "relay" or "floor".
    pub target: String,
    /// Connect phase.
    pub connect: ConnectStats,
    /// Idle phase.
    pub idle: IdleStats,
    /// Push phase.
    pub push: Option<PushStats>,
    /// Saturation phase.
    pub saturate: Option<SaturateStats>,
    /// Storm phase (relay only).
    pub storm: Option<StormStats>,
    /// Durable-publish phase (relay only).
    pub durable: Option<DurableStats>,
    /// Target CPU per operation.
    pub cpu: CpuStats,
    /// Target process samples.
    pub samples: Vec<Sample>,
}

/// A full run: both targets and the machine.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// When (UTC, RFC 3339).
    pub date: String,
    /// Machine description.
    pub machine: String,
    /// The command line.
    pub command: String,
    /// Parameters.
    pub params: Params,
    /// Floor measurements.
    pub floor: Option<TargetReport>,
    /// Relay measurements.
    pub relay: Option<TargetReport>,
}

fn ratio(relay: f64, floor: f64) -> String {
    if floor > 0.0 && relay.is_finite() {
        format!("{:.2}x", relay / floor)
    } else {
        "-".into()
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**not met**"
    }
}

impl Report {
    /// The markdown section for docs/benchmarks.md.
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let p = &self.params;
        md.push_str(&format!(
            "### Run of {}\n\n- machine: {}\n- command: `{}`\n- devices: {}, channels/device: {}, client endpoints: {}, connect concurrency: {}, keepalive: {} s\n\n",
            self.date, self.machine, self.command, p.devices, p.channels, p.endpoints, p.concurrency, p.keepalive_s
        ));
        md.push_str("| metric | floor (raw quinn) | relay | relay/floor | target | verdict |\n|---|---|---|---|---|---|\n");
        let (f, r) = (self.floor.as_ref(), self.relay.as_ref());
        let num = |v: Option<f64>, d: usize| v.map_or("-".into(), |v| format!("{v:.d$}"));
        let row = |md: &mut String,
                   name: &str,
                   fv: Option<f64>,
                   rv: Option<f64>,
                   d: usize,
                   target: &str,
                   ok: Option<bool>| {
            md.push_str(&format!(
                "| {name} | {} | {} | {} | {target} | {} |\n",
                num(fv, d),
                num(rv, d),
                match (rv, fv) {
                    (Some(r), Some(f)) => ratio(r, f),
                    _ => "-".into(),
                },
                ok.map_or("", verdict)
            ));
        };
        let fc = f.map(|t| &t.connect);
        let rc = r.map(|t| &t.connect);
        row(
            &mut md,
            "connected devices",
            fc.map(|c| c.connected as f64),
            rc.map(|c| c.connected as f64),
            0,
            &format!("{} (all)", p.devices),
            rc.map(|c| c.connected == p.devices),
        );
        row(
            &mut md,
            "failed connections",
            fc.map(|c| c.failed as f64),
            rc.map(|c| c.failed as f64),
            0,
            "0",
            rc.map(|c| c.failed == 0),
        );
        let hr = |c: &ConnectStats| c.rate_per_s;
        row(
            &mut md,
            "handshakes/s (held connections)",
            fc.map(hr),
            rc.map(hr),
            0,
            ">= 0.8x floor",
            match (rc, fc) {
                (Some(r), Some(f)) => Some(r.rate_per_s >= 0.8 * f.rate_per_s),
                _ => None,
            },
        );
        row(
            &mut md,
            "server CPU per handshake, us",
            f.map(|t| t.cpu.per_handshake_us),
            r.map(|t| t.cpu.per_handshake_us),
            0,
            "",
            None,
        );
        row(
            &mut md,
            "handshake p50 ms",
            fc.map(|c| c.handshake.p50_ms),
            rc.map(|c| c.handshake.p50_ms),
            2,
            "",
            None,
        );
        row(
            &mut md,
            "handshake p99 ms",
            fc.map(|c| c.handshake.p99_ms),
            rc.map(|c| c.handshake.p99_ms),
            2,
            "",
            None,
        );
        let per_dev = |t: &TargetReport| t.idle.rss_per_device_bytes / 1024.0;
        row(
            &mut md,
            "RSS per idle device, KiB",
            f.map(per_dev),
            r.map(per_dev),
            1,
            "<= 24 KiB",
            r.filter(|t| t.idle.rss_per_device_bytes.is_finite() && t.idle.rss_before_mib > 0.0)
                .map(|t| per_dev(t) <= 24.0),
        );
        row(
            &mut md,
            "idle CPU, % of a core",
            f.map(|t| t.idle.cpu_idle_pct),
            r.map(|t| t.idle.cpu_idle_pct),
            1,
            "",
            None,
        );
        let (fp, rp) = (
            f.and_then(|t| t.push.as_ref()),
            r.and_then(|t| t.push.as_ref()),
        );
        if fp.is_some() || rp.is_some() {
            let rate = rp.or(fp).map_or(0, |p| p.offered_rate);
            row(
                &mut md,
                &format!("wakes/s achieved at {rate}/s offered"),
                fp.map(|p| p.publish.per_s),
                rp.map(|p| p.publish.per_s),
                0,
                "offered (sustained)",
                rp.map(|p| {
                    p.publish.per_s >= 0.98 * p.offered_rate as f64 && p.publish.skipped == 0
                }),
            );
            row(
                &mut md,
                "server CPU per wake at that rate, us",
                f.map(|t| t.cpu.per_wake_push_us),
                r.map(|t| t.cpu.per_wake_push_us),
                1,
                "<= 2x floor",
                match (r, f) {
                    (Some(r), Some(f)) => {
                        Some(r.cpu.per_wake_push_us <= 2.0 * f.cpu.per_wake_push_us)
                    }
                    _ => None,
                },
            );
            let per_core_s = |us: f64| (us > 0.0).then(|| 1e6 / us);
            row(
                &mut md,
                "wakes per server core-second at that rate",
                f.and_then(|t| per_core_s(t.cpu.per_wake_push_us)),
                r.and_then(|t| per_core_s(t.cpu.per_wake_push_us)),
                0,
                "",
                None,
            );
            row(
                &mut md,
                "latency p50 ms",
                fp.map(|p| p.latency.p50_ms),
                rp.map(|p| p.latency.p50_ms),
                2,
                "",
                None,
            );
            row(
                &mut md,
                "latency p90 ms",
                fp.map(|p| p.latency.p90_ms),
                rp.map(|p| p.latency.p90_ms),
                2,
                "",
                None,
            );
            row(
                &mut md,
                "latency p99 ms",
                fp.map(|p| p.latency.p99_ms),
                rp.map(|p| p.latency.p99_ms),
                2,
                "<= 1.5x floor",
                match (rp, fp) {
                    (Some(r), Some(f)) => Some(r.latency.p99_ms <= 1.5 * f.latency.p99_ms),
                    _ => None,
                },
            );
            row(
                &mut md,
                "latency p99.9 ms",
                fp.map(|p| p.latency.p999_ms),
                rp.map(|p| p.latency.p999_ms),
                2,
                "",
                None,
            );
            row(
                &mut md,
                "latency max ms",
                fp.map(|p| p.latency.max_ms),
                rp.map(|p| p.latency.max_ms),
                2,
                "",
                None,
            );
        }
        let (fs, rs) = (
            f.and_then(|t| t.saturate.as_ref()),
            r.and_then(|t| t.saturate.as_ref()),
        );
        if fs.is_some() || rs.is_some() {
            row(
                &mut md,
                &format!(
                    "wakes/s at saturation ({} outstanding)",
                    p.saturate_outstanding
                ),
                fs.map(|s| s.per_s),
                rs.map(|s| s.per_s),
                0,
                ">= 0.8x floor",
                match (rs, fs) {
                    (Some(r), Some(f)) => Some(r.per_s >= 0.8 * f.per_s),
                    _ => None,
                },
            );
            row(
                &mut md,
                "server CPU per wake at saturation, us",
                f.map(|t| t.cpu.per_wake_saturate_us),
                r.map(|t| t.cpu.per_wake_saturate_us),
                1,
                "",
                None,
            );
        }
        if let Some(s) = r.and_then(|t| t.storm.as_ref()) {
            row(
                &mut md,
                &format!("reconnect storm ({}), s until all back", s.mode),
                None,
                s.recovery_s,
                1,
                if s.mode == "term" {
                    "<= 60 s"
                } else {
                    "<= 120 s"
                },
                Some(
                    s.recovery_s
                        .is_some_and(|t| t <= if s.mode == "term" { 60.0 } else { 120.0 }),
                ),
            );
            md.push_str(&format!(
                "| storm: devices back / before | - | {} / {} | - | all | {} |\n| storm: max relay RSS, MiB | - | {:.0} | - | no runaway | |\n",
                s.recovered,
                s.devices,
                verdict(s.recovered == s.devices),
                s.max_rss_mib
            ));
        }
        if let Some(d) = r.and_then(|t| t.durable.as_ref()) {
            md.push_str(&format!(
                "| durable publishes/s to offline devices ({} publishers{}) | - | {:.0} | - |  |  |\n| durable publish latency p50 / p99 ms | - | {:.2} / {:.2} | - |  |  |\n",
                d.workers,
                if d.relay_args.is_empty() { String::new() } else { format!(", relay {}", d.relay_args.join(" ")) },
                d.per_s,
                d.latency.p50_ms,
                d.latency.p99_ms
            ));
        }
        // What the keepalive of this run costs each simulated device's radio
        // (one isolated keepalive per interval; radio energy model).
        let per_day = 86_400.0 / p.keepalive_s.max(1e-3);
        md.push_str(&format!(
            "\nDevice radio energy of the keepalive alone at {} s (energy model, sdk/src/energy.rs): LTE {:.0} J/day, 3G {:.0} J/day, Wi-Fi {:.0} J/day per device. The adaptive keepalive (docs/keepalive.md) lowers this to what the NAT allows.\n",
            p.keepalive_s,
            per_day * wakewire_sdk::energy::RadioModel::LTE.isolated_packet_j(),
            per_day * wakewire_sdk::energy::RadioModel::UMTS.isolated_packet_j(),
            per_day * wakewire_sdk::energy::RadioModel::WIFI.isolated_packet_j(),
        ));
        if let Some(r) = r.filter(|t| t.idle.rss_before_mib > 0.0) {
            let per = r.idle.rss_per_device_bytes.max(1.0);
            let base = r.idle.rss_before_mib * 1024.0 * 1024.0;
            let proj: Vec<String> = [16u64, 32, 64]
                .iter()
                .map(|g| {
                    let n = ((*g as f64) * 1024.0 * 1024.0 * 1024.0 * 0.9 - base) / per;
                    format!("{g} GiB: {:.1} M", n / 1e6)
                })
                .collect();
            md.push_str(&format!(
                "\nProjected idle devices per relay node from the measured RSS per device (90% of memory, relay only): {}.\n",
                proj.join(", ")
            ));
        }
        md
    }

    /// Writes the SVG plots into `dir`; returns their file names.
    pub fn plots(&self, dir: &Path) -> std::io::Result<Vec<String>> {
        std::fs::create_dir_all(dir)?;
        let mut files = vec![];
        let mut write = |name: &str, svg: String| -> std::io::Result<()> {
            std::fs::write(dir.join(name), svg)?;
            files.push(name.to_owned());
            Ok(())
        };
        let pct = |t: &TargetReport, f: fn(&crate::stats::Percentiles) -> f64| -> Vec<(f64, f64)> {
            t.push.as_ref().map_or(vec![], |p| {
                let first = p.per_second.first().map_or(0, |x| x.0);
                p.per_second
                    .iter()
                    .map(|(s, q)| ((s - first) as f64, f(q)))
                    .collect()
            })
        };
        let mut lat = vec![];
        for (label, t) in [("floor", &self.floor), ("relay", &self.relay)] {
            if let Some(t) = t {
                lat.push((format!("{label} p50"), pct(t, |q| q.p50_ms)));
                lat.push((format!("{label} p99"), pct(t, |q| q.p99_ms)));
            }
        }
        let series: Vec<Series> = lat
            .iter()
            .map(|(n, p)| Series {
                name: n,
                points: p.clone(),
            })
            .collect();
        write(
            "latency.svg",
            line_chart(
                "Push latency per second",
                "seconds into the push phase",
                "ms",
                &series,
            ),
        )?;
        let mut rss = vec![];
        for (label, t) in [("floor", &self.floor), ("relay", &self.relay)] {
            if let Some(t) = t {
                let pts: Vec<(f64, f64)> = t
                    .samples
                    .iter()
                    .map(|s| (s.gauge as f64, s.rss_mib))
                    .collect();
                rss.push((label.to_owned(), pts));
            }
        }
        let series: Vec<Series> = rss
            .iter()
            .map(|(n, p)| Series {
                name: n,
                points: p.clone(),
            })
            .collect();
        write(
            "rss.svg",
            line_chart(
                "Server RSS vs connected devices",
                "connected devices",
                "RSS (MiB)",
                &series,
            ),
        )?;
        if let Some(s) = self.relay.as_ref().and_then(|r| r.storm.as_ref()) {
            let pts: Vec<(f64, f64)> = s.timeline.iter().map(|&(t, n)| (t, n as f64)).collect();
            write(
                "storm.svg",
                line_chart(
                    &format!("Reconnect storm ({})", s.mode),
                    "seconds since restart",
                    "connected devices",
                    &[Series {
                        name: "relay",
                        points: pts,
                    }],
                ),
            )?;
        }
        Ok(files)
    }
}
