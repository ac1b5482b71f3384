#!/usr/bin/env bash
# The standard benchmark suite: runs wakewire-loadtest against the relay and
# the raw-quinn floor on this machine and rewrites docs/benchmarks.md (the
# tables, commands, machine and date) and docs/bench/*.svg (the plots).
# Takes about 10 minutes on 2 cores and needs ~12 GiB of memory.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p wakewire-server -p wakewire-loadtest
LT=target/release/wakewire-loadtest
OUT=${OUT:-target/bench}
rm -rf "$OUT" && mkdir -p "$OUT" docs/bench

# A: 10k devices - handshakes, idle memory, push latency at 10k/s, saturation.
$LT compare --devices 10000 --idle-secs 20 --push-rate 10000 --push-secs 20 \
  --saturate-outstanding 1000 --saturate-secs 10 --out "$OUT/10k"
# B: 100k devices - idle memory at scale, push latency at 10k/s, crash storm.
$LT compare --devices 100000 --idle-secs 30 --push-rate 10000 --push-secs 20 \
  --saturate-outstanding 0 --storm kill --storm-limit-secs 180 --out "$OUT/100k"

for run in 10k 100k; do
  for f in "$OUT/$run"/*.svg; do cp "$f" "docs/bench/$run-$(basename "$f")"; done
done
{
  cat docs/benchmarks.head.md
  for run in 10k 100k; do
    echo
    echo "## $run devices"
    echo
    cat "$OUT/$run/report.md"
    echo
    for f in "$OUT/$run"/*.svg; do
      name="$run-$(basename "$f")"
      echo "![${name%.svg}](bench/$name)"
    done
  done
} > docs/benchmarks.md
echo "wrote docs/benchmarks.md"
