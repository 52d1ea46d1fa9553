// CPU kernels of LogQuant's two-tier KV cache; see logquant-attn.h.
#include "logquant-attn.h"

#include "ggml-cpu.h"
#include "ggml-impl.h"
#include "ggml-lq2.h"
#include "simd-mappings.h"
#include "vec.h"

#include <algorithm>
#include <type_traits>
#include <math.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif
#include <string.h>

// Head sizes up to this fit the per-thread scratch on the stack (llama.cpp's models
// use 64..256; MLA's 576 does not go through this path).
#define LQ_MAX_HEAD 1024

// Query heads one work item handles together (they share the V rows they read).
#define LQ_MAX_GROUP 8

// One query head's state in a work item: both tiers' online softmax.
struct head_state {
    float       VKQ[LQ_MAX_HEAD];   // store tier: f32 accumulator (as flash attention for quantized V)
    ggml_fp16_t VKQ16[LQ_MAX_HEAD]; // overlay tier: f16 accumulator (as flash attention for f16 V)
    float       Q_q[LQ_MAX_HEAD];   // q in the store's vec_dot type (at most f32-sized)
    ggml_fp16_t Q16[LQ_MAX_HEAD];
    float S1, M1, S2, M2;
    float KS[QK_LQ2];   // keys by channel: the scores of group ks_group's 64 cells
    int64_t ks_group;
    float slope;
    const ggml_fp16_t * mp;
    const float * pq;
    bool q_ready, q16_ready;
};

// Keys by channel: q . k of all 64 cells of a group held by channel at once, from the
// head's DK blocks (block d: channel d's step, minimum and 64 codes): sum_d q_d m_d plus
// sum_d (q_d step_d) code_d[t], 4 cells per code byte through the level table (and, for
// LQ3, 8 cells per high-bit byte). Per cell the sums run over d in the same order, one
// fused multiply-add per term (low bits, then high bits), with AVX2 or without: the
// vector loop (8 cells a lane group, the 64 sums in registers) is the scalar one's
// arithmetic. Without it a group cost ~2x a per-token row's decode and dot product per
// cell (the table lookups stayed scalar): half the time of a keys-by-channel prefill.
// A block's step and minimum (f16 in LQ2, bytes in LQ3: ggml-lq2.h).
static inline float block_step(const block_lq2 & b) { return GGML_CPU_FP16_TO_FP32(b.d); }
static inline float block_min(const block_lq2 & b) { return GGML_CPU_FP16_TO_FP32(b.m); }
static inline float block_step(const block_lq3 & b) { return ggml_lq3_step(&b); }
static inline float block_min(const block_lq3 & b) { return ggml_lq3_min(&b); }

template <typename block>
static void group_scores_by_channel(const block * blk, int64_t DK, const float * q, float * out) {
    constexpr bool LQ3 = std::is_same<block, block_lq3>::value;
    float base = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc[QK_LQ2/8];
    for (int i = 0; i < QK_LQ2/8; ++i) {
        acc[i] = _mm256_setzero_ps();
    }
    for (int64_t d = 0; d < DK; ++d) {
        const float a = q[d]*block_step(blk[d]);
        base += q[d]*block_min(blk[d]);
        const __m256 va = _mm256_set1_ps(a);
        for (int i = 0; i < QK_LQ2/8; ++i) {
            const __m256 low = _mm256_set_m128(_mm_loadu_ps(ggml_lq2_levels[blk[d].qs[2*i + 1]]),
                                               _mm_loadu_ps(ggml_lq2_levels[blk[d].qs[2*i]]));
            acc[i] = _mm256_fmadd_ps(va, low, acc[i]);
            if constexpr (LQ3) {
                acc[i] = _mm256_fmadd_ps(va, _mm256_loadu_ps(ggml_lq3_high[blk[d].qh[i]]), acc[i]);
            }
        }
    }
    const __m256 vb = _mm256_set1_ps(base);
    for (int i = 0; i < QK_LQ2/8; ++i) {
        _mm256_storeu_ps(out + 8*i, _mm256_add_ps(vb, acc[i]));
    }
#else
    float acc[QK_LQ2] = {};
    for (int64_t d = 0; d < DK; ++d) {
        const float a = q[d]*block_step(blk[d]);
        base += q[d]*block_min(blk[d]);
        for (int t = 0; t < QK_LQ2; ++t) {
            acc[t] = fmaf(a, ggml_lq2_levels[blk[d].qs[t/4]][t%4], acc[t]);
            if constexpr (LQ3) {
                acc[t] = fmaf(a, ggml_lq3_high[blk[d].qh[t/8]][t%8], acc[t]);
            }
        }
    }
    for (int t = 0; t < QK_LQ2; ++t) {
        out[t] = base + acc[t];
    }
#endif
}

// One step of flash attention's online softmax for a cell scoring s: raises the running
// maximum M to s when s is larger (then the accumulator must be scaled by ms, and
// true is returned) and gives the cell's weight vs.
static inline bool online_step(float s, float & M, float & ms, float & vs) {
    ms = 1.0f;
    vs = 1.0f;
    if (s > M) {
        const float Mold = M;
        M  = s;
        ms = expf(Mold - M);
        return true;
    }
    vs = expf(s - M);
    return false;
}

void logquant_attn_compute(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    const logquant_attn_layer * layer = (const logquant_attn_layer *) userdata;
    const logquant_attn_state * st    = layer->state;

    const ggml_tensor * q    = dst->src[0];
    const ggml_tensor * k    = dst->src[1];
    const ggml_tensor * v    = dst->src[2];
    const ggml_tensor * mask = dst->src[3];
    const ggml_tensor * kov  = dst->src[4];
    const ggml_tensor * vov  = dst->src[5];

    const int64_t DK   = k->ne[0];
    const int64_t DV   = v->ne[0];
    const int64_t n_kv = k->ne[1];
    const int64_t N    = q->ne[1];
    const int64_t n_head = q->ne[2];
    const int64_t n_strm = q->ne[3];

    GGML_ASSERT(DK <= LQ_MAX_HEAD && DV <= LQ_MAX_HEAD);
    GGML_ASSERT(q->type == GGML_TYPE_F32 && mask->type == GGML_TYPE_F16);
    GGML_ASSERT(kov->type == GGML_TYPE_F16 && vov->type == GGML_TYPE_F16);
    GGML_ASSERT(dst->ne[0] == DV && dst->ne[1] == n_head && dst->ne[2] == N);
    GGML_ASSERT(st->k_by_channel == nullptr ||
                ((k->type == GGML_TYPE_LQ2 || k->type == GGML_TYPE_LQ3) && st->n_cells % QK_LQ2 == 0));

    // broadcast factors (grouped-query attention)
    const int64_t rk2 = n_head / k->ne[2];
    const int64_t rv2 = n_head / v->ne[2];

    float scale = layer->scale;
    const float max_bias      = layer->max_bias;
    const float logit_softcap = layer->logit_softcap;
    if (logit_softcap != 0) {
        scale /= logit_softcap;
    }

    const uint32_t n_head_log2 = 1u << (uint32_t) floor(log2((double) n_head));
    const float m0 = powf(2.0f, -(max_bias       ) / n_head_log2);
    const float m1 = powf(2.0f, -(max_bias / 2.0f) / n_head_log2);

    // The store: exactly the functions ggml's CPU flash attention picks for its types.
    const ggml_type         k_vec_dot_type = ggml_get_type_traits_cpu(k->type)->vec_dot_type;
    ggml_from_float_t const q_to_vec_dot   = ggml_get_type_traits_cpu(k_vec_dot_type)->from_float;
    ggml_vec_dot_t    const kq_vec_dot     = ggml_get_type_traits_cpu(k->type)->vec_dot;
    ggml_to_float_t   const v_to_float     = ggml_get_type_traits(v->type)->to_float;
    // The overlay: f16 K against an f16 query, as ggml's flash attention does for f16 caches.
    ggml_from_float_t const q_to_f16       = ggml_get_type_traits_cpu(GGML_TYPE_F16)->from_float;
    GGML_ASSERT(q_to_vec_dot && kq_vec_dot && (v_to_float || v->type == GGML_TYPE_F32));

    // ~100 KiB per thread: on the heap of the thread, reused across calls
    static thread_local head_state G[LQ_MAX_GROUP];
    float V32[LQ_MAX_HEAD];

    // Work items: (stream, query, KV head, group of its query heads). The heads of a
    // group share each store cell's dequantized V row (the costly part of a quantized
    // V); everything else is per head, in the same order as flash attention's per-row
    // loop, so the results are bitwise those of one head at a time. Groups are split
    // until every thread has work.
    const int64_t n_head_kv = k->ne[2];
    const bool    shared_v  = rk2 == rv2;
    const int64_t per_kv    = shared_v ? rk2 : 1; // heads that read one V head
    const int64_t n_kv_item = shared_v ? n_head_kv : n_head;
    const int64_t base      = N * n_kv_item * n_strm;
    int64_t n_split = std::min<int64_t>(per_kv, (nth + base - 1) / base);
    int64_t hp      = (per_kv + n_split - 1) / n_split;
    hp      = std::min<int64_t>(hp, LQ_MAX_GROUP);
    n_split = (per_kv + hp - 1) / hp;

    const int32_t n_slots = st->n_slots;
    const int64_t n_items = base * n_split;

    for (int64_t it = ith; it < n_items; it += nth) {
        const int64_t part = it % n_split;
        const int64_t rest = it / n_split;
        const int64_t ikv  = rest % n_kv_item;
        const int64_t iq1  = (rest / n_kv_item) % N;
        const int64_t iq3  = rest / (n_kv_item * N);
        const int64_t h0   = ikv * per_kv + part * hp;                 // first query head
        const int64_t nh   = std::min<int64_t>(hp, (ikv + 1) * per_kv - h0); // heads in this item

        const int64_t strm = st->s0 + iq3;
        const int32_t * c2s = st->cell_to_slot + strm * st->n_cells;
        const uint8_t * by_channel = st->k_by_channel ? st->k_by_channel + strm * (st->n_cells / QK_LQ2) : nullptr;
        const char *    k_stream   = (const char *) k->data + iq3*k->nb[3];
        const int32_t * s2c = st->slot_to_cell + strm * n_slots;

        const int64_t ik2 = h0 / rk2;
        const int64_t iv2 = h0 / rv2;

        for (int64_t j = 0; j < nh; ++j) {
            const int64_t  iq2 = h0 + j;
            const uint32_t h   = (uint32_t) iq2;
            G[j].slope = (max_bias > 0.0f) ? h < n_head_log2 ? powf(m0, h + 1) : powf(m1, 2*(h - n_head_log2) + 1) : 1.0f;
            G[j].mp = (const ggml_fp16_t *) ((const char *) mask->data + iq1*mask->nb[1] + (iq2 % mask->ne[2])*mask->nb[2] + (iq3 % mask->ne[3])*mask->nb[3]);
            G[j].pq = (const float *) ((const char *) q->data + iq1*q->nb[1] + iq2*q->nb[2] + iq3*q->nb[3]);
            G[j].S1 = 0.0f;
            G[j].M1 = -INFINITY;
            G[j].S2 = 0.0f;
            G[j].M2 = -INFINITY;
            G[j].q_ready = false;
            G[j].q16_ready = false;
            G[j].ks_group = -1;
            memset(G[j].VKQ, 0, DV * sizeof(float));
        }

        // KQ value of one cell, scaled, capped and masked: flash attention's arithmetic
        auto score = [&](float s, float mv) {
            s = s * scale;
            if (logit_softcap != 0.0f) {
                s = logit_softcap * tanhf(s);
            }
            return s + mv;
        };

        // Tier 1: the quantized store minus the cells the overlay holds. Online softmax
        // with an f32 accumulator, step for step what ggml's CPU flash attention does
        // for a quantized V, so that with no overlay the result is bitwise the same.
        for (int64_t ic = 0; ic < n_kv; ++ic) {
            if (c2s[ic] >= 0) {
                continue;
            }
            const float * vrow = nullptr;
            for (int64_t j = 0; j < nh; ++j) {
                head_state & g = G[j];
                const float mv = g.slope * GGML_CPU_FP16_TO_FP32(g.mp[ic]);
                if (mv == -INFINITY) {
                    continue;
                }
                if (!g.q_ready) {
                    q_to_vec_dot(g.pq, g.Q_q, DK);
                    g.q_ready = true;
                }
                float s;
                if (by_channel && by_channel[ic / QK_LQ2]) {
                    // a group held by channel: its 64 scores at once, against the f32 query
                    if (g.ks_group != ic / QK_LQ2) {
                        const char * group = k_stream + (ic - ic % QK_LQ2)*k->nb[1];
                        if (k->type == GGML_TYPE_LQ3) {
                            group_scores_by_channel((const block_lq3 *) group + ik2*DK, DK, g.pq, g.KS);
                        } else {
                            group_scores_by_channel((const block_lq2 *) group + ik2*DK, DK, g.pq, g.KS);
                        }
                        g.ks_group = ic / QK_LQ2;
                    }
                    s = g.KS[ic % QK_LQ2];
                } else {
                    const char * k_data = (const char *) k->data + ic*k->nb[1] + ik2*k->nb[2] + iq3*k->nb[3];
                    kq_vec_dot(DK, &s, 0, k_data, 0, g.Q_q, 0, 1);
                }
                s = score(s, mv);

                float ms, vs;
                if (online_step(s, g.M1, ms, vs)) {
                    ggml_vec_scale_f32(DV, g.VKQ, ms);
                }
                if (vrow == nullptr) {
                    const char * v_data = (const char *) v->data + ic*v->nb[1] + iv2*v->nb[2] + iq3*v->nb[3];
                    if (v_to_float) {
                        v_to_float(v_data, V32, DV);
                        vrow = V32;
                    } else {
                        vrow = (const float *) v_data;
                    }
                }
                ggml_vec_mad_f32(DV, g.VKQ, vrow, vs);
                g.S1 = g.S1*ms + vs;
            }
        }

        // Tier 2: the f16 overlay; each slot takes the mask of the cell it holds. The
        // arithmetic of flash attention over an f16 cache (f16 query, f16 accumulator),
        // so that with every token in the overlay the result is bitwise that of f16.
        for (int32_t slot = 0; slot < n_slots; ++slot) {
            const int32_t c = s2c[slot];
            if (c < 0 || c >= n_kv) {
                continue;
            }
            const int64_t row = iq3 * n_slots + slot; // k_ov/v_ov hold the micro-batch's streams
            ggml_fp16_t * k_data = (ggml_fp16_t *) ((char *) kov->data + row*kov->nb[1]) + ik2*DK;
            const ggml_fp16_t * v_data = (const ggml_fp16_t *) ((const char *) vov->data + row*vov->nb[1]) + iv2*DV;
            for (int64_t j = 0; j < nh; ++j) {
                head_state & g = G[j];
                const float mv = g.slope * GGML_CPU_FP16_TO_FP32(g.mp[c]);
                if (mv == -INFINITY) {
                    continue;
                }
                if (!g.q16_ready) {
                    q_to_f16(g.pq, g.Q16, DK);
                    memset(g.VKQ16, 0, DV * sizeof(ggml_fp16_t));
                    g.q16_ready = true;
                }
                float s;
                ggml_vec_dot_f16(DK, &s, 0, k_data, 0, g.Q16, 0, 1);
                s = score(s, mv);

                float ms, vs;
                if (online_step(s, g.M2, ms, vs)) {
                    ggml_vec_scale_f16(DV, g.VKQ16, ms);
                }
                ggml_vec_mad_f16(DV, g.VKQ16, v_data, vs);
                g.S2 = g.S2*ms + vs;
            }
        }

        for (int64_t j = 0; j < nh; ++j) {
            head_state & g = G[j];
            const int64_t iq2 = h0 + j;
            float * VKQ = g.VKQ;

            // One softmax over both tiers: merge the partial results by their log-sum-exp.
            float S = g.S1;
            if (g.S2 != 0.0f) {
                if (g.S1 == 0.0f) {
                    for (int64_t d = 0; d < DV; ++d) {
                        VKQ[d] = GGML_CPU_FP16_TO_FP32(g.VKQ16[d]);
                    }
                    S = g.S2;
                } else {
                    const float M  = g.M1 > g.M2 ? g.M1 : g.M2;
                    const float a1 = expf(g.M1 - M);
                    const float a2 = expf(g.M2 - M);
                    for (int64_t d = 0; d < DV; ++d) {
                        VKQ[d] = VKQ[d]*a1 + GGML_CPU_FP16_TO_FP32(g.VKQ16[d])*a2;
                    }
                    S = g.S1*a1 + g.S2*a2;
                }
            }

            const float S_inv = S == 0.0f ? 0.0f : 1.0f/S;
            ggml_vec_scale_f32(DV, VKQ, S_inv);

            // permute(0, 2, 1, 3), as flash attention writes its result
            memcpy((char *) dst->data + (iq3*dst->ne[2]*dst->ne[1] + iq2 + iq1*dst->ne[1])*dst->nb[1], VKQ, dst->nb[1]);
        }
    }
}

static void write_rows(const ggml_tensor * cur, ggml_tensor * ov, const logquant_attn_state * st, int ith, int nth) {
    const int64_t n_embd_head = cur->ne[0];
    const int64_t n_head      = cur->ne[1];
    const int64_t n_tokens    = cur->ne[2];
    GGML_ASSERT(n_tokens == st->n_tokens);
    GGML_ASSERT(n_embd_head * n_head == ov->ne[0]);
    for (int64_t i = ith; i < n_tokens; i += nth) {
        const int32_t row = st->token_row[i];
        if (row < 0) {
            continue;
        }
        for (int64_t h = 0; h < n_head; ++h) {
            const char * src = (const char *) cur->data + i*cur->nb[2] + h*cur->nb[1];
            ggml_fp16_t * out = (ggml_fp16_t *) ((char *) ov->data + row*ov->nb[1]) + h*n_embd_head;
            if (cur->type == GGML_TYPE_F32) {
                ggml_cpu_fp32_to_fp16((const float *) src, out, n_embd_head);
            } else {
                GGML_ASSERT(cur->type == GGML_TYPE_F16);
                memcpy(out, src, n_embd_head * sizeof(ggml_fp16_t));
            }
        }
    }
}

void logquant_overlay_write(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    const logquant_attn_layer * layer = (const logquant_attn_layer *) userdata;
    write_rows(dst->src[1], dst->src[0], layer->state, ith, nth); // K: dst is a view of src[0]
    write_rows(dst->src[2], dst->src[3], layer->state, ith, nth); // V
}
