//! The SDK's background task: a thin driver around the sans-IO
//! [`DeviceSession`]. It owns the QUIC connection, runs the app's
//! callbacks, acks, and reconnects with backoff after a loss, re-registering
//! every channel (whose ids stay the same).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};
use wakewire_proto::device_session::{Close, DeviceEvent, DeviceSession, DeviceSessionConfig};
use wakewire_proto::pb::device::{GoAwayReason, Priority};
use wakewire_proto::ErrorCode;

use crate::backoff::Backoff;
use crate::client::{
    Config, ConnectionInfo, KeepalivePolicy, PeriodicCallback, Shared, Status, WakeCallback,
    WakeEvent,
};
use crate::dedup::Seen;
use crate::error::{ConnectError, RegisterError};
use crate::keepalive::Keepalive;
use crate::tls;

/// Upper bound of the extra spread after the relay refused a connection
/// (never above the backoff cap).
const BUSY_RETRY_MAX: Duration = Duration::from_secs(15);

/// Requests from [`crate::Client`] handles.
pub(crate) enum Command {
    Register {
        name: String,
        callback: WakeCallback,
        reply: oneshot::Sender<Result<String, RegisterError>>,
    },
    Unregister {
        channel_id: String,
        reply: oneshot::Sender<Result<(), RegisterError>>,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
    SetStandby(bool),
    DecreaseKeepalive,
    SetKeepalive(KeepalivePolicy),
    NetworkChanged(String),
    AddPeriodic(Duration, PeriodicCallback),
}

/// Makes the first connection, then runs the driver in the background.
pub(crate) async fn start(
    config: Arc<Config>,
    shared: Arc<Shared>,
) -> Result<mpsc::UnboundedSender<Command>, ConnectError> {
    let mut endpoints = Endpoints {
        shared: config.endpoint.clone(),
        ..Endpoints::default()
    };
    let keepalive = Keepalive::new(
        config.keepalive.clone(),
        config.network_id.clone(),
        config.network_memory.clone(),
    );
    let link = Link::establish(&config, &mut endpoints, keepalive.interval()).await?;
    let seen = Seen::open(config.dedup_file.clone(), config.dedup_window)
        .map_err(|e| ConnectError::Config(format!("cannot open the dedup store: {e}")))?;
    let (tx, cmd_rx) = mpsc::unbounded_channel();
    let mut driver = Driver {
        keepalive,
        seen,
        config,
        shared,
        endpoints,
        cmd_rx,
        channels: HashMap::new(),
        by_id: HashMap::new(),
        requests: HashMap::new(),
        reregister: None,
    };
    let mut link = link;
    driver.on_connected(&mut link);
    tokio::spawn(driver.run(link));
    Ok(tx)
}

/// One client UDP socket per address family, reused across reconnects.
#[derive(Default)]
struct Endpoints {
    shared: Option<quinn::Endpoint>,
    v4: Option<quinn::Endpoint>,
    v6: Option<quinn::Endpoint>,
}

impl Endpoints {
    fn for_addr(&mut self, addr: SocketAddr) -> Result<&quinn::Endpoint, ConnectError> {
        if let Some(ep) = &self.shared {
            return Ok(ep);
        }
        let (slot, bind): (_, SocketAddr) = if addr.is_ipv4() {
            (&mut self.v4, ([0, 0, 0, 0], 0).into())
        } else {
            (&mut self.v6, ([0u16; 8], 0).into())
        };
        if slot.is_none() {
            let ep = quinn::Endpoint::client(bind).map_err(|e| {
                ConnectError::Unreachable(format!("cannot open a UDP socket on {bind}: {e}"))
            })?;
            *slot = Some(ep);
        }
        slot.as_ref()
            .ok_or_else(|| ConnectError::Unreachable("no UDP socket".into()))
    }
}

async fn resolve(relay: &str) -> Result<SocketAddr, ConnectError> {
    let dns = |message: String| ConnectError::Dns {
        host: relay.to_owned(),
        message,
    };
    tokio::net::lookup_host(relay)
        .await
        .map_err(|e| dns(e.to_string()))?
        .next()
        .ok_or_else(|| dns("no addresses".into()))
}

/// One established connection and its session.
struct Link {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    session: DeviceSession,
    out: Bytes,
    go_away: Option<(GoAwayReason, Duration, String)>,
    info: ConnectionInfo,
    /// The relay's probe service port (0 = none).
    probe_port: u16,
}

impl Link {
    async fn establish(
        config: &Config,
        endpoints: &mut Endpoints,
        keepalive_interval: Duration,
    ) -> Result<Link, ConnectError> {
        let addr = resolve(&config.relay).await?;
        let endpoint = endpoints.for_addr(addr)?;
        let probe = &config.suite_probe;
        probe.reset();
        let connecting = endpoint
            .connect_with(config.tls.clone(), addr, &config.server_name)
            .map_err(|e| match e {
                quinn::ConnectError::InvalidServerName(n) => {
                    ConnectError::Config(format!("invalid server name {n:?}"))
                }
                other => ConnectError::Unreachable(other.to_string()),
            })?;
        let deadline = tokio::time::Instant::now() + config.connect_timeout;
        let timed_out = || {
            ConnectError::TimedOut(format!(
                "no QUIC handshake with {addr} within {:?}",
                config.connect_timeout
            ))
        };
        let new_session = || {
            DeviceSession::new(
                Instant::now(),
                DeviceSessionConfig {
                    credential: config.token.clone(),
                    sdk: concat!("wakewire-sdk-rust/", env!("CARGO_PKG_VERSION")).into(),
                    keepalive_interval,
                    keepalive_timeout: config.keepalive_timeout,
                    welcome_timeout: config.connect_timeout,
                },
            )
        };
        // Reconnecting with a resumable TLS session, the Hello travels in
        // 0-RTT, in the first flight: one round trip less of radio-on time.
        // That is replay-safe: Hello and Register are idempotent, and the
        // relay reads nothing before the handshake is complete. Nothing is
        // trusted here before it is complete either.
        let (conn, early) = match connecting.into_0rtt() {
            Ok((conn, accepted)) => {
                let mut early = None;
                if let Ok((mut send, recv)) = conn.open_bi().await {
                    let mut session = new_session();
                    let mut sent = true;
                    while let Some(b) = session.poll_transmit() {
                        sent &= send.write_all(&b).await.is_ok();
                    }
                    if sent {
                        early = Some((send, recv, session));
                    }
                }
                let accepted = tokio::time::timeout_at(deadline, accepted)
                    .await
                    .map_err(|_| timed_out())?;
                if let Some(e) = conn.close_reason() {
                    return Err(ConnectError::from_connection(e));
                }
                // Rejected 0-RTT data is lost: start over on a new stream.
                (conn, if accepted { early } else { None })
            }
            Err(connecting) => {
                let conn = tokio::time::timeout_at(deadline, connecting)
                    .await
                    .map_err(|_| timed_out())?
                    .map_err(ConnectError::from_connection)?;
                (conn, None)
            }
        };
        let alpn = conn
            .handshake_data()
            .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|h| h.protocol);
        let suite =
            tls::check_protection(probe.negotiated(), alpn.as_deref(), config.min_protection)
                .inspect_err(|_| {
                    conn.close(
                        ErrorCode::NoError.as_u32().into(),
                        b"negotiated protection below the device's minimum",
                    );
                })?;
        let zero_rtt = early.is_some();
        let (send, recv, session) = match early {
            Some(streams) => streams,
            None => {
                let (send, recv) = conn
                    .open_bi()
                    .await
                    .map_err(ConnectError::from_connection)?;
                (send, recv, new_session())
            }
        };
        let mut link = Link {
            info: ConnectionInfo {
                transport: "QUIC v1",
                tls_version: "TLSv1.3",
                cipher_suite: suite,
                alpn: String::from_utf8_lossy(wakewire_proto::ALPN).into_owned(),
                relay_addr: addr,
                local_addr: endpoint.local_addr().ok(),
                session_id: String::new(),
                device_id: String::new(),
                keepalive_interval,
                zero_rtt,
            },
            conn,
            send,
            recv,
            session,
            out: Bytes::new(),
            go_away: None,
            probe_port: 0,
        };
        match tokio::time::timeout_at(deadline, link.next_event()).await {
            Err(_) => {
                link.close(ErrorCode::HelloTimeout, "no Welcome in time");
                Err(ConnectError::TimedOut(
                    "the relay did not answer Hello in time".into(),
                ))
            }
            Ok(Err(e)) => Err(e),
            Ok(Ok(DeviceEvent::Welcome {
                session_id,
                device_id,
                limits,
                ..
            })) => {
                link.info.session_id = session_id;
                link.info.device_id = device_id;
                link.probe_port = u16::try_from(limits.probe_port).unwrap_or(0);
                Ok(link)
            }
            Ok(Ok(other)) => Err(ConnectError::ProtocolViolation(format!(
                "expected Welcome, got {other:?}"
            ))),
        }
    }

    /// Runs the session until it has an event. Cancel-safe: every await is
    /// cancel-safe and all state lives in `self`.
    async fn next_event(&mut self) -> Result<DeviceEvent, ConnectError> {
        loop {
            if let Some(ev) = self.session.poll_event() {
                return Ok(ev);
            }
            if let Some(close) = self.session.poll_close() {
                self.close(close.code, &close.reason);
                return Err(self.explain(local_close(close)));
            }
            if self.out.is_empty() {
                self.out = self.session.poll_transmit().unwrap_or_default();
            }
            let deadline = self.session.poll_timeout();
            tokio::select! {
                r = self.send.write(&self.out), if !self.out.is_empty() => match r {
                    Ok(n) => self.out.advance(n),
                    Err(e) => return Err(self.explain(write_error(e))),
                },
                r = self.recv.read_chunk(usize::MAX, true) => match r {
                    Ok(Some(chunk)) => self.session.handle_data(Instant::now(), &chunk.bytes),
                    Ok(None) => self.session.handle_stream_finished(),
                    Err(e) => return Err(self.explain(read_error(e))),
                },
                _ = sleep_until(deadline), if deadline.is_some() => self.session.handle_timeout(Instant::now()),
            }
        }
    }

    fn close(&self, code: ErrorCode, reason: &str) {
        self.conn.close(code.as_u32().into(), reason.as_bytes());
    }

    /// Orderly close: flushes what the session still has to send (acks
    /// above all), waits (bounded) for the relay to receive it, then closes.
    async fn close_gracefully(&mut self, reason: &str) {
        let mut rest = std::mem::take(&mut self.out).to_vec();
        while let Some(b) = self.session.poll_transmit() {
            rest.extend_from_slice(&b);
        }
        let send = &mut self.send;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            send.write_all(&rest).await.ok()?;
            send.finish().ok()?;
            send.stopped().await.ok()
        })
        .await;
        self.close(ErrorCode::NoError, reason);
    }

    /// Adds what a GoAway said to the error that followed it.
    fn explain(&self, e: ConnectError) -> ConnectError {
        match (&self.go_away, e) {
            (
                Some((reason, after, msg)),
                ConnectError::RelayGoingAway { .. }
                | ConnectError::Replaced(_)
                | ConnectError::ConnectionLost(_),
            ) => {
                if *reason == GoAwayReason::Replaced {
                    ConnectError::Replaced(msg.clone())
                } else {
                    ConnectError::RelayGoingAway {
                        reconnect_after: *after,
                        message: msg.clone(),
                    }
                }
            }
            (_, e) => e,
        }
    }
}

fn local_close(c: Close) -> ConnectError {
    ConnectError::from_close_code(Some(c.code), c.reason)
}

fn write_error(e: quinn::WriteError) -> ConnectError {
    match e {
        quinn::WriteError::ConnectionLost(c) => ConnectError::from_connection(c),
        other => ConnectError::ConnectionLost(format!("control stream: {other}")),
    }
}

fn read_error(e: quinn::ReadError) -> ConnectError {
    match e {
        quinn::ReadError::ConnectionLost(c) => ConnectError::from_connection(c),
        other => ConnectError::ConnectionLost(format!("control stream: {other}")),
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

struct ChannelState {
    callback: WakeCallback,
    id: Option<String>,
    waiters: Vec<oneshot::Sender<Result<String, RegisterError>>>,
}

struct Driver {
    keepalive: Keepalive,
    /// Event ids already handed to the app.
    seen: Seen,
    config: Arc<Config>,
    shared: Arc<Shared>,
    endpoints: Endpoints,
    cmd_rx: mpsc::UnboundedReceiver<Command>,
    /// Channel name -> state.
    channels: HashMap<String, ChannelState>,
    /// Channel id -> name.
    by_id: HashMap<String, String>,
    /// Register request id -> names asked for.
    requests: HashMap<u64, Vec<String>>,
    /// The request that re-registers channels after a reconnect.
    reregister: Option<u64>,
}

impl Driver {
    async fn run(mut self, mut link: Link) {
        let (initial, max) = self.config.backoff;
        let mut backoff = Backoff::new(initial, max);
        loop {
            let mut error = self.serve(&mut link).await;
            self.set_info(None);
            if !error.is_retryable() {
                let why = error.to_string();
                self.emit(&Status::Disconnected {
                    error,
                    retry_in: None,
                });
                return self.fail_all(&why);
            }
            info!(%error, "disconnected from the relay");
            let mut attempt = 0;
            link = loop {
                attempt += 1;
                let mut delay = backoff.next_delay(random_u64());
                match &error {
                    ConnectError::RelayGoingAway {
                        reconnect_after, ..
                    } => delay += *reconnect_after,
                    // A busy relay sheds load: spread the retries wider than
                    // the backoff alone would, so they do not come back in
                    // the same instant.
                    ConnectError::Refused(_) => {
                        let busy = BUSY_RETRY_MAX.min(self.config.backoff.1);
                        let spread = u64::try_from(busy.as_millis()).unwrap_or(u64::MAX);
                        delay = delay.max(Duration::from_millis(random_u64() % (spread + 1)));
                    }
                    _ => {}
                }
                self.emit(&Status::Disconnected {
                    error: error.clone(),
                    retry_in: Some(delay),
                });
                if !self.wait_offline(delay).await {
                    self.emit(&Status::Disconnected {
                        error: ConnectError::Closed,
                        retry_in: None,
                    });
                    return self.fail_all("the client was closed");
                }
                self.emit(&Status::Connecting { attempt });
                match Link::establish(&self.config, &mut self.endpoints, self.keepalive.interval())
                    .await
                {
                    Ok(l) => break l,
                    Err(e) if e.is_retryable() => error = e,
                    Err(e) => {
                        warn!(error = %e, "giving up reconnecting");
                        self.emit(&Status::Disconnected {
                            error: e.clone(),
                            retry_in: None,
                        });
                        return self.fail_all(&e.to_string());
                    }
                }
            };
            backoff.reset();
            self.on_connected(&mut link);
        }
    }

    /// Serves one connection until it fails or the app closes the client.
    async fn serve(&mut self, link: &mut Link) -> ConnectError {
        loop {
            self.sync_keepalive(link);
            let deadline = self.keepalive.deadline();
            tokio::select! {
                Some(id) = self.keepalive.replies.recv() => self.keepalive.on_probe_reply(Instant::now(), id),
                _ = sleep_until(deadline), if deadline.is_some() => self.keepalive.on_timer(Instant::now()),
                cmd = self.cmd_rx.recv() => match cmd {
                    None => {
                        link.close_gracefully("client dropped").await;
                        return ConnectError::Closed;
                    }
                    Some(Command::Close { reply }) => {
                        link.close_gracefully("client closed").await;
                        let _ = reply.send(());
                        return ConnectError::Closed;
                    }
                    Some(cmd) => self.on_command(cmd, Some(link)),
                },
                ev = link.next_event() => match ev {
                    Ok(ev) => self.on_event(link, ev),
                    Err(e) => return e,
                },
            }
        }
    }

    /// Waits `delay` while taking commands; false if the app closed.
    async fn wait_offline(&mut self, delay: Duration) -> bool {
        let until = tokio::time::Instant::now() + delay;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return true,
                cmd = self.cmd_rx.recv() => match cmd {
                    None => return false,
                    Some(Command::Close { reply }) => {
                        let _ = reply.send(());
                        return false;
                    }
                    Some(cmd) => self.on_command(cmd, None),
                },
            }
        }
    }

    /// Applies what the keepalive logic decided: probes out, statuses to
    /// the app, the interval into the session.
    fn sync_keepalive(&mut self, link: &mut Link) {
        let probe_addr = self.config.probe_addr.or_else(|| {
            (link.probe_port != 0)
                .then(|| SocketAddr::new(link.info.relay_addr.ip(), link.probe_port))
        });
        for status in self.keepalive.poll(Instant::now(), probe_addr) {
            self.emit(&status);
        }
        let interval = self.keepalive.interval();
        if link.session.keepalive_interval() != interval {
            link.session.set_keepalive_interval(interval);
            link.info.keepalive_interval = interval;
            self.set_info(Some(link.info.clone()));
        }
    }

    fn on_connected(&mut self, link: &mut Link) {
        info!(relay = %link.info.relay_addr, session = %link.info.session_id, suite = link.info.cipher_suite.name(), "connected");
        self.set_info(Some(link.info.clone()));
        self.emit(&Status::Connected(link.info.clone()));
        self.requests.clear();
        if !self.channels.is_empty() {
            let names: Vec<String> = self.channels.keys().cloned().collect();
            let request = link.session.register(Instant::now(), names.clone());
            self.requests.insert(request, names);
            self.reregister = Some(request);
        }
    }

    fn on_command(&mut self, cmd: Command, link: Option<&mut Link>) {
        match cmd {
            Command::Register {
                name,
                callback,
                reply,
            } => {
                if self.channels.contains_key(&name) {
                    let _ = reply.send(Err(RegisterError::AlreadyRegistered(name)));
                    return;
                }
                self.channels.insert(
                    name.clone(),
                    ChannelState {
                        callback,
                        id: None,
                        waiters: vec![reply],
                    },
                );
                // Offline: registered with the others on the next connection.
                if let Some(link) = link {
                    let request = link.session.register(Instant::now(), vec![name.clone()]);
                    self.requests.insert(request, vec![name]);
                }
            }
            Command::Unregister { channel_id, reply } => {
                if let Some(name) = self.by_id.remove(&channel_id) {
                    self.channels.remove(&name);
                    if let Some(link) = link {
                        link.session.unregister(Instant::now(), vec![channel_id]);
                    }
                }
                let _ = reply.send(Ok(()));
            }
            Command::Close { reply } => {
                let _ = reply.send(());
            }
            Command::SetStandby(on) => self.keepalive.set_standby(on),
            Command::DecreaseKeepalive => self.keepalive.decrease(Instant::now()),
            Command::SetKeepalive(policy) => self.keepalive.set_policy(policy, Instant::now()),
            Command::AddPeriodic(period, cb) => {
                self.keepalive.add_periodic(period, cb, Instant::now())
            }
            Command::NetworkChanged(network) => {
                self.keepalive.network_changed(network, Instant::now());
                if let Some(link) = link {
                    self.migrate(link);
                }
            }
        }
    }

    /// Moves the connection to a new local socket (QUIC path migration, as
    /// after a Wi-Fi to cellular switch) and pings so the relay learns the
    /// new path at once. A shared endpoint (the load tester's) stays put.
    fn migrate(&mut self, link: &mut Link) {
        if self.config.endpoint.is_none() {
            let relay = link.info.relay_addr;
            let bind: SocketAddr = if relay.is_ipv4() {
                ([0, 0, 0, 0], 0).into()
            } else {
                ([0u16; 8], 0).into()
            };
            let moved = std::net::UdpSocket::bind(bind).and_then(|socket| {
                let ep = self
                    .endpoints
                    .for_addr(relay)
                    .map_err(std::io::Error::other)?;
                ep.rebind(socket)?;
                ep.local_addr()
            });
            match moved {
                Ok(local) => link.info.local_addr = Some(local),
                Err(e) => {
                    warn!(error = %e, "cannot move to a new socket; the next keepalive reconnects if needed")
                }
            }
        }
        link.session.ping(Instant::now());
    }

    fn on_event(&mut self, link: &mut Link, ev: DeviceEvent) {
        match ev {
            DeviceEvent::Registered { request_id, result } => {
                let names = self.requests.remove(&request_id).unwrap_or_default();
                match result {
                    Ok(bindings) => {
                        for b in bindings {
                            let Some(state) = self.channels.get_mut(&b.name) else {
                                continue;
                            };
                            if let Some(old) = state.id.as_ref().filter(|old| **old != b.channel_id)
                            {
                                warn!(channel = %b.name, %old, new = %b.channel_id, "channel id changed");
                                self.by_id.remove(old);
                            }
                            state.id = Some(b.channel_id.clone());
                            for w in state.waiters.drain(..) {
                                let _ = w.send(Ok(b.channel_id.clone()));
                            }
                            self.by_id.insert(b.channel_id, b.name);
                        }
                        if self.reregister == Some(request_id) {
                            self.reregister = None;
                            self.emit(&Status::Reset { channels: names });
                        }
                    }
                    Err(refused) => {
                        warn!(?names, code = refused.code, message = %refused.message, "registration refused");
                        for name in names {
                            let fresh = self.channels.get(&name).is_some_and(|s| s.id.is_none());
                            if let Some(state) = self.channels.get_mut(&name) {
                                for w in state.waiters.drain(..) {
                                    let _ = w.send(Err(RegisterError::Refused {
                                        code: refused.code,
                                        message: refused.message.clone(),
                                    }));
                                }
                            }
                            if fresh {
                                self.channels.remove(&name);
                            }
                        }
                    }
                }
            }
            DeviceEvent::Wake(w) => {
                if self.seen.contains(&w.event_id) {
                    debug!(event = %w.event_id, "duplicate wake: already handled, acking again");
                    link.session.ack(Instant::now(), w.event_id);
                    return;
                }
                let Some(name) = self.by_id.get(&w.channel_id) else {
                    warn!(channel = %w.channel_id, event = %w.event_id, "wake for a channel this client does not have; not acked");
                    return;
                };
                let Some(state) = self.channels.get(name) else {
                    return;
                };
                let event = WakeEvent {
                    priority: Priority::try_from(w.priority).unwrap_or(Priority::High),
                    event_id: w.event_id,
                    channel_id: w.channel_id,
                    channel: name.clone(),
                    payload: w.payload,
                    created_at_ms: w.created_at_ms,
                    ttl_s: w.ttl_s,
                };
                let cb = state.callback.clone();
                if catch_unwind(AssertUnwindSafe(|| cb(&event))).is_ok() {
                    if let Err(e) = self.seen.insert(&event.event_id) {
                        warn!(error = %e, "cannot persist the handled event id");
                    }
                    link.session.ack(Instant::now(), event.event_id);
                } else {
                    warn!(event = %event.event_id, "wake callback panicked; event not acked");
                }
            }
            DeviceEvent::KeepaliveCompleted {
                rtt,
                observed_addr,
                idle,
            } => {
                debug!(?rtt, %observed_addr, ?idle, "keepalive");
                self.keepalive
                    .on_keepalive(Instant::now(), idle, &observed_addr);
                self.emit(&Status::KeepaliveCompleted { rtt, observed_addr });
            }
            DeviceEvent::GoAway {
                reason,
                reconnect_after,
                message,
            } => {
                info!(?reason, ?reconnect_after, %message, "relay going away");
                link.go_away = Some((reason, reconnect_after, message));
            }
            DeviceEvent::Welcome { .. } => {}
        }
    }

    fn set_info(&self, info: Option<ConnectionInfo>) {
        if let Ok(mut i) = self.shared.info.lock() {
            *i = info;
        }
    }

    fn emit(&self, status: &Status) {
        if let Some(cb) = &self.config.on_status {
            if catch_unwind(AssertUnwindSafe(|| cb(status))).is_err() {
                warn!("status callback panicked");
            }
        }
    }

    fn fail_all(&mut self, why: &str) {
        for (_, state) in self.channels.drain() {
            for w in state.waiters {
                let _ = w.send(Err(RegisterError::Closed(why.to_owned())));
            }
        }
    }
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).is_err() {
        // Jitter only: the clock's low bits will do.
        return u64::from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0),
        );
    }
    u64::from_le_bytes(b)
}
