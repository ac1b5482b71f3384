//! The driver of one device connection: moves bytes between the QUIC
//! control stream and the sans-IO [`RelaySession`], and carries out what the
//! session asks (authenticate, register channels, complete publishes).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use metrics::{counter, gauge};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, info_span, warn, Instrument};
use wakewire_proto::names::validate_device_id;
use wakewire_proto::pb::device::GoAwayReason;
use wakewire_proto::relay_session::{Close, RelayEvent, RelaySession};
use wakewire_proto::token::TokenKind;
use wakewire_proto::ErrorCode;

use crate::metrics as m;
use crate::registry::{ConnCommand, Delivery};
use crate::relay::{unix_ms, unix_secs, Shared};

/// Most unacked wakes tracked per connection; beyond it publishes answer
/// `SENT_UNACKED` at once.
const MAX_PENDING_ACKS: usize = 4096;
/// Commands queued per connection before publishers wait.
const COMMAND_QUEUE: usize = 64;
/// How long a closing connection may take to flush a GoAway.
const CLOSE_FLUSH: Duration = Duration::from_secs(2);

/// Accepts one incoming connection and serves it until it ends.
pub(crate) async fn serve(incoming: quinn::Incoming, shared: Arc<Shared>) {
    let remote = incoming.remote_address();
    let handshake = incoming.await;
    shared.handshaking.fetch_sub(1, Ordering::Relaxed);
    let conn = match handshake {
        Ok(c) => c,
        Err(e) => {
            counter!(m::HANDSHAKE_FAILURES).increment(1);
            debug!(%remote, error = %e, "handshake failed");
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
    pending: HashMap<String, oneshot::Sender<Delivery>>,
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
                pending: HashMap::new(),
            },
            rx,
        )
    }
}

impl Driver {
    async fn run(mut self, mut rx: mpsc::Receiver<Box<ConnCommand>>) {
        let d = &mut self;
        d.run_inner(&mut rx).await;
        // Nothing more will be sent on this connection.
        if let Some(dev) = &d.device_id {
            d.shared.registry.detach(dev, d.conn_id);
        }
        rx.close();
        while let Ok(cmd) = rx.try_recv() {
            if let ConnCommand::Deliver { reply, .. } = *cmd {
                let _ = reply.send(Delivery::NotConnected);
            }
        }
        for (_, reply) in d.pending.drain() {
            let _ = reply.send(Delivery::SentUnacked);
        }
    }
}

impl Driver {
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
                self.on_event(&mut session, ev);
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

    fn on_event(&mut self, session: &mut RelaySession, ev: RelayEvent) {
        match ev {
            RelayEvent::Hello { credential, sdk } => {
                let verified = self
                    .shared
                    .keys
                    .verifier
                    .verify(&credential, TokenKind::Device, unix_secs())
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
                        if let Some(old) = self.shared.registry.attach(
                            device.clone(),
                            self.conn_id,
                            self.tx.clone(),
                        ) {
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
            RelayEvent::Register { request_id, names } => {
                let Some(device) = self.device_id.clone() else {
                    return;
                };
                let bindings = names
                    .into_iter()
                    .map(|name| {
                        let id = self.shared.keys.channel_ids.derive(&device, &name);
                        self.shared.registry.register_channel(&id, &device, &name);
                        (name, id)
                    })
                    .collect();
                session.registered(request_id, bindings);
            }
            RelayEvent::Unregister { channel_ids } => {
                for id in channel_ids {
                    self.shared.registry.unregister_channel(&id);
                }
            }
            RelayEvent::Ack { event_id } => {
                counter!(m::ACKS).increment(1);
                if let Some(reply) = self.pending.remove(&event_id) {
                    let _ = reply.send(Delivery::Delivered);
                }
            }
            RelayEvent::Ping => counter!(m::KEEPALIVES).increment(1),
        }
    }

    fn on_command(&mut self, session: &mut RelaySession, cmd: ConnCommand) {
        match cmd {
            ConnCommand::Deliver { wake, reply } => {
                let event_id = wake.event_id.clone();
                match session.send_wake(wake) {
                    Ok(()) => {
                        counter!(m::WAKES_SENT).increment(1);
                        if self.pending.len() < MAX_PENDING_ACKS {
                            self.pending.insert(event_id, reply);
                        } else {
                            let _ = reply.send(Delivery::SentUnacked);
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "wake not sent");
                        let _ = reply.send(Delivery::NotConnected);
                    }
                }
            }
            ConnCommand::GoAway {
                reason,
                reconnect_after,
                message,
            } => session.go_away(reason, reconnect_after, message),
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}
