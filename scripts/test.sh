#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what is missing, then
# every test of every crate (unit, property, conformance, robustness, binary).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

# The browser test drives headless Chromium through chromedriver (Debian
# packages). Installed only when missing; in CI a missing browser fails that test.
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  echo "installing chromium and chromium-driver (for the browser test)"
  sudo=""
  if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then sudo="sudo"; fi
  if ! { $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
         $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }; then
    echo "WARNING: could not install chromium and chromium-driver: the browser test" \
         "will be skipped, or fail when CI=true" >&2
  fi
fi

# The PHP example backend's test runs php-cli with its curl extension (Debian
# packages). Installed only when missing; in CI a failed install fails here, at
# once, rather than as a test failure later.
if ! php -r 'exit(function_exists("curl_init") ? 0 : 1);' >/dev/null 2>&1; then
  echo "installing php-cli and php-curl (for the PHP example backend's test)"
  sudo=""
  if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then sudo="sudo"; fi
  if ! { $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
         $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq php-cli php-curl; }; then
    if [ "${CI:-}" = true ]; then
      echo "FAILED: could not install php-cli and php-curl, which the PHP backend test needs" >&2
      exit 1
    fi
    echo "WARNING: could not install php-cli and php-curl: the PHP backend test will be skipped" >&2
  fi
fi

# Tests open many sockets; use what the hard limit allows.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# A test whose service is missing fails; it never passes silently. Outside CI
# the tests of a missing service are left out here instead, loudly, so that
# nextest reports them as skipped. In CI nothing is left out. Which tests need
# which service follows from their names (docs/TESTING.md).
probe() { # probe HOST:PORT REQUEST EXPECTED-PREFIX
  local host=${1%:*} port=${1##*:}
  timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1" && printf "$2" >&3 && head -c "${#3}" <&3' \
    "$host" "$port" "$2" "$3" 2>/dev/null | grep -qF "$3"
}
absent=()
redis_addr=${SWITCHBOARD_TEST_REDIS:-127.0.0.1:6379}
amqp_addr=${SWITCHBOARD_TEST_AMQP:-127.0.0.1:5672}
nats_addr=${SWITCHBOARD_TEST_NATS:-127.0.0.1:4222}
if ! probe "$redis_addr" 'PING\r\n' '+PONG' ||
   ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
  absent+=("redis|Redis at $redis_addr and redis-server, redis-cli|(package(switchboard-server) | package(switchboard-test) | package(switchboard-redis)) & (binary(/redis|history/) | test(/redis/))")
fi
if ! probe "$amqp_addr" 'AMQP\x00\x00\x09\x01' $'\x01' ||
   ! command -v rabbitmq-server >/dev/null || ! command -v rabbitmqctl >/dev/null; then
  absent+=("amqp|RabbitMQ at $amqp_addr and rabbitmq-server, rabbitmqctl|(package(switchboard-server) | package(switchboard-test)) & (binary(/amqp/) | test(/amqp|rabbitmq/))")
fi
# A NATS server greets first, with its INFO line. Debian's nats-server is in
# /usr/sbin, not on every user's path.
if ! probe "$nats_addr" '' 'INFO ' ||
   ! { command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ]; }; then
  absent+=("nats|NATS at $nats_addr and the nats-server binary|(package(switchboard-server) | package(switchboard-test)) & (binary(/nats/) | test(/nats/))")
fi
if [ ! -x "${SWITCHBOARD_CHROMIUM:-/usr/bin/chromium}" ] ||
   [ ! -x "${SWITCHBOARD_CHROMEDRIVER:-/usr/bin/chromedriver}" ]; then
  absent+=("browser|chromium and chromedriver|test(/browser/)")
fi
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 8))' >/dev/null 2>&1; then
  absent+=("python|python3 (3.8 or later)|test(/python/)")
fi
if ! php -r 'exit(function_exists("curl_init") ? 0 : 1);' >/dev/null 2>&1; then
  absent+=("php|php with the curl extension|test(/php/)")
fi
if ! command -v valgrind >/dev/null; then
  absent+=("valgrind|valgrind (for the instruction-count ceiling)|test(/instruction/)")
fi
filter=()
if [ "${#absent[@]}" -gt 0 ]; then
  if [ "${CI:-}" = true ]; then
    for a in "${absent[@]}"; do
      IFS='|' read -r _ what _ <<<"$a"
      echo "MISSING in CI: $what; the tests that need it will fail" >&2
    done
  else
    expr=""
    for a in "${absent[@]}"; do
      IFS='|' read -r _ what set <<<"$a"
      echo "SKIPPING the tests that need $what: missing here (with CI=true they fail instead)" >&2
      expr="${expr:+$expr | }($set)"
    done
    filter=(-E "not ($expr)")
  fi
fi

cargo nextest run --workspace --all-targets --locked --no-fail-fast "${filter[@]}" "$@"
# Doc examples (nextest does not run doctests).
cargo test --workspace --doc --locked
