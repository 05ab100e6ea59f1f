#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what is missing, then
# every test of every crate (unit, property, conformance, robustness, binary).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

# The browser test drives headless Chromium through chromedriver (Debian
# packages). Installed only when missing; in CI a missing browser fails that test.
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  echo "installing chromium and chromium-driver (for the browser test)"
  sudo=""
  if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then sudo="sudo"; fi
  if ! { $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
         $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }; then
    echo "WARNING: could not install chromium and chromium-driver: the browser test" \
         "will be skipped, or fail when CI=true" >&2
  fi
fi

# Tests open many sockets; use what the hard limit allows.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cargo nextest run --workspace --all-targets --locked --no-fail-fast "$@"
# Doc examples (nextest does not run doctests).
cargo test --workspace --doc --locked
