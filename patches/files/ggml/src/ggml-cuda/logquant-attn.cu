// LogQuant's two-tier attention and overlay write on CUDA; see logquant-attn.cuh and,
// for the ops' sources and semantics, ggml-cpu/logquant-attn.h.
//
// Attention, per (stream, KV head, tile of up to 8 queries): blocks of 4 warps split
// the store's cells (and, in extra blocks, the overlay's slots); every warp runs its
// own online softmax and writes a partial result (max, sum, accumulator); a second
// kernel merges the partials by log-sum-exp. One pass over the 2-bit store, never an
// f16 copy of it: the bytes moved per step are the store's 2.5 bits per value, the
// overlay's f16 rows and the mask.
//
//  - Scores (lane = cell): K stays 2-bit; the query is rounded to int8 per 64-value
//    block, and each 32-bit word of codes meets it in four dp4a, as llama.cpp's vector
//    kernels do for quantized K. Cells the overlay holds are skipped through a bitmap
//    the block builds in shared memory from the slot map.
//  - Values (lane = output elements): each lane dequantizes its elements of the cell's
//    V row and accumulates them for every query of the tile, in f32.
//  - Overlay slots: the same with f16 K and V and an f32 query.
#include "logquant-attn.cuh"
#include "lq2.cuh"

#include "ggml-cpu/logquant-attn.h"

#include <algorithm>

#define LQ_WARPS           4
#define LQ_THREADS         (LQ_WARPS*WARP_SIZE)
#define LQ_BLOCK_CELLS_MAX 8192 // store cells per block at most (the bitmap's size)
#define LQ_WARP_SLOTS      32   // overlay slots per warp (one chunk: slots are few, latency rules)
#define LQ_WARP_CELLS_MIN  64   // store cells per warp at least, where there are that many

struct lq_attn_params {
    const char * q;    int64_t q_nb1, q_nb2, q_nb3; // f32 [D, N, n_head, n_stream]
    const char * k;    int64_t k_nb1, k_nb2, k_nb3; // lq2 [D, n_kv, n_head_kv, n_stream]
    const char * v;    int64_t v_nb1, v_nb2, v_nb3;
    const char * mask; int64_t m_nb1, m_nb2, m_nb3; int32_t m_ne2, m_ne3;
    const char * kov;  const char * vov; int64_t ov_nb1; // f16 rows of this micro-batch's streams
    const int32_t * s2c; // [n_stream][n_slots]: the cell a slot holds, or -1
    int32_t n_slots;
    int32_t n_kv, N, n_head, n_head_kv, G;
    float scale, softcap, max_bias, m0, m1;
    uint32_t n_head_log2;
    int32_t n_split, block_cells; // store tier: blocks along the cells, cells per block
    int32_t n_qtiles, n_parts;    // query tiles per KV head; partial results per query
    float * part;                 // [query][n_parts][2 + D]: M, S, accumulator
};

// One lq2 row of NB blocks (NB*5 words) with the widest loads its alignment allows: a
// row starts at a multiple of NB*20 bytes (8-byte aligned for head size 128, 16 for
// 256), and narrow loads from 32 rows at once cost L1 wavefronts, the limit here.
template <int NB>
static __device__ __forceinline__ void lq_load_row(const char * __restrict__ p, uint32_t (&w)[NB*5]) {
    if constexpr (NB % 4 == 0) {
#pragma unroll
        for (int k = 0; k < NB*5/4; ++k) {
            const uint4 v = ((const uint4 *) p)[k];
            w[4*k] = v.x; w[4*k + 1] = v.y; w[4*k + 2] = v.z; w[4*k + 3] = v.w;
        }
    } else if constexpr (NB % 2 == 0) {
#pragma unroll
        for (int k = 0; k < NB*5/2; ++k) {
            const uint2 v = ((const uint2 *) p)[k];
            w[2*k] = v.x; w[2*k + 1] = v.y;
        }
    } else {
#pragma unroll
        for (int k = 0; k < NB*5; ++k) {
            w[k] = ((const uint32_t *) p)[k];
        }
    }
}

template <int NB>
static __device__ __forceinline__ void lq_store_row(uint32_t * __restrict__ p, const uint32_t (&w)[NB*5]) {
    if constexpr (NB % 4 == 0) {
#pragma unroll
        for (int k = 0; k < NB*5/4; ++k) {
            ((uint4 *) p)[k] = make_uint4(w[4*k], w[4*k + 1], w[4*k + 2], w[4*k + 3]);
        }
    } else if constexpr (NB % 2 == 0) {
#pragma unroll
        for (int k = 0; k < NB*5/2; ++k) {
            ((uint2 *) p)[k] = make_uint2(w[2*k], w[2*k + 1]);
        }
    } else {
#pragma unroll
        for (int k = 0; k < NB*5; ++k) {
            p[k] = w[k];
        }
    }
}

// The QT softmax weights of one cell, with vector loads from shared memory.
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

template <int D, int QT, bool OVERLAY>
static __device__ __forceinline__ void lq_tier(const lq_attn_params & P, const int w0, const int w1, const int b0,
        const int z, const int ikv, const int qt, float (&M)[QT], float (&S)[QT], float (&acc)[QT][D/WARP_SIZE],
        const float (*s_qf)[D], const int32_t (*s_q8)[D/4], const float (*s_qd)[D/QK_LQ2], const float (*s_qs)[D/QK_LQ2],
        float (*s_p)[QT], const uint32_t * s_skip, uint32_t (*s_v)[D/QK_LQ2*5]) {
    constexpr int EPL = D/WARP_SIZE;
    constexpr int NB  = D/QK_LQ2;
    constexpr int VW  = NB*5; // 32-bit words of one cell's lq2 V row
    const int lane = threadIdx.x % WARP_SIZE;
    const int GN   = P.G*P.N;

    for (int c = w0; c < w1; c += WARP_SIZE) {
        const int i = c + lane; // this lane's cell (store) or slot (overlay)
        int cell = -1;
        if (i < w1) {
            if constexpr (OVERLAY) {
                cell = P.s2c[z*P.n_slots + i];
                cell = cell < P.n_kv ? cell : -1;
            } else {
                const int r = i - b0;
                cell = (s_skip[r/32] >> (r%32)) & 1 ? -1 : i;
            }
        }

        float s[QT];
        bool any = false;
#pragma unroll
        for (int j = 0; j < QT; ++j) {
            const int qi = qt*QT + j;
            s[j] = -INFINITY;
            if (cell >= 0 && qi < GN) {
                const int t = qi / P.G;
                const int h = ikv*P.G + qi % P.G;
                const half * mrow = (const half *) (P.mask + t*P.m_nb1 + (h % P.m_ne2)*P.m_nb2 + (z % P.m_ne3)*P.m_nb3);
                const float slope = P.max_bias > 0.0f
                    ? (uint32_t) h < P.n_head_log2 ? powf(P.m0, h + 1) : powf(P.m1, 2*(h - (int) P.n_head_log2) + 1)
                    : 1.0f;
                s[j] = slope*__half2float(mrow[cell]);
                any |= s[j] != -INFINITY;
            }
        }

        if constexpr (!OVERLAY) {
            // This cell's V row, into shared memory for the value pass (issued with the
            // K row: one wait on memory per chunk, not one per cell).
            if (any) {
                uint32_t vw[VW];
                lq_load_row<NB>(P.v + (int64_t) i*P.v_nb1 + (int64_t) ikv*P.v_nb2 + (int64_t) z*P.v_nb3, vw);
                lq_store_row<NB>(s_v[lane], vw);
            } else {
#pragma unroll
                for (int w = 0; w < VW; ++w) {
                    s_v[lane][w] = 0; // d = m = 0: a finite value, weighed by nothing
                }
            }
        }

        if (any) {
            float dot[QT];
#pragma unroll
            for (int j = 0; j < QT; ++j) {
                dot[j] = 0.0f;
            }
            if constexpr (OVERLAY) {
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
            } else {
                uint32_t kwv[VW];
                lq_load_row<NB>(P.k + (int64_t) i*P.k_nb1 + (int64_t) ikv*P.k_nb2 + (int64_t) z*P.k_nb3, kwv);
#pragma unroll
                for (int b = 0; b < NB; ++b) {
                    const uint32_t * kw = kwv + b*5;
                    const uint32_t dm = kw[0];
                    const float2 dmf = __half22float2(*(const half2 *) &dm); // x: step d, y: minimum m
                    int isum[QT];
#pragma unroll
                    for (int j = 0; j < QT; ++j) {
                        isum[j] = 0;
                    }
#pragma unroll
                    for (int wi = 0; wi < 4; ++wi) {
                        const uint32_t w = kw[1 + wi];
#pragma unroll
                        for (int sh = 0; sh < 4; ++sh) {
                            const int codes = (int) ((w >> (2*sh)) & 0x03030303u);
#pragma unroll
                            for (int j = 0; j < QT; ++j) {
                                isum[j] = ggml_cuda_dp4a(codes, s_q8[j][b*16 + wi*4 + sh], isum[j]);
                            }
                        }
                    }
#pragma unroll
                    for (int j = 0; j < QT; ++j) {
                        dot[j] += dmf.x*s_qd[j][b]*(float) isum[j] + dmf.y*s_qs[j][b];
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

        const int n = min(WARP_SIZE, w1 - c);
        if constexpr (!OVERLAY) {
            // Values from the staged rows: this lane's EPL elements are in block blk, words
            // 1 + j0/16 (codes) and 0 (d, m).
            const int blk = (EPL*lane)/QK_LQ2;
            const int j0  = (EPL*lane)%QK_LQ2;
            const int wsel = blk*5 + 1 + j0/16;
            const int sh   = 8*((j0/4) % 4) + 2*(j0 % 4);
#pragma unroll 4
            for (int ii = 0; ii < n; ++ii) {
                const uint32_t dm   = s_v[ii][blk*5];
                const uint32_t bits = s_v[ii][wsel] >> sh;
                const float2 dmf = __half22float2(*(const half2 *) &dm);
                float vals[EPL];
#pragma unroll
                for (int e = 0; e < EPL; ++e) {
                    vals[e] = fmaf(dmf.x, (float) ((bits >> (2*e)) & 3), dmf.y);
                }
                float pj[QT];
                lq_load_p<QT>(s_p[ii], pj);
#pragma unroll
                for (int j = 0; j < QT; ++j) {
#pragma unroll
                    for (int e = 0; e < EPL; ++e) {
                        acc[j][e] += pj[j]*vals[e];
                    }
                }
            }
        } else {
            // Overlay values, PB slots at a time: first every load (independent, so in
            // flight together), then the arithmetic.
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
        }
        __syncwarp();
    }
}

template <int D, int QT>
static __global__ void __launch_bounds__(LQ_THREADS) lq_attn_partial(const lq_attn_params P) {
    constexpr int EPL = D/WARP_SIZE;
    constexpr int NB  = D/QK_LQ2;
    const int warp = threadIdx.x / WARP_SIZE;
    const int lane = threadIdx.x % WARP_SIZE;
    const int z    = blockIdx.z;
    const int ikv  = blockIdx.y % P.n_head_kv;
    const int qt   = blockIdx.y / P.n_head_kv;
    const int GN   = P.G*P.N;

    __shared__ float    s_qf[QT][D];      // the tile's queries
    __shared__ int32_t  s_q8[QT][D/4];    // ... as int8, in the order of the lq2 codes
    __shared__ float    s_qd[QT][NB];     // int8 scale per 64-value block
    __shared__ float    s_qs[QT][NB];     // sum of the int8-rounded query per block
    __shared__ __align__(16) float s_p[LQ_WARPS][WARP_SIZE][QT]; // each cell's softmax weights
    __shared__ uint32_t s_skip[LQ_BLOCK_CELLS_MAX/32];
    __shared__ __align__(16) uint32_t s_v[LQ_WARPS][WARP_SIZE][NB*5]; // each warp's chunk of lq2 V rows

    for (int idx = threadIdx.x; idx < QT*D; idx += LQ_THREADS) {
        const int j  = idx / D;
        const int d  = idx % D;
        const int qi = qt*QT + j;
        float x = 0.0f;
        if (qi < GN) {
            const int t = qi / P.G;
            const int h = ikv*P.G + qi % P.G;
            x = *(const float *) (P.q + (int64_t) d*sizeof(float) + t*P.q_nb1 + h*P.q_nb2 + z*P.q_nb3);
        }
        s_qf[j][d] = x;
    }
    __syncthreads();

    const bool store = (int) blockIdx.x < P.n_split;
    if (store) {
        // int8 query: value 16*wi + 4*k + sh of a block is byte k of word 4*wi + sh
        for (int pair = warp; pair < QT*NB; pair += LQ_WARPS) {
            const int j = pair / NB;
            const int b = pair % NB;
            const float x0 = s_qf[j][b*QK_LQ2 + 2*lane];
            const float x1 = s_qf[j][b*QK_LQ2 + 2*lane + 1];
            const float amax = warp_reduce_max(fmaxf(fabsf(x0), fabsf(x1)));
            const float dq = amax / 127.0f;
            const float iq = dq > 0.0f ? 1.0f/dq : 0.0f;
            const int q0 = __float2int_rn(x0*iq);
            const int q1 = __float2int_rn(x1*iq);
            const int sum = warp_reduce_sum(q0 + q1);
            int8_t * bytes = (int8_t *) s_q8[j];
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int vi = 2*lane + e; // value within the block
                bytes[b*QK_LQ2 + ((vi/16)*4 + vi % 4)*4 + (vi % 16)/4] = (int8_t) (e == 0 ? q0 : q1);
            }
            if (lane == 0) {
                s_qd[j][b] = dq;
                s_qs[j][b] = dq*(float) sum;
            }
        }
    }

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

    if (store) {
        const int b0 = blockIdx.x*P.block_cells;
        const int b1 = min(P.n_kv, b0 + P.block_cells);
        for (int w = threadIdx.x; w < LQ_BLOCK_CELLS_MAX/32; w += LQ_THREADS) {
            s_skip[w] = 0;
        }
        __syncthreads();
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
        __syncthreads();
        const int per_warp = P.block_cells / LQ_WARPS;
        const int w0 = b0 + warp*per_warp;
        const int w1 = min(b1, w0 + per_warp);
        lq_tier<D, QT, false>(P, w0, w1, b0, z, ikv, qt, M, S, acc, s_qf, s_q8, s_qd, s_qs, s_p[warp], s_skip, s_v[warp]);
    } else {
        const int w0 = ((int) blockIdx.x - P.n_split)*LQ_WARPS*LQ_WARP_SLOTS + warp*LQ_WARP_SLOTS;
        const int w1 = min(P.n_slots, w0 + LQ_WARP_SLOTS);
        lq_tier<D, QT, true>(P, w0, w1, 0, z, ikv, qt, M, S, acc, s_qf, s_q8, s_qd, s_qs, s_p[warp], s_skip, s_v[warp]);
    }

    const int part = blockIdx.x*LQ_WARPS + warp;
#pragma unroll
    for (int j = 0; j < QT; ++j) {
        const int qi = qt*QT + j;
        const float Sj = warp_reduce_sum(S[j]);
        if (qi >= GN) {
            continue;
        }
        const int64_t qg = ((int64_t) (z*P.n_head_kv + ikv)*P.n_qtiles + qt)*QT + j;
        float * dstp = P.part + (qg*P.n_parts + part)*(2 + D);
        if (lane == 0) {
            dstp[0] = M[j];
            dstp[1] = Sj;
        }
#pragma unroll
        for (int e = 0; e < EPL; ++e) {
            dstp[2 + EPL*lane + e] = acc[j][e];
        }
    }
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

template <int D, int QT>
static void lq_attn_launch(ggml_backend_cuda_context & ctx, lq_attn_params P, const int n_split_ov, const int n_stream, float * dst) {
    const int n_q_per_kv = P.n_qtiles*QT;
    P.n_parts = (P.n_split + n_split_ov)*LQ_WARPS;
    ggml_cuda_pool_alloc<float> part(ctx.pool(), (size_t) n_stream*P.n_head_kv*n_q_per_kv*P.n_parts*(2 + D));
    P.part = part.get();
    cudaStream_t stream = ctx.stream();
    const dim3 grid(P.n_split + n_split_ov, P.n_head_kv*P.n_qtiles, n_stream);
    lq_attn_partial<D, QT><<<grid, LQ_THREADS, 0, stream>>>(P);
    const dim3 grid_c(n_q_per_kv, P.n_head_kv, n_stream);
    lq_attn_combine<D><<<grid_c, LQ_COMBINE_THREADS, P.n_parts*sizeof(float), stream>>>(P.part, dst, P.n_parts, P.n_head_kv, n_q_per_kv, P.G, P.N, P.n_head);
    CUDA_CHECK(cudaGetLastError());
}

template <int D>
static void lq_attn_dispatch_qt(ggml_backend_cuda_context & ctx, lq_attn_params P, int QT, int n_split_ov, int n_stream, float * dst) {
    switch (QT) {
        case 1: lq_attn_launch<D, 1>(ctx, P, n_split_ov, n_stream, dst); break;
        case 2: lq_attn_launch<D, 2>(ctx, P, n_split_ov, n_stream, dst); break;
        case 4: lq_attn_launch<D, 4>(ctx, P, n_split_ov, n_stream, dst); break;
        default: lq_attn_launch<D, 8>(ctx, P, n_split_ov, n_stream, dst); break;
    }
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

    // Enough blocks for four per multiprocessor (a decode step is short: latency, not
    // bandwidth, is what few blocks lose), at most LQ_BLOCK_CELLS_MAX cells each, at
    // least LQ_WARP_CELLS_MIN cells per warp (fewer make the partials cost more than
    // the cells).
    const int nsm       = ggml_cuda_info().devices[ctx.device].nsm;
    const int base      = P.n_head_kv*P.n_qtiles*n_stream;
    const int min_split = (P.n_kv + LQ_BLOCK_CELLS_MAX - 1) / LQ_BLOCK_CELLS_MAX;
    const int max_split = std::max(1, P.n_kv / (LQ_WARPS*LQ_WARP_CELLS_MIN));
    int n_split = std::max(min_split, std::min(max_split, (4*nsm + base - 1) / base));
    int block_cells = (P.n_kv + n_split - 1) / n_split;
    block_cells = (block_cells + LQ_THREADS - 1) / LQ_THREADS * LQ_THREADS;
    P.block_cells = block_cells;
    P.n_split     = (P.n_kv + block_cells - 1) / block_cells;
    const int n_split_ov = (P.n_slots + LQ_WARPS*LQ_WARP_SLOTS - 1) / (LQ_WARPS*LQ_WARP_SLOTS);

    float * out = (float *) dst->data;
    switch (D) {
        case  64: lq_attn_dispatch_qt< 64>(ctx, P, QT, n_split_ov, n_stream, out); break;
        case 128: lq_attn_dispatch_qt<128>(ctx, P, QT, n_split_ov, n_stream, out); break;
        case 256: lq_attn_dispatch_qt<256>(ctx, P, QT, n_split_ov, n_stream, out); break;
        default: GGML_ABORT("logquant attention: head size %d", D); // supports_op refused it
    }
}

// The overlay write (in place on the K rows; ggml-cpu/logquant-attn.h): token i's K or
// V (f32 or f16, [head size, heads, tokens]) into overlay row token_row[i] (of this
// micro-batch's streams), as f16.
template <typename T>
static __global__ void lq_overlay_write_rows(const char * __restrict__ cur, const int64_t nb1, const int64_t nb2,
        const int n_embd_head, const int n_head, const int32_t * __restrict__ token_row, half * __restrict__ ov,
        const int64_t ov_nb1) {
    const int i   = blockIdx.x;
    const int row = token_row[i];
    if (row < 0) {
        return;
    }
    half * out = (half *) ((char *) ov + row*ov_nb1);
    for (int e = threadIdx.x; e < n_embd_head*n_head; e += blockDim.x) {
        const int d = e % n_embd_head;
        const int h = e / n_embd_head;
        const T x = *(const T *) (cur + d*sizeof(T) + h*nb1 + i*nb2);
        if constexpr (std::is_same_v<T, half>) {
            out[e] = x;
        } else {
            out[e] = __float2half_rn(x);
        }
    }
}

static void lq_overlay_write(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const ggml_tensor * rows = dst->src[4];
    const int n_tokens = (int) rows->ne[0];
    for (int kv = 0; kv < 2; ++kv) {
        const ggml_tensor * cur = dst->src[1 + kv];     // k_cur, v_cur
        const ggml_tensor * ov  = dst->src[kv == 0 ? 0 : 3]; // k_ov (dst is a view of it), v_ov
        GGML_ASSERT(cur->ne[2] == n_tokens);
        if (n_tokens == 0) {
            continue;
        }
        if (cur->type == GGML_TYPE_F16) {
            lq_overlay_write_rows<half><<<n_tokens, 256, 0, ctx.stream()>>>((const char *) cur->data, cur->nb[1], cur->nb[2],
                (int) cur->ne[0], (int) cur->ne[1], (const int32_t *) rows->data, (half *) ov->data, ov->nb[1]);
        } else {
            lq_overlay_write_rows<float><<<n_tokens, 256, 0, ctx.stream()>>>((const char *) cur->data, cur->nb[1], cur->nb[2],
                (int) cur->ne[0], (int) cur->ne[1], (const int32_t *) rows->data, (half *) ov->data, ov->nb[1]);
        }
    }
    CUDA_CHECK(cudaGetLastError());
}

static ggml_custom_op_t lq_custom_fun(const ggml_tensor * op) {
    return op->op == GGML_OP_CUSTOM ? ((const ggml_custom_op_params *) op->op_params)->fun : nullptr;
}

bool logquant_cuda_supports_op(const ggml_tensor * op) {
    const ggml_custom_op_t fun = lq_custom_fun(op);
    if (fun == logquant_attn_compute) {
        const ggml_tensor * q = op->src[0];
        const ggml_tensor * k = op->src[1];
        const ggml_tensor * v = op->src[2];
        const ggml_tensor * s2c = op->src[6];
        if (q == nullptr || k == nullptr || v == nullptr || op->src[3] == nullptr || op->src[4] == nullptr ||
            op->src[5] == nullptr || s2c == nullptr) {
            return false;
        }
        const int64_t D = k->ne[0];
        return q->type == GGML_TYPE_F32 && k->type == GGML_TYPE_LQ2 && v->type == GGML_TYPE_LQ2 &&
               op->src[3]->type == GGML_TYPE_F16 && op->src[4]->type == GGML_TYPE_F16 && op->src[5]->type == GGML_TYPE_F16 &&
               s2c->type == GGML_TYPE_I32 && ggml_is_contiguous(s2c) && (D == 64 || D == 128 || D == 256) &&
               v->ne[0] == D && q->ne[0] == D && v->ne[2] == k->ne[2] && q->ne[2] % k->ne[2] == 0 &&
               op->src[4]->ne[0] % D == 0 && ggml_is_contiguous(op) && q->nb[0] == sizeof(float) &&
               op->src[4]->nb[0] == sizeof(half) && op->src[5]->nb[0] == sizeof(half) && op->src[4]->nb[1] == op->src[5]->nb[1] &&
               k->ne[1] <= INT32_MAX / 2;
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
