// The MLA layer's cache write on the CPU, in one pass per token: the contract of
// kernels/cache_write.py (RMSNorm of the latent, rope of the key and of the queries, the store,
// quantized for an FP8 cache as kernels/latent_fp8.py quantizes).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include <omp.h>

#include "cpu_common.h"
#include "rms_norm_row.h"

using namespace mlaserve;

namespace {

// ---- Writing the FP8 layout (kernels/latent_fp8.py): torch's quantize_entries, bit for bit ------

// |q| <= 448 (the scale sees to it) -> e4m3fn bits, rounding to nearest even as torch's cast does.
// Normal range: the float's top 3 mantissa bits, rounded in place (a carry moves into the
// exponent), exponent rebiased 127 -> 7. Below 2^-6 the e4m3 value is a multiple of 2^-9, and
// its bits are that multiple (8 is 2^-6, the first normal, whose bits are also 8). A NaN stays a
// NaN, so that a broken activation shows downstream. Branch-free so that the row loop vectorizes.
inline uint8_t float_to_e4m3(float q) {
  uint32_t u;
  std::memcpy(&u, &q, 4);
  const uint32_t sign = (u >> 24) & 0x80u, mag = u & 0x7fffffffu;
  const uint32_t normal = ((mag + 0x7ffffu + ((mag >> 20) & 1u)) >> 20) - (120u << 3);
  float a;
  std::memcpy(&a, &mag, 4);
  const float multiple = (a * 512.f + 0x1p23f) - 0x1p23f;  // rounds to nearest even, exactly
  const uint32_t small = uint32_t(multiple);
  const uint32_t bits = mag > 0x7f800000u ? 0x7fu : mag < 0x3c800000u ? small : normal;  // NaN; under 2^-6
  return uint8_t(sign | bits);
}

// One normalized bf16 latent row -> [rank e4m3 bytes | rank / 128 float32 scales] at `out`. The
// scale is the smallest power of two s with amax / s <= 448 (amax / 448 at least 2^-40), found as
// torch's frexp finds it.
void quantize_latent_fp8(const uint16_t* latent, int rank, uint8_t* out) {
  for (int g = 0; g < rank / 128; ++g) {
    const uint16_t* x = latent + g * 128;
    float amax = 0.f;
#pragma omp simd reduction(max : amax)
    for (int i = 0; i < 128; ++i) amax = std::max(amax, std::fabs(bf16_to_float(x[i])));
    int e;
    const float m = std::frexp(std::max(amax / 448.f, 0x1p-40f), &e);
    const float scale = std::ldexp(1.f, e - (m == 0.5f)), inverse = 1.f / scale;  // exact: powers of two
    uint8_t* q = out + g * 128;
#pragma omp simd
    for (int i = 0; i < 128; ++i) q[i] = float_to_e4m3(bf16_to_float(x[i]) * inverse);
    std::memcpy(out + rank + 4 * g, &scale, 4);
  }
}

}  // namespace

extern "C" {

// One step's new latent cache entries for one MLA layer, and its queries' rope, in one pass:
//   cache[slot[t]] = [rms_norm(c_kv[t]) (rank) | rope(k_pe[t], pos[t]) (rope)]
//   q_pe[t, h] = rope(q_pe[t, h], pos[t])     (in place; heads of `heads`)
// rope: each interleaved pair (x0, x1) times the complex rotation of its position, in float32,
// rounded to bf16 once (the torch path: x.float() as complex, times rotations, back to bf16).
// rotations: [positions, rope / 2] complex64 as float pairs. With cache_fp8 the cache rows are the
// FP8 layout's bytes (rank + rank / 32 + 2 rope): the bf16 entry is quantized as
// latent_fp8.quantize_entries would quantize it. Returns 0, -1 for a shape it does not take, or -2
// when a slot or position is out of range (nothing is written for that token).
int mla_cache_entries_bf16(const uint16_t* c_kv, int64_t c_stride, const uint16_t* k_pe, int64_t k_stride,
                           uint16_t* q_pe, int64_t q_row, int64_t q_head, int heads, const uint16_t* norm_w,
                           float eps, const float* rotations, int64_t num_positions, const int64_t* positions,
                           const int64_t* slots, void* cache, int64_t cache_rows, int rank, int rope,
                           int64_t tokens, int cache_fp8, int num_threads) {
  if (rank <= 0 || rank > kMaxCols || rope <= 0 || rope % 2 || heads < 0 || (cache_fp8 && rank % 128)) return -1;
  const int64_t entry = rank + rope;
  const int64_t row_bytes = cache_fp8 ? rank + rank / 32 + 2 * int64_t(rope) : 2 * entry;
  const int64_t useful = std::max<int64_t>(1, tokens * (entry + int64_t(heads) * rope) / 32768);
  const int threads = int(std::min<int64_t>(num_threads, useful));
  int status = 0;
#pragma omp parallel num_threads(threads)
  {
    float scratch[kMaxCols];
    uint16_t latent[kMaxCols];  // FP8 cache: the bf16 latent before quantizing
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tokens; ++t) {
      const int64_t pos = positions[t], slot = slots[t];
      if (pos < 0 || pos >= num_positions || slot < 0 || slot >= cache_rows) {
#pragma omp atomic write
        status = -2;
        continue;
      }
      uint8_t* row = static_cast<uint8_t*>(cache) + slot * row_bytes;
      norm_row(c_kv + t * c_stride, nullptr, nullptr, norm_w, cache_fp8 ? latent : reinterpret_cast<uint16_t*>(row),
               rank, eps, scratch);
      if (cache_fp8) quantize_latent_fp8(latent, rank, row);
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
      rotate(k_pe + t * k_stride, reinterpret_cast<uint16_t*>(row + row_bytes - 2 * int64_t(rope)));
      for (int h = 0; h < heads; ++h) {
        uint16_t* q = q_pe + t * q_row + h * q_head;
        rotate(q, q);
      }
    }
  }
  return status;
}

}  // extern "C"
