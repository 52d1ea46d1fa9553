// LogQuant's 2- and 3-bit KV formats (GGML_TYPE_LQ2, GGML_TYPE_LQ3, ggml-lq2.h) on
// CUDA: the quantizer that set_rows runs for every token written into the cache, and
// the value of one entry of a block.
//
// It repeats ggml-lq2.c's quantize_row_lq2_ref / quantize_row_lq3_ref (min/max, then the
// least-squares fit of step and minimum in double precision, then LQ3's byte step and
// half-step minimum) with round-to-nearest
// intrinsics, so that --use_fast_math changes none of its arithmetic: the blocks equal
// the CPU's except where an input is an f32 denormal (flushed to zero here).
#pragma once

#include "common.cuh"
#include "ggml-lq2.h"

#define LQ2_CUDA_F16_MAX    65504.0f
#define LQ2_CUDA_FIT_ROUNDS 4 // ggml-lq2.c's LQ2_FIT_ROUNDS

static __device__ __forceinline__ float lq2_cuda_clamp(float v) {
    return v > LQ2_CUDA_F16_MAX ? LQ2_CUDA_F16_MAX : (v < -LQ2_CUDA_F16_MAX ? -LQ2_CUDA_F16_MAX : v);
}

template <int QMAX>
static __device__ __forceinline__ int lq2_cuda_level(float x, float m, float id) {
    const float t = __fmul_rn(__fsub_rn(x, m), id);
    return !(t > 0.0f) ? 0 : (t >= (float) QMAX ? QMAX : (int) __fadd_rn(t, 0.5f));
}

// The block type of each format and its largest level.
template <typename block> struct lq_format;
template <> struct lq_format<block_lq2> { static constexpr int qmax = 3; };
template <> struct lq_format<block_lq3> { static constexpr int qmax = 7; };

// Level of value j (0..63) of a block.
static __device__ __forceinline__ int lq_code(const block_lq2 & b, const int j) {
    return (b.qs[j/4] >> (2*(j%4))) & 3;
}
static __device__ __forceinline__ int lq_code(const block_lq3 & b, const int j) {
    return ((b.qs[j/4] >> (2*(j%4))) & 3) | (((b.qh[j/8] >> (j%8)) & 1) << 2);
}

// LQ3's byte step c: (16 + c % 16) 2^(c / 16 - 12), exact (ggml-lq2.c's ggml_lq3_steps).
static __device__ __forceinline__ float lq3_cuda_step(const int c) {
    return __fmul_rn((float) (16 + (c & 15)), __int_as_float(((c >> 4) - 12 + 127) << 23));
}

// Value j of a block: m + d*q (fused here; the CPU's dequantize_row_lq2/lq3 may round
// d*q first: the same value once rounded to f16, or within an f32 ulp).
static __device__ __forceinline__ float lq_value(const block_lq2 & b, const int j) {
    const float d = __half2float(__ushort_as_half(b.d)); // (ggml_fp16_t: the bits of a half)
    const float m = __half2float(__ushort_as_half(b.m));
    return fmaf(d, (float) lq_code(b, j), m);
}
static __device__ __forceinline__ float lq_value(const block_lq3 & b, const int j) {
    const float d = lq3_cuda_step(b.d8);
    const float m = __fmul_rn(__fmul_rn(0.5f, d), (float) b.m8); // exact, as ggml_lq3_min
    return fmaf(d, (float) lq_code(b, j), m);
}

// One block of 64 values by one warp (2 values per lane): min/max and the fit's sums
// are warp reductions. A thread per block would run the four fit rounds' 64-step
// loops serially, ~50 us per set_rows: on a decode step's critical path 64 times.
// The sums of the fit are sums of integers (n, q, q*q: exact in any order) and of
// floats and small multiples of floats in double precision (exact unless a group
// spans more than ~2^20 in magnitude), so the tree order gives the CPU's sequential
// result.
static __device__ __forceinline__ double lq2_warp_sum(double v) {
#pragma unroll
    for (int off = WARP_SIZE/2; off > 0; off >>= 1) {
        v += __shfl_xor_sync(0xffffffff, v, off);
    }
    return v;
}

template <typename block>
static __device__ void quantize_lq_warp(const float * __restrict__ x, block * __restrict__ y, const int lane) {
    constexpr int QMAX = lq_format<block>::qmax;
    const float xv[2] = { x[2*lane], x[2*lane + 1] };
    // fminf/fmaxf skip NaN, as the CPU's comparisons do; all NaN gives NaN here
    float mn = fminf(xv[0], xv[1]);
    float mx = fmaxf(xv[0], xv[1]);
#pragma unroll
    for (int off = WARP_SIZE/2; off > 0; off >>= 1) {
        mn = fminf(mn, __shfl_xor_sync(0xffffffff, mn, off));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, off));
    }
    if (isnan(mn) || mn > mx) {
        mn = mx = 0.0f;
    }
    mn = lq2_cuda_clamp(mn);
    mx = lq2_cuda_clamp(mx);
    double m = mn;
    double d = __fdiv_rn(__fsub_rn(mx, mn), (float) QMAX);
    for (int round = 0; round < LQ2_CUDA_FIT_ROUNDS; round++) {
        if (!(d > 0.0)) {
            break;
        }
        const float mf  = (float) m;
        const float idf = __fdiv_rn(1.0f, (float) d);
        double n = 0.0, sq = 0.0, sqq = 0.0, sx = 0.0, sqx = 0.0;
#pragma unroll
        for (int k = 0; k < 2; k++) {
            if (isnan(xv[k])) {
                continue;
            }
            const double v = lq2_cuda_clamp(xv[k]);
            const double q = lq2_cuda_level<QMAX>((float) v, mf, idf);
            n   = __dadd_rn(n, 1.0);
            sq  = __dadd_rn(sq, q);
            sqq = __fma_rn(q, q, sqq);
            sx  = __dadd_rn(sx, v);
            sqx = __fma_rn(q, v, sqx);
        }
        n   = lq2_warp_sum(n);
        sq  = lq2_warp_sum(sq);
        sqq = lq2_warp_sum(sqq);
        sx  = lq2_warp_sum(sx);
        sqx = lq2_warp_sum(sqx);
        const double det = __fma_rn(n, sqq, -__dmul_rn(sq, sq));
        if (!(det > 0.0)) {
            break;
        }
        const double d2 = __ddiv_rn(__fma_rn(n, sqx, -__dmul_rn(sq, sx)), det);
        const double m2 = __ddiv_rn(__fma_rn(-d2, sq, sx), n);
        if (!(d2 > 0.0) || !isfinite(m2)) {
            break;
        }
        m = m2;
        d = d2;
    }
    const float mf = lq2_cuda_clamp((float) m);
    const float df = lq2_cuda_clamp((float) d);
    float mq, dq;
    if constexpr (QMAX == 7) {
        // ggml-lq2.c's lq3_scale, in every lane: the nearest byte step, raised until
        // 63.5 steps reach |m|, and m in half steps
        int best = 0;
        float err = fabsf(__fsub_rn(lq3_cuda_step(0), df));
        for (int c = 1; c < 256; c++) {
            const float e = fabsf(__fsub_rn(lq3_cuda_step(c), df));
            if (e < err) {
                err = e;
                best = c;
            }
        }
        const float am = fabsf(mf);
        while (best < 255 && __fmul_rn(lq3_cuda_step(best), 63.5f) < am) {
            best++;
        }
        dq = lq3_cuda_step(best);
        float k = roundf(__fdiv_rn(__fmul_rn(2.0f, mf), dq));
        k = k < -127.0f ? -127.0f : (k > 127.0f ? 127.0f : k);
        mq = __fmul_rn(__fmul_rn(0.5f, dq), k);
        if (lane == 0) {
            y->d8 = (uint8_t) best;
            y->m8 = (int8_t) k;
        }
    } else {
        const half m_h = __float2half_rn(mf);
        const half d_h = __float2half_rn(df);
        mq = __half2float(m_h);
        dq = __half2float(d_h);
        if (lane == 0) {
            y->d = __half_as_ushort(d_h);
            y->m = __half_as_ushort(m_h);
        }
    }
    const float id = dq > 0.0f ? __fdiv_rn(1.0f, dq) : 0.0f;
    // values 2*lane and 2*lane + 1: low bits 4*(lane % 2) .. +3 of byte lane/2 of qs
    const int q0 = lq2_cuda_level<QMAX>(xv[0], mq, id);
    const int q1 = lq2_cuda_level<QMAX>(xv[1], mq, id);
    const uint32_t part = (q0 & 3) | ((q1 & 3) << 2);
    const uint32_t next = __shfl_down_sync(0xffffffff, part, 1);
    if (lane % 2 == 0) {
        y->qs[lane/2] = (uint8_t) (part | (next << 4));
    }
    if constexpr (QMAX == 7) {
        // high bits: value j at bit j % 8 of qh[j / 8]; lanes 4k..4k+3 hold byte k's 8
        uint32_t hi = ((q0 >> 2) << (2*(lane % 4))) | ((q1 >> 2) << (2*(lane % 4) + 1));
        hi |= __shfl_down_sync(0xffffffff, hi, 1);
        hi |= __shfl_down_sync(0xffffffff, hi, 2);
        if (lane % 4 == 0) {
            y->qh[lane/4] = (uint8_t) hi;
        }
    }
}

// set_rows into an lq2 or lq3 tensor: one warp per 64-value block of the source rows.
template <typename block, typename idx_t>
static __global__ void k_set_rows_lq(const float * __restrict__ src0, const idx_t * __restrict__ src1, char * __restrict__ dst,
        const int64_t n_blocks, const int64_t blocks_per_row, const int64_t ne01, const int64_t ne02, const int64_t ne11,
        const int64_t ne12, const int64_t s01, const int64_t s02, const int64_t s03, const int64_t s10, const int64_t s11,
        const int64_t s12, const int64_t nb1, const int64_t nb2, const int64_t nb3) {
    const int64_t ib   = (int64_t) blockIdx.x*(blockDim.x/WARP_SIZE) + threadIdx.x/WARP_SIZE;
    const int     lane = threadIdx.x % WARP_SIZE;
    if (ib >= n_blocks) {
        return;
    }
    const int64_t i00 = ib % blocks_per_row;
    int64_t r = ib / blocks_per_row;
    const int64_t i01 = r % ne01;
    r /= ne01;
    const int64_t i02 = r % ne02;
    const int64_t i03 = r / ne02;
    const int64_t dst_row = src1[i01*s10 + (i02 % ne11)*s11 + (i03 % ne12)*s12];
    const float * x = src0 + i01*s01 + i02*s02 + i03*s03 + i00*QK_LQ2;
    block * y = (block *) (dst + dst_row*nb1 + i02*nb2 + i03*nb3) + i00;
    quantize_lq_warp(x, y, lane);
}

template <typename idx_t>
static void set_rows_cuda_lq(const ggml_type type, const float * src0_d, const idx_t * src1_d, char * dst_d,
        const int64_t ne00, const int64_t ne01, const int64_t ne02, const int64_t ne03,
        const int64_t ne11, const int64_t ne12,
        const size_t nb01, const size_t nb02, const size_t nb03,
        const size_t nb10, const size_t nb11, const size_t nb12,
        const size_t nb1, const size_t nb2, const size_t nb3, cudaStream_t stream) {
    GGML_ASSERT(ne00 % QK_LQ2 == 0);
    const int64_t blocks_per_row = ne00 / QK_LQ2;
    const int64_t n_blocks = blocks_per_row*ne01*ne02*ne03;
    if (n_blocks == 0) {
        return;
    }
    constexpr int warps = 4;
    auto kernel = type == GGML_TYPE_LQ3 ? k_set_rows_lq<block_lq3, idx_t> : k_set_rows_lq<block_lq2, idx_t>;
    kernel<<<(n_blocks + warps - 1)/warps, warps*WARP_SIZE, 0, stream>>>(src0_d, src1_d, dst_d, n_blocks,
        blocks_per_row, ne01, ne02, ne11, ne12, nb01/sizeof(float), nb02/sizeof(float), nb03/sizeof(float),
        nb10/sizeof(idx_t), nb11/sizeof(idx_t), nb12/sizeof(idx_t), nb1, nb2, nb3);
}
