#!/usr/bin/env bash
# Fuzzes every parser that takes outside input with cargo-fuzz (libFuzzer): envelope
# JSON, config/catalog YAML, webhook POST bodies and web chat frames. Each target runs
# for a bounded time; a crash stops the script with the input saved under
# fuzz/artifacts/<target>/.
#
#   ./scripts/fuzz.sh                 # every target, 60 s each
#   FUZZ_SECONDS=10 ./scripts/fuzz.sh envelope_json webhook_body
#
# Installs cargo-fuzz if it is missing. The toolchain here is stable: cargo-fuzz
# needs nightly-only compiler flags (sanitizers, `-Z` options), which
# RUSTC_BOOTSTRAP=1 unlocks on a stable compiler. With NEXO_CARGO_LOCK naming a lock
# file, builds and runs hold it (flock), so they never overlap another build.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${FUZZ_SECONDS:-60}"
# Our code forbids `unsafe`, so what a run looks for is panics, hangs and memory
# growth; no sanitizer builds much faster. FUZZ_SANITIZER=address for the C parts.
sanitizer="${FUZZ_SANITIZER:-none}"
lock="${NEXO_CARGO_LOCK:-}"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(envelope_json config_yaml webhook_body webchat_frame)
fi

# Runs a command under the shared cargo lock if there is one.
locked() {
  if [ -n "$lock" ] && command -v flock >/dev/null 2>&1; then
    flock "$lock" "$@"
  else
    "$@"
  fi
}

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "==> installing cargo-fuzz"
  locked cargo install --locked cargo-fuzz
fi

export RUSTC_BOOTSTRAP=1
for target in "${targets[@]}"; do
  echo "==> fuzzing $target for ${seconds} s"
  mkdir -p "fuzz/corpus/$target"
  # New inputs go to corpus/ (not committed); seeds/ holds small valid examples
  # (committed) so the fuzzer starts from inputs that get past the first checks.
  # -rss_limit_mb bounds memory like the worker's own limits do; a parser that grows
  # past it is a finding.
  locked cargo fuzz run --fuzz-dir fuzz --sanitizer "$sanitizer" "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=65536
done
echo "==> no crashes in ${#targets[@]} target(s)"
