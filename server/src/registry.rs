//! Which channels exist, which device owns each, and which connection a
//! connected device is on. Lock-free maps (dashmap) shared by every
//! connection task and the publish service.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::{mpsc, oneshot};
use wakewire_proto::pb::device::{GoAwayReason, Wake};

/// A registered channel.
#[derive(Debug, Clone)]
pub struct ChannelEntry {
    /// Owning device.
    pub device_id: Arc<str>,
    /// Name the device registered it under.
    pub name: Arc<str>,
}

/// What became of one wake handed to a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The device acked it.
    Delivered,
    /// Written, not acked (yet).
    SentUnacked,
    /// Not written: the device is not connected.
    NotConnected,
}

/// Work for a connection task.
#[derive(Debug)]
pub(crate) enum ConnCommand {
    /// Send a wake; report what became of it.
    Deliver {
        wake: Wake,
        reply: oneshot::Sender<Delivery>,
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
    devices: DashMap<Arc<str>, DeviceConn>,
}

impl Registry {
    /// Records a channel (idempotent).
    pub fn register_channel(&self, channel_id: &str, device_id: &Arc<str>, name: &str) {
        if !self.channels.contains_key(channel_id) {
            self.channels.insert(
                channel_id.to_owned(),
                ChannelEntry {
                    device_id: device_id.clone(),
                    name: name.into(),
                },
            );
        }
    }

    /// Forgets a channel.
    pub fn unregister_channel(&self, channel_id: &str) {
        self.channels.remove(channel_id);
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

        r.register_channel("c", &dev, "mail");
        assert_eq!(&*r.channel("c").unwrap().name, "mail");
        r.unregister_channel("c");
        assert!(r.channel("c").is_none());
    }
}
