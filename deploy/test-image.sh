#!/usr/bin/env bash
# Builds the relay image and runs it for real, as an operator would, with
# published ports, a read-only root filesystem and no capabilities; then,
# from the host:
#   1. health (the image's own check, and from the host's gRPC client view);
#   2. the README's demo: a device listens, a backend publishes over TLS;
#   3. a restart with the same volume keeps channel ids and queued events;
#   4. `podman stop` (SIGTERM) drains with GoAway and loses no accepted event;
#   5. a real certificate (a CA made here with openssl) mounted read-only,
#      renewed by replacing the files, then again with SIGHUP: new handshakes
#      see the new certificate, the connected device never reconnects.
# Run by .ci/run. Needs podman and runc (installed by .ci/run when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
export CONTAINERS_CONF=${CONTAINERS_CONF:-$(mktemp --suffix=.conf)}
if [ ! -s "$CONTAINERS_CONF" ]; then
  # This sandbox refuses setrlimit and has no systemd; crun refuses its
  # hybrid cgroups (../shared/reference/containers.md).
  cat > "$CONTAINERS_CONF" <<'CONF'
[containers]
default_ulimits = []
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
CONF
fi

deploy/build-image.sh
BIN=target/x86_64-unknown-linux-gnu/release/wakewire-relay   # the same static binary, on the host
NAME=wakewire-image-test
VOL=wakewire-image-test-data
WORK=$(mktemp -d)
LISTENER=
cleanup() {
  [ -n "$LISTENER" ] && kill "$LISTENER" 2>/dev/null || true
  podman rm -f "$NAME" >/dev/null 2>&1 || true
  podman volume rm -f "$VOL" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
cleanup_start() { podman rm -f "$NAME" >/dev/null 2>&1 || true; podman volume rm -f "$VOL" >/dev/null 2>&1 || true; }
cleanup_start

QUIC=127.0.0.1:24433
GRPC=https://127.0.0.1:25051
METRICS=127.0.0.1:29464
fail() { echo "FAIL: $*" >&2; podman logs "$NAME" 2>&1 | tail -20 >&2 || true; exit 1; }

run_container() {
  podman run -d --name "$NAME" \
    --read-only --cap-drop=ALL --security-opt=no-new-privileges \
    -v "$VOL:/var/lib/wakewire" "$@" \
    -e WAKEWIRE_DRAIN_DELAY_SECS=1 \
    -p "$QUIC:4433/udp" -p "$QUIC:4433/tcp" -p 127.0.0.1:25051:50051/tcp -p "$METRICS:9464/tcp" \
    localhost/wakewire-relay:latest >/dev/null
  for _ in $(seq 1 100); do
    if podman exec "$NAME" /wakewire-relay health >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  fail "the container did not become healthy"
}

echo "== run: read-only root, no capabilities"
run_container
[ "$(podman inspect "$NAME" --format '{{.HostConfig.ReadonlyRootfs}}')" = true ] || fail "root filesystem is writable"
[ "$(podman inspect "$NAME" --format '{{.EffectiveCaps}}')" = "[]" ] || fail "the relay runs with capabilities"
[ "$(podman exec "$NAME" /wakewire-relay health)" = SERVING ] || fail "health"
podman healthcheck run "$NAME" || fail "image health check"
echo "ok: healthy, read-only, no capabilities"

echo "== demo against the container"
podman cp "$NAME:/var/lib/wakewire/dev-cert.pem" "$WORK/ca.pem"
DEVICE=$(podman exec "$NAME" /wakewire-relay token device --device-id container-demo)
PUBLISHER=$(podman exec "$NAME" /wakewire-relay token publisher --device-id container-demo)
start_listener() {
  "$BIN" listen --relay "$QUIC" --server-name localhost --ca "$WORK/ca.pem" \
    --token "$DEVICE" --channel mail --dedup-store "$WORK/seen" --keepalive 2s \
    >"$WORK/listen.out" 2>"$WORK/listen.err" &
  LISTENER=$!
  for _ in $(seq 1 100); do
    grep -q "registered channel=mail" "$WORK/listen.out" 2>/dev/null && return 0
    sleep 0.1
  done
  cat "$WORK/listen.err" >&2
  fail "the listener did not register"
}
publish() {
  "$BIN" publish --grpc "$GRPC" --server-name localhost --ca "$WORK/ca.pem" \
    --token "$PUBLISHER" --channel "$CHANNEL" "$@"
}
start_listener
CHANNEL=$(grep -o 'id=[^ ]*' "$WORK/listen.out" | head -1 | cut -d= -f2)
out=$(publish "hello container")
echo "$out" | grep -q "status=DELIVERY_STATUS_DELIVERED" || fail "publish: $out"
for _ in $(seq 1 50); do grep -q "payload=hello container" "$WORK/listen.out" && break; sleep 0.1; done
grep -q "payload=hello container" "$WORK/listen.out" || fail "the wake did not arrive"
python3 -c "import urllib.request; print(urllib.request.urlopen('http://$METRICS/metrics').read().decode())" | grep -q '^wakewire_relay_publishes_total{status="delivered"} 1' \
  || fail "metrics do not show the delivered publish"
echo "ok: published over TLS from the host, wake arrived, metrics scraped"
# A device over TLS on TCP (networks that block UDP).
TCP_DEVICE=$(podman exec "$NAME" /wakewire-relay token device --device-id container-tcp)
TCP_PUBLISHER=$(podman exec "$NAME" /wakewire-relay token publisher --device-id container-tcp)
"$BIN" listen --relay "$QUIC" --server-name localhost --ca "$WORK/ca.pem" --transport tcp \
  --token "$TCP_DEVICE" --channel mail --dedup-store off --count 1 >"$WORK/tcp.out" 2>"$WORK/tcp.err" &
TCP_LISTENER=$!
for _ in $(seq 1 100); do grep -q "registered channel=mail" "$WORK/tcp.out" 2>/dev/null && break; sleep 0.1; done
grep -q "transport=TLS 1.3 over TCP" "$WORK/tcp.err" || fail "no TCP connection: $(cat "$WORK/tcp.err")"
TCP_CHANNEL=$(grep -o 'id=[^ ]*' "$WORK/tcp.out" | head -1 | cut -d= -f2)
"$BIN" publish --grpc "$GRPC" --server-name localhost --ca "$WORK/ca.pem" \
  --token "$TCP_PUBLISHER" --channel "$TCP_CHANNEL" "over tcp" | grep -q DELIVERY_STATUS_DELIVERED \
  || fail "publish to the TCP device"
wait "$TCP_LISTENER" || fail "the TCP listener did not get its wake"
grep -q "payload=over tcp" "$WORK/tcp.out" || fail "the wake did not arrive over TCP"
echo "ok: a device over TLS on TCP got its wake"

echo "== restart with the same volume keeps channel ids and queued events"
kill "$LISTENER"; wait "$LISTENER" 2>/dev/null || true; LISTENER=
out=$(publish "while away")
echo "$out" | grep -q "status=DELIVERY_STATUS_QUEUED" || fail "offline publish: $out"
podman restart -t 40 "$NAME" >/dev/null
for _ in $(seq 1 100); do podman exec "$NAME" /wakewire-relay health >/dev/null 2>&1 && break; sleep 0.1; done
: > "$WORK/listen.out"
start_listener
AGAIN=$(grep -o 'id=[^ ]*' "$WORK/listen.out" | head -1 | cut -d= -f2)
[ "$AGAIN" = "$CHANNEL" ] || fail "channel id changed: $CHANNEL -> $AGAIN"
for _ in $(seq 1 100); do grep -q "payload=while away" "$WORK/listen.out" && break; sleep 0.1; done
grep -q "payload=while away" "$WORK/listen.out" || fail "the queued event did not survive the restart"
echo "ok: same channel id after the restart, queued event delivered"

echo "== podman stop drains: GoAway, no accepted event lost"
accepted="$WORK/accepted"
: > "$accepted"
refused="$WORK/refused"
: > "$refused"
# Publish continuously until the stop is over: some are accepted before and
# during the drain, the rest refused (connection refused or UNAVAILABLE).
( i=0
  while [ ! -e "$WORK/stopped" ] && [ "$i" -lt 5000 ]; do
    i=$((i + 1))
    if r=$(publish "burst-$i" 2>/dev/null); then
      echo "$r" | grep -o 'event=[0-9a-f]*' >> "$accepted"
    else
      echo "$i" >> "$refused"
    fi
  done ) &
PUBLISHER_LOOP=$!
sleep 1
podman stop -t 40 "$NAME" >/dev/null
touch "$WORK/stopped"
code=$(podman inspect "$NAME" --format '{{.State.ExitCode}}')
wait "$PUBLISHER_LOOP" || true
[ "$code" = 0 ] || fail "the relay exited $code on SIGTERM"
grep -q "disconnected: relay going away" "$WORK/listen.err" || fail "the device was not told to go away"
n=$(wc -l < "$accepted")
[ "$n" -gt 0 ] || fail "no publish was accepted before the stop"
podman start "$NAME" >/dev/null
for _ in $(seq 1 100); do podman exec "$NAME" /wakewire-relay health >/dev/null 2>&1 && break; sleep 0.1; done
# The listener reconnects by itself; every accepted event arrives, once.
missing=0
for _ in $(seq 1 300); do
  missing=0
  while read -r ev; do
    grep -q "wake $ev " "$WORK/listen.out" || missing=$((missing + 1))
  done < "$accepted"
  [ "$missing" = 0 ] && break
  sleep 0.1
done
[ "$missing" = 0 ] || fail "$missing of $n accepted events never arrived"
dups=$(grep -o 'wake event=[0-9a-f]*' "$WORK/listen.out" | sort | uniq -d | wc -l)
[ "$dups" = 0 ] || fail "$dups events were printed twice"
echo "ok: exit 0 on SIGTERM, GoAway seen; $n publishes accepted around the stop ($(wc -l < "$refused") refused while it was down), all $n delivered once after the restart"

echo "== a real certificate, renewed without a device reconnecting"
command -v openssl >/dev/null || fail "openssl is needed for this step"
# issue NAME: a CA "NAME-ca.pem" and a relay.test certificate it signed.
issue() {
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj "/CN=$1 test CA" -addext basicConstraints=critical,CA:TRUE \
    -addext keyUsage=critical,keyCertSign -keyout "$WORK/$1-ca.key" -out "$WORK/$1-ca.pem" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=relay.test \
    -keyout "$WORK/$1.key" -out "$WORK/$1.csr" 2>/dev/null
  printf 'subjectAltName=DNS:relay.test\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > "$WORK/$1.ext"
  openssl x509 -req -in "$WORK/$1.csr" -CA "$WORK/$1-ca.pem" -CAkey "$WORK/$1-ca.key" \
    -CAcreateserial -days 2 -extfile "$WORK/$1.ext" -out "$WORK/$1.pem" 2>/dev/null
}
# install NAME: what certbot does, new files renamed into place.
install_cert() {
  cp "$WORK/$1.pem" "$WORK/tls/.cert.new"; cp "$WORK/$1.key" "$WORK/tls/.key.new"
  chmod 0644 "$WORK/tls/.cert.new" "$WORK/tls/.key.new"
  mv "$WORK/tls/.key.new" "$WORK/tls/key.pem"; mv "$WORK/tls/.cert.new" "$WORK/tls/cert.pem"
}
# publish_with CA: a new TLS handshake that trusts only that CA.
publish_with() {
  "$BIN" publish --grpc "$GRPC" --server-name relay.test --ca "$WORK/$1-ca.pem" \
    --token "$PUBLISHER" --channel "$CHANNEL" "$2"
}
# seen_by_new_handshakes CA PAYLOAD: waits (10 s at most) until a publish
# trusting only that CA gets through.
seen_by_new_handshakes() {
  for _ in $(seq 1 50); do
    publish_with "$1" "$2" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  return 1
}
for n in first second third; do issue "$n"; done
mkdir -p "$WORK/tls"; chmod 0755 "$WORK/tls"
install_cert first
kill "$LISTENER"; wait "$LISTENER" 2>/dev/null || true; LISTENER=
podman rm -f "$NAME" >/dev/null
# Mount the directory, not the files: a renewal renames new files into it.
run_container -v "$WORK/tls:/etc/wakewire/tls:ro" \
  -e WAKEWIRE_TLS_CERT=/etc/wakewire/tls/cert.pem -e WAKEWIRE_TLS_KEY=/etc/wakewire/tls/key.pem
cp "$WORK/first-ca.pem" "$WORK/ca.pem"
: > "$WORK/listen.out"; : > "$WORK/listen.err"
"$BIN" listen --relay "$QUIC" --server-name relay.test --ca "$WORK/first-ca.pem" \
  --token "$DEVICE" --channel mail --dedup-store "$WORK/seen" --keepalive 2s \
  >"$WORK/listen.out" 2>"$WORK/listen.err" &
LISTENER=$!
for _ in $(seq 1 100); do grep -q "registered channel=mail" "$WORK/listen.out" && break; sleep 0.1; done
grep -q "registered channel=mail" "$WORK/listen.out" || fail "the listener did not register with the real certificate"
publish_with first "before renewal" | grep -q DELIVERY_STATUS_DELIVERED || fail "publish with the first certificate"
# Renewal 1: files replaced, no signal; the relay's file watch picks it up.
install_cert second
seen_by_new_handshakes second "after renewal" || fail "new handshakes never saw the renewed certificate"
publish_with first "old CA" >/dev/null 2>&1 && fail "the old certificate is still served"
# Renewal 2: files replaced and SIGHUP, as a deploy hook would.
install_cert third
podman kill -s HUP "$NAME" >/dev/null
seen_by_new_handshakes third "after SIGHUP" || fail "new handshakes never saw the certificate after SIGHUP"
for p in "before renewal" "after renewal" "after SIGHUP"; do
  for _ in $(seq 1 50); do grep -q "payload=$p\$" "$WORK/listen.out" && break; sleep 0.1; done
  grep -q "payload=$p\$" "$WORK/listen.out" || fail "the connected device did not get \"$p\""
done
connects=$(grep -c "^connected " "$WORK/listen.err" || true)
[ "$connects" = 1 ] || fail "the device connected $connects times across the renewals"
grep -q "^disconnected:" "$WORK/listen.err" && fail "the device lost its connection during a renewal"
podman logs "$NAME" 2>&1 | grep -q "reloading certificates" || fail "the relay did not log the SIGHUP reload"
echo "ok: two renewals (file watch, SIGHUP) seen by new handshakes; the device stayed on one connection and got every wake"

size=$(podman image inspect wakewire-relay:latest --format '{{.Size}}')
echo "image test passed; image size $((size / 1024 / 1024)) MB"
