//! `wakewire-loadtest standby`: runs the deterministic standby simulation
//! (SDK keepalive tuner + NAT model + relay model + radio energy model) for
//! a list of NAT timeouts and reports the keepalive targets, with a plot of
//! the keepalive interval over time.

use std::path::Path;
use std::time::Duration;

use wakewire_sdk::energy::RadioModel;
use wakewire_sdk::sim::{run, SimConfig};

use crate::plot::{line_chart, Series};

/// Runs the simulation for each timeout; writes `standby.md` and
/// `standby-interval.svg` into `out`; returns the markdown.
pub fn standby(
    timeouts: &[u64],
    hours: f64,
    wakes_per_hour: f64,
    seed: u64,
    out: &Path,
) -> anyhow::Result<String> {
    std::fs::create_dir_all(out)?;
    let mut rows = vec![];
    for &t in timeouts {
        let mut cfg = SimConfig::new(Duration::from_secs(t));
        cfg.duration = Duration::from_secs_f64(hours * 3600.0);
        cfg.wakes_per_hour = wakes_per_hour;
        cfg.seed = seed;
        let r = run(&cfg);
        // Keepalive efficiency is measured without wake traffic (a device's
        // acks also refresh its binding, which would flatter the figure).
        let mut quiet = cfg.clone();
        quiet.wakes_per_hour = 0.0;
        let q = run(&quiet);
        // The same day with a fixed 25 s keepalive (common default), for scale.
        let mut fixed = cfg.clone();
        fixed.tuner.min_interval = Duration::from_secs(25);
        fixed.tuner.max_interval = Duration::from_secs(25);
        let baseline = run(&fixed);
        rows.push((t, q, r, baseline));
    }
    let mut md = format!(
        "Standby simulation: {hours} h per NAT timeout, {wakes_per_hour} wake events/h (Poisson, seed {seed}), LTE radio model (Huang et al. 2012), 50 ms RTT.\n\n\
         Efficiency columns come from a run without wake traffic; reachability, delays and energy from the run with it.\n\n\
         | NAT timeout T | converged after | keepalives/h | limit 3600/T | efficiency | interval | reachability | lost bindings | probes | wake delay p50 / p99 / max | LTE J/day | J/day with fixed 25 s |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n"
    );
    for (t, q, r, b) in &rows {
        let ok = |c: bool| if c { "" } else { " **(target missed)**" };
        let conv = q
            .convergence_s
            .map_or("never".to_owned(), |c| format!("{:.1} min", c / 60.0));
        md.push_str(&format!(
            "| {t} s | {conv}{} | {:.2} | {:.2} | {:.3}{} | {:.0} s | {:.4}%{} | {} | {} | {:.2} / {:.2} / {:.2} s | {:.0} | {:.0} |\n",
            ok(q.convergence_s.is_some_and(|c| c <= 3600.0)),
            q.keepalives_per_hour,
            q.limit_per_hour,
            q.efficiency,
            ok(q.efficiency >= 0.87),
            q.final_interval_s,
            r.reachability * 100.0,
            ok(r.reachability >= 0.999),
            r.lost_bindings + q.lost_bindings,
            q.probes,
            r.wake_delay_s[0],
            r.wake_delay_s[1],
            r.wake_delay_s[2],
            r.joules_per_day,
            b.joules_per_day,
        ));
    }
    md.push_str(&format!(
        "\nTargets: efficiency (limit / actual keepalives per hour after convergence) >= 0.87, convergence <= 60 min, reachability >= 99.9%, no wake lost ({} of {} delivered in all runs). One isolated LTE keepalive costs {:.1} J in this model.\n",
        rows.iter().map(|r| r.2.wakes_delivered).sum::<u64>(),
        rows.iter().map(|r| r.2.wakes).sum::<u64>(),
        RadioModel::LTE.isolated_packet_j()
    ));
    let series_data: Vec<(String, Vec<(f64, f64)>)> = rows
        .iter()
        .map(|(t, q, _, _)| (format!("T = {t} s"), step(&q.interval_series)))
        .collect();
    let series: Vec<Series> = series_data
        .iter()
        .map(|(n, p)| Series {
            name: n,
            points: p.clone(),
        })
        .collect();
    std::fs::write(
        out.join("standby-interval.svg"),
        line_chart(
            "Keepalive interval during standby",
            "hours",
            "interval (s)",
            &series,
        ),
    )?;
    md.push_str(&nat_behaviours(seed));
    std::fs::write(out.join("standby.md"), &md)?;
    Ok(md)
}

/// NATs that preserve ports and timeouts that shrink: lost bindings (real
/// and noticed), reachability, and radio cost on the first day (learning)
/// against the second (steady state), canaries included.
fn nat_behaviours(seed: u64) -> String {
    let mut md = String::from(
        "\n### NAT behaviours: port-preserving NATs, shrinking timeouts, canaries\n\n\
         Two simulated days with no wake traffic (so every radio wake is a keepalive, a canary or a probe), then the same two days with 20 wakes/h for reachability and delays. \
         Lost bindings are the NAT's (real), noticed ones are those the device reported. Radio wakes per hour on day 2 against the 3600/T limit (target <= 1.15x).\n\n\
         | NAT | T | canary | lost / noticed | reachability | wake delay max | radio wakes/h day 1 | day 2 | limit | day 2 / limit | extra wakes on day 1 | LTE J day 1 / day 2 |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let day = Duration::from_secs(86_400);
    // (name, T, shrinks to, port-preserving, canary, TLS/TCP)
    type Case<'a> = (&'a str, u64, Option<u64>, bool, bool, bool);
    let cases: Vec<Case> = vec![
        ("port-randomizing", 30, None, false, true, false),
        ("port-preserving", 30, None, true, true, false),
        ("port-preserving", 60, None, true, true, false),
        ("port-preserving", 120, None, true, true, false),
        ("port-preserving", 300, None, true, true, false),
        ("port-preserving", 900, None, true, true, false),
        ("port-preserving", 1800, None, true, true, false),
        ("port-preserving", 20, None, true, true, false),
        (
            "port-preserving, 40 -> 20 s at 6 h",
            40,
            Some(20),
            true,
            true,
            false,
        ),
        (
            "port-preserving, 40 -> 20 s at 6 h",
            40,
            Some(20),
            true,
            false,
            false,
        ),
        (
            "port-preserving, 300 -> 60 s at 6 h",
            300,
            Some(60),
            true,
            true,
            false,
        ),
        (
            "port-randomizing, 1800 -> 30 s at 6 h",
            1800,
            Some(30),
            false,
            true,
            false,
        ),
        (
            "TLS/TCP, no probes (main path)",
            300,
            None,
            true,
            true,
            true,
        ),
        (
            "TLS/TCP, no probes (main path)",
            1800,
            None,
            true,
            true,
            true,
        ),
        (
            "TLS/TCP, no probes (main path)",
            7440,
            None,
            true,
            true,
            true,
        ),
    ];
    for (name, t, shrink, preserving, canary, tcp) in cases {
        let mut cfg = SimConfig::new(Duration::from_secs(t));
        cfg.port_preserving = preserving;
        cfg.canary = canary;
        cfg.tcp = tcp;
        cfg.seed = seed;
        cfg.silent_change =
            shrink.map(|to| (Duration::from_secs(6 * 3600), Duration::from_secs(to)));
        cfg.wakes_per_hour = 0.0;
        let mut one = cfg.clone();
        one.duration = day;
        let d1 = run(&one);
        let mut two = cfg.clone();
        two.duration = day * 2;
        let d12 = run(&two);
        let mut busy = two.clone();
        busy.wakes_per_hour = 20.0;
        let b = run(&busy);
        // The longest interval allowed (29 min) bounds what can be reached.
        let end_t = (shrink.unwrap_or(t) as f64).min(29.0 * 60.0 / 0.92);
        let limit = 3600.0 / end_t;
        let w1 = d1.radio_wakes as f64 / 24.0;
        let w2 = (d12.radio_wakes - d1.radio_wakes) as f64 / 24.0;
        let j1 = d1.joules_per_day;
        let j2 = d12.joules_per_day * 2.0 - j1;
        md.push_str(&format!(
            "| {name} | {t} s | {} | {} / {} | {:.4}% | {:.1} s | {w1:.1} | {w2:.1} | {limit:.1} | {:.2} | {} | {j1:.0} / {j2:.0} |\n",
            if canary { "on" } else { "off" },
            b.lost_bindings,
            b.noticed_losses,
            b.reachability * 100.0,
            b.wake_delay_s[2],
            w2 / limit,
            // Learning's cost; meaningless when T changes during day 1.
            if shrink.is_some() {
                "-".to_owned()
            } else {
                format!("{:.0}", (w1 - w2) * 24.0)
            },
        ));
    }
    md
}

/// A step plot from change points.
fn step(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = vec![];
    for &(x, y) in points {
        if let Some(&(_, prev)) = out.last() {
            out.push((x, prev));
        }
        out.push((x, y));
    }
    out
}
