//! A radio energy model: turns a trace of the device's sends and receives
//! into joules and radio-on seconds, for the standby simulation and the
//! load-test reports.
//!
//! Each radio is a small state machine: idle; a packet promotes it to the
//! connected state (a promotion delay at promotion power), where it stays
//! until a tail timer that every packet restarts runs out, at tail power.
//! Parameters:
//! - LTE: promotion 260 ms at 1210 mW, tail 11.576 s at 1060 mW, idle
//!   11.4 mW (Huang et al., "A Close Examination of Performance and Power
//!   Characteristics of 4G LTE Networks", MobiSys 2012): ~12.6 J for an
//!   isolated keepalive.
//! - 3G (UMTS): promotion 1.7 s at 580 mW, DCH+FACH tails folded into one
//!   7.3 s tail at 870 mW, idle 6.1 mW, calibrated to the 7.38 J per
//!   isolated transfer and the idle current reported by Haverinen et al.,
//!   "Energy Consumption of Always-On Applications in WCDMA Networks", VTC
//!   2007 (via Huang 2012).
//! - Wi-Fi: promotion 80 ms at 130 mW, tail 210 ms at 120 mW, idle 5 mW
//!   (Huang 2012, Wi-Fi PSM): ~0.04 J per packet.

use std::time::Duration;

/// Power-state parameters of one radio technology.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RadioModel {
    /// Name ("LTE", "3G", "Wi-Fi").
    pub name: &'static str,
    /// Idle to connected delay.
    pub promotion: Duration,
    /// Power during promotion, watts.
    pub promotion_w: f64,
    /// Time the radio stays connected after the last packet.
    pub tail: Duration,
    /// Power while connected, watts.
    pub tail_w: f64,
    /// Power while idle, watts.
    pub idle_w: f64,
}

impl RadioModel {
    /// LTE (Huang et al. 2012).
    pub const LTE: RadioModel = RadioModel {
        name: "LTE",
        promotion: Duration::from_millis(260),
        promotion_w: 1.210,
        tail: Duration::from_millis(11_576),
        tail_w: 1.060,
        idle_w: 0.0114,
    };
    /// 3G / UMTS (Haverinen et al. 2007, via Huang 2012).
    pub const UMTS: RadioModel = RadioModel {
        name: "3G",
        promotion: Duration::from_millis(1_700),
        promotion_w: 0.580,
        tail: Duration::from_millis(7_300),
        tail_w: 0.870,
        idle_w: 0.0061,
    };
    /// Wi-Fi with power save (Huang et al. 2012).
    pub const WIFI: RadioModel = RadioModel {
        name: "Wi-Fi",
        promotion: Duration::from_millis(80),
        promotion_w: 0.130,
        tail: Duration::from_millis(210),
        tail_w: 0.120,
        idle_w: 0.005,
    };

    /// Energy of one isolated packet above idle, joules.
    pub fn isolated_packet_j(&self) -> f64 {
        self.promotion.as_secs_f64() * (self.promotion_w - self.idle_w)
            + self.tail.as_secs_f64() * (self.tail_w - self.idle_w)
    }
}

/// Accumulates energy from packet times.
#[derive(Debug, Clone)]
pub struct EnergyMeter {
    model: RadioModel,
    /// End of the current connected period (since the trace start).
    active_until: Option<Duration>,
    extra_j: f64,
    on: Duration,
    wakes: u64,
    last: Duration,
}

/// What a trace cost.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EnergyReport {
    /// Total joules over the trace, including idle.
    pub joules: f64,
    /// Seconds the radio was promoting or connected.
    pub radio_on_s: f64,
    /// Idle-to-connected promotions (radio wakes).
    pub wakes: u64,
    /// Trace length, seconds.
    pub duration_s: f64,
}

impl EnergyReport {
    /// Joules per day at this rate.
    pub fn joules_per_day(&self) -> f64 {
        if self.duration_s <= 0.0 {
            return 0.0;
        }
        self.joules * 86_400.0 / self.duration_s
    }
}

impl EnergyMeter {
    /// A meter for `model`, trace starting at 0.
    pub fn new(model: RadioModel) -> Self {
        Self {
            model,
            active_until: None,
            extra_j: 0.0,
            on: Duration::ZERO,
            wakes: 0,
            last: Duration::ZERO,
        }
    }

    /// A packet sent or received at `at` (roughly in order: a packet inside
    /// the current connected period only extends it).
    pub fn packet(&mut self, at: Duration) {
        let m = self.model;
        self.last = self.last.max(at);
        match self.active_until {
            Some(until) if at <= until => {
                // Still connected: the tail restarts.
                let new_until = at + m.tail;
                if new_until > until {
                    self.extra_j += (new_until - until).as_secs_f64() * (m.tail_w - m.idle_w);
                    self.on += new_until - until;
                    self.active_until = Some(new_until);
                }
            }
            _ => {
                self.wakes += 1;
                self.extra_j += m.promotion.as_secs_f64() * (m.promotion_w - m.idle_w)
                    + m.tail.as_secs_f64() * (m.tail_w - m.idle_w);
                self.on += m.promotion + m.tail;
                self.active_until = Some(at + m.promotion + m.tail);
            }
        }
    }

    /// Totals over a trace of length `end`.
    pub fn report(&self, end: Duration) -> EnergyReport {
        let end = end.max(self.last);
        EnergyReport {
            joules: self.extra_j + end.as_secs_f64() * self.model.idle_w,
            radio_on_s: self.on.as_secs_f64(),
            wakes: self.wakes,
            duration_s: end.as_secs_f64(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isolated_keepalive_costs_match_the_literature() {
        assert!(
            (RadioModel::LTE.isolated_packet_j() - 12.4).abs() < 0.5,
            "{}",
            RadioModel::LTE.isolated_packet_j()
        );
        assert!(
            (RadioModel::UMTS.isolated_packet_j() - 7.38).abs() < 0.3,
            "{}",
            RadioModel::UMTS.isolated_packet_j()
        );
        assert!(RadioModel::WIFI.isolated_packet_j() < 0.05);
    }

    #[test]
    fn packets_inside_the_tail_share_one_wake() {
        let mut m = EnergyMeter::new(RadioModel::LTE);
        m.packet(Duration::from_secs(0));
        m.packet(Duration::from_secs(1)); // ack of the keepalive: same wake
        m.packet(Duration::from_secs(300));
        let r = m.report(Duration::from_secs(600));
        assert_eq!(r.wakes, 2);
        let per_wake = RadioModel::LTE.isolated_packet_j();
        // The second packet extends the tail by 1 s - 0.26 s of promotion.
        let expected = 2.0 * per_wake + 0.74 * (1.060 - 0.0114) + 600.0 * 0.0114;
        assert!(
            (r.joules - expected).abs() < 1e-6,
            "{} vs {expected}",
            r.joules
        );
        // A 30 s keepalive all day on LTE: ~36 kJ (the figure in our reference).
        let mut day = EnergyMeter::new(RadioModel::LTE);
        for i in 0..2880u64 {
            day.packet(Duration::from_secs(i * 30));
        }
        let j = day.report(Duration::from_secs(86_400)).joules_per_day();
        assert!((34_000.0..38_000.0).contains(&j), "{j}");
    }
}
