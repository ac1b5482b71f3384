//! The window of event ids already handed to the app, so a wake the relay
//! sends again (its ack was lost, the connection dropped between Wake and
//! Ack, the relay restarted before recording the ack) fires its callback
//! once. Optionally persisted to a file so the window survives app restarts.
//!
//! The id is recorded after the callback returns and before the ack is
//! sent; an app killed between its callback and that write can see the
//! event once more after it restarts (the window cannot be atomic with
//! whatever the callback did).

use std::collections::{HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;

/// Default number of ids remembered.
pub const DEFAULT_WINDOW: usize = 4096;

#[derive(Debug)]
pub(crate) struct Seen {
    order: VecDeque<String>,
    set: HashSet<String>,
    cap: usize,
    file: Option<(PathBuf, File, usize)>,
}

impl Seen {
    /// A window of `cap` ids, loaded from and appended to `path` if given.
    pub(crate) fn open(path: Option<PathBuf>, cap: usize) -> std::io::Result<Self> {
        let mut seen = Self {
            order: VecDeque::new(),
            set: HashSet::new(),
            cap: cap.max(1),
            file: None,
        };
        if let Some(path) = path {
            let mut lines = 0;
            if let Ok(f) = File::open(&path) {
                for line in BufReader::new(f).lines() {
                    let line = line?;
                    let id = line.trim();
                    if !id.is_empty() {
                        seen.remember(id.to_owned());
                        lines += 1;
                    }
                }
            }
            let f = OpenOptions::new().create(true).append(true).open(&path)?;
            seen.file = Some((path, f, lines));
        }
        Ok(seen)
    }

    pub(crate) fn contains(&self, id: &str) -> bool {
        self.set.contains(id)
    }

    fn remember(&mut self, id: String) {
        if self.set.insert(id.clone()) {
            self.order.push_back(id);
            while self.order.len() > self.cap {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }

    /// Records an id (and persists it, synced, if a file is used).
    pub(crate) fn insert(&mut self, id: &str) -> std::io::Result<()> {
        self.remember(id.to_owned());
        let Some((path, file, lines)) = &mut self.file else {
            return Ok(());
        };
        writeln!(file, "{id}")?;
        file.sync_data()?;
        *lines += 1;
        if *lines > 2 * self.cap {
            // Compact: rewrite the window, then swap it in.
            let tmp = path.with_extension("tmp");
            let mut f = File::create(&tmp)?;
            for id in &self.order {
                writeln!(f, "{id}")?;
            }
            f.sync_all()?;
            std::fs::rename(&tmp, &*path)?;
            *file = OpenOptions::new().append(true).open(&*path)?;
            *lines = self.order.len();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_forgets_the_oldest() {
        let mut s = Seen::open(None, 2).unwrap();
        s.insert("a").unwrap();
        s.insert("b").unwrap();
        s.insert("c").unwrap();
        assert!(!s.contains("a") && s.contains("b") && s.contains("c"));
    }

    #[test]
    fn persisted_window_survives_reopen_and_compacts() {
        let dir = std::env::temp_dir().join(format!("wakewire-dedup-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("seen");
        let _ = std::fs::remove_file(&path);
        {
            let mut s = Seen::open(Some(path.clone()), 3).unwrap();
            for id in ["a", "b", "c", "d", "e", "f", "g"] {
                s.insert(id).unwrap();
            }
        }
        let s = Seen::open(Some(path.clone()), 3).unwrap();
        assert!(s.contains("g") && s.contains("e") && !s.contains("d"));
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert!(lines <= 6, "not compacted: {lines} lines");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
