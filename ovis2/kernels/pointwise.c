// Row-wise bf16 passes that PyTorch runs as several ops with fp32 intermediates: RMSNorm with its weight, SiLU
// times the up projection, and the visual head's LayerNorm followed by softmax. Each computes in fp32 and rounds
// to bf16 (nearest even) wherever the PyTorch composite it replaces does, so the results are the composite's up
// to fp32 summation order and exp's last bits, except that results below 2^-126 (fp32's normal range) become 0:
// the bf16 conversion instruction flushes them. Compiled at run time by ovis2/fused_pointwise.py with
// -mavx512bf16 -fopenmp; rows are split over `threads` OpenMP threads.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

static inline __mmask16 tail_mask(int64_t remaining) {
  return remaining >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << remaining) - 1);
}

static inline __m512 load16(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

static inline void store16(uint16_t* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
}

static inline __m512 round_bf16(__m512 v) {  // v rounded to bf16 and widened again
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}

// e^x to within ~2 ulp: x = n ln2 + r, |r| <= ln2/2, a degree-6 polynomial for e^r, scaled by 2^n (0 below
// e^-104, inf above e^89, as expf's own underflow and overflow).
static inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(89.0f)), _mm512_set1_ps(-104.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// out = bf16(bf16(x * rsqrt(mean(x^2) + eps)) * weight), per row of `dim` values.
void rms_norm_bf16(const uint16_t* x, const uint16_t* weight, uint16_t* out, int64_t rows, int64_t dim,
                   float eps, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t row = 0; row < rows; row++) {
    const uint16_t* in = x + row * dim;
    uint16_t* y = out + row * dim;
    __m512 squares = _mm512_setzero_ps();
    for (int64_t i = 0; i < dim; i += 16) {
      __m512 v = load16(in + i, tail_mask(dim - i));
      squares = _mm512_fmadd_ps(v, v, squares);
    }
    __m512 scale = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(squares) / (float)dim + eps));
    for (int64_t i = 0; i < dim; i += 16) {
      __mmask16 m = tail_mask(dim - i);
      __m512 normed = round_bf16(_mm512_mul_ps(load16(in + i, m), scale));
      store16(y + i, _mm512_mul_ps(normed, load16(weight + i, m)), m);
    }
  }
}

// out = bf16(bf16(silu(gate)) * up), rows of `cols` values; gate's and up's rows `stride` values apart (the two
// halves of one fused gate/up product), out's `cols` apart.
void silu_mul_bf16(const uint16_t* gate, const uint16_t* up, uint16_t* out, int64_t rows, int64_t cols,
                   int64_t stride, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t row = 0; row < rows; row++) {
    const uint16_t *g = gate + row * stride, *u = up + row * stride;
    uint16_t* y = out + row * cols;
    for (int64_t i = 0; i < cols; i += 16) {
      __mmask16 m = tail_mask(cols - i);
      __m512 v = load16(g + i, m);
      __m512 silu = _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), v))));
      store16(y + i, _mm512_mul_ps(round_bf16(silu), load16(u + i, m)), m);
    }
  }
}

// Per row: z = bf16((x - mean) / sqrt(var + eps) * weight + bias) (LayerNorm), then out = bf16(softmax(z)).
void layer_norm_softmax_bf16(const uint16_t* x, const uint16_t* weight, const uint16_t* bias, uint16_t* out,
                             int64_t rows, int64_t cols, float eps, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t row = 0; row < rows; row++) {
    const uint16_t* in = x + row * cols;
    uint16_t* y = out + row * cols;
    __m512 sum = _mm512_setzero_ps();
    for (int64_t i = 0; i < cols; i += 16) sum = _mm512_add_ps(sum, load16(in + i, tail_mask(cols - i)));
    const float mean = _mm512_reduce_add_ps(sum) / (float)cols;
    __m512 deviations = _mm512_setzero_ps();
    for (int64_t i = 0; i < cols; i += 16) {
      __mmask16 m = tail_mask(cols - i);
      __m512 d = _mm512_maskz_sub_ps(m, load16(in + i, m), _mm512_set1_ps(mean));
      deviations = _mm512_fmadd_ps(d, d, deviations);
    }
    const __m512 rstd = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(deviations) / (float)cols + eps));
    __m512 highest = _mm512_set1_ps(-INFINITY);
    for (int64_t i = 0; i < cols; i += 16) {
      __mmask16 m = tail_mask(cols - i);
      __m512 centered = _mm512_mul_ps(_mm512_sub_ps(load16(in + i, m), _mm512_set1_ps(mean)), rstd);
      __m512 z = round_bf16(_mm512_fmadd_ps(centered, load16(weight + i, m), load16(bias + i, m)));
      highest = _mm512_mask_max_ps(highest, m, highest, z);
      store16(y + i, z, m);
    }
    const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(highest));
    __m512 total = _mm512_setzero_ps();
    for (int64_t i = 0; i < cols; i += 16) {
      __mmask16 m = tail_mask(cols - i);
      total = _mm512_add_ps(total, _mm512_maskz_mov_ps(m, exp16(_mm512_sub_ps(load16(y + i, m), top))));
    }
    const __m512 inverse = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
    for (int64_t i = 0; i < cols; i += 16) {
      __mmask16 m = tail_mask(cols - i);
      store16(y + i, _mm512_mul_ps(exp16(_mm512_sub_ps(load16(y + i, m), top)), inverse), m);
    }
  }
}
