#!/usr/bin/env bash
# The server API against its own OpenAPI description: the PyPI package
# schemathesis generates requests for every operation of
# /api/openapi.json (valid ones and invalid ones) and checks that no answer is
# a server error (5xx) and that every answer matches the schema documented
# for its status. One `switchboard serve` node, local mode, keyed API.
#
# The results are kept in target/ci-artifacts/schemathesis/ (wiped at each
# run; target/ is never committed), for CI to keep as an artifact:
#   summary.txt         the verdict line, and the failures if any
#   schemathesis.log    schemathesis's own output: each failure with the
#                       request that reproduces it (the API key sanitized)
#   report/junit.xml    one test case per operation
#   openapi.json        the description that was tested
#   .schemathesis/      its cache of failures, for `schemathesis replay ID` from here
#   server.log          what the node printed
#   client.log          the reconnects of the client held open during the run
#
# Bounded: at most EXAMPLES generated cases per operation and phase, so the
# run takes about half a minute here; `timeout` stops a wedged one.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

# Pinned: the checks and their strictness belong to this version.
SCHEMATHESIS_VERSION=4.32.5
EXAMPLES=${SCHEMATHESIS_EXAMPLES:-100}
CHECKS=not_a_server_error,response_schema_conformance

out=target/ci-artifacts/schemathesis
rm -rf "$out"
mkdir -p "$out/report"

# schemathesis in a virtualenv of its own under target/, like kosoku
# (scripts/lib.sh).
pip_tool schemathesis "$SCHEMATHESIS_VERSION" "the API schema checks"

bin=$(workspace_exe bin switchboard)
[ -x "$bin" ] || { echo "FAILED: no switchboard binary" >&2; exit 1; }

# A key of this run only; schemathesis hides it in what it prints.
key=$(python3 -c 'import secrets; print(secrets.token_hex(16))')

server_pid="" runner_pid="" client_pid=""
stop_all() {
  if [ -n "$runner_pid" ]; then kill -TERM "$runner_pid" 2>/dev/null || true; fi
  if [ -n "$client_pid" ]; then kill -TERM "$client_pid" 2>/dev/null || true; fi
  stop_process "$server_pid" TERM
  wait 2>/dev/null
  server_pid="" runner_pid="" client_pid=""
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Port 0: the system picks free ports, and the node prints the API's.
SWITCHBOARD_API_KEY=$key "$bin" serve --ws 127.0.0.1:0 --tcp 127.0.0.1:0 \
  --api 127.0.0.1:0 >"$out/server.log" 2>&1 &
server_pid=$!
api=""
for _ in $(seq 100); do
  api=$(sed -n 's|^ *api  *\(http://.*\)/api/$|\1|p' "$out/server.log")
  [ -n "$api" ] && break
  kill -0 "$server_pid" 2>/dev/null || break
  sleep 0.1
done
if [ -n "$api" ]; then
  python3 - "$api/api/openapi.json" "$out/openapi.json" <<'EOF' || true
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
    open(sys.argv[2], "wb").write(r.read())
EOF
fi
if [ ! -s "$out/openapi.json" ]; then
  echo "FAILED: the node served no $api/api/openapi.json:" >&2
  cat "$out/server.log" >&2
  exit 1
fi

# A client that stays connected as alice in the group alice (the schema's
# example name), so that the answers the examples ask for carry a real
# connection id to check against the schema; it connects again whenever a
# generated close ends it. A raw WebSocket handshake: no package needed.
ws=$(sed -n 's|^ *websocket  *ws://\([^/]*\)/.*|\1|p' "$out/server.log")
python3 - "$ws" >"$out/client.log" 2>&1 <<'EOF' &
import base64, os, socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
while True:
    try:
        s = socket.create_connection((host, int(port)), timeout=5)
        key = base64.b64encode(os.urandom(16)).decode()
        s.sendall((f"GET /ws?uid=alice&group=alice HTTP/1.1\r\nHost: {sys.argv[1]}\r\n"
                   "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                   f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        s.settimeout(None)
        while s.recv(65536):  # frames are read and dropped; "" is the close
            pass
    except OSError as e:
        print(f"client: {e}", flush=True)
    time.sleep(0.05)
EOF
client_pid=$!

echo "running schemathesis $SCHEMATHESIS_VERSION ($CHECKS, $EXAMPLES examples per operation) against $api"
start=$(date +%s)
# From the output directory: schemathesis keeps its crash cache (what
# `st replay` reads) in .schemathesis/ of where it runs.
venv_abs=$(cd "$venv" && pwd)
(cd "$out" && exec timeout 300 "$venv_abs/bin/schemathesis" run "$api/api/openapi.json" \
  --header "Authorization: apikey $key" \
  --checks "$CHECKS" \
  --max-examples "$EXAMPLES" \
  --workers 2 \
  --generation-database none \
  --no-color \
  --report junit --report-junit-path report/junit.xml \
  >schemathesis.log 2>&1) &
runner_pid=$!
rc=0
wait "$runner_pid" || rc=$?
runner_pid=""
seconds=$(($(date +%s) - start))
stop_all

# The closing lines say what ran; a failure is explained above them.
verdict=$(grep -E '^=+ .* in [0-9.]+s =+$' "$out/schemathesis.log" | tail -n 1 | tr -d '=' | xargs || true)
{
  echo "schemathesis: ${verdict:-no summary} (exit $rc, $seconds s, schemathesis $SCHEMATHESIS_VERSION)"
  if [ "$rc" != 0 ]; then
    sed -n '/FAILURES/,$p' "$out/schemathesis.log"
  fi
} >"$out/summary.txt"
head -n 1 "$out/summary.txt"
echo "summary and report in $out/"
if [ "$rc" != 0 ]; then
  [ "$rc" = 124 ] && echo "FAILED: schemathesis did not end within 300 s" >&2
  echo "schemathesis's output ($out/schemathesis.log):" >&2
  tail -n 60 "$out/schemathesis.log" >&2
  exit 1
fi
