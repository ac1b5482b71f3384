//! The revocation list: token ids (`jti`) the operator has revoked, read
//! from `<data dir>/revoked-tokens` (one id per line, `#` comments) and
//! re-read whenever the file changes, so a revocation takes effect within
//! seconds without a restart: new requests and connections with a revoked
//! token are refused, and device connections already authenticated with
//! one are closed with UNAUTHORIZED.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::RwLock;
use std::time::SystemTime;

use tokio::sync::watch;

/// The revoked token ids, reloaded from their file.
#[derive(Debug)]
pub struct Revocations {
    path: PathBuf,
    ids: RwLock<HashSet<String>>,
    /// Modification time and length of the file last loaded.
    seen: RwLock<Option<(SystemTime, u64)>>,
    /// Bumped on every change, for connections to re-check their token.
    generation: watch::Sender<u64>,
}

impl Revocations {
    /// Loads `path` (a missing file is an empty list).
    pub fn load(path: PathBuf) -> std::io::Result<Self> {
        let r = Self {
            path,
            ids: RwLock::default(),
            seen: RwLock::default(),
            generation: watch::channel(0).0,
        };
        r.reload()?;
        Ok(r)
    }

    /// Whether `jti` is revoked.
    pub fn is_revoked(&self, jti: &str) -> bool {
        self.ids.read().is_ok_and(|ids| ids.contains(jti))
    }

    /// Number of revoked ids.
    pub fn len(&self) -> usize {
        self.ids.read().map_or(0, |ids| ids.len())
    }

    /// Whether nothing is revoked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Notified on every change of the list.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Re-reads the file if it changed; true if the list changed.
    pub fn reload(&self) -> std::io::Result<bool> {
        let stamp = match std::fs::metadata(&self.path) {
            Ok(m) => Some((m.modified()?, m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        if self.seen.read().is_ok_and(|s| *s == stamp) {
            return Ok(false);
        }
        let ids: HashSet<String> = match stamp {
            None => HashSet::new(),
            Some(_) => std::fs::read_to_string(&self.path)?
                .lines()
                .map(|l| l.split('#').next().unwrap_or("").trim())
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect(),
        };
        if let Ok(mut s) = self.seen.write() {
            *s = stamp;
        }
        let changed = match self.ids.write() {
            Ok(mut cur) if *cur != ids => {
                *cur = ids;
                true
            }
            _ => false,
        };
        if changed {
            self.generation.send_modify(|g| *g += 1);
        }
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_is_reloaded_when_its_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("revoked-tokens");
        let r = Revocations::load(path.clone()).unwrap();
        assert!(r.is_empty());
        let mut rx = r.subscribe();
        std::fs::write(&path, "# revoked\nabc # leaked\n\n  def  \n").unwrap();
        assert!(r.reload().unwrap());
        assert!(r.is_revoked("abc") && r.is_revoked("def") && !r.is_revoked("# revoked"));
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        assert!(!r.reload().unwrap(), "unchanged file reloaded");
        std::fs::remove_file(&path).unwrap();
        assert!(r.reload().unwrap());
        assert!(!r.is_revoked("abc"));
    }
}
