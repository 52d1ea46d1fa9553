// CUDA kernels of LogQuant's two-tier KV cache (SPEC.md section 4): the ggml custom
// ops that src/logquant-overlay.cpp builds (ggml-cpu/logquant-attn.h documents their
// sources), run on the GPU when the cache lives there.
//
// Hooks in ggml-cuda.cu (patches/series/0004-*): supports_op and compute_forward ask
// these two functions about every GGML_OP_CUSTOM node.
#pragma once

#include "common.cuh"

// True when `op` is one of LogQuant's custom ops in a form these kernels run: the
// attention (lq2 store, head size 64, 128 or 256, K and V of one size) or the overlay
// write. Any other custom op: false (the scheduler keeps it on the CPU).
bool logquant_cuda_supports_op(const ggml_tensor * op);

// Runs `dst` (an op logquant_cuda_supports_op accepted). False for any other op.
bool logquant_cuda_compute_forward(ggml_backend_cuda_context & ctx, ggml_tensor * dst);
