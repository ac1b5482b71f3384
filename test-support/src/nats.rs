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
    log: PathBuf,
    child: Option<Child>,
}

/// N `nats-server` processes forming one JetStream cluster (a single
/// server without clustering when N = 1).
pub struct NatsCluster {
    _dir: tempfile::TempDir,
    nodes: Vec<Node>,
    bin: PathBuf,
}

impl NatsCluster {
    /// Starts `n` servers and waits until JetStream can place a stream on
    /// all of them. A node that exits at start (its port taken meanwhile)
    /// makes a new attempt with fresh ports.
    pub async fn start(n: usize) -> anyhow::Result<Self> {
        let mut last = None;
        for _ in 0..3 {
            match Self::start_once(n).await {
                Ok(c) => return Ok(c),
                Err(e) => {
                    eprintln!("nats cluster did not start, trying fresh ports: {e:#}");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("nats cluster did not start")))
    }

    async fn start_once(n: usize) -> anyhow::Result<Self> {
        let bin = nats_server_bin()?;
        let dir = tempfile::tempdir()?;
        let ports: Vec<(u16, u16)> = (0..n)
            .map(|_| Ok((crate::free_port()?, crate::free_port()?)))
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
                     log_file: \"{}\"\n\
                     jetstream {{ store_dir: \"{}\", max_memory_store: 268435456, max_file_store: 4294967296 }}\n\
                     {cluster_block}\n",
                    dir.path().join(format!("n{i}.log")).display(),
                    store.display()
                ),
            )?;
            nodes.push(Node {
                client_port: *client,
                conf,
                log: dir.path().join(format!("n{i}.log")),
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

    /// Waits until JetStream answers and, with more than one node, can
    /// place a stream on every node (the relays' replicated streams need
    /// all of them: a cluster missing a node elects a meta leader and
    /// answers API requests, yet refuses placement). Fails at once, with
    /// its log, if a node has exited.
    pub async fn wait_ready(&mut self, within: Duration) -> anyhow::Result<()> {
        let waited = tokio::time::timeout(within, async {
            loop {
                self.check_running()?;
                for i in 0..self.nodes.len() {
                    if self.nodes[i].child.is_some() && self.ready(i).await {
                        return Ok(());
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
        .await;
        match waited {
            Ok(result) => result,
            Err(_) => {
                let logs: Vec<String> = (0..self.nodes.len()).map(|i| self.log_tail(i)).collect();
                bail!(
                    "JetStream not ready within {within:?}:\n{}",
                    logs.join("\n")
                )
            }
        }
    }

    /// An error naming the first started node that has exited.
    fn check_running(&mut self) -> anyhow::Result<()> {
        for i in 0..self.nodes.len() {
            if let Some(child) = self.nodes[i].child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.nodes[i].child = None;
                    bail!("nats node n{i} exited ({status}):\n{}", self.log_tail(i));
                }
            }
        }
        Ok(())
    }

    /// The last lines of node `i`'s log.
    fn log_tail(&self, i: usize) -> String {
        let log = std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n");
        format!("--- n{i} log ---\n{tail}")
    }

    /// Whether node `i` answers JetStream requests and, with more than one
    /// node, places (then deletes) a probe stream replicated on all nodes.
    async fn ready(&self, i: usize) -> bool {
        let Ok(Ok(client)) =
            tokio::time::timeout(Duration::from_secs(2), async_nats::connect(self.url(i))).await
        else {
            return false;
        };
        if self.nodes.len() == 1 {
            let info = tokio::time::timeout(
                Duration::from_secs(2),
                client.request("$JS.API.INFO", "".into()),
            )
            .await;
            return matches!(info, Ok(Ok(m)) if !String::from_utf8_lossy(&m.payload).contains("\"error\""));
        }
        let js = async_nats::jetstream::new(client);
        let probe = async_nats::jetstream::stream::Config {
            name: "WAKEWIRE_TEST_PROBE".into(),
            subjects: vec!["wakewire-test-probe".into()],
            num_replicas: self.nodes.len(),
            ..Default::default()
        };
        tokio::time::timeout(Duration::from_secs(5), async {
            js.create_stream(probe).await.is_ok()
                && js.delete_stream("WAKEWIRE_TEST_PROBE").await.is_ok()
        })
        .await
        .unwrap_or(false)
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
