//! What both sans-IO sessions share: the decoder, the outgoing byte buffer,
//! the event queue, the close state and the wall clock anchor.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::codec::{encode_frame, FrameDecoder};
use crate::pb::device::frame::Body;
use crate::ErrorCode;

/// How and why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    /// Application close code for the QUIC connection.
    pub code: ErrorCode,
    /// Human-readable reason, sent as the close reason.
    pub reason: String,
}

impl Close {
    /// The Close frame that says this on a TCP connection (QUIC says it
    /// in its CONNECTION_CLOSE instead): the last bytes a TCP driver
    /// writes.
    pub fn to_frame(&self) -> Bytes {
        let mut out = BytesMut::new();
        let body = Body::Close(crate::pb::device::Close {
            code: self.code.as_u32(),
            reason: crate::relay_session::truncate_reason(self.reason.clone()),
        });
        // A Close of at most 256 bytes of reason always fits a frame.
        let _ = encode_frame(body, usize::MAX, &mut out);
        out.freeze()
    }
}

/// Maps the driver's monotonic `Instant`s to wall-clock milliseconds from one
/// anchor given at construction, so the session never reads a clock.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WallClock {
    anchor: Instant,
    anchor_unix_ms: u64,
}

impl WallClock {
    pub(crate) fn new(anchor: Instant, anchor_unix_ms: u64) -> Self {
        Self {
            anchor,
            anchor_unix_ms,
        }
    }

    pub(crate) fn unix_ms(&self, now: Instant) -> u64 {
        let since = now.saturating_duration_since(self.anchor);
        self.anchor_unix_ms
            .saturating_add(u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
    }
}

#[derive(Debug)]
pub(crate) struct Core<E> {
    pub(crate) decoder: FrameDecoder,
    out: BytesMut,
    events: VecDeque<E>,
    close: Option<Close>,
    close_taken: bool,
    max_frame: usize,
}

impl<E> Core<E> {
    pub(crate) fn new(max_frame: usize) -> Self {
        Self {
            decoder: FrameDecoder::new(max_frame),
            out: BytesMut::new(),
            events: VecDeque::new(),
            close: None,
            close_taken: false,
            max_frame,
        }
    }

    /// Queues a frame. Frames we build ourselves are bounded well below the
    /// maximum; one that is not is an internal error that closes the session.
    pub(crate) fn send(&mut self, body: Body) {
        if self.close.is_some() {
            return;
        }
        if let Err(e) = encode_frame(body, self.max_frame, &mut self.out) {
            self.fail(ErrorCode::Internal, format!("could not encode frame: {e}"));
        }
    }

    pub(crate) fn push_event(&mut self, e: E) {
        self.events.push_back(e);
    }

    /// Ends the session; the first reason wins.
    pub(crate) fn fail(&mut self, code: ErrorCode, reason: impl Into<String>) {
        if self.close.is_none() {
            self.close = Some(Close {
                code,
                reason: reason.into(),
            });
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.close.is_some()
    }

    pub(crate) fn poll_transmit(&mut self) -> Option<Bytes> {
        (!self.out.is_empty()).then(|| self.out.split().freeze())
    }

    pub(crate) fn poll_event(&mut self) -> Option<E> {
        self.events.pop_front()
    }

    pub(crate) fn poll_close(&mut self) -> Option<Close> {
        if self.close_taken {
            return None;
        }
        let c = self.close.clone()?;
        self.close_taken = true;
        Some(c)
    }

    pub(crate) fn close_reason(&self) -> Option<&Close> {
        self.close.as_ref()
    }
}

/// Milliseconds of a duration, saturating.
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
