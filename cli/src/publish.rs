//! `wakewire-relay publish`: one wake event from the command line.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};
use wakewire_api::pb::{publisher_client::PublisherClient, Priority, PublishRequest};
use wakewire_server::data_dir::DEV_CERT_FILE;

use crate::{keys, unix_secs};

#[derive(Clone, Copy, ValueEnum)]
enum PriorityArg {
    High,
    Normal,
}

#[derive(Args)]
pub(crate) struct PublishArgs {
    /// Channel id (printed by `listen` or returned by the SDK's register()).
    /// Base64url: it may start with '-'.
    #[arg(long, allow_hyphen_values = true)]
    channel: String,
    /// Payload (UTF-8 text, at most 4096 bytes).
    #[arg(allow_hyphen_values = true)]
    payload: String,
    /// Publisher gRPC endpoint: http://... (plaintext, loopback) or
    /// https://... (TLS).
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    grpc: String,
    /// PEM file of the certificate(s) to trust for https:// [default:
    /// <data-dir>/dev-cert.pem].
    #[arg(long)]
    ca: Option<PathBuf>,
    /// TLS server name to verify [default: the endpoint's host].
    #[arg(long)]
    server_name: Option<String>,
    /// Client certificate (PEM) for relays that require one from backends.
    #[arg(long, requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// Private key (PEM) of --client-cert.
    #[arg(long, requires = "client_cert")]
    client_key: Option<PathBuf>,
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
    let mut endpoint = tonic::transport::Endpoint::from_shared(args.grpc.clone())
        .with_context(|| format!("{:?} is not a URL", args.grpc))?;
    if args.grpc.starts_with("https://") {
        let ca = args
            .ca
            .clone()
            .unwrap_or_else(|| args.data_dir.join(DEV_CERT_FILE));
        let pem = std::fs::read(&ca)
            .with_context(|| format!("cannot read the CA file {}", ca.display()))?;
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
        if let Some(name) = &args.server_name {
            tls = tls.domain_name(name.clone());
        }
        if let (Some(c), Some(k)) = (&args.client_cert, &args.client_key) {
            let cert = std::fs::read(c).with_context(|| format!("{}", c.display()))?;
            let key = std::fs::read(k).with_context(|| format!("{}", k.display()))?;
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        endpoint = endpoint.tls_config(tls).context("TLS settings")?;
    }
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot reach the publisher API at {}", args.grpc))?;
    let mut client = PublisherClient::new(channel);
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
