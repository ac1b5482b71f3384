//! Device and publisher credentials: Ed25519-signed tokens.
//!
//! Format: `ww1.<base64url(JSON claims)>.<base64url(signature)>`, where the
//! signature covers the text `ww1.<base64url(JSON claims)>`. The relay holds
//! the private key (generated into its data directory on first start) and
//! mints tokens with `wakewire-relay token ...`; it verifies them with the
//! public key. A device token names one device id; a publisher token lists
//! the channel ids and device ids it may publish to.

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use ring::signature::{self, Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};
use thiserror::Error;

const PREFIX: &str = "ww1.";
/// Tokens longer than this are refused before any parsing.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// What a token is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenKind {
    /// Lets a device connect as `sub` and register its channels.
    Device,
    /// Lets an app backend publish to the channels and devices in its scope.
    Publisher,
}

impl std::fmt::Display for TokenKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TokenKind::Device => "device",
            TokenKind::Publisher => "publisher",
        })
    }
}

/// The signed content of a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    /// Token kind.
    pub typ: TokenKind,
    /// Device id, for device tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// Issued at, seconds since the Unix epoch.
    pub iat: u64,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Publisher scope: channel ids it may publish to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub channels: Vec<String>,
    /// Publisher scope: device ids to whose channels it may publish;
    /// `"*"` means every device.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
}

impl Claims {
    /// Whether a publisher with these claims may publish to `channel_id`,
    /// which belongs to `device_id`.
    pub fn allows(&self, channel_id: &str, device_id: &str) -> bool {
        self.typ == TokenKind::Publisher
            && (self.channels.iter().any(|c| c == channel_id)
                || self.devices.iter().any(|d| d == "*" || d == device_id))
    }
}

/// Why a token was refused. None of these is fixed by retrying with the same
/// token.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TokenError {
    /// Not a wakewire token at all.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// The signature does not match this relay's key.
    #[error("token signature is invalid (minted by another relay key?)")]
    BadSignature,
    /// Past its expiry.
    #[error("token expired at {exp} (now {now})")]
    Expired {
        /// Expiry, Unix seconds.
        exp: u64,
        /// Verification time, Unix seconds.
        now: u64,
    },
    /// A token of the wrong kind (a device token used to publish, ...).
    #[error("a {got} token was given where a {expected} token is needed")]
    WrongKind {
        /// Kind needed.
        expected: TokenKind,
        /// Kind given.
        got: TokenKind,
    },
}

/// Why a signing key could not be made or loaded.
#[derive(Debug, Error)]
#[error("invalid Ed25519 signing key: {0}")]
pub struct KeyError(String);

/// Mints tokens with the relay's Ed25519 private key.
pub struct Signer {
    key: Ed25519KeyPair,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").finish_non_exhaustive()
    }
}

impl Signer {
    /// Generates a new key, returned as PKCS#8 bytes to store.
    pub fn generate_pkcs8() -> Result<Vec<u8>, KeyError> {
        let rng = ring::rand::SystemRandom::new();
        Ed25519KeyPair::generate_pkcs8(&rng)
            .map(|d| d.as_ref().to_vec())
            .map_err(|e| KeyError(e.to_string()))
    }

    /// Loads a key from PKCS#8 bytes.
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, KeyError> {
        Ed25519KeyPair::from_pkcs8(pkcs8)
            .map(|key| Self { key })
            .map_err(|e| KeyError(e.to_string()))
    }

    /// Signs claims into a token.
    pub fn mint(&self, claims: &Claims) -> String {
        // Serializing a struct of strings and integers cannot fail.
        let json = serde_json::to_vec(claims).unwrap_or_default();
        let mut token = format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(json));
        let sig = self.key.sign(token.as_bytes());
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(sig.as_ref()));
        token
    }

    /// The matching verifier.
    pub fn verifier(&self) -> Verifier {
        Verifier {
            public: self.key.public_key().as_ref().to_vec(),
        }
    }
}

/// Checks tokens against the relay's Ed25519 public key.
#[derive(Debug, Clone)]
pub struct Verifier {
    public: Vec<u8>,
}

impl Verifier {
    /// Verifies signature, expiry (against `now_unix`, seconds) and kind.
    pub fn verify(
        &self,
        token: &str,
        expected: TokenKind,
        now_unix: u64,
    ) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed("longer than 8 KiB"));
        }
        let rest = token
            .strip_prefix(PREFIX)
            .ok_or(TokenError::Malformed("does not start with ww1."))?;
        let (claims_b64, sig_b64) = rest
            .split_once('.')
            .ok_or(TokenError::Malformed("missing signature part"))?;
        let sig = URL_SAFE_NO_PAD
            .decode(sig_b64)
            .map_err(|_| TokenError::Malformed("signature is not base64url"))?;
        let signed = &token[..PREFIX.len() + claims_b64.len()];
        signature::UnparsedPublicKey::new(&signature::ED25519, &self.public)
            .verify(signed.as_bytes(), &sig)
            .map_err(|_| TokenError::BadSignature)?;
        let json = URL_SAFE_NO_PAD
            .decode(claims_b64)
            .map_err(|_| TokenError::Malformed("claims are not base64url"))?;
        let claims: Claims = serde_json::from_slice(&json)
            .map_err(|_| TokenError::Malformed("claims are not valid JSON"))?;
        if claims.typ != expected {
            return Err(TokenError::WrongKind {
                expected,
                got: claims.typ,
            });
        }
        if claims.exp <= now_unix {
            return Err(TokenError::Expired {
                exp: claims.exp,
                now: now_unix,
            });
        }
        if expected == TokenKind::Device && claims.sub.as_deref().unwrap_or("").is_empty() {
            return Err(TokenError::Malformed("device token names no device"));
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> Signer {
        Signer::from_pkcs8(&Signer::generate_pkcs8().unwrap()).unwrap()
    }

    fn device(sub: &str, exp: u64) -> Claims {
        Claims {
            typ: TokenKind::Device,
            sub: Some(sub.into()),
            iat: 0,
            exp,
            channels: vec![],
            devices: vec![],
        }
    }

    #[test]
    fn mint_and_verify() {
        let s = signer();
        let t = s.mint(&device("d1", 100));
        let c = s.verifier().verify(&t, TokenKind::Device, 99).unwrap();
        assert_eq!(c.sub.as_deref(), Some("d1"));
    }

    #[test]
    fn refuses_expired_wrong_kind_foreign_and_tampered() {
        let s = signer();
        let v = s.verifier();
        let t = s.mint(&device("d1", 100));
        assert_eq!(
            v.verify(&t, TokenKind::Device, 100),
            Err(TokenError::Expired { exp: 100, now: 100 })
        );
        assert!(matches!(
            v.verify(&t, TokenKind::Publisher, 1),
            Err(TokenError::WrongKind { .. })
        ));
        assert_eq!(
            signer().verifier().verify(&t, TokenKind::Device, 1),
            Err(TokenError::BadSignature)
        );
        // Swap in claims for another device, keep the signature.
        let other = s.mint(&device("d2", 100));
        let forged = format!(
            "{}.{}",
            other.rsplit_once('.').unwrap().0,
            t.rsplit_once('.').unwrap().1
        );
        assert_eq!(
            v.verify(&forged, TokenKind::Device, 1),
            Err(TokenError::BadSignature)
        );
        for junk in ["", "abc", "ww1.", "ww1.x.y", "ww1.a.!!!"] {
            assert!(v.verify(junk, TokenKind::Device, 1).is_err(), "{junk}");
        }
        assert!(matches!(
            v.verify(&"a".repeat(MAX_TOKEN_LEN + 1), TokenKind::Device, 1),
            Err(TokenError::Malformed(_))
        ));
    }

    #[test]
    fn publisher_scope() {
        let c = Claims {
            typ: TokenKind::Publisher,
            sub: None,
            iat: 0,
            exp: 10,
            channels: vec!["chA".into()],
            devices: vec!["dev2".into()],
        };
        assert!(c.allows("chA", "dev1"));
        assert!(c.allows("chB", "dev2"));
        assert!(!c.allows("chB", "dev1"));
        let all = Claims {
            devices: vec!["*".into()],
            channels: vec![],
            ..c
        };
        assert!(all.allows("anything", "anyone"));
    }
}
