// Torch-free CPU kernels of topk_sigmoid (DeepSeek-V3 routing) and its backward, over a
// [begin, end) range of rows.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "common/dtype.h"
#include "common/inline.h"
#include "common/math.h"
#include "cpu/topk_softmax_kernel.h"

namespace smoe::cpu {

// The renormalisation floor of DeepSeek-V3 (transformers adds it to the sum of the k weights).
constexpr double kSigmoidRenormEps = 1e-20;

// sigmoid(x) and 1 - sigmoid(x) = sigmoid(-x), each from one exp (no cancellation near 1); the
// exp is the vectorisable polynomial in float (common/math.h).
template <typename A>
SMOE_INLINE A sigmoid_of(A x) {
  return A(1) / (A(1) + exp_acc(-x));
}

// Group-limited selection (DeepSeek-V3): each of n_group consecutive groups of G = E / n_group
// experts scores the sum of its two largest choice values (its largest when G = 1); the
// topk_group best groups (ties to the lower group) stay, the others' experts are set to -inf.
// choice [E] in place; group_score [n_group], keep [topk_group] and keys [n_group] are scratch.
template <typename A>
SMOE_INLINE void mask_groups(A* choice, int64_t E, int64_t n_group, int64_t topk_group,
                             A* group_score, int32_t* keep, uint64_t* keys) {
  const int64_t G = E / n_group;
  for (int64_t g = 0; g < n_group; ++g) {
    const A* c = choice + g * G;
    A first = -INFINITY, second = -INFINITY;
    for (int64_t i = 0; i < G; ++i) {
      if (c[i] > first) {
        second = first;
        first = c[i];
      } else if (c[i] > second) {
        second = c[i];
      }
    }
    group_score[g] = G == 1 ? first : first + second;
  }
  select_topk<A>([&](int64_t g) { return group_score[g]; }, n_group, topk_group, keep, keys);
  // keep holds the kept group ids; mark them in group_score (reused as a flag: 1 kept, 0 not).
  for (int64_t g = 0; g < n_group; ++g) group_score[g] = A(0);
  for (int64_t j = 0; j < topk_group; ++j) group_score[keep[j]] = A(1);
  for (int64_t g = 0; g < n_group; ++g) {
    if (group_score[g] == A(0)) {
      for (int64_t i = 0; i < G; ++i) choice[g * G + i] = -INFINITY;
    }
  }
}

// Forward. Row-major logits [T, E] (row stride ld); weight, expert [T, k] contiguous; bias [E]
// finite or nullptr. s = sigmoid(logit) in the accumulation type; experts are chosen by s + bias
// (after the group mask), best first with ties to the lower index; weight = s of the chosen,
// divided by (their sum + 1e-20) when renormalize, times scale. Returns the first row (>= begin)
// holding a NaN, or -1.
template <typename T>
SMOE_INLINE int64_t topk_sigmoid_rows(const T* logits, int64_t ld, int64_t E, int64_t k,
                                      int64_t n_group, int64_t topk_group, bool renormalize,
                                      double scale, const float* bias, int64_t begin, int64_t end,
                                      T* weight, int32_t* expert) {
  using A = acc_t<T>;
  std::vector<A> choice(static_cast<size_t>(E)), group_score(static_cast<size_t>(n_group));
  std::vector<int32_t> keep(static_cast<size_t>(topk_group));
  std::vector<uint64_t> keys(static_cast<size_t>(E));
  for (int64_t t = begin; t < end; ++t) {
    const T* l = logits + t * ld;
    for (int64_t e = 0; e < E; ++e) {
      const A v = load(l[e]);
      if (std::isnan(v)) return t;
      choice[e] = sigmoid_of(v) + (bias == nullptr ? A(0) : static_cast<A>(bias[e]));
    }
    if (n_group > 1) {
      mask_groups(choice.data(), E, n_group, topk_group, group_score.data(), keep.data(),
                  keys.data());
    }
    int32_t* ex = expert + t * k;
    select_topk<A>([&](int64_t e) { return choice[e]; }, E, k, ex, keys.data());
    A denom = 1;
    if (renormalize) {
      denom = 0;
      for (int64_t j = 0; j < k; ++j) denom += sigmoid_of(load(l[ex[j]]));
      denom += static_cast<A>(kSigmoidRenormEps);
    }
    for (int64_t j = 0; j < k; ++j) {
      const A s = sigmoid_of(load(l[ex[j]]));
      weight[t * k + j] = from_acc<T>(renormalize ? (s / denom) * static_cast<A>(scale)
                                                  : s * static_cast<A>(scale));
    }
  }
  return -1;
}

// Backward: grad_logits [T, E] contiguous from grad_weight [T, k], logits [T, E] (stride ld),
// expert [T, k] (values in [0, E)). With w_j = c s_j / S, S = sum_j s_j + 1e-20 (renormalize)
// or w_j = c s_j:  d s_i = c sum_{j: e_j = i} (g_j / S - sum_l g_l s_l / S^2)  (or c g_j), and
// d l_i = d s_i s_i (1 - s_i), with 1 - s_i = sigmoid(-l_i). Experts not chosen get 0.
// g_j / S - sum_l g_l s_l / S^2 cancels when one s dominates S (always at k = 1); it is summed
// as (sum_{l != j} s_l (g_j - g_l) + g_j 1e-20) / S^2 instead, whose terms do not cancel.
template <typename T>
SMOE_INLINE void topk_sigmoid_backward_rows(const T* grad_weight, const T* logits, int64_t ld,
                                            const int32_t* expert, int64_t E, int64_t k,
                                            bool renormalize, double scale, int64_t begin,
                                            int64_t end, T* grad_logits) {
  using A = acc_t<T>;
  const A c = static_cast<A>(scale);
  std::vector<A> acc(static_cast<size_t>(E));
  for (int64_t t = begin; t < end; ++t) {
    const T* l = logits + t * ld;
    const T* g = grad_weight + t * k;
    const int32_t* ex = expert + t * k;
    A S = 0;
    if (renormalize) {
      for (int64_t j = 0; j < k; ++j) S += sigmoid_of(load(l[ex[j]]));
      S += static_cast<A>(kSigmoidRenormEps);
    }
    for (int64_t e = 0; e < E; ++e) acc[e] = A(0);
    for (int64_t j = 0; j < k; ++j) {
      const A gj = load(g[j]);
      if (!renormalize) {
        acc[ex[j]] += c * gj;
        continue;
      }
      A num = gj * static_cast<A>(kSigmoidRenormEps);
      for (int64_t i = 0; i < k; ++i) {
        if (i != j) num += sigmoid_of(load(l[ex[i]])) * (gj - load(g[i]));
      }
      acc[ex[j]] += c * (num / (S * S));
    }
    T* out = grad_logits + t * E;
    for (int64_t e = 0; e < E; ++e) {
      const A x = load(l[e]);
      out[e] = from_acc<T>(acc[e] == A(0) ? A(0) : acc[e] * sigmoid_of(x) * sigmoid_of(-x));
    }
  }
}

// The entry points the glue calls, one clone per x86 vector ISA (SMOE_ISA_CLONES).
#define SMOE_TOPK_SIGMOID_ENTRY(T)                                                                \
  SMOE_ISA_CLONES inline int64_t topk_sigmoid(                                                    \
      const T* logits, int64_t ld, int64_t E, int64_t k, int64_t n_group, int64_t topk_group,     \
      bool renormalize, double scale, const float* bias, int64_t begin, int64_t end, T* weight,   \
      int32_t* expert) {                                                                          \
    return topk_sigmoid_rows<T>(logits, ld, E, k, n_group, topk_group, renormalize, scale, bias,  \
                                begin, end, weight, expert);                                      \
  }                                                                                               \
  SMOE_ISA_CLONES inline void topk_sigmoid_backward(                                              \
      const T* grad_weight, const T* logits, int64_t ld, const int32_t* expert, int64_t E,        \
      int64_t k, bool renormalize, double scale, int64_t begin, int64_t end, T* grad_logits) {    \
    topk_sigmoid_backward_rows<T>(grad_weight, logits, ld, expert, E, k, renormalize, scale,      \
                                  begin, end, grad_logits);                                       \
  }
SMOE_TOPK_SIGMOID_ENTRY(float)
SMOE_TOPK_SIGMOID_ENTRY(double)
SMOE_TOPK_SIGMOID_ENTRY(half_t)
SMOE_TOPK_SIGMOID_ENTRY(bfloat16_t)
#undef SMOE_TOPK_SIGMOID_ENTRY

}  // namespace smoe::cpu
