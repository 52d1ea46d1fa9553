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

static bool is_lq_type(int32_t type) {
    return type == GGML_TYPE_LQ2 || type == GGML_TYPE_LQ3;
}

size_t logquant_lq_block_bytes(int32_t type) {
    return is_lq_type(type) ? ggml_type_size(ggml_type(type)) : 0;
}

static bool lq_args_ok(int32_t type, const void * a, const void * b, int64_t n) {
    // The CPU kernels convert f16 through tables that ggml_cpu_init fills (idempotent);
    // a caller that never created a context may not have run it yet.
    ggml_cpu_init();
    return is_lq_type(type) && a != nullptr && b != nullptr && n > 0 && n % ggml_blck_size(ggml_type(type)) == 0;
}

bool logquant_lq_quantize(int32_t type, const float * x, void * blocks, int64_t n, bool reference) {
    if (!lq_args_ok(type, x, blocks, n)) {
        return false;
    }
    if (reference) {
        ggml_get_type_traits(ggml_type(type))->from_float_ref(x, blocks, n);
    } else {
        ggml_get_type_traits_cpu(ggml_type(type))->from_float(x, blocks, n);
    }
    return true;
}

bool logquant_lq_dequantize(int32_t type, const void * blocks, float * y, int64_t n) {
    if (!lq_args_ok(type, blocks, y, n)) {
        return false;
    }
    ggml_get_type_traits(ggml_type(type))->to_float(blocks, y, n);
    return true;
}

bool logquant_lq_dot(int32_t type, const void * blocks, const float * y, int64_t n, float * out) {
    if (!lq_args_ok(type, blocks, y, n) || out == nullptr || n > INT32_MAX) {
        return false;
    }
    ggml_get_type_traits_cpu(ggml_type(type))->vec_dot((int) n, out, 0, blocks, 0, y, 0, 1);
    return true;
}
