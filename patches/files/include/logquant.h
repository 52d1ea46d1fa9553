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

#ifdef __cplusplus
}
#endif
