//! The binding-lifetime probe packets (RFC 5780 §4.6 style): a device sends
//! a request from a fresh UDP socket to the relay's probe port; the relay
//! answers after the requested silence to the address it saw. A reply
//! proves the NAT kept that binding for at least the delay.
//!
//! Request and reply are both 16 bytes (no amplification):
//! `magic (4) | nonce (8, big endian) | delay ms (4, big endian)`, with magic
//! `WWP1` for requests and `WWR1` for replies.

/// Request and reply length.
pub const PROBE_LEN: usize = 16;
/// Longest delay a relay accepts (1 hour).
pub const MAX_PROBE_DELAY_MS: u32 = 3_600_000;
const REQUEST_MAGIC: &[u8; 4] = b"WWP1";
const REPLY_MAGIC: &[u8; 4] = b"WWR1";

/// A request or reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// Matches a reply to its request.
    pub nonce: u64,
    /// Requested silence, milliseconds.
    pub delay_ms: u32,
}

impl Probe {
    fn encode(&self, magic: &[u8; 4]) -> [u8; PROBE_LEN] {
        let mut b = [0u8; PROBE_LEN];
        b[..4].copy_from_slice(magic);
        b[4..12].copy_from_slice(&self.nonce.to_be_bytes());
        b[12..].copy_from_slice(&self.delay_ms.to_be_bytes());
        b
    }

    fn decode(bytes: &[u8], magic: &[u8; 4]) -> Option<Self> {
        if bytes.len() != PROBE_LEN || &bytes[..4] != magic {
            return None;
        }
        let nonce = u64::from_be_bytes(bytes[4..12].try_into().ok()?);
        let delay_ms = u32::from_be_bytes(bytes[12..].try_into().ok()?);
        Some(Self { nonce, delay_ms })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let p = Probe {
            nonce: 7,
            delay_ms: 1500,
        };
        assert_eq!(Probe::parse_request(&p.request()), Some(p));
        assert_eq!(Probe::parse_reply(&p.reply()), Some(p));
        assert_eq!(
            Probe::parse_request(&p.reply()),
            None,
            "a reply is not a request"
        );
        assert_eq!(Probe::parse_request(&p.request()[..15]), None);
        assert_eq!(Probe::parse_request(b"GET / HTTP/1.1\r\n"), None);
        let long = Probe {
            nonce: 1,
            delay_ms: MAX_PROBE_DELAY_MS + 1,
        };
        assert_eq!(Probe::parse_request(&long.request()), None);
    }
}
