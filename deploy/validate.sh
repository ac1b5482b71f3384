#!/usr/bin/env bash
# Validates what cannot run on this machine with real validators from the
# package registries: the Kubernetes manifests (kubernetes-validate, against
# the Kubernetes API schemas), the compose file (podman-compose config), the
# YAML files (yamllint), the systemd unit (systemd-analyze verify), the
# Grafana dashboard (JSON) and the sample configuration (the relay's own
# check-config). Run by .ci/run after the tests (it uses the relay binary
# they built).
set -euo pipefail
cd "$(dirname "$0")/.."
tools=target/validators
if [ ! -x "$tools/bin/kubernetes-validate" ]; then
  python3 -m pip install --quiet --disable-pip-version-check --target "$tools" \
    "yamllint==1.*" "kubernetes-validate==1.*" "podman-compose==1.*"
fi
export PYTHONPATH="$PWD/$tools${PYTHONPATH:+:$PYTHONPATH}"
BIN=${BIN:-target/debug/wakewire-relay}
[ -x "$BIN" ] || cargo build --locked -p wakewire-cli --bin wakewire-relay

echo "== yamllint"
python3 -m yamllint -s deploy/ .yamllint

echo "== kubernetes-validate deploy/k8s"
"$tools/bin/kubernetes-validate" --strict deploy/k8s/*.yaml deploy/k8s/cluster/*.yaml

echo "== compose config"
for profile in single cluster; do
  "$tools/bin/podman-compose" -f deploy/compose.yaml --profile "$profile" config > /dev/null
done

echo "== Grafana dashboard"
python3 -c 'import json,sys; d=json.load(open("deploy/grafana/wakewire.json")); assert d["panels"], "no panels"'

echo "== sample configuration"
"$BIN" check-config --config deploy/wakewire.toml > /dev/null

if command -v systemd-analyze >/dev/null 2>&1; then
  echo "== systemd-analyze verify"
  unit=$(mktemp -d)/wakewire-relay.service
  sed "s|/usr/local/bin/wakewire-relay|$PWD/$BIN|; s|/etc/wakewire/wakewire.toml|$PWD/deploy/wakewire.toml|" \
    deploy/systemd/wakewire-relay.service > "$unit"
  out=$(systemd-analyze verify "$unit" 2>&1 || true)
  # Only findings about this unit count (the host's own units may warn).
  if echo "$out" | grep -i "wakewire-relay.service" | grep -vi "not found"; then
    echo "$out"
    exit 1
  fi
else
  echo "== systemd-analyze not available: unit not verified"
fi
echo "deployment files valid"
