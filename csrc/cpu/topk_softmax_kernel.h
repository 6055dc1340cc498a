// Torch-free CPU kernels of topk_softmax and its backward, over a [begin, end) range of rows.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/dtype.h"
#include "common/inline.h"
#include "common/math.h"
#include "cpu/softmax_row.h"
#include "cpu/topk_select.h"

namespace smoe::cpu {

// The value a row is ranked by: the logit, plus bias[e] when a selection bias is given (in the
// accumulation type; the weights never see the bias).
template <typename T>
SMOE_INLINE acc_t<T> rank_value(const T* l, const float* bias, int64_t e) {
  return bias == nullptr ? load(l[e]) : load(l[e]) + static_cast<acc_t<T>>(bias[e]);
}

// Forward. Row-major logits [T, E] (row stride ld); weight, expert [T, k] contiguous; bias [E]
// finite or nullptr (selection only); keys: scratch of E entries. Returns the first row
// (>= begin) holding a NaN or +inf or only -inf (no expert has a probability), or -1 when all
// rows are valid.
template <typename T>
SMOE_INLINE int64_t topk_softmax_rows(const T* logits, int64_t ld, int64_t E, int64_t k,
                                      bool renormalize, const float* bias, int64_t begin,
                                      int64_t end, T* weight, int32_t* expert, uint64_t* keys) {
  using A = acc_t<T>;
  const int64_t kb = std::min(k, kTopkStack);  // the numerators kept on the stack
  for (int64_t t = begin; t < end; ++t) {
    const T* l = logits + t * ld;
    A m = 0;
    if (!row_max(l, E, &m)) return t;
    int32_t* ex = expert + t * k;
    select_topk<A>([&](int64_t e) { return rank_value(l, bias, e); }, E, k, ex, keys);
    // The softmax's denominator: the k selected terms (renormalize) or all E. The selected
    // terms are gathered, then exponentiated in one vectorised loop and kept.
    A numer[kTopkStack];
    for (int64_t j = 0; j < kb; ++j) numer[j] = load(l[ex[j]]) - m;
    for (int64_t j = 0; j < kb; ++j) numer[j] = exp_acc(numer[j]);
    A denom = 0, unused;
    if (renormalize) {
      for (int64_t j = 0; j < k; ++j) denom += j < kb ? numer[j] : exp_acc(load(l[ex[j]]) - m);
    } else {
      denom = sum_exp(l, E, m, -1, &unused);
    }
    for (int64_t j = 0; j < k; ++j) {
      const A x = j < kb ? numer[j] : exp_acc(load(l[ex[j]]) - m);
      weight[t * k + j] = from_acc<T>(x / denom);
    }
  }
  return -1;
}

// The first of n expert ids outside [0, E), or -1 (the backward indexes logits with them).
inline int64_t first_invalid_expert(const int32_t* expert, int64_t n, int64_t E) {
  for (int64_t i = 0; i < n; ++i) {
    if (expert[i] < 0 || expert[i] >= E) return i;
  }
  return -1;
}

// Backward: grad_logits [T, E] contiguous from grad_weight [T, k], logits [T, E] (stride ld),
// expert [T, k]. The softmax is recomputed in the accumulation type, not read from the saved
// (possibly 16-bit) weights.
//   renormalize:  w_j = softmax over the selected logits; d l[e_j] = w_j (g_j - sum_l g_l w_l)
//   otherwise:    w_j = p[e_j] of the full softmax;     d l[i]   = p_i (G_i - sum_j g_j w_j)
// (for the first choice, with g_0 - sum_j g_j w_j rearranged: see top_diff).
template <typename T>
SMOE_INLINE void topk_softmax_backward_rows(const T* grad_weight, const T* logits, int64_t ld,
                                            const int32_t* expert, int64_t E, int64_t k,
                                            bool renormalize, int64_t begin, int64_t end,
                                            T* grad_logits) {
  using A = acc_t<T>;
  for (int64_t t = begin; t < end; ++t) {
    const T* l = logits + t * ld;
    const T* g = grad_weight + t * k;
    const int32_t* ex = expert + t * k;
    T* out = grad_logits + t * E;
    A m = 0;
    row_max(l, E, &m);  // the forward accepted this row
    // denom as the forward summed it; rest: its terms other than the first choice's
    A denom = 0, rest = 0;
    if (renormalize) {
      for (int64_t j = 0; j < k; ++j) {
        const A x = exp_acc(load(l[ex[j]]) - m);
        denom += x;
        if (j > 0) rest += x;
      }
    } else {
      denom = sum_exp(l, E, m, ex[0], &rest);
    }
    A dot = 0, rest_dot = 0;  // rest_dot: the terms of dot after the first choice's
    for (int64_t j = 0; j < k; ++j) {
      const A gw = load(g[j]) * (exp_acc(load(l[ex[j]]) - m) / denom);
      dot += gw;
      if (j > 0) rest_dot += gw;
    }
    // The first choice has the largest weight w_0; when w_0 ~ 1, g_0 - dot cancels to 0 in fp32
    // and its gradient loses all relative accuracy. Written as g_0 (1 - w_0) - sum_{j>0} g_j w_j
    // with 1 - w_0 = rest / denom summed from the other probabilities, it keeps it.
    const A top_diff = load(g[0]) * (rest / denom) - rest_dot;
    if (renormalize) {
      for (int64_t e = 0; e < E; ++e) out[e] = from_acc<T>(A(0));
      for (int64_t j = 0; j < k; ++j) {
        const A w = exp_acc(load(l[ex[j]]) - m) / denom;
        out[ex[j]] = from_acc<T>(w * (j == 0 ? top_diff : load(g[j]) - dot));
      }
    } else {
      for (int64_t e = 0; e < E; ++e) {
        A ge = 0;
        for (int64_t j = 0; j < k; ++j) ge += (ex[j] == e) ? load(g[j]) : A(0);
        const A p = exp_acc(load(l[e]) - m) / denom;
        out[e] = from_acc<T>(p * (e == ex[0] ? top_diff : ge - dot));
      }
    }
  }
}

// The entry points the glue calls, one clone per x86 vector ISA (SMOE_ISA_CLONES). The forward
// holds its selection keys in a scratch vector per call.
#define SMOE_TOPK_SOFTMAX_ENTRY(T)                                                               \
  SMOE_ISA_CLONES inline int64_t topk_softmax(const T* logits, int64_t ld, int64_t E, int64_t k, \
                                              bool renormalize, const float* bias,               \
                                              int64_t begin, int64_t end, T* weight,             \
                                              int32_t* expert) {                                 \
    std::vector<uint64_t> keys(static_cast<size_t>(E));                                         \
    return topk_softmax_rows<T>(logits, ld, E, k, renormalize, bias, begin, end, weight, expert, \
                                keys.data());                                                    \
  }                                                                                              \
  SMOE_ISA_CLONES inline void topk_softmax_backward(                                             \
      const T* grad_weight, const T* logits, int64_t ld, const int32_t* expert, int64_t E,       \
      int64_t k, bool renormalize, int64_t begin, int64_t end, T* grad_logits) {                 \
    topk_softmax_backward_rows<T>(grad_weight, logits, ld, expert, E, k, renormalize, begin,     \
                                  end, grad_logits);                                             \
  }
SMOE_TOPK_SOFTMAX_ENTRY(float)
SMOE_TOPK_SOFTMAX_ENTRY(double)
SMOE_TOPK_SOFTMAX_ENTRY(half_t)
SMOE_TOPK_SOFTMAX_ENTRY(bfloat16_t)
#undef SMOE_TOPK_SOFTMAX_ENTRY

}  // namespace smoe::cpu
