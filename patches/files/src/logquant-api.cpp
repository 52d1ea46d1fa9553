// Implementation of include/logquant.h that needs no upstream changes.
#include "logquant.h"

#include "llama-ext.h"

#include "ggml-backend.h"

const char * logquant_patch_version(void) {
    return "0.1.0";
}

bool logquant_memory_breakdown(const struct llama_context * ctx, struct logquant_memory * out) {
    if (ctx == nullptr || out == nullptr) {
        return false;
    }
    logquant_memory mem = {};
    for (const auto & [buft, data] : llama_get_memory_breakdown(ctx)) {
        const bool host = buft == nullptr || ggml_backend_buft_is_host(buft);
        (host ? mem.model_host : mem.model_device) += data.model;
        (host ? mem.context_host : mem.context_device) += data.context;
        (host ? mem.compute_host : mem.compute_device) += data.compute;
    }
    *out = mem;
    return true;
}
