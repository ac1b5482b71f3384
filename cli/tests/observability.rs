//! What an operator scrapes and collects, from a real relay process: every
//! metric documented and used by the dashboard and alerts is exported, as a
//! Prometheus histogram where it is a latency; logs come as JSON lines.

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use wakewire_api::pb::{DeliveryStatus, PublishRequest};
use wakewire_sdk::ClientBuilder;
use wakewire_server::data_dir::{DataDir, DEV_CERT_FILE};
use wakewire_test_support::metrics::{metric_names as names, scrape};
use wakewire_test_support::{authed, unix_secs};

const BIN: &str = env!("CARGO_BIN_EXE_wakewire-relay");

fn repo_file(path: &str) -> anyhow::Result<String> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path);
    Ok(std::fs::read_to_string(p)?)
}

/// `wakewire_relay_*` names in a text.

#[tokio::test]
async fn the_dashboard_and_alerts_use_only_exported_metrics_and_logs_are_json() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let metrics_port = wakewire_test_support::free_port()?;
    let mut child = Command::new(BIN)
        .args(["serve", "--data-dir"])
        .arg(&data)
        .args([
            "--quic-listen",
            "127.0.0.1:0",
            "--grpc-listen",
            "127.0.0.1:0",
            "--tcp-listen",
            "127.0.0.1:0",
        ])
        .args(["--probe-listen", "off", "--health-listen", "off"])
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
        .args(["--log-format", "json", "--log", "info"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(child.stderr.take().expect("piped")).lines();
    let started: serde_json::Value = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(l) = lines.next_line().await? {
            let v: serde_json::Value = serde_json::from_str(&l)
                .map_err(|e| anyhow::anyhow!("not a JSON log line: {l:?}: {e}"))?;
            if v["message"] == "relay started" {
                return Ok(v);
            }
        }
        anyhow::bail!("relay exited")
    })
    .await??;
    assert!(
        started["level"] == "INFO" && started["timestamp"].is_string(),
        "{started}"
    );
    let quic: std::net::SocketAddr = started["quic"].as_str().expect("quic").parse()?;
    let grpc = started["grpc"].as_str().expect("grpc").to_owned();

    // A short demo: a device, a delivered publish.
    let keys = DataDir::open(&data)?.keys()?;
    let client = ClientBuilder::new(quic.to_string())
        .server_name("localhost")
        .trust_pem_file(data.join(DEV_CERT_FILE))
        .device_token(keys.device_token("d", Duration::from_secs(600), unix_secs()))
        .connect()
        .await?;
    let ch = client.channel("c").register().await?.into_string();
    let token = keys.publisher_token(
        std::slice::from_ref(&ch),
        &[],
        Duration::from_secs(600),
        unix_secs(),
    );
    let mut p =
        wakewire_api::pb::publisher_client::PublisherClient::connect(format!("http://{grpc}"))
            .await?;
    let r = p
        .publish(authed(
            PublishRequest {
                channel_id: ch,
                payload: b"x".to_vec(),
                ..Default::default()
            },
            &token,
        ))
        .await?
        .into_inner();
    assert_eq!(r.status(), DeliveryStatus::Delivered);
    client.close().await;

    let body = scrape(metrics_port).await?;
    let exported = names(&body);
    // A single node exports every metric but the cluster's (checked by
    // the cluster tests).
    let cluster_only: BTreeSet<String> = repo_file("docs/operations.md")?
        .lines()
        .filter(|l| l.contains("| cluster mode"))
        .flat_map(names)
        .collect();
    for name in names(&repo_file("docs/operations.md")?) {
        if cluster_only.contains(&name) {
            continue;
        }
        let hist = body.contains(&format!("# TYPE {name} histogram"));
        assert!(
            exported.contains(&name) || hist,
            "documented metric {name} is not exported:\n{body}"
        );
    }
    for file in [
        "deploy/grafana/wakewire.json",
        "deploy/prometheus/alerts.yaml",
    ] {
        for name in names(&repo_file(file)?) {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name);
            if cluster_only.contains(base) {
                continue;
            }
            assert!(
                exported.contains(&name),
                "{file} uses {name}, not in the scrape"
            );
        }
    }
    // Latencies are histograms (aggregatable), not summaries.
    for h in [
        "wakewire_relay_publish_seconds",
        "wakewire_relay_wake_to_ack_seconds",
        "wakewire_relay_store_commit_seconds",
    ] {
        assert!(
            body.contains(&format!("# TYPE {h} histogram")),
            "{h} is not a histogram"
        );
        assert!(
            body.contains(&format!("{h}_bucket{{le=")),
            "{h} has no buckets"
        );
    }
    child.kill().await?;
    Ok(())
}
