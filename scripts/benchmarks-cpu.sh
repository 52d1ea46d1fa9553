#!/usr/bin/env bash
# Reproduces the CPU figures of BENCHMARKS.md (issue 3): eval on both texts of
# ../shared/eval, N=4096, S=16, llama.cpp's own cache types; q4_0 again with the
# Hadamard rotation off; bench at depths 4096 and 16384, batch 1 and 4; plan in 4 GiB.
# q2 (every token in the 2-bit lq2 format) runs beside llama.cpp's types.
# Writes docs/results/cpu/*.json and *.txt. Run on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release
M=$(python3 scripts/fetch-model.py)
out=docs/results/cpu
mkdir -p "$out"
what=${1:-all}
if [ "$what" = all ] || [ "$what" = eval ]; then
  for text in prose code; do
    ./target/release/logquant eval -m "$M" -f "../shared/eval/$text-dev.txt" --kv f16,q8_0,q5_1,q4_1,q4_0,iq4_nl,q2 \
      --tokens 4096 --step 16 --json "$out/eval-$text.json" | tee "$out/eval-$text.txt"
    LLAMA_ATTN_ROT_DISABLE=1 ./target/release/logquant eval -m "$M" -f "../shared/eval/$text-dev.txt" --kv q4_0 \
      --tokens 4096 --step 16 --json "$out/eval-$text-norot.json" | tee "$out/eval-$text-norot.txt"
  done
fi
if [ "$what" = all ] || [ "$what" = bench ]; then
  ./target/release/logquant bench -m "$M" --kv f16,q8_0,q4_0,q2 --depth 4096,16384 --batch 1,4 --gen 32 --reps 3 \
    --json "$out/bench-cpu.json" | tee "$out/bench-cpu.txt"
  ./target/release/logquant plan -m "$M" --memory 4GiB --ctx 32768 --kv f16,q8_0,q4_0,q2 \
    --json "$out/plan-cpu.json" | tee "$out/plan-cpu.txt"
fi
