//! Which channels exist, which device owns each, and which connection a
//! connected device is on. Lock-free maps (dashmap) shared by every
//! connection task and the publish service.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::{mpsc, oneshot};
use wakewire_proto::pb::device::{GoAwayReason, Wake};

use crate::claims::Claim;

/// A registered channel.
#[derive(Debug, Clone)]
pub struct ChannelEntry {
    /// Owning device.
    pub device_id: Arc<str>,
    /// Name the device registered it under.
    pub name: Arc<str>,
    /// Last time its device registered it, Unix ms (as persisted).
    pub registered_ms: u64,
}

/// What became of one wake handed to a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The device acked it.
    Delivered,
    /// The connection let it go without sending it (it stays queued if
    /// stored).
    NotSent,
}

/// Work for a connection task.
#[derive(Debug)]
pub(crate) enum ConnCommand {
    /// Deliver a wake (unless already tracked on this connection); report
    /// what became of it if someone waits. A stored event comes with its
    /// claim (single node) or its record in the cluster's events stream
    /// (`seq` set: cluster mode).
    Deliver {
        wake: Wake,
        durable: bool,
        claim: Option<Claim>,
        reply: Option<oneshot::Sender<Delivery>>,
        stored: Option<Box<crate::pb::StoredEvent>>,
    },
    /// Ask the device to leave (for one of `alternatives`, relays of the
    /// same cluster, if any).
    GoAway {
        reason: GoAwayReason,
        reconnect_after: Duration,
        message: &'static str,
        alternatives: Vec<String>,
    },
}

/// Sender half of a connection task's command queue. Commands are boxed so
/// an idle connection's queue stays small.
pub(crate) type ConnSender = mpsc::Sender<Box<ConnCommand>>;

#[derive(Debug, Clone)]
struct DeviceConn {
    conn_id: u64,
    tx: ConnSender,
}

/// A gone channel: why, whose, since when (Unix ms).
#[derive(Debug, Clone)]
struct Gone {
    reason: String,
    device_id: Arc<str>,
    at_ms: u64,
}

/// The device would exceed its channel limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManyChannels {
    /// Live channels the device has.
    pub live: usize,
    /// New ones it asked for.
    pub new: usize,
}

/// Channel and connection tables.
#[derive(Debug, Default)]
pub struct Registry {
    channels: DashMap<String, ChannelEntry>,
    /// Live channel ids per device, across all its connections.
    by_device: DashMap<Arc<str>, HashSet<String>>,
    /// Channels that are gone (unregistered, expired).
    gone: DashMap<String, Gone>,
    devices: DashMap<Arc<str>, DeviceConn>,
}

impl Registry {
    /// Records a channel; returns the previous registration time if it was
    /// known and not gone.
    pub fn register_channel(
        &self,
        channel_id: &str,
        device_id: &Arc<str>,
        name: &str,
        now_ms: u64,
    ) -> Option<u64> {
        self.gone.remove(channel_id);
        self.by_device
            .entry(device_id.clone())
            .or_default()
            .insert(channel_id.to_owned());
        let previous = self.channels.get(channel_id).map(|e| e.registered_ms);
        self.channels.insert(
            channel_id.to_owned(),
            ChannelEntry {
                device_id: device_id.clone(),
                name: name.into(),
                registered_ms: now_ms.max(previous.unwrap_or(0)),
            },
        );
        previous
    }

    /// Checks that `device_id` may have the channels `ids` live at once
    /// (those it has already count once), within `max` channels per device.
    pub fn check_channel_limit(
        &self,
        device_id: &str,
        ids: &[String],
        max: usize,
    ) -> Result<(), TooManyChannels> {
        let (live, new) = match self.by_device.get(device_id) {
            Some(set) => (
                set.len(),
                ids.iter().filter(|id| !set.contains(*id)).count(),
            ),
            None => (0, ids.len()),
        };
        if live + new > max {
            return Err(TooManyChannels { live, new });
        }
        Ok(())
    }

    /// Live channels of a device.
    pub fn device_channel_count(&self, device_id: &str) -> usize {
        self.by_device.get(device_id).map_or(0, |s| s.len())
    }

    /// Marks a channel of `device_id` gone at `at_ms`.
    pub fn channel_gone(&self, channel_id: &str, device_id: &Arc<str>, reason: &str, at_ms: u64) {
        self.channels.remove(channel_id);
        if let Some(mut set) = self.by_device.get_mut(device_id) {
            set.remove(channel_id);
        }
        self.by_device.remove_if(device_id, |_, set| set.is_empty());
        self.gone.insert(
            channel_id.to_owned(),
            Gone {
                reason: reason.to_owned(),
                device_id: device_id.clone(),
                at_ms,
            },
        );
    }

    /// Gone channels that went before `before_ms` (to forget for good).
    pub fn gone_before(&self, before_ms: u64) -> Vec<String> {
        self.gone
            .iter()
            .filter(|g| g.at_ms < before_ms)
            .map(|g| g.key().clone())
            .collect()
    }

    /// Forgets a gone channel (publishing to it is then plain NOT_FOUND).
    pub fn forget_gone(&self, channel_id: &str) {
        self.gone.remove(channel_id);
    }

    /// Number of gone channels remembered.
    pub fn gone_count(&self) -> usize {
        self.gone.len()
    }

    /// Why a channel is gone, if it is.
    pub fn gone_reason(&self, channel_id: &str) -> Option<String> {
        self.gone.get(channel_id).map(|g| g.reason.clone())
    }

    /// The device a channel belongs (or belonged, if gone) to.
    pub fn owner(&self, channel_id: &str) -> Option<Arc<str>> {
        match self.channels.get(channel_id) {
            Some(c) => Some(c.device_id.clone()),
            None => self.gone.get(channel_id).map(|g| g.device_id.clone()),
        }
    }

    /// Channels last registered before `before_ms` whose device is not
    /// connected.
    pub fn stale_channels(&self, before_ms: u64) -> Vec<String> {
        self.channels
            .iter()
            .filter(|e| e.registered_ms < before_ms && !self.devices.contains_key(&*e.device_id))
            .map(|e| e.key().clone())
            .collect()
    }

    /// Looks a channel up.
    pub fn channel(&self, channel_id: &str) -> Option<ChannelEntry> {
        self.channels.get(channel_id).map(|e| e.value().clone())
    }

    /// Number of known channels.
    pub fn channel_count(&self) -> usize {
        self.channels.len()
    }

    /// Number of connected devices.
    pub fn connected_devices(&self) -> usize {
        self.devices.len()
    }

    /// Makes `conn_id` the device's connection; returns the previous
    /// connection's queue, which should be told to go away.
    pub(crate) fn attach(
        &self,
        device_id: Arc<str>,
        conn_id: u64,
        tx: ConnSender,
    ) -> Option<ConnSender> {
        self.devices
            .insert(device_id, DeviceConn { conn_id, tx })
            .filter(|old| old.conn_id != conn_id)
            .map(|old| old.tx)
    }

    /// Removes the device's connection if it is still `conn_id`.
    pub(crate) fn detach(&self, device_id: &str, conn_id: u64) {
        self.devices
            .remove_if(device_id, |_, c| c.conn_id == conn_id);
    }

    /// The queue of the device's connection, if connected.
    pub(crate) fn connection(&self, device_id: &str) -> Option<ConnSender> {
        self.devices.get(device_id).map(|c| c.tx.clone())
    }

    /// Queues of every connection.
    pub(crate) fn all_connections(&self) -> Vec<ConnSender> {
        self.devices.iter().map(|c| c.tx.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_replaces_and_detach_only_removes_the_current_connection() {
        let r = Registry::default();
        let dev: Arc<str> = "d".into();
        let (tx1, _rx1) = mpsc::channel(1);
        let (tx2, _rx2) = mpsc::channel(1);
        assert!(r.attach(dev.clone(), 1, tx1).is_none());
        assert!(r.attach(dev.clone(), 2, tx2).is_some());
        r.detach("d", 1);
        assert!(
            r.connection("d").is_some(),
            "stale detach must not remove the new connection"
        );
        r.detach("d", 2);
        assert!(r.connection("d").is_none());

        assert_eq!(r.register_channel("c", &dev, "mail", 5), None);
        assert_eq!(&*r.channel("c").unwrap().name, "mail");
        assert_eq!(r.register_channel("c", &dev, "mail", 7), Some(5));
        assert_eq!(r.stale_channels(8), vec!["c".to_string()]);
        assert!(r.stale_channels(7).is_empty());
        r.channel_gone("c", &dev, "unregistered", 8);
        assert!(r.channel("c").is_none());
        assert_eq!(r.gone_reason("c").as_deref(), Some("unregistered"));
        assert_eq!(r.owner("c").as_deref(), Some("d"));
        assert_eq!(r.gone_before(9), vec!["c".to_string()]);
        assert!(r.gone_before(8).is_empty());
        r.register_channel("c", &dev, "mail", 9);
        assert!(r.gone_reason("c").is_none());
    }

    #[test]
    fn the_channel_limit_counts_a_device_s_channels_across_connections() {
        let r = Registry::default();
        let dev: Arc<str> = "d".into();
        for id in ["a", "b"] {
            r.register_channel(id, &dev, id, 1);
        }
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // Already live channels count once.
        assert_eq!(r.check_channel_limit("d", &ids(&["a", "b"]), 2), Ok(()));
        assert_eq!(
            r.check_channel_limit("d", &ids(&["a", "c"]), 2),
            Err(TooManyChannels { live: 2, new: 1 })
        );
        // A gone channel frees its place.
        r.channel_gone("a", &dev, "unregistered", 2);
        assert_eq!(r.device_channel_count("d"), 1);
        assert_eq!(r.check_channel_limit("d", &ids(&["c"]), 2), Ok(()));
        r.forget_gone("a");
        assert!(r.gone_reason("a").is_none());
    }
}
