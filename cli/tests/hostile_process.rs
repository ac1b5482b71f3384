//! Attacks on the relay as a process: file descriptor exhaustion must not
//! stop the publisher API for good.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tonic::Code;
use wakewire_api::pb::{publisher_client::PublisherClient, GetEventRequest};
use wakewire_server::data_dir::DataDir;
use wakewire_test_support::{authed, unix_secs};

const BIN: &str = env!("CARGO_BIN_EXE_wakewire-relay");

#[tokio::test]
async fn the_publisher_api_survives_running_out_of_file_descriptors() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let data_s = data.to_str().expect("utf-8");
    // A relay with 128 file descriptors; `prlimit` (util-linux) sets it.
    let mut child = Command::new("prlimit")
        .args(["--nofile=128:128", BIN, "serve", "--data-dir", data_s])
        .args([
            "--quic-listen",
            "127.0.0.1:0",
            "--grpc-listen",
            "127.0.0.1:0",
            "--tcp-listen",
            "127.0.0.1:0",
        ])
        .args(["--probe-listen", "off", "--metrics-listen", "off"])
        .args(["--health-listen", "off"])
        .args(["--log", "warn,wakewire_server::relay=info"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(child.stderr.take().expect("piped")).lines();
    let started = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(l) = lines.next_line().await? {
            if l.contains("relay started") {
                return Ok(l);
            }
        }
        anyhow::bail!("relay exited")
    })
    .await??;
    let grpc = started
        .split("grpc=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("grpc address")
        .to_owned();
    let (warned_tx, mut warned) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(l)) = lines.next_line().await {
            if l.contains("gRPC accept failed") {
                let _ = warned_tx.send(l);
            }
        }
    });

    // Exhaust its descriptors with idle connections.
    let mut held = vec![];
    for _ in 0..200 {
        held.push(tokio::net::TcpStream::connect(&grpc).await?);
    }
    let warning = tokio::time::timeout(Duration::from_secs(30), warned.recv())
        .await?
        .expect("warning");
    assert!(warning.contains("Too many open files"), "{warning}");
    drop(held);

    // The accept loop kept going: the API answers again.
    let keys = DataDir::open(&data)?.keys()?;
    let token = keys.publisher_token(&[], &["d".into()], Duration::from_secs(60), unix_secs());
    let mut client = None;
    for _ in 0..100 {
        // The relay notices the closed connections as it reads them; the
        // first attempts may still find it out of descriptors.
        match PublisherClient::connect(format!("http://{grpc}")).await {
            Ok(c) => {
                client = Some(c);
                break;
            }
            Err(_) => tokio::task::yield_now().await,
        }
    }
    let mut client = client.expect("the gRPC port answers again");
    let e = client
        .get_event(authed(
            GetEventRequest {
                event_id: "0".repeat(32),
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    child.kill().await?;
    Ok(())
}
