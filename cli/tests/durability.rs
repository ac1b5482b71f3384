//! Crash safety with a real process: publish to an offline channel while
//! `kill -9` hits the relay at random points, restart it, bring the device
//! back: every event whose Publish returned OK is delivered exactly once,
//! and no event is delivered twice.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use tonic::transport::Channel;
use wakewire_api::pb::publisher_client::PublisherClient;
use wakewire_api::pb::{DeliveryStatus, PublishRequest};
use wakewire_sdk::ClientBuilder;
use wakewire_server::data_dir::{DataDir, Keys, DEV_CERT_FILE};
use wakewire_test_support::process::RelayProcess;
use wakewire_test_support::{authed, recv, unix_secs, wake_sink};

const BIN: &str = env!("CARGO_BIN_EXE_wakewire-relay");

fn device(data: &Path, keys: &Keys, relay: &RelayProcess) -> ClientBuilder {
    ClientBuilder::new(relay.quic.to_string())
        .server_name("localhost")
        .trust_pem_file(data.join(DEV_CERT_FILE))
        .device_token(keys.device_token("crash-dev", Duration::from_secs(3600), unix_secs()))
}

async fn publisher(relay: &RelayProcess) -> anyhow::Result<PublisherClient<Channel>> {
    let ch = Channel::from_shared(format!("http://{}", relay.grpc))?
        .timeout(Duration::from_secs(5))
        .connect()
        .await?;
    Ok(PublisherClient::new(ch))
}

#[tokio::test]
async fn every_accepted_event_survives_kill_9_and_arrives_exactly_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let any = "127.0.0.1:0".parse()?;
    let mut relay = RelayProcess::start(
        Path::new(BIN),
        &data,
        any,
        any,
        &["--queue-limit", "100000"],
    )
    .await?;
    let keys = DataDir::open(&data)?.keys()?;

    // The device registers its channel, then goes offline.
    let client = device(&data, &keys, &relay).connect().await?;
    let channel = client.channel("inbox").register().await?.into_string();
    client.close().await;
    let token = keys.publisher_token(
        std::slice::from_ref(&channel),
        &[],
        Duration::from_secs(3600),
        unix_secs(),
    );

    let mut accepted: Vec<String> = vec![];
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = 0u32;
    for round in 0..3 {
        // Publish continuously from several tasks; kill -9 after a random
        // 30-230 ms.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let kill_after = Duration::from_millis(30 + rng % 200);
        let mut tasks = tokio::task::JoinSet::new();
        for t in 0..4 {
            let mut p = publisher(&relay).await?;
            let (channel, token) = (channel.clone(), token.clone());
            let base = next + t * 100_000;
            tasks.spawn(async move {
                let mut ok = vec![];
                for i in 0..100_000u32 {
                    let req = PublishRequest {
                        channel_id: channel.clone(),
                        payload: format!("r{round}-{}", base + i).into_bytes(),
                        ..Default::default()
                    };
                    match p.publish(authed(req, &token)).await {
                        Ok(r) => {
                            let r = r.into_inner();
                            assert_eq!(r.status(), DeliveryStatus::Queued, "device is offline");
                            ok.push(r.event_id);
                        }
                        Err(_) => break, // the relay is gone
                    }
                }
                ok
            });
        }
        next += 400_000;
        tokio::time::sleep(kill_after).await;
        relay.kill().await?;
        while let Some(r) = tasks.join_next().await {
            accepted.extend(r?);
        }
        relay = relay.restart().await?;
    }
    assert!(
        !accepted.is_empty(),
        "no publish succeeded before the kills"
    );

    // The device comes back and receives the queue (the queue limit is
    // raised above what the rounds can publish; an event dropped for
    // queue_full would still be reported, not lost).
    let (cb, mut wakes) = wake_sink();
    let client = device(&data, &keys, &relay).connect().await?;
    client
        .channel("inbox")
        .on_wake(cb)
        .register()
        .await?
        .into_string();
    let mut p = publisher(&relay).await?;
    let marker = p
        .publish(authed(
            PublishRequest {
                channel_id: channel.clone(),
                payload: b"marker".to_vec(),
                ..Default::default()
            },
            &token,
        ))
        .await?
        .into_inner()
        .event_id;
    let mut seen: HashMap<String, usize> = HashMap::new();
    loop {
        let w = recv(&mut wakes).await?;
        *seen.entry(w.event_id.clone()).or_default() += 1;
        if w.event_id == marker {
            break;
        }
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered twice: {twice:?}");
    let accepted_set: HashSet<_> = accepted.iter().cloned().collect();
    let mut missing = vec![];
    for id in &accepted_set {
        if seen.contains_key(id) {
            continue;
        }
        let status = p
            .get_event(authed(
                wakewire_api::pb::GetEventRequest {
                    event_id: id.clone(),
                },
                &token,
            ))
            .await?
            .into_inner();
        if !(status.state() == wakewire_api::pb::EventState::Dropped
            && status.reason == "queue_full")
        {
            missing.push((id.clone(), status));
        }
    }
    assert!(
        missing.is_empty(),
        "{} accepted events lost: {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    eprintln!(
        "accepted {} events over 3 kill -9 rounds; delivered {} once each (more than accepted: committed events whose answer the kill cut off)",
        accepted_set.len(),
        seen.len() - 1
    );
    relay.kill().await?;
    Ok(())
}
