// One RMSNorm row, shared by the norm kernel (rms_norm_cpu.cpp) and the cache write
// (cache_write_cpu.cpp): out = bf16(float(w) * float(bf16(s * r))), r = 1 / sqrt(mean(s^2) + eps),
// s = bf16(x + y) with y (written to `sum`), else x.
#pragma once

#include <cmath>
#include <cstdint>

#include "cpu_common.h"

namespace mlaserve {

constexpr int kMaxCols = 16384;

inline void norm_row(const uint16_t* x, const uint16_t* y, uint16_t* sum, const uint16_t* w, uint16_t* out, int cols,
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

}  // namespace mlaserve
