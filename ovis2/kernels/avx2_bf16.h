// bf16 <-> fp32 helpers shared by the kernels built for AVX2 and FMA (no bf16 instructions): bf16 widened by a
// 16-bit shift, fp32 rounded to bf16 to nearest even (NaN -> a quiet NaN, 0x7fc0), as PyTorch rounds.
#ifndef OVIS2_AVX2_BF16_H
#define OVIS2_AVX2_BF16_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

static inline __m256 widen8(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const void*)p)), 16));
}

static inline float widen1(uint16_t bits) {
  uint32_t wide = (uint32_t)bits << 16;
  float value;
  memcpy(&value, &wide, sizeof value);
  return value;
}

static inline uint16_t to_bf16(float value) {
  uint32_t bits;
  memcpy(&bits, &value, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return (uint16_t)(bits >> 16);
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

static inline float sum8(__m256 v) {
  __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  half = _mm_add_ps(half, _mm_movehl_ps(half, half));
  half = _mm_add_ss(half, _mm_movehdup_ps(half));
  return _mm_cvtss_f32(half);
}

// Up to 8 bf16 values widened (the rest 0) and stored back: the tails of rows whose length is not a multiple of 8.
static inline __m256 widen_some(const uint16_t* p, int64_t count) {
  uint16_t lanes[8] = {0};
  memcpy(lanes, p, (size_t)count * sizeof *p);
  return widen8(lanes);
}

static inline void store_some(uint16_t* p, __m256 v, int64_t count) {
  uint16_t lanes[8];
  store8(lanes, v);
  memcpy(p, lanes, (size_t)count * sizeof *p);
}

#endif
