//! The driver of one device connection: moves bytes between the QUIC
//! control stream and the sans-IO [`RelaySession`], and carries out what the
//! session asks (authenticate, register channels, deliver queued events,
//! record acks, hold normal-priority events for the next radio wake).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use metrics::{counter, gauge};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, info_span, warn, Instrument};
use wakewire_proto::names::validate_device_id;
use wakewire_proto::pb::device::{GoAwayReason, Priority, Wake};
use wakewire_proto::pb::store::{StoredChannel, StoredEvent};
use wakewire_proto::relay_session::{Close, RelayEvent, RelaySession};
use wakewire_proto::token::TokenKind;
use wakewire_proto::ErrorCode;

use crate::metrics as m;
use crate::registry::{ConnCommand, Delivery};
use crate::relay::{unix_ms, unix_secs, Shared};

/// Most wakes in flight (sent or held, not acked) per connection. Stored
/// events beyond it stay queued and go out on the next connection.
const MAX_IN_FLIGHT: usize = 8192;
/// Commands queued per connection before publishers wait.
const COMMAND_QUEUE: usize = 64;
/// How long a closing connection may take to flush a GoAway.
const CLOSE_FLUSH: Duration = Duration::from_secs(2);
/// A channel's registration time is persisted again after this long.
const REGISTRATION_REFRESH_MS: u64 = 3_600_000;

/// Accepts one incoming connection and serves it until it ends.
pub(crate) async fn serve(incoming: quinn::Incoming, shared: Arc<Shared>) {
    let remote = incoming.remote_address();
    // A handshake whose client gave up would otherwise hold its admission
    // slot until the idle timeout (minutes): bound it by the hello timeout.
    let handshake = tokio::time::timeout(shared.config.session.hello_timeout, incoming).await;
    shared.handshaking.fetch_sub(1, Ordering::Relaxed);
    let conn = match handshake {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            counter!(m::HANDSHAKE_FAILURES).increment(1);
            debug!(%remote, error = %e, "handshake failed");
            return;
        }
        Err(_) => {
            counter!(m::HANDSHAKE_FAILURES).increment(1);
            debug!(%remote, "handshake timed out");
            return;
        }
    };
    counter!(m::HANDSHAKES).increment(1);
    shared.connections.fetch_add(1, Ordering::Relaxed);
    let conn_id = shared.next_conn_id();
    let span = info_span!("device_conn", conn = conn_id, %remote, device = tracing::field::Empty);
    gauge!(m::CONNECTIONS).increment(1.0);
    let (driver, rx) = Driver::new(conn, shared.clone(), conn_id);
    driver.run(rx).instrument(span).await;
    shared.connections.fetch_sub(1, Ordering::Relaxed);
    gauge!(m::CONNECTIONS).decrement(1.0);
}

struct Driver {
    conn: quinn::Connection,
    shared: Arc<Shared>,
    conn_id: u64,
    device_id: Option<Arc<str>>,
    tx: mpsc::Sender<Box<ConnCommand>>,
    /// Wakes sent or held on this connection and not yet acked, with the
    /// publisher waiting for each (if any).
    in_flight: HashMap<String, Option<oneshot::Sender<Delivery>>>,
    /// Normal-priority wakes waiting for the next radio wake.
    held: Vec<Wake>,
    held_until: Option<Instant>,
}

impl Driver {
    fn new(
        conn: quinn::Connection,
        shared: Arc<Shared>,
        conn_id: u64,
    ) -> (Self, mpsc::Receiver<Box<ConnCommand>>) {
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        (
            Self {
                conn,
                shared,
                conn_id,
                device_id: None,
                tx,
                in_flight: HashMap::new(),
                held: Vec::new(),
                held_until: None,
            },
            rx,
        )
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Box<ConnCommand>>) {
        self.run_inner(&mut rx).await;
        // Nothing more will be sent on this connection. Waiting publishers
        // see their reply dropped: stored events stay queued for the next
        // connection.
        if let Some(dev) = &self.device_id {
            self.shared.registry.detach(dev, self.conn_id);
        }
        rx.close();
    }

    async fn run_inner(&mut self, rx: &mut mpsc::Receiver<Box<ConnCommand>>) {
        let config = &self.shared.config.session;
        let (mut send, mut recv) =
            match tokio::time::timeout(config.hello_timeout, self.conn.accept_bi()).await {
                Ok(Ok(streams)) => streams,
                Ok(Err(e)) => {
                    debug!(error = %e, "connection ended before the control stream opened");
                    return;
                }
                Err(_) => {
                    self.close(&Close {
                        code: ErrorCode::HelloTimeout,
                        reason: "no control stream within the hello timeout".into(),
                    });
                    return;
                }
            };
        let mut session = RelaySession::new(Instant::now(), unix_ms(), config.clone());
        session.set_observed_addr(self.conn.remote_address());
        let mut out = Bytes::new();
        loop {
            while let Some(ev) = session.poll_event() {
                self.on_event(&mut session, ev).await;
            }
            if out.is_empty() {
                out = session.poll_transmit().unwrap_or_default();
            }
            if let Some(close) = session.poll_close() {
                let mut rest = out.to_vec();
                while let Some(b) = session.poll_transmit() {
                    rest.extend_from_slice(&b);
                }
                if close.code == ErrorCode::GoingAway || close.code == ErrorCode::Replaced {
                    // Let the GoAway reach the device before the close.
                    let _ = tokio::time::timeout(CLOSE_FLUSH, async {
                        send.write_all(&rest).await.ok()?;
                        send.finish().ok()?;
                        send.stopped().await.ok()
                    })
                    .await;
                }
                self.close(&close);
                return;
            }
            let deadline = session.poll_timeout();
            let held_until = self.held_until;
            tokio::select! {
                r = send.write(&out), if !out.is_empty() => match r {
                    Ok(n) => out.advance(n),
                    Err(e) => return debug!(error = %e, "control stream write failed"),
                },
                r = recv.read_chunk(usize::MAX, true) => match r {
                    Ok(Some(chunk)) => {
                        session.set_observed_addr(self.conn.remote_address());
                        session.handle_data(Instant::now(), &chunk.bytes);
                    }
                    Ok(None) => session.handle_stream_finished(),
                    Err(e) => return debug!(error = %e, "control stream read failed"),
                },
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.on_command(&mut session, *cmd),
                    None => return,
                },
                _ = sleep_until(deadline), if deadline.is_some() => session.handle_timeout(Instant::now()),
                _ = sleep_until(held_until), if held_until.is_some() => self.flush_held(&mut session),
                e = self.conn.closed() => return debug!(reason = %e, "connection closed"),
            }
        }
    }

    fn close(&self, close: &Close) {
        counter!(m::CLOSES, "code" => close.code.name()).increment(1);
        if close.code == ErrorCode::NoError {
            debug!(reason = %close.reason, "closing");
        } else {
            info!(code = %close.code, reason = %close.reason, "closing connection");
        }
        self.conn
            .close(close.code.as_u32().into(), close.reason.as_bytes());
    }

    async fn on_event(&mut self, session: &mut RelaySession, ev: RelayEvent) {
        match ev {
            RelayEvent::Hello { credential, sdk } => self.on_hello(session, &credential, &sdk),
            RelayEvent::Register { request_id, names } => {
                let Some(device) = self.device_id.clone() else {
                    return;
                };
                let now = unix_ms();
                let mut bindings = Vec::with_capacity(names.len());
                for name in names {
                    let id = self.shared.keys.channel_ids.derive(&device, &name);
                    let previous = self
                        .shared
                        .registry
                        .register_channel(&id, &device, &name, now);
                    // Persisted in the background (refreshed hourly for
                    // expiry): the device re-registers on every connection,
                    // so a crash before the commit loses nothing it cannot
                    // redo; waiting would put a disk flush in every handshake.
                    if previous.is_none_or(|t| now.saturating_sub(t) > REGISTRATION_REFRESH_MS) {
                        let record = StoredChannel {
                            device_id: device.to_string(),
                            name: name.clone(),
                            created_at_ms: now,
                            last_used_ms: now,
                            ..Default::default()
                        };
                        let (store, id) = (self.shared.store.clone(), id.clone());
                        tokio::spawn(async move {
                            if let Err(e) = store.put_channel(id.clone(), record).await {
                                warn!(error = %e, channel = %id, "channel not persisted");
                            }
                        });
                    }
                    bindings.push((name, id));
                }
                let ids: Vec<String> = bindings.iter().map(|b| b.1.clone()).collect();
                session.registered(request_id, bindings);
                // Deliver what waited while the device was away (the radio is
                // on now: normal priority goes out too).
                for id in ids {
                    match self.shared.store.queued(&id) {
                        Ok(events) => {
                            for ev in events {
                                self.deliver(session, stored_wake(ev), None, true);
                            }
                        }
                        Err(e) => warn!(error = %e, channel = %id, "cannot read the channel queue"),
                    }
                }
            }
            RelayEvent::Unregister { channel_ids } => {
                let reason = "unregistered by its device";
                for id in channel_ids {
                    self.shared.registry.channel_gone(&id, reason);
                    let store = self.shared.store.clone();
                    tokio::spawn(async move {
                        if let Err(e) = store.channel_gone(id, reason.into(), unix_ms()).await {
                            warn!(error = %e, "unregister not persisted");
                        }
                    });
                }
            }
            RelayEvent::Ack { event_id } => {
                counter!(m::ACKS).increment(1);
                if let Some(Some(reply)) = self.in_flight.remove(&event_id) {
                    let _ = reply.send(Delivery::Delivered);
                }
                // The publisher is answered at once; the durable state follows
                // (if the relay dies first, the event is sent again and the
                // SDK drops the duplicate).
                let store = self.shared.store.clone();
                tokio::spawn(async move {
                    if let Err(e) = store.ack(event_id, unix_ms()).await {
                        warn!(error = %e, "ack not persisted");
                    }
                });
            }
            RelayEvent::Ping => {
                counter!(m::KEEPALIVES).increment(1);
                // The device's radio is awake for its keepalive: piggyback.
                self.flush_held(session);
            }
        }
    }

    fn on_hello(&mut self, session: &mut RelaySession, credential: &str, sdk: &str) {
        let verified = self
            .shared
            .keys
            .verifier
            .verify(credential, TokenKind::Device, unix_secs())
            .map_err(|e| e.to_string())
            .and_then(|claims| {
                let dev = claims.sub.unwrap_or_default();
                validate_device_id(&dev)
                    .map(|_| dev)
                    .map_err(|e| e.to_string())
            });
        match verified {
            Ok(device_id) => {
                tracing::Span::current().record("device", device_id.as_str());
                let device: Arc<str> = device_id.as_str().into();
                let session_id = format!("{:x}-{:x}", unix_ms(), self.conn_id);
                session.accept(Instant::now(), device_id, session_id);
                if let Some(old) =
                    self.shared
                        .registry
                        .attach(device.clone(), self.conn_id, self.tx.clone())
                {
                    let _ = old.try_send(Box::new(ConnCommand::GoAway {
                        reason: GoAwayReason::Replaced,
                        reconnect_after: Duration::ZERO,
                        message: "another connection authenticated as this device",
                    }));
                }
                self.device_id = Some(device);
                debug!(%sdk, "device authenticated");
            }
            Err(reason) => {
                counter!(m::AUTH_FAILURES).increment(1);
                session.reject(
                    ErrorCode::Unauthorized,
                    format!("device credential refused: {reason}"),
                );
            }
        }
    }

    fn on_command(&mut self, session: &mut RelaySession, cmd: ConnCommand) {
        match cmd {
            ConnCommand::Deliver { wake, reply } => self.deliver(session, wake, reply, false),
            ConnCommand::GoAway {
                reason,
                reconnect_after,
                message,
            } => session.go_away(reason, reconnect_after, message),
        }
    }

    /// Sends a wake, or holds it if it is normal priority and the radio is
    /// not known to be awake. A wake already in flight is not sent twice.
    fn deliver(
        &mut self,
        session: &mut RelaySession,
        wake: Wake,
        reply: Option<oneshot::Sender<Delivery>>,
        awake: bool,
    ) {
        if let Some(slot) = self.in_flight.get_mut(&wake.event_id) {
            if reply.is_some() {
                *slot = reply;
            }
            return;
        }
        if self.in_flight.len() >= MAX_IN_FLIGHT {
            // Stored events stay queued for the next connection; the
            // publisher's wait ends without an answer.
            return;
        }
        let id = wake.event_id.clone();
        if wake.priority == Priority::Normal as i32 && !awake {
            self.held.push(wake);
            self.held_until
                .get_or_insert_with(|| Instant::now() + self.shared.config.normal_max_delay);
            self.in_flight.insert(id, reply);
            return;
        }
        self.flush_held(session);
        self.send(session, wake, reply);
    }

    fn send(
        &mut self,
        session: &mut RelaySession,
        wake: Wake,
        reply: Option<oneshot::Sender<Delivery>>,
    ) {
        let id = wake.event_id.clone();
        match session.send_wake(wake) {
            Ok(()) => {
                counter!(m::WAKES_SENT).increment(1);
                self.in_flight.insert(id, reply);
            }
            Err(e) => {
                warn!(error = %e, "wake not sent");
                self.in_flight.remove(&id);
                if let Some(r) = reply {
                    let _ = r.send(Delivery::NotConnected);
                }
            }
        }
    }

    /// Sends every held normal-priority wake, in arrival order.
    fn flush_held(&mut self, session: &mut RelaySession) {
        self.held_until = None;
        for wake in std::mem::take(&mut self.held) {
            let reply = self.in_flight.remove(&wake.event_id).flatten();
            self.send(session, wake, reply);
        }
    }
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

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}
