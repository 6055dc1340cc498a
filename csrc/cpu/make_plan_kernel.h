// Torch-free CPU kernel of make_plan: a stable counting sort of the T*k slots by expert.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace smoe::cpu {

// Batch Prioritized Routing: order[r * T + p] = the p-th token of rank r by priority, highest
// first, ties to the lower token index (a total order, so the result is unique). priority is
// [T, ranks] row-major (ranks = 1: one score per token, used for every choice rank).
// Returns the flat index of the first NaN priority, or -1.
inline int64_t priority_order(const float* priority, int64_t T, int64_t ranks, int32_t* order) {
  for (int64_t i = 0; i < T * ranks; ++i) {
    if (std::isnan(priority[i])) return i;
  }
  for (int64_t r = 0; r < ranks; ++r) {
    int32_t* o = order + r * T;
    for (int64_t t = 0; t < T; ++t) o[t] = static_cast<int32_t>(t);
    std::sort(o, o + T, [&](int32_t a, int32_t b) {
      const float pa = priority[a * ranks + r], pb = priority[b * ranks + r];
      return pa > pb || (pa == pb && a < b);
    });
  }
  return -1;
}

// Returns the flat index of the first entry of `expert` outside [-1, E), or -1 when all are valid.
inline int64_t find_invalid_expert(const int32_t* expert, int64_t n, int64_t E) {
  for (int64_t i = 0; i < n; ++i) {
    if (expert[i] < -1 || expert[i] >= E) return i;
  }
  return -1;
}

// expert [T, k] with values in [-1, E) (-1: no assignment). capacity < 0 means unbounded.
// With a capacity, experts accept slots rank-major (every token's first choice, then every second
// choice, ...) until full, as in GShard / V-MoE; within a rank tokens come in token order, or in
// `order` (from priority_order, order_ranks = 1 or k rows of T) for Batch Prioritized Routing.
// The kept slots are then listed in flat (token-major) order within each expert.
// Outputs: offsets [E+1]; token, slot [T*k] (-1 past offsets[E]); row [T*k] (-1 if dropped);
// kept [T*k]. `fill` is scratch of E entries.
inline void make_plan(const int32_t* expert, int64_t T, int64_t k, int64_t E, int64_t capacity,
                      const int32_t* order, int64_t order_ranks, int64_t* offsets, int32_t* token,
                      int32_t* slot, int32_t* row, bool* kept, int64_t* fill) {
  const int64_t n = T * k;
  for (int64_t e = 0; e < E; ++e) fill[e] = 0;
  if (capacity < 0) {
    for (int64_t s = 0; s < n; ++s) {
      kept[s] = expert[s] >= 0;
      if (kept[s]) ++fill[expert[s]];
    }
  } else {
    for (int64_t j = 0; j < k; ++j) {
      const int32_t* rank_order = order ? order + (order_ranks == 1 ? 0 : j) * T : nullptr;
      for (int64_t p = 0; p < T; ++p) {
        const int64_t t = rank_order ? rank_order[p] : p;
        const int64_t s = t * k + j;
        const int32_t e = expert[s];
        kept[s] = e >= 0 && fill[e] < capacity;
        if (kept[s]) ++fill[e];
      }
    }
  }
  offsets[0] = 0;
  for (int64_t e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + fill[e];
  for (int64_t e = 0; e < E; ++e) fill[e] = offsets[e];  // now the write cursor of each expert
  for (int64_t s = 0; s < n; ++s) {
    if (!kept[s]) {
      row[s] = -1;
      continue;
    }
    const int64_t pos = fill[expert[s]]++;
    token[pos] = static_cast<int32_t>(s / k);
    slot[pos] = static_cast<int32_t>(s);
    row[s] = static_cast<int32_t>(pos);
  }
  for (int64_t i = offsets[E]; i < n; ++i) {
    token[i] = -1;
    slot[i] = -1;
  }
}

}  // namespace smoe::cpu
