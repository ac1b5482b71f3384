//! The adaptive keepalive tuner: a pure state machine (time passed in, no
//! sockets) that learns how long the current network's NAT keeps an idle
//! UDP binding (T), and sets the keepalive interval just below it.
//!
//! How it learns, without letting the main connection fail:
//! - **Probes on other bindings.** The driver sends each probe from a fresh
//!   UDP socket (a binding of its own) to the relay's probe port, asking to
//!   be answered after a chosen silence `d`. A reply proves T > d; no reply
//!   by the deadline means T <= d. Many probes run at once.
//! - **Exploration**: a geometric ladder of delays (x1.25) from the start
//!   interval to the maximum, all sent at once.
//! - **Refinement without waiting**: each time a probe answers (T > d), fine
//!   probes (steps of at most x1.03) are sent at once between d and the
//!   next rung still in flight, so the fine answers come about one T after
//!   the coarse one instead of after the whole ladder. A silent probe sets
//!   the upper bound and cancels every probe above it. When the bracket is
//!   within 3% (or the maximum interval is proven), the tuner has
//!   converged: for every T that takes about 2T, and at most one hour for
//!   the 30-minute maximum.
//! - **The main connection** can only contradict: the relay echoes the
//!   address and port it sees in every Pong. A changed port: the binding
//!   expired (QUIC migrated to the new one), so T <= idle: the tuner steps
//!   down at once (to 60% of that idle) and re-probes upwards. The same
//!   port proves nothing (a port-preserving NAT re-creates a dropped
//!   binding on the same port), so it never raises a bound.
//! - **Below the start interval.** The first round also probes the start
//!   interval itself; if it does not survive, the interval drops below it at
//!   once and the tuner probes down to the minimum.
//!
//! Why it is safe: the interval only grows to `safety` (92%) of an idle gap
//! that a probe or the main path has proven to survive, never on a guess;
//! it starts at 25 s, below the 30 s NATs of RFC 9308; and any lost binding
//! cuts it at once. Until a bound is proven the keepalive stays at the
//! start value. Learned bounds are kept per network and re-checked after
//! `reprobe_after`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// A probe first exchanges a packet with the relay, then sends its delayed
/// request this long after: to a stateful NAT (Linux conntrack, OpenWrt)
/// the probe is then a two-way stream, like the main connection, and gets
/// the stream timeout rather than the shorter one of one-shot flows.
pub const PROBE_LEAD: Duration = Duration::from_millis(2500);

/// Tuner settings.
#[derive(Debug, Clone, PartialEq)]
pub struct TunerConfig {
    /// Never keep alive more often than this (RFC 8085: 15 s).
    pub min_interval: Duration,
    /// Never less often than this.
    pub max_interval: Duration,
    /// Interval before anything is learned (safe for 30 s NATs).
    pub start_interval: Duration,
    /// Interval = `safety` x the longest idle proven to survive.
    pub safety: f64,
    /// Ratio between round-1 probe delays.
    pub coarse_ratio: f64,
    /// Converged once the bracket is this tight.
    pub fine_ratio: f64,
    /// Most probes in flight.
    pub max_probes: usize,
    /// Extra wait for a probe reply beyond its delay: fixed part.
    pub grace: Duration,
    /// Re-check learned values this long after learning them.
    pub reprobe_after: Duration,
    /// Refine as soon as a probe answers only below this silence; above
    /// it, wait for the next rung's outcome (fewer radio wakes, slower).
    pub eager_refine_below: Duration,
}

impl Default for TunerConfig {
    fn default() -> Self {
        Self {
            min_interval: Duration::from_secs(15),
            max_interval: Duration::from_secs(29 * 60),
            start_interval: Duration::from_secs(25),
            safety: 0.92,
            coarse_ratio: 1.25,
            fine_ratio: 1.03,
            max_probes: 32,
            grace: Duration::from_secs(2),
            reprobe_after: Duration::from_secs(24 * 3600),
            eager_refine_below: Duration::from_secs(120),
        }
    }
}

/// What the tuner learned about a network: T is in (lower, upper].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Learned {
    /// Longest idle proven to survive.
    pub lower: Duration,
    /// Shortest idle proven to kill the binding (None: none seen up to the
    /// maximum interval).
    pub upper: Option<Duration>,
}

/// A probe the driver must send: from a fresh socket, asking the relay to
/// answer after `delay` of silence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeRequest {
    /// Probe id (echoed in the reply).
    pub id: u64,
    /// Silence to ask for.
    pub delay: Duration,
}

/// Why the keepalive interval changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntervalReason {
    /// Probes bracketed the NAT timeout: the interval moved just below it.
    Learned,
    /// The NAT dropped the connection's binding: the interval stepped down.
    BindingLost,
    /// The app asked for a shorter interval (`Client::decrease_keepalive`).
    DecreasedByApp,
}

/// Something worth telling the app.
#[derive(Debug, Clone, PartialEq)]
pub enum TunerEvent {
    /// The keepalive interval changed.
    IntervalChanged {
        /// New interval.
        interval: Duration,
        /// Why.
        reason: IntervalReason,
    },
    /// The bracket is tight: learning is done for this network.
    Converged {
        /// Final interval.
        interval: Duration,
        /// What was learned.
        learned: Learned,
    },
    /// The main connection's binding expired (its port changed).
    BindingLost {
        /// Idle time after which it was found gone.
        after_idle: Duration,
    },
}

#[derive(Debug, Clone, Copy)]
struct Probe {
    id: u64,
    delay: Duration,
    deadline: Instant,
}

/// The tuner.
#[derive(Debug)]
pub struct Tuner {
    cfg: TunerConfig,
    lower: Duration,
    upper: Option<Duration>,
    interval: Duration,
    probes: Vec<Probe>,
    to_send: VecDeque<Duration>,
    next_id: u64,
    converged: bool,
    learned_at: Option<Instant>,
    observed: Option<String>,
    lost_bindings: u64,
    /// A loss was reported since the last keepalive (a missed canary and
    /// the changed port that follows are one loss).
    loss_pending: bool,
    /// Main-path mode (TLS over TCP, where UDP probes say nothing): the
    /// interval itself explores, proven by canaries.
    main_path: bool,
    events: VecDeque<TunerEvent>,
}

impl Tuner {
    /// A tuner for a network seen for the first time: starts at
    /// `start_interval` and explores.
    pub fn new(now: Instant, cfg: TunerConfig) -> Self {
        let mut t = Self::new_empty(cfg);
        t.plan(now);
        t
    }

    /// A tuner for a network learned before: starts from what was learned
    /// and only re-checks it.
    pub fn resume(now: Instant, cfg: TunerConfig, learned: Learned) -> Self {
        let mut t = Self::new_empty(cfg);
        t.lower = learned.lower;
        t.upper = learned.upper;
        t.interval = t.target();
        t.learned_at = Some(now);
        t.plan(now);
        t
    }

    /// A tuner for a connection no probe can speak for (TLS over TCP: a
    /// UDP probe measures another flow, and UDP may be blocked). It sends
    /// no probes: the keepalive interval itself explores upwards, x1.25 at
    /// a time once a canary proved it, then bisects between the
    /// longest silence a canary crossed and the shortest one a lost binding
    /// ended. Each failed step is one lost binding (so about three per
    /// network, each costing at most one interval of reachability; wakes
    /// are held by the relay, never lost). Starts from `learned` if this
    /// network's TCP path was learned before.
    pub fn main_path(now: Instant, cfg: TunerConfig, learned: Option<Learned>) -> Self {
        let mut t = Self::new_empty(cfg);
        t.main_path = true;
        if let Some(l) = learned {
            t.lower = l.lower;
            t.upper = l.upper;
            t.interval = t.target();
            t.learned_at = Some(now);
            t.converged = t.done();
        }
        t
    }

    fn new_empty(cfg: TunerConfig) -> Self {
        Self {
            lower: Duration::ZERO,
            upper: None,
            interval: cfg.start_interval,
            probes: vec![],
            to_send: VecDeque::new(),
            next_id: 1,
            converged: false,
            learned_at: None,
            observed: None,
            lost_bindings: 0,
            loss_pending: false,
            main_path: false,
            events: VecDeque::new(),
            cfg,
        }
    }

    /// Current keepalive interval.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// What has been learned so far.
    pub fn learned(&self) -> Learned {
        Learned {
            lower: self.lower,
            upper: self.upper,
        }
    }

    /// Whether learning is done.
    pub fn is_converged(&self) -> bool {
        self.converged
    }

    /// Main-path bindings found expired so far.
    pub fn lost_bindings(&self) -> u64 {
        self.lost_bindings
    }

    /// The app saw its own server time out: keep alive more often
    /// (ControlChannelTrigger's DecreaseNetworkKeepAliveInterval).
    pub fn decrease(&mut self, now: Instant) {
        let cut = self.interval.mul_f64(0.75).max(self.cfg.min_interval);
        self.upper = Some(self.upper.map_or(self.interval, |u| u.min(self.interval)));
        self.lower = self.lower.min(cut);
        self.converged = false;
        self.set_interval(cut, IntervalReason::DecreasedByApp);
        self.plan(now);
    }

    /// A keepalive round trip on the main connection completed after `idle`
    /// of silence from the device; `observed` is the address the relay saw.
    pub fn handle_keepalive(&mut self, now: Instant, idle: Duration, observed: &str) {
        let changed = self.observed.as_deref().is_some_and(|o| o != observed);
        self.observed = Some(observed.to_owned());
        if changed && !self.loss_pending {
            self.handle_binding_lost(now, idle);
        }
        self.loss_pending = false;
        // The same port proves nothing: a NAT that preserves ports gives
        // the same one to a binding it had dropped and re-created. Only
        // inbound traffic after a silence (a probe reply, a canary) raises
        // the lower bound; only a missed canary sees a loss on such NATs.
    }

    /// The main connection's binding died after `idle` of silence: its
    /// port changed, or the canary did not arrive.
    pub fn handle_binding_lost(&mut self, now: Instant, idle: Duration) {
        self.loss_pending = true;
        self.lost_bindings += 1;
        self.events
            .push_back(TunerEvent::BindingLost { after_idle: idle });
        if self.main_path && !self.lower.is_zero() && idle > self.lower {
            // An exploring step failed: what was proven still holds.
            self.upper = Some(self.upper.map_or(idle, |u| u.min(idle)));
            let target = self.target();
            self.set_interval(target, IntervalReason::BindingLost);
            self.check_converged(now);
            return;
        }
        self.upper = Some(self.upper.map_or(idle, |u| u.min(idle)));
        // Step straight down to the start interval (safe for the 30 s
        // NATs), or further if even that was too long, then probe
        // upwards again: one lost binding per downward move.
        let floor = self.cfg.start_interval.min(idle.mul_f64(0.6));
        self.lower = self.lower.min(floor);
        // Forget probes that can no longer tell us anything.
        self.probes.retain(|p| p.delay < idle);
        self.to_send.clear();
        self.converged = false;
        let step = floor.max(self.cfg.min_interval);
        self.set_interval(step, IntervalReason::BindingLost);
        self.plan(now);
    }

    /// A canary crossed the NAT after `idle` of silence on the main
    /// connection. Inbound traffic cannot re-create a dropped binding, so
    /// this is proof that T > `idle` for the flow that matters, the main
    /// connection itself.
    pub fn handle_canary(&mut self, now: Instant, idle: Duration) {
        if !self.main_path {
            self.alive(now, idle);
            return;
        }
        if idle > self.lower {
            self.lower = idle;
            if self.upper.is_some_and(|u| u <= idle) {
                self.upper = None;
            }
        }
        if self.check_converged(now) {
            return;
        }
        // A canary crossed this interval's silence: try a longer one.
        let next = match self.upper {
            None => self.interval.mul_f64(self.cfg.coarse_ratio),
            Some(u) => Duration::from_secs_f64((self.lower.as_secs_f64() * u.as_secs_f64()).sqrt()),
        }
        .min(self.cfg.max_interval);
        if next > self.interval {
            self.set_interval(next, IntervalReason::Learned);
        }
    }

    /// How long a learned value stands before it is checked again. On the
    /// main path a check costs lost bindings (exploring steps that fail),
    /// so it runs weekly rather than daily.
    fn recheck_after(&self) -> Duration {
        if self.main_path {
            self.cfg.reprobe_after * 7
        } else {
            self.cfg.reprobe_after
        }
    }

    /// Main-path mode: once the bracket is tight, settles on the safe
    /// interval and reports convergence (once). True when converged.
    fn check_converged(&mut self, now: Instant) -> bool {
        if !self.done() && self.interval < self.cfg.max_interval {
            return false;
        }
        let target = self.target();
        self.set_interval(target, IntervalReason::Learned);
        self.mark_converged(now);
        true
    }

    /// Learning is done for now: reported once.
    fn mark_converged(&mut self, now: Instant) {
        if !self.converged {
            self.converged = true;
            self.learned_at = Some(now);
            self.events.push_back(TunerEvent::Converged {
                interval: self.interval,
                learned: self.learned(),
            });
        }
    }

    /// A probe reply arrived.
    pub fn handle_probe_reply(&mut self, now: Instant, id: u64) {
        if let Some(i) = self.probes.iter().position(|p| p.id == id) {
            let p = self.probes.swap_remove(i);
            if now < p.deadline {
                self.alive(now, p.delay);
            }
        }
    }

    /// Timer expiry: probes past their deadline are silent (dead).
    pub fn handle_timeout(&mut self, now: Instant) {
        let dead: Vec<Probe> = self
            .probes
            .iter()
            .copied()
            .filter(|p| now >= p.deadline)
            .collect();
        self.probes.retain(|p| now < p.deadline);
        for p in dead {
            if self.upper.is_none_or(|u| p.delay < u) {
                self.upper = Some(p.delay);
            }
            self.after_result(now);
        }
        if self
            .learned_at
            .is_some_and(|t| now >= t + self.recheck_after())
            && self.probes.is_empty()
        {
            // Networks change their NATs: look again, upwards and at the edge.
            self.learned_at = Some(now);
            self.converged = false;
            self.upper = None;
            self.plan(now);
        }
    }

    /// The next probe to send, stamped as sent at `now`.
    pub fn poll_probe(&mut self, now: Instant) -> Option<ProbeRequest> {
        if self.probes.len() >= self.cfg.max_probes {
            return None;
        }
        let delay = self.to_send.pop_front()?;
        let id = self.next_id;
        self.next_id += 1;
        let grace = self.cfg.grace + delay.mul_f64(0.02);
        self.probes.push(Probe {
            id,
            delay,
            deadline: now + PROBE_LEAD + delay + grace,
        });
        Some(ProbeRequest { id, delay })
    }

    /// When [`Tuner::handle_timeout`] must run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let probe = self.probes.iter().map(|p| p.deadline).min();
        let reprobe = self.learned_at.map(|t| t + self.recheck_after());
        match (probe, reprobe) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Next event for the app.
    pub fn poll_event(&mut self) -> Option<TunerEvent> {
        self.events.pop_front()
    }

    fn alive(&mut self, now: Instant, idle: Duration) {
        if idle > self.lower {
            self.lower = idle;
            if self.upper.is_some_and(|u| u <= idle) {
                // The NAT got more generous than we thought.
                self.upper = None;
            }
            // Refine above the new bound right away, up to the next rung
            // still in flight (or the upper bound).
            let top = self.cfg.max_interval.div_f64(self.cfg.safety);
            let rung = self
                .probes
                .iter()
                .map(|p| p.delay)
                .chain(self.to_send.iter().copied())
                .filter(|d| *d > idle)
                .min();
            let next = rung
                .into_iter()
                .chain(self.upper)
                .min()
                .unwrap_or(top)
                .min(top);
            // Long silences: each fine reply would be a radio wake of its
            // own, so refine only once the rung above has answered or not
            // (a silent one bounds the search, and the round that follows
            // refines below it); short ones refine at once, their replies
            // share radio tails.
            let lazy = idle >= self.cfg.eager_refine_below && rung.is_some_and(|r| r < top);
            if !lazy {
                self.queue_fine(idle, next);
            }
        }
        self.after_result(now);
    }

    /// Queues probes strictly between `from` and `to`, in equal ratio steps
    /// of at most `fine_ratio`.
    fn queue_fine(&mut self, from: Duration, to: Duration) {
        let span = to.as_secs_f64() / from.as_secs_f64().max(1e-3);
        if span <= self.cfg.fine_ratio * (1.0 + 1e-9) {
            return;
        }
        let steps = (span.ln() / self.cfg.fine_ratio.ln()).ceil().max(1.0);
        let ratio = span.powf(1.0 / steps);
        let mut d = from.mul_f64(ratio);
        while d.as_secs_f64() < to.as_secs_f64() * (1.0 - 1e-9) {
            if !self.to_send.contains(&d) {
                self.to_send.push_back(d);
            }
            d = d.mul_f64(ratio);
        }
    }

    /// Interval for the current bounds.
    fn target(&self) -> Duration {
        if self.lower.is_zero() {
            // Nothing proven yet: the start interval, unless a probe showed
            // it does not survive.
            return match self.upper {
                Some(u) if u <= self.cfg.start_interval => {
                    u.mul_f64(0.6).max(self.cfg.min_interval)
                }
                _ => self.cfg.start_interval,
            };
        }
        self.lower
            .mul_f64(self.cfg.safety)
            .clamp(self.cfg.min_interval, self.cfg.max_interval)
    }

    fn after_result(&mut self, now: Instant) {
        // Only a proven lower bound may raise the interval; drop to it when
        // the bound fell.
        let target = self.target();
        if target != self.interval && (!self.lower.is_zero() || target < self.interval) {
            self.set_interval(target, IntervalReason::Learned);
        }
        // Probes that can no longer narrow the bracket are forgotten.
        let (lower, upper) = (self.lower, self.upper);
        self.probes
            .retain(|p| p.delay > lower && upper.is_none_or(|u| p.delay < u));
        self.to_send
            .retain(|d| *d > lower && upper.is_none_or(|u| *d < u));
        if self.probes.is_empty() && self.to_send.is_empty() {
            if self.done() {
                self.mark_converged(now);
            } else {
                self.plan(now);
            }
        }
    }

    fn done(&self) -> bool {
        let top = self.cfg.max_interval.div_f64(self.cfg.safety);
        match self.upper {
            None => self.lower >= top,
            Some(u) => {
                u.as_secs_f64() <= self.lower.as_secs_f64() * self.cfg.fine_ratio * (1.0 + 1e-9)
                    || self.lower >= top
            }
        }
    }

    /// Queues the next round of probes.
    fn plan(&mut self, _now: Instant) {
        if self.main_path || !self.to_send.is_empty() || !self.probes.is_empty() || self.done() {
            return;
        }
        let top = self.cfg.max_interval.div_f64(self.cfg.safety);
        let from = match (self.lower.is_zero(), self.upper) {
            // Nothing survived even the start interval: look below it,
            // down to the minimum.
            (true, Some(u)) if u <= self.cfg.start_interval => self.cfg.min_interval,
            (true, _) => self.cfg.start_interval,
            (false, _) => self.lower,
        };
        match self.upper {
            None => {
                // Explore: the start interval itself (is it safe?), a
                // coarse ladder up to the top, and the top 10% laddered
                // finely from the start (near the cap each round would cost
                // half an hour).
                if self.lower.is_zero() {
                    self.to_send.push_back(from);
                }
                let mut d = from.mul_f64(self.cfg.coarse_ratio);
                while d < top.mul_f64(0.9) && self.to_send.len() + 5 < self.cfg.max_probes {
                    self.to_send.push_back(d);
                    d = d.mul_f64(self.cfg.coarse_ratio);
                }
                let mut d = top;
                let mut near_top = vec![];
                while d >= top.mul_f64(0.9).max(from) {
                    near_top.push(d);
                    d = d.div_f64(self.cfg.fine_ratio);
                }
                self.to_send.extend(near_top.into_iter().rev());
            }
            Some(upper) => self.queue_fine(from, upper),
        }
    }

    fn set_interval(&mut self, interval: Duration, reason: IntervalReason) {
        if interval != self.interval {
            self.interval = interval;
            self.events
                .push_back(TunerEvent::IntervalChanged { interval, reason });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the tuner against a NAT of timeout `t` (probe replies for
    /// delays below it) until it converges or `limit` passes.
    fn converge(t: Duration, limit: Duration) -> Tuner {
        let start = crate::clock::now();
        let mut tuner = Tuner::new(start, TunerConfig::default());
        let mut now = start;
        let mut pending: Vec<(Instant, u64)> = Vec::new();
        while now < start + limit && !tuner.converged {
            while let Some(p) = tuner.poll_probe(now) {
                if p.delay < t {
                    pending.push((now + p.delay, p.id));
                }
            }
            // Next thing to happen: a reply or the tuner's timer.
            let next_reply = pending.iter().map(|r| r.0).min();
            let next = match (next_reply, tuner.poll_timeout()) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => a.or(b).unwrap_or(now + Duration::from_secs(1)),
            };
            now = next.max(now);
            let (due, later): (Vec<_>, Vec<_>) = pending.into_iter().partition(|r| r.0 <= now);
            pending = later;
            for (_, id) in due {
                tuner.handle_probe_reply(now, id);
            }
            tuner.handle_timeout(now);
        }
        tuner
    }

    #[test]
    fn long_silences_are_refined_once_the_rung_above_has_answered() {
        let now = crate::clock::now();
        let mut t = Tuner::new(now, TunerConfig::default());
        let mut sent = vec![];
        while let Some(p) = t.poll_probe(now) {
            sent.push(p);
        }
        let find = |d: u64| {
            sent.iter()
                .copied()
                .filter(|p| p.delay >= Duration::from_secs(d))
                .min_by_key(|p| p.delay)
                .expect("rung")
        };
        // A short rung answers: refined at once (replies share radio tails).
        let short = find(40);
        t.handle_probe_reply(now + short.delay, short.id);
        assert!(
            t.poll_probe(now + short.delay).is_some(),
            "eager below 120 s"
        );
        while t.poll_probe(now + short.delay).is_some() {}
        // A long rung answers while the one above is in flight: nothing yet.
        let long = find(400);
        let at = now + PROBE_LEAD + long.delay;
        t.handle_probe_reply(at, long.id);
        assert_eq!(t.poll_probe(at), None, "waits for the rung above");
        // The rung above falls silent: the fine round between them starts,
        // and nothing above it is probed any more.
        let above = find(long.delay.as_secs() + 1);
        let silent = now + PROBE_LEAD + above.delay + Duration::from_secs(60);
        t.handle_timeout(silent);
        let fine = t.poll_probe(silent).expect("fine round");
        assert!(
            fine.delay > long.delay && fine.delay < above.delay,
            "{fine:?}"
        );
    }

    #[test]
    fn a_same_port_keepalive_proves_nothing() {
        let now = crate::clock::now();
        let mut tuner = Tuner::new(now, TunerConfig::default());
        tuner.handle_keepalive(now, Duration::from_secs(25), "203.0.113.1:4000");
        tuner.handle_keepalive(now, Duration::from_secs(40), "203.0.113.1:4000");
        assert_eq!(
            tuner.learned().lower,
            Duration::ZERO,
            "raised by an ambiguous signal"
        );
        // A changed port still proves a lost binding.
        tuner.handle_keepalive(now, Duration::from_secs(25), "203.0.113.1:4001");
        assert_eq!(tuner.learned().upper, Some(Duration::from_secs(25)));
    }

    #[test]
    fn a_nat_below_the_start_interval_is_found_from_below() {
        let t = Duration::from_secs(20);
        let tuner = converge(t, Duration::from_secs(3600));
        assert!(tuner.converged, "did not converge");
        let learned = tuner.learned();
        assert!(
            learned.lower < t,
            "learned lower bound {:?} above T",
            learned.lower
        );
        assert!(learned.lower >= t.mul_f64(0.9), "{learned:?}");
        assert!(tuner.interval() < t, "interval {:?}", tuner.interval());
    }

    #[test]
    fn an_unsafe_start_interval_is_left_as_soon_as_a_probe_shows_it() {
        let start = crate::clock::now();
        let cfg = TunerConfig::default();
        let mut tuner = Tuner::new(start, cfg.clone());
        let mut probes = vec![];
        while let Some(p) = tuner.poll_probe(start) {
            probes.push(p);
        }
        assert_eq!(
            probes[0].delay, cfg.start_interval,
            "the start interval is probed first"
        );
        // Nothing answers (T < 25 s): after the first deadline the interval
        // is below the start interval.
        let first_deadline = tuner.poll_timeout().expect("probes in flight");
        tuner.handle_timeout(first_deadline);
        assert!(
            tuner.interval() < cfg.start_interval,
            "{:?}",
            tuner.interval()
        );
        assert!(tuner.interval() >= cfg.min_interval);
    }

    #[test]
    fn usual_nats_still_converge_just_below_their_timeout() {
        for secs in [30u64, 120, 600] {
            let t = Duration::from_secs(secs);
            let tuner = converge(t, Duration::from_secs(4 * 3600));
            assert!(tuner.converged, "T = {t:?}");
            let i = tuner.interval();
            assert!(i < t && i >= t.mul_f64(0.85), "T = {t:?}: interval {i:?}");
        }
    }
}
