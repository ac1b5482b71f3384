//! The relay's data directory: the token signing key (and retired keys
//! still accepted), the channel id secret, the revocation list and, in dev
//! mode, a self-signed certificate. Each is created on first start and
//! reused afterwards, so tokens and channel ids survive restarts.
//!
//! At rest: the directory is mode 0700 and every file in it 0600. The
//! relay fixes looser modes it finds at start (and says so), so a secret
//! copied in with a careless `cp` does not stay world-readable.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
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
/// Directory of retired signing keys' public halves (`<kid>.pub`, 32 raw
/// bytes): tokens they signed are still accepted until the file is removed.
pub const RETIRED_KEYS_DIR: &str = "retired-keys";
/// File of revoked token ids, one `jti` per line (`#` comments allowed).
pub const REVOKED_FILE: &str = "revoked-tokens";

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
    /// Key of QUIC address-validation (Retry) tokens, derived from the
    /// secret so every relay process of a data directory accepts them.
    pub retry_key: [u8; 32],
    /// Key of the probe service's cookies (return routability).
    pub probe_key: [u8; 32],
    /// Key of the names a cluster derives from device ids and idempotency
    /// keys (subjects, event ids): every relay sharing the secret derives
    /// the same ones.
    pub cluster_key: ring::hmac::Key,
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
            jti: None,
            kid: None,
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
            jti: None,
            kid: None,
        })
    }
}

/// An opened data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    path: PathBuf,
}

impl DataDir {
    /// Opens (and creates if needed) the directory, mode 0700.
    pub fn open(path: &Path) -> Result<Self, DataDirError> {
        let io = |source| DataDirError::Io {
            path: path.to_owned(),
            source,
        };
        // Created private (0700), so a first start has nothing to tighten.
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(io)?;
        let dir = Self {
            path: path.to_owned(),
        };
        Ok(dir)
    }

    /// Makes the directory 0700 and every file in it (and in its retired
    /// keys) 0600; returns the paths whose modes were looser.
    pub fn tighten_permissions(&self) -> Result<Vec<PathBuf>, DataDirError> {
        let mut fixed = vec![];
        let mut fix = |p: &Path, want: u32| -> Result<(), DataDirError> {
            let io = |source| DataDirError::Io {
                path: p.to_owned(),
                source,
            };
            let mode = fs::metadata(p).map_err(io)?.permissions().mode() & 0o777;
            if mode & !want != 0 {
                fs::set_permissions(p, fs::Permissions::from_mode(want)).map_err(io)?;
                fixed.push(p.to_owned());
            }
            Ok(())
        };
        for dir in [self.path.clone(), self.path.join(RETIRED_KEYS_DIR)] {
            if !dir.is_dir() {
                continue;
            }
            fix(&dir, 0o700)?;
            let entries = fs::read_dir(&dir).map_err(|source| DataDirError::Io {
                path: dir.clone(),
                source,
            })?;
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_file()) {
                    fix(&e.path(), 0o600)?;
                }
            }
        }
        Ok(fixed)
    }

    /// Retires the current signing key (its public half stays accepted,
    /// in `retired-keys/<kid>.pub`) and makes a new one; returns the old
    /// and new key ids. Tokens minted afterwards use the new key.
    pub fn rotate_signing_key(&self) -> Result<(String, String), DataDirError> {
        let old = self.keys()?.signer;
        let retired = self.path.join(RETIRED_KEYS_DIR);
        create_private_dir(&retired)?;
        write_private(
            &retired.join(format!("{}.pub", old.kid())),
            &old.public_key(),
        )?;
        let pkcs8 = Signer::generate_pkcs8().map_err(|e| DataDirError::Corrupt {
            path: self.path.join(SIGNING_KEY_FILE),
            message: e.to_string(),
        })?;
        write_private(&self.path.join(SIGNING_KEY_FILE), &pkcs8)?;
        let new = self.keys()?.signer;
        Ok((old.kid(), new.kid()))
    }

    /// Stops accepting tokens of a retired key.
    pub fn drop_retired_key(&self, kid: &str) -> Result<bool, DataDirError> {
        if kid.is_empty() || !kid.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(false);
        }
        let path = self.path.join(RETIRED_KEYS_DIR).join(format!("{kid}.pub"));
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(DataDirError::Io { path, source }),
        }
    }

    /// Public keys of the retired signing keys.
    fn retired_keys(&self) -> Result<Vec<Vec<u8>>, DataDirError> {
        let dir = self.path.join(RETIRED_KEYS_DIR);
        let Ok(entries) = fs::read_dir(&dir) else {
            return Ok(vec![]);
        };
        let mut keys = vec![];
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "pub") {
                let k = fs::read(&p).map_err(|source| DataDirError::Io {
                    path: p.clone(),
                    source,
                })?;
                if k.len() != 32 {
                    return Err(DataDirError::Corrupt {
                        path: p,
                        message: format!("a public key is 32 bytes, this is {}", k.len()),
                    });
                }
                keys.push(k);
            }
        }
        Ok(keys)
    }

    /// Path of the revocation list.
    pub fn revoked_path(&self) -> PathBuf {
        self.path.join(REVOKED_FILE)
    }

    /// Adds a token id to the revocation list (a running relay picks it up
    /// within seconds).
    pub fn revoke(&self, jti: &str) -> Result<(), DataDirError> {
        let path = self.revoked_path();
        let io = |source| DataDirError::Io {
            path: path.clone(),
            source,
        };
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        writeln!(f, "{jti}").map_err(io)?;
        f.sync_all().map_err(io)
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
        let mut retry_key = [0u8; 32];
        retry_key.copy_from_slice(ring::hmac::sign(&derive, b"wakewire quic retry v1").as_ref());
        let mut probe_key = [0u8; 32];
        probe_key.copy_from_slice(ring::hmac::sign(&derive, b"wakewire probe cookie v1").as_ref());
        let mut public_keys = vec![signer.public_key()];
        public_keys.extend(self.retired_keys()?);
        Ok(Keys {
            verifier: Verifier::new(public_keys),
            signer,
            retry_key,
            probe_key,
            channel_ids: ChannelIds::new(&secret),
            reset_key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset.as_ref()),
            cluster_key: ring::hmac::Key::new(
                ring::hmac::HMAC_SHA256,
                ring::hmac::sign(&derive, b"wakewire cluster names v1").as_ref(),
            ),
            cid_key: u64::from_le_bytes(cid_key),
        })
    }

    /// Paths of the dev certificate and key, generating a self-signed
    /// certificate for `localhost`, `127.0.0.1` and `::1` if absent.
    pub fn dev_certificate(&self) -> Result<(PathBuf, PathBuf), DataDirError> {
        let cert = self.path.join(DEV_CERT_FILE);
        let key = self.path.join(DEV_KEY_FILE);
        // The key first, then a certificate for whichever key is on disk:
        // processes starting together on one directory (a cluster's relays
        // sharing keys) end with one matching pair.
        let key_pem = self.read_or_create(&key, || {
            rcgen::KeyPair::generate()
                .map(|k| k.serialize_pem().into_bytes())
                .map_err(|e| format!("cannot generate a key: {e}"))
        })?;
        self.read_or_create(&cert, || {
            let pem = String::from_utf8(key_pem).map_err(|e| e.to_string())?;
            let key_pair = rcgen::KeyPair::from_pem(&pem).map_err(|e| e.to_string())?;
            let names = vec![
                "localhost".to_owned(),
                "127.0.0.1".to_owned(),
                "::1".to_owned(),
            ];
            rcgen::CertificateParams::new(names)
                .and_then(|p| p.self_signed(&key_pair))
                .map(|c| c.pem().into_bytes())
                .map_err(|e| format!("cannot generate a certificate: {e}"))
        })?;
        Ok((cert, key))
    }

    /// The file's contents, creating it with `make` if absent. Creation
    /// never replaces a file another process created meanwhile: the loser
    /// reads the winner's, so every process ends with the same contents.
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
                create_private_once(path, &bytes)
            }
            Err(source) => Err(DataDirError::Io {
                path: path.to_owned(),
                source,
            }),
        }
    }
}

/// Creates a directory readable by its owner only.
fn create_private_dir(path: &Path) -> Result<(), DataDirError> {
    let io = |source| DataDirError::Io {
        path: path.to_owned(),
        source,
    };
    fs::create_dir_all(path).map_err(io)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(io)
}

/// Writes a file readable by its owner only, atomically (temp + rename).
/// Creates `path` with `bytes` (mode 0600) unless it exists; returns what
/// the file holds afterwards. Written to a file of its own, then linked
/// into place (a link never replaces a file).
pub(crate) fn create_private_once(path: &Path, bytes: &[u8]) -> Result<Vec<u8>, DataDirError> {
    let io = |source| DataDirError::Io {
        path: path.to_owned(),
        source,
    };
    let mut unique = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut unique).map_err(
        |_| DataDirError::Corrupt {
            path: path.to_owned(),
            message: "no system randomness".into(),
        },
    )?;
    let tmp = path.with_extension(format!(
        "{}.{}.tmp",
        std::process::id(),
        u64::from_le_bytes(unique)
    ));
    let written = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::hard_link(&tmp, path)
    })();
    let _ = fs::remove_file(&tmp);
    match written {
        Ok(()) => Ok(bytes.to_vec()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => fs::read(path).map_err(io),
        Err(e) => Err(io(e)),
    }
}

/// Replaces `path` with `bytes` atomically (temp + rename), mode 0600.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), DataDirError> {
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
    fn a_new_data_directory_is_created_private() {
        let root = tempfile::tempdir().unwrap();
        let dd = DataDir::open(&root.path().join("new")).unwrap();
        dd.keys().unwrap();
        let mode = fs::metadata(root.path().join("new"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o700);
        assert_eq!(dd.tighten_permissions().unwrap(), Vec::<PathBuf>::new());
    }

    #[test]
    fn processes_starting_together_on_one_directory_end_with_the_same_keys() {
        // A cluster's relays sharing one data directory start at once.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shared");
        let seen: Vec<(String, String, String)> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    scope.spawn(|| {
                        let d = DataDir::open(&path).unwrap();
                        let keys = d.keys().unwrap();
                        let (cert, key) = d.dev_certificate().unwrap();
                        // The pair on disk matches.
                        crate::certs::ReloadableCert::load(&cert, &key).unwrap();
                        (
                            keys.channel_ids.derive("device", "name"),
                            crate::cluster::naming::hex(&keys.signer.public_key()),
                            std::fs::read_to_string(cert).unwrap(),
                        )
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(seen.windows(2).all(|w| w[0] == w[1]), "{seen:?}");
        let left: Vec<_> = std::fs::read_dir(&path)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(left.is_empty(), "temporary files left: {left:?}");
    }

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
            jti: None,
            kid: None,
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

    #[test]
    fn a_rotated_key_keeps_its_tokens_valid_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let d = DataDir::open(dir.path()).unwrap();
        let before = d
            .keys()
            .unwrap()
            .device_token("d", Duration::from_secs(60), 1);
        let (old, new) = d.rotate_signing_key().unwrap();
        assert_ne!(old, new);
        let keys = d.keys().unwrap();
        assert_eq!(keys.signer.kid(), new);
        assert!(keys.verifier.verify(&before, TokenKind::Device, 2).is_ok());
        assert!(d.drop_retired_key(&old).unwrap());
        let keys = d.keys().unwrap();
        assert!(keys.verifier.verify(&before, TokenKind::Device, 2).is_err());
    }

    #[test]
    fn loose_permissions_are_tightened() {
        let dir = tempfile::tempdir().unwrap();
        let d = DataDir::open(dir.path()).unwrap();
        d.keys().unwrap();
        let key = dir.path().join(SIGNING_KEY_FILE);
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let fixed = d.tighten_permissions().unwrap();
        assert!(fixed.contains(&key), "{fixed:?}");
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(dir.path()), 0o700);
        assert!(d.tighten_permissions().unwrap().is_empty());
    }
}
