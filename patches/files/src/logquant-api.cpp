// Implementation of include/logquant.h that needs no upstream changes.
#include "logquant.h"

#include "llama-ext.h"

#include "ggml-backend.h"
#include "ggml-cpu.h"

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
    // The overlay's buffers are the cache's too, outside llama.cpp's own accounting.
    logquant_overlay_stats ov = {};
    if (logquant_overlay_get_stats(ctx, &ov)) {
        mem.context_host   += ov.bytes_host;
        mem.context_device += ov.bytes_device;
    }
    *out = mem;
    return true;
}

size_t logquant_lq2_block_bytes(void) {
    return ggml_type_size(GGML_TYPE_LQ2);
}

int logquant_lq2_block_values(void) {
    return (int) ggml_blck_size(GGML_TYPE_LQ2);
}

static bool lq2_args_ok(const void * a, const void * b, int64_t n) {
    // The CPU kernels convert f16 through tables that ggml_cpu_init fills (idempotent);
    // a caller that never created a context may not have run it yet.
    ggml_cpu_init();
    return a != nullptr && b != nullptr && n > 0 && n % ggml_blck_size(GGML_TYPE_LQ2) == 0;
}

bool logquant_lq2_quantize(const float * x, void * blocks, int64_t n, bool reference) {
    if (!lq2_args_ok(x, blocks, n)) {
        return false;
    }
    if (reference) {
        ggml_get_type_traits(GGML_TYPE_LQ2)->from_float_ref(x, blocks, n);
    } else {
        ggml_get_type_traits_cpu(GGML_TYPE_LQ2)->from_float(x, blocks, n);
    }
    return true;
}

bool logquant_lq2_dequantize(const void * blocks, float * y, int64_t n) {
    if (!lq2_args_ok(blocks, y, n)) {
        return false;
    }
    ggml_get_type_traits(GGML_TYPE_LQ2)->to_float(blocks, y, n);
    return true;
}

bool logquant_lq2_dot(const void * blocks, const float * y, int64_t n, float * out) {
    if (!lq2_args_ok(blocks, y, n) || out == nullptr || n > INT32_MAX) {
        return false;
    }
    ggml_get_type_traits_cpu(GGML_TYPE_LQ2)->vec_dot((int) n, out, 0, blocks, 0, y, 0, 1);
    return true;
}
