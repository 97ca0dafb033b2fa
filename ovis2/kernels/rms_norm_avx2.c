// RMSNorm with its weight in one pass over bf16 rows, for CPUs with AVX2 and FMA but no bf16 instructions:
// out = bf16(bf16(x * rsqrt(mean(x^2) + eps)) * weight), rounding to nearest even (NaN -> 0x7fc0) where the
// PyTorch composite (`weight * F.rms_norm(x)`) rounds, as kernels/pointwise.c does with AVX512-BF16. Rows are
// split over `threads` OpenMP threads. Compiled at run time by ovis2/fused_pointwise.py with -mavx2 -mfma.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline __m256 widen8(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const void*)p)), 16));
}

static inline __m256i rounded_bits(__m256 v) {  // bf16 bits in the high half of each lane
  __m256i bits = _mm256_castps_si256(v);
  __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd));
  __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc00000), nan);
}

static inline __m256 round_bf16(__m256 v) {  // v rounded to bf16 and widened again
  return _mm256_castsi256_ps(_mm256_and_si256(rounded_bits(v), _mm256_set1_epi32((int)0xffff0000u)));
}

static inline void store8(uint16_t* p, __m256 v) {
  __m256i halves = _mm256_srli_epi32(rounded_bits(v), 16);
  __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(halves, halves), 0xD8);
  _mm_storeu_si128((void*)p, _mm256_castsi256_si128(packed));
}

static inline float widen1(uint16_t bits) {
  uint32_t wide = (uint32_t)bits << 16;
  float value;
  memcpy(&value, &wide, sizeof value);
  return value;
}

static inline float round1(float value) {
  __m256 v = round_bf16(_mm256_set1_ps(value));
  return _mm256_cvtss_f32(v);
}

static inline uint16_t to_bf16(float value) {
  uint16_t out[8];
  store8(out, _mm256_set1_ps(value));
  return out[0];
}

static inline float sum8(__m256 v) {
  __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  half = _mm_add_ps(half, _mm_movehl_ps(half, half));
  half = _mm_add_ss(half, _mm_movehdup_ps(half));
  return _mm_cvtss_f32(half);
}

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
