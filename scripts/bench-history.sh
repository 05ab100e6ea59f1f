#!/usr/bin/env bash
# What recording pushes in streams with history costs: fanout2k_r25 and
# p2p1k_r5000 with recording off and on (`--history-record user:*,group:*`:
# every push of the load is appended to its group's or user's stream before
# it is delivered), alternated run by run in one sitting, so that both sides
# of each pair see the same machine.
#
#   scripts/bench-history.sh                       # local-multi redis-pubsub redis-queue, 3 runs
#   RUNS=5 scripts/bench-history.sh redis-pubsub
#
# Prints one line per run and a table of medians; the JSON lines go to
# artifacts/bench/history-<UTC time>.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${RUNS:-3}"
MODES=("$@")
[ ${#MODES[@]} -eq 0 ] && MODES=(local-multi redis-pubsub redis-queue)
SCENARIOS="${SCENARIOS:-fanout2k_r25 p2p1k_r5000}"
OUT=artifacts/bench
mkdir -p "$OUT"
RESULTS="${RESULTS:-$OUT/history-$(date -u +%Y%m%d-%H%M%S).jsonl}"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
. scripts/bench-lib.sh
BIN=$(release_bin)
trap stop_nodes EXIT
# The record pattern must reach the binary as written.
set -f

args_for() {
  case "$1" in
    fanout2k_r25) echo "fanout --conns 2000 --messages 200 --rate 25" ;;
    p2p1k_r5000) echo "p2p --conns 1000 --messages 100 --rate 5000" ;;
    *) echo "unknown scenario $1" >&2; exit 2 ;;
  esac
}

for mode in "${MODES[@]}"; do
  for scenario in $SCENARIOS; do
    for run in $(seq "$RUNS"); do
      for recording in off on; do
        SERVE_EXTRA=""
        [ "$recording" = on ] && SERVE_EXTRA="--history-record user:*,group:*"
        # shellcheck disable=SC2046
        bench_mode "$mode" $(args_for "$scenario")
        line=$LINE
        echo "{\"mode\":\"$mode\",\"recording\":\"$recording\",\"name\":\"$scenario\",\"run\":$run,\"date\":\"$(date -u +%F)\",\"result\":$line}" >> "$RESULTS"
        echo "$mode $scenario recording $recording run $run: $(echo "$line" | cut -c1-150)"
      done
    done
  done
done

python3 - "$RESULTS" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| mode | scenario | CPU µs per delivery, off | on | on − off | p99 ms off / on | lost | dup |")
print("|---|---|---|---|---|---|---|---|")
keys = []
for r in rows:
    k = (r["mode"], r["name"])
    if k not in keys:
        keys.append(k)
for mode, name in keys:
    side = {}
    for rec in ("off", "on"):
        rs = [r["result"] for r in rows if (r["mode"], r["name"], r["recording"]) == (mode, name, rec)]
        cpu = statistics.median(x["cpu_us_per_delivery"] for x in rs)
        p99 = statistics.median(x["latency_us"]["p99"] for x in rs) / 1000
        lost = sum(x["lost"] for x in rs)
        dup = sum(x["duplicates"] for x in rs)
        side[rec] = (cpu, p99, lost, dup)
    off, on = side["off"], side["on"]
    print(f"| {mode} | {name} | {off[0]:.2f} | {on[0]:.2f} | {on[0]-off[0]:+.2f} | {off[1]:.2f} / {on[1]:.2f} | {off[2]+on[2]} | {off[3]+on[3]} |")
PY
