//! `PublishStream` with the real relay and SDK: many events on one HTTP/2
//! stream, each answered with its sequence number; bad events answered in
//! band while the stream goes on; the rate quota per event; a revoked
//! credential ends the stream; no credential, no stream.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use wakewire_api::pb::{
    DeliveryStatus, PublishRequest, PublishStreamRequest, PublishStreamResponse,
};
use wakewire_test_support::{authed, recv, wake_sink, TestRelay};

fn event(channel_id: &str, payload: &[u8]) -> PublishRequest {
    PublishRequest {
        channel_id: channel_id.into(),
        payload: payload.to_vec(),
        ..Default::default()
    }
}

/// Opens a stream with `token`; returns its sender and its answers.
async fn open(
    relay: &TestRelay,
    token: &str,
) -> anyhow::Result<(
    mpsc::Sender<PublishStreamRequest>,
    tonic::Streaming<PublishStreamResponse>,
)> {
    let (tx, rx) = mpsc::channel(64);
    let answers = relay
        .publisher()
        .await?
        .publish_stream(authed(ReceiverStream::new(rx), token))
        .await?
        .into_inner();
    Ok((tx, answers))
}

/// A relay whose publishers get a burst of 2 events, then 1 per second; a
/// connected device with one channel `ch`; a stream open to publish to it.
struct Limited {
    _relay: TestRelay,
    client: wakewire_sdk::Client,
    ch: String,
    tx: mpsc::Sender<PublishStreamRequest>,
    answers: tonic::Streaming<PublishStreamResponse>,
}

async fn limited() -> anyhow::Result<Limited> {
    let relay = TestRelay::start_with(|c| {
        c.quotas.rate_per_sec = 1;
        c.quotas.burst = 2;
    })
    .await?;
    let client = relay.client("limited").connect().await?;
    let ch = client.channel("c").register().await?.into_string();
    let token = relay.publisher_token(&[ch.as_str()], &[]);
    let (tx, answers) = open(&relay, &token).await?;
    Ok(Limited {
        _relay: relay,
        client,
        ch,
        tx,
        answers,
    })
}

async fn next(
    answers: &mut tonic::Streaming<PublishStreamResponse>,
) -> anyhow::Result<PublishStreamResponse> {
    tokio::time::timeout(Duration::from_secs(10), answers.message())
        .await??
        .ok_or_else(|| anyhow::anyhow!("the answer stream ended"))
}

#[tokio::test]
async fn a_stream_answers_each_event_by_its_sequence_number_and_bad_ones_in_band(
) -> anyhow::Result<()> {
    let relay = TestRelay::start().await?;
    let client = relay.client("streamed").connect().await?;
    let (cb, mut wakes) = wake_sink();
    let ch = client.channel("c").on_wake(cb).register().await?;
    let token = relay.publisher_token(&[ch.as_str()], &[]);
    let (tx, mut answers) = open(&relay, &token).await?;

    for seq in 10..13u64 {
        let payload = format!("wake {seq}");
        tx.send(PublishStreamRequest {
            seq,
            event: Some(event(ch.as_str(), payload.as_bytes())),
        })
        .await?;
    }
    // An unknown channel, a malformed channel id, no event at all.
    tx.send(PublishStreamRequest {
        seq: 13,
        event: Some(event("AAAAAAAAAAAAAAAAAAAAAA", b"x")),
    })
    .await?;
    tx.send(PublishStreamRequest {
        seq: 14,
        event: Some(event("not a channel id", b"x")),
    })
    .await?;
    tx.send(PublishStreamRequest {
        seq: 15,
        event: None,
    })
    .await?;
    let mut got = HashMap::new();
    for _ in 0..6 {
        let a = next(&mut answers).await?;
        assert!(got.insert(a.seq, a.result.expect("a result")).is_none());
    }
    for seq in 10..13u64 {
        let r = &got[&seq];
        assert_eq!(r.error_code, 0, "{r:?}");
        let resp = r.response.as_ref().expect("accepted");
        assert_eq!(resp.status(), DeliveryStatus::Delivered, "{resp:?}");
    }
    let mut payloads: Vec<Vec<u8>> = Vec::new();
    for _ in 0..3 {
        payloads.push(recv(&mut wakes).await?.payload);
    }
    payloads.sort();
    assert_eq!(
        payloads,
        vec![
            b"wake 10".to_vec(),
            b"wake 11".to_vec(),
            b"wake 12".to_vec()
        ]
    );
    for (seq, code) in [
        (13, Code::NotFound),
        (14, Code::InvalidArgument),
        (15, Code::InvalidArgument),
    ] {
        let r = &got[&seq];
        assert_eq!(r.error_code, code as i32, "seq {seq}: {r:?}");
        assert!(r.response.is_none() && !r.error_message.is_empty(), "{r:?}");
    }

    // The stream goes on after bad events.
    tx.send(PublishStreamRequest {
        seq: 16,
        event: Some(event(ch.as_str(), b"after")),
    })
    .await?;
    let a = next(&mut answers).await?;
    assert_eq!(a.seq, 16);
    assert_eq!(recv(&mut wakes).await?.payload, b"after");
    // Closing the sending side ends the answers once all are out.
    drop(tx);
    assert!(answers.message().await?.is_none());
    client.close().await;
    Ok(())
}

#[tokio::test]
async fn each_streamed_event_is_charged_to_the_rate_quota() -> anyhow::Result<()> {
    let Limited {
        _relay,
        client,
        ch,
        tx,
        mut answers,
    } = limited().await?;
    for seq in 0..5u64 {
        tx.send(PublishStreamRequest {
            seq,
            event: Some(event(ch.as_str(), b"x")),
        })
        .await?;
    }
    let mut limited = 0;
    for _ in 0..5 {
        let r = next(&mut answers).await?.result.expect("a result");
        if r.error_code == Code::ResourceExhausted as i32 {
            assert!(r.retry_after_ms > 0, "{r:?}");
            limited += 1;
        }
    }
    assert!(
        limited >= 2,
        "a burst of 2 at 1/s let {} of 5 through",
        5 - limited
    );
    client.close().await;
    Ok(())
}

#[tokio::test]
async fn a_request_without_an_event_is_not_charged_to_the_quota() -> anyhow::Result<()> {
    let Limited {
        _relay,
        client,
        ch,
        tx,
        mut answers,
    } = limited().await?;
    // Two empty requests, then two events: the burst of 2 is still whole.
    for seq in 0..4u64 {
        let event = (seq >= 2).then(|| event(ch.as_str(), b"x"));
        tx.send(PublishStreamRequest { seq, event }).await?;
    }
    let mut codes = std::collections::BTreeMap::new();
    for _ in 0..4 {
        let a = next(&mut answers).await?;
        codes.insert(a.seq, a.result.expect("a result").error_code);
    }
    let invalid = Code::InvalidArgument as i32;
    assert_eq!(
        codes.values().copied().collect::<Vec<_>>(),
        [invalid, invalid, 0, 0],
        "{codes:?}"
    );
    client.close().await;
    Ok(())
}

#[tokio::test]
async fn a_revoked_credential_ends_the_stream_and_none_opens_none() -> anyhow::Result<()> {
    let relay = TestRelay::start().await?;
    let client = relay.client("revoked").connect().await?;
    let ch = client.channel("c").register().await?;
    let token = relay.publisher_token(&[ch.as_str()], &[]);

    // No credential: no stream.
    let (_tx, rx) = mpsc::channel::<PublishStreamRequest>(1);
    let refused = relay
        .publisher()
        .await?
        .publish_stream(ReceiverStream::new(rx))
        .await
        .expect_err("no credential");
    assert_eq!(refused.code(), Code::Unauthenticated);

    let (tx, mut answers) = open(&relay, &token).await?;
    tx.send(PublishStreamRequest {
        seq: 0,
        event: Some(event(ch.as_str(), b"before")),
    })
    .await?;
    assert_eq!(
        next(&mut answers)
            .await?
            .result
            .expect("a result")
            .error_code,
        0
    );

    let claims = relay.relay().keys().verifier.verify(
        &token,
        wakewire_proto::token::TokenKind::Publisher,
        0,
    )?;
    wakewire_server::data_dir::DataDir::open(&relay.config.data_dir)?
        .revoke(&claims.jti.expect("token id"))?;
    // The relay re-reads the list within a second: publish until the
    // stream ends (paced, bounded).
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        let mut pace = tokio::time::interval(Duration::from_millis(50));
        for seq in 1u64.. {
            pace.tick().await;
            if tx
                .send(PublishStreamRequest {
                    seq,
                    event: Some(event(ch.as_str(), b"x")),
                })
                .await
                .is_err()
            {
                return None;
            }
            match answers.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(status) => return Some(status),
            }
        }
        None
    })
    .await?
    .expect("the stream ended with a status");
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
    assert!(ended.message().contains("revoked"), "{}", ended.message());
    client.close().await;
    Ok(())
}
