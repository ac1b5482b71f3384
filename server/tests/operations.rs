//! What an operator relies on: TLS on the publisher API, certificates
//! renewed without dropping devices, graceful drain with readiness first.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use wakewire_api::pb::{publisher_client::PublisherClient, DeliveryStatus, PublishRequest};
use wakewire_server::config::{GrpcTls, TlsSource};
use wakewire_test_support::{authed, recv, wake_sink, TestRelay};

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn new_ca() -> anyhow::Result<Ca> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let cert = p.self_signed(&key)?;
    Ok(Ca { cert, key })
}

/// A `localhost` server certificate signed by `ca`, written to
/// `<dir>/<name>.pem` and `.key`.
fn server_cert(ca: &Ca, dir: &Path, name: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
    let key = KeyPair::generate()?;
    let p = CertificateParams::new(vec!["localhost".to_owned()])?;
    let cert = p.signed_by(&key, &ca.cert, &ca.key)?;
    let (c, k) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&c, cert.pem())?;
    std::fs::write(&k, key.serialize_pem())?;
    Ok((c, k))
}

async fn tls_publisher(
    relay: &TestRelay,
    ca_pem: &[u8],
) -> anyhow::Result<PublisherClient<tonic::transport::Channel>> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    let ch = Endpoint::from_shared(format!("https://{}", relay.relay().grpc_addr()))?
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(PublisherClient::new(ch))
}

#[tokio::test]
async fn the_publisher_api_speaks_tls_and_refuses_plaintext() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let relay = TestRelay::start_with(|c| c.grpc_tls = Some(GrpcTls::DeviceCertificate)).await?;
    let ca = std::fs::read(relay.relay().dev_cert_path().expect("dev"))?;
    let (cb, mut wakes) = wake_sink();
    let client = relay.client("tls").connect().await?;
    let ch = client
        .channel("c")
        .on_wake(cb)
        .register()
        .await?
        .into_string();
    let token = relay.publisher_token(&[&ch], &[]);
    let r = tls_publisher(&relay, &ca)
        .await?
        .publish(authed(
            PublishRequest {
                channel_id: ch.clone(),
                payload: b"over tls".to_vec(),
                ..Default::default()
            },
            &token,
        ))
        .await?
        .into_inner();
    assert_eq!(r.status(), DeliveryStatus::Delivered);
    assert_eq!(recv(&mut wakes).await?.payload, b"over tls");
    // A plaintext client gets nowhere.
    let plain = relay.publisher().await;
    let refused = match plain {
        Err(_) => true,
        Ok(mut p) => p
            .publish(authed(
                PublishRequest {
                    channel_id: ch,
                    ..Default::default()
                },
                &token,
            ))
            .await
            .is_err(),
    };
    assert!(refused, "plaintext accepted on a TLS port");
    client.close().await;
    Ok(())
}

#[tokio::test]
async fn a_renewed_certificate_serves_new_handshakes_and_connected_devices_stay(
) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir()?;
    let ca = new_ca()?;
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.cert.pem())?;
    let (cert, key) = server_cert(&ca, dir.path(), "live")?;
    let (c, k) = (cert.clone(), key.clone());
    let relay = TestRelay::start_with(move |cfg| {
        cfg.tls = TlsSource::Files { cert: c, key: k };
        cfg.grpc_tls = Some(GrpcTls::DeviceCertificate);
    })
    .await?;
    let first = relay.relay().device_certificate();
    let (cb, mut wakes) = wake_sink();
    let device = wakewire_sdk::ClientBuilder::new(relay.quic_addr().to_string())
        .server_name("localhost")
        .trust_pem_file(&ca_file)
        .device_token(relay.device_token("old-timer"))
        .connect()
        .await?;
    let ch = device.channel("c").on_wake(cb).register().await?;
    let session = device.info().expect("connected").session_id;

    // certbot renews: new files, then a reload (SIGHUP or the file watch).
    let (new_cert, new_key) = server_cert(&ca, dir.path(), "renewed")?;
    std::fs::rename(&new_cert, &cert)?;
    std::fs::rename(&new_key, &key)?;
    relay.relay().reload_certificates();
    let renewed = relay.relay().device_certificate();
    assert_ne!(renewed, first);
    // A new device connection is served the renewed certificate...
    let (_ep, conn) = {
        let cfg = wakewire_sdk::quic_client_config(&ca_file)?;
        let ep = quinn::Endpoint::client(([127, 0, 0, 1], 0).into())?;
        let conn = ep
            .connect_with(cfg, relay.quic_addr(), "localhost")?
            .await?;
        (ep, conn)
    };
    let seen = conn
        .peer_identity()
        .and_then(|i| {
            i.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .expect("server certificate");
    assert_eq!(seen[0], renewed[0]);
    // ...and so is a new publisher connection.
    let ca_pem = std::fs::read(&ca_file)?;
    let mut p = tls_publisher(&relay, &ca_pem).await?;
    // The device connected before the renewal is still on its connection
    // and still gets its wakes.
    let token = relay.publisher_token(&[ch.as_str()], &[]);
    p.publish(authed(
        PublishRequest {
            channel_id: ch.into_string(),
            payload: b"after renewal".to_vec(),
            ..Default::default()
        },
        &token,
    ))
    .await?;
    assert_eq!(recv(&mut wakes).await?.payload, b"after renewal");
    assert_eq!(
        device.info().expect("connected").session_id,
        session,
        "the device reconnected"
    );
    device.close().await;
    Ok(())
}

#[tokio::test]
async fn a_plaintext_publisher_api_beyond_loopback_is_refused() -> anyhow::Result<()> {
    let mut s = wakewire_server::Settings {
        grpc_listen: "0.0.0.0:50051".parse()?,
        ..Default::default()
    };
    let e = s.validate().unwrap_err().to_string();
    assert!(
        e.contains("grpc_listen") && e.contains("in the clear"),
        "{e}"
    );
    s.grpc_insecure_plaintext_on_any_address = true;
    s.validate()?;
    s.grpc_insecure_plaintext_on_any_address = false;
    s.grpc_tls_use_device_certificate = true;
    s.validate()?;
    Ok(())
}

#[tokio::test]
async fn draining_reports_not_serving_first_then_sends_devices_away() -> anyhow::Result<()> {
    let mut relay = TestRelay::start_with(|c| {
        c.drain_delay = Duration::from_millis(500);
        c.connection.session.hello_timeout = Duration::from_secs(6);
    })
    .await?;
    let health_addr = relay.relay().health_addr().expect("health endpoint");
    let (cb, mut statuses) = wakewire_test_support::status_sink();
    let client = relay
        .client("drained")
        .on_status(cb)
        .reconnect_backoff(Duration::from_secs(30), Duration::from_secs(60))
        .connect()
        .await?;
    let health = |addr: std::net::SocketAddr| async move {
        let ch = Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await?;
        let r = tonic_health::pb::health_client::HealthClient::new(ch)
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await?;
        anyhow::Ok(r.into_inner().status())
    };
    assert_eq!(
        health(health_addr).await?,
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    // A connection that has sent only a frame's length prefix holds the
    // drain open (until its Hello timeout), so a device arriving during the
    // drain can be seen being refused.
    let (_raw_ep, raw) = wakewire_test_support::raw_connection(&relay).await?;
    let (mut raw_send, _raw_recv) = raw.open_bi().await?;
    raw_send.write_all(&[0x10]).await?;
    let quic_addr = relay.quic_addr();
    let late = relay
        .client("late")
        .transport(wakewire_sdk::Transport::Quic);
    let handle = relay.handle.take().expect("running");
    let drain = tokio::spawn(handle.shutdown(Duration::from_millis(10)));
    // NOT_SERVING while the device is still connected (the drain delay).
    let mut not_serving = false;
    for _ in 0..100 {
        match health(health_addr).await {
            Ok(tonic_health::pb::health_check_response::ServingStatus::NotServing) => {
                not_serving = true;
                break;
            }
            _ => tokio::task::yield_now().await,
        }
    }
    assert!(not_serving, "health never said NOT_SERVING");
    assert!(
        client.info().is_some(),
        "devices were sent away before readiness changed"
    );
    // Then the device is told to go.
    let gone = wakewire_test_support::wait_status(&mut statuses, |s| {
        matches!(
            s,
            wakewire_sdk::Status::Disconnected {
                error: wakewire_sdk::ConnectError::RelayGoingAway { .. },
                ..
            }
        )
    })
    .await?;
    assert!(matches!(gone, wakewire_sdk::Status::Disconnected { .. }));
    // A device arriving while the relay drains is refused at once, not left
    // to wait out its connect timeout.
    assert!(
        !drain.is_finished(),
        "the half-open connection holds the drain"
    );
    match late.connect().await {
        Err(wakewire_sdk::ConnectError::Refused(_)) => {}
        other => panic!(
            "a device connecting to {quic_addr} during a drain: {:?}",
            other.map(|_| ())
        ),
    }
    drain.await?;
    client.close().await;
    Ok(())
}
