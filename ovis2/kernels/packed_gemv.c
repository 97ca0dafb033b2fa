// One row times a bf16 weight held in oneDNN's blocked layout AB16b{B}a2b (B = 32 or 64 output columns per
// block): blocks [N/B][K/32], each [16][B][2], i.e. for every pair of inputs the B outputs' two weights side by
// side, the operand order of AVX512-BF16's dot product. Sums in fp32; y = bf16(x W^T + bias), rounded to
// nearest even. Compiled at run time by ovis2/packed_gemv.py with -mavx512bf16 -fopenmp.
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

static inline __m512bh broadcast_pair(const uint16_t* pair) {  // x may sit at any 2-byte offset
  int32_t bits;
  memcpy(&bits, pair, sizeof bits);
  return (__m512bh)_mm512_set1_epi32(bits);
}

static inline __m512 widen(const uint16_t* bf16) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const void*)bf16)), 16));
}

#define DEFINE_GEMV(B)                                                                                        \
  void packed_gemv_bf16_##B(const uint16_t* w, const uint16_t* x, const uint16_t* bias, uint16_t* y,         \
                            int64_t n, int64_t k, int threads) {                                              \
    const int64_t n_blocks = n / B, k_blocks = k / 32;                                                        \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                                       \
    for (int64_t nb = 0; nb < n_blocks; nb++) {                                                               \
      __m512 even[B / 16], odd[B / 16];                                                                       \
      for (int r = 0; r < B / 16; r++) even[r] = odd[r] = _mm512_setzero_ps();                                \
      const uint16_t* block = w + nb * k_blocks * 32 * B;                                                     \
      for (int64_t kb = 0; kb < k_blocks; kb++, block += 32 * B) {                                            \
        const uint16_t* pairs = x + kb * 32;                                                                  \
        for (int j = 0; j < 16; j += 2) {                                                                     \
          __m512bh x0 = broadcast_pair(pairs + 2 * j), x1 = broadcast_pair(pairs + 2 * j + 2);                \
          for (int r = 0; r < B / 16; r++) {                                                                  \
            even[r] = _mm512_dpbf16_ps(even[r], (__m512bh)_mm512_loadu_si512(block + (j * B + r * 16) * 2), x0); \
            odd[r] = _mm512_dpbf16_ps(odd[r], (__m512bh)_mm512_loadu_si512(block + ((j + 1) * B + r * 16) * 2), x1); \
          }                                                                                                   \
        }                                                                                                     \
      }                                                                                                       \
      for (int r = 0; r < B / 16; r++) {                                                                      \
        __m512 sum = _mm512_add_ps(even[r], odd[r]);                                                          \
        if (bias) sum = _mm512_add_ps(sum, widen(bias + nb * B + r * 16));                                    \
        _mm256_storeu_si256((void*)(y + nb * B + r * 16), (__m256i)_mm512_cvtneps_pbh(sum));                 \
      }                                                                                                       \
    }                                                                                                         \
  }

DEFINE_GEMV(32)
DEFINE_GEMV(64)
