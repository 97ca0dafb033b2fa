// RMSNorm and SiLU-and-multiply in one pass each over bf16 rows, for CPUs with AVX2 and FMA but no bf16
// instructions, rounding to nearest even (NaN -> 0x7fc0) where the PyTorch composites round, as kernels/pointwise.c
// does with AVX512-BF16 (same functions, same signatures). Rows are split over `threads` OpenMP threads. Compiled
// at run time by ovis2/fused_pointwise.py with -mavx2 -mfma -fopenmp.
#include <math.h>
#include <stdint.h>

#include "avx2_bf16.h"
#include "avx2_silu.h"

static inline float round1(float value) { return widen1(to_bf16(value)); }

// out = bf16(bf16(x * rsqrt(mean(x^2) + eps)) * weight) (`weight * F.rms_norm(x)`).
void rms_norm_bf16(const uint16_t* x, const uint16_t* weight, uint16_t* out, int64_t rows, int64_t dim,
                   float eps, int threads) {
  const int64_t body = dim / 8 * 8;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t row = 0; row < rows; row++) {
    const uint16_t* in = x + row * dim;
    uint16_t* y = out + row * dim;
    __m256 squares = _mm256_setzero_ps();
    for (int64_t i = 0; i < body; i += 8) {
      __m256 v = widen8(in + i);
      squares = _mm256_fmadd_ps(v, v, squares);
    }
    float total = sum8(squares);
    for (int64_t i = body; i < dim; i++) total += widen1(in[i]) * widen1(in[i]);
    const float scale = 1.0f / sqrtf(total / (float)dim + eps);
    const __m256 scales = _mm256_set1_ps(scale);
    for (int64_t i = 0; i < body; i += 8)
      store8(y + i, _mm256_mul_ps(round_bf16(_mm256_mul_ps(widen8(in + i), scales)), widen8(weight + i)));
    for (int64_t i = body; i < dim; i++) y[i] = to_bf16(round1(widen1(in[i]) * scale) * widen1(weight[i]));
  }
}

// out = bf16(bf16(silu(gate)) * up), rows of `cols` values; gate's and up's rows `stride` values apart (the two
// halves of one fused gate/up product), out's `cols` apart.
void silu_mul_bf16(const uint16_t* gate, const uint16_t* up, uint16_t* out, int64_t rows, int64_t cols,
                   int64_t stride, int threads) {
  const int64_t body = cols / 8 * 8;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t row = 0; row < rows; row++) {
    const uint16_t *g = gate + row * stride, *u = up + row * stride;
    uint16_t* y = out + row * cols;
    for (int64_t i = 0; i < body; i += 8) store8(y + i, silu_times(widen8(g + i), widen8(u + i)));
    if (body < cols)
      store_some(y + body, silu_times(widen_some(g + body, cols - body), widen_some(u + body, cols - body)),
                 cols - body);
  }
}
