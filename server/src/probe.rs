//! The binding-lifetime probe responder: answers each probe request after
//! the silence it asks for, to the address it came from (see
//! `wakewire_proto::probe`). Devices use it to learn their NAT's idle
//! timeout without risking their main connection.
//!
//! Abuse limits: the reply is never larger than the request; at most 64
//! pending probes per source IP and 1,000,000 in all; delays up to 1 hour.
//! One task and one ordered map hold every pending probe.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use metrics::counter;
use tokio::net::UdpSocket;
use tokio::time::Instant;
use wakewire_proto::probe::{Probe, PROBE_LEN};

use crate::metrics as m;
use crate::state::clock;

/// Most pending probes per source IP.
pub const PER_IP_LIMIT: u32 = 64;
/// Most pending probes in all.
pub const TOTAL_LIMIT: usize = 1_000_000;

/// Serves probes on `socket` until the task is dropped.
pub(crate) async fn serve(socket: UdpSocket) {
    let mut pending: BTreeMap<(Instant, u64), (SocketAddr, [u8; PROBE_LEN])> = BTreeMap::new();
    let mut per_ip: HashMap<IpAddr, u32> = HashMap::new();
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
                let count = per_ip.entry(from.ip()).or_default();
                if *count >= PER_IP_LIMIT || pending.len() >= TOTAL_LIMIT {
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
                    if let Some(c) = per_ip.get_mut(&to.ip()) {
                        *c -= 1;
                        if *c == 0 {
                            per_ip.remove(&to.ip());
                        }
                    }
                    let _ = socket.send_to(&reply, to).await;
                }
            }
        }
    }
}
