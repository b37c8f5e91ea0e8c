// What the CPU kernels of this folder share: which instruction sets the build has, a vector
// exp2, and the AMX tile setup. Built with -march=native by kernels/cpu_build.py.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define MLASERVE_HAVE_AVX512_BF16 1
#endif
#if defined(MLASERVE_HAVE_AVX512_BF16) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define MLASERVE_HAVE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace mlaserve {

inline float bf16_to_float(uint16_t b) {
  const uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, as torch converts (NaN stays a quiet NaN).
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (u >> 16) | 0x40u;
  return uint16_t((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);  // a select: stays vectorized
}

#ifdef MLASERVE_HAVE_AVX512_BF16
// 2^x for x <= 0 (scores minus their running max): 2^round(x) * 2^f, f in [-1/2, 1/2], with the
// Taylor series of e^(f ln 2) to degree 7 (relative error under 1e-8, below float32's).
inline __m512 exp2_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-127.f));
  const __m512 xi = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, xi);
  __m512 y = _mm512_set1_ps(1.525273380405984e-05f);
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.5403530393381608e-04f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.3333558146428443e-03f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(9.618129107628477e-03f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(5.550410866482158e-02f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(2.402265069591007e-01f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(6.931471805599453e-01f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(y, xi);
}

// Sixteen bf16 values widened to float32 (exact: the bits move up 16).
inline __m512 bf16x16_to_ps(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
inline __m512 bf16x16_to_ps(const uint16_t* p) {
  return bf16x16_to_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// r[i] lane j <- r[j] lane i, for 32-bit lanes.
inline void transpose16x16_epi32(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(u[i], u[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(u[i], u[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(u[i + 8], u[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(u[i + 8], u[i + 12], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
  }
}

// C[R][16 V] (float32, row stride ldc) = A[R][K] (bf16, row stride lda) x one strip of 16 V
// columns in the tiles' B layout ([K / 2][16 V][2]: pairs of K interleaved), on AVX-512 BF16:
// each pair of A's row, broadcast, meets V vectors of the strip's pair row in one dot product per
// vector, summed in float32 in K order. R V accumulators stay in registers (at most 24 of 32).
template <int R, int V>
inline void strip_rows_avx512(const uint16_t* A, int64_t lda, const uint16_t* strip, int K, float* C, int64_t ldc) {
  static_assert(R * V <= 24, "accumulators must fit the registers");
  __m512 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int kp = 0; kp < K / 2; ++kp) {
    const uint16_t* b = strip + size_t(kp) * V * 32;
    __m512bh bv[V];
    for (int v = 0; v < V; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + v * 32);
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, A + r * lda + 2 * kp, 4);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, bv[v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(C + r * ldc + v * 16, acc[r][v]);
}

// strip_rows_avx512 over `rows` rows (any count), in groups that fill the registers.
template <int V>
inline void strip_product_avx512(const uint16_t* A, int64_t lda, int64_t rows, const uint16_t* strip, int K, float* C,
                                 int64_t ldc) {
  constexpr int G = 24 / V;  // rows per group: 24 for 16-column strips, 12 for 32, 6 for 64
  int64_t r = 0;
  for (; r + G <= rows; r += G) strip_rows_avx512<G, V>(A + r * lda, lda, strip, K, C + r * ldc, ldc);
  if constexpr (G > 12) {  // 16-column strips: a tail of 12-23 rows takes 12 first
    if (rows - r >= 12) {
      strip_rows_avx512<12, V>(A + r * lda, lda, strip, K, C + r * ldc, ldc);
      r += 12;
    }
  }
  const int64_t left = rows - r;
  const uint16_t* a = A + r * lda;
  float* c = C + r * ldc;
  switch (left) {  // the tail, one row count at a time (R is a template parameter)
#define MLASERVE_TAIL(n) \
  case n:                \
    if constexpr (n < G) strip_rows_avx512<n, V>(a, lda, strip, K, c, ldc); \
    break;
    MLASERVE_TAIL(1) MLASERVE_TAIL(2) MLASERVE_TAIL(3) MLASERVE_TAIL(4) MLASERVE_TAIL(5) MLASERVE_TAIL(6)
    MLASERVE_TAIL(7) MLASERVE_TAIL(8) MLASERVE_TAIL(9) MLASERVE_TAIL(10) MLASERVE_TAIL(11)
#undef MLASERVE_TAIL
    default:
      break;
  }
}

#endif  // MLASERVE_HAVE_AVX512_BF16

#ifdef MLASERVE_HAVE_AMX
// Linux hands the AMX tile registers only to processes that ask for them.
inline bool amx_permitted() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Every tile 16 rows x 64 bytes, except those `shape` names otherwise ({rows, bytes per row}).
inline void load_tile_config(const int (*shape)[2], int count) {
  TileConfig c{};
  c.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = uint8_t(t < count ? shape[t][0] : 16);
    c.colsb[t] = uint16_t(t < count ? shape[t][1] : 64);
  }
  // GCC 12 at -O3 does not see ldtilecfg read the struct and drops stores to it (seen: rows and
  // column bytes left as stack garbage, a #GP on load); the barrier makes every store land first.
  asm volatile("" : : "r"(&c) : "memory");
  _tile_loadconfig(&c);
}
#endif  // MLASERVE_HAVE_AMX

}  // namespace mlaserve
