#!/usr/bin/env bash
# WebSocket conformance: runs the Autobahn cases against the echo example
# (crates/switchboard/examples/echo.rs) through the PyPI package kosoku, and
# exits non-zero if any case fails. Sections 1-7, 9 and 10 run; 12 and 13 test
# permessage-deflate, which switchboard does not offer.
#
# The results are kept in target/ci-artifacts/autobahn/ (wiped at each run;
# target/ is never committed), for CI to keep as an artifact:
#   summary.txt  the counts line, then every case that was not plainly OK, with
#                its verdicts and what it tests
#   report/      kosoku's own report: index.json (every case's verdicts),
#                one JSON and one HTML file per case (with the wire log),
#                index.html
#   kosoku.log, echo.log  what the runner and the server printed
# A passing run shows only the counts; a case that slips from OK to non-strict,
# or one that fails, is explained only by these files, so they outlive the run.
#
# The echo example is a debug build: .ci/run runs this after the test suite,
# which has built it already (the same workspace features), so the build costs
# about a second; a release build costs minutes on two cores, and the cases
# take about as long against either (measured: 18 s debug, 16 s release).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

# Pinned: the number of cases and their verdicts belong to this version.
KOSOKU_VERSION=0.1.0
# Cases of sections 1-7, 9 and 10 in kosoku $KOSOKU_VERSION. A selection that
# runs fewer (a glob gone wrong, a runner that stopped early) fails.
EXPECTED_CASES=301
SECTIONS=(1 2 3 4 5 6 7 9 10)

out=target/ci-artifacts/autobahn
rm -rf "$out"
mkdir -p "$out"

# kosoku in a virtualenv of its own under target/ (scripts/lib.sh).
pip_tool kosoku "$KOSOKU_VERSION" "the Autobahn cases"

echo_bin=$(workspace_exe example echo)
[ -x "$echo_bin" ] || { echo "FAILED: no echo example binary" >&2; exit 1; }

# Whatever happens from here on, the server (and the runner, if it is still
# going) is stopped on the way out.
echo_pid="" kosoku_pid=""
stop_all() {
  # timeout passes the TERM on to kosoku.
  if [ -n "$kosoku_pid" ]; then kill -TERM "$kosoku_pid" 2>/dev/null || true; fi
  stop_process "$echo_pid" INT # its ctrl-c shutdown
  wait 2>/dev/null
  echo_pid="" kosoku_pid=""
}
trap stop_all EXIT
# Interrupted or terminated: exit at once (the runner waits in the background,
# so the signal is not held until it ends), through the EXIT trap.
trap 'exit 130' INT
trap 'exit 143' TERM

# Port 0: the system picks a free port, and the server prints the one it bound.
"$echo_bin" 127.0.0.1:0 2>"$out/echo.log" &
echo_pid=$!
addr=""
for _ in $(seq 100); do
  addr=$(sed -n 's|^echo on ws://\(.*\)/$|\1|p' "$out/echo.log")
  [ -n "$addr" ] && break
  kill -0 "$echo_pid" 2>/dev/null || break
  sleep 0.1
done
if [ -z "$addr" ]; then
  echo "FAILED: the echo server did not start:" >&2
  cat "$out/echo.log" >&2
  exit 1
fi

include=()
for s in "${SECTIONS[@]}"; do include+=(-i "$s.*"); done
echo "running the Autobahn cases of sections ${SECTIONS[*]} against $echo_bin on $addr"
start=$(date +%s)
# Bounded: the cases take well under a minute; a wedged run must not hold CI.
timeout 600 "$venv/bin/kosoku" "${include[@]}" -o "$out/report" "$addr" \
  >"$out/kosoku.log" 2>&1 &
kosoku_pid=$!
rc=0
wait "$kosoku_pid" || rc=$?
kosoku_pid=""
seconds=$(($(date +%s) - start))
stop_all

summary_rc=0
python3 - "$out" "$rc" "$seconds" "$EXPECTED_CASES" "$KOSOKU_VERSION" "${SECTIONS[*]}" <<'EOF' || summary_rc=$?
import json, os, re, sys

out, rc, seconds, expected, version, sections = sys.argv[1:]
rc, expected = int(rc), int(expected)
index_path = os.path.join(out, "report", "index.json")
cases = {}
if os.path.exists(index_path):
    with open(index_path) as f:
        for per_agent in json.load(f).values():
            cases.update(per_agent)

# kosoku's own rule: a case passes when both verdicts, on the messages and on the
# closing handshake, are OK, NON-STRICT or INFORMATIONAL.
PASSING = ("OK", "NON-STRICT", "INFORMATIONAL")
counts = {"OK": 0, "non-strict": 0, "informational": 0, "failed": 0}
notable = []
for cid in sorted(cases, key=lambda c: [int(p) for p in c.split(".")]):
    case = cases[cid]
    verdicts = (case["behavior"], case["behaviorClose"])
    if not all(v in PASSING for v in verdicts):
        kind = "failed"
    elif "INFORMATIONAL" in verdicts:
        kind = "informational"
    elif "NON-STRICT" in verdicts:
        kind = "non-strict"
    else:
        kind = "OK"
    counts[kind] += 1
    if kind != "OK":
        description = ""
        path = os.path.join(out, "report", case["reportfile"])
        if os.path.exists(path):
            with open(path) as f:
                description = json.load(f)["description"]
            # Its first sentence, without the report's HTML.
            description = re.sub(r"<[^>]*>", "", description.split("<br>")[0])
            description = " ".join(description.split())
        notable.append(
            f"{cid:8} {kind:13} behavior={case['behavior']} close={case['behaviorClose']}"
            f" remote close code={case['remoteCloseCode']}  {description}"
        )

total = len(cases)
line = (
    f"autobahn: {counts['OK']} OK, {counts['non-strict']} non-strict, "
    f"{counts['informational']} informational, {counts['failed']} failed "
    f"({total} cases, sections {sections.replace(' ', ',')}, kosoku {version}, {seconds} s)"
)
problems = []
if counts["failed"]:
    problems.append(f"{counts['failed']} case(s) failed")
if total != expected:
    problems.append(f"{total} cases ran, {expected} expected")
if rc != 0:
    problems.append(f"kosoku exited with {rc}" + (" (timed out)" if rc == 124 else ""))

with open(os.path.join(out, "summary.txt"), "w") as f:
    f.write(line + "\n")
    for p in problems:
        f.write(f"FAILED: {p}\n")
    if notable:
        f.write("\nCases not plainly OK (details in report/, one file per case):\n")
        f.write("\n".join(notable) + "\n")

for n in notable:
    if n.split()[1] == "failed":
        print(n)
print(line)
for p in problems:
    print(f"FAILED: {p}", file=sys.stderr)
sys.exit(1 if problems else 0)
EOF

echo "summary and report in $out/"
if [ "$summary_rc" != 0 ]; then
  echo "kosoku's output ($out/kosoku.log):" >&2
  tail -n 20 "$out/kosoku.log" >&2
  exit 1
fi
