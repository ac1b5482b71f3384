//! The publisher side: gRPC publishes at a fixed offered rate (open loop:
//! each publish has an intended send time, latency is measured from it, so
//! a slow relay cannot hide behind fewer requests), or as fast as a fixed
//! number of concurrent publishers allow (optionally with `PublishBatch`).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use wakewire_api::pb::{
    publisher_client::PublisherClient, DeliveryStatus, PublishBatchRequest, PublishBatchResult,
    PublishRequest, PublishResponse, PublishStreamRequest,
};

/// Results of a publish phase.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PublishStats {
    /// Publishes issued.
    pub issued: u64,
    /// Answers by status (or gRPC error code).
    pub statuses: BTreeMap<String, u64>,
    /// Publishes that could not start because the outstanding cap was hit.
    pub skipped: u64,
    /// Phase duration, s.
    pub elapsed_s: f64,
    /// Answered publishes per second.
    pub per_s: f64,
}

/// Which publisher call single publishes use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum PublishApi {
    /// One unary `Publish` per event (one HTTP/2 stream each).
    Unary,
    /// One long-lived `PublishStream` per connection, answers matched by
    /// sequence number.
    Stream,
}

/// One `PublishStream` per gRPC connection; answers find their caller by
/// sequence number.
struct Lanes {
    lanes: Vec<Lane>,
    seq: AtomicU64,
}

/// Longest wait for one streamed publish's answer: past it the publish
/// counts as "error no answer", so a lost answer cannot stall a run.
const ANSWER_WAIT: Duration = Duration::from_secs(30);

/// One stream: its callers waiting for answers, and why it ended once it
/// has (then nobody is left waiting and nobody waits again).
struct Lane {
    sender: mpsc::Sender<PublishStreamRequest>,
    state: Arc<Mutex<LaneState>>,
}

#[derive(Default)]
struct LaneState {
    waiting: HashMap<u64, oneshot::Sender<PublishBatchResult>>,
    ended: Option<String>,
}

/// `msg` with the publisher credential as its bearer token.
fn bearer<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Ok(v) = format!("Bearer {token}").parse() {
        req.metadata_mut().insert("authorization", v);
    }
    req
}

/// Publishes to a set of channels over a few gRPC connections.
#[derive(Clone)]
pub struct Publisher {
    lanes: Option<Arc<Lanes>>,
    clients: Vec<PublisherClient<Channel>>,
    token: Arc<str>,
    ids: Arc<[String]>,
    epoch: Instant,
    statuses: Arc<Mutex<BTreeMap<String, u64>>>,
}

impl Publisher {
    /// Opens `connections` gRPC connections to `grpc`.
    pub async fn connect(
        grpc: std::net::SocketAddr,
        connections: usize,
        token: &str,
        ids: Vec<String>,
        epoch: Instant,
        api: PublishApi,
    ) -> anyhow::Result<Self> {
        let mut clients = Vec::new();
        for _ in 0..connections.max(1) {
            let ch = Channel::from_shared(format!("http://{grpc}"))?
                .connect()
                .await?;
            clients.push(PublisherClient::new(ch));
        }
        let lanes = match api {
            PublishApi::Unary => None,
            PublishApi::Stream => Some(Arc::new(Self::open_lanes(&clients, token).await?)),
        };
        Ok(Self {
            lanes,
            clients,
            token: token.into(),
            ids: ids.into(),
            epoch,
            statuses: Arc::default(),
        })
    }

    async fn open_lanes(
        clients: &[PublisherClient<Channel>],
        token: &str,
    ) -> anyhow::Result<Lanes> {
        let mut lanes = Vec::new();
        for client in clients {
            let (tx, rx) = mpsc::channel(1024);
            let req = bearer(ReceiverStream::new(rx), token);
            let mut answers = client.clone().publish_stream(req).await?.into_inner();
            let state: Arc<Mutex<LaneState>> = Arc::default();
            let lane_state = state.clone();
            tokio::spawn(async move {
                let why = loop {
                    match answers.message().await {
                        Ok(Some(a)) => {
                            let w = lane_state
                                .lock()
                                .ok()
                                .and_then(|mut l| l.waiting.remove(&a.seq));
                            if let Some(w) = w {
                                let _ = w.send(a.result.unwrap_or_default());
                            }
                        }
                        Ok(None) => break "error stream ended by the relay".to_owned(),
                        Err(s) => {
                            break format!("error stream ended: {:?} {}", s.code(), s.message())
                        }
                    }
                };
                // Callers still waiting, and later ones, see why.
                if let Ok(mut l) = lane_state.lock() {
                    l.waiting.clear();
                    l.ended = Some(why);
                }
            });
            lanes.push(Lane { sender: tx, state });
        }
        Ok(Lanes {
            lanes,
            seq: AtomicU64::new(0),
        })
    }

    /// Publishes on stream lane `i` and waits for its answer.
    async fn publish_streamed(&self, lanes: &Lanes, i: usize, req: PublishRequest) {
        let seq = lanes.seq.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let lane = &lanes.lanes[i % lanes.lanes.len()];
        let ended = lane.state.lock().ok().and_then(|mut l| match &l.ended {
            Some(why) => Some(why.clone()),
            None => {
                l.waiting.insert(seq, tx);
                None
            }
        });
        if let Some(why) = ended {
            self.count(why, 1);
            return;
        }
        let sent = lane
            .sender
            .send(PublishStreamRequest {
                seq,
                event: Some(req),
            })
            .await;
        if sent.is_err() {
            self.count("error stream closed".into(), 1);
            return;
        }
        match tokio::time::timeout(ANSWER_WAIT, rx).await {
            Ok(Ok(r)) => match &r.response {
                Some(resp) => self.count_response(resp),
                None => self.count(format!("error {}", r.error_code), 1),
            },
            Ok(Err(_)) => {
                let why = lane.state.lock().ok().and_then(|l| l.ended.clone());
                self.count(why.unwrap_or_else(|| "error stream ended".into()), 1);
            }
            Err(_) => {
                if let Ok(mut l) = lane.state.lock() {
                    l.waiting.remove(&seq);
                }
                self.count("error no answer".into(), 1);
            }
        }
    }

    fn request(&self, i: usize, intended: Instant) -> PublishRequest {
        let mut payload = vec![0u8; 64];
        let nanos = u64::try_from(intended.saturating_duration_since(self.epoch).as_nanos())
            .unwrap_or(u64::MAX);
        payload[..8].copy_from_slice(&nanos.to_le_bytes());
        PublishRequest {
            channel_id: self.ids[i % self.ids.len()].clone(),
            payload,
            ..Default::default()
        }
    }

    fn authed<T>(&self, msg: T) -> tonic::Request<T> {
        bearer(msg, &self.token)
    }

    fn count(&self, key: String, n: u64) {
        if let Ok(mut m) = self.statuses.lock() {
            *m.entry(key).or_default() += n;
        }
    }

    fn count_response(&self, r: &PublishResponse) {
        self.count(
            match r.status() {
                DeliveryStatus::Delivered => "delivered".to_owned(),
                other => other.as_str_name().to_lowercase(),
            },
            1,
        );
    }

    async fn publish_one(&self, i: usize, intended: Instant) {
        if let Some(lanes) = &self.lanes {
            return self
                .publish_streamed(lanes, i, self.request(i, intended))
                .await;
        }
        let mut client = self.clients[i % self.clients.len()].clone();
        match client.publish(self.authed(self.request(i, intended))).await {
            Ok(r) => self.count_response(&r.into_inner()),
            Err(s) => self.count(format!("error {:?}", s.code()), 1),
        }
    }

    async fn publish_batch(&self, first: usize, n: usize) -> u64 {
        let mut client = self.clients[first % self.clients.len()].clone();
        let now = Instant::now();
        let events = (first..first + n).map(|i| self.request(i, now)).collect();
        match client
            .publish_batch(self.authed(PublishBatchRequest { events }))
            .await
        {
            Ok(r) => {
                let results = r.into_inner().results;
                for res in &results {
                    match &res.response {
                        Some(resp) => self.count_response(resp),
                        None => self.count(format!("error {}", res.error_code), 1),
                    }
                }
                results.len() as u64
            }
            Err(s) => {
                self.count(format!("error {:?}", s.code()), n as u64);
                n as u64
            }
        }
    }

    fn finish(&self, issued: u64, skipped: u64, start: Instant) -> PublishStats {
        let elapsed = start.elapsed().as_secs_f64();
        let statuses = self
            .statuses
            .lock()
            .map(|mut m| std::mem::take(&mut *m))
            .unwrap_or_default();
        let answered: u64 = statuses.values().sum();
        PublishStats {
            issued,
            statuses,
            skipped,
            elapsed_s: elapsed,
            per_s: answered as f64 / elapsed.max(1e-9),
        }
    }

    /// Publishes at `rate`/s for `duration`, round-robin over the channels.
    pub async fn open_loop(
        &self,
        rate: u64,
        duration: Duration,
        max_outstanding: usize,
        issued: &AtomicU64,
    ) -> PublishStats {
        let sem = Arc::new(Semaphore::new(max_outstanding));
        let total = (rate as f64 * duration.as_secs_f64()) as u64;
        let start = Instant::now();
        let mut skipped = 0;
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..total {
            let intended = start + Duration::from_secs_f64(i as f64 / rate.max(1) as f64);
            tokio::time::sleep_until(intended.into()).await;
            let Ok(permit) = sem.clone().try_acquire_owned() else {
                skipped += 1;
                continue;
            };
            let this = self.clone();
            tasks.spawn(async move {
                this.publish_one(i as usize, intended).await;
                drop(permit);
            });
            issued.fetch_add(1, Ordering::Relaxed);
            while tasks.try_join_next().is_some() {}
        }
        while tasks.join_next().await.is_some() {}
        self.finish(total - skipped, skipped, start)
    }

    /// `workers` publishers in a loop for `duration`, one Publish each at a
    /// time; records each call's latency (request to answer) in `latency`.
    pub async fn closed_loop(
        &self,
        workers: usize,
        duration: Duration,
        latency: Arc<crate::stats::Recorder>,
        issued: &AtomicU64,
    ) -> PublishStats {
        let start = Instant::now();
        let next = Arc::new(AtomicU64::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..workers.max(1) {
            let (this, next, latency) = (self.clone(), next.clone(), latency.clone());
            tasks.spawn(async move {
                let mut n = 0u64;
                while start.elapsed() < duration {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let t0 = Instant::now();
                    this.publish_one(i, t0).await;
                    latency.record(t0.elapsed(), start.elapsed());
                    n += 1;
                }
                n
            });
        }
        let mut total = 0;
        while let Some(n) = tasks.join_next().await {
            total += n.unwrap_or(0);
        }
        issued.fetch_add(total, Ordering::Relaxed);
        self.finish(total, 0, start)
    }

    /// `workers` publishers in a loop for `duration`, each sending batches
    /// of `batch` events (1 = plain Publish).
    pub async fn saturate(
        &self,
        workers: usize,
        batch: usize,
        duration: Duration,
        issued: &AtomicU64,
    ) -> PublishStats {
        let start = Instant::now();
        let next = Arc::new(AtomicU64::new(0));
        let total = Arc::new(AtomicU64::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..workers.max(1) {
            let (this, next, total) = (self.clone(), next.clone(), total.clone());
            let batch = batch.max(1);
            tasks.spawn(async move {
                while start.elapsed() < duration {
                    let first = next.fetch_add(batch as u64, Ordering::Relaxed) as usize;
                    let n = if batch == 1 {
                        this.publish_one(first, Instant::now()).await;
                        1
                    } else {
                        this.publish_batch(first, batch).await
                    };
                    total.fetch_add(n, Ordering::Relaxed);
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        let n = total.load(Ordering::Relaxed);
        issued.fetch_add(n, Ordering::Relaxed);
        self.finish(n, 0, start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wakewire_proto::token::TokenKind;
    use wakewire_test_support::TestRelay;

    fn counts(p: &Publisher) -> BTreeMap<String, u64> {
        p.statuses.lock().map(|m| m.clone()).unwrap_or_default()
    }

    #[tokio::test]
    async fn a_stream_the_relay_ends_fails_its_publishes_instead_of_stalling() -> anyhow::Result<()>
    {
        // The relay ends a PublishStream whose credential is revoked. Every
        // publish on it must then be answered with why (before, a caller
        // that raced the end waited forever, and so did the whole run).
        let relay = TestRelay::start().await?;
        let token = relay.publisher_token(&[], &["*"]);
        let publisher = Publisher::connect(
            relay.relay().grpc_addr(),
            1,
            &token,
            vec!["no-such-channel".into()],
            Instant::now(),
            PublishApi::Stream,
        )
        .await?;
        publisher.publish_one(0, Instant::now()).await;
        assert_eq!(counts(&publisher).values().sum::<u64>(), 1, "answered");

        let jti = relay
            .relay()
            .keys()
            .verifier
            .verify(&token, TokenKind::Publisher, 0)?
            .jti
            .expect("an id");
        wakewire_server::data_dir::DataDir::open(&relay.config.data_dir)?.revoke(&jti)?;
        // The relay re-reads its revocation list every second; each publish
        // is answered either way, so this loop ends.
        let ended = |p: &Publisher| {
            counts(p)
                .keys()
                .any(|k| k.starts_with("error stream ended"))
        };
        tokio::time::timeout(Duration::from_secs(20), async {
            let mut i = 1;
            while !ended(&publisher) {
                publisher.publish_one(i, Instant::now()).await;
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the relay ended the stream");
        // Later publishes on the ended stream fail at once, with the reason.
        let before = counts(&publisher).values().sum::<u64>();
        tokio::time::timeout(Duration::from_secs(5), async {
            for i in 0..10 {
                publisher.publish_one(1000 + i, Instant::now()).await;
            }
        })
        .await
        .expect("no publish waits on an ended stream");
        let after = counts(&publisher);
        assert_eq!(after.values().sum::<u64>(), before + 10, "{after:?}");
        assert!(
            after
                .keys()
                .any(|k| k.contains("revoked") || k.contains("Unauthenticated")),
            "{after:?}"
        );
        Ok(())
    }
}
