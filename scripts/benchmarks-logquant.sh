#!/usr/bin/env bash
# Reproduces the LogQuant figures of BENCHMARKS.md (issue 4).
#
#   scripts/benchmarks-logquant.sh eval   both texts of ../shared/eval, N = 4096 and 8192,
#                                         step 16, D = 128 and 384: f16, q8_0, q4_0,
#                                         logquant, kivi, streaming, q2 in one run each
#   scripts/benchmarks-logquant.sh bench  bench at depths 4096 and 16384, batch 1 and 4,
#                                         logquant against f16, q8_0, q4_0; plan in 4 GiB
#
# Environment: BIN (default: build target/release/logquant), MODEL_NAME (gemma3-270m, the
# default, or qwen2.5-coder-0.5b: what scripts/fetch-model.py --model fetches), MODEL (a
# GGUF path instead), TEXTS (default ../shared/eval), OUT (default docs/results/cpu, and
# docs/results/cpu/MODEL_NAME for eval when MODEL_NAME is given), NS (default 4096 8192),
# KV (the configurations), THREADS (default:
# logquant's), PARALLEL=1 runs the two texts of one N at the same time (for a machine
# with many cores; give THREADS for each). Eval figures do not depend on the machine;
# bench and plan figures do (they name it).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${BIN:-}" ]; then cargo build --release; BIN=./target/release/logquant; fi
MODEL=${MODEL:-$(python3 scripts/fetch-model.py ${MODEL_NAME:+--model "$MODEL_NAME"})}
TEXTS=${TEXTS:-../shared/eval}
OUT=${OUT:-docs/results/cpu${MODEL_NAME:+/$MODEL_NAME}}
T=${THREADS:+-t $THREADS}
mkdir -p "$OUT"
KV=${KV:-f16,q8_0,q4_0,logquant:D=128,kivi:D=128,streaming:D=128,logquant:D=384,kivi:D=384,streaming:D=384,q2}
case "${1:-}" in
eval)
  for n in ${NS:-4096 8192}; do
    for text in ${TEXTS_LIST:-prose code}; do
      run() { "$BIN" eval -m "$MODEL" -f "$TEXTS/$text-dev.txt" --kv "$KV" --tokens "$n" --step 16 $T \
                --json "$OUT/eval-lq-$text-$n.json" > "$OUT/eval-lq-$text-$n.txt" 2> "$OUT/eval-lq-$text-$n.log"; }
      if [ "${PARALLEL:-0}" = 1 ]; then run & else run; fi
    done
    wait
    cat "$OUT"/eval-lq-*-"$n".txt
  done
  ;;
bench)
  "$BIN" bench -m "$MODEL" --kv f16,q8_0,q4_0,logquant --depth 4096,16384 --batch 1,4 --gen 32 --reps 3 $T \
    --json "$OUT/bench-lq.json" | tee "$OUT/bench-lq.txt"
  "$BIN" plan -m "$MODEL" --memory 4GiB --ctx 32768 --kv f16,q8_0,q4_0,q2,logquant:D=128,logquant \
    --json "$OUT/plan-lq.json" | tee "$OUT/plan-lq.txt"
  ;;
*) sed -n '2,14p' "$0"; exit 2 ;;
esac
