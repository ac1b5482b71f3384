//! Latency recording: an HDR histogram overall plus one per second, for
//! percentiles over time.

use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Percentiles of a latency distribution, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Maximum.
    pub max_ms: f64,
}

fn new_hist() -> Histogram<u64> {
    // 1 us .. 10 min, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).unwrap_or_else(|_| unreachable!("valid bounds"))
}

/// Percentiles of a histogram of microseconds.
pub fn percentiles(h: &Histogram<u64>) -> Percentiles {
    let ms = |us: u64| us as f64 / 1000.0;
    Percentiles {
        count: h.len(),
        p50_ms: ms(h.value_at_quantile(0.50)),
        p90_ms: ms(h.value_at_quantile(0.90)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        p999_ms: ms(h.value_at_quantile(0.999)),
        max_ms: ms(h.max()),
    }
}

/// Thread-safe latency recorder with per-second windows.
#[derive(Debug)]
pub struct Recorder {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    total: Histogram<u64>,
    windows: Vec<Histogram<u64>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner {
                total: new_hist(),
                windows: Vec::new(),
            }),
        }
    }
}

impl Recorder {
    /// Records one latency observed at `at` (time since the run started).
    pub fn record(&self, latency: Duration, at: Duration) {
        let us = u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .clamp(1, 600_000_000);
        let Ok(mut g) = self.inner.lock() else { return };
        g.total.saturating_record(us);
        let sec = at.as_secs() as usize;
        if sec < 24 * 3600 {
            while g.windows.len() <= sec {
                g.windows.push(new_hist());
            }
            g.windows[sec].saturating_record(us);
        }
    }

    /// Overall percentiles.
    pub fn summary(&self) -> Percentiles {
        self.inner
            .lock()
            .map(|g| percentiles(&g.total))
            .unwrap_or_default()
    }

    /// Percentiles per second (seconds with no sample are skipped).
    pub fn per_second(&self) -> Vec<(u64, Percentiles)> {
        let Ok(g) = self.inner.lock() else {
            return vec![];
        };
        g.windows
            .iter()
            .enumerate()
            .filter(|(_, h)| !h.is_empty())
            .map(|(i, h)| (i as u64, percentiles(h)))
            .collect()
    }

    /// Clears everything (between phases).
    pub fn reset(&self) {
        if let Ok(mut g) = self.inner.lock() {
            g.total.reset();
            g.windows.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_recorded_values() {
        let r = Recorder::default();
        for i in 1..=1000u64 {
            r.record(Duration::from_micros(i * 10), Duration::from_millis(i));
        }
        let s = r.summary();
        assert_eq!(s.count, 1000);
        assert!((s.p50_ms - 5.0).abs() < 0.05, "{s:?}");
        assert!((s.p99_ms - 9.9).abs() < 0.05, "{s:?}");
        assert!((s.max_ms - 10.0).abs() < 0.05, "{s:?}");
        assert_eq!(r.per_second().len(), 2);
        r.reset();
        assert_eq!(r.summary().count, 0);
    }
}
