//! `wakewire-relay`: run the relay, mint tokens, and try it out (listen as a
//! device, publish a wake).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;
use wakewire_proto::pb::publish::{publisher_client::PublisherClient, Priority, PublishRequest};
use wakewire_server::data_dir::{DataDir, DEV_CERT_FILE};
use wakewire_server::Settings;

#[derive(Parser)]
#[command(
    name = "wakewire-relay",
    version,
    about = "wakewire push relay: wake sleeping devices over QUIC"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the relay. Settings come from --config, then WAKEWIRE_* variables, then flags.
    Serve(Box<ServeArgs>),
    /// Mint device or publisher tokens with the key in the data directory.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Connect as a device, register channels, and print every wake received.
    Listen(ListenArgs),
    /// Publish one wake event to a channel.
    Publish(PublishArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// TOML config file (keys as the flags below, with underscores).
    #[arg(long)]
    config: Option<PathBuf>,
    /// UDP address for devices (QUIC) [env: WAKEWIRE_QUIC_LISTEN] [default: 0.0.0.0:4433]
    #[arg(long)]
    quic_listen: Option<std::net::SocketAddr>,
    /// TCP address of the publisher gRPC API [env: WAKEWIRE_GRPC_LISTEN] [default: 0.0.0.0:50051]
    #[arg(long)]
    grpc_listen: Option<std::net::SocketAddr>,
    /// TCP address of the Prometheus /metrics endpoint, or "off" [env: WAKEWIRE_METRICS_LISTEN] [default: 127.0.0.1:9464]
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Directory for keys and the dev certificate [env: WAKEWIRE_DATA_DIR] [default: ./wakewire-data]
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// PEM certificate chain; without it a self-signed localhost certificate is generated (dev mode) [env: WAKEWIRE_TLS_CERT]
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert [env: WAKEWIRE_TLS_KEY]
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Most channels per device [env: WAKEWIRE_MAX_CHANNELS_PER_DEVICE] [default: 64]
    #[arg(long)]
    max_channels_per_device: Option<usize>,
    /// Seconds a connection has to send Hello [env: WAKEWIRE_HELLO_TIMEOUT_SECS] [default: 10]
    #[arg(long)]
    hello_timeout_secs: Option<u64>,
    /// Seconds of silence before a device connection is dropped [env: WAKEWIRE_IDLE_TIMEOUT_SECS] [default: 660]
    #[arg(long)]
    idle_timeout_secs: Option<u64>,
    /// Milliseconds Publish waits for the device's ack [env: WAKEWIRE_ACK_WAIT_MS] [default: 5000]
    #[arg(long)]
    ack_wait_ms: Option<u64>,
    /// Largest TTL accepted, seconds [env: WAKEWIRE_MAX_TTL_SECS] [default: 2419200 = 4 weeks]
    #[arg(long)]
    max_ttl_secs: Option<u32>,
    /// TTL of events published without one, seconds [env: WAKEWIRE_DEFAULT_TTL_SECS] [default: 2419200]
    #[arg(long)]
    default_ttl_secs: Option<u32>,
    /// UDP address of the NAT binding-lifetime probe service, or "off" [env: WAKEWIRE_PROBE_LISTEN] [default: 0.0.0.0:4434]
    #[arg(long)]
    probe_listen: Option<String>,
    /// Most device connections at once [env: WAKEWIRE_MAX_CONNECTIONS] [default: 1000000]
    #[arg(long)]
    max_connections: Option<usize>,
    /// Most handshakes in progress; more are refused and retried by devices [env: WAKEWIRE_MAX_PENDING_HANDSHAKES] [default: 1024]
    #[arg(long)]
    max_pending_handshakes: Option<usize>,
    /// Devices per second to spread reconnects over after a shutdown [env: WAKEWIRE_SHUTDOWN_RECONNECT_RATE] [default: 1000]
    #[arg(long)]
    shutdown_reconnect_rate: Option<u32>,
    /// UDP socket buffer size to request, bytes [env: WAKEWIRE_UDP_BUFFER_BYTES] [default: 8388608]
    #[arg(long)]
    udp_buffer_bytes: Option<usize>,
    /// Most queued events per channel [env: WAKEWIRE_QUEUE_LIMIT] [default: 100]
    #[arg(long)]
    queue_limit: Option<usize>,
    /// Longest hold of a normal-priority event, ms [env: WAKEWIRE_NORMAL_MAX_DELAY_MS] [default: 60000]
    #[arg(long)]
    normal_max_delay_ms: Option<u64>,
    /// How long finished events stay queryable, s [env: WAKEWIRE_STATUS_RETENTION_SECS] [default: 86400]
    #[arg(long)]
    status_retention_secs: Option<u64>,
    /// Days after which a channel its device no longer registers is gone [env: WAKEWIRE_CHANNEL_EXPIRY_DAYS] [default: 30]
    #[arg(long)]
    channel_expiry_days: Option<u64>,
    /// Group commit of concurrent publishes: true or false [env: WAKEWIRE_STORE_GROUP_COMMIT] [default: true]
    #[arg(long)]
    store_group_commit: Option<bool>,
    /// Log filter, e.g. "info" or "info,wakewire_server=debug" [env: WAKEWIRE_LOG] [default: info]
    #[arg(long)]
    log: Option<String>,
}

impl ServeArgs {
    fn settings(
        &self,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> anyhow::Result<Settings> {
        let mut s = Settings::load(self.config.as_deref(), env)?;
        macro_rules! set {
            ($($f:ident),*) => {$( if let Some(v) = &self.$f { s.$f = v.clone(); } )*};
        }
        set!(
            probe_listen,
            max_connections,
            max_pending_handshakes,
            shutdown_reconnect_rate,
            udp_buffer_bytes,
            queue_limit,
            normal_max_delay_ms,
            status_retention_secs,
            channel_expiry_days,
            store_group_commit,
            quic_listen,
            grpc_listen,
            metrics_listen,
            data_dir,
            max_channels_per_device,
            hello_timeout_secs,
            idle_timeout_secs,
            ack_wait_ms,
            max_ttl_secs,
            default_ttl_secs,
            log
        );
        if self.tls_cert.is_some() {
            s.tls_cert = self.tls_cert.clone();
            s.tls_key = self.tls_key.clone();
        }
        Ok(s)
    }
}

#[derive(Subcommand)]
enum TokenCmd {
    /// A device token: lets a device connect as DEVICE_ID.
    Device {
        /// Device id the token names.
        #[arg(long)]
        device_id: String,
        /// Validity, e.g. 3600s, 12h, 365d.
        #[arg(long, default_value = "365d", value_parser = parse_duration)]
        valid_for: Duration,
        /// Relay data directory holding the signing key.
        #[arg(long, default_value = "wakewire-data", env = "WAKEWIRE_DATA_DIR")]
        data_dir: PathBuf,
    },
    /// A publisher token: lets an app backend publish to the listed devices and channels.
    Publisher {
        /// Device whose channels may be published to (repeatable).
        #[arg(long)]
        device_id: Vec<String>,
        /// Channel id that may be published to (repeatable).
        #[arg(long)]
        channel: Vec<String>,
        /// Allow every device (an admin token).
        #[arg(long)]
        all_devices: bool,
        /// Validity, e.g. 3600s, 12h, 365d.
        #[arg(long, default_value = "365d", value_parser = parse_duration)]
        valid_for: Duration,
        /// Relay data directory holding the signing key.
        #[arg(long, default_value = "wakewire-data", env = "WAKEWIRE_DATA_DIR")]
        data_dir: PathBuf,
    },
}

#[derive(Args)]
struct ListenArgs {
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
    /// Exit after this many wakes (default: run until Ctrl-C).
    #[arg(long)]
    count: Option<u64>,
}

#[derive(Clone, Copy, ValueEnum)]
enum PriorityArg {
    High,
    Normal,
}

#[derive(Args)]
struct PublishArgs {
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
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.trim().split_at(
        s.trim()
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(s.trim().len()),
    );
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a number with a unit, like 30s, 5m, 12h or 365d"))?;
    let secs = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?} (use ms, s, m, h or d)"
            ))
        }
    };
    Ok(Duration::from_secs(secs))
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn init_logs(filter: &str) -> anyhow::Result<()> {
    let filter =
        EnvFilter::try_new(filter).with_context(|| format!("invalid log filter {filter:?}"))?;
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Serve(args) => serve(&args).await,
        Cmd::Token(t) => {
            println!("{}", mint(t)?);
            Ok(())
        }
        Cmd::Listen(args) => listen(args).await,
        Cmd::Publish(args) => publish(args).await,
    }
}

async fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    let settings = args.settings(std::env::vars())?;
    init_logs(&settings.log)?;
    let config = settings.validate()?;
    let relay = wakewire_server::start(config).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

fn mint(cmd: TokenCmd) -> anyhow::Result<String> {
    match cmd {
        TokenCmd::Device {
            device_id,
            valid_for,
            data_dir,
        } => {
            wakewire_proto::names::validate_device_id(&device_id)?;
            Ok(keys(&data_dir)?.device_token(&device_id, valid_for, unix_secs()))
        }
        TokenCmd::Publisher {
            mut device_id,
            channel,
            all_devices,
            valid_for,
            data_dir,
        } => {
            if all_devices {
                device_id.push("*".into());
            }
            if device_id.is_empty() && channel.is_empty() {
                bail!("a publisher token needs a scope: --device-id, --channel or --all-devices");
            }
            Ok(keys(&data_dir)?.publisher_token(&channel, &device_id, valid_for, unix_secs()))
        }
    }
}

fn keys(data_dir: &std::path::Path) -> anyhow::Result<wakewire_server::data_dir::Keys> {
    if !data_dir
        .join(wakewire_server::data_dir::SIGNING_KEY_FILE)
        .exists()
    {
        bail!(
            "no signing key in {}: start the relay once (wakewire-relay serve) or pass --data-dir",
            data_dir.display()
        );
    }
    Ok(DataDir::open(data_dir)?.keys()?)
}

async fn listen(args: ListenArgs) -> anyhow::Result<()> {
    init_logs(&std::env::var("WAKEWIRE_LOG").unwrap_or_else(|_| "warn".into()))?;
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

async fn publish(args: PublishArgs) -> anyhow::Result<()> {
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
    let mut req = tonic::Request::new(PublishRequest {
        channel_id: args.channel,
        payload: args.payload.into_bytes(),
        priority: match args.priority {
            PriorityArg::High => Priority::High,
            PriorityArg::Normal => Priority::Normal,
        } as i32,
        ttl_s: args.ttl,
        collapse_key: args.collapse_key,
    });
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}")
            .parse()
            .context("token is not ASCII")?,
    );
    match client.publish(req).await {
        Ok(r) => {
            let r = r.into_inner();
            println!("event={} status={}", r.event_id, r.status().as_str_name());
            Ok(())
        }
        Err(s) => bail!("publish refused: {:?}: {}", s.code(), s.message()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(
            parse_duration("365d"),
            Ok(Duration::from_secs(365 * 86_400))
        );
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5y").is_err());
    }

    #[test]
    fn flags_override_env_which_overrides_defaults() {
        let args = Cli::parse_from(["wakewire-relay", "serve", "--ack-wait-ms", "7"]);
        let Cmd::Serve(serve) = args.cmd else {
            panic!()
        };
        let s = serve
            .settings([
                ("WAKEWIRE_ACK_WAIT_MS".to_string(), "3".to_string()),
                ("WAKEWIRE_LOG".into(), "debug".into()),
            ])
            .unwrap();
        assert_eq!(s.ack_wait_ms, 7);
        assert_eq!(s.log, "debug");
    }
}
