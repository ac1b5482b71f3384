//! Per-publisher rate limits and quotas: how many publishes per second a
//! publisher token may send (a token bucket with a burst), and how many
//! WatchDeliveries streams it may hold. (Bytes stored per token are counted
//! by the store's writer, where events are stored and finished.) Sans-IO:
//! the time is passed in.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;

/// Limits per publisher token.
#[derive(Debug, Clone)]
pub struct QuotaConfig {
    /// Publishes per second.
    pub rate_per_sec: u32,
    /// Publishes at once above the rate.
    pub burst: u32,
    /// WatchDeliveries streams at once.
    pub max_watchers: u32,
    /// Bytes (payloads and keys) queued in the store at once.
    pub max_stored_bytes: u64,
}

/// Over the rate: try again after this long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAfter(pub Duration);

#[derive(Debug)]
struct Scope {
    tokens: f64,
    at: Instant,
    watchers: u32,
}

/// The limits' state for every publisher token seen recently.
#[derive(Debug)]
pub struct Quotas {
    config: QuotaConfig,
    scopes: DashMap<String, Scope>,
}

impl Quotas {
    /// Empty state.
    pub fn new(config: QuotaConfig) -> Self {
        Self {
            config,
            scopes: DashMap::new(),
        }
    }

    /// The limits.
    pub fn config(&self) -> &QuotaConfig {
        &self.config
    }

    /// Takes `n` publishes from `scope`'s bucket at `now`.
    pub fn take(&self, scope: &str, n: u32, now: Instant) -> Result<(), RetryAfter> {
        let rate = f64::from(self.config.rate_per_sec);
        let burst = f64::from(self.config.burst);
        let mut s = self.scopes.entry(scope.to_owned()).or_insert(Scope {
            tokens: burst,
            at: now,
            watchers: 0,
        });
        let elapsed = now.saturating_duration_since(s.at).as_secs_f64();
        s.tokens = (s.tokens + elapsed * rate).min(burst);
        s.at = now;
        let want = f64::from(n);
        if want > s.tokens {
            let missing = want.min(burst) - s.tokens;
            return Err(RetryAfter(Duration::from_secs_f64(
                (missing / rate).max(0.001),
            )));
        }
        s.tokens -= want;
        Ok(())
    }

    /// Admits one more watcher of `scope`, released when the guard drops.
    pub fn watch(self: &Arc<Self>, scope: &str, now: Instant) -> Option<WatcherGuard> {
        let mut s = self.scopes.entry(scope.to_owned()).or_insert(Scope {
            tokens: f64::from(self.config.burst),
            at: now,
            watchers: 0,
        });
        if s.watchers >= self.config.max_watchers {
            return None;
        }
        s.watchers += 1;
        Some(WatcherGuard {
            quotas: self.clone(),
            scope: scope.to_owned(),
        })
    }

    /// Forgets scopes with a full bucket and no watcher (idle publishers).
    pub fn prune(&self, now: Instant) {
        let rate = f64::from(self.config.rate_per_sec);
        let burst = f64::from(self.config.burst);
        self.scopes.retain(|_, s| {
            let tokens = s.tokens + now.saturating_duration_since(s.at).as_secs_f64() * rate;
            s.watchers > 0 || tokens < burst
        });
    }

    /// Scopes tracked.
    pub fn len(&self) -> usize {
        self.scopes.len()
    }

    /// Whether no scope is tracked.
    pub fn is_empty(&self) -> bool {
        self.scopes.is_empty()
    }
}

/// One admitted WatchDeliveries stream.
#[derive(Debug)]
pub struct WatcherGuard {
    quotas: Arc<Quotas>,
    scope: String,
}

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        if let Some(mut s) = self.quotas.scopes.get_mut(&self.scope) {
            s.watchers = s.watchers.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quotas() -> Arc<Quotas> {
        Arc::new(Quotas::new(QuotaConfig {
            rate_per_sec: 10,
            burst: 20,
            max_watchers: 2,
            max_stored_bytes: 1000,
        }))
    }

    #[allow(clippy::disallowed_methods)] // the simulated clock's origin
    fn t0() -> Instant {
        Instant::now()
    }

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let q = quotas();
        let t = t0();
        assert_eq!(q.take("a", 20, t), Ok(()));
        let RetryAfter(wait) = q.take("a", 1, t).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        assert_eq!(
            q.take("b", 1, t),
            Ok(()),
            "another publisher is not affected"
        );
        assert_eq!(q.take("a", 1, t + wait), Ok(()));
        assert!(q.take("a", 10, t + wait).is_err());
        assert_eq!(q.take("a", 10, t + wait + Duration::from_secs(1)), Ok(()));
        // Idle and refilled: forgotten.
        q.prune(t + Duration::from_secs(60));
        assert!(q.is_empty());
    }

    #[test]
    fn watchers_are_counted_and_released() {
        let q = quotas();
        let t = t0();
        let a = q.watch("a", t).unwrap();
        let _b = q.watch("a", t).unwrap();
        assert!(q.watch("a", t).is_none());
        drop(a);
        assert!(q.watch("a", t).is_some());
    }
}
