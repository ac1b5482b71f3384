//! Reconnect delays: capped exponential backoff with full jitter (each delay
//! uniform in `[0, min(max, initial * 2^attempt)]`), so a fleet that lost
//! its relay at once does not come back at once. Pure: the randomness is
//! passed in.

use std::time::Duration;

/// Backoff state.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// Starts at `initial`, doubles per attempt, never above `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max: max.max(initial),
            attempt: 0,
        }
    }

    /// The ceiling of the next delay.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The next delay, from a uniformly random `u64`.
    pub fn next_delay(&mut self, random: u64) -> Duration {
        let cap = u64::try_from(self.ceiling().as_millis()).unwrap_or(u64::MAX);
        self.attempt = self.attempt.saturating_add(1);
        Duration::from_millis(random % cap.saturating_add(1))
    }

    /// After a success: start from `initial` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_up_to_the_cap_and_delays_stay_below_it() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let mut ceilings = vec![];
        for i in 0..8u64 {
            let c = b.ceiling();
            ceilings.push(c.as_millis());
            let d = b.next_delay(i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            assert!(d <= c, "{d:?} > {c:?}");
        }
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000, 1000, 1000]);
        assert_eq!(
            b.next_delay(u64::MAX),
            Duration::from_millis(u64::MAX % 1001)
        );
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut b = Backoff::new(Duration::from_secs(10), Duration::from_secs(10));
        let ds: std::collections::HashSet<_> = (0..100u64).map(|r| b.next_delay(r * 97)).collect();
        assert!(ds.len() > 50);
    }
}
