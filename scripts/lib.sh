# Helpers of the scripts that run a PyPI tool against a workspace binary
# (autobahn.sh, schemathesis.sh). Sourced, not run.

# pip_tool PACKAGE VERSION WHAT: PACKAGE==VERSION in a virtualenv of its own
# under target/ (nothing goes into the system's or the user's Python, and the
# pinned version is the one run), installed unless it is there already. Sets
# $venv. When the install fails, the script ends here: with CI=true as a
# failure, otherwise as a skip of WHAT, said on stderr.
pip_tool() {
  local package=$1 version=$2 what=$3
  venv=target/$package-$version
  if [ -x "$venv/bin/$package" ]; then
    return 0
  fi
  echo "installing $package $version into $venv"
  rm -rf "$venv"
  if python3 -m venv "$venv" &&
     "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
       "$package==$version"; then
    return 0
  fi
  rm -rf "$venv"
  if [ "${CI:-}" = true ]; then
    echo "FAILED: could not install $package $version (needs python3 with venv and pip)" >&2
    exit 1
  fi
  echo "SKIPPING $what: could not install $package $version" \
       "(with CI=true this fails instead)" >&2
  exit 0
}

# workspace_exe KIND NAME: builds the workspace's KIND (bin, example) NAME in
# debug and prints its path. --workspace: the features the test suite's build
# resolved, so that build's binary is reused (about a second after the suite);
# `-p CRATE` alone would rebuild dependencies with other features.
workspace_exe() {
  local kind=$1 name=$2
  cargo build --workspace "--$kind" "$name" --locked \
      --message-format=json-render-diagnostics |
    python3 -c '
import json, sys
exe = ""
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == sys.argv[1]:
        exe = m.get("executable") or exe
print(exe)' "$name"
}

# stop_process PID SIGNAL: sends SIGNAL (the process's graceful stop) and
# waits up to 5 s for it to exit, then kills it. Nothing when PID is empty or
# already gone.
stop_process() {
  local pid=$1 signal=$2
  [ -n "$pid" ] && kill "-$signal" "$pid" 2>/dev/null || return 0
  for _ in $(seq 50); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
}
