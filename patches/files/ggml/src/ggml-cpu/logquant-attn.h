// CPU kernels of LogQuant's two-tier KV cache (SPEC.md section 4): attention over a
// quantized store plus an f16 overlay of the tokens kept at full precision, in one
// softmax, and the write of new tokens into the overlay.
//
// Both run as ggml custom ops (ggml_custom_4d); llama.cpp's side builds them in
// src/logquant-overlay.cpp. The slot maps are read at compute time through
// `struct logquant_attn_state`, which the overlay updates before every micro-batch.
#pragma once

#include "ggml.h"

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Which overlay slot holds which cell, per KV stream. Owned by the overlay
// (llama.cpp side); the kernels only read it.
struct logquant_attn_state {
    int32_t n_slots;              // overlay slots per stream
    int32_t n_cells;              // cells per stream (the KV cache's size)
    const int32_t * slot_to_cell; // [n_stream][n_slots]: the cell a slot holds, or -1
    const int32_t * cell_to_slot; // [n_stream][n_cells]: the slot a cell has, or -1
    int32_t s0;                   // first stream of the current micro-batch
    int32_t n_tokens;             // tokens of the current micro-batch
    const int32_t * token_row;    // [n_tokens]: overlay row ((stream - s0)*n_slots + slot) or -1
    // Keys by channel (ggml-lq2.h): [n_stream][n_cells/64], nonzero where the K store's
    // cells 64g .. 64g + 63 hold their keys by channel; NULL when none do.
    const uint8_t * k_by_channel;
};

// Per layer: where to find the state, and the attention parameters
// (those of ggml_flash_attn_ext).
struct logquant_attn_layer {
    const struct logquant_attn_state * state;
    float scale;
    float max_bias;
    float logit_softcap;
};

// Custom op: dst = attention, laid out as ggml_flash_attn_ext's result
// [DV, n_head, n_tokens, n_stream]. Sources, in order:
//   0 q      [DK, n_tokens, n_head, n_stream] f32 (permuted view, as for flash attention)
//   1 k      [DK, n_kv, n_head_kv, n_stream]  store (any type with a CPU vec_dot)
//   2 v      [DV, n_kv, n_head_kv, n_stream]  store (any type with to_float)
//   3 mask   [n_kv, n_tokens, 1, n_stream]    f16
//   4 k_ov   [n_embd_k_gqa, n_slots*n_stream] f16 overlay rows of these streams
//   5 v_ov   [n_embd_v_gqa, n_slots*n_stream] f16 overlay rows of these streams
//   6 s2c    [n_slots, n_stream] i32: the cell each slot holds, or -1 (a graph input:
//            the CUDA kernels read it; the CPU reads state->slot_to_cell, the same map)
//   7 kbc    [n_cells/64, n_stream] i32, only with keys by channel: nonzero where a
//            group of 64 cells holds its keys by channel (CUDA; the CPU reads
//            state->k_by_channel)
// Store cells that have an overlay slot are skipped; K of cells in a group held by
// channel (state->k_by_channel) is read as such, dequantized, against the f32 query; overlay slots take the mask
// of the cell they hold. Each tier repeats the arithmetic of ggml's CPU flash
// attention's per-row variant for its type (store: its vec_dot and to_float, f32
// accumulator; overlay: f16 query and accumulator), and the tiers are merged by
// log-sum-exp. So with no slot in use the result equals flash attention over the
// store, and with every cell in the overlay flash attention over an f16 cache, bit
// for bit, where ggml runs that per-row variant (below 64 queries per micro-batch
// and, for one query, below 512 cells).
void logquant_attn_compute(struct ggml_tensor * dst, int ith, int nth, void * userdata);

// Custom op, in place on the overlay's K rows (ggml_custom_inplace: dst is a view of
// source 0, so the scheduler keeps it on the overlay's backend): writes the
// micro-batch's K and V (f32 or f16, as stored into the cache) into the overlay rows
// state->token_row names. Sources: 0 k_ov (rows of the micro-batch's streams), 1 k_cur
// [DK, n_head_kv, n_tokens], 2 v_cur [DV, n_head_kv, n_tokens], 3 v_ov, 4 token_row
// [n_tokens] i32 (a graph input, the same as state->token_row). Attention takes the
// result as its k_ov source, which orders it after the write.
void logquant_overlay_write(struct ggml_tensor * dst, int ith, int nth, void * userdata);

#ifdef __cplusplus
}
#endif
