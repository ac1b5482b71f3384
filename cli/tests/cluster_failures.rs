//! Cluster mode under failure, with real processes on loopback: a relay
//! killed with SIGKILL while publishing, a NATS node killed, every NATS
//! node down, a rolling restart of every relay. The rule checked each
//! time: every event answered OK reaches its app's callback exactly once.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wakewire_api::pb::publisher_client::PublisherClient;
use wakewire_api::pb::{DeliveryStatus, PublishRequest};
use wakewire_sdk::{Client, Status};
use wakewire_test_support::authed;
use wakewire_test_support::cluster::ClusterFixture;

const BIN: &str = env!("CARGO_BIN_EXE_wakewire-relay");
/// Queues deep enough that no event is dropped for the queue limit while
/// its device moves (a drop is by design, with a receipt; not a loss).
const NO_DROPS: &[&str] = &["--queue-limit", "100000"];

/// Per device: when it last lost its connection, and the longest time it
/// was without one.
type Gaps = Arc<Mutex<Vec<(Option<std::time::Instant>, Duration)>>>;

/// Devices that count their callbacks per event id.
struct Fleet {
    clients: Vec<Client>,
    channels: Vec<String>,
    names: Vec<String>,
    seen: Arc<Mutex<HashMap<String, u32>>>,
    gaps: Gaps,
}

impl Fleet {
    async fn connect(c: &ClusterFixture, n: usize) -> anyhow::Result<Self> {
        let seen: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let gaps = Arc::new(Mutex::new(vec![(None, Duration::ZERO); n]));
        let mut clients = Vec::new();
        let mut channels = Vec::new();
        let mut names = Vec::new();
        for i in 0..n {
            let name = format!("device-{i}");
            let g = gaps.clone();
            let client = c
                .client(&name)
                .on_status(move |s| {
                    let mut g = g.lock().expect("lock");
                    let now = wakewire_test_support::cluster::now();
                    match s {
                        Status::Disconnected { .. } => {
                            g[i].0.get_or_insert(now);
                        }
                        Status::Connected(_) => {
                            if let Some(since) = g[i].0.take() {
                                g[i].1 = g[i].1.max(now.duration_since(since));
                            }
                        }
                        _ => {}
                    }
                })
                .connect()
                .await?;
            let s = seen.clone();
            let ch = client
                .channel("mail")
                .on_wake(move |w| {
                    *s.lock()
                        .expect("lock")
                        .entry(w.event_id.clone())
                        .or_default() += 1;
                })
                .register()
                .await?;
            channels.push(ch.as_str().to_owned());
            clients.push(client);
            names.push(name);
        }
        Ok(Self {
            clients,
            channels,
            names,
            seen,
            gaps,
        })
    }

    /// Devices per relay address now.
    fn placement(&self) -> Vec<Option<SocketAddr>> {
        self.clients
            .iter()
            .map(|c| c.info().map(|i| i.relay_addr))
            .collect()
    }

    /// Waits (bounded) until every id in `ok` was seen; then checks that
    /// each was seen exactly once and nothing else twice.
    async fn expect_exactly_once(&self, ok: &BTreeSet<String>) -> anyhow::Result<()> {
        let all_seen = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                let missing = {
                    let seen = self.seen.lock().expect("lock");
                    ok.iter().filter(|id| !seen.contains_key(*id)).count()
                };
                if missing == 0 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        let seen = self.seen.lock().expect("lock");
        let missing: Vec<&String> = ok.iter().filter(|id| !seen.contains_key(*id)).collect();
        anyhow::ensure!(
            all_seen.is_ok(),
            "{} of {} events answered OK never reached their callback: {:?}",
            missing.len(),
            ok.len(),
            &missing[..missing.len().min(5)]
        );
        let twice: Vec<(&String, &u32)> = seen.iter().filter(|(_, n)| **n > 1).collect();
        anyhow::ensure!(
            twice.is_empty(),
            "callbacks fired more than once: {twice:?}"
        );
        Ok(())
    }

    async fn close(self) {
        for c in self.clients {
            c.close().await;
        }
    }
}

/// Publishes round-robin over the fleet through the relays `use_relay`
/// allows, until `stop`, in a task of its own; returns the ids answered OK
/// (stored or delivered) and how many were refused.
fn publish_until(
    c: &ClusterFixture,
    fleet: &Fleet,
    use_relay: impl Fn(usize) -> bool + Send + 'static,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(BTreeSet<String>, usize)> {
    let names: Vec<&str> = fleet.names.iter().map(String::as_str).collect();
    let token = c.publisher_token(&names);
    let grpc = c.grpc.clone();
    let channels = fleet.channels.clone();
    tokio::spawn(async move {
        let mut ok = BTreeSet::new();
        let mut refused = 0;
        let mut publishers = HashMap::new();
        let mut i = 0usize;
        // Bounded in count as well as by the stop flag.
        while !stop.load(Ordering::Relaxed) && i < 20_000 {
            let relay = i % grpc.len();
            i += 1;
            if !use_relay(relay) {
                continue;
            }
            if let std::collections::hash_map::Entry::Vacant(e) = publishers.entry(relay) {
                let url = format!("http://{}", grpc[relay]);
                match PublisherClient::connect(url).await {
                    Ok(p) => {
                        e.insert(p);
                    }
                    Err(_) => {
                        refused += 1;
                        continue;
                    }
                }
            }
            let Some(p) = publishers.get_mut(&relay) else {
                continue;
            };
            let req = PublishRequest {
                channel_id: channels[i % channels.len()].clone(),
                payload: format!("n{i}").into_bytes(),
                ..Default::default()
            };
            match tokio::time::timeout(Duration::from_secs(10), p.publish(authed(req, &token)))
                .await
            {
                Ok(Ok(r)) => {
                    let r = r.into_inner();
                    assert!(
                        matches!(
                            r.status(),
                            DeliveryStatus::Delivered | DeliveryStatus::Queued
                        ),
                        "{r:?}"
                    );
                    ok.insert(r.event_id);
                }
                _ => {
                    refused += 1;
                    publishers.remove(&relay);
                }
            }
        }
        (ok, refused)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_of_a_killed_relay_move_to_the_others_and_nothing_ok_is_lost() -> anyhow::Result<()>
{
    if !wakewire_test_support::nats::nats_or_skip() {
        return Ok(());
    }
    let mut c = ClusterFixture::start(BIN.as_ref(), 3, 3, NO_DROPS).await?;
    let fleet = Fleet::connect(&c, 12).await?;
    // The relay holding the most devices.
    let placement = fleet.placement();
    let victim = (0..3)
        .max_by_key(|r| placement.iter().filter(|a| **a == Some(c.quic[*r])).count())
        .unwrap();
    let on_victim = placement
        .iter()
        .filter(|a| **a == Some(c.quic[victim]))
        .count();
    assert!(on_victim > 0, "devices did not spread: {placement:?}");

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, refused) = {
        let publishing = publish_until(&c, &fleet, move |r| r != victim, stop.clone());
        let chaos = async {
            tokio::time::sleep(Duration::from_millis(800)).await;
            c.kill(victim).await?;
            let killed = wakewire_test_support::cluster::now();
            // Every device is back, on a relay that is alive, within 10 s.
            let moved = tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    let p = fleet.placement();
                    if p.iter().all(|a| a.is_some_and(|a| a != c.quic[victim])) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await;
            let took = killed.elapsed();
            tokio::time::sleep(Duration::from_millis(1500)).await;
            stop.store(true, Ordering::Relaxed);
            anyhow::ensure!(
                moved.is_ok(),
                "devices still away 10 s after the kill: {:?}",
                fleet.placement()
            );
            eprintln!("{on_victim} devices of the killed relay were back in {took:?}");
            Ok(())
        };
        let chaos = chaos.await;
        let published = publishing.await?;
        chaos?;
        published
    };
    eprintln!("{} publishes answered OK, {refused} refused", ok.len());
    assert!(
        ok.len() > 50,
        "too few publishes to mean anything: {}",
        ok.len()
    );
    if let Err(e) = fleet.expect_exactly_once(&ok).await {
        let names: Vec<&str> = fleet.names.iter().map(String::as_str).collect();
        let token = c.publisher_token(&names);
        let alive = (victim + 1) % 3;
        let seen = fleet.seen.lock().expect("lock").clone();
        for id in ok.iter().filter(|id| !seen.contains_key(*id)).take(5) {
            let st = c
                .publisher(alive)
                .await?
                .get_event(authed(
                    wakewire_api::pb::GetEventRequest {
                        event_id: id.clone(),
                    },
                    &token,
                ))
                .await;
            eprintln!("missing {id}: {st:?}");
        }
        eprintln!(
            "placement now {:?}, victim {}",
            fleet.placement(),
            c.quic[victim]
        );
        return Err(e);
    }
    fleet.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_node_killed_under_publishing_loses_nothing_ok() -> anyhow::Result<()> {
    if !wakewire_test_support::nats::nats_or_skip() {
        return Ok(());
    }
    let mut c = ClusterFixture::start(BIN.as_ref(), 3, 2, NO_DROPS).await?;
    let fleet = Fleet::connect(&c, 6).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let after_kill = Arc::new(Mutex::new(0usize));
    let (ok, refused) = {
        let publishing = publish_until(&c, &fleet, |_| true, stop.clone());
        let chaos = async {
            tokio::time::sleep(Duration::from_millis(800)).await;
            c.nats.kill(0).await?;
            let killed = wakewire_test_support::cluster::now();
            // Publishing goes on: wait (bounded) for 50 more callbacks.
            let before = fleet.seen.lock().expect("lock").len();
            let resumed = tokio::time::timeout(Duration::from_secs(30), async {
                while fleet.seen.lock().expect("lock").len() < before + 50 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await;
            let took = killed.elapsed();
            tokio::time::sleep(Duration::from_secs(1)).await;
            *after_kill.lock().expect("lock") = fleet.seen.lock().expect("lock").len() - before;
            stop.store(true, Ordering::Relaxed);
            anyhow::ensure!(
                resumed.is_ok(),
                "publishing did not go on after a NATS node was lost"
            );
            eprintln!("50 callbacks after the kill within {took:?}");
            anyhow::Ok(())
        };
        let chaos = chaos.await;
        let published = publishing.await?;
        chaos?;
        published
    };
    eprintln!(
        "{} publishes answered OK, {refused} refused; {} callbacks after the kill",
        ok.len(),
        after_kill.lock().expect("lock")
    );
    fleet.expect_exactly_once(&ok).await?;
    fleet.close().await;
    Ok(())
}

async fn health(grpc: SocketAddr) -> bool {
    tokio::process::Command::new(BIN)
        .args(["health", "--url", &format!("http://{grpc}")])
        .output()
        .await
        .is_ok_and(|o| o.status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_nats_node_down_nothing_is_ok_and_service_resumes_by_itself(
) -> anyhow::Result<()> {
    if !wakewire_test_support::nats::nats_or_skip() {
        return Ok(());
    }
    let mut c = ClusterFixture::start(BIN.as_ref(), 3, 1, NO_DROPS).await?;
    let fleet = Fleet::connect(&c, 2).await?;
    let token = c.publisher_token(&["device-0", "device-1"]);
    let req = |i: usize| PublishRequest {
        channel_id: fleet.channels[i % 2].clone(),
        payload: format!("p{i}").into_bytes(),
        ..Default::default()
    };
    let mut ok = BTreeSet::new();
    let r = c
        .publisher(0)
        .await?
        .publish(authed(req(0), &token))
        .await?;
    ok.insert(r.into_inner().event_id);
    assert!(health(c.grpc[0]).await);
    // Delivered before the whole NATS cluster dies: an OK not yet on disk
    // when every node is killed at once is the documented limit of cluster
    // mode (docs/cluster.md, "Durability of an OK"), not what this tests.
    fleet.expect_exactly_once(&ok).await?;

    c.nats.kill_all().await?;
    // Refused while NATS is away, and NOT_SERVING once it has been away
    // longer than the bound (2 s here).
    let mut refused = 0;
    for i in 1..6 {
        match c.publisher(0).await?.publish(authed(req(i), &token)).await {
            Ok(r) => panic!("answered OK without NATS: {:?}", r.into_inner()),
            Err(s) => {
                assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
                refused += 1;
            }
        }
    }
    assert_eq!(refused, 5);
    let not_serving = tokio::time::timeout(Duration::from_secs(10), async {
        while health(c.grpc[0]).await {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(not_serving.is_ok(), "health stayed SERVING without NATS");

    c.nats.start_all().await?;
    // Back by itself: SERVING, publishes accepted and delivered.
    let serving = tokio::time::timeout(Duration::from_secs(30), async {
        while !health(c.grpc[0]).await {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(serving.is_ok(), "health did not come back");
    let accepted = tokio::time::timeout(Duration::from_secs(30), async {
        let mut i = 100;
        loop {
            i += 1;
            if let Ok(r) = c.publisher(0).await?.publish(authed(req(i), &token)).await {
                ok.insert(r.into_inner().event_id);
                if ok.len() >= 4 {
                    return anyhow::Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        matches!(accepted, Ok(Ok(()))),
        "publishes not accepted again"
    );
    fleet.expect_exactly_once(&ok).await?;
    fleet.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_relay_loses_nothing_and_delivers_once() -> anyhow::Result<()> {
    if !wakewire_test_support::nats::nats_or_skip() {
        return Ok(());
    }
    let mut c = ClusterFixture::start(BIN.as_ref(), 3, 3, NO_DROPS).await?;
    let fleet = Fleet::connect(&c, 12).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let down: Arc<Mutex<Option<usize>>> = Arc::default();
    let (ok, refused) = {
        let d = down.clone();
        let publishing = publish_until(
            &c,
            &fleet,
            move |r| *d.lock().expect("lock") != Some(r),
            stop.clone(),
        );
        let rolling = async {
            for i in 0..3 {
                tokio::time::sleep(Duration::from_millis(700)).await;
                *down.lock().expect("lock") = Some(i);
                c.drain(i).await?;
                c.restart(i).await?;
                *down.lock().expect("lock") = None;
            }
            tokio::time::sleep(Duration::from_millis(700)).await;
            stop.store(true, Ordering::Relaxed);
            anyhow::Ok(())
        };
        let rolling = rolling.await;
        let published = publishing.await?;
        rolling?;
        published
    };
    eprintln!("{} publishes answered OK, {refused} refused", ok.len());
    assert!(ok.len() > 50, "too few publishes: {}", ok.len());
    fleet.expect_exactly_once(&ok).await?;
    let longest = fleet
        .gaps
        .lock()
        .unwrap()
        .iter()
        .map(|g| g.1)
        .max()
        .unwrap_or_default();
    eprintln!("longest time a device was without a relay: {longest:?}");
    assert!(
        longest < Duration::from_secs(5),
        "a device was unreachable for {longest:?}"
    );
    fleet.close().await;
    Ok(())
}

/// A relay that starts while its NATS cluster has no quorum (nodes starting
/// together, a leader being elected) waits for JetStream instead of
/// exiting, and starts once the cluster is whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_started_before_its_nats_cluster_has_a_quorum_waits_for_it() -> anyhow::Result<()> {
    if !wakewire_test_support::nats::nats_or_skip() {
        return Ok(());
    }
    let mut c = ClusterFixture::start(BIN.as_ref(), 3, 1, NO_DROPS).await?;
    c.kill(0).await?;
    // Two of three NATS nodes down: no JetStream quorum.
    c.nats.kill(1).await?;
    c.nats.kill(2).await?;
    let relay = c.start_once(0);
    let heal = async {
        // How long the cluster stays without a quorum (not a wait for
        // something: the outage being simulated).
        tokio::time::sleep(Duration::from_secs(4)).await;
        c.nats.start_all().await
    };
    // `start_once` is given 30 s to say "relay started", one attempt.
    let (relay, healed) = tokio::join!(relay, heal);
    healed?;
    let relay = relay?;
    assert!(relay.grpc.port() > 0);
    Ok(())
}
