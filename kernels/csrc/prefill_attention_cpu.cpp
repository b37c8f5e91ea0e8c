// Causal attention of prefill chunks over their expanded keys and values, on the CPU's AMX tiles
// (or AVX-512 BF16 dot products where the build has no AMX, on the same layouts): the contract of kernels/mla_attention.py's expanded prefill path, every chunk of a step in one call.
//
// Queries and keys come in two parts each, [nope | rope] (D = Dn + rope dims): in MLA the rope
// part of the keys is one row per token shared by every head (head stride 0), and the parts of the
// queries are two views of one projection, so nothing is concatenated or broadcast first.
//
// Chunk c has q_len queries (rows q_start..) and k_len >= q_len keys/values (rows k_start..); query
// i sits at position k_len - q_len + i and sees keys 0..that position (bottom-right causal: the
// chunk's cached prefix, then itself). Per head: softmax(scale * q k^T) v, all in bf16 with float32
// scores and accumulators.
//
// Work items are (chunk, head); each packs its values transposed once (V^T, the A operand), then
// takes its queries 16 at a time:
//   scores^T [16 keys x 16 queries] = K (A operand: key rows read in place) x Q^T (B operand,
//     the block's queries with pairs of dims interleaved, built once per block)
//   out^T [Dv x 16 queries] += V^T [Dv x 32 keys] x P^T (B operand: pairs of keys interleaved)
// Scores come out with one query per vector lane, so the softmax's max and sum over keys are
// vertical operations. Keys go in super-blocks of up to kSuper: exact softmax within one, the
// running output rescaled between them (flash attention at a coarse grain).
//
// Why not torch: scaled_dot_product_attention on the CPU takes 0.2-0.5 ms per chunk and head group
// for chunks of 32-256 tokens, and 4x that when values are narrower than keys (DeepSeek-V3: keys 192,
// values 128), which made the caller pad values with zeros.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

#include "cpu_common.h"

namespace {

using namespace mlaserve;

#ifdef MLASERVE_HAVE_AVX512_BF16

constexpr int kSuper = 512;  // keys per exact-softmax block (a multiple of 32)

// A [rows, heads, dims] operand in two parts: dims [0, split) and [split, D), each with its strides.
struct Split {
  const uint16_t *a, *b;
  int64_t a_row, a_head, b_row, b_head;
  // The 32 dims from d0 (a multiple of 32) of a row and head; split % 32 == 0.
  const uint16_t* at(int64_t row, int h, int d0, int split) const {
    return d0 < split ? a + row * a_row + h * a_head + d0 : b + row * b_row + h * b_head + (d0 - split);
  }
};

struct Problem {
  Split q, k;
  const uint16_t* v;
  int64_t v_row, v_head;
  uint16_t* out;
  int64_t o_row, o_head;
  const int64_t *q_start, *q_len, *k_start, *k_len;
  int heads, D, Dn, Dv;
  float scale;
};

struct Scratch {
  std::vector<uint16_t> qt;    // [D / 2][16 queries][2]
  std::vector<uint16_t> kpad;  // [16][D]: a last key tile past the chunk's end, zero-padded
  std::vector<float> s;        // [kSuper keys][16 queries]
  std::vector<uint16_t> pb;    // [kSuper / 2][16 queries][2]
  std::vector<uint16_t> vt;    // [Dv][keys rounded up to 32]
  std::vector<float> ot, acc;  // [Dv][16 queries]
};

// scores^T [16 keys][16 queries] (float32) of the 16 keys from row `row` (or `kpad`, [16][D], for
// a last tile past the chunk's end) against qt, the queries as [D / 2][16][2].
#ifdef MLASERVE_HAVE_AMX
inline void key_tile_scores(const Problem& P, const uint16_t* kpad, int64_t row, int h, const uint16_t* qt, float* s) {
  _tile_zero(0);
  for (int dc = 0; dc < P.D / 32; ++dc) {
    const int d0 = 32 * dc;
    if (kpad)
      _tile_loadd(2, kpad + d0, P.D * 2);
    else
      _tile_loadd(2, P.k.at(row, h, d0, P.Dn), (d0 < P.Dn ? P.k.a_row : P.k.b_row) * 2);
    _tile_loadd(3, qt + size_t(dc) * 16 * 32, 64);
    _tile_dpbf16ps(0, 2, 3);
  }
  _tile_stored(0, s, 64);
}

// ot [Dv][16 queries] = vt [Dv][32 nsteps keys] (row stride ldv) x pb [16 nsteps][16 queries][2].
inline void values_times_probs(const uint16_t* vt, int64_t ldv, int Dv, const uint16_t* pb, int nsteps, float* ot) {
  for (int g0 = 0; g0 < Dv; g0 += 64) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(4);
    _tile_zero(5);
    const uint16_t* v = vt + size_t(g0) * ldv;
    for (int s = 0; s < nsteps; ++s) {
      _tile_loadd(6, pb + size_t(s) * 512, 64);
      _tile_loadd(2, v + 32 * s, ldv * 2);
      _tile_dpbf16ps(0, 2, 6);
      _tile_loadd(3, v + 16 * ldv + 32 * s, ldv * 2);
      _tile_dpbf16ps(1, 3, 6);
      _tile_loadd(7, v + 32 * ldv + 32 * s, ldv * 2);
      _tile_dpbf16ps(4, 7, 6);
      _tile_loadd(2, v + 48 * ldv + 32 * s, ldv * 2);
      _tile_dpbf16ps(5, 2, 6);
    }
    _tile_stored(0, ot + size_t(g0) * 16, 64);
    _tile_stored(1, ot + size_t(g0 + 16) * 16, 64);
    _tile_stored(4, ot + size_t(g0 + 32) * 16, 64);
    _tile_stored(5, ot + size_t(g0 + 48) * 16, 64);
  }
}
#else
inline void key_tile_scores(const Problem& P, const uint16_t* kpad, int64_t row, int h, const uint16_t* qt, float* s) {
  // One key per accumulator; each pair of a key's dims, broadcast, meets the 16 queries' pair.
  const uint16_t *a[16], *b[16];
  for (int r = 0; r < 16; ++r) {
    a[r] = kpad ? kpad + size_t(r) * P.D : P.k.a + (row + r) * P.k.a_row + h * P.k.a_head;
    b[r] = kpad ? kpad + size_t(r) * P.D + P.Dn : P.k.b + (row + r) * P.k.b_row + h * P.k.b_head;
  }
  __m512 acc[16];
  for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
  for (int part = 0; part < 2; ++part) {  // the nope dims, then the rope dims
    const uint16_t* const* rows = part ? b : a;
    const int first = part ? P.Dn / 2 : 0, end = part ? P.D / 2 : P.Dn / 2;
    for (int kp = first; kp < end; ++kp) {
      const __m512bh q = (__m512bh)_mm512_loadu_si512(qt + size_t(kp) * 32);
      const int d = 2 * (kp - first);
      for (int r = 0; r < 16; ++r) {
        int32_t pair;
        std::memcpy(&pair, rows[r] + d, 4);
        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32(pair), q);
      }
    }
  }
  for (int r = 0; r < 16; ++r) _mm512_storeu_ps(s + r * 16, acc[r]);
}

inline void values_times_probs(const uint16_t* vt, int64_t ldv, int Dv, const uint16_t* pb, int nsteps, float* ot) {
  strip_product_avx512<1>(vt, ldv, Dv, pb, 32 * nsteps, ot, 16);
}
#endif  // MLASERVE_HAVE_AMX

void attend_chunk_head(const Problem& P, int c, int h, Scratch& w) {
  const int D = P.D, Dv = P.Dv;
  const int64_t Lq = P.q_len[c], Lk = P.k_len[c], offset = Lk - Lq;
  const int64_t Lpad = (Lk + 31) / 32 * 32;
  if (Lq <= 0) return;
  // V^T, zero past the chunk's keys: per 32 keys x 16 dims, pairs of keys interleaved per dim give
  // a 16 x 16 matrix of (key 2p, key 2p + 1) dwords; transposed, each row is one dim's 32 keys.
  w.vt.resize(size_t(Dv) * Lpad);
  const uint16_t* vbase = P.v + P.k_start[c] * P.v_row + h * P.v_head;
  alignas(64) static const uint16_t lo_idx[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                  8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i key_pairs = _mm512_load_si512(lo_idx);
  for (int64_t j0 = 0; j0 < Lpad; j0 += 32) {
    for (int d0 = 0; d0 < Dv; d0 += 16) {
      __m512i r[16];
      for (int p = 0; p < 16; ++p) {
        const int64_t a = j0 + 2 * p, b = a + 1;
        const __m256i va = a < Lk ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(vbase + a * P.v_row + d0))
                                  : _mm256_setzero_si256();
        const __m256i vb = b < Lk ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(vbase + b * P.v_row + d0))
                                  : _mm256_setzero_si256();
        r[p] = _mm512_permutex2var_epi16(_mm512_castsi256_si512(va), key_pairs, _mm512_castsi256_si512(vb));
      }
      transpose16x16_epi32(r);
      for (int d = 0; d < 16; ++d) _mm512_storeu_si512(w.vt.data() + size_t(d0 + d) * Lpad + j0, r[d]);
    }
  }
  const float c2 = P.scale * 1.4426950408889634f;  // scores in base 2
  alignas(64) static const uint16_t pair_idx[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                    8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i interleave = _mm512_load_si512(pair_idx);
  const __m512 neg_inf = _mm512_set1_ps(-INFINITY);

  for (int64_t qb0 = 0; qb0 < Lq; qb0 += 16) {
    const int nq = int(std::min<int64_t>(16, Lq - qb0));
    // Q^T as the B operand: qt[r][q][i] = Q[q][2r + i] (missing queries zero), 16 x 16 dwords at a time.
    for (int g = 0; g < D / 32; ++g) {
      __m512i r[16];
      for (int q = 0; q < 16; ++q)
        r[q] = q < nq ? _mm512_loadu_si512(P.q.at(P.q_start[c] + qb0 + q, h, 32 * g, P.Dn)) : _mm512_setzero_si512();
      transpose16x16_epi32(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(w.qt.data() + size_t(g * 16 + i) * 32, r[i]);
    }
    alignas(64) int32_t pos_arr[16];
    for (int q = 0; q < 16; ++q) pos_arr[q] = int32_t(offset + qb0 + std::min(q, nq - 1));
    const __m512i pos = _mm512_load_si512(pos_arr);
    const int64_t key_end = offset + qb0 + nq;  // keys the block's last query sees
    const int64_t first_masked = offset + qb0 + 1;
    __m512 m = neg_inf, l = _mm512_setzero_ps();
    std::fill(w.acc.begin(), w.acc.end(), 0.f);

    for (int64_t sb0 = 0; sb0 < key_end; sb0 += kSuper) {
      const int n = int(std::min<int64_t>(kSuper, key_end - sb0));
      const int ntile = (n + 15) / 16, nsteps = (n + 31) / 32;
      for (int t = 0; t < ntile; ++t) {
        const int64_t key0 = sb0 + 16 * t;
        const bool padded = key0 + 16 > Lk;
        if (padded) {  // rows past the chunk may not be readable
          const int have = int(Lk - key0);
          for (int r = 0; r < 16; ++r)
            for (int d0 = 0; d0 < D; d0 += 32) {
              uint16_t* dst = w.kpad.data() + size_t(r) * D + d0;
              if (r < have)
                std::memcpy(dst, P.k.at(P.k_start[c] + key0 + r, h, d0, P.Dn), sizeof(uint16_t) * 32);
              else
                std::memset(dst, 0, sizeof(uint16_t) * 32);
            }
        }
        key_tile_scores(P, padded ? w.kpad.data() : nullptr, P.k_start[c] + key0, h, w.qt.data(),
                        w.s.data() + size_t(t) * 256);
      }
      // Scale, mask, block max.
      __m512 mx = neg_inf;
      for (int j = 0; j < ntile * 16; ++j) {
        __m512 row = _mm512_mul_ps(_mm512_loadu_ps(w.s.data() + size_t(j) * 16), _mm512_set1_ps(c2));
        const int64_t key = sb0 + j;
        if (key >= first_masked) {
          const __mmask16 hidden = _mm512_cmp_epi32_mask(pos, _mm512_set1_epi32(int32_t(key)), _MM_CMPINT_LT);
          row = _mm512_mask_mov_ps(row, hidden, neg_inf);
        }
        _mm512_storeu_ps(w.s.data() + size_t(j) * 16, row);
        mx = _mm512_max_ps(mx, row);
      }
      const __m512 m_new = _mm512_max_ps(m, mx);
      const __m512 alpha = exp2_ps(_mm512_sub_ps(m, m_new));
      __m512 lsum = _mm512_setzero_ps();
      for (int jj = 0; jj < nsteps * 16; ++jj) {  // pairs of keys
        __m512 p[2];
        for (int i = 0; i < 2; ++i) {
          const int j = 2 * jj + i;
          if (j < ntile * 16) {
            const __m512 row = _mm512_loadu_ps(w.s.data() + size_t(j) * 16);
            const __mmask16 seen = _mm512_cmp_ps_mask(row, neg_inf, _CMP_NEQ_OQ);
            p[i] = _mm512_maskz_mov_ps(seen, exp2_ps(_mm512_sub_ps(row, m_new)));
          } else {
            p[i] = _mm512_setzero_ps();
          }
          lsum = _mm512_add_ps(lsum, p[i]);
        }
        const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(p[1], p[0]);  // low half: key 2jj
        _mm512_storeu_si512(w.pb.data() + size_t(jj) * 32, _mm512_permutexvar_epi16(interleave, both));
      }
      l = _mm512_fmadd_ps(l, alpha, lsum);
      values_times_probs(w.vt.data() + sb0, Lpad, Dv, w.pb.data(), nsteps, w.ot.data());
      for (int d = 0; d < Dv; ++d) {
        float* acc = w.acc.data() + size_t(d) * 16;
        _mm512_storeu_ps(acc, _mm512_fmadd_ps(_mm512_loadu_ps(acc), alpha, _mm512_loadu_ps(w.ot.data() + size_t(d) * 16)));
      }
      m = m_new;
    }
    const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.f), l);
    for (int d0 = 0; d0 < Dv; d0 += 16) {  // [16 dims][16 queries] -> per query 16 dims
      __m512i r[16];
      for (int d = 0; d < 16; ++d)
        r[d] = _mm512_castps_si512(_mm512_mul_ps(_mm512_loadu_ps(w.acc.data() + size_t(d0 + d) * 16), inv));
      transpose16x16_epi32(r);
      for (int q = 0; q < nq; ++q) {
        uint16_t* dst = P.out + (P.q_start[c] + qb0 + q) * P.o_row + h * P.o_head + d0;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), (__m256i)_mm512_cvtneps_pbh(_mm512_castsi512_ps(r[q])));
      }
    }
  }
}

void run(const Problem& P, int chunks, int num_threads) {
  const int64_t items = int64_t(chunks) * P.heads;
#pragma omp parallel num_threads(int(std::min<int64_t>(num_threads, items)))
  {
#ifdef MLASERVE_HAVE_AMX
    const int shape[1][2] = {{16, 64}};
    load_tile_config(shape, 1);  // every tile 16 x 64 bytes
#endif
    Scratch w;
    w.qt.resize(size_t(P.D) * 16);
    w.kpad.resize(size_t(16) * P.D);
    w.s.resize(size_t(kSuper) * 16);
    w.pb.resize(size_t(kSuper) * 16);
    w.ot.resize(size_t(P.Dv) * 16);
    w.acc.resize(size_t(P.Dv) * 16);
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) attend_chunk_head(P, int(it / P.heads), int(it % P.heads), w);
#ifdef MLASERVE_HAVE_AMX
    _tile_release();
#endif
  }
}

#endif  // MLASERVE_HAVE_AVX512_BF16

}  // namespace

extern "C" {

// q_nope: [*, heads, Dn], q_pe: [*, heads, D - Dn], k_nope: [*, heads, Dn], k_pe: [*, heads, D - Dn]
// (a head stride of 0 shares one row among the heads), v: [*, heads, Dv], out: [*, heads, Dv], bf16,
// each with its own row and head strides (elements; last dim contiguous). Chunk c: queries
// q_start[c] .. + q_len[c], keys and values k_start[c] .. + k_len[c] (k_len >= q_len).
// Dn % 32 == 0, D % 32 == 0, Dv % 64 == 0. Returns 0, or -1 when this build cannot or the shapes do
// not fit.
int prefill_attention(const uint16_t* q_nope, int64_t qn_row, int64_t qn_head, const uint16_t* q_pe, int64_t qp_row,
                      int64_t qp_head, const uint16_t* k_nope, int64_t kn_row, int64_t kn_head, const uint16_t* k_pe,
                      int64_t kp_row, int64_t kp_head, const uint16_t* v, int64_t v_row, int64_t v_head, uint16_t* out,
                      int64_t o_row, int64_t o_head, const int64_t* q_start, const int64_t* q_len,
                      const int64_t* k_start, const int64_t* k_len, int chunks, int heads, int Dn, int D, int Dv,
                      float scale, int num_threads) {
#ifdef MLASERVE_HAVE_AVX512_BF16
#ifdef MLASERVE_HAVE_AMX
  if (!amx_permitted()) return -1;
#endif
  if (D % 32 || Dn % 32 || Dn > D || D > 1024 || Dv % 64 || heads <= 0) return -1;
  for (int c = 0; c < chunks; ++c)
    if (q_len[c] < 0 || k_len[c] < q_len[c] || k_len[c] > (int64_t(1) << 30)) return -1;
  if (chunks == 0) return 0;
  const Problem P{{q_nope, q_pe, qn_row, qn_head, qp_row, qp_head},
                  {k_nope, k_pe, kn_row, kn_head, kp_row, kp_head},
                  v, v_row, v_head, out, o_row, o_head, q_start, q_len, k_start, k_len, heads, D, Dn, Dv, scale};
  run(P, chunks, num_threads);
  return 0;
#else
  (void)q_nope, (void)qn_row, (void)qn_head, (void)q_pe, (void)qp_row, (void)qp_head, (void)k_nope, (void)kn_row,
      (void)kn_head, (void)k_pe, (void)kp_row, (void)kp_head, (void)v, (void)v_row, (void)v_head, (void)out,
      (void)o_row, (void)o_head, (void)q_start, (void)q_len, (void)k_start, (void)k_len, (void)chunks, (void)heads,
      (void)Dn, (void)D, (void)Dv, (void)scale, (void)num_threads;
  return -1;
#endif
}

}  // extern "C"
