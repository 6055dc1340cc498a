// Torch-free CUDA launchers of permute / combine and their backwards: gathers only, no atomics.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace smoe::cuda {

// Every source is a row-major matrix with dense rows and row stride ld (in elements); every output
// is contiguous. Index values outside the source's n_src rows (negative ones included) select a
// zero row / contribute nothing. T is float, __half or __nv_bfloat16.

// out [M, d]: out[i] = x[token[i]] (an exact copy), or 0 where token[i] < 0.
template <typename T>
cudaError_t permute(const T* x, int64_t ld, int64_t n_src, const int32_t* token, int64_t M,
                    int64_t d, T* out, cudaStream_t stream);

// out [T, d]: out[t] = sum_j grad[row[t, j]] over row >= 0, in fixed j order (float sum).
template <typename T>
cudaError_t permute_backward(const T* grad, int64_t ld, int64_t n_src, const int32_t* row,
                             int64_t n_tokens, int64_t k, int64_t d, T* out, cudaStream_t stream);

// out [T, d]: out[t] = sum_j weight[t, j] * y_sorted[row[t, j]] over row >= 0 (float sum).
// weight and row [T, k] contiguous.
template <typename T>
cudaError_t combine(const T* y_sorted, int64_t ld, int64_t n_src, const T* weight,
                    const int32_t* row, int64_t n_tokens, int64_t k, int64_t d, T* out,
                    cudaStream_t stream);

// grad_y_sorted [M, d]: token[i] >= 0 ? weight.flat[slot[i]] * grad[token[i]] : 0;
// grad_weight [T, k]: row >= 0 ? <grad[t], y_sorted[row[t, j]]> : 0 (one warp per entry).
// grad [T, d] (row stride ld_g), y_sorted [M, d] (row stride ld_y).
template <typename T>
cudaError_t combine_backward(const T* grad, int64_t ld_g, const T* y_sorted, int64_t ld_y,
                             const T* weight, const int32_t* token, const int32_t* slot,
                             const int32_t* row, int64_t n_tokens, int64_t k, int64_t M, int64_t d,
                             T* grad_y_sorted, T* grad_weight, cudaStream_t stream);

}  // namespace smoe::cuda
