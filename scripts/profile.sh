#!/usr/bin/env bash
# CPU profile of the relay under load (issue 13, docs/perf.md): runs
# `wakewire-loadtest compare --target relay` with a child relay, records the
# relay with `perf record -e cpu-clock` (no hardware counters on these VMs)
# for PROFILE_SECS seconds, and writes a flame graph and a table of where the
# samples fall. Needs linux-perf and inferno (`cargo install inferno`).
#   scripts/profile.sh OUT_DIR [RELAY_BIN]
# Load: DEVICES (2000), PUSH_RATE (5000), PUBLISH_API (unary | stream).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/profile.sh OUT_DIR [RELAY_BIN]}
RELAY_BIN=${2:-target/release/wakewire-relay}
PROFILE_SECS=${PROFILE_SECS:-15}
mkdir -p "$OUT"
target/release/wakewire-loadtest compare --target relay --devices "${DEVICES:-2000}" \
  --push-rate "${PUSH_RATE:-5000}" --publish-api "${PUBLISH_API:-unary}" \
  --push-secs 25 --saturate-outstanding 0 --idle-secs 3 --relay-bin "$RELAY_BIN" \
  --out "$OUT/lt" >"$OUT/loadtest.log" 2>&1 &
LT=$!
pid=""
for _ in $(seq 1 100); do
  pid=$(pgrep -n -f "^$RELAY_BIN serve" || true)
  [ -n "$pid" ] && break
  sleep 0.2
done
[ -n "$pid" ] || { echo "relay did not start" >&2; kill $LT; exit 1; }
# Connect (2000 devices) and idle first; profile the push phase.
sleep 12
perf record -e cpu-clock -F ${PERF_FREQ:-499} ${PERF_CALLGRAPH:--g} -p "$pid" -o "$OUT/perf.data" -- sleep "$PROFILE_SECS" 2>"$OUT/perf.log"
wait $LT
perf script -i "$OUT/perf.data" 2>/dev/null | inferno-collapse-perf >"$OUT/stacks.folded"
inferno-flamegraph <"$OUT/stacks.folded" >"$OUT/flame.svg"
python3 - "$OUT/stacks.folded" <<'PY' | tee "$OUT/categories.md"
import sys
cats = [
    ("store: the writer thread and redb", ["redb::", "store::writer", "wakewire-store", "fdatasync", "fsync"]),
    ("gRPC publisher API: tonic, h2, hyper, prost", ["tonic::", "h2::", "hyper::", "wakewire-grpc", "publish::"]),
    ("QUIC: quinn, quinn-proto, UDP", ["quinn", "udp_sendmsg", "udp_recvmsg", "__sys_sendmsg", "__sys_recvmsg"]),
    ("TLS record crypto: rustls, ring", ["rustls::", "ring::", "ring_core"]),
    ("delivery decisions: relay_connection, device_conn", ["relay_connection", "device_conn"]),
    ("tokio scheduling: park/unpark, futex, context switches", ["tokio::runtime", "futex", "schedule", "finish_task_switch"]),
    ("allocator", ["malloc", "free", "realloc", "cfree"]),
]
total = 0
counts = {c: 0 for c, _ in cats}
other = 0
for line in open(sys.argv[1]):
    stack, _, n = line.rstrip().rpartition(" ")
    n = int(n)
    total += n
    for c, keys in cats:
        if any(k in stack for k in keys):
            counts[c] += n
            break
    else:
        other += n
print("| where the relay's CPU goes (first match, top to bottom) | share of samples |")
print("|---|---|")
for c, _ in cats:
    print(f"| {c} | {100 * counts[c] / total:.1f}% |")
print(f"| other | {100 * other / total:.1f}% |")
print(f"\n{total} samples")
PY
grep -E "wakes/s achieved|CPU per wake|latency p99 ms" "$OUT/lt/report.md" || true
