// LogQuant's two-tier attention and overlay write on CUDA; see logquant-attn.cuh and,
// for the ops' sources and semantics, ggml-cpu/logquant-attn.h.
//
// Attention, per (stream, KV head, tile of up to 8 queries): one wave of blocks of 4
// warps splits the store's cells and the overlay's slots; every warp runs an online
// softmax per tier it has and writes a partial result per tier (max, sum,
// accumulator); a second kernel merges the partials by log-sum-exp. One pass over the 2-bit store, never an
// f16 copy of it: the bytes moved per step are the store's 2.5 bits per value, the
// overlay's f16 rows and the mask.
//
//  - Store tier, on tensor cores (mma.sync, Ampere and newer), 16 cells at a time:
//    scores = K codes (u8, 0..3) x the query rounded to int8 per 64-value block, an
//    m16n8k32 integer product per block, then each block's step and minimum applied
//    to the integer sums (llama.cpp's vector kernels round the query the same way for
//    quantized K). Values = an m16n8k16 f16 product of the V codes with p*step, plus
//    sum(p*minimum) per block on the side. A V code becomes an f16 operand with one
//    AND: two bits at bit 2j of a half are the subnormal c*4^j*2^-24, exact, and the
//    factor 4^j*2^-24 comes off when the partial result is written. Cells the overlay
//    holds are skipped through a bitmap the block builds in shared memory; in a decode
//    step (one mask row for the tile, only 0 and -inf) the masked cells join it and
//    the store tier reads no mask. A warp copies its next 32 cells' rows into shared
//    memory (cp.async, coalesced) while it computes the current 32: loads issued where
//    the arithmetic needs them left the warps waiting on memory and the L1 splitting
//    each load into 8 lines. With 4 queries or fewer (GQA up to 4 at decode) the two
//    16-cell tiles of a chunk use the two halves of the 8 product columns, so that no
//    lane spends the softmax on empty columns.
//  - Overlay slots (few): lane = slot for the scores, lane = output elements for the
//    values, f16 K and V and an f32 query, in f32.
#include "logquant-attn.cuh"
#include "lq2.cuh"
#include "fattn.cuh"

#include "ggml-cpu/logquant-attn.h"

#include <algorithm>

#define LQ_WARPS           4
#define LQ_THREADS         (LQ_WARPS*WARP_SIZE)
#define LQ_BLOCK_CELLS_MAX 8192 // store cells per block at most (the bitmap's size)
#define LQ_WARP_CELLS_MIN  64   // store cells per warp at least, where there are that many
// Overlay slots per warp in overlay blocks (default; see lq_warp_slots). At one sequence
// the overlay's warps are the op's longest (CUDA cores, a lane per slot): 16 rather than
// 32 halves their run for 16 more partials per head (H200, 8192 x 1: 27.3 -> 22.9 us).
#define LQ_WARP_SLOTS      16
#define LQ_COLS            8    // queries per tile: the N of the tensor-core products

struct lq_attn_params {
    const char * q;    int64_t q_nb1, q_nb2, q_nb3; // f32 [D, N, n_head, n_stream]
    const char * k;    int64_t k_nb1, k_nb2, k_nb3; // lq2 [D, n_kv, n_head_kv, n_stream]
    const char * v;    int64_t v_nb1, v_nb2, v_nb3;
    const char * mask; int64_t m_nb1, m_nb2, m_nb3; int32_t m_ne2, m_ne3;
    const char * kov;  const char * vov; int64_t ov_nb1; // f16 rows of this micro-batch's streams
    const int32_t * s2c; // [n_stream][n_slots]: the cell a slot holds, or -1
    int32_t n_slots;
    const int32_t * kbc; // keys by channel: [n_stream][kbc_n] nonzero where a group of 64 cells
    int32_t kbc_n;       // is held by channel (ggml-lq2.h); nullptr: none
    bool k_lq3;          // an lq3 K store (the dense path alone reads it)
    int32_t n_kv, N, n_head, n_head_kv, G;
    float scale, softcap, max_bias, m0, m1;
    uint32_t n_head_log2;
    int32_t n_split, block_cells; // store tier: blocks along the cells, cells per block
    int32_t n_split_ov;           // overlay blocks after them, or 0: the store's warps share the slots
    int32_t warp_slots;           // overlay slots per warp in overlay blocks
    int32_t n_qtiles, n_parts;    // query tiles per KV head; partial results per query
    float * part;                 // [query][n_parts][2 + D]: M, S, accumulator
};

// Query qi of a tile: its token, head, mask row and ALiBi slope.
struct lq_query {
    int t, h;
    const half * mrow;
    float slope;
};

static __device__ __forceinline__ lq_query lq_query_of(const lq_attn_params & P, const int ikv, const int z, const int qi) {
    lq_query r;
    r.t = qi / P.G;
    r.h = ikv*P.G + qi % P.G;
    r.mrow = (const half *) (P.mask + r.t*P.m_nb1 + (r.h % P.m_ne2)*P.m_nb2 + (z % P.m_ne3)*P.m_nb3);
    r.slope = P.max_bias > 0.0f
        ? (uint32_t) r.h < P.n_head_log2 ? powf(P.m0, r.h + 1) : powf(P.m1, 2*(r.h - (int) P.n_head_log2) + 1)
        : 1.0f;
    return r;
}

// The QT softmax weights of one slot, with vector loads from shared memory.
template <int QT>
static __device__ __forceinline__ void lq_load_p(const float * __restrict__ row, float (&p)[QT]) {
    if constexpr (QT % 4 == 0) {
#pragma unroll
        for (int k = 0; k < QT/4; ++k) {
            const float4 v = ((const float4 *) row)[k];
            p[4*k] = v.x; p[4*k + 1] = v.y; p[4*k + 2] = v.z; p[4*k + 3] = v.w;
        }
    } else if constexpr (QT == 2) {
        const float2 v = *(const float2 *) row;
        p[0] = v.x; p[1] = v.y;
    } else {
        p[0] = row[0];
    }
}

// Partial result p of query j of tile qt of KV head ikv of stream z: M, S, accumulator.
// Writes M and S (from the leader lane) and returns where they are: the accumulator
// follows them.
template <int D, int QT>
static __device__ __forceinline__ float * lq_part_open(const lq_attn_params & P, const int z, const int ikv,
        const int qt, const int j, const int p, const bool leader, const float M, const float S) {
    const int64_t qg = ((int64_t) (z*P.n_head_kv + ikv)*P.n_qtiles + qt)*QT + j;
    float * dstp = P.part + (qg*P.n_parts + p)*(2 + D);
    if (leader) {
        dstp[0] = M;
        dstp[1] = S;
    }
    return dstp;
}

// The overlay tier of one warp: slots [w0, w1), f16 K and V, in f32; its partial
// result is number p.
template <int D, int QT>
static __device__ __forceinline__ void lq_overlay_tier(const lq_attn_params & P, const int w0, const int w1,
        const int z, const int ikv, const int qt, const float (*s_qf)[D], float (*s_p)[QT], const int p) {
    constexpr int EPL = D/WARP_SIZE;
    const int lane = threadIdx.x % WARP_SIZE;
    const int GN   = P.G*P.N;

    float M[QT], S[QT], acc[QT][EPL];
#pragma unroll
    for (int j = 0; j < QT; ++j) {
        M[j] = -INFINITY;
        S[j] = 0.0f;
#pragma unroll
        for (int e = 0; e < EPL; ++e) {
            acc[j][e] = 0.0f;
        }
    }

    for (int c = w0; c < w1; c += WARP_SIZE) {
        const int i = c + lane; // this lane's slot
        int cell = -1;
        if (i < w1) {
            cell = P.s2c[z*P.n_slots + i];
            cell = cell < P.n_kv ? cell : -1;
        }

        float s[QT];
        bool any = false;
#pragma unroll
        for (int j = 0; j < QT; ++j) {
            const int qi = qt*QT + j;
            s[j] = -INFINITY;
            if (cell >= 0 && qi < GN) {
                const lq_query q = lq_query_of(P, ikv, z, qi);
                s[j] = q.slope*__half2float(q.mrow[cell]);
                any |= s[j] != -INFINITY;
            }
        }

        if (any) {
            float dot[QT];
#pragma unroll
            for (int j = 0; j < QT; ++j) {
                dot[j] = 0.0f;
            }
            const uint4 * kr = (const uint4 *) (P.kov + (int64_t) (z*P.n_slots + i)*P.ov_nb1 + (int64_t) ikv*D*sizeof(half));
#pragma unroll
            for (int d8 = 0; d8 < D/8; ++d8) {
                const uint4 raw = kr[d8];
                const half2 * h2 = (const half2 *) &raw;
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float2 kf = __half22float2(h2[e]);
#pragma unroll
                    for (int j = 0; j < QT; ++j) {
                        dot[j] += s_qf[j][8*d8 + 2*e]*kf.x + s_qf[j][8*d8 + 2*e + 1]*kf.y;
                    }
                }
            }
#pragma unroll
            for (int j = 0; j < QT; ++j) {
                if (s[j] != -INFINITY) {
                    float x = dot[j]*P.scale;
                    if (P.softcap != 0.0f) {
                        x = P.softcap*tanhf(x);
                    }
                    s[j] += x;
                }
            }
        }

        // online softmax over the chunk: one running maximum per query for the warp
        bool live = false;
#pragma unroll
        for (int j = 0; j < QT; ++j) {
            const float mx = warp_reduce_max(s[j]);
            const float Mn = fmaxf(M[j], mx);
            float p = 0.0f;
            if (Mn != -INFINITY) {
                const float alpha = expf(M[j] - Mn);
                S[j] *= alpha;
#pragma unroll
                for (int e = 0; e < EPL; ++e) {
                    acc[j][e] *= alpha;
                }
                p = expf(s[j] - Mn);
                S[j] += p;
                M[j] = Mn;
                live = true;
            }
            s_p[lane][j] = p;
        }
        __syncwarp();
        if (!live) {
            continue;
        }

        // values PB slots at a time: first every load (independent, so in flight
        // together), then the arithmetic
        const int n = min(WARP_SIZE, w1 - c);
        constexpr int PB = EPL == 8 ? 4 : 8;
        for (int i0 = 0; i0 < n; i0 += PB) {
            uint32_t raw[PB][EPL/2];
#pragma unroll
            for (int k = 0; k < PB; ++k) {
                const int ii = min(i0 + k, n - 1); // past the end: a repeat, weighed by nothing
                const uint32_t * vr = (const uint32_t *) ((const half *) (P.vov + (int64_t) (z*P.n_slots + c + ii)*P.ov_nb1) + ikv*D + EPL*lane);
#pragma unroll
                for (int e = 0; e < EPL/2; ++e) {
                    raw[k][e] = vr[e];
                }
            }
#pragma unroll
            for (int k = 0; k < PB; ++k) {
                if (i0 + k >= n) {
                    break;
                }
                float vals[EPL];
#pragma unroll
                for (int e = 0; e < EPL/2; ++e) {
                    const float2 f = __half22float2(*(const half2 *) &raw[k][e]);
                    vals[2*e]     = f.x;
                    vals[2*e + 1] = f.y;
                }
                float pj[QT];
                lq_load_p<QT>(s_p[i0 + k], pj);
#pragma unroll
                for (int j = 0; j < QT; ++j) {
#pragma unroll
                    for (int e = 0; e < EPL; ++e) {
                        acc[j][e] += pj[j]*vals[e];
                    }
                }
            }
        }
        __syncwarp();
    }

#pragma unroll
    for (int j = 0; j < QT; ++j) {
        const float Sj = warp_reduce_sum(S[j]);
        if (qt*QT + j >= GN) {
            continue;
        }
        float * dstp = lq_part_open<D, QT>(P, z, ikv, qt, j, p, lane == 0, M[j], Sj);
#pragma unroll
        for (int e = 0; e < EPL; ++e) {
            dstp[2 + EPL*lane + e] = acc[j][e];
        }
    }
}

#ifdef AMPERE_MMA_AVAILABLE
// d += a (16x32 u8, row) * b (32x8 s8, col), s32
static __device__ __forceinline__ void lq_mma_u8s8(int (&d)[4], const uint32_t a0, const uint32_t a1, const uint32_t a2,
        const uint32_t a3, const int b0, const int b1) {
    asm("mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// d += a (16x16 f16, row) * b (16x8 f16, col), f32
static __device__ __forceinline__ void lq_mma_f16(float (&d)[4], const uint32_t a0, const uint32_t a1, const uint32_t a2,
        const uint32_t a3, const uint32_t b0, const uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// The 8x8 f16 matrix whose rows the warp holds (lane: row lane/4, columns 2*(lane%4)
// and +1), transposed, in the same layout.
static __device__ __forceinline__ uint32_t lq_transpose8x8(const uint32_t x) {
    uint32_t y;
    asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(y) : "r"(x));
    return y;
}

static __device__ __forceinline__ uint32_t lq_pack_half2(const float a, const float b) {
    const half2 h = __floats2half2_rn(a, b);
    return *(const uint32_t *) &h;
}

// The f16 operand of codes j (0..7) of the two cells packed in x (low and high half):
// the 2-bit field kept where it lies, a subnormal c*4^j'*2^-24 with j' = j (j <= 4) or
// j - 5 (shifted down first, so the bits stay in the mantissa).
template <int J>
static __device__ __forceinline__ uint32_t lq_v_operand(const uint32_t x, const uint32_t x_hi) {
    return J <= 4 ? x & (0x00030003u << 2*J) : x_hi & (0x00030003u << 2*(J - 5));
}

// What multiplies a product of lq_v_operand<J> back to c.
static __device__ __forceinline__ constexpr float lq_v_unscale(const int j) {
    return 16777216.0f / (float) (1u << 2*(j <= 4 ? j : j - 5));
}

// Keys by channel: the scores of the lane's cells c0 + r0 and c0 + r0 + 8 (queries cq,
// cq + 1) that lie in a group held by channel, replacing the tensor cores' per-token
// ones in x: block j of the group (KV head ikv's channel j) holds that channel's step,
// minimum and 64 codes. Read from global memory (L1: a head's D blocks serve all the
// group's cells), on CUDA cores, against the same int8-rounded query.
template <int D>
static __device__ __forceinline__ void lq_scores_by_channel(const lq_attn_params & P, const int z, const int ikv,
        const int c0, const int w1, const int r0, const int cq, const int8_t (*s_qi8)[D],
        const float (&qd)[D/QK_LQ2][2], float (&x)[2][2]) {
#pragma unroll
    for (int s = 0; s < 2; ++s) {
        const int cell = c0 + r0 + 8*s;
        if (cell >= w1 || P.kbc[(int64_t) z*P.kbc_n + cell/QK_LQ2] == 0) {
            continue;
        }
        const block_lq2 * blk = (const block_lq2 *) (P.k + (int64_t) z*P.k_nb3 + (int64_t) (cell - cell % QK_LQ2)*P.k_nb1) + ikv*D;
        const int byte = (cell % QK_LQ2)/4, shift = 2*(cell % 4);
        float acc[2] = {0.0f, 0.0f};
#pragma unroll
        for (int b = 0; b < D/QK_LQ2; ++b) {
            float ab[2] = {0.0f, 0.0f};
            for (int j = b*QK_LQ2; j < (b + 1)*QK_LQ2; ++j) {
                const float2 dm = __half22float2(*(const half2 *) &blk[j].d);
                const float  kj = dm.y + dm.x*(float) ((blk[j].qs[byte] >> shift) & 3);
                ab[0] += (float) s_qi8[cq][j]*kj;
                ab[1] += (float) s_qi8[cq + 1][j]*kj;
            }
            acc[0] += qd[b][0]*ab[0];
            acc[1] += qd[b][1]*ab[1];
        }
        x[s][0] = acc[0];
        x[s][1] = acc[1];
    }
}

// Store cells per warp and softmax update: two 16-cell tiles (one for head size 256,
// whose staging buffers would not fit twice in 48 KiB of static shared memory).
template <int D>
static __host__ __device__ constexpr int lq_chunk() {
    return D == 256 ? 16 : 32;
}

// Bytes per cp.async of a cell's lq2 row slice (NB blocks of 20 bytes, at a multiple of
// NB*20 in the row): the widest copy its alignment allows.
template <int NB>
static __host__ __device__ constexpr int lq_copy_bytes() {
    return NB % 4 == 0 ? 16 : NB % 2 == 0 ? 8 : 4;
}

// How one warp stages a chunk's K and V row slices (lq_stage_chunk): copy k of a lane
// takes piece (32k + lane) % PIECES of cell (32k + lane) / PIECES, the same in every
// chunk, so its offsets are computed once.
template <int NB, int CH>
struct lq_stage_plan {
    static constexpr int CB     = lq_copy_bytes<NB>();
    static constexpr int ROW    = NB*(int) sizeof(block_lq2); // bytes of a cell's slice
    static constexpr int PIECES = ROW/CB;                    // copies per cell
    static constexpr int ITER   = (CH*PIECES + WARP_SIZE - 1)/WARP_SIZE;
    static constexpr int WORDS  = CH*ROW/4;                  // 32-bit words of one buffer
    uint32_t off[ITER]; // bytes from the chunk's first row: (cell - c0)*nb1 + piece*CB
    uint32_t dst;   // shared address of copy 0 into buffer 0 of K (s_kv: [K|V][2][WORDS])

    __device__ __forceinline__ lq_stage_plan(const int64_t nb1, const uint32_t * s_kv) {
        const int lane = threadIdx.x % WARP_SIZE;
#pragma unroll
        for (int k = 0; k < ITER; ++k) {
            const int i = k*WARP_SIZE + lane;
            // (used only for whole chunks, where nb1*CH fits in an int; 0 past the copies)
            off[k] = i < CH*PIECES ? (uint32_t) ((i/PIECES)*(int) nb1 + (i % PIECES)*CB) : 0u;
        }
        dst = (uint32_t) __cvta_generic_to_shared(s_kv) + lane*CB;
    }
};

// One asynchronous copy of CB bytes from global to shared memory (16: bypassing L1).
template <int CB>
static __device__ __forceinline__ void lq_cp_async(const uint32_t dst, const char * src) {
    if constexpr (CB == 16) {
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" : : "r"(dst), "l"(src));
    } else {
        asm volatile("cp.async.ca.shared.global [%0], [%1], %2;" : : "r"(dst), "l"(src), "n"(CB));
    }
}

// One warp stages the K and V row slices of CH cells from c0 (cells past w1 repeat
// the last) into buffer buf of shared memory, without waiting: cp.async. kc and vc
// point at cell c0's rows. Whole chunks (lq_stage_whole) take the plan's offsets;
// otherwise, as for the last, partial chunk, the offsets are computed here.
template <int NB, int CH>
static __device__ __forceinline__ void lq_stage_chunk(const lq_stage_plan<NB, CH> & plan, const int buf,
        const char * __restrict__ kc, const char * __restrict__ vc, const int64_t k_nb1, const int64_t v_nb1,
        const bool whole, const int n_left) {
    using PL = lq_stage_plan<NB, CH>;
    constexpr int CB = PL::CB;
    constexpr int N  = CH*PL::PIECES;
    const uint32_t dk = plan.dst + buf*PL::WORDS*4;
    const uint32_t dv = dk + 2*PL::WORDS*4;
    if (whole) {
#pragma unroll
        for (int k = 0; k < PL::ITER; ++k) {
            if (N % WARP_SIZE != 0 && k*WARP_SIZE + (int) (threadIdx.x % WARP_SIZE) >= N) {
                break;
            }
            lq_cp_async<CB>(dk + k*WARP_SIZE*CB, kc + plan.off[k]);
            lq_cp_async<CB>(dv + k*WARP_SIZE*CB, vc + plan.off[k]);
        }
    } else {
#pragma unroll
        for (int k = 0; k < PL::ITER; ++k) {
            const int i = k*WARP_SIZE + (int) (threadIdx.x % WARP_SIZE);
            if (N % WARP_SIZE != 0 && i >= N) {
                break;
            }
            const int64_t cell = min(i/PL::PIECES, n_left - 1);
            const int     off  = (i % PL::PIECES)*CB;
            lq_cp_async<CB>(dk + k*WARP_SIZE*CB, kc + cell*k_nb1 + off);
            lq_cp_async<CB>(dv + k*WARP_SIZE*CB, vc + cell*v_nb1 + off);
        }
    }
    asm volatile("cp.async.commit_group;");
}

// Whether the chunk of CH cells from c0 takes the staging plan's offsets: whole, and K
// and V rows with one stride (always, in llama.cpp's cache).
template <int CH>
static __device__ __forceinline__ bool lq_stage_whole(const lq_attn_params & P, const int c0, const int w1) {
    return c0 + CH <= w1 && P.k_nb1 == P.v_nb1 && P.k_nb1 <= INT32_MAX/CH;
}

// The rows of KV head ikv of stream z in the store's K (v = false) or V.
static __device__ __forceinline__ const char * lq_store_rows(const lq_attn_params & P, const bool v, const int ikv,
        const int z) {
    return v ? P.v + (int64_t) ikv*P.v_nb2 + (int64_t) z*P.v_nb3 : P.k + (int64_t) ikv*P.k_nb2 + (int64_t) z*P.k_nb3;
}

// Grouped blocks (GR): the block's LQ_WARPS warps take LQ_WARPS consecutive KV heads of
// one stream over the same cells, and stage each chunk together: the heads' slices of a
// cell are contiguous (LQ_WARPS*NB*20 bytes of its row), so the block copies whole
// 16-byte pieces of consecutive rows where a warp of its own would copy 8-byte pieces
// of 40-byte slices 320 bytes apart (Llama 3 8B) - at 8 wavefronts per copy, and at a
// fraction of the memory's speed (staging alone ran at 1.7 TB/s). Row words of a cell
// in the shared buffer: padded to 4 mod 8, so that the 8 rows a K-code load reads start
// in distinct groups of 4 banks.
template <int D>
static __host__ __device__ constexpr int lq_group_row_words() {
    int w = LQ_WARPS*(D/QK_LQ2)*5;
    while (w % 8 != 4) {
        ++w;
    }
    return w;
}

// Where each thread's 16-byte copies of a grouped chunk go: copy k of thread i takes
// piece (k*LQ_THREADS + i) % PIECES of cell (k*LQ_THREADS + i) / PIECES.
template <int D>
struct lq_group_plan {
    static constexpr int NB     = D/QK_LQ2;
    static constexpr int CH     = lq_chunk<D>();
    static constexpr int SW     = lq_group_row_words<D>();
    static constexpr int PIECES = LQ_WARPS*NB*(int) sizeof(block_lq2)/16; // per cell
    static constexpr int N      = CH*PIECES;
    static constexpr int ITER   = (N + LQ_THREADS - 1)/LQ_THREADS;
    uint32_t goff[ITER]; // bytes from the chunk's first row (whole chunks)
    uint32_t soff[ITER]; // bytes from the buffer's start

    __device__ __forceinline__ lq_group_plan(const int64_t nb1) {
#pragma unroll
        for (int k = 0; k < ITER; ++k) {
            const int i = k*LQ_THREADS + (int) threadIdx.x;
            goff[k] = i < N ? (uint32_t) ((i/PIECES)*(int) nb1 + (i % PIECES)*16) : 0u;
            soff[k] = i < N ? (uint32_t) ((i/PIECES)*SW*4 + (i % PIECES)*16) : 0u;
        }
    }
};

// The block stages the K and V slices of its heads for CH cells from kc, vc (cells past
// n_left repeat the last) into the shared buffers at dk, dv; one cp.async group.
template <int D>
static __device__ __forceinline__ void lq_group_stage(const lq_group_plan<D> & plan, const uint32_t dk,
        const uint32_t dv, const char * __restrict__ kc, const char * __restrict__ vc, const int64_t k_nb1,
        const int64_t v_nb1, const bool whole, const int n_left) {
    using PL = lq_group_plan<D>;
#pragma unroll
    for (int k = 0; k < PL::ITER; ++k) {
        const int i = k*LQ_THREADS + (int) threadIdx.x;
        if (PL::N % LQ_THREADS != 0 && i >= PL::N) {
            break;
        }
        if (whole) {
            lq_cp_async<16>(dk + plan.soff[k], kc + plan.goff[k]);
            lq_cp_async<16>(dv + plan.soff[k], vc + plan.goff[k]);
        } else {
            const int64_t cell = min(i/PL::PIECES, n_left - 1);
            const int     off  = (i % PL::PIECES)*16;
            lq_cp_async<16>(dk + plan.soff[k], kc + cell*k_nb1 + off);
            lq_cp_async<16>(dv + plan.soff[k], vc + cell*v_nb1 + off);
        }
    }
    asm volatile("cp.async.commit_group;");
}

// Stage a warp's first chunk of store cells [w0, w1) into buffer 0 (lq_store_tier
// stages the rest).
template <int D>
static __device__ __forceinline__ void lq_store_stage_first(const lq_attn_params & P, const int w0, const int w1,
        const int z, const int ikv, uint32_t (*s_kv)[2][lq_chunk<D>()*D/QK_LQ2*5]) {
    constexpr int NB = D/QK_LQ2;
    constexpr int CH = lq_chunk<D>();
    if (w0 < w1) {
        const lq_stage_plan<NB, CH> plan(P.k_nb1, &s_kv[0][0][0]);
        lq_stage_chunk<NB, CH>(plan, 0, lq_store_rows(P, false, ikv, z) + (int64_t) w0*P.k_nb1,
            lq_store_rows(P, true, ikv, z) + (int64_t) w0*P.v_nb1, P.k_nb1, P.v_nb1,
            lq_stage_whole<CH>(P, w0, w1), w1 - w0);
    }
}

// The same for a grouped block (all its threads; ikv0: the group's first head).
template <int D>
static __device__ __forceinline__ void lq_group_stage_first(const lq_attn_params & P, const int w0, const int w1,
        const int z, const int ikv0, uint32_t * s_kvf) {
    constexpr int CH = lq_chunk<D>();
    constexpr int BW = CH*lq_group_row_words<D>();
    if (w0 < w1) {
        const lq_group_plan<D> plan(P.k_nb1);
        const uint32_t dk = (uint32_t) __cvta_generic_to_shared(s_kvf);
        lq_group_stage<D>(plan, dk, dk + 2*BW*4, lq_store_rows(P, false, ikv0, z) + (int64_t) w0*P.k_nb1,
            lq_store_rows(P, true, ikv0, z) + (int64_t) w0*P.v_nb1, P.k_nb1, P.v_nb1,
            lq_stage_whole<CH>(P, w0, w1), w1 - w0);
    }
}

// The store tier of one warp on tensor cores: cells [w0, w1) of this block (which
// starts at b0), lq_chunk() at a time, each chunk's rows staged in shared memory (s_kv:
// two buffers of K and V slices) while the one before is computed; its partial result
// is number p. The lane (g, t) = (lane/4, lane%4) holds the queries 2t and
// 2t+1 of the tile: their running max M and sum S, O = the output elements 64b + 8g + j
// of block b (in the mma layout: tile 4b + j/2, register 2*(j%2) + query), and Om =
// sum(p*minimum) per block over its own cells. PLAIN: the mask is the bitmap alone and
// there is no softcap (lq_attn_partial's plain case). GR: a grouped block (above): the
// block stages each chunk, kv is the warp's view of the block's buffers.
template <int D, int QT, bool PLAIN, bool GR>
static __device__ __forceinline__ void lq_store_tier(const lq_attn_params & P, const int w0, const int w1, const int b0,
        const int z, const int ikv, const int qt, const int8_t (*s_qi8)[D], const float (*s_qd)[D/QK_LQ2],
        const float (*s_qs)[D/QK_LQ2], const uint32_t * s_skip, uint32_t * kv, const int p) {
    constexpr int NB = D/QK_LQ2;
    constexpr int RW = NB*5; // 32-bit words of a cell's slice
    constexpr int CH = lq_chunk<D>();
    constexpr int NT = CH/16;
    constexpr int SW = GR ? lq_group_row_words<D>() : RW; // words from a cell's row to the next in a buffer
    constexpr int BW = CH*SW;                              // words of a buffer; K's two, then V's
    // Half columns: a tile of at most 4 queries (a decode step of GQA up to 4) fills
    // half the 8 columns of the products, and lanes t = 2, 3 would spend the softmax on
    // empty ones. Instead tile 1's products use columns 4..7 (the query's B operand
    // moved there, tile 0's kept in 0..3), so its scores land in lanes t = 2, 3: every
    // lane does the softmax of one tile's cells; the value products of the two tiles
    // sum into columns 0..3 and 4..7 of O, added up at the end.
    constexpr bool HALF = QT <= 4 && NT == 2;
    constexpr int  NE   = HALF ? 1 : NT; // tiles whose scores a lane holds
    constexpr int  NQB  = HALF ? 2 : 1;  // B operand variants of the query
    const int lane = threadIdx.x % WARP_SIZE;
    const int g = lane / 4;
    const int t = lane % 4;
    const int GN = P.G*P.N;
    const int uo = HALF ? t / 2 : 0;        // HALF: the tile whose scores this lane holds
    const int cq = HALF ? 2*(t % 2) : 2*t;  // the lane's first query column

    float M[2] = {-INFINITY, -INFINITY};
    float S[2] = {0.0f, 0.0f};
    float O[D/16][4];
    float Om[NB][2];
#pragma unroll
    for (int mt = 0; mt < D/16; ++mt) {
        O[mt][0] = O[mt][1] = O[mt][2] = O[mt][3] = 0.0f;
    }
#pragma unroll
    for (int b = 0; b < NB; ++b) {
        Om[b][0] = Om[b][1] = 0.0f;
    }

    // B operands of the score products (column g; HALF: query g % 4 in variant g / 4,
    // zero in the other): in k-step ks of block b, rows 4t..4t+3 are values
    // 16t + 4i + 2ks, rows 16 + 4t.. the values after them: the order in which the
    // AND-and-shift of a code word yields them (below).
    int qb[NQB][NB][2][2];
#pragma unroll
    for (int v = 0; v < NQB; ++v) {
        const int  col = HALF ? g % 4 : g;
        const bool on  = !HALF || g / 4 == v;
#pragma unroll
        for (int b = 0; b < NB; ++b) {
#pragma unroll
            for (int ks = 0; ks < 2; ++ks) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    uint32_t w = 0;
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        w |= (uint32_t) (uint8_t) s_qi8[col][b*QK_LQ2 + 16*t + 4*i + 2*ks + h] << 8*i;
                    }
                    qb[v][b][ks][h] = on ? (int) w : 0;
                }
            }
        }
    }
    // this lane's two queries
    float qd[NB][2], qs[NB][2];
    const half * mrow[2];
    float slope[2];
    bool qok[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
        const int col = cq + e;
        const int qi  = qt*QT + col;
        qok[e] = col < QT && qi < GN;
        const lq_query q = lq_query_of(P, ikv, z, qok[e] ? qi : 0);
        mrow[e]  = q.mrow;
        slope[e] = q.slope;
#pragma unroll
        for (int b = 0; b < NB; ++b) {
            qd[b][e] = s_qd[col][b];
            qs[b][e] = s_qs[col][b];
        }
    }

    const char * kbase = lq_store_rows(P, false, GR ? ikv/LQ_WARPS*LQ_WARPS : ikv, z);
    const char * vbase = lq_store_rows(P, true,  GR ? ikv/LQ_WARPS*LQ_WARPS : ikv, z);
    const lq_stage_plan<NB, CH> plan(P.k_nb1, kv); // (unused by GR)
    const lq_group_plan<D> gplan(P.k_nb1);         // (GR only)
    const uint32_t gk = GR ? (uint32_t) __cvta_generic_to_shared(kv - (ikv % LQ_WARPS)*RW) : 0u; // the block's K buffer 0
    // the chunk row of the lane's score cells: element tile ue, row s
    auto row_of = [&](const int ue, const int s) {
        return 16*(HALF ? uo : ue) + g + 8*s;
    };

    // the mask of the lane's score cells, loaded one chunk ahead (it is not staged)
    auto load_mask = [&](const int c0, float (&mv)[NE][2][2]) {
#pragma unroll
        for (int ue = 0; ue < NE; ++ue) {
#pragma unroll
            for (int s = 0; s < 2; ++s) {
                const int cell = c0 + row_of(ue, s);
                const int r = cell - b0;
                const bool ok = cell < w1 && !((s_skip[r/32] >> (r%32)) & 1);
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    mv[ue][s][e] = ok && qok[e] ? slope[e]*__half2float(mrow[e][cell]) : -INFINITY;
                }
            }
        }
    };

    float mv_next[NE][2][2];
    if (w0 < w1) { // (chunk 0 was staged by lq_store_stage_first or lq_group_stage_first)
        if constexpr (!PLAIN) {
            load_mask(w0, mv_next);
        }
    }
    for (int c0 = w0, it = 0; c0 < w1; c0 += CH, ++it) {
        const int buf = it % 2;
        float mv[NE][2][2];
        if constexpr (PLAIN) {
            // the chunk's cells are one aligned half or whole word of the bitmap, which
            // also holds the masked cells and those past w1
            const uint32_t r    = c0 - b0;
            const uint32_t dead = s_skip[r/32] >> (r % 32 + 16*uo + g);
#pragma unroll
            for (int ue = 0; ue < NE; ++ue) {
#pragma unroll
                for (int s = 0; s < 2; ++s) {
                    const float m = dead & (1u << (16*(HALF ? 0 : ue) + 8*s)) ? -INFINITY : 0.0f;
                    mv[ue][s][0] = m;
                    mv[ue][s][1] = m;
                }
            }
        } else {
#pragma unroll
            for (int ue = 0; ue < NE; ++ue) {
#pragma unroll
                for (int s = 0; s < 2; ++s) {
                    mv[ue][s][0] = mv_next[ue][s][0];
                    mv[ue][s][1] = mv_next[ue][s][1];
                }
            }
        }
        if constexpr (GR) {
            // this chunk's copies (all threads') landed, and every warp is done with the
            // buffer the next goes into
            asm volatile("cp.async.wait_group 0;" ::: "memory");
            __syncthreads();
            if (c0 + CH < w1) {
                lq_group_stage<D>(gplan, gk + (1 - buf)*BW*4, gk + (2 + 1 - buf)*BW*4,
                    kbase + (int64_t) (c0 + CH)*P.k_nb1, vbase + (int64_t) (c0 + CH)*P.v_nb1, P.k_nb1, P.v_nb1,
                    lq_stage_whole<CH>(P, c0 + CH, w1), w1 - (c0 + CH));
                if constexpr (!PLAIN) {
                    load_mask(c0 + CH, mv_next);
                }
            }
        } else {
            if (c0 + CH < w1) {
                lq_stage_chunk<NB, CH>(plan, 1 - buf, kbase + (int64_t) (c0 + CH)*P.k_nb1, vbase + (int64_t) (c0 + CH)*P.v_nb1,
                    P.k_nb1, P.v_nb1, lq_stage_whole<CH>(P, c0 + CH, w1), w1 - (c0 + CH));
                if constexpr (!PLAIN) {
                    load_mask(c0 + CH, mv_next);
                }
                asm volatile("cp.async.wait_group 1;" ::: "memory");
            } else {
                asm volatile("cp.async.wait_group 0;" ::: "memory");
            }
            __syncwarp();
        }
        const uint32_t * sk = kv + buf*BW;
        const uint32_t * sv = kv + (2 + buf)*BW;
        const uint16_t * sv16 = (const uint16_t *) sv;

        // scores: cells row_of(ue, s), queries cq + e
        float sc[NE][2][2];
#pragma unroll
        for (int ue = 0; ue < NE; ++ue) {
            float x[2][2];
#pragma unroll
            for (int b = 0; b < NB; ++b) {
                int si[4] = {0, 0, 0, 0};
#pragma unroll
                for (int u = HALF ? 0 : ue; u < (HALF ? NT : ue + 1); ++u) {
                    const uint32_t w0r = sk[(16*u + g)*SW + 5*b + 1 + t];
                    const uint32_t w1r = sk[(16*u + g + 8)*SW + 5*b + 1 + t];
                    const int v = HALF ? u : 0;
                    lq_mma_u8s8(si, w0r & 0x03030303u, w1r & 0x03030303u, (w0r >> 2) & 0x03030303u,
                        (w1r >> 2) & 0x03030303u, qb[v][b][0][0], qb[v][b][0][1]);
                    lq_mma_u8s8(si, (w0r >> 4) & 0x03030303u, (w1r >> 4) & 0x03030303u, (w0r >> 6) & 0x03030303u,
                        (w1r >> 6) & 0x03030303u, qb[v][b][1][0], qb[v][b][1][1]);
                }
#pragma unroll
                for (int s = 0; s < 2; ++s) {
                    const uint32_t dmw = sk[row_of(ue, s)*SW + 5*b];
                    const float2 dm = __half22float2(*(const half2 *) &dmw);
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const float y = dm.x*qd[b][e]*(float) si[2*s + e] + dm.y*qs[b][e];
                        x[s][e] = b == 0 ? y : x[s][e] + y;
                    }
                }
            }
            if (P.kbc != nullptr) {
                lq_scores_by_channel<D>(P, z, ikv, c0, w1, row_of(ue, 0), cq, s_qi8, qd, x);
            }
#pragma unroll
            for (int s = 0; s < 2; ++s) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float y = x[s][e]*P.scale;
                    if (!PLAIN && P.softcap != 0.0f) {
                        y = P.softcap*tanhf(y);
                    }
                    sc[ue][s][e] = mv[ue][s][e] == -INFINITY ? -INFINITY : mv[ue][s][e] + y;
                }
            }
        }

        // online softmax, per query over the chunk's cells (lanes g; HALF: and t, t ^ 2)
        float Mn[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            float mx = -INFINITY;
#pragma unroll
            for (int ue = 0; ue < NE; ++ue) {
                mx = fmaxf(mx, fmaxf(sc[ue][0][e], sc[ue][1][e]));
            }
#pragma unroll
            for (int off = HALF ? 2 : 4; off < WARP_SIZE; off *= 2) {
                if (off != 2 || HALF) {
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, off, WARP_SIZE));
                }
            }
            Mn[e] = fmaxf(M[e], mx);
        }
        // rescale only when a maximum grew somewhere in the warp (rare once the first
        // chunks are in: the accumulators are most of the arithmetic of a chunk)
        if (__any_sync(0xffffffff, Mn[0] != M[0] || Mn[1] != M[1])) {
            float alpha[2];
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                alpha[e] = Mn[e] == M[e] ? 1.0f : expf(M[e] - Mn[e]);
                M[e] = Mn[e];
                S[e] *= alpha[e];
#pragma unroll
                for (int b = 0; b < NB; ++b) {
                    Om[b][e] *= alpha[e];
                }
            }
#pragma unroll
            for (int mt = 0; mt < D/16; ++mt) {
                O[mt][0] *= alpha[0];
                O[mt][1] *= alpha[1];
                O[mt][2] *= alpha[0];
                O[mt][3] *= alpha[1];
            }
        }
        float p[NE][2][2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
#pragma unroll
            for (int ue = 0; ue < NE; ++ue) {
#pragma unroll
                for (int s = 0; s < 2; ++s) {
                    p[ue][s][e] = M[e] == -INFINITY ? 0.0f : expf(sc[ue][s][e] - M[e]);
                    S[e] += p[ue][s][e];
                }
            }
        }
        // p*step of the lane's cells (rows g, g + 8 of its tile, columns cq, cq + 1) as
        // f16 pairs, and sum(p*minimum) per block
        uint32_t pk[NE][2][NB];
#pragma unroll
        for (int ue = 0; ue < NE; ++ue) {
#pragma unroll
            for (int s = 0; s < 2; ++s) {
                // a cell masked for both queries never meets its step or minimum (one
                // never written may hold anything; 0*NaN is NaN); a cell some query
                // sees was written
                const bool dead = mv[ue][s][0] == -INFINITY && mv[ue][s][1] == -INFINITY;
#pragma unroll
                for (int b = 0; b < NB; ++b) {
                    const uint32_t dmw = sv[row_of(ue, s)*SW + 5*b];
                    float2 dm = __half22float2(*(const half2 *) &dmw);
                    if (dead) {
                        dm = make_float2(0.0f, 0.0f);
                    }
                    Om[b][0] += p[ue][s][0]*dm.y;
                    Om[b][1] += p[ue][s][1]*dm.y;
                    pk[ue][s][b] = lq_pack_half2(p[ue][s][0]*dm.x, p[ue][s][1]*dm.x);
                }
            }
        }

        // values: the V codes of cells 2t, 2t+1, 2t+8, 2t+9 of a tile (the k of the
        // product), 8 of each: bytes 2g, 2g+1 of a block's codes; B = p*step of the
        // tile's cells (HALF: of the lanes holding that tile, zero elsewhere)
#pragma unroll
        for (int u = 0; u < NT; ++u) {
#pragma unroll
            for (int b = 0; b < NB; ++b) {
                uint32_t pb[2];
#pragma unroll
                for (int s = 0; s < 2; ++s) {
                    pb[s] = lq_transpose8x8(HALF ? (uo == u ? pk[0][s][b] : 0u) : pk[HALF ? 0 : u][s][b]);
                }
                const uint16_t * cv = sv16 + (16*u + 2*t)*2*SW + 10*b + 2 + g;
                const uint32_t x0 = __byte_perm(cv[0], cv[2*SW], 0x5410);               // cells 2t, 2t+1
                const uint32_t x1 = __byte_perm(cv[8*2*SW], cv[9*2*SW], 0x5410);        // cells 2t+8, 2t+9
                const uint32_t x0h = x0 >> 10;
                const uint32_t x1h = x1 >> 10;
                lq_mma_f16(O[4*b + 0], lq_v_operand<0>(x0, x0h), lq_v_operand<1>(x0, x0h), lq_v_operand<0>(x1, x1h), lq_v_operand<1>(x1, x1h), pb[0], pb[1]);
                lq_mma_f16(O[4*b + 1], lq_v_operand<2>(x0, x0h), lq_v_operand<3>(x0, x0h), lq_v_operand<2>(x1, x1h), lq_v_operand<3>(x1, x1h), pb[0], pb[1]);
                lq_mma_f16(O[4*b + 2], lq_v_operand<4>(x0, x0h), lq_v_operand<5>(x0, x0h), lq_v_operand<4>(x1, x1h), lq_v_operand<5>(x1, x1h), pb[0], pb[1]);
                lq_mma_f16(O[4*b + 3], lq_v_operand<6>(x0, x0h), lq_v_operand<7>(x0, x0h), lq_v_operand<6>(x1, x1h), lq_v_operand<7>(x1, x1h), pb[0], pb[1]);
            }
        }
        if constexpr (!GR) {
            __syncwarp(); // the next iteration stages into this buffer
        }
    }

    if constexpr (HALF) {
        // tile 1's share of each query sits in columns 4..7 (lanes t = 2, 3)
#pragma unroll
        for (int mt = 0; mt < D/16; ++mt) {
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                O[mt][r] += __shfl_xor_sync(0xffffffff, O[mt][r], 2, WARP_SIZE);
            }
        }
    }
#pragma unroll
    for (int e = 0; e < 2; ++e) {
        // the sums over the lanes that share a query (g; HALF: and t, t ^ 2)
        float Se = S[e];
        float Ome[NB];
#pragma unroll
        for (int b = 0; b < NB; ++b) {
            Ome[b] = Om[b][e];
        }
#pragma unroll
        for (int off = HALF ? 2 : 4; off < WARP_SIZE; off *= 2) {
            Se += __shfl_xor_sync(0xffffffff, Se, off, WARP_SIZE);
#pragma unroll
            for (int b = 0; b < NB; ++b) {
                Ome[b] += __shfl_xor_sync(0xffffffff, Ome[b], off, WARP_SIZE);
            }
        }
        const int col = cq + e;
        if ((HALF && t >= 2) || col >= QT || qt*QT + col >= GN) {
            continue;
        }
        float * dstp = lq_part_open<D, QT>(P, z, ikv, qt, col, p, g == 0, M[e], Se);
#pragma unroll
        for (int b = 0; b < NB; ++b) {
            float o[8];
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                o[j] = O[4*b + j/2][2*(j%2) + e]*lq_v_unscale(j) + Ome[b];
            }
            float2 * dst2 = (float2 *) (dstp + 2 + b*QK_LQ2 + 8*g); // 2 + D is even: 8-byte aligned
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                dst2[j] = make_float2(o[2*j], o[2*j + 1]);
            }
        }
    }
}
#endif // AMPERE_MMA_AVAILABLE

template <int D, int QT, bool GR>
static __global__ void __launch_bounds__(LQ_THREADS, D == 256 ? 2 : 4) lq_attn_partial(const lq_attn_params P) {
#ifdef AMPERE_MMA_AVAILABLE
    constexpr int NB  = D/QK_LQ2;
    constexpr int CH  = lq_chunk<D>();
    constexpr int HG  = GR ? LQ_WARPS : 1; // KV heads per block
    constexpr int KVW = GR ? 4*CH*lq_group_row_words<D>() : LQ_WARPS*4*CH*NB*5; // staging words
    const int warp = threadIdx.x / WARP_SIZE;
    const int lane = threadIdx.x % WARP_SIZE;
    const int z    = blockIdx.z;
    const int n_hb = P.n_head_kv / HG;                 // blocks along the heads
    const int ikv  = (int) blockIdx.y % n_hb*HG + (GR ? warp : 0); // this warp's KV head
    const int qt   = blockIdx.y / n_hb;
    const int hw   = GR ? warp : 0;                    // its index in the per-head arrays
    const int GN   = P.G*P.N;
    // The overlay's slots go to blocks of their own (n_split_ov > 0: P.warp_slots per
    // warp, where they are few beside the store's blocks) or are shared by the store's
    // warps, each of which then leaves two partial results (cells at part, slots at
    // n_split*LQ_WARPS + part; grouped: n_split + part): where there would be many
    // overlay blocks, they would take GPU slots from the store's for the short time
    // they run and leave them idle after. Grouped, a warp is its head's only one in the
    // block, and the partials of a head are numbered by block.
    const int part = GR ? (int) blockIdx.x : blockIdx.x*LQ_WARPS + warp;

    __shared__ float  s_qf[HG][QT][D];         // the tiles' queries
    __shared__ int8_t s_qi8[HG][LQ_COLS][D];   // ... rounded to int8 per 64-value block (0 past the tile)
    __shared__ float  s_qd[HG][LQ_COLS][NB];   // int8 scale per block
    __shared__ float  s_qs[HG][LQ_COLS][NB];   // sum of the int8-rounded query per block
    __shared__ __align__(16) float s_p[LQ_WARPS][WARP_SIZE][QT]; // overlay: each slot's softmax weights
    __shared__ uint32_t s_skip[LQ_BLOCK_CELLS_MAX/32];
    __shared__ __align__(16) uint32_t s_kvf[KVW]; // K|V, two buffers: per warp, or the block's (GR)
    uint32_t * kv = GR ? s_kvf + warp*NB*5 : s_kvf + warp*4*CH*NB*5; // this warp's view

    const bool overlay_only = (int) blockIdx.x >= P.n_split;
    const int b0 = blockIdx.x*P.block_cells;
    const int b1 = min(P.n_kv, b0 + P.block_cells);
    const int per_warp = GR ? P.block_cells : P.block_cells / LQ_WARPS;
    const int w0 = GR ? b0 : b0 + warp*per_warp;
    const int w1 = min(b1, w0 + per_warp);
    if (!overlay_only) {
        // the first chunk's rows travel while the block gets ready
        if constexpr (GR) {
            lq_group_stage_first<D>(P, w0, w1, z, ikv - warp, s_kvf);
        } else {
            lq_store_stage_first<D>(P, w0, w1, z, ikv, (uint32_t (*)[2][CH*NB*5]) kv);
        }
        for (int w = threadIdx.x; w < LQ_BLOCK_CELLS_MAX/32; w += LQ_THREADS) {
            s_skip[w] = 0;
        }
        __syncthreads();
    }

    for (int idx = threadIdx.x; idx < HG*QT*D; idx += LQ_THREADS) {
        const int h  = idx / (QT*D);
        const int j  = idx / D % QT;
        const int d  = idx % D;
        const int qi = qt*QT + j;
        float x = 0.0f;
        if (qi < GN) {
            const lq_query q = lq_query_of(P, ikv - hw + h, z, qi);
            x = *(const float *) (P.q + (int64_t) d*sizeof(float) + q.t*P.q_nb1 + q.h*P.q_nb2 + z*P.q_nb3);
        }
        s_qf[h][j][d] = x;
    }

    // The store tier's plain case: every query of the tile has one mask row (one token:
    // a decode step) with only 0 and -inf in the block's cells, no ALiBi, no softcap.
    // The -inf cells and those past the block's end join the bitmap of the cells the
    // overlay holds, and the store tier reads no mask.
    bool plain = P.N == 1 && P.m_ne2 == 1 && P.max_bias == 0.0f && P.softcap == 0.0f;
    bool other = false;
    if (!overlay_only) {
        for (int sl0 = 0; sl0 < P.n_slots; sl0 += 4*LQ_THREADS) {
            int cs[4]; // four loads in flight, then the bits
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const int sl = sl0 + u*LQ_THREADS + threadIdx.x;
                cs[u] = sl < P.n_slots ? P.s2c[z*P.n_slots + sl] : -1;
            }
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                if (cs[u] >= b0 && cs[u] < b1) {
                    atomicOr(&s_skip[(cs[u] - b0)/32], 1u << ((cs[u] - b0) % 32));
                }
            }
        }
        if (plain) {
            const half * mrow = lq_query_of(P, ikv, z, 0).mrow;
            for (int r0 = 0; r0 < P.block_cells; r0 += 8*LQ_THREADS) {
                float m[8]; // eight loads in flight, then the bits
#pragma unroll
                for (int u = 0; u < 8; ++u) {
                    const int cell = b0 + r0 + u*LQ_THREADS + threadIdx.x;
                    m[u] = cell < b1 ? __half2float(mrow[cell]) : -INFINITY;
                }
#pragma unroll
                for (int u = 0; u < 8; ++u) {
                    const int r = r0 + u*LQ_THREADS + threadIdx.x;
                    if (m[u] == -INFINITY && r < P.block_cells) {
                        atomicOr(&s_skip[r/32], 1u << (r % 32));
                    }
                    other |= m[u] != -INFINITY && m[u] != 0.0f;
                }
            }
        }
    }
    // also the barrier for s_qf and s_skip: called by every thread whatever plain is
    // (inside `plain && ...` it would be skipped where plain starts false)
    const bool any_other = __syncthreads_or(other);
    plain = plain && !any_other;

    if (P.n_split_ov == 0 || overlay_only) {
        int s0, s1, p;
        if constexpr (GR) {
            const int per_ov = overlay_only ? P.warp_slots : (P.n_slots + P.n_split - 1) / P.n_split;
            s0 = min(P.n_slots, (overlay_only ? part - P.n_split : part)*per_ov);
            s1 = min(P.n_slots, s0 + per_ov);
            p  = overlay_only ? part : P.n_split + part;
        } else {
            const int n_warps     = P.n_split*LQ_WARPS;
            const int per_warp_ov = overlay_only ? P.warp_slots : (P.n_slots + n_warps - 1) / n_warps;
            s0 = min(P.n_slots, (overlay_only ? part - n_warps : part)*per_warp_ov);
            s1 = min(P.n_slots, s0 + per_warp_ov);
            p  = overlay_only ? part : n_warps + part;
        }
        lq_overlay_tier<D, QT>(P, s0, s1, z, ikv, qt, s_qf[hw], s_p[warp], p);
        if (overlay_only) {
            return;
        }
    }

    // int8 query, one warp per (head, column, block)
    for (int pair = warp; pair < HG*LQ_COLS*NB; pair += LQ_WARPS) {
        const int h = pair / (LQ_COLS*NB);
        const int j = pair / NB % LQ_COLS;
        const int b = pair % NB;
        const float x0 = j < QT ? s_qf[h][j][b*QK_LQ2 + 2*lane]     : 0.0f;
        const float x1 = j < QT ? s_qf[h][j][b*QK_LQ2 + 2*lane + 1] : 0.0f;
        const float amax = warp_reduce_max(fmaxf(fabsf(x0), fabsf(x1)));
        const float dq = amax / 127.0f;
        const float iq = dq > 0.0f ? 1.0f/dq : 0.0f;
        const int q0 = __float2int_rn(x0*iq);
        const int q1 = __float2int_rn(x1*iq);
        const int sum = warp_reduce_sum(q0 + q1);
        s_qi8[h][j][b*QK_LQ2 + 2*lane]     = (int8_t) q0;
        s_qi8[h][j][b*QK_LQ2 + 2*lane + 1] = (int8_t) q1;
        if (lane == 0) {
            s_qd[h][j][b] = dq;
            s_qs[h][j][b] = dq*(float) sum;
        }
    }
    __syncthreads();

    // (two loops: one with both kinds of mask spent registers and instructions on both)
    if (plain) {
        lq_store_tier<D, QT, true, GR>(P, w0, w1, b0, z, ikv, qt, s_qi8[hw], s_qd[hw], s_qs[hw], s_skip, kv, part);
    } else {
        lq_store_tier<D, QT, false, GR>(P, w0, w1, b0, z, ikv, qt, s_qi8[hw], s_qd[hw], s_qs[hw], s_skip, kv, part);
    }
#else
    GGML_UNUSED(P);
    NO_DEVICE_CODE;
#endif // AMPERE_MMA_AVAILABLE
}

// One block per query: the log-sum-exp merge of the partial results, written as flash
// attention writes its result. LQ_COMBINE_THREADS threads: (part group g, element d);
// each group sums every PG-th partial, many loads in flight at once (a serial loop
// over the partials would wait on memory once per partial).
#define LQ_COMBINE_THREADS 256
template <int D>
static __global__ void __launch_bounds__(LQ_COMBINE_THREADS) lq_attn_combine(const float * __restrict__ part,
        float * __restrict__ dst, const int n_parts, const int n_head_kv, const int n_q_per_kv, const int G, const int N,
        const int n_head) {
    constexpr int PG = LQ_COMBINE_THREADS / D;
    extern __shared__ float s_w[]; // [n_parts]: each partial's weight exp(M_p - M)
    __shared__ float s_red[LQ_COMBINE_THREADS/WARP_SIZE];
    __shared__ float s_o[PG][D];
    const int qi  = blockIdx.x;
    const int ikv = blockIdx.y;
    const int z   = blockIdx.z;
    if (qi >= G*N) {
        return;
    }
    const int tid  = threadIdx.x;
    const int lane = tid % WARP_SIZE;
    const int warp = tid / WARP_SIZE;
    const int d    = tid % D;
    const int g    = tid / D;
    const float * pp = part + ((int64_t) (z*n_head_kv + ikv)*n_q_per_kv + qi)*n_parts*(2 + D);

    float m = -INFINITY;
    for (int p = tid; p < n_parts; p += LQ_COMBINE_THREADS) {
        m = fmaxf(m, pp[(int64_t) p*(2 + D)]);
    }
    m = warp_reduce_max(m);
    if (lane == 0) {
        s_red[warp] = m;
    }
    __syncthreads();
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < LQ_COMBINE_THREADS/WARP_SIZE; ++w) {
        M = fmaxf(M, s_red[w]);
    }
    __syncthreads();

    float s = 0.0f;
    for (int p = tid; p < n_parts; p += LQ_COMBINE_THREADS) {
        const float Mp = pp[(int64_t) p*(2 + D)];
        const float w  = M == -INFINITY || Mp == -INFINITY ? 0.0f : expf(Mp - M);
        s_w[p] = w;
        s += w*pp[(int64_t) p*(2 + D) + 1];
    }
    s = warp_reduce_sum(s);
    if (lane == 0) {
        s_red[warp] = s;
    }
    __syncthreads();
    float S = 0.0f;
#pragma unroll
    for (int w = 0; w < LQ_COMBINE_THREADS/WARP_SIZE; ++w) {
        S += s_red[w];
    }

    float o = 0.0f;
#pragma unroll 16
    for (int p = g; p < n_parts; p += PG) {
        o += s_w[p]*pp[(int64_t) p*(2 + D) + 2 + d];
    }
    s_o[g][d] = o;
    __syncthreads();
    if (g == 0) {
#pragma unroll
        for (int k = 1; k < PG; ++k) {
            o += s_o[k][d];
        }
        const int t = qi / G;
        const int h = ikv*G + qi % G;
        dst[(((int64_t) z*N + t)*n_head + h)*D + d] = S > 0.0f ? o/S : 0.0f;
    }
}

// Whether the grouped blocks (lq_group_plan) can take this op: LQ_WARPS heads per
// block, their slices contiguous and 16-byte aligned, and shared memory for LQ_WARPS
// heads' queries (head size 128 or less, 4 queries or fewer per tile).
template <int D, int QT>
static bool lq_attn_grouped(const lq_attn_params & P) {
    constexpr int SLICE = D/QK_LQ2*(int) sizeof(block_lq2);
    auto a16 = [](const void * p, const int64_t nb1, const int64_t nb3) {
        return (uintptr_t) p % 16 == 0 && nb1 % 16 == 0 && nb3 % 16 == 0;
    };
    return D <= 128 && QT <= 4 && P.n_head_kv % LQ_WARPS == 0 && P.k_nb2 == SLICE && P.v_nb2 == SLICE &&
        a16(P.k, P.k_nb1, P.k_nb3) && a16(P.v, P.v_nb1, P.v_nb3);
}

// Overlay slots per warp in overlay blocks: LQ_WARP_SLOTS, or LOGQUANT_CUDA_WARP_SLOTS
// (8..256, a multiple of 8) to measure another split (fewer slots per warp: more, shorter
// overlay warps beside the store's, more partials to merge).
static int lq_warp_slots() {
    static const int n = [] {
        const char * env = getenv("LOGQUANT_CUDA_WARP_SLOTS");
        const int v = env != nullptr ? atoi(env) : 0;
        return v >= 8 && v <= 256 && v % 8 == 0 ? v : LQ_WARP_SLOTS;
    }();
    return n;
}

// Blocks of lq_attn_partial<D, QT, GR> that fit on the device at once (one wave),
// from the occupancy API, asked once per device and layout.
template <int D, int QT, bool GR>
static int lq_resident_blocks(const int device) {
    static int per_sm[GGML_CUDA_MAX_DEVICES] = {};
    if (per_sm[device] == 0) {
        CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm[device], lq_attn_partial<D, QT, GR>, LQ_THREADS, 0));
        per_sm[device] = std::max(1, per_sm[device]);
    }
    return per_sm[device]*ggml_cuda_info().devices[device].nsm;
}

template <int D, int QT, bool GR>
static void lq_attn_launch(ggml_backend_cuda_context & ctx, lq_attn_params P, const int n_stream, float * dst) {
    // One wave: as many blocks along the cells as fit on the GPU at once (a decode step
    // is short: a partial second wave costs about what the first does), at most
    // LQ_BLOCK_CELLS_MAX cells each, at least LQ_WARP_CELLS_MIN cells per warp (fewer
    // make the partials cost more than the cells).
    constexpr int HG = GR ? LQ_WARPS : 1; // KV heads per block
    constexpr int WB = LQ_WARPS / HG;     // warps per head in a block
    const int resident  = lq_resident_blocks<D, QT, GR>(ctx.device);
    const int base      = P.n_head_kv/HG*P.n_qtiles*n_stream;
    const int min_split = (P.n_kv + LQ_BLOCK_CELLS_MAX - 1) / LQ_BLOCK_CELLS_MAX;
    const int max_split = std::max(1, P.n_kv / (WB*LQ_WARP_CELLS_MIN));
    // overlay blocks of their own where they are at most a quarter of the wave
    P.warp_slots = lq_warp_slots();
    const int ov_blocks = (P.n_slots + WB*P.warp_slots - 1) / (WB*P.warp_slots);
    P.n_split_ov = 4*ov_blocks*base <= resident ? ov_blocks : 0;
    const int n_split   = std::max(min_split, std::min(max_split, (resident - P.n_split_ov*base) / base));
    // a whole number of bitmap words per warp (grouped: a warp takes the block's cells)
    constexpr int ALIGN = GR ? 32 : LQ_THREADS;
    int block_cells = (P.n_kv + n_split - 1) / n_split;
    block_cells = (block_cells + ALIGN - 1) / ALIGN * ALIGN;
    P.block_cells = block_cells;
    P.n_split     = (P.n_kv + block_cells - 1) / block_cells;

    const int n_q_per_kv = P.n_qtiles*QT;
    P.n_parts = (P.n_split_ov > 0 ? P.n_split + P.n_split_ov : 2*P.n_split)*WB;
    ggml_cuda_pool_alloc<float> part(ctx.pool(), (size_t) n_stream*P.n_head_kv*n_q_per_kv*P.n_parts*(2 + D));
    P.part = part.get();
    cudaStream_t stream = ctx.stream();
    const dim3 grid(P.n_split + P.n_split_ov, P.n_head_kv/HG*P.n_qtiles, n_stream);
    lq_attn_partial<D, QT, GR><<<grid, LQ_THREADS, 0, stream>>>(P);
    const dim3 grid_c(n_q_per_kv, P.n_head_kv, n_stream);
    lq_attn_combine<D><<<grid_c, LQ_COMBINE_THREADS, P.n_parts*sizeof(float), stream>>>(P.part, dst, P.n_parts, P.n_head_kv, n_q_per_kv, P.G, P.N, P.n_head);
    CUDA_CHECK(cudaGetLastError());
}

// Grouped blocks pay a block barrier per chunk and a prologue for 4 heads; they win
// where each warp has many chunks (measured on an H200: level at 32768 x 8, ~32 chunks
// per warp; ahead at 32768 x 32; behind at one sequence), so they take an op whose
// cells and heads give each of a full wave's warps at least LQ_GROUP_CHUNKS chunks.
// LOGQUANT_CUDA_GROUPED=1 takes them wherever they can run, =0 never (tests, profiling;
// read at each launch, as the tests switch it between cases).
#define LQ_GROUP_CHUNKS 32

template <int D, int QT>
static void lq_attn_launch(ggml_backend_cuda_context & ctx, lq_attn_params P, const int n_stream, float * dst) {
    if constexpr (D <= 128 && QT <= 4) {
        const int64_t warps = (int64_t) lq_resident_blocks<D, QT, true>(ctx.device)*LQ_WARPS;
        const int64_t work  = (int64_t) P.n_kv*P.n_head_kv*P.n_qtiles*n_stream; // cells times (head, tile)
        const char * force = getenv("LOGQUANT_CUDA_GROUPED");
        const bool by_shape = work >= warps*LQ_GROUP_CHUNKS*32; // (32: lq_chunk<D>() for D <= 128)
        if (lq_attn_grouped<D, QT>(P) && (force != nullptr && *force != '\0' ? *force == '1' : by_shape)) {
            lq_attn_launch<D, QT, true>(ctx, P, n_stream, dst);
            return;
        }
    }
    lq_attn_launch<D, QT, false>(ctx, P, n_stream, dst);
}

template <int D>
static void lq_attn_dispatch_qt(ggml_backend_cuda_context & ctx, lq_attn_params P, int QT, int n_stream, float * dst) {
    switch (QT) {
        case 1: lq_attn_launch<D, 1>(ctx, P, n_stream, dst); break;
        case 2: lq_attn_launch<D, 2>(ctx, P, n_stream, dst); break;
        case 4: lq_attn_launch<D, 4>(ctx, P, n_stream, dst); break;
        default: lq_attn_launch<D, 8>(ctx, P, n_stream, dst); break;
    }
}

// Prefill: many queries per stream. The kernel above takes them in tiles of 8 (N of the
// tensor-core products), and every tile reads all of the store again and scores it on
// integer products 8 columns wide: at 64 queries of a sequence and a GQA of 4 that is 32
// passes over the store per KV head. Here the streams' store is dequantized to f16 once,
// the overlay's rows are laid over the cells they hold (the same values the two tiers
// give: a held cell reads its f16 row, any other its store entry), and ggml's own
// flash attention (wide tensor-core tiles) runs over the result, with the same mask,
// scale, ALiBi and softcap. The f16 copy lives in the CUDA pool for the op's duration:
// streams go through it in groups of at most LQ_DENSE_SCRATCH bytes (one stream at
// least: 2 x 16 MiB per 1024 cells at 8 KV heads of 128).
#define LQ_DENSE_SCRATCH (size_t(256) << 20)

// LQ_DENSE_SCRATCH, or LOGQUANT_CUDA_DENSE_SCRATCH=BYTES (tests: 1 puts each stream in a
// group of its own; read at each launch).
static size_t lq_dense_scratch() {
    const char * env = getenv("LOGQUANT_CUDA_DENSE_SCRATCH");
    return env != nullptr && *env != '\0' ? (size_t) strtoull(env, nullptr, 10) : LQ_DENSE_SCRATCH;
}

// Queries per KV head (GQA x tokens per stream) from which the op runs the dense path;
// LOGQUANT_CUDA_DENSE_MIN=N to measure another (0: never; read at each launch, as the
// tests switch it between cases).
#define LQ_DENSE_MIN_QUERIES 64

static int lq_dense_min_queries() {
    const char * env = getenv("LOGQUANT_CUDA_DENSE_MIN");
    return env != nullptr && *env != '\0' ? atoi(env) : LQ_DENSE_MIN_QUERIES;
}

// Entry (cell, e) of KV head h's K store of one stream (rows: the stream's cells), as
// the CPU reads it: per token, block e/64 of the cell's row slice; in a group held by
// channel (by_channel), block h*D + e of the group's first row holds channel e of its
// 64 cells (ggml-lq2.h).
template <typename block>
static __device__ __forceinline__ float lq_dense_k(const char * __restrict__ k, const int64_t k_nb1,
        const int64_t k_nb2, const int h, const int cell, const int e, const int D, const bool by_channel) {
    if (by_channel) {
        const block * g = (const block *) (k + (int64_t) (cell - cell % QK_LQ2)*k_nb1) + (int64_t) h*D + e;
        return lq_value(*g, cell % QK_LQ2);
    }
    const block * x = (const block *) (k + h*k_nb2 + cell*k_nb1) + e/QK_LQ2;
    return lq_value(*x, e % QK_LQ2);
}

// Store [D, n_kv, H, streams] -> f16 [streams][H][n_kv][D], K (blockIdx.z = 0; lq2 or,
// with k_lq3, lq3; kbc: keys by channel, as lq_attn_params) and V (1, lq2): a warp per
// 64 values of a row, 2 values per lane (value = m + d*code).
static __global__ void lq_dense_dequantize(const char * __restrict__ k, const int64_t k_nb1, const int64_t k_nb2,
        const int64_t k_nb3, const bool k_lq3, const int32_t * __restrict__ kbc, const int kbc_n, const int z0,
        const char * __restrict__ v, const int64_t v_nb1, const int64_t v_nb2, const int64_t v_nb3,
        half * __restrict__ k16, half * __restrict__ v16, const int D, const int n_kv, const int H) {
    const int nb   = D/QK_LQ2;
    const int64_t w = ((int64_t) blockIdx.x*blockDim.x + threadIdx.x)/WARP_SIZE; // 64 values in (h, cell, b) order
    const int lane = threadIdx.x % WARP_SIZE;
    if (w >= (int64_t) H*n_kv*nb) {
        return;
    }
    const int b    = (int) (w % nb);
    const int cell = (int) ((w / nb) % n_kv);
    const int h    = (int) (w / ((int64_t) nb*n_kv));
    const int z    = blockIdx.y;
    const int e    = b*QK_LQ2 + 2*lane; // values e, e + 1 of the head's row
    float y0, y1;
    if (blockIdx.z == 1) {
        const block_lq2 * x = (const block_lq2 *) (v + z*v_nb3 + h*v_nb2 + cell*v_nb1) + b;
        y0 = lq_value(*x, 2*lane);
        y1 = lq_value(*x, 2*lane + 1);
    } else {
        const char * kz = k + z*k_nb3;
        const bool by_channel = kbc != nullptr && kbc[(int64_t) (z0 + z)*kbc_n + cell/QK_LQ2] != 0;
        if (k_lq3) {
            y0 = lq_dense_k<block_lq3>(kz, k_nb1, k_nb2, h, cell, e, D, by_channel);
            y1 = lq_dense_k<block_lq3>(kz, k_nb1, k_nb2, h, cell, e + 1, D, by_channel);
        } else {
            y0 = lq_dense_k<block_lq2>(kz, k_nb1, k_nb2, h, cell, e, D, by_channel);
            y1 = lq_dense_k<block_lq2>(kz, k_nb1, k_nb2, h, cell, e + 1, D, by_channel);
        }
    }
    half * out = (blockIdx.z == 1 ? v16 : k16) + (((int64_t) z*H + h)*n_kv + cell)*D + e;
    *(half2 *) out = __floats2half2_rn(y0, y1);
}

// The overlay's rows over the cells they hold: block (slot, stream).
static __global__ void lq_dense_overlay(const char * __restrict__ kov, const char * __restrict__ vov, const int64_t ov_nb1,
        const int32_t * __restrict__ s2c, const int n_slots, const int z0, half * __restrict__ k16, half * __restrict__ v16,
        const int D, const int n_kv, const int H) {
    const int slot = blockIdx.x;
    const int z    = blockIdx.y;
    const int row  = (z0 + z)*n_slots + slot;
    const int cell = s2c[row];
    if (cell < 0 || cell >= n_kv) {
        return;
    }
    const half * kr = (const half *) (kov + row*ov_nb1);
    const half * vr = (const half *) (vov + row*ov_nb1);
    for (int e = threadIdx.x; e < D*H; e += blockDim.x) {
        const int64_t at = (((int64_t) z*H + e/D)*n_kv + cell)*D + e % D;
        k16[at] = kr[e];
        v16[at] = vr[e];
    }
}

// Rows whose mask hides every cell: the op's result there is 0 (as the CPU's, and
// llama.cpp's CPU flash attention), where the CUDA flash attention divides 0 by 0. No
// real batch has one (a token sees its own cell), but the op is defined for it. Block
// (token, stream), one warp: each mask row it reads, then the heads that use the row.
static __global__ void lq_dense_zero_hidden_rows(const char * __restrict__ mask, const int64_t m_nb1,
        const int64_t m_nb2, const int64_t m_nb3, const int m_ne2, const int m_ne3, char * __restrict__ dst,
        const int64_t d_nb1, const int64_t d_nb2, const int64_t d_nb3, const int n_kv, const int n_head, const int D) {
    const int t = blockIdx.x;
    const int z = blockIdx.y;
    for (int mh = 0; mh < m_ne2; ++mh) {
        const half * row = (const half *) (mask + t*m_nb1 + mh*m_nb2 + (z % m_ne3)*m_nb3);
        bool seen = false;
        for (int c = threadIdx.x; c < n_kv && !seen; c += WARP_SIZE) {
            seen = __half2float(row[c]) > -INFINITY;
        }
        if (__any_sync(0xffffffff, seen)) {
            continue;
        }
        for (int h = mh; h < n_head; h += m_ne2) {
            float * out = (float *) (dst + h*d_nb1 + t*d_nb2 + z*d_nb3);
            for (int e = threadIdx.x; e < D; e += WARP_SIZE) {
                out[e] = 0.0f;
            }
        }
    }
}

// A tensor that describes memory the op owns for a moment (never allocated by ggml).
static ggml_tensor lq_dense_tensor(ggml_type type, void * data, const int64_t ne0, const int64_t ne1, const int64_t ne2,
                                   const int64_t ne3) {
    ggml_tensor t = {};
    t.type  = type;
    t.data  = data;
    t.ne[0] = ne0; t.ne[1] = ne1; t.ne[2] = ne2; t.ne[3] = ne3;
    t.nb[0] = ggml_type_size(type);
    for (int i = 1; i < GGML_MAX_DIMS; ++i) {
        t.nb[i] = t.nb[i - 1]*t.ne[i - 1];
    }
    return t;
}

// The flash-attention op the dense path runs for the op `dst` over a group of streams:
// dst's query and mask, the f16 copy of K (and V after it) in place of the store.
struct lq_dense_fa {
    ggml_tensor fa = {}, tq, tk, tv, tm;
    const ggml_tensor * dst;

    lq_dense_fa(const ggml_tensor * dst, const float scale, const float max_bias, const float softcap)
        : tq(*dst->src[0]), tm(*dst->src[3]), dst(dst) {
        fa.op   = GGML_OP_FLASH_ATTN_EXT;
        fa.type = GGML_TYPE_F32;
        const float params[3] = { scale, max_bias, softcap };
        memcpy(fa.op_params, params, sizeof(params)); // then precision 0 (default), no sparse gather
        fa.src[0] = &tq; fa.src[1] = &tk; fa.src[2] = &tv; fa.src[3] = &tm;
    }
    lq_dense_fa(const lq_dense_fa &) = delete; // fa points at the members

    // Streams [z0, z0 + ns), K and V f16 at k16 (nullptr: only to ask what flash
    // attention takes).
    void describe(const int z0, const int ns, half * k16) {
        const ggml_tensor * q = dst->src[0];
        const ggml_tensor * k = dst->src[1];
        const ggml_tensor * mask = dst->src[3];
        const int64_t D = k->ne[0], n_kv = k->ne[1], H = k->ne[2];
        tq.data = (char *) q->data + z0*q->nb[3]; tq.ne[3] = ns;
        if (mask->ne[3] > 1) {
            tm.data = (char *) mask->data + z0*mask->nb[3]; tm.ne[3] = ns;
        }
        tk = lq_dense_tensor(GGML_TYPE_F16, k16, D, n_kv, H, ns);
        tv = lq_dense_tensor(GGML_TYPE_F16, k16 == nullptr ? nullptr : k16 + ns*D*n_kv*H, D, n_kv, H, ns);
        for (int i = 0; i < GGML_MAX_DIMS; ++i) {
            fa.ne[i] = dst->ne[i];
            fa.nb[i] = dst->nb[i];
        }
        fa.ne[3] = ns;
        fa.data  = (char *) dst->data + z0*dst->nb[3];
    }
};

// Whether flash attention on `device` takes the dense path of the op `dst`.
static bool lq_dense_supported(const int device, const ggml_tensor * dst) {
    lq_dense_fa d(dst, 1.0f, 0.0f, 0.0f);
    d.describe(0, 1, nullptr);
    return ggml_cuda_flash_attn_ext_supported(device, &d.fa);
}

// The dense path for `dst` (P as lq_attn built it); false, having launched nothing,
// where flash attention does not take this shape.
static bool lq_attn_dense(ggml_backend_cuda_context & ctx, ggml_tensor * dst, const lq_attn_params & P,
                          const logquant_attn_layer * layer) {
    const int     D        = (int) dst->src[1]->ne[0];
    const int     n_stream = (int) dst->src[0]->ne[3];
    const int64_t per_stream = (int64_t) P.n_kv*P.n_head_kv*D; // values of K (and of V) per stream
    const int group = (int) std::max<int64_t>(1, std::min<int64_t>(n_stream, lq_dense_scratch()/(2*per_stream*sizeof(half))));

    lq_dense_fa d(dst, layer->scale, layer->max_bias, layer->logit_softcap);
    d.describe(0, group, nullptr);
    if (!ggml_cuda_flash_attn_ext_supported(ggml_cuda_get_device(), &d.fa)) {
        return false;
    }

    ggml_cuda_pool_alloc<half> scratch(ctx.pool(), 2*group*per_stream);
    cudaStream_t stream = ctx.stream();
    for (int z0 = 0; z0 < n_stream; z0 += group) {
        const int ns = std::min(group, n_stream - z0);
        half * k16 = scratch.get();
        half * v16 = k16 + ns*per_stream;
        const int64_t warps = (int64_t) P.n_head_kv*P.n_kv*(D/QK_LQ2);
        const dim3 grid_d((unsigned) ((warps + 7)/8), ns, 2);
        lq_dense_dequantize<<<grid_d, 8*WARP_SIZE, 0, stream>>>(P.k + z0*P.k_nb3, P.k_nb1, P.k_nb2, P.k_nb3,
            P.k_lq3, P.kbc, P.kbc_n, z0, P.v + z0*P.v_nb3, P.v_nb1, P.v_nb2, P.v_nb3, k16, v16, D, P.n_kv, P.n_head_kv);
        if (P.n_slots > 0) {
            lq_dense_overlay<<<dim3(P.n_slots, ns), 256, 0, stream>>>(P.kov, P.vov, P.ov_nb1, P.s2c, P.n_slots, z0,
                k16, v16, D, P.n_kv, P.n_head_kv);
        }
        CUDA_CHECK(cudaGetLastError());
        d.describe(z0, ns, k16);
        ggml_cuda_flash_attn_ext(ctx, &d.fa);
    }
    lq_dense_zero_hidden_rows<<<dim3(P.N, n_stream), WARP_SIZE, 0, stream>>>(P.mask, P.m_nb1, P.m_nb2, P.m_nb3,
        P.m_ne2, P.m_ne3, (char *) dst->data, dst->nb[1], dst->nb[2], dst->nb[3], P.n_kv, P.n_head, D);
    CUDA_CHECK(cudaGetLastError());
    return true;
}

static void lq_attn(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const ggml_tensor * q    = dst->src[0];
    const ggml_tensor * k    = dst->src[1];
    const ggml_tensor * v    = dst->src[2];
    const ggml_tensor * mask = dst->src[3];
    const ggml_tensor * kov  = dst->src[4];
    const ggml_tensor * vov  = dst->src[5];
    const ggml_tensor * s2c  = dst->src[6];
    const ggml_custom_op_params * cp = (const ggml_custom_op_params *) dst->op_params;
    const logquant_attn_layer * layer = (const logquant_attn_layer *) cp->userdata;

    const int D = (int) k->ne[0];
    lq_attn_params P = {};
    P.q = (const char *) q->data;       P.q_nb1 = q->nb[1]; P.q_nb2 = q->nb[2]; P.q_nb3 = q->nb[3];
    P.k = (const char *) k->data;       P.k_nb1 = k->nb[1]; P.k_nb2 = k->nb[2]; P.k_nb3 = k->nb[3];
    P.v = (const char *) v->data;       P.v_nb1 = v->nb[1]; P.v_nb2 = v->nb[2]; P.v_nb3 = v->nb[3];
    P.mask = (const char *) mask->data; P.m_nb1 = mask->nb[1]; P.m_nb2 = mask->nb[2]; P.m_nb3 = mask->nb[3];
    P.m_ne2 = (int32_t) mask->ne[2];    P.m_ne3 = (int32_t) mask->ne[3];
    P.kov = (const char *) kov->data;   P.vov = (const char *) vov->data; P.ov_nb1 = kov->nb[1];
    P.s2c = (const int32_t *) s2c->data;
    P.n_slots   = (int32_t) s2c->ne[0];
    if (const ggml_tensor * kbc = dst->src[7]) {
        P.kbc   = (const int32_t *) kbc->data;
        P.kbc_n = (int32_t) kbc->ne[0];
    }
    P.k_lq3     = k->type == GGML_TYPE_LQ3;
    P.n_kv      = (int32_t) k->ne[1];
    P.N         = (int32_t) q->ne[1];
    P.n_head    = (int32_t) q->ne[2];
    P.n_head_kv = (int32_t) k->ne[2];
    P.G         = P.n_head / P.n_head_kv;
    const int n_stream = (int) q->ne[3];

    P.scale    = layer->scale;
    P.softcap  = layer->logit_softcap;
    P.max_bias = layer->max_bias;
    if (P.softcap != 0.0f) {
        P.scale /= P.softcap;
    }
    P.n_head_log2 = 1u << (uint32_t) floor(log2((double) P.n_head));
    P.m0 = powf(2.0f, -(P.max_bias       ) / P.n_head_log2);
    P.m1 = powf(2.0f, -(P.max_bias / 2.0f) / P.n_head_log2);

    const int GN = P.G*P.N;
    int QT = 1;
    while (QT < GN && QT < 8) {
        QT *= 2;
    }
    P.n_qtiles = (GN + QT - 1) / QT;

    // An lq3 K store takes the dense path at every batch size: the tiled kernel's tensor
    // cores read 20-byte lq2 blocks (supports_op checked that flash attention takes it).
    const int dense_min = lq_dense_min_queries();
    if (P.k_lq3 || (dense_min > 0 && GN >= dense_min)) {
        if (lq_attn_dense(ctx, dst, P, layer)) {
            return;
        }
        GGML_ASSERT(!P.k_lq3);
    }

    float * out = (float *) dst->data;
    switch (D) {
        case  64: lq_attn_dispatch_qt< 64>(ctx, P, QT, n_stream, out); break;
        case 128: lq_attn_dispatch_qt<128>(ctx, P, QT, n_stream, out); break;
        case 256: lq_attn_dispatch_qt<256>(ctx, P, QT, n_stream, out); break;
        default: GGML_ABORT("logquant attention: head size %d", D); // supports_op refused it
    }
}

// The overlay write (in place on the K rows; ggml-cpu/logquant-attn.h): token i's K and
// V (f32 or f16, [head size, heads, tokens]) into overlay row token_row[i] (of this
// micro-batch's streams), as f16. One launch for both: block (i, kv) copies token i's
// K (kv = 0) or V (kv = 1), so a decode step pays one small kernel per layer, not two.
struct lq_overlay_side {
    const char * cur; int64_t nb1, nb2; int n_embd_head, n_head; bool f16; // k_cur or v_cur
    half * ov; int64_t ov_nb1;                                             // its overlay rows
};

static __global__ void lq_overlay_write_rows(const lq_overlay_side k, const lq_overlay_side v,
        const int32_t * __restrict__ token_row) {
    const int i   = blockIdx.x;
    const int row = token_row[i];
    if (row < 0) {
        return;
    }
    const lq_overlay_side & side = blockIdx.y == 0 ? k : v;
    half * out = (half *) ((char *) side.ov + row*side.ov_nb1);
    for (int e = threadIdx.x; e < side.n_embd_head*side.n_head; e += blockDim.x) {
        const int d = e % side.n_embd_head;
        const int h = e / side.n_embd_head;
        const char * x = side.cur + h*side.nb1 + i*side.nb2;
        out[e] = side.f16 ? ((const half *) x)[d] : __float2half_rn(((const float *) x)[d]);
    }
}

static void lq_overlay_write(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const ggml_tensor * rows = dst->src[4];
    const int n_tokens = (int) rows->ne[0];
    lq_overlay_side side[2];
    for (int kv = 0; kv < 2; ++kv) {
        const ggml_tensor * cur = dst->src[1 + kv];     // k_cur, v_cur
        const ggml_tensor * ov  = dst->src[kv == 0 ? 0 : 3]; // k_ov (dst is a view of it), v_ov
        GGML_ASSERT(cur->ne[2] == n_tokens);
        side[kv] = { (const char *) cur->data, (int64_t) cur->nb[1], (int64_t) cur->nb[2], (int) cur->ne[0], (int) cur->ne[1],
                     cur->type == GGML_TYPE_F16, (half *) ov->data, (int64_t) ov->nb[1] };
    }
    if (n_tokens == 0) {
        return;
    }
    lq_overlay_write_rows<<<dim3(n_tokens, 2), 256, 0, ctx.stream()>>>(side[0], side[1], (const int32_t *) rows->data);
    CUDA_CHECK(cudaGetLastError());
}

static ggml_custom_op_t lq_custom_fun(const ggml_tensor * op) {
    return op->op == GGML_OP_CUSTOM ? ((const ggml_custom_op_params *) op->op_params)->fun : nullptr;
}

bool logquant_cuda_supports_op(const ggml_tensor * op) {
    const ggml_custom_op_t fun = lq_custom_fun(op);
    if (fun == logquant_attn_compute) {
        // the store tier runs on tensor cores (mma.sync): Ampere or newer, every device
        for (int id = 0; id < ggml_cuda_info().device_count; ++id) {
            if (!ampere_mma_available(ggml_cuda_info().devices[id].cc)) {
                return false;
            }
        }
        const ggml_tensor * q = op->src[0];
        const ggml_tensor * k = op->src[1];
        const ggml_tensor * v = op->src[2];
        const ggml_tensor * s2c = op->src[6];
        if (q == nullptr || k == nullptr || v == nullptr || op->src[3] == nullptr || op->src[4] == nullptr ||
            op->src[5] == nullptr || s2c == nullptr) {
            return false;
        }
        const int64_t D = k->ne[0];
        const bool ok = q->type == GGML_TYPE_F32 && (k->type == GGML_TYPE_LQ2 || k->type == GGML_TYPE_LQ3) &&
               v->type == GGML_TYPE_LQ2 &&
               op->src[3]->type == GGML_TYPE_F16 && op->src[4]->type == GGML_TYPE_F16 && op->src[5]->type == GGML_TYPE_F16 &&
               s2c->type == GGML_TYPE_I32 && ggml_is_contiguous(s2c) && (D == 64 || D == 128 || D == 256) &&
               v->ne[0] == D && q->ne[0] == D && v->ne[2] == k->ne[2] && q->ne[2] % k->ne[2] == 0 &&
               op->src[4]->ne[0] % D == 0 && ggml_is_contiguous(op) && q->nb[0] == sizeof(float) &&
               op->src[4]->nb[0] == sizeof(half) && op->src[5]->nb[0] == sizeof(half) && op->src[4]->nb[1] == op->src[5]->nb[1] &&
               k->ne[1] <= INT32_MAX / 2 &&
               (op->src[7] == nullptr || (op->src[7]->type == GGML_TYPE_I32 && ggml_is_contiguous(op->src[7]) &&
                                          op->src[7]->ne[0]*QK_LQ2 >= k->ne[1] && op->src[7]->ne[1] >= q->ne[3]));
        if (!ok || k->type != GGML_TYPE_LQ3) {
            return ok;
        }
        // an lq3 K store runs the dense path alone: flash attention must take it
        for (int id = 0; id < ggml_cuda_info().device_count; ++id) {
            if (!lq_dense_supported(id, op)) {
                return false;
            }
        }
        return true;
    }
    if (fun == logquant_overlay_write) {
        for (int i = 0; i < 5; ++i) {
            if (op->src[i] == nullptr) {
                return false;
            }
        }
        for (int kv = 0; kv < 2; ++kv) {
            const ggml_tensor * cur = op->src[1 + kv];
            const ggml_tensor * ov  = op->src[kv == 0 ? 0 : 3];
            if ((cur->type != GGML_TYPE_F32 && cur->type != GGML_TYPE_F16) || cur->nb[0] != ggml_type_size(cur->type) ||
                ov->type != GGML_TYPE_F16 || ov->nb[0] != sizeof(half) || cur->ne[0]*cur->ne[1] != ov->ne[0]) {
                return false;
            }
        }
        return op->src[4]->type == GGML_TYPE_I32 && ggml_is_contiguous(op->src[4]);
    }
    return false;
}

bool logquant_cuda_compute_forward(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const ggml_custom_op_t fun = lq_custom_fun(dst);
    if (fun == logquant_attn_compute) {
        lq_attn(ctx, dst);
        return true;
    }
    if (fun == logquant_overlay_write) {
        lq_overlay_write(ctx, dst);
        return true;
    }
    return false;
}
