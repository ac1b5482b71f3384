//! The SDK's one clock source. Monotonic time comes from tokio, so apps and
//! tests can run the SDK on a paused clock.

use std::time::Instant;

/// Monotonic now.
#[allow(clippy::disallowed_methods)] // the one clock source
pub(crate) fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Wall clock, Unix seconds (when something was learned).
#[allow(clippy::disallowed_methods)] // the one clock source
pub(crate) fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Sleeps until `deadline`, or forever if there is none.
pub(crate) async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Random bits for jitter (the system RNG; the clock's low bits if it
/// fails, which only makes the jitter less random).
#[allow(clippy::disallowed_methods)] // a seed, not a time
pub(crate) fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).is_err() {
        return u64::from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0),
        );
    }
    u64::from_le_bytes(b)
}
