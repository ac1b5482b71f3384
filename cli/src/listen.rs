//! `wakewire-relay listen`: a device from the command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use wakewire_server::data_dir::DEV_CERT_FILE;

use crate::{init_logs, keys, parse_duration, unix_secs};

#[derive(Args)]
pub(crate) struct ListenArgs {
    /// Relay device endpoint, host:port; several comma-separated for a
    /// cluster.
    #[arg(long, default_value = "127.0.0.1:4433")]
    relay: String,
    /// Transport: auto (QUIC, TLS over TCP where UDP does not get
    /// through), quic or tcp.
    #[arg(long, value_enum, default_value = "auto")]
    transport: TransportArg,
    /// The relay's TCP port for TLS over TCP [default: the QUIC port].
    #[arg(long)]
    tcp_port: Option<u16>,
    /// Proxy for TCP: http://[user:pass@]host:port or
    /// socks5://[user:pass@]host:port [default: HTTPS_PROXY / ALL_PROXY,
    /// minus NO_PROXY].
    #[arg(long)]
    proxy: Option<String>,
    /// Network id for the adaptive keepalive's memory (e.g. an SSID hash).
    #[arg(long, default_value = "default")]
    network_id: String,
    /// Channel name to register (repeatable).
    #[arg(long = "channel", default_value = "demo")]
    channels: Vec<String>,
    /// Device token; when absent one is minted for --device-id from the local data directory.
    #[arg(long)]
    token: Option<String>,
    /// Device id for a locally minted token.
    #[arg(long, default_value = "demo-device")]
    device_id: String,
    /// PEM file of the certificate(s) to trust [default: <data-dir>/dev-cert.pem].
    #[arg(long)]
    ca: Option<PathBuf>,
    /// TLS server name [default: host of --relay].
    #[arg(long)]
    server_name: Option<String>,
    /// Relay data directory (for local tokens and the dev certificate).
    #[arg(long, default_value = "wakewire-data", env = "WAKEWIRE_DATA_DIR")]
    data_dir: PathBuf,
    /// Keepalive: "adaptive" (learns the network's NAT timeout, remembered
    /// per --network-id in <data-dir>/listen-networks) or a fixed interval
    /// such as 25s.
    #[arg(long, default_value = "25s", value_parser = parse_keepalive)]
    keepalive: KeepaliveArg,
    /// File remembering the wakes already printed, so one delivered again
    /// (its ack was lost, the listener restarted) is printed once
    /// [default: <data-dir>/listen-<device-id>.dedup]; "off" keeps it in memory.
    #[arg(long)]
    dedup_store: Option<String>,
    /// Exit after this many wakes (default: run until Ctrl-C).
    #[arg(long)]
    count: Option<u64>,
    /// Runs the adaptive keepalive's clock faster: every tuner duration
    /// (start, minimum, maximum, grace) times this factor. For tests and
    /// demos against NATs with compressed timeouts.
    #[arg(long, hide = true, default_value_t = 1.0)]
    tuner_scale: f64,
}

/// `--transport`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum TransportArg {
    Auto,
    Quic,
    Tcp,
}

/// `--keepalive`.
#[derive(Clone, Copy)]
enum KeepaliveArg {
    Adaptive,
    Fixed(Duration),
}

fn parse_keepalive(s: &str) -> Result<KeepaliveArg, String> {
    if s.eq_ignore_ascii_case("adaptive") {
        Ok(KeepaliveArg::Adaptive)
    } else {
        parse_duration(s).map(KeepaliveArg::Fixed)
    }
}

/// One line per thing an operator watching a device learn a network
/// wants to see (stderr; wakes go to stdout).
fn status_line(s: &wakewire_sdk::Status) -> Option<String> {
    use wakewire_sdk::Status;
    Some(match s {
        Status::KeepaliveCompleted { .. } => return None,
        Status::Connecting { attempt } => format!("connecting attempt={attempt}"),
        Status::Connected(i) => format!(
            "connected relay={} transport={} suite={} keepalive={:?} zero_rtt={}",
            i.relay_addr,
            i.transport,
            i.cipher_suite.name(),
            i.keepalive_interval,
            i.zero_rtt
        ),
        Status::Disconnected { error, retry_in } => match retry_in {
            Some(d) => format!("disconnected: {error} (retry in {d:?})"),
            None => format!("disconnected: {error} (giving up)"),
        },
        Status::Reset { channels } => format!("re-registered channels={}", channels.join(",")),
        Status::KeepaliveInterval { interval, reason } => {
            format!("keepalive interval={interval:?} reason={reason:?}")
        }
        Status::KeepaliveConverged {
            network,
            interval,
            learned,
        } => format!(
            "keepalive converged network={network} interval={interval:?} nat_timeout>{:?} <{}",
            learned.lower,
            learned.upper.map_or("?".to_owned(), |u| format!("{u:?}"))
        ),
        Status::BindingLost { after_idle } => format!("binding lost after {after_idle:?} idle"),
    })
}

pub(crate) async fn listen(args: ListenArgs) -> anyhow::Result<()> {
    init_logs(
        &std::env::var("WAKEWIRE_LOG").unwrap_or_else(|_| "warn".into()),
        "text",
    )?;
    let token = match args.token {
        Some(t) => t,
        None => keys(&args.data_dir)?.device_token(
            &args.device_id,
            Duration::from_secs(86_400),
            unix_secs(),
        ),
    };
    let ca = args.ca.unwrap_or_else(|| args.data_dir.join(DEV_CERT_FILE));
    let keepalive = match args.keepalive {
        KeepaliveArg::Adaptive => {
            let d = wakewire_sdk::TunerConfig::default();
            let k = args.tuner_scale.clamp(0.001, 1000.0);
            wakewire_sdk::KeepalivePolicy::Adaptive(wakewire_sdk::TunerConfig {
                min_interval: d.min_interval.mul_f64(k),
                max_interval: d.max_interval.mul_f64(k),
                start_interval: d.start_interval.mul_f64(k),
                grace: d.grace.mul_f64(k),
                reprobe_after: d.reprobe_after.mul_f64(k),
                eager_refine_below: d.eager_refine_below.mul_f64(k),
                ..d
            })
        }
        KeepaliveArg::Fixed(d) => wakewire_sdk::KeepalivePolicy::Fixed(d),
    };
    let mut builder = wakewire_sdk::ClientBuilder::new(&args.relay)
        .trust_pem_file(ca)
        .device_token(token)
        .keepalive(keepalive)
        .network_id(args.network_id.clone())
        .transport(match args.transport {
            TransportArg::Auto => wakewire_sdk::Transport::Auto,
            TransportArg::Quic => wakewire_sdk::Transport::Quic,
            TransportArg::Tcp => wakewire_sdk::Transport::Tcp,
        })
        .on_status(|s| {
            if let Some(line) = status_line(s) {
                eprintln!("{line}");
            }
        });
    if args.data_dir.is_dir() {
        builder = builder.network_memory(args.data_dir.join("listen-networks"));
    }
    if let Some(p) = args.tcp_port {
        builder = builder.tcp_port(p);
    }
    let proxy = match &args.proxy {
        Some(url) => Some(wakewire_sdk::Proxy::parse(url)?),
        None => wakewire_sdk::Proxy::from_env(std::env::vars())?,
    };
    if let Some(p) = proxy {
        builder = builder.proxy(p);
    }
    if let Some(n) = args.server_name {
        builder = builder.server_name(n);
    }
    match args.dedup_store.as_deref() {
        Some("off") => {}
        Some(path) => builder = builder.dedup_store(path),
        // Next to the relay's data (the usual demo); elsewhere in memory.
        None if args.data_dir.is_dir() => {
            let file = format!("listen-{}.dedup", args.device_id);
            builder = builder.dedup_store(args.data_dir.join(file));
        }
        None => {}
    }
    let client = builder.connect().await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for name in &args.channels {
        let tx = tx.clone();
        let id = client
            .channel(name.clone())
            .on_wake(move |w| {
                println!(
                    "wake event={} channel={} priority={:?} payload={}",
                    w.event_id,
                    w.channel,
                    w.priority,
                    String::from_utf8_lossy(&w.payload)
                );
                let _ = tx.send(());
            })
            .register()
            .await?;
        println!("registered channel={name} id={id}");
    }
    drop(tx);
    let mut received = 0u64;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            got = rx.recv() => {
                if got.is_none() { break; }
                received += 1;
                if args.count.is_some_and(|n| received >= n) { break; }
            }
        }
    }
    client.close().await;
    Ok(())
}
