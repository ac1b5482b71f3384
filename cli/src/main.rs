//! `wakewire-relay`: run the relay, mint tokens, and try it out (listen as a
//! device, publish a wake).

mod health;
mod listen;
mod publish;
mod serve;
mod token;

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use wakewire_server::data_dir::DataDir;

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
    Serve(Box<serve::ServeArgs>),
    /// Mint, inspect and revoke device and publisher tokens.
    #[command(subcommand)]
    Token(token::TokenCmd),
    /// The token signing keys: list, rotate, drop a retired one.
    #[command(subcommand)]
    Keys(token::KeysCmd),
    /// Connect as a device, register channels, and print every wake received.
    Listen(listen::ListenArgs),
    /// Publish one wake event to a channel.
    Publish(publish::PublishArgs),
    /// Ask a running relay whether it is serving (exit 0) or not (exit 1).
    Health(health::HealthArgs),
    /// Validate a config file and the WAKEWIRE_* environment without
    /// starting; prints the effective settings.
    CheckConfig(Box<serve::ServeArgs>),
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
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

/// Wall clock, Unix seconds (token validity).
#[allow(clippy::disallowed_methods)] // the CLI's one clock source
pub(crate) fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn init_logs(filter: &str, format: &str) -> anyhow::Result<()> {
    let filter =
        EnvFilter::try_new(filter).with_context(|| format!("invalid log filter {filter:?}"))?;
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init();
    } else {
        builder.with_ansi(std::io::stderr().is_terminal()).init();
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    // The one rustls crypto provider (ring), installed before anything
    // (the relay, the SDK, tonic's TLS client) builds a TLS config.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", explain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each said once (most of our errors already
/// include their cause's text).
fn explain(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if !msg.contains(&c) {
            if !msg.is_empty() {
                msg.push_str(": ");
            }
            msg.push_str(&c);
        }
    }
    msg
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Serve(args) => serve::serve(&args).await,
        Cmd::Token(t) => {
            println!("{}", token::run(t)?);
            Ok(())
        }
        Cmd::Keys(k) => {
            println!("{}", token::keys_cmd(k)?);
            Ok(())
        }
        Cmd::Listen(args) => listen::listen(args).await,
        Cmd::Publish(args) => publish::publish(args).await,
        Cmd::Health(args) => health::health(args).await,
        Cmd::CheckConfig(args) => serve::check_config(&args),
    }
}

/// The relay keys in `data_dir`, with a clear error when there are none.
pub(crate) fn keys(data_dir: &Path) -> anyhow::Result<wakewire_server::data_dir::Keys> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_ids_starting_with_a_hyphen_are_values_not_flags() {
        // Channel ids are base64url: 1 in 64 starts with '-'.
        for args in [
            &[
                "wakewire-relay",
                "publish",
                "--channel",
                "-Mx0aBcDeFgHiJkLmNoPqR",
                "-hi",
            ][..],
            &[
                "wakewire-relay",
                "token",
                "publisher",
                "--channel",
                "-Mx0aBcDeFgHiJkLmNoPqR",
            ][..],
        ] {
            if let Err(e) = Cli::try_parse_from(args) {
                panic!("{args:?}: {e}");
            }
        }
    }

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
}
