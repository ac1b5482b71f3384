//! Stateless TLS session tickets from a persisted, rotated key.
//!
//! A device that resumes a TLS session skips the certificate signature and
//! its check: a cheaper handshake for the relay and a smaller first flight
//! for the device. With tickets the relay keeps nothing per device (a
//! server-side session cache costs memory for every device and is empty
//! after a restart); the ticket is the session state, sealed with
//! ChaCha20-Poly1305 under a key kept in the data directory, so resumption
//! works across restarts and crashes, which is when a whole fleet
//! reconnects at once.
//!
//! Keys: the current key seals new tickets; the previous one still opens
//! tickets it sealed. Every `rotation` the current key becomes the previous
//! and a new one is made (and the old previous is erased, which bounds how
//! long a stolen key file opens recorded sessions). A ticket therefore
//! resumes for `rotation` to `2 × rotation` after it was issued.
//!
//! 0-RTT: rustls accepts early data only with single-use server-side state
//! (its defence against replay), so with tickets a reconnecting device's
//! Hello waits for the handshake (one round trip). Operators who want 0-RTT
//! choose `tls_resumption = "cache"` and pay the cache's memory.
//!
//! [`KeyRing`] decides (rotation, which key opens a ticket) with the time
//! passed in; [`Ticketer`] does the file I/O and reads the clock.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

use crate::data_dir::DataDirError;

/// File name of the ticket keys in the data directory.
pub const TICKET_KEYS_FILE: &str = "tls-ticket-keys";

/// Bytes of a key id at the start of every ticket.
const KEY_ID_LEN: usize = 4;
/// Bytes of a ticket key.
const KEY_LEN: usize = 32;

/// One ticket key.
#[derive(Clone)]
pub struct TicketKey {
    id: [u8; KEY_ID_LEN],
    created_s: u64,
    secret: [u8; KEY_LEN],
}

impl std::fmt::Debug for TicketKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TicketKey")
            .field("id", &hex(&self.id))
            .field("created_s", &self.created_s)
            .finish_non_exhaustive()
    }
}

impl TicketKey {
    fn random(rng: &dyn SecureRandom, now_s: u64) -> Option<Self> {
        let mut id = [0u8; KEY_ID_LEN];
        let mut secret = [0u8; KEY_LEN];
        rng.fill(&mut id).ok()?;
        rng.fill(&mut secret).ok()?;
        Some(Self {
            id,
            created_s: now_s,
            secret,
        })
    }

    fn aead(&self) -> LessSafeKey {
        // A 32-byte key is always valid for ChaCha20-Poly1305.
        LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &self.secret).expect("32-byte key"))
    }
}

/// The current and previous ticket keys; decides rotation and which key
/// opens a ticket. No I/O, no clock.
#[derive(Debug, Clone)]
pub struct KeyRing {
    current: TicketKey,
    previous: Option<TicketKey>,
    rotation_s: u64,
}

impl KeyRing {
    /// A ring with one fresh key.
    fn new(current: TicketKey, rotation: Duration) -> Self {
        Self {
            current,
            previous: None,
            rotation_s: rotation.as_secs().max(1),
        }
    }

    /// Whether the current key is due for replacement at `now_s`.
    pub fn due(&self, now_s: u64) -> bool {
        now_s >= self.current.created_s.saturating_add(self.rotation_s)
            // A clock that went back a lot: start again from now.
            || now_s.saturating_add(self.rotation_s) < self.current.created_s
    }

    /// Makes `next` the current key; the current one becomes the previous,
    /// unless it is too old to open anything still valid (then both go).
    fn rotate(&mut self, next: TicketKey) {
        let old = std::mem::replace(&mut self.current, next);
        let still_useful =
            old.created_s.saturating_add(2 * self.rotation_s) > self.current.created_s;
        self.previous = still_useful.then_some(old);
    }

    /// The key with this id, if the ring still has it.
    fn key(&self, id: &[u8]) -> Option<&TicketKey> {
        std::iter::once(&self.current)
            .chain(self.previous.as_ref())
            .find(|k| k.id == id)
    }

    /// The file form: one `v1 <created unix s> <id hex> <key hex>` line per
    /// key, current first.
    fn encode(&self) -> String {
        std::iter::once(&self.current)
            .chain(self.previous.as_ref())
            .map(|k| format!("v1 {} {} {}\n", k.created_s, hex(&k.id), hex(&k.secret)))
            .collect()
    }

    /// Parses [`KeyRing::encode`]'s form.
    fn decode(text: &str, rotation: Duration) -> Result<Self, String> {
        let mut keys = vec![];
        for (n, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let bad = |what: &str| format!("line {}: {what}", n + 1);
            let f: Vec<&str> = line.split_whitespace().collect();
            let [v, created, id, secret] = f.as_slice() else {
                return Err(bad("expected `v1 <created> <id> <key>`"));
            };
            if *v != "v1" {
                return Err(bad("unknown version"));
            }
            keys.push(TicketKey {
                created_s: created.parse().map_err(|_| bad("bad creation time"))?,
                id: unhex(id).ok_or_else(|| bad("bad key id"))?,
                secret: unhex(secret).ok_or_else(|| bad("bad key"))?,
            });
        }
        let mut keys = keys.into_iter();
        let current = keys.next().ok_or("no key")?;
        let mut ring = Self::new(current, rotation);
        ring.previous = keys.next();
        Ok(ring)
    }
}

/// Seals and opens session tickets for rustls with the data directory's
/// rotated keys.
pub struct Ticketer {
    ring: Mutex<KeyRing>,
    path: PathBuf,
    rng: SystemRandom,
}

impl std::fmt::Debug for Ticketer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticketer")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Ticketer {
    /// Loads the keys from `dir`, creating or rotating them as due.
    pub fn open(dir: &Path, rotation: Duration) -> Result<Self, DataDirError> {
        let path = dir.join(TICKET_KEYS_FILE);
        let rng = SystemRandom::new();
        let now_s = crate::state::clock::unix_ms() / 1000;
        let corrupt = |message: String| DataDirError::Corrupt {
            path: path.clone(),
            message,
        };
        let no_random = || corrupt("no system randomness".into());
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Created once: relays starting together on one directory
                // end with the same key.
                let first = KeyRing::new(
                    TicketKey::random(&rng, now_s).ok_or_else(no_random)?,
                    rotation,
                );
                let bytes = crate::data_dir::create_private_once(&path, first.encode().as_bytes())?;
                String::from_utf8_lossy(&bytes).into_owned()
            }
            Err(source) => {
                return Err(DataDirError::Io {
                    path: path.clone(),
                    source,
                })
            }
        };
        let mut ring = KeyRing::decode(&text, rotation).map_err(corrupt)?;
        if ring.due(now_s) {
            ring.rotate(TicketKey::random(&rng, now_s).ok_or_else(no_random)?);
            crate::data_dir::write_private(&path, ring.encode().as_bytes())?;
        }
        Ok(Self {
            ring: Mutex::new(ring),
            path,
            rng,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, KeyRing> {
        // A panic elsewhere while holding it cannot leave the ring torn:
        // every change is one assignment.
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Rotates if due; a key file that cannot be written is logged and the
    /// new key used anyway (tickets then stop resuming after a restart).
    fn current(&self) -> TicketKey {
        let now_s = crate::state::clock::unix_ms() / 1000;
        let mut ring = self.lock();
        if ring.due(now_s) {
            if let Some(next) = TicketKey::random(&self.rng, now_s) {
                ring.rotate(next);
                if let Err(e) = crate::data_dir::write_private(&self.path, ring.encode().as_bytes())
                {
                    tracing::warn!(error = %e, "TLS ticket key rotated but not saved");
                }
            }
        }
        ring.current.clone()
    }
}

impl rustls::server::ProducesTickets for Ticketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        u32::try_from(self.lock().rotation_s).unwrap_or(u32::MAX)
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let key = self.current();
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(KEY_ID_LEN + NONCE_LEN + plain.len() + 16);
        out.extend_from_slice(&key.id);
        out.extend_from_slice(&nonce);
        let mut sealed = plain.to_vec();
        key.aead()
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&key.id),
                &mut sealed,
            )
            .ok()?;
        out.extend_from_slice(&sealed);
        Some(out)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        let (id, rest) = cipher.split_at_checked(KEY_ID_LEN)?;
        let (nonce, sealed) = rest.split_at_checked(NONCE_LEN)?;
        let key = self.lock().key(id)?.clone();
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = sealed.to_vec();
        let plain = key
            .aead()
            .open_in_place(nonce, Aad::from(id), &mut buf)
            .ok()?;
        let n = plain.len();
        buf.truncate(n);
        metrics::counter!(crate::metrics::TLS_TICKETS_OPENED).increment(1);
        Some(buf)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::server::ProducesTickets;

    const HOUR: Duration = Duration::from_secs(3600);

    fn key(byte: u8, created_s: u64) -> TicketKey {
        TicketKey {
            id: [byte; KEY_ID_LEN],
            created_s,
            secret: [byte; KEY_LEN],
        }
    }

    #[test]
    fn a_ring_rotates_each_period_and_forgets_keys_two_periods_old() {
        let mut ring = KeyRing::new(key(1, 1000), HOUR);
        assert!(!ring.due(1000 + 3599));
        assert!(ring.due(1000 + 3600));
        ring.rotate(key(2, 1000 + 3600));
        assert!(ring.key(&[1; 4]).is_some(), "the previous key still opens");
        assert!(ring.key(&[2; 4]).is_some());
        ring.rotate(key(3, 1000 + 7200));
        assert!(ring.key(&[1; 4]).is_none(), "two periods old: erased");
        // After a long stop, the old current key is too old to keep.
        ring.rotate(key(4, 1000 + 7200 * 10));
        assert!(ring.previous.is_none());
        // A clock far in the past of the key: rotate.
        assert!(ring.due(10));
        let back = KeyRing::decode(&ring.encode(), HOUR).unwrap();
        assert_eq!(back.encode(), ring.encode());
    }

    #[test]
    fn a_damaged_key_file_is_a_clear_error() {
        for text in ["", "v2 1 00000000 00", "v1 x 00000000 00", "v1 1 0000 00"] {
            let e = KeyRing::decode(text, HOUR).unwrap_err();
            assert!(!e.is_empty());
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(TICKET_KEYS_FILE), "garbage\n").unwrap();
        let e = Ticketer::open(dir.path(), HOUR).unwrap_err().to_string();
        assert!(e.contains(TICKET_KEYS_FILE) && e.contains("line 1"), "{e}");
    }

    #[test]
    fn tickets_open_after_a_restart_and_not_with_another_key_or_when_tampered() {
        let dir = tempfile::tempdir().unwrap();
        let t = Ticketer::open(dir.path(), HOUR).unwrap();
        let ticket = t.encrypt(b"session state").unwrap();
        assert_eq!(t.decrypt(&ticket).unwrap(), b"session state");
        // The key file is private and survives a restart.
        let path = dir.path().join(TICKET_KEYS_FILE);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        drop(t);
        let again = Ticketer::open(dir.path(), HOUR).unwrap();
        assert_eq!(again.decrypt(&ticket).unwrap(), b"session state");
        // Any flipped bit, a truncation or a foreign relay's key: refused.
        for i in 0..ticket.len() {
            let mut bad = ticket.clone();
            bad[i] ^= 1;
            assert!(again.decrypt(&bad).is_none(), "byte {i}");
        }
        for n in 0..ticket.len() {
            assert!(again.decrypt(&ticket[..n]).is_none());
        }
        let other = tempfile::tempdir().unwrap();
        let foreign = Ticketer::open(other.path(), HOUR).unwrap();
        assert!(foreign.decrypt(&ticket).is_none());
        assert_eq!(again.lifetime(), 3600);
    }
}
