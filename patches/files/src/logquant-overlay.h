// LogQuant's precision overlay (SPEC.md section 4): f16 copies of the tokens the
// retention policy keeps, beside llama_kv_cache's 2-bit store.
//
// One overlay per llama_kv_cache (an iSWA model has two: base and SWA layers). Per
// KV stream it has `n_slots` slots; a slot holds the f16 K and V of one cell, in every
// layer. Every token gets a slot when it is written (llama_kv_cache_context::apply);
// the policy (Rust side, through include/logquant.h) demotes tokens by freeing their
// slots; no data moves. Attention reads store cells that have no slot plus all
// slots, in one softmax (ggml-cpu/logquant-attn.cpp).
//
// Hooks in upstream files (patches/series/0003-*): a member and friend declarations
// in llama-kv-cache.h, on_ubatch() in llama_kv_cache_context::apply(), copy_stream()
// in llama_kv_cache::update(), and logquant_build_attn() in llm_graph_context::build_attn.
#pragma once

#include "llama-graph.h"
#include "llama-kv-cache.h"
#include "logquant-attn.h"

#include "ggml-backend.h"

#include <cstdint>
#include <stdexcept>
#include <map>
#include <vector>

struct llama_hparams;

struct logquant_overlay {
    // Allocates n_slots per stream for every layer of kv (in the same buffer types as
    // the store), and the centering offsets when `flags` asks for centering
    // (LOGQUANT_CENTER_*). Throws std::runtime_error when kv cannot take an overlay or
    // memory runs out. lctx: the context that owns kv (synchronized before the overlay
    // reads or rewrites cache data on the host).
    logquant_overlay(llama_kv_cache & kv, uint32_t n_slots, uint32_t flags, llama_context * lctx);

    // Hook: the micro-batch `sinfo` was just written into the cells. Frees the slots
    // of emptied cells, then gives every written cell a slot (a full overlay leaves
    // the token at 2 bits only and counts a miss).
    void on_ubatch(const llama_kv_cache::slot_info & sinfo, const llama_ubatch & ubatch);

    // Hook: cross-stream llama_memory_seq_cp copied the cells of ssrc to sdst; the
    // slot maps follow at once (copy_maps), the f16 data when llama.cpp copies the
    // store's data, in llama_kv_cache::update (copy_stream).
    void copy_maps(uint32_t ssrc, uint32_t sdst);
    void copy_stream(uint32_t ssrc, uint32_t sdst);

    // Hook: llama.cpp re-ropes the store's K of shifted cells (seq_add, seq_div); their
    // f16 copies keep the old positions, so they are demoted.
    void drop_shifted();

    // Hook: a state restore (llama_state_*) of seq (-1: all) is about to replace its
    // cells; they are demoted, and the restored tokens are 2-bit only.
    void forget(llama_seq_id seq);

    // Hook: llama.cpp is about to re-rope (seq_add, seq_div) or save (llama_state_*)
    // the store's rows, which it reads one token at a time: groups of keys held by
    // channel go back to per-token rows first (keys by channel).
    void before_row_access();

    // Frees the slots of cells that no longer hold a token (seq_rm, clear): in every
    // stream, or in one.
    void sweep();
    void sweep(uint32_t strm);

    // Keeps in the overlay only those tokens of seq whose positions are listed
    // (sorted ascending); the others are demoted. Tokens not in the overlay stay out.
    void set_full_precision(llama_seq_id seq, const llama_pos * pos, size_t n);

    // Positions of seq held in the overlay, ascending.
    std::vector<llama_pos> full_precision(llama_seq_id seq);

    uint32_t slots_used();

    // The key of seq's token at pos in model layer il, from the store (as the kernel
    // decodes it) or from the overlay; false when there is no such token (or copy).
    bool read_key(llama_seq_id seq, int32_t il, llama_pos pos, bool from_store, std::vector<float> & out);

    // Centering (include/logquant.h, LOGQUANT_CENTER_K/V): replaces the micro-batch's
    // k_cur / v_cur [D, n_head_kv, n_tokens] by themselves minus their stream's
    // offsets, before they are stored in either tier. No-op without centering.
    // k: the store's K view of the micro-batch's streams (get_k), for their numbers.
    void center(ggml_context * ctx, llm_graph_result * res, ggml_tensor * k, ggml_tensor *& k_cur,
                ggml_tensor *& v_cur, int il);

    // The attention of layer il over both tiers; see logquant_build_attn.
    ggml_tensor * build_attn(ggml_context * ctx, llm_graph_result * res, ggml_tensor * q, ggml_tensor * k_cur,
                             ggml_tensor * v_cur, ggml_tensor * k, ggml_tensor * v, ggml_tensor * kq_mask,
                             float kq_scale, const llama_hparams & hparams, int il);

    // The micro-batch's slot maps as graph inputs (what a GPU kernel reads; the CPU
    // kernels read `state`): the slot-to-cell map of its streams [n_slots, n_stream]
    // and each token's overlay row, relative to its first stream.
    void fill_slot_input(ggml_tensor * s2c, uint32_t s0) const;
    void fill_row_input(ggml_tensor * rows) const;

    llama_kv_cache & kv;
    const uint32_t n_slots;
    const uint32_t n_cells;
    const uint32_t n_stream;

    uint64_t misses = 0; // tokens written while every slot was taken
    size_t   bytes  = 0; // allocated for the overlay

    std::vector<ggml_backend_buffer_ptr> bufs;

    const bool center_k;
    const bool center_v;
    // Keys by channel (LOGQUANT_KEYS_BY_CHANNEL): groups of QK_LQ2 cells whose f16 keys
    // are all in the overlay are rewritten by channel in the store (ggml-lq2.h) before
    // any of them is demoted.
    const bool keys_by_channel;

  private:
    void free_slot(uint32_t strm, int32_t slot);

    // Waits for the context's computations: llama_decode returns with its graph still
    // running on a GPU, which may be writing the data about to be read or rewritten.
    void sync();
    llama_context * lctx;

    // Takes stream strm's offsets from the tokens it holds (those of seq), then
    // rewrites both tiers of those tokens as centered values; see set_full_precision.
    void freeze_offsets(uint32_t strm, llama_seq_id seq);
    // Back to offsets of zero (the stream was emptied and starts a new sequence).
    void reset_offsets(uint32_t strm);
    // Every slot of the stream free, in the order of a new context.
    void reset_slots(uint32_t strm);

    // Keys by channel: rewrites by channel every group of the stream written since the
    // last call whose cells all hold a token with an f16 copy (from those copies), and
    // marks it. (Only a write gives a cell a copy, so no other group can be ready.)
    void code_by_channel(uint32_t strm);
    // Rewrites the marked group g of stream strm as per-token rows again (from its
    // by-channel values) and unmarks it.
    void uncode_group(uint32_t strm, uint32_t g);
    void uncode_stream(uint32_t strm);
    // Before a micro-batch writes its cells: a marked group that still holds older
    // tokens is uncoded (set_rows writes per-token rows); one that held none is unmarked.
    void uncode_written(const llama_kv_cache::slot_info & sinfo);

    std::vector<ggml_context_ptr> ctxs;
    std::vector<ggml_tensor *> k_ov; // per KV layer: [n_embd_k_gqa, n_slots*n_stream] f16
    std::vector<ggml_tensor *> v_ov;
    // Centering: per KV layer, the offsets of every stream [n_embd_gqa, n_stream] f32
    // (empty without centering); frozen: per stream, whether they were taken yet.
    std::vector<ggml_tensor *> k_off;
    std::vector<ggml_tensor *> v_off;
    std::vector<uint8_t> frozen;
    // Keys by channel: [n_stream][n_cells/QK_LQ2], 1 where the group is held by channel
    // (the kernels read it through state.k_by_channel); empty when off.
    std::vector<uint8_t> k_by_channel;
    uint32_t n_groups = 0; // groups per stream
    std::vector<std::vector<uint32_t>> written_groups; // per stream: groups written since code_by_channel
    // Keys by channel with a policy that demotes a token before its group of 64 is
    // complete (LogQuant with W < 64 keeps only its newest W..2W): the demoted keys'
    // f16 rows (every layer's, concatenated; offsets k_row_offs) wait on the host until
    // the group can be coded from them. Attention reads the store for those cells
    // meanwhile, as the policy says. Per stream: cell -> (position, row); at most
    // LOGQUANT_PENDING_ROWS per stream (the oldest cells go first).
    struct pending_row {
        llama_pos pos;
        std::vector<ggml_fp16_t> k;
    };
    std::vector<std::map<uint32_t, pending_row>> pending;
    std::vector<size_t> k_row_offs; // [n_layers + 1]: where each layer's row starts in a pending row
    // Saves the rows of seq's overlay cells in stream strm that set_full_precision is
    // about to demote (not in pos[0..n)) whose group is not coded yet.
    void hold_demoted(uint32_t strm, llama_seq_id seq, const llama_pos * pos, size_t n);
    // Whether stream strm's cell c has a usable pending row.
    bool is_pending(uint32_t strm, uint32_t c) const;

    std::vector<int32_t> slot_to_cell; // [n_stream][n_slots]
    std::vector<int32_t> cell_to_slot; // [n_stream][n_cells]
    std::vector<std::vector<int32_t>> free_slots; // per stream, popped from the back
    std::vector<int32_t> token_row;

    logquant_attn_state state = {};
    std::vector<logquant_attn_layer> layer_params; // per model layer; the ops' userdata

    // The graph being built: its inputs, made at its first layer of this cache (the
    // first call of center or build_attn for a layer not after the last one seen).
    struct graph_input;
    graph_input * input_for(ggml_context * ctx, llm_graph_result * res, int il, int stage, int64_t ns,
                            ggml_tensor * k_cur);
    graph_input * inp = nullptr;
    int inp_il    = -1;
    int inp_stage = 0; // 0: center, 1: build_attn
};

// The overlay of the cache behind mctx, or nullptr when it has none.
logquant_overlay * logquant_overlay_of(const llama_kv_cache_context * mctx);

// Hook before the micro-batch's K and V are stored: centers them where the cache behind
// mctx has an overlay that centers (logquant_overlay::center); otherwise leaves them.
void logquant_center_kv(ggml_context * ctx, llm_graph_result * res, const llama_kv_cache_context * mctx,
                        ggml_tensor *& k_cur, ggml_tensor *& v_cur, int il);

// Replaces build_attn_mha for a cache with an overlay: writes k_cur/v_cur (rotated as
// stored) into the overlay and returns attention over both tiers, shaped as
// build_attn_mha's flash-attention result [n_embd_head_v*n_head, n_tokens].
ggml_tensor * logquant_build_attn(ggml_context * ctx, llm_graph_result * res, const llama_kv_cache_context * mctx, ggml_tensor * q,
                                  ggml_tensor * k_cur, ggml_tensor * v_cur, ggml_tensor * k, ggml_tensor * v,
                                  ggml_tensor * kq_mask, ggml_tensor * kq_b, ggml_tensor * sinks, ggml_tensor * v_mla,
                                  float kq_scale, const llama_hparams & hparams, int il);
