//! Adaptive keepalive end to end: the real relay (with its probe service),
//! the real SDK, and the NAT emulator at a compressed time scale (T = 2 s).

use std::sync::atomic::Ordering;
use std::time::Duration;

use wakewire_api::pb::DeliveryStatus;
use wakewire_sdk::{KeepalivePolicy, Status, TunerConfig};
use wakewire_server::config::Resumption;
use wakewire_test_support::proxy::UdpProxy;
use wakewire_test_support::{recv, status_sink, wait_status, wake_sink, TestRelay};

/// The default tuner, scaled down ~15x so a 2 s NAT is learned in seconds.
fn fast_tuner() -> TunerConfig {
    TunerConfig {
        min_interval: Duration::from_millis(200),
        max_interval: Duration::from_secs(20),
        start_interval: Duration::from_millis(500),
        grace: Duration::from_millis(500),
        fine_ratio: 1.05,
        ..TunerConfig::default()
    }
}

#[tokio::test]
async fn the_tuner_learns_a_2s_nat_and_a_wake_survives_an_expired_binding() -> anyhow::Result<()> {
    let relay = TestRelay::start().await?;
    let t = Duration::from_secs(2);
    let nat = UdpProxy::nat(relay.quic_addr(), Some(t), 11).await?;
    let probe_nat = UdpProxy::nat(
        relay.relay().probe_addr().expect("probe service on"),
        Some(t),
        12,
    )
    .await?;
    let dir = tempfile::tempdir()?;
    let memory = dir.path().join("networks");

    let (status_cb, mut statuses) = status_sink();
    let client = relay
        .client_at("commuter", nat.addr)
        .keepalive(KeepalivePolicy::Adaptive(fast_tuner()))
        .keepalive_timeout(Duration::from_secs(1))
        .probe_address(probe_nat.addr)
        .network_id("home-wifi")
        .network_memory(&memory)
        .on_status(status_cb)
        .connect()
        .await?;
    let (cb, mut wakes) = wake_sink();
    let ch = client
        .channel("news")
        .on_wake(cb)
        .register()
        .await?
        .into_string();

    // Converges below T, close to it, without losing the main binding.
    let Status::KeepaliveConverged {
        interval,
        learned,
        network,
    } = wait_status(&mut statuses, |s| {
        matches!(s, Status::KeepaliveConverged { .. })
    })
    .await?
    else {
        unreachable!()
    };
    assert_eq!(network, "home-wifi");
    assert!(
        interval < t && interval >= t.mul_f64(0.7),
        "interval {interval:?} for T = {t:?}"
    );
    assert!(learned.lower < t && learned.upper.is_some(), "{learned:?}");
    assert_eq!(
        nat.nat.expired.load(Ordering::Relaxed),
        0,
        "probing cost the main binding"
    );
    assert_eq!(
        client.info().expect("connected").keepalive_interval,
        interval
    );
    assert!(std::fs::read_to_string(&memory)?.starts_with("home-wifi "));

    // The NAT forgets the binding (timeout, reboot): a wake published now
    // cannot reach the device until its next keepalive opens a new binding,
    // and QUIC moves the connection there. Nothing is lost.
    nat.nat.expire_now();
    let r = relay.publish_to(&ch, b"while unreachable").await?;
    assert_eq!(
        r.status(),
        DeliveryStatus::Delivered,
        "delivered after the next keepalive"
    );
    let w = recv(&mut wakes).await?;
    assert_eq!(w.event_id, r.event_id);
    assert!(
        nat.nat.dropped_expired.load(Ordering::Relaxed) > 0,
        "the first attempt should have hit the dead binding"
    );
    let lost = wait_status(&mut statuses, |s| matches!(s, Status::BindingLost { .. })).await?;
    assert!(
        matches!(lost, Status::BindingLost { after_idle } if after_idle <= interval + Duration::from_secs(1))
    );
    assert!(wakes.try_recv().is_err(), "delivered twice");

    // The app says its own server timed out: the interval goes down.
    let before = client.info().expect("connected").keepalive_interval;
    client.decrease_keepalive()?;
    let s = wait_status(&mut statuses, |s| {
        matches!(
            s,
            Status::KeepaliveInterval {
                reason: wakewire_sdk::IntervalReason::DecreasedByApp,
                ..
            }
        )
    })
    .await?;
    assert!(matches!(s, Status::KeepaliveInterval { interval, .. } if interval < before));
    client.close().await;

    // Back on the same network later: the learned interval applies at once.
    let again = relay
        .client_at("commuter", nat.addr)
        .keepalive(KeepalivePolicy::Adaptive(fast_tuner()))
        .probe_address(probe_nat.addr)
        .network_id("home-wifi")
        .network_memory(&memory)
        .connect()
        .await?;
    let resumed = again.info().expect("connected").keepalive_interval;
    // (The memory file keeps milliseconds.)
    assert!(
        resumed.abs_diff(interval) < Duration::from_millis(2),
        "{resumed:?} vs {interval:?}"
    );
    again.close().await;
    Ok(())
}

/// The case: a NAT that gives a re-created binding its old port.
/// No address changes, so only the relay's missing canary tells the device
/// its binding died; it must say so at its next keepalive, and a wake
/// published meanwhile still arrives, once.
#[tokio::test]
async fn a_binding_lost_on_a_port_preserving_nat_is_seen_by_the_missing_canary(
) -> anyhow::Result<()> {
    let relay = TestRelay::start().await?;
    let nat = UdpProxy::nat(relay.quic_addr(), None, 21).await?;
    nat.nat.set_port_preserving(true);
    let (status_cb, mut statuses) = status_sink();
    let interval = Duration::from_secs(3);
    let client = relay
        .client_at("quiet", nat.addr)
        .keepalive(KeepalivePolicy::Fixed(interval))
        .on_status(status_cb)
        .connect()
        .await?;
    let (cb, mut wakes) = wake_sink();
    let ch = client
        .channel("news")
        .on_wake(cb)
        .register()
        .await?
        .into_string();
    // A few canary cycles on a live binding: no loss reported.
    for _ in 0..3 {
        wait_status(&mut statuses, |s| {
            matches!(s, Status::KeepaliveCompleted { .. })
        })
        .await?;
    }
    // The NAT's timeout shrinks to 2 s: the binding now dies in every
    // silence before the canary (sent 3 s after the device's last frame),
    // and comes back on the same port at the device's own ping.
    nat.nat.set_idle_timeout(Some(Duration::from_secs(2)));
    let lost = wait_status(&mut statuses, |s| {
        matches!(s, Status::BindingLost { .. } | Status::Disconnected { .. })
    })
    .await?;
    let Status::BindingLost { after_idle } = lost else {
        panic!("the connection should survive: {lost:?}")
    };
    assert!(after_idle <= interval, "{after_idle:?}");
    // A wake published while the binding may be dead arrives, once.
    let r = relay.publish_to(&ch, b"behind a dead binding").await?;
    let w = recv(&mut wakes).await?;
    assert_eq!(w.event_id, r.event_id);
    assert_eq!(r.status(), DeliveryStatus::Delivered);
    assert_eq!(
        nat.nat.opened.load(Ordering::Relaxed),
        1,
        "the binding came back on its old port"
    );
    assert!(nat.nat.expired.load(Ordering::Relaxed) >= 1);
    assert!(wakes.try_recv().is_err(), "delivered twice");
    client.close().await;
    Ok(())
}

#[tokio::test]
async fn standby_runs_periodic_work_on_keepalive_wakes_and_a_network_change_keeps_the_connection(
) -> anyhow::Result<()> {
    let relay = TestRelay::start().await?;
    let (status_cb, mut statuses) = status_sink();
    let client = relay
        .client("laptop")
        .keepalive(KeepalivePolicy::Fixed(Duration::from_millis(300)))
        .on_status(status_cb)
        .connect()
        .await?;
    let (cb, mut wakes) = wake_sink();
    let ch = client
        .channel("sync")
        .on_wake(cb)
        .register()
        .await?
        .into_string();

    // Periodic work (the app's own server keepalive) in standby runs right
    // after a network keepalive, never on a timer of its own.
    let (tx, mut ticks) = tokio::sync::mpsc::unbounded_channel();
    client.set_standby(true)?;
    client.add_periodic(Duration::from_millis(100), move || {
        let _ = tx.send(());
    })?;
    for _ in 0..2 {
        wait_status(&mut statuses, |s| {
            matches!(s, Status::KeepaliveCompleted { .. })
        })
        .await?;
        recv(&mut ticks).await?;
    }

    // Wi-Fi to cellular: a new local socket; the connection migrates.
    let before = client.info().expect("connected");
    client.network_changed("cellular")?;
    let moved = wait_status(&mut statuses, |s| {
        matches!(s, Status::KeepaliveCompleted { .. })
    })
    .await?;
    let Status::KeepaliveCompleted { observed_addr, .. } = moved else {
        unreachable!()
    };
    assert_ne!(
        observed_addr,
        before.local_addr.map(|a| a.to_string()).unwrap_or_default()
    );
    let r = relay.publish_to(&ch, b"after the move").await?;
    assert_eq!(r.status(), DeliveryStatus::Delivered);
    assert_eq!(recv(&mut wakes).await?.payload, b"after the move");
    assert_eq!(
        client.info().expect("connected").session_id,
        before.session_id,
        "no reconnect"
    );
    Ok(())
}

#[tokio::test]
async fn a_reconnect_sends_its_hello_in_0rtt() -> anyhow::Result<()> {
    // 0-RTT needs the server-side session cache (tickets carry none).
    let relay = TestRelay::start_with(|c| c.resumption = Resumption::Cache).await?;
    let path = UdpProxy::start(relay.quic_addr(), 5).await?;
    let (status_cb, mut statuses) = status_sink();
    let client = relay
        .client_at("phone", path.addr)
        .keepalive(KeepalivePolicy::Fixed(Duration::from_millis(300)))
        .keepalive_timeout(Duration::from_millis(500))
        .on_status(status_cb)
        .connect()
        .await?;
    assert!(
        !client.info().expect("connected").zero_rtt,
        "nothing to resume yet"
    );
    let (cb, mut wakes) = wake_sink();
    let ch = client
        .channel("calls")
        .on_wake(cb)
        .register()
        .await?
        .into_string();

    // The path dies (tunnel, elevator); the SDK notices and reconnects when
    // it heals, resuming its TLS session with the Hello in the first flight.
    path.up.cut.store(true, Ordering::Relaxed);
    path.down.cut.store(true, Ordering::Relaxed);
    wait_status(&mut statuses, |s| matches!(s, Status::Disconnected { .. })).await?;
    path.up.cut.store(false, Ordering::Relaxed);
    path.down.cut.store(false, Ordering::Relaxed);
    let connected = wait_status(&mut statuses, |s| matches!(s, Status::Connected(_))).await?;
    assert!(
        matches!(&connected, Status::Connected(info) if info.zero_rtt),
        "{connected:?}"
    );
    wait_status(&mut statuses, |s| matches!(s, Status::Reset { .. })).await?;

    let r = relay.publish_to(&ch, b"ring").await?;
    assert_eq!(r.status(), DeliveryStatus::Delivered);
    assert_eq!(recv(&mut wakes).await?.payload, b"ring");
    Ok(())
}
