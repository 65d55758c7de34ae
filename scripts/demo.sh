#!/usr/bin/env bash
# make demo: a node and a simulated fleet on 127.0.0.1, visibly working, then
# everything this script started is stopped (by PID) and its files removed.
set -euo pipefail
cd "$(dirname "$0")/.."

WORKERS=${WORKERS:-20}
DEVICES=${DEVICES:-5}
BIN=./bin
DIR=$(mktemp -d "${TMPDIR:-/tmp}/ork-demo.XXXXXX")
NODE_PID=""
SIM_PID=""

cleanup() {
  [ -n "$SIM_PID" ] && kill "$SIM_PID" 2>/dev/null && wait "$SIM_PID" 2>/dev/null || true
  [ -n "$NODE_PID" ] && kill "$NODE_PID" 2>/dev/null && wait "$NODE_PID" 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT INT TERM

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

echo "== ork-node init (data in $DIR/node, loopback only)"
$BIN/ork-node init --data "$DIR/node" --loopback-only \
  --listen /ip4/127.0.0.1/tcp/0,/ip4/127.0.0.1/udp/0/quic-v1

echo "== ork-node daemon"
$BIN/ork-node daemon --data "$DIR/node" >"$DIR/node.log" 2>&1 &
NODE_PID=$!
for _ in $(seq 1 100); do
  [ -f "$DIR/node/api" ] && break
  kill -0 "$NODE_PID" 2>/dev/null || { cat "$DIR/node.log"; echo "node exited" >&2; exit 1; }
  sleep 0.1
done
[ -f "$DIR/node/api" ] || { cat "$DIR/node.log"; echo "node did not start within 10 s" >&2; exit 1; }
$BIN/ork-node id --data "$DIR/node"

echo "== ork-worker-sim: $WORKERS workers x $DEVICES devices"
START=$(now)
$BIN/ork-worker-sim --workers "$WORKERS" --devices "$DEVICES" --racks 4 --join "$DIR/node" >"$DIR/sim.log" 2>&1 &
SIM_PID=$!

ready=0
for _ in $(seq 1 300); do
  ready=$($BIN/ork-node workers --data "$DIR/node" --json 2>/dev/null | grep -c '"state": "READY"' || true)
  [ "$ready" -ge "$WORKERS" ] && break
  kill -0 "$SIM_PID" 2>/dev/null || { cat "$DIR/sim.log"; echo "simulator exited" >&2; exit 1; }
  sleep 0.1
done
if [ "$ready" -lt "$WORKERS" ]; then
  echo "only $ready of $WORKERS workers READY after 30 s" >&2
  tail -20 "$DIR/node.log" >&2
  exit 1
fi
echo "all $WORKERS workers READY $(elapsed "$START") s after the fleet started"
echo
$BIN/ork-node workers --data "$DIR/node"
echo
$BIN/ork-node status --data "$DIR/node"

if $BIN/ork-node send --data "$DIR/node" --device sim-0001-d01 setPowerLimit watts=3000 --wait >"$DIR/send.out" 2>&1; then
  echo
  echo "== a command through the WAL: ork-node send --device sim-0001-d01 setPowerLimit watts=3000 --wait"
  cat "$DIR/send.out"
  echo
  echo "== a rack fan-out: ork-node send --scope rack --rack rack-02 setLed on=true --wait"
  $BIN/ork-node send --data "$DIR/node" --scope rack --rack rack-02 setLed on=true --wait || true
  echo
  echo "== telemetry: ork-node telemetry --device sim-0001-d01"
  $BIN/ork-node telemetry --data "$DIR/node" --device sim-0001-d01 || true
fi
echo
echo "== stopping (node log: $(wc -l <"$DIR/node.log") lines)"
