//! SDK errors: what happened, and whether retrying can help. This is the one
//! place where QUIC close codes and TLS alerts map to SDK errors.

use std::time::Duration;

use thiserror::Error;
use wakewire_proto::device_session::RegisterRefused;
use wakewire_proto::names::NameError;
use wakewire_proto::relay_session::{
    REGISTER_ERROR_INVALID_NAME, REGISTER_ERROR_TOO_MANY_CHANNELS,
};
use wakewire_proto::ErrorCode;

/// Why a connection to the relay could not be made or was lost.
#[derive(Debug, Clone, Error)]
pub enum ConnectError {
    /// The relay's host name did not resolve.
    #[error("cannot resolve relay address {host}: {message}")]
    Dns {
        /// Host as given.
        host: String,
        /// Resolver error.
        message: String,
    },
    /// No route to the relay, or the local socket could not be used.
    #[error("relay unreachable: {0}")]
    Unreachable(String),
    /// The relay refused the connection because it is busy (admission
    /// control during a reconnect storm) or restarting; the SDK waits longer
    /// than its usual backoff before trying again.
    #[error("relay busy, connection refused: {0}")]
    Refused(String),
    /// The relay did not answer in time (handshake, Welcome or keepalive).
    #[error("timed out: {0}")]
    TimedOut(String),
    /// The relay's certificate is not trusted (unknown issuer, wrong name,
    /// expired...). Retrying with the same trust settings cannot help.
    #[error("relay certificate not accepted: {0}")]
    TlsCertificateInvalid(String),
    /// The TLS handshake failed for another reason (no common ALPN or
    /// cipher suite...).
    #[error("TLS handshake failed: {0}")]
    TlsHandshake(String),
    /// The negotiated protection is below the configured minimum; the SDK
    /// closed the connection.
    #[error("negotiated protection below the required minimum: {0}")]
    ProtectionTooLow(String),
    /// The relay refused the device credential.
    #[error("device credential refused: {0}")]
    Unauthorized(String),
    /// One side broke the protocol (or versions differ).
    #[error("protocol violation: {0}")]
    ProtocolViolation(String),
    /// The relay asked the device to leave (shutdown, replaced, overload).
    #[error("relay going away: {message}")]
    RelayGoingAway {
        /// The relay's suggested wait before reconnecting.
        reconnect_after: Duration,
        /// The relay's message.
        message: String,
    },
    /// Another connection authenticated as the same device and took over;
    /// the SDK does not reconnect (two clients would evict each other).
    #[error("replaced by another connection of the same device: {0}")]
    Replaced(String),
    /// An established connection was lost (relay restarted, network gone).
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// The proxy refused the credentials (HTTP 407, SOCKS5 authentication
    /// failure) or wants a scheme the SDK does not speak. Distinct from the
    /// relay refusing the device; retrying with the same credentials
    /// cannot help.
    #[error("proxy authentication failed: {0}")]
    ProxyAuth(String),
    /// The proxy could not be reached, or could not reach the relay.
    #[error("proxy: {0}")]
    Proxy(String),
    /// The client's own settings are unusable.
    #[error("invalid client configuration: {0}")]
    Config(String),
    /// The client was closed by the app.
    #[error("client closed")]
    Closed,
}

impl ConnectError {
    /// Whether trying again later (without changing anything) may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ConnectError::Dns { .. }
                | ConnectError::Unreachable(_)
                | ConnectError::Refused(_)
                | ConnectError::TimedOut(_)
                | ConnectError::RelayGoingAway { .. }
                | ConnectError::ConnectionLost(_)
                | ConnectError::Proxy(_)
        )
    }

    /// Whether a client that has been connected keeps reconnecting after
    /// this error. Besides what [`is_retryable`](Self::is_retryable) names,
    /// a TLS handshake that failed for a reason other than the certificate:
    /// the same settings worked before, so a relay restarting or draining
    /// mid-handshake is the likely cause, not the settings. (In a 100k-device
    /// graceful restart one device in 100,000 met this and, before, stayed
    /// offline for good.) The error is still reported in each
    /// `Status::Disconnected`, with the delay before the next attempt.
    pub(crate) fn keeps_reconnecting(&self) -> bool {
        self.is_retryable() || matches!(self, ConnectError::TlsHandshake(_))
    }

    /// Maps how a QUIC connection ended.
    pub(crate) fn from_connection(e: quinn::ConnectionError) -> Self {
        use quinn::ConnectionError as E;
        match e {
            E::ApplicationClosed(c) => {
                let reason = String::from_utf8_lossy(&c.reason).into_owned();
                let code = u32::try_from(c.error_code.into_inner())
                    .ok()
                    .and_then(ErrorCode::from_u32);
                Self::from_close_code(code, reason)
            }
            E::TimedOut => ConnectError::TimedOut("no response from the relay".into()),
            E::TransportError(t) => Self::from_transport(t.code, t.reason),
            E::ConnectionClosed(c) => Self::from_transport(
                c.error_code,
                String::from_utf8_lossy(&c.reason).into_owned(),
            ),
            E::Reset => ConnectError::ConnectionLost(
                "relay reset the connection (it may have restarted)".into(),
            ),
            E::LocallyClosed => ConnectError::Closed,
            E::VersionMismatch => ConnectError::ProtocolViolation("no common QUIC version".into()),
            E::CidsExhausted => ConnectError::ConnectionLost("connection ids exhausted".into()),
        }
    }

    /// Maps a wakewire close code (from the relay, or decided locally).
    pub(crate) fn from_close_code(code: Option<ErrorCode>, reason: String) -> Self {
        match code {
            Some(ErrorCode::Unauthorized) => ConnectError::Unauthorized(reason),
            Some(ErrorCode::ProtocolViolation) => ConnectError::ProtocolViolation(reason),
            Some(ErrorCode::UnsupportedVersion) => ConnectError::ProtocolViolation(reason),
            Some(ErrorCode::Replaced) => ConnectError::Replaced(reason),
            Some(ErrorCode::GoingAway) => ConnectError::RelayGoingAway {
                reconnect_after: Duration::ZERO,
                message: reason,
            },
            Some(ErrorCode::HelloTimeout | ErrorCode::KeepaliveTimeout) => {
                ConnectError::TimedOut(reason)
            }
            Some(ErrorCode::NoError | ErrorCode::Internal) | None => {
                ConnectError::ConnectionLost(reason)
            }
        }
    }

    fn from_transport(code: quinn::TransportErrorCode, reason: String) -> Self {
        let raw = u64::from(code);
        // TLS alerts travel as QUIC CRYPTO_ERROR 0x100 + alert (RFC 9001 §4.8).
        // 42-49: bad_certificate, unsupported_certificate, certificate_revoked,
        // certificate_expired, certificate_unknown, illegal_parameter (47 is
        // not about certificates), unknown_ca, access_denied.
        if raw == 0x2 {
            // CONNECTION_REFUSED: the relay is closing, restarting or shedding load.
            return ConnectError::Refused(reason);
        }
        // NO_ERROR (e.g. the relay dropped a handshake it could not finish
        // in time), INTERNAL_ERROR, AEAD_LIMIT_REACHED, NO_VIABLE_PATH: the
        // connection is gone, a new one may well work.
        if matches!(raw, 0x0 | 0x1 | 0xf | 0x10) {
            return ConnectError::ConnectionLost(format!(
                "QUIC transport error 0x{raw:x}: {reason}"
            ));
        }
        match raw.checked_sub(0x100) {
            Some(alert) if reason.starts_with("invalid peer certificate") => {
                ConnectError::TlsCertificateInvalid(format!("{reason} (TLS alert {alert})"))
            }
            Some(alert @ (42..=46 | 48)) => {
                ConnectError::TlsCertificateInvalid(format!("{reason} (TLS alert {alert})"))
            }
            Some(alert @ 0..=0xff) => {
                ConnectError::TlsHandshake(format!("{reason} (TLS alert {alert})"))
            }
            _ => {
                ConnectError::ProtocolViolation(format!("QUIC transport error 0x{raw:x}: {reason}"))
            }
        }
    }
}

/// Why a channel could not be registered.
#[derive(Debug, Clone, Error)]
pub enum RegisterError {
    /// The name is not a valid channel name (checked before sending).
    #[error(transparent)]
    InvalidName(#[from] NameError),
    /// The relay refused.
    #[error("relay refused the registration ({reason:?}): {message}")]
    Refused {
        /// Why.
        reason: RegisterRefusal,
        /// The relay's message.
        message: String,
    },
    /// A channel with this name is already registered on this client.
    #[error("channel {0:?} is already registered on this client")]
    AlreadyRegistered(String),
    /// The client is closed or failed for good.
    #[error("client closed: {0}")]
    Closed(String),
}

impl RegisterError {
    pub(crate) fn refused(r: &RegisterRefused) -> Self {
        let reason = match r.code {
            REGISTER_ERROR_INVALID_NAME => RegisterRefusal::InvalidName,
            REGISTER_ERROR_TOO_MANY_CHANNELS => RegisterRefusal::TooManyChannels,
            other => RegisterRefusal::Other(other),
        };
        RegisterError::Refused {
            reason,
            message: r.message.clone(),
        }
    }
}

/// Why the relay refused to register a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterRefusal {
    /// The relay considers the name invalid.
    InvalidName,
    /// The device would exceed the relay's channel limit.
    TooManyChannels,
    /// A code this SDK version does not know.
    Other(u32),
}

/// The client has been closed (by the app, or for good after an error
/// that retrying cannot fix): the call had no effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("the client is closed")]
pub struct ClientClosed;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_and_alerts_map_to_clear_errors() {
        assert!(matches!(
            ConnectError::from_close_code(Some(ErrorCode::Unauthorized), "x".into()),
            ConnectError::Unauthorized(_)
        ));
        assert!(!ConnectError::Unauthorized(String::new()).is_retryable());
        assert!(
            ConnectError::from_close_code(Some(ErrorCode::GoingAway), "x".into()).is_retryable()
        );
        assert!(ConnectError::from_close_code(None, "x".into()).is_retryable());
        let unknown_ca = ConnectError::from_transport(
            quinn::TransportErrorCode::crypto(48),
            "invalid peer certificate".into(),
        );
        assert!(
            matches!(unknown_ca, ConnectError::TlsCertificateInvalid(_)),
            "{unknown_ca}"
        );
        assert!(!unknown_ca.is_retryable());
        assert!(
            !unknown_ca.keeps_reconnecting(),
            "a certificate problem stays fatal"
        );
        let alert = ConnectError::from_transport(
            quinn::TransportErrorCode::crypto(80),
            "internal error".into(),
        );
        assert!(matches!(alert, ConnectError::TlsHandshake(_)), "{alert}");
        assert!(!alert.is_retryable(), "a first connect reports it at once");
        assert!(alert.keeps_reconnecting(), "a connected client tries again");
        assert!(!ConnectError::Unauthorized(String::new()).keeps_reconnecting());
        let dropped =
            ConnectError::from_transport(quinn::TransportErrorCode::NO_ERROR, String::new());
        assert!(dropped.is_retryable(), "{dropped}");
        let refused = ConnectError::from_transport(
            quinn::TransportErrorCode::CONNECTION_REFUSED,
            String::new(),
        );
        assert!(matches!(refused, ConnectError::Refused(_)) && refused.is_retryable());
        let violation = ConnectError::from_transport(
            quinn::TransportErrorCode::PROTOCOL_VIOLATION,
            String::new(),
        );
        assert!(!violation.is_retryable());
        let no_alpn =
            ConnectError::from_transport(quinn::TransportErrorCode::crypto(120), "no alpn".into());
        assert!(matches!(no_alpn, ConnectError::TlsHandshake(_)));
    }
}
