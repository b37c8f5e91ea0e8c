// Routed experts on the CPU's AMX tiles (or, in a build without AMX, AVX-512 BF16 dot products on
// the same weight layout): the contract of model/moe.py's RoutedExperts on its
// CPU path, for one rank's experts, from the router's choices to the tokens' summed outputs.
//
// The choices (token t's j-th: expert ids[t][j], weight weights[t][j]) that fall on this rank's
// experts are counting-sorted by expert, token order kept. For each such choice, on its token's
// hidden state x:
//     h = x W1_e            (W1_e = [gate | up], hidden x 2 inter)
//     a = silu(h_gate) * h_up
//     y = weight * (a W2_e)      (W2_e: inter x hidden), rounded to bf16 into the choice's row
// and then out[t] = bf16(sum of t's rows in float32) (+ add[t], the shared expert, rounded again:
// the torch path's `routed + shared`). Work items are (expert, 16 rows); each runs both products
// on tiles with the intermediate kept in the thread's own scratch (float32 between the products,
// bf16 into the second, as the tiles take it). Weights are stored once, at load, in the tiles' B
// layout: strips of 64 columns, each K / 2 rows of interleaved pairs ([N / 64][K / 2][64][2]), so
// a strip's tiles stream from memory in order (decode steps read every expert's weights cold).
//
// Why not torch: a batched matmul pads every expert to the busiest one's rows, or one call per
// expert pays ~100 padded rows' worth of overhead (model/moe.py); either way the bf16 matmuls
// re-pack the weights for the tiles on every call. And the sort, gather and scatter-add around
// the experts, as torch ops, had cost a quarter of the experts' own time at 2K tokens.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

#include "cpu_common.h"

namespace {

using namespace mlaserve;

#ifdef MLASERVE_HAVE_AVX512_BF16

constexpr int kItemsPerUnit = 8;  // see run_routed
constexpr int kRows = 16;  // rows per work item: one tile's height (32-row items, each weight
                           // tile serving two row tiles, measured 15-25% slower here)

constexpr int kStrip = 64;  // weight columns per strip

// C[16][N] (float32, row stride ldc) = A[16][K] (bf16, row stride lda) x B (bf16, strips of 64
// columns: [N / 64][K / 2][64][2]). Four 16-column output tiles at a time share each A tile.
// K % 32 == 0, N % 64 == 0. Without AMX only the first `rows` rows are made (the rest are padding).
void gemm_rows16(const uint16_t* A, int lda, int rows, const uint16_t* B, int K, int N, float* C, int ldc) {
#ifndef MLASERVE_HAVE_AMX
  for (int n0 = 0; n0 < N; n0 += kStrip) strip_product_avx512<kStrip / 16>(A, lda, rows, B + size_t(n0) * K, K, C + n0, ldc);
#else
  (void)rows;
  for (int n0 = 0; n0 < N; n0 += kStrip) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    const uint16_t* strip = B + size_t(n0) * K;
    for (int k0 = 0; k0 < K; k0 += 32) {
      _tile_loadd(4, A + k0, lda * 2);
      const uint16_t* b = strip + size_t(k0 / 2) * kStrip * 2;
      _tile_loadd(5, b, kStrip * 4);
      _tile_dpbf16ps(0, 4, 5);
      _tile_loadd(6, b + 32, kStrip * 4);
      _tile_dpbf16ps(1, 4, 6);
      _tile_loadd(7, b + 64, kStrip * 4);
      _tile_dpbf16ps(2, 4, 7);
      _tile_loadd(5, b + 96, kStrip * 4);
      _tile_dpbf16ps(3, 4, 5);
    }
    _tile_stored(0, C + n0, ldc * 4);
    _tile_stored(1, C + n0 + 16, ldc * 4);
    _tile_stored(2, C + n0 + 32, ldc * 4);
    _tile_stored(3, C + n0 + 48, ldc * 4);
  }
#endif
}

inline __m512 silu_ps(__m512 x) {  // x / (1 + e^-x)
  const __m512 e = exp2_ps(_mm512_mul_ps(x, _mm512_set1_ps(-1.4426950408889634f)));
  return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), e));
}

struct Item {
  int expert;
  int64_t row0;
  int rows;
};

struct Routed {
  const uint16_t* x;
  int64_t x_row;
  int64_t tokens;
  const int64_t* ids;
  const float* weights;
  int k, first_expert, n_experts;
  const uint16_t *w1, *w2;
  const uint16_t* add;
  int64_t add_row;
  uint16_t* choices;  // [tokens * k][H]: the row of each on-rank choice
  uint16_t* out;
  int64_t out_row;
  int H, I;
};

void run_routed(const Routed& R, int num_threads) {
  const int H = R.H, I = R.I;
  const int64_t n_choices = R.tokens * R.k;
  // Counting sort of the on-rank choices by expert; each row keeps its choice's index.
  std::vector<int64_t> starts(R.n_experts + 1, 0);
  for (int64_t c = 0; c < n_choices; ++c) {
    const int64_t e = R.ids[c] - R.first_expert;
    if (e >= 0 && e < R.n_experts) ++starts[e + 1];
  }
  for (int e = 0; e < R.n_experts; ++e) starts[e + 1] += starts[e];
  std::vector<int64_t> choice_of_row(starts[R.n_experts]);
  {
    std::vector<int64_t> next(starts.begin(), starts.end() - 1);
    for (int64_t c = 0; c < n_choices; ++c) {
      const int64_t e = R.ids[c] - R.first_expert;
      if (e >= 0 && e < R.n_experts) choice_of_row[next[e]++] = c;
    }
  }
  // Work units are runs of up to kItemsPerUnit items of one expert, run by one thread in turn:
  // the expert's weights come from memory for the first and from that core's L2 for the rest. (Items
  // handed out one at a time split an expert's rows between the cores, and a decode step read every
  // expert's weights from memory twice.)
  std::vector<Item> items;
  std::vector<int64_t> unit_start{0};
  for (int e = 0; e < R.n_experts; ++e) {
    for (int64_t r = starts[e]; r < starts[e + 1]; r += kRows) {
      if (int64_t(items.size()) - unit_start.back() == kItemsPerUnit) unit_start.push_back(int64_t(items.size()));
      items.push_back({e, r, int(std::min<int64_t>(kRows, starts[e + 1] - r))});
    }
    if (int64_t(items.size()) > unit_start.back()) unit_start.push_back(int64_t(items.size()));
  }
  const int64_t units = int64_t(unit_start.size()) - 1;
  const size_t w1_size = size_t(H) * 2 * I, w2_size = size_t(I) * H;
#pragma omp parallel num_threads(num_threads)
  {
#ifdef MLASERVE_HAVE_AMX
    const int shape[1][2] = {{16, 64}};
    load_tile_config(shape, 1);  // every tile 16 x 64 bytes
#endif
    std::vector<uint16_t> a(size_t(kRows) * H), act(size_t(kRows) * I);
    std::vector<float> h(size_t(kRows) * 2 * I), o(size_t(kRows) * H);
#pragma omp for schedule(dynamic, 1)
    for (int64_t unit = 0; unit < units; ++unit)
    for (int64_t it = unit_start[unit]; it < unit_start[unit + 1]; ++it) {
      const Item& w = items[it];
      const int64_t* choice = choice_of_row.data() + w.row0;
      // The rows' tokens gathered; a short last block is padded with zero rows (outputs unused).
      for (int r = 0; r < w.rows; ++r)
        std::memcpy(a.data() + size_t(r) * H, R.x + choice[r] / R.k * R.x_row, sizeof(uint16_t) * H);
      if (w.rows < kRows) std::memset(a.data() + size_t(w.rows) * H, 0, sizeof(uint16_t) * (kRows - w.rows) * H);
      gemm_rows16(a.data(), H, w.rows, R.w1 + w.expert * w1_size, H, 2 * I, h.data(), 2 * I);
      for (int r = 0; r < kRows; ++r) {
        const float* g = h.data() + size_t(r) * 2 * I;
        uint16_t* dst = act.data() + size_t(r) * I;
        for (int i = 0; i < I; i += 32) {
          const __m512 lo = _mm512_mul_ps(silu_ps(_mm512_loadu_ps(g + i)), _mm512_loadu_ps(g + I + i));
          const __m512 hi = _mm512_mul_ps(silu_ps(_mm512_loadu_ps(g + i + 16)), _mm512_loadu_ps(g + I + i + 16));
          _mm512_storeu_si512(dst + i, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
      }
      gemm_rows16(act.data(), I, w.rows, R.w2 + w.expert * w2_size, I, H, o.data(), H);
      for (int r = 0; r < w.rows; ++r) {
        const __m512 s = _mm512_set1_ps(R.weights[choice[r]]);
        const float* src = o.data() + size_t(r) * H;
        uint16_t* dst = R.choices + choice[r] * H;
        for (int d = 0; d < H; d += 32) {
          const __m512 lo = _mm512_mul_ps(s, _mm512_loadu_ps(src + d));
          const __m512 hi = _mm512_mul_ps(s, _mm512_loadu_ps(src + d + 16));
          _mm512_storeu_si512(dst + d, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
      }
    }
#ifdef MLASERVE_HAVE_AMX
    _tile_release();
#endif
    // Each token's rows summed (choices on other ranks' experts were not written: skipped).
#pragma omp for schedule(static)
    for (int64_t t = 0; t < R.tokens; ++t) {
      uint16_t* dst = R.out + t * R.out_row;
      for (int d = 0; d < H; d += 32) {
        __m512 lo = _mm512_setzero_ps(), hi = _mm512_setzero_ps();
        for (int j = 0; j < R.k; ++j) {
          const int64_t c = t * R.k + j, e = R.ids[c] - R.first_expert;
          if (e < 0 || e >= R.n_experts) continue;
          const __m512i row = _mm512_loadu_si512(R.choices + c * H + d);
          lo = _mm512_add_ps(lo, bf16x16_to_ps(_mm512_castsi512_si256(row)));
          hi = _mm512_add_ps(hi, bf16x16_to_ps(_mm512_extracti64x4_epi64(row, 1)));
        }
        if (R.add) {
          const __m512i sum = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // the routed sum, rounded as torch's
          const __m512i more = _mm512_loadu_si512(R.add + t * R.add_row + d);
          lo = _mm512_add_ps(bf16x16_to_ps(_mm512_castsi512_si256(sum)), bf16x16_to_ps(_mm512_castsi512_si256(more)));
          hi = _mm512_add_ps(bf16x16_to_ps(_mm512_extracti64x4_epi64(sum, 1)),
                             bf16x16_to_ps(_mm512_extracti64x4_epi64(more, 1)));
        }
        _mm512_storeu_si512(dst + d, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
      }
    }
  }
}

#endif  // MLASERVE_HAVE_AVX512_BF16

}  // namespace

extern "C" {

// x: [tokens, hidden] bf16 (row stride x_row); ids [tokens * k] int64 (global expert ids; those
// outside [first_expert, first_expert + n_experts) belong to other ranks and are skipped), weights
// [tokens * k] float32; w1: [n][2 inter / 64][hidden / 2][64][2], w2: [n][hidden / 64][inter / 2][64][2]
// (bf16, strips of 64 columns of pairs of rows interleaved); add: null or [tokens, hidden] bf16
// (row stride add_row); choices: scratch, [tokens * k][hidden] bf16; out: [tokens, hidden] bf16
// (row stride out_row). hidden % 64 == 0 and inter % 32 == 0. Returns 0, or -1 when this build
// cannot.
int moe_routed(const uint16_t* x, int64_t x_row, int64_t tokens, const int64_t* ids, const float* weights, int k,
               int first_expert, int n_experts, const uint16_t* w1, const uint16_t* w2, const uint16_t* add,
               int64_t add_row, uint16_t* choices, uint16_t* out, int64_t out_row, int hidden, int inter,
               int num_threads) {
#ifdef MLASERVE_HAVE_AVX512_BF16
#ifdef MLASERVE_HAVE_AMX
  if (!amx_permitted()) return -1;
#endif
  if (hidden % 64 || inter % 32 || k <= 0) return -1;
  const Routed R{x, x_row, tokens, ids, weights, k, first_expert, n_experts, w1, w2, add, add_row, choices, out,
                 out_row, hidden, inter};
  run_routed(R, num_threads);
  return 0;
#else
  (void)x, (void)x_row, (void)tokens, (void)ids, (void)weights, (void)k, (void)first_expert, (void)n_experts,
      (void)w1, (void)w2, (void)add, (void)add_row, (void)choices, (void)out, (void)out_row, (void)hidden,
      (void)inter, (void)num_threads;
  return -1;
#endif
}

}  // extern "C"
