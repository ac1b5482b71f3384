//! Device and publisher credentials: Ed25519-signed tokens.
//!
//! Format: `ww1.<base64url(JSON claims)>.<base64url(signature)>`, where the
//! signature covers the text `ww1.<base64url(JSON claims)>`. The relay holds
//! the private key (generated into its data directory on first start) and
//! mints tokens with `wakewire-relay token ...`; it verifies them with the
//! public key. A device token names one device id; a publisher token lists
//! the channel ids and device ids it may publish to.
//!
//! Every token carries an id (`jti`, 128 random bits) so it can be revoked
//! alone, and the id of the key that signed it (`kid`), so the relay can
//! verify with several keys while its signing key rotates.

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
    /// Token id (32 hex characters), for revocation and per-token quotas.
    /// Tokens minted before ids existed have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// Id of the signing key (16 hex characters of the SHA-256 of its
    /// public key). Absent in tokens minted before key ids existed: every
    /// known key is tried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
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
    /// Signed by a key this relay does not (or no longer) accept.
    #[error("token was signed by key {0}, which this relay does not accept (rotated out?)")]
    UnknownKey(String),
    /// Revoked by the operator.
    #[error("token {0} has been revoked")]
    Revoked(String),
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

    /// The key id written into tokens this signer mints.
    pub fn kid(&self) -> String {
        key_id(self.key.public_key().as_ref())
    }

    /// The raw Ed25519 public key (32 bytes).
    pub fn public_key(&self) -> Vec<u8> {
        self.key.public_key().as_ref().to_vec()
    }

    /// Signs claims into a token, setting its `kid` to this key's id and
    /// giving it a fresh random `jti` if it has none.
    pub fn mint(&self, claims: &Claims) -> String {
        let mut claims = claims.clone();
        claims.kid = Some(self.kid());
        if claims.jti.is_none() {
            claims.jti = Some(random_id());
        }
        // Serializing a struct of strings and integers cannot fail.
        let json = serde_json::to_vec(&claims).unwrap_or_default();
        let mut token = format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(json));
        let sig = self.key.sign(token.as_bytes());
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(sig.as_ref()));
        token
    }

    /// A verifier that knows only this key.
    pub fn verifier(&self) -> Verifier {
        Verifier::new(vec![self.public_key()])
    }
}

/// The id of an Ed25519 public key: 16 hex characters of its SHA-256.
pub fn key_id(public: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, public);
    d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

fn random_id() -> String {
    let mut b = [0u8; 16];
    // Without randomness the id is all zeros: still a valid token, only
    // not revocable alone. The system RNG does not fail on supported OSes.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Checks tokens against the relay's Ed25519 public keys: the current one
/// and earlier ones still accepted while tokens they signed live on.
#[derive(Debug, Clone)]
pub struct Verifier {
    /// (key id, public key), current key first.
    keys: Vec<(String, Vec<u8>)>,
}

impl Verifier {
    /// A verifier accepting these public keys (the current one first).
    pub fn new(public_keys: Vec<Vec<u8>>) -> Self {
        Self {
            keys: public_keys.into_iter().map(|k| (key_id(&k), k)).collect(),
        }
    }

    /// Ids of the keys accepted.
    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|(id, _)| id.as_str())
    }

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
        let json = URL_SAFE_NO_PAD
            .decode(claims_b64)
            .map_err(|_| TokenError::Malformed("claims are not base64url"))?;
        let claims: Claims = serde_json::from_slice(&json)
            .map_err(|_| TokenError::Malformed("claims are not valid JSON"))?;
        let signed = &token[..PREFIX.len() + claims_b64.len()];
        let check = |public: &[u8]| {
            signature::UnparsedPublicKey::new(&signature::ED25519, public)
                .verify(signed.as_bytes(), &sig)
                .is_ok()
        };
        let valid = match &claims.kid {
            Some(kid) => match self.keys.iter().find(|(id, _)| id == kid) {
                Some((_, k)) => check(k),
                None => return Err(TokenError::UnknownKey(kid.clone())),
            },
            None => self.keys.iter().any(|(_, k)| check(k)),
        };
        if !valid {
            return Err(TokenError::BadSignature);
        }
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
            jti: None,
            kid: None,
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
        // Another relay's key: its key id is unknown here.
        assert!(matches!(
            signer().verifier().verify(&t, TokenKind::Device, 1),
            Err(TokenError::UnknownKey(_))
        ));
        // Claims that name this relay's key but were signed by another.
        let mut c = device("d1", 100);
        c.kid = Some(s.kid());
        let foreign = signer().mint(&c);
        let relabelled = {
            // mint() sets kid to the signer's: rebuild with ours.
            let (body, sig) = foreign.rsplit_once('.').unwrap();
            let json = URL_SAFE_NO_PAD
                .decode(body.strip_prefix(PREFIX).unwrap())
                .unwrap();
            let mut claims: Claims = serde_json::from_slice(&json).unwrap();
            claims.kid = Some(s.kid());
            format!(
                "{PREFIX}{}.{sig}",
                URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap())
            )
        };
        assert_eq!(
            v.verify(&relabelled, TokenKind::Device, 1),
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
            jti: None,
            kid: None,
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

    #[test]
    fn tokens_carry_ids_and_verify_under_any_accepted_key() {
        let (old, new) = (signer(), signer());
        let t_old = old.mint(&device("d1", 100));
        let t_new = new.mint(&device("d1", 100));
        let both = Verifier::new(vec![new.public_key(), old.public_key()]);
        let c = both.verify(&t_old, TokenKind::Device, 1).unwrap();
        assert_eq!(c.kid.as_deref(), Some(old.kid().as_str()));
        assert_eq!(c.jti.as_ref().map(String::len), Some(32));
        assert!(both.verify(&t_new, TokenKind::Device, 1).is_ok());
        // Once the old key is dropped, its tokens say so.
        assert_eq!(
            new.verifier().verify(&t_old, TokenKind::Device, 1),
            Err(TokenError::UnknownKey(old.kid()))
        );
        // Two tokens for the same claims differ by their id.
        assert_ne!(new.mint(&device("d1", 100)), t_new);
    }
}
