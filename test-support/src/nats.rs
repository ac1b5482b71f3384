//! Real `nats-server` processes with JetStream, clustered on loopback, for
//! cluster-mode tests and benchmarks. `nats-server` comes from Debian's
//! package (`.ci/run` installs it) or `WAKEWIRE_NATS_SERVER`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::process::{Child, Command};

/// Whether nats-server is installed (see [`crate::tool_or_skip`]).
pub fn nats_or_skip() -> bool {
    crate::tool_or_skip(
        "nats-server",
        nats_server_bin().map(|_| ()).map_err(|e| e.to_string()),
    )
}

/// The `nats-server` binary to run.
pub fn nats_server_bin() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("WAKEWIRE_NATS_SERVER") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("WAKEWIRE_NATS_SERVER={} is not a file", p.display());
        }
        return Ok(p);
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = PathBuf::from(dir).join("nats-server");
        if p.is_file() {
            return Ok(p);
        }
    }
    for p in ["/usr/sbin/nats-server", "/usr/bin/nats-server"] {
        if PathBuf::from(p).is_file() {
            return Ok(PathBuf::from(p));
        }
    }
    bail!("nats-server not found: install it (apt-get install nats-server) or set WAKEWIRE_NATS_SERVER")
}

struct Node {
    client_port: u16,
    conf: PathBuf,
    child: Option<Child>,
}

/// N `nats-server` processes forming one JetStream cluster (a single
/// server without clustering when N = 1).
pub struct NatsCluster {
    _dir: tempfile::TempDir,
    nodes: Vec<Node>,
    bin: PathBuf,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl NatsCluster {
    /// Starts `n` servers and waits until JetStream answers.
    pub async fn start(n: usize) -> anyhow::Result<Self> {
        let bin = nats_server_bin()?;
        let dir = tempfile::tempdir()?;
        let ports: Vec<(u16, u16)> = (0..n)
            .map(|_| Ok((free_port()?, free_port()?)))
            .collect::<anyhow::Result<_>>()?;
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, c)| format!("nats-route://127.0.0.1:{c}"))
            .collect();
        let mut nodes = Vec::new();
        for (i, (client, cluster)) in ports.iter().enumerate() {
            let store = dir.path().join(format!("n{i}"));
            std::fs::create_dir_all(&store)?;
            let cluster_block = if n > 1 {
                format!(
                    "cluster {{ name: wakewire_test, listen: 127.0.0.1:{cluster}, routes: [{}] }}",
                    routes.join(", ")
                )
            } else {
                String::new()
            };
            let conf = dir.path().join(format!("n{i}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "server_name: n{i}\nlisten: 127.0.0.1:{client}\n\
                     jetstream {{ store_dir: \"{}\", max_memory_store: 268435456, max_file_store: 4294967296 }}\n\
                     {cluster_block}\n",
                    store.display()
                ),
            )?;
            nodes.push(Node {
                client_port: *client,
                conf,
                child: None,
            });
        }
        let mut c = Self {
            _dir: dir,
            nodes,
            bin,
        };
        for i in 0..n {
            c.start_node(i)?;
        }
        c.wait_ready(Duration::from_secs(60)).await?;
        Ok(c)
    }

    /// Starts (or starts again, with its stored data) node `i`.
    pub fn start_node(&mut self, i: usize) -> anyhow::Result<()> {
        let node = &mut self.nodes[i];
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&node.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin.display()))?;
        node.child = Some(child);
        Ok(())
    }

    /// SIGKILL of node `i` (a crash).
    pub async fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(mut c) = self.nodes[i].child.take() {
            c.kill().await?;
        }
        Ok(())
    }

    /// Stops every node (SIGKILL).
    pub async fn kill_all(&mut self) -> anyhow::Result<()> {
        for i in 0..self.nodes.len() {
            self.kill(i).await?;
        }
        Ok(())
    }

    /// Starts every stopped node and waits for JetStream.
    pub async fn start_all(&mut self) -> anyhow::Result<()> {
        for i in 0..self.nodes.len() {
            if self.nodes[i].child.is_none() {
                self.start_node(i)?;
            }
        }
        self.wait_ready(Duration::from_secs(60)).await
    }

    /// The client URL of node `i`.
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].client_port)
    }

    /// Every client URL, comma-separated (the `cluster_nats_urls` form).
    pub fn urls(&self) -> String {
        (0..self.nodes.len())
            .map(|i| self.url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until some running node answers JetStream API requests (a
    /// meta leader is elected).
    pub async fn wait_ready(&self, within: Duration) -> anyhow::Result<()> {
        tokio::time::timeout(within, async {
            loop {
                for (i, n) in self.nodes.iter().enumerate() {
                    if n.child.is_some() && self.answers(i).await {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
        .await
        .map_err(|_| anyhow::anyhow!("JetStream not ready within {within:?}"))
    }

    /// Whether node `i` answers a JetStream API request without an error.
    async fn answers(&self, i: usize) -> bool {
        let Ok(Ok(client)) =
            tokio::time::timeout(Duration::from_secs(2), async_nats::connect(self.url(i))).await
        else {
            return false;
        };
        let info = tokio::time::timeout(
            Duration::from_secs(2),
            client.request("$JS.API.INFO", "".into()),
        )
        .await;
        matches!(info, Ok(Ok(m)) if !String::from_utf8_lossy(&m.payload).contains("\"error\""))
    }
}

/// Data directories for `n` relays of one cluster: the first made by the
/// relay's own code (signing key, channel secret, dev certificate), the
/// others copies of its files, as an operator distributes them.
pub fn shared_data_dirs(n: usize) -> anyhow::Result<(tempfile::TempDir, Vec<PathBuf>)> {
    let root = tempfile::tempdir()?;
    let first = root.path().join("relay-0");
    let dd = wakewire_server::data_dir::DataDir::open(&first)?;
    dd.keys()?;
    dd.dev_certificate()?;
    let mut dirs = vec![first.clone()];
    for i in 1..n {
        let d = root.path().join(format!("relay-{i}"));
        copy_dir(&first, &d)?;
        dirs.push(d);
    }
    Ok((root, dirs))
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}
