# Starting and stopping the nodes of each benchmarked mode; sourced by the
# scripts/bench*.sh scripts, which set BIN (see release_bin) and OUT. Every
# mode listens for clients on 127.0.0.1:9301 and :9302. READY_WAIT: seconds
# to wait for them to be ready (5). SERVE_EXTRA: more flags for every
# `serve` node (word-split), e.g. "--history-record user:*,group:*".

# The binary to measure: $SWITCHBOARD_BIN (another build, to compare), or this
# workspace's release build, built now.
release_bin() {
  if [ -n "${SWITCHBOARD_BIN:-}" ]; then
    echo "$SWITCHBOARD_BIN"
  else
    cargo build --release --locked --bin switchboard >&2
    echo ./target/release/switchboard
  fi
}

PIDS=()
two_nodes() { # cluster URL: nodes n0 and n1 on ports 9301 and 9302
  for i in 0 1; do
    "$BIN" serve --node-id "n$i" --ws "127.0.0.1:930$((i + 1))" --tcp off ${THREADS:+--threads "$THREADS"} \
      --cluster "$1" ${SERVE_EXTRA:-} >/dev/null 2>>"$OUT/server.log" &
    PIDS+=($!)
  done
}
start_nodes() { # mode
  local mode=$1 prefix="bench-$RANDOM$RANDOM"
  PIDS=()
  case "$mode" in
    local-multi)
      "$BIN" serve --cluster memory:2 --ws 127.0.0.1:9301 --tcp off ${THREADS:+--threads "$THREADS"} ${SERVE_EXTRA:-} >/dev/null 2>"$OUT/server.log" &
      PIDS+=($!) ;;
    redis-pubsub|redis-queue)
      two_nodes "redis://127.0.0.1:6379?mode=${mode#redis-}&prefix=$prefix" ;;
    amqp-fanout|amqp-routing)
      two_nodes "amqp://guest:guest@127.0.0.1:5672/%2f?mode=${mode#amqp-}&prefix=$prefix" ;;
    redis-cluster-pubsub|redis-cluster-queue)
      two_nodes "$(redis_cluster_url)?mode=${mode#redis-cluster-}&prefix=$prefix" ;;
    nats-core|nats-jetstream)
      two_nodes "nats://127.0.0.1:4222?mode=${mode#nats-}&prefix=$prefix" ;;
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
    for _ in $(seq $((${READY_WAIT:-5} * 20))); do
      curl -sf "127.0.0.1:$port/ready" >/dev/null 2>&1 && break
      sleep 0.05
    done
  done
}
stop_nodes() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
}

# A private Redis Cluster (3 masters with a replica each) on ports 7101-7106,
# started on first use and stopped on exit (stop_redis_cluster).
RC_PORTS=(7101 7102 7103 7104 7105 7106)
redis_cluster_url() {
  # Started once: called in a subshell, so the running cluster is told by its
  # first port answering, not by a variable.
  if ! redis-cli -p "${RC_PORTS[0]}" ping >/dev/null 2>&1; then
    local dir="$OUT/redis-cluster" p
    mkdir -p "$dir"
    for p in "${RC_PORTS[@]}"; do
      mkdir -p "$dir/$p"
      redis-server --port "$p" --dir "$dir/$p" --cluster-enabled yes --cluster-config-file nodes.conf \
        --cluster-node-timeout 2000 --appendonly no --save '' --repl-diskless-sync-delay 0 \
        >"$dir/$p.log" 2>&1 &
    done
    sleep 0.5
    redis-cli --cluster create $(printf '127.0.0.1:%s ' "${RC_PORTS[@]}") --cluster-replicas 1 \
      --cluster-yes >"$dir/create.log" 2>&1
    for _ in $(seq 100); do
      redis-cli -p "${RC_PORTS[0]}" cluster info | grep -q 'cluster_state:ok' && break
      sleep 0.1
    done
    sleep 1
  fi
  echo "redis-cluster://127.0.0.1:${RC_PORTS[0]},127.0.0.1:${RC_PORTS[1]},127.0.0.1:${RC_PORTS[2]}"
}
stop_redis_cluster() {
  local p pid
  for p in "${RC_PORTS[@]}"; do
    for pid in $(ss -Hltnp "sport = :$p" | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u); do
      kill "$pid" 2>/dev/null || true
    done
  done
  rm -rf "$OUT/redis-cluster"
}

broker_pids() { # mode
  case "$1" in
    # By port: the cluster may have been started in a subshell.
    redis-cluster-*)
      for p in "${RC_PORTS[@]}"; do
        ss -Hltnp "sport = :$p" | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2
      done | sort -u | paste -sd, ;;
    redis-*) redis-cli info server | awk -F: '/^process_id/{print $2}' | tr -d '\r' ;;
    amqp-*) rabbitmqctl -q status 2>/dev/null | awk '/^OS PID/{print $3}' ;;
    # The NATS listening on 4222, not the private ones tests start.
    nats-*) ss -Hltnp 'sport = :4222' | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2 ;;
    *) echo "" ;;
  esac
}


# Starts MODE's nodes fresh, runs `switchboard bench ARGS...` against both
# of its client listeners with the servers' (and the broker's) pids, and
# stops the nodes; the result line is left in LINE (a variable, not output,
# so that PIDS stays this shell's for the EXIT trap).
bench_mode() { # mode args...
  local mode=$1 broker
  shift
  start_nodes "$mode"
  broker=$(broker_pids "$mode")
  LINE=$("$BIN" bench "$@" \
    --nodes ws://127.0.0.1:9301/ws,ws://127.0.0.1:9302/ws \
    --server-pids "$(IFS=,; echo "${PIDS[*]}")" ${broker:+--broker-pids "$broker"} \
    --label "$mode" 2>/dev/null | tail -1)
  stop_nodes
}
