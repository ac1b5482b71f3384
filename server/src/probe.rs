//! The binding-lifetime probe responder: answers each probe request after
//! the silence it asks for, to the address it came from (see
//! `wakewire_proto::probe`). Devices use it to learn their NAT's idle
//! timeout without risking their main connection.
//!
//! Abuse limits: the reply is never larger than the request; a request
//! with a delay is held only if it carries a valid return-routability
//! cookie for its source IP (requests with delay 0 are answered at once,
//! with a cookie, and leave no state), so spoofed sources cannot make the
//! relay hold anything; at most 64 pending probes per /24 (IPv4) or /64
//! (IPv6) and 1,000,000 in all; delays up to 1 hour. One task and one
//! ordered map hold every pending probe.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use metrics::counter;
use tokio::net::UdpSocket;
use tokio::time::Instant;
use wakewire_proto::probe::{prefix_of, CookieKey, Probe, PROBE_LEN};

use crate::metrics as m;
use crate::state::clock;

/// Most pending probes per source prefix (/24 or /64).
pub const PER_PREFIX_LIMIT: u32 = 64;
/// Most pending probes in all.
pub const TOTAL_LIMIT: usize = 1_000_000;

/// Serves probes on `socket` until the task is dropped.
pub(crate) async fn serve(socket: UdpSocket, cookie_secret: [u8; 32]) {
    let cookies = CookieKey::new(&cookie_secret);
    let mut pending: BTreeMap<(Instant, u64), (SocketAddr, [u8; PROBE_LEN])> = BTreeMap::new();
    let mut per_prefix: HashMap<IpAddr, u32> = HashMap::new();
    let mut seq = 0u64;
    let mut buf = [0u8; 64];
    loop {
        let next = pending.keys().next().map(|k| k.0);
        tokio::select! {
            r = socket.recv_from(&mut buf) => {
                let Ok((n, from)) = r else { continue };
                let Some(probe) = Probe::parse_request(&buf[..n]) else {
                    counter!(m::PROBES, "result" => "malformed").increment(1);
                    continue;
                };
                let now_secs = clock::unix_ms() / 1000;
                if probe.delay_ms == 0 {
                    // Answered at once with a cookie for the source: no state.
                    let reply = Probe {
                        cookie: cookies.cookie(from.ip(), now_secs),
                        ..probe
                    };
                    let _ = socket.send_to(&reply.reply(), from).await;
                    counter!(m::PROBES, "result" => "cookie").increment(1);
                    continue;
                }
                if !cookies.check(from.ip(), now_secs, &probe.cookie) {
                    counter!(m::PROBES, "result" => "bad_cookie").increment(1);
                    continue;
                }
                let count = per_prefix.entry(prefix_of(from.ip())).or_default();
                if *count >= PER_PREFIX_LIMIT || pending.len() >= TOTAL_LIMIT {
                    counter!(m::PROBES, "result" => "over_limit").increment(1);
                    continue;
                }
                *count += 1;
                seq += 1;
                let due = Instant::from_std(clock::now()) + Duration::from_millis(u64::from(probe.delay_ms));
                pending.insert((due, seq), (from, probe.reply()));
                counter!(m::PROBES, "result" => "accepted").increment(1);
            }
            _ = tokio::time::sleep_until(next.unwrap_or_else(|| Instant::from_std(clock::now()))), if next.is_some() => {
                let now = Instant::from_std(clock::now());
                while let Some(entry) = pending.first_entry() {
                    if entry.key().0 > now {
                        break;
                    }
                    let (to, reply) = entry.remove();
                    let prefix = prefix_of(to.ip());
                    if let Some(c) = per_prefix.get_mut(&prefix) {
                        *c -= 1;
                        if *c == 0 {
                            per_prefix.remove(&prefix);
                        }
                    }
                    let _ = socket.send_to(&reply, to).await;
                }
            }
        }
    }
}
