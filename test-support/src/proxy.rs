//! A userspace UDP proxy and NAT emulator between devices and the relay.
//!
//! Each client address gets its own upstream socket: a "binding" with its
//! own external port, as a NAT would. Packets can be dropped at random per
//! direction, a direction can be cut, and with an idle timeout it behaves
//! like a NAT (RFC 4787): a binding lives while the client sent something
//! within the timeout (only outgoing packets refresh it, REQ-6); inbound
//! packets to an expired binding are dropped; the client's next packet
//! opens a new binding with a new external port, or, in port-preserving
//! mode (Linux `masquerade`, many home routers), with the same one: then
//! neither end can tell from addresses that the binding died.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// Per-direction controls, shared with the proxy's tasks.
#[derive(Debug, Default)]
pub struct Direction {
    /// Drop probability in parts per million.
    pub loss_ppm: AtomicU32,
    /// Drop everything.
    pub cut: AtomicBool,
    /// Packets forwarded.
    pub forwarded: AtomicU64,
    /// Packets dropped.
    pub dropped: AtomicU64,
}

impl Direction {
    /// Sets the loss rate (0.0 ..= 1.0).
    pub fn set_loss(&self, p: f64) {
        self.loss_ppm
            .store((p.clamp(0.0, 1.0) * 1e6) as u32, Ordering::Relaxed);
    }

    fn pass(&self, rng: &mut u64) -> bool {
        if self.cut.load(Ordering::Relaxed) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        if (*rng % 1_000_000) < u64::from(self.loss_ppm.load(Ordering::Relaxed)) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        self.forwarded.fetch_add(1, Ordering::Relaxed);
        true
    }
}

/// NAT behaviour, shared with the proxy's tasks.
#[derive(Debug)]
pub struct Nat {
    start: Instant,
    /// Idle timeout in ms (0 = bindings never expire).
    timeout_ms: AtomicU64,
    /// Bindings found expired so far.
    pub expired: AtomicU64,
    /// Bindings opened so far.
    pub opened: AtomicU64,
    /// Inbound packets dropped because their binding had expired.
    pub dropped_expired: AtomicU64,
    /// Bindings last refreshed before this instant (ms) count as expired.
    epoch_ms: AtomicU64,
    /// Re-create an expired binding on the same external port.
    preserve_ports: AtomicBool,
    changed: Notify,
}

impl Nat {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn expired_since(&self, last_out_ms: u64) -> bool {
        if last_out_ms < self.epoch_ms.load(Ordering::Relaxed) {
            return true;
        }
        let t = self.timeout_ms.load(Ordering::Relaxed);
        t > 0 && self.now_ms().saturating_sub(last_out_ms) >= t
    }

    /// Forgets every current binding at once (as after the NAT timed them
    /// out, or rebooted).
    pub fn expire_now(&self) {
        self.epoch_ms.store(self.now_ms() + 1, Ordering::Relaxed);
    }

    /// Re-creates expired bindings on their old external port (true), or
    /// on a new one (false, the default).
    pub fn set_port_preserving(&self, on: bool) {
        self.preserve_ports.store(on, Ordering::Relaxed);
    }

    /// Changes the idle timeout (None = never expire).
    pub fn set_idle_timeout(&self, t: Option<Duration>) {
        let ms = t.map_or(0, |d| {
            u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
        });
        self.timeout_ms.store(ms, Ordering::Relaxed);
    }

    /// Waits (bounded by the caller) until at least `n` bindings expired.
    pub async fn wait_expired(&self, n: u64) {
        loop {
            let notified = self.changed.notified();
            if self.expired.load(Ordering::Relaxed) >= n {
                return;
            }
            notified.await;
        }
    }
}

struct Binding {
    socket: Arc<UdpSocket>,
    last_out: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

/// A running proxy.
pub struct UdpProxy {
    /// Where devices send (give this to the SDK as the relay address).
    pub addr: SocketAddr,
    /// Device -> relay.
    pub up: Arc<Direction>,
    /// Relay -> device.
    pub down: Arc<Direction>,
    /// NAT behaviour.
    pub nat: Arc<Nat>,
    task: JoinHandle<()>,
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl UdpProxy {
    /// Proxies 127.0.0.1:<any> to `target`; bindings never expire.
    pub async fn start(target: SocketAddr, seed: u64) -> std::io::Result<Self> {
        Self::nat(target, None, seed).await
    }

    /// A NAT in front of `target` whose bindings expire after `timeout` of
    /// client silence.
    pub async fn nat(
        target: SocketAddr,
        timeout: Option<Duration>,
        seed: u64,
    ) -> std::io::Result<Self> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = front.local_addr()?;
        let up = Arc::new(Direction::default());
        let down = Arc::new(Direction::default());
        #[allow(clippy::disallowed_methods)] // the emulator's own clock
        let start = Instant::now();
        let nat = Arc::new(Nat {
            start,
            timeout_ms: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            opened: AtomicU64::new(0),
            dropped_expired: AtomicU64::new(0),
            epoch_ms: AtomicU64::new(0),
            preserve_ports: AtomicBool::new(false),
            changed: Notify::new(),
        });
        nat.set_idle_timeout(timeout);
        let (u, d, n) = (up.clone(), down.clone(), nat.clone());
        let task = tokio::spawn(async move {
            let mut bindings: HashMap<SocketAddr, Binding> = HashMap::new();
            let mut rng = seed | 1;
            let mut buf = vec![0u8; 65_536];
            while let Ok((len, client)) = front.recv_from(&mut buf).await {
                if let Some(b) = bindings.get(&client) {
                    if n.expired_since(b.last_out.load(Ordering::Relaxed)) {
                        // Port-preserving: the same socket (external port)
                        // serves the new binding; this packet refreshes it.
                        if !n.preserve_ports.load(Ordering::Relaxed) {
                            if let Some(old) = bindings.remove(&client) {
                                old.task.abort();
                            }
                        }
                        n.expired.fetch_add(1, Ordering::Relaxed);
                        n.changed.notify_waiters();
                    }
                }
                if let std::collections::hash_map::Entry::Vacant(slot) = bindings.entry(client) {
                    let Ok(s) = UdpSocket::bind("127.0.0.1:0").await else {
                        continue;
                    };
                    if s.connect(target).await.is_err() {
                        continue;
                    }
                    let socket = Arc::new(s);
                    let last_out = Arc::new(AtomicU64::new(
                        n.now_ms().max(n.epoch_ms.load(Ordering::Relaxed)),
                    ));
                    let (front, s2, d, n2, lo, seed) = (
                        front.clone(),
                        socket.clone(),
                        d.clone(),
                        n.clone(),
                        last_out.clone(),
                        rng.rotate_left(17) | 1,
                    );
                    let task = tokio::spawn(async move {
                        let mut rng = seed;
                        let mut buf = vec![0u8; 65_536];
                        while let Ok(len) = s2.recv(&mut buf).await {
                            // The NAT forgot an idle binding: inbound dropped.
                            if n2.expired_since(lo.load(Ordering::Relaxed)) {
                                n2.dropped_expired.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                            if d.pass(&mut rng) {
                                let _ = front.send_to(&buf[..len], client).await;
                            }
                        }
                    });
                    n.opened.fetch_add(1, Ordering::Relaxed);
                    slot.insert(Binding {
                        socket,
                        last_out,
                        task,
                    });
                }
                let Some(b) = bindings.get(&client) else {
                    continue;
                };
                b.last_out.store(
                    n.now_ms().max(n.epoch_ms.load(Ordering::Relaxed)),
                    Ordering::Relaxed,
                );
                if u.pass(&mut rng) {
                    let _ = b.socket.send(&buf[..len]).await;
                }
            }
            for (_, b) in bindings {
                b.task.abort();
            }
        });
        Ok(Self {
            addr,
            up,
            down,
            nat,
            task,
        })
    }
}
