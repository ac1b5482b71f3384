//! A userspace UDP proxy between devices and the relay, for lossy and
//! broken paths: each client address gets its own upstream socket (a new
//! "binding", as a NAT would), packets can be dropped at random per
//! direction, and a direction can be cut entirely.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::net::UdpSocket;
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

/// A running proxy.
pub struct UdpProxy {
    /// Where devices send (give this to the SDK as the relay address).
    pub addr: SocketAddr,
    /// Device -> relay.
    pub up: Arc<Direction>,
    /// Relay -> device.
    pub down: Arc<Direction>,
    task: JoinHandle<()>,
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl UdpProxy {
    /// Proxies 127.0.0.1:<any> to `target`.
    pub async fn start(target: SocketAddr, seed: u64) -> std::io::Result<Self> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = front.local_addr()?;
        let up = Arc::new(Direction::default());
        let down = Arc::new(Direction::default());
        let (u, d) = (up.clone(), down.clone());
        let task = tokio::spawn(async move {
            let mut bindings: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
            let mut tasks = Vec::new();
            let mut rng = seed | 1;
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, client)) = front.recv_from(&mut buf).await {
                let upstream = match bindings.get(&client) {
                    Some(s) => s.clone(),
                    None => {
                        let Ok(s) = UdpSocket::bind("127.0.0.1:0").await else {
                            continue;
                        };
                        let s = Arc::new(s);
                        bindings.insert(client, s.clone());
                        let (front, s2, d, seed) =
                            (front.clone(), s.clone(), d.clone(), rng.rotate_left(17) | 1);
                        tasks.push(tokio::spawn(async move {
                            let mut rng = seed;
                            let mut buf = vec![0u8; 65_536];
                            while let Ok(n) = s2.recv(&mut buf).await {
                                if d.pass(&mut rng) {
                                    let _ = front.send_to(&buf[..n], client).await;
                                }
                            }
                        }));
                        let _ = s.connect(target).await;
                        s
                    }
                };
                if u.pass(&mut rng) {
                    let _ = upstream.send(&buf[..n]).await;
                }
            }
            for t in tasks {
                t.abort();
            }
        });
        Ok(Self {
            addr,
            up,
            down,
            task,
        })
    }
}
