// Helpers of the CPU glue of the row-wise routing ops (topk_softmax, topk_sigmoid, expert_choice):
// the parallel_for grain and the lowest-bad-row report. Torch-free.
#pragma once

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

}  // namespace smoe::ops
