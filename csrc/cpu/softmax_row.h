// Torch-free row helpers of the CPU softmax kernels (topk_softmax, expert_choice): a row's
// max with its validity check, and its sum of exps in a fixed, vectorised order.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/dtype.h"
#include "common/inline.h"
#include "common/math.h"
#include "cpu/topk_select.h"

namespace smoe::cpu {

// The row's largest logit into *m; false when the row holds a NaN or +inf or only -inf (no
// expert has a probability). For float the scan is integer compares on the values' ordered bits,
// which vectorise (a float max with NaN checks does not).
template <typename T>
SMOE_INLINE bool row_max(const T* l, int64_t E, acc_t<T>* m) {
  using A = acc_t<T>;
  if constexpr (std::is_same_v<A, float>) {
    uint32_t bad = 0, top = 0;
    for (int64_t e = 0; e < E; ++e) {
      const float v = load(l[e]);
      uint32_t u;
      std::memcpy(&u, &v, sizeof u);
      bad |= static_cast<uint32_t>((u & 0x7FFFFFFFu) > 0x7F800000u) |
             static_cast<uint32_t>(u == 0x7F800000u);
      const uint32_t o = ordered_bits(v);
      top = top > o ? top : o;
    }
    *m = from_ordered_bits(top);
    return bad == 0 && *m != -INFINITY;
  } else {
    A top = -INFINITY;
    for (int64_t e = 0; e < E; ++e) {
      const A v = load(l[e]);
      if (std::isnan(v) || v == INFINITY) return false;
      if (v > top) top = v;
    }
    *m = top;
    return top != -INFINITY;
  }
}

// sum_e exp(l[e] - m) over a row, and the same sum without entry skip (-1: none) in *rest.
// Summed in 16 fixed lanes, then the lanes in order: vectorised, and the same order every call.
template <typename T>
SMOE_INLINE acc_t<T> sum_exp(const T* l, int64_t E, acc_t<T> m, int64_t skip, acc_t<T>* rest) {
  using A = acc_t<T>;
  constexpr int64_t W = 16;
  A lane[W] = {}, lane_rest[W] = {};
  int64_t e = 0;
  for (; e + W <= E; e += W) {
    for (int64_t w = 0; w < W; ++w) {
      const A x = exp_acc(load(l[e + w]) - m);
      lane[w] += x;
      lane_rest[w] += e + w == skip ? A(0) : x;
    }
  }
  A total = 0, without = 0;
  for (int64_t w = 0; w < W; ++w) {
    total += lane[w];
    without += lane_rest[w];
  }
  for (; e < E; ++e) {
    const A x = exp_acc(load(l[e]) - m);
    total += x;
    without += e == skip ? A(0) : x;
  }
  *rest = without;
  return total;
}

}  // namespace smoe::cpu
