//! The SDK's background task: a thin driver around the sans-IO
//! [`DeviceConnection`]. It owns the link to the relay, runs the app's
//! callbacks (or feeds its wake streams), persists the dedup window, and
//! reconnects with backoff after a loss. Which wakes reach the app, what is
//! acked and what is registered again is decided by the core.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};
use wakewire_proto::device_connection::{AddChannelError, DeviceConnection, DeviceConnectionEvent};
use wakewire_proto::pb::device::Wake as WireWake;

use crate::backoff::Backoff;
use crate::clock::{self, random_u64, sleep_until};
use crate::config::{Config, PeriodicCallback, Shared, WakeCallback};
use crate::dedup::DedupFile;
use crate::error::{ConnectError, RegisterError};
use crate::keepalive::Keepalive;
use crate::link::{resolve_all, Endpoints, Link};
use crate::relays::Relays;
use crate::stream::Wake;
use crate::transport::Transport;
use crate::types::{ChannelId, KeepalivePolicy, Priority, Status, WakeEvent};

/// Upper bound of the extra spread after the relay refused a connection
/// (never above the backoff cap).
const BUSY_RETRY_MAX: Duration = Duration::from_secs(15);

/// Where a channel's wakes go.
pub(crate) enum Sink {
    /// A callback run on the driver's task; acked when it returns.
    Callback(WakeCallback),
    /// A stream the app reads; acked by [`Wake::ack`].
    Stream(mpsc::Sender<Wake>),
}

/// Requests from [`crate::Client`] handles and wakes.
pub(crate) enum Command {
    Register {
        name: String,
        sink: Sink,
        reply: oneshot::Sender<Result<ChannelId, RegisterError>>,
    },
    Unregister {
        channel_id: String,
        reply: oneshot::Sender<Result<(), RegisterError>>,
    },
    Ack {
        event_id: String,
    },
    Abandon {
        event_id: String,
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
    let mut endpoints = Endpoints::new(config.endpoint.clone());
    let keepalive = Keepalive::new(
        config.keepalive.clone(),
        config.network_id.clone(),
        config.network_memory.clone(),
    );
    let (dedup, handled) = match &config.dedup_file {
        Some(path) => {
            let (f, ids) = DedupFile::open(path.clone())
                .map_err(|e| ConnectError::Config(format!("cannot open the dedup store: {e}")))?;
            (Some(f), ids)
        }
        None => (None, vec![]),
    };
    let mut core = DeviceConnection::new(config.dedup_window, handled);
    let mut relays = Relays::new([config.relay.as_str()]);
    // The first connection tries each relay once before giving up.
    let mut link = {
        let mut tries = 0;
        loop {
            tries += 1;
            let _turn = crate::limit::turn(config.handshake_limit.as_ref()).await;
            match connect_once(
                &config,
                &mut endpoints,
                &mut core,
                &mut relays,
                keepalive.interval(),
                attempt_transport(&config, false),
            )
            .await
            {
                Ok(l) => break l,
                Err((e, n)) if e.is_retryable() && tries < n.clamp(1, 8) => continue,
                Err((e, _)) => return Err(e),
            }
        }
    };
    let (tx, cmd_rx) = mpsc::unbounded_channel();
    let mut driver = Driver {
        keepalive,
        dedup,
        core,
        config,
        shared,
        endpoints,
        relays,
        cmd_tx: tx.downgrade(),
        cmd_rx,
        sinks: HashMap::new(),
        waiters: HashMap::new(),
        prefer_tcp: false,
        quic_retry_at: None,
        quic_probe: None,
        moving_to_quic: false,
    };
    driver.on_connected(&mut link);
    tokio::spawn(driver.run(link));
    Ok(tx)
}

/// One connection attempt to a relay the set chooses; on failure, that
/// relay is avoided for a while, and the number of relays known is
/// returned with the error.
async fn connect_once(
    config: &Config,
    endpoints: &mut Endpoints,
    core: &mut DeviceConnection,
    relays: &mut Relays,
    keepalive_interval: Duration,
    transport: Transport,
) -> Result<Link, (ConnectError, usize)> {
    let resolved = resolve_all(&relays.targets()).await.map_err(|e| (e, 1))?;
    let n = resolved.len();
    let Some(chosen) = relays.choose(clock::now(), &resolved, random_u64()) else {
        return Err((ConnectError::Unreachable("no relay address".into()), n));
    };
    let (first, alt) = relays.family_pair(&resolved, &chosen);
    let target = (chosen.0, first);
    match Link::establish(
        config,
        endpoints,
        core,
        keepalive_interval,
        &target,
        alt,
        transport,
    )
    .await
    {
        Ok(l) => {
            relays.connected(l.info.relay_addr);
            Ok(l)
        }
        Err(e) => {
            relays.failed(clock::now(), target.1);
            if let Some(a) = alt {
                relays.failed(clock::now(), a);
            }
            Err((e, n))
        }
    }
}

/// The transport of the next attempt: the app's choice; in `Auto`, TCP
/// straight away through a proxy (QUIC does not go through proxies) or on a
/// network where TCP won before.
fn attempt_transport(config: &Config, prefer_tcp: bool) -> Transport {
    match config.transport {
        Transport::Auto if config.proxy.is_some() || prefer_tcp => Transport::Tcp,
        t => t,
    }
}

/// Whether a QUIC handshake with `addr` completes now (the relay is not
/// asked anything; the connection is closed at once).
async fn quic_works(
    endpoint: quinn::Endpoint,
    tls: quinn::ClientConfig,
    addr: SocketAddr,
    server_name: String,
    timeout: Duration,
) -> bool {
    let Ok(connecting) = endpoint.connect_with(tls, addr, &server_name) else {
        return false;
    };
    match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(conn)) => {
            conn.close(0u32.into(), b"transport probe");
            true
        }
        _ => false,
    }
}

struct Driver {
    keepalive: Keepalive,
    dedup: Option<DedupFile>,
    core: DeviceConnection,
    config: Arc<Config>,
    shared: Arc<Shared>,
    endpoints: Endpoints,
    /// Which relay to connect to next.
    relays: Relays,
    /// For the acks of streamed wakes (weak: the driver ends when every
    /// client handle is gone).
    cmd_tx: mpsc::WeakUnboundedSender<Command>,
    cmd_rx: mpsc::UnboundedReceiver<Command>,
    /// Channel name -> where its wakes go.
    sinks: HashMap<String, Sink>,
    /// Channel name -> register calls waiting for its id.
    waiters: HashMap<String, Vec<oneshot::Sender<Result<ChannelId, RegisterError>>>>,
    /// `Auto` on a network where TCP won: connect over TCP first.
    prefer_tcp: bool,
    /// On TCP in `Auto`: when to try QUIC again.
    quic_retry_at: Option<std::time::Instant>,
    /// A QUIC handshake being tried in the background.
    quic_probe: Option<oneshot::Receiver<bool>>,
    /// QUIC works again: the TCP link was closed to move back.
    moving_to_quic: bool,
}

impl Driver {
    async fn run(mut self, mut link: Link) {
        let (initial, max) = self.config.backoff;
        let mut backoff = Backoff::new(initial, max);
        loop {
            let mut error = self.serve(&mut link).await;
            let moving = std::mem::take(&mut self.moving_to_quic);
            if !moving && !matches!(error, ConnectError::RelayGoingAway { .. }) {
                self.relays.failed(clock::now(), link.info.relay_addr);
            }
            self.core.disconnected();
            self.set_info(None);
            if !error.keeps_reconnecting() {
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
                let mut delay = if moving && attempt == 1 {
                    Duration::ZERO
                } else {
                    backoff.next_delay(random_u64())
                };
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
                let Some(_turn) = self.wait_turn().await else {
                    self.emit(&Status::Disconnected {
                        error: ConnectError::Closed,
                        retry_in: None,
                    });
                    return self.fail_all("the client was closed");
                };
                self.emit(&Status::Connecting { attempt });
                let interval = self.keepalive.interval();
                match connect_once(
                    &self.config,
                    &mut self.endpoints,
                    &mut self.core,
                    &mut self.relays,
                    interval,
                    attempt_transport(&self.config, self.prefer_tcp),
                )
                .await
                {
                    Ok(l) => break l,
                    Err((e, _)) if e.keeps_reconnecting() => error = e,
                    Err((e, _)) => {
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
            while let Some(ev) = self.core.poll_event() {
                self.on_event(link, ev);
            }
            self.sync_keepalive(link);
            let deadline = self.keepalive.deadline();
            tokio::select! {
                Some(id) = self.keepalive.replies.recv() => self.keepalive.on_probe_reply(clock::now(), id),
                _ = sleep_until(deadline), if deadline.is_some() => self.keepalive.on_timer(clock::now()),
                cmd = self.cmd_rx.recv() => match cmd {
                    None => {
                        link.close_gracefully(&mut self.core, "client dropped").await;
                        return ConnectError::Closed;
                    }
                    Some(Command::Close { reply }) => {
                        link.close_gracefully(&mut self.core, "client closed").await;
                        let _ = reply.send(());
                        return ConnectError::Closed;
                    }
                    Some(cmd) => self.on_command(cmd, Some(link)),
                },
                r = link.step(&mut self.core) => if let Err(e) = r {
                    return e;
                },
                _ = sleep_until(self.quic_retry_at), if self.quic_retry_at.is_some() && self.quic_probe.is_none() => {
                    self.quic_retry_at = None;
                    self.start_quic_probe(link);
                }
                Ok(works) = wait_probe(&mut self.quic_probe), if self.quic_probe.is_some() => {
                    self.quic_probe = None;
                    if works {
                        info!("UDP works again on this network: moving from TCP back to QUIC");
                        self.prefer_tcp = false;
                        self.moving_to_quic = true;
                        link.close_gracefully(&mut self.core, "moving to QUIC").await;
                        return ConnectError::ConnectionLost("moving from TCP back to QUIC".into());
                    }
                    self.quic_retry_at = Some(clock::now() + self.config.quic_retry);
                }
            }
        }
    }

    /// Tries a QUIC handshake with the relay of `link` in the background.
    fn start_quic_probe(&mut self, link: &Link) {
        let addr = link.info.relay_addr;
        let Ok(endpoint) = self.endpoints.for_addr(addr).cloned() else {
            self.quic_retry_at = Some(clock::now() + self.config.quic_retry);
            return;
        };
        let server_name = self
            .config
            .server_name
            .clone()
            .unwrap_or_else(|| crate::client::host_of(&self.config.relay));
        let (tx, rx) = oneshot::channel();
        let (tls, timeout) = (self.config.tls.clone(), self.config.connect_timeout);
        tokio::spawn(async move {
            let _ = tx.send(quic_works(endpoint, tls, addr, server_name, timeout).await);
        });
        self.quic_probe = Some(rx);
    }

    /// Waits `delay` while taking commands; false if the app closed.
    async fn wait_offline(&mut self, delay: Duration) -> bool {
        let until = tokio::time::Instant::from_std(clock::now() + delay);
        self.serve_offline_until(tokio::time::sleep_until(until))
            .await
            .is_some()
    }

    /// Waits for a turn under the app's [`crate::HandshakeLimit`] (at once
    /// without one), serving commands meanwhile; `None`: the client was
    /// closed.
    async fn wait_turn(&mut self) -> Option<Option<crate::limit::Turn>> {
        let limit = self.config.handshake_limit.clone();
        self.serve_offline_until(crate::limit::turn(limit.as_ref()))
            .await
    }

    /// Serves the app's commands while no connection is up, until `done`
    /// completes (its output) or the app closes the client (`None`).
    async fn serve_offline_until<T>(
        &mut self,
        done: impl std::future::Future<Output = T>,
    ) -> Option<T> {
        tokio::pin!(done);
        loop {
            tokio::select! {
                t = &mut done => return Some(t),
                cmd = self.cmd_rx.recv() => match cmd {
                    None => return None,
                    Some(Command::Close { reply }) => {
                        let _ = reply.send(());
                        return None;
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
        for status in self.keepalive.poll(clock::now(), probe_addr) {
            self.emit(&status);
        }
        let interval = self.keepalive.interval();
        if let Some(session) = self.core.session_mut() {
            if session.keepalive_interval() != interval {
                session.set_keepalive_interval(interval);
                link.info.keepalive_interval = interval;
                self.set_info(Some(link.info.clone()));
            }
        }
    }

    fn on_connected(&mut self, link: &mut Link) {
        info!(relay = %link.info.relay_addr, transport = link.info.transport, session = %link.info.session_id, suite = link.info.cipher_suite.name(), "connected");
        // TCP won in `Auto`: keep it on this network, try QUIC again later.
        let auto = self.config.transport == Transport::Auto && self.config.proxy.is_none();
        if auto && link.is_tcp() {
            self.prefer_tcp = true;
            self.quic_retry_at = Some(clock::now() + self.config.quic_retry);
        } else {
            self.quic_retry_at = None;
        }
        self.quic_probe = None;
        self.keepalive.set_transport(link.is_tcp(), clock::now());
        self.set_info(Some(link.info.clone()));
        self.emit(&Status::Connected(link.info.clone()));
    }

    fn on_command(&mut self, cmd: Command, link: Option<&mut Link>) {
        let now = clock::now();
        match cmd {
            Command::Register { name, sink, reply } => {
                match self.core.register(now, name.clone()) {
                    Ok(()) => {
                        self.sinks.insert(name.clone(), sink);
                        self.waiters.entry(name).or_default().push(reply);
                    }
                    Err(AddChannelError::AlreadyRegistered(n)) => {
                        let _ = reply.send(Err(RegisterError::AlreadyRegistered(n)));
                    }
                }
            }
            Command::Unregister { channel_id, reply } => {
                if let Some(name) = self.core.unregister(now, &channel_id) {
                    self.sinks.remove(&name);
                }
                let _ = reply.send(Ok(()));
            }
            Command::Ack { event_id } => self.handled(&event_id),
            Command::Abandon { event_id } => self.core.abandoned(&event_id),
            Command::Close { reply } => {
                let _ = reply.send(());
            }
            Command::SetStandby(on) => self.keepalive.set_standby(on),
            Command::DecreaseKeepalive => self.keepalive.decrease(now),
            Command::SetKeepalive(policy) => self.keepalive.set_policy(policy, now),
            Command::AddPeriodic(period, cb) => self.keepalive.add_periodic(period, cb, now),
            Command::NetworkChanged(network) => {
                self.keepalive.network_changed(network, now);
                // What won on the old network says nothing of this one.
                self.prefer_tcp = false;
                if let Some(link) = link {
                    if link.is_tcp() {
                        // A TCP connection cannot move: the next keepalive
                        // notices it is gone (or it still works).
                        self.quic_retry_at = Some(now);
                    } else {
                        self.migrate(link);
                    }
                }
            }
        }
    }

    /// The app is done with an event: remember it (persisted first, if a
    /// dedup store is used), then the core acks it.
    fn handled(&mut self, event_id: &str) {
        if self.core.handled(clock::now(), event_id) {
            if let Some(f) = &mut self.dedup {
                if let Err(e) =
                    f.append(event_id, self.config.dedup_window, self.core.handled_ids())
                {
                    warn!(error = %e, "cannot persist the handled event id");
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
        if let Some(s) = self.core.session_mut() {
            s.ping(clock::now());
        }
    }

    fn on_event(&mut self, link: &mut Link, ev: DeviceConnectionEvent) {
        match ev {
            DeviceConnectionEvent::Registered { name, channel_id } => {
                for w in self.waiters.remove(&name).unwrap_or_default() {
                    let _ = w.send(Ok(ChannelId::new(channel_id.clone())));
                }
            }
            DeviceConnectionEvent::RegisterRefused { names, refused } => {
                warn!(?names, code = refused.code, message = %refused.message, "registration refused");
                for name in names {
                    if self.core.channel_id(&name).is_none() {
                        self.sinks.remove(&name);
                    }
                    for w in self.waiters.remove(&name).unwrap_or_default() {
                        let _ = w.send(Err(RegisterError::refused(&refused)));
                    }
                }
            }
            DeviceConnectionEvent::Reset { channels } => self.emit(&Status::Reset { channels }),
            DeviceConnectionEvent::Wake { channel, wake } => self.on_wake(channel, wake),
            DeviceConnectionEvent::UnknownChannel { wake } => {
                warn!(channel = %wake.channel_id, event = %wake.event_id, "wake for a channel this client does not have; not acked");
            }
            DeviceConnectionEvent::KeepaliveCompleted {
                rtt,
                observed_addr,
                idle,
            } => {
                debug!(?rtt, %observed_addr, ?idle, "keepalive");
                self.keepalive
                    .on_keepalive(clock::now(), idle, &observed_addr);
                self.emit(&Status::KeepaliveCompleted { rtt, observed_addr });
            }
            DeviceConnectionEvent::CanaryReceived { idle } => {
                debug!(?idle, "canary: the binding survived");
                self.keepalive.on_canary(clock::now(), idle);
            }
            DeviceConnectionEvent::CanaryMissed { after_idle } => {
                info!(?after_idle, "canary missed: the NAT binding had died");
                if let Some(status) = self.keepalive.on_canary_missed(clock::now(), after_idle) {
                    self.emit(&status);
                }
            }
            DeviceConnectionEvent::GoAway {
                reason,
                reconnect_after,
                message,
                alternatives,
            } => {
                info!(?reason, ?reconnect_after, %message, ?alternatives, "relay going away");
                self.relays.learn(&alternatives);
                self.relays.leaving(clock::now(), link.info.relay_addr);
                link.go_away = Some((reason, reconnect_after, message));
            }
            DeviceConnectionEvent::Welcome { .. } => {}
        }
    }

    fn on_wake(&mut self, channel: String, w: WireWake) {
        let event = WakeEvent {
            priority: Priority::from_wire(w.priority),
            event_id: w.event_id,
            channel_id: ChannelId::new(w.channel_id),
            channel,
            payload: w.payload,
            created_at_ms: w.created_at_ms,
            ttl_s: w.ttl_s,
        };
        match self.sinks.get(&event.channel) {
            Some(Sink::Callback(cb)) => {
                let cb = cb.clone();
                if catch_unwind(AssertUnwindSafe(|| cb(&event))).is_ok() {
                    self.handled(&event.event_id);
                } else {
                    warn!(event = %event.event_id, "wake callback panicked; event not acked");
                    self.core.abandoned(&event.event_id);
                }
            }
            Some(Sink::Stream(tx)) => {
                let Some(cmd) = self.cmd_tx.upgrade() else {
                    return self.core.abandoned(&event.event_id);
                };
                let id = event.event_id.clone();
                if let Err(e) = tx.try_send(Wake::new(event, cmd)) {
                    // The app does not read (or dropped) the stream: not
                    // acked, so the relay sends it again later.
                    debug!(event = %id, "wake stream full or closed; not acked");
                    drop(e);
                }
            }
            None => self.core.abandoned(&event.event_id),
        }
    }

    fn set_info(&self, info: Option<crate::types::ConnectionInfo>) {
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
        for (_, waiters) in self.waiters.drain() {
            for w in waiters {
                let _ = w.send(Err(RegisterError::Closed(why.to_owned())));
            }
        }
        self.sinks.clear();
    }
}

async fn wait_probe(
    probe: &mut Option<oneshot::Receiver<bool>>,
) -> Result<bool, oneshot::error::RecvError> {
    match probe {
        Some(rx) => rx.await,
        None => std::future::pending().await,
    }
}
