//! Which channels exist, which device owns each, and which connection a
//! connected device is on. Lock-free maps (dashmap) shared by every
//! connection task and the publish service.

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
    /// claim.
    Deliver {
        wake: Wake,
        durable: bool,
        claim: Option<Claim>,
        reply: Option<oneshot::Sender<Delivery>>,
    },
    /// Ask the device to leave.
    GoAway {
        reason: GoAwayReason,
        reconnect_after: Duration,
        message: &'static str,
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

/// Channel and connection tables.
#[derive(Debug, Default)]
pub struct Registry {
    channels: DashMap<String, ChannelEntry>,
    /// Channels that are gone (unregistered, expired): reason and device.
    gone: DashMap<String, (String, Arc<str>)>,
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

    /// Marks a channel of `device_id` gone.
    pub fn channel_gone(&self, channel_id: &str, device_id: &Arc<str>, reason: &str) {
        self.channels.remove(channel_id);
        self.gone.insert(
            channel_id.to_owned(),
            (reason.to_owned(), device_id.clone()),
        );
    }

    /// Why a channel is gone, if it is.
    pub fn gone_reason(&self, channel_id: &str) -> Option<String> {
        self.gone.get(channel_id).map(|r| r.value().0.clone())
    }

    /// The device a channel belongs (or belonged, if gone) to.
    pub fn owner(&self, channel_id: &str) -> Option<Arc<str>> {
        match self.channels.get(channel_id) {
            Some(c) => Some(c.device_id.clone()),
            None => self.gone.get(channel_id).map(|g| g.value().1.clone()),
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
        r.channel_gone("c", &dev, "unregistered");
        assert!(r.channel("c").is_none());
        assert_eq!(r.gone_reason("c").as_deref(), Some("unregistered"));
        assert_eq!(r.owner("c").as_deref(), Some("d"));
        r.register_channel("c", &dev, "mail", 9);
        assert!(r.gone_reason("c").is_none());
    }
}
