//! Child processes under test: the relay (`wakewire-relay serve`) and the
//! raw-quinn floor server (`wakewire-loadtest floor-server`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// Finds a sibling binary of the running executable (both live in
/// `target/<profile>/`).
pub fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("executable has no directory")?;
    let candidate = dir.join(name);
    if candidate.exists() {
        return Ok(candidate);
    }
    // Test binaries live in target/<profile>/deps.
    let up = dir.parent().map(|p| p.join(name));
    match up {
        Some(p) if p.exists() => Ok(p),
        _ => bail!("{name} not found next to {}; build it (cargo build --release --workspace) or pass its path", exe.display()),
    }
}

/// A relay child process.
pub struct RelayProc {
    child: Child,
    bin: PathBuf,
    data_dir: PathBuf,
    /// Device endpoint.
    pub quic: SocketAddr,
    /// gRPC endpoint.
    pub grpc: SocketAddr,
}

impl RelayProc {
    /// Starts `bin serve` on loopback (port 0 = any) with `data_dir`.
    pub async fn start(
        bin: &Path,
        data_dir: &Path,
        quic: SocketAddr,
        grpc: SocketAddr,
    ) -> anyhow::Result<Self> {
        let mut child = Command::new(bin)
            .args([
                "serve",
                "--metrics-listen",
                "off",
                "--log",
                "wakewire_server::relay=info,warn",
            ])
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--quic-listen")
            .arg(quic.to_string())
            .arg("--grpc-listen")
            .arg(grpc.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let mut lines = BufReader::new(child.stderr.take().context("stderr")?).lines();
        let started = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await? {
                if line.contains("relay started") {
                    return Ok(line);
                }
                eprintln!("relay: {line}");
            }
            bail!("relay exited before it started")
        })
        .await
        .context("relay did not start within 30 s")??;
        // Keep draining stderr so the relay never blocks on a full pipe.
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("WARN") || line.contains("ERROR") {
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
            child,
            bin: bin.to_owned(),
            data_dir: data_dir.to_owned(),
        })
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// SIGKILL, as a crash.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }

    /// SIGTERM (graceful: GoAway to every device), then wait.
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

    /// Starts a new relay on the same ports and data directory.
    pub async fn restart(&self) -> anyhow::Result<RelayProc> {
        let mut last = None;
        for _ in 0..50 {
            match RelayProc::start(&self.bin, &self.data_dir, self.quic, self.grpc).await {
                Ok(r) => return Ok(r),
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("restart failed")))
    }
}

/// The floor server child process, driven by line commands on stdin.
pub struct FloorProc {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    /// Its UDP address.
    pub addr: SocketAddr,
}

impl FloorProc {
    /// Starts `wakewire-loadtest floor-server` with the given certificate.
    pub async fn start(cert: &Path, key: &Path) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .args(["floor-server", "--listen", "127.0.0.1:0"])
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let stdin = child.stdin.take().context("stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let ready = tokio::time::timeout(Duration::from_secs(30), stdout.next_line())
            .await
            .context("floor server did not start")??
            .context("floor server exited")?;
        let v: serde_json::Value = serde_json::from_str(&ready)?;
        let addr = v["ready"].as_str().context("no ready line")?.parse()?;
        Ok(Self {
            child,
            stdin,
            stdout,
            addr,
        })
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Sends a command line and returns the JSON answer.
    pub async fn command(
        &mut self,
        line: &str,
        timeout: Duration,
    ) -> anyhow::Result<serde_json::Value> {
        self.stdin.write_all(format!("{line}\n").as_bytes()).await?;
        self.stdin.flush().await?;
        let answer = tokio::time::timeout(timeout, self.stdout.next_line())
            .await
            .context("floor server did not answer")??
            .context("floor server exited")?;
        Ok(serde_json::from_str(&answer)?)
    }
}
