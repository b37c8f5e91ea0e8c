// Paged MLA decode attention on the CPU: the contract of kernels/mla_decode.py's
// `paged_mla_decode`, reading the latent cache blocks where they lie.
//
// Each query row r (a decode token, or one of a sequence's speculative tokens) attends with all its
// heads over the first kv_lens[r] entries of sequence seq_of_row[r], found through its block table.
// An entry is [latent (rank) | rope key (rope)], shared by every head:
//     score = (q_latent . c + q_pe . k_pe) * scale,   out = softmax(score) . c      ([rows, heads, rank])
// Work items are (row, split): a split is a run of whole blocks of one row's context, so a single
// long sequence still keeps every thread busy; splits are merged through their log-sum-exp.
//
// Why not torch ops: they need each sequence's blocks gathered into one contiguous tensor first,
// which writes and re-reads every cache entry once more per layer; here each entry is read once,
// while it is in cache for both of its products.
//
// Three implementations with one contract, chosen per call (kernels/cpu/decode.py: choose_impl):
//   AMX:         bf16, the scores and values as tile products; heads % 8 == 0, block size % 16 == 0;
//   AVX-512 BF16: bf16, the BF16 dot-product instruction for the scores and fp32 FMAs for the
//                values; heads % 4 == 0, rank % 64 == 0, rope % 32 == 0;
//   generic:     float32 or bf16, any shape, plain loops the compiler vectorizes.
// Each keeps the softmax and the accumulation in float32 (every DeepSeek-V3 shape takes all three).
//
// Also here: latent_fp8_gather_bf16, FP8 cache rows dequantized to bf16 for the prefill path,
// with the decode path's dequantizing code.
//
// The cache may also be in the FP8 layout of kernels/latent_fp8.py (raw bytes per token: rank
// e4m3 values, rank / 128 float32 power-of-two scales, rope bf16 values). Each implementation then
// dequantizes what it is about to read (a block, or the AMX path's 32-token chunk) into a bf16 (or
// float32) scratch of the plain layout, exactly, and runs unchanged on it: the cache is read once,
// at 57% of the bf16 bytes.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include <omp.h>

#include "cpu_common.h"

namespace {

using namespace mlaserve;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline float load_f(const float* p, int64_t i) { return p[i]; }
inline float load_f(const uint16_t* p, int64_t i) { return bf16_to_float(p[i]); }
inline void store_f(float* p, int64_t i, float v) { p[i] = v; }
inline void store_f(uint16_t* p, int64_t i, float v) { p[i] = float_to_bf16(v); }

struct Problem {
  // Queries and output are [rows, heads, width] with the last dim contiguous and any row and head
  // strides (elements), so the absorbed products' [heads, rows, width] layout needs no copy.
  const void* q_latent;  // [rows, heads, rank]
  int64_t ql_row, ql_head;
  const void* q_pe;  // [rows, heads, rope]
  int64_t qp_row, qp_head;
  const void* cache;     // [num_blocks, page, rank + rope]
  const int64_t* tables;  // [seqs, table_stride]
  int64_t table_stride;
  const int32_t* seq_of_row;  // [rows]
  const int32_t* kv_lens;     // [rows]
  void* out;                  // [rows, heads, rank], the queries' dtype
  int64_t out_row, out_head;
  float* partial;             // [rows, splits, heads, rank + 2] when splits > 1
  int rows, heads, rank, rope, page, splits;
  float scale;
  bool fp8;  // the cache is in the FP8 layout
  int64_t row_bytes() const { return fp8 ? rank + rank / 32 + 2 * int64_t(rope) : 0; }
};

// ---- The FP8 layout -------------------------------------------------------------------------------

inline float e4m3_to_float(uint8_t b) {
  const int e = (b >> 3) & 15, m = b & 7;
  const float v = e ? std::ldexp(1.f + m / 8.f, e - 7) : std::ldexp(m / 8.f, -6);
  return b & 0x80 ? -v : v;
}

inline float scale_of(const uint8_t* entry, int rank, int group) {
  float s;
  std::memcpy(&s, entry + rank + 4 * group, 4);
  return s;
}

// n FP8 entries (rows of P.row_bytes()) -> n plain rows [latent | rope] of width rank + rope.
template <typename T>
void dequantize_rows_generic(const Problem& P, const uint8_t* src, int n, T* dst) {
  const int R = P.rank, E = P.rank + P.rope;
  for (int t = 0; t < n; ++t) {
    const uint8_t* e = src + t * P.row_bytes();
    T* d = dst + int64_t(t) * E;
    for (int g = 0; g < R / 128; ++g) {
      const float s = scale_of(e, R, g);
      for (int i = g * 128; i < g * 128 + 128; ++i) store_f(d, i, e4m3_to_float(e[i]) * s);
    }
    const uint8_t* rope = e + R + R / 32;
    for (int i = 0; i < P.rope; ++i) {
      uint16_t b;
      std::memcpy(&b, rope + 2 * i, 2);
      store_f(d, R + i, bf16_to_float(b));
    }
  }
}

// One split's state: unnormalized output, running max (log2 domain) and sum per head.
struct SplitState {
  std::vector<float> acc, m, l, s;
  void reset(const Problem& P) {
    acc.assign(size_t(P.heads) * P.rank, 0.f);
    m.assign(P.heads, kNegInf);
    l.assign(P.heads, 0.f);
    s.resize(size_t(P.heads) * P.page);
  }
};

// The token range [t0, t1) of row r's split, whole blocks except at the end of the context.
inline void split_range(const Problem& P, int r, int split, int64_t* t0, int64_t* t1) {
  int64_t len = P.kv_lens[r];
  int64_t blocks = (len + P.page - 1) / P.page;
  int64_t per = (blocks + P.splits - 1) / P.splits;
  *t0 = std::min<int64_t>(len, int64_t(split) * per * P.page);
  *t1 = std::min<int64_t>(len, *t0 + per * P.page);
}

// Folds one block's scores (already in the log2 domain, s[h * page + t]) into the running max and
// sum, leaving the probabilities in s and returning each head's rescale factor in alpha.
inline void online_softmax(const Problem& P, SplitState& st, int n, float* alpha) {
  for (int h = 0; h < P.heads; ++h) {
    float* s = st.s.data() + size_t(h) * P.page;
    float mx = st.m[h];
    for (int t = 0; t < n; ++t) mx = std::max(mx, s[t]);
    float sum = 0.f;
    for (int t = 0; t < n; ++t) {
      s[t] = std::exp2(s[t] - mx);
      sum += s[t];
    }
    alpha[h] = st.m[h] == kNegInf ? 0.f : std::exp2(st.m[h] - mx);
    st.l[h] = st.l[h] * alpha[h] + sum;
    st.m[h] = mx;
  }
}

template <typename T>
void attend_generic(const Problem& P, int r, int64_t t0, int64_t t1, SplitState& st, std::vector<float>& qf,
                    std::vector<float>& alpha, std::vector<T>& plain) {
  const int H = P.heads, R = P.rank, E = P.rank + P.rope;
  const T* ql = static_cast<const T*>(P.q_latent) + r * P.ql_row;
  const T* qp = static_cast<const T*>(P.q_pe) + r * P.qp_row;
  for (int h = 0; h < H; ++h) {
    for (int d = 0; d < R; ++d) qf[size_t(h) * E + d] = load_f(ql, h * P.ql_head + d);
    for (int d = 0; d < P.rope; ++d) qf[size_t(h) * E + R + d] = load_f(qp, h * P.qp_head + d);
  }
  const T* cache = static_cast<const T*>(P.cache);
  const int64_t* table = P.tables + int64_t(P.seq_of_row[r]) * P.table_stride;
  const float qk_scale = P.scale * kLog2e;
  for (int64_t b0 = t0; b0 < t1; b0 += P.page) {
    const int n = int(std::min<int64_t>(P.page, t1 - b0));
    const T* kb = plain.data();
    if (P.fp8)
      dequantize_rows_generic(P, static_cast<const uint8_t*>(P.cache) + table[b0 / P.page] * P.page * P.row_bytes(),
                              n, plain.data());
    else
      kb = cache + table[b0 / P.page] * P.page * E;
    for (int h = 0; h < H; ++h) {
      const float* q = qf.data() + size_t(h) * E;
      for (int t = 0; t < n; ++t) {
        const T* k = kb + int64_t(t) * E;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int d = 0; d < E; ++d) dot += q[d] * load_f(k, d);
        st.s[size_t(h) * P.page + t] = dot * qk_scale;
      }
    }
    online_softmax(P, st, n, alpha.data());
    for (int h = 0; h < H; ++h) {
      float* acc = st.acc.data() + size_t(h) * R;
      const float a = alpha[h];
#pragma omp simd
      for (int d = 0; d < R; ++d) acc[d] *= a;
      for (int t = 0; t < n; ++t) {
        const float p = st.s[size_t(h) * P.page + t];
        const T* v = kb + int64_t(t) * E;
#pragma omp simd
        for (int d = 0; d < R; ++d) acc[d] += p * load_f(v, d);
      }
    }
  }
}

#ifdef MLASERVE_HAVE_AVX512_BF16

// n FP8 entries -> n bf16 rows, 32 values per step, in 16-bit integer lanes: an e4m3 byte's
// exponent and mantissa bits moved 4 places up sit where bf16 keeps them, and adding the scale's
// exponent (less e4m3's bias) gives value * scale exactly, the sign riding along from the
// sign-extended byte. Zeros stay zeros; e4m3 subnormals (which the quantizer makes only for
// values under 1/14000 of their group's largest) take a scalar detour.
void dequantize_rows_avx512(const Problem& P, const uint8_t* src, int n, uint16_t* dst) {
  const int R = P.rank, E = P.rank + P.rope;
  const __m512i magnitude = _mm512_set1_epi16(int16_t(0x87F0)), exponent = _mm512_set1_epi16(0x78);
  for (int t = 0; t < n; ++t) {
    const uint8_t* e = src + t * P.row_bytes();
    uint16_t* d = dst + int64_t(t) * E;
    for (int g = 0; g < R / 128; ++g) {
      uint32_t scale_bits;
      std::memcpy(&scale_bits, e + R + 4 * g, 4);
      const __m512i add = _mm512_set1_epi16(int16_t((int((scale_bits >> 23) & 255) - 7) << 7));
      for (int i = g * 128; i < g * 128 + 128; i += 32) {
        const __m512i b = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(e + i)));
        const __mmask32 normal = _mm512_test_epi16_mask(b, exponent);
        _mm512_storeu_si512(d + i, _mm512_maskz_add_epi16(normal, _mm512_and_si512(_mm512_slli_epi16(b, 4), magnitude), add));
        if (_mm512_mask_test_epi16_mask(~normal, b, _mm512_set1_epi16(7))) {
          const float s = scale_of(e, R, g);
          for (int j = i; j < i + 32; ++j)
            if (!(e[j] & 0x78)) d[j] = float_to_bf16(e4m3_to_float(e[j]) * s);
        }
      }
    }
    std::memcpy(d + R, e + R + R / 32, 2 * size_t(P.rope));
  }
}

// online_softmax with 16 scores at a time.
inline void online_softmax_avx512(const Problem& P, SplitState& st, int n, float* alpha) {
  for (int h = 0; h < P.heads; ++h) {
    float* s = st.s.data() + size_t(h) * P.page;
    __m512 vmax = _mm512_set1_ps(st.m[h]);
    for (int t = 0; t < n; t += 16) {
      const __mmask16 k = n - t >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - t)) - 1);
      vmax = _mm512_max_ps(vmax, _mm512_mask_loadu_ps(vmax, k, s + t));
    }
    const float mx = _mm512_reduce_max_ps(vmax);
    const __m512 vmx = _mm512_set1_ps(mx);
    __m512 vsum = _mm512_setzero_ps();
    for (int t = 0; t < n; t += 16) {
      const __mmask16 k = n - t >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - t)) - 1);
      const __m512 p = exp2_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + t), vmx));
      _mm512_mask_storeu_ps(s + t, k, p);
      vsum = _mm512_add_ps(vsum, _mm512_maskz_mov_ps(k, p));
    }
    alpha[h] = st.m[h] == kNegInf ? 0.f : std::exp2(st.m[h] - mx);
    st.l[h] = st.l[h] * alpha[h] + _mm512_reduce_add_ps(vsum);
    st.m[h] = mx;
  }
}

// Cache rows fetched ahead of the score loop, two rows per step of it (2 measured best of 2-16:
// 7.2-8.0 ms against 11.2 ms without, 256 sequences x 200 tokens, bf16, two cores).
constexpr int kPrefetchRows = 2;

// Scores of two tokens (k0, k1) for four heads: bf16 pair products summed in float32.
inline void scores_4h_2t(const uint16_t* q, int E, const uint16_t* k0, const uint16_t* k1, float out[4][2]) {
  __m512 acc[4][2];
  for (int i = 0; i < 4; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int c = 0; c < E; c += 32) {
    const __m512bh a = (__m512bh)_mm512_loadu_si512(k0 + c);
    const __m512bh b = (__m512bh)_mm512_loadu_si512(k1 + c);
    for (int i = 0; i < 4; ++i) {
      const __m512bh qv = (__m512bh)_mm512_loadu_si512(q + size_t(i) * E + c);
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], qv, a);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], qv, b);
    }
  }
  for (int i = 0; i < 4; ++i) {
    out[i][0] = _mm512_reduce_add_ps(acc[i][0]);
    out[i][1] = _mm512_reduce_add_ps(acc[i][1]);
  }
}

void attend_bf16_avx512(const Problem& P, int r, int64_t t0, int64_t t1, SplitState& st, std::vector<uint16_t>& qb,
                        std::vector<float>& alpha, std::vector<uint16_t>& plain) {
  const int H = P.heads, R = P.rank, E = P.rank + P.rope;
  const uint16_t* ql = static_cast<const uint16_t*>(P.q_latent) + r * P.ql_row;
  const uint16_t* qp = static_cast<const uint16_t*>(P.q_pe) + r * P.qp_row;
  for (int h = 0; h < H; ++h) {  // each head's query as one contiguous 576-wide row
    std::memcpy(qb.data() + size_t(h) * E, ql + h * P.ql_head, sizeof(uint16_t) * R);
    std::memcpy(qb.data() + size_t(h) * E + R, qp + h * P.qp_head, sizeof(uint16_t) * P.rope);
  }
  const uint16_t* cache = static_cast<const uint16_t*>(P.cache);
  const int64_t* table = P.tables + int64_t(P.seq_of_row[r]) * P.table_stride;
  const float qk_scale = P.scale * kLog2e;
  for (int64_t b0 = t0; b0 < t1; b0 += P.page) {
    const int n = int(std::min<int64_t>(P.page, t1 - b0));
    const uint16_t* kb = plain.data();
    // The next block lies elsewhere in memory: its first rows are fetched while this one's last are used.
    const uint16_t* next = nullptr;
    if (P.fp8) {  // the block dequantized in one pass, which streams through it: no prefetches
      dequantize_rows_avx512(P, static_cast<const uint8_t*>(P.cache) + table[b0 / P.page] * P.page * P.row_bytes(),
                             n, plain.data());
    } else {
      kb = cache + table[b0 / P.page] * P.page * E;
      if (b0 + P.page < t1) next = cache + table[b0 / P.page + 1] * P.page * E;
    }
    for (int t = 0; t < n; t += 2) {
      const int ahead = t + kPrefetchRows;
      const uint16_t* pf = P.fp8 ? nullptr : ahead < n ? kb + int64_t(ahead) * E : next ? next + int64_t(ahead - n) * E : nullptr;
      if (pf != nullptr)
        for (int c = 0; c < 2 * E; c += 32) _mm_prefetch(reinterpret_cast<const char*>(pf + c), _MM_HINT_T0);
      const uint16_t* k0 = kb + int64_t(t) * E;
      const uint16_t* k1 = kb + int64_t(std::min(t + 1, n - 1)) * E;  // an odd last token pairs with itself
      for (int h0 = 0; h0 < H; h0 += 4) {
        float sc[4][2];
        scores_4h_2t(qb.data() + size_t(h0) * E, E, k0, k1, sc);
        for (int i = 0; i < 4; ++i) {
          float* s = st.s.data() + size_t(h0 + i) * P.page;
          s[t] = sc[i][0] * qk_scale;
          if (t + 1 < n) s[t + 1] = sc[i][1] * qk_scale;
        }
      }
    }
    online_softmax_avx512(P, st, n, alpha.data());
    // out[h] = alpha[h] * out[h] + sum_t p[h][t] * c_t, four heads x 64 latent columns at a time,
    // so each converted value vector serves four heads from registers.
    for (int h0 = 0; h0 < H; h0 += 4) {
      for (int d0 = 0; d0 < R; d0 += 64) {
        __m512 acc[4][4];
        for (int i = 0; i < 4; ++i) {
          const __m512 a = _mm512_set1_ps(alpha[h0 + i]);
          float* row = st.acc.data() + size_t(h0 + i) * R + d0;
          for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_mul_ps(a, _mm512_loadu_ps(row + 16 * j));
        }
        for (int t = 0; t < n; ++t) {
          const uint16_t* v = kb + int64_t(t) * E + d0;
          __m512 vv[4];
          for (int j = 0; j < 4; ++j) vv[j] = bf16x16_to_ps(v + 16 * j);
          for (int i = 0; i < 4; ++i) {
            const __m512 p = _mm512_set1_ps(st.s[size_t(h0 + i) * P.page + t]);
            for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_fmadd_ps(p, vv[j], acc[i][j]);
          }
        }
        for (int i = 0; i < 4; ++i) {
          float* row = st.acc.data() + size_t(h0 + i) * R + d0;
          for (int j = 0; j < 4; ++j) _mm512_storeu_ps(row + 16 * j, acc[i][j]);
        }
      }
    }
  }
}

#endif  // MLASERVE_HAVE_AVX512_BF16

#ifdef MLASERVE_HAVE_AMX

// Heads go through in groups of G (16, or 8 for models with fewer heads). Tiles:
//   0, 1  scores of 16 tokens x G heads (fp32)       2, 7  16 cache rows x 32 values (bf16), or
//   3     32 query values x G heads, in pairs             32 tokens' values x 16 columns, in pairs
//   4, 5  output, G heads x 16 latent columns (fp32) 6     probabilities, G heads x 32 tokens
// The scores come out transposed (tokens x heads) because that puts the cache rows, read in
// place, in the A operand; the values need pairs of tokens interleaved (the B operand's layout),
// which is done once per 32 tokens for all head groups. Two output tiles are in flight at a time:
// each tile's load, product and store form a dependent chain.
void configure_tiles(int G) {
  const int shape[8][2] = {{16, G * 4}, {16, G * 4}, {16, 64}, {16, G * 4}, {G, 64}, {G, 64}, {G, 64}, {16, 64}};
  load_tile_config(shape, 8);
}

constexpr int kAmxChunk = 32;  // tokens per step

struct AmxScratch {
  std::vector<uint16_t> qv;  // per group: [E / 32][16 pairs][G][2], the queries as B operands
  std::vector<float> s;      // [32 tokens][G]: scores, then probabilities
  std::vector<uint16_t> pa;  // [G][32]: probabilities as the A operand (bf16)
  std::vector<uint16_t> vn;  // [16 pairs][rank][2], or one [16][32][2] strip: the values as B operands
  // FP8 cache: the chunk's rows dequantized, [32][rank + rope], on a cache-line boundary (split
  // stores cost the dequantization ~10%).
  std::vector<uint16_t> plain_buf;
  uint16_t* plain = nullptr;
  void reset(const Problem& P, int G) {
    if (P.fp8) {  // zeros: rows past a short chunk stay finite
      plain_buf.assign(size_t(kAmxChunk) * (P.rank + P.rope) + 32, 0);
      plain = plain_buf.data() + (64 - reinterpret_cast<uintptr_t>(plain_buf.data()) % 64) % 64 / 2;
    }
    qv.resize(size_t(P.heads) * (P.rank + P.rope));
    s.resize(size_t(kAmxChunk) * G);
    pa.resize(size_t(G) * kAmxChunk);
    vn.resize(size_t(kAmxChunk) * P.rank);
  }
};

inline int amx_group(int heads) { return heads % 16 == 0 ? 16 : heads % 8 == 0 ? 8 : 0; }

// Pairs of cache rows (2j, 2j + 1) interleaved, latent columns [d0, d1) (multiples of 32): pair j
// at vs + j * pair_stride, column d's two values at 2 (d - d0) in it; the B operands of the value
// tiles. Rows at or past nv are zeros, so that values past the context (never written, possibly
// NaN) cannot reach the output through 0 * NaN.
inline void pair_values(const uint16_t* rows, int nv, int E, int d0, int d1, uint16_t* vs, int pair_stride) {
  alignas(64) static const uint16_t lo_idx[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                  8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i lo = _mm512_load_si512(lo_idx);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  for (int j = 0; j < kAmxChunk / 2; ++j) {
    const uint16_t* a = rows + int64_t(2 * j) * E;
    const bool has_a = 2 * j < nv, has_b = 2 * j + 1 < nv;
    uint16_t* dst = vs + size_t(j) * pair_stride;
    for (int d = d0; d < d1; d += 32, dst += 64) {
      const __m512i va = has_a ? _mm512_loadu_si512(a + d) : _mm512_setzero_si512();
      const __m512i vb = has_b ? _mm512_loadu_si512(a + E + d) : _mm512_setzero_si512();
      _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(va, lo, vb));
      _mm512_storeu_si512(dst + 32, _mm512_permutex2var_epi16(va, hi, vb));
    }
  }
}

void attend_bf16_amx(const Problem& P, int r, int64_t t0, int64_t t1, SplitState& st, AmxScratch& w) {
  const int H = P.heads, R = P.rank, E = P.rank + P.rope, G = amx_group(H);
  const __mmask16 kG = __mmask16((1u << G) - 1);
  const uint16_t* ql = static_cast<const uint16_t*>(P.q_latent) + r * P.ql_row;
  const uint16_t* qp = static_cast<const uint16_t*>(P.q_pe) + r * P.qp_row;
  // qv[g][c][j][h][i] = q[g * G + h][32 c + 2 j + i]: each head's pairs of values, G pairs apart.
  for (int h = 0; h < H; ++h) {
    uint32_t* dst = reinterpret_cast<uint32_t*>(w.qv.data() + size_t(h / G) * G * E) + h % G;
    const uint16_t* a = ql + h * P.ql_head;
    const uint16_t* b = qp + h * P.qp_head;
    for (int k = 0; k < R / 2; ++k) std::memcpy(dst + size_t(k) * G, a + 2 * k, 4);
    for (int k = 0; k < P.rope / 2; ++k) std::memcpy(dst + size_t(R / 2 + k) * G, b + 2 * k, 4);
  }
  const __m512i pair_idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                            22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const uint16_t* cache = static_cast<const uint16_t*>(P.cache);
  const uint8_t* raw = static_cast<const uint8_t*>(P.cache);
  const int64_t row_bytes = P.fp8 ? P.row_bytes() : 2 * int64_t(E);
  const int64_t* table = P.tables + int64_t(P.seq_of_row[r]) * P.table_stride;
  const __m512 qk_scale = _mm512_set1_ps(P.scale * kLog2e);
  for (int64_t b0 = t0; b0 < t1; b0 += P.page) {
    const int n = int(std::min<int64_t>(P.page, t1 - b0));
    for (int c0 = 0; c0 < n; c0 += kAmxChunk) {
      const int nv = std::min(kAmxChunk, n - c0);
      const bool second = c0 + 16 < P.page;  // the second 16-row tile stays inside the block
      const uint16_t* rows = w.plain;
      if (P.fp8)
        dequantize_rows_avx512(P, raw + (table[b0 / P.page] * P.page + c0) * row_bytes, nv, w.plain);
      else
        rows = cache + (table[b0 / P.page] * P.page + c0) * E;
      // The next chunk's rows are fetched into L2 while this one is computed, a few lines at each
      // tile step. Issued all at once, the prefetches filled the core's outstanding-miss slots and
      // the core waited on them as on demand loads: as slow as no prefetch at all, and 8-10% slower
      // per layer than spread out (256 sequences x ~210 tokens, cold cache; hot: no change).
      const int64_t ahead = c0 + kAmxChunk < n ? b0 + c0 + kAmxChunk : b0 + P.page;  // the next chunk
      const char* pf = nullptr;
      int pf_left = 0;
      if (ahead < t1) {
        pf = reinterpret_cast<const char*>(raw + (table[ahead / P.page] * P.page + ahead % P.page) * row_bytes);
        pf_left = int(std::min<int64_t>({kAmxChunk, P.page - ahead % P.page, t1 - ahead}) * row_bytes / 64);
      }
      const int pf_steps = (H / G) * (E / 32 + R / 32);
      const int pf_per_step = (pf_left + pf_steps - 1) / pf_steps;
      auto prefetch_step = [&]() {
        for (int i = 0; i < pf_per_step && pf_left > 0; ++i, --pf_left, pf += 64) _mm_prefetch(pf, _MM_HINT_T1);
      };
      // With one head group the values are paired strip by strip, just before each strip's
      // products: pairing the whole chunk first (32 KB at rank 512) pushed the accumulators and the
      // incoming cache rows out of L1 (one layer, 256 sequences x ~210 tokens, 8 heads: 6.55-7.11
      // -> 5.56-5.95 ms from memory, 4.11 -> 3.11 ms from L2; 16 heads 8.08 -> 7.18 ms). With
      // several groups the pairs are made once for all of them (strips taken by every group in
      // turn ran 25% slower at 128 heads: the groups' accumulators are then walked across).
      const bool by_strip = H == G;
      if (!by_strip) pair_values(rows, nv, E, 0, R, w.vn.data(), 2 * R);
      for (int g = 0; g < H / G; ++g) {
        const uint16_t* qv = w.qv.data() + size_t(g) * G * E;
        _tile_zero(0);
        _tile_zero(1);
        for (int c = 0; c < E / 32; ++c) {
          prefetch_step();
          _tile_loadd(3, qv + size_t(c) * 32 * G, G * 4);
          _tile_loadd(2, rows + c * 32, E * 2);
          _tile_dpbf16ps(0, 2, 3);
          if (second) {
            _tile_loadd(2, rows + 16 * E + c * 32, E * 2);
            _tile_dpbf16ps(1, 2, 3);
          }
        }
        float* s = w.s.data();
        _tile_stored(0, s, G * 4);
        if (second) _tile_stored(1, s + 16 * G, G * 4);
        // Online softmax, all G heads in one vector; rows past nv never enter it.
        float* m = st.m.data() + g * G;
        float* l = st.l.data() + g * G;
        const __m512 m_old = _mm512_maskz_loadu_ps(kG, m);
        __m512 m_new = m_old;
        for (int t = 0; t < nv; ++t) {
          const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(kG, s + t * G), qk_scale);
          _mm512_mask_storeu_ps(s + t * G, kG, x);
          m_new = _mm512_max_ps(m_new, x);
        }
        const __m512 alpha = exp2_ps(_mm512_sub_ps(m_old, m_new));
        // Probabilities of token pairs (2j, 2j + 1) as bf16, head h's pair in 32-bit lane h; the
        // 16 x 16 transpose then gives each head its 32 tokens in order: the A operand's rows.
        __m512 sum = _mm512_setzero_ps();
        __m512i pairs[16];
        for (int j = 0; j < kAmxChunk / 2; ++j) {
          __m512 p0 = _mm512_setzero_ps(), p1 = _mm512_setzero_ps();
          if (2 * j < nv) p0 = exp2_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(kG, s + 2 * j * G), m_new));
          if (2 * j + 1 < nv) p1 = exp2_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(kG, s + (2 * j + 1) * G), m_new));
          sum = _mm512_add_ps(sum, _mm512_add_ps(p0, p1));
          pairs[j] = _mm512_permutexvar_epi16(pair_idx, (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
        }
        transpose16x16_epi32(pairs);
        for (int h = 0; h < G; ++h) _mm512_storeu_si512(w.pa.data() + size_t(h) * kAmxChunk, pairs[h]);
        _mm512_mask_storeu_ps(l, kG, _mm512_fmadd_ps(_mm512_maskz_loadu_ps(kG, l), alpha, sum));
        _mm512_mask_storeu_ps(m, kG, m_new);
        // Rescale only the heads whose running max moved (after the first blocks, few do).
        float* acc = st.acc.data() + size_t(g) * G * R;
        unsigned moved = _mm512_mask_cmp_ps_mask(kG, m_new, m_old, _CMP_NEQ_UQ);
        if (moved) {
          alignas(64) float a[16];
          _mm512_store_ps(a, alpha);
          for (; moved; moved &= moved - 1) {
            const int h = __builtin_ctz(moved);
            const __m512 ah = _mm512_set1_ps(a[h]);
            float* row = acc + size_t(h) * R;
            for (int d = 0; d < R; d += 16) _mm512_storeu_ps(row + d, _mm512_mul_ps(ah, _mm512_loadu_ps(row + d)));
          }
        }
        _tile_loadd(6, w.pa.data(), kAmxChunk * 2);
        for (int d0 = 0; d0 < R; d0 += 32) {
          prefetch_step();
          if (by_strip) {
            pair_values(rows, nv, E, d0, d0 + 32, w.vn.data(), 64);
            _tile_loadd(2, w.vn.data(), 128);
            _tile_loadd(7, w.vn.data() + 32, 128);
          } else {
            _tile_loadd(2, w.vn.data() + 2 * d0, R * 4);
            _tile_loadd(7, w.vn.data() + 2 * d0 + 32, R * 4);
          }
          _tile_loadd(4, acc + d0, R * 4);
          _tile_loadd(5, acc + d0 + 16, R * 4);
          _tile_dpbf16ps(4, 6, 2);
          _tile_dpbf16ps(5, 6, 7);
          _tile_stored(4, acc + d0, R * 4);
          _tile_stored(5, acc + d0 + 16, R * 4);
        }
      }
    }
  }
}

#endif  // AMX

template <typename T>
void finish_row(const Problem& P, int r, const SplitState& st) {
  T* out = static_cast<T*>(P.out) + r * P.out_row;
  for (int h = 0; h < P.heads; ++h) {
    const float inv = st.l[h] > 0.f ? 1.f / st.l[h] : 0.f;
    const float* acc = st.acc.data() + size_t(h) * P.rank;
    for (int d = 0; d < P.rank; ++d) store_f(out, h * P.out_head + d, acc[d] * inv);
  }
}

void save_split(const Problem& P, int r, int split, const SplitState& st) {
  const int W = P.rank + 2;
  float* dst = P.partial + (int64_t(r) * P.splits + split) * P.heads * W;
  for (int h = 0; h < P.heads; ++h) {
    std::memcpy(dst + int64_t(h) * W, st.acc.data() + size_t(h) * P.rank, sizeof(float) * P.rank);
    dst[int64_t(h) * W + P.rank] = st.m[h];
    dst[int64_t(h) * W + P.rank + 1] = st.l[h];
  }
}

template <typename T>
void merge_splits(const Problem& P, int r, int h) {
  const int W = P.rank + 2;
  const float* base = P.partial + int64_t(r) * P.splits * P.heads * W + int64_t(h) * W;
  const int64_t stride = int64_t(P.heads) * W;
  float mx = kNegInf;
  for (int s = 0; s < P.splits; ++s) mx = std::max(mx, base[s * stride + P.rank]);
  std::vector<float> acc(P.rank, 0.f);
  float l = 0.f;
  for (int s = 0; s < P.splits; ++s) {
    const float* part = base + s * stride;
    if (part[P.rank + 1] == 0.f) continue;  // an empty split (past the end of a short context)
    const float w = std::exp2(part[P.rank] - mx);
    l += w * part[P.rank + 1];
    for (int d = 0; d < P.rank; ++d) acc[d] += w * part[d];
  }
  T* out = static_cast<T*>(P.out) + r * P.out_row + h * P.out_head;
  const float inv = l > 0.f ? 1.f / l : 0.f;
  for (int d = 0; d < P.rank; ++d) store_f(out, d, acc[d] * inv);
}

enum Impl { kGeneric = 0, kAvx512 = 1, kAmx = 2 };

template <typename T, Impl kImpl>
void run(const Problem& P, int num_threads) {
  const int64_t work = int64_t(P.rows) * P.splits;
#pragma omp parallel num_threads(num_threads)
  {
    SplitState st;
    std::vector<float> qf;
    std::vector<uint16_t> qb;
    std::vector<float> alpha(P.heads);
    std::vector<T> plain;  // FP8 cache: a block dequantized (AMX keeps its own, per chunk)
    if (kImpl == kAvx512)
      qb.resize(size_t(P.heads) * (P.rank + P.rope));
    else if (kImpl == kGeneric)
      qf.resize(size_t(P.heads) * (P.rank + P.rope));
    if (P.fp8 && kImpl != kAmx) plain.resize(size_t(P.page) * (P.rank + P.rope));
#ifdef MLASERVE_HAVE_AMX
    AmxScratch amx;
    if constexpr (kImpl == kAmx) {
      amx.reset(P, amx_group(P.heads));
      configure_tiles(amx_group(P.heads));  // per thread: tile state is each thread's own
    }
#endif
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < work; ++w) {
      const int r = int(w / P.splits), split = int(w % P.splits);
      int64_t t0, t1;
      split_range(P, r, split, &t0, &t1);
      st.reset(P);
#ifdef MLASERVE_HAVE_AMX
      if constexpr (kImpl == kAmx) attend_bf16_amx(P, r, t0, t1, st, amx);
#endif
#ifdef MLASERVE_HAVE_AVX512_BF16
      if constexpr (kImpl == kAvx512) attend_bf16_avx512(P, r, t0, t1, st, qb, alpha, plain);
#endif
      if constexpr (kImpl == kGeneric) attend_generic<T>(P, r, t0, t1, st, qf, alpha, plain);
      if (P.splits == 1)
        finish_row<T>(P, r, st);
      else
        save_split(P, r, split, st);
    }
    if (P.splits > 1) {
#pragma omp for schedule(static)
      for (int64_t w = 0; w < int64_t(P.rows) * P.heads; ++w) merge_splits<T>(P, int(w / P.heads), int(w % P.heads));
    }
#ifdef MLASERVE_HAVE_AMX
    if constexpr (kImpl == kAmx) _tile_release();
#endif
  }
}

}  // namespace

extern "C" {

// Which implementations this build and this process can run: 1 = AVX-512 BF16, 2 = AMX (also
// asks the kernel for the tile registers).
int mla_decode_impls() {
  int mask = 0;
#ifdef MLASERVE_HAVE_AVX512_BF16
  mask |= 1;
#endif
#ifdef MLASERVE_HAVE_AMX
  if (amx_permitted()) mask |= 2;
#endif
  return mask;
}

// elem_bytes: 4 (float32) or 2 (bf16) for queries and output, and for the cache unless cache_fp8
// (then the FP8 layout, and rank a multiple of 128); impl: 0 portable, 1 AVX-512 BF16, 2 AMX.
// Returns 0 on success, -1 when asked for an implementation, dtype or shape this build does not have.
int mla_decode(const void* q_latent, int64_t ql_row, int64_t ql_head, const void* q_pe, int64_t qp_row,
               int64_t qp_head, const void* cache, const int64_t* tables, int64_t table_stride,
               const int32_t* seq_of_row, const int32_t* kv_lens, void* out, int64_t out_row, int64_t out_head,
               float* partial, int rows, int heads, int rank, int rope, int page, int splits, float scale,
               int elem_bytes, int cache_fp8, int impl, int num_threads) {
  const Problem P{q_latent, ql_row,  ql_head,   q_pe,   qp_row, qp_head, cache, tables, table_stride,
                  seq_of_row, kv_lens, out,     out_row, out_head, partial, rows, heads,  rank,
                  rope,     page,    splits,    scale, cache_fp8 != 0};
  if (rows == 0) return 0;
  if (cache_fp8 && rank % 128) return -1;
  if (impl == kAmx) {
#ifdef MLASERVE_HAVE_AMX
    if (!amx_permitted() || elem_bytes != 2 || amx_group(heads) == 0 || page % 16 || rank % 32 || rope % 32)
      return -1;
    run<uint16_t, kAmx>(P, num_threads);
    return 0;
#else
    return -1;
#endif
  }
  if (impl == kAvx512) {
#ifdef MLASERVE_HAVE_AVX512_BF16
    if (elem_bytes != 2 || heads % 4 || rank % 64 || rope % 32) return -1;
    run<uint16_t, kAvx512>(P, num_threads);
    return 0;
#else
    return -1;
#endif
  }
  if (impl != kGeneric) return -1;
  if (elem_bytes == 4)
    run<float, kGeneric>(P, num_threads);
  else if (elem_bytes == 2)
    run<uint16_t, kGeneric>(P, num_threads);
  else
    return -1;
  return 0;
}

// FP8 cache entries at rows `slots` of `cache` (rows of rank + rank / 32 + 2 rope bytes) -> n
// rows [latent | rope] of bf16 (prefill reads its contexts this way). Returns -1 where this build
// has no AVX-512 BF16 or rank is not a multiple of 128.
int latent_fp8_gather_bf16(const uint8_t* cache, const int64_t* slots, int64_t n, int rank, int rope, uint16_t* out,
                           int num_threads) {
#ifdef MLASERVE_HAVE_AVX512_BF16
  if (rank % 128) return -1;
  Problem P{};
  P.rank = rank;
  P.rope = rope;
  P.fp8 = true;
  const int64_t bytes = P.row_bytes();
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t i = 0; i < n; ++i) dequantize_rows_avx512(P, cache + slots[i] * bytes, 1, out + i * (rank + rope));
  return 0;
#else
  (void)cache, (void)slots, (void)n, (void)rank, (void)rope, (void)out, (void)num_threads;
  return -1;
#endif
}

}  // extern "C"
