#!/usr/bin/env bash
# System calls per cross-node message: runs p2p1k_r5000's load (1,000 pairs,
# paced at 5,000 messages/s) against the nodes of each MODE with every server
# process under `strace -c -f`, and prints the calls per delivered message by
# system call. The count includes the connections' setup (a few calls per
# connection, about 0.1 per message at this length), and strace slows the
# servers, which may batch less than they would: read it as an upper bound.
#
#   scripts/bench-syscalls.sh                       # every mode
#   MESSAGES=20 scripts/bench-syscalls.sh redis-pubsub local-multi
#   SWITCHBOARD_BIN=/path/to/other/switchboard scripts/bench-syscalls.sh redis-pubsub
set -euo pipefail
cd "$(dirname "$0")/.."
MESSAGES="${MESSAGES:-100}"
MODES=("$@")
[ ${#MODES[@]} -eq 0 ] && MODES=(local-multi redis-pubsub redis-queue amqp-fanout amqp-routing gateway)
OUT=artifacts/bench
mkdir -p "$OUT"
command -v strace >/dev/null || { echo "needs strace" >&2; exit 1; }
. scripts/bench-lib.sh
BIN=$(release_bin)
trap stop_nodes EXIT

for mode in "${MODES[@]}"; do
  start_nodes "$mode"
  trace="$OUT/strace-$mode.txt"
  attach=()
  for p in "${PIDS[@]}"; do attach+=(-p "$p"); done
  strace -c -f -o "$trace" "${attach[@]}" 2>/dev/null &
  tracer=$!
  sleep 1 # strace attached to every thread
  line=$("$BIN" bench p2p --conns 1000 --messages "$MESSAGES" --rate 5000 \
    --nodes ws://127.0.0.1:9301/ws,ws://127.0.0.1:9302/ws --label "$mode" 2>/dev/null | tail -1)
  kill -INT "$tracer"; wait "$tracer" 2>/dev/null || true
  stop_nodes
  python3 - "$trace" "$line" "$mode" <<'PY'
import json, sys
trace, line, mode = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
n = line["deliveries"]
calls = {}
for l in open(trace):
    f = l.split()
    # "% time seconds usecs/call calls [errors] syscall"
    if len(f) >= 5 and f[0][0].isdigit() and f[-1] != "total":
        calls[f[-1]] = int(f[3])
total = sum(calls.values())
top = sorted(calls.items(), key=lambda kv: -kv[1])[:6]
print(f"{mode}: {total / n:.2f} system calls per message ({n} messages, {line.get('lost', 0)} lost); "
      + ", ".join(f"{k} {v / n:.2f}" for k, v in top))
PY
done
