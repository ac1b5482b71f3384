//! Resident memory and CPU time of a process, from /proc (Linux).

use std::time::{Duration, Instant};

use serde::Serialize;

/// Clock ticks per second of /proc/<pid>/stat times (USER_HZ; 100 on Linux
/// for every architecture we run on).
const TICKS_PER_SEC: f64 = 100.0;

/// One reading.
#[derive(Debug, Clone, Copy)]
pub struct Reading {
    /// Resident set size, bytes.
    pub rss: u64,
    /// User + system CPU time.
    pub cpu: Duration,
}

/// Reads RSS and CPU time of `pid`; `None` if the process is gone.
pub fn read(pid: u32) -> Option<Reading> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the ")" that ends the command name: state is field 3;
    // utime and stime are fields 14 and 15.
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Reading {
        rss: rss_kb * 1024,
        cpu: Duration::from_secs_f64((utime + stime) as f64 / TICKS_PER_SEC),
    })
}

/// A sample of a process over time.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Seconds since the run started.
    pub t: f64,
    /// RSS, MiB.
    pub rss_mib: f64,
    /// CPU use since the previous sample, % of one core.
    pub cpu_pct: f64,
    /// A caller-provided gauge (connected devices) at that time.
    pub gauge: u64,
}

/// Samples a process periodically.
#[derive(Debug)]
pub struct Sampler {
    pid: u32,
    start: Instant,
    last: Option<(Instant, Duration)>,
    /// Samples so far.
    pub samples: Vec<Sample>,
}

impl Sampler {
    /// Samples `pid`, with times relative to `start`.
    pub fn new(pid: u32, start: Instant) -> Self {
        Self {
            pid,
            start,
            last: None,
            samples: vec![],
        }
    }

    /// The sampled process.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Takes a sample now; returns it.
    pub fn sample(&mut self, gauge: u64) -> Option<Sample> {
        let r = read(self.pid)?;
        let now = Instant::now();
        let cpu_pct = match self.last {
            Some((t, cpu)) if now > t => {
                100.0 * r.cpu.saturating_sub(cpu).as_secs_f64() / (now - t).as_secs_f64()
            }
            _ => 0.0,
        };
        self.last = Some((now, r.cpu));
        let s = Sample {
            t: (now - self.start).as_secs_f64(),
            rss_mib: r.rss as f64 / (1024.0 * 1024.0),
            cpu_pct,
            gauge,
        };
        self.samples.push(s.clone());
        Some(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let r = read(std::process::id()).expect("own /proc entry");
        assert!(r.rss > 1024 * 1024);
        assert!(read(u32::MAX).is_none());
    }
}
