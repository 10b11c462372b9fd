#!/usr/bin/env bash
# Three coordinators on one PostgreSQL log: a transfer is begun on the first, which is killed
# (SIGKILL) while the transfer waits for bob's service; another coordinator takes it over
# after the first one's lease and finishes it, and the money moves exactly once.
#
#   bash examples/three-coordinators.sh                  # a private PostgreSQL server
#   TREATY_PG_URL=postgres://me@127.0.0.1:5432/treaty bash examples/three-coordinators.sh
#
# Without TREATY_PG_URL it runs initdb and postgres (PostgreSQL 15's server binaries: on
# PATH, in /usr/lib/postgresql/*/bin, or in $TREATY_PG_BIN) in a temporary directory, as the
# `postgres` user when run as root. Everything is on 127.0.0.1 and stopped on exit.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

echo "== building (the first build takes a few minutes)"
cargo build -q -p treaty-coordinator -p treaty-examples -p treaty-cli
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug"
# shellcheck source=examples/common.sh
source "$ROOT/examples/common.sh"

LEASE_MS=${LEASE_MS:-2000}

# A private PostgreSQL server unless one is given.
if [ -z "${TREATY_PG_URL:-}" ]; then
  PGBIN=${TREATY_PG_BIN:-}
  if [ -z "$PGBIN" ]; then
    if command -v initdb >/dev/null; then
      PGBIN=$(dirname "$(command -v initdb)")
    else
      PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    fi
  fi
  if [ ! -x "$PGBIN/initdb" ]; then
    echo "three-coordinators: no PostgreSQL server binaries (initdb, pg_ctl); install them" \
      "(Debian: apt-get install postgresql) or set TREATY_PG_URL or TREATY_PG_BIN" >&2
    exit 1
  fi
  AS=()
  if [ "$(id -u)" -eq 0 ]; then
    # PostgreSQL refuses to run as root.
    AS=(runuser -u postgres --)
    chmod 755 "$WORK"
    mkdir -p "$WORK/pg"
    chown postgres "$WORK/pg"
  fi
  PGPORT=15432
  while (exec 3<>"/dev/tcp/127.0.0.1/$PGPORT") 2>/dev/null; do PGPORT=$((PGPORT + 1)); done
  "${AS[@]}" "$PGBIN/initdb" -D "$WORK/pg/data" -U treaty -A trust >"$WORK/initdb.log" 2>&1
  ON_EXIT+=("${AS[*]} '$PGBIN/pg_ctl' -D '$WORK/pg/data' -m immediate stop >/dev/null 2>&1")
  "${AS[@]}" "$PGBIN/pg_ctl" -D "$WORK/pg/data" -l "$WORK/pg/server.log" -w start \
    -o "-p $PGPORT -k $WORK/pg -c listen_addresses=127.0.0.1" >/dev/null
  TREATY_PG_URL="postgres://treaty@127.0.0.1:$PGPORT/postgres"
fi
echo "== the log: $TREATY_PG_URL"

COORDS=()
for i in 1 2 3; do
  start "treatyd-$i" "$BIN/treatyd" --listen 127.0.0.1:0 --store "$TREATY_PG_URL" \
    --lease-ms "$LEASE_MS" --log-level warn
  COORDS+=("http://$ADDR")
  eval "TREATYD_${i}_PID=${PIDS[-1]}"
done
echo "== three coordinators on it: ${COORDS[*]}"
C1=${COORDS[0]}
C2=${COORDS[1]}

start bank-a "$BIN/bank-account" --listen 127.0.0.1:0 --data-dir "$WORK/bank-a" \
  --coordinator "$C2" --accounts alice=100
A="http://$ADDR"
start bank-b "$BIN/bank-account" --listen 127.0.0.1:0 --data-dir "$WORK/bank-b" \
  --coordinator "$C2" --accounts bob=50
B="http://$ADDR"
BOB_LISTEN=${B#http://}
BOB_PID=${PIDS[-1]}
"$BIN/bank" balances "$A" "$B"

echo
echo "== bob's service goes down; a saga transfer of 10 is begun on coordinator 1 ($C1)"
kill -KILL "$BOB_PID"
wait "$BOB_PID" 2>/dev/null || true
code=0
OUT=$("$BIN/bank" transfer --coordinator "$C1" --from "$A/alice" --to "$B/bob" --amount 10 \
  --mode saga --wait-ms 1000 </dev/null) || code=$?
echo "$OUT"
if [ "$code" -ne 4 ]; then
  echo "three-coordinators: expected the transfer to be PENDING (exit status 4), got $code" >&2
  exit 1
fi
GID=${OUT%% *}
"$BIN/treaty" --coordinator "$C2" show "$GID"

echo
echo "== coordinator 1 is killed (SIGKILL) in the middle of it; bob's service comes back"
kill -KILL "$TREATYD_1_PID"
wait "$TREATYD_1_PID" 2>/dev/null || true
start bank-b "$BIN/bank-account" --listen "$BOB_LISTEN" --data-dir "$WORK/bank-b" \
  --coordinator "$C2" --accounts bob=50
T0=$(date +%s.%N)
echo "== following it on coordinator 2 ($C2): another coordinator takes it over after the"
echo "   dead one's lease ($LEASE_MS ms) and finishes it"
timeout 60 "$BIN/treaty" --coordinator "$C2" watch "$GID"
T1=$(date +%s.%N)
"$BIN/treaty" --coordinator "$C2" show "$GID"
BALANCES=$("$BIN/bank" balances "$A" "$B")
echo "$BALANCES"
if ! grep -q "alice .*balance *90 " <<<"$BALANCES" || ! grep -q "bob .*balance *60 " <<<"$BALANCES"; then
  echo "three-coordinators: expected alice 90 and bob 60 after the transfer" >&2
  exit 1
fi
awk -v a="$T0" -v b="$T1" 'BEGIN { printf "== finished %.1f s after the kill; moved once, the total stayed 150\n", b - a }'
