//! Hostile clients against the real relay on loopback: each test is an
//! attack from issue 9 that used to stop, fill or slow the relay, and the
//! limit that now holds it.

use std::net::IpAddr;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tonic::Code;
use wakewire_api::pb::{PublishRequest, WatchDeliveriesRequest};
use wakewire_proto::relay_session::{
    REGISTER_ERROR_RATE_LIMITED, REGISTER_ERROR_TOO_MANY_CHANNELS,
};
use wakewire_sdk::{ConnectError, KeepalivePolicy, Status};
use wakewire_test_support::flood::{client_hellos, flood};
use wakewire_test_support::{authed, status_sink, wait_status, RawDevice, TestRelay};

fn attackers(n: u8) -> Vec<IpAddr> {
    (1..=n).map(|i| IpAddr::from([127, 0, 9, i])).collect()
}

#[tokio::test]
async fn a_client_hello_flood_gets_retries_and_a_real_device_still_connects() -> anyhow::Result<()>
{
    let relay = TestRelay::start_with(|c| {
        c.admission.retry_threshold = 4;
        c.max_pending_handshakes = 64;
    })
    .await?;
    let ca = relay.relay().dev_cert_path().expect("dev").to_path_buf();
    let hellos = client_hellos(relay.quic_addr(), &ca, 2000)?;
    let mut outcome = flood(relay.quic_addr(), &attackers(20), &hellos).await?;
    // The relay must answer every spoofable ClientHello beyond the
    // threshold with a Retry, keeping nothing for it.
    let client = relay.client("real").connect().await?;
    outcome.drain(Duration::from_millis(200)).await;
    assert!(outcome.retries > 1000, "{} retries", outcome.retries);
    assert!(client.info().is_some());
    client.close().await;
    Ok(())
}

#[tokio::test]
async fn a_flood_from_one_prefix_cannot_take_every_handshake_slot() -> anyhow::Result<()> {
    // No Retry here: the per-prefix cap alone must leave room.
    let relay = TestRelay::start_with(|c| {
        c.admission.retry_threshold = usize::MAX;
        c.admission.max_pending_per_prefix = 32;
        c.max_pending_handshakes = 64;
    })
    .await?;
    let ca = relay.relay().dev_cert_path().expect("dev").to_path_buf();
    let hellos = client_hellos(relay.quic_addr(), &ca, 1000)?;
    let _outcome = flood(relay.quic_addr(), &attackers(50), &hellos).await?;
    // The attacker's /24 holds at most 32 of 64 slots; a device from
    // another prefix (127.0.0.1) gets one.
    let client = relay.client("real").connect().await?;
    assert!(client.info().is_some());
    client.close().await;
    Ok(())
}

#[tokio::test]
async fn the_channel_limit_holds_across_a_device_s_connections() -> anyhow::Result<()> {
    let relay = TestRelay::start_with(|c| c.connection.session.max_channels = 4).await?;
    let mut first = RawDevice::connect(&relay, "dev").await?;
    first.register(&["a", "b", "c", "d"]).await?;
    // A second connection of the same device (the first is replaced) may
    // register its existing channels again, but not a fifth.
    let mut second = RawDevice::connect(&relay, "dev").await?;
    assert_eq!(second.register(&["a", "b", "c", "d"]).await?.len(), 4);
    let refused = second.register_refused(&["e"]).await?;
    assert_eq!(refused.code, REGISTER_ERROR_TOO_MANY_CHANNELS);
    assert!(
        refused.message.contains("limit of 4 per device"),
        "{}",
        refused.message
    );
    Ok(())
}

#[tokio::test]
async fn churning_new_channels_is_rate_limited() -> anyhow::Result<()> {
    let relay = TestRelay::start_with(|c| {
        c.connection.session.register_burst = 8;
        c.connection.session.register_per_minute = 6;
    })
    .await?;
    let mut d = RawDevice::connect(&relay, "churn").await?;
    let mut refused = None;
    for i in 0..20 {
        let name = format!("ch{i}");
        match d.register_or_refused(&[name.as_str()]).await? {
            Ok(ids) => {
                d.unregister(&ids).await?;
            }
            Err(r) => {
                refused = Some((i, r));
                break;
            }
        }
    }
    let (at, r) = refused.expect("never rate-limited");
    assert_eq!(at, 8, "the burst is 8 new names");
    assert_eq!(r.code, REGISTER_ERROR_RATE_LIMITED);
    Ok(())
}

#[tokio::test]
async fn oversized_fields_and_missing_credentials_are_refused_clearly() -> anyhow::Result<()> {
    let relay = TestRelay::start().await?;
    let mut d = RawDevice::connect(&relay, "x").await?;
    let ch = d.register(&["c"]).await?.remove(0);
    let token = relay.publisher_token(&[&ch], &[]);
    let mut p = relay.publisher().await?;
    let mut req = PublishRequest {
        channel_id: ch.clone(),
        collapse_key: "k".repeat(65),
        ..Default::default()
    };
    let e = p.publish(authed(req.clone(), &token)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("collapse_key"), "{}", e.message());
    req.collapse_key = "k".repeat(64);
    p.publish(authed(req, &token)).await?;
    // The scheme is case-insensitive; a missing credential is refused on
    // the headers.
    let mut upper = tonic::Request::new(PublishRequest {
        channel_id: ch.clone(),
        ..Default::default()
    });
    upper
        .metadata_mut()
        .insert("authorization", format!("BEARER {token}").parse()?);
    p.publish(upper).await?;
    let e = p
        .publish(tonic::Request::new(PublishRequest {
            channel_id: ch,
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    Ok(())
}

#[tokio::test]
async fn a_publisher_over_its_rate_is_told_when_to_retry() -> anyhow::Result<()> {
    let relay = TestRelay::start_with(|c| {
        c.quotas.rate_per_sec = 2;
        c.quotas.burst = 3;
    })
    .await?;
    let mut d = RawDevice::connect(&relay, "r").await?;
    let ch = d.register(&["c"]).await?.remove(0);
    d.drop_connection(); // offline: publishes are answered at the commit
    let token = relay.publisher_token(&[&ch], &[]);
    let mut p = relay.publisher().await?;
    let req = PublishRequest {
        channel_id: ch,
        ..Default::default()
    };
    for _ in 0..3 {
        p.publish(authed(req.clone(), &token)).await?;
    }
    let e = p.publish(authed(req.clone(), &token)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    let wait: u64 = e
        .metadata()
        .get(wakewire_api::RETRY_AFTER_METADATA)
        .expect("retry-after")
        .to_str()?
        .parse()?;
    assert!((1..=1000).contains(&wait), "{wait}");
    // Another publisher is not affected.
    let other = relay.publisher_token(&[], &["r"]);
    p.publish(authed(req, &other)).await?;
    Ok(())
}

#[tokio::test]
async fn watchers_and_stored_bytes_are_bounded_per_publisher() -> anyhow::Result<()> {
    let relay = TestRelay::start_with(|c| {
        c.quotas.max_watchers = 2;
        c.quotas.max_stored_bytes = 10_000;
    })
    .await?;
    let mut d = RawDevice::connect(&relay, "w").await?;
    let ch = d.register(&["c"]).await?.remove(0);
    d.drop_connection();
    let token = relay.publisher_token(&[&ch], &[]);
    let mut p = relay.publisher().await?;
    let _w1 = p
        .watch_deliveries(authed(WatchDeliveriesRequest {}, &token))
        .await?;
    let _w2 = p
        .watch_deliveries(authed(WatchDeliveriesRequest {}, &token))
        .await?;
    let e = p
        .watch_deliveries(authed(WatchDeliveriesRequest {}, &token))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    // Offline device: events are stored until the publisher's quota.
    let big = PublishRequest {
        channel_id: ch,
        payload: vec![7; 4000],
        ..Default::default()
    };
    p.publish(authed(big.clone(), &token)).await?;
    p.publish(authed(big.clone(), &token)).await?;
    let e = p.publish(authed(big, &token)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(e.message().contains("bytes queued"), "{}", e.message());
    Ok(())
}

#[tokio::test]
async fn silent_connections_are_closed_and_the_connection_cap_holds() -> anyhow::Result<()> {
    let relay = TestRelay::start_with(|c| {
        c.grpc.idle_timeout = Duration::from_millis(500);
        c.grpc.max_connections = 3;
    })
    .await?;
    let addr = relay.relay().grpc_addr();
    let mut idle = vec![];
    for _ in 0..3 {
        idle.push(tokio::net::TcpStream::connect(addr).await?);
    }
    // Over the cap: closed at once.
    let mut extra = tokio::net::TcpStream::connect(addr).await?;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), extra.read(&mut buf)).await??;
    assert_eq!(n, 0, "the connection over the cap was not closed");
    // The silent ones are closed after the idle timeout (they never even
    // sent the HTTP/2 preface).
    for s in &mut idle {
        let r = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue, // the server's SETTINGS frame
                }
            }
        })
        .await;
        assert!(r.is_ok(), "an idle connection stayed open");
    }
    drop(idle);
    // Room again: a real client works.
    let mut d = RawDevice::connect(&relay, "c").await?;
    let ch = d.register(&["c"]).await?.remove(0);
    let r = relay.publish_to(&ch, b"ok").await;
    assert!(r.is_ok(), "{r:?}");
    Ok(())
}

#[tokio::test]
async fn a_revoked_token_is_refused_and_its_device_disconnected() -> anyhow::Result<()> {
    let relay = TestRelay::start().await?;
    let (cb, mut statuses) = status_sink();
    let token = relay.device_token("stolen");
    let client = relay
        .client("stolen")
        .device_token(token.clone())
        .keepalive(KeepalivePolicy::Fixed(Duration::from_secs(3600)))
        .on_status(cb)
        .connect()
        .await?;
    let ch = client.channel("c").register().await?;
    let publisher = relay.publisher_token(&[ch.as_str()], &[]);
    let data = wakewire_server::data_dir::DataDir::open(&relay.config.data_dir)?;
    let jti = |t: &str| {
        relay
            .relay()
            .keys()
            .verifier
            .verify(t, wakewire_proto::token::TokenKind::Device, 0)
            .or_else(|_| {
                relay.relay().keys().verifier.verify(
                    t,
                    wakewire_proto::token::TokenKind::Publisher,
                    0,
                )
            })
            .expect("valid")
            .jti
            .expect("id")
    };
    data.revoke(&jti(&token))?;
    data.revoke(&jti(&publisher))?;
    // The relay re-reads the list within a second and closes the device.
    let gone = wait_status(&mut statuses, |s| {
        matches!(
            s,
            Status::Disconnected {
                error: ConnectError::Unauthorized(_),
                ..
            }
        )
    })
    .await?;
    assert!(format!("{gone:?}").contains("revoked"), "{gone:?}");
    let e = relay
        .publisher()
        .await?
        .publish(authed(
            PublishRequest {
                channel_id: ch.into_string(),
                ..Default::default()
            },
            &publisher,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("revoked"), "{}", e.message());
    Ok(())
}

#[tokio::test]
async fn a_rotated_signing_key_keeps_old_tokens_working() -> anyhow::Result<()> {
    let mut relay = TestRelay::start().await?;
    let old = relay.device_token("phone");
    let data = wakewire_server::data_dir::DataDir::open(&relay.config.data_dir)?;
    let (old_kid, new_kid) = data.rotate_signing_key()?;
    relay.restart().await?;
    assert_eq!(relay.relay().keys().signer.kid(), new_kid);
    let c = relay
        .client("phone")
        .device_token(old.clone())
        .connect()
        .await?;
    c.close().await;
    let c = relay.client("phone").connect().await?; // a new-key token
    c.close().await;
    // Once the old key is dropped, its tokens are refused.
    data.drop_retired_key(&old_kid)?;
    relay.restart().await?;
    let e = relay
        .client("phone")
        .device_token(old)
        .connect()
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ConnectError::Unauthorized(m) if m.contains(&old_kid)),
        "{e}"
    );
    Ok(())
}

/// A request waiting long for its answer (here the device's ack, which
/// never comes) sends nothing meanwhile: the relay's HTTP/2 pings keep its
/// connection from being taken for idle.
#[tokio::test]
async fn a_slow_answer_is_not_mistaken_for_an_idle_connection() -> anyhow::Result<()> {
    let relay = TestRelay::start_with(|c| {
        c.grpc.idle_timeout = Duration::from_millis(500);
        c.grpc.max_connections = 3;
    })
    .await?;
    let mut d = RawDevice::connect(&relay, "c").await?;
    let ch = d.register(&["c"]).await?.remove(0);
    let r = relay.publish_to(&ch, b"ok").await;
    assert!(r.is_ok(), "{r:?}");
    Ok(())
}

/// A request without credentials whose body never completes (a slow-body
/// attack) is answered UNAUTHENTICATED on its headers: the relay buffers
/// none of the body, and the stream is over at once.
#[tokio::test]
async fn an_unauthenticated_request_is_refused_before_its_body_is_read() -> anyhow::Result<()> {
    let relay = TestRelay::start().await?;
    let tcp = tokio::net::TcpStream::connect(relay.relay().grpc_addr()).await?;
    let (client, conn) = h2::client::handshake(tcp).await?;
    tokio::spawn(conn);
    let mut client = client.ready().await?;
    let mut streams = vec![];
    for _ in 0..25 {
        let req = http::Request::post("http://localhost/wakewire.publish.v1.Publisher/Publish")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())?;
        let (response, mut body) = client.send_request(req, false)?;
        // A gRPC frame header announcing 4 MB, then nothing more.
        body.send_data(bytes::Bytes::from_static(&[0, 0, 0x40, 0, 0, 1]), false)?;
        streams.push((response, body));
        client = client.ready().await?;
    }
    for (response, _body) in streams {
        let response = tokio::time::timeout(Duration::from_secs(10), response).await??;
        let status = response
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap_or("").to_owned());
        assert_eq!(status.as_deref(), Some("16"), "{:?}", response.headers());
    }
    Ok(())
}
