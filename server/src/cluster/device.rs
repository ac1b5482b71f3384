//! The device side of a cluster relay: a link per device connection that
//! feeds the connection task from JetStream and answers the device's live
//! subject. It only moves messages; the connection's [`RelayConnection`]
//! decides what is sent.
//!
//! - Queue: a push consumer on the device's subjects (from the first
//!   queued event, then live as events are stored), in memory on one NATS
//!   node. It is recreated from the start on [`LinkCommand::Refresh`] (new
//!   channels registered, room after a full in-flight table), and from the
//!   event after the last one seen when it fails: a gap in its sequence,
//!   missed heartbeats (its NATS node is gone), or this relay's NATS
//!   connection coming back. Each event goes to the connection as a durable
//!   wake with its stream record; duplicates are refused there.
//! - Live subject: presence questions, deliver-now-or-never wakes (answered
//!   after the device's ack, or at `ack_wait`), and takeovers (the device
//!   connected to another relay: this connection is replaced).
//!
//! [`RelayConnection`]: wakewire_proto::relay_connection::RelayConnection

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{push, AckPolicy, DeliverPolicy};
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

/// Where the device's queue is being read from: a push consumer
/// delivering to `inbox`, subscribed before the consumer exists so its
/// first messages are not missed.
struct Reading {
    inbox: async_nats::Subscriber,
    consumer: String,
    /// Consumer sequence of the last message (a jump is a gap).
    consumer_seq: u64,
    /// Two heartbeats without a message: the consumer is gone.
    deadline: tokio::time::Instant,
}

/// How long a failed queue read waits before trying again.
const RETRY: Duration = Duration::from_secs(1);

/// What one message on a reading's inbox is.
enum Inbound {
    Event(Box<async_nats::jetstream::Message>, u64, u64),
    Heartbeat,
    Ended,
}

async fn run(mut link: Link) {
    let mut reading: Option<Reading> = None;
    // Stream sequence of the last event forwarded; 0: read from the start.
    let mut last_seq = 0u64;
    // Set when the queue should be read and is not (a failed attempt).
    let mut wanted = false;
    let mut reconnects = link.cluster.reconnects();
    let mut retry = tokio::time::interval(RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let heartbeat = link.cluster.config.consumer_heartbeat;
    loop {
        let deadline = reading.as_ref().map(|r| r.deadline);
        tokio::select! {
            cmd = link.commands.recv() => match cmd {
                Some(LinkCommand::Refresh) => {
                    last_seq = 0;
                    link.close(reading.take());
                    reading = link.open(last_seq).await;
                    wanted = reading.is_none();
                }
                None => {
                    link.close(reading.take());
                    return;
                }
            },
            msg = link.live.next() => match msg {
                Some(m) => link.on_live(m).await,
                None => return,
            },
            Ok(()) = reconnects.changed() => {
                // Back from a NATS outage: the consumer may be gone.
                if reading.is_some() || wanted {
                    link.close(reading.take());
                    reading = link.open(last_seq).await;
                    wanted = reading.is_none();
                }
            }
            _ = retry.tick(), if wanted => {
                reading = link.open(last_seq).await;
                wanted = reading.is_none();
            }
            _ = sleep_until(deadline), if deadline.is_some() => {
                debug!("the device's queue consumer missed its heartbeats; reading it again");
                link.close(reading.take());
                reading = link.open(last_seq).await;
                wanted = reading.is_none();
            }
            inbound = next(&link.cluster.js, &mut reading), if reading.is_some() => {
                if let Some(r) = reading.as_mut() {
                    r.deadline = tokio::time::Instant::from_std(crate::state::clock::now()) + heartbeat * 2;
                }
                match inbound {
                    Inbound::Heartbeat => {}
                    Inbound::Event(m, stream_seq, consumer_seq) => {
                        let expected = reading.as_ref().map_or(0, |r| r.consumer_seq + 1);
                        if consumer_seq != expected {
                            // Messages were lost between NATS and here: read
                            // again from the one after the last forwarded.
                            debug!(expected, got = consumer_seq, "gap in the device's queue; reading it again");
                            link.close(reading.take());
                            reading = link.open(last_seq).await;
                            wanted = reading.is_none();
                            continue;
                        }
                        if let Some(r) = reading.as_mut() {
                            r.consumer_seq = consumer_seq;
                        }
                        last_seq = stream_seq;
                        if !link.forward(*m, stream_seq).await {
                            link.close(reading.take());
                            return;
                        }
                    }
                    Inbound::Ended => {
                        link.close(reading.take());
                        reading = link.open(last_seq).await;
                        wanted = reading.is_none();
                    }
                }
            }
        }
    }
}

async fn next(js: &async_nats::jetstream::Context, reading: &mut Option<Reading>) -> Inbound {
    let Some(r) = reading else {
        return std::future::pending().await;
    };
    loop {
        let Some(message) = r.inbox.next().await else {
            return Inbound::Ended;
        };
        match message.status {
            Some(async_nats::StatusCode::IDLE_HEARTBEAT) => return Inbound::Heartbeat,
            Some(_) => continue,
            None => {}
        }
        let m = async_nats::jetstream::Message {
            message,
            context: js.clone(),
        };
        let seqs = m.info().map(|i| (i.stream_sequence, i.consumer_sequence));
        match seqs {
            Ok((stream_seq, consumer_seq)) => {
                return Inbound::Event(Box::new(m), stream_seq, consumer_seq)
            }
            Err(e) => debug!(error = %e, "message without stream metadata skipped"),
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

impl Link {
    /// Starts reading the device's queue after stream sequence `after`
    /// (0: from the start); `None` if NATS refused (retried later).
    async fn open(&self, after: u64) -> Option<Reading> {
        match self.try_open(after).await {
            Ok(r) => Some(r),
            Err(e) => {
                warn!(error = %e, "cannot read the device's queue from the cluster; retrying");
                None
            }
        }
    }

    async fn try_open(&self, after: u64) -> Result<Reading, ClusterError> {
        let deliver_policy = if after == 0 {
            DeliverPolicy::All
        } else {
            DeliverPolicy::ByStartSequence {
                start_sequence: after + 1,
            }
        };
        let subject = self.cluster.client.new_inbox();
        let inbox = self
            .cluster
            .client
            .subscribe(subject.clone())
            .await
            .map_err(nats_err)?;
        let heartbeat = self.cluster.config.consumer_heartbeat;
        let consumer: async_nats::jetstream::consumer::PushConsumer = super::events::timed(
            "consumer",
            self.cluster.events.create_consumer(push::Config {
                deliver_subject: subject,
                filter_subject: self.cluster.names.device_filter(&self.devkey),
                deliver_policy,
                ack_policy: AckPolicy::None,
                idle_heartbeat: heartbeat,
                // A relay that crashed leaves its consumers behind: NATS
                // removes them once nobody listens.
                inactive_threshold: Duration::from_secs(10),
                num_replicas: 1,
                memory_storage: true,
                ..Default::default()
            }),
        )
        .await
        .map_err(nats_err)?;
        Ok(Reading {
            inbox,
            consumer: consumer.cached_info().name.clone(),
            consumer_seq: 0,
            deadline: tokio::time::Instant::from_std(crate::state::clock::now()) + heartbeat * 2,
        })
    }

    /// Stops a read: its consumer is deleted (in the background).
    fn close(&self, reading: Option<Reading>) {
        if let Some(r) = reading {
            let events = self.cluster.events.clone();
            tokio::spawn(async move {
                let _ = events.delete_consumer(&r.consumer).await;
            });
        }
    }

    /// Hands one stored event to the connection; false once the connection
    /// is gone.
    async fn forward(&self, m: async_nats::jetstream::Message, seq: u64) -> bool {
        let ours = m
            .headers
            .as_ref()
            .and_then(|h| h.get(DEVICE_HEADER))
            .is_some_and(|v| v.as_str() == self.device_hash);
        if !ours {
            // Another device with the same short key: not for this one.
            return true;
        }
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
