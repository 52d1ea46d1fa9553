// logquant-sampling.h — greedy sampling of many rows in llama.cpp's graph as one op.
//
// llama.cpp's backend sampling builds each sampler's subgraph per output row: with a
// greedy sampler per sequence, a decode step of 128 sequences runs 128 one-row argmax
// kernels (each one block scanning the whole vocabulary), which cost the GPU about as
// much as copying every row's logits to the host. When every sampler is greedy, one
// argmax over the logits matrix gives each row's token in a single kernel.
#pragma once

#include "llama.h"

#include <cstdint>
#include <map>
#include <vector>

struct ggml_context;
struct ggml_cgraph;
struct ggml_tensor;

// True if every sampler is greedy: llama.cpp's greedy sampler, or a chain holding only
// that one. An empty map is not.
bool logquant_samplers_all_greedy(const std::map<llama_seq_id, llama_sampler *> & samplers);

// Builds one argmax over `logits` ([n_vocab, n_rows]) and sets sampled[row], for every
// row of rows_by_seq whose sequence has a sampler, to a graph node holding that row's
// token (one i32). The caller has checked logquant_samplers_all_greedy.
void logquant_build_greedy_rows(
        ggml_context * ctx,
        ggml_cgraph * gf,
        ggml_tensor * logits,
        const std::map<llama_seq_id, llama_sampler *> & samplers,
        const std::map<llama_seq_id, std::vector<uint32_t>> & rows_by_seq,
        std::vector<ggml_tensor *> & sampled);
