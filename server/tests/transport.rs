//! The fallback transport (TLS 1.3 over TCP) end to end with the real relay
//! and SDK: everything QUIC gives works over TCP; with UDP blocked a device
//! in `Auto` connects over TCP after the head start and moves back to QUIC
//! when UDP returns, without losing or repeating a wake; IPv6 loopback;
//! clients sharing a handshake limit take turns.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wakewire_api::pb::DeliveryStatus;
use wakewire_sdk::{ConnectError, HandshakeLimit, Status, Transport};
use wakewire_test_support::proxy::UdpProxy;
use wakewire_test_support::{recv, status_sink, wait_status, wake_sink, TestRelay};

const TCP: &str = "TLS 1.3 over TCP";
const QUIC: &str = "QUIC v1";

fn tcp_port(relay: &TestRelay) -> u16 {
    relay.relay().tcp_addr().expect("TCP endpoint on").port()
}

#[tokio::test]
async fn over_tcp_a_device_gets_what_quic_gives() -> anyhow::Result<()> {
    let mut relay = TestRelay::start().await?;
    let (on_status, mut statuses) = status_sink();
    let client = relay
        .client("laptop")
        .transport(Transport::Tcp)
        .tcp_port(tcp_port(&relay))
        .on_status(on_status)
        .connect()
        .await?;
    let info = client.info().expect("connected");
    assert_eq!(info.transport, TCP);
    let (cb, mut wakes) = wake_sink();
    let ch = client
        .channel("mail")
        .on_wake(cb)
        .register()
        .await?
        .into_string();
    let r = relay.publish_to(&ch, b"over tcp").await?;
    assert_eq!(r.status(), DeliveryStatus::Delivered);
    let w = recv(&mut wakes).await?;
    assert_eq!(
        (w.event_id.as_str(), w.payload.as_slice()),
        (r.event_id.as_str(), &b"over tcp"[..])
    );

    // A relay going away says so over TCP too (GoAway, then a Close frame).
    relay.shutdown(Duration::from_secs(30)).await;
    let gone = wait_status(&mut statuses, |s| matches!(s, Status::Disconnected { .. })).await?;
    assert!(
        matches!(
            &gone,
            Status::Disconnected {
                error: ConnectError::RelayGoingAway { .. },
                ..
            }
        ),
        "{gone:?}"
    );
    client.close().await;
    Ok(())
}

#[tokio::test]
async fn over_tcp_a_refused_credential_is_the_same_error_as_over_quic() -> anyhow::Result<()> {
    let relay = TestRelay::start().await?;
    let err = relay
        .client("mallory")
        .transport(Transport::Tcp)
        .tcp_port(tcp_port(&relay))
        .device_token("not a token")
        .connect()
        .await
        .expect_err("refused");
    assert!(matches!(err, ConnectError::Unauthorized(_)), "{err:?}");
    assert!(!err.is_retryable());
    Ok(())
}

#[tokio::test]
async fn with_udp_blocked_auto_uses_tcp_then_moves_back_to_quic() -> anyhow::Result<()> {
    let relay = TestRelay::start().await?;
    // UDP to the relay goes through a proxy that drops everything for now.
    let udp = UdpProxy::start(relay.quic_addr(), 3).await?;
    udp.up.set_loss(1.0);
    let (on_status, mut statuses) = status_sink();
    let seen: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let started = wakewire_test_support::cluster::now();
    let client = relay
        .client_at("hotel-guest", udp.addr)
        .transport(Transport::Auto)
        .tcp_port(tcp_port(&relay))
        .tcp_fallback_delay(Duration::from_millis(300))
        .quic_retry_interval(Duration::from_millis(500))
        .on_status(on_status)
        .connect()
        .await?;
    let took = started.elapsed();
    assert_eq!(client.info().expect("connected").transport, TCP);
    // The head start plus one TCP and TLS handshake on loopback.
    assert!(
        took < Duration::from_secs(3),
        "connected over TCP after {took:?}"
    );
    let s = seen.clone();
    let ch = client
        .channel("news")
        .on_wake(move |w| {
            *s.lock()
                .expect("lock")
                .entry(w.event_id.clone())
                .or_default() += 1
        })
        .register()
        .await?
        .into_string();
    let mut published = Vec::new();
    for i in 0..5 {
        published.push(
            relay
                .publish_to(&ch, format!("tcp {i}").as_bytes())
                .await?
                .event_id,
        );
    }
    // UDP comes back: the client notices at its next QUIC retry and moves.
    udp.up.set_loss(0.0);
    let moved = wait_status(
        &mut statuses,
        |s| matches!(s, Status::Connected(i) if i.transport == QUIC),
    )
    .await;
    assert!(moved.is_ok(), "never moved back to QUIC: {moved:?}");
    for i in 0..5 {
        published.push(
            relay
                .publish_to(&ch, format!("quic {i}").as_bytes())
                .await?
                .event_id,
        );
    }
    // Every wake once, none lost across the move.
    let all = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if published
                .iter()
                .all(|id| seen.lock().expect("lock").contains_key(id))
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(all.is_ok(), "lost wakes: {:?}", seen.lock().expect("lock"));
    let twice: Vec<_> = seen
        .lock()
        .expect("lock")
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| id.clone())
        .collect();
    assert!(twice.is_empty(), "callbacks twice: {twice:?}");
    assert_eq!(client.info().expect("connected").transport, QUIC);
    client.close().await;
    Ok(())
}

#[tokio::test]
async fn a_device_connects_over_ipv6_loopback_with_quic_and_tcp() -> anyhow::Result<()> {
    let v6 = std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0));
    if std::net::UdpSocket::bind(v6).is_err() {
        eprintln!("SKIPPED: no IPv6 loopback on this machine");
        return Ok(());
    }
    let relay = TestRelay::start_with(|c| {
        c.quic_listen = v6;
        c.tcp_listen = Some(v6);
    })
    .await?;
    assert!(relay.quic_addr().is_ipv6());
    for transport in [Transport::Quic, Transport::Tcp] {
        let client = relay
            .client(&format!("v6-{transport:?}"))
            .transport(transport)
            .tcp_port(tcp_port(&relay))
            .connect()
            .await?;
        let info = client.info().expect("connected");
        assert!(info.relay_addr.is_ipv6(), "{info:?}");
        let (cb, mut wakes) = wake_sink();
        let ch = client
            .channel("c")
            .on_wake(cb)
            .register()
            .await?
            .into_string();
        let r = relay.publish_to(&ch, b"v6").await?;
        assert_eq!(r.status(), DeliveryStatus::Delivered, "{transport:?}");
        recv(&mut wakes).await?;
        client.close().await;
    }
    Ok(())
}

/// Clients sharing a `HandshakeLimit` take turns. With a limit of one, a
/// handshake that hangs (an address that never answers) holds the turn, and
/// a second client starts only once the first gives up. After a relay
/// restart, clients sharing a limit all come back through it.
#[tokio::test]
async fn clients_sharing_a_handshake_limit_take_turns() -> anyhow::Result<()> {
    let mut relay = TestRelay::start().await?;
    relay.pin_ports();
    let limit = HandshakeLimit::new(1);
    // A UDP socket that never answers: a handshake with it hangs until the
    // connect timeout.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let stuck = tokio::spawn(
        relay
            .client_at("stuck", silent.local_addr()?)
            .transport(Transport::Quic)
            .connect_timeout(Duration::from_secs(2))
            .handshake_limit(limit.clone())
            .connect(),
    );
    tokio::time::timeout(Duration::from_secs(10), async {
        while limit.available() > 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("the stuck client never took the turn"))?;
    let waiting = relay
        .client("waiting")
        .transport(Transport::Quic)
        .handshake_limit(limit.clone())
        .connect();
    tokio::pin!(waiting);
    let stuck = tokio::select! {
        r = stuck => r?,
        c = &mut waiting => panic!("connected while the only turn was held: {:?}", c.map(|_| ())),
    };
    assert!(
        matches!(stuck, Err(ConnectError::TimedOut(_))),
        "{:?}",
        stuck.map(|_| ())
    );
    let first = waiting.await?;
    assert_eq!(
        limit.available(),
        1,
        "the turn is given back once connected"
    );

    // Five more clients on a limit of two, then a restart: every one of
    // them reconnects, a turn at a time.
    let limit = HandshakeLimit::new(2);
    let mut fleet = Vec::new();
    for i in 0..5 {
        let (on_status, mut statuses) = status_sink();
        let client = relay
            .client(&format!("fleet-{i}"))
            .transport(Transport::Quic)
            .handshake_limit(limit.clone())
            .on_status(on_status)
            .connect()
            .await?;
        wait_status(&mut statuses, |s| matches!(s, Status::Connected(_))).await?;
        fleet.push((client, statuses));
    }
    relay.restart().await?;
    for (_, statuses) in &mut fleet {
        wait_status(statuses, |s| matches!(s, Status::Disconnected { .. })).await?;
        wait_status(statuses, |s| matches!(s, Status::Connected(_))).await?;
    }
    assert_eq!(limit.available(), 2);
    for (client, _) in fleet {
        client.close().await;
    }
    first.close().await;
    Ok(())
}
