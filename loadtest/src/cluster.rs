//! `wakewire-loadtest cluster`: one relay on its embedded store against
//! three relays on a three-node NATS JetStream cluster (R3), in one run on
//! this machine, with the same devices and publishers:
//!
//! - publish-to-callback latency, the device on one relay and the
//!   publisher on another (cluster) or the same relay (single node);
//! - durable publishes per second to offline devices (each answered only
//!   once stored: an fsync on one node, a replicated write in a cluster);
//! - failover: devices spread over the three relays, one relay killed
//!   with SIGKILL, time until every one of its devices is connected again.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tonic::transport::Channel;
use wakewire_api::pb::publisher_client::PublisherClient;
use wakewire_api::pb::PublishRequest;
use wakewire_sdk::{Client, ClientBuilder, KeepalivePolicy};
use wakewire_server::data_dir::{DataDir, Keys, DEV_CERT_FILE};
use wakewire_test_support::cluster::ClusterFixture;
use wakewire_test_support::process::RelayProcess;
use wakewire_test_support::{authed, unix_secs};

use crate::stats::{Percentiles, Recorder};

/// Settings of the cluster benchmark.
#[derive(Debug, Clone)]
pub struct ClusterOpts {
    /// Connected devices in the latency phase.
    pub devices: usize,
    /// Publishes in the latency phase (closed loop).
    pub publishes: usize,
    /// Publishes in flight in the latency phase.
    pub concurrency: usize,
    /// Durable phase length, seconds.
    pub durable_secs: f64,
    /// Concurrent publishers in the durable phase.
    pub durable_workers: usize,
    /// Devices in the failover phase (0 = skip).
    pub failover_devices: usize,
    /// Device keepalive in the failover phase (how soon a device notices
    /// its relay is gone).
    pub failover_keepalive: Duration,
    /// The relay binary.
    pub relay_bin: PathBuf,
    /// Output directory.
    pub out: PathBuf,
}

/// One target's figures.
#[derive(Debug, Clone, Serialize)]
pub struct TargetFigures {
    /// Which target.
    pub target: String,
    /// Publish (gRPC answer) latency.
    pub publish: Percentiles,
    /// Publish-to-callback latency.
    pub callback: Percentiles,
    /// Durable publishes answered OK per second (devices offline).
    pub durable_per_sec: f64,
    /// Durable publishes refused.
    pub durable_errors: u64,
}

/// The failover phase's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Failover {
    /// Devices connected before the kill.
    pub devices: usize,
    /// Devices on the killed relay.
    pub moved: usize,
    /// Seconds until all of them were connected to another relay.
    pub seconds: f64,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterReport {
    /// Per target.
    pub targets: Vec<TargetFigures>,
    /// Failover, if run.
    pub failover: Option<Failover>,
}

/// Runs every phase and writes `cluster.md` and `cluster.json` to `out`.
pub async fn run(opts: &ClusterOpts, header: String) -> anyhow::Result<ClusterReport> {
    std::fs::create_dir_all(&opts.out)?;
    let mut targets = Vec::new();
    {
        // One relay, its embedded store.
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("data");
        let keys = DataDir::open(&data)?.keys()?;
        DataDir::open(&data)?.dev_certificate()?;
        let any = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        let relay = RelayProcess::start(&opts.relay_bin, &data, any, any, &[]).await?;
        let t = Target {
            keys,
            ca: data.join(DEV_CERT_FILE),
            device_relay: relay.quic.to_string(),
            publisher: relay.grpc,
        };
        targets.push(t.measure("single node (redb)", opts).await?);
    }
    {
        // Three relays on three NATS nodes; devices on C, publisher on A.
        let c = ClusterFixture::start(&opts.relay_bin, 3, 3, &[]).await?;
        let t = Target {
            keys: DataDir::open(c.data_dir())?.keys()?,
            ca: c.dev_cert(),
            device_relay: c.quic[2].to_string(),
            publisher: c.grpc[0],
        };
        targets.push(
            t.measure(
                "3 relays, NATS JetStream R3 (device on C, publisher on A)",
                opts,
            )
            .await?,
        );
    }
    let failover = if opts.failover_devices > 0 {
        Some(failover(opts).await?)
    } else {
        None
    };
    let report = ClusterReport { targets, failover };
    std::fs::write(
        opts.out.join("cluster.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(opts.out.join("cluster.md"), markdown(&report, &header))?;
    Ok(report)
}

struct Target {
    keys: Keys,
    ca: PathBuf,
    device_relay: String,
    publisher: std::net::SocketAddr,
}

impl Target {
    async fn measure(&self, name: &str, opts: &ClusterOpts) -> anyhow::Result<TargetFigures> {
        eprintln!("== {name}");
        let epoch = Instant::now();
        let callback = Arc::new(Recorder::default());
        let received = Arc::new(AtomicU64::new(0));
        let endpoint = crate::fleet::endpoints(1)?.remove(0);
        let mut clients: Vec<Client> = Vec::new();
        let mut channels = Vec::new();
        for i in 0..opts.devices {
            let device = format!("bench-{i}");
            let client = ClientBuilder::new(self.device_relay.clone())
                .server_name("localhost")
                .trust_pem_file(&self.ca)
                .device_token(self.keys.device_token(
                    &device,
                    Duration::from_secs(3600),
                    unix_secs(),
                ))
                .endpoint(endpoint.clone())
                .keepalive(KeepalivePolicy::Fixed(Duration::from_secs(25)))
                .connect()
                .await
                .with_context(|| format!("device {i}"))?;
            let (rec, n) = (callback.clone(), received.clone());
            let ch = client
                .channel("c")
                .on_wake(move |w| {
                    crate::fleet::record_latency(w, epoch, &rec);
                    n.fetch_add(1, Ordering::Relaxed);
                })
                .register()
                .await?;
            channels.push(ch.into_string());
            clients.push(client);
        }
        // Any device (a backend's token; a list of 1000 ids would not fit
        // in a request header).
        let token =
            self.keys
                .publisher_token(&[], &["*".into()], Duration::from_secs(3600), unix_secs());
        let publisher = PublisherClient::connect(format!("http://{}", self.publisher)).await?;
        // Latency: a closed loop of `concurrency` publishers.
        let publish = Arc::new(Recorder::default());
        let next = Arc::new(AtomicUsize::new(0));
        let mut workers = Vec::new();
        for _ in 0..opts.concurrency.max(1) {
            let (p, token, channels, next, publish) = (
                publisher.clone(),
                token.clone(),
                channels.clone(),
                next.clone(),
                publish.clone(),
            );
            let total = opts.publishes;
            workers.push(tokio::spawn(async move {
                let mut p: PublisherClient<Channel> = p;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        return;
                    }
                    let t0 = epoch.elapsed();
                    let req = PublishRequest {
                        channel_id: channels[i % channels.len()].clone(),
                        payload: (t0.as_nanos() as u64).to_le_bytes().to_vec(),
                        ..Default::default()
                    };
                    if p.publish(authed(req, &token)).await.is_ok() {
                        let t1 = epoch.elapsed();
                        publish.record(t1.saturating_sub(t0), t1);
                    }
                }
            }));
        }
        for w in workers {
            w.await?;
        }
        // Every callback in (bounded).
        let _ = tokio::time::timeout(Duration::from_secs(30), async {
            while received.load(Ordering::Relaxed) < opts.publishes as u64 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        // Durable: the devices go away; every publish is a stored write.
        for c in clients {
            c.close().await;
        }
        let (ok, errors) = durable(&publisher, &token, &channels, opts).await;
        let figures = TargetFigures {
            target: name.to_owned(),
            publish: publish.summary(),
            callback: callback.summary(),
            durable_per_sec: ok as f64 / opts.durable_secs.max(0.001),
            durable_errors: errors,
        };
        eprintln!("{figures:?}");
        Ok(figures)
    }
}

async fn durable(
    publisher: &PublisherClient<Channel>,
    token: &str,
    channels: &[String],
    opts: &ClusterOpts,
) -> (u64, u64) {
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs_f64(opts.durable_secs);
    let mut workers = Vec::new();
    for w in 0..opts.durable_workers.max(1) {
        let (mut p, token, channels, ok, errors) = (
            publisher.clone(),
            token.to_owned(),
            channels.to_vec(),
            ok.clone(),
            errors.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut i = w;
            while Instant::now() < until {
                let req = PublishRequest {
                    channel_id: channels[i % channels.len()].clone(),
                    payload: b"durable".to_vec(),
                    ..Default::default()
                };
                i += 7;
                match p.publish(authed(req, &token)).await {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    (ok.load(Ordering::Relaxed), errors.load(Ordering::Relaxed))
}

async fn failover(opts: &ClusterOpts) -> anyhow::Result<Failover> {
    eprintln!("== failover with {} devices", opts.failover_devices);
    let mut c =
        ClusterFixture::start(&opts.relay_bin, 3, 3, &["--max-pending-handshakes", "4096"]).await?;
    let endpoints = crate::fleet::endpoints(16)?;
    let relays = c.relay_list();
    let mut clients = Vec::new();
    let mut connecting = tokio::task::JoinSet::new();
    let sem = Arc::new(tokio::sync::Semaphore::new(256));
    for i in 0..opts.failover_devices {
        let builder = ClientBuilder::new(relays.clone())
            .server_name("localhost")
            .trust_pem_file(c.dev_cert())
            .device_token(c.keys().device_token(
                &format!("f{i}"),
                Duration::from_secs(3600),
                unix_secs(),
            ))
            .endpoint(endpoints[i % endpoints.len()].clone())
            .keepalive(KeepalivePolicy::Fixed(opts.failover_keepalive))
            .keepalive_timeout(opts.failover_keepalive)
            .reconnect_backoff(Duration::from_millis(200), Duration::from_secs(5));
        let sem = sem.clone();
        connecting.spawn(async move {
            let _permit = sem.acquire_owned().await?;
            let client = builder.connect().await?;
            client.channel("c").register().await?;
            anyhow::Ok(client)
        });
    }
    while let Some(r) = connecting.join_next().await {
        clients.push(r??);
    }
    let placement: Vec<_> = clients
        .iter()
        .map(|c| c.info().map(|i| i.relay_addr))
        .collect();
    let victim = (0..3)
        .max_by_key(|r| placement.iter().filter(|a| **a == Some(c.quic[*r])).count())
        .unwrap_or(0);
    let moved = placement
        .iter()
        .filter(|a| **a == Some(c.quic[victim]))
        .count();
    eprintln!(
        "killing relay {victim} with {moved} of {} devices",
        clients.len()
    );
    c.kill(victim).await?;
    let killed = Instant::now();
    let victim_addr = c.quic[victim];
    let back = tokio::time::timeout(Duration::from_secs(300), async {
        loop {
            if clients
                .iter()
                .all(|cl| cl.info().is_some_and(|i| i.relay_addr != victim_addr))
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let seconds = killed.elapsed().as_secs_f64();
    anyhow::ensure!(back.is_ok(), "devices not back within 300 s");
    for cl in clients {
        cl.close().await;
    }
    Ok(Failover {
        devices: placement.len(),
        moved,
        seconds,
    })
}

fn markdown(r: &ClusterReport, header: &str) -> String {
    let mut s = String::from(header);
    s.push_str(
        "\n| target | publish p50 / p99 (ms) | publish to callback p50 / p99 (ms) | durable publishes/s (devices offline) | durable refused |\n|---|---|---|---|---|\n",
    );
    for t in &r.targets {
        s.push_str(&format!(
            "| {} | {:.2} / {:.2} | {:.2} / {:.2} | {:.0} | {} |\n",
            t.target,
            t.publish.p50_ms,
            t.publish.p99_ms,
            t.callback.p50_ms,
            t.callback.p99_ms,
            t.durable_per_sec,
            t.durable_errors
        ));
    }
    if let [single, cluster] = &r.targets[..] {
        s.push_str(&format!(
            "\nCluster / single node: callback p99 {:.2}x, durable publishes/s {:.2}x.\n",
            cluster.callback.p99_ms / single.callback.p99_ms.max(0.001),
            cluster.durable_per_sec / single.durable_per_sec.max(0.001)
        ));
    }
    if let Some(f) = &r.failover {
        s.push_str(&format!(
            "\nFailover: {} devices over 3 relays; the relay holding {} of them killed with SIGKILL; all of them connected to the other relays {:.1} s later.\n",
            f.devices, f.moved, f.seconds
        ));
    }
    s
}
