// DeepSeek-V3's router (noaux_tc) for bf16 hidden states, one pass per token: the contract of
// model/moe.py's Gate on the CPU.
//
// Per token:  scores = sigmoid(x W^T)                 (float32; W [E, hidden] float32)
//             biased = scores + correction bias
//             group score = sum of its two best biased scores; the topk_group best groups stay
//             ids = the k best biased scores among the kept groups, best first
//             weights = scores[ids] (normalized to sum 1 when asked) * scaling
//
// Why not torch: the reference is a dozen small ops per layer (a float copy of x, matmul,
// sigmoid, two top-k's, a scatter, a mask, a gather, ...): 0.5 ms per MoE layer at 256 decode
// tokens and ~2 ms at a 2048-token prefill step on this kind of machine, for arithmetic that
// takes a fraction of that. Plain loops, vectorized by the compiler for -march=native.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

#include "cpu_common.h"

using namespace mlaserve;

namespace {

// Indices of the n largest values, best first; ties go to the lower index.
void top_n(const float* v, int count, int n, int* out) {
  for (int i = 0; i < n; ++i) out[i] = -1;
  for (int e = 0; e < count; ++e) {
    const float x = v[e];
    int pos = n;
    while (pos > 0 && (out[pos - 1] < 0 || x > v[out[pos - 1]])) --pos;
    if (pos < n) {
      for (int j = n - 1; j > pos; --j) out[j] = out[j - 1];
      out[pos] = e;
    }
  }
}

}  // namespace

extern "C" {

// x: [tokens, hidden] bf16 (row stride x_stride); w: [E, hidden] float32; bias: [E] float32.
// Writes weights [tokens, k] float32 and ids [tokens, k] int64. Returns 0, or -1 for a shape it
// does not take (E not split evenly in groups, k or topk_group out of range).
int moe_gate(const uint16_t* x, int64_t x_stride, const float* w, const float* bias, int64_t tokens, int hidden,
             int E, int n_group, int topk_group, int k, int normalize, float scaling, float* weights, int64_t* ids,
             int num_threads) {
  if (n_group <= 0 || E % n_group || E > 4096 || k <= 0 || k > E || topk_group <= 0 || topk_group > n_group ||
      E / n_group < 2 || k > topk_group * (E / n_group))
    return -1;
  const int per_group = E / n_group;
  const int64_t useful = std::max<int64_t>(1, tokens * int64_t(E) * hidden / (1 << 20));
  const int threads = int(std::min<int64_t>(num_threads, useful));
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> xf(hidden), scores(E), biased(E), group_score(n_group);
    std::vector<int> keep(topk_group), best(k), two(2);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tokens; ++t) {
      const uint16_t* row = x + t * x_stride;
      for (int i = 0; i < hidden; ++i) xf[i] = bf16_to_float(row[i]);
      int e = 0;
      for (; e + 8 <= E; e += 8) {  // eight dot products at once: one accumulator would wait on itself
        const float* we = w + int64_t(e) * hidden;
        float d0 = 0.f, d1 = 0.f, d2 = 0.f, d3 = 0.f, d4 = 0.f, d5 = 0.f, d6 = 0.f, d7 = 0.f;
#pragma omp simd reduction(+ : d0, d1, d2, d3, d4, d5, d6, d7)
        for (int i = 0; i < hidden; ++i) {
          const float v = xf[i];
          d0 += v * we[i];
          d1 += v * we[hidden + i];
          d2 += v * we[2 * hidden + i];
          d3 += v * we[3 * hidden + i];
          d4 += v * we[4 * hidden + i];
          d5 += v * we[5 * hidden + i];
          d6 += v * we[6 * hidden + i];
          d7 += v * we[7 * hidden + i];
        }
        const float d[8] = {d0, d1, d2, d3, d4, d5, d6, d7};
        for (int j = 0; j < 8; ++j) scores[e + j] = d[j];
      }
      for (; e < E; ++e) {
        const float* we = w + int64_t(e) * hidden;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int i = 0; i < hidden; ++i) dot += xf[i] * we[i];
        scores[e] = dot;
      }
      for (e = 0; e < E; ++e) {
        scores[e] = 1.f / (1.f + std::exp(-scores[e]));
        biased[e] = scores[e] + bias[e];
      }
      for (int g = 0; g < n_group; ++g) {
        top_n(biased.data() + g * per_group, per_group, 2, two.data());
        group_score[g] = biased[g * per_group + two[0]] + biased[g * per_group + two[1]];
      }
      top_n(group_score.data(), n_group, topk_group, keep.data());
      std::vector<float>& masked = biased;  // other groups' experts drop out
      for (int g = 0; g < n_group; ++g) {
        if (std::find(keep.begin(), keep.end(), g) != keep.end()) continue;
        for (int j = 0; j < per_group; ++j) masked[g * per_group + j] = -INFINITY;
      }
      top_n(masked.data(), E, k, best.data());
      float sum = 0.f;
      for (int j = 0; j < k; ++j) sum += scores[best[j]];
      for (int j = 0; j < k; ++j) {  // the reference's order of operations
        weights[t * k + j] = (normalize ? scores[best[j]] / (sum + 1e-20f) : scores[best[j]]) * scaling;
        ids[t * k + j] = best[j];
      }
    }
  }
  return 0;
}

}  // extern "C"
