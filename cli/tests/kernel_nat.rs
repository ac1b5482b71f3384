//! The adaptive keepalive against the Linux kernel's own NAT (netfilter
//! masquerade in network namespaces), on a compressed time scale: the relay
//! and a `listen` device are real processes on either side of the router,
//! and conntrack's two UDP timeouts are set per test.
//!
//! What must hold (issue 12): the device learns the timeout that applies
//! to its own connection (conntrack's stream timeout), not the shorter one
//! of one-shot flows; a timeout that shrinks is noticed at the first lost
//! binding, even on a NAT that gives the old port back; the learned lower
//! bound never exceeds the real timeout; wakes arrive.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;
use tokio::sync::mpsc;
use wakewire_test_support::kernel_nat::{create_or_skip, KernelNat, NatSpec, RELAY_ADDR};

const BIN: &str = env!("CARGO_BIN_EXE_wakewire-relay");

/// Tuner durations x 0.1: start 2.5 s, minimum 1.5 s.
const SCALE: &str = "0.1";

struct Scene {
    // Processes before namespaces: they must end first.
    _relay: Child,
    device: Child,
    lines: mpsc::UnboundedReceiver<String>,
    data: tempfile::TempDir,
    nat: KernelNat,
}

/// Forwards a child's output lines, prefixed.
fn forward<R: tokio::io::AsyncRead + Unpin + Send + 'static>(
    r: R,
    prefix: &'static str,
    tx: mpsc::UnboundedSender<String>,
) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(r).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            if std::env::var_os("KERNEL_NAT_LOGS").is_some() {
                eprintln!("{prefix}{l}");
            }
            let _ = tx.send(format!("{prefix}{l}"));
        }
    });
}

impl Scene {
    async fn start(spec: NatSpec) -> anyhow::Result<Option<Self>> {
        Self::start_full(spec, None, "quic", None).await
    }

    /// `relay_name`: the name the device connects to (made to resolve to
    /// the relay's IPv4 and a broken IPv6 address), instead of its address;
    /// `tcp_established_s`: conntrack's timeout for established TCP.
    async fn start_full(
        spec: NatSpec,
        relay_name: Option<&str>,
        transport: &str,
        tcp_established_s: Option<u32>,
    ) -> anyhow::Result<Option<Self>> {
        let Some(nat) = create_or_skip(spec) else {
            return Ok(None);
        };
        if let Some(t) = tcp_established_s {
            nat.set_tcp_timeout(t).map_err(anyhow::Error::msg)?;
        }
        if let Some(name) = relay_name {
            nat.broken_ipv6_name(name).map_err(anyhow::Error::msg)?;
        }
        let data = tempfile::tempdir()?;
        let dir = data.path().to_str().expect("utf-8").to_owned();
        let (tx, mut lines) = mpsc::unbounded_channel();
        let quic = format!("{RELAY_ADDR}:4433");
        let mut relay = nat
            .command(&nat.relay, BIN)
            .args(["serve", "--data-dir", &dir, "--quic-listen", &quic])
            .args(["--tcp-listen", &quic, "--grpc-listen", "127.0.0.1:50051"])
            .args(["--probe-listen", &format!("{RELAY_ADDR}:4434")])
            .args(["--health-listen", "off", "--metrics-listen", "off"])
            .env("WAKEWIRE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        forward(relay.stderr.take().expect("piped"), "relay: ", tx.clone());
        wait_line(&mut lines, |l| l.contains("relay started")).await?;
        let target = match relay_name {
            Some(name) => format!("{name}:4433"),
            None => quic.clone(),
        };
        let mut device = nat
            .command(&nat.dev, BIN)
            .args(["listen", "--data-dir", &dir, "--relay", &target])
            .args(["--server-name", "localhost", "--transport", transport])
            .args(["--keepalive", "adaptive", "--tuner-scale", SCALE])
            .args(["--network-id", "kernel-nat", "--dedup-store", "off"])
            .env("WAKEWIRE_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        forward(device.stdout.take().expect("piped"), "out: ", tx.clone());
        forward(device.stderr.take().expect("piped"), "err: ", tx);
        Ok(Some(Self {
            _relay: relay,
            device,
            lines,
            data,
            nat,
        }))
    }

    /// The channel id `listen` printed when it registered.
    async fn channel_id(&mut self) -> anyhow::Result<String> {
        let registered = wait_line(&mut self.lines, |l| l.starts_with("out: registered")).await?;
        registered
            .split("id=")
            .nth(1)
            .map(str::to_owned)
            .ok_or_else(|| anyhow::anyhow!("no channel id in {registered:?}"))
    }

    /// The next "keepalive converged" line, its interval and lower bound (s).
    async fn converged(&mut self) -> anyhow::Result<(String, f64, f64)> {
        let line = wait_line(&mut self.lines, |l| l.contains("keepalive converged")).await?;
        let interval = secs(&line, "interval=").ok_or_else(|| anyhow::anyhow!("{line}"))?;
        let lower = secs(&line, "nat_timeout>").ok_or_else(|| anyhow::anyhow!("{line}"))?;
        Ok((line, interval, lower))
    }

    async fn publish(&self, channel_id: &str, payload: &str) -> anyhow::Result<()> {
        let dir = self.data.path().to_str().expect("utf-8");
        let out = self
            .nat
            .command(&self.nat.relay, BIN)
            .args([
                "publish",
                "--data-dir",
                dir,
                "--channel",
                channel_id,
                payload,
            ])
            .args(["--grpc", "http://127.0.0.1:50051"])
            .output()
            .await?;
        anyhow::ensure!(
            out.status.success(),
            "publish failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }
}

/// The next line matching `pred` (bounded: 120 s).
async fn wait_line(
    lines: &mut mpsc::UnboundedReceiver<String>,
    pred: impl Fn(&str) -> bool,
) -> anyhow::Result<String> {
    tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(l) = lines.recv().await {
            if pred(&l) {
                return Ok(l);
            }
        }
        anyhow::bail!("output ended")
    })
    .await
    .map_err(|_| anyhow::anyhow!("timed out waiting for a line"))?
}

/// `key=<duration>` in a status line, in seconds ("7.3s", "950ms").
fn secs(line: &str, key: &str) -> Option<f64> {
    let start = line.find(key)? + key.len();
    let v: String = line[start..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == 'µ')
        .collect();
    if let Some(ms) = v.strip_suffix("ms") {
        ms.parse::<f64>().ok().map(|x| x / 1e3)
    } else if let Some(us) = v.strip_suffix("µs") {
        us.parse::<f64>().ok().map(|x| x / 1e6)
    } else {
        v.strip_suffix('s')?.parse().ok()
    }
}

#[test]
fn durations_in_status_lines_parse() {
    let l = "keepalive converged network=n interval=7.256s nat_timeout>7.9s <8.1s";
    assert_eq!(secs(l, "interval="), Some(7.256));
    assert_eq!(secs(l, "nat_timeout>"), Some(7.9));
    assert_eq!(secs("binding lost after 950ms idle", "after "), Some(0.95));
}

/// conntrack: one-shot flows 3 s, two-way streams 8 s; plain masquerade
/// (ports preserved). The device must settle between the two, close to
/// 8 s; then the stream timeout drops to 4 s and the device must notice
/// the first lost binding (no port changes to see) and settle below 4 s.
#[tokio::test]
async fn the_stream_timeout_is_learned_and_a_shrinking_one_is_seen_on_a_port_preserving_nat(
) -> anyhow::Result<()> {
    let spec = NatSpec {
        fully_random: false,
        unreplied_s: 3,
        stream_s: 8,
    };
    let Some(mut s) = Scene::start(spec).await? else {
        return Ok(());
    };
    let channel_id = s.channel_id().await?;
    let (converged, interval, lower) = s.converged().await?;
    assert!(
        interval > 3.0 && interval < 8.0,
        "the stream timeout (8 s), not the one-shot one (3 s): {converged}"
    );
    assert!(interval >= 0.8 * 8.0, "close to 8 s: {converged}");
    assert!(lower < 8.0, "never above the real timeout: {converged}");

    s.publish(&channel_id, "first").await?;
    wait_line(&mut s.lines, |l| {
        l.starts_with("out: wake") && l.ends_with("payload=first")
    })
    .await?;

    // The NAT's timeout shrinks under the device: noticed at the first
    // lost binding (the canary does not come), then learned again.
    s.nat.set_timeouts(3, 4).map_err(anyhow::Error::msg)?;
    let lost = wait_line(&mut s.lines, |l| {
        l.contains("binding lost") || l.contains("disconnected")
    })
    .await?;
    assert!(lost.contains("binding lost"), "{lost}");
    let (again, interval, lower) = s.converged().await?;
    assert!(interval < 4.0 && lower < 4.0, "{again}");
    s.publish(&channel_id, "second").await?;
    wait_line(&mut s.lines, |l| {
        l.starts_with("out: wake") && l.ends_with("payload=second")
    })
    .await?;
    assert!(
        s.device.try_wait()?.is_none(),
        "the device is still running"
    );
    Ok(())
}

/// A port-randomizing NAT whose timeout (2 s) is below the start interval
/// (2.5 s): the tuner must never believe in a bound above 2 s, and in the
/// steady state wakes published at random times arrive at once, all of
/// them.
#[tokio::test]
async fn a_timeout_below_the_start_interval_and_wakes_at_random_times_on_a_fully_random_nat(
) -> anyhow::Result<()> {
    let spec = NatSpec {
        fully_random: true,
        unreplied_s: 2,
        stream_s: 2,
    };
    let Some(mut s) = Scene::start(spec).await? else {
        return Ok(());
    };
    let channel_id = s.channel_id().await?;
    let (converged, interval, lower) = s.converged().await?;
    assert!(lower < 2.0 && interval < 2.0, "{converged}");

    // Wakes at pseudo-random moments across several keepalive cycles.
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut late = 0;
    let n = 20;
    for i in 0..n {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        // Waiting for a moment, not for a result: the wake's publish time.
        tokio::time::sleep(Duration::from_millis(rng % 3000)).await;
        let payload = format!("w{i}");
        s.publish(&channel_id, &payload).await?;
        #[allow(clippy::disallowed_methods)] // the test measures wake delay
        let published = tokio::time::Instant::now();
        let want = format!("payload={payload}");
        wait_line(&mut s.lines, |l| {
            l.starts_with("out: wake") && l.ends_with(&want)
        })
        .await?;
        if published.elapsed() > Duration::from_secs(2) {
            late += 1;
        }
    }
    // 99.9 % within 2 s: with 20 wakes, every one.
    assert_eq!(late, 0, "{late} of {n} wakes took over 2 s");
    assert!(
        s.device.try_wait()?.is_none(),
        "the device is still running"
    );
    Ok(())
}

/// RFC 8305: the relay's name resolves to IPv6 and IPv4, and the IPv6 path
/// drops everything. The device must connect over IPv4 on its first
/// attempt (IPv4 starts 250 ms after IPv6), over QUIC and over TCP.
#[tokio::test]
async fn a_broken_ipv6_path_loses_the_race_to_ipv4_on_the_first_attempt() -> anyhow::Result<()> {
    for transport in ["quic", "tcp"] {
        let spec = NatSpec {
            fully_random: false,
            unreplied_s: 30,
            stream_s: 120,
        };
        #[allow(clippy::disallowed_methods)] // the test checks no timeout was waited for
        let started = tokio::time::Instant::now();
        let Some(mut s) = Scene::start_full(spec, Some("relay.test"), transport, None).await?
        else {
            return Ok(());
        };
        let first = wait_line(&mut s.lines, |l| {
            l.starts_with("err: connected") || l.starts_with("err: disconnected")
        })
        .await?;
        assert!(
            first.starts_with("err: connected") && first.contains("relay=10.9.2.2:4433"),
            "{transport}: {first}"
        );
        // Without the race, an attempt that drew the IPv6 address waits out
        // the 10 s connect timeout before trying again.
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(5),
            "{transport}: connected after {took:?}: the broken IPv6 attempt was waited for"
        );
        wait_line(&mut s.lines, |l| l.starts_with("out: registered")).await?;
    }
    Ok(())
}

/// Over TLS/TCP no UDP probe can speak for the connection: the keepalive
/// interval itself explores, each step proven by a canary, and a step the
/// NAT does not survive (its TCP state expired: the relay's canary is
/// answered with a reset by the router) is a lost binding, noticed, after
/// which the device reconnects and the search narrows. conntrack keeps
/// established TCP connections 5 s here.
#[tokio::test]
async fn over_tcp_the_keepalive_learns_the_nat_s_tcp_timeout_from_the_connection_itself(
) -> anyhow::Result<()> {
    let spec = NatSpec {
        fully_random: false,
        unreplied_s: 30,
        stream_s: 120,
    };
    let Some(mut s) = Scene::start_full(spec, None, "tcp", Some(5)).await? else {
        return Ok(());
    };
    let channel_id = s.channel_id().await?;
    let (converged, interval, lower) = s.converged().await?;
    // conntrack expires entries lazily (a garbage-collection pass), so a
    // silence a little past 5 s can still be crossed: the bound may be too.
    assert!(interval < 5.0 && lower < 5.0 * 1.05, "{converged}");
    assert!(interval >= 0.8 * 5.0, "close to 5 s: {converged}");
    // Remembered apart from what UDP learned on the same network.
    let memory = std::fs::read_to_string(s.data.path().join("listen-networks"))?;
    assert!(memory.contains("kernel-nat#tcp "), "{memory}");
    s.publish(&channel_id, "over-tcp").await?;
    wait_line(&mut s.lines, |l| {
        l.starts_with("out: wake") && l.ends_with("payload=over-tcp")
    })
    .await?;
    assert!(
        s.device.try_wait()?.is_none(),
        "the device is still running"
    );
    Ok(())
}
