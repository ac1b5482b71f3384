//! The driver of one device connection: moves bytes between the QUIC
//! control stream and the sans-IO [`RelayConnection`], and carries out what
//! it decides (authenticate, derive channel ids, read queues, record acks,
//! answer waiting publishers). It decides nothing about delivery itself.
//!
//! Work that waits for the store runs beside the loop, at most
//! [`MAX_WORK`] jobs at a time; while that many are running the driver
//! stops reading the control stream, so a device that floods frames is
//! slowed by QUIC flow control instead of growing the relay's memory.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use metrics::{counter, gauge};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tracing::{debug, info, info_span, warn, Instrument};
use wakewire_proto::names::validate_device_id;
use wakewire_proto::pb::device::{GoAwayReason, Wake};
use wakewire_proto::relay_connection::{
    ConnectionEvent, RelayConnection, ReleaseReason, WakeRefused,
};
use wakewire_proto::relay_session::{Close, REGISTER_ERROR_TOO_MANY_CHANNELS};
use wakewire_proto::token::{TokenError, TokenKind};
use wakewire_proto::ErrorCode;

use crate::claims::Claim;
use crate::cluster::{ClusterError, DeviceLink};
use crate::device_io::{Conn, Receiver, Sender};
use crate::metrics as m;
use crate::pb::{StoredChannel, StoredEvent};
use crate::quic::PrefixSlot;
use crate::registry::{ConnCommand, ConnSender, Delivery};
use crate::state::{clock, Shared};
use crate::store::{AckItem, FinishReason, StoreError};

/// Commands queued per connection before publishers wait.
const COMMAND_QUEUE: usize = 64;
/// Store jobs (queue reads, ack batches, channel writes) running at once
/// per connection; beyond it the control stream is not read.
const MAX_WORK: usize = 4;
/// How long a closing connection may take to flush a GoAway.
const CLOSE_FLUSH: Duration = Duration::from_secs(2);
/// How long a closed connection waits for its last store jobs.
const WORK_DRAIN: Duration = Duration::from_secs(5);
/// A channel's registration time is persisted again after this long.
const REGISTRATION_REFRESH_MS: u64 = 3_600_000;

/// Accepts one incoming connection and serves it until it ends.
///
/// The handshake's state (the `Incoming` included) lives on the heap only
/// while it runs, so the task that stays for the connection's life is sized
/// for the connection alone: a plain `async fn` would keep its arguments in
/// the future for its whole life (~900 bytes more per idle device).
pub(crate) fn serve(
    incoming: quinn::Incoming,
    shared: Arc<Shared>,
    slot: PrefixSlot,
) -> impl std::future::Future<Output = ()> + Send {
    let handshake = Box::pin(accept(incoming, shared.clone(), slot));
    async move {
        let Some((conn, send, recv)) = handshake.await else {
            return;
        };
        run(
            Conn::Quic(conn),
            Sender::Quic(send),
            Receiver::Quic(recv),
            shared,
        )
        .await;
    }
}

/// The QUIC handshake and the control stream, both bounded.
async fn accept(
    incoming: quinn::Incoming,
    shared: Arc<Shared>,
    slot: PrefixSlot,
) -> Option<(quinn::Connection, quinn::SendStream, quinn::RecvStream)> {
    let remote = incoming.remote_address();
    // A handshake whose client gave up (or a flood of ClientHellos) would
    // otherwise hold its admission slot until the idle timeout: bounded.
    let handshake = tokio::time::timeout(shared.config.admission.handshake_timeout, incoming).await;
    shared.handshaking.fetch_sub(1, Ordering::Relaxed);
    drop(slot);
    let conn = match handshake {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            counter!(m::HANDSHAKE_FAILURES).increment(1);
            debug!(%remote, error = %e, "handshake failed");
            return None;
        }
        Err(_) => {
            counter!(m::HANDSHAKE_FAILURES).increment(1);
            debug!(%remote, "handshake timed out");
            return None;
        }
    };
    counter!(m::HANDSHAKES, "transport" => "quic").increment(1);
    // The device opens the control stream right after the handshake.
    let hello_timeout = shared.config.connection.session.hello_timeout;
    match tokio::time::timeout(hello_timeout, conn.accept_bi()).await {
        Ok(Ok((send, recv))) => Some((conn, send, recv)),
        Ok(Err(e)) => {
            debug!(%remote, error = %e, "connection ended before the control stream opened");
            None
        }
        Err(_) => {
            let close = Close {
                code: ErrorCode::HelloTimeout,
                reason: "no control stream within the hello timeout".into(),
            };
            counter!(m::CLOSES, "code" => close.code.name()).increment(1);
            conn.close(close.code.as_u32().into(), close.reason.as_bytes());
            None
        }
    }
}

/// Serves one device connection over TLS on TCP (the fallback for networks
/// that block UDP): the TLS handshake, bounded like QUIC's, then the same
/// connection task. Like [`serve`], the handshake's state lives on the heap
/// only while it runs.
pub(crate) fn serve_tcp(
    stream: tokio::net::TcpStream,
    remote: std::net::SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    shared: Arc<Shared>,
    slot: PrefixSlot,
) -> impl std::future::Future<Output = ()> + Send {
    let handshake = Box::pin(accept_tcp(stream, remote, acceptor, shared.clone(), slot));
    async move {
        let Some(tls) = handshake.await else {
            return;
        };
        let (conn, send, recv) = crate::device_io::tcp(tls, remote);
        run(conn, send, recv, shared).await;
    }
}

/// The TLS handshake on TCP, bounded, with ALPN wakewire/1.
async fn accept_tcp(
    stream: tokio::net::TcpStream,
    remote: std::net::SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    shared: Arc<Shared>,
    slot: PrefixSlot,
) -> Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
    let _ = stream.set_nodelay(true);
    let handshake = tokio::time::timeout(
        shared.config.admission.handshake_timeout,
        acceptor.accept(stream),
    )
    .await;
    shared.handshaking.fetch_sub(1, Ordering::Relaxed);
    drop(slot);
    let tls = match handshake {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            counter!(m::HANDSHAKE_FAILURES).increment(1);
            debug!(%remote, error = %e, "TLS handshake failed (TCP)");
            return None;
        }
        Err(_) => {
            counter!(m::HANDSHAKE_FAILURES).increment(1);
            debug!(%remote, "TLS handshake timed out (TCP)");
            return None;
        }
    };
    // rustls lets a client that offers no ALPN through: this port speaks
    // only wakewire/1.
    if tls.get_ref().1.alpn_protocol() != Some(wakewire_proto::ALPN) {
        counter!(m::HANDSHAKE_FAILURES).increment(1);
        debug!(%remote, "TCP client did not negotiate ALPN wakewire/1");
        return None;
    }
    counter!(m::HANDSHAKES, "transport" => "tcp").increment(1);
    Some(tls)
}

/// Runs the connection task of an established connection. Set up before
/// the returned future, which holds each value once (see [`serve`]).
fn run(
    conn: Conn,
    mut send: Sender,
    mut recv: Receiver,
    shared: Arc<Shared>,
) -> impl std::future::Future<Output = ()> + Send {
    let remote = conn.remote_address();
    let transport = conn.transport();
    shared.connections.fetch_add(1, Ordering::Relaxed);
    let conn_id = shared.next_conn_id();
    let span = info_span!("device_conn", conn = conn_id, %remote, transport, device = tracing::field::Empty);
    gauge!(m::CONNECTIONS, "transport" => transport).increment(1.0);
    let (tx, mut rx) = mpsc::channel(COMMAND_QUEUE);
    let mut driver = Driver {
        conn,
        shared: shared.clone(),
        conn_id,
        device_id: None,
        tx,
        claims: HashMap::new(),
        waiters: HashMap::new(),
        acks: Vec::new(),
        ack_writing: false,
        work: JoinSet::new(),
        jti: None,
        revocations: shared.revocations.subscribe(),
        link: None,
        refresh_pending: false,
        stored: HashMap::new(),
        cluster_acks: Vec::new(),
    };
    async move {
        driver
            .run(&mut send, &mut recv, &mut rx)
            .instrument(span)
            .await;
        shared.connections.fetch_sub(1, Ordering::Relaxed);
        gauge!(m::CONNECTIONS, "transport" => transport).decrement(1.0);
    }
}

/// What a store job reports back to the loop.
enum Done {
    Queued(Vec<String>, Result<Vec<(StoredEvent, Claim)>, StoreError>),
    Acked,
    Linked(Result<DeviceLink, ClusterError>),
    Other,
}

struct Driver {
    conn: Conn,
    shared: Arc<Shared>,
    conn_id: u64,
    device_id: Option<Arc<str>>,
    tx: ConnSender,
    /// Claims on the stored events the connection tracks.
    claims: HashMap<String, Claim>,
    /// Publishers waiting for an event's ack.
    waiters: HashMap<String, oneshot::Sender<Delivery>>,
    /// Acks not yet handed to the store, with their claims (kept until the
    /// ack is committed, so the event cannot be dropped meanwhile).
    acks: Vec<(AckItem, Option<Claim>)>,
    ack_writing: bool,
    work: JoinSet<Done>,
    /// Id of the device token, to close the connection if it is revoked.
    jti: Option<String>,
    revocations: tokio::sync::watch::Receiver<u64>,
    /// Cluster mode: the link feeding this connection from JetStream.
    link: Option<DeviceLink>,
    /// Cluster mode: a queue read was asked for before the link was up.
    refresh_pending: bool,
    /// Cluster mode: records of the stored events tracked here (stream
    /// sequence, publisher), for their receipts.
    stored: HashMap<String, Box<StoredEvent>>,
    /// Cluster mode: acked events whose receipts are not yet written.
    cluster_acks: Vec<StoredEvent>,
}

impl Driver {
    /// Everything by reference: the caller's future holds each value once
    /// (an `async fn` keeps its arguments for its whole life, and moving
    /// them down would store them twice).
    async fn run(
        &mut self,
        send: &mut Sender,
        recv: &mut Receiver,
        rx: &mut mpsc::Receiver<Box<ConnCommand>>,
    ) {
        let undelivered = self.run_inner(send, recv, rx).await;
        // Nothing more is sent on this connection: detach, then give what
        // the device has not acked to its next connection (or let it go:
        // stored events stay queued).
        if let Some(dev) = self.device_id.clone() {
            self.shared.registry.detach(&dev, self.conn_id);
        }
        rx.close();
        let mut handover: Vec<ConnCommand> = undelivered
            .into_iter()
            .map(|wake| ConnCommand::Deliver {
                claim: self.claims.remove(&wake.event_id),
                reply: self.waiters.remove(&wake.event_id),
                wake,
                durable: true,
                stored: None,
            })
            .collect();
        while let Ok(cmd) = rx.try_recv() {
            if let ConnCommand::Deliver { durable: true, .. } = *cmd {
                handover.push(*cmd);
            }
        }
        // In a cluster the device's next connection reads the stream again.
        if let (Some(dev), None) = (&self.device_id, &self.shared.cluster) {
            hand_over(&self.shared, dev, handover).await;
        }
        self.link = None;
        self.flush_acks();
        let _ = tokio::time::timeout(WORK_DRAIN, async {
            while let Some(done) = self.work.join_next().await {
                if let Ok(Done::Acked) = done {
                    self.ack_writing = false;
                    self.flush_acks();
                }
            }
        })
        .await;
    }

    /// Serves the connection; returns the durable wakes not acked.
    async fn run_inner(
        &mut self,
        send: &mut Sender,
        recv: &mut Receiver,
        rx: &mut mpsc::Receiver<Box<ConnCommand>>,
    ) -> Vec<Wake> {
        let config = &self.shared.config.connection;
        let mut rc = RelayConnection::new(clock::now(), clock::unix_ms(), config.clone());
        rc.set_observed_addr(self.conn.remote_address());
        let mut out = Bytes::new();
        loop {
            while let Some(ev) = rc.poll_event() {
                self.on_event(&mut rc, ev);
            }
            self.flush_acks();
            if out.is_empty() {
                out = rc.poll_transmit().unwrap_or_default();
            }
            if let Some(close) = rc.poll_close() {
                let mut rest = out.to_vec();
                while let Some(b) = rc.poll_transmit() {
                    rest.extend_from_slice(&b);
                }
                let tcp = matches!(self.conn, Conn::Tcp { .. });
                if tcp || close.code == ErrorCode::GoingAway || close.code == ErrorCode::Replaced {
                    // Let the GoAway (and on TCP the Close frame) reach the
                    // device before the close.
                    let _ = tokio::time::timeout(
                        CLOSE_FLUSH,
                        send.finish(&rest, tcp.then_some(&close)),
                    )
                    .await;
                }
                self.close(&close);
                return self.drain(&mut rc);
            }
            let deadline = rc.poll_timeout();
            let readable = self.work.len() < MAX_WORK;
            tokio::select! {
                r = send.write(&out), if !out.is_empty() => match r {
                    Ok(n) => out.advance(n),
                    Err(e) => {
                        debug!(error = %e, "control stream write failed");
                        return self.drain(&mut rc);
                    }
                },
                r = recv.read(), if readable => match r {
                    Ok(Some(bytes)) => {
                        rc.set_observed_addr(self.conn.remote_address());
                        rc.handle_data(clock::now(), &bytes);
                    }
                    Ok(None) => rc.handle_stream_finished(clock::now()),
                    Err(e) => {
                        debug!(error = %e, "control stream read failed");
                        return self.drain(&mut rc);
                    }
                },
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.on_command(&mut rc, *cmd),
                    None => return self.drain(&mut rc),
                },
                Some(done) = self.work.join_next(), if !self.work.is_empty() => {
                    self.on_done(&mut rc, done);
                }
                _ = sleep_until(deadline), if deadline.is_some() => rc.handle_timeout(clock::now()),
                Ok(()) = self.revocations.changed(), if self.jti.is_some() => {
                    if self.jti.as_deref().is_some_and(|j| self.shared.revocations.is_revoked(j)) {
                        counter!(m::REVOKED).increment(1);
                        rc.reject(ErrorCode::Unauthorized, "device credential refused: the token has been revoked");
                    }
                }
                e = self.conn.closed() => {
                    debug!(reason = %e, "connection closed");
                    return self.drain(&mut rc);
                }
            }
        }
    }

    /// Ends the delivery state: answers waiters of wakes let go, returns the
    /// durable wakes to hand over.
    fn drain(&mut self, rc: &mut RelayConnection) -> Vec<Wake> {
        let undelivered = rc.drain_undelivered();
        while let Some(ev) = rc.poll_event() {
            self.on_event(rc, ev);
        }
        undelivered
    }

    fn close(&self, close: &Close) {
        counter!(m::CLOSES, "code" => close.code.name()).increment(1);
        // Closes before authentication say nothing about a device: not
        // worth a log line each (a scanner would fill the log).
        if close.code == ErrorCode::NoError || self.device_id.is_none() {
            debug!(reason = %close.reason, "closing");
        } else {
            info!(code = %close.code, reason = %close.reason, "closing connection");
        }
        self.conn.close(close);
    }

    fn on_event(&mut self, rc: &mut RelayConnection, ev: ConnectionEvent) {
        match ev {
            ConnectionEvent::Hello { credential, sdk } => self.on_hello(rc, &credential, &sdk),
            ConnectionEvent::Register { request_id, names } => {
                self.on_register(rc, request_id, names)
            }
            ConnectionEvent::Unregister { channel_ids } => {
                let Some(device) = self.device_id.clone() else {
                    return;
                };
                let reason = "unregistered by its device";
                let now = clock::unix_ms();
                for id in &channel_ids {
                    self.shared.registry.channel_gone(id, &device, reason, now);
                }
                if let Some(cluster) = self.shared.cluster.clone() {
                    self.work.spawn(async move {
                        for id in channel_ids {
                            if let Err(e) = cluster
                                .channel_gone(&id, &device, reason, clock::unix_ms())
                                .await
                            {
                                warn!(error = %e, "unregister not persisted in the cluster");
                            }
                        }
                        Done::Other
                    });
                    return;
                }
                let store = self.shared.store.clone();
                self.work.spawn(async move {
                    for id in channel_ids {
                        if let Err(e) = store
                            .channel_gone(id, reason.into(), clock::unix_ms())
                            .await
                        {
                            warn!(error = %e, "unregister not persisted");
                        }
                    }
                    Done::Other
                });
            }
            ConnectionEvent::Sent { .. } => counter!(m::WAKES_SENT).increment(1),
            ConnectionEvent::Acked {
                event_id,
                channel_id,
                durable,
                after,
            } => {
                counter!(m::ACKS).increment(1);
                metrics::histogram!(m::WAKE_TO_ACK_SECONDS).record(after.as_secs_f64());
                if let Some(w) = self.waiters.remove(&event_id) {
                    let _ = w.send(Delivery::Delivered);
                }
                if let Some(record) = self.stored.remove(&event_id) {
                    self.cluster_acks.push(*record);
                } else if durable {
                    let claim = self.claims.remove(&event_id);
                    self.acks.push((
                        AckItem {
                            event_id,
                            channel_id,
                        },
                        claim,
                    ));
                }
            }
            ConnectionEvent::Released {
                event_id, reason, ..
            } => {
                self.claims.remove(&event_id);
                if let Some(record) = self.stored.remove(&event_id) {
                    if reason == ReleaseReason::Expired {
                        self.expire(record);
                    }
                }
                if let Some(w) = self.waiters.remove(&event_id) {
                    let _ = w.send(Delivery::NotSent);
                }
            }
            ConnectionEvent::IgnoredAck { event_id } => {
                counter!(m::IGNORED_ACKS).increment(1);
                debug!(event = %truncate(&event_id), "ack for an event not sent on this connection ignored");
            }
            ConnectionEvent::Refill { channel_ids } => self.read_queues(rc, channel_ids),
            ConnectionEvent::Ping => counter!(m::KEEPALIVES).increment(1),
        }
    }

    fn on_hello(&mut self, rc: &mut RelayConnection, credential: &str, sdk: &str) {
        let token = (!credential.is_empty()).then(|| {
            self.shared
                .keys
                .verifier
                .verify(credential, TokenKind::Device, clock::unix_secs())
                .map_err(|e| e.to_string())
                .and_then(|claims| match &claims.jti {
                    Some(j) if self.shared.revocations.is_revoked(j) => {
                        Err(TokenError::Revoked(j.clone()).to_string())
                    }
                    _ => Ok(claims),
                })
                .map(|claims| (claims.sub.unwrap_or_default(), claims.jti))
        });
        let cert = self.conn.certificate_identity();
        let verified = crate::device_auth::decide(self.shared.config.device_auth, token, cert)
            .and_then(|(dev, jti)| {
                validate_device_id(&dev)
                    .map(|_| (dev, jti))
                    .map_err(|e| e.to_string())
            });
        match verified {
            Ok((device_id, jti)) => {
                self.jti = jti;
                tracing::Span::current().record("device", device_id.as_str());
                let device: Arc<str> = device_id.as_str().into();
                let session_id = format!("{:x}-{:x}", clock::unix_ms(), self.conn_id);
                rc.accept(clock::now(), device_id, session_id);
                if let Some(old) =
                    self.shared
                        .registry
                        .attach(device.clone(), self.conn_id, self.tx.clone())
                {
                    let _ = old.try_send(Box::new(ConnCommand::GoAway {
                        reason: GoAwayReason::Replaced,
                        reconnect_after: Duration::ZERO,
                        message: "another connection authenticated as this device",
                        alternatives: Vec::new(),
                    }));
                }
                if let Some(cluster) = self.shared.cluster.clone() {
                    let conn = format!("{}/{}", cluster.relay_id(), self.conn_id);
                    let (tx, ack_wait) = (self.tx.clone(), self.shared.config.ack_wait);
                    let dev = device.clone();
                    self.work.spawn(async move {
                        Done::Linked(
                            crate::cluster::link_device(cluster, &dev, conn, tx, ack_wait).await,
                        )
                    });
                }
                self.device_id = Some(device);
                debug!(%sdk, "device authenticated");
            }
            Err(reason) => {
                counter!(m::AUTH_FAILURES).increment(1);
                rc.reject(
                    ErrorCode::Unauthorized,
                    format!("device credential refused: {reason}"),
                );
            }
        }
    }

    fn on_register(&mut self, rc: &mut RelayConnection, request_id: u64, names: Vec<String>) {
        let Some(device) = self.device_id.clone() else {
            return;
        };
        let now = clock::unix_ms();
        let ids: Vec<String> = names
            .iter()
            .map(|n| self.shared.keys.channel_ids.derive(&device, n))
            .collect();
        let max = self.shared.config.connection.session.max_channels;
        if let Err(e) = self.shared.registry.check_channel_limit(&device, &ids, max) {
            counter!(m::REGISTER_REFUSED, "reason" => "too_many_channels").increment(1);
            return rc.refuse_register(
                request_id,
                REGISTER_ERROR_TOO_MANY_CHANNELS,
                format!(
                    "registering {} more channels would exceed the limit of {max} per device (it has {} across its connections)",
                    e.new, e.live
                ),
            );
        }
        let mut bindings = Vec::with_capacity(names.len());
        let mut fresh = Vec::new();
        for (name, id) in names.into_iter().zip(ids) {
            let previous = self
                .shared
                .registry
                .register_channel(&id, &device, &name, now);
            // Persisted in the background (refreshed hourly for expiry): the
            // device re-registers on every connection, so a crash before the
            // commit loses nothing it cannot redo; waiting would put a disk
            // flush in every handshake.
            if previous.is_none_or(|t| now.saturating_sub(t) > REGISTRATION_REFRESH_MS) {
                fresh.push((
                    id.clone(),
                    StoredChannel {
                        device_id: device.to_string(),
                        name: name.clone(),
                        created_at_ms: now,
                        last_used_ms: now,
                        ..Default::default()
                    },
                ));
            }
            bindings.push((name, id));
        }
        let ids: Vec<String> = bindings.iter().map(|b| b.1.clone()).collect();
        rc.registered(clock::now(), request_id, bindings);
        if let (false, Some(cluster)) = (fresh.is_empty(), self.shared.cluster.clone()) {
            self.work.spawn(async move {
                for (id, record) in fresh {
                    if let Err(e) = cluster.put_channel(&id, &record).await {
                        warn!(error = %e, channel = %id, "channel not persisted in the cluster");
                    }
                }
                Done::Other
            });
        } else if !fresh.is_empty() {
            let store = self.shared.store.clone();
            self.work.spawn(async move {
                for (id, record) in fresh {
                    if let Err(e) = store.put_channel(id.clone(), record).await {
                        warn!(error = %e, channel = %id, "channel not persisted");
                    }
                }
                Done::Other
            });
        }
        // What waited while the device was away goes out now.
        self.read_queues(rc, ids);
    }

    fn read_queues(&mut self, rc: &mut RelayConnection, channel_ids: Vec<String>) {
        if self.shared.cluster.is_some() {
            // The link streams the device's queue (all its channels, oldest
            // first, then live): read it again from the start.
            rc.handle_queued(clock::now(), &channel_ids, vec![]);
            match &self.link {
                Some(link) => link.refresh(),
                None => self.refresh_pending = true,
            }
            return;
        }
        let store = self.shared.store.clone();
        self.work.spawn(async move {
            let read = store.claim_queued(channel_ids.clone()).await;
            Done::Queued(channel_ids, read)
        });
    }

    fn on_done(&mut self, rc: &mut RelayConnection, done: Result<Done, tokio::task::JoinError>) {
        match done {
            Ok(Done::Queued(channel_ids, Ok(events))) => {
                let mut claims: HashMap<String, Claim> = HashMap::with_capacity(events.len());
                let wakes = events
                    .into_iter()
                    .map(|(ev, claim)| {
                        claims.insert(ev.event_id.clone(), claim);
                        stored_wake(ev)
                    })
                    .collect();
                for (id, taken) in rc.handle_queued(clock::now(), &channel_ids, wakes) {
                    if let (Ok(()), Some(claim)) = (taken, claims.remove(&id)) {
                        self.claims.insert(id, claim);
                    }
                }
            }
            Ok(Done::Queued(channel_ids, Err(e))) => {
                warn!(error = %e, "cannot read the channel queues; they are sent on the next connection");
                rc.handle_queued(clock::now(), &channel_ids, vec![]);
            }
            Ok(Done::Acked) => self.ack_writing = false,
            Ok(Done::Linked(Ok(link))) => {
                if std::mem::take(&mut self.refresh_pending) {
                    link.refresh();
                }
                self.link = Some(link);
            }
            Ok(Done::Linked(Err(e))) => {
                // Without its link the device would get nothing: let it
                // reconnect (to this relay or another) and try again.
                warn!(error = %e, "cannot link the device to the cluster");
                rc.go_away(
                    GoAwayReason::Shutdown,
                    Duration::from_secs(1),
                    "the relay cannot reach its cluster; reconnect",
                );
            }
            Ok(Done::Other) => {}
            Err(e) => warn!(error = %e, "store job failed"),
        }
    }

    /// Hands the acks collected so far to the store, one batch at a time.
    fn flush_acks(&mut self) {
        if let (false, false, Some(cluster)) = (
            self.ack_writing,
            self.cluster_acks.is_empty(),
            self.shared.cluster.clone(),
        ) {
            self.ack_writing = true;
            let batch = std::mem::take(&mut self.cluster_acks);
            self.work.spawn(async move {
                record_cluster_acks(&cluster, batch).await;
                Done::Acked
            });
            return;
        }
        if self.ack_writing || self.acks.is_empty() {
            return;
        }
        self.ack_writing = true;
        let batch = std::mem::take(&mut self.acks);
        let store = self.shared.store.clone();
        self.work.spawn(async move {
            let (items, claims): (Vec<AckItem>, Vec<Option<Claim>>) = batch.into_iter().unzip();
            match store.ack(items, clock::unix_ms()).await {
                Ok(o) if o.ignored > 0 => debug!(ignored = o.ignored, "acks without effect"),
                Ok(_) => {}
                // The events stay queued and are sent again; the SDK acks
                // the duplicates without running the callback twice.
                Err(e) => warn!(error = %e, "acks not persisted"),
            }
            drop(claims);
            Done::Acked
        });
    }

    /// Cluster mode: an event whose TTL ran out before its device acked it
    /// gets its receipt and leaves the stream.
    fn expire(&mut self, record: Box<StoredEvent>) {
        let Some(cluster) = self.shared.cluster.clone() else {
            return;
        };
        self.work.spawn(async move {
            let now = clock::unix_ms();
            match cluster.finish(&record, &FinishReason::Expired, now).await {
                Ok(_) => {
                    if let Err(e) = cluster.delete(record.seq).await {
                        debug!(error = %e, "expired event not deleted; the stream's max age will");
                    }
                }
                Err(e) => debug!(error = %e, "expiry receipt not written"),
            }
            Done::Other
        });
    }

    fn on_command(&mut self, rc: &mut RelayConnection, cmd: ConnCommand) {
        match cmd {
            ConnCommand::Deliver {
                wake,
                durable,
                claim,
                reply,
                stored,
            } => {
                let id = wake.event_id.clone();
                match rc.handle_wake(clock::now(), wake, durable) {
                    Ok(()) => {
                        if let Some(c) = claim {
                            self.claims.insert(id.clone(), c);
                        }
                        if let Some(record) = stored {
                            self.stored.insert(id.clone(), record);
                        }
                        if let Some(r) = reply {
                            self.waiters.insert(id, r);
                        }
                    }
                    // Already tracked here (from a queue read, or handed
                    // over): the publisher waits for the same ack.
                    Err(WakeRefused::Duplicate) if self.claims.contains_key(&id) => {
                        if let Some(r) = reply {
                            self.waiters.insert(id, r);
                        }
                    }
                    Err(WakeRefused::Expired) if stored.is_some() => {
                        if let Some(record) = stored {
                            self.expire(record);
                        }
                    }
                    Err(why) => {
                        debug!(?why, event = %id, "wake not taken");
                        if let Some(r) = reply {
                            let _ = r.send(Delivery::NotSent);
                        }
                    }
                }
            }
            ConnCommand::GoAway {
                reason,
                reconnect_after,
                message,
                alternatives,
            } => rc.go_away_to(reason, reconnect_after, message, alternatives),
        }
    }
}

/// Tries for this long to record acks while NATS is electing a leader or
/// coming back.
const CLUSTER_ACK_ATTEMPTS: u32 = 40;
const CLUSTER_ACK_RETRY: Duration = Duration::from_millis(500);

/// Records acked events in the cluster: the receipt first, then the
/// delete, so a crash between them leaves the event queued (sent again and
/// deduplicated by the SDK), never gone without a receipt. What fails is
/// retried (a NATS node lost, an election) for about 20 s.
async fn record_cluster_acks(cluster: &Arc<crate::cluster::Cluster>, batch: Vec<StoredEvent>) {
    let now = clock::unix_ms();
    // (event, receipt written)
    let mut pending: Vec<(StoredEvent, bool)> = batch.into_iter().map(|e| (e, false)).collect();
    for attempt in 1..=CLUSTER_ACK_ATTEMPTS {
        let mut all = JoinSet::new();
        for (ev, written) in pending.drain(..) {
            let cluster = cluster.clone();
            all.spawn(async move {
                let written = written
                    || cluster
                        .finish(&ev, &FinishReason::Delivered, now)
                        .await
                        .is_ok();
                let deleted = written && cluster.delete(ev.seq).await.is_ok();
                (ev, written, deleted)
            });
        }
        while let Some(done) = all.join_next().await {
            if let Ok((ev, written, false)) = done {
                pending.push((ev, written));
            }
        }
        if pending.is_empty() {
            return;
        }
        debug!(
            attempt,
            left = pending.len(),
            "acks not yet recorded in the cluster; retrying"
        );
        tokio::time::sleep(CLUSTER_ACK_RETRY).await;
    }
    warn!(
        events = pending.len(),
        "acks not recorded in the cluster; those events are sent again (the SDK deduplicates them)"
    );
}

/// Gives wakes of a closed connection to the device's current one; what
/// cannot be handed over is released (it stays queued in the store).
async fn hand_over(shared: &Shared, device: &str, wakes: Vec<ConnCommand>) {
    if wakes.is_empty() {
        return;
    }
    let Some(next) = shared.registry.connection(device) else {
        return;
    };
    let n = wakes.len();
    for cmd in wakes {
        let sent = tokio::time::timeout(CLOSE_FLUSH, next.send(Box::new(cmd))).await;
        if !matches!(sent, Ok(Ok(()))) {
            break;
        }
    }
    debug!(wakes = n, "handed over to the device's new connection");
}

/// The wire form of a stored event.
pub(crate) fn stored_wake(ev: StoredEvent) -> Wake {
    Wake {
        event_id: ev.event_id,
        channel_id: ev.channel_id,
        payload: ev.payload,
        priority: ev.priority,
        created_at_ms: ev.created_at_ms,
        ttl_s: ev.ttl_s,
    }
}

/// At most 64 characters of device input, for logs.
fn truncate(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

async fn sleep_until(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}
#[cfg(test)]
mod tests {
    /// The size of the future a three-argument function returns.
    fn future_size3<A, B, C, F: FnOnce(A, B, C) -> Fut, Fut>(_: F) -> usize {
        std::mem::size_of::<Fut>()
    }

    /// The size of the future a five-argument function returns.
    fn future_size5<A, B, C, D, E, F: FnOnce(A, B, C, D, E) -> Fut, Fut>(_: F) -> usize {
        std::mem::size_of::<Fut>()
    }

    #[test]
    fn an_idle_connection_task_stays_small() {
        // Every idle device holds one of these for as long as it is
        // connected. They were 4,016 (QUIC) and 5,128 (TCP) bytes when the
        // handshake's state and the arguments stayed in them for life
        // (docs/perf.md, heap per idle device); 2,480 and 2,512 with rustc
        // 1.95 since. The bound leaves room for compiler changes, not for a
        // handshake kept in the task again.
        for (transport, size) in [
            ("QUIC", future_size3(super::serve)),
            ("TCP", future_size5(super::serve_tcp)),
        ] {
            assert!(
                size <= 3_000,
                "the {transport} connection task's future is {size} bytes"
            );
        }
    }
}
