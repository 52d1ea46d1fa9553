#!/usr/bin/env bash
# Issue 14's task cells on the GPU with the real Qwen2.5-Coder-0.5B (BENCHMARKS.md,
# "Task accuracy: passkey at 8192 tokens"). The device takes 64 MiB a call, the model is 491 MB, so it
# travels in pieces over consecutive calls to one warm machine, which keeps ignored
# paths between calls:
#   here:   split -b 50000000 -d -a 2 MODEL.gguf target/mx/q.      (and the dev texts,
#           the sha256 of the model in target/mx/qwen.sha, target/dev/both.tar.xz as for
#           scripts/gpu-dense-run.sh)
#   device: STAGE=keep   bash scripts/gpu-real-model-run.sh   # carry one piece each call
#           STAGE=tests  ...                                  # the CUDA tests
#           STAGE=passkey ...                                 # join, check, run the cells
#                                                             # (and the CUDA tests beside)
# Every cell runs as its own process (the keys are drawn per context, depth and trial,
# so splitting a grid changes no prompt); results come back as one archive.
set -uo pipefail
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
K=target/keep
mkdir -p $K target/run /tmp/res
[ -x target/run/lq ] && [ target/run/lq -nt target/dev/both.tar.xz ] || xz -d < target/dev/both.tar.xz | tar -C target/run -xf -
# every stage first keeps what this call carried in target/mx
mv target/mx/* $K/ 2>/dev/null
case "${STAGE:-keep}" in
keep)
  ls $K | tr '\n' ' '; echo; du -sh $K
  ;;
tests)
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/gpu.txt
  target/run/cuda-tests --test-threads 1 > $OUT/cuda-tests.txt 2>&1; tail -25 $OUT/cuda-tests.txt
  ;;
passkey)
  M=$K/qwen.gguf
  [ -f $M ] || cat $K/q.[0-9][0-9] > $M
  want=$(cut -d' ' -f1 $K/qwen.sha)
  have=$(sha256sum $M | cut -d' ' -f1)
  [ "$want" = "$have" ] || { echo "model sha256 $have, expected $want: a piece is missing"; ls -la $K; exit 1; }
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee /tmp/res/gpu.txt
  # the CUDA tests beside the cells (TESTS=0: not)
  [ "${TESTS:-1}" = 1 ] && (target/run/cuda-tests --test-threads 1 > /tmp/res/cuda-tests.txt 2>&1 &)
  LQ="logquant:D=186:k=lq3:keys=channel"
  # name:kv:contexts:depths, one process each
  CELLS=${CELLS:-"f16-8192-50-90:f16:8192:50,90 lq-8192-50-90:$LQ:8192:50,90 f16-16384-10:f16:16384:10
    f16-16384-50-90:f16:16384:50,90 lq-16384-10:$LQ:16384:10 lq-16384-50:$LQ:16384:50 lq-16384-90:$LQ:16384:90
    lq-4096:$LQ:4096:10,50,90 lq-8192-10:$LQ:8192:10"}
  for c in $CELLS; do
    # kv holds ':' itself: it is everything between the name and the last two fields
    name=${c%%:*}; rest=${c#*:}; depths=${rest##*:}; rest=${rest%:*}; ctx=${rest##*:}; kv=${rest%:*}
    timeout ${EACH:-540} target/run/lq eval --task passkey -m $M -f $K/prose-dev.txt --contexts $ctx \
      --depths $depths --trials ${TRIALS:-20} -t 2 --kv "$kv" --json /tmp/res/passkey-$name.json \
      > /tmp/res/passkey-$name.txt 2> /tmp/res/passkey-$name.log &
  done
  # KLD against bits: logquant and streaming at several D, both texts (SWEEP=0: not)
  if [ "${SWEEP:-1}" = 1 ]; then
    C=":k=lq3:keys=channel"
    KVS=q8_0/q4_0$(for d in 126 150 162 174 186 198 210; do printf ",logquant:D=$d$C"; done)$(for d in 96 112 120 128 136 144; do printf ",streaming:D=$d$C"; done)
    for n in 4096 8192; do for t in code prose; do
      timeout ${EACH:-540} target/run/lq eval -m $M -f $K/$t-dev.txt --tokens $n --step 16 -t 2 --kv $KVS \
        --json /tmp/res/sweep-$t-$n.json > /tmp/res/sweep-$t-$n.txt 2> /tmp/res/sweep-$t-$n.log &
    done; done
  fi
  wait
  while pgrep -f target/run/cuda-tests > /dev/null; do sleep 2; done
  tail -25 /tmp/res/cuda-tests.txt
  tar -C /tmp/res -czf $OUT/passkey.tgz .
  grep -h "correct" /tmp/res/*.log | sed 's/.*passkey: //' | sort -u
  ;;
esac
