//! Cluster mode with real processes on loopback: three `nats-server`
//! processes clustered with JetStream (R3) and three relays sharing one set
//! of keys. Devices are SDK clients that know every relay; publishers are
//! gRPC clients on any relay.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::Code;
use wakewire_api::pb::{
    DeliveryStatus, EventState, GetEventRequest, PublishRequest, WatchDeliveriesRequest,
};
use wakewire_test_support::cluster::ClusterFixture;
use wakewire_test_support::{authed, recv, wake_sink};

const BIN: &str = env!("CARGO_BIN_EXE_wakewire-relay");

fn publish(channel: &str, payload: &str) -> PublishRequest {
    PublishRequest {
        channel_id: channel.to_owned(),
        payload: payload.as_bytes().to_vec(),
        ..Default::default()
    }
}

/// GetEvent on relay `relay`.
async fn event_state(
    c: &ClusterFixture,
    relay: usize,
    event_id: impl Into<String>,
    token: &str,
) -> anyhow::Result<wakewire_api::pb::EventStatus> {
    let req = GetEventRequest {
        event_id: event_id.into(),
    };
    Ok(c.publisher(relay)
        .await?
        .get_event(authed(req, token))
        .await?
        .into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_on_any_relay_reaches_the_device_wherever_it_is() -> anyhow::Result<()> {
    if !wakewire_test_support::nats::nats_or_skip() {
        return Ok(());
    }
    let c = ClusterFixture::start(BIN.as_ref(), 3, 3, &[]).await?;
    let token = c.publisher_token(&["phone-c", "phone-b"]);

    // A device connected to relay C only.
    let (on_wake, mut wakes) = wake_sink();
    let phone_c = c
        .client_for("phone-c", &c.quic[2].to_string())
        .connect()
        .await?;
    let ch = phone_c.channel("mail").on_wake(on_wake).register().await?;
    assert_eq!(ch.as_str(), c.channel_id("phone-c", "mail"));

    // A backend watching on relay A.
    let mut watch = c
        .publisher(0)
        .await?
        .watch_deliveries(authed(WatchDeliveriesRequest {}, &token))
        .await?
        .into_inner();

    // Published on A, delivered by C, acked: DELIVERED.
    let r = c
        .publisher(0)
        .await?
        .publish(authed(publish(ch.as_str(), "a to c"), &token))
        .await?
        .into_inner();
    assert_eq!(r.status(), DeliveryStatus::Delivered, "{r:?}");
    let w = recv(&mut wakes).await?;
    assert_eq!(
        (w.event_id.as_str(), w.payload.as_slice()),
        (r.event_id.as_str(), &b"a to c"[..])
    );

    // A's watcher sees the delivery C recorded.
    let seen = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await??
        .expect("a receipt");
    assert_eq!(seen.event_id, r.event_id);
    assert_eq!(seen.state(), EventState::Delivered);
    // Any relay answers GetEvent.
    let st = event_state(&c, 1, r.event_id.clone(), &token).await?;
    assert_eq!(st.state(), EventState::Delivered);

    // A device that registered on A, then went away.
    let phone_b = c
        .client_for("phone-b", &c.quic[0].to_string())
        .connect()
        .await?;
    let ch_b = phone_b.channel("mail").register().await?;
    phone_b.close().await;
    // Published on C while it is away: queued in JetStream.
    let mut queued = Vec::new();
    for i in 0..3 {
        let r = c
            .publisher(2)
            .await?
            .publish(authed(publish(ch_b.as_str(), &format!("away {i}")), &token))
            .await?
            .into_inner();
        assert_eq!(r.status(), DeliveryStatus::Queued, "{r:?}");
        queued.push(r.event_id);
    }
    let st = event_state(&c, 0, queued[0].clone(), &token).await?;
    assert_eq!(st.state(), EventState::Queued);
    // It comes back through relay B: same channel id, its queue in order.
    let (on_wake, mut wakes_b) = wake_sink();
    let phone_b = c
        .client_for("phone-b", &c.quic[1].to_string())
        .connect()
        .await?;
    let again = phone_b.channel("mail").on_wake(on_wake).register().await?;
    assert_eq!(again, ch_b, "the channel id changed between relays");
    for (i, id) in queued.iter().enumerate() {
        let w = recv(&mut wakes_b).await?;
        assert_eq!(&w.event_id, id);
        assert_eq!(w.payload, format!("away {i}").into_bytes());
    }

    // Errors are the single node's: unknown channel, another's channel.
    let unknown = c
        .publisher(1)
        .await?
        .publish(authed(publish("AAAAAAAAAAAAAAAAAAAAAA", "x"), &token))
        .await
        .expect_err("unknown channel");
    assert_eq!(unknown.code(), Code::NotFound);
    let other = c.publisher_token(&["someone-else"]);
    let denied = c
        .publisher(1)
        .await?
        .publish(authed(publish(ch.as_str(), "x"), &other))
        .await
        .expect_err("another device's channel");
    assert_eq!(denied.code(), Code::PermissionDenied);
    phone_b.close().await;
    phone_c.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_keyed_publish_on_another_relay_returns_the_first_event() -> anyhow::Result<()> {
    if !wakewire_test_support::nats::nats_or_skip() {
        return Ok(());
    }
    let c = ClusterFixture::start(BIN.as_ref(), 3, 2, &[]).await?;
    let token = c.publisher_token(&["phone"]);
    let dev = c
        .client_for("phone", &c.quic[0].to_string())
        .connect()
        .await?;
    let ch = dev.channel("mail").register().await?;
    dev.close().await;
    let keyed = |payload: &str| PublishRequest {
        idempotency_key: "order-42".into(),
        ..publish(ch.as_str(), payload)
    };
    let first = c
        .publisher(0)
        .await?
        .publish(authed(keyed("once"), &token))
        .await?
        .into_inner();
    let retry = c
        .publisher(1)
        .await?
        .publish(authed(keyed("once"), &token))
        .await?
        .into_inner();
    assert_eq!(retry.event_id, first.event_id);
    assert!(retry.duplicate && !first.duplicate);
    let reuse = c
        .publisher(1)
        .await?
        .publish(authed(keyed("something else"), &token))
        .await
        .expect_err("same key, another request");
    assert_eq!(reuse.code(), Code::InvalidArgument);
    // One event reaches the device.
    let (on_wake, mut wakes) = wake_sink();
    let dev = c
        .client_for("phone", &c.quic[1].to_string())
        .connect()
        .await?;
    dev.channel("mail").on_wake(on_wake).register().await?;
    assert_eq!(recv(&mut wakes).await?.event_id, first.event_id);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), wakes.recv())
            .await
            .is_err(),
        "a retry was delivered twice"
    );
    dev.close().await;
    Ok(())
}

/// Callbacks per event id, across every device.
type Seen = Arc<Mutex<HashMap<String, u32>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collapse_keys_and_queue_limits_hold_across_relays() -> anyhow::Result<()> {
    if !wakewire_test_support::nats::nats_or_skip() {
        return Ok(());
    }
    let c = ClusterFixture::start(BIN.as_ref(), 3, 2, &["--queue-limit", "3"]).await?;
    let token = c.publisher_token(&["phone"]);
    let dev = c
        .client_for("phone", &c.quic[0].to_string())
        .connect()
        .await?;
    let ch = dev.channel("mail").register().await?;
    dev.close().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let relay = i % 2;
        let r = c
            .publisher(relay)
            .await?
            .publish(authed(publish(ch.as_str(), &format!("plain {i}")), &token))
            .await?
            .into_inner();
        ids.push(r.event_id);
    }
    for i in 0..3 {
        let req = PublishRequest {
            collapse_key: "inbox-count".into(),
            ..publish(ch.as_str(), &format!("count {i}"))
        };
        c.publisher(i % 2)
            .await?
            .publish(authed(req, &token))
            .await?;
    }
    // The two oldest plain events were dropped for the queue limit, with
    // receipts that say so.
    for dropped in &ids[..2] {
        let st = event_state(&c, 1, dropped.clone(), &token).await?;
        assert_eq!(
            (st.state(), st.reason.as_str()),
            (EventState::Dropped, "queue_full")
        );
    }
    let seen: Seen = Arc::default();
    let got = seen.clone();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let dev = c
        .client_for("phone", &c.quic[1].to_string())
        .connect()
        .await?;
    dev.channel("mail")
        .on_wake(move |w| {
            *got.lock()
                .expect("lock")
                .entry(w.event_id.clone())
                .or_default() += 1;
            let _ = tx.send(String::from_utf8_lossy(&w.payload).into_owned());
        })
        .register()
        .await?;
    let mut payloads = Vec::new();
    for _ in 0..4 {
        payloads.push(recv(&mut rx).await?);
    }
    assert_eq!(payloads, ["plain 2", "plain 3", "plain 4", "count 2"]);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), rx.recv())
            .await
            .is_err(),
        "more than the queue held"
    );
    dev.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_relay_sends_its_devices_to_its_peers() -> anyhow::Result<()> {
    if !wakewire_test_support::nats::nats_or_skip() {
        return Ok(());
    }
    let mut c = ClusterFixture::start(BIN.as_ref(), 3, 2, &[]).await?;
    let token = c.publisher_token(&["phone"]);
    // The device knows relay A only.
    let (on_wake, mut wakes) = wake_sink();
    let (on_status, mut statuses) = wakewire_test_support::status_sink();
    let dev = c
        .client_for("phone", &c.quic[0].to_string())
        .on_status(on_status)
        .connect()
        .await?;
    let ch = dev.channel("mail").on_wake(on_wake).register().await?;
    // Relays announce themselves every 10 s; the first announcement is at
    // start, so B is known to A by now.
    c.drain(0).await?;
    // Its GoAway named B: the device is there now, and reachable.
    let on_b = wakewire_test_support::wait_status(
        &mut statuses,
        |s| matches!(s, wakewire_sdk::Status::Connected(i) if i.relay_addr == c.quic[1]),
    )
    .await;
    assert!(
        on_b.is_ok(),
        "the device did not move to the peer: {on_b:?}"
    );
    let r = c
        .publisher(1)
        .await?
        .publish(authed(publish(ch.as_str(), "after the move"), &token))
        .await?
        .into_inner();
    assert_eq!(r.status(), DeliveryStatus::Delivered);
    assert_eq!(recv(&mut wakes).await?.event_id, r.event_id);
    dev.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_relay_exports_its_cluster_metrics_and_the_dashboard_uses_only_exported_ones(
) -> anyhow::Result<()> {
    if !wakewire_test_support::nats::nats_or_skip() {
        return Ok(());
    }
    use wakewire_test_support::metrics::{metric_names, scrape};
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let c = ClusterFixture::start(BIN.as_ref(), 3, 1, &["--metrics-listen", &addr]).await?;
    let token = c.publisher_token(&["phone"]);
    let (on_wake, mut wakes) = wake_sink();
    let dev = c.client("phone").connect().await?;
    let ch = dev.channel("mail").on_wake(on_wake).register().await?;
    let r = c
        .publisher(0)
        .await?
        .publish(authed(publish(ch.as_str(), "x"), &token))
        .await?
        .into_inner();
    assert_eq!(r.status(), DeliveryStatus::Delivered);
    recv(&mut wakes).await?;
    dev.close().await;
    let body = scrape(port).await?;
    let exported = metric_names(&body);
    let repo = |p: &str| {
        std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join(p),
        )
    };
    let docs = repo("docs/operations.md")?;
    for line in docs.lines().filter(|l| l.contains("| cluster mode")) {
        for name in metric_names(line) {
            assert!(
                exported.contains(&name) || body.contains(&format!("# TYPE {name} histogram")),
                "cluster metric {name} is not exported:\n{body}"
            );
        }
    }
    assert!(body.contains("wakewire_relay_nats_connected 1"), "{body}");
    assert!(
        body.contains("op=\"publish\""),
        "no JetStream publish timed:\n{body}"
    );
    for file in [
        "deploy/grafana/wakewire.json",
        "deploy/prometheus/alerts.yaml",
    ] {
        for name in metric_names(&repo(file)?) {
            assert!(
                exported.contains(&name),
                "{file} uses {name}, not in the scrape"
            );
        }
    }
    Ok(())
}
