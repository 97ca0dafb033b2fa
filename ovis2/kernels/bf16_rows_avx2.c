// 1-128 rows (decode steps, short prompts' prefill) times a bf16 weight [n][k] in its plain row-major layout, for
// CPUs with AVX2 and FMA but no bf16 instructions: the weight is read once, at its bf16 size, for all the rows,
// widened to fp32 (a 16-bit shift) and multiplied into fp32 sums. y = bf16(x W^T + bias), rounded to nearest even
// once (NaN -> a quiet NaN, 0x7fc0).
// Up to 11 input rows, a thread reads its weight rows front to back, one at a time, each by up to 4 input rows in
// registers (more rows read it again, from L1, or L2 past ~8K inputs): one sequential stream per thread, which the
// memory system serves fastest. From 12 rows the arithmetic dominates: a thread takes 4 weight rows at a time, 512
// inputs of them at a time; the first 3 input rows widen that block into an L1-sized buffer as they go, and the
// others read it from there, 3 rows at a time.
// Compiled at run time by ovis2/bf16_rows.py with -mavx2 -mfma -fopenmp.
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#include "avx2_bf16.h"

#define GROUP 4        // weight rows a thread takes at a time when widening
#define CHUNK 3        // input rows multiplied together from the widened block: GROUP x CHUNK sums in registers
#define BLOCK 512      // inputs of one widened weight block (4 x 512 fp32 = 8 KiB)
#define STRIDE (BLOCK + 16)  // its rows apart by more than 2 KiB, off the 4 KiB alias of each other
#define MAX_ROWS 128  // beyond, oneDNN's fp32 product over widened blocks is as fast (Zen 3: 0.8-0.93x at 256)
#define STREAMED 4     // input rows a streamed weight row meets at a time
// Weight values prefetched ahead of a streamed read, into L2 (Zen 3, a 1B-shaped decode step's products at one
// row: 0.84-0.88x the time without; 2 KiB ahead or more, or into L1, gained less).
#define AHEAD 512
// Ahead of the widening reads, into L1: 8 KiB, the next group's rows when rows are short (the hardware
// prefetchers alone lose 4 interleaved 1.8 KiB rows: 16 rows 60 -> 69 GFLOP/s on Zen 3 at k = 896).
#define WIDEN_AHEAD 4096
#ifndef WIDEN_FROM
#define WIDEN_FROM 12  // input rows from which a widened block pays (Zen 3: 0.85-0.97x streamed at 9-11 rows)
#endif

// acc[r][j] += w row r . x row j over `len` inputs (a multiple of 8), for `rows` (a constant after inlining) input
// rows, the weight read from the widened block `w32` (row stride STRIDE), or, given `w16` (bf16, row stride `k`),
// widened from it into `w32` on the way: the first input rows pay for the widening inside their own loop.
static inline __attribute__((always_inline)) void multiply(const uint16_t* w16, float* w32, const float* x, int64_t k,
                                                           int64_t len, int rows, __m256 acc[GROUP][MAX_ROWS],
                                                           int first) {
  __m256 sum[GROUP][CHUNK];
  for (int r = 0; r < GROUP; r++)
    for (int j = 0; j < rows; j++) sum[r][j] = acc[r][first + j];
  for (int64_t i = 0; i < len; i += 8) {
    __m256 wv[GROUP];
    if (w16) {
      if ((i & 31) == 0)  // once a cache line
        for (int r = 0; r < GROUP; r++) _mm_prefetch((const char*)(w16 + r * k + i + WIDEN_AHEAD), _MM_HINT_T0);
      for (int r = 0; r < GROUP; r++) {
        wv[r] = widen8(w16 + r * k + i);
        _mm256_store_ps(w32 + r * STRIDE + i, wv[r]);
      }
    } else {
      for (int r = 0; r < GROUP; r++) wv[r] = _mm256_load_ps(w32 + r * STRIDE + i);
    }
    for (int j = 0; j < rows; j++) {
      __m256 xv = _mm256_loadu_ps(x + j * k + i);
      for (int r = 0; r < GROUP; r++) sum[r][j] = _mm256_fmadd_ps(wv[r], xv, sum[r][j]);
    }
  }
  for (int r = 0; r < GROUP; r++)
    for (int j = 0; j < rows; j++) acc[r][first + j] = sum[r][j];
}

// Input rows `from` .. m-1 through the widened block, CHUNK at a time.
static inline void multiply_rows(float* w32, const float* x, int64_t k, int64_t len, int64_t from, int64_t m,
                                 __m256 acc[GROUP][MAX_ROWS]) {
  for (int64_t j = from, rows; j < m; j += rows) {
    const int64_t left = m - j;
    rows = left == CHUNK + 1 ? 2 : (left < CHUNK ? left : CHUNK);  // 4 rows as 2 + 2, not 3 + a lone 1
    const float* xj = x + j * k;
    if (rows == 3)
      multiply(NULL, w32, xj, k, len, 3, acc, (int)j);
    else  // 2: from 12 rows on no lone row is left
      multiply(NULL, w32, xj, k, len, 2, acc, (int)j);
  }
}

// out[j] = weight row `row` . x row j for `rows` (a constant after inlining, 1-4) input rows, the weight read front
// to back once. Four independent sums per input row at one row, two from two rows (FMA latency).
static inline __attribute__((always_inline)) void streamed(const uint16_t* row, const float* x, int64_t k, int rows,
                                                           float out[STREAMED]) {
  __m256 acc[STREAMED][4];
  for (int j = 0; j < rows; j++)
    for (int a = 0; a < 4; a++) acc[j][a] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= k; i += 32) {  // a cache line of weights
    _mm_prefetch((const char*)(row + i + AHEAD), _MM_HINT_T1);
    __m256 wv[4];
    for (int v = 0; v < 4; v++) wv[v] = widen8(row + i + 8 * v);
    for (int j = 0; j < rows; j++)
      for (int v = 0; v < 4; v++) {
        const int a = rows == 1 ? v : v & 1;
        acc[j][a] = _mm256_fmadd_ps(wv[v], _mm256_loadu_ps(x + j * k + i + 8 * v), acc[j][a]);
      }
  }
  for (; i + 8 <= k; i += 8)
    for (int j = 0; j < rows; j++)
      acc[j][0] = _mm256_fmadd_ps(widen8(row + i), _mm256_loadu_ps(x + j * k + i), acc[j][0]);
  for (int j = 0; j < rows; j++) {
    __m256 sum = _mm256_add_ps(acc[j][0], acc[j][1]);
    if (rows == 1) sum = _mm256_add_ps(sum, _mm256_add_ps(acc[j][2], acc[j][3]));
    float total = sum8(sum);
    for (int64_t t = i; t < k; t++) total += widen1(row[t]) * x[j * k + t];
    out[j] = total;
  }
}

// Weight row `row` by all `m` input rows, up to STREAMED at a time.
static void streamed_rows(const uint16_t* row, const float* x, int64_t m, int64_t k, float out[MAX_ROWS]) {
  for (int64_t j = 0; j < m; j += STREAMED) {
    const int64_t left = m - j;
    const float* xj = x + j * k;
    if (left == 1)
      streamed(row, xj, k, 1, out + j);
    else if (left == 2)
      streamed(row, xj, k, 2, out + j);
    else if (left == 3)
      streamed(row, xj, k, 3, out + j);
    else
      streamed(row, xj, k, 4, out + j);
  }
}

// One group of GROUP weight rows starting at `w`, widened a block at a time: out[r][j] = w row r . x row j (fp32).
static void group(const uint16_t* w, const float* x, int64_t m, int64_t k, float out[GROUP][MAX_ROWS]) {
  __m256 acc[GROUP][MAX_ROWS];
  float widened[GROUP * STRIDE] __attribute__((aligned(32)));
  for (int r = 0; r < GROUP; r++)
    for (int j = 0; j < m; j++) acc[r][j] = _mm256_setzero_ps();
  const int64_t body = k / 8 * 8;
  for (int64_t start = 0; start < body; start += BLOCK) {
    const int64_t len = body - start < BLOCK ? body - start : BLOCK;
    multiply(w + start, widened, x + start, k, len, CHUNK, acc, 0);  // m >= WIDEN_FROM > CHUNK
    multiply_rows(widened, x + start, k, len, CHUNK, m, acc);
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

// Output column `column` (weight row `column`) for all `m` input rows, the weight row streamed.
static void streamed_column(const uint16_t* w, const float* x, const uint16_t* bias, uint16_t* y, int64_t m,
                            int64_t n, int64_t k, int64_t column) {
  float sums[MAX_ROWS];
  streamed_rows(w + column * k, x, m, k, sums);
  for (int64_t j = 0; j < m; j++) store(y, n, j, column, sums[j], bias);
}

static void streamed_product(const uint16_t* w, const float* x, const uint16_t* bias, uint16_t* y, int64_t m,
                             int64_t n, int64_t k, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t column = 0; column < n; column++) streamed_column(w, x, bias, y, m, n, k, column);
}

static void widened_product(const uint16_t* w, const float* x, const uint16_t* bias, uint16_t* y, int64_t m,
                            int64_t n, int64_t k, int threads) {
  const int64_t groups = n / GROUP;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t g = 0; g < groups; g++) {
    float sums[GROUP][MAX_ROWS];
    group(w + g * GROUP * k, x, m, k, sums);
    for (int r = 0; r < GROUP; r++)
      for (int j = 0; j < m; j++) store(y, n, j, g * GROUP + r, sums[r][j], bias);
  }
  for (int64_t column = groups * GROUP; column < n; column++)  // the last n % 4 weight rows
    streamed_column(w, x, bias, y, m, n, k, column);
}

// Returns 0, or -1 (nothing computed) for more than MAX_ROWS rows or no memory.
int bf16_rows_product(const uint16_t* w, const uint16_t* x, const uint16_t* bias, uint16_t* y, int64_t m,
                      int64_t n, int64_t k, int threads) {
  if (m < 1 || m > MAX_ROWS) return -1;
  float* x32 = malloc(sizeof(float) * m * k);
  if (!x32) return -1;
  for (int64_t i = 0; i < m * k; i++) x32[i] = widen1(x[i]);
  if (m < WIDEN_FROM)
    streamed_product(w, x32, bias, y, m, n, k, threads);
  else
    widened_product(w, x32, bias, y, m, n, k, threads);
  free(x32);
  return 0;
}
