//! Store-and-forward, end to end with the real relay and SDK on loopback:
//! queueing for offline devices, TTL, collapse keys, bounded queues,
//! power-saving delivery of normal priority, channel lifecycle, at-least-
//! once on the wire with exactly-once callbacks, and a lossy path.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedReceiver;
use tonic::transport::Channel;
use tonic::Code;
use wakewire_api::pb::publisher_client::PublisherClient;
use wakewire_api::pb::{
    DeliveryStatus, EventState, EventStatus, GetEventRequest, Priority, PublishRequest,
    WatchDeliveriesRequest,
};
use wakewire_sdk::{KeepalivePolicy, Status, WakeEvent};
use wakewire_test_support::proxy::UdpProxy;
use wakewire_test_support::{
    authed, raw_device_take_one_wake, recv, status_sink, wait_status, wake_sink, TestRelay,
};

fn event(channel: &str, payload: &str) -> PublishRequest {
    PublishRequest {
        channel_id: channel.into(),
        payload: payload.as_bytes().to_vec(),
        ..Default::default()
    }
}

async fn publish(
    p: &mut PublisherClient<Channel>,
    token: &str,
    req: PublishRequest,
) -> anyhow::Result<(String, DeliveryStatus)> {
    let r = p.publish(authed(req, token)).await?.into_inner();
    Ok((r.event_id.clone(), r.status()))
}

async fn get(
    p: &mut PublisherClient<Channel>,
    token: &str,
    id: &str,
) -> anyhow::Result<EventStatus> {
    Ok(p.get_event(authed(
        GetEventRequest {
            event_id: id.into(),
        },
        token,
    ))
    .await?
    .into_inner())
}

/// Registers `channel` for `device` once, then disconnects: the device is
/// offline and its channel exists.
async fn offline_channel(relay: &TestRelay, device: &str, channel: &str) -> anyhow::Result<String> {
    let c = relay.client(device).connect().await?;
    let id = c.channel(channel).register().await?.into_string();
    c.close().await;
    Ok(id)
}

/// Receives wakes until `n` arrived (bounded).
async fn take(rx: &mut UnboundedReceiver<WakeEvent>, n: usize) -> anyhow::Result<Vec<WakeEvent>> {
    let mut v = vec![];
    while v.len() < n {
        v.push(recv(rx).await?);
    }
    Ok(v)
}

/// Receipts from WatchDeliveries until `pred` has matched `n` of them.
async fn receipts(
    stream: &mut tonic::Streaming<EventStatus>,
    n: usize,
    pred: impl Fn(&EventStatus) -> bool,
) -> anyhow::Result<Vec<EventStatus>> {
    let mut got = vec![];
    tokio::time::timeout(Duration::from_secs(20), async {
        while got.len() < n {
            match stream.message().await? {
                Some(s) if pred(&s) => got.push(s),
                Some(_) => {}
                None => anyhow::bail!("receipt stream ended"),
            }
        }
        Ok(())
    })
    .await
    .map_err(|_| anyhow::anyhow!("timed out waiting for receipts"))??;
    Ok(got)
}

#[tokio::test]
async fn offline_events_are_queued_then_delivered_in_order_exactly_once() -> anyhow::Result<()> {
    let relay = TestRelay::start().await?;
    let ch = offline_channel(&relay, "phone", "mail").await?;
    let token = relay.publisher_token(&[], &["phone"]);
    let mut p = relay.publisher().await?;
    let mut watch = p
        .watch_deliveries(authed(WatchDeliveriesRequest {}, &token))
        .await?
        .into_inner();

    let mut ids = vec![];
    for i in 0..5 {
        let (id, status) = publish(&mut p, &token, event(&ch, &format!("m{i}"))).await?;
        assert_eq!(status, DeliveryStatus::Queued);
        assert_eq!(get(&mut p, &token, &id).await?.state(), EventState::Queued);
        ids.push(id);
    }

    let (cb, mut wakes) = wake_sink();
    let client = relay.client("phone").connect().await?;
    client
        .channel("mail")
        .on_wake(cb)
        .register()
        .await?
        .into_string();
    let got = take(&mut wakes, 5).await?;
    assert_eq!(
        got.iter().map(|w| w.event_id.clone()).collect::<Vec<_>>(),
        ids,
        "order"
    );
    assert_eq!(got[0].payload, b"m0");

    let delivered = receipts(&mut watch, 5, |s| s.state() == EventState::Delivered).await?;
    assert_eq!(delivered.len(), 5);
    assert_eq!(
        get(&mut p, &token, &ids[4]).await?.state(),
        EventState::Delivered
    );
    assert!(wakes.try_recv().is_err(), "an event arrived twice");

    // Errors: unknown event, malformed id, event of a channel out of scope.
    let e = p
        .get_event(authed(
            GetEventRequest {
                event_id: "0".repeat(32),
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = p
        .get_event(authed(
            GetEventRequest {
                event_id: "nope".into(),
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let other = relay.publisher_token(&[], &["someone-else"]);
    let e = p
        .get_event(authed(
            GetEventRequest {
                event_id: ids[0].clone(),
            },
            &other,
        ))
        .await
        .unwrap_err();
    // Another publisher's event does not exist as far as this one can tell.
    assert_eq!(e.code(), Code::NotFound);
    Ok(())
}

#[tokio::test]
async fn ttl_expiry_collapse_and_queue_limit_each_report_their_status() -> anyhow::Result<()> {
    let relay = TestRelay::start_with(|c| c.store.queue_limit = 3).await?;
    let ch = offline_channel(&relay, "tv", "alerts").await?;
    let token = relay.publisher_token(&[&ch], &[]);
    let mut p = relay.publisher().await?;
    let mut watch = p
        .watch_deliveries(authed(WatchDeliveriesRequest {}, &token))
        .await?
        .into_inner();

    // TTL 0 to an offline device: deliver now or drop, never stored.
    let mut now_only = event(&ch, "now-or-never");
    now_only.ttl_s = Some(0);
    let (id0, status) = publish(&mut p, &token, now_only).await?;
    assert_eq!(status, DeliveryStatus::NotConnected);
    assert_eq!(
        p.get_event(authed(GetEventRequest { event_id: id0 }, &token))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );

    // TTL 1 s: expires while queued.
    let mut short = event(&ch, "short-lived");
    short.ttl_s = Some(1);
    let (short_id, _) = publish(&mut p, &token, short).await?;
    let expired = receipts(&mut watch, 1, |s| s.state() == EventState::Expired).await?;
    assert_eq!(expired[0].event_id, short_id);
    assert_eq!(get(&mut p, &token, &short_id).await?.reason, "ttl");

    // Collapse key: the newer badge replaces the queued one.
    let mut badge1 = event(&ch, "badge=1");
    badge1.collapse_key = "badge".into();
    let (b1, _) = publish(&mut p, &token, badge1).await?;
    let mut badge2 = event(&ch, "badge=2");
    badge2.collapse_key = "badge".into();
    let (b2, _) = publish(&mut p, &token, badge2).await?;
    let s = get(&mut p, &token, &b1).await?;
    assert_eq!(
        (s.state(), s.reason.as_str(), s.replaced_by.as_str()),
        (EventState::Dropped, "collapsed", b2.as_str())
    );

    // Queue limit 3 (badge=2 is queued): two more fill it; the next two
    // drop the oldest non-collapsible events, never the collapsible badge.
    let mut plain = vec![];
    for i in 0..4 {
        plain.push(
            publish(&mut p, &token, event(&ch, &format!("n{i}")))
                .await?
                .0,
        );
    }
    for (id, state) in [
        (&plain[0], EventState::Dropped),
        (&plain[1], EventState::Dropped),
        (&plain[2], EventState::Queued),
    ] {
        let s = get(&mut p, &token, id).await?;
        assert_eq!(s.state(), state, "{id}");
        if state == EventState::Dropped {
            assert_eq!(s.reason, "queue_full");
        }
    }

    let (cb, mut wakes) = wake_sink();
    let client = relay.client("tv").connect().await?;
    client
        .channel("alerts")
        .on_wake(cb)
        .register()
        .await?
        .into_string();
    let got = take(&mut wakes, 3).await?;
    let payloads: Vec<_> = got
        .iter()
        .map(|w| String::from_utf8_lossy(&w.payload).into_owned())
        .collect();
    assert_eq!(payloads, ["badge=2", "n2", "n3"]);
    Ok(())
}

#[tokio::test]
async fn normal_priority_waits_for_a_radio_wake() -> anyhow::Result<()> {
    let relay = TestRelay::start_with(|c| {
        c.ack_wait = Duration::from_millis(300);
        c.connection.normal_max_delay = Duration::from_secs(60);
        // Hold even right after the device's Register.
        c.connection.radio_awake = Duration::ZERO;
    })
    .await?;
    let (cb, mut wakes) = wake_sink();
    let client = relay
        .client("watch")
        .keepalive(KeepalivePolicy::Fixed(Duration::from_secs(3600)))
        .connect()
        .await?;
    let ch = client
        .channel("fit")
        .on_wake(cb)
        .register()
        .await?
        .into_string();
    let token = relay.publisher_token(&[&ch], &[]);
    let mut p = relay.publisher().await?;

    let mut normal_ids = vec![];
    for i in 0..3 {
        let mut e = event(&ch, &format!("normal{i}"));
        e.priority = Priority::Normal as i32;
        let (id, status) = publish(&mut p, &token, e).await?;
        // Held by the relay: not acked within the ack wait.
        assert_eq!(status, DeliveryStatus::Queued);
        normal_ids.push(id);
    }
    assert!(
        wakes.try_recv().is_err(),
        "a normal event was sent without a radio wake"
    );

    // A high-priority event wakes the radio: the held ones ride along, first.
    let (high, status) = publish(&mut p, &token, event(&ch, "urgent")).await?;
    assert_eq!(status, DeliveryStatus::Delivered);
    let got = take(&mut wakes, 4).await?;
    let ids: Vec<_> = got.iter().map(|w| w.event_id.clone()).collect();
    assert_eq!(ids, [normal_ids.clone(), vec![high]].concat());
    assert_eq!(got[0].priority, wakewire_sdk::Priority::Normal);
    client.close().await;
    Ok(())
}

#[tokio::test]
async fn normal_priority_rides_the_next_keepalive() -> anyhow::Result<()> {
    let relay = TestRelay::start_with(|c| {
        c.ack_wait = Duration::from_millis(100);
        c.connection.normal_max_delay = Duration::from_secs(60);
    })
    .await?;
    let (cb, mut wakes) = wake_sink();
    let client = relay
        .client("band")
        .keepalive(KeepalivePolicy::Fixed(Duration::from_millis(500)))
        .connect()
        .await?;
    let ch = client
        .channel("steps")
        .on_wake(cb)
        .register()
        .await?
        .into_string();
    let token = relay.publisher_token(&[&ch], &[]);
    let mut e = event(&ch, "batched");
    e.priority = Priority::Normal as i32;
    let (id, _) = publish(&mut relay.publisher().await?, &token, e).await?;
    // Arrives once the device's keepalive reached the relay (no high event).
    assert_eq!(recv(&mut wakes).await?.event_id, id);
    client.close().await;
    Ok(())
}

#[tokio::test]
async fn unregistered_channel_is_gone_and_its_queue_dropped() -> anyhow::Result<()> {
    let relay = TestRelay::start_with(|c| {
        c.ack_wait = Duration::from_millis(100);
        c.connection.radio_awake = Duration::ZERO;
    })
    .await?;
    let desk = relay
        .client("desk")
        .keepalive(KeepalivePolicy::Fixed(Duration::from_secs(3600)))
        .connect()
        .await?;
    let ch = desk.channel("drop").register().await?.into_string();
    let token = relay.publisher_token(&[], &["desk"]);
    let mut p = relay.publisher().await?;
    let mut watch = p
        .watch_deliveries(authed(WatchDeliveriesRequest {}, &token))
        .await?
        .into_inner();

    // A normal-priority event waits in the queue for a radio wake...
    let mut held = event(&ch, "later");
    held.priority = Priority::Normal as i32;
    let (queued, status) = publish(&mut p, &token, held).await?;
    assert_eq!(status, DeliveryStatus::Queued);

    // ...when the device unregisters the channel: the channel is gone (like
    // HTTP 410) and its queue is dropped with that reason.
    desk.unregister(&wakewire_sdk::ChannelId::new(ch.clone()))
        .await?;
    let dropped = receipts(&mut watch, 1, |s| s.event_id == queued).await?;
    assert_eq!(
        (dropped[0].state(), dropped[0].reason.as_str()),
        (EventState::Dropped, "channel_gone")
    );
    let e = p
        .publish(authed(event(&ch, "y"), &token))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(
        e.message().contains("gone") && e.message().contains("unregistered"),
        "{}",
        e.message()
    );
    assert_eq!(get(&mut p, &token, &queued).await?.reason, "channel_gone");

    // Registering the same name again brings the same channel back.
    let again = desk.channel("drop").register().await;
    // The SDK forgot the name on unregister, so this is a fresh registration.
    assert_eq!(again?.as_str(), ch);
    let (_, status) = publish(&mut p, &token, event(&ch, "back")).await?;
    assert_eq!(status, DeliveryStatus::Delivered);
    Ok(())
}

#[tokio::test]
async fn a_wake_lost_between_wake_and_ack_is_sent_again_and_fires_once() -> anyhow::Result<()> {
    let relay = TestRelay::start().await?;
    let ch = offline_channel(&relay, "car", "unlock").await?;
    let token = relay.publisher_token(&[&ch], &[]);
    let mut p = relay.publisher().await?;
    let (id, _) = publish(&mut p, &token, event(&ch, "open")).await?;

    // The device takes the wake and disappears without acking.
    let w = raw_device_take_one_wake(&relay, "car", "unlock").await?;
    assert_eq!(w.event_id, id);
    assert_eq!(get(&mut p, &token, &id).await?.state(), EventState::Queued);

    // It comes back with the SDK: the event is on the wire again and the
    // callback fires once.
    let (cb, mut wakes) = wake_sink();
    let client = relay.client("car").connect().await?;
    client
        .channel("unlock")
        .on_wake(cb)
        .register()
        .await?
        .into_string();
    assert_eq!(recv(&mut wakes).await?.event_id, id);
    let (marker, _) = publish(&mut p, &token, event(&ch, "marker")).await?;
    assert_eq!(
        recv(&mut wakes).await?.event_id,
        marker,
        "the first event fired twice"
    );
    Ok(())
}

#[tokio::test]
async fn a_lost_ack_makes_the_relay_resend_and_the_sdk_drops_the_duplicate() -> anyhow::Result<()> {
    let relay = TestRelay::start().await?;
    let proxy = UdpProxy::start(relay.quic_addr(), 7).await?;
    let (status_cb, mut statuses) = status_sink();
    let up = proxy.up.clone();
    let (tx, mut wakes) = tokio::sync::mpsc::unbounded_channel();
    let client = relay
        .client_at("kiosk", proxy.addr)
        .keepalive(KeepalivePolicy::Fixed(Duration::from_millis(300)))
        .keepalive_timeout(Duration::from_millis(600))
        .on_status(status_cb)
        .connect()
        .await?;
    let ch = client
        .channel("door")
        .on_wake(move |w| {
            // Cut the device -> relay direction: the ack is lost.
            up.cut.store(true, Ordering::Relaxed);
            let _ = tx.send(w.clone());
        })
        .register()
        .await?
        .into_string();
    let token = relay.publisher_token(&[&ch], &[]);
    let mut p = relay.publisher().await?;
    let (id, status) = publish(&mut p, &token, event(&ch, "ring")).await?;
    assert_ne!(
        status,
        DeliveryStatus::Delivered,
        "the ack should have been lost"
    );
    assert_eq!(recv(&mut wakes).await?.event_id, id);

    // The SDK notices the dead path (keepalive timeout); the path heals.
    wait_status(&mut statuses, |s| matches!(s, Status::Disconnected { .. })).await?;
    proxy.up.cut.store(false, Ordering::Relaxed);
    wait_status(&mut statuses, |s| matches!(s, Status::Reset { .. })).await?;

    // The relay sent the event again on the new connection; the SDK acked
    // it without a second callback.
    let mut watch = p
        .watch_deliveries(authed(WatchDeliveriesRequest {}, &token))
        .await?
        .into_inner();
    if get(&mut p, &token, &id).await?.state() != EventState::Delivered {
        receipts(&mut watch, 1, |s| {
            s.event_id == id && s.state() == EventState::Delivered
        })
        .await?;
    }
    let (marker, _) = publish(&mut p, &token, event(&ch, "marker")).await?;
    assert_eq!(
        recv(&mut wakes).await?.event_id,
        marker,
        "the lost-ack event fired twice"
    );
    Ok(())
}

#[tokio::test]
async fn every_event_arrives_exactly_once_over_a_lossy_path() -> anyhow::Result<()> {
    let relay = TestRelay::start().await?;
    let proxy = UdpProxy::start(relay.quic_addr(), 42).await?;
    proxy.up.set_loss(0.15);
    proxy.down.set_loss(0.15);
    let (cb, mut wakes) = wake_sink();
    let client = relay
        .client_at("remote", proxy.addr)
        .keepalive_timeout(Duration::from_secs(10))
        .connect_timeout(Duration::from_secs(20))
        .connect()
        .await?;
    let ch = client
        .channel("sensor")
        .on_wake(cb)
        .register()
        .await?
        .into_string();
    let token = relay.publisher_token(&[&ch], &[]);
    let mut p = relay.publisher().await?;
    let mut ids = vec![];
    for i in 0..40 {
        ids.push(
            publish(&mut p, &token, event(&ch, &format!("e{i}")))
                .await?
                .0,
        );
    }
    let mut count: HashMap<String, usize> = HashMap::new();
    while count.len() < ids.len() {
        *count.entry(recv(&mut wakes).await?.event_id).or_default() += 1;
    }
    assert!(count.values().all(|&n| n == 1), "duplicates: {count:?}");
    assert!(ids.iter().all(|id| count.contains_key(id)));
    assert!(
        proxy.up.dropped.load(Ordering::Relaxed) + proxy.down.dropped.load(Ordering::Relaxed) > 0,
        "the path lost nothing"
    );
    Ok(())
}
