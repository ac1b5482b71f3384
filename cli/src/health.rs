//! `wakewire-relay health`: asks a relay's health service whether it is
//! serving; exit 0 if it is, 1 if not (or unreachable). Needs no shell, so
//! it is the container image's health check.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
use wakewire_server::Settings;

#[derive(Args)]
pub(crate) struct HealthArgs {
    /// Health endpoint, e.g. http://127.0.0.1:50052 [default: the relay's
    /// `health_listen` from --config and WAKEWIRE_* variables]
    #[arg(long)]
    url: Option<String>,
    /// The relay's TOML config file (to find its health endpoint).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Seconds to wait for an answer.
    #[arg(long, default_value_t = 3)]
    timeout: u64,
}

pub(crate) async fn health(args: HealthArgs) -> anyhow::Result<()> {
    let url = match args.url {
        Some(u) => u,
        None => {
            let s = Settings::load(args.config.as_deref(), std::env::vars())?;
            let addr: SocketAddr = s.health_listen.trim().parse().with_context(|| {
                format!(
                    "health_listen {:?} is off or not an address: pass --url",
                    s.health_listen
                )
            })?;
            // A relay listening on every address answers on loopback.
            let ip = if addr.ip().is_unspecified() {
                if addr.is_ipv4() {
                    [127, 0, 0, 1].into()
                } else {
                    std::net::Ipv6Addr::LOCALHOST.into()
                }
            } else {
                addr.ip()
            };
            format!("http://{}", SocketAddr::new(ip, addr.port()))
        }
    };
    let check = async {
        let channel = tonic::transport::Channel::from_shared(url.clone())
            .with_context(|| format!("{url:?} is not a URL"))?
            .connect()
            .await
            .with_context(|| format!("cannot reach the health endpoint {url}"))?;
        let mut client = HealthClient::new(channel);
        let r = client
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .context("health check")?;
        anyhow::Ok(r.into_inner().status())
    };
    let status = tokio::time::timeout(Duration::from_secs(args.timeout), check)
        .await
        .with_context(|| format!("no answer from {url} within {} s", args.timeout))??;
    println!("{}", status.as_str_name());
    if status != ServingStatus::Serving {
        bail!("the relay is not serving ({})", status.as_str_name());
    }
    Ok(())
}
