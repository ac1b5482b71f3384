//! Validation of device ids and channel names, shared by both ends so the
//! SDK can refuse a bad name before it reaches the wire.

use thiserror::Error;

/// Longest channel name, in bytes.
pub const MAX_CHANNEL_NAME_LEN: usize = 64;
/// Longest device id, in bytes.
pub const MAX_DEVICE_ID_LEN: usize = 128;

/// A name or id that is not allowed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NameError {
    /// Empty string.
    #[error("{what} must not be empty")]
    Empty {
        /// "channel name" or "device id".
        what: &'static str,
    },
    /// Too long.
    #[error("{what} is {len} bytes long; the maximum is {max}")]
    TooLong {
        /// "channel name" or "device id".
        what: &'static str,
        /// Actual length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// Contains a character outside `A-Z a-z 0-9 . _ - : / @`.
    #[error("{what} {value:?} contains {ch:?}; allowed are A-Z a-z 0-9 . _ - : / @")]
    BadChar {
        /// "channel name" or "device id".
        what: &'static str,
        /// The offending value.
        value: String,
        /// First bad character.
        ch: char,
    },
}

fn check(what: &'static str, value: &str, max: usize) -> Result<(), NameError> {
    if value.is_empty() {
        return Err(NameError::Empty { what });
    }
    if value.len() > max {
        return Err(NameError::TooLong {
            what,
            len: value.len(),
            max,
        });
    }
    if let Some(ch) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '/' | '@')))
    {
        return Err(NameError::BadChar {
            what,
            value: value.to_owned(),
            ch,
        });
    }
    Ok(())
}

/// Checks a channel name: 1 to 64 characters of `A-Z a-z 0-9 . _ - : / @`.
pub fn validate_channel_name(name: &str) -> Result<(), NameError> {
    check("channel name", name, MAX_CHANNEL_NAME_LEN)
}

/// Checks a device id: 1 to 128 characters of `A-Z a-z 0-9 . _ - : / @`.
pub fn validate_device_id(id: &str) -> Result<(), NameError> {
    check("device id", id, MAX_DEVICE_ID_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names_and_rejects_bad_ones() {
        assert!(validate_channel_name("mail").is_ok());
        assert!(validate_channel_name("com.example/chat:1").is_ok());
        assert!(matches!(
            validate_channel_name(""),
            Err(NameError::Empty { .. })
        ));
        assert!(matches!(
            validate_channel_name(&"x".repeat(65)),
            Err(NameError::TooLong { len: 65, .. })
        ));
        assert!(matches!(
            validate_channel_name("a b"),
            Err(NameError::BadChar { ch: ' ', .. })
        ));
        assert!(validate_device_id("phone-42@alice").is_ok());
        assert!(validate_device_id("é").is_err());
    }
}
