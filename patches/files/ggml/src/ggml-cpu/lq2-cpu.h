// CPU kernels of LogQuant's 2- and 3-bit KV formats (GGML_TYPE_LQ2/LQ3; see ggml-lq2.h).
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// from_float for set_rows: every token is quantized once, when it is written.
void quantize_row_lq2(const float * x, void * y, int64_t k);

// Dot product of n values of an LQ2 row (vx) with an f32 row (vy): the query is
// kept in f32 (vec_dot_type = GGML_TYPE_F32), so K.q carries no rounding of q.
void ggml_vec_dot_lq2_f32(int n, float * s, size_t bs, const void * vx, size_t bx, const void * vy, size_t by, int nrc);

// The same for LQ3.
void quantize_row_lq3(const float * x, void * y, int64_t k);
void ggml_vec_dot_lq3_f32(int n, float * s, size_t bs, const void * vx, size_t bx, const void * vy, size_t by, int nrc);

#ifdef __cplusplus
}
#endif
