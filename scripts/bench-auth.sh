#!/usr/bin/env bash
# What authentication costs a new connection: connect10k (10,000 connections,
# 200 in flight) against one local node, without authentication and with a JWT
# (HS256), alternated run by run so that both see the same machine.
#
#   scripts/bench-auth.sh            # 3 runs of each
#   RUNS=5 scripts/bench-auth.sh
#
# Prints one line per run and the medians; the JSON lines go to
# artifacts/bench/auth.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${RUNS:-3}"
OUT=artifacts/bench
mkdir -p "$OUT"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
cargo build --release --locked --bin switchboard
BIN=./target/release/switchboard
SECRET=$(head -c 32 /dev/urandom | base64)
: > "$OUT/auth.jsonl"

ready() { # wait until the node answers /ready
  for _ in $(seq 100); do
    if exec 3<>/dev/tcp/127.0.0.1/9301 2>/dev/null; then
      printf 'GET /ready HTTP/1.0\r\n\r\n' >&3
      if head -c 12 <&3 | grep -q 200; then exec 3>&-; return 0; fi
      exec 3>&-
    fi
    sleep 0.1
  done
  echo "the node did not start" >&2; return 1
}

for run in $(seq "$RUNS"); do
  for auth in none jwt; do
    if [ "$auth" = jwt ]; then
      SWITCHBOARD_JWT_SECRET=$SECRET "$BIN" serve --ws 127.0.0.1:9301 --tcp off \
        >/dev/null 2>>"$OUT/server.log" &
      extra=(--jwt-secret "$SECRET")
    else
      "$BIN" serve --ws 127.0.0.1:9301 --tcp off >/dev/null 2>>"$OUT/server.log" &
      extra=()
    fi
    pid=$!
    ready
    line=$("$BIN" bench connect --nodes ws://127.0.0.1:9301/ws --conns 10000 --in-flight 200 \
      --server-pids "$pid" --label "connect10k-$auth" "${extra[@]}" 2>/dev/null | tail -1)
    kill -TERM "$pid"; wait "$pid" || true
    echo "{\"auth\":\"$auth\",\"run\":$run,\"result\":$line}" >> "$OUT/auth.jsonl"
    echo "$auth run $run: $(echo "$line" | cut -c1-200)"
  done
done
python3 - "$OUT/auth.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for auth in ("none", "jwt"):
    r = [x["result"] for x in rows if x["auth"] == auth]
    cpu = [x["cpu_us_per_conn"] for x in r]
    p99 = [x["connect_us"]["p99"] for x in r]
    opened = [x.get("opened", 0) for x in r]
    print(f"{auth}: CPU µs per connection median {statistics.median(cpu):.2f} "
          f"({min(cpu):.2f}-{max(cpu):.2f}); connect p99 median {statistics.median(p99):.0f} µs; runs {len(r)}")
PY
