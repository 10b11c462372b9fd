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

# shellcheck source=examples/common.sh
source "$ROOT/examples/common.sh"

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
