//! `wakewire-relay publish`: one wake event from the command line.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use wakewire_api::pb::{publisher_client::PublisherClient, Priority, PublishRequest};

use crate::{keys, unix_secs};

#[derive(Clone, Copy, ValueEnum)]
enum PriorityArg {
    High,
    Normal,
}

#[derive(Args)]
pub(crate) struct PublishArgs {
    /// Channel id (printed by `listen` or returned by the SDK's register()).
    #[arg(long)]
    channel: String,
    /// Payload (UTF-8 text, at most 4096 bytes).
    payload: String,
    /// Publisher gRPC endpoint.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    grpc: String,
    /// Publisher token; when absent one is minted for this channel from the local data directory.
    #[arg(long, env = "WAKEWIRE_PUBLISHER_TOKEN")]
    token: Option<String>,
    /// Relay data directory (for a local token).
    #[arg(long, default_value = "wakewire-data", env = "WAKEWIRE_DATA_DIR")]
    data_dir: PathBuf,
    /// Delivery priority.
    #[arg(long, value_enum, default_value = "high")]
    priority: PriorityArg,
    /// Time to live in seconds (default: the relay's).
    #[arg(long)]
    ttl: Option<u32>,
    /// Collapse key.
    #[arg(long, default_value = "")]
    collapse_key: String,
    /// Idempotency key: publishing again with the same key returns the
    /// first event instead of creating another (safe retries).
    #[arg(long, default_value = "")]
    idempotency_key: String,
}

pub(crate) async fn publish(args: PublishArgs) -> anyhow::Result<()> {
    let token = match args.token {
        Some(t) => t,
        None => keys(&args.data_dir)?.publisher_token(
            std::slice::from_ref(&args.channel),
            &[],
            Duration::from_secs(300),
            unix_secs(),
        ),
    };
    let mut client = PublisherClient::connect(args.grpc.clone())
        .await
        .with_context(|| format!("cannot reach the publisher API at {}", args.grpc))?;
    let req = wakewire_api::with_token(
        PublishRequest {
            channel_id: args.channel,
            payload: args.payload.into_bytes(),
            priority: match args.priority {
                PriorityArg::High => Priority::High,
                PriorityArg::Normal => Priority::Normal,
            } as i32,
            ttl_s: args.ttl,
            collapse_key: args.collapse_key,
            idempotency_key: args.idempotency_key,
        },
        &token,
    )
    .context("token is not ASCII")?;
    match client.publish(req).await {
        Ok(r) => {
            let r = r.into_inner();
            let dup = if r.duplicate { " duplicate=true" } else { "" };
            println!(
                "event={} status={}{dup}",
                r.event_id,
                r.status().as_str_name()
            );
            Ok(())
        }
        Err(s) => bail!("publish refused: {:?}: {}", s.code(), s.message()),
    }
}
