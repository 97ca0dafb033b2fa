// Attention of one new query token per sequence over its keys and values in the paged KV cache, read in place
// through the block table: what SDPA computes on the gathered context (softmax(q k^T * scale) v, fp32 scores and
// sums, online softmax, one bf16 rounding of the output) without gathering it. Grouped-query attention: the
// `heads / kv_heads` query heads of a KV head share its keys. Layouts: q and out [seqs][heads][dim]; caches
// [blocks][block_size][kv_heads][dim]; tables [seqs][max_blocks]; lens [seqs] (keys 0 .. len-1 are attended).
// Compiled at run time by ovis2/decode_attention.py, with -mavx512bf16 where the CPU has it (16 lanes) and with
// -mavx2 -mfma elsewhere (8 lanes: bf16 widened by a shift, rounded back in scalar code); -fopenmp either way.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_GROUP 16
#define MAX_DIM 256
#define CHUNK 16  // keys per online-softmax update

#if defined(__AVX512BF16__)
#define LANES 16
typedef __m512 vec;
static inline vec load_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const void*)p)), 16));
}
static inline vec zero(void) { return _mm512_setzero_ps(); }
static inline vec splat(float value) { return _mm512_set1_ps(value); }
static inline vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
static inline vec mul(vec a, vec b) { return _mm512_mul_ps(a, b); }
static inline vec fmadd(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline float total_of(vec v) { return _mm512_reduce_add_ps(v); }
static inline void store_bf16(uint16_t* p, vec v) { _mm256_storeu_si256((void*)p, (__m256i)_mm512_cvtneps_pbh(v)); }
static inline vec load_lanes(const float* p) { return _mm512_loadu_ps(p); }
static inline void store_lanes(float* p, vec v) { _mm512_storeu_ps(p, v); }
static inline vec above(vec floor, vec x) { return _mm512_max_ps(floor, x); }  // x where x is NaN
static inline vec zero_below(vec value, vec x, float limit) {  // 0 where x < limit; NaN x keeps value
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(limit), _CMP_NLT_UQ), value);
}
static inline vec nearest(vec x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vec power_of_two(vec n) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
#else
#define LANES 8
typedef __m256 vec;
static inline vec load_bf16(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const void*)p)), 16));
}
static inline vec zero(void) { return _mm256_setzero_ps(); }
static inline vec splat(float value) { return _mm256_set1_ps(value); }
static inline vec add(vec a, vec b) { return _mm256_add_ps(a, b); }
static inline vec mul(vec a, vec b) { return _mm256_mul_ps(a, b); }
static inline vec fmadd(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline float total_of(vec v) {
  __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  half = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(half, _mm_movehdup_ps(half)));
}
static inline uint16_t to_bf16(float value) {  // nearest even; NaN -> a quiet NaN (0x7fc0)
  uint32_t bits;
  memcpy(&bits, &value, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}
static inline void store_bf16(uint16_t* p, vec v) {
  float values[LANES];
  _mm256_storeu_ps(values, v);
  for (int i = 0; i < LANES; i++) p[i] = to_bf16(values[i]);
}
static inline vec load_lanes(const float* p) { return _mm256_loadu_ps(p); }
static inline void store_lanes(float* p, vec v) { _mm256_storeu_ps(p, v); }
static inline vec above(vec floor, vec x) { return _mm256_max_ps(floor, x); }  // x where x is NaN
static inline vec zero_below(vec value, vec x, float limit) {  // 0 where x < limit; NaN x keeps value
  return _mm256_and_ps(value, _mm256_cmp_ps(x, _mm256_set1_ps(limit), _CMP_NLT_UQ));
}
static inline vec nearest(vec x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vec power_of_two(vec n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
#endif

// e^x for x <= 0, within 1 fp32 ulp (checked against double over every float in [-87, 0]): x = n ln2 + r with
// |r| <= ln2 / 2, e^r by its Taylor series to r^7 / 7! (error ~2^-27), times 2^n. Below -87 (e^x < 2^-125) it
// gives 0, as the keys a -inf score weighs; NaN stays NaN.
static inline vec exp_of(vec input) {
  const vec x = above(splat(-87.0f), input);
  const vec n = nearest(mul(x, splat(1.44269504088896341f)));
  vec r = fmadd(n, splat(-0.693359375f), x);  // ln2 in two parts: n * the first is exact
  r = fmadd(n, splat(2.12194440e-4f), r);
  vec p = splat(1.0f / 5040);
  p = fmadd(p, r, splat(1.0f / 720));
  p = fmadd(p, r, splat(1.0f / 120));
  p = fmadd(p, r, splat(1.0f / 24));
  p = fmadd(p, r, splat(1.0f / 6));
  p = fmadd(p, r, splat(0.5f));
  p = fmadd(p, r, splat(1.0f));
  p = fmadd(p, r, splat(1.0f));
  return zero_below(mul(p, power_of_two(n)), input, -87.0f);
}

#define MAX_VECTORS (MAX_DIM / LANES)
_Static_assert(CHUNK % LANES == 0 && MAX_DIM % LANES == 0, "whole vectors of keys and of a head");

// One KV head's attention for its `group` query heads; `vectors` (dim / LANES) a constant after inlining, so the
// loops over a head's vectors unroll (2-2.5x faster at head_dim 64 on Zen 3 than a run-time count).
static inline __attribute__((always_inline)) void attend_with(
    const int64_t vectors, const uint16_t* q, const uint16_t* k_cache, const uint16_t* v_cache,
    const int64_t* table, int64_t len, uint16_t* out, int64_t group, int64_t kv_heads, int64_t kv_head,
    int64_t dim, int64_t block_size, float scale) {
  vec queries[MAX_GROUP][MAX_VECTORS], sums[MAX_GROUP][MAX_VECTORS];
  float highest[MAX_GROUP], total[MAX_GROUP], weights[MAX_GROUP][CHUNK];
  for (int64_t g = 0; g < group; g++) {
    for (int64_t v = 0; v < vectors; v++) {
      queries[g][v] = load_bf16(q + g * dim + v * LANES);
      sums[g][v] = zero();
    }
    highest[g] = -INFINITY;
    total[g] = 0.0f;
  }
  for (int64_t start = 0; start < len; start += CHUNK) {
    const int64_t count = len - start < CHUNK ? len - start : CHUNK;
    const uint16_t *keys[CHUNK], *values[CHUNK];
    for (int64_t c = 0; c < count; c++) {
      const int64_t position = start + c;
      const int64_t row = (table[position / block_size] * block_size + position % block_size) * kv_heads + kv_head;
      keys[c] = k_cache + row * dim;
      values[c] = v_cache + row * dim;
    }
    float scores[MAX_GROUP][CHUNK];
    for (int64_t c = 0; c < count; c++) {
      vec key[MAX_VECTORS];
      for (int64_t v = 0; v < vectors; v++) key[v] = load_bf16(keys[c] + v * LANES);
      for (int64_t g = 0; g < group; g++) {
        vec dot = mul(queries[g][0], key[0]);
        for (int64_t v = 1; v < vectors; v++) dot = fmadd(queries[g][v], key[v], dot);
        scores[g][c] = total_of(dot) * scale;
      }
    }
    for (int64_t g = 0; g < group; g++) {
      float top = highest[g];
      for (int64_t c = 0; c < count; c++) top = scores[g][c] > top ? scores[g][c] : top;
      const float shrink = expf(highest[g] - top);  // 0 on the first chunk (exp(-inf))
      for (int64_t c = count; c < CHUNK; c++) scores[g][c] = top;  // lanes past the last key: computed, unused
      for (int64_t c = 0; c < CHUNK; c += LANES)
        store_lanes(weights[g] + c, exp_of(add(load_lanes(scores[g] + c), splat(-top))));
      float added = 0.0f;
      for (int64_t c = 0; c < count; c++) added += weights[g][c];
      total[g] = total[g] * shrink + added;
      highest[g] = top;
      const vec factor = splat(shrink);
      for (int64_t v = 0; v < vectors; v++) sums[g][v] = mul(sums[g][v], factor);
    }
    for (int64_t c = 0; c < count; c++) {
      vec value[MAX_VECTORS];
      for (int64_t v = 0; v < vectors; v++) value[v] = load_bf16(values[c] + v * LANES);
      for (int64_t g = 0; g < group; g++) {
        const vec weight = splat(weights[g][c]);
        for (int64_t v = 0; v < vectors; v++) sums[g][v] = fmadd(weight, value[v], sums[g][v]);
      }
    }
  }
  for (int64_t g = 0; g < group; g++) {
    const vec inverse = splat(1.0f / total[g]);
    for (int64_t v = 0; v < vectors; v++)
      store_bf16(out + g * dim + v * LANES, mul(sums[g][v], inverse));
  }
}

static void attend(const uint16_t* q, const uint16_t* k_cache, const uint16_t* v_cache, const int64_t* table,
                   int64_t len, uint16_t* out, int64_t group, int64_t kv_heads, int64_t kv_head, int64_t dim,
                   int64_t block_size, float scale) {
  const int64_t vectors = dim / LANES;
#define ATTEND(count) \
  attend_with(count, q, k_cache, v_cache, table, len, out, group, kv_heads, kv_head, dim, block_size, scale)
  if (dim == 64)  // Ovis2-1B
    ATTEND(64 / LANES);
  else if (dim == 128)  // Ovis2-2B .. 34B
    ATTEND(128 / LANES);
  else
    ATTEND(vectors);
#undef ATTEND
}

// Whether every sequence has 1 .. max_blocks * block_size keys, all in blocks 0 .. num_blocks - 1.
static int valid_tables(const int64_t* tables, const int64_t* lens, int64_t seqs, int64_t block_size,
                        int64_t max_blocks, int64_t num_blocks) {
  if (block_size < 1) return 0;
  for (int64_t s = 0; s < seqs; s++) {
    if (lens[s] < 1 || lens[s] > max_blocks * block_size) return 0;
    for (int64_t b = 0; b < (lens[s] + block_size - 1) / block_size; b++) {
      const int64_t block = tables[s * max_blocks + b];
      if (block < 0 || block >= num_blocks) return 0;
    }
  }
  return 1;
}

// Returns 0, or -1 (nothing written) for a shape beyond the fixed limits above or a table or length that points
// outside the cache.
int paged_decode_attention_bf16(const uint16_t* q, const uint16_t* k_cache, const uint16_t* v_cache,
                                const int64_t* tables, const int64_t* lens, uint16_t* out, int64_t seqs,
                                int64_t heads, int64_t kv_heads, int64_t dim, int64_t block_size,
                                int64_t max_blocks, int64_t num_blocks, float scale, int threads) {
  const int64_t group = heads / kv_heads;
  if (group > MAX_GROUP || group * kv_heads != heads || dim % 16 || dim > MAX_DIM) return -1;
  if (!valid_tables(tables, lens, seqs, block_size, max_blocks, num_blocks)) return -1;
#pragma omp parallel for collapse(2) num_threads(threads) schedule(static)
  for (int64_t s = 0; s < seqs; s++) {
    for (int64_t h = 0; h < kv_heads; h++) {
      const int64_t first = s * heads + h * group;
      attend(q + first * dim, k_cache, v_cache, tables + s * max_blocks, lens[s], out + first * dim, group,
             kv_heads, h, dim, block_size, scale);
    }
  }
  return 0;
}
