//! Names a cluster derives: streams, buckets, subjects, device keys and
//! event ids. Pure functions of the cluster name and the shared key, so
//! every relay of a cluster computes the same ones (docs/cluster.md,
//! "Subjects").
//!
//! - `<p>.ev.<devkey>.<channel>.q`: a channel's queued events (at most
//!   `queue_limit`, JetStream refuses more: discard-new per subject);
//! - `<p>.ev.<devkey>.<channel>.c.<collapse>`: the one queued event of a
//!   collapse key (a newer one rolls it up);
//! - `<p>.st.<event id>`: an event's final state (a receipt), kept for the
//!   status retention;
//! - `<p>.w.<publisher key>`: receipts for WatchDeliveries (core NATS, not
//!   stored);
//! - `<p>.live.<devkey>`: the relay that holds a device answers here
//!   (presence, deliver-now-or-never wakes, takeover).
//!
//! `devkey` is 8 hex characters of a keyed hash of the device id: short,
//! subject-safe, unlinkable to the device id without the key. Two devices
//! may share one (about one pair in 4 billion); a device's relay checks the
//! full device hash carried in each event's headers and skips the other's.

use ring::hmac;

/// Header carrying the full device hash of an event.
pub const DEVICE_HEADER: &str = "Ww-Device";
/// Header carrying the request hash of a keyed publish (idempotency).
pub const REQUEST_HEADER: &str = "Ww-Request";

/// The names of one cluster (`cluster_name` setting, e.g. `wakewire`).
#[derive(Debug, Clone)]
pub struct Names {
    prefix: String,
    key: hmac::Key,
}

impl Names {
    /// Names under `prefix` (validated by the settings: lower-case letters,
    /// digits, `_`), derived with `key`.
    pub fn new(prefix: &str, key: hmac::Key) -> Self {
        Self {
            prefix: prefix.to_owned(),
            key,
        }
    }

    /// The stream of queued events.
    pub fn events_stream(&self) -> String {
        format!("{}_EVENTS", self.prefix.to_ascii_uppercase())
    }

    /// The stream of final states (receipts).
    pub fn status_stream(&self) -> String {
        format!("{}_STATUS", self.prefix.to_ascii_uppercase())
    }

    /// The key-value bucket of channel records.
    pub fn channels_bucket(&self) -> String {
        format!("{}_channels", self.prefix)
    }

    /// The key-value bucket where live relays announce themselves.
    pub fn relays_bucket(&self) -> String {
        format!("{}_relays", self.prefix)
    }

    /// Subjects of the events stream.
    pub fn events_subjects(&self) -> String {
        format!("{}.ev.>", self.prefix)
    }

    /// Subjects of the status stream.
    pub fn status_subjects(&self) -> String {
        format!("{}.st.>", self.prefix)
    }

    /// The short key of a device in subjects and event ids.
    pub fn devkey(&self, device_id: &str) -> String {
        hex(&self.mac(b"devkey", device_id.as_bytes())[..4])
    }

    /// The full hash of a device (in each event's headers).
    pub fn device_hash(&self, device_id: &str) -> String {
        hex(&self.mac(b"device", device_id.as_bytes())[..16])
    }

    /// Where a channel's plain events queue.
    pub fn queue_subject(&self, devkey: &str, channel_id: &str) -> String {
        format!("{}.ev.{devkey}.{channel_id}.q", self.prefix)
    }

    /// Where the event of a collapse key waits.
    pub fn collapse_subject(&self, devkey: &str, channel_id: &str, collapse_key: &str) -> String {
        let k = hex(&self.mac(b"collapse", collapse_key.as_bytes())[..8]);
        format!("{}.ev.{devkey}.{channel_id}.c.{k}", self.prefix)
    }

    /// Every queued event of a device.
    pub fn device_filter(&self, devkey: &str) -> String {
        format!("{}.ev.{devkey}.>", self.prefix)
    }

    /// Every queued event of one channel.
    pub fn channel_filter(&self, devkey: &str, channel_id: &str) -> String {
        format!("{}.ev.{devkey}.{channel_id}.>", self.prefix)
    }

    /// An event's final state.
    pub fn status_subject(&self, event_id: &str) -> String {
        format!("{}.st.{event_id}", self.prefix)
    }

    /// Receipts of one publisher, for its WatchDeliveries streams.
    pub fn watch_subject(&self, publisher: &str) -> String {
        let k = hex(&self.mac(b"publisher", publisher.as_bytes())[..8]);
        format!("{}.w.{k}", self.prefix)
    }

    /// The subject the relay holding a device listens on.
    pub fn live_subject(&self, devkey: &str) -> String {
        format!("{}.live.{devkey}", self.prefix)
    }

    /// The JetStream message id of a keyed publish (deduplication window).
    pub fn message_id(&self, scoped_key: &str) -> String {
        hex(&self.mac(b"msgid", scoped_key.as_bytes())[..16])
    }

    /// A new event's id: 32 hex characters like a single node's, with the
    /// devkey inside (so a status lookup finds the device's queue): the
    /// creation time (6 bytes), the devkey (4), 6 random bytes.
    pub fn event_id(&self, unix_ms: u64, devkey: &str, random: [u8; 6]) -> String {
        let mut out = hex(&unix_ms.to_be_bytes()[2..]);
        out.push_str(devkey);
        out.push_str(&hex(&random));
        out
    }

    /// The id of a keyed event: the same for every retry of the same
    /// publisher's key, on any relay.
    pub fn keyed_event_id(&self, scoped_key: &str, devkey: &str) -> String {
        let h = self.mac(b"eventid", scoped_key.as_bytes());
        let mut out = hex(&h[..6]);
        out.push_str(devkey);
        out.push_str(&hex(&h[6..12]));
        out
    }

    fn mac(&self, purpose: &[u8], input: &[u8]) -> Vec<u8> {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(purpose);
        ctx.update(&[0]);
        ctx.update(input);
        ctx.sign().as_ref().to_vec()
    }
}

/// The devkey inside an event id (None if it is not an event id).
pub fn devkey_of(event_id: &str) -> Option<&str> {
    (event_id.len() == 32 && event_id.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| &event_id[12..20])
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(secret: &[u8]) -> Names {
        Names::new("wakewire", hmac::Key::new(hmac::HMAC_SHA256, secret))
    }

    #[test]
    fn relays_sharing_the_key_derive_the_same_names() {
        let (a, b, other) = (names(b"k1"), names(b"k1"), names(b"k2"));
        assert_eq!(a.devkey("phone-42"), b.devkey("phone-42"));
        assert_ne!(a.devkey("phone-42"), other.devkey("phone-42"));
        assert_ne!(a.devkey("phone-42"), a.devkey("phone-43"));
        assert_eq!(a.devkey("phone-42").len(), 8);
        assert_eq!(a.device_hash("phone-42").len(), 32);
        assert_eq!(
            a.keyed_event_id("scope:k", "0badc0de"),
            b.keyed_event_id("scope:k", "0badc0de")
        );
        assert_ne!(
            a.keyed_event_id("scope:k", "0badc0de"),
            a.keyed_event_id("scope:j", "0badc0de")
        );
    }

    #[test]
    fn event_ids_carry_their_devkey_and_look_like_single_node_ones() {
        let n = names(b"k");
        let dk = n.devkey("phone-42");
        for id in [
            n.event_id(1_700_000_000_000, &dk, [1, 2, 3, 4, 5, 6]),
            n.keyed_event_id("scope:key", &dk),
        ] {
            assert_eq!(id.len(), wakewire_proto::ids::EVENT_ID_LEN);
            assert_eq!(devkey_of(&id), Some(dk.as_str()));
        }
        assert_eq!(devkey_of("not an id"), None);
        assert_eq!(devkey_of(&"g".repeat(32)), None);
        // Ids sort by time like a single node's.
        let early = n.event_id(1_000, &dk, [9; 6]);
        let late = n.event_id(2_000, &dk, [0; 6]);
        assert!(early < late);
    }

    #[test]
    fn subjects_are_valid_nats_tokens_and_nest_as_filters_expect() {
        let n = names(b"k");
        let dk = n.devkey("d");
        let channel = "3q2-7wEjXh0pQ0Bqk5Xv1A";
        let q = n.queue_subject(&dk, channel);
        let c = n.collapse_subject(&dk, channel, "inbox count: ✉ . > *");
        for s in [&q, &c, &n.status_subject("ab"), &n.live_subject(&dk)] {
            assert!(
                s.split('.').all(|t| !t.is_empty()
                    && t.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')),
                "{s}"
            );
        }
        let under = |filter: &str, s: &str| s.starts_with(filter.trim_end_matches('>'));
        assert!(under(&n.device_filter(&dk), &q) && under(&n.device_filter(&dk), &c));
        assert!(under(&n.channel_filter(&dk, channel), &c));
        assert!(under(&n.events_subjects(), &q));
        assert!(under(&n.status_subjects(), &n.status_subject("x")));
        assert_eq!(n.events_stream(), "WAKEWIRE_EVENTS");
    }
}
