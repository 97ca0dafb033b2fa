// A few rows (decode: 1-16) times a bf16 weight [n][k] in its plain row-major layout, for CPUs with AVX2 and FMA
// but no bf16 instructions: the weight is read once, at its bf16 size, for all the rows, widened to fp32 (a
// 16-bit shift) and multiplied into fp32 sums. y = bf16(x W^T + bias), rounded to nearest even once (NaN -> the
// quiet NaN PyTorch gives).
// A thread owns groups of 4 weight rows, taken 512 inputs at a time. For 1-11 input rows each weight vector is
// widened in registers and used by every 3 input rows in turn (the block stays in L1); from 12 rows the block
// (4 x 512 values) is widened once into an L1-sized buffer that all the rows read. Sums stay fp32 vectors until
// the group is done.
// Compiled at run time by ovis2/bf16_rows.py with -mavx2 -mfma -fopenmp.
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define GROUP 4        // weight rows a thread takes at a time
#define CHUNK 3        // input rows multiplied together: GROUP x CHUNK sums in registers
#define BLOCK 512      // inputs of one widened weight block (4 x 512 fp32 = 8 KiB)
#define STRIDE (BLOCK + 16)  // its rows apart by more than 2 KiB, off the 4 KiB alias of each other
#define MAX_ROWS 16
// Weight values prefetched ahead of the reads (8 KiB: the next group's rows when rows are short).
// The hardware prefetchers alone lose 4 interleaved 1.8 KiB rows (Zen 3, k = 896: one row read 18-20 -> 22-24
// GB/s with it, 16 rows 60 -> 69 GFLOP/s; 4864-long rows gained nothing).
#define AHEAD 4096
#ifndef WIDEN_FROM
#define WIDEN_FROM 12  // input rows from which a widened block pays (Zen 3: equal at 8, 1.2-1.5x at 16)
#endif

static inline __m256 widen8(const uint16_t* bf16) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const void*)bf16)), 16));
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

static inline float sum8(__m256 v) {
  __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  half = _mm_add_ps(half, _mm_movehl_ps(half, half));
  half = _mm_add_ss(half, _mm_movehdup_ps(half));
  return _mm_cvtss_f32(half);
}

// acc[r][j] += w row r . x row j over `len` inputs (a multiple of 8), for `rows` (a constant after inlining)
// input rows. The weight is bf16 (`w16`, row stride `ld`) or already widened (`w32`, row stride STRIDE).
static inline __attribute__((always_inline)) void multiply(const uint16_t* w16, const float* w32, int64_t ld,
                                                           const float* x, int64_t k, int64_t len, int rows,
                                                           __m256 acc[GROUP][MAX_ROWS], int first) {
  __m256 sum[GROUP][CHUNK];
  for (int r = 0; r < GROUP; r++)
    for (int j = 0; j < rows; j++) sum[r][j] = acc[r][first + j];
  for (int64_t i = 0; i < len; i += 8) {
    __m256 wv[GROUP];
    if (w16 && (i & 31) == 0)  // once a cache line
      for (int r = 0; r < GROUP; r++) _mm_prefetch((const char*)(w16 + r * ld + i + AHEAD), _MM_HINT_T0);
    for (int r = 0; r < GROUP; r++) wv[r] = w16 ? widen8(w16 + r * ld + i) : _mm256_load_ps(w32 + r * STRIDE + i);
    for (int j = 0; j < rows; j++) {
      __m256 xv = _mm256_loadu_ps(x + j * k + i);
      for (int r = 0; r < GROUP; r++) sum[r][j] = _mm256_fmadd_ps(wv[r], xv, sum[r][j]);
    }
  }
  for (int r = 0; r < GROUP; r++)
    for (int j = 0; j < rows; j++) acc[r][first + j] = sum[r][j];
}

static inline void multiply_rows(const uint16_t* w16, const float* w32, int64_t ld, const float* x, int64_t k,
                                 int64_t len, int64_t m, __m256 acc[GROUP][MAX_ROWS]) {
  for (int64_t j = 0, rows; j < m; j += rows) {
    const int64_t left = m - j;
    rows = left == CHUNK + 1 ? 2 : (left < CHUNK ? left : CHUNK);  // 4 rows as 2 + 2, not 3 + a lone 1
    const float* xj = x + j * k;
    if (rows == 3)
      multiply(w16, w32, ld, xj, k, len, 3, acc, (int)j);
    else if (rows == 2)
      multiply(w16, w32, ld, xj, k, len, 2, acc, (int)j);
    else
      multiply(w16, w32, ld, xj, k, len, 1, acc, (int)j);
  }
}

// One group of GROUP weight rows starting at `w`: out[r][j] = w row r . x row j (fp32).
static void group(const uint16_t* w, const float* x, int64_t m, int64_t k, float out[GROUP][MAX_ROWS]) {
  __m256 acc[GROUP][MAX_ROWS];
  float widened[GROUP * STRIDE] __attribute__((aligned(32)));
  for (int r = 0; r < GROUP; r++)
    for (int j = 0; j < m; j++) acc[r][j] = _mm256_setzero_ps();
  const int64_t body = k / 8 * 8;
  for (int64_t start = 0; start < body; start += BLOCK) {
    const int64_t len = body - start < BLOCK ? body - start : BLOCK;
    if (m < WIDEN_FROM) {
      multiply_rows(w + start, NULL, k, x + start, k, len, m, acc);
      continue;
    }
    for (int r = 0; r < GROUP; r++)
      for (int64_t i = 0; i < len; i += 8) {
        if ((i & 31) == 0) _mm_prefetch((const char*)(w + r * k + start + i + AHEAD), _MM_HINT_T0);
        _mm256_store_ps(widened + r * STRIDE + i, widen8(w + r * k + start + i));
      }
    multiply_rows(NULL, widened, k, x + start, k, len, m, acc);
  }
  for (int r = 0; r < GROUP; r++)
    for (int j = 0; j < m; j++) {
      float total = sum8(acc[r][j]);
      for (int64_t t = body; t < k; t++) total += widen1(w[r * k + t]) * x[j * k + t];
      out[r][j] = total;
    }
}

static void store(uint16_t* y, int64_t n, int64_t row, int64_t column, float value, const uint16_t* bias) {
  y[row * n + column] = to_bf16(bias ? value + widen1(bias[column]) : value);
}

// Returns 0, or -1 (nothing computed) for more than MAX_ROWS rows or no memory.
int bf16_rows_product(const uint16_t* w, const uint16_t* x, const uint16_t* bias, uint16_t* y, int64_t m,
                      int64_t n, int64_t k, int threads) {
  if (m < 1 || m > MAX_ROWS) return -1;
  float* x32 = malloc(sizeof(float) * m * k);
  if (!x32) return -1;
  for (int64_t i = 0; i < m * k; i++) x32[i] = widen1(x[i]);
  const int64_t groups = n / GROUP;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t g = 0; g < groups; g++) {
    float sums[GROUP][MAX_ROWS];
    group(w + g * GROUP * k, x32, m, k, sums);
    for (int r = 0; r < GROUP; r++)
      for (int j = 0; j < m; j++) store(y, n, j, g * GROUP + r, sums[r][j], bias);
  }
  for (int64_t column = groups * GROUP; column < n; column++)  // the last n % 4 weight rows
    for (int64_t j = 0; j < m; j++) {
      float total = 0.0f;
      for (int64_t t = 0; t < k; t++) total += widen1(w[column * k + t]) * x32[j * k + t];
      store(y, n, j, column, total, bias);
    }
  free(x32);
  return 0;
}
