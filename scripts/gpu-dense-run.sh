#!/usr/bin/env bash
# One device call (BENCHMARKS.md, "The two-tier prefill on the GPU"): the CUDA tests,
# prefill from empty with the tiled kernel and the dense path, then serving loads, f16
# and logquant.
#   STAGE=tests|bench|chunk|serve|all  LOADS="800:64 200:512" (prompt words:generated tokens)
#   BUDGET=60GiB CTX=16384 CLIENTS=128 REQUESTS=128 EACH=170 (serve: the memory budget,
#   context per sequence, load size and each server's time limit)
#   CHUNKS="256" (serve: also logquant with each --lq-chunk)
#   VARIANTS="f16=host=--host-sampling logquant=b512=-b+512" (serve: also these runs,
#   each cache=tag=server flags with '+' for a space; the tag names the result files)
# on the device, with target/dev/both.tar.xz carried (the stripped logquant binary `lq`
# and the CUDA test binary `cuda-tests`, one xz stream: they share most of their bytes).
set -uo pipefail
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
mkdir -p target/run /tmp/res
[ -x target/run/lq ] && [ target/run/lq -nt target/dev/both.tar.xz ] || xz -d < target/dev/both.tar.xz | tar -C target/run -xf -
# results go back packed after every stage, so a run stopped at its time limit returns
# what it finished
pack() { tar -C /tmp/res -czf "$OUT/results-${STAGE:-bench}.tgz" .; }
M=/tmp/m.gguf
[ -f $M ] || target/run/lq synth --shape llama3-8b --weights q4_0 -o $M > /dev/null
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee /tmp/res/gpu.txt
case "${STAGE:-bench}" in
tests|all)
  target/run/cuda-tests --test-threads 1 2>&1 | tail -25 | tee /tmp/res/cuda-tests.txt
  pack
  ;;&
bench|all)
  # the prefill path against f16 on the same tokens: every token kept (D above the
  # tokens, no rotation) is f16's values, so its KLD is arithmetic alone; then D=384
  E="target/run/lq eval -m $M -f README.md --tokens 1024 --step 64 --ngl 99"
  for mode in dense tiled; do
    min=$([ $mode = dense ] && echo 64 || echo 0)
    LLAMA_ATTN_ROT_DISABLE=1 LOGQUANT_CUDA_DENSE_MIN=$min $E --kv logquant:D=1100 2>/dev/null | tail -1 | tee /tmp/res/eval-keepall-$mode.txt
    LOGQUANT_CUDA_DENSE_MIN=$min $E --kv logquant,q4_0 2>/dev/null | tail -2 | tee /tmp/res/eval-$mode.txt
  done
  B="target/run/lq bench -m $M --ngl 99 --depth 512 --batch 1 --gen 8 --reps 2 --prefill 512"
  $B --kv f16,logquant --json /tmp/res/prefill-dense.json 2>/dev/null | tee /tmp/res/prefill-dense.txt
  LOGQUANT_CUDA_DENSE_MIN=0 $B --kv logquant --json /tmp/res/prefill-tiled.json 2>/dev/null | tee /tmp/res/prefill-tiled.txt
  ;;&
chunk|all)
  # one 4096-token prompt from empty, then 8 sequences decoding at 4096: f16 in
  # micro-batches of 512 and of 64, logquant in chunks of 64 to 512 tokens per call
  C="target/run/lq bench -m $M --ngl 99 --depth 4096 --batch 8 --gen 16 --reps 2 --prefill 4096"
  for a in "--kv f16" "--kv f16 --ub 64" "--kv logquant --lq-chunk 64" "--kv logquant --lq-chunk 256" "--kv logquant --lq-chunk 512"; do
    echo "== $a"; $C $a 2>/dev/null | tail -1
  done | tee /tmp/res/chunk-bench.txt
  # the server's prefill shape: 32 prompts of 512 tokens fed together in calls of 2048
  # (64 of each per call for logquant, whole prompts for f16)
  target/run/lq bench -m $M --ngl 99 --kv f16,logquant --depth 512 --batch 1 --gen 8 --reps 2 --prefill 512 \
    --prefill-seqs 32 2>/dev/null | tee /tmp/res/prefill-seqs.txt
  pack
  ;;&
serve|all)
  for load in ${LOADS:-800:64 200:512}; do
    mkdir -p /tmp/res/w${load%:*}-g${load#*:}
    BIN=target/run/lq MODEL=$M WORK=/tmp OUT=/tmp/res/w${load%:*}-g${load#*:} BUDGET=${BUDGET:-60GiB} CTX=${CTX:-16384} CLIENTS=${CLIENTS:-128} \
      REQUESTS=${REQUESTS:-128} WORDS=${load%:*} GEN=${load#*:} EACH=${EACH:-170} KVS="${KVS:-f16 logquant}" scripts/benchmarks-cuda.sh serve
    for c in ${CHUNKS:-}; do
      BIN=target/run/lq MODEL=$M WORK=/tmp OUT=/tmp/res/w${load%:*}-g${load#*:} BUDGET=${BUDGET:-60GiB} CTX=${CTX:-16384} CLIENTS=${CLIENTS:-128} \
        REQUESTS=${REQUESTS:-128} WORDS=${load%:*} GEN=${load#*:} EACH=${EACH:-170} KVS=logquant SERVE_ARGS="--lq-chunk $c" TAG=-c$c \
        scripts/benchmarks-cuda.sh serve
    done
    for v in ${VARIANTS:-}; do
      kv=${v%%=*}; rest=${v#*=}
      BIN=target/run/lq MODEL=$M WORK=/tmp OUT=/tmp/res/w${load%:*}-g${load#*:} BUDGET=${BUDGET:-60GiB} CTX=${CTX:-16384} CLIENTS=${CLIENTS:-128} \
        REQUESTS=${REQUESTS:-128} WORDS=${load%:*} GEN=${load#*:} EACH=${EACH:-170} KVS="$kv" \
        SERVE_ARGS="$(echo "${rest#*=}" | tr + ' ')" TAG=-${rest%%=*} scripts/benchmarks-cuda.sh serve
    done
    for f in /tmp/res/w${load%:*}-g${load#*:}/serve/*.txt; do tail -1 "$f"; done
    grep -h "engine seconds" /tmp/res/w${load%:*}-g${load#*:}/serve/*-load.log
    pack
  done
  ;;
esac
pack
