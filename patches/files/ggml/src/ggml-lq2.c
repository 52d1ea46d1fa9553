// LogQuant's 2- and 3-bit block formats: reference quantization and dequantization.
// See ggml-lq2.h for the format.
#include "ggml-lq2.h"
#include "ggml-impl.h"

#include <assert.h>
#include <math.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#define LQ2_L(b)   { (float) ((b) & 3), (float) (((b) >> 2) & 3), (float) (((b) >> 4) & 3), (float) (((b) >> 6) & 3) }
#define LQ2_R4(b)  LQ2_L(b), LQ2_L((b) + 1), LQ2_L((b) + 2), LQ2_L((b) + 3)
#define LQ2_R16(b) LQ2_R4(b), LQ2_R4((b) + 4), LQ2_R4((b) + 8), LQ2_R4((b) + 12)
#define LQ2_R64(b) LQ2_R16(b), LQ2_R16((b) + 16), LQ2_R16((b) + 32), LQ2_R16((b) + 48)

const float ggml_lq2_levels[256][4] = { LQ2_R64(0), LQ2_R64(64), LQ2_R64(128), LQ2_R64(192) };

#define LQ3_H(b)   { 4.0f * ((b) & 1), 4.0f * (((b) >> 1) & 1), 4.0f * (((b) >> 2) & 1), 4.0f * (((b) >> 3) & 1), \
                     4.0f * (((b) >> 4) & 1), 4.0f * (((b) >> 5) & 1), 4.0f * (((b) >> 6) & 1), 4.0f * (((b) >> 7) & 1) }
#define LQ3_R4(b)  LQ3_H(b), LQ3_H((b) + 1), LQ3_H((b) + 2), LQ3_H((b) + 3)
#define LQ3_R16(b) LQ3_R4(b), LQ3_R4((b) + 4), LQ3_R4((b) + 8), LQ3_R4((b) + 12)
#define LQ3_R64(b) LQ3_R16(b), LQ3_R16((b) + 16), LQ3_R16((b) + 32), LQ3_R16((b) + 48)

const float ggml_lq3_high[256][8] = { LQ3_R64(0), LQ3_R64(64), LQ3_R64(128), LQ3_R64(192) };

#define LQ3_S(c)   ((float) (16 + ((c) & 15)) * (1.0f / 4096.0f) * (float) (1 << ((c) >> 4)))
#define LQ3_S4(c)  LQ3_S(c), LQ3_S((c) + 1), LQ3_S((c) + 2), LQ3_S((c) + 3)
#define LQ3_S16(c) LQ3_S4(c), LQ3_S4((c) + 4), LQ3_S4((c) + 8), LQ3_S4((c) + 12)
#define LQ3_S64(c) LQ3_S16(c), LQ3_S16((c) + 16), LQ3_S16((c) + 32), LQ3_S16((c) + 48)

const float ggml_lq3_steps[256] = { LQ3_S64(0), LQ3_S64(64), LQ3_S64(128), LQ3_S64(192) };

_Static_assert(sizeof(block_lq2) == 20, "lq2 blocks are 20 bytes");
_Static_assert(sizeof(block_lq3) == 26, "lq3 blocks are 26 bytes");

// Largest finite f16.
#define LQ2_F16_MAX 65504.0f

static float lq2_clamp_f16(float v) {
    return v > LQ2_F16_MAX ? LQ2_F16_MAX : (v < -LQ2_F16_MAX ? -LQ2_F16_MAX : v);
}

// Refines the group's minimum m and step d by least squares: a few rounds of
// "assign each value its nearest level, then fit m + d*q to the values" (Lloyd's
// algorithm on the uniform grid of qmax + 1 levels), starting from min/max. On Gaussian-like data
// (K and V after llama.cpp's Hadamard rotation) this halves the mean squared error of
// plain min/max scaling, at the price of clipping the extremes; the block format and
// every kernel that reads it are unchanged. Values are clamped to the f16 range and
// NaN is left out. Products are written as explicit fma() so that no compiler
// contraction changes the result: src/lq2.rs repeats this bit for bit.
#define LQ2_FIT_ROUNDS 4

static int lq2_level(float x, float m, float id, int qmax) {
    const float t = (x - m) * id;
    // !(t > 0) also catches NaN
    return !(t > 0.0f) ? 0 : (t >= (float) qmax ? qmax : (int) (t + 0.5f));
}

static void lq2_fit(const float * x, float * m_io, float * d_io, int qmax) {
    double m = *m_io;
    double d = *d_io;
    for (int round = 0; round < LQ2_FIT_ROUNDS; round++) {
        if (!(d > 0.0)) {
            break;
        }
        const float mf = (float) m;
        const float idf = 1.0f / (float) d;
        double n = 0.0, sq = 0.0, sqq = 0.0, sx = 0.0, sqx = 0.0;
        for (int j = 0; j < QK_LQ2; j++) {
            if (isnan(x[j])) {
                continue;
            }
            const double v = lq2_clamp_f16(x[j]);
            const double q = lq2_level((float) v, mf, idf, qmax);
            n   += 1.0;
            sq  += q;
            sqq  = fma(q, q, sqq);
            sx  += v;
            sqx  = fma(q, v, sqx);
        }
        const double det = fma(n, sqq, -(sq*sq));
        if (!(det > 0.0)) {
            break;
        }
        const double d2 = fma(n, sqx, -(sq*sx)) / det;
        const double m2 = fma(-d2, sq, sx) / n;
        if (!(d2 > 0.0) || !isfinite(m2)) {
            break;
        }
        m = m2;
        d = d2;
    }
    *m_io = lq2_clamp_f16((float) m);
    *d_io = lq2_clamp_f16((float) d);
}

// One block of 64 values: min/max, refined by least squares into the minimum *m and
// the step *d (clamped to the f16 range).
static void lq_fit_block(const float * xb, int qmax, float * m, float * d) {
    float mn = INFINITY;
    float mx = -INFINITY;
    for (int j = 0; j < QK_LQ2; j++) {
        const float v = xb[j];
        if (v < mn) mn = v; // NaN compares false: it never becomes min or max
        if (v > mx) mx = v;
    }
    if (mn > mx) { // every value NaN
        mn = mx = 0.0f;
    }
    mn = lq2_clamp_f16(mn);
    mx = lq2_clamp_f16(mx);

    *m = mn;
    *d = (mx - mn) / (float) qmax;
    lq2_fit(xb, m, d, qmax);
}

// LQ2's block: m and d as f16, then the levels q[j] in 0..3.
static void lq2_quantize_block(const float * xb, ggml_fp16_t * d_out, ggml_fp16_t * m_out, uint8_t * q) {
    const int qmax = 3;
    float m0, d0;
    lq_fit_block(xb, qmax, &m0, &d0);

    // Quantize against the values the block will really hold (f16-rounded), so
    // the rounding of q is consistent with the dequantized levels.
    const ggml_fp16_t m_h = GGML_FP32_TO_FP16(m0);
    const ggml_fp16_t d_h = GGML_FP32_TO_FP16(d0);
    const float m  = GGML_FP16_TO_FP32(m_h);
    const float d  = GGML_FP16_TO_FP32(d_h);
    const float id = d > 0.0f ? 1.0f / d : 0.0f;

    *d_out = d_h;
    *m_out = m_h;
    for (int j = 0; j < QK_LQ2; j++) {
        q[j] = (uint8_t) lq2_level(xb[j], m, id, qmax);
    }
}

// LQ3's step and minimum bytes for the fitted (m0, d0): the nearest byte step (the
// first of two equally near), raised until 63.5 steps reach |m0|, then m0 in half steps
// rounded to nearest (halves away from zero). Every product here is exact in f32;
// lq2.cuh and src/lq2.rs repeat it bit for bit.
static void lq3_scale(float m0, float d0, uint8_t * d8, int8_t * m8) {
    int best = 0;
    float err = fabsf(ggml_lq3_steps[0] - d0);
    for (int c = 1; c < 256; c++) {
        const float e = fabsf(ggml_lq3_steps[c] - d0);
        if (e < err) {
            err = e;
            best = c;
        }
    }
    const float am = fabsf(m0);
    while (best < 255 && ggml_lq3_steps[best] * 63.5f < am) {
        best++;
    }
    float k = roundf(2.0f * m0 / ggml_lq3_steps[best]);
    k = k < -127.0f ? -127.0f : (k > 127.0f ? 127.0f : k);
    *d8 = (uint8_t) best;
    *m8 = (int8_t) k;
}

void quantize_row_lq2_ref(const float * x, block_lq2 * y, int64_t k) {
    assert(k % QK_LQ2 == 0);
    const int64_t nb = k / QK_LQ2;

    for (int64_t i = 0; i < nb; i++) {
        uint8_t q[QK_LQ2];
        lq2_quantize_block(x + i*QK_LQ2, &y[i].d, &y[i].m, q);
        memset(y[i].qs, 0, sizeof(y[i].qs));
        for (int j = 0; j < QK_LQ2; j++) {
            y[i].qs[j/4] |= (uint8_t) (q[j] << (2*(j%4)));
        }
    }
}

void quantize_row_lq3_ref(const float * x, block_lq3 * y, int64_t k) {
    assert(k % QK_LQ2 == 0);
    const int64_t nb = k / QK_LQ2;

    for (int64_t i = 0; i < nb; i++) {
        const float * xb = x + i*QK_LQ2;
        float m0, d0;
        lq_fit_block(xb, 7, &m0, &d0);
        lq3_scale(m0, d0, &y[i].d8, &y[i].m8);
        const float m  = ggml_lq3_min(&y[i]);
        const float id = 1.0f / ggml_lq3_step(&y[i]);
        memset(y[i].qs, 0, sizeof(y[i].qs));
        memset(y[i].qh, 0, sizeof(y[i].qh));
        for (int j = 0; j < QK_LQ2; j++) {
            const int q = lq2_level(xb[j], m, id, 7);
            y[i].qs[j/4] |= (uint8_t) ((q & 3) << (2*(j%4)));
            y[i].qh[j/8] |= (uint8_t) ((q >> 2) << (j%8));
        }
    }
}

void dequantize_row_lq2(const block_lq2 * x, float * y, int64_t k) {
    assert(k % QK_LQ2 == 0);
    const int64_t nb = k / QK_LQ2;

    for (int64_t i = 0; i < nb; i++) {
        const float d = GGML_FP16_TO_FP32(x[i].d);
        const float m = GGML_FP16_TO_FP32(x[i].m);
        float * yb = y + i*QK_LQ2;
#if defined(__AVX2__) && defined(__FMA__)
        // Attention's V path calls this for every cell: 8 values per step via the table.
        const __m256 dv = _mm256_set1_ps(d);
        const __m256 mv = _mm256_set1_ps(m);
        for (int j = 0; j < QK_LQ2/8; j++) {
            const __m256 q = _mm256_set_m128(_mm_loadu_ps(ggml_lq2_levels[x[i].qs[2*j + 1]]),
                                             _mm_loadu_ps(ggml_lq2_levels[x[i].qs[2*j]]));
            _mm256_storeu_ps(yb + 8*j, _mm256_fmadd_ps(dv, q, mv));
        }
#else
        for (int j = 0; j < QK_LQ2; j++) {
            yb[j] = m + d*ggml_lq2_levels[x[i].qs[j/4]][j%4];
        }
#endif
    }
}

size_t quantize_lq2(const float * src, void * dst, int64_t nrow, int64_t n_per_row, const float * imatrix) {
    (void) imatrix;
    const size_t row_size = (size_t) (n_per_row / QK_LQ2) * sizeof(block_lq2);
    for (int64_t r = 0; r < nrow; r++) {
        quantize_row_lq2_ref(src + r*n_per_row, (block_lq2 *) ((char *) dst + r*row_size), n_per_row);
    }
    return (size_t) nrow * row_size;
}

void dequantize_row_lq3(const block_lq3 * x, float * y, int64_t k) {
    assert(k % QK_LQ2 == 0);
    const int64_t nb = k / QK_LQ2;

    for (int64_t i = 0; i < nb; i++) {
        const float d = ggml_lq3_step(&x[i]);
        const float m = ggml_lq3_min(&x[i]);
        float * yb = y + i*QK_LQ2;
        for (int j = 0; j < QK_LQ2; j++) {
            yb[j] = m + d*(ggml_lq2_levels[x[i].qs[j/4]][j%4] + ggml_lq3_high[x[i].qh[j/8]][j%8]);
        }
    }
}

size_t quantize_lq3(const float * src, void * dst, int64_t nrow, int64_t n_per_row, const float * imatrix) {
    (void) imatrix;
    const size_t row_size = (size_t) (n_per_row / QK_LQ2) * sizeof(block_lq3);
    for (int64_t r = 0; r < nrow; r++) {
        quantize_row_lq3_ref(src + r*n_per_row, (block_lq3 *) ((char *) dst + r*row_size), n_per_row);
    }
    return (size_t) nrow * row_size;
}

// Channel j of QK_LQ2 rows of n values as block j of the group, by the row quantizer q.
static void quantize_by_channel(const float * x, char * group, size_t block_bytes, int64_t n,
                                void (*q)(const float *, char *)) {
    float col[QK_LQ2];
    for (int64_t j = 0; j < n; j++) {
        for (int t = 0; t < QK_LQ2; t++) {
            col[t] = x[t*n + j];
        }
        q(col, group + j*block_bytes);
    }
}

static void quantize_block_lq2(const float * x, char * y) { quantize_row_lq2_ref(x, (block_lq2 *) y, QK_LQ2); }
static void quantize_block_lq3(const float * x, char * y) { quantize_row_lq3_ref(x, (block_lq3 *) y, QK_LQ2); }

void quantize_lq2_by_channel(const float * x, block_lq2 * group, int64_t n) {
    quantize_by_channel(x, (char *) group, sizeof(block_lq2), n, quantize_block_lq2);
}

void dequantize_lq2_by_channel_row(const block_lq2 * group, int t, int64_t j0, int64_t nj, float * y) {
    assert(t >= 0 && t < QK_LQ2);
    const int byte = t / 4, shift = 2 * (t % 4);
    for (int64_t j = 0; j < nj; j++) {
        const block_lq2 * b = group + j0 + j;
        const float d = GGML_FP16_TO_FP32(b->d);
        const float m = GGML_FP16_TO_FP32(b->m);
        y[j] = m + d * (float) ((b->qs[byte] >> shift) & 3);
    }
}

void quantize_lq3_by_channel(const float * x, block_lq3 * group, int64_t n) {
    quantize_by_channel(x, (char *) group, sizeof(block_lq3), n, quantize_block_lq3);
}

void dequantize_lq3_by_channel_row(const block_lq3 * group, int t, int64_t j0, int64_t nj, float * y) {
    assert(t >= 0 && t < QK_LQ2);
    const int byte = t / 4, shift = 2 * (t % 4);
    for (int64_t j = 0; j < nj; j++) {
        const block_lq3 * b = group + j0 + j;
        const float d = ggml_lq3_step(b);
        const float m = ggml_lq3_min(b);
        const int   q = ((b->qs[byte] >> shift) & 3) | (((b->qh[t / 8] >> (t % 8)) & 1) << 2);
        y[j] = m + d * (float) q;
    }
}

bool ggml_lq_quantize_by_channel(enum ggml_type type, const float * x, void * group, int64_t n) {
    switch (type) {
        case GGML_TYPE_LQ2: quantize_lq2_by_channel(x, (block_lq2 *) group, n); return true;
        case GGML_TYPE_LQ3: quantize_lq3_by_channel(x, (block_lq3 *) group, n); return true;
        default: return false;
    }
}

bool ggml_lq_dequantize_by_channel_row(enum ggml_type type, const void * group, int t, int64_t j0, int64_t nj, float * y) {
    switch (type) {
        case GGML_TYPE_LQ2: dequantize_lq2_by_channel_row((const block_lq2 *) group, t, j0, nj, y); return true;
        case GGML_TYPE_LQ3: dequantize_lq3_by_channel_row((const block_lq3 *) group, t, j0, nj, y); return true;
        default: return false;
    }
}
