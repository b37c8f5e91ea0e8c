// SwiGLU's activation over bf16 rows in one pass: the contract of model/layers.py's DenseMLP
// between its two linears, on the CPU.
//
// Per row of h = [gate | up] (each `cols` wide):  out = bf16(float(bf16(silu(gate))) * float(up))
// The two roundings are the torch reference's (F.silu(gate) * up on bf16 tensors); silu is
// computed in float32 as gate / (1 + 2^(-gate log2 e)), which can differ from torch's exp in the
// last float bit and so, rarely, round to the neighbouring bf16.
//
// Why not torch: silu and the product are two passes with a bf16 temporary; over a 2048-token
// prefill step they cost ~1.7 ms for the small checkpoint's dense MLP (1.2 ms here) and ~0.4 ms
// per shared expert (0.23 ms here).

#include <algorithm>
#include <cmath>
#include <cstdint>

#include <omp.h>

#include "cpu_common.h"

using namespace mlaserve;

namespace {

void silu_mul_row(const uint16_t* gate, const uint16_t* up, uint16_t* out, int cols) {
  int i = 0;
#ifdef MLASERVE_HAVE_AVX512_BF16
  const __m512 minus_log2e = _mm512_set1_ps(-1.4426950408889634f), one = _mm512_set1_ps(1.f);
  for (; i + 16 <= cols; i += 16) {
    const __m512 g = bf16x16_to_ps(gate + i);
    const __m512 s = _mm512_div_ps(g, _mm512_add_ps(one, exp2_ps(_mm512_mul_ps(g, minus_log2e))));
    const __m512 s16 = bf16x16_to_ps((__m256i)_mm512_cvtneps_pbh(s));  // silu's own rounding
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(s16, bf16x16_to_ps(up + i))));
  }
#endif
  for (; i < cols; ++i) {
    const float g = bf16_to_float(gate[i]);
    const float s = bf16_to_float(float_to_bf16(g / (1.f + std::exp(-g))));
    out[i] = float_to_bf16(s * bf16_to_float(up[i]));
  }
}

}  // namespace

extern "C" {

// h: [rows, 2 cols] bf16 (row stride h_stride): gate then up; out: [rows, cols] bf16 (row stride
// out_stride). Returns 0, or -1 for a shape it does not take.
int silu_mul_bf16(const uint16_t* h, int64_t h_stride, uint16_t* out, int64_t out_stride, int64_t rows, int cols,
                  int num_threads) {
  if (rows < 0 || cols <= 0) return -1;
  // A thread per ~32K elements at most: below that the parallel region costs more than it saves.
  const int64_t useful = std::max<int64_t>(1, rows * cols / 32768);
  const int threads = int(std::min<int64_t>(num_threads, useful));
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < rows; ++r) silu_mul_row(h + r * h_stride, h + r * h_stride + cols, out + r * out_stride, cols);
  return 0;
}

}  // extern "C"
