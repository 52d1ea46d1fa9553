// logquant.h — the C API that the logquant patch series adds to llama.cpp.
//
// Everything declared here is implemented in new files under src/logquant-*.cpp
// (copied in from logquant's patches/files/), so upstream files carry only small hooks.
//
// Conventions: functions never abort on bad arguments; they return false (or 0 / NULL)
// and leave outputs untouched. Pointers passed in stay owned by the caller.
#pragma once

#include "llama.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Version of the logquant patch series compiled into this llama.cpp, e.g. "0.1.0".
// The returned string is static; do not free it.
LLAMA_API const char * logquant_patch_version(void);

// Bytes that llama.cpp really allocated for one context and its model, split into
// memory that the CPU can address directly ("host": system RAM, also pinned buffers)
// and memory on an accelerator ("device").
struct logquant_memory {
    size_t model_host;     // weights
    size_t model_device;
    size_t context_host;   // per-context state: the KV cache (all of its layers and streams)
    size_t context_device;
    size_t compute_host;   // scratch buffers of the graph scheduler
    size_t compute_device;
};

// Fills *out with the allocation sizes of ctx. Returns false (and leaves *out
// untouched) when ctx or out is NULL.
LLAMA_API bool logquant_memory_breakdown(const struct llama_context * ctx, struct logquant_memory * out);

//
// The 2-bit KV format (GGML_TYPE_LQ2, ggml-lq2.h): 64 values per 20-byte block.
// These entry points run exactly the functions the KV cache uses, so tests can check
// them against an independent implementation. n must be a multiple of 64; the
// functions return false (and write nothing) otherwise or on NULL pointers.
//

// Bytes of one LQ2 block and values per block.
LLAMA_API size_t logquant_lq2_block_bytes(void);
LLAMA_API int    logquant_lq2_block_values(void);

// Quantizes n floats into n/64 blocks with the CPU backend's from_float (what
// set_rows runs when a token is written). `reference` selects ggml's from_float_ref.
LLAMA_API bool logquant_lq2_quantize(const float * x, void * blocks, int64_t n, bool reference);

// Dequantizes n values (ggml's to_float for the type).
LLAMA_API bool logquant_lq2_dequantize(const void * blocks, float * y, int64_t n);

// The CPU dot product attention uses for K.q: sum_i dequant(blocks)[i] * y[i].
LLAMA_API bool logquant_lq2_dot(const void * blocks, const float * y, int64_t n, float * out);

#ifdef __cplusplus
}
#endif
