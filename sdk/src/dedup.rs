//! The persisted dedup window: the ids of events already handed to the app,
//! appended to a file (synced before each ack) so an event delivered again
//! after the app restarts does not fire its callback twice. Which ids are
//! duplicates is decided by the sans-IO
//! [`wakewire_proto::device_connection::DeviceConnection`]; this file only
//! keeps its window across restarts.
//!
//! The id is recorded after the app handled the event and before the ack
//! is written; an app killed between its handling and that write can see
//! the event once more after it restarts (the window cannot be atomic with
//! whatever the app did).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;

#[derive(Debug)]
pub(crate) struct DedupFile {
    path: PathBuf,
    file: File,
    lines: usize,
}

impl DedupFile {
    /// Opens (creating) the file; returns it and the ids it holds, oldest
    /// first.
    pub(crate) fn open(path: PathBuf) -> std::io::Result<(Self, Vec<String>)> {
        let mut ids = vec![];
        if let Ok(f) = File::open(&path) {
            for line in BufReader::new(f).lines() {
                let line = line?;
                let id = line.trim();
                if !id.is_empty() {
                    ids.push(id.to_owned());
                }
            }
        }
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let lines = ids.len();
        Ok((Self { path, file, lines }, ids))
    }

    /// Appends an id, synced. Once the file holds more than twice `window`
    /// ids, it is rewritten with `current` (the window, oldest first).
    pub(crate) fn append<'a>(
        &mut self,
        id: &str,
        window: usize,
        current: impl Iterator<Item = &'a str>,
    ) -> std::io::Result<()> {
        writeln!(self.file, "{id}")?;
        self.file.sync_data()?;
        self.lines += 1;
        if self.lines > 2 * window.max(1) {
            // Compact: rewrite the window, then swap it in.
            let tmp = self.path.with_extension("tmp");
            let mut f = File::create(&tmp)?;
            let mut n = 0;
            for id in current {
                writeln!(f, "{id}")?;
                n += 1;
            }
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            self.file = OpenOptions::new().append(true).open(&self.path)?;
            self.lines = n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn persisted_window_survives_reopen_and_compacts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seen");
        let window = ["e", "f", "g"];
        {
            let (mut f, ids) = DedupFile::open(path.clone()).unwrap();
            assert!(ids.is_empty());
            for id in ["a", "b", "c", "d", "e", "f", "g"] {
                f.append(id, 3, window.iter().copied()).unwrap();
            }
        }
        let (_, ids) = DedupFile::open(path.clone()).unwrap();
        assert!(ids.contains(&"g".to_string()) && ids.contains(&"e".to_string()));
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert!(lines <= 6, "not compacted: {lines} lines");
    }
}
