// Helpers of the CPU glue of the row-wise routing ops (topk_softmax, topk_sigmoid, unified_topk,
// expert_choice, router_stats): the parallel_for grain, and a row kernel run over torch's pool that
// reports its lowest bad row.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace smoe::ops {

// Rows per parallel_for chunk for rows of about per_row_work operations each.
inline int64_t grain_rows(int64_t per_row_work) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, per_row_work));
}

// Keeps the lowest bad row over all chunks, so that the error names the same row at any thread
// count (each chunk reports its first).
inline void keep_first(std::atomic<int64_t>& first, int64_t row) {
  int64_t cur = first.load();
  while ((cur < 0 || row < cur) && !first.compare_exchange_weak(cur, row)) {
  }
}

// Runs kernel(begin, end) over the rows [0, n) in parallel_for chunks of `grain` rows; each call
// returns the first bad row of its range, or -1. Returns the lowest bad row over all of them, or
// -1: the same row at every thread count.
template <typename F>
int64_t first_bad_row(int64_t n, int64_t grain, const F& kernel) {
  std::atomic<int64_t> bad{-1};
  at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) {
    const int64_t r = kernel(b, e);
    if (r >= 0) keep_first(bad, r);
  });
  return bad.load();
}

}  // namespace smoe::ops
