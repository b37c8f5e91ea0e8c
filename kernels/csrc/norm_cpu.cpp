// RMSNorm over bf16 rows in one pass, with the residual add before it fused in: the contract of
// model/layers.py's RMSNorm (and DecoderLayer's `h = x + y; norm(h)`), on the CPU.
//
// Per row:  s = bf16(x + y)                       (only with y; written to `sum`)
//           r = 1 / sqrt(mean(float(s)^2) + eps)
//           out = bf16(float(w) * float(bf16(s * r)))
// The two roundings are the reference's: it normalizes in float32, casts back, then multiplies by
// the bf16 weight. Only the sum of squares is ordered differently from torch's reduction.
//
// Why not torch: the reference is six elementwise passes with float32 temporaries; over a
// 2048-token prefill step that is ~1-2 ms per norm on this kind of machine, 25 norms per step.
// Plain loops, vectorized by the compiler for whatever -march=native offers.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include <omp.h>

#include "cpu_common.h"

using namespace mlaserve;

namespace {

constexpr int kMaxCols = 16384;

void norm_row(const uint16_t* x, const uint16_t* y, uint16_t* sum, const uint16_t* w, uint16_t* out, int cols,
              float eps, float* scratch) {
  float squares = 0.f;
  if (y != nullptr) {
#pragma omp simd reduction(+ : squares)
    for (int c = 0; c < cols; ++c) {
      const uint16_t s = float_to_bf16(bf16_to_float(x[c]) + bf16_to_float(y[c]));
      sum[c] = s;
      const float f = bf16_to_float(s);
      scratch[c] = f;
      squares += f * f;
    }
  } else {
#pragma omp simd reduction(+ : squares)
    for (int c = 0; c < cols; ++c) {
      const float f = bf16_to_float(x[c]);
      scratch[c] = f;
      squares += f * f;
    }
  }
  const float r = 1.f / std::sqrt(squares / float(cols) + eps);
#pragma omp simd
  for (int c = 0; c < cols; ++c)
    out[c] = float_to_bf16(bf16_to_float(w[c]) * bf16_to_float(float_to_bf16(scratch[c] * r)));
}

}  // namespace

extern "C" {

// x, y: [rows, cols] with row strides (y may be null); sum: [rows, cols] (row stride sum_stride;
// written only with y); w: [cols]; out: [rows, cols] (row stride out_stride). All bf16 bits.
// Returns 0, or -1 for a shape it does not take.
int rms_norm_bf16(const uint16_t* x, int64_t x_stride, const uint16_t* y, int64_t y_stride, uint16_t* sum,
                  int64_t sum_stride, const uint16_t* w, uint16_t* out, int64_t out_stride, int64_t rows, int cols,
                  float eps, int num_threads) {
  if (rows < 0 || cols <= 0 || cols > kMaxCols) return -1;
  // A thread per ~32K elements at most: below that the parallel region costs more than it saves.
  const int64_t useful = std::max<int64_t>(1, rows * cols / 32768);
  const int threads = int(std::min<int64_t>(num_threads, useful));
#pragma omp parallel num_threads(threads)
  {
    float scratch[kMaxCols];
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r)
      norm_row(x + r * x_stride, y ? y + r * y_stride : nullptr, y ? sum + r * sum_stride : nullptr, w,
               out + r * out_stride, cols, eps, scratch);
  }
  return 0;
}

// One step's new latent cache entries for one MLA layer, and its queries' rope, in one pass:
//   cache[slot[t]] = [rms_norm(c_kv[t]) (rank) | rope(k_pe[t], pos[t]) (rope)]
//   q_pe[t, h] = rope(q_pe[t, h], pos[t])     (in place; heads of `heads`)
// rope: each interleaved pair (x0, x1) times the complex rotation of its position, in float32,
// rounded to bf16 once (the torch path: x.float() as complex, times rotations, back to bf16).
// rotations: [positions, rope / 2] complex64 as float pairs. Returns 0, -1 for a shape it does not
// take, or -2 when a slot or position is out of range (nothing is written for that token).
int mla_cache_entries_bf16(const uint16_t* c_kv, int64_t c_stride, const uint16_t* k_pe, int64_t k_stride,
                           uint16_t* q_pe, int64_t q_row, int64_t q_head, int heads, const uint16_t* norm_w,
                           float eps, const float* rotations, int64_t num_positions, const int64_t* positions,
                           const int64_t* slots, uint16_t* cache, int64_t cache_rows, int rank, int rope,
                           int64_t tokens, int num_threads) {
  if (rank <= 0 || rank > kMaxCols || rope <= 0 || rope % 2 || heads < 0) return -1;
  const int64_t entry = rank + rope;
  const int64_t useful = std::max<int64_t>(1, tokens * (entry + int64_t(heads) * rope) / 32768);
  const int threads = int(std::min<int64_t>(num_threads, useful));
  int status = 0;
#pragma omp parallel num_threads(threads)
  {
    float scratch[kMaxCols];
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tokens; ++t) {
      const int64_t pos = positions[t], slot = slots[t];
      if (pos < 0 || pos >= num_positions || slot < 0 || slot >= cache_rows) {
#pragma omp atomic write
        status = -2;
        continue;
      }
      uint16_t* row = cache + slot * entry;
      norm_row(c_kv + t * c_stride, nullptr, nullptr, norm_w, row, rank, eps, scratch);
      const float* rot = rotations + pos * rope;  // rope / 2 (cos, sin) pairs, scaled
      auto rotate = [&](const uint16_t* src, uint16_t* dst) {
#pragma omp simd
        for (int i = 0; i < rope / 2; ++i) {
          const float a = bf16_to_float(src[2 * i]), b = bf16_to_float(src[2 * i + 1]);
          const float c = rot[2 * i], d = rot[2 * i + 1];
          dst[2 * i] = float_to_bf16(a * c - b * d);
          dst[2 * i + 1] = float_to_bf16(a * d + b * c);
        }
      };
      rotate(k_pe + t * k_stride, row + rank);
      for (int h = 0; h < heads; ++h) {
        uint16_t* q = q_pe + t * q_row + h * q_head;
        rotate(q, q);
      }
    }
  }
  return status;
}

}  // extern "C"
