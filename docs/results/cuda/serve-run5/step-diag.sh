#!/usr/bin/env bash
# f16's serving step at 27 sequences: 27 clients against 128, and the CPU threads
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
mkdir -p target/run /tmp/res
xz -d < target/dev/both.tar.xz | tar -C target/run -xf - lq
M=/tmp/m.gguf
target/run/lq synth --shape llama3-8b --weights q4_0 -o $M > /dev/null
for cfg in "27 16" "128 16" "128 2"; do
  set -- $cfg
  target/run/lq serve -m $M --kv f16 -c 16384 --parallel 27 -t $2 --ngl 99 --port 18080 --queue 1024 2>/tmp/res/serve-$1-$2.log &
  pid=$!
  for _ in $(seq 300); do grep -q "listening on" /tmp/res/serve-$1-$2.log && break; sleep 0.5; done
  (sleep 8; top -b -n1 -w 150 | head -16 | tail -9 > /tmp/res/top-$1-$2.txt) &
  python3 scripts/serve-load.py --url http://127.0.0.1:18080 --clients $1 --requests $1 --prompt-words 200 --max-tokens 128 --label "clients$1-t$2" 2>&1 | tail -2
  curl -s http://127.0.0.1:18080/metrics | grep -E "^logquant_(decode_steps_total|engine_llama)"
  cat /tmp/res/top-$1-$2.txt
  kill $pid; wait $pid 2>/dev/null
done
