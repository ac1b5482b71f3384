//! The driver side of the keepalive: a fixed interval, or the adaptive
//! [`Tuner`] with its probes (each from a fresh UDP socket, so a binding of
//! its own) and its per-network memory; plus the app's periodic work,
//! aligned with keepalives in standby.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::{debug, warn};
use wakewire_proto::probe::{Probe, COOKIE_LEN};

use crate::config::PeriodicCallback;
use crate::memory::NetworkMemory;
use crate::tuner::{ProbeRequest, Tuner, TunerEvent, PROBE_LEAD};
use crate::types::{KeepalivePolicy, Status};

struct Periodic {
    period: Duration,
    due: Instant,
    cb: PeriodicCallback,
}

pub(crate) struct Keepalive {
    policy: KeepalivePolicy,
    tuner: Option<Tuner>,
    network: String,
    memory: NetworkMemory,
    replies_tx: mpsc::UnboundedSender<u64>,
    /// Probe replies (probe ids) from the probe tasks.
    pub(crate) replies: mpsc::UnboundedReceiver<u64>,
    standby: bool,
    periodic: Vec<Periodic>,
    /// The connection runs over TLS/TCP: the tuner learns from the main
    /// path only, and remembers under its own key.
    tcp: bool,
}

impl Keepalive {
    pub(crate) fn new(policy: KeepalivePolicy, network: String, memory: Option<PathBuf>) -> Self {
        let (replies_tx, replies) = mpsc::unbounded_channel();
        let mut k = Self {
            policy: KeepalivePolicy::Fixed(Duration::from_secs(25)),
            tuner: None,
            network,
            memory: NetworkMemory::open(memory),
            replies_tx,
            replies,
            standby: false,
            periodic: vec![],
            tcp: false,
        };
        k.set_policy(policy, crate::clock::now());
        k
    }

    /// Switches policy (a new tuner starts from what the network memory
    /// knows).
    pub(crate) fn set_policy(&mut self, policy: KeepalivePolicy, now: Instant) {
        self.tuner = match &policy {
            KeepalivePolicy::Fixed(_) => None,
            KeepalivePolicy::Adaptive(cfg) => {
                let learned = self
                    .memory
                    .get(&memory_key(&self.network, self.tcp), cfg.reprobe_after);
                Some(match (self.tcp, learned) {
                    (true, learned) => Tuner::main_path(now, cfg.clone(), learned),
                    (false, Some(learned)) => Tuner::resume(now, cfg.clone(), learned),
                    (false, None) => Tuner::new(now, cfg.clone()),
                })
            }
        };
        self.policy = policy;
    }

    /// The connection now runs over TLS/TCP (`true`) or QUIC: TCP and UDP
    /// bindings live differently, so each has its own tuner and memory.
    pub(crate) fn set_transport(&mut self, tcp: bool, now: Instant) {
        if tcp != self.tcp {
            self.tcp = tcp;
            self.set_policy(self.policy.clone(), now);
        }
    }

    /// The device moved to another network.
    pub(crate) fn network_changed(&mut self, network: String, now: Instant) {
        self.network = network;
        self.set_policy(self.policy.clone(), now);
    }

    pub(crate) fn interval(&self) -> Duration {
        match (&self.tuner, &self.policy) {
            (Some(t), _) => t.interval(),
            (None, KeepalivePolicy::Fixed(d)) => *d,
            (None, KeepalivePolicy::Adaptive(c)) => c.start_interval,
        }
    }

    pub(crate) fn set_standby(&mut self, standby: bool) {
        self.standby = standby;
    }

    pub(crate) fn add_periodic(&mut self, period: Duration, cb: PeriodicCallback, now: Instant) {
        self.periodic.push(Periodic {
            period: period.max(Duration::from_millis(1)),
            due: now + period,
            cb,
        });
    }

    pub(crate) fn decrease(&mut self, now: Instant) {
        match &mut self.tuner {
            Some(t) => t.decrease(now),
            None => {
                if let KeepalivePolicy::Fixed(d) = &mut self.policy {
                    *d = d.mul_f64(0.75).max(Duration::from_secs(1));
                }
            }
        }
    }

    /// A keepalive completed on the main connection.
    pub(crate) fn on_keepalive(&mut self, now: Instant, idle: Duration, observed: &str) {
        if let Some(t) = &mut self.tuner {
            t.handle_keepalive(now, idle, observed);
        }
        if self.standby {
            // The radio is awake: run the periodic work due before the next
            // keepalive now rather than waking it again later.
            let horizon = now + self.interval();
            for p in &mut self.periodic {
                if p.due <= horizon {
                    run(&p.cb);
                    p.due = now + p.period;
                }
            }
        }
    }

    /// A canary crossed the NAT after `idle` of silence.
    pub(crate) fn on_canary(&mut self, now: Instant, idle: Duration) {
        if let Some(t) = &mut self.tuner {
            t.handle_canary(now, idle);
        }
    }

    /// The canary did not come: the binding died within `after_idle`. With
    /// a tuner the loss is reported through its events; without one, the
    /// status to report is returned.
    pub(crate) fn on_canary_missed(
        &mut self,
        now: Instant,
        after_idle: Duration,
    ) -> Option<Status> {
        match &mut self.tuner {
            Some(t) => {
                t.handle_binding_lost(now, after_idle);
                None
            }
            None => Some(Status::BindingLost { after_idle }),
        }
    }

    pub(crate) fn on_probe_reply(&mut self, now: Instant, id: u64) {
        if let Some(t) = &mut self.tuner {
            t.handle_probe_reply(now, id);
        }
    }

    /// Next timer: tuner deadlines, and periodic work outside standby.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        let tuner = self.tuner.as_ref().and_then(Tuner::poll_timeout);
        let periodic = if self.standby {
            None
        } else {
            self.periodic.iter().map(|p| p.due).min()
        };
        match (tuner, periodic) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub(crate) fn on_timer(&mut self, now: Instant) {
        if let Some(t) = &mut self.tuner {
            t.handle_timeout(now);
        }
        if !self.standby {
            for p in &mut self.periodic {
                if p.due <= now {
                    run(&p.cb);
                    p.due = now + p.period;
                }
            }
        }
    }

    /// Sends the probes the tuner wants (to `probe_addr`) and returns the
    /// statuses to report.
    pub(crate) fn poll(&mut self, now: Instant, probe_addr: Option<SocketAddr>) -> Vec<Status> {
        let mut out = vec![];
        let Some(t) = &mut self.tuner else { return out };
        if let Some(addr) = probe_addr {
            while let Some(req) = t.poll_probe(now) {
                tokio::spawn(probe(addr, req, self.replies_tx.clone()));
            }
        }
        while let Some(ev) = t.poll_event() {
            match ev {
                TunerEvent::IntervalChanged { interval, reason } => {
                    out.push(Status::KeepaliveInterval { interval, reason })
                }
                TunerEvent::Converged { interval, learned } => {
                    let key = memory_key(&self.network, self.tcp);
                    if let Err(e) = self.memory.put(&key, learned) {
                        warn!(error = %e, "cannot save the learned keepalive");
                    }
                    out.push(Status::KeepaliveConverged {
                        network: self.network.clone(),
                        interval,
                        learned,
                    });
                }
                TunerEvent::BindingLost { after_idle } => {
                    out.push(Status::BindingLost { after_idle })
                }
            }
        }
        out
    }
}

/// What the network memory calls a network and transport (TCP and UDP
/// bindings live differently, so each is learned apart).
fn memory_key(network: &str, tcp: bool) -> String {
    if tcp {
        format!("{network}#tcp")
    } else {
        network.to_owned()
    }
}

fn run(cb: &PeriodicCallback) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cb())).is_err() {
        warn!("periodic callback panicked");
    }
}

fn any_addr(addr: SocketAddr) -> SocketAddr {
    if addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    }
}

fn random_nonce() -> u64 {
    let mut nonce = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce);
    u64::from_le_bytes(nonce)
}

/// Sends `p` from `socket` and waits up to `wait` for its reply.
async fn exchange(socket: &UdpSocket, addr: SocketAddr, p: Probe, wait: Duration) -> Option<Probe> {
    socket.send_to(&p.request(), addr).await.ok()?;
    let mut buf = [0u8; 64];
    tokio::time::timeout(wait, async {
        loop {
            let (n, _) = socket.recv_from(&mut buf).await.ok()?;
            if let Some(r) = Probe::parse_reply(&buf[..n]).filter(|r| r.nonce == p.nonce) {
                return Some(r);
            }
        }
    })
    .await
    .ok()
    .flatten()
}

/// One probe from a fresh socket (its own NAT binding), shaped like the
/// main connection to a stateful NAT: a delay-0 exchange (which also brings
/// the relay's return-routability cookie), then, [`PROBE_LEAD`] after its
/// reply, the delayed request, then the reply if it comes.
async fn probe(addr: SocketAddr, req: ProbeRequest, replies: mpsc::UnboundedSender<u64>) {
    let Ok(socket) = UdpSocket::bind(any_addr(addr)).await else {
        return;
    };
    let ask = Probe {
        nonce: random_nonce(),
        delay_ms: 0,
        cookie: [0; COOKIE_LEN],
    };
    let Some(first) = exchange(&socket, addr, ask, Duration::from_secs(5)).await else {
        debug!("no probe cookie from the relay; probe skipped");
        return;
    };
    // The tuner's deadline allows for the exchange's round trip on top.
    tokio::time::sleep(PROBE_LEAD).await;
    let p = Probe {
        nonce: random_nonce(),
        delay_ms: u32::try_from(req.delay.as_millis()).unwrap_or(u32::MAX),
        cookie: first.cookie,
    };
    let wait = req.delay + req.delay / 10 + Duration::from_secs(10);
    if exchange(&socket, addr, p, wait).await.is_some() {
        debug!(delay = ?req.delay, "probe answered");
        let _ = replies.send(req.id);
    }
}
