// Torch-free CUDA launchers of router_stats and its backward.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace smoe::cuda {

// Rows per block of prob_sum's partial sums (fixed: the sum's order follows from rows alone).
constexpr int64_t kStatsBlockRows = 32;

// The blocks of rows of prob_sum's partial sums.
inline int64_t router_stats_blocks(int64_t rows) {
  return (rows + kStatsBlockRows - 1) / kStatsBlockRows;
}

// The floats of scratch router_stats needs: each row's shift and 1 / sum of exps (2 * rows), and
// the blocks' partial sums (blocks * E) when there is more than one block.
inline int64_t router_stats_scratch(int64_t rows, int64_t E) {
  const int64_t blocks = router_stats_blocks(rows);
  return 2 * rows + (blocks > 1 ? blocks * E : 0);
}

// logits [rows, E] (row stride ld, columns dense) -> lse [rows] and prob_sum [E] (float), with
// scratch: router_stats_scratch(rows, E) floats. rows >= 1. T is float, __half or __nv_bfloat16.
template <typename T>
cudaError_t router_stats(const T* logits, int64_t ld, int64_t rows, int64_t E, float* scratch,
                         float* prob_sum, float* lse, cudaStream_t stream);

// grad_logits [rows, E] contiguous = p (gp - <p, gp> + gl) with p the rows' softmax (recomputed
// from the logits as the forward computes it); gp [E] and gl [rows] float, either nullptr (zero).
template <typename T>
cudaError_t router_stats_backward(const float* gp, const float* gl, const T* logits, int64_t ld,
                                  int64_t rows, int64_t E, T* grad_logits, cudaStream_t stream);

}  // namespace smoe::cuda
