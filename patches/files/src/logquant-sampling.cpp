// Greedy sampling of many rows as one argmax; see logquant-sampling.h.
#include "logquant-sampling.h"

#include "ggml.h"

#include <cstring>

static bool logquant_is_greedy(llama_sampler * s) {
    const char * name = llama_sampler_name(s);
    // once placed on a backend, llama.cpp names it "+greedy" (its ops run there) or
    // "-greedy" (they do not: left to upstream's path)
    if (name != nullptr && (std::strcmp(name, "greedy") == 0 || std::strcmp(name, "+greedy") == 0)) {
        return true;
    }
    // llama_sampler_chain_n answers only for a chain
    return name != nullptr && std::strcmp(name, "chain") == 0 && llama_sampler_chain_n(s) == 1 &&
           logquant_is_greedy(llama_sampler_chain_get(s, 0));
}

bool logquant_samplers_all_greedy(const std::map<llama_seq_id, llama_sampler *> & samplers) {
    if (samplers.empty()) {
        return false;
    }
    for (const auto & entry : samplers) {
        if (entry.second == nullptr || !logquant_is_greedy(entry.second)) {
            return false;
        }
    }
    return true;
}

void logquant_build_greedy_rows(
        ggml_context * ctx,
        ggml_cgraph * gf,
        ggml_tensor * logits,
        const std::map<llama_seq_id, llama_sampler *> & samplers,
        const std::map<llama_seq_id, std::vector<uint32_t>> & rows_by_seq,
        std::vector<ggml_tensor *> & sampled) {
    if (logits->ne[1] == 0) {
        return; // no output row in this micro-batch
    }
    ggml_tensor * tokens = ggml_argmax(ctx, logits); // [n_rows], one i32 per row
    ggml_set_name(tokens, "greedy_argmax_rows");
    ggml_build_forward_expand(gf, tokens);
    for (const auto & [seq_id, rows] : rows_by_seq) {
        if (samplers.find(seq_id) == samplers.end()) {
            continue; // no sampler: the host samples this row from its logits
        }
        for (const uint32_t row : rows) {
            ggml_tensor * token = ggml_view_1d(ctx, tokens, 1, row * tokens->nb[0]);
            ggml_format_name(token, "greedy_row_%u", row);
            ggml_build_forward_expand(gf, token);
            sampled[row] = token;
        }
    }
}
