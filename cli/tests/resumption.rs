//! TLS resumption by stateless tickets, with a real relay process: a device
//! that connected before a `kill -9` resumes its TLS session with the
//! restarted relay (the ticket key is in the data directory). The 0-RTT of
//! `tls_resumption = "cache"` is tested in server/tests/keepalive.rs.

use std::path::Path;
use std::time::Duration;

use wakewire_api::pb::{DeliveryStatus, PublishRequest};
use wakewire_sdk::{ClientBuilder, KeepalivePolicy, Status};
use wakewire_server::data_dir::{DataDir, Keys, DEV_CERT_FILE};
use wakewire_server::metrics::TLS_TICKETS_OPENED;
use wakewire_test_support::metrics::scrape;
use wakewire_test_support::process::RelayProcess;
use wakewire_test_support::{authed, recv, status_sink, unix_secs, wait_status, wake_sink};

const BIN: &str = env!("CARGO_BIN_EXE_wakewire-relay");

fn device(data: &Path, keys: &Keys, relay: &RelayProcess) -> ClientBuilder {
    ClientBuilder::new(relay.quic.to_string())
        .server_name("localhost")
        .trust_pem_file(data.join(DEV_CERT_FILE))
        .device_token(keys.device_token("ticket-dev", Duration::from_secs(3600), unix_secs()))
        .keepalive(KeepalivePolicy::Fixed(Duration::from_millis(300)))
        .keepalive_timeout(Duration::from_millis(500))
}

/// The relay's count of opened tickets.
async fn tickets_opened(port: u16) -> anyhow::Result<u64> {
    let body = scrape(port).await?;
    Ok(body
        .lines()
        .find_map(|l| l.strip_prefix(TLS_TICKETS_OPENED)?.trim().parse().ok())
        .unwrap_or(0))
}

#[tokio::test]
async fn a_device_resumes_its_tls_session_after_the_relay_is_killed() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let any = "127.0.0.1:0".parse()?;
    let port = wakewire_test_support::free_port()?;
    let metrics = format!("127.0.0.1:{port}");
    let mut relay = RelayProcess::start(
        Path::new(BIN),
        &data,
        any,
        any,
        &["--metrics-listen", &metrics],
    )
    .await?;
    let keys = DataDir::open(&data)?.keys()?;
    let (status_cb, mut statuses) = status_sink();
    let (cb, mut wakes) = wake_sink();
    let client = device(&data, &keys, &relay)
        .on_status(status_cb)
        .connect()
        .await?;
    assert!(!client.info().expect("connected").zero_rtt);
    let channel = client
        .channel("inbox")
        .on_wake(cb)
        .register()
        .await?
        .into_string();
    assert_eq!(
        tickets_opened(port).await?,
        0,
        "a first connection has no ticket"
    );

    relay.kill().await?;
    wait_status(&mut statuses, |s| matches!(s, Status::Disconnected { .. })).await?;
    let relay = relay.restart().await?;
    let connected = wait_status(&mut statuses, |s| matches!(s, Status::Connected(_))).await?;
    assert!(
        matches!(&connected, Status::Connected(i) if !i.zero_rtt),
        "tickets carry no 0-RTT: {connected:?}"
    );
    assert!(
        tickets_opened(port).await? >= 1,
        "the restarted relay opened the device's ticket"
    );

    // And the resumed connection carries wakes.
    let token = keys.publisher_token(
        std::slice::from_ref(&channel),
        &[],
        Duration::from_secs(3600),
        unix_secs(),
    );
    let mut p = wakewire_api::pb::publisher_client::PublisherClient::connect(format!(
        "http://{}",
        relay.grpc
    ))
    .await?;
    let req = PublishRequest {
        channel_id: channel,
        payload: b"after the crash".to_vec(),
        ..Default::default()
    };
    // Delivered at once, or queued until the device has re-registered.
    let r = p.publish(authed(req, &token)).await?.into_inner();
    assert!(
        matches!(
            r.status(),
            DeliveryStatus::Delivered | DeliveryStatus::Queued
        ),
        "{r:?}"
    );
    assert_eq!(recv(&mut wakes).await?.payload, b"after the crash");
    client.close().await;
    Ok(())
}
