// Rows (decode steps, prefill, the vision tower) times a bf16 weight [n][k], for CPUs with AVX2 and FMA but no bf16
// instructions: the weight is widened to fp32 (a 16-bit shift) as it is read and multiplied into fp32 sums.
// y = bf16(x W^T + bias), rounded to nearest even once (NaN -> a quiet NaN, 0x7fc0). Two layouts of the weight:
// - plain row-major (bf16_rows_product). Up to 8 input rows, a thread reads its weight rows front to back, one at a
//   time, each by up to 4 input rows in registers (more rows read it again, from L1, or L2 past ~8K inputs). From 9
//   rows the product runs as an fp32 GEMM does: a thread takes a panel of 16 weight rows, 256 inputs of it at a
//   time, transposed and widened into an L1-sized block [256][16]; 6 input rows at a time then meet it in registers
//   (6 x 16 sums, each input broadcast). The next panel's block is prefetched as the current one's is transposed.
// - panels (bf16_panels_product): the weight laid out once, at load, as ceil(n / 16) panels of 16 weight rows, each
//   stored input by input, interleaved: panel p, input i, weight row 16 p + c at w[(p k + i) 16 + 2 (c % 8) + c / 8]
//   (bf16_rows.LANE_ROWS), rows past n zero. A thread reads its panels front to back, one sequential stream with no
//   transposes: 16 weights a load, widened in registers by a shift and a mask and met by up to 4 input rows (8
//   rows: 4 at a time), or from 9 rows by 6 at a time as above.
//   Zen 3, the 24 layers' products of the 1B checkpoint's own weights: level with the plain layout at 1 row,
//   1.0-1.24x at 4, 1.03-1.10x at 8-16 (the vocabulary projection 1.26x at 8), level from 64.
// More than 128 rows run as blocks of rows, each over the whole weight.
// Compiled at run time by ovis2/bf16_rows.py with -mavx2 -mfma -fopenmp.
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#include "avx2_bf16.h"

#define BLOCK_ROWS 128  // input rows one pass over the weight takes (their sums on a thread's stack: 8 KiB)
#define STREAMED 4     // input rows a streamed weight row meets at a time
// Weight values prefetched ahead of a streamed read, into L2 (Zen 3, a 1B-shaped decode step's products at one
// row: 0.84-0.88x the time without; 2 KiB ahead or more, or into L1, gained less).
#define AHEAD 512
#define PANEL 16   // weight rows transposed together: two vectors of outputs
#define MR 6       // input rows meeting a block at a time: 6 x 2 sums + 2 weight vectors + 1 input in 16 registers
#define DEPTH 256  // inputs of a transposed block: 256 x 16 fp32 = 16 KiB
#ifndef PANEL_FROM
// Input rows from which panels pay. Zen 3, 1B shapes: against the streamed rows 0.72-0.87x at 7-8 rows where k =
// 896 (1.13-1.24x at k = 4864), 1.03-1.36x at 9, 1.3-1.6x at 10-11; against the 4-row groups widened in place they
// replaced (12-128 rows), 1.02-1.12x at 12-51 rows and 1.19-1.33x at 128.
#define PANEL_FROM 9
#endif

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
static void streamed_rows(const uint16_t* row, const float* x, int64_t m, int64_t k, float out[BLOCK_ROWS]) {
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

// 8 weight rows (row stride k) x 8 inputs, widened and transposed: p[i * PANEL + r] = w[r][i].
static inline void transpose8(const uint16_t* w, int64_t k, float* p) {
  __m256 r[8], t[8], s[8];
  for (int i = 0; i < 8; i++) r[i] = widen8(w + i * k);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    s[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    s[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    s[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    s[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; i++) {
    _mm256_store_ps(p + i * PANEL, _mm256_permute2f128_ps(s[i], s[i + 4], 0x20));
    _mm256_store_ps(p + (i + 4) * PANEL, _mm256_permute2f128_ps(s[i], s[i + 4], 0x31));
  }
}

// An input's 16 weights of a panel, stored interleaved (32-bit lane j: row j in its low half, row 8 + j in its
// high half), widened: rows 0-7 by a shift, rows 8-15 by a mask. Zen 3, 24 1B-shaped layers' products: 1.03-1.08x
// at 12-128 rows against two 8-weight widenings (zero-extend and shift each), level at 1-8 rows.
static inline __attribute__((always_inline)) void widen_lanes(const uint16_t* w, __m256* low, __m256* high) {
  const __m256i lanes = _mm256_loadu_si256((const __m256i*)w);
  *low = _mm256_castsi256_ps(_mm256_slli_epi32(lanes, 16));
  *high = _mm256_castsi256_ps(_mm256_and_si256(lanes, _mm256_set1_epi32((int)0xffff0000u)));
}

// sums[r][0..15] += x row r [0 .. len) . weights [0 .. len)[0..15] for `rows` input rows; the weights an fp32
// block (widened = 0) or a bf16 panel widened in registers (widened = 1). Both constants after inlining.
static inline __attribute__((always_inline)) void meet(const void* weights, int widened, const float* x, int64_t k,
                                                       int64_t len, int rows, float* sums) {
  __m256 acc[MR][2];
  for (int r = 0; r < rows; r++) {
    acc[r][0] = _mm256_load_ps(sums + r * PANEL);
    acc[r][1] = _mm256_load_ps(sums + r * PANEL + 8);
  }
  for (int64_t i = 0; i < len; i++) {
    __m256 low, high;
    if (widened) {
      widen_lanes((const uint16_t*)weights + i * PANEL, &low, &high);
    } else {
      const float* w = (const float*)weights + i * PANEL;
      low = _mm256_load_ps(w), high = _mm256_load_ps(w + 8);
    }
    for (int r = 0; r < rows; r++) {
      const __m256 input = _mm256_broadcast_ss(x + r * k + i);
      acc[r][0] = _mm256_fmadd_ps(input, low, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(input, high, acc[r][1]);
    }
  }
  for (int r = 0; r < rows; r++) {
    _mm256_store_ps(sums + r * PANEL, acc[r][0]);
    _mm256_store_ps(sums + r * PANEL + 8, acc[r][1]);
  }
}

// All m input rows by one block of weights (as `meet` takes them), MR at a time.
static inline __attribute__((always_inline)) void meet_rows(const void* weights, int widened, const float* x,
                                                            int64_t m, int64_t k, int64_t len, float* sums) {
  for (int64_t r = 0; r < m; r += MR) {
    const float* xr = x + r * k;
    float* out = sums + r * PANEL;
    switch (m - r < MR ? m - r : MR) {
      case 1: meet(weights, widened, xr, k, len, 1, out); break;
      case 2: meet(weights, widened, xr, k, len, 2, out); break;
      case 3: meet(weights, widened, xr, k, len, 3, out); break;
      case 4: meet(weights, widened, xr, k, len, 4, out); break;
      case 5: meet(weights, widened, xr, k, len, 5, out); break;
      default: meet(weights, widened, xr, k, len, 6, out); break;
    }
  }
}

// sums[r][c] = panel row c . x row r (fp32) for the PANEL weight rows at `w`, a block of DEPTH inputs at a time;
// `next`, the following panel (or NULL), is prefetched into L1 a block ahead of its own transposes.
static void panel_sums(const uint16_t* w, const uint16_t* next, const float* x, int64_t m, int64_t k, float* sums) {
  float block[DEPTH * PANEL] __attribute__((aligned(32)));
  for (int64_t i = 0; i < m * PANEL; i++) sums[i] = 0.0f;
  const int64_t body = k / 8 * 8;
  for (int64_t start = 0; start < body; start += DEPTH) {
    const int64_t len = body - start < DEPTH ? body - start : DEPTH;
    for (int64_t i = 0; i < len; i += 8) {
      if (next && (i & 31) == 0)  // once a cache line of each row
        for (int r = 0; r < PANEL; r++) _mm_prefetch((const char*)(next + r * k + start + i), _MM_HINT_T0);
      transpose8(w + start + i, k, block + i * PANEL);
      transpose8(w + 8 * k + start + i, k, block + i * PANEL + 8);
    }
    meet_rows(block, 0, x + start, m, k, len, sums);
  }
  for (int64_t r = 0; r < m; r++)  // the last k % 8 inputs
    for (int c = 0; c < PANEL; c++)
      for (int64_t t = body; t < k; t++) sums[r * PANEL + c] += widen1(w[c * k + t]) * x[r * k + t];
}

static void store(uint16_t* y, int64_t n, int64_t row, int64_t column, float value, const uint16_t* bias) {
  y[row * n + column] = to_bf16(bias ? value + widen1(bias[column]) : value);
}

// Output column `column` (weight row `column`) for all `m` input rows, the weight row streamed.
static void streamed_column(const uint16_t* w, const float* x, const uint16_t* bias, uint16_t* y, int64_t m,
                            int64_t n, int64_t k, int64_t column) {
  float sums[BLOCK_ROWS];
  streamed_rows(w + column * k, x, m, k, sums);
  for (int64_t j = 0; j < m; j++) store(y, n, j, column, sums[j], bias);
}

static void streamed_product(const uint16_t* w, const float* x, const uint16_t* bias, uint16_t* y, int64_t m,
                             int64_t n, int64_t k, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t column = 0; column < n; column++) streamed_column(w, x, bias, y, m, n, k, column);
}

static void panel_product(const uint16_t* w, const float* x, const uint16_t* bias, uint16_t* y, int64_t m,
                          int64_t n, int64_t k, int threads) {
  const int64_t panels = n / PANEL;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t p = 0; p < panels; p++) {
    float sums[BLOCK_ROWS * PANEL] __attribute__((aligned(32)));
    const uint16_t* panel = w + p * PANEL * k;
    panel_sums(panel, p + 1 < panels ? panel + PANEL * k : NULL, x, m, k, sums);
    for (int64_t r = 0; r < m; r++)
      for (int c = 0; c < PANEL; c++) store(y, n, r, p * PANEL + c, sums[r * PANEL + c], bias);
  }
  for (int64_t column = panels * PANEL; column < n; column++)  // the last n % 16 weight rows
    streamed_column(w, x, bias, y, m, n, k, column);
}

// ------------------------------------------------------------------------------------------------------- panels
#define FEW_AHEAD 512  // weight values prefetched ahead of the few-row reads, into L2

// sums[r][0..15] = panel . x row r for `rows` (a constant after inlining, 1-4) input rows over all k inputs; two
// sums per output vector and row (alternate inputs) so one row keeps 4 FMA chains going.
static inline __attribute__((always_inline)) void few_sums(const uint16_t* panel, const float* x, int64_t k, int rows,
                                                           float* sums) {
  __m256 acc[STREAMED][2][2];
  for (int r = 0; r < rows; r++)
    for (int a = 0; a < 2; a++) acc[r][a][0] = acc[r][a][1] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 2 <= k; i += 2) {  // a cache line of weights
    _mm_prefetch((const char*)(panel + i * PANEL + FEW_AHEAD), _MM_HINT_T1);
    for (int a = 0; a < 2; a++) {
      __m256 low, high;
      widen_lanes(panel + (i + a) * PANEL, &low, &high);
      for (int r = 0; r < rows; r++) {
        const __m256 input = _mm256_broadcast_ss(x + r * k + i + a);
        acc[r][a][0] = _mm256_fmadd_ps(input, low, acc[r][a][0]);
        acc[r][a][1] = _mm256_fmadd_ps(input, high, acc[r][a][1]);
      }
    }
  }
  if (i < k) {
    __m256 low, high;
    widen_lanes(panel + i * PANEL, &low, &high);
    for (int r = 0; r < rows; r++) {
      const __m256 input = _mm256_broadcast_ss(x + r * k + i);
      acc[r][0][0] = _mm256_fmadd_ps(input, low, acc[r][0][0]);
      acc[r][0][1] = _mm256_fmadd_ps(input, high, acc[r][0][1]);
    }
  }
  for (int r = 0; r < rows; r++) {
    _mm256_store_ps(sums + r * PANEL, _mm256_add_ps(acc[r][0][0], acc[r][1][0]));
    _mm256_store_ps(sums + r * PANEL + 8, _mm256_add_ps(acc[r][0][1], acc[r][1][1]));
  }
}

static void few_panel_sums(const uint16_t* panel, const float* x, int64_t m, int64_t k, float* sums) {
  for (int64_t r = 0; r < m; r += STREAMED) {
    const float* xr = x + r * k;
    switch (m - r < STREAMED ? m - r : STREAMED) {
      case 1: few_sums(panel, xr, k, 1, sums + r * PANEL); break;
      case 2: few_sums(panel, xr, k, 2, sums + r * PANEL); break;
      case 3: few_sums(panel, xr, k, 3, sums + r * PANEL); break;
      default: few_sums(panel, xr, k, 4, sums + r * PANEL); break;
    }
  }
}

// All m input rows by one panel, DEPTH inputs at a time, MR rows at a time; `next` (or NULL) prefetched into L1
// a block ahead.
static void many_panel_sums(const uint16_t* panel, const uint16_t* next, const float* x, int64_t m, int64_t k,
                            float* sums) {
  for (int64_t i = 0; i < m * PANEL; i++) sums[i] = 0.0f;
  for (int64_t start = 0; start < k; start += DEPTH) {
    const int64_t len = k - start < DEPTH ? k - start : DEPTH;
    if (next)
      for (int64_t i = 0; i < len * PANEL; i += 32) _mm_prefetch((const char*)(next + start * PANEL + i), _MM_HINT_T0);
    meet_rows(panel + start * PANEL, 1, x + start, m, k, len, sums);
  }
}

static void panels_block(const uint16_t* w, const float* x, const uint16_t* bias, uint16_t* y, int64_t m, int64_t n,
                         int64_t k, int threads) {
  const int64_t panels = (n + PANEL - 1) / PANEL;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t p = 0; p < panels; p++) {
    float sums[BLOCK_ROWS * PANEL] __attribute__((aligned(32)));
    const uint16_t* panel = w + p * PANEL * k;
    if (m < PANEL_FROM)
      few_panel_sums(panel, x, m, k, sums);
    else
      many_panel_sums(panel, p + 1 < panels ? panel + PANEL * k : NULL, x, m, k, sums);
    const int64_t columns = n - p * PANEL < PANEL ? n - p * PANEL : PANEL;
    for (int64_t r = 0; r < m; r++)
      for (int64_t c = 0; c < columns; c++) store(y, n, r, p * PANEL + c, sums[r * PANEL + c], bias);
  }
}

// x: m rows of bf16 widened to fp32, or NULL for no memory.
static float* widened_rows(const uint16_t* x, int64_t m, int64_t k) {
  float* x32 = malloc(sizeof(float) * m * k);
  if (x32)
    for (int64_t i = 0; i < m * k; i++) x32[i] = widen1(x[i]);
  return x32;
}

// Returns 0, or -1 (nothing computed) for no rows or no memory.
int bf16_panels_product(const uint16_t* w, const uint16_t* x, const uint16_t* bias, uint16_t* y, int64_t m,
                        int64_t n, int64_t k, int threads) {
  if (m < 1) return -1;
  float* x32 = widened_rows(x, m, k);
  if (!x32) return -1;
  const int64_t blocks = (m + BLOCK_ROWS - 1) / BLOCK_ROWS, rows = (m + blocks - 1) / blocks;
  for (int64_t start = 0; start < m; start += rows)
    panels_block(w, x32 + start * k, bias, y + start * n, m - start < rows ? m - start : rows, n, k, threads);
  free(x32);
  return 0;
}

// ---------------------------------------------------------------------------------------------------- plain rows
// Returns 0, or -1 (nothing computed) for no rows or no memory.
int bf16_rows_product(const uint16_t* w, const uint16_t* x, const uint16_t* bias, uint16_t* y, int64_t m,
                      int64_t n, int64_t k, int threads) {
  if (m < 1) return -1;
  float* x32 = widened_rows(x, m, k);
  if (!x32) return -1;
  if (m < PANEL_FROM) {
    streamed_product(w, x32, bias, y, m, n, k, threads);
  } else {  // row blocks of equal size, at most BLOCK_ROWS each
    const int64_t blocks = (m + BLOCK_ROWS - 1) / BLOCK_ROWS, rows = (m + blocks - 1) / blocks;
    for (int64_t start = 0; start < m; start += rows)
      panel_product(w, x32 + start * k, bias, y + start * n, m - start < rows ? m - start : rows, n, k, threads);
  }
  free(x32);
  return 0;
}
