//! Which relay to connect to next (sans-IO): the addresses the app gave
//! (`host:port`, each name possibly resolving to several relays), plus
//! those a draining relay named in its GoAway. Each attempt picks one at
//! random among those not recently lost or draining, so a fleet spreads
//! over a cluster, fails over when a relay is lost, and does not come back
//! to a relay that just asked it to leave. The driver resolves names and
//! reads the clock; this type only decides.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// How long a relay that failed, or sent a GoAway, is avoided while
/// others are available.
pub(crate) const AVOID_FOR: Duration = Duration::from_secs(60);

/// RFC 8305's connection attempt delay: how long the IPv6 attempt runs
/// alone before the IPv4 one starts.
pub(crate) const FAMILY_DELAY: Duration = Duration::from_millis(250);

/// Most addresses learned from GoAways (a relay cannot make a device
/// remember an unbounded list).
const MAX_LEARNED: usize = 16;

/// The relay set of one client.
#[derive(Debug, Clone)]
pub(crate) struct Relays {
    configured: Vec<String>,
    learned: Vec<String>,
    avoid: HashMap<SocketAddr, Instant>,
}

impl Relays {
    /// The app's addresses: a list of `host:port`, or one string with
    /// several separated by commas.
    pub(crate) fn new<I: IntoIterator<Item = S>, S: AsRef<str>>(addresses: I) -> Self {
        let mut configured = Vec::new();
        for a in addresses {
            for part in a.as_ref().split(',') {
                let part = part.trim();
                if !part.is_empty() && !configured.iter().any(|c| c == part) {
                    configured.push(part.to_owned());
                }
            }
        }
        Self {
            configured,
            learned: Vec::new(),
            avoid: HashMap::new(),
        }
    }

    /// The names to resolve for the next attempt (configured first).
    pub(crate) fn targets(&self) -> Vec<String> {
        let mut all = self.configured.clone();
        for l in &self.learned {
            if !all.contains(l) {
                all.push(l.clone());
            }
        }
        all
    }

    /// Picks among `resolved` (name, address) pairs: at random among the
    /// ones not avoided at `now`; if every one is avoided, the one avoided
    /// longest ago.
    pub(crate) fn choose(
        &mut self,
        now: Instant,
        resolved: &[(String, SocketAddr)],
        random: u64,
    ) -> Option<(String, SocketAddr)> {
        self.avoid.retain(|_, until| *until > now);
        let open: Vec<&(String, SocketAddr)> = resolved
            .iter()
            .filter(|(_, a)| !self.avoid.contains_key(a))
            .collect();
        if !open.is_empty() {
            let i = usize::try_from(random % open.len() as u64).unwrap_or(0);
            return Some(open[i].clone());
        }
        resolved
            .iter()
            .min_by_key(|(_, a)| self.avoid.get(a).copied())
            .cloned()
    }

    /// RFC 8305 for the chosen relay: when its name also resolved to the
    /// other address family, the attempt races the two, IPv6 first and
    /// IPv4 after [`FAMILY_DELAY`]. Returns (first, second to start after
    /// the delay, if any); addresses being avoided are not raced.
    pub(crate) fn family_pair(
        &self,
        resolved: &[(String, SocketAddr)],
        chosen: &(String, SocketAddr),
    ) -> (SocketAddr, Option<SocketAddr>) {
        let sibling = resolved.iter().find(|(name, a)| {
            *name == chosen.0 && a.is_ipv4() != chosen.1.is_ipv4() && !self.avoid.contains_key(a)
        });
        match sibling {
            None => (chosen.1, None),
            Some((_, other)) if other.is_ipv6() => (*other, Some(chosen.1)),
            Some((_, other)) => (chosen.1, Some(*other)),
        }
    }

    /// An attempt on `addr` failed, or its connection was lost.
    pub(crate) fn failed(&mut self, now: Instant, addr: SocketAddr) {
        self.avoid.insert(addr, now + AVOID_FOR);
    }

    /// `addr` sent a GoAway (draining): go elsewhere while possible.
    pub(crate) fn leaving(&mut self, now: Instant, addr: SocketAddr) {
        self.avoid.insert(addr, now + AVOID_FOR);
    }

    /// Connected to `addr`: it is fine again.
    pub(crate) fn connected(&mut self, addr: SocketAddr) {
        self.avoid.remove(&addr);
    }

    /// Relays a GoAway named (`host:port`); the newest are kept.
    pub(crate) fn learn(&mut self, alternatives: &[String]) {
        for a in alternatives {
            let a = a.trim();
            let valid = a
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if valid
                && !self.configured.iter().any(|c| c == a)
                && !self.learned.iter().any(|l| l == a)
            {
                self.learned.push(a.to_owned());
            }
        }
        if self.learned.len() > MAX_LEARNED {
            let extra = self.learned.len() - MAX_LEARNED;
            self.learned.drain(..extra);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn set(n: u16) -> Vec<(String, SocketAddr)> {
        (1..=n).map(|p| (format!("r{p}:{p}"), addr(p))).collect()
    }

    #[test]
    fn a_dual_stack_name_races_ipv6_first_then_ipv4_and_other_names_are_not_mixed_in() {
        let v6: SocketAddr = "[2001:db8::1]:4433".parse().unwrap();
        let v4: SocketAddr = "192.0.2.1:4433".parse().unwrap();
        let other: SocketAddr = "[2001:db8::9]:4433".parse().unwrap();
        let resolved = vec![
            ("relay:4433".to_owned(), v4),
            ("relay:4433".to_owned(), v6),
            ("backup:4433".to_owned(), other),
        ];
        let mut r = Relays::new(["relay:4433", "backup:4433"]);
        // Whichever of the pair was drawn, IPv6 goes first.
        assert_eq!(r.family_pair(&resolved, &resolved[0]), (v6, Some(v4)));
        assert_eq!(r.family_pair(&resolved, &resolved[1]), (v6, Some(v4)));
        // Another name is another relay: never raced with this one.
        assert_eq!(r.family_pair(&resolved, &resolved[2]), (other, None));
        // A family that just failed is not raced again for a while.
        r.failed(crate::clock::now(), v6);
        assert_eq!(r.family_pair(&resolved, &resolved[0]), (v4, None));
        // A single-family name is not raced.
        let only = vec![("relay:4433".to_owned(), v4)];
        assert_eq!(r.family_pair(&only, &only[0]), (v4, None));
    }

    #[test]
    fn a_list_or_a_comma_separated_string_both_work() {
        let r = Relays::new(["a:1, b:2", "b:2", "c:3"]);
        assert_eq!(r.targets(), ["a:1", "b:2", "c:3"]);
    }

    #[test]
    fn devices_spread_over_every_relay() {
        let mut r = Relays::new(["x:1"]);
        let now = crate::clock::now();
        let mut counts = [0u32; 3];
        for i in 0..3000u64 {
            let (_, a) = r
                .choose(now, &set(3), i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
                .unwrap();
            counts[usize::from(a.port()) - 1] += 1;
        }
        assert!(
            counts.iter().all(|c| (800..=1200).contains(c)),
            "{counts:?}"
        );
    }

    #[test]
    fn a_lost_or_draining_relay_is_avoided_while_others_are_up() {
        let mut r = Relays::new(["x:1"]);
        let now = crate::clock::now();
        r.failed(now, addr(1));
        r.leaving(now, addr(2));
        for i in 0..100 {
            assert_eq!(r.choose(now, &set(3), i).unwrap().1, addr(3));
        }
        // Everything avoided: the one avoided longest ago, not nothing.
        r.failed(now + Duration::from_secs(1), addr(3));
        assert_eq!(r.choose(now, &set(3), 7).unwrap().1, addr(1));
        // Avoidance ends.
        let later = now + AVOID_FOR + Duration::from_secs(2);
        let picked: std::collections::HashSet<_> = (0..50)
            .map(|i| r.choose(later, &set(3), i).unwrap().1)
            .collect();
        assert_eq!(picked.len(), 3);
        // A successful connection clears it at once.
        r.failed(later, addr(2));
        r.connected(addr(2));
        assert!((0..50).any(|i| r.choose(later, &set(3), i).unwrap().1 == addr(2)));
    }

    #[test]
    fn learned_alternatives_are_validated_and_bounded() {
        let mut r = Relays::new(["a:1"]);
        r.learn(&["b:2".into(), "nonsense".into(), "a:1".into(), ":5".into()]);
        assert_eq!(r.targets(), ["a:1", "b:2"]);
        let many: Vec<String> = (0..40).map(|i| format!("h{i}:{}", 1000 + i)).collect();
        r.learn(&many);
        assert_eq!(r.targets().len(), 1 + MAX_LEARNED);
        assert!(r.targets().contains(&"h39:1039".to_string()));
    }

    #[test]
    fn nothing_resolved_is_nothing_chosen() {
        let mut r = Relays::new(["a:1"]);
        assert_eq!(r.choose(crate::clock::now(), &[], 1), None);
    }
}
