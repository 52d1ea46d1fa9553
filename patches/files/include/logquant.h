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
// The 2- and 3-bit KV formats (GGML_TYPE_LQ2 and GGML_TYPE_LQ3, ggml-lq2.h): 64 values
// per block of 20 or 26 bytes; `type` is one of the two (a ggml_type value). These
// entry points run exactly the functions the KV cache uses, so tests can check them
// against an independent implementation. n must be a multiple of 64; the functions
// return false (and write nothing) otherwise, on another type or on NULL pointers.
//

// Bytes of one block (0 for another type); 64 values per block.
LLAMA_API size_t logquant_lq_block_bytes(int32_t type);

// Quantizes n floats into n/64 blocks with the CPU backend's from_float (what
// set_rows runs when a token is written). `reference` selects ggml's from_float_ref.
LLAMA_API bool logquant_lq_quantize(int32_t type, const float * x, void * blocks, int64_t n, bool reference);

// Dequantizes n values (ggml's to_float for the type).
LLAMA_API bool logquant_lq_dequantize(int32_t type, const void * blocks, float * y, int64_t n);

// The CPU dot product attention uses for K.q: sum_i dequant(blocks)[i] * y[i].
LLAMA_API bool logquant_lq_dot(int32_t type, const void * blocks, const float * y, int64_t n, float * out);

//
// The two-tier cache (SPEC.md section 4): every token in the quantized store (K and V
// of type lq2, or any other quantized type), plus an f16 overlay holding the tokens a
// retention policy keeps at full precision. Attention runs over both tiers in one
// softmax: store cells without an overlay copy, and the overlay.
//
// The policy lives with the caller: after each llama_decode it tells the cache, per
// sequence, which positions stay at full precision; the rest are demoted (their slot
// is freed; the 2-bit copy was written with the token, so no data moves). Every token
// written gets a slot, so size the overlay as the policy's budget plus the most tokens
// one llama_decode writes into one KV stream (up to n_batch); when it is full, new
// tokens stay 2-bit and count as misses. One KV stream per sequence (kv_unified off).
// Tokens restored by llama_state_* or shifted by llama_memory_seq_add/div are 2-bit
// only afterwards. The kernels run on the CPU backend only (CPU-resident KV).
//
// Functions returning int32_t/int64_t give a negative LOGQUANT_ERR_* on failure;
// logquant_last_error() then describes it (per thread, until the next failure).
//

#define LOGQUANT_ERR_ARGUMENT    (-1) // NULL pointer, bad sequence id, unsorted positions
#define LOGQUANT_ERR_UNSUPPORTED (-2) // model or context the overlay cannot serve
#define LOGQUANT_ERR_STATE       (-3) // wrong moment: already enabled, not enabled, tokens present
#define LOGQUANT_ERR_MEMORY      (-4) // the overlay's buffers could not be allocated

LLAMA_API const char * logquant_last_error(void);

// Adds an overlay of n_slots tokens per KV stream (capped at the cache size) to every
// KV cache of ctx (two on models with sliding-window layers), in the buffer types of
// the layers' K and V. Call on a fresh context, before its first llama_decode, created
// with flash attention on: a context that holds tokens is refused, but one that decoded
// and was cleared is not detected, and llama.cpp could reuse a graph it built before
// (without the overlay's operations). n_slots = 0 is allowed: every token stays 2-bit, through the same
// attention kernel. Returns 0 on success.
LLAMA_API int32_t logquant_overlay_enable(struct llama_context * ctx, uint32_t n_slots);

// Centering (flags of logquant_overlay_enable_flags). Per KV stream, layer and channel,
// an offset of K (of V) is taken from the stream's first tokens and frozen: their mean,
// leaving out position 0 (often an attention sink far from the rest), over the at least
// LOGQUANT_CENTER_TOKENS tokens the stream holds after the decode that reaches that many
// (logquant_seq_set_full_precision takes it, from the overlay's f16 copies, before it
// demotes anything). From then on every token is stored minus the offset, in both tiers
// (the tokens before, rewritten so). Attention is unchanged in exact arithmetic: a
// constant added to every key adds one constant to each query's scores, which the
// softmax ignores, and the weights sum to 1, so the offset of V is added back to the
// output. What changes is the quantization: a channel whose values sit far from zero
// (Qwen2's key biases) no longer stretches its group's range. A stream that empties and
// takes new tokens takes new offsets. Offsets are in the basis the cache stores (after
// llama.cpp's Hadamard rotation, where that is on). Not kept across llama_state_* and
// position shifts (their tokens would be read as if centered by the stream's offsets).
#define LOGQUANT_CENTER_K      (1u << 0)
#define LOGQUANT_CENTER_V      (1u << 1)
#define LOGQUANT_CENTER_TOKENS 16

// Keys by channel (KIVI): each group of 64 cells of a KV stream whose tokens all still
// have their f16 copies is rewritten in the lq2 K store by channel (every channel its
// own minimum and step over the 64 tokens; ggml-lq2.h), at logquant_seq_set_full_precision
// before anything is demoted, so with a policy that keeps at least the newest 64 tokens
// every demoted key is read by channel. Same bytes as per-token lq2 (2.5 bits a value).
// A micro-batch that writes into a group still holding older tokens (a rollback, a
// sliding window that wraps), a position shift and a state save turn the group back
// into per-token rows first. K is stored without llama.cpp's Hadamard rotation (which
// would spread each channel's range over its head). Needs an lq2 K store and a cache
// size that is a multiple of 64. Runs on the CPU and CUDA; on CUDA a coded group's
// scores come from CUDA cores, not the tensor cores: decode at 32768 x 8 on an H100 runs
// at 0.30x of per-token keys' speed (BENCHMARKS.md), and coding a group copies the
// stream's f16 K rows to the host and the group back.
#define LOGQUANT_KEYS_BY_CHANNEL (1u << 2)

// logquant_overlay_enable with options: flags is 0 or LOGQUANT_CENTER_* and
// LOGQUANT_KEYS_BY_CHANNEL ORed.
LLAMA_API int32_t logquant_overlay_enable_flags(struct llama_context * ctx, uint32_t n_slots, uint32_t flags);

// Keeps at full precision only the tokens of seq at the listed positions (sorted
// ascending; may be empty); every other overlaid token of seq is demoted. A position
// already demoted cannot come back. Applies to every cache of the context. Returns 0.
LLAMA_API int32_t logquant_seq_set_full_precision(struct llama_context * ctx, llama_seq_id seq,
                                                  const llama_pos * pos, size_t n);

// The same for some caches only: `layers` is LOGQUANT_LAYERS_GLOBAL (the cache of the
// global-attention layers, or the only cache), LOGQUANT_LAYERS_SWA (the cache of the
// sliding-window layers, where the model has one; otherwise nothing is done) or both
// (LOGQUANT_LAYERS_ALL, as logquant_seq_set_full_precision). So a caller can keep other
// positions in the layers that see only a window of recent tokens.
#define LOGQUANT_LAYERS_GLOBAL (1u << 0)
#define LOGQUANT_LAYERS_SWA    (1u << 1)
#define LOGQUANT_LAYERS_ALL    (LOGQUANT_LAYERS_GLOBAL | LOGQUANT_LAYERS_SWA)
LLAMA_API int32_t logquant_seq_set_full_precision_in(struct llama_context * ctx, llama_seq_id seq,
                                                     const llama_pos * pos, size_t n, uint32_t layers);

// Writes up to cap positions of seq that are held at full precision (in the cache of
// the global-attention layers), ascending, to out; returns how many there are (which
// may exceed cap), or a negative error.
LLAMA_API int64_t logquant_seq_full_precision(struct llama_context * ctx, llama_seq_id seq,
                                              llama_pos * out, size_t cap);

// Reads the key of seq's token at position pos in layer il (of the global, or only,
// cache), as attention reads it: from the store (from_store = true: dequantized, by
// channel where its group is held so, per token otherwise) or from the overlay's f16
// copy (false; an error when the token has none). out receives n_embd_k_gqa floats
// (n must be at least that); returns how many were written, or a negative error. For
// tests: it copies the cell's whole group from the backend.
LLAMA_API int64_t logquant_seq_read_key(struct llama_context * ctx, llama_seq_id seq, int32_t il, llama_pos pos,
                                        bool from_store, float * out, size_t n);

struct logquant_overlay_stats {
    bool     enabled;
    uint32_t slots_per_stream; // capacity of the largest cache's overlay
    uint64_t slots_used;       // over all caches and streams
    uint64_t misses;           // tokens written while the overlay was full
    size_t   bytes_host;       // allocated overlay memory (also counted in logquant_memory_breakdown)
    size_t   bytes_device;
};

// Fills *out; enabled = false when ctx has no overlay. Returns false on NULL arguments.
LLAMA_API bool logquant_overlay_get_stats(const struct llama_context * ctx, struct logquant_overlay_stats * out);

// One run of the CPU two-tier attention kernel (the one the cache uses) on buffers the
// caller provides, for tests against an independent implementation. A single KV head
// group layout: query head h reads KV head h / (n_head / n_head_kv).
struct logquant_attn_case {
    int32_t head_dim;             // K and V head size, a multiple of 64
    int32_t n_head;               // query heads
    int32_t n_head_kv;            // KV heads (divides n_head)
    int32_t n_tokens;             // queries
    int32_t n_kv;                 // cells in the store
    int32_t n_slots;              // overlay slots
    float   scale;                // applied to K.q
    const float    * q;           // [n_tokens][n_head][head_dim]
    const void     * k_store;     // [n_kv][n_head_kv] rows of head_dim values, of type k_type
    const void     * v_store;     // same layout
    const uint16_t * k_overlay;   // [n_slots][n_head_kv][head_dim] IEEE f16 (may be NULL if n_slots = 0)
    const uint16_t * v_overlay;
    const int32_t  * slot_to_cell; // [n_slots]: the cell a slot holds, or -1; each cell at most once
    const float    * mask;        // [n_tokens][n_kv]: 0 or -INFINITY (added to the scores)
    int32_t n_threads;
    float * out;                  // [n_tokens][n_head][head_dim]
    const uint8_t  * k_by_channel; // [n_kv/64]: nonzero where k_store's cells 64g .. 64g + 63
                                   // hold their keys by channel (ggml-lq2.h); NULL: none
    int32_t k_type;               // GGML_TYPE_LQ2 or GGML_TYPE_LQ3 (the V store is LQ2)
};

// Returns false (writing nothing) on NULL pointers or inconsistent sizes.
LLAMA_API bool logquant_attn_run(const struct logquant_attn_case * c);

// The same on the ggml backend named `backend` ("CPU", "CUDA0", ...): that backend's
// kernels, as the cache runs them (n_threads applies to the CPU only). Returns false
// when the case is invalid, no such backend exists, or it cannot run the op for this
// case; logquant_last_error() says which.
LLAMA_API bool logquant_attn_run_on(const struct logquant_attn_case * c, const char * backend);

// Times that op on `backend`: one warm-up run, then `reps` runs of the one-op graph
// back to back; returns the mean milliseconds per run (wall clock, synchronized at the
// end), or a negative value where logquant_attn_run_on would return false.
LLAMA_API double logquant_attn_time_on(const struct logquant_attn_case * c, const char * backend, int32_t reps);

// Quantization as the cache writes every token: ggml_set_rows of n_rows rows of
// n_per_row floats (a multiple of 64) into an LQ2 or LQ3 tensor (`type`) on `backend`.
// dst receives n_rows * n_per_row/64 blocks (ggml-lq2.h). False as above.
LLAMA_API bool logquant_lq_set_rows_run(int32_t type, const float * src, int64_t n_rows, int64_t n_per_row, void * dst,
                                        const char * backend);

#ifdef __cplusplus
}
#endif
