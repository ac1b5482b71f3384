//! The device side of a cluster relay: a link per device connection that
//! feeds the connection task from JetStream and answers the device's live
//! subject. It only moves messages; the connection's [`RelayConnection`]
//! decides what is sent.
//!
//! - Queue: an ordered push consumer on the device's subjects (from the
//!   first queued event, then live as events are stored), recreated on
//!   [`LinkCommand::Refresh`] (new channels registered, room after a full
//!   in-flight table). Each event goes to the connection as a durable wake
//!   with its stream record; duplicates are refused there.
//! - Live subject: presence questions, deliver-now-or-never wakes (answered
//!   after the device's ack, or at `ack_wait`), and takeovers (the device
//!   connected to another relay: this connection is replaced).
//!
//! [`RelayConnection`]: wakewire_proto::relay_connection::RelayConnection

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{push, DeliverPolicy};
use prost::Message as _;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt;
use tracing::{debug, warn};
use wakewire_proto::pb::device::GoAwayReason;

use super::events::{decode_event, LiveOutcome};
use super::naming::DEVICE_HEADER;
use super::{nats_err, Cluster, ClusterError};
use crate::device_conn::stored_wake;
use crate::pb::{live_request, LiveReply, LiveRequest};
use crate::registry::{ConnCommand, ConnSender, Delivery};

/// What the connection task asks of its link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LinkCommand {
    /// Read the device's queue again from the start.
    Refresh,
}

/// A device connection's link to the cluster; dropping it ends it.
#[derive(Debug)]
pub(crate) struct DeviceLink {
    control: mpsc::Sender<LinkCommand>,
    task: tokio::task::JoinHandle<()>,
}

impl DeviceLink {
    /// Asks for the queue to be read again (never waits).
    pub(crate) fn refresh(&self) {
        let _ = self.control.try_send(LinkCommand::Refresh);
    }
}

impl Drop for DeviceLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Links a device connection (`conn` names it: `<relay id>/<number>`)
/// to the cluster: takes the device over from any other relay, then
/// listens on its live subject. The queue is read at the first
/// [`DeviceLink::refresh`].
pub(crate) async fn link_device(
    cluster: Arc<Cluster>,
    device_id: &str,
    conn: String,
    tx: ConnSender,
    ack_wait: Duration,
) -> Result<DeviceLink, ClusterError> {
    let devkey = cluster.names.devkey(device_id);
    let device_hash = cluster.names.device_hash(device_id);
    // Before subscribing, so this connection does not take itself over.
    cluster.take_over(device_id, conn.clone()).await;
    let live = cluster
        .client
        .subscribe(cluster.names.live_subject(&devkey))
        .await
        .map_err(nats_err)?;
    let (control, commands) = mpsc::channel(4);
    let task = tokio::spawn(run(Link {
        cluster,
        devkey,
        device_hash,
        conn,
        tx,
        ack_wait,
        live,
        commands,
    }));
    Ok(DeviceLink { control, task })
}

struct Link {
    cluster: Arc<Cluster>,
    devkey: String,
    device_hash: String,
    conn: String,
    tx: ConnSender,
    ack_wait: Duration,
    live: async_nats::Subscriber,
    commands: mpsc::Receiver<LinkCommand>,
}

type Queue = async_nats::jetstream::consumer::push::Ordered;

async fn run(mut link: Link) {
    let mut queue: Option<Queue> = None;
    loop {
        tokio::select! {
            cmd = link.commands.recv() => match cmd {
                Some(LinkCommand::Refresh) => {
                    queue = None;
                    match link.open_queue().await {
                        Ok(q) => queue = Some(q),
                        // The connection asks again at its next Register or
                        // refill; until then the device's queue waits.
                        Err(e) => warn!(error = %e, "cannot read the device's queue from the cluster"),
                    }
                }
                None => return,
            },
            msg = link.live.next() => match msg {
                Some(m) => link.on_live(m).await,
                None => return,
            },
            Some(item) = next(&mut queue), if queue.is_some() => match item {
                Ok(m) => {
                    if !link.forward(m).await {
                        return;
                    }
                }
                Err(e) => {
                    warn!(error = %e, "the device's queue consumer failed; reading it again");
                    queue = link.open_queue().await.ok();
                }
            },
        }
    }
}

async fn next(
    queue: &mut Option<Queue>,
) -> Option<
    Result<async_nats::jetstream::Message, async_nats::jetstream::consumer::push::OrderedError>,
> {
    match queue {
        Some(q) => q.next().await,
        None => std::future::pending().await,
    }
}

impl Link {
    async fn open_queue(&self) -> Result<Queue, ClusterError> {
        let consumer = self
            .cluster
            .events
            .create_consumer(push::OrderedConfig {
                deliver_subject: self.cluster.client.new_inbox(),
                filter_subject: self.cluster.names.device_filter(&self.devkey),
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(nats_err)?;
        consumer.messages().await.map_err(nats_err)
    }

    /// Hands one stored event to the connection; false once the connection
    /// is gone.
    async fn forward(&self, m: async_nats::jetstream::Message) -> bool {
        let ours = m
            .headers
            .as_ref()
            .and_then(|h| h.get(DEVICE_HEADER))
            .is_some_and(|v| v.as_str() == self.device_hash);
        if !ours {
            // Another device with the same short key: not for this one.
            return true;
        }
        let seq = match m.info() {
            Ok(info) => info.stream_sequence,
            Err(e) => {
                debug!(error = %e, "event without stream metadata skipped");
                return true;
            }
        };
        let mut ev = match decode_event(&m.payload) {
            Ok(ev) => ev,
            Err(e) => {
                warn!(error = %e, seq, "undecodable event skipped");
                return true;
            }
        };
        ev.seq = seq;
        let cmd = ConnCommand::Deliver {
            wake: stored_wake(ev.clone()),
            durable: true,
            claim: None,
            reply: None,
            stored: Some(Box::new(ev)),
        };
        self.tx.send(Box::new(cmd)).await.is_ok()
    }

    async fn on_live(&self, m: async_nats::Message) {
        let Ok(req) = LiveRequest::decode(m.payload.as_ref()) else {
            return;
        };
        let answer = match req.kind {
            Some(live_request::Kind::Presence(_)) => Some(LiveOutcome::Delivered),
            Some(live_request::Kind::Takeover(other)) => {
                if other != self.conn {
                    let _ = self
                        .tx
                        .send(Box::new(ConnCommand::GoAway {
                            reason: GoAwayReason::Replaced,
                            reconnect_after: Duration::ZERO,
                            message: "another connection authenticated as this device",
                            alternatives: Vec::new(),
                        }))
                        .await;
                }
                None
            }
            Some(live_request::Kind::Wake(ev)) => Some(self.deliver_now(ev).await),
            None => None,
        };
        if let (Some(outcome), Some(reply)) = (answer, m.reply) {
            let bytes = LiveReply {
                outcome: outcome.code(),
            }
            .encode_to_vec();
            let _ = self.cluster.client.publish(reply, bytes.into()).await;
        }
    }

    async fn deliver_now(&self, ev: crate::pb::StoredEvent) -> LiveOutcome {
        let (reply, answer) = oneshot::channel();
        let cmd = ConnCommand::Deliver {
            wake: stored_wake(ev),
            durable: false,
            claim: None,
            reply: Some(reply),
            stored: None,
        };
        if self.tx.send(Box::new(cmd)).await.is_err() {
            return LiveOutcome::NotSent;
        }
        match tokio::time::timeout(self.ack_wait, answer).await {
            Ok(Ok(Delivery::Delivered)) => LiveOutcome::Delivered,
            Ok(Ok(Delivery::NotSent) | Err(_)) => LiveOutcome::NotSent,
            Err(_) => LiveOutcome::SentUnacked,
        }
    }
}
