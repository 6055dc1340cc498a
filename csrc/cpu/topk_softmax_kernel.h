// Torch-free CPU kernels of topk_softmax and its backward, over a [begin, end) range of rows.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/dtype.h"

namespace smoe::cpu {

// True when (va, a) comes before (vb, b) in top-k order: larger value first, lower index on ties.
template <typename A>
inline bool topk_before(A va, int64_t a, A vb, int64_t b) {
  return va > vb || (va == vb && a < b);
}

// Largest k for the single-pass selection (a sorted buffer on the stack).
constexpr int64_t kTopkStack = 32;

// One pass over the row keeping the k best in a sorted buffer: O(E) when most entries fall
// below the current k-th. Equal values keep index order because e only grows.
// The value a row is ranked by: the logit, plus bias[e] when a selection bias is given (in the
// accumulation type; the weights never see the bias).
template <typename T>
inline acc_t<T> rank_value(const T* l, const float* bias, int64_t e) {
  return bias == nullptr ? load(l[e]) : load(l[e]) + static_cast<acc_t<T>>(bias[e]);
}

// rank(e) gives the value expert e is ranked by, of type A (topk_sigmoid reuses these).
template <typename A, typename Rank>
void select_topk_insertion(Rank rank, int64_t E, int64_t k, int32_t* out) {
  A best_v[kTopkStack];
  int64_t best_i[kTopkStack];
  int64_t n = 0;
  for (int64_t e = 0; e < E; ++e) {
    const A v = rank(e);
    if (n == k && !topk_before(v, e, best_v[k - 1], best_i[k - 1])) continue;
    int64_t pos = n < k ? n++ : k - 1;
    while (pos > 0 && topk_before(v, e, best_v[pos - 1], best_i[pos - 1])) {
      best_v[pos] = best_v[pos - 1];
      best_i[pos] = best_i[pos - 1];
      --pos;
    }
    best_v[pos] = v;
    best_i[pos] = e;
  }
  for (int64_t j = 0; j < k; ++j) out[j] = static_cast<int32_t>(best_i[j]);
}

// k passes, each taking the best entry strictly after the previous pick in top-k order
// (O(k E), no buffer: for large k).
template <typename A, typename Rank>
void select_topk_passes(Rank rank, int64_t E, int64_t k, int32_t* out) {
  A prev_v = INFINITY;
  int64_t prev_i = -1;
  for (int64_t j = 0; j < k; ++j) {
    A best_v = -INFINITY;
    int64_t best_i = -1;
    for (int64_t e = 0; e < E; ++e) {
      const A v = rank(e);
      if (topk_before(prev_v, prev_i, v, e) && (best_i < 0 || topk_before(v, e, best_v, best_i))) {
        best_v = v;
        best_i = e;
      }
    }
    out[j] = static_cast<int32_t>(best_i);
    prev_v = best_v;
    prev_i = best_i;
  }
}

// Forward. Row-major logits [T, E] (row stride ld); weight, expert [T, k] contiguous; bias [E]
// finite or nullptr (selection only). Returns the first row (>= begin) holding a NaN or +inf or
// only -inf (no expert has a probability), or -1 when all rows are valid.
template <typename T>
int64_t topk_softmax_rows(const T* logits, int64_t ld, int64_t E, int64_t k, bool renormalize,
                          const float* bias, int64_t begin, int64_t end, T* weight,
                          int32_t* expert) {
  using A = acc_t<T>;
  for (int64_t t = begin; t < end; ++t) {
    const T* l = logits + t * ld;
    A m = -INFINITY;
    for (int64_t e = 0; e < E; ++e) {
      const A v = load(l[e]);
      if (std::isnan(v) || v == INFINITY) return t;
      if (v > m) m = v;
    }
    if (m == -INFINITY) return t;
    const auto rank = [&](int64_t e) { return rank_value(l, bias, e); };
    if (k <= kTopkStack) {
      select_topk_insertion<A>(rank, E, k, expert + t * k);
    } else {
      select_topk_passes<A>(rank, E, k, expert + t * k);
    }
    // The softmax's denominator: the k selected terms (renormalize) or all E; the selected
    // terms are computed once and kept in the weight row (in A when k fits the stack buffer)
    A selected = 0;
    A numer[kTopkStack];
    for (int64_t j = 0; j < k; ++j) {
      const A x = std::exp(load(l[expert[t * k + j]]) - m);
      if (j < kTopkStack) numer[j] = x;
      selected += x;
    }
    A denom = selected;
    if (!renormalize) {
      denom = 0;
      for (int64_t e = 0; e < E; ++e) denom += std::exp(load(l[e]) - m);
    }
    for (int64_t j = 0; j < k; ++j) {
      const A x = j < kTopkStack ? numer[j] : std::exp(load(l[expert[t * k + j]]) - m);
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
void topk_softmax_backward_rows(const T* grad_weight, const T* logits, int64_t ld,
                                const int32_t* expert, int64_t E, int64_t k, bool renormalize,
                                int64_t begin, int64_t end, T* grad_logits) {
  using A = acc_t<T>;
  for (int64_t t = begin; t < end; ++t) {
    const T* l = logits + t * ld;
    const T* g = grad_weight + t * k;
    const int32_t* ex = expert + t * k;
    T* out = grad_logits + t * E;
    A m = -INFINITY;
    for (int64_t e = 0; e < E; ++e) m = std::fmax(m, load(l[e]));
    A denom = 0, rest = 0;  // rest: the terms of denom other than the first choice's
    if (renormalize) {
      for (int64_t j = 0; j < k; ++j) {
        const A x = std::exp(load(l[ex[j]]) - m);
        denom += x;
        if (j > 0) rest += x;
      }
    } else {
      for (int64_t e = 0; e < E; ++e) {
        const A x = std::exp(load(l[e]) - m);
        denom += x;
        if (e != ex[0]) rest += x;
      }
    }
    A dot = 0, rest_dot = 0;  // rest_dot: the terms of dot after the first choice's
    for (int64_t j = 0; j < k; ++j) {
      const A gw = load(g[j]) * (std::exp(load(l[ex[j]]) - m) / denom);
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
        const A w = std::exp(load(l[ex[j]]) - m) / denom;
        out[ex[j]] = from_acc<T>(w * (j == 0 ? top_diff : load(g[j]) - dot));
      }
    } else {
      for (int64_t e = 0; e < E; ++e) {
        A ge = 0;
        for (int64_t j = 0; j < k; ++j) ge += (ex[j] == e) ? load(g[j]) : A(0);
        const A p = std::exp(load(l[e]) - m) / denom;
        out[e] = from_acc<T>(p * (e == ex[0] ? top_diff : ge - dot));
      }
    }
  }
}

}  // namespace smoe::cpu
