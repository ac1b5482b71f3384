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

pub use wakewire_test_support::process::RelayProcess as RelayProc;

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
