#!/usr/bin/env bash
# Runs the docs/BENCHMARK-TARGETS.md matrix against every mode this build has, RUNS times
# each, and replaces the results of BENCHMARKS.md with this run's (and docs/bench-p2p.svg).
#
#   scripts/bench.sh                      # every mode, every scenario, 3 runs
#   RUNS=1 scripts/bench.sh local-multi   # one mode
#   SCENARIOS="fanout2k_r0 idle10k" scripts/bench.sh
#   SWITCHBOARD_BIN=/path/to/other/switchboard RUNS=3 scripts/bench.sh redis-pubsub
#
# Every invocation first measures the floor (mode "floor": what the kernel
# alone charges for the writes, and what waking an event loop for each sparse
# message costs, at this moment), so that each table can be read against the
# machine's state when it was measured.
#
# Needs Redis on 127.0.0.1:6379 for the redis modes, RabbitMQ on
# 127.0.0.1:5672 (guest/guest) for the amqp modes and NATS with JetStream on
# 127.0.0.1:4222 for the nats modes. Everything runs on this
# machine over loopback; the load tool's own CPU shares it.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${RUNS:-3}"
MODES=("$@")
[ ${#MODES[@]} -eq 0 ] && MODES=(local-multi redis-pubsub redis-queue amqp-fanout amqp-routing gateway)
SCENARIOS="${SCENARIOS:-fanout2k_r0 fanout2k_r25 fanout10k_r0 fanout10k_r5 p2p1k_r0 p2p1k_r5000 idle10k idle19k connect10k}"
OUT=artifacts/bench
mkdir -p "$OUT"
# One file per invocation: BENCHMARKS.md shows one day's figures side by
# side, never a mix of days.
RESULTS="${RESULTS:-$OUT/results-$(date -u +%Y%m%d-%H%M%S).jsonl}"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# SWITCHBOARD_BIN: measure that binary (another build, to compare), and
# leave BENCHMARKS.md alone.
. scripts/bench-lib.sh
BIN=$(release_bin)

trap stop_nodes EXIT

args_for() { # scenario
  case "$1" in
    fanout2k_r0) echo "fanout --conns 2000 --messages 200" ;;
    fanout2k_r25) echo "fanout --conns 2000 --messages 200 --rate 25" ;;
    fanout10k_r0) echo "fanout --conns 10000 --messages 200" ;;
    fanout10k_r5) echo "fanout --conns 10000 --messages 200 --rate 5" ;;
    p2p1k_r0) echo "p2p --conns 1000 --messages 100" ;;
    p2p1k_r5000) echo "p2p --conns 1000 --messages 100 --rate 5000" ;;
    idle10k) echo "idle --conns 10000" ;;
    idle19k) echo "idle --conns 19000" ;;
    connect10k) echo "connect --conns 10000 --in-flight 200" ;;
    floor_paced) echo "floor --conns 1000 --messages 100 --rate 25" ;;
    floor_burst) echo "floor --conns 1000 --messages 100" ;;
    floor_batch16) echo "floor --conns 1000 --messages 96 --batch 16" ;;
    floor_relay5000) echo "relay --conns 1000 --messages 100 --rate 5000" ;;
    floor_accept) echo "accept --conns 5000 --in-flight 200" ;;
    *) echo "unknown scenario $1" >&2; exit 2 ;;
  esac
}

for scenario in ${FLOORS-floor_paced floor_burst floor_batch16 floor_relay5000 floor_accept}; do
  for run in $(seq "$RUNS"); do
    # shellcheck disable=SC2046
    line=$("$BIN" bench $(args_for "$scenario") --label floor 2>/dev/null | tail -1)
    echo "{\"mode\":\"floor\",\"name\":\"$scenario\",\"run\":$run,\"date\":\"$(date -u +%F)\",\"result\":$line}" >> "$RESULTS"
    echo "floor $scenario run $run: $(echo "$line" | cut -c1-160)"
  done
done

for mode in "${MODES[@]}"; do
  for scenario in $SCENARIOS; do
    for run in $(seq "$RUNS"); do
      # shellcheck disable=SC2046
      bench_mode "$mode" $(args_for "$scenario")
      line=$LINE
      echo "{\"mode\":\"$mode\",\"name\":\"$scenario\",\"run\":$run,\"date\":\"$(date -u +%F)\",\"result\":$line}" >> "$RESULTS"
      echo "$mode $scenario run $run: $(echo "$line" | cut -c1-160)"
    done
  done
done
echo "results in $RESULTS"
[ -n "${SWITCHBOARD_BIN:-}" ] || python3 scripts/bench_report.py "$RESULTS" BENCHMARKS.md
