// ggml-lq2.h — LogQuant's 2- and 3-bit KV block formats (GGML_TYPE_LQ2, GGML_TYPE_LQ3).
//
// Asymmetric 2-bit quantization in groups of 64 values along a row (the channel
// dimension of one token; a group never straddles two heads as long as the head size
// is a multiple of 64, which llama.cpp checks for every quantized cache type):
//
//     x ~= m + d * q,   q in {0, 1, 2, 3},   d = (max - min) / 3,   m = min
//
// d and m are stored as f16: 2 + 2 + 64 * 2 / 8 = 20 bytes per 64 values = 2.5 bits.
// Value j of a block sits in qs[j / 4], bits 2 * (j % 4) (the layout of upstream q2_0).
//
// Edge cases: a constant group has d = 0 and decodes exactly to fp16(x); d and m are
// clamped to the finite f16 range (|v| <= 65504), so huge values saturate instead of
// turning into inf; a NaN input encodes as q = 0 (the group's minimum) and does not
// take part in min/max.
#pragma once

#include "ggml.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define QK_LQ2 64

typedef struct {
    ggml_fp16_t d;            // step between levels
    ggml_fp16_t m;            // value of level 0 (the group minimum)
    uint8_t     qs[QK_LQ2/4]; // 2 bits per value
} block_lq2;

// ggml_lq2_levels[b] = the 4 levels (0..3, as floats) packed in byte b, in value order:
// a lookup that turns 2-bit codes into floats 4 at a time.
extern const float ggml_lq2_levels[256][4];

// LQ3: the same with 3 bits, q in {0..7}, for a K store that needs more than V, with
// the step and the minimum in a byte each: d = ggml_lq3_steps[d8], an 8-bit float
// (d8 = 16 e + f: (16 + f) 2^(e - 12), i.e. 2^-8 .. 248 in steps of 1/16 of an octave),
// and m = m8 * d / 2 (half steps, |m| <= 63.5 d). 1 + 1 + 16 + 8 = 26 bytes per 64
// values = 3.25 bits. The least-squares fit is LQ2's; its step is then rounded to the
// nearest byte step (up where the minimum needs more than 63.5 steps), its minimum to
// the nearest half step. The low two bits of value j sit as in LQ2 (qs[j / 4], bits
// 2 * (j % 4)), the third in qh[j / 8], bit j % 8, so the LQ2 level table decodes the
// low bits of both. A constant group decodes within d / 2 of its value; a NaN input
// encodes as q = 0. The byte pair narrows what LQ2's f16 pair covers: a group spanning
// more than 7 * 248 = 1736 is clipped, |m| reaches 127 * 248 / 2 = 15748 at most, a
// group whose minimum sits more than 63.5 of its own steps from zero gets a coarser
// step (keys centered or rotated, as the cache stores them, rarely do), and the
// smallest step is 2^-8 (error <= 0.002 on a group of smaller spread).
typedef struct {
    uint8_t d8;               // the step: ggml_lq3_steps[d8]
    int8_t  m8;               // the minimum in half steps
    uint8_t qs[QK_LQ2/4];     // low 2 bits
    uint8_t qh[QK_LQ2/8];     // high bit
} block_lq3;

// ggml_lq3_steps[c] = (16 + c % 16) * 2^(c / 16 - 12): every value exact in f32, as is
// the minimum m8 * d / 2.
extern const float ggml_lq3_steps[256];

static inline float ggml_lq3_step(const block_lq3 * b) {
    return ggml_lq3_steps[b->d8];
}
static inline float ggml_lq3_min(const block_lq3 * b) {
    return 0.5f * ggml_lq3_steps[b->d8] * (float) b->m8;
}

// ggml_lq3_high[b] = the high-bit parts (0 or 4, as floats) of the 8 values of byte b.
extern const float ggml_lq3_high[256][8];

// Reference quantization: k must be a multiple of QK_LQ2.
void quantize_row_lq2_ref(const float * x, block_lq2 * y, int64_t k);
// Inverse: y[i] = m + d * q[i].
void dequantize_row_lq2(const block_lq2 * x, float * y, int64_t k);
// ggml_quantize_chunk's entry point (no importance matrix: the KV cache has none).
size_t quantize_lq2(const float * src, void * dst, int64_t nrow, int64_t n_per_row, const float * imatrix);

void quantize_row_lq3_ref(const float * x, block_lq3 * y, int64_t k);
void dequantize_row_lq3(const block_lq3 * x, float * y, int64_t k);
size_t quantize_lq3(const float * src, void * dst, int64_t nrow, int64_t n_per_row, const float * imatrix);

// Keys by channel (KIVI; LOGQUANT_KEYS_BY_CHANNEL in logquant.h). A group of QK_LQ2
// consecutive rows of n values (n a multiple of QK_LQ2) takes n * 20 bytes as per-token
// blocks; the same bytes can instead hold the group by channel: block j of the group
// holds channel j of its QK_LQ2 rows, value t of the block = row t. Each channel then
// gets its own minimum and step over the group's tokens, so a channel whose values sit
// far from the others' (Qwen2's keys) no longer stretches every token's range.
//
// x: QK_LQ2 rows of n floats, row-major; group: n blocks.
void quantize_lq2_by_channel(const float * x, block_lq2 * group, int64_t n);
// Row t of a group held by channel, channels [j0, j0 + nj): y[j] = m + d * q of block j0 + j.
void dequantize_lq2_by_channel_row(const block_lq2 * group, int t, int64_t j0, int64_t nj, float * y);
// The same for an LQ3 K store (n blocks of 26 bytes per group).
void quantize_lq3_by_channel(const float * x, block_lq3 * group, int64_t n);
void dequantize_lq3_by_channel_row(const block_lq3 * group, int t, int64_t j0, int64_t nj, float * y);

// By channel for either format (type GGML_TYPE_LQ2 or GGML_TYPE_LQ3; false for any
// other): group is n blocks of that type.
bool ggml_lq_quantize_by_channel(enum ggml_type type, const float * x, void * group, int64_t n);
bool ggml_lq_dequantize_by_channel_row(enum ggml_type type, const void * group, int t, int64_t j0, int64_t nj, float * y);

#ifdef __cplusplus
}
#endif
