//! Per-network memory of what the keepalive tuner learned, so a device
//! returning to a known network starts at its learned interval instead of
//! probing from scratch. One line per network in a small text file:
//! `network_id lower_ms upper_ms|- learned_unix_s`.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use crate::tuner::Learned;

/// What is known about each network.
#[derive(Debug, Default)]
pub(crate) struct NetworkMemory {
    path: Option<PathBuf>,
    entries: HashMap<String, (Learned, u64)>,
}

/// Network ids are written without whitespace.
fn clean(id: &str) -> String {
    id.chars()
        .map(|c| if c.is_whitespace() { '_' } else { c })
        .collect()
}

fn now_unix() -> u64 {
    crate::clock::unix_secs()
}

impl NetworkMemory {
    /// Loads `path` if given (a missing or unreadable line is skipped).
    pub(crate) fn open(path: Option<PathBuf>) -> Self {
        let mut entries = HashMap::new();
        if let Some(text) = path.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) {
            for line in text.lines() {
                let f: Vec<&str> = line.split_whitespace().collect();
                let [id, lower, upper, at] = f.as_slice() else {
                    continue;
                };
                let (Ok(lower), Ok(at)) = (lower.parse::<u64>(), at.parse::<u64>()) else {
                    continue;
                };
                let upper = upper.parse::<u64>().ok().map(Duration::from_millis);
                entries.insert(
                    (*id).to_owned(),
                    (
                        Learned {
                            lower: Duration::from_millis(lower),
                            upper,
                        },
                        at,
                    ),
                );
            }
        }
        Self { path, entries }
    }

    /// What was learned about `network`, if recently enough.
    pub(crate) fn get(&self, network: &str, max_age: Duration) -> Option<Learned> {
        let (learned, at) = self.entries.get(&clean(network))?;
        (now_unix().saturating_sub(*at) <= max_age.as_secs()).then_some(*learned)
    }

    /// Records and persists what was learned about `network`.
    pub(crate) fn put(&mut self, network: &str, learned: Learned) -> std::io::Result<()> {
        self.entries.insert(clean(network), (learned, now_unix()));
        let Some(path) = &self.path else {
            return Ok(());
        };
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        for (id, (l, at)) in &self.entries {
            let upper = l
                .upper
                .map_or("-".to_owned(), |u| u.as_millis().to_string());
            writeln!(f, "{id} {} {upper} {at}", l.lower.as_millis())?;
        }
        f.sync_all()?;
        std::fs::rename(tmp, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learned_values_survive_a_reload_and_age_out() {
        let dir = std::env::temp_dir().join(format!("wakewire-netmem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("networks");
        let mut m = NetworkMemory::open(Some(path.clone()));
        let l = Learned {
            lower: Duration::from_secs(290),
            upper: Some(Duration::from_secs(300)),
        };
        m.put("home wifi", l).unwrap();
        m.put(
            "carrier",
            Learned {
                lower: Duration::from_secs(1800),
                upper: None,
            },
        )
        .unwrap();
        let m = NetworkMemory::open(Some(path));
        assert_eq!(m.get("home wifi", Duration::from_secs(60)), Some(l));
        assert_eq!(
            m.get("carrier", Duration::from_secs(60)).unwrap().upper,
            None
        );
        assert_eq!(m.get("elsewhere", Duration::from_secs(60)), None);
        // Something learned long ago is not trusted any more.
        let old = dir.join("old");
        std::fs::write(&old, "cafe 60000 61000 1\nbroken line\n").unwrap();
        let m = NetworkMemory::open(Some(old));
        assert_eq!(m.get("cafe", Duration::from_secs(86_400)), None);
        assert!(m.get("cafe", Duration::from_secs(u64::MAX / 2)).is_some());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
