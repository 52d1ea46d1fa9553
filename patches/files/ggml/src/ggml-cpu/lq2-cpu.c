// CPU kernels of LogQuant's 2-bit KV format. See ggml-lq2.h for the format.
#include "lq2-cpu.h"

#include "ggml-cpu-impl.h"
#include "ggml-lq2.h"
#include "simd-mappings.h"

#include <assert.h>

void quantize_row_lq2(const float * x, void * y, int64_t k) {
    quantize_row_lq2_ref(x, (block_lq2 *) y, k);
}

// sum_j (m + d q_j) y_j = m * sum_j y_j + d * sum_j q_j y_j, per block of 64.
// The inner loops are plain float arithmetic over fixed-size arrays, which the
// compiler vectorizes (AVX2/FMA in the default x86-64-v3 build).
void ggml_vec_dot_lq2_f32(int n, float * s, size_t bs, const void * vx, size_t bx, const void * vy, size_t by, int nrc) {
    assert(nrc == 1);
    assert(n % QK_LQ2 == 0);
    (void) bs; (void) bx; (void) by; (void) nrc;

    const block_lq2 * x = (const block_lq2 *) vx;
    const float     * y = (const float *) vy;
    const int nb = n / QK_LQ2;

    float sum = 0.0f;
    for (int i = 0; i < nb; i++) {
        const float * yb = y + i*QK_LQ2;
        float q[QK_LQ2];
        for (int j = 0; j < QK_LQ2/4; j++) {
            const uint8_t b = x[i].qs[j];
            q[4*j + 0] = (float) ((b >> 0) & 3);
            q[4*j + 1] = (float) ((b >> 2) & 3);
            q[4*j + 2] = (float) ((b >> 4) & 3);
            q[4*j + 3] = (float) ((b >> 6) & 3);
        }
        float sy = 0.0f, sqy = 0.0f;
        for (int j = 0; j < QK_LQ2; j++) {
            sy  += yb[j];
            sqy += q[j]*yb[j];
        }
        sum += GGML_CPU_FP16_TO_FP32(x[i].m)*sy + GGML_CPU_FP16_TO_FP32(x[i].d)*sqy;
    }
    *s = sum;
}
