//! A deterministic standby simulation: a device with the keepalive tuner, a
//! NAT model, a relay model and random wake events, on a simulated clock
//! (hours of standby in milliseconds of CPU). It measures what the tuner
//! costs and buys: keepalives per hour against the 3600/T limit, time to
//! converge, reachability, wake delays, radio energy.
//!
//! The NAT keeps a binding while the device sent something within the last
//! T seconds (only outgoing packets refresh it, RFC 4787 REQ-6); a packet
//! sent after that opens a new binding, with a new external port (which the
//! relay reports in its Pong) or, on a port-preserving NAT, the same one
//! (which nobody can see). The relay's canary, sent just before each
//! keepalive, crosses the NAT only while the binding lives: the device
//! answers it with its keepalive in the same radio wake, and a missing one
//! is a lost binding whatever the port. A probe opens its own binding
//! (shaped like a stream: an exchange, then the delayed request 2.5 s later)
//! and is answered if its delay is shorter than T at that time. Wakes
//! published while the main binding is gone wait for the device's next
//! keepalive (the relay holds them; QUIC migrates to the new binding), so
//! none is lost.

use std::time::{Duration, Instant};

use wakewire_proto::device_session::canary_margin;
use wakewire_proto::relay_session::MIN_CANARY_AFTER;

use crate::energy::{EnergyMeter, RadioModel};
use crate::tuner::{Tuner, TunerConfig, TunerEvent, PROBE_LEAD};

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// NAT idle timeout at the start.
    pub nat_timeout: Duration,
    /// The device moves to another network during the run: (when, that
    /// network's timeout). The app reports the new network, so the tuner
    /// starts over for it (as the SDK does on `network_changed`).
    pub change: Option<(Duration, Duration)>,
    /// The same network's timeout changes silently: (when, new timeout).
    pub silent_change: Option<(Duration, Duration)>,
    /// A NAT that lies: while true for a time, the timeout is this fraction
    /// of the nominal one (timeouts shrink under load).
    pub lying: Option<(Duration, Duration, f64)>,
    /// Simulated standby time.
    pub duration: Duration,
    /// Wake events per hour (Poisson).
    pub wakes_per_hour: f64,
    /// Seed of the event generator.
    pub seed: u64,
    /// Tuner settings.
    pub tuner: TunerConfig,
    /// Radio for the energy estimate.
    pub radio: RadioModel,
    /// Round-trip time to the relay.
    pub rtt: Duration,
    /// The NAT gives a re-created binding the port it had (Linux
    /// `masquerade`, many home routers): a lost binding changes nothing the
    /// device or the relay can see, but the canary.
    pub port_preserving: bool,
    /// The relay sends canaries (the device asks for them).
    pub canary: bool,
    /// The device is on TLS over TCP: no probes, the tuner learns from
    /// the main path (canaries) alone (`Tuner::main_path`).
    pub tcp: bool,
}

impl SimConfig {
    /// Defaults for a NAT timeout `t`: 24 h, 2 wakes/h, LTE, 50 ms RTT.
    pub fn new(t: Duration) -> Self {
        Self {
            nat_timeout: t,
            change: None,
            silent_change: None,
            lying: None,
            duration: Duration::from_secs(24 * 3600),
            wakes_per_hour: 2.0,
            seed: 1,
            tuner: TunerConfig::default(),
            radio: RadioModel::LTE,
            rtt: Duration::from_millis(50),
            port_preserving: false,
            canary: true,
            tcp: false,
        }
    }
}

/// What the simulation measured.
#[derive(Debug, Clone, Default)]
pub struct SimReport {
    /// NAT timeout at the end of the run, s.
    pub nat_timeout_s: f64,
    /// Seconds until the tuner first converged (None: never).
    pub convergence_s: Option<f64>,
    /// Keepalives per hour after convergence (main connection only).
    pub keepalives_per_hour: f64,
    /// The physical limit 3600 / T.
    pub limit_per_hour: f64,
    /// limit / actual (1.0 = perfect).
    pub efficiency: f64,
    /// Final keepalive interval, s.
    pub final_interval_s: f64,
    /// Share of standby time in which a wake reaches the device at once.
    pub reachability: f64,
    /// Main-path bindings lost (the NAT dropped them).
    pub lost_bindings: u64,
    /// Of those, the ones the device noticed.
    pub noticed_losses: u64,
    /// Canaries received.
    pub canaries: u64,
    /// Highest lower bound the tuner ever held, s (it must never exceed
    /// the NAT timeout of the time).
    pub max_lower_s: f64,
    /// Highest ratio of a held lower bound to the NAT timeout of the time
    /// (above 1.0: the tuner believed something false).
    pub max_lower_ratio: f64,
    /// Probes sent.
    pub probes: u64,
    /// Wake events published.
    pub wakes: u64,
    /// Wake events delivered (all of them: the relay holds undeliverable ones).
    pub wakes_delivered: u64,
    /// Delivery delay percentiles, s: p50, p99, max.
    pub wake_delay_s: [f64; 3],
    /// Radio energy per day, J (including idle).
    pub joules_per_day: f64,
    /// Radio-on seconds per day.
    pub radio_on_s_per_day: f64,
    /// Radio wakes (idle-to-connected promotions) in the whole run.
    pub radio_wakes: u64,
    /// Keepalive interval over time: (hours, interval s).
    pub interval_series: Vec<(f64, f64)>,
}

struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Runs one simulation.
pub fn run(cfg: &SimConfig) -> SimReport {
    #[allow(clippy::disallowed_methods)] // the simulated clock's origin
    let base = Instant::now();
    let at = |d: Duration| base + d;
    let timeout_at = |t: Duration| -> Duration {
        let mut nominal = cfg.nat_timeout;
        for (when, new) in cfg.change.into_iter().chain(cfg.silent_change) {
            if t >= when {
                nominal = new;
            }
        }
        if let Some((from, to, factor)) = cfg.lying {
            if t >= from && t < to {
                return nominal.mul_f64(factor);
            }
        }
        nominal
    };
    let fresh_tuner = |now: Instant| {
        if cfg.tcp {
            Tuner::main_path(now, cfg.tuner.clone(), None)
        } else {
            Tuner::new(now, cfg.tuner.clone())
        }
    };
    let mut tuner = fresh_tuner(base);
    let mut meter = EnergyMeter::new(cfg.radio);
    let mut rng = Rng(cfg.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let next_wake = |now: Duration, rng: &mut Rng| -> Duration {
        if cfg.wakes_per_hour <= 0.0 {
            return Duration::MAX;
        }
        let u = rng.next_f64().max(1e-12);
        now + Duration::from_secs_f64(-u.ln() * 3600.0 / cfg.wakes_per_hour)
    };

    let mut t = Duration::ZERO;
    let mut last_out = Duration::ZERO; // main binding refreshed
    let mut last_send = Duration::ZERO; // device's last send on the main connection
    let mut port = 1u64;
    let mut alive_time = Duration::ZERO;
    let mut probe_replies: Vec<(Duration, u64)> = vec![];
    let mut wake_at = next_wake(Duration::ZERO, &mut rng);
    let mut waiting: Vec<Duration> = vec![]; // wakes held by the relay
    let mut delays: Vec<f64> = vec![];
    let mut report = SimReport::default();
    let mut keepalives_after = 0u64;
    let mut converged_at: Option<Duration> = None;
    let mut lost_before_move = 0u64;
    let mut learn_start = Duration::ZERO;
    report
        .interval_series
        .push((0.0, tuner.interval().as_secs_f64()));
    meter.packet(Duration::ZERO);

    // Advances the reachability integral to `now` (binding alive while
    // now - last_out < T).
    let account = |from: Duration, to: Duration, last_out: Duration, alive_time: &mut Duration| {
        let t_nat = timeout_at(from);
        let dead_at = last_out + t_nat;
        if dead_at > from && to > from {
            *alive_time += dead_at.min(to) - from;
        }
    };

    let mut moved = false;
    let mut steps = 0u64;
    let mut nat_lost = 0u64;
    // The canary the last keepalive asked for (its silence), and one that
    // did not come (to report at the keepalive).
    // The canary comes after the keepalive interval (it is the
    // keepalive); the device pings on its own one margin later.
    let arm = |interval: Duration| (cfg.canary && interval >= MIN_CANARY_AFTER).then_some(interval);
    // The device pings right after Welcome, which asks for the first one.
    let mut canary_after: Option<Duration> = arm(tuner.interval());
    let mut missed: Option<Duration> = None;
    while t < cfg.duration {
        steps += 1;
        assert!(steps < 50_000_000, "simulation does not advance at t={t:?}");
        // Send what the tuner wants to probe, from fresh bindings.
        while let Some(p) = tuner.poll_probe(at(t)) {
            report.probes += 1;
            // Shaped like a stream: an exchange, then the delayed request.
            meter.packet(t);
            meter.packet(t + PROBE_LEAD);
            let sent = t + PROBE_LEAD;
            if p.delay < timeout_at(sent + p.delay) {
                probe_replies.push((sent + p.delay + cfg.rtt, p.id));
            }
        }
        let interval = tuner.interval();
        let ping_at = last_send
            + match canary_after.or(missed) {
                Some(a) if interval >= a => a + canary_margin(a, cfg.rtt),
                _ => interval,
            };
        // The relay re-arms the canary on anything the device sends; it
        // arrives one round trip after its silence.
        let canary_at = canary_after.map_or(Duration::MAX, |a| last_send + cfg.rtt + a);
        let tuner_at = tuner
            .poll_timeout()
            .map(|i| i - base)
            .unwrap_or(Duration::MAX);
        let reply_at = probe_replies
            .iter()
            .map(|r| r.0)
            .min()
            .unwrap_or(Duration::MAX);
        let next = ping_at
            .min(canary_at)
            .min(tuner_at)
            .min(reply_at)
            .min(wake_at)
            .min(cfg.duration);
        account(t, next, last_out, &mut alive_time);
        t = next;
        if t >= cfg.duration {
            break;
        }
        if let Some((when, _)) = cfg.change {
            if !moved && t >= when {
                // New network: a fresh binding and a fresh tuner.
                moved = true;
                lost_before_move = tuner.lost_bindings();
                tuner = fresh_tuner(at(t));
                probe_replies.clear();
                last_out = t;
                last_send = t;
                port += 1;
                canary_after = arm(tuner.interval());
                missed = None;
                converged_at = None;
                learn_start = t;
                keepalives_after = 0;
                report
                    .interval_series
                    .push((t.as_secs_f64() / 3600.0, tuner.interval().as_secs_f64()));
                continue;
            }
        }
        let mut keepalive = false;
        if t == reply_at {
            let mut due = vec![];
            probe_replies.retain(|&(when, id)| {
                if when <= t {
                    due.push(id);
                    false
                } else {
                    true
                }
            });
            for id in due {
                meter.packet(t);
                tuner.handle_probe_reply(at(t), id);
            }
        } else if t == tuner_at {
            tuner.handle_timeout(at(t));
        } else if t == wake_at {
            report.wakes += 1;
            if t.saturating_sub(last_out) < timeout_at(t) {
                // Reachable: delivered now, acked (an outgoing packet).
                delays.push(cfg.rtt.as_secs_f64());
                report.wakes_delivered += 1;
                meter.packet(t);
                meter.packet(t + cfg.rtt);
                last_out = t + cfg.rtt;
                last_send = t + cfg.rtt;
            } else {
                waiting.push(t);
            }
            wake_at = next_wake(t, &mut rng);
        } else if t == canary_at {
            let after = canary_after.take().unwrap_or_default();
            let sent = t.saturating_sub(cfg.rtt / 2);
            if sent.saturating_sub(last_out) < timeout_at(sent) {
                // Crossed the NAT: proof, and the keepalive goes now, in
                // the same radio wake.
                report.canaries += 1;
                meter.packet(t);
                tuner.handle_canary(at(t), after);
                keepalive = true;
            } else {
                missed = Some(after);
            }
        } else if t == ping_at {
            if let Some(after) = missed.take() {
                tuner.handle_binding_lost(at(t), after);
            }
            keepalive = true;
        }
        if keepalive {
            let idle = t.saturating_sub(last_send);
            if t.saturating_sub(last_out) >= timeout_at(t) {
                // The NAT opens a new binding.
                nat_lost += 1;
                if !cfg.port_preserving {
                    port += 1;
                }
            }
            canary_after = arm(tuner.interval());
            last_out = t;
            last_send = t;
            meter.packet(t);
            meter.packet(t + cfg.rtt);
            if converged_at.is_some() {
                keepalives_after += 1;
            }
            // Held wakes ride on the re-established path.
            for w in waiting.drain(..) {
                delays.push((t.saturating_sub(w) + cfg.rtt).as_secs_f64());
                report.wakes_delivered += 1;
            }
            tuner.handle_keepalive(at(t + cfg.rtt), idle, &format!("198.51.100.1:{port}"));
        }
        let lower = tuner.learned().lower.as_secs_f64();
        report.max_lower_s = report.max_lower_s.max(lower);
        report.max_lower_ratio = report
            .max_lower_ratio
            .max(lower / timeout_at(t).as_secs_f64());
        while let Some(ev) = tuner.poll_event() {
            match ev {
                TunerEvent::IntervalChanged { interval, .. } => report
                    .interval_series
                    .push((t.as_secs_f64() / 3600.0, interval.as_secs_f64())),
                TunerEvent::Converged { .. } if converged_at.is_none() => converged_at = Some(t),
                _ => {}
            }
        }
    }
    report.interval_series.push((
        cfg.duration.as_secs_f64() / 3600.0,
        tuner.interval().as_secs_f64(),
    ));
    let t_end = timeout_at(cfg.duration);
    report.nat_timeout_s = t_end.as_secs_f64();
    report.convergence_s = converged_at.map(|c| (c - learn_start).as_secs_f64());
    let hours_after = converged_at.map_or(0.0, |c| (cfg.duration - c).as_secs_f64() / 3600.0);
    report.keepalives_per_hour = if hours_after > 0.0 {
        keepalives_after as f64 / hours_after
    } else {
        f64::NAN
    };
    report.limit_per_hour = 3600.0 / t_end.as_secs_f64();
    report.efficiency = report.limit_per_hour / report.keepalives_per_hour;
    report.final_interval_s = tuner.interval().as_secs_f64();
    report.reachability = alive_time.as_secs_f64() / cfg.duration.as_secs_f64();
    report.lost_bindings = nat_lost;
    report.noticed_losses = lost_before_move + tuner.lost_bindings();
    delays.sort_by(f64::total_cmp);
    let pick = |q: f64| {
        delays
            .get(((delays.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    report.wake_delay_s = [pick(0.5), pick(0.99), delays.last().copied().unwrap_or(0.0)];
    let energy = meter.report(cfg.duration);
    report.joules_per_day = energy.joules_per_day();
    report.radio_on_s_per_day = energy.radio_on_s * 86_400.0 / cfg.duration.as_secs_f64();
    report.radio_wakes = energy.wakes;
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    const TS: [u64; 6] = [30, 60, 120, 300, 900, 1800];

    fn assert_targets(r: &SimReport, t: u64) {
        let conv = r.convergence_s.expect("converged");
        assert!(conv <= 3600.0, "T={t}: converged after {conv} s");
        assert!(
            r.efficiency >= 0.87,
            "T={t}: efficiency {:.3} ({:.1}/h vs limit {:.1}/h)",
            r.efficiency,
            r.keepalives_per_hour,
            r.limit_per_hour
        );
        assert!(
            r.reachability >= 0.999,
            "T={t}: reachability {}",
            r.reachability
        );
        assert_eq!(r.wakes, r.wakes_delivered, "T={t}: a wake was lost");
    }

    #[test]
    fn meets_the_targets_for_every_nat_timeout() {
        for t in TS {
            let r = run(&SimConfig::new(Duration::from_secs(t)));
            assert_targets(&r, t);
            assert_eq!(
                r.lost_bindings, 0,
                "T={t}: probing must not cost the main binding"
            );
        }
    }

    #[test]
    fn a_network_change_mid_run_is_learned_again_both_ways() {
        for (from, to) in [(300, 60), (60, 900), (1800, 30)] {
            let mut cfg = SimConfig::new(Duration::from_secs(from));
            cfg.change = Some((Duration::from_secs(6 * 3600), Duration::from_secs(to)));
            let r = run(&cfg);
            assert_targets(&r, to);
            assert_eq!(r.lost_bindings, 0, "{from}->{to}");
        }
    }

    #[test]
    fn a_silent_change_on_the_same_network_is_followed_both_ways() {
        for (from, to) in [(300, 60), (60, 900), (1800, 30)] {
            let mut cfg = SimConfig::new(Duration::from_secs(from));
            cfg.tuner.reprobe_after = Duration::from_secs(2 * 3600);
            cfg.silent_change = Some((Duration::from_secs(6 * 3600), Duration::from_secs(to)));
            let r = run(&cfg);
            assert!(
                r.final_interval_s < to as f64,
                "{from}->{to}: interval {} not below T",
                r.final_interval_s
            );
            assert!(
                r.final_interval_s >= 0.87 * to as f64 || to <= 30,
                "{from}->{to}: interval {} too short",
                r.final_interval_s
            );
            // Shrinking costs at most a couple of lost bindings; growing is
            // found by the periodic re-probe, without losing any.
            assert!(
                r.lost_bindings <= 2,
                "{from}->{to}: {} lost bindings",
                r.lost_bindings
            );
            assert_eq!(r.wakes, r.wakes_delivered);
            assert!(
                r.reachability >= 0.99,
                "{from}->{to}: reachability {}",
                r.reachability
            );
        }
    }

    #[test]
    fn a_nat_that_lies_under_load_costs_few_bindings_and_no_wake() {
        let mut cfg = SimConfig::new(Duration::from_secs(300));
        // Between hours 4 and 6 the NAT keeps bindings only half as long.
        cfg.lying = Some((
            Duration::from_secs(4 * 3600),
            Duration::from_secs(6 * 3600),
            0.5,
        ));
        cfg.wakes_per_hour = 20.0;
        let r = run(&cfg);
        assert!(
            r.lost_bindings >= 1 && r.lost_bindings <= 2,
            "{} lost bindings",
            r.lost_bindings
        );
        assert_eq!(r.wakes, r.wakes_delivered, "no wake is lost, only delayed");
        assert!(r.reachability >= 0.99, "{}", r.reachability);
    }

    #[test]
    fn a_port_preserving_nat_meets_the_same_targets() {
        for t in TS {
            let mut cfg = SimConfig::new(Duration::from_secs(t));
            cfg.port_preserving = true;
            let r = run(&cfg);
            assert_targets(&r, t);
            assert_eq!(r.lost_bindings, 0, "T={t}");
            assert!(r.max_lower_ratio < 1.0, "T={t}: {}", r.max_lower_ratio);
        }
    }

    /// The case: T shrinks from 40 s to 20 s on a port-preserving
    /// NAT. Every lost binding must be noticed (by the missing canary),
    /// the first one at once, and at most two per downward move.
    #[test]
    fn a_shrinking_timeout_on_a_port_preserving_nat_is_seen_at_the_first_lost_binding() {
        for (from, to) in [(40, 20), (300, 60), (1800, 30), (120, 25)] {
            let mut cfg = SimConfig::new(Duration::from_secs(from));
            cfg.port_preserving = true;
            cfg.wakes_per_hour = 20.0;
            cfg.silent_change = Some((Duration::from_secs(6 * 3600), Duration::from_secs(to)));
            let r = run(&cfg);
            assert_eq!(
                r.noticed_losses, r.lost_bindings,
                "{from}->{to}: every loss noticed"
            );
            assert!(
                (1..=2).contains(&r.lost_bindings),
                "{from}->{to}: {} lost bindings",
                r.lost_bindings
            );
            assert!(r.final_interval_s < to as f64, "{from}->{to}");
            assert_eq!(r.wakes, r.wakes_delivered);
            // Unreachable only between the NAT's drop and the keepalive
            // that notices it: at most one old interval, plus one new one
            // for a second loss.
            let dead_s = (1.0 - r.reachability) * cfg.duration.as_secs_f64();
            assert!(
                dead_s <= (from + 2 * to) as f64,
                "{from}->{to}: unreachable for {dead_s:.0} s"
            );
        }
    }

    /// Without canaries the same NAT hides its losses: what the canary buys.
    #[test]
    fn without_canaries_a_port_preserving_nat_hides_lost_bindings() {
        let mut cfg = SimConfig::new(Duration::from_secs(40));
        cfg.port_preserving = true;
        cfg.canary = false;
        cfg.silent_change = Some((Duration::from_secs(6 * 3600), Duration::from_secs(20)));
        let r = run(&cfg);
        assert!(
            r.lost_bindings > r.noticed_losses + 5,
            "{} lost, {} noticed",
            r.lost_bindings,
            r.noticed_losses
        );
    }

    /// T below the start interval from the start: the tuner never believes
    /// in a bound above T, and ends below it.
    #[test]
    fn a_timeout_below_the_start_interval_is_never_overestimated() {
        for t in [16, 18, 20, 24] {
            for port_preserving in [false, true] {
                let mut cfg = SimConfig::new(Duration::from_secs(t));
                cfg.port_preserving = port_preserving;
                let r = run(&cfg);
                assert!(
                    r.max_lower_s < t as f64,
                    "T={t} pp={port_preserving}: lower bound {}",
                    r.max_lower_s
                );
                assert!(r.final_interval_s < t as f64);
                assert!(r.lost_bindings <= 2, "T={t}: {}", r.lost_bindings);
                assert_eq!(
                    r.noticed_losses, r.lost_bindings,
                    "T={t} pp={port_preserving}: {r:?}"
                );
                assert!(r.reachability >= 0.999, "T={t}: {}", r.reachability);
            }
        }
    }

    /// Learning a new network: extra radio wakes on day one against day
    /// two, canaries and probes included: about ten at most (9 at T = 15
    /// min, 12 at 30 min, where each reply above the radio tail is a wake).
    #[test]
    fn learning_a_network_costs_about_ten_extra_radio_wakes_at_most() {
        for t in TS {
            let mut cfg = SimConfig::new(Duration::from_secs(t));
            cfg.wakes_per_hour = 0.0;
            cfg.duration = Duration::from_secs(86_400);
            let day1 = run(&cfg).radio_wakes;
            cfg.duration = Duration::from_secs(2 * 86_400);
            let both = run(&cfg).radio_wakes;
            let extra = day1 as i64 - (both - day1) as i64;
            assert!(extra <= 12, "T={t}: {extra} extra radio wakes on day one");
        }
    }

    /// Over TLS/TCP nothing probes: the interval itself explores, proven
    /// by canaries. It must end below T and close to it, with a few lost
    /// bindings on day one (each exploring step that fails), every one
    /// noticed, no wake lost.
    #[test]
    fn over_tcp_the_main_path_learns_alone() {
        for t in [60, 120, 300, 600, 1800, 7440] {
            let mut cfg = SimConfig::new(Duration::from_secs(t));
            cfg.tcp = true;
            cfg.port_preserving = true;
            cfg.wakes_per_hour = 0.0;
            let r = run(&cfg);
            let limit_s = (t as f64).min(cfg.tuner.max_interval.as_secs_f64() / 0.92);
            assert_eq!(r.probes, 0);
            assert!(
                r.final_interval_s < t as f64,
                "T={t}: {}",
                r.final_interval_s
            );
            assert!(
                r.final_interval_s >= 0.85 * limit_s,
                "T={t}: interval {} s",
                r.final_interval_s
            );
            assert!(r.lost_bindings <= 5, "T={t}: {} lost", r.lost_bindings);
            assert_eq!(r.noticed_losses, r.lost_bindings, "T={t}");
            assert!(r.reachability >= 0.99, "T={t}: {}", r.reachability);
            let conv = r.convergence_s.expect("converged");
            assert!(conv <= 4.0 * 3600.0, "T={t}: converged after {conv} s");
            let mut busy = cfg.clone();
            busy.wakes_per_hour = 20.0;
            let b = run(&busy);
            assert_eq!(b.wakes, b.wakes_delivered, "T={t}");
        }
    }

    #[test]
    fn energy_falls_with_the_nat_timeout() {
        let short = run(&SimConfig::new(Duration::from_secs(30)));
        let long = run(&SimConfig::new(Duration::from_secs(1800)));
        assert!(
            long.joules_per_day < short.joules_per_day / 10.0,
            "{} vs {}",
            long.joules_per_day,
            short.joules_per_day
        );
    }
}
