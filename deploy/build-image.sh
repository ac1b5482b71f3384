#!/usr/bin/env bash
# Builds the relay image from nothing pulled: a static binary on `scratch`.
#   deploy/build-image.sh            # tags wakewire-relay:<version> and :latest
# Needs podman (or ENGINE=docker); CONTAINERS_CONF and PODMAN_RUNTIME are
# honoured (see ../shared/reference/containers.md for this sandbox).
set -euo pipefail
cd "$(dirname "$0")/.."
ENGINE=${ENGINE:-podman}
TARGET=x86_64-unknown-linux-gnu
version=$(grep -m1 '^version' Cargo.toml | sed 's/.*"\(.*\)"/\1/')

echo "== static build of wakewire-relay $version"
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --locked --release --target "$TARGET" -p wakewire-cli --bin wakewire-relay
bin="target/$TARGET/release/wakewire-relay"
if ! ldd "$bin" 2>&1 | grep -Eq 'statically linked|not a dynamic executable'; then
  echo "error: $bin is dynamically linked:" >&2
  ldd "$bin" >&2
  exit 1
fi

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/rootfs/etc/ssl/certs" "$ctx/rootfs/var/lib/wakewire"
cp "$bin" "$ctx/wakewire-relay"
strip "$ctx/wakewire-relay"
printf 'wakewire:x:10001:10001:wakewire relay:/var/lib/wakewire:/sbin/nologin\n' > "$ctx/rootfs/etc/passwd"
printf 'wakewire:x:10001:\n' > "$ctx/rootfs/etc/group"
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  cp /etc/ssl/certs/ca-certificates.crt "$ctx/rootfs/etc/ssl/certs/"
fi
cp deploy/Containerfile "$ctx/"
# The data directory belongs to the relay's user, mode 0700 (a named volume
# starts as a copy of it).
chmod 0700 "$ctx/rootfs/var/lib/wakewire"
if [ "$(id -u)" = 0 ]; then
  chown -R 10001:10001 "$ctx/rootfs/var/lib/wakewire"
  chown 0:0 "$ctx/wakewire-relay"
fi

echo "== $ENGINE build"
fmt=()
[ "$ENGINE" = podman ] && fmt=(--format docker)   # keeps HEALTHCHECK
$ENGINE build "${fmt[@]}" -t "wakewire-relay:$version" -t wakewire-relay:latest \
  -f "$ctx/Containerfile" "$ctx"
size=$($ENGINE image inspect wakewire-relay:latest --format '{{.Size}}')
echo "built wakewire-relay:$version and :latest, $((size / 1024 / 1024)) MB ($size bytes)"
