//! The command line a newcomer uses, as real processes: `serve`, `listen`
//! and `publish` show a wake arriving; bad configuration exits clearly.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStderr, ChildStdout, Command};

const BIN: &str = env!("CARGO_BIN_EXE_wakewire-relay");

fn relay_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args)
        .env_remove("WAKEWIRE_DATA_DIR")
        .env("WAKEWIRE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    c
}

/// Reads lines until one contains `needle` (bounded in time).
async fn line_with<R: tokio::io::AsyncRead + Unpin>(
    lines: &mut Lines<BufReader<R>>,
    needle: &str,
) -> anyhow::Result<String> {
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await? {
            if line.contains(needle) {
                return Ok(line);
            }
        }
        anyhow::bail!("output ended before {needle:?}")
    })
    .await
    .map_err(|_| anyhow::anyhow!("timed out waiting for {needle:?}"))?
}

fn field<'a>(line: &'a str, key: &str) -> anyhow::Result<&'a str> {
    let start = line
        .find(key)
        .ok_or_else(|| anyhow::anyhow!("no {key} in {line:?}"))?
        + key.len();
    Ok(line[start..].split_whitespace().next().unwrap_or(""))
}

struct Relay {
    child: Child,
    _stderr: Lines<BufReader<ChildStderr>>,
    quic: String,
    grpc: String,
}

async fn start_relay(data_dir: &str) -> anyhow::Result<Relay> {
    let mut child = relay_cmd(&[
        "serve",
        "--data-dir",
        data_dir,
        "--quic-listen",
        "127.0.0.1:0",
        "--grpc-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "off",
        "--probe-listen",
        "127.0.0.1:0",
        "--health-listen",
        "off",
        "--tcp-listen",
        "127.0.0.1:0",
    ])
    .spawn()?;
    let mut stderr = BufReader::new(child.stderr.take().expect("piped")).lines();
    let started = line_with(&mut stderr, "relay started").await?;
    Ok(Relay {
        quic: field(&started, "quic=")?.to_owned(),
        grpc: field(&started, "grpc=")?.to_owned(),
        child,
        _stderr: stderr,
    })
}

#[tokio::test]
async fn three_commands_show_a_wake_arriving() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8 path");
    let mut relay = start_relay(data).await?;
    assert!(std::path::Path::new(data).join("dev-cert.pem").exists());

    let mut listener = relay_cmd(&[
        "listen",
        "--relay",
        &relay.quic,
        "--server-name",
        "localhost",
        "--data-dir",
        data,
        "--channel",
        "mail",
        "--count",
        "1",
    ])
    .spawn()?;
    let mut out: Lines<BufReader<ChildStdout>> =
        BufReader::new(listener.stdout.take().expect("piped")).lines();
    let registered = line_with(&mut out, "registered channel=mail").await?;
    let channel_id = field(&registered, "id=")?.to_owned();

    let grpc = format!("http://{}", relay.grpc);
    let published = relay_cmd(&[
        "publish",
        "--grpc",
        &grpc,
        "--data-dir",
        data,
        "--channel",
        &channel_id,
        "hello device",
    ])
    .output()
    .await?;
    let stdout = String::from_utf8_lossy(&published.stdout);
    assert!(
        published.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&published.stderr)
    );
    assert!(
        stdout.contains("status=DELIVERY_STATUS_DELIVERED"),
        "{stdout}"
    );

    let wake = line_with(&mut out, "wake event=").await?;
    assert!(
        wake.contains("channel=mail") && wake.ends_with("payload=hello device"),
        "{wake}"
    );
    let status = tokio::time::timeout(Duration::from_secs(30), listener.wait()).await??;
    assert!(status.success());
    // The listener remembered the wake it printed (its dedup store lives in
    // the data directory), so a redelivery after a restart is not printed
    // twice.
    let seen =
        std::fs::read_to_string(std::path::Path::new(data).join("listen-demo-device.dedup"))?;
    assert!(wake.contains(seen.trim()), "{seen:?} not in {wake:?}");

    // A token for a device, minted offline, is accepted by the CLI's parser.
    let token = relay_cmd(&[
        "token",
        "device",
        "--device-id",
        "phone-7",
        "--data-dir",
        data,
    ])
    .output()
    .await?;
    assert!(token.status.success());
    assert!(String::from_utf8_lossy(&token.stdout).starts_with("ww1."));

    // Publishing to an unknown channel fails with the gRPC code, exit 1.
    let refused = relay_cmd(&[
        "publish",
        "--grpc",
        &grpc,
        "--data-dir",
        data,
        "--channel",
        "AAAAAAAAAAAAAAAAAAAAAA",
        "x",
    ])
    .output()
    .await?;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("NotFound"));

    // SIGTERM: graceful shutdown, exit 0.
    let pid = relay.child.id().expect("running").to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await?
        .success());
    let status = tokio::time::timeout(Duration::from_secs(30), relay.child.wait()).await??;
    assert!(status.success(), "{status}");
    Ok(())
}

#[tokio::test]
async fn bad_configuration_exits_with_a_clear_message() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().to_str().expect("utf-8");
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec!["serve", "--data-dir", data, "--idle-timeout-secs", "1"],
            vec![],
            "idle_timeout_secs",
        ),
        (
            vec!["serve", "--data-dir", data],
            vec![("WAKEWIRE_QUIC_LISTN", "x")],
            "quic_listn",
        ),
        (
            vec!["serve", "--data-dir", data, "--metrics-listen", "nowhere"],
            vec![],
            "metrics_listen",
        ),
        (
            vec!["serve", "--data-dir", data, "--config", "/nonexistent.toml"],
            vec![],
            "/nonexistent.toml",
        ),
        (
            vec![
                "token",
                "device",
                "--device-id",
                "d",
                "--data-dir",
                "/nonexistent",
            ],
            vec![],
            "no signing key",
        ),
        (
            vec!["token", "publisher", "--data-dir", data],
            vec![],
            "needs a scope",
        ),
    ];
    for (args, env, needle) in cases {
        let mut cmd = relay_cmd(&args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = tokio::time::timeout(Duration::from_secs(30), cmd.output()).await??;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    Ok(())
}

#[tokio::test]
async fn token_commands_refuse_ambiguous_scopes_and_revoke_by_id() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8");
    // Keys exist once a token has been minted... by a relay start; make them.
    wakewire_server::data_dir::DataDir::open(std::path::Path::new(data))?.keys()?;
    for bad in [
        vec!["token", "publisher", "--device-id", "*"],
        vec!["token", "publisher", "--device-id", ""],
        vec!["token", "publisher", "--channel", "not-a-channel"],
        vec!["token", "publisher"],
        vec!["token", "device", "--device-id", ""],
    ] {
        let mut args = bad.clone();
        args.extend(["--data-dir", data]);
        let out = relay_cmd(&args).output().await?;
        assert!(!out.status.success(), "{bad:?} was accepted");
        assert!(
            String::from_utf8_lossy(&out.stderr).starts_with("error: "),
            "{bad:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let minted = relay_cmd(&["token", "publisher", "--all-devices", "--data-dir", data])
        .output()
        .await?;
    assert!(minted.status.success());
    let token = String::from_utf8_lossy(&minted.stdout).trim().to_owned();
    let inspect = relay_cmd(&["token", "inspect", &token, "--data-dir", data])
        .output()
        .await?;
    let shown = String::from_utf8_lossy(&inspect.stdout).into_owned();
    assert!(
        shown.contains("kind=publisher") && shown.contains("devices=[\"*\"]"),
        "{shown}"
    );
    let revoke = relay_cmd(&["token", "revoke", &token, "--data-dir", data])
        .output()
        .await?;
    assert!(revoke.status.success());
    let inspect = relay_cmd(&["token", "inspect", &token, "--data-dir", data])
        .output()
        .await?;
    assert!(String::from_utf8_lossy(&inspect.stdout).contains("REVOKED"));
    // Key rotation: listed, and the old key's tokens still inspect.
    let rotate = relay_cmd(&["keys", "rotate", "--data-dir", data])
        .output()
        .await?;
    assert!(rotate.status.success());
    let list = relay_cmd(&["keys", "list", "--data-dir", data])
        .output()
        .await?;
    let listed = String::from_utf8_lossy(&list.stdout).into_owned();
    assert_eq!(listed.lines().count(), 2, "{listed}");
    assert!(listed.contains("retired"));
    Ok(())
}

#[tokio::test]
async fn keys_init_makes_the_keys_once_and_keeps_them() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("keys");
    let data = data.to_str().expect("utf-8");
    let first = relay_cmd(&["keys", "init", "--data-dir", data])
        .output()
        .await?;
    assert!(first.status.success(), "{first:?}");
    let secret = std::fs::read(dir.path().join("keys/channel-id.secret"))?;
    let again = relay_cmd(&["keys", "init", "--data-dir", data])
        .output()
        .await?;
    assert!(again.status.success());
    assert_eq!(first.stdout, again.stdout, "the signing key changed");
    assert_eq!(
        std::fs::read(dir.path().join("keys/channel-id.secret"))?,
        secret
    );
    // The other commands use them.
    let token = relay_cmd(&["token", "device", "--device-id", "d", "--data-dir", data])
        .output()
        .await?;
    assert!(token.status.success(), "{token:?}");
    Ok(())
}
