//! One connection to the relay (QUIC and its control stream, or TLS over
//! TCP) and the session on it: the I/O half of the SDK's driver. What is sent and what arrivals mean is decided by
//! the sans-IO [`DeviceConnection`]; a link only moves its bytes.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, Bytes};
use wakewire_proto::device_connection::{DeviceConnection, DeviceConnectionEvent};
use wakewire_proto::device_session::DeviceSessionConfig;
use wakewire_proto::pb::device::GoAwayReason;
use wakewire_proto::ErrorCode;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::debug;

use crate::clock;
use crate::config::Config;
use crate::error::ConnectError;
use crate::relays::FAMILY_DELAY;
use crate::tls::{self, CipherSuite};
use crate::transport::{TcpTls, Transport};
use crate::types::ConnectionInfo;

/// One client UDP socket per address family, reused across reconnects.
pub(crate) struct Endpoints {
    shared: Option<quinn::Endpoint>,
    v4: Option<quinn::Endpoint>,
    v6: Option<quinn::Endpoint>,
}

impl Endpoints {
    /// Uses `shared` for every connection if given, else opens sockets as
    /// needed.
    pub(crate) fn new(shared: Option<quinn::Endpoint>) -> Self {
        Self {
            shared,
            v4: None,
            v6: None,
        }
    }

    pub(crate) fn for_addr(&mut self, addr: SocketAddr) -> Result<&quinn::Endpoint, ConnectError> {
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

/// Resolves every relay name (each may have several addresses); names
/// that do not resolve are skipped, unless none does.
pub(crate) async fn resolve_all(
    names: &[String],
) -> Result<Vec<(String, SocketAddr)>, ConnectError> {
    let mut out = Vec::new();
    let mut last = None;
    for name in names {
        match tokio::net::lookup_host(name.as_str()).await {
            Ok(addrs) => {
                for a in addrs {
                    if !out.iter().any(|(_, b)| *b == a) {
                        out.push((name.clone(), a));
                    }
                }
            }
            Err(e) => last = Some((name.clone(), e.to_string())),
        }
    }
    if out.is_empty() {
        let (host, message) = last.unwrap_or_else(|| (names.join(","), "no addresses".into()));
        return Err(ConnectError::Dns { host, message });
    }
    Ok(out)
}

/// RFC 8305 for one relay: runs `first`; starts `second` (if any) after
/// `delay`, or at once if `first` fails; the first success wins and the
/// other attempt is dropped. When both fail, `first`'s error is returned
/// (the preferred family's reason is the more telling one).
pub(crate) async fn race<T>(
    first: impl Future<Output = Result<T, ConnectError>>,
    second: Option<impl Future<Output = Result<T, ConnectError>>>,
    delay: Duration,
) -> Result<T, ConnectError> {
    let Some(second) = second else {
        return first.await;
    };
    tokio::pin!(first);
    tokio::pin!(second);
    let timer = tokio::time::sleep(delay);
    tokio::pin!(timer);
    let mut started = false;
    let mut first_err: Option<ConnectError> = None;
    loop {
        tokio::select! {
            r = &mut first, if first_err.is_none() => match r {
                Ok(v) => return Ok(v),
                Err(e) => {
                    debug!(error = %e, "first address family failed; trying the other");
                    first_err = Some(e);
                    started = true;
                }
            },
            () = &mut timer, if !started => started = true,
            r = &mut second, if started => match r {
                Ok(v) => return Ok(v),
                Err(e) => match first_err {
                    Some(f) => return Err(f),
                    None => {
                        debug!(error = %e, "second address family failed");
                        return first.await;
                    }
                },
            },
        }
    }
}

/// One established connection, over QUIC or TLS on TCP.
pub(crate) struct Link {
    io: Io,
    out: Bytes,
    /// What the relay's GoAway said, if it sent one.
    pub(crate) go_away: Option<(GoAwayReason, Duration, String)>,
    pub(crate) info: ConnectionInfo,
    /// The relay's probe service port (0 = none).
    pub(crate) probe_port: u16,
}

/// A link's transport.
enum Io {
    Quic {
        conn: quinn::Connection,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    },
    Tcp {
        read: tokio::io::ReadHalf<TcpTls>,
        write: tokio::io::WriteHalf<TcpTls>,
        buf: Box<[u8]>,
    },
}

/// Read size on TCP (frames are at most 16 KiB).
const TCP_READ: usize = 16 * 1024;

/// The session settings of a new connection.
fn session_config(config: &Config, keepalive_interval: Duration) -> DeviceSessionConfig {
    DeviceSessionConfig {
        credential: config.token.lock().map(|t| t.clone()).unwrap_or_default(),
        sdk: concat!("wakewire-sdk-rust/", env!("CARGO_PKG_VERSION")).into(),
        keepalive_interval,
        keepalive_timeout: config.keepalive_timeout,
        welcome_timeout: config.connect_timeout,
        // Canaries make binding loss visible whatever port the NAT gives
        // back (docs/keepalive.md); relays that do not offer them are
        // simply not asked.
        canary: true,
    }
}

impl Link {
    /// Connects with `transport` to `target`, starts a session in `core`
    /// and waits for Welcome. `Auto`: QUIC first, TLS over TCP after
    /// `config.tcp_fallback_delay` unless QUIC connected first; `prefer_tcp`
    /// (TCP won on this network before) starts with TCP.
    pub(crate) async fn establish(
        config: &Config,
        endpoints: &mut Endpoints,
        core: &mut DeviceConnection,
        keepalive_interval: Duration,
        target: &(String, SocketAddr),
        alt: Option<SocketAddr>,
        transport: Transport,
    ) -> Result<Link, ConnectError> {
        match transport {
            Transport::Quic => {
                Self::establish_quic(config, endpoints, core, keepalive_interval, target, alt).await
            }
            Transport::Tcp => {
                Self::establish_tcp(config, core, keepalive_interval, target, alt).await
            }
            Transport::Auto => {
                let tcp_start = config.tcp_fallback_delay;
                let tcp = async {
                    tokio::time::sleep(tcp_start).await;
                    Self::tcp_stream(config, target, alt).await
                };
                tokio::pin!(tcp);
                // QUIC runs the session (0-RTT Hello) on `core`; TCP only
                // connects until it wins.
                let won_tcp = {
                    let quic = Self::establish_quic(
                        config,
                        endpoints,
                        core,
                        keepalive_interval,
                        target,
                        alt,
                    );
                    tokio::pin!(quic);
                    let mut quic_failed = None;
                    loop {
                        tokio::select! {
                            r = &mut quic, if quic_failed.is_none() => match r {
                                Ok(link) => return Ok(link),
                                Err(e) if !e.is_retryable() => return Err(e),
                                Err(e) => quic_failed = Some(e),
                            },
                            t = &mut tcp => match t {
                                Ok(stream) => break stream,
                                Err(e) => match quic_failed {
                                    // Both failed: say why QUIC did, or
                                    // TCP's if it is the more telling.
                                    Some(q) => return Err(if e.is_retryable() { q } else { e }),
                                    None => {
                                        debug!(error = %e, "TCP fallback failed; waiting for QUIC");
                                        return quic.await;
                                    }
                                },
                            },
                        }
                    }
                };
                // TCP connected first: QUIC's half-started session ends.
                core.disconnected();
                let (stream, suite, addr) = won_tcp;
                let target = (target.0.clone(), addr);
                Self::session_over_tcp(config, core, keepalive_interval, &target, stream, suite)
                    .await
            }
        }
    }

    /// TCP and TLS to `target` (racing `alt`, the other address family,
    /// RFC 8305); returns the stream and the address that won.
    async fn tcp_stream(
        config: &Config,
        target: &(String, SocketAddr),
        alt: Option<SocketAddr>,
    ) -> Result<(TcpTls, CipherSuite, SocketAddr), ConnectError> {
        let server_name = config
            .server_name
            .clone()
            .unwrap_or_else(|| crate::client::host_of(&target.0));
        let attempt = |ip: SocketAddr| {
            let server_name = server_name.clone();
            async move {
                let addr = SocketAddr::new(ip.ip(), config.tcp_port.unwrap_or(ip.port()));
                let (stream, suite) = crate::transport::connect(
                    config.tcp_tls.clone(),
                    &target.0,
                    addr,
                    &server_name,
                    config.proxy.as_ref(),
                    config.min_protection,
                    config.connect_timeout,
                )
                .await?;
                Ok((stream, suite, ip))
            }
        };
        // Through a proxy the proxy resolves and connects: no race.
        let alt = alt.filter(|_| config.proxy.is_none());
        race(attempt(target.1), alt.map(attempt), FAMILY_DELAY).await
    }

    async fn establish_tcp(
        config: &Config,
        core: &mut DeviceConnection,
        keepalive_interval: Duration,
        target: &(String, SocketAddr),
        alt: Option<SocketAddr>,
    ) -> Result<Link, ConnectError> {
        let (stream, suite, addr) = Self::tcp_stream(config, target, alt).await?;
        let target = (target.0.clone(), addr);
        Self::session_over_tcp(config, core, keepalive_interval, &target, stream, suite).await
    }

    async fn session_over_tcp(
        config: &Config,
        core: &mut DeviceConnection,
        keepalive_interval: Duration,
        target: &(String, SocketAddr),
        stream: TcpTls,
        suite: CipherSuite,
    ) -> Result<Link, ConnectError> {
        let deadline = tokio::time::Instant::from_std(clock::now() + config.connect_timeout);
        let local_addr = stream.get_ref().0.local_addr().ok();
        let (read, write) = tokio::io::split(stream);
        core.connect(clock::now(), session_config(config, keepalive_interval));
        let link = Link {
            info: ConnectionInfo {
                transport: "TLS 1.3 over TCP",
                tls_version: "TLSv1.3",
                cipher_suite: suite,
                alpn: String::from_utf8_lossy(wakewire_proto::ALPN).into_owned(),
                relay_addr: target.1,
                local_addr,
                session_id: String::new(),
                device_id: String::new(),
                keepalive_interval,
                zero_rtt: false,
            },
            io: Io::Tcp {
                read,
                write,
                buf: vec![0u8; TCP_READ].into_boxed_slice(),
            },
            out: Bytes::new(),
            go_away: None,
            probe_port: 0,
        };
        link.await_welcome(core, deadline).await
    }

    /// Connects over QUIC, starts a session in `core` and waits for Welcome.
    async fn establish_quic(
        config: &Config,
        endpoints: &mut Endpoints,
        core: &mut DeviceConnection,
        keepalive_interval: Duration,
        target: &(String, SocketAddr),
        alt: Option<SocketAddr>,
    ) -> Result<Link, ConnectError> {
        let server_name = config
            .server_name
            .clone()
            .unwrap_or_else(|| crate::client::host_of(&target.0));
        let probe = &config.suite_probe;
        probe.reset();
        let deadline = tokio::time::Instant::from_std(clock::now() + config.connect_timeout);
        let timed_out = |addr: SocketAddr| {
            ConnectError::TimedOut(format!(
                "no QUIC handshake with {addr} within {:?}",
                config.connect_timeout
            ))
        };
        let connect = |endpoint: &quinn::Endpoint, addr: SocketAddr| {
            endpoint
                .connect_with(config.tls.clone(), addr, &server_name)
                .map_err(|e| match e {
                    quinn::ConnectError::InvalidServerName(n) => {
                        ConnectError::Config(format!("invalid server name {n:?}"))
                    }
                    other => ConnectError::Unreachable(other.to_string()),
                })
        };
        let session_config = session_config(config, keepalive_interval);
        if let Some(alt) = alt {
            // Two address families race (RFC 8305): full handshakes, the
            // first to complete carries the session (no 0-RTT Hello).
            let first_ep = endpoints.for_addr(target.1)?.clone();
            let second_ep = endpoints.for_addr(alt)?.clone();
            let attempt = |endpoint: quinn::Endpoint, addr: SocketAddr| {
                let connecting = connect(&endpoint, addr);
                async move {
                    let conn = tokio::time::timeout_at(deadline, connecting?)
                        .await
                        .map_err(|_| timed_out(addr))?
                        .map_err(ConnectError::from_connection)?;
                    Ok((conn, endpoint, addr))
                }
            };
            let (conn, endpoint, addr) = race(
                attempt(first_ep, target.1),
                Some(attempt(second_ep, alt)),
                FAMILY_DELAY,
            )
            .await?;
            return Self::quic_session(
                config,
                core,
                keepalive_interval,
                (conn, None),
                &endpoint,
                addr,
                deadline,
                session_config,
            )
            .await;
        }
        let addr = target.1;
        let endpoint = endpoints.for_addr(addr)?.clone();
        let connecting = connect(&endpoint, addr)?;
        let timed_out = || timed_out(addr);
        // Reconnecting with a resumable TLS session, the Hello travels in
        // 0-RTT, in the first flight: one round trip less of radio-on time.
        // That is replay-safe: Hello and Register are idempotent, and the
        // relay reads nothing before the handshake is complete. Nothing is
        // trusted here before it is complete either.
        let (conn, early) = match connecting.into_0rtt() {
            Ok((conn, accepted)) => {
                let mut early = None;
                if let Ok((mut send, recv)) = conn.open_bi().await {
                    core.connect(clock::now(), session_config.clone());
                    let mut sent = true;
                    while let Some(b) = core.poll_transmit() {
                        sent &= send.write_all(&b).await.is_ok();
                    }
                    if sent {
                        early = Some((send, recv));
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
        Self::quic_session(
            config,
            core,
            keepalive_interval,
            (conn, early),
            &endpoint,
            addr,
            deadline,
            session_config,
        )
        .await
    }

    /// The session on a QUIC connection whose handshake is complete
    /// (`early`: the streams the Hello went on in 0-RTT, if accepted).
    #[allow(clippy::too_many_arguments)]
    async fn quic_session(
        config: &Config,
        core: &mut DeviceConnection,
        keepalive_interval: Duration,
        (conn, early): (
            quinn::Connection,
            Option<(quinn::SendStream, quinn::RecvStream)>,
        ),
        endpoint: &quinn::Endpoint,
        addr: SocketAddr,
        deadline: tokio::time::Instant,
        session_config: DeviceSessionConfig,
    ) -> Result<Link, ConnectError> {
        let probe = &config.suite_probe;
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
        let (send, recv) = match early {
            Some(streams) => streams,
            None => {
                let streams = conn
                    .open_bi()
                    .await
                    .map_err(ConnectError::from_connection)?;
                core.connect(clock::now(), session_config);
                streams
            }
        };
        let link = Link {
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
            io: Io::Quic { conn, send, recv },
            out: Bytes::new(),
            go_away: None,
            probe_port: 0,
        };
        link.await_welcome(core, deadline).await
    }

    /// Whether this link runs over TCP.
    pub(crate) fn is_tcp(&self) -> bool {
        matches!(self.io, Io::Tcp { .. })
    }

    /// Runs the session until Welcome (or an error, or `deadline`).
    async fn await_welcome(
        mut self,
        core: &mut DeviceConnection,
        deadline: tokio::time::Instant,
    ) -> Result<Link, ConnectError> {
        let welcome = tokio::time::timeout_at(deadline, async {
            loop {
                if let Some(ev) = core.poll_event() {
                    return Ok(ev);
                }
                self.step(core).await?;
            }
        })
        .await;
        match welcome {
            Err(_) => {
                self.close(ErrorCode::HelloTimeout, "no Welcome in time")
                    .await;
                core.disconnected();
                Err(ConnectError::TimedOut(
                    "the relay did not answer Hello in time".into(),
                ))
            }
            Ok(Err(e)) => {
                core.disconnected();
                Err(e)
            }
            Ok(Ok(DeviceConnectionEvent::Welcome {
                session_id,
                device_id,
                limits,
                ..
            })) => {
                self.info.session_id = session_id;
                self.info.device_id = device_id;
                self.probe_port = u16::try_from(limits.probe_port).unwrap_or(0);
                Ok(self)
            }
            Ok(Ok(other)) => {
                core.disconnected();
                Err(ConnectError::ProtocolViolation(format!(
                    "expected Welcome, got {other:?}"
                )))
            }
        }
    }

    /// One I/O step for `core`: write what it has, read what arrives, or
    /// fire its timer; an error once the connection is over. Cancel-safe:
    /// every await is cancel-safe and all state lives in `self` and `core`.
    pub(crate) async fn step(&mut self, core: &mut DeviceConnection) -> Result<(), ConnectError> {
        if let Some(close) = core.poll_close() {
            self.close(close.code, &close.reason).await;
            return Err(self.explain(ConnectError::from_close_code(
                Some(close.code),
                close.reason,
            )));
        }
        if self.out.is_empty() {
            self.out = core.poll_transmit().unwrap_or_default();
        }
        let deadline = core.poll_timeout();
        let out = &mut self.out;
        match &mut self.io {
            Io::Quic { send, recv, .. } => tokio::select! {
                r = send.write(out), if !out.is_empty() => match r {
                    Ok(n) => out.advance(n),
                    Err(e) => return Err(self.explain(write_error(e))),
                },
                r = recv.read_chunk(usize::MAX, true) => match r {
                    Ok(Some(chunk)) => core.handle_data(clock::now(), &chunk.bytes),
                    Ok(None) => core.handle_stream_finished(clock::now()),
                    Err(e) => return Err(self.explain(read_error(e))),
                },
                _ = clock::sleep_until(deadline), if deadline.is_some() => core.handle_timeout(clock::now()),
            },
            Io::Tcp { read, write, buf } => tokio::select! {
                r = write.write(out), if !out.is_empty() => match r {
                    Ok(n) => out.advance(n),
                    Err(e) => return Err(self.explain(ConnectError::ConnectionLost(format!("TCP: {e}")))),
                },
                r = read.read(buf) => match r {
                    Ok(0) => core.handle_stream_finished(clock::now()),
                    Ok(n) => core.handle_data(clock::now(), &buf[..n]),
                    Err(e) => return Err(self.explain(ConnectError::ConnectionLost(format!("TCP: {e}")))),
                },
                _ = clock::sleep_until(deadline), if deadline.is_some() => core.handle_timeout(clock::now()),
            },
        }
        Ok(())
    }

    /// Ends the connection with `code` (QUIC's CONNECTION_CLOSE, or a Close
    /// frame and the end of the TCP stream).
    pub(crate) async fn close(&mut self, code: ErrorCode, reason: &str) {
        match &mut self.io {
            Io::Quic { conn, .. } => conn.close(code.as_u32().into(), reason.as_bytes()),
            Io::Tcp { write, .. } => {
                let frame = wakewire_proto::relay_session::Close {
                    code,
                    reason: reason.to_owned(),
                }
                .to_frame();
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    let _ = write.write_all(&frame).await;
                    let _ = write.shutdown().await;
                })
                .await;
            }
        }
    }

    /// Orderly close: flushes what `core` still has to send (acks above
    /// all), waits (bounded) for the relay to receive it, then closes.
    pub(crate) async fn close_gracefully(&mut self, core: &mut DeviceConnection, reason: &str) {
        let mut rest = std::mem::take(&mut self.out).to_vec();
        while let Some(b) = core.poll_transmit() {
            rest.extend_from_slice(&b);
        }
        match &mut self.io {
            Io::Quic { send, .. } => {
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    send.write_all(&rest).await.ok()?;
                    send.finish().ok()?;
                    send.stopped().await.ok()
                })
                .await;
            }
            Io::Tcp { write, .. } => {
                let _ = tokio::time::timeout(Duration::from_secs(2), write.write_all(&rest)).await;
            }
        }
        self.close(ErrorCode::NoError, reason).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// An attempt that ends after `after` with `ok` (its label) or an error.
    async fn attempt(
        after: Duration,
        label: &'static str,
        ok: bool,
        started: std::sync::Arc<std::sync::Mutex<Vec<&'static str>>>,
    ) -> Result<&'static str, ConnectError> {
        started.lock().unwrap().push(label);
        tokio::time::sleep(after).await;
        if ok {
            Ok(label)
        } else {
            Err(ConnectError::Unreachable(label.into()))
        }
    }

    fn log() -> std::sync::Arc<std::sync::Mutex<Vec<&'static str>>> {
        std::sync::Arc::default()
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_ipv6_path_loses_to_ipv4_started_after_the_delay() {
        let l = log();
        let t0 = crate::clock::now();
        let won = race(
            attempt(Duration::from_secs(10), "v6", true, l.clone()),
            Some(attempt(Duration::from_millis(30), "v4", true, l.clone())),
            FAMILY_DELAY,
        )
        .await;
        assert_eq!(won.unwrap(), "v4");
        assert_eq!(
            crate::clock::now() - t0,
            FAMILY_DELAY + Duration::from_millis(30)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_quick_ipv6_success_never_starts_ipv4() {
        let l = log();
        let won = race(
            attempt(Duration::from_millis(100), "v6", true, l.clone()),
            Some(attempt(Duration::from_millis(1), "v4", true, l.clone())),
            FAMILY_DELAY,
        )
        .await;
        assert_eq!(won.unwrap(), "v6");
        assert_eq!(*l.lock().unwrap(), ["v6"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_ipv6_attempt_starts_ipv4_at_once_and_both_failing_reports_ipv6() {
        let l = log();
        let t0 = crate::clock::now();
        let won = race(
            attempt(Duration::from_millis(10), "v6", false, l.clone()),
            Some(attempt(Duration::from_millis(20), "v4", true, l.clone())),
            FAMILY_DELAY,
        )
        .await;
        assert_eq!(won.unwrap(), "v4");
        assert_eq!(crate::clock::now() - t0, Duration::from_millis(30));

        let both = race(
            attempt(Duration::from_millis(10), "v6", false, l.clone()),
            Some(attempt(Duration::from_millis(20), "v4", false, l.clone())),
            FAMILY_DELAY,
        )
        .await;
        assert!(matches!(both, Err(ConnectError::Unreachable(m)) if m == "v6"));
        // IPv4 fails first while IPv6 still runs: IPv6 is awaited.
        let late = race(
            attempt(Duration::from_secs(1), "v6", true, l.clone()),
            Some(attempt(Duration::from_millis(1), "v4", false, l)),
            FAMILY_DELAY,
        )
        .await;
        assert_eq!(late.unwrap(), "v6");
    }
}
