#!/usr/bin/env bash
# Installs a CUDA 13.0 toolkit for `cargo build --features cuda` from NVIDIA's wheels on
# PyPI (nvcc, the runtime, cuBLAS, CCCL and the front end's headers), unpacked as a
# toolkit folder: bin/ include/ lib/ nvvm/. For machines without a system toolkit; the
# GPU driver is not part of it (libcuda comes with the driver where the GPU is).
#
#   scripts/cuda-toolkit.sh [DIR]     # default: .cuda in the repository
#   CUDA_PATH=$PWD/.cuda cargo build --release --features cuda
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-.cuda}"
pins=(
  "nvidia-cuda-nvcc==13.0.88"
  "nvidia-nvvm==13.0.88"
  "nvidia-cuda-crt==13.0.88"
  "nvidia-cuda-runtime==13.0.96"
  "nvidia-cublas==13.0.2.14"
  "nvidia-cuda-cccl==13.0.85"
)
if [ -x "$dest/bin/nvcc" ] && [ -f "$dest/.pins" ] && [ "$(cat "$dest/.pins")" = "${pins[*]}" ]; then
  echo "CUDA toolkit already in $dest"; exit 0
fi
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
echo "downloading ${#pins[@]} wheels (about 470 MB, most of it cuBLAS)..."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 \
  -d "$tmp/wheels" "${pins[@]}"
mkdir -p "$tmp/unpacked"
for w in "$tmp"/wheels/*.whl; do
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$w" "$tmp/unpacked"
done
rm -rf "$dest"; mkdir -p "$dest"
cp -a "$tmp"/unpacked/nvidia/cu13/. "$dest"/
chmod +x "$dest"/bin/* "$dest"/nvvm/bin/* 2>/dev/null || true
echo "${pins[*]}" > "$dest/.pins"
echo "CUDA toolkit in $dest: export CUDA_PATH=$(cd "$dest" && pwd)"
