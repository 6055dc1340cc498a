// Torch-free top-k selection for the CPU routing kernels (topk_softmax, topk_sigmoid): the k best
// of n ranked entries, best first, ties to the lower index.
//
// For float ranks each entry becomes one 64-bit key, (order-preserving bits of the value) << 32 |
// ~index, so that "larger key" is exactly "comes first in top-k order" and no two keys are equal;
// k passes of a branch-free max over the keys then vectorise (8 keys per AVX-512 op). For double
// ranks (the float64 path) the keys would need 96 bits: a sorted insertion buffer instead.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

#include "common/inline.h"

namespace smoe::cpu {

// True when (va, a) comes before (vb, b) in top-k order: larger value first, lower index on ties.
template <typename A>
inline bool topk_before(A va, int64_t a, A vb, int64_t b) {
  return va > vb || (va == vb && a < b);
}

// Order-preserving bits of a non-NaN float: a < b iff ordered_bits(a) < ordered_bits(b), and
// -0 == +0 (v + 0.0f turns -0 into +0). from_ordered_bits inverts it (giving +0 for either zero).
SMOE_INLINE uint32_t ordered_bits(float v) {
  const float w = v + 0.0f;
  uint32_t u;
  std::memcpy(&u, &w, sizeof u);
  return u ^ (static_cast<uint32_t>(static_cast<int32_t>(u) >> 31) | 0x80000000u);
}
SMOE_INLINE float from_ordered_bits(uint32_t u) {
  const uint32_t bits = u ^ ((u >> 31) != 0 ? 0x80000000u : 0xFFFFFFFFu);
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// The key of entry e with rank value v (not NaN). Never 0 (that would need v's bits all ones, a
// NaN), so 0 can mark "none".
SMOE_INLINE uint64_t topk_key(float v, int64_t e) {
  return (static_cast<uint64_t>(ordered_bits(v)) << 32) |
         static_cast<uint32_t>(~static_cast<uint32_t>(e));
}
SMOE_INLINE int32_t topk_key_index(uint64_t key) {
  return static_cast<int32_t>(~static_cast<uint32_t>(key));
}

// The largest of n keys below bound (0 when none). The mask-and-max form is the one GCC
// vectorises (a select of 0 in the loop is not).
SMOE_INLINE uint64_t max_key_below(const uint64_t* __restrict__ keys, int64_t n, uint64_t bound) {
  uint64_t best = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t x = keys[i] & (uint64_t(0) - static_cast<uint64_t>(keys[i] < bound));
    best = best > x ? best : x;
  }
  return best;
}

// Up to this k, k vectorised passes over the keys; beyond it a partial sort (O(n log k)).
constexpr int64_t kKeyPasses = 16;

// out[0..k) = the indices of the k largest keys of keys[0..n), largest first (k <= n). keys may
// be reordered.
SMOE_INLINE void select_keys(uint64_t* keys, int64_t n, int64_t k, int32_t* out) {
  if (k <= kKeyPasses) {
    uint64_t bound = ~uint64_t(0);
    for (int64_t j = 0; j < k; ++j) {
      bound = max_key_below(keys, n, bound);
      out[j] = topk_key_index(bound);
    }
    return;
  }
  std::partial_sort(keys, keys + k, keys + n, std::greater<uint64_t>());
  for (int64_t j = 0; j < k; ++j) out[j] = topk_key_index(keys[j]);
}

// Largest k for the double path's single-pass selection (a sorted buffer on the stack).
constexpr int64_t kTopkStack = 32;

// One pass over the row keeping the k best in a sorted buffer: O(E) when most entries fall
// below the current k-th. Equal values keep index order because e only grows.
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

// out[0..k) = the k best of E entries ranked by rank(e) (type A, never NaN), best first, ties to
// the lower index. keys: scratch of E entries (used for float ranks only).
template <typename A, typename Rank>
SMOE_INLINE void select_topk(Rank rank, int64_t E, int64_t k, int32_t* out, uint64_t* keys) {
  if constexpr (std::is_same_v<A, float>) {
    for (int64_t e = 0; e < E; ++e) keys[e] = topk_key(rank(e), e);
    select_keys(keys, E, k, out);
  } else if (k <= kTopkStack) {
    select_topk_insertion<A>(rank, E, k, out);
  } else {
    select_topk_passes<A>(rank, E, k, out);
  }
}

}  // namespace smoe::cpu
