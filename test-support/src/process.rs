//! A `wakewire-relay serve` child process: started on loopback, its bound
//! addresses read from its start-up log line, killed like a crash or
//! stopped gracefully, restarted on the same ports and data directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A relay child process.
pub struct RelayProcess {
    child: Child,
    bin: PathBuf,
    data_dir: PathBuf,
    extra: Vec<String>,
    /// Device endpoint.
    pub quic: SocketAddr,
    /// gRPC endpoint.
    pub grpc: SocketAddr,
    /// TLS-over-TCP device endpoint, when the relay listens on one.
    pub tcp: Option<SocketAddr>,
}

impl RelayProcess {
    /// Starts `bin serve` with `data_dir` on the given addresses (port 0 =
    /// any), plus `extra` flags.
    pub async fn start(
        bin: &Path,
        data_dir: &Path,
        quic: SocketAddr,
        grpc: SocketAddr,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let metrics_off: &[&str] = if extra.contains(&"--metrics-listen") {
            &[]
        } else {
            &["--metrics-listen", "off"]
        };
        // Nor the fixed default TCP device port.
        let tcp_any: &[&str] = if extra.contains(&"--tcp-listen") {
            &[]
        } else {
            &["--tcp-listen", "127.0.0.1:0"]
        };
        let mut child = Command::new(bin)
            .args([
                "serve",
                "--log",
                "wakewire_server::relay=info,wakewire_server::cluster=info,warn",
            ])
            .args(metrics_off)
            .args(tcp_any)
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--quic-listen")
            .arg(quic.to_string())
            .arg("--grpc-listen")
            .arg(grpc.to_string())
            .args(["--probe-listen", "127.0.0.1:0"])
            // Several relays run at once in tests and benchmarks: none may
            // take the fixed default health port.
            .args(["--health-listen", "off"])
            .args(extra)
            .env_remove("WAKEWIRE_LOG")
            // The tests' own setting, not the relay's (it would refuse it).
            .env_remove("WAKEWIRE_NATS_SERVER")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let mut lines = BufReader::new(child.stderr.take().context("stderr")?).lines();
        // Longer than a cluster relay's own wait for a JetStream quorum
        // (60 s: a fresh 3-node NATS cluster can answer API requests before
        // it can place R3 streams); a relay on its embedded store starts
        // in well under a second.
        let started = tokio::time::timeout(Duration::from_secs(75), async {
            while let Some(line) = lines.next_line().await? {
                if line.contains("relay started") {
                    return Ok(line);
                }
                eprintln!("relay: {line}");
            }
            bail!("relay exited before it started")
        })
        .await
        .context("relay did not start within 75 s")??;
        // Keep draining stderr so the relay never blocks on a full pipe.
        // RELAY_TEST_LOGS=1 shows every line (for debugging).
        let all = std::env::var_os("RELAY_TEST_LOGS").is_some();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if all || line.contains("WARN") || line.contains("ERROR") {
                    eprintln!("relay: {line}");
                }
            }
        });
        let field = |key: &str| -> anyhow::Result<SocketAddr> {
            let start = started
                .find(key)
                .context("address missing in the start line")?
                + key.len();
            Ok(started[start..]
                .split_whitespace()
                .next()
                .unwrap_or("")
                .parse()?)
        };
        Ok(Self {
            quic: field("quic=")?,
            grpc: field("grpc=")?,
            tcp: field("tcp=").ok(),
            child,
            bin: bin.to_owned(),
            data_dir: data_dir.to_owned(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        })
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// SIGKILL, as a crash; waits for the process to be gone.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }

    /// SIGTERM (graceful: GoAway to every device), then waits.
    pub async fn terminate(&mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.child.id() {
            Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await?;
        }
        tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await??;
        Ok(())
    }

    /// Starts a new relay on the same ports and data directory (retrying
    /// while the old sockets are released).
    pub async fn restart(&self) -> anyhow::Result<RelayProcess> {
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        let mut last = None;
        for _ in 0..50 {
            match RelayProcess::start(&self.bin, &self.data_dir, self.quic, self.grpc, &extra).await
            {
                Ok(r) => return Ok(r),
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("restart failed")))
    }
}
