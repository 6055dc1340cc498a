// Torch-free CUDA launchers of topk_sigmoid and its backward (one warp per row).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace smoe::cuda {

// logits [rows, E] with row stride ld (columns dense); weight, expert [rows, k] contiguous; bias
// [E] or nullptr (selection only). scratch: rows * (E + n_group) floats when n_group > 1 (the
// masked choice values and group scores of each row), else nullptr. Sets *invalid to 1 when a
// row holds a NaN (the caller asserts on it asynchronously). T is float, __half or
// __nv_bfloat16.
template <typename T>
cudaError_t topk_sigmoid(const T* logits, int64_t ld, int64_t rows, int64_t E, int64_t k,
                         int64_t n_group, int64_t topk_group, bool renormalize, float scale,
                         const float* bias, float* scratch, T* weight, int32_t* expert,
                         int32_t* invalid, cudaStream_t stream);

// grad_logits [rows, E] contiguous from grad_weight, expert [rows, k] (contiguous) and logits
// [rows, E] (row stride ld); the sigmoid is recomputed in float.
template <typename T>
cudaError_t topk_sigmoid_backward(const T* grad_weight, const T* logits, int64_t ld,
                                  const int32_t* expert, int64_t rows, int64_t E, int64_t k,
                                  bool renormalize, float scale, T* grad_logits,
                                  cudaStream_t stream);

}  // namespace smoe::cuda
