#!/usr/bin/env bash
# Treaty demo: treatyd plus two bank-account instances (alice=100 on one, bob=50 on the other);
# a 2PC transfer, a saga transfer and a transfer that must abort, with balances and the total
# after each. Everything runs on 127.0.0.1 with ports chosen by the OS and data in a temporary
# directory; every process started here is stopped on exit, also on failure or Ctrl-C.
#
#   bash examples/demo.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

echo "== building (the first build takes a few minutes)"
cargo build -q -p treaty-coordinator -p treaty-examples
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug"
for b in treatyd bank-account bank; do
  [ -x "$BIN/$b" ] || { echo "demo: $BIN/$b is missing after the build" >&2; exit 1; }
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/treaty-demo.XXXXXX")
PIDS=()
cleanup() {
  local code=$?
  trap - EXIT INT TERM
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

start treatyd "$BIN/treatyd" --listen 127.0.0.1:0 --data-dir "$WORK/treatyd" --log-level warn
COORD="http://$ADDR"
start bank-a "$BIN/bank-account" --listen 127.0.0.1:0 --data-dir "$WORK/bank-a" \
  --coordinator "$COORD" --accounts alice=100
A="http://$ADDR"
start bank-b "$BIN/bank-account" --listen 127.0.0.1:0 --data-dir "$WORK/bank-b" \
  --coordinator "$COORD" --accounts bob=50
B="http://$ADDR"

echo "== treatyd at $COORD; bank instances at $A (alice) and $B (bob)"
"$BIN/bank" balances "$A" "$B"

# transfer EXPECTED_EXIT ARGS...: one transfer, then the balances.
transfer() {
  local want=$1
  shift
  echo
  echo "== bank transfer $*"
  local code=0
  "$BIN/bank" transfer --coordinator "$COORD" "$@" </dev/null || code=$?
  "$BIN/bank" balances "$A" "$B"
  if [ "$code" -ne "$want" ]; then
    echo "demo: expected exit status $want from that transfer, got $code" >&2
    exit 1
  fi
}

transfer 0 --from "$A/alice" --to "$B/bob" --amount 30 --mode 2pc
transfer 0 --from "$B/bob" --to "$A/alice" --amount 5 --mode saga
echo "(the next transfer asks for more than alice has: it must abort, exit status 3)"
transfer 3 --from "$A/alice" --to "$B/bob" --amount 1000 --mode 2pc
echo
echo "== done: every transfer was all or nothing, and the total stayed 150"
