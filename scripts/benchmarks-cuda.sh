#!/usr/bin/env bash
# Reproduces the GPU figures of BENCHMARKS.md (issue 5) on a machine with an NVIDIA GPU.
#
#   scripts/benchmarks-cuda.sh bench  decode and prefill at depth 8192 and 32768, batch
#                                     1, 8 and 32: f16, q8_0, q4_0, logquant (one process
#                                     per cache type and depth, so that one that runs out
#                                     of memory costs only its own rows)
#   scripts/benchmarks-cuda.sh plan   largest batch at 32768 in 100 GiB, then a decode of
#                                     that batch per cache type (the check that it runs)
#   scripts/benchmarks-cuda.sh eval   the real model: eval on the GPU and on the CPU, same
#                                     text and configurations (TOKENS, default 2048)
#   scripts/benchmarks-cuda.sh serve  logquant serve under load in one memory budget (BUDGET,
#                                     default 60GiB; CTX 16384; scripts/benchmarks-serve.sh)
#   scripts/benchmarks-cuda.sh copy   the card's device-to-device copy bandwidth (PyTorch)
#
# Environment: BIN (default target/release/logquant, built with --features cuda), MODEL
# (default: a random-weight Llama-3-8B-shape GGUF with Q4_0 weights, written with
# `logquant synth` into $WORK if missing), WORK (default /tmp/logquant-cuda), OUT
# (default docs/results/cuda), EVAL_MODEL and TEXT for eval.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-./target/release/logquant}
WORK=${WORK:-/tmp/logquant-cuda}
OUT=${OUT:-docs/results/cuda}
mkdir -p "$OUT" "$WORK"
model() {
  MODEL=${MODEL:-$WORK/llama3-8b-q4_0.gguf}
  [ -f "$MODEL" ] || "$BIN" synth --shape llama3-8b --weights q4_0 -o "$MODEL"
}
case "${1:-}" in
bench)
  model
  for kv in ${KV:-f16 q8_0 q4_0 logquant}; do
    for depth in 8192 32768; do
      "$BIN" bench -m "$MODEL" --ngl 99 --kv "$kv" --depth $depth --batch 1,8,32 --gen 16 --reps 2 \
        --json "$OUT/bench-$kv-$depth.json" > "$OUT/bench-$kv-$depth.txt" 2> "$OUT/bench-$kv-$depth.log" \
        || echo "bench $kv at $depth failed: $(grep -i error "$OUT/bench-$kv-$depth.log" | tail -1)"
      grep '^|' "$OUT/bench-$kv-$depth.txt" | tail -n +3 || true
    done
  done
  ;;
plan)
  model
  "$BIN" plan -m "$MODEL" --ngl 99 --memory 100GiB --ctx 32768 --kv f16,q8_0,q4_0,logquant \
    --json "$OUT/plan.json" | tee "$OUT/plan.txt"
  # run each type's largest batch: fill to 32768 - 16, decode 16 steps
  python3 - "$OUT/plan.json" > "$WORK/plan-batches" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
for r in rows:
    print(r["config"], r["max_batch"]["value"])
PY
  while read -r kv n; do
    "$BIN" bench -m "$MODEL" --ngl 99 --kv "$kv" --depth 32752 --batch "$n" --gen 8 --reps 1 --prefill 64 \
      --json "$OUT/plan-check-${kv%%:*}.json" > "$OUT/plan-check-${kv%%:*}.txt" 2> "$OUT/plan-check-${kv%%:*}.log" \
      && cat "$OUT/plan-check-${kv%%:*}.txt" || echo "plan check $kv x $n failed: see $OUT/plan-check-${kv%%:*}.log"
  done < "$WORK/plan-batches"
  ;;
eval)
  : "${EVAL_MODEL:?give EVAL_MODEL (the real model)}" "${TEXT:?give TEXT (an eval text)}"
  KV=${KV:-f16,q8_0,q4_0,logquant:D=128,logquant,logquant:D=0}
  for where in gpu cpu; do
    ngl=$([ $where = gpu ] && echo 99 || echo 0)
    # (a CUDA build also runs the CPU side: --ngl 0 keeps every layer and cache there)
    "$BIN" eval -m "$EVAL_MODEL" -f "$TEXT" --kv "$KV" --tokens "${TOKENS:-2048}" --step 16 --ngl "$ngl" \
      --json "$OUT/eval-$where.json" > "$OUT/eval-$where.txt" 2> "$OUT/eval-$where.log"
    cat "$OUT/eval-$where.txt"
  done
  ;;
serve)
  # logquant serve under load at one memory budget (scripts/benchmarks-serve.sh), per type
  model
  for kv in ${KVS:-f16 q4_0 logquant}; do
    MODEL=$MODEL BIN=$BIN NGL=99 KVS=$kv BUDGET=${BUDGET:-60GiB} CTX=${CTX:-16384} \
      CLIENTS=${CLIENTS:-128} REQUESTS=${REQUESTS:-128} WORDS=${WORDS:-1500} GEN=${GEN:-128} \
      OUT="$OUT/serve" timeout "${EACH:-170}" scripts/benchmarks-serve.sh || echo "serve $kv: failed or timed out"
  done
  ;;
copy)
  python3 - <<'PY' | tee "$OUT/copy-bandwidth.txt"
import torch
x = torch.empty(4 << 30, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
s.record()
for _ in range(20): y.copy_(x)
e.record(); torch.cuda.synchronize()
ms = s.elapsed_time(e) / 20
print(f"{torch.cuda.get_device_name()}: device-to-device copy of 4 GiB: {ms:.3f} ms, "
      f"{2 * x.numel() / (ms * 1e-3) / 1e9:.0f} GB/s counting bytes read and written")
PY
  ;;
*) sed -n '2,20p' "$0"; exit 2 ;;
esac
