//! A real NAT on one machine: the Linux kernel's netfilter masquerade in
//! network namespaces the test creates (a device, a router, a relay), with
//! conntrack's two UDP timeouts set per test. Needs root, `ip` (iproute2)
//! and `nft` (nftables); [`KernelNat::create`] says plainly why not where
//! the machine cannot, and tests skip then, unless
//! `REQUIRE_TEST_TOOLS=1` (set by CI) makes that a failure.
//!
//! ```text
//! device ns 10.9.1.2 ── router ns (masquerade) ── 10.9.2.2 relay ns
//! ```
//! The relay has no route back to 10.9.1.0/24: only the router's bindings
//! let its packets reach the device.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// The device's address (private side).
pub const DEVICE_ADDR: &str = "10.9.1.2";
/// The relay's address (public side).
pub const RELAY_ADDR: &str = "10.9.2.2";

/// How the router translates.
#[derive(Debug, Clone, Copy)]
pub struct NatSpec {
    /// `masquerade fully-random`: a new external port for every binding;
    /// plain `masquerade` keeps the device's port when it is free (a
    /// re-created binding looks like the old one).
    pub fully_random: bool,
    /// `nf_conntrack_udp_timeout`: flows that are not (yet) two-way
    /// streams, s.
    pub unreplied_s: u32,
    /// `nf_conntrack_udp_timeout_stream`: two-way flows older than ~2 s, s.
    pub stream_s: u32,
}

/// Three namespaces joined by veth pairs, removed on drop.
#[derive(Debug)]
pub struct KernelNat {
    /// Device namespace.
    pub dev: String,
    /// Router namespace.
    pub nat: String,
    /// Relay namespace.
    pub relay: String,
}

fn run(args: &[&str]) -> Result<(), String> {
    run_stdin(args, "")
}

/// Runs `args[0]` with `input` on its stdin; its stderr explains a failure.
fn run_stdin(args: &[&str], input: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new(args[0])
        .args(&args[1..])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", args[0]))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| format!("{}: {e}", args[0]))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl KernelNat {
    /// Builds the three namespaces and the router's rules; `Err` says why
    /// this machine cannot (then nothing is left behind).
    pub fn create(spec: NatSpec) -> Result<Self, String> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}{n}", std::process::id() % 100_000);
        let this = Self {
            dev: format!("ww{id}dev"),
            nat: format!("ww{id}nat"),
            relay: format!("ww{id}relay"),
        };
        for ns in [&this.dev, &this.nat, &this.relay] {
            if let Err(e) = run(&["ip", "netns", "add", ns]) {
                // Drop removes the ones made so far.
                return Err(format!(
                    "cannot create network namespaces (root and iproute2 needed): {e}"
                ));
            }
        }
        this.wire(spec)?;
        Ok(this)
    }

    fn wire(&self, spec: NatSpec) -> Result<(), String> {
        let (d, nt, r) = (&self.dev, &self.nat, &self.relay);
        run(&[
            "ip", "link", "add", "wwd0", "netns", d, "type", "veth", "peer", "name", "wwn0",
            "netns", nt,
        ])?;
        run(&[
            "ip", "link", "add", "wwn1", "netns", nt, "type", "veth", "peer", "name", "wwr0",
            "netns", r,
        ])?;
        run(&["ip", "-n", d, "addr", "add", "10.9.1.2/24", "dev", "wwd0"])?;
        run(&["ip", "-n", nt, "addr", "add", "10.9.1.1/24", "dev", "wwn0"])?;
        run(&["ip", "-n", nt, "addr", "add", "10.9.2.1/24", "dev", "wwn1"])?;
        run(&["ip", "-n", r, "addr", "add", "10.9.2.2/24", "dev", "wwr0"])?;
        for (ns, dev) in [(d, "wwd0"), (nt, "wwn0"), (nt, "wwn1"), (r, "wwr0")] {
            run(&["ip", "-n", ns, "link", "set", dev, "up"])?;
        }
        for ns in [d, nt, r] {
            run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        run(&["ip", "-n", d, "route", "add", "default", "via", "10.9.1.1"])?;
        run(&[
            "ip",
            "netns",
            "exec",
            nt,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ])?;
        let masquerade = if spec.fully_random {
            "masquerade fully-random"
        } else {
            "masquerade"
        };
        let rules = format!(
            "table ip ww {{
  chain ww_post {{ type nat hook postrouting priority srcnat; policy accept;
    ip saddr 10.9.1.0/24 oifname \"wwn1\" {masquerade}
  }}
  chain ww_forward {{ type filter hook forward priority filter; policy drop;
    iifname \"wwn0\" oifname \"wwn1\" accept
    ct state established,related accept
  }}
}}
"
        );
        run_stdin(&["ip", "netns", "exec", nt, "nft", "-f", "-"], &rules)
            .map_err(|e| format!("nftables needed: {e}"))?;
        self.set_timeouts(spec.unreplied_s, spec.stream_s)
    }

    /// Sets conntrack's UDP timeouts on the router (existing bindings take
    /// the new value at their next packet).
    pub fn set_timeouts(&self, unreplied_s: u32, stream_s: u32) -> Result<(), String> {
        let u = format!("net.netfilter.nf_conntrack_udp_timeout={unreplied_s}");
        let s = format!("net.netfilter.nf_conntrack_udp_timeout_stream={stream_s}");
        run(&["ip", "netns", "exec", &self.nat, "sysctl", "-qw", &u, &s])
    }

    /// Makes `name` resolve, in the device namespace only, to the relay's
    /// IPv4 address and to an IPv6 address that leads nowhere (the device
    /// has IPv6, its route to the relay's IPv6 prefix goes through a
    /// neighbour that does not exist: a broken IPv6 path that drops
    /// silently, the case RFC 8305 is for). Uses
    /// iproute2's per-namespace `/etc/netns/<ns>/hosts`.
    pub fn broken_ipv6_name(&self, name: &str) -> Result<(), String> {
        run(&[
            "ip",
            "-n",
            &self.dev,
            "-6",
            "addr",
            "add",
            "fd00:9:1::2/64",
            "dev",
            "wwd0",
            "nodad",
        ])?;
        run(&[
            "ip",
            "-n",
            &self.dev,
            "-6",
            "route",
            "add",
            "blackhole",
            "fd00:9:2::/64",
        ])?;
        let dir = format!("/etc/netns/{}", self.dev);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{dir}: {e}"))?;
        std::fs::write(
            format!("{dir}/hosts"),
            format!("127.0.0.1 localhost\nfd00:9:2::2 {name}\n{RELAY_ADDR} {name}\n"),
        )
        .map_err(|e| format!("{dir}/hosts: {e}"))
    }

    /// Sets conntrack's timeout for established TCP connections on the
    /// router (RFC 5382 asks for at least 2 h 4 min; carriers cut sooner).
    pub fn set_tcp_timeout(&self, established_s: u32) -> Result<(), String> {
        let t = format!("net.netfilter.nf_conntrack_tcp_timeout_established={established_s}");
        run(&["ip", "netns", "exec", &self.nat, "sysctl", "-qw", &t])
    }

    /// A command that runs `program` inside namespace `ns`.
    pub fn command(&self, ns: &str, program: &str) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("ip");
        c.args(["netns", "exec", ns, program]);
        c
    }
}

impl Drop for KernelNat {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.dev));
        for ns in [&self.dev, &self.nat, &self.relay] {
            let _ = run(&["ip", "netns", "del", ns]);
        }
    }
}

/// [`KernelNat::create`], or `None` after saying why the test is skipped
/// (see [`crate::tool_or_skip`]).
pub fn create_or_skip(spec: NatSpec) -> Option<KernelNat> {
    match KernelNat::create(spec) {
        Ok(k) => Some(k),
        Err(why) => {
            crate::tool_or_skip("a kernel NAT in network namespaces", Err(why));
            None
        }
    }
}
