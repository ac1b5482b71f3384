//! The floor: a minimal raw-quinn server and client with the relay's TLS
//! and transport settings and no relay logic. Each connection opens one
//! bidirectional stream and echoes a 16-byte hello; pushes are 64 bytes
//! server -> client and a 16-byte ack back. The server runs as a child
//! process (its RSS is measured like the relay's) and takes line commands
//! on stdin: `push RATE SECS`, `saturate OUTSTANDING SECS`, `count`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use tokio::io::AsyncBufReadExt;
use tokio::sync::{mpsc, Semaphore};

use crate::stats::Recorder;

/// Push message and ack sizes (as in the reference floor measurement).
pub const PUSH_LEN: usize = 64;
/// Ack size.
pub const ACK_LEN: usize = 16;

struct Conn {
    tx: mpsc::Sender<Box<[u8; PUSH_LEN]>>,
}

struct Server {
    conns: Mutex<Vec<Conn>>,
    count: AtomicUsize,
    epoch: Instant,
    latency: Recorder,
    acked: AtomicU64,
    /// Outstanding permits for saturation runs.
    window: Mutex<Option<Arc<Semaphore>>>,
}

/// Runs the floor server until stdin closes.
pub async fn serve(listen: SocketAddr, cert: &Path, key: &Path) -> anyhow::Result<()> {
    let resolver = wakewire_server::certs::ReloadableCert::load(cert, key)?;
    // The relay's default resumption (stateless tickets), keys in memory.
    let tickets = rustls::crypto::ring::Ticketer::new().context("ticketer")?;
    let config = wakewire_server::tls::server_config(
        resolver,
        Duration::from_secs(660),
        None,
        &wakewire_server::tls::Resumption::Tickets(tickets),
    )?;
    let socket = crate::udp_socket(listen)?;
    let runtime = quinn::default_runtime().context("no runtime")?;
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(config),
        socket,
        runtime,
    )?;
    let server = Arc::new(Server {
        conns: Mutex::new(Vec::new()),
        count: AtomicUsize::new(0),
        epoch: Instant::now(),
        latency: Recorder::default(),
        acked: AtomicU64::new(0),
        window: Mutex::new(None),
    });
    {
        let endpoint = endpoint.clone();
        let server = server.clone();
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                tokio::spawn(serve_conn(incoming, server.clone()));
            }
        });
    }
    println!("{}", json!({ "ready": endpoint.local_addr()?.to_string() }));
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let words: Vec<&str> = line.split_whitespace().collect();
        let answer = match words.as_slice() {
            ["count"] => json!({ "connections": server.count.load(Ordering::Relaxed) }),
            ["push", rate, secs] => {
                push(
                    &server,
                    rate.parse()?,
                    Duration::from_secs_f64(secs.parse()?),
                )
                .await
            }
            ["saturate", outstanding, secs] => {
                saturate(
                    &server,
                    outstanding.parse()?,
                    Duration::from_secs_f64(secs.parse()?),
                )
                .await
            }
            _ => json!({ "error": format!("unknown command {line:?}") }),
        };
        println!("{answer}");
    }
    Ok(())
}

async fn serve_conn(incoming: quinn::Incoming, server: Arc<Server>) {
    let Ok(conn) = incoming.await else { return };
    let Ok((mut send, mut recv)) = conn.accept_bi().await else {
        return;
    };
    let mut hello = [0u8; ACK_LEN];
    if recv.read_exact(&mut hello).await.is_err() || send.write_all(&hello).await.is_err() {
        return;
    }
    let (tx, mut rx) = mpsc::channel::<Box<[u8; PUSH_LEN]>>(64);
    server.conns.lock().map(|mut c| c.push(Conn { tx })).ok();
    server.count.fetch_add(1, Ordering::Relaxed);
    let mut ack = [0u8; ACK_LEN];
    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(m) => if send.write_all(&m[..]).await.is_err() { break },
                None => break,
            },
            r = recv.read_exact(&mut ack) => {
                if r.is_err() { break }
                let sent = u64::from_le_bytes(ack[..8].try_into().unwrap_or_default());
                let now = server.epoch.elapsed();
                server.latency.record(now.saturating_sub(Duration::from_nanos(sent)), now);
                server.acked.fetch_add(1, Ordering::Relaxed);
                if let Some(w) = server.window.lock().ok().and_then(|w| w.clone()) {
                    w.add_permits(1);
                }
            }
        }
    }
    server.count.fetch_sub(1, Ordering::Relaxed);
}

fn message(sent: Duration) -> Box<[u8; PUSH_LEN]> {
    let mut m = Box::new([0u8; PUSH_LEN]);
    m[..8].copy_from_slice(
        &u64::try_from(sent.as_nanos())
            .unwrap_or(u64::MAX)
            .to_le_bytes(),
    );
    m
}

fn senders(server: &Server) -> Vec<mpsc::Sender<Box<[u8; PUSH_LEN]>>> {
    server
        .conns
        .lock()
        .map(|c| c.iter().map(|c| c.tx.clone()).collect())
        .unwrap_or_default()
}

/// Open-loop pushes at `rate`/s for `duration`; latency from the intended
/// send time to the ack.
async fn push(server: &Server, rate: u64, duration: Duration) -> serde_json::Value {
    let conns = senders(server);
    if conns.is_empty() || rate == 0 {
        return json!({ "error": "no connections" });
    }
    server.latency.reset();
    let acked0 = server.acked.load(Ordering::Relaxed);
    let total = (rate as f64 * duration.as_secs_f64()) as u64;
    let start = tokio::time::Instant::now();
    let mut dropped = 0u64;
    for i in 0..total {
        let intended = start + Duration::from_secs_f64(i as f64 / rate as f64);
        tokio::time::sleep_until(intended).await;
        let sent = server.epoch.elapsed() - (tokio::time::Instant::now() - intended);
        if conns[i as usize % conns.len()]
            .try_send(message(sent))
            .is_err()
        {
            dropped += 1;
        }
    }
    let elapsed = start.elapsed();
    // Let the last acks arrive (bounded).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while server.acked.load(Ordering::Relaxed) - acked0 < total - dropped
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    json!({
        "sent": total - dropped,
        "dropped": dropped,
        "acked": server.acked.load(Ordering::Relaxed) - acked0,
        "elapsed_s": elapsed.as_secs_f64(),
        "latency": server.latency.summary(),
        "per_second": server.latency.per_second(),
    })
}

/// Keeps `outstanding` pushes in flight for `duration`; reports acks/s.
async fn saturate(server: &Server, outstanding: usize, duration: Duration) -> serde_json::Value {
    let conns = senders(server);
    if conns.is_empty() {
        return json!({ "error": "no connections" });
    }
    server.latency.reset();
    let window = Arc::new(Semaphore::new(outstanding));
    if let Ok(mut w) = server.window.lock() {
        *w = Some(window.clone());
    }
    let acked0 = server.acked.load(Ordering::Relaxed);
    let start = Instant::now();
    let mut i = 0usize;
    while start.elapsed() < duration {
        let Ok(permit) = tokio::time::timeout(Duration::from_secs(1), window.acquire()).await
        else {
            continue;
        };
        if let Ok(p) = permit {
            p.forget();
        }
        let _ = conns[i % conns.len()]
            .send(message(server.epoch.elapsed()))
            .await;
        i += 1;
    }
    let elapsed = start.elapsed();
    if let Ok(mut w) = server.window.lock() {
        *w = None;
    }
    let acked = server.acked.load(Ordering::Relaxed) - acked0;
    json!({
        "acked": acked,
        "elapsed_s": elapsed.as_secs_f64(),
        "per_s": acked as f64 / elapsed.as_secs_f64(),
        "latency": server.latency.summary(),
    })
}

/// The client TLS/transport config: the SDK's own (TLS 1.3, its cipher
/// suites, ALPN, windows, no PMTUD) with a QUIC keepalive in place of the
/// SDK's app-level Ping.
pub fn client_config(ca: &Path, keepalive: Duration) -> anyhow::Result<quinn::ClientConfig> {
    let mut config = wakewire_sdk::quic_client_config(ca)?;
    let mut t = wakewire_sdk::transport_config();
    t.keep_alive_interval(Some(keepalive));
    config.transport_config(Arc::new(t));
    Ok(config)
}

/// Connects one floor client connection: handshake, stream, hello echo;
/// then acks every push in the background.
pub async fn connect_one(
    endpoint: &quinn::Endpoint,
    config: quinn::ClientConfig,
    addr: SocketAddr,
    connected: Arc<AtomicUsize>,
) -> anyhow::Result<()> {
    let conn = endpoint.connect_with(config, addr, "localhost")?.await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&[7u8; ACK_LEN]).await?;
    let mut echo = [0u8; ACK_LEN];
    recv.read_exact(&mut echo).await?;
    connected.fetch_add(1, Ordering::Relaxed);
    tokio::spawn(async move {
        let _conn = conn;
        let mut msg = [0u8; PUSH_LEN];
        while recv.read_exact(&mut msg).await.is_ok() {
            if send.write_all(&msg[..ACK_LEN]).await.is_err() {
                break;
            }
        }
        connected.fetch_sub(1, Ordering::Relaxed);
    });
    Ok(())
}
