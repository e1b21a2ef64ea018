#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need, then
# checks formatting, lints and runs every test.
#
#   ./scripts/test.sh
#
# Needs: the Rust toolchain (cargo), and root or passwordless apt for Chromium.
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

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "cargo test"
cargo test --workspace --locked
