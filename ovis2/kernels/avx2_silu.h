// SiLU(gate) * up for the AVX2 kernels (no bf16 instructions): e^x in fp32 and SiLU as PyTorch computes it,
// gate / (1 + e^-gate), rounded to bf16 where PyTorch's bf16 ops round.
#ifndef OVIS2_AVX2_SILU_H
#define OVIS2_AVX2_SILU_H

#include <immintrin.h>

#include "avx2_bf16.h"

// e^x within ~1 fp32 ulp: x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor series to r^7 / 7!, times 2^n (as
// 2^(n-1) * 2 for n > 0, so 2^128 does not overflow the exponent field). 0 below -87.33 (past fp32's normal range),
// inf above ~88.72; NaN stays NaN.
static inline __m256 exp8(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 clamped = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.5f)), _mm256_set1_ps(89.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(clamped, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-0.693359375f), clamped);  // ln2 in two parts: n * the first is exact
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, one);
  p = _mm256_fmadd_ps(p, r, one);
  const __m256 positive = _mm256_and_ps(_mm256_cmp_ps(n, _mm256_setzero_ps(), _CMP_GT_OQ), one);
  const __m256i exponent = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_sub_ps(n, positive)), _mm256_set1_epi32(127));
  const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(exponent, 23));
  __m256 result = _mm256_mul_ps(_mm256_mul_ps(p, scale), _mm256_add_ps(one, positive));
  result = _mm256_and_ps(result, _mm256_cmp_ps(x, _mm256_set1_ps(-87.33f), _CMP_NLT_UQ));
  return _mm256_blendv_ps(result, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

// bf16(silu(gate)) * up, to be rounded to bf16: silu as PyTorch computes it, gate / (1 + e^-gate).
static inline __m256 silu_times(__m256 gate, __m256 up) {
  const __m256 exp_minus = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gate));
  return _mm256_mul_ps(round_bf16(_mm256_div_ps(gate, _mm256_add_ps(_mm256_set1_ps(1.0f), exp_minus))), up);
}

#endif
