// Torch-free CUDA launchers of topk_softmax and its backward (one warp per row).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace smoe::cuda {

// logits [rows, E] with row stride ld (columns dense); weight [rows, k] and expert [rows, k]
// contiguous; bias [E] or nullptr (added for the selection only). Sets *invalid to 1 when a row
// holds a NaN or +inf or only -inf (the caller zeroes it and asserts on it asynchronously). T is
// float, __half or __nv_bfloat16.
template <typename T>
cudaError_t topk_softmax(const T* logits, int64_t ld, int64_t rows, int64_t E, int64_t k,
                         bool renormalize, const float* bias, T* weight, int32_t* expert,
                         int32_t* invalid, cudaStream_t stream);

// grad_logits [rows, E] contiguous from grad_weight [rows, k] and expert [rows, k] (contiguous)
// and logits [rows, E] (row stride ld); the softmax is recomputed in float.
template <typename T>
cudaError_t topk_softmax_backward(const T* grad_weight, const T* logits, int64_t ld,
                                  const int32_t* expert, int64_t rows, int64_t E, int64_t k,
                                  bool renormalize, T* grad_logits, cudaStream_t stream);

}  // namespace smoe::cuda
