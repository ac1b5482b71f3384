//! The binding-lifetime probe packets (RFC 5780 §4.6 style): a device sends
//! a request from a fresh UDP socket to the relay's probe port; the relay
//! answers after the requested silence to the address it saw. A reply
//! proves the NAT kept that binding for at least the delay.
//!
//! Every packet is 32 bytes: `magic (4) | nonce (8, big endian) | delay ms
//! (4, big endian) | cookie (16)`, magic `WWP2` for requests and `WWR2` for
//! replies, so a reply is never larger than its request (no amplification).
//!
//! **Return routability.** The relay keeps state only for a request that
//! carries a valid cookie: one it gave to the same source IP recently. A
//! device first sends a request with delay 0 and any cookie; the relay
//! answers at once (no state kept) with a cookie for that IP in the reply.
//! Spoofed sources never see the cookie, so they cannot make the relay hold
//! delayed replies for them. Cookies are
//! `HMAC-SHA256(key, ip || time bucket)[..16]`, accepted for the current
//! and the previous bucket ([`COOKIE_BUCKET_SECS`]).

use std::net::IpAddr;

/// Request and reply length.
pub const PROBE_LEN: usize = 32;
/// Longest delay a relay accepts (1 hour).
pub const MAX_PROBE_DELAY_MS: u32 = 3_600_000;
/// Length of a cookie.
pub const COOKIE_LEN: usize = 16;
/// A cookie is valid in the bucket it was made in and the next one.
pub const COOKIE_BUCKET_SECS: u64 = 600;
const REQUEST_MAGIC: &[u8; 4] = b"WWP2";
const REPLY_MAGIC: &[u8; 4] = b"WWR2";

/// A request or reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// Matches a reply to its request.
    pub nonce: u64,
    /// Requested silence, milliseconds.
    pub delay_ms: u32,
    /// Return-routability cookie (requests: the one the relay gave; replies
    /// to delay 0: a fresh one).
    pub cookie: [u8; COOKIE_LEN],
}

impl Probe {
    fn encode(&self, magic: &[u8; 4]) -> [u8; PROBE_LEN] {
        let mut b = [0u8; PROBE_LEN];
        b[..4].copy_from_slice(magic);
        b[4..12].copy_from_slice(&self.nonce.to_be_bytes());
        b[12..16].copy_from_slice(&self.delay_ms.to_be_bytes());
        b[16..].copy_from_slice(&self.cookie);
        b
    }

    fn decode(bytes: &[u8], magic: &[u8; 4]) -> Option<Self> {
        if bytes.len() != PROBE_LEN || &bytes[..4] != magic {
            return None;
        }
        let nonce = u64::from_be_bytes(bytes[4..12].try_into().ok()?);
        let delay_ms = u32::from_be_bytes(bytes[12..16].try_into().ok()?);
        let cookie = bytes[16..].try_into().ok()?;
        Some(Self {
            nonce,
            delay_ms,
            cookie,
        })
    }

    /// Encodes a request.
    pub fn request(&self) -> [u8; PROBE_LEN] {
        self.encode(REQUEST_MAGIC)
    }

    /// Encodes a reply.
    pub fn reply(&self) -> [u8; PROBE_LEN] {
        self.encode(REPLY_MAGIC)
    }

    /// Parses a request; `None` for anything else (including delays over
    /// the maximum).
    pub fn parse_request(bytes: &[u8]) -> Option<Self> {
        Self::decode(bytes, REQUEST_MAGIC).filter(|p| p.delay_ms <= MAX_PROBE_DELAY_MS)
    }

    /// Parses a reply.
    pub fn parse_reply(bytes: &[u8]) -> Option<Self> {
        Self::decode(bytes, REPLY_MAGIC)
    }
}

/// Makes and checks return-routability cookies.
pub struct CookieKey {
    key: ring::hmac::Key,
}

impl std::fmt::Debug for CookieKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CookieKey").finish_non_exhaustive()
    }
}

impl CookieKey {
    /// A key from 32 secret bytes.
    pub fn new(secret: &[u8; 32]) -> Self {
        Self {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret),
        }
    }

    /// The cookie for `ip` at wall-clock `unix_secs`.
    pub fn cookie(&self, ip: IpAddr, unix_secs: u64) -> [u8; COOKIE_LEN] {
        self.for_bucket(ip, unix_secs / COOKIE_BUCKET_SECS)
    }

    /// Whether `cookie` was made for `ip` in this bucket or the previous.
    pub fn check(&self, ip: IpAddr, unix_secs: u64, cookie: &[u8; COOKIE_LEN]) -> bool {
        let bucket = unix_secs / COOKIE_BUCKET_SECS;
        [bucket, bucket.saturating_sub(1)]
            .iter()
            .any(|b| constant_time_eq(&self.for_bucket(ip, *b), cookie))
    }

    fn for_bucket(&self, ip: IpAddr, bucket: u64) -> [u8; COOKIE_LEN] {
        let mut ctx = ring::hmac::Context::with_key(&self.key);
        match ip {
            IpAddr::V4(a) => ctx.update(&a.octets()),
            IpAddr::V6(a) => ctx.update(&a.octets()),
        }
        ctx.update(&bucket.to_be_bytes());
        let tag = ctx.sign();
        let mut c = [0u8; COOKIE_LEN];
        c.copy_from_slice(&tag.as_ref()[..COOKIE_LEN]);
        c
    }
}

/// Compares without an early exit (no timing hint of how much matched).
fn constant_time_eq(a: &[u8; COOKIE_LEN], b: &[u8; COOKIE_LEN]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The /24 (IPv4) or /64 (IPv6) an address belongs to: the unit of
/// per-source limits (one home or one carrier NAT pool is one prefix).
pub fn prefix_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            IpAddr::from([o[0], o[1], o[2], 0])
        }
        IpAddr::V6(a) => {
            let mut o = a.octets();
            o[8..].fill(0);
            IpAddr::from(o)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let p = Probe {
            nonce: 7,
            delay_ms: 1500,
            cookie: [9; COOKIE_LEN],
        };
        assert_eq!(Probe::parse_request(&p.request()), Some(p));
        assert_eq!(Probe::parse_reply(&p.reply()), Some(p));
        assert_eq!(
            Probe::parse_request(&p.reply()),
            None,
            "a reply is not a request"
        );
        assert_eq!(Probe::parse_request(&p.request()[..31]), None);
        assert_eq!(
            Probe::parse_request(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n12345"),
            None
        );
        let long = Probe {
            delay_ms: MAX_PROBE_DELAY_MS + 1,
            ..p
        };
        assert_eq!(Probe::parse_request(&long.request()), None);
    }

    #[test]
    fn cookies_bind_the_address_and_expire() {
        let k = CookieKey::new(&[1; 32]);
        let a: IpAddr = "203.0.113.7".parse().unwrap();
        let b: IpAddr = "203.0.113.8".parse().unwrap();
        let c = k.cookie(a, 1_000_000);
        assert!(k.check(a, 1_000_000, &c));
        assert!(!k.check(b, 1_000_000, &c), "another address");
        assert!(
            k.check(a, 1_000_000 + COOKIE_BUCKET_SECS, &c),
            "next bucket"
        );
        assert!(
            !k.check(a, 1_000_000 + 2 * COOKIE_BUCKET_SECS, &c),
            "expired"
        );
        assert!(
            !CookieKey::new(&[2; 32]).check(a, 1_000_000, &c),
            "another key"
        );
    }

    #[test]
    fn prefixes_group_neighbours() {
        let p = |s: &str| prefix_of(s.parse().unwrap());
        assert_eq!(p("198.51.100.7"), p("198.51.100.200"));
        assert_ne!(p("198.51.100.7"), p("198.51.101.7"));
        assert_eq!(p("2001:db8:1:2:3::1"), p("2001:db8:1:2:ffff::9"));
        assert_ne!(p("2001:db8:1:2::1"), p("2001:db8:1:3::1"));
    }
}
