#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what is missing, then
# every test of every crate (unit, property, conformance, robustness, binary).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

# Tests open many sockets; use what the hard limit allows.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cargo nextest run --workspace --all-targets --locked --no-fail-fast "$@"
# Doc examples (nextest does not run doctests).
cargo test --workspace --doc --locked
