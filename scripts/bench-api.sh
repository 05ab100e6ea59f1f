#!/usr/bin/env bash
# What a push through the server API costs the node, beside the same push from
# a client: one local node with --api (and an outbox deep enough that the one
# reader keeps up with every burst); N pushes to one user each way, one
# after the other, RUNS times.
#
#   scripts/bench-api.sh              # 3 runs, 20,000 pushes each way
#   RUNS=5 PUSHES=50000 scripts/bench-api.sh
#
# Prints one JSON line per way and run (artifacts/bench/api.jsonl) and the
# medians of server CPU µs per push.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${RUNS:-3}"
PUSHES="${PUSHES:-20000}"
OUT=artifacts/bench
mkdir -p "$OUT"
cargo build --release --locked --bin switchboard
BIN=./target/release/switchboard
KEY=$(head -c 24 /dev/urandom | base64)
: > "$OUT/api.jsonl"
for run in $(seq "$RUNS"); do
  SWITCHBOARD_API_KEY=$KEY "$BIN" serve --ws 127.0.0.1:9301 --tcp off --api 127.0.0.1:9302 --outbox-frames 100000 \
    >/dev/null 2>>"$OUT/server.log" &
  pid=$!
  for _ in $(seq 100); do
    (exec 3<>/dev/tcp/127.0.0.1/9302) 2>/dev/null && break
    sleep 0.1
  done
  python3 scripts/bench_api.py --pid "$pid" --ws 127.0.0.1:9301 --api 127.0.0.1:9302 \
    --key "$KEY" --pushes "$PUSHES" | grep -v warm-up | tee -a "$OUT/api.jsonl"
  kill "$pid"; wait "$pid" || true
done
python3 - "$OUT/api.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for way in ("api", "api_batch100", "client", "http_get_ready"):
    r = [x for x in rows if x["way"] == way]
    cpu = statistics.median(x["server_cpu_us_per_push"] for x in r)
    rate = statistics.median(x["pushes_per_s"] for x in r)
    print(f"{way:15} median over {len(r)} runs: {cpu:.2f} µs server CPU per push, {rate:.0f} pushes/s")
PY
