// DeepSeek-V3's router (noaux_tc) for bf16 hidden states, one pass per block of tokens: the
// contract of model/moe.py's Gate on the CPU.
//
// Per token:  scores = sigmoid(x W^T)                 (float32; W given transposed: [hidden, E])
//             biased = scores + correction bias
//             group score = sum of its two best biased scores; the topk_group best groups stay
//             ids = the k best biased scores among the kept groups, best first
//             weights = scores[ids] (normalized to sum 1 when asked) * scaling
//
// Why not torch: the reference is a dozen small ops per layer (a float copy of x, matmul,
// sigmoid, two top-k's, a scatter, a mask, a gather, ...): 0.5 ms per MoE layer at 256 decode
// tokens and ~2 ms at a 2048-token prefill step on this kind of machine, for arithmetic that
// takes a fraction of that. Plain loops, vectorized by the compiler for -march=native. Scores go
// kTokens tokens at a time against 32 experts at a time, so each weight read serves kTokens
// tokens and the accumulators fill the vector registers (one dot product per token and expert
// had run at a sixth of the FMA units' rate and read all the weights once per token).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

#include "cpu_common.h"

using namespace mlaserve;

namespace {

// Indices of the n largest values (and the values, in vals), best first; ties go to the lower
// index. Most candidates lose to the n-th best at once; the values are kept beside the indices
// so that test reads no memory through an index (that dependent load chain had been a third of
// the router's time).
void top_n(const float* v, int count, int n, int* out, float* vals) {
  int filled = 0;
  for (int e = 0; e < count; ++e) {
    const float x = v[e];
    if (filled == n && !(x > vals[n - 1])) continue;
    int pos = filled < n ? filled++ : n - 1;
    for (; pos > 0 && x > vals[pos - 1]; --pos) {
      vals[pos] = vals[pos - 1];
      out[pos] = out[pos - 1];
    }
    vals[pos] = x;
    out[pos] = e;
  }
}

// v <- 1 / (1 + e^-v), in place.
void sigmoid(float* v, int n) {
  int i = 0;
#ifdef MLASERVE_HAVE_AVX512_BF16  // the vector exp: a scalar std::exp per expert cost as much as the scores
  const __m512 minus_log2e = _mm512_set1_ps(-1.4426950408889634f), one = _mm512_set1_ps(1.f);
  for (; i + 16 <= n; i += 16) {
    const __m512 e = exp2_ps(_mm512_mul_ps(_mm512_loadu_ps(v + i), minus_log2e));
    _mm512_storeu_ps(v + i, _mm512_div_ps(one, _mm512_add_ps(one, e)));
  }
#endif
  for (; i < n; ++i) v[i] = 1.f / (1.f + std::exp(-v[i]));
}

constexpr int kTokens = 8;
constexpr int kExperts = 32;

// scores[t][e] = x_t . W^T[:, e] for kTokens tokens (xf: [kTokens][hidden] float32), summed in
// order over hidden. wt: [hidden][E].
void block_scores(const float* xf, const float* wt, int hidden, int E, float* scores) {
  int e0 = 0;
#ifdef MLASERVE_HAVE_AVX512_BF16  // 16 accumulators in zmm registers (the compiler chose ymm and spilled)
  for (; e0 + kExperts <= E; e0 += kExperts) {
    __m512 acc[kTokens][2];
    for (int t = 0; t < kTokens; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
    for (int i = 0; i < hidden; ++i) {
      const float* w = wt + int64_t(i) * E + e0;
      const __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + 16);
      for (int t = 0; t < kTokens; ++t) {
        const __m512 v = _mm512_set1_ps(xf[t * hidden + i]);
        acc[t][0] = _mm512_fmadd_ps(v, w0, acc[t][0]);
        acc[t][1] = _mm512_fmadd_ps(v, w1, acc[t][1]);
      }
    }
    for (int t = 0; t < kTokens; ++t) {
      _mm512_storeu_ps(scores + t * E + e0, acc[t][0]);
      _mm512_storeu_ps(scores + t * E + e0 + 16, acc[t][1]);
    }
  }
#else
  for (; e0 + kExperts <= E; e0 += kExperts) {
    float acc[kTokens][kExperts] = {};
    for (int i = 0; i < hidden; ++i) {
      const float* w = wt + int64_t(i) * E + e0;
      for (int t = 0; t < kTokens; ++t) {
        const float v = xf[t * hidden + i];
#pragma omp simd
        for (int j = 0; j < kExperts; ++j) acc[t][j] += v * w[j];
      }
    }
    for (int t = 0; t < kTokens; ++t)
      for (int j = 0; j < kExperts; ++j) scores[t * E + e0 + j] = acc[t][j];
  }
#endif
  for (int t = 0; t < kTokens && e0 < E; ++t)  // the last E % 32 experts
    for (int e = e0; e < E; ++e) {
      float dot = 0.f;
      for (int i = 0; i < hidden; ++i) dot += xf[t * hidden + i] * wt[int64_t(i) * E + e];
      scores[t * E + e] = dot;
    }
}

}  // namespace

extern "C" {

// x: [tokens, hidden] bf16 (row stride x_stride); wt: [hidden, E] float32 (the gate's weight,
// transposed); bias: [E] float32. Writes weights [tokens, k] float32 and ids [tokens, k] int64.
// Returns 0, or -1 for a shape it does not take (E not split evenly in groups, k or topk_group
// out of range).
int moe_gate(const uint16_t* x, int64_t x_stride, const float* wt, const float* bias, int64_t tokens, int hidden,
             int E, int n_group, int topk_group, int k, int normalize, float scaling, float* weights, int64_t* ids,
             int num_threads) {
  if (n_group <= 0 || E % n_group || E > 4096 || k <= 0 || k > E || topk_group <= 0 || topk_group > n_group ||
      E / n_group < 2 || k > topk_group * (E / n_group))
    return -1;
  const int per_group = E / n_group;
  const int64_t blocks = (tokens + kTokens - 1) / kTokens;
  const int64_t useful = std::max<int64_t>(1, tokens * int64_t(E) * hidden / (1 << 20));
  const int threads = int(std::min<int64_t>({int64_t(num_threads), useful, blocks}));
#pragma omp parallel num_threads(std::max(threads, 1))
  {
    std::vector<float> xf(size_t(kTokens) * hidden), block(size_t(kTokens) * E), biased(E), group_score(n_group);
    std::vector<int> keep(topk_group), best(k), two(2);
    std::vector<float> vals(std::max({k, topk_group, 2}));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t t0 = b * kTokens;
      const int nt = int(std::min<int64_t>(kTokens, tokens - t0));
      for (int t = 0; t < kTokens; ++t) {
        float* dst = xf.data() + size_t(t) * hidden;
        if (t < nt) {
          const uint16_t* row = x + (t0 + t) * x_stride;
          for (int i = 0; i < hidden; ++i) dst[i] = bf16_to_float(row[i]);
        } else {
          std::fill(dst, dst + hidden, 0.f);
        }
      }
      block_scores(xf.data(), wt, hidden, E, block.data());
      for (int bt = 0; bt < nt; ++bt) {
        const int64_t t = t0 + bt;
        float* scores = block.data() + size_t(bt) * E;
        sigmoid(scores, E);
        for (int e = 0; e < E; ++e) biased[e] = scores[e] + bias[e];
        for (int g = 0; g < n_group; ++g) {
          top_n(biased.data() + g * per_group, per_group, 2, two.data(), vals.data());
          group_score[g] = vals[0] + vals[1];
        }
        top_n(group_score.data(), n_group, topk_group, keep.data(), vals.data());
        std::vector<float>& masked = biased;  // other groups' experts drop out
        for (int g = 0; g < n_group; ++g) {
          if (std::find(keep.begin(), keep.end(), g) != keep.end()) continue;
          for (int j = 0; j < per_group; ++j) masked[g * per_group + j] = -INFINITY;
        }
        top_n(masked.data(), E, k, best.data(), vals.data());
        float sum = 0.f;
        for (int j = 0; j < k; ++j) sum += scores[best[j]];
        for (int j = 0; j < k; ++j) {  // the reference's order of operations
          weights[t * k + j] = (normalize ? scores[best[j]] / (sum + 1e-20f) : scores[best[j]]) * scaling;
          ids[t * k + j] = best[j];
        }
      }
    }
  }
  return 0;
}

}  // extern "C"
