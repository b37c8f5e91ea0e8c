// A bf16 linear on the CPU's AMX tiles, or (a build without AMX) AVX-512 BF16 dot products: y = x W^T
// (float32 sums, rounded once to bf16, as torch's bf16 matmul), with W stored once, at load, in
// the tiles' B layout.
//
// W [N, K] is kept as strips of 32 output columns, each strip's rows of K in pairs interleaved:
// strips[s][k / 2][c][k % 2] = W[32 s + c][k]. A strip is contiguous (K x 64 bytes), so its
// tiles stream from memory in order, and each tile load is 16 rows 128 bytes apart. The output is
// made in blocks of 32 rows x 32 columns: two A tiles (16 rows each) and two B tiles (16 columns
// each) per 32 values of K feed four accumulator tiles. A block of 16 rows or fewer (decode
// batches) uses one A tile. Without AMX a block's rows run through strip_product_avx512
// (cpu_common.h), which reads the same strips.
//
// Why not torch's matmul: it re-lays the weight out for the tiles on every call. For the small
// model's linears that re-layout, with the weight read cold from memory, took 2-3x the product's
// own time inside a decode step (0.18-0.34 ms against 0.08-0.13 ms warm, 256 rows).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

#include "cpu_common.h"

namespace {

using namespace mlaserve;

#ifdef MLASERVE_HAVE_AVX512_BF16

constexpr int kStrip = 32;  // output columns per strip

#ifdef MLASERVE_HAVE_AMX
constexpr bool kTiles = true;

// C[16 or 32][32] (float32, row stride 32) = A[rows][K] (bf16, row stride lda) x one strip.
template <bool kTwoRowTiles>
inline void block_product(const uint16_t* A, int64_t lda, const uint16_t* strip, int K, float* C) {
  _tile_zero(0);
  _tile_zero(1);
  if (kTwoRowTiles) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int k0 = 0; k0 < K; k0 += 32) {
    const uint16_t* b = strip + size_t(k0 / 2) * kStrip * 2;
    _tile_loadd(4, A + k0, lda * 2);
    _tile_loadd(6, b, kStrip * 4);
    _tile_loadd(7, b + 32, kStrip * 4);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (kTwoRowTiles) {
      _tile_loadd(5, A + 16 * lda + k0, lda * 2);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, C, kStrip * 4);
  _tile_stored(1, C + 16, kStrip * 4);
  if (kTwoRowTiles) {
    _tile_stored(2, C + 16 * kStrip, kStrip * 4);
    _tile_stored(3, C + 16 * kStrip + 16, kStrip * 4);
  }
}
#else
constexpr bool kTiles = false;
#endif  // MLASERVE_HAVE_AMX

struct Linear {
  const uint16_t* x;
  int64_t x_row, x_head, rows;
  const uint16_t* strips;  // heads x [N / 32][K / 2][32][2]
  int K, N, heads;
  uint16_t* out;
  int64_t out_row, out_head;
};

void run_linear(const Linear& L, int num_threads) {
  const int64_t row_blocks = (L.rows + 31) / 32;
  const int n_strips = L.N / kStrip;
  const size_t strip_size = size_t(L.K) * kStrip;
  // Strips go in chunks that stay in a core's L2 while every row block passes over them (a 3 MB
  // weight read whole per row block ran at half speed); few row blocks (decode) also need the
  // strips shared out, or threads sit idle.
  const int64_t l2_strips = std::max<int64_t>(1, (512 << 10) / int64_t(strip_size * 2));
  const int64_t spread = std::max<int64_t>(1, (2 * num_threads + row_blocks - 1) / row_blocks);
  const int per_chunk = int(std::max<int64_t>(1, std::min<int64_t>(l2_strips, (n_strips + spread - 1) / spread)));
  const int64_t chunks = (n_strips + per_chunk - 1) / per_chunk;
  const int64_t items = int64_t(L.heads) * row_blocks * chunks;
#pragma omp parallel num_threads(int(std::min<int64_t>(num_threads, items)))
  {
#ifdef MLASERVE_HAVE_AMX
    const int shape[1][2] = {{16, 64}};
    load_tile_config(shape, 1);
#endif
    std::vector<uint16_t> padded;
    alignas(64) float Cbuf[2 * 32 * kStrip];
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t rb = it % row_blocks, head = it / (row_blocks * chunks);
      const int s0 = int(it / row_blocks % chunks) * per_chunk, s1 = std::min(n_strips, s0 + per_chunk);
      const uint16_t* strips = L.strips + head * int64_t(L.N) * L.K;
      uint16_t* out = L.out + head * L.out_head;
      const int64_t r0 = rb * 32;
      const int n = int(std::min<int64_t>(32, L.rows - r0));
      const int tile_rows = n > 16 ? 32 : 16;
      // A short block is read from a zero-padded copy: the tiles always load whole 16-row tiles.
      const uint16_t* A = L.x + head * L.x_head + r0 * L.x_row;
      int64_t lda = L.x_row;
      if (kTiles && n < tile_rows) {
        padded.assign(size_t(tile_rows) * L.K, 0);
        for (int r = 0; r < n; ++r) std::memcpy(padded.data() + size_t(r) * L.K, A + r * L.x_row, sizeof(uint16_t) * L.K);
        A = padded.data();
        lda = L.K;
      }
      // Each strip's tiles go to one of two buffers while the previous strip's are rounded out of
      // the other: that vector work then runs beside the tile unit's products instead of after them.
      for (int s = s0; s <= s1; ++s) {
        if (s < s1) {
          float* C = Cbuf + (s & 1) * 32 * kStrip;
#ifdef MLASERVE_HAVE_AMX
          if (tile_rows == 32)
            block_product<true>(A, lda, strips + s * strip_size, L.K, C);
          else
            block_product<false>(A, lda, strips + s * strip_size, L.K, C);
#else
          strip_product_avx512<kStrip / 16>(A, lda, n, strips + s * strip_size, L.K, C, kStrip);
#endif
        }
        if (s > s0) {
          const float* C = Cbuf + ((s - 1) & 1) * 32 * kStrip;
          for (int r = 0; r < n; ++r) {
            const float* src = C + r * kStrip;
            _mm512_storeu_si512(out + (r0 + r) * L.out_row + (s - 1) * kStrip,
                                (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + 16), _mm512_loadu_ps(src)));
          }
        }
      }
    }
#ifdef MLASERVE_HAVE_AMX
    _tile_release();
#endif
  }
}

#endif  // MLASERVE_HAVE_AVX512_BF16

}  // namespace

extern "C" {

// For each of `heads` independent products (heads = 1: a plain linear): x: [rows, K] bf16 (row
// stride x_row, head h at x + h * x_head); strips: W_h [N, K] as [N / 32][K / 2][32][2] bf16, the
// heads' one after another; out: [rows, N] bf16 (row stride out_row, head h at out + h * out_head).
// K % 32 == 0 and N % 32 == 0. Returns 0, or -1 when this build or shape cannot.
int linear_bf16(const uint16_t* x, int64_t x_row, int64_t x_head, int64_t rows, const uint16_t* strips, int K, int N,
                int heads, uint16_t* out, int64_t out_row, int64_t out_head, int num_threads) {
#ifdef MLASERVE_HAVE_AVX512_BF16
#ifdef MLASERVE_HAVE_AMX
  if (!amx_permitted()) return -1;
#endif
  if (K % 32 || N % 32 || K <= 0 || N <= 0 || rows < 0 || heads < 1) return -1;
  if (rows == 0) return 0;
  run_linear(Linear{x, x_row, x_head, rows, strips, K, N, heads, out, out_row, out_head}, num_threads);
  return 0;
#else
  (void)x, (void)x_row, (void)x_head, (void)rows, (void)strips, (void)K, (void)N, (void)heads, (void)out,
      (void)out_row, (void)out_head, (void)num_threads;
  return -1;
#endif
}

}  // extern "C"
