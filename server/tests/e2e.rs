//! End to end: a real relay (in-process, real QUIC and gRPC on loopback),
//! the real SDK, real publishes.

use std::time::Duration;

use tonic::Code;
use wakewire_api::pb::{DeliveryStatus, PublishBatchRequest, PublishRequest};
use wakewire_proto::ErrorCode;
use wakewire_sdk::{CipherSuite, ConnectError, Protection, Status};
use wakewire_test_support::{
    authed, raw_connection, recv, status_sink, wait_status, wake_sink, TestRelay,
};

fn publish(channel_id: &str, payload: &[u8]) -> PublishRequest {
    PublishRequest {
        channel_id: channel_id.into(),
        payload: payload.to_vec(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_device_that_asks_for_aes_256_gets_it() -> anyhow::Result<()> {
    let relay = TestRelay::start().await?;
    let client = relay
        .client("phone-1")
        .min_protection(Protection::Tls13Aes256)
        .connect()
        .await?;
    let info = client.info().expect("connected");
    assert_eq!(info.cipher_suite, CipherSuite::Aes256GcmSha384);
    client.close().await;
    Ok(())
}

#[tokio::test]
async fn publish_reaches_the_right_callback_of_two_channels() -> anyhow::Result<()> {
    let relay = TestRelay::start().await?;
    let client = relay.client("phone-1").connect().await?;
    let info = client.info().expect("connected");
    assert_eq!(info.tls_version, "TLSv1.3");
    assert_eq!(info.alpn, "wakewire/1");
    // AES-128-GCM-SHA256 by default (SHA-256 is accelerated, SHA-384 is not).
    assert_eq!(info.cipher_suite, CipherSuite::Aes128GcmSha256);
    assert_eq!(info.device_id, "phone-1");
    assert_eq!(info.relay_addr, relay.quic_addr());

    let (mail_cb, mut mail) = wake_sink();
    let (chat_cb, mut chat) = wake_sink();
    let mail_id = client
        .channel("mail")
        .on_wake(mail_cb)
        .register()
        .await?
        .into_string();
    let chat_id = client
        .channel("chat")
        .on_wake(chat_cb)
        .register()
        .await?
        .into_string();
    assert_ne!(mail_id, chat_id);
    assert_eq!(mail_id.len(), 22);

    let token = relay.publisher_token(&[], &["phone-1"]);
    let mut publisher = relay.publisher().await?;
    let r = publisher
        .publish(authed(publish(&chat_id, b"new message"), &token))
        .await?
        .into_inner();
    assert_eq!(r.status(), DeliveryStatus::Delivered);
    let w = recv(&mut chat).await?;
    assert_eq!(
        (
            w.payload.as_slice(),
            w.event_id.as_str(),
            w.channel.as_str()
        ),
        (&b"new message"[..], r.event_id.as_str(), "chat")
    );

    let r = publisher
        .publish(authed(publish(&mail_id, b"you've got mail"), &token))
        .await?
        .into_inner();
    assert_eq!(r.status(), DeliveryStatus::Delivered);
    assert_eq!(recv(&mut mail).await?.payload, b"you've got mail");
    assert!(chat.try_recv().is_err(), "chat got a mail event");

    // A second registration of the same name is refused by the SDK.
    assert!(client.channel("mail").register().await.is_err());

    // Batch: one good, one refused, results in order.
    let batch = PublishBatchRequest {
        events: vec![
            publish(&mail_id, b"1"),
            publish("not-a-channel", b"2"),
            publish(&chat_id, b"3"),
        ],
    };
    let results = publisher
        .publish_batch(authed(batch, &token))
        .await?
        .into_inner()
        .results;
    assert_eq!(results.len(), 3);
    assert_eq!(
        results[0].response.as_ref().map(|r| r.status()),
        Some(DeliveryStatus::Delivered)
    );
    assert_eq!(results[1].error_code, Code::InvalidArgument as i32);
    assert_eq!(
        results[2].response.as_ref().map(|r| r.status()),
        Some(DeliveryStatus::Delivered)
    );
    assert_eq!(recv(&mut mail).await?.payload, b"1");
    assert_eq!(recv(&mut chat).await?.payload, b"3");

    // Unregister: the channel is gone for publishers.
    client
        .unregister(&wakewire_sdk::ChannelId::new(mail_id.clone()))
        .await?;
    let err = loop {
        match publisher
            .publish(authed(publish(&mail_id, b"x"), &token))
            .await
        {
            Err(e) => break e,
            Ok(_) => tokio::task::yield_now().await,
        }
    };
    assert_eq!(err.code(), Code::NotFound);
    client.close().await;
    Ok(())
}

#[tokio::test]
async fn reconnect_after_relay_restart_keeps_channel_ids() -> anyhow::Result<()> {
    let mut relay = TestRelay::start().await?;
    let (status_cb, mut statuses) = status_sink();
    let client = relay
        .client("laptop")
        .on_status(status_cb)
        .connect()
        .await?;
    let (cb, mut wakes) = wake_sink();
    let id = client
        .channel("sync")
        .on_wake(cb)
        .register()
        .await?
        .into_string();

    relay.restart().await?;
    let lost = wait_status(&mut statuses, |s| matches!(s, Status::Disconnected { .. })).await?;
    assert!(
        matches!(
            lost,
            Status::Disconnected {
                retry_in: Some(_),
                ..
            }
        ),
        "{lost:?}"
    );
    let reset = wait_status(&mut statuses, |s| matches!(s, Status::Reset { .. })).await?;
    assert!(matches!(&reset, Status::Reset { channels } if channels == &["sync".to_string()]));

    // The old channel id still reaches the same callback.
    let token = relay.publisher_token(&[&id], &[]);
    let r = relay
        .publisher()
        .await?
        .publish(authed(publish(&id, b"after restart"), &token))
        .await?
        .into_inner();
    assert_eq!(r.status(), DeliveryStatus::Delivered);
    assert_eq!(recv(&mut wakes).await?.payload, b"after restart");
    assert!(client.info().is_some());

    // A graceful shutdown sends GoAway: the SDK reports it and comes back.
    relay.pin_ports();
    relay.shutdown(Duration::from_millis(50)).await;
    let gone = wait_status(&mut statuses, |s| matches!(s, Status::Disconnected { .. })).await?;
    assert!(
        matches!(&gone, Status::Disconnected { error: ConnectError::RelayGoingAway { reconnect_after, .. }, .. } if *reconnect_after == Duration::from_millis(50)),
        "{gone:?}"
    );
    relay.restart().await?;
    wait_status(&mut statuses, |s| matches!(s, Status::Reset { .. })).await?;
    client.close().await;
    Ok(())
}

/// A QUIC server on `addr` that is not a wakewire relay: it speaks only
/// ALPN `h3`, so every handshake fails with TLS alert 120
/// (no_application_protocol) before any certificate is sent. What a
/// device meets when something else answers on the relay's port for a
/// while (a restart half-done, a misrouted load balancer).
async fn impostor(addr: std::net::SocketAddr) -> anyhow::Result<quinn::Endpoint> {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.key_pair.serialize_der().into());
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![ck.cert.der().clone()], key)?;
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let config = quinn::ServerConfig::with_crypto(std::sync::Arc::new(quic));
    // The relay's socket closes just after it stops: retry the bind.
    let mut tries = 0;
    let ep = loop {
        match quinn::Endpoint::server(config.clone(), addr) {
            Ok(ep) => break ep,
            Err(_) if tries < 500 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let accepting = ep.clone();
    tokio::spawn(async move {
        while let Some(incoming) = accepting.accept().await {
            tokio::spawn(async move {
                if let Ok(connecting) = incoming.accept() {
                    let _ = connecting.await;
                }
            });
        }
    });
    Ok(ep)
}

#[tokio::test]
async fn a_connected_device_rides_out_failed_tls_handshakes_and_comes_back() -> anyhow::Result<()> {
    // A device that has been connected keeps reconnecting, with its
    // backoff, after a TLS handshake that fails for a reason other than
    // the certificate; a first connect with the same failure is final.
    let mut relay = TestRelay::start().await?;
    let (status_cb, mut statuses) = status_sink();
    let client = relay
        .client("tablet")
        .on_status(status_cb)
        .connect()
        .await?;
    client.channel("news").register().await?;
    let addr = relay.quic_addr();
    relay.pin_ports();
    relay.shutdown(Duration::from_millis(50)).await;
    let fake = impostor(addr).await?;
    let failed = wait_status(&mut statuses, |s| {
        matches!(
            s,
            Status::Disconnected {
                error: ConnectError::TlsHandshake(_),
                ..
            }
        )
    })
    .await?;
    assert!(
        matches!(&failed, Status::Disconnected { error: ConnectError::TlsHandshake(why), retry_in: Some(_) } if why.contains("alert 120")),
        "{failed:?}"
    );
    // A second failed handshake: still trying.
    let again = wait_status(&mut statuses, |s| {
        matches!(
            s,
            Status::Disconnected {
                error: ConnectError::TlsHandshake(_),
                ..
            }
        )
    })
    .await?;
    assert!(
        matches!(
            again,
            Status::Disconnected {
                retry_in: Some(_),
                ..
            }
        ),
        "{again:?}"
    );
    fake.close(0u32.into(), b"bye");
    fake.wait_idle().await;
    drop(fake);
    relay.restart().await?;
    wait_status(&mut statuses, |s| matches!(s, Status::Reset { .. })).await?;
    assert!(client.info().is_some(), "connected again");
    client.close().await;

    // The same failure on a first connect is reported at once.
    let addr = relay.quic_addr();
    let newcomer = relay.client("tablet-2");
    relay.shutdown(Duration::ZERO).await;
    let fake = impostor(addr).await?;
    let first = newcomer.connect().await;
    assert!(
        matches!(&first, Err(ConnectError::TlsHandshake(_))),
        "{first:?}"
    );
    fake.close(0u32.into(), b"bye");
    Ok(())
}

#[tokio::test]
async fn bad_device_credentials_are_refused_clearly() -> anyhow::Result<()> {
    let relay = TestRelay::start().await?;
    for token in [
        "garbage".to_string(),
        TestRelay::start().await?.device_token("d"),
    ] {
        let err = relay
            .client("d")
            .device_token(token)
            .connect()
            .await
            .unwrap_err();
        assert!(matches!(err, ConnectError::Unauthorized(_)), "{err}");
        assert!(!err.is_retryable());
    }
    // A publisher token is not a device token.
    let err = relay
        .client("d")
        .device_token(relay.publisher_token(&[], &["d"]))
        .connect()
        .await
        .unwrap_err();
    assert!(
        matches!(err, ConnectError::Unauthorized(ref m) if m.contains("publisher")),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn untrusted_certificate_and_bad_addresses_are_typed_errors() -> anyhow::Result<()> {
    let relay = TestRelay::start().await?;
    let other = TestRelay::start().await?;
    let err = relay
        .client("d")
        .trust_pem_file(other.relay().dev_cert_path().unwrap())
        .connect()
        .await;
    // trust_pem_file adds to the trusted set, so build one that trusts only the other relay.
    assert!(err.is_ok());
    let err = wakewire_sdk::ClientBuilder::new(relay.quic_addr().to_string())
        .server_name("localhost")
        .trust_pem_file(other.relay().dev_cert_path().unwrap())
        .device_token(relay.device_token("d"))
        .connect()
        .await
        .unwrap_err();
    assert!(
        matches!(err, ConnectError::TlsCertificateInvalid(_)),
        "{err}"
    );
    assert!(!err.is_retryable());

    let err = wakewire_sdk::ClientBuilder::new(relay.quic_addr().to_string())
        .server_name("not-the-relay.example")
        .trust_pem_file(relay.relay().dev_cert_path().unwrap())
        .device_token(relay.device_token("d"))
        .connect()
        .await
        .unwrap_err();
    assert!(
        matches!(err, ConnectError::TlsCertificateInvalid(_)),
        "{err}"
    );

    let err = wakewire_sdk::ClientBuilder::new("no-port-here")
        .trust_pem_file(relay.relay().dev_cert_path().unwrap())
        .device_token("t")
        .connect()
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectError::Dns { .. }), "{err}");
    assert!(err.is_retryable());
    Ok(())
}

#[tokio::test]
async fn publish_errors_map_to_grpc_codes() -> anyhow::Result<()> {
    let relay = TestRelay::start().await?;
    let client = relay.client("tablet").connect().await?;
    let id = client.channel("news").register().await?.into_string();
    let other = relay.client("other").connect().await?;
    let other_id = other.channel("news").register().await?.into_string();
    let mut p = relay.publisher().await?;
    let scoped = relay.publisher_token(&[&id], &[]);

    let e = p
        .publish(authed(publish(&other_id, b"x"), &scoped))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = p
        .publish(authed(publish(&id, &[0; 4097]), &scoped))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("4097"), "{}", e.message());
    let e = p
        .publish(tonic::Request::new(publish(&id, b"x")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = p
        .publish(authed(publish(&id, b"x"), "ww1.bogus.token"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = p
        .publish(authed(publish(&id, b"x"), &relay.device_token("tablet")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("device"), "{}", e.message());
    let e = p
        .publish(authed(publish("AAAAAAAAAAAAAAAAAAAAAA", b"x"), &scoped))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let mut req = publish(&id, b"x");
    req.ttl_s = Some(u32::MAX);
    assert_eq!(
        p.publish(authed(req, &scoped)).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let mut req = publish(&id, b"x");
    req.priority = 99;
    assert_eq!(
        p.publish(authed(req, &scoped)).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    // The device goes away: its channel still exists, the event is stored
    // for later (and with ttl 0, "now or never", reported not connected).
    client.close().await;
    let status = loop {
        let r = p
            .publish(authed(publish(&id, b"x"), &scoped))
            .await?
            .into_inner();
        if r.status() != DeliveryStatus::Delivered {
            break r.status();
        }
    };
    assert_eq!(status, DeliveryStatus::Queued);
    let mut now_only = publish(&id, b"x");
    now_only.ttl_s = Some(0);
    let r = p.publish(authed(now_only, &scoped)).await?.into_inner();
    assert_eq!(r.status(), DeliveryStatus::NotConnected);
    Ok(())
}

#[tokio::test]
async fn garbage_on_the_control_stream_closes_only_that_connection() -> anyhow::Result<()> {
    let relay = TestRelay::start().await?;
    let good = relay.client("good").connect().await?;
    let (cb, mut wakes) = wake_sink();
    let id = good
        .channel("c")
        .on_wake(cb)
        .register()
        .await?
        .into_string();

    let (_ep, conn) = raw_connection(&relay).await?;
    let (mut send, _recv) = conn.open_bi().await?;
    send.write_all(&[0x07, 0xde, 0xad, 0xbe, 0xef, 0xde, 0xad, 0xbe])
        .await?;
    let closed = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await?;
    match closed {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(
                c.error_code.into_inner(),
                u64::from(ErrorCode::ProtocolViolation.as_u32())
            );
            assert!(
                String::from_utf8_lossy(&c.reason).contains("bad frame"),
                "{c}"
            );
        }
        other => panic!("unexpected close: {other}"),
    }

    // An oversize frame announced by its length prefix: same code.
    let (_ep2, conn2) = raw_connection(&relay).await?;
    let (mut send2, _r2) = conn2.open_bi().await?;
    send2.write_all(&[0xff, 0xff, 0x7f]).await?;
    let closed = tokio::time::timeout(Duration::from_secs(10), conn2.closed()).await?;
    assert!(
        matches!(&closed, quinn::ConnectionError::ApplicationClosed(c) if c.error_code.into_inner() == 1),
        "{closed}"
    );

    // The well-behaved device is still connected and reachable.
    let token = relay.publisher_token(&[&id], &[]);
    let r = relay
        .publisher()
        .await?
        .publish(authed(publish(&id, b"still here"), &token))
        .await?
        .into_inner();
    assert_eq!(r.status(), DeliveryStatus::Delivered);
    assert_eq!(recv(&mut wakes).await?.payload, b"still here");
    Ok(())
}

#[tokio::test]
async fn a_second_connection_of_the_same_device_replaces_the_first() -> anyhow::Result<()> {
    let relay = TestRelay::start().await?;
    let (status_cb, mut statuses) = status_sink();
    let first = relay.client("dup").on_status(status_cb).connect().await?;
    let _id = first.channel("c").register().await?.into_string();
    let second = relay.client("dup").connect().await?;
    let s = wait_status(&mut statuses, |s| matches!(s, Status::Disconnected { .. })).await?;
    assert!(
        matches!(
            &s,
            Status::Disconnected {
                error: ConnectError::Replaced(_),
                retry_in: None
            }
        ),
        "{s:?}"
    );
    assert!(second.info().is_some());
    Ok(())
}

#[tokio::test]
async fn a_wake_stream_acks_when_the_app_says_so_and_redelivers_what_was_dropped(
) -> anyhow::Result<()> {
    let relay = TestRelay::start_with(|c| c.ack_wait = Duration::from_millis(200)).await?;
    let client = relay.client("reader").connect().await?;
    let (ch, mut wakes) = client.channel("inbox").subscribe().await?;
    let token = relay.publisher_token(&[ch.as_str()], &[]);
    let mut publisher = relay.publisher().await?;

    // The app takes its time: the publish is answered QUEUED (no ack within
    // the ack wait), and the SDK's task meanwhile goes on.
    let r = publisher
        .publish(authed(publish(ch.as_str(), b"slow"), &token))
        .await?
        .into_inner();
    assert_eq!(r.status(), DeliveryStatus::Queued);
    let w = tokio::time::timeout(Duration::from_secs(20), wakes.next())
        .await?
        .expect("stream open");
    assert_eq!(
        (w.event_id.as_str(), w.payload.as_slice()),
        (r.event_id.as_str(), &b"slow"[..])
    );
    assert!(w.ack());

    // A wake dropped without an ack is not acked: the next connection of
    // the device gets it again.
    let r2 = relay.publish_to(ch.as_str(), b"dropped").await?;
    let w2 = tokio::time::timeout(Duration::from_secs(20), wakes.next())
        .await?
        .expect("stream open");
    assert_eq!(w2.event_id, r2.event_id);
    drop(w2);
    client.close().await;
    assert!(client.is_closed());
    assert!(wakes.next().await.is_none(), "stream ended with the client");

    // Control calls on a closed client say so.
    assert_eq!(client.set_standby(true), Err(wakewire_sdk::ClientClosed));
    assert_eq!(client.decrease_keepalive(), Err(wakewire_sdk::ClientClosed));
    assert_eq!(client.network_changed("x"), Err(wakewire_sdk::ClientClosed));

    let again = relay.client("reader").connect().await?;
    let (_, mut wakes) = again.channel("inbox").subscribe().await?;
    let w3 = tokio::time::timeout(Duration::from_secs(20), wakes.next())
        .await?
        .expect("stream open");
    assert_eq!(w3.event_id, r2.event_id, "the dropped wake came back");
    assert!(w3.ack());
    again.close().await;
    Ok(())
}
