#!/usr/bin/env bash
# Treaty demo: treatyd plus two bank-account instances; a 2PC transfer, a saga transfer and a
# transfer that must abort, with balances and the total after each. Everything started here is
# stopped on exit, also on failure.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== building (first run takes a few minutes)"
cargo build --release -q -p treaty-coordinator --bin treatyd -p treaty-examples --bins
BIN=target/release
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# Start a server on port 0 and echo the address it prints ("... listening on ADDR").
start() {
  local name=$1; shift
  local out="$WORK/$name.out"
  "$@" >"$out" 2>"$WORK/$name.err" </dev/null &
  PIDS+=($!)
  for _ in $(seq 1 200); do
    if grep -q "listening on" "$out" 2>/dev/null; then
      sed -n 's/.*listening on //p' "$out" | head -1
      return 0
    fi
    if ! kill -0 "${PIDS[-1]}" 2>/dev/null; then
      echo "$name failed to start:" >&2; cat "$WORK/$name.err" >&2; return 1
    fi
    sleep 0.05
  done
  echo "$name did not start in 10 s" >&2; cat "$WORK/$name.err" >&2; return 1
}

COORD="http://$(start treatyd "$BIN/treatyd" --listen 127.0.0.1:0 --data-dir "$WORK/treatyd" --log-level warn)"
A="http://$(start bank-a "$BIN/bank-account" --listen 127.0.0.1:0 --data-dir "$WORK/a" --coordinator "$COORD" --accounts alice=100)"
B="http://$(start bank-b "$BIN/bank-account" --listen 127.0.0.1:0 --data-dir "$WORK/b" --coordinator "$COORD" --accounts bob=50)"
echo "== treatyd at $COORD; bank instances at $A and $B"
"$BIN/bank" balances "$A" "$B"

transfer() {
  echo "== transfer $*"
  local code=0
  "$BIN/bank" transfer --coordinator "$COORD" "$@" || code=$?
  "$BIN/bank" balances "$A" "$B"
  return $code
}

transfer --from "$A/alice" --to "$B/bob" --amount 30 --mode 2pc
transfer --from "$B/bob" --to "$A/alice" --amount 5 --mode saga
code=0
transfer --from "$A/alice" --to "$B/bob" --amount 1000 --mode 2pc || code=$?
if [ "$code" -ne 3 ]; then echo "expected the last transfer to abort (exit 3), got $code" >&2; exit 1; fi
echo "== done: the total never changed"
