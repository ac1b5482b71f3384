//! `wakewire-relay listen`: a device from the command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use wakewire_server::data_dir::DEV_CERT_FILE;

use crate::{init_logs, keys, parse_duration, unix_secs};

#[derive(Args)]
pub(crate) struct ListenArgs {
    /// Relay device endpoint, host:port.
    #[arg(long, default_value = "127.0.0.1:4433")]
    relay: String,
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
    /// Keepalive interval, e.g. 25s.
    #[arg(long, default_value = "25s", value_parser = parse_duration)]
    keepalive: Duration,
    /// File remembering the wakes already printed, so one delivered again
    /// (its ack was lost, the listener restarted) is printed once
    /// [default: <data-dir>/listen-<device-id>.dedup]; "off" keeps it in memory.
    #[arg(long)]
    dedup_store: Option<String>,
    /// Exit after this many wakes (default: run until Ctrl-C).
    #[arg(long)]
    count: Option<u64>,
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
    let mut builder = wakewire_sdk::ClientBuilder::new(&args.relay)
        .trust_pem_file(ca)
        .device_token(token)
        .keepalive(wakewire_sdk::KeepalivePolicy::Fixed(args.keepalive))
        .on_status(|s| match s {
            wakewire_sdk::Status::KeepaliveCompleted { .. } => {}
            other => eprintln!("status: {other:?}"),
        });
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
