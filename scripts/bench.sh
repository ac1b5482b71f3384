#!/usr/bin/env bash
# The standard benchmark suite: runs wakewire-loadtest against the relay and
# the raw-quinn floor on this machine and rewrites docs/benchmarks.md (the
# tables, commands, machine and date) and docs/bench/*.svg (the plots);
# docs/benchmarks.head.md and docs/benchmarks.tail.md frame the tables.
# Takes about 17 minutes on 2 cores and needs ~14 GiB of memory.
#
# BEFORE_RELAY=<path to an older wakewire-relay> adds a "relay before" column
# to scenarios A, B and C: the same commands run against that binary in the
# same session (about 10 more minutes), so a change is judged against what
# it replaced on the same machine. Build one with e.g.
#   git worktree add /tmp/old <commit> && (cd /tmp/old && cargo build --release -p wakewire-cli)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p wakewire-cli -p wakewire-loadtest
LT=target/release/wakewire-loadtest
OUT=${OUT:-target/bench}
rm -rf "$OUT" && mkdir -p "$OUT" docs/bench

BEFORE_RELAY=${BEFORE_RELAY:-}
# Runs `compare --target TARGET ARGS --out DIR` and, with BEFORE_RELAY, the
# relay part again on that binary into DIR-before. Which of the two runs
# first alternates from one scenario to the next: on a shared machine a run
# that follows a heavy one can be slower, and the order should not favour
# either relay.
RUNS=0
compare() {
  local out=$1 target=$2
  shift 2
  RUNS=$((RUNS + 1))
  if [ -n "$BEFORE_RELAY" ] && [ $((RUNS % 2)) -eq 0 ]; then
    $LT compare "$@" --target relay --relay-bin "$BEFORE_RELAY" --out "$out-before"
    $LT compare --target "$target" "$@" --out "$out"
    echo "- order: the relay before ran first" >>"$out-before/report.md"
  else
    $LT compare --target "$target" "$@" --out "$out"
    if [ -n "$BEFORE_RELAY" ]; then
      $LT compare "$@" --target relay --relay-bin "$BEFORE_RELAY" --out "$out-before"
      echo "- order: the relay before ran second" >>"$out-before/report.md"
    fi
  fi
}
# The report of a run, with the before column when there is one.
report() {
  if [ -f "$1-before/report.md" ]; then
    python3 scripts/merge_reports.py "$1/report.md" "$1-before/report.md"
  else
    cat "$1/report.md"
  fi
}
# A: 10k devices - handshakes, idle memory, push latency at 10k/s, saturation.
compare "$OUT/10k" both --devices 10000 --idle-secs 20 --push-rate 10000 --push-secs 20 \
  --saturate-outstanding 1000 --saturate-secs 10
# B: 100k devices - idle memory at scale, push latency at 10k/s.
compare "$OUT/100k" both --devices 100000 --idle-secs 30 --push-rate 10000 --push-secs 20 \
  --saturate-outstanding 0
# Storms, 100k devices: the relay killed (SIGKILL) or stopped (SIGTERM, GoAway
# with spread reconnects) and restarted. Not pinned: 100k devices reconnecting
# are 100k machines, and on one core the generator itself times out (both
# relays, before and after, stalled at ~2,400 devices back when pinned).
compare "$OUT/storm-kill" relay --devices 100000 --idle-secs 5 --push-rate 0 \
  --saturate-outstanding 0 --storm kill --storm-limit-secs 180 --pin false
$LT compare --target relay --devices 100000 --idle-secs 5 --push-rate 0 \
  --saturate-outstanding 0 --storm term --storm-limit-secs 180 --pin false --out "$OUT/storm-term"
# C: durable publishing to offline devices: group commit vs one fsync each.
compare "$OUT/durable-true" relay --devices 1000 --idle-secs 1 --push-rate 0 \
  --saturate-outstanding 0 --durable-secs 15 --durable-workers 256
$LT compare --target relay --devices 1000 --idle-secs 1 --push-rate 0 \
  --saturate-outstanding 0 --durable-secs 15 --durable-workers 256 \
  --relay-arg=--store-group-commit --relay-arg=false --out "$OUT/durable-false"
# The same with PublishStream (a relay before it existed cannot run this).
$LT compare --target relay --devices 1000 --idle-secs 1 --push-rate 0 \
  --saturate-outstanding 0 --durable-secs 15 --durable-workers 256 \
  --publish-api stream --out "$OUT/durable-stream"
# E: the publish API at 10k devices and 10k/s offered: unary Publish vs
# PublishStream, the same relay one after the other.
for api in unary stream; do
  $LT compare --target relay --devices 10000 --idle-secs 5 --push-rate 10000 --push-secs 20 \
    --saturate-outstanding 0 --publish-api "$api" --out "$OUT/api-$api"
done
# D: the adaptive keepalive in simulated standby (deterministic, no network).
$LT standby --out "$OUT/standby"
# F: legitimate devices during a ClientHello flood, with and without Retry.
$LT hello-flood --flood-rate 10000 --secs 10 --concurrency 16 --out "$OUT/helloflood"
# G: a cluster (3 relays on a 3-node NATS JetStream, R3) vs one node; failover.
$LT cluster --devices 1000 --publishes 10000 --concurrency 16 --durable-secs 15 \
  --durable-workers 256 --failover-devices 10000 --failover-keepalive-secs 5 --out "$OUT/cluster"
# E: one device flooding acks: other tenants' latency and the relay's memory.
$LT ack-flood --devices 200 --rate 500 --phase-secs 10 --flooders 1 --out "$OUT/ackflood"

for run in 10k 100k; do
  for f in "$OUT/$run"/*.svg; do cp "$f" "docs/bench/$run-$(basename "$f")"; done
done
cp "$OUT/standby/standby-interval.svg" docs/bench/
for s in storm-kill storm-term; do
  if [ -f "$OUT/$s/storm.svg" ]; then cp "$OUT/$s/storm.svg" "docs/bench/$s.svg"; fi
done
{
  cat docs/benchmarks.head.md
  for run in 10k 100k; do
    echo
    echo "## $run devices"
    echo
    report "$OUT/$run"
    echo
    for f in "$OUT/$run"/*.svg; do
      name="$run-$(basename "$f")"
      echo "![${name%.svg}](bench/$name)"
    done
  done
  echo
  echo "## Durable publishing (store-and-forward)"
  echo
  echo "Devices registered, then offline: every Publish is a committed store write (fsync) before it"
  echo "is answered. Group commit (the default) vs one fsync per event, same machine, same disk:"
  echo
  report "$OUT/durable-true" | grep -E "^- (command|machine|before)|^### Run"
  echo
  report "$OUT/durable-true" | grep -E "^\|( metric|---| durable)"
  echo
  grep -E "^- (command|machine)|^### Run" "$OUT/durable-false/report.md"
  echo
  grep -E "^\|( metric|---| durable)" "$OUT/durable-false/report.md"
  echo
  echo "With PublishStream (one long-lived stream per publisher connection), group commit:"
  echo
  grep -E "^- (command|machine)|^### Run" "$OUT/durable-stream/report.md"
  echo
  grep -E "^\|( metric|---| durable)" "$OUT/durable-stream/report.md"
  echo
  echo "## Reconnect storms (100k devices)"
  echo
  echo "Crash (SIGKILL, devices notice at their next keepalive) and graceful restart (SIGTERM:"
  echo "GoAway with reconnect hints spread over the drain). Generator and relay share both cores"
  echo "here (\`--pin false\`), and the generator's devices share one \`HandshakeLimit\` of"
  echo "\`--concurrency\` (256) handshakes in flight: without it the generator's own sockets"
  echo "overflow and its devices time out (the 100k stall of 2026-11-29, docs/perf.md)."
  echo
  report "$OUT/storm-kill" | grep -E "^- (command|machine|before)|^### Run"
  echo
  report "$OUT/storm-kill" | grep -E "^\|( metric|---| storm| reconnect)"
  echo
  grep -E "^- (command|machine)|^### Run" "$OUT/storm-term/report.md"
  echo
  grep -E "^\|( metric|---| storm| reconnect)" "$OUT/storm-term/report.md"
  echo
  echo "![storm after SIGKILL](bench/storm-kill.svg)"
  echo
  echo "![storm after SIGTERM](bench/storm-term.svg)"
  echo
  echo "## Publish API: unary Publish vs PublishStream (10k devices, 10k/s offered)"
  echo
  echo "The same relay, one run after the other: each event its own unary Publish (an HTTP/2"
  echo "stream each, as in the tables above), or one long-lived PublishStream per publisher"
  echo "connection (4)."
  for api in unary stream; do
    echo
    grep -E "^- (command|machine)|^### Run" "$OUT/api-$api/report.md"
    echo
    grep -E "^\|( metric|---| wakes/s achieved| server CPU per wake at that| wakes per server| latency p(50|99) )" "$OUT/api-$api/report.md"
  done
  echo
  echo "## Adaptive keepalive (simulated standby)"
  echo
  echo "Command: \`target/release/wakewire-loadtest standby\` (deterministic; the tuner is the SDK's own code)."
  echo
  cat "$OUT/standby/standby.md"
  echo
  echo "![keepalive interval over time](bench/standby-interval.svg)"
  echo
  echo "## Ack flood (one hostile device)"
  echo
  echo "Command: \`target/release/wakewire-loadtest ack-flood --devices 200 --rate 500 --phase-secs 10 --flooders 1\`"
  echo "(relay child process, loopback; $(date -u +%Y-%m-%d))."
  echo
  cat "$OUT/ackflood/ackflood.md"
  echo
  echo "## ClientHello flood"
  echo
  echo "Command: \`target/release/wakewire-loadtest hello-flood --flood-rate 10000 --secs 10 --concurrency 16\`"
  echo "(relay child process, loopback; $(date -u +%Y-%m-%d))."
  echo
  cat "$OUT/helloflood/helloflood.md"
  echo
  echo "## Cluster: 3 relays on NATS JetStream vs one node"
  echo
  echo "Real processes on loopback: three nats-server $(nats-server --version 2>/dev/null | awk '{print $2}') nodes (JetStream, R3) and three"
  echo "relays, against one relay on its embedded store; same devices, same publisher. In the"
  echo "cluster the device is on relay C and the publisher on relay A. Durable: devices offline,"
  echo "each publish answered once stored (an fsync on one node; a write on a majority of NATS"
  echo "nodes in a cluster). Failover: devices spread over the three relays, one killed with"
  echo "SIGKILL; devices notice at their next keepalive (5 s here, timeout 5 s)."
  echo
  cat "$OUT/cluster/cluster.md"
  echo
  cat docs/benchmarks.tail.md
} > docs/benchmarks.md
echo "wrote docs/benchmarks.md"
