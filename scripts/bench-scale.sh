#!/usr/bin/env bash
# What each cluster mode costs per delivery and per connection, side by side
# in one sitting: the figures behind "Growing past one machine" in
# BENCHMARKS.md. Runs fanout2k_r25, p2p1k_r5000, idle10k and connect10k
# against two nodes of each mode, the modes alternated run by run so that
# every mode sees the same machine.
#
#   scripts/bench-scale.sh                  # the modes below, 3 runs
#   RUNS=5 scripts/bench-scale.sh nats-core redis-pubsub
#
# Needs Redis on 127.0.0.1:6379, RabbitMQ on 127.0.0.1:5672 and NATS with
# JetStream on 127.0.0.1:4222 for their modes; the redis-cluster modes start a
# private Redis Cluster on ports 7101-7106. Prints one line per run and a
# table of medians; the JSON lines go to artifacts/bench/scale-<UTC time>.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${RUNS:-3}"
MODES=("$@")
[ ${#MODES[@]} -eq 0 ] && MODES=(local-multi redis-pubsub redis-cluster-pubsub redis-queue amqp-routing nats-core nats-jetstream)
SCENARIOS="${SCENARIOS:-fanout2k_r25 p2p1k_r5000 idle10k connect10k}"
OUT=artifacts/bench
mkdir -p "$OUT"
RESULTS="${RESULTS:-$OUT/scale-$(date -u +%Y%m%d-%H%M%S).jsonl}"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
. scripts/bench-lib.sh
BIN=$(release_bin)
trap 'stop_nodes; stop_redis_cluster' EXIT

args_for() {
  case "$1" in
    fanout2k_r25) echo "fanout --conns 2000 --messages 200 --rate 25" ;;
    p2p1k_r5000) echo "p2p --conns 1000 --messages 100 --rate 5000" ;;
    idle10k) echo "idle --conns 10000" ;;
    connect10k) echo "connect --conns 10000 --in-flight 200" ;;
    *) echo "unknown scenario $1" >&2; exit 2 ;;
  esac
}

for scenario in $SCENARIOS; do
  for run in $(seq "$RUNS"); do
    for mode in "${MODES[@]}"; do
      # shellcheck disable=SC2046
      bench_mode "$mode" $(args_for "$scenario")
      line=$LINE
      echo "{\"mode\":\"$mode\",\"name\":\"$scenario\",\"run\":$run,\"date\":\"$(date -u +%F)\",\"result\":$line}" >> "$RESULTS"
      echo "$mode $scenario run $run: $(echo "$line" | cut -c1-150)"
    done
  done
done

python3 - "$RESULTS" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
modes = []
for r in rows:
    if r["mode"] not in modes:
        modes.append(r["mode"])
def med(mode, name, f):
    xs = [f(r["result"]) for r in rows if (r["mode"], r["name"]) == (mode, name)]
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None
def fmt(x, d=1):
    return "—" if x is None else f"{x:,.{d}f}"
def lost(mode):
    return sum(r["result"].get("lost", 0) + r["result"].get("duplicates", 0)
               for r in rows if r["mode"] == mode and "lost" in r["result"])
print("| mode | fanout2k_r25: CPU µs per delivery (broker) | p2p1k_r5000: CPU µs per message (broker) | p2p1k_r5000 p99 ms | idle10k: KiB per connection, nodes (broker) | connect10k: CPU µs per connection (broker) | lost + duplicated |")
print("|---|---|---|---|---|---|---|")
def pair(m, name, total, broker, d=1, scale=1.0):
    t = med(m, name, lambda x: x.get(total))
    b = med(m, name, lambda x: x.get(broker))
    t = None if t is None else t * scale
    b = None if b is None else b * scale
    return fmt(t, d) + ("" if b is None else f" ({fmt(b, d)})")
for m in modes:
    print("| " + " | ".join([
        m,
        pair(m, "fanout2k_r25", "cpu_us_per_delivery", "broker_cpu_us_per_delivery", 2),
        pair(m, "p2p1k_r5000", "cpu_us_per_delivery", "broker_cpu_us_per_delivery"),
        fmt(med(m, "p2p1k_r5000", lambda x: x.get("latency_us", {}).get("p99", 0) / 1000), 2),
        pair(m, "idle10k", "rss_bytes_per_conn", "broker_rss_bytes_per_conn", 2, 1 / 1024),
        pair(m, "connect10k", "cpu_us_per_conn", "broker_cpu_us_per_conn"),
        str(lost(m)),
    ]) + " |")
PY
