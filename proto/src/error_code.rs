//! QUIC application error codes used to close a device connection. This is
//! the one place where reasons map to wire codes; `docs/protocol.md` lists
//! them for other implementations.

/// Why a device connection was closed (the QUIC `APPLICATION_CLOSE` code).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ErrorCode {
    /// Orderly close, nothing wrong.
    NoError = 0x0,
    /// The peer sent something the protocol forbids: an oversize frame, bytes
    /// that are not a valid frame, an unknown frame type, or a frame in the
    /// wrong state. The reason string says which.
    ProtocolViolation = 0x1,
    /// The device speaks a protocol version the relay does not.
    UnsupportedVersion = 0x2,
    /// The device credential is missing, malformed, badly signed or expired.
    Unauthorized = 0x3,
    /// The relay is shutting down or shedding load; reconnect later.
    GoingAway = 0x4,
    /// The device did not send Hello in time.
    HelloTimeout = 0x5,
    /// The peer stopped answering keepalives.
    KeepaliveTimeout = 0x6,
    /// Another connection authenticated as the same device.
    Replaced = 0x7,
    /// The relay failed internally; retrying may help.
    Internal = 0x8,
}

impl ErrorCode {
    /// Every code, in numeric order.
    pub const ALL: [ErrorCode; 9] = [
        ErrorCode::NoError,
        ErrorCode::ProtocolViolation,
        ErrorCode::UnsupportedVersion,
        ErrorCode::Unauthorized,
        ErrorCode::GoingAway,
        ErrorCode::HelloTimeout,
        ErrorCode::KeepaliveTimeout,
        ErrorCode::Replaced,
        ErrorCode::Internal,
    ];

    /// The numeric wire value.
    pub fn as_u32(self) -> u32 {
        self as u32
    }

    /// Parses a wire value; `None` for codes this version does not know.
    pub fn from_u32(code: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_u32() == code)
    }

    /// Short stable name, as used in logs and docs.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::NoError => "NO_ERROR",
            ErrorCode::ProtocolViolation => "PROTOCOL_VIOLATION",
            ErrorCode::UnsupportedVersion => "UNSUPPORTED_VERSION",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::GoingAway => "GOING_AWAY",
            ErrorCode::HelloTimeout => "HELLO_TIMEOUT",
            ErrorCode::KeepaliveTimeout => "KEEPALIVE_TIMEOUT",
            ErrorCode::Replaced => "REPLACED",
            ErrorCode::Internal => "INTERNAL",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (0x{:x})", self.name(), self.as_u32())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_unknown_is_none() {
        for c in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_u32(c.as_u32()), Some(c));
        }
        assert_eq!(ErrorCode::from_u32(0xdead), None);
        assert_eq!(
            ErrorCode::ProtocolViolation.to_string(),
            "PROTOCOL_VIOLATION (0x1)"
        );
    }
}
