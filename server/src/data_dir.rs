//! The relay's data directory: the token signing key, the channel id
//! secret and, in dev mode, a self-signed certificate. Each is created on
//! first start and reused afterwards, so tokens and channel ids survive
//! restarts.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use std::time::Duration;
use thiserror::Error;
use wakewire_proto::ids::ChannelIds;

use wakewire_proto::token::{Claims, Signer, TokenKind, Verifier};

/// File name of the Ed25519 token signing key (PKCS#8).
pub const SIGNING_KEY_FILE: &str = "signing-key.pk8";
/// File name of the channel id secret (32 random bytes).
pub const CHANNEL_SECRET_FILE: &str = "channel-id.secret";
/// File name of the dev-mode certificate (PEM); devices trust this file.
pub const DEV_CERT_FILE: &str = "dev-cert.pem";
/// File name of the dev-mode private key (PEM).
pub const DEV_KEY_FILE: &str = "dev-key.pem";

/// A data directory problem.
#[derive(Debug, Error)]
pub enum DataDirError {
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// Path involved.
        path: PathBuf,
        /// I/O error.
        source: std::io::Error,
    },
    /// A file exists but its content is unusable.
    #[error("{path}: {message} (move it away to generate a new one; tokens and channel ids minted with the old one stop working)")]
    Corrupt {
        /// Path involved.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// The relay's secrets.
#[derive(Debug)]
pub struct Keys {
    /// Mints tokens.
    pub signer: Signer,
    /// Checks tokens.
    pub verifier: Verifier,
    /// Derives channel ids.
    pub channel_ids: ChannelIds,
    /// Key for QUIC stateless reset tokens. Derived from the channel secret,
    /// so it survives restarts: after a crash, a device's next packet draws
    /// a reset it recognises and it reconnects at once instead of waiting
    /// for its keepalive to time out.
    pub reset_key: ring::hmac::Key,
    /// Key of the connection ids the relay issues. Also derived from the
    /// secret: a restarted relay must accept the old ids as its own to
    /// answer them with stateless resets.
    pub cid_key: u64,
}

impl Keys {
    /// Mints a device token for `device_id`, valid for `valid_for` from `now_unix`.
    pub fn device_token(&self, device_id: &str, valid_for: Duration, now_unix: u64) -> String {
        self.signer.mint(&Claims {
            typ: TokenKind::Device,
            sub: Some(device_id.to_owned()),
            iat: now_unix,
            exp: now_unix.saturating_add(valid_for.as_secs()),
            channels: vec![],
            devices: vec![],
        })
    }

    /// Mints a publisher token for the given channel ids and device ids
    /// (`"*"` = all devices).
    pub fn publisher_token(
        &self,
        channels: &[String],
        devices: &[String],
        valid_for: Duration,
        now_unix: u64,
    ) -> String {
        self.signer.mint(&Claims {
            typ: TokenKind::Publisher,
            sub: None,
            iat: now_unix,
            exp: now_unix.saturating_add(valid_for.as_secs()),
            channels: channels.to_vec(),
            devices: devices.to_vec(),
        })
    }
}

/// An opened data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    path: PathBuf,
}

impl DataDir {
    /// Opens (and creates if needed) the directory.
    pub fn open(path: &Path) -> Result<Self, DataDirError> {
        fs::create_dir_all(path).map_err(|source| DataDirError::Io {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self {
            path: path.to_owned(),
        })
    }

    /// Directory path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Loads the signing key and channel secret, creating them if absent.
    pub fn keys(&self) -> Result<Keys, DataDirError> {
        let key_path = self.path.join(SIGNING_KEY_FILE);
        let pkcs8 = self.read_or_create(&key_path, || {
            Signer::generate_pkcs8().map_err(|e| e.to_string())
        })?;
        let signer = Signer::from_pkcs8(&pkcs8).map_err(|e| DataDirError::Corrupt {
            path: key_path,
            message: e.to_string(),
        })?;
        let secret_path = self.path.join(CHANNEL_SECRET_FILE);
        let secret = self.read_or_create(&secret_path, || {
            let mut s = vec![0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut s)
                .map_err(|_| "no system randomness".to_owned())?;
            Ok(s)
        })?;
        if secret.len() < 32 {
            return Err(DataDirError::Corrupt {
                path: secret_path,
                message: format!("secret is {} bytes, needs 32", secret.len()),
            });
        }
        let derive = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret);
        let reset = ring::hmac::sign(&derive, b"wakewire quic stateless reset v1");
        let cid = ring::hmac::sign(&derive, b"wakewire quic connection id v1");
        let mut cid_key = [0u8; 8];
        cid_key.copy_from_slice(&cid.as_ref()[..8]);
        Ok(Keys {
            verifier: signer.verifier(),
            signer,
            channel_ids: ChannelIds::new(&secret),
            reset_key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset.as_ref()),
            cid_key: u64::from_le_bytes(cid_key),
        })
    }

    /// Paths of the dev certificate and key, generating a self-signed
    /// certificate for `localhost`, `127.0.0.1` and `::1` if absent.
    pub fn dev_certificate(&self) -> Result<(PathBuf, PathBuf), DataDirError> {
        let cert = self.path.join(DEV_CERT_FILE);
        let key = self.path.join(DEV_KEY_FILE);
        if !cert.exists() || !key.exists() {
            let names = vec![
                "localhost".to_owned(),
                "127.0.0.1".to_owned(),
                "::1".to_owned(),
            ];
            let ck =
                rcgen::generate_simple_self_signed(names).map_err(|e| DataDirError::Corrupt {
                    path: cert.clone(),
                    message: format!("cannot generate a certificate: {e}"),
                })?;
            write_private(&key, ck.key_pair.serialize_pem().as_bytes())?;
            write_private(&cert, ck.cert.pem().as_bytes())?;
        }
        Ok((cert, key))
    }

    fn read_or_create(
        &self,
        path: &Path,
        make: impl FnOnce() -> Result<Vec<u8>, String>,
    ) -> Result<Vec<u8>, DataDirError> {
        match fs::read(path) {
            Ok(b) => Ok(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let bytes = make().map_err(|message| DataDirError::Corrupt {
                    path: path.to_owned(),
                    message,
                })?;
                write_private(path, &bytes)?;
                Ok(bytes)
            }
            Err(source) => Err(DataDirError::Io {
                path: path.to_owned(),
                source,
            }),
        }
    }
}

/// Writes a file readable by its owner only, atomically (temp + rename).
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), DataDirError> {
    let io = |source| DataDirError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_certificate_are_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let d = DataDir::open(&dir.path().join("nested")).unwrap();
        let k1 = d.keys().unwrap();
        let claims = Claims {
            typ: TokenKind::Device,
            sub: Some("d".into()),
            iat: 0,
            exp: u64::MAX,
            channels: vec![],
            devices: vec![],
        };
        let token = k1.signer.mint(&claims);
        let k2 = d.keys().unwrap();
        assert!(k2.verifier.verify(&token, TokenKind::Device, 1).is_ok());
        assert_eq!(
            k1.channel_ids.derive("d", "m"),
            k2.channel_ids.derive("d", "m")
        );
        let (c1, _) = d.dev_certificate().unwrap();
        let pem1 = fs::read(&c1).unwrap();
        let (c2, _) = d.dev_certificate().unwrap();
        assert_eq!(pem1, fs::read(c2).unwrap());
        let mode = fs::metadata(dir.path().join("nested").join(SIGNING_KEY_FILE)).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
    }

    #[test]
    fn corrupt_key_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(SIGNING_KEY_FILE), b"garbage").unwrap();
        let err = DataDir::open(dir.path()).unwrap().keys().unwrap_err();
        assert!(err.to_string().contains(SIGNING_KEY_FILE), "{err}");
    }
}
