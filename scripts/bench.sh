#!/usr/bin/env bash
# Runs the docs/BENCHMARK-TARGETS.md matrix against every mode this build has, RUNS times
# each, and rewrites the results tables in BENCHMARKS.md.
#
#   scripts/bench.sh                      # every mode, every scenario, 3 runs
#   RUNS=1 scripts/bench.sh local-multi   # one mode
#   SCENARIOS="fanout2k_r0 idle10k" scripts/bench.sh
#
# Every invocation first measures the floor (mode "floor": what the kernel
# alone charges for the writes, and what waking an event loop for each sparse
# message costs, at this moment), so that each table can be read against the
# machine's state when it was measured.
#
# Needs Redis on 127.0.0.1:6379 for the redis modes and RabbitMQ on
# 127.0.0.1:5672 (guest/guest) for the amqp modes. Everything runs on this
# machine over loopback; the load tool's own CPU shares it.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${RUNS:-3}"
MODES=("$@")
[ ${#MODES[@]} -eq 0 ] && MODES=(local-multi redis-pubsub redis-queue amqp-fanout amqp-routing gateway)
SCENARIOS="${SCENARIOS:-fanout2k_r0 fanout2k_r25 fanout10k_r0 fanout10k_r5 p2p1k_r0 p2p1k_r5000 idle10k idle19k connect10k}"
OUT=artifacts/bench
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cargo build --release --locked --bin switchboard
BIN=./target/release/switchboard

PIDS=()
two_nodes() { # cluster URL: nodes n0 and n1 on ports 9301 and 9302
  for i in 0 1; do
    "$BIN" serve --node-id "n$i" --ws "127.0.0.1:930$((i + 1))" --tcp off \
      --cluster "$1" >/dev/null 2>>"$OUT/server.log" &
    PIDS+=($!)
  done
}
start_nodes() { # mode
  local mode=$1 prefix="bench-$RANDOM$RANDOM"
  PIDS=()
  case "$mode" in
    local-multi)
      "$BIN" serve --cluster memory:2 --ws 127.0.0.1:9301 --tcp off >/dev/null 2>"$OUT/server.log" &
      PIDS+=($!) ;;
    redis-pubsub|redis-queue)
      two_nodes "redis://127.0.0.1:6379?mode=${mode#redis-}&prefix=$prefix" ;;
    amqp-fanout|amqp-routing)
      two_nodes "amqp://guest:guest@127.0.0.1:5672/%2f?mode=${mode#amqp-}&prefix=$prefix" ;;
    gateway)
      # As docs/BENCHMARK-TARGETS.md measures GatewayWorker: a register, two gateways, one worker.
      "$BIN" register --listen 127.0.0.1:9310 >/dev/null 2>>"$OUT/server.log" &
      PIDS+=($!)
      for i in 1 2; do
        "$BIN" gateway --register 127.0.0.1:9310 --ws "127.0.0.1:930$i" \
          --start-port "931$i" >/dev/null 2>>"$OUT/server.log" &
        PIDS+=($!)
      done
      "$BIN" worker --register 127.0.0.1:9310 >/dev/null 2>>"$OUT/server.log" &
      PIDS+=($!) ;;
    *) echo "unknown mode $mode" >&2; exit 2 ;;
  esac
  for port in 9301 9302; do
    for _ in $(seq 100); do
      curl -sf "127.0.0.1:$port/ready" >/dev/null 2>&1 && break
      sleep 0.05
    done
  done
}
stop_nodes() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap stop_nodes EXIT

broker_pids() { # mode
  case "$1" in
    redis-*) redis-cli info server | awk -F: '/^process_id/{print $2}' | tr -d '\r' ;;
    amqp-*) rabbitmqctl -q status 2>/dev/null | awk '/^OS PID/{print $3}' ;;
    *) echo "" ;;
  esac
}

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

for scenario in floor_paced floor_burst floor_batch16 floor_relay5000 floor_accept; do
  for run in $(seq "$RUNS"); do
    # shellcheck disable=SC2046
    line=$("$BIN" bench $(args_for "$scenario") --label floor 2>/dev/null | tail -1)
    echo "{\"mode\":\"floor\",\"name\":\"$scenario\",\"run\":$run,\"result\":$line}" >> "$RESULTS"
    echo "floor $scenario run $run: $(echo "$line" | cut -c1-160)"
  done
done

for mode in "${MODES[@]}"; do
  for scenario in $SCENARIOS; do
    for run in $(seq "$RUNS"); do
      start_nodes "$mode"
      broker=$(broker_pids "$mode")
      # shellcheck disable=SC2046
      line=$("$BIN" bench $(args_for "$scenario") \
        --nodes ws://127.0.0.1:9301/ws,ws://127.0.0.1:9302/ws \
        --server-pids "$(IFS=,; echo "${PIDS[*]}")" ${broker:+--broker-pids "$broker"} \
        --label "$mode" 2>/dev/null | tail -1)
      stop_nodes
      echo "{\"mode\":\"$mode\",\"name\":\"$scenario\",\"run\":$run,\"result\":$line}" >> "$RESULTS"
      echo "$mode $scenario run $run: $(echo "$line" | cut -c1-160)"
    done
  done
done
python3 scripts/bench_report.py "$RESULTS" BENCHMARKS.md
