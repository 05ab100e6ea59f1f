#!/usr/bin/env bash
# Runs every fuzz target for a while (default 60 s each). Works on a stable
# toolchain with --sanitizer none.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${1:-60}"
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
for target in framing envelope gateway_frame php_unserialize register_line; do
  cargo fuzz run "$target" --sanitizer none -- -max_total_time="$secs"
done
