//! Control-stream frame codec: each frame is a protobuf varint length
//! followed by that many bytes of an encoded [`Frame`]. The decoder refuses a
//! frame longer than its maximum as soon as the length prefix is read, so a
//! peer can never make it buffer more than `max + 10` bytes.

use bytes::{Buf, Bytes, BytesMut};
use prost::Message;
use thiserror::Error;

use crate::pb::device::{frame::Body, Frame};

/// Longest varint length prefix (a `u64`).
const MAX_VARINT_LEN: usize = 10;

/// Why bytes from the peer are not a valid frame. Every variant is a
/// protocol violation: retrying the same bytes cannot help.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The length prefix announces a frame above the maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    FrameTooLarge {
        /// Announced length.
        len: u64,
        /// Maximum allowed.
        max: usize,
    },
    /// The length prefix is not a valid varint.
    #[error("invalid frame length prefix")]
    BadLength,
    /// The frame bytes are not a valid protobuf `Frame`.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// A valid protobuf message with no frame type this version knows.
    #[error("unknown or empty frame type")]
    UnknownFrame,
}

/// Why a frame could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EncodeError {
    /// The encoded frame would exceed the maximum frame size.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    FrameTooLarge {
        /// Encoded length.
        len: usize,
        /// Maximum allowed.
        max: usize,
    },
}

/// Appends one length-delimited frame to `out`.
pub fn encode_frame(body: Body, max: usize, out: &mut BytesMut) -> Result<(), EncodeError> {
    let frame = Frame { body: Some(body) };
    let len = frame.encoded_len();
    if len > max {
        return Err(EncodeError::FrameTooLarge { len, max });
    }
    out.reserve(len + MAX_VARINT_LEN);
    frame
        .encode_length_delimited(out)
        .map_err(|_| EncodeError::FrameTooLarge { len, max })
}

/// Encodes one frame into its own buffer.
pub fn encode_to_bytes(body: Body, max: usize) -> Result<Bytes, EncodeError> {
    let mut out = BytesMut::new();
    encode_frame(body, max, &mut out)?;
    Ok(out.freeze())
}

/// Incremental decoder: feed it bytes as they arrive, take frames out.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    max: usize,
}

impl FrameDecoder {
    /// A decoder that refuses frames longer than `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            max,
        }
    }

    /// Appends received bytes.
    pub fn extend(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Bytes buffered but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Takes the next complete frame, `Ok(None)` when more bytes are needed.
    /// After an error the stream is unusable.
    pub fn next_frame(&mut self) -> Result<Option<Body>, DecodeError> {
        let Some((len, prefix)) = peek_varint(&self.buf)? else {
            return Ok(None);
        };
        if len > self.max as u64 {
            return Err(DecodeError::FrameTooLarge { len, max: self.max });
        }
        let len = len as usize;
        if self.buf.len() < prefix + len {
            return Ok(None);
        }
        self.buf.advance(prefix);
        let bytes = self.buf.split_to(len);
        let frame =
            Frame::decode(bytes.freeze()).map_err(|e| DecodeError::Malformed(e.to_string()))?;
        frame.body.map(Some).ok_or(DecodeError::UnknownFrame)
    }
}

/// Reads a varint from the front of `buf` without consuming it: the value and
/// its length in bytes, or `None` if the buffer ends inside the varint.
fn peek_varint(buf: &[u8]) -> Result<Option<(u64, usize)>, DecodeError> {
    let mut value: u64 = 0;
    for (i, &b) in buf.iter().take(MAX_VARINT_LEN).enumerate() {
        if i == MAX_VARINT_LEN - 1 && b > 1 {
            return Err(DecodeError::BadLength);
        }
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    if buf.len() >= MAX_VARINT_LEN {
        return Err(DecodeError::BadLength);
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::device::{Ack, Ping};

    fn ping(n: u64) -> Body {
        Body::Ping(Ping {
            nonce: n,
            canary_after_ms: n % 3 * 1000,
        })
    }

    #[test]
    fn round_trips_frames_split_at_every_byte() {
        let mut wire = BytesMut::new();
        for n in 0..5 {
            encode_frame(ping(n * 1_000_000), 1024, &mut wire).unwrap();
        }
        let wire = wire.freeze();
        for split in 0..wire.len() {
            let mut d = FrameDecoder::new(1024);
            let mut got = Vec::new();
            d.extend(&wire[..split]);
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
            d.extend(&wire[split..]);
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
            assert_eq!(got, (0..5).map(|n| ping(n * 1_000_000)).collect::<Vec<_>>());
            assert_eq!(d.buffered(), 0);
        }
    }

    #[test]
    fn oversize_frame_is_refused_from_its_prefix() {
        let mut d = FrameDecoder::new(100);
        d.extend(&[0xe9, 0x07]); // 1001
        assert_eq!(
            d.next_frame(),
            Err(DecodeError::FrameTooLarge {
                len: 1001,
                max: 100
            })
        );
        let big = Body::Ack(Ack {
            event_id: "x".repeat(200),
        });
        assert!(matches!(
            encode_to_bytes(big, 100),
            Err(EncodeError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn garbage_is_malformed_or_bad_length_never_a_panic() {
        let mut d = FrameDecoder::new(1024);
        d.extend(&[0x03, 0xff, 0xff, 0xff]);
        assert!(matches!(d.next_frame(), Err(DecodeError::Malformed(_))));

        let mut d = FrameDecoder::new(1024);
        d.extend(&[0xff; 11]);
        assert_eq!(d.next_frame(), Err(DecodeError::BadLength));

        // A pseudo-random byte soup, decoded at many offsets, must only yield
        // frames, "need more" or an error.
        let mut x: u32 = 0x1234_5678;
        let soup: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        for start in 0..256 {
            let mut d = FrameDecoder::new(1024);
            d.extend(&soup[start..]);
            while let Ok(Some(_)) = d.next_frame() {}
        }
    }

    #[test]
    fn empty_or_unknown_frame_type_is_reported() {
        // Frame with field 15 (unknown to v1): tag (15<<3)|0 = 0x78, value 1.
        let mut d = FrameDecoder::new(1024);
        d.extend(&[0x02, 0x78, 0x01]);
        assert_eq!(d.next_frame(), Err(DecodeError::UnknownFrame));
        let mut d = FrameDecoder::new(1024);
        d.extend(&[0x00]);
        assert_eq!(d.next_frame(), Err(DecodeError::UnknownFrame));
    }
}
