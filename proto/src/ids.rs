//! Identifiers: channel ids derived from a relay secret, and event ids.
//!
//! A channel id is `base64url(HMAC-SHA256(secret, device_id 0x00 name)[..16])`:
//! 128 bits that nobody without the relay's secret can guess or link to a
//! device, and that stay the same for the same device and channel name across
//! reconnects and relay restarts (the secret lives in the data directory), so
//! no table of ids has to be kept to hand them out again.

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use ring::hmac;

/// Length of a channel id string (16 bytes in unpadded base64url).
pub const CHANNEL_ID_LEN: usize = 22;
/// Length of an event id string (16 bytes in hex).
pub const EVENT_ID_LEN: usize = 32;

/// Derives channel ids from the relay's channel secret.
#[derive(Clone)]
pub struct ChannelIds {
    key: hmac::Key,
}

impl std::fmt::Debug for ChannelIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelIds").finish_non_exhaustive()
    }
}

impl ChannelIds {
    /// Uses `secret` (at least 32 random bytes) as the HMAC key.
    pub fn new(secret: &[u8]) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    /// The channel id of `name` on `device_id`.
    pub fn derive(&self, device_id: &str, name: &str) -> String {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(device_id.as_bytes());
        ctx.update(&[0]);
        ctx.update(name.as_bytes());
        URL_SAFE_NO_PAD.encode(&ctx.sign().as_ref()[..16])
    }
}

/// Whether `s` has the shape of a channel id (cheap check before a lookup).
pub fn is_channel_id(s: &str) -> bool {
    s.len() == CHANNEL_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Builds an event id from a millisecond timestamp and 10 random bytes:
/// 32 lowercase hex characters, sortable by creation time, unique without
/// coordination.
pub fn event_id(unix_ms: u64, random: [u8; 10]) -> String {
    let mut raw = [0u8; 16];
    raw[..6].copy_from_slice(&unix_ms.to_be_bytes()[2..]);
    raw[6..].copy_from_slice(&random);
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_ids_are_stable_distinct_and_well_formed() {
        let ids = ChannelIds::new(&[7; 32]);
        let a = ids.derive("dev1", "mail");
        assert_eq!(a, ids.derive("dev1", "mail"));
        assert_ne!(a, ids.derive("dev1", "chat"));
        assert_ne!(a, ids.derive("dev2", "mail"));
        // No ambiguity between ("ab","c") and ("a","bc").
        assert_ne!(ids.derive("ab", "c"), ids.derive("a", "bc"));
        assert_ne!(a, ChannelIds::new(&[8; 32]).derive("dev1", "mail"));
        assert!(is_channel_id(&a));
        assert_eq!(a.len(), CHANNEL_ID_LEN);
        assert!(!is_channel_id("short"));
        assert!(!is_channel_id("aaaaaaaaaaaaaaaaaaaaa="));
    }

    #[test]
    fn event_ids_sort_by_time() {
        let a = event_id(1_000, [0xff; 10]);
        let b = event_id(1_001, [0; 10]);
        assert_eq!(a.len(), EVENT_ID_LEN);
        assert!(a < b);
    }
}
