//! Certificates that can be renewed while the relay runs: the TLS configs
//! of both front doors resolve their certificate through a
//! [`ReloadableCert`], so a renewed certificate (certbot, cert-manager)
//! applies to new handshakes at once while established connections stay
//! up. The relay re-reads the files when their contents change (checked
//! every second: two small reads) and on SIGHUP.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::tls::{load_pem, TlsError};

/// A certificate and key from two PEM files, swappable at run time.
#[derive(Debug)]
pub struct ReloadableCert {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    /// Digest of the files' contents last loaded: a change of either is
    /// seen whatever the file system's timestamp granularity (two writes
    /// in the same tick share a modification time).
    stamp: RwLock<Option<[u8; 32]>>,
}

impl ReloadableCert {
    /// Loads the pair (they must match).
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<Self>, TlsError> {
        let ck = certified(cert, key)?;
        Ok(Arc::new(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: RwLock::new(Arc::new(ck)),
            stamp: RwLock::new(stamps(cert, key)),
        }))
    }

    /// Re-reads the files; the new pair is used only if it loads and
    /// matches (a half-written renewal keeps the old one in service).
    pub fn reload(&self) -> Result<(), TlsError> {
        let stamp = stamps(&self.cert, &self.key);
        let ck = certified(&self.cert, &self.key)?;
        if let Ok(mut c) = self.current.write() {
            *c = Arc::new(ck);
        }
        if let Ok(mut s) = self.stamp.write() {
            *s = stamp;
        }
        Ok(())
    }

    /// Reloads if either file changed since the last load; true if it did.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let now = stamps(&self.cert, &self.key);
        if self.stamp.read().is_ok_and(|s| *s == now) {
            return Ok(false);
        }
        self.reload().map(|()| true)
    }

    /// The certificate chain in service (leaf first).
    pub fn chain(&self) -> Vec<rustls::pki_types::CertificateDer<'static>> {
        self.current
            .read()
            .map(|c| c.cert.clone())
            .unwrap_or_default()
    }
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|c| c.clone())
    }
}

fn stamps(cert: &Path, key: &Path) -> Option<[u8; 32]> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in [cert, key] {
        let bytes = std::fs::read(p).ok()?;
        ctx.update(&(bytes.len() as u64).to_le_bytes());
        ctx.update(&bytes);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    Some(out)
}

fn certified(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let (chain, key_der) = load_pem(cert, key)?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key_der)
        .map_err(|e| TlsError::Config(format!("{}: {e}", key.display())))?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match().map_err(|e| {
        TlsError::Config(format!(
            "{} does not match {}: {e}",
            key.display(),
            cert.display()
        ))
    })?;
    Ok(ck)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let ck = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
        let (c, k) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, ck.cert.pem()).unwrap();
        std::fs::write(&k, ck.key_pair.serialize_pem()).unwrap();
        (c, k)
    }

    #[test]
    fn a_renewed_pair_replaces_the_old_one_and_a_broken_one_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = write_pair(dir.path(), "one");
        let r = ReloadableCert::load(&c, &k).unwrap();
        let first = r.chain();
        assert!(!r.reload_if_changed().unwrap(), "unchanged files reloaded");
        let (c2, k2) = write_pair(dir.path(), "two");
        std::fs::rename(&c2, &c).unwrap();
        std::fs::rename(&k2, &k).unwrap();
        assert!(r.reload_if_changed().unwrap());
        assert_ne!(r.chain(), first);
        // A key that does not match: refused, the last pair stays.
        let (_, k3) = write_pair(dir.path(), "three");
        let before = r.chain();
        std::fs::rename(&k3, &k).unwrap();
        assert!(r.reload_if_changed().is_err());
        assert_eq!(r.chain(), before);
    }
}
