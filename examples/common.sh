# Shared by the example scripts (sourced, not run): a work directory, cleanup of every
# process started on exit (also on failure or Ctrl-C), and `start`, which runs a process and
# waits for its "listening on ADDR" line.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/treaty-demo.XXXXXX")
PIDS=()
# Commands run first at exit (e.g. stopping a database server), in order.
ON_EXIT=()
cleanup() {
  local code=$?
  trap - EXIT INT TERM
  for c in "${ON_EXIT[@]}"; do eval "$c" || true; done
  # SIGTERM first (graceful shutdown), SIGKILL for anything still there after 5 s.
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  # `jobs -rp`: children still running (an exited, unreaped child still passes `kill -0`).
  for _ in $(seq 1 50); do
    [ -z "$(jobs -rp)" ] && break
    sleep 0.1
  done
  for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
  exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start NAME CMD...: runs CMD in the background (its pid joins PIDS, in this shell, so the
# trap sees it) and waits up to 20 s for its "listening on ADDR" line; sets ADDR.
start() {
  local name=$1
  shift
  local out="$WORK/$name.out" err="$WORK/$name.err"
  # Created here, not by the child's redirection, so the first poll cannot miss them.
  : >"$out"
  : >"$err"
  "$@" >"$out" 2>"$err" </dev/null &
  local pid=$!
  PIDS+=("$pid")
  ADDR=""
  for _ in $(seq 1 400); do
    ADDR=$(sed -n 's/.*listening on //p' "$out" | head -n 1) || true
    [ -n "$ADDR" ] && return 0
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "demo: $name exited before it was ready:" >&2
      cat "$err" >&2
      exit 1
    fi
    sleep 0.05
  done
  echo "demo: $name did not print its address within 20 s:" >&2
  cat "$err" >&2
  exit 1
}

