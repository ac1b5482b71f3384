//! Delivery races and hostile devices against the real relay on loopback
//! (real QUIC, real gRPC): each test reproduces a failure seen in the field
//! and checks the guarantee that fixes it (docs/protocol.md, "Delivery
//! guarantees").

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tonic::Code;
use wakewire_api::pb::{
    DeliveryStatus, EventState, EventStatus, GetEventRequest, Priority, PublishRequest,
    WatchDeliveriesRequest,
};
use wakewire_proto::ErrorCode;
use wakewire_sdk::KeepalivePolicy;
use wakewire_test_support::{authed, recv, wake_sink, RawDevice, TestRelay};

fn event(channel: &str, payload: &str) -> PublishRequest {
    PublishRequest {
        channel_id: channel.into(),
        payload: payload.as_bytes().to_vec(),
        ..Default::default()
    }
}

async fn state_of(relay: &TestRelay, token: &str, id: &str) -> anyhow::Result<EventState> {
    let s = relay
        .publisher()
        .await?
        .get_event(authed(
            GetEventRequest {
                event_id: id.into(),
            },
            token,
        ))
        .await?
        .into_inner();
    Ok(s.state())
}

/// Receipts (final states) of `ids`, awaited on a WatchDeliveries stream
/// opened before they could happen (bounded wait).
async fn final_states(
    watch: &mut tonic::Streaming<EventStatus>,
    ids: &[String],
) -> anyhow::Result<HashMap<String, EventState>> {
    let want: HashSet<&String> = ids.iter().collect();
    let mut got = HashMap::new();
    tokio::time::timeout(Duration::from_secs(20), async {
        while got.len() < want.len() {
            let Some(s) = watch.message().await? else {
                anyhow::bail!("receipt stream ended");
            };
            if want.contains(&s.event_id) {
                got.insert(s.event_id.clone(), s.state());
            }
        }
        Ok(())
    })
    .await
    .map_err(|_| anyhow::anyhow!("missing receipts: {} of {}", got.len(), want.len()))??;
    Ok(got)
}

async fn watch(relay: &TestRelay, token: &str) -> anyhow::Result<tonic::Streaming<EventStatus>> {
    Ok(relay
        .publisher()
        .await?
        .watch_deliveries(authed(WatchDeliveriesRequest {}, token))
        .await?
        .into_inner())
}

/// Creates `channel` for `device` and leaves it offline; its id.
async fn offline_channel(relay: &TestRelay, device: &str, channel: &str) -> anyhow::Result<String> {
    let mut d = RawDevice::connect(relay, device).await?;
    let id = d.register(&[channel]).await?.remove(0);
    d.drop_connection();
    Ok(id)
}

#[tokio::test]
async fn an_event_published_while_the_device_connects_goes_out_on_that_connection(
) -> anyhow::Result<()> {
    let relay = TestRelay::start_with(|c| c.ack_wait = Duration::from_millis(200)).await?;
    let ch = offline_channel(&relay, "phone", "mail").await?;
    let token = relay.publisher_token(&[&ch], &[]);
    let mut receipts = watch(&relay, &token).await?;

    // Connected and authenticated, channel not registered yet.
    let mut device = RawDevice::connect(&relay, "phone").await?;
    let r = relay.publish_to(&ch, b"during connect").await?;
    assert_eq!(r.status(), DeliveryStatus::Queued);
    assert!(
        !device.wake_within(Duration::from_millis(300)).await,
        "sent for a channel the connection has not registered"
    );

    // The Register arrives: the event goes out now, on this connection,
    // not after the next reconnect.
    device.register(&["mail"]).await?;
    let w = device.next_wake().await?;
    assert_eq!(w.event_id, r.event_id);
    device.ack(&w.event_id).await?;
    let states = final_states(&mut receipts, std::slice::from_ref(&r.event_id)).await?;
    assert_eq!(states[&r.event_id], EventState::Delivered);
    Ok(())
}

#[tokio::test]
async fn an_event_that_reached_the_app_is_never_reported_dropped() -> anyhow::Result<()> {
    let relay = TestRelay::start_with(|c| {
        c.store.queue_limit = 5;
        c.ack_wait = Duration::from_millis(50);
    })
    .await?;
    let ch = offline_channel(&relay, "tablet", "news").await?;
    let token = relay.publisher_token(&[&ch], &[]);
    let mut receipts = watch(&relay, &token).await?;
    let mut p = relay.publisher().await?;
    let mut published = vec![];
    // Offline: 8 into a queue of 5, three are dropped (never sent).
    for i in 0..8 {
        let r = p
            .publish(authed(event(&ch, &format!("old{i}")), &token))
            .await?;
        published.push(r.into_inner().event_id);
    }
    // The device returns and receives the queue while publishing goes on;
    // it acks only after everything arrived (a slow app).
    let mut device = RawDevice::connect(&relay, "tablet").await?;
    device.register(&["news"]).await?;
    let mut received = vec![];
    for i in 0..12 {
        let r = p
            .publish(authed(event(&ch, &format!("new{i}")), &token))
            .await?;
        published.push(r.into_inner().event_id);
    }
    while received.len() < 5 + 12 {
        received.push(device.next_wake().await?.event_id);
    }
    for id in &received {
        device.ack(id).await?;
    }
    // Every event the device received ends DELIVERED; the rest DROPPED,
    // and those were never sent.
    let got: HashSet<&String> = received.iter().collect();
    let states = final_states(&mut receipts, &published).await?;
    for id in &published {
        if got.contains(id) {
            assert_eq!(states[id], EventState::Delivered, "{id} reached the device");
        } else {
            assert_eq!(
                states[id],
                EventState::Dropped,
                "{id} never reached the device"
            );
        }
    }
    assert_eq!(got.len(), 17);
    Ok(())
}

#[tokio::test]
async fn an_ack_from_another_device_is_ignored() -> anyhow::Result<()> {
    let relay = TestRelay::start().await?;
    let ch = offline_channel(&relay, "victim", "bank").await?;
    let token = relay.publisher_token(&[&ch], &[]);
    let r = relay.publish_to(&ch, b"secret").await?;
    assert_eq!(r.status(), DeliveryStatus::Queued);

    let mut attacker = RawDevice::connect(&relay, "attacker").await?;
    attacker.ack(&r.event_id).await?;
    // The attacker's connection stays (one stray ack is tolerated), and the
    // event is still queued for its owner.
    attacker.register(&["x"]).await?;
    assert_eq!(
        state_of(&relay, &token, &r.event_id).await?,
        EventState::Queued
    );
    let mut victim = RawDevice::connect(&relay, "victim").await?;
    victim.register(&["bank"]).await?;
    assert_eq!(victim.next_wake().await?.event_id, r.event_id);
    Ok(())
}

#[tokio::test]
async fn an_ack_flood_closes_only_the_flooding_connection() -> anyhow::Result<()> {
    let relay = TestRelay::start().await?;
    let (cb, mut wakes) = wake_sink();
    let good = relay
        .client("good")
        .keepalive(KeepalivePolicy::Fixed(Duration::from_secs(3600)))
        .connect()
        .await?;
    let ch = good
        .channel("c")
        .on_wake(cb)
        .register()
        .await?
        .into_string();

    let mut flooder = RawDevice::connect(&relay, "flooder").await?;
    // The relay may close the connection before the flood is written.
    let _ = flooder.ack_flood(10_000).await;
    match flooder.closed().await? {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(
                c.error_code,
                quinn::VarInt::from_u32(ErrorCode::ProtocolViolation.as_u32())
            );
            let reason = String::from_utf8_lossy(&c.reason).into_owned();
            assert!(reason.contains("acks for events not sent"), "{reason}");
        }
        other => panic!("unexpected close: {other:?}"),
    }
    let r = relay.publish_to(&ch, b"still here").await?;
    assert_eq!(r.status(), DeliveryStatus::Delivered);
    assert_eq!(recv(&mut wakes).await?.payload, b"still here");
    good.close().await;
    Ok(())
}

#[tokio::test]
async fn a_retried_publish_with_its_idempotency_key_creates_no_second_event() -> anyhow::Result<()>
{
    let relay = TestRelay::start().await?;
    let (cb, mut wakes) = wake_sink();
    let client = relay.client("retry").connect().await?;
    let ch = client
        .channel("c")
        .on_wake(cb)
        .register()
        .await?
        .into_string();
    let token = relay.publisher_token(&[&ch], &[]);
    let mut p = relay.publisher().await?;
    let mut req = event(&ch, "once");
    req.idempotency_key = "order-1234".into();
    let first = p.publish(authed(req.clone(), &token)).await?.into_inner();
    assert!(!first.duplicate);
    assert_eq!(first.status(), DeliveryStatus::Delivered);
    let again = p.publish(authed(req.clone(), &token)).await?.into_inner();
    assert!(again.duplicate);
    assert_eq!(again.event_id, first.event_id);
    assert_eq!(again.status(), DeliveryStatus::Delivered);
    assert_eq!(recv(&mut wakes).await?.event_id, first.event_id);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), recv(&mut wakes))
            .await
            .is_err(),
        "the retry reached the device"
    );
    // The same key with another request is refused clearly.
    let mut other = req.clone();
    other.payload = b"different".to_vec();
    let e = p.publish(authed(other, &token)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("idempotency_key"), "{}", e.message());
    // Keys are per publisher scope: another token's same key is new.
    let other_token = relay.publisher_token(&[], &["retry"]);
    let fresh = p
        .publish(authed(req.clone(), &other_token))
        .await?
        .into_inner();
    assert!(!fresh.duplicate);
    assert_ne!(fresh.event_id, first.event_id);
    // Deliver-now-or-never events remember their first answer too.
    let mut now_only = event(&ch, "now");
    now_only.ttl_s = Some(0);
    now_only.idempotency_key = "ping-1".into();
    let a = p
        .publish(authed(now_only.clone(), &token))
        .await?
        .into_inner();
    let b = p.publish(authed(now_only, &token)).await?.into_inner();
    assert_eq!(
        (b.event_id.as_str(), b.duplicate),
        (a.event_id.as_str(), true)
    );
    assert_eq!(b.status(), a.status());
    // Oversized keys are refused.
    let mut long = event(&ch, "x");
    long.idempotency_key = "k".repeat(129);
    let e = p.publish(authed(long, &token)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    client.close().await;
    Ok(())
}

#[tokio::test]
async fn a_replaced_connection_hands_its_unacked_wakes_to_the_new_one() -> anyhow::Result<()> {
    let relay = TestRelay::start_with(|c| c.ack_wait = Duration::from_millis(100)).await?;
    let mut first = RawDevice::connect(&relay, "laptop").await?;
    let ch = first.register(&["sync"]).await?.remove(0);
    let r = relay.publish_to(&ch, b"x").await?;
    assert_eq!(first.next_wake().await?.event_id, r.event_id);
    // Not acked; the same device connects again (the old one is replaced).
    let mut second = RawDevice::connect(&relay, "laptop").await?;
    second.register(&["sync"]).await?;
    assert_eq!(second.next_wake().await?.event_id, r.event_id);
    Ok(())
}

/// The hold timer of a normal-priority event, on tokio's paused clock: the
/// minute passes in no real time, and the relay reads time only through
/// tokio. (The clock is paused after the publish: while a store commit
/// runs on the writer thread the runtime looks idle, and a paused clock
/// would jump ahead meanwhile.)
#[tokio::test]
async fn a_held_normal_event_goes_out_when_its_hold_timer_fires() -> anyhow::Result<()> {
    let relay = TestRelay::start_with(|c| {
        c.ack_wait = Duration::from_millis(100);
        c.connection.normal_max_delay = Duration::from_secs(60);
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
        .channel("steps")
        .on_wake(cb)
        .register()
        .await?
        .into_string();
    let mut e = event(&ch, "later");
    e.priority = Priority::Normal as i32;
    let token = relay.publisher_token(&[&ch], &[]);
    let r = relay
        .publisher()
        .await?
        .publish(authed(e, &token))
        .await?
        .into_inner();
    assert_eq!(r.status(), DeliveryStatus::Queued);
    tokio::time::pause();
    tokio::time::sleep(Duration::from_secs(50)).await;
    assert!(wakes.try_recv().is_err(), "sent before the hold timer");
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(recv(&mut wakes).await?.event_id, r.event_id);
    client.close().await;
    Ok(())
}
