#!/usr/bin/env bash
# Instructions per cross-node message, the figure this machine's noise does
# not move: runs the servers of each MODE under `valgrind --tool=callgrind`
# twice, with a short and a long point-to-point load (100 sender→receiver
# pairs on different nodes, paced so that valgrind keeps up), and divides the
# difference in instructions by the difference in messages. Connection setup
# and start-up cancel out. Only switchboard's processes are counted, not the
# broker's.
#
#   scripts/bench-instructions.sh                     # every mode
#   scripts/bench-instructions.sh local-multi redis-pubsub
#   SWITCHBOARD_BIN=/path/to/other/switchboard scripts/bench-instructions.sh redis-pubsub
#
# Prints one JSON line per mode: {"mode", "instructions_per_message", ...}.
set -euo pipefail
cd "$(dirname "$0")/.."
MODES=("$@")
[ ${#MODES[@]} -eq 0 ] && MODES=(local-multi redis-pubsub redis-queue amqp-fanout amqp-routing gateway)
SHORT="${SHORT:-10}" LONG="${LONG:-40}" CONNS="${CONNS:-100}" RATE="${RATE:-400}"
OUT=artifacts/bench
mkdir -p "$OUT"
command -v valgrind >/dev/null || { echo "needs valgrind" >&2; exit 1; }
. scripts/bench-lib.sh
REAL=$(realpath "$(release_bin)")
CG="$OUT/callgrind"
# The nodes start through this wrapper: bench-lib.sh runs "$BIN".
BIN="$OUT/under-callgrind"
cat >"$BIN" <<WRAP
#!/bin/sh
exec valgrind --tool=callgrind --callgrind-out-file="$CG/cg.%p" "$REAL" "\$@"
WRAP
chmod +x "$BIN"
trap stop_nodes EXIT

# Instructions of every server process of one run, and its deliveries.
run() { # mode messages
  rm -rf "$CG"; mkdir -p "$CG"
  READY_WAIT=60 start_nodes "$1"
  local line
  line=$("$REAL" bench p2p --conns "$CONNS" --messages "$2" --rate "$RATE" \
    --nodes ws://127.0.0.1:9301/ws,ws://127.0.0.1:9302/ws 2>/dev/null | tail -1)
  # SIGTERM: valgrind writes its counts as the process ends.
  stop_nodes
  local ir
  ir=$(cat "$CG"/cg.* | awk '/^summary:/ {s += $2} END {printf "%d", s}')
  echo "$ir $(echo "$line" | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["deliveries"], r["lost"] + r.get("duplicates", 0))')"
}

for mode in "${MODES[@]}"; do
  read -r ir1 n1 bad1 < <(run "$mode" "$SHORT")
  read -r ir2 n2 bad2 < <(run "$mode" "$LONG")
  python3 -c "
import json
ir1, n1, ir2, n2 = $ir1, $n1, $ir2, $n2
print(json.dumps({'mode': '$mode', 'instructions_per_message': round((ir2 - ir1) / (n2 - n1)),
                  'messages': [n1, n2], 'instructions': [ir1, ir2], 'lost_or_dup': $bad1 + $bad2}))"
done
