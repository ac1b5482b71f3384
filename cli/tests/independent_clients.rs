//! Independent clients against the relay process: a publisher written with
//! Python grpcio (gRPC C-core, the stack the field report came from), with
//! stubs generated from our `.proto` by grpcio-tools. The test installs both
//! with pip into a directory under `target/` from PyPI (about 10 s the first
//! time).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use wakewire_sdk::{ClientBuilder, KeepalivePolicy};
use wakewire_server::data_dir::{DataDir, DEV_CERT_FILE};
use wakewire_test_support::process::RelayProcess;
use wakewire_test_support::unix_secs;

const BIN: &str = env!("CARGO_BIN_EXE_wakewire-relay");

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output()?;
    if !out.status.success() {
        anyhow::bail!(
            "{cmd:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// grpcio and grpcio-tools installed (with pip, into a directory under
/// `target/`: no virtualenv needed) and stubs generated from the publisher
/// API; returns (python, PYTHONPATH with both).
fn python_with_stubs() -> anyhow::Result<(PathBuf, String)> {
    let root = workspace().join("target/independent-clients");
    let site = root.join("site-packages");
    let python = PathBuf::from("python3");
    if !site.join("grpc_tools").exists() {
        run(Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .arg("--target")
            .arg(&site)
            .args(["grpcio==1.*", "grpcio-tools==1.*"]))?;
    }
    let stubs = root.join("stubs");
    std::fs::create_dir_all(&stubs)?;
    let proto = workspace().join("api/proto");
    run(Command::new(&python)
        .env("PYTHONPATH", &site)
        .args(["-m", "grpc_tools.protoc"])
        .arg(format!("-I{}", proto.display()))
        .arg(format!("--python_out={}", stubs.display()))
        .arg(format!("--grpc_python_out={}", stubs.display()))
        .arg(proto.join("wakewire/publish/v1/publisher.proto")))?;
    for pkg in ["wakewire", "wakewire/publish", "wakewire/publish/v1"] {
        std::fs::write(stubs.join(pkg).join("__init__.py"), "")?;
    }
    Ok((python, format!("{}:{}", site.display(), stubs.display())))
}

#[tokio::test]
async fn a_python_grpcio_publisher_sees_idempotent_retries_and_clear_errors() -> anyhow::Result<()>
{
    let (python, pythonpath) = tokio::task::spawn_blocking(python_with_stubs).await??;
    let stubs = pythonpath.rsplit(':').next().unwrap_or_default().to_owned();
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let any = "127.0.0.1:0".parse()?;
    let mut relay = RelayProcess::start(Path::new(BIN), &data, any, any, &[]).await?;
    let keys = DataDir::open(&data)?.keys()?;
    let device = |id: &str| {
        ClientBuilder::new(relay.quic.to_string())
            .server_name("localhost")
            .trust_pem_file(data.join(DEV_CERT_FILE))
            .device_token(keys.device_token(id, Duration::from_secs(3600), unix_secs()))
            .keepalive(KeepalivePolicy::Fixed(Duration::from_secs(600)))
    };
    let online = device("py-online").connect().await?;
    let channel = online.channel("c").register().await?;
    let offline = device("py-offline").connect().await?;
    let offline_channel = offline.channel("c").register().await?;
    offline.close().await;
    let token = keys.publisher_token(
        &[],
        &["py-online".into(), "py-offline".into()],
        Duration::from_secs(3600),
        unix_secs(),
    );
    let script = workspace().join("cli/tests/independent/publisher_grpcio.py");
    let out = tokio::process::Command::new(&python)
        .env("PYTHONPATH", &pythonpath)
        .arg(&script)
        .arg("--stubs")
        .arg(&stubs)
        .args(["--grpc", &relay.grpc.to_string()])
        .args(["--token", &token])
        // `--name=value`: a base64url channel id may start with '-', which
        // argparse would take for an option.
        .arg(format!("--channel={channel}"))
        .arg(format!("--offline-channel={offline_channel}"))
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), out).await??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the grpcio publisher failed");
    for check in [
        "ok idempotent retry",
        "ok reused key refused",
        "ok collapse key bounded",
        "ok unauthenticated",
        "ok publish stream",
        "ok receipts and GetEvent",
    ] {
        assert!(stdout.contains(check), "missing {check:?}");
    }
    online.close().await;
    relay.kill().await?;
    Ok(())
}
