//! `wakewire-relay token` and `wakewire-relay keys`: mint, inspect and
//! revoke tokens; rotate the signing key.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Subcommand;
use wakewire_proto::ids::is_channel_id;
use wakewire_proto::names::validate_device_id;
use wakewire_proto::token::TokenKind;
use wakewire_server::data_dir::DataDir;

use crate::{keys, parse_duration, unix_secs};

#[derive(Subcommand)]
pub(crate) enum TokenCmd {
    /// A device token: lets a device connect as DEVICE_ID.
    Device {
        /// Device id the token names.
        #[arg(long)]
        device_id: String,
        /// Validity, e.g. 3600s, 12h, 90d. Renew before it runs out
        /// (the SDK takes a new token with `set_device_token`).
        #[arg(long, default_value = "90d", value_parser = parse_duration)]
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
        /// Channel id that may be published to (repeatable; base64url, so it
        /// may start with '-').
        #[arg(long, allow_hyphen_values = true)]
        channel: Vec<String>,
        /// Allow every device (an admin token; the only way to get one).
        #[arg(long)]
        all_devices: bool,
        /// Validity, e.g. 3600s, 12h, 30d.
        #[arg(long, default_value = "30d", value_parser = parse_duration)]
        valid_for: Duration,
        /// Relay data directory holding the signing key.
        #[arg(long, default_value = "wakewire-data", env = "WAKEWIRE_DATA_DIR")]
        data_dir: PathBuf,
    },
    /// Verify a token with the data directory's keys and print its claims.
    Inspect {
        /// The token.
        token: String,
        /// Relay data directory holding the keys.
        #[arg(long, default_value = "wakewire-data", env = "WAKEWIRE_DATA_DIR")]
        data_dir: PathBuf,
    },
    /// Revoke a token by its id (`jti`, printed by `inspect`); a running
    /// relay refuses it within seconds and closes devices connected with it.
    Revoke {
        /// Token id, or a whole token.
        jti_or_token: String,
        /// Relay data directory.
        #[arg(long, default_value = "wakewire-data", env = "WAKEWIRE_DATA_DIR")]
        data_dir: PathBuf,
    },
}

/// `wakewire-relay keys`.
#[derive(Subcommand)]
pub(crate) enum KeysCmd {
    /// Make the keys (signing key, channel secret) and the dev certificate
    /// if they are not there yet; prints the signing key id. For the
    /// shared keys of a cluster (docs/cluster.md).
    Init {
        /// Relay data directory.
        #[arg(long, default_value = "wakewire-data", env = "WAKEWIRE_DATA_DIR")]
        data_dir: PathBuf,
    },
    /// List the signing key and the retired keys still accepted.
    List {
        /// Relay data directory.
        #[arg(long, default_value = "wakewire-data", env = "WAKEWIRE_DATA_DIR")]
        data_dir: PathBuf,
    },
    /// Make a new signing key; the old one keeps verifying the tokens it
    /// signed until dropped. Restart the relay (or its processes) to use it.
    Rotate {
        /// Relay data directory.
        #[arg(long, default_value = "wakewire-data", env = "WAKEWIRE_DATA_DIR")]
        data_dir: PathBuf,
    },
    /// Stop accepting tokens signed by a retired key.
    Drop {
        /// Key id (from `keys list`).
        kid: String,
        /// Relay data directory.
        #[arg(long, default_value = "wakewire-data", env = "WAKEWIRE_DATA_DIR")]
        data_dir: PathBuf,
    },
}

pub(crate) fn run(cmd: TokenCmd) -> anyhow::Result<String> {
    match cmd {
        TokenCmd::Device {
            device_id,
            valid_for,
            data_dir,
        } => {
            validate_device_id(&device_id)?;
            Ok(keys(&data_dir)?.device_token(&device_id, valid_for, unix_secs()))
        }
        TokenCmd::Publisher {
            mut device_id,
            channel,
            all_devices,
            valid_for,
            data_dir,
        } => {
            for d in &device_id {
                if d == "*" {
                    bail!("--device-id '*' is not a device; use --all-devices for an admin token");
                }
                validate_device_id(d).with_context(|| format!("--device-id {d:?}"))?;
            }
            for c in &channel {
                if !is_channel_id(c) {
                    bail!("--channel {c:?} is not a channel id (22 base64url characters)");
                }
            }
            if all_devices {
                device_id.push("*".into());
            }
            if device_id.is_empty() && channel.is_empty() {
                bail!("a publisher token needs a scope: --device-id, --channel or --all-devices");
            }
            Ok(keys(&data_dir)?.publisher_token(&channel, &device_id, valid_for, unix_secs()))
        }
        TokenCmd::Inspect { token, data_dir } => {
            let keys = keys(&data_dir)?;
            let claims = [TokenKind::Device, TokenKind::Publisher]
                .into_iter()
                .find_map(|k| keys.verifier.verify(&token, k, 0).ok())
                .map(Ok)
                .unwrap_or_else(|| keys.verifier.verify(&token, TokenKind::Device, 0))?;
            let revoked = claims
                .jti
                .as_deref()
                .is_some_and(|j| revoked_ids(&data_dir).iter().any(|r| r == j));
            let expired = claims.exp <= unix_secs();
            Ok(format!(
                "kind={} jti={} kid={} sub={} channels={:?} devices={:?} issued={} expires={}{}{}",
                claims.typ,
                claims.jti.as_deref().unwrap_or("-"),
                claims.kid.as_deref().unwrap_or("-"),
                claims.sub.as_deref().unwrap_or("-"),
                claims.channels,
                claims.devices,
                claims.iat,
                claims.exp,
                if expired { " EXPIRED" } else { "" },
                if revoked { " REVOKED" } else { "" },
            ))
        }
        TokenCmd::Revoke {
            jti_or_token,
            data_dir,
        } => {
            let jti = if jti_or_token.starts_with("ww1.") {
                let keys = keys(&data_dir)?;
                let claims = [TokenKind::Device, TokenKind::Publisher]
                    .into_iter()
                    .find_map(|k| keys.verifier.verify(&jti_or_token, k, 0).ok())
                    .context("not a token of this relay")?;
                claims.jti.context("this token has no id (minted before ids existed); rotate the signing key to end it")?
            } else {
                jti_or_token
            };
            if jti.len() != 32 || !jti.bytes().all(|b| b.is_ascii_hexdigit()) {
                bail!("{jti:?} is not a token id (32 hex characters)");
            }
            DataDir::open(&data_dir)?.revoke(&jti)?;
            Ok(format!("revoked {jti}"))
        }
    }
}

fn revoked_ids(data_dir: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(data_dir.join(wakewire_server::data_dir::REVOKED_FILE))
        .unwrap_or_default()
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

pub(crate) fn keys_cmd(cmd: KeysCmd) -> anyhow::Result<String> {
    match cmd {
        KeysCmd::Init { data_dir } => {
            let dd = DataDir::open(&data_dir)?;
            let k = dd.keys()?;
            let (cert, _) = dd.dev_certificate()?;
            Ok(format!(
                "keys in {}: signing key {}; dev certificate {}",
                data_dir.display(),
                k.signer.kid(),
                cert.display()
            ))
        }
        KeysCmd::List { data_dir } => {
            let k = keys(&data_dir)?;
            let current = k.signer.kid();
            Ok(k.verifier
                .key_ids()
                .map(|id| {
                    if id == current {
                        format!("{id} signing")
                    } else {
                        format!("{id} retired (still accepted)")
                    }
                })
                .collect::<Vec<_>>()
                .join("\n"))
        }
        KeysCmd::Rotate { data_dir } => {
            keys(&data_dir)?;
            let (old, new) = DataDir::open(&data_dir)?.rotate_signing_key()?;
            Ok(format!(
                "new signing key {new}; {old} retired (its tokens stay valid until `wakewire-relay keys drop {old}`); restart the relay to sign with the new key"
            ))
        }
        KeysCmd::Drop { kid, data_dir } => {
            if DataDir::open(&data_dir)?.drop_retired_key(&kid)? {
                Ok(format!(
                    "{kid} dropped: its tokens are refused after the relay restarts"
                ))
            } else {
                bail!("no retired key {kid:?} in {}", data_dir.display())
            }
        }
    }
}
