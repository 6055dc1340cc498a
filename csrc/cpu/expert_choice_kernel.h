// Torch-free CPU kernels of expert_choice (Zhou et al. 2022) and its backward.
//
// Forward, in three passes the glue runs over torch's thread pool:
//   1. expert_choice_probs: p = softmax(logits) per token, in the accumulation type;
//   2. expert_choice_select: for each (expert e, group g) segment, the c_g tokens of the group
//      with the largest p[., e] (ties to the lower token index), listed in token order at plan
//      rows e * C_tot + g * min(C, S) + j;
//   3. expert_choice_weights: weight[t, e] = p[t, e] where chosen, else 0.
// Every output element has exactly one writer, so the result does not depend on the threads.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <type_traits>
#include <vector>

#include "common/dtype.h"
#include "common/expert_choice_shape.h"
#include "common/inline.h"
#include "common/math.h"
#include "cpu/softmax_row.h"
#include "cpu/topk_select.h"

namespace smoe::cpu {

// Pass 1 over rows [begin, end): probs [T, E] contiguous. Returns the first row holding a NaN
// or +inf, or made of -inf only, or -1. The row max, the exps (exp_acc) and the lane-summed
// denominator are topk_softmax's (vectorised).
template <typename T>
SMOE_INLINE int64_t expert_choice_probs_rows(const T* logits, int64_t ld, int64_t E,
                                             int64_t begin, int64_t end, acc_t<T>* probs) {
  using A = acc_t<T>;
  for (int64_t t = begin; t < end; ++t) {
    const T* l = logits + t * ld;
    A* p = probs + t * E;
    A m = 0;
    if (!row_max(l, E, &m)) return t;  // all -inf: no probability to choose by
    A unused;
    const A inv = A(1) / sum_exp(l, E, m, -1, &unused);
    for (int64_t e = 0; e < E; ++e) p[e] = exp_acc(load(l[e]) - m) * inv;
  }
  return -1;
}

// Pass 2 over segments [begin, end), segment = e * G + g. scratch holds E * T int32 (each
// segment uses its own slice). token / slot [E * total], row [T, E] pre-filled with -1.
// For float probabilities each candidate is one 64-bit key (cpu/topk_select.h: larger key =
// larger p, ties to the lower token), so the selection is an nth_element over contiguous keys
// instead of a sort whose comparisons load p through a stride of E.
template <typename A>
SMOE_INLINE void expert_choice_select_segments(const A* probs, const smoe::ExpertChoiceShape& s,
                                               int64_t begin, int64_t end, int32_t* scratch,
                                               int32_t* token, int32_t* slot, int32_t* row) {
  const int64_t G = s.groups(), total = s.total(), full = std::min(s.C, s.S);
  std::vector<uint64_t> keys;
  for (int64_t seg = begin; seg < end; ++seg) {
    const int64_t e = seg / G, g = seg % G;
    const int64_t t0 = g * s.S, n = std::min(s.S, s.T - t0), c = s.per_group(g);
    int32_t* idx = scratch + e * s.T + t0;
    if constexpr (std::is_same_v<A, float>) {
      keys.resize(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) keys[i] = topk_key(probs[(t0 + i) * s.E + e], t0 + i);
      if (c < n) std::nth_element(keys.begin(), keys.begin() + c, keys.end(), std::greater<>());
      for (int64_t j = 0; j < c; ++j) idx[j] = topk_key_index(keys[j]);
    } else {
      for (int64_t i = 0; i < n; ++i) idx[i] = static_cast<int32_t>(t0 + i);
      const auto before = [&](int32_t a, int32_t b) {
        const A pa = probs[a * s.E + e], pb = probs[b * s.E + e];
        return pa > pb || (pa == pb && a < b);
      };
      std::partial_sort(idx, idx + c, idx + n, before);
    }
    std::sort(idx, idx + c);  // token order within the expert
    const int64_t base = e * total + g * full;
    for (int64_t j = 0; j < c; ++j) {
      const int64_t t = idx[j], r = base + j;
      token[r] = static_cast<int32_t>(t);
      slot[r] = static_cast<int32_t>(t * s.E + e);
      row[t * s.E + e] = static_cast<int32_t>(r);
    }
  }
}

// Pass 3 over rows [begin, end): weight [T, E] = p where row >= 0, else 0.
template <typename T>
void expert_choice_weights(const acc_t<T>* probs, const int32_t* row, int64_t E, int64_t begin,
                           int64_t end, T* weight) {
  for (int64_t i = begin * E; i < end * E; ++i) {
    weight[i] = from_acc<T>(row[i] >= 0 ? probs[i] : acc_t<T>(0));
  }
}

// Backward over rows [begin, end): with p = softmax(l) and m = (row >= 0), w = p * m:
//   d l[i] = p_i * (m_i g_i - sum_j m_j g_j p_j), the softmax recomputed in the accumulation type.
template <typename T>
SMOE_INLINE void expert_choice_backward_rows(const T* grad_weight, const T* logits, int64_t ld,
                                             const int32_t* row, int64_t E, int64_t begin,
                                             int64_t end, T* grad_logits) {
  using A = acc_t<T>;
  for (int64_t t = begin; t < end; ++t) {
    const T* l = logits + t * ld;
    const T* g = grad_weight + t * E;
    const int32_t* r = row + t * E;
    A m = 0, unused;
    row_max(l, E, &m);  // the forward accepted this row
    const A inv = A(1) / sum_exp(l, E, m, -1, &unused);  // as the forward's probs
    A dot = 0;
    for (int64_t e = 0; e < E; ++e) {
      if (r[e] >= 0) dot += load(g[e]) * (exp_acc(load(l[e]) - m) * inv);
    }
    for (int64_t e = 0; e < E; ++e) {
      const A p = exp_acc(load(l[e]) - m) * inv;
      const A ge = r[e] >= 0 ? load(g[e]) : A(0);
      grad_logits[t * E + e] = from_acc<T>(p * (ge - dot));
    }
  }
}

// The entry points the glue calls, one clone per x86 vector ISA (SMOE_ISA_CLONES).
#define SMOE_EXPERT_CHOICE_ENTRY(T)                                                               \
  SMOE_ISA_CLONES inline int64_t expert_choice_probs(const T* logits, int64_t ld, int64_t E,      \
                                                     int64_t begin, int64_t end,                  \
                                                     acc_t<T>* probs) {                           \
    return expert_choice_probs_rows<T>(logits, ld, E, begin, end, probs);                         \
  }                                                                                               \
  SMOE_ISA_CLONES inline void expert_choice_backward(const T* grad_weight, const T* logits,       \
                                                     int64_t ld, const int32_t* row, int64_t E,   \
                                                     int64_t begin, int64_t end,                  \
                                                     T* grad_logits) {                            \
    expert_choice_backward_rows<T>(grad_weight, logits, ld, row, E, begin, end, grad_logits);     \
  }
SMOE_EXPERT_CHOICE_ENTRY(float)
SMOE_EXPERT_CHOICE_ENTRY(double)
SMOE_EXPERT_CHOICE_ENTRY(half_t)
SMOE_EXPERT_CHOICE_ENTRY(bfloat16_t)
#undef SMOE_EXPERT_CHOICE_ENTRY

#define SMOE_EXPERT_CHOICE_SELECT_ENTRY(A)                                                        \
  SMOE_ISA_CLONES inline void expert_choice_select(                                              \
      const A* probs, const smoe::ExpertChoiceShape& s, int64_t begin, int64_t end,               \
      int32_t* scratch, int32_t* token, int32_t* slot, int32_t* row) {                            \
    expert_choice_select_segments<A>(probs, s, begin, end, scratch, token, slot, row);            \
  }
SMOE_EXPERT_CHOICE_SELECT_ENTRY(float)
SMOE_EXPERT_CHOICE_SELECT_ENTRY(double)
#undef SMOE_EXPERT_CHOICE_SELECT_ENTRY

}  // namespace smoe::cpu
