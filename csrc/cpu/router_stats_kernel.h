// Torch-free CPU kernels of router_stats and its backward, over a [begin, end) range of rows.
//
// Per row t: shift = max_e l[t, e] (0 when that max is infinite, as torch.logsumexp does),
// s = sum_e exp(l[t, e] - shift), lse[t] = log(s) + shift, p[t, e] = exp(l[t, e] - shift) / s;
// prob_sum[e] = sum_t p[t, e]. Each range of rows sums its own prob_sum; the glue gives every
// fixed block of rows one and adds the blocks in order (sum_blocks), so the bits do not depend on
// the thread count. A NaN in a row makes its lse NaN and its probabilities NaN; a row of only
// -inf has lse -inf and NaN probabilities (both as torch.logsumexp and torch.softmax).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/dtype.h"
#include "common/inline.h"
#include "common/math.h"
#include "cpu/topk_select.h"

namespace smoe::cpu {

constexpr int64_t kStatsLanes = 16;  // fixed summation lanes: vectorised, same order every call

// sum of x[0..n) in kStatsLanes fixed lanes, then the lanes in order, then the tail.
template <typename A>
SMOE_INLINE A lane_sum(const A* __restrict__ x, int64_t n) {
  constexpr int64_t W = kStatsLanes;
  A lane[W] = {};
  int64_t e = 0;
  for (; e + W <= n; e += W) {
    for (int64_t w = 0; w < W; ++w) lane[w] += x[e + w];
  }
  A s = 0;
  for (int64_t w = 0; w < W; ++w) s += lane[w];
  for (; e < n; ++e) s += x[e];
  return s;
}

// sum of x[e] y[e] over e < n, in the order of lane_sum.
template <typename A>
SMOE_INLINE A lane_dot(const A* __restrict__ x, const A* __restrict__ y, int64_t n) {
  constexpr int64_t W = kStatsLanes;
  A lane[W] = {};
  int64_t e = 0;
  for (; e + W <= n; e += W) {
    for (int64_t w = 0; w < W; ++w) lane[w] += x[e + w] * y[e + w];
  }
  A s = 0;
  for (int64_t w = 0; w < W; ++w) s += lane[w];
  for (; e < n; ++e) s += x[e] * y[e];
  return s;
}

// The row's largest value: NaN when it holds a positive-signed NaN, else the largest of the
// others (a negative-signed NaN is passed over, and reaches the sum of exps instead). For float
// the scan is integer compares on the values' ordered bits, which vectorise (a float max does
// not: its reduction would need reassociation).
template <typename T>
SMOE_INLINE acc_t<T> row_max_of(const T* __restrict__ l, int64_t E) {
  using A = acc_t<T>;
  if constexpr (std::is_same_v<A, float>) {
    uint32_t top = 0;
    for (int64_t e = 0; e < E; ++e) {
      const uint32_t o = ordered_bits(load(l[e]));
      top = top > o ? top : o;
    }
    return from_ordered_bits(top);
  } else {
    A m = -INFINITY;
    for (int64_t e = 0; e < E; ++e) {
      const A v = load(l[e]);
      m = v > m ? v : m;
    }
    return m;
  }
}

// ex[e] = exp(l[e] - shift) over one row, with *shift its max (0 when infinite, as
// torch.logsumexp); returns their sum s, in the order of lane_sum.
template <typename T>
SMOE_INLINE acc_t<T> row_exps(const T* __restrict__ l, int64_t E, acc_t<T>* __restrict__ ex,
                              acc_t<T>* shift) {
  using A = acc_t<T>;
  const A m = row_max_of(l, E);
  const A c = std::isinf(m) ? A(0) : m;
  for (int64_t e = 0; e < E; ++e) ex[e] = exp_acc(load(l[e]) - c);
  *shift = c;
  return lane_sum(ex, E);
}

// Forward. Row-major logits [T, E] (row stride ld); prob_sum [E] (overwritten with this range's
// sum); lse [T]; ex: scratch of E entries.
template <typename T>
SMOE_INLINE void router_stats_rows(const T* __restrict__ logits, int64_t ld, int64_t E,
                                   int64_t begin, int64_t end, acc_t<T>* __restrict__ prob_sum,
                                   acc_t<T>* __restrict__ lse, acc_t<T>* __restrict__ ex) {
  using A = acc_t<T>;
  for (int64_t e = 0; e < E; ++e) prob_sum[e] = A(0);
  for (int64_t t = begin; t < end; ++t) {
    A shift;
    const A s = row_exps(logits + t * ld, E, ex, &shift);
    lse[t] = std::log(s) + shift;
    const A inv = A(1) / s;
    for (int64_t e = 0; e < E; ++e) prob_sum[e] += ex[e] * inv;
  }
}

// out[e] = sum over b < blocks of partial[b * E + e], the blocks in order.
template <typename A>
SMOE_INLINE void sum_blocks(const A* partial, int64_t blocks, int64_t E, A* out) {
  for (int64_t e = 0; e < E; ++e) out[e] = A(0);
  for (int64_t b = 0; b < blocks; ++b) {
    const A* p = partial + b * E;
    for (int64_t e = 0; e < E; ++e) out[e] += p[e];
  }
}

// Backward: grad_logits [T, E] contiguous, with p the rows' softmax (recomputed from the logits
// as the forward does: exp(l - lse) would lose p's relative accuracy where |lse| is large):
//   d l[t, e] = p[t, e] (gp[e] - sum_f p[t, f] gp[f] + gl[t])
// gp = d prob_sum [E] and gl = d lse [T], either nullptr (zero); p: scratch of E entries.
template <typename T>
SMOE_INLINE void router_stats_backward_rows(const acc_t<T>* __restrict__ gp,
                                            const acc_t<T>* __restrict__ gl,
                                            const T* __restrict__ logits, int64_t ld, int64_t E,
                                            int64_t begin, int64_t end,
                                            T* __restrict__ grad_logits, acc_t<T>* __restrict__ p) {
  using A = acc_t<T>;
  for (int64_t t = begin; t < end; ++t) {
    T* __restrict__ out = grad_logits + t * E;
    A shift;
    const A inv = A(1) / row_exps(logits + t * ld, E, p, &shift);
    for (int64_t e = 0; e < E; ++e) p[e] *= inv;  // the forward's probabilities, bit for bit
    const A base = (gl != nullptr ? gl[t] : A(0)) - (gp != nullptr ? lane_dot(p, gp, E) : A(0));
    if (gp != nullptr) {
      for (int64_t e = 0; e < E; ++e) out[e] = from_acc<T>(p[e] * (gp[e] + base));
    } else {
      for (int64_t e = 0; e < E; ++e) out[e] = from_acc<T>(p[e] * base);
    }
  }
}

// The entry points the glue calls, one clone per x86 vector ISA (SMOE_ISA_CLONES).
#define SMOE_ROUTER_STATS_ENTRY(T)                                                               \
  SMOE_ISA_CLONES inline void router_stats(const T* logits, int64_t ld, int64_t E, int64_t begin, \
                                           int64_t end, acc_t<T>* prob_sum, acc_t<T>* lse,        \
                                           acc_t<T>* ex) {                                        \
    router_stats_rows<T>(logits, ld, E, begin, end, prob_sum, lse, ex);                          \
  }                                                                                              \
  SMOE_ISA_CLONES inline void router_stats_backward(const acc_t<T>* gp, const acc_t<T>* gl,      \
                                                    const T* logits, int64_t ld, int64_t E,      \
                                                    int64_t begin, int64_t end, T* grad_logits,  \
                                                    acc_t<T>* p) {                               \
    router_stats_backward_rows<T>(gp, gl, logits, ld, E, begin, end, grad_logits, p);            \
  }
SMOE_ROUTER_STATS_ENTRY(float)
SMOE_ROUTER_STATS_ENTRY(double)
SMOE_ROUTER_STATS_ENTRY(half_t)
SMOE_ROUTER_STATS_ENTRY(bfloat16_t)
#undef SMOE_ROUTER_STATS_ENTRY

}  // namespace smoe::cpu
