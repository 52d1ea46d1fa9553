#!/usr/bin/env bash
# Serving benchmark (BENCHMARKS.md, "Serving"): for each cache type, start
# `logquant serve --memory BUDGET -c CTX` (the memory plan picks the sequences), run
# scripts/serve-load.py against it, stop it. Results: $OUT/serve-<kv>.json and a table.
#
#   scripts/benchmarks-serve.sh            # MODEL=... BIN=... BUDGET=1GiB CTX=8192 KVS="f16 q4_0 logquant"
#   CLIENTS=50 REQUESTS=60 WORDS=300 GEN=32 NGL=0 OUT=docs/results/cpu/serve
#   SERVE_ARGS="--ub 64" TAG=-ub64   (more flags for the server; TAG names their result files)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${BIN:-target/release/logquant}"
MODEL="${MODEL:-$(python3 scripts/fetch-model.py)}"
BUDGET="${BUDGET:-1GiB}"
CTX="${CTX:-8192}"
KVS="${KVS:-f16 q4_0 logquant}"
CLIENTS="${CLIENTS:-50}"
REQUESTS="${REQUESTS:-60}"
WORDS="${WORDS:-300}"
GEN="${GEN:-32}"
NGL="${NGL:-0}"
OUT="${OUT:-docs/results/cpu/serve}"
PORT="${PORT:-18080}"
mkdir -p "$OUT"
pid=""; load=""
# Stopped early (timeout, Ctrl-C): take the server and the load generator down too.
trap 'exit 1' TERM INT
trap 'kill -9 $pid $load 2>/dev/null || true' EXIT
for kv in $KVS; do
  name="$kv${TAG:-}"
  log="$OUT/serve-$name.log"
  rm -f "$OUT/serve-$name.json"
  "$BIN" serve -m "$MODEL" --kv "$kv" -c "$CTX" --memory "$BUDGET" --ngl "$NGL" --port "$PORT" --queue 1024 ${SERVE_ARGS:-} 2>"$log" &
  pid=$!
  for _ in $(seq 600); do grep -q "listening on" "$log" && break; kill -0 $pid 2>/dev/null || { cat "$log"; exit 1; }; sleep 0.5; done
  grep "listening on" "$log"
  python3 scripts/serve-load.py --url "http://127.0.0.1:$PORT" --clients "$CLIENTS" --requests "$REQUESTS" \
    --prompt-words "$WORDS" --max-tokens "$GEN" --label "$name" --json "$OUT/serve-$name.json" \
    > "$OUT/serve-$name.txt" 2> "$OUT/serve-$name-load.log" &
  load=$!
  status=0; wait $load || status=$?
  load=""
  [ $status -eq 0 ] || echo "serve-load for $kv: not every request completed (exit $status; $OUT/serve-$name-load.log)"
  tail -1 "$OUT/serve-$name.txt"
  kill -TERM $pid; wait $pid || true
  pid=""
done
