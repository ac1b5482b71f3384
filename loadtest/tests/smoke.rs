//! CI smoke run of the harness: a small fleet against a real relay child
//! process and the floor, every phase including a graceful-restart storm.
//! It checks that the harness works and reports what it measured, not how
//! fast anything is (timing belongs in docs/benchmarks.md).

use std::path::PathBuf;
use std::process::Command;

#[test]
fn harness_runs_every_phase_against_relay_and_floor() -> anyhow::Result<()> {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_wakewire-loadtest"));
    let relay = exe.with_file_name("wakewire-relay");
    assert!(
        relay.exists(),
        "{} is missing: run the workspace tests (cargo test --workspace) so it is built",
        relay.display()
    );
    let out = tempfile::tempdir()?;
    let status = Command::new(&exe)
        .args([
            "compare",
            "--devices",
            "300",
            "--concurrency",
            "64",
            "--endpoints",
            "2",
            "--idle-secs",
            "1",
            "--push-rate",
            "200",
            "--push-secs",
            "2",
            "--saturate-outstanding",
            "50",
            "--saturate-secs",
            "1",
            "--batch",
            "10",
            "--storm",
            "term",
            "--storm-limit-secs",
            "120",
        ])
        .arg("--relay-bin")
        .arg(&relay)
        .arg("--out")
        .arg(out.path())
        .status()?;
    assert!(status.success(), "harness failed: {status}");

    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("report.json"))?)?;
    for target in ["floor", "relay"] {
        let t = &report[target];
        assert_eq!(t["connect"]["connected"], 300, "{target}: {}", t["connect"]);
        assert_eq!(t["connect"]["failed"], 0, "{target}");
        assert!(
            t["push"]["received"].as_u64().unwrap_or(0) > 0,
            "{target}: no wake arrived"
        );
        assert!(
            t["push"]["latency"]["count"].as_u64().unwrap_or(0) > 0,
            "{target}: no latency"
        );
        assert!(
            t["saturate"]["per_s"].as_f64().unwrap_or(0.0) > 0.0,
            "{target}: no saturation throughput"
        );
        assert!(
            t["idle"]["rss_idle_mib"].as_f64().unwrap_or(0.0) > 0.0,
            "{target}: RSS not sampled"
        );
    }
    let relay_push = &report["relay"]["push"]["publish"]["statuses"];
    assert!(
        relay_push["delivered"].as_u64().unwrap_or(0) > 0,
        "{relay_push}"
    );
    let storm = &report["relay"]["storm"];
    assert_eq!(storm["recovered"], 300, "{storm}");
    assert!(storm["recovery_s"].is_number(), "{storm}");

    let md = std::fs::read_to_string(out.path().join("report.md"))?;
    assert!(
        md.contains("| handshakes/s") && md.contains("relay/floor"),
        "{md}"
    );
    for plot in ["latency.svg", "rss.svg", "storm.svg"] {
        let svg = std::fs::read_to_string(out.path().join(plot))?;
        assert!(svg.contains("<polyline"), "{plot} has no data");
    }
    Ok(())
}

#[test]
fn ack_flood_benchmark_runs_its_three_phases() -> anyhow::Result<()> {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_wakewire-loadtest"));
    let out = tempfile::tempdir()?;
    let status = Command::new(&exe)
        .args([
            "ack-flood",
            "--devices",
            "10",
            "--rate",
            "50",
            "--phase-secs",
            "1",
        ])
        .arg("--out")
        .arg(out.path())
        .status()?;
    assert!(status.success());
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("ackflood.json"))?)?;
    let phases = report["phases"].as_array().expect("phases");
    assert_eq!(phases.len(), 3);
    // Every good device's wake arrived in every phase, flood or not.
    for p in phases {
        assert_eq!(p["delivered"], 50, "{p}");
    }
    assert!(phases[1]["flood_connections"].as_u64() > Some(0));
    Ok(())
}

#[test]
fn hello_flood_benchmark_runs_its_three_variants() -> anyhow::Result<()> {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_wakewire-loadtest"));
    let out = tempfile::tempdir()?;
    let status = Command::new(&exe)
        .args([
            "hello-flood",
            "--flood-rate",
            "2000",
            "--secs",
            "1",
            "--concurrency",
            "4",
        ])
        .arg("--out")
        .arg(out.path())
        .status()?;
    assert!(status.success());
    let runs: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        out.path().join("helloflood.json"),
    )?)?;
    let runs = runs.as_array().expect("runs");
    assert_eq!(runs.len(), 3);
    assert!(runs[0]["connected"].as_u64() > Some(0), "{}", runs[0]);
    assert!(
        runs[1]["connected"].as_u64() > Some(0),
        "with Retry: {}",
        runs[1]
    );
    Ok(())
}
