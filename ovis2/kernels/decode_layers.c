// The decoder layers of a decode step (one new token per sequence) in one call, for CPUs with AVX2 and FMA but no
// bf16 instructions. Per layer, as Qwen2DecoderLayer in ovis2/modeling.py computes it: RMSNorm; the q/k/v product
// and its bias; RoPE on q and k; k and v written to the paged cache; attention; the output product; the residual
// add; RMSNorm; the gate/up product; SiLU(gate) * up; the down product; the residual add. The products, RMSNorms
// and attention are the package's other kernels, reached through the pointers in `kernels`; the steps between
// them are here, rounding to bf16 where PyTorch's bf16 ops round (SiLU's exp may differ from PyTorch's in fp32's
// last bit). Compiled at run time by ovis2/native_decode.py with -mavx2 -mfma -fopenmp.
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "avx2_bf16.h"
#include "avx2_silu.h"

#define MAX_GROUP 16  // the attention kernel's limits (decode_attention.c)
#define MAX_DIM 256
#define PARALLEL_ROWS 8  // rows from which the steps between the kernels split over the threads

typedef int (*product_fn)(const uint16_t* w, const uint16_t* x, const uint16_t* bias, uint16_t* y, int64_t m,
                          int64_t n, int64_t k, int threads);
typedef void (*rms_norm_fn)(const uint16_t* x, const uint16_t* weight, uint16_t* out, int64_t rows, int64_t dim,
                            float eps, int threads);
typedef int (*attention_fn)(const uint16_t* q, const uint16_t* k_cache, const uint16_t* v_cache,
                            const int64_t* tables, const int64_t* lens, uint16_t* out, int64_t seqs, int64_t heads,
                            int64_t kv_heads, int64_t dim, int64_t block_size, int64_t max_blocks, int64_t num_blocks,
                            float scale, int threads);

typedef struct {
  product_fn product;
  rms_norm_fn rms_norm;
  attention_fn attention;
} kernels;

typedef struct {
  int64_t hidden, heads, kv_heads, head_dim, intermediate, block_size, num_blocks, max_blocks;
  float eps, scale;
} dims;

typedef struct {  // a bias may be NULL
  const uint16_t *input_norm, *qkv, *qkv_bias, *o, *o_bias, *post_norm, *gate_up, *gate_up_bias, *down, *down_bias;
  uint16_t *k_cache, *v_cache;
} layer;

typedef struct {  // one step's intermediate rows
  uint16_t *normed, *qkv, *q, *attended, *out, *gate_up, *act;
} scratch;

static int threads_for(int threads, int64_t items) {
  if (items < 1) return 1;
  return items < threads ? (int)items : threads;
}

// x * cos + rotate_half(x) * sin over one head, each product and the sum rounded to bf16 (PyTorch's bf16 ops).
static void rotate(const uint16_t* x, const uint16_t* cos, const uint16_t* sin, uint16_t* y, int64_t dim) {
  const int64_t half = dim / 2;  // a multiple of 8: dim % 16 == 0
  for (int64_t i = 0; i < half; i += 8) {
    const __m256 low = widen8(x + i), high = widen8(x + half + i);
    const __m256 negated = _mm256_sub_ps(_mm256_setzero_ps(), high);
    store8(y + i, _mm256_add_ps(round_bf16(_mm256_mul_ps(low, widen8(cos + i))),
                                round_bf16(_mm256_mul_ps(negated, widen8(sin + i)))));
    store8(y + half + i, _mm256_add_ps(round_bf16(_mm256_mul_ps(high, widen8(cos + half + i))),
                                       round_bf16(_mm256_mul_ps(low, widen8(sin + half + i)))));
  }
}

// q and k rotated, q into `q` [seqs][heads][dim], k and v into the caches at each token's slot.
static void rotate_and_store(const dims* d, const layer* l, const uint16_t* qkv, const uint16_t* cos,
                             const uint16_t* sin, const int64_t* slots, uint16_t* q, int64_t seqs, int threads) {
  const int64_t dim = d->head_dim, width = (d->heads + 2 * d->kv_heads) * dim, kv_width = d->kv_heads * dim;
#pragma omp parallel for num_threads(threads) if (seqs >= PARALLEL_ROWS) schedule(static)
  for (int64_t s = 0; s < seqs; s++) {
    const uint16_t* row = qkv + s * width;
    for (int64_t h = 0; h < d->heads; h++)
      rotate(row + h * dim, cos + s * dim, sin + s * dim, q + (s * d->heads + h) * dim, dim);
    for (int64_t h = 0; h < d->kv_heads; h++)
      rotate(row + (d->heads + h) * dim, cos + s * dim, sin + s * dim, l->k_cache + slots[s] * kv_width + h * dim,
             dim);
    memcpy(l->v_cache + slots[s] * kv_width, row + (d->heads + d->kv_heads) * dim, kv_width * sizeof(uint16_t));
  }
}

// x += out, rounded to bf16 (the residual stream), `seqs` rows of `width`.
static void add_rows(uint16_t* x, const uint16_t* out, int64_t seqs, int64_t width, int threads) {
  const int64_t body = width / 8 * 8;
#pragma omp parallel for num_threads(threads) if (seqs >= PARALLEL_ROWS) schedule(static)
  for (int64_t s = 0; s < seqs; s++) {
    uint16_t* row = x + s * width;
    const uint16_t* add = out + s * width;
    for (int64_t i = 0; i < body; i += 8) store8(row + i, _mm256_add_ps(widen8(row + i), widen8(add + i)));
    if (body < width)
      store_some(row + body, _mm256_add_ps(widen_some(row + body, width - body), widen_some(add + body, width - body)),
                 width - body);
  }
}

// act = silu(gate) * up, each rounded to bf16; gate and up the two halves of each row of `gate_up`.
static void silu_mul(const uint16_t* gate_up, uint16_t* act, int64_t seqs, int64_t width, int threads) {
  const int64_t body = width / 8 * 8;
#pragma omp parallel for num_threads(threads) if (seqs >= PARALLEL_ROWS) schedule(static)
  for (int64_t s = 0; s < seqs; s++) {
    const uint16_t *gate = gate_up + s * 2 * width, *up = gate + width;
    uint16_t* out = act + s * width;
    for (int64_t i = 0; i < body; i += 8) store8(out + i, silu_times(widen8(gate + i), widen8(up + i)));
    if (body < width)
      store_some(out + body, silu_times(widen_some(gate + body, width - body), widen_some(up + body, width - body)),
                 width - body);
  }
}

// The same step on its own, for the tests: act [seqs][width] from gate_up [seqs][2 * width].
void silu_mul_bf16(const uint16_t* gate_up, uint16_t* act, int64_t seqs, int64_t width, int threads) {
  silu_mul(gate_up, act, seqs, width, threads);
}

// Whether the shapes are within the kernels' limits, every sequence's table and length point inside the cache, and
// each new token's slot is its sequence's last position (the one attention reads it back from), no two the same.
static int valid(const dims* d, const int64_t* slots, const int64_t* tables, const int64_t* lens, int64_t seqs) {
  if (seqs < 1 || d->hidden < 1 || d->intermediate < 1 || d->block_size < 1 || d->num_blocks < 1) return 0;
  if (d->kv_heads < 1 || d->heads < 1 || d->heads % d->kv_heads || d->heads / d->kv_heads > MAX_GROUP) return 0;
  if (d->head_dim < 16 || d->head_dim % 16 || d->head_dim > MAX_DIM) return 0;
  for (int64_t s = 0; s < seqs; s++)
    for (int64_t t = 0; t < s; t++)
      if (slots[s] == slots[t]) return 0;
  const int64_t bs = d->block_size;
  for (int64_t s = 0; s < seqs; s++) {
    const int64_t* table = tables + s * d->max_blocks;
    if (lens[s] < 1 || lens[s] > d->max_blocks * bs) return 0;
    for (int64_t b = 0; b < (lens[s] + bs - 1) / bs; b++)
      if (table[b] < 0 || table[b] >= d->num_blocks) return 0;
    if (slots[s] != table[(lens[s] - 1) / bs] * bs + (lens[s] - 1) % bs) return 0;
  }
  return 1;
}

static int one_layer(const kernels* k, const dims* d, const layer* l, const scratch* t, uint16_t* x,
                     const uint16_t* cos, const uint16_t* sin, const int64_t* slots, const int64_t* tables,
                     const int64_t* lens, int64_t seqs, int threads) {
  const int64_t hidden = d->hidden, inter = d->intermediate, attended = d->heads * d->head_dim;
  const int64_t width = attended + 2 * d->kv_heads * d->head_dim;
  const int rows = threads_for(threads, seqs);
  k->rms_norm(x, l->input_norm, t->normed, seqs, hidden, d->eps, rows);
  if (k->product(l->qkv, t->normed, l->qkv_bias, t->qkv, seqs, width, hidden, threads_for(threads, width / 4)))
    return -1;
  rotate_and_store(d, l, t->qkv, cos, sin, slots, t->q, seqs, threads);
  if (k->attention(t->q, l->k_cache, l->v_cache, tables, lens, t->attended, seqs, d->heads, d->kv_heads, d->head_dim,
                   d->block_size, d->max_blocks, d->num_blocks, d->scale, threads_for(threads, seqs * d->kv_heads)))
    return -1;
  if (k->product(l->o, t->attended, l->o_bias, t->out, seqs, hidden, attended, threads_for(threads, hidden / 4)))
    return -1;
  add_rows(x, t->out, seqs, hidden, threads);
  k->rms_norm(x, l->post_norm, t->normed, seqs, hidden, d->eps, rows);
  if (k->product(l->gate_up, t->normed, l->gate_up_bias, t->gate_up, seqs, 2 * inter, hidden,
                 threads_for(threads, 2 * inter / 4)))
    return -1;
  silu_mul(t->gate_up, t->act, seqs, inter, threads);
  if (k->product(l->down, t->act, l->down_bias, t->out, seqs, hidden, inter, threads_for(threads, hidden / 4)))
    return -1;
  add_rows(x, t->out, seqs, hidden, threads);
  return 0;
}

// x [seqs][hidden] (the residual stream) through `count` layers in place; cos and sin [seqs][head_dim] (RoPE at each
// token's position); slots [seqs]; tables [seqs][max_blocks]; lens [seqs] (the new token the last). Returns 0, or -1
// with nothing written for shapes or tables `valid` refuses, and -1 part-way (x and the caches partly written) where
// memory runs out.
int decode_layers_bf16(const kernels* k, const dims* d, const layer* layers, int64_t count, uint16_t* x,
                       const uint16_t* cos, const uint16_t* sin, const int64_t* slots, const int64_t* tables,
                       const int64_t* lens, int64_t seqs, int threads) {
  if (!valid(d, slots, tables, lens, seqs)) return -1;
  const int64_t attended = d->heads * d->head_dim, width = attended + 2 * d->kv_heads * d->head_dim;
  const int64_t sizes[7] = {d->hidden, width, attended, attended, d->hidden, 2 * d->intermediate, d->intermediate};
  int64_t total = 0;
  for (int i = 0; i < 7; i++) total += sizes[i] * seqs;
  uint16_t* memory = malloc((size_t)total * sizeof(uint16_t));
  if (!memory) return -1;
  uint16_t* parts[7];
  for (int64_t i = 0, offset = 0; i < 7; offset += sizes[i] * seqs, i++) parts[i] = memory + offset;
  const scratch t = {parts[0], parts[1], parts[2], parts[3], parts[4], parts[5], parts[6]};
  int status = 0;
  for (int64_t i = 0; i < count && status == 0; i++)
    status = one_layer(k, d, layers + i, &t, x, cos, sin, slots, tables, lens, seqs, threads);
  free(memory);
  return status;
}
