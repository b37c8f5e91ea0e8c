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
#include "rms_norm_row.h"

using namespace mlaserve;

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

}  // extern "C"
