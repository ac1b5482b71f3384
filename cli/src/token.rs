//! `wakewire-relay token`: mint device and publisher tokens with the
//! signing key in the data directory.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::Subcommand;

use crate::{keys, parse_duration, unix_secs};

#[derive(Subcommand)]
pub(crate) enum TokenCmd {
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

pub(crate) fn mint(cmd: TokenCmd) -> anyhow::Result<String> {
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
