// Attention of one new query token per sequence over its keys and values in the paged KV cache, read in place
// through the block table: what SDPA computes on the gathered context (softmax(q k^T * scale) v, fp32 scores and
// sums, online softmax, one bf16 rounding of the output) without gathering it. Grouped-query attention: the
// `heads / kv_heads` query heads of a KV head share its keys. Layouts: q and out [seqs][heads][dim]; caches
// [blocks][block_size][kv_heads][dim]; tables [seqs][max_blocks]; lens [seqs] (keys 0 .. len-1 are attended).
// Compiled at run time by ovis2/decode_attention.py with -mavx512bf16 -fopenmp.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#define MAX_GROUP 16
#define MAX_VECTORS 16  // head_dim up to 256
#define CHUNK 16        // keys per online-softmax update

static inline __m512 load16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const void*)p)), 16));
}

static void attend(const uint16_t* q, const uint16_t* k_cache, const uint16_t* v_cache, const int64_t* table,
                   int64_t len, uint16_t* out, int64_t group, int64_t kv_heads, int64_t kv_head, int64_t dim,
                   int64_t block_size, float scale) {
  const int64_t vectors = dim / 16;
  __m512 queries[MAX_GROUP][MAX_VECTORS], sums[MAX_GROUP][MAX_VECTORS];
  float highest[MAX_GROUP], total[MAX_GROUP], weights[MAX_GROUP][CHUNK];
  for (int64_t g = 0; g < group; g++) {
    for (int64_t v = 0; v < vectors; v++) {
      queries[g][v] = load16(q + g * dim + v * 16);
      sums[g][v] = _mm512_setzero_ps();
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
      __m512 key[MAX_VECTORS];
      for (int64_t v = 0; v < vectors; v++) key[v] = load16(keys[c] + v * 16);
      for (int64_t g = 0; g < group; g++) {
        __m512 dot = _mm512_mul_ps(queries[g][0], key[0]);
        for (int64_t v = 1; v < vectors; v++) dot = _mm512_fmadd_ps(queries[g][v], key[v], dot);
        scores[g][c] = _mm512_reduce_add_ps(dot) * scale;
      }
    }
    for (int64_t g = 0; g < group; g++) {
      float top = highest[g];
      for (int64_t c = 0; c < count; c++) top = scores[g][c] > top ? scores[g][c] : top;
      const float shrink = expf(highest[g] - top);  // 0 on the first chunk (exp(-inf))
      float added = 0.0f;
      for (int64_t c = 0; c < count; c++) added += weights[g][c] = expf(scores[g][c] - top);
      total[g] = total[g] * shrink + added;
      highest[g] = top;
      const __m512 factor = _mm512_set1_ps(shrink);
      for (int64_t v = 0; v < vectors; v++) sums[g][v] = _mm512_mul_ps(sums[g][v], factor);
    }
    for (int64_t c = 0; c < count; c++) {
      __m512 value[MAX_VECTORS];
      for (int64_t v = 0; v < vectors; v++) value[v] = load16(values[c] + v * 16);
      for (int64_t g = 0; g < group; g++) {
        const __m512 weight = _mm512_set1_ps(weights[g][c]);
        for (int64_t v = 0; v < vectors; v++) sums[g][v] = _mm512_fmadd_ps(weight, value[v], sums[g][v]);
      }
    }
  }
  for (int64_t g = 0; g < group; g++) {
    const __m512 inverse = _mm512_set1_ps(1.0f / total[g]);
    for (int64_t v = 0; v < vectors; v++)
      _mm256_storeu_si256((void*)(out + g * dim + v * 16),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(sums[g][v], inverse)));
  }
}

// Whether every sequence has 1 .. max_blocks * block_size keys, all in blocks 0 .. num_blocks - 1.
static int valid_tables(const int64_t* tables, const int64_t* lens, int64_t seqs, int64_t block_size,
                        int64_t max_blocks, int64_t num_blocks) {
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
  if (group > MAX_GROUP || group * kv_heads != heads || dim % 16 || dim / 16 > MAX_VECTORS) return -1;
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
