// CPU kernels of LogQuant's 2- and 3-bit KV formats. See ggml-lq2.h for the format.
#include "lq2-cpu.h"

#include "ggml-cpu-impl.h"
#include "ggml-lq2.h"
#include "simd-mappings.h"

#include <assert.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

void quantize_row_lq2(const float * x, void * y, int64_t k) {
    quantize_row_lq2_ref(x, (block_lq2 *) y, k);
}

// sum_j (m + d q_j) y_j over the row, block by block.
void ggml_vec_dot_lq2_f32(int n, float * s, size_t bs, const void * vx, size_t bx, const void * vy, size_t by, int nrc) {
    assert(nrc == 1);
    assert(n % QK_LQ2 == 0);
    (void) bs; (void) bx; (void) by; (void) nrc;

    const block_lq2 * x = (const block_lq2 *) vx;
    const float     * y = (const float *) vy;
    const int nb = n / QK_LQ2;

#if defined(__AVX2__) && defined(__FMA__)
    // Each byte of qs holds 4 levels; the table turns a byte into those 4 floats, two
    // bytes make 8 lanes: 8 loads + 16 FMAs per block of 64 values.
    const float (*lut)[4] = ggml_lq2_levels;
    __m256 acc = _mm256_setzero_ps();
    for (int i = 0; i < nb; i++) {
        const __m256 d = _mm256_set1_ps(GGML_CPU_FP16_TO_FP32(x[i].d));
        const __m256 m = _mm256_set1_ps(GGML_CPU_FP16_TO_FP32(x[i].m));
        const uint8_t * qs = x[i].qs;
        const float * yb = y + i*QK_LQ2;
        for (int k = 0; k < QK_LQ2/8; k++) {
            const __m256 q = _mm256_set_m128(_mm_loadu_ps(lut[qs[2*k + 1]]), _mm_loadu_ps(lut[qs[2*k]]));
            acc = _mm256_fmadd_ps(_mm256_fmadd_ps(d, q, m), _mm256_loadu_ps(yb + 8*k), acc);
        }
    }
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    *s = _mm_cvtss_f32(r);
#else
    float sum = 0.0f;
    for (int i = 0; i < nb; i++) {
        const float d = GGML_CPU_FP16_TO_FP32(x[i].d);
        const float m = GGML_CPU_FP16_TO_FP32(x[i].m);
        const float * yb = y + i*QK_LQ2;
        float sy = 0.0f, sqy = 0.0f;
        for (int j = 0; j < QK_LQ2; j++) {
            const int q = (x[i].qs[j/4] >> (2*(j%4))) & 3;
            sy  += yb[j];
            sqy += (float) q*yb[j];
        }
        sum += m*sy + d*sqy;
    }
    *s = sum;
#endif
}

void quantize_row_lq3(const float * x, void * y, int64_t k) {
    quantize_row_lq3_ref(x, (block_lq3 *) y, k);
}

// sum_j (m + d q_j) y_j with q_j = low 2 bits (LQ2's table) + the high bit (ggml_lq3_high).
void ggml_vec_dot_lq3_f32(int n, float * s, size_t bs, const void * vx, size_t bx, const void * vy, size_t by, int nrc) {
    assert(nrc == 1);
    assert(n % QK_LQ2 == 0);
    (void) bs; (void) bx; (void) by; (void) nrc;

    const block_lq3 * x = (const block_lq3 *) vx;
    const float     * y = (const float *) vy;
    const int nb = n / QK_LQ2;

#if defined(__AVX2__) && defined(__FMA__)
    const float (*lut)[4] = ggml_lq2_levels;
    __m256 acc = _mm256_setzero_ps();
    for (int i = 0; i < nb; i++) {
        const __m256 d = _mm256_set1_ps(ggml_lq3_step(&x[i]));
        const __m256 m = _mm256_set1_ps(ggml_lq3_min(&x[i]));
        const uint8_t * qs = x[i].qs;
        const float * yb = y + i*QK_LQ2;
        for (int k = 0; k < QK_LQ2/8; k++) {
            const __m256 lo = _mm256_set_m128(_mm_loadu_ps(lut[qs[2*k + 1]]), _mm_loadu_ps(lut[qs[2*k]]));
            const __m256 q  = _mm256_add_ps(lo, _mm256_loadu_ps(ggml_lq3_high[x[i].qh[k]]));
            acc = _mm256_fmadd_ps(_mm256_fmadd_ps(d, q, m), _mm256_loadu_ps(yb + 8*k), acc);
        }
    }
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    *s = _mm_cvtss_f32(r);
#else
    float sum = 0.0f;
    for (int i = 0; i < nb; i++) {
        const float d = ggml_lq3_step(&x[i]);
        const float m = ggml_lq3_min(&x[i]);
        const float * yb = y + i*QK_LQ2;
        float sy = 0.0f, sqy = 0.0f;
        for (int j = 0; j < QK_LQ2; j++) {
            const int q = ((x[i].qs[j/4] >> (2*(j%4))) & 3) | (((x[i].qh[j/8] >> (j%8)) & 1) << 2);
            sy  += yb[j];
            sqy += (float) q*yb[j];
        }
        sum += m*sy + d*sqy;
    }
    *s = sum;
#endif
}
