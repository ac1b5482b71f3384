//! One QUIC connection to the relay and its control stream: the I/O half
//! of the SDK's driver. What is sent and what arrivals mean is decided by
//! the sans-IO [`DeviceConnection`]; a link only moves its bytes.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, Bytes};
use wakewire_proto::device_connection::{DeviceConnection, DeviceConnectionEvent};
use wakewire_proto::device_session::DeviceSessionConfig;
use wakewire_proto::pb::device::GoAwayReason;
use wakewire_proto::ErrorCode;

use crate::clock;
use crate::config::Config;
use crate::error::ConnectError;
use crate::tls;
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

/// One established connection.
pub(crate) struct Link {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    out: Bytes,
    /// What the relay's GoAway said, if it sent one.
    pub(crate) go_away: Option<(GoAwayReason, Duration, String)>,
    pub(crate) info: ConnectionInfo,
    /// The relay's probe service port (0 = none).
    pub(crate) probe_port: u16,
}

impl Link {
    /// Connects, starts a session in `core` and waits for Welcome.
    pub(crate) async fn establish(
        config: &Config,
        endpoints: &mut Endpoints,
        core: &mut DeviceConnection,
        keepalive_interval: Duration,
        target: &(String, SocketAddr),
    ) -> Result<Link, ConnectError> {
        let addr = target.1;
        let server_name = config
            .server_name
            .clone()
            .unwrap_or_else(|| crate::client::host_of(&target.0));
        let endpoint = endpoints.for_addr(addr)?;
        let probe = &config.suite_probe;
        probe.reset();
        let connecting = endpoint
            .connect_with(config.tls.clone(), addr, &server_name)
            .map_err(|e| match e {
                quinn::ConnectError::InvalidServerName(n) => {
                    ConnectError::Config(format!("invalid server name {n:?}"))
                }
                other => ConnectError::Unreachable(other.to_string()),
            })?;
        let deadline = tokio::time::Instant::from_std(clock::now() + config.connect_timeout);
        let timed_out = || {
            ConnectError::TimedOut(format!(
                "no QUIC handshake with {addr} within {:?}",
                config.connect_timeout
            ))
        };
        let session_config = DeviceSessionConfig {
            credential: config.token.lock().map(|t| t.clone()).unwrap_or_default(),
            sdk: concat!("wakewire-sdk-rust/", env!("CARGO_PKG_VERSION")).into(),
            keepalive_interval,
            keepalive_timeout: config.keepalive_timeout,
            welcome_timeout: config.connect_timeout,
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
            out: Bytes::new(),
            go_away: None,
            probe_port: 0,
        };
        let welcome = tokio::time::timeout_at(deadline, async {
            loop {
                if let Some(ev) = core.poll_event() {
                    return Ok(ev);
                }
                link.step(core).await?;
            }
        })
        .await;
        match welcome {
            Err(_) => {
                link.close(ErrorCode::HelloTimeout, "no Welcome in time");
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
                link.info.session_id = session_id;
                link.info.device_id = device_id;
                link.probe_port = u16::try_from(limits.probe_port).unwrap_or(0);
                Ok(link)
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
            self.close(close.code, &close.reason);
            return Err(self.explain(ConnectError::from_close_code(
                Some(close.code),
                close.reason,
            )));
        }
        if self.out.is_empty() {
            self.out = core.poll_transmit().unwrap_or_default();
        }
        let deadline = core.poll_timeout();
        tokio::select! {
            r = self.send.write(&self.out), if !self.out.is_empty() => match r {
                Ok(n) => self.out.advance(n),
                Err(e) => return Err(self.explain(write_error(e))),
            },
            r = self.recv.read_chunk(usize::MAX, true) => match r {
                Ok(Some(chunk)) => core.handle_data(clock::now(), &chunk.bytes),
                Ok(None) => core.handle_stream_finished(clock::now()),
                Err(e) => return Err(self.explain(read_error(e))),
            },
            _ = clock::sleep_until(deadline), if deadline.is_some() => core.handle_timeout(clock::now()),
        }
        Ok(())
    }

    pub(crate) fn close(&self, code: ErrorCode, reason: &str) {
        self.conn.close(code.as_u32().into(), reason.as_bytes());
    }

    /// Orderly close: flushes what `core` still has to send (acks above
    /// all), waits (bounded) for the relay to receive it, then closes.
    pub(crate) async fn close_gracefully(&mut self, core: &mut DeviceConnection, reason: &str) {
        let mut rest = std::mem::take(&mut self.out).to_vec();
        while let Some(b) = core.poll_transmit() {
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
